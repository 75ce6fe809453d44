"""Does the recurrent layer do the work of the ``segment`` task? Temporal model vs ablations, same budget.

Trains, with the plain loop (``train_one_epoch`` / ``evaluate``, no Ray), on one synthetic
archive (``rnnimg.tasks.segment_synth``: identical objects, some moving, on a drifting texture):

- ``temporal``:    the segmenter with its ConvLSTM;
- ``per_frame``:   ``temporal=False``, a per-frame conv in the ConvLSTM's place (no information
                   crosses frames): the important ablation;
- ``shuffled``:    the temporal model on clips whose frames AND masks are permuted together
                   (what ``TrainConfig(shuffle_frames=True)`` does for this task, through
                   ``SegmentTask.permute_frames``; the figures in RESULTS_segment.md were measured
                   with the permutation applied here, after augmentation).

and prints the test split's IoU of the moving mask (pixel totals) of each, and the gaps.
Target: temporal >= 0.85, per_frame at least 0.25 lower. Two trainings run at a time, one
process and one core each (like tests/test_temporal.py).

    .venv/bin/python bench/segment_quality.py                 # ~15-20 min on 2 CPU cores
    .venv/bin/python bench/segment_quality.py --videos 60 --epochs 1    # a smoke run
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

VARIANTS = ("temporal", "per_frame", "shuffled")


def permuted_together(clips, rng):
    """Clips with frames and masks permuted by one permutation per clip (order gone, alignment kept)."""
    for frames, masks in clips:
        order = rng.permutation(len(frames))
        yield frames[order], masks[order]


def fit_and_score(manifest: str, variant: str, epochs: int, clips_per_video: int, batch_size: int, lr: float) -> dict:
    import torch

    from rnnimg.tasks import get as get_task
    from rnnimg.train.config import TrainConfig
    from rnnimg.train.data import iter_batches, iter_clips
    from rnnimg.train.loop import evaluate, make_optimizer, train_one_epoch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = get_task("segment")
    config = task.model_config(manifest, temporal=variant != "per_frame")
    shuffled = variant == "shuffled"
    train_rows = task.training_rows(manifest, "train", config) + task.training_rows(manifest, "val", config)
    test_rows = task.training_rows(manifest, "test", config)
    model = task.build_model(config)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, clips_per_video=clips_per_video)
    steps = int(np.ceil(len(train_rows) * clips_per_video / batch_size))
    optimizer, scheduler = make_optimizer(model, train_config, steps * epochs)
    started = time.perf_counter()
    history = []
    for epoch in range(epochs):
        rng = np.random.default_rng([0, epoch])
        clips = iter_clips(train_rows, task, config, train=True, rng=rng, clips_per_video=clips_per_video, augment=True)
        if shuffled:
            clips = permuted_together(clips, rng)
        stats = train_one_epoch(model, optimizer, iter_batches(clips, batch_size, shuffle_buffer=64, rng=rng), "cpu", task, config, scheduler)
        summary = task.summarize(stats)
        history.append(round(summary["iou"], 3))
        print(f"  {variant}: epoch {epoch} train loss {summary['loss']:.4f} IoU {summary['iou']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)
    train_s = time.perf_counter() - started
    rng = np.random.default_rng(1)
    clips = iter_clips(test_rows, task, config, train=False, rng=rng)
    if shuffled:
        clips = permuted_together(clips, rng)
    test = task.summarize(evaluate(model, iter_batches(clips, 16), "cpu", task, config))
    return {"variant": variant, "iou": test["iou"], "iou_per_step": test["iou_per_step"], "clips": test["clips"],
            "train_s": train_s, "train_iou_by_epoch": history, "train_videos": len(train_rows), "test_videos": len(test_rows),
            "parameters": sum(p.numel() for p in model.parameters())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--clips-per-video", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    from rnnimg.tasks.segment_synth import SegmentSynthConfig, make_archive

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="segment-bench-") as folder:
        manifest = make_archive(folder, SegmentSynthConfig(videos=args.videos, seed=args.seed), processes=2)
        print(f"archive: {args.videos} videos in {time.perf_counter() - started:.0f} s", flush=True)
        variants = [v for v in args.variants.split(",") if v]
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = [pool.submit(fit_and_score, manifest, v, args.epochs, args.clips_per_video, args.batch_size, args.lr) for v in variants]
            results = {r["variant"]: r for r in (run.result() for run in runs)}
    import torch

    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"budget per model: {args.epochs} epochs x {args.clips_per_video} clips x {results[variants[0]]['train_videos']} videos, "
          f"batch {args.batch_size}, lr {args.lr}, one core; wall {time.perf_counter() - started:.0f} s in all\n")
    print("| model | test IoU | IoU frame 0 | IoU frames 1.. | train s | train IoU by epoch |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        rest = float(np.mean(r["iou_per_step"][1:])) if len(r["iou_per_step"]) > 1 else float("nan")
        print(f"| {name} | {r['iou']:.3f} | {r['iou_per_step'][0]:.3f} | {rest:.3f} | {r['train_s']:.0f} | {r['train_iou_by_epoch']} |")
    if "temporal" in results:
        for name in results:
            if name != "temporal":
                print(f"gap temporal - {name}: {results['temporal']['iou'] - results[name]['iou']:+.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
