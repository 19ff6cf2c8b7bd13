"""Numeric regression guard for the tiny variants (fast suite): stored stage slices must not move.

The stored slices in ``tests/data/numeric_guard/`` were computed with the numerics verified against the
official ODISE code. A failure here means a change altered the model's numbers: find out why; regenerate
(``.venv/bin/python tests/regenerate_numeric_guard.py --variant tiny --variant tiny_caption --write``) only
for an intended change. The official-size guards live in ``tests/test_official_size.py`` (they share its
model builds). See ``tests/numeric_guard.py`` for the stages and the tolerance.
"""

from __future__ import annotations

import numeric_guard as ng
import pytest
import regenerate_numeric_guard
import torch


@pytest.fixture(scope="module", params=ng.FAST_VARIANTS)
def guard(request):
    """``(model, run)`` of one tiny variant, built once per module."""
    model = ng.build_guard_model(request.param)
    return model, ng.run_guard(model, request.param)


def test_matches_stored_slices(guard):
    model, run = guard
    ng.assert_matches_reference(run)
    # the reference covers the whole path, the caption variant's binary head included
    stages = ng.load_reference(run.variant)["stages"]
    expected = [
        "sd.input_tiles",
        "clip.tile_embedding",
        "captioner.context",
        "captioner.time_cond",
        *[f"sd.tap{i}" for i in range(8)],
        *[f"projections.s{i}" for i in range(2, 6)],
        *[f"backbone.s{i}" for i in range(2, 6)],
        "pixel_decoder.mask_features",
        *[f"pixel_decoder.multi_scale{i}" for i in range(3)],
        "decoder.pred_masks",
        "decoder.mask_embed",
        "text.diffusion_branch",
        "text.maskclip_branch",
        "classifier.open_logits",
        "classifier.clip_logits",
        "classifier.class_log_probs",
        "panoptic.map",
    ]
    if model.config.classifier.kind == "caption":
        expected += [
            "decoder.pred_logits",
            *[f"decoder.aux{i}.pred_logits" for i in range(model.decoder.num_layers)],
        ]
    assert not [name for name in expected if name not in stages]
    num_classes = len(ng.VOCABULARY)
    open_width = num_classes + 1 if model.config.classifier.kind == "label" else num_classes
    assert stages["classifier.open_logits"]["shape"][-1] == open_width
    assert stages["classifier.class_log_probs"]["shape"][-1] == num_classes + 1


def test_same_process_rerun_is_bitwise_identical(guard):
    model, run = guard
    again = ng.run_guard(model, run.variant)
    assert again.stages == run.stages
    assert again.segments == run.segments


def test_comparison_reports_stage_expected_and_got(guard):
    """A changed value, shape or segment gives a message naming the stage with expected and got values."""
    _, run = guard
    reference = ng.load_reference(run.variant)
    stages = {name: dict(rec) for name, rec in run.stages.items()}
    rec = stages["pixel_decoder.mask_features"]
    rec["values"] = [v * 1.001 for v in rec["values"]]
    stages["decoder.mask_embed"] = {**stages["decoder.mask_embed"], "shape": [1, 2, 3]}
    segments = [dict(s) for s in run.segments]
    segments[0]["area"] += 1
    messages = ng.compare(reference, stages, segments)
    assert len(messages) == 3, messages
    assert messages[0].startswith("stage pixel_decoder.mask_features:") and "expected [" in messages[0]
    assert "got [" in messages[0]
    assert messages[1].startswith("stage decoder.mask_embed: shape changed")
    assert messages[2].startswith("panoptic segments differ")
    # and a difference just inside the tolerance passes
    stages = {name: dict(rec) for name, rec in run.stages.items()}
    original = run.stages["pixel_decoder.mask_features"]["values"]
    stages["pixel_decoder.mask_features"]["values"] = [v * (1 + 0.5e-4) for v in original]
    assert ng.compare(reference, stages, run.segments) == []


# (variant, parameter scaled by 1.001, a stage that must change, stages upstream that must not).
# Each parameter is on the inference path and is not followed by a normalisation that would absorb the
# scale: a LayerNorm / GroupNorm right after a bias-free linear map would make a 1.001 scale invisible.
SENSITIVITY = [
    ("tiny", "captioner.clip_project.linear.weight", "captioner.context", ["clip.tile_embedding", "sd.tap0"]),
    ("tiny", "sd.unet.mid_block.attentions.0.proj_out.weight", "sd.tap2", ["sd.tap0", "sd.tap1", "sd.tap6"]),
    (
        "tiny",
        "pixel_decoder.transformer.encoder.layers.0.linear2.weight",
        "pixel_decoder.multi_scale0",
        ["backbone.s3", "backbone.s5"],
    ),
    (
        "tiny",
        "decoder.transformer_ffn_layers.1.linear2.weight",
        "decoder.pred_masks",
        ["pixel_decoder.mask_features", "decoder.aux0.pred_masks", "decoder.aux1.pred_masks"],
    ),
    (
        "tiny_caption",
        "decoder.class_embed.weight",
        "decoder.pred_logits",
        ["decoder.pred_masks", "classifier.open_logits", "classifier.clip_logits"],
    ),
]


@pytest.mark.parametrize(
    "guard, name, changed, unchanged", SENSITIVITY, indirect=["guard"], ids=[s[1] for s in SENSITIVITY]
)
def test_guard_catches_a_weight_scaled_by_1_001(guard, name, changed, unchanged):
    model, run = guard
    reference = ng.load_reference(run.variant)
    original = dict(model.named_parameters())[name].detach().clone()
    with ng.scaled_parameter(model, name, 1.001):
        scaled = ng.run_guard(model, run.variant)
    messages = ng.compare(reference, scaled.stages, scaled.segments)
    assert messages, f"scaling {name} by 1.001 went unnoticed"
    assert any(m.startswith(f"stage {changed}:") for m in messages), messages
    assert ng.compare(reference, scaled.stages, stages=unchanged) == []
    assert torch.equal(dict(model.named_parameters())[name], original)  # restored for the other tests


def test_regeneration_script_dry_run_sees_no_change(capsys):
    assert regenerate_numeric_guard.main(["--variant", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "CHANGED" not in out and "DEGENERATE" not in out, out
    assert "segments: " in out and "unchanged" in out, out
