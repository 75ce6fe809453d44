"""Prefect flow ``label-videos``: label what is new or changed in an archive, one run folder per run.

    python flows/label_videos.py VIDEOS [VIDEOS ...] --model MODEL --out BASE [--split test] [--full]
    prefect deployment run label-videos/local                # its hourly schedule runs the same

Store layout under the base output ``BASE`` (local folder or ``s3://``)::

    BASE/runs/<run_id>/          one ``rnnimg label`` output per run: clips/, videos/, _run/, run.json
    BASE/runs/<run_id>/_delta.parquet   the run's input: the videos it labels (video_uri, size, version, label, split)
    BASE/state.json              every run (id, model, status, counts), the last successful run per model,
                                 and the run in progress, if any
    BASE/_lock/lock-NNNNNNNN.json   the lock: one run at a time writes under BASE

A run lists the input (``rnnimg.manifest.resolve_all``), compares it with the listings of the
earlier completed runs of the same model (``BASE/runs/*/_run/manifest.parquet``) and labels only
the videos that are new or whose size or version changed; a new model (other weights) has no
earlier runs, so it relabels everything; ``full`` relabels everything anyway. Nothing new: no run
folder, the run ends Completed with zero videos. A run that crashed is resumed by the next run of
the same model (same run folder: committed shards are kept). Two runs never write under one
``BASE`` at once: the lock is created with create-if-absent semantics and taken over only when
its holder stopped refreshing it for ``lock_stale_seconds``.

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
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass

import pyarrow as pa
from flowkit import Location, artifact_key, check_ray_address, location_link, markdown_table, run_logger, transient
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from rnnimg import storage
from rnnimg.label import LabelConfig, LabelResult, clip_accuracy, label
from rnnimg.manifest import VideoRow, resolve_all

log = logging.getLogger("rnnimg.flows.label_videos")

STATE_VERSION = 1


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
    stride_seconds: float | None = Field(None, gt=0, description="distance between clip starts (default: the model's)")
    range_seconds: float = Field(LabelConfig.range_seconds, gt=0, description="seconds of video per decode task: longer videos are split into ranges, shorter ones packed")
    min_segment_seconds: float = Field(LabelConfig.min_segment_seconds, ge=0, description="shorter segments are absorbed by a neighbour")
    lock_stale_seconds: float = Field(600.0, ge=30, description="a lock not refreshed for this long is taken over")
    ray_address: str | None = Field(None, description="Ray cluster to use (default: RAY_ADDRESS, else a local Ray)")

    def label_config(self) -> LabelConfig:
        return LabelConfig(videos_per_shard=self.videos_per_shard, batch_size=self.batch_size, actors=self.actors,
                           stride_seconds=self.stride_seconds, range_seconds=self.range_seconds,
                           min_segment_seconds=self.min_segment_seconds)


# ----------------------------------------------------------------------------- store helpers


def create_if_absent(location: str, data: bytes) -> bool:
    """Write a file only if nothing is there yet; of two writers exactly one gets True.

    Locally: the content goes to a temporary file that is hard-linked into place (``link``
    fails if the name exists), so the file is complete the moment it appears. On S3: a
    conditional ``PutObject`` (``If-None-Match: *``, AWS S3, MinIO), through boto3.

    Raises:
        StorageError: the store failed otherwise.
    """
    if storage.is_s3(location):
        return _s3_create_if_absent(location, data)
    _, path = storage.resolve(location)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _s3_create_if_absent(location: str, data: bytes) -> bool:
    try:
        import boto3
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError as err:  # pragma: no cover - depends on the installation
        raise storage.StorageError(f"the lock on {location} needs boto3 (pip install boto3): {err}") from err
    bucket, _, key = location[len("s3://"):].partition("/")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
    except ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise storage.StorageError(f"create {location}: {err}") from err
    except BotoCoreError as err:
        raise storage.StorageError(f"create {location}: {err}") from err
    return True


class LockHeld(RuntimeError):
    """Another run holds the lock of this output."""


class LockLost(RuntimeError):
    """This run's lock was taken over (it had gone stale); its results are not recorded."""


class StoreLock:
    """One writer at a time under a base location, with a lock object in the store itself.

    The lock is a sequence of files ``BASE/_lock/lock-<generation>.json``; the highest
    generation is the lock. It is free when absent, released, or stale (not refreshed for
    ``stale_after_s``). Taking it means creating the next generation with create-if-absent: two
    runs that saw the same state race for the same name and only one wins, including when both
    take over a stale lock. The holder refreshes its file every ``heartbeat_s`` in a thread, so
    a long run keeps the lock and a crashed one loses it after ``stale_after_s``. Staleness uses
    the writers' clocks: keep ``stale_after_s`` far above the clock skew between machines.
    """

    def __init__(self, base: str, owner: str, stale_after_s: float = 600.0, heartbeat_s: float | None = None):
        if not stale_after_s > 0:
            raise ValueError(f"stale_after_s must be > 0, got {stale_after_s}")
        self.base = base
        self.folder = storage.join(base, "_lock")
        self.owner = owner
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s) if heartbeat_s else max(1.0, min(60.0, self.stale_after_s / 4))
        self.token = uuid.uuid4().hex
        self.generation: int | None = None
        self.lost = False
        self._acquired_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _uri(self, generation: int) -> str:
        return storage.join(self.folder, f"lock-{generation:08d}.json")

    def _generations(self) -> list[int]:
        try:
            files = storage.list_files(self.folder, (".json",))
        except FileNotFoundError:
            return []
        out = []
        for f in files:
            name = storage.basename(f.uri)
            if name.startswith("lock-") and name[5:-5].isdigit():
                out.append(int(name[5:-5]))
        return sorted(out)

    def _read(self, generation: int) -> dict | None:
        try:
            return storage.read_json(self._uri(generation))
        except FileNotFoundError:
            return None
        except ValueError:  # unreadable: treat as held, refreshed now (conservative)
            return {"owner": "unknown (unreadable lock file)", "heartbeat_at": time.time()}

    def _record(self, **extra) -> bytes:
        now = time.time()
        record = {"owner": self.owner, "token": self.token, "generation": self.generation, "host": socket.gethostname(),
                  "pid": os.getpid(), "acquired_at": self._acquired_at or now, "heartbeat_at": now,
                  "stale_after_s": self.stale_after_s, **extra}
        return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()

    def holder(self) -> tuple[int, dict] | None:
        """The live lock (generation, record), or None when the lock is free."""
        generations = self._generations()
        if not generations:
            return None
        top = generations[-1]
        record = self._read(top)
        if record is None or record.get("released_at"):
            return None
        if time.time() - float(record.get("heartbeat_at", 0)) > self.stale_after_s:
            return None
        return top, record

    def acquire(self) -> "StoreLock":
        """Take the lock or fail at once.

        Raises:
            LockHeld: another run holds it (the message names it and how to clear a dead one).
        """
        generations = self._generations()
        top = generations[-1] if generations else 0
        if top:
            record = self._read(top)
            if record and not record.get("released_at"):
                age = time.time() - float(record.get("heartbeat_at", 0))
                if age <= self.stale_after_s:
                    raise LockHeld(
                        f"{self.base} is being written by {record.get('owner')} on {record.get('host')} "
                        f"(lock {self._uri(top)}, refreshed {age:.0f} s ago); runs never overlap on one output: "
                        f"wait for it, or, if that run is gone, delete the lock file or wait {self.stale_after_s:.0f} s"
                    )
                log.warning("taking over a stale lock of %s (%s, not refreshed for %.0f s)", self.base, record.get("owner"), age)
        self.generation = top + 1
        self._acquired_at = time.time()
        if not create_if_absent(self._uri(self.generation), self._record()):
            self.generation = None
            raise LockHeld(f"{self.base}: another run took the lock at the same moment ({self._uri(top + 1)})")
        for old in generations:  # earlier generations are history; the newest decides
            storage.delete(self._uri(old))
        self._thread = threading.Thread(target=self._heartbeat, name="rnnimg-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._still_mine():
                    self.lost = True
                    log.error("lost the lock of %s: another run took it over", self.base)
                    return
                storage.write_bytes(self._uri(self.generation), self._record())
            except Exception as err:  # noqa: BLE001 - a failed refresh is retried at the next beat
                log.warning("could not refresh the lock of %s: %s", self.base, err)

    def _still_mine(self) -> bool:
        generations = self._generations()
        if not generations or generations[-1] != self.generation:
            return False
        record = self._read(self.generation)
        return bool(record) and record.get("token") == self.token

    def check(self) -> None:
        """Raise LockLost unless this run still holds the lock (called before recording results)."""
        if self.generation is None or self.lost or not self._still_mine():
            self.lost = True
            raise LockLost(f"{self.base}: this run's lock was taken over by another run; its results are not recorded")

    def release(self) -> None:
        """Stop refreshing and mark the lock released (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.generation is not None and not self.lost and self._still_mine():
            storage.write_bytes(self._uri(self.generation), self._record(released_at=time.time()))
        self.generation = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- state and delta


def state_uri(base: str) -> str:
    return storage.join(base, "state.json")


def run_out(base: str, run_id: str) -> str:
    return storage.join(base, "runs", run_id)


def read_state(base: str) -> dict:
    """``BASE/state.json``, or an empty state for a new base.

    Raises:
        ValueError: the file is from another version of this flow.
    """
    uri = state_uri(base)
    if not storage.exists(uri):
        return {"version": STATE_VERSION, "runs": [], "last_success": {}, "pending": None}
    state = storage.read_json(uri)
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"{uri} has state version {state.get('version')!r}; this flow reads version {STATE_VERSION}")
    return state


@dataclass(frozen=True)
class Delta:
    """What one run labels, and why."""

    run_id: str
    model_id: str
    listed: int  # videos in the input listing now
    new: int  # never labelled by this model
    changed: int  # labelled, but the size or version differs now
    unchanged: int  # labelled with this size and version: skipped
    removed: int  # labelled earlier, no longer listed (their labels are kept)
    rows: tuple[VideoRow, ...]  # the videos to label: new + changed
    resumed: bool = False  # finishing a run that had crashed

    @property
    def todo(self) -> int:
        return len(self.rows)


def list_input(videos: list[str], splits: list[str] | None) -> list[VideoRow]:
    """The input listing, once per location, first occurrence of a URI kept (as ``rnnimg label`` does).

    Raises:
        ValueError: nothing listed.
    """
    return resolve_all(videos, splits)


def labelled_before(base: str, state: dict, model_id: str) -> dict[str, tuple[int, str]]:
    """video_uri -> (size, version) as last labelled by a completed run of ``model_id``."""
    known: dict[str, tuple[int, str]] = {}
    for run in state["runs"]:  # oldest first: later runs win
        if run.get("status") != "completed" or run.get("model_id") != model_id:
            continue
        listing = storage.join(run_out(base, run["run_id"]), "_run", "manifest.parquet")
        if not storage.exists(listing):  # an operator removed the run folder: its videos are labelled again
            log.warning("run %s has no listing at %s: its videos count as not labelled", run["run_id"], listing)
            continue
        table = storage.read_table(listing, columns=["video_uri", "size", "version"]).to_pydict()
        for uri, size, version in zip(table["video_uri"], table["size"], table["version"]):
            known[uri] = (int(size) if size is not None else -1, str(version or ""))
    return known


def plan_delta(listing: list[VideoRow], known: dict[str, tuple[int, str]], run_id: str, model_id: str, full: bool = False) -> Delta:
    """Compare a listing with what was labelled: new and changed videos are labelled, the rest skipped."""
    new, changed, unchanged = [], [], 0
    for row in listing:
        seen = None if full else known.get(row.video_uri)
        if seen is None:
            new.append(row)
        elif seen != (row.size, row.version):
            changed.append(row)
        else:
            unchanged += 1
    listed = {row.video_uri for row in listing}
    removed = sum(1 for uri in known if uri not in listed)
    return Delta(run_id, model_id, len(listing), len(new), len(changed), unchanged, removed, tuple(new + changed))


def new_run_id() -> str:
    from prefect.runtime import flow_run

    suffix = (flow_run.id or uuid.uuid4().hex)[:8]
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + suffix


def write_delta(base: str, delta: Delta) -> str:
    """The run's input as a manifest table (absolute URIs, with size and version): ``label`` reads it."""
    uri = storage.join(run_out(base, delta.run_id), "_delta.parquet")
    columns = {f: [getattr(r, f) for r in delta.rows] for f in ("video_uri", "size", "version", "label", "split")}
    table = pa.table(columns, schema=pa.schema([("video_uri", pa.string()), ("size", pa.int64()), ("version", pa.string()),
                                                 ("label", pa.string()), ("split", pa.string())]))
    storage.write_table(table, uri)
    return uri


# ----------------------------------------------------------------------------- tasks


@task(name="model-identity", retries=3, retry_delay_seconds=2, retry_condition_fn=transient)
def model_identity(model: str) -> str:
    """The model id: first 16 hex digits of the weights' SHA-256 (as in the label tables)."""
    import hashlib

    from rnnimg.train import MODEL_WEIGHTS

    weights = storage.join(model, MODEL_WEIGHTS)
    if not storage.exists(weights):
        raise FileNotFoundError(f"no exported model at {model} (missing {MODEL_WEIGHTS}); pass the folder train-crnn wrote as OUT/model")
    return hashlib.sha256(storage.read_bytes(weights)).hexdigest()[:16]


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
    """Resume the crashed run of this model, or list the input and compute what is new or changed.

    A planned run is written down (``_delta.parquet`` and ``state.json``'s ``pending``) before
    any labelling, so that a crash can be resumed by the next run.
    """
    logger = run_logger()
    state = read_state(params.out)
    pending = state.get("pending")
    if pending and pending["model_id"] == model_id:
        table = storage.read_table(pending["delta"]).to_pylist()
        rows = tuple(VideoRow(**r) for r in table)
        logger.info("resuming run %s of model %s: %d videos", pending["run_id"], model_id, len(rows))
        return Delta(pending["run_id"], model_id, pending["listed"], pending["new"], pending["changed"], pending["unchanged"],
                     pending["removed"], rows, resumed=True)
    if pending:
        logger.warning("run %s of model %s did not finish; model %s replaces it", pending["run_id"], pending["model_id"], model_id)
        state["runs"].append({**pending, "status": "abandoned", "finished_at": time.time()})
        state["pending"] = None
    listing = list_input(params.videos, params.splits)
    known = labelled_before(params.out, state, model_id)
    delta = plan_delta(listing, known, new_run_id(), model_id, full=params.full)
    if delta.todo:
        lock.check()
        delta_uri = write_delta(params.out, delta)
        state["pending"] = {"run_id": delta.run_id, "model_id": model_id, "model_uri": params.model, "delta": delta_uri,
                            "started_at": time.time(), "listed": delta.listed, "new": delta.new, "changed": delta.changed,
                            "unchanged": delta.unchanged, "removed": delta.removed}
    if delta.todo or pending:
        storage.write_json(state_uri(params.out), state)
    return delta


@task(name="label-delta", retries=1, retry_delay_seconds=10, retry_condition_fn=transient, cache_policy=NO_CACHE)
def label_delta(params: LabelParams, delta: Delta) -> LabelResult:
    """Ray Data labelling of the run's videos into ``BASE/runs/<run_id>``; a retry keeps committed shards."""
    delta_uri = storage.join(run_out(params.out, delta.run_id), "_delta.parquet")
    return label(delta_uri, params.model, run_out(params.out, delta.run_id), params.label_config(), run_id=delta.run_id,
                 ray_address=params.ray_address)


@task(name="record-run", retries=3, retry_delay_seconds=2, retry_condition_fn=transient, cache_policy=NO_CACHE)
def record_run(params: LabelParams, delta: Delta, result: LabelResult, lock: StoreLock) -> dict:
    """Mark the run completed in ``state.json``: from now on its videos count as labelled by this model."""
    if result.model_id != delta.model_id:
        raise ValueError(f"the model at {params.model} changed during the run ({delta.model_id} -> {result.model_id}); rerun")
    lock.check()
    state = read_state(params.out)
    done = [r for r in state["runs"] if r["run_id"] == delta.run_id and r["status"] == "completed"]
    if done:  # a retry after the state was written
        return done[0]
    record = {"run_id": delta.run_id, "model_id": delta.model_id, "model_uri": params.model, "status": "completed",
              "finished_at": time.time(), "out": run_out(params.out, delta.run_id), "listed": delta.listed, "new": delta.new,
              "changed": delta.changed, "unchanged": delta.unchanged, "removed": delta.removed, "videos": result.videos,
              "ok": result.ok, "partial": result.partial, "failed": result.failed, "clips": result.clips,
              "seconds": result.seconds, "resumed": delta.resumed}
    pending = state.get("pending") or {}
    if pending.get("run_id") == delta.run_id:
        record["started_at"] = pending.get("started_at")
        state["pending"] = None
    state["runs"].append(record)
    state["last_success"][delta.model_id] = delta.run_id
    storage.write_json(state_uri(params.out), state)
    return record


@task(name="clip-accuracy", retries=2, retry_delay_seconds=2, retry_condition_fn=transient)
def accuracy(out: str, truth: str) -> tuple[float, int]:
    return clip_accuracy(out, truth)


@task(name="publish-labelling", retries=2, retry_delay_seconds=2)
def publish_labelling(params: LabelParams, summary: dict) -> None:
    """Artifacts: this run's counts (table), its tables (link), the label distribution (markdown)."""
    from rnnimg.report import label_counts

    key = artifact_key("label", storage.basename(params.out))
    counts_columns = ["run_id", "model_id", "listed", "new", "changed", "unchanged", "removed", "videos", "ok", "partial",
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
        f"{summary['unchanged']} unchanged (skipped), {summary['removed']} no longer listed",
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
        was new), listing counts (``listed``, ``new``, ``changed``, ``unchanged``, ``removed``),
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
        logger.info("model %s: %d listed, %d new, %d changed, %d unchanged, %d no longer listed",
                    model_id, delta.listed, delta.new, delta.changed, delta.unchanged, delta.removed)
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
