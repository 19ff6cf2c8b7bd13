"""Official-size weights: synthetic files with EXACTLY the manifest's keys, shapes and dtypes (random values) in
the three official layouts load strictly into ``odise_label_coco`` on CPU, land where they belong, and the
build peaks at most ~1.3x the size of the weights in host RAM (fp32), less with ``dtype="bf16"``.

Files (written once per module under pytest's tmp_path, ~5.3 GB, deleted afterwards):

* ODISE ``.pth``: ``{"model": <the 399 in_ckpt=yes rows>}``;
* SD original ``.ckpt``: ``{"state_dict": <every SD row, prefix stripped>}`` (UNet, VAE, text encoder, the 12
  schedule buffers and the int64 ``position_ids``, as the manifest lists them);
* OpenAI CLIP: the ``clip_head.clip.clip.`` rows minus non-persistent buffers, with the tensors OpenAI's
  ``convert_weights`` halves stored as fp16 (Linear / Conv / attention weights, projections), the rest fp32,
  as in the real ``ViT-L-14-336px.pt``.

Each build runs in a subprocess so that the peak RSS measures the build alone; the subprocess also checks that
values land where they belong (comparing against the files, memory-mapped) and prints a JSON report. The
subprocess is started through a small launcher process: on Linux ``getrusage(RUSAGE_SELF).ru_maxrss`` of a
process started by fork + exec includes the high-water mark of the process it was forked from (here pytest,
which held the 4 GB SD state dict while writing the files); a grandchild forked from a small launcher does not.
``VmHWM`` (the peak of the process's own memory map) is recorded too and must agree.
"""

from __future__ import annotations

import csv
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from helpers import openai_fp16

from odise_model.resources import config_file
from odise_model.weights_sources import remember_sha256

pytestmark = [pytest.mark.slow, pytest.mark.full_size]

MANIFEST = "odise_label_coco_50e"
SD_PREFIX = "backbone.feature_extractor.ldm_extractor.ldm.ldm."
CLIP_PREFIX = "clip_head.clip.clip."
DTYPES = {"float32": torch.float32, "int64": torch.int64}


def _rows() -> list[dict[str, str]]:
    with open(config_file("manifests", f"{MANIFEST}.keys.tsv"), newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


class _Random:
    """Random tensors, fast: each is a slice of one 256 MB pool of uniform noise at a different offset
    (drawing 1.5 G fresh random numbers costs minutes on a busy 2-core machine; a copy costs seconds).
    No two tensors share an offset, so a tensor in the wrong place never compares equal."""

    def __init__(self, seed: int = 0, size: int = 1 << 26) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.pool = torch.empty(size).uniform_(-0.05, 0.05, generator=gen)
        self.offset = 0

    def __call__(self, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
        if dtype == torch.int64:
            return torch.arange(shape[-1], dtype=dtype).expand(shape).clone()
        n = _numel(shape)
        assert n < self.pool.numel()
        self.offset = (self.offset + 1_000_003) % (self.pool.numel() - n)
        return self.pool[self.offset : self.offset + n].to(dtype).reshape(shape).clone()


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class _HashingWriter:
    """File wrapper for ``torch.save`` that computes the sha256 while writing (saves re-reading 5 GB)."""

    def __init__(self, fh) -> None:
        self.fh, self.sha256 = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def _save(obj, path, digests: dict) -> None:
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
    digests[path] = writer.sha256.hexdigest()


@pytest.fixture(scope="module")
def official_files(tmp_path_factory):
    """The three official files at full size; yields their paths and the weights' size in bytes."""
    root = tmp_path_factory.mktemp("official")
    rows = _rows()
    rand = _Random()
    sizes, digests = {}, {}

    # ODISE checkpoint: the in_ckpt rows
    odise = {
        r["key"]: rand(json.loads(r["shape"]), DTYPES[r["dtype"]]) for r in rows if r["in_ckpt"] == "yes"
    }
    assert len(odise) == 399
    sizes["odise"] = sum(t.numel() * t.element_size() for t in odise.values())
    _save({"model": odise}, root / "odise_label_coco_50e.pth", digests)
    del odise

    # SD v1 original single file: every persistent SD row, prefix stripped, fp32 (+ int64 position_ids)
    sd = {
        r["key"][len(SD_PREFIX) :]: rand(json.loads(r["shape"]), DTYPES[r["dtype"]])
        for r in rows
        if r["key"].startswith(SD_PREFIX) and r["kind"] != "buffer_nonpersistent"
    }
    assert len(sd) == 686 + 248 + 197 + 12
    sizes["sd"] = sum(t.numel() * t.element_size() for t in sd.values())
    _save({"state_dict": sd}, root / "sd-v1-3.ckpt", digests)
    del sd
    gc.collect()

    # OpenAI CLIP: one copy's persistent rows; fp16 where OpenAI's convert_weights halves tensors
    clip = {}
    clip_fp32_bytes = 0
    for r in rows:
        if r["key"].startswith(CLIP_PREFIX) and r["kind"] != "buffer_nonpersistent":
            key, shape = r["key"][len(CLIP_PREFIX) :], json.loads(r["shape"])
            value = rand(shape, torch.float32)
            if openai_fp16(key):
                value = value.half()
            clip[key] = value
            clip_fp32_bytes += 4 * _numel(shape)
    assert len(clip) == 446
    sizes["clip_fp32"] = clip_fp32_bytes
    _save(clip, root / "ViT-L-14-336px.pt", digests)
    del clip
    gc.collect()

    sizes["total"] = sizes["odise"] + sizes["sd"] + sizes["clip_fp32"]
    # the build records each file's sha256 (provenance); seed the cache's memo so it does not re-read 5 GB
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ODISE_CACHE", str(root / "cache"))
        for path, digest in digests.items():
            remember_sha256(path, digest)
    yield {
        "root": root,
        "odise": root / "odise_label_coco_50e.pth",
        "sd": root / "sd-v1-3.ckpt",
        "clip": root / "ViT-L-14-336px.pt",
        "sizes": sizes,
        "digests": {str(k): v for k, v in digests.items()},
    }
    shutil.rmtree(root, ignore_errors=True)


# Runs in a fresh interpreter: build, record peak RSS, then check values against the (memory-mapped) files.
_BUILD_AND_CHECK = r"""
import json, resource, sys, time
args = json.loads(sys.argv[1])

def vm_rss(field="VmRSS:"):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field):
                return int(line.split()[1]) * 1024

import torch
import odise_model
import diffusers, open_clip, transformers  # noqa: F401  (counted in the baseline, not in the build)
from odise_model.build import build_sd_text_encoder
from odise_model.sd_convert import sd_prompt_token_ids

baseline = vm_rss()
t0 = time.time()
model = odise_model.build_odise("odise_label_coco", checkpoint=args["odise"], sd_weights=args["sd"],
                                clip_weights=args["clip"], offline=True, dtype=args["dtype"])
build_s = time.time() - t0
report = {"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss_after": vm_rss(),
          "vm_hwm": vm_rss("VmHWM:"), "baseline_rss": baseline, "build_s": build_s}

dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args["dtype"]]
odise = torch.load(args["odise"], mmap=True, weights_only=True)["model"]
sd = torch.load(args["sd"], mmap=True, weights_only=True)["state_dict"]
clip = torch.load(args["clip"], mmap=True, weights_only=True)
checks = {}
def same(name, ours, expected):
    checks[name] = bool(ours.dtype == expected.dtype and torch.equal(ours, expected))

# Stable Diffusion UNet / VAE: original names -> diffusers modules
same("unet.conv_in", model.sd.unet.conv_in.weight, sd["model.diffusion_model.input_blocks.0.0.weight"].to(dtype))
same("unet.attn2.to_k", model.sd.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight,
     sd["model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"].to(dtype))
same("unet.up3.res2.conv1", model.sd.unet.up_blocks[3].resnets[2].conv1.weight,
     sd["model.diffusion_model.output_blocks.11.0.in_layers.2.weight"].to(dtype))
same("vae.enc.mid.attn.q", model.sd.vae.encoder.mid_block.attentions[0].to_q.weight,
     sd["first_stage_model.encoder.mid.attn_1.q.weight"][:, :, 0, 0].to(dtype))
same("vae.dec.up0.res0.conv1", model.sd.vae.decoder.up_blocks[0].resnets[0].conv1.weight,
     sd["first_stage_model.decoder.up.3.block.0.conv1.weight"].to(dtype))
same("vae.quant_conv", model.sd.vae.quant_conv.weight, sd["first_stage_model.quant_conv.weight"].to(dtype))
# CLIP (fp16 in the file where OpenAI's is) -> the shared CLIP
same("clip.visual.last.in_proj", model.clip.model.visual.transformer.resblocks[23].attn.in_proj_weight,
     clip["visual.transformer.resblocks.23.attn.in_proj_weight"].to(dtype))
same("clip.positional_embedding", model.clip.model.positional_embedding, clip["positional_embedding"].to(dtype))
same("clip.text_projection", model.clip.model.text_projection, clip["text_projection"].to(dtype))
same("clip.logit_scale", model.clip.model.logit_scale, clip["logit_scale"].to(dtype))
# ODISE checkpoint (always fp32)
same("head.text_proj", model.head.text_proj.weight, odise["category_head.text_proj.weight"])
same("head.null_embed", model.head.null_embed, odise["category_head.null_embed"])
same("captioner.alpha_cond", model.captioner.alpha_cond, odise["backbone.feature_extractor.alpha_cond"])
same("decoder.query_feat", model.decoder.query_feat.weight, odise["sem_seg_head.predictor.query_feat.weight"])
same("projections.7.conv3", model.projections.projections[7][0].conv3.weight,
     odise["backbone.feature_projections.7.0.conv3.weight"])
same("criterion.empty_weight", model.head.empty_weight, odise["criterion.empty_weight"])
# the empty-prompt embedding, recomputed independently from the text-encoder weights in the file
text_encoder = build_sd_text_encoder(model.config)
prefix = "cond_stage_model.transformer."
state = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix) and not k.endswith("position_ids")}
if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
result = text_encoder.load_state_dict(state, strict=False)
assert not result.unexpected_keys and all(k.endswith("position_ids") for k in result.missing_keys), result
with torch.no_grad():
    expected = text_encoder(input_ids=sd_prompt_token_ids("")).last_hidden_state
checks["uncond_from_file"] = bool(torch.allclose(model.captioner.uncond_context, expected, rtol=0, atol=1e-6))
report["checks"] = checks
report["frozen_dtypes"] = sorted({str(p.dtype) for m in model.frozen_modules() for p in m.parameters()})
report["trainable_dtypes"] = sorted({str(p.dtype) for _, p in model.trainable_parameters()})
report["uncond_dtype"] = str(model.captioner.uncond_context.dtype)
report["provenance"] = {v["path"]: v["sha256"] for v in model.weight_provenance.values()}
report["on_meta"] = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
print("REPORT " + json.dumps(report))
"""


def _build_in_subprocess(files, dtype: str) -> dict:
    args = {"odise": str(files["odise"]), "sd": str(files["sd"]), "clip": str(files["clip"]), "dtype": dtype}
    env = {**os.environ, "ODISE_CACHE": str(files["root"] / "cache")}
    launcher = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
    proc = subprocess.run(
        [sys.executable, "-c", launcher, sys.executable, "-c", _BUILD_AND_CHECK, json.dumps(args)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("REPORT "))
    report = json.loads(line[len("REPORT ") :])
    gib = 1024**3
    print(
        f"\n[{dtype}] weights {files['sizes']['total'] / gib:.2f} GiB (SD {files['sizes']['sd'] / gib:.2f}, CLIP fp32 "
        f"{files['sizes']['clip_fp32'] / gib:.2f}, ODISE {files['sizes']['odise'] / gib:.3f}); peak RSS "
        f"{report['peak_rss'] / gib:.2f} GiB = {report['peak_rss'] / files['sizes']['total']:.2f}x (VmHWM "
        f"{report['vm_hwm'] / gib:.2f} GiB); RSS after build "
        f"{report['rss_after'] / gib:.2f} GiB; import baseline {report['baseline_rss'] / gib:.2f} GiB; "
        f"build {report['build_s']:.0f} s"
    )
    return report


@pytest.fixture(scope="module")
def fp32_report(official_files):
    return _build_in_subprocess(official_files, "fp32")


def test_official_files_load_strictly_and_land_where_they_belong(official_files, fp32_report):
    assert fp32_report["on_meta"] == []
    assert fp32_report["provenance"] == official_files["digests"]
    failed = [name for name, ok in fp32_report["checks"].items() if not ok]
    assert not failed, failed
    assert fp32_report["frozen_dtypes"] == ["torch.float32"] and fp32_report["trainable_dtypes"] == [
        "torch.float32"
    ]


def test_peak_host_memory_is_at_most_1_3x_the_weights(official_files, fp32_report):
    assert fp32_report["peak_rss"] <= 1.3 * official_files["sizes"]["total"], fp32_report
    assert abs(fp32_report["peak_rss"] - fp32_report["vm_hwm"]) <= 0.02 * fp32_report["vm_hwm"], fp32_report


def test_bf16_load_halves_the_frozen_weights(official_files, fp32_report):
    report = _build_in_subprocess(official_files, "bf16")
    assert abs(report["peak_rss"] - report["vm_hwm"]) <= 0.02 * report["vm_hwm"], report
    assert report["on_meta"] == []
    failed = [name for name, ok in report["checks"].items() if not ok]
    assert not failed, failed
    assert report["frozen_dtypes"] == ["torch.bfloat16"] and report["trainable_dtypes"] == ["torch.float32"]
    assert report["uncond_dtype"] == "torch.float32"
    # the fp32 copy of the frozen weights never exists: both the peak and the model itself are smaller
    assert report["peak_rss"] <= 0.75 * fp32_report["peak_rss"], (report, fp32_report)
    frozen_fp32 = official_files["sizes"]["sd"] + official_files["sizes"]["clip_fp32"]
    assert fp32_report["rss_after"] - report["rss_after"] >= 0.3 * frozen_fp32, (report, fp32_report)
