"""Does the recurrent layer find objects while they are hidden? Object CRNN vs its per-frame ablation, same budget.

Trains, with the plain loop (``train_one_epoch`` / ``evaluate``, no Ray), on one synthetic
archive (``rnnimg.tasks.objects_synth``: objects of 3 classes moving behind bars over clutter):

- ``temporal``:  the object CRNN with its recurrent layer (``ObjectsConfig``'s default: a ConvLSTM per
                 cell of ``rnnimg.nn``; ``--head tracker``: pooled features, LSTM and tracker);
- ``per_frame``: ``temporal=False``, a per-frame layer in the recurrent one's place (no information
                 crosses frames): the ablation, with the same config and budget otherwise;

and prints, on the test split, per-frame per-class F1 at box IoU >= 0.5 on all frames and on
frames where the object is visible (uncovered), occluded (partly covered) and hidden (fully
covered), and what became of the present objects (``rnnimg.tasks.objects.miss_counts``: found,
score below the threshold, box centred inside the truth but IoU < 0.5, centred elsewhere).
Targets: temporal >= 0.9 on visible frames and >= 0.7 on hidden ones; per_frame <= 0.2 on
hidden ones. The two trainings run at the same time, one process and one core each
(``--workers 1``: one after the other). The checkpoint scored on test is the epoch of the best
val F1; test is scored once, after training.

    .venv/bin/python bench/objects_quality.py                          # 30 epochs: 862 s on a shared 2-core EPYC
    .venv/bin/python bench/objects_quality.py --head cells --workers 1 --epochs 80 --archive /tmp/a800   # run 5 of RESULTS_objects.md (the headline)
    .venv/bin/python bench/objects_quality.py --videos 40 --epochs 1   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

VARIANTS = ("temporal", "per_frame")
CATEGORIES = ("all", "visible", "occluded", "hidden")


def fit_and_score(manifest: str, variant: str, epochs: int, clips_per_video: int, batch_size: int, lr: float, overrides: dict,
                  minutes: float = 0.0) -> dict:
    import torch

    from rnnimg.tasks import get as get_task
    from rnnimg.train.config import TrainConfig
    from rnnimg.train.data import iter_batches, iter_clips
    from rnnimg.train.loop import evaluate, make_optimizer, train_one_epoch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    task = get_task("objects")
    config = task.model_config(manifest, temporal=variant != "per_frame", **overrides)
    train_rows = task.training_rows(manifest, "train", config)
    val_rows = task.training_rows(manifest, "val", config)
    test_rows = task.training_rows(manifest, "test", config)
    model = task.build_model(config)
    train_config = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, clips_per_video=clips_per_video)
    steps = int(np.ceil(len(train_rows) * clips_per_video / batch_size))
    optimizer, scheduler = make_optimizer(model, train_config, steps * epochs)
    started = time.perf_counter()
    history = []
    best_f1, best_state, best_epoch = -1.0, None, -1
    for epoch in range(epochs):
        rng = np.random.default_rng([0, epoch])
        clips = iter_clips(train_rows, task, config, train=True, rng=rng, clips_per_video=clips_per_video, augment=True)
        summary = task.summarize(train_one_epoch(model, optimizer, iter_batches(clips, batch_size, shuffle_buffer=64, rng=rng), "cpu",
                                                 task, config, scheduler))
        val = task.summarize(evaluate(model, iter_batches(iter_clips(val_rows, task, config, train=False, rng=rng), 16), "cpu", task, config))
        history.append({"epoch": epoch, "train_loss": round(summary["loss"], 4), "val_f1": round(val["f1"], 3),
                        **{f"val_f1_{c}": round(val[f"f1_{c}"], 3) for c in CATEGORIES[1:]}})
        if val["f1"] > best_f1:  # the checkpoint the Ray path would export: the best val_f1
            best_f1, best_epoch = val["f1"], epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        print(f"  {variant}: epoch {epoch} train loss {summary['loss']:.4f} F1 {summary['f1']:.3f} | val F1 {val['f1']:.3f} "
              f"visible {val['f1_visible']:.3f} hidden {val['f1_hidden']:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
        if minutes and time.perf_counter() - started > minutes * 60 and epoch + 1 < epochs:
            print(f"  {variant}: time budget of {minutes:g} min spent after epoch {epoch}: stopping (schedule not finished)", flush=True)
            break
    train_s = time.perf_counter() - started
    model.load_state_dict(best_state)
    rng = np.random.default_rng(1)
    test = task.summarize(evaluate(model, iter_batches(iter_clips(test_rows, task, config, train=False, rng=rng), 16), "cpu", task, config))
    misses = miss_breakdown(model, test_rows, task, config)
    return {"variant": variant, "test": test, "misses": misses, "train_s": train_s, "history": history, "best_epoch": best_epoch, "epochs_run": len(history),
            "train_videos": len(train_rows), "val_videos": len(val_rows), "test_videos": len(test_rows),
            "parameters": sum(p.numel() for p in model.parameters()), "config": task.config_to_dict(config)}


def miss_breakdown(model, rows, task, config) -> list[list[int]]:
    """Present class-frames of ``rows`` by what became of them (``rnnimg.tasks.objects.miss_counts``):
    rows visible, occluded, hidden; columns found, low_score, near, far."""
    import torch

    from rnnimg.tasks.objects import miss_counts
    from rnnimg.train.data import iter_batches, iter_clips

    total = torch.zeros(3, 4, dtype=torch.int64)
    model.eval()
    with torch.inference_mode():
        for clips, targets in iter_batches(iter_clips(rows, task, config, train=False, rng=np.random.default_rng(1)), 16):
            total += miss_counts(model(torch.as_tensor(clips)).detections, torch.as_tensor(targets), config.score_threshold)
    return total.tolist()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=800)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--clips-per-video", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--head", default="", help="the model's head, 'tracker' or 'cells' (default: ObjectsConfig's)")
    parser.add_argument("--workers", type=int, default=2, choices=(1, 2), help="trainings at a time (1: one after the other)")
    parser.add_argument("--model-option", action="append", default=[], metavar="KEY=JSON", help="a model config field, e.g. rnn_hidden=192")
    parser.add_argument("--minutes", type=float, default=0.0,
                        help="stop a model's training after the first epoch that ends past this many minutes (0: no limit)")
    parser.add_argument("--json", default="", help="also write the results to this file")
    parser.add_argument("--archive", default="", help="keep the archive in this folder and reuse it when it is there (default: a temporary one)")
    args = parser.parse_args(argv)
    overrides = {k: json.loads(v) for k, _, v in (o.partition("=") for o in args.model_option)}
    if args.head:
        overrides["head"] = args.head

    from rnnimg.tasks.objects_synth import ObjectsSynthConfig, make_archive

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="objects-bench-") as folder:
        folder = args.archive or folder
        manifest = os.path.join(folder, "manifest.parquet")
        if not os.path.exists(manifest):  # (a kept archive is reused as it is: same videos, seed and count)
            manifest = make_archive(folder, ObjectsSynthConfig(videos=args.videos, seed=args.seed), processes=2)
        print(f"archive: {args.videos} videos at {folder} in {time.perf_counter() - started:.0f} s", flush=True)
        variants = [v for v in args.variants.split(",") if v]
        with ProcessPoolExecutor(max_workers=args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs = [pool.submit(fit_and_score, manifest, v, args.epochs, args.clips_per_video, args.batch_size, args.lr, overrides, args.minutes)
                    for v in variants]
            results = {r["variant"]: r for r in (run.result() for run in runs)}
    import torch

    first = results[variants[0]]
    print(f"\nmachine: {cpu_model()}, {os.cpu_count()} cores, Python {sys.version.split()[0]}, torch {torch.__version__}, "
          f"load average now {os.getloadavg()[0]:.1f}")
    print(f"budget per model: {args.epochs} epochs x {args.clips_per_video} clips x {first['train_videos']} train videos, "
          f"batch {args.batch_size}, lr {args.lr}, one core, {args.workers} at a time; head {first['config']['head']}; "
          f"checkpoint: best val F1 ({first['val_videos']} videos); "
          f"test {first['test_videos']} videos; wall {time.perf_counter() - started:.0f} s in all\n")
    print("| model | F1 all | F1 visible | F1 occluded | F1 hidden | P hidden | R hidden | epochs run | best epoch | train s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        t = r["test"]
        print(f"| {name} | {t['f1']:.3f} | {t['f1_visible']:.3f} | {t['f1_occluded']:.3f} | {t['f1_hidden']:.3f} | "
              f"{t['precision_hidden']:.3f} | {t['recall_hidden']:.3f} | {r['epochs_run']} | {r['best_epoch']} | {r['train_s']:.0f} |")
    print("objects in the test split (class-frames): " + ", ".join(f"{c} {first['test']['objects' + ('' if c == 'all' else '_' + c)]}"
                                                                   for c in CATEGORIES))
    print("\nPresent class-frames by what became of them (share of the category): found (IoU >= 0.5), score below the threshold, "
          "box centred inside the truth but IoU < 0.5, centred outside it\n")
    print("| model | frames | found | low score | near | far |\n|---|---|---|---|---|---|")
    for name, r in results.items():
        for category, counts in zip(CATEGORIES[1:], r["misses"]):
            n = max(sum(counts), 1)
            print(f"| {name} | {category} | " + " | ".join(f"{c} ({c / n:.3f})" for c in counts) + " |")
    print("\n| model | frames | val F1 by epoch |\n|---|---|---|")
    for name, r in results.items():
        for c in ("visible", "hidden"):
            key = f"val_f1_{c}"
            print(f"| {name} | {c} | {' '.join(f'{h[key]:.3f}' for h in r['history'])} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
