"""Multi-layer, bidirectional RNN, LSTM and GRU layers built on the hand-written cells.

The modules take torch.nn's constructor arguments, hold parameters with torch.nn's names
and shapes (``weight_ih_l0``, ``bias_hh_l1_reverse``, ...) so that ``load_state_dict``
works both ways with ``torch.nn.RNN``/``LSTM``/``GRU``, and return what torch.nn's
return. Each layer and direction runs one autograd Function of
:mod:`rnnimg.nn.functional`, whose backward is written by hand.

Variable-length batches are given either as ``lengths=`` next to a padded input or as a
``PackedSequence``; both give what torch.nn gives for the packed sequence.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from rnnimg.nn.functional import NONLINEARITIES, gru_layer, length_mask, lstm_layer, rnn_layer

__all__ = ["RNN", "LSTM", "GRU"]

_GATES = {"RNN_TANH": 1, "RNN_RELU": 1, "LSTM": 4, "GRU": 3}

LengthsLike = Union[Tensor, Sequence[int]]


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return int(value)


def _check_lengths(lengths: LengthsLike, batch: int, steps: int) -> Tensor:
    """Lengths as a CPU int64 tensor (B,), each in [0, T].

    Raises:
        ValueError: on a wrong shape, non-integer values or a length outside [0, T].
    """
    if isinstance(lengths, Tensor):
        if lengths.is_floating_point() or lengths.is_complex() or lengths.dtype == torch.bool:
            raise ValueError(f"lengths must hold integers, got dtype {lengths.dtype}")
        lengths = lengths.detach().to(device="cpu", dtype=torch.long)
    else:
        values = list(lengths)
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in values):
            raise ValueError(f"lengths must hold integers, got {values!r}")
        lengths = torch.tensor(values, dtype=torch.long)
    if lengths.dim() != 1 or lengths.shape[0] != batch:
        raise ValueError(
            f"lengths must be 1-D with one entry per sequence ({batch}), got shape "
            f"{tuple(lengths.shape)}"
        )
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > steps):
        raise ValueError(
            f"lengths must lie in [0, {steps}] (the padded length), got min "
            f"{int(lengths.min())} and max {int(lengths.max())}"
        )
    return lengths


class _RecurrentBase(nn.Module):
    """Stack of layers and directions shared by :class:`RNN`, :class:`LSTM`, :class:`GRU`."""

    def __init__(
        self,
        mode: str,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if proj_size != 0:
            raise ValueError(
                f"proj_size is not supported by rnnimg.nn (only 0 is accepted), got {proj_size}"
            )
        if isinstance(dropout, bool) or not isinstance(dropout, numbers.Number):
            raise TypeError(f"dropout must be a number in [0, 1], got {type(dropout).__name__}")
        if not 0.0 <= float(dropout) <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.mode = mode
        self.input_size = _check_positive_int("input_size", input_size)
        self.hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.num_layers = _check_positive_int("num_layers", num_layers)
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = float(dropout)
        self.bidirectional = bool(bidirectional)
        self.proj_size = 0
        if self.dropout > 0 and self.num_layers == 1:
            warnings.warn(
                "dropout applies between recurrent layers, so it does nothing with "
                f"num_layers=1 (got dropout={dropout})",
                stacklevel=3,
            )
        directions = 2 if self.bidirectional else 1
        gate_size = _GATES[mode] * self.hidden_size
        factory = {"device": device, "dtype": dtype}
        self._param_names: list[list[str]] = []  # per (layer, direction), torch.nn's order
        for layer in range(self.num_layers):
            layer_input = self.input_size if layer == 0 else self.hidden_size * directions
            for direction in range(directions):
                suffix = "_reverse" if direction == 1 else ""
                shapes = [
                    (f"weight_ih_l{layer}{suffix}", (gate_size, layer_input)),
                    (f"weight_hh_l{layer}{suffix}", (gate_size, self.hidden_size)),
                ]
                if self.bias:
                    shapes.append((f"bias_ih_l{layer}{suffix}", (gate_size,)))
                    shapes.append((f"bias_hh_l{layer}{suffix}", (gate_size,)))
                for name, shape in shapes:
                    self.register_parameter(name, nn.Parameter(torch.empty(shape, **factory)))
                self._param_names.append([name for name, _ in shapes])
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every parameter from U(-1/sqrt(hidden_size), 1/sqrt(hidden_size)), as torch."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """Do nothing: kept so code written for torch.nn (cuDNN weight flattening) runs."""

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if self.mode == "RNN_RELU":
            text += ", nonlinearity='relu'"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text

    def _layer_params(self, index: int) -> tuple:
        """(w_ih, w_hh, b_ih, b_hh) of layer-direction ``index``, biases None without bias."""
        params = [getattr(self, name) for name in self._param_names[index]]
        if not self.bias:
            params += [None, None]
        return tuple(params)

    def _check_state(
        self, state: Tensor, name: str, batch: int, batched: bool, ref: Tensor
    ) -> Tensor:
        """Validate one initial state and return it as (L*D, B, H)."""
        directions = 2 if self.bidirectional else 1
        expected = (self.num_layers * directions, batch, self.hidden_size)
        if not batched:
            expected = (expected[0], expected[2])
        if not isinstance(state, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(state).__name__}")
        if tuple(state.shape) != expected:
            raise ValueError(f"{name} must have shape {expected}, got {tuple(state.shape)}")
        if state.dtype != ref.dtype or state.device != ref.device:
            raise ValueError(
                f"{name} must be {ref.dtype} on {ref.device} like the input, got "
                f"{state.dtype} on {state.device}"
            )
        return state if batched else state.unsqueeze(1)  # (L*D, H) -> (L*D, 1, H)

    def _run(self, input, hx, lengths):
        """Shared forward: returns (output, [h_n] or [h_n, c_n])."""
        is_lstm = self.mode == "LSTM"
        packed = isinstance(input, PackedSequence)
        if packed:
            if lengths is not None:
                raise ValueError("give lengths or a PackedSequence, not both")
            x, lengths = pad_packed_sequence(input)  # (T, B, I), original batch order
            batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(
                    f"input must be a tensor or a PackedSequence, got {type(input).__name__}"
                )
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"input must be 3-D (batched) or 2-D (unbatched), got shape "
                    f"{tuple(input.shape)}"
                )
            batched = input.dim() == 3
            if not batched:
                x = input.unsqueeze(1)  # (T, I) -> (T, 1, I)
            elif self.batch_first:
                x = input.transpose(0, 1)  # (B, T, I) -> (T, B, I)
            else:
                x = input
        steps, batch, features = x.shape
        if features != self.input_size:
            raise ValueError(
                f"input must have {self.input_size} features (input_size), got {features}"
            )
        if steps == 0:
            raise ValueError("input must have at least one time step, got 0")
        weight = self.weight_ih_l0
        if x.dtype != weight.dtype or x.device != weight.device:
            raise ValueError(
                f"input must be {weight.dtype} on {weight.device} like the parameters, got "
                f"{x.dtype} on {x.device}"
            )

        mask = None
        if lengths is not None:
            lengths = _check_lengths(lengths, batch, steps)
            mask = length_mask(lengths, steps, x.device)

        directions = 2 if self.bidirectional else 1
        if is_lstm:
            if hx is None:
                h0 = c0 = None
            elif isinstance(hx, (tuple, list)) and len(hx) == 2:
                h0 = self._check_state(hx[0], "h0", batch, batched, x)
                c0 = self._check_state(hx[1], "c0", batch, batched, x)
            else:
                raise TypeError("hx of an LSTM must be a tuple (h0, c0) or None")
        else:
            h0 = None if hx is None else self._check_state(hx, "hx", batch, batched, x)
            c0 = None
        if h0 is None:
            zeros = x.new_zeros(self.num_layers * directions, batch, self.hidden_size)
            h0 = zeros
            c0 = zeros if is_lstm else None

        h_n, c_n = [], []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(directions):
                index = layer * directions + direction
                w_ih, w_hh, b_ih, b_hh = self._layer_params(index)
                reverse = direction == 1
                if is_lstm:
                    y, h, c = lstm_layer(
                        layer_input, h0[index], c0[index], w_ih, w_hh, b_ih, b_hh, mask, reverse
                    )
                    c_n.append(c)
                elif self.mode == "GRU":
                    y, h = gru_layer(layer_input, h0[index], w_ih, w_hh, b_ih, b_hh, mask, reverse)
                else:
                    nonlinearity = "tanh" if self.mode == "RNN_TANH" else "relu"
                    y, h = rnn_layer(
                        layer_input, h0[index], w_ih, w_hh, b_ih, b_hh, mask, reverse, nonlinearity
                    )
                outputs.append(y)
                h_n.append(h)
            # (T, B, H) per direction -> (T, B, D*H)
            layer_input = outputs[0] if directions == 1 else torch.cat(outputs, dim=2)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, p=self.dropout, training=True)
        output = layer_input
        states = [torch.stack(h_n)] + ([torch.stack(c_n)] if is_lstm else [])  # (L*D, B, H)

        if packed:
            sorted_indices = input.sorted_indices
            if sorted_indices is not None:
                output = output.index_select(1, sorted_indices)
                lengths = lengths.index_select(0, sorted_indices.to(lengths.device))
            data = pack_padded_sequence(output, lengths, enforce_sorted=True).data
            output = input._replace(data=data)
        elif not batched:
            output = output.squeeze(1)  # (T, 1, D*H) -> (T, D*H)
            states = [s.squeeze(1) for s in states]  # (L*D, 1, H) -> (L*D, H)
        elif self.batch_first:
            output = output.transpose(0, 1)  # (T, B, D*H) -> (B, T, D*H)
        return output, states


class RNN(_RecurrentBase):
    """Elman RNN, ``h_t = tanh(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)`` (or relu).

    Shapes (D = 2 if bidirectional else 1, L = num_layers):
        input: (T, B, I), (B, T, I) with batch_first, (T, I) unbatched, or a PackedSequence.
        hx: (L*D, B, H) or (L*D, H) unbatched; zeros when omitted.
        output: (T, B, D*H) (batch_first: (B, T, D*H)); a PackedSequence for one.
        h_n: (L*D, B, H), ordered layer 0 forward, layer 0 reverse, layer 1 forward, ...

    Args:
        input_size: I, features of each input step.
        hidden_size: H, features of the state.
        num_layers: stacked layers, each fed the previous one's output.
        nonlinearity: ``"tanh"`` or ``"relu"``.
        bias: whether to use ``b_ih`` and ``b_hh``.
        batch_first: input and output as (B, T, ...).
        dropout: dropout probability on the outputs of every layer but the last (training).
        bidirectional: add a reverse direction per layer.
        proj_size: only 0 is supported.

    Raises:
        ValueError: on a non-positive size, dropout outside [0, 1], an unknown
            nonlinearity or a nonzero proj_size.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        nonlinearity: str = "tanh",
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        super().__init__(
            "RNN_TANH" if nonlinearity == "tanh" else "RNN_RELU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
        )

    def forward(
        self, input, hx: Optional[Tensor] = None, lengths: Optional[LengthsLike] = None
    ):
        """Run the sequence.

        Args:
            input: see the class docstring.
            hx: initial state, zeros when None.
            lengths: (B,) lengths of the sequences of a padded input; positions past a
                length give zero output and h_n is the state at each last valid step.

        Returns:
            (output, h_n).

        Raises:
            ValueError: on wrong shapes, dtypes or lengths.
        """
        output, (h_n,) = self._run(input, hx, lengths)
        return output, h_n


class GRU(_RecurrentBase):
    """GRU in torch's formulation (``b_hn`` inside the reset gate).

    Shapes and arguments as :class:`RNN` (without ``nonlinearity``); weights stack the
    gates r, z, n: ``weight_ih_l{k}`` is (3H, I), ``weight_hh_l{k}`` is (3H, H).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "GRU",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
        )

    def forward(
        self, input, hx: Optional[Tensor] = None, lengths: Optional[LengthsLike] = None
    ):
        """Run the sequence; arguments and return value as :meth:`RNN.forward`."""
        output, (h_n,) = self._run(input, hx, lengths)
        return output, h_n


class LSTM(_RecurrentBase):
    """LSTM, gates stacked i, f, g, o: ``weight_ih_l{k}`` is (4H, I), ``weight_hh_l{k}`` (4H, H).

    Shapes and arguments as :class:`RNN` (without ``nonlinearity``), with the state a pair:
    hx = (h0, c0), each (L*D, B, H); returns (output, (h_n, c_n)).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            proj_size,
            device,
            dtype,
        )

    def forward(self, input, hx: Optional[tuple] = None, lengths: Optional[LengthsLike] = None):
        """Run the sequence.

        Args:
            input: see :class:`RNN`.
            hx: (h0, c0), zeros when None.
            lengths: (B,) lengths of a padded input, as :meth:`RNN.forward`.

        Returns:
            (output, (h_n, c_n)).

        Raises:
            ValueError: on wrong shapes, dtypes or lengths.
            TypeError: when hx is not a pair.
        """
        output, (h_n, c_n) = self._run(input, hx, lengths)
        return output, (h_n, c_n)
