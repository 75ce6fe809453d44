"""Task ``segment``: a mask per sampled frame of what moves (recurrent segmenter: conv encoder ->
ConvLSTM/ConvGRU -> decoder with skips).

    rnnimg synth OUT --task segment
    rnnimg train OUT/manifest.parquet --out runs --task segment
    rnnimg label OUT/videos/test --model runs/model --out labels     # writes the masks table

- Data: ``rnnimg.tasks.segment_synth``, identical objects on a drifting texture, some moving;
  the mask is the moving ones, so no single frame carries it. Manifest columns ``video_uri``,
  ``mask_uri`` (an ``.npz`` of uint8 (T, H, W) masks and their frame times), ``split``.
- Model: ``rnnimg.models.segmenter.Segmenter`` (``temporal=False``: the per-frame ablation).
- Sample: a random clip window; its target is uint8 (T, S, S): the mask of the frame shown at
  each sampled time, resized (nearest) to the model's frame size. Augmentation: flips of frames
  and masks alike.
- Loss: per-pixel BCE with logits + ``dice_weight`` x soft Dice.
- Metrics: loss, ``iou`` (intersection over union of the moving mask, pixel totals over the
  split), ``iou_per_step`` (by frame position in the clip); the exported checkpoint is the best val_iou.
- Label job: ``masks`` per clip (JSON of per-frame RLEs); table ``masks``, one row per sampled
  frame (``rnnimg.tables.MASKS``, RLE as in ``rnnimg.rle``).
"""

from __future__ import annotations

import io
import json
from functools import lru_cache
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from rnnimg import tables
from rnnimg.tasks import Task
from rnnimg.tasks.segment_report import write_report

if TYPE_CHECKING:
    from rnnimg.models.segmenter import SegmenterConfig

MASK_COLUMNS = ("video_uri", "mask_uri", "split")
SPLITS = ("train", "val", "test")


class MaskTarget(NamedTuple):
    """A training row's target: where its video's masks are, and the size the clip stream decodes at."""

    mask_uri: str  # the .npz truth file (absolute)
    frame_size: int  # masks are resized (nearest) to frame_size x frame_size, like the frames


@lru_cache(maxsize=256)  # ~200 KB each at 64 x 64, 4 s, 12 fps
def load_masks(mask_uri: str) -> tuple[np.ndarray, np.ndarray]:
    """A truth file's ``(masks uint8 (T, H, W), times float64 (T,))``, cached per process.

    Raises:
        FileNotFoundError: nothing at ``mask_uri``.
        ValueError: the file is not an ``.npz`` with ``masks`` and ``times`` of matching length.
    """
    from rnnimg import storage

    if not storage.exists(mask_uri):
        raise FileNotFoundError(f"no mask file at {mask_uri}")
    with np.load(io.BytesIO(storage.read_bytes(mask_uri))) as data:
        if "masks" not in data or "times" not in data:
            raise ValueError(f"{mask_uri} must hold arrays 'masks' (T, H, W) and 'times' (T,), got {sorted(data.files)}")
        masks, times = data["masks"].astype(np.uint8), data["times"].astype(np.float64)
    if masks.ndim != 3 or len(times) != len(masks) or not len(masks):
        raise ValueError(f"{mask_uri}: masks must be (T, H, W) with T = len(times) >= 1, got {masks.shape} and {times.shape}")
    masks.setflags(write=False)
    return masks, times


def masks_at(masks: np.ndarray, times: np.ndarray, timestamps, size: int) -> np.ndarray:
    """uint8 (len(timestamps), size, size): the mask of the frame shown at each time, resized (nearest).

    The frame shown at time t is the last one whose time is <= t (the first one before it).
    """
    index = np.clip(np.searchsorted(times, np.asarray(timestamps, dtype=np.float64) + 1e-6, side="right") - 1, 0, len(times) - 1)
    picked = masks[index]  # (T_video, H, W) -> (T, H, W)
    h, w = picked.shape[1:]
    if (h, w) != (size, size):
        rows = np.minimum((np.arange(size) + 0.5) * h / size, h - 1).astype(np.intp)
        cols = np.minimum((np.arange(size) + 0.5) * w / size, w - 1).astype(np.intp)
        picked = picked[:, rows][:, :, cols]  # (T, H, W) -> (T, size, size)
    return np.ascontiguousarray(picked, dtype=np.uint8)


def loss_fn(logits, masks, dice_weight: float):
    """Per-pixel BCE with logits plus ``dice_weight`` x the soft Dice loss of each clip.

    Args:
        logits: (B, T, 1, H, W); masks: (B, T, H, W) in {0, 1}.
    """
    import torch.nn.functional as F

    logits = logits.float().squeeze(2)  # (B, T, 1, H, W) -> (B, T, H, W)
    target = masks.float()
    loss = F.binary_cross_entropy_with_logits(logits, target)
    if dice_weight:
        probs = logits.sigmoid().flatten(1)  # (B, T, H, W) -> (B, T*H*W)
        flat = target.flatten(1)
        dice = 1 - (2 * (probs * flat).sum(1) + 1) / (probs.sum(1) + flat.sum(1) + 1)
        loss = loss + dice_weight * dice.mean()
    return loss


def augment_clip(frames: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The same random horizontal and vertical flip of a uint8 (T, H, W, C) clip and its (T, H, W) masks.

    A flip moves objects, never changes which of them move: the masks stay right.
    """
    if rng.random() < 0.5:
        frames, masks = frames[:, :, ::-1], masks[:, :, ::-1]
    if rng.random() < 0.5:
        frames, masks = frames[:, ::-1], masks[:, ::-1]
    return np.ascontiguousarray(frames), np.ascontiguousarray(masks)


def clip_masks_json(masks: np.ndarray) -> str:
    """One clip's predicted masks, bool (T, H, W), as the ``masks`` clip column: JSON
    ``{"height", "width", "frames": [{"counts": [...], "area_fraction": x}, ...]}``."""
    from rnnimg import rle

    frames = []
    for mask in masks:
        encoded = rle.encode(mask)
        frames.append({"counts": encoded["counts"], "area_fraction": round(rle.area_fraction(encoded), 6)})
    return json.dumps({"height": int(masks.shape[1]), "width": int(masks.shape[2]), "frames": frames}, separators=(",", ":"))


class SegmentTask(Task):
    name = "segment"
    description = "a mask per frame of what moves (conv encoder -> ConvLSTM/ConvGRU -> decoder)"
    selection_metric = "val_iou"
    selection_mode = "max"

    # ------------------------------------------------------------------ data and model

    synth_options = ("images",)

    def synth(self, out: str, videos: int, unlabelled: int, seed: int, **options) -> str:
        """Videos of moving and still objects; with ``images=True`` still images for the spatial (ReNet) model."""
        from rnnimg.tasks.segment_synth import SegmentSynthConfig, make_archive

        return make_archive(out, SegmentSynthConfig(videos=videos, unlabelled=unlabelled, seed=seed, **options))

    def model_config(self, manifest_uri: str, **overrides) -> "SegmenterConfig":
        counts = self._split_counts(manifest_uri)
        if not counts.get("train") or not counts.get("val"):
            raise ValueError(f"manifest {manifest_uri} needs rows with a mask_uri in split 'train' and 'val' "
                             f"(found {counts.get('train', 0)} train, {counts.get('val', 0)} val)")
        return self.config_from_dict(dict(overrides))

    def config_from_dict(self, data: dict) -> "SegmenterConfig":
        from rnnimg.models.segmenter import SegmenterConfig

        return SegmenterConfig.from_dict(data)

    def config_to_dict(self, config: "SegmenterConfig") -> dict:
        from dataclasses import asdict

        return asdict(config)

    def labels(self, config: "SegmenterConfig") -> tuple[str, ...]:
        return ()

    def build_model(self, config: "SegmenterConfig"):
        from rnnimg.models.segmenter import Segmenter

        return Segmenter(config)

    def check_training(self, manifest_uri: str, config: "SegmenterConfig") -> None:
        self.model_config(manifest_uri)

    @staticmethod
    def _split_counts(manifest_uri: str) -> dict[str, int]:
        from rnnimg.manifest import read_table

        table = read_table(manifest_uri, MASK_COLUMNS, purpose="task 'segment'", project=True)
        counts: dict[str, int] = {}
        for split, mask in zip(table["split"].to_pylist(), table["mask_uri"].to_pylist()):
            if mask:
                counts[split] = counts.get(split, 0) + 1
        return counts

    # ------------------------------------------------------------------ training

    def training_rows(self, manifest_uri: str, split: str, config: "SegmenterConfig", *, rank: int = 0, world: int = 1,
                      pad: bool = False) -> list[tuple[str, "MaskTarget"]]:
        """``(video_uri, MaskTarget)`` of rank ``rank``'s share of a split: rows r, r+W, ... (``pad``: the same count on every rank)."""
        import pyarrow.compute as pc

        from rnnimg.manifest import absolute_uri, manifest_folder, read_table, shard_rows

        table = read_table(manifest_uri, MASK_COLUMNS, purpose="task 'segment'", project=True)
        table = table.filter(pc.and_(pc.equal(table["split"], split), pc.is_valid(table["mask_uri"])))
        base = manifest_folder(manifest_uri)
        rows = [(absolute_uri(v, base), MaskTarget(absolute_uri(m, base), config.frame_size))
                for v, m in zip(table["video_uri"].to_pylist(), table["mask_uri"].to_pylist()) if v and m]
        return shard_rows(rows, rank, world, pad)

    def clip_target(self, target: "MaskTarget", clip) -> np.ndarray:
        """uint8 (T, S, S) masks of the frames shown at the clip's timestamps, S = the model's frame size."""
        masks, times = load_masks(target.mask_uri)
        return masks_at(masks, times, clip.timestamps, target.frame_size)

    def augment(self, frames: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        return augment_clip(frames, target, rng)

    def permute_frames(self, frames: np.ndarray, target: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # A mask per frame: it moves with its frame, so the ablation removes order, not alignment.
        return frames[order], target[order]

    def blank_target(self, config: "SegmenterConfig") -> np.ndarray:
        return np.zeros((config.frames_per_clip, config.frame_size, config.frame_size), np.uint8)

    def loss(self, outputs, targets, config: "SegmenterConfig"):
        return loss_fn(outputs, targets, config.dice_weight)

    def batch_stats(self, outputs, targets, config: "SegmenterConfig", loss=None) -> dict:
        import torch

        logits = outputs.float().squeeze(2)  # (B, T, 1, H, W) -> (B, T, H, W)
        truth = targets.bool()
        predicted = logits > 0
        if loss is None:
            loss = loss_fn(outputs, targets, config.dice_weight)
        n = len(targets)
        return {
            "loss_sum": loss.detach().double() * n,
            "count": torch.tensor(n, device=targets.device),
            "intersection": (predicted & truth).sum((0, 2, 3)).double(),  # (B, T, H, W) -> (T,) pixels, per step
            "union": (predicted | truth).sum((0, 2, 3)).double(),  # (T,)
        }

    def summarize(self, stats: dict) -> dict:
        count = max(int(stats["count"]), 1)
        intersection, union = np.asarray(stats["intersection"], dtype=np.float64), np.asarray(stats["union"], dtype=np.float64)
        per_step = np.divide(intersection, union, out=np.ones_like(union), where=union > 0)
        return {
            "loss": float(stats["loss_sum"]) / count,
            "iou": float(intersection.sum() / union.sum()) if union.sum() else 1.0,
            "clips": int(stats["count"]),
            "iou_per_step": [round(float(v), 4) for v in per_step],
        }

    def evaluation(self, best_entry: dict, config: "SegmenterConfig") -> dict:
        return {"iou": best_entry.get("val_iou"), "loss": best_entry.get("val_loss"), "clips": best_entry.get("val_clips"),
                "iou_per_step": best_entry.get("val_iou_per_step"), "epoch": best_entry.get("epoch")}

    def write_report(self, model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: "SegmenterConfig", model_id: str, *,
                     manifest_uri: str | None = None):
        return write_report(model_uri, evaluation, history, best_metrics, config, model_id, manifest_uri=manifest_uri)

    # ------------------------------------------------------------------ labelling

    def needs_video(self, config: "SegmenterConfig") -> bool:
        # A spatial model sees one frame per clip and carries nothing across: it labels stills too.
        return bool(config.temporal) or config.frames_per_clip > 1

    def clip_columns(self) -> dict[str, tuple[str, object]]:
        return {"masks": ("object", "")}

    def predict(self, model, inputs, config: "SegmenterConfig") -> dict[str, np.ndarray]:
        logits = model(inputs)  # (N, T, 1, H, W)
        masks = (logits.float().squeeze(2) > 0).cpu().numpy()  # sigmoid > 0.5 <=> logit > 0; (N, T, H, W) bool
        return {"masks": np.array([clip_masks_json(m) for m in masks], dtype=object)}

    def tables(self) -> dict:
        return {"masks": tables.MASKS}

    def shard_rows(self, clips: list[dict], run: dict, min_segment_seconds: float) -> dict[str, list[dict]]:
        rows = []
        for clip in clips:
            if not clip.get("masks"):
                continue
            data = json.loads(clip["masks"])
            frames = data["frames"]
            step = (clip["end_s"] - clip["start_s"]) / len(frames)  # the rule of rnnimg.video.clips.frame_times
            for i, frame in enumerate(frames):
                rows.append({
                    "video_uri": clip["video_uri"], "clip_index": clip["clip_index"], "frame_time_s": clip["start_s"] + (i + 0.5) * step,
                    "height": data["height"], "width": data["width"], "rle": json.dumps(frame["counts"], separators=(",", ":")),
                    "area_fraction": frame["area_fraction"], "model_id": clip["model_id"], "run_id": clip["run_id"],
                })
        return {"masks": rows}
