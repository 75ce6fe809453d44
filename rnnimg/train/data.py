"""The clip stream of training: manifest rows -> decoded clips -> batches, whatever the task.

Rows are ``(video_uri, target)`` (the task's ``training_rows``). Training draws random clip
windows per video, lets the task augment them and mixes them across videos through a shuffle
buffer; evaluation takes every uniform window in row order. Clips come out of the decoder as
uint8 (T, H, W, C) and are batched as uint8 (B, T, H, W, C), converted to float model input
where they are used (on the GPU: 4x fewer bytes to copy).
"""

from __future__ import annotations

import logging
from typing import Iterable, Iterator

import numpy as np
import torch

from rnnimg.models.layout import to_model_input
from rnnimg.tasks import Task
from rnnimg.train.config import TrainConfig
from rnnimg.video.clips import ClipSpec, random_clip, uniform_clips
from rnnimg.video.decode import VideoError, VideoReader

log = logging.getLogger("rnnimg.train")

SHUFFLE_BUFFER = 64  # clips mixed across videos before batching (training only)


def clip_spec(model_config) -> ClipSpec:
    """The clip plan of a model config (every task's config has these four fields)."""
    return ClipSpec(model_config.clip_seconds, model_config.frames_per_clip, model_config.stride_seconds)


def iter_clips(
    rows: list[tuple[str, object]],
    task: Task,
    model_config,
    *,
    train: bool,
    rng: np.random.Generator,
    clips_per_video: int = 1,
    shuffle_frames: bool = False,
    augment: bool = False,
) -> Iterator[tuple[np.ndarray, object]]:
    """Decode clips of the rows' videos: ``(uint8 (T, H, W, C), the clip's target)``.

    Training draws ``clips_per_video`` random windows per video (in random video order);
    evaluation takes every uniform window. A video that fails to decode is logged and skipped
    here: training data quality is the manifest's business, not a reason to stop a run.
    ``shuffle_frames`` is the ablation that destroys temporal order.
    """
    spec = clip_spec(model_config)
    size = (model_config.frame_size, model_config.frame_size)
    order = rng.permutation(len(rows)) if train else np.arange(len(rows))
    for i in order:
        uri, target = rows[i]
        try:
            with VideoReader(uri, size) as reader:
                if train:
                    starts = sorted(random_clip(reader.duration_s, spec, rng) for _ in range(clips_per_video))
                    plan = [c._replace(clip_index=k) for k, c in enumerate(starts)]
                else:
                    plan = uniform_clips(reader.duration_s, spec)
                for clip, frames in reader.clips(plan):
                    clip_target = task.clip_target(target, clip)
                    if augment:
                        frames, clip_target = task.augment(frames, clip_target, rng)
                    if shuffle_frames:
                        frames, clip_target = task.permute_frames(frames, clip_target, rng.permutation(len(frames)))
                    yield frames, clip_target
        except VideoError as err:
            log.warning("skipping training video %s: %s", uri, err)


def iter_batches(clips: Iterable[tuple[np.ndarray, object]], batch_size: int, shuffle_buffer: int = 0, rng=None, *, uint8: bool = False):
    """Group clips into batches, optionally through a shuffle buffer.

    Yields ``(float (B, T, C, H, W), targets (B, ...))`` model input, or with ``uint8`` the clips
    as they are, ``(uint8 (B, T, H, W, C), targets)``. Targets are stacked into one tensor
    (class ids: int64 (B,)). The last batch may be smaller.
    """
    buffer: list[tuple[np.ndarray, object]] = []

    def emit(items):
        frames = np.stack([f for f, _ in items])  # B x (T, H, W, C) -> (B, T, H, W, C)
        targets = torch.as_tensor(np.stack([np.asarray(y) for _, y in items]))  # B x (...) -> (B, ...)
        return (torch.from_numpy(frames) if uint8 else to_model_input(frames)), targets

    pending: list[tuple[np.ndarray, object]] = []
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
    ``(uint8 (b, T, H, W, C), targets (b, ...))`` with b <= batch_size; ``epoch_batches``
    regroups them into full batches.
    """

    def __init__(self, rows: list, task: Task, model_config, train_config: TrainConfig, *, train: bool, seed: list[int]):
        super().__init__()
        self.rows, self.task, self.model_config, self.train_config, self.train, self.seed = rows, task, model_config, train_config, train, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        tc = self.train_config
        rng = np.random.default_rng([*self.seed, worker])
        clips = iter_clips(self.rows[worker::workers], self.task, self.model_config, train=self.train, rng=rng,
                           clips_per_video=tc.clips_per_video, shuffle_frames=tc.shuffle_frames, augment=self.train and tc.augment)
        yield from iter_batches(clips, tc.batch_size, shuffle_buffer=SHUFFLE_BUFFER if self.train else 0, rng=rng, uint8=True)


def epoch_batches(rows: list, task: Task, model_config, train_config: TrainConfig, *, train: bool, epoch: int, rank: int = 0,
                  pin_memory: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(uint8 (B, T, H, W, C), targets (B, ...))`` batches of a rank's rows.

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
        clips = iter_clips(rows, task, model_config, train=train, rng=rng, clips_per_video=tc.clips_per_video,
                           shuffle_frames=tc.shuffle_frames, augment=train and tc.augment)
        yield from iter_batches(clips, tc.batch_size, shuffle_buffer=SHUFFLE_BUFFER if train else 0, rng=rng, uint8=True)
        return
    loader = torch.utils.data.DataLoader(
        ClipBatches(rows, task, model_config, tc, train=train, seed=seed),
        batch_size=None,  # the dataset yields batches already
        num_workers=min(tc.loader_workers, len(rows)),
        pin_memory=pin_memory,
        prefetch_factor=4,
    )
    yield from rebatch(loader, tc.batch_size)


def rebatch(chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Regroup batches of varying size into batches of ``batch_size`` (the last may be smaller)."""
    frames: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    held = 0
    for x, y in chunks:
        if not held and len(y) == batch_size:
            yield x, y
            continue
        frames.append(x)
        targets.append(y)
        held += len(y)
        while held >= batch_size:
            x_all, y_all = torch.cat(frames), torch.cat(targets)  # k x (b, T, H, W, C) -> (sum b, T, H, W, C)
            yield x_all[:batch_size], y_all[:batch_size]
            frames, targets = [x_all[batch_size:]], [y_all[batch_size:]]
            held -= batch_size
    if held:
        yield torch.cat(frames), torch.cat(targets)  # k x (b, T, H, W, C) -> (held, T, H, W, C)
