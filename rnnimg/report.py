"""Summaries of label tables with Dask: per label (mask area, class, surprise), per video, and a review page.

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

Outputs of an objects run (task ``objects``: the objects table, one row per detection, and the tracks table)::

    REPORT/classes.parquet       one row per class: detections, share, tracks, seconds_seen, mean_score
    REPORT/videos/part-*.parquet one row per video: status, detections, classes seen, the class seen longest, ...
    REPORT/summary.json          the task, counts, the overlays drawn and the notes of those that could not be
    REPORT/index.html            the review page: overview (as above), detections per class, score histogram, the
                                 classes seen over time; per video of the first ``timeline_videos`` a player over one
                                 timeline lane per class (segments: runs of sampled frames with the class detected,
                                 click one to seek), and for the first ``overlay_videos`` of them the detections' boxes
                                 drawn over frames decoded at their sampled times

Outputs of a next-frame run (task ``predict``: the clips table with a ``surprise`` column)::

    REPORT/ranking.parquet       the ``surprising_clips`` most surprising clips, rank 1 first
    REPORT/videos/part-*.parquet one row per video: status, clips, mean and max surprise, ...
    REPORT/thumbs/rank-*.jpg     the frame shown at each ranked clip's start, decoded
    REPORT/summary.json          the task, counts, mean and extreme surprise
    REPORT/index.html            the review page: overview, surprise histogram and timelines, the ranking (each
                                 clip's start frame; a click plays the clip from its start), per video a player over
                                 its clips coloured by surprise (click one to seek)

The classify, objects and predict pages share one design (``_page``): the overview (``_overview_html``),
players with clickable timeline tracks (``video_panel``), one queue player for listed clips (``_play_button``).
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


CLASSES_TABLE = "classes.parquet"  # REPORT/classes.parquet (objects): one row per class, in the CLASSES_SUMMARY schema
RANKING_TABLE = "ranking.parquet"  # REPORT/ranking.parquet (predict): the most surprising clips, in the RANKING schema

CLASSES_SUMMARY = pa.schema(
    [
        pa.field("label", pa.string(), nullable=False),  # the class
        pa.field("detections", pa.int64(), nullable=False),  # rows of the objects table (sampled frames with the class detected)
        pa.field("share", pa.float64(), nullable=False),  # detections / all detections
        pa.field("tracks", pa.int64(), nullable=False),  # rows of the tracks table: videos the class is seen in
        pa.field("seconds_seen", pa.float64(), nullable=False),  # the tracks' seconds seen, summed
        pa.field("mean_score", pa.float64()),  # mean presence probability of the detections; null with none
    ]
)

OBJECT_VIDEOS_SUMMARY = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | partial | failed (from the videos table)
        pa.field("duration_s", pa.float64()),  # declared duration; null if the video could not be opened
        pa.field("clips", pa.int64(), nullable=False),  # clips labelled (from the videos table)
        pa.field("detections", pa.int64(), nullable=False),  # rows of the objects table
        pa.field("classes", pa.int64(), nullable=False),  # classes seen (rows of the tracks table)
        pa.field("top_class", pa.string()),  # the class seen longest (ties: first by name); null with none
        pa.field("top_class_seconds", pa.float64()),  # its seconds seen
        pa.field("mean_score", pa.float64()),  # mean score of the detections; null with none
        pa.field("error_type", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),  # the run whose labels these are
    ]
)

SURPRISE_VIDEOS_SUMMARY = pa.schema(
    [
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),  # ok | partial | failed (from the videos table)
        pa.field("duration_s", pa.float64()),  # declared duration; null if the video could not be opened
        pa.field("clips", pa.int64(), nullable=False),  # clips with a surprise score
        pa.field("mean_surprise", pa.float64()),  # mean over those clips; null with none
        pa.field("max_surprise", pa.float64()),  # the largest; null with none
        pa.field("error_type", pa.string()),
        pa.field("run_id", pa.string(), nullable=False),  # the run whose labels these are
    ]
)

RANKING = pa.schema(
    [
        pa.field("rank", pa.int64(), nullable=False),  # 1: the most surprising clip
        pa.field("video_uri", pa.string(), nullable=False),
        pa.field("clip_index", pa.int32(), nullable=False),
        pa.field("start_s", pa.float64(), nullable=False),
        pa.field("end_s", pa.float64(), nullable=False),
        pa.field("surprise", pa.float64(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
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
    # Masks (task segment) and boxes (task objects):
    overlay_videos: int = 4  # videos drawn with their masks or boxes over their frames (the first by URI with any)
    overlay_frames: int = 4  # sampled frames drawn per overlay video, spread over the video
    area_bins: int = 20  # bins of the mask-area histogram over [0, 1]
    # The review page (classify, objects, predict): players of the first ``timeline_videos`` videos, the failed files.
    link_expires_s: int = 24 * 3600  # lifetime of the presigned URLs of s3:// videos (at most 7 days, SigV4's limit)
    problem_videos: int = 100  # failed or partial videos listed with their reasons
    thumbnails: int = 12  # keyframe thumbnails per video panel (its first segments); 0: none
    surprising_clips: int = 25  # task predict: the most surprising clips ranked on the page, each with a thumbnail

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
        if not isinstance(self.surprising_clips, int) or self.surprising_clips < 0:
            raise ValueError(f"surprising_clips must be an integer >= 0, got {self.surprising_clips!r}")
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
    objects: list[str] = field(default_factory=list)  # Parquet files of the objects tables (task objects)
    tracks: list[str] = field(default_factory=list)  # Parquet files of the tracks tables (task objects)


@dataclass(frozen=True)
class _Result:
    """What every report's result holds first: where it is, what it read, its videos by status, its time.

    Each task's result adds its counts, a ``headline`` and the small table the label-report flow publishes.
    """

    out: str  # the report folder
    html: str  # its HTML page
    labels: str  # what was read
    model_id: str | None
    runs: list[str]
    videos: int  # videos in the report (current rows)
    ok: int
    partial: int
    failed: int
    seconds: float  # the time it took to build

    def summary(self) -> dict:
        return asdict(self)

    def headline(self) -> list[str]:
        """The report in a few markdown lines (the label-report flow's summary artifact)."""
        return [f"task `{self.task}`, model `{self.model_id}`, runs {', '.join(self.runs) or 'not recorded'}",
                *self._counts(), f"report `{self.html}`, built in {self.seconds:.1f} s"]

    def _counts(self) -> list[str]:
        """The task's lines of the headline, between the model and the report's place."""
        return [f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed"]


@dataclass(frozen=True)
class ReportResult(_Result):
    clips: int
    low_confidence_clips: int  # rows of the review queue
    threshold: float
    label_clips: dict[str, int]  # clips per label
    task: str = "classify"

    # The small per-label table that the label-report flow publishes, and how.
    TABLE: ClassVar[str] = LABELS_TABLE
    TABLE_KEY: ClassVar[str] = "labels"
    TABLE_COLUMNS: ClassVar[list[str]] = ["label", "clips", "share", "videos", "duration_s", "mean_score", "low_confidence_clips"]
    TABLE_FORMATS: ClassVar[dict[str, str]] = {"share": "{:.3f}", "duration_s": "{:.1f}", "mean_score": "{:.3f}"}
    TABLE_DESCRIPTION: ClassVar[str] = "Clips, videos and duration per label"
    PAGE_DESCRIPTION: ClassVar[str] = "Review page: label distribution, score histogram, players with clickable label timelines, review queue"

    def _counts(self) -> list[str]:
        return [
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed; {self.clips} clips",
            f"review queue: {self.low_confidence_clips} clips with score below {self.threshold:g} (`{storage.join(self.out, 'review')}`)",
        ]


@dataclass(frozen=True)
class MasksReportResult(_Result):
    """The counts of a masks (task ``segment``) report, written to ``summary.json``."""

    frames: int  # sampled frames with a mask row
    frames_with_mask: int  # of those, frames whose mask is not empty
    mean_area_fraction: float | None  # over all frames; None with no frames
    overlays: list[str]  # videos drawn with their masks over their frames
    overlay_notes: dict[str, str]  # video -> why its overlay could not be drawn
    task: str = "segment"

    TABLE: ClassVar[str] = AREAS_TABLE
    TABLE_KEY: ClassVar[str] = "areas"
    TABLE_COLUMNS: ClassVar[list[str]] = ["bin_start", "bin_end", "frames", "share"]
    TABLE_FORMATS: ClassVar[dict[str, str]] = {"bin_start": "{:.2f}", "bin_end": "{:.2f}", "share": "{:.3f}"}
    TABLE_DESCRIPTION: ClassVar[str] = "Sampled frames per mask-area fraction"
    PAGE_DESCRIPTION: ClassVar[str] = "Static HTML report: mask-area histogram, area timelines, masks drawn over frames"

    def _counts(self) -> list[str]:
        mean = "n/a" if self.mean_area_fraction is None else f"{self.mean_area_fraction:.3f}"
        return [
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed; {self.frames} sampled frames, "
            f"{self.frames_with_mask} with a mask; mean area fraction {mean}",
            f"overlays of {len(self.overlays)} videos" + (f", {len(self.overlay_notes)} could not be drawn" if self.overlay_notes else ""),
        ]


@dataclass(frozen=True)
class ObjectsReportResult(_Result):
    """The counts of an objects (task ``objects``) report, written to ``summary.json``."""

    detections: int  # rows of the objects tables
    tracks: int  # rows of the tracks tables (one per video and class seen)
    class_detections: dict[str, int]  # detections per class
    overlays: list[str]  # videos drawn with their boxes over their frames
    overlay_notes: dict[str, str]  # video -> why its boxes could not be drawn
    task: str = "objects"

    TABLE: ClassVar[str] = CLASSES_TABLE
    TABLE_KEY: ClassVar[str] = "classes"
    TABLE_COLUMNS: ClassVar[list[str]] = ["label", "detections", "share", "tracks", "seconds_seen", "mean_score"]
    TABLE_FORMATS: ClassVar[dict[str, str]] = {"share": "{:.3f}", "seconds_seen": "{:.1f}", "mean_score": "{:.3f}"}
    TABLE_DESCRIPTION: ClassVar[str] = "Detections, tracks and seconds seen per class"
    PAGE_DESCRIPTION: ClassVar[str] = "Review page: detections per class, score histogram, per-class timelines with players, boxes over frames"

    def _counts(self) -> list[str]:
        return [
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed; {self.detections} detections, "
            f"{self.tracks} tracks of {len(self.class_detections)} classes",
            f"box overlays of {len(self.overlays)} videos" + (f", {len(self.overlay_notes)} could not be drawn" if self.overlay_notes else ""),
        ]


@dataclass(frozen=True)
class SurpriseReportResult(_Result):
    """The counts of a surprise (task ``predict``) report, written to ``summary.json``."""

    clips: int  # clips with a surprise score
    mean_surprise: float | None  # over those clips; None with none
    min_surprise: float | None
    max_surprise: float | None
    ranked: int  # rows of ranking.parquet
    thumbnail_notes: dict[str, str]  # video -> why its ranked clips have no thumbnail
    task: str = "predict"

    TABLE: ClassVar[str] = RANKING_TABLE
    TABLE_KEY: ClassVar[str] = "ranking"
    TABLE_COLUMNS: ClassVar[list[str]] = ["rank", "video_uri", "clip_index", "start_s", "end_s", "surprise"]
    TABLE_FORMATS: ClassVar[dict[str, str]] = {"start_s": "{:.2f}", "end_s": "{:.2f}", "surprise": "{:.3f}"}
    TABLE_DESCRIPTION: ClassVar[str] = "The most surprising clips"
    PAGE_DESCRIPTION: ClassVar[str] = "Review page: surprise histogram, the most surprising clips playable from their start, surprise timelines"

    def _counts(self) -> list[str]:
        mean = "n/a" if self.mean_surprise is None else f"{self.mean_surprise:.3f}"
        top = "n/a" if self.max_surprise is None else f"{self.max_surprise:.3f}"
        return [
            f"{self.videos} videos: {self.ok} ok, {self.partial} partial, {self.failed} failed; {self.clips} clips scored, "
            f"mean surprise {mean}, largest {top}",
            f"the {self.ranked} most surprising clips in `{storage.join(self.out, RANKING_TABLE)}`",
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
    found_tables = {name: [f for d in source.run_dirs for f in _parquet_files(storage.join(d, name))]
                    for name in ("masks", "objects", "tracks")}
    if not videos:
        raise ReportError(f"no videos table under {labels} (looked in {', '.join(storage.join(d, 'videos') for d in source.run_dirs)})")
    found = {d: _run_task(d) for d in source.run_dirs}
    if len(set(found.values())) > 1:
        raise ReportError(f"the runs under {labels} are of different tasks ({', '.join(f'{d}: {t}' for d, t in found.items())}); "
                          "report one model at a time (--model-id)")
    task = next(iter(found.values()), checkpoint.DEFAULT_TASK)
    return LabelSource(source.location, source.kind, source.runs, source.run_dirs, clips, videos, source.model_id, task, **found_tables)


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


def _current(frame, superseded: set[tuple[str, str]]):
    """A Dask frame without the rows of ``superseded`` (video, run) pairs: each video's latest labels."""
    return frame.map_partitions(_drop_rows, superseded, meta=frame._meta) if superseded else frame


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
                 model_id: str | None = None) -> "ReportResult | MasksReportResult | ObjectsReportResult | SurpriseReportResult":
    """Summarise the label tables under ``labels`` into ``out`` (tables, summary.json, index.html).

    The report is the one of the runs' task (``_REPORTS``): per label for a classifier's clips,
    per mask area for a segmenter's masks, per class for an objects model's detections and tracks,
    the most surprising clips for a next-frame model.

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


def _result_fields(source: LabelSource, out: str, video_rows: int, statuses, started: float) -> dict:
    """The fields every report's result starts with: where it is, what it read, its videos by status, its time."""
    from rnnimg import tables

    counts = {s: int(statuses.get(s, 0)) for s in tables.VIDEO_STATUSES}
    return {"out": out, "html": storage.join(out, "index.html"), "labels": source.location, "model_id": source.model_id,
            "runs": source.runs, "videos": int(video_rows), "ok": counts["ok"], "partial": counts["partial"], "failed": counts["failed"],
            "seconds": round(time.perf_counter() - started, 3)}


def _keep_readable(videos_out: str, video_rows: int, schema: pa.Schema) -> None:
    """An empty per-video folder gets an empty part with its schema, so that it still opens as a table."""
    if video_rows == 0:
        storage.write_table(schema.empty_table(), storage.join(videos_out, "part-00000.parquet"))


def _write_page(result, page: str, error_types: dict, config: "ReportConfig") -> None:
    """``index.html`` and ``summary.json`` (the result, the error types, the config) of a report."""
    storage.write_bytes(result.html, page.encode("utf-8"))
    storage.write_json(storage.join(result.out, "summary.json"), {**result.summary(), "error_types": error_types, "config": asdict(config)})


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
    timeline_clips, timeline_videos, timeline_segments, problem_rows = dask.compute(
        clips[clips["video_uri"].isin(timeline_uris)][["video_uri", "start_s", "end_s", "label", "score"]],
        videos[videos["video_uri"].isin(timeline_uris)],
        segments if segments is not None else clips._meta[["video_uri"]],
        _problem_rows(videos, config.problem_videos),
    )
    if segments is None:
        timeline_segments = merge_clips(timeline_clips)
    else:
        timeline_segments = timeline_segments.rename(columns={"mean_score": "score"})
    problem_rows = _first_problems(problem_rows, config.problem_videos)

    error_types = {str(k): int(v) for k, v in errors_s.items()}
    result = ReportResult(
        **_result_fields(source, out, video_rows, statuses_s, started),
        clips=total_clips,
        low_confidence_clips=int(review_rows),
        threshold=threshold,
        label_clips=dict(zip(label_table.column("label").to_pylist(), label_table.column("clips").to_pylist())),
    )
    page = _html(result, config, label_table.to_pandas(), histogram_s, error_types, timeline_uris, timeline_clips,
                 timeline_videos, lowest.head(config.review_examples), timeline_segments, problem_rows)
    _write_page(result, page, error_types, config)
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


def _plot_distribution(label_frame, colors, value: str = "clips", title: str = "Label distribution") -> str | None:
    from matplotlib.figure import Figure

    if label_frame.empty:
        return None
    figure = Figure(figsize=(6, 0.5 + 0.4 * len(label_frame)))
    axes = figure.subplots()
    axes.barh(label_frame["label"], label_frame[value], color=[colors[l] for l in label_frame["label"]])
    axes.invert_yaxis()
    axes.set_xlabel(value)
    axes.set_title(title)
    return _png(figure)


def _plot_histogram(histogram, bins: int, threshold: float | None, colors, threshold_label: str = "review threshold",
                    xlabel: str = "score (softmax probability of the predicted label)", ylabel: str = "clips") -> str | None:
    """Stacked per label: counts per score bin over [0, 1] (``histogram``: a (label, bin) -> count series), a line at ``threshold``."""
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
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", linewidth=1, label=f"{threshold_label} {threshold:g}")
    axes.set_xlim(0, 1)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
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

    Each segment is ``{"start_s", "end_s", "label", "score"}`` (score may be None; optional
    ``color`` and ``title`` replace the label's colour and the hover text); overlapping segments
    are drawn up to the next one's start, so each instant has one colour. Clicking a segment
    seeks the panel's player to its ``start_s`` (the page's script). Each task draws its own
    tracks: labels (classify), one per class (objects), surprise per clip (predict).
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
            title = seg.get("title") or f"{seg['label']}: {_fmt_s(seg['start_s'])} to {_fmt_s(seg['end_s'])}{score_text}"
            buttons.append(
                f'<button type="button" class="seg" data-start="{start:.3f}" data-end="{float(seg["end_s"]):.3f}" '
                f'data-label="{html.escape(str(seg["label"]))}" title="{html.escape(title)}" '
                f'style="left:{left:.3f}%;width:{min(width, 100.0 - left):.3f}%;background:{seg.get("color") or colors.get(seg["label"], "#999")}">'
                f"</button>"
            )
        rows.append(f'<div class="track"><span class="track-name">{html.escape(name)}</span>'
                    f'<div class="lane">{"".join(buttons)}<div class="playhead"></div></div></div>')
    named = " named" if len(tracks) > 1 else ""
    return f'<div class="timeline{named}" data-duration="{duration_s:.3f}">{"".join(rows)}</div>'


def video_panel(uri: str, src: str | None, note: str, heading: str, duration_s: float, tracks: list[tuple[str, list[dict]]],
                colors: dict[str, str], index: int, thumbs: list[tuple[float, float, str]] = (), extra: str = "") -> str:
    """One video of the review page: its player (or why there is none), its timeline tracks and its thumbnails.

    ``thumbs``: ``(segment start, keyframe time, relative image path)``; clicking one seeks like its segment.
    ``extra``: ready HTML under them (the objects report's box overlays).
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
            + (f'<div class="thumbs">{strip}</div>' if strip else "") + extra + "</section>")


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
.start-thumb{height:72px;display:block} .queue-play{cursor:pointer} figure.overlay{margin:4px 0}
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


# Pieces of every review page (classify, objects, predict): the overview, the players, the page itself.


def _problem_rows(videos, limit: int):
    """A Dask frame of at most ``limit`` failed or partial videos per partition, with their reasons (``_first_problems`` finishes it)."""
    problems = videos[videos["status"] != "ok"][["video_uri", "status", "error_type", "error"]]
    return problems.map_partitions(lambda f, n: f.head(n), limit, meta=problems._meta)


def _first_problems(rows, limit: int):
    """The first ``limit`` computed problem rows by URI."""
    return rows.sort_values("video_uri").head(limit)


def _overview_html(counts: str, model_id: str | None, runs: list[str], errors: dict, statuses: dict[str, int], problems) -> list[str]:
    """The overview every page opens with: the counts, model and runs, errors by type, videos per status, the failed
    and partial videos with their reasons (the first ``problem_videos``; the rest are in ``videos/``)."""
    errors_line = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "none"
    status_table = "<table><thead><tr><th>status</th><th>videos</th></tr></thead><tbody>" + "".join(
        f"<tr><td>{s}</td><td>{statuses.get(s, 0)}</td></tr>" for s in ("ok", "partial", "failed")) + "</tbody></table>"
    problem_part = "<p>None: every video was labelled whole.</p>"
    if problems is not None and len(problems):
        more = statuses.get("failed", 0) + statuses.get("partial", 0) - len(problems)
        problem_part = _table_html(problems, ["video_uri", "status", "error_type", "error"]) + (
            f"<p>{more} more in <code>videos/</code>.</p>" if more > 0 else "")
    return [
        f'<h2 id="overview">Overview</h2><p>{html.escape(counts)}.</p>',
        f"<p>Model {html.escape(str(model_id))}; runs read: {html.escape(', '.join(runs) or 'not recorded')}. "
        f"Errors by type: {html.escape(errors_line)}.</p>",
        status_table,
        "<h3>Failed and partial videos</h3>",
        problem_part,
    ]


def _panel_player(uri: str, status: str | None, error: str | None, out: str, config: ReportConfig) -> tuple[str | None, str]:
    """``(src, note)`` of a panel's player: none for a video whose labelling failed (the note says why), else ``video_src``."""
    if status == "failed":
        return None, f"labelling failed: {error or 'no reason recorded'}"
    return video_src(uri, out, config.link_expires_s)


def _panel_duration(declared, ends: list[float]) -> float:
    """A timeline's length: the declared duration when known, stretched to the last segment's end."""
    known = declared is not None and declared == declared and declared > 0
    return max(float(declared) if known else max(ends, default=1.0), max(ends, default=0.0), 0.001)


def _lifetime_html(uris, config: ReportConfig) -> str:
    """How long the presigned links of the page's s3:// videos play (empty when there are none)."""
    import datetime

    if not any(storage.is_s3(u) for u in uris):
        return ""
    until = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=config.link_expires_s)
    return (f"<p>Videos in S3 play through presigned URLs valid {config.link_expires_s / 3600:g} h, until "
            f"{until:%Y-%m-%d %H:%M} UTC; build the report again for fresh links.</p>")


def _play_button(video_uri: str, start_s: float, end_s: float, caption: str, out: str, config: ReportConfig, content: str = "play") -> str:
    """A button that plays ``video_uri`` from ``start_s`` to ``end_s`` in the page's one queue player (``#queue-player``,
    a media fragment ``#t=start,end``); ``content``: ready HTML inside it. Without a playable link, the reason."""
    src, note = video_src(video_uri, out, config.link_expires_s)
    if not src:
        return html.escape(note)
    return (f'<button type="button" class="queue-play" data-src="{html.escape(src)}" data-start="{float(start_s):.3f}" '
            f'data-end="{float(end_s):.3f}" data-caption="{html.escape(caption)}">{content}</button>')


_QUEUE_PLAYER = '<video id="queue-player" controls preload="none"></video><p id="queue-now" class="meta"></p>'


def _page(title: str, nav: list[tuple[str, str]], body: list[str], footer: str) -> str:
    """A whole review page: inline style and script, no network, no outside file."""
    links = "".join(f'<a href="#{anchor}">{html.escape(text)}</a>' for anchor, text in nav)
    return "\n".join([
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{_STYLE}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<nav>{links}</nav>",
        *body,
        f"<p><small>{html.escape(footer)}</small></p>",
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ])


def _html(result: ReportResult, config: ReportConfig, label_frame, histogram, errors: dict, timeline_uris, timeline_clips,
          timeline_videos, lowest, timeline_segments=None, problems=None) -> str:
    """The review page: overview (plots, per-status counts, failed files), a player and a clickable label
    timeline per video (the first ``timeline_videos`` by URI), the review queue playable at each clip's start."""
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
    timeline_table = _timeline_table(timeline_uris, timeline_clips, timeline_videos)
    if timeline_segments is None:
        timeline_segments = merge_clips(timeline_clips)

    # Per video: a player and its label timeline.
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
        duration = _panel_duration(declared, [g["end_s"] for g in segments])
        row = table_by_uri.get(uri, {})
        src, note = _panel_player(uri, row.get("status"), errors_by_uri.get(uri), result.out, config)
        failed = row.get("status") == "failed"
        thumbs = [] if failed else _panel_thumbnails(uri, [g["start_s"] for g in segments], result.out, index, config.thumbnails)
        known = declared is not None and declared == declared
        heading = f"{row.get('status') or 'no videos row'}, {f'{float(declared):.1f} s' if known else 'duration unknown'}, {row.get('clips', 0)} clips"
        if isinstance(row.get("dominant_label"), str):
            heading += f", mostly {row['dominant_label']} ({row['dominant_share']:.0%}), mean score {row['mean_score']:.3f}"
        panels.append(video_panel(uri, src, note, heading, duration, [("label", segments)], hex_colors, index, thumbs))

    # The review queue: each clip playable from its start (a media fragment #t=start,end).
    queue = lowest.copy()
    plays = [_play_button(row.video_uri, row.start_s, row.end_s, f"{row.video_uri} clip {row.clip_index}: {row.label} ({float(row.score):.3f}), "
                          f"{float(row.start_s):.2f} to {float(row.end_s):.2f} s", result.out, config) for row in queue.itertuples(index=False)]
    queue_table = _table_html(queue, ["video_uri", "clip_index", "start_s", "end_s", "label", "score"],
                              {"start_s": "{:.2f}", "end_s": "{:.2f}", "score": "{:.3f}"}, ("play", plays)) if len(queue) else "<p>None.</p>"

    body = [
        *_overview_html(counts, result.model_id, result.runs, errors, {"ok": result.ok, "partial": result.partial, "failed": result.failed},
                        problems),
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
        *_panels_html(timeline_uris, panels, hex_colors, config, "segment"),
        f'<a id="review"></a><h2>Review queue: {result.low_confidence_clips} clips below {config.threshold:g}</h2>',
        f"<p>The full queue is in <code>review/</code>; the {min(len(lowest), config.review_examples)} lowest scores, each playable from its start:</p>",
        _QUEUE_PLAYER if len(queue) else "",
        queue_table,
    ]
    return _page(title, [("overview", "Overview"), ("videos", "Videos"), ("review", "Review queue")], body,
                 f"Generated in {result.seconds:.1f} s. Tables: labels.parquet, videos/, review/, summary.json.")


def _panels_html(uris: list[str], panels: list[str], colors: dict[str, str], config: ReportConfig, what: str, note: str = "") -> list[str]:
    """The Videos section: a heading, how to use it (and ``note``, ready HTML), the colours' legend, the players' link
    lifetime, the panels."""
    legend = '<p class="legend">' + "".join(f'<span style="background:{c}">{html.escape(l)}</span>' for l, c in colors.items()) + "</p>"
    return [
        f'<h2 id="videos">Videos: the first {len(uris)} by URI</h2>',
        f"<p>Click a {what} of a timeline to seek its player to the {what}'s start.</p>" if panels else "<p>No videos.</p>",
        note if panels else "",
        legend if panels and colors else "",
        _lifetime_html(uris, config) if panels else "",
        '<div class="panels">' + "".join(panels) + "</div>" if panels else "",
    ]


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
    _keep_readable(videos_out, video_rows, MASK_VIDEOS_SUMMARY)
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

    error_types = {str(k): int(v) for k, v in errors_s.items()}
    result = MasksReportResult(
        **_result_fields(source, out, video_rows, statuses_s, started),
        frames=frames,
        frames_with_mask=int(totals_s.get("with_mask", 0)) if frames else 0,
        mean_area_fraction=float(totals_s["area"]) / frames if frames else None,
        overlays=list(overlays),
        overlay_notes=notes,
    )
    page = _masks_html(result, config, areas.to_pandas(), error_types, timeline_uris,
                       timeline_masks, timeline_videos, overlays)
    _write_page(result, page, error_types, config)
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
    distinct = rows.sort_values(["frame_time_s", "clip_index"]).drop_duplicates("frame_time_s")
    return distinct.iloc[spread(len(distinct), count)].reset_index(drop=True)


def spread(n: int, count: int) -> list[int]:
    """At most ``count`` positions of ``n`` items, spread evenly from the first to the last, ascending."""
    import numpy as np

    if n <= count:
        return list(range(n))
    return [int(i) for i in np.unique(np.round(np.linspace(0, n - 1, count)).astype(int))]


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

    if rows.empty:
        return []
    sizes = set(zip(rows["height"].astype(int), rows["width"].astype(int)))
    if len(sizes) != 1:
        raise ValueError(f"{video_uri}: masks of several sizes {sorted(sizes)}; expected one (the model's frame size)")
    height, width = sizes.pop()
    times = [float(t) for t in rows["frame_time_s"]]
    masks = [rle.decode({"size": [height, width], "counts": json.loads(r)}) for r in rows["rle"]]
    frames = frames_at(video_uri, times, (height, width))
    return [(t, frame, mask, float(a)) for t, frame, mask, a in zip(times, frames, masks, rows["area_fraction"])]


def frames_at(video_uri: str, times: list[float], size: tuple[int, int] | None = None) -> "np.ndarray":
    """uint8 (len(times), H, W, 3): the frames of ``video_uri`` shown at ``times`` (ascending seconds), one decode pass.

    Args:
        size: ``(height, width)`` to decode at (None: the video's own).

    Raises:
        VideoError: the video cannot be opened or decoded at those times.
    """
    from rnnimg.video.clips import Clip

    times = tuple(float(t) for t in times)
    frames = None
    with VideoReader(video_uri, size) as reader:
        for _, frames in reader.clips([Clip(0, times[0], times[-1], times)]):
            pass
    if frames is None:
        raise VideoError("decode", f"{video_uri}: no frames at {', '.join(f'{t:.2f}' for t in times)} s")
    return frames


def _strip_png(images: list, gap: int = 4) -> str:
    """One PNG (a data URI) of uint8 (H, W, 3) pictures of one size side by side, white between them."""
    import matplotlib.image
    import numpy as np

    height, width = images[0].shape[:2]
    strip = np.full((height, len(images) * (width + gap) - gap, 3), 255, np.uint8)
    for k, picture in enumerate(images):
        strip[:, k * (width + gap) : k * (width + gap) + width] = picture
    buffer = io.BytesIO()
    matplotlib.image.imsave(buffer, strip, format="png")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _enlarge(picture: "np.ndarray", scale: int) -> "np.ndarray":
    """A picture ``scale`` times larger, pixel for pixel (nearest): (H, W, ...) -> (H*s, W*s, ...)."""
    import numpy as np

    return np.repeat(np.repeat(picture, scale, axis=0), scale, axis=1)


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
    return _plot_bands(uris, masks.sort_values(["frame_time_s", "clip_index"]) if len(masks) else masks, "frame_time_s", "area", videos,
                       "no masks", "seconds (sampled frame's presentation time)", "Mask area fraction over time", "tab:red", floor=0.01)


def _plot_bands(uris: list[str], rows, time_column: str, value_column: str, videos, empty: str, xlabel: str, title: str, color: str,
                floor: float = 0.0) -> str | None:
    """One band per video (the first on top): ``value_column`` of its ``rows`` against ``time_column``, every band on one
    scale from 0 to the largest value (at least ``floor``); a video without rows says so and why (its status)."""
    from matplotlib.figure import Figure

    if not uris:
        return None
    status = dict(zip(videos["video_uri"], videos["status"])) if len(videos) else {}
    top = max(floor, float(rows[value_column].max())) if len(rows) else 1.0
    top = top if top > 0 else 1.0
    figure = Figure(figsize=(9, 0.8 + 0.45 * len(uris)))
    axes = figure.subplots()
    for row, uri in enumerate(uris):
        mine = rows[rows["video_uri"] == uri] if len(rows) else rows
        base = len(uris) - 1 - row  # the first video on top
        axes.axhline(base, color="#ccc", linewidth=0.5)
        if len(mine):
            heights = base + 0.85 * mine[value_column].to_numpy(dtype="float64") / top
            axes.fill_between(mine[time_column], base, heights, color=color, alpha=0.3, linewidth=0)
            axes.plot(mine[time_column], heights, color=color, linewidth=1, marker=".", markersize=3)
        else:
            axes.text(0.0, base + 0.3, f"{empty} ({status.get(uri, 'no videos row')})", fontsize="small", color="#666")
    axes.set_yticks([b + 0.4 for b in range(len(uris))], [storage.basename(u) for u in reversed(uris)], fontsize="small")
    axes.set_ylim(-0.2, len(uris))
    axes.set_xlabel(xlabel)
    axes.set_title(f"{title}, first {len(uris)} videos by URI (band height 0 to {top:.3f})")
    return _png(figure)


def _overlay_strip(frames: list, scale: int = 4, gap: int = 4) -> str:
    """One PNG of a video's sampled frames side by side, each with its mask drawn over it (red tint,
    yellow outline), enlarged ``scale`` times pixel for pixel (nearest), so that each mask pixel is visible."""
    from rnnimg.tasks.segment_report import outline, tint

    pictures = []
    for _, frame, mask, _ in frames:
        big = _enlarge(tint(frame, mask), scale)  # (H, W, 3) -> (H*s, W*s, 3)
        big[outline(_enlarge(mask, scale))] = (255, 230, 0)
        pictures.append(big)
    return _strip_png(pictures, gap)


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


# ----------------------------------------------------------------------------- objects (task objects)


def _objects_report(source: LabelSource, out: str, config: ReportConfig, started: float) -> ObjectsReportResult:
    """The objects report (task ``objects``): per class, per video, the score histogram, per-class timelines and players,
    boxes drawn over decoded frames of the first videos.

    The objects table is read without its boxes for every aggregate, and with them for the timeline's
    videos only (a filter on ``video_uri``).
    """
    import dask

    from rnnimg import tables

    labels = source.location
    log.info("objects report over %d runs, %d object files, %d track files of %s", len(source.runs), len(source.objects), len(source.tracks), labels)
    objects = _read(source.objects, ["video_uri", "frame_time_s", "label", "score", "run_id"], tables.OBJECTS)
    tracks = _read(source.tracks, ["video_uri", "label", "frames", "seconds_seen", "run_id"], tables.TRACKS)
    videos = _read(source.videos, ["video_uri", "status", "duration_s", "clips", "error_type", "error", "run_id"], tables.VIDEOS)
    superseded = _superseded(videos, source.runs)
    objects, tracks, videos = (_current(f, superseded) for f in (objects, tracks, videos))

    bins = config.score_bins
    objects = objects.assign(detections=1, score=objects["score"].astype("float64"))
    per_class = objects.groupby("label").agg({"detections": "sum", "score": "sum"})
    per_class_tracks = tracks.assign(tracks=1).groupby("label").agg({"tracks": "sum", "seconds_seen": "sum"})
    histogram = objects.assign(bin=(objects["score"] * bins).astype("int64").clip(0, bins - 1)).groupby(["label", "bin"]).size()
    # Per video: detections summed, the tracks of a video moved into one partition for its top class, both joined to the
    # videos table (videos without detections keep their row). Plain {column: aggregation}: see _masks_report.
    per_video_objects = objects.groupby("video_uri").agg({"detections": "sum", "score": "sum"}, split_out=True).reset_index()
    per_video_tracks = tracks.shuffle("video_uri").map_partitions(_top_class, meta=_top_class(tracks._meta))
    per_video = videos.merge(per_video_tracks, on="video_uri", how="left").merge(per_video_objects, on="video_uri", how="left")
    per_video = per_video.map_partitions(_finish_object_videos, meta=_finish_object_videos(per_video._meta))
    statuses = videos["status"].value_counts()
    errors = videos["error_type"].dropna().value_counts()
    first = videos["video_uri"].map_partitions(_first_uris, config.timeline_videos, meta=("video_uri", "object"))

    videos_out = storage.join(out, "videos")
    storage.delete(videos_out)
    per_class_df, per_class_tracks_df, histogram_s, statuses_s, errors_s, first_s, problem_rows, video_rows = dask.compute(
        per_class, per_class_tracks, histogram, statuses, errors, first, _problem_rows(videos, config.problem_videos),
        _write_partitions(per_video, videos_out, OBJECT_VIDEOS_SUMMARY),
    )
    _keep_readable(videos_out, video_rows, OBJECT_VIDEOS_SUMMARY)
    class_table = _classes_table(per_class_df, per_class_tracks_df)
    storage.write_table(class_table, storage.join(out, CLASSES_TABLE))

    # The timeline's videos: their detections with boxes, their tracks (each class's sampling interval), their rows.
    timeline_uris = sorted(first_s.tolist())[: config.timeline_videos]
    timeline_objects = _read(source.objects, ["video_uri", "frame_time_s", "label", "score", "x0", "y0", "x1", "y1", "run_id"], tables.OBJECTS,
                             filters=[("video_uri", "in", timeline_uris)] if timeline_uris else None)
    timeline_tracks = _read(source.tracks, ["video_uri", "label", "first_seen_s", "last_seen_s", "frames", "seconds_seen", "mean_score", "run_id"],
                            tables.TRACKS, filters=[("video_uri", "in", timeline_uris)] if timeline_uris else None)
    timeline_objects, timeline_tracks = (_current(f, superseded) for f in (timeline_objects, timeline_tracks))
    timeline_objects, timeline_tracks, timeline_videos = dask.compute(
        timeline_objects[timeline_objects["video_uri"].isin(timeline_uris)],
        timeline_tracks[timeline_tracks["video_uri"].isin(timeline_uris)],
        videos[videos["video_uri"].isin(timeline_uris)],
    )
    segments = object_timeline(timeline_objects, timeline_tracks)
    # Boxes over frames: the first ``overlay_videos`` of the timeline's videos that have detections.
    overlay_uris = [u for u in timeline_uris if (timeline_objects["video_uri"] == u).any()][: config.overlay_videos]
    overlays, notes = {}, {}
    class_colors = _colors(class_table.column("label").to_pylist())  # the page's colours
    for uri in overlay_uris:
        try:
            overlays[uri] = box_overlay(uri, timeline_objects[timeline_objects["video_uri"] == uri], config.overlay_frames, class_colors)
        except (VideoError, ValueError) as err:
            notes[uri] = str(err)
            log.warning("no box overlay for %s: %s", uri, err)

    error_types = {str(k): int(v) for k, v in errors_s.items()}
    result = ObjectsReportResult(
        **_result_fields(source, out, video_rows, statuses_s, started),
        detections=int(sum(class_table.column("detections").to_pylist())),
        tracks=int(sum(class_table.column("tracks").to_pylist())),
        class_detections=dict(zip(class_table.column("label").to_pylist(), class_table.column("detections").to_pylist())),
        overlays=list(overlays),
        overlay_notes=notes,
    )
    page = _objects_html(result, config, class_table.to_pandas(), histogram_s, error_types, _first_problems(problem_rows, config.problem_videos),
                         timeline_uris, timeline_objects, timeline_tracks, timeline_videos, segments, overlays)
    _write_page(result, page, error_types, config)
    return result


def _top_class(tracks):
    """Partition function over tracks rows, all of a video's in one partition: per video, the classes seen and the one
    seen longest (ties: the first by name)."""
    import pandas as pd

    if tracks.empty:
        return pd.DataFrame({"video_uri": tracks["video_uri"].iloc[:0], "classes": pd.Series([], dtype="int64"),
                             "top_class": tracks["label"].iloc[:0], "top_class_seconds": pd.Series([], dtype="float64")})
    per_class = tracks.groupby(["video_uri", "label"], sort=False, observed=True)["seconds_seen"].sum().reset_index()
    classes = per_class.groupby("video_uri", sort=False, observed=True).size()
    top = per_class.sort_values(["video_uri", "seconds_seen", "label"], ascending=[True, False, True]).drop_duplicates("video_uri")
    return pd.DataFrame({"video_uri": pd.Series(top["video_uri"].to_numpy(), dtype=tracks["video_uri"].dtype),
                         "classes": classes.loc[top["video_uri"]].astype("int64").to_numpy(),
                         "top_class": pd.Series(top["label"].to_numpy(), dtype=tracks["label"].dtype),
                         "top_class_seconds": top["seconds_seen"].astype("float64").to_numpy()})


def _finish_object_videos(frame):
    """Partition function: the per-video objects table's final columns (videos without detections get zeros)."""
    import pandas as pd

    detections = frame["detections"].fillna(0).astype("int64")
    out = pd.DataFrame(
        {
            "video_uri": frame["video_uri"].astype(object),
            "status": frame["status"].astype(object),
            "duration_s": frame["duration_s"].astype("float64"),
            "clips": frame["clips"].fillna(0).astype("int64"),
            "detections": detections,
            "classes": frame["classes"].fillna(0).astype("int64"),
            "top_class": frame["top_class"].astype(object).where(frame["top_class"].notna(), None),
            "top_class_seconds": frame["top_class_seconds"].astype("float64"),
            "mean_score": (frame["score"] / detections).where(detections > 0, None).astype("float64"),
            "error_type": frame["error_type"].astype(object),
            "run_id": frame["run_id"].astype(object),
        }
    )
    return out.reset_index(drop=True)


def _classes_table(per_class, per_class_tracks) -> pa.Table:
    """One row per class seen in the objects or the tracks table, by name."""
    detections_total = int(per_class["detections"].sum()) if len(per_class) else 0
    rows = []
    for label in sorted({*per_class.index, *per_class_tracks.index}):
        n = int(per_class["detections"].get(label, 0))
        rows.append({"label": str(label), "detections": n, "share": n / detections_total if detections_total else 0.0,
                     "tracks": int(per_class_tracks["tracks"].get(label, 0)),
                     "seconds_seen": float(per_class_tracks["seconds_seen"].get(label, 0.0)),
                     "mean_score": float(per_class["score"].get(label, 0.0)) / n if n else None})
    return pa.Table.from_pylist(rows, schema=CLASSES_SUMMARY)


def object_segments(times, scores, step_s: float) -> list[dict]:
    """When one class is seen in one video: its detections' sampled times merged into runs.

    Each detection stands for the ``step_s`` around its sampled time (the label job samples the
    middle of each of a clip's frame intervals); detections less than 1.5 intervals apart join
    one segment. Times seen twice (overlapping clips) count once, with their mean score.

    Returns:
        ``{"start_s", "end_s", "score" (mean over the segment's times), "frames" (its distinct times)}`` per segment, in time order.
    """
    import numpy as np

    times, scores = np.asarray(times, np.float64), np.asarray(scores, np.float64)
    distinct, inverse = np.unique(np.round(times, 6), return_inverse=True)
    mean = np.bincount(inverse, weights=scores, minlength=len(distinct)) / np.bincount(inverse, minlength=len(distinct))
    segments: list[dict] = []
    half = step_s / 2
    for t, score in zip(distinct, mean):
        if segments and t - segments[-1]["last"] <= 1.5 * step_s + 1e-9:
            segments[-1]["last"] = t
            segments[-1]["scores"].append(score)
            continue
        segments.append({"first": t, "last": t, "scores": [score]})
    return [{"start_s": max(0.0, float(g["first"]) - half), "end_s": float(g["last"]) + half, "score": float(np.mean(g["scores"])),
             "frames": len(g["scores"])} for g in segments]


def object_timeline(objects, tracks):
    """Per video and class of the collected rows: the segments it is seen in (``object_segments``) as a pandas frame of
    ``video_uri, label, start_s, end_s, score, frames``. A class's sampling interval is its track's ``seconds_seen / frames``."""
    import pandas as pd

    step = {}
    for row in tracks.itertuples(index=False):
        if row.frames:
            step.setdefault((row.video_uri, row.label), float(row.seconds_seen) / int(row.frames))
    rows = []
    if len(objects):
        for (uri, label), mine in objects.groupby(["video_uri", "label"], sort=True, observed=True):
            interval = step.get((uri, label))
            if interval is None:  # no tracks row: the smallest gap between its times
                gaps = pd.Series(sorted(set(mine["frame_time_s"]))).diff().dropna()
                interval = float(gaps.min()) if len(gaps) else 0.1
            for g in object_segments(mine["frame_time_s"], mine["score"], interval):
                rows.append({"video_uri": uri, "label": label, **g})
    return pd.DataFrame(rows, columns=["video_uri", "label", "start_s", "end_s", "score", "frames"])


def draw_boxes(frame: "np.ndarray", boxes: list[tuple[float, float, float, float, tuple[int, int, int]]], thickness: int = 1) -> "np.ndarray":
    """A copy of uint8 (H, W, 3) ``frame`` with each box outlined: ``(x0, y0, x1, y1, rgb)``, corners as shares of the
    width and height (the objects table's), ``thickness`` pixels inward from the box's edge."""
    import numpy as np

    out = frame.copy()
    height, width = frame.shape[:2]
    for x0, y0, x1, y1, color in boxes:
        left, right = int(np.clip(np.floor(x0 * width), 0, width - 1)), int(np.clip(np.ceil(x1 * width) - 1, 0, width - 1))
        top, bottom = int(np.clip(np.floor(y0 * height), 0, height - 1)), int(np.clip(np.ceil(y1 * height) - 1, 0, height - 1))
        right, bottom = max(right, left), max(bottom, top)
        t = max(1, thickness)
        out[top : min(top + t, bottom + 1), left : right + 1] = color
        out[max(bottom - t + 1, top) : bottom + 1, left : right + 1] = color
        out[top : bottom + 1, left : min(left + t, right + 1)] = color
        out[top : bottom + 1, max(right - t + 1, left) : right + 1] = color
    return out


def box_overlay(video_uri: str, rows, count: int, colors: dict[str, tuple] | None = None,
                min_height: int = 128) -> list[tuple[float, "np.ndarray", list[tuple[str, float]]]]:
    """Frames of ``video_uri`` at ``count`` of its detections' sampled times (spread over the video), decoded at the
    video's size, enlarged (nearest) to at least ``min_height`` rows, every detection of that time drawn as a box in its
    class's colour.

    Returns:
        ``(frame_time_s, uint8 (H, W, 3) picture, [(class, score), ...])`` per time.

    Raises:
        VideoError: the video cannot be opened or decoded at those times.
    """
    import math

    import numpy as np

    if rows.empty:
        return []
    colors = colors or _colors(sorted(set(rows["label"])))
    times = sorted(set(float(t) for t in rows["frame_time_s"]))
    times = [times[i] for i in spread(len(times), count)]
    frames = frames_at(video_uri, times)
    scale = max(1, math.ceil(min_height / frames.shape[1]))
    drawn = []
    for t, frame in zip(times, frames):
        mine = rows[np.isclose(rows["frame_time_s"].to_numpy(dtype="float64"), t)].sort_values(["label", "score"]).drop_duplicates("label", keep="last")
        boxes = [(float(r.x0), float(r.y0), float(r.x1), float(r.y1), tuple(int(round(255 * c)) for c in colors.get(r.label, (0.6,) * 3)[:3]))
                 for r in mine.itertuples(index=False)]
        drawn.append((t, draw_boxes(_enlarge(frame, scale), boxes, thickness=scale), [(str(r.label), float(r.score)) for r in mine.itertuples(index=False)]))
    return drawn


def _plot_class_timeline(uris: list[str], segments, classes: list[str], colors) -> str | None:
    """Which classes are seen when: one band per video (the first on top), one lane per class inside it."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not uris or not classes:
        return None
    lanes = len(classes)
    figure = Figure(figsize=(9, 0.8 + 0.22 * lanes * len(uris)))
    axes = figure.subplots()
    for row, uri in enumerate(uris):
        mine = segments[segments["video_uri"] == uri] if len(segments) else segments
        for lane, label in enumerate(classes):
            spans = [(float(g.start_s), float(g.end_s - g.start_s)) for g in mine[mine["label"] == label].itertuples(index=False)] if len(mine) else []
            if spans:
                axes.broken_barh(spans, (row + lane / lanes, 0.9 / lanes), facecolors=colors[label])
    axes.set_yticks([r + 0.45 for r in range(len(uris))], [storage.basename(u) for u in uris], fontsize="small")
    axes.set_ylim(len(uris), 0)
    axes.set_xlabel("seconds (each detection covers its sampling interval)")
    axes.set_title(f"Classes seen over time, first {len(uris)} videos by URI (one lane per class)")
    axes.legend(handles=[Patch(color=colors[c], label=c) for c in classes], fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _png(figure)


def _objects_html(result: ObjectsReportResult, config: ReportConfig, class_frame, histogram, errors: dict, problems, timeline_uris,
                  timeline_objects, timeline_tracks, timeline_videos, segments, overlays: dict) -> str:
    """The objects review page: overview, per class, scores, the class timeline, per video a player over its per-class
    timeline (click a segment: the player seeks to it) and, for the first videos, its boxes drawn over decoded frames."""
    import pandas as pd

    classes = list(class_frame["label"]) if len(class_frame) else []
    colors = _colors(classes)
    hex_colors = {label: _hex(c) for label, c in colors.items()}
    distribution = _plot_distribution(class_frame, colors, "detections", "Detections per class")
    score_plot = _plot_histogram(histogram, config.score_bins, None, colors, xlabel="score (presence probability of the class)",
                                 ylabel="detections")
    timeline_plot = _plot_class_timeline(timeline_uris, segments, classes, colors)

    def image(src: str | None, alt: str, empty: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="{src}">' if src else f"<p>{html.escape(empty)}</p>"

    counts = (f"{result.videos} videos ({result.ok} ok, {result.partial} partial, {result.failed} failed), {result.detections} detections, "
              f"{result.tracks} tracks (video and class), {len(classes)} classes seen")
    rows = []
    durations = dict(zip(timeline_videos["video_uri"], timeline_videos["duration_s"])) if len(timeline_videos) else {}
    status = dict(zip(timeline_videos["video_uri"], timeline_videos["status"])) if len(timeline_videos) else {}
    reasons = dict(zip(timeline_videos["video_uri"], timeline_videos["error"])) if len(timeline_videos) else {}
    clip_counts = dict(zip(timeline_videos["video_uri"], timeline_videos["clips"])) if len(timeline_videos) else {}
    panels = []
    for index, uri in enumerate(timeline_uris):
        mine = segments[segments["video_uri"] == uri] if len(segments) else segments
        tracks = [(label, [{"start_s": g.start_s, "end_s": g.end_s, "label": label, "score": g.score} for g in mine[mine["label"] == label].itertuples(index=False)])
                  for label in classes]
        seen = timeline_tracks[timeline_tracks["video_uri"] == uri].sort_values("label") if len(timeline_tracks) else timeline_tracks
        detections = int((timeline_objects["video_uri"] == uri).sum()) if len(timeline_objects) else 0
        seen_text = ", ".join(f"{r.label} {float(r.first_seen_s):.1f}-{float(r.last_seen_s):.1f} s ({float(r.seconds_seen):.1f} s seen)"
                              for r in seen.itertuples(index=False)) or "no class seen"
        rows.append({"video_uri": uri, "status": status.get(uri, ""), "detections": detections, "classes seen": seen_text})
        declared = durations.get(uri)
        known = declared is not None and declared == declared
        heading = (f"{status.get(uri) or 'no videos row'}, {f'{float(declared):.1f} s' if known else 'duration unknown'}, "
                   f"{clip_counts.get(uri, 0)} clips, {detections} detections: {seen_text}")
        src, note = _panel_player(uri, status.get(uri), reasons.get(uri), result.out, config)
        extra = ""
        if uri in overlays and overlays[uri]:
            drawn = overlays[uri]
            caption = "; ".join(f"{t:.2f} s: " + (", ".join(f"{c} {p:.2f}" for c, p in found) or "none") for t, _, found in drawn)
            extra = (f'<figure class="overlay"><img alt="{html.escape(f"boxes over frames of {uri}")}" src="{_strip_png([p for _, p, _ in drawn])}">'
                     f"<figcaption>Detections drawn over the decoded frames (box colour: class) at {html.escape(caption)}</figcaption></figure>")
        elif uri in result.overlay_notes:
            extra = f'<p class="note">Boxes not drawn: {html.escape(result.overlay_notes[uri])}</p>'
        panels.append(video_panel(uri, src, note, heading, _panel_duration(declared, list(mine["end_s"]) if len(mine) else []), tracks,
                                  hex_colors, index, extra=extra))

    body = [
        *_overview_html(counts, result.model_id, result.runs, errors, {"ok": result.ok, "partial": result.partial, "failed": result.failed},
                        problems),
        "<h2>Classes</h2>",
        image(distribution, "detections per class", "No detections."),
        _table_html(class_frame, ["label", "detections", "share", "tracks", "seconds_seen", "mean_score"],
                    {"share": "{:.3f}", "seconds_seen": "{:.1f}", "mean_score": "{:.3f}"}) if len(class_frame) else "",
        "<h2>Scores</h2>",
        image(score_plot, "score histogram of the detections", "No detections."),
        "<h2>Timeline</h2>",
        image(timeline_plot, "classes seen over time per video", "No videos."),
        _table_html(pd.DataFrame(rows), ["video_uri", "status", "detections", "classes seen"]) if rows else "",
        *_panels_html(timeline_uris, panels, hex_colors, config, "segment"),
    ]
    return _page(f"rnnimg objects report: {result.labels}", [("overview", "Overview"), ("videos", "Videos")], body,
                 f"Generated in {result.seconds:.1f} s. Tables: {CLASSES_TABLE}, videos/, summary.json.")


# ----------------------------------------------------------------------------- surprise (task predict)


def _surprise_report(source: LabelSource, out: str, config: ReportConfig, started: float) -> SurpriseReportResult:
    """The surprise report (task ``predict``): per video, the surprise histogram, the most surprising clips (thumbnails,
    each playable from its start), per video a player over its surprise timeline."""
    import dask

    from rnnimg import tables

    labels = source.location
    log.info("surprise report over %d runs, %d clip files, %d video files of %s", len(source.runs), len(source.clips), len(source.videos), labels)
    clips = _read(source.clips, ["video_uri", "clip_index", "start_s", "end_s", "surprise", "run_id"], tables.SURPRISE_CLIPS)
    videos = _read(source.videos, ["video_uri", "status", "duration_s", "clips", "error_type", "error", "run_id"], tables.VIDEOS)
    superseded = _superseded(videos, source.runs)
    clips, videos = _current(clips, superseded), _current(videos, superseded)
    clips = clips.assign(surprise=clips["surprise"].astype("float64"))
    clips = clips[clips["surprise"].notnull()]

    per_video_clips = clips.assign(clips_scored=1, surprise_max=clips["surprise"]).groupby("video_uri").agg(
        {"clips_scored": "sum", "surprise": "sum", "surprise_max": "max"}, split_out=True).reset_index()
    per_video = videos.merge(per_video_clips, on="video_uri", how="left")
    per_video = per_video.map_partitions(_finish_surprise_videos, meta=_finish_surprise_videos(per_video._meta))
    totals = {"count": clips["surprise"].count(), "sum": clips["surprise"].sum(), "min": clips["surprise"].min(), "max": clips["surprise"].max()}
    statuses = videos["status"].value_counts()
    errors = videos["error_type"].dropna().value_counts()
    first = videos["video_uri"].map_partitions(_first_uris, config.timeline_videos, meta=("video_uri", "object"))
    top = clips.nlargest(max(1, config.surprising_clips), "surprise")

    videos_out = storage.join(out, "videos")
    storage.delete(videos_out)
    totals_s, statuses_s, errors_s, first_s, top_df, problem_rows, video_rows = dask.compute(
        totals, statuses, errors, first, top, _problem_rows(videos, config.problem_videos),
        _write_partitions(per_video, videos_out, SURPRISE_VIDEOS_SUMMARY),
    )
    _keep_readable(videos_out, video_rows, SURPRISE_VIDEOS_SUMMARY)
    scored = int(totals_s["count"])
    top_surprise = float(totals_s["max"]) if scored else 0.0
    # The histogram over [0, the largest surprise]: a second pass over the one column.
    bins = config.score_bins
    width = top_surprise / bins if top_surprise > 0 else 1.0
    histogram = clips.assign(bin=(clips["surprise"] / width).astype("int64").clip(0, bins - 1)).groupby("bin").size()
    timeline_uris = sorted(first_s.tolist())[: config.timeline_videos]
    histogram_s, timeline_clips, timeline_videos = dask.compute(
        histogram, clips[clips["video_uri"].isin(timeline_uris)][["video_uri", "clip_index", "start_s", "end_s", "surprise"]],
        videos[videos["video_uri"].isin(timeline_uris)],
    )
    ranking = rank_surprise(top_df, config.surprising_clips)
    storage.write_table(pa.Table.from_pandas(ranking[RANKING.names], schema=RANKING, preserve_index=False), storage.join(out, RANKING_TABLE))
    thumbs, notes = _start_thumbnails(ranking, out)

    error_types = {str(k): int(v) for k, v in errors_s.items()}
    result = SurpriseReportResult(
        **_result_fields(source, out, video_rows, statuses_s, started),
        clips=scored,
        mean_surprise=float(totals_s["sum"]) / scored if scored else None,
        min_surprise=float(totals_s["min"]) if scored else None,
        max_surprise=top_surprise if scored else None,
        ranked=len(ranking),
        thumbnail_notes=notes,
    )
    page = _surprise_html(result, config, histogram_s, width, error_types, _first_problems(problem_rows, config.problem_videos),
                          ranking, thumbs, timeline_uris, timeline_clips, timeline_videos)
    _write_page(result, page, error_types, config)
    return result


def _finish_surprise_videos(frame):
    """Partition function: the per-video surprise table's final columns (videos without scored clips get zeros)."""
    import pandas as pd

    scored = frame["clips_scored"].fillna(0).astype("int64")
    out = pd.DataFrame(
        {
            "video_uri": frame["video_uri"].astype(object),
            "status": frame["status"].astype(object),
            "duration_s": frame["duration_s"].astype("float64"),
            "clips": scored,
            "mean_surprise": (frame["surprise"] / scored).where(scored > 0, None).astype("float64"),
            "max_surprise": frame["surprise_max"].where(scored > 0, None).astype("float64"),
            "error_type": frame["error_type"].astype(object),
            "run_id": frame["run_id"].astype(object),
        }
    )
    return out.reset_index(drop=True)


def rank_surprise(clips, count: int):
    """The ``count`` most surprising clips, most surprising first (ties: by video, then clip), with their ``rank`` from 1."""
    ordered = clips.sort_values(["surprise", "video_uri", "clip_index"], ascending=[False, True, True]).head(count).reset_index(drop=True)
    return ordered.assign(rank=range(1, len(ordered) + 1))


def _start_thumbnails(ranking, out: str, height: int = 72) -> tuple[dict[int, str], dict[str, str]]:
    """JPEGs of the frame shown at each ranked clip's start, decoded (one pass per video), written to ``out/thumbs/``.

    Returns:
        ``({rank: relative image path}, {video: why it has none})``.
    """
    from PIL import Image

    thumbs_dir = storage.join(out, "thumbs")
    storage.delete(thumbs_dir)
    paths, notes = {}, {}
    for uri, mine in ranking.groupby("video_uri", sort=True):
        times = sorted(set(float(t) for t in mine["start_s"]))
        try:
            frames = dict(zip(times, frames_at(uri, times)))
        except (VideoError, ValueError) as err:
            notes[uri] = str(err)
            log.warning("no thumbnails for %s: %s", uri, err)
            continue
        for row in mine.itertuples(index=False):
            picture = Image.fromarray(frames[float(row.start_s)])
            picture = picture.resize((max(1, round(height * picture.width / picture.height)), height), Image.Resampling.BILINEAR)
            buffer = io.BytesIO()
            picture.save(buffer, format="JPEG", quality=85)
            paths[int(row.rank)] = f"thumbs/rank-{int(row.rank):04d}.jpg"
            storage.write_bytes(storage.join(out, *paths[int(row.rank)].split("/")), buffer.getvalue(), durable=False)
    return paths, notes


def _surprise_colors(values, low: float, high: float) -> list[str]:
    """Hex colours of surprise values on one scale, ``low`` (pale yellow) to ``high`` (dark red)."""
    from matplotlib import colormaps

    palette = colormaps["YlOrRd"]
    span = high - low
    return [_hex(palette(0.1 + 0.9 * min(1.0, max(0.0, (float(v) - low) / span)) if span > 0 else 0.1)) for v in values]


def _surprise_html(result: SurpriseReportResult, config: ReportConfig, histogram, width: float, errors: dict, problems, ranking, thumbs: dict,
                   timeline_uris, timeline_clips, timeline_videos) -> str:
    """The surprise review page: overview, the histogram, the most surprising clips (thumbnail of the clip's start, a
    click plays the clip from its start), per video a player over its surprise timeline (click a clip: seek to it)."""
    import numpy as np
    import pandas as pd
    from matplotlib.figure import Figure

    plot = None
    if len(histogram):
        figure = Figure(figsize=(7, 3))
        axes = figure.subplots()
        counts = np.zeros(config.score_bins)
        for b, n in histogram.items():
            counts[int(b)] = n
        axes.bar(np.arange(config.score_bins) * width, counts, width=width, align="edge", color="tab:orange")
        axes.set_xlabel("surprise (of the clip's most unexpected frame given the frames before it, summed over pixels)")
        axes.set_ylabel("clips")
        axes.set_title("Surprise histogram")
        plot = _png(figure)
    middle = timeline_clips.assign(time_s=(timeline_clips["start_s"] + timeline_clips["end_s"]) / 2).sort_values(["video_uri", "time_s"])
    bands = _plot_bands(timeline_uris, middle, "time_s", "surprise", timeline_videos, "no scored clips",
                        "seconds (middle of the clip's window)", "Surprise over time", "tab:orange")

    def image(src: str | None, alt: str, empty: str) -> str:
        return f'<img alt="{html.escape(alt)}" src="{src}">' if src else f"<p>{html.escape(empty)}</p>"

    mean = "n/a" if result.mean_surprise is None else f"{result.mean_surprise:.3f}"
    top = "n/a" if result.max_surprise is None else f"{result.max_surprise:.3f}"
    counts_line = (f"{result.videos} videos ({result.ok} ok, {result.partial} partial, {result.failed} failed), {result.clips} clips scored, "
                   f"mean surprise {mean}, largest {top}")
    low, high = float(result.min_surprise or 0.0), float(result.max_surprise or 0.0)

    # The ranking: thumbnail of the clip's start; clicking it plays the clip from its start.
    plays = []
    for row in ranking.itertuples(index=False):
        caption = f"#{row.rank}: {row.video_uri} clip {row.clip_index}, surprise {float(row.surprise):.3f}, {float(row.start_s):.2f} to {float(row.end_s):.2f} s"
        path = thumbs.get(int(row.rank))
        content = (f'<img class="start-thumb" alt="frame at {float(row.start_s):.2f} s" src="{html.escape(path)}">' if path
                   else html.escape(f"play (no thumbnail: {result.thumbnail_notes.get(row.video_uri, 'not decoded')})"))
        plays.append(_play_button(row.video_uri, row.start_s, row.end_s, caption, result.out, config, content))
    ranking_table = _table_html(ranking, ["rank", "video_uri", "clip_index", "start_s", "end_s", "surprise"],
                                {"start_s": "{:.2f}", "end_s": "{:.2f}", "surprise": "{:.3f}"}, ("start of the clip (click: play)", plays)) \
        if len(ranking) else "<p>No scored clips.</p>"

    # Per video: a player over one track of its clips, coloured by surprise.
    durations = dict(zip(timeline_videos["video_uri"], timeline_videos["duration_s"])) if len(timeline_videos) else {}
    status = dict(zip(timeline_videos["video_uri"], timeline_videos["status"])) if len(timeline_videos) else {}
    reasons = dict(zip(timeline_videos["video_uri"], timeline_videos["error"])) if len(timeline_videos) else {}
    panels, rows = [], []
    for index, uri in enumerate(timeline_uris):
        mine = timeline_clips[timeline_clips["video_uri"] == uri].sort_values("start_s") if len(timeline_clips) else timeline_clips
        segments = [{"start_s": float(r.start_s), "end_s": float(r.end_s), "label": f"clip {r.clip_index}", "score": float(r.surprise),
                     "color": color, "title": f"clip {r.clip_index}: {_fmt_s(r.start_s)} to {_fmt_s(r.end_s)}, surprise {float(r.surprise):.3f}"}
                    for r, color in zip(mine.itertuples(index=False), _surprise_colors(mine["surprise"], low, high))]
        declared = durations.get(uri)
        known = declared is not None and declared == declared
        peak = mine.loc[mine["surprise"].idxmax()] if len(mine) else None
        summary = (f"mean surprise {float(mine['surprise'].mean()):.3f}, largest {float(peak['surprise']):.3f} at {float(peak['start_s']):.2f} s"
                   if peak is not None else "no scored clips")
        rows.append({"video_uri": uri, "status": status.get(uri, ""), "clips": len(mine),
                     "mean_surprise": float(mine["surprise"].mean()) if len(mine) else None,
                     "max_surprise": float(mine["surprise"].max()) if len(mine) else None})
        heading = f"{status.get(uri) or 'no videos row'}, {f'{float(declared):.1f} s' if known else 'duration unknown'}, {len(mine)} clips, {summary}"
        src, note = _panel_player(uri, status.get(uri), reasons.get(uri), result.out, config)
        panels.append(video_panel(uri, src, note, heading, _panel_duration(declared, [g["end_s"] for g in segments]), [("surprise", segments)],
                                  {}, index))
    scale_note = (f"<p>Clip colour: surprise from the smallest, {low:.3f} (pale yellow), to the largest, {high:.3f} (dark red), "
                  "one scale for every video.</p>" if panels else "")
    body = [
        *_overview_html(counts_line, result.model_id, result.runs, errors, {"ok": result.ok, "partial": result.partial, "failed": result.failed},
                        problems),
        "<p>Surprise: how badly the model predicted a clip's last frames from its first ones; high values mark motion or content "
        "the model did not expect.</p>",
        "<h2>Surprise</h2>",
        image(plot, "surprise histogram", "No scored clips."),
        "<h2>Timeline</h2>",
        image(bands, "surprise over time per video", "No videos."),
        _table_html(pd.DataFrame(rows), ["video_uri", "status", "clips", "mean_surprise", "max_surprise"],
                    {"mean_surprise": "{:.3f}", "max_surprise": "{:.3f}"}) if rows else "",
        f'<a id="ranking"></a><h2>The {len(ranking)} most surprising clips</h2>',
        f"<p>All of them in <code>{RANKING_TABLE}</code>, most surprising first; click a picture (the frame at the clip's start) "
        "to play the clip from its start:</p>" if len(ranking) else "",
        _QUEUE_PLAYER if len(ranking) else "",
        ranking_table,
        *_panels_html(timeline_uris, panels, {}, config, "clip", scale_note),
    ]
    return _page(f"rnnimg surprise report: {result.labels}", [("overview", "Overview"), ("ranking", "Most surprising"), ("videos", "Videos")],
                 body, f"Generated in {result.seconds:.1f} s. Tables: {RANKING_TABLE}, videos/, summary.json.")


# A task -> the report of its label tables. A task whose tables no report reads is refused by name.
_REPORTS = {"classify": _clips_report, "segment": _masks_report, "objects": _objects_report, "predict": _surprise_report}
