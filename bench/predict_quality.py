"""Task ``predict``: next-frame quality against the baselines, surprise ranking of anomalies, and
class-conditioned generation recognised by a CRNN. Prints one JSON line per measurement.

Parts (run in this order; later parts read what earlier ones saved under --out):

- ``nextframe``: trains the encoder-forecaster (``rnnimg.models.forecaster``, 10 frames in,
  10 predicted) with the plain loop (``train_one_epoch``) on freshly rendered moving-digits
  sequences for ``--minutes`` of wall time, then scores the fixed-seed test set: 2,000 sequences
  written as H.264 videos (``rnnimg.tasks.digits_synth``, seed 2026) and decoded through the clip
  stream, against the copy-last-frame and mean-frame baselines on the same clips. Targets:
  MSE <= 0.5x copy-last, SSIM above copy-last. The black level the predictions are drawn with
  (``ForecasterConfig.black_level``) is chosen first on ``--val-sequences`` fresh training-handwriting
  sequences (``rnnimg.tasks.predict.choose_black_level``); the test figures at every level are printed
  beside. Saves the model (``OUT/nextframe_model``).
- ``surprise``: an archive of ``--surprise-videos`` ordinary 6 s moving-digits videos, one in ten
  with an anomaly (one digit teleports, freezes or reverses, at a random frame), labelled by
  ``rnnimg.label.label`` (Ray Data, the real job) with the nextframe model; each anomaly's clip
  (the one whose scored half holds the anomaly's first frame) must rank in the top 5% by surprise,
  for >= 90% of the anomalies. A clip's surprise is its most unexpected frame's, one step ahead
  (``rnnimg.tasks.predict.surprise``: surprisal in nats for a BCE model). Beside the label job's figure,
  the same clips decoded again and scored in this process by every measure (``SURPRISE_MEASURES``:
  surprisal and squared error, side by side; ``--no-measures`` skips it). ``--archive-seed 4242
  --anomaly-every 5`` builds the development archive (40 anomalies) that choices are made on, so that
  the bench's archive (seed 7) is only measured.
- ``conditioned``: a conditioned forecaster (1 frame in, 9 generated, the motion class as the
  forecaster's input) and the same model without the class, trained alike for ``--minutes-cond``
  each; rnnimg's CRNN (``rnnimg.models.crnn``) trained on real 10-frame sequences of the same
  generator; then clips generated for each class from fresh first frames are classified (drawn at a
  black level chosen on a validation draw, as for nextframe; also with none, for the record). Target:
  >= 90% recognised as their class; the unconditioned model: chance (25%). ``--reuse DIR`` scores the
  generators an earlier run saved in DIR instead of training them.

    .venv/bin/python bench/predict_quality.py --part nextframe --minutes 25
    .venv/bin/python bench/predict_quality.py --part surprise
    .venv/bin/python bench/predict_quality.py --part nextframe --minutes 75 --one-step-weight 1 --out OUT4   # a surprise scorer
    .venv/bin/python bench/predict_quality.py --part surprise --out OUT4
    .venv/bin/python bench/predict_quality.py --part surprise --archive-seed 4242 --anomaly-every 5 --out OUT4   # development archive
    .venv/bin/python bench/predict_quality.py --part conditioned --minutes-cond 10 --minutes-crnn 5
    .venv/bin/python bench/predict_quality.py --part nextframe --minutes 40 --lr 1e-3 --init OUT/nextframe_model --out OUT2   # train on
    .venv/bin/python bench/predict_quality.py --part nextframe --minutes 0 --init OUT/nextframe_model --out OUT3   # score a saved model
    .venv/bin/python bench/predict_quality.py --part nextframe --minutes 0.5 --test 64 --out /tmp/p   # a smoke run

One training process at a time, ``torch.set_num_threads(--threads)`` (default 1); wall-time
budgets, so the step counts printed depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import replace

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine import cpu_model  # noqa: E402  (bench/machine.py)

TEST_SEED = 2026


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def random_batch(rng, size: int, frames: int, labels: list[int] | None = None, pool: str = "train"):
    """``(uint8 (B, T, 64, 64, 3), int64 (B,) classes)`` of fresh moving-digits sequences, digits from ``pool``
    (``train``; ``heldout`` for every evaluation: handwriting no model here trained on)."""
    import torch

    from rnnimg.tasks.digits_synth import render_sequence, to_rgb

    picked = labels if labels is not None else [None] * size
    sequences = [render_sequence(rng, frames, 64, label=label, pool=pool) for label in picked]
    clips = np.stack([to_rgb(grey) for grey, _ in sequences])  # B x (T, H, W, 3) -> (B, T, H, W, 3)
    return torch.from_numpy(clips), torch.tensor([label for _, label in sequences])


def cosine_lr(optimizer, base_lr: float, fraction: float) -> None:
    """Cosine decay over the wall-time budget, to 5% at its end."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, fraction))))


def fit_forecaster(config, minutes: float, batch_size: int, lr: float, seed: int, conditioned: bool, init: str = "") -> dict:
    """Train for ``minutes`` of wall time on fresh sequences; returns the model and what it saw.
    ``init``: an exported model of the same config to start from (training on: a second cosine cycle)."""
    import torch

    from rnnimg import checkpoint
    from rnnimg.models.forecaster import Forecast, to_grey
    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import get
    from rnnimg.tasks.predict import loss_fn

    task = get("predict")
    torch.manual_seed(seed)
    model = task.build_model(config)
    if init:
        exported, state = checkpoint.load_state(init)
        if replace(task.config_from_dict(exported.config), black_level=config.black_level) != config:
            raise SystemExit(f"--init {init}: its config differs from this run's: {exported.config}")
        model.load_state_dict(state)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    started, steps, recent = time.perf_counter(), 0, []
    while (elapsed := time.perf_counter() - started) < minutes * 60:
        cosine_lr(optimizer, lr, elapsed / (minutes * 60))
        clips, labels = random_batch(rng, batch_size, config.frames_per_clip)
        inputs = to_model_input(clips)
        if config.one_step_weight == 1:  # a surprise scorer: its loss reads only the one-step predictions (the forecast is not trained)
            outputs = Forecast(None, to_grey(inputs), model.next_frame_logits(inputs))
        else:
            outputs = model(inputs, labels if conditioned else None)
        loss = loss_fn(outputs, config.context_frames, config.loss, config.one_step_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        steps += 1
        recent.append(float(loss.detach()))
        if steps % 50 == 0:
            emit({"progress": "train", "conditioned": conditioned, "step": steps, "minutes": round(elapsed / 60, 2),
                  "loss_last_50": round(float(np.mean(recent[-50:])), 5)})
    model.eval()
    return {"model": model, "steps": steps, "clips_seen": steps * batch_size, "wall_minutes": round((time.perf_counter() - started) / 60, 2)}


def validation_sweep(model, config, sequences: int, seed: int) -> dict:
    """The model's MSE and SSIM at every black level (``rnnimg.tasks.predict.BLACK_LEVELS``) on ``sequences``
    freshly drawn sequences of the training handwriting (none of the test set's), rendered without the codec."""
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import get

    task, rng, total = get("predict"), np.random.default_rng(seed), {}
    for start in range(0, sequences, 32):
        clips, labels = random_batch(rng, min(32, sequences - start), config.frames_per_clip)
        with torch.inference_mode():
            stats = task.batch_stats(model(to_model_input(clips), labels if config.labels else None), None, config)
        total = {k: total.get(k, 0) + v for k, v in stats.items()}
    summary = task.summarize(total)
    return {"sequences": sequences, "mse_by_black_level": summary["mse_by_black_level"], "ssim_by_black_level": summary["ssim_by_black_level"]}


def test_archive(out: str, count: int) -> str:
    """The fixed-seed test set: ``count`` 2 s sequences at 10 fps as H.264 videos (made once)."""
    from rnnimg.tasks.digits_synth import DigitsSynthConfig, make_archive

    root = os.path.join(out, f"test_archive_{count}")
    manifest = os.path.join(root, "manifest.parquet")
    if not os.path.exists(manifest):
        # 1 train + 1 val video, the rest test: the fractions only place the fixed-seed sequences.
        total = count + 2
        make_archive(root, DigitsSynthConfig(videos=total, seed=TEST_SEED, val_fraction=0.5 / total, test_fraction=count / total),
                     processes=2)
    return manifest


def constant_velocity(config):
    """The forecaster's kernel prior alone (``constant_velocity_prior``, no learned part): every region keeps
    the motion of the last context frame pair. A baseline that shows what the recurrent layers add."""
    import torch

    from rnnimg.models.forecaster import EPS, Forecast, apply_filters, constant_velocity_prior, to_grey

    class ConstantVelocity(torch.nn.Module):
        def forward(self, clips):
            grey = to_grey(clips)
            k = config.context_frames
            prior = constant_velocity_prior(grey[:, k - 2 : k], config.filter_size, 2 ** len(config.channels), config.future_frames)
            frame, frames = grey[:, k - 1], []
            for step in range(config.future_frames):
                frame = apply_filters(frame, prior[:, step], config.filter_size)
                frames.append(frame)
            return Forecast(torch.logit(torch.stack(frames, 1).clamp(EPS, 1 - EPS)), grey)

    return ConstantVelocity()


def part_nextframe(args) -> None:
    import torch

    from rnnimg import checkpoint
    from rnnimg.models.forecaster import ForecasterConfig
    from rnnimg.tasks import get
    from rnnimg.train.data import iter_batches, iter_clips
    from rnnimg.train.loop import evaluate

    task = get("predict")
    started = time.perf_counter()
    manifest = test_archive(args.out, args.test)
    emit({"progress": "test archive", "sequences": args.test, "minutes": round((time.perf_counter() - started) / 60, 2)})
    from rnnimg.tasks.predict import BLACK_LEVELS, choose_black_level

    config = ForecasterConfig(hidden=args.hidden, channels=tuple(args.channels), layers=args.layers, loss=args.loss, black_level=0.0,
                              one_step_weight=args.one_step_weight)
    # Training on from an earlier run's model draws other sequences than that run did (seed 1, not 0).
    fit = fit_forecaster(config, args.minutes, args.batch_size, args.lr, seed=1 if args.init else 0, conditioned=False, init=args.init)
    model = fit["model"]
    model_uri = os.path.join(args.out, "nextframe_model")
    # Saved as soon as it is trained (again below, with its black level and test metrics): a failure while
    # scoring never costs the training run.
    checkpoint.save(model_uri, model.state_dict(), task.name, task.config_to_dict(config), metrics={})
    # The black level the predictions are drawn with, chosen on a validation draw (as `rnnimg train` chooses it on
    # the val split); the test set is scored once, at that level (its figures at every level are printed beside).
    sweep = validation_sweep(model, config, args.val_sequences, seed=10_000 + int(bool(args.init)))
    config = replace(config, black_level=choose_black_level(sweep["mse_by_black_level"], sweep["ssim_by_black_level"]))
    emit({"progress": "black level", "chosen": config.black_level, "black_levels": list(BLACK_LEVELS),
          **{f"val_{k}": [round(v, 4) for v in sweep[k]] for k in ("mse_by_black_level", "ssim_by_black_level")}})
    rows = task.training_rows(manifest, "test", config)
    assert len(rows) == args.test, (len(rows), args.test)
    scored = time.perf_counter()
    clips = iter_clips(rows, task, config, train=False, rng=np.random.default_rng(0))
    stats = evaluate(model, iter_batches(clips, 32), "cpu", task, config)
    summary = task.summarize(stats)
    velocity = {}
    if config.output == "filters" and config.motion_input:
        clips = iter_clips(rows, task, config, train=False, rng=np.random.default_rng(0))
        # The prior as it is (its figures at each black level beside); it makes no one-step-ahead predictions,
        # so it is scored on the forecast alone.
        plain = replace(config, black_level=0.0, one_step_weight=0.0)
        baseline = task.summarize(evaluate(constant_velocity(plain), iter_batches(clips, 32), "cpu", task, plain))
        velocity = {"constant_velocity_mse": baseline["mse"], "constant_velocity_ssim": baseline["ssim"],
                    "constant_velocity_ssim_by_black_level": [round(v, 4) for v in baseline["ssim_by_black_level"]]}
    checkpoint.save(model_uri, model.state_dict(), task.name, task.config_to_dict(config), metrics={"test": summary})
    emit({"part": "nextframe", "machine": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
          "config": task.config_to_dict(config), "params": sum(p.numel() for p in model.parameters()),
          "init": args.init or None, "train_steps": fit["steps"], "train_clips": fit["clips_seen"], "train_wall_minutes": fit["wall_minutes"],
          "test_sequences": summary["clips"], "score_minutes": round((time.perf_counter() - scored) / 60, 2),
          **{k: summary[k] for k in ("mse", "ssim", "copy_last_mse", "copy_last_ssim", "mean_frame_mse", "mean_frame_ssim",
                                     "mse_vs_copy_last", "mse_per_step")}, **velocity,
          "black_level": config.black_level, "black_level_chosen_on": f"{sweep['sequences']} validation sequences",
          "raw_mse": summary["mse_by_black_level"][0], "raw_ssim": summary["ssim_by_black_level"][0],
          "test_mse_by_black_level": [round(v, 3) for v in summary["mse_by_black_level"]],
          "test_ssim_by_black_level": [round(v, 4) for v in summary["ssim_by_black_level"]],
          "target_mse_half_copy_last": summary["mse_vs_copy_last"] <= 0.5, "target_ssim_above_copy_last": summary["ssim"] > summary["copy_last_ssim"],
          "model": model_uri})


def part_surprise(args) -> None:
    from rnnimg import storage
    from rnnimg.label import LabelConfig, label
    from rnnimg.runtime import ensure_ray
    from rnnimg.synth import encode_video
    from rnnimg.tasks.digits_synth import ANOMALIES, Anomaly, render_sequence, to_rgb

    model_uri = os.path.join(args.out, "nextframe_model")
    every = args.anomaly_every
    name = f"surprise_archive_{args.surprise_videos}" + ("" if (args.archive_seed, every) == (7, 10) else f"_seed{args.archive_seed}_every{every}")
    root = os.path.join(args.out, name)
    rng = np.random.default_rng(args.archive_seed)
    fps, frames = 10, 60
    anomalies = {}
    for index in range(args.surprise_videos):
        uri = os.path.join(root, f"video-{index:04d}.mp4")
        seed = int(rng.integers(2**63))
        anomaly = None
        if index % every == 3 % every:  # one in `every`
            anomaly = Anomaly(ANOMALIES[(index // every) % 3], int(rng.integers(20, 50)), int(rng.integers(2)))
            anomalies[uri] = anomaly
        if not os.path.exists(uri):
            grey, _ = render_sequence(np.random.default_rng(seed), frames, 64, anomaly=anomaly, pool="heldout")
            storage.write_bytes(uri, encode_video(to_rgb(grey), fps, crf=4))
    out = os.path.join(args.out, name.replace("archive", "labels"))
    ensure_ray(None)
    started = time.perf_counter()
    label([root], model_uri, out, LabelConfig(videos_per_shard=50, batch_size=16))
    label_minutes = round((time.perf_counter() - started) / 60, 2)
    clips = storage.read_table(os.path.join(out, "clips")).to_pandas()
    # Each anomaly's clip: the one whose predicted half (frames 10k+10 .. 10k+19 of clip k) holds its first frame.
    wanted = {(storage.normalize(uri), anomaly.at // 10 - 1): anomaly for uri, anomaly in anomalies.items()}
    anomalous_videos = {storage.normalize(u) for u in anomalies}
    found, per_kind, top, median = rank_anomalies(clips, "surprise", wanted, anomalous_videos)
    record = {"part": "surprise", "machine": cpu_model(), "archive": name, "videos": args.surprise_videos, "clips": len(clips),
              "anomalies": len(anomalies), "top_5pct_clips": top, "found_in_top_5pct": found, "share_found": found / len(anomalies),
              "per_kind": per_kind, "median_surprise_normal": median, "label_minutes": label_minutes, "target_share": 0.9}
    if args.measures:
        record["by_measure"] = compare_measures(model_uri, clips, wanted, anomalous_videos)
    emit(record)


def rank_anomalies(clips, column: str, wanted: dict, anomalous_videos: set) -> tuple[int, dict, int, float]:
    """How many anomaly clips rank in the top 5% of ``clips`` by ``column``; their ranks per kind; the cut;
    the median score of the ordinary videos' clips."""
    from rnnimg.tasks.digits_synth import ANOMALIES

    ordered = clips.sort_values(column, ascending=False).reset_index(drop=True)
    top = max(1, int(round(0.05 * len(ordered))))
    position = {(u, int(k)): rank for rank, (u, k) in enumerate(zip(ordered["video_uri"], ordered["clip_index"]))}
    ranks = {key: position[key] for key in wanted}
    per_kind = {kind: [r for key, r in ranks.items() if wanted[key].kind == kind] for kind in ANOMALIES}
    normal = ordered.loc[~ordered["video_uri"].isin(anomalous_videos), column]
    return sum(r < top for r in ranks.values()), per_kind, top, float(normal.median())


def compare_measures(model_uri: str, clips, wanted: dict, anomalous_videos: set) -> dict:
    """Every measure of ``rnnimg.tasks.predict.SURPRISE_MEASURES`` on the same clips, side by side: the
    label job's clips decoded again (the same plan and decoder) and scored in this process. Also how far
    the label job's column is from this process's score by the model's own measure."""
    import torch

    from rnnimg import checkpoint
    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import get
    from rnnimg.models.forecaster import to_grey
    from rnnimg.tasks.predict import SURPRISE_MEASURES, score_frames, surprise_measure
    from rnnimg.video.clips import ClipSpec, uniform_clips
    from rnnimg.video.decode import VideoReader, probe

    task = get("predict")
    exported, state = checkpoint.load_state(model_uri)
    config = task.config_from_dict(exported.config)
    model = task.build_model(config)
    model.load_state_dict(state)
    model.eval()
    spec = ClipSpec(clip_seconds=config.clip_seconds, frames_per_clip=config.frames_per_clip, stride_seconds=config.stride_seconds)
    scores = {measure: [] for measure in SURPRISE_MEASURES}
    keys = []
    with torch.inference_mode():
        for uri in sorted(set(clips["video_uri"])):
            with VideoReader(uri, (config.frame_size, config.frame_size)) as reader:
                decoded = list(reader.clips(uniform_clips(probe(uri).duration_s, spec)))
            x = to_model_input(np.stack([frames for _, frames in decoded]))
            logits, truth = model.next_frame_logits(x), to_grey(x)[:, config.context_frames:]  # once for every measure
            for measure in SURPRISE_MEASURES:
                scores[measure].append(score_frames(logits, truth, measure).amax(1).numpy())
            keys += [(uri, clip.clip_index) for clip, _ in decoded]
    import pandas as pd

    table = pd.DataFrame({"video_uri": [u for u, _ in keys], "clip_index": [k for _, k in keys],
                          **{m: np.concatenate(v) for m, v in scores.items()}})
    joined = clips.merge(table, on=["video_uri", "clip_index"], how="inner")
    own = surprise_measure(config)
    out = {"label_job_measure": own, "clips_compared": len(joined),
           "label_job_max_rel_diff": float((np.abs(joined["surprise"] - joined[own]) / joined[own].abs().clip(lower=1e-6)).max())}
    for measure in SURPRISE_MEASURES:
        found, per_kind, top, median = rank_anomalies(table, measure, wanted, anomalous_videos)
        out[measure] = {"found_in_top_5pct": found, "per_kind": per_kind, "median_normal": median}
    return out


def part_conditioned(args) -> None:
    import torch

    from rnnimg import checkpoint
    from rnnimg.generate import generate_clip
    from rnnimg.models.crnn import CRNN, CRNNConfig
    from rnnimg.models.forecaster import ForecasterConfig
    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks import get
    from rnnimg.tasks.classify import loss_fn as crnn_loss
    from rnnimg.tasks.digits_synth import MOTION_CLASSES, to_rgb

    task = get("predict")
    frames = 10
    results = {}
    # The classifier: rnnimg's CRNN on real 10-frame sequences of the generator (class = starting direction).
    crnn_config = CRNNConfig(labels=MOTION_CLASSES, frames_per_clip=frames, clip_seconds=1.0, stride_seconds=1.0)
    torch.manual_seed(0)
    crnn = CRNN(crnn_config)
    optimizer = torch.optim.AdamW(crnn.parameters(), lr=2e-3, weight_decay=0.01)
    rng = np.random.default_rng(100)
    started, steps = time.perf_counter(), 0
    while (elapsed := time.perf_counter() - started) < args.minutes_crnn * 60:
        cosine_lr(optimizer, 2e-3, elapsed / (args.minutes_crnn * 60))
        clips, labels = random_batch(rng, 32, frames)
        crnn.train()
        clip_logits, frame_logits = crnn(to_model_input(clips))
        loss = crnn_loss(clip_logits, frame_logits, labels, crnn_config.frame_loss_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
    crnn.eval()
    test_rng = np.random.default_rng(TEST_SEED + 1)
    correct = total = 0
    with torch.inference_mode():
        for _ in range(8):
            clips, labels = random_batch(test_rng, 50, frames, pool="heldout")
            correct += int((crnn(to_model_input(clips))[0].argmax(1) == labels).sum())
            total += len(labels)
    results["crnn"] = {"steps": steps, "wall_minutes": round((time.perf_counter() - started) / 60, 2), "real_test_accuracy": correct / total,
                       "real_test_clips": total}
    emit({"progress": "crnn", **results["crnn"]})

    from rnnimg.tasks.predict import choose_black_level

    per_class = args.generated // len(MOTION_CLASSES)
    for conditioned in (True, False):
        config = ForecasterConfig(frames_per_clip=frames, context_frames=1, clip_seconds=1.0, stride_seconds=0.9, hidden=args.hidden,
                                  channels=tuple(args.channels), layers=args.layers, loss=args.loss, labels=MOTION_CLASSES if conditioned else (),
                                  black_level=0.0)
        name = "conditioned" if conditioned else "unconditioned"
        if args.reuse:  # generators an earlier run of this part saved (same config): only the scoring is redone
            exported, state = checkpoint.load_state(os.path.join(args.reuse, f"{name}_model"))
            if replace(task.config_from_dict(exported.config), black_level=0.0) != config:
                raise SystemExit(f"--reuse {args.reuse}: the {name} model's config differs from this run's: {exported.config}")
            model = task.build_model(config)
            model.load_state_dict(state)
            fit = {"model": model.eval(), "steps": None, "clips_seen": None, "wall_minutes": None, "reused": os.path.join(args.reuse, f"{name}_model")}
        else:
            fit = fit_forecaster(config, args.minutes_cond, args.batch_size, args.lr, seed=1, conditioned=conditioned)
        # The black level its clips are drawn with, chosen on a validation draw as for the next-frame model.
        sweep = validation_sweep(fit["model"], config, args.val_sequences, seed=20_000 + int(conditioned))
        chosen = replace(config, black_level=choose_black_level(sweep["mse_by_black_level"], sweep["ssim_by_black_level"]))
        checkpoint.save(os.path.join(args.out, f"{name}_model"), fit["model"].state_dict(), task.name, task.config_to_dict(chosen),
                        labels=list(config.labels))
        recognised = {}
        for drawn in (chosen, config) if chosen.black_level else (chosen,):  # at the chosen level, and with none for the record
            model = task.build_model(drawn)
            model.load_state_dict(fit["model"].state_dict())
            model.eval()
            confusion = np.zeros((len(MOTION_CLASSES), len(MOTION_CLASSES)), np.int64)
            with torch.inference_mode():
                for wanted in range(len(MOTION_CLASSES)):
                    # Seeds disjoint from training (which draws from default_rng(1)); the same seeds for both models.
                    generated = np.stack([to_rgb(generate_clip(model, drawn, wanted, 10_000 + wanted * per_class + i)) if conditioned else
                                          to_rgb(_unconditioned_clip(model, drawn, wanted, 10_000 + wanted * per_class + i))
                                          for i in range(per_class)])
                    predicted = crnn(to_model_input(generated))[0].argmax(1)
                    for p in predicted.tolist():
                        confusion[wanted, p] += 1
            recognised[drawn.black_level] = (float(np.trace(confusion) / confusion.sum()), confusion.tolist())
        accuracy, confusion = recognised[chosen.black_level]
        results[name] = {"train_steps": fit["steps"], "train_clips": fit["clips_seen"], "train_wall_minutes": fit["wall_minutes"],
                         "reused": fit.get("reused"), "black_level": chosen.black_level, "recognised": accuracy, "confusion": confusion,
                         "recognised_without_black_level": recognised.get(0.0, (accuracy,))[0],
                         "val_ssim_by_black_level": [round(v, 4) for v in sweep["ssim_by_black_level"]]}
        emit({"progress": name, **results[name]})
    emit({"part": "conditioned", "machine": cpu_model(), "torch": torch.__version__, "generated_per_class": per_class, **results,
          "target_conditioned": results["conditioned"]["recognised"] >= 0.9, "chance": 1 / len(MOTION_CLASSES)})


def _unconditioned_clip(model, config, wanted: int, seed: int) -> np.ndarray:
    """The unconditioned model from the same first frame as the conditioned one would get for class ``wanted``."""
    import torch

    from rnnimg.models.layout import to_model_input
    from rnnimg.tasks.digits_synth import render_sequence, to_rgb

    grey, _ = render_sequence(np.random.default_rng(seed), config.context_frames, config.frame_size, label=wanted, pool="heldout")
    with torch.inference_mode():
        predicted = model.rollout(to_model_input(to_rgb(grey)), config.future_frames)[0]  # (F, 1, H, W)
    return np.concatenate([grey, np.rint(predicted[:, 0].numpy() * 255).astype(np.uint8)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("nextframe", "surprise", "conditioned"), required=True)
    parser.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "rnnimg-predict-bench"), help="data and models (reused across parts)")
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-time training budget of the next-frame model")
    parser.add_argument("--minutes-cond", type=float, default=10.0, help="wall-time budget of each conditioned-part forecaster")
    parser.add_argument("--minutes-crnn", type=float, default=5.0, help="wall-time budget of the CRNN")
    parser.add_argument("--test", type=int, default=2000, help="test sequences")
    parser.add_argument("--surprise-videos", type=int, default=200)
    parser.add_argument("--archive-seed", type=int, default=7, help="surprise: seed of the archive (7: the bench's; another: a development archive)")
    parser.add_argument("--anomaly-every", type=int, default=10, help="surprise: one video in this many has an anomaly")
    parser.add_argument("--measures", action=argparse.BooleanOptionalAction, default=True,
                        help="surprise: also score the clips by every surprise measure in this process, side by side")
    parser.add_argument("--generated", type=int, default=200, help="generated clips per model, spread over the classes")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--loss", choices=("bce", "mse"), default="bce", help="the forecasters' per-pixel loss")
    parser.add_argument("--one-step-weight", type=float, default=0.0,
                        help="nextframe: weight of the one-step-ahead loss (ForecasterConfig.one_step_weight; 1: a surprise scorer)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--val-sequences", type=int, default=256, help="nextframe: validation sequences the black level is chosen on")
    parser.add_argument("--reuse", default="", help="conditioned: score the generators an earlier run saved in this folder instead of training them")
    parser.add_argument("--init", default="", help="nextframe: start from this exported model (same config) and train on for --minutes")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    {"nextframe": part_nextframe, "surprise": part_surprise, "conditioned": part_conditioned}[args.part](args)


if __name__ == "__main__":
    main()
