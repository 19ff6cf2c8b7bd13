"""pipeline.annotate.commit + pipeline.schema: streaming exactly-once commits, ids, crash/rerun, replacements
(--retry-errors / --relabel-changed), markers (small, retried reads, sources), COCO exports, readers, S3."""

from __future__ import annotations

import hashlib
import json
import pickle
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
from commit_fixtures import CATS, PROV, make_rows, read_keys, shard, snapshot
from fsspec.implementations.local import LocalFileSystem

from pipeline.annotate.coco import png_names
from pipeline.annotate.commit import (
    CommitError,
    ProvenanceMismatchError,
    begin_replacement,
    clean_uncommitted,
    commit_shard,
    committed_shards,
    finalize_coco,
    key_to_filename,
    load_members,
    next_seq,
    pending_replacements,
    prepare_shard_for_rerun,
    source_changed,
    source_stamps,
    write_provenance,
    write_run_summary,
    write_shard_outputs,
    write_staging,
)
from pipeline.encode import png_to_panoptic, rle_to_mask
from pipeline.schema import (
    SCHEMA_VERSION,
    RunProvenance,
    image_id,
    image_id_for,
    output_schema,
    provenance_from_schema,
    rows_to_table,
)
from pipeline.shards import ShardRef, exclude_labelled_images

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
    assert (
        table.column("image_id").to_pylist() == [image_id_for(shard(0).shard_id, k) for k in "ab"] == [0, 0]
    )
    assert image_id(0, 0) == 0 and image_id(3, 5) == 3 * 2**28 + 5
    assert image_id(2**25 - 1, 2**28 - 1) == 2**53 - 1  # the largest id is exact in JavaScript
    for bad in [(-1, 0), (2**25, 0), (0, 2**28), (0, -1)]:
        with pytest.raises(ValueError, match="out of range"):
            image_id(*bad)
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


def test_png_names_replace_the_extension_and_never_collide() -> None:
    names = png_names(
        [("astronaut.jpg", "jpg"), ("cats/001.JPEG", "jpeg"), ("0001", "jpg"), ("x.tar.png", "png")]
    )
    assert names == {
        "astronaut.jpg": "astronaut.png",
        "cats/001.JPEG": "cats/001.png",
        "0001": "0001.png",  # tar keys carry no extension
        "x.tar.png": "x.tar.png",
    }
    # a.jpg and a.png in one shard must not share a PNG: <stem>-<ext>.png
    assert png_names([("a.jpg", "jpg"), ("a.png", "png"), ("b.jpg", "jpg")]) == {
        "a.jpg": "a-jpg.png",
        "a.png": "a-png.png",
        "b.jpg": "b.png",
    }
    # still colliding (case-insensitive filesystems, a key named like a disambiguated one): a hash of the key
    clash = [("a.jpg", "jpg"), ("a.png", "png"), ("A.png", "png"), ("a-jpg", None), ("b.jpg", "jpg")]
    names = png_names(clash)
    assert len({n.casefold() for n in names.values()}) == len(clash)
    assert names["b.jpg"] == "b.png" and all(
        names[k].startswith(("a-", "A-")) for k in ("a.jpg", "a.png", "A.png")
    )
    assert png_names(reversed(clash)) == names  # deterministic, whatever the order
    unsafe = png_names([("../x.jpg", "jpg")])["../x.jpg"]
    assert "/" not in unsafe and unsafe.endswith(".png") and ".." not in unsafe.split("-")[0]


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
    info = commit_shard(out, None, shard=s, expected_keys=11, provenance=PROV, categories=CATS, seq=7)
    assert (info.n_images, info.n_labelled, info.n_errors, info.n_duplicates_dropped) == (11, 10, 1, 6)
    assert info.seq == 7 and info.n_errors_by_kind == {"truncated_image": 1} and info.n_retryable == 0
    final = tmp_path / "out" / "parquet" / f"{s.shard_id}.parquet"
    table = pq.read_table(final)
    assert sorted(table.column("key").to_pylist()) == keys + ["k10"]  # one row per key
    # image_id = seq << 28 | rank of the key among the shard's sorted keys: sorting by it gives key order
    ids = dict(zip(table.column("key").to_pylist(), table.column("image_id").to_pylist(), strict=True))
    assert ids == {k: 7 * 2**28 + rank for rank, k in enumerate(sorted(keys + ["k10"]))}
    by_key = {r["key"]: r for r in table.to_pylist()}
    assert by_key["k03"]["error"] is None and by_key["k10"]["error"] == "truncated image"  # labelled wins
    assert provenance_from_schema(table.schema) == PROV
    marker = json.loads((tmp_path / "out" / "_commits" / f"{s.shard_id}.json").read_text())
    assert marker["parquet_sha256"] == hashlib.sha256(final.read_bytes()).hexdigest()
    assert marker["parquet_bytes"] == final.stat().st_size
    assert marker["shard"] == s.url and marker["n_images"] == 11 and marker["run_id"] == PROV.run_id
    assert marker["seq"] == 7 and "members" not in marker and "category_counts" not in marker
    assert info.category_counts["sky"] == 10 and next_seq(committed_shards(out, None)) == 8
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
    assert sorted(read_keys(tmp_path / "out" / "parquet" / f"{s.shard_id}.parquet")) == keys
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


def _labelled_ids(table: pa.Table) -> set[int]:
    return set(table.filter(table.column("error").is_null()).column("image_id").to_pylist())


def _check_coco(panoptic: dict, instances_path: str, png_bytes, parquet: pa.Table) -> None:
    """The COCO export agrees with the Parquet rows: the labelled rows' ids, names, PNG ids, RLE masks."""
    from pycocotools.coco import COCO

    expected_ids = _labelled_ids(parquet)
    assert len(expected_ids) == 4 and all(0 < i < 2**53 for i in expected_ids)
    assert {im["id"] for im in panoptic["images"]} == expected_ids  # no error rows, no uncommitted shard
    images = {im["file_name"]: im for im in panoptic["images"]}
    # tar members: <tar stem>/<member>; coco_url: fsspec's chained URL of the member
    assert images["shard-000001/d/e.jpg"]["coco_url"] == "tar://d/e.jpg::s3://data/train/shard-000001.tar"
    assert {a["file_name"] for a in panoptic["annotations"]} >= {f"{shard(1).shard_id}/d/e.png"}
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
    assert (
        paths["panoptic"].endswith("/coco/panoptic.json")
        and paths["parts"] == "1"
        and paths["rebuilt"] == "1"
    )
    panoptic = json.loads((tmp_path / "out" / "coco" / "panoptic.json").read_text())
    committed = pads.dataset(
        [str(tmp_path / "out" / "parquet" / f"{shard(i).shard_id}.parquet") for i in (0, 1)], format="parquet"
    ).to_table()
    _check_coco(
        panoptic,
        str(tmp_path / "out" / "coco" / "instances.json"),
        lambda name: (tmp_path / "out" / "coco" / "panoptic" / name).read_bytes(),
        committed,
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
    assert summary["errors_by_kind"] == {"truncated_image": 1} and summary["n_retryable"] == 0
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
    committed = pads.dataset(
        [f"{s3_bucket}/runs/r1/parquet/{shard(i).shard_id}.parquet" for i in (0, 1)],
        filesystem=fs,
        format="parquet",
    ).to_table()
    _check_coco(
        panoptic, local_instances, lambda name: fs.cat(f"{s3_bucket}/runs/r1/coco/panoptic/{name}"), committed
    )

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


# --------------------------------------------------------------------------------------------------
# Streaming commit: same rows as the old in-memory commit, bounded batches
# --------------------------------------------------------------------------------------------------


def _reference_commit(paths: list[Path]) -> dict[str, dict]:
    """The old semantics, in memory: concatenate the staging files in name order, keep one row per key
    (a labelled row beats an error row; then the earliest row)."""
    rows = [r for p in sorted(paths) for r in pq.read_table(p).to_pylist()]
    best: dict[str, tuple[tuple[int, int], dict]] = {}
    for i, row in enumerate(rows):
        rank = (0 if row["error"] is None else 1, i)
        if row["key"] not in best or rank < best[row["key"]][0]:
            best[row["key"]] = (rank, row)
    return {k: v for k, (_, v) in best.items()}


def test_streaming_commit_equals_the_in_memory_semantics(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    s = shard(5)
    keys = [f"img-{i:03d}" for i in range(40)]
    rng = np.random.default_rng(0)
    for attempt in range(6):  # overlapping batches, retried tasks, flip-flopping errors, different labels
        chosen = sorted(rng.choice(keys, size=15, replace=False).tolist())
        errors = tuple(k for k in chosen if rng.random() < 0.4)
        write_staging(make_rows(s, chosen, errors=errors, salt=str(attempt)), out, None, PROV)
    write_staging(make_rows(s, keys, errors=tuple(keys)), out, None, PROV)  # every key staged at least once
    staging = sorted((tmp_path / "out" / "_staging" / s.shard_id).glob("*.parquet"))
    want = _reference_commit(staging)

    # batches of 3 rows: many batches, row groups and PNG writes per staging file
    prepared = write_shard_outputs(
        out, None, shard=s, expected_keys=set(keys), provenance=PROV, seq=3, batch_rows=3
    )
    got = {r["key"]: r for r in pq.read_table(tmp_path / "out" / prepared.info.parquet).to_pylist()}
    assert set(got) == set(want) == set(keys)
    for key in keys:
        assert got[key]["image_id"] == image_id(3, sorted(keys).index(key))
        assert {**got[key], "image_id": 0} == {**want[key], "image_id": 0}, key
    assert prepared.info.n_labelled == sum(r["error"] is None for r in want.values())
    assert prepared.info.n_duplicates_dropped == sum(len(pq.read_table(p)) for p in staging) - len(keys)
    # the fragment: one line per labelled row, in Parquet row order, instance ids seq << 28 | running index
    lines = [
        json.loads(x)
        for x in (tmp_path / "out" / "coco" / "_parts" / f"{s.shard_id}.jsonl").read_text().splitlines()
    ]
    assert [x["image"]["id"] for x in lines] == [r["image_id"] for r in got.values() if r["error"] is None]
    inst_ids = [a["id"] for x in lines for a in x["instances"]]
    assert (
        inst_ids == [image_id(3, i) for i in range(len(inst_ids))]
        and len(inst_ids) == prepared.info.n_instances
    )


def test_transient_marker_reads_are_retried_not_taken_for_uncommitted(tmp_path: Path, monkeypatch) -> None:
    """A marker read that fails with a connection error (an fsspec filesystem at the boundary raising it) is
    retried: the shard stays committed, nothing is relabelled or cleaned; a read that keeps failing raises."""
    import pipeline.storage

    monkeypatch.setattr(
        pipeline.storage, "RETRY_DELAYS_S", (0.05, 0.1, 0.2)
    )  # the production backoff, shortened

    class FlakyFS(LocalFileSystem):
        protocol = ("flakyfile",)
        failures: dict[str, int] = {}

        def cat_file(self, path, start=None, end=None, **kwargs):
            for pattern, left in list(self.failures.items()):
                if pattern in str(path) and left > 0:
                    self.failures[pattern] = left - 1
                    raise ConnectionError(f"injected: connection reset while reading {path}")
            return super().cat_file(path, start=start, end=end, **kwargs)

    fsspec.register_implementation("flakyfile", FlakyFS, clobber=True)
    out = f"flakyfile://{tmp_path / 'out'}"
    s0, s1 = shard(0), shard(1)
    for s in (s0, s1):
        write_staging(make_rows(s, ["a", "b"]), out, None, PROV)
        commit_shard(out, None, shard=s, expected_keys=2, provenance=PROV)
    before = snapshot(tmp_path / "out")

    FlakyFS.failures = {f"_commits/{s0.shard_id}.json": 2}  # fails twice, then reads
    assert set(committed_shards(out, None)) == {s0.shard_id, s1.shard_id}
    FlakyFS.failures = {f"_commits/{s0.shard_id}.json": 1}
    assert clean_uncommitted(out, None) == [] and snapshot(tmp_path / "out") == before
    FlakyFS.failures = {f"_commits/{s1.shard_id}.json": 1}
    write_staging(make_rows(s1, ["a"]), out, None, PROV)  # a late duplicate: the commit stays a no-op
    assert commit_shard(out, None, shard=s1, expected_keys=2, provenance=PROV).n_images == 2
    assert snapshot(tmp_path / "out") == before

    FlakyFS.failures = {f"_commits/{s0.shard_id}.json": 99}  # an outage: an error, never "uncommitted"
    started = time.perf_counter()
    with pytest.raises(OSError, match="cannot read commit marker .*connection reset"):
        committed_shards(out, None)
    with pytest.raises(ConnectionError):
        prepare_shard_for_rerun(out, None, s0.shard_id)
    assert time.perf_counter() - started < 10
    FlakyFS.failures = {}
    assert snapshot(tmp_path / "out") == before


# --------------------------------------------------------------------------------------------------
# Replacements: --retry-errors, --relabel-changed
# --------------------------------------------------------------------------------------------------


def test_retry_replacement_relabels_only_the_retryable_rows(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    s = shard(2)
    keys = ["k0", "k1", "k2", "k3", "k4", "k5"]
    write_staging(make_rows(s, keys, errors=("k1",), retryable=("k2", "k4", "k5")), out, None, PROV)
    first = commit_shard(out, None, shard=s, expected_keys=6, provenance=PROV, seq=4)
    assert (first.n_retryable, first.n_errors_by_kind) == (3, {"network": 3, "truncated_image": 1})
    parquet = tmp_path / "out" / first.parquet
    old_rows = {r["key"]: r for r in pq.read_table(parquet).to_pylist()}
    old_fragment = (tmp_path / "out" / first.coco_part).read_text().splitlines()
    pngs_before = snapshot(tmp_path / "out" / "coco" / "panoptic")

    # the retry: k2 is labelled now, k4 fails again (still retryable), k5 is not read (vanished from the source)
    begin_replacement(out, None, s.shard_id, mode="retry", run_id="run-0002")
    assert set(pending_replacements(out, None)) == {s.shard_id}
    write_staging(make_rows(s, ["k2", "k4"], retryable=("k4",), salt="retry"), out, None, PROV)
    write_staging(make_rows(s, ["k2"], salt="retry"), out, None, PROV)  # a retried write task
    with pytest.raises(CommitError, match="were not being retried"):
        commit_shard(out, None, shard=s, expected_keys=2, provenance=PROV, replace="retry", retry_keys=["k4"])
    info = commit_shard(
        out,
        None,
        shard=s,
        expected_keys={"k2", "k4"},
        provenance=PROV,
        replace="retry",
        retry_keys=["k2", "k4", "k5"],
    )
    assert info.seq == 4 and info.replaced == "retry" and pending_replacements(out, None) == {}
    assert (info.n_images, info.n_labelled, info.n_errors, info.n_retryable) == (6, 3, 3, 2)
    rows = pq.read_table(parquet).to_pylist()
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == keys and len(rows) == 6  # still exactly one row per key
    for key in ("k0", "k1", "k3", "k5"):
        assert by_key[key] == old_rows[key], key  # kept as they were, ids included
    assert by_key["k2"]["error"] is None and by_key["k2"]["image_id"] == old_rows["k2"]["image_id"]
    assert by_key["k4"]["retryable"] is True
    # the kept rows come first, in their order; their COCO lines (instance ids included) do not change
    assert [r["key"] for r in rows[:4]] == [k for k in old_rows if k not in ("k2", "k4")]
    fragment = (tmp_path / "out" / info.coco_part).read_text().splitlines()
    assert fragment[: len(old_fragment)] == old_fragment and len(fragment) == len(old_fragment) + 1
    pngs_after = snapshot(tmp_path / "out" / "coco" / "panoptic")
    assert {k: v for k, v in pngs_after.items() if k in pngs_before} == pngs_before
    assert set(pngs_after) - set(pngs_before) == {f"{s.shard_id}/k2.png"}
    marker = json.loads((tmp_path / "out" / "_commits" / f"{s.shard_id}.json").read_text())
    assert (
        marker["n_retryable"] == 2
        and marker["parquet_sha256"] == hashlib.sha256(parquet.read_bytes()).hexdigest()
    )

    # a replacement interrupted before its marker leaves the record; the shard stays committed (old marker)
    begin_replacement(out, None, s.shard_id, mode="retry", run_id="run-0003")
    write_staging(make_rows(s, ["k4"], salt="again"), out, None, PROV)
    write_shard_outputs(
        out, None, shard=s, expected_keys=1, provenance=PROV, replace="retry", retry_keys=["k4"]
    )
    assert set(pending_replacements(out, None)) == {s.shard_id} and s.shard_id in committed_shards(out, None)
    assert clean_uncommitted(out, None) == []  # committed: its staging goes, its outputs stay
    assert pq.read_table(parquet).num_rows == 6
    # finishing it from the base alone (nothing left to relabel) rewrites the marker to match
    done = commit_shard(out, None, shard=s, expected_keys=0, provenance=PROV, replace="retry", retry_keys=[])
    assert done.n_labelled == 4 and done.n_retryable == 1 and pending_replacements(out, None) == {}


def test_relabel_replacement_rebuilds_the_shard_and_drops_stale_pngs(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    s = shard(3)
    write_staging(make_rows(s, ["a", "b", "c"]), out, None, PROV)
    first = commit_shard(out, None, shard=s, expected_keys=3, provenance=PROV, seq=2)
    write_staging(make_rows(s, ["a", "d"], salt="v2"), out, None, PROV)  # the tar changed: b, c gone, d new
    with pytest.raises(CommitError, match="not committed"):
        commit_shard(out, None, shard=shard(4), expected_keys=1, provenance=PROV, replace="relabel")
    info = commit_shard(out, None, shard=s, expected_keys=2, provenance=PROV, replace="relabel")
    assert info.seq == first.seq == 2 and info.replaced == "relabel" and info.n_images == 2
    assert sorted(read_keys(tmp_path / "out" / info.parquet)) == ["a", "d"]
    assert sorted(p.name for p in (tmp_path / "out" / "coco" / "panoptic" / s.shard_id).iterdir()) == [
        "a.png",
        "d.png",
    ]
    assert info.parquet_sha256 != first.parquet_sha256


# --------------------------------------------------------------------------------------------------
# Small markers: member lists apart, sources, summaries from markers alone
# --------------------------------------------------------------------------------------------------


def test_member_lists_live_outside_the_markers_and_load_only_for_grown_folders(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    folder = "file:///data/photos"
    members = tuple(f"{folder}/{n}.jpg" for n in ("a", "b", "c"))
    ref = ShardRef(url=f"{folder}#images-000000", shard_id="photos-images-000000-1234abcd", kind="images",
                   members=members, root=folder)  # fmt: skip
    rows = make_rows(ref, ["a.jpg", "b.jpg", "c.jpg"])
    write_staging(rows, out, None, PROV)
    info = commit_shard(out, None, shard=ref, expected_keys=3, provenance=PROV)
    marker = committed_shards(out, None)[ref.shard_id]
    assert "members" not in marker and marker["members_file"] == f"_members/{ref.shard_id}.json"
    assert (marker["kind"], marker["root"], marker["n_members"]) == (
        "images",
        folder,
        3,
    ) and info.n_members == 3
    assert load_members(out, None, marker) == list(members)
    # the COCO name of an image-folder image: its path relative to the folder; the PNG replaces the extension
    line = json.loads((tmp_path / "out" / info.coco_part).read_text().splitlines()[0])
    assert line["image"]["file_name"] == "a.jpg" and line["image"]["coco_url"] == f"{folder}/a.jpg"
    assert line["panoptic"]["file_name"] == f"{ref.shard_id}/a.png"

    loads: list[str] = []

    def loader(m):
        loads.append(m["shard_id"])
        return load_members(out, None, m)

    done = committed_shards(out, None)
    same = [ref]  # nothing new: the listing gives the committed shard itself; no member list is read
    assert exclude_labelled_images(same, done, 1000, load_members=loader) == same and loads == []
    other = ShardRef(url="file:///data/other#images-000000", shard_id="other-images-000000-00000000", kind="images",
                     members=("file:///data/other/x.jpg",), root="file:///data/other")  # fmt: skip
    grown = ShardRef(url=f"{folder}#images-000000", shard_id="photos-images-000000-99999999", kind="images",
                     members=(*members, f"{folder}/d.jpg"), root=folder)  # fmt: skip
    todo = exclude_labelled_images([grown, other], done, 1000, load_members=loader)
    assert loads == [ref.shard_id]  # loaded once, for the folder that grew only
    assert sorted(s.members for s in todo) == sorted([(f"{folder}/d.jpg",), other.members])


def test_source_stamps_detect_changed_shards(
    tmp_path: Path, s3_bucket: str, s3_storage_options: dict
) -> None:
    import os

    import s3fs

    tar = tmp_path / "in" / "shard-000000.tar"
    tar.parent.mkdir()
    tar.write_bytes(b"x" * 100)
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in ("a", "b"):
        (photos / f"{n}.jpg").write_bytes(b"jpeg" + n.encode())
    t = ShardRef(url=f"file://{tar}", shard_id="shard-000000-1")
    im = ShardRef(url=f"file://{photos}#images-000000", shard_id="photos-1", kind="images",
                  members=(f"file://{photos}/a.jpg", f"file://{photos}/b.jpg"), root=f"file://{photos}")  # fmt: skip
    gone = ShardRef(url=f"file://{tmp_path}/in/missing.tar", shard_id="missing-1")
    stamps = source_stamps([t, im, gone], None)
    assert stamps[t.shard_id]["size"] == 100 and "mtime" in stamps[t.shard_id]
    assert stamps[im.shard_id]["n"] == 2 and len(stamps[im.shard_id]["digest"]) == 40
    assert stamps[gone.shard_id] is None
    markers = {sid: {"source": stamp} for sid, stamp in stamps.items()}
    assert not any(
        source_changed(markers[sid], source_stamps([r], None)[sid])
        for sid, r in [(t.shard_id, t), (im.shard_id, im)]
    )
    tar.write_bytes(b"y" * 120)  # the tar was replaced
    (photos / "b.jpg").write_bytes(b"another jpeg")  # an image was edited
    os.utime(photos / "b.jpg", (1, 1))
    again = source_stamps([t, im], None)
    assert source_changed(markers[t.shard_id], again[t.shard_id])
    assert source_changed(markers[im.shard_id], again[im.shard_id])
    assert not source_changed({"source": None}, again[t.shard_id])  # unknown: not reported

    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.pipe(f"{s3_bucket}/in/s.tar", b"v1")
    ref = ShardRef(url=f"s3://{s3_bucket}/in/s.tar", shard_id="s-1")
    s3_stamp = source_stamps([ref], s3_storage_options)["s-1"]
    assert s3_stamp["size"] == 2 and s3_stamp["etag"]
    fs.pipe(f"{s3_bucket}/in/s.tar", b"v2")
    assert source_changed({"source": s3_stamp}, source_stamps([ref], s3_storage_options)["s-1"])


def test_summary_sums_markers_without_opening_parquet(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    write_staging(make_rows(shard(0), ["a", "b", "c"], errors=("b",), retryable=("c",)), out, None, PROV)
    commit_shard(out, None, shard=shard(0), expected_keys=3, provenance=PROV)
    write_staging(make_rows(shard(1), ["d"], retryable=("d",)), out, None, PROV)
    commit_shard(out, None, shard=shard(1), expected_keys=1, provenance=PROV)
    for p in (tmp_path / "out" / "parquet").iterdir():
        p.write_bytes(b"not parquet any more")  # the summary must not need them
    summary = write_run_summary(out, None, shards=[shard(0), shard(1), shard(2)])
    assert (summary["n_images"], summary["n_errors"], summary["n_retryable"]) == (4, 3, 2)
    assert summary["errors_by_kind"] == {"network": 2, "truncated_image": 1}
    assert summary["errors_by_reason"] == {"connection reset by peer": 2, "truncated image": 1}
    assert summary["pending_shards"] == [shard(2).shard_id]


def test_streaming_commit_on_s3_fetches_each_staging_file_at_most_twice(
    s3_bucket: str, s3_storage_options: dict, tmp_path: Path, monkeypatch
) -> None:
    """On object stores the pass-1 columns come from the bytes fetched once; past the prefetch budget the bytes are
    fetched again in pass 2. Both ways give the same committed rows as a local commit."""
    import pipeline.annotate.commit as commit_module

    so = s3_storage_options
    keys = [f"k{i}" for i in range(12)]
    batches = [
        make_rows(shard(0), keys[i : i + 3], errors=("k4",) if i == 3 else ()) for i in range(0, 12, 3)
    ]
    batches.append(make_rows(shard(0), ["k4", "k5"]))  # a retried task: k4 labelled this time
    import s3fs

    fs = s3fs.S3FileSystem(**so)
    committed = []
    for budget, out in (
        (64 * 2**20, f"s3://{s3_bucket}/a"),
        (1, f"s3://{s3_bucket}/b"),
        (None, str(tmp_path / "c")),
    ):
        options = so if budget else None
        if budget is not None:
            monkeypatch.setattr(commit_module, "_PREFETCH_BYTES", budget)
        for rows in batches:
            write_staging(rows, out, options, PROV)
        info = commit_shard(out, options, shard=shard(0), expected_keys=12, provenance=PROV, seq=2)
        path = f"{out.removeprefix('s3://')}/{info.parquet}"
        table = pq.read_table(path, filesystem=fs) if budget else pq.read_table(path)
        committed.append({r["key"]: r for r in table.to_pylist()})
        assert (
            info.n_labelled == 12 and info.n_duplicates_dropped == 2
        )  # k4's error row lost to a labelled one
    assert committed[0] == committed[1] == committed[2]
