"""Credentials never recorded: unique canary secrets in every form a credential takes, searched for in every
output file, log, Prefect record and Ray Train run state.

* ``test_annotate_flow_records_no_canary``: the annotate flow (a real temporary Prefect server, a local Ray,
  the tiny model) reads a manifest of (a) an http URL to a local server that demands an ``Authorization``
  header (given through a Prefect Secret block: the one place headers are allowed) and a ``token`` query
  parameter, and (b) a presigned URL of the moto S3 server (``X-Amz-Credential`` / ``-Security-Token`` /
  ``-Signature``). Both shards must be labelled (so the secrets were used), and no canary may appear in any
  output file (Parquet bytes and decoded values / metadata, JSON, markers, COCO, PNGs), captured log or
  output, Prefect log, artifact, task run or flow run record, or Ray session log.
* ``test_python_api_redacts_presigned_input_vocabulary_and_weights``: ``run_annotation`` with a presigned
  input, vocabulary and checkpoint; then the same input re-signed: the shard is already committed (its
  identity is the URL without the signature), so nothing is labelled twice.
* ``test_refusals_never_echo_the_canary``: user-info in an endpoint, an Authorization header in
  ``storage_options``, a presigned input, vocabulary or weights URL as a parameter are refused (CLI: exit 2
  before Prefect or Ray start; flow: failed before any task) with the option path named, never the value.
* ``test_ray_train_run_state_holds_no_block_credentials``: the train flow on Ray Train (``TorchTrainer``, one
  CPU worker: also the suite's test of the Ray Train path) with a Secret block (canary key and secret,
  accepted by moto; the endpoint only in the block, so the workers must load it) on S3 data: Ray Train's run
  state (its state actor's runs with their ``train_loop_config``, and the storage path) and every output
  file are free of the canaries.
"""

from __future__ import annotations

import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from helpers import jpeg_bytes, tar_bytes, webdataset_members

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def _canary(tag: str) -> str:
    """A unique secret; distinct random hex so no two canaries share a substring (compression-safe)."""
    return f"{tag}{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"


# --------------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------------
class _AuthServer:
    """A local http server for files that demands ``Authorization: Bearer <header>`` and ``?token=<token>``."""

    def __init__(self, header: str, token: str) -> None:
        self.files: dict[str, bytes] = {}
        self.denied = 0
        self.token = token
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # the request line holds the token: never print it
                pass

            def _body(self) -> bytes | None:
                parts = urlsplit(self.path)
                ok = (
                    self.headers.get("Authorization") == f"Bearer {header}"
                    and parse_qs(parts.query).get("token") == [server.token]
                    and parts.path in server.files
                )
                if not ok:
                    server.denied += 1
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                return server.files[parts.path]

            def do_HEAD(self):
                data = self._body()
                if data is not None:
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()

            def do_GET(self):
                data = self._body()
                if data is None:
                    return
                start, end = 0, len(data) - 1
                rng = self.headers.get("Range")
                if rng and rng.startswith("bytes="):
                    a, _, b = rng[6:].partition("-")
                    start, end = int(a or 0), min(int(b) if b else end, end)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
                else:
                    self.send_response(200)
                chunk = data[start : end + 1]
                self.send_header("Content-Length", str(len(chunk)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                self.wfile.write(chunk)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _s3(s3_endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})


def _presign(s3_endpoint: str, bucket: str, key: str, key_id: str, session_token: str) -> str:
    """A SigV4 presigned GET URL of the moto server, signed with a canary key id and session token."""
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=key_id,
        aws_secret_access_key="not-used-by-moto",
        aws_session_token=session_token,
        region_name="us-east-1",
        config=Config(signature_version="s3v4"),
    )
    return client.generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900)


def _signature(url: str) -> str:
    return parse_qs(urlsplit(url).query)["X-Amz-Signature"][0]


def _output_texts(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` as bytes, plus each Parquet file decoded (values and schema metadata) as JSON."""
    import pyarrow.parquet as pq

    found: dict[str, bytes] = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        found[str(path)] = path.read_bytes()
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            meta = {k.decode(): v.decode(errors="replace") for k, v in (table.schema.metadata or {}).items()}
            rows = table.drop_columns(
                [c for c in ("panoptic_png", "semantic_png") if c in table.column_names]
            )
            decoded = json.dumps({"meta": meta, "rows": rows.to_pylist()}, default=str)
            found[f"{path} (decoded)"] = decoded.encode()
    return found


def _assert_absent(canaries: list[str], texts: dict[str, bytes | str]) -> None:
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        for canary in canaries:
            at = data.find(canary.encode())
            context = data[max(0, at - 600) : at + 100].decode(errors="replace").replace(canary, "<CANARY>")
            assert at < 0, f"canary {canary[:6]}... found in {where}:\n{context}"


def _ray_session_logs() -> dict[str, bytes]:
    import ray

    if not ray.is_initialized():
        return {}
    from ray._private.worker import global_worker

    logs = Path(global_worker.node.get_session_dir_path()) / "logs"
    return {str(p): p.read_bytes() for p in logs.rglob("*") if p.is_file() and p.stat().st_size < 50 * 2**20}


def _prefect_records(flow_run_id, *, tasks: bool = True) -> dict[str, str]:
    """Every record Prefect keeps of a flow run: logs, artifacts, task runs (states, messages), the flow run.

    ``tasks=False``, for a flow run that failed before any task: its logs, artifacts and the flow run's state
    (not the flow run itself: its parameters are the user's input).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterId,
        LogFilter,
        LogFilterFlowRunId,
    )
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
        task_runs = (
            client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
            if tasks
            else []
        )
        flow_run = client.read_flow_run(flow_run_id)
    records = {f"log {i}": log.model_dump_json() for i, log in enumerate(logs)}
    records.update({f"artifact {a.key}": a.model_dump_json() for a in artifacts})
    if not tasks:
        records["flow run state"] = flow_run.state.model_dump_json() if flow_run.state else ""
        return records
    records.update({f"task run {t.name}": t.model_dump_json() for t in task_runs})
    records["flow run"] = flow_run.model_dump_json()
    assert logs and artifacts and task_runs
    return records


# --------------------------------------------------------------------------------------------------
# the annotate flow
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_annotate_flow_records_no_canary(
    prefect_api, ray_local, s3_endpoint, photos, tmp_path, capfd, caplog
):
    from prefect.blocks.system import Secret

    from flows.annotate import annotate

    header, token, key_id, session = (_canary(t) for t in ("hdr", "tok", "AKIA", "sts"))
    server = _AuthServer(header, token)
    try:
        shard_a = {
            "astronaut": jpeg_bytes(photos["astronaut"], 64),
            "coffee": jpeg_bytes(photos["coffee"], 64),
        }
        server.files["/auth/shard-a.tar"] = tar_bytes(webdataset_members(shard_a))
        bucket = f"canary-{uuid.uuid4().hex[:10]}"
        fs = _s3(s3_endpoint)
        fs.mkdir(bucket)
        shard_b = {"chelsea": jpeg_bytes(photos["chelsea"], 64)}
        fs.pipe(f"{bucket}/shards/shard-b.tar", tar_bytes(webdataset_members(shard_b)))
        presigned = _presign(s3_endpoint, bucket, "shards/shard-b.tar", key_id, session)
        signature = _signature(presigned)
        manifest = tmp_path / "inputs.txt"
        manifest.write_text(f"{server.url}/auth/shard-a.tar?token={token}\n{presigned}\n")
        block = f"canary-{uuid.uuid4().hex[:8]}"
        Secret(value={"storage_options": {"headers": {"Authorization": f"Bearer {header}"}}}).save(block)
        output = tmp_path / "out"
        with caplog.at_level("INFO"):
            state = annotate(
                input=str(manifest),
                output=str(output),
                vocab_file=str(EXAMPLES / "classes.txt"),
                model="tiny",
                overlays=1,
                num_cpus=None,
                storage_block=block,
                no_progress_timeout_s=120,
                return_state=True,
            )
        assert state.is_completed(), state.message
        summary = state.result()
        # both shards were read and labelled: the header, the token and the signature were used
        assert summary.shards_committed == 2 and summary.labelled == 3 and summary.errors == 0
    finally:
        server.close()

    canaries = [header, token, key_id, session, signature]
    texts: dict[str, bytes | str] = dict(_output_texts(output))
    assert any(k.endswith(".parquet") for k in texts) and any("_commits" in k for k in texts)
    assert any("coco" in k for k in texts) and any(k.endswith("provenance.json") for k in texts)
    texts.update(_prefect_records(state.state_details.flow_run_id))
    captured = capfd.readouterr()
    texts["stdout"], texts["stderr"], texts["caplog"] = captured.out, captured.err, caplog.text
    texts.update(_ray_session_logs())
    _assert_absent(canaries, texts)

    # what is recorded instead: the URLs without their credentials
    import pyarrow.dataset as ds

    shards = set(ds.dataset(str(output / "parquet")).to_table(columns=["shard"]).column("shard").to_pylist())
    object_url = presigned.split("?", 1)[0]
    assert shards == {f"{server.url}/auth/shard-a.tar", object_url}
    markers = [json.loads(p.read_text()) for p in (output / "_commits").glob("*.json")]
    assert {m["shard"] for m in markers} == shards


# --------------------------------------------------------------------------------------------------
# the Python API: presigned vocabulary and weights too; a re-signed input is the same shard
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_python_api_redacts_presigned_input_vocabulary_and_weights(
    ray_local, s3_endpoint, photos, tmp_path, capfd, caplog
):
    import odise_model
    from odise_model.checkpoint import save_checkpoint
    from pipeline import AnnotateConfig, run_annotation

    key_id, session, key_id2, session2 = (_canary(t) for t in ("AKIA", "sts", "AKIB", "stt"))
    bucket = f"canary-{uuid.uuid4().hex[:10]}"
    fs = _s3(s3_endpoint)
    fs.mkdir(bucket)
    shard_c = {"rocket": jpeg_bytes(photos["rocket"], 64), "coffee": jpeg_bytes(photos["coffee"], 64)}
    fs.pipe(f"{bucket}/in/shard-c.tar", tar_bytes(webdataset_members(shard_c)))
    fs.pipe(f"{bucket}/vocab/classes.txt", (EXAMPLES / "classes.txt").read_bytes())
    local_ckpt = tmp_path / "tiny.pth"
    save_checkpoint(odise_model.build_odise("tiny", seed=3), local_ckpt)
    fs.put_file(str(local_ckpt), f"{bucket}/weights/tiny.pth")

    def signed(key: str, kid: str, sts: str) -> str:
        return _presign(s3_endpoint, bucket, key, kid, sts)

    urls = {
        k: signed(k, key_id, session) for k in ("in/shard-c.tar", "vocab/classes.txt", "weights/tiny.pth")
    }
    output = tmp_path / "out"
    config = AnnotateConfig(
        input=urls["in/shard-c.tar"],
        output=str(output),
        vocab_file=urls["vocab/classes.txt"],
        model="tiny",
        checkpoint=urls["weights/tiny.pth"],
        offline=False,  # (the tests set HF_HUB_OFFLINE=1) the checkpoint comes from the local moto server
        cache_dir=str(tmp_path / "cache"),
        overlays=1,
        no_progress_timeout_s=120,
    )
    with caplog.at_level("INFO"):
        first = run_annotation(config)
    assert first.shards_committed == 1 and first.labelled == 2

    # re-signed (new key id, token and signature): the same shard, already committed: nothing labelled twice
    resigned = signed("in/shard-c.tar", key_id2, session2)
    with caplog.at_level("INFO"):
        second = run_annotation(config.model_copy(update={"input": resigned}))
    assert second.shards_skipped == 1 and second.shards_committed == 0 and second.images == 0

    canaries = [key_id, session, key_id2, session2, *(_signature(u) for u in [*urls.values(), resigned])]
    texts: dict[str, bytes | str] = dict(_output_texts(output))
    captured = capfd.readouterr()
    texts["stdout"], texts["stderr"], texts["caplog"] = captured.out, captured.err, caplog.text
    _assert_absent(canaries, texts)
    provenance = json.loads((output / "provenance.json").read_text())
    object_url = f"{s3_endpoint}/{bucket}/vocab/classes.txt"
    assert provenance["vocabulary_source"] == object_url
    assert provenance["settings"]["weights"]["checkpoint"] == f"{s3_endpoint}/{bucket}/weights/tiny.pth"
    assert provenance["settings"]["plumbing_check"] is False


# --------------------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------------------
def test_refusals_never_echo_the_canary(prefect_api, tmp_path, capsys):
    from flows.annotate import annotate
    from flows.cli import annotate_main

    userinfo, header, sig = (_canary(t) for t in ("pw", "hdr", "sig"))
    base = ["--input", str(EXAMPLES / "images"), "--output", str(tmp_path / "out")]
    base += ["--vocab-file", str(EXAMPLES / "classes.txt"), "--model", "tiny"]
    cases = [
        (
            [
                "--storage-options",
                json.dumps({"client_kwargs": {"endpoint_url": f"http://u:{userinfo}@127.0.0.1:9"}}),
            ],
            "storage_options['client_kwargs']['endpoint_url'] is a URL with a user name / password",
        ),
        (
            [
                "--storage-options",
                json.dumps({"client_kwargs": {"headers": {"Authorization": f"Bearer {header}"}}}),
            ],
            "storage_options['client_kwargs']['headers']['Authorization'] is a credential header",
        ),
        (
            ["--checkpoint", f"https://h/w.pth?X-Amz-Signature={sig}"],
            "checkpoint is a URL with a credential (query parameter 'X-Amz-Signature')",
        ),
    ]
    for extra, expected in cases:
        assert annotate_main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert expected in err, err
        for canary in (userinfo, header, sig):
            assert canary not in err
    assert not (tmp_path / "out").exists()

    state = annotate(
        input=f"https://h/in.tar?sig={sig}",
        output=str(tmp_path / "out"),
        vocab_file=str(EXAMPLES / "classes.txt"),
        model="tiny",
        storage_options={"headers": {"authorization": header}},
        return_state=True,
    )
    assert state.is_failed()
    message = state.message or ""
    assert "storage_options['headers']['authorization'] is a credential header" in message
    records = _prefect_records(state.state_details.flow_run_id, tasks=False)
    for canary in (header, sig):
        assert canary not in message
        for where, text in records.items():
            assert canary not in text, where


def _ray_train_run_state() -> dict[str, str]:
    """The Train runs (with their settings: train_loop_config ...) kept by Ray Train's state actor."""
    import ray
    from ray.train.v2._internal.state.state_actor import get_state_actor

    actor = get_state_actor()
    if actor is None:
        return {}
    runs = ray.get(actor.get_train_runs.remote())
    return {f"Ray Train run {run_id}": run.model_dump_json() for run_id, run in runs.items()}


# --------------------------------------------------------------------------------------------------
# Ray Train: block credentials never in train_loop_config
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ray_train_run_state_holds_no_block_credentials(prefect_api, s3_endpoint, tmp_path, monkeypatch):
    import ray
    import s3fs
    from prefect.blocks.system import Secret

    from flows.train import train_flow
    from pipeline.train.data import write_synthetic_shapes_dataset

    key, secret = _canary("AKIA"), _canary("sec")
    bucket = f"canary-{uuid.uuid4().hex[:10]}"
    fs = _s3(s3_endpoint)
    fs.mkdir(bucket)
    write_synthetic_shapes_dataset(str(tmp_path / "train"), num_images=2, size=96, seed=1)
    fs.put(str(tmp_path / "train"), f"{bucket}/train", recursive=True)
    # moto accepts any key; the endpoint is only in the block, so the workers reach the data only if they
    # loaded the block themselves (the run state holds its name, not its values)
    block = f"canary-{uuid.uuid4().hex[:8]}"
    Secret(value={"key": key, "secret": secret, "client_kwargs": {"endpoint_url": s3_endpoint}}).save(block)
    ray_results = tmp_path / "ray_results"
    # Ray Train's state tracking (the dashboard's Train page and export events) keeps each run's settings,
    # train_loop_config included, in a detached actor for the cluster's lifetime
    monkeypatch.setenv("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    started = not ray.is_initialized()
    if started:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
        )
    try:
        state = train_flow(
            train=f"s3://{bucket}/train",
            output=f"s3://{bucket}/run",
            model="tiny",
            max_steps=1,
            batch_size=1,
            checkpoint_every=1,
            eval_every=0,
            num_workers=1,
            storage_block=block,
            options={
                "use_ray": True,
                "cpus_per_worker": 0.5,
                "ray_storage_path": str(ray_results),
                "crop_size": 32,
                "num_points": 64,
                "shuffle_buffer": 2,
                "log_every": 1,
            },
            return_state=True,
        )
        run_state = _ray_train_run_state()
    finally:
        if started:
            ray.shutdown()
    assert state.is_completed(), state.message
    result = state.result()
    assert result["steps"] == 1 and result["num_workers"] == 1
    from pipeline.train.run import last_checkpoint

    block_options = {"key": key, "secret": secret, "client_kwargs": {"endpoint_url": s3_endpoint}}
    assert last_checkpoint(f"s3://{bucket}/run", block_options).endswith("model_0000001.pth")
    # Ray Train's run state: the runs its state actor keeps (the dashboard's Train page, export events) with
    # their train_loop_config, and the files under the run's storage path
    ours = [text for text in run_state.values() if f"s3://{bucket}/run" in text]
    assert ours, "Ray Train's state actor recorded no run of this test"
    _assert_absent([key, secret], run_state)
    assert any("BlockCredentials" in text for text in ours)  # what went there instead: a pointer to the block
    stored = {str(p): p.read_bytes() for p in ray_results.rglob("*") if p.is_file()}
    stored.update(run_state)
    fs.invalidate_cache()
    outputs = {p: fs.cat_file(p) for p in fs.find(f"{bucket}/run")}
    assert any(p.endswith(".pth") for p in outputs) and any(p.endswith("metrics.jsonl") for p in outputs)
    texts: dict[str, bytes | str] = {**stored, **outputs}
    texts.update(_prefect_records(state.state_details.flow_run_id))
    _assert_absent([key, secret], texts)
    s3fs.S3FileSystem.clear_instance_cache()


# --------------------------------------------------------------------------------------------------
# shards: signed URLs are opened, never recorded
# --------------------------------------------------------------------------------------------------
def test_signed_shards_are_named_by_their_object_url_and_read_errors_hide_the_signature(photos, tmp_path):
    from pipeline.shards import SHARD_ERROR_KEY, iter_samples, list_shards

    header, token = _canary("hdr"), _canary("tok")
    server = _AuthServer(header, token)
    options = {"headers": {"Authorization": f"Bearer {header}"}}
    try:
        samples = {"a": jpeg_bytes(photos["coffee"], 64), "b": jpeg_bytes(photos["rocket"], 64)}
        server.files["/d/s.tar"] = tar_bytes(webdataset_members(samples))
        server.files["/d/img/x.jpg"] = jpeg_bytes(photos["chelsea"], 64)
        server.files["/d/img/y.jpg"] = jpeg_bytes(photos["astronaut"], 64)
        manifest = tmp_path / "m.txt"
        manifest.write_text(
            "".join(f"{server.url}/d/{n}?token={token}\n" for n in ("s.tar", "img/x.jpg", "img/y.jpg"))
        )
        shards = list_shards(str(manifest), options)
        tar, images = sorted(shards, key=lambda s: s.kind, reverse=True)
        assert tar.url == f"{server.url}/d/s.tar" and tar.access_urls == (
            f"{server.url}/d/s.tar?token={token}",
        )
        assert images.members == (f"{server.url}/d/img/x.jpg", f"{server.url}/d/img/y.jpg")  # one group
        assert all(token not in s.shard_id and token not in repr(s) for s in shards)
        assert [r.key for r in iter_samples(images, options)] == ["x.jpg", "y.jpg"]
        assert [r.key for r in iter_samples(tar, options)] == ["a", "b"]
        # re-signed URLs name the same shards
        other = _canary("new")
        server.token = other
        manifest.write_text(manifest.read_text().replace(token, other))
        assert [s.shard_id for s in list_shards(str(manifest), options)] == [s.shard_id for s in shards]
        # the old signature expired: the shard ends in one shard-level error record (the reader never raises),
        # which names the shard by its object URL and holds no signature
        records = list(iter_samples(tar, options))
        assert [r.key for r in records] == [SHARD_ERROR_KEY]
        message = records[0].error
        assert token not in message and str(tar.url) in message
        # a listing error names the manifest line, not the signature
        server.token = _canary("newer")
        with pytest.raises(OSError) as info:
            list_shards(str(manifest), options)
        assert "m.txt line 1" in str(info.value) and other not in str(info.value)
        assert server.denied >= 2
    finally:
        server.close()
