"""Every input ends as one row: ok, partial (the clips before the error kept) or failed.

Most tests call the decode UDF ``rnnimg.label.decode_video`` directly (no Ray) on media the
test makes, and check its final status row and its clip rows. One test labels a folder of
all of it through ``rnnimg.label.label`` on the session's local Ray. Storage failures:
a file deleted after the listing, a read that breaks mid-stream, and ``storage.retry``.
"""

from __future__ import annotations

import io
import os
import shutil
from dataclasses import dataclass

import numpy as np
import pytest

from rnnimg import storage
from rnnimg.video.clips import ClipSpec, uniform_clips
from tests.media import (
    code_frame,
    corrupt_file,
    frame_code,
    index_frame,
    truncate_file,
    write_streams,
    write_video,
)

# The untrained model's clip plan (CRNNConfig defaults): 2-second clips of 8 frames, every 2 s.
SPEC = ClipSpec(clip_seconds=2.0, frames_per_clip=8, stride_seconds=2.0)
FRAME_SIZE = 16
FPS = 10


@dataclass(frozen=True)
class Expect:
    """What the videos table must say about one input."""

    status: str
    error_types: tuple[str, ...] = ()  # accepted error_type values (empty: none, the video is ok)
    clips: int | None = None  # exact clip count, when known; partial rows check 0 < clips < planned
    planned: int | None = None  # clips the declared duration plans (partial rows)


def _counting(seconds: float, size=(48, 64)) -> np.ndarray:
    return np.stack([code_frame(i, size) for i in range(int(seconds * FPS))])


def _faststart_mp4(path: str, seconds: float) -> str:
    """Index (moov) at the front: a cut copy still opens and decodes up to the cut."""
    return write_video(path, _counting(seconds), fps=FPS, container_options={"movflags": "faststart"})


def make_bad_media(folder: str) -> dict[str, Expect]:
    """Write every kind of input into ``folder``; return {file name: expected row}."""
    os.makedirs(folder, exist_ok=True)
    p = lambda name: os.path.join(folder, name)  # noqa: E731
    expect: dict[str, Expect] = {}

    write_video(p("good.mp4"), _counting(6.0), fps=FPS)
    expect["good.mp4"] = Expect("ok", clips=3)

    open(p("empty.mp4"), "wb").close()
    expect["empty.mp4"] = Expect("failed", ("empty",), clips=0)
    with open(p("random.mkv"), "wb") as f:
        f.write(np.random.default_rng(7).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    expect["random.mkv"] = Expect("failed", ("open", "no_video_stream"), clips=0)
    with open(p("notes.mp4"), "w") as f:
        f.write("this is a text file with a video extension\n" * 20)
    expect["notes.mp4"] = Expect("failed", ("open",), clips=0)

    # Cut in half: with the index at the front the first half decodes (partial); with the index
    # at the end (the default) nothing can be opened (failed).
    full = _faststart_mp4(p("_full-faststart.mp4"), 10.0)
    truncate_file(full, p("cut-faststart.mp4"), 0.5)
    expect["cut-faststart.mp4"] = Expect("partial", ("truncated",), planned=5)
    plain = write_video(p("_full-plain.mp4"), _counting(10.0), fps=FPS)
    truncate_file(plain, p("cut-index-at-end.mp4"), 0.5)
    expect["cut-index-at-end.mp4"] = Expect("failed", ("open",), clips=0)
    # Noise over packets in the middle: the decoder either conceals it or stops there.
    corrupt_file(full, p("corrupt.mp4"), at=0.5, length=1500, seed=1)
    expect["corrupt.mp4"] = Expect("ok|partial", ("decode", "truncated"), planned=5)
    for name in ("_full-faststart.mp4", "_full-plain.mp4"):
        os.remove(p(name))

    write_streams(p("audio-only.mp4"), audio_seconds=2.0)
    expect["audio-only.mp4"] = Expect("failed", ("no_video_stream",), clips=0)
    write_streams(p("cover-only.mp4"), audio_seconds=2.0, cover=np.full((48, 64, 3), 128, np.uint8))
    expect["cover-only.mp4"] = Expect("failed", ("no_video_stream",), clips=0)

    # Decodable oddities: all ok, with every clip.
    write_video(p("raw stream.h264"), _counting(4.0), fps=FPS, container_format="h264")
    expect["raw stream.h264"] = Expect("ok", clips=2)
    write_video(p("rotated.mp4"), _counting(4.0), fps=FPS, rotation=90)
    expect["rotated.mp4"] = Expect("ok", clips=2)
    write_video(p("ten-bit.mkv"), _counting(4.0), fps=FPS, pix_fmt="yuv420p10le")
    expect["ten-bit.mkv"] = Expect("ok", clips=2)
    write_video(p("odd 321x241.mkv"), np.stack([index_frame(i % 32, (241, 321)) for i in range(40)]), fps=FPS,
                pix_fmt="yuv444p")
    expect["odd 321x241.mkv"] = Expect("ok", clips=2)
    write_streams(p("two-videos.mkv"), videos=[_counting(4.0), _counting(6.0, (32, 32))], audio_seconds=1.0)
    expect["two-videos.mkv"] = Expect("ok", clips=2)
    for name in ("my video.mp4", "vidéo 東京.mp4", "-rf.mp4", "a..b.mp4"):
        write_video(p(name), _counting(4.0), fps=FPS)
        expect[name] = Expect("ok", clips=2)
    return expect


@pytest.fixture(scope="module")
def bad_media(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bad media"))
    return folder, make_bad_media(folder)


def decode_rows(video_uri: str, spec: ClipSpec = SPEC) -> tuple[dict, list[tuple[int, np.ndarray]]]:
    """Run the decode UDF on one video: (its status row, [(clip_index, frames)])."""
    from rnnimg.label import decode_video

    batch = {"video_uri": np.array([video_uri], dtype=object), "shard": np.array([0])}
    status, clips = [], []
    for out in decode_video(batch, spec.to_dict(), FRAME_SIZE, 2):
        for j in range(len(out["video_uri"])):
            assert out["video_uri"][j] == video_uri
            if out["is_status"][j]:
                status.append({k: out[k][j] for k in ("status", "error_type", "error", "duration_s", "clips")})
            else:
                clips.append((int(out["clip_index"][j]), out["frames"][j]))
    assert len(status) == 1, "exactly one status row per video"
    return status[0], clips


def check_row(name: str, row: dict, clips: int, expect: Expect) -> None:
    """The row says what happened: status, error type, clip count, and an error naming the video."""
    statuses = expect.status.split("|")
    assert row["status"] in statuses, (name, row)
    if row["status"] == "ok":
        assert row["error_type"] in ("", None) and row["error"] in ("", None), (name, row)
        if expect.clips is not None:
            assert clips == expect.clips, (name, row)
        if expect.planned is not None:
            assert clips == expect.planned, (name, row)
    else:
        assert row["error_type"] in expect.error_types, (name, row)
        assert name in row["error"], (name, row)  # the message names the video
        if row["status"] == "failed":
            assert clips == 0
        else:
            assert 0 < clips < expect.planned, (name, row)
    assert int(row["clips"]) == clips


def test_every_input_gets_one_truthful_row(bad_media):
    folder, expect = bad_media
    for name, wanted in sorted(expect.items()):
        row, clips = decode_rows(os.path.join(folder, name))
        check_row(name, row, len(clips), wanted)
        # The clips that were kept are the first ones, in order, with the right frames.
        assert [i for i, _ in clips] == list(range(len(clips))), name
        if name in ("good.mp4", "cut-faststart.mp4", "my video.mp4", "-rf.mp4"):
            plan = uniform_clips(10.0, SPEC)
            for i, frames in clips:
                assert [frame_code(f) for f in frames] == [int(np.floor(t * FPS + 1e-9)) for t in plan[i].timestamps], name


def test_cut_file_with_index_at_the_front_keeps_the_clips_before_the_cut(bad_media):
    folder, _ = bad_media
    row, clips = decode_rows(os.path.join(folder, "cut-faststart.mp4"))
    assert row["status"] == "partial" and row["error_type"] == "truncated"
    assert row["duration_s"] == pytest.approx(10.0)  # the declared duration, from the index
    assert len(clips) >= 1 and "cut short" in row["error"]


@pytest.mark.parametrize("container_format,suffix", [("matroska", "mkv"), ("flv", "flv"), ("avi", "avi"), ("mpegts", "ts")])
def test_a_file_cut_in_half_in_other_containers(tmp_path, container_format, suffix):
    full = write_video(str(tmp_path / f"full.{suffix}"), _counting(10.0), fps=FPS, container_format=container_format)
    cut = truncate_file(full, str(tmp_path / f"cut.{suffix}"), 0.5)
    row, clips = decode_rows(cut)
    plan = uniform_clips(10.0, SPEC)
    for i, frames in clips:
        # AVI stores no presentation times; FFmpeg's reconstruction puts the first frame one
        # frame period after the stream start, so every frame is shown one slot late.
        late = 1 if suffix == "avi" else 0
        assert [frame_code(f) for f in frames] == [max(0, int(np.floor(t * FPS + 1e-9)) - late) for t in plan[i].timestamps]
    if suffix == "ts":
        # MPEG-TS declares no length: the duration is estimated from the timestamps that are
        # there, so the cut file is a shorter, complete video.
        assert row["status"] == "ok" and row["duration_s"] < 6.0 and len(clips) == 2
    else:
        assert (row["status"], row["error_type"]) == ("partial", "truncated"), row
        assert 1 <= len(clips) < 5


def test_zero_byte_file_is_failed_as_empty(bad_media):
    folder, _ = bad_media
    row, _ = decode_rows(os.path.join(folder, "empty.mp4"))
    assert (row["status"], row["error_type"]) == ("failed", "empty") and "0 bytes" in row["error"]
    assert np.isnan(row["duration_s"])


def test_audio_only_is_failed_with_no_video_stream(bad_media):
    folder, _ = bad_media
    row, _ = decode_rows(os.path.join(folder, "audio-only.mp4"))
    assert (row["status"], row["error_type"]) == ("failed", "no_video_stream")
    assert "no video stream" in row["error"] and "audio" in row["error"]


def test_names_with_spaces_unicode_dashes_and_dots_go_through_the_label_path(tmp_path):
    frames = _counting(4.0)
    nested = tmp_path / "a b" / "sub"
    nested.mkdir(parents=True)
    for name in ("my video.mp4", "vidéo 東京 (1).mp4", "-rf --all.mp4", "..hidden.mp4", "x..y.mp4", "50% #1?.mp4"):
        path = write_video(str(nested / name), frames, fps=FPS)
        row, clips = decode_rows(path)
        assert (row["status"], len(clips)) == ("ok", 2), (name, row)
    # A path with a ".." component is resolved like any local path.
    dotted = os.path.join(str(tmp_path), "a b", "sub", "..", "sub", "my video.mp4")
    row, clips = decode_rows(dotted)
    assert (row["status"], len(clips)) == ("ok", 2)


# ----------------------------------------------------------------------------- storage


def test_video_deleted_between_listing_and_decoding_is_failed_not_found(tmp_path):
    path = write_video(str(tmp_path / "gone.mp4"), _counting(4.0), fps=FPS)
    listed = [f.uri for f in storage.list_files(str(tmp_path))]
    assert listed == [path]
    os.remove(path)
    row, clips = decode_rows(listed[0])
    assert (row["status"], row["error_type"], clips) == ("failed", "not_found", [])
    assert "gone.mp4" in row["error"] and np.isnan(row["duration_s"])


class _BreakingRaw(io.RawIOBase):
    """A file whose reads fail (connection reset) once ``limit`` bytes have been read."""

    def __init__(self, path: str, limit: int):
        self._f = open(path, "rb", buffering=0)
        self._limit = limit
        self._read = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._read >= self._limit:
            raise ConnectionResetError("connection reset by peer")
        n = self._f.readinto(buffer)
        self._read += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def close(self) -> None:
        self._f.close()
        super().close()


def test_a_read_that_breaks_mid_stream_is_a_storage_error_after_the_clips_before_it(tmp_path, monkeypatch):
    noisy = np.random.default_rng(0).integers(0, 256, (100, 48, 64, 3), dtype=np.uint8)
    path = write_video(str(tmp_path / "remote.mp4"), noisy, fps=FPS, options={"crf": "18", "preset": "ultrafast"},
                       container_options={"movflags": "faststart"})
    limit = os.path.getsize(path) // 2
    monkeypatch.setattr(storage, "open_input", lambda uri, buffer_size=4096: io.BufferedReader(_BreakingRaw(uri, limit), buffer_size))
    row, clips = decode_rows(path)
    assert (row["status"], row["error_type"]) == ("partial", "storage"), row
    assert 0 < len(clips) < 5 and "connection reset" in row["error"]


def test_transient_open_failures_are_retried_and_the_video_decodes(tmp_path, monkeypatch):
    path = write_video(str(tmp_path / "flaky.mp4"), _counting(4.0), fps=FPS)
    real_resolve = storage.resolve
    failures = {"left": 2}
    sleeps: list[float] = []

    class FlakyFS:
        def __init__(self, fs):
            self._fs = fs

        def open_input_file(self, inner_path):
            if failures["left"]:
                failures["left"] -= 1
                raise TimeoutError("read timed out")
            return self._fs.open_input_file(inner_path)

    monkeypatch.setattr(storage, "resolve", lambda location: (lambda fs, p: (FlakyFS(fs), p))(*real_resolve(location)))
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    row, clips = decode_rows(path)
    assert (row["status"], len(clips)) == ("ok", 2)
    assert sleeps == [0.2, 0.4]  # two failures, two growing waits


def test_retry_backs_off_exponentially_then_gives_up_with_a_storage_error(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    calls = []

    def always_failing():
        calls.append(1)
        raise ConnectionResetError("connection reset by peer")

    with pytest.raises(storage.StorageError, match=r"read s3://b/v.mp4: connection reset"):
        storage.retry(always_failing, "read s3://b/v.mp4", attempts=4, base_delay_s=0.5)
    assert len(calls) == 4 and sleeps == [0.5, 1.0, 2.0]

    outcomes = iter([OSError("slow down"), OSError("slow down"), "data"])

    def flaky():
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    sleeps.clear()
    assert storage.retry(flaky, "read", attempts=4, base_delay_s=0.1) == "data"
    assert sleeps == [0.1, 0.2]


def test_retry_does_not_retry_a_missing_object(monkeypatch):
    sleeps: list[float] = []
    monkeypatch.setattr(storage.time, "sleep", sleeps.append)
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        storage.retry(missing, "read")
    assert calls == [1] and sleeps == []


# ----------------------------------------------------------------------------- the whole job


@pytest.mark.ray
def test_label_job_gives_every_input_exactly_one_row(ray_local, bad_media, untrained_model, tmp_path):
    """All of the above through Ray Data, plus a manifest row whose video was deleted."""
    import pyarrow.dataset as pads

    from rnnimg.label import LabelConfig, label

    folder, expect = bad_media
    videos = tmp_path / "archive with bad media"
    shutil.copytree(folder, videos)
    gone = write_video(str(tmp_path / "gone.mp4"), _counting(4.0), fps=FPS)
    manifest = tmp_path / "listing.csv"
    manifest.write_text(f"video_uri\n{gone}\n")
    os.remove(gone)  # listed, then deleted before decoding

    result = label([str(videos), str(manifest)], untrained_model, str(tmp_path / "labels"), LabelConfig(videos_per_shard=6, batch_size=8))

    rows = pads.dataset(str(tmp_path / "labels" / "videos")).to_table().to_pylist()
    clip_uris = pads.dataset(str(tmp_path / "labels" / "clips")).to_table(columns=["video_uri"]).column("video_uri").to_pylist()
    wanted = {os.path.join(str(videos), name): e for name, e in expect.items()}
    wanted[gone] = Expect("failed", ("not_found",), clips=0)
    assert sorted(r["video_uri"] for r in rows) == sorted(wanted)  # exactly one row per input, none missing
    assert result.videos == len(wanted)
    for row in rows:
        uri = row["video_uri"]
        check_row(os.path.basename(uri), {**row, "error": row["error"] or ""}, clip_uris.count(uri), wanted[uri])
