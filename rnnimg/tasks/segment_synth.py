"""A synthetic temporal-segmentation archive: which of several identical objects move?

Each video shows 3-5 objects of one shape and one colour (the same for all of them) on a
textured background that itself drifts in a random direction, with sensor noise. Some objects
(at least one, at least one fewer than all) travel at constant speed, bouncing off the frame's
edges; the others stay where they are. The target is the mask of the moving objects.

Why a single frame cannot answer: moving and staying objects look the same and are drawn
from the same spatial distribution (bouncing paths cover the frame about uniformly), and the
background moves too, so "anything that changes" is no answer either. Only how an object's
position changes over the frames says whether it belongs to the mask.

Layout (``OUT`` a local folder or ``s3://``)::

    OUT/videos/<split>/<split>-<nnnnn>.mp4   H.264, ``size`` x ``size``, ``fps`` frames/s, ``seconds`` long
    OUT/masks/<split>/<split>-<nnnnn>.npz    lossless truth: ``masks`` uint8 (T, H, W) in {0, 1},
                                             ``times`` float64 (T,) seconds (frame i at i / fps),
                                             ``fps`` float64 scalar
    OUT/manifest.parquet                     ``video_uri``, ``mask_uri`` (absolute), ``split``
                                             (train / val / test; "unlabelled" rows: mask_uri null)

Everything is reproducible from ``seed``: each video has its own seed drawn from it, so the
archive is the same however many processes render it.

    rnnimg synth OUT --task segment --videos 200 --seed 0
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa

from rnnimg import storage
from rnnimg.synth import DriftingTexture, encode_video, render_all, split_counts


@dataclass(frozen=True)
class SegmentSynthConfig:
    """Parameters of the synthetic segmentation archive."""

    videos: int = 200  # videos, split into train / val / test
    unlabelled: int = 0  # extra videos without a mask (split "unlabelled", mask_uri null): input for labelling
    seed: int = 0  # everything is reproducible from this seed
    size: int = 64  # frame height and width, pixels
    fps: int = 12  # frames per second of the encoded video
    seconds: float = 4.0  # length of each video
    val_fraction: float = 0.15  # share of videos in the validation split
    test_fraction: float = 0.15  # share of videos in the test split
    crf: int = 14  # x264 quality (lower is better): high, so that compression does not tell the moving ones apart

    def __post_init__(self) -> None:
        if self.videos < 3:
            raise ValueError(f"videos must be >= 3 (one per split), got {self.videos}")
        if self.unlabelled < 0:
            raise ValueError(f"unlabelled must be >= 0, got {self.unlabelled}")
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be an even number >= 32, got {self.size}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")


def render_video(rng: np.random.Generator, size: int = 64, fps: int = 12, seconds: float = 4.0) -> tuple[np.ndarray, np.ndarray]:
    """Render one video and its truth.

    Returns:
        ``(frames, masks)``: uint8 (T, size, size, 3) and uint8 (T, size, size) in {0, 1},
        the mask of the moving objects in each frame.
    """
    n = max(1, int(round(fps * seconds)))
    t = np.arange(n) / fps
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)

    background = DriftingTexture(rng, size, blob_radius=(1.0, 2.5), speed=(2.0, 6.0))

    # The objects: one look for all; some bounce around, the others stay.
    count = int(rng.integers(3, 6))
    moving = int(rng.integers(1, count))
    radius = rng.uniform(4.0, 6.0) * size / 64
    color = rng.uniform(150, 255, 3) * rng.permutation([1.0, 1.0, 0.3])  # bright, saturated
    square = bool(rng.integers(2))
    low, high = radius, size - radius
    start = rng.uniform(low, high, (count, 2))  # (x, y) of each object
    angle = rng.uniform(0, 2 * np.pi, count)
    speed = rng.uniform(10.0, 18.0, count) * size / 64  # pixels per second
    velocity = np.stack([np.cos(angle), np.sin(angle)], 1) * speed[:, None]
    velocity[moving:] = 0.0

    frames = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    span = high - low
    for i, ti in enumerate(t):
        frame = background.at(ti)
        travelled = start - low + velocity * ti
        position = low + span - np.abs(np.mod(travelled, 2 * span) - span)  # bouncing off the edges
        for k in range(count - 1, -1, -1):  # staying objects first, moving ones drawn on top
            cx, cy = position[k]
            if square:
                shape = (np.abs(xx - cx) <= radius * 0.85) & (np.abs(yy - cy) <= radius * 0.85)
            else:
                shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius * radius
            frame[shape] = color
            if k < moving:
                masks[i][shape] = 1
        frame += rng.normal(0.0, 5.0, frame.shape).astype(np.float32)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
    return frames, masks


def mask_bytes(masks: np.ndarray, fps: float) -> bytes:
    """The ``.npz`` truth file of a video: ``masks`` (T, H, W) uint8, ``times`` (T,) seconds, ``fps``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, masks=masks.astype(np.uint8), times=np.arange(len(masks)) / float(fps), fps=np.float64(fps))
    return buffer.getvalue()


def _write_one(job: tuple[str, str, int, SegmentSynthConfig]) -> None:
    video_uri, mask_uri, video_seed, config = job
    frames, masks = render_video(np.random.default_rng(video_seed), config.size, config.fps, config.seconds)
    storage.write_bytes(video_uri, encode_video(frames, config.fps, crf=config.crf))
    if mask_uri:
        storage.write_bytes(mask_uri, mask_bytes(masks, config.fps))


def make_archive(out: str, config: SegmentSynthConfig = SegmentSynthConfig(), processes: int | None = None) -> str:
    """Write ``config.videos`` videos with masks, ``config.unlabelled`` without, and a manifest under ``out`` (layout: module docstring).

    Args:
        processes: rendering processes (default: one per CPU core).

    Returns:
        The manifest's location.
    """
    rng = np.random.default_rng(config.seed)
    rows: dict[str, list] = {"video_uri": [], "mask_uri": [], "split": []}
    jobs = []
    for split, count in split_counts(config.videos, config.val_fraction, config.test_fraction, config.unlabelled).items():
        for index in range(count):
            video_uri = storage.join(out, "videos", split, f"{split}-{index:05d}.mp4")
            mask_uri = None if split == "unlabelled" else storage.join(out, "masks", split, f"{split}-{index:05d}.npz")
            jobs.append((video_uri, mask_uri, int(rng.integers(2**63)), config))
            rows["video_uri"].append(storage.normalize(video_uri))
            rows["mask_uri"].append(mask_uri and storage.normalize(mask_uri))
            rows["split"].append(split)
    render_all(_write_one, jobs, processes)
    manifest = storage.join(out, "manifest.parquet")
    schema = pa.schema([("video_uri", pa.string()), ("mask_uri", pa.string()), ("split", pa.string())])
    table = pa.table(rows, schema=schema).replace_schema_metadata({"rnnimg.synth": str(asdict(config))})
    storage.write_table(table, manifest)
    return manifest
