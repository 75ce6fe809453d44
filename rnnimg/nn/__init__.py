"""Recurrent layers from their equations, each with a hand-written backward pass through time.

- ``RNN``, ``LSTM``, ``GRU``: drop-in compatible with torch.nn's (names, shapes, returns);
  equations and derivations in ``rnnimg.nn.functional``.
- ``ConvLSTM``, ``ConvGRU``: the same cells with convolutional gates over clips (B, T, C, H, W);
  equations and derivations in ``rnnimg.nn.conv_functional``.
- ``ReNet``: four directional LSTM/GRU sweeps over an image's patches (a spatial encoder).

``rnnimg.nn.tasks`` holds the adding problem used to check long-range memory.
"""

from rnnimg.nn.conv_modules import ConvGRU, ConvLSTM
from rnnimg.nn.modules import GRU, LSTM, RNN
from rnnimg.nn.renet import ReNet
from rnnimg.nn.utils import clip_grad_norm_

__all__ = ["RNN", "LSTM", "GRU", "ConvLSTM", "ConvGRU", "ReNet", "clip_grad_norm_"]
