"""The plain PyTorch training loop, whatever the task: one epoch, evaluation, optimiser and schedule.

Runs without Ray (tests, notebooks, benches); ``rnnimg.train.ray_trainer`` wraps it. The task
gives the loss and the per-batch sums (``Task.loss``, ``Task.batch_stats``) and turns the
epoch's sums into metrics (``Task.summarize``). Sums stay on the device during an epoch: reading
them every step would make the CPU wait for the GPU.

Under DDP every rank must take the same number of steps (``exactly``): a rank short of clips
repeats its last batch, and a rank with none at all (every video failed) steps on a
``BlankBatch``, which adds zero to the gradient and to the metrics.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Iterator, NamedTuple

import torch

from rnnimg.models.layout import to_model_input
from rnnimg.tasks import Task
from rnnimg.train.config import LR_SCHEDULES, TrainConfig

MIN_LR_FRACTION = 0.05  # where the cosine schedule ends, as a fraction of the peak learning rate
GRAD_CLIP_NORM = 5.0  # gradients are clipped to this global norm every step


def on_device(x: torch.Tensor, device) -> torch.Tensor:
    """A batch as model input on ``device``: uint8 (B, T, H, W, C) clips are copied, then converted there."""
    x = x.to(device, non_blocking=True)
    return to_model_input(x) if x.dtype == torch.uint8 else x  # (B, T, H, W, C) uint8 -> (B, T, C, H, W) float


def _add(total: dict, stats: dict) -> None:
    for name, value in stats.items():
        total[name] = total[name] + value if name in total else value


def _to_cpu(stats: dict) -> dict:
    return {name: value.detach().cpu() if torch.is_tensor(value) else value for name, value in stats.items()}


def _zeroed(stats: dict) -> dict:
    """The same stats, every value zero (same keys, dtypes and shapes): what a blank batch adds."""
    return {name: value * 0 for name, value in stats.items()}


class BlankBatch(NamedTuple):
    """A filler batch that only keeps DDP ranks in step: a zero clip and the task's blank target.

    ``train_one_epoch`` steps on it with its loss multiplied by 0 (zero gradient, batch-norm
    statistics untouched) and adds zeroed stats, so the epoch's metrics count real clips only.
    """

    clips: torch.Tensor  # uint8 (1, T, H, W, C) of zeros
    targets: torch.Tensor  # (1, ...) the task's blank_target


def blank_batch(task: Task, model_config) -> BlankBatch:
    """The filler batch of a model config's clip shape (``frames_per_clip``, ``frame_size``), target ``Task.blank_target``."""
    size = model_config.frame_size
    clips = torch.zeros((1, model_config.frames_per_clip, size, size, 3), dtype=torch.uint8)  # (1, T, H, W, C)
    targets = torch.as_tensor([task.blank_target(model_config)])  # one target -> (1, ...)
    return BlankBatch(clips, targets)


def train_one_epoch(model, optimizer, batches, device, task: Task, model_config, scheduler=None, *,
                    amp_dtype: torch.dtype | None = None) -> dict:
    """One pass over ``batches``; returns the task's summed stats (``Task.batch_stats``), on the CPU.

    Args:
        batches: ``(clips, targets)`` with clips float (B, T, C, H, W) or uint8 (B, T, H, W, C);
            a ``BlankBatch`` is a step with zero gradient that adds nothing to the stats.
        amp_dtype: autocast dtype (``torch.bfloat16``) or None for float32.
    """
    device_type = torch.device(device).type
    total: dict = {}
    for batch in batches:
        blank = isinstance(batch, BlankBatch)
        x, y = on_device(batch[0], device), batch[1].to(device, non_blocking=True)
        # A blank batch runs in eval mode: batch-norm running statistics never see the zero clip.
        model.train(not blank)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(x)
            loss = task.loss(outputs, y, model_config)
        if blank:
            loss = loss * 0.0  # every parameter still gets its (zero) gradient: DDP's all-reduce needs them all
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP_NORM)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        with torch.no_grad():
            stats = task.batch_stats(outputs, y, model_config, loss=loss)
            _add(total, _zeroed(stats) if blank else stats)
    model.train()
    return _to_cpu(total)


@torch.inference_mode()
def evaluate(model, batches, device, task: Task, model_config, *, amp_dtype: torch.dtype | None = None) -> dict:
    """The task's summed stats over ``batches`` in eval mode, on the CPU (a ``BlankBatch`` adds zeros)."""
    model.eval()
    device_type = torch.device(device).type
    total: dict = {}
    for batch in batches:
        x, y = on_device(batch[0], device), batch[1].to(device, non_blocking=True)
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            outputs = model(x)
        stats = task.batch_stats(outputs, y, model_config)
        _add(total, _zeroed(stats) if isinstance(batch, BlankBatch) else stats)
    return _to_cpu(total)


def all_reduce(stats: dict, device) -> dict:
    """Sum every stat over the DDP ranks (no-op outside a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return stats
    out = {}
    for name in sorted(stats):  # the same order on every rank
        value = torch.as_tensor(stats[name]).to(device)
        dist.all_reduce(value)
        out[name] = value.cpu()
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


def position_schedule(scheduler, step: int) -> None:
    """Put ``make_optimizer``'s schedule at optimiser step ``step``: its count and the optimiser's learning rates.

    On resume, ``step`` is ``start_epoch`` x the steps per epoch of the run's current
    configuration; the saved scheduler state counts the steps of the configuration that wrote it
    (other workers, batch size or clips per video: another count). For an unchanged
    configuration this equals loading the saved state.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    rates = [base_lr * multiplier(step) for multiplier, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, rates):
        group["lr"] = lr
    state = scheduler.state_dict()
    state.update(last_epoch=step, _last_lr=rates)
    scheduler.load_state_dict(state)


def exactly(batches: Iterable, count: int, blank: Callable[[], BlankBatch] | None = None) -> Iterator:
    """Exactly ``count`` batches: stop early, or repeat the last batch to fill up (when videos failed).

    Every DDP rank must take the same number of steps, or the all-reduce waits forever. A rank
    with no batch at all (all its videos failed) yields ``blank()`` ``count`` times; without
    ``blank`` it yields nothing.
    """
    produced, last = 0, None
    for batch in batches:
        if produced == count:
            return
        produced, last = produced + 1, batch
        yield batch
    if last is None and blank is not None and produced < count:
        last = blank()
    while last is not None and produced < count:
        produced += 1
        yield last


def at_least_one(batches: Iterable, blank: Callable[[], BlankBatch]) -> Iterator:
    """The batches, or ``blank()`` once when there are none: every rank's stats then have the same keys
    (``all_reduce`` sums them key by key on every rank)."""
    empty = True
    for batch in batches:
        empty = False
        yield batch
    if empty:
        yield blank()
