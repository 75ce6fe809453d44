"""Prefect flow ``label-videos``: label an archive with a trained model into Parquet tables.

    python flows/label_videos.py VIDEOS [VIDEOS ...] --model MODEL --out OUT [--split test]

The flow only orchestrates: the work is ``rnnimg.label.label`` on Ray Data. A retry of the
labelling task resumes the run: shards already committed are not redone.
"""

from __future__ import annotations

import argparse
import json

from prefect import flow, get_run_logger, task

from rnnimg.label import LabelConfig, LabelResult, clip_accuracy, label


@task(name="label-archive", retries=1, retry_delay_seconds=5)
def label_task(videos: list[str], model: str, out: str, config: LabelConfig, splits: list[str] | None, ray_address: str | None) -> LabelResult:
    return label(videos, model, out, config, splits=splits, ray_address=ray_address)


@task(name="clip-accuracy", retries=2, retry_delay_seconds=2)
def accuracy_task(out: str, truth: str) -> tuple[float, int]:
    return clip_accuracy(out, truth)


@flow(name="label-videos", log_prints=True)
def label_videos(
    videos: list[str],
    model: str,
    out: str,
    splits: list[str] | None = None,
    truth: str | None = None,
    videos_per_shard: int = 16,
    batch_size: int = 32,
    actors: int = 1,
    ray_address: str | None = None,
) -> dict:
    """Label ``videos`` (folders, prefixes, videos or manifests) with ``model``; tables go to ``out``."""
    logger = get_run_logger()
    config = LabelConfig(videos_per_shard=videos_per_shard, batch_size=batch_size, actors=actors)
    result = label_task(videos, model, out, config, splits, ray_address)
    summary = result.summary()
    logger.info("labelled %d videos (%d ok, %d partial, %d failed), %d clips -> %s",
                result.videos, result.ok, result.partial, result.failed, result.clips, out)
    if truth:
        summary["test_clip_accuracy"], summary["test_clips"] = accuracy_task(out, truth)
        logger.info("test-split clip accuracy: %.3f over %d clips", summary["test_clip_accuracy"], summary["test_clips"])
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the label-videos flow in this process.")
    parser.add_argument("videos", nargs="+")
    parser.add_argument("--model", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", action="append", dest="splits")
    parser.add_argument("--truth")
    args = parser.parse_args()
    print(json.dumps(label_videos(args.videos, args.model, args.out, args.splits, args.truth), indent=2, default=str))
