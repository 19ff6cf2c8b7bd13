"""pipeline.annotate.commit + pipeline.schema: exactly-once commits, crash/rerun, COCO exports, readers, S3."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from odise_model.types import Instance, PanopticResult, Segment, bbox_from_mask
from pipeline.annotate.commit import (
    CommitError,
    ProvenanceMismatchError,
    clean_uncommitted,
    commit_shard,
    committed_shards,
    finalize_coco,
    key_to_filename,
    prepare_shard_for_rerun,
    write_provenance,
    write_run_summary,
    write_shard_outputs,
    write_staging,
)
from pipeline.encode import encode_result, png_to_panoptic, rle_to_mask
from pipeline.schema import (
    SCHEMA_VERSION,
    RunProvenance,
    error_row,
    image_id_for,
    label_row,
    output_schema,
    provenance_from_schema,
    rows_to_table,
)
from pipeline.shards import ShardRef

CATS = [
    {"id": 1, "name": "cat", "isthing": True},
    {"id": 2, "name": "dog", "isthing": True},
    {"id": 7, "name": "sky", "isthing": False},
    {"id": 8, "name": "grass", "isthing": False},
]
PROV = RunProvenance(
    run_id="run-0001",
    model_variant="odise_tiny_test",
    weights_sha256={"unet": "ab" * 32, "clip": None},
    vocabulary_source="tests",
    vocabulary_sha256="cd" * 32,
    categories=CATS,
    thresholds={"object_mask_threshold": 0.8, "overlap_threshold": 0.8},
    weights_licences="CreativeML OpenRAIL-M (SD); MIT (CLIP)",
    settings={"batch_size": 2},
)


def fake_result(seed: int, h: int = 24, w: int = 32) -> PanopticResult:
    """Photo-like layout: sky over grass, one or two animals at seeded positions, with instances."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    seg = np.where(yy < rng.integers(6, 14), 1, 2).astype(np.int32)
    segments = [(1, 7, "sky", False, 0.9), (2, 8, "grass", False, 0.85)]
    instances = []
    for k, (cid, name) in enumerate([(1, "cat"), (2, "dog")][: 1 + seed % 2]):
        cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 6)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        seg[mask] = 3 + k
        segments.append((3 + k, cid, name, True, float(rng.uniform(0.5, 1.0))))
    segs = []
    for sid, cid, name, thing, score in segments:
        m = seg == sid
        if m.any():
            segs.append(Segment(sid, cid, name, thing, score, int(m.sum()), bbox_from_mask(m)))
            if thing:
                instances.append(Instance(cid, name, score * 0.9, m, bbox_from_mask(m)))
    return PanopticResult(panoptic_seg=seg, segments=segs, instances=instances)


def make_rows(
    shard: ShardRef, keys: list[str], *, include_png: bool = True, errors: tuple[str, ...] = ()
) -> list[dict]:
    rows = []
    for key in keys:
        common = {"run_id": PROV.run_id, "shard": shard.url, "shard_id": shard.shard_id, "key": key}
        if key in errors:
            rows.append(error_row(**common, error="truncated image", image_ext="jpg"))
        else:
            seed = int(hashlib.sha1(key.encode()).hexdigest()[:6], 16)
            rows.append(
                label_row(
                    **common,
                    encoded=encode_result(fake_result(seed), include_png=include_png),
                    image_ext="jpg",
                )
            )
    return rows


def shard(i: int) -> ShardRef:
    return ShardRef(url=f"s3://data/train/shard-{i:06d}.tar", shard_id=f"shard-{i:06d}-0000abcd")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------


def test_schema_rows_and_provenance() -> None:
    schema = output_schema(PROV)
    assert schema.metadata[b"odise_annotate.schema_version"] == str(SCHEMA_VERSION).encode()
    assert provenance_from_schema(schema) == PROV
    assert RunProvenance.from_json(PROV.to_json()) == PROV
    assert pickle.loads(pickle.dumps(PROV)) == PROV  # travels to Ray tasks
    with pytest.raises(ValueError, match="unknown provenance keys"):
        RunProvenance.from_dict({**PROV.to_dict(), "surprise": 1})
    seg_type = schema.field("segments").type.value_type
    assert seg_type.field("bbox").type == pa.list_(pa.float32(), 4)
    assert seg_type.field("rle").type.field("counts").type == pa.string()
    table = rows_to_table(make_rows(shard(0), ["a", "b"], errors=("b",)), PROV)
    assert table.schema.equals(schema, check_metadata=True) and table.num_rows == 2
    assert table.column("image_id").to_pylist() == [image_id_for(shard(0).shard_id, k) for k in "ab"]
    assert 0 < image_id_for("x", "y") < 2**60
    assert table.column("segments").to_pylist()[1] == [] and table.column("width").to_pylist()[1] is None
    with pytest.raises(ValueError, match="unknown columns"):
        rows_to_table([{**make_rows(shard(0), ["a"])[0], "extra": 1}], PROV)
    with pytest.raises(ValueError, match="missing 'key'"):
        rows_to_table([{**make_rows(shard(0), ["a"])[0], "key": ""}], PROV)


def test_key_to_filename() -> None:
    assert key_to_filename("0001") == "0001" and key_to_filename("dir/sub/img_01.v2") == "dir/sub/img_01.v2"
    for bad in ["../etc/passwd", "/abs/x", "a b", "a#dup2", "x/./y", ".hidden", "ümlaut", "a//b", "x" * 300]:
        name = key_to_filename(bad)
        assert "/" not in name and not name.startswith(".") and len(name) < 120, (bad, name)
    assert key_to_filename("a b") != key_to_filename("a_b")


# --------------------------------------------------------------------------------------------------
# Staging and commit
# --------------------------------------------------------------------------------------------------


def test_duplicated_batches_commit_exactly_one_row_per_key(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    s = shard(0)
    keys = [f"k{i:02d}" for i in range(10)]
    staged = []
    staged += write_staging(make_rows(s, keys[:5]), out, None, PROV)  # task A
    staged += write_staging(
        make_rows(s, keys[5:]) + make_rows(shard(1), ["x"]), out, None, PROV
    )  # task B, 2 shards
    staged += write_staging(make_rows(s, keys[:5]), out, None, PROV)  # task A retried: duplicate batch
    staged += write_staging(make_rows(s, ["k03", "k10"], errors=("k03", "k10")), out, None, PROV)  # errors
    assert {r["shard_id"] for r in staged} == {s.shard_id, shard(1).shard_id}
    keys_seen = set().union(*(r["keys"] for r in staged if r["shard_id"] == s.shard_id))
    assert len(keys_seen) == 11 and sum(r["n_rows"] for r in staged if r["shard_id"] == s.shard_id) == 17

    with pytest.raises(CommitError, match="11 distinct keys staged, expected 12"):
        commit_shard(out, None, shard=s, expected_keys=12, provenance=PROV, categories=CATS)
    assert committed_shards(out, None) == {}

    with pytest.raises(CommitError, match=r"missing \['k11'\], unexpected \['k10'\]"):
        commit_shard(out, None, shard=s, expected_keys=[*keys, "k11"], provenance=PROV)
    info = commit_shard(out, None, shard=s, expected_keys=11, provenance=PROV, categories=CATS)
    assert (info.n_images, info.n_labelled, info.n_errors, info.n_duplicates_dropped) == (11, 10, 1, 6)
    final = tmp_path / "out" / "parquet" / f"{s.shard_id}.parquet"
    table = pq.read_table(final)
    assert table.column("key").to_pylist() == keys + ["k10"]
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert by_key["k03"]["error"] is None and by_key["k10"]["error"] == "truncated image"  # labelled wins
    assert provenance_from_schema(table.schema) == PROV
    marker = json.loads((tmp_path / "out" / "_commits" / f"{s.shard_id}.json").read_text())
    assert marker["parquet_sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert marker["shard"] == s.url and marker["n_images"] == 11 and marker["run_id"] == PROV.run_id
    assert not (tmp_path / "out" / "_staging" / s.shard_id).exists()
    assert (tmp_path / "out" / "_staging" / shard(1).shard_id).exists()  # other shard untouched
    assert set(committed_shards(out, None)) == {s.shard_id}

    # idempotent: a second commit (and a late duplicate from a slow retried task) changes nothing.
    before = snapshot(tmp_path / "out")
    write_staging(make_rows(s, keys[:3]), out, None, PROV)
    assert commit_shard(out, None, shard=s, expected_keys=11, provenance=PROV) == info
    assert snapshot(tmp_path / "out") == before

    with pytest.raises(CommitError, match="category ids \\[2\\]"):
        commit_shard(
            out, None, shard=shard(1), expected_keys=1, provenance=PROV, categories=CATS[:1] + CATS[2:]
        )


def test_crash_before_marker_then_rerun(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    s = shard(3)
    keys = [f"img{i}" for i in range(6)]
    write_staging(make_rows(s, keys[:4]), out, None, PROV)
    write_staging(make_rows(s, keys[2:]), out, None, PROV)
    # the driver dies after the outputs, before the marker: the shard is not committed.
    prepared = write_shard_outputs(out, None, shard=s, expected_keys=6, provenance=PROV)
    assert (tmp_path / "out" / prepared.info.parquet).exists()
    assert committed_shards(out, None) == {}
    # a tmp file of a writer killed mid-write must not be picked up by readers or commits.
    (tmp_path / "out" / "parquet" / f".{s.shard_id}.parquet.tmp-dead").write_bytes(b"partial")

    # the rerun: clean leftovers, re-process the shard (its tasks run again, one of them twice).
    assert clean_uncommitted(out, None) == [s.shard_id]
    assert not (tmp_path / "out" / "parquet" / f"{s.shard_id}.parquet").exists()
    assert not (tmp_path / "out" / "coco" / "panoptic" / s.shard_id).exists()
    assert list((tmp_path / "out" / "parquet").iterdir()) == []
    write_staging(make_rows(s, keys[:3]), out, None, PROV)
    write_staging(make_rows(s, keys[3:]), out, None, PROV)
    write_staging(rows_to_table(make_rows(s, keys[3:]), PROV), out, None, PROV)  # Arrow batches too
    info = commit_shard(out, None, shard=s, expected_keys=6, provenance=PROV)
    assert read_keys(tmp_path / "out" / "parquet" / f"{s.shard_id}.parquet") == keys
    assert info.n_images == 6 and set(committed_shards(out, None)) == {s.shard_id}
    assert len(list((tmp_path / "out" / "coco" / "panoptic" / s.shard_id).iterdir())) == 6

    # crash before the marker again, then commit again without cleaning: same files, no duplicates.
    s2 = shard(4)
    write_staging(make_rows(s2, keys), out, None, PROV)
    first = write_shard_outputs(out, None, shard=s2, expected_keys=6, provenance=PROV)
    files_after_crash = snapshot(tmp_path / "out" / "parquet")
    again = commit_shard(out, None, shard=s2, expected_keys=6, provenance=PROV)
    assert again.parquet_sha256 == first.info.parquet_sha256
    assert snapshot(tmp_path / "out" / "parquet") == files_after_crash
    assert prepare_shard_for_rerun(out, None, s2.shard_id) == {
        "shard_id": s2.shard_id,
        "committed": True,
        "deleted": 0,
    }

    with pytest.raises(CommitError, match="no staging files"):
        commit_shard(out, None, shard=shard(9), expected_keys=3, provenance=PROV)
    empty = commit_shard(out, None, shard=shard(9), expected_keys=0, provenance=PROV)  # an empty tar
    assert empty.n_images == 0 and pq.read_table(tmp_path / "out" / empty.parquet).num_rows == 0


# --------------------------------------------------------------------------------------------------
# COCO and readers
# --------------------------------------------------------------------------------------------------


def _build_output(out: str, so: dict | None) -> dict:
    """Two committed shards (one without PNGs in the Parquet), one staged-but-uncommitted shard."""
    rows = {
        shard(0): make_rows(shard(0), ["a", "b", "c"], errors=("b",)),
        shard(1): make_rows(shard(1), ["d/e", "f"], include_png=False),
        shard(2): make_rows(shard(2), ["never"]),
    }
    for r in rows.values():
        write_staging(r, out, so, PROV)
        write_staging(r[:1], out, so, PROV)  # duplicate of the first row
    commit_shard(out, so, shard=shard(0), expected_keys=3, provenance=PROV, categories=CATS)
    commit_shard(out, so, shard=shard(1), expected_keys=2, provenance=PROV, categories=CATS)
    write_shard_outputs(out, so, shard=shard(2), expected_keys=1, provenance=PROV)  # crashed before marker
    return rows


def _check_coco(panoptic: dict, instances_path: str, png_bytes) -> None:
    from pycocotools.coco import COCO

    committed_keys = {
        (shard(0).shard_id, "a"),
        (shard(0).shard_id, "c"),
        (shard(1).shard_id, "d/e"),
        (shard(1).shard_id, "f"),
    }
    expected_ids = {image_id_for(sid, k) for sid, k in committed_keys}
    assert {im["id"] for im in panoptic["images"]} == expected_ids  # no error rows, no uncommitted shard
    assert f"{shard(1).shard_id}/d/e.jpg" in {im["file_name"] for im in panoptic["images"]}
    assert {c["id"] for c in panoptic["categories"]} == {1, 2, 7, 8}
    assert all(len(c["color"]) == 3 for c in panoptic["categories"])
    for ann in panoptic["annotations"]:
        ids = png_to_panoptic(png_bytes(ann["file_name"]))
        present = set(np.unique(ids).tolist()) - {0}
        assert present == {s["id"] for s in ann["segments_info"]}, ann["file_name"]
        for s in ann["segments_info"]:
            assert s["area"] == int((ids == s["id"]).sum()) and s["iscrowd"] == 0

    coco = COCO(instances_path)
    assert set(coco.getImgIds()) == expected_ids
    anns = coco.loadAnns(coco.getAnnIds())
    assert len({a["id"] for a in anns}) == len(anns) > 0
    for a in anns[:3]:
        mask = coco.annToMask(a)
        assert mask.sum() == a["area"] and mask.shape == (
            coco.imgs[a["image_id"]]["height"],
            coco.imgs[a["image_id"]]["width"],
        )
    results = [{k: a[k] for k in ("image_id", "category_id", "segmentation", "score")} for a in anns]
    res = coco.loadRes(results)
    assert len(res.getAnnIds()) == len(anns)


def test_finalize_coco_and_readers_local(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    _build_output(out, None)
    paths = finalize_coco(out, None, CATS)
    assert set(paths) == {"panoptic", "instances"}
    panoptic = json.loads((tmp_path / "out" / "coco" / "panoptic.json").read_text())
    _check_coco(
        panoptic,
        str(tmp_path / "out" / "coco" / "instances.json"),
        lambda name: (tmp_path / "out" / "coco" / "panoptic" / name).read_bytes(),
    )
    with pytest.raises(ValueError, match="missing from `categories`"):
        finalize_coco(out, None, CATS[:1])

    # Parquet readable without our code: pyarrow.dataset, pandas, HF datasets.
    clean_uncommitted(out, None)  # removes the uncommitted shard's Parquet
    ds = pads.dataset(str(tmp_path / "out" / "parquet"), format="parquet")
    table = ds.to_table()
    assert table.num_rows == 5 and sorted(table.column("key").to_pylist()) == ["a", "b", "c", "d/e", "f"]
    import pandas as pd

    df = pd.read_parquet(tmp_path / "out" / "parquet")
    assert len(df) == 5 and df["error"].notna().sum() == 1
    seg0 = df.set_index("key").loc["a", "segments"][0]
    assert np.array_equal(
        rle_to_mask({"size": list(seg0["rle"]["size"]), "counts": seg0["rle"]["counts"]}).shape, [24, 32]
    )
    import datasets

    hf = datasets.load_dataset(
        "parquet",
        data_files=str(tmp_path / "out" / "parquet" / "*.parquet"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert hf.num_rows == 5 and hf.features["segments"].feature["bbox"].length == 4
    row = hf.filter(lambda r: r["key"] == "c")[0]
    assert row["error"] is None and row["segments"][0]["rle"]["size"] == [24, 32]

    summary = write_run_summary(out, None, provenance=PROV, shards=[shard(0), shard(1), shard(2)])
    assert (summary["n_images"], summary["n_labelled"], summary["n_errors"]) == (5, 4, 1)
    assert summary["pending_shards"] == [shard(2).shard_id] and summary["stale_shards"] == []
    assert summary["errors_by_reason"] == {"truncated image": 1}
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["n_shards_committed"] == 2
    assert RunProvenance.from_json((tmp_path / "out" / "provenance.json").read_text()) == PROV


def test_provenance_refuses_mixing_runs(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    assert write_provenance(out, None, PROV) == PROV
    resumed = RunProvenance(
        **{**PROV.to_dict(), "run_id": "run-0002", "created_at": "2030-01-01T00:00:00+00:00"}
    )
    assert write_provenance(out, None, resumed) == PROV  # same labels: compatible, first file kept
    other = RunProvenance(**{**PROV.to_dict(), "thresholds": {"object_mask_threshold": 0.5}})
    with pytest.raises(ProvenanceMismatchError, match="thresholds"):
        write_provenance(out, None, other)


def test_s3_end_to_end(s3_bucket: str, s3_storage_options: dict, tmp_path: Path) -> None:
    import s3fs

    so = s3_storage_options
    out = f"s3://{s3_bucket}/runs/r1"
    _build_output(out, so)
    fs = s3fs.S3FileSystem(**so)
    assert set(committed_shards(out, so)) == {shard(0).shard_id, shard(1).shard_id}
    left = fs.find(f"{s3_bucket}/runs/r1/_staging")  # committed shards' staging files are gone
    assert left and all(f"/_staging/{shard(2).shard_id}/" in p for p in left)
    finalize_coco(out, so, CATS)
    panoptic = json.loads(fs.cat(f"{s3_bucket}/runs/r1/coco/panoptic.json"))
    local_instances = str(tmp_path / "instances.json")
    fs.get(f"{s3_bucket}/runs/r1/coco/instances.json", local_instances)
    _check_coco(panoptic, local_instances, lambda name: fs.cat(f"{s3_bucket}/runs/r1/coco/panoptic/{name}"))

    assert clean_uncommitted(out, so) == [shard(2).shard_id]
    ds = pads.dataset(f"{s3_bucket}/runs/r1/parquet", filesystem=fs, format="parquet")
    assert sorted(ds.to_table(columns=["key"]).column("key").to_pylist()) == ["a", "b", "c", "d/e", "f"]
    assert fs.find(f"{s3_bucket}/runs/r1/_staging") == []
    # rerun of a committed shard is a no-op; of the cleaned one, a clean commit.
    write_staging(make_rows(shard(2), ["never"]), out, so, PROV)
    info = commit_shard(out, so, shard=shard(2), expected_keys=1, provenance=PROV)
    assert info.n_images == 1 and len(committed_shards(out, so)) == 3


def test_error_reason_groups_errors_by_kind():
    from pipeline.annotate.commit import error_reason

    assert error_reason("truncated image [file:///data/imgs/a.jpg]") == "truncated image"
    assert error_reason("empty (0 bytes) [file:///x/shard.tar:k1]") == "empty (0 bytes)"
    assert error_reason("too large: 900000000 pixels > 178956970 [s3://b/s.tar:k]") == "too large"
    assert error_reason("no image in the sample") == "no image in the sample"
    assert error_reason("   ") == "error"
