"""A file that lies in its header is refused at open as ``limits``, and costs what its bytes cost.

A header costs nothing to write: one small Matroska file claiming centuries made the label job's
probe task grow to 20 GB. Each hostile file here is made by the test from a small honest one:

- ``centuries.mkv``: the Segment Info Duration patched to 10^10 s, the per-stream DURATION tag renamed;
- ``six-days.mkv``: the same lie at 6 days (under the absolute cap), in 2 KB of bytes;
- ``16000x16000.avi``: MJPEG whose AVI headers and JPEG frame headers all claim 16000x16000;
- ``100-streams.mkv``: 100 one-frame MJPEG streams.

Peak memory is measured in a fresh process (``VmHWM``, else ``ru_maxrss``) that opens the file and tries to
read it. Raw streams without a declared duration and honest files still decode as before.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import av
import numpy as np
import pytest

from rnnimg.video.clips import ClipSpec, uniform_clips
from rnnimg.video.decode import DecodeLimits, VideoError, VideoReader
from tests.media import (
    code_frame,
    frame_code,
    index_frame,
    lie_about_duration,
    lie_about_frame_size,
    write_many_streams,
    write_video,
)

SPEC = ClipSpec(clip_seconds=1.0, frames_per_clip=5, stride_seconds=1.0)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEAK_RSS_MB = 600  # bound on a process that opens a hostile file and tries to read it

# name -> the DecodeLimits field its message must name
LIES = {
    "centuries.mkv": "max_duration_s",
    "six-days.mkv": "min_bytes_per_second",
    "16000x16000.avi": "max_pixels",
    "100-streams.mkv": "max_streams",
}


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("hostile")
    p = lambda name: str(folder / name)  # noqa: E731
    grey = np.stack([index_frame(i, (32, 32)) for i in range(10)])
    honest_mkv = write_video(p("honest.mkv"), grey, fps=10)
    honest_avi = write_video(p("honest.avi"), grey, fps=10, codec="mjpeg", pix_fmt="yuvj420p")
    return {
        "honest.mkv": honest_mkv,
        "centuries.mkv": lie_about_duration(honest_mkv, p("centuries.mkv"), 1e10),
        "six-days.mkv": lie_about_duration(honest_mkv, p("six-days.mkv"), 6 * 86400.0),
        "16000x16000.avi": lie_about_frame_size(honest_avi, p("16000x16000.avi"), 16000, 16000),
        "100-streams.mkv": write_many_streams(p("100-streams.mkv"), 100),
    }


def test_the_demuxer_sees_each_lie(media):
    with av.open(media["centuries.mkv"]) as container:
        stream = container.streams.video[0]
        assert container.duration == pytest.approx(1e10 * 1e6, rel=1e-6)  # microseconds
        assert stream.duration is None and "DURATION" not in stream.metadata  # nothing contradicts it
    with av.open(media["16000x16000.avi"]) as container:
        codec = container.streams.video[0].codec_context
        assert (codec.width, codec.height) == (16000, 16000)
    with av.open(media["100-streams.mkv"]) as container:
        assert len(container.streams) == 100
    assert os.path.getsize(media["six-days.mkv"]) < 4096


@pytest.mark.parametrize("name", LIES)
def test_each_lie_is_refused_at_open_as_limits(media, name):
    start = time.perf_counter()
    with pytest.raises(VideoError) as caught:
        VideoReader(media[name], (16, 16))
    seconds = time.perf_counter() - start
    print(f"{name}: refused in {seconds * 1000:.0f} ms: {caught.value.message}")
    assert caught.value.error_type == "limits"
    assert media[name] in caught.value.message and LIES[name] in caught.value.message
    assert seconds < 5.0


# Peak RSS of this process: VmHWM where Linux gives it. ru_maxrss would do, but on Linux a child
# inherits its parent's peak through fork and exec (a child of a 600 MB pytest reports >= 600 MB).
_OPEN_AND_READ = """
import json, resource, sys, time
from rnnimg.video.clips import ClipSpec, uniform_clips
from rnnimg.video.decode import VideoError, VideoReader
def peak_mb():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
before = peak_mb()
start, error_type = time.perf_counter(), ""
try:
    with VideoReader(sys.argv[1], (16, 16)) as reader:
        for _ in reader.clips(uniform_clips(min(reader.duration_s, 10.0), ClipSpec(1.0, 5, 1.0))):
            pass
except VideoError as err:
    error_type = err.error_type
seconds = time.perf_counter() - start
print(json.dumps({"error_type": error_type, "seconds": seconds, "imports_mb": before, "peak_mb": peak_mb()}))
"""


@pytest.mark.parametrize("name", LIES)
def test_refusing_a_lie_costs_little_memory(media, name):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-c", _OPEN_AND_READ, media[name]], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{name}: peak RSS {got['peak_mb']:.0f} MB ({got['imports_mb']:.0f} MB after imports), {got['seconds'] * 1000:.0f} ms")
    assert got["error_type"] == "limits"
    assert got["peak_mb"] < PEAK_RSS_MB


def test_raised_limits_accept_what_the_defaults_refuse(media):
    with VideoReader(media["100-streams.mkv"], limits=DecodeLimits(max_streams=100)) as reader:
        assert (reader.info.width, reader.info.height) == (16, 16)
        assert len(list(reader.clips(uniform_clips(1.0, ClipSpec(1.0, 1, 1.0))))) == 1
    believing = DecodeLimits(max_duration_s=1e11, min_bytes_per_second=0.0)
    with VideoReader(media["centuries.mkv"], limits=believing) as reader:
        assert reader.duration_s == pytest.approx(1e10)  # opening reads the header only


def test_limits_reject_values_that_accept_nothing():
    with pytest.raises(ValueError, match="max_streams"):
        DecodeLimits(max_streams=0)
    with pytest.raises(ValueError, match="max_duration_s"):
        DecodeLimits(max_duration_s=-1)


def test_a_negative_declared_duration_is_measured_instead(media, tmp_path):
    path = lie_about_duration(media["honest.mkv"], str(tmp_path / "negative.mkv"), -1000.0)
    with VideoReader(path) as reader:
        assert reader.duration_s == pytest.approx(1.0, abs=0.01)


def test_a_raw_stream_over_max_pixels_is_refused_from_its_parameter_sets(tmp_path):
    # Probing decodes raw H.264 to learn its size; the bound keeps that decode from allocating.
    path = write_video(str(tmp_path / "big.h264"), np.stack([index_frame(i, (512, 512)) for i in range(3)]), container_format="h264")
    with pytest.raises(VideoError) as caught:
        VideoReader(path, limits=DecodeLimits(max_pixels=256 * 256))
    assert caught.value.error_type == "limits" and "512x512" in caught.value.message


def test_a_picture_that_grows_mid_stream_is_refused_by_the_decoder(tmp_path):
    # Two raw H.264 streams back to back: 64x64, then 256x256 (a new SPS). The header check sees
    # 64x64; the decoder's max_pixels refuses the larger pictures when they come.
    small = write_video(str(tmp_path / "small.h264"), np.stack([index_frame(i, (64, 64)) for i in range(10)]), container_format="h264")
    large = write_video(str(tmp_path / "large.h264"), np.stack([index_frame(i, (256, 256)) for i in range(10)]), container_format="h264")
    path = str(tmp_path / "grows.h264")
    with open(path, "wb") as out:
        for part in (small, large):
            with open(part, "rb") as f:
                out.write(f.read())
    plan = uniform_clips(2.0, ClipSpec(0.5, 5, 0.5))
    with VideoReader(path, (16, 16)) as reader:
        assert len(list(reader.clips(plan))) == 4  # the default limits accept both sizes
    got = []
    with pytest.raises(VideoError) as caught:
        with VideoReader(path, (16, 16), limits=DecodeLimits(max_pixels=128 * 128)) as reader:
            for clip, _ in reader.clips(plan):
                got.append(clip.clip_index)
    assert caught.value.error_type == "decode"
    assert got and got[-1] < 2  # clips before the larger pictures came


def _shown(clip, fps: int) -> list[int]:
    """The frame on screen at each of the clip's times, for a constant-rate video."""
    return [int(t * fps + 1e-6) for t in clip.timestamps]


def test_a_raw_h264_stream_without_declared_duration_still_decodes(tmp_path):
    frames = np.stack([code_frame(i) for i in range(40)])
    path = write_video(str(tmp_path / "raw.h264"), frames, fps=10, container_format="h264")
    plan = uniform_clips(4.0, SPEC)
    with VideoReader(path, limits=DecodeLimits()) as reader:
        assert reader.duration_s == pytest.approx(4.0, abs=0.01)  # counted from its packets
        got = [[frame_code(f) for f in clip_frames] for _, clip_frames in reader.clips(plan)]
    assert got == [_shown(clip, fps=10) for clip in plan]


def test_an_honest_mp4_decodes_as_before(tmp_path):
    frames = np.stack([code_frame(i) for i in range(60)])
    path = write_video(str(tmp_path / "honest.mp4"), frames, fps=10)
    plan = uniform_clips(6.0, SPEC)
    results = []
    for limits in (None, DecodeLimits(max_streams=1000, max_pixels=1 << 30, max_duration_s=1e12, min_bytes_per_second=0.0)):
        with VideoReader(path, limits=limits) as reader:
            assert reader.duration_s == pytest.approx(6.0, abs=0.01)
            results.append([(clip.clip_index, clip_frames) for clip, clip_frames in reader.clips(plan)])
    default, unbounded = results
    assert [[frame_code(f) for f in clip_frames] for _, clip_frames in default] == [_shown(clip, fps=10) for clip in plan]
    assert all(a[0] == b[0] and np.array_equal(a[1], b[1]) for a, b in zip(default, unbounded, strict=True))


@pytest.mark.parametrize("name", LIES)
def test_the_label_job_records_each_lie_as_one_failed_row(media, name):
    from rnnimg.label import decode_video, plan_video

    spec = ClipSpec(clip_seconds=2.0, frames_per_clip=8, stride_seconds=2.0).to_dict()
    units = plan_video({"shard": 0, "video_uri": media[name]}, spec, 60.0)
    assert len(units) == 1 and units[0]["error_type"] == "limits", units
    batches = list(decode_video({"video_uri": np.array([media[name]], dtype=object), "shard": np.array([0])}, spec, 16, 4))
    status = [(s, e) for b in batches for s, e, is_status in zip(b["status"], b["error_type"], b["is_status"]) if is_status]
    clips = sum(int((~b["is_status"].astype(bool)).sum()) for b in batches)
    assert status == [("failed", "limits")] and clips == 0


@pytest.mark.ray
def test_the_whole_job_ends_with_every_lie_as_a_row_beside_honest_videos(ray_local, media, untrained_model, tmp_path):
    """The real pipeline (probe, decode tasks, model actor, commits) over the lies and an honest video."""
    import shutil

    import pyarrow.dataset as pads

    from rnnimg.label import LabelConfig, label

    folder = tmp_path / "archive"
    folder.mkdir()
    for name in (*LIES, "honest.mkv"):
        shutil.copy(media[name], folder / name)
    started = time.perf_counter()
    result = label(str(folder), untrained_model, str(tmp_path / "out"), LabelConfig(videos_per_shard=2))
    seconds = time.perf_counter() - started
    rows = {os.path.basename(r["video_uri"]): r for r in pads.dataset(str(tmp_path / "out" / "videos")).to_table().to_pylist()}
    assert (result.videos, result.ok, result.failed) == (len(LIES) + 1, 1, len(LIES))
    for name, field in LIES.items():
        assert rows[name]["status"] == "failed" and rows[name]["error_type"] == "limits" and field in rows[name]["error"], rows[name]
    assert rows["honest.mkv"]["status"] == "ok" and rows["honest.mkv"]["clips"] == result.clips >= 1
    assert seconds < 120, f"the job took {seconds:.0f} s"
