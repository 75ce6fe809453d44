"""Test media made by the tests themselves: videos whose frames say which frame they are."""

from __future__ import annotations

import io
import json
import os
import tempfile
from fractions import Fraction

import numpy as np


def index_frame(i: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A flat frame whose grey level encodes its index (survives lossy compression): 8*i + 4."""
    h, w = size
    return np.full((h, w, 3), min(255, 8 * i + 4), np.uint8)


def frame_index(frame: np.ndarray) -> int:
    """Inverse of ``index_frame``, from the mean grey level."""
    return int(round((float(frame.mean()) - 4) / 8))


def write_video(path: str, frames: np.ndarray, fps: int = 10, codec: str = "libx264", pts: list[int] | None = None,
                time_base: Fraction | None = None, container_format: str | None = None, options: dict | None = None) -> str:
    """Encode uint8 (T, H, W, 3) frames; ``pts`` in ``time_base`` units gives variable frame rate."""
    import av

    with av.open(path, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1], frames.shape[2]
        stream.pix_fmt = "yuv420p"
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        stream.options = options or ({"crf": "10", "preset": "ultrafast"} if codec == "libx264" else {})
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = time_base
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def export_untrained_model(out: str, **config_overrides) -> str:
    """Write a randomly initialised CRNN as an exported model folder (safetensors + config)."""
    import torch
    from safetensors.torch import save_file

    from rnnimg.models.crnn import CRNN, CRNNConfig

    torch.manual_seed(0)
    config = CRNNConfig(**config_overrides)
    model = CRNN(config)
    os.makedirs(out, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out, "model.safetensors"))
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(config.to_json())
    with open(os.path.join(out, "labels.json"), "w") as f:
        json.dump(list(config.labels), f)
    return out
