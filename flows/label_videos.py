"""Prefect flow ``label-videos``: label what is new or changed in an archive, one run folder per run.

    python flows/label_videos.py VIDEOS [VIDEOS ...] --model MODEL --out BASE [--split test] [--full]
    prefect deployment run label-videos/local                # its hourly schedule runs the same

The store layout under the base output ``BASE`` (local folder or ``s3://``) and the incremental
logic are ``rnnimg.label_runs``: a run lists the input, labels only the videos that are new or
whose size or version changed since the earlier completed runs of the same model (a new model
relabels everything; ``full`` relabels everything anyway), and a run that crashed is resumed by
the next run of the same model. Nothing new: no run folder, the run ends Completed with zero
videos. Two runs never write under one ``BASE`` at once: ``rnnimg.store_lock.StoreLock``, taken
over only when its holder stopped refreshing it for ``lock_stale_seconds``.

``rnnimg report BASE`` (or the ``label-report`` flow) reads the current labels: for each video,
the latest run of the model that labelled it.

The flow only orchestrates: the labelling is ``rnnimg.label.label`` on Ray Data, on the cluster
named by ``params.ray_address`` or ``RAY_ADDRESS`` (an unreachable one fails the run in seconds),
else a local Ray. It publishes the counts (table), a link to the run's tables and the label
distribution (markdown) as artifacts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from flowkit import Location, artifact_key, location_link, markdown_table, run_logger, transient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rnnimg import checkpoint, label_runs, storage
from rnnimg.label import LabelConfig, LabelResult, clip_accuracy, label
from rnnimg.label_runs import Delta
from rnnimg.runtime import check_ray_address
from rnnimg.store_lock import LockHeld, StoreLock


class LabelParams(BaseModel):
    """Parameters of one labelling run (``rnnimg label --help`` explains the shared options)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    videos: list[Location] = Field(min_length=1, description="folders/prefixes of videos, videos, or manifest tables")
    model: Location = Field(description="exported model folder (OUT/model of train-crnn)")
    out: Location = Field(description="base output: BASE/runs/<run_id>/ per run, BASE/state.json")
    splits: list[str] | None = Field(None, description="with manifests: label only rows of these splits")
    truth: Location | None = Field(None, description="manifest with true labels: log the clip accuracy on its test split")
    full: bool = Field(False, description="relabel every video, not only the new and changed ones")
    videos_per_shard: int = Field(LabelConfig.videos_per_shard, ge=1, le=100_000, description="videos committed together (the unit of resume)")
    batch_size: int = Field(LabelConfig.batch_size, ge=1, le=4096, description="clips per model call")
    actors: int = Field(LabelConfig.actors, ge=1, le=1024, description="model replicas in the Ray actor pool")
    coordinators: int = Field(LabelConfig.coordinators, ge=1, le=1024, description="pipelines (Ray actors), each with a share of the shards and replicas")
    stride_seconds: float | None = Field(None, gt=0, description="distance between clip starts (default: the model's)")
    range_seconds: float = Field(LabelConfig.range_seconds, gt=0, description="seconds of video per decode task: longer videos are split into ranges, shorter ones packed")
    min_segment_seconds: float = Field(LabelConfig.min_segment_seconds, ge=0, description="shorter segments are absorbed by a neighbour")
    lock_stale_seconds: float = Field(600.0, ge=30, description="a lock not refreshed for this long is taken over")
    allow_prefixes: list[Location] | None = Field(None, description="locations a manifest may name besides its own bucket")
    extensions: list[str] | None = Field(None, description="file extensions that are videos in a folder listing (default: FFmpeg's video demuxers')")
    embeddings: bool = Field(False, description="also write each clip's recurrent features (float16) into the clips table")
    ray_address: str | None = Field(None, description="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")

    @model_validator(mode="after")
    def _coordinators_have_replicas(self) -> "LabelParams":
        if self.coordinators > self.actors:
            raise ValueError(f"coordinators ({self.coordinators}) must be at most actors ({self.actors}): each runs at least one replica")
        return self

    def label_config(self) -> LabelConfig:
        return LabelConfig(videos_per_shard=self.videos_per_shard, batch_size=self.batch_size, actors=self.actors, coordinators=self.coordinators,
                           stride_seconds=self.stride_seconds, range_seconds=self.range_seconds,
                           min_segment_seconds=self.min_segment_seconds, embeddings=self.embeddings)


# ----------------------------------------------------------------------------- tasks


@task(name="model-identity", retries=3, retry_delay_seconds=2, retry_condition_fn=transient)
def model_identity(model: str) -> str:
    """The model id: first 16 hex digits of the weights' SHA-256 (as in the label tables)."""
    return checkpoint.model_id(model)


@task(name="check-ray")
def check_ray(address: str | None) -> None:
    """Fail in seconds if the named Ray cluster does not answer (Ray itself starts only if there is work)."""
    check_ray_address(address)


def _retry_unless_held(task, task_run, state) -> bool:
    """Retry storage errors while taking the lock; a lock held by another run fails at once."""
    try:
        state.result()
    except LockHeld:
        return False
    except Exception:  # noqa: BLE001 - the generic policy decides the rest
        return transient(task, task_run, state)
    return False


@task(name="acquire-lock", retries=2, retry_delay_seconds=5, retry_condition_fn=_retry_unless_held, cache_policy=NO_CACHE)
def acquire_lock(base: str, stale_after_s: float) -> StoreLock:
    from prefect.runtime import flow_run

    owner = f"flow run {flow_run.name or '?'} ({flow_run.id or 'not in a flow run'})"
    return StoreLock(base, owner, stale_after_s).acquire()


@task(name="release-lock", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def release_lock(lock: StoreLock) -> None:
    lock.release()


@task(name="plan-run", retries=2, retry_delay_seconds=5, retry_condition_fn=transient, cache_policy=NO_CACHE)
def plan_run(params: LabelParams, model_id: str, lock: StoreLock) -> Delta:
    """Resume the crashed run of this model, or plan what is new or changed (``rnnimg.label_runs.plan_run``)."""
    from prefect.runtime import flow_run

    return label_runs.plan_run(params.out, params.videos, params.splits, model_id, params.model, params.full, lock,
                               run_id_suffix=flow_run.id, logger=run_logger(), allow_prefixes=params.allow_prefixes,
                               extensions=params.extensions, stills=label_runs.labels_stills(params.model))


@task(name="label-delta", retries=1, retry_delay_seconds=10, retry_condition_fn=transient, cache_policy=NO_CACHE)
def label_delta(params: LabelParams, delta: Delta) -> LabelResult:
    """Ray Data labelling of the run's videos into ``BASE/runs/<run_id>``; a retry keeps committed shards."""
    from prefect.runtime import flow_run

    # The delta was listed under the flow's rules (confinement included): label it as listed.
    return label(label_runs.delta_uri(params.out, delta.run_id), params.model, label_runs.run_out(params.out, delta.run_id),
                 params.label_config(), run_id=delta.run_id, ray_address=params.ray_address, listing=list(delta.rows),
                 owner=f"flow run {flow_run.name or '?'} ({flow_run.id or 'not in a flow run'})")


@task(name="record-run", retries=3, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NO_CACHE)
def record_run(params: LabelParams, delta: Delta, result: LabelResult, lock: StoreLock) -> dict:
    """Mark the run completed in ``state.json``: from now on its videos count as labelled by this model."""
    return label_runs.record_run(params.out, delta, result.summary(), params.model, lock)


@task(name="clip-accuracy", retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def accuracy(out: str, truth: str) -> tuple[float, int]:
    return clip_accuracy(out, truth)


@task(name="publish-labelling", retries=2, retry_delay_seconds=2)
def publish_labelling(params: LabelParams, summary: dict) -> None:
    """Artifacts: this run's counts (table), its tables (link), the label distribution (markdown)."""
    from rnnimg.report import label_counts

    key = artifact_key("label", storage.basename(params.out))
    counts_columns = ["run_id", "model_id", "listed", "new", "changed", "retried", "unchanged", "removed", "videos", "ok", "partial",
                      "failed", "clips", "seconds"]
    create_table_artifact([{c: summary.get(c) for c in counts_columns}], key=f"{key}-counts",
                          description=f"Labelling run {summary['run_id']} under {params.out}")
    target = summary["out"] or params.out
    create_link_artifact(location_link(target), link_text=f"label tables of run {summary['run_id']}" if summary["out"] else "the base output",
                         key=f"{key}-tables", description="clips/ and videos/ of this run (rnnimg report BASE reads all runs)")
    distribution = label_counts(summary["out"]) if summary["out"] else {}
    total = sum(distribution.values())
    rows = [{"label": k, "clips": v, "share": v / total} for k, v in distribution.items()]
    lines = [
        f"# label-videos run `{summary['run_id']}`",
        "",
        f"- model `{summary['model_id']}`; base `{params.out}`",
        f"- listed {summary['listed']} videos: {summary['new']} new, {summary['changed']} changed, "
        f"{summary['retried']} retried after a transient failure, {summary['unchanged']} unchanged (skipped), "
        f"{summary['removed']} no longer listed",
        "- left out of the listing (not videos by their extension): "
        + (", ".join(f"{n} {ext or '(no extension)'}" for ext, n in sorted(summary["left_out"].items())) or "nothing"),
        f"- labelled {summary['videos']}: {summary['ok']} ok, {summary['partial']} partial, {summary['failed']} failed; "
        f"{summary['clips']} clips in {summary['seconds']:.0f} s" + (" (resumed a crashed run)" if summary.get("resumed") else ""),
    ]
    if summary.get("test_clips"):
        lines.append(f"- test-split clip accuracy {summary['test_clip_accuracy']:.3f} over {summary['test_clips']} clips")
    lines += ["", "## Label distribution of this run", "", markdown_table(rows, ["label", "clips", "share"], {"share": "{:.3f}"})
              if rows else "No clips labelled in this run."]
    create_markdown_artifact("\n".join(lines), key=f"{key}-summary", description=f"Labelling run {summary['run_id']}")


# ----------------------------------------------------------------------------- the flow


@flow(name="label-videos", log_prints=True)
def label_videos(params: LabelParams) -> dict:
    """Label the new and changed videos of ``params.videos`` with ``params.model`` under ``params.out``.

    Returns:
        The run's summary: ``run_id``, ``model_id``, ``out`` (the run folder, None when nothing
        was new), listing counts (``listed``, ``new``, ``changed``, ``retried``, ``unchanged``, ``removed``,
        ``left_out``: files that are not videos, by extension),
        labelling counts (``videos``, ``ok``, ``partial``, ``failed``, ``clips``), ``seconds``,
        and with ``truth`` ``test_clip_accuracy``/``test_clips``.
    """
    logger = get_run_logger()
    started = time.perf_counter()
    check_ray(params.ray_address)
    model_id = model_identity(params.model)
    lock = acquire_lock(params.out, params.lock_stale_seconds)
    try:
        delta = plan_run(params, model_id, lock)
        logger.info("model %s: %d listed, %d new, %d changed, %d retried, %d unchanged, %d no longer listed; left out (not videos): %s",
                    model_id, delta.listed, delta.new, delta.changed, delta.retried, delta.unchanged, delta.removed, delta.left_out or "nothing")
        result = label_delta(params, delta) if delta.todo else None
        if result is not None:
            record_run(params, delta, result, lock)
    finally:
        release_lock(lock)

    counts = result.summary() if result else {"videos": 0, "ok": 0, "partial": 0, "failed": 0, "clips": 0}
    summary = {**{k: v for k, v in asdict(delta).items() if k != "rows"}, **{k: counts[k] for k in ("videos", "ok", "partial", "failed", "clips")},
               "base": params.out, "out": result.out if result else None, "seconds": round(time.perf_counter() - started, 3)}
    if result is None:
        logger.info("nothing new or changed under %s for model %s: no run folder written", params.out, model_id)
    else:
        logger.info("run %s labelled %d videos (%d ok, %d partial, %d failed), %d clips -> %s",
                    delta.run_id, result.videos, result.ok, result.partial, result.failed, result.clips, result.out)
    if params.truth and result is not None:
        summary["test_clip_accuracy"], summary["test_clips"] = accuracy(result.out, params.truth)
        logger.info("test-split clip accuracy: %.3f over %d clips", summary["test_clip_accuracy"], summary["test_clips"])
    publish_labelling(params, summary)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run the label-videos flow in this process.")
    parser.add_argument("videos", nargs="+", help="folders/prefixes of videos, videos, or manifest tables")
    parser.add_argument("--model", required=True, help="exported model folder")
    parser.add_argument("--out", required=True, help="base output (BASE/runs/<run_id>, BASE/state.json)")
    parser.add_argument("--split", action="append", dest="splits", help="with a manifest: label only this split (repeatable)")
    parser.add_argument("--truth", help="manifest with true labels: log the test-split clip accuracy")
    parser.add_argument("--full", action="store_true", help="relabel everything, not only new and changed videos")
    args = parser.parse_args()
    try:
        label_params = LabelParams(videos=args.videos, model=args.model, out=args.out, splits=args.splits, truth=args.truth, full=args.full)
    except ValidationError as err:
        sys.exit(f"label-videos: {err}")
    print(json.dumps(label_videos(label_params), indent=2, default=str))
