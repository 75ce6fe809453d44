"""Moving digits: a Moving-MNIST-style archive for next-frame prediction, rendered offline.

Each sequence is ``size`` x ``size`` (64) grey frames with two digits (28 x 28 glyphs) that
start at random places, travel at constant speed and bounce off the frame's edges; where they
overlap, the brighter pixel wins (per-pixel maximum), as in Moving MNIST (Srivastava et al.
2015). A sequence of 20 frames is 10 to read and 10 to predict.

The digits: real handwriting, scikit-learn's ``load_digits`` (the UCI optical-recognition set
shipped inside the package, nothing downloaded): 1,797 handwritten 8 x 8 digits (intensities
0-16) by 43 writers, each upscaled to 20 x 20 with bicubic interpolation, normalised to a peak of
1 and centred in a 28 x 28 canvas (MNIST's glyph size and ~20 x 20 box). The digits are split once
by a fixed seed (``DIGIT_SPLIT_SEED``): training sequences draw from 80% of them (``pool="train"``),
validation, test and unlabelled sequences from the other 20% (``pool="heldout"``), so a model is
scored on handwriting it never saw. They are not MNIST (8 x 8 sources, so blurrier, and fewer
writers): results are not comparable number-for-number with published Moving MNIST tables.

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
from functools import lru_cache
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from rnnimg import storage
from rnnimg.synth import encode_video, render_all, split_counts

GLYPH = 28  # glyph canvas, pixels (MNIST's)
MOTION_CLASSES = ("down-right", "down-left", "up-left", "up-right")  # velocity quadrant at the start (y down)
ANOMALIES = ("teleport", "freeze", "reverse")


DIGIT_BOX = 20  # the digit's box inside the glyph canvas, pixels (MNIST's ~20 x 20)
DIGIT_SPLIT_SEED = 2015  # fixes which of the 1,797 digits train and which are held out
HELDOUT_FRACTION = 0.2  # share of the digits kept for validation, test and unlabelled sequences
POOLS = ("train", "heldout")


@lru_cache(maxsize=1)
def digit_glyphs() -> tuple[np.ndarray, np.ndarray]:
    """Every ``load_digits`` digit as a glyph: ``(float32 (1797, 28, 28) in [0, 1], int (1797,) digit)``, cached.

    Each 8 x 8 image (0-16) is upscaled to ``DIGIT_BOX`` x ``DIGIT_BOX`` (bicubic, PIL; the cubic's
    undershoot clipped at 0), divided by its peak and centred in the ``GLYPH`` canvas.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    data = load_digits()
    margin = (GLYPH - DIGIT_BOX) // 2
    glyphs = np.zeros((len(data.images), GLYPH, GLYPH), np.float32)
    for i, image in enumerate(data.images.astype(np.float32)):
        big = np.asarray(Image.fromarray(image, mode="F").resize((DIGIT_BOX, DIGIT_BOX), Image.Resampling.BICUBIC))  # (8, 8) -> (20, 20)
        big = np.clip(big, 0.0, None)
        glyphs[i, margin : margin + DIGIT_BOX, margin : margin + DIGIT_BOX] = big / big.max()
    glyphs.setflags(write=False)
    targets = data.target.astype(np.int64)
    targets.setflags(write=False)
    return glyphs, targets


@lru_cache(maxsize=2)
def digit_pool(pool: str) -> np.ndarray:
    """Indices into ``digit_glyphs()`` of one pool: ``train`` (80%) or ``heldout`` (20%), disjoint, fixed by ``DIGIT_SPLIT_SEED``."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    _, targets = digit_glyphs()
    order = np.random.default_rng(DIGIT_SPLIT_SEED).permutation(len(targets))
    cut = int(round(len(targets) * HELDOUT_FRACTION))
    index = np.sort(order[:cut] if pool == "heldout" else order[cut:])
    index.setflags(write=False)
    return index


def pool_of_split(split: str) -> str:
    """The digits a split's sequences are drawn from: ``train`` for training, ``heldout`` for the rest."""
    return "train" if split == "train" else "heldout"


def render_glyph(digit: int, rng: np.random.Generator, pool: str = "train") -> np.ndarray:
    """One real handwritten ``digit``, drawn at random from ``pool``: float32 (28, 28) in [0, 1], peak 1,
    inside a centred 20 x 20 box like MNIST's.

    Raises:
        ValueError: ``digit`` is not 0-9, or ``pool`` not one of ``POOLS``.
    """
    if not isinstance(digit, (int, np.integer)) or not 0 <= digit <= 9:
        raise ValueError(f"digit must be 0-9, got {digit!r}")
    glyphs, targets = digit_glyphs()
    index = digit_pool(pool)
    candidates = index[targets[index] == digit]
    return glyphs[int(candidates[rng.integers(len(candidates))])].copy()


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
                    anomaly: Anomaly | None = None, digits: int = 2, pool: str = "train") -> tuple[np.ndarray, int]:
    """One moving-digits sequence, its digits drawn from ``pool`` (``train`` or ``heldout``: ``digit_pool``).

    Returns:
        ``(uint8 (frames, size, size) grey, motion class id)``; digits combined by per-pixel maximum.
    """
    if size < GLYPH:
        raise ValueError(f"size must be >= {GLYPH}, got {size}")
    glyphs = [render_glyph(int(rng.integers(10)), rng, pool) for _ in range(digits)]
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


def _write_one(job: tuple[str, str, int, int, DigitsSynthConfig]) -> None:
    split, uri, video_seed, label, config = job
    grey, _ = render_sequence(np.random.default_rng(video_seed), config.frames, config.size, label=label, pool=pool_of_split(split))
    storage.write_bytes(uri, encode_video(to_rgb(grey), config.fps, crf=config.crf))


def plan(out: str, config: DigitsSynthConfig) -> list[tuple[str, str, int, int]]:
    """Every video of an archive: ``(split, video_uri, video seed, motion class id)``, drawn from ``config.seed``.

    ``render_sequence(default_rng(seed), config.frames, config.size, label, pool=pool_of_split(split))``
    gives a video's frames (a test or a bench checks decoded frames against them).
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
    render_all(_write_one, [(split, uri, seed, label, config) for split, uri, seed, label in videos], processes)
    rows = {"video_uri": [storage.normalize(uri) for _, uri, _, _ in videos],
            "label": [None if split == "unlabelled" else MOTION_CLASSES[label] for split, _, _, label in videos],
            "split": [split for split, _, _, _ in videos]}
    manifest = storage.join(out, "manifest.parquet")
    table = pa.table(rows, schema=pa.schema([("video_uri", pa.string()), ("label", pa.string()), ("split", pa.string())]))
    storage.write_table(table.replace_schema_metadata({"rnnimg.synth": str(asdict(config))}), manifest)
    return manifest
