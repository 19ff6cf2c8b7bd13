"""The annotate pipeline end to end with real components: tar shards of real photos, a local Ray, the tiny model,
a real S3-compatible server (moto), pycocotools and pyarrow validating the outputs; faults and resumes."""

from __future__ import annotations

import io
import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from helpers import jpeg_bytes, webdataset_members, write_tar
from PIL import Image

import pipeline
from pipeline.annotate.checks import OutputError, check_inputs

pytestmark = pytest.mark.slow


def _png(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _huge_png() -> bytes:
    """A valid PNG header claiming 30000x30000 pixels (a decompression bomb), tiny on disk."""
    im = Image.new("1", (30000, 30000))
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def write_shard(path, samples):
    """Write a WebDataset tar shard; ``samples`` is a list of (key, {ext: bytes})."""
    write_tar(path, webdataset_members(samples))


def good_samples(photos, prefix, n):
    names = sorted(photos)
    out = []
    for i in range(n):
        arr = photos[names[i % len(names)]]
        scale = 0.3 + 0.1 * (i % 3)
        size = (max(32, int(arr.shape[1] * scale)), max(32, int(arr.shape[0] * scale)))
        out.append(
            (f"{prefix}-{i:04d}", {"jpg": jpeg_bytes(arr, size), "json": json.dumps({"i": i}).encode()})
        )
    return out


def read_rows(out, storage_options=None):
    fs_kwargs = {}
    if storage_options:
        import pyarrow.fs as pafs
        import s3fs

        fs_kwargs["filesystem"] = pafs.PyFileSystem(pafs.FSSpecHandler(s3fs.S3FileSystem(**storage_options)))
        out = out.removeprefix("s3://")
    table = pads.dataset(f"{out}/parquet", format="parquet", **fs_kwargs).to_table()
    return table.to_pylist()


def config(inp, out, **kw) -> pipeline.AnnotateConfig:
    base = dict(
        input=inp,
        output=out,
        vocab_file="coco_panoptic",
        model="tiny",
        num_cpus=2,
        overlays=2,
        batch_size=2,
        no_progress_timeout_s=240,
    )
    base.update(kw)
    return pipeline.AnnotateConfig(**base)


def _foreign_lease(run_id: str, *, renewed_s_ago: float, ttl_s: float):
    """A lease record of a run on another machine, last renewed ``renewed_s_ago`` seconds ago."""
    from pipeline.annotate.lease import LeaseRecord

    now = time.time()
    rec = LeaseRecord.new(run_id, ttl_s=ttl_s, renew_s=ttl_s / 10, now=now - renewed_s_ago - 60).renewed(
        now - renewed_s_ago
    )
    return LeaseRecord(**{**rec.to_dict(), "host": "other-host", "pid": 4242, "process_ns": "elsewhere"})


def check_coco(out_dir: Path, rows):
    from pycocotools.coco import COCO

    labelled = [r for r in rows if r["error"] is None]
    inst = COCO(str(out_dir / "coco" / "instances.json"))
    assert len(inst.getImgIds()) == len(labelled)
    pan = json.loads((out_dir / "coco" / "panoptic.json").read_text())
    assert len(pan["annotations"]) == len(labelled)
    ids = {c["id"] for c in pan["categories"]}
    from pipeline.encode import png_to_panoptic

    for ann in pan["annotations"]:
        seg_map = png_to_panoptic((out_dir / "coco" / "panoptic" / ann["file_name"]).read_bytes())
        assert set(np.unique(seg_map).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        assert all(s["category_id"] in ids for s in ann["segments_info"])


def test_end_to_end_local_with_faulty_samples(tmp_path, photos, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    good = good_samples(photos, "a", 5)
    write_shard(shards / "shard-000000.tar", good[:3])
    bad = [
        ("corrupt", {"jpg": b"\xff\xd8\xff\xe0" + os.urandom(300)}),
        ("truncated", {"jpg": jpeg_bytes(photos["coffee"])[:2000]}),
        ("zero", {"jpg": b""}),
        ("text", {"jpg": b"hello, I am not an image"}),
        ("huge", {"png": _huge_png()}),
        ("noimage", {"json": b"{}"}),
        *good[3:],
    ]
    write_shard(shards / "shard-000001.tar", bad)
    out = tmp_path / "out"
    summary = pipeline.run_annotation(config(str(shards / "shard-{000000..000001}.tar"), str(out)))

    rows = read_rows(str(out))
    keys = [(r["shard_id"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 + len(bad)  # every sample exactly once
    errors = {r["key"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"corrupt", "truncated", "zero", "text", "huge", "noimage"}
    assert "too large" in errors["huge"] and "no image" in errors["noimage"]
    labelled = [r for r in rows if r["error"] is None]
    assert {r["key"] for r in labelled} == {k for k, _ in good}
    assert summary.images == len(rows) and summary.errors == 6 and summary.labelled == 5
    assert summary.plumbing_check
    for r in labelled:
        assert r["segments"] and r["panoptic_png"] and r["semantic_png"]
        assert (r["width"], r["height"]) == Image.open(io.BytesIO(dict(good)[r["key"]]["jpg"])).size
    check_coco(out, rows)
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["model_variant"] == "tiny" and "plumbing check" in prov["weights_licences"]
    assert len(summary.overlays) == 2 and all(Path(p).exists() for p in summary.overlays)
    # readable without our code
    import datasets
    import pandas as pd

    assert len(pd.read_parquet(out / "parquet")) == len(rows)
    ds = datasets.load_dataset("parquet", data_files=str(out / "parquet" / "*.parquet"), split="train")
    assert ds.num_rows == len(rows)

    # a rerun labels nothing and duplicates nothing; it takes over the lease a crashed run on another host left
    (out / "_lease.json").write_bytes(_foreign_lease("run-crashed", renewed_s_ago=400, ttl_s=300).to_json())
    again = pipeline.run_annotation(config(str(shards / "shard-{000000..000001}.tar"), str(out)))
    assert again.shards_skipped == 2 and again.images == 0
    assert len(read_rows(str(out))) == len(rows)
    assert again.lease_takeover["run_id"] == "run-crashed" and again.lease_takeover["host"] == "other-host"
    last_run = json.loads((out / "summary.json").read_text())["last_run"]
    assert last_run["lease_takeover"]["run_id"] == "run-crashed"
    assert not (out / "_lease.json").exists()  # released at the end


def test_end_to_end_on_s3(tmp_path, photos, ray_local, s3_bucket, s3_storage_options):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    for i in range(2):
        local = tmp_path / f"shard-{i:06d}.tar"
        write_shard(local, good_samples(photos, f"s{i}", 2))
        fs.put(str(local), f"{s3_bucket}/in/shard-{i:06d}.tar")
    out = f"s3://{s3_bucket}/labels"
    summary = pipeline.run_annotation(
        config(f"s3://{s3_bucket}/in/*.tar", out, storage_options=s3_storage_options, overlays=1)
    )
    assert summary.images == 4 and summary.errors == 0
    rows = read_rows(out, s3_storage_options)
    assert sorted(r["key"] for r in rows) == ["s0-0000", "s0-0001", "s1-0000", "s1-0001"]
    assert len(fs.ls(f"{s3_bucket}/labels/_commits")) == 2
    # the COCO exports on S3 load with pycocotools and their PNG ids match segments_info
    local = tmp_path / "from-s3"
    fs.get(f"{s3_bucket}/labels/coco", str(local / "coco"), recursive=True)
    check_coco(local, rows)


def test_driver_interrupted_then_rerun_resumes(tmp_path, photos, ray_local):
    shards = tmp_path / "shards"
    shards.mkdir()
    n = 5  # enough shards that some are still being labelled when the first commit is reported
    for i in range(n):
        write_shard(shards / f"part-{i}.tar", good_samples(photos, f"p{i}", 2))
    out = tmp_path / "out"

    def interrupt(progress):
        if progress["event"] == "shard":
            raise KeyboardInterrupt  # the operator hits Ctrl-C after the first committed shard

    with pytest.raises(KeyboardInterrupt):
        pipeline.run_annotation(config(str(shards), str(out), overlays=0), on_progress=interrupt)
    committed = len(list((out / "_commits").glob("*.json")))
    print(f"interrupted with {committed} of {n} shards committed")
    assert 1 <= committed < n
    summary = pipeline.run_annotation(config(str(shards), str(out), overlays=0))
    assert summary.shards_skipped == committed and summary.shards_committed == n - committed
    rows = read_rows(str(out))
    keys = sorted(r["key"] for r in rows)
    assert keys == sorted(f"p{i}-{j:04d}" for i in range(n) for j in range(2))
    assert not list((out / "_staging").glob("*/*.parquet")) if (out / "_staging").exists() else True


def test_actor_killed_mid_run_loses_nothing(tmp_path, photos, ray_local):
    import ray

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(4):
        write_shard(shards / f"k-{i}.tar", good_samples(photos, f"k{i}", 3))
    first_commit = threading.Event()
    killed = []

    def killer():
        # kill the model actor's process once the first image is staged (the others are in flight; waiting for
        # a whole shard's commit could let the model finish all 12 images first)
        if not first_commit.wait(timeout=180):
            return
        deadline = time.monotonic() + 10
        while not killed and time.monotonic() < deadline:
            for actor in ray._private.state.actors().values():
                if (
                    "MapWorker" in actor.get("ActorClassName", "")
                    and actor.get("State") == "ALIVE"
                    and actor.get("Pid")
                ):
                    os.kill(actor["Pid"], 9)
                    killed.append(actor["Pid"])
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    out = tmp_path / "out"
    summary = pipeline.run_annotation(
        config(str(shards), str(out), overlays=0),
        on_progress=lambda p: p["images_staged"] > 0 and first_commit.set(),
    )
    thread.join(timeout=5)
    assert killed, "the test never found the model actor to kill"
    rows = read_rows(str(out))
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(f"k{i}-{j:04d}" for i in range(4) for j in range(3))
    assert summary.errors == 0 and summary.images == 12


def test_rerun_over_a_grown_image_folder_labels_only_the_new_images(tmp_path, photos, ray_local):
    """Adding images to a folder (or changing the group size) renames its virtual shards; a rerun into the
    same output must label the new images only: no image twice in Parquet or COCO."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = sorted(photos)
    for i, name in enumerate(names[:3]):
        (folder / f"b{i}.jpg").write_bytes(jpeg_bytes(photos[name], (64, 48)))
    out = tmp_path / "out"
    first = pipeline.run_annotation(config(str(folder), str(out), overlays=0, images_per_virtual_shard=2))
    assert first.images == 3
    (folder / "a_new.jpg").write_bytes(
        jpeg_bytes(photos[names[0]], (48, 64))
    )  # sorts first: shifts every group
    (folder / "c_new.jpg").write_bytes(jpeg_bytes(photos[names[1]], (48, 64)))
    second = pipeline.run_annotation(config(str(folder), str(out), overlays=0, images_per_virtual_shard=2))
    assert second.images == 2 and second.errors == 0
    rows = read_rows(str(out))
    assert sorted(r["key"] for r in rows) == ["a_new.jpg", "b0.jpg", "b1.jpg", "b2.jpg", "c_new.jpg"]
    check_coco(out, rows)
    # nothing new, or another group size: nothing is labelled again
    for per_shard in (2, 3):
        again = pipeline.run_annotation(
            config(str(folder), str(out), overlays=0, images_per_virtual_shard=per_shard)
        )
        assert again.images == 0
    assert len(read_rows(str(out))) == 5
    totals = json.loads((out / "summary.json").read_text())
    assert totals["n_images"] == 5 and totals["stale_shards"] == [] and totals["pending_shards"] == []


# --- checks before anything heavy ---------------------------------------------------------------------------
def test_missing_shard_fails_before_any_model(tmp_path, photos):
    import ray

    write_shard(tmp_path / "shard-000000.tar", good_samples(photos, "x", 1))
    ray_was_running = ray.is_initialized()
    started = time.time()
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        pipeline.run_annotation(config(str(tmp_path / "shard-{000000..000001}.tar"), str(tmp_path / "out")))
    assert time.time() - started < 15
    assert (
        ray.is_initialized() == ray_was_running
    )  # the run never got as far as Ray (where the model is built)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())  # nothing written


def test_unreachable_bucket_fails_fast(tmp_path):
    opts = {"key": "x", "secret": "y", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}
    started = time.time()
    with pytest.raises(FileNotFoundError, match="s3://nowhere/shards"):
        check_inputs(config("s3://nowhere/shards/*.tar", str(tmp_path / "out"), storage_options=opts))
    assert time.time() - started < 20


def test_malformed_vocabulary_names_the_line(tmp_path, photos):
    write_shard(tmp_path / "s.tar", good_samples(photos, "v", 1))
    vocab = tmp_path / "classes.txt"
    vocab.write_text("cat\ndog,,puppy\n")
    from odise_model import VocabularyError

    with pytest.raises(VocabularyError, match=r"classes.txt:2"):
        check_inputs(config(str(tmp_path / "s.tar"), str(tmp_path / "out"), vocab_file=str(vocab)))


def test_output_inside_input_is_refused(tmp_path, photos):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg_bytes(photos["coffee"], (64, 48)))
    with pytest.raises(OutputError, match="inside the input"):
        check_inputs(config(str(folder), str(folder / "labels")))
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(OutputError, match="a-file is a file, not a folder"):
        check_inputs(config(str(folder), str(tmp_path / "a-file")))


def test_missing_official_weights_offline_say_which_file(tmp_path, photos):
    from odise_model import WeightsNotFoundError

    write_shard(tmp_path / "s.tar", good_samples(photos, "w", 1))
    with pytest.raises(WeightsNotFoundError, match=r"(?s)odise_label_coco_50e.*how to provide"):
        check_inputs(
            config(
                str(tmp_path / "s.tar"),
                str(tmp_path / "out"),
                model="odise_label_coco",
                offline=True,
                cache_dir=str(tmp_path / "cache"),
            )
        )


def test_output_of_another_vocabulary_is_refused_before_the_run(tmp_path, photos):
    from pipeline.annotate.checks import provenance_for
    from pipeline.annotate.commit import ProvenanceMismatchError, write_provenance

    write_shard(tmp_path / "s.tar", good_samples(photos, "p", 1))
    out = str(tmp_path / "out")
    first = config(str(tmp_path / "s.tar"), out)
    write_provenance(out, None, provenance_for(first, check_inputs(first), "run-1"))
    check_inputs(first)  # same settings: fine
    other = config(str(tmp_path / "s.tar"), out, vocab_file="ade20k_150")
    with pytest.raises(ProvenanceMismatchError, match=r"vocabulary_sha256.*provenance.json"):
        check_inputs(other)
    check_inputs(
        config(str(tmp_path / "s.tar"), out, vocab_file="ade20k_150", allow_provenance_mismatch=True)
    )


# --- one writer per output -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_second_run_into_a_busy_output_exits_2_naming_the_holder_and_nothing_is_lost(
    where, tmp_path, photos, ray_local, s3_endpoint, s3_bucket, s3_storage_options
):
    """Two runs into one output: the first (in this process) holds the lease and waits inside labelling while
    ``odise-annotate`` is started into the same output; that second run exits 2 before labelling, naming the
    holder (host, pid, run id, since when); then the first run completes with one row per key."""
    import subprocess
    import sys

    import s3fs

    shards = tmp_path / "shards"
    shards.mkdir()
    keys = []
    for i in range(2):
        samples = good_samples(photos, f"w{i}", 2)
        write_shard(shards / f"part-{i}.tar", samples)
        keys += [k for k, _ in samples]
    if where == "local":
        out, out_opts, cli_opts = str(tmp_path / "out"), None, []
    else:  # credentials reach the command through the environment (tests/conftest.py), never through options
        out, out_opts = f"s3://{s3_bucket}/labels", s3_storage_options
        cli_opts = ["--output-storage-options", json.dumps({"client_kwargs": {"endpoint_url": s3_endpoint}})]
    first_config = config(str(shards), out, overlays=0, output_storage_options=out_opts)
    inside, resume, result = threading.Event(), threading.Event(), {}

    def hold(progress):
        inside.set()
        resume.wait(timeout=300)

    def first_run():
        try:
            result["summary"] = pipeline.run_annotation(first_config, on_progress=hold)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertions below
            result["error"] = exc

    thread = threading.Thread(target=first_run, daemon=True)
    thread.start()
    try:
        assert inside.wait(timeout=300), result
        if where == "local":
            holder = json.loads((Path(out) / "_lease.json").read_text())
        else:
            holder = json.loads(
                s3fs.S3FileSystem(**s3_storage_options).cat(f"{s3_bucket}/labels/_lease.json")
            )
        script = str(Path(sys.executable).parent / "odise-annotate")
        second = subprocess.run(
            [script, "--input", str(shards), "--output", out, "--vocab-file", "coco_panoptic", "--model", "tiny",
             "--num-cpus", "2", *cli_opts],
            capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
    finally:
        resume.set()
        thread.join(timeout=600)
    assert second.returncode == 2, second.stdout + second.stderr
    err = second.stderr
    assert "is being written by another run" in err and "Traceback" not in err
    for part in (
        f"run {holder['run_id']}",
        f"host {holder['host']}",
        f"pid {holder['pid']}",
        holder["since"],
    ):
        assert part in err, part
    assert "error" not in result, result.get("error")
    summary = result["summary"]
    assert summary.images == len(keys) and summary.errors == 0 and summary.shards_committed == 2
    rows = read_rows(out, out_opts)
    assert sorted(r["key"] for r in rows) == sorted(keys)  # one row per key: nothing lost, nothing twice


def test_a_run_that_loses_its_lease_commits_nothing_more(tmp_path, photos, ray_local):
    """Another run takes the lease over while this one labels (as after a network partition longer than the
    TTL): the heartbeat finds it out and the run stops before its next commit."""
    from pipeline.annotate.run import PipelineError

    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        write_shard(shards / f"part-{i}.tar", good_samples(photos, f"l{i}", 2))
    out = tmp_path / "out"
    stolen = []

    def steal(progress):
        if not stolen:  # before the first commit: another run writes its own lease over this one's
            thief = _foreign_lease("run-thief", renewed_s_ago=0, ttl_s=300)
            (out / "_lease.json").write_bytes(thief.to_json())
            stolen.append(thief)
            time.sleep(3)  # a few heartbeats (every 0.5 s) notice it

    cfg = config(str(shards), str(out), overlays=0, lease_ttl_s=5, lease_renew_s=0.5)
    with pytest.raises(PipelineError, match="lost the output lease.*run-thief"):
        pipeline.run_annotation(cfg, on_progress=steal)
    assert stolen
    assert not list((out / "_commits").glob("*.json")) if (out / "_commits").exists() else True
    assert json.loads((out / "_lease.json").read_text())["run_id"] == "run-thief"  # the thief's lease is kept
