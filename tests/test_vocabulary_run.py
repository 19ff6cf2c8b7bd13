"""Inline vocabularies, caption classes and the demo preset in a run: the config, the command line, the flow's
parameters and an annotation run end to end (tiny model, local Ray, real files)."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from flows.params import ParameterError, annotate_config
from odise_model.vocabulary import VocabularyError, load_vocabulary, parse_inline_vocabulary
from pipeline.annotate.checks import resolve_vocabulary
from pipeline.config import PRESETS, AnnotateConfig, TrainConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def cfg(**kw) -> AnnotateConfig:
    return AnnotateConfig(input="shards", output="out", **kw)


# --- the config: precedence and the preset ---------------------------------------------------------------
def test_vocabulary_sources_and_default():
    assert cfg().vocab_file == "coco_panoptic" and resolve_vocabulary(cfg()) == load_vocabulary(
        "coco_panoptic"
    )
    # inline classes alone replace the default vocab_file ...
    inline = cfg(vocab="person, man; sky [stuff]")
    assert inline.vocab_file is None and inline.vocab == ["person, man", "sky [stuff]"]
    assert resolve_vocabulary(inline) == parse_inline_vocabulary("person, man; sky [stuff]")
    # ... as a list too (the flow parameter; an item may hold several classes)
    assert cfg(vocab=["person, man", "sky [stuff]"]).vocab == inline.vocab
    # an explicit vocab_file is kept and comes first; merge_vocab is merged after everything
    both = cfg(vocab_file="ade20k_150", vocab="forklift", merge_vocab=["coco_panoptic"])
    vocab = resolve_vocabulary(both)
    assert vocab.names[:2] == ["wall", "building"] and vocab.names[150] == "forklift"
    assert (
        len(vocab)
        == 150 + 1 + len(load_vocabulary("ade20k_150").merge(load_vocabulary("coco_panoptic"))) - 150
    )
    assert both.vocabulary_spec == "ade20k_150 + vocab 'forklift' + coco_panoptic"
    caption = cfg(caption="A man walking a dog on the beach.")
    assert caption.vocab_file is None and resolve_vocabulary(caption).names == ["man", "dog", "beach"]
    assert cfg(merge_vocab=["ade20k_150"]).vocab_file == "coco_panoptic"  # as before: coco + ade


def test_demo_preset_settings_and_overrides():
    assert PRESETS["demo"] == {"overlap_threshold": 0.0, "alpha": 0.35, "beta": 0.65}
    demo = cfg(preset="demo")
    assert (demo.overlap_threshold, demo.alpha, demo.beta) == (0.0, 0.35, 0.65)
    assert demo.object_mask_threshold is None  # the demo keeps the model's (0.0 in the official config)
    assert demo.vocab_file is None and len(resolve_vocabulary(demo)) == 1486
    assert demo.vocabulary_spec == "preset demo: coco_panoptic + ade20k_150 + lvis_1203"
    # explicit settings win over the preset's
    mine = cfg(preset="demo", alpha=0.3, overlap_threshold=0.8, vocab="forklift; pallet [stuff]")
    assert (mine.overlap_threshold, mine.alpha, mine.beta) == (0.8, 0.3, 0.65)
    vocab = resolve_vocabulary(mine)
    assert len(vocab) == 2 + 1486 and vocab.names[:3] == ["forklift", "pallet", "person"]
    assert vocab[1].isthing  # user classes are things in the demo, whatever their marker
    # an explicit vocab_file is a user source too; merge_vocab replaces the demo's three lists
    both = resolve_vocabulary(cfg(preset="demo", vocab_file="ade20k_150", merge_vocab=["coco_panoptic"]))
    assert len(both) == 150 + 133 and all(c.isthing for c in both.categories[:150])
    with pytest.raises(ValueError, match="preset"):
        cfg(preset="fast")


def test_bad_vocabulary_parameters_name_the_class():
    with pytest.raises(
        ParameterError, match=r"invalid parameter vocab=.*vocab: class 2 \('dog,,puppy'\): empty synonym"
    ):
        annotate_config({"input": "x", "output": "o", "vocab": "cat; dog,,puppy"})
    with pytest.raises(ParameterError, match=r"vocab: class 3 \('Cat'\): duplicate class 'Cat'"):
        annotate_config({"input": "x", "output": "o", "vocab": ["cat", "dog; Cat"]})
    with pytest.raises(ParameterError, match=r"invalid parameter caption='slowly'.*no known noun"):
        annotate_config({"input": "x", "output": "o", "caption": "slowly"})
    with pytest.raises(ParameterError, match="give vocab_file, vocab, caption, merge_vocab or preset"):
        annotate_config({"input": "x", "output": "o", "vocab_file": ""})
    with pytest.raises(VocabularyError):
        parse_inline_vocabulary("cat;;dog")


def test_command_line_and_flow_parameters():
    from flows.annotate import annotate
    from flows.cli import _options_from, build_annotate_parser

    parser = build_annotate_parser()
    argv = [
        "--input",
        "x",
        "--output",
        "o",
        "--vocab",
        "person, man; sky [stuff]",
        "--caption",
        "a dog",
        "--preset",
        "demo",
    ]
    params = _options_from(parser.parse_args(argv), AnnotateConfig)
    assert params["vocab"] == ["person, man; sky [stuff]"] and params["preset"] == "demo"
    config = annotate_config(params)
    assert (
        config.vocab == ["person, man", "sky [stuff]"] and config.caption == "a dog" and config.alpha == 0.35
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--input", "x", "--output", "o", "--preset", "fast"])
    # the flow: list or string parameter, caption, preset; no vocab_file default that would add COCO
    sig = inspect.signature(annotate.fn)
    assert {"vocab", "caption", "preset"} <= set(sig.parameters) and sig.parameters[
        "vocab_file"
    ].default is None
    schema = annotate.parameters.model_dump()["properties"]
    assert {"vocab", "caption", "preset"} <= set(schema)


def test_training_vocabulary_of_a_demo_output_keeps_repeated_names():
    """categories.json of a --preset demo output repeats display names; training builds its vocabulary anyway."""
    from pipeline.train.data import class_index_map, training_vocabulary, vocabulary_from_categories

    demo = resolve_vocabulary(cfg(preset="demo"))
    categories = {c["id"]: c for c in demo.coco_categories()}
    vocab = training_vocabulary(None, categories)
    assert vocab.names == demo.names and vocab.names.count("person") == 3
    assert [c.synonyms for c in vocab] == [c.synonyms for c in demo]
    assert class_index_map(vocab, categories) == {c.id: k for k, c in enumerate(demo)}
    # names only (no synonyms), repeated: still one class per id
    plain = vocabulary_from_categories(
        {1: {"name": "person", "isthing": 1}, 2: {"name": "Person", "isthing": 0}}
    )
    assert [(c.id, c.name, c.isthing) for c in plain] == [(1, "person", True), (2, "Person", False)]


# --- a run --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_preset_run_end_to_end(tmp_path, ray_local):
    """odise-annotate's pipeline with the demo preset, inline classes and a caption: the ~1.5k-class list
    reaches the model replicas (as canonical text, repeats included), the thresholds are the demo's, and
    the provenance records the inline vocabulary. Then the loop on that output, whose display names repeat
    (COCO's, ADE's and LVIS's ``person``): convert to training shards, train 2 steps, score the output
    against the converted shards."""
    import shutil

    from pipeline.annotate.run import run_annotation

    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(EXAMPLES / "images" / "astronaut.jpg", images)  # one image: the vocabulary is the point
    out = tmp_path / "out"
    config = AnnotateConfig(
        input=str(images),
        output=str(out),
        model="tiny",
        vocab="black pickup truck, pickup truck; blue sky, sky [stuff]",
        caption="A woman holding a helmet next to a flag.",
        preset="demo",
        num_cpus=2,
        overlays=0,
        batch_size=2,
        no_progress_timeout_s=240,
    )
    summary = run_annotation(config)
    assert summary.labelled == summary.images > 0 and summary.errors == 0

    provenance = json.loads((out / "provenance.json").read_text())
    names = [c["name"] for c in provenance["categories"]]
    assert len(names) == 2 + 3 + 1486  # woman, helmet, flag from the caption
    assert names[:6] == ["black pickup truck", "blue sky", "woman", "helmet", "flag", "person"]
    assert [c["id"] for c in provenance["categories"]] == list(range(1, len(names) + 1))
    assert all(c["isthing"] for c in provenance["categories"][:5])
    assert provenance["thresholds"]["overlap_threshold"] == 0.0
    assert (provenance["thresholds"]["alpha"], provenance["thresholds"]["beta"]) == (0.35, 0.65)
    assert provenance["settings"]["vocabulary"] == {
        "vocab_file": None,
        "vocab": ["black pickup truck, pickup truck", "blue sky, sky [stuff]"],
        "caption": "A woman holding a helmet next to a flag.",
        "merge_vocab": [],
        "preset": "demo",
    }
    assert provenance["vocabulary_source"].startswith("preset demo: (vocab 'black pickup truck")
    assert provenance["vocabulary_sha256"] == resolve_vocabulary(config).sha256()
    rows = pads.dataset(str(out / "parquet"), format="parquet").to_table().to_pylist()
    ids = {c["id"]: c["name"] for c in provenance["categories"]}
    segments = [s for r in rows if r["error"] is None for s in r["segments"]]
    assert segments and all(ids[s["category_id"]] == s["category_name"] for s in segments)

    # the loop on a demo-labelled output: repeated display names are separate classes, told apart by id
    from pipeline.evaluate.run import EvaluateConfig, run_evaluation
    from pipeline.export.loop import annotate_to_shards
    from pipeline.groundtruth import read_categories
    from pipeline.train.data import training_vocabulary
    from pipeline.train.run import run_training

    assert names.count("person") == 3 and len(set(names)) < len(names)
    data = tmp_path / "data" / "train"
    converted = annotate_to_shards(str(out), str(data))
    assert converted.samples == summary.labelled
    categories = read_categories(str(data))
    vocab = training_vocabulary(None, categories, source=str(data / "categories.json"))
    assert len(vocab) == len(names) and vocab.names.count("person") == 3 and vocab.has_repeats()
    trained = run_training(
        TrainConfig(train=str(data), output=str(tmp_path / "run"), model="tiny", max_steps=2, batch_size=1,
                    crop_size=64, num_points=256, log_every=1, checkpoint_every=2, eval_every=0)
    )  # fmt: skip
    assert trained.steps == 2 and list((tmp_path / "run" / "checkpoints").glob("model_*.pth"))
    scored = run_evaluation(
        EvaluateConfig(ground_truth_shards=str(data), predictions=str(out), instance_ap=False)
    )
    assert scored.num_images == summary.labelled and scored.overall.pq == pytest.approx(1.0)
