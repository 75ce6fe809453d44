"""A real multi-node Ray cluster on this machine: labelling survives the loss of a worker node.

Three nodes started with ``ray start`` (a head and two workers, each with its own temporary
folder and its own custom resource), reading and writing only the local S3 endpoint, so no
path is secretly shared. The label job runs in its own driver process against the cluster; one
run is left alone, another loses a worker node (its raylet's process group, killed) once the
first shards have committed. Both must end with the same rows.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pandas as pd
import pytest

from rnnimg import storage

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """Nodes started with ``ray start``, each in its own process group, stopped by killing those groups
    (``ray stop`` would also stop the test session's own local Ray)."""

    def __init__(self, root: str):
        self.root = root
        self.port = _port()
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_port = _port()
        while self.dashboard_port == self.port:
            self.dashboard_port = _port()
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: dict[str, str] = {}  # name -> temp dir

    def start(self, name: str, cpus: int, head: bool = False) -> None:
        temp_dir = os.path.join(self.root, name)
        args = [RAY, "start", f"--num-cpus={cpus}", f"--temp-dir={temp_dir}", f"--resources={json.dumps({name: 1})}",
                "--disable-usage-stats", f"--object-store-memory={200 * 1024 * 1024}"]
        # The dashboard's port as well: Ray binds it even without the dashboard, and another head on this
        # machine (the deployment tests', a user's own) may hold the default 8265.
        args += [f"--port={self.port}", f"--dashboard-port={self.dashboard_port}", "--include-dashboard=false", "--head"] if head else \
            [f"--address={self.address}"]
        done = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stderr[-2000:]
        self.nodes[name] = temp_dir

    def processes(self, name: str):
        """The node's processes: every process whose command line names its temp dir, and their descendants."""
        import ray  # noqa: F401 - Ray vendors psutil (ray/thirdparty_files): importable once ray is imported
        import psutil

        found = {}
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(self.nodes[name] in part for part in proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def kill(self, name: str) -> int:
        """SIGKILL a node: its process groups and every process of it. Returns how many processes there were."""
        procs = self.processes(name)
        for group in {os.getpgid(p.pid) for p in procs if _alive(p)} - {os.getpgid(0)}:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.kill()
            except Exception:  # noqa: BLE001 - already gone
                pass
        return len(procs)

    def stop(self) -> None:
        for name in reversed(list(self.nodes)):
            self.kill(name)


def _alive(proc) -> bool:
    try:
        return proc.is_running()
    except Exception:  # noqa: BLE001
        return False


@pytest.fixture
def cluster(tmp_path_factory, s3_server):
    import tempfile

    root = tempfile.mkdtemp(prefix="rc-", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    cluster = Cluster(root)
    try:
        cluster.start("head", cpus=1, head=True)
        cluster.start("node1", cpus=2)
        cluster.start("node2", cpus=2)
        yield cluster
    finally:
        cluster.stop()


def _label(cluster: Cluster, videos: str, model: str, out: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "rnnimg.cli", "label", videos, "--model", model, "--out", out, "--ray-address", cluster.address,
            "--videos-per-shard", "2", "--batch-size", "4", "--actors", "2", "--coordinators", "2"]
    return subprocess.Popen(args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _summary(stdout: str) -> dict:
    """The CLI's JSON summary: the last object on stdout whose braces stand alone on their lines. Ray's
    driver prints the messages of its raylets (a task lost with a node) on stdout, asynchronously:
    before the summary or, seen once, after it."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "{"]
    ends = [i for i, line in enumerate(lines) if line == "}" and starts and i > starts[-1]]
    try:
        if not ends:
            raise ValueError("no summary")
        return json.loads("\n".join(lines[starts[-1] : ends[0] + 1]))
    except ValueError as err:
        raise AssertionError(f"no JSON summary on stdout:\n{stdout[-3000:]}") from err


def test_the_summary_is_found_whatever_ray_prints_around_it():
    summary = {"videos": 2, "tables": {"clips": 4}}
    noise = "(raylet) Task _map_task failed. There are infinite retries remaining"
    for stdout in (json.dumps(summary, indent=2) + "\n", f"{noise}\n{json.dumps(summary, indent=2)}\n",
                   f"{noise}\n{json.dumps(summary, indent=2)}\n{noise}\n"):
        assert _summary(stdout) == summary
    with pytest.raises(AssertionError, match="no JSON summary"):
        _summary(noise + "\n{\n")


def _rows(out: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    clips = storage.read_table(storage.join(out, "clips")).to_pandas().drop(columns=["run_id"])
    videos = storage.read_table(storage.join(out, "videos")).to_pandas().drop(columns=["run_id"])
    return (clips.sort_values(["video_uri", "clip_index"]).reset_index(drop=True),
            videos.sort_values("video_uri").reset_index(drop=True))


@pytest.mark.slow
@pytest.mark.cluster
def test_labelling_on_three_nodes_survives_losing_a_worker_node(cluster, s3_bucket, tiny_archive, untrained_model):
    root, _ = tiny_archive
    videos = f"{s3_bucket}/videos"
    sources = sorted(f.uri for f in storage.list_files(os.path.join(root, "videos")))
    for copy in range(3):  # 42 videos: enough work that the kill lands mid-run
        for path in sources:
            storage.write_bytes(f"{videos}/c{copy}-{os.path.basename(path)}", storage.read_bytes(path))
    model = f"{s3_bucket}/model"
    storage.upload_dir(untrained_model, model)

    base = f"{s3_bucket}/undisturbed"
    job = _label(cluster, videos, model, base)
    out, err = job.communicate(timeout=300)
    assert job.returncode == 0, err[-3000:]
    summary = _summary(out)
    assert (summary["videos"], summary["ok"], summary["shards_done"]) == (42, 42, 21)

    killed = f"{s3_bucket}/killed"
    job = _label(cluster, videos, model, killed)
    deadline = time.monotonic() + 120
    commits = storage.join(killed, "_commits")
    while time.monotonic() < deadline and job.poll() is None:
        if storage.exists(commits) and len(storage.list_files(commits)) >= 2:
            break
        time.sleep(0.2)
    assert job.poll() is None, "the job ended before the node could be killed"
    done_before = len(storage.list_files(commits))
    assert cluster.kill("node1") > 0
    out, err = job.communicate(timeout=400)
    assert job.returncode == 0, err[-3000:]
    summary = _summary(out)
    assert (summary["videos"], summary["ok"], summary["failed"]) == (42, 42, 0)
    assert done_before < 21, "every shard had committed before the kill"
    # Whether a coordinator was on the lost node is Ray's placement (SPREAD); shown, not asserted.
    print(f"coordinators restarted: {summary['coordinators_restarted']}")

    clips_a, videos_a = _rows(base)
    clips_b, videos_b = _rows(killed)
    pd.testing.assert_frame_equal(clips_a, clips_b)
    pd.testing.assert_frame_equal(videos_a, videos_b)
    assert not clips_b.duplicated(["video_uri", "clip_index"]).any()
    assert not storage.exists(storage.join(killed, "_parts")) or not storage.list_files(storage.join(killed, "_parts"))


@pytest.mark.slow
@pytest.mark.cluster
def test_training_on_two_worker_nodes_survives_losing_one(cluster, s3_bucket):
    """Two DDP workers spread over the worker nodes; one node dies after the first checkpoint: the
    run restores from the store's checkpoint on the nodes left and exports the model."""
    from rnnimg.synth import SynthConfig, make_archive

    archive = f"{s3_bucket}/archive"
    make_archive(archive, SynthConfig(videos=10, unlabelled=0, seed=5), processes=1)
    runs = f"{s3_bucket}/runs"
    # Warm epochs take a fraction of a second here: enough of them (36 clips each) that the kill lands with
    # most of the run still to train, however fast the machine (with 4 short ones a CI run finished first).
    epochs = 8
    args = [sys.executable, "-m", "rnnimg.cli", "train", f"{archive}/manifest.parquet", "--out", runs, "--name", "spread", "--epochs", str(epochs),
            "--workers", "2", "--placement", "spread", "--batch-size", "4", "--clips-per-video", "6", "--ray-address", cluster.address]
    job = subprocess.Popen(args, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    checkpoints = f"{runs}/ray/spread"
    deadline = time.monotonic() + 300
    on_node1, saved = False, []
    while time.monotonic() < deadline and job.poll() is None:
        on_node1 = on_node1 or any("RayTrainWorker" in " ".join(p.cmdline()) for p in cluster.processes("node1") if _alive(p))
        saved = [f.uri for f in (storage.list_files(checkpoints) if storage.exists(checkpoints) else []) if storage.basename(f.uri) == "state.pt"]
        if saved:
            break
        time.sleep(0.2)
    assert job.poll() is None, f"training ended before the node could be killed: {job.communicate()[1][-3000:]}"
    assert on_node1, "no training worker ran on node1 (placement spread)"
    assert cluster.kill("node1") > 0
    assert len(saved) < epochs - 1, f"most epochs were checkpointed before the kill: {saved}"
    out, err = job.communicate(timeout=600)
    assert job.returncode == 0, err[-3000:]
    summary = _summary(out)
    metrics = storage.read_json(f"{summary['model']}/metrics.json")
    assert [h["epoch"] for h in metrics["history"]] == list(range(epochs))
    assert max(h["resumes"] for h in metrics["history"]) >= 1  # the epochs after the kill were trained after a restore
    assert storage.exists(f"{summary['model']}/model.safetensors")
