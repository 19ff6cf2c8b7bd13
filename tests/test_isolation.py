"""No run stops for one sample: faults injected in every stage of a real run (the ``odise-annotate`` console
script, tiny model, local Ray), names that are not valid UTF-8 in a folder and in a tar, overlay names, and
error rows with the new columns read by the evaluation."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from helpers import add_member, jpeg_bytes
from PIL import Image

from pipeline.annotate.stages import overlay_file_name
from pipeline.errors import FAULT_ENV
from pipeline.shards import decode_name

REPO = Path(__file__).resolve().parents[1]

#: fault -> (error_kind, retryable) of the row it must produce; None: the sample is labelled anyway
EXPECTED = {
    "read": ("read_error", False),
    "decode": ("decode_error", False),
    "model": ("model_error", False),
    "postprocess": ("postprocess_error", False),
    "encode": ("encode_error", False),
    "stage": ("staging_error", False),
    "oom": ("out_of_memory", True),
    "decode_oom": ("out_of_memory", True),
    "oom_once": None,  # batch OOM -> alone with chunked post-processing -> labelled
    "postprocess_oom": None,  # post-processing OOM -> chunked -> labelled
    "stage_transient": None,  # the staging write is retried -> labelled
}


def _png(arr: np.ndarray, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).resize(size).save(buf, format="PNG")
    return buf.getvalue()


def _rows(out: Path) -> list[dict]:
    return pads.dataset(str(out / "parquet"), format="parquet").to_table().to_pylist()


@pytest.mark.slow
def test_every_stage_fails_for_one_sample_and_the_run_goes_on(tmp_path, photos, prefect_server):
    """One CLI run over a tar whose marked samples fail in read, decode, model, post-processing, encode and
    staging, run out of memory (for good, or once), and a folder and a tar holding names that are not valid
    UTF-8: exit 0, exactly one error row per failing sample with the right kind and flag, every other image
    labelled (uncertainty filled), keys round-trip, ``image_url`` opens, overlays named by replacing the
    extension."""
    import fsspec

    names = sorted(photos)
    shards = tmp_path / "shards"
    shards.mkdir()
    tar_path = shards / "faults.tar"
    bad_member = os.fsdecode(b"caf\xe9-bad")  # latin-1 bytes: not valid UTF-8
    with tarfile.open(tar_path, "w", format=tarfile.GNU_FORMAT) as tf:
        for i, fault in enumerate(EXPECTED):
            arr = photos[names[i % len(names)]]
            add_member(tf, f"{fault}.jpg", jpeg_bytes(arr, (64 + 8 * (i % 3), 48)))
            add_member(tf, f"{fault}.json", json.dumps({"odise_fault": fault}).encode())
        for i in range(3):
            add_member(tf, f"good-{i}.jpg", jpeg_bytes(photos[names[i]], (56, 48)))
        add_member(tf, f"{bad_member}.jpg", jpeg_bytes(photos[names[0]], (48, 64)))
    folder = tmp_path / "folder"
    folder.mkdir()
    bad_file = os.fsdecode(b"bad\xff.jpg")
    (folder / bad_file).write_bytes(jpeg_bytes(photos[names[1]], (64, 48)))
    (folder / "astro.png").write_bytes(_png(photos[names[2]], (64, 48)))
    (folder / "astro.jpg").write_bytes(jpeg_bytes(photos[names[3]], (48, 64)))
    (folder / "100%.jpg").write_bytes(jpeg_bytes(photos[names[0]], (64, 64)))

    out = tmp_path / "out"
    env = dict(os.environ)
    env.update(
        {
            FAULT_ENV: "1",
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "ODISE_CACHE": str(tmp_path / "odise-cache"),
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": str(REPO),
            # a fresh local Ray even when a `ray start` cluster runs on this machine (ray.init would join it)
            "RAY_ADDRESS": "local",
        }
    )
    env["PREFECT_API_URL"] = prefect_server["PREFECT_API_URL"]  # the session's server: no temporary one
    script = Path(sys.executable).parent / "odise-annotate"
    if not script.exists():
        pytest.skip("console script odise-annotate is not installed (pip install -e .)")
    args = [
        str(script),
        "--input",
        str(tar_path),
        str(folder),
        "--vocab-file",
        "coco_panoptic",
        "--output",
        str(out),
        "--model",
        "tiny",
        "--num-cpus",
        "2",
        "--batch-size",
        "4",
        "--overlays",
        "20",
        "--no-progress",
    ]
    started = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    print(f"fault-injection CLI run: {time.perf_counter() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    rows = _rows(out)
    keys = [(r["shard_id"], r["key"]) for r in rows]
    assert len(keys) == len(set(keys)) == len(EXPECTED) + 3 + 1 + 4  # every sample exactly once
    by_key = {r["key"]: r for r in rows}
    for fault, expected in EXPECTED.items():
        row = by_key[fault]
        if expected is None:
            assert row["error"] is None and row["segments"], (fault, row["error"])
            continue
        assert (row["error_kind"], row["retryable"]) == expected, (fault, row["error"])
        assert row["segments"] == [] and row["panoptic_png"] is None
        # the message names the image's own location: the member's chained URL in the tar
        assert f"tar://{fault}.jpg::file://{tar_path}" in row["error"], row["error"]
    errors = [r for r in rows if r["error"] is not None]
    assert len(errors) == sum(e is not None for e in EXPECTED.values())
    labelled = [r for r in rows if r["error"] is None]
    for row in labelled:
        assert row["error_kind"] is None and row["retryable"] is None and row["image_url"]
        assert 0.0 <= row["uncertainty"] <= 1.0 and 0.0 <= row["branch_disagreement"] <= 1.0
        with fsspec.open(decode_name(row["image_url"]), "rb") as f:  # the URL points at the image
            assert Image.open(f).size == (row["width"], row["height"])

    # names that are not valid UTF-8: one row each, labelled, keys stored reversibly
    tar_row = by_key["caf%E9-bad"]
    assert decode_name(tar_row["key"]) == bad_member and tar_row["error"] is None
    assert tar_row["image_url"] == f"tar://caf%E9-bad.jpg::file://{tar_path}"
    file_row = by_key["bad%FF.jpg"]
    assert decode_name(file_row["key"]) == bad_file and file_row["error"] is None
    assert decode_name(file_row["image_url"]) == f"file://{folder}/{bad_file}"
    assert by_key["100%.jpg"]["image_url"] == f"file://{folder}/100%.jpg"  # ordinary names stay as they are

    # overlays replace the extension; a collision (astro.jpg / astro.png) gets a deterministic name
    overlays = sorted(p.name for p in (out / "overlays").rglob("*.jpg"))
    assert "astro.jpg" in overlays and "astro.png.jpg" in overlays and "100%.jpg" not in overlays
    assert "good-0.jpg" in overlays and not any(
        n.endswith(".jpg.jpg") and n != "astro.png.jpg" for n in overlays
    )

    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_errors"] == len(errors) and summary["n_images"] == len(rows)
    assert "Traceback" not in proc.stderr


def test_overlay_names_replace_the_extension():
    taken: set[str] = set()
    assert overlay_file_name("astronaut.png", taken) == "astronaut.jpg"
    assert overlay_file_name("astronaut.jpg", taken) == "astronaut.jpg.jpg"  # collision: full key
    assert overlay_file_name("astronaut.jpeg", taken) == "astronaut.jpeg.jpg"
    taken = {"a.jpg", "a.jpg.jpg"}  # e.g. from keys a.png and a.jpg.png
    assert overlay_file_name("a.jpg", taken) == "a-2.jpg" and "a-2.jpg" in taken
    assert overlay_file_name("cats/001", taken) == "cats/001.jpg"  # WebDataset keys have no extension
    assert overlay_file_name("notes.v2", taken) == "notes.v2.jpg"  # not an image extension: kept
    unsafe = overlay_file_name("bad%FF.jpg", taken)
    assert unsafe.endswith(".jpg") and "%" not in unsafe and not unsafe.endswith(".jpg.jpg")


def test_error_rows_with_the_new_columns_are_skipped_by_evaluation(tmp_path):
    """Evaluation reads schema-2 outputs whose error rows carry ``error_kind`` / ``retryable`` / ``image_url``:
    they count as empty predictions, as before."""
    from test_scoring import CATEGORIES, evaluate, perfect_items, write_coco_gt

    from pipeline.annotate.commit import commit_shard, write_provenance, write_staging
    from pipeline.encode import encode_result
    from pipeline.schema import RunProvenance, error_row, label_row

    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    items = perfect_items()
    provenance = RunProvenance(run_id="run-1", model_variant="hand", categories=CATEGORIES)
    out = tmp_path / "run"
    write_provenance(str(out), None, provenance)
    common = {"run_id": "run-1", "shard": "file:///in/shard-a.tar", "shard_id": "shard-a"}
    rows = []
    for n, (key, result) in enumerate(items):
        url = f"tar://{key}::file:///in/shard-a.tar"
        if n == 0:
            rows.append(
                error_row(
                    **common,
                    key=key,
                    error=f"out of memory: MemoryError [{url}]",
                    error_kind="out_of_memory",
                    image_url=url,
                )
            )
        else:
            rows.append(
                label_row(
                    **common,
                    key=key,
                    encoded=encode_result(result, include_png=True),
                    image_url=url,
                    uncertainty=0.25,
                    branch_disagreement=0.5,
                )
            )
    assert rows[0]["retryable"] is True  # the kind's flag by default
    write_staging(rows, str(out), None, provenance)
    commit_shard(
        str(out),
        None,
        shard={"url": common["shard"], "shard_id": "shard-a"},
        expected_keys=len(rows),
        provenance=provenance,
        categories=CATEGORIES,
        write_coco=False,
    )
    res = evaluate(json_path, png_dir, out)
    assert res.details["error_rows"]["count"] == 1
    assert res.details["error_rows"]["examples"][0]["error"].startswith("out of memory")
    assert res.num_images == len(items)
    with pytest.raises(ValueError, match="unknown error_kind 'oops'"):
        error_row(**common, key="k", error="x", error_kind="oops")


def _error_batch(keys: list[str]) -> dict:
    """A batch as the model stage hands it to the encode stage: samples that already failed, then the end row."""
    from pipeline.annotate.stages import _columns, _empty_sample_row

    shard = {"url": "file:///in/s.tar", "shard_id": "s-0001"}
    rows = []
    for key in keys:
        row = _empty_sample_row(
            shard, key, error=f"not an image (unidentified format) [file:///in/s.tar:{key}]", ext="jpg"
        )
        row["error_kind"] = "not_an_image"
        rows.append(row)
    end = _empty_sample_row(shard, "", error=None, ext=None)
    end.update(kind="end", shard_total=len(keys))
    return _columns([*rows, end])


def test_staging_write_is_retried_then_raises(tmp_path, monkeypatch, caplog):
    """A staging write that fails with a storage error is retried with backoff: a blip is absorbed (the rows
    are written once); a lasting failure raises, so Ray retries the whole task (staging files are write-once
    and the commit keeps one row per key, so a retried task loses and duplicates nothing)."""
    import threading

    import pyarrow.parquet as pq

    from pipeline.annotate import stages
    from pipeline.schema import RunProvenance

    monkeypatch.setattr(stages, "WRITE_DELAYS_S", (0.3, 0.6, 1.2))
    provenance = RunProvenance(run_id="run-1", model_variant="tiny")
    out = tmp_path / "out"
    out.mkdir()
    blocker = out / "_staging"
    blocker.write_text("a file where the staging folder goes: every write fails (NotADirectoryError)")
    stage = stages.EncodeAndStage(
        out_url=str(out), storage_options={}, provenance_json=provenance.to_json(), include_png=False
    )
    timer = threading.Timer(0.4, blocker.unlink)  # the blip ends during the retries
    timer.start()
    records = stage(_error_batch(["a", "b"]))
    timer.join()
    assert "retrying in" in caplog.text
    staged = [r for r in zip(records["type"], records["keys"]) if r[0] == "staged"]
    assert staged == [("staged", ["a", "b"])]
    files = list((out / "_staging" / "s-0001").glob("*.parquet"))
    assert len(files) == 1
    table = pq.read_table(files[0])
    assert table.column("key").to_pylist() == ["a", "b"] and set(table.column("error_kind").to_pylist()) == {
        "not_an_image"
    }

    monkeypatch.setattr(stages, "WRITE_DELAYS_S", (0.05, 0.05))
    lasting = tmp_path / "lasting"
    lasting.mkdir()
    (lasting / "_staging").write_text("stays")
    stage = stages.EncodeAndStage(
        out_url=str(lasting), storage_options={}, provenance_json=provenance.to_json(), include_png=False
    )
    with pytest.raises(OSError):
        stage(_error_batch(["c"]))


def test_read_stage_rows_carry_kind_flag_and_location(tmp_path, photos):
    """The read stage (run in-process) turns every reader record into one row: kind, retryable flag, the
    image's location in the message, ``image_url``; the ``end`` row counts them all."""
    import dataclasses

    from pipeline.annotate.stages import ReadShard
    from pipeline.shards import list_shards

    arr = photos["coffee"]
    full = io.BytesIO()
    with tarfile.open(fileobj=full, mode="w") as tf:
        for i in range(3):
            add_member(tf, f"k{i}.jpg", jpeg_bytes(arr, (48 + 8 * i, 40)))
        add_member(tf, "txt.jpg", b"not an image at all")
    data = full.getvalue()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(
        data[: len(data) - 1536]
    )  # the end-of-archive blocks and part of the last member are gone
    old = time.time() - 3600
    os.utime(cut, (old, old))
    (shard,) = list_shards(str(cut))
    stage = ReadShard(
        storage_options={},
        short_side=64,
        max_size=128,
        max_pixels=10**7,
        shard_index={},
        overlays_per_shard=0,
        overlays_total=0,
        rows_per_batch=100,
    )
    batches = list(stage({"shard": [json.dumps(dataclasses.asdict(shard))]}))
    rows = [dict(zip(batches[0], values)) for b in batches for values in zip(*b.values())]
    samples, end = rows[:-1], rows[-1]
    assert end["kind"] == "end" and end["shard_total"] == len(samples)
    by_key = {r["key"]: r for r in samples}
    assert [by_key[f"k{i}"]["error"] for i in range(3)] == ["", "", ""]
    assert by_key["k0"]["image_url"] == f"tar://k0.jpg::file://{cut}" and by_key["k0"]["rh"] == 64
    shard_row = by_key["__shard__"]
    assert (shard_row["error_kind"], shard_row["retryable"]) == ("truncated_shard", False)
    assert shard_row["error"].endswith(f"[file://{cut}]")
    txt = by_key["txt"]
    assert (txt["error_kind"], txt["retryable"]) == ("not_an_image", False)  # read whole, then not decodable
    assert f"tar://txt.jpg::file://{cut}" in txt["error"]
