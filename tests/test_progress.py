"""Progress on stderr: the rates and ETA, a bar on a terminal, one plain line per epoch / committed shard
elsewhere, and the verbose switch that brings Ray's own output back."""

from __future__ import annotations

import io
import logging
import os

import pytest

from rnnimg import progress
from rnnimg.progress import Counter, Display, EpochProgress, LabelProgress, bar, eta_seconds, format_duration, rate


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def plain(clock=None) -> Display:
    return Display(stream=io.StringIO(), clock=clock or FakeClock())


def lines(display: Display) -> list[str]:
    return display.stream.getvalue().splitlines()


def test_rates_eta_and_durations():
    assert rate(300, 60.0) == 5.0
    assert rate(10, 0.0) == 0.0
    assert eta_seconds(25, 100, 50.0) == 150.0  # 2 s per unit, 75 left
    assert eta_seconds(100, 100, 50.0) == 0.0
    assert eta_seconds(120, 100, 50.0) == 0.0  # never negative
    assert eta_seconds(0, 100, 50.0) is None  # no pace yet
    assert eta_seconds(5, None, 50.0) is None  # no total
    assert format_duration(0) == "0:00"
    assert format_duration(42.4) == "0:42"
    assert format_duration(725) == "12:05"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(None) == "?"
    assert format_duration(float("inf")) == "?"
    assert bar(0.0, 10) == "[          ]"
    assert bar(0.5, 10) == "[====>     ]"
    assert bar(1.0, 10) == "[==========]"
    assert bar(7.0, 10) == bar(1.0, 10) and bar(-1, 10) == bar(0, 10)


def test_label_progress_from_coordinators_totals_writes_a_line_when_shards_commit_and_never_goes_back():
    clock = FakeClock()
    display = plain(clock)
    shown = LabelProgress(videos=5, shards=3, display=display)
    clock.now += 1.0
    shown.update(videos_done=3, clips_done=6, shards_done=0, videos_committed=0, clips_committed=0)
    assert lines(display) == []  # videos alone write nothing
    clock.now += 2.0
    shown.update(videos_done=4, clips_done=8, shards_done=2, videos_committed=4, clips_committed=8)
    # A restarted coordinator counts from zero again: the totals shown stay.
    shown.update(videos_done=1, clips_done=2, shards_done=1, videos_committed=1, clips_committed=2)
    clock.now += 1.0
    shown.update(videos_done=5, clips_done=10, shards_done=3, videos_committed=5, clips_committed=10)
    assert lines(display) == [
        "label shard 2/3 committed: 4 videos; 4/5 labelled, 8 clips, 2.7 clips/s, ETA 0:01",  # 0.75 s left
        "label shard 3/3 committed: 5 videos; 5/5 labelled, 10 clips, 2.5 clips/s, ETA 0:00",
    ]


def test_label_progress_off_a_terminal_is_one_line_per_committed_shard():
    clock = FakeClock()
    display = plain(clock)
    assert not display.terminal
    shown = LabelProgress(videos=5, shards=2, display=display)
    for clips in (2, 2, 2):
        clock.now += 1.0
        shown.video_done(clips)
    assert lines(display) == []  # videos alone write nothing
    shown.shard_committed(videos=2, clips=4)
    clock.now += 2.0
    shown.video_done(3)
    shown.video_done(1)
    shown.shard_committed(videos=3, clips=6)
    shown.close()
    # Videos committed so far; the labelling: 6 clips in 3 s, 3 of 5 videos in 3 s -> 2 s left; then 10 clips in 5 s, all done.
    assert lines(display) == [
        "label shard 1/2 committed: 2 videos; 3/5 labelled, 6 clips, 2.0 clips/s, ETA 0:02",
        "label shard 2/2 committed: 5 videos; 5/5 labelled, 10 clips, 2.0 clips/s, ETA 0:00",
    ]
    assert (shown.videos_committed, shown.clips_committed) == (5, 10)


def test_epoch_progress_off_a_terminal_is_one_line_per_epoch():
    clock = FakeClock()
    display = plain(clock)
    shown = EpochProgress(epochs=4, metric="val_acc", display=display)
    for epoch in range(2):
        clock.now += 10.0
        shown.epoch({"epoch": epoch, "train_loss": 0.5 / (epoch + 1), "train_acc": 0.75, "val_loss": 0.625, "val_acc": 0.8,
                     "train_clips_per_s": 143.4, "lr": 0.001, "val_confusion": [[1]]})
        shown.tick()  # a terminal's clock; nothing here
    shown.close()
    assert lines(display) == [
        "epoch 1/4: loss 0.500 acc 0.750, val loss 0.625 acc 0.800; 143 clips/s, ETA 0:30",
        "epoch 2/4: loss 0.250 acc 0.750, val loss 0.625 acc 0.800; 143 clips/s, ETA 0:20",
    ]


def test_a_resumed_run_counts_its_eta_from_its_first_epoch():
    clock = FakeClock()
    display = plain(clock)
    shown = EpochProgress(epochs=10, metric="val_iou", display=display)
    clock.now += 5.0
    shown.epoch({"epoch": 7, "train_loss": 0.1, "val_loss": 0.2, "val_iou": 0.5})  # resumed at epoch 7: 3 to do, 1 done in 5 s
    assert lines(display) == ["epoch 8/10: loss 0.100, val loss 0.200 iou 0.500, ETA 0:10"]


def test_on_a_terminal_the_bar_is_redrawn_in_place_and_ends_with_one_line():
    clock = FakeClock()
    display = Display(stream=Terminal(), clock=clock)
    assert display.terminal
    shown = LabelProgress(videos=4, shards=1, display=display)
    for _ in range(4):
        clock.now += 1.0  # > REDRAW_S: every video redraws
        shown.video_done(2)
    shown.shard_committed(videos=4, clips=8)
    shown.close()
    text = display.stream.getvalue()
    assert text.count("\n") == 1 and text.endswith("\n")  # one line left on screen
    frames = text.split("\r")[1:]
    assert len(frames) >= 4 and "1/4 videos" in frames[0] and "ETA 0:03" in frames[0]
    assert frames[-1].startswith("label 4/4 videos, 8 clips in 0:04")


def test_a_terminal_bar_is_redrawn_at_most_every_redraw_interval():
    clock = FakeClock()
    display = Display(stream=Terminal(), clock=clock)
    shown = Counter("synth", 1000, "videos", display=display)
    for _ in range(1000):
        clock.now += 0.001  # 1 s in all: about 1 / REDRAW_S redraws, not 1000
        shown.advance()
    assert display.stream.getvalue().count("\r") <= 1 / progress.REDRAW_S + 1


def test_counter_off_a_terminal_writes_a_line_per_interval_and_one_at_the_end():
    clock = FakeClock()
    display = plain(clock)
    shown = Counter("synth", 100, "videos", display=display)
    for _ in range(100):
        clock.now += 1.0  # 100 s: lines at 30, 60, 90 s
        shown.advance()
    shown.close()
    written = lines(display)
    assert len(written) == 4
    assert written[0].startswith("synth [") and "30/100 videos" in written[0] and "ETA 1:10" in written[0]
    assert written[-1] == "synth 100/100 videos in 1:40  (1.0 videos/s)"


def test_verbose_turns_terminal_bars_into_plain_lines(monkeypatch):
    from rnnimg import runtime

    monkeypatch.setenv(runtime.VERBOSE_ENV, "0")
    assert Display(stream=Terminal()).terminal and runtime.ray_train_log_level() == "WARNING"
    runtime.set_verbose(True)
    assert runtime.verbose() and not Display(stream=Terminal()).terminal and runtime.ray_train_log_level() == "INFO"


@pytest.mark.parametrize("argv, verbose", [(["train", "m.parquet", "--out", "x"], False), (["-v", "train", "m.parquet", "--out", "x"], True),
                                           (["label", "v", "--model", "m", "--out", "o", "--verbose"], True)])
def test_the_cli_flag_reaches_the_logging_config(monkeypatch, argv, verbose):
    from rnnimg import runtime
    from rnnimg.cli import build_parser, configure_output

    monkeypatch.delenv(runtime.VERBOSE_ENV, raising=False)
    args = build_parser().parse_args(argv)
    configure_output(args.verbose)
    assert runtime.verbose() is verbose
    assert runtime.ray_train_log_level() == ("INFO" if verbose else "WARNING")


def test_ray_data_console_shows_errors_only_unless_verbose(monkeypatch):
    """Ray Data's own console handler: its info lines and warnings only with -v; errors always."""
    import ray.data  # noqa: F401 - configures the ray.data logger and its console handler

    from rnnimg import runtime

    logger = logging.getLogger("ray.data")
    console = [h for h in logger.handlers if type(h).__name__ == "PlainRayHandler"]
    assert console, logger.handlers

    def shown(level: int) -> bool:
        record = logger.makeRecord("ray.data.test", level, __file__, 1, "a line", (), None)
        return all(h.filter(record) for h in console)

    monkeypatch.delenv("RAY_DATA_DISABLE_PROGRESS_BARS", raising=False)
    context = ray.data.DataContext.get_current()
    monkeypatch.setattr(context, "enable_progress_bars", context.enable_progress_bars)
    try:
        monkeypatch.setenv(runtime.VERBOSE_ENV, "0")
        runtime.quiet_ray_data()
        assert not shown(logging.INFO) and not shown(logging.WARNING) and shown(logging.ERROR)
        assert context.enable_progress_bars is False
        monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
        runtime.quiet_ray_data()
        assert shown(logging.INFO) and shown(logging.WARNING) and shown(logging.ERROR)
        assert context.enable_progress_bars is True
    finally:
        monkeypatch.setenv(runtime.VERBOSE_ENV, "1")
        runtime.quiet_ray_data()  # leave Ray Data's console as it was


def test_commit_stream_writes_a_line_per_committed_shard(tiny_archive, tmp_path):
    """The label job's driver loop: two shards of two videos -> two lines, with the videos and clips counted."""
    import numpy as np

    from rnnimg import storage, tasks
    from rnnimg.label import commit_stream, stage_parts
    from rnnimg.manifest import VideoRow
    from rnnimg.store_lock import StoreLock
    from rnnimg.video.clips import ClipSpec
    from tests.test_label import _predicted_batches

    root, _ = tiny_archive
    videos = sorted(f.uri for f in storage.list_files(os.path.join(root, "videos", "train")))[:4]
    batches = _predicted_batches(videos, ClipSpec().to_dict(), batch_size=4, range_seconds=600.0)
    out = str(tmp_path / "out")
    for batch in batches:  # videos 0, 1 in shard 0; 2, 3 in shard 1
        batch["shard"] = np.array([videos.index(str(u)) // 2 for u in batch["video_uri"]], np.int64)
    records = [stage_parts(b, out, ["label", "score"]) for b in batches]
    display = plain()
    shown = LabelProgress(videos=4, shards=2, display=display)
    with StoreLock(out, "test") as lock:
        committed = commit_stream(records, out, {"run_id": "r", "model_id": "m"}, tasks.get("classify"),
                                  [[VideoRow(v) for v in videos[:2]], [VideoRow(v) for v in videos[2:]]], [0, 1], 0.0, lock,
                                  progress=shown)
    assert sorted(c["shard"] for c in committed) == [0, 1]
    written = lines(display)
    assert len(written) == 2, written
    assert written[0].startswith("label shard 1/2 committed: 2 videos; ")
    assert written[1].startswith("label shard 2/2 committed: 4 videos; 4/4 labelled, 8 clips, ")
    assert (shown.videos_done, shown.clips_done, shown.shards_done, shown.videos_committed) == (4, 8, 2, 4)


@pytest.mark.ray
def test_epochs_reach_the_driver_from_ray_trains_callback(ray_local):
    """What Ray Train's controller calls after each report reaches the display on the driver, one line per epoch."""
    from rnnimg.train.ray_trainer import _show_epochs

    display = plain()
    shown = EpochProgress(epochs=2, display=display)
    with _show_epochs(shown, poll_s=0.05) as callback:
        for epoch in range(2):  # as the controller does: one dict per rank
            metrics = {"epoch": epoch, "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0, "val_acc": 0.5, "train_clips_per_s": 10.0}
            callback.after_report(run_context=None, metrics=[metrics, dict(metrics)], checkpoint=None)
    written = lines(display)
    assert [w.split(":")[0] for w in written] == ["epoch 1/2", "epoch 2/2"], written


def test_a_quiet_worker_console_keeps_warnings_and_its_log_file_everything(tmp_path):
    """Ray Train workers: INFO (the per-rank report lines) off the console unless verbose; the file handler untouched."""
    from rnnimg.runtime import quiet_worker_console

    logger = logging.getLogger("rnnimg-test-worker")
    console, logfile = logging.StreamHandler(io.StringIO()), logging.FileHandler(tmp_path / "worker.log")
    logger.handlers[:] = [console, logfile]
    try:
        quiet_worker_console(False, logger)
        assert console.level == logging.WARNING and logfile.level == logging.NOTSET
        quiet_worker_console(True, logger)
        assert console.level == logging.NOTSET
    finally:
        logger.handlers[:] = []
        logfile.close()


def test_the_training_eta_counts_down_between_epochs():
    clock = FakeClock()
    display = Display(stream=Terminal(), clock=clock)
    shown = EpochProgress(epochs=3, display=display)
    clock.now += 20.0
    shown.epoch({"epoch": 0, "train_loss": 1.0, "val_loss": 1.0})  # 20 s per epoch: 40 s left
    assert shown.eta() == 40.0
    clock.now += 15.0
    shown.tick()
    assert shown.eta() == 25.0 and display.stream.getvalue().endswith("ETA 0:25\x1b[K")
    clock.now += 60.0
    assert shown.eta() == 0.0  # late: never below 0


def test_quiet_ray_data_holds_back_only_ray_datas_records():
    # Ray Data's console handler can be shared (pytest's capture handler, an application's root handler):
    # quiet mode must not swallow other loggers' warnings through it.
    import logging

    from rnnimg.runtime import _ErrorsOnly

    only = _ErrorsOnly()

    def record(name: str, level: int) -> logging.LogRecord:
        return logging.LogRecord(name, level, __file__, 1, "message", None, None)

    assert not only.filter(record("ray.data", logging.WARNING))
    assert not only.filter(record("ray.data._internal.execution", logging.INFO))
    assert only.filter(record("ray.data._internal.execution", logging.ERROR))
    assert only.filter(record("rnnimg.manifest", logging.WARNING))
    assert only.filter(record("ray.database_tool", logging.INFO))  # not Ray Data
