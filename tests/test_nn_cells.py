"""rnnimg.nn's hand-written RNN, LSTM and GRU against torch.nn: values and every gradient."""

from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnimg.nn as rnn
from rnnimg.nn import functional as rf

# kind -> (rnnimg class, torch class, constructor kwargs)
KINDS = {
    "rnn_tanh": (rnn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (rnn.RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (rnn.LSTM, torch.nn.LSTM, {}),
    "gru": (rnn.GRU, torch.nn.GRU, {}),
}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def make_pair(kind, input_size, hidden_size, dtype, device="cpu", **kwargs):
    """An rnnimg module and a torch.nn module holding the same parameters."""
    ours_cls, torch_cls, extra = KINDS[kind]
    ours = ours_cls(input_size, hidden_size, **extra, **kwargs).to(device, dtype)
    theirs = torch_cls(input_size, hidden_size, **extra, **kwargs).to(device, dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def flat_state(kind, state):
    """h_n, or h_n and c_n, as a list of tensors."""
    return list(state) if kind == "lstm" else [state]


def run_and_grads(module, kind, x, hx, lengths, batch_first, total_length, cotangents):
    """Forward (through pack/unpack for torch.nn with lengths) and gradients of a fixed
    random linear function of all outputs with respect to inputs, states and parameters."""
    if lengths is not None and not isinstance(module, rnn.modules._RecurrentBase):
        packed = pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
        out, state = module(packed, hx)
        out, _ = pad_packed_sequence(out, batch_first=batch_first, total_length=total_length)
    elif lengths is not None:
        out, state = module(x, hx, lengths=lengths)
    else:
        out, state = module(x, hx)
    outputs = [out] + flat_state(kind, state)
    loss = sum((o * c).sum() for o, c in zip(outputs, cotangents))
    leaves = [x] + ([] if hx is None else flat_state(kind, hx)) + list(module.parameters())
    grads = torch.autograd.grad(loss, leaves)
    return outputs, grads


@st.composite
def configurations(draw):
    batch = draw(st.integers(1, 4))
    steps = draw(st.integers(1, 6))
    with_lengths = draw(st.booleans())
    lengths = (
        draw(st.lists(st.integers(1, steps), min_size=batch, max_size=batch))
        if with_lengths
        else None
    )
    return {
        "kind": draw(st.sampled_from(sorted(KINDS))),
        "batch": batch,
        "steps": steps,
        "input_size": draw(st.integers(1, 5)),
        "hidden_size": draw(st.integers(1, 5)),
        "num_layers": draw(st.integers(1, 2)),
        "bidirectional": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "bias": draw(st.booleans()),
        "with_state": draw(st.booleans()),
        "lengths": lengths,
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_against_torch(cfg, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    kind, batch, steps = cfg["kind"], cfg["batch"], cfg["steps"]
    ours, theirs = make_pair(
        kind,
        cfg["input_size"],
        cfg["hidden_size"],
        dtype,
        device,
        num_layers=cfg["num_layers"],
        bidirectional=cfg["bidirectional"],
        batch_first=cfg["batch_first"],
        bias=cfg["bias"],
    )
    shape = (batch, steps) if cfg["batch_first"] else (steps, batch)
    def leaf(*size):
        return torch.randn(*size, generator=gen, dtype=dtype).to(device).requires_grad_(True)

    x = leaf(*shape, cfg["input_size"])
    directions = 2 if cfg["bidirectional"] else 1
    state_shape = (cfg["num_layers"] * directions, batch, cfg["hidden_size"])
    hx = None
    if cfg["with_state"]:
        states = [leaf(*state_shape) for _ in range(2 if kind == "lstm" else 1)]
        hx = tuple(states) if kind == "lstm" else states[0]
    lengths = None if cfg["lengths"] is None else torch.tensor(cfg["lengths"])
    out_shape = (*shape, directions * cfg["hidden_size"])
    cotangents = [
        torch.randn(size, generator=gen, dtype=dtype).to(device)
        for size in [out_shape] + [state_shape] * (2 if kind == "lstm" else 1)
    ]
    ours_out, ours_grads = run_and_grads(
        ours, kind, x, hx, lengths, cfg["batch_first"], steps, cotangents
    )
    theirs_out, theirs_grads = run_and_grads(
        theirs, kind, x, hx, lengths, cfg["batch_first"], steps, cotangents
    )
    tol = TOLERANCE[dtype]
    for a, b in zip(ours_out, theirs_out):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)
    assert len(ours_grads) == len(theirs_grads)
    names = ["input"] + (["h0", "c0"][: len(flat_state(kind, hx))] if hx is not None else [])
    names += [name for name, _ in ours.named_parameters()]
    for name, a, b in zip(names, ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"grad of {name}: {m}")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configurations())
def test_matches_torch_float64(cfg):
    check_against_torch(cfg, torch.float64)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configurations())
def test_matches_torch_float32(cfg):
    check_against_torch(cfg, torch.float32)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_larger_shapes_match_torch(kind):
    """One longer, wider case than hypothesis draws, to cover many steps of the carry."""
    cfg = {
        "kind": kind, "batch": 5, "steps": 40, "input_size": 7, "hidden_size": 16,
        "num_layers": 2, "bidirectional": True, "batch_first": True, "bias": True,
        "with_state": True, "lengths": [40, 13, 1, 39, 27], "seed": 7,
    }  # fmt: skip
    check_against_torch(cfg, torch.float64)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cuda_matches_torch(kind, dtype):
    """On CUDA (cuDNN on torch's side) too; float32 with TF32 matmuls off."""
    cfg = {
        "kind": kind, "batch": 5, "steps": 12, "input_size": 7, "hidden_size": 16,
        "num_layers": 2, "bidirectional": True, "batch_first": False, "bias": True,
        "with_state": True, "lengths": [12, 3, 1, 11, 7], "seed": 5,
    }  # fmt: skip
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        check_against_torch(cfg, dtype, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("enforce_sorted", [True, False])
def test_packed_sequence_matches_torch(kind, enforce_sorted):
    gen = torch.Generator().manual_seed(3)
    ours, theirs = make_pair(kind, 3, 4, torch.float64, num_layers=2, bidirectional=True)
    lengths = torch.tensor([5, 5, 3, 1]) if enforce_sorted else torch.tensor([2, 5, 1, 5])
    x = torch.randn(5, 4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    results = []
    for module in (ours, theirs):
        packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
        out, state = module(packed)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        outputs = [out.data] + flat_state(kind, state)
        weights = [torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o) for o in outputs]
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        grads = torch.autograd.grad(loss, [x] + list(module.parameters()))
        results.append((out, outputs, grads))
    (a_packed, a_outs, a_grads), (b_packed, b_outs, b_grads) = results
    assert torch.equal(a_packed.batch_sizes, b_packed.batch_sizes)
    for a_idx, b_idx in [(a_packed.sorted_indices, b_packed.sorted_indices),
                         (a_packed.unsorted_indices, b_packed.unsorted_indices)]:  # fmt: skip
        assert (a_idx is None) == (b_idx is None)
        if a_idx is not None:
            assert torch.equal(a_idx, b_idx)
    for a, b in zip(a_outs + list(a_grads), b_outs + list(b_grads)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


def test_lengths_zero_the_padding_and_stop_at_the_last_valid_step():
    """Independent of torch: a padded sequence gives what the sequence alone gives."""
    torch.manual_seed(0)
    model = rnn.LSTM(3, 4, bidirectional=True).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    out, (h_n, c_n) = model(x, lengths=[6, 4])
    alone, (h_alone, c_alone) = model(x[:4, 1:2])
    assert torch.all(out[4:, 1] == 0)
    torch.testing.assert_close(out[:4, 1:2], alone, atol=1e-12, rtol=0)
    torch.testing.assert_close(h_n[:, 1:2], h_alone, atol=1e-12, rtol=0)
    torch.testing.assert_close(c_n[:, 1:2], c_alone, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_padding_content_is_ignored(kind):
    """Values past a length, even nan, change neither the results nor any gradient."""
    ours_cls, _, extra = KINDS[kind]
    torch.manual_seed(1)
    model = ours_cls(3, 4, num_layers=2, bidirectional=True, **extra).double()
    base = torch.randn(6, 3, 3, dtype=torch.float64)
    lengths = [6, 2, 4]
    results = []
    for fill in (0.0, float("nan")):
        x = base.clone()
        x[2:, 1] = fill
        x[4:, 2] = fill
        x.requires_grad_(True)
        out, state = model(x, lengths=lengths)
        loss = out.sum() + sum(s.sum() for s in flat_state(kind, state))
        grads = torch.autograd.grad(loss, [x] + list(model.parameters()))
        results.append([out] + flat_state(kind, state) + list(grads))
    for a, b in zip(*results):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    out, grad_x = results[1][0], results[1][1 + len(flat_state(kind, state))]
    assert torch.all(out[2:, 1] == 0) and torch.all(out[4:, 2] == 0)
    assert torch.all(grad_x[2:, 1] == 0) and torch.all(grad_x[4:, 2] == 0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_unbatched_input_matches_torch(kind):
    ours, theirs = make_pair(kind, 3, 4, torch.float64, num_layers=2, bidirectional=True)
    x = torch.randn(5, 3, dtype=torch.float64)
    h = torch.randn(4, 4, dtype=torch.float64)
    hx = (h, h.flip(0)) if kind == "lstm" else h
    ours_out, ours_state = ours(x, hx)
    theirs_out, theirs_state = theirs(x, hx)
    assert ours_out.shape == (5, 8)
    torch.testing.assert_close(ours_out, theirs_out, atol=1e-12, rtol=0)
    for a, b in zip(flat_state(kind, ours_state), flat_state(kind, theirs_state)):
        assert a.shape == (4, 4)
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def _function_inputs(kind, masked, reverse, bias):
    """Inputs of one layer Function (float64, small), for gradcheck."""
    gen = torch.Generator().manual_seed(11)
    steps, batch, inputs, hidden = 4, 3, 2, 3
    gates = {"rnn_tanh": 1, "rnn_relu": 1, "lstm": 4, "gru": 3}[kind]

    def leaf(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()

    x = leaf(steps, batch, inputs)
    states = [leaf(batch, hidden) for _ in range(2 if kind == "lstm" else 1)]
    weights = [leaf(gates * hidden, inputs), leaf(gates * hidden, hidden)]
    biases = [leaf(gates * hidden), leaf(gates * hidden)] if bias else [None, None]
    mask = rf.length_mask(torch.tensor([4, 2, 1]), steps, x.device) if masked else None
    return x, states, weights, biases, mask


def _layer_function(kind, mask, reverse, bias):
    """The autograd Function of ``kind`` as a function of its tensors only."""
    states = 2 if kind == "lstm" else 1

    def fn(x, *rest):
        state, weights = rest[:states], rest[states : states + 2]
        biases = rest[states + 2 :] if bias else (None, None)
        if kind == "lstm":
            return rf.LSTMFunction.apply(x, *state, *weights, *biases, mask, reverse)
        if kind == "gru":
            return rf.GRUFunction.apply(x, *state, *weights, *biases, mask, reverse)
        nonlinearity = kind.split("_")[1]
        return rf.RNNFunction.apply(x, *state, *weights, *biases, mask, reverse, nonlinearity)

    return fn


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_gradcheck_autograd_functions(kind, masked, reverse):
    x, states, weights, biases, mask = _function_inputs(kind, masked, reverse, bias=True)
    fn = _layer_function(kind, mask, reverse, bias=True)
    assert torch.autograd.gradcheck(fn, (x, *states, *weights, *biases), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_gradcheck_without_bias(kind):
    x, states, weights, _, mask = _function_inputs(kind, masked=True, reverse=False, bias=False)
    fn = _layer_function(kind, mask, reverse=False, bias=False)
    assert torch.autograd.gradcheck(fn, (x, *states, *weights), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("masked", [False, True])
def test_autograd_loop_equals_hand_written_backward(kind, masked):
    """The plain per-step versions used by the benchmark compute the same thing."""
    x, states, weights, biases, mask = _function_inputs(kind, masked, reverse=True, bias=True)
    args = (x, *states, *weights, *biases)
    if kind == "lstm":
        ours = rf.lstm_layer(*args, mask=mask, reverse=True)
        plain = rf.lstm_layer_autograd(*args, mask=mask, reverse=True)
    elif kind == "gru":
        ours = rf.gru_layer(*args, mask=mask, reverse=True)
        plain = rf.gru_layer_autograd(*args, mask=mask, reverse=True)
    else:
        nonlinearity = kind.split("_")[1]
        ours = rf.rnn_layer(*args, mask=mask, reverse=True, nonlinearity=nonlinearity)
        plain = rf.rnn_layer_autograd(*args, mask=mask, reverse=True, nonlinearity=nonlinearity)
    for a, b in zip(ours, plain):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    cot = [torch.randn_like(o) for o in ours]
    ga = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ours, cot)), args)
    gb = torch.autograd.grad(sum((o * c).sum() for o, c in zip(plain, cot)), args)
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_dict_loads_both_ways(kind):
    ours_cls, torch_cls, extra = KINDS[kind]
    kwargs = dict(num_layers=2, bidirectional=True, batch_first=True)
    ours = ours_cls(3, 5, **extra, **kwargs)
    theirs = torch_cls(3, 5, **extra, **kwargs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    x = torch.randn(2, 6, 3)

    theirs.load_state_dict(ours_sd)  # ours -> torch
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], atol=1e-5, rtol=1e-5)

    fresh_torch = torch_cls(3, 5, **extra, **kwargs)
    ours.load_state_dict(fresh_torch.state_dict())  # torch -> ours
    torch.testing.assert_close(ours(x)[0], fresh_torch(x)[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(x)[0], theirs(x)[0])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_initialisation_is_uniform_within_one_over_sqrt_hidden(kind):
    ours_cls, _, extra = KINDS[kind]
    torch.manual_seed(0)
    model = ours_cls(16, 64, **extra)
    bound = 1 / math.sqrt(64)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.abs().max() <= bound
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound
    assert abs(float(values.mean())) < 0.05 * bound


def test_dropout_between_layers_in_training_only():
    torch.manual_seed(0)
    ours, theirs = make_pair("gru", 3, 8, torch.float64, num_layers=2, dropout=0.5)
    x = torch.randn(7, 2, 3, dtype=torch.float64)
    ours.eval()
    torch.testing.assert_close(ours(x)[0], theirs.eval()(x)[0], atol=1e-12, rtol=0)
    ours.train()
    first, second = ours(x)[0], ours(x)[0]
    assert not torch.allclose(first, second)
    torch.manual_seed(5)
    again = ours(x)[0]
    torch.manual_seed(5)
    torch.testing.assert_close(ours(x)[0], again, atol=0, rtol=0)
    # The last layer's output is not dropped: no exact zeros appear in it.
    assert torch.count_nonzero(first == 0) == 0


def test_dropout_with_one_layer_warns():
    with pytest.warns(UserWarning, match="num_layers=1"):
        rnn.LSTM(2, 3, dropout=0.3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"hidden_size": -1}, "hidden_size must be > 0, got -1"),
        ({"input_size": 0}, "input_size must be > 0, got 0"),
        ({"num_layers": 0}, "num_layers must be > 0, got 0"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\], got 1.5"),
        ({"proj_size": 2}, "proj_size is not supported"),
    ],
)
def test_constructor_errors(kwargs, message):
    args = {"input_size": 3, "hidden_size": 4, **kwargs}
    with pytest.raises(ValueError, match=message):
        rnn.LSTM(**args)


def test_unknown_nonlinearity():
    with pytest.raises(ValueError, match="nonlinearity must be one of .* got 'sigmoid'"):
        rnn.RNN(3, 4, nonlinearity="sigmoid")


def test_forward_errors():
    model = rnn.GRU(3, 4, num_layers=2)
    x = torch.randn(5, 2, 3)
    with pytest.raises(ValueError, match="3 features .* got 4"):
        model(torch.randn(5, 2, 4))
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, 5\].*max 6"):
        model(x, lengths=[6, 2])
    with pytest.raises(ValueError, match="one entry per sequence"):
        model(x, lengths=[5])
    with pytest.raises(ValueError, match="integers"):
        model(x, lengths=torch.tensor([5.0, 2.0]))
    with pytest.raises(ValueError, match=r"hx must have shape \(2, 2, 4\), got \(1, 2, 4\)"):
        model(x, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="float64"):
        model(x.double())
    with pytest.raises(TypeError, match="tuple"):
        rnn.LSTM(3, 4)(x, torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="not both"):
        model(pack_padded_sequence(x, [5, 2]), lengths=[5, 2])


@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf])
def test_clip_grad_norm_matches_torch(norm_type):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for p, q in zip(params, copies):
        g = torch.randn_like(p) * 10
        p.grad, q.grad = g.clone(), g.clone()
    ours = rnn.clip_grad_norm_(params, 1.0, norm_type)
    theirs = torch.nn.utils.clip_grad_norm_(copies, 1.0, norm_type)
    torch.testing.assert_close(ours, theirs)
    for p, q in zip(params, copies):
        torch.testing.assert_close(p.grad, q.grad)
    assert float(ours) > 1.0  # clipping happened


def test_clip_grad_norm_leaves_small_gradients_and_rejects_nonfinite():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.1, 0.2, -0.2])
    norm = rnn.clip_grad_norm_(p, 1.0)
    assert math.isclose(float(norm), 0.3, rel_tol=1e-6)
    torch.testing.assert_close(p.grad, torch.tensor([0.1, 0.2, -0.2]))
    p.grad = torch.tensor([float("inf"), 0.0, 0.0])
    with pytest.raises(RuntimeError, match="not finite|nan/inf"):
        rnn.clip_grad_norm_(p, 1.0, error_if_nonfinite=True)
    with pytest.raises(ValueError, match="max_norm must be > 0, got 0"):
        rnn.clip_grad_norm_(p, 0)


def test_no_warnings_in_plain_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = rnn.LSTM(2, 3, num_layers=2, dropout=0.2, batch_first=True)
        model(torch.randn(4, 5, 2), lengths=[5, 1, 3, 2])[0].sum().backward()


def test_benchmark_script_runs(tmp_path):
    """bench/rnn_cells.py end to end at a toy size, writing its markdown section."""
    path = Path(__file__).resolve().parents[1] / "bench" / "rnn_cells.py"
    spec = importlib.util.spec_from_file_location("bench_rnn_cells", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "results.md"
    args = ["--device", "cpu", "--sizes", "2x3x4", "--steps", "3", "--repeats", "1"]
    assert bench.main([*args, "--output", str(out)]) == 0
    text = out.read_text()
    assert "## CPU" in text and text.count("| 2 | 3 | 4 | 3 |") == 3
    assert bench.main([*args, "--output", str(out)]) == 0  # replaces its section
    assert out.read_text().count("## CPU") == 1


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_backward_twice_with_retain_graph(kind):
    """The backward works in its own buffers: saved tensors survive a second backward."""
    ours_cls, _, extra = KINDS[kind]
    torch.manual_seed(2)
    model = ours_cls(3, 4, bidirectional=True, **extra).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = model(x, lengths=[5, 3])
    loss = (out * torch.randn_like(out)).sum()
    first = torch.autograd.grad(loss, [x] + list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, [x] + list(model.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
