"""The exported model: the one hand-off between training and inference.

An exported model is a folder (local or ``s3://``)::

    MODEL/model.safetensors   the weights (loading runs no pickle)
    MODEL/config.json         {"task": "<task name>", **the model config's fields}
    MODEL/labels.json         class names, index = class id (empty for tasks without classes)
    MODEL/metrics.json        model_id, the selected epoch's metrics, every epoch's, the training config
    MODEL/report.md, *.png    the evaluation report (written by the task's ``write_report``)

The model id is the first 16 hex digits of the weights' SHA-256: two folders with the same
weights have the same id, wherever they are. Training writes the folder with ``save``; labelling,
the flows, the report and the tests read it with ``read_config``/``model_id`` (no torch needed)
or ``load_state`` (torch, to build the model: ``rnnimg.tasks.load_model``).

This module never imports training code, and torch only inside ``save``/``load_state``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from rnnimg import storage

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
LABELS = "labels.json"
METRICS = "metrics.json"
DEFAULT_TASK = "classify"  # what a model exported before tasks existed does


class ModelNotFound(FileNotFoundError):
    """No exported model at a location (the message says which file is missing)."""


@dataclass(frozen=True)
class ExportedModel:
    """What an exported model folder says about itself, read without torch."""

    uri: str  # the folder
    task: str  # the task's registered name
    config: dict  # the model config's fields (without "task")
    model_id: str  # first 16 hex digits of the weights' SHA-256


def id_of(weights: bytes) -> str:
    """The model id of serialized weights: the first 16 hex digits of their SHA-256."""
    return hashlib.sha256(weights).hexdigest()[:16]


def _weights(model_uri: str) -> bytes:
    uri = storage.join(model_uri, WEIGHTS)
    if not storage.exists(uri):
        raise ModelNotFound(f"no exported model at {model_uri} (missing {WEIGHTS}); pass the folder `rnnimg train` wrote as OUT/model")
    return storage.read_bytes(uri)


def model_id(model_uri: str) -> str:
    """The id of the model exported at ``model_uri``.

    Raises:
        ModelNotFound: the folder has no weights file.
    """
    return id_of(_weights(model_uri))


def _split_task(config: dict) -> tuple[str, dict]:
    fields = dict(config)
    return str(fields.pop("task", DEFAULT_TASK)), fields


def _describe(model_uri: str, weights: bytes) -> ExportedModel:
    config_uri = storage.join(model_uri, CONFIG)
    if not storage.exists(config_uri):
        raise ModelNotFound(f"exported model at {model_uri} has no {CONFIG}")
    task, fields = _split_task(storage.read_json(config_uri))
    return ExportedModel(uri=model_uri, task=task, config=fields, model_id=id_of(weights))


def read_config(model_uri: str) -> ExportedModel:
    """The task, model config and model id of an exported model, without torch.

    Raises:
        ModelNotFound: the folder lacks the weights or config.json.
    """
    return _describe(model_uri, _weights(model_uri))


def load_state(model_uri: str) -> tuple[ExportedModel, dict]:
    """The exported model's description and its weights as a state dict (CPU tensors; no pickle).

    Raises:
        ModelNotFound: the folder lacks the weights or config.json.
    """
    from safetensors.torch import load

    weights = _weights(model_uri)
    return _describe(model_uri, weights), load(weights)


def save(model_uri: str, state_dict: dict, task: str, config: dict, labels: list[str] | tuple[str, ...] = (), metrics: dict | None = None) -> str:
    """Write an exported model folder: weights, config (with its task), labels, and metrics.

    Args:
        state_dict: the model's weights (tensors; moved to contiguous CPU memory here).
        task: the registered task name, recorded in config.json so that a label job picks
            everything from the model.
        config: the model config's fields (JSON-serialisable).
        metrics: written as metrics.json with ``model_id`` added.

    Returns:
        The model id.
    """
    from safetensors.torch import save as save_bytes

    weights = save_bytes({k: v.detach().cpu().contiguous() for k, v in state_dict.items()})
    identity = id_of(weights)
    storage.write_bytes(storage.join(model_uri, WEIGHTS), weights)
    storage.write_json(storage.join(model_uri, CONFIG), {"task": task, **config})
    storage.write_json(storage.join(model_uri, LABELS), list(labels))
    if metrics is not None:
        storage.write_json(storage.join(model_uri, METRICS), {**metrics, "model_id": identity})
    return identity
