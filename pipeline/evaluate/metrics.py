"""Evaluation metrics: panoptic quality, semantic segmentation, instance mask AP.

Pure numpy (+ pycocotools for AP, imported only when AP is computed). No Ray, no Prefect, no torch:
the metrics can run anywhere, on results coming from any source (the predictor, our Parquet output,
a COCO panoptic prediction folder). Every metric is an *accumulator*: add one image at a time, read
the result at the end, merge partial accumulators with ``+=`` (e.g. one per worker).

Inputs, per image
-----------------
* ``gt_id_map``: ``HxW`` integer array of ground-truth segment ids, ``0`` = VOID (unlabeled).
* ``gt_segments``: one entry per GT segment with ``id`` (>= 1), ``category_id`` and ``iscrowd`` (0/1).
* ``pred_id_map``: ``HxW`` integer array of predicted segment ids, ``0`` = unlabeled.
* ``pred_segments``: one entry per predicted segment with ``id`` (>= 1) and ``category_id``.
* ``categories``: ``{category_id: {"isthing": bool | 0/1, "name": str, ...}}`` (COCO ``categories``
  keyed by id; extra keys are ignored).

A segment entry is either a mapping (a COCO ``segments_info`` dict) or any object with the same
attributes (``odise_model.Segment``, ``pipeline.groundtruth.SegmentInfo``); ``iscrowd`` defaults to 0
when absent. Segment ids must be in ``[1, 256**3)`` (the COCO panoptic PNG range).

Panoptic quality (PQ)
---------------------
Follows the COCO panoptic reference implementation (``panopticapi/evaluation.py``,
``pq_compute_single_core`` and ``PQStat.pq_average``) rule by rule:

1. a GT segment and a predicted segment of the same category match when IoU > 0.5 (strict), where
   ``union = pred_area + gt_area - intersection - |pred ∩ VOID|`` (pixels of the prediction that
   fall on GT VOID are removed from the union); GT crowd segments are never matched;
2. unmatched non-crowd GT segments are false negatives; unmatched crowd segments are not;
3. an unmatched prediction is a false positive unless more than half of its pixels fall on GT VOID
   plus the crowd region of its own category (only one crowd segment per category and image is
   considered: the last one listed, as in the reference);
4. per category: ``PQ = sum(IoU of TP) / (TP + FP/2 + FN/2)``, ``SQ = sum(IoU)/TP`` (0 when TP = 0),
   ``RQ = TP / (TP + FP/2 + FN/2)``; categories with ``TP + FP + FN = 0`` have PQ = SQ = RQ = 0 in the
   per-class table and are left out of the averages (they do not count in ``n``);
5. "All", "Things", "Stuff" are unweighted means over the counted categories of each group.

Deviations from the reference, all on inputs it does not define:

* the GT area is the pixel count of the id map, not the ``area`` field of the JSON (they agree on valid
  COCO data; the pixel count stays right when GT is resized to the prediction's resolution);
* a group with no counted category (``n = 0``) gives NaN instead of a ``ZeroDivisionError``;
* malformed input raises ``ValueError`` (the reference raises ``KeyError`` for predicted ids missing
  from the PNG or from the segment list and for unknown predicted categories, and does not check GT).

Semantic segmentation
---------------------
:class:`SemanticEvaluator` accumulates a confusion matrix and reports mIoU, fwIoU, pixel accuracy and
mean accuracy exactly as detectron2's ``SemSegEvaluator`` (classes without GT pixels are left out of
mIoU / mACC; fwIoU weights by GT pixel frequency). One extension: a prediction may leave pixels
unlabeled (the panoptic output's id 0); such pixels count as misses of the GT class (they are in the GT
totals, never in any class's predicted total). With complete predictions this is identical to
detectron2. Semantic GT is derived from panoptic GT with :func:`panoptic_to_semantic` (every
segment's category, crowd included; VOID and unknown ids become ``ignore_value``).

Instance mask AP
----------------
:func:`evaluate_instance_ap` runs pycocotools ``COCOeval(iouType="segm")`` on RLE masks of the thing
categories and reports AP, AP50, AP75, APs/m/l and per-class AP (detectron2's per-class rule: mean of
the precision array over IoU thresholds and recall points, area "all", 100 detections).

All metrics are fractions in ``[0, 1]`` (NaN when undefined); :meth:`EvaluationResult.format_table`
prints them in percent like the reference.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.encode import mask_to_rle

__all__ = [
    "OFFSET",
    "VOID",
    "PQStatCat",
    "PQStat",
    "PQMetrics",
    "ClassPQ",
    "SemanticMetrics",
    "InstanceMetrics",
    "EvaluationResult",
    "SemanticEvaluator",
    "PanopticEvaluator",
    "pq_compute_single_image",
    "panoptic_to_semantic",
    "mask_to_rle",
    "instances_from_panoptic",
    "evaluate_instance_ap",
]

OFFSET = 256 * 256 * 256
"""Segment ids are below this value (24-bit RGB encoding); also the pair-encoding multiplier."""
VOID = 0
"""Id of unlabeled pixels in both GT and prediction id maps."""


# --------------------------------------------------------------------------------------------------
# Input adapters and checks
# --------------------------------------------------------------------------------------------------


def _field(seg: Any, name: str, default: Any = None) -> Any:
    if isinstance(seg, Mapping):
        return seg.get(name, default)
    return getattr(seg, name, default)


def _where(image_id: Any) -> str:
    return f"image {image_id!r}" if image_id is not None else "image"


def _check_id_map(id_map: np.ndarray, name: str, image_id: Any) -> np.ndarray:
    id_map = np.asarray(id_map)
    if id_map.ndim != 2:
        raise ValueError(f"{_where(image_id)}: {name} must be a 2-D HxW array, got shape {id_map.shape}")
    if not np.issubdtype(id_map.dtype, np.integer):
        raise ValueError(f"{_where(image_id)}: {name} must have an integer dtype, got {id_map.dtype}")
    if id_map.size and (int(id_map.min()) < 0 or int(id_map.max()) >= OFFSET):
        raise ValueError(
            f"{_where(image_id)}: {name} values must be in [0, {OFFSET}), "
            f"got range [{int(id_map.min())}, {int(id_map.max())}]"
        )
    return id_map


def _segments_by_id(
    segments: Iterable[Any],
    categories: Mapping[int, Any],
    name: str,
    image_id: Any,
) -> dict[int, tuple[int, int]]:
    """``{segment id: (category_id, iscrowd)}`` in input order, validated."""
    out: dict[int, tuple[int, int]] = {}
    for seg in segments:
        seg_id, cat_id = _field(seg, "id"), _field(seg, "category_id")
        if seg_id is None or cat_id is None:
            raise ValueError(
                f"{_where(image_id)}: every entry of {name} needs 'id' and 'category_id': {seg!r}"
            )
        seg_id, cat_id = int(seg_id), int(cat_id)
        if not 0 < seg_id < OFFSET:
            raise ValueError(f"{_where(image_id)}: {name} has segment id {seg_id}, must be in [1, {OFFSET})")
        if seg_id in out:
            raise ValueError(f"{_where(image_id)}: {name} lists segment id {seg_id} twice")
        if cat_id not in categories:
            raise ValueError(f"{_where(image_id)}: {name} segment {seg_id} has unknown category_id {cat_id}")
        out[seg_id] = (cat_id, int(bool(_field(seg, "iscrowd", 0))))
    return out


def _isthing(info: Any) -> bool:
    # The reference tests ``isthing == 1``; True == 1 in Python, so bools and 0/1 both work.
    return _field(info, "isthing", 0) == 1


def _name(info: Any, cat_id: int) -> str:
    return str(_field(info, "name", cat_id))


# --------------------------------------------------------------------------------------------------
# Panoptic quality
# --------------------------------------------------------------------------------------------------


@dataclass
class PQStatCat:
    """Per-category PQ counts: summed IoU of true positives, and TP / FP / FN counts."""

    iou: float = 0.0
    tp: int = 0
    fp: int = 0
    fn: int = 0

    def __iadd__(self, other: PQStatCat) -> PQStatCat:
        self.iou += other.iou
        self.tp += other.tp
        self.fp += other.fp
        self.fn += other.fn
        return self


@dataclass(frozen=True)
class PQMetrics:
    """PQ / SQ / RQ averaged over ``n`` counted categories (NaN when ``n == 0``)."""

    pq: float
    sq: float
    rq: float
    n: int


@dataclass(frozen=True)
class ClassPQ:
    """PQ of one category; ``pq = sq = rq = 0`` when the category has no TP, FP or FN (not counted)."""

    category_id: int
    name: str
    isthing: bool
    pq: float
    sq: float
    rq: float
    tp: int
    fp: int
    fn: int

    @property
    def counted(self) -> bool:
        """Whether the category enters the averages (it has GT or predictions)."""
        return self.tp + self.fp + self.fn > 0


class PQStat:
    """Accumulator of :class:`PQStatCat` per category id; add images with ``+=``.

    ``stat[category_id]`` gives (and creates) the counts of one category.
    """

    def __init__(self) -> None:
        self.pq_per_cat: defaultdict[int, PQStatCat] = defaultdict(PQStatCat)

    def __getitem__(self, category_id: int) -> PQStatCat:
        return self.pq_per_cat[category_id]

    def __iadd__(self, other: PQStat) -> PQStat:
        for cat_id, stat in other.pq_per_cat.items():
            self.pq_per_cat[cat_id] += stat
        return self

    def __add__(self, other: PQStat) -> PQStat:
        out = PQStat()
        out += self
        out += other
        return out

    def __repr__(self) -> str:
        return f"PQStat({dict(self.pq_per_cat)!r})"

    def pq_average(
        self, categories: Mapping[int, Any], isthing: bool | None = None
    ) -> tuple[PQMetrics, dict[int, ClassPQ]]:
        """Average PQ / SQ / RQ over the categories of one group, like ``PQStat.pq_average``.

        Args:
            categories: ``{category_id: {"isthing": ..., "name": ...}}``; only these are averaged.
            isthing: True for things only, False for stuff only, None for all categories.

        Returns:
            ``(PQMetrics, {category_id: ClassPQ})`` for the categories of the group.
        """
        pq = sq = rq = 0.0
        n = 0
        per_class: dict[int, ClassPQ] = {}
        for cat_id, info in categories.items():
            cat_isthing = _isthing(info)
            if isthing is not None and isthing != cat_isthing:
                continue
            s = self.pq_per_cat.get(cat_id, PQStatCat())
            if s.tp + s.fp + s.fn == 0:
                per_class[cat_id] = ClassPQ(cat_id, _name(info, cat_id), cat_isthing, 0.0, 0.0, 0.0, 0, 0, 0)
                continue
            n += 1
            denom = s.tp + 0.5 * s.fp + 0.5 * s.fn
            pq_c = s.iou / denom
            sq_c = s.iou / s.tp if s.tp != 0 else 0.0
            rq_c = s.tp / denom
            per_class[cat_id] = ClassPQ(
                cat_id, _name(info, cat_id), cat_isthing, pq_c, sq_c, rq_c, s.tp, s.fp, s.fn
            )
            pq += pq_c
            sq += sq_c
            rq += rq_c
        if n == 0:
            return PQMetrics(math.nan, math.nan, math.nan, 0), per_class
        return PQMetrics(pq / n, sq / n, rq / n, n), per_class


def pq_compute_single_image(
    gt_id_map: np.ndarray,
    gt_segments: Iterable[Any],
    pred_id_map: np.ndarray,
    pred_segments: Iterable[Any],
    categories: Mapping[int, Any],
    *,
    image_id: Any = None,
) -> PQStat:
    """PQ counts of one image (the body of the reference's ``pq_compute_single_core`` loop).

    Args:
        gt_id_map: ``HxW`` int GT segment ids, 0 = VOID. Ids not listed in ``gt_segments`` are neither
            VOID nor matched (as in the reference).
        gt_segments: entries with ``id``, ``category_id``, ``iscrowd``.
        pred_id_map: ``HxW`` int predicted segment ids (same shape), 0 = unlabeled.
        pred_segments: entries with ``id``, ``category_id``; every listed id must appear in
            ``pred_id_map`` and every nonzero id of ``pred_id_map`` must be listed.
        categories: ``{category_id: {"isthing", "name"}}``.
        image_id: only used in error messages.

    Returns:
        A :class:`PQStat` holding this image's TP / FP / FN / IoU sums per category.
    """
    # 1. Check inputs.
    gt_id_map = _check_id_map(gt_id_map, "gt_id_map", image_id)
    pred_id_map = _check_id_map(pred_id_map, "pred_id_map", image_id)
    if gt_id_map.shape != pred_id_map.shape:
        raise ValueError(
            f"{_where(image_id)}: gt_id_map shape {gt_id_map.shape} != pred_id_map shape {pred_id_map.shape}"
        )
    gt_segms = _segments_by_id(gt_segments, categories, "gt_segments", image_id)
    pred_segms = _segments_by_id(pred_segments, categories, "pred_segments", image_id)

    # 2. Areas: predicted ids must match the segment list exactly (reference sanity checks).
    pred_area: dict[int, int] = {}
    labels, counts = np.unique(pred_id_map, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
        if label not in pred_segms:
            if label == VOID:
                continue
            raise ValueError(
                f"{_where(image_id)}: segment id {label} is in pred_id_map but not in pred_segments"
            )
        pred_area[label] = count
    missing = [seg_id for seg_id in pred_segms if seg_id not in pred_area]
    if missing:
        raise ValueError(
            f"{_where(image_id)}: segment ids {missing} are in pred_segments but not in pred_id_map"
        )
    gt_area: dict[int, int] = dict.fromkeys(gt_segms, 0)
    labels, counts = np.unique(gt_id_map, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
        if label in gt_area:
            gt_area[label] = count

    # 3. Intersections of every (gt id, pred id) pair present in the image.
    pair = gt_id_map.astype(np.uint64) * np.uint64(OFFSET) + pred_id_map.astype(np.uint64)
    labels, counts = np.unique(pair, return_counts=True)
    gt_pred_map: dict[tuple[int, int], int] = {
        (label // OFFSET, label % OFFSET): count
        for label, count in zip(labels.tolist(), counts.tolist(), strict=True)
    }

    # 4. Matches: same category, GT not crowd, IoU > 0.5 with VOID pixels of the prediction excluded.
    stat = PQStat()
    gt_matched: set[int] = set()
    pred_matched: set[int] = set()
    for (gt_label, pred_label), intersection in gt_pred_map.items():
        if gt_label not in gt_segms or pred_label not in pred_segms:
            continue
        gt_cat, gt_crowd = gt_segms[gt_label]
        if gt_crowd == 1 or gt_cat != pred_segms[pred_label][0]:
            continue
        union = (
            pred_area[pred_label] + gt_area[gt_label] - intersection - gt_pred_map.get((VOID, pred_label), 0)
        )
        iou = intersection / union
        if iou > 0.5:
            stat[gt_cat].tp += 1
            stat[gt_cat].iou += iou
            gt_matched.add(gt_label)
            pred_matched.add(pred_label)

    # 5. False negatives: unmatched non-crowd GT. Remember one crowd segment per category (last wins).
    crowd_by_cat: dict[int, int] = {}
    for gt_label, (gt_cat, gt_crowd) in gt_segms.items():
        if gt_label in gt_matched:
            continue
        if gt_crowd == 1:
            crowd_by_cat[gt_cat] = gt_label
            continue
        stat[gt_cat].fn += 1

    # 6. False positives: unmatched predictions not mostly (> 1/2) on VOID + same-category crowd.
    for pred_label, (pred_cat, _) in pred_segms.items():
        if pred_label in pred_matched:
            continue
        ignored = gt_pred_map.get((VOID, pred_label), 0)
        if pred_cat in crowd_by_cat:
            ignored += gt_pred_map.get((crowd_by_cat[pred_cat], pred_label), 0)
        if ignored / pred_area[pred_label] > 0.5:
            continue
        stat[pred_cat].fp += 1
    return stat


# --------------------------------------------------------------------------------------------------
# Semantic segmentation
# --------------------------------------------------------------------------------------------------


def panoptic_to_semantic(
    id_map: np.ndarray, segments: Iterable[Any], *, ignore_value: int = 255
) -> np.ndarray:
    """Per-pixel category ids of a panoptic id map.

    Args:
        id_map: ``HxW`` int segment ids, 0 = VOID / unlabeled.
        segments: entries with ``id`` and ``category_id`` (crowd segments included).
        ignore_value: value written for VOID pixels and ids not listed in ``segments``.

    Returns:
        ``HxW`` int32 array of category ids or ``ignore_value``.
    """
    id_map = np.asarray(id_map)
    cat_of = {int(_field(s, "id")): int(_field(s, "category_id")) for s in segments}
    ids, inverse = np.unique(id_map, return_inverse=True)
    lut = np.array(
        [cat_of.get(i, ignore_value) if i != VOID else ignore_value for i in ids.tolist()], np.int32
    )
    return lut[inverse].reshape(id_map.shape)


@dataclass(frozen=True)
class SemanticMetrics:
    """Semantic segmentation metrics (fractions in [0, 1]; NaN when undefined).

    Attributes:
        miou: mean IoU over classes with GT pixels.
        fwiou: IoU weighted by each class's share of GT pixels.
        pixel_accuracy: correctly labeled GT pixels / all non-ignored GT pixels.
        mean_accuracy: mean per-class recall over classes with GT pixels.
        per_class_iou, per_class_accuracy: ``{category_id: value}``, NaN for classes without GT.
        class_names: ``{category_id: name}``.
    """

    miou: float
    fwiou: float
    pixel_accuracy: float
    mean_accuracy: float
    per_class_iou: dict[int, float]
    per_class_accuracy: dict[int, float]
    class_names: dict[int, str] = field(default_factory=dict)


class SemanticEvaluator:
    """Confusion-matrix accumulator for semantic segmentation over arbitrary category ids.

    The matrix has shape ``(K+1) x (K+1)`` for ``K`` classes: rows are predictions, columns GT (the
    detectron2 layout); row ``K`` = "no prediction", column ``K`` = ignored GT.

    Args:
        class_ids: the category ids evaluated (any ints, e.g. COCO ids 1..200), ``K`` of them.
        ignore_value: GT value of ignored pixels; in predictions it means "unlabeled". Must not be a
            class id.
        class_names: optional ``{category_id: name}`` for reports.
    """

    def __init__(
        self,
        class_ids: Sequence[int],
        *,
        ignore_value: int = 255,
        class_names: Mapping[int, str] | None = None,
    ) -> None:
        ids = np.array(sorted(int(c) for c in class_ids), dtype=np.int64)
        if ids.size == 0:
            raise ValueError("class_ids is empty")
        if np.unique(ids).size != ids.size:
            raise ValueError(f"class_ids has duplicates: {list(class_ids)}")
        if ignore_value in ids:
            raise ValueError(f"ignore_value {ignore_value} is also a class id")
        self.class_ids = ids
        self.ignore_value = int(ignore_value)
        self.class_names = {int(k): str(v) for k, v in (class_names or {}).items()}
        k = ids.size
        self.confusion_matrix = np.zeros((k + 1, k + 1), dtype=np.int64)
        # Lookup table value -> index (K for ignore_value, -1 for anything else) when all ids are small
        # non-negative ints: an O(1) gather per pixel instead of a binary search.
        self._lut: np.ndarray | None = None
        top = max(int(ids.max()), self.ignore_value)
        if int(ids.min()) >= 0 and top < 1 << 20:
            lut = np.full(top + 1, -1, dtype=np.int64)
            lut[ids] = np.arange(k)
            if self.ignore_value >= 0:
                lut[self.ignore_value] = k
            self._lut = lut

    @property
    def num_classes(self) -> int:
        return int(self.class_ids.size)

    def _to_index(self, values: np.ndarray, name: str) -> np.ndarray:
        """Map category ids to 0..K-1 and ``ignore_value`` to K; raise on anything else."""
        values = np.asarray(values).ravel()
        if self._lut is not None and values.size and np.issubdtype(values.dtype, np.integer):
            if int(values.min()) >= 0 and int(values.max()) < self._lut.size:
                idx = self._lut[values]
                if not (idx < 0).any():
                    return idx
        values = values.astype(np.int64, copy=False)
        idx = np.searchsorted(self.class_ids, values)
        idx_clipped = np.minimum(idx, self.num_classes - 1)
        known = self.class_ids[idx_clipped] == values
        ignored = values == self.ignore_value
        bad = ~(known | ignored)
        if bad.any():
            raise ValueError(
                f"{name} has values that are neither class ids nor ignore_value: "
                f"{np.unique(values[bad])[:10].tolist()}"
            )
        return np.where(known, idx_clipped, self.num_classes)

    def add(self, gt: np.ndarray, pred: np.ndarray) -> None:
        """Add one image.

        Args:
            gt: ``HxW`` int category ids, ``ignore_value`` = ignored pixel.
            pred: ``HxW`` int category ids (same shape), ``ignore_value`` = unlabeled (a miss).
        """
        gt, pred = np.asarray(gt), np.asarray(pred)
        if gt.shape != pred.shape or gt.ndim != 2:
            raise ValueError(f"gt and pred must be HxW arrays of one shape, got {gt.shape} and {pred.shape}")
        g = self._to_index(gt, "gt")
        p = self._to_index(pred, "pred")
        k1 = self.num_classes + 1
        self.confusion_matrix += np.bincount(k1 * p + g, minlength=k1 * k1).reshape(k1, k1)

    def __iadd__(self, other: SemanticEvaluator) -> SemanticEvaluator:
        if not np.array_equal(self.class_ids, other.class_ids) or self.ignore_value != other.ignore_value:
            raise ValueError("cannot merge SemanticEvaluators with different classes or ignore_value")
        self.confusion_matrix += other.confusion_matrix
        return self

    def result(self) -> SemanticMetrics:
        """Metrics of everything added so far (detectron2 ``SemSegEvaluator.evaluate`` rules)."""
        k = self.num_classes
        cm = self.confusion_matrix.astype(np.float64)
        tp = cm.diagonal()[:k]
        pos_gt = cm[:, :k].sum(axis=0)  # includes the "no prediction" row
        pos_pred = cm[:k, :k].sum(axis=1)  # predictions on ignored GT do not count
        acc = np.full(k, np.nan)
        iou = np.full(k, np.nan)
        acc_valid = pos_gt > 0
        acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
        union = pos_gt + pos_pred - tp
        iou_valid = acc_valid & (union > 0)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        total = pos_gt.sum()
        if total == 0:
            miou = fwiou = pacc = macc = math.nan
        else:
            class_weights = pos_gt / total
            macc = float(acc[acc_valid].sum() / acc_valid.sum())
            miou = float(iou[iou_valid].sum() / iou_valid.sum())
            fwiou = float((iou[iou_valid] * class_weights[iou_valid]).sum())
            pacc = float(tp.sum() / total)
        ids = self.class_ids.tolist()
        return SemanticMetrics(
            miou=miou,
            fwiou=fwiou,
            pixel_accuracy=pacc,
            mean_accuracy=macc,
            per_class_iou={c: float(v) for c, v in zip(ids, iou, strict=True)},
            per_class_accuracy={c: float(v) for c, v in zip(ids, acc, strict=True)},
            class_names={c: self.class_names.get(c, str(c)) for c in ids},
        )


# --------------------------------------------------------------------------------------------------
# Instance mask AP (pycocotools)
# --------------------------------------------------------------------------------------------------


def instances_from_panoptic(
    id_map: np.ndarray,
    segments: Iterable[Any],
    categories: Mapping[int, Any],
    *,
    image_id: Any,
) -> list[dict[str, Any]]:
    """COCO instance GT annotations of the *thing* segments of a panoptic GT image.

    Returns:
        ``[{"image_id", "category_id", "iscrowd", "segmentation": RLE, "area"}]``; ``area`` is the
        pixel count. Segments absent from the id map are skipped.
    """
    id_map = np.asarray(id_map)
    out = []
    for seg in segments:
        cat_id = int(_field(seg, "category_id"))
        if cat_id not in categories or not _isthing(categories[cat_id]):
            continue
        mask = id_map == int(_field(seg, "id"))
        area = int(mask.sum())
        if area == 0:
            continue
        out.append(
            {
                "image_id": image_id,
                "category_id": cat_id,
                "iscrowd": int(bool(_field(seg, "iscrowd", 0))),
                "segmentation": mask_to_rle(mask),
                "area": area,
            }
        )
    return out


@dataclass(frozen=True)
class InstanceMetrics:
    """COCO mask AP metrics (fractions in [0, 1]; NaN where COCO reports -1, i.e. no GT).

    Attributes:
        ap: AP averaged over IoU 0.50:0.95; ap50, ap75: at IoU 0.5 / 0.75.
        aps, apm, apl: AP of small (< 32^2 px), medium, large objects.
        per_class_ap: ``{category_id: AP}`` for thing categories.
        class_names: ``{category_id: name}``.
    """

    ap: float
    ap50: float
    ap75: float
    aps: float
    apm: float
    apl: float
    per_class_ap: dict[int, float]
    class_names: dict[int, str] = field(default_factory=dict)


def _as_prediction(pred: Any) -> dict[str, Any]:
    """A COCO result dict from a mapping with ``segmentation`` RLE or an object with ``mask``."""
    rle = _field(pred, "segmentation")
    if rle is None:
        mask = _field(pred, "mask")
        if mask is None:
            raise ValueError(f"instance prediction needs 'segmentation' (RLE) or 'mask': {pred!r}")
        rle = mask_to_rle(mask)
    return {
        "category_id": int(_field(pred, "category_id")),
        "score": float(_field(pred, "score")),
        "segmentation": rle,
    }


def evaluate_instance_ap(
    image_ids: Sequence[Any],
    gt_annotations: Iterable[Mapping[str, Any]],
    predictions: Iterable[Any],
    categories: Mapping[int, Any],
) -> InstanceMetrics:
    """Mask AP with pycocotools ``COCOeval(iouType="segm")``.

    Args:
        image_ids: every evaluated image (also those without GT things: their predictions are FPs).
            Any hashable ids.
        gt_annotations: ``{"image_id", "category_id", "iscrowd", "segmentation": RLE, "area"?}``, RLE
            being COCO *compressed* RLE ``{"size": [H, W], "counts": str | bytes}``
            (see :func:`instances_from_panoptic`); ``area`` defaults to the RLE's pixel count.
        predictions: ``{"image_id", "category_id", "score", "segmentation": RLE}`` or objects with
            ``image_id``, ``category_id``, ``score`` and an ``HxW`` bool ``mask``. Predictions of
            non-thing categories are ignored.
        categories: ``{category_id: {"isthing", "name"}}``; AP is over the thing categories.

    Returns:
        :class:`InstanceMetrics`.
    """
    from pycocotools import mask as mask_util
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    thing_ids = sorted(c for c, info in categories.items() if _isthing(info))
    names = {c: _name(categories[c], c) for c in thing_ids}
    index = {img: i + 1 for i, img in enumerate(dict.fromkeys(image_ids))}

    def image_index(img: Any, what: str) -> int:
        if img not in index:
            raise ValueError(f"{what} refers to image_id {img!r}, which is not in image_ids")
        return index[img]

    def _rle(seg: Any) -> dict[str, Any]:
        counts = seg["counts"]
        return {
            "size": list(seg["size"]),
            "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
        }

    sizes: dict[int, tuple[int, int]] = {}  # COCO wants each image's height and width

    def check_size(img: int, rle: Mapping[str, Any], what: str) -> None:
        size = (int(rle["size"][0]), int(rle["size"][1]))
        if sizes.setdefault(img, size) != size:
            image_id = next(k for k, v in index.items() if v == img)
            raise ValueError(f"{what} on image {image_id!r} has mask size {size}, another has {sizes[img]}")

    cats = [{"id": c, "name": names[c]} for c in thing_ids]
    gts = []
    for ann in gt_annotations:
        cat_id = int(ann["category_id"])
        if cat_id not in names:
            continue
        rle = _rle(ann["segmentation"])
        area = ann.get("area")
        img = image_index(ann["image_id"], "a GT annotation")
        check_size(img, rle, "a GT annotation")
        gts.append(
            {
                "id": len(gts) + 1,
                "image_id": img,
                "category_id": cat_id,
                "iscrowd": int(bool(ann.get("iscrowd", 0))),
                "segmentation": rle,
                "area": float(mask_util.area(rle) if area is None else area),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
            }
        )
    dts = []
    for pred in predictions:
        img = _field(pred, "image_id")
        p = _as_prediction(pred)
        if p["category_id"] not in categories:
            raise ValueError(f"instance prediction has unknown category_id {p['category_id']}")
        if p["category_id"] not in names:
            continue
        rle = _rle(p["segmentation"])
        img = image_index(img, "an instance prediction")
        check_size(img, rle, "an instance prediction")
        dts.append(
            {
                "id": len(dts) + 1,
                "image_id": img,
                "category_id": p["category_id"],
                "score": p["score"],
                "iscrowd": 0,
                "segmentation": rle,
                "area": float(mask_util.area(rle)),
                "bbox": [float(v) for v in mask_util.toBbox(rle)],
            }
        )

    images = [
        {"id": i, "height": sizes.get(i, (0, 0))[0], "width": sizes.get(i, (0, 0))[1]} for i in index.values()
    ]
    nan = math.nan
    if not images or not thing_ids:
        return InstanceMetrics(nan, nan, nan, nan, nan, nan, dict.fromkeys(thing_ids, nan), names)

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "categories": cats, "annotations": gts}
        coco_gt.createIndex()
        coco_dt = COCO()
        coco_dt.dataset = {"images": images, "categories": cats, "annotations": dts}
        coco_dt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="segm")
        coco_eval.params.catIds = thing_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()

    def _stat(v: float) -> float:
        return float(v) if v > -1 else nan

    stats = [_stat(v) for v in coco_eval.stats[:6]]
    precision = coco_eval.eval["precision"]  # T x R x K x A x M
    per_class = {}
    for k, cat_id in enumerate(coco_eval.params.catIds):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[int(cat_id)] = float(np.mean(p)) if p.size else nan
    return InstanceMetrics(*stats, per_class_ap=per_class, class_names=names)


# --------------------------------------------------------------------------------------------------
# Results and the streaming evaluator
# --------------------------------------------------------------------------------------------------


def _json_float(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _pct(v: float) -> str:
    return "  nan" if v is None or math.isnan(v) else f"{100 * v:5.1f}"


@dataclass(frozen=True)
class EvaluationResult:
    """Everything one evaluation run measured.

    Attributes:
        num_images: images added.
        overall, things, stuff: PQ / SQ / RQ / n of all, thing and stuff categories.
        per_class: ``{category_id: ClassPQ}`` for every category.
        semantic: semantic metrics, or None when not computed.
        instance: mask AP metrics, or None when not computed.
        details: JSON-compatible facts about how the numbers were obtained (sources, pairing of
            ground truth and predictions, images without a prediction, warnings); filled by
            :func:`pipeline.evaluate.run.run_evaluation`, empty when the evaluator is used directly.
    """

    num_images: int
    overall: PQMetrics
    things: PQMetrics
    stuff: PQMetrics
    per_class: dict[int, ClassPQ]
    semantic: SemanticMetrics | None = None
    instance: InstanceMetrics | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict; NaN becomes None, category ids become string keys.

        Layout::

            {"num_images": int,
             "panoptic": {"All"|"Things"|"Stuff": {"pq", "sq", "rq", "n"},
                          "per_class": {"<id>": {"name", "isthing", "pq", "sq", "rq", "tp", "fp", "fn"}}},
             "semantic": {"mIoU", "fwIoU", "pACC", "mACC", "per_class": {"<id>": {"name", "iou", "acc"}}} | None,
             "instance": {"AP", "AP50", "AP75", "APs", "APm", "APl", "per_class": {"<id>": {"name", "AP"}}} | None,
             "details": {...}}   only when ``details`` is not empty
        """

        def pqm(m: PQMetrics) -> dict[str, Any]:
            return {"pq": _json_float(m.pq), "sq": _json_float(m.sq), "rq": _json_float(m.rq), "n": m.n}

        out: dict[str, Any] = {
            "num_images": self.num_images,
            "panoptic": {
                "All": pqm(self.overall),
                "Things": pqm(self.things),
                "Stuff": pqm(self.stuff),
                "per_class": {
                    str(c): {
                        "name": r.name,
                        "isthing": r.isthing,
                        "pq": r.pq,
                        "sq": r.sq,
                        "rq": r.rq,
                        "tp": r.tp,
                        "fp": r.fp,
                        "fn": r.fn,
                        # False: no TP, FP or FN (absent on both sides); pq = 0 as panopticapi
                        # reports it, but not in the averages
                        "counted": r.counted,
                    }
                    for c, r in self.per_class.items()
                },
            },
            "semantic": None,
            "instance": None,
        }
        if self.semantic is not None:
            s = self.semantic
            out["semantic"] = {
                "mIoU": _json_float(s.miou),
                "fwIoU": _json_float(s.fwiou),
                "pACC": _json_float(s.pixel_accuracy),
                "mACC": _json_float(s.mean_accuracy),
                "per_class": {
                    str(c): {
                        "name": s.class_names.get(c, str(c)),
                        "iou": _json_float(s.per_class_iou[c]),
                        "acc": _json_float(s.per_class_accuracy[c]),
                    }
                    for c in s.per_class_iou
                },
            }
        if self.instance is not None:
            a = self.instance
            out["instance"] = {
                "AP": _json_float(a.ap),
                "AP50": _json_float(a.ap50),
                "AP75": _json_float(a.ap75),
                "APs": _json_float(a.aps),
                "APm": _json_float(a.apm),
                "APl": _json_float(a.apl),
                "per_class": {
                    str(c): {"name": a.class_names.get(c, str(c)), "AP": _json_float(v)}
                    for c, v in a.per_class_ap.items()
                },
            }
        if self.details:
            out["details"] = self.details
        return out

    def to_json(self, indent: int | None = 2) -> str:
        """:meth:`to_dict` as a strict JSON string (no NaN literals)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    def format_table(self, per_class: bool = True) -> str:
        """Human-readable table, values in percent (as the reference prints them)."""
        lines = [
            f"Panoptic quality over {self.num_images} images",
            f"{'':10s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'N':>5s}",
            "-" * 38,
        ]
        for label, m in (("All", self.overall), ("Things", self.things), ("Stuff", self.stuff)):
            lines.append(f"{label:10s}| {_pct(m.pq)}  {_pct(m.sq)}  {_pct(m.rq)} {m.n:5d}")
        if per_class:
            lines += [
                "",
                f"{'category':24s} {'kind':5s}| {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} "
                f"{'TP':>5s} {'FP':>5s} {'FN':>5s}",
                "-" * 68,
            ]
            for r in self.per_class.values():
                kind = "thing" if r.isthing else "stuff"
                mark = "" if r.counted else "  (absent)"
                lines.append(
                    f"{r.name[:24]:24s} {kind:5s}| {_pct(r.pq)}  {_pct(r.sq)}  {_pct(r.rq)} "
                    f"{r.tp:5d} {r.fp:5d} {r.fn:5d}{mark}"
                )
        if self.semantic is not None:
            s = self.semantic
            lines += [
                "",
                "Semantic segmentation",
                f"mIoU {_pct(s.miou)}  fwIoU {_pct(s.fwiou)}  pACC {_pct(s.pixel_accuracy)}  "
                f"mACC {_pct(s.mean_accuracy)}",
            ]
            if per_class:
                lines += [f"{'category':24s}| {'IoU':>5s}  {'Acc':>5s}", "-" * 40]
                for c, v in s.per_class_iou.items():
                    lines.append(
                        f"{s.class_names.get(c, str(c))[:24]:24s}| {_pct(v)}  {_pct(s.per_class_accuracy[c])}"
                    )
        if self.instance is not None:
            a = self.instance
            lines += [
                "",
                "Instance segmentation (mask AP)",
                f"AP {_pct(a.ap)}  AP50 {_pct(a.ap50)}  AP75 {_pct(a.ap75)}  "
                f"APs {_pct(a.aps)}  APm {_pct(a.apm)}  APl {_pct(a.apl)}",
            ]
            if per_class:
                lines += [f"{'category':24s}| {'AP':>5s}", "-" * 33]
                for c, v in a.per_class_ap.items():
                    lines.append(f"{a.class_names.get(c, str(c))[:24]:24s}| {_pct(v)}")
        return "\n".join(lines)


class PanopticEvaluator:
    """Streaming evaluation over a dataset: PQ, optionally semantic metrics and mask AP.

    Feed one image at a time with :meth:`add` (predictions from any source: the predictor, Parquet
    rows decoded to an id map + segments, a COCO prediction folder), then call :meth:`result`.
    Only the counts are kept (plus, when ``instance=True``, the RLE of GT things and predictions,
    which pycocotools needs all at once).

    Args:
        categories: ``{category_id: {"isthing": bool | 0/1, "name": str}}``; every GT and predicted
            category must be here.
        semantic: also accumulate semantic metrics (GT and prediction derived from the panoptic
            maps unless ``pred_semantic`` is given to :meth:`add`).
        instance: also compute mask AP (then :meth:`add` needs ``pred_instances``).
        ignore_value: semantic ignore value; must not be a category id.
    """

    def __init__(
        self,
        categories: Mapping[int, Any],
        *,
        semantic: bool = True,
        instance: bool = False,
        ignore_value: int = 255,
    ) -> None:
        if not categories:
            raise ValueError("categories is empty")
        self.categories = {int(k): v for k, v in categories.items()}
        self.pq_stat = PQStat()
        self.ignore_value = ignore_value
        self.semantic = (
            SemanticEvaluator(
                list(self.categories),
                ignore_value=ignore_value,
                class_names={c: _name(i, c) for c, i in self.categories.items()},
            )
            if semantic
            else None
        )
        self.instance = instance
        self._image_ids: list[Any] = []
        self._gt_instances: list[dict[str, Any]] = []
        self._pred_instances: list[dict[str, Any]] = []
        self.num_images = 0

    def add(
        self,
        gt_id_map: np.ndarray,
        gt_segments: Iterable[Any],
        pred_id_map: np.ndarray,
        pred_segments: Iterable[Any],
        *,
        image_id: Any = None,
        pred_semantic: np.ndarray | None = None,
        pred_instances: Iterable[Any] | None = None,
    ) -> PQStat:
        """Add one image; returns its own :class:`PQStat`.

        Args:
            gt_id_map, gt_segments, pred_id_map, pred_segments: see :func:`pq_compute_single_image`.
            image_id: id used in messages and for AP (defaults to the running image index).
            pred_semantic: optional ``HxW`` category ids (``ignore_value`` = unlabeled) for the
                semantic metrics, e.g. ``PanopticResult.semantic_seg``; defaults to the panoptic
                prediction's categories.
            pred_instances: required when ``instance=True``: mappings ``{"category_id", "score",
                "segmentation": RLE}`` or objects with ``category_id``, ``score``, ``mask`` (HxW bool),
                e.g. ``odise_model.Instance``.
        """
        if image_id is None:
            image_id = self.num_images
        gt_segments, pred_segments = list(gt_segments), list(pred_segments)
        stat = pq_compute_single_image(
            gt_id_map, gt_segments, pred_id_map, pred_segments, self.categories, image_id=image_id
        )
        if self.semantic is not None:
            gt_sem = panoptic_to_semantic(gt_id_map, gt_segments, ignore_value=self.ignore_value)
            if pred_semantic is None:
                pred_semantic = panoptic_to_semantic(
                    pred_id_map, pred_segments, ignore_value=self.ignore_value
                )
            self.semantic.add(gt_sem, pred_semantic)
        if self.instance:
            if pred_instances is None:
                raise ValueError(f"{_where(image_id)}: pred_instances is required when instance=True")
            self._image_ids.append(image_id)
            self._gt_instances += instances_from_panoptic(
                gt_id_map, gt_segments, self.categories, image_id=image_id
            )
            for p in pred_instances:
                self._pred_instances.append({"image_id": image_id, **_as_prediction(p)})
        self.pq_stat += stat
        self.num_images += 1
        return stat

    def result(self) -> EvaluationResult:
        """Metrics over everything added so far."""
        overall, per_class = self.pq_stat.pq_average(self.categories, None)
        things, _ = self.pq_stat.pq_average(self.categories, True)
        stuff, _ = self.pq_stat.pq_average(self.categories, False)
        instance = None
        if self.instance:
            instance = evaluate_instance_ap(
                self._image_ids, self._gt_instances, self._pred_instances, self.categories
            )
        return EvaluationResult(
            num_images=self.num_images,
            overall=overall,
            things=things,
            stuff=stuff,
            per_class=per_class,
            semantic=self.semantic.result() if self.semantic is not None else None,
            instance=instance,
        )
