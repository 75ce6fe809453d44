"""A synthetic archive for recognising objects through occlusion: what is where in every frame,
also while it is hidden.

Each video shows up to one object of each of ``K`` classes (``disc``, ``square``, ``triangle``;
random colour and size) moving at constant velocity over a drifting, cluttered background
(``rnnimg.synth.DriftingTexture``). Objects start anywhere along an extended frame, so some
enter and some leave during the video. One or two opaque bars (``occluders``, random colour and
width, drifting slowly) cross the frame and are drawn on top of the objects: an object that
passes behind one is partly, then fully hidden for up to about two seconds, then comes out on
the other side. Objects are drawn (in random depth order) under the bars; half of the videos
are transposed, so that bars run both ways.

Every object is first seen uncovered: a path whose first frame in the scene is fully covered
is drawn again. Where an object is while hidden is knowable only from where it was and how it
moved, which is the point: a per-frame model cannot say it, a recurrent one can.

Truth per frame for every object that has at least one pixel inside the frame, visible or not:

- ``inside``: share of the object's pixels inside the frame (0: not in the scene);
- ``boxes``: the box of its pixels inside the frame, normalised ``x0, y0, x1, y1`` in [0, 1]
  (pixel edges over the frame size), whether visible or not;
- ``visible``: share of its in-frame pixels not covered by a bar or another object (0 when hidden).

Layout (``OUT`` a local folder or ``s3://``)::

    OUT/videos/<split>/<split>-<nnnnn>.mp4   H.264, ``size`` x ``size``, ``fps`` frames/s, ``seconds`` long
    OUT/objects/<split>/<split>-<nnnnn>.npz  lossless truth: ``labels`` (K,) str, ``times`` float64 (T,)
                                             seconds (frame i at i / fps), ``fps``, ``inside`` float32
                                             (T, K), ``boxes`` float32 (T, K, 4), ``visible`` float32 (T, K)
    OUT/manifest.parquet                     ``video_uri``, ``objects_uri`` (absolute), ``split``
                                             ("unlabelled" rows: objects_uri null)

Everything is reproducible from ``seed``: each video has its own seed drawn from it.

    rnnimg synth OUT --task objects --videos 300 --seed 0
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from rnnimg import storage
from rnnimg.synth import DriftingTexture, check_archive_config, encode_video, render_all, split_counts

LABELS = ("disc", "square", "triangle")
OCCLUDER = 255  # layer id of a bar in Scene.layers (objects are 1..K, background 0)


@dataclass(frozen=True)
class ObjectsSynthConfig:
    """Parameters of the synthetic objects-through-occlusion archive."""

    videos: int = 300  # videos with truth, split into train / val / test
    unlabelled: int = 0  # extra videos without truth (split "unlabelled", objects_uri null): input for labelling
    seed: int = 0  # everything is reproducible from this seed
    size: int = 64  # frame height and width, pixels
    fps: int = 12  # frames per second of the encoded video
    seconds: float = 4.0  # length of each video
    val_fraction: float = 0.15  # share of videos in the validation split
    test_fraction: float = 0.15  # share of videos in the test split
    crf: int = 16  # x264 quality (lower is better)

    def __post_init__(self) -> None:
        check_archive_config(self, min_size=32)


class Scene(NamedTuple):
    """One rendered video and its truth (``K = len(LABELS)``, ``T`` frames)."""

    frames: np.ndarray  # uint8 (T, H, W, 3)
    inside: np.ndarray  # float32 (T, K): share of the object's pixels inside the frame; 0: class not in the scene
    boxes: np.ndarray  # float32 (T, K, 4): x0, y0, x1, y1 of its in-frame pixels, normalised; 0 where inside == 0
    visible: np.ndarray  # float32 (T, K): share of its in-frame pixels on top; 0 where hidden or absent
    layers: np.ndarray  # uint8 (T, H, W): what is on top at each pixel (0 background, k+1 class k, 255 a bar)
    area: np.ndarray  # int32 (T, K): the object's in-frame pixels


def shape_mask(label: str, xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, radius: float) -> np.ndarray:
    """bool mask of one object of class ``label`` centred at (cx, cy) on the pixel grid (xx, yy) (pixel centres)."""
    dx, dy = xx - cx, yy - cy
    if label == "disc":
        return dx * dx + dy * dy <= radius * radius
    if label == "square":
        return (np.abs(dx) <= radius * 0.8) & (np.abs(dy) <= radius * 0.8)
    if label == "triangle":  # apex up
        return (dy >= -radius) & (dy <= radius * 0.8) & (np.abs(dx) <= (dy + radius) * 0.62)
    raise ValueError(f"label must be one of {LABELS}, got {label!r}")


def render_video(rng: np.random.Generator, size: int = 64, fps: int = 12, seconds: float = 4.0) -> Scene:
    """Render one video and its truth (see the module docstring for what it shows)."""
    n = max(1, int(round(fps * seconds)))
    t = np.arange(n) / fps
    scale = size / 64
    # Pixel centres on an extended grid, so shapes partly outside the frame are measured whole.
    margin = int(16 * scale)
    full = size + 2 * margin
    yy, xx = np.mgrid[0:full, 0:full].astype(np.float32) - margin + 0.5
    inner = (slice(margin, margin + size), slice(margin, margin + size))

    background = DriftingTexture(rng, size, blob_radius=(1.0, 2.5), speed=(0.0, 4.0))

    # Bars: vertical, full height, drifting slowly sideways (the video is transposed half the time).
    bars = []
    for _ in range(int(rng.integers(1, 3))):
        width = rng.uniform(18.0, 26.0) * scale
        centre = rng.uniform(0.25, 0.75) * size
        if any(abs(centre - c) < (width + w) / 2 + 8 * scale for c, w, _, _ in bars):
            continue  # apart, or two bars would hide an object for twice as long
        bars.append((centre, width, rng.uniform(-2.0, 2.0) * scale, rng.uniform(60, 200, 3)))
    covered = np.zeros((n, size, size), bool)
    cols = np.arange(size) + 0.5
    for i, ti in enumerate(t):
        for centre, width, speed, _ in bars:
            c = centre + speed * ti
            covered[i][:, np.abs(cols - c) <= width / 2] = True

    count = int(rng.integers(1, len(LABELS) + 1))
    classes = sorted(rng.choice(len(LABELS), count, replace=False).tolist())
    shapes = {}  # class -> (T, full, full) bool masks of its whole shape
    colours = {}
    for k in classes:
        for _ in range(50):  # redraw the path until the object is first seen uncovered
            radius = rng.uniform(5.0, 7.5) * scale
            speed = rng.uniform(8.0, 16.0) * scale  # pixels per second
            angle = rng.uniform(-0.45, 0.45) + (np.pi if rng.random() < 0.5 else 0.0)
            velocity = speed * np.array([np.cos(angle), np.sin(angle)])
            start = np.array([rng.uniform(-radius, size + radius), rng.uniform(radius, size - radius)])
            masks = np.stack([shape_mask(LABELS[k], xx, yy, *(start + velocity * ti), radius) for ti in t])
            in_frame = masks[:, inner[0], inner[1]]  # (T, full, full) -> (T, size, size)
            share = in_frame.sum((1, 2)) / np.maximum(masks.sum((1, 2)), 1)
            mostly_in = np.flatnonzero(share >= 0.5)
            if len(mostly_in) >= 4:
                first = in_frame[mostly_in[0]]
                if (first & ~covered[mostly_in[0]]).sum() >= 0.5 * first.sum():  # at least half uncovered when it first shows
                    break
        shapes[k] = masks
        colours[k] = rng.uniform(150, 255, 3) * rng.permutation([1.0, 1.0, 0.3])  # bright, saturated
    depth = rng.permutation(classes).tolist()  # drawn first = deepest

    frames = np.empty((n, size, size, 3), np.uint8)
    layers = np.zeros((n, size, size), np.uint8)
    inside = np.zeros((n, len(LABELS)), np.float32)
    boxes = np.zeros((n, len(LABELS), 4), np.float32)
    visible = np.zeros((n, len(LABELS)), np.float32)
    area = np.zeros((n, len(LABELS)), np.int32)
    for i, ti in enumerate(t):
        frame = background.at(ti)
        layer = layers[i]
        for k in depth:
            mask = shapes[k][i][inner]
            frame[mask] = colours[k]
            layer[mask] = k + 1
        for (centre, width, speed, colour) in bars:
            c = centre + speed * ti
            frame[:, np.abs(cols - c) <= width / 2] = colour
        layer[covered[i]] = OCCLUDER
        frame += rng.normal(0.0, 5.0, frame.shape).astype(np.float32)
        frames[i] = np.clip(frame, 0, 255).astype(np.uint8)
        for k in classes:
            whole = int(shapes[k][i].sum())
            mask = shapes[k][i][inner]
            pixels = int(mask.sum())
            if not pixels:
                continue
            rows, columns = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            area[i, k] = pixels
            inside[i, k] = pixels / whole
            boxes[i, k] = (columns[0] / size, rows[0] / size, (columns[-1] + 1) / size, (rows[-1] + 1) / size)
            visible[i, k] = float((layer == k + 1).sum()) / pixels
    if rng.random() < 0.5:  # bars and motion the other way: transpose the video and its truth
        frames = frames.transpose(0, 2, 1, 3)
        layers = layers.transpose(0, 2, 1)
        boxes = boxes[..., [1, 0, 3, 2]]
    return Scene(np.ascontiguousarray(frames), inside, boxes, visible, np.ascontiguousarray(layers), area)


def truth_bytes(scene: Scene, fps: float) -> bytes:
    """The ``.npz`` truth file of a video (layout: module docstring)."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, labels=np.array(LABELS), times=np.arange(len(scene.frames)) / float(fps), fps=np.float64(fps),
                        inside=scene.inside, boxes=scene.boxes, visible=scene.visible)
    return buffer.getvalue()


def _write_one(job: tuple[str, str | None, int, ObjectsSynthConfig]) -> None:
    video_uri, objects_uri, video_seed, config = job
    scene = render_video(np.random.default_rng(video_seed), config.size, config.fps, config.seconds)
    storage.write_bytes(video_uri, encode_video(scene.frames, config.fps, crf=config.crf))
    if objects_uri:
        storage.write_bytes(objects_uri, truth_bytes(scene, config.fps))


def make_archive(out: str, config: ObjectsSynthConfig = ObjectsSynthConfig(), processes: int | None = None) -> str:
    """Write ``config.videos`` videos with truth, ``config.unlabelled`` without, and a manifest under ``out``.

    Args:
        processes: rendering processes (default: one per CPU core).

    Returns:
        The manifest's location.
    """
    rng = np.random.default_rng(config.seed)
    rows: dict[str, list] = {"video_uri": [], "objects_uri": [], "split": []}
    jobs = []
    for split, count in split_counts(config.videos, config.val_fraction, config.test_fraction, config.unlabelled).items():
        for index in range(count):
            video_uri = storage.join(out, "videos", split, f"{split}-{index:05d}.mp4")
            objects_uri = None if split == "unlabelled" else storage.join(out, "objects", split, f"{split}-{index:05d}.npz")
            jobs.append((video_uri, objects_uri, int(rng.integers(2**63)), config))
            rows["video_uri"].append(storage.normalize(video_uri))
            rows["objects_uri"].append(objects_uri and storage.normalize(objects_uri))
            rows["split"].append(split)
    render_all(_write_one, jobs, processes)
    manifest = storage.join(out, "manifest.parquet")
    schema = pa.schema([("video_uri", pa.string()), ("objects_uri", pa.string()), ("split", pa.string())])
    table = pa.table(rows, schema=schema).replace_schema_metadata({"rnnimg.synth": str(asdict(config))})
    storage.write_table(table, manifest)
    return manifest
