"""Encoder-forecaster (Shi et al. 2015): stacked ConvLSTM/ConvGRU layers read the first frames of a
clip, a second stack started from their states rolls the future forward, a decoder draws it.

    clip (B, T, 3, H, W) -> grey in [0, 1] (B, T, 1, H, W)
      context frames (B, K, 1, H, W) -> frame encoder (per frame, stride-2 convs) -> (B, K, C, h, w)
                                     -> encoder stack (rnnimg.nn ConvLSTM, L layers) -> states (L, B, Hd, h, w)
      forecaster stack, started from those states, input: the class as one-hot maps (conditioned)
                                     or one zero map -> (B, F, Hd, h, w), F = T - K steps
      -> decoder (per frame, transposed convs) -> logits of the F future frames (B, F, 1, H, W)

What the decoder draws (``output``):

- ``"filters"`` (the default; De Brabandere et al. 2016, "Dynamic Filter Networks"): per pixel a
  softmax over the ``filter_size`` x ``filter_size`` neighbourhood, applied to the frame before
  (the last context frame, then the model's own previous prediction). Every predicted pixel is a
  convex combination of pixels it has seen, so the background stays as black as the input and
  the digits keep their strokes; the recurrent state only has to say where things move. Moving
  digits travel <= 3.5 px per frame: a 9 x 9 neighbourhood (+-4 px) holds every step.
  With ``motion_input`` (the default) the encoder reads, beside each frame's features, a
  correlation layer's output (FlowNet's, Dosovitskiy et al. 2015): per cell, a softmax over the
  same displacements of how well each explains the frame from the one before; the forecaster
  reads the last one at every step; and the kernels' logits start from a constant-velocity prior
  (``constant_velocity_prior``: the last pair's motion, carried along) that the decoder corrects.
  The recurrent layers then extrapolate motion they are shown, instead of first learning to see
  it. Without the prior the decoder's part starts near the uniform kernel.
- ``"pixels"`` (Shi et al.'s design, the first forecasters): the decoder draws the frame itself;
  after short CPU budgets its frames are blurred blobs with a grey haze (see bench/RESULTS_predict.md).

No teacher forcing and no scheduled sampling: the forecaster never sees a frame, true or
predicted; it rolls its state forward from the encoder's (the paper's design), so training and
generation run the same computation and there is no exposure bias to schedule against. The
training loss is over all F future frames at once. With ``one_step_weight`` w > 0 the loss also has
a one-step-ahead term (each frame after the context from the true frames before it: the prediction
the surprise score reads), weighted w against 1 - w for the forecast; a model for surprise scores is
trained with w = 1 (the forecast is then still computed for the metrics, not trained).

The output is a ``Forecast``: the logits and the clip as grey [0, 1] frames (the target of a
forecaster is the future part of its own input; the loss, the metrics and the surprise score
read both). ``forward_features`` returns the forecaster's states per step, ``forward_head`` the
logits, ``next_frame_logits`` each frame after the context predicted one step ahead from the frames
before it (the surprise score's prediction).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from rnnimg.models.config import JsonConfig

RNN_TYPES = ("lstm", "gru")
OUTPUTS = ("filters", "pixels")
LOSSES = ("bce", "mse")
EPS = 1e-4  # a "filters" prediction is clamped to [EPS, 1 - EPS] before its logit (BCE and sigmoid read logits)
# The fields of the first exported forecasters (every config.json has them all), and the fields added
# since with what a config.json without them means: such a model loads as it was trained.
FIRST_FIELDS = frozenset({"frame_size", "frames_per_clip", "context_frames", "clip_seconds", "stride_seconds", "channels", "rnn_type",
                          "hidden", "layers", "kernel_size", "labels"})
SAVED_BEFORE = {"output": "pixels", "filter_size": 9, "motion_input": False, "loss": "bce", "black_level": 0.0, "one_step_weight": 0.0}
PRIOR_FLOOR = 1e-3  # added to the constant-velocity prior before its log: the decoder can still overrule it
MOTION_TEMPERATURE = 0.005  # of the displacement softmax: mean squared differences 0.005 apart are e times less likely (0.02: prior alone SSIM 0.631, 0.005: 0.660)


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
    output: str = "filters"  # "filters": per-pixel softmax kernels moving the previous frame; "pixels": the decoder draws the frame
    filter_size: int = 9  # side of the per-pixel kernels of output "filters" (odd): the farthest a pixel moves per frame is its half
    motion_input: bool = True  # the encoder also reads, per cell, how likely each displacement was between consecutive frames
    loss: str = "bce"  # per-pixel loss of the future frames: "bce" (with logits) or "mse" (of the grey values)
    # Predicted grey values below this are drawn black. A model unsure where a digit goes spreads a faint
    # haze over the candidates; SSIM reads any haze on black as lost structure. None: chosen on the
    # validation split when the model is exported (``rnnimg.tasks.predict.choose_black_level``), 0 until then.
    black_level: float | None = None
    # Weight of the one-step-ahead loss (``Forecaster.next_frame_logits``, what the surprise score reads) against
    # 1 - it for the forecast's: 0 trains a forecaster (for ``rnnimg generate``), 1 a surprise scorer.
    one_step_weight: float = 0.0

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
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if self.filter_size < 3 or self.filter_size % 2 == 0:
            raise ValueError(f"filter_size must be odd and >= 3, got {self.filter_size}")
        if self.black_level is not None and not 0.0 <= self.black_level < 1.0:
            raise ValueError(f"black_level must be in [0, 1) or None, got {self.black_level}")
        if not 0.0 <= self.one_step_weight <= 1.0:
            raise ValueError(f"one_step_weight must be in [0, 1], got {self.one_step_weight}")
        if self.one_step_weight and self.labels:
            raise ValueError("one_step_weight must be 0 for a conditioned forecaster (one-step predictions take no class)")

    @classmethod
    def from_dict(cls, data: dict) -> "ForecasterConfig":
        """Build from a dict; a saved config.json without the fields added since the first forecasters
        (``SAVED_BEFORE``) means the architecture of its time, not today's defaults.

        Raises:
            ValueError: an unknown key, or a value the checks refuse.
        """
        if FIRST_FIELDS <= set(data):
            data = {**{k: v for k, v in SAVED_BEFORE.items() if k not in data}, **data}
        return super().from_dict(data)

    @property
    def black(self) -> float:
        """The black level in force: ``black_level``, 0 while it is not chosen yet."""
        return float(self.black_level or 0.0)

    @property
    def future_frames(self) -> int:
        """Frames predicted per clip."""
        return self.frames_per_clip - self.context_frames


class Forecast(NamedTuple):
    """A forecaster's output: what it predicts and the clip it predicted from."""

    logits: torch.Tensor  # (B, F, 1, H, W): per-pixel logits of the F frames after the context (sigmoid: grey in [0, 1])
    frames: torch.Tensor  # (B, T, 1, H, W): the input clip, grey in [0, 1] (the future part is the target)
    next_frame_logits: torch.Tensor | None = None  # (B, T - K, 1, H, W) one step ahead, when ``one_step_weight`` > 0


def to_image(logits: torch.Tensor, black_level: float = 0.0) -> torch.Tensor:
    """Predicted logits -> grey in [0, 1], values under ``black_level`` drawn black (same shape, float32)."""
    grey = torch.sigmoid(logits.float())
    return grey.masked_fill(grey < black_level, 0.0) if black_level > 0 else grey


def to_grey(clips: torch.Tensor) -> torch.Tensor:
    """Model input float (B, T, 3, H, W) in [-0.5, 0.5] -> grey (B, T, 1, H, W) in [0, 1]."""
    return clips.float().mean(2, keepdim=True).add(0.5).clamp_(0.0, 1.0)  # (B, T, 3, H, W) -> (B, T, 1, H, W)


class Forecaster(nn.Module):
    """Frame encoder -> recurrent encoder stack -> recurrent forecaster stack -> frame decoder.

    Shapes (s = len(channels), h = H / 2^s, K context frames, F future frames):
        input clips: float (B, T, 3, H, W), values in [-0.5, 0.5] (``to_model_input``); T >= K
        forward_features(clips, labels, steps) -> forecaster states (B, steps, hidden, h, h)
        forward_head(states, context) -> logits (B, steps, 1, H, W)
        forward(clips, labels=None) -> Forecast(logits (B, F, 1, H, W), frames (B, T, 1, H, W))
        next_frame_logits(clips) -> logits (B, T - K, 1, H, W), frame t from frames 0 .. t-1
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
        motion = config.filter_size**2 if config.motion_input else 0
        self.encoder = cell(config.channels[-1] + motion, config.hidden, kernel_size=k, num_layers=config.layers, batch_first=True)
        self.forecaster = cell(max(1, len(config.labels)) + motion, config.hidden, kernel_size=k, num_layers=config.layers, batch_first=True)
        up = []
        c_in = config.hidden
        for c_out in reversed(config.channels):
            up += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2, inplace=True)]
            c_in = c_out
        if config.output == "filters":  # a 1x1 conv to the kernels' taps (a 3x3 one to 81 channels at full size cost 4x the whole model)
            taps = config.filter_size**2
            self.decoder = nn.Sequential(*up, nn.Conv2d(c_in, taps, 1))
            # Start near the uniform kernel (a box blur of the frame before): every tap gets the same
            # gradient. A start at the identity leaves the others ~1/(9 (taps - 1)) of it, and the
            # model first learns to blur (measured: after 345 steps a loss no better than a constant frame).
            with torch.no_grad():
                self.decoder[-1].weight.mul_(0.1)
                self.decoder[-1].bias.zero_()
        else:
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
            if config.motion_input:
                motion = displacement_likelihoods(context.float(), config.filter_size, height // hh)  # -> (B, K, k*k, h, w)
                x = torch.cat([x, motion.to(dtype)], 2)  # -> (B, K, C + k*k, h, w)
            if config.labels:
                inputs = nn.functional.one_hot(labels.long(), len(config.labels)).to(dtype)  # (B,) -> (B, n_classes)
                inputs = inputs[:, None, :, None, None].expand(b, steps, len(config.labels), hh, ww)  # -> (B, steps, n, h, w)
            else:
                inputs = x.new_zeros(b, steps, 1, hh, ww)  # no input: the state carries everything
            if config.motion_input:  # every step also reads the last motion the context showed (a short path to the kernels)
                inputs = torch.cat([inputs, motion[:, -1:].to(dtype).expand(b, steps, *motion.shape[2:])], 2)
            _, state = self.encoder(x)  # (B, K, C, h, w) -> states (L, B, Hd, h, w)
            states, _ = self.forecaster(inputs.contiguous(), state)  # -> (B, steps, Hd, h, w)
        return states

    def forward_head(self, states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the frames the states stand for: (B, steps, Hd, h, w) -> (B, steps, 1, H, W).

        Args:
            context: output ``filters`` only (required there): the context frames, grey (B, K, 1, H, W)
                in [0, 1]; the first step's kernels move the last of them. With ``motion_input`` the
                kernels' logits start from the log-likelihood of each displacement between the last two
                (pooled over 3 x 3 cells: a constant-velocity guess the decoder corrects).
        """
        b, steps, d, hh, ww = states.shape
        x = states.reshape(b * steps, d, hh, ww)  # (B, F, Hd, h, w) -> (B*F, Hd, h, w)
        out = self.decoder(x)  # (B*F, Hd, h, w) -> (B*F, taps, H, W)
        height, width = out.shape[-2:]
        if self.config.output == "pixels":
            return out.reshape(b, steps, 1, height, width)  # (B*F, 1, H, W) -> (B, F, 1, H, W)
        if context is None:
            raise ValueError("a forecaster with output 'filters' needs the context frames")
        size = self.config.filter_size
        logits = out.float().reshape(b, steps, size * size, height, width)
        if self.config.motion_input and context.shape[1] >= 2:
            logits = logits + torch.log(constant_velocity_prior(context[:, -2:].float(), size, height // hh, steps) + PRIOR_FLOOR)
        kernels = torch.softmax(logits, dim=2)  # (B, F, k*k, H, W)
        frame, frames = context[:, -1].float(), []
        for step in range(steps):
            frame = apply_filters(frame, kernels[:, step], size)  # (B, 1, H, W) -> (B, 1, H, W)
            frames.append(frame)
        predicted = torch.stack(frames, 1).clamp(EPS, 1.0 - EPS)  # F x (B, 1, H, W) -> (B, F, 1, H, W)
        return torch.logit(predicted).to(out.dtype)

    def forward(self, clips: torch.Tensor, labels: torch.Tensor | None = None) -> Forecast:
        grey = to_grey(clips)
        logits = self.forward_head(self.forward_features(clips, labels), grey[:, : self.config.context_frames])
        # The one-step-ahead predictions the loss weighs in, made here so that DDP sees them in forward.
        one_step = self.next_frame_logits(clips) if self.config.one_step_weight else None
        return Forecast(logits, grey, one_step)

    def next_frame_logits(self, clips: torch.Tensor) -> torch.Tensor:
        """One step ahead at every step after the context: logits of frame t of ``clips`` given its frames
        before t, for t = K .. T-1 (what the surprise score reads; an unconditioned model only).

        Step t is exactly ``forward`` on the clip's first t + 1 frames with t of them as context and
        one step to predict: the encoder reads frames 0 .. t-1 (its state carried from step to step, so the
        frames are encoded once), the forecaster makes one step from there, and the kernels move
        frame t-1 (with the constant-velocity prior of frames t-2, t-1). Shapes: clips
        (B, T, 3, H, W), T > K -> (B, T - K, 1, H, W).
        """
        config = self.config
        if config.labels:
            raise ValueError("one-step predictions need no class: an unconditioned forecaster only")
        if clips.dim() != 5 or clips.shape[1] <= config.context_frames:
            raise ValueError(f"clips must be (B, T, C, H, W) with T > context_frames={config.context_frames}, got {tuple(clips.shape)}")
        grey = to_grey(clips)
        b, frames, _, height, width = grey.shape
        seen = grey[:, :-1]  # the frames some step reads: 0 .. T-2
        dtype = self._weights_dtype()
        x = self.frame_encoder(seen.reshape(-1, 1, height, width).to(dtype))  # (B*(T-1), 1, H, W) -> (B*(T-1), C, h, w)
        _, c, hh, ww = x.shape
        logits = []
        with torch.autocast(clips.device.type, enabled=False):
            x = x.reshape(b, frames - 1, c, hh, ww).to(dtype)
            motion = None
            if config.motion_input:
                motion = displacement_likelihoods(seen.float(), config.filter_size, height // hh).to(dtype)  # (B, T-1, k*k, h, w)
                x = torch.cat([x, motion], 2)
            _, state = self.encoder(x[:, : config.context_frames])  # the state after frames 0 .. K-1
            for t in range(config.context_frames, frames):
                inputs = x.new_zeros(b, 1, 1, hh, ww)
                if motion is not None:
                    inputs = torch.cat([inputs, motion[:, t - 1 : t]], 2)
                states, _ = self.forecaster(inputs, state)  # (B, 1, Hd, h, w)
                logits.append(self.forward_head(states, grey[:, :t]))  # (B, 1, 1, H, W)
                if t + 1 < frames:
                    _, state = self.encoder(x[:, t : t + 1], state)  # now after frames 0 .. t
        return torch.cat(logits, 1)  # -> (B, T-K, 1, H, W)

    @torch.no_grad()
    def rollout(self, clips: torch.Tensor, steps: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Grey predictions in [0, 1] of ``steps`` frames after the first K of ``clips``, drawn with the
        config's black level: (B, steps, 1, H, W)."""
        context = to_grey(clips[:, : self.config.context_frames])  # (B, K, 1, H, W)
        return to_image(self.forward_head(self.forward_features(clips, labels, steps), context), self.config.black)


def constant_velocity_prior(pair: torch.Tensor, size: int, cell: int, steps: int) -> torch.Tensor:
    """Per step and pixel, how likely each kernel tap is if everything keeps the motion of the last frame pair.

    The displacement likelihoods of the pair (pooled over 3 x 3 cells), upsampled to pixels; for step
    k each tap's map moves along by k + 1 times its own displacement (what moved by v between the pair
    is (k + 1) v further on at step k), then the taps are renormalised per pixel (a tap's map that
    moved out of the frame leaves the uniform share behind). Blank places, where every displacement
    fits, keep their uniform shares too, which soften the vote of a sure place that moves onto them:
    on moving digits this hedged prior scores better than one where only sure places vote (SSIM 0.660
    against 0.648, MSE 93 against 126 on 32 held-out sequences: it pays less for bounces and overlaps).
    Shapes: pair (B, 2, 1, H, W) grey in [0, 1] -> (B, steps, size*size, H, W). No gradient.
    """
    b, _, _, height, width = pair.shape
    taps, half = size * size, size // 2
    with torch.no_grad():
        likely = displacement_likelihoods(pair, size, cell, pool_cells=3)[:, 1]  # (B, k*k, h, w)
        likely = nn.functional.interpolate(likely, size=(height, width), mode="nearest")  # -> (B, k*k, H, W)
        out = likely.new_full((b, steps, taps, height, width), 1.0 / taps)
        for tap in range(taps):
            # Tap (r, c) takes input p + (r - half, c - half): content moves by (half - r, half - c) per step.
            vy, vx = half - tap // size, half - tap % size
            for step in range(steps):
                dy, dx = vy * (step + 1), vx * (step + 1)  # the likelihoods sit where the content was in the last frame
                if abs(dy) >= height or abs(dx) >= width:
                    continue
                out[:, step, tap, max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)] = \
                    likely[:, tap, max(0, -dy) : height + min(0, -dy), max(0, -dx) : width + min(0, -dx)]
        return out / out.sum(2, keepdim=True)


def displacement_likelihoods(frames: torch.Tensor, size: int, cell: int, pool_cells: int = 1) -> torch.Tensor:
    """Per cell of ``cell`` x ``cell`` pixels, a softmax over the ``size`` x ``size`` displacements of how well
    each one explains a frame from the one before (a correlation layer, FlowNet's, with squared differences).

    Shapes: frames (B, T, 1, H, W) grey in [0, 1] -> (B, T, size*size, H / cell, W / cell); the
    first frame, which has no frame before it, gets the uniform distribution. Tap i (``unfold``'s
    row-major order, as in ``apply_filters``) is the displacement the filter with tap i performs:
    frame t at p against frame t-1 at p + offset(i). Blank cells (every displacement fits) come out
    uniform. ``pool_cells`` > 1 pools the differences over that many cells around each one. No
    gradient flows through it: it is a fixed input feature.
    """
    b, t, _, height, width = frames.shape
    taps = size * size
    with torch.no_grad():
        before = frames[:, :-1].reshape(-1, 1, height, width)  # (B*(T-1), 1, H, W)
        now = frames[:, 1:].reshape(-1, 1, height, width)
        padded = nn.functional.pad(before, (size // 2,) * 4)  # zero outside the frame, as unfold's padding
        cost = before.new_empty(before.shape[0], taps, height // cell, width // cell)
        for tap in range(taps):  # one tap at a time: 4x faster than unfold's (B*(T-1), k*k, H, W) copies
            r, c = divmod(tap, size)  # frame t-1 at p + offset(tap)
            shifted = padded[:, :, r : r + height, c : c + width]
            cost[:, tap] = nn.functional.avg_pool2d((shifted - now).square_(), cell)[:, 0]  # mean squared difference per cell
        if pool_cells > 1:  # over a neighbourhood of cells (same size out)
            cost = nn.functional.avg_pool2d(cost, pool_cells, stride=1, padding=pool_cells // 2, count_include_pad=False)
        likely = torch.softmax(-cost / MOTION_TEMPERATURE, dim=1).reshape(b, t - 1, taps, *cost.shape[-2:])
        first = likely.new_full((b, 1, taps, *cost.shape[-2:]), 1.0 / taps)
        return torch.cat([first, likely], 1)  # -> (B, T, k*k, h, w)


def apply_filters(frame: torch.Tensor, kernels: torch.Tensor, size: int) -> torch.Tensor:
    """Each output pixel is its own kernel's weighted sum of the ``size`` x ``size`` input pixels around it.

    Shapes: frame (B, 1, H, W), kernels (B, size*size, H, W) (weights of the neighbourhood in
    ``unfold``'s row-major order; zero padding outside the frame) -> (B, 1, H, W).
    """
    b, _, height, width = frame.shape
    patches = nn.functional.unfold(frame, size, padding=size // 2)  # (B, 1, H, W) -> (B, size*size, H*W)
    return (patches.reshape(b, size * size, height, width) * kernels).sum(1, keepdim=True)  # -> (B, 1, H, W)


def build_model(config: ForecasterConfig) -> Forecaster:
    return Forecaster(config)
