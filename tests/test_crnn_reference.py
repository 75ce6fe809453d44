"""The CRNN with the recurrent layer written from its equations (rnn_impl="reference") is the
same model as with torch.nn's kernels: same weights, same outputs, same gradients, same training."""

import numpy as np
import pytest
import torch

from rnnimg.models.crnn import CRNN, CRNNConfig
from rnnimg.tasks.classify import loss_fn


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_reference_and_torch_crnn_train_identically(rnn_type):
    torch.manual_seed(0)
    fast = CRNN(CRNNConfig(frame_size=32, rnn_type=rnn_type, rnn_impl="torch", rnn_hidden=24, feature_dim=16, dropout=0.0)).double()
    ref = CRNN(CRNNConfig(frame_size=32, rnn_type=rnn_type, rnn_impl="reference", rnn_hidden=24, feature_dim=16, dropout=0.0)).double()
    ref.load_state_dict(fast.state_dict())  # the parameter layout is torch.nn's
    assert type(ref.rnn).__module__.startswith("rnnimg.nn")

    rng = np.random.default_rng(0)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (fast, ref)]
    for step in range(3):
        x = torch.as_tensor(rng.uniform(-0.5, 0.5, (4, 6, 3, 32, 32)))
        y = torch.as_tensor(rng.integers(0, 2, 4))
        losses = []
        for model, optimizer in zip((fast, ref), optimizers):
            model.train()
            clip_logits, frame_logits = model(x)
            loss = loss_fn(clip_logits, frame_logits, y, 0.3)
            optimizer.zero_grad()
            loss.backward()
            losses.append(loss.item())
        for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=f"gradient of {name} at step {step}")
        assert losses[0] == pytest.approx(losses[1], rel=1e-10, abs=1e-12)
        for optimizer in optimizers:
            optimizer.step()
