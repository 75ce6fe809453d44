"""Decode the frames a clip plan needs, with PyAV (FFmpeg).

The interface is small: ``VideoReader(video_uri, size)`` has ``duration_s`` and
``clips(plan)``, which yields ``(Clip, frames)`` with frames as uint8 ``(T, H, W, C)``,
one clip at a time (a video's frames are never all held in memory).

Frames are picked by presentation time, not by index: for each planned timestamp the
frame on screen at that time (the last frame whose pts <= t) is taken, so variable frame
rate video is sampled correctly. Decoding runs forward; it seeks only when the next wanted
timestamp lies more than a couple of keyframe intervals ahead, since seeking inside a GOP
costs more than decoding through it. Only the frames that are kept are converted to RGB,
and they are resized in that same conversion.

Errors are ``VideoError`` with an ``error_type`` (``open``, ``no_video_stream``, ``decode``,
``truncated``) and a message that names the video.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rnnimg import storage
from rnnimg.video.clips import Clip


# A frame whose time is within this of a wanted time counts as shown at it (float noise).
_TIME_EPS = 1e-6


class VideoError(Exception):
    """A video could not be (fully) decoded. ``error_type`` is a short machine-readable kind."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class VideoInfo:
    duration_s: float  # presentation length of the video stream, seconds
    width: int
    height: int
    fps: float  # average frame rate as the container declares it (0 when unknown)
    codec: str


def _import_av():
    import av  # lazy: only decode workers need FFmpeg

    return av


class VideoReader:
    """One open video stream.

    Args:
        video_uri: local path, file:// or s3:// URL.
        size: ``(height, width)`` to resize kept frames to, or None for the native size.

    Raises:
        VideoError: the file cannot be opened as a video, or has no video stream.
    """

    def __init__(self, video_uri: str, size: tuple[int, int] | None = None):
        av = _import_av()
        self.video_uri = video_uri
        self.size = size
        try:
            self._file = storage.open_input(video_uri)
        except FileNotFoundError as err:
            raise VideoError("not_found", f"{video_uri}: no such file") from err
        except (storage.StorageError, OSError) as err:
            raise VideoError("storage", f"{video_uri}: cannot read: {err}") from err
        try:
            self._container = av.open(self._file, mode="r")
        except (av.error.FFmpegError, ValueError, OSError, EOFError) as err:
            self._file.close()
            raise VideoError("open", f"{video_uri}: not a readable video container: {_msg(err)}") from err
        if not self._container.streams.video:
            self.close()
            raise VideoError("no_video_stream", f"{video_uri}: the container has no video stream")
        self._stream = self._container.streams.video[0]
        self._stream.thread_type = "SLICE"  # one decoder thread per process; processes give parallelism
        tb = self._stream.time_base
        self._time_base = float(tb) if tb else 1e-6
        start = self._stream.start_time
        self._origin_s = float(start * tb) if (start is not None and tb) else 0.0
        self.info = VideoInfo(
            duration_s=self._probe_duration(),
            width=int(self._stream.codec_context.width or 0),
            height=int(self._stream.codec_context.height or 0),
            fps=float(self._stream.average_rate or 0.0),
            codec=str(self._stream.codec_context.name),
        )

    @property
    def duration_s(self) -> float:
        return self.info.duration_s

    def _probe_duration(self) -> float:
        stream = self._stream
        if stream.duration and stream.time_base:
            return float(stream.duration * stream.time_base)
        if self._container.duration:
            return float(self._container.duration) / 1_000_000.0 - max(self._origin_s, 0.0)
        # No declared duration (e.g. a raw elementary stream): demux once, decoding nothing.
        av = _import_av()
        end = 0.0
        try:
            for packet in self._container.demux(stream):
                if packet.pts is not None:
                    end = max(end, (packet.pts + (packet.duration or 0)) * self._time_base - self._origin_s)
        except av.error.FFmpegError:
            pass
        self._container.seek(0, stream=stream) if end > 0 else None
        return end

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            self._container.close()
        finally:
            self._file.close()

    def _convert(self, frame) -> np.ndarray:
        if self.size is None:
            return frame.to_ndarray(format="rgb24")
        height, width = self.size
        return frame.to_ndarray(format="rgb24", width=width, height=height)

    def _frames_from(self, seek_to_s: float | None):
        """Decoded frames with their times (s, from the stream's origin), optionally after a seek."""
        if seek_to_s is not None:
            target = int((seek_to_s + self._origin_s) / self._time_base)
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        for frame in self._container.decode(self._stream):
            if frame.pts is None:
                continue
            yield frame, frame.pts * self._time_base - self._origin_s

    def clips(self, plan: list[Clip], seek_gap_keyframes: float = 2.0) -> Iterator[tuple[Clip, np.ndarray]]:
        """Yield ``(clip, frames)`` for each clip of the plan, in plan order.

        Args:
            plan: clips from ``rnnimg.video.clips``; their timestamps are seconds from the start.
            seek_gap_keyframes: seek when the next wanted time is more than this many observed
                keyframe intervals ahead of the decoder.

        Yields:
            ``(clip, frames)`` with frames uint8 of shape ``(frames_per_clip, H, W, 3)``.

        Raises:
            VideoError: decoding failed (``decode``) or the stream ended before the plan
                (``truncated``). Clips yielded before the error are valid.
        """
        av = _import_av()
        if not plan:
            return
        # Every wanted time, in time order, with where its frame goes.
        wanted = sorted(
            (t, clip_pos, i) for clip_pos, clip in enumerate(plan) for i, t in enumerate(clip.timestamps)
        )
        slots: list[list[np.ndarray | None]] = [[None] * len(c.timestamps) for c in plan]
        missing = [len(c.timestamps) for c in plan]
        next_to_yield = 0
        w = 0  # index of the next wanted time
        prev = None  # (frame, time, converted array or None)
        keyframe_times: list[float] = []
        seek_to: float | None = None
        last_time = -math.inf

        def assign(entry, upto: float):
            """Give ``entry``'s frame to every wanted time < upto; return the updated entry."""
            nonlocal w
            frame, ftime, array = entry
            while w < len(wanted) and wanted[w][0] + _TIME_EPS < upto:
                if array is None:
                    array = self._convert(frame)
                _, clip_pos, i = wanted[w]
                slots[clip_pos][i] = array
                missing[clip_pos] -= 1
                w += 1
            return (frame, ftime, array)

        def ready():
            nonlocal next_to_yield
            while next_to_yield < len(plan) and missing[next_to_yield] == 0:
                frames = np.stack(slots[next_to_yield])  # T x (H, W, C) -> (T, H, W, C)
                slots[next_to_yield] = []
                yield plan[next_to_yield], frames
                next_to_yield += 1

        try:
            while w < len(wanted):
                restarted = False
                for frame, ftime in self._frames_from(seek_to):
                    seek_to = None
                    if frame.key_frame and (not keyframe_times or ftime > keyframe_times[-1]):
                        keyframe_times.append(ftime)
                    if prev is not None:
                        prev = assign(prev, ftime)  # prev is on screen until this frame's time
                    elif w < len(wanted) and wanted[w][0] + _TIME_EPS < ftime:
                        # Wanted times before the first frame: the first frame is what shows.
                        assign((frame, ftime, None), ftime)
                    prev = (frame, ftime, None)
                    last_time = ftime
                    yield from ready()
                    if w >= len(wanted):
                        break
                    gap = wanted[w][0] - ftime
                    if len(keyframe_times) >= 2:
                        gop = max(keyframe_times[-1] - keyframe_times[-2], 1e-3)
                        if gap > seek_gap_keyframes * gop:
                            seek_to, prev, restarted = wanted[w][0], None, True
                            break
                if not restarted:
                    break
        except av.error.FFmpegError as err:
            raise VideoError("decode", f"{self.video_uri}: decoding failed near {max(last_time, 0):.2f} s: {_msg(err)}") from err

        if w < len(wanted) and prev is not None:
            # End of stream: the last frame stays on screen for one frame period. A plan made
            # from the declared duration that reaches well past it means the file was cut short.
            frame_period = 1.0 / self.info.fps if self.info.fps else 0.1
            if wanted[-1][0] > last_time + 2 * frame_period:
                assign(prev, last_time + frame_period)
                yield from ready()
                raise VideoError(
                    "truncated",
                    f"{self.video_uri}: frames end at {last_time:.2f} s, before the declared {self.duration_s:.2f} s",
                )
            assign(prev, math.inf)
        yield from ready()
        if next_to_yield < len(plan):
            raise VideoError("decode", f"{self.video_uri}: no decodable frames for clip {next_to_yield} and after")


def _msg(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def probe(video_uri: str) -> VideoInfo:
    """Open a video, read its stream header, close it.

    Raises:
        VideoError: as ``VideoReader``.
    """
    with VideoReader(video_uri) as reader:
        return reader.info


def read_clip(video_uri: str, clip: Clip, size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames of one clip, uint8 ``(T, H, W, 3)``: a convenience for training and tests."""
    with VideoReader(video_uri, size) as reader:
        for _, frames in reader.clips([clip]):
            return frames
    raise VideoError("decode", f"{video_uri}: no frames for clip at {clip.start_s:.2f} s")
