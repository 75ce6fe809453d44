"""Labelling cost of a segmentation model against the classifier's, per sampled frame, side by side.

    .venv/bin/python bench/segment_label_cost.py                # ~5 min on 2 cores
    .venv/bin/python bench/segment_label_cost.py --videos 4 --seconds 8 --rounds 1 --no-write   # a smoke run

The same archive (``rnnimg synth --task segment`` videos, 64x64, 12 fps) is labelled by the whole
job (``rnnimg.label.label`` on a local Ray: probe, decode tasks, the model's actor, commits) with
two exported models that sample the same frames at the same size: the untrained CRNN classifier
(writes ``clips`` and ``segments``; its cost does not depend on its weights) and the ConvLSTM
segmenter with its default config, trained for 3 epochs on the archive itself so that its masks
have the shape of objects (writes a ``masks`` row per sampled frame, run-length encoded);
``--untrained`` adds the untrained segmenter, whose checkerboard masks are the worst case for the
encoding. CPU seconds are counted over this process and every Ray process
(``label_throughput.TreeCPU``), split by role, in interleaved rounds. Target (issue 12): the
segmentation job costs at most 1.5x the classifier's CPU per sampled frame (masks are not the
bottleneck). Results go to ``bench/RESULTS_segment.md`` (a section of its own).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from label_throughput import TreeCPU  # noqa: E402
from machine import cpu_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS_segment.md")
SECTION = "## Labelling cost: segmentation vs classification"
FRAME_SIZE, FRAMES_PER_CLIP, CLIP_SECONDS = 64, 12, 2.0
SEGMENT = "segment (ConvLSTM segmenter, 3 epochs on the archive)"
UNTRAINED = "segment, untrained (checkerboard masks: the worst case)"


def run(folder: str, model: str, out: str, precision: str = "auto") -> dict:
    from rnnimg.label import LabelConfig, label

    with TreeCPU() as cpu:
        started = time.perf_counter()
        result = label(folder, model, out, LabelConfig(videos_per_shard=8, precision=precision))
        wall = time.perf_counter() - started
    frames = result.clips * FRAMES_PER_CLIP
    rle_chars = mean_rle_chars(out) if "masks" in result.tables else None
    return {"frames": frames, "cpu": cpu.seconds, "wall": wall, "roles": cpu.by_role(), "tables": result.tables, "ok": result.ok,
            "rle_chars": rle_chars}


def briefly_trained_segmenter(manifest: str, out: str, epochs: int = 3, clips_per_video: int = 4, **plan) -> tuple[str, float]:
    """The segmenter trained for a few epochs on the bench's own archive (plain loop, one thread), exported.

    An untrained segmenter's masks are a fine checkerboard (every 2x2 cell gets the head's bias
    pattern: ~2,000 runs per 64x64 frame), so its run-length encoding and tables cost far more
    than a real model's blobs. A few epochs make masks shaped like objects. Returns the model and
    the training's CPU seconds.
    """
    import numpy as np
    import torch

    from rnnimg import checkpoint
    from rnnimg.tasks import get as get_task
    from rnnimg.train.config import TrainConfig
    from rnnimg.train.data import iter_batches, iter_clips
    from rnnimg.train.loop import make_optimizer, train_one_epoch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.process_time()
    try:
        torch.manual_seed(0)
        task = get_task("segment")
        config = task.config_from_dict(plan)
        rows = [r for split in ("train", "val", "test") for r in task.training_rows(manifest, split, config)]
        model = task.build_model(config)
        train_config = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, clips_per_video=clips_per_video)
        optimizer, scheduler = make_optimizer(model, train_config, epochs * -(-len(rows) * clips_per_video // 8))
        for epoch in range(epochs):
            rng = np.random.default_rng([0, epoch])
            clips = iter_clips(rows, task, config, train=True, rng=rng, clips_per_video=clips_per_video, augment=True)
            train_one_epoch(model, optimizer, iter_batches(clips, 8, shuffle_buffer=32, rng=rng), "cpu", task, config, scheduler)
        checkpoint.save(out, model.state_dict(), task.name, task.config_to_dict(config), labels=task.labels(config))
    finally:
        torch.set_num_threads(threads)
    return out, time.process_time() - started


def mean_rle_chars(out: str) -> float:
    """Mean length of the ``rle`` strings of a masks table (a measure of how ragged the masks are)."""
    from rnnimg import storage

    lengths = storage.read_table(storage.join(out, "masks"), columns=["rle"]).column("rle").to_pylist()
    return sum(map(len, lengths)) / max(1, len(lengths))


def forward_ms_per_frame(model_uri: str, clips: int = 32, repeats: int = 3, precision: str = "auto") -> float:
    """CPU ms per frame of the model's forward pass alone: one thread, a batch of ``clips`` random clips, best of ``repeats``;
    the model as the label job's actors run it (``rnnimg.label.Predictor``: folded, channels-last, bf16 weights for ``bf16``)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from rnnimg.label import Predictor

        predictor = Predictor(model_uri, threads=1, precision=precision)
        model = predictor.model
        x = (torch.rand(clips, FRAMES_PER_CLIP, 3, FRAME_SIZE, FRAME_SIZE) - 0.5).to(predictor.cast_dtype or torch.float32)
        with torch.inference_mode():
            model(x[:2])  # warm-up
            best = float("inf")
            for _ in range(repeats):
                started = time.process_time()
                model(x)
                best = min(best, time.process_time() - started)
    finally:
        torch.set_num_threads(threads)
    return 1000 * best / (clips * FRAMES_PER_CLIP)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=16, help="videos in the archive (default 16)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each video (default 20)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both models (default 2)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="both models' precision in the label job (LabelConfig.precision; default auto: fp32 on CPU)")
    parser.add_argument("--untrained", action="store_true", help="also label with an untrained segmenter (worst-case masks)")
    parser.add_argument("--no-write", action="store_true", help=f"print only, do not update {os.path.relpath(RESULTS)}")
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    import ray

    from rnnimg.tasks.segment_synth import SegmentSynthConfig, make_archive
    from tests.media import export_untrained_model

    work = tempfile.mkdtemp(prefix="rnnimg-bench-segcost-")
    load_before = os.getloadavg()[0]
    manifest = make_archive(os.path.join(work, "archive"), SegmentSynthConfig(videos=args.videos, unlabelled=0, seed=3, seconds=args.seconds))
    folder = os.path.join(work, "archive", "videos")
    plan = {"frame_size": FRAME_SIZE, "frames_per_clip": FRAMES_PER_CLIP, "clip_seconds": CLIP_SECONDS, "stride_seconds": CLIP_SECONDS}
    trained, train_cpu_s = briefly_trained_segmenter(manifest, os.path.join(work, "segment-trained"), **plan)
    print(f"segmenter trained for the bench: {train_cpu_s:.0f} CPU-s", flush=True)
    models = {
        "classify (CRNN)": export_untrained_model(os.path.join(work, "classify"), task="classify", **plan),
        SEGMENT: trained,
    }
    if args.untrained:
        models[UNTRAINED] = export_untrained_model(os.path.join(work, "segment"), task="segment", **plan)
    forward = {name: forward_ms_per_frame(model, precision=args.precision) for name, model in models.items()}
    layout_before = export_untrained_model(os.path.join(work, "segment-full-resolution"), task="segment", mask_stride=1, **plan)
    forward["segment, mask_stride=1 (the layout before)"] = forward_ms_per_frame(layout_before, precision=args.precision)
    ray.init(num_cpus=os.cpu_count() or 2, log_to_driver=False)
    results: dict[str, list[dict]] = {name: [] for name in models}
    try:
        for round_index in range(args.rounds):
            for name, model in models.items():
                measured = run(folder, model, os.path.join(work, f"out-{round_index}-{len(results[name])}-{abs(hash(name))}"), args.precision)
                results[name].append(measured)
                print(f"round {round_index + 1}: {name}: {measured['frames']} frames, {measured['cpu']:.1f} CPU-s "
                      f"({1000 * measured['cpu'] / measured['frames']:.2f} ms per frame), wall {measured['wall']:.1f} s, "
                      f"tables {measured['tables']}", flush=True)
    finally:
        ray.shutdown()
    load_after = os.getloadavg()[0]

    def best(name: str) -> dict:
        return min(results[name], key=lambda r: r["cpu"] / r["frames"])

    classify, segment = best("classify (CRNN)"), best(SEGMENT)
    ratio = (segment["cpu"] / segment["frames"]) / (classify["cpu"] / classify["frames"])
    roles = sorted({role for name in models for role in best(name)["roles"]})
    lines = [
        SECTION,
        "",
        f"Measured {datetime.date.today()} by `python bench/segment_label_cost.py --videos {args.videos} --seconds {args.seconds:g} "
        f"--rounds {args.rounds} --precision {args.precision}{' --untrained' if args.untrained else ''}` on {cpu_model()}, {os.cpu_count()} cores (load average before/after {load_before:.1f} / {load_after:.1f}).",
        "",
        f"One archive ({args.videos} synthetic segment videos of {args.seconds:g} s, 64x64, 12 fps, H.264) labelled by the whole job "
        f"on a local Ray with models sampling the same frames ({FRAMES_PER_CLIP} per {CLIP_SECONDS:g} s clip at "
        f"{FRAME_SIZE}x{FRAME_SIZE}); CPU of this process and every Ray process; best of {args.rounds} interleaved round(s).",
        "",
        "| model | sampled frames | mean RLE chars per mask | CPU-s | ms CPU per frame | wall s | " + " | ".join(f"{r} CPU-s" for r in roles) + " |",
        "|---|---:|---:|---:|---:|---:|" + "---:|" * len(roles),
    ]
    for name in models:
        r = best(name)
        chars = f"{r['rle_chars']:.0f}" if r["rle_chars"] is not None else "-"
        lines.append(f"| {name} | {r['frames']} | {chars} | {r['cpu']:.1f} | {1000 * r['cpu'] / r['frames']:.2f} | {r['wall']:.1f} | "
                     + " | ".join(f"{r['roles'].get(role, 0.0):.1f}" for role in roles) + " |")
    lines += ["", f"Segmentation / classification, CPU per sampled frame: **{ratio:.2f}** (target <= 1.5).", "",
              f"The forward pass alone (one thread, 32 clips of {FRAMES_PER_CLIP} frames, best of 3), CPU ms per frame: "
              + "; ".join(f"{name} {ms:.2f}" for name, ms in forward.items()) + "."]
    text = "\n".join(lines) + "\n"
    print()
    print(text)
    if not args.no_write:
        existing = open(RESULTS).read() if os.path.exists(RESULTS) else ""
        before, _, rest = existing.partition(SECTION)
        after = rest[rest.index("\n## "):] if "\n## " in rest else ""  # the sections after this one stay
        with open(RESULTS, "w") as f:
            f.write(before.rstrip() + "\n\n" + text + after)
    return 0


if __name__ == "__main__":
    sys.exit(main())
