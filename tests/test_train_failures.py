"""Training survives real process deaths.

1. A Ray Train worker killed with SIGKILL in the middle of an epoch: Ray Train replaces the
   worker group, which resumes from the last checkpoint, and the run ends with every epoch.
2. The whole ``rnnimg train`` command killed with SIGKILL (driver, its local Ray, its workers):
   rerunning the same command resumes at the epoch after the last checkpoint, not at 0.

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
