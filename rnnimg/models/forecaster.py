"""Encoder-forecaster (Shi et al. 2015): stacked ConvLSTM/ConvGRU layers read the first frames of a
clip, a second stack started from their states rolls the future forward, a decoder draws it.

    clip (B, T, 3, H, W) -> grey in [0, 1] (B, T, 1, H, W)
      context frames (B, K, 1, H, W) -> frame encoder (per frame, stride-2 convs) -> (B, K, C, h, w)
                                     -> encoder stack (rnnimg.nn ConvLSTM, L layers) -> states (L, B, Hd, h, w)
      forecaster stack, started from those states, input: the class as one-hot maps (conditioned)
                                     or one zero map -> (B, F, Hd, h, w), F = T - K steps
      -> decoder (per frame, transposed convs) -> logits of the F future frames (B, F, 1, H, W)

No teacher forcing and no scheduled sampling: the forecaster never sees a frame, true or
predicted; it rolls its state forward from the encoder's (the paper's design), so training and
generation run the same computation and there is no exposure bias to schedule against. The
training loss is over all F future frames at once.

The output is a ``Forecast``: the logits and the clip as grey [0, 1] frames (the target of a
forecaster is the future part of its own input; the loss, the metrics and the surprise score
read both). ``forward_features`` returns the forecaster's states per step, ``forward_head`` the
logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rnnimg.models.config import JsonConfig

RNN_TYPES = ("lstm", "gru")


@dataclass(frozen=True)
class ForecasterConfig(JsonConfig):
    """Architecture and clip layout of an encoder-forecaster. Saved next to every checkpoint and table."""

    config_name = "forecaster"
    tuple_fields = ("channels", "labels")

    frame_size: int = 64  # frames are resized to frame_size x frame_size (and made grey)
    frames_per_clip: int = 20  # frames per clip: context_frames read, the rest predicted
    context_frames: int = 10  # frames the encoder reads before the forecast starts
    clip_seconds: float = 2.0  # seconds of video one clip covers (frames_per_clip / the video's fps)
    stride_seconds: float = 1.0  # distance between clip starts when labelling: every predicted frame is scored once
    channels: tuple[int, ...] = (16, 32)  # channels of the frame encoder's stride-2 stages (1 to 3)
    rnn_type: str = "lstm"  # "lstm" (rnnimg.nn.ConvLSTM) or "gru" (rnnimg.nn.ConvGRU)
    hidden: int = 32  # channels of each recurrent layer's state
    layers: int = 2  # stacked recurrent layers in the encoder and in the forecaster
    kernel_size: int = 3  # kernel of the recurrent convolutions (odd)
    labels: tuple[str, ...] = ()  # classes of a conditioned model (the forecaster's input); empty: unconditioned

    def __post_init__(self) -> None:
        if self.frame_size < 8:
            raise ValueError(f"frame_size must be >= 8, got {self.frame_size}")
        if not 1 <= self.context_frames < self.frames_per_clip:
            raise ValueError(f"context_frames must be in 1..frames_per_clip-1 = {self.frames_per_clip - 1}, got {self.context_frames}")
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")
        if not 1 <= len(self.channels) <= 3 or any(int(c) < 1 for c in self.channels):
            raise ValueError(f"channels must be 1 to 3 positive stage widths, got {list(self.channels)}")
        if self.frame_size % (2 ** len(self.channels)):
            raise ValueError(f"frame_size must be divisible by 2^{len(self.channels)} (one halving per stage), got {self.frame_size}")
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {RNN_TYPES}, got {self.rnn_type!r}")
        if self.hidden < 1 or self.layers < 1:
            raise ValueError(f"hidden and layers must be >= 1, got {self.hidden} and {self.layers}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd and >= 1, got {self.kernel_size}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be distinct, got {list(self.labels)}")

    @property
    def future_frames(self) -> int:
        """Frames predicted per clip."""
        return self.frames_per_clip - self.context_frames


class Forecast(NamedTuple):
    """A forecaster's output: what it predicts and the clip it predicted from."""

    logits: torch.Tensor  # (B, F, 1, H, W): per-pixel logits of the F frames after the context
    frames: torch.Tensor  # (B, T, 1, H, W): the input clip, grey in [0, 1] (the future part is the target)


def to_grey(clips: torch.Tensor) -> torch.Tensor:
    """Model input float (B, T, 3, H, W) in [-0.5, 0.5] -> grey (B, T, 1, H, W) in [0, 1]."""
    return clips.float().mean(2, keepdim=True).add(0.5).clamp_(0.0, 1.0)  # (B, T, 3, H, W) -> (B, T, 1, H, W)


class Forecaster(nn.Module):
    """Frame encoder -> recurrent encoder stack -> recurrent forecaster stack -> frame decoder.

    Shapes (s = len(channels), h = H / 2^s, K context frames, F future frames):
        input clips: float (B, T, 3, H, W), values in [-0.5, 0.5] (``to_model_input``); T >= K
        forward_features(clips, labels, steps) -> forecaster states (B, steps, hidden, h, h)
        forward_head(states) -> logits (B, steps, 1, H, W)
        forward(clips, labels=None) -> Forecast(logits (B, F, 1, H, W), frames (B, T, 1, H, W))
    """

    def __init__(self, config: ForecasterConfig):
        super().__init__()
        from rnnimg.nn import ConvGRU, ConvLSTM

        self.config = config
        widths = (1, *config.channels)
        layers = []
        for k in range(len(config.channels)):
            layers += [nn.Conv2d(widths[k], widths[k + 1], 3, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
        self.frame_encoder = nn.Sequential(*layers)
        cell = ConvLSTM if config.rnn_type == "lstm" else ConvGRU
        k = config.kernel_size
        self.encoder = cell(config.channels[-1], config.hidden, kernel_size=k, num_layers=config.layers, batch_first=True)
        self.forecaster = cell(max(1, len(config.labels)), config.hidden, kernel_size=k, num_layers=config.layers, batch_first=True)
        up = []
        c_in = config.hidden
        for c_out in reversed(config.channels):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        self.decoder = nn.Sequential(*up, nn.Conv2d(c_in, 1, 3, padding=1))

    def _weights_dtype(self) -> torch.dtype:
        return self.encoder.weight_x_l0.dtype

    def forward_features(self, clips: torch.Tensor, labels: torch.Tensor | None = None, steps: int | None = None) -> torch.Tensor:
        """The forecaster's last-layer states for ``steps`` (default F) frames after the first K of ``clips``.

        Args:
            labels: int64 (B,) class ids, required by a conditioned model (``config.labels``), refused otherwise.
        """
        config = self.config
        steps = config.future_frames if steps is None else steps
        if clips.dim() != 5 or clips.shape[1] < config.context_frames:
            raise ValueError(f"clips must be (B, T, C, H, W) with T >= context_frames={config.context_frames}, got {tuple(clips.shape)}")
        if bool(config.labels) != (labels is not None):
            raise ValueError(f"a {'conditioned' if config.labels else 'unconditioned'} forecaster "
                             f"{'needs' if config.labels else 'takes no'} labels")
        grey = to_grey(clips)
        b, _, _, height, width = grey.shape
        context = grey[:, : config.context_frames]
        dtype = self._weights_dtype()  # float32, or bf16 for a model cast to it (labelling on a CPU)
        x = context.reshape(-1, 1, height, width).to(dtype)  # (B, K, 1, H, W) -> (B*K, 1, H, W)
        x = self.frame_encoder(x)  # (B*K, 1, H, W) -> (B*K, C, h, w)
        _, c, hh, ww = x.shape
        with torch.autocast(clips.device.type, enabled=False):  # the hand-written cells run in their weights' dtype
            x = x.reshape(b, config.context_frames, c, hh, ww).to(dtype)  # (B*K, C, h, w) -> (B, K, C, h, w)
            if config.labels:
                inputs = nn.functional.one_hot(labels.long(), len(config.labels)).to(dtype)  # (B,) -> (B, n_classes)
                inputs = inputs[:, None, :, None, None].expand(b, steps, len(config.labels), hh, ww)  # -> (B, steps, n, h, w)
            else:
                inputs = x.new_zeros(b, steps, 1, hh, ww)  # no input: the state carries everything
            _, state = self.encoder(x)  # (B, K, C, h, w) -> states (L, B, Hd, h, w)
            states, _ = self.forecaster(inputs.contiguous(), state)  # -> (B, steps, Hd, h, w)
        return states

    def forward_head(self, states: torch.Tensor) -> torch.Tensor:
        b, steps, d, hh, ww = states.shape
        x = states.reshape(b * steps, d, hh, ww)  # (B, F, Hd, h, w) -> (B*F, Hd, h, w)
        logits = self.decoder(x)  # (B*F, Hd, h, w) -> (B*F, 1, H, W)
        return logits.reshape(b, steps, 1, *logits.shape[-2:])  # (B*F, 1, H, W) -> (B, F, 1, H, W)

    def forward(self, clips: torch.Tensor, labels: torch.Tensor | None = None) -> Forecast:
        logits = self.forward_head(self.forward_features(clips, labels))
        return Forecast(logits, to_grey(clips))

    @torch.no_grad()
    def rollout(self, clips: torch.Tensor, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Grey predictions in [0, 1] of ``steps`` frames after the first K of ``clips``: (B, steps, 1, H, W)."""
        return torch.sigmoid(self.forward_head(self.forward_features(clips, labels, steps)).float())


def build_model(config: ForecasterConfig) -> Forecaster:
    return Forecaster(config)
