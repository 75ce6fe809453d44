"""The house rules that keep the data path readable, checked on the source and on a fresh interpreter.

- Labelling never imports training code, and its decode workers never import torch.
- Only ``rnnimg/storage.py`` talks to object storage clients (boto3, s3fs, pyarrow.fs).
- The exported-model format and the model id live in ``rnnimg/checkpoint.py`` only.
- No module imports another module's private (underscore) name.
- Tasks are looked up by name; an exported model says which task it is.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = [os.path.join(d, f) for top in ("rnnimg", "flows") for d, _, files in os.walk(os.path.join(ROOT, top)) for f in files if f.endswith(".py")]


def _imports(path: str) -> list[tuple[str, str | None]]:
    """(module, name) of every import in a file, at any depth (name None for ``import x``)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found += [(node.module, alias.name) for alias in node.names]
    return found


def _relative(path: str) -> str:
    return os.path.relpath(path, ROOT)


def test_labelling_never_imports_training_code():
    label = os.path.join(ROOT, "rnnimg", "label.py")
    offending = [(m, n) for m, n in _imports(label) if m.startswith("rnnimg.train") or (m == "rnnimg" and n == "train")]
    assert not offending, offending


def test_decode_side_modules_import_without_torch_or_training():
    code = ("import sys, rnnimg.label, rnnimg.tasks, rnnimg.checkpoint, rnnimg.manifest, rnnimg.store_lock, rnnimg.label_runs; "
            "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('rnnimg.train') or m == 'prefect'); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_only_storage_talks_to_object_store_clients():
    clients = ("boto3", "botocore", "s3fs", "pyarrow.fs")
    offending = []
    for path in SOURCES:
        if _relative(path) == os.path.join("rnnimg", "storage.py"):
            continue
        for module, name in _imports(path):
            full = f"{module}.{name}" if name else module
            if any(full == c or full.startswith(c + ".") or module == c for c in clients):
                offending.append((_relative(path), full))
    assert not offending, offending


def test_the_exported_model_format_has_one_owner():
    offending = []
    for path in SOURCES:
        if _relative(path) == os.path.join("rnnimg", "checkpoint.py"):
            continue
        with open(path) as f:
            text = f.read()
        # The weights' file name and the id's hash; safetensors itself may read other files (backbone init weights).
        if '"model.safetensors"' in text or "hashlib.sha256" in text:
            offending.append(_relative(path))
    assert not offending, offending


def test_no_module_imports_a_private_name_of_another():
    offending = [(_relative(p), m, n) for p in SOURCES for m, n in _imports(p) if n and n.startswith("_") and not n.startswith("__")]
    assert not offending, offending


def test_tasks_are_found_by_name_and_unknown_ones_are_refused():
    from rnnimg import tasks

    assert "classify" in tasks.names()
    assert tasks.get("classify").name == "classify"
    with pytest.raises(ValueError, match=r"unknown task 'segmentation'; known tasks: \[.*'classify'.*\]"):
        tasks.get("segmentation")


def test_an_exported_model_records_its_task_and_old_exports_read_as_classify(tmp_path):
    from rnnimg import checkpoint, storage, tasks
    from tests.media import export_untrained_model

    model_uri = export_untrained_model(str(tmp_path / "model"), frame_size=32)
    exported = checkpoint.read_config(model_uri)
    assert exported.task == "classify" and exported.config["frame_size"] == 32 and "task" not in exported.config
    assert exported.model_id == checkpoint.model_id(model_uri) and len(exported.model_id) == 16
    task, model, config, model_id = tasks.load_model(model_uri)
    assert (task.name, config.frame_size, model_id) == ("classify", 32, exported.model_id) and not model.training

    # A folder exported before tasks existed has no "task" key: it is a classifier.
    raw = storage.read_json(os.path.join(model_uri, checkpoint.CONFIG))
    storage.write_json(os.path.join(model_uri, checkpoint.CONFIG), {k: v for k, v in raw.items() if k != "task"})
    assert checkpoint.read_config(model_uri).task == "classify"
    with pytest.raises(checkpoint.ModelNotFound, match=r"no exported model at .* \(missing model.safetensors\)"):
        checkpoint.read_config(str(tmp_path / "nothing"))
