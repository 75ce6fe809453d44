"""Task ``predict``: the next frames of a clip from its first ones (ConvLSTM encoder-forecaster), and
how surprising each clip of an archive is.

    rnnimg synth OUT --task predict --seconds 2 --fps 10 --videos 3000
    rnnimg train OUT/manifest.parquet --out runs --task predict --frames-per-clip 20
    rnnimg label OUT/videos/test --model runs/model --out labels        # clips table with a surprise column
    rnnimg generate runs/model --from OUT/videos/test/test-00000.mp4 --seconds 4 --out pred.mp4

- Data: ``rnnimg.tasks.digits_synth``, two real handwritten digits (scikit-learn's ``load_digits``, upscaled) bouncing in a 64 x 64 frame
  (Moving-MNIST style); manifest ``video_uri``, ``label`` (motion class), ``split``.
- Model: ``rnnimg.models.forecaster.Forecaster``; no teacher forcing, no scheduled sampling
  (the forecaster rolls its state forward without seeing frames).
- Sample: a random clip window; the target is the clip itself (its last F frames), carried in
  the model's ``Forecast`` output; the row target is the motion class id (used only by a
  conditioned model, which the shared loop cannot feed: see ``check_training``).
- Loss: per-pixel BCE with logits, or MSE, of the F future frames (grey, [0, 1]; ``ForecasterConfig.loss``).
  With ``ForecasterConfig.one_step_weight`` w > 0, also of each of those frames predicted one step ahead
  (the surprise score's prediction), w against 1 - w; ``--model-option one_step_weight=1`` trains a surprise scorer.
- Metrics: ``mse`` (per frame, summed over the pixels, values in [0, 1], the Moving MNIST
  convention), ``ssim`` (11x11 Gaussian window, sigma 1.5), each beside two baselines on the
  same clips: ``copy_last`` (the last context frame, repeated) and ``mean_frame`` (the mean of
  the context frames); the exported checkpoint is the best val_mse. Predictions are drawn with the
  config's black level (grey below it is black; ``ForecasterConfig.black_level``), chosen at export on
  the selected epoch's validation figures when the config leaves it None (``choose_black_level``).
- Label job: ``surprise`` per clip = the largest one-step-ahead surprise among the clip's last F frames,
  each predicted from the frames before it (``surprise``): the frame's surprisal under the model's
  own per-pixel Bernoulli (nats, ``frame_surprisal``) for a BCE model, its squared error summed over
  the pixels for an MSE one (``surprise_measure``); table ``clips``
  (``rnnimg.tables.SURPRISE_CLIPS``): no label, no segments.
"""

from __future__ import annotations

import ast
from typing import TYPE_CHECKING

import numpy as np

from rnnimg import tables
from rnnimg.tasks import Task

if TYPE_CHECKING:
    from rnnimg.models.forecaster import ForecasterConfig

REPORT = "report.md"
DEFAULT_FPS = 10.0  # frame rate assumed for a manifest that does not record one (the synth's default)
SSIM_WINDOW, SSIM_SIGMA = 11, 1.5
# Black levels every evaluation scores (``ForecasterConfig.black_level``), and how much MSE the one chosen
# may cost against none: the highest SSIM among the levels within that (``choose_black_level``).
BLACK_LEVELS = (0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3)
BLACK_LEVEL_MSE_SLACK = 0.05
SURPRISE_MEASURES = ("surprisal", "squared_error")  # how a frame's surprise is scored (``surprise_measure``)


# ----------------------------------------------------------------------------- metrics


def ssim(a, b):
    """Mean SSIM (Wang et al. 2004) of each pair of grey frames in [0, 1]: (N, 1, H, W) x 2 -> (N,).

    11 x 11 Gaussian window (sigma 1.5), C1 = 0.01^2, C2 = 0.03^2, no padding (only windows that
    fit), as skimage's ``structural_similarity(gaussian_weights=True, data_range=1)`` up to its
    border cropping. Identical frames score 1.
    """
    import torch
    import torch.nn.functional as F

    a, b = a.float(), b.float()  # float32: torch's double convolutions have no fast CPU kernel
    size = min(SSIM_WINDOW, a.shape[-1], a.shape[-2])
    x = torch.arange(size, dtype=a.dtype, device=a.device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()

    def blur(z):  # separable Gaussian, valid part only: (N, 1, H, W) -> (N, 1, H-k+1, W-k+1)
        return F.conv2d(F.conv2d(z, g.view(1, 1, -1, 1)), g.view(1, 1, 1, -1))

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.double().mean((1, 2, 3))  # (N, 1, h, w) -> (N,)


def frame_mse(predicted, truth):
    """Per-frame squared error summed over the pixels: (..., 1, H, W) x 2 -> (...)."""
    return ((predicted.double() - truth.double()) ** 2).sum((-3, -2, -1))


def forecast_stats(predicted, frames, context_frames: int) -> dict:
    """Sums over a batch, per future step, of the MSE and SSIM of a prediction and of the two baselines.

    Args:
        predicted: (B, F, 1, H, W) in [0, 1]; frames: the clips (B, K + F, 1, H, W) in [0, 1].

    Returns:
        ``{mse, ssim, copy_last_mse, copy_last_ssim, mean_frame_mse, mean_frame_ssim}``, each (F,) float64.
    """
    future = frames[:, context_frames:]
    b, f = future.shape[:2]
    candidates = {
        "": predicted,
        "copy_last_": frames[:, context_frames - 1 : context_frames].expand_as(future),  # (B, 1, ...) -> (B, F, ...)
        "mean_frame_": frames[:, :context_frames].mean(1, keepdim=True).expand_as(future),
    }
    out = {}
    flat_truth = future.reshape(b * f, *future.shape[2:])  # (B, F, 1, H, W) -> (B*F, 1, H, W)
    for prefix, guess in candidates.items():
        out[prefix + "mse"] = frame_mse(guess, future).sum(0)  # (B, F) -> (F,)
        out[prefix + "ssim"] = ssim(guess.reshape(b * f, *guess.shape[2:]), flat_truth).reshape(b, f).sum(0)  # (B*F,) -> (F,)
    return out


def black_level_stats(logits, future) -> dict:
    """Sums over a batch of the MSE and SSIM of the prediction drawn at each of ``BLACK_LEVELS``.

    Args:
        logits: (B, F, 1, H, W) predicted; future: the frames they predict, (B, F, 1, H, W) in [0, 1].

    Returns:
        ``{black_level_mse, black_level_ssim}``, each (len(BLACK_LEVELS),) float64: per-frame means
        summed over the batch's clips (as ``forecast_stats``'s, averaged over the steps).
    """
    import torch

    from rnnimg.models.forecaster import to_image

    b, f = future.shape[:2]
    flat_truth = future.reshape(b * f, *future.shape[2:])
    mse, score = [], []
    for level in BLACK_LEVELS:
        guess = to_image(logits, level)
        mse.append(frame_mse(guess, future).sum() / f)
        score.append(ssim(guess.reshape(b * f, *guess.shape[2:]), flat_truth).sum() / f)
    return {"black_level_mse": torch.stack(mse), "black_level_ssim": torch.stack(score)}


def choose_black_level(mse_by_level, ssim_by_level, slack: float = BLACK_LEVEL_MSE_SLACK) -> float:
    """The level of ``BLACK_LEVELS`` with the highest SSIM among those whose MSE is within
    ``1 + slack`` times the MSE with no black level (the first entry). SSIM rises as the haze goes,
    MSE too (a faint pixel the truth lit is now wrong by all of it): the slack bounds what SSIM may cost."""
    mse, score = np.asarray(mse_by_level, np.float64), np.asarray(ssim_by_level, np.float64)
    if len(mse) != len(BLACK_LEVELS) or len(score) != len(BLACK_LEVELS):
        raise ValueError(f"expected {len(BLACK_LEVELS)} values per level, got {len(mse)} and {len(score)}")
    allowed = np.flatnonzero(mse <= mse[0] * (1.0 + slack))  # level 0 always qualifies
    return float(BLACK_LEVELS[int(allowed[np.argmax(score[allowed])])])


def loss_fn(outputs, context_frames: int, kind: str = "bce", one_step_weight: float = 0.0):
    """Per-pixel loss of the predicted frames against the clip's future frames: BCE with logits, or the
    MSE of the grey values (``kind``, the model's ``ForecasterConfig.loss``); the forecast's weighted
    ``1 - one_step_weight``, the one-step-ahead predictions' (``Forecast.next_frame_logits``, required
    when the weight is > 0) ``one_step_weight``."""
    import torch
    import torch.nn.functional as F

    target = outputs.frames[:, context_frames:].float()

    def per_pixel(logits):
        if kind == "mse":
            return F.mse_loss(torch.sigmoid(logits.float()), target)
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    if not one_step_weight:
        return per_pixel(outputs.logits)
    if outputs.next_frame_logits is None:
        raise ValueError("one_step_weight > 0 needs the one-step-ahead predictions (a model whose config has that weight)")
    one_step = one_step_weight * per_pixel(outputs.next_frame_logits)
    return one_step if one_step_weight == 1 else one_step + (1 - one_step_weight) * per_pixel(outputs.logits)


def frame_surprisal(logits, truth):
    """Per frame, the information in the true frame that the predicted one did not expect, in nats:
    the Bernoulli KL divergence KL(y || p) of each pixel's true grey y from its predicted p =
    sigmoid(logit), summed over the pixels, (..., 1, H, W) x 2 -> (...).

    It is the BCE of the frame less the BCE a perfect prediction would still pay (the entropy of y),
    so an exact prediction scores 0 whatever the frame shows. Against the squared error it weighs a
    pixel by how sure the model was: a miss it was sure of costs up to log(1 / EPS) ~ 9.2 nats, a
    pixel it hedged on (p ~ 1/2) under 0.7, where both cost at most 1 as a squared error.
    """
    import torch
    import torch.nn.functional as F

    logits, y = logits.double(), truth.double().clamp(0.0, 1.0)
    cross = -(y * F.logsigmoid(logits) + (1 - y) * F.logsigmoid(-logits))
    own = -(torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y))
    return (cross - own).clamp_min(0.0).sum((-3, -2, -1))


def surprise_measure(config: "ForecasterConfig") -> str:
    """How a model scores a frame's surprise: by its own observation model, the one its loss assumes.
    ``"surprisal"`` (``frame_surprisal``) for a BCE model (per-pixel Bernoulli), ``"squared_error"``
    (``frame_mse``, a fixed-variance Gaussian's surprisal up to scale and offset) for an MSE one."""
    return "surprisal" if config.loss == "bce" else "squared_error"


def frame_surprise(model, inputs, context_frames: int, measure: str):
    """Per clip and frame t >= K: the surprise of frame t predicted one step ahead from the clip's frames
    before it (``Forecaster.next_frame_logits``; no black level: a score, not a picture), (B, T - K).
    ``measure``: ``"surprisal"`` or ``"squared_error"`` (``surprise_measure``)."""
    from rnnimg.models.forecaster import to_grey

    if measure not in SURPRISE_MEASURES:
        raise ValueError(f"measure must be one of {SURPRISE_MEASURES}, got {measure!r}")
    return score_frames(model.next_frame_logits(inputs), to_grey(inputs)[:, context_frames:], measure)  # -> (B, T-K)


def score_frames(logits, truth, measure: str):
    """Each predicted frame's surprise by ``measure``: logits and true grey frames (..., 1, H, W) -> (...)."""
    import torch

    logits = logits.float()
    return frame_surprisal(logits, truth) if measure == "surprisal" else frame_mse(torch.sigmoid(logits), truth)


def surprise(model, inputs, context_frames: int, measure: str = "surprisal"):
    """Per clip: how unexpected its most unexpected frame after the first K is, (B,): the largest
    ``frame_surprise``.

    One step ahead, an ordinary clip's error is what one frame of motion leaves uncertain (where a
    digit's rounded position lands, a bounce, two digits crossing), and a model trained on such clips
    hedges there; a digit that jumps, stops or turns back mid-flight breaks, in one frame, a motion
    the model was sure of. The surprisal counts that sureness, the squared error does not (on the
    bench's archive the surprisal ranks more of the anomalies in the top 5%: bench/RESULTS_predict.md).
    A mean over the clip would dilute the one frame by the clip's length, and a multi-step forecast
    would drown it in the blur of its later steps.
    """
    return frame_surprise(model, inputs, context_frames, measure).amax(1)  # (B, T-K) -> (B,)


# ----------------------------------------------------------------------------- report


def write_report(model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "ForecasterConfig", model_id: str):
    """Write report.md (validation MSE and SSIM against the baselines, by epoch and by future step)."""
    from rnnimg import storage
    from rnnimg.evaluation import Report

    def fmt(value, digits=2):
        return "-" if value is None else f"{value:.{digits}f}"

    e = evaluation
    lines = [
        f"# Evaluation of next-frame model {model_id}",
        "",
        f"Validation split at the selected epoch {best_metrics.get('epoch')} (of {len(history)} trained, chosen by validation MSE), "
        f"{e.get('clips')} clips, {config.context_frames} frames in, {config.future_frames} predicted, "
        f"{config.frame_size}x{config.frame_size} grey in [0, 1].",
        "",
        "| | per-frame MSE (sum over pixels) | SSIM |",
        "|---|---|---|",
        f"| model | **{fmt(e.get('mse'))}** | **{fmt(e.get('ssim'), 3)}** |",
        f"| copy the last input frame | {fmt(e.get('copy_last_mse'))} | {fmt(e.get('copy_last_ssim'), 3)} |",
        f"| mean of the input frames | {fmt(e.get('mean_frame_mse'))} | {fmt(e.get('mean_frame_ssim'), 3)} |",
        "",
        f"MSE / copy-last: {fmt(e.get('mse_vs_copy_last'), 3)} (target <= 0.5).",
        "",
        *_black_level_lines(e, fmt),
        "| epoch | train loss | val loss | val MSE | val SSIM |",
        "|---|---|---|---|---|",
    ]
    for h in history:
        lines.append(f"| {h.get('epoch')} | {fmt(h.get('train_loss'), 4)} | {fmt(h.get('val_loss'), 4)} | {fmt(h.get('val_mse'))} "
                     f"| {fmt(h.get('val_ssim'), 3)} |")
    per_step = e.get("mse_per_step") or []
    if per_step:
        lines += ["", "Validation MSE by predicted frame:", "", "| " + " | ".join(str(i + 1) for i in range(len(per_step))) + " |",
                  "|---" * len(per_step) + "|", "| " + " | ".join(f"{v:.1f}" for v in per_step) + " |"]
    lines.append("")
    markdown = "\n".join(lines)
    report_uri = storage.join(model_uri, REPORT)
    storage.write_bytes(report_uri, markdown.encode("utf-8"))
    return Report(report_uri=report_uri, confusion_uri=None, curves_uri=None, markdown=markdown)


def _black_level_lines(e: dict, fmt) -> list[str]:
    """The report's paragraph on the black level: the level drawn, and the validation figures at every level."""
    levels, mse, score = e.get("black_levels"), e.get("mse_by_black_level"), e.get("ssim_by_black_level")
    if not levels or not mse or not score:
        return []
    lines = [f"Predictions are drawn with black level {fmt(e.get('black_level'))}: grey values below it are black "
             f"(chosen on the validation split: the best SSIM whose MSE is within {BLACK_LEVEL_MSE_SLACK:.0%} of none). "
             f"With none: MSE {fmt(e.get('raw_mse'))}, SSIM {fmt(e.get('raw_ssim'), 3)}.", "",
             "| black level | " + " | ".join(fmt(v) for v in levels) + " |", "|---" * (len(levels) + 1) + "|",
             "| val MSE | " + " | ".join(fmt(v) for v in mse) + " |",
             "| val SSIM | " + " | ".join(fmt(v, 3) for v in score) + " |", ""]
    return lines


# ----------------------------------------------------------------------------- the task


def _manifest_fps(manifest_uri: str) -> float:
    """The frame rate a synthetic manifest records (``rnnimg.synth`` metadata), else ``DEFAULT_FPS``."""
    from rnnimg import storage

    try:
        metadata = storage.read_table(manifest_uri, columns=["split"]).schema.metadata or {}
        fps = ast.literal_eval(metadata.get(b"rnnimg.synth", b"{}").decode()).get("fps")
    except (ValueError, SyntaxError, OSError):
        return DEFAULT_FPS
    return float(fps) if fps else DEFAULT_FPS


class PredictTask(Task):
    name = "predict"
    description = "the next frames of a clip, and a surprise score per clip (ConvLSTM encoder-forecaster)"
    selection_metric = "val_mse"
    selection_mode = "min"

    # ------------------------------------------------------------------ data and model

    def synth(self, out: str, videos: int, unlabelled: int, seed: int, **options) -> str:
        from rnnimg.tasks.digits_synth import DigitsSynthConfig, make_archive

        return make_archive(out, DigitsSynthConfig(videos=videos, unlabelled=unlabelled, seed=seed, **options))

    def model_config(self, manifest_uri: str, **overrides) -> "ForecasterConfig":
        """The config for a manifest: ``clip_seconds`` = ``frames_per_clip`` / the manifest's fps, half the
        frames as context, labelling stride half a clip, unless given.

        Raises:
            ValueError: no train or val rows; an override the forecaster does not have.
        """
        counts = self._split_counts(manifest_uri)
        if not counts.get("train") or not counts.get("val"):
            raise ValueError(f"manifest {manifest_uri} needs rows in split 'train' and 'val' "
                             f"(found {counts.get('train', 0)} train, {counts.get('val', 0)} val)")
        given = dict(overrides)
        if "rnn_hidden" in given:  # the command line's name for the recurrent state's width
            given["hidden"] = given.pop("rnn_hidden")
        if "frames_per_clip" in given:
            given.setdefault("context_frames", int(given["frames_per_clip"]) // 2)
        frames = int(given.get("frames_per_clip", 20))
        given.setdefault("clip_seconds", round(frames / _manifest_fps(manifest_uri), 6))
        given.setdefault("stride_seconds", round(given["clip_seconds"] * (frames - given.get("context_frames", frames // 2)) / frames, 6))
        return self.config_from_dict(given)

    def config_from_dict(self, data: dict) -> "ForecasterConfig":
        from rnnimg.models.forecaster import ForecasterConfig

        return ForecasterConfig.from_dict(data)

    def config_to_dict(self, config: "ForecasterConfig") -> dict:
        from dataclasses import asdict

        return asdict(config)

    def labels(self, config: "ForecasterConfig") -> tuple[str, ...]:
        return tuple(config.labels)

    def build_model(self, config: "ForecasterConfig"):
        from rnnimg.models.forecaster import Forecaster

        return Forecaster(config)

    def check_training(self, manifest_uri: str, config: "ForecasterConfig") -> None:
        if config.labels:
            raise ValueError("a conditioned forecaster (labels set) needs its class as input, which the shared training loop "
                             "does not pass to a model; train it with bench/predict_quality.py --part conditioned")
        self._split_counts(manifest_uri)

    @staticmethod
    def _split_counts(manifest_uri: str) -> dict[str, int]:
        from rnnimg.manifest import read_table

        table = read_table(manifest_uri, ("video_uri", "split"), purpose="task 'predict'")
        counts: dict[str, int] = {}
        for split in table["split"].to_pylist():
            counts[split] = counts.get(split, 0) + 1
        return counts

    # ------------------------------------------------------------------ training

    def training_rows(self, manifest_uri: str, split: str, config: "ForecasterConfig", *, rank: int = 0, world: int = 1,
                      pad: bool = False) -> list[tuple[str, int]]:
        """``(video_uri, class id)`` of rank ``rank``'s share of a split (class 0 for an unconditioned model)."""
        from rnnimg.manifest import absolute_uri, manifest_folder, read_table, shard_rows

        table = read_table(manifest_uri, ("video_uri", "split"), purpose="task 'predict'")
        labels = table["label"].to_pylist() if "label" in table.column_names else [None] * table.num_rows
        base = manifest_folder(manifest_uri)
        index = {name: i for i, name in enumerate(config.labels)}
        rows = []
        for uri, row_split, label in zip(table["video_uri"].to_pylist(), table["split"].to_pylist(), labels):
            if row_split != split or not uri:
                continue
            if config.labels and label not in index:
                continue  # a conditioned model learns only from rows of its classes
            rows.append((absolute_uri(uri, base), index.get(label, 0)))
        return shard_rows(rows, rank, world, pad)

    def blank_target(self, config: "ForecasterConfig") -> int:
        return 0

    def permute_frames(self, frames: np.ndarray, target, order: np.ndarray):
        # The ablation shuffles the frames the model reads and must predict alike: the target is the clip.
        return frames[order], target

    def loss(self, outputs, targets, config: "ForecasterConfig"):
        return loss_fn(outputs, config.context_frames, config.loss, config.one_step_weight)

    def batch_stats(self, outputs, targets, config: "ForecasterConfig", loss=None) -> dict:
        import torch

        from rnnimg.models.forecaster import to_image

        evaluating = loss is None  # the training loop passes the batch's loss; evaluation does not
        if loss is None:
            loss = loss_fn(outputs, config.context_frames, config.loss, config.one_step_weight)
        n = len(outputs.frames)
        predicted = to_image(outputs.logits, config.black)
        stats = {"loss_sum": loss.detach().double() * n, "count": torch.tensor(n, device=outputs.frames.device),
                 **forecast_stats(predicted, outputs.frames.float(), config.context_frames)}
        if evaluating:  # every black level, for choosing one at export (not on training batches: it costs 7 more SSIMs)
            stats.update(black_level_stats(outputs.logits, outputs.frames[:, config.context_frames :].float()))
        return stats

    def summarize(self, stats: dict) -> dict:
        count = max(int(stats["count"]), 1)
        out = {"loss": float(stats["loss_sum"]) / count, "clips": int(stats["count"])}
        for prefix in ("", "copy_last_", "mean_frame_"):
            mse = np.asarray(stats[prefix + "mse"], dtype=np.float64) / count
            out[prefix + "mse"] = float(mse.mean())
            out[prefix + "ssim"] = float(np.asarray(stats[prefix + "ssim"], dtype=np.float64).mean() / count)
            if not prefix:
                out["mse_per_step"] = [round(float(v), 3) for v in mse]
        out["mse_vs_copy_last"] = out["mse"] / out["copy_last_mse"] if out["copy_last_mse"] else float("nan")
        if "black_level_mse" in stats:
            out["mse_by_black_level"] = [float(v) / count for v in np.asarray(stats["black_level_mse"], dtype=np.float64)]
            out["ssim_by_black_level"] = [float(v) / count for v in np.asarray(stats["black_level_ssim"], dtype=np.float64)]
        return out

    def export_config(self, config: "ForecasterConfig", best_entry: dict) -> "ForecasterConfig":
        """A black level left to choose (None) is chosen on the selected epoch's validation figures; 0
        where they have none."""
        from dataclasses import replace

        if config.black_level is not None:
            return config
        mse, score = best_entry.get("val_mse_by_black_level"), best_entry.get("val_ssim_by_black_level")
        return replace(config, black_level=choose_black_level(mse, score) if mse and score else 0.0)

    def evaluation(self, best_entry: dict, config: "ForecasterConfig") -> dict:
        """The selected epoch's validation figures, the model's at ``config``'s black level (which the
        epoch's own ``val_mse``/``val_ssim`` are not when it was chosen at export: the level sweep has them)."""
        keys = ("mse", "ssim", "copy_last_mse", "copy_last_ssim", "mean_frame_mse", "mean_frame_ssim", "mse_vs_copy_last",
                "mse_per_step", "loss", "clips")
        out = {"epoch": best_entry.get("epoch"), **{k: best_entry.get(f"val_{k}") for k in keys}, "black_level": config.black}
        mse, score = best_entry.get("val_mse_by_black_level"), best_entry.get("val_ssim_by_black_level")
        if mse and score and config.black in BLACK_LEVELS:
            at = BLACK_LEVELS.index(config.black)
            out.update({"raw_mse": mse[0], "raw_ssim": score[0], "mse": mse[at], "ssim": score[at], "black_levels": list(BLACK_LEVELS),
                        "mse_by_black_level": mse, "ssim_by_black_level": score})
            out["mse_per_step"] = None if at else out["mse_per_step"]  # by step: at the training-time level only
            if out.get("copy_last_mse"):
                out["mse_vs_copy_last"] = mse[at] / out["copy_last_mse"]
        return out

    def write_report(self, model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "ForecasterConfig", model_id: str, *,
                     manifest_uri: str | None = None):
        return write_report(model_uri, evaluation, history, best_metrics, config, model_id)

    # ------------------------------------------------------------------ labelling

    def clip_columns(self) -> dict[str, tuple[str, object]]:
        return {"surprise": ("float32", np.nan)}

    def predict(self, model, inputs, config: "ForecasterConfig") -> dict[str, np.ndarray]:
        if config.labels:
            raise ValueError("a conditioned forecaster needs a class per clip; label an archive with an unconditioned one")
        return {"surprise": surprise(model, inputs, config.context_frames, surprise_measure(config)).cpu().numpy().astype(np.float32)}

    def tables(self) -> dict:
        return {"clips": tables.SURPRISE_CLIPS}

    def shard_rows(self, clips: list[dict], run: dict, min_segment_seconds: float) -> dict[str, list[dict]]:
        return {"clips": clips}
