"""The Prefect flows train-crnn and label-videos, run in-process against Prefect's test harness."""

import os
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.ray]

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "flows"))


@pytest.fixture(scope="module")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_train_then_label_flows(ray_local, prefect_harness, tiny_archive, tmp_path):
    from label_videos import LabelParams, label_videos
    from train_crnn import TrainParams, train_crnn

    root, manifest = tiny_archive
    trained = train_crnn(TrainParams(manifest=manifest, out=str(tmp_path / "train"), epochs=1, workers=1, name="flowrun"))
    assert os.path.exists(os.path.join(trained["model"], "model.safetensors"))
    assert trained["best"]["epoch"] == 0

    summary = label_videos(LabelParams(videos=[os.path.join(root, "videos", "test")], model=trained["model"], out=str(tmp_path / "labels"), truth=manifest))
    assert summary["ok"] == summary["videos"] > 0
    assert summary["test_clips"] == 2 * summary["videos"]
    assert 0.0 <= summary["test_clip_accuracy"] <= 1.0
