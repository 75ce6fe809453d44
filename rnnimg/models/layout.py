"""Clip layouts at the edges: uint8 (T, H, W, C) out of the decoder, float (B, T, C, H, W) into a model."""

from __future__ import annotations

import numpy as np
import torch


def to_model_input(clips_thwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) or (T, H, W, C) -> float32 (B, T, C, H, W) in [-0.5, 0.5].

    A tensor stays on its device: convert after moving uint8 to the GPU (4x fewer bytes to copy).
    """
    x = torch.as_tensor(clips_thwc)
    if x.dim() == 4:
        x = x.unsqueeze(0)  # (T, H, W, C) -> (1, T, H, W, C)
    if x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be (B, T, H, W, 3) or (T, H, W, 3) uint8, got shape {tuple(x.shape)}")
    x = x.permute(0, 1, 4, 2, 3)  # (B, T, H, W, C) -> (B, T, C, H, W)
    return x.float().div_(255.0).sub_(0.5)
