"""Pictures and the evaluation report of task ``segment``: masks drawn over the frames they belong to.

    rnnimg train OUT/manifest.parquet --out runs --task segment   # writes runs/model/report.md, overlay.png

- ``write_report``: ``report.md`` (validation IoU by epoch and by frame position, the overlay
  videos' clip IoU) and ``overlay.png`` next to the exported model. The overlay is drawn from the
  first ``OVERLAY_VIDEOS`` validation videos of the training manifest, decoded at the model's frame
  size exactly as the clip stream decodes them, with their true masks: one row per video (input,
  truth, prediction, errors), the clip's IoU in the row's title. A validation video that cannot be
  decoded (or whose truth cannot be read) gets a line in the report instead of a row.
- ``tint``, ``outline``: a mask drawn over a frame (used by ``rnnimg.report`` for the masks of a label run).

Needs matplotlib (``pip install 'rnnimg[report]'``) for the pictures; torch only to run the model.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, NamedTuple, Sequence

import numpy as np

if TYPE_CHECKING:
    from rnnimg.models.segmenter import SegmenterConfig

OVERLAY_PNG = "overlay.png"
REPORT = "report.md"
OVERLAY_VIDEOS = 3  # validation videos drawn in overlay.png (the first in manifest order)

MASK_COLOUR = (255, 40, 40)  # the predicted mask drawn over a frame
FALSE_POSITIVE = (220, 40, 40)
MISSED = (40, 80, 220)
BOTH = (200, 200, 200)


class OverlaySample(NamedTuple):
    """One validation clip seen by the model: the frame drawn, its masks and the clip's IoU."""

    video_uri: str
    start_s: float  # the clip's window
    end_s: float
    frame: np.ndarray  # uint8 (S, S, 3): the clip's last frame (the one with the most past), at the model's frame size
    truth: np.ndarray  # bool (S, S)
    predicted: np.ndarray  # bool (S, S)
    iou: float  # IoU of the moving mask over the whole clip (pixel totals, as val_iou)


def tint(frame: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = MASK_COLOUR, alpha: float = 0.5) -> np.ndarray:
    """uint8 (H, W, 3): ``frame`` with the pixels of ``mask`` blended towards ``colour``.

    Args:
        frame: uint8 (H, W, 3); mask: (H, W), nonzero is set.

    Raises:
        ValueError: the mask's size is not the frame's.
    """
    mask = np.asarray(mask).astype(bool)
    if frame.shape[:2] != mask.shape:
        raise ValueError(f"mask of shape {mask.shape} does not fit a frame of shape {frame.shape}")
    out = frame.astype(np.float32)
    out[mask] = (1.0 - alpha) * out[mask] + alpha * np.asarray(colour, np.float32)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def outline(mask: np.ndarray) -> np.ndarray:
    """bool (H, W): the pixels of ``mask`` with a 4-neighbour outside it (or on the frame's edge)."""
    mask = np.asarray(mask).astype(bool)
    inner = np.pad(mask, 1, constant_values=False)
    inside = inner[:-2, 1:-1] & inner[2:, 1:-1] & inner[1:-1, :-2] & inner[1:-1, 2:]  # all four neighbours set
    return mask & ~inside


def error_image(truth: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3): white where both are empty, grey where both are set, red false positives, blue misses."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    error = np.full((*truth.shape, 3), 255, np.uint8)
    error[predicted & ~truth] = FALSE_POSITIVE
    error[truth & ~predicted] = MISSED
    error[truth & predicted] = BOTH
    return error


def clip_iou(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Intersection over union of two masks of any shape (1.0 when both are empty, as ``summarize``)."""
    truth, predicted = truth.astype(bool), predicted.astype(bool)
    union = int((truth | predicted).sum())
    return float((truth & predicted).sum()) / union if union else 1.0


def overlay_png(samples: Sequence[OverlaySample], title: str = "") -> bytes:
    """Input frame, truth, prediction and errors (red: false positive, blue: missed) side by side,
    one row per sample with its video and clip IoU in the row's title, as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from rnnimg import storage

    if not samples:
        raise ValueError("overlay_png needs at least one sample")
    figure = Figure(figsize=(8.5, 0.4 + 2.4 * len(samples)), dpi=100, layout="constrained")  # Agg canvas: no pyplot state
    FigureCanvasAgg(figure)
    rows = figure.subfigures(len(samples), 1, squeeze=False)[:, 0]
    for row, sample in zip(rows, samples):
        panels = (("input", sample.frame), ("truth", sample.truth), ("prediction", sample.predicted),
                  ("errors", error_image(sample.truth, sample.predicted)))
        for index, (name, image) in enumerate(panels):
            axes = row.add_subplot(1, 4, index + 1)
            grey = image.ndim == 2
            axes.imshow(image, cmap="gray" if grey else None, vmin=0, vmax=1 if grey else None, interpolation="nearest")
            axes.set_title(name, fontsize=8)
            axes.set_xticks([])  # no ticks, but the frame stays: an all-set or all-empty mask still shows its edges
            axes.set_yticks([])
        row.suptitle(f"{storage.basename(sample.video_uri)}, clip {sample.start_s:.1f}-{sample.end_s:.1f} s (last frame): "
                     f"clip IoU {sample.iou:.3f}", fontsize=9)
    if title:
        figure.suptitle(title, fontsize=9)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def sample_overlay(model_uri: str, config: "SegmenterConfig", manifest_uri: str,
                   videos: int = OVERLAY_VIDEOS) -> tuple[list[OverlaySample], list[str]]:
    """The exported model on the first clip of each of the first ``videos`` validation videos of a manifest.

    Each video is decoded at the model's frame size and its first clip window taken as the label
    job and evaluation take it (``uniform_clips``); the truth is the task's ``clip_target``.

    Returns:
        ``(samples, notes)``: one ``OverlaySample`` per video that could be read, one line per
        video that could not (what failed and why).
    """
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import get, load_model
    from rnnimg.video.clips import Clip, ClipSpec, uniform_clips
    from rnnimg.video.decode import VideoError, VideoReader

    task = get("segment")
    rows = task.training_rows(manifest_uri, "val", config)[: max(0, videos)]
    if not rows:
        return [], []
    _, model, _, _ = load_model(model_uri)
    spec = ClipSpec(config.clip_seconds, config.frames_per_clip, config.stride_seconds)
    size = (config.frame_size, config.frame_size)
    samples, notes = [], []
    for video_uri, target in rows:
        try:
            with VideoReader(video_uri, size) as reader:
                if reader.info.still:  # a still image: one clip, its frame at time 0, as the label job takes it
                    plan = [Clip(0, 0.0, 0.0, (0.0,) * config.frames_per_clip)]
                else:
                    plan = uniform_clips(reader.duration_s, spec)[:1]
                clip, frames = next(reader.clips(plan)) if plan else (None, None)
            if clip is None:
                raise VideoError("empty", f"{video_uri}: no clip to draw (duration {reader.duration_s:.2f} s)")
            truth = task.clip_target(target, clip).astype(bool)  # (T, S, S)
        except (VideoError, FileNotFoundError, ValueError) as err:
            notes.append(f"{video_uri}: not drawn: {err}")
            continue
        with torch.inference_mode():
            predicted = (model(to_model_input(frames)).float()[0, :, 0] > 0).numpy()  # (1, T, 1, S, S) -> (T, S, S)
        samples.append(OverlaySample(video_uri, clip.start_s, clip.end_s, frames[-1], truth[-1], predicted[-1], clip_iou(truth, predicted)))
    return samples, notes


def write_report(model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "SegmenterConfig", model_id: str, *,
                 manifest_uri: str | None = None):
    """Write report.md (val IoU by epoch and by frame position) and overlay.png into the model folder.

    Args:
        manifest_uri: the training manifest; the overlay is drawn from its first validation videos
            (none given: no overlay, and the report says so).

    Returns:
        An ``rnnimg.evaluation.Report`` (``confusion_uri`` and ``curves_uri`` None: the history is a table here).
    """
    from rnnimg import storage
    from rnnimg.evaluation import Report

    iou = evaluation.get("iou")
    lines = [
        f"# Evaluation of segmentation model {model_id}",
        "",
        f"Validation split at the selected epoch {best_metrics.get('epoch')} (of {len(history)} trained, chosen by validation IoU, "
        f"so slightly optimistic), {evaluation.get('clips')} clips: **IoU of the moving mask "
        f"{iou if iou is None else f'{iou:.3f}'}** (pixel totals), loss {evaluation.get('loss') or float('nan'):.4f}.",
        "",
        f"Recurrent layer: {'Conv' + config.rnn_type.upper() if config.temporal else 'none (per-frame ablation)'}, "
        f"{config.frames_per_clip} frames per {config.clip_seconds:g} s clip, {config.frame_size}x{config.frame_size}.",
        "",
        "| epoch | train loss | val loss | train IoU | val IoU |",
        "|---|---|---|---|---|",
    ]
    for h in history:
        lines.append(f"| {h.get('epoch')} | {h.get('train_loss', float('nan')):.4f} | {h.get('val_loss', float('nan')):.4f} "
                     f"| {h.get('train_iou', float('nan')):.3f} | {h.get('val_iou', float('nan')):.3f} |")
    per_step = evaluation.get("iou_per_step") or []
    if per_step:
        lines += ["", "Validation IoU by frame position in the clip (the first frame has no past to tell motion from):", "",
                  "| " + " | ".join(str(i) for i in range(len(per_step))) + " |", "|---" * len(per_step) + "|",
                  "| " + " | ".join(f"{v:.2f}" for v in per_step) + " |"]
    try:
        import matplotlib  # noqa: F401 - only to know whether plots can be drawn
    except ImportError:
        lines += ["", "Plots not drawn: matplotlib is not installed (pip install 'rnnimg[report]')."]
    else:
        lines += _overlay_lines(model_uri, config, manifest_uri)
    lines.append("")
    markdown = "\n".join(lines)
    report_uri = storage.join(model_uri, REPORT)
    storage.write_bytes(report_uri, markdown.encode("utf-8"))
    return Report(report_uri=report_uri, confusion_uri=None, curves_uri=None, markdown=markdown)


def _overlay_lines(model_uri: str, config: "SegmenterConfig", manifest_uri: str | None) -> list[str]:
    """Draw overlay.png from the manifest's validation videos; the report's lines about it."""
    from rnnimg import storage

    if manifest_uri is None:
        return ["", "Overlay not drawn: no training manifest was given to the report."]
    samples, notes = sample_overlay(model_uri, config, manifest_uri)
    lines = [""]
    if samples:
        png = overlay_png(samples, f"the first {len(samples)} validation video(s) of {storage.basename(manifest_uri)}, "
                                   f"{config.frame_size}x{config.frame_size}")
        storage.write_bytes(storage.join(model_uri, OVERLAY_PNG), png)
        lines += [f"Overlay: the first clip of the first {len(samples)} validation video(s) (last frame drawn):", "",
                  "| video | clip | clip IoU |", "|---|---|---|"]
        lines += [f"| {storage.basename(s.video_uri)} | {s.start_s:.1f}-{s.end_s:.1f} s | {s.iou:.3f} |" for s in samples]
        lines += ["", f"![input, truth, prediction, errors (red: false positive, blue: missed)]({OVERLAY_PNG})"]
    else:
        lines.append(f"Overlay not drawn: no readable validation video in {manifest_uri}.")
    lines += [f"- {note}" for note in notes]
    return lines
