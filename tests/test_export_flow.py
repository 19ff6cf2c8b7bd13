"""Tests of flows/export.py and ``odise-export``: the Prefect ``export`` flow in-process under
``prefect_test_harness`` (a real temporary Prefect server) with credentials from a Secret block, its artifacts,
parameter validation, and the console script's help and one-line errors.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from export_fixtures import write_annotate_output

REPO = Path(__file__).resolve().parents[1]


def _artifacts(flow_run_id) -> dict:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    return {a.key: a for a in arts}


def test_export_flow_on_s3_with_a_secret_block(prefect_api, s3_bucket, s3_endpoint, s3_storage_options):
    from prefect.blocks.system import Secret

    from flows.export import export

    base = f"s3://{s3_bucket}"
    write_annotate_output(f"{base}/out", f"{base}/images", f"{base}/s0.tar", s3_storage_options)
    block = f"export-test-{uuid.uuid4().hex[:8]}"
    Secret(value={"key": "testing", "secret": "testing"}).save(block)
    endpoint = {"client_kwargs": {"endpoint_url": s3_endpoint}}  # no credentials in the parameters
    state = export(
        input=f"{base}/out",
        output=f"{base}/exports/dm",
        format="datumaro",
        order="uncertainty",
        max_images=2,
        copy_images=True,
        storage_options=endpoint,
        storage_block=block,
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["images"] == 2 and summary["images_copied"] == 2 and summary["plumbing_check"]
    arts = _artifacts(state.state_details.flow_run_id)
    assert {"export-summary", "export-report"} <= set(arts)
    report = arts["export-report"].data
    assert "PLUMBING CHECK" in report and "annotations/panoptic_default.json" in report
    assert 'dm.Dataset.import_from("' in report
    table = arts["export-summary"].data
    rows = {r["metric"]: r["value"] for r in (json.loads(table) if isinstance(table, str) else table)}
    assert rows["images"] == 2 and rows["format"] == "datumaro"
    assert "testing" not in json.dumps(state.state_details.model_dump(mode="json"))


def test_export_flow_refuses_credentials_in_parameters(prefect_api, tmp_path):
    from flows.export import export

    state = export(
        input=str(tmp_path),
        output=str(tmp_path / "x"),
        format="hf",
        storage_options={"secret": "s3cr3t-value"},
        return_state=True,
    )
    assert state.is_failed()
    assert "looks like a credential" in state.message and "s3cr3t-value" not in state.message


def test_export_parameters_cover_every_config_field():
    from flows.export import export, export_config
    from pipeline.export.config import ExportConfig

    params = set(inspect.signature(export.fn).parameters) - {"storage_block"}
    assert params == set(ExportConfig.model_fields)
    config = export_config({"input": "out", "output": "exp", "format": "cvat"}, cwd="/data")
    assert (config.input, config.output, config.target) == ("/data/out", "/data/exp", "datumaro")
    from flows.params import ParameterError

    with pytest.raises(ParameterError, match=r"invalid export parameter min_score=2: Input should be less"):
        export_config({"input": "out", "output": "exp", "format": "hf", "min_score": 2})
    with pytest.raises(
        ParameterError, match=r"include_image is for format hf \(format labelstudio: use copy_images\)"
    ):
        export_config({"input": "out", "output": "exp", "format": "labelstudio", "include_image": True})
    with pytest.raises(ParameterError, match=r"subset='a/b': must be letters"):
        export_config({"input": "out", "output": "exp", "format": "datumaro", "subset": "a/b"})


def _cli(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "ph")}
    env.pop("PREFECT_API_URL", None)
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", "export", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_odise_export_help_and_one_line_errors(tmp_path):
    from pipeline.export.config import ExportConfig

    proc = _cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    flags = set(re.findall(r"--[a-z][a-z0-9-]*", proc.stdout))
    for name in ExportConfig.model_fields:
        assert "--" + name.replace("_", "-") in flags, name
    assert {"--storage-block", "--verbose", "--no-copy-images"} <= flags
    assert "labelstudio" in proc.stdout and "Exit codes" in proc.stdout

    annotated = write_annotate_output(
        str(tmp_path / "out"), f"file://{tmp_path}/img", f"file://{tmp_path}/s.tar"
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.txt").write_text("x")
    cases = [
        (["--input", "nope", "--output", "e", "--format", "hf"], "annotate output .*nope does not exist"),
        (["--input", "out", "--output", "taken", "--format", "hf"], "not empty and holds no export.json"),
        (["--input", "out", "--output", "e", "--format", "coco"], "invalid choice: 'coco'"),
    ]
    for args, message in cases:
        proc = _cli(args, tmp_path)
        assert proc.returncode == 2, (args, proc.stderr)
        assert re.search(message, proc.stderr), (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert annotated.output.endswith("out")
