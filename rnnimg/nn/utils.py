"""Gradient-norm clipping, the usual guard against exploding gradients through time."""

from __future__ import annotations

import math
from typing import Iterable, Union

import torch
from torch import Tensor

__all__ = ["clip_grad_norm_"]


def clip_grad_norm_(
    parameters: Union[Tensor, Iterable[Tensor]],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Scale the gradients in place so that their joint norm is at most ``max_norm``.

    The norm is taken over all gradients together, as if concatenated into one vector;
    when it exceeds ``max_norm`` every gradient is multiplied by
    ``max_norm / (norm + 1e-6)``, the same rule as ``torch.nn.utils.clip_grad_norm_``.

    Args:
        parameters: a tensor or an iterable of tensors; those without ``.grad`` are skipped.
        max_norm: the largest norm allowed, > 0.
        norm_type: p of the p-norm, > 0, or ``math.inf`` for the largest absolute value.
        error_if_nonfinite: raise when the norm is nan or inf instead of scaling by it.

    Returns:
        The norm of the gradients before clipping (a 0-d tensor; 0 without gradients).

    Raises:
        ValueError: on max_norm <= 0 or norm_type <= 0.
        RuntimeError: when error_if_nonfinite is set and the norm is not finite.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"norm_type must be > 0 or inf, got {norm_type}")
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    device = grads[0].device
    if math.isinf(norm_type):
        norms = [g.detach().abs().max().to(device) for g in grads]
        total = torch.stack(norms).max()
    else:
        norms = [torch.linalg.vector_norm(g.detach(), norm_type).to(device) for g in grads]
        total = torch.linalg.vector_norm(torch.stack(norms), norm_type)
    if error_if_nonfinite and not bool(torch.isfinite(total)):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is {float(total)}; "
            "clipping by it would turn the gradients into nan/inf"
        )
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(scale.to(g.device, g.dtype))
    return total
