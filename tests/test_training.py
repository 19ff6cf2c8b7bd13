"""Training flow: trainable set, gradient flow, one step, data determinism, resume, checkpoints, Ray Train.

Everything runs on the tiny model and a synthetic panoptic dataset written by
:func:`pipeline.train.data.write_synthetic_shapes_dataset` (shapes as things, textures as stuff).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import odise_model
from odise_model.build import build_components
from odise_model.config import load_config
from odise_model.training import LossConfig, TrainingModule, optimizer_param_groups
from odise_model.vocabulary import load_vocabulary
from pipeline.config import TrainConfig
from pipeline.groundtruth import iter_labeled_shards, read_categories
from pipeline.train.data import (
    DataPosition,
    TrainDataStream,
    class_index_map,
    extract_nouns,
    lsj_augment,
    noun_lexicon,
    vocabulary_from_categories,
    write_synthetic_shapes_dataset,
)
from pipeline.train.run import (
    TrainOutputError,
    TrainStateError,
    last_checkpoint,
    lr_multiplier,
    run_training,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("synthetic")
    train = str(root / "train")
    val = str(root / "val")
    write_synthetic_shapes_dataset(train, num_images=12, size=96, seed=1, samples_per_shard=5)
    write_synthetic_shapes_dataset(val, num_images=3, size=96, seed=2)
    return {"train": train, "val": val}


@pytest.fixture(scope="module")
def model():
    return odise_model.build_odise("tiny")


def _vocab(data):
    return vocabulary_from_categories(read_categories(data["train"]))


def _batch(data, n=2, crop=64):
    cats = read_categories(data["train"])
    stream = TrainDataStream(
        data["train"], class_index=class_index_map(_vocab(data), cats), crop_size=crop, seed=0
    )
    return stream.next_batch(n)


def _loss(module, samples, seed=0, words=None):
    losses = module(
        [s.image for s in samples],
        [{"labels": s.labels, "masks": s.masks} for s in samples],
        words,
        generator=torch.Generator().manual_seed(seed),
    )
    return sum(losses.values()), losses


# --------------------------------------------------------------------------------------------------------
# What trains
# --------------------------------------------------------------------------------------------------------
def test_trainable_set_and_optimizer_groups_tiny(model):
    trainable = dict(model.trainable_parameters())
    groups = optimizer_param_groups(model, lr=1e-4, weight_decay=0.05)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert in_groups == {id(p) for p in trainable.values()}
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(p.numel() for p in trainable.values())
    frozen = {id(p) for m in model.frozen_modules() for p in m.parameters()}
    assert not in_groups & frozen
    assert all(not p.requires_grad for m in model.frozen_modules() for p in m.parameters())
    decay = {n for g in groups if g["weight_decay"] == 0.05 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0.0 for n in g["names"]}
    # norms and biases: no decay; weights, embeddings, gates, temperature: decay (detectron2's rules)
    assert "projections.projections.0.0.conv1.norm.weight" in no_decay
    assert "decoder.decoder_norm.bias" in no_decay and "head.text_proj.bias" in no_decay
    assert {
        "head.text_proj.weight",
        "head.null_embed",
        "decoder.query_feat.weight",
        "captioner.alpha_cond",
        "decoder.post_mask_embed.logit_scale",
    } <= decay
    assert all(g["lr"] == 1e-4 for g in groups)


@pytest.mark.parametrize(
    "variant, expected", [("odise_label_coco", 28_067_009), ("odise_caption_coco", 28_066_755)]
)
def test_official_trainable_counts_without_allocating_sd_or_clip(variant, expected):
    model = build_components(load_config(variant), meta_sd=True, meta_clip=True)
    groups = optimizer_param_groups(model, lr=1e-4, weight_decay=0.05)
    assert sum(p.numel() for g in groups for p in g["params"]) == expected
    assert sum(p.numel() for _, p in model.trainable_parameters()) == expected
    assert all(p.device.type != "meta" for g in groups for p in g["params"])


def test_gradients_reach_the_captioner_through_the_unet_and_never_frozen_weights(data, model):
    model.zero_grad(set_to_none=True)
    model.train()
    module = TrainingModule(model, _vocab(data), losses=LossConfig(num_points=256))
    samples = _batch(data)
    total, _ = _loss(module, samples)
    total.backward()
    cap = model.captioner
    # the gates are zero at initialisation (the official init), so d/d(MLP) = 0 but d/d(gate) != 0: the gate only
    # enters through the UNet's cross-attention context and time embedding, so this gradient crossed the UNet
    assert cap.alpha_cond.grad is not None and float(cap.alpha_cond.grad.abs().sum()) > 0
    assert float(cap.alpha_cond_time_embed.grad.abs().sum()) > 0
    assert not any(p.grad is not None for m in model.frozen_modules() for p in m.parameters())
    # with open gates the MLP itself gets gradients
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        cap.alpha_cond.fill_(0.5)
        cap.alpha_cond_time_embed.fill_(0.5)
    try:
        total, _ = _loss(module, samples)
        total.backward()
        assert float(cap.clip_project.linear.weight.grad.abs().sum()) > 0
        assert float(cap.time_embed_project.linear.weight.grad.abs().sum()) > 0
        assert not any(p.grad is not None for m in model.frozen_modules() for p in m.parameters())
        assert all(p.grad is not None for _, p in model.trainable_parameters())
    finally:
        with torch.no_grad():
            cap.alpha_cond.zero_()
            cap.alpha_cond_time_embed.zero_()
        model.zero_grad(set_to_none=True)


def test_gradient_checkpointing_gives_the_same_gradients(data):
    model = odise_model.build_odise("tiny", seed=5).train()
    with torch.no_grad():
        model.captioner.alpha_cond.fill_(0.5)
        model.captioner.alpha_cond_time_embed.fill_(0.5)
    module = TrainingModule(model, _vocab(data), losses=LossConfig(num_points=256))
    samples = _batch(data)
    grads = {}
    for mode in ("none", "projections", "all"):
        model.set_gradient_checkpointing(mode)
        model.zero_grad(set_to_none=True)
        total, _ = _loss(module, samples)
        total.backward()
        grads[mode] = {n: p.grad.clone() for n, p in model.trainable_parameters()}
    assert model.sd.unet.is_gradient_checkpointing  # "all" reaches the UNet blocks
    for mode in ("projections", "all"):
        for name, grad in grads["none"].items():
            assert torch.allclose(grads[mode][name], grad, rtol=1e-4, atol=1e-6), (mode, name)
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model.set_gradient_checkpointing("some")


def test_one_step_changes_only_trainable_weights(data):
    model = odise_model.build_odise("tiny", seed=3).train()
    module = TrainingModule(model, _vocab(data), losses=LossConfig(num_points=256))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = optimizer_param_groups(model, lr=1e-3, weight_decay=0.05)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups])
    total, _ = _loss(module, _batch(data))
    optimizer.zero_grad()
    total.backward()
    with_grad = {
        n for n, p in model.named_parameters() if p.grad is not None and float(p.grad.abs().sum()) > 0
    }
    optimizer.step()
    trainable = {n for n, _ in model.trainable_parameters()}
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert with_grad <= changed
    assert len(with_grad) > 0.9 * len(trainable)
    assert {
        "head.text_proj.weight",
        "head.null_embed",
        "captioner.alpha_cond",
        "decoder.query_feat.weight",
    } <= changed


def test_caption_variant_losses_and_text_gradients(data):
    cfg = load_config("tiny").replace(classifier={"kind": "caption", "text_prompt": "photo"})
    model = odise_model.build_odise(cfg).train()
    module = TrainingModule(model, losses=LossConfig(num_points=128))
    samples = _batch(data)
    words = [["circle", "circle"], []]  # the second image has no words: its grounding terms are masked out
    total, losses = _loss(module, samples, words=words)
    assert {"loss_ce", "loss_mask", "loss_dice", "loss_mask_word", "loss_mask_word_0"} <= set(losses)
    assert module.criterion.num_classes == 1 and module.criterion.empty_weight.tolist() == pytest.approx(
        [1.0, 0.1]
    )
    total.backward()
    assert float(model.head.text_proj.weight.grad.abs().sum()) > 0
    assert float(model.decoder.class_embed.weight.grad.abs().sum()) > 0
    assert not any(p.grad is not None for m in model.frozen_modules() for p in m.parameters())


# --------------------------------------------------------------------------------------------------------
# Schedule and data
# --------------------------------------------------------------------------------------------------------
def test_lr_schedule_official_fractions():
    n = 92_188
    assert lr_multiplier(0, n) == pytest.approx(0.067)
    warmup = n * 500 / 184_375  # 250 iterations
    assert lr_multiplier(int(warmup / 2), n) == pytest.approx(
        0.067 + 0.933 * int(warmup / 2) / warmup, rel=1e-6
    )
    assert lr_multiplier(251, n) == 1.0
    assert lr_multiplier(int(0.8888 * n), n) == 1.0
    assert lr_multiplier(int(0.8890 * n), n) == pytest.approx(0.1)
    assert lr_multiplier(int(0.9629 * n), n) == pytest.approx(0.1)
    assert lr_multiplier(int(0.9631 * n), n) == pytest.approx(0.01)
    assert lr_multiplier(n - 1, n) == pytest.approx(0.01)


def test_lsj_augment_geometry():
    rng = np.random.default_rng(0)
    image = np.full((40, 80, 3), 7, dtype=np.uint8)
    ids = np.ones((40, 80), dtype=np.int32)
    out, out_ids = lsj_augment(image, ids, crop_size=64, min_scale=0.5, max_scale=0.5, rng=rng)
    # scale 0.5 of the crop: ratio = min(32/40, 32/80) = 0.4 -> 16 x 32, padded to 64 x 64
    assert out.shape == (64, 64, 3) and out_ids.shape == (64, 64)
    assert (out_ids[:16, :32] == 1).all() and (out_ids[16:] == 0).all() and (out_ids[:, 32:] == 0).all()
    assert (out[:16, :32] == 7).all() and (out[16:] == 128).all()
    big, big_ids = lsj_augment(image, ids, crop_size=64, min_scale=2.0, max_scale=2.0, rng=rng)
    assert (big_ids == 1).all() and (big == 7).all()  # 2x: 64 x 128 -> cropped to 64 x 64, no padding


def test_stream_is_deterministic_resumable_and_split_over_workers(data):
    cats = read_categories(data["train"])
    mapping = class_index_map(_vocab(data), cats)

    def stream(**kw):
        return TrainDataStream(
            data["train"], class_index=mapping, crop_size=64, seed=5, shuffle_buffer=4, **kw
        )

    one = stream()
    batches = [one.next_batch(4) for _ in range(5)]  # 20 samples: crosses into epoch 2 (12 per epoch)
    assert one.position == DataPosition(1, 8)
    keys = [[s.key for s in b] for b in batches]
    assert sorted(k for b in keys[:3] for k in b) == sorted(
        {k for b in keys[:3] for k in b}
    )  # epoch 1: no repeats
    # resuming at (1, 0) replays the rest exactly (images, targets, order)
    resumed = stream(position=DataPosition(1, 0))
    again = [resumed.next_batch(4) for _ in range(2)]
    for a, b in zip(batches[3:], again):
        assert [s.key for s in a] == [s.key for s in b]
        for x, y in zip(a, b):
            assert (
                torch.equal(x.image, y.image)
                and torch.equal(x.masks, y.masks)
                and torch.equal(x.labels, y.labels)
            )
    # two workers with 2 images each see exactly the samples of one worker with 4, augmented identically
    workers = [stream(rank=r, world_size=2) for r in range(2)]
    for batch in batches[:3]:
        split = workers[0].next_batch(2) + workers[1].next_batch(2)
        assert sorted(s.key for s in split) == sorted(s.key for s in batch)
        by_key = {s.key: s for s in batch}
        assert all(torch.equal(s.image, by_key[s.key].image) for s in split)
    # targets: class indices and non-empty masks; crowd segments never appear
    sample = batches[0][0]
    assert sample.image.shape == (3, 64, 64) and sample.masks.shape[1:] == (64, 64)
    assert sample.masks.flatten(1).any(1).all() and len(sample.labels) == len(sample.masks)


def test_caption_nouns_from_lexicon_and_stored_lists(tmp_path):
    lexicon = noun_lexicon(extra=["circle", "square"])
    assert extract_nouns("Two circles and a fire hydrant near the squares.", lexicon) == [
        "circle",
        "fire hydrant",
        "square",
    ]
    # "kitten" is an LVIS synonym (the default lexicon has every built-in list), found through its plural
    assert extract_nouns("Three kittens sit on benches.", noun_lexicon()) == ["kitten", "benches"]
    assert extract_nouns("", lexicon) == []
    # captions of the synthetic data name the categories: the extractor finds them with the category lexicon
    names = {"circle", "square", "triangle", "stripes", "noise"}
    write_synthetic_shapes_dataset(str(tmp_path / "a"), num_images=3, size=64, seed=0)
    stream = TrainDataStream(
        str(tmp_path / "a"),
        class_index={i: i - 1 for i in range(1, 6)},
        crop_size=64,
        num_words=8,
        lexicon=noun_lexicon(extra=names),
    )
    for sample in stream.next_batch(3):
        assert len(sample.words) == 8 and set(sample.words) <= names
    # a stored "nouns" list is used as is (no lexicon needed)
    write_synthetic_shapes_dataset(str(tmp_path / "b"), num_images=3, size=64, seed=0, store_nouns=True)
    stream = TrainDataStream(
        str(tmp_path / "b"), class_index={i: i - 1 for i in range(1, 6)}, crop_size=64, num_words=8
    )
    record = next(iter_labeled_shards(str(tmp_path / "b")))
    sample = stream.next_batch(1)[0]
    assert len(sample.words) == 8 and set(sample.words) <= names
    # without words (num_words=0, the label variant) nothing is sampled
    assert (
        TrainDataStream(str(tmp_path / "b"), class_index={i: i - 1 for i in range(1, 6)}, crop_size=64)
        .next_batch(1)[0]
        .words
        == []
    )
    assert record.caption


def test_one_of_several_captions_is_drawn_each_time_an_image_is_used(tmp_path):
    """COCO Captions has ~5 captions per image: the converter keeps them all, training draws one per use."""
    from test_groundtruth import make_coco_panoptic

    from pipeline.groundtruth import convert_coco_panoptic_to_shards

    json_path, png_dir, image_dir, _ = make_coco_panoptic(tmp_path / "coco")
    captions = {139: ["a person next to a car", "the sky", "a bicycle"], 285: "a car under the sky"}
    convert_coco_panoptic_to_shards(
        str(json_path), str(png_dir), str(image_dir), str(tmp_path / "s"), captions=captions
    )
    records = {r.image_id: r for r in iter_labeled_shards(str(tmp_path / "s"))}
    assert records[139].caption == "a person next to a car" and records[285].caption == "a car under the sky"
    meta = json.loads(next(iter(_members(tmp_path / "s", "139.segments.json"))))
    assert meta["captions"] == captions[139] and "captions" not in json.loads(
        next(iter(_members(tmp_path / "s", "285.segments.json")))
    )
    stream = TrainDataStream(
        str(tmp_path / "s"),
        class_index={1: 0, 2: 1, 3: 2},
        crop_size=16,
        num_words=4,
        lexicon=noun_lexicon(),
        seed=3,
    )
    per_caption = [{"person", "car"}, {"sky"}, {"bicycle"}]
    seen = set()
    for sample in stream.next_batch(45):  # 15 epochs of 3 images
        if sample.key == "139":
            owner = [i for i, nouns in enumerate(per_caption) if set(sample.words) <= nouns]
            assert len(sample.words) == 4 and len(owner) == 1, sample.words  # words of one caption only
            seen.add(owner[0])
        elif sample.key == "285":
            assert set(sample.words) <= {"car", "sky"}
    assert seen == {0, 1, 2}


def _members(folder, name):
    import tarfile

    for shard in sorted(Path(folder).glob("*.tar")):
        with tarfile.open(shard) as tar:
            if name in tar.getnames():
                yield tar.extractfile(name).read()


# --------------------------------------------------------------------------------------------------------
# The loop: checkpoints, metrics, resume, Ray
# --------------------------------------------------------------------------------------------------------
def _cfg(data, output, **kw) -> TrainConfig:
    base = dict(
        train=data["train"],
        val=data["val"],
        output=str(output),
        model="tiny",
        max_steps=4,
        batch_size=2,
        crop_size=64,
        num_points=128,
        checkpoint_every=2,
        eval_every=0,
        log_every=1,
        shuffle_buffer=4,
        seed=7,
    )
    base.update(kw)
    return TrainConfig(**base)


def _metrics(output) -> list[dict]:
    return [json.loads(line) for line in Path(output, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(data, tmp_path_factory):
    """4 uninterrupted steps, checkpoints at 2 and 4, evaluation at the end."""
    full = tmp_path_factory.mktemp("full")
    return full, run_training(_cfg(data, full))


def test_resume_gives_exactly_the_uninterrupted_next_steps(data, full_run, tmp_path):
    full, summary = full_run
    assert summary.steps == 4 and summary.start_step == 0
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == [
        "last_checkpoint",
        "model_0000002.pth",
        "model_0000004.pth",
    ]
    assert last_checkpoint(str(full)) == f"{full}/checkpoints/model_0000004.pth"
    records = _metrics(full)
    assert [r["step"] for r in records if r["type"] == "train"] == [1, 2, 3, 4]
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 4 and evals[0]["num_images"] == 3 and "PQ" in evals[0]

    # an interrupted run: only the step-2 checkpoint exists; resuming must redo steps 3-4 identically
    cut = tmp_path / "cut"
    (cut / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "model_0000002.pth", cut / "checkpoints")
    (cut / "checkpoints" / "last_checkpoint").write_text("model_0000002.pth")
    resumed = run_training(_cfg(data, cut, resume=True, val=None))
    assert resumed.start_step == 2 and resumed.steps == 4
    again = [r for r in _metrics(cut) if r["type"] == "train"]
    assert [r["step"] for r in again] == [3, 4]
    for a, b in zip([r for r in records if r["type"] == "train"][2:], again):
        assert a["losses"] == b["losses"] and a["lr"] == b["lr"]
    ref = torch.load(full / "checkpoints" / "model_0000004.pth", weights_only=True)
    got = torch.load(cut / "checkpoints" / "model_0000004.pth", weights_only=True)
    assert ref["model"].keys() == got["model"].keys()
    for key in ref["model"]:
        assert torch.equal(ref["model"][key], got["model"][key]), key
    assert ref["trainer"]["data"] == got["trainer"]["data"]
    for a, b in zip(
        ref["trainer"]["optimizer"]["state"].values(), got["trainer"]["optimizer"]["state"].values()
    ):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])

    # resuming a finished run does nothing; the checkpoints load as ODISE weights
    done = run_training(_cfg(data, full, resume=True, val=None))
    assert done.start_step == 4 and done.steps == 4
    loaded = odise_model.build_odise("tiny", checkpoint=str(full / "checkpoints" / "model_0000004.pth"))
    from odise_model.checkpoint import official_state_dict

    for key, value in official_state_dict(loaded).items():
        assert torch.equal(value, ref["model"][key]), key
    trainer = ref["trainer"]
    assert (
        trainer["step"] == 4
        and trainer["scheduler"]["max_steps"] == 4
        and "storage_options" not in trainer["config"]
    )
    assert load_vocabulary(["x"]) is not None and "circle" in trainer["vocabulary"]


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_new_run_into_an_existing_output_is_refused_and_changes_nothing(data, full_run, tmp_path, capsys):
    """Without resume, an output holding a run (metrics, summary or checkpoints) is refused, naming it; its files
    stay byte for byte. ``odise-train`` says so with exit code 2, before Prefect or Ray start."""
    full, _ = full_run
    before = _tree(full)
    with pytest.raises(TrainOutputError, match=rf"output {full} already holds a training run.*--resume"):
        run_training(_cfg(data, full))
    assert _tree(full) == before
    # checkpoints alone (metrics and summary gone) are still a run
    partial = tmp_path / "partial"
    shutil.copytree(full / "checkpoints", partial / "checkpoints")
    with pytest.raises(TrainOutputError, match="checkpoints/"):
        run_training(_cfg(data, partial))
    # an empty existing folder is fine to start in (checked only, not run here)
    from pipeline.train.run import check_output

    (tmp_path / "empty").mkdir()
    check_output(_cfg(data, tmp_path / "empty"))

    from flows.cli import train_main

    argv = ["--train", data["train"], "--output", str(full), "--model", "tiny", "--max-steps", "4"]
    assert train_main(argv) == 2
    err = capsys.readouterr().err
    assert f"odise-train: error: output {full} already holds a training run" in err and "--resume" in err
    assert _tree(full) == before


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"  \n", "is empty"),
        (b"model_00000", "does not name a checkpoint file"),  # torn mid-name
        (b"model_0000006.pth", "names model_0000006.pth, which is not in"),
        (b"../../etc/passwd.pth", "does not name a checkpoint file"),
        (None, "is missing but"),
    ],
)
def test_a_damaged_last_checkpoint_fails_loudly_naming_the_file(data, full_run, tmp_path, content, message):
    """An empty, torn or dangling ``last_checkpoint`` (or checkpoints without one) never restarts at step 0."""
    full, _ = full_run
    out = tmp_path / "run"
    shutil.copytree(full / "checkpoints", out / "checkpoints")
    shutil.copy(full / "metrics.jsonl", out / "metrics.jsonl")
    pointer = out / "checkpoints" / "last_checkpoint"
    if content is None:
        pointer.unlink()
    else:
        pointer.write_bytes(content)
    before = _tree(out)
    with pytest.raises(TrainStateError, match=rf"{pointer}.*{message}"):
        last_checkpoint(str(out))
    with pytest.raises(TrainStateError, match=rf"{pointer}.*{message}"):
        run_training(_cfg(data, out, resume=True, val=None))
    assert _tree(out) == before  # nothing was trained, nothing rewritten (metrics.jsonl included)


def test_resume_into_an_output_without_checkpoints_starts_at_step_0(data, tmp_path):
    assert last_checkpoint(str(tmp_path / "nothing")) is None
    (tmp_path / "nothing" / "checkpoints").mkdir(parents=True)
    assert last_checkpoint(str(tmp_path / "nothing")) is None


def test_checkpoints_are_fsynced_before_last_checkpoint_names_them(data, tmp_path, monkeypatch):
    """Order of durable writes in a run (os.fsync / os.replace observed, then called as usual): each checkpoint's
    bytes are fsync'ed and renamed into place, and its folder fsync'ed, before ``last_checkpoint`` is replaced;
    ``last_checkpoint`` is itself written to a temp file, fsync'ed and renamed (never truncated in place)."""
    import os

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", os.fspath(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "run"
    run_training(_cfg(data, out, max_steps=2, checkpoint_every=1, val=None))
    monkeypatch.undo()
    ckpt_dir = str(out / "checkpoints")
    pointer = f"{ckpt_dir}/last_checkpoint"
    for step in (1, 2):
        ckpt = f"{ckpt_dir}/model_{step:07d}.pth"
        renamed = events.index(("replace", ckpt))
        fsynced = max(
            i for i, (kind, path) in enumerate(events[:renamed]) if kind == "fsync" and "model_" in path
        )
        dir_synced = events.index(("fsync", ckpt_dir), renamed)
        pointed = [i for i, e in enumerate(events) if e == ("replace", pointer)][step - 1]
        assert fsynced < renamed < dir_synced < pointed
        assert events[pointed - 1][0] == "fsync" and ".last_checkpoint.tmp-" in events[pointed - 1][1]
    assert pointer not in [path for kind, path in events if kind == "fsync"]  # never written in place
    assert (out / "checkpoints" / "last_checkpoint").read_text() == "model_0000002.pth"
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]


def test_ray_runs_refuse_credentials_in_storage_options_before_ray_starts(data, tmp_path):
    """Ray Train keeps train_loop_config in its run state: credential values never go there."""
    import ray

    was_running = ray.is_initialized()
    cfg = _cfg(
        data,
        tmp_path / "r",
        use_ray=True,
        storage_options={"client_kwargs": {"endpoint_url": "http://u:CANARYpw@127.0.0.1:9"}},
    )
    with pytest.raises(ValueError, match=r"storage_options\['client_kwargs'\]\['endpoint_url'\]") as info:
        run_training(cfg)
    assert "CANARYpw" not in str(info.value)
    with pytest.raises(ValueError, match=r"storage_options\['secret'\]"):
        run_training(_cfg(data, tmp_path / "r", use_ray=True, storage_options={"secret": "s"}))
    assert ray.is_initialized() == was_running


def test_trained_checkpoint_runs_through_the_predictor(data, full_run):
    model = odise_model.build_odise("tiny", checkpoint=last_checkpoint(str(full_run[0])))
    vocab = vocabulary_from_categories(read_categories(data["val"]))
    record = next(iter_labeled_shards(data["val"]))
    result = odise_model.Predictor(model, vocab, use_clip=False).predict([record.decode_image()])[0]
    assert result.panoptic_seg.shape == record.id_map.shape
    assert {s.category_id for s in result.segments} <= set(vocab.ids)


def test_config_validation(data, tmp_path):
    with pytest.raises(ValueError, match="multiple of num_workers"):
        _cfg(data, tmp_path, batch_size=3, num_workers=2)
    with pytest.raises(ValueError, match="Extra inputs"):
        TrainConfig(train=data["train"], output=str(tmp_path), max_step=3)
    assert TrainConfig(train="x", output="s3://b/out/").output == "s3://b/out"
    assert (
        not TrainConfig(train="x", output="o").uses_ray
        and TrainConfig(train="x", output="o", num_workers=2, batch_size=2).uses_ray
    )


# The Ray Train path (TorchTrainer, one CPU worker, through the train flow with a Secret block) is run by
# tests/test_credentials_canary.py::test_ray_train_run_state_holds_no_block_credentials.
