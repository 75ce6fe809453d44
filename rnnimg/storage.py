"""Every URL, filesystem and atomic write of rnnimg lives here.

A *location* is a string: a local path (``out/``, ``/data/x``), a ``file://`` URL, or
``s3://bucket/prefix``. S3 takes its endpoint from the standard ``AWS_ENDPOINT_URL``
variable (``AWS_ENDPOINT_URL_S3`` first) and its credentials from the standard AWS chain
(environment, profile, instance role); nothing here logs or stores a credential.

The rest of the code never imports s3fs, pyarrow.fs or boto: it calls ``join``, ``open_input``,
``write_bytes``, ``create_if_absent``, ``read_table``, ``write_table``, ``list_files`` and friends.

S3 goes through s3fs (fsspec, which Dask, pandas and Prefect speak too), one
``s3fs.S3FileSystem`` per process, endpoint and identity (``_s3fs``): listings carry the
object's ETag as its version, ``create_if_absent`` is s3fs's exclusive create
(``PutObject`` with ``If-None-Match: *``), ``open_input`` is an s3fs file whose read-ahead
(``S3_VIDEO_CACHE`` blocks of ``S3_VIDEO_BLOCK_SIZE``) was measured on PyAV's sequential decode
(``bench/s3_read.py``, ``bench/RESULTS_storage.md``), and presigned URLs are s3fs's.
Parquet is read through pyarrow's own S3 client (``resolve``, ``s3_filesystem``: Dask,
pyarrow.dataset, Ray Train's checkpoints), measured faster than pyarrow over s3fs on reading a
table back (bench/RESULTS_storage.md); ``write_table`` serialises in memory and writes one
object through s3fs like any other file (one PutObject, which wrote as fast or faster there).

Writes are atomic: a local file is written under a temporary name in the same folder, then
renamed into place; an S3 object becomes visible only when its upload completes. A reader
therefore never sees half a file. Locally the data is fsynced before the rename and the folder
after it, so files written one after the other survive a power loss in that order.

Time, where it decides something (the age of a lock), is the store's: ``modified_at`` and
``store_now`` read it from the store (file mtime, S3 ``LastModified``), never from this host.
"""

from __future__ import annotations

import errno
import io
import json
import os
import posixpath
import re
import threading
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO, Callable, Iterator, TypeVar
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

if TYPE_CHECKING:  # imported lazily: a local-only run never loads s3fs, aiobotocore or aiohttp
    import fsspec
    import s3fs

T = TypeVar("T")

# Local atomic writes go to "<folder>/.tmp-<uuid>-<name>" first; listings never show them.
TEMP_PREFIX = ".tmp-"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


class StorageError(RuntimeError):
    """A location could not be read or written (after retries, where retrying makes sense)."""


class UnsafeKeyError(ValueError):
    """A key derived from an input name would escape the prefix it belongs under."""


@dataclass(frozen=True)
class FileInfo:
    """One object of a listing. ``version`` is the ETag on S3, the mtime in ns locally."""

    uri: str
    size: int
    version: str


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def _check_scheme(location: str) -> None:
    if not isinstance(location, str) or not location:
        raise ValueError(f"a location must be a non-empty string, got {location!r}")
    # Only "name://" is a scheme: "clip:1.mp4" is a relative path.
    match = _SCHEME.match(location)
    scheme = match.group(1).lower() if match else ""
    if scheme not in ("", "file", "s3"):
        raise ValueError(
            f"unsupported location {location!r}: use a local path, file:// or s3://bucket/prefix"
        )
    if scheme == "s3" and not urlparse(location).netloc:
        raise ValueError(f"s3 location {location!r} has no bucket: use s3://bucket/prefix")


# Read-ahead of ``open_input`` on S3, chosen with bench/s3_read.py (PyAV's sequential decode of a
# 640x360 H.264 file from a local S3 endpoint against the same decode from local disk; figures in
# bench/RESULTS_storage.md). A block is one ranged GET. "background" fetches the next block in a
# thread while PyAV decodes the current one, so on a real S3 a GET's latency hides behind decoding;
# every cache type and block size tried was within the noise of local disk on the local endpoint,
# and 4 MiB blocks cost the least CPU there (2 GETs for the 3 MiB file).
S3_VIDEO_BLOCK_SIZE = 4 << 20
S3_VIDEO_CACHE = "background"
S3_VIDEO_MAX_BLOCKS = 4  # the memory bound of a block cache: blocks kept per open file (16 MiB at 4 MiB blocks)

_S3FS: dict[tuple, "s3fs.S3FileSystem"] = {}
_S3FS_LOCK = threading.Lock()


def _s3_endpoint_and_region() -> tuple[str | None, str]:
    """The S3 endpoint (AWS_ENDPOINT_URL_S3, else AWS_ENDPOINT_URL, else AWS's) and region (default us-east-1)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return endpoint, region


def _s3fs() -> "s3fs.S3FileSystem":
    """This process's s3fs filesystem for the current endpoint, region and AWS identity.

    One instance per (process id, endpoint, region, ``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``):
    s3fs runs its requests on an event loop of the process that made it, so every process (a Ray
    worker, a forked child of a multiprocessing pool) makes its own instead of using a loop no
    thread of it runs (a parent's instance is left alone in a child: closing it there would
    touch the parent's loop); and when the environment names another identity, a new client picks up the
    credentials of the environment now (the key id is an identifier that every signed request
    carries, not a secret). Credentials are left to botocore's default chain: none is passed,
    read or kept here. Listings are never cached: a lock and a resumed run must see the store as
    it is now.
    """
    import s3fs

    endpoint, region = _s3_endpoint_and_region()
    key = (os.getpid(), endpoint, region, os.environ.get("AWS_PROFILE"), os.environ.get("AWS_ACCESS_KEY_ID"))
    with _S3FS_LOCK:
        fs = _S3FS.get(key)
        if fs is None:
            config: dict = {"signature_version": "s3v4", "retries": {"mode": "standard", "max_attempts": 5}}
            if endpoint:
                config["s3"] = {"addressing_style": "path"}  # local S3-compatible stores (moto, MinIO)
            fs = s3fs.S3FileSystem(
                endpoint_url=endpoint, client_kwargs={"region_name": region}, config_kwargs=config,
                use_listings_cache=False, skip_instance_cache=True)
            _S3FS[key] = fs
    return fs


def _s3_path(location: str) -> str:
    """``s3://bucket/key/`` -> ``bucket/key``, the path s3fs and pyarrow name an object by."""
    parsed = urlparse(location)
    return (parsed.netloc + parsed.path).rstrip("/")


def s3_filesystem() -> pafs.FileSystem:
    """The pyarrow filesystem over S3 that Parquet is read through (pyarrow.dataset, Dask, Ray Train).

    pyarrow's own S3 client (C++, ranged reads on its own I/O threads), not s3fs under
    ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``: bench/s3_read.py measured it reading a
    3.5 MiB table back faster (bench/RESULTS_storage.md), and Ray Train's ``storage_filesystem``
    is documented with it. Same endpoint, region and credential chain as ``_s3fs``; a new
    instance per call, so it follows the environment as it is now.
    """
    endpoint, region = _s3_endpoint_and_region()
    kwargs: dict = {"region": region, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=5)}
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme in ("http", "https"):
            kwargs["scheme"] = parsed.scheme
            kwargs["endpoint_override"] = parsed.netloc + parsed.path.rstrip("/")
        else:
            kwargs["endpoint_override"] = endpoint
        # Local S3-compatible stores (moto, MinIO) use path-style addressing.
        kwargs["force_virtual_addressing"] = False
    return pafs.S3FileSystem(**kwargs)


def resolve(location: str) -> tuple[pafs.FileSystem, str]:
    """Return (pyarrow filesystem, path inside it) for a location, for Parquet readers and Ray Train.

    Raises:
        ValueError: the location has an unsupported scheme or no bucket.
    """
    _check_scheme(location)
    if is_s3(location):
        return s3_filesystem(), _s3_path(location)
    if location.startswith("file://"):
        location = urlparse(location).path
    return pafs.LocalFileSystem(), os.path.abspath(location)


def fsspec_resolve(location: str) -> tuple["fsspec.AbstractFileSystem", str]:
    """Return (fsspec filesystem, path inside it) for a location: what Dask, pandas and Prefect take.

    Raises:
        ValueError: the location has an unsupported scheme or no bucket.
    """
    _check_scheme(location)
    if is_s3(location):
        return _s3fs(), _s3_path(location)
    from fsspec.implementations.local import LocalFileSystem

    _, path = resolve(location)
    return LocalFileSystem(), path


def normalize(location: str) -> str:
    """Canonical form: ``s3://bucket/key`` (no trailing slash) or an absolute local path."""
    _check_scheme(location)
    if is_s3(location):
        return location.rstrip("/")
    _, path = resolve(location)
    return path


def join(location: str, *parts: str) -> str:
    """Join path parts under a location, the way its scheme does (``/`` for S3)."""
    if is_s3(location):
        return posixpath.join(location.rstrip("/"), *parts)
    return os.path.join(location, *parts)


def basename(location: str) -> str:
    return posixpath.basename(location.rstrip("/")) if is_s3(location) else os.path.basename(location)


def safe_key(name: str) -> str:
    """Turn an input-derived name into a key that stays inside its prefix.

    Keeps letters, digits and ``._-``; anything else becomes ``_``. A name made only of dots
    (``.``/``..``) or an empty name is refused, so that ``join(prefix, safe_key(x))`` can never
    climb out of ``prefix``.

    Raises:
        UnsafeKeyError: nothing safe is left of the name.
    """
    cleaned = "".join(c if (c.isascii() and (c.isalnum() or c in "._-")) else "_" for c in name)
    cleaned = cleaned.lstrip(".-") or ""
    if not cleaned or set(cleaned) <= {"."}:
        raise UnsafeKeyError(f"cannot derive a safe key from {name!r}")
    return cleaned


def retry(fn: Callable[[], T], what: str, attempts: int = 4, base_delay_s: float = 0.2) -> T:
    """Call ``fn``, retrying transient I/O errors with exponential backoff.

    ``FileNotFoundError`` and ``PermissionError`` are permanent and raised at once.

    Raises:
        StorageError: every attempt failed; the message names ``what`` and the last error.
    """
    for attempt in range(attempts):
        try:
            return fn()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
            raise
        except OSError as err:
            if attempt == attempts - 1:
                raise StorageError(f"{what}: {err}") from err
            time.sleep(base_delay_s * (2**attempt))
    raise AssertionError("unreachable")


def _s3_info(location: str) -> dict | None:
    """s3fs's description of an object or prefix (``type``, ``size``, ``ETag``, ``LastModified``), None if absent."""
    fs = _s3fs()
    try:
        return retry(lambda: fs.info(_s3_path(location)), f"stat {location}")
    except FileNotFoundError:
        return None


def _etag(info: dict) -> str:
    """An S3 object's ETag without its quotes: its version (changes with the content, not with a listing)."""
    return str(info.get("ETag") or "").strip('"')


def exists(location: str) -> bool:
    if is_s3(location):
        return _s3_info(location) is not None
    fs, path = resolve(location)
    info = retry(lambda: fs.get_file_info(path), f"stat {location}")
    return info.type != pafs.FileType.NotFound


def is_dir(location: str) -> bool:
    if is_s3(location):
        info = _s3_info(location)
        return info is not None and info["type"] == "directory"
    fs, path = resolve(location)
    info = retry(lambda: fs.get_file_info(path), f"stat {location}")
    return info.type == pafs.FileType.Directory


def stat(location: str) -> FileInfo:
    """Size and version of one file (the ETag on S3, the mtime in ns locally).

    Raises:
        FileNotFoundError: there is no file at the location.
    """
    if is_s3(location):
        found = _s3_info(location)
        if found is None or found["type"] != "file":
            raise FileNotFoundError(f"no file at {location}")
        return FileInfo(uri=location, size=int(found["size"]), version=_etag(found))
    fs, path = resolve(location)
    info = retry(lambda: fs.get_file_info(path), f"stat {location}")
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no file at {location}")
    return FileInfo(uri=location, size=int(info.size or 0), version=str(info.mtime_ns or ""))


def modified_at(location: str) -> float:
    """When the store last wrote a file, in seconds since the epoch, by the store's own clock.

    Locally the file's mtime (set by the kernel, or by the NFS server); on S3 the object's
    ``LastModified`` (whole seconds). No clock of this host enters it.

    Raises:
        FileNotFoundError: there is no file at the location.
    """
    if is_s3(location):
        found = _s3_info(location)
        if found is None or found["type"] != "file":
            raise FileNotFoundError(f"no file at {location}")
        return found["LastModified"].timestamp()
    fs, path = resolve(location)
    info = retry(lambda: fs.get_file_info(path), f"stat {location}")
    if info.type != pafs.FileType.File or info.mtime_ns is None:
        raise FileNotFoundError(f"no file at {location}")
    return info.mtime_ns / 1e9


def store_now(folder: str) -> float:
    """The store's current time, in seconds since the epoch: what ``modified_at`` would say of a file written now.

    Writes a tiny probe object ``<folder>/clock-<uuid>``, reads back its modification time and
    deletes it, so that an age computed as ``store_now(folder) - modified_at(file)`` compares two
    readings of one clock, the store's, whatever the clocks of the machines involved say.

    Raises:
        StorageError: the probe could not be written or read.
    """
    probe = join(folder, f"clock-{uuid.uuid4().hex}")
    write_bytes(probe, b"")
    try:
        return modified_at(probe)
    finally:
        delete(probe)


def _keep(name: str, suffixes: tuple[str, ...] | None) -> bool:
    if name.startswith(TEMP_PREFIX):
        return False  # an atomic write in progress (or abandoned by a crash)
    return not suffixes or name.lower().endswith(tuple(s.lower() for s in suffixes))


def list_files(location: str, suffixes: tuple[str, ...] | None = None) -> list[FileInfo]:
    """Every file under a location (recursively), sorted by URI, each with its size and version.

    The version is the object's ETag on S3 (it changes when the content does), the mtime in ns
    locally.

    Args:
        location: a folder or prefix.
        suffixes: keep only names ending with one of these (case-insensitive).

    Raises:
        FileNotFoundError: the location does not exist.
    """
    if is_s3(location):
        fs = _s3fs()
        found = retry(lambda: fs.find(_s3_path(location), detail=True), f"list {location}")
        if not found and not exists(location):
            raise FileNotFoundError(f"nothing at {location}")
        out = [FileInfo(uri="s3://" + name, size=int(info["size"]), version=_etag(info))
               for name, info in found.items()
               if info["type"] == "file" and not name.endswith("/") and _keep(posixpath.basename(name), suffixes)]
        return sorted(out, key=lambda f: f.uri)
    fs, path = resolve(location)
    root_info = retry(lambda: fs.get_file_info(path), f"stat {location}")
    if root_info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"nothing at {location}")
    selector = pafs.FileSelector(path, recursive=True)
    infos = retry(lambda: fs.get_file_info(selector), f"list {location}")
    out = [FileInfo(uri=info.path, size=int(info.size or 0), version=str(info.mtime_ns or ""))
           for info in infos if info.type == pafs.FileType.File and _keep(info.base_name, suffixes)]
    return sorted(out, key=lambda f: f.uri)


def makedirs(location: str) -> None:
    if not is_s3(location):  # S3 has no folders: a prefix exists once an object is under it
        fs, path = resolve(location)
        retry(lambda: fs.create_dir(path, recursive=True), f"create {location}")


class _RawAdapter(io.RawIOBase):
    """Let ``io.BufferedReader`` read ahead over a pyarrow random-access file (local files)."""

    def __init__(self, native: pa.NativeFile):
        self._native = native

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self._native.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._native.seek(offset, whence)

    def tell(self) -> int:
        return self._native.tell()

    def close(self) -> None:
        self._native.close()
        super().close()


def open_input(location: str, buffer_size: int | None = None) -> BinaryIO:
    """Open a file for reading: seekable, buffered, usable as a plain Python file object (PyAV's input).

    On S3 an s3fs file that reads ahead ``buffer_size`` bytes per ranged GET
    (``S3_VIDEO_BLOCK_SIZE`` by default) with the ``S3_VIDEO_CACHE`` strategy, the pair measured
    on video decoding; each GET is conditional on the ETag seen at open, so a file replaced
    mid-read fails instead of mixing two versions. Locally a 1 MiB ``io.BufferedReader``.

    Raises:
        FileNotFoundError: there is no file at the location.
        StorageError: the store kept failing.
    """
    if is_s3(location):
        fs = _s3fs()
        block_size = buffer_size or S3_VIDEO_BLOCK_SIZE
        # Block caches keep at most S3_VIDEO_MAX_BLOCKS blocks per open file (s3fs's default is 32).
        options = {"maxblocks": S3_VIDEO_MAX_BLOCKS} if S3_VIDEO_CACHE in ("background", "blockcache") else {}
        return retry(lambda: fs.open(_s3_path(location), "rb", block_size=block_size, cache_type=S3_VIDEO_CACHE,
                                     cache_options=options), f"open {location}")
    fs, path = resolve(location)
    native = retry(lambda: fs.open_input_file(path), f"open {location}")
    return io.BufferedReader(_RawAdapter(native), buffer_size=buffer_size or (1 << 20))


def read_bytes(location: str) -> bytes:
    if is_s3(location):
        fs = _s3fs()
        return retry(lambda: fs.cat_file(_s3_path(location)), f"read {location}")
    fs, path = resolve(location)

    def _read() -> bytes:
        with fs.open_input_stream(path) as f:
            return f.read()

    return retry(_read, f"read {location}")


def _fsync_dir(folder: str) -> None:
    """Make a folder's entries durable: a rename or link inside it survives a power loss once this returns."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: this filesystem cannot sync a folder (nothing more to do)
            raise
    finally:
        os.close(fd)


def _makedirs_durable(folder: str) -> None:
    """``os.makedirs(folder, exist_ok=True)``, then sync the parent of every folder it created."""
    missing = []
    probe = folder
    while probe and not os.path.isdir(probe):
        missing.append(probe)
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not missing:
        return
    os.makedirs(folder, exist_ok=True)
    for created in reversed(missing):
        _fsync_dir(os.path.dirname(created))


def write_bytes(location: str, data: bytes, durable: bool = True) -> None:
    """Write a whole file atomically (temporary name + rename locally; one upload on S3).

    Locally the data is fsynced before the rename and the folder after it, so that once this
    returns the file survives a power loss, and a file written after it can never outlive it.
    ``durable=False`` skips the fsyncs (still atomic): for scratch files a crash may lose.
    """
    if is_s3(location):
        fs = _s3fs()
        retry(lambda: fs.pipe_file(_s3_path(location), data), f"write {location}")
        return
    _, path = resolve(location)

    def _write() -> None:
        _makedirs_durable(os.path.dirname(path))
        # The ".partial" suffix keeps globs like "*.parquet" off an unfinished file.
        tmp = os.path.join(os.path.dirname(path), f"{TEMP_PREFIX}{uuid.uuid4().hex}-{os.path.basename(path)}.partial")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                if durable:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, path)
            if durable:
                _fsync_dir(os.path.dirname(path))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    retry(_write, f"write {location}")


def create_if_absent(location: str, data: bytes) -> bool:
    """Write a whole file only if nothing is there yet; of two writers exactly one gets True.

    Locally the content goes to a temporary file (fsynced) that is hard-linked into place:
    ``link`` fails if the name exists, so the file is complete the moment it appears; the folder is
    fsynced after the link, so the file survives a power loss once this returns True. On S3 it
    is s3fs's exclusive create, ``pipe_file(mode="create")``: one ``PutObject`` with
    ``If-None-Match: *`` (AWS S3, MinIO, moto), which the store itself decides. (s3fs's
    ``open(path, "xb")`` is not used: it commits an empty file with an unconditional PUT.)

    Returns:
        True if this call created the file, False if one was already there.

    Raises:
        StorageError: the store failed otherwise.
    """
    if is_s3(location):
        return _s3_create_if_absent(location, data)
    _, path = resolve(location)
    folder = os.path.dirname(path)
    _makedirs_durable(folder)
    tmp = os.path.join(folder, f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        _fsync_dir(folder)
        return True
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _s3_error_code(err: BaseException) -> str:
    """The S3 error code (``PreconditionFailed``, ...) behind an exception s3fs raised, or ""."""
    while err is not None:
        response = getattr(err, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
        err = err.__cause__
    return ""


def _s3_create_if_absent(location: str, data: bytes, attempts: int = 4) -> bool:
    """One conditional ``PutObject``; a 409 ``ConditionalRequestConflict`` (a concurrent conditional
    write still in flight on AWS) is retried, as AWS advises, until the store says who won."""
    fs = _s3fs()
    for attempt in range(attempts):
        try:
            fs.pipe_file(_s3_path(location), data, mode="create")
            return True
        except FileExistsError:  # 412 with Condition If-None-Match (AWS)
            return False
        except OSError as err:
            code = _s3_error_code(err)
            if code == "PreconditionFailed":  # 412 from a store that does not name the condition (moto)
                return False
            if code == "ConditionalRequestConflict" and attempt < attempts - 1:
                time.sleep(0.2 * (2**attempt))
                continue
            if code == "ConditionalRequestConflict":
                return False  # the other writer's request is still deciding it: never two winners
            raise StorageError(f"create {location}: {err}") from err
    raise AssertionError("unreachable")


def remove_temporaries(location: str) -> int:
    """Delete the temporaries that writes killed mid-way left in a local folder; S3 has none.

    Returns:
        How many were removed.
    """
    if is_s3(location):
        return 0
    _, path = resolve(location)
    if not os.path.isdir(path):
        return 0
    removed = 0
    for name in os.listdir(path):
        if name.startswith(TEMP_PREFIX):
            try:
                os.remove(os.path.join(path, name))
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def read_json(location: str) -> dict:
    return json.loads(read_bytes(location).decode("utf-8"))


def write_json(location: str, obj) -> None:
    write_bytes(location, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_table(location: str, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet file or a folder of Parquet files (hidden and ``_`` files ignored).

    Raises:
        FileNotFoundError: nothing at the location.
    """
    if not exists(location):
        raise FileNotFoundError(f"no table at {location}")
    fs, path = resolve(location)
    return retry(lambda: pq.read_table(path, filesystem=fs, columns=columns), f"read table {location}")


def write_table(table: pa.Table, location: str, durable: bool = True) -> None:
    """Write one Parquet file atomically (``durable``: as ``write_bytes``)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(location, sink.getvalue().to_pybytes(), durable=durable)


def delete(location: str) -> None:
    """Delete a file or a whole folder/prefix (never the bucket itself); a missing location is not an error."""
    if is_s3(location):
        found = _s3_info(location)
        if found is None:
            return
        fs, path = _s3fs(), _s3_path(location)
        if found["type"] == "directory":
            keys = retry(lambda: fs.find(path), f"list {location}")
            if keys:
                retry(lambda: fs.rm(keys), f"delete {location}")
        else:
            retry(lambda: fs.rm_file(path), f"delete {location}")
        return
    fs, path = resolve(location)
    info = retry(lambda: fs.get_file_info(path), f"stat {location}")
    if info.type == pafs.FileType.Directory:
        retry(lambda: fs.delete_dir(path), f"delete {location}")
    elif info.type == pafs.FileType.File:
        retry(lambda: fs.delete_file(path), f"delete {location}")


def download_dir(location: str, local_dir: str) -> None:
    """Copy a folder/prefix to a local folder."""
    if is_s3(location):
        fs, root = _s3fs(), _s3_path(location)
        for found in list_files(location):
            inner = _s3_path(found.uri)
            target = os.path.join(local_dir, *posixpath.relpath(inner, root).split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            retry(lambda: fs.get_file(inner, target), f"download {found.uri}")
        return
    fs, path = resolve(location)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def upload_dir(local_dir: str, location: str) -> None:
    """Copy a local folder to a location; every file lands atomically."""
    for root, _, files in os.walk(local_dir):
        for name in sorted(files):
            src = os.path.join(root, name)
            rel = os.path.relpath(src, local_dir).replace(os.sep, "/")
            with open(src, "rb") as f:
                write_bytes(join(location, *rel.split("/")), f.read())


def iter_lines(location: str) -> Iterator[str]:
    for line in read_bytes(location).decode("utf-8").splitlines():
        yield line


def presigned_url(location: str, expires_s: int = 7 * 24 * 3600) -> str:
    """An HTTP(S) URL that reads the ``s3://`` object ``location`` for ``expires_s`` seconds.

    The URL is signed locally by s3fs (no request is made) with the credentials of the AWS
    default chain now (see ``_s3fs``); it carries a signature and the access key's id, never
    the secret key. SigV4 allows at most 7 days (604800 s).

    Raises:
        ValueError: ``location`` is not an ``s3://`` object, or ``expires_s`` is not in [1, 604800].
    """
    if not is_s3(location):
        raise ValueError(f"presigned_url needs an s3:// location, got {location!r}")
    if not isinstance(expires_s, int) or not 1 <= expires_s <= 7 * 24 * 3600:
        raise ValueError(f"expires_s must be an integer in [1, 604800] (SigV4's limit), got {expires_s!r}")
    _check_scheme(location)
    if not urlparse(location).path.lstrip("/"):
        raise ValueError(f"presigned_url needs an object key, got the bucket {location!r}")
    return _s3fs().url(_s3_path(location), expires=expires_s)
