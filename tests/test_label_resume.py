"""Exactly once after a crash: kill -9 a real labelling run at several points, rerun it, and get
exactly the rows an uninterrupted run writes; kill a decode worker and the run heals itself."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pandas as pd
import pyarrow.dataset as pads
import pytest

from rnnimg.label import LabelConfig, label
from rnnimg.synth import SynthConfig, make_archive

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SHARD = "2"


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_archive(str(root), SynthConfig(videos=24, unlabelled=0, seed=7, seconds=8.0))
    return os.path.join(root, "videos")


@pytest.fixture(scope="module")
def reference(ray_local, archive, untrained_model, tmp_path_factory):
    """The rows of an uninterrupted run."""
    out = str(tmp_path_factory.mktemp("reference"))
    label(archive, untrained_model, out, LabelConfig(videos_per_shard=int(SHARD)))
    return tables(out)


def tables(out: str) -> dict[str, pd.DataFrame]:
    keys = {"clips": ["video_uri", "clip_index"], "videos": ["video_uri"], "segments": ["video_uri", "start_s"]}
    return {
        name: pads.dataset(os.path.join(out, name)).to_table().to_pandas().drop(columns=["run_id"]).sort_values(key).reset_index(drop=True)
        for name, key in keys.items()
    }


def commits(out: str) -> int:
    folder = os.path.join(out, "_commits")
    return len([n for n in os.listdir(folder) if n.endswith(".json")]) if os.path.isdir(folder) else 0


def start_cli(archive: str, model: str, out: str, tmp_path, *extra: str) -> subprocess.Popen:
    """`rnnimg label` as a separate process with its own local Ray, in its own process group."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = open(tmp_path / f"run-{time.monotonic_ns()}.log", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "rnnimg.cli", "label", archive, "--model", model, "--out", out, "--videos-per-shard", SHARD, *extra],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=60)


def wait_for(condition, timeout: float, process: subprocess.Popen | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if process is not None and process.poll() is not None:
            return condition()
        time.sleep(0.05)
    return False


@pytest.mark.recovery
def test_driver_killed_at_several_points_then_rerun_gives_exactly_the_reference(archive, untrained_model, reference, tmp_path):
    out = str(tmp_path / "labels")
    shards = 12  # 24 videos, 2 per shard
    # Kill points: as soon as the run has its identity (no shard yet), after the first commit, after a few.
    # One clip per model call spreads the commits out, so that a kill lands between them (batches change
    # no row: test_label's replicas-and-small-batches test); a whole run's commits can come in one burst.
    for point in (lambda: os.path.exists(os.path.join(out, "_run", "manifest.parquet")), lambda: commits(out) >= 1, lambda: commits(out) >= 3):
        process = start_cli(archive, untrained_model, out, tmp_path, "--batch-size", "1")
        reached = wait_for(point, timeout=120, process=process)
        kill_group(process)
        assert reached, "the run ended or stalled before the kill point"
        assert commits(out) < shards, "killed too late to test anything"

    process = start_cli(archive, untrained_model, out, tmp_path)
    assert process.wait(timeout=300) == 0
    assert commits(out) == shards
    got = tables(out)
    for name in reference:
        pd.testing.assert_frame_equal(got[name], reference[name], check_dtype=True)
    # No leftovers: no temporary files, one file per shard and table.
    for name in ("clips", "videos", "segments"):
        assert sorted(os.listdir(os.path.join(out, name))) == [f"shard-{i:05d}.parquet" for i in range(shards)]


def _decode_worker_pids() -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().decode(errors="replace")
            except OSError:
                continue
            if "decode_pack" in cmdline and "ray::" in cmdline:
                pids.append(int(entry))
    return pids


def test_worker_killed_mid_run_the_run_heals_itself(archive, untrained_model, reference, tmp_path):
    out = str(tmp_path / "labels")
    killed: list[int] = []

    def killer():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for pid in _decode_worker_pids():
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    continue
                break
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = label(archive, untrained_model, out, LabelConfig(videos_per_shard=int(SHARD)))
    thread.join(timeout=5)
    assert killed, "no decode worker was seen to kill"
    assert result.ok == result.videos == 24
    got = tables(out)
    for name in reference:
        pd.testing.assert_frame_equal(got[name], reference[name])


@pytest.mark.recovery
def test_multi_replica_run_killed_then_rerun_gives_exactly_the_reference(archive, untrained_model, reference, tmp_path):
    """Two model replicas, small batches, ranges of a few clips: blocks come back out of order, and a kill lands mid-flight."""
    out = str(tmp_path / "labels")
    many = ("--actors", "2", "--batch-size", "3", "--range-seconds", "4")
    process = start_cli(archive, untrained_model, out, tmp_path, *many)
    reached = wait_for(lambda: commits(out) >= 2, timeout=180, process=process)
    kill_group(process)
    assert reached and commits(out) < 12, "killed too late (or the run stalled) to test anything"
    process = start_cli(archive, untrained_model, out, tmp_path, *many)
    assert process.wait(timeout=300) == 0
    got = tables(out)
    for name in reference:
        pd.testing.assert_frame_equal(got[name], reference[name], check_dtype=True)


def test_a_second_label_process_on_one_output_fails_at_once_naming_the_first(archive, untrained_model, reference, tmp_path):
    out = str(tmp_path / "labels")
    first = start_cli(archive, untrained_model, out, tmp_path)
    assert wait_for(lambda: os.path.isdir(os.path.join(out, "_lock")), timeout=60, process=first), "the first run never took the lock"
    started = time.monotonic()
    second = subprocess.run([sys.executable, "-m", "rnnimg.cli", "label", archive, "--model", untrained_model, "--out", out,
                             "--videos-per-shard", SHARD], capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert second.returncode == 2, second.stderr
    lines = [line for line in second.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and f"is being written by rnnimg label (pid {first.pid})" in lines[0], second.stderr
    assert time.monotonic() - started < 30
    assert first.wait(timeout=300) == 0
    got = tables(out)
    assert got["clips"].model_id.nunique() == 1
    assert len(pads.dataset(os.path.join(out, "clips")).to_table().column("run_id").unique()) == 1  # one run's rows
    for name in reference:
        pd.testing.assert_frame_equal(got[name], reference[name], check_dtype=True)
