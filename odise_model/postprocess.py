"""Mask2Former inference: class scores + mask logits of Q queries -> panoptic, semantic and instance outputs.

Pure functions of tensors, one image at a time, exactly as ``MaskFormer.{panoptic,semantic,instance}_inference``.
``mask_cls`` holds ``K+1`` class scores per query whose softmax gives probabilities (the last entry is
"no object"); ``mask_pred`` holds ``QxHxW`` mask logits already at the output resolution.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["resize_mask_logits", "panoptic_inference", "semantic_inference", "instance_inference", "PanopticSegment"]


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


def instance_inference(
    mask_cls: torch.Tensor,
    mask_pred: torch.Tensor,
    isthing: torch.Tensor,
    *,
    topk: int,
    things_only: bool,
) -> list[tuple[int, float, torch.Tensor]]:
    """Top-k (query, class) pairs as instances: ``[(class_index, score, HxW bool mask)]`` by descending score.

    ``score`` = class probability x mean mask probability inside the binary mask (``logit > 0``);
    with ``things_only`` (panoptic on) only thing classes are kept, as the official code does.
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
    if queries.numel() == 0:
        return []
    logits = mask_pred[queries].float()
    binary = logits > 0
    mask_scores = (logits.sigmoid().flatten(1) * binary.flatten(1)).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    final = top_scores * mask_scores
    order = torch.argsort(final, descending=True, stable=True)
    return [(int(labels[i]), float(final[i]), binary[i]) for i in order.tolist()]
