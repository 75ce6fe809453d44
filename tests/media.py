"""Test media made by the tests themselves: videos whose frames say which frame they are."""

from __future__ import annotations

from fractions import Fraction

import numpy as np


def index_frame(i: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A flat frame whose grey level encodes its index (survives lossy compression): 8*i + 4."""
    h, w = size
    return np.full((h, w, 3), min(255, 8 * i + 4), np.uint8)


def frame_index(frame: np.ndarray) -> int:
    """Inverse of ``index_frame``, from the mean grey level."""
    return int(round((float(frame.mean()) - 4) / 8))


def code_frame(i: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A frame that encodes ``i`` < 1024 in two flat halves: top ``i % 32``, bottom ``i // 32``.

    Each half's grey level is 8*digit + 4, as in ``index_frame``, so the number survives lossy
    compression; ``index_frame`` alone can only count to 31.
    """
    if not 0 <= i < 1024:
        raise ValueError(f"code_frame encodes 0..1023, got {i}")
    h, w = size
    frame = np.empty((h, w, 3), np.uint8)
    frame[: h // 2] = 8 * (i % 32) + 4
    frame[h // 2 :] = 8 * (i // 32) + 4
    return frame


def frame_code(frame: np.ndarray) -> int:
    """Inverse of ``code_frame``, from the mean grey level of each half (away from the border)."""
    h = frame.shape[0]
    margin = max(1, h // 8)

    def digit(part: np.ndarray) -> int:
        return int(round((float(part.mean()) - 4) / 8))

    return digit(frame[margin : h // 2 - margin]) + 32 * digit(frame[h // 2 + margin : h - margin])


def write_video(path: str, frames: np.ndarray, fps: int = 10, codec: str = "libx264", pts: list[int] | None = None,
                time_base: Fraction | None = None, container_format: str | None = None, options: dict | None = None,
                pix_fmt: str = "yuv420p", container_options: dict | None = None, rotation: int | None = None) -> str:
    """Encode uint8 (T, H, W, 3) frames; ``pts`` in ``time_base`` units gives variable frame rate.

    Args:
        options: encoder options (default for libx264: near-lossless ``crf 10``, ``ultrafast``).
        pix_fmt: the stream's pixel format (``yuv420p10le`` for 10-bit, ``yuv444p`` for odd sizes).
        container_options: muxer options, e.g. ``{"movflags": "faststart"}`` (index at the front).
        rotation: a display matrix turning the frames this many degrees counterclockwise for display.
    """
    import av

    with av.open(path, mode="w", format=container_format, options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = pix_fmt
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        stream.options = options or ({"crf": "10", "preset": "ultrafast"} if codec == "libx264" else {})
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pix_fmt != "yuv420p":
                frame = frame.reformat(format=pix_fmt)
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_streams(path: str, videos: list[np.ndarray] = (), audio_seconds: float = 0.0, cover: np.ndarray | None = None,
                  fps: int = 10, container_format: str | None = None) -> str:
    """A file with several streams: one libx264 stream per item of ``videos`` (in that order),
    an AAC audio stream of ``audio_seconds`` (silence) if > 0, and an MJPEG cover picture
    (an ``attached_pic`` video stream) if ``cover`` is given."""
    import av

    with av.open(path, mode="w", format=container_format) as container:
        video_streams = []
        for frames in videos:
            stream = container.add_stream("libx264", rate=fps)
            stream.height, stream.width = frames.shape[1], frames.shape[2]
            stream.pix_fmt = "yuv420p"
            stream.options = {"crf": "10", "preset": "ultrafast"}
            video_streams.append((stream, frames))
        audio = container.add_stream("aac", rate=16000) if audio_seconds > 0 else None
        picture = None
        if cover is not None:
            picture = container.add_stream("mjpeg")
            picture.height, picture.width = cover.shape[0], cover.shape[1]
            picture.pix_fmt = "yuvj420p"
            picture.disposition = av.stream.Disposition.attached_pic
        for stream, frames in video_streams:
            for array in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        if audio is not None:
            chunk = np.zeros((1, 1024), np.float32)
            for k in range(int(audio_seconds * 16000 / 1024)):
                frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                frame.sample_rate, frame.pts = 16000, k * 1024
                for packet in audio.encode(frame):
                    container.mux(packet)
            for packet in audio.encode():
                container.mux(packet)
        if picture is not None:
            frame = av.VideoFrame.from_ndarray(cover, format="rgb24").reformat(format="yuvj420p")
            for packet in [*picture.encode(frame), *picture.encode()]:
                container.mux(packet)
    return path


def truncate_file(src: str, dst: str, keep: float = 0.5) -> str:
    """Copy the first ``keep`` share of ``src``'s bytes to ``dst``: a transfer cut short."""
    with open(src, "rb") as f:
        data = f.read()
    with open(dst, "wb") as f:
        f.write(data[: int(len(data) * keep)])
    return dst


def corrupt_file(src: str, dst: str, at: float = 0.5, length: int = 2000, seed: int = 0) -> str:
    """Copy ``src`` to ``dst`` with ``length`` bytes from ``at`` (share of the size) replaced by noise."""
    with open(src, "rb") as f:
        data = bytearray(f.read())
    start = int(len(data) * at)
    data[start : start + length] = np.random.default_rng(seed).integers(0, 256, min(length, len(data) - start), dtype=np.uint8).tobytes()
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return dst


def export_untrained_model(out: str, task: str = "classify", **config_overrides) -> str:
    """Write a randomly initialised model of ``task`` as an exported model folder (``rnnimg.checkpoint``)."""
    import torch

    from rnnimg import checkpoint, tasks

    torch.manual_seed(0)
    job = tasks.get(task)
    config = job.config_from_dict(config_overrides)
    checkpoint.save(out, job.build_model(config).state_dict(), job.name, job.config_to_dict(config), labels=job.labels(config))
    return out


def write_many_streams(path: str, count: int, size: int = 16) -> str:
    """A file with ``count`` MJPEG video streams of one grey ``size`` x ``size`` frame each."""
    import av

    with av.open(path, mode="w") as container:
        streams = []
        for _ in range(count):
            stream = container.add_stream("mjpeg", rate=1)
            stream.height = stream.width = size
            stream.pix_fmt = "yuvj420p"
            streams.append(stream)
        grey = np.full((size, size, 3), 128, np.uint8)
        for stream in streams:
            frame = av.VideoFrame.from_ndarray(grey, format="rgb24").reformat(format="yuvj420p")
            for packet in [*stream.encode(frame), *stream.encode()]:
                container.mux(packet)
    return path


def lie_about_duration(src: str, dst: str, seconds: float) -> str:
    """Copy a Matroska file written by PyAV to ``dst`` claiming ``seconds`` of video.

    The Segment Info ``Duration`` (EBML id 0x4489, an 8-byte float in milliseconds at the
    default TimecodeScale) gets ``seconds``, and the video track's ``DURATION`` tag, which the
    demuxer would prefer for the stream, is renamed ``COMMENTS``: the lie is all it sees.
    """
    import struct

    with open(src, "rb") as f:
        data = bytearray(f.read())
    header_end = data.find(b"\x1f\x43\xb6\x75")  # the first Cluster: the header is before it
    at = data.find(b"\x44\x89\x88")  # Duration, 8 bytes long
    if not 0 < at < header_end:
        raise ValueError(f"{src}: no 8-byte Segment Info Duration before the first cluster")
    struct.pack_into(">d", data, at + 3, seconds * 1000.0)
    tag = data.find(b"DURATION")
    if tag >= 0:
        data[tag : tag + 8] = b"COMMENTS"
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return dst


def lie_about_frame_size(src: str, dst: str, width: int, height: int) -> str:
    """Copy an MJPEG-in-AVI file to ``dst`` claiming ``width`` x ``height`` pictures everywhere:
    in the AVI main header (``avih``), the stream format (``strf``, a BITMAPINFOHEADER) and
    every JPEG frame header (SOF0). The frames still hold the small picture's bytes."""
    import struct

    with open(src, "rb") as f:
        data = bytearray(f.read())
    avih, strf = data.find(b"avih"), data.find(b"strf")
    if avih < 0 or strf < 0:
        raise ValueError(f"{src}: not an AVI file (no avih or strf chunk)")
    struct.pack_into("<II", data, avih + 8 + 32, width, height)  # dwWidth, dwHeight
    struct.pack_into("<ii", data, strf + 8 + 4, width, height)  # biWidth, biHeight
    at, frames = data.find(b"\xff\xc0"), 0
    while at >= 0:  # SOF0: marker, length (2), precision (1), height (2), width (2)
        struct.pack_into(">HH", data, at + 5, height, width)
        frames += 1
        at = data.find(b"\xff\xc0", at + 9)
    if not frames:
        raise ValueError(f"{src}: no baseline JPEG frame header (SOF0)")
    with open(dst, "wb") as f:
        f.write(bytes(data))
    return dst
