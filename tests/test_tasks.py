"""The task seam: a task defined in a test plugs into the clip stream, the loop and checkpoint export
without a line of the shared machinery knowing it; the classification task keeps its contracts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pytest
import torch
from torch import nn

from rnnimg import checkpoint, tables, tasks
from rnnimg.manifest import read_manifest
from rnnimg.train.config import TrainConfig
from rnnimg.train.data import epoch_batches
from rnnimg.train.loop import evaluate, make_optimizer, train_one_epoch


@dataclass(frozen=True)
class BrightnessConfig:
    frame_size: int = 16
    frames_per_clip: int = 4
    clip_seconds: float = 2.0
    stride_seconds: float = 2.0


class BrightnessModel(nn.Module):
    """(B, T, C, H, W) -> (B,): a clip's mean brightness, by a linear map of pooled pixels."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 1)

    def forward(self, clips):
        return self.linear(clips.mean(dim=(1, 3, 4))).squeeze(1)  # (B, T, C, H, W) -> (B, C) -> (B,)


class BrightnessTask(tasks.Task):
    """Regression, no classes: how bright is the clip (the clip stream's target per clip)."""

    name = "test-brightness"

    def config_from_dict(self, data):
        return BrightnessConfig(**data)

    def config_to_dict(self, config):
        return asdict(config)

    def build_model(self, config):
        return BrightnessModel()

    def training_rows(self, manifest_uri, split, config, *, rank=0, world=1, pad=False):
        return [(r.video_uri, 0.0) for r in read_manifest(manifest_uri) if r.split == split][rank::world]

    def augment(self, frames, target, rng):
        return frames, target

    def loss(self, outputs, targets, config):
        return nn.functional.mse_loss(outputs.float(), targets.float())

    def batch_stats(self, outputs, targets, config, loss=None):
        errors = (outputs.float() - targets.float()) ** 2
        return {"loss_sum": errors.sum().double(), "count": torch.tensor(len(targets))}

    def summarize(self, stats):
        return {"loss": float(stats["loss_sum"]) / max(int(stats["count"]), 1), "clips": int(stats["count"])}

    def clip_columns(self):
        return {"brightness": ("float32", 0.0)}

    def predict(self, model, inputs, config):
        return {"brightness": model(inputs).float().cpu().numpy()}

    def tables(self):
        return {"brightness": tables.CLIPS}

    def shard_rows(self, clips, run, min_segment_seconds):
        return {"brightness": clips}


def test_a_task_defined_elsewhere_trains_through_the_shared_loop_and_exports(tiny_archive, tmp_path):
    _, manifest = tiny_archive
    task = tasks.register(BrightnessTask())
    assert tasks.get("test-brightness") is task and "test-brightness" in tasks.names()
    config = BrightnessConfig()
    rows = task.training_rows(manifest, "train", config)
    train_config = TrainConfig(batch_size=4, epochs=3, lr=0.05, warmup_epochs=0)
    torch.manual_seed(0)
    model = task.build_model(config)
    with torch.no_grad():
        model.linear.bias.fill_(1.0)  # far from the target 0: the loss must fall
    optimizer, scheduler = make_optimizer(model, train_config, 100)
    before = task.summarize(evaluate(model, epoch_batches(rows, task, config, train_config, train=False, epoch=0), "cpu", task, config))
    for epoch in range(train_config.epochs):
        stats = train_one_epoch(model, optimizer, epoch_batches(rows, task, config, train_config, train=True, epoch=epoch), "cpu", task, config, scheduler)
        assert int(stats["count"]) == len(rows)
    after = task.summarize(evaluate(model, epoch_batches(rows, task, config, train_config, train=False, epoch=0), "cpu", task, config))
    assert before["clips"] == after["clips"] == 2 * len(rows)  # 4 s videos, 2 s clips
    assert after["loss"] < 0.5 * before["loss"], (before, after)

    model_uri = str(tmp_path / "model")
    model_id = checkpoint.save(model_uri, model.state_dict(), task.name, task.config_to_dict(config))
    loaded_task, loaded, loaded_config, loaded_id = tasks.load_model(model_uri)
    assert (loaded_task, loaded_config, loaded_id) == (task, config, model_id)
    x = torch.zeros(2, 4, 3, 16, 16)
    torch.testing.assert_close(loaded(x), model.eval()(x))
    with torch.inference_mode():  # as the label job's Predictor calls it
        assert task.predict(loaded, x, loaded_config)["brightness"].shape == (2,)


def test_classification_task_predicts_labels_and_writes_clips_and_segments():
    task = tasks.get("classify")
    config = task.config_from_dict({"labels": ["left", "right"], "frame_size": 32})
    model = task.build_model(config).eval()
    with torch.inference_mode():
        predicted = task.predict(model, torch.zeros(3, config.frames_per_clip, 3, 32, 32), config)
    assert set(predicted) == set(task.clip_columns()) == {"label", "score"}
    assert all(p in ("left", "right") for p in predicted["label"]) and ((predicted["score"] >= 0.5) & (predicted["score"] <= 1)).all()
    clips = [{"video_uri": "v", "clip_index": i, "start_s": 2.0 * i, "end_s": 2.0 * i + 2, "label": lab, "score": 0.9,
              "model_id": "m", "run_id": "r"} for i, lab in enumerate(["left", "left", "right"])]
    rows = task.shard_rows(clips, {"model_id": "m", "run_id": "r"}, 0.0)
    assert set(rows) == set(task.tables()) == {"clips", "segments"}
    assert [(s["label"], s["clips"]) for s in rows["segments"]] == [("left", 2), ("right", 1)]


def test_classification_model_config_comes_from_the_manifest(tiny_archive):
    _, manifest = tiny_archive
    task = tasks.get("classify")
    config = task.model_config(manifest, frame_size=48, rnn_type="gru")
    assert (config.labels, config.frame_size, config.rnn_type) == (("left", "right"), 48, "gru")
    with pytest.raises(ValueError, match="unknown CRNN config keys"):
        task.model_config(manifest, colour="blue")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    augmented, target = task.augment(frames, 1, rng)
    assert target == 1 and augmented.shape == frames.shape and augmented.dtype == np.uint8
