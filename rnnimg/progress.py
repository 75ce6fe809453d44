"""What a long command shows while it runs: a bar redrawn in place on a terminal, plain lines elsewhere.

    rnnimg train OUT/manifest.parquet --out runs/              # on a terminal: a bar of epochs
    rnnimg train OUT/manifest.parquet --out runs/ 2> train.log # a file: one line per epoch

One display per long phase, all on stderr (stdout stays the command's JSON summary):
``Counter`` (synth: files written), ``EpochProgress`` (train: epochs with loss, accuracy and
clips per second, as the run reports them) and ``LabelProgress`` (label: videos and clips done,
clips per second, ETA; off a terminal one line per committed shard). With ``rnnimg -v``
(``rnnimg.runtime.verbose()``) Ray's own logs and progress bars are back on the same streams,
so the displays write plain lines then, never a bar that Ray's lines would cut through.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, TextIO

BAR_WIDTH = 20  # characters of the bar itself
REDRAW_S = 0.2  # a bar on a terminal is redrawn at most this often
PLAIN_EVERY_S = 30.0  # off a terminal, a Counter writes a line at most this often (and one at the end)


def rate(count: float, elapsed_s: float) -> float:
    """``count`` per second over ``elapsed_s``; 0 before any time has passed."""
    return count / elapsed_s if elapsed_s > 0 else 0.0


def eta_seconds(done: float, total: float | None, elapsed_s: float) -> float | None:
    """Seconds left at the pace so far, ``elapsed_s / done * (total - done)``.

    Returns:
        None while nothing is done yet or without a total (no pace to go by); 0 once done >= total.
    """
    if total is None or done <= 0 or elapsed_s <= 0:
        return None
    return max(0.0, elapsed_s / done * (total - done))


def format_duration(seconds: float | None) -> str:
    """``42`` -> ``0:42``, ``3725`` -> ``1:02:05``; None -> ``?``."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    whole = int(round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """``[=====>    ]``: ``fraction`` (clipped to [0, 1]) of ``width`` characters filled."""
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    head = ">" if 0 < filled < width else ""
    return "[" + "=" * (filled - len(head)) + head + " " * (width - filled) + "]"


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty; a closed stream
        return False


class Display:
    """One line of progress on ``stream`` (default stderr).

    On a terminal (and not verbose) ``draw`` redraws the line in place, at most every
    ``REDRAW_S``; elsewhere ``draw`` does nothing and ``line`` writes a plain line.

    Args:
        stream: where to write (default: ``sys.stderr`` at the time of each write).
        terminal: redraw in place; default: ``stream`` is a terminal and ``rnnimg.runtime.verbose()`` is off.
        clock: seconds, monotonic (tests pass a fake one).
    """

    def __init__(self, stream: TextIO | None = None, terminal: bool | None = None, clock: Callable[[], float] = time.monotonic):
        from rnnimg.runtime import verbose

        self._stream = stream
        self.terminal = (_is_terminal(self.stream) and not verbose()) if terminal is None else terminal
        self.clock = clock
        self.started = clock()
        self._drawn_at = -math.inf
        self._shown = ""  # what the terminal line shows now

    @property
    def stream(self) -> TextIO:
        return self._stream if self._stream is not None else sys.stderr

    def elapsed(self) -> float:
        return self.clock() - self.started

    def draw(self, text: str, force: bool = False) -> None:
        """Show ``text`` as the current line (terminal only; rate-limited unless ``force``)."""
        if not self.terminal:
            return
        now = self.clock()
        if not force and now - self._drawn_at < REDRAW_S:
            return
        self._drawn_at = now
        self.stream.write("\r" + text + "\x1b[K")  # \x1b[K: clear what a longer previous line left
        self.stream.flush()
        self._shown = text

    def line(self, text: str) -> None:
        """Write ``text`` as a line of its own (on a terminal: above the current bar, which is drawn again)."""
        if self.terminal and self._shown:
            self.stream.write("\r\x1b[K" + text + "\n" + self._shown)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self, text: str) -> None:
        """The final state: on a terminal the bar stays as ``text``, elsewhere ``text`` is a line."""
        if self.terminal:
            self.draw(text, force=True)
            self.stream.write("\n")
            self.stream.flush()
            self._shown = ""
        else:
            self.line(text)


class Counter:
    """Items of a known total done one by one (``rnnimg synth``: files written).

    Off a terminal it writes a line at most every ``PLAIN_EVERY_S`` and one at the end.
    """

    def __init__(self, title: str, total: int, unit: str, display: Display | None = None):
        self.title, self.total, self.unit = title, total, unit
        self.display = display or Display()
        self.done = 0
        self._line_at = self.display.started

    def text(self) -> str:
        elapsed = self.display.elapsed()
        fraction = self.done / self.total if self.total else 1.0
        return (f"{self.title} {bar(fraction)} {self.done}/{self.total} {self.unit}  "
                f"{rate(self.done, elapsed):.1f} {self.unit}/s  ETA {format_duration(eta_seconds(self.done, self.total, elapsed))}")

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self.display.terminal:
            self.display.draw(self.text())
        elif self.display.clock() - self._line_at >= PLAIN_EVERY_S and self.done < self.total:
            self._line_at = self.display.clock()
            self.display.line(self.text())

    def close(self) -> None:
        elapsed = self.display.elapsed()
        self.display.close(f"{self.title} {self.done}/{self.total} {self.unit} in {format_duration(elapsed)}  "
                           f"({rate(self.done, elapsed):.1f} {self.unit}/s)")


class EpochProgress:
    """Training epochs as the run reports them (``rnnimg train``): loss, the task's metric, clips per second.

    ``epoch(metrics)`` takes one epoch's reported metrics (``train_loss``, ``val_loss``,
    ``train_<m>`` / ``val_<m>`` for the selection metric ``val_<m>``, ``train_clips_per_s``,
    ``epoch``); off a terminal each is one line. ``tick()`` redraws the elapsed time on a terminal.

    Args:
        epochs: the run's last epoch + 1 (a resumed run reports from a later epoch on).
        metric: the task's selection metric, e.g. ``val_acc``.
    """

    def __init__(self, epochs: int, metric: str = "val_acc", display: Display | None = None):
        self.epochs, self.metric = epochs, metric
        self.display = display or Display()
        self.first_epoch: int | None = None  # the first epoch this process saw (a resume starts later)
        self.last: dict | None = None
        self._eta: tuple[float | None, float] = (None, 0.0)  # (ETA at the last report, clock then): it counts down between reports

    def summary(self, metrics: dict) -> str:
        """``loss 0.212 acc 0.947, val loss 0.232 acc 0.900; 143 clips/s``: what is reported of an epoch."""
        name = self.metric.removeprefix("val_")
        sides = []
        for prefix, label in (("train", ""), ("val", "val ")):
            parts = [f"{key} {metrics[f'{prefix}_{key}']:.3f}" for key in ("loss", name)
                     if isinstance(metrics.get(f"{prefix}_{key}"), (int, float))]
            if parts:
                sides.append(label + " ".join(parts))
        text = ", ".join(sides)
        if isinstance(metrics.get("train_clips_per_s"), (int, float)):
            text += f"; {metrics['train_clips_per_s']:.0f} clips/s"
        return text

    def eta(self) -> float | None:
        """Seconds left: at the last report, the pace so far (epochs done by this process); since then, counting down."""
        eta, at = self._eta
        return None if eta is None else max(0.0, eta - (self.display.clock() - at))

    def text(self) -> str:
        if self.last is None:
            return f"train {bar(0.0)} epoch 0/{self.epochs}  {format_duration(self.display.elapsed())}"
        epoch = int(self.last["epoch"]) + 1
        return (f"train {bar(epoch / self.epochs)} epoch {epoch}/{self.epochs}: {self.summary(self.last)}, "
                f"ETA {format_duration(self.eta())}")

    def epoch(self, metrics: dict) -> None:
        epoch = int(metrics.get("epoch", 0))
        if self.first_epoch is None:
            self.first_epoch = epoch
        self.last = dict(metrics)
        self._eta = (eta_seconds(epoch + 1 - self.first_epoch, self.epochs - self.first_epoch, self.display.elapsed()), self.display.clock())
        if self.display.terminal:
            self.display.draw(self.text(), force=True)
        else:
            self.display.line(f"epoch {epoch + 1}/{self.epochs}: {self.summary(metrics)}, ETA {format_duration(self.eta())}")

    def tick(self) -> None:
        self.display.draw(self.text())

    def close(self) -> None:
        if self.display.terminal:
            self.display.close(self.text().rsplit(", ETA", 1)[0] + f" in {format_duration(self.display.elapsed())}")


class LabelProgress:
    """Videos and clips labelled (``rnnimg label``), ETA from the videos left.

    ``video_done(clips)`` as each video's clips are all in (a terminal redraws the bar);
    ``shard_committed(videos, clips)`` as each shard's tables are written (off a terminal: one
    line with the videos committed so far, then the videos and clips labelled, their pace and ETA).

    Args:
        videos: videos this invocation labels (the shards already committed are not counted).
        shards: shards this invocation commits.
    """

    def __init__(self, videos: int, shards: int, display: Display | None = None):
        self.videos, self.shards = videos, shards
        self.display = display or Display()
        self.videos_done = self.clips_done = 0  # labelled: every clip of the video is in
        self.shards_done = self.videos_committed = self.clips_committed = 0

    def _pace(self) -> str:
        elapsed = self.display.elapsed()
        return f"{rate(self.clips_done, elapsed):.1f} clips/s, ETA {format_duration(eta_seconds(self.videos_done, self.videos, elapsed))}"

    def text(self) -> str:
        fraction = self.videos_done / self.videos if self.videos else 1.0
        return f"label {bar(fraction)} {self.videos_done}/{self.videos} videos, {self.clips_done} clips, {self._pace()}"

    def video_done(self, clips: int) -> None:
        self.videos_done += 1
        self.clips_done += clips
        self.display.draw(self.text())

    def shard_committed(self, videos: int, clips: int) -> None:
        self.shards_done += 1
        self.videos_committed += videos
        self.clips_committed += clips
        if self.display.terminal:
            self.display.draw(self.text())
            return
        # Commits trail the labelling (they run on the workers): what is committed, then how far the labelling is.
        self.display.line(f"label shard {self.shards_done}/{self.shards} committed: {self.videos_committed} videos; "
                          f"{self.videos_done}/{self.videos} labelled, {self.clips_done} clips, {self._pace()}")

    def update(self, videos_done: int, clips_done: int, shards_done: int, videos_committed: int, clips_committed: int) -> None:
        """Counts kept elsewhere (the label job's coordinators), as totals so far: redraws, or off a
        terminal writes a line when more shards are committed. A total that went down (a coordinator
        restarted and counts again) is ignored until it passes the one shown."""
        if videos_done > self.videos_done:
            self.videos_done, self.clips_done = min(videos_done, self.videos), max(self.clips_done, clips_done)
            self.display.draw(self.text())
        if shards_done > self.shards_done:
            self.shards_done = min(shards_done, self.shards)
            self.videos_committed, self.clips_committed = max(self.videos_committed, videos_committed), max(self.clips_committed, clips_committed)
            if self.display.terminal:
                self.display.draw(self.text())
                return
            self.display.line(f"label shard {self.shards_done}/{self.shards} committed: {self.videos_committed} videos; "
                              f"{self.videos_done}/{self.videos} labelled, {self.clips_done} clips, {self._pace()}")

    def close(self) -> None:
        if self.display.terminal:
            elapsed = self.display.elapsed()
            self.display.close(f"label {self.videos_done}/{self.videos} videos, {self.clips_done} clips in {format_duration(elapsed)}  "
                               f"({rate(self.clips_done, elapsed):.1f} clips/s)")
