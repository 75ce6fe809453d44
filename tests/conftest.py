"""Session fixtures: an isolated environment, one local Ray, one moto S3 server on 127.0.0.1.

The environment is set at import time, before Ray or Prefect is imported anywhere, so that
Ray's worker processes inherit it (S3 endpoint, fake credentials) and Prefect writes to a
temporary home instead of ~/.prefect.
"""

from __future__ import annotations

import os
import socket
import tempfile

import pytest

_HOME = tempfile.mkdtemp(prefix="rnnimg-tests-")


# The S3 endpoint's port is chosen now (Ray workers inherit AWS_ENDPOINT_URL when Ray starts) and
# held by this bound socket until the server takes it: Ray's own processes bind ephemeral ports
# all session long, and one of them took a port released at import time.
_S3_RESERVATION = socket.socket()
_S3_RESERVATION.bind(("127.0.0.1", 0))
S3_PORT = _S3_RESERVATION.getsockname()[1]
os.environ.update(
    {
        "PREFECT_HOME": os.path.join(_HOME, "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    }
)
for _name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "RAY_ADDRESS", "PREFECT_API_URL"):
    os.environ.pop(_name, None)


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: 2 CPUs, a small object store."""
    import ray

    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 endpoint: moto's server on 127.0.0.1, for the whole session."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    _S3_RESERVATION.close()
    server.start()
    yield os.environ["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, request):
    """A fresh bucket; returns its s3:// URL."""
    import boto3

    name = "t-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + "-" + os.urandom(3).hex()
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def tiny_archive(tmp_path_factory):
    """A small synthetic archive (local folder): 12 labelled videos + 2 unlabelled."""
    from rnnimg.synth import SynthConfig, make_archive

    out = tmp_path_factory.mktemp("archive")
    manifest = make_archive(str(out), SynthConfig(videos=12, unlabelled=2, seed=3, seconds=4.0))
    return out, manifest


@pytest.fixture(scope="session")
def untrained_model(tmp_path_factory):
    """An exported (randomly initialised) model folder, for labelling tests that need no accuracy."""
    from tests.media import export_untrained_model

    return export_untrained_model(str(tmp_path_factory.mktemp("model")))
