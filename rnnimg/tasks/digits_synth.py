"""Moving digits: a Moving-MNIST-style archive for next-frame prediction, rendered offline.

Each sequence is ``size`` x ``size`` (64) grey frames with two digits (28 x 28 glyphs) that
start at random places, travel at constant speed and bounce off the frame's edges; where they
overlap, the brighter pixel wins (per-pixel maximum), as in Moving MNIST (Srivastava et al.
2015). A sequence of 20 frames is 10 to read and 10 to predict.

The digits: no data set can be downloaded here and scikit-learn (whose ``load_digits`` ships
1,797 real 8 x 8 handwritten digits) is not a dependency, so each digit is drawn from stroke
templates (polylines and arcs of the ten digits) with random vertex jitter, a random affine map
(rotation, shear, scale) and a random pen width, anti-aliased. They look hand-drawn, are not
MNIST, and results are therefore not comparable number-for-number with published Moving MNIST
tables.

The motion class (for the conditioned model): the direction both digits start in, one of
``MOTION_CLASSES`` (the quadrant of the velocity, image y pointing down); after a bounce a
digit goes on in the mirrored direction.

Layout (``OUT`` a local folder or ``s3://``)::

    OUT/videos/<split>/<split>-<nnnnn>.mp4   H.264 (crf ``crf``, near-lossless grey), ``fps`` frames/s
    OUT/manifest.parquet                     ``video_uri``, ``label`` (motion class; null when
                                             unlabelled), ``split`` (train / val / test / unlabelled)

Everything is reproducible from ``seed``: each video has its own seed drawn from it.

    rnnimg synth OUT --task predict --seconds 2 --fps 10 --videos 3000   # 20-frame sequences
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from rnnimg import storage
from rnnimg.synth import encode_video, render_all, split_counts

GLYPH = 28  # glyph canvas, pixels (MNIST's)
MOTION_CLASSES = ("down-right", "down-left", "up-left", "up-right")  # velocity quadrant at the start (y down)
ANOMALIES = ("teleport", "freeze", "reverse")


def _arc(cx: float, cy: float, rx: float, ry: float, start_deg: float, end_deg: float, n: int = 24) -> list[tuple[float, float]]:
    a = np.deg2rad(np.linspace(start_deg, end_deg, n))
    return list(zip(cx + rx * np.cos(a), cy + ry * np.sin(a)))


# Strokes of each digit in a unit box (x right, y down): polylines, arcs sampled as polylines.
STROKES: dict[int, list[list[tuple[float, float]]]] = {
    0: [_arc(0.5, 0.5, 0.3, 0.45, 0, 360, 40)],
    1: [[(0.35, 0.2), (0.52, 0.04), (0.52, 0.96)]],
    2: [_arc(0.5, 0.3, 0.27, 0.25, 185, 380) + [(0.2, 0.95), (0.82, 0.95)]],
    3: [_arc(0.5, 0.28, 0.24, 0.22, 200, 450), _arc(0.5, 0.72, 0.27, 0.23, 270, 520)],
    4: [[(0.66, 0.96), (0.66, 0.04), (0.14, 0.68), (0.86, 0.68)]],
    5: [[(0.76, 0.05), (0.32, 0.05), (0.29, 0.47)] + _arc(0.5, 0.66, 0.27, 0.29, 215, 520)],
    6: [[(0.7, 0.05), (0.46, 0.2), (0.3, 0.45), (0.26, 0.7)], _arc(0.5, 0.7, 0.25, 0.25, 0, 360, 32)],
    7: [[(0.18, 0.05), (0.82, 0.05), (0.42, 0.96)]],
    8: [_arc(0.5, 0.27, 0.21, 0.22, 0, 360, 32), _arc(0.5, 0.72, 0.25, 0.24, 0, 360, 32)],
    9: [_arc(0.5, 0.3, 0.24, 0.25, 0, 360, 32), [(0.74, 0.3), (0.7, 0.62), (0.58, 0.96)]],
}


def render_glyph(digit: int, rng: np.random.Generator) -> np.ndarray:
    """One hand-drawn-looking digit: float32 (28, 28) in [0, 1], inside a centred ~20 x 20 box like MNIST's.

    Random: each vertex moved by up to 4% of the box, rotation +-15 degrees, shear +-0.3, scale
    0.85-1.1 per axis, pen width 1.6-3.0 pixels.
    """
    if digit not in STROKES:
        raise ValueError(f"digit must be 0-9, got {digit!r}")
    angle = np.deg2rad(rng.uniform(-15, 15))
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    shear = np.array([[1.0, rng.uniform(-0.3, 0.3)], [0.0, 1.0]])
    scale = np.diag(rng.uniform(0.85, 1.1, 2)) * 19.0  # the unit box -> ~19 pixels
    transform = rotation @ shear @ scale
    pen = rng.uniform(1.6, 3.0)
    points = []
    for stroke in STROKES[digit]:
        vertices = np.asarray(stroke, np.float64) + rng.uniform(-0.04, 0.04, (len(stroke), 2))
        for a, b in zip(vertices[:-1], vertices[1:]):
            steps = max(2, int(np.ceil(np.hypot(*(b - a)) * 60)))
            points.append(a + (b - a) * np.linspace(0, 1, steps)[:, None])
    p = (np.concatenate(points) - 0.5) @ transform.T + GLYPH / 2  # (N, 2) pixel coordinates, box centred
    yy, xx = np.mgrid[0:GLYPH, 0:GLYPH].astype(np.float64) + 0.5
    distance = np.sqrt(((xx.reshape(-1, 1) - p[:, 0]) ** 2 + (yy.reshape(-1, 1) - p[:, 1]) ** 2).min(1))  # (28*28,)
    ink = np.clip(pen / 2 + 0.5 - distance, 0.0, 1.0)  # 1 inside the pen, a one-pixel ramp at its edge
    return ink.reshape(GLYPH, GLYPH).astype(np.float32)


class Anomaly(NamedTuple):
    """Something no ordinary sequence does, to one digit from frame ``at`` on (the surprise bench)."""

    kind: str  # "teleport" (jumps to a far place, then goes on), "freeze" (stops) or "reverse" (turns back)
    at: int  # the first frame that shows it
    digit: int = 0  # which of the digits


def trajectory(rng: np.random.Generator, frames: int, size: int = 64, label: int | None = None, digits: int = 2,
               speed: tuple[float, float] = (2.0, 3.5), anomaly: Anomaly | None = None) -> tuple[np.ndarray, int]:
    """Top-left corners of each digit in each frame, bouncing inside the frame.

    Returns:
        ``(positions int (frames, digits, 2) as (x, y), motion class id)``; the class is ``label``
        when given, else drawn; both digits start in its quadrant (+-30 degrees around the diagonal).
    """
    if label is None:
        label = int(rng.integers(len(MOTION_CLASSES)))
    if not 0 <= label < len(MOTION_CLASSES):
        raise ValueError(f"label must be a class id in 0..{len(MOTION_CLASSES) - 1}, got {label}")
    limit = float(size - GLYPH)  # the corner stays in [0, limit]: the glyph never leaves the frame
    position = rng.uniform(0, limit, (digits, 2))
    angle = np.deg2rad(45 + 90 * label + rng.uniform(-30, 30, digits))
    velocity = np.stack([np.cos(angle), np.sin(angle)], 1) * rng.uniform(*speed, (digits, 1))  # pixels per frame
    out = np.empty((frames, digits, 2), np.int64)
    for t in range(frames):
        if anomaly is not None and t == anomaly.at:
            k = anomaly.digit
            if anomaly.kind == "teleport":
                # A far place: the opposite half of the frame on both axes.
                position[k] = np.where(position[k] < limit / 2, rng.uniform(0.75, 1.0, 2), rng.uniform(0.0, 0.25, 2)) * limit
            elif anomaly.kind == "freeze":
                velocity[k] = 0.0
            elif anomaly.kind == "reverse":
                velocity[k] = -velocity[k]
            else:
                raise ValueError(f"anomaly kind must be one of {ANOMALIES}, got {anomaly.kind!r}")
        if t > 0:
            position += velocity
            for axis in range(2):  # bounce: mirror the overshoot and the velocity
                low, high = position[:, axis] < 0, position[:, axis] > limit
                position[low, axis] = -position[low, axis]
                position[high, axis] = 2 * limit - position[high, axis]
                velocity[low | high, axis] *= -1
        out[t] = np.rint(position).astype(np.int64)
    return out, label


def render_sequence(rng: np.random.Generator, frames: int = 20, size: int = 64, label: int | None = None,
                    anomaly: Anomaly | None = None, digits: int = 2) -> tuple[np.ndarray, int]:
    """One moving-digits sequence.

    Returns:
        ``(uint8 (frames, size, size) grey, motion class id)``; digits combined by per-pixel maximum.
    """
    if size < GLYPH:
        raise ValueError(f"size must be >= {GLYPH}, got {size}")
    glyphs = [render_glyph(int(rng.integers(10)), rng) for _ in range(digits)]
    positions, label = trajectory(rng, frames, size, label, digits, anomaly=anomaly)
    return np.rint(compose(glyphs, positions, size) * 255).astype(np.uint8), label


def compose(glyphs: list[np.ndarray], positions: np.ndarray, size: int) -> np.ndarray:
    """Frames of glyphs (each (g, g) in [0, 1]) at top-left corners ``positions`` (T, n, 2) as (x, y),
    combined by per-pixel maximum: float32 (T, size, size)."""
    canvas = np.zeros((len(positions), size, size), np.float32)
    for t in range(len(positions)):
        for glyph, (x, y) in zip(glyphs, positions[t]):
            window = canvas[t, y : y + glyph.shape[0], x : x + glyph.shape[1]]
            np.maximum(window, glyph, out=window)
    return canvas


def to_rgb(grey: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W) -> uint8 (T, H, W, 3), the decoder's layout."""
    return np.repeat(grey[..., None], 3, axis=-1)


@dataclass(frozen=True)
class DigitsSynthConfig:
    """Parameters of the moving-digits archive."""

    videos: int = 3000  # labelled sequences, split into train / val / test
    unlabelled: int = 0  # extra sequences without a label (split "unlabelled"): input for labelling
    seed: int = 0  # everything is reproducible from this seed
    size: int = 64  # frame height and width, pixels
    fps: int = 10  # frames per second of the encoded video (the motion is in pixels per frame)
    seconds: float = 2.0  # length of each video: 20 frames at 10 fps (10 in, 10 to predict)
    val_fraction: float = 0.1  # share of videos in the validation split
    test_fraction: float = 0.1  # share of videos in the test split
    crf: int = 4  # x264 quality (lower is better): near-lossless, grey survives within a few levels

    def __post_init__(self) -> None:
        if self.videos < 3:
            raise ValueError(f"videos must be >= 3 (one per split), got {self.videos}")
        if self.unlabelled < 0:
            raise ValueError(f"unlabelled must be >= 0, got {self.unlabelled}")
        if self.size < GLYPH or self.size % 2:
            raise ValueError(f"size must be an even number >= {GLYPH}, got {self.size}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if not self.seconds > 0:
            raise ValueError(f"seconds must be > 0, got {self.seconds}")

    @property
    def frames(self) -> int:
        return max(2, int(round(self.fps * self.seconds)))


def _write_one(job: tuple[str, int, int, DigitsSynthConfig]) -> None:
    uri, video_seed, label, config = job
    grey, _ = render_sequence(np.random.default_rng(video_seed), config.frames, config.size, label=label)
    storage.write_bytes(uri, encode_video(to_rgb(grey), config.fps, crf=config.crf))


def plan(out: str, config: DigitsSynthConfig) -> list[tuple[str, str, int, int]]:
    """Every video of an archive: ``(split, video_uri, video seed, motion class id)``, drawn from ``config.seed``.

    ``render_sequence(default_rng(seed), config.frames, config.size, label)`` gives a video's frames
    (a test or a bench checks decoded frames against them).
    """
    rng = np.random.default_rng(config.seed)
    videos = []
    for split, count in split_counts(config.videos, config.val_fraction, config.test_fraction, config.unlabelled).items():
        for index in range(count):
            uri = storage.join(out, "videos", split, f"{split}-{index:05d}.mp4")
            videos.append((split, uri, int(rng.integers(2**63)), int(rng.integers(len(MOTION_CLASSES)))))
    return videos


def make_archive(out: str, config: DigitsSynthConfig = DigitsSynthConfig(), processes: int | None = None) -> str:
    """Write ``config.videos + config.unlabelled`` sequences and a manifest under ``out`` (layout: module docstring).

    Args:
        processes: rendering processes (default: one per CPU core).

    Returns:
        The manifest's location.
    """
    videos = plan(out, config)
    render_all(_write_one, [(uri, seed, label, config) for _, uri, seed, label in videos], processes)
    rows = {"video_uri": [storage.normalize(uri) for _, uri, _, _ in videos],
            "label": [None if split == "unlabelled" else MOTION_CLASSES[label] for split, _, _, label in videos],
            "split": [split for split, _, _, _ in videos]}
    manifest = storage.join(out, "manifest.parquet")
    table = pa.table(rows, schema=pa.schema([("video_uri", pa.string()), ("label", pa.string()), ("split", pa.string())]))
    storage.write_table(table.replace_schema_metadata({"rnnimg.synth": str(asdict(config))}), manifest)
    return manifest
