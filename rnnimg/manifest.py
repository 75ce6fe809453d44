"""List an archive into manifest rows, read manifest tables, and cut deterministic shards.

A manifest is a Parquet (or CSV) table with at least ``video_uri``; training manifests add
``label`` and ``split``. Relative URIs in a manifest are relative to the manifest's folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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


def _absolute(uri: str, base: str) -> str:
    if uri.startswith("s3://") or uri.startswith("file://") or os.path.isabs(uri):
        return storage.normalize(uri)
    return storage.normalize(storage.join(base, uri))


def read_manifest(manifest_uri: str) -> list[VideoRow]:
    """Rows of a manifest table, in table order.

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table has no ``video_uri`` column, or a row has an empty one.
    """
    if not storage.exists(manifest_uri):
        raise FileNotFoundError(f"no manifest at {manifest_uri}")
    if manifest_uri.lower().endswith(".csv"):
        table = pacsv.read_csv(pa.BufferReader(storage.read_bytes(manifest_uri)))
    else:
        try:
            table = pq.read_table(pa.BufferReader(storage.read_bytes(manifest_uri)))
        except pa.ArrowInvalid as err:
            raise ManifestError(f"{manifest_uri} is not a Parquet table: {err}") from err
    if "video_uri" not in table.column_names:
        raise ManifestError(f"manifest {manifest_uri} has no video_uri column (columns: {table.column_names})")
    base = manifest_uri.rsplit("/", 1)[0] if storage.is_s3(manifest_uri) else os.path.dirname(storage.normalize(manifest_uri))
    data = table.to_pylist()
    rows = []
    for i, row in enumerate(data):
        uri = row.get("video_uri")
        if not uri:
            raise ManifestError(f"manifest {manifest_uri} row {i} has an empty video_uri")
        rows.append(
            VideoRow(
                video_uri=_absolute(str(uri), base),
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
