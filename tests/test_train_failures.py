"""Training survives real process deaths, and runs of one name never overlap.

1. A Ray Train worker killed with SIGKILL in the middle of an epoch: Ray Train replaces the
   worker group, which resumes from the last checkpoint, and the run ends with every epoch.
2. The whole ``rnnimg train`` command killed with SIGKILL (driver, its local Ray, its workers):
   rerunning the same command resumes at the epoch after the last checkpoint, not at 0; rerun
   at once, it finds the lock free (its holder is gone) and the killed run's processes end in seconds.
3. Two ``rnnimg train`` of one ``--out`` and ``--name`` at once: the second stops at once,
   naming the first, which finishes.
4. A DDP rank whose training videos all fail to decode steps on blank batches instead of
   leaving the others waiting in an all-reduce forever.

Nothing in the product knows about these tests: the processes are found in /proc among this
test's own descendants and killed for real (Linux). The history's ``resumes`` count (how many
times the run had restarted from a checkpoint when an epoch was trained) shows the resume.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rnnimg import storage

pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="finds processes in /proc")]

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for_checkpoint(run_dir: str, epoch: int, timeout_s: float, alive=lambda: True) -> None:
    """Wait until Ray Train has registered the checkpoint of ``epoch`` (its snapshot names it)."""
    snapshot = os.path.join(run_dir, "checkpoint_manager_snapshot.json")
    wanted = f"epoch-{epoch:04d}"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if os.path.exists(snapshot):
            with open(snapshot) as f:
                if wanted in f.read():
                    return
        assert alive(), "training ended before the checkpoint appeared"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {wanted} registered in {run_dir} after {timeout_s} s")


def registered(run_dir: str, epoch: int) -> bool:
    with open(os.path.join(run_dir, "checkpoint_manager_snapshot.json")) as f:
        return f"epoch-{epoch:04d}" in f.read()


def processes() -> dict[int, tuple[int, str]]:
    """Every live process: pid -> (parent pid, command line)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # it ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state, ppid, ...
        if fields[0] != "Z":
            table[int(entry)] = (int(fields[1]), cmdline)
    return table


def descendants(root: int) -> dict[int, str]:
    """pid -> command line of every live descendant of ``root``."""
    table = processes()
    found, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, cmdline) in table.items():
            if ppid == parent and pid not in found:
                found[pid] = cmdline
                frontier.append(pid)
    return found


def alive(pid: int) -> bool:
    return pid in processes()


def kill_all(pids) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


@pytest.mark.recovery
def test_a_worker_killed_mid_epoch_is_replaced_and_training_resumes_from_the_last_checkpoint(ray_local, tiny_archive, tmp_path):
    from rnnimg.train import TrainConfig, train

    _, manifest = tiny_archive
    out, name = str(tmp_path / "out"), "killed-worker"
    run_dir = os.path.join(out, "ray", name)
    # Decoding in a DataLoader process per worker, as on a GPU cluster: its processes die with their worker.
    config = TrainConfig(epochs=2, workers=2, batch_size=2, clips_per_video=2, loader_workers=1, cpus_per_worker=1, max_failures=2,
                         use_gpu=False)
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = train(manifest, out, name, config)
        except BaseException as err:  # noqa: BLE001 - handed to the test thread
            outcome["error"] = err

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    wait_for_checkpoint(run_dir, 0, timeout_s=240, alive=thread.is_alive)
    table = processes()
    named = {pid for pid, cmdline in descendants(os.getpid()).items() if "RayTrainWorker" in cmdline}
    workers = [pid for pid in named if table[pid][0] not in named]  # not the DataLoader processes forked from them
    assert len(workers) == 2, workers
    victim = max(workers)
    its_loaders = [pid for pid in named if table[pid][0] == victim]
    os.kill(victim, signal.SIGKILL)
    killed_during_epoch_1 = not registered(run_dir, 1)
    thread.join(timeout=400)
    assert not thread.is_alive(), "training did not finish after the worker was killed"
    assert "error" not in outcome, outcome.get("error")
    assert not alive(victim) and not any(alive(pid) for pid in its_loaders)
    assert killed_during_epoch_1

    result = outcome["result"]
    assert [h["epoch"] for h in result.history] == [0, 1]
    # Epoch 0 was trained once, before the kill; epoch 1 after one restart from its checkpoint.
    assert [h["resumes"] for h in result.history] == [0, 1]
    metrics = storage.read_json(os.path.join(result.model_uri, "metrics.json"))
    assert [h["resumes"] for h in metrics["history"]] == [0, 1]
    assert "resumed from a checkpoint 1 time(s)" in result.report_markdown


def processes_of(ray_tmp: str) -> list[int]:
    """Processes whose command line names this test's Ray temp dir (its GCS, raylet, agents)."""
    return [pid for pid, (_, cmdline) in processes().items() if ray_tmp in cmdline]


@pytest.mark.recovery
def test_killing_the_whole_train_command_then_rerunning_it_resumes_at_the_next_epoch(ray_local, tiny_archive, tmp_path):
    from tests.test_end_to_end_s3 import run_cli

    _, manifest = tiny_archive
    out, name = str(tmp_path / "out"), "killed-run"
    run_dir = os.path.join(out, "ray", name)
    args = ["train", manifest, "--out", out, "--name", name, "--epochs", "2", "--workers", "1", "--batch-size", "2",
            "--clips-per-video", "2", "--cpu"]
    # The first run is a command of its own, with a Ray of its own: own temp dir (short: Unix
    # socket paths are limited), no RAY_ADDRESS, so that it neither joins nor disturbs the
    # session's in-process Ray.
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO, RAY_USAGE_STATS_ENABLED="0")
    try:
        with open(tmp_path / "first.log", "w") as log:
            first = subprocess.Popen([sys.executable, "-m", "rnnimg.cli", *args], env=env, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, cwd=str(tmp_path))
        tree: list[int] = []
        try:
            wait_for_checkpoint(run_dir, 0, timeout_s=240, alive=lambda: first.poll() is None)
            tree = [first.pid, *descendants(first.pid)]
            os.killpg(first.pid, signal.SIGKILL)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
            kill_all(tree + processes_of(ray_tmp))  # Ray's own processes may have left the process group
        assert first.returncode == -signal.SIGKILL
        assert not os.path.exists(os.path.join(out, "model")), "the killed run must not have finished"
        assert registered(run_dir, 0) and not registered(run_dir, 1), "the run must be killed between its two checkpoints"
    finally:
        kill_all(processes_of(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)

    # The same command again (on another Ray: the session's), as after a crash of the machine.
    summary = run_cli(*args)
    history = storage.read_json(os.path.join(summary["model"], "metrics.json"))["history"]
    assert [h["epoch"] for h in history] == [0, 1]
    # Epoch 0, checkpointed before the kill, was not trained again: the rerun started at epoch 1.
    assert [h["resumes"] for h in history] == [0, 1]
    assert summary["best"]["epoch"] in (0, 1) and os.path.exists(summary["report"])


# ----------------------------------------------------------------------------- one run per folder, runs as commands


def train_command(manifest: str, out: str, name: str, epochs: int) -> list[str]:
    return [sys.executable, "-m", "rnnimg.cli", "train", manifest, "--out", out, "--name", name, "--epochs", str(epochs),
            "--workers", "1", "--batch-size", "2", "--clips-per-video", "2", "--cpu"]


def command_env(ray_tmp: str) -> dict:
    """A command's environment with a Ray of its own (own temp dir, no RAY_ADDRESS): it neither joins nor
    disturbs the session's in-process Ray nor another command's."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, PYTHONPATH=REPO, RAY_USAGE_STATS_ENABLED="0")
    return env


def start_command(command: list[str], ray_tmp: str, log_path, cwd) -> subprocess.Popen:
    """Start a command in a session of its own: ``os.killpg`` kills its whole process group."""
    with open(log_path, "w") as log:
        return subprocess.Popen(command, env=command_env(ray_tmp), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=str(cwd))


def wait_until_gone(pids, timeout_s: float) -> float:
    """Seconds until none of ``pids`` is alive (raises after ``timeout_s``)."""
    started = time.monotonic()
    while any(alive(pid) for pid in pids):
        if time.monotonic() - started > timeout_s:
            left = {pid: cmd for pid, (_, cmd) in processes().items() if pid in set(pids)}
            raise AssertionError(f"processes of the killed run still alive after {timeout_s} s: {left}")
        time.sleep(0.1)
    return time.monotonic() - started


def model_history(out: str) -> list[dict]:
    return storage.read_json(os.path.join(out, "model", "metrics.json"))["history"]


@pytest.mark.recovery
@pytest.mark.timeout(480)
def test_a_second_run_of_the_same_name_stops_at_once_naming_the_first_which_finishes(tiny_archive, tmp_path):
    _, manifest = tiny_archive
    out, name = str(tmp_path / "out"), "same"
    run_dir = os.path.join(out, "ray", name)
    command = train_command(manifest, out, name, epochs=3)
    ray_tmps = [tempfile.mkdtemp(prefix="rt-", dir="/tmp") for _ in range(2)]
    first = start_command(command, ray_tmps[0], tmp_path / "first.log", tmp_path)
    try:
        # The first holds the run folder's lock once its folder has a lock file (rnnimg.store_lock).
        deadline = time.monotonic() + 240
        while not (os.path.isdir(os.path.join(run_dir, "_lock")) and os.listdir(os.path.join(run_dir, "_lock"))):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        started = time.monotonic()
        second = subprocess.run(command, env=command_env(ray_tmps[1]), capture_output=True, text=True, timeout=240, cwd=str(tmp_path))
        second_s = time.monotonic() - started
        first_running = first.poll() is None
        first.wait(timeout=400)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
        for ray_tmp in ray_tmps:
            kill_all(processes_of(ray_tmp))
            shutil.rmtree(ray_tmp, ignore_errors=True)
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert second.returncode == 2, second.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("rnnimg train: error: "), second.stderr[-3000:]
    assert f"rnnimg train {name} (pid {first.pid})" in lines[0], lines[0]
    assert first_running, f"the first run had ended before the second stopped ({second_s:.1f} s): the test proves nothing"
    assert second_s < 30, f"the second run took {second_s:.1f} s to stop: the lock must be checked before Ray starts"
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    history = model_history(out)
    assert [h["epoch"] for h in history] == [0, 1, 2] and [h["resumes"] for h in history] == [0, 0, 0]
    print(f"the second run stopped after {second_s:.1f} s (interpreter and imports included): {lines[0]}")


@pytest.mark.recovery
@pytest.mark.timeout(540)
def test_a_killed_run_rerun_at_once_resumes_and_its_processes_end_within_seconds(tiny_archive, tmp_path):
    _, manifest = tiny_archive
    out, name = str(tmp_path / "out"), "killed-rerun"
    run_dir = os.path.join(out, "ray", name)
    command = train_command(manifest, out, name, epochs=3)
    ray_tmps = [tempfile.mkdtemp(prefix="rt-", dir="/tmp") for _ in range(2)]
    first = start_command(command, ray_tmps[0], tmp_path / "first.log", tmp_path)
    rerun, tree = None, []
    try:
        wait_for_checkpoint(run_dir, 0, timeout_s=240, alive=lambda: first.poll() is None)
        # Everything the run started: its local Ray (GCS, raylet, agents) and Ray's workers (sessions of their own).
        tree = sorted({first.pid, *descendants(first.pid), *processes_of(ray_tmps[0])})
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        # At once: no cleanup in between, whatever the killed run left running races the rerun.
        rerun = start_command(command, ray_tmps[1], tmp_path / "rerun.log", tmp_path)
        gone_s = wait_until_gone(tree, timeout_s=30)
        rerun.wait(timeout=420)
    finally:
        for process in (first, rerun):
            if process is not None and process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=60)
        kill_all(tree)
        for ray_tmp in ray_tmps:
            kill_all(processes_of(ray_tmp))
            shutil.rmtree(ray_tmp, ignore_errors=True)
    assert first.returncode == -signal.SIGKILL
    # Ray's workers are not in the killed process group; they end when their raylet (which is) is gone.
    assert gone_s < 15, f"the killed run's processes took {gone_s:.1f} s to end"
    assert rerun.returncode == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    history = model_history(out)
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # Epoch 0 was trained by the killed run; the rerun resumed after its last checkpoint (epoch 0 or, if it landed, 1).
    assert history[0]["resumes"] == 0 and history[-1]["resumes"] == 1
    print(f"processes of the killed run gone {gone_s:.1f} s after the kill ({len(tree)} processes)")


# ----------------------------------------------------------------------------- DDP with a rank that has no clips


@pytest.mark.timeout(300)
def test_a_rank_whose_training_videos_all_fail_keeps_the_others_in_step(ray_local, tiny_archive, tmp_path):
    from rnnimg.manifest import read_manifest
    from rnnimg.train import TrainConfig, train

    _, manifest = tiny_archive
    # Rank r of 2 reads rows r, r+2, ...: every second row of train and val is a file that is not a video.
    rows = []
    for i, row in enumerate(r for r in read_manifest(manifest) if r.split in ("train", "val") and r.label is not None):
        broken = tmp_path / f"broken-{i:02d}.mp4"
        broken.write_bytes(b"this is not a video" * 10)
        rows += [(row.video_uri, row.label, row.split), (str(broken), row.label, row.split)]
    rows.sort(key=lambda r: r[2])  # stable: train rows, then val rows, each alternating good / broken
    broken_manifest = str(tmp_path / "half-broken.parquet")
    pq.write_table(pa.table({"video_uri": [r[0] for r in rows], "label": [r[1] for r in rows], "split": [r[2] for r in rows]}),
                   broken_manifest)
    good_train = sum(1 for r in rows if r[2] == "train") // 2
    good_val = sum(1 for r in rows if r[2] == "val") // 2

    config = TrainConfig(epochs=1, workers=2, batch_size=2, clips_per_video=1, cpus_per_worker=1, max_failures=0, use_gpu=False)
    started = time.monotonic()
    result = train(broken_manifest, str(tmp_path / "out"), "half-broken", config)
    (entry,) = result.history
    # Rank 1 stepped on blank batches: nothing of them in the metrics, only rank 0's clips.
    assert entry["train_clips"] == good_train, entry
    assert entry["val_clips"] == 2 * good_val, entry  # 4 s videos, 2 s clips
    assert 0.0 <= entry["val_acc"] <= 1.0
    print(f"2-worker run with one rank of broken videos: {time.monotonic() - started:.0f} s")
