"""ConvLSTM, ConvGRU and ReNet: hand-written backward against the equations under autograd.

The reference here is written independently of rnnimg.nn.conv_functional: one convolution
of x_t and one of h_{t-1} per step, each with its own bias, autograd doing the backward.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnimg.nn as rnn
from rnnimg.nn import conv_functional as cf

TOLERANCE = 1e-10
KINDS = {"lstm": rnn.ConvLSTM, "gru": rnn.ConvGRU}


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions: one thread is faster here, and keeps the learning check deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def reference_layer(kind, x, h, c, w_x, w_h, b_x, b_h):
    """One layer from the equations, step by step under autograd. x (T, B, C, H, W)."""
    pad = w_x.shape[-1] // 2
    outputs = []
    for x_t in x.unbind(0):
        gx = F.conv2d(x_t, w_x, b_x, padding=pad)  # W_x ⋆ x_t + b_x
        gh = F.conv2d(h, w_h, b_h, padding=pad)  # W_h ⋆ h_{t-1} + b_h
        if kind == "lstm":
            i, f, g, o = (gx + gh).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        else:
            x_r, x_z, x_n = gx.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
            n = torch.tanh(x_n + r * h_n)
            h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs), h, c


def reference_module(module, kind, x, hx):
    """The module's computation from its parameters with :func:`reference_layer`."""
    seq = x.transpose(0, 1) if module.batch_first else x  # -> (T, B, C, H, W)
    steps, batch, _, height, width = seq.shape
    shape = (module.num_layers, batch, module.hidden_channels, height, width)
    if hx is None:
        h0 = c0 = seq.new_zeros(shape)
    else:
        h0, c0 = hx if kind == "lstm" else (hx, None)
    h_n, c_n = [], []
    for layer in range(module.num_layers):
        names = ("weight_x", "weight_h", "bias_x", "bias_h")
        params = [getattr(module, f"{name}_l{layer}", None) for name in names]
        c = None if c0 is None else c0[layer]
        seq, h, c = reference_layer(kind, seq, h0[layer], c, *params)
        h_n.append(h)
        c_n.append(c)
    out = seq.transpose(0, 1) if module.batch_first else seq
    if kind == "lstm":
        return out, (torch.stack(h_n), torch.stack(c_n))
    return out, torch.stack(h_n)


def flat(kind, state):
    return list(state) if kind == "lstm" else [state]


@st.composite
def configurations(draw):
    return {
        "kind": draw(st.sampled_from(sorted(KINDS))),
        "batch": draw(st.integers(1, 2)),
        "steps": draw(st.integers(1, 4)),
        "channels": draw(st.integers(1, 3)),
        "hidden": draw(st.integers(1, 3)),
        "height": draw(st.integers(1, 5)),
        "width": draw(st.integers(1, 5)),
        "kernel": draw(st.sampled_from([1, 3, 5])),
        "num_layers": draw(st.integers(1, 2)),
        "bias": draw(st.booleans()),
        "with_state": draw(st.booleans()),
        "batch_first": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def check_against_reference(cfg):
    kind = cfg["kind"]
    torch.manual_seed(cfg["seed"])
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = KINDS[kind](
        cfg["channels"], cfg["hidden"], kernel_size=cfg["kernel"], num_layers=cfg["num_layers"],
        bias=cfg["bias"], batch_first=cfg["batch_first"],
    ).double()  # fmt: skip
    grid = (cfg["height"], cfg["width"])
    lead = (cfg["batch"], cfg["steps"]) if cfg["batch_first"] else (cfg["steps"], cfg["batch"])

    def leaf(*size):
        return torch.randn(*size, generator=gen, dtype=torch.float64).requires_grad_(True)

    x = leaf(*lead, cfg["channels"], *grid)
    state_shape = (cfg["num_layers"], cfg["batch"], cfg["hidden"], *grid)
    hx = None
    if cfg["with_state"]:
        hx = (leaf(*state_shape), leaf(*state_shape)) if kind == "lstm" else leaf(*state_shape)
    ours_out, ours_state = model(x, hx)
    ref_out, ref_state = reference_module(model, kind, x, hx)
    outputs, refs = [ours_out] + flat(kind, ours_state), [ref_out] + flat(kind, ref_state)
    assert ours_out.shape == (*lead, cfg["hidden"], *grid)
    cotangents = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outputs]
    leaves = [x] + ([] if hx is None else flat(kind, hx)) + list(model.parameters())
    names = ["input"] + ([] if hx is None else ["h0", "c0"][: len(flat(kind, hx))])
    names += [name for name, _ in model.named_parameters()]
    def grads(results):
        return torch.autograd.grad(sum((o * c).sum() for o, c in zip(results, cotangents)), leaves)

    ours_grads, ref_grads = grads(outputs), grads(refs)
    for a, b in zip(outputs, refs):
        torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=TOLERANCE)
    for name, a, b in zip(names, ours_grads, ref_grads, strict=True):
        torch.testing.assert_close(
            a, b, atol=TOLERANCE, rtol=TOLERANCE, msg=lambda m: f"grad of {name}: {m}"
        )


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configurations())
def test_matches_the_equations_float64(cfg):
    check_against_reference(cfg)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_longer_and_wider_case_matches_the_equations(kind):
    """One case bigger than hypothesis draws: many steps of the carry, several channels."""
    cfg = {
        "kind": kind, "batch": 3, "steps": 12, "channels": 4, "hidden": 5, "height": 7,
        "width": 6, "kernel": 3, "num_layers": 2, "bias": True, "with_state": True,
        "batch_first": True, "seed": 7,
    }  # fmt: skip
    check_against_reference(cfg)


def _function_inputs(kind, bias, kernel=3):
    gen = torch.Generator().manual_seed(11)
    steps, batch, channels, hidden, height, width = 3, 2, 2, 2, 3, 4
    gates = 4 if kind == "lstm" else 3

    def leaf(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    x = leaf(steps, batch, channels, height, width)
    states = [leaf(batch, hidden, height, width) for _ in range(2 if kind == "lstm" else 1)]
    weights = [leaf(gates * hidden, channels, kernel, kernel, scale=0.5),
               leaf(gates * hidden, hidden, kernel, kernel, scale=0.5)]  # fmt: skip
    biases = [leaf(gates * hidden), leaf(gates * hidden)] if bias else []
    return (x, *states, *weights, *biases)


def _function(kind, bias):
    function = cf.ConvLSTMFunction if kind == "lstm" else cf.ConvGRUFunction
    return function.apply if bias else lambda *args: function.apply(*args, None, None)


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_autograd_functions(kind, bias):
    inputs = _function_inputs(kind, bias)
    assert torch.autograd.gradcheck(_function(kind, bias), inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_autograd_loop_equals_hand_written_backward(kind):
    """The per-step versions used for the speed figure compute the same thing."""
    args = _function_inputs(kind, bias=True)
    if kind == "lstm":
        ours, plain = cf.conv_lstm_layer(*args), cf.conv_lstm_layer_autograd(*args)
    else:
        ours, plain = cf.conv_gru_layer(*args), cf.conv_gru_layer_autograd(*args)
    cot = [torch.randn_like(o) for o in ours]
    ga = torch.autograd.grad(sum((o * c).sum() for o, c in zip(ours, cot)), args)
    gb = torch.autograd.grad(sum((o * c).sum() for o, c in zip(plain, cot)), args)
    for a, b in zip(list(ours) + list(ga), list(plain) + list(gb)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_backward_twice_with_retain_graph(kind):
    """The backward works in its own buffers: saved tensors survive a second backward."""
    torch.manual_seed(2)
    model = KINDS[kind](2, 3, num_layers=2).double()
    x = torch.randn(2, 4, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    out, _ = model(x)
    loss = (out * torch.randn_like(out)).sum()
    first = torch.autograd.grad(loss, [x] + list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, [x] + list(model.parameters()))
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_parameter_names_shapes_and_initialisation(kind):
    torch.manual_seed(0)
    model = KINDS[kind](3, 16, kernel_size=5, num_layers=2)
    gates = 4 if kind == "lstm" else 3
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "weight_x_l0": (gates * 16, 3, 5, 5), "weight_h_l0": (gates * 16, 16, 5, 5),
        "bias_x_l0": (gates * 16,), "bias_h_l0": (gates * 16,),
        "weight_x_l1": (gates * 16, 16, 5, 5), "weight_h_l1": (gates * 16, 16, 5, 5),
        "bias_x_l1": (gates * 16,), "bias_h_l1": (gates * 16,),
    }  # fmt: skip
    bound = 1 / math.sqrt(16 * 5 * 5)
    values = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert values.abs().max() <= bound
    assert values.min() < -0.95 * bound and values.max() > 0.95 * bound
    no_bias = KINDS[kind](3, 4, bias=False)
    assert [name for name, _ in no_bias.named_parameters()] == ["weight_x_l0", "weight_h_l0"]


def test_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="kernel_size must be odd .* got 4"):
        rnn.ConvLSTM(3, 4, kernel_size=4)
    with pytest.raises(ValueError, match="hidden_channels must be > 0, got 0"):
        rnn.ConvGRU(3, 0)
    model = rnn.ConvLSTM(3, 4, num_layers=2)
    x = torch.randn(2, 5, 3, 6, 6)
    with pytest.raises(ValueError, match="3 channels .* got 2"):
        model(torch.randn(2, 5, 2, 6, 6))
    with pytest.raises(ValueError, match=r"5-D \(B, T, C, H, W\)"):
        model(torch.randn(5, 3, 6, 6))
    with pytest.raises(ValueError, match=r"h0 must have shape \(2, 2, 4, 6, 6\), got \(1, 2,"):
        model(x, (torch.zeros(1, 2, 4, 6, 6), torch.zeros(1, 2, 4, 6, 6)))
    with pytest.raises(TypeError, match="tuple"):
        model(x, torch.zeros(2, 2, 4, 6, 6))
    with pytest.raises(ValueError, match="float64"):
        model(x.double())


# --- ReNet ------------------------------------------------------------------------------


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_renet_shape_and_global_receptive_field(rnn_type):
    """Every output position depends on the whole image, even the far corner; a patch
    embedding followed by two 3x3 convolutions (the same depth: two sweeps) does not."""
    torch.manual_seed(0)
    renet = rnn.ReNet(2, 3, patch_size=2, rnn_type=rnn_type).double()
    x = torch.randn(2, 2, 12, 10, dtype=torch.float64, requires_grad=True)
    out = renet(x)
    assert out.shape == (2, 6, 6, 5)
    conv = torch.nn.Sequential(
        torch.nn.Conv2d(2, 6, 2, stride=2), torch.nn.Conv2d(6, 6, 3, padding=1),
        torch.nn.Conv2d(6, 6, 3, padding=1),
    ).double()  # fmt: skip
    conv_out = conv(x)
    assert conv_out.shape == out.shape
    for i in range(6):
        for j in range(5):
            grad = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)[0]
            per_pixel = grad[0].abs().sum(0)  # (C, H, W) -> (H, W)
            corner = (0 if i >= 3 else -1, 0 if j >= 3 else -1)  # the farthest corner pixel
            assert per_pixel[corner] > 0, (i, j)
            patch = per_pixel.view(6, 2, 5, 2).sum((1, 3))  # (H, W) -> (H', W')
            assert torch.all(patch > 0), (i, j)  # every patch
            assert torch.all(grad[1] == 0)  # and nothing of the other image
    conv_grad = torch.autograd.grad(conv_out[0, :, 0, 0].sum(), x)[0][0]
    assert torch.all(conv_grad[:, -1, -1] == 0)  # the far corner is outside its field


def test_renet_errors():
    renet = rnn.ReNet(3, 4, patch_size=4)
    with pytest.raises(ValueError, match="multiples of patch_size=4, got 8x6"):
        renet(torch.randn(1, 3, 8, 6))
    with pytest.raises(ValueError, match="rnn_type must be one of"):
        rnn.ReNet(3, 4, rnn_type="rnn")


# --- Learning ---------------------------------------------------------------------------


def moving_pixel_clips(count, steps, size, gen):
    """A pixel starts at a random place and moves one pixel per step in a random direction
    (bouncing off the borders). Returns clips (count, steps, 1, size, size) and the target
    (count, 1, size, size): where the pixel was at the first step."""
    pos = torch.randint(1, size - 1, (count, 2), generator=gen)
    vel = torch.randint(-1, 2, (count, 2), generator=gen)
    rows = torch.arange(count)
    clips = torch.zeros(count, steps, 1, size, size)
    target = torch.zeros(count, 1, size, size)
    target[rows, 0, pos[:, 0], pos[:, 1]] = 1
    for t in range(steps):
        clips[rows, t, 0, pos[:, 0], pos[:, 1]] = 1
        vel = torch.where((pos + vel < 0) | (pos + vel >= size), -vel, vel)
        pos = pos + vel
    return clips, target


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_learns_where_the_pixel_started(kind):
    """Only memory solves it: the last frame shows where the pixel is, not where it was."""
    torch.manual_seed(1)
    steps, size = 4, 8
    cell = KINDS[kind](1, 8, kernel_size=3)
    head = torch.nn.Conv2d(8, 1, 1)
    optimiser = torch.optim.Adam([*cell.parameters(), *head.parameters()], lr=0.005)
    gen = torch.Generator().manual_seed(0)
    val_clips, val_target = moving_pixel_clips(256, steps, size, torch.Generator().manual_seed(1))
    copy_last = F.mse_loss(val_clips[:, -1], val_target).item()
    for _ in range(200):
        clips, target = moving_pixel_clips(64, steps, size, gen)
        logits = head(cell(clips)[0][:, -1])  # (B, T, 8, H, W) -> last step -> (B, 1, H, W)
        loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(10.0))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        predicted = torch.sigmoid(head(cell(val_clips)[0][:, -1]))
    error = F.mse_loss(predicted, val_target).item()
    assert error < 0.1 * copy_last, (error, copy_last)
