import numpy as np
import pytest

from rnnimg.video.clips import ClipSpec, frame_times, random_clip, uniform_clips


def test_frame_times_are_sub_interval_centres():
    assert frame_times(2.0, 2.0, 4) == pytest.approx((2.25, 2.75, 3.25, 3.75))


def test_uniform_clips_fill_the_video_and_no_more():
    spec = ClipSpec(clip_seconds=2.0, frames_per_clip=8, stride_seconds=1.0)
    clips = uniform_clips(5.0, spec)
    assert [c.start_s for c in clips] == [0.0, 1.0, 2.0, 3.0]
    assert all(c.end_s <= 5.0 for c in clips)
    assert [c.clip_index for c in clips] == [0, 1, 2, 3]
    assert all(len(c.timestamps) == 8 for c in clips)


def test_uniform_clips_tolerate_a_duration_just_short_of_a_boundary():
    assert len(uniform_clips(3.99999999, ClipSpec(2.0, 4, 2.0))) == 2


def test_short_video_gets_one_squeezed_clip_and_empty_gets_none():
    spec = ClipSpec(2.0, 4, 2.0)
    (clip,) = uniform_clips(1.0, spec)
    assert (clip.start_s, clip.end_s) == (0.0, 1.0)
    assert max(clip.timestamps) < 1.0
    assert uniform_clips(0.0, spec) == []


def test_random_clip_stays_inside_and_is_seeded():
    spec = ClipSpec(2.0, 8, 2.0)
    a = [random_clip(10.0, spec, np.random.default_rng(1)) for _ in range(3)]
    b = [random_clip(10.0, spec, np.random.default_rng(1)) for _ in range(3)]
    assert a == b
    for clip in (random_clip(10.0, spec, np.random.default_rng(s)) for s in range(50)):
        assert 0.0 <= clip.start_s and clip.end_s <= 10.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"clip_seconds": -1}, "clip_seconds must be > 0, got -1"),
        ({"frames_per_clip": 0}, "frames_per_clip must be an integer >= 1"),
        ({"stride_seconds": 0}, "stride_seconds must be > 0"),
    ],
)
def test_bad_spec_is_refused_with_what_was_given(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipSpec(**kwargs)
