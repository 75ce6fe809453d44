"""The precision rule, one place for training and labelling: bf16 autocast on GPU, float32 on CPU.

Importable without torch (configs validate against ``PRECISIONS``); torch is imported on use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

PRECISIONS = ("auto", "bf16", "fp32")


def check_precision(precision: str) -> None:
    """Raises ValueError unless ``precision`` is one of ``PRECISIONS``."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def autocast_dtype(precision: str, device: "torch.device | str") -> "torch.dtype | None":
    """The autocast dtype for a precision setting on a device (None: plain float32).

    ``auto`` is bf16 on CUDA and float32 elsewhere; ``bf16`` forces bf16 autocast (on CPU too).

    Raises:
        ValueError: an unknown precision.
    """
    import torch

    check_precision(precision)
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None
