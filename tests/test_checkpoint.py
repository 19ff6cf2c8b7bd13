"""Weights on the tiny model: official file layouts, every source a user can name, and every failure.

Files are written in the three official layouts at tiny sizes:

* ODISE: ``save_checkpoint`` -> ``{"model": {official keys}}``;
* Stable Diffusion: an original single file (``{"state_dict": ...}`` with ldm names, the schedule buffers,
  ``position_ids`` and PyTorch-Lightning callback metadata, as ``sd-v1-3.ckpt`` has) and a diffusers folder
  written with ``save_pretrained``. The ldm names are not hand-written: they are the SD key names of the official
  manifest, matched to our diffusers names by running diffusers' own ``convert_ldm_*`` on them (the tiny UNet /
  VAE have SD v1's block structure, so the names are the same, only the sizes differ);
* CLIP: OpenAI layout, as a ``torch.save``'d state dict and as a TorchScript archive (fp16 where OpenAI's file is).

Servers are real: moto (S3) from conftest and ``http.server`` on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import http.server
import json
import os
import pickle
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import openai_fp16
from torch import nn

import odise_model
from odise_model.build import build_sd_text_encoder
from odise_model.checkpoint import ODISE_CKPT_MODULES, from_official_key, to_official_key
from odise_model.resources import config_file
from odise_model.safe_load import MetadataPlaceholder, read_checkpoint_file
from odise_model.sd_convert import empty_prompt_embedding, sd_prompt_token_ids
from odise_model.weights_errors import CheckpointError, WeightsNotFoundError
from odise_model.weights_sources import default_cache_dir

SD_PREFIX = "backbone.feature_extractor.ldm_extractor.ldm.ldm."
VOCAB = ["person", "cat", "cup", "sky", "grass"]


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's caches (ours, with its sha256 memo, and Hugging Face's) or model zoo."""
    monkeypatch.setenv("ODISE_CACHE", str(tmp_path / "default-cache"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "default-hf-cache"))
    monkeypatch.delenv("ODISE_MODEL_ZOO", raising=False)
    monkeypatch.delenv("ODISE_OFFLINE", raising=False)


# ------------------------------------------------------------------------------------------------------
# helpers: official layouts at tiny sizes
# ------------------------------------------------------------------------------------------------------
def _manifest(name: str = "odise_label_coco_50e") -> list[dict[str, str]]:
    with open(config_file("manifests", f"{name}.keys.tsv"), newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def ldm_names_for(cfg) -> dict[str, str]:
    """Our diffusers UNet / VAE key (``unet.*`` / ``vae.*``) -> original ldm key, derived, not hand-written.

    Each SD v1 key of the official manifest gets a distinct dummy tensor of its rank; diffusers'
    ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` rename them, and tensor identity says
    which original key became which diffusers key.
    """
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    probe = {}
    for row in _manifest():
        key = row["key"].removeprefix(SD_PREFIX)
        if row["key"].startswith(SD_PREFIX) and key.startswith(
            ("model.diffusion_model.", "first_stage_model.")
        ):
            probe[key] = torch.zeros([1] * len(json.loads(row["shape"])))
    by_ptr = {t.data_ptr(): k for k, t in probe.items()}
    out = {}
    for part, converted in (
        ("unet", convert_ldm_unet_checkpoint(probe, dict(cfg.stable_diffusion.unet))),
        ("vae", convert_ldm_vae_checkpoint(probe, dict(cfg.stable_diffusion.vae))),
    ):
        out.update({f"{part}.{k}": by_ptr[t.data_ptr()] for k, t in converted.items()})
    return out


def sd_single_file_state(model, text_encoder) -> dict[str, torch.Tensor]:
    """The tiny model's SD (+ a text encoder) as an original single-file ``state_dict`` (ldm names)."""
    names = ldm_names_for(model.config)
    rank = {r["key"].removeprefix(SD_PREFIX): len(json.loads(r["shape"])) for r in _manifest()}
    state = {}
    for part, module in (("unet", model.sd.unet), ("vae", model.sd.vae)):
        for key, value in module.state_dict().items():
            ldm = names[f"{part}.{key}"]  # KeyError = the tiny model has a key SD v1 does not have
            value = value.detach().clone()
            while (
                value.ndim < rank[ldm]
            ):  # VAE attention: diffusers Linear [C, C] <- ldm 1x1 conv [C, C, 1, 1]
                value = value[..., None]
            state[ldm] = value
    for key, value in text_encoder.state_dict().items():
        state[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = (
            value.detach().clone()
        )
    # what else the official file holds: the DDPM schedule buffers and position_ids (ignored when loading)
    for row in _manifest():
        key = row["key"].removeprefix(SD_PREFIX)
        if row["key"].startswith(SD_PREFIX) and row["kind"] == "buffer" and "." not in key:
            state[key] = torch.rand(json.loads(row["shape"]))
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    return state


@contextlib.contextmanager
def fake_lightning():
    """A stand-in ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` so a pickle can name it,
    as SD v1 ``.ckpt`` files do (the loader must read such files without importing anything)."""
    names = [
        "pytorch_lightning",
        "pytorch_lightning.callbacks",
        "pytorch_lightning.callbacks.model_checkpoint",
    ]
    saved = {n: sys.modules.get(n) for n in names}
    mods = {n: types.ModuleType(n) for n in names}
    cls = type("ModelCheckpoint", (), {"__module__": names[-1]})
    mods[names[-1]].ModelCheckpoint = cls
    mods[names[0]].callbacks = mods[names[1]]
    mods[names[1]].model_checkpoint = mods[names[2]]
    sys.modules.update(mods)
    try:
        yield cls
    finally:
        for n in names:
            if saved[n] is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = saved[n]


def write_sd_ckpt(path, state: dict[str, torch.Tensor]) -> None:
    """``torch.save`` in the PyTorch-Lightning layout of ``sd-v1-3.ckpt`` (with callback metadata)."""
    with fake_lightning() as model_checkpoint:
        callback = model_checkpoint()
        callback.best_model_path = "logs/last.ckpt"
        callback.best_model_score = np.float64(0.25)
        torch.save(
            {
                "epoch": 6,
                "global_step": 470000,
                "pytorch-lightning_version": "1.4.2",
                "callbacks": {model_checkpoint: {"best_model_score": np.float64(0.25)}, "instance": callback},
                "state_dict": state,
            },
            path,
        )


def openai_clip_state(model, *, fp16: bool) -> dict[str, torch.Tensor]:
    """CLIP in the OpenAI file layout: our names + the metadata entries; with ``fp16`` the tensors OpenAI's
    ``convert_weights`` halves (Linear / Conv / attention weights, projections) are fp16, the rest fp32."""
    state = {}
    for key, value in model.clip.model.state_dict().items():
        value = value.detach().clone()
        if fp16 and openai_fp16(key):
            value = value.half()
        state[key] = value
    state.update(
        input_resolution=torch.tensor(model.config.clip.image_size),
        context_length=torch.tensor(77),
        vocab_size=torch.tensor(49408),
    )
    return state


class _Holder(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript(path, state: dict[str, torch.Tensor]) -> None:
    """A TorchScript archive whose ``state_dict()`` has exactly ``state``'s names (like OpenAI's ``.pt``)."""
    root = _Holder()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if getattr(module, name, None) is None:
                module.add_module(name, _Holder())
            module = getattr(module, name)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value, requires_grad=False))
        else:
            module.register_buffer(leaf, value)
    torch.jit.script(root).save(str(path))


def small_photos() -> list[np.ndarray]:
    import skimage.data

    return [skimage.data.astronaut()[100:196, 150:278], skimage.data.coffee()[:112, :80]]


def predictions(model) -> list:
    return odise_model.Predictor(model, VOCAB, batch_size=2).predict(small_photos())


def assert_same_predictions(a, b) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b):
        np.testing.assert_array_equal(ra.panoptic_seg, rb.panoptic_seg)
        np.testing.assert_array_equal(ra.semantic_seg, rb.semantic_seg)
        assert ra.segments == rb.segments
        assert [(i.category_id, i.score) for i in ra.instances] == [
            (i.category_id, i.score) for i in rb.instances
        ]


def assert_same_tensors(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, different[:10]
    if hasattr(a, "captioner"):
        assert torch.equal(a.captioner.uncond_context, b.captioner.uncond_context)


# ------------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference():
    """The tiny model whose weights every file below holds, and its SD text encoder."""
    model = odise_model.build_odise("tiny", seed=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(11)
        text_encoder = build_sd_text_encoder(model.config)
    model.captioner.set_uncond_context(empty_prompt_embedding(text_encoder))
    return model, text_encoder


@pytest.fixture(scope="module")
def files(reference, tmp_path_factory):
    model, text_encoder = reference
    root = tmp_path_factory.mktemp("weights")
    out = {
        "root": root,
        "odise": root / "odise_tiny.pth",
        "sd_ckpt": root / "sd-tiny.ckpt",
        "sd_dir": root / "sd-tiny-diffusers",
        "clip": root / "clip-tiny.pt",
        "clip_ts": root / "clip-tiny-ts.pt",
        "clip_fp16": root / "clip-tiny-fp16.pt",
    }
    odise_model.save_checkpoint(model, out["odise"])
    write_sd_ckpt(out["sd_ckpt"], sd_single_file_state(model, text_encoder))
    model.sd.unet.save_pretrained(out["sd_dir"] / "unet")
    model.sd.vae.save_pretrained(out["sd_dir"] / "vae")
    text_encoder.save_pretrained(out["sd_dir"] / "text_encoder")
    torch.save(openai_clip_state(model, fp16=False), out["clip"])
    write_torchscript(out["clip_ts"], openai_clip_state(model, fp16=False))
    torch.save(openai_clip_state(model, fp16=True), out["clip_fp16"])
    return out


@pytest.fixture(scope="module")
def reference_predictions(reference):
    return predictions(reference[0])


# ------------------------------------------------------------------------------------------------------
# key map, tokens, file layout
# ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "manifest, kind", [("odise_label_coco_50e", "label"), ("odise_caption_coco_50e", "caption")]
)
def test_key_map_is_one_table_used_both_ways(manifest, kind):
    in_ckpt = [r["key"] for r in _manifest(manifest) if r["in_ckpt"] == "yes"]
    assert len(in_ckpt) == {"label": 399, "caption": 400}[kind]
    for key in in_ckpt:
        ours = from_official_key(key, kind)
        assert ours is not None and ours.startswith(ODISE_CKPT_MODULES), key
        assert to_official_key(ours, kind) == key
    frozen = [r["key"] for r in _manifest(manifest) if r["in_ckpt"] == "no"]
    assert all(from_official_key(k, kind) is None for k in frozen if ".clip." in k or "ldm_extractor" in k)


def test_empty_prompt_tokens_match_the_sd_tokenizer():
    assert sd_prompt_token_ids("").tolist() == [[49406] + [49407] * 76]
    ids = sd_prompt_token_ids("a photo of a cat").tolist()[0]
    assert len(ids) == 77 and ids[0] == 49406 and ids[6:] == [49407] * 71 and 49407 not in ids[1:6]


def test_saved_file_has_the_official_layout(reference, files):
    model, _ = reference
    raw = torch.load(files["odise"], map_location="cpu", weights_only=True)
    assert list(raw) == ["model"]
    official = {r["key"] for r in _manifest() if r["in_ckpt"] == "yes"}
    # the tiny model has fewer layers: its keys are official names that exist at tiny depth
    expected = {to_official_key(k, "label") for k in model.state_dict() if k.startswith(ODISE_CKPT_MODULES)}
    assert set(raw["model"]) == expected
    assert {
        k for k in raw["model"] if not k.startswith(("sem_seg_head.", "backbone.feature_projections."))
    } <= official
    assert all(v.dtype == torch.float32 for v in raw["model"].values())
    assert torch.equal(raw["model"]["category_head.text_proj.weight"], model.head.text_proj.weight)
    assert torch.equal(raw["model"]["criterion.empty_weight"], model.head.empty_weight)


def test_saving_with_trainer_state_and_to_s3(reference, tmp_path, s3_bucket, s3_storage_options):
    model, _ = reference
    path = tmp_path / "with-trainer.pth"
    odise_model.save_checkpoint(model, path, extra={"iteration": 5, "trainer": {"lr": torch.tensor(0.1)}})
    assert set(torch.load(path, weights_only=True)) == {"model", "iteration", "trainer"}
    loaded = odise_model.build_odise("tiny", checkpoint=str(path), seed=3)  # trainer state ignored
    assert torch.equal(loaded.head.text_proj.weight, model.head.text_proj.weight)
    url = f"s3://{s3_bucket}/ckpt/odise.pth"
    digest = odise_model.save_checkpoint(model, url, storage_options=s3_storage_options)
    import fsspec

    with fsspec.open(url, "rb", **s3_storage_options) as fh:
        import hashlib

        assert hashlib.sha256(fh.read()).hexdigest() == digest


# ------------------------------------------------------------------------------------------------------
# round trips
# ------------------------------------------------------------------------------------------------------
def test_round_trip_all_official_layouts_identical_tensors_and_predictions(
    reference, files, reference_predictions
):
    model, _ = reference
    loaded = odise_model.build_odise(
        "tiny", checkpoint=files["odise"], sd_weights=files["sd_ckpt"], clip_weights=files["clip"], seed=99
    )
    assert_same_tensors(model, loaded)
    assert_same_predictions(reference_predictions, predictions(loaded))
    prov = loaded.weight_provenance
    assert prov["checkpoint"]["path"] == str(files["odise"]) and len(prov["sd"]["sha256"]) == 64


def test_round_trip_checkpoint_only(reference, files):
    model, _ = reference
    loaded = odise_model.build_odise("tiny", checkpoint=str(files["odise"]), seed=3)
    trained = {k: v for k, v in model.state_dict().items() if k.startswith(ODISE_CKPT_MODULES)}
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in trained.items())


def test_sd_diffusers_folder_gives_the_same_features(reference, files):
    model, _ = reference
    loaded = odise_model.build_odise(
        "tiny", checkpoint=files["odise"], sd_weights=files["sd_dir"], clip_weights=files["clip"], seed=99
    )
    assert_same_tensors(model, loaded)
    image = torch.rand(3, 64, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model.backbone_features([image]), loaded.backbone_features([image])
    assert ours[0].keys() == theirs[0].keys()
    assert all(torch.equal(ours[0][k], theirs[0][k]) for k in ours[0])


def test_sd_single_file_reads_lightning_metadata_without_importing_it(files):
    imported = "pytorch_lightning" in sys.modules
    raw = read_checkpoint_file(files["sd_ckpt"])
    assert ("pytorch_lightning" in sys.modules) == imported  # nothing was imported to read it
    assert raw["global_step"] == 470000
    assert "model.diffusion_model.input_blocks.0.0.weight" in raw["state_dict"]
    assert all(k is MetadataPlaceholder or isinstance(k, str) for k in raw["callbacks"])
    assert isinstance(raw["callbacks"]["instance"], MetadataPlaceholder)


def test_clip_torchscript_archive(reference, files):
    model, _ = reference
    loaded = odise_model.build_odise("tiny", clip_weights=files["clip_ts"], seed=3)
    assert_same_tensors(model.clip, loaded.clip)


def test_clip_fp16_openai_file_is_cast_to_fp32(reference, files):
    model, _ = reference
    loaded = odise_model.build_odise("tiny", clip_weights=files["clip_fp16"], seed=3)
    fp16 = torch.load(files["clip_fp16"], weights_only=True)
    state = loaded.clip.model.state_dict()
    assert all(v.dtype == torch.float32 for v in state.values())
    assert torch.equal(state["visual.conv1.weight"], fp16["visual.conv1.weight"].float())
    assert torch.equal(state["token_embedding.weight"], model.clip.model.token_embedding.weight)


def test_bf16_load_keeps_trainable_parts_fp32(reference, files, reference_predictions):
    model, _ = reference
    loaded = odise_model.build_odise(
        "tiny",
        checkpoint=files["odise"],
        sd_weights=files["sd_ckpt"],
        clip_weights=files["clip_fp16"],
        dtype="bf16",
    )
    assert {p.dtype for m in loaded.frozen_modules() for p in m.parameters()} == {torch.bfloat16}
    assert {p.dtype for _, p in loaded.trainable_parameters()} == {torch.float32}
    assert loaded.captioner.uncond_context.dtype == torch.float32
    assert torch.equal(loaded.captioner.uncond_context, model.captioner.uncond_context)  # computed in fp32
    assert torch.equal(loaded.sd.unet.conv_in.weight, model.sd.unet.conv_in.weight.bfloat16())
    results = predictions(loaded)
    assert [r.panoptic_seg.shape for r in results] == [r.panoptic_seg.shape for r in reference_predictions]


# ------------------------------------------------------------------------------------------------------
# sources
# ------------------------------------------------------------------------------------------------------
def test_file_url_and_zoo_lookup_by_file_name(reference, files, tmp_path, monkeypatch):
    model, _ = reference
    loaded = odise_model.build_odise("tiny", checkpoint=f"file://{files['odise']}", seed=3)
    assert torch.equal(loaded.head.text_proj.weight, model.head.text_proj.weight)

    zoo = tmp_path / "zoo"
    zoo.mkdir()
    os.link(files["sd_ckpt"], zoo / "sd-v1-3.ckpt")  # the official file name of the "sd-v1-3" release
    os.link(files["odise"], zoo / "odise_tiny.pth")
    monkeypatch.setenv("ODISE_MODEL_ZOO", str(zoo))
    loaded = odise_model.build_odise(
        "tiny",
        sd_weights="sd-v1-3",
        checkpoint="https://example.invalid/releases/odise_tiny.pth",
        clip_weights=files["clip"],
        offline=True,
        cache_dir=tmp_path / "cache",
        seed=99,
    )
    assert_same_tensors(model, loaded)
    assert loaded.weight_provenance["sd"]["path"] == str(zoo / "sd-v1-3.ckpt")
    assert "CreativeML" in loaded.weight_provenance["sd"]["license"]
    # a plain file name that is not in the working directory is found in the zoo too
    loaded = odise_model.build_odise("tiny", checkpoint="odise_tiny.pth", offline=True, seed=3)
    assert torch.equal(loaded.head.text_proj.weight, model.head.text_proj.weight)


def test_s3_url_downloads_into_the_cache(reference, files, tmp_path, s3_bucket, s3_storage_options):
    import s3fs

    model, _ = reference
    fs = s3fs.S3FileSystem(**s3_storage_options)
    fs.put(str(files["odise"]), f"{s3_bucket}/models/odise_tiny.pth")
    fs.put(str(files["sd_ckpt"]), f"{s3_bucket}/models/sd-tiny.ckpt")
    fs.put(str(files["clip_ts"]), f"{s3_bucket}/models/clip-tiny-ts.pt")
    cache = tmp_path / "cache"
    kwargs = dict(
        checkpoint=f"s3://{s3_bucket}/models/odise_tiny.pth",
        sd_weights=f"s3://{s3_bucket}/models/sd-tiny.ckpt",
        clip_weights=f"s3://{s3_bucket}/models/clip-tiny-ts.pt",
        cache_dir=cache,
        seed=99,
    )
    loaded = odise_model.build_odise("tiny", offline=False, storage_options=s3_storage_options, **kwargs)
    assert_same_tensors(model, loaded)
    assert sorted(p.name.split("-", 1)[1] for p in cache.rglob("*") if p.is_file()) == [
        "clip-tiny-ts.pt",
        "odise_tiny.pth",
        "sd-tiny.ckpt",
    ]
    fs.rm(f"{s3_bucket}/models", recursive=True)
    again = odise_model.build_odise("tiny", offline=True, **kwargs)  # from the cache, bucket emptied
    assert_same_tensors(model, again)


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    requests: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server naming)
        type(self).requests.append(self.path)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(directory):
    handler = type("Handler", (_CountingHandler,), {"requests": []})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler.requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_http_url_downloads_once_then_uses_the_cache(reference, files, tmp_path):
    model, _ = reference
    cache = tmp_path / "cache"
    with http_server(files["root"]) as (base, requests):
        url = f"{base}/odise_tiny.pth"
        first = odise_model.build_odise("tiny", checkpoint=url, offline=False, cache_dir=cache, seed=3)
        assert requests == ["/odise_tiny.pth"]
    cached = list((cache / "checkpoint").glob("*-odise_tiny.pth"))
    assert len(cached) == 1 and cached[0].read_bytes() == files["odise"].read_bytes()
    assert not list(cache.rglob("*.part"))
    # the server is gone: a second load must not need it
    second = odise_model.build_odise("tiny", checkpoint=url, offline=False, cache_dir=cache, seed=3)
    assert torch.equal(first.head.text_proj.weight, model.head.text_proj.weight)
    assert torch.equal(second.head.text_proj.weight, model.head.text_proj.weight)
    assert second.weight_provenance["checkpoint"]["path"] == str(cached[0])


def test_hugging_face_token_only_over_https_to_hugging_face(monkeypatch):
    """Gated repos (SD v1.3) need the user's token; it goes to https://huggingface.co and nowhere else:
    never over plain http (the old code sent it to http://huggingface.co), never to other hosts."""
    from odise_model.weights_sources import hub_token

    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    assert hub_token(
        "https://huggingface.co/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt"
    ) == ("hf_secret")
    for url in (
        "http://huggingface.co/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt",
        "http://cdn-lfs.huggingface.co/x",
        "https://cdn-lfs.huggingface.co/x",
        "https://github.com/x",
        "https://huggingface.co.evil.example/x",
        "http://127.0.0.1:8000/huggingface.co",
        "s3://huggingface.co/x",
    ):
        assert hub_token(url) is None, url


def test_hub_file_urls():
    from odise_model.weights_sources import RELEASES, HubFile, hub_file

    assert hub_file(RELEASES["sd-v1-3"].url) == HubFile(
        "CompVis/stable-diffusion-v-1-3-original", "sd-v1-3.ckpt"
    )
    assert hub_file(
        "https://huggingface.co/datasets/org/data/resolve/refs%2Fpr%2F1/sub/w.pt?download=true"
    ) == (HubFile("org/data", "sub/w.pt", revision="refs/pr/1", repo_type="dataset"))
    for url in (
        "http://huggingface.co/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt",  # plain http
        "https://hf-mirror.example/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt",
        "https://huggingface.co/CompVis/stable-diffusion-v-1-3-original/blob/main/sd-v1-3.ckpt",  # a web page
        RELEASES["openai"].url,
        RELEASES["odise_label_coco_50e"].url,
    ):
        assert hub_file(url) is None, url


HUB_REPO_FOLDER = "models--CompVis--stable-diffusion-v-1-3-original"


def fill_hub_cache(hub_cache, data: bytes, *, commit: str = "a" * 40) -> str:
    """Put ``sd-v1-3.ckpt`` into a Hugging Face cache folder the way ``hf_hub_download`` lays it out:
    the bytes in ``blobs/<sha256>``, a relative symlink ``snapshots/<commit>/sd-v1-3.ckpt`` to it and
    ``refs/main`` naming the commit. Returns the snapshot path."""
    import hashlib

    repo = hub_cache / HUB_REPO_FOLDER
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    snapshot = repo / "snapshots" / commit / "sd-v1-3.ckpt"
    snapshot.parent.mkdir(parents=True)
    snapshot.symlink_to(os.path.relpath(blob, snapshot.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return str(snapshot)


def _no_hub_download(*args, **kwargs):
    raise AssertionError(f"hf_hub_download called: {args} {kwargs}")


@pytest.mark.parametrize("offline", [True, False])
def test_sd_release_found_in_the_hugging_face_cache(reference, files, tmp_path, monkeypatch, offline):
    """A user who already has sd-v1-3.ckpt in the shared HF cache does not download it again."""
    import huggingface_hub

    model, _ = reference
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    snapshot = fill_hub_cache(tmp_path / "hf", files["sd_ckpt"].read_bytes())
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_hub_download)  # the network boundary
    loaded = odise_model.build_odise(
        "tiny",
        checkpoint=files["odise"],
        sd_weights="sd-v1-3",
        clip_weights=files["clip"],
        offline=offline,
        cache_dir=tmp_path / "c",
        seed=99,
    )
    assert_same_tensors(model, loaded)
    assert loaded.weight_provenance["sd"]["path"] == snapshot
    assert "CreativeML" in loaded.weight_provenance["sd"]["license"]
    assert not (tmp_path / "c" / "sd").exists()  # nothing was copied into our own cache


def test_sd_release_offline_and_not_cached_names_the_hugging_face_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    (tmp_path / "hf").mkdir()
    with pytest.raises(WeightsNotFoundError) as err:
        odise_model.build_odise("tiny", sd_weights="sd-v1-3", offline=True, cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert str(tmp_path / "c" / "sd" / "sd-v1-3.ckpt") in msg
    assert str(tmp_path / "hf" / HUB_REPO_FOLDER / "snapshots") in msg and "Hugging Face cache" in msg
    assert "offline" in msg and "hf download CompVis/stable-diffusion-v-1-3-original sd-v1-3.ckpt" in msg


def test_sd_release_is_downloaded_with_hf_hub_download(files, tmp_path, monkeypatch):
    """Online and not cached: ``hf_hub_download`` fetches it into the shared cache, with the user's token and
    the endpoint https://huggingface.co (the Hub itself is mocked: tests never reach it)."""
    import huggingface_hub

    from odise_model.weights_sources import WeightLoader

    calls = []

    def fake_hf_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        return fill_hub_cache(Path(kwargs["cache_dir"]), files["sd_ckpt"].read_bytes())

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hf_hub_download)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    monkeypatch.setenv(
        "HF_ENDPOINT", "http://mirror.example"
    )  # ignored: the release names https://huggingface.co
    loader = WeightLoader(offline=False, cache_dir=tmp_path / "c", hub_cache_dir=tmp_path / "hf")
    located = loader.locate("sd-v1-3", "sd")
    assert [(r, f) for r, f, _ in calls] == [("CompVis/stable-diffusion-v-1-3-original", "sd-v1-3.ckpt")]
    kwargs = calls[0][2]
    assert kwargs["revision"] == "main" and kwargs["cache_dir"] == tmp_path / "hf"
    assert kwargs["token"] == "hf_secret" and kwargs["endpoint"] == "https://huggingface.co"
    assert located.path.read_bytes() == files["sd_ckpt"].read_bytes()
    # found in the cache from now on: no second download
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_hub_download)
    assert loader.locate("sd-v1-3", "sd").path == located.path


def test_diffusers_hub_id_found_in_the_hugging_face_cache(reference, files, tmp_path, monkeypatch):
    """A Hub id of a diffusers folder resolves offline to its snapshot in the shared HF cache."""
    import shutil

    import huggingface_hub

    model, _ = reference
    repo = tmp_path / "hf" / "models--someone--tiny-sd"
    shutil.copytree(files["sd_dir"], repo / "snapshots" / ("b" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _no_hub_download)
    loaded = odise_model.build_odise(
        "tiny", sd_weights="someone/tiny-sd", offline=True, cache_dir=tmp_path / "c"
    )
    assert_same_tensors(model.sd, loaded.sd)
    assert torch.equal(loaded.captioner.uncond_context, model.captioner.uncond_context)
    assert loaded.weight_provenance["sd"]["path"] == str(repo / "snapshots" / ("b" * 40))


def test_default_cache_dir_and_its_override(monkeypatch, tmp_path):
    monkeypatch.setenv("ODISE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("ODISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "odise_annotate"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == __import__("pathlib").Path.home() / ".cache" / "odise_annotate"


# ------------------------------------------------------------------------------------------------------
# offline and unreachable
# ------------------------------------------------------------------------------------------------------
def test_offline_missing_local_file(tmp_path):
    missing = tmp_path / "nowhere" / "odise_tiny.pth"
    with pytest.raises(WeightsNotFoundError) as err:
        odise_model.build_odise("tiny", checkpoint=missing, offline=True)
    msg = str(err.value)
    assert "'odise_tiny.pth'" in msg and str(missing) in msg and "how to provide" in msg
    assert "checkpoint=" in msg and "ODISE_MODEL_ZOO" in msg


def test_offline_url_is_never_fetched(tmp_path):
    with http_server(tmp_path) as (base, requests):
        with pytest.raises(WeightsNotFoundError) as err:
            odise_model.build_odise(
                "tiny", clip_weights=f"{base}/ViT-tiny.pt", offline=True, cache_dir=tmp_path / "c"
            )
        assert requests == []
    msg = str(err.value)
    assert "'ViT-tiny.pt'" in msg and "offline" in msg and str(tmp_path / "c" / "clip") in msg
    assert "clip_weights=" in msg


def test_offline_release_name_says_where_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ODISE_MODEL_ZOO", str(tmp_path / "zoo"))
    with pytest.raises(WeightsNotFoundError) as err:
        odise_model.build_odise("odise_label_coco", pretrained=True, offline=True, cache_dir=tmp_path / "c")
    msg = str(err.value)
    assert "odise_label_coco_50e-b67d2efc.pth" in msg
    assert str(tmp_path / "zoo" / "odise_label_coco_50e-b67d2efc.pth") in msg
    assert str(tmp_path / "c" / "checkpoint" / "odise_label_coco_50e-b67d2efc.pth") in msg
    assert "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/odise_label_coco_50e-b67d2efc.pth" in msg
    # every missing file is named at once, not only the first
    assert (
        msg.startswith("3 weights files are not available")
        and "sd-v1-3.ckpt" in msg
        and "ViT-L-14-336px.pt" in msg
    )


def test_offline_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv("ODISE_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError, match="offline"):
        odise_model.build_odise(
            "tiny", checkpoint="https://example.invalid/x/odise_tiny.pth", cache_dir=tmp_path
        )


def test_unreachable_url_online(tmp_path):
    with http_server(tmp_path) as (base, _):
        pass  # the port is closed now
    with pytest.raises(WeightsNotFoundError) as err:
        odise_model.build_odise(
            "tiny", checkpoint=f"{base}/odise_tiny.pth", offline=False, cache_dir=tmp_path / "c"
        )
    assert "download failed" in str(err.value) and "odise_tiny.pth" in str(err.value)
    assert not list((tmp_path / "c").rglob("*.part"))


def test_http_404(tmp_path):
    with http_server(tmp_path) as (base, _):
        with pytest.raises(WeightsNotFoundError, match="absent.pth"):
            odise_model.build_odise(
                "tiny", checkpoint=f"{base}/absent.pth", offline=False, cache_dir=tmp_path / "c"
            )


# ------------------------------------------------------------------------------------------------------
# failures: each names the file and the keys
# ------------------------------------------------------------------------------------------------------
def _odise_state(files) -> dict[str, torch.Tensor]:
    return dict(torch.load(files["odise"], weights_only=True)["model"])


def _load_odise(path):
    return odise_model.build_odise("tiny", checkpoint=path)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda s: s.pop("sem_seg_head.predictor.query_feat.weight"), ["missing keys", "query_feat.weight"]),
        (
            lambda s: s.__setitem__("sem_seg_head.predictor.extra.weight", torch.zeros(2)),
            ["unexpected keys", "sem_seg_head.predictor.extra.weight"],
        ),
        (
            lambda s: s.__setitem__("category_head.text_proj.weight", torch.zeros(5, 7)),
            ["mismatched keys", "category_head.text_proj.weight", "(5, 7)"],
        ),
        (
            lambda s: s.__setitem__("criterion.empty_weight", s["criterion.empty_weight"].half()),
            ["mismatched keys", "criterion.empty_weight", "torch.float16"],
        ),
        (
            lambda s: s.__setitem__("category_head.null_embed", "not a tensor"),
            ["mismatched keys", "category_head.null_embed", "not a tensor"],
        ),
    ],
    ids=["missing", "extra", "shape", "dtype", "not-a-tensor"],
)
def test_odise_checkpoint_mismatches(files, tmp_path, edit, words):
    state = _odise_state(files)
    edit(state)
    path = tmp_path / "bad.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as err:
        _load_odise(path)
    msg = str(err.value)
    assert str(path) in msg
    for word in words:
        assert word in msg


def test_sd_single_file_mismatches(reference, files, tmp_path):
    model, text_encoder = reference
    base = sd_single_file_state(model, text_encoder)
    cases = {
        "extra": (
            lambda s: s.__setitem__("model.diffusion_model.extra_block.weight", torch.zeros(3)),
            ["model.diffusion_model.extra_block.weight", "not consumed"],
        ),
        "missing": (
            lambda s: s.pop("model.diffusion_model.input_blocks.1.0.in_layers.2.weight"),
            ["missing keys", "down_blocks.0.resnets.0.conv1.weight"],
        ),
        "shape": (
            lambda s: s.__setitem__("first_stage_model.encoder.conv_in.weight", torch.zeros(1, 3, 3, 3)),
            ["first_stage_model.encoder.conv_in.weight", "(1, 3, 3, 3)"],
        ),
        "dtype": (
            lambda s: s.__setitem__("model.diffusion_model.out.2.bias", torch.zeros(4, dtype=torch.int64)),
            ["model.diffusion_model.out.2.bias", "torch.int64"],
        ),
        "text": (
            lambda s: s.pop("cond_stage_model.transformer.text_model.final_layer_norm.weight"),
            ["cond_stage_model.transformer.text_model.final_layer_norm.weight", "missing keys"],
        ),
    }
    for name, (edit, words) in cases.items():
        state = dict(base)
        edit(state)
        path = tmp_path / f"sd-{name}.ckpt"
        torch.save({"state_dict": state}, path)
        with pytest.raises(CheckpointError) as err:
            odise_model.build_odise("tiny", sd_weights=path)
        msg = str(err.value)
        assert str(path) in msg, name
        for word in words:
            assert word in msg, (name, word, msg)


def test_clip_mismatches(reference, tmp_path):
    model, _ = reference
    state = openai_clip_state(model, fp16=True)
    state["visual.proj"] = torch.zeros(3, 3, dtype=torch.float16)
    state.pop("ln_final.bias")
    path = tmp_path / "clip-bad.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as err:
        odise_model.build_odise("tiny", clip_weights=path)
    msg = str(err.value)
    assert str(path) in msg and "visual.proj" in msg and "(3, 3)" in msg and "ln_final.bias" in msg


def test_sha256_in_file_name_is_checked(files, tmp_path):
    import hashlib

    digest = hashlib.sha256(files["odise"].read_bytes()).hexdigest()
    good = tmp_path / f"odise_tiny-{digest[:8]}.pth"
    good.write_bytes(files["odise"].read_bytes())
    _load_odise(good)
    bad = tmp_path / "odise_tiny-0123abcd.pth"
    bad.write_bytes(files["odise"].read_bytes())
    with pytest.raises(CheckpointError) as err:
        _load_odise(bad)
    msg = str(err.value)
    assert str(bad) in msg and "sha256 mismatch" in msg and "0123abcd" in msg and digest[:8] in msg
    # digits only: a date or a step, not a hash prefix
    dated = tmp_path / "odise_tiny-20240101.pth"
    dated.write_bytes(files["odise"].read_bytes())
    _load_odise(dated)


def test_release_file_with_wrong_content_is_rejected(files, tmp_path, monkeypatch):
    zoo = tmp_path / "zoo"
    zoo.mkdir()
    (zoo / "odise_label_coco_50e-b67d2efc.pth").write_bytes(files["odise"].read_bytes())
    monkeypatch.setenv("ODISE_MODEL_ZOO", str(zoo))
    with pytest.raises(CheckpointError, match="sha256 mismatch.*b67d2efc"):
        odise_model.build_odise("tiny", checkpoint="odise_label_coco_50e", offline=True)


def test_truncated_files(files, tmp_path):
    for key in ("odise", "sd_ckpt", "clip_ts"):
        data = files[key].read_bytes()
        path = tmp_path / f"truncated-{files[key].name}"
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(CheckpointError) as err:
            read_checkpoint_file(path)
        assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        odise_model.build_odise("tiny", checkpoint=tmp_path / f"truncated-{files['odise'].name}")


class _Exploit:
    """Unpickling this would run ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalExploit(_Exploit):
    def __reduce__(self):
        return (eval, (f"__import__('pathlib').Path({self.marker!r}).touch()",))


@pytest.mark.parametrize("exploit", [_Exploit, _EvalExploit])
@pytest.mark.parametrize("container", ["torch.save", "pickle-protocol-2", "pickle-protocol-4"])
def test_code_running_pickle_is_refused_and_never_runs(tmp_path, exploit, container):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": {"sem_seg_head.predictor.query_feat.weight": exploit(marker)}}
    if container == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(payload, fh, protocol=int(container[-1]))
    with pytest.raises(CheckpointError) as err:
        _load_odise(path)
    msg = str(err.value)
    assert str(path) in msg and "refusing" in msg
    if container != "pickle-protocol-4":  # protocol 4 is refused at its first FRAME opcode, before the global
        assert "system" in msg or "eval" in msg
    assert not marker.exists()


class _ScriptBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3, 3)
        self.attn_mask = torch.ones(
            2, 2
        )  # a plain tensor attribute: not a parameter / buffer, not in state_dict
        self.register_buffer("scale", torch.arange(4).half())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x) * self.attn_mask.sum()


class _ScriptTree(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(_ScriptBlock(), _ScriptBlock())
        self.mha = nn.MultiheadAttention(4, 2)
        self.strided = nn.Parameter(torch.randn(4, 4)[:, 1:3])  # a view: offset and strides must survive
        self.alias = self.blocks[0].proj  # the same module twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_archives_are_read_like_jit_load_without_it(tmp_path, how, monkeypatch):
    from odise_model.torchscript_weights import read_torchscript_state_dict

    module = _ScriptTree().eval()
    scripted = torch.jit.script(module) if how == "script" else torch.jit.trace(module, torch.randn(2, 3))
    path = tmp_path / f"{how}.pt"
    scripted.save(str(path))
    expected = torch.jit.load(str(path)).state_dict()  # our own file: trusted, only for the comparison
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: pytest.fail("torch.jit.load must not be called"))
    got = read_checkpoint_file(path)
    assert list(got) == list(expected) == list(read_torchscript_state_dict(str(path)))
    assert not any("attn_mask" in k for k in got)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and got[key].stride() == value.stride(), key
        assert torch.equal(got[key], value), key


def save_hostile_torchscript(path, buffer: torch.Tensor) -> None:
    """A TorchScript archive (one buffer ``w`` = ``buffer``) whose ``__setstate__`` prints "CODE FROM THE FILE
    RAN": ``torch.jit.load`` runs it, a loader that never executes the file's code does not."""
    from typing import Tuple  # noqa: UP035 - TorchScript needs typing.Tuple annotations

    class Hostile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w", buffer.clone())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

        @torch.jit.export
        def __getstate__(self) -> Tuple[torch.Tensor, bool]:  # noqa: UP006
            return (self.w, self.training)

        @torch.jit.export
        def __setstate__(self, state: Tuple[torch.Tensor, bool]) -> None:  # noqa: UP006
            print("CODE FROM THE FILE RAN")
            self.w = state[0]
            self.training = state[1]

    torch.jit.script(Hostile()).save(str(path))


def test_hostile_torchscript_archive_never_runs_its_code(tmp_path, capfd):
    path = tmp_path / "hostile.pt"
    save_hostile_torchscript(path, torch.zeros(2))
    capfd.readouterr()
    with pytest.raises(CheckpointError) as err:
        odise_model.build_odise("tiny", clip_weights=path)
    assert str(path) in str(err.value) and "missing keys" in str(err.value)
    assert "CODE FROM THE FILE RAN" not in capfd.readouterr().out

    # An archive whose data.pkl names any other global is refused, naming it; nothing runs.
    import zipfile

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(evil, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps(_Exploit(marker), protocol=2)
            dst.writestr(item, data)
    with pytest.raises(CheckpointError) as err:
        read_checkpoint_file(evil)
    assert str(evil) in str(err.value) and "system" in str(err.value) and "refusing" in str(err.value)
    assert not marker.exists()


def test_archive_the_inert_reader_refuses_never_reaches_jit_load_whatever_the_memo_says(tmp_path, capfd):
    """The old loader gave an archive the inert reader refused to ``torch.jit.load`` when its sha256 was the
    official CLIP file's, but took that hash from the memo keyed by (path, size, mtime): a same-size file with
    its mtime restored was trusted without being hashed. Here the official file (random bytes standing in for
    it) was hashed, then replaced by a hostile archive of the same size with the mtime restored. The archive
    holds a complex tensor, which the inert reader does not read, and its ``__setstate__`` prints."""
    from odise_model.weights_sources import RELEASES, remember_sha256

    save_hostile_torchscript(tmp_path / "hostile.pt", torch.zeros(3, dtype=torch.complex64))
    data = (tmp_path / "hostile.pt").read_bytes()
    path = tmp_path / "ViT-L-14-336px.pt"
    path.write_bytes(os.urandom(len(data)))  # the official file, as far as the memo will know
    remember_sha256(path, RELEASES["openai"].sha256)
    before = path.stat()
    path.write_bytes(data)  # replaced: same size ...
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ... and the mtime restored
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    capfd.readouterr()
    with pytest.raises(CheckpointError) as err:
        odise_model.build_odise("tiny", clip_weights=path)
    assert "CODE FROM THE FILE RAN" not in capfd.readouterr().out
    msg = str(err.value)
    assert str(path) in msg and "ComplexFloatStorage" in msg and "refusing" in msg


def test_sha256_memo_rehashes_a_rewritten_file_with_size_and_mtime_restored(tmp_path):
    """The memo saves re-hashing gigabytes; a rewrite that restores size and mtime must not fool it."""
    import hashlib
    import time

    from odise_model.weights_sources import file_sha256

    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 4096)
    assert file_sha256(path) == hashlib.sha256(b"a" * 4096).hexdigest()
    before = path.stat()
    time.sleep(0.05)  # past the kernel's coarse timestamp tick, as any later rewrite is
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert file_sha256(path) == hashlib.sha256(b"b" * 4096).hexdigest()


def test_non_dict_files(tmp_path):
    cases = {"list.pth": [torch.zeros(2)], "tensor.pth": torch.zeros(2)}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{tmp_path / name}.*expected a dict"):
            _load_odise(tmp_path / name)
    torch.save({"model": [1, 2]}, tmp_path / "model-list.pth")
    with pytest.raises(CheckpointError, match="'model' entry is a list"):
        _load_odise(tmp_path / "model-list.pth")
    torch.save({"state_dict": {}, "epoch": 1}, tmp_path / "not-odise.pth")
    with pytest.raises(CheckpointError, match="no 'model' entry"):
        _load_odise(tmp_path / "not-odise.pth")


def test_wrong_kind_of_source(files):
    with pytest.raises(ValueError, match="not a clip release"):
        odise_model.build_odise("tiny", clip_weights="sd-v1-3", offline=True)
    with pytest.raises(CheckpointError, match="is a directory"):
        odise_model.build_odise("tiny", checkpoint=files["root"])
