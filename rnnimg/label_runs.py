"""The incremental-labelling base: which runs labelled what, and what the next run labels.

Shared by the ``label-videos`` flow (which wraps ``plan_run`` and ``record_run`` in Prefect tasks)
and the report (``completed_runs``). Store layout under a base output ``BASE`` (local or ``s3://``)::

    BASE/runs/<run_id>/                 one ``rnnimg label`` output per run: clips/, videos/, _run/, run.json
    BASE/runs/<run_id>/_delta.parquet   the run's input: the videos it labels (video_uri, size, version, label, split)
    BASE/state.json                     every run (id, model, status, counts), the last successful run per model,
                                        and the run in progress (``pending``), if any
    BASE/_lock/                         the lock (``rnnimg.store_lock``): one run at a time writes under BASE

A run lists the input, compares it with the listings of the earlier completed runs of the same
model (``BASE/runs/*/_run/manifest.parquet``) and labels only the videos that are new or whose
size or version changed; a new model has no earlier runs, so it relabels everything. A video
whose last run failed for a reason that may pass (``TRANSIENT_ERRORS``: the store hiccuped, the
file was briefly missing) is retried by the next runs, up to ``MAX_ATTEMPTS`` labellings in all
(``attempt`` in the videos table); one that failed for good (``decode``, ``no_video_stream``,
``limits``, ``refused``, ...) waits until the file changes. A planned run is written down before
any labelling, so that the next run of the same model resumes it.

Needs neither Prefect, Ray nor torch: the labelling result comes in as its summary dict.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import pyarrow as pa

from rnnimg import storage
from rnnimg.manifest import Listing, VideoRow, list_inputs
from rnnimg.store_lock import StoreLock

log = logging.getLogger("rnnimg.label_runs")

STATE_VERSION = 1
# error_type values of a failed video that a later run may not see again: retried, up to MAX_ATTEMPTS.
TRANSIENT_ERRORS = frozenset({"storage", "not_found", "unexpected"})
MAX_ATTEMPTS = 3  # labellings of one unchanged video, the first included

DELTA_SCHEMA = pa.schema(
    [
        ("video_uri", pa.string()),  # absolute URI
        ("size", pa.int64()),  # bytes when listed
        ("version", pa.string()),  # mtime (local) or ETag (S3) when listed
        ("label", pa.string()),  # true label from a manifest, if any
        ("split", pa.string()),  # split from a manifest, if any
        ("refused", pa.string()),  # why the listing refused the URI ("" when admitted)
        ("attempt", pa.int32()),  # 1 for a first labelling, n for the n-th try of a failed video
    ]
)


class NoCompletedRun(LookupError):
    """A base has no completed run (of the model asked for); the message names the models that have some."""


def state_uri(base: str) -> str:
    return storage.join(base, "state.json")


def run_out(base: str, run_id: str) -> str:
    """The output folder of one run: ``BASE/runs/<run_id>``."""
    return storage.join(base, "runs", run_id)


def delta_uri(base: str, run_id: str) -> str:
    """The input table of one run: ``BASE/runs/<run_id>/_delta.parquet``."""
    return storage.join(run_out(base, run_id), "_delta.parquet")


def is_base(location: str) -> bool:
    """Whether ``location`` is a labelling base (it has a state.json)."""
    return storage.exists(state_uri(location))


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


def write_state(base: str, state: dict) -> None:
    """Replace ``BASE/state.json`` atomically."""
    storage.write_json(state_uri(base), state)


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
    rows: tuple[VideoRow, ...]  # the videos to label: new + changed + retried
    resumed: bool = False  # finishing a run that had crashed
    retried: int = 0  # unchanged, but their last run failed for a transient reason: tried again
    left_out: dict = field(default_factory=dict)  # files under the input folders that are not videos: extension -> count

    @property
    def todo(self) -> int:
        return len(self.rows)


def list_input(videos: list[str], splits: list[str] | None, allow_prefixes: list[str] | None = None,
               extensions: list[str] | None = None, stills: bool = False) -> Listing:
    """The input listing, once per location, first occurrence of a URI kept (as ``rnnimg label`` does).

    Raises:
        ValueError: nothing listed.
    """
    return list_inputs(videos, splits, allow_prefixes=allow_prefixes, extensions=extensions, stills=stills)


def labels_stills(model_uri: str) -> bool:
    """Whether the model at ``model_uri`` labels still images (its task's ``needs_video`` is false):
    then a folder listing includes them (``rnnimg.manifest.image_extensions``)."""
    from rnnimg import checkpoint, tasks

    exported = checkpoint.read_config(model_uri)
    task = tasks.get(exported.task)
    return not task.needs_video(task.config_from_dict(exported.config))


@dataclass(frozen=True)
class Seen:
    """A video as the latest completed run of a model left it."""

    size: int
    version: str
    status: str = "ok"  # its row in that run's videos table ("" when the table has no row for it)
    error_type: str = ""
    attempt: int = 1

    def retry(self) -> bool:
        """Whether an unchanged video is worth another try."""
        return self.status == "failed" and self.error_type in TRANSIENT_ERRORS and self.attempt < MAX_ATTEMPTS


def labelled_before(base: str, state: dict, model_id: str) -> dict[str, Seen]:
    """video_uri -> how the latest completed run of ``model_id`` that listed it left it."""
    known: dict[str, Seen] = {}
    for run in state["runs"]:  # oldest first: later runs win
        if run.get("status") != "completed" or run.get("model_id") != model_id:
            continue
        out = run_out(base, run["run_id"])
        listing = storage.join(out, "_run", "manifest.parquet")
        if not storage.exists(listing):  # an operator removed the run folder: its videos are labelled again
            log.warning("run %s has no listing at %s: its videos count as not labelled", run["run_id"], listing)
            continue
        outcomes = _outcomes(out)
        table = storage.read_table(listing, columns=["video_uri", "size", "version"]).to_pydict()
        for uri, size, version in zip(table["video_uri"], table["size"], table["version"]):
            status, error_type, attempt = outcomes.get(uri, ("", "", 1))
            known[uri] = Seen(int(size) if size is not None else -1, str(version or ""), status, error_type, attempt)
    return known


def _outcomes(out: str) -> dict[str, tuple[str, str, int]]:
    """video_uri -> (status, error_type, attempt) of one run's videos table."""
    videos = storage.join(out, "videos")
    if not storage.exists(videos):
        return {}
    table = storage.read_table(videos)
    columns = table.to_pydict()
    attempts = columns.get("attempt") or [1] * table.num_rows  # tables written before attempts were counted
    return {u: (s, e or "", int(a or 1)) for u, s, e, a in zip(columns["video_uri"], columns["status"], columns["error_type"], attempts)}


def plan_delta(listing: list[VideoRow], known: dict[str, Seen], run_id: str, model_id: str, full: bool = False,
               left_out: dict | None = None) -> Delta:
    """Compare a listing with what was labelled: new, changed and retryable failed videos are labelled, the rest skipped."""
    new, changed, retried, unchanged = [], [], [], 0
    for row in listing:
        seen = None if full else known.get(row.video_uri)
        if seen is None:
            new.append(row)
        elif (seen.size, seen.version) != (row.size, row.version):
            changed.append(row)
        elif seen.retry():
            retried.append(dataclasses.replace(row, attempt=seen.attempt + 1))
        else:
            unchanged += 1
    listed = {row.video_uri for row in listing}
    removed = sum(1 for uri in known if uri not in listed)
    return Delta(run_id, model_id, len(listing), len(new), len(changed), unchanged, removed, tuple(new + changed + retried),
                 retried=len(retried), left_out=dict(left_out or {}))


def new_run_id(suffix: str | None = None) -> str:
    """A run id that sorts by start time: ``<UTC time>-<first 8 characters of suffix, else random hex>``.

    Args:
        suffix: e.g. the Prefect flow run's id, so that a run folder names its flow run.
    """
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + (suffix or uuid.uuid4().hex)[:8]


def write_delta(base: str, delta: Delta) -> str:
    """The run's input as a manifest table (absolute URIs, with size and version): ``label`` reads it.

    Returns:
        Its location, ``delta_uri(base, delta.run_id)``.
    """
    uri = delta_uri(base, delta.run_id)
    columns = {name: [getattr(row, name) for row in delta.rows] for name in DELTA_SCHEMA.names}
    storage.write_table(pa.table(columns, schema=DELTA_SCHEMA), uri)
    return uri


def plan_run(base: str, videos: list[str], splits: list[str] | None, model_id: str, model_uri: str, full: bool, lock: StoreLock,
             run_id_suffix: str | None = None, logger: logging.Logger | logging.LoggerAdapter | None = None,
             allow_prefixes: list[str] | None = None, extensions: list[str] | None = None, stills: bool = False) -> Delta:
    """Resume the crashed run of this model, or list the input and compute what is new or changed.

    A planned run is written down (``_delta.parquet`` and ``state.json``'s ``pending``) before
    any labelling, so that a crash can be resumed by the next run. A pending run of another
    model is recorded as abandoned.

    Args:
        base: the base output.
        videos: folders/prefixes of videos, videos, or manifest tables.
        splits: with manifests, only rows of these splits.
        model_id: the id of the model at ``model_uri``.
        full: relabel every listed video.
        lock: this run's lock of ``base``, checked before anything is written.
        run_id_suffix: passed to ``new_run_id``.
        allow_prefixes, extensions, stills: the listing's rules (``rnnimg.manifest.list_inputs``;
            ``stills``: the model labels still images, see ``labels_stills``).

    Raises:
        ValueError: nothing listed, or state.json of another version.
        LockLost: another run took the lock over.
    """
    logger = logger or log
    state = read_state(base)
    pending = state.get("pending")
    if pending and pending["model_id"] == model_id:
        rows = tuple(VideoRow(**row) for row in storage.read_table(pending["delta"]).to_pylist())
        logger.info("resuming run %s of model %s: %d videos", pending["run_id"], model_id, len(rows))
        return Delta(pending["run_id"], model_id, pending["listed"], pending["new"], pending["changed"], pending["unchanged"],
                     pending["removed"], rows, resumed=True, retried=pending.get("retried", 0), left_out=pending.get("left_out", {}))
    if pending:
        logger.warning("run %s of model %s did not finish; model %s replaces it", pending["run_id"], pending["model_id"], model_id)
        state["runs"].append({**pending, "status": "abandoned", "finished_at": time.time()})
        state["pending"] = None
    listing = list_input(videos, splits, allow_prefixes, extensions, stills=stills)
    known = labelled_before(base, state, model_id)
    delta = plan_delta(listing.rows, known, new_run_id(run_id_suffix), model_id, full=full, left_out=listing.skipped)
    if delta.todo:
        lock.check()
        written = write_delta(base, delta)
        state["pending"] = {"run_id": delta.run_id, "model_id": model_id, "model_uri": model_uri, "delta": written,
                            "started_at": time.time(), "listed": delta.listed, "new": delta.new, "changed": delta.changed,
                            "unchanged": delta.unchanged, "removed": delta.removed, "retried": delta.retried,
                            "left_out": delta.left_out}
    if delta.todo or pending:
        write_state(base, state)
    return delta


def record_run(base: str, delta: Delta, result: Mapping, model_uri: str, lock: StoreLock) -> dict:
    """Mark the run completed in ``state.json``: from now on its videos count as labelled by this model.

    Args:
        result: the labelling's summary (``rnnimg.label.LabelResult.summary()``): ``model_id``,
            ``videos``, ``ok``, ``partial``, ``failed``, ``clips``, ``seconds``.

    Returns:
        The run's record in state.json (the existing one when a retry finds it written).

    Raises:
        ValueError: the result is of another model than the one planned.
        LockLost: another run took the lock over: nothing is recorded.
    """
    if result["model_id"] != delta.model_id:
        raise ValueError(f"the model at {model_uri} changed during the run ({delta.model_id} -> {result['model_id']}); rerun")
    lock.check()
    state = read_state(base)
    done = [r for r in state["runs"] if r["run_id"] == delta.run_id and r["status"] == "completed"]
    if done:  # a retry after the state was written
        return done[0]
    record = {"run_id": delta.run_id, "model_id": delta.model_id, "model_uri": model_uri, "status": "completed",
              "finished_at": time.time(), "out": run_out(base, delta.run_id), "listed": delta.listed, "new": delta.new,
              "changed": delta.changed, "unchanged": delta.unchanged, "removed": delta.removed, "retried": delta.retried,
              "left_out": delta.left_out,
              "videos": result["videos"],
              "ok": result["ok"], "partial": result["partial"], "failed": result["failed"], "clips": result["clips"],
              "seconds": result["seconds"], "resumed": delta.resumed}
    pending = state.get("pending") or {}
    if pending.get("run_id") == delta.run_id:
        record["started_at"] = pending.get("started_at")
        state["pending"] = None
    state["runs"].append(record)
    state["last_success"][delta.model_id] = delta.run_id
    write_state(base, state)
    return record


def completed_runs(base: str, model_id: str | None = None) -> tuple[str, list[dict]]:
    """The completed runs of one model, oldest first: what its current labels are made of.

    Args:
        model_id: the model (default: the model of the latest completed run).

    Returns:
        (the model id, its run records as in state.json: ``run_id``, ``model_id``, counts, ...).

    Raises:
        NoCompletedRun: no completed run at all, or none of ``model_id``.
        ValueError: state.json of another version.
    """
    completed = [r for r in read_state(base)["runs"] if r.get("status") == "completed"]
    if not completed:
        raise NoCompletedRun(f"{base} has no completed labelling run yet (state.json lists none)")
    model_id = model_id or completed[-1]["model_id"]
    runs = [r for r in completed if r["model_id"] == model_id]
    if not runs:
        known = sorted({r["model_id"] for r in completed})
        raise NoCompletedRun(f"{base} has no completed run of model {model_id!r}; models with runs: {known}")
    return model_id, runs
