"""Forward + backward time of rnnimg.nn's hand-written cells against torch.nn's kernels.

For each cell (LSTM, GRU, Elman tanh), size and sequence length, three implementations
of one layer with the same parameters are timed side by side in one run:

* ``torch.nn``: torch's fused implementation (C++ loop on CPU, cuDNN on CUDA);
* ``reference``: ``rnnimg.nn`` (forward from the equations, backward written by hand);
* ``autograd loop``: the same equations one step at a time in Python, autograd doing
  the backward (``rnnimg.nn.functional.*_layer_autograd``; the input projection is
  computed for all steps at once, as in the reference, so that only the backward differs).

Each measurement is the median over ``--repeats`` runs after ``--warmup`` runs, of
forward, then backward of a fixed random cotangent on the output and the final state,
with parameter gradients reset to None each time. Runs on the CPU and, when present, on
CUDA; writes a markdown section per device into ``bench/RESULTS_rnn_cells.md``.

    python bench/rnn_cells.py                   # every device, default sizes
    python bench/rnn_cells.py --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rnnimg.nn as rnn  # noqa: E402
from rnnimg.nn import functional as rf  # noqa: E402

CELLS = {
    "LSTM": (rnn.LSTM, torch.nn.LSTM, {}),
    "GRU": (rnn.GRU, torch.nn.GRU, {}),
    "RNN": (rnn.RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
}
RESULTS = Path(__file__).resolve().parent / "RESULTS_rnn_cells.md"




def autograd_loop(cell: str, module: torch.nn.Module):
    """A callable x -> (output, final state) running the plain per-step equations."""
    w = [getattr(module, f"{p}_l0") for p in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]

    def run(x):
        zeros = x.new_zeros(x.shape[1], module.hidden_size)
        if cell == "LSTM":
            y, h, c = rf.lstm_layer_autograd(x, zeros, zeros, *w)
            return y, (h, c)
        if cell == "GRU":
            return rf.gru_layer_autograd(x, zeros, *w)
        return rf.rnn_layer_autograd(x, zeros, *w, nonlinearity="tanh")

    return run


def timed(fns: dict, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median wall time in milliseconds of each ``fns[name]()``.

    The functions run in turn within each repeat, so that a slow spell of the machine
    (other processes) weighs on all of them alike.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(values) for name, values in times.items()}


def bench_one(cell, batch, input_size, hidden, steps, device, warmup, repeats):
    """(torch.nn ms, reference ms, autograd-loop ms) for one configuration."""
    ours_cls, torch_cls, extra = CELLS[cell]
    torch.manual_seed(0)
    ours = ours_cls(input_size, hidden, **extra).to(device)
    theirs = torch_cls(input_size, hidden, **extra).to(device)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(steps, batch, input_size, device=device)
    grad_y = torch.randn(steps, batch, hidden, device=device)
    grad_h = torch.randn(batch, hidden, device=device)

    def final_h(state):
        h = state[0] if cell == "LSTM" else state
        return h[-1] if h.dim() == 3 else h  # (1, B, H) -> (B, H)

    def step(module, forward):
        def fn():
            for p in module.parameters():
                p.grad = None
            y, state = forward(x)
            torch.autograd.backward([y, final_h(state)], [grad_y, grad_h])

        return fn

    fns = {
        "torch": step(theirs, theirs),
        "reference": step(ours, ours),
        "loop": step(ours, autograd_loop(cell, ours)),
    }
    result = timed(fns, device, warmup, repeats)
    return result["torch"], result["reference"], result["loop"]


def torch_backward_nodes(device: torch.device) -> str:
    """Which backward each torch.nn cell records here, e.g. a fused oneDNN or cuDNN layer
    or ``StackBackward0`` for a loop of ATen ops that autograd differentiates."""
    names = []
    for cell, (_, torch_cls, extra) in CELLS.items():
        module = torch_cls(4, 4, **extra).to(device)
        y, _ = module(torch.randn(3, 2, 4, device=device))
        names.append(f"{cell}: {type(y.grad_fn).__name__}")
    return ", ".join(names)


def device_header(device: torch.device) -> str:
    """Markdown lines describing the machine of one run."""
    lines = [
        f"- CPU: {cpu_model()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
        f"- torch {torch.__version__}, Python {platform.python_version()}",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- torch.nn's backward node: {torch_backward_nodes(device)}",
    ]
    if device.type == "cuda":
        lines.insert(0, f"- GPU: {torch.cuda.get_device_name(device)}")
    return "\n".join(lines)


def write_section(path: Path, key: str, text: str) -> None:
    """Replace (or append) the section of ``path`` that starts with ``## {key}``."""
    title = "# Benchmark: rnnimg.nn hand-written cells vs torch.nn\n"
    old = path.read_text() if path.exists() else title
    parts = old.split("\n## ")
    head, sections = parts[0], parts[1:]
    sections = [s for s in sections if not s.startswith(key)]
    sections.append(text.removeprefix("## ").rstrip() + "\n")
    path.write_text(head.rstrip() + "\n\n## " + "\n## ".join(s.rstrip() + "\n" for s in sections))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--cells", nargs="+", choices=sorted(CELLS), default=list(CELLS))
    parser.add_argument("--steps", type=int, nargs="+", default=[16, 128])
    parser.add_argument(
        "--sizes", nargs="+", default=["64x512x512", "64x128x128"],
        help="batch x input x hidden",
    )  # fmt: skip
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=0, help="0: 9 on CPU, 20 on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    devices = []
    if args.device in ("all", "cpu"):
        devices.append(torch.device("cpu"))
    if args.device in ("all", "cuda"):
        if torch.cuda.is_available():
            devices.append(torch.device("cuda"))
        elif args.device == "cuda":
            parser.error("--device cuda given but torch.cuda.is_available() is False")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes]

    for device in devices:
        repeats = args.repeats or (20 if device.type == "cuda" else 9)
        warmup = max(args.warmup, 3) if device.type == "cuda" else args.warmup
        rows = []
        print(f"\n{device.type}: median of {repeats} after {warmup} warm-up", flush=True)
        for batch, input_size, hidden in sizes:
            for steps in args.steps:
                for cell in args.cells:
                    t_torch, t_ref, t_loop = bench_one(
                        cell, batch, input_size, hidden, steps, device, warmup, repeats
                    )
                    row = (
                        f"| {cell} | {batch} | {input_size} | {hidden} | {steps} | "
                        f"{t_torch:.2f} | {t_ref:.2f} | {t_loop:.2f} | "
                        f"{t_ref / t_torch:.2f} | {t_loop / t_torch:.2f} |"
                    )
                    rows.append(row)
                    print(row, flush=True)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
        key = "CUDA" if device.type == "cuda" else "CPU"
        text = "\n".join(
            [
                f"## {key}: {name}",
                "",
                device_header(device),
                f"- float32, one layer, forward + backward (output and final state), "
                f"median of {repeats} after {warmup} warm-up; times in ms",
                "- reference: rnnimg.nn (hand-written backward); autograd loop: the same "
                "equations step by step in Python, backward by autograd",
                "",
                "| cell | batch | input | hidden | steps | torch.nn | reference | autograd loop "
                "| reference / torch | loop / torch |",
                "|------|------:|------:|-------:|------:|---------:|----------:|--------------:"
                "|------------------:|-------------:|",
                *rows,
            ]
        )
        if not args.no_write:
            write_section(args.output, key, text)
    if not args.no_write:
        print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
