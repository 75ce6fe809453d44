"""Label an archive with an exported model, on Ray Data, into Parquet tables.

    rnnimg label ARCHIVE/ --model runs/model --out labels/

The data path:

    list the input -> deterministic shards -> probe headers, plan packs of work (Ray tasks)
        -> decode clips (a Ray task per pack, PyAV) -> Predictor (Ray actor pool, the model)
        -> per-shard Parquet tables, committed atomically

Everything task-specific comes from the model: its ``config.json`` names its task
(``rnnimg.tasks``), which says what the model adds to each clip row and which tables a shard
writes (classification: ``clips`` and ``segments``). This module never imports training code.

A pack is a range of a long video or several short videos, about ``range_seconds`` of video:
one decode task each, so that Ray's cost per task is paid per minutes of video.

Every video ends as one row of the videos table: ``ok``, ``partial`` (decoding stopped at an
error; the clips before it are kept) or ``failed`` (the reason in ``error``). A broken video
never stops the job.

A shard's two table files are written first and its completion record last
(``OUT/_commits``); rerunning the same command skips committed shards and rewrites any
shard that had not committed, under the same file names, so no row is written twice.
See ``rnnimg.tables`` for the store layout and schemas.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np

# torch stays out of this module's imports: the decode workers import it for its UDFs.
from rnnimg import checkpoint, storage, tables, tasks
from rnnimg.manifest import VideoRow, list_inputs, shards
from rnnimg.models.precision import check_precision
from rnnimg.store_lock import StoreLock
from rnnimg.video.clips import ClipSpec, clip_count, uniform_clips

log = logging.getLogger("rnnimg.label")


@dataclass(frozen=True)
class LabelConfig:
    """Scale and batching of a labelling run (the clip plan comes from the model's config)."""

    videos_per_shard: int = 32  # videos committed together; the unit of resume and of driver memory
    batch_size: int = 32  # clips per model call
    actors: int = 1  # Predictor actors (model replicas)
    actor_cpus: float | None = None  # CPUs reserved per Predictor actor (None: 1 with a GPU, else 0.25)
    gpus_per_actor: float = 0.0  # GPUs per Predictor actor (0: one per actor when the cluster has GPUs)
    decode_cpus: float = 0.75  # CPUs reserved per decode task (decoders are single-threaded)
    decode_memory_mb: int = 512  # memory reserved per decode task (one decoder + one batch of clips)
    stride_seconds: float | None = None  # override the model's clip stride (None: the model's)
    range_seconds: float = 600.0  # work per decode task: longer videos are split into ranges of this many seconds, shorter ones packed
    min_segment_seconds: float = 0.0  # segments shorter than this are absorbed by a neighbour (0: off)
    precision: str = "auto"  # model precision: "bf16" autocast, "fp32", or "auto" (bf16 on GPU, fp32 on CPU), as in training

    def __post_init__(self) -> None:
        for name in ("videos_per_shard", "batch_size", "actors"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
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


def plan_video(row: dict, spec: dict, range_seconds: float) -> list[dict]:
    """One input video -> its work units (time ranges of whole clips).

    Opens the video's header only (no decoding) to read its duration, plans the clips and
    cuts them into ranges of about ``range_seconds``, so that one long video spreads over many
    decode tasks. A video that cannot be opened, or that the listing refused (a remote manifest's
    URI outside its bucket), becomes one unit carrying the error; a refused one is never opened.
    """
    from rnnimg.video.decode import VideoError, VideoReader

    clip_spec = ClipSpec(**spec)
    unit = {"shard": int(row["shard"]), "video_uri": str(row["video_uri"]), "range_index": 0, "ranges_total": 1,
            "clip_start": 0, "clip_stop": 0, "duration_s": float("nan"), "error_type": "", "error": ""}
    if row.get("refused"):
        return [{**unit, "error_type": "refused", "error": str(row["refused"])}]
    try:
        with VideoReader(unit["video_uri"]) as reader:
            duration = reader.duration_s
    except VideoError as err:
        return [{**unit, "error_type": err.error_type, "error": err.message}]
    except Exception as err:  # noqa: BLE001 - one bad video must never stop the job: record it instead
        log.exception("unexpected error opening %s", unit["video_uri"])
        return [{**unit, "error_type": "unexpected", "error": f"{unit['video_uri']}: {type(err).__name__}: {err}"[:500]}]
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


def plan_videos(batch: dict, spec: dict, range_seconds: float, threads: int = 8) -> dict:
    """Ray Data UDF: a block of listed videos -> packs of work units (one JSON list per row).

    The headers are opened in a few threads: on an object store each open waits on requests.
    """
    from concurrent.futures import ThreadPoolExecutor

    rows = [{"shard": s, "video_uri": u, "refused": r} for s, u, r in zip(batch["shard"], batch["video_uri"], batch["refused"])]
    with ThreadPoolExecutor(max(1, min(threads, len(rows)))) as pool:
        units = [u for planned in pool.map(lambda r: plan_video(r, spec, range_seconds), rows) for u in planned]
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
    (classification: ``label`` and ``score``). The frames column is dropped, so only small rows
    travel back to the driver. Precision follows the training rule (``rnnimg.models.precision``).
    """

    def __init__(self, model_uri: str, device: str | None = None, threads: int | None = None, precision: str = "auto"):
        import torch

        from rnnimg.models.precision import autocast_dtype

        if threads:
            torch.set_num_threads(max(1, int(threads)))
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.task, self.model, self.config, self.model_id = tasks.load_model(model_uri, self.device)
        self.amp_dtype = autocast_dtype(precision, self.device)
        self.columns = self.task.clip_columns()

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
                predicted = self.task.predict(self.model, to_model_input(frames), self.config)  # -> (N, T, C, H, W) float
            for name, values in predicted.items():
                out[name][todo] = values
        return out


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

    def summary(self) -> dict:
        return asdict(self)


def _run_config(out: str, run_id: str | None, model: checkpoint.ExportedModel, spec: ClipSpec, config: LabelConfig, videos: list[str],
                splits: list[str] | None, allow_prefixes: list[str] | None, extensions: list[str] | None) -> dict:
    """The run's identity: reuse the one in ``OUT`` (resume) or start a new one.

    A rerun into ``OUT`` must be the same run: the same model, clip plan, shard size, inputs,
    splits, listing rules and segment smoothing. Anything else would mix two runs' rows under one listing, so it
    is refused, naming what differs.
    """
    path = storage.join(out, "_run", "config.json")
    wanted = {"model_id": model.model_id, "task": model.task, "clip_spec": spec.to_dict(), "videos_per_shard": config.videos_per_shard,
              "videos": [storage.normalize(v) for v in videos], "splits": sorted(splits) if splits else None,
              "min_segment_seconds": config.min_segment_seconds, "allow_prefixes": sorted(allow_prefixes) if allow_prefixes else None,
              "extensions": sorted(extensions) if extensions else None}
    if storage.exists(path):
        # Keys a run written by an earlier version lacks take the value that version used.
        existing = {"task": checkpoint.DEFAULT_TASK, "splits": None, "min_segment_seconds": 0.0, "allow_prefixes": None, "extensions": None,
                    **storage.read_json(path)}
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
                listing: list[VideoRow] | None) -> tuple[list[VideoRow], dict]:
    """The run's input listing and what the listing left out: made once, then read back on every resume."""
    import pyarrow as pa

    path = storage.join(out, "_run", "manifest.parquet")
    left_out_path = storage.join(out, "_run", "left_out.json")
    if storage.exists(path):
        rows = [VideoRow(**r) for r in storage.read_table(path).to_pylist()]
        left_out = storage.read_json(left_out_path) if storage.exists(left_out_path) else {"by_extension": {}, "examples": []}
        return rows, left_out
    if listing is None:
        listed = list_inputs(videos, splits, allow_prefixes=allow_prefixes, extensions=extensions)
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
            installed FFmpeg demuxes as video); what a listing leaves out is counted in the result.
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
    with StoreLock(out, owner or f"rnnimg label (pid {os.getpid()})", stale_after_s=lock_stale_seconds) as lock:
        return _label_locked(videos, model, task, model_config, spec, out, config, splits, run_id, ray_address, lock, started,
                             allow_prefixes, extensions, listing)


def _label_locked(videos: list[str], model: checkpoint.ExportedModel, task: tasks.Task, model_config, spec: ClipSpec, out: str,
                  config: LabelConfig, splits: list[str] | None, run_id: str | None, ray_address: str | None, lock: StoreLock,
                  started: float, allow_prefixes: list[str] | None, extensions: list[str] | None,
                  listing: list[VideoRow] | None) -> LabelResult:
    """The body of ``label`` while this run holds the output's lock."""
    import ray
    from ray.data import ActorPoolStrategy

    from rnnimg.runtime import ensure_ray

    model_uri = model.uri
    run = _run_config(out, run_id, model, spec, config, videos, splits, allow_prefixes, extensions)
    rows, left_out = _input_rows(out, videos, splits, allow_prefixes, extensions, listing)
    if left_out["by_extension"]:
        log.warning("the listing left out %d files that are not videos by their extension: %s (e.g. %s)", sum(left_out["by_extension"].values()),
                    left_out["by_extension"], ", ".join(left_out["examples"][:3]))
    all_shards = shards(rows, config.videos_per_shard)
    committed = _committed_shards(out) & set(range(len(all_shards)))
    pending = [i for i in range(len(all_shards)) if i not in committed]
    log.info("run %s: %d videos in %d shards, %d already committed", run["run_id"], len(rows), len(all_shards), len(committed))
    timings = {"plan": time.perf_counter() - started}

    if pending:
        # A run killed mid-write leaves temporaries next to the tables: clear them before redoing.
        for table in (*task.tables(), "videos", "_commits"):
            storage.remove_temporaries(storage.join(out, table))
        ensure_ray(ray_address)
        items = [{"shard": i, "video_uri": row.video_uri, "refused": row.refused} for i in pending for row in all_shards[i]]
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
        decoders = max(1, int(resources.get("CPU", 1) // config.decode_cpus))
        per_probe = max(1, min(64, -(-len(items) // (2 * decoders))))
        # A block per batch of clips, so the model sees a task's clips while it still decodes
        # (Ray Data's default would gather up to 128 MiB of them first). The dataset keeps its own
        # copy of the context, taken when it is created; the caller's is restored.
        context = ray.data.DataContext.get_current()
        saved_block_size = context.target_max_block_size
        frame_bytes = spec.frames_per_clip * model_config.frame_size**2 * 3
        context.target_max_block_size = max(64 * 1024, int(0.9 * config.batch_size * frame_bytes))
        try:
            ds = ray.data.from_items(items, override_num_blocks=-(-len(items) // per_probe))
        finally:
            context.target_max_block_size = saved_block_size
        ds = ds.map_batches(plan_videos, batch_size=None, fn_kwargs={"spec": spec.to_dict(), "range_seconds": config.range_seconds},
                            num_cpus=config.decode_cpus)
        # One pack per block, streaming (no barrier): each pack is its own decode task.
        ds = ds.repartition(target_num_rows_per_block=1)
        ds = ds.map_batches(
            decode_pack,
            batch_size=1,
            fn_kwargs={"spec": spec.to_dict(), "frame_size": model_config.frame_size, "clips_per_batch": config.batch_size},
            num_cpus=config.decode_cpus,
            # Reserving memory for the decoder also keeps decoding in its own tasks: with remote
            # args equal to the actors', Ray Data fuses it into them (one decoder per replica).
            memory=config.decode_memory_mb * 1024 * 1024,
        )
        ds = ds.map_batches(
            Predictor,
            fn_constructor_kwargs={"model_uri": model_uri, "threads": max(1, int(actor_cpus)), "precision": config.precision},
            compute=ActorPoolStrategy(size=config.actors),
            batch_size=config.batch_size,
            num_cpus=actor_cpus,
            num_gpus=gpus,
        )
        commit_stream(ds.iter_batches(batch_size=None, batch_format="numpy"), out, run, task, all_shards, pending,
                      config.min_segment_seconds, lock)

    timings["pipeline"] = time.perf_counter() - started - timings["plan"]
    result = _summarize(out, run, task, rows, left_out, len(pending), len(committed), started, timings)
    storage.write_json(
        storage.join(out, "run.json"),
        {**result.summary(), "model_uri": model_uri, "clip_spec": spec.to_dict(), "label_config": asdict(config), "finished_at": time.time()},
    )
    return result


def _committed_shards(out: str) -> set[int]:
    """Shards with a completion record: one listing, not one request per shard."""
    folder = storage.join(out, "_commits")
    if not storage.exists(folder):
        return set()
    names = (storage.basename(f.uri) for f in storage.list_files(folder, (".json",)))
    return {int(n[len("shard-") : -len(".json")]) for n in names if n.startswith("shard-")}


def _commit_uri(out: str, shard: int) -> str:
    return storage.join(out, "_commits", f"shard-{shard:05d}.json")


def commit_stream(batches, out: str, run: dict, task: tasks.Task, all_shards: list[list[VideoRow]], pending: list[int],
                  min_segment_seconds: float, lock: StoreLock) -> None:
    """Collect predicted rows, in any order; commit each shard as soon as all of its rows are in.

    Ray Data hands batches over in completion order, and with several model replicas a video's
    status row can overtake its clip batches. So a range of a video is complete only when its
    status row is in (it says how many clips the range decoded) *and* that many distinct clip
    rows of the range are in; a video is complete when all its ranges are; a shard when all its
    videos are. Correctness does not rest on block order.

    Rows are keyed (clip: video + clip index; status: video + range), so a row that arrives
    twice, e.g. from a task Ray retried, is stored once; one arriving after its shard committed
    can only be such a duplicate, and is dropped. Before each commit the run checks that it
    still holds the output's lock (``LockLost`` stops it before it writes).

    Args:
        batches: dicts of numpy columns (``Predictor`` output), in any order.

    Raises:
        RuntimeError: the stream ended with a shard still incomplete.
        LockLost: another run took the output over.
    """
    waiting = {i: {row.video_uri for row in all_shards[i]} for i in pending}  # videos not complete yet, per shard
    clips: dict[int, dict[tuple[str, int], dict]] = {i: {} for i in pending}
    clip_ranges: dict[tuple[str, int], set[int]] = {}  # (video, range) -> clip indices received
    ranges: dict[int, dict[str, dict[int, dict]]] = {i: {} for i in pending}
    meta = {"run_id": run["run_id"], "model_id": run["model_id"]}
    predicted = list(task.clip_columns())

    def complete(shard: int, uri: str) -> bool:
        parts = ranges[shard].get(uri, {})
        if not parts or len(parts) < next(iter(parts.values()))["ranges_total"]:
            return False
        return all(len(clip_ranges.get((uri, r), ())) >= part["clips"] for r, part in parts.items())

    for batch in batches:
        for j in range(len(batch["video_uri"])):
            shard, uri = int(batch["shard"][j]), str(batch["video_uri"][j])
            if shard not in waiting:
                continue  # a late duplicate of a row of an already committed shard
            range_index = int(batch["range_index"][j])
            if batch["is_status"][j]:
                duration = float(batch["duration_s"][j])
                ranges[shard].setdefault(uri, {})[range_index] = {
                    "status": str(batch["status"][j]),
                    "clips": int(batch["clips"][j]),
                    "error_type": str(batch["error_type"][j]) or None,
                    "error": str(batch["error"][j]) or None,
                    "duration_s": None if np.isnan(duration) else duration,
                    "ranges_total": int(batch["ranges_total"][j]),
                }
            else:
                key = (uri, int(batch["clip_index"][j]))
                clips[shard][key] = {
                    "video_uri": uri,
                    "clip_index": key[1],
                    "start_s": float(batch["start_s"][j]),
                    "end_s": float(batch["end_s"][j]),
                    **{name: _scalar(batch[name][j]) for name in predicted},
                    **meta,
                }
                clip_ranges.setdefault((uri, range_index), set()).add(key[1])
            if uri in waiting[shard] and complete(shard, uri):
                waiting[shard].discard(uri)
            if not waiting[shard]:
                shard_ranges = ranges.pop(shard)
                attempts = {row.video_uri: row.attempt for row in all_shards[shard]}
                videos = [_video_row(video, parts, {**meta, "attempt": attempts[video]}) for video, parts in shard_ranges.items()]
                lock.check()
                _commit_shard(out, shard, run, task, list(clips.pop(shard).values()), videos, min_segment_seconds)
                waiting.pop(shard)
                for video, parts in shard_ranges.items():  # the driver holds only shards in flight
                    for r in parts:
                        clip_ranges.pop((video, r), None)
    if waiting:
        raise RuntimeError(f"the pipeline ended with shards {sorted(waiting)} incomplete")


def _scalar(value):
    """A numpy scalar as the Python value a table row holds (strings pass as they are)."""
    return value.item() if isinstance(value, np.generic) else value


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


def _commit_shard(out: str, shard: int, run: dict, task: tasks.Task, clips: list[dict], videos: list[dict], min_segment_seconds: float) -> None:
    """Write a shard's tables (the task's, then ``videos``), each atomically, then its completion record."""
    name = f"shard-{shard:05d}.parquet"
    clips.sort(key=lambda r: (r["video_uri"], r["clip_index"]))
    videos.sort(key=lambda r: r["video_uri"])
    schemas = task.tables()
    rows = task.shard_rows(clips, run, min_segment_seconds)
    for table, schema in schemas.items():
        storage.write_table(tables.table_from_rows(rows[table], tables.with_run_metadata(schema, run)), storage.join(out, table, name))
    storage.write_table(tables.table_from_rows(videos, tables.with_run_metadata(tables.VIDEOS, run)), storage.join(out, "videos", name))
    counts = {s: sum(1 for v in videos if v["status"] == s) for s in tables.VIDEO_STATUSES}
    storage.write_json(
        _commit_uri(out, shard),
        {"shard": shard, "videos": len(videos), **{table: len(rows[table]) for table in schemas}, **counts, "committed_at": time.time()},
    )


def _summarize(out: str, run: dict, task: tasks.Task, rows: list[VideoRow], left_out: dict, done: int, skipped: int, started: float,
               timings: dict) -> LabelResult:
    """Counts over the committed tables (every shard of the run is committed by now)."""
    videos = storage.read_table(storage.join(out, "videos"), columns=["status", "clips"]).to_pydict()
    counts = {table: storage.read_table(storage.join(out, table), columns=["video_uri"]).num_rows for table in task.tables()}
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
