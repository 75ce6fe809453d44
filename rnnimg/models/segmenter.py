"""Segmenter: a per-frame conv encoder, a recurrent layer over time or over space at low
resolution, a decoder with skip connections, per-frame mask logits.

    clip (B, T, 3, H, W) -> encoder (per frame, stride-2 stages) -> (B, T, C, H/2^s, W/2^s)
                         -> the middle layer, one of:
                              ConvLSTM / ConvGRU over T                  (temporal=True, the default)
                              a per-frame conv                           (temporal=False: the ablation)
                              ReNet sweeps over each frame's cells       (spatial="renet": still images)
                              a per-frame conv stack of ReNet's size     (spatial="conv": its ablation)
                         -> decoder (upsample, concat the encoder's skip, conv; per frame) down to H/mask_stride
                         -> (B, T, 1, H, W) mask logits (a 1x1 conv to mask_stride^2 sub-pixel logits per cell)

``temporal=False`` replaces the recurrent layer by a conv of the same input and output channels
and kernel, so no information crosses frames. ``spatial="renet"`` (with ``temporal=False``) puts
``spatial_layers`` ReNet layers there (``rnnimg.nn.ReNet``: bidirectional row then column
sweeps over patches of ``spatial_patch`` cells), so every low-resolution cell sees the whole
frame; ``spatial_norm`` (a LayerNorm on each sweep's output) and ``spatial_tied`` (one set of
weights for both directions of a sweep) are what let it learn the still-image rule within a few
CPU-minutes (bench/RESULTS_segment.md). ``spatial="conv"`` is its ablation, a stack of one conv
per sweep (the same depth, the first with stride ``spatial_patch``) whose width is chosen to have
the same parameter count, so it sees a few cells only. With ``spatial_patch=2`` the middle
layer's output is at h/2 and the decoder's first stage upsamples it to its skip's size.

``mask_stride=2`` (the default) keeps every convolution off the full-resolution grid, which is
what makes labelling cheap (bench/segment_label_cost.py): the last decoder stage runs at H/2 and
its 1x1 head gives each cell the logits of its 2x2 pixels (depth to space, as ESPCN's
sub-pixel convolution); the encoder's first stride-2 conv read those pixels, so edges stay
pixel-sharp. ``mask_stride=1`` is the layout saved before the field existed: a last decoder stage
at full resolution with the input frame as its skip.

``forward_features`` returns the middle layer's features at low resolution (and the skips the
head needs); ``forward_head`` the logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rnnimg.models.config import JsonConfig

RNN_TYPES = ("lstm", "gru")
SPATIAL = ("none", "renet", "conv")
MASK_STRIDES = (1, 2)
# The fields of the first exported segmenters (every config.json has them all), and the fields added
# since with what a config.json without them means: loading one gives the architecture it was saved
# with (``SegmenterConfig.from_dict``), not today's defaults.
FIRST_FIELDS = frozenset({"frame_size", "frames_per_clip", "clip_seconds", "stride_seconds", "channels", "rnn_type", "hidden",
                          "kernel_size", "temporal", "dice_weight"})
SAVED_BEFORE = {"mask_stride": 1, "spatial": "none", "spatial_layers": 1, "spatial_patch": 1, "spatial_norm": False,
                "spatial_tied": False}


@dataclass(frozen=True)
class SegmenterConfig(JsonConfig):
    """Architecture and input layout of a segmenter. Saved next to every checkpoint and table."""

    config_name = "segmenter"
    tuple_fields = ("channels",)

    frame_size: int = 64  # frames (and masks) are resized to frame_size x frame_size
    frames_per_clip: int = 12  # frames sampled per clip (1 for still images)
    clip_seconds: float = 2.0  # seconds of video one clip covers
    stride_seconds: float = 2.0  # distance between clip starts when labelling
    channels: tuple[int, ...] = (16, 32)  # channels of the encoder's stride-2 stages (2 or 3 stages)
    rnn_type: str = "lstm"  # cell of the recurrent layers: "lstm" (ConvLSTM, ReNet's LSTM) or "gru"
    hidden: int = 32  # channels out of the middle layer (the ConvLSTM's state; ReNet: hidden/2 per sweep direction)
    kernel_size: int = 3  # kernel of the ConvLSTM's and the conv ablations' convolutions (odd)
    temporal: bool = True  # False: no information crosses frames (the per-frame ablation, or a spatial model)
    spatial: str = "none"  # with temporal=False: "renet" (ReNet sweeps), "conv" (its same-size conv ablation)
    spatial_layers: int = 1  # ReNet layers (spatial="renet"), or pairs of convs (spatial="conv")
    spatial_patch: int = 1  # patch side of the first ReNet layer, in cells (the conv ablation: its first stride); 1 or 2
    spatial_norm: bool = True  # spatial="renet": a LayerNorm on each sweep's output (rnnimg.nn.ReNet's norm); unused otherwise
    spatial_tied: bool = True  # spatial="renet": each sweep's two directions share weights (ReNet's tied); unused otherwise
    mask_stride: int = 2  # the decoder stops at H/mask_stride, each cell's head gives its mask_stride^2 pixels; 1: a full-resolution stage
    dice_weight: float = 0.5  # weight of the soft Dice loss added to the per-pixel BCE

    def __post_init__(self) -> None:
        self.check_clip_plan()
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
        if self.spatial not in SPATIAL:
            raise ValueError(f"spatial must be one of {SPATIAL}, got {self.spatial!r}")
        if self.spatial != "none" and self.temporal:
            raise ValueError(f"spatial={self.spatial!r} takes the recurrent layer's place, so it needs temporal=false, got temporal=true")
        if self.spatial == "renet" and self.hidden % 2:
            raise ValueError(f"spatial='renet' splits hidden between the two sweep directions: hidden must be even, got {self.hidden}")
        if isinstance(self.spatial_layers, bool) or not isinstance(self.spatial_layers, int) or self.spatial_layers < 1:
            raise ValueError(f"spatial_layers must be an integer >= 1, got {self.spatial_layers!r}")
        if self.spatial == "none" and self.spatial_layers != 1:
            raise ValueError(f"spatial_layers applies to spatial='renet' or 'conv', got spatial_layers={self.spatial_layers} with spatial='none'")
        if self.spatial_patch not in (1, 2):
            raise ValueError(f"spatial_patch must be 1 or 2, got {self.spatial_patch!r}")
        if self.spatial == "none" and self.spatial_patch != 1:
            raise ValueError(f"spatial_patch applies to spatial='renet' or 'conv', got spatial_patch={self.spatial_patch} with spatial='none'")
        for name in ("spatial_norm", "spatial_tied"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mask_stride not in MASK_STRIDES:
            raise ValueError(f"mask_stride must be one of {MASK_STRIDES}, got {self.mask_stride!r}")
        if self.dice_weight < 0:
            raise ValueError(f"dice_weight must be >= 0, got {self.dice_weight}")

    @classmethod
    def from_dict(cls, data: dict) -> "SegmenterConfig":
        """Build from a dict; a saved config.json (it has every field the first segmenter had) without
        the fields added since means the layout of its time (``SAVED_BEFORE``), not today's defaults.

        Raises:
            ValueError: an unknown key, or a value the checks refuse.
        """
        if FIRST_FIELDS <= set(data):
            data = {**{k: v for k, v in SAVED_BEFORE.items() if k not in data}, **data}
        return super().from_dict(data)


def _conv(c_in: int, c_out: int, stride: int = 1, kernel_size: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def _renet_stack(in_channels: int, config: SegmenterConfig) -> nn.Sequential:
    """``spatial_layers`` ReNet layers (the first on patches of ``spatial_patch`` cells, the others on cells),
    ``hidden // 2`` states per sweep direction: (N, C, h, w) -> (N, hidden, h/p, w/p), p = spatial_patch."""
    from rnnimg.nn import ReNet

    layers, c, d = [], in_channels, config.hidden // 2
    for k in range(config.spatial_layers):
        layers.append(ReNet(c, d, patch_size=config.spatial_patch if k == 0 else 1, rnn_type=config.rnn_type,
                            norm=config.spatial_norm, tied=config.spatial_tied))
        c = config.hidden
    stack = nn.Sequential(*layers)
    if config.rnn_type == "lstm":
        # Chrono initialisation (Tallec & Ollivier 2018): forget-gate biases log(U(1, L - 1)) and input-gate
        # biases their negatives, L = cells per sweep, so that the states keep memories over 1 to L cells.
        # With biases near 0 a cell's influence fades as ~0.5^cells: untrained, the logits of one corner
        # of a 64x64 frame move ~3e-7 as much with the opposite corner's pixels as with nearby ones
        # (~1e-4 with this initialisation; bench/RESULTS_segment.md).
        cells = config.frame_size // 2 ** len(config.channels) // config.spatial_patch
        with torch.no_grad():
            for name, bias in stack.named_parameters():
                if ".bias_ih_" in name:  # gates stacked i, f, g, o
                    forget = torch.log(torch.empty(d).uniform_(1.0, max(cells - 1, 2)))
                    bias[d:2 * d], bias[:d] = forget, -forget
                elif ".bias_hh_" in name:
                    bias[:2 * d] = 0.0
    return stack


def _conv_stack(in_channels: int, width: int, config: SegmenterConfig) -> nn.Sequential:
    """ReNet's ablation: one conv per sweep (2 x spatial_layers, the first with stride ``spatial_patch``), ``width``
    channels inside, ``hidden`` out through a tanh (the range of the sweeps' states): (N, C, h, w) -> (N, hidden, h/p, w/p)."""
    k = config.kernel_size
    layers, c = [], in_channels
    for i in range(2 * config.spatial_layers - 1):
        layers.append(_conv(c, width, stride=config.spatial_patch if i == 0 else 1, kernel_size=k))
        c = width
    layers += [nn.Conv2d(c, config.hidden, k, padding=k // 2), nn.Tanh()]
    return nn.Sequential(*layers)


def _parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_ablation_width(in_channels: int, config: SegmenterConfig) -> int:
    """The inner width of the conv stack (``spatial="conv"``) whose parameter count is closest to the ReNet stack's.

    The candidates are built on the meta device with the random state put back: counting leaves the
    model's initialisation as it would be without it.
    """
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        target = _parameters(_renet_stack(in_channels, config))
        sizes = {1: _parameters(_conv_stack(in_channels, 1, config))}
        width = 1
        while True:  # the count grows with the width
            sizes[width + 1] = _parameters(_conv_stack(in_channels, width + 1, config))
            if sizes[width + 1] > target:
                break
            width += 1
    return width if target - sizes[width] <= sizes[width + 1] - target else width + 1


class Segmenter(nn.Module):
    """Per-frame encoder -> ConvLSTM/ConvGRU, per-frame conv, ReNet or conv stack -> decoder with skips -> mask logits.

    Shapes (s = len(channels) stages, h = H / 2^s):
        input clips: float (B, T, 3, H, W), values roughly in [-0.5, 0.5] (see ``to_model_input``)
        forward_features -> (B, T, hidden, h/p, h/p) (p = spatial_patch, 1 unless spatial) and the skips
                            [(B*T, 3, H, W), (B*T, C1, H/2, W/2), ...]
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
        elif config.spatial == "renet":
            self.rnn = _renet_stack(deepest, config)
        elif config.spatial == "conv":
            self.rnn = _conv_stack(deepest, conv_ablation_width(deepest, config), config)
        else:
            self.rnn = nn.Sequential(nn.Conv2d(deepest, config.hidden, k, padding=k // 2), nn.Tanh())
        # Decoder stage j goes from the resolution of skip s-j to the one of skip s-j-1, down to H/mask_stride:
        # the skips it uses are widths[finest:-1] (widths[0], the input frame, only with mask_stride=1).
        self.finest = config.mask_stride.bit_length() - 1  # index of the finest skip used: 0 (H) or 1 (H/2)
        self.decoder = nn.ModuleList()
        c_in = config.hidden
        for skip in reversed(widths[self.finest:-1]):
            c_out = max(skip, 16)
            self.decoder.append(nn.Sequential(_conv(c_in + skip, c_out), _conv(c_out, c_out)))
            c_in = c_out
        self.head = nn.Conv2d(c_in, config.mask_stride**2, 1)  # a logit per pixel of each cell

    def forward_features(self, clips: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, t, c, h, w = clips.shape
        x = clips.reshape(b * t, c, h, w)  # (B, T, C, H, W) -> (B*T, C, H, W)
        skips = [x]
        for stage in self.encoder:
            x = stage(x)  # (B*T, C_k, H/2^k, W/2^k) -> (B*T, C_k+1, H/2^(k+1), W/2^(k+1))
            skips.append(x)
        skips.pop()  # the deepest map goes through the middle layer, not a skip
        _, d, hh, ww = x.shape
        if self.config.temporal:
            sequence = x.reshape(b, t, d, hh, ww)  # (B*T, D, h, w) -> (B, T, D, h, w)
            weights_dtype = next(self.rnn.parameters()).dtype
            with torch.autocast(clips.device.type, enabled=False):  # the hand-written cells run in their weights' dtype
                sequence, _ = self.rnn(sequence.to(weights_dtype))  # (B, T, D, h, w) -> (B, T, hidden, h, w)
        elif self.config.spatial == "renet":
            weights_dtype = next(self.rnn.parameters()).dtype
            with torch.autocast(clips.device.type, enabled=False):  # the hand-written sweeps too
                x = self.rnn(x.to(weights_dtype))  # (B*T, D, h, w) -> (B*T, hidden, h/p, w/p)
            sequence = x.reshape(b, t, *x.shape[1:])  # (B*T, hidden, h/p, w/p) -> (B, T, hidden, h/p, w/p)
        else:
            x = self.rnn(x)  # (B*T, D, h, w) -> (B*T, hidden, h/p, w/p)
            sequence = x.reshape(b, t, *x.shape[1:])  # (B*T, hidden, h/p, w/p) -> (B, T, hidden, h/p, w/p)
        return sequence, skips

    def forward_head(self, sequence: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        b, t, d, hh, ww = sequence.shape
        x = sequence.reshape(b * t, d, hh, ww)  # (B, T, hidden, h, w) -> (B*T, hidden, h, w)
        for stage, skip in zip(self.decoder, reversed(skips[self.finest:])):
            x = nn.functional.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)  # (B*T, C, 2h, 2w)
            x = stage(torch.cat([x, skip.to(x.dtype)], dim=1))  # (B*T, C + C_skip, 2h, 2w) -> (B*T, C', 2h, 2w)
        logits = self.head(x)  # (B*T, C', H/m, W/m) -> (B*T, m*m, H/m, W/m), m = mask_stride
        logits = nn.functional.pixel_shuffle(logits, self.config.mask_stride)  # (B*T, m*m, H/m, W/m) -> (B*T, 1, H, W)
        return logits.reshape(b, t, 1, *logits.shape[-2:])  # (B*T, 1, H, W) -> (B, T, 1, H, W)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(*self.forward_features(clips))


def build_model(config: SegmenterConfig) -> Segmenter:
    return Segmenter(config)
