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

# OpenMP threads sleep instead of spinning while they wait: with two test workers (pytest-xdist) on two cores, torch's
# spinning threads burned ~100 CPU-seconds of the other worker's time (measured: machine busy 1137 -> ~1000 core-s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Prefect reads its settings (PREFECT_LOGGING_LEVEL among them) from the environment and sets up its logging once per
# process, binding its console handler to the sys.stderr of that moment. Do both now, for the whole session:
# - otherwise the first set-up could happen inside a console-script main called in-process (``train_main`` sets
#   PREFECT_LOGGING_LEVEL=WARNING for its terminal), and every later flow run of the process dropped its INFO logs
#   (test_training's refusal test before test_flows' forwarded-logs test failed that way);
# - or inside a test with capsys / capfd, whose stream is closed after that test: every later Prefect log line of the
#   process became a "--- Logging error ---" dump on stderr (a canary test failed on such dumps).
import prefect.main  # noqa: E402, F401
import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """Long modules first (``full_size``, then any with a ``slow`` test), each module's tests kept together and
    in file order. Serially this changes nothing but the order; with ``pytest -n 2 --dist loadfile`` the
    workers take whole modules in this order, so the longest ones start first instead of ending the run alone."""
    rank: dict[str, int] = {}
    for item in items:
        level = 0 if item.get_closest_marker("full_size") else 1 if item.get_closest_marker("slow") else 2
        rank[item.module.__name__] = min(level, rank.get(item.module.__name__, 2))
    first_seen = {}
    for i, item in enumerate(items):
        first_seen.setdefault(item.module.__name__, i)
    items.sort(key=lambda it: (rank[it.module.__name__], first_seen[it.module.__name__]))


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


@pytest.fixture(scope="module")
def prefect_api():
    """A temporary Prefect server for the in-process flow runs of the requesting module (``prefect_test_harness``,
    one per module): Prefect's in-process state (log worker, clients, settings) never crosses modules.
    Console-script tests use the session's server instead (``prefect_server``)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


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


@pytest.fixture(autouse=True)
def _environment_restored():
    """Every test leaves ``os.environ`` as it found it (the console-script mains called in-process set
    ``PREFECT_LOGGING_LEVEL`` and friends for what they take to be their own process)."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
