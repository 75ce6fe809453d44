"""Recurrent layers from their equations: Elman RNN, LSTM and GRU with a hand-written
backward pass through time, drop-in compatible with torch.nn's (names, shapes, returns).

``rnnimg.nn.functional`` holds the equations and the backward derivations;
``rnnimg.nn.tasks`` the adding problem used to check long-range memory.
"""

from rnnimg.nn.modules import GRU, LSTM, RNN
from rnnimg.nn.utils import clip_grad_norm_

__all__ = ["RNN", "LSTM", "GRU", "clip_grad_norm_"]
