"""Summaries of label tables with Dask: per label (or mask area), per video, a review queue and an HTML page.

    rnnimg report LABELS --out REPORT [--threshold 0.6] [--timeline-videos 20]

``LABELS`` is either the output of one labelling run (``rnnimg label ... --out LABELS``:
``LABELS/clips`` or ``LABELS/masks``, ``LABELS/videos``) or the base folder of the ``label-videos``
flow (``LABELS/state.json``, ``LABELS/runs/<run_id>/``, read with ``rnnimg.label_runs``). For a base,
the report covers the current labels of one model (default: the model of the latest successful
run): every completed run of that model, each video taken from the latest run that labelled it.

What is reported follows the model's task, recorded by the run (``_run/config.json``; a run
without one is a classifier's): ``_REPORTS`` maps a task to its report.

The tables are read with ``dask.dataframe.read_parquet`` and a pyarrow filesystem from
``rnnimg.storage`` (local or ``s3://``), partition by partition: only aggregates (one row per
label, per score bin, per status) and a few dozen rows for the plots are ever collected in
memory; the per-video table and the review queue are written partition by partition.

Outputs of a classification run (task ``classify``: the clips table)::

    REPORT/labels.parquet        one row per label: clips, duration_s, videos, share, mean_score, low_confidence_clips
    REPORT/videos/part-*.parquet one row per video: status, clips, dominant_label, dominant_share, mean_score, ...
    REPORT/review/part-*.parquet the low-confidence queue: clips with score < threshold
    REPORT/summary.json          the task, counts, the threshold, the runs read
    REPORT/index.html            the review page, self-contained (inline script and style, plots embedded as PNG):
                                 overview (distribution, score histogram, statuses, failed files and reasons),
                                 per video of the first ``timeline_videos`` a player (a relative link to a local
                                 video, a presigned URL of ``link_expires_s`` for s3://) over its label timeline
                                 (click a segment: the player seeks to its start), the review queue playable
                                 from each clip's start. Other tasks add tracks to a panel (``video_panel``).

Outputs of a segmentation run (task ``segment``: the masks table, one row per sampled frame)::

    REPORT/areas.parquet         frames per mask-area-fraction bin over [0, 1]
    REPORT/videos/part-*.parquet one row per video: status, frames, frames_with_mask, mean/max area fraction, ...
    REPORT/summary.json          the task, counts, the overlays drawn and the notes of those that could not be
    REPORT/index.html            area histogram, the mask-area timeline of the first videos, and overlays: frames of
                                 the first videos decoded at their sampled times and the mask's resolution, the
                                 decoded mask drawn over each (a video that cannot be decoded gets a note)
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, ClassVar

import pyarrow as pa

from rnnimg import checkpoint, label_runs, storage
from rnnimg.video.decode import VideoError, VideoReader

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("rnnimg.report")

LABELS_TABLE = "labels.parquet"  # REPORT/labels.parquet: one row per label, in the LABELS_SUMMARY schema
AREAS_TABLE = "areas.parquet"  # REPORT/areas.parquet (masks): frames per area-fraction bin, in the AREAS_SUMMARY schema

# Schemas of the report's tables (the label tables' own schemas are in rnnimg.tables).
LABELS_SUMMARY = pa.schema(
    [
        pa.field("label", pa.string(), nullable=False),  # predicted class
        pa.field("clips", pa.int64(), nullable=False),  # clips with this label
        pa.field("duration_s", pa.float64(), nullable=False),  # sum of their windows (overlapping windows count each)
        pa.field("videos", pa.int64(), nullable=False),  # videos with at least one clip of this label
        pa.field("share", pa.float64(), nullable=False),  # clips / all clips
        pa.field("mean_score", pa.float64(), nullable=False),  # mean softmax probability of the label
        pa.field("low_confidence_clips", pa.int64(), nullable=False),  # clips below the review threshold
    ]
)

VIDEOS_SUMMARY = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | partial | failed (from the videos table)
        pa.field("duration_s", pa.float64()),  # declared duration; null if the video could not be opened
        pa.field("clips", pa.int64(), nullable=False),  # clips labelled
        pa.field("dominant_label", pa.string()),  # the most frequent label (ties: first by name); null with no clips
        pa.field("dominant_clips", pa.int64(), nullable=False),  # clips with the dominant label
        pa.field("dominant_share", pa.float64()),  # dominant_clips / clips; null with no clips
        pa.field("mean_score", pa.float64()),  # mean score over the video's clips; null with no clips
        pa.field("low_confidence_clips", pa.int64(), nullable=False),  # clips below the review threshold
        pa.field("error_type", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),  # the run whose labels these are
    ]
)

REVIEW = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
    ]
)


AREAS_SUMMARY = pa.schema(
    [
        pa.field("bin_start", pa.float64(), nullable=False),  # area fraction, the bin's lower edge (inclusive)
        pa.field("bin_end", pa.float64(), nullable=False),  # its upper edge (exclusive; the last bin includes 1.0)
        pa.field("frames", pa.int64(), nullable=False),  # sampled frames whose mask covers that share of the frame
        pa.field("share", pa.float64(), nullable=False),  # frames / all frames
    ]
)

MASK_VIDEOS_SUMMARY = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | partial | failed (from the videos table)
        pa.field("duration_s", pa.float64()),  # declared duration; null if the video could not be opened
        pa.field("clips", pa.int64(), nullable=False),  # clips labelled (from the videos table)
        pa.field("frames", pa.int64(), nullable=False),  # sampled frames with a mask row
        pa.field("frames_with_mask", pa.int64(), nullable=False),  # of those, frames whose mask is not empty
        pa.field("mean_area_fraction", pa.float64()),  # mean over the frames; null with no frames
        pa.field("max_area_fraction", pa.float64()),  # largest; null with no frames
        pa.field("error_type", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),  # the run whose masks these are
    ]
)


class ReportError(ValueError):
    """The labels location holds no label tables the report can read; the message says why."""


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows."""

    threshold: float = 0.6  # clips with a score below this go to the review queue
    timeline_videos: int = 20  # videos drawn in the label timeline (the first ones by URI)
    review_examples: int = 25  # lowest-scoring clips listed on the HTML page
    score_bins: int = 20  # bins of the score histogram over [0, 1]
    # Masks (task segment) only:
    overlay_videos: int = 4  # videos drawn with their masks over their frames (the first by URI with masks)
    overlay_frames: int = 4  # sampled frames drawn per overlay video, spread over the video
    area_bins: int = 20  # bins of the mask-area histogram over [0, 1]
    # The review page (classify): players of the first ``timeline_videos`` videos, the failed files.
    link_expires_s: int = 24 * 3600  # lifetime of the presigned URLs of s3:// videos (at most 7 days, SigV4's limit)
    problem_videos: int = 100  # failed or partial videos listed with their reasons
    thumbnails: int = 12  # keyframe thumbnails per video panel (its first segments); 0: none

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not isinstance(self.timeline_videos, int) or self.timeline_videos < 0:
            raise ValueError(f"timeline_videos must be an integer >= 0, got {self.timeline_videos!r}")
        if not isinstance(self.review_examples, int) or self.review_examples < 0:
            raise ValueError(f"review_examples must be an integer >= 0, got {self.review_examples!r}")
        if not isinstance(self.score_bins, int) or not 2 <= self.score_bins <= 200:
            raise ValueError(f"score_bins must be an integer in [2, 200], got {self.score_bins!r}")
        if not isinstance(self.overlay_videos, int) or self.overlay_videos < 0:
            raise ValueError(f"overlay_videos must be an integer >= 0, got {self.overlay_videos!r}")
        if not isinstance(self.overlay_frames, int) or not 1 <= self.overlay_frames <= 16:
            raise ValueError(f"overlay_frames must be an integer in [1, 16], got {self.overlay_frames!r}")
        if not isinstance(self.area_bins, int) or not 2 <= self.area_bins <= 200:
            raise ValueError(f"area_bins must be an integer in [2, 200], got {self.area_bins!r}")
        if not isinstance(self.link_expires_s, int) or not 60 <= self.link_expires_s <= 7 * 24 * 3600:
            raise ValueError(f"link_expires_s must be an integer in [60, 604800] (7 days), got {self.link_expires_s!r}")
        if not isinstance(self.thumbnails, int) or self.thumbnails < 0:
            raise ValueError(f"thumbnails must be an integer >= 0, got {self.thumbnails!r}")
        if not isinstance(self.problem_videos, int) or self.problem_videos < 0:
            raise ValueError(f"problem_videos must be an integer >= 0, got {self.problem_videos!r}")


@dataclass(frozen=True)
class LabelSource:
    """The label tables one report reads."""

    location: str  # what the user named
    kind: str  # "run" (one labelling output) or "base" (a label-videos base folder)
    runs: list[str]  # run ids, oldest first
    run_dirs: list[str]  # the runs' output folders, same order
    clips: list[str] = field(default_factory=list)  # Parquet files of the clips tables
    videos: list[str] = field(default_factory=list)  # Parquet files of the videos tables
    model_id: str | None = None
    task: str = checkpoint.DEFAULT_TASK  # the model's task, as the runs recorded it
    masks: list[str] = field(default_factory=list)  # Parquet files of the masks tables (task segment)


@dataclass(frozen=True)
class ReportResult:
    out: str  # the report folder
    html: str  # its HTML page
    labels: str  # what was read
    model_id: str | None
    runs: list[str]
    videos: int  # videos in the report (current rows)
    ok: int
    partial: int
    failed: int
    clips: int
    low_confidence_clips: int  # rows of the review queue
    threshold: float
    label_clips: dict[str, int]  # clips per label
    seconds: float
    task: str = "classify"

    # The small per-label table that the label-report flow publishes, and how.
    TABLE: ClassVar[str] = LABELS_TABLE
    TABLE_KEY: ClassVar[str] = "labels"
    TABLE_COLUMNS: ClassVar[list[str]] = ["label", "clips", "share", "videos", "duration_s", "mean_score", "low_confidence_clips"]
    TABLE_FORMATS: ClassVar[dict[str, str]] = {"share": "{:.3f}", "duration_s": "{:.1f}", "mean_score": "{:.3f}"}
    TABLE_DESCRIPTION: ClassVar[str] = "Clips, videos and duration per label"
    PAGE_DESCRIPTION: ClassVar[str] = "Review page: label distribution, score histogram, players with clickable label timelines, review queue"

    def summary(self) -> dict:
        return asdict(self)

    def headline(self) -> list[str]:
        """The report in a few markdown lines (the label-report flow's summary artifact)."""
        return [
            f"model `{self.model_id}`, runs {', '.join(self.runs) or 'not recorded'}",
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed; {self.clips} clips",
            f"review queue: {self.low_confidence_clips} clips with score below {self.threshold:g} (`{storage.join(self.out, 'review')}`)",
            f"report `{self.html}`, built in {self.seconds:.1f} s",
        ]


@dataclass(frozen=True)
class MasksReportResult:
    """The counts of a masks (task ``segment``) report, written to ``summary.json``."""

    out: str  # the report folder
    html: str  # its HTML page
    labels: str  # what was read
    model_id: str | None
    runs: list[str]
    videos: int  # videos in the report (current rows)
    ok: int
    partial: int
    failed: int
    frames: int  # sampled frames with a mask row
    frames_with_mask: int  # of those, frames whose mask is not empty
    mean_area_fraction: float | None  # over all frames; None with no frames
    overlays: list[str]  # videos drawn with their masks over their frames
    overlay_notes: dict[str, str]  # video -> why its overlay could not be drawn
    seconds: float
    task: str = "segment"

    TABLE: ClassVar[str] = AREAS_TABLE
    TABLE_KEY: ClassVar[str] = "areas"
    TABLE_COLUMNS: ClassVar[list[str]] = ["bin_start", "bin_end", "frames", "share"]
    TABLE_FORMATS: ClassVar[dict[str, str]] = {"bin_start": "{:.2f}", "bin_end": "{:.2f}", "share": "{:.3f}"}
    TABLE_DESCRIPTION: ClassVar[str] = "Sampled frames per mask-area fraction"
    PAGE_DESCRIPTION: ClassVar[str] = "Static HTML report: mask-area histogram, area timelines, masks drawn over frames"

    def summary(self) -> dict:
        return asdict(self)

    def headline(self) -> list[str]:
        """The report in a few markdown lines (the label-report flow's summary artifact)."""
        mean = "n/a" if self.mean_area_fraction is None else f"{self.mean_area_fraction:.3f}"
        return [
            f"task `segment`, model `{self.model_id}`, runs {', '.join(self.runs) or 'not recorded'}",
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed; {self.frames} sampled frames, "
            f"{self.frames_with_mask} with a mask; mean area fraction {mean}",
            f"overlays of {len(self.overlays)} videos" + (f", {len(self.overlay_notes)} could not be drawn" if self.overlay_notes else ""),
            f"report `{self.html}`, built in {self.seconds:.1f} s",
        ]


# ----------------------------------------------------------------------------- inputs


def _parquet_files(location: str) -> list[str]:
    if not storage.exists(location):
        return []
    return [f.uri for f in storage.list_files(location, (".parquet",))]


def resolve_labels(labels: str, model_id: str | None = None) -> LabelSource:
    """Find the label tables under ``labels``: one labelling output or a ``label-videos`` base.

    Args:
        labels: ``OUT`` of ``rnnimg label`` (has ``videos/``), or a base with ``state.json``.
        model_id: with a base, report this model's runs (default: the latest successful run's model).

    Raises:
        ReportError: neither layout is there, the model has no completed run, no tables, or the
            runs read disagree on the task.
        ValueError: a base's state.json is of another version.
    """
    if label_runs.is_base(labels):
        try:
            model_id, runs = label_runs.completed_runs(labels, model_id)
        except label_runs.NoCompletedRun as err:
            raise ReportError(str(err)) from err
        run_ids = [r["run_id"] for r in runs]
        source = LabelSource(labels, "base", run_ids, [label_runs.run_out(labels, r) for r in run_ids], model_id=model_id)
    elif storage.exists(storage.join(labels, "clips")) or storage.exists(storage.join(labels, "videos")):
        config_uri = storage.join(labels, "_run", "config.json")
        config = storage.read_json(config_uri) if storage.exists(config_uri) else {}
        if model_id and config.get("model_id") and config["model_id"] != model_id:
            raise ReportError(f"{labels} holds labels of model {config['model_id']!r}, not {model_id!r}")
        runs = [config["run_id"]] if config.get("run_id") else []
        source = LabelSource(labels, "run", runs, [labels], model_id=config.get("model_id"))
    else:
        raise ReportError(
            f"no label tables at {labels}: expected a labelling output (LABELS/clips, LABELS/videos) "
            "or a label-videos base folder (LABELS/state.json)"
        )
    clips = [f for d in source.run_dirs for f in _parquet_files(storage.join(d, "clips"))]
    videos = [f for d in source.run_dirs for f in _parquet_files(storage.join(d, "videos"))]
    masks = [f for d in source.run_dirs for f in _parquet_files(storage.join(d, "masks"))]
    if not videos:
        raise ReportError(f"no videos table under {labels} (looked in {', '.join(storage.join(d, 'videos') for d in source.run_dirs)})")
    found = {d: _run_task(d) for d in source.run_dirs}
    if len(set(found.values())) > 1:
        raise ReportError(f"the runs under {labels} are of different tasks ({', '.join(f'{d}: {t}' for d, t in found.items())}); "
                          "report one model at a time (--model-id)")
    task = next(iter(found.values()), checkpoint.DEFAULT_TASK)
    return LabelSource(source.location, source.kind, source.runs, source.run_dirs, clips, videos, source.model_id, task, masks)


def _run_task(run_dir: str) -> str:
    """The task a labelling run recorded in ``_run/config.json``; a run without one is a classifier's."""
    uri = storage.join(run_dir, "_run", "config.json")
    config = storage.read_json(uri) if storage.exists(uri) else {}
    return str(config.get("task") or checkpoint.DEFAULT_TASK)


def _read(files: list[str], columns: list[str], schema: pa.Schema, filters: list | None = None):
    """A Dask frame over Parquet files of one store; an empty frame of ``schema`` when there are none.

    ``filters`` (pyarrow's DNF, e.g. ``[("video_uri", "in", [...])]``) skip row groups by their
    statistics and keep only the matching rows.
    """
    import dask.dataframe as dd

    if not files:
        return dd.from_pandas(schema.empty_table().select(columns).to_pandas(), npartitions=1)
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    return dd.read_parquet(paths, filesystem=fs, columns=columns, filters=filters)


# ----------------------------------------------------------------------------- aggregations


def _superseded(videos, runs: list[str]) -> set[tuple[str, str]]:
    """(video_uri, run_id) rows replaced by a later run of the same video (a changed video relabelled).

    Only videos labelled more than once are collected; they are the changed ones, few in a
    normal archive.
    """
    if len(runs) < 2:
        return set()
    order = {run: i for i, run in enumerate(runs)}
    frame = videos[["video_uri", "run_id"]]
    frame = frame.assign(run_order=frame["run_id"].map(order, meta=("run_order", "int64")))
    counts = frame.groupby("video_uri").run_order.agg(["count", "max"], split_out=True)
    repeated = counts[counts["count"] > 1].compute()
    if repeated.empty:
        return set()
    rows = frame[frame["video_uri"].isin(list(repeated.index))].compute()
    latest = rows["video_uri"].map(repeated["max"])
    old = rows[rows["run_order"] < latest]
    return set(zip(old["video_uri"], old["run_id"]))


def _drop_rows(frame, pairs: set[tuple[str, str]]):
    """Partition function: drop rows whose (video_uri, run_id) is in ``pairs``."""
    import pandas as pd

    if not pairs or frame.empty:
        return frame
    keys = pd.MultiIndex.from_arrays([frame["video_uri"], frame["run_id"]])
    return frame[~keys.isin(list(pairs))]


def _dominant(pairs):
    """Partition function over (video_uri, label) counts, all labels of a video in one partition."""
    import pandas as pd

    if pairs.empty:
        return pd.DataFrame(
            {
                "video_uri": pairs["video_uri"].iloc[:0],
                "clips": pd.Series([], dtype="int64"),
                "dominant_label": pairs["label"].iloc[:0],
                "dominant_clips": pd.Series([], dtype="int64"),
                "score_sum": pd.Series([], dtype="float64"),
                "low_confidence_clips": pd.Series([], dtype="int64"),
            }
        )
    totals = pairs.groupby("video_uri", sort=False)[["clips", "score_sum", "low"]].sum()
    # Most clips first; ties go to the label first by name, so the result does not depend on order.
    top = pairs.sort_values(["video_uri", "clips", "label"], ascending=[True, False, True]).drop_duplicates("video_uri")
    top = top.set_index("video_uri")
    totals = totals.loc[top.index]
    return pd.DataFrame(
        {
            "video_uri": pd.Series(top.index, dtype=pairs["video_uri"].dtype),
            "clips": totals["clips"].astype("int64").to_numpy(),
            "dominant_label": pd.Series(top["label"].to_numpy(), dtype=pairs["label"].dtype),
            "dominant_clips": top["clips"].astype("int64").to_numpy(),
            "score_sum": totals["score_sum"].astype("float64").to_numpy(),
            "low_confidence_clips": totals["low"].astype("int64").to_numpy(),
        }
    )


def _first_uris(series, n: int):
    """Partition function: the ``n`` smallest URIs of a partition."""
    import pandas as pd

    return pd.Series(sorted(series.dropna().unique())[:n], dtype=object)


def _write_part(frame, location: str, schema: pa.Schema, partition_info=None):
    """Partition function: write one partition as ``location/part-NNNNN.parquet`` (atomic).

    Returns a one-row Series holding the rows written, so that the writes are an ordinary
    Dask collection computed together with the aggregations (the tables are read once).
    """
    import pandas as pd

    index = partition_info["number"] if partition_info else 0
    if len(frame):
        table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
        storage.write_table(table, storage.join(location, f"part-{index:05d}.parquet"))
    return pd.Series([len(frame)], dtype="int64")


def _write_partitions(frame, location: str, schema: pa.Schema):
    """Every partition of a Dask frame written as it is computed; nothing is collected in one place."""
    import pandas as pd

    return frame.map_partitions(_write_part, location, schema, meta=pd.Series([], dtype="int64")).sum()


# ----------------------------------------------------------------------------- the report


def build_report(labels: str, out: str, config: ReportConfig = ReportConfig(),
                 model_id: str | None = None) -> "ReportResult | MasksReportResult":
    """Summarise the label tables under ``labels`` into ``out`` (tables, summary.json, index.html).

    The report is the one of the runs' task (``_REPORTS``): per label for a classifier's clips,
    per mask area for a segmenter's masks.

    Args:
        labels: a labelling output or a ``label-videos`` base (see the module docstring).
        out: the report folder (local or ``s3://``); its ``videos/`` and ``review/`` are replaced.
        model_id: with a base, the model to report (default: the latest successful run's).

    Returns:
        The counts written to ``summary.json``.

    Raises:
        ReportError: no label tables at ``labels``, or tables of a task without a report.
    """
    started = time.perf_counter()
    source = resolve_labels(labels, model_id)
    report = _REPORTS.get(source.task)
    if report is None:
        raise ReportError(f"{labels} holds labels of task {source.task!r}; the report reads the tables of tasks {sorted(_REPORTS)}")
    return report(source, out, config, started)


def _clips_report(source: LabelSource, out: str, config: ReportConfig, started: float) -> ReportResult:
    """The classification report (task ``classify``): per label, per video, the review queue."""
    import dask

    from rnnimg import tables

    labels = source.location
    log.info("report over %d runs, %d clip files, %d video files of %s", len(source.runs), len(source.clips), len(source.videos), labels)
    clips = _read(source.clips, ["video_uri", "clip_index", "start_s", "end_s", "label", "score", "run_id"], tables.CLIPS)
    videos = _read(source.videos, ["video_uri", "status", "duration_s", "error_type", "error", "run_id"], tables.VIDEOS)
    superseded = _superseded(videos, source.runs)
    if superseded:
        log.info("%d (video, run) rows are older labels of relabelled videos; keeping each video's latest", len(superseded))
        clips = clips.map_partitions(_drop_rows, superseded, meta=clips._meta)
        videos = videos.map_partitions(_drop_rows, superseded, meta=videos._meta)

    threshold, bins = config.threshold, config.score_bins
    clips = clips.assign(duration_s=clips["end_s"] - clips["start_s"], low=(clips["score"] < threshold).astype("int64"))
    # One row per (video, label): the only intermediate table, far smaller than the clips.
    pairs = clips.groupby(["video_uri", "label"]).agg(
        clips=("score", "count"), score_sum=("score", "sum"), duration_s=("duration_s", "sum"), low=("low", "sum"), split_out=True
    ).reset_index()
    per_label = pairs.groupby("label").agg(
        clips=("clips", "sum"), videos=("video_uri", "count"), duration_s=("duration_s", "sum"),
        score_sum=("score_sum", "sum"), low_confidence_clips=("low", "sum"),
    )
    score_bin = (clips["score"].astype("float64") * bins).astype("int64").clip(0, bins - 1)
    histogram = clips.assign(bin=score_bin).groupby(["label", "bin"]).size()
    statuses = videos["status"].value_counts()
    errors = videos["error_type"].dropna().value_counts()

    # Per video: (video, label) counts moved so that a video's labels share a partition, then joined
    # to the videos table (videos without clips keep their row).
    per_video_clips = pairs.shuffle("video_uri").map_partitions(_dominant, meta=_dominant(pairs._meta))
    per_video = videos.merge(per_video_clips, on="video_uri", how="left")
    per_video = per_video.map_partitions(_finish_videos, meta=_finish_videos(per_video._meta))
    review = clips[clips["score"] < threshold][REVIEW.names]
    first = videos["video_uri"].map_partitions(_first_uris, config.timeline_videos, meta=("video_uri", "object"))

    videos_out, review_out = storage.join(out, "videos"), storage.join(out, "review")
    for folder in (videos_out, review_out):
        storage.delete(folder)
    (per_label_df, histogram_s, statuses_s, errors_s, first_s, lowest, video_rows, review_rows) = dask.compute(
        per_label, histogram, statuses, errors, first, review.nsmallest(max(1, config.review_examples), "score"),
        _write_partitions(per_video, videos_out, VIDEOS_SUMMARY), _write_partitions(review, review_out, REVIEW),
    )
    for rows, folder, schema in ((video_rows, videos_out, VIDEOS_SUMMARY), (review_rows, review_out, REVIEW)):
        if rows == 0:  # keep the folder readable, with its schema
            storage.write_table(schema.empty_table(), storage.join(folder, "part-00000.parquet"))

    total_clips = int(per_label_df["clips"].sum())
    label_table = _label_table(per_label_df, total_clips)
    storage.write_table(label_table, storage.join(out, LABELS_TABLE))

    # The timeline: the first videos by URI; only their rows are collected.
    timeline_uris = sorted(first_s.tolist())[: config.timeline_videos]
    # The review page's segments: the runs' segments tables where every run has one, else the clips
    # (consecutive clips of one label merged); the failed and partial videos with their reasons.
    segment_files = [f for d in source.run_dirs for f in _parquet_files(storage.join(d, "segments"))]
    segments = None
    if segment_files and all(storage.exists(storage.join(d, "segments")) for d in source.run_dirs) and timeline_uris:
        segments = _read(segment_files, ["video_uri", "start_s", "end_s", "label", "mean_score", "run_id"], tables.SEGMENTS,
                         filters=[("video_uri", "in", timeline_uris)])
        if superseded:
            segments = segments.map_partitions(_drop_rows, superseded, meta=segments._meta)
        segments = segments[segments["video_uri"].isin(timeline_uris)]
    problems = videos[videos["status"] != "ok"][["video_uri", "status", "error_type", "error"]]
    timeline_clips, timeline_videos, timeline_segments, problem_rows = dask.compute(
        clips[clips["video_uri"].isin(timeline_uris)][["video_uri", "start_s", "end_s", "label", "score"]],
        videos[videos["video_uri"].isin(timeline_uris)],
        segments if segments is not None else clips._meta[["video_uri"]],
        problems.map_partitions(lambda f, n: f.head(n), config.problem_videos, meta=problems._meta),
    )
    if segments is None:
        timeline_segments = merge_clips(timeline_clips)
    else:
        timeline_segments = timeline_segments.rename(columns={"mean_score": "score"})
    problem_rows = problem_rows.sort_values("video_uri").head(config.problem_videos)

    counts = {s: int(statuses_s.get(s, 0)) for s in tables.VIDEO_STATUSES}
    error_types = {str(k): int(v) for k, v in errors_s.items()}
    result = ReportResult(
        out=out,
        html=storage.join(out, "index.html"),
        labels=labels,
        model_id=source.model_id,
        runs=source.runs,
        videos=int(video_rows),
        ok=counts["ok"],
        partial=counts["partial"],
        failed=counts["failed"],
        clips=total_clips,
        low_confidence_clips=int(review_rows),
        threshold=threshold,
        label_clips=dict(zip(label_table.column("label").to_pylist(), label_table.column("clips").to_pylist())),
        seconds=round(time.perf_counter() - started, 3),
    )
    page = _html(result, config, label_table.to_pandas(), histogram_s, error_types, timeline_uris, timeline_clips,
                 timeline_videos, lowest.head(config.review_examples), timeline_segments, problem_rows)
    storage.write_bytes(result.html, page.encode("utf-8"))
    storage.write_json(storage.join(out, "summary.json"), {**result.summary(), "error_types": error_types, "config": asdict(config)})
    return result


def _finish_videos(frame):
    """Partition function: the per-video table's final columns (videos without clips get zeros)."""
    import pandas as pd

    clips = frame["clips"].fillna(0).astype("int64")
    with_clips = clips > 0
    out = pd.DataFrame(
        {
            "video_uri": frame["video_uri"].astype(object),
            "status": frame["status"].astype(object),
            "duration_s": frame["duration_s"].astype("float64"),
            "clips": clips,
            "dominant_label": frame["dominant_label"].astype(object).where(with_clips, None),
            "dominant_clips": frame["dominant_clips"].fillna(0).astype("int64"),
            "dominant_share": (frame["dominant_clips"] / clips).where(with_clips, None).astype("float64"),
            "mean_score": (frame["score_sum"] / clips).where(with_clips, None).astype("float64"),
            "low_confidence_clips": frame["low_confidence_clips"].fillna(0).astype("int64"),
            "error_type": frame["error_type"].astype(object),
            "run_id": frame["run_id"].astype(object),
        }
    )
    return out.reset_index(drop=True)


def _label_table(per_label, total_clips: int) -> pa.Table:
    rows = []
    for label, row in per_label.sort_index().iterrows():
        clips = int(row["clips"])
        rows.append(
            {
                "label": str(label),
                "clips": clips,
                "duration_s": float(row["duration_s"]),
                "videos": int(row["videos"]),
                "share": clips / total_clips if total_clips else 0.0,
                "mean_score": float(row["score_sum"]) / clips if clips else 0.0,
                "low_confidence_clips": int(row["low_confidence_clips"]),
            }
        )
    return pa.Table.from_pylist(rows, schema=LABELS_SUMMARY)


def label_counts(labels_run: str) -> dict[str, int]:
    """Clips per label of one labelling output, streamed batch by batch (no Dask needed).

    Used by the ``label-videos`` flow for its run summary.
    """
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    location = storage.join(labels_run, "clips")
    if not storage.exists(location):
        return {}
    fs, path = storage.resolve(location)
    counts: dict[str, int] = {}
    for batch in ds.dataset(path, filesystem=fs, format="parquet").to_batches(columns=["label"]):
        for item in pc.value_counts(batch.column("label")).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + int(item["counts"])
    return dict(sorted(counts.items()))


# ----------------------------------------------------------------------------- HTML


def _colors(labels: list[str]) -> dict[str, tuple]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {label: palette(i % 10) for i, label in enumerate(sorted(labels))}


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _plot_distribution(label_frame, colors) -> str | None:
    from matplotlib.figure import Figure

    if label_frame.empty:
        return None
    figure = Figure(figsize=(6, 0.5 + 0.4 * len(label_frame)))
    axes = figure.subplots()
    axes.barh(label_frame["label"], label_frame["clips"], color=[colors[l] for l in label_frame["label"]])
    axes.invert_yaxis()
    axes.set_xlabel("clips")
    axes.set_title("Label distribution")
    return _png(figure)


def _plot_histogram(histogram, bins: int, threshold: float, colors) -> str | None:
    import numpy as np
    from matplotlib.figure import Figure

    if histogram is None or len(histogram) == 0:
        return None
    counts = histogram.unstack(fill_value=0) if hasattr(histogram, "unstack") else histogram
    figure = Figure(figsize=(7, 3))
    axes = figure.subplots()
    edges = np.linspace(0.0, 1.0, bins + 1)
    bottom = np.zeros(bins)
    for label in sorted(counts.index):
        values = np.zeros(bins)
        for b, n in counts.loc[label].items():
            values[int(b)] = n
        axes.bar(edges[:-1], values, width=1.0 / bins, bottom=bottom, align="edge", color=colors.get(label), label=str(label))
        bottom += values
    axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"review threshold {threshold:g}")
    axes.set_xlim(0, 1)
    axes.set_xlabel("score (softmax probability of the predicted label)")
    axes.set_ylabel("clips")
    axes.set_title("Score histogram")
    axes.legend(fontsize="small")
    return _png(figure)


def _plot_timeline(uris: list[str], clips, colors) -> str | None:
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not uris:
        return None
    figure = Figure(figsize=(9, 0.8 + 0.35 * len(uris)))
    axes = figure.subplots()
    for row, uri in enumerate(uris):
        mine = clips[clips["video_uri"] == uri].sort_values("start_s") if len(clips) else clips
        starts = mine["start_s"].to_numpy() if len(mine) else []
        for i, (_, clip) in enumerate(mine.iterrows()):
            # Overlapping windows are drawn up to the next clip's start, so each instant has one colour.
            end = min(float(clip["end_s"]), float(starts[i + 1])) if i + 1 < len(starts) else float(clip["end_s"])
            axes.broken_barh([(clip["start_s"], end - clip["start_s"])], (row - 0.35, 0.7),
                             facecolors=colors.get(clip["label"]), alpha=0.35 + 0.65 * float(clip["score"]))
    axes.set_yticks(range(len(uris)), [storage.basename(u) for u in uris], fontsize="small")
    axes.invert_yaxis()
    axes.set_xlabel("seconds (opacity: score)")
    axes.set_title(f"Label timeline, first {len(uris)} videos by URI")
    axes.legend(handles=[Patch(color=c, label=l) for l, c in colors.items()], fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)


def _table_html(frame, columns: list[str], formats: dict | None = None, markup: tuple[str, list[str]] | None = None) -> str:
    """An HTML table of ``frame``'s ``columns`` (escaped); ``markup``: a last column of ready HTML, one cell per row."""
    formats = formats or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns) + (f"<th>{html.escape(markup[0])}</th>" if markup else "")
    body = []
    for k, (_, row) in enumerate(frame.iterrows()):
        cells = []
        for c in columns:
            value = row[c]
            text = "" if value is None or (isinstance(value, float) and value != value) else formats.get(c, "{}").format(value)
            cells.append(f"<td>{html.escape(text)}</td>")
        if markup:
            cells.append(f"<td>{markup[1][k]}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _timeline_table(uris: list[str], clips, videos):
    """The timeline's videos as rows (pandas; only these few videos): status, dominant label, mean score."""
    import pandas as pd

    status = dict(zip(videos["video_uri"], videos["status"])) if len(videos) else {}
    rows = []
    for uri in uris:
        mine = clips[clips["video_uri"] == uri] if len(clips) else clips
        counts = mine["label"].value_counts() if len(mine) else pd.Series(dtype="int64")
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if len(counts) else (None, 0)
        rows.append(
            {
                "video_uri": uri,
                "status": status.get(uri, ""),
                "clips": len(mine),
                "dominant_label": top[0],
                "dominant_share": top[1] / len(mine) if len(mine) else None,
                "mean_score": float(mine["score"].mean()) if len(mine) else None,
            }
        )
    return pd.DataFrame(rows)


def merge_clips(clips):
    """Segments from clip rows: consecutive clips of one video with one label merged (pandas, a few videos).

    Returns a frame of ``video_uri, start_s, end_s, label, score`` (score: the mean of the merged clips).
    """
    import pandas as pd

    rows = []
    if len(clips):
        for uri, mine in clips.sort_values(["video_uri", "start_s"]).groupby("video_uri", sort=True):
            current = None
            for clip in mine.itertuples(index=False):
                if current is not None and current["label"] == clip.label:
                    current["end_s"] = max(current["end_s"], float(clip.end_s))
                    current["scores"].append(float(clip.score))
                    continue
                if current is not None:
                    rows.append(current)
                current = {"video_uri": uri, "start_s": float(clip.start_s), "end_s": float(clip.end_s), "label": clip.label,
                           "scores": [float(clip.score)]}
            if current is not None:
                rows.append(current)
    for row in rows:
        scores = row.pop("scores")
        row["score"] = sum(scores) / len(scores)
    return pd.DataFrame(rows, columns=["video_uri", "start_s", "end_s", "label", "score"])


def video_src(video_uri: str, out: str, expires_s: int) -> tuple[str | None, str]:
    """Where the page in ``out`` finds ``video_uri``: ``(src, note)``.

    A local video gets a link relative to the report folder (the folder can be moved with the
    archive beside it); an ``s3://`` video a presigned URL valid ``expires_s`` seconds
    (``storage.presigned_url``: a signature, never the secret key). A local video cannot be
    linked from a report written to S3: ``src`` is None and the note says why.
    """
    from urllib.parse import quote, urlparse

    if storage.is_s3(video_uri):
        return storage.presigned_url(video_uri, expires_s), f"presigned URL, valid {expires_s / 3600:g} h"
    if storage.is_s3(out):
        return None, "a local video cannot be played from a report written to S3"
    import os

    path = urlparse(video_uri).path if video_uri.startswith("file://") else video_uri
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(out))
    return quote(rel.replace(os.sep, "/")), "local file, linked relative to the report folder"


def keyframe_thumbnails(video_uri: str, times: list[float], height: int = 54) -> list[tuple[float, float, bytes]]:
    """JPEG thumbnails of the keyframes at or before ``times``: ``(time asked, keyframe time, jpeg)``.

    Cheap: one seek per time to the keyframe before it and only keyframes decoded (the decoder
    skips every other frame), never a full decode. Times that fall back to one keyframe share it
    (a video with one keyframe gives one picture).

    Raises:
        av.FFmpegError, OSError, VideoError: the video cannot be opened or read.
    """
    import av

    found: dict[float, bytes] = {}
    out = []
    with storage.open_input(video_uri) as file, av.open(file, mode="r") as container:
        if not container.streams.video:
            raise VideoError("no_video_stream", f"{video_uri}: no video stream")
        stream = container.streams.video[0]
        stream.codec_context.skip_frame = "NONKEY"
        base = stream.start_time or 0
        for t in times:
            container.seek(base + int(max(0.0, t) / stream.time_base), stream=stream, backward=True, any_frame=False)
            frame = next(iter(container.decode(stream)), None)
            if frame is None:
                continue
            key = round(float(frame.time if frame.time is not None else 0.0), 3)
            if key not in found:
                image = frame.to_image()
                image.thumbnail((max(1, round(height * image.width / max(1, image.height))), height))
                buffer = io.BytesIO()
                image.save(buffer, format="JPEG", quality=80)
                found[key] = buffer.getvalue()
            out.append((float(t), key, found[key]))
    return out


def _hex(color) -> str:
    from matplotlib.colors import to_hex

    return to_hex(color)


def _fmt_s(seconds: float) -> str:
    minutes, rest = divmod(max(0.0, float(seconds)), 60.0)
    return f"{int(minutes)}:{rest:05.2f}"


def timeline_html(duration_s: float, tracks: list[tuple[str, list[dict]]], colors: dict[str, str]) -> str:
    """The clickable timeline under a player: one row per track, one button per segment.

    Each segment is ``{"start_s", "end_s", "label", "score"}`` (score may be None); overlapping
    segments are drawn up to the next one's start, so each instant has one colour. Clicking a
    segment seeks the panel's player to its ``start_s`` (the page's script). Other tasks add
    their own tracks (objects per class, surprise per frame) to the same panel.
    """
    rows = []
    for name, segments in tracks:
        ordered = sorted(segments, key=lambda g: (g["start_s"], g["end_s"]))
        buttons = []
        for i, seg in enumerate(ordered):
            start = float(seg["start_s"])
            end = float(seg["end_s"])
            if i + 1 < len(ordered):
                end = max(start, min(end, float(ordered[i + 1]["start_s"])))
            left = 100.0 * start / duration_s
            width = max(0.2, 100.0 * (end - start) / duration_s)
            score = seg.get("score")
            score_text = "" if score is None or score != score else f", score {float(score):.3f}"
            title = f"{seg['label']}: {_fmt_s(seg['start_s'])} to {_fmt_s(seg['end_s'])}{score_text}"
            buttons.append(
                f'<button type="button" class="seg" data-start="{start:.3f}" data-end="{float(seg["end_s"]):.3f}" '
                f'data-label="{html.escape(str(seg["label"]))}" title="{html.escape(title)}" '
                f'style="left:{left:.3f}%;width:{min(width, 100.0 - left):.3f}%;background:{colors.get(seg["label"], "#999")}">'
                f"</button>"
            )
        rows.append(f'<div class="track"><span class="track-name">{html.escape(name)}</span>'
                    f'<div class="lane">{"".join(buttons)}<div class="playhead"></div></div></div>')
    named = " named" if len(tracks) > 1 else ""
    return f'<div class="timeline{named}" data-duration="{duration_s:.3f}">{"".join(rows)}</div>'


def video_panel(uri: str, src: str | None, note: str, heading: str, duration_s: float, tracks: list[tuple[str, list[dict]]],
                colors: dict[str, str], index: int, thumbs: list[tuple[float, float, str]] = ()) -> str:
    """One video of the review page: its player (or why there is none), its timeline tracks and its thumbnails.

    ``thumbs``: ``(segment start, keyframe time, relative image path)``; clicking one seeks like its segment.
    """
    poster = f' poster="{html.escape(thumbs[0][2])}"' if thumbs else ""
    player = (f'<video class="player" controls preload="metadata"{poster} src="{html.escape(src)}"></video>' if src
              else f'<p class="note">No player: {html.escape(note)}.</p>')
    strip = "".join(
        f'<img class="thumb" alt="keyframe at {key:.2f} s" title="segment at {_fmt_s(start)}; keyframe at {_fmt_s(key)}" '
        f'data-start="{start:.3f}" src="{html.escape(path)}">' for start, key, path in thumbs)
    return (f'<section class="video" id="video-{index}" data-uri="{html.escape(uri)}"><h3>{html.escape(storage.basename(uri))}</h3>'
            f'<p class="meta">{html.escape(heading)} <span class="where">({html.escape(uri)}; {html.escape(note)})</span></p>'
            f"{player}{timeline_html(duration_s, tracks, colors)}"
            + (f'<div class="thumbs">{strip}</div>' if strip else "") + "</section>")


def _panel_thumbnails(uri: str, starts: list[float], out: str, index: int, limit: int) -> list[tuple[float, float, str]]:
    """Keyframe thumbnails of a panel's first ``limit`` segments, written to ``out/thumbs/``; none if the video cannot be read."""
    if limit <= 0 or not starts:
        return []
    try:
        shots = keyframe_thumbnails(uri, sorted(starts)[:limit])
    except Exception as err:  # noqa: BLE001 - a picture is optional: the page says nothing is there
        log.warning("no thumbnails for %s: %s", uri, err)
        return []
    paths, thumbs = {}, []
    for start, key, jpeg in shots:
        if key not in paths:
            paths[key] = f"thumbs/video-{index}-{len(paths)}.jpg"
            storage.write_bytes(storage.join(out, *paths[key].split("/")), jpeg, durable=False)
        thumbs.append((start, key, paths[key]))
    return thumbs


# The page's only script and style: inline, no network, no library.
_STYLE = """
body{font-family:sans-serif;margin:2em;max-width:75em;color:#222}
table{border-collapse:collapse;margin:1em 0} td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}
img{max-width:100%} .note{color:#a33} nav a{margin-right:1em}
.panels{display:flex;flex-wrap:wrap;gap:0 2em}
section.video{border-top:1px solid #ddd;padding:0.5em 0 1em;width:400px} section.video h3{margin:0.3em 0}
.meta{font-size:90%;margin:0.2em 0} .where{color:#777}
video{width:400px;max-width:100%;max-height:300px;background:#000;display:block}
.timeline{width:400px;max-width:100%;margin-top:4px} .track{display:flex;align-items:center;margin:2px 0}
.track-name{width:0;overflow:hidden;font-size:80%} .timeline.named{width:460px} .timeline.named .track-name{width:60px} .lane{position:relative;flex:1;height:22px;background:#eee}
.seg{position:absolute;top:0;height:100%;border:0;border-right:1px solid #fff;padding:0;margin:0;cursor:pointer;opacity:0.85}
.seg:hover,.seg.active{opacity:1;outline:2px solid #000;z-index:1}
.playhead{position:absolute;top:-2px;bottom:-2px;width:2px;left:0;background:#000;pointer-events:none;z-index:2}
.legend span{display:inline-block;padding:1px 8px;margin:2px;color:#fff;font-size:85%}
#queue-player{width:400px;max-width:100%}
.thumbs{margin-top:4px} .thumb{height:54px;margin-right:3px;cursor:pointer;border:1px solid #ccc}
"""

_SCRIPT = """
(function () {
  "use strict";
  function panelOf(node) { return node.closest("section.video"); }
  document.addEventListener("click", function (event) {
    var seg = event.target.closest(".seg, .thumb");
    if (seg) {
      var panel = panelOf(seg), video = panel && panel.querySelector("video");
      panel.querySelectorAll(".seg.active").forEach(function (s) { s.classList.remove("active"); });
      var lane = panel.querySelector('.seg[data-start="' + seg.dataset.start + '"]');
      if (lane) { lane.classList.add("active"); }
      if (video) { video.currentTime = parseFloat(seg.dataset.start); }
      return;
    }
    var play = event.target.closest(".queue-play");
    if (play) {
      var player = document.getElementById("queue-player");
      player.src = play.dataset.src + "#t=" + play.dataset.start + "," + play.dataset.end;
      document.getElementById("queue-now").textContent = play.dataset.caption;
      var started = player.play();
      if (started && started.catch) { started.catch(function () {}); }
    }
  });
  document.querySelectorAll("section.video video").forEach(function (video) {
    var timeline = panelOf(video).querySelector(".timeline");
    var duration = parseFloat(timeline.dataset.duration);
    video.addEventListener("timeupdate", function () {
      var left = Math.min(100, 100 * video.currentTime / duration) + "%";
      timeline.querySelectorAll(".playhead").forEach(function (p) { p.style.left = left; });
    });
  });
})();
"""


def _html(result: ReportResult, config: ReportConfig, label_frame, histogram, errors: dict, timeline_uris, timeline_clips,
          timeline_videos, lowest, timeline_segments=None, problems=None) -> str:
    """The review page: overview (plots, per-status counts, failed files), a player and a clickable label
    timeline per video (the first ``timeline_videos`` by URI), the review queue playable at each clip's start."""
    import datetime

    colors = _colors(list(label_frame["label"]) if len(label_frame) else [])
    hex_colors = {label: _hex(c) for label, c in colors.items()}
    images = {
        "distribution": _plot_distribution(label_frame, colors),
        "histogram": _plot_histogram(histogram, config.score_bins, config.threshold, colors),
        "timeline": _plot_timeline(timeline_uris, timeline_clips, colors),
    }

    def image(name: str, alt: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="{images[name]}">' if images[name] else "<p>No clips.</p>"

    title = f"rnnimg label report: {result.labels}"
    counts = (
        f"{result.videos} videos ({result.ok} ok, {result.partial} partial, {result.failed} failed), "
        f"{result.clips} clips, {result.low_confidence_clips} below the review threshold {config.threshold:g}"
    )
    errors_line = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
    timeline_table = _timeline_table(timeline_uris, timeline_clips, timeline_videos)
    if timeline_segments is None:
        timeline_segments = merge_clips(timeline_clips)
    status_table = "<table><thead><tr><th>status</th><th>videos</th></tr></thead><tbody>" + "".join(
        f"<tr><td>{s}</td><td>{n}</td></tr>" for s, n in (("ok", result.ok), ("partial", result.partial), ("failed", result.failed))
    ) + "</tbody></table>"
    problem_part = "<p>None: every video was labelled whole.</p>"
    if problems is not None and len(problems):
        more = result.failed + result.partial - len(problems)
        problem_part = _table_html(problems, ["video_uri", "status", "error_type", "error"]) + (
            f"<p>{more} more in <code>videos/</code>.</p>" if more > 0 else "")

    # Per video: a player and its label timeline.
    links_s3 = False
    durations = dict(zip(timeline_videos["video_uri"], timeline_videos["duration_s"])) if len(timeline_videos) else {}
    errors_by_uri = dict(zip(timeline_videos["video_uri"], timeline_videos["error"])) if len(timeline_videos) else {}
    storage.delete(storage.join(result.out, "thumbs"))
    table_by_uri = {row["video_uri"]: row for _, row in timeline_table.iterrows()}
    panels = []
    for index, uri in enumerate(timeline_uris):
        mine = timeline_segments[timeline_segments["video_uri"] == uri] if len(timeline_segments) else timeline_segments
        segments = [{"start_s": float(r.start_s), "end_s": float(r.end_s), "label": r.label,
                     "score": None if r.score is None else float(r.score)} for r in mine.itertuples(index=False)]
        declared = durations.get(uri)
        ends = [g["end_s"] for g in segments]
        duration = float(declared) if declared is not None and declared == declared and declared > 0 else max(ends, default=1.0)
        duration = max(duration, max(ends, default=0.0), 0.001)
        row = table_by_uri.get(uri, {})
        thumbs: list = []
        if row.get("status") == "failed":
            src, note = None, f"labelling failed: {errors_by_uri.get(uri) or 'no reason recorded'}"
        else:
            src, note = video_src(uri, result.out, config.link_expires_s)
            links_s3 = links_s3 or storage.is_s3(uri)
            thumbs = _panel_thumbnails(uri, [g["start_s"] for g in segments], result.out, index, config.thumbnails)
        known = declared is not None and declared == declared
        heading = f"{row.get('status') or 'no videos row'}, {f'{float(declared):.1f} s' if known else 'duration unknown'}, {row.get('clips', 0)} clips"
        if isinstance(row.get("dominant_label"), str):
            heading += f", mostly {row['dominant_label']} ({row['dominant_share']:.0%}), mean score {row['mean_score']:.3f}"
        panels.append(video_panel(uri, src, note, heading, duration, [("label", segments)], hex_colors, index, thumbs))
    legend = '<p class="legend">' + "".join(
        f'<span style="background:{c}">{html.escape(l)}</span>' for l, c in hex_colors.items()) + "</p>"
    lifetime = ""
    if links_s3:
        until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=config.link_expires_s)
        lifetime = (f"<p>Videos in S3 play through presigned URLs valid {config.link_expires_s / 3600:g} h, until "
                    f"{until:%Y-%m-%d %H:%M} UTC; build the report again for fresh links.</p>")

    # The review queue: each clip playable from its start (a media fragment #t=start,end).
    queue = lowest.copy()
    plays = []
    for row in queue.itertuples(index=False):
        src, note = video_src(row.video_uri, result.out, config.link_expires_s)
        caption = f"{row.video_uri} clip {row.clip_index}: {row.label} ({float(row.score):.3f}), {float(row.start_s):.2f} to {float(row.end_s):.2f} s"
        plays.append(f'<button type="button" class="queue-play" data-src="{html.escape(src)}" data-start="{float(row.start_s):.3f}" '
                     f'data-end="{float(row.end_s):.3f}" data-caption="{html.escape(caption)}">play</button>' if src else html.escape(note))
    queue_table = _table_html(queue, ["video_uri", "clip_index", "start_s", "end_s", "label", "score"],
                              {"start_s": "{:.2f}", "end_s": "{:.2f}", "score": "{:.3f}"}, ("play", plays)) if len(queue) else "<p>None.</p>"

    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        '<nav><a href="#overview">Overview</a><a href="#videos">Videos</a><a href="#review">Review queue</a></nav>',
        f'<h2 id="overview">Overview</h2><p>{html.escape(counts)}.</p>',
        f"<p>Model {html.escape(str(result.model_id))}; runs read: {html.escape(', '.join(result.runs) or 'not recorded')}. Errors by type: {html.escape(errors_line)}.</p>",
        status_table,
        "<h3>Failed and partial videos</h3>",
        problem_part,
        "<h2>Labels</h2>",
        image("distribution", "clips per label"),
        _table_html(label_frame, ["label", "clips", "share", "videos", "duration_s", "mean_score", "low_confidence_clips"],
                    {"share": "{:.3f}", "duration_s": "{:.1f}", "mean_score": "{:.3f}"}),
        "<h2>Scores</h2>",
        image("histogram", "score histogram"),
        "<h2>Timeline</h2>",
        image("timeline", "label timeline per video"),
        _table_html(timeline_table, ["video_uri", "status", "clips", "dominant_label", "dominant_share", "mean_score"],
                    {"dominant_share": "{:.2f}", "mean_score": "{:.3f}"}) if len(timeline_table) else "",
        f'<h2 id="videos">Videos: the first {len(timeline_uris)} by URI</h2>',
        "<p>Click a segment of a timeline to seek its player to the segment's start.</p>" if panels else "<p>No videos.</p>",
        legend if panels else "",
        lifetime,
        '<div class="panels">' + "".join(panels) + "</div>" if panels else "",
        f'<a id="review"></a><h2>Review queue: {result.low_confidence_clips} clips below {config.threshold:g}</h2>',
        f"<p>The full queue is in <code>review/</code>; the {min(len(lowest), config.review_examples)} lowest scores, each playable from its start:</p>",
        '<video id="queue-player" controls preload="none"></video><p id="queue-now" class="meta"></p>' if len(queue) else "",
        queue_table,
        f"<p><small>Generated in {result.seconds:.1f} s. Tables: labels.parquet, videos/, review/, summary.json.</small></p>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- masks (task segment)


def _masks_report(source: LabelSource, out: str, config: ReportConfig, started: float) -> MasksReportResult:
    """The masks report (task ``segment``): area per video, area histogram, area timelines, overlays.

    The masks table is read twice: once without its RLE column for every aggregate, once with it
    for the few overlay videos only (a filter on ``video_uri``).
    """
    import dask

    from rnnimg import tables

    labels = source.location
    log.info("masks report over %d runs, %d mask files, %d video files of %s", len(source.runs), len(source.masks), len(source.videos), labels)
    masks = _read(source.masks, ["video_uri", "clip_index", "frame_time_s", "area_fraction", "run_id"], tables.MASKS)
    videos = _read(source.videos, ["video_uri", "status", "duration_s", "clips", "error_type", "run_id"], tables.VIDEOS)
    superseded = _superseded(videos, source.runs)
    if superseded:
        log.info("%d (video, run) rows are older masks of relabelled videos; keeping each video's latest", len(superseded))
        masks = masks.map_partitions(_drop_rows, superseded, meta=masks._meta)
        videos = videos.map_partitions(_drop_rows, superseded, meta=videos._meta)

    bins = config.area_bins
    masks = masks.assign(area=masks["area_fraction"].astype("float64"), with_mask=(masks["area_fraction"] > 0).astype("int64"))
    # One row per video with masks, then joined to the videos table (videos without masks keep their row).
    # A plain {column: aggregation} keeps one column level: dask 2026.8 cannot merge a named
    # aggregation's result after split_out (KeyError 'video_uri' while planning the join).
    per_video_masks = masks.assign(frames=1, area_max=masks["area"]).groupby("video_uri").agg(
        {"frames": "sum", "area": "sum", "area_max": "max", "with_mask": "sum"}, split_out=True
    ).reset_index()
    per_video = videos.merge(per_video_masks, on="video_uri", how="left")
    per_video = per_video.map_partitions(_finish_mask_videos, meta=_finish_mask_videos(per_video._meta))
    histogram = masks.assign(bin=(masks["area"] * bins).astype("int64").clip(0, bins - 1)).groupby("bin").size()
    totals = masks[["area", "with_mask"]].sum()
    statuses = videos["status"].value_counts()
    errors = videos["error_type"].dropna().value_counts()
    first_videos = videos["video_uri"].map_partitions(_first_uris, config.timeline_videos, meta=("video_uri", "object"))
    first_masked = masks["video_uri"].map_partitions(_first_uris, config.overlay_videos, meta=("video_uri", "object"))

    videos_out = storage.join(out, "videos")
    storage.delete(videos_out)
    histogram_s, totals_s, statuses_s, errors_s, first_s, masked_s, video_rows = dask.compute(
        histogram, totals, statuses, errors, first_videos, first_masked, _write_partitions(per_video, videos_out, MASK_VIDEOS_SUMMARY),
    )
    if video_rows == 0:  # keep the folder readable, with its schema
        storage.write_table(MASK_VIDEOS_SUMMARY.empty_table(), storage.join(videos_out, "part-00000.parquet"))
    frames = int(histogram_s.sum()) if len(histogram_s) else 0
    areas = _areas_table(histogram_s, bins, frames)
    storage.write_table(areas, storage.join(out, AREAS_TABLE))

    # The timeline: the first videos by URI; only their (time, area) rows are collected.
    timeline_uris = sorted(first_s.tolist())[: config.timeline_videos]
    timeline_masks, timeline_videos = dask.compute(
        masks[masks["video_uri"].isin(timeline_uris)][["video_uri", "clip_index", "frame_time_s", "area"]],
        videos[videos["video_uri"].isin(timeline_uris)],
    )
    # The overlays: the first videos with masks; their RLEs are read, a few frames decoded.
    overlay_uris = sorted(masked_s.tolist())[: config.overlay_videos]
    overlay_rows = _read(source.masks, ["video_uri", "clip_index", "frame_time_s", "height", "width", "rle", "area_fraction", "run_id"],
                         tables.MASKS, filters=[("video_uri", "in", overlay_uris)] if overlay_uris else None)
    if superseded:
        overlay_rows = overlay_rows.map_partitions(_drop_rows, superseded, meta=overlay_rows._meta)
    overlay_rows = overlay_rows[overlay_rows["video_uri"].isin(overlay_uris)].compute() if overlay_uris else overlay_rows._meta
    overlays, notes = {}, {}
    for uri in overlay_uris:
        picked = pick_overlay_rows(overlay_rows[overlay_rows["video_uri"] == uri], config.overlay_frames)
        try:
            overlays[uri] = overlay_frames(uri, picked)
        except (VideoError, ValueError) as err:
            notes[uri] = str(err)
            log.warning("no overlay for %s: %s", uri, err)

    counts = {s: int(statuses_s.get(s, 0)) for s in tables.VIDEO_STATUSES}
    error_types = {str(k): int(v) for k, v in errors_s.items()}
    result = MasksReportResult(
        out=out,
        html=storage.join(out, "index.html"),
        labels=labels,
        model_id=source.model_id,
        runs=source.runs,
        videos=int(video_rows),
        ok=counts["ok"],
        partial=counts["partial"],
        failed=counts["failed"],
        frames=frames,
        frames_with_mask=int(totals_s.get("with_mask", 0)) if frames else 0,
        mean_area_fraction=float(totals_s["area"]) / frames if frames else None,
        overlays=list(overlays),
        overlay_notes=notes,
        seconds=round(time.perf_counter() - started, 3),
    )
    page = _masks_html(result, config, areas.to_pandas(), error_types, timeline_uris,
                       timeline_masks, timeline_videos, overlays)
    storage.write_bytes(result.html, page.encode("utf-8"))
    storage.write_json(storage.join(out, "summary.json"), {**result.summary(), "error_types": error_types, "config": asdict(config)})
    return result


def _finish_mask_videos(frame):
    """Partition function: the per-video masks table's final columns (videos without masks get zeros)."""
    import pandas as pd

    frames = frame["frames"].fillna(0).astype("int64")
    with_frames = frames > 0
    out = pd.DataFrame(
        {
            "video_uri": frame["video_uri"].astype(object),
            "status": frame["status"].astype(object),
            "duration_s": frame["duration_s"].astype("float64"),
            "clips": frame["clips"].fillna(0).astype("int64"),
            "frames": frames,
            "frames_with_mask": frame["with_mask"].fillna(0).astype("int64"),
            "mean_area_fraction": (frame["area"] / frames).where(with_frames, None).astype("float64"),
            "max_area_fraction": frame["area_max"].where(with_frames, None).astype("float64"),
            "error_type": frame["error_type"].astype(object),
            "run_id": frame["run_id"].astype(object),
        }
    )
    return out.reset_index(drop=True)


def _areas_table(histogram, bins: int, frames: int) -> pa.Table:
    rows = []
    for b in range(bins):
        n = int(histogram.get(b, 0)) if len(histogram) else 0
        rows.append({"bin_start": b / bins, "bin_end": (b + 1) / bins, "frames": n, "share": n / frames if frames else 0.0})
    return pa.Table.from_pylist(rows, schema=AREAS_SUMMARY)


def pick_overlay_rows(rows, count: int):
    """``count`` mask rows of one video spread evenly over its distinct sampled times, in time order.

    Rows at a time already picked (overlapping clips sample the same time) are left out.

    Args:
        rows: a pandas frame of one video's masks rows (``frame_time_s`` and the rest).
    """
    import numpy as np

    distinct = rows.sort_values(["frame_time_s", "clip_index"]).drop_duplicates("frame_time_s")
    if len(distinct) <= count:
        return distinct.reset_index(drop=True)
    index = np.unique(np.round(np.linspace(0, len(distinct) - 1, count)).astype(int))
    return distinct.iloc[index].reset_index(drop=True)


def overlay_frames(video_uri: str, rows) -> list[tuple[float, "np.ndarray", "np.ndarray", float]]:
    """The frames of ``video_uri`` at the rows' sampled times, with their decoded masks.

    Each frame is decoded at its mask's resolution (the model's frame size), as the label job
    decoded it, so the mask lies on the pixels the model saw.

    Args:
        rows: masks rows of this video (``frame_time_s``, ``height``, ``width``, ``rle``,
            ``area_fraction``), in time order, one size.

    Returns:
        ``(frame_time_s, uint8 (H, W, 3) frame, bool (H, W) mask, area_fraction)`` per row.

    Raises:
        VideoError: the video cannot be opened or decoded at those times.
        ValueError: a row's RLE does not decode to its height x width, or the rows have several sizes.
    """
    from rnnimg import rle
    from rnnimg.video.clips import Clip

    if rows.empty:
        return []
    sizes = set(zip(rows["height"].astype(int), rows["width"].astype(int)))
    if len(sizes) != 1:
        raise ValueError(f"{video_uri}: masks of several sizes {sorted(sizes)}; expected one (the model's frame size)")
    height, width = sizes.pop()
    times = tuple(float(t) for t in rows["frame_time_s"])
    masks = [rle.decode({"size": [height, width], "counts": json.loads(r)}) for r in rows["rle"]]
    frames = None
    with VideoReader(video_uri, (height, width)) as reader:
        for _, frames in reader.clips([Clip(0, times[0], times[-1], times)]):
            pass
    if frames is None:
        raise VideoError("decode", f"{video_uri}: no frames at {', '.join(f'{t:.2f}' for t in times)} s")
    return [(t, frame, mask, float(a)) for t, frame, mask, a in zip(times, frames, masks, rows["area_fraction"])]


def _plot_area_histogram(areas) -> str | None:
    from matplotlib.figure import Figure

    if areas.empty or int(areas["frames"].sum()) == 0:
        return None
    figure = Figure(figsize=(7, 3))
    axes = figure.subplots()
    axes.bar(areas["bin_start"], areas["frames"], width=areas["bin_end"] - areas["bin_start"], align="edge", color="tab:red")
    axes.set_xlim(0, 1)
    axes.set_xlabel("area fraction (share of the frame inside the mask)")
    axes.set_ylabel("sampled frames")
    axes.set_title("Mask area histogram")
    return _png(figure)


def _plot_area_timeline(uris: list[str], masks, videos) -> str | None:
    """One band per video: area fraction against the sampled frame's time, every band on one scale."""
    from matplotlib.figure import Figure

    if not uris:
        return None
    status = dict(zip(videos["video_uri"], videos["status"])) if len(videos) else {}
    top = max(0.01, float(masks["area"].max())) if len(masks) else 1.0
    figure = Figure(figsize=(9, 0.8 + 0.45 * len(uris)))
    axes = figure.subplots()
    for row, uri in enumerate(uris):
        mine = masks[masks["video_uri"] == uri].sort_values(["frame_time_s", "clip_index"]) if len(masks) else masks
        base = len(uris) - 1 - row  # the first video on top
        axes.axhline(base, color="#ccc", linewidth=0.5)
        if len(mine):
            heights = base + 0.85 * mine["area"].to_numpy() / top
            axes.fill_between(mine["frame_time_s"], base, heights, color="tab:red", alpha=0.3, linewidth=0)
            axes.plot(mine["frame_time_s"], heights, color="tab:red", linewidth=1, marker=".", markersize=3)
        else:
            axes.text(0.0, base + 0.3, f"no masks ({status.get(uri, 'no videos row')})", fontsize="small", color="#666")
    axes.set_yticks([b + 0.4 for b in range(len(uris))], [storage.basename(u) for u in reversed(uris)], fontsize="small")
    axes.set_ylim(-0.2, len(uris))
    axes.set_xlabel("seconds (sampled frame's presentation time)")
    axes.set_title(f"Mask area fraction over time, first {len(uris)} videos by URI (band height 0 to {top:.3f})")
    return _png(figure)


def _overlay_strip(frames: list, scale: int = 4, gap: int = 4) -> str:
    """One PNG of a video's sampled frames side by side, each with its mask drawn over it (red tint,
    yellow outline), enlarged ``scale`` times pixel for pixel (nearest), so that each mask pixel is visible."""
    import matplotlib.image
    import numpy as np

    from rnnimg.tasks.segment_report import outline, tint

    height, width = frames[0][1].shape[:2]
    strip = np.full((height * scale, len(frames) * (width * scale + gap) - gap, 3), 255, np.uint8)
    for k, (_, frame, mask, _) in enumerate(frames):
        big = np.repeat(np.repeat(tint(frame, mask), scale, axis=0), scale, axis=1)  # (H, W, 3) -> (H*s, W*s, 3)
        big[outline(np.repeat(np.repeat(mask, scale, axis=0), scale, axis=1))] = (255, 230, 0)
        left = k * (width * scale + gap)
        strip[:, left : left + width * scale] = big
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, strip, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _masks_timeline_table(uris: list[str], masks, videos):
    """The timeline's videos as rows (pandas; only these few videos): status, frames, mean and max area."""
    import pandas as pd

    status = dict(zip(videos["video_uri"], videos["status"])) if len(videos) else {}
    rows = []
    for uri in uris:
        mine = masks[masks["video_uri"] == uri] if len(masks) else masks
        rows.append(
            {
                "video_uri": uri,
                "status": status.get(uri, ""),
                "frames": len(mine),
                "frames_with_mask": int((mine["area"] > 0).sum()) if len(mine) else 0,
                "mean_area_fraction": float(mine["area"].mean()) if len(mine) else None,
                "max_area_fraction": float(mine["area"].max()) if len(mine) else None,
            }
        )
    return pd.DataFrame(rows)


def _masks_html(result: MasksReportResult, config: ReportConfig, areas, errors: dict, timeline_uris, timeline_masks, timeline_videos,
                overlays: dict) -> str:
    histogram = _plot_area_histogram(areas)
    timeline = _plot_area_timeline(timeline_uris, timeline_masks, timeline_videos)

    def image(src: str | None, alt: str, empty: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="{src}">' if src else f"<p>{html.escape(empty)}</p>"

    title = f"rnnimg mask report: {result.labels}"
    mean = "n/a" if result.mean_area_fraction is None else f"{result.mean_area_fraction:.3f}"
    counts = (
        f"{result.videos} videos ({result.ok} ok, {result.partial} partial, {result.failed} failed), "
        f"{result.frames} sampled frames, {result.frames_with_mask} with a non-empty mask, mean area fraction {mean}"
    )
    errors_line = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
    timeline_table = _masks_timeline_table(timeline_uris, timeline_masks, timeline_videos)
    overlay_parts = []
    for uri in sorted({*overlays, *result.overlay_notes}):
        if uri in overlays and overlays[uri]:
            frames = overlays[uri]
            height, width = frames[0][2].shape
            caption = "; ".join(f"{t:.2f} s, area {a:.3f}" for t, _, _, a in frames)
            overlay_parts.append(f"<figure>{image(_overlay_strip(frames), f'mask overlay of {uri}', '')}<figcaption>"
                                 f"{html.escape(uri)}: mask (red) over the frame, {width}x{height}, at {html.escape(caption)}"
                                 "</figcaption></figure>")
        elif uri in overlays:
            overlay_parts.append(f"<p>{html.escape(uri)}: no mask rows to draw.</p>")
        else:
            overlay_parts.append(f'<p class="note">{html.escape(uri)}: overlay not drawn: {html.escape(result.overlay_notes[uri])}</p>')
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%} img{max-width:100%} .note{color:#a33}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(counts)}.</p>",
        f"<p>Task segment; model {html.escape(str(result.model_id))}; runs read: {html.escape(', '.join(result.runs) or 'not recorded')}. "
        f"Errors by type: {html.escape(errors_line)}.</p>",
        "<h2>Mask area</h2>",
        image(histogram, "mask area histogram", "No masks."),
        "<h2>Timeline</h2>",
        image(timeline, "mask area timeline per video", "No videos."),
        _table_html(timeline_table, ["video_uri", "status", "frames", "frames_with_mask", "mean_area_fraction", "max_area_fraction"],
                    {"mean_area_fraction": "{:.3f}", "max_area_fraction": "{:.3f}"}) if len(timeline_table) else "",
        f"<h2>Overlays: the first {config.overlay_videos} videos with masks</h2>",
        *(overlay_parts or ["<p>No masks to draw.</p>"]),
        f"<p><small>Generated in {result.seconds:.1f} s. Tables: areas.parquet, videos/, summary.json.</small></p>",
        "</body></html>",
    ]
    return "\n".join(parts)


# A task -> the report of its label tables. A task whose tables no report reads is refused by name.
_REPORTS = {"classify": _clips_report, "segment": _masks_report}
