"""Recurrent segmenter: a per-frame conv encoder, a ConvLSTM/ConvGRU at low resolution, a decoder
with skip connections, per-frame mask logits.

    clip (B, T, 3, H, W) -> encoder (per frame, stride-2 stages) -> (B, T, C, H/2^s, W/2^s)
                         -> ConvLSTM / ConvGRU over T (``temporal=False``: a per-frame conv)
                         -> decoder (upsample, concat the encoder's skip, conv; per frame)
                         -> (B, T, 1, H, W) mask logits

``temporal=False`` is the ablation: the recurrent layer is replaced by a conv of the same
input and output channels and kernel, so no information crosses frames.

``forward_features`` returns the recurrent features at low resolution (and the skips the head
needs); ``forward_head`` the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnnimg.models.config import JsonConfig

RNN_TYPES = ("lstm", "gru")


@dataclass(frozen=True)
class SegmenterConfig(JsonConfig):
    """Architecture and input layout of a recurrent segmenter. Saved next to every checkpoint and table."""

    config_name = "segmenter"
    tuple_fields = ("channels",)

    frame_size: int = 64  # frames (and masks) are resized to frame_size x frame_size
    frames_per_clip: int = 12  # frames sampled per clip
    clip_seconds: float = 2.0  # seconds of video one clip covers
    stride_seconds: float = 2.0  # distance between clip starts when labelling
    channels: tuple[int, ...] = (16, 32)  # channels of the encoder's stride-2 stages (2 or 3 stages)
    rnn_type: str = "lstm"  # "lstm" (rnnimg.nn.ConvLSTM) or "gru" (rnnimg.nn.ConvGRU)
    hidden: int = 32  # channels of the recurrent layer's state
    kernel_size: int = 3  # kernel of the recurrent layer's convolutions (odd)
    temporal: bool = True  # False: the ablation, a per-frame conv instead of the recurrent layer
    dice_weight: float = 0.5  # weight of the soft Dice loss added to the per-pixel BCE

    def __post_init__(self) -> None:
        if self.frame_size < 16:
            raise ValueError(f"frame_size must be >= 16, got {self.frame_size}")
        if self.frames_per_clip < 1:
            raise ValueError(f"frames_per_clip must be >= 1, got {self.frames_per_clip}")
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")
        if not 2 <= len(self.channels) <= 3 or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"channels must be 2 or 3 positive stage widths, got {list(self.channels)}")
        if self.frame_size % (2 ** len(self.channels)):
            raise ValueError(f"frame_size must be divisible by 2^{len(self.channels)} (one halving per stage), got {self.frame_size}")
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {RNN_TYPES}, got {self.rnn_type!r}")
        if self.hidden < 1:
            raise ValueError(f"hidden must be >= 1, got {self.hidden}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if not isinstance(self.temporal, bool):
            raise ValueError(f"temporal must be true or false, got {self.temporal!r}")
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class Segmenter(nn.Module):
    """Per-frame encoder -> ConvLSTM/ConvGRU (or per-frame conv) -> decoder with skips -> mask logits.

    Shapes (s = len(channels) stages, h = H / 2^s):
        input clips: float (B, T, 3, H, W), values roughly in [-0.5, 0.5] (see ``to_model_input``)
        forward_features -> (B, T, hidden, h, h) and the skips [(B*T, 3, H, W), (B*T, C1, H/2, W/2), ...]
        forward_head     -> mask logits (B, T, 1, H, W)
    """

    def __init__(self, config: SegmenterConfig):
        super().__init__()
        from rnnimg.nn import ConvGRU, ConvLSTM

        self.config = config
        widths = (3, *config.channels)
        # Stage k: stride-2 conv then a conv at that resolution.
        self.encoder = nn.ModuleList(nn.Sequential(_conv(widths[k], widths[k + 1], 2), _conv(widths[k + 1], widths[k + 1]))
                                     for k in range(len(config.channels)))
        deepest, k = config.channels[-1], config.kernel_size
        if config.temporal:
            cell = ConvLSTM if config.rnn_type == "lstm" else ConvGRU
            self.rnn = cell(deepest, config.hidden, kernel_size=k, batch_first=True)
        else:
            self.rnn = nn.Sequential(nn.Conv2d(deepest, config.hidden, k, padding=k // 2), nn.Tanh())
        # Decoder stage j goes from the resolution of skip s-j to the one of skip s-j-1.
        self.decoder = nn.ModuleList()
        c_in = config.hidden
        for skip in reversed(widths[:-1]):
            c_out = max(skip, 16)
            self.decoder.append(nn.Sequential(_conv(c_in + skip, c_out), _conv(c_out, c_out)))
            c_in = c_out
        self.head = nn.Conv2d(c_in, 1, 1)

    def forward_features(self, clips: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, t, c, h, w = clips.shape
        x = clips.reshape(b * t, c, h, w)  # (B, T, C, H, W) -> (B*T, C, H, W)
        skips = [x]
        for stage in self.encoder:
            x = stage(x)  # (B*T, C_k, H/2^k, W/2^k) -> (B*T, C_k+1, H/2^(k+1), W/2^(k+1))
            skips.append(x)
        skips.pop()  # the deepest map goes through the recurrent layer, not a skip
        _, d, hh, ww = x.shape
        if self.config.temporal:
            sequence = x.reshape(b, t, d, hh, ww)  # (B*T, D, h, w) -> (B, T, D, h, w)
            weights_dtype = next(self.rnn.parameters()).dtype
            with torch.autocast(clips.device.type, enabled=False):  # the hand-written cells run in their weights' dtype
                sequence, _ = self.rnn(sequence.to(weights_dtype))  # (B, T, D, h, w) -> (B, T, hidden, h, w)
        else:
            sequence = self.rnn(x).reshape(b, t, -1, hh, ww)  # (B*T, D, h, w) -> (B*T, hidden, h, w) -> (B, T, hidden, h, w)
        return sequence, skips

    def forward_head(self, sequence: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        b, t, d, hh, ww = sequence.shape
        x = sequence.reshape(b * t, d, hh, ww)  # (B, T, hidden, h, w) -> (B*T, hidden, h, w)
        for stage, skip in zip(self.decoder, reversed(skips)):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (B*T, C, 2h, 2w)
            x = stage(torch.cat([x, skip.to(x.dtype)], dim=1))  # (B*T, C + C_skip, 2h, 2w) -> (B*T, C', 2h, 2w)
        logits = self.head(x)  # (B*T, C', H, W) -> (B*T, 1, H, W)
        return logits.reshape(b, t, 1, *logits.shape[-2:])  # (B*T, 1, H, W) -> (B, T, 1, H, W)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(*self.forward_features(clips))


def build_model(config: SegmenterConfig) -> Segmenter:
    return Segmenter(config)
