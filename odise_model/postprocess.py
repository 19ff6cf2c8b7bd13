"""Mask2Former inference: class scores + mask logits of Q queries -> panoptic, semantic and instance outputs.

Pure functions of tensors, one image at a time, exactly as ``MaskFormer.{panoptic,semantic,instance}_inference``.
``mask_cls`` holds ``K+1`` class scores per query whose softmax gives probabilities (the last entry is
"no object"); ``mask_pred`` holds ``QxHxW`` mask logits already at the output resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "resize_mask_logits",
    "panoptic_inference",
    "panoptic_inference_chunked",
    "semantic_inference",
    "semantic_argmax",
    "semantic_argmax_chunked",
    "instance_inference",
    "instance_inference_chunked",
    "instance_masks_chunked",
    "mask_boxes",
    "pack_masks",
    "PanopticSegment",
]

#: ``masks_for(query_indices) -> n x H x W`` mask logits at the output size for those queries (the chunked
#: functions call it on a few queries at a time, so the full ``Q x H x W`` tensor never exists).
MasksFor = Callable[[torch.Tensor], torch.Tensor]


def resize_mask_logits(
    mask_logits: torch.Tensor,
    padded_size: tuple[int, int],
    image_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """Official mask resizing: ``QxhxW`` (stride 4) -> bilinear to the padded input size -> crop to the
    resized image -> bilinear to the original image size. Returns ``QxHxW`` logits at ``output_size``.
    """
    masks = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]


@dataclass
class PanopticSegment:
    """A segment of :func:`panoptic_inference`: ``class_index`` in [0, K), ``score`` of its first query,
    ``query`` the index (in [0, Q)) of that query."""

    id: int
    class_index: int
    isthing: bool
    score: float
    query: int = -1


def panoptic_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    isthing: torch.Tensor,
    *,
    object_mask_threshold: float,
    overlap_threshold: float,
) -> tuple[torch.Tensor, list[PanopticSegment]]:
    """Panoptic segmentation of one image.

    Keeps queries whose best class is not "no object" and whose probability exceeds
    ``object_mask_threshold``; assigns each pixel to the kept query maximising ``score * sigmoid(mask)``;
    a query's segment is its assigned pixels with ``sigmoid >= 0.5``, dropped when it keeps less than
    ``overlap_threshold`` of its own mask; stuff segments of the same class are merged into one id.

    Args:
        mask_cls: ``Qx(K+1)`` class scores (softmax-able).
        mask_pred: ``QxHxW`` mask logits.
        isthing: ``K`` bool.
    Returns:
        ``(HxW int32 ids, 0 = unlabeled; segments with ids 1..n)``.
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    masks = mask_pred.float().sigmoid()
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    cur_scores, cur_classes, cur_masks = scores[keep], labels[keep], masks[keep]
    height, width = masks.shape[-2:]
    panoptic = torch.zeros((height, width), dtype=torch.int32, device=masks.device)
    segments: list[PanopticSegment] = []
    if cur_masks.shape[0] == 0:
        return panoptic, segments
    mask_ids = (cur_scores.view(-1, 1, 1) * cur_masks).argmax(0)
    queries = keep.nonzero().flatten().tolist()
    sigmoids = ((k, cur_masks[k]) for k in range(cur_classes.shape[0]))
    _assign_segments(
        panoptic, segments, sigmoids, mask_ids, cur_scores, cur_classes, queries, isthing, overlap_threshold
    )
    return panoptic, segments


def _assign_segments(
    panoptic: torch.Tensor,
    segments: list[PanopticSegment],
    sigmoids: Iterator[tuple[int, torch.Tensor]],
    mask_ids: torch.Tensor,
    cur_scores: torch.Tensor,
    cur_classes: torch.Tensor,
    queries: list[int],
    isthing: torch.Tensor,
    overlap_threshold: float,
) -> None:
    """The segment loop of :func:`panoptic_inference` over ``(k, HxW mask probability of kept query k)`` in
    order; fills ``panoptic`` and ``segments`` in place (shared by the chunked variant)."""
    isthing_cpu = isthing.cpu()
    stuff_ids: dict[int, int] = {}
    current_id = 0
    for k, cur_mask in sigmoids:
        pred_class = int(cur_classes[k])
        thing = bool(isthing_cpu[pred_class])
        assigned = mask_ids == k
        mask_area = int(assigned.sum())
        original_area = int((cur_mask >= 0.5).sum())
        mask = assigned & (cur_mask >= 0.5)
        if mask_area > 0 and original_area > 0 and int(mask.sum()) > 0:
            if mask_area / original_area < overlap_threshold:
                continue
            if not thing:
                if pred_class in stuff_ids:
                    panoptic[mask] = stuff_ids[pred_class]
                    continue
                stuff_ids[pred_class] = current_id + 1
            current_id += 1
            panoptic[mask] = current_id
            segments.append(PanopticSegment(current_id, pred_class, thing, float(cur_scores[k]), queries[k]))


def _chunks(indices: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, int(indices.numel()), max(1, chunk)):
        yield start, indices[start : start + max(1, chunk)]


def panoptic_inference_chunked(
    mask_cls: torch.Tensor,
    masks_for: MasksFor,
    output_size: tuple[int, int],
    isthing: torch.Tensor,
    *,
    object_mask_threshold: float,
    overlap_threshold: float,
    chunk: int = 8,
) -> tuple[torch.Tensor, list[PanopticSegment]]:
    """:func:`panoptic_inference` holding at most ``chunk`` full-size masks at a time (out-of-memory fallback).

    Same outputs, bit for bit: the per-pixel argmax over kept queries is a running maximum over chunks
    (ties keep the earlier query, as ``argmax`` does), and the segment loop recomputes each chunk's mask
    probabilities in a second pass. ``masks_for`` gives mask logits at ``output_size`` for query indices.
    """
    num_classes = mask_cls.shape[-1] - 1
    scores, labels = F.softmax(mask_cls.float(), dim=-1).max(-1)
    keep = labels.ne(num_classes) & (scores > object_mask_threshold)
    kept = keep.nonzero().flatten()
    cur_scores, cur_classes = scores[keep], labels[keep]
    height, width = output_size
    panoptic = torch.zeros((height, width), dtype=torch.int32, device=mask_cls.device)
    segments: list[PanopticSegment] = []
    if kept.numel() == 0:
        return panoptic, segments
    # 1. running argmax of score * probability over the kept queries
    best_val: torch.Tensor | None = None
    mask_ids = torch.zeros((height, width), dtype=torch.long, device=mask_cls.device)
    for start, idx in _chunks(kept, chunk):
        probs = masks_for(idx).float().sigmoid_()
        vals, args = probs.mul_(cur_scores[start : start + len(idx)].view(-1, 1, 1)).max(0)
        if best_val is None:
            best_val, mask_ids = vals, args
        else:
            better = vals > best_val
            best_val = torch.where(better, vals, best_val)
            mask_ids = torch.where(better, args + start, mask_ids)
        del probs, vals, args

    # 2. segments, in query order, recomputing each chunk's probabilities
    def sigmoids() -> Iterator[tuple[int, torch.Tensor]]:
        for start, idx in _chunks(kept, chunk):
            probs = masks_for(idx).float().sigmoid()
            for j in range(len(idx)):
                yield start + j, probs[j]

    queries = kept.tolist()
    _assign_segments(
        panoptic, segments, sigmoids(), mask_ids, cur_scores, cur_classes, queries, isthing, overlap_threshold
    )
    return panoptic, segments


def semantic_inference(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """Per-class scores ``KxHxW`` = sum over queries of class probability x mask probability."""
    probs = F.softmax(mask_cls.float(), dim=-1)[..., :-1]
    return torch.einsum("qc,qhw->chw", probs, mask_pred.float().sigmoid())


def semantic_argmax(mask_cls: torch.Tensor, mask_pred: torch.Tensor) -> torch.Tensor:
    """``HxW`` class index of :func:`semantic_inference`'s maximum, computed pixel-major (faster argmax)."""
    probs = F.softmax(mask_cls.float(), dim=-1)[..., :-1]
    h, w = mask_pred.shape[-2:]
    return (mask_pred.float().sigmoid().flatten(1).t() @ probs).argmax(-1).view(h, w)


def semantic_argmax_chunked(
    mask_cls: torch.Tensor, masks_for: MasksFor, output_size: tuple[int, int], *, chunk: int = 8
) -> torch.Tensor:
    """:func:`semantic_argmax` in bands of pixels, holding about ``4 * chunk`` full-size masks' worth of
    probabilities at a time (out-of-memory fallback; the masks are recomputed for every band, so the resize
    work grows by ``Q / (4 * chunk)``).

    Same result as the unchunked matrix product on the same device (verified bit for bit on CPU; row
    bands of one matrix product change no reduction order there).
    """
    probs = F.softmax(mask_cls.float(), dim=-1)[..., :-1]
    num_queries = int(mask_cls.shape[0])
    h, w = output_size
    band = max(1, (h * w * 4 * max(1, chunk)) // max(1, num_queries))
    rows = max(1, band // 4)  # pixels per matrix product: bounds the ``pixels x K`` scores as well
    everything = torch.arange(num_queries, device=mask_cls.device)
    out = torch.empty(h * w, dtype=torch.long, device=mask_cls.device)
    for p0 in range(0, h * w, band):
        p1 = min(h * w, p0 + band)
        sig = torch.empty((num_queries, p1 - p0), dtype=torch.float32, device=mask_cls.device)
        for start, idx in _chunks(everything, chunk):
            # the band's sigmoid only (elementwise: the same values); the full-size logits are freed at once
            sig[start : start + len(idx)] = masks_for(idx).flatten(1)[:, p0:p1].float().sigmoid()
        for r0 in range(0, p1 - p0, rows):
            out[p0 + r0 : p0 + min(p1 - p0, r0 + rows)] = (sig[:, r0 : r0 + rows].t() @ probs).argmax(-1)
        del sig
    return out.view(h, w)


def _top_class_queries(
    mask_cls: torch.Tensor, isthing: torch.Tensor, *, topk: int, things_only: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The ``topk`` best (query, class) pairs over all queries (Mask2Former's instance selection), things only
    if asked: ``(score, class_index, query)``, scores descending."""
    num_classes = mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    k = min(topk, scores.numel())
    top_scores, top_idx = scores.flatten().topk(k, sorted=True)
    labels = top_idx % num_classes
    queries = torch.div(top_idx, num_classes, rounding_mode="floor")
    if things_only:
        keep = isthing.to(labels.device)[labels]
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]
    return top_scores, labels, queries


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    isthing: torch.Tensor,
    *,
    topk: int,
    things_only: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k (query, class) pairs as instances, sorted by descending score.

    ``score`` = class probability x mean mask probability inside the binary mask (``logit > 0``);
    with ``things_only`` (panoptic on) only thing classes are kept, as the official code does. An instance's
    mask is ``mask_pred[query] > 0``; several instances often share a query (top-k runs over query x class
    pairs), so mask statistics are computed once per distinct query.

    Returns:
        ``(class_index N long, score N float, query N long)`` on ``mask_pred``'s device.
    """
    top_scores, labels, queries = _top_class_queries(mask_cls, isthing, topk=topk, things_only=things_only)
    unique, inverse = torch.unique(queries, return_inverse=True)
    logits = mask_pred[unique].float().flatten(1)
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).sum(1) / (binary.sum(1) + 1e-6)
    final = top_scores * mask_scores[inverse]
    order = torch.argsort(final, descending=True, stable=True)
    return labels[order], final[order], queries[order]


def instance_inference_chunked(
    mask_cls: torch.Tensor,
    masks_for: MasksFor,
    isthing: torch.Tensor,
    *,
    topk: int,
    things_only: bool,
    chunk: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`instance_inference` computing the mask statistics ``chunk`` distinct queries at a time
    (out-of-memory fallback). Same classes and queries; the scores average each mask over all its pixels, and
    torch may split that sum differently (threads, GPU blocks) for a different number of rows, so they can
    differ in the last bits (relative 1e-7), which can only reorder instances whose scores tie to that
    precision."""
    top_scores, labels, queries = _top_class_queries(mask_cls, isthing, topk=topk, things_only=things_only)
    unique, inverse = torch.unique(queries, return_inverse=True)
    parts = []
    for _, idx in _chunks(unique, chunk):
        logits = masks_for(idx).float().flatten(1)
        binary = logits > 0
        parts.append((logits.sigmoid() * binary).sum(1) / (binary.sum(1) + 1e-6))
        del logits, binary
    mask_scores = torch.cat(parts) if parts else top_scores.new_zeros(0)
    final = top_scores * mask_scores[inverse]
    order = torch.argsort(final, descending=True, stable=True)
    return labels[order], final[order], queries[order]


def instance_masks_chunked(
    masks_for: MasksFor, queries: torch.Tensor, *, chunk: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """Boxes ``Nx4`` (:func:`mask_boxes`) and bit-packed masks (:func:`pack_masks`) of ``masks_for(q) > 0``
    for distinct queries ``N``, ``chunk`` at a time."""
    boxes, packed = [], []
    for _, idx in _chunks(queries, chunk):
        binary = masks_for(idx) > 0
        boxes.append(mask_boxes(binary))
        packed.append(pack_masks(binary))
        del binary
    if not boxes:
        return torch.zeros((0, 4), dtype=torch.long, device=queries.device), torch.zeros(
            (0, 0), dtype=torch.uint8
        )
    return torch.cat(boxes), torch.cat(packed)


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Tight COCO boxes ``Nx4`` (x, y, w, h; int64) of ``NxHxW`` bool masks; zeros for empty masks."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.long, device=masks.device)
    rows, cols = masks.any(2), masks.any(1)
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    empty = ~rows.any(1)
    boxes = torch.stack([x0, y0, x1 - x0 + 1, y1 - y0 + 1], 1)
    return torch.where(empty[:, None], torch.zeros_like(boxes), boxes)


def pack_masks(masks: torch.Tensor) -> torch.Tensor:
    """``NxHxW`` bool -> ``N x ceil(H*W/8)`` uint8, bit order of ``numpy.packbits`` (computed on the device)."""
    n, h, w = masks.shape
    flat = masks.reshape(n, h * w)  # explicit width: -1 is ambiguous when there are no masks (n == 0)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=masks.device)
    return (flat.view(n, flat.shape[1] // 8, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
