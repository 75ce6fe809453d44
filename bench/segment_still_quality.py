"""Does ReNet's global receptive field do the work on still images? ReNet vs a conv stack of the same size.

Trains, with the plain loop (``train_one_epoch`` / ``evaluate``, no Ray), on one synthetic still
archive (``rnnimg.tasks.segment_synth``, ``images=True``: coloured shapes, a marker square in one
corner, the target the shapes of the marker's colour), two single-image segmenters that differ
only in the layer at the low-resolution bottleneck:

- ``renet``: ``spatial="renet"``, ReNet layers (bidirectional row then column LSTM sweeps, each
  sweep's two directions sharing weights, a LayerNorm on each sweep's output): every cell sees the
  whole image, the marker included (``--plain-renet``: the layer without the norms and tying);
- ``conv``:  ``spatial="conv"``, one conv per sweep, its width chosen for the same parameter
  count: every cell sees a few cells around it.

and prints both models' parameter counts and the test split's IoU of the target mask (pixel
totals) after the last epoch, and the test IoU after each epoch (watched, never used to pick a
model). Target: renet >= 0.85, conv at least 0.2 lower. Two trainings run at a time, one process
and one core each. PNG stills go through the clip stream (PyAV opens one as a one-frame video),
decoded once; each epoch flips and batches them.

    .venv/bin/python bench/segment_still_quality.py                          # 1600 stills x 40 epochs: ~4 CPU-min a model
    .venv/bin/python bench/segment_still_quality.py --plain-renet --variants renet  # the layer before the fix
    .venv/bin/python bench/segment_still_quality.py --images 60 --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

VARIANTS = ("renet", "conv")


def fit_and_score(manifest: str, spatial: str, epochs: int, batch_size: int, lr: float, overrides: dict) -> dict:
    import torch

    from rnnimg.tasks import get as get_task
    from rnnimg.train.config import TrainConfig
    from rnnimg.train.data import iter_batches, iter_clips
    from rnnimg.train.loop import evaluate, make_optimizer, train_one_epoch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = get_task("segment")
    config = task.model_config(manifest, temporal=False, frames_per_clip=1, spatial=spatial, **overrides)
    train_rows = task.training_rows(manifest, "train", config) + task.training_rows(manifest, "val", config)
    test_rows = task.training_rows(manifest, "test", config)
    model = task.build_model(config)
    middle = sum(p.numel() for p in model.rnn.parameters())
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, clips_per_video=1)
    steps = int(np.ceil(len(train_rows) / batch_size))
    optimizer, scheduler = make_optimizer(model, train_config, steps * epochs)
    # The stills are decoded once (one frame each): an epoch is then flips and batches, not PNG decoding.
    stills = list(iter_clips(train_rows, task, config, train=False, rng=np.random.default_rng(0)))
    test_stills = list(iter_clips(test_rows, task, config, train=False, rng=np.random.default_rng(1)))
    started, cpu_started = time.perf_counter(), time.process_time()
    history, test_history, loads = [], [], [os.getloadavg()[0]]
    for epoch in range(epochs):
        rng = np.random.default_rng([0, epoch])
        clips = (task.augment(*stills[i], rng) for i in rng.permutation(len(stills)))
        stats = train_one_epoch(model, optimizer, iter_batches(clips, batch_size), "cpu", task, config, scheduler)
        summary = task.summarize(stats)
        history.append(round(summary["iou"], 3))
        test_history.append(round(task.summarize(evaluate(model, iter_batches(iter(test_stills), 32), "cpu", task, config))["iou"], 3))
        loads.append(os.getloadavg()[0])
        print(f"  {spatial}: epoch {epoch} train loss {summary['loss']:.4f} IoU {summary['iou']:.3f} test IoU {test_history[-1]:.3f} "
              f"({time.perf_counter() - started:.0f} s, {(time.process_time() - cpu_started) / 60:.1f} CPU-min)", flush=True)
    train_s, train_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started  # the per-epoch test IoU included
    test = task.summarize(evaluate(model, iter_batches(iter(test_stills), 32), "cpu", task, config))
    return {"spatial": spatial, "iou": test["iou"], "clips": test["clips"], "train_s": train_s, "train_cpu_s": train_cpu_s,
            "train_iou_by_epoch": history, "test_iou_by_epoch": test_history, "load_average": loads, "train_images": len(train_rows), "test_images": len(test_rows),
            "parameters": sum(p.numel() for p in model.parameters()), "middle_parameters": middle,
            "middle": " -> ".join(type(m).__name__ for m in model.rnn), "config": config}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1600)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--palette", type=int, default=4, help="colours of the shapes and the marker")
    parser.add_argument("--marker", type=int, default=8, help="side of the marker square, pixels")
    parser.add_argument("--hidden", type=int, default=32, help="channels out of the middle layer")
    parser.add_argument("--spatial-layers", type=int, default=1)
    parser.add_argument("--spatial-patch", type=int, default=2, help="ReNet's patch side in cells (the conv ablation: its first stride)")
    parser.add_argument("--rnn-type", default="lstm")
    parser.add_argument("--mask-stride", type=int, default=2)
    parser.add_argument("--plain-renet", action="store_true",
                        help="ReNet as before spatial_norm and spatial_tied: no LayerNorm on the sweeps, two sets of weights per sweep")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    from rnnimg.tasks.segment_synth import SegmentSynthConfig, make_archive

    started = time.perf_counter()
    overrides = {"mask_stride": args.mask_stride, "hidden": args.hidden, "spatial_layers": args.spatial_layers, "rnn_type": args.rnn_type,
                 "spatial_patch": args.spatial_patch, "spatial_norm": not args.plain_renet, "spatial_tied": not args.plain_renet}
    with tempfile.TemporaryDirectory(prefix="segment-still-bench-") as folder:
        manifest = make_archive(folder, SegmentSynthConfig(images=True, videos=args.images, seed=args.seed, palette=args.palette, marker=args.marker), processes=2)
        print(f"archive: {args.images} images in {time.perf_counter() - started:.0f} s", flush=True)
        variants = [v for v in args.variants.split(",") if v]
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = [pool.submit(fit_and_score, manifest, v, args.epochs, args.batch_size, args.lr, overrides) for v in variants]
            results = {r["spatial"]: r for r in (run.result() for run in runs)}
    import torch

    first = results[variants[0]]
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"budget per model: {args.epochs} epochs x {first['train_images']} images, batch {args.batch_size}, lr {args.lr}, "
          f"one core; test {first['test_images']} images; wall {time.perf_counter() - started:.0f} s in all")
    print(f"config: {first['config']}\n")
    print("| model | parameters | of which the middle layer | middle layer | test IoU | train s | train CPU-min | load average (1 min) min / mean / max |")
    print("|---|---:|---:|---|---:|---:|---:|---|")
    for name, r in results.items():
        loads = r["load_average"]
        print(f"| {name} | {r['parameters']} | {r['middle_parameters']} | {r['middle']} | {r['iou']:.3f} | {r['train_s']:.0f} | "
              f"{r['train_cpu_s'] / 60:.1f} | {min(loads):.1f} / {sum(loads) / len(loads):.1f} / {max(loads):.1f} |")
    for name, r in results.items():
        print(f"{name}: test IoU by epoch {' '.join(f'{v:.2f}' for v in r['test_iou_by_epoch'])}")
        print(f"{name}: train IoU by epoch {' '.join(f'{v:.2f}' for v in r['train_iou_by_epoch'])}")
    if "renet" in results and "conv" in results:
        gap = results["renet"]["iou"] - results["conv"]["iou"]
        ratio = results["conv"]["middle_parameters"] / results["renet"]["middle_parameters"]
        print(f"\ngap renet - conv: {gap:+.3f}; middle-layer parameters conv / renet: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
