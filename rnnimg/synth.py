"""A labelled synthetic motion archive, made with numpy and encoded to H.264 with PyAV.

Each video shows one disc of random colour, size and speed moving along a straight line
over a cluttered background that itself drifts in a random direction, with sensor noise.
The class is the direction of travel: ``left`` or ``right`` (the line's angle is random
within +-45 degrees of horizontal).

Why these two classes: a clip moving right played backwards is a clip moving left with the
same frames, and start points, angles and speeds are drawn symmetrically, so the *set* of
frames has the same distribution for both classes. Neither a single frame nor a shuffled
order of the frames carries the class; only the order does. (Four classes left/right/up/down
would leak the axis of motion through the set of positions, so a frame-shuffled model would
score 0.5, not chance.)

    rnnimg synth OUT --videos 240 --seed 0
"""

from __future__ import annotations

import io
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from rnnimg import storage

LABELS = ("left", "right")


def check_archive_config(config, min_size: int) -> None:
    """The fields every synthetic archive config has: ``videos`` (>= 3, one per split), ``unlabelled``,
    ``size`` (even, >= ``min_size``), ``fps``, ``seconds``.

    Raises:
        ValueError: a field out of range (the message names it and its value).
    """
    if config.videos < 3:
        raise ValueError(f"videos must be >= 3 (one per split), got {config.videos}")
    if config.unlabelled < 0:
        raise ValueError(f"unlabelled must be >= 0, got {config.unlabelled}")
    if config.size < min_size or config.size % 2:
        raise ValueError(f"size must be an even number >= {min_size}, got {config.size}")
    if config.fps < 1:
        raise ValueError(f"fps must be >= 1, got {config.fps}")
    if not config.seconds > 0:
        raise ValueError(f"seconds must be > 0, got {config.seconds}")


@dataclass(frozen=True)
class SynthConfig:
    """Parameters of the synthetic archive."""

    videos: int = 240  # labelled videos, split into train / val / test
    unlabelled: int = 4  # extra videos with no label (split "unlabelled")
    seed: int = 0  # everything is reproducible from this seed
    size: int = 64  # frame height and width, pixels
    fps: int = 12  # frames per second of the encoded video
    seconds: float = 4.0  # length of each video
    val_fraction: float = 0.15  # share of labelled videos in the validation split
    test_fraction: float = 0.15  # share of labelled videos in the test split
    crf: int = 18  # x264 quality (lower is better); high enough that the object survives

    def __post_init__(self) -> None:
        check_archive_config(self, min_size=16)


class DriftingTexture:
    """The cluttered background of the synthetic tasks: a tiled texture of small blobs drifting in a
    random direction, so that neither a still background nor a single frame gives anything away."""

    def __init__(self, rng: np.random.Generator, size: int, blob_radius: tuple[float, float] = (1.0, 3.0),
                 speed: tuple[float, float] = (0.0, 4.0)):
        self.size, self.tile = size, 2 * size
        texture = rng.uniform(40, 110, (self.tile, self.tile, 3)).astype(np.float32)
        for _ in range(int(size * size / 40)):
            cy, cx = rng.uniform(0, self.tile, 2)
            r = rng.uniform(*blob_radius)
            blob = ((np.arange(self.tile)[:, None] - cy) ** 2 + (np.arange(self.tile)[None, :] - cx) ** 2) <= r * r
            texture[blob] = rng.uniform(0, 255, 3)
        self.texture = texture
        self.angle = rng.uniform(0, 2 * np.pi)
        self.speed = rng.uniform(*speed)  # pixels per second

    def at(self, t: float) -> np.ndarray:
        """The background at time ``t`` seconds: float32 (size, size, 3), a copy to draw on."""
        oy = int(round(t * self.speed * np.sin(self.angle))) % self.tile
        ox = int(round(t * self.speed * np.cos(self.angle))) % self.tile
        return np.roll(self.texture, (oy, ox), axis=(0, 1))[: self.size, : self.size].copy()


def render_video(label: str, rng: np.random.Generator, size: int = 64, fps: int = 12, seconds: float = 4.0) -> np.ndarray:
    """Render one video of the motion task.

    Args:
        label: ``left`` or ``right``: the direction the disc travels.
        rng: source of every random choice.

    Returns:
        uint8 frames ``(T, size, size, 3)``.
    """
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    n = max(1, int(round(fps * seconds)))
    t = np.arange(n) / fps
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    background = DriftingTexture(rng, size, blob_radius=(1.0, 3.0), speed=(0.0, 4.0))

    # The object: a disc moving along a line at +-45 degrees of horizontal, across most of the frame.
    radius = rng.uniform(4.0, 7.0)
    color = rng.uniform(0, 255, 3)
    angle = rng.uniform(-np.pi / 4, np.pi / 4) + (np.pi if label == "left" else 0.0)
    speed = rng.uniform(0.6, 0.9) * (size - 2 * radius) / seconds  # pixels per second
    travel = speed * seconds
    direction = np.array([np.cos(angle), np.sin(angle)])
    # Start anywhere such that the whole path stays inside the frame.
    lo = radius + np.maximum(0.0, -direction * travel)
    hi = size - radius - np.maximum(0.0, direction * travel)
    start = rng.uniform(lo, np.maximum(lo, hi))

    frames = np.empty((n, size, size, 3), np.uint8)
    for i, ti in enumerate(t):
        frame = background.at(ti)
        cx, cy = start + direction * speed * ti
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius
        frame[disc] = color
        frame += rng.normal(0.0, 6.0, frame.shape).astype(np.float32)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames


def encode_video(frames: np.ndarray, fps: int, codec: str = "libx264", crf: int = 18, container_format: str = "mp4") -> bytes:
    """Encode uint8 ``(T, H, W, 3)`` frames to a video file in memory."""
    import av

    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf), "preset": "veryfast"}
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buffer.getvalue()


def split_counts(videos: int, val_fraction: float, test_fraction: float, unlabelled: int) -> dict[str, int]:
    """Videos per split of a synthetic archive: at least one each in val and test, the rest train.

    Raises:
        ValueError: nothing is left for training.
    """
    n_val = max(1, int(round(videos * val_fraction)))
    n_test = max(1, int(round(videos * test_fraction)))
    n_train = videos - n_val - n_test
    if n_train < 1:
        raise ValueError(f"videos={videos} leaves no training videos after the val/test splits")
    return {"train": n_train, "val": n_val, "test": n_test, "unlabelled": unlabelled}


def render_all(write_one, jobs: list, processes: int | None = None, unit: str = "videos") -> None:
    """Run ``write_one(job)`` for every job, in one process per CPU core (default) when there are enough.

    Each job carries its own seed, so the archive is the same however many processes render it.
    Progress goes to stderr (``rnnimg.progress.Counter``, counting ``unit``): a bar on a terminal,
    else a line every ``PLAIN_EVERY_S`` and one at the end.
    """
    from rnnimg.progress import Counter

    progress = Counter("synth", len(jobs), unit)
    workers = max(1, processes or os.cpu_count() or 1)
    if workers == 1 or len(jobs) < 8:
        for job in jobs:
            write_one(job)
            progress.advance()
    else:
        # Spawn, not fork: the parent may hold threads (Ray, the S3 client) that fork would break.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for _ in pool.map(write_one, jobs, chunksize=8):
                progress.advance()
    progress.close()


def _write_one(job: tuple[str, str, int, SynthConfig]) -> None:
    uri, label, video_seed, config = job
    frames = render_video(label, np.random.default_rng(video_seed), config.size, config.fps, config.seconds)
    storage.write_bytes(uri, encode_video(frames, config.fps, crf=config.crf))


def make_archive(out: str, config: SynthConfig = SynthConfig(), processes: int | None = None) -> str:
    """Write ``config.videos + config.unlabelled`` videos and a manifest under ``out``.

    Layout: ``OUT/videos/<split>/<split>-<nnnnn>.mp4`` and ``OUT/manifest.parquet`` with
    columns ``video_uri``, ``label`` (null when unlabelled), ``split``. Each video has its own
    seed drawn from ``config.seed``, so the archive is the same however many processes render it.

    Args:
        processes: rendering processes (default: one per CPU core).

    Returns:
        The manifest's location.
    """
    rng = np.random.default_rng(config.seed)
    counts = split_counts(config.videos, config.val_fraction, config.test_fraction, config.unlabelled)
    rows: dict[str, list] = {"video_uri": [], "label": [], "split": []}
    jobs = []
    for split, count in counts.items():
        labels = [LABELS[i % len(LABELS)] for i in range(count)]  # balanced within each split
        rng.shuffle(labels)
        for index, label in enumerate(labels):
            uri = storage.join(out, "videos", split, f"{split}-{index:05d}.mp4")
            jobs.append((uri, label, int(rng.integers(2**63)), config))
            rows["video_uri"].append(storage.normalize(uri))
            rows["label"].append(None if split == "unlabelled" else label)
            rows["split"].append(split)
    render_all(_write_one, jobs, processes)
    manifest = storage.join(out, "manifest.parquet")
    table = pa.table(rows, schema=pa.schema([("video_uri", pa.string()), ("label", pa.string()), ("split", pa.string())]))
    table = table.replace_schema_metadata({"rnnimg.synth": str(asdict(config))})
    storage.write_table(table, manifest)
    return manifest
