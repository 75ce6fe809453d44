"""Tasks: what a model predicts, and how it is trained, scored and written.

A task is one object registered under a name (``classify`` for clip classification). Training
(``rnnimg.train``) and labelling (``rnnimg.label``) are written against ``Task`` and never test
which task they run; the exported model's ``config.json`` records its task's name, so
``rnnimg label`` picks everything from the model. Adding a task is a new file under
``rnnimg/tasks/`` with a ``Task`` subclass, plus one line in ``_BUILTIN`` below::

    # rnnimg/tasks/mytask.py
    class MyTask(Task):
        name = "mytask"
        ...                       # the methods below that raise NotImplementedError

Importing this package is cheap and torch-free (decode workers import the label job's module,
which looks tasks up by name); a task imports torch and its model family inside its methods.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import pyarrow as pa

# name -> "module:class", imported on first use.
_BUILTIN = {
    "classify": "rnnimg.tasks.classify:ClassifyTask",
    "segment": "rnnimg.tasks.segment:SegmentTask",
    "objects": "rnnimg.tasks.objects:ObjectsTask",
    "predict": "rnnimg.tasks.predict:PredictTask",
}
_loaded: dict[str, "Task"] = {}


class Task:
    """The seam between a task and the shared machinery (clip stream, loop, Ray wrapper, label job).

    The shared machinery owns: listing, decoding clips by presentation time (uint8 (T, H, W, C)),
    batching, the optimiser and its schedule, DDP, checkpoints, the actor pool, exactly-once
    commits and the ``videos`` table. A task owns everything that depends on what is predicted.

    Model configs are frozen dataclasses with at least ``frame_size``, ``frames_per_clip``,
    ``clip_seconds`` and ``stride_seconds`` (the clip plan the label job cuts).
    """

    name: str = ""
    description: str = ""  # one line, for --help
    # The epoch metric that selects the exported checkpoint, and whether higher is better.
    selection_metric: str = "val_loss"
    selection_mode: str = "min"
    # Options of ``synth`` beyond the common ones (``rnnimg synth --images`` needs "images").
    synth_options: tuple[str, ...] = ()
    # The table that gets an ``embedding`` column with ``rnnimg label --embeddings`` (None: the
    # task writes no embeddings); ``predict(..., embeddings=True)`` then adds (N, D) features.
    embedding_table: str | None = None

    # ------------------------------------------------------------------ data and model

    def synth(self, out: str, videos: int, unlabelled: int, seed: int, **options) -> str:
        """Write a synthetic archive (videos + manifest) where one frame cannot give the answer.

        Returns:
            The manifest's location.
        """
        raise NotImplementedError

    def model_config(self, manifest_uri: str, **overrides) -> Any:
        """The model config for training on a manifest: what the manifest implies, then ``overrides``.

        Raises:
            ValueError: the manifest cannot train this task (too few classes, no train/val rows,
                an override the model family does not know).
        """
        raise NotImplementedError

    def config_from_dict(self, data: dict) -> Any:
        """The model config from its saved fields (config.json without ``task``)."""
        raise NotImplementedError

    def config_to_dict(self, config: Any) -> dict:
        """The model config's fields, JSON-serialisable."""
        raise NotImplementedError

    def labels(self, config: Any) -> tuple[str, ...]:
        """Class names the model's outputs refer to (labels.json); empty when there are none."""
        return ()

    def build_model(self, config: Any):
        """A fresh ``torch.nn.Module`` of the config; ``model(x)`` takes float (B, T, C, H, W)."""
        raise NotImplementedError

    def prepare_training(self, model, config: Any) -> None:
        """Called once on a fresh model before training (e.g. load initial backbone weights)."""

    def check_training(self, manifest_uri: str, config: Any) -> None:
        """Fail fast, on the driver, when a run could not work (before any worker starts)."""

    # ------------------------------------------------------------------ training

    def training_rows(self, manifest_uri: str, split: str, config: Any, *, rank: int = 0, world: int = 1, pad: bool = False) -> list[tuple[str, Any]]:
        """``(video_uri, target)`` of one rank's share of a split (see ``rnnimg.manifest.labelled_videos``)."""
        raise NotImplementedError

    def clip_target(self, target: Any, clip) -> Any:
        """The target of one clip of a video whose row target is ``target`` (default: the same)."""
        return target

    def augment(self, frames: "np.ndarray", target: Any, rng: "np.random.Generator") -> tuple["np.ndarray", Any]:
        """A target-preserving random change of one uint8 (T, H, W, C) clip (default: none)."""
        return frames, target

    def blank_target(self, config: Any) -> Any:
        """The target of a blank (all-zero) filler clip, any valid one: a DDP rank whose training
        videos all failed steps on such clips to stay in step; their loss is multiplied by 0."""
        raise NotImplementedError(f"task {self.name!r} has no blank_target: a DDP rank without any decodable video cannot keep in step")

    def permute_frames(self, frames: "np.ndarray", target: Any, order: "np.ndarray") -> tuple["np.ndarray", Any]:
        """The frame-order ablation (``shuffle_frames``): frames in ``order``; a per-frame target follows them.

        Default: the target belongs to the whole clip and stays as it is.
        """
        return frames[order], target

    def loss(self, outputs, targets, config: Any):
        """The training objective of one batch: a scalar tensor."""
        raise NotImplementedError

    def batch_stats(self, outputs, targets, config: Any, loss=None) -> dict:
        """Sums over one batch as tensors on the batch's device (summed over batches and ranks).

        Must include ``count`` (samples) and ``loss_sum``. ``loss`` is the training loss when
        called from the training loop, None in evaluation.
        """
        raise NotImplementedError

    def summarize(self, stats: dict) -> dict:
        """Epoch metrics from summed stats: scalars (``loss``, ``clips``, ...) and lists (history only)."""
        raise NotImplementedError

    def export_config(self, config: Any, best_entry: dict) -> Any:
        """The model config exported with the selected epoch (``best_entry``: its history entry): the
        training config, or one with settings chosen on the validation figures (task ``predict``)."""
        return config

    def evaluation(self, best_entry: dict, config: Any) -> dict:
        """The selected epoch's evaluation summary (stored in metrics.json under ``evaluation``)."""
        return {}

    def write_report(self, model_uri: str, evaluation: dict, history: list, best_metrics: dict, config: Any, model_id: str, *,
                     manifest_uri: str | None = None):
        """Write the evaluation report into the model folder; returns an ``rnnimg.evaluation.Report``.

        ``manifest_uri`` is the training manifest, for a report that draws validation examples
        (None: the report does without them).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ labelling

    def needs_video(self, config: Any) -> bool:
        """Whether the model needs several frames of a video (default: yes). A model that does not
        (one frame per clip, no state across frames) also labels still images (JPEG, PNG, ...):
        a folder listing then includes them, and each is one clip of one frame at time 0. A still
        given to a model that needs video becomes a ``failed`` row (``needs_video``)."""
        return True

    def clip_columns(self) -> dict[str, tuple[str, Any]]:
        """Columns the model adds to each clip row: name -> (numpy dtype, value on status rows)."""
        raise NotImplementedError

    def predict(self, model, inputs, config: Any) -> dict[str, "np.ndarray"]:
        """Model outputs of float (B, T, C, H, W) inputs as per-clip columns (``clip_columns``).

        Called under ``torch.inference_mode()`` and the label job's autocast. A task with an
        ``embedding_table`` takes ``embeddings=True`` (only passed when asked) and then also
        returns ``"embedding"``: (B, D) features of each clip, from ``forward_features``.
        """
        raise NotImplementedError

    def embedding_size(self, config: Any) -> int:
        """D, the length of a clip's embedding (tasks with an ``embedding_table``)."""
        raise NotImplementedError(f"task {self.name!r} writes no embeddings")

    def tables(self) -> dict[str, "pa.Schema"]:
        """The Parquet tables a label job writes per shard, besides ``videos``: name -> schema."""
        raise NotImplementedError

    def shard_rows(self, clips: list[dict], run: dict, min_segment_seconds: float) -> dict[str, list[dict]]:
        """One shard's rows of each table in ``tables()``, from its clip rows.

        ``clips`` hold ``video_uri``, ``clip_index``, ``start_s``, ``end_s``, the
        ``clip_columns``, ``model_id`` and ``run_id``, sorted by video and clip index.
        """
        raise NotImplementedError


def register(task: Task) -> Task:
    """Make ``task`` available under ``task.name`` (tests and plug-ins; built-ins are in ``_BUILTIN``)."""
    if not task.name:
        raise ValueError(f"a task needs a name, got {task!r}")
    _loaded[task.name] = task
    return task


def names() -> tuple[str, ...]:
    """Every registered task name, sorted."""
    return tuple(sorted({*_BUILTIN, *_loaded}))


def get(name: str) -> Task:
    """The task registered as ``name``.

    Raises:
        ValueError: no such task (the message lists the known ones).
    """
    if name in _loaded:
        return _loaded[name]
    if name not in _BUILTIN:
        raise ValueError(f"unknown task {name!r}; known tasks: {list(names())}")
    module, _, cls = _BUILTIN[name].partition(":")
    return register(getattr(importlib.import_module(module), cls)())


def load_model(model_uri: str, device="cpu"):
    """An exported model, ready for inference: ``(task, model in eval mode, config, model_id)``.

    Raises:
        rnnimg.checkpoint.ModelNotFound: no exported model at ``model_uri``.
        ValueError: the model's task is not registered here.
    """
    from rnnimg import checkpoint

    exported, state = checkpoint.load_state(model_uri)
    task = get(exported.task)
    config = task.config_from_dict(exported.config)
    model = task.build_model(config)
    model.load_state_dict(state)
    model.to(device).eval()
    return task, model, config, exported.model_id

