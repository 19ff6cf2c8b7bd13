"""Stable Diffusion weights: an original single file or a diffusers folder -> UNet, VAE and text-encoder tensors.

Job: SD's key map. An original SD v1 single file (``{"state_dict": ...}`` with ``model.diffusion_model.*``,
``first_stage_model.*``, ``cond_stage_model.transformer.*``) is converted with diffusers' own ``convert_ldm_*``
utilities against the configs we ship (:func:`convert_sd_single_file`); a diffusers folder is checked against
them. :func:`read_stable_diffusion` returns one :class:`SDPart` per module, still views of the memory-mapped
file(s); :func:`load_sd_part` / :func:`load_sd_text_encoder` assign them strictly. SD's text encoder is used
once, for the empty-prompt embedding (:func:`empty_prompt_embedding`, the official ``uncond_inputs``).

The order of loading (text encoder first, used and freed before the UNet is read, which keeps host memory
lowest) is :func:`odise_model.build.materialize`'s; the text encoder itself is built (sized) there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import assign_strict, report_mismatch
from .config import ODISEConfig
from .safe_load import FilePages, read_weights
from .weights_errors import CheckpointError

__all__ = [
    "SD_IGNORED_KEYS",
    "SD_IGNORED_PREFIXES",
    "SDPart",
    "convert_sd_single_file",
    "read_stable_diffusion",
    "load_sd_part",
    "load_sd_text_encoder",
    "sd_prompt_token_ids",
    "empty_prompt_embedding",
]

# Keys of an SD single file that are read but intentionally unused (official use_ema=False, fixed schedule).
SD_IGNORED_PREFIXES = ("model_ema.",)
SD_IGNORED_KEYS = frozenset(
    {
        "betas",
        "alphas_cumprod",
        "alphas_cumprod_prev",
        "sqrt_alphas_cumprod",
        "sqrt_one_minus_alphas_cumprod",
        "log_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod",
        "sqrt_recipm1_alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
        "posterior_mean_coef2",
        "logvar",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
    }
)

SOT_TOKEN = 49406
EOT_TOKEN = 49407


# ----------------------------------------------------------------------------------------------------------
# The text encoder's one use
# ----------------------------------------------------------------------------------------------------------
def sd_prompt_token_ids(text: str, context_length: int = 77) -> torch.Tensor:
    """Token ids of ``text`` as SD v1's tokenizer (``openai/clip-vit-large-patch14``) produces them.

    BOS, the CLIP BPE tokens, EOS, then EOS as padding up to ``context_length`` (that tokenizer pads with
    ``<|endoftext|>``, not 0). Uses open_clip's bundled BPE vocabulary: nothing is downloaded.
    ``""`` -> ``[49406, 49407 x 76]``.
    """
    from open_clip.tokenizer import SimpleTokenizer

    tokens = SimpleTokenizer().encode(text)[: context_length - 2]
    ids = [SOT_TOKEN, *tokens, EOT_TOKEN]
    ids += [EOT_TOKEN] * (context_length - len(ids))
    return torch.tensor([ids], dtype=torch.long)


@torch.no_grad()
def empty_prompt_embedding(text_encoder, context_length: int = 77) -> torch.Tensor:
    """``1 x 77 x D`` last hidden state of SD's text encoder for the empty prompt (official ``uncond_inputs``)."""
    ids = sd_prompt_token_ids("", context_length).to(text_encoder.device)
    return text_encoder(input_ids=ids).last_hidden_state.float()


# ----------------------------------------------------------------------------------------------------------
# Conversion of an original single file
# ----------------------------------------------------------------------------------------------------------
def convert_sd_single_file(
    state: Mapping[str, torch.Tensor], cfg: ODISEConfig, *, path
) -> tuple[dict, dict, dict]:
    """Split and convert an original SD v1 single file into diffusers UNet, VAE and text-encoder state dicts.

    Uses diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
    ``convert_ldm_clip_checkpoint`` (views of the file's tensors, nothing is copied). Every key of the file
    must be consumed by a conversion or be in the documented ignore lists (:data:`SD_IGNORED_KEYS`,
    :data:`SD_IGNORED_PREFIXES`); otherwise an error lists them. Consumption is tracked by tensor identity
    (data pointer), since the conversions rename keys and reshape the VAE attention weights.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    report_mismatch(
        path, mismatched=[f"{k}: not a tensor" for k in non_tensors], what="Stable Diffusion single file"
    )
    sd_cfg = cfg.stable_diffusion
    try:
        unet = convert_ldm_unet_checkpoint(state, dict(sd_cfg.unet))
        vae = convert_ldm_vae_checkpoint(state, dict(sd_cfg.vae))
        text = convert_ldm_clip_checkpoint(state)
    except Exception as exc:  # diffusers indexes keys it expects; a foreign file fails somewhere inside
        raise CheckpointError(
            f"{path}: not a Stable Diffusion v1 single file: diffusers' conversion failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    for converted in (unet, vae, text):  # diffusers fills absent keys with None (checkpoint.get(key))
        for key in [k for k, v in converted.items() if v is None]:
            del converted[key]
    used = {t.data_ptr() for d in (unet, vae, text) for t in d.values()}
    leftover = sorted(
        k
        for k, v in state.items()
        if k not in SD_IGNORED_KEYS and not k.startswith(SD_IGNORED_PREFIXES) and v.data_ptr() not in used
    )
    report_mismatch(
        path,
        unexpected=leftover,
        what="Stable Diffusion single file (keys not consumed by the conversion)",
        hint="expected an SD v1 file: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*",
    )
    text.pop("text_model.embeddings.position_ids", None)
    return unet, vae, text


def _file_names(state: Mapping[str, torch.Tensor], *converted: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Converted (diffusers) key -> the file's own key, by tensor identity; for error messages."""
    by_ptr = {v.data_ptr(): k for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {
        k: f"{by_ptr[v.data_ptr()]} (-> {k})"
        for d in converted
        for k, v in d.items()
        if v.data_ptr() in by_ptr
    }


# ----------------------------------------------------------------------------------------------------------
# diffusers folders
# ----------------------------------------------------------------------------------------------------------
_DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
)


def _diffusers_weights_file(folder: Path, sub: str) -> Path:
    for name in _DIFFUSERS_WEIGHT_NAMES:
        if (folder / sub / name).is_file():
            return folder / sub / name
    raise CheckpointError(
        f"{folder}: no weights in {sub}/ (expected one of {', '.join(_DIFFUSERS_WEIGHT_NAMES[:4])}; sharded "
        "folders are not supported)"
    )


def _check_diffusers_config(folder: Path, sub: str, expected: Mapping[str, Any]) -> None:
    cfg_file = folder / sub / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: missing {sub}/config.json")
    got = json.loads(cfg_file.read_text())
    diffs = [
        f"{k}: folder {got.get(k)!r} vs expected {v!r}"
        for k, v in expected.items()
        if k not in ("class_embed_type", "sample_size", "scaling_factor")
        and k in got
        and _norm(got[k]) != _norm(v)
    ]
    if diffs:
        raise CheckpointError(
            f"{folder}/{sub}: architecture differs from the configured SD:\n  " + "\n  ".join(diffs)
        )


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------------
# Reading and assigning
# ----------------------------------------------------------------------------------------------------------
@dataclass
class SDPart:
    """The tensors of one SD module (``text_encoder`` / ``unet`` / ``vae``) under diffusers names, not yet copied.

    ``state`` holds views of the (memory-mapped) file; ``pages`` releases them after each copy. ``names``
    maps diffusers keys to the file's own names for error messages; ``file_prefix`` is the prefix of the text
    encoder's keys in a single file; ``legacy_attention_keys``: apply diffusers' rename of pre-0.14 attention
    keys (diffusers folders).
    """

    state: dict[str, Any]
    path: Path
    what: str
    pages: FilePages | None = None
    names: dict[str, str] | None = None
    file_prefix: str = ""
    hint: str = ""
    legacy_attention_keys: bool = False


def read_stable_diffusion(path: Path, cfg: ODISEConfig) -> dict[str, SDPart]:
    """``{"text_encoder", "unet", "vae"} -> SDPart`` from a single file or a diffusers folder (checked, converted).

    Nothing is copied yet: single files are memory-mapped (``.safetensors`` are read whole).
    """
    path = Path(path)
    if path.is_dir():
        _check_diffusers_config(path, "unet", cfg.stable_diffusion.unet)
        _check_diffusers_config(path, "vae", cfg.stable_diffusion.vae)
        parts = {}
        for sub in ("text_encoder", "unet", "vae"):
            file = _diffusers_weights_file(path, sub)
            state, pages = read_weights(file, mmap=file.suffix != ".safetensors")
            what = f"Stable Diffusion {sub} (diffusers folder)"
            parts[sub] = SDPart(state, file, what, pages=pages, legacy_attention_keys=sub != "text_encoder")
        parts["text_encoder"].what = "Stable Diffusion text encoder"
        return parts

    raw, pages = read_weights(path, mmap=True)
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the 'state_dict' entry is a {type(state).__name__}, not a state dict")
    unet_sd, vae_sd, text_sd = convert_sd_single_file(state, cfg, path=path)
    names = _file_names(state, unet_sd, vae_sd)
    hint = (
        "expected an SD v1 file: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*; "
        "missing keys are given by their diffusers names"
    )
    return {
        "text_encoder": SDPart(
            text_sd,
            path,
            "Stable Diffusion text encoder",
            pages=pages,
            file_prefix="cond_stage_model.transformer.",
        ),
        "unet": SDPart(
            unet_sd,
            path,
            "Stable Diffusion UNet (model.diffusion_model.*)",
            pages=pages,
            names=names,
            hint=hint,
        ),
        "vae": SDPart(
            vae_sd, path, "Stable Diffusion VAE (first_stage_model.*)", pages=pages, names=names, hint=hint
        ),
    }


def load_sd_part(module: nn.Module, part: SDPart, *, dtype: torch.dtype | None) -> None:
    """Strictly assign an SD UNet or VAE ``part`` into ``module`` (built on meta), cast to ``dtype``."""
    state = part.state
    if part.legacy_attention_keys and hasattr(module, "_fix_state_dict_keys_on_load"):
        state = module._fix_state_dict_keys_on_load(dict(state))  # diffusers' own rename of pre-0.14 keys
    assign_strict(
        module,
        state,
        path=part.path,
        what=part.what,
        dtype=dtype,
        pages=part.pages,
        names=part.names,
        hint=part.hint,
    )


def _match_text_prefix(state: dict[str, Any], module: nn.Module) -> dict[str, Any]:
    """Add or strip ``text_model.`` so the file's keys follow the installed transformers' naming
    (transformers >= 5 keeps the text transformer at the top of ``CLIPTextModel``)."""
    module_has = any(k.startswith("text_model.") for k in module.state_dict())
    file_has = any(k.startswith("text_model.") for k in state)
    if module_has and not file_has:
        return {f"text_model.{k}": v for k, v in state.items()}
    if file_has and not module_has:
        return {k.removeprefix("text_model."): v for k, v in state.items()}
    return state


def load_sd_text_encoder(text_encoder: nn.Module, part: SDPart) -> nn.Module:
    """Fill SD's CLIP text encoder (built on meta) strictly, in float32, from ``part``; returns it.

    ``position_ids`` (a buffer some files hold, some not) is recreated, never read.
    """
    text_sd = _match_text_prefix(
        {k: v for k, v in part.state.items() if not k.endswith("embeddings.position_ids")}, text_encoder
    )
    buffers = {k for k, _ in text_encoder.named_buffers()}
    names = None
    if part.file_prefix:
        names = {
            k: f"{part.file_prefix}text_model.{k.removeprefix('text_model.')}"
            for k in text_encoder.state_dict()
        }
    assign_strict(
        text_encoder, text_sd, path=part.path, what=part.what, pages=part.pages, skip=buffers, names=names
    )
    for name, buf in list(text_encoder.named_buffers()):
        if buf.device.type == "meta":
            owner_name, _, attr = name.rpartition(".")
            if attr != "position_ids":
                raise AssertionError(f"unknown meta buffer {name} in the SD text encoder")
            value = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape).clone()
            text_encoder.get_submodule(owner_name).register_buffer(attr, value, persistent=False)
    return text_encoder
