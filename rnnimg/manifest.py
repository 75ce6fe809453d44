"""The one reader of archives and manifest tables: listing, labelling and training all use it.

A manifest is a Parquet (or CSV) table with at least ``video_uri``; training manifests add
``label`` and ``split``. Relative URIs in a manifest are relative to the manifest's folder.

- ``list_inputs`` / ``resolve_all`` / ``resolve_videos``: what a label job reads (folders, single
  videos, manifests), with what a folder listing skipped counted by extension.
- ``video_extensions``: which files of a folder are videos (what the installed FFmpeg demuxes);
  ``image_extensions``: which are still images (listed too for a model that labels stills).
- ``resolve_manifest_uri``: where a manifest's URI points, and whether the manifest may name it.
- ``shards``: deterministic shards of a listing, the unit of a label job's commits.
- ``manifest_overview`` / ``labelled_videos``: what a training worker reads (three columns,
  filtered in Arrow, only its rank's share turned into Python objects).

Confinement: a manifest read from ``s3://`` may name only objects of its own bucket (relative
URIs resolved against its folder, ``..`` normalised; a key climbing above the bucket root is
refused), plus what ``allow_prefixes`` adds. A local manifest is the user's own file and stays
unconfined (a URI nothing can read, such as ``https://``, is still refused). A refused URI is never
opened: the label job keeps it as a row whose ``refused`` says why; training drops it with a warning.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from rnnimg import storage

log = logging.getLogger("rnnimg.manifest")

MANIFEST_SUFFIXES = (".parquet", ".csv")
SKIPPED_EXAMPLES = 5  # how many skipped files a Listing names

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


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
    refused: str = ""  # why the manifest may not name this URI (never opened); "" when admitted
    attempt: int = 1  # 1 for a first labelling, n for the n-th try of a video that failed (set by label_runs)


@dataclass(frozen=True)
class Listing:
    """What ``list_inputs`` found: the rows to label, and the files of folders it skipped as not videos."""

    rows: list[VideoRow]  # every video, and every manifest row (refused ones included), a URI once
    skipped: dict[str, int] = field(default_factory=dict)  # extension ("" for none) -> files skipped
    skipped_examples: list[str] = field(default_factory=list)  # the first few skipped URIs

    def skipped_summary(self) -> str:
        """``".txt" 3, ".jpg" 1 (e.g. s3://b/notes.txt)``, or "" when nothing was skipped."""
        if not self.skipped:
            return ""
        counts = ", ".join(f"{ext or '(no extension)'!r} {n}" for ext, n in sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0])))
        return counts + (f" (e.g. {', '.join(self.skipped_examples)})" if self.skipped_examples else "")


# ----------------------------------------------------------------------------- which files are videos

# Extensions FFmpeg reads by probing the content although no demuxer lists them: extension -> demuxer.
# ".ogv" is the Ogg video extension (RFC 5334); FFmpeg's ogg demuxer lists only ".ogg".
PROBED_EXTENSIONS = {"ogv": "ogg", "vob": "mpeg", "m2v": "mpegvideo", "qt": "mov", "divx": "avi", "rmvb": "rm"}

# Families of extensions FFmpeg demuxes that are not videos. A family left incomplete costs an
# error row ("no video stream") for such a file, never a silent gap.
NOT_VIDEO_DEMUXERS = ("image2", "rawvideo", "v210", "v210x", "bitpacked")  # still images; headerless raw frames
STILL_IMAGES = frozenset("gif apng ico avif heic heif jxl mpo fits webp svg".split())  # beyond image2's list
TEXT_AND_SUBTITLES = frozenset(
    "txt srt ass ssa vtt webvtt sub smi sami lrc js jss aqt pjs mpl2 rt stl scc mcc sup idx ans art asc diz ice nfo vt "
    "adf idf mks ffmeta xml m3u8 sbg json csv".split()
)
AUDIO_ONLY = frozenset(
    "aa aac aax ac3 ac4 acm adp dtk ads ss2 adx aea afc aif aifc aiff aix al apc ape apl mac apm aptx aptxhd ast au avr "
    "bcstm bfstm binka bit bonk brstm caf cvg c2 302 daud dfpwm dss dts dtshd cdata eac3 ec3 fap paf flac fsb fwse 722 "
    "g722 g723_1 rco tco g728 g729 gsm hca iamf lbc ircam sf vag laf lc3 m2a mp2 mp3 mpa mca mlp mmf mpc msf mtaf ul "
    "musx nist sph nsp aa3 oma omg osq pvf qoa ra rka rsd rso sw sb sln sds sdx shn sox spdif svag svs tak thd tta uw "
    "ub voc vpk vqe vqf vql w64 way wav wa aud wsd wv xmd xvag wma m4a m4b isma mka oga opus spx pcm tun son msbc "
    "sbc sdns amr genh".split()
)
ELSEWHERE_NOT_VIDEO = frozenset({"cgi", "v"})  # scripts and sources far more often than the camera formats FFmpeg reads so


# Still images a folder listing takes for a model that labels single frames: the common photo and
# raster formats FFmpeg decodes as one picture (rnnimg.video.decode.is_still_format). Not the
# rarer members of image2's list (".y", ".pix", ".im1", ...), which name other things as often.
IMAGE_EXTENSIONS = frozenset(
    ".jpg .jpeg .png .webp .bmp .tif .tiff .ppm .pgm .pbm .pam .pfm .qoi .tga .dpx .exr .hdr .sgi .jp2 .j2k .avif .jxl".split()
)


def image_extensions() -> frozenset[str]:
    """Extensions a folder listing takes as still images (``IMAGE_EXTENSIONS``): each becomes a
    one-frame input for a model that labels stills (``rnnimg.tasks.Task.needs_video`` false)."""
    return IMAGE_EXTENSIONS


@functools.lru_cache(maxsize=1)
def video_extensions() -> frozenset[str]:
    """Extensions (``".mp4"``, lower case) a folder listing takes as videos: what this FFmpeg demuxes as video.

    Every extension an input format of the installed FFmpeg (through PyAV) claims, its demuxer's
    or its muxer's (many demuxers list none: ``asf`` reads ``.wmv``, ``mpegts`` ``.ts``), plus
    ``PROBED_EXTENSIONS`` whose demuxer is present, minus the families that are not video:
    still images (image2's list and ``STILL_IMAGES``), headerless raw frames, ``TEXT_AND_SUBTITLES``,
    ``AUDIO_ONLY`` and ``ELSEWHERE_NOT_VIDEO``. ``.ogg`` stays in: before ``.ogv`` (2007) Theora
    video was published as ``.ogg``, and an audio-only one becomes an error row, not a gap.
    Computed once per process.
    """
    import av

    claimed: set[str] = set()
    excluded: set[str] = set(STILL_IMAGES | TEXT_AND_SUBTITLES | AUDIO_ONLY | ELSEWHERE_NOT_VIDEO)
    demuxers = set()
    for name in av.formats_available:
        fmt = av.format.ContainerFormat(name)
        if not fmt.is_input:  # a muxer only
            continue
        demuxers.add(name)
        extensions = {e.lower() for e in fmt.extensions}
        (excluded if name in NOT_VIDEO_DEMUXERS else claimed).update(extensions)
    claimed |= {ext for ext, demuxer in PROBED_EXTENSIONS.items() if demuxer in demuxers}
    return frozenset("." + e for e in claimed - excluded)


def file_extension(uri: str) -> str:
    """A file's extension, lower case with its dot (``".mp4"``); "" when it has none."""
    ext = posixpath.splitext(storage.basename(uri))[1].lower()
    return "" if ext == "." else ext


def extension_set(extensions: Iterable[str] | str | None) -> frozenset[str]:
    """``extensions`` as lower-case ``".ext"`` strings; ``video_extensions()`` when None.

    Raises:
        ValueError: ``extensions`` names nothing.
    """
    if extensions is None:
        return video_extensions()
    if isinstance(extensions, str):
        extensions = [extensions]
    out = frozenset("." + e.strip().lower().lstrip(".") for e in extensions if e.strip().lstrip("."))
    if not out:
        raise ValueError(f"extensions must name at least one file extension such as '.mp4', got {extensions!r}")
    return out


# ----------------------------------------------------------------------------- where a manifest's URIs may point


def _s3_key_normalised(bucket: str, key: str) -> str | None:
    """``s3://bucket/key`` with ``.`` and ``..`` segments resolved; None when ``..`` climbs above the bucket."""
    parts: list[str] = []
    for part in key.split("/"):
        if part == "..":
            if not parts:
                return None
            parts.pop()
        elif part != ".":
            parts.append(part)
    return f"s3://{bucket}/" + "/".join(parts) if any(parts) else f"s3://{bucket}"


def _split_s3(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://"):].partition("/")
    return bucket, key


def _prefix_location(prefix: str) -> str:
    """An allow-prefix in the form resolved URIs take, without a trailing slash."""
    if not isinstance(prefix, str) or not prefix.strip():
        raise ValueError(f"an allow-prefix must be a non-empty location, got {prefix!r}")
    match = _SCHEME.match(prefix)
    scheme = match.group(1).lower() if match else ""
    if scheme == "s3":
        bucket, key = _split_s3(prefix)
        located = _s3_key_normalised(bucket, key) if bucket else None
        if located is None:
            raise ValueError(f"allow-prefix {prefix!r} must be s3://bucket[/prefix] without climbing above the bucket")
        return located.rstrip("/")
    if scheme == "file":
        return os.path.normpath(urlparse(prefix).path or "/")
    if scheme:
        raise ValueError(f"allow-prefix {prefix!r} has scheme {scheme}://; accepted: a local path, file:// or s3://bucket/prefix")
    return os.path.normpath(os.path.abspath(prefix))


def _under(location: str, prefix: str) -> bool:
    """Whether ``location`` is ``prefix`` or below it at a path-segment boundary."""
    return location == prefix or location.startswith(prefix if prefix.endswith("/") else prefix + "/")


class _Confinement:
    """The places one manifest may name (see the module docstring), and the resolution of its URIs."""

    def __init__(self, manifest_uri: str, allow_prefixes: Sequence[str] | None):
        self.manifest_uri = manifest_uri
        self.remote = storage.is_s3(manifest_uri)
        if isinstance(allow_prefixes, str):
            allow_prefixes = [allow_prefixes]
        self.prefixes = tuple(dict.fromkeys(_prefix_location(p) for p in allow_prefixes or ()))
        self.base = manifest_folder(manifest_uri)
        self.bucket = _split_s3(manifest_uri)[0] if self.remote else ""
        self.confines = self.remote  # a local manifest is the user's own file: it may name anything readable

    def locate(self, uri) -> tuple[str, str]:
        """(absolute location, "" or why the URI points nowhere readable), before any confinement."""
        if uri is None or not str(uri).strip():
            return "", f"empty video_uri in {self.manifest_uri}"
        uri = str(uri)
        match = _SCHEME.match(uri)
        scheme = match.group(1).lower() if match else ""
        if scheme not in ("", "file", "s3"):
            return uri, f"{uri!r} in {self.manifest_uri}: scheme {scheme}:// is not readable (local paths, file:// and s3:// are)"
        if scheme == "s3":
            bucket, key = _split_s3(uri)
            located = _s3_key_normalised(bucket, key) if bucket else None
            return (located, "") if located else (uri, f"{uri!r} in {self.manifest_uri} climbs above the root of its bucket")
        if scheme == "file" or uri.startswith("/"):
            return os.path.normpath(urlparse(uri).path if scheme == "file" else uri), ""
        if self.remote:
            joined = f"{self.base}/{uri}"
            located = _s3_key_normalised(*_split_s3(joined))
            if located is None:
                return joined, f"{uri!r} in {self.manifest_uri} climbs above the root of bucket s3://{self.bucket}/"
            return located, ""
        return storage.normalize(storage.join(self.base, uri)), ""

    def resolve(self, uri) -> tuple[str, str]:
        """(absolute location, "" or the reason this manifest may not name it)."""
        located, unreadable = self.locate(uri)
        if unreadable:
            return located, unreadable
        if not self.confines or any(_under(located, p) for p in self.prefixes):
            return located, ""
        if self.remote and located.startswith(f"s3://{self.bucket}/"):
            return located, ""
        allowed = f"s3://{self.bucket}/" if self.remote else ""
        allowed += (" or " if allowed else "") + (f"the allow-prefixes {list(self.prefixes)}" if self.prefixes else "")
        hint = "" if self.prefixes or not self.remote else " (add an allow-prefix to admit it)"
        return located, f"{uri!r} in {self.manifest_uri} resolves to {located}, outside {allowed}{hint}"

    def suspects(self, uris: pa.ChunkedArray) -> pa.ChunkedArray:
        """True where a URI needs ``resolve`` to be judged; False where Arrow alone shows it is admitted."""
        import pyarrow.compute as pc

        if self.prefixes or not self.remote:  # local manifests and prefixes: every URI goes through ``resolve``
            return pa.chunked_array([np.ones(len(uris), dtype=bool)], type=pa.bool_())
        dot_segment = pc.match_substring_regex(uris, r"(^|/)\.\.?(/|$)")
        own_bucket = pc.starts_with(uris, f"s3://{self.bucket}/")
        relative = pc.invert(pc.or_(pc.match_substring_regex(uris, _SCHEME.pattern), pc.starts_with(uris, "/")))
        clean = pc.and_(pc.or_(own_bucket, relative), pc.invert(dot_segment))
        return pc.fill_null(pc.invert(clean), True)


def resolve_manifest_uri(uri: str, manifest_uri: str, allow_prefixes: Sequence[str] | None = None) -> tuple[str, str]:
    """Where a manifest's ``video_uri`` points, and whether that manifest may name it.

    Args:
        uri: the URI as the manifest writes it (relative ones are relative to its folder).
        manifest_uri: the manifest's location; an ``s3://`` one may name only its own bucket.
        allow_prefixes: locations (``s3://other/videos/``, ``/mnt/archive/``) it may name besides;
            a local manifest may name anything readable.

    Returns:
        (absolute location, "" when admitted or a one-line reason naming the URI and the rule).

    Raises:
        ValueError: an allow-prefix is not a location.
    """
    return _Confinement(manifest_uri, allow_prefixes).resolve(uri)


def absolute_uri(uri: str, base: str) -> str:
    """A manifest's ``video_uri`` as an absolute location, relative ones relative to ``base`` (no confinement).

    Raises:
        ManifestError: the URI is empty, has an unreadable scheme or climbs above the root of its bucket.
    """
    located, unreadable = _Confinement(storage.join(base, "manifest"), None).locate(uri)
    if unreadable:
        raise ManifestError(unreadable)
    return located


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


def read_manifest(manifest_uri: str, allow_prefixes: Sequence[str] | None = None) -> list[VideoRow]:
    """Rows of a manifest table, in table order; a URI it may not name is a row with ``refused`` set.

    Args:
        allow_prefixes: locations the manifest may name besides its own bucket (see ``resolve_manifest_uri``).

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table has no ``video_uri`` column, or a row has an empty one.
        ValueError: an allow-prefix is not a location.
    """
    confinement = _Confinement(manifest_uri, allow_prefixes)
    table = read_table(manifest_uri)
    rows = []
    for i, row in enumerate(table.to_pylist()):
        uri = row.get("video_uri")
        if not uri:
            raise ManifestError(f"manifest {manifest_uri} row {i} has an empty video_uri")
        located, refused = confinement.resolve(uri)
        rows.append(
            VideoRow(
                video_uri=located,
                size=int(row["size"]) if row.get("size") is not None else -1,
                version=str(row.get("version") or ""),
                label=row.get("label"),
                split=row.get("split"),
                refused=refused,
            )
        )
    return rows


def list_archive(location: str, extensions: Iterable[str] | str | None = None) -> list[VideoRow]:
    """Every video file under a folder or prefix, sorted by URI (see ``video_extensions``).

    Raises:
        FileNotFoundError: the location does not exist.
    """
    wanted = extension_set(extensions)
    return [VideoRow(video_uri=f.uri, size=f.size, version=f.version)
            for f in storage.list_files(location) if file_extension(f.uri) in wanted]


def list_inputs(locations: Sequence[str], splits: Sequence[str] | None = None, allow_prefixes: Sequence[str] | None = None,
                extensions: Iterable[str] | str | None = None, stills: bool = False) -> Listing:
    """Videos named by several locations, and what their folder listings skipped.

    A location is a manifest table (``.parquet``/``.csv``: every row becomes a row, the ones it may
    not name with ``refused`` set), a folder or prefix (its files whose extension is a video's; the
    others are counted in ``skipped``), or one file (a row whatever its extension). A URI named
    twice is kept once, the first time.

    Args:
        splits: keep only manifest rows whose ``split`` is one of these (manifests only).
        allow_prefixes: locations manifests may name besides their own bucket (``resolve_manifest_uri``).
        extensions: which files of a folder are videos, e.g. ``[".mp4", ".ogv"]`` (default ``video_extensions()``).
        stills: with the default extensions, also list still images (``image_extensions()``): the
            model labels them.

    Raises:
        FileNotFoundError: a location does not exist.
        ManifestError: a manifest is unusable, ``splits`` was given for a folder, or nothing was found.
        ValueError: an allow-prefix is not a location, or ``extensions`` names nothing.
    """
    wanted = extension_set(extensions) if extensions is not None or not stills else video_extensions() | image_extensions()
    for prefix in allow_prefixes or ():
        _prefix_location(prefix)  # refuse a malformed one before reading anything
    rows: dict[str, VideoRow] = {}
    skipped: Counter[str] = Counter()
    examples: list[str] = []
    skipped_uris: set[str] = set()
    for location in locations:
        if location.lower().endswith(MANIFEST_SUFFIXES):
            found = read_manifest(location, allow_prefixes)
            found = [r for r in found if r.split in splits] if splits else found
        elif splits:
            raise ManifestError(f"--split needs a manifest table, but {location} is not a .parquet/.csv file")
        elif storage.is_dir(location):
            found = []
            for f in storage.list_files(location):
                ext = file_extension(f.uri)
                if ext in wanted:
                    found.append(VideoRow(video_uri=f.uri, size=f.size, version=f.version))
                elif f.uri not in skipped_uris:
                    skipped_uris.add(f.uri)
                    skipped[ext] += 1
                    if len(examples) < SKIPPED_EXAMPLES:
                        examples.append(f.uri)
        else:
            info = storage.stat(location)
            found = [VideoRow(video_uri=storage.normalize(location), size=info.size, version=info.version)]
        for row in found:
            rows.setdefault(row.video_uri, row)
    listing = Listing(rows=list(rows.values()), skipped=dict(skipped), skipped_examples=examples)
    if not listing.rows:
        left_out = f"; skipped as not videos: {listing.skipped_summary()}" if skipped else ""
        raise ManifestError(f"no videos found at {', '.join(locations)}" + (f" with split in {list(splits)}" if splits else "") + left_out)
    return listing


def resolve_videos(location: str, splits: Sequence[str] | None = None, allow_prefixes: Sequence[str] | None = None,
                   extensions: Iterable[str] | str | None = None) -> list[VideoRow]:
    """Videos named by one location: a manifest table (.parquet/.csv), a folder/prefix, or one file.

    See ``list_inputs``, which also counts what a folder listing skipped.

    Raises:
        FileNotFoundError: nothing at the location.
        ManifestError: a manifest is unusable, ``splits`` was given for a folder, or nothing was found.
    """
    return list_inputs([location], splits, allow_prefixes, extensions).rows


def resolve_all(locations: Sequence[str], splits: Sequence[str] | None = None, allow_prefixes: Sequence[str] | None = None,
                extensions: Iterable[str] | str | None = None) -> list[VideoRow]:
    """Videos named by several locations (``list_inputs`` without the skipped counts); a URI named twice is kept once.

    Raises:
        FileNotFoundError: a location does not exist.
        ManifestError: a manifest is unusable, or no video was found at all.
    """
    return list_inputs(locations, splits, allow_prefixes, extensions).rows


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


def _drop_refused(table: pa.Table, confinement: _Confinement) -> pa.Table:
    """The rows whose URI the manifest may name; one warning counts and names the others.

    Arrow clears the plain cases (relative keys, keys of the manifest's own bucket); only the
    rest become Python strings, so a worker still never holds every row as objects.
    """
    if not confinement.confines or table.num_rows == 0:
        return table
    import pyarrow.compute as pc

    uris = table["video_uri"]
    suspects = pc.indices_nonzero(confinement.suspects(uris))
    refused = [(i, uri, reason) for i, uri in zip(suspects.to_pylist(), uris.take(suspects).to_pylist())
               for reason in [confinement.resolve(uri)[1]] if reason]
    if not refused:
        return table
    names = ", ".join(repr(uri) for _, uri, _ in refused[:3]) + (", ..." if len(refused) > 3 else "")
    log.warning("manifest %s: %d row(s) name URIs it may not name, left out of training (%s); the first: %s",
                confinement.manifest_uri, len(refused), names, refused[0][2])
    keep = np.ones(table.num_rows, dtype=bool)
    keep[[i for i, _, _ in refused]] = False
    return table.filter(pa.array(keep))


def manifest_overview(manifest_uri: str, allow_prefixes: Sequence[str] | None = None) -> tuple[tuple[str, ...], dict[str, int]]:
    """Sorted label names of the labelled train/val rows, and the labelled row count per split.

    Rows naming a URI the manifest may not name (``resolve_manifest_uri``) are left out.

    Raises:
        FileNotFoundError: no manifest at the location.
        ManifestError: the table lacks video_uri, label or split.
        ValueError: an allow-prefix is not a location.
    """
    import pyarrow.compute as pc

    confinement = _Confinement(manifest_uri, allow_prefixes)
    table = _training_columns(manifest_uri)
    labelled = _drop_refused(table.filter(pc.is_valid(table["label"])), confinement)
    counted = pc.value_counts(labelled["split"])
    counts = {str(k): int(v) for k, v in zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist())}
    fit = labelled.filter(pc.is_in(labelled["split"], value_set=pa.array(["train", "val"])))
    names = tuple(sorted(str(v) for v in pc.unique(fit["label"]).to_pylist()))
    return names, counts


def labelled_videos(manifest_uri: str, split: str, labels: tuple[str, ...], *, rank: int = 0, world: int = 1, pad: bool = False,
                    allow_prefixes: Sequence[str] | None = None) -> list[tuple[str, int]]:
    """``(video_uri, class id)`` of one rank's share of a split's labelled manifest rows.

    Reads only the three columns it needs, filters them in Arrow, and turns into Python
    objects only this rank's share, so that with 10^5-10^6 videos no worker holds the others'
    rows and nothing passes through Ray's object store. Rank r gets rows r, r+W, r+2W, ...
    in table order; with ``pad`` every rank gets ``ceil(N / W)`` rows (wrapping around to the
    first ones), as DDP needs the same number of steps on every rank. Rows naming a URI the
    manifest may not name (``resolve_manifest_uri``: an ``s3://`` manifest names its own bucket
    and ``allow_prefixes``) are dropped before sharing out, with one warning, and never opened.

    Raises:
        ValueError: a row's label is not one of ``labels``, or an allow-prefix is not a location.
    """
    import pyarrow.compute as pc

    confinement = _Confinement(manifest_uri, allow_prefixes)
    table = _training_columns(manifest_uri)
    table = table.filter(pc.and_(pc.equal(table["split"], split), pc.is_valid(table["label"])))
    table = _drop_refused(table, confinement)
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
    out = []
    for uri, label in zip(share["video_uri"].to_pylist(), share["label"].to_pylist()):
        if label not in index:
            raise ValueError(f"manifest {manifest_uri}: label {label!r} of {uri} is not among the model's labels {list(labels)}")
        located, unreadable = confinement.locate(uri)
        if unreadable:
            raise ManifestError(unreadable)
        out.append((located, index[label]))
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
