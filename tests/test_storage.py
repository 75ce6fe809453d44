import os

import pyarrow as pa
import pytest

from rnnimg import storage


def test_local_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    target = str(tmp_path / "a" / "b.bin")
    storage.write_bytes(target, b"one")
    storage.write_bytes(target, b"two")
    assert storage.read_bytes(target) == b"two"
    assert os.listdir(tmp_path / "a") == ["b.bin"]


def test_listing_skips_only_unfinished_atomic_writes(tmp_path):
    for name in ("x.mp4", "sub/y.MP4", ".tmp-1-z.mp4", "_raw.mp4", "..odd.mp4", "notes.txt"):
        storage.write_bytes(str(tmp_path / name), b"1")
    names = [os.path.relpath(f.uri, tmp_path) for f in storage.list_files(str(tmp_path), (".mp4",))]
    assert names == ["..odd.mp4", "_raw.mp4", "sub/y.MP4", "x.mp4"]


def test_a_colon_in_a_relative_path_is_not_a_scheme(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.write_bytes("clip:1.mp4", b"data")
    assert storage.read_bytes("clip:1.mp4") == b"data"


def test_missing_location_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.list_files(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError):
        storage.read_table(str(tmp_path / "missing"))


@pytest.mark.parametrize("location", ["ftp://host/x", "s3://", "", "gs://bucket/x"])
def test_unsupported_locations_are_refused(location):
    with pytest.raises(ValueError):
        storage.resolve(location)


@pytest.mark.parametrize("name, key", [("clip 1.mp4", "clip_1.mp4"), ("vidéo.mp4", "vid_o.mp4"), ("-rf.mp4", "rf.mp4"), ("../../etc/passwd", "_.._etc_passwd")])
def test_safe_key_never_escapes_its_prefix(name, key):
    assert storage.safe_key(name) == key
    assert "/" not in storage.safe_key(name)


@pytest.mark.parametrize("name", ["..", ".", "", "..."])
def test_safe_key_refuses_names_with_nothing_safe(name):
    with pytest.raises(storage.UnsafeKeyError):
        storage.safe_key(name)


@pytest.mark.s3
def test_s3_round_trip_tables_listing_and_buffered_reads(s3_bucket):
    prefix = s3_bucket + "/data"
    storage.write_bytes(prefix + "/v/a.mp4", b"0123456789" * 1000)
    storage.write_bytes(prefix + "/v/b.mp4", b"x")
    storage.write_table(pa.table({"n": [1, 2, 3]}), prefix + "/t/part-0.parquet")
    assert [f.uri for f in storage.list_files(prefix + "/v")] == [prefix + "/v/a.mp4", prefix + "/v/b.mp4"]
    assert storage.read_table(prefix + "/t").column("n").to_pylist() == [1, 2, 3]
    with storage.open_input(prefix + "/v/a.mp4") as f:
        f.seek(9995)
        assert f.read(5) == b"56789"
        f.seek(3)
        assert f.read(4) == b"3456"
    assert storage.exists(prefix + "/v/a.mp4") and not storage.exists(prefix + "/v/zz.mp4")
    storage.delete(prefix + "/v")
    assert not storage.exists(prefix + "/v/a.mp4")


@pytest.mark.s3
def test_s3_missing_bucket_is_a_clear_error(s3_server):
    with pytest.raises((FileNotFoundError, storage.StorageError, OSError)):
        storage.read_bytes("s3://no-such-bucket-rnnimg/x")


def test_temporaries_of_killed_writes_are_removable_and_never_look_like_tables(tmp_path):
    storage.write_bytes(str(tmp_path / "t" / "shard-00000.parquet"), b"whole")
    (tmp_path / "t" / ".tmp-abc-shard-00001.parquet.partial").write_bytes(b"half")
    assert [p.name for p in (tmp_path / "t").glob("*.parquet")] == ["shard-00000.parquet"]
    assert storage.remove_temporaries(str(tmp_path / "t")) == 1
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == ["shard-00000.parquet"]


def _record_fsyncs(monkeypatch) -> list[str]:
    """Paths of every fsynced file descriptor, in order."""
    synced: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return synced


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor")
def test_local_writes_fsync_the_folder_after_the_rename(tmp_path, monkeypatch):
    folder = tmp_path / "out" / "tables"
    folder.mkdir(parents=True)
    synced = _record_fsyncs(monkeypatch)
    storage.write_bytes(str(folder / "shard.parquet"), b"table")
    assert [os.path.basename(p).startswith(".tmp-") for p in synced] == [True, False]  # the data, then ...
    assert synced[1] == str(folder)  # ... the folder holding its new name
    synced.clear()
    assert storage.create_if_absent(str(folder / "commit.json"), b"{}")
    assert os.path.basename(synced[0]).startswith(".tmp-") and synced[1:] == [str(folder)]
    synced.clear()
    assert not storage.create_if_absent(str(folder / "commit.json"), b"{}")  # lost the race: nothing linked
    assert [os.path.basename(p).startswith(".tmp-") for p in synced] == [True]


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc to name a file descriptor")
def test_a_write_into_new_folders_makes_each_new_folder_durable(tmp_path, monkeypatch):
    synced = _record_fsyncs(monkeypatch)
    storage.write_bytes(str(tmp_path / "a" / "b" / "x.bin"), b"1")
    # tmp_path gained "a", "a" gained "b" (synced when created), then the file's rename in "b".
    assert synced[:2] == [str(tmp_path), str(tmp_path / "a")]
    assert os.path.basename(synced[2]).startswith(".tmp-") and synced[3:] == [str(tmp_path / "a" / "b")]


@pytest.mark.s3
def test_s3_version_is_the_etag_it_changes_with_the_content_and_not_on_a_relisting(s3_bucket, s3_server):
    import hashlib

    import boto3

    uri = s3_bucket + "/v/a.mp4"
    storage.write_bytes(uri, b"first content")
    first = storage.list_files(s3_bucket + "/v")
    head = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").head_object(
        Bucket=s3_bucket[len("s3://"):], Key="v/a.mp4")
    assert first[0].version == head["ETag"].strip('"') == hashlib.md5(b"first content").hexdigest()  # a one-part PUT
    assert storage.stat(uri) == first[0]
    assert storage.list_files(s3_bucket + "/v") == first  # listing again changes nothing
    storage.write_bytes(uri, b"other content")
    second = storage.list_files(s3_bucket + "/v")
    assert second[0].version != first[0].version and storage.stat(uri).version == second[0].version
    storage.write_bytes(uri, b"first content")  # the same bytes again: the same version, nothing to relabel
    assert storage.list_files(s3_bucket + "/v")[0].version == first[0].version


@pytest.mark.s3
def test_s3_listings_are_never_served_from_a_cache(s3_bucket, s3_server):
    """Another writer (here boto3, as another process would) changes the prefix between two listings."""
    import boto3

    other = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    bucket = s3_bucket[len("s3://"):]
    prefix = s3_bucket + "/lock"
    storage.write_bytes(prefix + "/a.json", b"1")
    assert [storage.basename(f.uri) for f in storage.list_files(prefix)] == ["a.json"]
    assert storage.exists(prefix + "/a.json") and storage.is_dir(prefix)
    other.put_object(Bucket=bucket, Key="lock/b.json", Body=b"2")
    other.delete_object(Bucket=bucket, Key="lock/a.json")
    assert [storage.basename(f.uri) for f in storage.list_files(prefix)] == ["b.json"]
    assert not storage.exists(prefix + "/a.json") and storage.exists(prefix + "/b.json")
    storage.delete(prefix)
    with pytest.raises(FileNotFoundError):
        storage.list_files(prefix)
    assert storage.list_files(s3_bucket) == []  # the bucket itself is never deleted


@pytest.mark.s3
def test_s3_prefix_listing_stops_at_the_folder_boundary_and_skips_temporaries(s3_bucket):
    for name in ("v/a.mp4", "v/sub/b.MP4", "v/.tmp-1-c.mp4", "video.mp4", "v/notes.txt"):
        storage.write_bytes(f"{s3_bucket}/{name}", b"1")
    assert [f.uri for f in storage.list_files(s3_bucket + "/v/", (".mp4",))] == [f"{s3_bucket}/v/a.mp4", f"{s3_bucket}/v/sub/b.MP4"]


@pytest.mark.s3
def test_s3_read_ahead_returns_the_same_bytes_whatever_the_seeks(s3_bucket):
    import random

    data = os.urandom(5 * 65536 + 123)
    uri = s3_bucket + "/blob.bin"
    storage.write_bytes(uri, data)
    rng = random.Random(7)
    with storage.open_input(uri, buffer_size=65536) as f:  # small blocks: reads cross block boundaries
        assert f.read(10) == data[:10] and f.tell() == 10
        position = 10
        for _ in range(200):
            whence = rng.choice([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
            target = rng.randrange(len(data) + 1)
            offset = {os.SEEK_SET: target, os.SEEK_CUR: target - position, os.SEEK_END: target - len(data)}[whence]
            assert f.seek(offset, whence) == target
            size = rng.choice([1, 100, 4096, 65536, 200_000])
            assert f.read(size) == data[target:target + size]
            position = f.tell()
            assert position == min(len(data), target + size)
        f.seek(0)
        assert f.read() == data


@pytest.mark.s3
@pytest.mark.parametrize("faststart", [False, True], ids=["index-at-end", "faststart"])
def test_pyav_decodes_and_seeks_through_s3_read_ahead_as_from_disk(s3_bucket, tmp_path, faststart):
    import av
    import numpy as np

    from tests.media import code_frame, frame_code, write_video

    frames = np.stack([code_frame(i, (64, 96)) for i in range(80)])
    path = write_video(str(tmp_path / "v.mp4"), frames, fps=10,
                       container_options={"movflags": "faststart"} if faststart else None)
    uri = s3_bucket + "/v.mp4"
    with open(path, "rb") as f:
        storage.write_bytes(uri, f.read())

    def decode(source, seek_s: float) -> list[int]:
        with av.open(source) as container:
            stream = container.streams.video[0]
            codes = [frame_code(frame.to_ndarray(format="rgb24")) for frame in container.decode(stream)]
            container.seek(int(seek_s / stream.time_base), stream=stream, backward=True)
            return codes + [frame_code(next(container.decode(stream)).to_ndarray(format="rgb24"))]

    local = decode(path, 5.0)
    assert local[:80] == list(range(80))
    with storage.open_input(uri, buffer_size=4096) as f:  # a block far smaller than the file: many ranged reads
        assert decode(f, 5.0) == local


def test_presigned_urls_follow_the_identity_of_the_environment(monkeypatch):
    from urllib.parse import parse_qs, urlparse

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: signing makes no request
    keys = []
    for key_id in ("AKIAFIRSTIDENTITY", "AKIASECONDIDENTITY"):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"secret-of-{key_id}")
        url = storage.presigned_url("s3://bucket/a.mp4", 60)
        keys.append(parse_qs(urlparse(url).query)["X-Amz-Credential"][0].split("/")[0])
        assert "secret-of" not in url
    assert keys == ["AKIAFIRSTIDENTITY", "AKIASECONDIDENTITY"]
