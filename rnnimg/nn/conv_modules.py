"""Multi-layer ConvLSTM and ConvGRU over clips (B, T, C, H, W), on the hand-written cells.

Each layer runs one autograd Function of :mod:`rnnimg.nn.conv_functional` (equations and
backward derivation there), whose backward is written by hand. Parameters per layer k:
``weight_x_l{k}`` (G*Hd, C_in, k, k), ``weight_h_l{k}`` (G*Hd, Hd, k, k), ``bias_x_l{k}`` and
``bias_h_l{k}`` (G*Hd,), gates stacked i, f, g, o (G = 4) or r, z, n (G = 3), all drawn
from U(-1/sqrt(Hd*k*k), 1/sqrt(Hd*k*k)) like torch's recurrent layers.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch
from torch import Tensor, nn

from rnnimg.nn.conv_functional import conv_gru_layer, conv_lstm_layer

__all__ = ["ConvLSTM", "ConvGRU"]

_GATES = {"LSTM": 4, "GRU": 3}


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


class _ConvRecurrentBase(nn.Module):
    """Stack of convolutional recurrent layers shared by :class:`ConvLSTM` and :class:`ConvGRU`."""

    def __init__(
        self,
        mode: str,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.input_channels = _check_positive_int("input_channels", input_channels)
        self.hidden_channels = _check_positive_int("hidden_channels", hidden_channels)
        self.kernel_size = _check_positive_int("kernel_size", kernel_size)
        if self.kernel_size % 2 == 0:
            raise ValueError(
                "kernel_size must be odd (padding kernel_size // 2 keeps the grid), got "
                f"{kernel_size}"
            )
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        gates = _GATES[mode] * self.hidden_channels
        k = self.kernel_size
        factory = {"device": device, "dtype": dtype}
        for layer in range(self.num_layers):
            layer_input = self.input_channels if layer == 0 else self.hidden_channels
            shapes = [
                (f"weight_x_l{layer}", (gates, layer_input, k, k)),
                (f"weight_h_l{layer}", (gates, self.hidden_channels, k, k)),
            ]
            if self.bias:
                shapes += [(f"bias_x_l{layer}", (gates,)), (f"bias_h_l{layer}", (gates,))]
            for name, shape in shapes:
                self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-b, b), b = 1/sqrt(hidden_channels * k * k)."""
        bound = 1.0 / math.sqrt(self.hidden_channels * self.kernel_size**2)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def extra_repr(self) -> str:
        text = f"{self.input_channels}, {self.hidden_channels}, kernel_size={self.kernel_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if not self.batch_first:
            text += ", batch_first=False"
        return text

    def _layer_params(self, layer: int) -> tuple:
        """(w_x, w_h, b_x, b_h) of layer ``layer``, biases None without bias."""
        if self.bias:
            names = ("weight_x", "weight_h", "bias_x", "bias_h")
            return tuple(getattr(self, f"{name}_l{layer}") for name in names)
        return getattr(self, f"weight_x_l{layer}"), getattr(self, f"weight_h_l{layer}"), None, None

    def _check_state(self, state, name: str, expected: tuple, ref: Tensor) -> Tensor:
        if not isinstance(state, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(state.shape)}")
        if state.dtype != ref.dtype or state.device != ref.device:
            raise ValueError(
                f"{name} must be {ref.dtype} on {ref.device} like the input, got "
                f"{state.dtype} on {state.device}"
            )
        return state

    def _run(self, input: Tensor, hx):
        """Shared forward: returns (output, [h_n] or [h_n, c_n]), states (L, B, Hd, H, W)."""
        is_lstm = self.mode == "LSTM"
        if not isinstance(input, Tensor):
            raise TypeError(f"input must be a tensor, got {type(input).__name__}")
        if input.dim() != 5:
            layout = "(B, T, C, H, W)" if self.batch_first else "(T, B, C, H, W)"
            raise ValueError(f"input must be 5-D {layout}, got shape {tuple(input.shape)}")
        # (B, T, C, H, W) -> (T, B, C, H, W), the layout of the Functions
        x = input.transpose(0, 1) if self.batch_first else input
        steps, batch, channels, height, width = x.shape
        if channels != self.input_channels:
            raise ValueError(
                f"input must have {self.input_channels} channels (input_channels), got {channels}"
            )
        if steps == 0:
            raise ValueError("input must have at least one time step, got 0")
        weight = self.weight_x_l0
        if x.dtype != weight.dtype or x.device != weight.device:
            raise ValueError(
                f"input must be {weight.dtype} on {weight.device} like the parameters, got "
                f"{x.dtype} on {x.device}"
            )
        state_shape = (self.num_layers, batch, self.hidden_channels, height, width)
        if hx is None:
            h0 = x.new_zeros(state_shape)
            c0 = h0 if is_lstm else None
        elif is_lstm:
            if not (isinstance(hx, (tuple, list)) and len(hx) == 2):
                raise TypeError("hx of a ConvLSTM must be a tuple (h0, c0) or None")
            h0 = self._check_state(hx[0], "h0", state_shape, x)
            c0 = self._check_state(hx[1], "c0", state_shape, x)
        else:
            h0 = self._check_state(hx, "hx", state_shape, x)
            c0 = None

        h_n, c_n = [], []
        layer_input = x.contiguous()
        for layer in range(self.num_layers):
            w_x, w_h, b_x, b_h = self._layer_params(layer)
            if is_lstm:
                layer_input, h, c = conv_lstm_layer(
                    layer_input, h0[layer], c0[layer], w_x, w_h, b_x, b_h
                )
                c_n.append(c)
            else:
                layer_input, h = conv_gru_layer(layer_input, h0[layer], w_x, w_h, b_x, b_h)
            h_n.append(h)
        output = layer_input  # (T, B, Hd, H, W)
        if self.batch_first:
            output = output.transpose(0, 1)  # (T, B, Hd, H, W) -> (B, T, Hd, H, W)
        states = [torch.stack(h_n)] + ([torch.stack(c_n)] if is_lstm else [])  # (L, B, Hd, H, W)
        return output, states


class ConvLSTM(_ConvRecurrentBase):
    """Convolutional LSTM (Shi et al. 2015, without peepholes): every gate is
    ``σ(W_x* ⋆ x_t + b_x* + W_h* ⋆ h_{t-1} + b_h*)`` (g: tanh), ``c_t = f c_{t-1} + i g``,
    ``h_t = o tanh(c_t)``, with ``⋆`` a k x k convolution that keeps the grid.

    Shapes (L = num_layers, Hd = hidden_channels):
        input: (B, T, C, H, W), or (T, B, C, H, W) with ``batch_first=False``.
        hx: (h0, c0), each (L, B, Hd, H, W); zeros when omitted.
        output: the last layer's h_t at every step, (B, T, Hd, H, W) (or (T, B, ...)).
        h_n, c_n: (L, B, Hd, H, W), the states after the last step, per layer.

    Args:
        input_channels: C, channels of each input frame.
        hidden_channels: Hd, channels of the state.
        kernel_size: odd k of every convolution (padding k // 2).
        num_layers: stacked layers, each fed the previous one's output.
        bias: whether to use ``bias_x`` and ``bias_h``.
        batch_first: input and output as (B, T, ...) (the clip layout of rnnimg).

    Raises:
        ValueError: on a non-positive size or an even kernel_size.
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "LSTM", input_channels, hidden_channels, kernel_size, num_layers, bias,
            batch_first, device, dtype,
        )  # fmt: skip

    def forward(self, input: Tensor, hx: Optional[tuple] = None):
        """Run the clip.

        Args:
            input: see the class docstring.
            hx: (h0, c0), zeros when None.

        Returns:
            (output, (h_n, c_n)).

        Raises:
            ValueError: on wrong shapes, dtypes or devices.
            TypeError: when hx is not a pair.
        """
        output, (h_n, c_n) = self._run(input, hx)
        return output, (h_n, c_n)


class ConvGRU(_ConvRecurrentBase):
    """Convolutional GRU in torch's GRU convention (``b_hn`` inside the reset gate):
    ``r, z = σ(W_x* ⋆ x_t + b_x* + W_h* ⋆ h_{t-1} + b_h*)``,
    ``n = tanh(W_xn ⋆ x_t + b_xn + r (W_hn ⋆ h_{t-1} + b_hn))``,
    ``h_t = (1 - z) n + z h_{t-1}``.

    Shapes and arguments as :class:`ConvLSTM`, with one state: hx (L, B, Hd, H, W);
    returns (output, h_n). Weights stack the gates r, z, n (3*Hd output channels).
    """

    def __init__(
        self,
        input_channels: int,
        hidden_channels: int,
        kernel_size: int = 3,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "GRU", input_channels, hidden_channels, kernel_size, num_layers, bias,
            batch_first, device, dtype,
        )  # fmt: skip

    def forward(self, input: Tensor, hx: Optional[Tensor] = None):
        """Run the clip; arguments as :meth:`ConvLSTM.forward` with hx a single tensor.

        Returns:
            (output, h_n).
        """
        output, (h_n,) = self._run(input, hx)
        return output, h_n
