"""Training losses against values computed by hand (tiny tensors; the arithmetic is in the comments)."""

from __future__ import annotations

import math
import os
import tempfile

import pytest
import torch

from odise_model.criterion import (
    SetCriterion,
    dice_loss,
    gather_with_grad,
    grounding_loss,
    sigmoid_ce_loss,
    uncertain_point_coords,
)
from odise_model.matcher import HungarianMatcher, point_sample
from odise_model.transformer_decoder import MaskGeneratorOutput

LN2 = math.log(2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sigmoid_ce_and_dice_by_hand():
    # two masks x two points; logits 0 -> sigmoid 0.5
    inputs = torch.tensor([[0.0, 0.0], [20.0, -20.0]])
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # BCE: mask 0: mean(ln 2, ln 2) = ln 2; mask 1: ~0  -> (ln 2 + 0) / num_masks(2) = ln 2 / 2
    assert sigmoid_ce_loss(inputs, targets, 2.0).item() == pytest.approx(LN2 / 2, abs=1e-6)
    # dice: mask 0: 1 - (2*0.5 + 1)/(1 + 1 + 1) = 1/3; mask 1: 1 - (2 + 1)/(1 + 1 + 1) = 0 -> (1/3) / 2
    assert dice_loss(inputs, targets, 2.0).item() == pytest.approx(1 / 6, abs=1e-6)


def test_classification_loss_by_hand():
    # K = 2 real classes, no-object = index 2 with weight eos 0.1. One image, two queries.
    criterion = SetCriterion(num_classes=2, matcher=HungarianMatcher(), eos_coef=0.1)
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, 0.0, math.log(2)]]])
    targets = [{"labels": torch.tensor([1]), "masks": torch.zeros(1, 4, 4)}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]  # query 0 -> target 0 (class 1); query 1 -> no-object
    # query 0: uniform over 3 classes -> CE = ln 3, weight 1
    # query 1: softmax(0, 0, ln 2) = (1/4, 1/4, 1/2) -> CE(no-object) = ln 2, weight 0.1
    # weighted mean = (1 * ln 3 + 0.1 * ln 2) / (1 + 0.1) = (1.098612 + 0.069315) / 1.1 = 1.061752
    expected = (math.log(3) + 0.1 * LN2) / 1.1
    assert criterion.loss_labels(logits, targets, indices).item() == pytest.approx(expected, rel=1e-6)
    assert criterion.empty_weight.tolist() == pytest.approx([1.0, 1.0, 0.1])


def test_uncertain_points_prefer_uncertain_regions():
    # logits +10 everywhere except the left half (0 = most uncertain)
    logits = torch.full((1, 1, 16, 16), 10.0)
    logits[..., :8] = 0.0
    coords = uncertain_point_coords(logits, 400, 3.0, 0.75, generator=torch.Generator().manual_seed(0))
    assert coords.shape == (1, 400, 2)
    uncertain, uniform = coords[0, :300], coords[0, 300:]
    # 300 of the 1200 candidates with the highest -|logit|: all in the left half
    assert float(uncertain[:, 0].max()) < 0.5
    assert float(uniform[:, 0].max()) > 0.5  # the remaining 25% are uniform over the whole mask
    # the kept candidates are a top-300 by uncertainty (ties in any order)
    gen = torch.Generator().manual_seed(0)
    candidates = torch.rand(1, 1200, 2, generator=gen)
    scores = -point_sample(logits, candidates).abs()[0, 0]
    chosen = torch.tensor([int(torch.nonzero((candidates[0] == c).all(-1))[0]) for c in uncertain])
    rest = torch.ones(1200, dtype=torch.bool)
    rest[chosen] = False
    assert float(scores[chosen].min()) >= float(scores[rest].max())


def _outputs(logits, masks, aux=()):
    """A mask generator output with class logits; the embeddings are unused by the set criterion."""
    batch, queries = masks.shape[:2]
    return MaskGeneratorOutput(
        pred_masks=masks,
        mask_embed=torch.zeros(batch, queries, 2),
        logit_scale=torch.tensor(1.0),
        pred_logits=logits,
        aux_outputs=tuple(aux),
    )


def test_set_criterion_end_to_end_by_hand():
    # One image, Q = 2 queries, K = 1 class, one target whose mask is empty (all zeros) so that every
    # sampled point has target 0 whatever the points are; both predicted masks are constant logit 0.
    # Matching: both mask costs are equal, the class cost decides: p_q0(class 0) = e^2/(e^2+1) = 0.8808
    # > p_q1(class 0) = 0.5 -> query 0 is matched.
    num_points = 8
    criterion = SetCriterion(
        num_classes=1, matcher=HungarianMatcher(num_points=num_points), eos_coef=0.1, num_points=num_points
    )
    logits = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]], requires_grad=True)
    masks = torch.zeros(1, 2, 4, 4, requires_grad=True)
    outputs = _outputs(logits, masks, aux=[_outputs(logits, masks)])
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 16, 16, dtype=torch.bool)}]
    losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(0))
    # CE: q0 -> class 0: -log(0.880797) = 0.126928 (w 1); q1 -> no-object: -log 0.5 = 0.693147 (w 0.1)
    #     (0.126928 + 0.0693147) / 1.1 = 0.178402; x class weight 2 = 0.356804
    ce = (-math.log(math.exp(2) / (math.exp(2) + 1)) + 0.1 * LN2) / 1.1
    # BCE of logit 0 vs target 0 at every point = ln 2; / num_masks 1; x 5
    # dice: sum s = 8 * 0.5 = 4, sum t = 0 -> 1 - (0 + 1)/(4 + 0 + 1) = 0.8; x 5 = 4.0
    expected = {"loss_ce": 2 * ce, "loss_mask": 5 * LN2, "loss_dice": 5 * 0.8}
    for suffix in ("", "_0"):
        for name, value in expected.items():
            assert losses[name + suffix].item() == pytest.approx(value, rel=1e-5), name + suffix
    assert set(losses) == {"loss_ce", "loss_mask", "loss_dice", "loss_ce_0", "loss_mask_0", "loss_dice_0"}
    sum(losses.values()).backward()
    assert logits.grad is not None and masks.grad is not None


def test_mask_losses_are_normalised_by_the_number_of_masks():
    # two images with one empty target each: per-pair BCE = ln 2, summed = 2 ln 2, num_masks = 2 -> ln 2
    criterion = SetCriterion(num_classes=1, matcher=HungarianMatcher(num_points=8), num_points=8)
    outputs = _outputs(torch.zeros(2, 3, 2), torch.zeros(2, 3, 4, 4))
    targets = [{"labels": torch.tensor([0]), "masks": torch.zeros(1, 16, 16)} for _ in range(2)]
    losses = criterion(outputs, targets, generator=torch.Generator().manual_seed(1))
    assert losses["loss_mask"].item() == pytest.approx(5 * LN2, rel=1e-5)
    # no target at all: mask losses are 0 (still connected to the graph), every query is no-object
    masks = torch.zeros(1, 3, 4, 4, requires_grad=True)
    empty = criterion(
        _outputs(torch.zeros(1, 3, 2), masks),
        [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 16, 16)}],
    )
    assert empty["loss_mask"].item() == 0.0 and empty["loss_dice"].item() == 0.0
    assert empty["loss_ce"].item() == pytest.approx(2 * LN2)  # uniform over 2 -> ln 2, x 2
    empty["loss_mask"].backward()
    assert masks.grad is not None


# --------------------------------------------------------------------------------------------------------
# Grounding loss
# --------------------------------------------------------------------------------------------------------
def _grounding_case():
    # B = 2 images, Q = 2 queries, K = 1 word, C = 2; logit scale 1
    mask_embed = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [0.0, 1.0]]])
    word_embed = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])
    return mask_embed, word_embed


def test_grounding_loss_by_hand():
    mask_embed, word_embed = _grounding_case()
    valid = torch.ones(2, 1, dtype=torch.bool)
    # g(i, j) = sum_q softmax_q(s) * s, s = cosine:
    #   g(0,0): s = (1, 0) -> softmax (0.7311, 0.2689) -> 0.7311;  g(0,1): s = (0, 1) -> 0.7311
    #   g(1,0): s = (0, 0) -> 0;                                   g(1,1): s = (1, 1) -> 1
    a = math.e / (math.e + 1)  # 0.731059
    g = [[a, a], [0.0, 1.0]]

    def ce(row, target):
        return -row[target] + math.log(sum(math.exp(v) for v in row))

    # image -> text (rows): CE((a, a), 0) = ln 2 = 0.693147; CE((0, 1), 1) = ln(1 + e^-1) = 0.313262
    i2t = (ce(g[0], 0) + ce(g[1], 1)) / 2  # 0.503205
    # text -> image (columns): CE((a, 0), 0) = ln(1 + e^-a) = 0.392966; CE((a, 1), 1) = ln(1 + e^(a-1)) = 0.567730
    t2i = (ce([g[0][0], g[1][0]], 0) + ce([g[0][1], g[1][1]], 1)) / 2  # 0.480348
    loss = grounding_loss(mask_embed, word_embed, valid, torch.tensor(1.0), gather=False)
    assert loss.item() == pytest.approx(0.5 * (i2t + t2i), rel=1e-5)  # 0.491776
    # caption 1 without words: text->image keeps a plain mean over B with 0 for it; image->text only averages
    # over image 0, whose negatives include caption 1 with g(0, 1) = 0 (mean over no valid word)
    invalid = torch.tensor([[True], [False]])
    t2i_masked = ce([g[0][0], g[1][0]], 0) / 2  # 0.196483
    i2t_masked = ce([a, 0.0], 0)  # 0.392966
    loss = grounding_loss(mask_embed, word_embed, invalid, torch.tensor(1.0), gather=False)
    assert loss.item() == pytest.approx(0.5 * (t2i_masked + i2t_masked), rel=1e-5)
    # mask and word embeddings are L2-normalised and the scale multiplies the cosine
    loss_scaled = grounding_loss(3 * mask_embed, 5 * word_embed, valid, torch.tensor(2.0), gather=False)
    loss_ref = grounding_loss(mask_embed, word_embed * 2, valid, torch.tensor(2.0), gather=False)
    assert loss_scaled.item() == pytest.approx(loss_ref.item(), rel=1e-6)


def test_gather_without_process_group_is_identity():
    x = torch.randn(3, 2)
    out, offset = gather_with_grad(x)
    assert out is x and offset == 0


def _worker(rank: int, world: int, init_file: str, results: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        gen = torch.Generator().manual_seed(0)
        mask_embed = torch.randn(4, 3, 5, generator=gen)
        word_embed = torch.randn(4, 2, 5, generator=gen)
        valid = torch.ones(4, 2, dtype=torch.bool)
        mine = mask_embed[2 * rank : 2 * rank + 2].clone().requires_grad_(True)
        loss = grounding_loss(
            mine, word_embed[2 * rank : 2 * rank + 2], valid[:2], torch.tensor(2.0), gather=True
        )
        loss.backward()
        torch.save({"loss": loss.detach(), "grad": mine.grad}, f"{results}/rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_grounding_loss_gathers_across_workers_with_gradients():
    # 2 gloo workers with 2 images each == one process with all 4 images: the mean of the workers' losses is
    # the full-batch loss, and each worker's gradient (summed over workers by all_gather's backward, then
    # averaged by DDP: / 2) is the full-batch gradient of its own rows
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(2, init_file, tmp), nprocs=2, join=True)
        parts = [torch.load(f"{tmp}/rank{r}.pt") for r in range(2)]
    gen = torch.Generator().manual_seed(0)
    mask_embed = torch.randn(4, 3, 5, generator=gen).requires_grad_(True)
    word_embed = torch.randn(4, 2, 5, generator=gen)
    full = grounding_loss(
        mask_embed, word_embed, torch.ones(4, 2, dtype=torch.bool), torch.tensor(2.0), gather=False
    )
    full.backward()
    assert (parts[0]["loss"] + parts[1]["loss"]).item() / 2 == pytest.approx(full.item(), rel=1e-5)
    grads = torch.cat([parts[0]["grad"], parts[1]["grad"]]) / 2
    torch.testing.assert_close(grads, mask_embed.grad, rtol=1e-4, atol=1e-6)
