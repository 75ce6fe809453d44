"""Train a CRNN: plain PyTorch epochs, and a thin Ray Train (TorchTrainer, DDP) wrapper.

    rnnimg train OUT/manifest.parquet --out runs/ --epochs 12 --workers 2 --name demo

``train_one_epoch`` and ``evaluate`` are plain PyTorch and run without Ray. ``train`` runs
them in a ``TorchTrainer``: every worker decodes random clips of its shard of the training
videos on the fly, DDP averages gradients, every epoch is evaluated on the validation split
and checkpointed to ``OUT/ray/<name>`` (a local folder or ``s3://``). Rerunning with the same
``--out`` and ``--name`` resumes from the last checkpoint. The best checkpoint (by validation
accuracy) is exported to ``OUT/model``: ``model.safetensors``, ``config.json``,
``labels.json``, ``metrics.json`` (loading it runs no pickle).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from rnnimg import storage
from rnnimg.manifest import VideoRow, read_manifest
from rnnimg.models.crnn import CRNN, CRNNConfig, to_model_input
from rnnimg.video.clips import ClipSpec, random_clip, uniform_clips
from rnnimg.video.decode import VideoError, VideoReader

log = logging.getLogger("rnnimg.train")

MODEL_WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and scale of one training run."""

    epochs: int = 12  # passes over the training videos
    batch_size: int = 16  # clips per optimiser step, per worker
    lr: float = 3e-3  # peak AdamW learning rate (cosine decay to 5% over the run)
    weight_decay: float = 0.05  # AdamW weight decay
    clips_per_video: int = 1  # random clips decoded from each training video per epoch
    workers: int = 2  # Ray Train workers (processes, DDP)
    use_gpu: bool = False  # one GPU per worker
    seed: int = 0  # seeds model init and clip sampling
    shuffle_frames: bool = False  # ablation: shuffle frame order inside every clip (kills temporal order)
    keep_checkpoints: int = 2  # best-k checkpoints kept by validation accuracy

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "clips_per_video", "workers", "keep_checkpoints"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


# ----------------------------------------------------------------------------- data


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


def iter_batches(clips: Iterator[tuple[np.ndarray, int]], batch_size: int, shuffle_buffer: int = 0, rng=None):
    """Group clips into ``(float (B, T, C, H, W), long (B,))`` batches, optionally through a shuffle buffer."""
    buffer: list[tuple[np.ndarray, int]] = []

    def emit(items):
        frames = np.stack([f for f, _ in items])  # B x (T, H, W, C) -> (B, T, H, W, C)
        return to_model_input(frames), torch.tensor([y for _, y in items], dtype=torch.long)

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


def loss_fn(clip_logits: torch.Tensor, frame_logits: torch.Tensor, labels: torch.Tensor, frame_weight: float) -> torch.Tensor:
    """Clip cross-entropy plus the per-frame head's cross-entropy against the clip's label.

    The per-frame head at step t answers "what is happening so far". Its loss is weighted by
    t / (T - 1): zero at the first frame, where only memorising the video could answer, full
    at the last. Without the ramp the first-frame loss rewards recognising training videos by
    their background instead of learning the motion.
    """
    b, t, k = frame_logits.shape
    per_frame = F.cross_entropy(
        frame_logits.reshape(b * t, k), labels[:, None].expand(b, t).reshape(-1), reduction="none"
    ).reshape(b, t)  # (B*T,) -> (B, T)
    ramp = torch.linspace(0.0, 1.0, t, device=frame_logits.device) if t > 1 else torch.ones(1, device=frame_logits.device)
    frame_loss = (per_frame * ramp).sum(1).mean() / ramp.sum()
    return F.cross_entropy(clip_logits, labels) + frame_weight * frame_loss


# ----------------------------------------------------------------------------- plain PyTorch loop


def train_one_epoch(model, optimizer, batches, device, frame_weight: float, scheduler=None) -> dict:
    """One pass over ``batches``; returns summed loss, correct and clip counts."""
    model.train()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        clip_logits, frame_logits = model(x)
        loss = loss_fn(clip_logits, frame_logits, y, frame_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += float(loss.detach()) * len(y)
        correct += int((clip_logits.argmax(1) == y).sum())
        count += len(y)
    return {"loss_sum": loss_sum, "correct": correct, "count": count}


@torch.inference_mode()
def evaluate(model, batches, device, num_classes: int) -> dict:
    """Clip accuracy, loss and confusion counts (rows: truth, columns: prediction)."""
    model.eval()
    loss_sum, count = 0.0, 0
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        clip_logits, _ = model(x)
        loss_sum += float(F.cross_entropy(clip_logits, y, reduction="sum"))
        pred = clip_logits.argmax(1)
        confusion += torch.bincount((y * num_classes + pred).cpu(), minlength=num_classes**2).reshape(num_classes, num_classes)
        count += len(y)
    return {"loss_sum": loss_sum, "count": count, "confusion": confusion}


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


def make_optimizer(model, train_config: TrainConfig, steps_total: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    warmup = max(1, steps_total // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, steps_total - warmup))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def shard_rows(rows: list, rank: int, world: int, pad: bool) -> list:
    """Rank's share of rows; with ``pad`` every rank gets the same count (wrapping around), as DDP needs."""
    if not pad:
        return rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    padded = (rows * math.ceil(per_rank * world / max(len(rows), 1)))[: per_rank * world]
    return padded[rank::world]


# ----------------------------------------------------------------------------- Ray Train wrapper


def _save_state(directory: str, model, optimizer, scheduler, epoch: int, history: list, model_config: CRNNConfig, train_config: TrainConfig) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
    }
    torch.save(state, os.path.join(directory, "state.pt"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        f.write(model_config.to_json())
    with open(os.path.join(directory, "train_config.json"), "w") as f:
        json.dump(asdict(train_config), f, indent=2)
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(history, f, indent=2)


def train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: shard, train, evaluate, report, checkpoint on rank 0."""
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    model_config = CRNNConfig.from_dict(loop_config["model_config"])
    train_config = TrainConfig(**loop_config["train_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(train_config.seed)

    train_rows = shard_rows(loop_config["train_rows"], rank, world, pad=True)
    val_rows = shard_rows(loop_config["val_rows"], rank, world, pad=False)
    batches_per_epoch = math.ceil(len(train_rows) * train_config.clips_per_video / train_config.batch_size)

    model = CRNN(model_config)
    optimizer, scheduler = make_optimizer(model, train_config, batches_per_epoch * train_config.epochs)
    start_epoch, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, "state.pt"), map_location="cpu", weights_only=True)
            with open(os.path.join(directory, "history.json")) as f:
                history = json.load(f)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch = int(state["epoch"]) + 1
    model = ray.train.torch.prepare_model(model)
    plain_model = model.module if hasattr(model, "module") else model

    for epoch in range(start_epoch, train_config.epochs):
        started = time.perf_counter()
        rng = np.random.default_rng([train_config.seed, epoch, rank])
        clips = iter_clips(train_rows, model_config, train=True, rng=rng, clips_per_video=train_config.clips_per_video, shuffle_frames=train_config.shuffle_frames)
        batches = iter_batches(clips, train_config.batch_size, shuffle_buffer=64, rng=rng)
        # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
        batches = _exactly(batches, batches_per_epoch)
        train_stats = train_one_epoch(model, optimizer, batches, device, model_config.frame_loss_weight, scheduler)
        val_rng = np.random.default_rng([train_config.seed, 10_000 + rank])
        val_clips = iter_clips(val_rows, model_config, train=False, rng=val_rng, shuffle_frames=train_config.shuffle_frames)
        val_stats = evaluate(plain_model, iter_batches(val_clips, train_config.batch_size), device, model_config.num_classes)
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
            "epoch_seconds": time.perf_counter() - started,
        }
        history.append({**metrics, "val_confusion": val_summary["confusion"]})
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                _save_state(directory, plain_model, optimizer, scheduler, epoch, history, model_config, train_config)
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


def _labelled_rows(rows: list[VideoRow], split: str, labels: tuple[str, ...]) -> list[tuple[str, int]]:
    index = {name: i for i, name in enumerate(labels)}
    return [(r.video_uri, index[r.label]) for r in rows if r.split == split and r.label is not None]


def train(
    manifest_uri: str,
    out: str,
    name: str = "crnn",
    train_config: TrainConfig = TrainConfig(),
    model_config: CRNNConfig | None = None,
    ray_address: str | None = None,
) -> TrainResult:
    """Train on the manifest's ``train`` split, validate on ``val``, export the best model.

    Args:
        manifest_uri: a manifest table with ``video_uri``, ``label``, ``split``.
        out: where runs and the exported model go (local folder or ``s3://``).
        name: run name; rerunning with the same ``out`` and ``name`` resumes.
        model_config: architecture; its labels default to the manifest's sorted label names.

    Raises:
        ValueError: the manifest has no labelled train or val rows, or unknown labels.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from rnnimg.runtime import ensure_ray

    rows = read_manifest(manifest_uri)
    names = sorted({r.label for r in rows if r.label is not None and r.split in ("train", "val")})
    if model_config is None:
        if len(names) < 2:
            raise ValueError(f"manifest {manifest_uri} needs labelled train/val rows of at least 2 classes, found {names}")
        model_config = CRNNConfig(labels=tuple(names))
    unknown = set(names) - set(model_config.labels)
    if unknown:
        raise ValueError(f"manifest labels {sorted(unknown)} are not among the model's labels {list(model_config.labels)}")
    train_rows = _labelled_rows(rows, "train", model_config.labels)
    val_rows = _labelled_rows(rows, "val", model_config.labels)
    if not train_rows or not val_rows:
        raise ValueError(f"manifest {manifest_uri} needs rows with split 'train' and 'val' (found {len(train_rows)} train, {len(val_rows)} val)")
    name = storage.safe_key(name)
    ensure_ray(ray_address)

    runs = storage.join(out, "ray")
    if storage.is_s3(runs):
        fs, path = storage.resolve(runs)
        run_config = ray.train.RunConfig(name=name, storage_path=path, storage_filesystem=fs)
    else:
        storage.makedirs(runs)
        run_config = ray.train.RunConfig(name=name, storage_path=storage.normalize(runs))
    run_config = ray.train.RunConfig(
        name=run_config.name,
        storage_path=run_config.storage_path,
        storage_filesystem=run_config.storage_filesystem,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=train_config.keep_checkpoints, checkpoint_score_attribute="val_acc", checkpoint_score_order="max"
        ),
        failure_config=ray.train.FailureConfig(max_failures=2),
    )
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "model_config": json.loads(model_config.to_json()),
            "train_config": asdict(train_config),
            "train_rows": train_rows,
            "val_rows": val_rows,
        },
        scaling_config=ray.train.ScalingConfig(num_workers=train_config.workers, use_gpu=train_config.use_gpu),
        run_config=run_config,
    )
    result = trainer.fit()
    best_checkpoint, best_metrics = _best(result)
    model_uri = storage.join(out, "model")
    # The best checkpoint may be an early one: the full history is in the latest.
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, "history.json")) as f:
            history = json.load(f)
    with best_checkpoint.as_directory() as directory:
        export_model(directory, model_uri, best_metrics, history)
    return TrainResult(model_uri=model_uri, run_uri=storage.join(runs, name), metrics=best_metrics, history=history)


def _best(result):
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training produced no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    # Highest validation accuracy; ties go to the lower validation loss.
    checkpoint, metrics = max(candidates, key=lambda cm: (cm[1].get("val_acc", 0.0), -cm[1].get("val_loss", 0.0)))
    return checkpoint, dict(metrics)


def export_model(checkpoint_dir: str, model_uri: str, metrics: dict, history: list) -> str:
    """Write a checkpoint's model as ``model.safetensors`` + ``config.json`` + ``labels.json`` + ``metrics.json``.

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
    storage.write_json(storage.join(model_uri, "metrics.json"), {"model_id": model_id, "best": clean, "history": history, "train_config": train_config})
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
