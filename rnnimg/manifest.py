"""The one reader of archives and manifest tables: listing, labelling and training all use it.

A manifest is a Parquet (or CSV) table with at least ``video_uri``; training manifests add
``label`` and ``split``. Relative URIs in a manifest are relative to the manifest's folder.

- ``resolve_all`` / ``resolve_videos``: what a label job reads (folders, single videos, manifests).
- ``shards``: deterministic shards of a listing, the unit of a label job's commits.
- ``manifest_overview`` / ``labelled_videos``: what a training worker reads (three columns,
  filtered in Arrow, only its rank's share turned into Python objects).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rnnimg import storage

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".mpg", ".mpeg", ".h264", ".flv", ".3gp")
MANIFEST_SUFFIXES = (".parquet", ".csv")


class ManifestError(ValueError):
    """A manifest or an archive listing is unusable; the message says why."""


@dataclass(frozen=True)
class VideoRow:
    """One video of the work: where it is and what the listing knew of it."""

    video_uri: str
    size: int = -1  # bytes, -1 when unknown
    version: str = ""  # ETag / mtime at listing time ("" when unknown)
    label: str | None = None  # ground truth, when the manifest has it
    split: str | None = None  # train / val / test / ..., when the manifest has it


def absolute_uri(uri: str, base: str) -> str:
    """A manifest's ``video_uri`` as an absolute location: relative ones are relative to ``base``."""
    if uri.startswith("s3://") or uri.startswith("file://") or os.path.isabs(uri):
        return storage.normalize(uri)
    return storage.normalize(storage.join(base, uri))


def manifest_folder(manifest_uri: str) -> str:
    """The folder relative URIs of a manifest are relative to."""
    return manifest_uri.rsplit("/", 1)[0] if storage.is_s3(manifest_uri) else os.path.dirname(storage.normalize(manifest_uri))


def read_table(manifest_uri: str, columns: tuple[str, ...] = ("video_uri",), purpose: str = "", project: bool = False) -> pa.Table:
    """A manifest table (Parquet or CSV), with at least ``columns``.

    Args:
        project: read only ``columns`` of a Parquet manifest (on S3, only their byte ranges).

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table is unreadable or lacks one of ``columns``.
    """
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no manifest at {manifest_uri}")
    try:
        if manifest_uri.lower().endswith(".csv"):
            table = pacsv.read_csv(pa.BufferReader(storage.read_bytes(manifest_uri)))
        elif project:
            try:
                table = storage.read_table(manifest_uri, columns=list(columns))
            except pa.ArrowInvalid:
                table = storage.read_table(manifest_uri)  # a column is missing: read it all, to say which
        else:
            table = pq.read_table(pa.BufferReader(storage.read_bytes(manifest_uri)))
    except pa.ArrowInvalid as err:
        raise ManifestError(f"{manifest_uri} is not a readable Parquet/CSV table: {str(err).splitlines()[0]}") from err
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        need = f"; {purpose} needs {list(columns)}" if purpose else ""
        raise ManifestError(f"manifest {manifest_uri} has no {missing} column(s) (columns: {table.column_names}){need}")
    return table


def read_manifest(manifest_uri: str) -> list[VideoRow]:
    """Rows of a manifest table, in table order.

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table has no ``video_uri`` column, or a row has an empty one.
    """
    table = read_table(manifest_uri)
    base = manifest_folder(manifest_uri)
    data = table.to_pylist()
    rows = []
    for i, row in enumerate(data):
        uri = row.get("video_uri")
        if not uri:
            raise ManifestError(f"manifest {manifest_uri} row {i} has an empty video_uri")
        rows.append(
            VideoRow(
                video_uri=absolute_uri(str(uri), base),
                size=int(row["size"]) if row.get("size") is not None else -1,
                version=str(row.get("version") or ""),
                label=row.get("label"),
                split=row.get("split"),
            )
        )
    return rows


def list_archive(location: str) -> list[VideoRow]:
    """Every video file under a folder or prefix, sorted by URI.

    Raises:
        FileNotFoundError: the location does not exist.
    """
    return [VideoRow(video_uri=f.uri, size=f.size, version=f.version) for f in storage.list_files(location, VIDEO_SUFFIXES)]


def resolve_videos(location: str, splits: list[str] | None = None) -> list[VideoRow]:
    """Videos named by a location: a manifest table (.parquet/.csv), a folder/prefix, or one video.

    Args:
        splits: keep only manifest rows whose ``split`` is one of these.

    Raises:
        FileNotFoundError: nothing at the location.
        ManifestError: a manifest is unusable, or ``splits`` was given for a folder.
    """
    lowered = location.lower()
    if lowered.endswith(MANIFEST_SUFFIXES):
        rows = read_manifest(location)
        if splits:
            rows = [r for r in rows if r.split in splits]
        return rows
    if splits:
        raise ManifestError(f"--split needs a manifest table, but {location} is not a .parquet/.csv file")
    if storage.is_dir(location) or storage.is_s3(location) and not lowered.endswith(VIDEO_SUFFIXES):
        return list_archive(location)
    info = storage.stat(location)
    return [VideoRow(video_uri=storage.normalize(location), size=info.size, version=info.version)]


def resolve_all(locations: list[str], splits: list[str] | None = None) -> list[VideoRow]:
    """Videos named by several locations (see ``resolve_videos``); a URI named twice is kept once.

    Raises:
        FileNotFoundError: a location does not exist.
        ManifestError: a manifest is unusable, or no video was found at all.
    """
    rows: dict[str, VideoRow] = {}
    for location in locations:
        for row in resolve_videos(location, splits):
            rows.setdefault(row.video_uri, row)
    if not rows:
        raise ManifestError(f"no videos found at {', '.join(locations)}" + (f" with split in {splits}" if splits else ""))
    return list(rows.values())


def shards(rows: list[VideoRow], videos_per_shard: int) -> list[list[VideoRow]]:
    """Cut rows, sorted by URI, into consecutive shards: the same input gives the same shards."""
    if videos_per_shard < 1:
        raise ValueError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    ordered = sorted(rows, key=lambda r: r.video_uri)
    return [ordered[i : i + videos_per_shard] for i in range(0, len(ordered), videos_per_shard)]


# ----------------------------------------------------------------------------- training reads

TRAINING_COLUMNS = ("video_uri", "label", "split")


def _training_columns(manifest_uri: str) -> pa.Table:
    """The manifest's ``video_uri``, ``label`` and ``split`` columns as strings."""
    table = read_table(manifest_uri, TRAINING_COLUMNS, purpose="training", project=True)
    return pa.table({c: table.column(c).cast(pa.string()) for c in TRAINING_COLUMNS})


def manifest_overview(manifest_uri: str) -> tuple[tuple[str, ...], dict[str, int]]:
    """Sorted label names of the labelled train/val rows, and the labelled row count per split.

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table lacks video_uri, label or split.
    """
    import pyarrow.compute as pc

    table = _training_columns(manifest_uri)
    labelled = table.filter(pc.is_valid(table["label"]))
    counted = pc.value_counts(labelled["split"])
    counts = {str(k): int(v) for k, v in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())}
    fit = labelled.filter(pc.is_in(labelled["split"], value_set=pa.array(["train", "val"])))
    names = tuple(sorted(str(v) for v in pc.unique(fit["label"]).to_pylist()))
    return names, counts


def labelled_videos(manifest_uri: str, split: str, labels: tuple[str, ...], *, rank: int = 0, world: int = 1, pad: bool = False) -> list[tuple[str, int]]:
    """``(video_uri, class id)`` of one rank's share of a split's labelled manifest rows.

    Reads only the three columns it needs, filters them in Arrow, and turns into Python
    objects only this rank's share, so that with 10^5-10^6 videos no worker holds the others'
    rows and nothing passes through Ray's object store. Rank r gets rows r, r+W, r+2W, ...
    in table order; with ``pad`` every rank gets ``ceil(N / W)`` rows (wrapping around to the
    first ones), as DDP needs the same number of steps on every rank.

    Raises:
        ValueError: a row's label is not one of ``labels``.
    """
    import pyarrow.compute as pc

    table = _training_columns(manifest_uri)
    table = table.filter(pc.and_(pc.equal(table["split"], split), pc.is_valid(table["label"])))
    n = table.num_rows
    if n == 0:
        return []
    if pad:
        per_rank = math.ceil(n / world)
        indices = np.arange(rank, per_rank * world, world) % n
    else:
        indices = np.arange(rank, n, world)
    share = table.take(indices)
    index = {name: i for i, name in enumerate(labels)}
    base = manifest_folder(manifest_uri)
    out = []
    for uri, label in zip(share["video_uri"].to_pylist(), share["label"].to_pylist()):
        if label not in index:
            raise ValueError(f"manifest {manifest_uri}: label {label!r} of {uri} is not among the model's labels {list(labels)}")
        out.append((absolute_uri(uri, base), index[label]))
    return out


def labelled_rows(rows: list[VideoRow], split: str, labels: tuple[str, ...]) -> list[tuple[str, int]]:
    """``(video_uri, class id)`` of already-read manifest rows of one split (plain-PyTorch use)."""
    index = {name: i for i, name in enumerate(labels)}
    return [(r.video_uri, index[r.label]) for r in rows if r.split == split and r.label is not None]


def shard_rows(rows: list, rank: int, world: int, pad: bool) -> list:
    """Rank's share of rows; with ``pad`` every rank gets the same count (wrapping around), as DDP needs."""
    if not pad:
        return rows[rank::world]
    per_rank = math.ceil(len(rows) / world)
    padded = (rows * math.ceil(per_rank * world / max(len(rows), 1)))[: per_rank * world]
    return padded[rank::world]
