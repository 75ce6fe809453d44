"""Label an archive with an exported model, on Ray Data, into Parquet tables.

    rnnimg label ARCHIVE/ --model runs/model --out labels/

The data path:

    list the input -> deterministic shards -> probe headers, plan packs of work (Ray tasks)
        -> decode clips (a Ray task per pack, PyAV) -> Predictor (Ray actor pool, the model)
        -> part files of predicted rows, staged by the actors in the store
        -> per-shard Parquet tables, committed atomically by committer actors

The driver reads the listing and plans shards; the pipeline itself runs in coordinator
actors (``LabelConfig.coordinators``, one by default), each over every k-th pending shard
with its share of the model replicas: a coordinator runs Ray Data's executor and counts small
records (which clips of which video range are in which part, and each range's status). No
clip row reaches a coordinator and none of the pipeline runs in the driver, which starts the
coordinators, shows their progress and waits; several coordinators spread the executor's
work over several processes and nodes on a large cluster.

Everything task-specific comes from the model: its ``config.json`` names its task
(``rnnimg.tasks``), which says what the model adds to each clip row and which tables a shard
writes (classification: ``clips`` and ``segments``). This module never imports training code.

A pack is a range of a long video or several short videos, about ``range_seconds`` of video:
one decode task each, so that Ray's cost per task is paid per minutes of video.

Every video ends as one row of the videos table: ``ok``, ``partial`` (decoding stopped at an
error; the clips before it are kept) or ``failed`` (the reason in ``error``). A broken video
never stops the job.

A shard's table files are written first and its completion record last (``OUT/_commits``),
then its parts (``OUT/_parts/shard-NNNNN/``) are removed (a part a late task writes after that is
never read, and the run sweeps it when its pipelines are done). Rerunning the same command skips
committed shards and rewrites any shard that had not committed, under the same file names, so
no row is written twice.
See ``rnnimg.tables`` for the store layout and schemas.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
import uuid
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Iterator

import numpy as np

# torch stays out of this module's imports: the decode workers import it for its UDFs.
from rnnimg import checkpoint, runtime, storage, tables, tasks
from rnnimg.manifest import VideoRow, list_inputs, shards
from rnnimg.models.precision import check_precision
from rnnimg.progress import LabelProgress
from rnnimg.store_lock import StoreLock
from rnnimg.video.clips import Clip, ClipSpec, clip_count, uniform_clips

log = logging.getLogger("rnnimg.label")


@dataclass(frozen=True)
class LabelConfig:
    """Scale and batching of a labelling run (the clip plan comes from the model's config)."""

    videos_per_shard: int = 32  # videos committed together; the unit of resume and of driver memory
    batch_size: int = 32  # clips per model call
    actors: int = 1  # Predictor actors (model replicas)
    coordinators: int = 1  # pipelines, each in its own actor with a share of the shards and replicas (at most ``actors``)
    actor_cpus: float | None = None  # CPUs reserved per Predictor actor (None: 1 with a GPU, else 0.25)
    gpus_per_actor: float = 0.0  # GPUs per Predictor actor (0: one per actor when the cluster has GPUs)
    decode_cpus: float = 0.75  # CPUs reserved per decode task (decoders are single-threaded)
    decode_memory_mb: int = 512  # memory reserved per decode task (one decoder + one batch of clips)
    stride_seconds: float | None = None  # override the model's clip stride (None: the model's)
    range_seconds: float = 600.0  # work per decode task: longer videos are split into ranges of this many seconds, shorter ones packed
    min_segment_seconds: float = 0.0  # segments shorter than this are absorbed by a neighbour (0: off)
    precision: str = "auto"  # model precision: "bf16" (autocast on GPU, bf16 weights on CPU), "fp32", or "auto" (bf16 on GPU, fp32 on CPU)
    embeddings: bool = False  # also write each clip's recurrent features (float16) in the task's embedding table

    def __post_init__(self) -> None:
        for name in ("videos_per_shard", "batch_size", "actors", "coordinators"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.coordinators > self.actors:
            raise ValueError(f"coordinators ({self.coordinators}) must be at most actors ({self.actors}): each runs at least one replica")
        if (self.actor_cpus is not None and self.actor_cpus <= 0) or self.decode_cpus <= 0:
            raise ValueError(f"actor_cpus and decode_cpus must be > 0, got {self.actor_cpus}, {self.decode_cpus}")
        if self.gpus_per_actor < 0:
            raise ValueError(f"gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.stride_seconds is not None and not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")
        if not self.range_seconds > 0:
            raise ValueError(f"range_seconds must be > 0, got {self.range_seconds}")
        if self.min_segment_seconds < 0:
            raise ValueError(f"min_segment_seconds must be >= 0, got {self.min_segment_seconds}")
        check_precision(self.precision)


class LabelError(RuntimeError):
    """The labelling run cannot start (bad input, model, or a conflicting earlier run)."""


# ----------------------------------------------------------------------------- decode (Ray tasks)


def plan_video(row: dict, spec: dict, range_seconds: float, stills: bool = False) -> list[dict]:
    """One input video -> its work units (time ranges of whole clips).

    Opens the video's header only (no decoding) to read its duration, plans the clips and
    cuts them into ranges of about ``range_seconds``, so that one long video spreads over many
    decode tasks. A video that cannot be opened, or that the listing refused (a remote manifest's
    URI outside its bucket), becomes one unit carrying the error; a refused one is never opened.
    A still image is one clip when the model labels stills (``stills``), else a unit carrying
    the error ``needs_video``.
    """
    from rnnimg.video.decode import VideoError, VideoReader

    clip_spec = ClipSpec(**spec)
    unit = {"shard": int(row["shard"]), "video_uri": str(row["video_uri"]), "range_index": 0, "ranges_total": 1,
            "clip_start": 0, "clip_stop": 0, "duration_s": float("nan"), "error_type": "", "error": ""}
    if row.get("refused"):
        return [{**unit, "error_type": "refused", "error": str(row["refused"])}]
    try:
        with VideoReader(unit["video_uri"]) as reader:
            duration, info = reader.duration_s, reader.info
    except VideoError as err:
        return [{**unit, "error_type": err.error_type, "error": err.message}]
    except Exception as err:  # noqa: BLE001 - one bad video must never stop the job: record it instead
        log.exception("unexpected error opening %s", unit["video_uri"])
        return [{**unit, "error_type": "unexpected", "error": f"{unit['video_uri']}: {type(err).__name__}: {err}"[:500]}]
    if info.still:
        if not stills:
            return [{**unit, "duration_s": 0.0, "error_type": "needs_video",
                     "error": f"{unit['video_uri']}: a still image ({info.codec}, {info.width}x{info.height}); this model needs video "
                              f"({clip_spec.frames_per_clip} frames over {clip_spec.clip_seconds:g} s per clip)"}]
        return [{**unit, "duration_s": 0.0, "clip_stop": 1, "still": True}]
    n_clips = clip_count(duration, clip_spec)  # arithmetic: a plan is built per range, in the range's task
    if n_clips == 0:
        return [{**unit, "duration_s": duration, "error_type": "empty", "error": f"{unit['video_uri']}: the video stream has no duration (no frames)"}]
    per_range = max(1, int(range_seconds // clip_spec.stride_seconds))
    starts = range(0, n_clips, per_range)
    return [
        {**unit, "range_index": i, "ranges_total": len(starts), "clip_start": a, "clip_stop": min(a + per_range, n_clips), "duration_s": duration}
        for i, a in enumerate(starts)
    ]


def pack_units(units: list[dict], stride_seconds: float, pack_seconds: float) -> list[list[dict]]:
    """Consecutive units grouped into packs of at most ``pack_seconds`` of planned video.

    A unit longer than that (a range of a long video is at most ``range_seconds``) is a pack of
    its own; a unit that failed to open costs nothing. Each pack is one decode task: short
    videos share a task, so Ray's cost per task (scheduling, a fresh decoder's set-up) is paid
    once per few minutes of video rather than once per video.
    """
    packs: list[list[dict]] = []
    seconds = 0.0
    for unit in units:
        cost = (unit["clip_stop"] - unit["clip_start"]) * stride_seconds
        if not packs or (seconds + cost > pack_seconds and seconds > 0):
            packs.append([])
            seconds = 0.0
        packs[-1].append(unit)
        seconds += cost
    return packs


def plan_videos(batch: dict, spec: dict, range_seconds: float, threads: int = 8, stills: bool = False) -> dict:
    """Ray Data UDF: a block of listed videos -> packs of work units (one JSON list per row).

    The headers are opened in a few threads: on an object store each open waits on requests.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows = [{"shard": s, "video_uri": u, "refused": r} for s, u, r in zip(batch["shard"], batch["video_uri"], batch["refused"])]
    with ThreadPoolExecutor(max(1, min(threads, len(rows)))) as pool:
        units = [u for planned in pool.map(lambda r: plan_video(r, spec, range_seconds, stills), rows) for u in planned]
    packs = pack_units(units, float(spec["stride_seconds"]), range_seconds)
    return {"pack": np.array([json.dumps(p) for p in packs], dtype=object)}


class _ClipRows:
    """The decode stage's output rows, handed out as batches of ``size`` clips.

    Clip rows carry a clip's frames, uint8 (T, H, W, C); status rows (``is_status``) carry a
    unit's outcome, with zero frames so that every batch has one schema. Rows of several
    units (videos of one pack) share batches.
    """

    COLUMNS = ("shard", "video_uri", "clip_index", "start_s", "end_s", "is_status", "range_index", "ranges_total",
               "status", "error_type", "error", "duration_s", "clips")

    def __init__(self, size: int, frames_per_clip: int, frame_size: int):
        self.size = size
        self._blank = np.zeros((frames_per_clip, frame_size, frame_size, 3), np.uint8)
        self._reset()

    def _reset(self) -> None:
        self._columns: dict[str, list] = {name: [] for name in self.COLUMNS}
        self._frames: list[np.ndarray] = []
        self.clips = 0

    def _add(self, unit: dict, frames: np.ndarray, **values) -> None:
        row = {"shard": unit["shard"], "video_uri": unit["video_uri"], "range_index": unit["range_index"],
               "ranges_total": unit["ranges_total"], "clip_index": -1, "start_s": 0.0, "end_s": 0.0, "is_status": False,
               "status": "", "error_type": "", "error": "", "duration_s": np.nan, "clips": 0, **values}
        for name in self.COLUMNS:
            self._columns[name].append(row[name])
        self._frames.append(frames)

    def clip(self, unit: dict, clip, frames: np.ndarray) -> dict | None:
        """Add a clip; returns a full batch when there is one."""
        self._add(unit, frames, clip_index=clip.clip_index, start_s=clip.start_s, end_s=clip.end_s)
        self.clips += 1
        return self.flush() if self.clips >= self.size else None

    def status(self, unit: dict, status: str, error_type: str | None, error: str | None, duration_s: float | None, clips: int) -> None:
        self._add(unit, self._blank, is_status=True, status=status, error_type=error_type or "", error=error or "",
                  duration_s=np.nan if duration_s is None else float(duration_s), clips=clips)

    def flush(self) -> dict | None:
        if not self._frames:
            return None
        c = self._columns
        batch = {
            "shard": np.array(c["shard"], np.int64),
            "video_uri": np.array(c["video_uri"], dtype=object),
            "clip_index": np.array(c["clip_index"], np.int64),
            "start_s": np.array(c["start_s"], np.float64),
            "end_s": np.array(c["end_s"], np.float64),
            "frames": np.stack(self._frames),  # (N, T, H, W, C) uint8
            "is_status": np.array(c["is_status"], bool),
            "range_index": np.array(c["range_index"], np.int64),
            "ranges_total": np.array(c["ranges_total"], np.int64),
            "status": np.array(c["status"], dtype=object),
            "error_type": np.array(c["error_type"], dtype=object),
            "error": np.array(c["error"], dtype=object),
            "duration_s": np.array(c["duration_s"], np.float64),
            "clips": np.array(c["clips"], np.int64),
        }
        self._reset()
        return batch


def _decode_unit(unit: dict, clip_spec: ClipSpec, frame_size: int, rows: _ClipRows) -> Iterator[dict]:
    """Decode one work unit into ``rows``; yields each batch that fills up, ends with the unit's status row."""
    from rnnimg.video.decode import VideoError, VideoReader

    video_uri = unit["video_uri"]
    if unit.get("error_type"):
        # plan_video already found this video unreadable: report it, do not open it again.
        rows.status(unit, "failed", unit["error_type"], unit["error"], unit.get("duration_s"), 0)
        return
    count, duration, status, error_type, error = 0, None, "ok", None, None
    try:
        with VideoReader(video_uri, (frame_size, frame_size)) as reader:
            duration = reader.duration_s
            if reader.info.still:  # planned as a still (plan_video refused it otherwise): one clip, its frame at time 0
                duration = 0.0
                plan = [Clip(0, 0.0, 0.0, (0.0,) * clip_spec.frames_per_clip)] if unit.get("still") else []
                if not plan:
                    raise VideoError("needs_video", f"{video_uri}: a still image; this model needs video")
            else:
                plan = uniform_clips(duration, clip_spec, unit.get("clip_start", 0), unit.get("clip_stop"))
            if not plan:
                raise VideoError("empty", f"{video_uri}: the video stream has no duration (no frames)")
            for clip, frames in reader.clips(plan):
                count += 1
                full = rows.clip(unit, clip, frames)
                if full is not None:
                    yield full
    except VideoError as err:
        status = "partial" if count else "failed"
        error_type, error = err.error_type, err.message
    except (MemoryError, RecursionError):
        raise
    except Exception as err:  # noqa: BLE001 - one bad video must never stop the job: record it instead
        status = "partial" if count else "failed"
        error_type, error = "unexpected", f"{video_uri}: {type(err).__name__}: {err}"[:500]
        log.exception("unexpected error decoding %s", video_uri)
    rows.status(unit, status, error_type, error, duration, count)


def _decode_units(units, spec: dict, frame_size: int, clips_per_batch: int) -> Iterator[dict]:
    """Work units, in order -> batches of clip and status rows, shared across units."""
    clip_spec = ClipSpec(**spec)
    rows = _ClipRows(clips_per_batch, clip_spec.frames_per_clip, frame_size)
    for unit in units:
        yield from _decode_unit(unit, clip_spec, frame_size, rows)
    last = rows.flush()
    if last is not None:
        yield last


def decode_pack(batch: dict, spec: dict, frame_size: int, clips_per_batch: int) -> Iterator[dict]:
    """Ray Data UDF: one pack of work units (a row of ``plan_videos``) -> batches of clip and status rows."""
    units = (unit for pack in batch["pack"] for unit in json.loads(str(pack)))
    yield from _decode_units(units, spec, frame_size, clips_per_batch)


def decode_video(batch: dict, spec: dict, frame_size: int, clips_per_batch: int) -> Iterator[dict]:
    """One whole video (``batch["video_uri"][0]``, ``batch["shard"][0]``) -> batches of clip rows, then its status row.

    The single-video form of ``decode_pack``, for callers outside the Ray pipeline (tests, benchmarks).
    """
    unit = {"shard": int(batch["shard"][0]), "video_uri": str(batch["video_uri"][0]), "range_index": 0, "ranges_total": 1}
    yield from _decode_units([unit], spec, frame_size, clips_per_batch)


# ----------------------------------------------------------------------------- model (Ray actors)


class Predictor:
    """Runs the model on batches of clips: dict of ndarrays in, dict of ndarrays out.

    Status rows pass through untouched; clip rows get the columns the model's task predicts
    (classification: ``label`` and ``score``). The frames column is dropped. With ``parts_out``
    the clip rows go no further than this actor: they are written to the store as part files
    (``stage_parts``) and only small records travel on to the driver. Precision follows the
    training rule (``rnnimg.models.precision``); ``bf16`` on a CPU casts the weights to bf16 instead of autocasting.
    """

    def __init__(self, model_uri: str, device: str | None = None, threads: int | None = None, precision: str = "auto",
                 parts_out: str | None = None, embeddings: bool = False):
        import torch

        from rnnimg.models.inference import for_inference
        from rnnimg.models.precision import autocast_dtype

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.task, self.model, self.config, self.model_id = tasks.load_model(model_uri, self.device)
        for_inference(self.model)  # norms folded into their convs, channels-last: the same function, cheaper
        self.amp_dtype = autocast_dtype(precision, self.device)
        # bf16 on a CPU: the weights themselves in bf16 (oneDNN's bf16 kernels, native on CPUs with
        # AVX512-BF16 or AMX), not autocast, which would leave the hand-written recurrent cells in float32.
        self.cast_dtype = None
        if self.amp_dtype is not None and torch.device(self.device).type == "cpu":
            self.model.to(self.amp_dtype)
            self.cast_dtype, self.amp_dtype = self.amp_dtype, None
        self.columns = dict(self.task.clip_columns())
        self.embeddings = embeddings
        if embeddings:
            self.columns["embedding"] = ("object", None)
        self.parts_out = parts_out

    @classmethod
    def from_checkpoint(cls, model_uri: str, **kwargs) -> "Predictor":
        return cls(model_uri, **kwargs)

    def __call__(self, batch: dict) -> dict:
        import torch

        from rnnimg.models.layout import to_model_input

        out = {k: v for k, v in batch.items() if k != "frames"}
        n = len(batch["video_uri"])
        for name, (dtype, fill) in self.columns.items():
            out[name] = np.full(n, fill, dtype=dtype)
        todo = np.flatnonzero(~batch["is_status"].astype(bool))
        if len(todo):
            device_type = torch.device(self.device).type
            with torch.inference_mode(), torch.autocast(device_type, dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
                frames = torch.from_numpy(batch["frames"][todo]).to(self.device, non_blocking=True)  # uint8 (N, T, H, W, C)
                options = {"embeddings": True} if self.embeddings else {}  # (N, D) float16 features as "embedding"
                inputs = to_model_input(frames)  # -> (N, T, C, H, W) float
                if self.cast_dtype is not None:
                    inputs = inputs.to(self.cast_dtype)
                predicted = self.task.predict(self.model, inputs, self.config, **options)
            for name, values in predicted.items():
                if name == "embedding":
                    values = list(np.asarray(values, np.float16))  # one (D,) array per clip, in an object column
                out[name][todo] = values
        if self.parts_out is not None:
            return stage_parts(out, self.parts_out, list(self.columns))
        return out


# ----------------------------------------------------------------------------- shard writes (on the workers)

PARTS = "_parts"  # OUT/_parts/shard-NNNNN/<uuid>.parquet: a shard's predicted clip rows until it commits
PART_COLUMNS = ("video_uri", "range_index", "clip_index", "start_s", "end_s")  # besides the task's clip columns
RECORD_COLUMNS = ("shard", "video_uri", "range_index", "ranges_total", "is_status", "status", "error_type", "error", "duration_s",
                  "clips", "clip_indices", "part")


def parts_folder(out: str, shard: int) -> str:
    return storage.join(out, PARTS, f"shard-{shard:05d}")


def stage_parts(batch: dict, out: str, columns: list[str]) -> dict:
    """Predicted rows -> part files in the store, and the small records the driver needs.

    The clip rows of each shard in the batch become one Parquet part file under
    ``parts_folder(out, shard)`` (a fresh name: a retried task writes a new file, never over
    another's). The records returned are the batch's status rows as they are, plus one record per
    (shard, video, range) of clip rows: which clip indices it holds (``clip_indices``, JSON) and in
    which ``part``. No clip row leaves the worker; the driver counts and the shard's committer
    (``commit_shard``) reads the parts.
    """
    import pyarrow as pa

    is_status = np.asarray(batch["is_status"], bool)
    records: dict[str, list] = {name: [] for name in RECORD_COLUMNS}

    def add(**row) -> None:
        for name in RECORD_COLUMNS:
            records[name].append(row[name])

    for j in np.flatnonzero(is_status):
        add(**{name: batch[name][j] for name in RECORD_COLUMNS[:-2]}, clip_indices="", part="")
    clip_rows = np.flatnonzero(~is_status)
    shard_of = np.asarray(batch["shard"], np.int64)
    for shard in np.unique(shard_of[clip_rows]):
        rows = clip_rows[shard_of[clip_rows] == shard]
        part = storage.join(parts_folder(out, int(shard)), f"{uuid.uuid4().hex}.parquet")
        table = {name: pa.array(np.asarray(batch[name])[rows].tolist()) for name in (*PART_COLUMNS, *columns)}
        # Scratch until the shard commits: atomic, not fsynced (a part lost to a power cut leaves
        # its shard uncommitted, and the rerun redoes it).
        storage.write_table(pa.table(table), part, durable=False)
        groups: dict[tuple[str, int], list[int]] = {}
        for j in rows:
            groups.setdefault((str(batch["video_uri"][j]), int(batch["range_index"][j])), []).append(int(batch["clip_index"][j]))
        for (uri, range_index), indices in groups.items():
            add(shard=int(shard), video_uri=uri, range_index=range_index, ranges_total=0, is_status=False, status="", error_type="",
                error="", duration_s=np.nan, clips=len(indices), clip_indices=json.dumps(sorted(indices)), part=part)
    return {
        "shard": np.array(records["shard"], np.int64),
        "video_uri": np.array(records["video_uri"], dtype=object),
        "range_index": np.array(records["range_index"], np.int64),
        "ranges_total": np.array(records["ranges_total"], np.int64),
        "is_status": np.array(records["is_status"], bool),
        "status": np.array(records["status"], dtype=object),
        "error_type": np.array(records["error_type"], dtype=object),
        "error": np.array(records["error"], dtype=object),
        "duration_s": np.array(records["duration_s"], np.float64),
        "clips": np.array(records["clips"], np.int64),
        "clip_indices": np.array(records["clip_indices"], dtype=object),
        "part": np.array(records["part"], dtype=object),
    }


def sweep_parts(out: str, committed: set[int]) -> int:
    """Remove the part files of committed shards; returns how many there were.

    A shard's commit removes its parts, but a task can still write one afterwards: a model
    batch Ray retried, or one still running in a pipeline whose coordinator was lost with its
    node. No commit reads such a part (only the parts a shard's records name are read), so it
    is litter, not data: the driver sweeps it once its coordinators are done.
    """
    root = storage.join(out, PARTS)
    if not storage.exists(root):
        return 0
    litter: dict[int, int] = {}
    for found in storage.list_files(root):
        folder = found.uri.rstrip("/").rsplit("/", 2)[-2]  # shard-NNNNN
        number = folder[len("shard-") :] if folder.startswith("shard-") else ""
        if number.isdigit() and int(number) in committed:
            litter[int(number)] = litter.get(int(number), 0) + 1
    for shard in sorted(litter):
        storage.delete(parts_folder(out, shard))
    return sum(litter.values())


def commit_shard(out: str, shard: int, run: dict, task_name: str, parts: list[str], videos: list[dict], min_segment_seconds: float,
                 fence=None) -> dict:
    """Commit one complete shard from its part files: read them, keep each clip once, write the
    task's tables and ``videos``, then the completion record; remove the parts. Runs on a worker
    (a Ray task of the label job) or in the caller's process.

    Args:
        parts: the part files the driver's records named for this shard (a part of a crashed
            earlier attempt is never read: only named ones are).
        videos: the shard's ``videos`` rows (from the status records).
        fence: the run's ``rnnimg.store_lock.Fence``, checked before anything is written.

    Returns:
        The completion record.

    Raises:
        LockLost: another run took the output over (nothing written).
    """
    import pyarrow as pa

    if storage.exists(_commit_uri(out, shard)):
        # A retry of a commit that had finished, or had written its record and was lost (with its
        # node) before removing the parts: remove them now.
        storage.delete(parts_folder(out, shard))
        return storage.read_json(_commit_uri(out, shard))
    task = tasks.get(task_name)
    seen: set[tuple[str, int]] = set()
    clips: list[dict] = []
    meta = {"run_id": run["run_id"], "model_id": run["model_id"]}
    read = [storage.read_table(p) for p in parts]
    columns = [c for c in (read[0].column_names if read else []) if c not in PART_COLUMNS]  # the task's, and "embedding"
    for row in (pa.concat_tables(read).to_pylist() if read else []):
        key = (row["video_uri"], row["clip_index"])
        if key in seen:
            continue  # the same clip from a task Ray retried
        seen.add(key)
        clips.append({"video_uri": key[0], "clip_index": key[1], "start_s": row["start_s"], "end_s": row["end_s"],
                      **{name: row[name] for name in columns}, **meta})
    if fence is not None:
        fence.check()
    record = _commit_shard(out, shard, run, task, clips, videos, min_segment_seconds)
    storage.delete(parts_folder(out, shard))
    return record


# ----------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class LabelResult:
    out: str  # where the tables are
    run_id: str
    model_id: str
    videos: int  # input videos
    ok: int
    partial: int
    failed: int
    clips: int
    tables: dict  # rows of each task table (e.g. {"clips": 120, "segments": 9}), all shards of the run
    left_out: dict  # files under the input folders that are not videos by their extension: extension -> count
    left_out_examples: list  # a few of them
    shards_done: int  # shards written by this invocation
    shards_skipped: int  # shards already committed by an earlier invocation
    seconds: float  # wall time of this invocation
    timings: dict  # seconds per phase of this invocation: plan (listing, model), pipeline, summary
    coordinator_cpu_s: float = 0.0  # CPU seconds of the coordinator actors that ran the pipeline (the driver's is not in it)
    coordinators_restarted: int = 0  # coordinators that finished in a restarted actor (their node was lost)

    def summary(self) -> dict:
        return asdict(self)


def _run_config(out: str, run_id: str | None, model: checkpoint.ExportedModel, spec: ClipSpec, config: LabelConfig, videos: list[str],
                splits: list[str] | None, allow_prefixes: list[str] | None, extensions: list[str] | None,
                embedding_size: int | None = None) -> dict:
    """The run's identity: reuse the one in ``OUT`` (resume) or start a new one.

    A rerun into ``OUT`` must be the same run: the same model, clip plan, shard size, inputs,
    splits, listing rules, segment smoothing and precision. Anything else would mix two runs' rows under one listing, so it
    is refused, naming what differs.
    """
    path = storage.join(out, "_run", "config.json")
    wanted = {"model_id": model.model_id, "task": model.task, "clip_spec": spec.to_dict(), "videos_per_shard": config.videos_per_shard,
              "videos": [storage.normalize(v) for v in videos], "splits": sorted(splits) if splits else None,
              "min_segment_seconds": config.min_segment_seconds, "allow_prefixes": sorted(allow_prefixes) if allow_prefixes else None,
              "extensions": sorted(extensions) if extensions else None, "embeddings": config.embeddings,
              "embedding_size": embedding_size if config.embeddings else None, "precision": config.precision}
    if storage.exists(path):
        # Keys a run written by an earlier version lacks take the value that version used.
        existing = {"task": checkpoint.DEFAULT_TASK, "splits": None, "min_segment_seconds": 0.0, "allow_prefixes": None, "extensions": None,
                    "embeddings": False, "embedding_size": None, "precision": "auto", **storage.read_json(path)}
        differ = [k for k in wanted if existing.get(k) != wanted[k]]
        if differ:
            what = "; ".join(f"{k} {existing.get(k)!r} there, {wanted[k]!r} now" for k in differ)
            raise LabelError(f"{out} already holds a run with other settings ({what}); rerun it as it was, or use another --out")
        if run_id and run_id != existing["run_id"]:
            raise LabelError(f"{out} holds run {existing['run_id']!r}, not {run_id!r}; use another --out")
        return existing
    run = {**wanted, "run_id": run_id or time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6], "model_uri": model.uri}
    storage.write_json(path, run)
    return run


def _input_rows(out: str, videos: list[str], splits: list[str] | None, allow_prefixes: list[str] | None, extensions: list[str] | None,
                listing: list[VideoRow] | None, stills: bool = False) -> tuple[list[VideoRow], dict]:
    """The run's input listing and what the listing left out: made once, then read back on every resume."""
    import pyarrow as pa

    path = storage.join(out, "_run", "manifest.parquet")
    left_out_path = storage.join(out, "_run", "left_out.json")
    if storage.exists(path):
        rows = [VideoRow(**r) for r in storage.read_table(path).to_pylist()]
        left_out = storage.read_json(left_out_path) if storage.exists(left_out_path) else {"by_extension": {}, "examples": []}
        return rows, left_out
    if listing is None:
        listed = list_inputs(videos, splits, allow_prefixes=allow_prefixes, extensions=extensions, stills=stills)
        rows, left_out = listed.rows, {"by_extension": listed.skipped, "examples": listed.skipped_examples}
    else:
        rows, left_out = list(listing), {"by_extension": {}, "examples": []}
    storage.write_json(left_out_path, left_out)
    storage.write_table(pa.Table.from_pylist([asdict(r) for r in rows]), path)
    return rows, left_out


def label(
    videos: str | list[str],
    model_uri: str,
    out: str,
    config: LabelConfig = LabelConfig(),
    splits: list[str] | None = None,
    run_id: str | None = None,
    ray_address: str | None = None,
    owner: str | None = None,
    lock_stale_seconds: float = 600.0,
    allow_prefixes: list[str] | None = None,
    extensions: list[str] | None = None,
    listing: list[VideoRow] | None = None,
) -> LabelResult:
    """Label every video named by ``videos`` and write the tables under ``out``.

    Args:
        videos: a folder/prefix of videos, one video, or a manifest table (.parquet/.csv);
            or a list of those.
        model_uri: an exported model folder (``rnnimg train``'s ``OUT/model``).
        out: output location (local folder or ``s3://``).
        splits: with a manifest, keep only rows whose ``split`` is one of these.
        run_id: name of the run (default: a new one, or the one already in ``out``).
        owner: who writes, as the output's lock names it to a second writer (default: this process).
        allow_prefixes: locations a manifest may name besides its own bucket (an ``s3://``
            manifest names only its own bucket by default; others become ``refused`` rows).
        extensions: file extensions that are videos in a folder listing (default: what the
            installed FFmpeg demuxes as video, and still images when the model labels them, see
            ``Task.needs_video``); what a listing leaves out is counted in the result.
        listing: the input already listed, used as is (the ``label-videos`` flow's delta, which
            it listed under the same rules); ``videos`` then only names the run.
        lock_stale_seconds: a lock on ``out`` not refreshed for this long is taken over (a holder
            of this machine whose process is gone: at once).

    Raises:
        LabelError: no model, a model of an unknown task, or ``out`` holds a run with other settings.
        LockHeld: another run is writing to ``out`` (the message names it).
        ManifestError: no videos, or an unusable manifest.
    """
    started = time.perf_counter()
    videos = [videos] if isinstance(videos, str) else list(videos)
    try:
        model = checkpoint.read_config(model_uri)
        task = tasks.get(model.task)
        model_config = task.config_from_dict(model.config)
    except (checkpoint.ModelNotFound, ValueError) as err:
        raise LabelError(str(err)) from err
    spec = ClipSpec(model_config.clip_seconds, model_config.frames_per_clip, config.stride_seconds or model_config.stride_seconds)
    if config.embeddings and not task.embedding_table:
        raise LabelError(f"the model's task {task.name!r} writes no clip embeddings (--embeddings is for: "
                         f"{', '.join(n for n in tasks.names() if tasks.get(n).embedding_table) or 'no task'})")
    with StoreLock(out, owner or f"rnnimg label (pid {os.getpid()})", stale_after_s=lock_stale_seconds) as lock:
        return _label_locked(videos, model, task, model_config, spec, out, config, splits, run_id, ray_address, lock, started,
                             allow_prefixes, extensions, listing)


def _label_locked(videos: list[str], model: checkpoint.ExportedModel, task: tasks.Task, model_config, spec: ClipSpec, out: str,
                  config: LabelConfig, splits: list[str] | None, run_id: str | None, ray_address: str | None, lock: StoreLock,
                  started: float, allow_prefixes: list[str] | None, extensions: list[str] | None,
                  listing: list[VideoRow] | None) -> LabelResult:
    """The body of ``label`` while this run holds the output's lock."""
    import ray

    from rnnimg.runtime import ensure_ray

    model_uri = model.uri
    embedding_size = task.embedding_size(model_config) if config.embeddings else None
    run = _run_config(out, run_id, model, spec, config, videos, splits, allow_prefixes, extensions, embedding_size)
    stills = not task.needs_video(model_config)
    rows, left_out = _input_rows(out, videos, splits, allow_prefixes, extensions, listing, stills)
    if left_out["by_extension"]:
        log.warning("the listing left out %d files that are not videos by their extension: %s (e.g. %s)", sum(left_out["by_extension"].values()),
                    left_out["by_extension"], ", ".join(left_out["examples"][:3]))
    all_shards = shards(rows, config.videos_per_shard)
    committed = _committed_shards(out) & set(range(len(all_shards)))
    pending = [i for i in range(len(all_shards)) if i not in committed]
    log.info("run %s: %d videos in %d shards, %d already committed", run["run_id"], len(rows), len(all_shards), len(committed))
    timings = {"plan": time.perf_counter() - started}
    coordinator_cpu_s, restarted = 0.0, 0
    if pending:
        # A run killed mid-write leaves temporaries next to the tables: clear them before redoing.
        for table in (*run_tables(task, run), "videos", "_commits"):
            storage.remove_temporaries(storage.join(out, table))
        ensure_ray(ray_address)
        if not storage.is_s3(out) and sum(1 for node in ray.nodes() if node.get("Alive")) > 1:
            log.warning("%s is a local folder and the Ray cluster has several nodes: the model actors and committers write "
                        "there on whichever node they run, so it must be a filesystem every node shares (else use s3://)", out)
        job = {"out": out, "run": run, "task": task.name, "model_uri": model_uri, "frame_size": model_config.frame_size,
               "spec": spec.to_dict(), "config": config, "stills": stills, "fence": lock.fence(), "verbose": runtime.verbose()}
        coordinator_cpu_s, restarted = coordinate(job, {i: all_shards[i] for i in pending}, lock)

    swept = sweep_parts(out, _committed_shards(out))
    if swept:
        log.warning("removed %d part files left by tasks that ran after their shard committed (a retry, or a worker lost with a node)", swept)
    timings["pipeline"] = time.perf_counter() - started - timings["plan"]
    result = replace(_summarize(out, run, task, rows, left_out, len(pending), len(committed), started, timings),
                     coordinator_cpu_s=round(coordinator_cpu_s, 3), coordinators_restarted=restarted)
    storage.write_json(
        storage.join(out, "run.json"),
        {**result.summary(), "model_uri": model_uri, "clip_spec": spec.to_dict(), "label_config": asdict(config), "finished_at": time.time()},
    )
    return result


# ----------------------------------------------------------------------------- coordinators


class Tally:
    """``LabelProgress``'s counts, kept by a coordinator for the driver to read (``snapshot``)."""

    FIELDS = ("videos_done", "clips_done", "shards_done", "videos_committed", "clips_committed")

    def __init__(self):
        self._lock = threading.Lock()
        self.counts = dict.fromkeys(self.FIELDS, 0)

    def video_done(self, clips: int) -> None:
        with self._lock:
            self.counts["videos_done"] += 1
            self.counts["clips_done"] += clips

    def shard_committed(self, videos: int, clips: int) -> None:
        with self._lock:
            self.counts["shards_done"] += 1
            self.counts["videos_committed"] += videos
            self.counts["clips_committed"] += clips

    def close(self) -> None:
        pass

    def snapshot(self) -> dict:
        with self._lock:
            return dict(self.counts)


class _Fenced:
    """The output's lock as a coordinator holds it: the driver's fence, checked before each commit."""

    def __init__(self, fence):
        self._fence = fence

    def check(self) -> None:
        self._fence.check()

    def fence(self):
        return self._fence


def run_share(job: dict, share: dict[int, list[VideoRow]], actors: int, cpu_share: float = 1.0,
              progress: LabelProgress | Tally | None = None) -> int:
    """Label and commit the shards of ``share`` that have no completion record: the Ray Data pipeline
    and the records that follow it, in this process (a coordinator actor, see ``coordinate``).

    Args:
        job: what every coordinator of the run shares (``_label_locked`` makes it).
        share: shard index -> its videos.
        actors: model replicas of this pipeline.
        cpu_share: the share of the cluster's CPUs (and GPUs) this pipeline's executor plans with
            (1: all; with several coordinators each takes its part, else each would plan the whole cluster).
        progress: told of each video labelled and each shard committed.

    Returns:
        How many shards this call committed.
    """
    import pyarrow as pa
    import ray
    from ray.data import ActorPoolStrategy, ExecutionResources

    runtime.quiet_ray_data()
    out, config, spec = job["out"], job["config"], ClipSpec(**job["spec"])
    committed = _committed_shards(out)
    pending = [i for i in sorted(share) if i not in committed]  # a coordinator restarted with its node: what is left
    if not pending:
        return 0
    for shard in pending:  # parts an interrupted attempt staged: never read, since no record of this one names them
        storage.delete(parts_folder(out, shard))
    # The pending videos as Arrow columns (a million URIs is tens of MB, not a million dicts).
    items = pa.table({"shard": pa.array([i for i in pending for _ in share[i]], pa.int64()),
                      "video_uri": pa.array([row.video_uri for i in pending for row in share[i]], pa.string()),
                      "refused": pa.array([row.refused for i in pending for row in share[i]], pa.string())})
    resources = ray.cluster_resources()
    gpus = config.gpus_per_actor
    if gpus == 0 and resources.get("GPU", 0) >= 1:
        gpus = 1.0
    # On CPU the model is a small share of the work next to decoding: a quarter of a core
    # reserved for it lets every core run a decoder (2 decoders + the model on 2 cores).
    actor_cpus = config.actor_cpus if config.actor_cpus is not None else (1.0 if gpus else 0.25)
    # Probe tasks open the headers of a block of videos each and emit packs of work: a long
    # video cut into ranges, short videos grouped, about range_seconds per pack. Blocks are
    # sized so that even a small archive makes a few packs per decoder.
    decoders = max(1, int(resources.get("CPU", 1) * cpu_share // config.decode_cpus))
    per_probe = max(1, min(64, -(-items.num_rows // (2 * decoders))))
    # A block per batch of clips, so the model sees a task's clips while it still decodes
    # (Ray Data's default would gather up to 128 MiB of them first). The dataset keeps its own
    # copy of the context, taken when it is created; the caller's is restored.
    context = ray.data.DataContext.get_current()
    saved = context.target_max_block_size, context.execution_options.resource_limits
    frame_bytes = spec.frames_per_clip * job["frame_size"] ** 2 * 3
    context.target_max_block_size = max(64 * 1024, int(0.9 * config.batch_size * frame_bytes))
    if cpu_share < 1:
        context.execution_options.resource_limits = ExecutionResources(
            cpu=resources.get("CPU", 1) * cpu_share, gpu=resources.get("GPU", 0) * cpu_share or None)
    try:
        ds = ray.data.from_arrow([items.slice(start, per_probe) for start in range(0, items.num_rows, per_probe)])
    finally:
        context.target_max_block_size, context.execution_options.resource_limits = saved
    ds = ds.map_batches(plan_videos, batch_size=None,
                        fn_kwargs={"spec": spec.to_dict(), "range_seconds": config.range_seconds, "stills": job["stills"]},
                        num_cpus=config.decode_cpus)
    # One pack per block, streaming (no barrier): each pack is its own decode task.
    ds = ds.repartition(target_num_rows_per_block=1)
    ds = ds.map_batches(
        decode_pack,
        batch_size=1,
        fn_kwargs={"spec": spec.to_dict(), "frame_size": job["frame_size"], "clips_per_batch": config.batch_size},
        num_cpus=config.decode_cpus,
        # Reserving memory for the decoder also keeps decoding in its own tasks: with remote
        # args equal to the actors', Ray Data fuses it into them (one decoder per replica).
        memory=config.decode_memory_mb * 1024 * 1024,
    )
    ds = ds.map_batches(
        Predictor,
        fn_constructor_kwargs={"model_uri": job["model_uri"], "threads": max(1, int(actor_cpus)), "precision": config.precision,
                               "parts_out": out, "embeddings": config.embeddings},
        compute=ActorPoolStrategy(size=actors),
        batch_size=config.batch_size,
        num_cpus=actor_cpus,
        num_gpus=gpus,
    )
    # Each shard is committed on the workers, from the parts the model actors staged, by a
    # few long-lived committer actors (a task per shard would start a worker process per
    # commit): this process only counts records. A committer lost with its node is restarted
    # and its call retried; a commit is idempotent.
    committers = [_committer_class().options(num_cpus=0.05, max_restarts=-1, max_task_retries=3).remote() for _ in range(actors)]
    turn = iter(range(1 << 62))

    def submit(*args):
        return committers[next(turn) % len(committers)].commit.remote(*args)

    try:
        done = commit_stream(ds.iter_batches(batch_size=None, batch_format="numpy"), out, job["run"], tasks.get(job["task"]), share,
                             pending, config.min_segment_seconds, _Fenced(job["fence"]), submit=submit, progress=progress)
    finally:
        for committer in committers:
            ray.kill(committer)
    return len(done)


def _coordinator_class():
    import ray

    @ray.remote
    class LabelCoordinator:
        """Runs ``run_share`` for a share of a run's shards, so that no pipeline runs in the driver.

        Threaded (``max_concurrency`` 2): ``tally`` answers while ``run`` works.
        """

        def __init__(self, verbose: bool):
            runtime.set_verbose(verbose)
            self.progress = Tally()

        def run(self, job: dict, share: dict, actors: int, cpu_share: float) -> dict:
            before = resource.getrusage(resource.RUSAGE_SELF)
            shards = run_share(job, share, actors, cpu_share, self.progress)
            after = resource.getrusage(resource.RUSAGE_SELF)
            with warnings.catch_warnings():  # Ray 2.60's property reads its own deprecated ``actor_id`` and warns
                warnings.simplefilter("ignore", DeprecationWarning)
                restarted = ray.get_runtime_context().was_current_actor_reconstructed
            return {"shards": shards, "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
                    "tally": self.progress.snapshot(), "restarted": restarted}

        def tally(self) -> dict:
            return self.progress.snapshot()

    return LabelCoordinator


COORDINATOR_RESTARTS = 4  # a coordinator whose work was lost (with a node) more often than this fails the run


def _lost_with_a_node() -> tuple[type, ...]:
    import ray.exceptions as errors

    # An actor died or is unreachable, an object or its owner is gone, a worker process crashed.
    return errors.RayActorError, errors.ObjectLostError, errors.WorkerCrashedError, errors.NodeDiedError


def coordinator_name(run_id: str, index: int) -> str:
    """The Ray actor name of a run's ``index``-th coordinator."""
    return f"rnnimg-label-{run_id}-coordinator-{index}"


def _ray_data_singletons_here() -> None:
    """Create Ray Data's per-cluster actors from the driver, so that they live on the driver's node.

    Ray Data keeps two detached actors per cluster, its stats actor and its autoscaling
    coordinator, pinned (hard) to the node of the first process that runs a pipeline. Made by a
    coordinator on a worker node, they die with that node and cannot be restarted elsewhere: every
    later pipeline of the cluster then fails ("The node specified via NodeAffinitySchedulingStrategy
    doesn't exist any more", met in ``test_multinode.py``). Made here, they sit where they sat
    when the driver ran the pipeline itself. Ray versions without these functions are left alone.
    """
    try:
        from ray.data._internal.cluster_autoscaler import get_or_create_autoscaling_coordinator
        from ray.data._internal.stats import get_or_create_stats_actor
    except ImportError as err:
        log.debug("Ray Data's per-cluster actors are left to the coordinators: %s", err)
        return
    get_or_create_stats_actor()
    get_or_create_autoscaling_coordinator()


def coordinate(job: dict, pending: dict[int, list[VideoRow]], lock: StoreLock, progress: LabelProgress | None = None,
               poll_s: float = 1.0) -> tuple[float, int]:
    """Label and commit the ``pending`` shards with ``job["config"].coordinators`` coordinator actors.

    Each coordinator runs the Ray Data pipeline and follows its records (``run_share``) for a
    share of the shards (every k-th), with its share of the model replicas and of the cluster's
    CPUs; the driver only starts them, shows their progress and waits. So the driver's cost does
    not grow with the job, and the pipelines' bookkeeping spreads over k processes (and nodes)
    instead of one. A coordinator lost with its node is restarted and redoes what it had not
    committed (``run_share`` skips committed shards); the driver's lock fences every commit.

    Returns:
        The CPU seconds the coordinators spent (their processes, summed), and how many of them
        finished in a restarted actor.

    Raises:
        LockLost: another run took the output over.
        The error that stopped a coordinator (the exception raised in it).
    """
    import ray

    config = job["config"]
    order = sorted(pending)
    k = max(1, min(config.coordinators, config.actors, len(order)))
    shares = [{i: pending[i] for i in order[c::k]} for c in range(k)]
    if progress is None:
        progress = LabelProgress(sum(len(rows) for rows in pending.values()), len(pending))
    _ray_data_singletons_here()
    Coordinator = _coordinator_class()
    # Named after the run, so an operator can find them (``ray list actors``); they end with this call.
    coordinators = [Coordinator.options(name=coordinator_name(job["run"]["run_id"], c), num_cpus=0, max_concurrency=2,
                                        max_restarts=2 * COORDINATOR_RESTARTS, max_task_retries=COORDINATOR_RESTARTS,
                                        scheduling_strategy="SPREAD").remote(job["verbose"]) for c in range(k)]

    def start(c: int):
        return coordinators[c].run.remote(job, shares[c], config.actors // k + (c < config.actors % k), 1.0 / k)

    running = {start(c): c for c in range(k)}
    lost = [0] * k  # times each coordinator's work was lost with a node and its share started again
    asked: dict = {}  # tally call in flight -> coordinator
    tallies = [dict.fromkeys(Tally.FIELDS, 0) for _ in range(k)]
    cpu_s, restarted = 0.0, 0
    try:
        while running:
            for c in set(running.values()) - set(asked.values()):
                asked[coordinators[c].tally.remote()] = c
            finished, _ = ray.wait(list(running), num_returns=len(running), timeout=poll_s)
            for ref in finished:
                c = running.pop(ref)
                try:
                    done = ray.get(ref)
                except ray.exceptions.RayError as err:
                    cause = err.cause if isinstance(err, ray.exceptions.RayTaskError) else err
                    if not isinstance(cause, _lost_with_a_node()) or lost[c] >= COORDINATOR_RESTARTS:
                        raise (cause if isinstance(cause, Exception) else err) from None
                    # The coordinator, or an actor, task or object its pipeline needed, went away with a
                    # node (Ray does not retry a call that "may or may not have run"). Restart it for
                    # certain, so no earlier call of it still works on its share, and run the share
                    # again: what it committed is skipped.
                    lost[c] += 1
                    log.warning("coordinator %d of run %s lost work to a node (%s: %s): restarting it (%d of %d)", c,
                                job["run"]["run_id"], type(cause).__name__, str(cause).split("\n")[0][:200], lost[c], COORDINATOR_RESTARTS)
                    ray.kill(coordinators[c], no_restart=False)
                    for stale in [r for r, asked_of in asked.items() if asked_of == c]:  # would answer never or late
                        asked.pop(stale)
                    running[start(c)] = c
                    continue
                cpu_s += done["cpu_s"]
                restarted += done["restarted"]
                tallies[c] = done["tally"]
            answered, _ = ray.wait(list(asked), num_returns=len(asked), timeout=0)
            for ref in answered:
                c = asked.pop(ref)
                if c not in running.values():
                    continue  # its final count came with its result
                try:
                    tallies[c] = ray.get(ref)
                except ray.exceptions.RayError:
                    continue  # a coordinator being restarted: its count comes later
            progress.update(**{name: sum(t[name] for t in tallies) for name in Tally.FIELDS})
            if lock.lost:
                lock.check()
    finally:
        for coordinator in coordinators:
            ray.kill(coordinator)
    progress.close()
    return cpu_s, restarted


def _committed_shards(out: str) -> set[int]:
    """Shards with a completion record: one listing, not one request per shard."""
    folder = storage.join(out, "_commits")
    if not storage.exists(folder):
        return set()
    names = (storage.basename(f.uri) for f in storage.list_files(folder, (".json",)))
    return {int(n[len("shard-") : -len(".json")]) for n in names if n.startswith("shard-")}


def _commit_uri(out: str, shard: int) -> str:
    return storage.join(out, "_commits", f"shard-{shard:05d}.json")


def _committer_class():
    import ray

    @ray.remote
    class ShardCommitter:
        """Commits shards (``commit_shard``) on a worker; long-lived, so its imports are paid once."""

        def commit(self, *args) -> dict:
            return commit_shard(*args)

    return ShardCommitter


def commit_stream(records, out: str, run: dict, task: tasks.Task, all_shards: list[list[VideoRow]], pending: list[int],
                  min_segment_seconds: float, lock: StoreLock, submit=None, progress: LabelProgress | None = None) -> list[dict]:
    """Follow the workers' records, in any order; commit each shard as soon as all of its rows are in.

    The records are ``stage_parts``'s: status rows, and per (shard, video, range) which clip
    indices were written to which part file. The driver never sees a clip row: it counts.
    Ray Data hands batches over in completion order, and with several model replicas a video's
    status row can overtake its clips. So a range of a video is complete only when its status
    row is in (it says how many clips the range decoded) *and* that many distinct clip indices
    of the range are; a video is complete when all its ranges are; a shard when all its videos
    are. Correctness does not rest on block order. A record that arrives twice (a task Ray
    retried wrote its part twice) adds no index; ``commit_shard`` keeps each clip once.

    Args:
        records: dicts of numpy columns (``RECORD_COLUMNS``), in any order.
        submit: ``submit(out, shard, run, task_name, parts, videos, min_segment_seconds, fence)``
            -> a handle whose commit ``wait`` resolves (a Ray task on the workers); None commits
            in this process.
        progress: told of each video whose clips are all in and each shard committed (default:
            a ``LabelProgress`` of the pending shards on stderr: a bar on a terminal, else a
            line per committed shard).

    Returns:
        The completion records of the shards committed.

    Raises:
        RuntimeError: the stream ended with a shard still incomplete.
        LockLost: another run took the output over.
    """
    # Videos not complete yet, per shard: made when the shard's first record comes, so the driver
    # holds sets only for the shards in flight.
    waiting: dict[int, set[str] | None] = dict.fromkeys(pending)
    parts: dict[int, set[str]] = {}
    clip_ranges: dict[tuple[str, int], set[int]] = {}  # (video, range) -> clip indices recorded
    ranges: dict[int, dict[str, dict[int, dict]]] = {}
    meta = {"run_id": run["run_id"], "model_id": run["model_id"]}
    fence = lock.fence()
    handles = []
    if progress is None:
        progress = LabelProgress(sum(len(all_shards[i]) for i in pending), len(pending))
    committing = []  # (handle, videos, clips) of the commits submitted and not yet seen done

    def complete(shard: int, uri: str) -> bool:
        status = ranges.get(shard, {}).get(uri, {})
        if not status or len(status) < next(iter(status.values()))["ranges_total"]:
            return False
        return all(len(clip_ranges.get((uri, r), ())) >= part["clips"] for r, part in status.items())

    for batch in records:
        for j in range(len(batch["video_uri"])):
            shard, uri = int(batch["shard"][j]), str(batch["video_uri"][j])
            if shard not in waiting:
                continue  # a late duplicate of a record of an already committed shard
            if waiting[shard] is None:
                waiting[shard] = {row.video_uri for row in all_shards[shard]}
            range_index = int(batch["range_index"][j])
            if batch["is_status"][j]:
                duration = float(batch["duration_s"][j])
                ranges.setdefault(shard, {}).setdefault(uri, {})[range_index] = {
                    "status": str(batch["status"][j]),
                    "clips": int(batch["clips"][j]),
                    "error_type": str(batch["error_type"][j]) or None,
                    "error": str(batch["error"][j]) or None,
                    "duration_s": None if np.isnan(duration) else duration,
                    "ranges_total": int(batch["ranges_total"][j]),
                }
            else:
                clip_ranges.setdefault((uri, range_index), set()).update(json.loads(str(batch["clip_indices"][j])))
                parts.setdefault(shard, set()).add(str(batch["part"][j]))
            if uri in waiting[shard] and complete(shard, uri):
                waiting[shard].discard(uri)
                progress.video_done(sum(part["clips"] for part in ranges[shard][uri].values()))
            if not waiting[shard]:
                shard_ranges = ranges.pop(shard, {})
                attempts = {row.video_uri: row.attempt for row in all_shards[shard]}
                videos = [_video_row(video, status, {**meta, "attempt": attempts[video]}) for video, status in shard_ranges.items()]
                lock.check()
                args = (out, shard, run, task.name, sorted(parts.pop(shard, ())), videos, min_segment_seconds, fence)
                handles.append(submit(*args) if submit is not None else commit_shard(*args))
                committing.append((handles[-1], len(videos), sum(v["clips"] for v in videos)))
                waiting.pop(shard)
                for video, status in shard_ranges.items():  # the driver holds only shards in flight
                    for r in status:
                        clip_ranges.pop((video, r), None)
        committing = _report_commits(committing, progress)
    if submit is not None:
        handles = _wait_commits(handles)
    for _, videos_in_shard, clips_in_shard in committing:  # the commits still running then: done now (else _wait_commits raised)
        progress.shard_committed(videos_in_shard, clips_in_shard)
    progress.close()
    if waiting:
        raise RuntimeError(f"the pipeline ended with shards {sorted(waiting)} incomplete")
    return handles


def _report_commits(committing: list[tuple], progress: LabelProgress) -> list[tuple]:
    """Tell ``progress`` of the commits done by now, without waiting; returns those still running.

    ``committing``: ``(handle, videos, clips)`` per commit. A commit made in this process is done
    when submitted; a Ray one (an ObjectRef) when ``ray.wait`` says so.
    """
    if not committing:
        return committing
    import ray

    refs = [c[0] for c in committing if isinstance(c[0], ray.ObjectRef)]
    finished = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
    running = []
    for handle, videos, clips in committing:
        if isinstance(handle, ray.ObjectRef):
            if handle not in finished:
                running.append((handle, videos, clips))
                continue
            try:
                ray.get(handle)  # finished: the record, or the commit's error
            except ray.exceptions.RayError:
                continue  # not committed: _wait_commits raises it
        progress.shard_committed(videos, clips)
    return running


def _wait_commits(handles: list) -> list:
    """The committers' results: Ray object refs resolved (a failed commit raises here), anything else as it is."""
    import ray

    refs = [h for h in handles if isinstance(h, ray.ObjectRef)]
    done = dict(zip(refs, ray.get(refs))) if refs else {}
    return [done.get(h, h) if isinstance(h, ray.ObjectRef) else h for h in handles]


def _video_row(uri: str, parts: dict[int, dict], meta: dict) -> dict:
    """One video's row from the status of each of its ranges."""
    ordered = [parts[i] for i in sorted(parts)]
    clips = sum(p["clips"] for p in ordered)
    first_error = next((p for p in ordered if p["error_type"]), None)
    if first_error is None:
        status = "ok"
    else:
        status = "partial" if clips else "failed"
    return {
        "video_uri": uri,
        "status": status,
        "duration_s": next((p["duration_s"] for p in ordered if p["duration_s"] is not None), None),
        "clips": clips,
        "error_type": first_error["error_type"] if first_error else None,
        "error": first_error["error"] if first_error else None,
        **meta,
    }


def run_tables(task: tasks.Task, run: dict) -> dict:
    """The tables a run writes per shard: the task's, the embedding table with an ``embedding``
    column (``fixed_size_list<float16>[D]``) when the run writes embeddings."""
    import pyarrow as pa

    schemas = dict(task.tables())
    if run.get("embeddings"):
        name = task.embedding_table
        schemas[name] = schemas[name].append(pa.field("embedding", pa.list_(pa.float16(), int(run["embedding_size"]))))
    return schemas


def _commit_shard(out: str, shard: int, run: dict, task: tasks.Task, clips: list[dict], videos: list[dict], min_segment_seconds: float) -> dict:
    """Write a shard's tables (the task's, then ``videos``), each atomically, then its completion record."""
    name = f"shard-{shard:05d}.parquet"
    clips.sort(key=lambda r: (r["video_uri"], r["clip_index"]))
    videos.sort(key=lambda r: r["video_uri"])
    schemas = run_tables(task, run)
    rows = task.shard_rows(clips, run, min_segment_seconds)
    for table, schema in schemas.items():
        storage.write_table(tables.table_from_rows(rows[table], tables.with_run_metadata(schema, run)), storage.join(out, table, name))
    storage.write_table(tables.table_from_rows(videos, tables.with_run_metadata(tables.VIDEOS, run)), storage.join(out, "videos", name))
    counts = {s: sum(1 for v in videos if v["status"] == s) for s in tables.VIDEO_STATUSES}
    record = {"shard": shard, "videos": len(videos), **{table: len(rows[table]) for table in schemas}, **counts, "committed_at": time.time()}
    storage.write_json(_commit_uri(out, shard), record)
    return record


def _summarize(out: str, run: dict, task: tasks.Task, rows: list[VideoRow], left_out: dict, done: int, skipped: int, started: float,
               timings: dict) -> LabelResult:
    """Counts over the committed tables (every shard of the run is committed by now)."""
    videos = storage.read_table(storage.join(out, "videos"), columns=["status", "clips"]).to_pydict()
    counts = {table: storage.read_table(storage.join(out, table), columns=["video_uri"]).num_rows for table in run_tables(task, run)}
    statuses = videos["status"]
    return LabelResult(
        out=out,
        run_id=run["run_id"],
        model_id=run["model_id"],
        videos=len(rows),
        ok=statuses.count("ok"),
        partial=statuses.count("partial"),
        failed=statuses.count("failed"),
        clips=int(sum(videos["clips"])),
        tables=counts,
        left_out=left_out["by_extension"],
        left_out_examples=left_out["examples"],
        shards_done=done,
        shards_skipped=skipped,
        seconds=round(time.perf_counter() - started, 3),
        timings={k: round(v, 3) for k, v in timings.items()},
    )


def clip_accuracy(out: str, manifest_uri: str, split: str = "test") -> tuple[float, int]:
    """Share of labelled clips whose label matches the manifest's truth for ``split`` videos.

    Returns:
        (accuracy, number of clips compared).
    """
    from rnnimg.manifest import read_manifest

    truth = {r.video_uri: r.label for r in read_manifest(manifest_uri) if r.split == split and r.label is not None}
    clips = storage.read_table(storage.join(out, "clips"), columns=["video_uri", "label"]).to_pydict()
    pairs = [(truth[u], l) for u, l in zip(clips["video_uri"], clips["label"]) if u in truth]
    if not pairs:
        return float("nan"), 0
    return sum(t == p for t, p in pairs) / len(pairs), len(pairs)
