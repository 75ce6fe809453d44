"""Training pieces without a Ray cluster: learning-rate schedules, the manifest shard plan,
the decoding DataLoader, uint8 batches converted on the device, bf16 autocast, the
evaluation report, the command line's train options and the GPU check script."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch

from rnnimg import evaluation, tasks
from rnnimg.manifest import ManifestError, labelled_rows, labelled_videos, manifest_overview, read_manifest, shard_rows
from rnnimg.models.crnn import BACKBONES, CRNN, CRNNConfig
from rnnimg.train.config import LR_SCHEDULES, TrainConfig
from rnnimg.train.data import epoch_batches, iter_batches, iter_clips, rebatch
from rnnimg.train.loop import lr_multiplier, make_optimizer, train_one_epoch

CLASSIFY = tasks.get("classify")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- configuration and schedules


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr_schedule": "linear"}, "lr_schedule must be one of ('cosine', 'step', 'constant'), got 'linear'"),
        ({"warmup_epochs": 12}, "warmup_epochs must be in [0, epochs=12), got 12"),
        ({"precision": "fp16"}, "precision must be one of ('auto', 'bf16', 'fp32'), got 'fp16'"),
        ({"gpus_per_worker": 0}, "gpus_per_worker must be > 0, got 0"),
        ({"loader_workers": -1}, "loader_workers must be an integer >= 0, got -1"),
        ({"max_failures": -2}, "max_failures must be an integer >= -1"),
        ({"workers": 0}, "workers must be an integer >= 1, got 0"),
    ],
)
def test_bad_train_config_says_what_was_given_and_what_is_accepted(kwargs, message):
    with pytest.raises(ValueError) as err:
        TrainConfig(**kwargs)
    assert message in str(err.value)


def test_worker_cpus_default_to_one_plus_the_loader_processes():
    assert TrainConfig().worker_cpus == 1
    assert TrainConfig(loader_workers=3).worker_cpus == 4
    assert TrainConfig(loader_workers=3, cpus_per_worker=2).worker_cpus == 2


def test_lr_schedules_after_a_linear_warmup():
    total, warmup = 100, 10
    for schedule in LR_SCHEDULES:
        assert lr_multiplier(schedule, 0, total, warmup) == pytest.approx(0.1)
        assert lr_multiplier(schedule, 9, total, warmup) == pytest.approx(1.0)
        assert lr_multiplier(schedule, 10, total, warmup) == pytest.approx(1.0)
    assert lr_multiplier("cosine", 55, total, warmup) == pytest.approx(0.05 + 0.95 * 0.5)  # half way after warmup
    assert lr_multiplier("cosine", total, total, warmup) == pytest.approx(0.05)
    assert [lr_multiplier("step", s, total, warmup) for s in (54, 55, 77, 78, 99)] == pytest.approx([1, 0.1, 0.1, 0.01, 0.01])
    assert lr_multiplier("constant", 99, total, warmup) == 1.0
    assert lr_multiplier("constant", 0, total, 0) == 1.0  # no warmup
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        lr_multiplier("exponential", 0, total, warmup)


def test_make_optimizer_turns_warmup_epochs_into_steps():
    model = torch.nn.Linear(2, 2)
    # 4 epochs of 10 steps, 1.5 epochs of warmup = 15 steps: the lr reaches the peak at step 14.
    optimizer, scheduler = make_optimizer(model, TrainConfig(epochs=4, lr=1.0, warmup_epochs=1.5, lr_schedule="constant"), 40)
    lrs = []
    for _ in range(20):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(1 / 15) and lrs[13] < 1.0 and lrs[14:] == pytest.approx([1.0] * 6)
    # Default: the first 5% of the run, as before warmup_epochs existed.
    optimizer, scheduler = make_optimizer(model, TrainConfig(epochs=4, lr=1.0), 40)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5)


# ----------------------------------------------------------------------------- manifest -> shards


@pytest.fixture
def manifest_table(tmp_path):
    rows = {
        "video_uri": [f"videos/v{i:02d}.mp4" for i in range(11)] + ["s3://bucket/elsewhere.mp4"],
        "label": ["a", "b", "a", None, "b", "a", "b", "a", "b", "c", "a", "b"],
        "split": ["train", "train", "val", "train", "train", "train", "val", "train", "test", "test", "train", "train"],
        "size": list(range(12)),
    }
    path = tmp_path / "m.parquet"
    pq.write_table(pa.table(rows), path)
    return str(path), rows


def test_manifest_overview_counts_labelled_rows_per_split(manifest_table):
    path, _ = manifest_table
    labels, counts = manifest_overview(path)
    assert labels == ("a", "b")  # "c" is only in test
    assert counts == {"train": 7, "val": 2, "test": 2}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_each_rank_reads_its_own_share_like_shard_rows(manifest_table, world):
    path, _ = manifest_table
    everything = labelled_rows(read_manifest(path), "train", ("a", "b"))
    assert len(everything) == 7 and everything[-1] == ("s3://bucket/elsewhere.mp4", 1)
    assert everything[0] == (os.path.join(os.path.dirname(path), "videos", "v00.mp4"), 0)  # relative to the manifest
    shares = [labelled_videos(path, "train", ("a", "b"), rank=r, world=world, pad=True) for r in range(world)]
    assert shares == [shard_rows(everything, r, world, pad=True) for r in range(world)]
    assert len({len(s) for s in shares}) == 1  # DDP: the same count on every rank
    unpadded = [labelled_videos(path, "train", ("a", "b"), rank=r, world=world) for r in range(world)]
    assert sorted(sum(unpadded, [])) == sorted(everything)


def test_manifest_shards_from_csv_and_errors(tmp_path, manifest_table):
    path, rows = manifest_table
    csv_path = tmp_path / "m.csv"
    pacsv.write_csv(pa.table(rows), csv_path)
    assert labelled_videos(str(csv_path), "val", ("a", "b")) == labelled_videos(path, "val", ("a", "b"))
    with pytest.raises(ValueError, match=r"label 'b' of .* is not among the model's labels \['a', 'x'\]"):
        labelled_videos(path, "train", ("a", "x"))
    no_split = tmp_path / "nosplit.parquet"
    pq.write_table(pa.table({"video_uri": ["x.mp4"], "label": ["a"]}), no_split)
    with pytest.raises(ManifestError, match=r"has no \['split'\] column"):
        manifest_overview(str(no_split))
    with pytest.raises(FileNotFoundError, match="no manifest at"):
        manifest_overview(str(tmp_path / "missing.parquet"))


# ----------------------------------------------------------------------------- decode -> batches


def test_rebatch_regroups_uneven_chunks_into_full_batches():
    chunks = [(torch.full((n, 1), float(i)), torch.full((n,), i)) for i, n in enumerate([3, 4, 1, 4, 2])]
    batches = list(rebatch(chunks, 4))
    assert [len(y) for _, y in batches] == [4, 4, 4, 2]
    assert torch.cat([y for _, y in batches]).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 3, 3, 3, 3, 4, 4]
    assert all(len(x) == len(y) for x, y in batches)


def _clip_keys(batches) -> list:
    keys = []
    for x, y in batches:
        assert x.dtype == torch.uint8 and x.dim() == 5 and x.shape[-1] == 3  # (B, T, H, W, C)
        keys += [(int(label), float(clip.float().mean())) for clip, label in zip(x, y)]
    return sorted(keys)


def test_decoding_in_loader_processes_gives_the_same_clips(tiny_archive):
    _, manifest = tiny_archive
    config = CRNNConfig(frame_size=32)
    rows = labelled_rows(read_manifest(manifest), "train", config.labels)
    plain = TrainConfig(batch_size=3)
    loaded = TrainConfig(batch_size=3, loader_workers=2)
    # Evaluation clips are every uniform window: the same set, whoever decodes them.
    evaluated = list(epoch_batches(rows, CLASSIFY, config, plain, train=False, epoch=0))
    assert _clip_keys(epoch_batches(rows, CLASSIFY, config, loaded, train=False, epoch=0)) == _clip_keys(evaluated)
    assert len(_clip_keys(evaluated)) == 2 * len(rows)  # 4 s videos, 2 s clips
    # Training clips are random: the same count and batch sizes, every video's label once per clip.
    trained = list(epoch_batches(rows, CLASSIFY, config, loaded, train=True, epoch=0))
    assert [len(y) for _, y in trained] == [3] * (len(rows) // 3) + ([len(rows) % 3] if len(rows) % 3 else [])
    assert sorted(torch.cat([y for _, y in trained]).tolist()) == sorted(label for _, label in rows)
    # The same epoch twice: the same clips (a redone epoch after a failure sees what it saw).
    assert _clip_keys(epoch_batches(rows, CLASSIFY, config, plain, train=True, epoch=1)) == _clip_keys(
        epoch_batches(rows, CLASSIFY, config, plain, train=True, epoch=1))


def test_uint8_batches_train_exactly_like_float_batches_and_bf16_runs(tiny_archive):
    _, manifest = tiny_archive
    config = CRNNConfig(frame_size=32, dropout=0.0)
    rows = labelled_rows(read_manifest(manifest), "train", config.labels)[:4]
    clips = list(iter_clips(rows, CLASSIFY, config, train=False, rng=np.random.default_rng(0)))
    losses = []
    for uint8 in (False, True):
        torch.manual_seed(0)
        model = CRNN(config)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        stats = train_one_epoch(model, optimizer, iter_batches(clips, 4, uint8=uint8), "cpu", CLASSIFY, config)
        losses.append(float(stats["loss_sum"]))
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    for rnn_impl in ("torch", "reference"):
        impl_config = CRNNConfig(frame_size=32, rnn_impl=rnn_impl)
        model = CRNN(impl_config)
        optimizer = torch.optim.AdamW(model.parameters())
        stats = train_one_epoch(model, optimizer, iter_batches(clips[:4], 4, uint8=True), "cpu", CLASSIFY, impl_config, amp_dtype=torch.bfloat16)
        assert int(stats["count"]) == 4 and math.isfinite(float(stats["loss_sum"]))


# ----------------------------------------------------------------------------- evaluation report


def test_classification_summary_by_hand():
    # rows: truth, columns: prediction
    summary = evaluation.classification_summary([[8, 2, 0], [1, 6, 3], [0, 0, 0]], ("a", "b", "c"))
    assert summary["clips"] == 20 and summary["accuracy"] == pytest.approx(14 / 20)
    a, b, c = (summary["per_class"][k] for k in "abc")
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(8 / 9), pytest.approx(8 / 10), 10)
    assert (b["precision"], b["recall"]) == (pytest.approx(6 / 8), pytest.approx(6 / 10))
    assert b["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35)
    assert c == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}  # predicted 3 times, never right
    assert summary["macro_f1"] == pytest.approx((a["f1"] + b["f1"]) / 3)
    with pytest.raises(ValueError, match=r"confusion must be 2 x 2 for labels \['a', 'b'\], got shape \(3, 3\)"):
        evaluation.classification_summary([[1, 0, 0]] * 3, ("a", "b"))


HISTORY = [
    {"epoch": 0, "train_loss": 0.9, "val_loss": 0.8, "train_acc": 0.5, "val_acc": 0.55, "lr": 1e-3, "train_clips_per_s": 40.0, "resumes": 0},
    {"epoch": 1, "train_loss": 0.5, "val_loss": 0.4, "train_acc": 0.8, "val_acc": 0.85, "lr": 5e-4, "train_clips_per_s": 41.0, "resumes": 1},
    {"epoch": 2, "train_loss": 0.3, "val_loss": 0.45, "train_acc": 0.9, "val_acc": 0.8, "lr": 1e-4, "train_clips_per_s": 42.0, "resumes": 1},
]


def test_report_is_written_next_to_the_model(tmp_path):
    summary = evaluation.classification_summary([[17, 3], [0, 20]], ("left", "right"))
    report = evaluation.write_report(str(tmp_path), summary, HISTORY, {"epoch": 1}, ("left", "right"), model_id="abc123")
    for name in ("report.md", "confusion.png", "curves.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "report.md").read_text()
    assert text == report.markdown
    assert "# Evaluation of model abc123" in text and "**accuracy 0.925**" in text and "selected epoch 1 (of 3" in text
    assert "| left | 1.000 | 0.850 | 0.919 | 20 |" in text
    assert "| right | 0 | 20 |" in text  # confusion row of the true class "right"
    assert "resumed from a checkpoint 1 time(s)" in text and "![training curves](curves.png)" in text


def test_report_without_matplotlib_keeps_the_tables(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    summary = evaluation.classification_summary([[1, 0], [0, 1]], ("x", "y"))
    report = evaluation.write_report(str(tmp_path), summary, HISTORY, {"epoch": 2}, ("x", "y"))
    assert report.confusion_uri is None and not (tmp_path / "curves.png").exists()
    assert "matplotlib is not installed" in report.markdown and "| x | 1.000 |" in report.markdown


# ----------------------------------------------------------------------------- command line, GPU check


def test_cli_train_choices_match_the_library():
    from rnnimg.cli import build_parser

    train_parser = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    choices = {a.dest: tuple(a.choices) for a in train_parser._actions if a.choices}
    assert choices["backbone"] == BACKBONES
    assert choices["lr_schedule"] == LR_SCHEDULES
    args = build_parser().parse_args(["train", "m.parquet", "--out", "o", "--cpu", "--warmup-epochs", "0.5", "--loader-workers", "2"])
    assert (args.cpu, args.gpu, args.warmup_epochs, args.loader_workers) == (True, False, 0.5, 2)


def test_cli_train_refuses_bad_options_in_one_line(tiny_archive, tmp_path):
    _, manifest = tiny_archive
    for extra, needle in [
        (["--epochs", "2", "--warmup-epochs", "3"], "warmup_epochs must be in [0, epochs=2), got 3.0"),
        (["--gpu", "--cpu"], "not allowed with argument"),
    ]:
        result = subprocess.run([sys.executable, "-m", "rnnimg.cli", "train", manifest, "--out", str(tmp_path), *extra],
                                capture_output=True, text=True, timeout=120, cwd=REPO)
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.returncode == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_train_refuses_gpus_on_a_local_ray_without_any(ray_local, tiny_archive, tmp_path):
    from rnnimg.train import train

    _, manifest = tiny_archive
    with pytest.raises(ValueError, match="GPU training was asked for .* the local Ray sees no GPU"):
        train(manifest, str(tmp_path), "gpu", TrainConfig(epochs=1, use_gpu=True))
    assert not (tmp_path / "ray" / "gpu").exists()


def test_gpu_check_says_why_it_stops_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run for real")
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "no CUDA device" in result.stdout


def test_gpu_check_runs_its_measurements_on_cpu_in_smoke_mode():
    result = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu_check.py"), "--smoke"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "small CNN + LSTM(128)" in result.stdout and "inference frames/s" in result.stdout


# ----------------------------------------------------------------------------- DDP edge cases, resume


def test_a_rank_without_any_batch_steps_on_blank_batches():
    from rnnimg.train.loop import BlankBatch, at_least_one, blank_batch, exactly

    config = CRNNConfig(frame_size=32, frames_per_clip=4)
    blank = blank_batch(CLASSIFY, config)
    assert isinstance(blank, BlankBatch) and CLASSIFY.blank_target(config) == 0
    assert blank.clips.dtype == torch.uint8 and tuple(blank.clips.shape) == (1, 4, 32, 32, 3)  # (1, T, H, W, C)
    assert blank.targets.tolist() == [0]
    made = []

    def make():
        made.append(1)
        return blank

    # No batch at all: the blank one, every step; a short rank repeats its last real batch; blank is made only when needed.
    assert list(exactly([], 3, make)) == [blank] * 3 and len(made) == 1
    assert list(exactly([], 3)) == []
    assert list(exactly(iter(["a", "b"]), 4, make)) == ["a", "b", "b", "b"] and len(made) == 1
    assert list(exactly(iter("abcde"), 3, make)) == ["a", "b", "c"]
    assert list(at_least_one([], make)) == [blank] and list(at_least_one(["a"], make)) == ["a"]


def test_blank_batches_give_zero_gradient_and_add_nothing_to_the_stats():
    from rnnimg.train.loop import at_least_one, blank_batch, evaluate

    config = CRNNConfig(frame_size=32, frames_per_clip=4, dropout=0.0)
    torch.manual_seed(0)
    model = CRNN(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}  # weights and batch-norm running statistics
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    blank = blank_batch(CLASSIFY, config)
    stats = train_one_epoch(model, optimizer, [blank, blank], "cpu", CLASSIFY, config)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())  # every parameter: a zero gradient
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], msg=name)
    assert model.training
    # The stats have every key (all_reduce sums them key by key on every rank), all zero.
    assert set(stats) == {"loss_sum", "count", "confusion"}
    assert int(stats["count"]) == 0 and float(stats["loss_sum"]) == 0 and not stats["confusion"].any()
    assert CLASSIFY.summarize(stats)["clips"] == 0
    # Mixed with real batches, the metrics count the real clips only.
    real = (torch.randint(0, 255, (3, 4, 32, 32, 3), dtype=torch.uint8), torch.tensor([0, 1, 1]))
    mixed = train_one_epoch(model, optimizer, [real, blank], "cpu", CLASSIFY, config)
    assert int(mixed["count"]) == 3 and int(mixed["confusion"].sum()) == 3
    evaluated = evaluate(model, at_least_one([], lambda: blank), "cpu", CLASSIFY, config)
    assert set(evaluated) == {"loss_sum", "count", "confusion"} and int(evaluated["count"]) == 0


def _lr_after(train_config: TrainConfig, steps_per_epoch: int, steps: int) -> tuple[float, float]:
    """(scheduler lr, optimiser lr) after ``steps`` optimiser steps of an uninterrupted run."""
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, train_config, steps_per_epoch * train_config.epochs)
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
    return scheduler.get_last_lr()[0], optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
def test_resuming_with_another_configuration_continues_the_schedule_at_the_same_epoch(schedule):
    from rnnimg.train.loop import position_schedule

    old = TrainConfig(epochs=6, workers=2, batch_size=4, lr=1.0, lr_schedule=schedule, warmup_epochs=1)
    new = TrainConfig(epochs=6, workers=1, batch_size=8, lr=1.0, lr_schedule=schedule, warmup_epochs=1)
    old_steps, new_steps = 10, 4  # steps per epoch of each configuration
    for epoch in range(1, 6):
        # The run trained `epoch` epochs under the old configuration, then resumes under the new one.
        model = torch.nn.Linear(2, 2)
        optimizer, scheduler = make_optimizer(model, old, old_steps * old.epochs)
        for _ in range(epoch * old_steps):
            optimizer.step()
            scheduler.step()
        saved_optimizer = optimizer.state_dict()
        model = torch.nn.Linear(2, 2)
        optimizer, scheduler = make_optimizer(model, new, new_steps * new.epochs)
        optimizer.load_state_dict(saved_optimizer)
        position_schedule(scheduler, epoch * new_steps)
        expected = _lr_after(new, new_steps, epoch * new_steps)
        assert (scheduler.get_last_lr()[0], optimizer.param_groups[0]["lr"]) == pytest.approx(expected), epoch
        # ... and the next steps follow the uninterrupted run too.
        optimizer.step()
        scheduler.step()
        assert scheduler.get_last_lr()[0] == pytest.approx(_lr_after(new, new_steps, epoch * new_steps + 1)[0])


def test_positioning_the_schedule_equals_loading_its_state_for_an_unchanged_configuration():
    from rnnimg.train.loop import position_schedule

    config = TrainConfig(epochs=5, lr=2.0, lr_schedule="cosine", warmup_epochs=0.5)
    steps_per_epoch, epoch = 7, 3
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = make_optimizer(model, config, steps_per_epoch * config.epochs)
    for _ in range(epoch * steps_per_epoch):
        optimizer.step()
        scheduler.step()
    saved_optimizer, saved_scheduler = optimizer.state_dict(), scheduler.state_dict()
    results = []
    for how in ("load", "position"):
        optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), config, steps_per_epoch * config.epochs)
        optimizer.load_state_dict(saved_optimizer)
        if how == "load":
            scheduler.load_state_dict(saved_scheduler)
        else:
            position_schedule(scheduler, epoch * steps_per_epoch)
        results.append((scheduler.last_epoch, scheduler.get_last_lr(), optimizer.param_groups[0]["lr"]))
    assert results[0] == results[1]
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        position_schedule(scheduler, -1)


def _write_checkpoint(folder, epoch: int) -> None:
    """A checkpoint folder as the Ray wrapper writes it (every file of CHECKPOINT_FILES)."""
    from rnnimg.train.ray_trainer import HISTORY, STATE, TRAIN_CONFIG

    os.makedirs(folder)
    torch.save({"model": {"w": torch.full((2,), float(epoch))}, "epoch": epoch, "resumes": 0}, os.path.join(folder, STATE))
    for name, content in [("config.json", {"task": "classify"}), ("labels.json", ["a", "b"]), (TRAIN_CONFIG, {"workers": 2}),
                          (HISTORY, [{"epoch": e} for e in range(epoch + 1)])]:
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f)


@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_resume_falls_back_to_the_newest_complete_checkpoint_before_an_incomplete_one(where, tmp_path, request, caplog):
    from ray.train import Checkpoint

    from rnnimg import storage
    from rnnimg.train.ray_trainer import CHECKPOINT_FILES, checkpoint_epochs, restore

    local_run = tmp_path / "run"
    for epoch in range(5):
        _write_checkpoint(str(local_run / f"epoch-{epoch:04d}"), epoch)
    os.remove(local_run / "epoch-0003" / "state.pt")  # pruned by another run: what Ray hands over
    os.remove(local_run / "epoch-0002" / "history.json")  # incomplete too
    (local_run / "epoch-0001" / "notes").mkdir()  # unrelated files do not matter
    os.makedirs(local_run / "_lock")
    if where == "s3":
        run = f"{request.getfixturevalue('s3_bucket')}/runs/ray/demo"
        storage.upload_dir(str(local_run), run)
    else:
        run = str(local_run)

    def handed(epoch: int):
        fs, path = storage.resolve(storage.join(run, f"epoch-{epoch:04d}"))
        return Checkpoint(path, filesystem=fs)

    assert [e for e, _ in checkpoint_epochs(run)] == [4, 3, 2, 1, 0]
    # A complete checkpoint is used as it is.
    assert restore(handed(4), run).state["epoch"] == 4
    # Nothing handed over (Ray registers a checkpoint only when every worker reported): the newest complete one in the store.
    assert restore(None, run).state["epoch"] == 4
    assert restore(None, str(tmp_path / "empty-run")) is None
    # Incomplete: the newest complete one before it (epoch 4, written later by an orphan, is not "before").
    with caplog.at_level(logging.WARNING, logger="rnnimg.train"):
        restored = restore(handed(3), run)
    assert restored.state["epoch"] == 1 and [h["epoch"] for h in restored.history] == [0, 1]
    assert restored.folder == storage.join(run, "epoch-0001") and restored.train_config == {"workers": 2}
    assert "epoch-0003" in caplog.text and "no state.pt" in caplog.text and "resuming from the newest complete checkpoint" in caplog.text
    # A folder gone altogether, a truncated state.pt: the same.
    assert restore(handed(7), run).state["epoch"] == 4
    storage.write_bytes(storage.join(run, "epoch-0004", "state.pt"), storage.read_bytes(storage.join(run, "epoch-0004", "state.pt"))[:100])
    assert restore(handed(4), run).state["epoch"] == 1
    # Nothing complete before it: start fresh, with a warning.
    for name in CHECKPOINT_FILES[:1]:
        storage.delete(storage.join(run, "epoch-0000", name))
        storage.delete(storage.join(run, "epoch-0001", name))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnnimg.train"):
        assert restore(handed(3), run) is None
    assert "starting fresh" in caplog.text


def test_a_run_fails_at_once_or_waits_while_another_holds_the_run_folder(tmp_path, caplog):
    import threading

    from rnnimg.store_lock import LockHeld, StoreLock
    from rnnimg.train.ray_trainer import take_lock

    run = str(tmp_path / "ray" / "demo")
    first = take_lock(StoreLock(run, owner="rnnimg train demo (pid 1)"), wait=False)
    with pytest.raises(LockHeld, match=r"rnnimg train demo \(pid 1\)"):
        take_lock(StoreLock(run, owner="rnnimg train demo (pid 2)"), wait=False)
    second = StoreLock(run, owner="rnnimg train demo (pid 2)")
    waiter = threading.Thread(target=take_lock, args=(second, True), kwargs={"poll_s": 0.05}, daemon=True)
    with caplog.at_level(logging.WARNING, logger="rnnimg.train"):
        waiter.start()
        time.sleep(0.5)
        assert waiter.is_alive()  # still waiting
        first.release()
        waiter.join(timeout=30)
    assert not waiter.is_alive()
    second.check()  # holds it now
    assert caplog.text.count("waiting for the run folder to be free") == 1  # logged once, not every poll
    second.release()
