"""The official-size variants build on CPU with random weights and train exactly the official parameters."""

from __future__ import annotations

import csv
import gc

import pytest

import odise_model
from odise_model.checkpoint import ODISE_CKPT_MODULES, to_official_key
from odise_model.resources import config_file

pytestmark = [pytest.mark.slow, pytest.mark.full_size]


def _manifest(name):
    with open(config_file("manifests", f"{name}.keys.tsv"), newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


@pytest.mark.parametrize(
    "variant, manifest, trainable",
    [("odise_label_coco", "odise_label_coco_50e", 28_067_009), ("odise_caption_coco", "odise_caption_coco_50e", 28_066_755)],
)
def test_official_size_builds_with_random_weights(variant, manifest, trainable):
    model = odise_model.build_odise(variant, random_weights=True)
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
    clip_rows = {r["key"].split("clip_head.clip.clip.", 1)[1]: r["shape"] for r in rows
                 if r["key"].startswith("clip_head.clip.clip.") and r["kind"] != "buffer_nonpersistent"}
    assert {k: str(list(v.shape)) for k, v in model.clip.model.state_dict().items()} == clip_rows
    # frozen parameters: SD UNet + VAE (+ one CLIP) instead of three CLIPs and SD's text encoder
    frozen = sum(p.numel() for m in model.frozen_modules() for p in m.parameters())
    assert frozen == 859_520_964 + 34_163_664 + 49_490_199 + 427_944_193
    del model
    gc.collect()
