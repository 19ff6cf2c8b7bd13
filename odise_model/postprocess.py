"""Mask2Former inference: class scores + mask logits of Q queries -> panoptic, semantic and instance outputs.

Pure functions of tensors, one image at a time, exactly as ``MaskFormer.{panoptic,semantic,instance}_inference``.
``mask_cls`` holds ``K+1`` class scores per query whose softmax gives probabilities (the last entry is
"no object"); ``mask_pred`` holds ``QxHxW`` mask logits already at the output resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "resize_mask_logits",
    "panoptic_inference",
    "semantic_inference",
    "semantic_argmax",
    "instance_inference",
    "mask_boxes",
    "pack_masks",
    "PanopticSegment",
]


def resize_mask_logits(
    mask_logits: torch.Tensor, padded_size: tuple[int, int], image_size: tuple[int, int], output_size: tuple[int, int]
) -> torch.Tensor:
    """Official mask resizing: ``QxhxW`` (stride 4) -> bilinear to the padded input size -> crop to the
    resized image -> bilinear to the original image size. Returns ``QxHxW`` logits at ``output_size``.
    """
    masks = F.interpolate(mask_logits[None], size=padded_size, mode="bilinear", align_corners=False)
    masks = masks[:, :, : image_size[0], : image_size[1]]
    return F.interpolate(masks, size=output_size, mode="bilinear", align_corners=False)[0]


@dataclass
class PanopticSegment:
    """A segment of :func:`panoptic_inference`: ``class_index`` in [0, K), ``score`` of its first query."""

    id: int
    class_index: int
    isthing: bool
    score: float


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
    isthing_cpu = isthing.cpu()
    stuff_ids: dict[int, int] = {}
    current_id = 0
    for k in range(cur_classes.shape[0]):
        pred_class = int(cur_classes[k])
        thing = bool(isthing_cpu[pred_class])
        assigned = mask_ids == k
        mask_area = int(assigned.sum())
        original_area = int((cur_masks[k] >= 0.5).sum())
        mask = assigned & (cur_masks[k] >= 0.5)
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
            segments.append(PanopticSegment(current_id, pred_class, thing, float(cur_scores[k])))
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
    num_classes = mask_cls.shape[-1] - 1
    scores = F.softmax(mask_cls.float(), dim=-1)[:, :-1]
    k = min(topk, scores.numel())
    top_scores, top_idx = scores.flatten().topk(k, sorted=True)
    labels = top_idx % num_classes
    queries = torch.div(top_idx, num_classes, rounding_mode="floor")
    if things_only:
        keep = isthing.to(labels.device)[labels]
        top_scores, labels, queries = top_scores[keep], labels[keep], queries[keep]
    unique, inverse = torch.unique(queries, return_inverse=True)
    logits = mask_pred[unique].float().flatten(1)
    binary = logits > 0
    mask_scores = (logits.sigmoid() * binary).sum(1) / (binary.sum(1) + 1e-6)
    final = top_scores * mask_scores[inverse]
    order = torch.argsort(final, descending=True, stable=True)
    return labels[order], final[order], queries[order]


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
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    pad = (-flat.shape[1]) % 8
    if pad:
        flat = F.pad(flat, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32, device=masks.device)
    return (flat.view(n, -1, 8).to(torch.int32) * weights).sum(-1).to(torch.uint8)
