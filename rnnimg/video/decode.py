"""Decode the frames a clip plan needs, with PyAV (FFmpeg).

The interface is small: ``VideoReader(video_uri, size)`` has ``duration_s`` and
``clips(plan)``, which yields ``(Clip, frames)`` with frames as uint8 ``(T, H, W, C)``,
one clip at a time (a video's frames are never all held in memory).

How the frames are found:

- **By presentation time.** For each planned timestamp the frame on screen at that time (the
  last frame whose pts <= t) is taken, so variable frame rate and B-frame video are sampled
  correctly. A raw elementary stream (``.h264``) has no timestamps: its frames are timed by
  their output order and the stream's frame period, and its duration comes from one pass over
  its packets (demuxing only, no decoding).
- **Decode forward, seek rarely.** When the plan's first time lies beyond the start (a plan
  for a time range of a long video), the reader seeks straight to it. After that it decodes
  forward and seeks only when the next wanted time is more than ``seek_gap_keyframes``
  observed keyframe intervals ahead, since seeking inside a GOP costs more than decoding
  through it. A seek that lands past the wanted time (an imprecise demuxer) is retried
  further back; a seek that lands behind the decoder's position is not repeated.
- **Skip frames nobody wants.** Before each packet is decoded the reader looks a few packets
  ahead; if no wanted time falls in the packet's display interval (from its time to the next
  frame's), the decoder may drop it when no other frame references it
  (``skip_frame="NONREF"``). A dropped frame is never one the plan needs, so the frames are
  identical with and without skipping; ``bench/label_throughput.py`` measures the gain.
- **Convert only the frames kept**, to RGB and resized to the model's input in the same
  swscale call, then turned to display orientation (the container's display matrix, e.g. a
  phone video tagged "rotate 90", in quarter turns; mirroring is ignored).
- **Bounded by the bytes, not the header.** A header costs nothing to write: a 1 MB file can
  claim centuries, a 16000x16000 picture or a thousand streams. ``DecodeLimits`` bounds each
  of these when the reader opens a video, and FFmpeg's probing and decoding refuse pictures
  above its ``max_pixels`` (a picture that grows mid-stream fails as ``decode``).
- **Still images** (JPEG, PNG, WebP, BMP, TIFF, ...) open like a video of one frame shown from
  time 0; ``info.still`` says so (``is_still_format``), and a plan asks for time 0.
- **One video stream**: the first video stream in container order that is not an attached
  picture (cover art). Other video streams are ignored, so the choice never depends on
  bit rates or on FFmpeg's heuristics.

Errors are ``VideoError`` with a message that names the video and an ``error_type``:

=================== =====================================================================
``not_found``       no file at the location (e.g. deleted after the listing)
``storage``         the store could not be read (after ``rnnimg.storage``'s retries)
``empty``           the file has 0 bytes (``rnnimg.label`` also uses it for a video stream
                    without duration, which plans no clip)
``open``            not a readable media container (text, random bytes, no header, ...)
``no_video_stream`` a media file without a video stream (audio only, cover art only)
``limits``          the header declares more than ``DecodeLimits`` accepts: too many streams,
                    too large a picture, too long a duration, or a duration the file's bytes
                    cannot hold (checked at open, before any frame is decoded)
``decode``          the decoder or demuxer failed, or the decoder reported a corrupt frame,
                    before the plan's end (decoding stops there)
``truncated``       the file ends before the plan's end: the error above happened on a packet
                    that runs to the end of the file, or the frames stop well before the
                    declared duration. MPEG-TS and index-less AVI declare no duration, so a
                    cut copy of one is a shorter, complete video.
=================== =====================================================================

Clips yielded before an error are valid (frames still held in the decoder for reordering are
drained first); callers keep them (a ``partial`` video).
"""

from __future__ import annotations

import bisect
import io
import math
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from rnnimg import storage
from rnnimg.video.clips import Clip

# A frame whose time is within this of a wanted time counts as shown at it (float noise).
_TIME_EPS = 1e-6
# Packets looked at ahead of the one being decoded, to know when the next frame is shown.
# H.264/HEVC reorder at most 16 frames, so the next frame in display order is among them.
_LOOKAHEAD_PACKETS = 16
# With the first wanted time less than this far in, decode from the start instead of seeking.
_INITIAL_SEEK_S = 1.0


class VideoError(Exception):
    """A video could not be (fully) decoded. ``error_type`` is a short machine-readable kind."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class VideoInfo:
    """What the header (or, for raw streams, one demux pass) says about the video stream."""

    duration_s: float  # presentation length of the video stream, seconds
    width: int  # as coded (before the display rotation)
    height: int  # as coded (before the display rotation)
    fps: float  # average frame rate as the container declares it (0 when unknown)
    codec: str
    still: bool = False  # a still image (JPEG, PNG, WebP, ...): one frame, shown at time 0


@dataclass(frozen=True)
class DecodeLimits:
    """What a video may declare before ``VideoReader`` refuses it with ``error_type`` ``limits``.

    The defaults accept any real video (up to a week long and 8192x8192); a caller with other
    archives raises them: ``VideoReader(uri, limits=DecodeLimits(max_duration_s=30 * 86400))``.
    """

    max_streams: int = 64  # streams in the container, of any type (FFmpeg itself stops at 1000)
    max_pixels: int = 8192 * 8192  # width * height of the video stream, and of any frame decoded
    max_duration_s: float = 7 * 86400.0  # the video stream's length, declared or measured
    # File bytes per second of that length. A static 16x16 picture at 1 frame/s, the cheapest
    # stream one can make, measured 13.5-25 bytes/s (H.264, MPEG-4, VP9 in mp4/mkv/webm, PyAV 18):
    # every frame costs ~10 bytes of codec and container overhead. 4 bytes/s is below any video
    # showing a new frame every 3 s; a 1 MB file claiming centuries holds 0.0001 bytes/s.
    min_bytes_per_second: float = 4.0

    def __post_init__(self):
        if self.max_streams < 1 or self.max_pixels < 1:
            raise ValueError(f"max_streams and max_pixels must be >= 1, got {self.max_streams} and {self.max_pixels}")
        if not self.max_duration_s > 0 or not self.min_bytes_per_second >= 0:
            raise ValueError(
                f"max_duration_s must be > 0 and min_bytes_per_second >= 0, got {self.max_duration_s} and {self.min_bytes_per_second}"
            )


DEFAULT_LIMITS = DecodeLimits()


def _import_av():
    import av  # lazy: only decode workers need FFmpeg

    return av


class VideoReader:
    """One open video stream.

    Args:
        video_uri: local path, file:// or s3:// URL.
        size: ``(height, width)`` to resize kept frames to (in display orientation), or None
            for the native size.
        limits: what the header may declare (default ``DEFAULT_LIMITS``).

    Raises:
        VideoError: the file is missing, unreadable, empty, not a media container, has no
            video stream, or declares more than ``limits`` accepts (``error_type`` ``not_found``,
            ``storage``, ``empty``, ``open``, ``no_video_stream``, ``limits``).
    """

    def __init__(self, video_uri: str, size: tuple[int, int] | None = None, limits: DecodeLimits | None = None):
        self.video_uri = video_uri
        self.size = size
        self.limits = limits or DEFAULT_LIMITS
        self._reformatter = _import_av().video.reformatter.VideoReformatter()
        self.frames_decoded = 0  # frames the decoder returned so far (for tests and benchmarks)
        self.seeks = 0  # seeks done so far
        self._skipping = False  # the decoder's skip_frame is "NONREF" (else "DEFAULT")
        self._largest_packet = 0  # bytes, of the packets read so far
        self._read_error: BaseException | None = None
        self._last_packet = None  # the last packet sent to the decoder
        self._file = None
        self._container = None
        self._open()
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ opening

    def _open(self, bound_probing: bool = True) -> None:
        """Open the file and the container (again, after a demux-only duration pass).

        With ``bound_probing``, the decoders FFmpeg runs to probe the streams refuse pictures
        above ``limits.max_pixels``: probing a raw H.264 stream that claims 10000x10000 grew
        the process by 400 MB without it, 30 MB with it.
        """
        av = _import_av()
        video_uri = self.video_uri
        try:
            self._file = storage.open_input(video_uri)
        except FileNotFoundError as err:
            raise VideoError("not_found", f"{video_uri}: no such file") from err
        except (storage.StorageError, OSError) as err:
            raise VideoError("storage", f"{video_uri}: cannot read: {err}") from err
        try:
            self._file_size = self._file.seek(0, io.SEEK_END)
            self._file.seek(0)
        except OSError as err:
            self._file.close()
            raise VideoError("storage", f"{video_uri}: cannot read: {err}") from err
        if self._file_size == 0:
            self._file.close()
            raise VideoError("empty", f"{video_uri}: the file is empty (0 bytes)")
        options = {"max_pixels": str(self.limits.max_pixels)} if bound_probing else {}
        try:
            self._container = av.open(self._file, mode="r", options=options)
        except av.error.FFmpegError as err:
            self._file.close()
            raise VideoError("open", f"{video_uri}: not a readable video container: {_msg(err)}") from err
        except OSError as err:  # raised by the file object: the store failed mid-read
            self._file.close()
            raise VideoError("storage", f"{video_uri}: cannot read: {err}") from err
        except (ValueError, EOFError, UnicodeDecodeError) as err:
            self._file.close()
            raise VideoError("open", f"{video_uri}: not a readable video container: {_msg(err)}") from err

    def _setup(self) -> None:
        av = _import_av()
        self._check_streams()
        video = [s for s in self._container.streams.video if not (s.disposition & av.stream.Disposition.attached_pic)]
        if not video:
            only_pictures = bool(self._container.streams.video)
            raise VideoError(
                "no_video_stream",
                f"{self.video_uri}: no video stream" + (" (only a cover picture)" if only_pictures else "")
                + f"; streams: {', '.join(s.type for s in self._container.streams) or 'none'}",
            )
        self._stream_index = video[0].index
        self._bind_stream()
        if self._coded_size() == (0, 0):
            # Either the header gives no size, or probing refused one above max_pixels and reset
            # it to 0x0 (FFmpeg does, e.g. for MJPEG in AVI): read the header again, unbounded,
            # to know which. Unbounded probing costs what it cost before the limits existed.
            self._reopen(bound_probing=False)
        self._check_frame_size()
        stream = self._stream
        # Raw elementary streams (.h264, .hevc, .m4v) carry no timestamps at all.
        self._no_timestamps = bool(self._container.format.flags & av.format.Flags.no_timestamps.value)
        rate = stream.average_rate or stream.guessed_rate
        self._frame_period_s = 1.0 / float(rate) if rate else 0.0
        duration = self._declared_duration()
        if duration is None:
            duration = self._demux_duration()
        self._check_duration(duration)
        fps = float(stream.average_rate or 0.0)
        if self._no_timestamps and self._frame_period_s:
            fps = 1.0 / self._frame_period_s
        still = is_still_format(self._container.format.name)
        self.info = VideoInfo(
            duration_s=duration,
            width=self._coded_size()[0],
            height=self._coded_size()[1],
            fps=0.0 if still else fps,
            codec=str(stream.codec_context.name),
            still=still,
        )

    def _bind_stream(self) -> None:
        self._stream = self._container.streams[self._stream_index]
        self._stream.thread_type = "SLICE"  # one decoder thread per process; processes give parallelism
        # The decoder refuses a picture above the limit, also one that grows mid-stream.
        self._stream.codec_context.options = {"max_pixels": str(self.limits.max_pixels)}
        tb = self._stream.time_base
        self._time_base = float(tb) if tb else 1e-6
        start = self._stream.start_time
        self._origin_s = float(start * tb) if (start is not None and tb) else 0.0

    def _declared_duration(self) -> float | None:
        stream = self._stream
        if self._no_timestamps:
            return None  # a raw stream's "duration" would be a guess from its bit rate
        # A length <= 0 declares nothing (FFmpeg turns a Matroska Duration of -1e6 into one).
        if stream.duration and stream.time_base and stream.duration > 0:
            return float(stream.duration * stream.time_base)
        tagged = _parse_duration_tag(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
        if tagged is not None:
            return tagged  # Matroska keeps a stream's own length in a tag; the container's is the longest stream's
        if self._container.duration and self._container.duration > 0:
            return float(self._container.duration) / 1_000_000.0 - max(self._origin_s, 0.0)
        return None

    def _demux_duration(self) -> float:
        """No declared duration: read every packet once (no decoding), then reopen.

        With timestamps, the end of the last packet; without (raw streams), the sum of the
        packet durations, or the packet count times the declared frame period.
        """
        av = _import_av()
        end, total, counted, frames = 0.0, 0.0, 0, 0
        try:
            for packet in self._container.demux(self._stream):
                if packet.size == 0:
                    continue  # the flush packet at the end
                frames += 1
                if packet.duration:
                    total += packet.duration * self._time_base
                    counted += 1
                if packet.pts is not None and not self._no_timestamps:
                    end = max(end, (packet.pts + (packet.duration or 0)) * self._time_base - self._origin_s)
        except av.error.FFmpegError:
            pass  # a damaged tail: the duration is what could be read; decoding reports the error
        except OSError as err:  # raised by the file object: the store failed mid-read
            raise VideoError("storage", f"{self.video_uri}: read failed while measuring the duration: {err}") from err
        if self._no_timestamps:
            if counted == frames and frames:
                self._frame_period_s = total / frames
            end = frames * self._frame_period_s
        self._reopen()
        return end

    def _reopen(self, bound_probing: bool = True) -> None:
        self._container.close()
        self._file.close()
        self._open(bound_probing)
        self._bind_stream()

    def _refuse(self, declared: str, accepted: str) -> VideoError:
        """A ``limits`` error: what the header declared, what ``self.limits`` accepts."""
        return VideoError(
            "limits",
            f"{self.video_uri}: {declared} exceeds {accepted}; refused before decoding (raise DecodeLimits to accept it)",
        )

    def _check_streams(self) -> None:
        count = len(self._container.streams)
        if count > self.limits.max_streams:
            raise self._refuse(f"a container of {count} streams", f"the limit of {self.limits.max_streams} streams (max_streams)")

    def _coded_size(self) -> tuple[int, int]:
        codec = self._stream.codec_context
        return int(codec.width or 0), int(codec.height or 0)

    def _check_frame_size(self) -> None:
        """The video stream's coded size, where the header gives one (0x0: unknown until decoded)."""
        width, height = self._coded_size()
        if width == 0 and height == 0:
            return  # the decoder's max_pixels still bounds the first frame
        if width <= 0 or height <= 0:
            raise VideoError("limits", f"{self.video_uri}: a frame size of {width}x{height}; width and height must be > 0")
        if width * height > self.limits.max_pixels:
            raise self._refuse(
                f"a frame size of {width}x{height} ({width * height:,} pixels)",
                f"the limit of {self.limits.max_pixels:,} pixels (max_pixels)",
            )

    def _check_duration(self, duration_s: float) -> None:
        """The length against the absolute cap and against the bytes that hold it."""
        limits = self.limits
        if not math.isfinite(duration_s) or duration_s > limits.max_duration_s:
            raise self._refuse(
                f"a duration of {duration_s:.0f} s ({duration_s / 86400:.1f} days)",
                f"the limit of {limits.max_duration_s:.0f} s (max_duration_s)",
            )
        if duration_s > 0 and self._file_size / duration_s < limits.min_bytes_per_second:
            raise self._refuse(
                f"a duration of {duration_s:.0f} s held in {self._file_size:,} bytes ({self._file_size / duration_s:.3g} bytes/s)",
                f"the limit of {limits.min_bytes_per_second:g} bytes per second (min_bytes_per_second)",
            )

    @property
    def duration_s(self) -> float:
        return self.info.duration_s

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self._container is not None:
                self._container.close()
        finally:
            if self._file is not None:
                self._file.close()

    # ------------------------------------------------------------------ decoding

    def _convert(self, frame) -> np.ndarray:
        """One decoded frame -> uint8 (H, W, 3) RGB in display orientation, resized to ``size``."""
        rotation = frame.rotation or 0
        quarter_turns = round(rotation / 90)
        if abs(rotation - 90 * quarter_turns) > 1:
            quarter_turns = 0  # not a quarter turn: leave the frame as coded
        quarter_turns %= 4
        if self.size is None:
            width, height = frame.width, frame.height
        else:
            height, width = self.size
            if quarter_turns % 2:
                height, width = width, height  # resize as coded, then turn into the wanted shape
        # One reformatter for the whole video: it keeps its swscale context between frames
        # (frame.to_ndarray(width=..) builds a new one per frame, about 5x slower at 64x64).
        array = self._reformatter.reformat(frame, width=width, height=height, format="rgb24").to_ndarray()
        if quarter_turns:
            array = np.ascontiguousarray(np.rot90(array, quarter_turns))  # counterclockwise, as FFmpeg's rotation
        return array

    def _seek(self, target_s: float) -> bool:
        """Seek to the keyframe at or before ``target_s``; False if the container cannot seek."""
        av = _import_av()
        codec = self._stream.codec_context
        depth = codec.reorder_depth
        target = int(math.floor((max(target_s, 0.0) + self._origin_s) / self._time_base))
        try:
            self._container.seek(target, stream=self._stream, backward=True, any_frame=False)
        except av.error.FFmpegError:
            return False
        self.seeks += 1
        # The flush resets the decoder's reorder heuristic; restore it so that hierarchical
        # B-frames are not dropped after the seek.
        codec.reorder_depth = max(depth, codec.reorder_depth)
        return True

    def _packets(self) -> Iterator[tuple[object, deque]]:
        """Demuxed packets, each with the (up to ``_LOOKAHEAD_PACKETS``) packets after it.

        A demuxer or read error ends the iteration after the packets already read; the error
        is kept in ``self._read_error`` for ``_frames`` to report once the decoder is drained.
        """
        av = _import_av()
        ahead: deque = deque()
        demux = self._container.demux(self._stream)
        while True:
            try:
                packet = next(demux)
            except StopIteration:
                break
            except (av.error.FFmpegError, OSError) as err:  # OSError: raised by the file object (the store)
                self._read_error = err
                break
            if packet.size:
                self._largest_packet = max(self._largest_packet, packet.size)
            ahead.append(packet)
            if len(ahead) > _LOOKAHEAD_PACKETS:
                yield ahead.popleft(), ahead
        while ahead:
            yield ahead.popleft(), ahead

    def _frames(self, want: "_Wanted", can_skip: bool) -> Iterator[object]:
        """Decoded frames from the current position (the start, or the last seek).

        Before each packet is sent, non-reference frame skipping is switched on if no wanted
        time falls in that packet's display interval. On an error the decoder is flushed and
        the frames it still held (reordering delay) are yielded before the ``VideoError``.

        Raises:
            VideoError: ``decode``, ``truncated`` or ``storage``.
        """
        av = _import_av()
        codec = self._stream.codec_context
        tb, origin = self._time_base, self._origin_s
        first_pts = None  # smallest pts sent since the start or the seek
        self._read_error = None
        error = None
        packet = None
        try:
            for packet, ahead in self._packets():
                pts, skip = packet.pts, False
                if pts is not None:
                    # Never skip the first frame shown since the start or a seek (it also stands
                    # for the wanted times before it): only packets after an earlier one sent.
                    if can_skip and first_pts is not None and pts > first_pts and not packet.is_keyframe:
                        skip = not want.shows_in(pts * tb - origin, _next_time(pts, ahead, tb, origin))
                    first_pts = pts if first_pts is None else min(first_pts, pts)
                if skip != self._skipping:
                    codec.skip_frame = "NONREF" if skip else "DEFAULT"
                    self._skipping = skip
                self._last_packet = packet
                for frame in codec.decode(packet):
                    self.frames_decoded += 1
                    yield frame
        except av.error.FFmpegError as err:
            error = self._decode_error(err, packet)
        if error is None and self._read_error is not None:
            error = self._read_failure(self._read_error, packet)
        if error is None:
            return
        try:
            remaining = codec.decode(None)  # drain: frames held back for reordering
        except av.error.FFmpegError:
            remaining = []
        for frame in remaining:
            self.frames_decoded += 1
            yield frame
        raise error

    def clips(self, plan: list[Clip], seek_gap_keyframes: float = 2.0, skip_nonref: bool = True) -> Iterator[tuple[Clip, np.ndarray]]:
        """Yield ``(clip, frames)`` for each clip of the plan, in plan order.

        Args:
            plan: clips from ``rnnimg.video.clips``; their timestamps are seconds from the start.
            seek_gap_keyframes: seek when the next wanted time is more than this many observed
                keyframe intervals ahead of the decoder.
            skip_nonref: let the decoder drop non-reference frames that no wanted time shows.

        Yields:
            ``(clip, frames)`` with frames uint8 of shape ``(frames_per_clip, H, W, 3)``.

        Raises:
            VideoError: decoding failed (``decode``), the file ends early (``truncated``) or
                could not be read (``storage``). Clips yielded before the error are valid.
        """
        if not plan:
            return
        want = _Wanted(plan)
        can_seek = not self._no_timestamps
        can_skip = skip_nonref and not self._no_timestamps
        tb, origin = self._time_base, self._origin_s
        keyframes: list[float] = []  # the last two keyframe times seen
        prev = None  # [frame, time, rgb array or None]: the frame on screen until the next one
        last_time = -math.inf
        synth_time = 0.0  # next frame's time when the stream has no timestamps
        no_seek_until = -math.inf  # after a seek that could not help: no seek before this wanted time
        landing: tuple[float, float] | None = None  # after a seek: (target, back-off) until the first frame

        def seek(target_s: float, back_off_s: float) -> bool:
            nonlocal prev, landing, frames
            if not self._seek(target_s):
                return False
            prev, landing = None, (target_s, back_off_s)
            frames = self._frames(want, can_skip)
            return True

        frames = self._frames(want, can_skip)
        if can_seek and want.next_time() > _INITIAL_SEEK_S:
            can_seek = seek(want.next_time(), 1.0)
        while not want.done():
            restarted = False
            for frame in frames:
                if self._no_timestamps:
                    ftime, synth_time = synth_time, synth_time + self._frame_period_s
                elif frame.pts is not None:
                    ftime = frame.pts * tb - origin
                elif prev is not None and self._frame_period_s:
                    ftime = prev[1] + self._frame_period_s  # a frame without a timestamp: the next slot
                else:
                    continue
                if frame.is_corrupt:
                    if self._ends_at_eof(self._last_packet):
                        raise VideoError("truncated", f"{self.video_uri}: the decoder reports a corrupt frame at {ftime:.2f} s, at the end of the file (cut short?)")
                    raise VideoError("decode", f"{self.video_uri}: the decoder reports a corrupt frame at {ftime:.2f} s")
                if landing is not None:
                    target_s, back_off_s = landing
                    landing = None
                    if ftime > want.next_time() + _TIME_EPS and target_s > 0:
                        # Landed past the wanted time (an imprecise demuxer, e.g. MPEG-TS): try
                        # again further back, then decode forward from there.
                        restarted = seek(max(target_s - back_off_s, 0.0), 2 * back_off_s)
                        if restarted:
                            no_seek_until = want.next_time()
                            break
                    if ftime <= last_time:
                        no_seek_until = want.next_time()  # landed behind the decoder: decode through instead
                if frame.key_frame and (not keyframes or ftime > keyframes[-1]):
                    keyframes = [*keyframes[-1:], ftime]
                if prev is not None:
                    want.assign(prev, ftime, self._convert)  # prev is on screen until this frame's time
                elif want.next_time() + _TIME_EPS < ftime:
                    # Wanted times before the first frame: the first frame is what shows.
                    want.assign([frame, ftime, None], ftime, self._convert)
                prev = [frame, ftime, None]
                last_time = max(last_time, ftime)
                yield from want.ready()
                if want.done():
                    return
                if can_seek and len(keyframes) == 2 and want.next_time() > no_seek_until:
                    gop = max(keyframes[1] - keyframes[0], 1e-3)
                    if want.next_time() - ftime > seek_gap_keyframes * gop:
                        restarted = seek(want.next_time(), gop)
                        can_seek = restarted
                        if restarted:
                            break
            if not restarted and landing is not None and landing[0] > 0:
                # A seek that reached the end of the stream without a frame: back off too.
                target_s, back_off_s = landing
                restarted = seek(max(target_s - back_off_s, 0.0), 2 * back_off_s)
                no_seek_until = want.next_time()
            if not restarted:
                break

        if not want.done() and prev is not None:
            # End of stream: the last frame stays on screen for one frame period. A plan made
            # from the declared duration that reaches well past it means the file was cut short.
            frame_period = self._frame_period_s or 0.1
            if want.last_time() > last_time + 2 * frame_period:
                want.assign(prev, last_time + frame_period, self._convert)
                yield from want.ready()
                raise VideoError(
                    "truncated",
                    f"{self.video_uri}: frames end at {last_time:.2f} s, before the declared {self.duration_s:.2f} s",
                )
            want.assign(prev, math.inf, self._convert)
        yield from want.ready()
        if not want.done():
            raise VideoError("decode", f"{self.video_uri}: no decodable frames for clip {want.next_clip()} and after")

    def _decode_error(self, err: BaseException, packet) -> VideoError:
        """The decoder refused a packet: ``truncated`` if the packet runs to the end of the file,
        or the demuxer flagged it as incomplete (a short read) near the end; else ``decode``."""
        where = self._where(packet)
        if self._ends_at_eof(packet, slack=0) or (packet is not None and packet.is_corrupt and self._ends_at_eof(packet)):
            return VideoError("truncated", f"{self.video_uri}: the file ends inside a packet {where} (cut short?): {_msg(err)}")
        return VideoError("decode", f"{self.video_uri}: decoding failed {where}: {_msg(err)}")

    def _read_failure(self, err: BaseException, packet) -> VideoError:
        """The demuxer (or the store) failed: ``storage`` for a read error; ``truncated`` when the
        demuxer failed at the end of the file; else ``decode``."""
        where = self._where(packet)
        if not isinstance(err, _import_av().error.FFmpegError):
            return VideoError("storage", f"{self.video_uri}: read failed {where}: {err}")
        if self._ends_at_eof(packet):
            return VideoError("truncated", f"{self.video_uri}: the file ends inside a packet {where} (cut short?): {_msg(err)}")
        return VideoError("decode", f"{self.video_uri}: reading packets failed {where}: {_msg(err)}")

    def _ends_at_eof(self, packet, slack: int | None = None) -> bool:
        """Does ``packet`` end within ``slack`` bytes of the end of the file (default: two of
        the largest packets read, at least 4 KiB, which covers container headers between packets)?"""
        if packet is None or packet.pos is None or packet.pos < 0:
            return False
        if slack is None:
            slack = max(4096, 2 * self._largest_packet)
        return packet.pos + packet.size >= self._file_size - slack

    def _where(self, packet) -> str:
        if packet is not None and packet.pts is not None and not self._no_timestamps:
            return f"near {max(packet.pts * self._time_base - self._origin_s, 0.0):.2f} s"
        return f"at byte {packet.pos}" if packet is not None and packet.pos is not None else "at the start"


def is_still_format(demuxer: str) -> bool:
    """Whether FFmpeg's demuxer ``demuxer`` reads still images: ``image2`` and the single-picture
    ``*_pipe`` demuxers (``png_pipe``, ``jpeg_pipe``, ``webp_pipe``, ...). PyAV opens such a file
    as a one-frame stream whose frame is shown from time 0 (for 1/25 s, FFmpeg's default rate).
    A GIF has a demuxer of its own (``gif``) and counts as video, animated or not."""
    return any(name == "image2" or (name.endswith("_pipe") and name != "image2pipe") for name in demuxer.split(","))


def _parse_duration_tag(value: str | None) -> float | None:
    """``"HH:MM:SS.fffffffff"`` (Matroska's per-stream DURATION tag) -> seconds; None if absent or malformed."""
    if not value:
        return None
    try:
        hours, minutes, seconds = value.strip().split(":")
        total = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError:
        return None
    return total if total > 0 else None


def _next_time(pts: int, ahead: deque, time_base: float, origin_s: float) -> float:
    """When the frame after ``pts`` (in display order) is shown, from the packets ahead; inf if unknown."""
    later = [p.pts for p in ahead if p.pts is not None and p.pts > pts]
    return min(later) * time_base - origin_s if later else math.inf


class _Wanted:
    """The plan's wanted times in time order, and the clips being filled from them."""

    def __init__(self, plan: list[Clip]):
        self.plan = plan
        order = sorted((t, clip_pos, i) for clip_pos, clip in enumerate(plan) for i, t in enumerate(clip.timestamps))
        self.times = [t for t, _, _ in order]
        self.slots = [(clip_pos, i) for _, clip_pos, i in order]
        self.frames: list[list[np.ndarray | None]] = [[None] * len(c.timestamps) for c in plan]
        self.missing = [len(c.timestamps) for c in plan]
        self.w = 0  # index of the next wanted time
        self.next_to_yield = 0

    def done(self) -> bool:
        return self.w >= len(self.times)

    def next_time(self) -> float:
        return self.times[self.w]

    def last_time(self) -> float:
        return self.times[-1]

    def next_clip(self) -> int:
        return self.plan[self.next_to_yield].clip_index

    def shows_in(self, start_s: float, end_s: float) -> bool:
        """Is any wanted time (still to come or already served) in [start_s, end_s)?"""
        j = bisect.bisect_left(self.times, start_s - _TIME_EPS)
        return j < len(self.times) and self.times[j] + _TIME_EPS < end_s

    def assign(self, entry: list, upto: float, convert) -> None:
        """Give ``entry``'s frame ([frame, time, array]) to every wanted time before ``upto``."""
        while self.w < len(self.times) and self.times[self.w] + _TIME_EPS < upto:
            if entry[2] is None:
                entry[2] = convert(entry[0])
            clip_pos, i = self.slots[self.w]
            self.frames[clip_pos][i] = entry[2]
            self.missing[clip_pos] -= 1
            self.w += 1

    def ready(self) -> Iterator[tuple[Clip, np.ndarray]]:
        while self.next_to_yield < len(self.plan) and self.missing[self.next_to_yield] == 0:
            frames = np.stack(self.frames[self.next_to_yield])  # T x (H, W, C) -> (T, H, W, C)
            self.frames[self.next_to_yield] = []
            yield self.plan[self.next_to_yield], frames
            self.next_to_yield += 1


def _msg(err: BaseException) -> str:
    """One short line for an error: FFmpeg's reason without its errno and file name."""
    text = (getattr(err, "strerror", None) or str(err)).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def probe(video_uri: str, limits: DecodeLimits | None = None) -> VideoInfo:
    """Open a video, read its stream header, close it.

    Raises:
        VideoError: as ``VideoReader``.
    """
    with VideoReader(video_uri, limits=limits) as reader:
        return reader.info


def read_clip(video_uri: str, clip: Clip, size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames of one clip, uint8 ``(T, H, W, 3)``: a convenience for training and tests."""
    with VideoReader(video_uri, size) as reader:
        for _, frames in reader.clips([clip]):
            return frames
    raise VideoError("decode", f"{video_uri}: no frames for clip at {clip.start_s:.2f} s")
