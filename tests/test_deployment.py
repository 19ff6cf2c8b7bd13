"""The deployment commands of README.md, run exactly as written, against a real ``prefect server``.

A fixture starts ``prefect server start --host 127.0.0.1 --port <free port>`` (SQLite in a temporary
PREFECT_HOME). The test then runs, from the repository root: ``prefect work-pool create``, ``prefect
--no-prompt deploy --all``, ``prefect deployment run annotate/nightly --param vocab_file=classes.txt`` (plus
an output folder in tmp and the tiny model) twice and ``prefect worker start --pool local-process --run-once``,
and checks the flow runs' states (one completed, the other cancelled by the deployment's concurrency limit of
1 with ``CANCEL_NEW``) and the outputs. The worker is stopped before the server (SIGINT).
Fast tests check ``prefect.yaml`` itself and the deployments ``python -m flows.serve`` builds from it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "local-process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT (Prefect workers ignore SIGTERM while their server is gone), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1:<free port>; yields the environment its clients need."""
    import httpx

    home = tmp_path_factory.mktemp("prefect-server-home")
    port = _free_port()
    env = dict(os.environ)
    for name in ("PREFECT_API_URL", "PREFECT_API_KEY", "PREFECT_PROFILE"):
        env.pop(name, None)
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false")
    log = open(home / "server.log", "w")  # noqa: SIM115 - closed in teardown
    server = subprocess.Popen(
        [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"],
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
            _stop(server)
            log.close()
            pytest.fail(f"prefect server did not start: {(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield {**env, "PREFECT_API_URL": api}
    _stop(server)
    log.close()


def _cli(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run(
        [PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_readme_commands_label_the_examples_through_a_worker(prefect_server, tmp_path):
    import httpx

    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    out = tmp_path / "nightly"
    # the commands of README.md, from the repository root
    _cli(["work-pool", "create", POOL, "--type", "process"], env)
    deployed = _cli(["--no-prompt", "deploy", "--all"], env, timeout=300)
    for name in ("annotate/nightly", "annotate/adhoc", "train/finetune", "evaluate/score"):
        assert name in deployed, deployed
    ran = _cli(
        [
            "deployment",
            "run",
            "annotate/nightly",
            "--param",
            "vocab_file=classes.txt",
            "--param",
            f"output={out}",
            "--param",
            "model=tiny",
            "--param",
            "num_cpus=2",
        ],
        env,
    )
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", ran).group(1)
    # a second run of the same deployment while the first is active is cancelled (concurrency 1, CANCEL_NEW)
    again = _cli(
        ["deployment", "run", "annotate/nightly", "--param", "vocab_file=classes.txt", "--param", f"output={out}",
         "--param", "model=tiny", "--param", "num_cpus=2"],
        env,
    )  # fmt: skip
    second_run_id = re.search(r"UUID: ([0-9a-f-]{36})", again).group(1)

    worker_log = tmp_path / "worker.log"
    with open(worker_log, "w") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--run-once"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            worker.wait(timeout=480)
        except subprocess.TimeoutExpired:
            pass
        finally:
            _stop(worker)  # before the server (fixture teardown)

    runs = {rid: httpx.get(f"{api}/flow_runs/{rid}", timeout=10).json() for rid in (flow_run_id, second_run_id)}
    states = sorted(r["state"]["type"] for r in runs.values())
    assert states == ["CANCELLED", "COMPLETED"], f"{states}\n{worker_log.read_text()[-4000:]}"
    run = next(r for r in runs.values() if r["state"]["type"] == "COMPLETED")
    assert run["parameters"]["vocab_file"] == "classes.txt"

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_images"] == summary["n_labelled"] == 4
    assert (out / "coco" / "panoptic.json").is_file() and list((out / "parquet").glob("*.parquet"))
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["vocabulary_source"] == str(
        EXAMPLES / "classes.txt"
    )  # resolved in the pull-step directory
    assert provenance["settings"]["plumbing_check"] is True

    dep = httpx.get(f"{api}/deployments/name/annotate/nightly", timeout=10).json()
    assert dep["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(EXAMPLES)}}
    ]
    assert [s["schedule"]["cron"] for s in dep["schedules"]] == ["0 2 * * *"]
    assert dep["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert dep["work_pool_name"] == POOL and dep["entrypoint"] == "flows.annotate:annotate"
    limit = dep.get("concurrency_limit") or (dep.get("global_concurrency_limit") or {}).get("limit")
    assert limit == 1 and dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"


# --------------------------------------------------------------------------------------------------
# prefect.yaml and flows.serve (no server)
# --------------------------------------------------------------------------------------------------
def test_prefect_yaml_deployments():
    from prefect.utilities.importtools import import_object

    from flows.serve import load_deployment_specs

    specs = {
        (import_object(s["entrypoint"]).name, s["name"]): s
        for s in load_deployment_specs(REPO / "prefect.yaml")
    }
    assert set(specs) == {
        ("annotate", "nightly"),
        ("annotate", "adhoc"),
        ("train", "finetune"),
        ("evaluate", "score"),
        ("export", "adhoc"),
    }
    nightly = specs["annotate", "nightly"]
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": True}]
    assert nightly["work_pool"]["name"] == POOL
    params = nightly["parameters"]
    # the shipped defaults work from a fresh clone: they resolve in the pull step's directory, examples/
    assert (EXAMPLES / params["input"]).is_dir() and (EXAMPLES / params["vocab_file"]).is_file()
    assert params["vocab_file"] == "classes.txt" and params["model"] == "tiny"
    assert not specs["annotate", "adhoc"]["schedules"]
    for spec in specs.values():  # one run per deployment at a time; a run started meanwhile is cancelled
        assert spec["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}, spec["name"]
    for spec in specs.values():  # every parameter a deployment sets is a parameter of its flow
        flow = import_object(spec["entrypoint"])
        assert set(spec.get("parameters") or {}) <= set(flow.parameters.properties)


def test_serve_builds_the_same_deployments():
    from flows.serve import build_deployments, load_deployment_specs

    deps = {(d.flow_name, d.name): d for d in build_deployments(load_deployment_specs(REPO / "prefect.yaml"))}
    assert set(deps) == {
        ("annotate", "nightly"),
        ("annotate", "adhoc"),
        ("train", "finetune"),
        ("evaluate", "score"),
        ("export", "adhoc"),
    }
    nightly = deps["annotate", "nightly"]
    assert [s.schedule.cron for s in nightly.schedules] == ["0 2 * * *"]
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert nightly.parameters["vocab_file"] == "classes.txt"
    assert nightly.entrypoint == "flows.annotate.annotate"
    assert not deps["annotate", "adhoc"].schedules
    for dep in deps.values():
        assert dep.concurrency_limit == 1 and dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    only = build_deployments(load_deployment_specs(REPO / "prefect.yaml"), only=["annotate/adhoc"])
    assert [(d.flow_name, d.name) for d in only] == [("annotate", "adhoc")]
