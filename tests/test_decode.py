"""Decoding picks frames by presentation time, streams clips, and reports broken files."""

import os
from fractions import Fraction

import numpy as np
import pytest

from rnnimg.video.clips import Clip, ClipSpec, frame_times, uniform_clips
from rnnimg.video.decode import VideoError, VideoReader, probe, read_clip
from tests.media import code_frame, frame_code, frame_index, index_frame, write_streams, write_video


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


# ----------------------------------------------------------------------------- seeking and skipping

X264_FAST = {"crf": "10", "preset": "ultrafast"}


def _gop_options(gop: int, bframes: int = 0) -> dict:
    """libx264 with a fixed GOP (no scene-cut keyframes) and, optionally, a fixed B-frame pattern."""
    params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
    if bframes:
        params += f":bframes={bframes}:b-adapt=0:b-pyramid=normal"
        return {"crf": "10", "preset": "veryfast", "x264-params": params}
    return {**X264_FAST, "x264-params": params}


def _expected(plan, fps: int) -> list[list[int]]:
    """Constant frame rate: the frame on screen at t is floor(t * fps)."""
    return [[int(np.floor(t * fps + 1e-9)) for t in clip.timestamps] for clip in plan]


def _codes(path: str, plan, **kwargs) -> tuple[list[list[int]], VideoReader]:
    with VideoReader(path) as reader:
        got = [[frame_code(f) for f in frames] for _, frames in reader.clips(plan, **kwargs)]
    return got, reader


@pytest.fixture(scope="module")
def long_videos(tmp_path_factory):
    """60 s at 10 fps (600 frames numbered with code_frame), with a keyframe every 30 and every 250 frames."""
    folder = tmp_path_factory.mktemp("long")
    frames = np.stack([code_frame(i) for i in range(600)])
    return {gop: write_video(str(folder / f"gop{gop}.mp4"), frames, fps=10, options=_gop_options(gop)) for gop in (30, 250)}


@pytest.mark.parametrize("gop", [30, 250])
def test_a_plan_far_into_the_video_seeks_straight_to_it(long_videos, gop):
    # The plan starts at 41 s: the reader must not decode the first 40 seconds to get there.
    plan = [Clip(k, 41.0 + 2 * k, 43.0 + 2 * k, frame_times(41.0 + 2 * k, 2.0, 8)) for k in range(3)]
    got, reader = _codes(long_videos[gop], plan)
    assert got == _expected(plan, 10)
    keyframe_before = (410 // gop) * gop  # the seek lands on the keyframe at or before 41 s
    assert reader.seeks == 1
    assert reader.frames_decoded <= 470 - keyframe_before + 2  # up to the last wanted frame (46.9 s), not from 0


@pytest.mark.parametrize("gop", [30, 250])
def test_seeks_only_when_the_next_wanted_time_is_more_than_two_keyframe_intervals_ahead(long_videos, gop):
    # Two stretches of clips 14 s apart: with a keyframe every 3 s the reader seeks over the
    # gap; with one every 25 s the gap is less than two intervals and it decodes through.
    starts = [2.0, 4.0, 20.0, 22.0, 36.0]
    plan = [Clip(k, s, s + 2.0, frame_times(s, 2.0, 8)) for k, s in enumerate(starts)]
    got, reader = _codes(long_videos[gop], plan)
    assert got == _expected(plan, 10)
    # The first seek is to the plan's start (2.1 s), which lands on the keyframe at 0.
    if gop == 30:
        assert reader.seeks == 3 and reader.frames_decoded < 300
    else:
        # Only one keyframe interval observed until 25 s: no estimate, no seek; then 36 s is
        # 11 s ahead of 24 s, less than two intervals of 25 s.
        assert reader.seeks == 1 and reader.frames_decoded >= 378


@pytest.fixture(scope="module")
def b_frame_video(tmp_path_factory):
    """30 s at 30 fps, B-frames (3, pyramid) and a keyframe every 60 frames: 900 numbered frames."""
    path = str(tmp_path_factory.mktemp("bframes") / "b.mp4")
    frames = np.stack([code_frame(i, (32, 48)) for i in range(900)])
    return write_video(path, frames, fps=30, options=_gop_options(60, bframes=3))


def test_b_frame_video_really_has_b_frames(b_frame_video):
    import av

    with av.open(b_frame_video) as container:
        kinds = {frame.pict_type for frame in container.decode(video=0)}
    assert av.video.frame.PictureType.B in kinds


@pytest.mark.parametrize(
    "spec",
    [ClipSpec(2.0, 8, 2.0), ClipSpec(1.0, 4, 5.0), ClipSpec(0.5, 15, 0.5)],
    ids=["8-per-2s", "sparse-with-seeks", "every-frame"],
)
def test_b_frames_are_picked_by_presentation_time_with_and_without_skipping(b_frame_video, spec):
    plan = uniform_clips(30.0, spec)
    skipped, skipping_reader = _codes(b_frame_video, plan, skip_nonref=True)
    decoded, plain_reader = _codes(b_frame_video, plan, skip_nonref=False)
    assert skipped == decoded == _expected(plan, 30)
    if spec.frames_per_clip == 15 and spec.clip_seconds == 0.5:
        # Every frame is wanted: nothing may be skipped.
        assert skipping_reader.frames_decoded == plain_reader.frames_decoded
    else:
        assert skipping_reader.frames_decoded < plain_reader.frames_decoded


def test_b_frames_after_a_seek_match_decoding_through(b_frame_video):
    plan = [Clip(0, 0.0, 0.5, frame_times(0.0, 0.5, 4)), Clip(1, 17.3, 17.8, frame_times(17.3, 0.5, 4)), Clip(2, 25.9, 26.4, frame_times(25.9, 0.5, 4))]
    seeking, reader = _codes(b_frame_video, plan, seek_gap_keyframes=1.0)
    through, _ = _codes(b_frame_video, plan, seek_gap_keyframes=1e9, skip_nonref=False)
    assert reader.seeks >= 2
    assert seeking == through == _expected(plan, 30)


@pytest.mark.parametrize("container_format,suffix", [("mp4", "mp4"), ("matroska", "mkv"), ("mpegts", "ts")])
def test_seeking_in_each_container_gives_the_frames_decoding_through_gives(tmp_path, container_format, suffix):
    frames = np.stack([code_frame(i) for i in range(300)])
    path = write_video(str(tmp_path / f"v.{suffix}"), frames, fps=10, container_format=container_format, options=_gop_options(20))
    plan = [Clip(k, s, s + 1.0, frame_times(s, 1.0, 4)) for k, s in enumerate([3.0, 12.0, 21.5, 28.0])]
    seeking, reader = _codes(path, plan, seek_gap_keyframes=1.0)
    through, _ = _codes(path, plan, seek_gap_keyframes=1e9)
    assert reader.seeks >= 2
    assert seeking == through == _expected(plan, 10)


# ----------------------------------------------------------------------------- formats

def test_rotated_video_decodes_in_display_orientation(tmp_path):
    # Coded 64 wide x 48 high with a white corner top-left, tagged "turn 90 degrees
    # counterclockwise for display": displayed 48 wide x 64 high, the corner bottom-left.
    frame = np.zeros((48, 64, 3), np.uint8)
    frame[:16, :16] = 255
    path = write_video(str(tmp_path / "phone.mp4"), np.stack([frame] * 5), fps=10, rotation=90)
    native = read_clip(path, Clip(0, 0.0, 0.5, (0.25,)))
    assert native.shape == (1, 64, 48, 3)
    assert native[0, -4, 4].min() > 200 and native[0, 4, 4].max() < 50
    resized = read_clip(path, Clip(0, 0.0, 0.5, (0.25,)), size=(32, 16))
    assert resized.shape == (1, 32, 16, 3)
    assert resized[0, -2, 2].min() > 200 and resized[0, 2, 2].max() < 50

    clockwise = write_video(str(tmp_path / "clockwise.mp4"), np.stack([frame] * 5), fps=10, rotation=-90)
    turned = read_clip(clockwise, Clip(0, 0.0, 0.5, (0.25,)))
    assert turned.shape == (1, 64, 48, 3)
    assert turned[0, 4, -4].min() > 200 and turned[0, -4, 4].max() < 50  # the corner is now top-right


def test_ten_bit_video_decodes_to_8_bit_rgb(tmp_path):
    frames = np.stack([index_frame(i) for i in range(20)])
    path = write_video(str(tmp_path / "ten.mkv"), frames, fps=10, pix_fmt="yuv420p10le")
    import av

    with av.open(path) as container:
        assert container.streams.video[0].codec_context.pix_fmt == "yuv420p10le"
    clip = Clip(0, 0.0, 2.0, (0.05, 0.55, 1.25, 1.95))
    got = read_clip(path, clip)
    assert got.dtype == np.uint8 and [frame_index(f) for f in got] == [0, 5, 12, 19]


@pytest.mark.parametrize("codec,pix_fmt", [("libx264", "yuv444p"), ("mpeg4", "yuv420p")])
def test_odd_width_and_height(tmp_path, codec, pix_fmt):
    frames = np.stack([index_frame(i, (241, 321)) for i in range(10)])
    options = X264_FAST if codec == "libx264" else {"qscale": "2"}
    path = write_video(str(tmp_path / f"odd-{codec}.mkv"), frames, fps=10, codec=codec, pix_fmt=pix_fmt, options=options)
    assert (probe(path).width, probe(path).height) == (321, 241)
    clip = Clip(0, 0.0, 1.0, (0.05, 0.45, 0.95))
    native = read_clip(path, clip)
    assert native.shape == (3, 241, 321, 3) and [frame_index(f) for f in native] == [0, 4, 9]
    small = read_clip(path, clip, size=(17, 23))
    assert small.shape == (3, 17, 23, 3) and [frame_index(f) for f in small] == [0, 4, 9]


def test_several_video_streams_use_the_first(tmp_path):
    first = np.stack([index_frame(i, (48, 64)) for i in range(20)])
    second = np.stack([np.full((32, 32, 3), 250, np.uint8)] * 30)
    path = write_streams(str(tmp_path / "two.mkv"), videos=[first, second], audio_seconds=1.0)
    info = probe(path)
    assert (info.width, info.height, info.duration_s) == (64, 48, pytest.approx(2.0, abs=0.01))
    assert [frame_index(f) for f in read_clip(path, Clip(0, 0.0, 2.0, (0.05, 1.05, 1.95)))] == [0, 10, 19]


def test_a_cover_picture_is_not_the_video_stream(tmp_path):
    frames = np.stack([index_frame(i) for i in range(20)])
    path = write_streams(str(tmp_path / "with-cover.mp4"), videos=[frames], audio_seconds=1.0, cover=np.full((48, 64, 3), 200, np.uint8))
    import av

    with av.open(path) as container:
        assert any(s.disposition & av.stream.Disposition.attached_pic for s in container.streams.video)
    assert [frame_index(f) for f in read_clip(path, Clip(0, 0.0, 2.0, (0.05, 1.05)))] == [0, 10]


def test_raw_h264_without_timestamps_gets_its_duration_from_a_demux_pass(tmp_path):
    frames = np.stack([code_frame(i) for i in range(45)])
    path = write_video(str(tmp_path / "raw.h264"), frames, fps=15, container_format="h264")
    info = probe(path)
    assert info.duration_s == pytest.approx(3.0, abs=1e-6) and info.fps == pytest.approx(15.0)
    plan = uniform_clips(info.duration_s, ClipSpec(1.0, 4, 1.0))
    assert len(plan) == 3
    got, _ = _codes(path, plan)
    assert got == _expected(plan, 15)
