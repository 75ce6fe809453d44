"""Synthetic segmentation archives: which of several identical objects move (videos), and which
shapes have the colour of a far-away marker (still images, ``images=True``).

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

**Still images** (``images=True``, for a spatial model: ``SegmenterConfig(temporal=False,
frames_per_clip=1, spatial="renet")``): 3-6 shapes (discs, squares, diamonds), each coloured from a
small palette, on a mildly textured grey background with sensor noise, and a marker square in one
corner (chosen at random) in one palette colour. The target is the mask of the shapes whose colour
is the marker's: at least one shape matches and at least one does not. Whether a pixel is target
depends on the corner, up to a whole frame away, so a network that sees a few cells around each
pixel cannot tell; shapes keep clear of the corners, so no shape passes for a marker.

    OUT/images/<split>/<split>-<nnnnn>.png   lossless, ``size`` x ``size`` (PyAV opens it as a one-frame video of 0.04 s)
    OUT/masks/<split>/<split>-<nnnnn>.npz    ``masks`` uint8 (1, H, W) in {0, 1}, ``times`` float64 [0.0]
    OUT/manifest.parquet                     the same columns as the video archive

Everything is reproducible from ``seed``: each video has its own seed drawn from it, so the
archive is the same however many processes render it.

    rnnimg synth OUT --task segment --videos 200 --seed 0
    rnnimg synth OUT --task segment --videos 1000 --images      # still images
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from rnnimg import storage
from rnnimg.synth import DriftingTexture, check_archive_config, encode_video, render_all, split_counts


# Saturated colours, far from each other and from the grey background (75..175): each has a channel <= 50 and one >= 200 (RGB).
PALETTE = np.array([(230, 40, 40), (40, 200, 60), (50, 90, 240), (240, 210, 30), (200, 50, 220), (30, 210, 220)], np.float32)


@dataclass(frozen=True)
class SegmentSynthConfig:
    """Parameters of the synthetic segmentation archive."""

    videos: int = 200  # videos (or images), split into train / val / test
    images: bool = False  # still PNG images of the marker-colour rule instead of videos (fps, seconds, crf unused)
    palette: int = 4  # images: colours the shapes and the marker are drawn from (2 to len(PALETTE))
    marker: int = 8  # images: side of the marker square, pixels (2 to size / 4)
    unlabelled: int = 0  # extra videos without a mask (split "unlabelled", mask_uri null): input for labelling
    seed: int = 0  # everything is reproducible from this seed
    size: int = 64  # frame height and width, pixels
    fps: int = 12  # frames per second of the encoded video
    seconds: float = 4.0  # length of each video
    val_fraction: float = 0.15  # share of videos in the validation split
    test_fraction: float = 0.15  # share of videos in the test split
    crf: int = 14  # x264 quality (lower is better): high, so that compression does not tell the moving ones apart

    def __post_init__(self) -> None:
        check_archive_config(self, min_size=32)
        if not isinstance(self.images, bool):
            raise ValueError(f"images must be true or false, got {self.images!r}")
        if not 2 <= self.palette <= len(PALETTE):
            raise ValueError(f"palette must be between 2 and {len(PALETTE)} colours, got {self.palette}")
        if not 2 <= self.marker <= self.size // 4:
            raise ValueError(f"marker must be between 2 and size / 4 = {self.size // 4} pixels, got {self.marker}")


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


class Still(NamedTuple):
    """One rendered still image and its truth."""

    image: np.ndarray  # uint8 (size, size, 3)
    mask: np.ndarray  # uint8 (size, size) in {0, 1}: the shapes of the marker's colour
    marker_corner: int  # 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
    marker_colour: int  # index into PALETTE
    shape_colours: tuple[int, ...]  # index into PALETTE of each shape (at least one equal to marker_colour, one not)


def render_still(rng: np.random.Generator, size: int = 64, palette: int = 4, marker: int = 8) -> Still:
    """Render one still image of the marker-colour rule (module docstring).

    Args:
        palette: how many colours of ``PALETTE`` the shapes and the marker use.
        marker: side of the marker square, pixels.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Background: grey, with a low-contrast texture of soft blobs.
    image = np.full((size, size, 3), rng.uniform(95, 145), np.float32)
    for _ in range(int(size * size / 100)):
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(2.0, 6.0) * size / 64
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] += rng.uniform(-20, 20, 3)
    np.clip(image, 75, 175, out=image)  # far from every palette colour: each has a channel <= 50 and one >= 200

    side = marker
    corner = int(rng.integers(4))
    marker_colour = int(rng.integers(palette))
    top, left = (0 if corner < 2 else size - side), (0 if corner % 2 == 0 else size - side)
    image[top:top + side, left:left + side] = PALETTE[marker_colour]

    count = int(rng.integers(3, 7))
    matching = int(rng.integers(1, count))
    others = [c for c in range(palette) if c != marker_colour]
    colours = [marker_colour] * matching + [int(rng.choice(others)) for _ in range(count - matching)]
    colours = [colours[i] for i in rng.permutation(count)]
    keep_out = side + 3  # shapes stay clear of all four corners' marker squares
    for _ in range(100):  # a layout that leaves no room for the last shapes starts again
        placed: list[tuple[float, float, float]] = []
        for _ in range(200 * count):
            r = rng.uniform(5.0, 8.0) * size / 64
            cx, cy = rng.uniform(r + 1, size - r - 1, 2)
            in_corner = (min(cx, size - cx) - r < keep_out) and (min(cy, size - cy) - r < keep_out)
            if not in_corner and all((cx - x) ** 2 + (cy - y) ** 2 >= (r + q + 2) ** 2 for x, y, q in placed):
                placed.append((cx, cy, r))
                if len(placed) == count:
                    break
        if len(placed) == count:
            break
    else:
        raise RuntimeError(f"could not place {count} shapes without overlap in a {size}x{size} image with a {side}-pixel marker")
    mask = np.zeros((size, size), np.uint8)
    for colour, (cx, cy, r) in zip(colours, placed):
        kind = int(rng.integers(3))
        if kind == 0:
            shape = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        elif kind == 1:
            shape = (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
        else:
            shape = np.abs(xx - cx) + np.abs(yy - cy) <= r * 1.2
        image[shape] = PALETTE[colour]
        if colour == marker_colour:
            mask[shape] = 1
    image += rng.normal(0.0, 3.0, image.shape).astype(np.float32)
    return Still(np.clip(image, 0, 255).astype(np.uint8), mask, corner, marker_colour, tuple(colours))


def encode_png(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3) RGB image as PNG bytes (PyAV's encoder: lossless)."""
    import av

    codec = av.CodecContext.create("png", "w")
    codec.height, codec.width = image.shape[:2]
    codec.pix_fmt = "rgb24"
    packets = codec.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")) + codec.encode(None)
    return b"".join(bytes(packet) for packet in packets)


def mask_bytes(masks: np.ndarray, fps: float) -> bytes:
    """The ``.npz`` truth file of a video: ``masks`` (T, H, W) uint8, ``times`` (T,) seconds, ``fps``."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, masks=masks.astype(np.uint8), times=np.arange(len(masks)) / float(fps), fps=np.float64(fps))
    return buffer.getvalue()


def _write_one(job: tuple[str, str, int, SegmentSynthConfig]) -> None:
    video_uri, mask_uri, video_seed, config = job
    if config.images:
        still = render_still(np.random.default_rng(video_seed), config.size, config.palette, config.marker)
        storage.write_bytes(video_uri, encode_png(still.image))
        if mask_uri:
            storage.write_bytes(mask_uri, mask_bytes(still.mask[None], 1.0))  # (1, H, W), times [0.0]
        return
    frames, masks = render_video(np.random.default_rng(video_seed), config.size, config.fps, config.seconds)
    storage.write_bytes(video_uri, encode_video(frames, config.fps, crf=config.crf))
    if mask_uri:
        storage.write_bytes(mask_uri, mask_bytes(masks, config.fps))


def make_archive(out: str, config: SegmentSynthConfig = SegmentSynthConfig(), processes: int | None = None) -> str:
    """Write ``config.videos`` videos (``config.images``: PNG images) with masks, ``config.unlabelled`` without,
    and a manifest under ``out`` (layout: module docstring).

    Args:
        processes: rendering processes (default: one per CPU core).

    Returns:
        The manifest's location.
    """
    rng = np.random.default_rng(config.seed)
    rows: dict[str, list] = {"video_uri": [], "mask_uri": [], "split": []}
    jobs = []
    folder, extension = ("images", "png") if config.images else ("videos", "mp4")
    for split, count in split_counts(config.videos, config.val_fraction, config.test_fraction, config.unlabelled).items():
        for index in range(count):
            video_uri = storage.join(out, folder, split, f"{split}-{index:05d}.{extension}")
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
