"""pipeline.annotate.coco: the incremental, sharded COCO export (parts by seq range + index), validated with
pycocotools part by part; rebuilds only what changed; a no-op reads no fragment; SIGKILL during assembly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
from commit_fixtures import CATS, PROV, coco_parts, make_rows, shard

from pipeline.annotate.coco import finalize_coco, read_index
from pipeline.annotate.commit import begin_replacement, commit_shard, committed_shards, write_staging
from pipeline.encode import png_to_panoptic

REPO = Path(__file__).resolve().parents[1]


def commit(out: str, so: dict | None, i: int, keys: list[str], **kw) -> None:
    write_staging(make_rows(shard(i), keys, **kw), out, so, PROV)
    commit_shard(out, so, shard=shard(i), expected_keys=len(keys), provenance=PROV, categories=CATS)


def parquet_rows(out: Path) -> list[dict]:
    return pads.dataset(str(out / "parquet"), format="parquet").to_table().to_pylist()


def check_export(out: Path, read=lambda p: p.read_bytes()) -> dict:
    """Every part loads in pycocotools; together the parts hold exactly the labelled Parquet rows; PNG ids match
    segments_info; ids are unique and < 2**53. Returns the index."""
    from pycocotools.coco import COCO

    rows = [r for r in parquet_rows(out) if r["error"] is None]
    index = json.loads((out / "coco" / "index.json").read_text())
    seen_images, seen_anns = [], []
    for part, (panoptic, instances_path) in zip(index["parts"], coco_parts(out / "coco"), strict=True):
        coco = COCO(str(instances_path))
        ids = set(coco.getImgIds())
        assert (
            ids == {im["id"] for im in panoptic["images"]} == {a["image_id"] for a in panoptic["annotations"]}
        )
        anns = coco.loadAnns(coco.getAnnIds())
        assert len(anns) == part["n_instance_annotations"] and len(ids) == part["n_images"]
        if anns:
            res = coco.loadRes(
                [{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns]
            )
            assert len(res.getAnnIds()) == len(anns)
            mask = coco.annToMask(anns[0])
            assert mask.sum() == anns[0]["area"]
        lo, hi = part["seq_range"]
        assert all(lo <= i >> 28 <= hi for i in ids)
        for ann in panoptic["annotations"]:
            seg_map = png_to_panoptic(read(out / "coco" / "panoptic" / ann["file_name"]))
            assert set(np.unique(seg_map).tolist()) - {0} == {s["id"] for s in ann["segments_info"]}
        known = {c["id"] for c in panoptic["categories"]}
        assert all(s["category_id"] in known for a in panoptic["annotations"] for s in a["segments_info"])
        assert {a["category_id"] for a in anns} <= known
        seen_images += list(ids)
        seen_anns += [a["id"] for a in anns]
    assert sorted(seen_images) == sorted(r["image_id"] for r in rows)  # every labelled row exactly once
    assert len(set(seen_anns)) == len(seen_anns) == sum(len(r["instances"]) for r in rows)
    assert all(0 < i < 2**53 for i in seen_images + seen_anns)
    assert index["n_images"] == len(rows)
    return index


def test_export_categories(tmp_path: Path) -> None:
    out = tmp_path / "out"
    commit(str(out), None, 0, ["a"])
    finalize_coco(str(out), None, CATS)
    panoptic, instances = coco_parts(out / "coco")[0]
    assert {c["id"] for c in panoptic["categories"]} == {1, 2, 7, 8}
    assert all(len(c["color"]) == 3 for c in panoptic["categories"])
    cats = json.loads(instances.read_text())["categories"]
    assert [(c["id"], c["isthing"]) for c in cats] == [(1, 1), (2, 1), (7, 0), (8, 0)]
    with pytest.raises(ValueError, match="missing from `categories`"):
        finalize_coco(
            str(out), None, CATS[:1], max_images_per_file=7
        )  # other settings: a rebuild, which checks


def test_sharded_export_is_incremental(tmp_path: Path) -> None:
    out = tmp_path / "out"
    commit(str(out), None, 0, ["a", "b", "c"], errors=("b",))
    commit(str(out), None, 1, ["d", "e"])
    first = finalize_coco(str(out), None, CATS, max_images_per_file=4)
    index = check_export(out)
    assert first["parts"] == "1" and [p["panoptic"] for p in index["parts"]] == ["panoptic.json"]
    assert (out / "coco" / "panoptic.json").exists() and (out / "coco" / "instances.json").exists()

    # grows past the size: numbered parts, the single files go (after the index names the parts)
    commit(str(out), None, 2, ["f", "g", "h"])
    commit(str(out), None, 3, ["i"])
    grown = finalize_coco(str(out), None, CATS, max_images_per_file=4)
    index = check_export(out)
    assert grown["parts"] == "2" and grown["panoptic"].endswith("/coco/panoptic-*.json")
    assert [(p["panoptic"], p["instances"], p["n_images"], p["n_shards"]) for p in index["parts"]] == [
        ("panoptic-00000.json", "instances-00000.json", 4, 2),
        ("panoptic-00001.json", "instances-00001.json", 4, 2),
    ]
    assert not (out / "coco" / "panoptic.json").exists() and not (out / "coco" / "instances.json").exists()

    # nothing new: nothing rebuilt, nothing written (the index's digests prove the export is current)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "coco").iterdir() if p.is_file()}
    assert finalize_coco(str(out), None, CATS, max_images_per_file=4)["rebuilt"] == "0"
    assert {p.name: p.stat().st_mtime_ns for p in (out / "coco").iterdir() if p.is_file()} == mtimes

    # a new shard fills no closed part: only the open (last) part or a new one is built
    commit(str(out), None, 4, ["j", "k"])
    assert finalize_coco(str(out), None, CATS, max_images_per_file=4)["rebuilt"] == "1"
    index = check_export(out)
    assert (
        len(index["parts"]) == 3
        and (out / "coco" / "panoptic-00000.json").stat().st_mtime_ns == mtimes["panoptic-00000.json"]
    )

    # a replaced shard (retry) rebuilds the part holding it, only that one
    write_staging(make_rows(shard(0), ["b"], salt="fixed"), str(out), None, PROV)
    begin_replacement(str(out), None, shard(0).shard_id, mode="retry", run_id="r2")
    commit_shard(
        str(out), None, shard=shard(0), expected_keys=1, provenance=PROV, replace="retry", retry_keys=["b"]
    )
    before = {p.name: p.stat().st_mtime_ns for p in (out / "coco").glob("*-0000[12].json")}
    assert finalize_coco(str(out), None, CATS, max_images_per_file=4)["rebuilt"] == "1"
    index = check_export(out)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "coco").glob("*-0000[12].json")} == before
    assert index["parts"][0]["n_images"] == 5  # a part may pass the size when a retry fills it

    # other settings (part size, image root, categories) rebuild everything
    assert finalize_coco(str(out), None, CATS, max_images_per_file=100)["rebuilt"] == "1"
    index = check_export(out)
    assert [p["panoptic"] for p in index["parts"]] == ["panoptic.json"]
    assert sorted(p.name for p in (out / "coco").glob("*.json")) == [
        "index.json",
        "instances.json",
        "panoptic.json",
    ]


def test_noop_reads_no_fragment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    for i in range(3):
        commit(str(out), None, i, [f"k{i}-{j}" for j in range(3)])
    finalize_coco(str(out), None, CATS, max_images_per_file=4)
    exports = {p.name: p.read_bytes() for p in (out / "coco").glob("*.json")}
    for frag in (out / "coco" / "_parts").iterdir():
        frag.write_bytes(b"{corrupt")  # any read of a fragment would now fail
    result = finalize_coco(
        str(out), None, CATS, max_images_per_file=4, markers=committed_shards(str(out), None)
    )
    assert result["rebuilt"] == "0"
    assert {p.name: p.read_bytes() for p in (out / "coco").glob("*.json")} == exports
    # a missing export file is noticed from the listing and its part rebuilt (which needs the fragments)
    (out / "coco" / "instances-00001.json").unlink()
    with pytest.raises(json.JSONDecodeError):
        finalize_coco(str(out), None, CATS, max_images_per_file=4)


def test_image_root_and_coco_urls(tmp_path: Path) -> None:
    out = tmp_path / "out"
    commit(str(out), None, 1, ["d/e", "f"])
    finalize_coco(str(out), None, CATS)
    images = {
        im["file_name"]: im for im in json.loads((out / "coco" / "panoptic.json").read_text())["images"]
    }
    assert set(images) == {"shard-000001/d/e.jpg", "shard-000001/f.jpg"}  # <tar stem>/<member>
    assert images["shard-000001/f.jpg"]["coco_url"] == "tar://f.jpg::s3://data/train/shard-000001.tar"
    finalize_coco(str(out), None, CATS, image_root="s3://data")  # tars extracted beside themselves
    names = {im["file_name"] for im in json.loads((out / "coco" / "panoptic.json").read_text())["images"]}
    assert names == {"train/shard-000001/d/e.jpg", "train/shard-000001/f.jpg"}
    assert read_index(str(out), None)["image_root"] == "s3://data/"


def test_sharded_export_on_s3(s3_bucket: str, s3_storage_options: dict, tmp_path: Path) -> None:
    import s3fs

    so = s3_storage_options
    out = f"s3://{s3_bucket}/labels"
    for i, keys in enumerate([["a", "b"], ["c", "d", "e"], ["f"]]):
        commit(out, so, i, keys)
    result = finalize_coco(out, so, CATS, max_images_per_file=2)
    assert result["parts"] == "3" and result["index"] == f"s3://{s3_bucket}/labels/coco/index.json"
    fs = s3fs.S3FileSystem(**so)
    local = tmp_path / "copy"
    fs.get(f"{s3_bucket}/labels", str(local), recursive=True)
    check_export(local)
    assert finalize_coco(out, so, CATS, max_images_per_file=2)["rebuilt"] == "0"


def test_sigkill_during_assembly_leaves_the_previous_export_and_the_rerun_repairs_it(tmp_path: Path) -> None:
    """A process killed (SIGKILL) while it publishes a part: every file is the old one or a complete new one,
    the index still describes the previous export, and the next call rebuilds what is stale."""
    out = tmp_path / "out"
    for i in range(2):
        commit(str(out), None, i, [f"k{i}-{j}" for j in range(3)])
    finalize_coco(str(out), None, CATS, max_images_per_file=3)
    old_index = (out / "coco" / "index.json").read_bytes()
    old = {p.name: p.read_bytes() for p in (out / "coco").glob("*.json")}
    write_staging(make_rows(shard(0), ["k0-1"], salt="new"), str(out), None, PROV)
    begin_replacement(str(out), None, shard(0).shard_id, mode="relabel", run_id="r2")
    commit_shard(str(out), None, shard=shard(0), expected_keys=1, provenance=PROV, replace="relabel")
    commit(str(out), None, 2, ["k2-0", "k2-1"])

    flag = tmp_path / "paused"
    code = (
        "import json, sys; from pipeline.annotate.coco import finalize_coco; "
        f"finalize_coco({str(out)!r}, None, json.loads(sys.argv[1]), max_images_per_file=3)"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ODISE_TEST_PAUSE_AT": "coco",
        "ODISE_TEST_PAUSE_FILE": str(flag),
    }
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(CATS)], env=env)
    try:
        deadline = time.time() + 60
        while not flag.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert flag.exists(), "the assembly never reached the pause point"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert flag.read_text().startswith("coco panoptic-00000.json")
    assert (out / "coco" / "index.json").read_bytes() == old_index  # still the previous export's index
    for name, data in old.items():
        now = (out / "coco" / name).read_bytes()
        assert now == data or name == "panoptic-00000.json", name  # only the published file changed...
        json.loads(now)  # ... and it is complete
    assert not [
        p for p in (out / "coco").iterdir() if p.name.startswith(".")
    ]  # no half-written temp file left

    result = finalize_coco(str(out), None, CATS, max_images_per_file=3)
    assert result["rebuilt"] == "2"  # the replaced shard's part and the new one
    check_export(out)
