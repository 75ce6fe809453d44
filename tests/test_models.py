import json

import numpy as np
import pytest
import torch

from rnnimg.models.crnn import CRNN, CRNNConfig
from rnnimg.models.layout import to_model_input


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_crnn_shapes_on_a_tiny_input(rnn_type):
    config = CRNNConfig(labels=("a", "b", "c"), frame_size=32, rnn_type=rnn_type, rnn_hidden=16, feature_dim=24)
    model = CRNN(config).eval()
    clips = to_model_input(np.zeros((2, 5, 32, 32, 3), np.uint8))
    assert clips.shape == (2, 5, 3, 32, 32)
    features = model.forward_features(clips)
    assert features.shape == (2, 5, 16)
    clip_logits, frame_logits = model.forward_head(features)
    assert clip_logits.shape == (2, 3) and frame_logits.shape == (2, 5, 3)


def test_model_reads_temporal_order():
    # Reversing the frames changes the output: the recurrent layer sees order.
    torch.manual_seed(0)
    model = CRNN(CRNNConfig(frame_size=32)).eval()
    x = torch.rand(1, 6, 3, 32, 32) - 0.5
    with torch.no_grad():
        assert not torch.allclose(model(x)[0], model(x.flip(1))[0])


def test_config_round_trips_and_refuses_unknown_keys():
    config = CRNNConfig(labels=("x", "y"), rnn_type="gru")
    assert CRNNConfig.from_dict(json.loads(config.to_json())) == config
    with pytest.raises(ValueError, match="unknown CRNN config keys"):
        CRNNConfig.from_dict({**json.loads(config.to_json()), "bogus": 1})


@pytest.mark.parametrize("kwargs", [{"labels": ("one",)}, {"rnn_type": "transformer"}, {"frame_size": 8}, {"dropout": 1.5}])
def test_bad_config_is_refused(kwargs):
    with pytest.raises(ValueError):
        CRNNConfig(**kwargs)


def test_to_model_input_refuses_wrong_layout():
    with pytest.raises(ValueError, match=r"\(B, T, H, W, 3\)"):
        to_model_input(np.zeros((2, 3, 32, 32), np.uint8))


# ----------------------------------------------------------------------------- backbones


def test_torchvision_backbone_without_torchvision_says_what_to_do(monkeypatch):
    import sys

    from rnnimg.models.crnn import BackboneUnavailable

    monkeypatch.setitem(sys.modules, "torchvision", None)  # import torchvision -> ImportError, as where it is missing
    with pytest.raises(BackboneUnavailable) as err:
        CRNN(CRNNConfig(backbone="resnet18"))
    message = str(err.value)
    assert "backbone 'resnet18' needs torchvision, which is not importable here" in message
    assert "pip install 'rnnimg[vision]'" in message and "use backbone 'small'" in message
    assert isinstance(err.value, ValueError) and isinstance(err.value, ImportError)  # the CLI reports it in one line


def _torchvision_importable() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a torchvision built for another torch fails in many ways
        return False
    return True


@pytest.mark.skipif(not _torchvision_importable(), reason="torchvision is not importable beside this torch")
def test_resnet18_backbone_runs_and_takes_torchvision_weights_from_a_file(tmp_path):
    import torchvision
    from safetensors.torch import save_file

    from rnnimg.models.crnn import load_backbone_weights

    config = CRNNConfig(backbone="resnet18", frame_size=64, grid=1, feature_dim=512, rnn_hidden=32)
    model = CRNN(config).eval()
    clip_logits, frame_logits = model(torch.rand(2, 3, 3, 64, 64) - 0.5)
    assert clip_logits.shape == (2, 2) and frame_logits.shape == (2, 3, 2)
    torch.manual_seed(1)
    reference = torchvision.models.resnet18(weights=None).state_dict()
    save_file(reference, str(tmp_path / "resnet18.safetensors"))
    load_backbone_weights(model, str(tmp_path / "resnet18.safetensors"))
    assert torch.equal(model.backbone.net.conv1.weight, reference["conv1.weight"])


class NotWeights:
    """An arbitrary pickled object: torch.load(weights_only=True) must refuse to build it."""


def test_small_backbone_weights_come_from_a_file_never_a_pickle(tmp_path):
    from safetensors.torch import save_file

    from rnnimg.models.crnn import load_backbone_weights

    torch.manual_seed(0)
    earlier = CRNN(CRNNConfig())
    save_file({k: v.contiguous() for k, v in earlier.state_dict().items()}, str(tmp_path / "earlier.safetensors"))
    torch.save(earlier.backbone.state_dict(), tmp_path / "backbone.pt")
    for name in ("earlier.safetensors", "backbone.pt"):
        torch.manual_seed(1)
        model = CRNN(CRNNConfig())
        load_backbone_weights(model, str(tmp_path / name))
        for (key, a), b in zip(model.backbone.state_dict().items(), earlier.backbone.state_dict().values()):
            assert torch.equal(a, b), (name, key)
        assert not torch.equal(model.clip_head.weight, earlier.clip_head.weight)  # only the backbone

    with pytest.raises(ValueError, match=r"backbone weights do not fit the small CNN: shape of stages.0.weight is"):
        load_backbone_weights(CRNN(CRNNConfig(cnn_channels=(8, 32, 64, 64))), str(tmp_path / "backbone.pt"))
    with pytest.raises(FileNotFoundError, match="no weights file at"):
        load_backbone_weights(CRNN(CRNNConfig()), str(tmp_path / "missing.safetensors"))

    torch.save({"obj": NotWeights()}, tmp_path / "pickled.pt")
    with pytest.raises(ValueError, match="not a safetensors file nor a weights-only torch state dict"):
        load_backbone_weights(CRNN(CRNNConfig()), str(tmp_path / "pickled.pt"))


def test_channels_last_gives_the_same_outputs():
    torch.manual_seed(0)
    model = CRNN(CRNNConfig(frame_size=32)).eval()
    x = torch.rand(2, 4, 3, 32, 32) - 0.5
    with torch.no_grad():
        expected = model(x)[0]
        model.use_channels_last()
        assert model.backbone.stages[0].weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(x)[0], expected, rtol=1e-5, atol=1e-5)


def test_to_model_input_converts_where_the_clips_are():
    clips = torch.full((1, 2, 4, 4, 3), 255, dtype=torch.uint8)
    x = to_model_input(clips)
    assert x.dtype == torch.float32 and x.device == clips.device and x.shape == (1, 2, 3, 4, 4)
    assert torch.all(x == 0.5)


@pytest.mark.parametrize("kwargs, needle", [({"backbone": "vit"}, "backbone must be one of"), ({"grid": 0}, "grid must be >= 1, got 0"),
                                            ({"backbone_weights": None}, "backbone_weights must be a file or store URL")])
def test_bad_backbone_config_is_refused(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        CRNNConfig(**kwargs)


def _with_trained_norms(model: torch.nn.Module) -> torch.nn.Module:
    """Running statistics and affine parameters away from their initial values, as after training."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.rand(n, generator=generator) - 0.5)
            module.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            module.weight.data.copy_(0.5 + torch.rand(n, generator=generator))
            module.bias.data.copy_(torch.rand(n, generator=generator) - 0.5)
    return model.eval()


@pytest.mark.parametrize("task_name", ["classify", "segment", "objects", "predict"])
def test_for_inference_keeps_what_every_task_model_computes(task_name):
    # The label job's actors fold batch norm into the convs and go channels-last: the outputs must not change.
    import copy

    from rnnimg import tasks
    from rnnimg.models.inference import for_inference

    task = tasks.get(task_name)
    torch.manual_seed(0)
    model = _with_trained_norms(task.build_model(task.config_from_dict({})))
    size = getattr(model.config, "frame_size", 64)
    x = torch.rand(2, getattr(model.config, "frames_per_clip", 4), 3, size, size) - 0.5
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    fast = for_inference(copy.deepcopy(model))
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules()) < max(1, norms)  # folded, where there are any
    with torch.inference_mode():
        expected, got = model(x), fast(x)
    expected = expected if isinstance(expected, torch.Tensor) else expected[0]
    got = got if isinstance(got, torch.Tensor) else got[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_fold_batchnorm_refuses_a_training_model_and_folds_conv_bias():
    from rnnimg.models.inference import fold_batchnorm

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(model)
    model = _with_trained_norms(model)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
        assert fold_batchnorm(model) == 1
        assert isinstance(model[1], torch.nn.Identity)
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("task_name", ["classify", "segment", "objects", "predict"])
def test_predictor_in_bf16_on_cpu_agrees_with_float32(task_name, tmp_path):
    # precision "bf16" on a CPU casts the weights to bf16 (the hand-written cells too); what the task
    # writes must stay what float32 gives, to bf16's precision.
    from rnnimg.label import Predictor
    from tests.media import export_untrained_model

    model = export_untrained_model(str(tmp_path / task_name), task=task_name)
    fp32, bf16 = Predictor(model, threads=1, precision="fp32"), Predictor(model, threads=1, precision="bf16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16 and bf16.amp_dtype is None
    size, frames = getattr(fp32.config, "frame_size", 64), getattr(fp32.config, "frames_per_clip", 4)
    n = 3
    rng = np.random.default_rng(0)
    batch = {"video_uri": np.array([f"v{i}.mp4" for i in range(n)], object), "is_status": np.zeros(n, bool),
             "frames": rng.integers(0, 256, (n, frames, size, size, 3), dtype=np.uint8)}
    expected, got = fp32(batch), bf16(batch)
    for name in fp32.columns:
        a, b = expected[name], got[name]
        if name == "masks":  # run-length encoded masks: compare the area of each frame's mask
            areas = lambda column: np.array([[f["area_fraction"] for f in json.loads(c)["frames"]] for c in column])
            np.testing.assert_allclose(areas(b), areas(a), atol=0.05)
        elif a.dtype.kind == "f":
            np.testing.assert_allclose(b.astype(np.float64), a.astype(np.float64), rtol=0.05, atol=0.05)
        elif name == "detections" or a.dtype == object:
            continue  # JSON of boxes: their scores are compared through the float columns where a task has them
        else:
            assert (a == b).mean() >= 0.66, name
