"""build_odise refuses to hand out random weights for a variant that has official ones unless asked to."""

from __future__ import annotations

import json

import pytest

import odise_model
from odise_model.resources import config_file


@pytest.mark.parametrize("variant", ["odise_label_coco", "odise_caption_coco"])
def test_official_variant_without_weights_raises_at_once(variant):
    with pytest.raises(
        ValueError, match=rf"build_odise\('{variant}'\) without weights .*RANDOM weights"
    ) as err:
        odise_model.build_odise(variant)
    msg = str(err.value)
    assert "pretrained=True" in msg and "random_weights=True" in msg and "checkpoint=" in msg


def test_random_weights_flag_and_tiny_variants(tmp_path):
    # a variant that names official weights (here a tiny-sized copy, so the test stays fast)
    raw = json.loads(config_file("models", "tiny.json").read_text())
    raw.update(name="tiny_with_release", official_checkpoint="odise_label_coco_50e")
    path = tmp_path / "tiny_with_release.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="random_weights=True"):
        odise_model.build_odise(str(path))
    model = odise_model.build_odise(str(path), random_weights=True, seed=1)
    assert model.config.name == "tiny_with_release"
    assert all(v is None for v in model.weight_provenance.values())
    # the tiny variants are random by design: no flag needed, same weights with or without it
    plain, flagged = (
        odise_model.build_odise("tiny", seed=2),
        odise_model.build_odise("tiny", seed=2, random_weights=True),
    )
    assert all(
        (a == b).all()
        for a, b in zip(plain.state_dict().values(), flagged.state_dict().values(), strict=True)
    )
