"""Tests of flows/: the annotate flow in-process under ``prefect_test_harness`` (a real temporary Prefect
server), the evaluate flow on its output, parameter validation, the credential rules and the retry rule.

One real plumbing-check run of the tiny model (the shipped examples -> S3 on a local moto server, with
fake secrets in the environment and in a Prefect Secret block), then a rerun into the same output, then
``evaluate`` of that output against its own COCO export. Everything else is fast.
"""

from __future__ import annotations

import inspect
import json
import os
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
ENV_SECRET = f"envSECRET{uuid.uuid4().hex}"
BLOCK_SECRET = f"blockSECRET{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_ray():
    """A local Ray with 2 CPUs, reused by the flow runs of this module (the pipeline reuses it)."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    yield
    if started:
        ray.shutdown()


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _flush_logs() -> None:
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()


def _logs(flow_run_id, wait_s: float = 15.0) -> list[str]:
    """Every log message of a flow run, oldest first. The server stores logs shortly after it receives them,
    so this reads (page by page) until two reads half a second apart agree, or ``wait_s`` has passed."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    _flush_logs()
    log_filter = LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))

    def read() -> list[str]:
        messages: list[str] = []
        with _client() as client:
            while True:
                page = client.read_logs(
                    log_filter=log_filter, offset=len(messages), sort=LogSort.TIMESTAMP_ASC
                )
                messages += [log.message for log in page]
                if not page:
                    return messages

    deadline = time.monotonic() + wait_s
    messages = read()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        again = read()
        if again == messages:
            break
        messages = again
    return messages


def _artifacts(flow_run_id) -> list:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with _client() as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )


def _task_runs(flow_run_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with _client() as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


@pytest.fixture(scope="module")
def s3_runs(prefect_api, local_ray, s3_endpoint):
    """Annotate the examples into ``s3://<bucket>/labels`` twice (run + rerun) with fake secrets around.

    Credentials reach the pipeline only through the Secret block named by ``storage_block``; a different
    fake secret sits in the environment (``AWS_SECRET_ACCESS_KEY``). Relative paths (``images``,
    ``classes.txt``) are resolved against the working directory ``examples/``.
    """
    import s3fs
    from prefect.blocks.system import Secret

    from flows.annotate import annotate

    bucket = f"flows-{uuid.uuid4().hex[:10]}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir(bucket)
    block = f"odise-test-{uuid.uuid4().hex[:8]}"
    Secret(
        value={
            "output_storage_options": {
                "key": "testing",
                "secret": BLOCK_SECRET,
                "client_kwargs": {"endpoint_url": s3_endpoint},
            }
        }
    ).save(block)
    output = f"s3://{bucket}/labels"
    saved_env, saved_cwd = os.environ.get("AWS_SECRET_ACCESS_KEY"), os.getcwd()
    os.environ["AWS_SECRET_ACCESS_KEY"] = ENV_SECRET
    os.chdir(EXAMPLES)
    try:
        kwargs = dict(
            input="images", output=output, vocab_file="classes.txt", model="tiny", storage_block=block
        )
        first = annotate(**kwargs, return_state=True)
        second = annotate(**kwargs, return_state=True)
    finally:
        os.chdir(saved_cwd)
        if saved_env is None:
            os.environ.pop("AWS_SECRET_ACCESS_KEY", None)
        else:
            os.environ["AWS_SECRET_ACCESS_KEY"] = saved_env
    fs.invalidate_cache()
    return {"first": first, "second": second, "fs": fs, "bucket": bucket, "output": output, "block": block}


# --------------------------------------------------------------------------------------------------
# the annotate flow, end to end
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_annotate_flow_labels_examples_and_writes_outputs(s3_runs):
    state = s3_runs["first"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary.images, summary.labelled, summary.errors) == (4, 4, 0)
    assert summary.shards_total == summary.shards_committed == 1
    assert summary.plumbing_check is True
    fs, root = s3_runs["fs"], f"{s3_runs['bucket']}/labels"
    for rel in ("provenance.json", "summary.json", "coco/panoptic.json", "coco/instances.json"):
        assert fs.exists(f"{root}/{rel}"), rel
    assert fs.glob(f"{root}/parquet/*.parquet")
    assert len(fs.glob(f"{root}/coco/panoptic/**/*.png")) == 4
    assert fs.glob(f"{root}/overlays/**/*.jpg")
    panoptic = json.loads(fs.cat_file(f"{root}/coco/panoptic.json"))
    assert len(panoptic["images"]) == 4
    assert [c["name"] for c in panoptic["categories"]][:3] == ["person", "cat", "cup"]  # examples/classes.txt


@pytest.mark.slow
def test_annotate_flow_artifacts(s3_runs):
    state = s3_runs["first"]
    arts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    assert {
        "annotate-progress",
        "annotate-summary",
        "annotate-categories",
        "annotate-report",
        "annotate-output",
    } <= set(arts)
    assert arts["annotate-progress"].type == "progress"
    assert float(arts["annotate-progress"].data) == 100.0
    assert arts["annotate-summary"].type == "table"
    table = (
        json.loads(arts["annotate-summary"].data)
        if isinstance(arts["annotate-summary"].data, str)
        else arts["annotate-summary"].data
    )
    values = {row["metric"]: row["value"] for row in table}
    assert values["labelled"] == 4 and values["plumbing check"] is True
    report = arts["annotate-report"]
    assert report.type == "markdown"
    assert "PLUMBING CHECK" in report.data and s3_runs["output"] in report.data
    assert report.data.count("![") >= 1  # overlay images
    assert arts["annotate-output"].type == "markdown" or "link" in str(arts["annotate-output"].type)
    assert "PLUMBING CHECK" in (arts["annotate-categories"].description or "")


@pytest.mark.slow
def test_annotate_flow_plumbing_check_and_forwarded_pipeline_logs(s3_runs):
    logs = "\n".join(_logs(s3_runs["first"].state_details.flow_run_id))
    assert "PLUMBING CHECK" in logs
    assert (
        "1 to label, 0 already committed" in logs
    )  # pipeline.annotate.run's own log, forwarded to the run's logs
    assert "committed: 1/1 shards" in logs  # progress


@pytest.mark.slow
def test_annotate_rerun_labels_nothing_new(s3_runs):
    state = s3_runs["second"]
    assert state.is_completed(), state.message
    summary = state.result()
    assert (summary.images, summary.labelled, summary.shards_committed, summary.shards_skipped) == (
        0,
        0,
        0,
        1,
    )
    assert "1 already committed" in "\n".join(_logs(state.state_details.flow_run_id))
    fs, root = s3_runs["fs"], f"{s3_runs['bucket']}/labels"
    assert len(fs.glob(f"{root}/coco/panoptic/**/*.png")) == 4
    arts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    assert "![" in arts["annotate-report"].data  # overlays of the earlier run are still shown


@pytest.mark.slow
def test_secrets_never_reach_logs_artifacts_parameters_or_outputs(s3_runs):
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    fs, bucket = s3_runs["fs"], s3_runs["bucket"]
    for key in ("first", "second"):
        fid = s3_runs[key].state_details.flow_run_id
        _flush_logs()
        with _client() as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[fid])))
            flow_run = client.read_flow_run(fid)
        assert logs
        everything = [log.model_dump_json() for log in logs]
        everything += [a.model_dump_json() for a in _artifacts(fid)]
        everything += [t.model_dump_json() for t in _task_runs(fid)]
        everything.append(flow_run.model_dump_json())
        for text in everything:
            assert ENV_SECRET not in text and BLOCK_SECRET not in text
        assert flow_run.parameters["storage_block"] == s3_runs["block"]
    files = [p for p in fs.find(bucket) if not p.endswith("/")]
    assert len(files) > 10
    for path in files:
        data = fs.cat_file(path)
        assert ENV_SECRET.encode() not in data and BLOCK_SECRET.encode() not in data, path


@pytest.mark.slow
def test_evaluate_flow_scores_the_output_against_its_own_coco_export(s3_runs, tmp_path):
    """Predictions scored against themselves (the run's COCO panoptic export as ground truth): PQ = 1."""
    from flows.evaluate import evaluate

    out = s3_runs["output"]
    state = evaluate(
        predictions=out,
        ground_truth=f"{out}/coco/panoptic.json",
        ground_truth_png=f"{out}/coco/panoptic",
        json_output=str(tmp_path / "pq.json"),
        storage_block=None,
        storage_options={"client_kwargs": {"endpoint_url": s3_runs["fs"].client_kwargs["endpoint_url"]}},
        return_state=True,
    )
    assert state.is_completed(), state.message
    metrics = state.result()
    assert metrics["num_images"] == 4
    assert metrics["panoptic"]["All"]["pq"] == pytest.approx(1.0)
    assert json.loads((tmp_path / "pq.json").read_text())["num_images"] == 4
    arts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    assert arts["evaluate-metrics"].type == "table"


@pytest.mark.slow
def test_train_flow_runs_one_step_of_the_tiny_model(prefect_api, tmp_path):
    """The train flow's wiring: parameters + options -> TrainConfig -> run_training -> result and artifact."""
    import torch

    from flows.train import train_flow
    from pipeline.train.data import write_synthetic_shapes_dataset

    write_synthetic_shapes_dataset(str(tmp_path / "train"), num_images=2, size=96, seed=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    cwd = os.getcwd()
    os.chdir(tmp_path)  # relative paths resolve against the working directory
    try:
        state = train_flow(
            train="train",
            output="run",
            model="tiny",
            max_steps=1,
            batch_size=1,
            checkpoint_every=1,
            eval_every=0,
            options={"crop_size": 32, "num_points": 64, "shuffle_buffer": 2, "log_every": 1},
            return_state=True,
        )
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["steps"] == 1 and result["output"] == str(tmp_path / "run")
    assert Path(result["checkpoint"]).is_file()
    arts = {a.key: a for a in _artifacts(state.state_details.flow_run_id)}
    rows = arts["train-result"].data
    rows = json.loads(rows) if isinstance(rows, str) else rows
    assert {"metric": "steps", "value": 1} in rows


# --------------------------------------------------------------------------------------------------
# validation: errors name the parameter and come before any task
# --------------------------------------------------------------------------------------------------
def _failed_before_any_task(state, tmp_path: Path) -> str:
    assert state.is_failed()
    assert _task_runs(state.state_details.flow_run_id) == []
    assert not (tmp_path / "out").exists()
    return state.message or ""


def test_bad_batch_size_fails_before_labelling(prefect_api, tmp_path):
    from flows.annotate import annotate

    state = annotate(
        input=str(EXAMPLES / "images"),
        output=str(tmp_path / "out"),
        vocab_file=str(EXAMPLES / "classes.txt"),
        model="tiny",
        batch_size=0,
        return_state=True,
    )
    message = _failed_before_any_task(state, tmp_path)
    assert "batch_size=0" in message and "greater than or equal to 1" in message


def test_missing_vocab_file_fails_before_labelling(prefect_api, tmp_path):
    from flows.annotate import annotate

    state = annotate(
        input=str(EXAMPLES / "images"),
        output=str(tmp_path / "out"),
        vocab_file="no-such-classes.txt",
        model="tiny",
        return_state=True,
    )
    message = _failed_before_any_task(state, tmp_path)
    assert "vocab_file='no-such-classes.txt'" in message and "working directory" in message


def test_invalid_dtype_is_refused_by_prefect_parameter_validation(prefect_api, tmp_path):
    from flows.annotate import annotate

    state = annotate(
        input=str(EXAMPLES / "images"),
        output=str(tmp_path / "out"),
        model="tiny",
        dtype="fp8",
        return_state=True,
    )
    assert state.is_failed()
    assert "dtype" in (state.message or "")
    assert not (tmp_path / "out").exists()


def test_credentials_in_storage_options_are_refused_without_echoing_them(prefect_api, tmp_path):
    from flows.annotate import annotate

    secret = f"paramSECRET{uuid.uuid4().hex}"
    state = annotate(
        input=str(EXAMPLES / "images"),
        output=str(tmp_path / "out"),
        vocab_file=str(EXAMPLES / "classes.txt"),
        model="tiny",
        storage_options={"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}, "secret": secret},
        return_state=True,
    )
    message = _failed_before_any_task(state, tmp_path)
    assert "storage_options['secret']" in message and "storage_block" in message
    assert secret not in message
    assert all(secret not in line for line in _logs(state.state_details.flow_run_id))


def test_block_credentials_merge_the_same_way_into_every_flow_config(prefect_api):
    """One merge for annotate, evaluate and train configs, in both block layouts (flat, or split into
    input / output options); configs with a single ``storage_options`` get the input part."""
    from prefect.blocks.system import Secret

    from flows._prefect import with_credentials
    from pipeline.config import AnnotateConfig, EvaluateConfig, TrainConfig

    endpoint = {"client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    flat, split = (f"odise-merge-{uuid.uuid4().hex[:8]}" for _ in range(2))
    Secret(value={"key": "k", "secret": "s"}).save(flat)
    Secret(value={"storage_options": {"key": "in"}, "output_storage_options": {"key": "out"}}).save(split)
    configs = [
        EvaluateConfig(ground_truth="gt.json", predictions="s3://b/out", storage_options=endpoint),
        TrainConfig(train="s3://b/train", output="s3://b/run", model="tiny", storage_options=endpoint),
    ]
    for config in configs:
        assert with_credentials(config, flat).storage_options == {**endpoint, "key": "k", "secret": "s"}
        assert with_credentials(config, split).storage_options == {**endpoint, "key": "in"}
        assert with_credentials(config, None) is config
        assert config.storage_options == endpoint  # the original is untouched
    annotate_config = AnnotateConfig(input="s3://b/in", output="s3://b/out", storage_options=endpoint)
    merged = with_credentials(annotate_config, split)
    assert merged.storage_options == {**endpoint, "key": "in"}
    assert merged.output_storage_options == {**endpoint, "key": "out"}


def test_unknown_storage_block_is_a_clear_parameter_error(prefect_api, tmp_path):
    from flows.annotate import annotate

    state = annotate(
        input=str(EXAMPLES / "images"),
        output=str(tmp_path / "out"),
        vocab_file=str(EXAMPLES / "classes.txt"),
        model="tiny",
        storage_block="no-such-block",
        return_state=True,
    )
    assert state.is_failed()
    assert "storage_block='no-such-block'" in (state.message or "")


# --------------------------------------------------------------------------------------------------
# odise-annotate -> flow -> run_annotation checks the inputs once
# --------------------------------------------------------------------------------------------------
class _Calls(list):
    """``(operation, path)`` of the calls made through :class:`_CountingLocalFileSystem` in this process."""


def _counting_filesystem(calls: _Calls):
    """A real local filesystem (fsspec's) that records listings, writes and whole-file reads."""
    from fsspec.implementations.local import LocalFileSystem

    class _CountingLocalFileSystem(LocalFileSystem):
        def find(self, path, *args, **kwargs):
            calls.append(("find", self._strip_protocol(path)))
            return super().find(path, *args, **kwargs)

        def glob(self, path, *args, **kwargs):
            calls.append(("glob", self._strip_protocol(path)))
            return super().glob(path, *args, **kwargs)

        def pipe_file(self, path, value, *args, **kwargs):
            calls.append(("pipe_file", self._strip_protocol(path)))
            return super().pipe_file(path, value, *args, **kwargs)

        def cat_file(self, path, *args, **kwargs):
            calls.append(("cat_file", self._strip_protocol(path)))
            return super().cat_file(path, *args, **kwargs)

    return _CountingLocalFileSystem


@pytest.mark.slow
def test_one_command_lists_probes_and_reads_provenance_once(prefect_api, local_ray, tmp_path, monkeypatch):
    """``odise-annotate`` (in this process, through the real flow and pipeline) lists the input once, writes one
    probe object and reads the output's provenance once: the CLI's check is handed to the flow's ``check``
    task, which hands it to ``label`` and ``run_annotation`` (before: three times each).

    The driver's local filesystem is fsspec's own ``LocalFileSystem`` with counters, registered for ``file``
    in this process only (Ray's workers read and write through the plain one)."""
    import shutil
    import signal

    import fsspec
    import pyarrow.dataset as pads
    from fsspec.implementations.local import LocalFileSystem

    from flows.cli import annotate_main

    images = tmp_path / "images"
    shutil.copytree(EXAMPLES / "images", images)
    out = tmp_path / "out"
    for name, value in (
        ("PREFECT_LOGGING_LEVEL", "WARNING"),
        ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"),
        ("RAY_USAGE_STATS_ENABLED", "0"),
    ):
        monkeypatch.setenv(name, os.environ.get(name, value))  # the command sets these; restored afterwards
    calls = _Calls()
    saved_sigint = signal.getsignal(signal.SIGINT)
    fsspec.register_implementation("file", _counting_filesystem(calls), clobber=True)
    try:
        code = annotate_main(
            ["--input", str(images), "--output", str(out), "--vocab-file", str(EXAMPLES / "classes.txt"),
             "--model", "tiny", "--overlays", "0", "--no-progress", "-v"]
        )  # fmt: skip
    finally:
        fsspec.register_implementation("file", LocalFileSystem, clobber=True)
        signal.signal(signal.SIGINT, saved_sigint)
    assert code == 0
    listings = [p for op, p in calls if op in ("find", "glob") and p.startswith(str(images))]
    probes = [p for op, p in calls if op == "pipe_file" and "/.write-probe-" in p]
    provenance_reads = [p for op, p in calls if op == "cat_file" and p == f"{out}/provenance.json"]
    assert (len(listings), len(probes), len(provenance_reads)) == (1, 1, 1), calls
    keys = (
        pads.dataset(str(out / "parquet"), format="parquet")
        .to_table(columns=["key"])
        .column("key")
        .to_pylist()
    )
    assert sorted(keys) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert json.loads((out / "provenance.json").read_text())["model_variant"] == "tiny"


# --------------------------------------------------------------------------------------------------
# pure functions (no Prefect server)
# --------------------------------------------------------------------------------------------------
def test_annotate_parameters_cover_every_config_field_with_the_same_defaults():
    from flows.annotate import annotate
    from flows.params import config_default
    from pipeline.config import AnnotateConfig

    params = inspect.signature(annotate.fn).parameters
    assert set(params) == set(AnnotateConfig.model_fields) | {"storage_block"}
    for name, p in params.items():
        if name in ("input", "output", "storage_block") or p.default is None:
            continue
        assert p.default == config_default(name), name
    schema = annotate.parameters.model_dump()
    assert schema["required"] == ["input", "output"]
    assert "vocab_file" in schema["properties"]


def test_evaluate_and_train_parameters_map_onto_their_configs():
    from flows.evaluate import evaluate
    from flows.train import train_flow
    from pipeline.config import EvaluateConfig, TrainConfig

    ev = inspect.signature(evaluate.fn).parameters
    assert set(ev) == set(EvaluateConfig.model_fields) | {"storage_block"}
    for name in ("instance_ap", "semantic", "match"):
        assert ev[name].default == EvaluateConfig.model_fields[name].default
    tr = set(inspect.signature(train_flow.fn).parameters) - {"options", "storage_block"}
    assert tr <= set(TrainConfig.model_fields)


def test_train_and_evaluate_validation_names_the_parameter(tmp_path):
    from flows.evaluate import evaluate_config
    from flows.params import ParameterError
    from flows.train import train_config

    with pytest.raises(ParameterError, match="max_steps=0"):
        train_config({"train": "data/train", "output": "runs/x", "max_steps": 0}, cwd=tmp_path)
    with pytest.raises(ParameterError, match="credential"):
        train_config({"train": "d", "output": "o", "storage_options": {"aws_secret_access_key": "x"}})
    cfg = train_config(
        {"train": "data/train", "output": "runs/x", "model": "tiny", "options": {"crop_size": 64}},
        cwd=tmp_path,
    )
    assert cfg.train == str(tmp_path / "data/train") and cfg.crop_size == 64
    with pytest.raises(ParameterError, match="ground_truth"):
        evaluate_config({"predictions": "out"})
    cfg = evaluate_config(
        {"predictions": "out", "ground_truth": "gt.json", "json_output": "pq.json"}, cwd=tmp_path
    )
    assert cfg.json_output == str(tmp_path / "pq.json")


def test_annotate_config_resolves_relative_paths_against_the_working_directory(tmp_path):
    from flows.params import ParameterError, annotate_config

    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    cfg = annotate_config(
        {"input": "shards/*.tar", "output": "out", "vocab_file": "classes.txt"}, cwd=tmp_path
    )
    assert cfg.input == str(tmp_path / "shards/*.tar")
    assert cfg.output == str(tmp_path / "out") and cfg.vocab_file == str(tmp_path / "classes.txt")
    cfg = annotate_config(
        {"input": "s3://b/x/{000..009}.tar", "output": "s3://b/out", "vocab_file": "ade20k_150"}, cwd=tmp_path
    )
    assert (cfg.input, cfg.output, cfg.vocab_file) == ("s3://b/x/{000..009}.tar", "s3://b/out", "ade20k_150")
    with pytest.raises(ParameterError, match=r"invalid parameter vocab_file='nope.txt'.*built-in vocabulary"):
        annotate_config({"input": "x", "output": "o", "vocab_file": "nope.txt"}, cwd=tmp_path)
    with pytest.raises(ParameterError, match=r"overlap_threshold=2"):
        annotate_config({"input": "x", "output": "o", "overlap_threshold": 2}, cwd=tmp_path)


def test_credential_keys_are_found_at_any_depth():
    from flows.params import credential_paths

    opts = {
        "client_kwargs": {"endpoint_url": "http://x", "aws_secret_access_key": "s"},
        "anon": False,
        "config_kwargs": {"retries": {"max_attempts": 3}},
        "token": "t",
        "AWS-Session-Token": "u",
    }
    assert credential_paths(opts) == [
        "['client_kwargs']['aws_secret_access_key']",
        "['token']",
        "['AWS-Session-Token']",
    ]
    assert credential_paths({"client_kwargs": {"endpoint_url": "http://x", "region_name": "eu"}}) == []


def test_retry_only_on_io_errors():
    from flows.params import ParameterError, is_transient_io_error
    from odise_model import WeightsNotFoundError
    from odise_model.vocabulary import VocabularyError
    from pipeline.annotate.checks import OutputError
    from pipeline.annotate.run import PipelineError
    from pipeline.shards import InputError

    def chained(outer: BaseException, cause: BaseException) -> BaseException:
        outer.__cause__ = cause
        return outer

    assert is_transient_io_error(ConnectionResetError("reset by peer"))
    assert is_transient_io_error(TimeoutError("read timed out"))
    assert is_transient_io_error(OSError(5, "Input/output error"))
    assert is_transient_io_error(chained(PipelineError("pipeline failed"), ConnectionError("x")))
    assert is_transient_io_error(chained(OutputError("not writable"), ConnectionRefusedError("refused")))
    type_like_botocore = type("EndpointConnectionError", (Exception,), {})
    assert is_transient_io_error(type_like_botocore("could not connect"))
    assert not is_transient_io_error(WeightsNotFoundError("checkpoint missing"))
    assert not is_transient_io_error(InputError("no shards"))
    assert not is_transient_io_error(FileNotFoundError("x"))
    assert not is_transient_io_error(VocabularyError("bad line"))
    assert not is_transient_io_error(ParameterError("batch_size"))
    assert not is_transient_io_error(chained(OutputError("not writable"), PermissionError("denied")))
    assert not is_transient_io_error(OutputError("lies inside the input folder"))
    assert not is_transient_io_error(PipelineError("shards did not receive all their samples"))
    assert not is_transient_io_error(chained(PipelineError("failed"), ValueError("bad")))
