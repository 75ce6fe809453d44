"""ReNet layer (Visin et al. 2015): four recurrent sweeps over an image instead of a convolution.

The image is cut into non-overlapping ``p x p`` patches, each flattened to a feature
vector. A bidirectional recurrent layer sweeps every row of patches left to right and
right to left; a second one sweeps every column of the result top to bottom and bottom to
top. After the row sweep each position has seen its whole row, after the column sweep the
whole image, so one ReNet layer has a global receptive field where a convolution stack of
the same depth sees a few patches. The sweeps are rnnimg.nn's LSTM or GRU (hand-written
backward).

``norm=True`` puts a LayerNorm on each sweep's output (over the 2D features of a position): the
row sweep's before the column sweep reads it, the column sweep's before the layer's output. An
LSTM's states are small at initialisation (gates near 0.5, the input gate lower with chrono biases),
so without it the column sweep reads near-constant inputs and what the row sweep carried from far
away reaches the next layer even fainter (bench/RESULTS_segment.md, the still-image section).

``tied=True`` gives each sweep's two directions one set of weights: one unidirectional layer runs
over the sequences and over the same sequences reversed (one batch), and the reversed outputs are
flipped back. Where flips leave the task unchanged, what one direction learns (carry something
from the start of a row) then serves the other, where with separate weights each of the four
corner-to-cell routes (row direction x column direction) has weights of its own. Half the parameters.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rnnimg.nn.modules import GRU, LSTM

__all__ = ["ReNet"]

_RNN_TYPES = {"lstm": LSTM, "gru": GRU}


class ReNet(nn.Module):
    """One ReNet layer: patches, then bidirectional row and column sweeps.

    Shapes (p = patch_size, D = hidden_size):
        input: (B, C, H, W), with H and W multiples of p.
        output: (B, 2*D, H/p, W/p): the forward and reverse column-sweep states.

    Args:
        in_channels: C, channels of the input image.
        hidden_size: D, state size of each sweep direction.
        patch_size: p, side of the square non-overlapping patches.
        rnn_type: ``"lstm"`` or ``"gru"``.
        bias: whether the recurrent layers use biases.
        norm: LayerNorm on each sweep's output (module docstring); False: the plain layer.
        tied: one set of weights for both directions of each sweep (module docstring); False: two.

    Raises:
        ValueError: on a non-positive size or an unknown rnn_type.
    """

    def __init__(
        self,
        in_channels: int,
        hidden_size: int,
        patch_size: int = 2,
        rnn_type: str = "lstm",
        bias: bool = True,
        norm: bool = False,
        tied: bool = False,
    ) -> None:
        super().__init__()
        if rnn_type not in _RNN_TYPES:
            raise ValueError(f"rnn_type must be one of {sorted(_RNN_TYPES)}, got {rnn_type!r}")
        for name, value in (("in_channels", in_channels), ("patch_size", patch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be an int > 0, got {value!r}")
        self.in_channels = in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.rnn_type = rnn_type
        self.norm = norm
        self.tied = tied
        cls = _RNN_TYPES[rnn_type]
        features = in_channels * patch_size * patch_size
        sweep = {"bias": bias, "batch_first": True, "bidirectional": not tied}
        self.horizontal = cls(features, hidden_size, **sweep)  # along each row of patches
        self.vertical = cls(2 * hidden_size, hidden_size, **sweep)  # along each column
        # Identity when off: a plain layer's state_dict keeps its keys.
        self.horizontal_norm = nn.LayerNorm(2 * hidden_size) if norm else nn.Identity()
        self.vertical_norm = nn.LayerNorm(2 * hidden_size) if norm else nn.Identity()

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, rnn_type={self.rnn_type!r}, norm={self.norm}, tied={self.tied}"

    def _sweep(self, rnn: nn.Module, seq: Tensor) -> Tensor:
        """Both directions over (N, L, F) sequences -> (N, L, 2D): forward states, then reverse ones."""
        if not self.tied:
            return rnn(seq)[0]
        n = seq.shape[0]
        swept, _ = rnn(torch.cat([seq, seq.flip(1)]))  # (2N, L, F) -> (2N, L, D): the sequences, then reversed
        return torch.cat([swept[:n], swept[n:].flip(1)], dim=2)  # -> (N, L, 2D), the reverse states in sequence order

    def forward(self, input: Tensor) -> Tensor:
        """Sweep the image; see the class docstring for shapes.

        Raises:
            ValueError: on a wrong rank, channel count, or a side not divisible by patch_size.
        """
        if input.dim() != 4:
            raise ValueError(f"input must be 4-D (B, C, H, W), got shape {tuple(input.shape)}")
        batch, channels, height, width = input.shape
        p = self.patch_size
        if channels != self.in_channels:
            raise ValueError(f"input must have {self.in_channels} channels, got {channels}")
        if height % p or width % p or height == 0 or width == 0:
            raise ValueError(
                f"input height and width must be positive multiples of patch_size={p}, "
                f"got {height}x{width}"
            )
        rows, cols = height // p, width // p
        # (B, C, H, W) -> (B, C, H', p, W', p)
        patches = input.reshape(batch, channels, rows, p, cols, p)
        patches = patches.permute(0, 2, 4, 1, 3, 5)  # -> (B, H', W', C, p, p)
        seq = patches.reshape(batch * rows, cols, channels * p * p)  # -> (B*H', W', C*p*p)
        swept = self.horizontal_norm(self._sweep(self.horizontal, seq))  # (B*H', W', C*p*p) -> (B*H', W', 2D)
        features = swept.shape[2]
        grid = swept.reshape(batch, rows, cols, features)  # (B*H', W', 2D) -> (B, H', W', 2D)
        seq = grid.transpose(1, 2).reshape(batch * cols, rows, features)  # -> (B*W', H', 2D)
        swept = self.vertical_norm(self._sweep(self.vertical, seq))  # (B*W', H', 2D) -> (B*W', H', 2D)
        grid = swept.reshape(batch, cols, rows, features)  # (B*W', H', 2D) -> (B, W', H', 2D)
        return grid.permute(0, 3, 2, 1)  # (B, W', H', 2D) -> (B, 2D, H', W')
