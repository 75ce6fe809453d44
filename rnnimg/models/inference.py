"""A trained model made cheaper to run, the same function: batch norm folded into its conv, channels-last.

The label job's model actors call ``for_inference`` once on the model they load. Nothing here
changes what the model computes beyond float rounding (``tests/test_models.py`` compares the
outputs of every task's model before and after):

- **Batch norm folded into the convolution before it.** In eval mode a ``BatchNorm2d`` is an
  affine map per channel, ``y = (x - mean) / sqrt(var + eps) * gamma + beta``, so after a
  ``Conv2d`` with weight ``W`` and bias ``b`` it can be taken into the conv:
  ``W' = W * s`` (per output channel), ``b' = (b - mean) * s + beta`` with
  ``s = gamma / sqrt(var + eps)``. The norm becomes ``nn.Identity``: one pass over the
  activations fewer per conv layer.
- **Channels-last memory format** (NHWC) for the conv weights, so oneDNN's CPU kernels (and
  cuDNN's tensor-core kernels on a GPU) run without converting layouts per call.

A folded model is for inference only: its ``state_dict`` no longer has the norms' entries, so it
is never saved or trained.
"""

from __future__ import annotations

import torch
from torch import nn


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every eval-mode ``BatchNorm2d`` that directly follows a ``Conv2d`` in an ``nn.Sequential`` into that conv.

    Returns:
        How many norms were folded.

    Raises:
        ValueError: the model is in training mode (its norms use batch statistics, not the running ones).
    """
    if model.training:
        raise ValueError("fold_batchnorm needs a model in eval mode (call model.eval() first)")
    folded = 0
    for sequential in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        layers = list(sequential)
        for i in range(len(layers) - 1):
            conv, norm = layers[i], layers[i + 1]
            if not (isinstance(conv, nn.Conv2d) and isinstance(norm, nn.BatchNorm2d) and norm.track_running_stats
                    and norm.running_mean is not None and conv.out_channels == norm.num_features):
                continue
            with torch.no_grad():
                scale = torch.rsqrt(norm.running_var + norm.eps)  # (C,)
                if norm.affine:
                    scale = scale * norm.weight
                bias = conv.bias if conv.bias is not None else torch.zeros_like(norm.running_mean)
                new_bias = (bias - norm.running_mean) * scale + (norm.bias if norm.affine else 0)
                conv.weight.mul_(scale.reshape(-1, 1, 1, 1))  # (C_out, C_in/g, k, k) scaled per output channel
                if conv.bias is None:
                    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)
                else:
                    conv.bias.copy_(new_bias)
            sequential[i + 1] = nn.Identity()
            folded += 1
    return folded


def for_inference(model: nn.Module) -> nn.Module:
    """The model in eval mode, norms folded, conv weights channels-last (in place; the model is returned).

    Only for running: see the module docstring.
    """
    model.eval()
    fold_batchnorm(model)
    if hasattr(model, "use_channels_last"):
        model.use_channels_last()  # the model's own switch: its frames go channels-last too (CRNN)
    elif any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)  # the first conv's output follows its weights' format
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model
