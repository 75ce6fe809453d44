r"""One convolutional recurrent layer: forward from the equations, backward by hand.

ConvLSTM (Shi et al. 2015, "Convolutional LSTM Network", here without the peephole terms
``W_c* ∘ c``) and ConvGRU replace every matrix product of the LSTM and GRU of
:mod:`rnnimg.nn.functional` by a 2-D convolution, so that the state is a feature map and
each position only sees its ``k x k`` neighbourhood per step. Each layer is one
:class:`torch.autograd.Function` whose ``backward`` is backpropagation through time
written out, not recorded by autograd. :mod:`rnnimg.nn.conv_modules` stacks them.

Notation: ``x_t`` (B, C, H, W) is the input at step t, ``h_{t-1}`` (B, Hd, H, W) the
state before it, ``⋆`` a stride-1 convolution with zero padding ``k // 2`` (odd k, so the
grid is kept), ``σ`` the logistic sigmoid, ``*`` the element-wise product. The gates are
stacked along the channels: ``w_x`` (G*Hd, C, k, k), ``w_h`` (G*Hd, Hd, k, k), ``b_x`` and
``b_h`` (G*Hd,), G = 4 (i, f, g, o) or 3 (r, z, n).

Forward equations
-----------------
ConvLSTM::

    i_t = σ(W_xi ⋆ x_t + b_xi + W_hi ⋆ h_{t-1} + b_hi)      (f_t, o_t likewise)
    g_t = tanh(W_xg ⋆ x_t + b_xg + W_hg ⋆ h_{t-1} + b_hg)
    c_t = f_t * c_{t-1} + i_t * g_t
    h_t = o_t * tanh(c_t)

ConvGRU (torch's GRU convention, ``b_hn`` inside the reset)::

    r_t = σ(W_xr ⋆ x_t + b_xr + W_hr ⋆ h_{t-1} + b_hr)      (z_t likewise)
    n_t = tanh(W_xn ⋆ x_t + b_xn + r_t * (W_hn ⋆ h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}

Backward derivations
--------------------
The element-wise part is the LSTM's and GRU's of :mod:`rnnimg.nn.functional`, per pixel.
What changes is the transpose of a convolution. For ``a = W ⋆ u`` (stride 1, padding p)::

    du = W ⋆ᵀ da            (conv_transpose2d with the same weight and padding)
    dW[o, c, m, n] = Σ_{b, y, x} da[b, o, y, x] u[b, c, y + m - p, x + n - p]
    db[o] = Σ_{b, y, x} da[b, o, y, x]

and each of these is a sum over the batch, so over all steps at once it is the same
operation on (T*B) images. Write ``dH_t = dy_t + dh_t`` (output gradient plus the one
carried from step t+1, or of h_n). ConvLSTM, with ``dC_t = dc_t + dH_t * o_t (1 - tanh²(c_t))``::

    da_t      = [dC_t g_t i_t (1 - i_t), dC_t c_{t-1} f_t (1 - f_t),
                 dC_t i_t (1 - g_t²),    dH_t tanh(c_t) o_t (1 - o_t)]
    dc_{t-1}  = dC_t * f_t              dh_{t-1} = W_h ⋆ᵀ da_t

ConvGRU, with ``ĥ_t = W_hn ⋆ h_{t-1} + b_hn`` saved in the forward and
``dā_n = dH_t (1 - z_t)(1 - n_t²)``::

    da^h_t    = [dā_n ĥ_t r_t (1 - r_t), dH_t (h_{t-1} - n_t) z_t (1 - z_t), dā_n r_t]
    da^x_t    = da^h_t with dā_n as its n part
    dh_{t-1}  = W_h ⋆ᵀ da^h_t + dH_t * z_t

and then, for all steps at once (the sums run over t, b and the pixels)::

    dx     = W_x ⋆ᵀ da^x           dW_x = Σ da^x ⊗ x       db_x = Σ da^x
    dW_h   = Σ da^h ⊗ h_{t-1}      db_h = Σ da^h           (da^x = da^h = da for the LSTM)

Computation
-----------
The input convolutions of all T steps are one convolution over (T*B) images before the
loop; their gradients (dx and dW_x together) one ``convolution_backward`` over (T*B)
images after it, and so is dW_h. The backward loop holds one transposed convolution and a
few element-wise products per step; every factor that does not depend on the carried
gradient is formed for all steps before it. The ``*_layer_autograd`` functions at the end
run the same equations step by step with autograd doing the backward (for the benchmark).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "ConvLSTMFunction",
    "ConvGRUFunction",
    "conv_lstm_layer",
    "conv_gru_layer",
    "conv_lstm_layer_autograd",
    "conv_gru_layer_autograd",
]


def _padding(weight: Tensor) -> int:
    """Zero padding that keeps the grid for an odd square kernel."""
    return weight.shape[-1] // 2


def _sum_bias(b_x: Optional[Tensor], b_h: Optional[Tensor]) -> Optional[Tensor]:
    """``b_x + b_h`` (they add to the same pre-activation), None without biases."""
    if b_x is None:
        return b_h
    if b_h is None:
        return b_x
    return b_x + b_h


def _input_convolution(x: Tensor, w_x: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``W_x ⋆ x_t + bias`` for all steps at once: (T, B, C, H, W) -> (T, B, G*Hd, H, W)."""
    steps, batch = x.shape[:2]
    flat = x.reshape(steps * batch, *x.shape[2:])  # (T, B, C, H, W) -> (T*B, C, H, W)
    out = F.conv2d(flat, w_x, bias, padding=_padding(w_x))  # (T*B, G*Hd, H, W)
    return out.view(steps, batch, *out.shape[1:])  # -> (T, B, G*Hd, H, W)


def _recurrent_input_grad(da_t: Tensor, w_h: Tensor) -> Tensor:
    """``W_h ⋆ᵀ da_t``: (B, G*Hd, H, W) -> (B, Hd, H, W), the gradient on h_{t-1}."""
    return F.conv_transpose2d(da_t, w_h, padding=_padding(w_h))


def _states_before(new: Tensor, init: Tensor) -> Tensor:
    """The state entering each step: (T, B, Hd, H, W) and (B, Hd, H, W) -> (T, B, Hd, H, W)."""
    return torch.cat([init.unsqueeze(0), new[:-1]])


def _conv_grads(da: Tensor, inp: Tensor, weight: Tensor, need_input: bool, need_weight: bool):
    """(d inp, d weight) of ``weight ⋆ inp`` over all T*B images in one call (None if not needed).

    Shapes: da (T, B, G*Hd, H, W), inp (T, B, C, H, W), weight (G*Hd, C, k, k).
    """
    if not (need_input or need_weight):
        return None, None
    steps, batch = da.shape[:2]
    pad = _padding(weight)
    d_inp, d_weight, _ = torch.ops.aten.convolution_backward(
        da.reshape(steps * batch, *da.shape[2:]),  # (T, B, G*Hd, H, W) -> (T*B, G*Hd, H, W)
        inp.reshape(steps * batch, *inp.shape[2:]),  # (T, B, C, H, W) -> (T*B, C, H, W)
        weight,
        None,
        [1, 1],
        [pad, pad],
        [1, 1],
        False,
        [0, 0],
        1,
        [need_input, need_weight, False],
    )
    if d_inp is not None:
        d_inp = d_inp.view(inp.shape)  # (T*B, C, H, W) -> (T, B, C, H, W)
    return d_inp, d_weight


def _bias_grad(da: Tensor) -> Tensor:
    """Σ over steps, batch and pixels: (T, B, G*Hd, H, W) -> (G*Hd,)."""
    return da.sum((0, 1, 3, 4))


class ConvLSTMFunction(torch.autograd.Function):
    """ConvLSTM layer with hand-written backpropagation through time.

    ``apply(x, h0, c0, w_x, w_h, b_x, b_h)`` with x (T, B, C, H, W), h0 and c0
    (B, Hd, H, W), w_x (4Hd, C, k, k), w_h (4Hd, Hd, k, k), b_x and b_h (4Hd,) or None.
    Returns (y (T, B, Hd, H, W), h_n (B, Hd, H, W), c_n (B, Hd, H, W)).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_x, w_h, b_x, b_h):
        steps, batch = x.shape[:2]
        hidden = w_h.shape[1]
        pad = _padding(w_h)
        pre = _input_convolution(x, w_x, _sum_bias(b_x, b_h))  # (T, B, 4Hd, H, W)
        acts = torch.empty_like(pre)  # i, f, g, o after their nonlinearity
        states = x.new_empty(3, steps, batch, hidden, *x.shape[3:])
        c_new, tanh_c, h_new = states.unbind(0)  # c_t, tanh(c_t), h_t: (T, B, Hd, H, W) each
        s_g = slice(2 * hidden, 3 * hidden)
        steps_pre, steps_acts = pre.unbind(0), acts.unbind(0)
        steps_c, steps_tc, steps_h = c_new.unbind(0), tanh_c.unbind(0), h_new.unbind(0)
        h, c = h0, c0
        for t in range(steps):
            gates = F.conv2d(h, w_h, padding=pad).add_(steps_pre[t])  # (B, 4Hd, H, W)
            a = steps_acts[t]
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[:, s_g], out=a[:, s_g])
            i, f, g, o = a.chunk(4, 1)
            c = torch.mul(f, c, out=steps_c[t]).addcmul_(i, g)  # c_t = f c + i g
            h = torch.mul(o, torch.tanh(c, out=steps_tc[t]), out=steps_h[t])
        ctx.save_for_backward(x, h0, c0, w_x, w_h, acts, states)
        return h_new, h.clone(), c.clone()  # views of the saved buffers: do not alias outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_hn, grad_cn):
        x, h0, c0, w_x, w_h, acts, states = ctx.saved_tensors
        needs = ctx.needs_input_grad
        c_new, tanh_c, h_new = states.unbind(0)
        steps, batch, hidden = c_new.shape[:3]
        grid = c_new.shape[3:]
        i, f, g, o = acts.chunk(4, 2)
        # The factors that do not depend on the carried gradients, for all steps at once:
        # da_t = [dC_t k_i, dC_t k_f, dC_t k_g, dH_t k_o] with
        # k = [g i (1 - i), c_{t-1} f (1 - f), i (1 - g²), tanh(c_t) o (1 - o)].
        # da holds k, then da in place.
        da = torch.rsub(acts, 1.0).mul_(acts)  # σ'(a) = s (1 - s); the g part is redone
        # (T, B, 4Hd, H, W) -> (T, B, 4, Hd, H, W)
        da6 = da.view(steps, batch, 4, hidden, *grid)
        k_i, k_f, k_g, k_o = da6.unbind(2)  # (T, B, Hd, H, W) each
        torch.mul(g, g, out=k_g).neg_().add_(1.0).mul_(i)
        k_i.mul_(g)
        k_f.mul_(_states_before(c_new, c0))
        k_o.mul_(tanh_c)
        o_dtanh = torch.mul(tanh_c, tanh_c).neg_().add_(1.0).mul_(o)  # o (1 - tanh²(c))
        steps_da, steps_ifg, steps_o = da.unbind(0), da6[:, :, :3].unbind(0), k_o.unbind(0)
        steps_gy, steps_odt, steps_f = grad_y.unbind(0), o_dtanh.unbind(0), f.unbind(0)
        dh, dc = grad_hn, grad_cn
        for t in range(steps - 1, -1, -1):
            d_state = steps_gy[t] + dh  # dH_t
            d_cell = torch.addcmul(dc, d_state, steps_odt[t])  # dC_t
            steps_ifg[t].mul_(d_cell.unsqueeze(1))
            steps_o[t].mul_(d_state)
            dc = d_cell * steps_f[t]
            if t > 0 or needs[1]:
                dh = _recurrent_input_grad(steps_da[t], w_h)
        _, dw_h = _conv_grads(da, _states_before(h_new, h0), w_h, False, needs[4])
        dx, dw_x = _conv_grads(da, x, w_x, needs[0], needs[3])
        db = _bias_grad(da) if needs[5] or needs[6] else None
        return (
            dx,
            dh if needs[1] else None,
            dc if needs[2] else None,
            dw_x,
            dw_h,
            db if needs[5] else None,
            db if needs[6] else None,
        )


class ConvGRUFunction(torch.autograd.Function):
    """ConvGRU layer with hand-written backpropagation through time.

    ``apply(x, h0, w_x, w_h, b_x, b_h)`` with x (T, B, C, H, W), h0 (B, Hd, H, W),
    w_x (3Hd, C, k, k), w_h (3Hd, Hd, k, k), b_x and b_h (3Hd,) or None.
    Returns (y (T, B, Hd, H, W), h_n (B, Hd, H, W)).
    """

    @staticmethod
    def forward(ctx, x, h0, w_x, w_h, b_x, b_h):
        steps, batch = x.shape[:2]
        hidden = w_h.shape[1]
        pad = _padding(w_h)
        # b_hr and b_hz add to the same pre-activation as b_xr and b_xz: fold them in;
        # b_hn stays inside r_t * (W_hn ⋆ h + b_hn).
        if b_h is None:
            bias_x, bias_h = b_x, None
        else:
            zeros = b_h.new_zeros(hidden)
            folded = torch.cat([b_h[: 2 * hidden], zeros])
            bias_x = folded if b_x is None else b_x + folded
            bias_h = torch.cat([zeros, zeros, b_h[2 * hidden :]])  # (3Hd,): [0, 0, b_hn]
        pre = _input_convolution(x, w_x, bias_x)  # (T, B, 3Hd, H, W)
        acts = torch.empty_like(pre)  # r, z, n after their nonlinearity
        rec = torch.empty_like(pre)  # W_h ⋆ h_{t-1} + [0, 0, b_hn]; ĥ_t is its n part
        h_new = x.new_empty(steps, batch, hidden, *x.shape[3:])
        steps_pre, steps_acts, steps_rec = pre.unbind(0), acts.unbind(0), rec.unbind(0)
        steps_h = h_new.unbind(0)
        rz, n_part = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
        h = h0
        for t in range(steps):
            gh = steps_rec[t]
            gh.copy_(F.conv2d(h, w_h, bias_h, padding=pad))  # (B, 3Hd, H, W)
            a, p = steps_acts[t], steps_pre[t]
            torch.add(p[:, rz], gh[:, rz], out=a[:, rz]).sigmoid_()
            r, z = a[:, :hidden], a[:, hidden : 2 * hidden]
            n = a[:, n_part]
            torch.addcmul(p[:, n_part], r, gh[:, n_part], out=n).tanh_()
            h = torch.addcmul(n, z, h - n, out=steps_h[t])  # (1 - z) n + z h
        ctx.save_for_backward(x, h0, w_x, w_h, acts, rec, h_new)
        return h_new, h.clone()  # h is a view of h_new: do not alias outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_hn):
        x, h0, w_x, w_h, acts, rec, h_new = ctx.saved_tensors
        needs = ctx.needs_input_grad
        steps, batch, hidden = h_new.shape[:3]
        grid = h_new.shape[3:]
        h_before = _states_before(h_new, h0)
        r, z, n = acts.chunk(3, 2)
        hat_n = rec[:, :, 2 * hidden :]
        # For all steps at once: da^h_t = dH_t * k_t with the factors
        # k = [dā_n/dH ĥ r (1 - r), z (1 - z) (h_{t-1} - n), dā_n/dH r] where
        # dā_n/dH = (1 - z)(1 - n²); da^x is da^h with dā_n in place of its last part.
        # da_h holds k, then da^h in place.
        dn_dh = torch.mul(n, n).neg_().add_(1.0).mul_(torch.rsub(z, 1.0))  # dā_n / dH_t
        da_h = torch.empty_like(acts)
        # (T, B, 3Hd, H, W) -> (T, B, 3, Hd, H, W)
        da_h6 = da_h.view(steps, batch, 3, hidden, *grid)
        k_r, k_z, k_n = da_h6.unbind(2)  # (T, B, Hd, H, W) each
        torch.neg(r, out=k_r).add_(1.0).mul_(r).mul_(hat_n).mul_(dn_dh)
        torch.neg(z, out=k_z).add_(1.0).mul_(z).mul_(torch.sub(h_before, n))
        torch.mul(dn_dh, r, out=k_n)
        d_state = torch.empty_like(h_new)  # dH_t of every step
        steps_ds, steps_dah, steps_dah6 = d_state.unbind(0), da_h.unbind(0), da_h6.unbind(0)
        steps_gy, steps_z = grad_y.unbind(0), z.unbind(0)
        dh = grad_hn
        for t in range(steps - 1, -1, -1):
            ds = torch.add(steps_gy[t], dh, out=steps_ds[t])  # dH_t
            steps_dah6[t].mul_(ds.unsqueeze(1))
            if t > 0 or needs[1]:
                dh = _recurrent_input_grad(steps_dah[t], w_h).addcmul_(ds, steps_z[t])
        _, dw_h = _conv_grads(da_h, h_before, w_h, False, needs[3])
        db_h = _bias_grad(da_h) if needs[5] else None
        # da^x: the same as da^h but for the n part, dā_n = dH_t * dā_n/dH (not times r).
        # da^h is not needed any more: its n part is overwritten to make da^x.
        torch.mul(d_state, dn_dh, out=k_n)
        dx, dw_x = _conv_grads(da_h, x, w_x, needs[0], needs[2])
        db_x = _bias_grad(da_h) if needs[4] else None
        return dx, dh if needs[1] else None, dw_x, dw_h, db_x, db_h


def conv_lstm_layer(x, h0, c0, w_x, w_h, b_x=None, b_h=None):
    """Run one ConvLSTM layer with the hand-written backward.

    Args:
        x: input (T, B, C, H, W).
        h0, c0: initial hidden and cell states (B, Hd, H, W).
        w_x, w_h: weights (4Hd, C, k, k) and (4Hd, Hd, k, k), k odd, gates i, f, g, o.
        b_x, b_h: biases (4Hd,), or None.

    Returns:
        (output (T, B, Hd, H, W), h_n (B, Hd, H, W), c_n (B, Hd, H, W)).
    """
    return ConvLSTMFunction.apply(x, h0, c0, w_x, w_h, b_x, b_h)


def conv_gru_layer(x, h0, w_x, w_h, b_x=None, b_h=None):
    """Run one ConvGRU layer with the hand-written backward.

    Args:
        x: input (T, B, C, H, W).
        h0: initial state (B, Hd, H, W).
        w_x, w_h: weights (3Hd, C, k, k) and (3Hd, Hd, k, k), k odd, gates r, z, n.
        b_x, b_h: biases (3Hd,), or None.

    Returns:
        (output (T, B, Hd, H, W), h_n (B, Hd, H, W)).
    """
    return ConvGRUFunction.apply(x, h0, w_x, w_h, b_x, b_h)


# ---------------------------------------------------------------------------------------
# The same equations step by step, backward left to autograd (for comparison only).
# The input convolution is batched over the steps as in the Functions, so that the only
# difference with them is who writes the backward.


def conv_lstm_layer_autograd(x, h0, c0, w_x, w_h, b_x=None, b_h=None):
    """:func:`conv_lstm_layer` written plainly, one step at a time, autograd doing the backward."""
    pad = _padding(w_h)
    h, c, outputs = h0, c0, []
    for pre_t in _input_convolution(x, w_x, b_x).unbind(0):
        gates = pre_t + F.conv2d(h, w_h, b_h, padding=pad)
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs), h, c


def conv_gru_layer_autograd(x, h0, w_x, w_h, b_x=None, b_h=None):
    """:func:`conv_gru_layer` written plainly, one step at a time, autograd doing the backward."""
    pad = _padding(w_h)
    h, outputs = h0, []
    for pre_t in _input_convolution(x, w_x, b_x).unbind(0):
        x_r, x_z, x_n = pre_t.chunk(3, 1)
        h_r, h_z, h_n = F.conv2d(h, w_h, b_h, padding=pad).chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs), h
