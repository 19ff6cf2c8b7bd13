"""Hungarian matcher: point sampling, the cost terms by hand, and the assignment against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from odise_model.matcher import (
    HungarianMatcher,
    batch_dice_cost,
    batch_sigmoid_ce_cost,
    point_sample,
    random_points,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_point_sample_is_bilinear_at_normalised_coordinates():
    # 2x2 map [[0, 1], [2, 3]]; with align_corners=False pixel (row r, col c) has its centre at
    # ((c + 0.5) / 2, (r + 0.5) / 2) in (x, y); the image centre is the mean of the four pixels.
    image = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    coords = torch.tensor([[[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75], [0.5, 0.5], [0.5, 0.25]]])
    out = point_sample(image, coords)
    assert out.shape == (1, 1, 6)
    assert out[0, 0].tolist() == pytest.approx([0.0, 1.0, 2.0, 3.0, 1.5, 0.5])


def test_cost_terms_by_hand():
    # one prediction with logits (0, 0) at two points (sigmoid 0.5 each) against the target (1, 0):
    # BCE = mean(-log 0.5, -log 0.5) = ln 2;  dice = 1 - (2*0.5 + 1) / (0.5 + 0.5 + 1 + 1) = 1 - 2/3 = 1/3
    inputs = torch.tensor([[0.0, 0.0]])
    targets = torch.tensor([[1.0, 0.0]])
    assert batch_sigmoid_ce_cost(inputs, targets).item() == pytest.approx(math.log(2))
    assert batch_dice_cost(inputs, targets).item() == pytest.approx(1 / 3)
    # a confident correct prediction (logits +-20): BCE ~ 0, dice = 1 - (2*1 + 1)/(1 + 1 + 1) ~ 0
    confident = torch.tensor([[20.0, -20.0]])
    assert batch_sigmoid_ce_cost(confident, targets).item() == pytest.approx(0.0, abs=1e-6)
    assert batch_dice_cost(confident, targets).item() == pytest.approx(0.0, abs=1e-6)


def test_cost_matrix_matches_per_pair_computation():
    torch.manual_seed(0)
    pred_logits = torch.randn(4, 3)  # Q=4, K=2 + no-object
    pred_masks = torch.randn(4, 8, 8)
    labels = torch.tensor([1, 0, 1])
    masks = torch.rand(3, 32, 32) > 0.5
    coords = torch.rand(1, 50, 2)
    matcher = HungarianMatcher(cost_class=2.0, cost_mask=5.0, cost_dice=5.0, num_points=50)
    cost = matcher.cost_matrix(pred_logits, pred_masks, labels, masks, coords)
    probs = pred_logits.softmax(-1)
    for q in range(4):
        p = point_sample(pred_masks[q][None, None], coords)[0, 0]
        for t in range(3):
            g = point_sample(masks[t][None, None].float(), coords)[0, 0]
            bce = F.binary_cross_entropy_with_logits(p, g)
            s = p.sigmoid()
            dice = 1 - (2 * (s * g).sum() + 1) / (s.sum() + g.sum() + 1)
            expected = 2.0 * -probs[q, labels[t]] + 5.0 * bce + 5.0 * dice
            assert cost[q, t].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)


def _brute_force(cost: torch.Tensor) -> float:
    queries, targets = cost.shape
    if targets <= queries:
        return min(
            sum(cost[q, t].item() for t, q in enumerate(perm))
            for perm in itertools.permutations(range(queries), targets)
        )
    return min(
        sum(cost[q, t].item() for q, t in enumerate(perm))
        for perm in itertools.permutations(range(targets), queries)
    )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_queries, num_targets", [(5, 3), (4, 4), (3, 5), (6, 1)])
def test_assignment_is_optimal_against_brute_force(seed, num_queries, num_targets):
    gen = torch.Generator().manual_seed(seed)
    pred_logits = torch.randn(1, num_queries, 4, generator=gen)
    pred_masks = torch.randn(1, num_queries, 6, 6, generator=gen) * 3
    labels = torch.randint(0, 3, (num_targets,), generator=gen)
    masks = torch.rand(num_targets, 24, 24, generator=gen) > 0.6
    matcher = HungarianMatcher(num_points=64)
    ((rows, cols),) = matcher(
        pred_logits,
        pred_masks,
        [{"labels": labels, "masks": masks}],
        generator=torch.Generator().manual_seed(100 + seed),
    )
    # the same points as the matcher drew (first draw of that generator)
    coords = random_points(
        (1, 64, 2), device=torch.device("cpu"), generator=torch.Generator().manual_seed(100 + seed)
    )
    cost = matcher.cost_matrix(pred_logits[0], pred_masks[0], labels, masks, coords)
    assert len(rows) == len(cols) == min(num_queries, num_targets)
    assert len(set(rows.tolist())) == len(rows) and len(set(cols.tolist())) == len(cols)
    total = sum(cost[r, c].item() for r, c in zip(rows.tolist(), cols.tolist()))
    assert total == pytest.approx(_brute_force(cost), abs=1e-5)


def test_no_targets_and_no_class_cost():
    matcher = HungarianMatcher(num_points=16)
    out = matcher(
        torch.randn(2, 3, 3),
        torch.randn(2, 3, 4, 4),
        [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}] * 2,
    )
    assert [(len(r), len(c)) for r, c in out] == [(0, 0), (0, 0)]
    # pred_logits=None (class-agnostic): the mask terms alone decide: the query equal to the target wins
    target = torch.zeros(1, 8, 8, dtype=torch.bool)
    target[0, :, :4] = True
    good = torch.where(target[0], 10.0, -10.0)
    pred = torch.stack([-good, good, torch.zeros(8, 8)])[None]
    ((rows, cols),) = matcher(None, pred, [{"labels": torch.zeros(1, dtype=torch.long), "masks": target}])
    assert rows.tolist() == [1] and cols.tolist() == [0]


def test_low_resolution_predictions_align_with_full_resolution_targets():
    # a stride-4 prediction of the target's left half must beat the same mask shifted right
    target = torch.zeros(1, 64, 64, dtype=torch.bool)
    target[0, :, :32] = True
    low = torch.full((16, 16), -8.0)
    low[:, :8] = 8.0
    shifted = torch.roll(low, 4, dims=1)
    matcher = HungarianMatcher(cost_class=0.0, num_points=2000)
    ((rows, _),) = matcher(
        None,
        torch.stack([shifted, low])[None],
        [{"labels": torch.zeros(1, dtype=torch.long), "masks": target}],
        generator=torch.Generator().manual_seed(0),
    )
    assert rows.tolist() == [1]
