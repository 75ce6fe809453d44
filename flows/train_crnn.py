"""Prefect flow ``train-crnn``: train a CRNN with Ray Train and export the best model.

    python flows/train_crnn.py MANIFEST --out OUT [--epochs 12] [--workers 2] [--name crnn]

The flow only orchestrates: the work is ``rnnimg.train.train``. A retry of the training task
resumes from the run's last checkpoint (same ``out`` and ``name``), it does not start over.
"""

from __future__ import annotations

import argparse
import json

from prefect import flow, get_run_logger, task

from rnnimg.train import TrainConfig, TrainResult, train


@task(name="train-model", retries=1, retry_delay_seconds=5)
def train_task(manifest: str, out: str, name: str, train_config: TrainConfig, ray_address: str | None) -> TrainResult:
    return train(manifest, out, name, train_config, ray_address=ray_address)


@flow(name="train-crnn", log_prints=True)
def train_crnn(
    manifest: str,
    out: str,
    epochs: int = 12,
    workers: int = 2,
    name: str = "crnn",
    batch_size: int = 16,
    clips_per_video: int = 1,
    use_gpu: bool = False,
    ray_address: str | None = None,
) -> dict:
    """Train on ``manifest``'s train split, validate on val, export to ``out``/model."""
    logger = get_run_logger()
    config = TrainConfig(epochs=epochs, workers=workers, batch_size=batch_size, clips_per_video=clips_per_video, use_gpu=use_gpu)
    result = train_task(manifest, out, name, config, ray_address)
    logger.info("best epoch %s: val_acc=%.3f; model at %s", result.metrics.get("epoch"), result.metrics.get("val_acc", float("nan")), result.model_uri)
    return {"model": result.model_uri, "run": result.run_uri, "best": result.metrics}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the train-crnn flow in this process.")
    parser.add_argument("manifest")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--name", default="crnn")
    args = parser.parse_args()
    print(json.dumps(train_crnn(args.manifest, args.out, args.epochs, args.workers, args.name), indent=2, default=str))
