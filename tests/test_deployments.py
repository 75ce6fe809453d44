"""The deployed flows: parameters, retry policies, an unreachable cluster, and a real deployment.

The fast tests call the flows' building blocks directly (the lock and the incremental-labelling
logic the label flow wraps are tested in test_store_lock.py and test_label_runs.py). The slow one
is the operator's path of docs/operations.md on a throwaway stack: a Prefect server (SQLite, its own home), a
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
import time
import urllib.request

import pytest

from rnnimg import storage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
sys.path.insert(0, os.path.join(ROOT, "flows"))

from label_report import ReportParams  # noqa: E402
from label_videos import LabelParams  # noqa: E402
from train_crnn import TrainParams  # noqa: E402

from rnnimg.runtime import ClusterUnreachable, check_ray_address  # noqa: E402
from rnnimg.store_lock import LockHeld  # noqa: E402


def _free_port() -> int:
    return _free_ports(1)[0]


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: each socket stays bound until all are chosen, so no two picks can be the same."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


# ----------------------------------------------------------------------------- parameters


def test_parameters_refuse_bad_values_with_what_was_given():
    from pydantic import ValidationError

    good = {"manifest": "/data/m.parquet", "out": "s3://bucket/train"}
    assert TrainParams(**good).train_config().epochs == TrainParams(**good).epochs
    cases = [
        (TrainParams, {**good, "epochs": 0}, "epochs\n  Input should be greater than or equal to 1"),
        (TrainParams, {**good, "name": "../x"}, "name must use only letters, digits and ._-"),
        (TrainParams, {**good, "task": "segmentation"}, "task must be one of ['classify'"),
        (TrainParams, {**good, "out": "ftp://host/x"}, "unsupported location 'ftp://host/x'"),
        (TrainParams, {**good, "epoch": 3}, "epoch\n  Extra inputs are not permitted"),
        (LabelParams, {"videos": [], "model": "/m", "out": "/o"}, "videos\n  List should have at least 1 item"),
        (LabelParams, {"videos": ["{{ $RNNIMG_STORE }}/v"], "model": "/m", "out": "/o"}, "unresolved prefect.yaml placeholder"),
        (LabelParams, {"videos": ["/v"], "model": "/m", "out": "s3://"}, "has no bucket"),
        (LabelParams, {"videos": ["/v"], "model": "/m", "out": "/o", "lock_stale_seconds": 1}, "greater than or equal to 30"),
        (LabelParams, {"videos": ["/v"], "model": "/m", "out": "/o", "actors": 2, "coordinators": 3}, "coordinators (3) must be at most actors (2)"),
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
    from label_videos import acquire_lock
    from prefect.states import Failed

    from rnnimg.label import LabelError
    from rnnimg.storage import StorageError

    permanent = [ValueError("bad"), FileNotFoundError("gone"), ClusterUnreachable("no cluster"), LabelError("other model"),
                 LockHeld("another writer")]
    for error in permanent:
        assert not transient(None, None, Failed(data=error)), error
    for error in (StorageError("503"), OSError("reset"), RuntimeError("lost a Ray node")):
        assert transient(None, None, Failed(data=error)), error
    retry_unless_held = acquire_lock.retry_condition_fn
    assert retry_unless_held(None, None, Failed(data=StorageError("503")))
    assert not retry_unless_held(None, None, Failed(data=LockHeld("another run")))


def test_unreachable_ray_cluster_fails_in_seconds():
    port = _free_port()  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(ClusterUnreachable, match=f"cannot reach the Ray cluster at '127.0.0.1:{port}'"):
        check_ray_address(f"127.0.0.1:{port}")
    with pytest.raises(ClusterUnreachable, match="expected host:port or ray://host:port"):
        check_ray_address("ray://head-without-port")
    assert time.perf_counter() - started < 10
    check_ray_address(None)  # no address: a local Ray, nothing to check


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
        # Every port of the stack picked at once: distinct from each other (Ray refuses a port given twice).
        self.api_port, self.gcs_port, *self.ray_ports = _free_ports(10)
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
        # The dashboard's port too: without the dashboard Ray still binds it, and another head on this machine
        # (the multi-node tests, a user's own) holds the default 8265.
        for flag, port in zip(("node-manager-port", "object-manager-port", "ray-client-server-port", "dashboard-agent-listen-port",
                               "dashboard-agent-grpc-port", "runtime-env-agent-port", "metrics-export-port", "dashboard-port"), self.ray_ports,
                              strict=True):
            ray_ports += [f"--{flag}", str(port)]
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
        # A SIGKILLed process leaves /proc only once the kernel has torn it down: give them a moment.
        deadline = time.monotonic() + 15
        while _pids_with_arg(self.ray_tmp) and time.monotonic() < deadline:
            time.sleep(0.5)
        leftovers = _pids_with_arg(self.ray_tmp)
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
@pytest.mark.deploy
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
