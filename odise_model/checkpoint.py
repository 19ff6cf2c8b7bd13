"""Weights: where official files come from, how their keys map onto our modules, strict loading and saving.

Sources a user can name (see :class:`WeightSources`):

* ODISE checkpoints: a release name (``odise_label_coco_50e``, ``odise_caption_coco_50e``), a local path or any
  fsspec URL. Format ``{"model": state_dict}`` with the official key names (other top-level entries, e.g.
  trainer state, are ignored).
* Stable Diffusion v1.3: ``sd-v1-3`` (the official single file), any single-file ``.ckpt`` / ``.safetensors``
  (``{"state_dict": ...}`` with ``model.diffusion_model.*``, ``first_stage_model.*``,
  ``cond_stage_model.transformer.*``; converted with diffusers' own ``convert_ldm_*`` utilities against the
  configs we ship), a diffusers-format folder, or a hub id.
* CLIP ViT-L/14-336: ``openai`` (open_clip's pretrained tag, the OpenAI TorchScript file) or a file in the OpenAI
  layout (TorchScript archive, ``torch.save``'d state dict, or safetensors).

Remote files are downloaded once into the cache (``$ODISE_CACHE``, default ``~/.cache/odise_annotate``); a
directory named by ``$ODISE_MODEL_ZOO`` is searched first by file name (as the official code does). With
``offline=True`` (or ``ODISE_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) the network is never touched and a missing file
raises :class:`WeightsNotFoundError` naming the file, the places searched and how to provide it.

Loading is strict: the ODISE key map (:data:`ODISE_KEY_MAP`) is the single table between official and our names,
used by :func:`load_odise_checkpoint` and :func:`save_checkpoint`; every key of a file must be consumed, every
parameter the file should provide must be present, shapes and dtypes must match; otherwise
:class:`CheckpointError` lists the missing / unexpected / mismatched keys and names the file. Files are read with
``torch.load(weights_only=True)`` or safetensors (a pickle never runs code); the OpenAI CLIP TorchScript archive
is read with ``torch.jit.load`` (TorchScript deserialisation does not execute Python code).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ODISEConfig

logger = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "WeightsNotFoundError",
    "ODISE_KEY_MAP",
    "FROZEN_SOURCE_PREFIXES",
    "RECREATED_KEYS",
    "RELEASES",
    "WeightSources",
    "WeightLoader",
    "to_official_key",
    "from_official_key",
    "official_state_dict",
    "load_odise_checkpoint",
    "save_checkpoint",
    "read_checkpoint_file",
    "default_cache_dir",
    "file_sha256",
    "parse_dtype",
]


class CheckpointError(ValueError):
    """A weights file is unreadable or does not match the model (message names the file and the keys)."""


class WeightsNotFoundError(FileNotFoundError):
    """A weights file is not available (offline, unreachable, or missing); says where it was looked for."""


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
    "backbone.feature_extractor.ldm_extractor.ldm.ldm.": ("sd", "SD single-file keys (model.diffusion_model.*, ...)"),
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
# Releases
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    url: str
    filename: str
    license: str
    sha256: str | None = None  # full hash when known; otherwise a torch.hub-style prefix in the file name


RELEASES: dict[str, Release] = {
    "odise_label_coco_50e": Release(
        "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/odise_label_coco_50e-b67d2efc.pth",
        "odise_label_coco_50e-b67d2efc.pth",
        "CC BY-NC-SA 4.0 (NVIDIA ODISE weights)",
    ),
    "odise_caption_coco_50e": Release(
        "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/odise_caption_coco_50e-853cc971.pth",
        "odise_caption_coco_50e-853cc971.pth",
        "CC BY-NC-SA 4.0 (NVIDIA ODISE weights)",
    ),
    "sd-v1-3": Release(
        "https://huggingface.co/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt",
        "sd-v1-3.ckpt",
        "CreativeML OpenRAIL-M (Stable Diffusion v1)",
    ),
    "openai": Release(
        "https://openaipublic.azureedge.net/clip/models/"
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
        "ViT-L-14-336px.pt",
        "MIT (OpenAI CLIP)",
        sha256="3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    ),
}
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


def default_cache_dir() -> Path:
    """``$ODISE_CACHE``, else ``$XDG_CACHE_HOME/odise_annotate``, else ``~/.cache/odise_annotate``."""
    if os.environ.get("ODISE_CACHE"):
        return Path(os.environ["ODISE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "odise_annotate"


def _env_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("ODISE_OFFLINE", "HF_HUB_OFFLINE"))


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch dtype, or one of ``fp32 / float32 / bf16 / bfloat16 / fp16 / float16``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype in (None, torch.float32) else dtype
    names = {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a local file, remembered in the cache keyed by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    memo_file = default_cache_dir() / "sha256.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    memo[key] = value
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass
    return value


def _check_hash(path: Path, *, expected: str | None, source: str) -> None:
    """Verify a full sha256 (when known) or a torch.hub-style ``-<hex>.`` prefix in the file name."""
    match = _HASH_IN_NAME.search(path.name)
    want = expected or (match.group(1) if match else None)
    if not want:
        return
    actual = file_sha256(path)
    if not actual.startswith(want):
        raise CheckpointError(
            f"{source}: sha256 mismatch for {path}: expected {want}..., got {actual[: len(want)]}... "
            f"(the file is corrupt, truncated or not the released one; delete it and download it again)"
        )


# ----------------------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSources:
    """What the user asked for: one spec (or None = random) per weight kind."""

    checkpoint: str | None = None
    sd: str | None = None
    clip: str | None = None

    @classmethod
    def resolve(cls, cfg: ODISEConfig, *, checkpoint=None, sd_weights=None, clip_weights=None, pretrained=False):
        if pretrained:
            checkpoint = checkpoint or cfg.official_checkpoint
            sd_weights = sd_weights or "sd-v1-3"
            clip_weights = clip_weights or "openai"
            if checkpoint is None:
                raise ValueError(f"variant {cfg.name!r} has no official checkpoint; pass checkpoint= explicitly")
        srcs = cls(
            checkpoint=None if checkpoint is None else os.fspath(checkpoint),
            sd=None if sd_weights is None else os.fspath(sd_weights),
            clip=None if clip_weights is None else os.fspath(clip_weights),
        )
        given = [k for k, v in dataclasses.asdict(srcs).items() if v is not None]
        if given and len(given) < 3:
            missing = sorted({"checkpoint", "sd", "clip"} - set(given))
            logger.warning("building %s with RANDOM weights for %s (only %s given)", cfg.name, missing, given)
        return srcs


@dataclass
class LocatedFile:
    """A weights source resolved to something on local disk."""

    kind: str  # "checkpoint" | "sd" | "clip"
    spec: str  # what the user named
    path: Path  # local file, or a diffusers folder for SD
    license: str | None = None
    sha256: str | None = None
    is_diffusers_dir: bool = False

    def provenance(self) -> dict[str, Any]:
        digest = self.sha256
        if digest is None and self.path.is_file():
            digest = file_sha256(self.path)
        return {"source": self.spec, "path": str(self.path), "sha256": digest, "license": self.license}


@dataclass
class Located:
    checkpoint: LocatedFile | None = None
    sd: LocatedFile | None = None
    clip: LocatedFile | None = None
    extra: dict = field(default_factory=dict)

    def any(self) -> bool:
        return any(f is not None for f in (self.checkpoint, self.sd, self.clip))

    def provenance(self) -> dict[str, Any]:
        return {
            kind: (None if f is None else f.provenance())
            for kind, f in (("checkpoint", self.checkpoint), ("sd", self.sd), ("clip", self.clip))
        }


_HINTS = {
    "checkpoint": "download it from the ODISE release page (https://github.com/NVlabs/ODISE/releases/tag/v1.0.0) "
    "and pass its path or URL as checkpoint=... / --checkpoint, or put it in $ODISE_MODEL_ZOO or the cache",
    "sd": "download sd-v1-3.ckpt (https://huggingface.co/CompVis/stable-diffusion-v-1-3-original, licence "
    "acceptance required) and pass its path as sd_weights=... / --sd-weights, or put it in $ODISE_MODEL_ZOO",
    "clip": "download ViT-L-14-336px.pt (OpenAI CLIP) and pass its path as clip_weights=... / --clip-weights, "
    "or put it in $ODISE_MODEL_ZOO or the cache",
}


class WeightLoader:
    """Resolves weight specs to local files (cache, model zoo, downloads) honouring offline mode."""

    def __init__(self, *, offline: bool | None = None, cache_dir=None, storage_options: dict | None = None) -> None:
        self.offline = _env_offline() if offline is None else bool(offline)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.storage_options = storage_options or {}

    def locate_all(self, sources: WeightSources) -> Located:
        return Located(
            checkpoint=None if sources.checkpoint is None else self.locate(sources.checkpoint, "checkpoint"),
            sd=None if sources.sd is None else self.locate(sources.sd, "sd"),
            clip=None if sources.clip is None else self.locate(sources.clip, "clip"),
        )

    # -- helpers ---------------------------------------------------------------------------------------
    def _not_found(self, kind: str, spec: str, searched: Iterable[str], reason: str) -> WeightsNotFoundError:
        where = "\n  ".join(searched)
        return WeightsNotFoundError(
            f"{kind} weights {spec!r} not available: {reason}.\n  searched:\n  {where}\n  how to provide: {_HINTS[kind]}"
        )

    def _zoo_candidates(self, kind: str, filename: str) -> list[Path]:
        out = []
        if os.environ.get("ODISE_MODEL_ZOO"):
            out.append(Path(os.environ["ODISE_MODEL_ZOO"]).expanduser() / filename)
        out.append(self.cache_dir / kind / filename)
        return out

    def _download(self, url: str, dest: Path, *, kind: str, spec: str, searched: list[str]) -> str:
        """Stream ``url`` (any fsspec protocol) to ``dest`` atomically; returns the sha256."""
        import fsspec

        if self.offline:
            raise self._not_found(kind, spec, searched, "offline mode and no local copy")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        try:
            protocol = url.split("://", 1)[0]
            options = self.storage_options if protocol not in ("http", "https") else {}
            logger.info("downloading %s -> %s", url, dest)
            with fsspec.open(url, "rb", **options) as src, os.fdopen(fd, "wb") as out:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
            os.replace(tmp_name, dest)
        except FileNotFoundError as exc:
            raise self._not_found(kind, spec, [*searched, url], f"not found at the URL ({exc})") from exc
        except OSError as exc:
            raise self._not_found(kind, spec, [*searched, url], f"download failed: {exc}") from exc
        except Exception as exc:  # network libraries raise many types (aiohttp, botocore, ...)
            raise self._not_found(kind, spec, [*searched, url], f"download failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        value = digest.hexdigest()
        return value

    def _from_url(self, url: str, kind: str, spec: str, *, filename: str | None = None, release: Release | None = None):
        name = filename or url.rstrip("/").rsplit("/", 1)[-1] or "weights"
        if release is None:
            name = f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"
        candidates = self._zoo_candidates(kind, name)
        for cand in candidates:
            if cand.is_file():
                return cand, None
        searched = [str(c) for c in candidates]
        digest = self._download(url, candidates[-1], kind=kind, spec=spec, searched=searched)
        return candidates[-1], digest

    # -- main entry --------------------------------------------------------------------------------------
    def locate(self, spec: str, kind: str) -> LocatedFile:
        """Resolve one spec to a local path (downloading into the cache when allowed)."""
        release = RELEASES.get(spec)
        if release is not None:
            if kind == "checkpoint" and not spec.startswith("odise_") or kind == "sd" and spec != "sd-v1-3" or kind == "clip" and spec != "openai":
                raise ValueError(f"{spec!r} is not a {kind} release (known: {sorted(RELEASES)})")
            path, digest = self._from_url(release.url, kind, spec, filename=release.filename, release=release)
            _check_hash(path, expected=release.sha256, source=spec)
            return LocatedFile(kind, spec, path, license=release.license, sha256=digest)
        if spec.startswith("file://"):
            spec_path = Path(spec[len("file://") :])
        elif "://" in spec:
            path, digest = self._from_url(spec, kind, spec)
            _check_hash(path, expected=None, source=spec)
            return LocatedFile(kind, spec, path, sha256=digest)
        else:
            spec_path = Path(spec).expanduser()
        if spec_path.is_file():
            _check_hash(spec_path, expected=None, source=spec)
            return LocatedFile(kind, spec, spec_path)
        if spec_path.is_dir():
            if kind != "sd":
                raise CheckpointError(f"{spec}: is a directory; {kind} weights must be a file")
            return LocatedFile(kind, spec, spec_path, is_diffusers_dir=True)
        if kind == "sd" and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
            return self._hub_snapshot(spec)
        raise self._not_found(kind, spec, [str(spec_path.resolve())], "no such file")

    def _hub_snapshot(self, repo_id: str) -> LocatedFile:
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "unet/*", "vae/*", "text_encoder/*"]
        try:
            path = snapshot_download(
                repo_id,
                allow_patterns=patterns,
                cache_dir=str(self.cache_dir / "hub"),
                local_files_only=self.offline,
            )
        except Exception as exc:  # huggingface_hub raises several error types for offline / missing
            raise self._not_found(
                "sd", repo_id, [str(self.cache_dir / "hub")], f"hub snapshot unavailable ({type(exc).__name__}: {exc})"
            ) from exc
        return LocatedFile("sd", repo_id, Path(path), is_diffusers_dir=True)


# ----------------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------------
def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def read_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read a weights file safely: safetensors, ``torch.load(weights_only=True)``, or a TorchScript archive.

    Returns the top-level object (a dict). Errors name the file.
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path)))
        if _is_torchscript(path):
            module = torch.jit.load(str(path), map_location="cpu")
            return {k: v for k, v in module.state_dict().items()}
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "UnpicklingError" in type(exc).__name__:
            reason = "it contains pickled Python objects that would run code on load; refusing (weights_only=True)"
        elif "zip" in text.lower() or "EOF" in text or "truncat" in text.lower() or "central directory" in text:
            reason = f"the file is truncated or corrupt ({text.splitlines()[0] if text else type(exc).__name__})"
        else:
            reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
        raise CheckpointError(f"{path}: cannot read weights: {reason}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj)


def _report(path, *, missing=(), unexpected=(), mismatched=(), what="") -> None:
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: {what} does not match the model"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched keys", mismatched)):
        keys = list(keys)
        if keys:
            shown = "\n    ".join(keys[:25])
            more = f"\n    ... and {len(keys) - 25} more" if len(keys) > 25 else ""
            lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
    raise CheckpointError("\n".join(lines))


def _assign_strict(module: nn.Module, state: Mapping[str, torch.Tensor], *, path, what: str, dtype=None) -> None:
    """Strictly assign ``state`` into ``module`` (keys, shapes, dtypes), casting to ``dtype`` if given."""
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = []
    for key in sorted(set(expected) & set(state)):
        want, got = expected[key], state[key]
        if tuple(want.shape) != tuple(got.shape):
            mismatched.append(f"{key}: file {tuple(got.shape)} vs model {tuple(want.shape)}")
        elif want.dtype.is_floating_point != got.dtype.is_floating_point:
            mismatched.append(f"{key}: file dtype {got.dtype} vs model {want.dtype}")
    _report(path, missing=missing, unexpected=unexpected, mismatched=mismatched, what=what)
    cast = {k: (v.to(dtype or torch.float32) if v.is_floating_point() else v) for k, v in state.items()}
    module.load_state_dict(cast, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------------------
# ODISE checkpoints
# ----------------------------------------------------------------------------------------------------------
def load_odise_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load an official-layout ODISE checkpoint into ``model`` (strict, via :data:`ODISE_KEY_MAP`)."""
    kind = model.config.classifier.kind
    raw = read_checkpoint_file(path)
    state = raw.get("model", raw)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: 'model' entry is not a state dict")
    ours = {k: v for k, v in model.state_dict().items() if k.startswith(ODISE_CKPT_MODULES)}
    renamed, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            unexpected.append(f"{key} (not a tensor)")
            continue
        our_key = from_official_key(key, kind)
        if our_key is None or our_key not in ours:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(ours[our_key].shape):
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(ours[our_key].shape)}")
        elif value.dtype != torch.float32:
            mismatched.append(f"{key}: file dtype {value.dtype}, expected torch.float32")
        renamed[our_key] = value
    missing = sorted(to_official_key(k, kind) for k in set(ours) - set(renamed))
    _report(path, missing=missing, unexpected=sorted(unexpected), mismatched=mismatched, what=f"ODISE {kind} checkpoint")
    with torch.no_grad():
        for key, value in renamed.items():
            target = model.get_parameter(key) if key in dict(model.named_parameters()) else model.get_buffer(key)
            target.copy_(value)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None,
                    storage_options: dict | None = None) -> str:
    """Write ``{"model": official_state_dict(model), **extra}`` to a local path or fsspec URL, atomically.

    The file loads in the official code (``ODISECheckpointer``) and in ours. ``extra`` may hold trainer
    state (optimizer, scheduler, step); loaders ignore it. Returns the sha256 of the written bytes.
    """
    import io

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
        local = Path(url[len("file://") :] if url.startswith("file://") else url)
        local.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=local.name + ".", suffix=".tmp", dir=local.parent)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, local)
    return digest


# ----------------------------------------------------------------------------------------------------------
# Stable Diffusion
# ----------------------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def convert_sd_single_file(state: Mapping[str, torch.Tensor], cfg: ODISEConfig, *, path) -> tuple[dict, dict, dict]:
    """Split and convert an original SD v1 single file into diffusers UNet, VAE and text-encoder state dicts.

    Uses diffusers' ``convert_ldm_unet_checkpoint`` / ``convert_ldm_vae_checkpoint`` /
    ``convert_ldm_clip_checkpoint``. Every key of the file must be consumed by a conversion or be in the
    documented ignore lists (:data:`SD_IGNORED_KEYS`, :data:`SD_IGNORED_PREFIXES`); otherwise an error lists them.
    """
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )

    sd_cfg = cfg.stable_diffusion
    unet = convert_ldm_unet_checkpoint(state, dict(sd_cfg.unet))
    vae = convert_ldm_vae_checkpoint(state, dict(sd_cfg.vae))
    text = convert_ldm_clip_checkpoint(state)
    used = {_storage_key(t) for d in (unet, vae, text) for t in d.values()}
    leftover = sorted(
        k
        for k, v in state.items()
        if k not in SD_IGNORED_KEYS
        and not k.startswith(SD_IGNORED_PREFIXES)
        and not (isinstance(v, torch.Tensor) and _storage_key(v) in used)
    )
    _report(path, unexpected=leftover, what="Stable Diffusion single file (keys not consumed by the conversion)")
    text.pop("text_model.embeddings.position_ids", None)
    return unet, vae, text


def _read_diffusers_weights(folder: Path, sub: str) -> dict[str, torch.Tensor]:
    base = folder / sub
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin"):
        if (base / name).is_file():
            return read_checkpoint_file(base / name)
    raise CheckpointError(f"{folder}: no weights in {sub}/ (expected diffusion_pytorch_model.safetensors or .bin)")


def _check_diffusers_config(folder: Path, sub: str, expected: Mapping[str, Any]) -> None:
    cfg_file = folder / sub / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{folder}: missing {sub}/config.json")
    got = json.loads(cfg_file.read_text())
    diffs = [
        f"{k}: folder {got.get(k)!r} vs expected {v!r}"
        for k, v in expected.items()
        if k not in ("class_embed_type", "sample_size", "scaling_factor") and k in got and _norm(got[k]) != _norm(v)
    ]
    if diffs:
        raise CheckpointError(f"{folder}/{sub}: architecture differs from SD v1:\n  " + "\n  ".join(diffs))


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------------------
def materialize(model: nn.Module, located: Located, *, dtype: torch.dtype | None) -> None:
    """Fill SD / CLIP (built on the meta device) and the ODISE weights from the located files (strict), then
    compute the buffers derived from weights (empty-prompt embedding, initial null embedding)."""
    from .build import build_sd_text_encoder, empty_prompt_embedding

    cfg: ODISEConfig = model.config
    # 1. CLIP (one shared instance)
    if located.clip is not None:
        raw = read_checkpoint_file(located.clip.path)
        raw = raw.get("state_dict", raw)
        clip_state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in raw.items()}
        clip_state = {k: v for k, v in clip_state.items() if k not in CLIP_IGNORED_KEYS}
        _assign_strict(model.clip.model, clip_state, path=located.clip.path, what="CLIP (OpenAI layout)", dtype=dtype)
        del raw, clip_state
        model.clip.model.attn_mask = _causal_mask(cfg.clip.context_length)
    # 2. Stable Diffusion (UNet + VAE into the model; text encoder only to embed "")
    text_encoder = None
    if located.sd is not None:
        path = located.sd.path
        if located.sd.is_diffusers_dir:
            _check_diffusers_config(path, "unet", cfg.stable_diffusion.unet)
            _check_diffusers_config(path, "vae", cfg.stable_diffusion.vae)
            unet_sd = _read_diffusers_weights(path, "unet")
            vae_sd = _read_diffusers_weights(path, "vae")
            text_sd = _read_diffusers_weights(path, "text_encoder")
        else:
            raw = read_checkpoint_file(path, mmap=True)
            state = raw.get("state_dict", raw)
            unet_sd, vae_sd, text_sd = convert_sd_single_file(state, cfg, path=path)
            del raw, state
        _assign_strict(model.sd.unet, unet_sd, path=path, what="Stable Diffusion UNet", dtype=dtype)
        _assign_strict(model.sd.vae, vae_sd, path=path, what="Stable Diffusion VAE", dtype=dtype)
        del unet_sd, vae_sd
        with torch.device("meta"):
            text_encoder = build_sd_text_encoder(cfg)
        text_sd = {k: v for k, v in text_sd.items() if not k.endswith("embeddings.position_ids")}
        if not any(k.startswith("text_model.") for k in text_encoder.state_dict()):
            # transformers >= 5 keeps the text transformer at the top of CLIPTextModel
            text_sd = {k.removeprefix("text_model."): v for k, v in text_sd.items()}
        buffers = {k for k, _ in text_encoder.named_buffers()}
        _assign_strict_partial(text_encoder, text_sd, path=path, skip=buffers)
        del text_sd
        _fix_text_encoder_buffers(text_encoder)
    else:
        text_encoder = build_sd_text_encoder(cfg)
    # 3. ODISE trainable weights
    if located.checkpoint is not None:
        load_odise_checkpoint(model, located.checkpoint.path)
    # 4. buffers derived from loaded weights
    model.captioner.set_uncond_context(empty_prompt_embedding(text_encoder.float()))
    del text_encoder
    if located.checkpoint is None and model.head.null_embed is not None:
        with torch.no_grad():
            model.head.null_embed.copy_(model.clip.encode_text([""]).to(model.head.null_embed))
    if dtype is not None:
        model.set_frozen_dtype(dtype)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise AssertionError(f"tensors left on the meta device: {on_meta[:10]}")  # a loading bug


def _assign_strict_partial(module: nn.Module, state: Mapping[str, torch.Tensor], *, path, skip: set[str]) -> None:
    """Strict assign of parameters; buffers in ``skip`` are recreated afterwards."""
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items() if k not in skip}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    _report(path, missing=missing, unexpected=unexpected, mismatched=mismatched, what="Stable Diffusion text encoder")
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=False, assign=True)


def _fix_text_encoder_buffers(text_encoder: nn.Module) -> None:
    for name, buf in list(text_encoder.named_buffers()):
        if buf.device.type == "meta":
            owner_name, _, attr = name.rpartition(".")
            owner = text_encoder.get_submodule(owner_name)
            if attr == "position_ids":
                value = torch.arange(buf.shape[-1], dtype=buf.dtype).expand(buf.shape).clone()
            else:
                raise AssertionError(f"unknown meta buffer {name} in the SD text encoder")
            owner.register_buffer(attr, value, persistent=False)


def _causal_mask(n: int) -> torch.Tensor:
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)
