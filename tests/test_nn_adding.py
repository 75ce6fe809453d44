"""Long-range memory: the adding problem separates the gated cells from the Elman RNN."""

from __future__ import annotations

import pytest
import torch

from rnnimg.nn.tasks import BASELINE_MSE, adding_problem, main, train_adding

# Small enough to train in seconds with the reference cells, long enough (the two markers
# are on average 25 steps apart) that the Elman RNN stays at the mean-prediction error.
LENGTH, STEPS, SEED = 50, 700, 0


@pytest.fixture
def one_thread():
    """Tiny matmuls run faster on one thread, and runs are then reproducible."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_adding_problem_batch():
    gen = torch.Generator().manual_seed(0)
    x, y = adding_problem(256, 10, gen)
    assert x.shape == (256, 10, 2) and y.shape == (256,)
    markers = x[:, :, 1]
    assert torch.all(markers.sum(1) == 2)
    assert torch.all(markers[:, :5].sum(1) == 1)  # one marker in each half
    torch.testing.assert_close(y, (x[:, :, 0] * markers).sum(1))
    assert 0.0 <= float(x[:, :, 0].min()) and float(x[:, :, 0].max()) <= 1.0
    with pytest.raises(ValueError, match="length must be >= 2"):
        adding_problem(4, 1)


@pytest.mark.slow
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gated_cells_solve_the_adding_problem(cell, one_thread):
    result = train_adding(cell, LENGTH, STEPS, seed=SEED)
    assert result.mse < 0.01, result


@pytest.mark.slow
def test_elman_rnn_does_not_solve_it(one_thread):
    result = train_adding("rnn", LENGTH, STEPS, seed=SEED)
    assert result.best_mse > 0.05, result
    assert result.mse > 0.5 * BASELINE_MSE, result


def test_script_entry_prints_a_table(capsys, one_thread):
    args = ["--length", "6", "--steps", "3", "--cells", "gru", "rnn", "--hidden-size", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 6 | gru |" in out and "| 6 | rnn |" in out
