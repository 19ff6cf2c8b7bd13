"""The deployment commands of README.md, run exactly as written, against a real ``prefect server``.

The session's ``prefect server start --host 127.0.0.1 --port <free port>`` (conftest's ``prefect_server``,
SQLite in a temporary PREFECT_HOME) serves it. The test then runs, from the repository root: ``prefect work-pool create``, ``prefect
--no-prompt deploy --all`` (the nightly schedule must arrive INACTIVE), and ``prefect deployment run
annotate/nightly --param vocab_file=classes.txt``:

* twice with ``--param model=tiny`` (plus an output folder in tmp) and ``prefect worker start --pool
  local-process --run-once``: one run completes (the sample photos labelled), the other is cancelled by the
  deployment's concurrency limit of 1 with ``CANCEL_NEW``;
* once exactly as a user types it, with a second ``--run-once`` worker that is offline and has no weights: the
  nightly deployment asks for the official weights, so the run fails with the missing-weights error naming the
  files, before anything is written;

then turns the schedule on as the README says (``prefect deployment schedule ls`` / ``resume``). Workers
are stopped before the server (SIGINT).
Fast tests check ``prefect.yaml`` itself and the deployments ``python -m flows.serve`` builds from it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import stop_process

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
PREFECT = str(Path(sys.executable).parent / "prefect")
POOL = "local-process"


def _cli(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    proc = subprocess.run(
        [PREFECT, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _run_worker(env: dict[str, str], log_path: Path, timeout: float = 480) -> None:
    """``prefect worker start --pool local-process --run-once``: runs the flow runs due now, then exits."""
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [PREFECT, "worker", "start", "--pool", POOL, "--run-once"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            worker.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        finally:
            stop_process(worker)  # before the server (fixture teardown)


def _run_id(output: str) -> str:
    return re.search(r"UUID: ([0-9a-f-]{36})", output).group(1)


def _flow_run_logs(api: str, flow_run_id: str) -> str:
    import httpx

    body = {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC", "limit": 200}
    return "\n".join(r["message"] for r in httpx.post(f"{api}/logs/filter", json=body, timeout=10).json())


@pytest.mark.slow
def test_readme_commands_label_the_examples_through_a_worker(prefect_server, tmp_path):
    import httpx

    env, api = prefect_server, prefect_server["PREFECT_API_URL"]
    # workers offline, with an empty weights cache: the official weights are nowhere to be found
    env = {**env, "ODISE_OFFLINE": "1", "ODISE_CACHE": str(tmp_path / "empty-cache"), "HF_HUB_OFFLINE": "1"}
    env.pop("ODISE_MODEL_ZOO", None)
    out = tmp_path / "nightly"
    # the commands of README.md, from the repository root
    _cli(["work-pool", "create", POOL, "--type", "process"], env)
    deployed = _cli(["--no-prompt", "deploy", "--all"], env, timeout=300)
    for name in (
        "annotate/nightly",
        "annotate/adhoc",
        "annotate/plumbing",
        "train/finetune",
        "evaluate/score",
    ):
        assert name in deployed, deployed
    dep = httpx.get(f"{api}/deployments/name/annotate/nightly", timeout=10).json()
    assert [(s["schedule"]["cron"], s["active"]) for s in dep["schedules"]] == [("0 2 * * *", False)]
    assert dep["parameters"]["model"] == "odise_label_coco"

    # the README's command, with the tiny model (no weights here) and an output in tmp
    user_command = ["deployment", "run", "annotate/nightly", "--param", "vocab_file=classes.txt"]
    tiny = ["--param", f"output={out}", "--param", "model=tiny", "--param", "num_cpus=2"]
    flow_run_id = _run_id(_cli([*user_command, *tiny], env))
    # a second run of the same deployment while the first is active is cancelled (concurrency 1, CANCEL_NEW)
    second_run_id = _run_id(_cli([*user_command, *tiny], env))
    worker_log = tmp_path / "worker.log"
    _run_worker(env, worker_log)

    runs = {
        rid: httpx.get(f"{api}/flow_runs/{rid}", timeout=10).json() for rid in (flow_run_id, second_run_id)
    }
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

    # the README's command exactly as a user types it: the official model, whose weights are missing here
    default_output = EXAMPLES / "out" / "nightly"
    existed = default_output.exists()
    real_run_id = _run_id(_cli(user_command, env))
    worker_log = tmp_path / "worker-real.log"
    _run_worker(env, worker_log)
    real = httpx.get(f"{api}/flow_runs/{real_run_id}", timeout=10).json()
    logs = _flow_run_logs(api, real_run_id)
    assert real["state"]["type"] == "FAILED", f"{real['state']}\n{worker_log.read_text()[-4000:]}"
    assert real["parameters"] == {"input": "images", "output": "out/nightly", "vocab_file": "classes.txt",
                                  "model": "odise_label_coco"}  # fmt: skip
    for needed in ("weights files are not available", "odise_label_coco_50e-b67d2efc.pth", "sd-v1-3.ckpt",
                   "ViT-L-14-336px.pt", "offline mode"):  # fmt: skip
        assert needed in logs, logs[-4000:]
    assert "PLUMBING CHECK" not in logs
    assert existed or not default_output.exists()  # failed before writing anything

    dep = httpx.get(f"{api}/deployments/name/annotate/nightly", timeout=10).json()
    assert dep["pull_steps"] == [
        {"prefect.deployments.steps.set_working_directory": {"directory": str(EXAMPLES)}}
    ]
    assert dep["schedules"][0]["schedule"]["timezone"] == "UTC"
    assert dep["work_pool_name"] == POOL and dep["entrypoint"] == "flows.annotate:annotate"
    limit = dep.get("concurrency_limit") or (dep.get("global_concurrency_limit") or {}).get("limit")
    assert limit == 1 and dep["concurrency_options"]["collision_strategy"] == "CANCEL_NEW"

    # turning the schedule on, as the README says
    (schedule,) = json.loads(_cli(["deployment", "schedule", "ls", "annotate/nightly", "-o", "json"], env))
    assert schedule["active"] is False
    _cli(["deployment", "schedule", "resume", "annotate/nightly", schedule["id"]], env)
    dep = httpx.get(f"{api}/deployments/name/annotate/nightly", timeout=10).json()
    assert [s["active"] for s in dep["schedules"]] == [True]


# --------------------------------------------------------------------------------------------------
# prefect.yaml and flows.serve (no server)
# --------------------------------------------------------------------------------------------------
DEPLOYMENTS = {
    ("annotate", "nightly"),
    ("annotate", "adhoc"),
    ("annotate", "plumbing"),
    ("train", "finetune"),
    ("evaluate", "score"),
    ("export", "adhoc"),
}


def test_prefect_yaml_deployments():
    from prefect.utilities.importtools import import_object

    from flows.serve import load_deployment_specs

    specs = {
        (import_object(s["entrypoint"]).name, s["name"]): s
        for s in load_deployment_specs(REPO / "prefect.yaml")
    }
    assert set(specs) == DEPLOYMENTS
    nightly = specs["annotate", "nightly"]
    # `prefect deploy --all` turns nothing on: the nightly schedule ships inactive, with the real model
    assert nightly["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC", "active": False}]
    assert nightly["work_pool"]["name"] == POOL
    for name in ("nightly", "adhoc", "plumbing"):
        params = specs["annotate", name]["parameters"]
        # placeholders that resolve in the pull step's directory, examples/ (the README says to change them)
        assert (EXAMPLES / params["input"]).is_dir() and (EXAMPLES / params["vocab_file"]).is_file()
        assert params["vocab_file"] == "classes.txt" and params["output"] == f"out/{name}"
    assert specs["annotate", "nightly"]["parameters"]["model"] == "odise_label_coco"
    assert specs["annotate", "adhoc"]["parameters"]["model"] == "odise_label_coco"
    assert (
        specs["annotate", "plumbing"]["parameters"]["model"] == "tiny"
    )  # the only tiny one, never scheduled
    for key, spec in specs.items():
        assert key == ("annotate", "nightly") or not spec["schedules"], key
    for spec in specs.values():  # one run per deployment at a time; a run started meanwhile is cancelled
        assert spec["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}, spec["name"]
    for spec in specs.values():  # every parameter a deployment sets is a parameter of its flow
        flow = import_object(spec["entrypoint"])
        assert set(spec.get("parameters") or {}) <= set(flow.parameters.properties)


def test_serve_builds_the_same_deployments():
    from flows.serve import build_deployments, load_deployment_specs

    deps = {(d.flow_name, d.name): d for d in build_deployments(load_deployment_specs(REPO / "prefect.yaml"))}
    assert set(deps) == DEPLOYMENTS
    nightly = deps["annotate", "nightly"]
    assert [(s.schedule.cron, s.active) for s in nightly.schedules] == [("0 2 * * *", False)]
    assert nightly.schedules[0].schedule.timezone == "UTC"
    assert (
        nightly.parameters["vocab_file"] == "classes.txt"
        and nightly.parameters["model"] == "odise_label_coco"
    )
    assert deps["annotate", "plumbing"].parameters["model"] == "tiny"
    assert nightly.entrypoint == "flows.annotate.annotate"
    assert not deps["annotate", "adhoc"].schedules and not deps["annotate", "plumbing"].schedules
    for dep in deps.values():
        assert dep.concurrency_limit == 1 and dep.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    only = build_deployments(load_deployment_specs(REPO / "prefect.yaml"), only=["annotate/adhoc"])
    assert [(d.flow_name, d.name) for d in only] == [("annotate", "adhoc")]
