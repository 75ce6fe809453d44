"""``rnnimg generate``: roll a next-frame model forward and write what it sees as an H.264 video.

    rnnimg generate MODEL --from VIDEO --seconds 4 --out pred.mp4     # truth | prediction, side by side
    rnnimg generate MODEL --label up-left --seed 3 --out gen.mp4      # a conditioned model: a clip of class L

From a video: the model reads the video's first ``context_frames`` frames (sampled at the
model's frame rate, ``frames_per_clip / clip_seconds``) and predicts the frames after them up to
``seconds``; the output shows the truth on the left and, on the right, the frames read followed by
the prediction (a one-pixel grey line separates them).

From a label: a conditioned model (``labels`` in its config) starts from the first
``context_frames`` frames of a fresh moving-digits sequence of that class (``seed`` draws its
digits and positions: ``rnnimg.tasks.digits_synth``) and generates the rest of a clip with the
class as the forecaster's input.

Inference only: imports the model family and the synth, never the training code.
"""

from __future__ import annotations

import numpy as np

from rnnimg import storage

SEPARATOR = 96  # grey level of the line between the two panels


def model_fps(config) -> float:
    """The frame rate a forecaster was trained at: ``frames_per_clip / clip_seconds``."""
    return config.frames_per_clip / config.clip_seconds


def read_frames(video_uri: str, fps: float, count: int, size: int) -> np.ndarray:
    """The first ``count`` frames of a video sampled at ``fps`` (times (i + 0.5) / fps), uint8 (count, size, size, 3).

    A video shorter than that gives fewer frames (those it shows).

    Raises:
        ValueError: the video cannot be opened or decoded (the decoder's reason in the message).
    """
    from rnnimg.video.clips import Clip
    from rnnimg.video.decode import VideoError, VideoReader

    try:
        with VideoReader(video_uri, (size, size)) as reader:
            available = int(np.floor(reader.duration_s * fps + 1e-6)) if reader.duration_s else count
            count = max(1, min(count, available))
            times = tuple((i + 0.5) / fps for i in range(count))
            ((_, frames),) = list(reader.clips([Clip(0, 0.0, count / fps, times)]))
    except VideoError as err:
        raise ValueError(f"cannot read {video_uri}: {err}") from err
    return frames


def side_by_side(left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """uint8 (T, H, W) x 2 -> uint8 (T, H, 2W + 2, 3), grey panels with a separating line (even width for H.264)."""
    t, h, w = left.shape
    out = np.full((t, h, 2 * w + 2), SEPARATOR, np.uint8)
    out[:, :, :w], out[:, :, w + 2 :] = left, right
    return np.repeat(out[..., None], 3, axis=-1)


def _to_uint8(grey) -> np.ndarray:
    """float [0, 1] (T, 1, H, W) tensor or array -> uint8 (T, H, W)."""
    array = np.asarray(grey.float().cpu().numpy() if hasattr(grey, "cpu") else grey)
    return np.rint(np.clip(array[:, 0], 0.0, 1.0) * 255).astype(np.uint8)


def from_video(model_uri: str, video_uri: str, seconds: float, out: str, label: str | None = None) -> dict:
    """Write truth | prediction for the first ``seconds`` of a video (see the module docstring).

    Returns:
        ``{"out", "frames", "context_frames", "predicted_frames", "fps", "mse_per_frame"}`` (the mean
        per-frame MSE of the prediction, summed over pixels, grey in [0, 1]).

    Raises:
        ValueError: the model is not a forecaster, ``seconds`` leaves nothing to predict, or a label
            is missing (conditioned model) or not one of the model's classes.
    """
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.models.forecaster import to_grey
    from rnnimg.synth import encode_video
    from rnnimg.tasks import load_model

    task, model, config, model_id = load_model(model_uri)
    _check_forecaster(task, model_uri)
    fps = model_fps(config)
    total = int(round(seconds * fps))
    if total <= config.context_frames:
        raise ValueError(f"seconds must cover more than the model's {config.context_frames} context frames "
                         f"({config.context_frames / fps:g} s at {fps:g} fps), got {seconds}")
    frames = read_frames(video_uri, fps, total, config.frame_size)
    if len(frames) <= config.context_frames:
        raise ValueError(f"{video_uri} shows {len(frames)} frames at {fps:g} fps, not more than the {config.context_frames} the model reads")
    labels = _label_ids(config, label)
    clip = to_model_input(frames)  # (T, H, W, 3) -> (1, T, 3, H, W)
    steps = len(frames) - config.context_frames
    with torch.inference_mode():
        predicted = model.rollout(clip, steps, labels)[0]  # (1, steps, 1, H, W) -> (steps, 1, H, W)
        truth = to_grey(clip)[0]  # (T, 1, H, W) in [0, 1]
        mse = float(((predicted - truth[config.context_frames :]) ** 2).sum((1, 2, 3)).mean())
    left = _to_uint8(truth)
    right = np.concatenate([left[: config.context_frames], _to_uint8(predicted)])
    storage.write_bytes(out, encode_video(side_by_side(left, right), int(round(fps))))
    return {"out": out, "model_id": model_id, "frames": len(frames), "context_frames": config.context_frames,
            "predicted_frames": steps, "fps": fps, "mse_per_frame": round(mse, 3)}


def generate_clip(model, config, label_id: int, seed: int) -> np.ndarray:
    """A conditioned model's clip of class ``label_id``: uint8 (frames_per_clip, H, W) grey, the first
    ``context_frames`` from a fresh sequence drawn from ``seed``, the rest generated."""
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks.digits_synth import render_sequence, to_rgb

    # The first frames from the held-out handwriting (digits_synth.digit_pool): digits no training sequence drew.
    grey, _ = render_sequence(np.random.default_rng(seed), config.context_frames, config.frame_size, label=label_id, pool="heldout")
    clip = to_model_input(to_rgb(grey))  # (K, H, W) -> (1, K, 3, H, W)
    labels = torch.tensor([label_id]) if config.labels else None
    with torch.inference_mode():
        predicted = model.rollout(clip, config.future_frames, labels)[0]  # (F, 1, H, W)
    return np.concatenate([grey, _to_uint8(predicted)])


def from_label(model_uri: str, label: str, seed: int, out: str) -> dict:
    """Write a clip of class ``label`` generated by a conditioned model (see the module docstring).

    Raises:
        ValueError: the model is not a conditioned forecaster, or ``label`` is not one of its classes.
    """
    from rnnimg.synth import encode_video
    from rnnimg.tasks import load_model
    from rnnimg.tasks.digits_synth import MOTION_CLASSES

    task, model, config, model_id = load_model(model_uri)
    _check_forecaster(task, model_uri)
    if not config.labels:
        raise ValueError(f"the model at {model_uri} is not conditioned (no labels): --label needs a model trained with classes")
    (label_id,) = _label_ids(config, label).tolist()
    if tuple(config.labels) != MOTION_CLASSES[: len(config.labels)]:
        raise ValueError(f"--label starts from a moving-digits sequence: the model's classes must be {list(MOTION_CLASSES)}, "
                         f"got {list(config.labels)}")
    clip = generate_clip(model, config, label_id, seed)
    storage.write_bytes(out, encode_video(np.repeat(clip[..., None], 3, axis=-1), int(round(model_fps(config)))))
    return {"out": out, "model_id": model_id, "label": label, "seed": seed, "frames": len(clip),
            "context_frames": config.context_frames, "fps": model_fps(config)}


def _check_forecaster(task, model_uri: str) -> None:
    if task.name != "predict":
        raise ValueError(f"the model at {model_uri} is a {task.name!r} model; generate needs a 'predict' model")


def _label_ids(config, label: str | None):
    import torch

    if not config.labels:
        if label is not None:
            raise ValueError(f"the model is not conditioned: --label {label!r} means nothing to it")
        return None
    if label not in config.labels:
        raise ValueError(f"label must be one of the model's classes {list(config.labels)}, got {label!r}")
    return torch.tensor([config.labels.index(label)])
