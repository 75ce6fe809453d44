"""Prefect flow ``train-crnn``: train a CRNN with Ray Train and export the best model.

    python flows/train_crnn.py MANIFEST --out OUT [--epochs 12] [--workers 2] [--name crnn]
    prefect deployment run train-crnn/local --params '{"params": {"manifest": "M.parquet", "out": "OUT", "epochs": 1}}'

The flow only orchestrates: the work is ``rnnimg.train.train``, on the Ray cluster named by
``params.ray_address`` or ``RAY_ADDRESS`` (an unreachable one fails the run in seconds), else on
a local Ray started in the flow run's process. Its one parameter is a validated ``TrainParams``:
a bad value fails the run before any work starts, and a deployment refuses it when the run is
created. A retry of the training task resumes from the run's last checkpoint (same ``out`` and
``name``). The run publishes the per-epoch metrics (table), a link to the exported model and a
summary of the best epoch and the history (markdown).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from flowkit import Location, artifact_key, connect_ray, location_link, markdown_table, transient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from rnnimg import checkpoint, storage
from rnnimg.train import TrainConfig, TrainResult, train


class TrainParams(BaseModel):
    """Parameters of one training run (``rnnimg train --help`` explains the same options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    manifest: Location = Field(description="manifest table (.parquet/.csv) with video_uri, label, split")
    out: Location = Field(description="where checkpoints (OUT/ray/NAME) and the exported model (OUT/model) go")
    name: str = Field("crnn", min_length=1, max_length=100, description="run name; the same name resumes")
    task: str = Field("classify", description="what the model learns to predict (rnnimg.tasks.names())")
    model_options: dict[str, Any] = Field(default_factory=dict,
                                          description="fields of the task's model config (e.g. segment: {spatial: renet, temporal: false, "
                                                      "frames_per_clip: 1}); the rest take the task's defaults")
    epochs: int = Field(TrainConfig.epochs, ge=1, le=10_000, description="passes over the training videos")
    workers: int = Field(TrainConfig.workers, ge=1, le=1024, description="Ray Train workers (DDP)")
    batch_size: int = Field(TrainConfig.batch_size, ge=1, le=4096, description="clips per optimiser step per worker")
    lr: float = Field(TrainConfig.lr, gt=0, le=1, description="peak AdamW learning rate")
    clips_per_video: int = Field(TrainConfig.clips_per_video, ge=1, le=64, description="random clips per training video per epoch")
    use_gpu: bool | None = Field(None, description="true: one GPU per worker; false: CPUs; null: GPUs if the cluster has any")
    seed: int = Field(TrainConfig.seed, description="random seed of initialisation and clip sampling")
    ray_address: str | None = Field(None, description="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        from rnnimg.tasks import names

        if value not in names():
            raise ValueError(f"task must be one of {list(names())}, got {value!r}")
        return value

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if storage.safe_key(value) != value:
            raise ValueError(f"name must use only letters, digits and ._- (not starting with . or -), got {value!r}")
        return value

    def train_config(self) -> TrainConfig:
        return TrainConfig(epochs=self.epochs, workers=self.workers, batch_size=self.batch_size, lr=self.lr,
                           clips_per_video=self.clips_per_video, use_gpu=self.use_gpu, seed=self.seed)


HISTORY_COLUMNS = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "epoch_seconds"]


@task(name="train-model", retries=1, retry_delay_seconds=5, retry_condition_fn=transient)
def train_model(params: TrainParams) -> TrainResult:
    """Ray Train on the cluster; a retry resumes from the last checkpoint."""
    from rnnimg.tasks import get

    model_config = get(params.task).model_config(params.manifest, **params.model_options)
    return train(params.manifest, params.out, params.name, params.train_config(), model_config, ray_address=params.ray_address,
                 task=params.task)


@task(name="read-metrics", retries=3, retry_delay_seconds=2, retry_condition_fn=transient)
def read_metrics(model_uri: str) -> dict:
    """The exported model's metrics.json: model_id, best epoch, every epoch, training config."""
    return storage.read_json(storage.join(model_uri, checkpoint.METRICS))


@task(name="publish-training", retries=2, retry_delay_seconds=2)
def publish_training(params: TrainParams, result: TrainResult, metrics: dict, seconds: float) -> None:
    """Artifacts: per-epoch metrics (table), the model folder (link), best epoch and history (markdown)."""
    key = artifact_key("train", params.name)
    history = [{c: epoch.get(c) for c in HISTORY_COLUMNS} for epoch in metrics.get("history", [])]
    best = metrics.get("best", {})
    create_table_artifact(history, key=f"{key}-history", description=f"Per-epoch metrics of training run {params.name!r}")
    create_link_artifact(location_link(result.model_uri), link_text=f"model {metrics.get('model_id')} at {result.model_uri}",
                         key=f"{key}-model", description="The exported model: model.safetensors, config.json, labels.json, metrics.json")
    formats = {c: "{:.4f}" for c in HISTORY_COLUMNS if c not in ("epoch", "lr", "epoch_seconds")}
    markdown = "\n".join(
        [
            f"# train-crnn `{params.name}`",
            "",
            f"- model `{metrics.get('model_id')}` at `{result.model_uri}`; checkpoints at `{result.run_uri}`",
            f"- best epoch {best.get('epoch')}: val_acc **{best.get('val_acc', float('nan')):.4f}**, "
            f"val_loss {best.get('val_loss', float('nan')):.4f}",
            f"- {len(history)} epochs on {params.workers} worker(s) in {seconds:.0f} s",
            "",
            markdown_table(history, HISTORY_COLUMNS, {**formats, "lr": "{:.2e}", "epoch_seconds": "{:.1f}"}),
        ]
    )
    create_markdown_artifact(markdown, key=f"{key}-summary", description=f"Training run {params.name!r}")


@flow(name="train-crnn", log_prints=True)
def train_crnn(params: TrainParams) -> dict:
    """Train on ``params.manifest``'s train split, validate on val, export the best model to ``params.out``/model.

    Returns:
        ``model`` (the exported folder), ``run`` (the checkpoints), ``best`` (the best epoch's
        metrics), ``model_id`` and ``seconds``.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    cluster = connect_ray(params.ray_address)
    logger.info("training %r on Ray %s: %d epochs, %d workers", params.name, cluster, params.epochs, params.workers)
    result = train_model(params)
    metrics = read_metrics(result.model_uri)
    seconds = time.perf_counter() - started
    publish_training(params, result, metrics, seconds)
    logger.info("best epoch %s: val_acc=%.3f; model %s at %s", result.metrics.get("epoch"),
                result.metrics.get("val_acc", float("nan")), metrics.get("model_id"), result.model_uri)
    return {"model": result.model_uri, "run": result.run_uri, "best": result.metrics,
            "model_id": metrics.get("model_id"), "seconds": round(seconds, 3)}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the train-crnn flow in this process.")
    parser.add_argument("manifest", help="manifest table with video_uri, label, split")
    parser.add_argument("--out", required=True, help="where checkpoints and the model go")
    parser.add_argument("--epochs", type=int, default=12, help="passes over the training videos (default 12)")
    parser.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    parser.add_argument("--name", default="crnn", help="run name; the same name resumes (default crnn)")
    args = parser.parse_args()
    try:
        train_params = TrainParams(manifest=args.manifest, out=args.out, epochs=args.epochs, workers=args.workers, name=args.name)
    except ValidationError as err:
        sys.exit(f"train-crnn: {err}")
    print(json.dumps(train_crnn(train_params), indent=2, default=str))
