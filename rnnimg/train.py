"""Train a CRNN: plain PyTorch epochs, and a thin Ray Train (TorchTrainer, DDP) wrapper.

    rnnimg train OUT/manifest.parquet --out runs/ --epochs 12 --workers 2 --name demo
    rnnimg train s3://bucket/manifest.parquet --out s3://bucket/runs --workers 16 --gpu \
        --batch-size 32 --loader-workers 6 --cpus-per-worker 7 --lr-schedule cosine --warmup-epochs 1

``train_one_epoch`` and ``evaluate`` are plain PyTorch and run without Ray. ``train`` runs
them in a ``TorchTrainer``: every worker reads its own shard of the manifest table from the
store (only three columns, filtered in Arrow), decodes random clips of its training videos on
the fly (optionally in DataLoader worker processes), DDP averages gradients, every epoch is
evaluated on the validation split and checkpointed to ``OUT/ray/<name>`` (a local folder or
``s3://``) with model, optimizer, scheduler, epoch and configs. A worker that dies is replaced
and the run continues from the last checkpoint (``max_failures``); rerunning a killed run with
the same ``--out`` and ``--name`` resumes it at the next epoch. The best checkpoint (by
validation accuracy) is exported to ``OUT/model``: ``model.safetensors``, ``config.json``,
``labels.json``, ``metrics.json`` (loading it runs no pickle), with the evaluation report
(``report.md``, ``confusion.png``, ``curves.png``; see ``rnnimg.evaluation``).

On GPUs: bf16 autocast (``precision``), channels-last convolutions, cuDNN LSTM/GRU, uint8
clips copied to the GPU and converted there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rnnimg import storage
from rnnimg.manifest import ManifestError, VideoRow, _absolute
from rnnimg.models.crnn import CRNN, CRNNConfig, load_backbone_weights, to_model_input
from rnnimg.video.clips import ClipSpec, random_clip, uniform_clips
from rnnimg.video.decode import VideoError, VideoReader

log = logging.getLogger("rnnimg.train")

MODEL_WEIGHTS = "model.safetensors"
LR_SCHEDULES = ("cosine", "step", "constant")
PRECISIONS = ("auto", "bf16", "fp32")
MIN_LR_FRACTION = 0.05  # where the cosine schedule ends, as a fraction of the peak learning rate
SHUFFLE_BUFFER = 64  # clips mixed across videos before batching (training only)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and scale of one training run. Saved next to every checkpoint."""

    epochs: int = 12  # passes over the training videos
    batch_size: int = 16  # clips per optimiser step, per worker
    lr: float = 3e-3  # peak AdamW learning rate
    lr_schedule: str = "cosine"  # after warmup: "cosine" (to 5% of lr), "step" (x0.1 at 50% and 75% of the run), "constant"
    warmup_epochs: float | None = None  # linear warmup, in epochs (fractions allowed, 0 = none); None: the first 5% of the run
    weight_decay: float = 0.05  # AdamW weight decay
    clips_per_video: int = 1  # random clips decoded from each training video per epoch
    augment: bool = False  # label-preserving jitter of training clips (colour, brightness, shift; never flip or time reversal)
    workers: int = 2  # Ray Train workers (processes, DDP)
    use_gpu: bool | None = None  # True: one GPU share per worker; False: CPU; None: GPUs if the Ray cluster has any
    gpus_per_worker: float = 1.0  # GPUs each worker reserves when on GPU (a fraction packs several workers on one GPU)
    cpus_per_worker: float | None = None  # CPUs each worker reserves; None: 1 + loader_workers
    loader_workers: int = 0  # decoding processes per worker (torch DataLoader); 0 decodes in the training process
    precision: str = "auto"  # "bf16" autocast, "fp32", or "auto": bf16 on GPU, fp32 on CPU
    seed: int = 0  # seeds model init and clip sampling
    shuffle_frames: bool = False  # ablation: shuffle frame order inside every clip (kills temporal order)
    keep_checkpoints: int = 2  # best-k checkpoints kept by validation accuracy
    max_failures: int = 2  # worker failures recovered from the last checkpoint before the run fails (-1: no limit)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "clips_per_video", "workers", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.warmup_epochs is not None and not 0 <= self.warmup_epochs < self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.use_gpu not in (True, False, None):
            raise ValueError(f"use_gpu must be True, False or None (auto), got {self.use_gpu!r}")
        if not self.gpus_per_worker > 0:
            raise ValueError(f"gpus_per_worker must be > 0, got {self.gpus_per_worker}")
        if self.cpus_per_worker is not None and not self.cpus_per_worker > 0:
            raise ValueError(f"cpus_per_worker must be > 0 (or None for 1 + loader_workers), got {self.cpus_per_worker}")
        if not isinstance(self.loader_workers, int) or self.loader_workers < 0:
            raise ValueError(f"loader_workers must be an integer >= 0, got {self.loader_workers!r}")
        if not isinstance(self.max_failures, int) or self.max_failures < -1:
            raise ValueError(f"max_failures must be an integer >= -1 (-1: no limit), got {self.max_failures!r}")

    @property
    def worker_cpus(self) -> float:
        """CPUs each Ray Train worker reserves."""
        return self.cpus_per_worker if self.cpus_per_worker is not None else 1.0 + self.loader_workers


# ----------------------------------------------------------------------------- manifest -> shard plan

MANIFEST_COLUMNS = ("video_uri", "label", "split")


def _manifest_columns(manifest_uri: str):
    """The manifest's ``video_uri``, ``label`` and ``split`` columns as an Arrow table of strings.

    A Parquet manifest is read for these three columns only.

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table is unreadable or lacks one of the columns.
    """
    import pyarrow as pa
    import pyarrow.csv as pacsv

    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no manifest at {manifest_uri}")
    try:
        if manifest_uri.lower().endswith(".csv"):
            table = pacsv.read_csv(pa.BufferReader(storage.read_bytes(manifest_uri)))
        else:
            try:
                table = storage.read_table(manifest_uri, columns=list(MANIFEST_COLUMNS))
            except pa.ArrowInvalid:
                table = storage.read_table(manifest_uri)  # a column is missing: read it all, to say which
    except pa.ArrowInvalid as err:
        raise ManifestError(f"{manifest_uri} is not a readable Parquet/CSV table: {str(err).splitlines()[0]}") from err
    missing = [c for c in MANIFEST_COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(f"manifest {manifest_uri} has no {missing} column(s) (columns: {table.column_names}); training needs {list(MANIFEST_COLUMNS)}")
    return pa.table({c: table.column(c).cast(pa.string()) for c in MANIFEST_COLUMNS})


def _split_rows(table, split: str):
    import pyarrow.compute as pc

    return table.filter(pc.and_(pc.equal(table["split"], split), pc.is_valid(table["label"])))


def manifest_overview(manifest_uri: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """Sorted label names of the labelled train/val rows, and the labelled row count per split.

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table lacks video_uri, label or split.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    table = _manifest_columns(manifest_uri)
    labelled = table.filter(pc.is_valid(table["label"]))
    counted = pc.value_counts(labelled["split"])
    counts = {str(k): int(v) for k, v in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())}
    fit = labelled.filter(pc.is_in(labelled["split"], value_set=pa.array(["train", "val"])))
    names = tuple(sorted(str(v) for v in pc.unique(fit["label"]).to_pylist()))
    return names, counts


def labelled_videos(manifest_uri: str, split: str, labels: tuple[str, ...], *, rank: int = 0, world: int = 1, pad: bool = False) -> list[tuple[str, int]]:
    """``(video_uri, class id)`` of one rank's share of a split's labelled manifest rows.

    Reads only the three columns it needs, filters them in Arrow, and turns into Python
    objects only this rank's share, so that with 10^5-10^6 videos no worker holds the others'
    rows and nothing passes through Ray's object store. Rank r gets rows r, r+W, r+2W, ...
    in table order; with ``pad`` every rank gets ``ceil(N / W)`` rows (wrapping around to the
    first ones), as DDP needs the same number of steps on every rank.

    Raises:
        ValueError: a row's label is not one of ``labels``.
    """
    table = _split_rows(_manifest_columns(manifest_uri), split)
    n = table.num_rows
    if n == 0:
        return []
    if pad:
        per_rank = math.ceil(n / world)
        indices = np.arange(rank, per_rank * world, world) % n
    else:
        indices = np.arange(rank, n, world)
    shard = table.take(indices)
    index = {name: i for i, name in enumerate(labels)}
    base = manifest_uri.rsplit("/", 1)[0] if storage.is_s3(manifest_uri) else os.path.dirname(storage.normalize(manifest_uri))
    out = []
    for uri, label in zip(shard["video_uri"].to_pylist(), shard["label"].to_pylist()):
        if label not in index:
            raise ValueError(f"manifest {manifest_uri}: label {label!r} of {uri} is not among the model's labels {list(labels)}")
        out.append((_absolute(uri, base), index[label]))
    return out


def shard_rows(rows: list, rank: int, world: int, pad: bool) -> list:
    """Rank's share of rows; with ``pad`` every rank gets the same count (wrapping around), as DDP needs."""
    if not pad:
        return rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    padded = (rows * math.ceil(per_rank * world / max(len(rows), 1)))[: per_rank * world]
    return padded[rank::world]


def _labelled_rows(rows: list[VideoRow], split: str, labels: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(video_uri, class id)`` of already-read manifest rows of one split (plain-PyTorch use)."""
    index = {name: i for i, name in enumerate(labels)}
    return [(r.video_uri, index[r.label]) for r in rows if r.split == split and r.label is not None]


# ----------------------------------------------------------------------------- decode -> clips -> batches


def clip_spec(model_config: CRNNConfig) -> ClipSpec:
    return ClipSpec(model_config.clip_seconds, model_config.frames_per_clip, model_config.stride_seconds)


def iter_clips(
    rows: list[tuple[str, int]],
    model_config: CRNNConfig,
    *,
    train: bool,
    rng: np.random.Generator,
    clips_per_video: int = 1,
    shuffle_frames: bool = False,
    augment: bool = False,
) -> Iterator[tuple[np.ndarray, int]]:
    """Decode clips of labelled videos: ``(uint8 (T, H, W, C), class id)``.

    Training draws ``clips_per_video`` random windows per video (in random video order);
    evaluation takes every uniform window. A video that fails to decode is logged and skipped
    here: training data quality is the manifest's business, not a reason to stop a run.
    """
    spec = clip_spec(model_config)
    size = (model_config.frame_size, model_config.frame_size)
    order = rng.permutation(len(rows)) if train else np.arange(len(rows))
    for i in order:
        uri, label = rows[i]
        try:
            with VideoReader(uri, size) as reader:
                if train:
                    starts = sorted(random_clip(reader.duration_s, spec, rng) for _ in range(clips_per_video))
                    plan = [c._replace(clip_index=k) for k, c in enumerate(starts)]
                else:
                    plan = uniform_clips(reader.duration_s, spec)
                for _, frames in reader.clips(plan):
                    if augment:
                        frames = augment_clip(frames, rng)
                    if shuffle_frames:
                        frames = frames[rng.permutation(len(frames))]
                    yield frames, label
        except VideoError as err:
            log.warning("skipping training video %s: %s", uri, err)


def augment_clip(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Label-preserving augmentation of one uint8 (T, H, W, C) clip, the same for every frame.

    Colour channels permuted, brightness and contrast jittered, a small translation. No flip
    and no time reversal: both turn a motion into another class.
    """
    t, h, w, c = frames.shape
    x = frames[..., rng.permutation(c)].astype(np.float32)
    x = (x - 128.0) * rng.uniform(0.7, 1.3) + 128.0 + rng.uniform(-25, 25)
    # Shift every frame alike, repeating the edge: wrapping around would make an object that
    # leaves one side re-enter at the other, which reads as motion the other way.
    dy, dx = (int(v) for v in rng.integers(-(h // 10), h // 10 + 1, 2))
    x = np.pad(x, ((0, 0), (abs(dy), abs(dy)), (abs(dx), abs(dx)), (0, 0)), mode="edge")
    x = x[:, abs(dy) + dy : abs(dy) + dy + h, abs(dx) + dx : abs(dx) + dx + w]  # back to (T, H, W, C)
    return np.clip(x, 0, 255).astype(np.uint8)


def iter_batches(clips: Iterable[tuple[np.ndarray, int]], batch_size: int, shuffle_buffer: int = 0, rng=None, *, uint8: bool = False):
    """Group clips into batches, optionally through a shuffle buffer.

    Yields ``(float (B, T, C, H, W), long (B,))`` model input, or with ``uint8`` the clips as
    they are, ``(uint8 (B, T, H, W, C), long (B,))``, to be converted where they are used
    (on the GPU: 4x fewer bytes to copy). The last batch may be smaller.
    """
    buffer: list[tuple[np.ndarray, int]] = []

    def emit(items):
        frames = np.stack([f for f, _ in items])  # B x (T, H, W, C) -> (B, T, H, W, C)
        labels = torch.tensor([y for _, y in items], dtype=torch.long)
        return (torch.from_numpy(frames) if uint8 else to_model_input(frames)), labels

    pending: list[tuple[np.ndarray, int]] = []
    for item in clips:
        if shuffle_buffer and rng is not None:
            buffer.append(item)
            if len(buffer) < shuffle_buffer:
                continue
            item = buffer.pop(int(rng.integers(len(buffer))))
        pending.append(item)
        if len(pending) == batch_size:
            yield emit(pending)
            pending = []
    if buffer:
        rng.shuffle(buffer)
        pending.extend(buffer)
    while len(pending) >= batch_size:
        yield emit(pending[:batch_size])
        pending = pending[batch_size:]
    if pending:
        yield emit(pending)


class ClipBatches(torch.utils.data.IterableDataset):
    """One epoch of uint8 clip batches, decoded in DataLoader worker processes.

    Loader process k of n decodes rows k, k+n, ... of the rank's shard with its own random
    generator (seeded by seed, epoch, rank, k), through its own shuffle buffer, and yields
    ``(uint8 (b, T, H, W, C), long (b,))`` with b <= batch_size; ``epoch_batches`` regroups
    them into full batches.
    """

    def __init__(self, rows: list[tuple[str, int]], model_config: CRNNConfig, train_config: TrainConfig, *, train: bool, seed: list[int]):
        super().__init__()
        self.rows, self.model_config, self.train_config, self.train, self.seed = rows, model_config, train_config, train, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tc = self.train_config
        rng = np.random.default_rng([*self.seed, worker])
        clips = iter_clips(self.rows[worker::workers], self.model_config, train=self.train, rng=rng, clips_per_video=tc.clips_per_video,
                           shuffle_frames=tc.shuffle_frames, augment=self.train and tc.augment)
        yield from iter_batches(clips, tc.batch_size, shuffle_buffer=SHUFFLE_BUFFER if self.train else 0, rng=rng, uint8=True)


def epoch_batches(rows: list[tuple[str, int]], model_config: CRNNConfig, train_config: TrainConfig, *, train: bool, epoch: int, rank: int = 0,
                  pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(uint8 (B, T, H, W, C), long (B,))`` batches of a rank's rows.

    Training clips are random windows, augmented, mixed through a shuffle buffer, drawn from a
    generator seeded by (seed, epoch, rank): an epoch redone after a failure sees the same
    clips. Evaluation clips are every uniform window, in row order. With
    ``train_config.loader_workers`` > 0, decoding runs in that many DataLoader processes.
    """
    tc = train_config
    seed = [tc.seed, epoch, rank] if train else [tc.seed, 10_000 + rank]
    if not rows:
        return
    if tc.loader_workers == 0:
        rng = np.random.default_rng(seed)
        clips = iter_clips(rows, model_config, train=train, rng=rng, clips_per_video=tc.clips_per_video, shuffle_frames=tc.shuffle_frames,
                           augment=train and tc.augment)
        yield from iter_batches(clips, tc.batch_size, shuffle_buffer=SHUFFLE_BUFFER if train else 0, rng=rng, uint8=True)
        return
    loader = torch.utils.data.DataLoader(
        ClipBatches(rows, model_config, tc, train=train, seed=seed),
        batch_size=None,  # the dataset yields batches already
        num_workers=min(tc.loader_workers, len(rows)),
        pin_memory=pin_memory,
        prefetch_factor=4,
    )
    yield from _rebatch(loader, tc.batch_size)


def _rebatch(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup batches of varying size into batches of ``batch_size`` (the last may be smaller)."""
    frames: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    held = 0
    for x, y in chunks:
        if not held and len(y) == batch_size:
            yield x, y
            continue
        frames.append(x)
        labels.append(y)
        held += len(y)
        while held >= batch_size:
            x_all, y_all = torch.cat(frames), torch.cat(labels)  # k x (b, T, H, W, C) -> (sum b, T, H, W, C)
            yield x_all[:batch_size], y_all[:batch_size]
            frames, labels = [x_all[batch_size:]], [y_all[batch_size:]]
            held -= batch_size
    if held:
        yield torch.cat(frames), torch.cat(labels)  # k x (b, T, H, W, C) -> (held, T, H, W, C)


# ----------------------------------------------------------------------------- plain PyTorch loop


def loss_fn(clip_logits: torch.Tensor, frame_logits: torch.Tensor, labels: torch.Tensor, frame_weight: float) -> torch.Tensor:
    """Clip cross-entropy plus the per-frame head's cross-entropy against the clip's label.

    The per-frame head at step t answers "what is happening so far". Its loss is weighted by
    t / (T - 1): zero at the first frame, where only memorising the video could answer, full
    at the last. Without the ramp the first-frame loss rewards recognising training videos by
    their background instead of learning the motion.
    """
    clip_logits, frame_logits = clip_logits.float(), frame_logits.float()
    b, t, k = frame_logits.shape
    per_frame = F.cross_entropy(
        frame_logits.reshape(b * t, k), labels[:, None].expand(b, t).reshape(-1), reduction="none"
    ).reshape(b, t)  # (B*T,) -> (B, T)
    ramp = torch.linspace(0.0, 1.0, t, device=frame_logits.device) if t > 1 else torch.ones(1, device=frame_logits.device)
    frame_loss = (per_frame * ramp).sum(1).mean() / ramp.sum()
    return F.cross_entropy(clip_logits, labels) + frame_weight * frame_loss


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device (None: plain float32).

    Raises:
        ValueError: an unknown precision.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16" or (precision == "auto" and torch.device(device).type == "cuda"):
        return torch.bfloat16
    return None


def _on_device(x: torch.Tensor, device) -> torch.Tensor:
    """A batch as model input on ``device``: uint8 (B, T, H, W, C) clips are copied, then converted there."""
    x = x.to(device, non_blocking=True)
    return to_model_input(x) if x.dtype == torch.uint8 else x  # (B, T, H, W, C) uint8 -> (B, T, C, H, W) float


def train_one_epoch(model, optimizer, batches, device, frame_weight: float, scheduler=None, *, amp_dtype: torch.dtype | None = None) -> dict:
    """One pass over ``batches``; returns summed loss, correct and clip counts.

    Args:
        batches: ``(clips, labels)`` with clips float (B, T, C, H, W) or uint8 (B, T, H, W, C).
        amp_dtype: autocast dtype (``torch.bfloat16``) or None for float32.
    """
    model.train()
    device_type = torch.device(device).type
    # Sums stay on the device: reading them every step would make the CPU wait for the GPU.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = 0
    for x, y in batches:
        x, y = _on_device(x, device), y.to(device, non_blocking=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            clip_logits, frame_logits = model(x)
            loss = loss_fn(clip_logits, frame_logits, y, frame_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().double() * len(y)
        correct += (clip_logits.argmax(1) == y).sum()
        count += len(y)
    return {"loss_sum": float(loss_sum), "correct": int(correct), "count": count}


@torch.inference_mode()
def evaluate(model, batches, device, num_classes: int, *, amp_dtype: torch.dtype | None = None) -> dict:
    """Clip accuracy, loss and confusion counts (rows: truth, columns: prediction)."""
    model.eval()
    device_type = torch.device(device).type
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
    count = 0
    for x, y in batches:
        x, y = _on_device(x, device), y.to(device, non_blocking=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            clip_logits, _ = model(x)
        clip_logits = clip_logits.float()
        loss_sum += F.cross_entropy(clip_logits, y, reduction="sum").double()
        confusion += torch.bincount(y * num_classes + clip_logits.argmax(1), minlength=num_classes**2)
        count += len(y)
    return {"loss_sum": float(loss_sum), "count": count, "confusion": confusion.cpu().reshape(num_classes, num_classes)}  # (K*K,) -> (K, K)


def summarize(stats: dict) -> dict:
    count = max(int(stats["count"]), 1)
    out = {"loss": stats["loss_sum"] / count, "clips": int(stats["count"])}
    if "confusion" in stats:
        conf = stats["confusion"]
        out["acc"] = float(conf.diag().sum()) / count
        out["confusion"] = conf.tolist()
    else:
        out["acc"] = stats["correct"] / count
    return out


def lr_multiplier(schedule: str, step: int, steps_total: int, warmup_steps: int) -> float:
    """Learning rate at optimiser step ``step`` as a fraction of the peak.

    Linear warmup over ``warmup_steps``, then ``cosine`` (to MIN_LR_FRACTION at the end),
    ``step`` (x0.1 at 50% and again at 75% of the steps after warmup) or ``constant``.
    """
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps_total - warmup_steps))
    if schedule == "cosine":
        return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "step":
        return 0.1 ** ((progress >= 0.5) + (progress >= 0.75))
    return 1.0  # constant


def make_optimizer(model, train_config: TrainConfig, steps_total: int):
    """AdamW and its per-step learning-rate schedule (``train_config.lr_schedule`` after warmup).

    ``steps_total`` is the optimiser steps of the whole run (``epochs`` x steps per epoch).
    """
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    if train_config.warmup_epochs is None:
        warmup = max(1, steps_total // 20)
    else:
        warmup = round(train_config.warmup_epochs * steps_total / train_config.epochs)
    schedule = train_config.lr_schedule
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(schedule, step, steps_total, warmup))


# ----------------------------------------------------------------------------- Ray Train wrapper


def _save_state(directory: str, model, optimizer, scheduler, epoch: int, resumes: int, history: list, model_config: CRNNConfig,
                train_config: TrainConfig) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "resumes": resumes,
    }
    torch.save(state, os.path.join(directory, "state.pt"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(model_config.to_json())
    with open(os.path.join(directory, "labels.json"), "w") as f:
        json.dump(list(model_config.labels), f)
    with open(os.path.join(directory, "train_config.json"), "w") as f:
        json.dump(asdict(train_config), f, indent=2)
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(history, f, indent=2)


def _restore(checkpoint) -> tuple[dict | None, list]:
    """The state dict and history of a Ray checkpoint (None, [] when starting fresh)."""
    if checkpoint is None:
        return None, []
    with checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
        with open(os.path.join(directory, "history.json")) as f:
            history = json.load(f)
    return state, history


def train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: read its shard, restore, train, evaluate, report, checkpoint on rank 0."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    model_config = CRNNConfig.from_dict(loop_config["model_config"])
    train_config = TrainConfig(**loop_config["train_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(train_config.precision, device)
    torch.manual_seed(train_config.seed)

    manifest = loop_config["manifest_uri"]
    train_rows = labelled_videos(manifest, "train", model_config.labels, rank=rank, world=world, pad=True)
    val_rows = labelled_videos(manifest, "val", model_config.labels, rank=rank, world=world, pad=False)
    steps_per_epoch = math.ceil(len(train_rows) * train_config.clips_per_video / train_config.batch_size)

    model = CRNN(model_config)
    state, history = _restore(ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
    elif model_config.backbone_weights:
        load_backbone_weights(model, model_config.backbone_weights)
    if device.type == "cuda":
        model.use_channels_last()
        torch.backends.cudnn.benchmark = True
    # Move (and wrap in DDP) before the optimizer exists, so that its restored state lands on the device too.
    model = ray.train.torch.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model
    optimizer, scheduler = make_optimizer(plain_model, train_config, steps_per_epoch * train_config.epochs)
    start_epoch, resumes = 0, 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, resumes = int(state["epoch"]) + 1, int(state.get("resumes", 0)) + 1
        if rank == 0 and start_epoch < train_config.epochs:
            log.warning("resuming run at epoch %d from the checkpoint of epoch %d (resume %d)", start_epoch, start_epoch - 1, resumes)
        elif rank == 0:
            log.warning("the run already trained its %d epochs: nothing to train", train_config.epochs)

    for epoch in range(start_epoch, train_config.epochs):
        started = time.perf_counter()
        batches = epoch_batches(train_rows, model_config, train_config, train=True, epoch=epoch, rank=rank, pin_memory=device.type == "cuda")
        # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
        train_stats = train_one_epoch(model, optimizer, _exactly(batches, steps_per_epoch), device, model_config.frame_loss_weight, scheduler,
                                      amp_dtype=amp_dtype)
        train_seconds = time.perf_counter() - started
        val_batches = epoch_batches(val_rows, model_config, train_config, train=False, epoch=epoch, rank=rank, pin_memory=device.type == "cuda")
        val_stats = evaluate(plain_model, val_batches, device, model_config.num_classes, amp_dtype=amp_dtype)
        train_stats, val_stats = _all_reduce(train_stats, device, dist), _all_reduce(val_stats, device, dist)
        train_summary, val_summary = summarize(train_stats), summarize(val_stats)
        metrics = {
            "epoch": epoch,
            "train_loss": train_summary["loss"],
            "train_acc": train_summary["acc"],
            "val_loss": val_summary["loss"],
            "val_acc": val_summary["acc"],
            "val_clips": val_summary["clips"],
            "lr": scheduler.get_last_lr()[0],
            "train_clips": train_summary["clips"],
            "train_clips_per_s": train_summary["clips"] / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
            "resumes": resumes,
        }
        history.append({**metrics, "val_confusion": val_summary["confusion"]})
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                _save_state(directory, plain_model, optimizer, scheduler, epoch, resumes, history, model_config, train_config)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=f"epoch-{epoch:04d}")
        else:
            ray.train.report(metrics)


def _exactly(batches, count: int):
    """Exactly ``count`` batches: stop early, or repeat the last batch to fill up (when videos failed)."""
    produced, last = 0, None
    for batch in batches:
        if produced == count:
            return
        produced, last = produced + 1, batch
        yield batch
    while last is not None and produced < count:
        produced += 1
        yield last


def _all_reduce(stats: dict, device, dist) -> dict:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    out = dict(stats)
    scalars = torch.tensor([float(stats["loss_sum"]), float(stats.get("correct", 0)), float(stats["count"])], dtype=torch.float64, device=device)
    dist.all_reduce(scalars)
    out["loss_sum"], out["correct"], out["count"] = float(scalars[0]), int(scalars[1]), int(scalars[2])
    if "confusion" in stats:
        confusion = stats["confusion"].to(device)
        dist.all_reduce(confusion)
        out["confusion"] = confusion.cpu()
    return out


@dataclass(frozen=True)
class TrainResult:
    model_uri: str  # the exported model folder
    run_uri: str  # Ray Train's run folder (checkpoints)
    metrics: dict  # the best epoch's metrics
    history: list  # every epoch's metrics
    report_uri: str = ""  # the evaluation report (report.md) in the model folder
    evaluation: dict = field(default_factory=dict)  # accuracy, per-class precision/recall/F1 of the best epoch (validation split)
    report_markdown: str = ""  # the report's text, to print


def _resolve_use_gpu(train_config: TrainConfig, local: bool) -> bool:
    """Whether this run uses GPUs: as asked, or (auto) when the Ray cluster has any.

    Raises:
        ValueError: GPUs asked for on a local Ray without any (it would wait forever).
    """
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    if train_config.use_gpu is None:
        return gpus > 0
    if train_config.use_gpu and gpus == 0:
        if local:
            raise ValueError("GPU training was asked for (--gpu / use_gpu=True), but the local Ray sees no GPU; drop --gpu or run on a GPU machine")
        log.warning("the Ray cluster has no GPU now: the run waits until the cluster scales up to %d GPU worker(s)", train_config.workers)
    return bool(train_config.use_gpu)


def train(
    manifest_uri: str,
    out: str,
    name: str = "crnn",
    train_config: TrainConfig = TrainConfig(),
    model_config: CRNNConfig | None = None,
    ray_address: str | None = None,
) -> TrainResult:
    """Train on the manifest's ``train`` split, validate on ``val``, export the best model and its report.

    Args:
        manifest_uri: a manifest table with ``video_uri``, ``label``, ``split``; only its URI
            travels to the workers, each reads its own shard.
        out: where runs and the exported model go (local folder or ``s3://``).
        name: run name; rerunning with the same ``out`` and ``name`` resumes at the epoch after
            the last checkpoint (a finished run is only exported again).
        model_config: architecture; its labels default to the manifest's sorted label names.
        ray_address: a Ray cluster; default ``RAY_ADDRESS``, else a local Ray in this process.

    Raises:
        ValueError: the manifest has no labelled train or val rows, or unknown labels; GPUs
            asked for where there are none.
        FileNotFoundError: no manifest, or no backbone weights file where the config says.
        BackboneUnavailable: a torchvision backbone without torchvision.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from rnnimg import evaluation
    from rnnimg.models.crnn import TORCHVISION_BACKBONES, import_torchvision
    from rnnimg.runtime import ensure_ray

    names, counts = manifest_overview(manifest_uri)
    if model_config is None:
        if len(names) < 2:
            raise ValueError(f"manifest {manifest_uri} needs labelled train/val rows of at least 2 classes, found {list(names)}")
        model_config = CRNNConfig(labels=names)
    unknown = set(names) - set(model_config.labels)
    if unknown:
        raise ValueError(f"manifest labels {sorted(unknown)} are not among the model's labels {list(model_config.labels)}")
    if not counts.get("train") or not counts.get("val"):
        raise ValueError(f"manifest {manifest_uri} needs labelled rows with split 'train' and 'val' (found {counts.get('train', 0)} train, {counts.get('val', 0)} val)")
    if model_config.backbone in TORCHVISION_BACKBONES:
        import_torchvision(model_config.backbone)  # fail here, in one line, not in every worker
    if model_config.backbone_weights and not storage.exists(model_config.backbone_weights):
        raise FileNotFoundError(f"no backbone weights file at {model_config.backbone_weights}")
    name = storage.safe_key(name)
    ensure_ray(ray_address)
    local = not (ray_address or os.environ.get("RAY_ADDRESS"))
    train_config = dataclasses.replace(train_config, use_gpu=_resolve_use_gpu(train_config, local))

    runs = storage.join(out, "ray")
    if storage.is_s3(runs):
        fs, path = storage.resolve(runs)
        storage_kwargs = {"storage_path": path, "storage_filesystem": fs}
    else:
        storage.makedirs(runs)
        storage_kwargs = {"storage_path": storage.normalize(runs)}
    run_config = ray.train.RunConfig(
        name=name,
        **storage_kwargs,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=train_config.keep_checkpoints, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
        ),
        failure_config=ray.train.FailureConfig(max_failures=train_config.max_failures),
    )
    resources = {"CPU": train_config.worker_cpus}
    if train_config.use_gpu:
        resources["GPU"] = train_config.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model_config": json.loads(model_config.to_json()),
            "train_config": asdict(train_config),
            "manifest_uri": manifest_uri if storage.is_s3(manifest_uri) else storage.normalize(manifest_uri),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=train_config.workers, use_gpu=train_config.use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )
    result = trainer.fit()
    best_checkpoint, best_metrics = _best(result)
    model_uri = storage.join(out, "model")
    # The best checkpoint may be an early one: the full history is in the latest.
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "history.json")) as f:
            history = json.load(f)
    best_epoch = int(best_metrics.get("epoch", -1))
    best_entry = next((h for h in reversed(history) if h.get("epoch") == best_epoch), history[-1])
    summary = evaluation.classification_summary(best_entry["val_confusion"], model_config.labels)
    with best_checkpoint.as_directory() as directory:
        model_id = export_model(directory, model_uri, best_metrics, history, evaluation=summary)
    report = evaluation.write_report(model_uri, summary, history, best_metrics, model_config.labels, model_id=model_id)
    return TrainResult(model_uri=model_uri, run_uri=storage.join(runs, name), metrics=best_metrics, history=history,
                       report_uri=report.report_uri, evaluation=summary, report_markdown=report.markdown)


def _best(result):
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training produced no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    # Highest validation accuracy; ties go to the lower validation loss.
    checkpoint, metrics = max(candidates, key=lambda cm: (cm[1].get("val_acc", 0.0), -cm[1].get("val_loss", 0.0)))
    return checkpoint, dict(metrics)


def export_model(checkpoint_dir: str, model_uri: str, metrics: dict, history: list, evaluation: dict | None = None) -> str:
    """Write a checkpoint's model as ``model.safetensors`` + ``config.json`` + ``labels.json`` + ``metrics.json``.

    Args:
        evaluation: the best epoch's classification summary, stored in metrics.json.

    Returns:
        The model id: the first 16 hex digits of the weights' SHA-256.
    """
    from safetensors.torch import save

    state = torch.load(os.path.join(checkpoint_dir, "state.pt"), map_location="cpu", weights_only=True)
    with open(os.path.join(checkpoint_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(checkpoint_dir, "train_config.json")) as f:
        train_config = json.load(f)
    weights = save({k: v.contiguous() for k, v in state["model"].items()})
    model_id = hashlib.sha256(weights).hexdigest()[:16]
    storage.write_bytes(storage.join(model_uri, MODEL_WEIGHTS), weights)
    storage.write_json(storage.join(model_uri, "config.json"), config)
    storage.write_json(storage.join(model_uri, "labels.json"), list(config["labels"]))
    clean = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    record = {"model_id": model_id, "best": clean, "history": history, "train_config": train_config}
    if evaluation is not None:
        record["evaluation"] = evaluation
    storage.write_json(storage.join(model_uri, "metrics.json"), record)
    return model_id


def load_model(model_uri: str, device: str | torch.device = "cpu") -> tuple[CRNN, CRNNConfig, str]:
    """Load an exported model folder (any store URL) without unpickling anything.

    Returns:
        (model in eval mode, its config, model_id = first 16 hex digits of the weights' SHA-256).

    Raises:
        FileNotFoundError: the folder lacks model.safetensors or config.json.
    """
    from safetensors.torch import load

    weights_uri = storage.join(model_uri, MODEL_WEIGHTS)
    if not storage.exists(weights_uri):
        raise FileNotFoundError(f"no exported model at {model_uri} (missing {MODEL_WEIGHTS})")
    weights = storage.read_bytes(weights_uri)
    config = CRNNConfig.from_dict(storage.read_json(storage.join(model_uri, "config.json")))
    model = CRNN(config)
    model.load_state_dict(load(weights))
    model.to(device).eval()
    return model, config, hashlib.sha256(weights).hexdigest()[:16]
