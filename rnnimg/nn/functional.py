r"""One recurrent layer in one direction: forward from the equations, backward by hand.

Each cell is a :class:`torch.autograd.Function` that runs the whole sequence of one layer
and one direction, and whose ``backward`` is backpropagation through time written out,
not recorded by autograd. The modules of :mod:`rnnimg.nn.modules` stack these into
multi-layer, bidirectional layers. The ``*_layer_autograd`` functions at the end run the
same equations step by step with autograd doing the backward; they exist to place the
hand-written backward between them and torch's fused kernels (``bench/rnn_cells.py``).

Notation (torch's): ``x_t`` (B, I) is the input at step t, ``h_{t-1}`` (B, H) the state
before it. Every gate has its own input weight ``W_i*`` and recurrent weight ``W_h*`` and
both biases ``b_i*`` and ``b_h*``; torch stacks the gates row-wise into ``weight_ih``
(G*H, I), ``weight_hh`` (G*H, H), ``bias_ih`` and ``bias_hh`` (G*H). ``σ`` is the
logistic sigmoid, ``*`` the element-wise product.

Forward equations
-----------------
Elman (G = 1)::

    a_t = W_ih x_t + b_ih + W_hh h_{t-1} + b_hh
    h_t = tanh(a_t)        or  relu(a_t)

LSTM (G = 4, gate order i, f, g, o)::

    i_t = σ(W_ii x_t + b_ii + W_hi h_{t-1} + b_hi)
    f_t = σ(W_if x_t + b_if + W_hf h_{t-1} + b_hf)
    g_t = tanh(W_ig x_t + b_ig + W_hg h_{t-1} + b_hg)
    o_t = σ(W_io x_t + b_io + W_ho h_{t-1} + b_ho)
    c_t = f_t * c_{t-1} + i_t * g_t
    h_t = o_t * tanh(c_t)

GRU (G = 3, gate order r, z, n; torch's exact formulation, ``b_hn`` inside the reset)::

    r_t = σ(W_ir x_t + b_ir + W_hr h_{t-1} + b_hr)
    z_t = σ(W_iz x_t + b_iz + W_hz h_{t-1} + b_hz)
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_{t-1} + b_hn))
    h_t = (1 - z_t) * n_t + z_t * h_{t-1}

The output at step t is ``h_t``. The reverse direction runs the same equations from the
last step to the first (there ``h_{t-1}`` stands for the state of step t+1).

Backward derivations
--------------------
Write ``dy_t`` for the gradient arriving at the output of step t and ``dh_t`` for the one
carried back from step t+1 (at the last step: the gradient of ``h_n``). The total gradient
on ``h_t`` is ``dH_t = dy_t + dh_t``. For every cell the gradient ``da_t`` on the stacked
pre-activations then gives, summed over all steps (one matmul each, after the loop)::

    dW_ih = Σ_t da^x_t^T x_t      db_ih = Σ_t da^x_t      dx_t = da^x_t W_ih
    dW_hh = Σ_t da^h_t^T h_{t-1}  db_hh = Σ_t da^h_t

and, inside the loop, the recurrent path ``dh_{t-1} = da^h_t W_hh (+ direct terms)``.
``da^x`` and ``da^h`` are the gradients on the input part ``W_ih x + b_ih`` and on the
recurrent part ``W_hh h + b_hh``; they are equal except for the GRU's n gate.

Elman::

    da_t      = dH_t * (1 - h_t²)            (tanh)   or  dH_t * [a_t > 0]   (relu)
    dh_{t-1}  = da_t W_hh

LSTM (two paths into the past: through ``h_{t-1}`` and through the cell state)::

    do_t      = dH_t * tanh(c_t)
    dC_t      = dc_t + dH_t * o_t * (1 - tanh²(c_t))   (dc_t from step t+1, or of c_n)
    di_t      = dC_t * g_t        df_t = dC_t * c_{t-1}        dg_t = dC_t * i_t
    da_t      = [di_t * i_t (1 - i_t), df_t * f_t (1 - f_t),
                 dg_t * (1 - g_t²),    do_t * o_t (1 - o_t)]
    dc_{t-1}  = dC_t * f_t = (dc_t + dH_t * o_t * (1 - tanh²(c_t))) * f_t
                (the cell-state path plus the path through h_t = o_t tanh(c_t))
    dh_{t-1}  = da_t W_hh

GRU (``ĥ_t = W_hn h_{t-1} + b_hn`` is saved in the forward)::

    dn_t      = dH_t * (1 - z_t)             dz_t = dH_t * (h_{t-1} - n_t)
    dā_n      = dn_t * (1 - n_t²)            dr_t = dā_n * ĥ_t
    da^x_t    = [dr_t * r_t (1 - r_t), dz_t * z_t (1 - z_t), dā_n]
    da^h_t    = [dr_t * r_t (1 - r_t), dz_t * z_t (1 - z_t), dā_n * r_t]
    dh_{t-1}  = da^h_t W_hh + dH_t * z_t

Variable lengths
----------------
A boolean ``mask`` (T, B, 1) from :func:`length_mask`, true where step t is inside
sequence b, freezes the state outside the sequence: ``h_t = m_t ? h'_t : h_{t-1}`` (and
the same for ``c_t``) and the output is ``m_t * h'_t``. The forward direction therefore
ends on each sequence's last valid step, and the reverse direction starts there from the
initial state, which is what torch gives for a packed sequence. In the backward the
new-state gradient is ``m_t * dH_t`` and the carry past a padded step passes unchanged:
``dh_{t-1} = m_t da^h_t W_hh + (1 - m_t) dh_t`` (and ``dc_{t-1} = m_t dC_t f_t +
(1 - m_t) dc_t``). The padding of the input is zeroed first, so that its content (even
nan) reaches no result and no gradient.

Computation
-----------
The input projections ``X W_ih^T + b`` of all steps are computed with one matmul before
the loop. The loop keeps the gate activations and the new states (``c_t`` and
``tanh(c_t)`` for the LSTM, ``W_hh h_{t-1} + b_hn`` for the GRU); the states entering each
step are rebuilt from them after the loop. The backward first forms, for all steps at
once, every factor that does not depend on the carried gradient (the derivatives of the
nonlinearities times their partners above), so that its loop holds one matmul and a few
element-wise products per step; the weight gradients are then one matmul each over all
T*B rows.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "RNNFunction",
    "LSTMFunction",
    "GRUFunction",
    "rnn_layer",
    "lstm_layer",
    "gru_layer",
    "rnn_layer_autograd",
    "lstm_layer_autograd",
    "gru_layer_autograd",
    "length_mask",
]

NONLINEARITIES = ("tanh", "relu")


def length_mask(lengths: Tensor, steps: int, device: torch.device) -> Optional[Tensor]:
    """Boolean mask (T, B, 1), true where step t is inside sequence b.

    Args:
        lengths: 1-D integer tensor (B,) of sequence lengths, each in [0, steps].
        steps: T, the padded number of steps.
        device: where the mask is built.

    Returns:
        The mask, or None when every sequence is ``steps`` long (no masking needed).
    """
    lengths = lengths.to(device=device, dtype=torch.long)
    if bool((lengths == steps).all()):
        return None
    steps_range = torch.arange(steps, device=device).unsqueeze(1)  # (T, 1)
    return (steps_range < lengths.unsqueeze(0)).unsqueeze(2)  # (T, B, 1)


def _order(steps: int, reverse: bool) -> range:
    """Time steps in processing order for one direction."""
    return range(steps - 1, -1, -1) if reverse else range(steps)


def _input_projection(x: Tensor, w_ih: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``X W_ih^T + bias`` for all steps at once: (T, B, I) -> (T, B, G*H)."""
    steps, batch, _ = x.shape
    flat = x.reshape(steps * batch, x.shape[2])  # (T*B, I)
    if bias is None:
        out = flat @ w_ih.t()
    else:
        out = torch.addmm(bias, flat, w_ih.t())
    return out.view(steps, batch, w_ih.shape[0])  # (T*B, G*H) -> (T, B, G*H)


def _sum_bias(b_ih: Optional[Tensor], b_hh: Optional[Tensor]) -> Optional[Tensor]:
    """``b_ih + b_hh`` (they are added to the same pre-activation), None without biases."""
    if b_ih is None:
        return b_hh
    if b_hh is None:
        return b_ih
    return b_ih + b_hh


def _masked_input(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """Zero the padding of x, so that whatever it holds (even nan) reaches no result."""
    return x if mask is None else x.masked_fill(~mask, 0.0)


def _states_before(new: Tensor, init: Tensor, mask: Optional[Tensor], reverse: bool) -> Tensor:
    """The state entering each step, rebuilt after the loop from the new states.

    In processing order the state entering a step is the previous step's new state, or
    the initial state for the first step. With a length mask the previous step may be
    padding (reverse direction: the steps past the end come first and keep the initial
    state); then it is the initial state too. The entry of a padded step itself is not
    used (its gradient is zero). Shapes: new (T, B, H), init (B, H) -> (T, B, H).
    """
    first = init.unsqueeze(0)  # (1, B, H)
    if reverse:
        shifted = torch.cat([new[1:], first])
    else:
        shifted = torch.cat([first, new[:-1]])
    if mask is None:
        return shifted
    no_step = mask.new_zeros(1, *mask.shape[1:])  # (1, B, 1)
    previous_valid = torch.cat([mask[1:], no_step]) if reverse else torch.cat([no_step, mask[:-1]])
    return torch.where(previous_valid, shifted, first)


def _recurrent_grads(needs: tuple, da_h: Tensor, h_before: Tensor, index: int) -> tuple:
    """(dW_hh, db_hh): one matmul and one sum over all T*B rows, not one per step.

    ``index`` is the position of w_hh among the Function's inputs (b_hh follows at +2).
    """
    steps, batch, gates = da_h.shape
    dah = da_h.reshape(steps * batch, gates)  # (T*B, G*H)
    dw_hh = dah.t() @ h_before.reshape(steps * batch, h_before.shape[2]) if needs[index] else None
    db_hh = dah.sum(0) if needs[index + 2] else None
    return dw_hh, db_hh


def _input_grads(needs: tuple, da_x: Tensor, x: Tensor, w_ih: Tensor, index: int) -> tuple:
    """(dx, dW_ih, db_ih), one matmul or sum each over all T*B rows.

    ``index`` is the position of w_ih among the Function's inputs (x is at 0, b_ih at +2).
    """
    steps, batch, gates = da_x.shape
    dax = da_x.reshape(steps * batch, gates)  # (T*B, G*H)
    dx = (dax @ w_ih).view(steps, batch, w_ih.shape[1]) if needs[0] else None
    dw_ih = dax.t() @ x.reshape(steps * batch, x.shape[2]) if needs[index] else None
    db_ih = dax.sum(0) if needs[index + 2] else None
    return dx, dw_ih, db_ih


class RNNFunction(torch.autograd.Function):
    """Elman layer, one direction, with hand-written backpropagation through time.

    ``apply(x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse, nonlinearity)`` with
    x (T, B, I), h0 (B, H), w_ih (H, I), w_hh (H, H), b_ih and b_hh (H,) or None,
    mask (T, B, 1) bool from :func:`length_mask` or None, reverse a bool, nonlinearity
    ``"tanh"`` or ``"relu"``. Returns (y (T, B, H), h_n (B, H)).
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse, nonlinearity):
        x = _masked_input(x, mask)
        h_new = _input_projection(x, w_ih, _sum_bias(b_ih, b_hh))  # (T, B, H), overwritten
        activate = torch.Tensor.tanh_ if nonlinearity == "tanh" else torch.Tensor.relu_
        w_hh_t = w_hh.t()
        steps_new = h_new.unbind(0)
        h = h0
        for t in _order(x.shape[0], reverse):
            new = steps_new[t]
            activate(torch.addmm(new, h, w_hh_t, out=new))  # h'_t, in place of its a_t
            h = new if mask is None else torch.where(mask[t], new, h)
        y = h_new if mask is None else h_new * mask
        ctx.save_for_backward(x, h0, w_ih, w_hh, h_new, mask)
        ctx.reverse = reverse
        ctx.nonlinearity = nonlinearity
        return y, h.clone()  # h is a view of h_new (or h0 itself): do not alias outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_hn):
        x, h0, w_ih, w_hh, h_new, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        # da starts as the derivative of the nonlinearity at every step (from the saved
        # outputs) and becomes, step by step in place, dH_t times it.
        if ctx.nonlinearity == "tanh":
            da = torch.mul(h_new, h_new).neg_().add_(1.0)  # 1 - h²
        else:
            da = (h_new > 0).to(h_new.dtype)
        if mask is not None:
            da.mul_(mask)  # da_t = 0 on padding
        steps_da, steps_gy = da.unbind(0), grad_y.unbind(0)
        dh = grad_hn
        for t in _order(x.shape[0], not ctx.reverse):
            da_t = steps_da[t].mul_(steps_gy[t] + dh)  # dH_t * act'(a_t)
            if mask is None:
                dh = da_t @ w_hh
            else:
                dh = torch.where(mask[t], da_t @ w_hh, dh)  # padding: carry dh unchanged
        h_before = _states_before(h_new, h0, mask, ctx.reverse)
        dw_hh, db_hh = _recurrent_grads(needs, da, h_before, 3)
        dx, dw_ih, db_ih = _input_grads(needs, da, x, w_ih, 2)
        dh0 = dh if ctx.needs_input_grad[1] else None
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None, None


class LSTMFunction(torch.autograd.Function):
    """LSTM layer, one direction, with hand-written backpropagation through time.

    ``apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, reverse)`` with x (T, B, I),
    h0 and c0 (B, H), w_ih (4H, I), w_hh (4H, H), b_ih and b_hh (4H,) or None,
    mask (T, B, 1) bool from :func:`length_mask` or None.
    Returns (y (T, B, H), h_n (B, H), c_n (B, H)).
    """

    @staticmethod
    def forward(ctx, x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, reverse):
        x = _masked_input(x, mask)
        steps, batch, _ = x.shape
        hidden = h0.shape[1]
        pre = _input_projection(x, w_ih, _sum_bias(b_ih, b_hh))  # (T, B, 4H)
        w_hh_t = w_hh.t()
        acts = torch.empty_like(pre)  # i, f, g, o after their nonlinearity
        states = x.new_empty(3, steps, batch, hidden)
        c_new, tanh_c, h_new = states.unbind(0)  # c'_t, tanh(c'_t), h'_t: (T, B, H) each
        s_g = slice(2 * hidden, 3 * hidden)
        steps_pre, steps_acts = pre.unbind(0), acts.unbind(0)
        steps_c, steps_tc, steps_h = c_new.unbind(0), tanh_c.unbind(0), h_new.unbind(0)
        h, c = h0, c0
        for t in _order(steps, reverse):
            gates = torch.addmm(steps_pre[t], h, w_hh_t)  # (B, 4H)
            a = steps_acts[t]
            torch.sigmoid(gates, out=a)
            torch.tanh(gates[:, s_g], out=a[:, s_g])
            i, f, g, o = a.chunk(4, 1)
            new_c = steps_c[t]
            torch.mul(f, c, out=new_c).addcmul_(i, g)  # c'_t = f c + i g
            torch.mul(o, torch.tanh(new_c, out=steps_tc[t]), out=steps_h[t])
            if mask is None:
                h, c = steps_h[t], new_c
            else:
                h = torch.where(mask[t], steps_h[t], h)
                c = torch.where(mask[t], new_c, c)
        y = h_new if mask is None else h_new * mask
        ctx.save_for_backward(x, h0, c0, w_ih, w_hh, acts, states, mask)
        ctx.reverse = reverse
        return y, h.clone(), c.clone()  # views of the saved buffers: do not alias outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_hn, grad_cn):
        x, h0, c0, w_ih, w_hh, acts, states, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        c_new, tanh_c, h_new = states.unbind(0)
        steps, batch, hidden = c_new.shape
        reverse = ctx.reverse
        c_before = _states_before(c_new, c0, mask, reverse)
        i, f, g, o = acts.chunk(4, 2)
        # Everything that does not depend on the carried gradients, for all steps at once:
        # da_t = [dC_t * k_i, dC_t * k_f, dC_t * k_g, dH_t * k_o] with the factors
        # k = [g i (1 - i), c_{t-1} f (1 - f), i (1 - g²), tanh(c_t) o (1 - o)], and
        # dC_t = dc_t + dH_t * o_t (1 - tanh²(c_t)). da holds k, then da in place.
        da = torch.rsub(acts, 1.0).mul_(acts)  # σ'(a) = s (1 - s); the g part is redone
        k_i, k_f, k_g, k_o = da.view(steps, batch, 4, hidden).unbind(2)  # (T, B, H) each
        torch.mul(g, g, out=k_g).neg_().add_(1.0).mul_(i)
        k_i.mul_(g)
        k_f.mul_(c_before)
        k_o.mul_(tanh_c)
        del c_before
        o_dtanh = torch.mul(tanh_c, tanh_c).neg_().add_(1.0).mul_(o)
        da4 = da.view(steps, batch, 4, hidden)  # (T, B, 4H) -> (T, B, 4, H)
        steps_da, steps_ifg, steps_o = da.unbind(0), da4[:, :, :3].unbind(0), k_o.unbind(0)
        steps_gy, steps_odt, steps_f = grad_y.unbind(0), o_dtanh.unbind(0), f.unbind(0)
        dh, dc = grad_hn, grad_cn
        for t in _order(steps, not reverse):
            d_state = steps_gy[t] + dh  # dH_t
            d_cell = torch.addcmul(dc, d_state, steps_odt[t])  # dC_t
            if mask is not None:
                m = mask[t]
                d_state = torch.where(m, d_state, 0.0)
                d_cell = torch.where(m, d_cell, 0.0)
            steps_ifg[t].mul_(d_cell.unsqueeze(1))
            steps_o[t].mul_(d_state)
            if mask is None:
                dc = d_cell * steps_f[t]
                dh = steps_da[t] @ w_hh
            else:  # padding: carry dh and dc unchanged
                dc = torch.where(m, d_cell * steps_f[t], dc)
                dh = torch.where(m, steps_da[t] @ w_hh, dh)
        h_before = _states_before(h_new, h0, mask, reverse)
        dw_hh, db_hh = _recurrent_grads(needs, da, h_before, 4)
        dx, dw_ih, db_ih = _input_grads(needs, da, x, w_ih, 3)
        dh0 = dh if ctx.needs_input_grad[1] else None
        dc0 = dc if ctx.needs_input_grad[2] else None
        return dx, dh0, dc0, dw_ih, dw_hh, db_ih, db_hh, None, None


class GRUFunction(torch.autograd.Function):
    """GRU layer, one direction, with hand-written backpropagation through time.

    ``apply(x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse)`` with x (T, B, I), h0 (B, H),
    w_ih (3H, I), w_hh (3H, H), b_ih and b_hh (3H,) or None, mask (T, B, 1) bool from
    :func:`length_mask` or None. Returns (y (T, B, H), h_n (B, H)).
    """

    @staticmethod
    def forward(ctx, x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse):
        x = _masked_input(x, mask)
        steps, batch, _ = x.shape
        hidden = h0.shape[1]
        # b_hr and b_hz add to the same pre-activation as b_ir and b_iz: fold them in;
        # b_hn stays inside r_t * (W_hn h + b_hn).
        if b_hh is None:
            bias_x, bias_h = b_ih, None
        else:
            zeros = b_hh.new_zeros(hidden)
            folded = torch.cat([b_hh[: 2 * hidden], zeros])
            bias_x = folded if b_ih is None else b_ih + folded
            bias_h = torch.cat([zeros, zeros, b_hh[2 * hidden :]])  # (3H,): [0, 0, b_hn]
        pre = _input_projection(x, w_ih, bias_x)  # (T, B, 3H)
        w_hh_t = w_hh.t()
        acts = torch.empty_like(pre)  # r, z, n after their nonlinearity
        rec = torch.empty_like(pre)  # W_hh h_{t-1} + [0, 0, b_hn]; ĥ_t is its n part
        h_new = x.new_empty(steps, batch, hidden)
        steps_pre, steps_acts, steps_rec = pre.unbind(0), acts.unbind(0), rec.unbind(0)
        steps_h = h_new.unbind(0)
        rz, n_part = slice(0, 2 * hidden), slice(2 * hidden, 3 * hidden)
        h = h0
        for t in _order(steps, reverse):
            gh = steps_rec[t]
            if bias_h is None:
                torch.mm(h, w_hh_t, out=gh)
            else:
                torch.addmm(bias_h, h, w_hh_t, out=gh)
            a, p = steps_acts[t], steps_pre[t]
            torch.add(p[:, rz], gh[:, rz], out=a[:, rz]).sigmoid_()
            r, z = a[:, :hidden], a[:, hidden : 2 * hidden]
            n = a[:, n_part]
            torch.addcmul(p[:, n_part], r, gh[:, n_part], out=n).tanh_()
            new = steps_h[t]
            torch.addcmul(n, z, h - n, out=new)  # (1 - z) n + z h
            h = new if mask is None else torch.where(mask[t], new, h)
        y = h_new if mask is None else h_new * mask
        ctx.save_for_backward(x, h0, w_ih, w_hh, acts, rec, h_new, mask)
        ctx.reverse = reverse
        return y, h.clone()  # h is a view of h_new (or h0 itself): do not alias outputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y, grad_hn):
        x, h0, w_ih, w_hh, acts, rec, h_new, mask = ctx.saved_tensors
        needs = ctx.needs_input_grad
        steps, batch, hidden = h_new.shape
        reverse = ctx.reverse
        h_before = _states_before(h_new, h0, mask, reverse)
        r, z, n = acts.chunk(3, 2)
        hat_n = rec[:, :, 2 * hidden :]
        # For all steps at once: da^h_t = dH_t * k_t with the factors
        # k = [dā_n/dH ĥ r (1 - r), z (1 - z) (h_{t-1} - n), dā_n/dH r] where
        # dā_n/dH = (1 - z)(1 - n²); da^x is da^h with dā_n in place of its last part.
        # da_h holds k, then da^h in place.
        dn_dh = torch.mul(n, n).neg_().add_(1.0).mul_(torch.rsub(z, 1.0))  # dā_n / dH_t
        da_h = torch.empty_like(acts)
        k_r, k_z, k_n = da_h.view(steps, batch, 3, hidden).unbind(2)  # (T, B, H) each
        torch.neg(r, out=k_r).add_(1.0).mul_(r).mul_(hat_n).mul_(dn_dh)
        torch.neg(z, out=k_z).add_(1.0).mul_(z).mul_(torch.sub(h_before, n))
        torch.mul(dn_dh, r, out=k_n)
        if mask is not None:
            da_h.mul_(mask)  # da = 0 on padding
        d_state = torch.empty_like(h_new)  # dH_t of every step
        da_h3 = da_h.view(steps, batch, 3, hidden)  # (T, B, 3H) -> (T, B, 3, H)
        steps_ds, steps_dah, steps_dah3 = d_state.unbind(0), da_h.unbind(0), da_h3.unbind(0)
        steps_gy, steps_z = grad_y.unbind(0), z.unbind(0)
        dh = grad_hn
        for t in _order(steps, not reverse):
            ds = torch.add(steps_gy[t], dh, out=steps_ds[t])  # dH_t
            steps_dah3[t].mul_(ds.unsqueeze(1))
            if mask is None:
                dh = torch.addmm(ds * steps_z[t], steps_dah[t], w_hh)
            else:  # padding: carry dh unchanged
                dh = torch.where(mask[t], torch.addmm(ds * steps_z[t], steps_dah[t], w_hh), dh)
        dw_hh, db_hh = _recurrent_grads(needs, da_h, h_before, 3)
        # da^x: the same as da^h but for the n part, dā_n = dH_t * dā_n/dH (not times r).
        # da^h is not needed any more: its n part is overwritten to make da^x.
        dn = d_state.mul_(dn_dh)
        if mask is None:
            k_n.copy_(dn)
        else:
            torch.mul(dn, mask, out=k_n)
        dx, dw_ih, db_ih = _input_grads(needs, da_h, x, w_ih, 2)
        dh0 = dh if ctx.needs_input_grad[1] else None
        return dx, dh0, dw_ih, dw_hh, db_ih, db_hh, None, None


def rnn_layer(
    x, h0, w_ih, w_hh, b_ih=None, b_hh=None, mask=None, reverse=False, nonlinearity="tanh"
):
    """Run one Elman layer in one direction with the hand-written backward.

    Args:
        x: input (T, B, I).
        h0: initial state (B, H).
        w_ih, w_hh: weights (H, I) and (H, H).
        b_ih, b_hh: biases (H,), or None.
        mask: boolean (T, B, 1) from :func:`length_mask`, or None for full-length batches.
        reverse: run from the last step to the first.
        nonlinearity: ``"tanh"`` or ``"relu"``.

    Returns:
        (output (T, B, H), h_n (B, H)).

    Raises:
        ValueError: on an unknown nonlinearity.
    """
    if nonlinearity not in NONLINEARITIES:
        raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
    return RNNFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse, nonlinearity)


def lstm_layer(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, mask=None, reverse=False):
    """Run one LSTM layer in one direction with the hand-written backward.

    Args:
        x: input (T, B, I).
        h0, c0: initial hidden and cell states (B, H).
        w_ih, w_hh: weights (4H, I) and (4H, H), gates stacked i, f, g, o.
        b_ih, b_hh: biases (4H,), or None.
        mask: boolean (T, B, 1) from :func:`length_mask`, or None.
        reverse: run from the last step to the first.

    Returns:
        (output (T, B, H), h_n (B, H), c_n (B, H)).
    """
    return LSTMFunction.apply(x, h0, c0, w_ih, w_hh, b_ih, b_hh, mask, reverse)


def gru_layer(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, mask=None, reverse=False):
    """Run one GRU layer in one direction with the hand-written backward.

    Args:
        x: input (T, B, I).
        h0: initial state (B, H).
        w_ih, w_hh: weights (3H, I) and (3H, H), gates stacked r, z, n.
        b_ih, b_hh: biases (3H,), or None.
        mask: boolean (T, B, 1) from :func:`length_mask`, or None.
        reverse: run from the last step to the first.

    Returns:
        (output (T, B, H), h_n (B, H)).
    """
    return GRUFunction.apply(x, h0, w_ih, w_hh, b_ih, b_hh, mask, reverse)


# ---------------------------------------------------------------------------------------
# The same equations step by step, backward left to autograd (for comparison only).
# The input projection is precomputed as in the Functions, so that the only difference
# with them is who writes the backward.


def _autograd_loop(step, x, state, w_ih, b_ih, b_hh, mask, reverse):
    """Drive ``step(pre_t, state) -> (h'_t, new_state)`` over time with masking."""
    # unbind, not pre[t]: the backward of one unbind is one stack, that of T selects
    # would be T full-size zero tensors.
    steps_pre = _input_projection(x, w_ih, b_ih).unbind(0)
    outputs = [None] * x.shape[0]
    for t in _order(x.shape[0], reverse):
        new_h, new_state = step(steps_pre[t], state)
        if mask is None:
            state = new_state
            outputs[t] = new_h
        else:
            state = tuple(torch.where(mask[t], n, s) for n, s in zip(new_state, state))
            outputs[t] = new_h * mask[t]
    return torch.stack(outputs), state


def rnn_layer_autograd(
    x, h0, w_ih, w_hh, b_ih=None, b_hh=None, mask=None, reverse=False, nonlinearity="tanh"
):
    """:func:`rnn_layer` written plainly, one step at a time, autograd doing the backward."""
    act = torch.tanh if nonlinearity == "tanh" else torch.relu

    def step(pre_t, state):
        a = pre_t + state[0] @ w_hh.t()
        if b_hh is not None:
            a = a + b_hh
        h = act(a)
        return h, (h,)

    y, (h,) = _autograd_loop(step, x, (h0,), w_ih, b_ih, b_hh, mask, reverse)
    return y, h


def lstm_layer_autograd(x, h0, c0, w_ih, w_hh, b_ih=None, b_hh=None, mask=None, reverse=False):
    """:func:`lstm_layer` written plainly, one step at a time, autograd doing the backward."""

    def step(pre_t, state):
        h, c = state
        gates = pre_t + h @ w_hh.t()
        if b_hh is not None:
            gates = gates + b_hh
        i, f, g, o = gates.chunk(4, 1)
        i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
        c = f * c + i * g
        h = o * torch.tanh(c)
        return h, (h, c)

    y, (h, c) = _autograd_loop(step, x, (h0, c0), w_ih, b_ih, b_hh, mask, reverse)
    return y, h, c


def gru_layer_autograd(x, h0, w_ih, w_hh, b_ih=None, b_hh=None, mask=None, reverse=False):
    """:func:`gru_layer` written plainly, one step at a time, autograd doing the backward."""

    def step(pre_t, state):
        h = state[0]
        rec = h @ w_hh.t()
        if b_hh is not None:
            rec = rec + b_hh
        x_r, x_z, x_n = pre_t.chunk(3, 1)
        h_r, h_z, h_n = rec.chunk(3, 1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, (h,)

    y, (h,) = _autograd_loop(step, x, (h0,), w_ih, b_ih, b_hh, mask, reverse)
    return y, h
