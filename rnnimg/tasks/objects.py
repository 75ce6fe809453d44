"""Task ``objects``: what is where in every frame, also while it is hidden (object CRNN: per-frame
CNN on a grid -> ConvLSTM per cell (or LSTM/GRU) -> per class, a presence score and a box).

    rnnimg synth OUT --task objects
    rnnimg train OUT/manifest.parquet --out runs --task objects --frames-per-clip 16
    rnnimg label OUT/videos/test --model runs/model --out labels     # writes the objects and tracks tables

- Data: ``rnnimg.tasks.objects_synth``, objects of K classes moving over clutter, entering,
  leaving and passing behind bars. Manifest columns ``video_uri``, ``objects_uri`` (an ``.npz``
  of per-frame truth: ``inside``, ``boxes``, ``visible`` per class, and the frame times), ``split``.
- Model: ``rnnimg.models.objects.CellObjectCRNN`` (``head="cells"``, the default: a ConvLSTM per
  cell, presence and box per cell) or ``ObjectCRNN`` (``head="tracker"``: pooled features, LSTM,
  box tracker); ``temporal=False``: the per-frame ablation. One instance per class per frame.
- Sample: a random clip window; its target is float32 (T, K, 7) per sampled frame and class:
  ``present``, ``ignore``, box ``x0, y0, x1, y1`` (normalised), ``visible``. An object counts as
  present from ``min_inside`` of its pixels inside the frame, hidden or not; with less it is
  ignored (neither to find nor a false positive). Augmentation: flips of frames and boxes alike,
  colour channels permuted.
- Loss, head "cells": ``cell_loss`` (presence BCE of the decoded cell, a Gaussian cross-entropy
  over the cells, the centre cell's box), a fully hidden object's class-frame weighing
  ``hidden_weight`` (3) in each term: the truth is known while it is hidden. Head "tracker":
  presence BCE with logits (ignored slots left out) + on present slots ``box_weight`` x L1 +
  ``giou_weight`` x (1 - generalised IoU) + ``measure_weight`` x the per-frame measurement's
  loss on objects at least half visible (``measurement_loss``).
- Metrics: per-frame, per-class precision, recall and F1 at box IoU >= 0.5, on all frames and
  separately where the object is ``visible`` (uncovered), ``occluded`` (partly covered) and
  ``hidden`` (fully covered); the exported checkpoint is the best ``val_f1``. ``miss_counts``
  says why present objects are missed (score too low, box near but IoU < 0.5, box elsewhere).
- Label job: ``objects`` per clip (JSON of the detections of each sampled frame); tables
  ``objects`` (one row per detection) and ``tracks`` (per video and class: first and last time
  seen, frames, seconds seen, mean score) (``rnnimg.tables.OBJECTS``, ``rnnimg.tables.TRACKS``).
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rnnimg import tables
from rnnimg.tasks import Task

if TYPE_CHECKING:
    import torch

    from rnnimg.models.objects import ObjectsConfig

OVERLAY_PNG = "overlay.png"
TIMELINE_PNG = "timeline.png"
REPORT = "report.md"
OBJECT_COLUMNS = ("video_uri", "objects_uri", "split")
IOU_THRESHOLD = 0.5  # a detection is right when its box overlaps the truth's by at least this IoU
# Truth subsets the metrics are reported on: every slot, and present objects by how much of them shows.
CATEGORIES = ("all", "visible", "occluded", "hidden")
# Target layout, last axis of (T, K, 7).
PRESENT, IGNORE, BOX, VISIBLE = 0, 1, slice(2, 6), 6


class ObjectsTarget(NamedTuple):
    """A training row's target: where its video's truth is, and how the model reads it."""

    objects_uri: str  # the .npz truth file (absolute)
    labels: tuple[str, ...]  # the model's classes, in its output order
    min_inside: float  # share of an object's pixels inside the frame from which it counts


@lru_cache(maxsize=512)  # ~10 KB each
def load_truth(objects_uri: str) -> dict[str, np.ndarray]:
    """A truth file's arrays (``labels``, ``times``, ``inside``, ``boxes``, ``visible``), cached per process.

    Raises:
        FileNotFoundError: nothing at ``objects_uri``.
        ValueError: the file lacks an array or their shapes disagree.
    """
    from rnnimg import storage

    if not storage.exists(objects_uri):
        raise FileNotFoundError(f"no objects truth file at {objects_uri}")
    names = ("labels", "times", "inside", "boxes", "visible")
    with np.load(io.BytesIO(storage.read_bytes(objects_uri))) as data:
        missing = [n for n in names if n not in data]
        if missing:
            raise ValueError(f"{objects_uri} must hold arrays {list(names)}, missing {missing}")
        truth = {n: data[n] for n in names}
    t, k = len(truth["times"]), len(truth["labels"])
    if not t or truth["inside"].shape != (t, k) or truth["visible"].shape != (t, k) or truth["boxes"].shape != (t, k, 4):
        raise ValueError(f"{objects_uri}: expected inside and visible (T, K), boxes (T, K, 4) with T = {t} >= 1, K = {k}; got "
                         f"{truth['inside'].shape}, {truth['visible'].shape}, {truth['boxes'].shape}")
    for array in truth.values():
        array.setflags(write=False)
    return truth


def truth_at(truth: dict[str, np.ndarray], timestamps, labels: tuple[str, ...], min_inside: float) -> np.ndarray:
    """float32 (len(timestamps), K, 7): the target of the frame shown at each time, for the model's classes.

    The frame shown at time t is the last one whose time is <= t. A class the file does not
    know is absent throughout.
    """
    times = truth["times"]
    index = np.clip(np.searchsorted(times, np.asarray(timestamps, dtype=np.float64) + 1e-6, side="right") - 1, 0, len(times) - 1)
    known = {str(name): j for j, name in enumerate(truth["labels"])}
    target = np.zeros((len(index), len(labels), 7), np.float32)
    for k, name in enumerate(labels):
        j = known.get(name)
        if j is None:
            continue
        inside = truth["inside"][index, j]  # (T,)
        target[:, k, PRESENT] = inside >= min_inside
        target[:, k, IGNORE] = (inside > 0) & (inside < min_inside)
        target[:, k, BOX] = truth["boxes"][index, j]
        target[:, k, VISIBLE] = truth["visible"][index, j]
    return target


def flip_clip(frames: np.ndarray, target: np.ndarray, horizontal: bool, vertical: bool) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 (T, H, W, C) clip and its (T, K, 7) target mirrored left-right and/or top-bottom."""
    target = target.copy()
    box = target[..., BOX].copy()
    present = (target[..., PRESENT] > 0) | (target[..., IGNORE] > 0)
    if horizontal:
        frames = frames[:, :, ::-1]
        box[..., [0, 2]] = 1.0 - box[..., [2, 0]]
    if vertical:
        frames = frames[:, ::-1]
        box[..., [1, 3]] = 1.0 - box[..., [3, 1]]
    target[..., BOX] = np.where(present[..., None], box, 0.0)  # absent slots keep a zero box
    return np.ascontiguousarray(frames), target


def augment_clip(frames: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random flips (boxes follow) and a colour channel permutation: shapes, not colours, make the class."""
    frames, target = flip_clip(frames, target, bool(rng.random() < 0.5), bool(rng.random() < 0.5))
    return np.ascontiguousarray(frames[..., rng.permutation(frames.shape[-1])]), target


# ----------------------------------------------------------------------------- boxes, loss, metrics


def box_iou(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """IoU of boxes (..., 4) as x0, y0, x1, y1, elementwise: (...,). Two empty boxes: 0."""
    import torch

    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    area = lambda x: (x[..., 2] - x[..., 0]).clamp(min=0) * (x[..., 3] - x[..., 1]).clamp(min=0)  # noqa: E731
    union = area(a) + area(b) - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def generalized_iou(a: "torch.Tensor", b: "torch.Tensor") -> "torch.Tensor":
    """Generalised IoU (Rezatofighi et al. 2019) of boxes (..., 4), elementwise: IoU - (hull - union) / hull."""
    import torch

    area = lambda x: (x[..., 2] - x[..., 0]).clamp(min=0) * (x[..., 3] - x[..., 1]).clamp(min=0)  # noqa: E731
    w = (torch.minimum(a[..., 2], b[..., 2]) - torch.maximum(a[..., 0], b[..., 0])).clamp(min=0)
    h = (torch.minimum(a[..., 3], b[..., 3]) - torch.maximum(a[..., 1], b[..., 1])).clamp(min=0)
    inter = w * h
    union = (area(a) + area(b) - inter).clamp(min=1e-7)
    hull_w = torch.maximum(a[..., 2], b[..., 2]) - torch.minimum(a[..., 0], b[..., 0])
    hull_h = torch.maximum(a[..., 3], b[..., 3]) - torch.minimum(a[..., 1], b[..., 1])
    hull = (hull_w * hull_h).clamp(min=1e-7)
    return inter / union - (hull - union) / hull


def loss_fn(outputs: "torch.Tensor", targets: "torch.Tensor", box_weight: float, giou_weight: float, measured: "torch.Tensor | None" = None,
            measure_weight: float = 0.0, heat: "torch.Tensor | None" = None) -> "torch.Tensor":
    """Presence BCE over non-ignored slots + box L1 and (1 - GIoU) over present ones; with ``measured``,
    ``measure_weight`` x the per-frame measurement loss (``measurement_loss``).

    Args:
        outputs: (B, T, K, 5) presence logit and box; targets: (B, T, K, 7) (``truth_at``);
        measured: (B, T, K, 5) the model's per-frame centre, size and evidence logit; heat: (B, T, K, g, g) its heat logits.
    """
    import torch.nn.functional as F

    outputs, targets = outputs.float(), targets.float()
    extra = measure_weight * measurement_loss(measured, targets, heat) if measured is not None and measure_weight else 0.0
    present, counted = targets[..., PRESENT], 1.0 - targets[..., IGNORE]
    bce = F.binary_cross_entropy_with_logits(outputs[..., 0], present, reduction="none")  # (B, T, K)
    loss = (bce * counted).sum() / counted.sum().clamp(min=1.0)
    n = present.sum().clamp(min=1.0)
    box, truth = outputs[..., 1:], targets[..., BOX]
    if box_weight:
        loss = loss + box_weight * ((box - truth).abs().sum(-1) * present).sum() / n
    if giou_weight:
        loss = loss + giou_weight * ((1.0 - generalized_iou(box, truth)) * present).sum() / n
    return loss + extra


def measurement_loss(measured: "torch.Tensor", targets: "torch.Tensor", heat: "torch.Tensor | None" = None) -> "torch.Tensor":
    """What one frame shows: evidence BCE (target: present with at least half of it visible) over
    non-ignored slots, plus the L1 of centre and size on those mostly visible objects, plus (with
    ``heat``) the cross-entropy of the heat over the cells against the cell of the object's centre.

    Args:
        measured: (B, T, K, 5) centre x, y, size w, h, evidence logit; targets: (B, T, K, 7);
        heat: (B, T, K, g, g) heat logits.
    """
    import torch.nn.functional as F

    measured, targets = measured.float(), targets.float()
    shows = (targets[..., PRESENT] > 0) & (targets[..., VISIBLE] >= 0.5)
    counted = 1.0 - targets[..., IGNORE]
    bce = F.binary_cross_entropy_with_logits(measured[..., 4], shows.float(), reduction="none")
    box = targets[..., BOX]
    truth = centre_size(box)
    l1 = (measured[..., :4] - truth).abs().sum(-1)  # (B, T, K)
    loss = (bce * counted).sum() / counted.sum().clamp(min=1.0) + (l1 * shows).sum() / shows.sum().clamp(min=1)
    if heat is not None:
        g_h, g_w = heat.shape[-2:]
        cell = ((truth[..., 1] * g_h).long().clamp(0, g_h - 1) * g_w + (truth[..., 0] * g_w).long().clamp(0, g_w - 1))  # (B, T, K)
        ce = F.cross_entropy(heat.float().flatten(-2).flatten(0, -2), cell.flatten(), reduction="none").reshape(cell.shape)
        loss = loss + (ce * shows).sum() / shows.sum().clamp(min=1) * 0.5
    return loss


def cell_loss(cells: "torch.Tensor", targets: "torch.Tensor", box_weight: float, giou_weight: float, sigma: float = 0.5,
              hidden_weight: float = 1.0) -> "torch.Tensor":
    """Loss of the per-cell head (``head="cells"``): whether (per class), where (over the cells) and the box (of the centre cell).

    - whether: BCE of the decoded presence logit (the highest cell's) against ``present``, over
      non-ignored slots (a hidden object is present): the score the metric thresholds, trained as such;
    - where: on present slots, the cross-entropy of the softmax over the cells against a Gaussian
      of radius ``sigma`` cells around the object's centre (normalised; an object on a cell edge
      is shared by its neighbours);
    - box: ``box_weight`` x L1 + ``giou_weight`` x (1 - GIoU) of the box the true centre cell predicts, over present slots.

    Each term is a weighted mean over its slots: a fully hidden object's slot weighs ``hidden_weight``,
    every other slot 1 (1: the plain means). The hidden slots are the few (about a sixth of the present
    ones) where only the recurrent state knows the answer; the weight gives them more of the gradient.

    Args:
        cells: (B, T, K, 5, g, g) raw per-cell outputs (``rnnimg.models.objects.CellObjectCRNN``); targets: (B, T, K, 7).
    """
    import torch
    import torch.nn.functional as F

    from rnnimg.models.objects import cell_boxes

    cells, targets = cells.float(), targets.float()
    g_h, g_w = cells.shape[-2:]
    present, counted = targets[..., PRESENT], 1.0 - targets[..., IGNORE]  # (B, T, K)
    hidden = (present > 0) & (targets[..., VISIBLE] <= 0)
    weight = 1.0 + (hidden_weight - 1.0) * hidden.float()  # (B, T, K)
    counted, present = counted * weight, present * weight  # (weighted masks; ``present`` is 0 or the slot's weight)
    logits = cells[..., 0, :, :].flatten(-2)  # (B, T, K, g, g) -> (B, T, K, g*g)
    bce = F.binary_cross_entropy_with_logits(logits.max(-1).values, targets[..., PRESENT], reduction="none")  # (B, T, K)
    loss = (bce * counted).sum() / counted.sum().clamp(min=1.0)
    truth = centre_size(targets[..., BOX])  # (B, T, K, 4) centre x, y, width, height
    ys = torch.arange(g_h, device=cells.device, dtype=cells.dtype)[:, None] + 0.5
    xs = torch.arange(g_w, device=cells.device, dtype=cells.dtype) + 0.5
    d2 = (xs - truth[..., 0, None, None] * g_w) ** 2 + (ys - truth[..., 1, None, None] * g_h) ** 2  # (B, T, K, g, g), in cells^2
    where = (-d2 / (2 * sigma**2)).flatten(-2).softmax(-1)  # (B, T, K, g*g): the Gaussian, normalised over the cells
    n = present.sum().clamp(min=1.0)
    loss = loss + (-(where * logits.log_softmax(-1)).sum(-1) * present).sum() / n
    col = (truth[..., 0] * g_w).long().clamp(0, g_w - 1)  # (B, T, K)
    row = (truth[..., 1] * g_h).long().clamp(0, g_h - 1)
    boxes = cell_boxes(cells).flatten(-2)  # (B, T, K, 4, g*g)
    box = boxes.gather(-1, (row * g_w + col)[..., None, None].expand(*row.shape, 4, 1))[..., 0]  # (B, T, K, 4) at the true cell
    if box_weight:
        loss = loss + box_weight * ((box - targets[..., BOX]).abs().sum(-1) * present).sum() / n
    if giou_weight:
        loss = loss + giou_weight * ((1.0 - generalized_iou(box, targets[..., BOX])) * present).sum() / n
    return loss


def centre_size(box: "torch.Tensor") -> "torch.Tensor":
    """Boxes (..., 4) x0, y0, x1, y1 -> (..., 4) centre x, y, width, height."""
    import torch

    return torch.stack([(box[..., 0] + box[..., 2]) / 2, (box[..., 1] + box[..., 3]) / 2, box[..., 2] - box[..., 0], box[..., 3] - box[..., 1]], -1)


def detection_counts(outputs: "torch.Tensor", targets: "torch.Tensor", score_threshold: float = 0.5) -> dict[str, "torch.Tensor"]:
    """True positives, false positives and false negatives per truth category (``CATEGORIES``), each int64 (4,).

    A slot is one class in one frame. A detection (presence probability >= ``score_threshold``)
    is right where the class is present and the boxes overlap at IoU >= 0.5; a wrong box is
    both a false positive and a false negative. A detection where the class is absent is a
    false positive of ``all`` only; ignored slots count nowhere.

    Args:
        outputs: (..., K, 5) presence logit and box; targets: (..., K, 7) (``truth_at``).
    """
    import torch

    outputs, targets = outputs.float(), targets.float()
    probability = outputs[..., 0].sigmoid()
    detected = probability >= score_threshold
    present = targets[..., PRESENT] > 0
    counted = targets[..., IGNORE] <= 0
    hit = box_iou(outputs[..., 1:], targets[..., BOX]) >= IOU_THRESHOLD
    visible = targets[..., VISIBLE]
    masks = {
        "all": counted,
        "visible": present & (visible >= 1.0 - 1e-6),
        "occluded": present & (visible > 0) & (visible < 1.0 - 1e-6),
        "hidden": present & (visible <= 0),
    }
    tp = detected & present & hit
    fp = detected & counted & ~(present & hit)
    fn = present & ~(detected & hit)
    stack = lambda x: torch.stack([(x & masks[c]).sum() for c in CATEGORIES])  # noqa: E731 - (4,) per category
    return {"tp": stack(tp), "fp": stack(fp), "fn": stack(fn), "objects": stack(present)}


# Why a present object is or is not found (``miss_counts``), one column each.
MISS_KINDS = ("found", "low_score", "near", "far")


def miss_counts(outputs: "torch.Tensor", targets: "torch.Tensor", score_threshold: float = 0.5) -> "torch.Tensor":
    """Present class-frames by what became of them, int64 (3, 4): rows visible, occluded, hidden
    (``CATEGORIES[1:]``), columns ``MISS_KINDS``:

    - ``found``: detected (probability >= ``score_threshold``) and box IoU >= 0.5 (a true positive);
    - ``low_score``: probability below the threshold (whatever the box);
    - ``near``: detected, the box's centre inside the true box, IoU < 0.5 (a size or a small position error);
    - ``far``: detected, the centre outside the true box (the object looked for in the wrong place).

    Args:
        outputs: (..., K, 5) presence logit and box; targets: (..., K, 7) (``truth_at``).
    """
    import torch

    outputs, targets = outputs.float(), targets.float()
    detected = outputs[..., 0].sigmoid() >= score_threshold
    present, visible = targets[..., PRESENT] > 0, targets[..., VISIBLE]
    hit = box_iou(outputs[..., 1:], targets[..., BOX]) >= IOU_THRESHOLD
    centre, truth = centre_size(outputs[..., 1:]), targets[..., BOX]
    inside = ((centre[..., 0] >= truth[..., 0]) & (centre[..., 0] <= truth[..., 2]) & (centre[..., 1] >= truth[..., 1])
              & (centre[..., 1] <= truth[..., 3]))
    kinds = (detected & hit, ~detected, detected & ~hit & inside, detected & ~hit & ~inside)
    rows = (present & (visible >= 1.0 - 1e-6), present & (visible > 0) & (visible < 1.0 - 1e-6), present & (visible <= 0))
    return torch.stack([torch.stack([(kind & row).sum() for kind in kinds]) for row in rows])


def f1_scores(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """``(precision, recall, F1)``; a ratio with nothing to count (0/0) is NaN."""
    nan = float("nan")
    precision = tp / (tp + fp) if tp + fp else nan
    recall = tp / (tp + fn) if tp + fn else nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else nan
    return precision, recall, f1


def summarize_counts(tp, fp, fn, objects=None) -> dict[str, float]:
    """Metrics from per-category counts (4,): ``precision``, ``recall``, ``f1`` (all slots) and
    ``precision_<category>``, ... for visible, occluded and hidden, with ``objects_<category>`` counts."""
    out: dict[str, float] = {}
    for i, category in enumerate(CATEGORIES):
        p, r, f = f1_scores(int(tp[i]), int(fp[i]), int(fn[i]))
        suffix = "" if category == "all" else f"_{category}"
        out.update({f"precision{suffix}": p, f"recall{suffix}": r, f"f1{suffix}": f})
        if objects is not None:
            out[f"objects{suffix}"] = int(objects[i])
    return out


def clip_objects_json(outputs: np.ndarray, labels: tuple[str, ...], score_threshold: float) -> str:
    """One clip's detections as the ``objects`` clip column: JSON ``{"frames": [[[label, score, x0, y0, x1, y1], ...], ...]}``.

    Args:
        outputs: float (T, K, 5) presence logit and box of each sampled frame.
    """
    probability = 1.0 / (1.0 + np.exp(-outputs[..., 0].astype(np.float64)))  # (T, K)
    frames = []
    for t in range(len(outputs)):
        frames.append([[labels[k], round(float(probability[t, k]), 5), *(round(float(v), 5) for v in outputs[t, k, 1:])]
                       for k in range(len(labels)) if probability[t, k] >= score_threshold])
    return json.dumps({"frames": frames}, separators=(",", ":"))


def tracks_of(rows: list[dict]) -> list[dict]:
    """Per video and class, from one shard's ``objects`` rows (each with ``step_s``, its sampling interval):
    first and last time seen, frames, seconds seen (frames x their interval), mean score."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["video_uri"], row["label"]), []).append(row)
    tracks = []
    for (uri, label), seen in sorted(groups.items()):
        times = [r["frame_time_s"] for r in seen]
        tracks.append({"video_uri": uri, "label": label, "first_seen_s": min(times), "last_seen_s": max(times), "frames": len(seen),
                       "seconds_seen": float(sum(r["step_s"] for r in seen)), "mean_score": float(np.mean([r["score"] for r in seen])),
                       "model_id": seen[0]["model_id"], "run_id": seen[0]["run_id"]})
    return tracks


# ----------------------------------------------------------------------------- report


def sample_predictions(model_uri: str, config: "ObjectsConfig", seeds=(101, 102, 103)) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The exported model on freshly rendered synthetic clips: ``(uint8 (T, S, S, 3), target (T, K, 7), outputs (T, K, 5))`` each.

    ``write_report`` is not given the manifest, so the samples are new videos (``objects_synth.render_video``).
    """
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import load_model
    from rnnimg.tasks.objects_synth import LABELS, render_video
    from rnnimg.video.clips import frame_times

    fps, size = 12, config.frame_size
    _, model, _, _ = load_model(model_uri)
    samples = []
    for seed in seeds:
        scene = render_video(np.random.default_rng(seed), 64, fps, config.clip_seconds)
        times = np.arange(len(scene.frames)) / fps
        timestamps = frame_times(0.0, config.clip_seconds, config.frames_per_clip)
        index = np.clip(np.searchsorted(times, np.asarray(timestamps) + 1e-6, side="right") - 1, 0, len(times) - 1)
        pick = np.minimum((np.arange(size) + 0.5) * 64 / size, 63).astype(np.intp)
        clip = scene.frames[index][:, pick][:, :, pick]  # (T, 64, 64, 3) -> (T, S, S, 3), nearest
        truth = {"labels": np.array(LABELS), "times": times, "inside": scene.inside, "boxes": scene.boxes, "visible": scene.visible}
        target = truth_at(truth, timestamps, tuple(config.labels), config.min_inside)
        with torch.inference_mode():
            outputs = model(to_model_input(clip)).detections.float()[0].numpy()  # (1, T, K, 5) -> (T, K, 5)
        samples.append((clip, target, outputs))
    return samples


def validation_predictions(model_uri: str, config: "ObjectsConfig", rows: list) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The exported model on the first clip of each ``(video_uri, ObjectsTarget)`` row: ``(clip, target, outputs)`` each.

    A video that does not decode is left out (the report then shows fewer, or falls back to synthetic clips).
    """
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import load_model
    from rnnimg.video.clips import ClipSpec, uniform_clips
    from rnnimg.video.decode import VideoError, VideoReader

    _, model, _, _ = load_model(model_uri)
    spec = ClipSpec(config.clip_seconds, config.frames_per_clip, config.stride_seconds)
    samples = []
    for uri, target in rows:
        try:
            with VideoReader(uri, (config.frame_size, config.frame_size)) as reader:
                clip, frames = next(iter(reader.clips(uniform_clips(reader.duration_s, spec)[:1])))
        except (VideoError, StopIteration):
            continue
        with torch.inference_mode():
            outputs = model(to_model_input(frames)).detections.float()[0].numpy()  # (1, T, K, 5) -> (T, K, 5)
        samples.append((frames, truth_at(load_truth(target.objects_uri), clip.timestamps, target.labels, target.min_inside), outputs))
    return samples


def overlay_png(samples, labels: tuple[str, ...], score_threshold: float, frames_shown: int = 6) -> bytes:
    """Frames of each sample with truth boxes (green; dashed while hidden) and detections (red, with class and score)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    figure = Figure(figsize=(1.6 * frames_shown, 1.75 * len(samples)), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for row, (clip, target, outputs) in enumerate(samples):
        size = clip.shape[1]
        for col, t in enumerate(np.linspace(0, len(clip) - 1, frames_shown).round().astype(int)):
            axes = figure.add_subplot(len(samples), frames_shown, row * frames_shown + col + 1)
            axes.imshow(clip[t], interpolation="nearest")
            for k, name in enumerate(labels):
                if target[t, k, PRESENT] > 0:
                    x0, y0, x1, y1 = target[t, k, BOX] * size
                    hidden = target[t, k, VISIBLE] <= 0
                    axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.4, ec="lime",
                                             ls="--" if hidden else "-"))
                score = 1.0 / (1.0 + np.exp(-outputs[t, k, 0]))
                if score >= score_threshold:
                    x0, y0, x1, y1 = outputs[t, k, 1:] * size
                    axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, lw=1.0, ec="red"))
                    axes.text(x0, y0 - 1, f"{name} {score:.2f}", color="red", fontsize=5, va="bottom")
            axes.set_title(f"video {row + 1}, frame {t}", fontsize=6)
            axes.set_axis_off()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def timeline_png(sample, labels: tuple[str, ...], clip_seconds: float) -> bytes:
    """Per class over one clip: truth (grey: visible, black: hidden) and the predicted presence probability."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _, target, outputs = sample
    t = len(target)
    times = (np.arange(t) + 0.5) * clip_seconds / t
    figure = Figure(figsize=(7, 1.1 * len(labels) + 0.4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    for k, name in enumerate(labels):
        axes = figure.add_subplot(len(labels), 1, k + 1)
        present = target[:, k, PRESENT] > 0
        hidden = present & (target[:, k, VISIBLE] <= 0)
        width = clip_seconds / t
        axes.bar(times[present & ~hidden], 1.0, width=width, color="0.8", label="present, visible part")
        axes.bar(times[hidden], 1.0, width=width, color="0.25", label="present, hidden")
        axes.plot(times, 1.0 / (1.0 + np.exp(-outputs[:, k, 0])), "r.-", label="predicted probability")
        axes.set_ylim(0, 1.05)
        axes.set_xlim(0, clip_seconds)
        axes.set_ylabel(name, fontsize=8)
        if k == 0:
            from matplotlib.lines import Line2D
            from matplotlib.patches import Patch

            axes.legend(handles=[Patch(color="0.8", label="present, visible part"), Patch(color="0.25", label="present, hidden"),
                                 Line2D([], [], color="r", marker=".", label="predicted probability")], fontsize=6, loc="upper right", ncols=3)
    figure.axes[-1].set_xlabel("seconds", fontsize=8)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and np.isnan(value)) else f"{value:.3f}"


def _recurrent_layer(config: "ObjectsConfig") -> str:
    """The report's name for the model's recurrent layer."""
    if not config.temporal:
        return "none (per-frame ablation)"
    if config.head == "cells":
        return f"Conv{config.rnn_type.upper()} per cell ({config.cell_hidden} channels, {config.cell_kernel}x{config.cell_kernel})"
    return f"{config.rnn_type.upper()} ({config.rnn_impl})"


def write_report(model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "ObjectsConfig", model_id: str,
                 val_rows: list | None = None):
    """Write report.md (F1 at IoU >= 0.5 by truth category, per epoch) and the overlay and timeline PNGs.

    The plots show the first clip of each of ``val_rows`` (validation videos), or freshly rendered
    synthetic clips when there are none.

    Returns:
        An ``rnnimg.evaluation.Report`` (``confusion_uri`` and ``curves_uri`` None).
    """
    from rnnimg import storage
    from rnnimg.evaluation import Report

    lines = [
        f"# Evaluation of objects model {model_id}",
        "",
        f"Validation split at the selected epoch {best_metrics.get('epoch')} (of {len(history)} trained, chosen by validation F1, "
        f"so slightly optimistic). Per frame and class, a detection is right at box IoU >= {IOU_THRESHOLD}.",
        "",
        f"Head {config.head}; recurrent layer: {_recurrent_layer(config)}, "
        f"{config.frames_per_clip} frames per {config.clip_seconds:g} s clip, {config.frame_size}x{config.frame_size}, "
        f"classes {', '.join(config.labels)}.",
        "",
        "| frames | objects | precision | recall | F1 |",
        "|---|---|---|---|---|",
    ]
    for category in CATEGORIES:
        suffix = "" if category == "all" else f"_{category}"
        lines.append(f"| {category} | {evaluation.get('objects' + suffix)} | {_fmt(evaluation.get('precision' + suffix))} "
                     f"| {_fmt(evaluation.get('recall' + suffix))} | {_fmt(evaluation.get('f1' + suffix))} |")
    lines += ["", "| epoch | train loss | val loss | val F1 | val F1 visible | val F1 occluded | val F1 hidden |", "|---|---|---|---|---|---|---|"]
    for h in history:
        lines.append(f"| {h.get('epoch')} | {_fmt(h.get('train_loss'))} | {_fmt(h.get('val_loss'))} | {_fmt(h.get('val_f1'))} "
                     f"| {_fmt(h.get('val_f1_visible'))} | {_fmt(h.get('val_f1_occluded'))} | {_fmt(h.get('val_f1_hidden'))} |")
    overlay_uri = None
    try:
        import matplotlib  # noqa: F401 - only to know whether plots can be drawn
    except ImportError:
        lines += ["", "Plots not drawn: matplotlib is not installed (pip install 'rnnimg[report]')."]
    else:
        samples = (validation_predictions(model_uri, config, val_rows) if val_rows else None) or sample_predictions(model_uri, config)
        source = "validation videos" if val_rows else "fresh synthetic clips (not from the manifest)"
        overlay_uri = storage.join(model_uri, OVERLAY_PNG)
        storage.write_bytes(overlay_uri, overlay_png(samples, tuple(config.labels), config.score_threshold))
        storage.write_bytes(storage.join(model_uri, TIMELINE_PNG), timeline_png(samples[0], tuple(config.labels), config.clip_seconds))
        lines += ["", f"First clip of {len(samples)} {source}: truth boxes green (dashed while hidden), detections red.", "",
                  f"![box overlays]({OVERLAY_PNG})", "", f"![per-class timeline of the first clip]({TIMELINE_PNG})"]
    lines.append("")
    markdown = "\n".join(lines)
    report_uri = storage.join(model_uri, REPORT)
    storage.write_bytes(report_uri, markdown.encode("utf-8"))
    return Report(report_uri=report_uri, confusion_uri=None, curves_uri=None, markdown=markdown)


# ----------------------------------------------------------------------------- the task


class ObjectsTask(Task):
    name = "objects"
    description = "per frame and class, presence and box, also through occlusion (CNN grid -> ConvLSTM per cell, or LSTM + tracker)"
    selection_metric = "val_f1"
    selection_mode = "max"

    # ------------------------------------------------------------------ data and model

    def synth(self, out: str, videos: int, unlabelled: int, seed: int, **options) -> str:
        from rnnimg.tasks.objects_synth import ObjectsSynthConfig, make_archive

        return make_archive(out, ObjectsSynthConfig(videos=videos, unlabelled=unlabelled, seed=seed, **options))

    def model_config(self, manifest_uri: str, **overrides) -> "ObjectsConfig":
        rows = self._truth_rows(manifest_uri)
        counts = {s: sum(1 for _, _, split in rows if split == s) for s in ("train", "val")}
        if not counts["train"] or not counts["val"]:
            raise ValueError(f"manifest {manifest_uri} needs rows with an objects_uri in split 'train' and 'val' "
                             f"(found {counts['train']} train, {counts['val']} val)")
        if "labels" not in overrides:
            first = next(uri for _, uri, split in rows if split == "train")
            overrides = {"labels": tuple(str(n) for n in load_truth(first)["labels"]), **overrides}
        return self.config_from_dict(dict(overrides))

    def config_from_dict(self, data: dict) -> "ObjectsConfig":
        from rnnimg.models.objects import ObjectsConfig

        return ObjectsConfig.from_dict(data)

    def config_to_dict(self, config: "ObjectsConfig") -> dict:
        from dataclasses import asdict

        return asdict(config)

    def labels(self, config: "ObjectsConfig") -> tuple[str, ...]:
        return tuple(config.labels)

    def build_model(self, config: "ObjectsConfig"):
        from rnnimg.models.objects import build_model

        return build_model(config)

    def check_training(self, manifest_uri: str, config: "ObjectsConfig") -> None:
        self.model_config(manifest_uri)

    @staticmethod
    def _truth_rows(manifest_uri: str) -> list[tuple[str, str, str]]:
        """``(video_uri, objects_uri, split)`` of every row with truth, absolute."""
        from rnnimg.manifest import absolute_uri, manifest_folder, read_table

        table = read_table(manifest_uri, OBJECT_COLUMNS, purpose="task 'objects'", project=True)
        base = manifest_folder(manifest_uri)
        return [(absolute_uri(v, base), absolute_uri(o, base), s)
                for v, o, s in zip(table["video_uri"].to_pylist(), table["objects_uri"].to_pylist(), table["split"].to_pylist()) if v and o]

    # ------------------------------------------------------------------ training

    def training_rows(self, manifest_uri: str, split: str, config: "ObjectsConfig", *, rank: int = 0, world: int = 1,
                      pad: bool = False) -> list[tuple[str, ObjectsTarget]]:
        """``(video_uri, ObjectsTarget)`` of rank ``rank``'s share of a split: rows r, r+W, ... (``pad``: the same count on every rank)."""
        from rnnimg.manifest import shard_rows

        rows = [(v, ObjectsTarget(o, tuple(config.labels), config.min_inside)) for v, o, s in self._truth_rows(manifest_uri) if s == split]
        return shard_rows(rows, rank, world, pad)

    def clip_target(self, target: ObjectsTarget, clip) -> np.ndarray:
        """float32 (T, K, 7) of the frames shown at the clip's timestamps (``truth_at``)."""
        return truth_at(load_truth(target.objects_uri), clip.timestamps, target.labels, target.min_inside)

    def augment(self, frames: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return augment_clip(frames, target, rng)

    def permute_frames(self, frames: np.ndarray, target: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return frames[order], target[order]  # a target per frame moves with its frame

    def blank_target(self, config: "ObjectsConfig") -> np.ndarray:
        return np.zeros((config.frames_per_clip, config.num_classes, 7), np.float32)

    def loss(self, outputs, targets, config: "ObjectsConfig"):
        if config.head == "cells":
            return cell_loss(outputs.cells, targets, config.box_weight, config.giou_weight, config.presence_sigma, config.hidden_weight)
        return loss_fn(outputs.detections, targets, config.box_weight, config.giou_weight, outputs.measured, config.measure_weight, outputs.heat)

    def batch_stats(self, outputs, targets, config: "ObjectsConfig", loss=None) -> dict:
        import torch

        if loss is None:
            loss = self.loss(outputs, targets, config)
        n = len(targets)
        return {"loss_sum": loss.detach().double() * n, "count": torch.tensor(n, device=targets.device),
                **detection_counts(outputs.detections, targets, config.score_threshold)}

    def summarize(self, stats: dict) -> dict:
        count = max(int(stats["count"]), 1)
        return {"loss": float(stats["loss_sum"]) / count, "clips": int(stats["count"]),
                **summarize_counts(stats["tp"], stats["fp"], stats["fn"], stats["objects"])}

    def evaluation(self, best_entry: dict, config: "ObjectsConfig") -> dict:
        keys = [k[len("val_"):] for k in best_entry if k.startswith("val_")]
        return {**{k: best_entry[f"val_{k}"] for k in keys}, "epoch": best_entry.get("epoch")}

    def write_report(self, model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "ObjectsConfig", model_id: str, *,
                     manifest_uri: str | None = None):
        val_rows = self.training_rows(manifest_uri, "val", config)[:3] if manifest_uri else None
        return write_report(model_uri, evaluation, history, best_metrics, config, model_id, val_rows=val_rows)

    # ------------------------------------------------------------------ labelling

    def clip_columns(self) -> dict[str, tuple[str, object]]:
        return {"objects": ("object", "")}

    def predict(self, model, inputs, config: "ObjectsConfig") -> dict[str, np.ndarray]:
        outputs = model(inputs).detections.float().cpu().numpy()  # (N, T, K, 5)
        labels = tuple(config.labels)
        return {"objects": np.array([clip_objects_json(o, labels, config.score_threshold) for o in outputs], dtype=object)}

    def tables(self) -> dict:
        return {"objects": tables.OBJECTS, "tracks": tables.TRACKS}

    def shard_rows(self, clips: list[dict], run: dict, min_segment_seconds: float) -> dict[str, list[dict]]:
        rows = []
        for clip in clips:
            if not clip.get("objects"):
                continue
            frames = json.loads(clip["objects"])["frames"]
            step = (clip["end_s"] - clip["start_s"]) / len(frames)  # the rule of rnnimg.video.clips.frame_times
            for i, detections in enumerate(frames):
                for label, score, x0, y0, x1, y1 in detections:
                    rows.append({"video_uri": clip["video_uri"], "frame_time_s": clip["start_s"] + (i + 0.5) * step, "label": label,
                                 "score": score, "x0": x0, "y0": y0, "x1": x1, "y1": y1, "model_id": clip["model_id"],
                                 "run_id": clip["run_id"], "step_s": step})
        tracks = tracks_of(rows)
        for row in rows:
            del row["step_s"]
        return {"objects": rows, "tracks": tracks}
