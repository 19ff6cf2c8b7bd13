"""Tests of pipeline/scoring.py: hand-made COCO panoptic ground truth, predictions written in our Parquet
output format through the real writers, numbers worked out by hand; one end-to-end run of the tiny model.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from odise_model.types import Instance, PanopticResult, Segment, bbox_from_mask
from pipeline.annotate.commit import commit_shard, write_provenance, write_staging
from pipeline.encode import encode_result
from pipeline.evaluate.run import (
    CategoryMismatchError,
    EvaluateConfig,
    gt_pairing_name,
    prediction_pairing_name,
    run_evaluation,
)
from pipeline.groundtruth import convert_coco_panoptic_to_shards, id2rgb, sample_key
from pipeline.schema import RunProvenance, error_row, label_row

PERSON, CAR, DOG, SKY, GRASS = 1, 2, 3, 4, 5
CATEGORIES = [
    {"id": PERSON, "name": "person", "isthing": 1},
    {"id": CAR, "name": "car", "isthing": 1},
    {"id": DOG, "name": "dog", "isthing": 1},
    {"id": SKY, "name": "sky", "isthing": 0},
    {"id": GRASS, "name": "grass", "isthing": 0},
]
CAT = {c["id"]: c for c in CATEGORIES}


def _blank():
    return np.zeros((8, 8), np.int64)


# --------------------------------------------------------------------------------------------------
# Ground truth: four 8x8 images (ids 1-4)
#   A: sky rows 0-3 (32 px), car rows 4-7 x cols 0-3 (16), person rows 4-7 x cols 4-7 (16)
#   B: VOID rows 0-1 (16), grass rows 2-7 x cols 0-5 (36), a *crowd* person rows 2-7 x cols 6-7 (12)
#   C: sky rows 0-3 (32), dog rows 4-7 (32)
#   D: grass everywhere (64)
# --------------------------------------------------------------------------------------------------
def gt_images():
    a = _blank()
    a[:4] = 10
    a[4:, :4] = 20
    a[4:, 4:] = 0x123456  # a 24-bit id
    b = _blank()
    b[2:, :6] = 7
    b[2:, 6:] = 8
    c = _blank()
    c[:4] = 1
    c[4:] = 2
    d = np.full((8, 8), 5, np.int64)
    return [
        (1, "000000000001.jpg", a, {10: (SKY, 0), 20: (CAR, 0), 0x123456: (PERSON, 0)}),
        (2, "000000000002.jpg", b, {7: (GRASS, 0), 8: (PERSON, 1)}),
        (3, "000000000003.jpg", c, {1: (SKY, 0), 2: (DOG, 0)}),
        (4, "000000000004.jpg", d, {5: (GRASS, 0)}),
    ]


def write_coco_gt(root, images=None, *, with_images=False):
    """COCO panoptic JSON + PNG folder (+ image folder); returns (json_path, png_dir, image_dir)."""
    png_dir, image_dir = root / "panoptic", root / "images"
    png_dir.mkdir(parents=True)
    image_dir.mkdir()
    imgs, anns = [], []
    for image_id, file_name, id_map, segs in images or gt_images():
        h, w = id_map.shape
        Image.fromarray(id2rgb(id_map)).save(png_dir / f"{image_id}.png")
        if with_images:
            Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(image_dir / file_name)
        imgs.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        info = [
            {
                "id": sid,
                "category_id": cat,
                "area": int((id_map == sid).sum()),
                "bbox": [0, 0, 1, 1],
                "iscrowd": crowd,
            }
            for sid, (cat, crowd) in segs.items()
        ]
        anns.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": info})
    path = root / "panoptic.json"
    path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": CATEGORIES}))
    return path, png_dir, image_dir


# --------------------------------------------------------------------------------------------------
# Predictions in our output format (encode_result -> label_row -> write_staging -> commit_shard)
# --------------------------------------------------------------------------------------------------
def result_of(id_map, segs, *, scores=None, with_instances=True):
    """A PanopticResult: ``segs`` = {segment id: category id}; semantic = the segments' categories."""
    id_map = np.asarray(id_map, np.int32)
    segments, instances = [], []
    semantic = np.zeros_like(id_map)
    for sid, cat in segs.items():
        mask = id_map == sid
        semantic[mask] = cat
        score = (scores or {}).get(sid, 0.9)
        segments.append(
            Segment(
                sid,
                cat,
                CAT[cat]["name"],
                bool(CAT[cat]["isthing"]),
                score,
                int(mask.sum()),
                bbox_from_mask(mask),
            )
        )
        if with_instances and CAT[cat]["isthing"]:
            instances.append(Instance(cat, CAT[cat]["name"], score, mask, bbox_from_mask(mask)))
    return PanopticResult(panoptic_seg=id_map, segments=segments, semantic_seg=semantic, instances=instances)


def write_run(out, items, *, categories=CATEGORIES, include_png=True, shard_id="shard-a"):
    """Write one committed shard. ``items``: (key, PanopticResult) or (key, "error message")."""
    provenance = RunProvenance(run_id="run-1", model_variant="hand", categories=categories)
    write_provenance(str(out), None, provenance)
    common = {"run_id": "run-1", "shard": f"file:///in/{shard_id}.tar", "shard_id": shard_id}
    rows = []
    for key, item in items:
        if isinstance(item, str):
            rows.append(error_row(**common, key=key, error=item))
        else:
            rows.append(label_row(**common, key=key, encoded=encode_result(item, include_png=include_png)))
    write_staging(rows, str(out), None, provenance)
    commit_shard(
        str(out),
        None,
        shard={"url": common["shard"], "shard_id": shard_id},
        expected_keys=len(rows),
        provenance=provenance,
        categories=categories,
        write_coco=False,
    )
    return out


def perfect_items(key=lambda image_id, file_name: file_name):
    items = []
    for image_id, file_name, id_map, segs in gt_images():
        ids = np.zeros((8, 8), np.int32)
        pred_segs = {}
        for n, (sid, (cat, _crowd)) in enumerate(segs.items(), start=1):
            ids[id_map == sid] = n
            pred_segs[n] = cat
        items.append((key(image_id, file_name), result_of(ids, pred_segs)))
    return items


def partial_items():
    """A', B', D' of the hand-computed case; C has no prediction row."""
    a = np.zeros((8, 8), np.int32)
    a[:4] = 1  # sky exact                                   IoU 1
    a[4:, :3] = 2  # car: 12 px inside the 16 px GT car       IoU 12/16 = 0.75
    a[4:, 3:] = 3  # person: 20 px covering the 16 px person  IoU 16/20 = 0.8
    b = np.zeros((8, 8), np.int32)
    b[:2, :4] = 1  # dog entirely on VOID: not a false positive
    b[:2, 4:] = 2  # grass: 8 px on VOID + the 36 px GT grass: IoU 36/(44+36-36-8) = 1
    b[2:, :6] = 2
    b[2:, 6:] = 3  # person on the crowd person region: ignored (not FP)
    d = np.zeros((8, 8), np.int32)
    d[:4] = 1  # dog on grass: FP
    d[4:] = 2  # grass: 32 of 64 px, IoU exactly 0.5: not a match -> FP + FN
    return [
        ("000000000001.jpg", result_of(a, {1: SKY, 2: CAR, 3: PERSON})),
        ("000000000002.jpg", result_of(b, {1: DOG, 2: GRASS, 3: PERSON})),
        ("000000000004.jpg", result_of(d, {1: DOG, 2: GRASS})),
    ]


def evaluate(json_path, png_dir, out, **kw):
    return run_evaluation(
        EvaluateConfig(ground_truth=str(json_path), ground_truth_png=str(png_dir), predictions=str(out), **kw)
    )


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------
def test_perfect_predictions_score_one_and_json(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    out = write_run(tmp_path / "run", perfect_items())
    report = tmp_path / "reports" / "pq.json"
    res = evaluate(json_path, png_dir, out, json=str(report), storage_options={"secret": "do-not-leak"})
    assert res.num_images == 4
    assert (res.overall.pq, res.overall.sq, res.overall.rq, res.overall.n) == (1.0, 1.0, 1.0, 5)
    assert (res.things.pq, res.things.n, res.stuff.pq, res.stuff.n) == (1.0, 3, 1.0, 2)
    assert res.per_class[PERSON].tp == 1  # the crowd person is neither TP nor FN; its prediction is ignored
    assert res.semantic.miou == 1.0 and res.semantic.pixel_accuracy == 1.0
    assert res.instance.ap == pytest.approx(1.0)
    d = res.details
    assert (
        d["paired"] == 4
        and d["missing_predictions"]["count"] == 0
        and d["unmatched_predictions"]["count"] == 0
    )
    assert d["prediction_sources"] == {
        "panoptic_png": 4,
        "rle": 0,
        "semantic_png": 4,
        "semantic_from_panoptic": 0,
    }
    assert d["predictions"]["run_id"] == "run-1" and d["match"] == "file_name"
    text = report.read_text()
    assert "do-not-leak" not in text
    written = json.loads(text)
    assert written["panoptic"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 5}
    assert written["panoptic"]["per_class"][str(CAR)]["tp"] == 1
    assert written["semantic"]["mIoU"] == 1.0 and written["instance"]["AP"] == pytest.approx(1.0)
    assert written["details"]["ground_truth"]["num_images"] == 4
    assert "All" in res.format_table()


def test_hand_computed_partial_case(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    out = write_run(tmp_path / "run", partial_items())
    res = evaluate(json_path, png_dir, out)
    pc = res.per_class
    # sky: TP (A, IoU 1) + FN (C, no prediction) -> PQ 1/1.5
    assert (pc[SKY].tp, pc[SKY].fp, pc[SKY].fn) == (1, 0, 1)
    assert pc[SKY].pq == pytest.approx(2 / 3) and pc[SKY].sq == 1.0 and pc[SKY].rq == pytest.approx(2 / 3)
    assert (pc[CAR].tp, pc[CAR].fp, pc[CAR].fn, pc[CAR].pq) == (1, 0, 0, 0.75)
    assert (pc[PERSON].tp, pc[PERSON].fp, pc[PERSON].fn, pc[PERSON].pq) == (1, 0, 0, 0.8)
    # grass: TP (B, IoU 1), FP + FN (D, IoU exactly 0.5) -> PQ 1/2
    assert (pc[GRASS].tp, pc[GRASS].fp, pc[GRASS].fn, pc[GRASS].pq, pc[GRASS].sq) == (1, 1, 1, 0.5, 1.0)
    # dog: FN (C) + FP (D); the dog on B's VOID is not an FP
    assert (pc[DOG].tp, pc[DOG].fp, pc[DOG].fn, pc[DOG].pq) == (0, 1, 1, 0.0)
    assert res.overall.pq == pytest.approx((2 / 3 + 0.75 + 0.8 + 0.5 + 0.0) / 5, abs=1e-12)
    assert res.overall.n == 5
    assert res.things.pq == pytest.approx((0.75 + 0.8 + 0.0) / 3, abs=1e-12)
    assert res.stuff.pq == pytest.approx((2 / 3 + 0.5) / 2, abs=1e-12)
    assert res.overall.sq == pytest.approx((1 + 0.75 + 0.8 + 1 + 0) / 5, abs=1e-12)
    # semantic (crowd pixels count as person GT, VOID is ignored, C's pixels are misses):
    # sky 32/64, car 12/16, person 28/32, dog 0/64, grass 68/100; pixel accuracy 140/240
    assert res.semantic.per_class_iou == pytest.approx(
        {PERSON: 0.875, CAR: 0.75, DOG: 0.0, SKY: 0.5, GRASS: 0.68}
    )
    assert res.semantic.miou == pytest.approx((0.5 + 0.75 + 0.875 + 0 + 0.68) / 5, abs=1e-12)
    assert res.semantic.pixel_accuracy == pytest.approx(140 / 240, abs=1e-12)
    assert res.num_images == 4
    assert res.details["missing_predictions"] == {"count": 1, "examples": ["000000000003"]}
    assert any("no prediction row" in w for w in res.details["warnings"])


def test_without_stored_pngs_the_map_is_rebuilt_from_rles(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    with_png = evaluate(json_path, png_dir, write_run(tmp_path / "a", partial_items()))
    without = evaluate(json_path, png_dir, write_run(tmp_path / "b", partial_items(), include_png=False))
    assert without.details["prediction_sources"] == {
        "panoptic_png": 0,
        "rle": 3,
        "semantic_png": 0,
        "semantic_from_panoptic": 3,
    }
    assert without.per_class == with_png.per_class
    assert without.overall == with_png.overall
    # semantic from the panoptic output equals the stored semantic map here (no unlabeled pixels)
    assert without.semantic.miou == pytest.approx(with_png.semantic.miou)


def test_options_turn_metrics_off(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    out = write_run(tmp_path / "run", perfect_items())
    res = evaluate(json_path, png_dir, out, semantic=False, instance_ap=False)
    assert res.semantic is None and res.instance is None and res.overall.pq == 1.0


def test_error_rows_are_empty_predictions_and_extra_rows_are_reported(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    items = perfect_items()
    items[0] = (items[0][0], "corrupt image (OSError: broken data stream)")  # image A could not be labelled
    items.append(("not-in-gt.jpg", result_of(np.ones((8, 8), np.int32), {1: SKY})))
    res = evaluate(json_path, png_dir, write_run(tmp_path / "run", items))
    assert res.num_images == 4
    assert res.details["error_rows"]["count"] == 1
    assert res.details["error_rows"]["examples"][0]["row"] == "shard-a/000000000001.jpg"
    assert res.details["unmatched_predictions"] == {"count": 1, "examples": ["shard-a/not-in-gt.jpg"]}
    pc = res.per_class
    # A's sky, car and person are false negatives now (sky is still matched in C)
    assert (pc[CAR].tp, pc[CAR].fn) == (0, 1) and (pc[SKY].tp, pc[SKY].fn) == (1, 1)
    assert pc[PERSON].fn == 1 and pc[PERSON].tp == 0


# --------------------------------------------------------------------------------------------------
# Pairing
# --------------------------------------------------------------------------------------------------
def test_pairing_names():
    from pipeline.groundtruth import EncodedPanopticRecord

    rec = EncodedPanopticRecord(image_id=139, file_name="000000000139.jpg", segments=[], where="x")
    assert gt_pairing_name(rec, "file_name") == "000000000139"
    assert gt_pairing_name(rec, "image_id") == "139"
    assert gt_pairing_name(rec, "key") == "139"
    for key in ("000000000139.jpg", "000000000139", "000000000139.JPEG"):
        assert prediction_pairing_name(key, "file_name") == "000000000139"
        assert prediction_pairing_name(key, "image_id") == "139"
    assert prediction_pairing_name("val2017/000000000139.jpg", "file_name") == "val2017/000000000139"
    assert prediction_pairing_name("sub/city.0001.jpg", "file_name") == "sub/city.0001"
    assert prediction_pairing_name("city.0001", "file_name") == "city.0001"  # not an image extension
    assert prediction_pairing_name("139", "key") == "139"


def test_match_modes_and_base_name_fallback(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    # keys as an annotate run over a parent folder makes them: base-name fallback of match="file_name"
    out = write_run(tmp_path / "sub", perfect_items(lambda i, f: f"val2017/{f}"))
    assert evaluate(json_path, png_dir, out).details["paired"] == 4
    # keys as the converter's shards have them (sample_key(image_id)): match="image_id" or "key"
    out = write_run(tmp_path / "keys", perfect_items(lambda i, f: sample_key(i)))
    for match in ("image_id", "key"):
        res = evaluate(json_path, png_dir, out, match=match)
        assert res.details["paired"] == 4 and res.overall.pq == 1.0
    with pytest.raises(ValueError, match=r"no prediction row .* pairs .*match='file_name'.*Try match="):
        evaluate(json_path, png_dir, out)


def test_labeled_shards_as_ground_truth(tmp_path):
    json_path, png_dir, image_dir = write_coco_gt(tmp_path / "gt", with_images=True)
    shards = tmp_path / "shards"
    convert_coco_panoptic_to_shards(
        str(json_path), str(png_dir), str(image_dir), str(shards), samples_per_shard=3
    )
    out = write_run(tmp_path / "run", partial_items())
    res = run_evaluation(EvaluateConfig(ground_truth_shards=str(shards), predictions=str(out)))
    ref = evaluate(json_path, png_dir, out)
    assert res.per_class == ref.per_class and res.num_images == 4
    assert res.details["ground_truth"]["kind"] == "labeled_shards"
    # a list of shard URLs works too
    urls = sorted(str(p) for p in shards.glob("*.tar"))
    res = run_evaluation(EvaluateConfig(ground_truth_shards=urls, predictions=str(out), instance_ap=False))
    assert res.overall == ref.overall


def test_duplicate_rows_for_one_image_are_an_error(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    out = tmp_path / "run"
    write_run(out, perfect_items(), shard_id="shard-a")
    write_run(out, perfect_items()[:1], shard_id="shard-b")
    with pytest.raises(
        ValueError, match=r"shard-a/000000000001.jpg and shard-b/000000000001.jpg .*both pair"
    ):
        evaluate(json_path, png_dir, out)


def test_everything_on_s3(tmp_path, s3_bucket, s3_storage_options):
    import fsspec

    write_coco_gt(tmp_path / "gt", with_images=True)
    write_run(tmp_path / "run", partial_items())
    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.put(str(tmp_path / "gt"), f"s3://{s3_bucket}/gt", recursive=True)
    fs.put(str(tmp_path / "run"), f"s3://{s3_bucket}/run", recursive=True)
    convert_coco_panoptic_to_shards(
        f"s3://{s3_bucket}/gt/panoptic.json",
        f"s3://{s3_bucket}/gt/panoptic",
        f"s3://{s3_bucket}/gt/images",
        f"s3://{s3_bucket}/shards",
        storage_options=s3_storage_options,
    )
    local = evaluate(tmp_path / "gt" / "panoptic.json", tmp_path / "gt" / "panoptic", tmp_path / "run")
    res = run_evaluation(
        EvaluateConfig(
            ground_truth=f"s3://{s3_bucket}/gt/panoptic.json",  # PNG folder derived: .../gt/panoptic
            predictions=f"s3://{s3_bucket}/run",
            json=f"s3://{s3_bucket}/reports/pq.json",
            storage_options=s3_storage_options,
        )
    )
    assert res.per_class == local.per_class and res.num_images == 4
    written = json.loads(fs.cat_file(f"{s3_bucket}/reports/pq.json"))
    assert written["panoptic"]["All"]["pq"] == pytest.approx(local.overall.pq)
    assert "testing" not in json.dumps(written)  # no credentials in the report
    res = run_evaluation(
        EvaluateConfig(
            ground_truth_shards=f"s3://{s3_bucket}/shards",
            predictions=f"s3://{s3_bucket}/run",
            storage_options=s3_storage_options,
            instance_ap=False,
        )
    )
    assert res.per_class == local.per_class
    with pytest.raises(FileNotFoundError, match="prediction folder .*nothing-here does not exist"):
        run_evaluation(
            EvaluateConfig(
                ground_truth=f"s3://{s3_bucket}/gt/panoptic.json",
                predictions=f"s3://{s3_bucket}/nothing-here",
                storage_options=s3_storage_options,
            )
        )


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_config_validation():
    with pytest.raises(ValueError, match="exactly one of"):
        EvaluateConfig(predictions="x")
    with pytest.raises(ValueError, match="exactly one of"):
        EvaluateConfig(ground_truth="a.json", ground_truth_shards="s", predictions="x")
    with pytest.raises(ValueError, match="goes with ground_truth"):
        EvaluateConfig(ground_truth_shards="s", ground_truth_png="p", predictions="x")
    with pytest.raises(ValueError, match="extra"):
        EvaluateConfig(ground_truth="a.json", predictions="x", bogus=1)
    cfg = EvaluateConfig(ground_truth="/d/panoptic_val2017.json", predictions="x", json="r.json")
    assert cfg.png_dir == "/d/panoptic_val2017" and cfg.json_output == "r.json"


def test_missing_inputs_are_named(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    with pytest.raises(FileNotFoundError, match="prediction folder .*nope does not exist"):
        evaluate(json_path, png_dir, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no parquet/ folder"):
        evaluate(json_path, png_dir, tmp_path / "empty")
    out = write_run(tmp_path / "run", perfect_items())
    with pytest.raises(FileNotFoundError, match="ground-truth JSON .*missing.json not found"):
        evaluate(tmp_path / "missing.json", png_dir, out)
    (png_dir / "3.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"image_id 3.*3\.png not found"):
        evaluate(json_path, png_dir, out)


def test_unreadable_files_are_named(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    out = write_run(tmp_path / "run", perfect_items())
    bad = out / "parquet" / "zz-broken.parquet"
    bad.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="unreadable predictions file .*zz-broken.parquet"):
        evaluate(json_path, png_dir, out)
    bad.unlink()
    (png_dir / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"2\.png: unreadable panoptic PNG"):
        evaluate(json_path, png_dir, out)


def test_category_mismatch_is_reported_with_ids(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    other = [*CATEGORIES[:4], {"id": 99, "name": "unicorn", "isthing": 1}]
    out = write_run(tmp_path / "run", perfect_items()[:1], categories=other)
    with pytest.raises(
        CategoryMismatchError,
        match=r"not in the prediction vocabulary: 5 \(grass\).*"
        r"not in the ground truth: 99 \(unicorn\)",
    ):
        evaluate(json_path, png_dir, out)
    # isthing disagreements are warnings
    flipped = [{**c, "isthing": 1 - c["isthing"]} if c["id"] == DOG else c for c in CATEGORIES]
    out = write_run(tmp_path / "flipped", perfect_items(), categories=flipped)
    res = evaluate(json_path, png_dir, out)
    assert any("category 3" in w and "isthing" in w for w in res.details["warnings"])


def test_size_mismatch_is_an_error(tmp_path):
    json_path, png_dir, _ = write_coco_gt(tmp_path / "gt")
    items = perfect_items()
    items[1] = (items[1][0], result_of(np.ones((8, 9), np.int32), {1: GRASS}))
    out = write_run(tmp_path / "run", items)
    with pytest.raises(ValueError, match=r"000000000002.jpg .*prediction is 8x9 .*ground truth is 8x8"):
        evaluate(json_path, png_dir, out)


# --------------------------------------------------------------------------------------------------
# End to end: the tiny model through run_annotation, then scoring its output
# --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_end_to_end_tiny_model(tmp_path, photos, ray_local):
    import odise_model
    import pipeline

    vocab = odise_model.load_vocabulary("coco_panoptic").coco_categories()
    cats = [{k: c[k] for k in ("id", "name", "isthing")} for c in vocab]
    images = []
    for image_id, (name, photo) in enumerate(sorted(photos.items())[:3], start=1):
        small = np.asarray(Image.fromarray(photo).resize((96, 72)))
        id_map = np.zeros((72, 96), np.int64)
        id_map[:36] = 11  # "sky" (stuff, id 187 in the coco_panoptic vocabulary)
        id_map[36:, :48] = 12  # a person
        id_map[36:, 48:] = 13  # "grass" (stuff, id 193)
        images.append((image_id, f"{name}.jpg", id_map, {11: (187, 0), 12: (1, 0), 13: (193, 0)}, small))
    root = tmp_path / "gt"
    png_dir, image_dir = root / "panoptic", root / "images"
    png_dir.mkdir(parents=True)
    image_dir.mkdir()
    imgs, anns = [], []
    for image_id, file_name, id_map, segs, photo in images:
        Image.fromarray(id2rgb(id_map)).save(png_dir / f"{image_id}.png")
        Image.fromarray(photo).save(image_dir / file_name, quality=90)
        imgs.append({"id": image_id, "file_name": file_name, "height": 72, "width": 96})
        info = [{"id": s, "category_id": c, "iscrowd": k} for s, (c, k) in segs.items()]
        anns.append({"image_id": image_id, "file_name": f"{image_id}.png", "segments_info": info})
    json_path = root / "panoptic.json"
    json_path.write_text(json.dumps({"images": imgs, "annotations": anns, "categories": cats}))
    shards = tmp_path / "shards"
    convert_coco_panoptic_to_shards(str(json_path), str(png_dir), str(image_dir), str(shards))

    out = tmp_path / "out"
    summary = pipeline.run_annotation(
        pipeline.AnnotateConfig(
            input=str(shards),
            output=str(out),
            vocab_file="coco_panoptic",
            model="tiny",
            num_cpus=2,
            overlays=0,
            batch_size=2,
            no_progress_timeout_s=240,
        )
    )
    assert summary.labelled == 3
    report = tmp_path / "report.json"
    res = run_evaluation(
        EvaluateConfig(ground_truth_shards=str(shards), predictions=str(out), match="key", json=str(report))
    )
    assert res.num_images == 3 and res.details["paired"] == 3
    assert res.details["predictions"]["plumbing_check"] is True
    for value in (
        res.overall.pq,
        res.overall.sq,
        res.overall.rq,
        res.semantic.miou,
        res.semantic.pixel_accuracy,
    ):
        assert np.isfinite(value) and 0.0 <= value <= 1.0
    assert json.loads(report.read_text())["num_images"] == 3
    # the same run against the COCO JSON: the shard keys are the image ids
    res2 = run_evaluation(
        EvaluateConfig(
            ground_truth=str(json_path), ground_truth_png=str(png_dir), predictions=str(out), match="image_id"
        )
    )
    assert res2.overall == res.overall and res2.num_images == 3
