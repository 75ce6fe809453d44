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
