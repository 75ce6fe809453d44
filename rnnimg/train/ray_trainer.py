"""The thin Ray Train wrapper: workers, DDP, per-epoch checkpoints in the store, resume, export.

    rnnimg train OUT/manifest.parquet --out runs/ --epochs 12 --workers 2 --name demo

Every worker reads its own shard of the manifest (the task's ``training_rows``), runs
``rnnimg.train.loop`` on clips from ``rnnimg.train.data``, DDP averages gradients; the epoch's
sums are all-reduced and rank 0 checkpoints to ``OUT/ray/<name>/epoch-NNNN`` (``state.pt``,
``config.json`` with the task, ``labels.json``, ``train_config.json``, ``history.json``). A
worker that dies is replaced and the run continues from the last checkpoint (``max_failures``);
rerunning with the same ``out`` and ``name`` resumes at the next epoch. The checkpoint selected
by the task's metric (classification: best ``val_acc``) is exported with ``rnnimg.checkpoint``.

The driver shows every epoch as it is reported (``rnnimg.progress.EpochProgress``: a bar on a
terminal, else a line per epoch): Ray Train's controller calls a ``UserCallback`` after each
report, which posts rank 0's metrics to a small actor that a driver thread polls. Ray Train's own
per-rank lines stay off the console unless ``rnnimg.runtime.verbose()``.

One run at a time per run folder: ``train`` holds ``rnnimg.store_lock.StoreLock`` on
``OUT/ray/<name>`` from before the first worker starts until the export is written. A resume
only loads a complete checkpoint (every file of ``CHECKPOINT_FILES``); when the one Ray hands
over is not, the newest complete ``epoch-NNNN`` folder before it is used.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import pickle
import re
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field

import torch

from rnnimg import checkpoint, storage, tasks
from rnnimg.models.precision import autocast_dtype
from rnnimg.progress import EpochProgress
from rnnimg.store_lock import LockHeld, StoreLock
from rnnimg.train.config import TrainConfig
from rnnimg.train.data import epoch_batches
from rnnimg.train.loop import all_reduce, at_least_one, blank_batch, evaluate, exactly, make_optimizer, position_schedule, train_one_epoch

log = logging.getLogger("rnnimg.train")

STATE = "state.pt"
HISTORY = "history.json"
TRAIN_CONFIG = "train_config.json"
CHECKPOINT_FILES = (STATE, checkpoint.CONFIG, checkpoint.LABELS, TRAIN_CONFIG, HISTORY)  # a checkpoint folder is complete with all of them
EPOCH_FOLDER = re.compile(r"^epoch-(\d+)$")  # checkpoint folders under the run folder (checkpoint_dir_name)
LOCK_POLL_S = 5.0  # how often a run that waits for the run folder's lock tries again
# Changing these between a run and its resume changes the steps per epoch (the schedule is re-positioned).
STEP_FIELDS = ("workers", "batch_size", "clips_per_video")


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


class IncompleteCheckpoint(RuntimeError):
    """A checkpoint folder lacks some of ``CHECKPOINT_FILES`` or cannot be read."""


@dataclass(frozen=True)
class Restored:
    """What a resume reads from one complete checkpoint folder."""

    state: dict  # state.pt: model, optimizer, scheduler, epoch, resumes
    history: list  # every epoch's metrics up to the checkpoint's
    train_config: dict  # the TrainConfig of the run that wrote it (train_config.json)
    folder: str  # where it was read (its name is epoch-NNNN)


def load_checkpoint_folder(folder: str) -> Restored:
    """Read a checkpoint folder (local or ``s3://``) that has every file of ``CHECKPOINT_FILES``.

    Raises:
        IncompleteCheckpoint: a file is missing, truncated or not what it should be
            (``state.pt`` loads with ``weights_only=True``: tensors and plain containers only).
        StorageError: the store could not be read (after retries): not a reason to go back to
            an older checkpoint, the worker fails and Ray Train retries it.
    """
    missing = [name for name in CHECKPOINT_FILES if not storage.exists(storage.join(folder, name))]
    if missing:
        raise IncompleteCheckpoint(f"checkpoint {folder} is incomplete: no {', '.join(missing)}")
    try:
        state_bytes = storage.read_bytes(storage.join(folder, STATE))
        history = storage.read_json(storage.join(folder, HISTORY))
        train_config = storage.read_json(storage.join(folder, TRAIN_CONFIG))
    except (FileNotFoundError, ValueError) as err:  # deleted meanwhile; not JSON
        raise IncompleteCheckpoint(f"checkpoint {folder} cannot be read: {err}") from err
    try:
        state = torch.load(io.BytesIO(state_bytes), map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as err:  # truncated, or not plain tensors
        raise IncompleteCheckpoint(f"checkpoint {folder} has an unreadable {STATE}: {err}") from err
    return Restored(state=state, history=history, train_config=train_config, folder=folder)


def checkpoint_epochs(run_uri: str) -> list[tuple[int, str]]:
    """``(epoch, folder)`` of every ``epoch-NNNN`` folder directly under a run folder, newest first."""
    try:
        files = storage.list_files(run_uri)
    except FileNotFoundError:
        return []
    names = set()
    for info in files:
        parent, _ = info.uri.rstrip("/").rsplit("/", 1)
        grandparent, folder = parent.rsplit("/", 1)
        if EPOCH_FOLDER.match(folder) and storage.normalize(grandparent) == storage.normalize(run_uri):
            names.add(folder)
    return sorted(((int(EPOCH_FOLDER.match(n).group(1)), storage.join(run_uri, n)) for n in names), reverse=True)


def restore(ray_checkpoint, run_uri: str) -> Restored | None:
    """What to resume from: the checkpoint Ray hands over if complete, else the newest complete
    ``epoch-NNNN`` folder before it under ``run_uri``; None to start fresh.

    Ray hands over the newest checkpoint it registered; files can be missing there when another
    process deleted them (a best-k prune of a concurrent run on the same folder). Loading it
    would fail every restart with FileNotFoundError; an earlier complete one costs some epochs.
    Ray registers a checkpoint only once every worker has reported its epoch: when a worker dies
    (its node lost) between rank 0's upload and its own report, Ray hands over nothing although
    the store holds that epoch complete. Then the newest complete folder in the store is used.
    """
    if ray_checkpoint is None:
        for epoch, folder in checkpoint_epochs(run_uri):
            try:
                restored = load_checkpoint_folder(folder)
            except IncompleteCheckpoint:
                continue
            log.warning("Ray handed over no checkpoint, %s holds %s complete: resuming from it", run_uri, storage.basename(folder))
            return restored
        return None
    handed = storage.basename(ray_checkpoint.path)
    try:
        with ray_checkpoint.as_directory() as directory:
            return load_checkpoint_folder(directory)
    except (IncompleteCheckpoint, FileNotFoundError) as err:  # FileNotFoundError: the folder itself is gone
        problem = f"the checkpoint Ray hands over ({ray_checkpoint.path}) is not usable: {err}"
    match = EPOCH_FOLDER.match(handed)
    before = int(match.group(1)) if match else math.inf
    for epoch, folder in checkpoint_epochs(run_uri):
        if epoch >= before or storage.basename(folder) == handed:
            continue
        try:
            restored = load_checkpoint_folder(folder)
        except IncompleteCheckpoint as err:
            log.warning("skipping checkpoint %s: %s", folder, err)
            continue
        log.warning("%s; resuming from the newest complete checkpoint before it, %s", problem, folder)
        return restored
    log.warning("%s, and %s holds no complete checkpoint before it: starting fresh", problem, run_uri)
    return None


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

    from rnnimg.runtime import quiet_worker_console

    quiet_worker_console(loop_config.get("verbose", False))  # no per-rank report lines on the driver's terminal
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
    restored = restore(ray.train.get_checkpoint(), loop_config["run_uri"])
    state, history = (restored.state, list(restored.history)) if restored is not None else (None, [])
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
        start_epoch, resumes = int(state["epoch"]) + 1, int(state.get("resumes", 0)) + 1
        # The saved scheduler counts the steps of the configuration that wrote it: position by this one's.
        position_schedule(scheduler, start_epoch * steps_per_epoch)
        if rank == 0:
            changed = {k: (restored.train_config.get(k), getattr(train_config, k)) for k in STEP_FIELDS
                       if restored.train_config.get(k) != getattr(train_config, k)}
            if changed:
                log.warning("resuming with other %s than the checkpoint's (%s): the learning-rate schedule continues at epoch %d "
                            "of this configuration (%d steps per epoch)", "/".join(changed),
                            ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items()), start_epoch, steps_per_epoch)
        if rank == 0 and start_epoch < train_config.epochs:
            log.warning("resuming run at epoch %d from the checkpoint of epoch %d (resume %d)", start_epoch, start_epoch - 1, resumes)
        elif rank == 0:
            log.warning("the run already trained its %d epochs: nothing to train", train_config.epochs)

    pin = device.type == "cuda"
    # A rank whose videos all fail still steps (on blank batches) and reports stats (zeros).
    blank = functools.partial(blank_batch, task, model_config)
    for epoch in range(start_epoch, train_config.epochs):
        started = time.perf_counter()
        batches = epoch_batches(train_rows, task, model_config, train_config, train=True, epoch=epoch, rank=rank, pin_memory=pin)
        # Every rank must take the same number of steps, or DDP's all-reduce waits forever.
        train_stats = train_one_epoch(model, optimizer, exactly(batches, steps_per_epoch, blank), device, task, model_config, scheduler,
                                      amp_dtype=amp_dtype)
        train_seconds = time.perf_counter() - started
        val_batches = epoch_batches(val_rows, task, model_config, train_config, train=False, epoch=epoch, rank=rank, pin_memory=pin)
        val_stats = evaluate(plain_model, at_least_one(val_batches, blank), device, task, model_config, amp_dtype=amp_dtype)
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
    wait: bool = False,
) -> TrainResult:
    """Train on the manifest's ``train`` split, validate on ``val``, export the selected model and its report.

    The run holds the lock of its run folder ``OUT/ray/<name>`` (``rnnimg.store_lock``) from
    before the first worker starts until the model is exported: two runs of one name never
    write the same checkpoints.

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
        wait: when another run holds the run folder's lock, wait until it is free (checked
            every ``LOCK_POLL_S``) instead of failing.

    Raises:
        ValueError: an unknown task; the manifest cannot train it; GPUs asked for where there are none.
        FileNotFoundError: no manifest, or no initial weights file where the config says.
        BackboneUnavailable: a torchvision backbone without torchvision.
        LockHeld: another run of this ``out`` and ``name`` is running (without ``wait``).
        LockLost: the lock was taken over during the run (it had gone stale); nothing is exported.
    """
    from rnnimg.runtime import ensure_ray

    job = tasks.get(task)
    if model_config is None:
        model_config = job.model_config(manifest_uri)
    job.check_training(manifest_uri, model_config)
    name = storage.safe_key(name)
    runs = storage.join(out, "ray")
    run_uri = storage.join(runs, name) if storage.is_s3(runs) else storage.normalize(storage.join(runs, name))
    new_folder = not storage.exists(run_uri)
    # The lock comes before Ray starts: a second run of this name fails in seconds, not after a ray.init.
    lock = take_lock(StoreLock(run_uri, owner=f"rnnimg train {name} (pid {os.getpid()})"), wait)
    try:
        ensure_ray(ray_address)
        local = not (ray_address or os.environ.get("RAY_ADDRESS"))
        train_config = dataclasses.replace(train_config, use_gpu=_resolve_use_gpu(train_config, local))
        return _fit_and_export(job, manifest_uri, out, name, runs, run_uri, train_config, model_config, lock)
    finally:
        lock.release()
        if new_folder and _holds_only_the_lock(run_uri):  # a run refused before it trained leaves nothing behind
            storage.delete(run_uri)


def _holds_only_the_lock(run_uri: str) -> bool:
    try:
        files = storage.list_files(run_uri)
    except FileNotFoundError:
        return False
    lock_folder = storage.join(run_uri, "_lock")
    return all(f.uri.startswith(lock_folder) for f in files)


def take_lock(lock: StoreLock, wait: bool, poll_s: float = LOCK_POLL_S) -> StoreLock:
    """Acquire ``lock``; with ``wait``, retry every ``poll_s`` seconds until it is free (logged once).

    Raises:
        LockHeld: the lock is held (without ``wait``).
    """
    waiting_since = None
    while True:
        try:
            lock.acquire()
        except LockHeld as err:
            if not wait:
                raise
            if waiting_since is None:
                waiting_since = time.monotonic()
                log.warning("waiting for the run folder to be free: %s", err)
            time.sleep(poll_s)
            continue
        if waiting_since is not None:
            log.warning("took the lock of %s after waiting %.0f s", lock.base, time.monotonic() - waiting_since)
        return lock


def _fit_and_export(job: tasks.Task, manifest_uri: str, out: str, name: str, runs: str, run_uri: str, train_config: TrainConfig,
                    model_config, lock: StoreLock) -> TrainResult:
    """Run the TorchTrainer on the run folder (``lock`` held), then export the selected checkpoint."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from rnnimg.runtime import ray_train_log_level, verbose

    if storage.is_s3(runs):
        fs, path = storage.resolve(runs)
        storage_kwargs = {"storage_path": path, "storage_filesystem": fs}
    else:
        storage.makedirs(runs)
        storage_kwargs = {"storage_path": storage.normalize(runs)}
    # Each epoch on the terminal as the run reports it (Ray Train's own per-rank report lines are off: ray_train_log_level).
    with _show_epochs(EpochProgress(train_config.epochs, job.selection_metric)) as epoch_feed:
        run_config = ray.train.RunConfig(
            name=name,
            **storage_kwargs,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=train_config.keep_checkpoints, checkpoint_score_attribute=job.selection_metric,
                checkpoint_score_order=job.selection_mode,
            ),
            failure_config=ray.train.FailureConfig(max_failures=train_config.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=ray_train_log_level()),
            callbacks=[epoch_feed],
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
                "run_uri": run_uri,
                "verbose": verbose(),
            },
            scaling_config=ray.train.ScalingConfig(num_workers=train_config.workers, use_gpu=train_config.use_gpu,
                                                   resources_per_worker=resources, placement_strategy=train_config.placement),
            run_config=run_config,
        )
        result = trainer.fit()
    lock.check()  # a run whose lock was taken over leaves the export to the run that took it
    best_checkpoint, best_metrics = _best(result, job)
    model_uri = storage.join(out, "model")
    # The selected checkpoint may be an early one: the full history is in the latest.
    with result.checkpoint.as_directory() as directory:
        with open(os.path.join(directory, HISTORY)) as f:
            history = json.load(f)
    best_epoch = int(best_metrics.get("epoch", -1))
    best_entry = next((h for h in reversed(history) if h.get("epoch") == best_epoch), history[-1])
    model_config = job.export_config(model_config, best_entry)
    summary = job.evaluation(best_entry, model_config)
    with best_checkpoint.as_directory() as directory:
        model_id = export_checkpoint(directory, model_uri, best_metrics, history, evaluation=summary,
                                     config={"task": job.name, **job.config_to_dict(model_config)})
    report = job.write_report(model_uri, summary, history, best_metrics, model_config, model_id, manifest_uri=manifest_uri)
    return TrainResult(model_uri=model_uri, run_uri=run_uri, metrics=best_metrics, history=history,
                       report_uri=report.report_uri, evaluation=summary, report_markdown=report.markdown, task=job.name)


def _epoch_board_class():
    """A small actor that holds the epochs' metrics until the driver takes them."""
    import ray

    @ray.remote(num_cpus=0)
    class EpochBoard:
        def __init__(self):
            self.waiting = []

        def put(self, metrics: dict) -> None:
            self.waiting.append(metrics)

        def take(self) -> list[dict]:
            taken, self.waiting = self.waiting, []
            return taken

    return EpochBoard


def _epoch_feed_class():
    """A ``ray.train.UserCallback`` (it runs in Ray Train's controller) that posts rank 0's metrics of every epoch to a board."""
    import ray.train

    class EpochFeed(ray.train.UserCallback):
        def __init__(self, board):
            self.board = board

        def after_report(self, run_context, metrics, checkpoint):
            if metrics:  # one dict per rank, all the same: the epoch's sums are all-reduced
                self.board.put.remote(dict(metrics[0]))  # no wait: the controller's event loop goes on

    return EpochFeed


@contextlib.contextmanager
def _show_epochs(display: EpochProgress, poll_s: float = 0.5):
    """Yields the callback for ``RunConfig``; while the body runs (``trainer.fit()``) a thread shows each epoch reported.

    The driver learns of an epoch only through Ray Train's controller: its ``UserCallback`` posts the
    metrics to a board actor, and a thread here takes them every ``poll_s`` (and redraws the bar's clock).
    """
    import ray

    board = _epoch_board_class().remote()
    done = threading.Event()

    def show_taken():
        for metrics in ray.get(board.take.remote()):
            display.epoch(metrics)

    def follow():
        while not done.wait(poll_s):
            try:
                show_taken()
            except ray.exceptions.RayError:  # the board is gone (Ray shutting down): no more epochs to show
                return
            display.tick()

    thread = threading.Thread(target=follow, name="rnnimg-epochs", daemon=True)
    thread.start()
    try:
        yield _epoch_feed_class()(board)
    finally:
        done.set()
        thread.join()
        try:
            show_taken()  # epochs reported after the thread's last look
        except ray.exceptions.RayError:
            pass  # never in place of the run's own error
        display.close()
        ray.kill(board)


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


def export_checkpoint(checkpoint_dir: str, model_uri: str, metrics: dict, history: list, evaluation: dict | None = None,
                      config: dict | None = None) -> str:
    """Export a Ray checkpoint folder's model with ``rnnimg.checkpoint.save``.

    Args:
        evaluation: the selected epoch's evaluation summary, stored in metrics.json.
        config: the model config to export (with its ``task``), if not the checkpoint's (``Task.export_config``).

    Returns:
        The model id.
    """
    state = torch.load(os.path.join(checkpoint_dir, STATE), map_location="cpu", weights_only=True)
    if config is None:
        with open(os.path.join(checkpoint_dir, checkpoint.CONFIG)) as f:
            config = json.load(f)
    config = dict(config)
    with open(os.path.join(checkpoint_dir, checkpoint.LABELS)) as f:
        labels = json.load(f)
    with open(os.path.join(checkpoint_dir, TRAIN_CONFIG)) as f:
        train_config = json.load(f)
    task_name = config.pop("task", checkpoint.DEFAULT_TASK)
    record = {"best": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}, "history": history, "train_config": train_config}
    if evaluation is not None:
        record["evaluation"] = evaluation
    return checkpoint.save(model_uri, state["model"], task_name, config, labels=labels, metrics=record)
