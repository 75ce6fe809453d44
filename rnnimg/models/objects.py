"""Object CRNN: the CRNN's per-frame CNN on a spatial grid, a recurrent layer over time, and per
frame, for each class, a presence logit and a box. Two heads (``ObjectsConfig.head``):

``head="cells"`` (the default, ``CellObjectCRNN``; bench/RESULTS_objects.md, run 3): no pooling and
no tracker; the recurrence runs per cell of the map and every cell predicts, CenterNet/YOLO-style:

    clip (B, T, 3, H, W) -> frame CNN (rnnimg.models.crnn.SmallCNN's stride-2 stages, then one
                            context conv)                           -> map (B, T, C, g, g), g = H / 2^stages
        map -> rnnimg.nn.ConvLSTM (ConvGRU) over T, k x k gates    -> state (B, T, S, g, g)
               (``temporal=False``: a k x k conv C -> S and tanh, frame by frame: the ablation)
        [state, map] -> 3x3 conv, ReLU, 1x1 conv                   -> cells (B, T, K, 5, g, g):
               per class and cell a presence logit, the centre's offset in the cell (dx, dy), log size (w, h)
        decode (``decode_cells``): per class the cell with the highest logit -> (B, T, K, 5)

A hidden object lives in the state of the cells it was last seen in; the k x k recurrent kernel
moves it from cell to cell as the object moves behind the occluder. The box comes from the cell
that holds the object, not from pooled features: that is what lifted visible F1 (run 3). The loss
(``rnnimg.tasks.objects.cell_loss``) weighs the hidden class-frames ``hidden_weight`` times (run 4):
what goes wrong there is the position drifting while the object is hidden, not its score or size.

``head="tracker"`` (``ObjectCRNN``, every model saved before ``head`` existed):

    clip -> the same frame CNN and context conv -> map (B*T, C, g, g)
        map -> grid pool, flatten, linear (SmallCNN's projection)       -> features (B, T, D)
        map -> 1x1 convs: per class a heat logit and a size per cell
            -> soft-argmax over the cells: centre, size, evidence        -> measured (B, T, K, 5)
    [features, measured] -> LSTM / GRU over T (``temporal=False``: a per-frame linear + tanh) -> (B, T, R)
    [(B, T, R), measured] -> head (per step): per class a presence logit and the gains of a tracker
    tracker over T: per class a centre, a velocity and a size; each step predicts (centre + velocity)
                    and corrects towards the frame's measurement by the gains
                          -> (B, T, K, 5): presence logit, box (x0, y0, x1, y1 in [0, 1])

Why the measurements: a box regressed from a flattened grid learns slowly; a soft-argmax over the
cells gives, per frame and class, a centre with sub-cell precision, a size and how much evidence
there is (log-sum-exp of the heat logits), trained directly on the visible objects
(``measured`` and ``heat`` are returned for that loss).

Why the tracker: an LSTM asked to output positions itself learns to copy and extrapolate them
slowly (bench/RESULTS_objects.md, development notes: still a median 14 px off on visible
objects whose measurement it was given, after 900 steps). So the recurrent state that carries
the boxes is an alpha-beta filter (centre and velocity per class, constant velocity between
frames) whose gains the LSTM sets at every step from what it has seen: gain 1 where the object
shows (take the measurement), 0 while it is hidden (coast on the velocity), small velocity gains
to smooth it. Presence comes from the LSTM directly (an object stays present while hidden).

One instance per class per frame: both heads have one presence and one box per class.
``temporal=False`` is the ablation: no state crosses frames; the recurrent layer is replaced by a
per-frame layer of the same input and output sizes (tracker: the box is the frame's measurement).

``forward_features`` returns the recurrent features (tracker: (B, T, R) and the measurements;
cells: the per-cell state and the map); ``forward_head`` the detections (cells: the per-cell outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
from torch import nn

from rnnimg.models.config import JsonConfig
from rnnimg.models.crnn import RNN_IMPLS, RNN_TYPES, SmallCNN, make_rnn


HEADS = ("cells", "tracker")
# Fields of the configs saved before ``head`` existed (every one of them a tracker model), and what
# the fields added since meant then: an old config.json loads with its old layout, not today's default (cells).
FIRST_FIELDS = frozenset({"labels", "frame_size", "frames_per_clip", "clip_seconds", "stride_seconds", "cnn_channels", "grid",
                          "feature_dim", "rnn_type", "rnn_impl", "rnn_hidden", "rnn_layers", "dropout", "temporal", "min_inside",
                          "box_weight", "giou_weight", "measure_weight", "score_threshold"})
SAVED_BEFORE = {"head": "tracker", "cell_hidden": 32, "cell_kernel": 3, "presence_sigma": 0.5, "hidden_weight": 1.0}
# Fields of the configs saved with the cells head before ``hidden_weight`` existed, and what the fields added since meant then.
CELLS_FIELDS = FIRST_FIELDS | {"head", "cell_hidden", "cell_kernel", "presence_sigma"}
SAVED_BEFORE_HIDDEN_WEIGHT = {"hidden_weight": 1.0}
# Oldest first: a saved config that has every field of a generation gets, for each field it lacks, the value of that time.
SAVED_LAYOUTS = ((FIRST_FIELDS, SAVED_BEFORE), (CELLS_FIELDS, SAVED_BEFORE_HIDDEN_WEIGHT))
# The cells' presence bias starts at logit(0.5) = 0: the decoded score (the highest of the g*g cells) then
# starts near the share of present class-frames (about one half in the synthetic data), and an untrained
# model reports some classes at the default threshold (what a first report shows).
PRESENCE_PRIOR = 0.5


class ObjectOutputs(NamedTuple):
    """What the object CRNN returns."""

    detections: torch.Tensor  # (B, T, K, 5): presence logit, box x0, y0, x1, y1 in [0, 1]
    measured: torch.Tensor | None  # (B, T, K, 5): per-frame soft-argmax centre x, y, size w, h (in [0, 1]) and evidence logit; cells: None
    heat: torch.Tensor  # (B, T, K, g, g): per-frame heat logits (cells: the presence logits) of each class over the grid cells
    cells: torch.Tensor | None = None  # (B, T, K, 5, g, g), head "cells" only: per cell presence logit, dx, dy, log w, log h


@dataclass(frozen=True)
class ObjectsConfig(JsonConfig):
    """Architecture and input layout of an object CRNN. Saved next to every checkpoint and table."""

    config_name = "objects"
    tuple_fields = ("labels", "cnn_channels")

    labels: tuple[str, ...] = ("disc", "square", "triangle")  # class names; index = class id
    frame_size: int = 64  # frames are resized to frame_size x frame_size before the CNN
    frames_per_clip: int = 16  # frames sampled per clip
    clip_seconds: float = 4.0  # seconds of video one clip covers (the memory: nothing crosses clips)
    stride_seconds: float = 4.0  # distance between clip starts when labelling
    cnn_channels: tuple[int, ...] = (16, 32, 64)  # channels of the small CNN's stride-2 stages (3: an 8x8 map at 64 px)
    grid: int = 4  # grid the map is pooled to for the global features (grid x grid cells, flattened)
    feature_dim: int = 128  # per-frame feature size fed to the recurrent layer (with the 5K measurements)
    rnn_type: str = "lstm"  # "lstm" or "gru"
    rnn_impl: str = "reference"  # "reference" (rnnimg.nn, from the equations) or "torch" (torch.nn kernels)
    rnn_hidden: int = 128  # hidden size of the recurrent layer
    rnn_layers: int = 1  # stacked recurrent layers
    dropout: float = 0.0  # dropout before the head
    temporal: bool = True  # False: the ablation, a per-frame layer instead of the recurrent one
    min_inside: float = 0.3  # an object counts from this share of its pixels inside the frame (less: ignored)
    box_weight: float = 5.0  # weight of the L1 box loss (normalised coordinates)
    giou_weight: float = 2.0  # weight of the generalised-IoU box loss
    measure_weight: float = 2.0  # weight of the per-frame measurement loss (visible objects: centre and size L1, evidence BCE)
    score_threshold: float = 0.5  # presence probability from which a class is reported in a frame
    head: str = "cells"  # "cells": a ConvLSTM per cell, presence and box per cell; "tracker": pooled features -> LSTM -> box tracker
    cell_hidden: int = 32  # head "cells": channels of the per-cell recurrent state (or of the ablation's conv)
    cell_kernel: int = 3  # head "cells": odd kernel of the ConvLSTM's gates (how far state moves per step: k // 2 cells)
    presence_sigma: float = 0.5  # head "cells": Gaussian radius (cells) of the target over the cells around the object's centre
    hidden_weight: float = 3.0  # head "cells": weight of a fully hidden object's class-frame in each loss term (1: as a visible one)

    def __post_init__(self) -> None:
        if len(self.labels) < 1 or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must name at least 1 class, each once, got {list(self.labels)}")
        self.check_clip_plan()
        if not 1 <= len(self.cnn_channels) <= 5 or any(int(c) < 1 for c in self.cnn_channels):
            raise ValueError(f"cnn_channels must be 1 to 5 positive stage widths, got {list(self.cnn_channels)}")
        if self.frame_size % (2 ** len(self.cnn_channels)):
            raise ValueError(f"frame_size must be divisible by 2^{len(self.cnn_channels)} (one halving per stage), got {self.frame_size}")
        if self.rnn_type not in RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {RNN_TYPES}, got {self.rnn_type!r}")
        if self.rnn_impl not in RNN_IMPLS:
            raise ValueError(f"rnn_impl must be one of {RNN_IMPLS}, got {self.rnn_impl!r}")
        if self.grid < 1 or self.feature_dim < 1 or self.rnn_hidden < 1 or self.rnn_layers < 1:
            raise ValueError(f"grid, feature_dim, rnn_hidden and rnn_layers must be >= 1, "
                             f"got {self.grid}, {self.feature_dim}, {self.rnn_hidden}, {self.rnn_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.temporal, bool):
            raise ValueError(f"temporal must be true or false, got {self.temporal!r}")
        if not 0.0 < self.min_inside <= 1.0:
            raise ValueError(f"min_inside must be in (0, 1], got {self.min_inside}")
        if self.box_weight < 0 or self.giou_weight < 0 or self.measure_weight < 0:
            raise ValueError(f"box_weight, giou_weight and measure_weight must be >= 0, "
                             f"got {self.box_weight}, {self.giou_weight}, {self.measure_weight}")
        if not 0.0 < self.score_threshold < 1.0:
            raise ValueError(f"score_threshold must be in (0, 1), got {self.score_threshold}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.cell_hidden < 1 or self.cell_kernel < 1 or self.cell_kernel % 2 == 0:
            raise ValueError(f"cell_hidden must be >= 1 and cell_kernel odd and >= 1, got {self.cell_hidden}, {self.cell_kernel}")
        if not self.presence_sigma > 0:
            raise ValueError(f"presence_sigma must be > 0, got {self.presence_sigma}")
        if not self.hidden_weight > 0:
            raise ValueError(f"hidden_weight must be > 0, got {self.hidden_weight}")

    @classmethod
    def from_dict(cls, data: dict) -> "ObjectsConfig":
        """Build from a dict (config.json); a config saved before ``head`` existed (it has every one
        of ``FIRST_FIELDS``) gets the old layout for the fields added since (``SAVED_BEFORE``), one
        saved before ``hidden_weight`` (every one of ``CELLS_FIELDS``) the old loss (``SAVED_BEFORE_HIDDEN_WEIGHT``).
        A partial dict (overrides) gets today's defaults.

        Raises:
            ValueError: an unknown key, or a value the checks refuse.
        """
        for saved_fields, added_since in SAVED_LAYOUTS:
            if saved_fields <= set(data):
                data = {**{k: v for k, v in added_since.items() if k not in data}, **data}
        return super().from_dict(data)

    @property
    def num_classes(self) -> int:
        return len(self.labels)


class ObjectCRNN(nn.Module):
    """Per-frame CNN on a grid and per-class measurements -> LSTM/GRU (or per-frame layer) -> presence logit and box per class.

    Shapes (K classes, R = rnn_hidden, g = frame_size / 2^len(cnn_channels)):
        input clips: float (B, T, 3, H, W), values roughly in [-0.5, 0.5] (``rnnimg.models.layout.to_model_input``)
        forward_features -> (B, T, R) and the per-frame measured (B, T, K, 5) and heat (B, T, K, g, g)
        forward_head     -> detections (B, T, K, 5): [..., 0] presence logit, [..., 1:] box x0, y0, x1, y1 in [0, 1]
                            (x0 <= x1, y0 <= y1 by construction: a centre and a size)
        forward          -> ``ObjectOutputs(detections, measured, heat)``
    """

    def __init__(self, config: ObjectsConfig):
        super().__init__()
        self.config = config
        k, c = config.num_classes, config.cnn_channels[-1]
        self.cnn = SmallCNN(config.cnn_channels, config.grid, config.feature_dim)  # the CRNN's per-frame CNN
        self.context = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        self.heat = nn.Conv2d(c, k, 1)  # per class and cell: is its object here
        self.size = nn.Conv2d(c, 2 * k, 1)  # per class and cell: its width and height (logits)
        self.norm = nn.LayerNorm(config.feature_dim)  # features on the measurements' scale: neither drowns the other
        size_in = config.feature_dim + 5 * k
        if config.temporal:
            self.rnn = make_rnn(replace(config, feature_dim=size_in))  # (B, T, D + 5K) -> (B, T, R)
        else:
            self.rnn = nn.Sequential(nn.Linear(size_in, config.rnn_hidden), nn.Tanh())
        self.dropout = nn.Dropout(config.dropout)
        # Per class: presence logit, and the tracker's gains for the centre, the velocity and the size.
        self.head = nn.Sequential(nn.Linear(config.rnn_hidden, config.rnn_hidden), nn.ReLU(inplace=True), nn.Linear(config.rnn_hidden, k * 4))

    def measure(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per frame: global features (N, D), per-class measurements (N, K, 5) and heat logits (N, K, g, g) of frames (N, 3, H, W)."""
        n, k = frames.shape[0], self.config.num_classes
        grid = self.context(self.cnn.stages(frames))  # (N, 3, H, W) -> (N, C, g, g)
        features = self.cnn.proj(self.cnn.pool(grid))  # (N, C, g, g) -> (N, C, grid, grid) -> (N, D)
        g_h, g_w = grid.shape[-2:]
        heat = self.heat(grid).reshape(n, k, g_h * g_w)  # (N, K, g, g) -> (N, K, g*g)
        weights = heat.softmax(-1)  # where each class is, a distribution over the cells
        ys = (torch.arange(g_h, device=grid.device, dtype=weights.dtype) + 0.5) / g_h
        xs = (torch.arange(g_w, device=grid.device, dtype=weights.dtype) + 0.5) / g_w
        cx = (weights.reshape(n, k, g_h, g_w) * xs).sum((-2, -1))  # (N, K)
        cy = (weights.reshape(n, k, g_h, g_w) * ys[:, None]).sum((-2, -1))  # (N, K)
        size = self.size(grid).sigmoid().reshape(n, k, 2, g_h * g_w)  # (N, 2K, g, g) -> (N, K, 2, g*g)
        wh = (size * weights[:, :, None]).sum(-1)  # (N, K, 2)
        evidence = heat.logsumexp(-1) - torch.log(torch.tensor(float(g_h * g_w), device=grid.device))  # (N, K)
        measured = torch.cat([cx[..., None], cy[..., None], wh, evidence[..., None]], dim=-1)  # (N, K, 5)
        return features, measured, heat.reshape(n, k, g_h, g_w)

    def forward_features(self, clips: torch.Tensor) -> tuple[torch.Tensor, ObjectOutputs]:
        """The recurrent features (B, T, R), and ``ObjectOutputs`` with the per-frame measurements (``detections`` None)."""
        b, t, c, h, w = clips.shape
        features, measured, heat = self.measure(clips.reshape(b * t, c, h, w))  # (B*T, C, H, W) -> (B*T, D), (B*T, K, 5), (B*T, K, g, g)
        measured = measured.reshape(b, t, *measured.shape[1:])  # (B*T, K, 5) -> (B, T, K, 5)
        per_frame = ObjectOutputs(None, measured, heat.reshape(b, t, *heat.shape[1:]))  # (B*T, K, g, g) -> (B, T, K, g, g)
        scaled = torch.cat([measured[..., :4] * 4 - 2, measured[..., 4:].clamp(-8, 8) / 4], dim=-1)  # (B, T, K, 5), each about in [-2, 2]
        inputs = torch.cat([self.norm(features).reshape(b, t, -1), scaled.flatten(2)], dim=-1)  # (B, T, D) + (B, T, 5K) -> (B, T, D + 5K)
        if not self.config.temporal:
            return self.rnn(inputs), per_frame  # (B, T, D + 5K) -> (B, T, R), frame by frame
        if self.config.rnn_impl == "reference":
            weights_dtype = next(self.rnn.parameters()).dtype
            with torch.autocast(inputs.device.type, enabled=False):  # the hand-written cells run in their weights' dtype
                sequence, _ = self.rnn(inputs.to(weights_dtype))  # (B, T, D + 5K) -> (B, T, R)
            return sequence, per_frame
        sequence, _ = self.rnn(inputs)  # (B, T, D + 5K) -> (B, T, R)
        return sequence, per_frame

    def forward_head(self, sequence: torch.Tensor, measured: torch.Tensor) -> torch.Tensor:
        """Detections (B, T, K, 5) from the recurrent features (B, T, R) and the frames' measurements (B, T, K, 5).

        With ``temporal``, the box is the tracker's state: at step t, centre c and velocity v
        predict c + v; the residual r = measured - (c + v) corrects them, c <- c + v + a r and
        v <- v + b r, and the size s <- s + a_s (measured size - s), with gains a, b, a_s in
        (0, 1) from the recurrent features. Without, the box is the frame's measurement.
        """
        b, t, _ = sequence.shape
        k = self.config.num_classes
        raw = self.head(self.dropout(sequence)).reshape(b, t, k, 4)  # (B, T, K*4) -> (B, T, K, 4)
        if self.config.temporal:
            gains = raw[..., 1:].sigmoid()  # (B, T, K, 3): centre gain, velocity gain, size gain
            centre, size = measured[:, 0, :, :2], measured[:, 0, :, 2:4]  # (B, K, 2) each: start at the first frame's measurement
            velocity = torch.zeros_like(centre)
            centres, sizes = [centre], [size]
            for step in range(1, t):
                predicted = centre + velocity
                residual = measured[:, step, :, :2] - predicted  # (B, K, 2)
                centre = predicted + gains[:, step, :, 0:1] * residual
                velocity = velocity + gains[:, step, :, 1:2] * residual
                size = size + gains[:, step, :, 2:3] * (measured[:, step, :, 2:4] - size)
                centres.append(centre)
                sizes.append(size)
            centre, size = torch.stack(centres, 1), torch.stack(sizes, 1)  # T x (B, K, 2) -> (B, T, K, 2)
        else:
            centre, size = measured[..., :2], measured[..., 2:4]  # (B, T, K, 2) each
        box = torch.cat([centre - size / 2, centre + size / 2], dim=-1).clamp(0.0, 1.0)  # (B, T, K, 4) x0, y0, x1, y1
        return torch.cat([raw[..., :1], box], dim=-1)  # (B, T, K, 1) + (B, T, K, 4) -> (B, T, K, 5)

    def forward(self, clips: torch.Tensor) -> ObjectOutputs:
        sequence, per_frame = self.forward_features(clips)
        return per_frame._replace(detections=self.forward_head(sequence, per_frame.measured))


def cell_boxes(cells: torch.Tensor) -> torch.Tensor:
    """Per-cell boxes (..., 4, g, g) x0, y0, x1, y1 in [0, 1] from the raw per-cell outputs (..., 5, g, g).

    Cell (i, j) (row i, column j) of a g x g grid puts the centre at ((j + ox) / g, (i + oy) / g)
    with ox = 2 sigmoid(dx) - 0.5 in (-0.5, 1.5) (a centre near a cell's edge can be claimed by
    either neighbour: YOLOv5's offsets), and the size at exp(log w) / g (one cell at 0).
    """
    g_h, g_w = cells.shape[-2:]
    cols = torch.arange(g_w, device=cells.device, dtype=cells.dtype)
    rows = torch.arange(g_h, device=cells.device, dtype=cells.dtype)[:, None]
    cx = (cols + 2 * cells[..., 1, :, :].sigmoid() - 0.5) / g_w  # (..., g, g)
    cy = (rows + 2 * cells[..., 2, :, :].sigmoid() - 0.5) / g_h
    w = cells[..., 3, :, :].clamp(-6.0, float(torch.log(torch.tensor(float(g_w))))).exp() / g_w  # at most the frame
    h = cells[..., 4, :, :].clamp(-6.0, float(torch.log(torch.tensor(float(g_h))))).exp() / g_h
    box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-3)  # 4 x (..., g, g) -> (..., 4, g, g)
    return box.clamp(0.0, 1.0)


def decode_cells(cells: torch.Tensor) -> torch.Tensor:
    """Detections (..., 5) from the raw per-cell outputs (..., 5, g, g): per class the cell with the
    highest presence logit gives the score (that logit) and the box (``cell_boxes``)."""
    flat = cells.flatten(-2)  # (..., 5, g, g) -> (..., 5, g*g)
    best = flat[..., 0, :].argmax(-1)  # (...,)
    logit = flat[..., 0, :].gather(-1, best[..., None])  # (..., 1)
    boxes = cell_boxes(cells).flatten(-2)  # (..., 4, g*g)
    box = boxes.gather(-1, best[..., None, None].expand(*best.shape, 4, 1))[..., 0]  # (..., 4, 1) -> (..., 4)
    return torch.cat([logit, box], dim=-1)  # (..., 5)


class CellObjectCRNN(nn.Module):
    """Per-frame CNN map -> ConvLSTM/ConvGRU per cell over time (or a per-frame conv) -> per class and cell, presence and box.

    Shapes (K classes, C = cnn_channels[-1], S = cell_hidden, g = frame_size / 2^len(cnn_channels)):
        input clips: float (B, T, 3, H, W), values roughly in [-0.5, 0.5]
        forward_features -> state (B, T, S, g, g) and the frame map (B, T, C, g, g)
        forward_head     -> cells (B, T, K, 5, g, g): presence logit, dx, dy, log w, log h per class and cell
        forward          -> ``ObjectOutputs(detections (B, T, K, 5), None, heat (B, T, K, g, g), cells)``

    ``temporal=False`` replaces the recurrent layer by a k x k conv C -> S and tanh applied to
    each frame alone: the same sizes, no information across frames (BatchNorm aside, which in
    training mixes the frames of a batch in its statistics, as in every model here).
    """

    def __init__(self, config: ObjectsConfig):
        super().__init__()
        self.config = config
        k, c, s, kernel = config.num_classes, config.cnn_channels[-1], config.cell_hidden, config.cell_kernel
        self.cnn = SmallCNN(config.cnn_channels, config.grid, config.feature_dim).stages  # the CRNN's per-frame CNN, no pooling
        self.context = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True))
        if config.temporal:
            from rnnimg.nn import ConvGRU, ConvLSTM

            self.rnn = (ConvLSTM if config.rnn_type == "lstm" else ConvGRU)(c, s, kernel, num_layers=config.rnn_layers)
        else:
            self.rnn = nn.Sequential(nn.Conv2d(c, s, kernel, padding=kernel // 2), nn.Tanh())
        self.dropout = nn.Dropout2d(config.dropout)
        self.head = nn.Sequential(nn.Conv2d(s + c, s, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(s, 5 * k, 1))
        with torch.no_grad():
            bias = self.head[-1].bias.view(k, 5)
            bias.zero_()
            bias[:, 0] = float(torch.logit(torch.tensor(PRESENCE_PRIOR)))
            bias[:, 3:] = 0.4  # exp(0.4) ~ 1.5 cells: about the objects' size

    def forward_features(self, clips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-cell state (B, T, S, g, g) and the frames' maps (B, T, C, g, g)."""
        b, t, c, h, w = clips.shape
        grid = self.context(self.cnn(clips.reshape(b * t, c, h, w)))  # (B*T, 3, H, W) -> (B*T, C, g, g)
        grid = grid.reshape(b, t, *grid.shape[1:])  # (B*T, C, g, g) -> (B, T, C, g, g)
        if not self.config.temporal:
            state = self.rnn(grid.flatten(0, 1))  # (B*T, C, g, g) -> (B*T, S, g, g), frame by frame
            return state.reshape(b, t, *state.shape[1:]), grid  # (B*T, S, g, g) -> (B, T, S, g, g)
        weights_dtype = next(self.rnn.parameters()).dtype
        with torch.autocast(grid.device.type, enabled=False):  # the hand-written cells run in their weights' dtype
            state, _ = self.rnn(grid.to(weights_dtype))  # (B, T, C, g, g) -> (B, T, S, g, g)
        return state, grid

    def forward_head(self, state: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """Raw per-cell outputs (B, T, K, 5, g, g) from the state (B, T, S, g, g) and the frames' maps (B, T, C, g, g)."""
        b, t = state.shape[:2]
        x = torch.cat([state.to(grid.dtype), grid], dim=2).flatten(0, 1)  # (B, T, S + C, g, g) -> (B*T, S + C, g, g)
        cells = self.head(self.dropout(x))  # (B*T, 5K, g, g)
        return cells.reshape(b, t, self.config.num_classes, 5, *cells.shape[-2:])  # (B*T, 5K, g, g) -> (B, T, K, 5, g, g)

    def forward(self, clips: torch.Tensor) -> ObjectOutputs:
        cells = self.forward_head(*self.forward_features(clips))
        return ObjectOutputs(decode_cells(cells), None, cells[..., 0, :, :], cells)


def build_model(config: ObjectsConfig) -> nn.Module:
    """The model of ``config.head``: ``ObjectCRNN`` (tracker) or ``CellObjectCRNN`` (cells)."""
    return CellObjectCRNN(config) if config.head == "cells" else ObjectCRNN(config)
