"""The adding problem: a check that a recurrent cell carries information over many steps.

Each sequence is T pairs (value, marker): values uniform in [0, 1], markers 0 except at
two steps, one in each half of the sequence. The target is the sum of the two marked
values, read from the final state. Predicting the mean (1.0) gives an MSE of 1/6 ≈ 0.167;
an MSE below 0.01 means the model found and remembered both marked values, which LSTM
and GRU do within 2000 training steps at lengths 100 and 200, and an Elman RNN, whose
gradient vanishes over the distance between the markers, does not.

Run ``python -m rnnimg.nn.tasks --length 100 200 --steps 3000`` for the figures.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from rnnimg.nn.modules import GRU, LSTM, RNN
from rnnimg.nn.utils import clip_grad_norm_

__all__ = ["adding_problem", "AddingModel", "AddingResult", "train_adding", "main"]

CELLS = ("rnn", "lstm", "gru")
BASELINE_MSE = 1.0 / 6.0  # Var(U1 + U2) for two independent U(0, 1): always predicting 1.0


def adding_problem(
    batch_size: int, length: int, generator: Optional[torch.Generator] = None
) -> tuple[Tensor, Tensor]:
    """Draw one batch of the adding problem.

    Args:
        batch_size: B, sequences in the batch.
        length: T, steps per sequence, >= 2 (one marker in each half).
        generator: random source, for reproducible batches.

    Returns:
        (x (B, T, 2) float32: value, marker; y (B,) float32: sum of the two marked values).

    Raises:
        ValueError: on batch_size < 1 or length < 2.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if length < 2:
        raise ValueError(f"length must be >= 2 (one marker per half), got {length}")
    values = torch.rand(batch_size, length, generator=generator)  # (B, T)
    half = length // 2
    first = torch.randint(0, half, (batch_size,), generator=generator)
    second = torch.randint(half, length, (batch_size,), generator=generator)
    rows = torch.arange(batch_size)
    markers = torch.zeros(batch_size, length)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    x = torch.stack([values, markers], dim=2)  # (B, T, 2)
    y = values[rows, first] + values[rows, second]
    return x, y


class AddingModel(nn.Module):
    """One recurrent layer then a linear read-out of the final hidden state.

    Shapes: input (B, T, 2) -> prediction (B,).

    Args:
        cell: ``"rnn"`` (Elman, tanh), ``"lstm"`` or ``"gru"``.
        hidden_size: H of the recurrent layer.
        impl: ``"reference"`` for rnnimg.nn's layers, ``"torch"`` for torch.nn's (same
            parameters, faster fused kernels).

    Raises:
        ValueError: on an unknown cell or impl.
    """

    def __init__(self, cell: str, hidden_size: int, impl: str = "reference") -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        if impl not in ("reference", "torch"):
            raise ValueError(f"impl must be 'reference' or 'torch', got {impl!r}")
        classes = (
            {"rnn": RNN, "lstm": LSTM, "gru": GRU}
            if impl == "reference"
            else {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}
        )
        self.cell = cell
        self.rnn = classes[cell](2, hidden_size, batch_first=True)
        self.head = nn.Linear(hidden_size, 1)

    def forward(self, x: Tensor) -> Tensor:
        _, state = self.rnn(x)
        h_n = state[0] if self.cell == "lstm" else state  # (1, B, H)
        return self.head(h_n[-1]).squeeze(1)  # (B, 1) -> (B,)


@dataclass
class AddingResult:
    """Outcome of one training run; ``mse`` is on a held-out set after the last step."""

    cell: str
    length: int
    steps: int
    mse: float
    best_mse: float
    seconds: float

    @property
    def solved(self) -> bool:
        """Whether the final MSE is below 0.01."""
        return self.mse < 0.01


def train_adding(
    cell: str,
    length: int,
    steps: int,
    batch_size: int = 64,
    hidden_size: int = 32,
    lr: float = 1e-2,
    clip: float = 1.0,
    seed: int = 0,
    eval_size: int = 512,
    eval_every: int = 100,
    impl: str = "reference",
    log=None,
) -> AddingResult:
    """Train an :class:`AddingModel` with Adam and gradient-norm clipping.

    Args:
        cell: ``"rnn"``, ``"lstm"`` or ``"gru"``.
        length: T of every sequence.
        steps: optimisation steps, each on a fresh batch.
        batch_size: sequences per step.
        hidden_size: H.
        lr: Adam's learning rate.
        clip: maximal gradient norm (``rnnimg.nn.clip_grad_norm_``).
        seed: seeds the parameters, the training batches and the held-out set.
        eval_size: sequences in the held-out set.
        eval_every: steps between held-out evaluations (for ``best_mse`` and ``log``).
        impl: ``"reference"`` (rnnimg.nn) or ``"torch"`` (torch.nn).
        log: called with a line of text at every evaluation, or None.

    Returns:
        An :class:`AddingResult`.

    Raises:
        ValueError: on steps < 1 and the errors of :class:`AddingModel`.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    model = AddingModel(cell, hidden_size, impl)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    train_gen = torch.Generator().manual_seed(seed + 1)
    eval_x, eval_y = adding_problem(eval_size, length, torch.Generator().manual_seed(seed + 2))

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            mse = float(torch.mean((model(eval_x) - eval_y) ** 2))
        model.train()
        return mse

    start = time.perf_counter()
    best = float("inf")
    for step in range(1, steps + 1):
        x, y = adding_problem(batch_size, length, train_gen)
        loss = torch.mean((model(x) - y) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            mse = evaluate()
            best = min(best, mse)
            if log is not None:
                log(f"{cell:>4} T={length} step {step:>5}: held-out MSE {mse:.2g}")
    mse = evaluate()
    return AddingResult(cell, length, steps, mse, min(best, mse), time.perf_counter() - start)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Train every cell on every length and print the held-out MSE per cell.

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(
        prog="python -m rnnimg.nn.tasks", description="Adding problem, per recurrent cell."
    )
    parser.add_argument("--length", type=int, nargs="+", default=[100, 200])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--cells", nargs="+", choices=CELLS, default=list(CELLS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--clip", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--impl", choices=("reference", "torch"), default="reference")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--verbose", action="store_true", help="print held-out MSE every 100 steps")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    log = (lambda line: print(line, flush=True)) if args.verbose else None
    results = []
    for length in args.length:
        for cell in args.cells:
            result = train_adding(
                cell,
                length,
                args.steps,
                batch_size=args.batch_size,
                hidden_size=args.hidden_size,
                lr=args.lr,
                clip=args.clip,
                seed=args.seed,
                impl=args.impl,
                log=log,
            )
            results.append(result)
            print(
                f"T={length:<4} {cell:<5} MSE {result.mse:.2g} (best {result.best_mse:.2g}) "
                f"{'solved' if result.solved else 'not solved'} in {result.seconds:.0f} s",
                flush=True,
            )
    print(
        f"\n{args.impl} cells, hidden {args.hidden_size}, batch {args.batch_size}, "
        f"{args.steps} Adam steps (lr {args.lr}, clip {args.clip}), seed {args.seed}; "
        f"predicting the mean gives MSE {BASELINE_MSE:.3f}\n"
    )
    print("| T | cell | held-out MSE | best MSE | < 0.01 | time (s) |")
    print("|---|------|-------------:|---------:|:------:|---------:|")
    for r in results:
        print(
            f"| {r.length} | {r.cell} | {r.mse:.2g} | {r.best_mse:.2g} | "
            f"{'yes' if r.solved else 'no'} | {r.seconds:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
