"""COCO-style run-length encoding of binary masks (pycocotools' uncompressed RLE).

The mask is read in column-major (Fortran) order and written as the lengths of alternating
runs, starting with a run of zeros (of length 0 when the first pixel is set)::

    {"size": [height, width], "counts": [zeros, ones, zeros, ...]}

which ``pycocotools.mask.frPyObjects`` accepts as it is. The ``masks`` table stores ``counts``
as a JSON string next to ``height`` and ``width``; to get a mask back::

    import json
    from rnnimg import rle
    mask = rle.decode({"size": [row.height, row.width], "counts": json.loads(row.rle)})  # bool (H, W)
"""

from __future__ import annotations

import numpy as np


def encode(mask: np.ndarray) -> dict:
    """The uncompressed RLE of a 2-D mask (any dtype; nonzero is set).

    Raises:
        ValueError: the mask is not 2-D.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    flat = mask.astype(bool).ravel(order="F")  # column-major, as COCO
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1  # where a new run starts
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]  # the first run counts zeros
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode(rle: dict) -> np.ndarray:
    """The bool (H, W) mask of an uncompressed RLE (``encode``'s output).

    Raises:
        ValueError: the counts do not add up to height x width, or one is negative.
    """
    height, width = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if (counts < 0).any() or int(counts.sum()) != height * width:
        raise ValueError(f"RLE counts must be >= 0 and sum to {height}x{width}={height * width}, got sum {int(counts.sum())}")
    values = np.arange(len(counts)) % 2 == 1  # zeros, ones, zeros, ...
    flat = np.repeat(values, counts)
    return flat.reshape((height, width), order="F")


def area_fraction(rle: dict) -> float:
    """Share of the mask's pixels that are set."""
    height, width = rle["size"]
    return float(sum(rle["counts"][1::2])) / max(1, height * width)
