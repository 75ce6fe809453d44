"""Summaries of label tables with Dask: per label, per video, a review queue and an HTML page.

    rnnimg report LABELS --out REPORT [--threshold 0.6] [--timeline-videos 20]

``LABELS`` is either the output of one labelling run (``rnnimg label ... --out LABELS``:
``LABELS/clips``, ``LABELS/videos``) or the base folder of the ``label-videos`` flow
(``LABELS/state.json``, ``LABELS/runs/<run_id>/``, read with ``rnnimg.label_runs``). For a base,
the report covers the current labels of one model (default: the model of the latest successful
run): every completed run of that model, each video taken from the latest run that labelled it.

The tables are read with ``dask.dataframe.read_parquet`` and a pyarrow filesystem from
``rnnimg.storage`` (local or ``s3://``), partition by partition: only aggregates (one row per
label, per score bin, per status) and a few dozen rows for the plots are ever collected in
memory; the per-video table and the review queue are written partition by partition.

Outputs::

    REPORT/labels.parquet        one row per label: clips, duration_s, videos, share, mean_score, low_confidence_clips
    REPORT/videos/part-*.parquet one row per video: status, clips, dominant_label, dominant_share, mean_score, ...
    REPORT/review/part-*.parquet the low-confidence queue: clips with score < threshold
    REPORT/summary.json          counts, the threshold, the runs read
    REPORT/index.html            static page; plots embedded as PNG (no network needed to view it)
"""

from __future__ import annotations

import base64
import html
import io
import logging
import time
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from rnnimg import label_runs, storage

log = logging.getLogger("rnnimg.report")

LABELS_TABLE = "labels.parquet"  # REPORT/labels.parquet: one row per label, in the LABELS_SUMMARY schema

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


class ReportError(ValueError):
    """The labels location holds no label tables the report can read; the message says why."""


@dataclass(frozen=True)
class ReportConfig:
    """What the report shows."""

    threshold: float = 0.6  # clips with a score below this go to the review queue
    timeline_videos: int = 20  # videos drawn in the label timeline (the first ones by URI)
    review_examples: int = 25  # lowest-scoring clips listed on the HTML page
    score_bins: int = 20  # bins of the score histogram over [0, 1]

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if not isinstance(self.timeline_videos, int) or self.timeline_videos < 0:
            raise ValueError(f"timeline_videos must be an integer >= 0, got {self.timeline_videos!r}")
        if not isinstance(self.review_examples, int) or self.review_examples < 0:
            raise ValueError(f"review_examples must be an integer >= 0, got {self.review_examples!r}")
        if not isinstance(self.score_bins, int) or not 2 <= self.score_bins <= 200:
            raise ValueError(f"score_bins must be an integer in [2, 200], got {self.score_bins!r}")


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

    def summary(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- inputs


def _parquet_files(location: str) -> list[str]:
    if not storage.exists(location):
        return []
    return [f.uri for f in storage.list_files(location, (".parquet",))]


def resolve_labels(labels: str, model_id: str | None = None) -> LabelSource:
    """Find the label tables under ``labels``: one labelling output or a ``label-videos`` base.

    Args:
        labels: ``OUT`` of ``rnnimg label`` (has ``clips/``), or a base with ``state.json``.
        model_id: with a base, report this model's runs (default: the latest successful run's model).

    Raises:
        ReportError: neither layout is there, the model has no completed run, or no tables.
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
    if not videos:
        raise ReportError(f"no videos table under {labels} (looked in {', '.join(storage.join(d, 'videos') for d in source.run_dirs)})")
    return LabelSource(source.location, source.kind, source.runs, source.run_dirs, clips, videos, source.model_id)


def _read(files: list[str], columns: list[str], schema: pa.Schema):
    """A Dask frame over Parquet files of one store; an empty frame of ``schema`` when there are none."""
    import dask.dataframe as dd

    if not files:
        return dd.from_pandas(schema.empty_table().select(columns).to_pandas(), npartitions=1)
    fs, _ = storage.resolve(files[0])
    paths = [storage.resolve(f)[1] for f in files]
    return dd.read_parquet(paths, filesystem=fs, columns=columns)


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


def build_report(labels: str, out: str, config: ReportConfig = ReportConfig(), model_id: str | None = None) -> ReportResult:
    """Summarise the label tables under ``labels`` into ``out`` (tables, summary.json, index.html).

    Args:
        labels: a labelling output or a ``label-videos`` base (see the module docstring).
        out: the report folder (local or ``s3://``); its ``videos/`` and ``review/`` are replaced.
        model_id: with a base, the model to report (default: the latest successful run's).

    Returns:
        The counts written to ``summary.json``.

    Raises:
        ReportError: no label tables at ``labels``.
    """
    import dask

    from rnnimg import tables

    started = time.perf_counter()
    source = resolve_labels(labels, model_id)
    log.info("report over %d runs, %d clip files, %d video files of %s", len(source.runs), len(source.clips), len(source.videos), labels)
    clips = _read(source.clips, ["video_uri", "clip_index", "start_s", "end_s", "label", "score", "run_id"], tables.CLIPS)
    videos = _read(source.videos, ["video_uri", "status", "duration_s", "error_type", "run_id"], tables.VIDEOS)
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
    timeline_clips, timeline_videos = dask.compute(
        clips[clips["video_uri"].isin(timeline_uris)][["video_uri", "start_s", "end_s", "label", "score"]],
        videos[videos["video_uri"].isin(timeline_uris)],
    )

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
                 timeline_videos, lowest.head(config.review_examples))
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


def _table_html(frame, columns: list[str], formats: dict | None = None) -> str:
    formats = formats or {}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for _, row in frame.iterrows():
        cells = []
        for c in columns:
            value = row[c]
            text = "" if value is None or (isinstance(value, float) and value != value) else formats.get(c, "{}").format(value)
            cells.append(f"<td>{html.escape(text)}</td>")
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


def _html(result: ReportResult, config: ReportConfig, label_frame, histogram, errors: dict, timeline_uris, timeline_clips,
          timeline_videos, lowest) -> str:
    colors = _colors(list(label_frame["label"]) if len(label_frame) else [])
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
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em} table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%} img{max-width:100%}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(counts)}.</p>",
        f"<p>Model {html.escape(str(result.model_id))}; runs read: {html.escape(', '.join(result.runs) or 'not recorded')}. Errors by type: {html.escape(errors_line)}.</p>",
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
        f"<h2>Review queue: {result.low_confidence_clips} clips below {config.threshold:g}</h2>",
        f"<p>The full queue is in <code>review/</code>; the {min(len(lowest), config.review_examples)} lowest scores:</p>",
        _table_html(lowest, ["video_uri", "clip_index", "start_s", "end_s", "label", "score"],
                    {"start_s": "{:.2f}", "end_s": "{:.2f}", "score": "{:.3f}"}) if len(lowest) else "<p>None.</p>",
        f"<p><small>Generated in {result.seconds:.1f} s. Tables: labels.parquet, videos/, review/, summary.json.</small></p>",
        "</body></html>",
    ]
    return "\n".join(parts)
