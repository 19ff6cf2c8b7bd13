"""Unit tests of the model components: tiling, SD taps, deformable attention, heads, fusion, post-processing."""

from __future__ import annotations

import math

import pytest
import torch

from odise_model.classifier import apply_prompt, ensemble_max, fuse_probabilities
from odise_model.config import ConfigError, load_config
from odise_model.feature_extractor import crop_tiles, sd_q_sample_coefficients, stitch_tiles, tile_boxes
from odise_model.implicit_captioner import ImplicitCaptioner
from odise_model.pixel_decoder import ms_deform_attn
from odise_model.postprocess import (
    instance_inference,
    panoptic_inference,
    resize_mask_logits,
    semantic_inference,
)


# --- tiling ------------------------------------------------------------------------------------------------
def test_tile_boxes_official_example_six_tiles():
    # 640x480 COCO image -> short side 1024: 1024x1365 -> padded 1024x1408 -> 2x3 windows of 512
    boxes = tile_boxes(1024, 1408, 512)
    assert len(boxes) == 6
    assert boxes[:3] == [
        (0, 0, 512, 512),
        (0, 512, 512, 1024),
        (0, 896, 512, 1408),
    ]  # last column shifted back
    assert all(y2 - y1 == 512 and x2 - x1 == 512 for y1, x1, y2, x2 in boxes)


@pytest.mark.parametrize("size", [(1024, 1024), (1024, 1408), (64, 192), (192, 64), (128, 128), (1088, 2560)])
def test_tile_boxes_cover_every_pixel(size):
    h, w = size
    cover = torch.zeros(h, w, dtype=torch.int32)
    for y1, x1, y2, x2 in tile_boxes(h, w, 512):
        assert y2 <= h and x2 <= w and y1 >= 0 and x1 >= 0
        cover[y1:y2, x1:x2] += 1
    assert int(cover.min()) >= 1


def test_small_image_uses_short_side_windows():
    boxes = tile_boxes(64, 192, 512)
    assert boxes == [(0, 0, 64, 64), (0, 64, 64, 128), (0, 128, 64, 192)]


def test_stitch_averages_overlaps():
    # width 1408 with 512 windows: columns 896..1024 are covered twice; each window holds its own constant
    boxes = tile_boxes(512, 1408, 512)
    feats = {"s5": torch.stack([torch.full((1, 16, 16), float(i + 1)) for i in range(len(boxes))])}
    out = stitch_tiles(feats, boxes, (512, 1408), {"s5": 32})["s5"][0, 0]
    assert out.shape == (16, 44)
    assert torch.all(out[:, :16] == 1) and torch.all(out[:, 16:28] == 2)
    assert torch.all(out[:, 28:32] == 2.5)  # average of windows 2 and 3 where they overlap
    assert torch.all(out[:, 32:] == 3)


def test_crop_tiles_resizes_bicubic_without_antialias():
    image = torch.rand(3, 128, 192)
    tiles = crop_tiles(image, tile_boxes(128, 192, 512), 512)
    assert tiles.shape == (2, 3, 512, 512)
    expected = torch.nn.functional.interpolate(
        image[None, :, :, :128], size=(512, 512), mode="bicubic", align_corners=False
    )
    assert torch.allclose(tiles[0], expected[0])


# --- Stable Diffusion -------------------------------------------------------------------------------------
def test_q_sample_coefficients_at_t0():
    a, b = sd_q_sample_coefficients(load_config("odise_label_coco").stable_diffusion)
    # alpha_bar_0 = 1 - 0.00085 -> sqrt = 0.999575, sqrt(1 - alpha_bar) = sqrt(0.00085) = 0.029155
    assert a == pytest.approx(math.sqrt(1 - 0.00085), rel=1e-12)
    assert b == pytest.approx(math.sqrt(0.00085), rel=1e-12)


@pytest.fixture(scope="module")
def tiny_model():
    import odise_model

    return odise_model.build_odise("tiny")


def test_sd_taps_shapes_strides_and_early_stop(tiny_model):
    sd = tiny_model.sd
    tiles = torch.rand(2, 3, 64, 64)
    ctx = torch.randn(2, 77, 32)
    tcond = torch.randn(2, 64)
    with torch.no_grad():
        taps = sd(tiles, ctx, tcond)
        full = sd(tiles, ctx, tcond, full_decode=True)
    assert sd.feature_strides == [4, 8, 64, 32, 16, 8, 8, 4]
    assert len(taps) == 8
    for tap, channels, stride in zip(taps, sd.feature_channels, sd.feature_strides):
        assert tap.shape == (2, channels, 64 // stride, 64 // stride)
    for a, b in zip(taps, full):
        assert torch.equal(a, b)


def test_time_conditioning_reaches_the_unet(tiny_model):
    sd = tiny_model.sd
    tiles = torch.rand(1, 3, 64, 64)
    ctx = torch.randn(1, 77, 32)
    with torch.no_grad():
        base = sd(tiles, ctx, torch.zeros(1, 64))
        shifted = sd(tiles, ctx, torch.ones(1, 64))
    assert torch.equal(base[0], shifted[0])  # VAE encoder taps do not see the UNet
    assert not torch.allclose(base[2], shifted[2])  # UNet taps do


def test_captioner_with_zero_gates_gives_empty_prompt_conditioning():
    cap = ImplicitCaptioner(clip_dim=8, context_len=77, context_dim=16, time_embed_dim=12)
    uncond = torch.randn(1, 77, 16)
    cap.set_uncond_context(uncond)
    context, time_cond = cap(torch.randn(3, 8))
    assert torch.equal(context, uncond.expand(3, -1, -1))
    assert torch.equal(time_cond, torch.zeros(3, 12))
    with torch.no_grad():
        cap.alpha_cond.fill_(1.0)
    context, _ = cap(torch.randn(3, 8))
    assert not torch.allclose(context, uncond.expand(3, -1, -1))
    with pytest.raises(ValueError, match="shape"):
        cap.set_uncond_context(torch.zeros(1, 76, 16))


def test_empty_prompt_tokens_match_sd_tokenizer():
    from odise_model.sd_convert import sd_prompt_token_ids

    ids = sd_prompt_token_ids("")
    assert ids.shape == (1, 77)
    assert ids[0, 0] == 49406 and torch.all(ids[0, 1:] == 49407)
    ids = sd_prompt_token_ids("a cat")
    assert ids[0, 0] == 49406 and ids[0, 3] == 49407 and torch.all(ids[0, 3:] == 49407)


# --- deformable attention -------------------------------------------------------------------------------
def _naive_deform_attn(value, shapes, locations, weights):
    """Per-point reference: bilinear sampling at (x*W - 0.5, y*H - 0.5) with zero padding."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for lvl, (h, w) in enumerate(shapes):
                    grid = value[b, starts[lvl] : starts[lvl + 1], head].double().view(h, w, d)
                    for p in range(points):
                        x = locations[b, q, head, lvl, p, 0].item() * w - 0.5
                        y = locations[b, q, head, lvl, p, 1].item() * h - 0.5
                        x0, y0 = math.floor(x), math.floor(y)
                        acc = torch.zeros(d, dtype=torch.float64)
                        for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
                            for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
                                if 0 <= yy < h and 0 <= xx < w:
                                    acc += wy * wx * grid[yy, xx]
                        out[b, q, head] += weights[b, q, head, lvl, p].item() * acc
    return out.view(n, lq, m * d)


def test_deformable_attention_matches_naive_reference():
    torch.manual_seed(0)
    shapes = [(3, 5), (2, 3), (1, 2)]
    n, m, d, lq, points = 2, 2, 4, 5, 3
    value = torch.randn(n, sum(h * w for h, w in shapes), m, d)
    locations = torch.rand(n, lq, m, len(shapes), points, 2) * 1.4 - 0.2  # some points fall outside
    weights = torch.softmax(torch.randn(n, lq, m, len(shapes) * points), -1).view(
        n, lq, m, len(shapes), points
    )
    fast = ms_deform_attn(value, shapes, locations, weights)
    slow = _naive_deform_attn(value, shapes, locations, weights)
    assert torch.allclose(fast.double(), slow, atol=1e-5)


# --- classification ------------------------------------------------------------------------------------
def test_ensemble_max_over_synonyms():
    logits = torch.tensor([[1.0, 5.0, 2.0, -1.0, 3.0]])
    index = torch.tensor([0, 0, 1, 2, 2])
    assert ensemble_max(logits, index, 3).tolist() == [[5.0, 2.0, 3.0]]


def test_prompt_templates():
    assert apply_prompt(["cat"], None) == ["cat"]
    assert apply_prompt(["cat", "dog"], "photo") == ["a photo of a cat.", "a photo of a dog."]


def test_fusion_by_hand():
    # K=2; class 0 seen (alpha=0.25), class 1 unseen (beta=0.75); p_bg = 0.2
    open_logits = torch.log(torch.tensor([[[0.8, 0.2]]]))
    clip_logits = torch.log(torch.tensor([[[0.4, 0.6]]]))
    seen = torch.tensor([True, False])
    out = fuse_probabilities(
        open_logits, clip_logits, seen, alpha=0.25, beta=0.75, p_background=torch.tensor([[0.2]])
    )
    f0 = 0.8**0.75 * 0.4**0.25
    f1 = 0.2**0.25 * 0.6**0.75
    expected = torch.tensor([f0 / (f0 + f1) * 0.8, f1 / (f0 + f1) * 0.8, 0.2])
    assert torch.allclose(out[0, 0].exp(), expected + 1e-8, atol=1e-6)


def test_fusion_without_clip_equals_k_plus_1_softmax():
    logits = torch.randn(2, 3, 5)
    p = torch.softmax(logits, -1)
    out = fuse_probabilities(
        logits[..., :-1], None, torch.zeros(4, dtype=torch.bool), alpha=0.3, beta=0.7, p_background=p[..., -1]
    )
    assert torch.allclose(out.exp(), p + 1e-8, atol=1e-6)


# --- post-processing on hand-built masks -------------------------------------------------------------
def _big(x):
    return torch.where(x, torch.tensor(20.0), torch.tensor(-20.0))


def test_panoptic_inference_merges_stuff_and_drops_overlapped_things():
    h, w = 4, 6
    left = torch.zeros(h, w, dtype=torch.bool)
    left[:, :3] = True
    right = ~left
    mask_pred = torch.stack(
        [_big(left), _big(right), _big(right), _big(torch.ones(h, w, dtype=torch.bool)), _big(left)]
    )
    # classes: 0 = thing "cat", 1 = stuff "grass"; last column = no object
    cls = torch.log(
        torch.tensor(
            [
                [0.9, 0.05, 0.05],  # q0 cat on the left
                [0.05, 0.9, 0.05],  # q1 grass right
                [0.06, 0.88, 0.06],  # q2 grass right again -> merged into q1's id (but never wins a pixel)
                [0.05, 0.05, 0.9],  # q3 no object -> dropped
                [0.6, 0.2, 0.2],  # q4 cat on the left, lower score: loses every pixel to q0
            ]
        )
    )
    isthing = torch.tensor([True, False])
    pan, segs = panoptic_inference(cls, mask_pred, isthing, object_mask_threshold=0.0, overlap_threshold=0.8)
    assert [(s.id, s.class_index, s.isthing) for s in segs] == [(1, 0, True), (2, 1, False)]
    assert torch.all(pan[:, :3] == 1) and torch.all(pan[:, 3:] == 2)
    assert segs[0].score == pytest.approx(0.9, rel=1e-5)


def test_panoptic_overlap_threshold():
    h, w = 2, 4
    full = torch.ones(h, w, dtype=torch.bool)
    half = torch.zeros(h, w, dtype=torch.bool)
    half[:, :2] = True
    mask_pred = torch.stack([_big(half), _big(full)])
    cls = torch.log(torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.8, 0.15]]))
    isthing = torch.tensor([True, True])
    # q1 keeps only half of its mask: dropped at 0.8, kept at 0.0 (the demo setting)
    _, segs = panoptic_inference(cls, mask_pred, isthing, object_mask_threshold=0.0, overlap_threshold=0.8)
    assert [s.class_index for s in segs] == [0]
    _, segs = panoptic_inference(cls, mask_pred, isthing, object_mask_threshold=0.0, overlap_threshold=0.0)
    assert [s.class_index for s in segs] == [0, 1]


def test_semantic_and_instance_inference():
    h, w = 2, 2
    m = torch.tensor([[True, False], [False, False]])
    mask_pred = torch.stack([_big(m), _big(~m)])
    cls = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]]))
    sem = semantic_inference(cls, mask_pred)
    assert sem.shape == (2, h, w)
    assert sem.argmax(0).tolist() == [[0, 1], [1, 1]]
    from odise_model.postprocess import semantic_argmax

    assert semantic_argmax(cls, mask_pred).tolist() == [[0, 1], [1, 1]]
    classes, scores, queries = instance_inference(
        cls, mask_pred, torch.tensor([True, False]), topk=10, things_only=True
    )
    assert classes.tolist() == [0, 0]  # only the thing class survives, from both queries
    assert queries.tolist() == [0, 1]
    # score = class probability x mean mask probability inside the mask (sigmoid(20) ~ 1)
    assert scores.tolist() == pytest.approx([0.7, 0.1], rel=1e-6)


def test_mask_boxes_and_packing_match_numpy():
    import numpy as np

    from odise_model.postprocess import mask_boxes, pack_masks
    from odise_model.types import bbox_from_mask

    rng = np.random.default_rng(0)
    masks = np.zeros((4, 7, 9), bool)
    masks[0, 2:5, 3:8] = True
    masks[1] = rng.random((7, 9)) > 0.7
    masks[3, 6, 0] = True  # masks[2] stays empty
    boxes = mask_boxes(torch.from_numpy(masks)).tolist()
    assert boxes == [list(bbox_from_mask(m)) for m in masks]
    assert boxes[0] == [3, 2, 5, 3] and boxes[2] == [0, 0, 0, 0]
    packed = pack_masks(torch.from_numpy(masks)).numpy()
    assert np.array_equal(packed, np.stack([np.packbits(m.reshape(-1)) for m in masks]))
    # no masks at all (an image whose segments are all stuff: no instances) gives zero rows, not an error
    none = pack_masks(torch.zeros((0, 7, 9), dtype=torch.bool))
    assert none.shape == (0, 8) and none.dtype == torch.uint8
    assert mask_boxes(torch.zeros((0, 7, 9), dtype=torch.bool)).shape == (0, 4)


def test_resize_mask_logits_crops_padding_before_resizing():
    logits = torch.zeros(1, 4, 4)
    logits[:, :, 3] = 10.0  # only the padded column is "on"
    out = resize_mask_logits(logits, (16, 16), (16, 12), (8, 6))
    assert out.shape == (1, 8, 6)
    assert float(out.max()) < 10.0


# --- config -----------------------------------------------------------------------------------------------
def test_config_rejects_unknown_keys(tmp_path):
    import json

    raw = json.loads((load_config.__globals__["config_file"]("models", "tiny.json")).read_text())
    raw["pixel_decoder"]["num_layer"] = 3
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="num_layer"):
        load_config(path)
    with pytest.raises(ConfigError, match="unknown model"):
        load_config("no_such_variant")


def test_a_copied_builtin_config_finds_the_shipped_sd_configs(tmp_path):
    """Copying odise_label_coco.json elsewhere to change a setting must work: its sd_v1/*.json refs fall back
    to the shipped files; a file next to the copy still wins."""
    import json

    from odise_model.resources import config_file

    raw = json.loads(config_file("models", "odise_label_coco.json").read_text())
    raw["classifier"]["alpha"] = 0.4
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(raw))
    cfg = load_config(path)
    official = load_config("odise_label_coco")
    assert cfg.classifier.alpha == 0.4 and cfg.stable_diffusion == official.stable_diffusion
    refs = [v for section in raw.values() if isinstance(section, dict) for v in section.values()]
    unet_ref = next(v for v in refs if isinstance(v, str) and v.endswith("unet.json"))
    local = tmp_path / unet_ref
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_text("[not json")
    with pytest.raises(ConfigError):
        load_config(path)


@pytest.mark.parametrize("variant", ["tiny", "tiny_caption"])
def test_mask_generator_returns_a_typed_frozen_output_with_documented_shapes(variant):
    """``ODISE.mask_generator`` returns a :class:`MaskGeneratorOutput` (not a dict): masks at stride 4,
    one embedding per query, the shared temperature, the caption head's 2 logits (label: None), and one aux
    output per decoder layer (plus the learned queries), each of the same type without aux outputs."""
    import dataclasses

    import odise_model
    from odise_model.transformer_decoder import MaskGeneratorOutput

    torch.manual_seed(0)
    model = odise_model.build_odise(variant, seed=0).eval()
    cfg = model.config
    q, layers = cfg.transformer_decoder.num_queries, cfg.transformer_decoder.num_layers
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.backbone_features([image])
        batch = {name: value for name, value in features[0].items()}
        out = model.mask_generator(batch)
    assert isinstance(out, MaskGeneratorOutput)
    assert out.pred_masks.shape == (1, q, 16, 16)
    assert out.mask_embed.shape[:2] == (1, q) and out.logit_scale.dim() == 0
    if variant == "tiny":
        assert out.pred_logits is None
    else:
        assert out.pred_logits.shape == (1, q, 2)
    assert len(out.aux_outputs) == layers
    assert all(isinstance(a, MaskGeneratorOutput) and a.aux_outputs == () for a in out.aux_outputs)
    assert all(a.pred_masks.shape == out.pred_masks.shape for a in out.aux_outputs)
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.pred_masks = out.pred_masks  # type: ignore[misc]
    logits = torch.zeros(1, q, 3)
    with_logits = out.with_logits(logits)
    assert with_logits.pred_logits is logits and with_logits.aux_outputs == out.aux_outputs
    assert out.pred_logits is not logits  # the original is unchanged
    # read-only key access as diffusers' BaseOutput (code written against the former dict keeps working)
    assert out["pred_masks"] is out.pred_masks and "mask_embed" in out and "nothing" not in out
    assert ("pred_logits" in out) == (variant == "tiny_caption") and "aux_outputs" not in out.aux_outputs[0]
    assert out.keys()[:3] == ["pred_masks", "mask_embed", "logit_scale"]
    with pytest.raises(KeyError):
        out.aux_outputs[0]["aux_outputs"]
