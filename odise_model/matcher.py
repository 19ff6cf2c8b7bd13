"""Hungarian matching of predicted masks to ground-truth segments (Mask2Former ``HungarianMatcher``).

For each image the cost of assigning query ``q`` to target ``t`` is::

    C[q, t] = cost_class * (-p_q(label_t)) + cost_mask * BCE(q, t) + cost_dice * dice(q, t)

where ``p_q = softmax(pred_logits[q])``, and BCE and dice are computed on ``num_points`` (12,544 officially)
points drawn uniformly in the image, shared by every prediction and every target of that image (masks are
sampled with :func:`point_sample`, i.e. bilinear ``grid_sample`` at normalised coordinates, so predictions
at stride 4 and targets at full resolution line up). The assignment minimising the total cost is found by
``scipy.optimize.linear_sum_assignment``; with more queries than targets every target gets exactly one query.

Everything here runs without gradients and in float32 (autocast disabled), as the official matcher.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["point_sample", "random_points", "batch_sigmoid_ce_cost", "batch_dice_cost", "HungarianMatcher"]


def point_sample(inputs: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of ``inputs`` at normalised points (detectron2 ``point_sample``).

    Args:
        inputs: ``NxCxHxW`` maps.
        coords: ``NxPx2`` points in ``[0, 1] x [0, 1]`` as ``(x, y)`` (x along the width).
    Returns:
        ``NxCxP``: ``grid_sample(inputs, 2 * coords - 1, align_corners=False)`` (zero padding outside).
    """
    grid = (2.0 * coords - 1.0).unsqueeze(2)  # N x P x 1 x 2
    return F.grid_sample(inputs, grid.to(inputs.dtype), mode="bilinear", align_corners=False).squeeze(3)


def random_points(
    shape: Sequence[int], *, device: torch.device, generator: torch.Generator | None
) -> torch.Tensor:
    """Uniform points ``shape`` (e.g. ``(1, P, 2)``) in ``[0, 1)``, float32 on ``device``.

    With a ``generator`` the numbers are drawn on the generator's device (usually the CPU, which makes runs
    reproducible across devices) and moved; without one the global RNG of ``device`` is used.
    """
    if generator is None:
        return torch.rand(*shape, device=device)
    return torch.rand(*shape, generator=generator, device=generator.device).to(device)


def batch_sigmoid_ce_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean sigmoid binary cross-entropy of every prediction against every target.

    Args:
        inputs: ``QxP`` logits at P points.
        targets: ``TxP`` in {0, 1} at the same points.
    Returns:
        ``QxT``: ``mean_p BCE(inputs[q, p], targets[t, p])``.
    """
    num_points = inputs.shape[1]
    pos = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")  # -log s(x)
    neg = F.binary_cross_entropy_with_logits(
        inputs, torch.zeros_like(inputs), reduction="none"
    )  # -log(1-s(x))
    return (pos @ targets.t() + neg @ (1 - targets).t()) / num_points


def batch_dice_cost(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Dice loss of every prediction against every target: ``1 - (2|s*t| + 1) / (|s| + |t| + 1)``.

    ``inputs``: ``QxP`` logits (``s = sigmoid``); ``targets``: ``TxP``. Returns ``QxT``.
    """
    probs = inputs.sigmoid()
    numerator = 2 * probs @ targets.t()
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


class HungarianMatcher:
    """One-to-one assignment of queries to targets per image.

    Args:
        cost_class: weight of ``-p(target class)`` (official 2.0).
        cost_mask: weight of the point-sampled sigmoid BCE (official 5.0).
        cost_dice: weight of the point-sampled dice loss (official 5.0).
        num_points: points per image shared by predictions and targets (official 12,544 = 112^2).
    """

    def __init__(
        self, cost_class: float = 2.0, cost_mask: float = 5.0, cost_dice: float = 5.0, num_points: int = 12544
    ) -> None:
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("all matching costs are 0")
        if num_points < 1:
            raise ValueError(f"num_points must be >= 1, got {num_points}")
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    def __repr__(self) -> str:
        return (
            f"HungarianMatcher(cost_class={self.cost_class}, cost_mask={self.cost_mask}, "
            f"cost_dice={self.cost_dice}, num_points={self.num_points})"
        )

    @torch.no_grad()
    def cost_matrix(
        self,
        pred_logits: torch.Tensor | None,
        pred_masks: torch.Tensor,
        labels: torch.Tensor,
        masks: torch.Tensor,
        point_coords: torch.Tensor,
    ) -> torch.Tensor:
        """Cost matrix of one image.

        Args:
            pred_logits: ``QxC`` class logits (C = K+1 with the no-object class last), or None to skip the
                class cost.
            pred_masks: ``QxhxW`` mask logits (any resolution).
            labels: ``T`` long class indices into ``[0, C-1)``.
            masks: ``TxHxW`` binary target masks (any resolution, same field of view as ``pred_masks``).
            point_coords: ``1xPx2`` shared points in ``[0, 1]``.
        Returns:
            ``QxT`` float32 cost on the CPU.
        """
        with torch.autocast(device_type=pred_masks.device.type, enabled=False):
            num_queries, num_targets = pred_masks.shape[0], masks.shape[0]
            if num_targets == 0:
                return torch.zeros(num_queries, 0)
            coords = point_coords.to(pred_masks.device, torch.float32)
            out = point_sample(pred_masks[:, None].float(), coords.expand(num_queries, -1, -1))[:, 0]  # Q x P
            tgt = point_sample(
                masks[:, None].to(pred_masks.device, torch.float32), coords.expand(num_targets, -1, -1)
            )[:, 0]
            cost = self.cost_mask * batch_sigmoid_ce_cost(out, tgt) + self.cost_dice * batch_dice_cost(
                out, tgt
            )
            if pred_logits is not None and self.cost_class != 0:
                probs = pred_logits.float().softmax(-1)
                cost = cost + self.cost_class * -probs[:, labels.to(probs.device)]
            return cost.cpu()

    @torch.no_grad()
    def __call__(
        self,
        pred_logits: torch.Tensor | None,
        pred_masks: torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        *,
        generator: torch.Generator | None = None,
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Match a batch.

        Args:
            pred_logits: ``BxQxC`` class logits or None.
            pred_masks: ``BxQxhxw`` mask logits.
            targets: per image ``{"labels": T long, "masks": TxHxW bool/float}``.
            generator: RNG of the sampled points (None: the global RNG).
        Returns:
            per image ``(query_indices, target_indices)``, int64 tensors of length ``min(Q, T)``; the
            target indices are a permutation when ``T <= Q``.
        """
        from scipy.optimize import linear_sum_assignment

        indices = []
        for b, target in enumerate(targets):
            coords = random_points((1, self.num_points, 2), device=pred_masks.device, generator=generator)
            logits = pred_logits[b] if pred_logits is not None else None
            cost = self.cost_matrix(logits, pred_masks[b], target["labels"], target["masks"], coords)
            rows, cols = linear_sum_assignment(cost.numpy())
            indices.append(
                (torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64))
            )
        return indices
