"""Tests of pipeline/evaluation.py: hand-worked PQ / semantic / AP examples and a reference cross-check.

Every expected number is worked out by hand in the comment next to it. Id maps are drawn as arrays;
``P`` / ``C`` / ``S`` ... are segment ids, categories are those of ``CATS`` below.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.evaluate.metrics import (
    PanopticEvaluator,
    PQStat,
    SemanticEvaluator,
    evaluate_instance_ap,
    instances_from_panoptic,
    mask_to_rle,
    panoptic_to_semantic,
    pq_compute_single_image,
)

PERSON, CAR, SKY, GRASS, DOG = 1, 2, 3, 4, 5
CATS = {
    PERSON: {"id": PERSON, "name": "person", "isthing": 1},
    CAR: {"id": CAR, "name": "car", "isthing": 1},
    SKY: {"id": SKY, "name": "sky", "isthing": 0},
    GRASS: {"id": GRASS, "name": "grass", "isthing": 0},  # never present: excluded from averages
    DOG: {"id": DOG, "name": "dog", "isthing": True},  # bool isthing works like 1
}


def seg(seg_id: int, cat: int, iscrowd: int = 0) -> dict:
    return {"id": seg_id, "category_id": cat, "iscrowd": iscrowd}


def evaluate(pairs, categories=CATS):
    """Run the streaming evaluator over ``[(gt_map, gt_segs, pred_map, pred_segs), ...]``."""
    ev = PanopticEvaluator(categories, semantic=False)
    for gt, gs, pred, ps in pairs:
        ev.add(np.array(gt), gs, np.array(pred), ps)
    return ev.result()


# --------------------------------------------------------------------------------------------------
# Panoptic quality, hand-worked
# --------------------------------------------------------------------------------------------------

GT_BASIC = [
    [1, 1, 1, 2, 2, 2],
    [1, 1, 1, 2, 2, 2],
    [3, 3, 3, 3, 3, 3],
    [3, 3, 3, 3, 3, 3],
]
GT_BASIC_SEGS = [seg(1, PERSON), seg(2, CAR), seg(3, SKY)]


def test_perfect_prediction():
    # Same partition with other ids: every segment is a TP with IoU 1 -> PQ = SQ = RQ = 1.
    # Counted: person, car (things, n=2), sky (stuff, n=1); grass and dog are absent -> not counted.
    pred = np.array(GT_BASIC) + 10
    res = evaluate([(GT_BASIC, GT_BASIC_SEGS, pred, [seg(11, PERSON), seg(12, CAR), seg(13, SKY)])])
    for m, n in ((res.overall, 3), (res.things, 2), (res.stuff, 1)):
        assert (m.pq, m.sq, m.rq, m.n) == (pytest.approx(1.0), pytest.approx(1.0), pytest.approx(1.0), n)
    assert not res.per_class[GRASS].counted and not res.per_class[DOG].counted
    assert (res.per_class[DOG].pq, res.per_class[DOG].tp) == (0.0, 0)
    assert res.per_class[CAR].tp == 1 and res.per_class[CAR].fp == 0 and res.per_class[CAR].fn == 0


def test_empty_prediction():
    # Nothing predicted: person, car, sky are one FN each -> PQ = SQ = RQ = 0 over n = 3.
    res = evaluate([(GT_BASIC, GT_BASIC_SEGS, np.zeros((4, 6), int), [])])
    assert (res.overall.pq, res.overall.sq, res.overall.rq, res.overall.n) == (0.0, 0.0, 0.0, 3)
    assert [res.per_class[c].fn for c in (PERSON, CAR, SKY)] == [1, 1, 1]


def _block(shape, top, left, size, value, fill):
    a = np.full(shape, fill, dtype=np.int64)
    a[top : top + size, left : left + size] = value
    return a


def test_shifted_segment_iou_just_above_half():
    # 10x10. GT: person 6x6 block at (0,0); sky elsewhere (64 px).
    # Pred: person 6x6 block at (1,1); sky elsewhere (64 px).
    # person: intersection 5x5 = 25, union 36 + 36 - 25 = 47 -> IoU 25/47 = 0.532 > 0.5 -> TP.
    # sky: both miss the union of the two blocks (47 px) -> intersection 100 - 47 = 53,
    #      union 64 + 64 - 53 = 75 -> IoU 53/75 -> TP.
    gt = _block((10, 10), 0, 0, 6, 1, 2)
    pred = _block((10, 10), 1, 1, 6, 1, 2)
    res = evaluate([(gt, [seg(1, PERSON), seg(2, SKY)], pred, [seg(1, PERSON), seg(2, SKY)])])
    assert res.per_class[PERSON].pq == pytest.approx(25 / 47)
    assert res.per_class[PERSON].rq == 1.0
    assert res.things.pq == pytest.approx(25 / 47)
    assert res.stuff.pq == pytest.approx(53 / 75)
    assert res.overall.pq == pytest.approx((25 / 47 + 53 / 75) / 2)
    assert res.overall.sq == pytest.approx((25 / 47 + 53 / 75) / 2)
    assert res.overall.rq == pytest.approx(1.0)


def test_shifted_segment_iou_just_below_half():
    # 10x10. GT person 5x5 block at (0,0), pred person 5x5 block at (1,1):
    # intersection 4x4 = 16, union 25 + 25 - 16 = 34 -> IoU 16/34 = 0.47 -> no match:
    # person FN 1 + FP 1 -> PQ = SQ = RQ = 0.
    # sky: 75 px each, intersection 100 - 34 = 66, union 75 + 75 - 66 = 84 -> IoU 66/84 = 11/14.
    gt = _block((10, 10), 0, 0, 5, 1, 2)
    pred = _block((10, 10), 1, 1, 5, 1, 2)
    res = evaluate([(gt, [seg(1, PERSON), seg(2, SKY)], pred, [seg(1, PERSON), seg(2, SKY)])])
    p = res.per_class[PERSON]
    assert (p.tp, p.fp, p.fn, p.pq, p.sq, p.rq) == (0, 1, 1, 0.0, 0.0, 0.0)
    assert res.stuff.pq == pytest.approx(11 / 14)
    assert res.overall.pq == pytest.approx(11 / 28)  # (0 + 11/14) / 2
    assert res.overall.rq == pytest.approx(0.5)  # (0 + 1) / 2


def test_iou_exactly_half_is_not_a_match():
    # GT person cols 0-2 (12 px), sky cols 3-5; pred person cols 1-3 (12 px), sky cols 4-5.
    # person: intersection 8, union 12 + 12 - 8 = 16 -> IoU 0.5, not > 0.5 -> FN + FP.
    # sky: GT 12 px, pred 8 px, intersection 8, union 12 -> IoU 2/3 -> TP.
    gt = [[1, 1, 1, 2, 2, 2]] * 4
    pred = [[0, 1, 1, 1, 2, 2]] * 4
    res = evaluate([(gt, [seg(1, PERSON), seg(2, SKY)], pred, [seg(1, PERSON), seg(2, SKY)])])
    p = res.per_class[PERSON]
    assert (p.tp, p.fp, p.fn) == (0, 1, 1)
    assert res.per_class[SKY].pq == pytest.approx(2 / 3)
    assert res.overall.pq == pytest.approx(1 / 3)


def test_merged_prediction_covering_two_gt_segments():
    # GT: person A cols 0-2 (12 px), person B col 3 (4 px), sky cols 4-5 (8 px).
    # Pred: one person over cols 0-3 (16 px), sky cols 4-5.
    # A: IoU 12/16 = 0.75 -> TP. B: IoU 4/16 -> FN. The merged prediction is matched (to A), no FP.
    # person: PQ = 0.75 / (1 + 0.5*1) = 0.5, SQ = 0.75, RQ = 1/1.5 = 2/3. sky: 1, 1, 1.
    gt = [[1, 1, 1, 2, 3, 3]] * 4
    pred = [[7, 7, 7, 7, 8, 8]] * 4
    res = evaluate([(gt, [seg(1, PERSON), seg(2, PERSON), seg(3, SKY)], pred, [seg(7, PERSON), seg(8, SKY)])])
    p = res.per_class[PERSON]
    assert (p.tp, p.fp, p.fn) == (1, 0, 1)
    assert (p.pq, p.sq, p.rq) == (pytest.approx(0.5), pytest.approx(0.75), pytest.approx(2 / 3))
    assert res.overall.pq == pytest.approx(0.75)  # (0.5 + 1) / 2
    assert res.overall.sq == pytest.approx(0.875)  # (0.75 + 1) / 2
    assert res.overall.rq == pytest.approx(5 / 6)  # (2/3 + 1) / 2
    assert (res.things.pq, res.stuff.pq) == (pytest.approx(0.5), pytest.approx(1.0))


def test_split_prediction():
    # GT: one car cols 0-3 (16 px), sky cols 4-5. Pred: car 7 cols 0-2 (12 px), car 8 col 3 (4 px), sky.
    # car 7: IoU 12/16 = 0.75 -> TP; car 8: IoU 4/16 -> unmatched, on labeled GT -> FP.
    # car: PQ = 0.75 / (1 + 0.5) = 0.5, SQ = 0.75, RQ = 2/3.
    gt = [[1, 1, 1, 1, 2, 2]] * 4
    pred = [[7, 7, 7, 8, 9, 9]] * 4
    res = evaluate([(gt, [seg(1, CAR), seg(2, SKY)], pred, [seg(7, CAR), seg(8, CAR), seg(9, SKY)])])
    c = res.per_class[CAR]
    assert (c.tp, c.fp, c.fn) == (1, 1, 0)
    assert (c.pq, c.sq, c.rq) == (pytest.approx(0.5), pytest.approx(0.75), pytest.approx(2 / 3))


def test_void_pixels_excluded_from_union_and_prediction_on_void_not_fp():
    # GT: person cols 0-2 (12 px), cols 3-5 VOID.
    # Pred: unlabeled col 0, person cols 1-3 (12 px), car cols 4-5 (8 px, all on VOID).
    # person: intersection 8, |pred ∩ VOID| = 4 -> union 12 + 12 - 8 - 4 = 12 -> IoU 2/3 -> TP
    #         (without the VOID rule the IoU would be 8/16 = 0.5, no match).
    # car: unmatched, 8/8 on VOID > 0.5 -> ignored: car has TP+FP+FN = 0 -> not counted.
    gt = [[1, 1, 1, 0, 0, 0]] * 4
    pred = [[0, 5, 5, 5, 6, 6]] * 4
    res = evaluate([(gt, [seg(1, PERSON)], pred, [seg(5, PERSON), seg(6, CAR)])])
    assert res.per_class[PERSON].pq == pytest.approx(2 / 3)
    assert not res.per_class[CAR].counted
    assert (res.overall.pq, res.overall.n) == (pytest.approx(2 / 3), 1)
    assert (res.things.n, res.stuff.n) == (1, 0)
    assert math.isnan(res.stuff.pq)  # no counted stuff category


def test_prediction_exactly_half_on_void_is_fp():
    # GT: sky cols 0-2 (12 px), cols 3-5 VOID.
    # Pred: sky cols 0-1 (8 px), car cols 2-3 (8 px: 4 on sky, 4 on VOID), grass cols 4-5 (all VOID).
    # sky: intersection 8, union 12 + 8 - 8 = 12 -> IoU 2/3 -> TP.
    # car: VOID share 4/8 = 0.5, not > 0.5 -> FP. grass: 8/8 on VOID -> ignored, not counted.
    # All: (2/3 + 0) / 2 = 1/3 over n = 2.
    gt = [[1, 1, 1, 0, 0, 0]] * 4
    pred = [[1, 1, 2, 2, 3, 3]] * 4
    res = evaluate([(gt, [seg(1, SKY)], pred, [seg(1, SKY), seg(2, CAR), seg(3, GRASS)])])
    assert res.per_class[CAR].fp == 1
    assert not res.per_class[GRASS].counted
    assert (res.overall.pq, res.overall.n) == (pytest.approx(1 / 3), 2)


def test_crowd_regions():
    # GT: person crowd cols 0-2 (12 px, iscrowd=1), person cols 3-4 (8 px), sky col 5 (4 px).
    # Pred: person A rows 0-2 cols 0-2 (9 px), car rows 3 cols 0-2 (3 px), person B cols 3-4, sky col 5.
    # A: IoU with the crowd would be 9/12 = 0.75 but crowd is never matched; A lies 9/9 on the person
    #    crowd -> not an FP. car: 3/3 on a crowd of *another* category -> FP.
    # The unmatched crowd segment is not an FN. B and sky: IoU 1 -> TP.
    # person: TP 1 (PQ 1); car: FP 1 (PQ 0); sky: PQ 1 -> All 2/3, Things 1/2, Stuff 1.
    gt = [[1, 1, 1, 2, 2, 3]] * 4
    pred = [[4, 4, 4, 6, 6, 7]] * 3 + [[5, 5, 5, 6, 6, 7]]
    gt_segs = [seg(1, PERSON, iscrowd=1), seg(2, PERSON), seg(3, SKY)]
    pred_segs = [seg(4, PERSON), seg(5, CAR), seg(6, PERSON), seg(7, SKY)]
    res = evaluate([(gt, gt_segs, pred, pred_segs)])
    p, c = res.per_class[PERSON], res.per_class[CAR]
    assert (p.tp, p.fp, p.fn, c.tp, c.fp, c.fn) == (1, 0, 0, 0, 1, 0)
    assert res.overall.pq == pytest.approx(2 / 3)
    assert res.overall.sq == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3
    assert res.things.pq == pytest.approx(0.5)
    assert res.stuff.pq == pytest.approx(1.0)


def test_void_plus_crowd_share_decides_fp():
    # GT: person crowd cols 0-1, VOID col 2, sky cols 3-5.
    # Pred person rows 0-1 cols 1-3 (6 px): 2 on crowd + 2 on VOID + 2 on sky -> 4/6 > 0.5 -> ignored.
    # Pred car rows 2-3 cols 1-3 (6 px): only the 2 VOID pixels count (crowd is person) -> 2/6 -> FP.
    # sky: GT 12 px, pred sky = rest of cols 3-5 (8 px), intersection 8, union 12 + 8 - 8 -> 2/3.
    gt = [[1, 1, 0, 2, 2, 2]] * 4
    pred = [[0, 5, 5, 5, 3, 3]] * 2 + [[0, 6, 6, 6, 3, 3]] * 2
    res = evaluate([(gt, [seg(1, PERSON, 1), seg(2, SKY)], pred, [seg(5, PERSON), seg(6, CAR), seg(3, SKY)])])
    assert not res.per_class[PERSON].counted
    assert res.per_class[CAR].fp == 1
    assert res.per_class[SKY].pq == pytest.approx(2 / 3)


def test_stats_accumulate_over_images():
    # Image 1: person perfect (TP, IoU 1). Image 2: person missed (FN), plus a car on labeled GT (FP).
    # person: PQ = 1 / (1 + 0.5) = 2/3; car: FP only -> 0; things (2/3 + 0) / 2 = 1/3.
    gt = [[1, 1, 2, 2]] * 2
    segs = [seg(1, PERSON), seg(2, SKY)]
    img1 = (gt, segs, gt, segs)
    img2 = (gt, segs, [[3, 3, 2, 2]] * 2, [seg(3, CAR), seg(2, SKY)])
    res = evaluate([img1, img2])
    assert res.num_images == 2
    assert res.per_class[PERSON].pq == pytest.approx(2 / 3)
    assert res.things.pq == pytest.approx(1 / 3)
    assert res.stuff.pq == pytest.approx(1.0)
    # The same with explicit PQStat merging.
    s1 = pq_compute_single_image(np.array(img1[0]), img1[1], np.array(img1[2]), img1[3], CATS)
    s2 = pq_compute_single_image(np.array(img2[0]), img2[1], np.array(img2[2]), img2[3], CATS)
    total = PQStat()
    total += s1
    total += s2
    assert total[PERSON].tp == 1 and total[PERSON].fn == 1 and total[CAR].fp == 1
    assert (s1 + s2).pq_average(CATS, True)[0].pq == pytest.approx(1 / 3)


def test_gt_ids_missing_from_segments_are_neither_void_nor_matched():
    # As in the reference: GT id 9 is not listed -> it is not VOID (a prediction on it still counts
    # in the union and as FP material) and it is never matched.
    # GT: person cols 0-2, unknown id 9 cols 3-5. Pred: person cols 0-3 (16 px), car cols 4-5.
    # person: intersection 12, union 12 + 16 - 12 = 16 -> 0.75 TP. car: on id 9, not VOID -> FP.
    gt = [[1, 1, 1, 9, 9, 9]] * 4
    pred = [[1, 1, 1, 1, 2, 2]] * 4
    res = evaluate([(gt, [seg(1, PERSON)], pred, [seg(1, PERSON), seg(2, CAR)])])
    assert res.per_class[PERSON].pq == pytest.approx(0.75)
    assert res.per_class[CAR].fp == 1


def test_segment_objects_and_input_checks():
    class Seg:  # any object with attributes works (odise_model.Segment, groundtruth.SegmentInfo)
        def __init__(self, id, category_id):
            self.id, self.category_id = id, category_id

    gt = np.array(GT_BASIC)
    stat = pq_compute_single_image(gt, GT_BASIC_SEGS, gt, [Seg(1, PERSON), Seg(2, CAR), Seg(3, SKY)], CATS)
    assert stat[PERSON].tp == stat[CAR].tp == stat[SKY].tp == 1
    with pytest.raises(ValueError, match="in pred_id_map but not in pred_segments"):
        pq_compute_single_image(gt, GT_BASIC_SEGS, gt, GT_BASIC_SEGS[:2], CATS, image_id=7)
    with pytest.raises(ValueError, match=r"\[4\] are in pred_segments but not in pred_id_map"):
        pq_compute_single_image(gt, GT_BASIC_SEGS, gt, [*GT_BASIC_SEGS, seg(4, SKY)], CATS)
    with pytest.raises(ValueError, match="unknown category_id 99"):
        pq_compute_single_image(gt, GT_BASIC_SEGS, gt, [seg(1, 99), seg(2, CAR), seg(3, SKY)], CATS)
    with pytest.raises(ValueError, match="shape"):
        pq_compute_single_image(gt, GT_BASIC_SEGS, gt[:2], GT_BASIC_SEGS, CATS)
    with pytest.raises(ValueError, match="twice"):
        pq_compute_single_image(gt, [*GT_BASIC_SEGS, seg(1, SKY)], gt, GT_BASIC_SEGS, CATS)


# --------------------------------------------------------------------------------------------------
# Cross-check against a second, literal implementation of the reference rules
# --------------------------------------------------------------------------------------------------


def _reference_pq_literal(images, categories):
    """A second implementation of the panopticapi rules, pixel masks and plain loops (no np.unique
    pairing). Returns {cat: [iou_sum, tp, fp, fn]} and the 'All' / 'Things' / 'Stuff' averages."""
    acc = {c: [0.0, 0, 0, 0] for c in categories}
    for gt, gt_segs, pred, pred_segs in images:
        void = gt == 0
        matched_gt, matched_pred = [], []
        for g in gt_segs:
            for p in pred_segs:
                if g["iscrowd"] == 1 or g["category_id"] != p["category_id"]:
                    continue
                gm, pm = gt == g["id"], pred == p["id"]
                inter = int(np.sum(gm & pm))
                if inter == 0:
                    continue
                union = int(np.sum(gm | pm)) - int(np.sum(pm & void))
                iou = inter / union
                if iou > 0.5:
                    acc[g["category_id"]][0] += iou
                    acc[g["category_id"]][1] += 1
                    matched_gt.append(g["id"])
                    matched_pred.append(p["id"])
        crowd = {}
        for g in gt_segs:
            if g["id"] in matched_gt:
                continue
            if g["iscrowd"] == 1:
                crowd[g["category_id"]] = g["id"]
            else:
                acc[g["category_id"]][3] += 1
        for p in pred_segs:
            if p["id"] in matched_pred:
                continue
            pm = pred == p["id"]
            ignored = np.sum(pm & void)
            if p["category_id"] in crowd:
                ignored += np.sum(pm & (gt == crowd[p["category_id"]]))
            if ignored / np.sum(pm) <= 0.5:
                acc[p["category_id"]][2] += 1

    def average(isthing):
        vals = []
        for c, info in categories.items():
            if isthing is not None and (info["isthing"] == 1) != isthing:
                continue
            iou, tp, fp, fn = acc[c]
            if tp + fp + fn == 0:
                continue
            d = tp + fp / 2 + fn / 2
            vals.append((iou / d, iou / tp if tp else 0.0, tp / d))
        return tuple(float(np.mean([v[i] for v in vals])) for i in range(3)) + (len(vals),)

    return acc, {"All": average(None), "Things": average(True), "Stuff": average(False)}


def _random_image(rng, h=12, w=16):
    """GT with random rectangles (some crowd, some VOID, one unlisted id) and a perturbed prediction."""
    gt = np.zeros((h, w), np.int64)
    for sid in range(1, 9):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        gt[y : y + rng.integers(2, h // 2), x : x + rng.integers(2, w // 2)] = sid
    ids = [int(i) for i in np.unique(gt) if i != 0]
    cats = list(CATS)
    gt_segs = [seg(i, int(rng.choice(cats)), int(rng.random() < 0.2)) for i in ids]
    if len(gt_segs) > 2:  # one id in the map but not in the segment list (reference: ignored id)
        gt_segs.pop(int(rng.integers(len(gt_segs))))
    # Prediction: relabelled GT, then random rectangles painted over, some categories changed.
    perm = {i: 100 + k for k, i in enumerate(rng.permutation(ids))}
    pred = np.vectorize(lambda v: perm.get(int(v), 0))(gt).astype(np.int64)
    for k in range(4):
        y, x = rng.integers(0, h - 2), rng.integers(0, w - 2)
        pred[y : y + rng.integers(1, h // 3), x : x + rng.integers(1, w // 3)] = 200 + k if k < 3 else 0
    gt_cat = {s["id"]: s["category_id"] for s in gt_segs}
    pred_segs = []
    for i in [int(v) for v in np.unique(pred) if v != 0]:
        src = [g for g, p in perm.items() if p == i]
        cat = gt_cat.get(src[0]) if src else None
        if cat is None or rng.random() < 0.15:
            cat = int(rng.choice(cats))
        pred_segs.append(seg(i, cat))
    return gt, gt_segs, pred, pred_segs


@pytest.mark.parametrize("seed", range(12))
def test_matches_literal_reference_on_random_images(seed):
    rng = np.random.default_rng(seed)
    images = [_random_image(rng) for _ in range(3)]
    acc, expected = _reference_pq_literal(images, CATS)
    res = evaluate(images)
    for c, (iou, tp, fp, fn) in acc.items():
        r = res.per_class[c]
        assert (r.tp, r.fp, r.fn) == (tp, fp, fn), f"category {c}"
        assert r.sq * r.tp == pytest.approx(iou), f"category {c}"  # summed IoU of the TPs
    for name, m in (("All", res.overall), ("Things", res.things), ("Stuff", res.stuff)):
        pq, sq, rq, n = expected[name]
        assert m.n == n
        if n:
            assert (m.pq, m.sq, m.rq) == (pytest.approx(pq), pytest.approx(sq), pytest.approx(rq))


def test_random_images_exercise_every_rule():
    # Guard the cross-check's power: over the seeds, matches, FPs, FNs, crowd ignores all occur.
    totals = np.zeros(4)
    for seed in range(12):
        rng = np.random.default_rng(seed)
        acc, _ = _reference_pq_literal([_random_image(rng) for _ in range(3)], CATS)
        totals += np.array([sum(v[i] for v in acc.values()) for i in range(4)])
    assert totals[1] > 20 and totals[2] > 20 and totals[3] > 10


# --------------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------------


def test_semantic_hand_example():
    # classes {1, 2, 3}, ignore 255. Pixel pairs (gt, pred), in reading order:
    # (1,1) (1,1) (1,1) (2,2) (2,2) / (1,1) (1,2) (2,2) (2,unlabeled) (255,3)
    # class 1: GT 5 px, TP 4, predicted (on non-ignored GT) 4 -> IoU 4/(5+4-4) = 0.8, acc 4/5 = 0.8
    # class 2: GT 4 px, TP 3, predicted 4 (incl. the (1,2) pixel) -> IoU 3/(4+4-3) = 0.6, acc 0.75
    #          (the unlabeled pixel is a miss: in the GT total, in no class's prediction total)
    # class 3: no GT pixel (its prediction is on an ignored pixel) -> excluded, NaN.
    # mIoU = (0.8 + 0.6)/2 = 0.7; fwIoU = 5/9*0.8 + 4/9*0.6 = 6.4/9; pACC = 7/9; mACC = 0.775.
    gt = np.array([[1, 1, 1, 2, 2], [1, 1, 2, 2, 255]])
    pred = np.array([[1, 1, 1, 2, 2], [1, 2, 2, 255, 3]])
    ev = SemanticEvaluator([3, 1, 2], ignore_value=255)
    ev.add(gt, pred)
    m = ev.result()
    assert m.miou == pytest.approx(0.7)
    assert m.fwiou == pytest.approx(6.4 / 9)
    assert m.pixel_accuracy == pytest.approx(7 / 9)
    assert m.mean_accuracy == pytest.approx(0.775)
    assert m.per_class_iou[1] == pytest.approx(0.8) and m.per_class_iou[2] == pytest.approx(0.6)
    assert math.isnan(m.per_class_iou[3]) and math.isnan(m.per_class_accuracy[3])
    # Merging two accumulators equals adding both images to one.
    other = SemanticEvaluator([1, 2, 3])
    other.add(gt, pred)
    ev += other
    assert ev.result().miou == pytest.approx(0.7)
    with pytest.raises(ValueError, match="neither class ids nor ignore_value"):
        ev.add(gt, np.full_like(pred, 7))


def test_semantic_from_panoptic_and_evaluator():
    # GT: person crowd (id 1), sky (id 2), VOID -> semantic [1,1,255 / 3,3,255]; crowd keeps its class.
    gt = np.array([[1, 1, 0], [2, 2, 0]])
    gt_segs = [seg(1, PERSON, 1), seg(2, SKY)]
    sem = panoptic_to_semantic(gt, gt_segs)
    np.testing.assert_array_equal(sem, [[PERSON, PERSON, 255], [SKY, SKY, 255]])
    assert sem.dtype == np.int32
    # Pred: person over (0,0), sky over the rest of row 1 and (0,1) -> person IoU 1/2, sky IoU 2/3.
    # pixels: (P,P) (P,S) (void,unl) / (S,S) (S,S) (void,S). mIoU = (1/2 + 2/3)/2 = 7/12; pACC 3/4.
    pred = np.array([[5, 6, 0], [6, 6, 6]])
    ev = PanopticEvaluator(CATS)
    ev.add(gt, gt_segs, pred, [seg(5, PERSON), seg(6, SKY)])
    s = ev.result().semantic
    assert s.miou == pytest.approx(7 / 12)
    assert s.pixel_accuracy == pytest.approx(0.75)


# --------------------------------------------------------------------------------------------------
# Instance mask AP (pycocotools)
# --------------------------------------------------------------------------------------------------


def _box_mask(top, left, size, shape=(8, 8)):
    m = np.zeros(shape, bool)
    m[top : top + size, left : left + size] = True
    return m


def _pred(image_id, cat, score, mask):
    return {"image_id": image_id, "category_id": cat, "score": score, "segmentation": mask_to_rle(mask)}


def _gt(image_id, cat, mask, iscrowd=0):
    return {"image_id": image_id, "category_id": cat, "iscrowd": iscrowd, "segmentation": mask_to_rle(mask)}


def test_ap_perfect():
    a, b = _box_mask(0, 0, 4), _box_mask(4, 4, 4)
    gts = [_gt(1, PERSON, a), _gt(1, CAR, b)]
    m = evaluate_instance_ap([1], gts, [_pred(1, PERSON, 0.9, a), _pred(1, CAR, 0.8, b)], CATS)
    # (COCO sums 101 float precisions, so 1.0 comes back as 0.9999999999999998: approx)
    assert (m.ap, m.ap50, m.ap75, m.aps) == pytest.approx((1.0, 1.0, 1.0, 1.0))
    assert math.isnan(m.apm) and math.isnan(m.apl)  # every object is small (< 32^2 px)
    assert m.per_class_ap == {PERSON: pytest.approx(1.0), CAR: pytest.approx(1.0), DOG: m.per_class_ap[DOG]}
    assert math.isnan(m.per_class_ap[DOG])  # no GT -> undefined (COCO's -1)
    assert set(m.per_class_ap) == {PERSON, CAR, DOG}  # thing categories only


def test_ap_with_higher_scored_false_positive():
    # One GT; detections sorted by score: FP (0.9), TP (0.8) at every IoU threshold.
    # recall [0, 1], precision [0, 1/2]; the interpolated envelope is 1/2 at both, so every one of the
    # 101 recall points reads precision 1/2 -> AP = AP50 = AP75 = 0.5.
    a = _box_mask(0, 0, 4)
    preds = [_pred(1, PERSON, 0.9, _box_mask(4, 4, 4)), _pred(1, PERSON, 0.8, a)]
    m = evaluate_instance_ap([1], [_gt(1, PERSON, a)], preds, CATS)
    assert (m.ap, m.ap50, m.ap75) == (pytest.approx(0.5), pytest.approx(0.5), pytest.approx(0.5))

    # Two GTs; detections: TP (0.9), FP (0.8), TP (0.7): recall [.5, .5, 1], precision [1, .5, 2/3];
    # envelope [1, 2/3, 2/3]. Recall points 0.00..0.50 (51) read 1, 0.51..1.00 (50) read 2/3:
    # AP = (51 + 50 * 2/3) / 101.
    b = _box_mask(5, 5, 3)
    preds = [_pred(1, PERSON, 0.9, a), _pred(1, PERSON, 0.8, _box_mask(0, 5, 3)), _pred(1, PERSON, 0.7, b)]
    m = evaluate_instance_ap([1], [_gt(1, PERSON, a), _gt(1, PERSON, b)], preds, CATS)
    assert m.ap == pytest.approx((51 + 50 * 2 / 3) / 101)


def test_ap_zero_crowd_and_images_without_gt():
    a = _box_mask(0, 0, 4)
    # Only a wrong detection -> AP 0.
    m = evaluate_instance_ap([1], [_gt(1, PERSON, a)], [_pred(1, PERSON, 0.9, _box_mask(4, 4, 4))], CATS)
    assert m.ap == 0.0
    # A detection on a crowd region is ignored, not an FP: AP stays 1 with it scored highest.
    crowd = _box_mask(4, 4, 4)
    preds = [_pred(1, PERSON, 0.95, crowd), _pred(1, PERSON, 0.5, a)]
    m = evaluate_instance_ap([1], [_gt(1, PERSON, a), _gt(1, PERSON, crowd, 1)], preds, CATS)
    assert m.ap == pytest.approx(1.0)
    # A detection in an image without GT things is an FP (the image must be listed): 0.5 as above.
    preds = [_pred("b", PERSON, 0.9, a), _pred("a", PERSON, 0.8, a)]
    m = evaluate_instance_ap(["a", "b"], [_gt("a", PERSON, a)], preds, CATS)
    assert m.ap == pytest.approx(0.5)
    # Nothing predicted at all.
    assert evaluate_instance_ap([1], [_gt(1, PERSON, a)], [], CATS).ap == 0.0


def test_instances_from_panoptic_keeps_things_only():
    gt = np.array([[1, 1, 2], [3, 3, 0]])
    anns = instances_from_panoptic(gt, [seg(1, PERSON), seg(2, SKY), seg(3, CAR, 1)], CATS, image_id=4)
    assert [(a["category_id"], a["iscrowd"], a["area"]) for a in anns] == [(PERSON, 0, 2), (CAR, 1, 2)]
    assert anns[0]["segmentation"]["size"] == [2, 3] and isinstance(anns[0]["segmentation"]["counts"], str)


# --------------------------------------------------------------------------------------------------
# The whole evaluator and its result object
# --------------------------------------------------------------------------------------------------


def test_evaluator_all_metrics_json_and_table():
    class Inst:  # like odise_model.Instance: category_id, score, HxW bool mask
        def __init__(self, category_id, score, mask):
            self.category_id, self.score, self.mask = category_id, score, mask

    gt = np.array(GT_BASIC)
    ev = PanopticEvaluator(CATS, instance=True)
    insts = [Inst(PERSON, 0.9, gt == 1), Inst(CAR, 0.8, gt == 2)]
    ev.add(gt, GT_BASIC_SEGS, gt, GT_BASIC_SEGS, image_id="img-1", pred_instances=insts)
    res = ev.result()
    assert res.overall.pq == 1.0 and res.semantic.miou == 1.0 and res.instance.ap == pytest.approx(1.0)
    d = json.loads(res.to_json())
    assert d["panoptic"]["All"] == {"pq": 1.0, "sq": 1.0, "rq": 1.0, "n": 3}
    assert d["panoptic"]["per_class"][str(DOG)] == {
        "name": "dog",
        "isthing": True,
        "pq": 0.0,
        "sq": 0.0,
        "rq": 0.0,
        "tp": 0,
        "fp": 0,
        "fn": 0,
        "counted": False,
    }
    assert d["panoptic"]["per_class"][str(PERSON)]["counted"] is True
    assert d["semantic"]["mIoU"] == 1.0 and d["semantic"]["per_class"][str(GRASS)]["iou"] is None
    assert d["instance"]["AP"] == pytest.approx(1.0) and d["instance"]["APm"] is None
    table = res.format_table()
    assert "All" in table and "100.0" in table and "mIoU" in table and "AP50" in table and "dog" in table
    with pytest.raises(ValueError, match="pred_instances is required"):
        ev.add(gt, GT_BASIC_SEGS, gt, GT_BASIC_SEGS)
