"""CRNN: a CNN applied to every frame, then an LSTM/GRU over time, with a clip head and a
per-frame head.

    clip (B, T, C, H, W) -> frame CNN -> (B, T, D) -> LSTM/GRU -> (B, T, R)
                                                         |-> clip head  (last step) -> (B, K)
                                                         |-> frame head (each step) -> (B, T, K)

The per-frame CNN keeps a coarse spatial grid (adaptive pooling to ``grid x grid``, then
flatten) instead of global average pooling, so that where things are in the frame reaches
the recurrent layer: motion is a change of position over time.

``forward_features`` returns the recurrent features and ``forward_head`` the logits, so a
labelling job can also write embeddings.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from torch import nn

RNN_TYPES = ("lstm", "gru")
RNN_IMPLS = ("torch", "reference")
BACKBONES = ("small",)


@dataclass(frozen=True)
class CRNNConfig:
    """Architecture and input layout of a CRNN. Saved next to every checkpoint and table."""

    labels: tuple[str, ...] = ("left", "right")  # class names; index = class id
    frame_size: int = 64  # frames are resized to frame_size x frame_size before the CNN
    frames_per_clip: int = 8  # frames sampled per clip
    clip_seconds: float = 2.0  # seconds of video one clip covers
    stride_seconds: float = 2.0  # distance between clip starts when labelling
    backbone: str = "small"  # per-frame CNN: "small" (built in)
    cnn_channels: tuple[int, ...] = (16, 32, 64, 64)  # channels of the small CNN's stride-2 stages
    grid: int = 4  # spatial grid kept after the CNN (grid x grid cells, flattened)
    feature_dim: int = 128  # per-frame feature size fed to the recurrent layer
    rnn_type: str = "lstm"  # "lstm" or "gru"
    rnn_impl: str = "torch"  # "torch" (cuDNN/native kernels) or "reference" (rnnimg.nn, from the equations)
    rnn_hidden: int = 128  # hidden size of the recurrent layer
    rnn_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.1  # dropout before the heads
    frame_loss_weight: float = 0.3  # weight of the per-frame head's loss during training

    def __post_init__(self) -> None:
        if len(self.labels) < 2:
            raise ValueError(f"labels must name at least 2 classes, got {list(self.labels)}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique, got {list(self.labels)}")
        if self.frame_size < 16:
            raise ValueError(f"frame_size must be >= 16, got {self.frame_size}")
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {RNN_TYPES}, got {self.rnn_type!r}")
        if self.rnn_impl not in RNN_IMPLS:
            raise ValueError(f"rnn_impl must be one of {RNN_IMPLS}, got {self.rnn_impl!r}")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
        if self.rnn_hidden < 1 or self.rnn_layers < 1 or self.feature_dim < 1:
            raise ValueError("rnn_hidden, rnn_layers and feature_dim must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict) -> "CRNNConfig":
        """Build from a dict (e.g. config.json), refusing unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown CRNN config keys {sorted(unknown)}; accepted: {sorted(known)}")
        values = dict(data)
        for key in ("labels", "cnn_channels"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


class SmallCNN(nn.Module):
    """Per-frame CNN: stride-2 conv stages, a ``grid x grid`` pool, flatten, linear.

    Input (N, 3, H, W) float; output (N, feature_dim).
    """

    def __init__(self, channels: tuple[int, ...], grid: int, feature_dim: int):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in channels:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
            c_in = c_out
        self.stages = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.proj = nn.Sequential(nn.Flatten(), nn.Linear(c_in * grid * grid, feature_dim), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.pool(self.stages(x)))  # (N, C, h, w) -> (N, C, g, g) -> (N, D)


def _make_rnn(config: CRNNConfig) -> nn.Module:
    kwargs = dict(input_size=config.feature_dim, hidden_size=config.rnn_hidden, num_layers=config.rnn_layers, batch_first=True)
    if config.rnn_impl == "reference":
        from rnnimg import nn as reference  # the cells written from their equations

        module = reference
    else:
        module = nn
    return module.LSTM(**kwargs) if config.rnn_type == "lstm" else module.GRU(**kwargs)


class CRNN(nn.Module):
    """Per-frame CNN -> LSTM/GRU -> clip head and per-frame head.

    Shapes:
        input clips: float (B, T, C, H, W), values roughly in [-0.5, 0.5] (see ``to_model_input``)
        forward_features -> (B, T, R), the recurrent outputs (R = rnn_hidden)
        forward_head     -> clip logits (B, K), frame logits (B, T, K)
    """

    def __init__(self, config: CRNNConfig):
        super().__init__()
        self.config = config
        self.backbone = SmallCNN(config.cnn_channels, config.grid, config.feature_dim)
        self.rnn = _make_rnn(config)
        self.dropout = nn.Dropout(config.dropout)
        self.clip_head = nn.Linear(config.rnn_hidden, config.num_classes)
        self.frame_head = nn.Linear(config.rnn_hidden, config.num_classes)

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        b, t, c, h, w = clips.shape
        frames = clips.reshape(b * t, c, h, w)  # (B, T, C, H, W) -> (B*T, C, H, W)
        per_frame = self.backbone(frames).reshape(b, t, -1)  # (B*T, D) -> (B, T, D)
        if hasattr(self.rnn, "flatten_parameters"):
            self.rnn.flatten_parameters()
        sequence, _ = self.rnn(per_frame)  # (B, T, D) -> (B, T, R)
        return sequence

    def forward_head(self, sequence: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sequence = self.dropout(sequence)
        clip_logits = self.clip_head(sequence[:, -1])  # (B, R) at the last step -> (B, K)
        frame_logits = self.frame_head(sequence)  # (B, T, R) -> (B, T, K)
        return clip_logits, frame_logits

    def forward(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_head(self.forward_features(clips))


def to_model_input(clips_thwc: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (B, T, H, W, C) or (T, H, W, C) -> float32 (B, T, C, H, W) in [-0.5, 0.5]."""
    x = torch.as_tensor(clips_thwc)
    if x.dim() == 4:
        x = x.unsqueeze(0)  # (T, H, W, C) -> (1, T, H, W, C)
    if x.dim() != 5 or x.shape[-1] != 3:
        raise ValueError(f"clips must be (B, T, H, W, 3) or (T, H, W, 3) uint8, got shape {tuple(x.shape)}")
    x = x.permute(0, 1, 4, 2, 3)  # (B, T, H, W, C) -> (B, T, C, H, W)
    return x.float().div_(255.0).sub_(0.5)


def build_model(config: CRNNConfig) -> CRNN:
    return CRNN(config)
