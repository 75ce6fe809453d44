"""Clip plans: which presentation times of a video make which clip.

Pure arithmetic on seconds, testable without decoding anything. The decoder takes a plan
and returns, for every clip, the frames shown at the clip's timestamps.

A clip of ``clip_seconds`` starting at ``start_s`` samples ``frames_per_clip`` frames at the
centres of equal sub-intervals:  t_i = start_s + (i + 0.5) * clip_seconds / frames_per_clip.
Training (random windows) and labelling (uniform windows) use the same layout, so a model
sees at labelling time the same spacing of frames it was trained on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np


@dataclass(frozen=True)
class ClipSpec:
    """How clips are cut from a video."""

    clip_seconds: float = 2.0  # length of one clip, in seconds of presentation time
    frames_per_clip: int = 8  # frames sampled from each clip, evenly spaced in time
    stride_seconds: float = 2.0  # distance between the starts of consecutive clips (labelling)

    def __post_init__(self) -> None:
        if not self.clip_seconds > 0:
            raise ValueError(f"clip_seconds must be > 0, got {self.clip_seconds}")
        if not (isinstance(self.frames_per_clip, int) and self.frames_per_clip >= 1):
            raise ValueError(f"frames_per_clip must be an integer >= 1, got {self.frames_per_clip!r}")
        if not self.stride_seconds > 0:
            raise ValueError(f"stride_seconds must be > 0, got {self.stride_seconds}")

    def to_dict(self) -> dict:
        return asdict(self)


class Clip(NamedTuple):
    """One planned clip: its index in the video, its window and its frame times (seconds)."""

    clip_index: int
    start_s: float
    end_s: float
    timestamps: tuple[float, ...]


def frame_times(start_s: float, clip_seconds: float, frames_per_clip: int) -> tuple[float, ...]:
    """Sample times of one clip: the centres of ``frames_per_clip`` equal sub-intervals."""
    step = clip_seconds / frames_per_clip
    return tuple(start_s + (i + 0.5) * step for i in range(frames_per_clip))


def clip_count(duration_s: float, spec: ClipSpec) -> int:
    """How many clips ``uniform_clips`` plans for a duration, without building them (O(1))."""
    if not duration_s > 0:
        return 0
    if duration_s < spec.clip_seconds:
        return 1
    # Tolerance: a 4.0 s video holds two 2.0 s clips even if its duration reads 3.9999.
    return int(np.floor((duration_s - spec.clip_seconds) / spec.stride_seconds + 1e-6)) + 1


def uniform_clips(duration_s: float, spec: ClipSpec, start: int = 0, stop: int | None = None) -> list[Clip]:
    """Clips every ``stride_seconds`` that fit inside ``[0, duration_s]``; with ``start``/``stop`` only that slice.

    A video shorter than one clip still gets one clip, squeezed onto its whole length, so that
    every decodable video receives a label. A video of zero or unknown length gets none. A slice
    costs its own length, whatever the video's: a range task of a long video builds only its clips.
    """
    count = clip_count(duration_s, spec)
    if count == 1 and duration_s < spec.clip_seconds:
        return [Clip(0, 0.0, duration_s, frame_times(0.0, duration_s, spec.frames_per_clip))][start:stop]
    clips = []
    for k in range(max(0, start), count if stop is None else min(count, stop)):
        begin = k * spec.stride_seconds
        clips.append(Clip(k, begin, begin + spec.clip_seconds, frame_times(begin, spec.clip_seconds, spec.frames_per_clip)))
    return clips


def random_clip(duration_s: float, spec: ClipSpec, rng: np.random.Generator) -> Clip:
    """One clip at a uniformly random start (training). Short videos get the squeezed clip.

    Raises:
        ValueError: the duration is not positive.
    """
    if not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if duration_s <= spec.clip_seconds:
        return Clip(0, 0.0, duration_s, frame_times(0.0, duration_s, spec.frames_per_clip))
    start = float(rng.uniform(0.0, duration_s - spec.clip_seconds))
    return Clip(0, start, start + spec.clip_seconds, frame_times(start, spec.clip_seconds, spec.frames_per_clip))
