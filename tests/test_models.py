import json

import numpy as np
import pytest
import torch

from rnnimg.models.crnn import CRNN, CRNNConfig, to_model_input


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
