"""The deployed flows: parameters, incremental labelling, the store lock, and a real deployment.

The fast tests call the label flow's building blocks directly. The slow one is the operator's
path of docs/operations.md on a throwaway stack: a Prefect server (SQLite, its own home), a
`ray start --head` cluster (its own ports and temporary folder, so it never meets the session's
in-process Ray), `prefect deploy` of infra/prefect.yaml, a process worker, and deployment runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import pytest

from rnnimg import storage
from rnnimg.manifest import VideoRow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "flows"))

from flowkit import check_ray_address  # noqa: E402
from label_report import ReportParams  # noqa: E402
from label_videos import (  # noqa: E402
    LabelParams,
    LockHeld,
    LockLost,
    StoreLock,
    create_if_absent,
    labelled_before,
    plan_delta,
    read_state,
    write_delta,
)
from train_crnn import TrainParams  # noqa: E402

from rnnimg.runtime import ClusterUnreachable  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- parameters


def test_parameters_refuse_bad_values_with_what_was_given():
    from pydantic import ValidationError

    good = {"manifest": "/data/m.parquet", "out": "s3://bucket/train"}
    assert TrainParams(**good).train_config().epochs == TrainParams(**good).epochs
    cases = [
        (TrainParams, {**good, "epochs": 0}, "epochs\n  Input should be greater than or equal to 1"),
        (TrainParams, {**good, "name": "../x"}, "name must use only letters, digits and ._-"),
        (TrainParams, {**good, "out": "ftp://host/x"}, "unsupported location 'ftp://host/x'"),
        (TrainParams, {**good, "epoch": 3}, "epoch\n  Extra inputs are not permitted"),
        (LabelParams, {"videos": [], "model": "/m", "out": "/o"}, "videos\n  List should have at least 1 item"),
        (LabelParams, {"videos": ["{{ $RNNIMG_STORE }}/v"], "model": "/m", "out": "/o"}, "unresolved prefect.yaml placeholder"),
        (LabelParams, {"videos": ["/v"], "model": "/m", "out": "s3://"}, "has no bucket"),
        (LabelParams, {"videos": ["/v"], "model": "/m", "out": "/o", "lock_stale_seconds": 1}, "greater than or equal to 30"),
        (ReportParams, {"labels": "/l", "out": "/r", "threshold": 1.5}, "threshold\n  Input should be less than or equal to 1"),
    ]
    for model, values, message in cases:
        with pytest.raises(ValidationError) as caught:
            model(**values)
        assert message in str(caught.value), f"{model.__name__}({values}): {caught.value}"


def test_flow_validates_its_parameter_before_running():
    from prefect.exceptions import ParameterTypeError
    from train_crnn import train_crnn

    with pytest.raises(ParameterTypeError, match="epochs"):
        train_crnn.validate_parameters({"params": {"manifest": "/m.parquet", "out": "/o", "epochs": -1}})
    validated = train_crnn.validate_parameters({"params": {"manifest": "/m.parquet", "out": "/o", "epochs": 2}})
    assert isinstance(validated["params"], TrainParams) and validated["params"].epochs == 2


def test_tasks_retry_storage_errors_but_not_bad_input_or_a_held_lock():
    from flowkit import transient
    from label_videos import _retry_unless_held
    from prefect.states import Failed

    from rnnimg.label import LabelError
    from rnnimg.storage import StorageError

    permanent = [ValueError("bad"), FileNotFoundError("gone"), ClusterUnreachable("no cluster"), LabelError("other model")]
    for error in permanent:
        assert not transient(None, None, Failed(data=error)), error
    for error in (StorageError("503"), OSError("reset"), RuntimeError("lost a Ray node")):
        assert transient(None, None, Failed(data=error)), error
    assert _retry_unless_held(None, None, Failed(data=StorageError("503")))
    assert not _retry_unless_held(None, None, Failed(data=LockHeld("another run")))


def test_unreachable_ray_cluster_fails_in_seconds():
    port = _free_port()  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(ClusterUnreachable, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(ClusterUnreachable, match="expected host:port or ray://host:port"):
        check_ray_address("ray://head-without-port")
    assert time.perf_counter() - started < 10
    check_ray_address(None)  # no address: a local Ray, nothing to check


# ----------------------------------------------------------------------------- incremental labelling


def _row(name: str, size: int = 100, version: str = "v1") -> VideoRow:
    return VideoRow(video_uri=f"/archive/{name}.mp4", size=size, version=version)


def test_plan_delta_labels_new_and_changed_videos_only():
    known = {"/archive/a.mp4": (100, "v1"), "/archive/b.mp4": (100, "v1"), "/archive/c.mp4": (100, "v1"), "/archive/gone.mp4": (5, "v1")}
    listing = [_row("a"), _row("b", size=101), _row("c", version="v2"), _row("new")]
    delta = plan_delta(listing, known, "r2", "m1")
    assert (delta.listed, delta.new, delta.changed, delta.unchanged, delta.removed) == (4, 1, 2, 1, 1)
    assert sorted(r.video_uri for r in delta.rows) == ["/archive/b.mp4", "/archive/c.mp4", "/archive/new.mp4"]
    assert plan_delta(listing, known, "r2", "m1", full=True).todo == 4
    assert plan_delta(listing, {}, "r2", "other-model").new == 4  # a new model relabels everything


def _completed_run(base: str, run_id: str, model_id: str, rows: list[VideoRow]) -> dict:
    """What a finished run leaves behind, as far as the delta is concerned: its input listing."""
    import pyarrow as pa

    table = pa.Table.from_pylist([{"video_uri": r.video_uri, "size": r.size, "version": r.version, "label": None, "split": None} for r in rows])
    storage.write_table(table, storage.join(base, "runs", run_id, "_run", "manifest.parquet"))
    return {"run_id": run_id, "model_id": model_id, "status": "completed"}


def test_labelled_before_takes_each_videos_latest_completed_run_of_the_model(tmp_path):
    base = str(tmp_path / "base")
    assert read_state(base) == {"version": 1, "runs": [], "last_success": {}, "pending": None}
    runs = [
        _completed_run(base, "r1", "m1", [_row("a"), _row("b")]),
        _completed_run(base, "r2", "m1", [_row("b", size=200)]),
        _completed_run(base, "r3", "m2", [_row("c")]),
        {**_completed_run(base, "r4", "m1", [_row("d")]), "status": "abandoned"},
    ]
    state = {"version": 1, "runs": runs, "last_success": {}, "pending": None}
    assert labelled_before(base, state, "m1") == {"/archive/a.mp4": (100, "v1"), "/archive/b.mp4": (200, "v1")}
    assert labelled_before(base, state, "m2") == {"/archive/c.mp4": (100, "v1")}
    storage.write_json(storage.join(base, "state.json"), {**state, "version": 99})
    with pytest.raises(ValueError, match="state version 99; this flow reads version 1"):
        read_state(base)


def test_delta_manifest_is_read_back_by_the_label_job_with_size_and_version(tmp_path):
    from rnnimg.manifest import resolve_videos

    delta = plan_delta([_row("a", size=7, version="123"), _row("b")], {}, "r1", "m1")
    uri = write_delta(str(tmp_path), delta)
    assert uri == str(tmp_path / "runs" / "r1" / "_delta.parquet")
    rows = resolve_videos(uri)
    assert [(r.video_uri, r.size, r.version) for r in rows] == [("/archive/a.mp4", 7, "123"), ("/archive/b.mp4", 100, "v1")]


def test_plan_run_resumes_a_crashed_run_and_abandons_another_models(tmp_path):
    from label_videos import plan_run

    archive = tmp_path / "archive"
    archive.mkdir()
    for name in ("a", "b", "c"):
        (archive / f"{name}.mp4").write_bytes(name.encode() * 10)
    base = str(tmp_path / "base")
    params = LabelParams(videos=[str(archive)], model=str(tmp_path / "model"), out=base)
    with StoreLock(base, "test", stale_after_s=60) as lock:
        first = plan_run.fn(params, "m1", lock)
        assert (first.new, first.todo, first.resumed) == (3, 3, False)
        pending = read_state(base)["pending"]
        assert pending["run_id"] == first.run_id and storage.exists(pending["delta"])

        # The run crashed before record-run: the next run of m1 resumes it, same id and videos.
        again = plan_run.fn(params, "m1", lock)
        assert again.resumed and again.run_id == first.run_id and again.rows == first.rows

        # A run of another model abandons it and plans everything for the new model.
        other = plan_run.fn(params, "m2", lock)
        state = read_state(base)
        assert (other.todo, other.resumed) == (3, False) and other.run_id != first.run_id
        assert [(r["run_id"], r["status"]) for r in state["runs"]] == [(first.run_id, "abandoned")]
        assert state["pending"]["run_id"] == other.run_id


# ----------------------------------------------------------------------------- the store lock


def test_create_if_absent_has_exactly_one_winner(tmp_path):
    target = str(tmp_path / "lock" / "x.json")
    results: list[bool] = []
    barrier = threading.Barrier(8)

    def race(i: int) -> None:
        barrier.wait()
        results.append(create_if_absent(target, f"writer {i}".encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert storage.read_bytes(target).startswith(b"writer ")
    assert [n for n in os.listdir(tmp_path / "lock")] == ["x.json"]  # no temporary left behind


def test_lock_excludes_a_second_run_until_released(tmp_path):
    base = str(tmp_path / "base")
    first = StoreLock(base, "run one", stale_after_s=60).acquire()
    try:
        with pytest.raises(LockHeld, match=r"is being written by run one .*wait for it"):
            StoreLock(base, "run two", stale_after_s=60).acquire()
        first.check()
    finally:
        first.release()
    with StoreLock(base, "run two", stale_after_s=60) as second:
        assert second.holder()[1]["owner"] == "run two"
        assert second.generation == 2
    assert StoreLock(base, "anyone").holder() is None
    assert os.listdir(os.path.join(base, "_lock")) == ["lock-00000002.json"]  # older generations are removed


def test_heartbeat_keeps_a_long_run_locked_and_a_stale_lock_is_taken_over(tmp_path):
    base = str(tmp_path / "base")
    holder = StoreLock(base, "long run", stale_after_s=1.0, heartbeat_s=0.2).acquire()
    time.sleep(1.5)  # longer than stale_after_s: only the heartbeat keeps it
    with pytest.raises(LockHeld):
        StoreLock(base, "newcomer", stale_after_s=1.0).acquire()
    holder._stop.set()  # the holder "crashes": no more heartbeats
    holder._thread.join()
    time.sleep(1.3)
    newcomer = StoreLock(base, "newcomer", stale_after_s=1.0, heartbeat_s=0.2).acquire()
    try:
        with pytest.raises(LockLost, match="taken over by another run; its results are not recorded"):
            holder.check()
        newcomer.check()
        holder.release()  # must not release the newcomer's lock
        assert newcomer.holder()[1]["owner"] == "newcomer"
    finally:
        newcomer.release()


@pytest.mark.s3
def test_lock_on_s3_uses_a_conditional_put(s3_bucket):
    base = f"{s3_bucket}/labels"
    assert create_if_absent(f"{base}/x.json", b"1") is True
    assert create_if_absent(f"{base}/x.json", b"2") is False
    assert storage.read_bytes(f"{base}/x.json") == b"1"
    with StoreLock(base, "s3 run", stale_after_s=60):
        with pytest.raises(LockHeld, match="s3 run"):
            StoreLock(base, "other", stale_after_s=60).acquire()
    with StoreLock(base, "other", stale_after_s=60) as lock:
        assert lock.generation == 2


# ----------------------------------------------------------------------------- the real deployment


def _descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), deepest last."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _pids_with_arg(text: str) -> list[int]:
    """Live processes whose command line mentions ``text`` (a folder only this test created)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def _stop(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """Stop a process this test started and everything it started (by pid; nothing else)."""
    if proc is None:
        return
    family = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Stack:
    """A throwaway Prefect server + Ray head + worker, and helpers to drive them as an operator would."""

    def __init__(self, root: str):
        self.root = root
        self.store = os.path.join(root, "store")
        self.logs = os.path.join(root, "logs")
        os.makedirs(self.logs)
        self.api_port, self.gcs_port = _free_port(), _free_port()
        self.api_url = f"http://127.0.0.1:{self.api_port}/api"
        # Unix socket paths must stay short: the Ray head's own folder under /tmp.
        self.ray_tmp = tempfile.mkdtemp(prefix="rnnimg-ray-", dir="/tmp")
        self.env = {
            **os.environ,
            "PREFECT_HOME": os.path.join(root, "prefect-home"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root}/prefect.db",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false",  # the cron schedules must not fire during the test
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_WORKER_QUERY_SECONDS": "1",
            "RNNIMG_STORE": self.store,
            "RAY_AUTH_MODE": "disabled",
            "RAY_USAGE_STATS_ENABLED": "0",
            "COLUMNS": "200",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.server = self.ray = self.worker = None

    def spawn(self, name: str, command: list[str], env: dict | None = None) -> subprocess.Popen:
        log = open(os.path.join(self.logs, f"{name}.log"), "w")
        return subprocess.Popen(command, cwd=ROOT, env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def log(self, name: str, tail: int = 4000) -> str:
        with open(os.path.join(self.logs, f"{name}.log"), errors="replace") as f:
            return f.read()[-tail:]

    def start(self) -> None:
        self.server = self.spawn("server", [f"{BIN}/prefect", "server", "start", "--host", "127.0.0.1", "--port", str(self.api_port)])
        ray_ports = ["--port", str(self.gcs_port)]
        for flag in ("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
                     "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port"):
            ray_ports += [f"--{flag}", str(_free_port())]
        # --block: the head's processes live and die with this one process, which the test stops by pid.
        self.ray = self.spawn("ray", [f"{BIN}/ray", "start", "--head", "--block", "--num-cpus", "2", "--include-dashboard=false",
                                      "--node-ip-address", "127.0.0.1", "--temp-dir", self.ray_tmp,
                                      "--object-store-memory", str(200 * 1024 * 1024), "--disable-usage-stats", *ray_ports])

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        server_up = ray_up = False
        while not (server_up and ray_up):
            assert time.monotonic() < deadline, f"stack not up: server {server_up}, ray {ray_up}\n{self.log('server')}\n{self.log('ray')}"
            assert self.server.poll() is None, f"prefect server exited:\n{self.log('server')}"
            assert self.ray.poll() is None, f"ray head exited:\n{self.log('ray')}"
            if not server_up:
                try:
                    server_up = urllib.request.urlopen(f"{self.api_url}/health", timeout=2).status == 200
                except OSError:
                    pass
            ray_up = ray_up or os.path.exists(os.path.join(self.ray_tmp, "ray_current_cluster"))
            time.sleep(0.5)

    def cli(self, *args: str, timeout_s: float = 120.0, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([f"{BIN}/prefect", *args], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=timeout_s)
        if check:
            assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def start_worker(self, pool: str) -> None:
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{self.gcs_port}"}
        self.worker = self.spawn("worker", [f"{BIN}/prefect", "worker", "start", "--pool", pool, "--type", "process"], env)

    def run(self, deployment: str, params: dict | None = None) -> str:
        """`prefect deployment run`; returns the flow run id."""
        return self.run_many((deployment, params))[0][1]

    def run_many(self, *runs: tuple[str, dict | None]) -> list[tuple[subprocess.CompletedProcess, str | None]]:
        """Several `prefect deployment run` at once: (the command's result, the flow run id or None if refused)."""
        procs = []
        for deployment, params in runs:
            args = ["deployment", "run", deployment] + (["--params", json.dumps({"params": params})] if params else [])
            procs.append(subprocess.Popen([f"{BIN}/prefect", *args], cwd=ROOT, env=self.env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        out = []
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=120)
            match = re.search(r"UUID: ([0-9a-f-]{36})", stdout)
            out.append((subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), match.group(1) if match else None))
        return out

    def client(self):
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.api_url}):
            return get_client(sync_client=True)

    def wait(self, flow_run_id: str, timeout_s: float = 240.0):
        """Poll the server until the flow run is final; return it and, when it did not complete, its logs."""
        from uuid import UUID

        from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while True:
                run = client.read_flow_run(UUID(flow_run_id))
                if run.state and run.state.is_final():
                    break
                assert time.monotonic() < deadline, f"flow run {run.name} still {run.state.name} after {timeout_s} s\n{self.log('worker')}"
                assert self.worker.poll() is None, f"the worker exited:\n{self.log('worker')}"
                time.sleep(1)
            logs = ""
            if not run.state.is_completed():
                found = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
                logs = "\n".join(f"{entry.level} {entry.message}" for entry in found)[-6000:]
            return run, logs

    def artifacts(self, flow_run_id: str) -> dict[str, tuple[str, str]]:
        """key -> (type, data) of the artifacts a flow run published (a link artifact's type is markdown)."""
        from uuid import UUID

        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

        with self.client() as client:
            found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[UUID(flow_run_id)])))
        return {a.key: (a.type, str(a.data)) for a in found}

    def stop(self) -> None:
        """The worker (and any flow run it started) before the server, the Ray head last; all of them, always."""
        errors = []
        for proc, grace_s in ((self.worker, 10.0), (self.server, 10.0), (self.ray, 3.0)):
            try:
                _stop(proc, grace_s)
            except Exception as err:  # noqa: BLE001 - go on stopping the others, report after
                errors.append(err)
        leftovers = [pid for pid in _pids_with_arg(self.ray_tmp)]
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.ray_tmp, ignore_errors=True)
        assert not errors and not leftovers, f"teardown: {errors}, Ray processes left running: {leftovers}"


@pytest.fixture
def stack(tmp_path):
    from rnnimg.synth import SynthConfig, make_archive

    stack = Stack(str(tmp_path))
    try:
        stack.start()
        make_archive(os.path.join(stack.store, "archive"), SynthConfig(videos=8, unlabelled=1, seed=5), processes=1)
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()


def _completed(waited) -> None:
    run, logs = waited
    assert run.state.is_completed(), f"flow run {run.name} ended {run.state.name}: {run.state.message}\n{logs}"


@pytest.mark.slow
@pytest.mark.prefect
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_deploy_and_run_every_flow_on_a_server_worker_and_ray_cluster(stack):
    store = stack.store
    stack.cli("work-pool", "create", "rnnimg-process", "--type", "process")
    stack.start_worker("rnnimg-process")  # starts while the deployments register
    stack.cli("--no-prompt", "deploy", "--all", "--prefect-file", "infra/prefect.yaml", timeout_s=180)

    manifest = os.path.join(store, "archive", "manifest.parquet")
    train_params = {"manifest": manifest, "out": os.path.join(store, "train"), "name": "e2e", "epochs": 1, "workers": 1, "batch_size": 4}
    (refused, no_run), (_, dead), (_, train) = stack.run_many(
        # A bad value is refused by the server: no flow run is created.
        ("train-crnn/local", {**train_params, "epochs": 0}),
        # A run pointed at a cluster that does not answer fails in seconds, while the real one trains.
        ("train-crnn/local", {**train_params, "out": os.path.join(store, "dead"), "ray_address": f"127.0.0.1:{_free_port()}"}),
        ("train-crnn/local", train_params),
    )
    assert refused.returncode != 0 and no_run is None
    assert "Validation failed for field 'params.epochs'" in refused.stdout + refused.stderr
    assert dead and train

    dead_run, dead_logs = stack.wait(dead, timeout_s=120)
    assert dead_run.state.is_failed() and "cannot reach the Ray cluster" in (dead_run.state.message or "") + dead_logs
    assert (dead_run.end_time - dead_run.start_time).total_seconds() < 60
    assert not os.path.exists(os.path.join(store, "dead"))

    _completed(stack.wait(train))
    assert os.path.exists(os.path.join(store, "train", "model", "model.safetensors"))
    metrics = storage.read_json(os.path.join(store, "train", "model", "metrics.json"))
    assert len(metrics["history"]) == 1
    artifacts = stack.artifacts(train)
    assert set(artifacts) == {"train-e2e-history", "train-e2e-model", "train-e2e-summary"}
    assert artifacts["train-e2e-history"][0] == "table" and "val_acc" in artifacts["train-e2e-history"][1]
    assert os.path.join(store, "train", "model") in artifacts["train-e2e-model"][1]
    assert metrics["model_id"] in artifacts["train-e2e-summary"][1]

    # label-videos with the deployment's own parameters ({{ $RNNIMG_STORE }} resolved at deploy time).
    first = stack.run("label-videos/local")
    _completed(stack.wait(first))
    state = storage.read_json(os.path.join(store, "labels", "state.json"))
    (run1,) = state["runs"]
    assert (run1["status"], run1["listed"], run1["new"], run1["videos"], run1["ok"]) == ("completed", 9, 9, 9, 9)
    assert run1["clips"] > 0 and state["pending"] is None and state["last_success"] == {run1["model_id"]: run1["run_id"]}
    artifacts = stack.artifacts(first)
    assert set(artifacts) == {"label-labels-counts", "label-labels-tables", "label-labels-summary"}
    assert artifacts["label-labels-counts"][0] == "table" and run1["run_id"] in artifacts["label-labels-counts"][1]
    assert run1["out"] in artifacts["label-labels-tables"][1]
    assert "Label distribution" in artifacts["label-labels-summary"][1]

    # One new video: the next run labels it and nothing else.
    shutil.copy(os.path.join(store, "archive", "videos", "test", "test-00000.mp4"), os.path.join(store, "archive", "videos", "new.mp4"))
    second = stack.run("label-videos/local")
    _completed(stack.wait(second))
    run2 = storage.read_json(os.path.join(store, "labels", "state.json"))["runs"][1]
    assert (run2["listed"], run2["new"], run2["changed"], run2["unchanged"], run2["videos"]) == (10, 1, 0, 9, 1)
    new_videos = storage.read_table(os.path.join(run2["out"], "videos")).to_pydict()["video_uri"]
    assert new_videos == [os.path.join(store, "archive", "videos", "new.mp4")]
    assert storage.read_json(os.path.join(store, "labels", "_lock", os.listdir(os.path.join(store, "labels", "_lock"))[0]))["released_at"]

    report = stack.run("label-report/local")
    _completed(stack.wait(report))
    summary = storage.read_json(os.path.join(store, "report", "summary.json"))
    assert summary["videos"] == 10 and summary["runs"] == [run1["run_id"], run2["run_id"]]
    assert summary["clips"] == run1["clips"] + run2["clips"]
    assert os.path.getsize(os.path.join(store, "report", "index.html")) > 10_000
    artifacts = stack.artifacts(report)
    assert set(artifacts) == {"report-labels-labels", "report-labels-html", "report-labels-summary"}
    assert artifacts["report-labels-labels"][0] == "table" and os.path.join(store, "report", "index.html") in artifacts["report-labels-html"][1]

    with stack.client() as client:
        deployment = client.read_deployment_by_name("label-videos/local")
    assert [s.schedule.cron for s in deployment.schedules] == ["0 * * * *"]
    assert deployment.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": ROOT}}]
