"""The official-size variants build on CPU with random weights, train exactly the official parameters, and
keep their numerics (the numeric regression guard of ``tests/numeric_guard.py`` at full size).

Each variant is built once (a module-scoped, parametrized fixture: ~1.4B random parameters, ~7 GB) and serves
every test of this module; pytest finishes one variant before building the next, and the fixture drops and
collects the model in between so two never coexist.
"""

from __future__ import annotations

import csv
import gc

import numeric_guard as ng
import pytest

from odise_model.checkpoint import ODISE_CKPT_MODULES, to_official_key
from odise_model.resources import config_file

pytestmark = [pytest.mark.slow, pytest.mark.full_size]

# variant -> (parameter manifest of the official checkpoint, official trainable parameter count)
OFFICIAL = {
    "odise_label_coco": ("odise_label_coco_50e", 28_067_009),
    "odise_caption_coco": ("odise_caption_coco_50e", 28_066_755),
}


def _manifest(name):
    with open(config_file("manifests", f"{name}.keys.tsv"), newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


class _Holder:
    """Holds the model so that teardown can drop the only reference (the model has reference cycles through
    its forward hooks, so it is freed by ``gc.collect()``, not when pytest forgets the fixture value)."""

    def __init__(self, model) -> None:
        self.model = model


@pytest.fixture(scope="module", params=list(OFFICIAL))
def official(request):
    """One official-size variant with the numeric guard's random weights (``build_odise(variant, seed=0)``,
    constant parameters perturbed: shapes, names and ``requires_grad`` are those of a plain build)."""
    holder = _Holder(ng.build_guard_model(request.param))
    yield holder
    holder.model = None
    gc.collect()


def test_official_size_builds_with_random_weights(official):
    model = official.model
    manifest, trainable = OFFICIAL[model.config.name]
    params = model.trainable_parameters()
    assert sum(p.numel() for _, p in params) == trainable
    assert all(p.requires_grad for _, p in params)
    assert not any(p.requires_grad for m in model.frozen_modules() for p in m.parameters())

    rows = _manifest(manifest)
    kind = model.config.classifier.kind
    # our trainable parameters are exactly the official trainable set, name for name and shape for shape
    official_trainable = {r["key"]: r["shape"] for r in rows if r["requires_grad"] == "true"}
    ours = {to_official_key(n, kind): str(list(p.shape)) for n, p in params}
    assert ours == official_trainable
    # and what an official checkpoint stores is exactly what we save
    in_ckpt = {r["key"] for r in rows if r["in_ckpt"] == "yes"}
    saved = {to_official_key(k, kind) for k in model.state_dict() if k.startswith(ODISE_CKPT_MODULES)}
    assert saved == in_ckpt
    # the shared CLIP has the parameters of each of the official three copies
    clip_rows = {
        r["key"].split("clip_head.clip.clip.", 1)[1]: r["shape"]
        for r in rows
        if r["key"].startswith("clip_head.clip.clip.") and r["kind"] != "buffer_nonpersistent"
    }
    assert {k: str(list(v.shape)) for k, v in model.clip.model.state_dict().items()} == clip_rows
    # frozen parameters: SD UNet + VAE (+ one CLIP) instead of three CLIPs and SD's text encoder
    frozen = sum(p.numel() for m in model.frozen_modules() for p in m.parameters())
    assert frozen == 859_520_964 + 34_163_664 + 49_490_199 + 427_944_193


# a transformer-decoder weight in the middle of the path (layer 4 of 9, FFN output: no norm right after a
# bias-free map, so a 1.001 scale is not normalised away); the check reruns only the decoder (~1 s)
SENSITIVE_PARAMETER = "decoder.transformer_ffn_layers.4.linear2.weight"


def test_official_size_numerics_match_stored_slices(official):
    """One 512x512 tile through the whole path matches ``tests/data/numeric_guard/<variant>.json``; then a
    1.001 scale of one decoder weight is caught (only the decoder and open logits are recomputed)."""
    model = official.model
    run = ng.run_guard(model, model.config.name)
    reference = ng.assert_matches_reference(run)
    if model.config.classifier.kind == "caption":  # binary object head, no null class
        assert "decoder.pred_logits" in reference["stages"]
        assert reference["stages"]["classifier.open_logits"]["shape"][-1] == len(ng.VOCABULARY)

    decoder_stages = ng.rerun_decoder(model, run)
    assert ng.compare(reference, decoder_stages, stages=list(decoder_stages)) == []
    with ng.scaled_parameter(model, SENSITIVE_PARAMETER, 1.001):
        scaled = ng.rerun_decoder(model, run)
    messages = ng.compare(reference, scaled, stages=list(scaled))
    assert any(m.startswith("stage decoder.pred_masks:") for m in messages), messages
    assert ng.compare(reference, scaled, stages=["decoder.aux0.pred_masks", "decoder.aux4.pred_masks"]) == []
