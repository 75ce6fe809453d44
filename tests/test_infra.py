"""The deployment material in infra/ is consistent with the package, its flows and each other.

No cluster runs here (no docker, no Kubernetes): every manifest is parsed and checked against
what it refers to: the package version and console script, the pinned Ray version, the flows'
names and parameter models, the work pools, the image tags.
"""

from __future__ import annotations

import json
import os
import re
import tomllib

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
PREFECT_FILES = ["prefect.yaml", "prefect-k8s.yaml"]
FLOW_FILES = {"train-crnn": "flows/train_crnn.py", "label-videos": "flows/label_videos.py", "label-report": "flows/label_report.py"}


def _load_yaml(name: str):
    with open(os.path.join(INFRA, name)) as f:
        return yaml.safe_load(f)


@pytest.fixture(scope="module")
def project():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


@pytest.fixture(scope="module")
def pins():
    pins = {}
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        for line in f:
            name, sep, version = line.strip().partition("==")
            if sep:
                pins[name.lower()] = version
    return pins


@pytest.fixture(scope="module")
def image(project):
    return f"rnnimg:{project['version']}"


@pytest.fixture(scope="module")
def flows():
    """Every flow object defined in flows/*.py, by flow name, loaded the way a worker loads them."""
    from prefect.flows import Flow, load_flow_from_entrypoint

    found = {}
    cwd = os.getcwd()
    os.chdir(ROOT)  # entrypoints are relative to the folder `prefect deploy` runs in
    try:
        for name in sorted(os.listdir(os.path.join(ROOT, "flows"))):
            if not name.endswith(".py"):
                continue
            with open(os.path.join(ROOT, "flows", name)) as f:
                functions = re.findall(r"@flow\([^)]*\)\s*\ndef (\w+)\(", f.read())
            for function in functions:
                entrypoint = f"flows/{name}:{function}"
                flow = load_flow_from_entrypoint(entrypoint)
                assert isinstance(flow, Flow)
                found[flow.name] = (entrypoint, flow)
    finally:
        os.chdir(cwd)
    return found


def _deployments(name: str) -> list[dict]:
    return _load_yaml(name)["deployments"]


def _resolve_env(value, env: dict):
    """Apply prefect.yaml's deploy-time {{ $VAR }} templating, as `prefect deploy` does."""
    if isinstance(value, str):
        return re.sub(r"\{\{\s*\$(\w+)\s*\}\}", lambda m: env[m.group(1)], value)
    if isinstance(value, list):
        return [_resolve_env(v, env) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_env(v, env) for k, v in value.items()}
    return value


# ----------------------------------------------------------------------------- Prefect


@pytest.mark.parametrize("prefect_file", PREFECT_FILES)
def test_prefect_file_deploys_every_flow_with_valid_parameters(prefect_file, flows):
    deployments = _deployments(prefect_file)
    by_flow = {}
    for deployment in deployments:
        entrypoint = deployment["entrypoint"]
        path, _, function = entrypoint.partition(":")
        assert os.path.isfile(os.path.join(ROOT, path)), f"{prefect_file}: {entrypoint} names no file"
        matches = [name for name, (ep, _) in flows.items() if ep == entrypoint]
        assert matches, f"{prefect_file}: {entrypoint} is not a @flow in {path}"
        flow_name = matches[0]
        flow = flows[flow_name][1]
        by_flow[flow_name] = deployment

        assert deployment["name"] and deployment["work_pool"]["name"], f"{flow_name}: a name and a work pool are required"
        parameters = deployment.get("parameters", {})
        signature = set(flow.parameters.properties)
        assert set(parameters) <= signature, f"{flow_name}: {set(parameters) - signature} are not parameters of {entrypoint}"
        # The flow validates the deployment's parameters (with the store placeholder filled in at deploy time).
        store = "s3://bucket/rnnimg" if "k8s" in prefect_file else "/data/rnnimg"
        flow.validate_parameters(_resolve_env(parameters, {"RNNIMG_STORE": store}))
        for placeholder in re.findall(r"\{\{\s*\$(\w+)\s*\}\}", json.dumps(parameters)):
            assert placeholder == "RNNIMG_STORE", f"{flow_name}: undocumented deploy-time variable {placeholder}"
    assert set(by_flow) == set(flows), f"{prefect_file} deploys {sorted(by_flow)}, the flows are {sorted(flows)}"

    from prefect.client.schemas.schedules import CronSchedule

    label = by_flow["label-videos"]
    assert label["schedules"] and all(CronSchedule(cron=s["cron"], timezone=s.get("timezone")) for s in label["schedules"])
    assert label["concurrency_limit"]["limit"] == 1  # scheduled runs queue, never overlap


def test_unresolved_store_placeholder_is_refused_before_any_work(flows):
    from prefect.exceptions import ParameterTypeError

    (deployment,) = [d for d in _deployments("prefect.yaml") if d["entrypoint"].startswith(FLOW_FILES["label-videos"])]
    parameters = deployment["parameters"]
    flow = flows["label-videos"][1]
    with pytest.raises(ParameterTypeError, match=r"unresolved prefect.yaml placeholder.*RNNIMG_STORE"):
        flow.validate_parameters(parameters)


def test_local_prefect_file_runs_the_flows_from_the_deploy_folder():
    config = _load_yaml("prefect.yaml")
    (build,) = config["build"]
    step = build["prefect.deployments.steps.run_shell_script"]
    assert step["script"] == "pwd"
    (pull,) = config["pull"]
    assert pull["prefect.deployments.steps.set_working_directory"]["directory"] == "{{ " + step["id"] + ".stdout }}"
    pools = {d["work_pool"]["name"] for d in config["deployments"]}
    assert pools == {"rnnimg-process"}


def test_k8s_prefect_file_matches_the_image_and_the_job_template(image):
    config = _load_yaml("prefect-k8s.yaml")
    (pull,) = config["pull"]
    workdir = pull["prefect.deployments.steps.set_working_directory"]["directory"]
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        dockerfile = f.read()
    assert re.search(rf"^WORKDIR {re.escape(workdir)}$", dockerfile, re.M), "the pull step's folder must be the image's WORKDIR"
    assert re.search(r"^COPY flows \./flows$", dockerfile, re.M)
    for deployment in config["deployments"]:
        assert deployment["work_pool"]["name"] == "rnnimg-k8s"
        assert deployment["work_pool"]["job_variables"]["image"] == image


def test_k8s_base_job_template_is_a_valid_work_pool_template(image, project):
    from prefect.client.schemas.actions import WorkPoolCreate

    with open(os.path.join(INFRA, "prefect-k8s-base-job-template.json")) as f:
        template = json.load(f)
    WorkPoolCreate(name="rnnimg-k8s", type="kubernetes", base_job_template=template)  # placeholders match variables
    variables = template["variables"]["properties"]
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(variables), f"undefined template variables: {placeholders - set(variables)}"
    assert variables["image"]["default"] == image
    (container,) = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"]
    # The image's entrypoint is `rnnimg`; the job must run `prefect flow-run execute` instead.
    script = next(iter(project["scripts"]))
    assert container["command"] and container["command"][0] != script and container["args"] == "{{ command }}"
    secrets = {s["secretRef"]["name"] for s in container["envFrom"]}
    assert secrets == {"rnnimg-s3", "rnnimg-ray-auth"}
    ray_address = variables["env"]["default"]["RAY_ADDRESS"]
    cluster = _load_yaml("kuberay-raycluster.yaml")["metadata"]
    assert ray_address == f"ray://{cluster['name']}-head-svc.{cluster['namespace']}.svc:10001"


# ----------------------------------------------------------------------------- image and Ray


def test_dockerfile_builds_the_package_with_its_pins(project):
    with open(os.path.join(INFRA, "Dockerfile")) as f:
        dockerfile = f.read()
    assert re.search(r"^FROM python:3\.11-slim$", dockerfile, re.M)
    (script,) = project["scripts"]  # rnnimg = "rnnimg.cli:main"
    assert re.search(rf'^ENTRYPOINT \["{script}"\]$', dockerfile, re.M)
    assert re.search(rf"^ARG RNNIMG_VERSION={re.escape(project['version'])}$", dockerfile, re.M)
    assert re.search(r"pip install .*-c constraints\.txt .*\.\[report\]", dockerfile)
    assert "wget" in dockerfile  # KubeRay's probes
    assert "ffmpeg" not in re.sub(r"#.*", "", dockerfile)  # PyAV wheels bundle it
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert os.path.exists(os.path.join(ROOT, path)), f"COPY {path}: not in the repository"
    with open(os.path.join(INFRA, "Dockerfile.dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "demo-output"} <= ignored and not {"rnnimg", "flows", "infra"} & ignored


def test_raycluster_matches_the_image_and_the_pinned_ray(image, pins):
    cluster = _load_yaml("kuberay-raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    spec = cluster["spec"]
    assert spec["rayVersion"] == pins["ray"]
    (head,) = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert head["image"] == image
    assert {p["containerPort"] for p in head["ports"]} >= {6379, 8265, 10001}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu", "gpu"}
    for name, group in groups.items():
        (container,) = group["template"]["spec"]["containers"]
        limits = container["resources"]["limits"]
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        if name == "gpu":
            assert container["image"] == f"{image}-gpu"
            assert int(limits["nvidia.com/gpu"]) >= 1 and container["resources"]["requests"]["nvidia.com/gpu"] == limits["nvidia.com/gpu"]
        else:
            assert container["image"] == image and "nvidia.com/gpu" not in limits
        assert {s["secretRef"]["name"] for s in container["envFrom"]} == {"rnnimg-s3", "rnnimg-ray-auth"}


def test_compose_stack_is_wired_together(image):
    compose = _load_yaml("docker-compose.yaml")
    services = compose["services"]
    assert {"minio", "minio-init", "prefect-server", "ray-head", "prefect-worker"} <= set(services)
    for name in ("prefect-server", "ray-head", "prefect-worker"):
        assert services[name]["image"] == image
    build = services["prefect-server"]["build"]
    assert os.path.normpath(os.path.join(INFRA, build["context"])) == ROOT and build["dockerfile"] == "infra/Dockerfile"

    worker = services["prefect-worker"]
    env = worker["environment"]
    assert env["AWS_ENDPOINT_URL"] == "http://minio:9000" and env["RNNIMG_STORE"].startswith("s3://")
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    head_command = services["ray-head"]["command"]
    assert head_command[:2] == ["start", "--head"] and services["ray-head"]["entrypoint"] == ["ray"]
    gcs_port = head_command[head_command.index("--port") + 1]
    assert env["RAY_ADDRESS"] == f"ray-head:{gcs_port}"
    script = " ".join(worker["command"])
    pool = _load_yaml("prefect.yaml")["deployments"][0]["work_pool"]["name"]
    assert f"--prefect-file infra/prefect.yaml" in script and f"prefect worker start --pool {pool}" in script
    assert f"work-pool create {pool} --type process" in script
    bucket = env["RNNIMG_STORE"][len("s3://"):].split("/")[0]
    assert f"local/{bucket}" in " ".join(services["minio-init"]["entrypoint"])
    for name, service in services.items():
        for dependency in service.get("depends_on", {}):
            assert dependency in services, f"{name} depends on unknown service {dependency}"


def test_readme_and_operations_doc_use_the_real_names():
    with open(os.path.join(INFRA, "README.md")) as f:
        readme = f.read()
    # The operator's guide: docs/operations.md, or the section of README.md it was pasted into.
    guide = os.path.join(ROOT, "docs", "operations.md")
    with open(guide if os.path.exists(guide) else os.path.join(ROOT, "README.md")) as f:
        operations = f.read()
    for text in (readme, operations):
        assert "prefect --no-prompt deploy --all --prefect-file infra/prefect.yaml" in text
        assert "rnnimg-process" in text and "RNNIMG_STORE" in text
    for command in re.findall(r"prefect deployment run ([\w-]+/[\w-]+)", readme + operations):
        flow, _, name = command.partition("/")
        deployed = {(d["entrypoint"], d["name"]) for f in PREFECT_FILES for d in _deployments(f)}
        assert (FLOW_FILES[flow], name) in {(e.partition(":")[0], n) for e, n in deployed}, f"no deployment {command}"
