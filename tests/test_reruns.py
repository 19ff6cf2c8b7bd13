"""Reruns of the annotate pipeline at the commit path's edges, with real components (tiny model, local Ray, real
files, the console script): --retry-errors after a transient fault, --relabel-changed after a shard changed, a
no-op rerun that reads markers only, and SIGKILL of ``odise-annotate`` during a commit and during COCO assembly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from helpers import jpeg_bytes, webdataset_members, write_tar
from test_coco import check_export

import pipeline
from pipeline.annotate.commit import commit_shard, committed_shards, write_staging
from pipeline.schema import RunProvenance, error_row

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def config(inp, out, **kw) -> pipeline.AnnotateConfig:
    base = dict(input=str(inp), output=str(out), vocab_file="coco_panoptic", model="tiny", num_cpus=2, overlays=0,
                batch_size=2, no_progress_timeout_s=240)  # fmt: skip
    return pipeline.AnnotateConfig(**{**base, **kw})


def rows_of(out: Path) -> dict[str, dict]:
    rows = pads.dataset(str(out / "parquet"), format="parquet").to_table().to_pylist()
    keys = [(r["shard_id"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)), "a key has two rows"
    return {r["key"]: r for r in rows}


def test_retry_errors_relabels_only_the_transient_failures(tmp_path, photos, ray_local):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (folder / f"{name}.jpg").write_bytes(jpeg_bytes(photos[name], (64, 48)))
    out = tmp_path / "out"
    first = pipeline.run_annotation(config(folder, out))
    assert first.labelled == 3

    # the transient fault: coffee.jpg's read failed with a network error in that run (a retryable error row in
    # place of its labels, committed the way every replacement is); the storage is fine again now
    ((sid, marker),) = committed_shards(str(out), None).items()
    prov = RunProvenance.from_json((out / "provenance.json").read_text())
    write_staging([error_row(run_id="r-fault", shard=marker["shard"], shard_id=sid, key="coffee.jpg",
                             error="connection reset by peer [file:///photos/coffee.jpg]", error_kind="network",
                             retryable=True, image_ext="jpg")], str(out), None, prov)  # fmt: skip
    shard = {"url": marker["shard"], "shard_id": sid, "kind": "images", "root": marker["root"]}
    commit_shard(str(out), None, shard=shard, expected_keys=1, provenance=prov, replace="retry",
                 retry_keys=["coffee.jpg"])  # fmt: skip
    faulty = rows_of(out)
    assert faulty["coffee.jpg"]["retryable"] is True

    # a plain rerun leaves the committed error alone; --retry-errors relabels it, and only it
    plain = pipeline.run_annotation(config(folder, out))
    assert plain.images == 0 and plain.shards_retried == 0
    assert json.loads((out / "summary.json").read_text())["n_retryable"] == 1
    retried = pipeline.run_annotation(config(folder, out, retry_errors=True))
    assert (retried.shards_retried, retried.images, retried.labelled, retried.errors) == (1, 1, 1, 0)
    rows = rows_of(out)
    assert sorted(rows) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg"]
    assert rows["coffee.jpg"]["error"] is None and rows["coffee.jpg"]["segments"]
    assert rows["coffee.jpg"]["image_id"] == faulty["coffee.jpg"]["image_id"]  # ids do not change
    for key in ("astronaut.jpg", "chelsea.jpg"):
        assert rows[key] == faulty[key], key  # the other rows are kept as they were
    marker = committed_shards(str(out), None)[sid]
    assert marker["n_retryable"] == 0 and marker["replaced"] == "retry" and marker["n_labelled"] == 3
    assert not (out / "_replacing").exists() or not list((out / "_replacing").iterdir())
    index = check_export(out)  # the COCO part holding the shard was rebuilt and agrees with the Parquet
    assert index["n_images"] == 3
    totals = json.loads((out / "summary.json").read_text())
    assert totals["n_retryable"] == 0 and totals["n_labelled"] == 3
    again = pipeline.run_annotation(config(folder, out, retry_errors=True))
    assert again.shards_retried == 0 and again.images == 0 and again.coco_parts_rebuilt == 0


def test_relabel_changed_and_a_noop_rerun_that_reads_markers_only(tmp_path, photos, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    a_samples = {
        "a0": jpeg_bytes(photos["astronaut"], (64, 48)),
        "a1": jpeg_bytes(photos["coffee"], (48, 64)),
    }
    write_tar(shards / "a.tar", webdataset_members(a_samples))
    write_tar(shards / "b.tar", webdataset_members({"b0": jpeg_bytes(photos["chelsea"], (64, 48))}))
    out = tmp_path / "out"
    first = pipeline.run_annotation(config(shards, out))
    assert first.images == 3 and first.changed_shards["count"] == 0
    before = committed_shards(str(out), None)
    (sid_a,) = [s for s, m in before.items() if m["shard"].endswith("/a.tar")]
    ids_before = {k: r["image_id"] for k, r in rows_of(out).items()}
    assert all(0 < i < 2**53 for i in ids_before.values())

    # a.tar is rewritten at the source (an image replaced, one added)
    time.sleep(0.01)
    a_samples = {"a0": jpeg_bytes(photos["rocket"], (64, 48)), "a1": jpeg_bytes(photos["coffee"], (48, 64)),
                 "a2": jpeg_bytes(photos["chelsea"], (40, 40))}  # fmt: skip
    write_tar(shards / "a.tar", webdataset_members(a_samples))
    seen = pipeline.run_annotation(config(shards, out))
    assert seen.changed_shards == {"count": 1, "first": [sid_a], "relabelled": False} and seen.images == 0
    assert json.loads((out / "summary.json").read_text())["changed_shards"]["count"] == 1
    relabelled = pipeline.run_annotation(config(shards, out, relabel_changed=True))
    assert relabelled.shards_relabelled == 1 and relabelled.images == 3
    rows = rows_of(out)
    assert sorted(rows) == ["a0", "a1", "a2", "b0"]
    after = committed_shards(str(out), None)
    assert after[sid_a]["seq"] == before[sid_a]["seq"] and after[sid_a]["replaced"] == "relabel"
    assert rows["b0"]["image_id"] == ids_before["b0"]
    assert rows["a2"]["image_id"] >> 28 == rows["a0"]["image_id"] >> 28 == before[sid_a]["seq"]
    check_export(out)
    assert pipeline.run_annotation(config(shards, out)).changed_shards["count"] == 0

    # a rerun with nothing to do reads markers only: every fragment and Parquet file unreadable, still fine
    exports = {p.name: p.read_bytes() for p in (out / "coco").glob("*.json")}
    for path in [*(out / "coco" / "_parts").iterdir(), *(out / "parquet").iterdir()]:
        path.write_bytes(b"garbage")
    noop = pipeline.run_annotation(config(shards, out))
    assert noop.images == 0 and noop.shards_skipped == 2 and noop.coco_parts_rebuilt == 0
    assert {p.name: p.read_bytes() for p in (out / "coco").glob("*.json")} == exports


def _script() -> str:
    path = Path(sys.executable).parent / "odise-annotate"
    if not path.exists():
        pytest.skip("console script odise-annotate is not installed (pip install -e .)")
    return str(path)


def _env(tmp_path: Path, api_url: str, **extra: str) -> dict[str, str]:
    """A console-script run's environment, talking to the session's Prefect server at ``api_url`` (which is
    outside the process group the test kills)."""
    env = dict(os.environ)
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               ODISE_CACHE=str(tmp_path / "odise-cache"), HF_HUB_OFFLINE="1", PREFECT_API_URL=api_url,
               **extra)  # fmt: skip
    return env


def _run_until_paused(args: list[str], tmp_path: Path, point: str, api_url: str) -> str:
    """Start the CLI with the test-only pause hook at ``point``, SIGKILL its whole process group there."""
    flag = tmp_path / f"paused-{point}"
    env = _env(tmp_path, api_url, ODISE_TEST_PAUSE_AT=point, ODISE_TEST_PAUSE_FILE=str(flag))
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 400
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert flag.exists(), f"never paused at {point}: {proc.communicate(timeout=30)[0][-3000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return flag.read_text()


def test_sigkill_during_commit_and_during_coco_assembly_then_rerun(tmp_path, prefect_server):
    api_url = prefect_server["PREFECT_API_URL"]
    out = tmp_path / "out"
    args = [_script(), "--input", "examples/images", "--vocab-file", "examples/classes.txt", "--output", str(out),
            "--model", "tiny", "--num-cpus", "2", "--images-per-virtual-shard", "1", "--no-progress",
            "--overlays", "0", "--coco-max-images-per-file", "2"]  # fmt: skip
    # 1. killed after a shard's Parquet, PNGs and fragment are written, before its marker
    paused = _run_until_paused(args, tmp_path, "commit", api_url)
    sid = paused.split()[1]
    assert (out / "parquet" / f"{sid}.parquet").exists() and not (out / "_commits" / f"{sid}.json").exists()
    # 2. the rerun commits everything, then is killed while it publishes the COCO export's first part
    assert _run_until_paused(args, tmp_path, "coco", api_url).startswith("coco panoptic-00000.json")
    assert len(list((out / "_commits").glob("*.json"))) == 4
    assert not (out / "coco" / "index.json").exists()  # the export was never completed
    # 3. the next rerun finishes: one row per key, the COCO parts agree with the Parquet
    proc = subprocess.run(
        args, cwd=REPO, env=_env(tmp_path, api_url), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = rows_of(out)
    assert sorted(rows) == ["astronaut.jpg", "chelsea.jpg", "coffee.jpg", "rocket.jpg"]
    assert all(r["error"] is None for r in rows.values())
    index = check_export(out)
    assert len(index["parts"]) == 2 and index["n_images"] == 4
    assert not list((out / "parquet").glob(".*")) and not list((out / "_staging").glob("*/*.parquet"))
    names = {
        json.loads(p.read_text())["images"][0]["file_name"] for p in (out / "coco").glob("panoptic-*.json")
    }
    assert names <= {
        "astronaut.jpg",
        "chelsea.jpg",
        "coffee.jpg",
        "rocket.jpg",
    }  # relative to the input folder
    pngs = sorted(p.name for p in (out / "coco" / "panoptic").rglob("*.png"))
    assert pngs == ["astronaut.png", "chelsea.png", "coffee.png", "rocket.png"]  # the extension replaced
    for row in rows.values():
        assert pq.read_schema(out / "parquet" / f"{row['shard_id']}.parquet").metadata  # complete files
