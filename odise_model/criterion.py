"""Training losses: Mask2Former's set criterion and ODISE's caption-grounding loss.

:class:`SetCriterion` (Mask2Former ``SetCriterion``), for every decoder output (final + each aux output,
deep supervision with the same weights):

1. Hungarian matching (:class:`odise_model.matcher.HungarianMatcher`) of queries to target segments;
2. ``loss_ce``: cross-entropy over ``K+1`` classes (no-object last) of every query, matched queries
   against their target's class and the others against no-object, weighted by ``empty_weight``
   (1 for real classes, ``eos_coef`` = 0.1 for no-object) as ``F.cross_entropy(weight=...)``, i.e. a
   weighted mean;
3. ``loss_mask`` / ``loss_dice``: sigmoid BCE and dice loss of each matched (prediction, target) pair on
   ``num_points`` points per pair chosen by uncertainty: ``oversample_ratio * num_points`` uniform
   candidates, the ``importance_sample_ratio`` fraction with the highest uncertainty ``-|logit|`` of the
   prediction kept, the rest uniform (PointRend's ``get_uncertain_point_coords_with_randomness``);
   both summed over pairs and divided by ``num_masks``, the number of target segments averaged over
   workers (all-reduced when ``torch.distributed`` is initialised), at least 1.

Losses come back already multiplied by their weights (class 2, mask 5, dice 5 officially), named
``loss_ce``, ``loss_mask``, ``loss_dice`` for the final output and ``loss_ce_{i}`` ... for aux output ``i``.

:class:`MaskGroundingCriterion` (ODISE ``MaskGroundingCriterion``, caption supervision), see
:func:`grounding_loss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .matcher import HungarianMatcher, point_sample, random_points
from .transformer_decoder import MaskGeneratorOutput

__all__ = [
    "sigmoid_ce_loss",
    "dice_loss",
    "uncertain_point_coords",
    "SetCriterion",
    "gather_with_grad",
    "grounding_loss",
    "MaskGroundingCriterion",
]


def _dist_ready() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def sigmoid_ce_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """``sum_n mean_p BCE(inputs[n, p], targets[n, p]) / num_masks``; ``inputs`` logits ``NxP``, targets ``NxP``."""
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def dice_loss(inputs: torch.Tensor, targets: torch.Tensor, num_masks: float) -> torch.Tensor:
    """``sum_n (1 - (2 sum_p s*t + 1) / (sum_p s + sum_p t + 1)) / num_masks`` with ``s = sigmoid(inputs)``."""
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    return (1 - (numerator + 1) / (denominator + 1)).sum() / num_masks


def uncertain_point_coords(
    mask_logits: torch.Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_sample_ratio: float,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Points where each mask is most uncertain, plus uniform ones (PointRend training sampling).

    Args:
        mask_logits: ``Nx1xHxW`` mask logits.
        num_points: points per mask.
        oversample_ratio: ``int(num_points * oversample_ratio)`` uniform candidates are scored.
        importance_sample_ratio: fraction of ``num_points`` taken as the most uncertain candidates
            (uncertainty ``-|logit|``); the rest are fresh uniform points.
        generator: RNG (None: the global RNG of the logits' device).
    Returns:
        ``NxPx2`` points in ``[0, 1]`` (``(x, y)``), uncertain points first.
    """
    num_masks = mask_logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    coords = random_points((num_masks, num_sampled, 2), device=mask_logits.device, generator=generator)
    uncertainty = -point_sample(mask_logits.float(), coords).abs()  # N x 1 x S
    num_uncertain = int(importance_sample_ratio * num_points)
    num_random = num_points - num_uncertain
    idx = torch.topk(uncertainty[:, 0], k=num_uncertain, dim=1).indices  # N x U
    chosen = torch.gather(coords, 1, idx[..., None].expand(-1, -1, 2))
    if num_random > 0:
        extra = random_points((num_masks, num_random, 2), device=mask_logits.device, generator=generator)
        chosen = torch.cat([chosen, extra], dim=1)
    return chosen


class SetCriterion(nn.Module):
    """Mask2Former's matching-based losses with deep supervision.

    Args:
        num_classes: K, real classes (the no-object class is index K). 1 for the caption variant's binary
            foreground / no-object head.
        matcher: the Hungarian matcher (official costs 2 / 5 / 5 on 12,544 points).
        eos_coef: cross-entropy weight of the no-object class (official 0.1).
        class_weight, mask_weight, dice_weight: loss weights (official 2 / 5 / 5).
        num_points, oversample_ratio, importance_sample_ratio: point sampling of the mask losses
            (official 12,544 / 3.0 / 0.75).
    Buffers:
        empty_weight: ``K+1`` cross-entropy class weights, ``eos_coef`` last.
    """

    def __init__(
        self,
        *,
        num_classes: int,
        matcher: HungarianMatcher,
        eos_coef: float = 0.1,
        class_weight: float = 2.0,
        mask_weight: float = 5.0,
        dice_weight: float = 5.0,
        num_points: int = 12544,
        oversample_ratio: float = 3.0,
        importance_sample_ratio: float = 0.75,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.eos_coef = eos_coef
        self.weights = {"loss_ce": class_weight, "loss_mask": mask_weight, "loss_dice": dice_weight}
        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        self.register_buffer("empty_weight", empty_weight, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, weights={self.weights}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio}"
        )

    # --- normalisation ---------------------------------------------------------------------------------
    @staticmethod
    def num_masks(targets: Sequence[dict[str, torch.Tensor]], device: torch.device) -> float:
        """Target segments of the batch, averaged over workers (all-reduce), at least 1."""
        count = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=device)
        world = 1
        if _dist_ready():
            torch.distributed.all_reduce(count)
            world = torch.distributed.get_world_size()
        return max(float(count.item()) / world, 1.0)

    # --- single losses -----------------------------------------------------------------------------------
    def loss_labels(
        self,
        pred_logits: torch.Tensor,
        targets: Sequence[dict],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Weighted cross-entropy ``BxQx(K+1)`` logits vs matched classes (unmatched -> no-object K)."""
        logits = pred_logits.float()
        target_classes = torch.full(
            logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device
        )
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(logits.device)] = targets[b]["labels"].to(logits.device)[
                tgt.to(logits.device)
            ]
        return F.cross_entropy(logits.transpose(1, 2), target_classes, self.empty_weight.to(logits.device))

    def loss_masks(
        self,
        pred_masks: torch.Tensor,
        targets: Sequence[dict],
        indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
        num_masks: float,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(BCE, dice)`` of matched pairs on uncertainty-sampled points, each divided by ``num_masks``.

        ``pred_masks``: ``BxQxhxw`` logits; ``targets[b]["masks"]``: ``TxHxW`` covering the same padded image.
        """
        device = pred_masks.device
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)]).to(device)
        src_idx = torch.cat([src for src, _ in indices]).to(device)
        if src_idx.numel() == 0:  # no target in the batch: zero losses that keep the graph connected
            zero = pred_masks.float().sum() * 0.0
            return zero, zero
        src = pred_masks[batch_idx, src_idx][:, None].float()  # N x 1 x h x w
        tgt = _padded_target_masks(targets, indices, device)  # N x 1 x H x W (batch-max size, zero padded)
        with torch.no_grad():
            coords = uncertain_point_coords(
                src, self.num_points, self.oversample_ratio, self.importance_sample_ratio, generator=generator
            )
            labels = point_sample(tgt, coords)[:, 0]  # N x P
        logits = point_sample(src, coords)[:, 0]  # N x P
        return sigmoid_ce_loss(logits, labels, num_masks), dice_loss(logits, labels, num_masks)

    # --- everything --------------------------------------------------------------------------------------
    def single_output(
        self,
        outputs: MaskGeneratorOutput,
        targets: Sequence[dict],
        num_masks: float,
        *,
        generator: torch.Generator | None,
    ) -> dict[str, torch.Tensor]:
        """Unweighted ``loss_ce``, ``loss_mask``, ``loss_dice`` of one decoder output (``pred_logits`` set)."""
        if outputs.pred_logits is None:
            raise ValueError("the set criterion needs class logits: outputs.pred_logits is None")
        indices = self.matcher(outputs.pred_logits, outputs.pred_masks, targets, generator=generator)
        loss_mask, loss_dice = self.loss_masks(
            outputs.pred_masks, targets, indices, num_masks, generator=generator
        )
        return {
            "loss_ce": self.loss_labels(outputs.pred_logits, targets, indices),
            "loss_mask": loss_mask,
            "loss_dice": loss_dice,
        }

    def forward(
        self,
        outputs: MaskGeneratorOutput,
        targets: Sequence[dict[str, torch.Tensor]],
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Weighted losses of the final output and of every aux output.

        Args:
            outputs: the mask generator's output with ``pred_logits`` (``BxQx(K+1)``) set, ``pred_masks``
                (``BxQxhxw``) and ``aux_outputs`` (the same for earlier layers, ``pred_logits`` set too).
            targets: per image ``{"labels": T long in [0, K), "masks": TxHxW}``.
            generator: RNG of the sampled points.
        Returns:
            ``{"loss_ce": ..., "loss_mask": ..., "loss_dice": ..., "loss_ce_0": ..., ...}`` (weighted, float32).
        """
        with torch.autocast(device_type=outputs.pred_masks.device.type, enabled=False):
            num_masks = self.num_masks(targets, outputs.pred_masks.device)
            losses = {}
            for name, value in self.single_output(outputs, targets, num_masks, generator=generator).items():
                losses[name] = value * self.weights[name]
            for i, aux in enumerate(outputs.aux_outputs):
                for name, value in self.single_output(aux, targets, num_masks, generator=generator).items():
                    losses[f"{name}_{i}"] = value * self.weights[name]
            return losses


def _padded_target_masks(
    targets: Sequence[dict], indices: Sequence[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> torch.Tensor:
    """Matched target masks of all images, in match order, zero-padded to the largest ``HxW``: ``Nx1xHxW``."""
    height = max(int(t["masks"].shape[-2]) for t in targets)
    width = max(int(t["masks"].shape[-1]) for t in targets)
    out = []
    for target, (_, tgt) in zip(targets, indices):
        masks = target["masks"][tgt.to(target["masks"].device)].to(device, torch.float32)
        if masks.shape[-2:] != (height, width):
            masks = F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2]))
        out.append(masks)
    return torch.cat(out)[:, None]


# --------------------------------------------------------------------------------------------------------
# Caption grounding
# --------------------------------------------------------------------------------------------------------
def gather_with_grad(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``tensor`` (``BxD...``) over all workers along dim 0, keeping gradients.

    Uses ``torch.distributed.nn.functional.all_gather`` (its backward sends each worker the gradient of
    its own slice, summed over workers, like the official ``diffdist``). Batch sizes may differ per worker
    (padded to the largest, then trimmed). Returns ``(gathered, offset of this worker's rows)``; without an
    initialised process group (or with one worker) ``(tensor, 0)``.
    """
    if not _dist_ready():
        return tensor, 0
    from torch.distributed.nn.functional import all_gather

    world = torch.distributed.get_world_size()
    rank = torch.distributed.get_rank()
    size = torch.tensor([tensor.shape[0]], device=tensor.device, dtype=torch.long)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    torch.distributed.all_gather(sizes, size)
    sizes_int = [int(s.item()) for s in sizes]
    padded = tensor
    if tensor.shape[0] < max(sizes_int):
        pad = tensor.new_zeros((max(sizes_int) - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    parts = all_gather(padded)
    gathered = torch.cat([part[:n] for part, n in zip(parts, sizes_int)])
    return gathered, sum(sizes_int[:rank])


def _image_text_similarity(
    mask_embed: torch.Tensor, word_embed: torch.Tensor, word_valid: torch.Tensor, scale
) -> torch.Tensor:
    """``g(image i, caption j)`` for all pairs: ``IxJ``.

    ``s[i, q, j, k] = scale * cos(mask_embed[i, q], word_embed[j, k])``;
    ``g(i, j) = mean over valid words k of caption j of sum_q softmax_q(s[i, :, j, k])[q] * s[i, q, j, k]``.
    ``mask_embed`` ``IxQxC`` and ``word_embed`` ``JxKxC`` are L2-normalised already; ``word_valid`` ``JxK``.
    """
    sim = torch.einsum("iqc,jkc->iqjk", mask_embed, word_embed) * scale
    per_word = (sim.softmax(dim=1) * sim).sum(dim=1)  # I x J x K
    valid = word_valid.to(per_word.dtype)
    return (per_word * valid).sum(-1) / valid.sum(-1).clamp(min=1)


def grounding_loss(
    mask_embed: torch.Tensor,
    word_embed: torch.Tensor,
    word_valid: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    gather: bool = True,
) -> torch.Tensor:
    """ODISE's caption-grounding loss of one decoder output (``MaskGroundingCriterion.get_loss``).

    Image-caption similarity ``g(i, j)`` (see :func:`_image_text_similarity`) between this worker's images and
    the captions of all workers, and between all workers' images and this worker's captions (gathered with
    gradients when ``gather`` and distributed), then the symmetric contrastive loss
    ``0.5 * (L_text->image + L_image->text)`` with the matching pair as the positive:

    * ``L_text->image = mean_j valid_j * CE(g(:, j) over all images, j)`` (a plain mean over the local batch,
      invalid captions contribute 0, as the official ``(loss * valid_mask).mean()``);
    * ``L_image->text = sum_i valid_i CE(g(i, :) over all captions, i) / sum_i valid_i`` (the official
      ``F.cross_entropy(weight=global_valid_mask)``); 0 when no local caption is valid (the official code
      falls back to the unweighted loss there, i.e. trains on images without words; we do not).

    A caption is valid when it has at least one valid word; captions without words still appear as
    negatives of other images, as in the official code.

    Args:
        mask_embed: ``BxQxC`` mask embeddings (not normalised).
        word_embed: ``BxKxC`` word embeddings after ``text_proj`` (not normalised).
        word_valid: ``BxK`` bool.
        logit_scale: 0-dim temperature (already ``min(exp(.), 100)``).
        gather: gather across workers (official ``collect_mode="diff"``).
    Returns:
        0-dim loss.
    """
    mask_embed = F.normalize(mask_embed.float(), dim=-1)
    word_embed = F.normalize(word_embed.float(), dim=-1)
    scale = logit_scale.float()
    batch = mask_embed.shape[0]
    if gather:
        all_masks, offset = gather_with_grad(mask_embed)
        all_words, _ = gather_with_grad(word_embed)
        all_valid, _ = gather_with_grad(word_valid.to(torch.float32))
    else:
        all_masks, all_words, all_valid, offset = mask_embed, word_embed, word_valid.to(torch.float32), 0
    valid = word_valid.any(dim=-1).to(torch.float32)  # B
    labels = torch.arange(batch, device=mask_embed.device) + offset
    # text -> image: this worker's captions against all images: B x (W*B)
    sim_txt_img = _image_text_similarity(all_masks, word_embed, word_valid, scale).t()
    loss_t2i = (F.cross_entropy(sim_txt_img, labels, reduction="none") * valid).mean()
    # image -> text: this worker's images against all captions: B x (W*B)
    sim_img_txt = _image_text_similarity(mask_embed, all_words, all_valid > 0, scale)
    per_image = F.cross_entropy(sim_img_txt, labels, reduction="none")
    loss_i2t = (per_image * valid).sum() / valid.sum().clamp(min=1)
    return 0.5 * (loss_t2i + loss_i2t)


class MaskGroundingCriterion(nn.Module):
    """Grounding loss on the final output and every aux output: ``loss_mask_word`` and ``loss_mask_word_{i}``.

    Args:
        loss_weight: multiplier (official 1.0).
        gather: gather embeddings across workers with gradients (official ``collect_mode="diff"``).
    """

    def __init__(self, loss_weight: float = 1.0, gather: bool = True) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.gather = gather

    def forward(
        self, outputs: MaskGeneratorOutput, word_embed: torch.Tensor, word_valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """``outputs``: ``mask_embed`` ``BxQxC``, ``logit_scale`` and ``aux_outputs``; ``word_embed`` ``BxKxC``."""
        with torch.autocast(device_type=word_embed.device.type, enabled=False):
            losses = {
                "loss_mask_word": self.loss_weight
                * grounding_loss(
                    outputs.mask_embed, word_embed, word_valid, outputs.logit_scale, gather=self.gather
                )
            }
            for i, aux in enumerate(outputs.aux_outputs):
                losses[f"loss_mask_word_{i}"] = self.loss_weight * grounding_loss(
                    aux.mask_embed, word_embed, word_valid, aux.logit_scale, gather=self.gather
                )
            return losses
