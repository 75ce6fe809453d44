"""Decoding picks frames by presentation time, streams clips, and reports broken files."""

import os
from fractions import Fraction

import numpy as np
import pytest

from rnnimg.video.clips import Clip, ClipSpec, frame_times, uniform_clips
from rnnimg.video.decode import VideoError, VideoReader, probe, read_clip
from tests.media import frame_index, index_frame, write_video


@pytest.fixture(scope="module")
def counting_video(tmp_path_factory):
    """30 frames at 10 fps: frame i shows grey level 8i+4."""
    path = str(tmp_path_factory.mktemp("v") / "count.mp4")
    return write_video(path, np.stack([index_frame(i) for i in range(30)]), fps=10)


def test_probe_reads_duration_size_and_rate(counting_video):
    info = probe(counting_video)
    assert info.duration_s == pytest.approx(3.0, abs=0.01)
    assert (info.width, info.height) == (64, 48)
    assert info.fps == pytest.approx(10)


def test_frames_are_picked_by_presentation_time(counting_video):
    # Frame i is on screen during [i/10, (i+1)/10): t=0.25 -> 2, t=1.05 -> 10, t=2.95 -> 29.
    clip = Clip(0, 0.0, 3.0, (0.0, 0.25, 1.05, 2.95))
    frames = read_clip(counting_video, clip)
    assert frames.shape == (4, 48, 64, 3) and frames.dtype == np.uint8
    assert [frame_index(f) for f in frames] == [0, 2, 10, 29]


def test_clips_stream_in_plan_order_with_resize(counting_video):
    plan = uniform_clips(3.0, ClipSpec(1.0, 5, 0.5))
    with VideoReader(counting_video, size=(16, 24)) as reader:
        got = list(reader.clips(plan))
    assert [c.clip_index for c, _ in got] == list(range(len(plan)))
    for clip, frames in got:
        assert frames.shape == (5, 16, 24, 3)
        expected = [int(np.floor(t * 10 + 1e-9)) for t in clip.timestamps]
        assert [frame_index(f) for f in frames] == expected


def test_variable_frame_rate_is_sampled_by_time(tmp_path):
    # Frames at 0, 0.1, 0.2, then a 1-second gap, then 1.3, 1.4: frame 2 stays on screen until 1.3.
    pts_ms = [0, 100, 200, 1300, 1400]
    frames = np.stack([index_frame(i) for i in range(len(pts_ms))])
    path = write_video(str(tmp_path / "vfr.mkv"), frames, fps=10, pts=pts_ms, time_base=Fraction(1, 1000), container_format="matroska")
    clip = Clip(0, 0.0, 1.5, (0.05, 0.25, 0.9, 1.25, 1.35, 1.45))
    assert [frame_index(f) for f in read_clip(path, clip)] == [0, 2, 2, 2, 3, 4]


def test_seeking_far_ahead_gives_the_same_frames_as_decoding_through(tmp_path):
    # Keyframe every 5 frames; wanted times far apart force seeks.
    frames = np.stack([index_frame(i) for i in range(30)])
    path = write_video(str(tmp_path / "gop.mp4"), frames, fps=10, options={"crf": "10", "preset": "ultrafast", "g": "5", "keyint_min": "5", "sc_threshold": "0"})
    plan = [Clip(0, 0.0, 0.3, frame_times(0.0, 0.3, 3)), Clip(1, 2.5, 2.8, frame_times(2.5, 0.3, 3))]
    with VideoReader(path) as reader:
        seeking = [[frame_index(f) for f in fr] for _, fr in reader.clips(plan, seek_gap_keyframes=1.0)]
    with VideoReader(path) as reader:
        through = [[frame_index(f) for f in fr] for _, fr in reader.clips(plan, seek_gap_keyframes=1e9)]
    assert seeking == through == [[0, 1, 2], [25, 26, 27]]


def test_not_a_video_is_an_open_error(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is a text file, not a video\n")
    with pytest.raises(VideoError) as err:
        VideoReader(str(path))
    assert err.value.error_type == "open" and "notes.mp4" in err.value.message


def test_missing_file_is_not_found(tmp_path):
    with pytest.raises(VideoError) as err:
        VideoReader(str(tmp_path / "nope.mp4"))
    assert err.value.error_type == "not_found"


def test_truncated_file_yields_early_clips_then_fails(tmp_path, counting_video):
    # An MPEG-TS stream cut in the middle: the header survives, the tail does not.
    full = write_video(str(tmp_path / "full.ts"), np.stack([index_frame(i % 30) for i in range(100)]), fps=10, container_format="mpegts")
    data = open(full, "rb").read()
    cut = tmp_path / "cut.ts"
    cut.write_bytes(data[: len(data) // 2])
    plan = uniform_clips(10.0, ClipSpec(1.0, 4, 1.0))  # the plan the full length would give
    got = []
    with pytest.raises(VideoError) as err:
        with VideoReader(str(cut)) as reader:
            for clip, _ in reader.clips(plan):
                got.append(clip.clip_index)
    assert err.value.error_type == "truncated"
    assert 2 <= len(got) < 10
