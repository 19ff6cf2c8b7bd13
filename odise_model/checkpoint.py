"""The key map between official ODISE names and ours, strict loading into the model, and saving.

Job: given tensors read from a file (:mod:`odise_model.safe_load`), put each one where it belongs in the model,
strictly, and write our trained weights back in the official layout. Where files come from is
:mod:`odise_model.weights_sources`; SD's own key map is diffusers' conversion (:mod:`odise_model.sd_convert`);
wiring it all into a built model is :func:`odise_model.build.materialize`.

* :data:`ODISE_KEY_MAP` is THE one table between official and our names, used by :func:`load_odise_checkpoint`
  and :func:`save_checkpoint` (via :func:`from_official_key` / :func:`to_official_key`).
* :data:`FROZEN_SOURCE_PREFIXES` and :data:`RECREATED_KEYS` list, explicitly, the official keys that are absent
  from ODISE checkpoints and where their values come from instead; :data:`CLIP_IGNORED_KEYS` the metadata
  entries of OpenAI CLIP files.
* Loading is strict (:func:`assign_strict`, :func:`load_odise_checkpoint`, :func:`load_clip_weights`): every
  key of a file must be consumed, every parameter the file should provide must be present, shapes and dtypes
  must match; otherwise :class:`CheckpointError` lists the missing / unexpected / mismatched keys and names the
  file.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .safe_load import FilePages, copy_out, read_checkpoint_file, read_weights
from .weights_errors import CheckpointError

__all__ = [
    "CheckpointError",
    "ODISE_KEY_MAP",
    "ODISE_CKPT_MODULES",
    "FROZEN_SOURCE_PREFIXES",
    "RECREATED_KEYS",
    "CLIP_IGNORED_KEYS",
    "to_official_key",
    "from_official_key",
    "official_state_dict",
    "report_mismatch",
    "assign_strict",
    "load_odise_checkpoint",
    "load_clip_weights",
    "save_checkpoint",
]


# ----------------------------------------------------------------------------------------------------------
# Key map: official ODISE names <-> ours. THE one table, used for loading and saving.
# Entries ending in "." are prefixes; others are whole keys. Variant-specific entries are keyed by kind.
# ----------------------------------------------------------------------------------------------------------
ODISE_KEY_MAP: dict[str, list[tuple[str, str]]] = {
    "common": [
        ("backbone.feature_extractor.clip_project.", "captioner.clip_project."),
        ("backbone.feature_extractor.time_embed_project.", "captioner.time_embed_project."),
        ("backbone.feature_extractor.alpha_cond", "captioner.alpha_cond"),
        ("backbone.feature_extractor.alpha_cond_time_embed", "captioner.alpha_cond_time_embed"),
        ("backbone.feature_projections.", "projections.projections."),
        ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
        ("sem_seg_head.predictor.", "decoder."),
        ("criterion.empty_weight", "head.empty_weight"),
    ],
    "label": [
        ("category_head.text_proj.", "head.text_proj."),
        ("category_head.null_embed", "head.null_embed"),
    ],
    "caption": [
        ("word_head.text_proj.", "head.text_proj."),
    ],
}

# Official keys that are NOT in ODISE checkpoints: where their values come from in our model.
FROZEN_SOURCE_PREFIXES: dict[str, tuple[str, str]] = {
    # official prefix -> (source file kind, our prefix or the key space of that file)
    "backbone.feature_extractor.ldm_extractor.ldm.ldm.": (
        "sd",
        "SD single-file keys (model.diffusion_model.*, ...)",
    ),
    "backbone.feature_extractor.clip.clip.": ("clip", "clip.model."),
    "category_head.clip.clip.": ("clip", "clip.model."),
    "word_head.clip.clip.": ("clip", "clip.model."),
    "clip_head.clip.clip.": ("clip", "clip.model."),
}
# Buffers the official model holds that we recreate instead of loading (none is in any file).
RECREATED_KEYS: dict[str, str] = {
    "backbone.feature_extractor.ldm_extractor.shared_noise": "sd.shared_noise (seeded randn)",
    "backbone.feature_extractor.ldm_extractor.ldm.uncond_inputs": "captioner.uncond_context (SD text encoder on '')",
    "backbone.feature_extractor.ldm_extractor.ldm.pixel_mean": "constant 0.5 (SD input normalisation)",
    "backbone.feature_extractor.ldm_extractor.ldm.pixel_std": "constant 0.5 (SD input normalisation)",
    "category_head.text_embed": "training text embeddings, computed from the vocabulary",
    "pixel_mean": "constant 0 (input normalisation to [0, 1])",
    "pixel_std": "constant 255 (input normalisation to [0, 1])",
}
# Keys of OpenAI CLIP files that are metadata, not weights.
CLIP_IGNORED_KEYS = frozenset({"input_resolution", "context_length", "vocab_size"})

# Our modules whose weights are in ODISE checkpoints (the trainable part + the no-object weights).
ODISE_CKPT_MODULES = ("captioner.", "projections.", "pixel_decoder.", "decoder.", "head.")


def _key_map(kind: str) -> list[tuple[str, str]]:
    return ODISE_KEY_MAP["common"] + ODISE_KEY_MAP[kind]


def _rename(key: str, table: list[tuple[str, str]], *, reverse: bool) -> str | None:
    best = None
    for official, ours in table:
        src, dst = (ours, official) if reverse else (official, ours)
        if src.endswith("."):
            if key.startswith(src) and (best is None or len(src) > len(best[0])):
                best = (src, dst)
        elif key == src:
            return dst
    if best is None:
        return None
    return best[1] + key[len(best[0]) :]


def from_official_key(key: str, kind: str) -> str | None:
    """Our name of an official ODISE checkpoint key, or None when the key is not ours."""
    return _rename(key, _key_map(kind), reverse=False)


def to_official_key(key: str, kind: str) -> str | None:
    """The official name of one of our ODISE-checkpoint keys, or None when it is not saved."""
    return _rename(key, _key_map(kind), reverse=True)


def official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our trainable weights (+ no-object weights) under the official ODISE names, float32, on CPU."""
    kind = model.config.classifier.kind
    out = {}
    for key, value in model.state_dict().items():
        if not key.startswith(ODISE_CKPT_MODULES):
            continue
        official = to_official_key(key, kind)
        if official is None:
            raise AssertionError(f"no official name for {key}")  # the key map is incomplete: a bug
        out[official] = value.detach().to("cpu", torch.float32).clone()
    return out


# ----------------------------------------------------------------------------------------------------------
# Strict loading
# ----------------------------------------------------------------------------------------------------------
def report_mismatch(path, *, missing=(), unexpected=(), mismatched=(), what="", hint="") -> None:
    """Raise :class:`CheckpointError` naming ``path`` and listing the keys (first 25 of each), if any."""
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: {what} does not match the model"]
    for title, keys in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("mismatched keys", mismatched),
    ):
        keys = list(keys)
        if keys:
            shown = "\n    ".join(keys[:25])
            more = f"\n    ... and {len(keys) - 25} more" if len(keys) > 25 else ""
            lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
    if hint:
        lines.append(f"  {hint}")
    raise CheckpointError("\n".join(lines))


def assign_strict(
    module: nn.Module,
    state: Mapping[str, Any],
    *,
    path,
    what: str,
    dtype=None,
    pages: FilePages | None = None,
    skip: Iterable[str] = (),
    names: Mapping[str, str] | None = None,
    hint: str = "",
) -> None:
    """Strictly assign ``state`` into ``module`` (a meta-device module is fine): keys, shapes, dtype kinds.

    Floating tensors may come in any floating dtype (OpenAI CLIP files are fp16, SD files fp32) and are cast
    to ``dtype`` (default float32) one at a time; integer tensors must be integers. Module entries in ``skip``
    (buffers recreated afterwards) are not expected in ``state``. ``names`` maps our keys to the file's names
    for error messages. ``pages``: the memory-mapped file's pages, released after each tensor is copied.
    """
    skip = set(skip)
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in skip}
    names = names or {}
    missing = sorted(names.get(k, k) for k in set(expected) - set(state))
    unexpected = sorted(names.get(k, k) for k in set(state) - set(expected))
    mismatched = []
    for key in sorted(set(expected) & set(state)):
        want, got = expected[key], state[key]
        label = names.get(key, key)
        if not isinstance(got, torch.Tensor):
            mismatched.append(f"{label}: file holds {type(got).__name__}, not a tensor")
        elif tuple(want.shape) != tuple(got.shape):
            mismatched.append(f"{label}: file {tuple(got.shape)} vs model {tuple(want.shape)}")
        elif want.dtype.is_floating_point != got.dtype.is_floating_point or got.dtype.is_complex:
            mismatched.append(f"{label}: file dtype {got.dtype} vs model {want.dtype}")
    report_mismatch(path, missing=missing, unexpected=unexpected, mismatched=mismatched, what=what, hint=hint)
    target = dtype or torch.float32
    converted = {}
    for key, value in state.items():
        converted[key] = copy_out(value, target if value.is_floating_point() else expected[key].dtype, pages)
    module.load_state_dict(converted, strict=False, assign=True)


def load_odise_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an official-layout ODISE checkpoint into ``model`` (strict, via :data:`ODISE_KEY_MAP`).

    The file holds ``{"model": state_dict, ...}`` (other entries, e.g. trainer state, are ignored) or a bare
    state dict. Every one of the official ``in_ckpt`` keys must be present with its shape and dtype float32
    (the official code never saves other dtypes); no other key may be present.
    """
    kind = model.config.classifier.kind
    raw = read_checkpoint_file(path)
    if "model" in raw:
        state = raw["model"]
    elif raw and all(isinstance(v, torch.Tensor) for v in raw.values()):
        state = raw
    else:
        raise CheckpointError(
            f"{path}: not an ODISE checkpoint: no 'model' entry (top-level keys: {sorted(map(str, raw))[:10]})"
        )
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the 'model' entry is a {type(state).__name__}, not a state dict")
    ours = {k: v for k, v in model.state_dict(keep_vars=True).items() if k.startswith(ODISE_CKPT_MODULES)}
    renamed, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        our_key = from_official_key(key, kind) if isinstance(key, str) else None
        if our_key is None or our_key not in ours:
            unexpected.append(str(key))
            continue
        if not isinstance(value, torch.Tensor):
            mismatched.append(f"{key}: file holds {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(ours[our_key].shape):
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(ours[our_key].shape)}")
        elif value.dtype != torch.float32:
            mismatched.append(f"{key}: file dtype {value.dtype}, expected torch.float32")
        else:
            renamed[our_key] = value
    seen = {from_official_key(k, kind) for k in state if isinstance(k, str)}
    missing = sorted(to_official_key(k, kind) for k in set(ours) - seen)
    report_mismatch(
        path,
        missing=missing,
        unexpected=sorted(unexpected),
        mismatched=mismatched,
        what=f"ODISE {kind} checkpoint",
    )
    with torch.no_grad():
        for key, value in renamed.items():
            ours[key].copy_(value)


def load_clip_weights(
    clip_model: nn.Module, path: Path, *, dtype: torch.dtype | None, context_length: int
) -> None:
    """Fill a CLIP model (OpenAI names; built on meta) strictly from an OpenAI-layout file.

    Keys: the file's own, minus a ``module.`` prefix and :data:`CLIP_IGNORED_KEYS`; fp16 tensors are cast to
    ``dtype`` (default float32). The causal text mask (not in OpenAI files) is recreated for ``context_length``.
    """
    raw, pages = read_weights(path, mmap=True)
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the 'state_dict' entry is a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in CLIP_IGNORED_KEYS}
    del raw
    assign_strict(clip_model, state, path=path, what="CLIP (OpenAI layout)", dtype=dtype, pages=pages)
    del state
    if getattr(clip_model, "attn_mask", None) is not None and clip_model.attn_mask.device.type == "meta":
        clip_model.attn_mask = torch.empty(context_length, context_length).fill_(float("-inf")).triu_(1)


# ----------------------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------------------
def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    extra: Mapping[str, Any] | None = None,
    storage_options: dict | None = None,
) -> str:
    """Write ``{"model": official_state_dict(model), **extra}`` to a local path or fsspec URL, atomically.

    The file loads in the official code (``ODISECheckpointer``) and in ours. ``extra`` may hold trainer
    state (optimizer, scheduler, step); loaders ignore it. Returns the sha256 of the written bytes.
    """
    payload = {"model": official_state_dict(model)}
    if extra:
        payload.update(extra)
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    url = os.fspath(path)
    if "://" in url and not url.startswith("file://"):
        import fsspec

        fs, fs_path = fsspec.core.url_to_fs(url, **(storage_options or {}))
        fs.pipe_file(fs_path, data)  # one PUT: object stores make it atomic
    else:
        local = Path(url[len("file://") :] if url.startswith("file://") else url).expanduser()
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=local.name + ".", suffix=".tmp", dir=local.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return digest
