"""The thin Ray Train wrapper: workers, DDP, per-epoch checkpoints in the store, resume, export.

    rnnimg train OUT/manifest.parquet --out runs/ --epochs 12 --workers 2 --name demo

Every worker reads its own shard of the manifest (the task's ``training_rows``), runs
``rnnimg.train.loop`` on clips from ``rnnimg.train.data``, DDP averages gradients; the epoch's
sums are all-reduced and rank 0 checkpoints to ``OUT/ray/<name>/epoch-NNNN`` (``state.pt``,
``config.json`` with the task, ``labels.json``, ``train_config.json``, ``history.json``). A
worker that dies is replaced and the run continues from the last checkpoint (``max_failures``);
rerunning with the same ``out`` and ``name`` resumes at the next epoch. The checkpoint selected
by the task's metric (classification: best ``val_acc``) is exported with ``rnnimg.checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field

import torch

from rnnimg import checkpoint, storage, tasks
from rnnimg.models.precision import autocast_dtype
from rnnimg.train.config import TrainConfig
from rnnimg.train.data import epoch_batches
from rnnimg.train.loop import all_reduce, evaluate, exactly, make_optimizer, train_one_epoch

log = logging.getLogger("rnnimg.train")

STATE = "state.pt"
HISTORY = "history.json"
TRAIN_CONFIG = "train_config.json"


def _save_state(directory: str, model, optimizer, scheduler, epoch: int, resumes: int, history: list, task: tasks.Task, model_config,
                train_config: TrainConfig) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "resumes": resumes,
    }
    torch.save(state, os.path.join(directory, STATE))
    files = {
        checkpoint.CONFIG: {"task": task.name, **task.config_to_dict(model_config)},
        checkpoint.LABELS: list(task.labels(model_config)),
        TRAIN_CONFIG: asdict(train_config),
        HISTORY: history,
    }
    for name, content in files.items():
        with open(os.path.join(directory, name), "w") as f:
            json.dump(content, f, indent=2)


def _restore(ray_checkpoint) -> tuple[dict | None, list]:
    """The state dict and history of a Ray checkpoint (None, [] when starting fresh)."""
    if ray_checkpoint is None:
        return None, []
    with ray_checkpoint.as_directory() as directory:
        state = torch.load(os.path.join(directory, STATE), map_location="cpu", weights_only=True)
        with open(os.path.join(directory, HISTORY)) as f:
            history = json.load(f)
    return state, history


def epoch_metrics(train_summary: dict, val_summary: dict) -> tuple[dict, dict]:
    """An epoch's reported metrics (scalars, prefixed ``train_``/``val_``) and what the history adds (validation lists)."""
    metrics = {f"{prefix}_{k}": v for prefix, summary in (("train", train_summary), ("val", val_summary))
               for k, v in summary.items() if isinstance(v, (int, float))}
    extra = {f"val_{k}": v for k, v in val_summary.items() if not isinstance(v, (int, float))}
    return metrics, extra


def train_loop_per_worker(loop_config: dict) -> None:
    """Body of every Ray Train worker: read its shard, restore, train, evaluate, report, checkpoint on rank 0."""
    import ray.train
    import ray.train.torch

    task = tasks.get(loop_config["task"])
    model_config = task.config_from_dict(loop_config["model_config"])
    train_config = TrainConfig(**loop_config["train_config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    amp_dtype = autocast_dtype(train_config.precision, device)
    torch.manual_seed(train_config.seed)

    manifest = loop_config["manifest_uri"]
    train_rows = task.training_rows(manifest, "train", model_config, rank=rank, world=world, pad=True)
    val_rows = task.training_rows(manifest, "val", model_config, rank=rank, world=world, pad=False)
    steps_per_epoch = math.ceil(len(train_rows) * train_config.clips_per_video / train_config.batch_size)

    model = task.build_model(model_config)
    state, history = _restore(ray.train.get_checkpoint())
    if state is not None:
        model.load_state_dict(state["model"])
    else:
        task.prepare_training(model, model_config)
    if device.type == "cuda":
        if hasattr(model, "use_channels_last"):
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

    pin = device.type == "cuda"
    for epoch in range(start_epoch, train_config.epochs):
        started = time.perf_counter()
        batches = epoch_batches(train_rows, task, model_config, train_config, train=True, epoch=epoch, rank=rank, pin_memory=pin)
        # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
        train_stats = train_one_epoch(model, optimizer, exactly(batches, steps_per_epoch), device, task, model_config, scheduler,
                                      amp_dtype=amp_dtype)
        train_seconds = time.perf_counter() - started
        val_batches = epoch_batches(val_rows, task, model_config, train_config, train=False, epoch=epoch, rank=rank, pin_memory=pin)
        val_stats = evaluate(plain_model, val_batches, device, task, model_config, amp_dtype=amp_dtype)
        train_summary = task.summarize(all_reduce(train_stats, device))
        val_summary = task.summarize(all_reduce(val_stats, device))
        metrics, extra = epoch_metrics(train_summary, val_summary)
        metrics.update({
            "epoch": epoch,
            "lr": scheduler.get_last_lr()[0],
            "train_clips_per_s": train_summary["clips"] / train_seconds,
            "epoch_seconds": time.perf_counter() - started,
            "resumes": resumes,
        })
        history.append({**metrics, **extra})
        if rank == 0:
            with tempfile.TemporaryDirectory() as directory:
                _save_state(directory, plain_model, optimizer, scheduler, epoch, resumes, history, task, model_config, train_config)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory), checkpoint_dir_name=f"epoch-{epoch:04d}")
        else:
            ray.train.report(metrics)


@dataclass(frozen=True)
class TrainResult:
    model_uri: str  # the exported model folder
    run_uri: str  # Ray Train's run folder (checkpoints)
    metrics: dict  # the selected epoch's metrics
    history: list  # every epoch's metrics
    report_uri: str = ""  # the evaluation report (report.md) in the model folder
    evaluation: dict = field(default_factory=dict)  # the task's evaluation of the selected epoch (classification: accuracy, per-class P/R/F1)
    report_markdown: str = ""  # the report's text, to print
    task: str = "classify"  # the task trained


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
    model_config=None,
    ray_address: str | None = None,
    task: str = "classify",
) -> TrainResult:
    """Train on the manifest's ``train`` split, validate on ``val``, export the selected model and its report.

    Args:
        manifest_uri: a manifest table with ``video_uri``, ``split`` and the task's target
            columns; only its URI travels to the workers, each reads its own shard.
        out: where runs and the exported model go (local folder or ``s3://``).
        name: run name; rerunning with the same ``out`` and ``name`` resumes at the epoch after
            the last checkpoint (a finished run is only exported again).
        model_config: the task's model config; default: what the manifest implies
            (``Task.model_config``; classification: its sorted label names).
        ray_address: a Ray cluster; default ``RAY_ADDRESS``, else a local Ray in this process.
        task: the registered task name (``rnnimg.tasks.names()``).

    Raises:
        ValueError: an unknown task; the manifest cannot train it; GPUs asked for where there are none.
        FileNotFoundError: no manifest, or no initial weights file where the config says.
        BackboneUnavailable: a torchvision backbone without torchvision.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    from rnnimg.runtime import ensure_ray

    job = tasks.get(task)
    if model_config is None:
        model_config = job.model_config(manifest_uri)
    job.check_training(manifest_uri, model_config)
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
            num_to_keep=train_config.keep_checkpoints, checkpoint_score_attribute=job.selection_metric,
            checkpoint_score_order=job.selection_mode,
        ),
        failure_config=ray.train.FailureConfig(max_failures=train_config.max_failures),
    )
    resources = {"CPU": train_config.worker_cpus}
    if train_config.use_gpu:
        resources["GPU"] = train_config.gpus_per_worker
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "task": job.name,
            "model_config": job.config_to_dict(model_config),
            "train_config": asdict(train_config),
            "manifest_uri": manifest_uri if storage.is_s3(manifest_uri) else storage.normalize(manifest_uri),
        },
        scaling_config=ray.train.ScalingConfig(num_workers=train_config.workers, use_gpu=train_config.use_gpu, resources_per_worker=resources),
        run_config=run_config,
    )
    result = trainer.fit()
    best_checkpoint, best_metrics = _best(result, job)
    model_uri = storage.join(out, "model")
    # The selected checkpoint may be an early one: the full history is in the latest.
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, HISTORY)) as f:
            history = json.load(f)
    best_epoch = int(best_metrics.get("epoch", -1))
    best_entry = next((h for h in reversed(history) if h.get("epoch") == best_epoch), history[-1])
    summary = job.evaluation(best_entry, model_config)
    with best_checkpoint.as_directory() as directory:
        model_id = export_checkpoint(directory, model_uri, best_metrics, history, evaluation=summary)
    report = job.write_report(model_uri, summary, history, best_metrics, model_config, model_id)
    return TrainResult(model_uri=model_uri, run_uri=storage.join(runs, name), metrics=best_metrics, history=history,
                       report_uri=report.report_uri, evaluation=summary, report_markdown=report.markdown, task=job.name)


def _best(result, task: tasks.Task):
    """The checkpoint selected by the task's metric (ties: the lower validation loss) and its metrics."""
    candidates = list(result.best_checkpoints or [])
    if not candidates:
        if result.checkpoint is None:
            raise RuntimeError("training produced no checkpoint")
        return result.checkpoint, dict(result.metrics or {})
    sign = 1.0 if task.selection_mode == "max" else -1.0
    checkpoint_, metrics = max(candidates, key=lambda cm: (sign * cm[1].get(task.selection_metric, -sign * math.inf), -cm[1].get("val_loss", 0.0)))
    return checkpoint_, dict(metrics)


def export_checkpoint(checkpoint_dir: str, model_uri: str, metrics: dict, history: list, evaluation: dict | None = None) -> str:
    """Export a Ray checkpoint folder's model with ``rnnimg.checkpoint.save``.

    Args:
        evaluation: the selected epoch's evaluation summary, stored in metrics.json.

    Returns:
        The model id.
    """
    state = torch.load(os.path.join(checkpoint_dir, STATE), map_location="cpu", weights_only=True)
    with open(os.path.join(checkpoint_dir, checkpoint.CONFIG)) as f:
        config = json.load(f)
    with open(os.path.join(checkpoint_dir, checkpoint.LABELS)) as f:
        labels = json.load(f)
    with open(os.path.join(checkpoint_dir, TRAIN_CONFIG)) as f:
        train_config = json.load(f)
    task_name = config.pop("task", checkpoint.DEFAULT_TASK)
    record = {"best": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, "history": history, "train_config": train_config}
    if evaluation is not None:
        record["evaluation"] = evaluation
    return checkpoint.save(model_uri, state["model"], task_name, config, labels=labels, metrics=record)
