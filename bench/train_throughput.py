"""Training throughput: the Ray Train loop against the same loop in one plain process, side by side.

    python bench/train_throughput.py                  # about 4 minutes on 2 cores; writes bench/RESULTS_train.md
    python bench/train_throughput.py --videos 60 --epochs 3 --rounds 1 --no-write   # a quick look

Every configuration trains the default CRNN on the same synthetic archive with the same code:
``epoch_batches`` (clips decoded on the fly, augmented, through the shuffle buffer) feeding
``train_one_epoch``. Measured is clips/s of an epoch's training phase (validation and the
checkpoint are not in it; the whole run's wall time is listed beside). The first epoch of
every run is a warmup and left out; the figure is the median of the other epochs, and with
several rounds (configurations interleaved, so that a busy neighbour slows all alike) the
best round counts.

    plain           one process, this loop without Ray, torch using every core
    ray 1 worker    TorchTrainer, 1 worker reserving every core (so torch gets as many threads)
    ray 2 workers   TorchTrainer, 2 workers with cores/2 each, DDP over gloo
    ray 1 worker + 1 decoding process   as ray 1 worker, decoding in a DataLoader process (--loader-workers 1)

Target: ray 1 worker >= 0.9 x plain.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from rnnimg.manifest import labelled_videos, manifest_overview  # noqa: E402
from rnnimg.models.crnn import CRNN, CRNNConfig  # noqa: E402
from rnnimg.tasks import get as get_task  # noqa: E402
from rnnimg.train import TrainConfig, train  # noqa: E402
from rnnimg.train.data import epoch_batches  # noqa: E402
from rnnimg.train.loop import make_optimizer, train_one_epoch  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_train.md")


def plain_run(manifest: str, train_config: TrainConfig, threads: int) -> dict:
    """The training loop of one Ray Train worker, in this process, without Ray."""
    torch.set_num_threads(threads)
    torch.manual_seed(train_config.seed)
    labels, _ = manifest_overview(manifest)
    model_config = CRNNConfig(labels=labels)
    rows = labelled_videos(manifest, "train", labels)
    steps = math.ceil(len(rows) * train_config.clips_per_video / train_config.batch_size)
    model = CRNN(model_config)
    optimizer, scheduler = make_optimizer(model, train_config, steps * train_config.epochs)
    rates = []
    started_run = time.perf_counter()
    for epoch in range(train_config.epochs):
        started = time.perf_counter()
        task = get_task("classify")
        batches = epoch_batches(rows, task, model_config, train_config, train=True, epoch=epoch)
        stats = train_one_epoch(model, optimizer, batches, "cpu", task, model_config, scheduler)
        rates.append(int(stats["count"]) / (time.perf_counter() - started))
    return {"rates": rates, "wall_s": time.perf_counter() - started_run}


def ray_run(manifest: str, out: str, name: str, train_config: TrainConfig) -> dict:
    started = time.perf_counter()
    result = train(manifest, out, name, train_config)
    return {"rates": [h["train_clips_per_s"] for h in result.history], "wall_s": time.perf_counter() - started}


def machine() -> dict:
    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                     if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown"
    import av
    import ray

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "av": av.__version__,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=120, help="labelled synthetic videos, 70%% of them train (default 120)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per run, the first one not counted (default 4)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of all configurations (default 2)")
    parser.add_argument("--clips-per-video", type=int, default=2, help="random clips per training video per epoch (default 2)")
    parser.add_argument("--no-write", action="store_true", help=f"print only, do not write {os.path.relpath(RESULTS)}")
    args = parser.parse_args()

    from rnnimg.synth import SynthConfig, make_archive

    cores = os.cpu_count() or 2
    load_before = os.getloadavg()
    started = time.perf_counter()
    root = tempfile.mkdtemp(prefix="bench-train-")
    manifest = make_archive(os.path.join(root, "archive"), SynthConfig(videos=args.videos, unlabelled=0, seed=7))
    print(f"archive: {args.videos} videos in {time.perf_counter() - started:.0f} s")
    import ray

    ray.init(num_cpus=cores, log_to_driver=False)  # the workers' logs would bury the table

    base = dict(epochs=args.epochs, clips_per_video=args.clips_per_video, use_gpu=False)
    configs = {
        "plain, 1 process": ("plain", TrainConfig(workers=1, **base)),
        "ray, 1 worker": ("ray", TrainConfig(workers=1, cpus_per_worker=cores, **base)),
        f"ray, 2 workers x {cores // 2} core(s)": ("ray", TrainConfig(workers=2, cpus_per_worker=max(1, cores // 2), **base)),
        "ray, 1 worker + 1 decoding process": ("ray", TrainConfig(workers=1, cpus_per_worker=cores, loader_workers=1, **base)),
    }
    runs: dict[str, list[dict]] = {name: [] for name in configs}
    for round_index in range(args.rounds):
        for index, (name, (kind, config)) in enumerate(configs.items()):
            if kind == "plain":
                run = plain_run(manifest, config, threads=cores)
            else:
                run = ray_run(manifest, os.path.join(root, "runs"), f"r{round_index}-{index}", config)
            run["clips_per_s"] = statistics.median(run["rates"][1:] or run["rates"])
            runs[name].append(run)
            print(f"round {round_index + 1}: {name:28s} {run['clips_per_s']:7.1f} clips/s  (epochs: "
                  + ", ".join(f"{r:.1f}" for r in run["rates"]) + f"; run {run['wall_s']:.0f} s)", flush=True)

    best = {name: max(r["clips_per_s"] for r in rs) for name, rs in runs.items()}
    names = list(configs)
    plain, one, two, loaded = (best[n] for n in names)
    lines = [
        "| configuration | training clips/s (best round) | every round | vs plain | run wall time, s |",
        "|---|---|---|---|---|",
    ]
    for name in names:
        lines.append(f"| {name} | {best[name]:.1f} | " + ", ".join(f"{r['clips_per_s']:.1f}" for r in runs[name])
                     + f" | {best[name] / plain:.2f} | " + ", ".join(f"{r['wall_s']:.0f}" for r in runs[name]) + " |")
    summary = (f"Ray Train, 1 worker / plain process: **{one / plain:.2f}** (target >= 0.9); "
               f"2 workers / 1 worker: **{two / one:.2f}**; 1 worker with a DataLoader decoding process / without: **{loaded / one:.2f}**.")
    info = machine()
    load_after = os.getloadavg()
    busy = max(load_before[0], load_after[0]) > cores
    warning = (f"**The machine was busy** (load average above its {cores} cores): other processes took CPU time from every row, "
               "and a configuration with more processes gets a larger share of a contended CPU, so the ratios here are not reliable. "
               "Rerun on a quiet machine.") if busy else ""
    text = "\n".join([
        "# Training throughput: Ray Train loop vs the same loop in one process",
        "",
        f"Measured {datetime.date.today().isoformat()} by `python bench/train_throughput.py --videos {args.videos} --epochs {args.epochs} "
        f"--rounds {args.rounds} --clips-per-video {args.clips_per_video}` on {info['cpu']}, {info['cores']} cores "
        f"(Python {info['python']}, torch {info['torch']}, Ray {info['ray']}, PyAV {info['av']}). "
        f"Load average before/after: {load_before[0]:.1f} / {load_after[0]:.1f} (a shared machine: other work slows every row alike).",
        "",
        "Default CRNN (small CNN + LSTM(128)), 8-frame 64x64 clips decoded on the fly from H.264, batch 16 clips per worker, "
        f"{args.clips_per_video} random clips per training video per epoch, fp32 on CPU. Clips/s is the median over epochs 2..{args.epochs} "
        "of training clips / seconds of the epoch's training phase (decode + step); validation and checkpointing are not in it "
        "but are in the wall time.",
        "",
        *lines,
        "",
        summary,
        "",
        *([warning, ""] if warning else []),
    ])
    print()
    print(text)
    if not args.no_write:
        with open(RESULTS, "w") as f:
            f.write(text)
        print(f"wrote {RESULTS}")
    shutil.rmtree(root, ignore_errors=True)
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
