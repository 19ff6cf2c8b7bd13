"""Shared test fixtures: offline environment, a real S3-compatible server (moto) on loopback.

Everything here starts real components; nothing is mocked. Module-specific fixtures live in the
test module that needs them.
"""

from __future__ import annotations

import logging
import os
import tempfile
import uuid

# Tests never download anything and never phone home. Set before any library is imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="odise-prefect-home-"))
# Fake credentials for the local S3 server; real ones must never leak into tests.
os.environ["AWS_ACCESS_KEY_ID"] = "testing"
os.environ["AWS_SECRET_ACCESS_KEY"] = "testing"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_SESSION_TOKEN", None)
os.environ.pop("AWS_PROFILE", None)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """Endpoint URL of a real S3-compatible server (moto) on 127.0.0.1, random port."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str) -> str:
    """A fresh, empty bucket on the local S3 server; returns its name."""
    import s3fs

    name = f"test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(name)
    return name


@pytest.fixture
def s3_storage_options(s3_endpoint: str) -> dict:
    """fsspec storage options that reach the local S3 server."""
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """One real ``prefect server start`` on 127.0.0.1:<free port> (SQLite in a temporary PREFECT_HOME) for the
    whole session; yields the environment its clients need (``PREFECT_API_URL`` included).

    Console-script tests pass ``PREFECT_API_URL`` to their subprocesses instead of each starting a temporary
    server (about 6 s a process, more with a fresh PREFECT_HOME's database); flows run in this process use a
    module's own ``prefect_test_harness``, so Prefect's in-process state never crosses modules. The README's main command is still tested in
    Prefect's ephemeral mode (tests/test_cli.py). Clients filter by their own flow-run ids, so sharing is safe.
    """
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    from helpers import free_port, stop_process

    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(name, None)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    prefect = str(Path(sys.executable).parent / "prefect")
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in teardown
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=home,
    )
    api = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_process(server)
            log.close()
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {**env, "PREFECT_API_URL": api}
    stop_process(server)
    log.close()


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 2 CPUs shared by the tests of a session (started once; ~3 s)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photos():
    """Real photos (scikit-image's public-domain / CC0 samples) as HxWx3 uint8 arrays."""
    import skimage.data as data

    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on 1 thread for a module (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``):
    deterministic, and much faster than 2 contended threads on small shared machines."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
