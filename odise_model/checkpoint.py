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
:class:`CheckpointError` lists the missing / unexpected / mismatched keys and names the file.

Safety: pickles are read with ``torch.load(weights_only=True)`` (or safetensors), so a checkpoint never runs
code. PyTorch-Lightning and detectron2 training files (the official SD ``.ckpt`` among them) also pickle
training metadata (``pytorch_lightning...ModelCheckpoint`` callback state, numpy scalars, fvcore schedulers)
that ``weights_only`` refuses; the globals listed in :data:`METADATA_GLOBAL_PREFIXES` are therefore bound to an
inert placeholder class that stores nothing and runs nothing, and any other global is refused before
unpickling, naming it. The OpenAI CLIP file is a TorchScript archive; it is never given to ``torch.jit.load``
(which would run the archive's TorchScript ``__setstate__`` methods): :mod:`odise_model.torchscript_weights`
unpickles its module tree into inert records, rebuilds the tensors and keeps the declared parameters and
buffers (the only exception: the official OpenAI file, recognised by its full sha256, if the safe reader
ever met a construct it does not know).

Memory: the frozen weights (SD, CLIP: 98% of the model) are built on the ``meta`` device and filled from
memory-mapped files one tensor at a time: each tensor is copied (and cast: fp16 CLIP -> fp32, or fp32 -> bf16
with ``dtype=``) into private memory and its file pages are handed back to the OS right away (Linux
``madvise(MADV_DONTNEED)`` on the private file mapping). Host memory therefore peaks near the size of the
loaded model, not model + file, and the model never depends on the file after loading (replacing or deleting
it is safe). SD's text encoder is loaded first, used once for the empty-prompt embedding, and freed before the
UNet is read.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import io
import json
import logging
import mmap as _mmap
import os
import re
import sys
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
    "METADATA_GLOBAL_PREFIXES",
    "WeightSources",
    "WeightLoader",
    "to_official_key",
    "from_official_key",
    "official_state_dict",
    "load_odise_checkpoint",
    "save_checkpoint",
    "read_checkpoint_file",
    "convert_sd_single_file",
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

# Pickle globals of training metadata found in official training files (PyTorch-Lightning callback state in
# SD .ckpt files, detectron2 / fvcore trainer state, numpy scalars). When unpickling they are bound to an inert
# placeholder: nothing from these modules is imported or called. A name ending in "." is a prefix.
METADATA_GLOBAL_PREFIXES: tuple[str, ...] = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "fvcore.",
    "detectron2.",
    "iopath.",
    "omegaconf.",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.",
    "_codecs.encode",
    "__builtin__.set",
    "builtins.set",
)


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
_RELEASE_KIND = {"odise_label_coco_50e": "checkpoint", "odise_caption_coco_50e": "checkpoint", "sd-v1-3": "sd",
                 "openai": "clip"}
# torch.hub convention: "<name>-<first hex digits of the sha256>.<ext>"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


def _hub_token(url: str) -> str | None:
    """The Hugging Face token for a ``https://huggingface.co/...`` URL, if the user has one (never logged)."""
    from urllib.parse import urlparse

    host = (urlparse(url).hostname or "").lower()
    if host != "huggingface.co" and not host.endswith(".huggingface.co"):
        return None
    if token := os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token store: download anonymously
        return None


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


def _sha256_memo_file() -> Path:
    return default_cache_dir() / "sha256.json"


def _memo_key(path: Path) -> str:
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}"


def _remember_sha256(path: Path, value: str) -> None:
    """Record a file's sha256 keyed by (path, size, mtime), so it is hashed once (best effort)."""
    memo_file = _sha256_memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo[_memo_key(path.resolve())] = value
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a local file, remembered in the cache keyed by (path, size, mtime)."""
    path = Path(path).resolve()
    try:
        memo = json.loads(_sha256_memo_file().read_text())
    except (OSError, ValueError):
        memo = {}
    key = _memo_key(path)
    if key in memo:
        return memo[key]
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    value = digest.hexdigest()
    _remember_sha256(path, value)
    return value


def _check_hash(path: Path, *, expected: str | None, source: str) -> None:
    """Verify a full sha256 (when known) or a torch.hub-style ``-<hex>.`` prefix in the file name."""
    match = _HASH_IN_NAME.search(path.name)
    if match and match.group(1).isdigit():
        match = None  # "-20240101.pth": a date or a step number, not a hash prefix (which has letters 99% of the time)
    want = expected or (match.group(1) if match else None)
    if not want:
        return
    actual = file_sha256(path)
    if not actual.startswith(want):
        origin = "the release's published sha256" if expected else (
            f"the hash prefix in its name ('-{want}', torch.hub convention; rename the file if that suffix is "
            "not a hash)"
        )
        raise CheckpointError(
            f"{path}: sha256 mismatch for {source!r}: expected {want}..., got {actual[: len(want)]}... "
            f"(checked against {origin}). The file is corrupt, truncated or not the released one; delete it and "
            "download it again"
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
    "checkpoint": "download it from the ODISE release page (https://github.com/NVlabs/ODISE/releases/tag/v1.0.0, "
    "e.g. " + RELEASES["odise_label_coco_50e"].url + ") and pass its path or URL as checkpoint=... / "
    "--checkpoint, or put it (same file name) in $ODISE_MODEL_ZOO or the cache folder listed above",
    "sd": "download " + RELEASES["sd-v1-3"].url + " (licence acceptance required on Hugging Face) and pass its "
    "path as sd_weights=... / --sd-weights, or put it (same file name) in $ODISE_MODEL_ZOO or the cache folder "
    "listed above",
    "clip": "download " + RELEASES["openai"].url + " (OpenAI CLIP) and pass its path as clip_weights=... / "
    "--clip-weights, or put it (same file name) in $ODISE_MODEL_ZOO or the cache folder listed above",
}


class WeightLoader:
    """Resolves weight specs to local files (cache, model zoo, downloads) honouring offline mode.

    Lookup order for a release name or URL: ``$ODISE_MODEL_ZOO/<file name>``, then
    ``<cache_dir>/<kind>/<file name>`` (URLs other than releases are cached as ``<sha1(url)[:10]>-<file name>``
    so two URLs ending in the same name never collide), then a download into the cache (not offline).
    A local path that does not exist is also looked up by file name in ``$ODISE_MODEL_ZOO``.
    """

    def __init__(self, *, offline: bool | None = None, cache_dir=None, storage_options: dict | None = None) -> None:
        self.offline = _env_offline() if offline is None else bool(offline)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self.storage_options = storage_options or {}

    def locate_all(self, sources: WeightSources) -> Located:
        """Locate every named source; when files are missing, one error lists all of them (not just the first)."""
        found: dict[str, Any] = {}
        missing: list[WeightsNotFoundError] = []
        for kind in ("checkpoint", "sd", "clip"):
            spec = getattr(sources, kind)
            if spec is None:
                found[kind] = None
                continue
            try:
                found[kind] = self.locate(spec, kind)
            except WeightsNotFoundError as exc:
                missing.append(exc)
        if len(missing) == 1:
            raise missing[0]
        if missing:
            raise WeightsNotFoundError(
                f"{len(missing)} weights files are not available:\n\n" + "\n\n".join(str(e) for e in missing)
            )
        return Located(**found)

    # -- helpers ---------------------------------------------------------------------------------------
    def _not_found(self, kind: str, spec: str, filename: str, searched: Iterable[str], reason: str):
        where = "\n    ".join(searched)
        return WeightsNotFoundError(
            f"{kind} weights file {filename!r} (from {spec!r}) not available: {reason}.\n"
            f"  searched:\n    {where}\n  how to provide: {_HINTS[kind]}"
        )

    @staticmethod
    def _zoo_dir() -> Path | None:
        zoo = os.environ.get("ODISE_MODEL_ZOO")
        return Path(zoo).expanduser() if zoo else None

    def _download(self, url: str, dest: Path, *, kind: str, spec: str, filename: str, searched: list[str]) -> str:
        """Stream ``url`` (any fsspec protocol) to ``dest`` atomically; returns the sha256."""
        import fsspec

        if self.offline:
            raise self._not_found(kind, spec, filename, [*searched, f"{url} (not tried: offline)"],
                                  "offline mode and no local copy")
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        try:
            protocol = url.split("://", 1)[0]
            if protocol in ("http", "https"):
                options = {"block_size": 0}  # one streaming GET: no HEAD / range requests (plain servers)
                if token := _hub_token(url):
                    # gated Hugging Face repos (SD v1.3): the user's token ($HF_TOKEN or `hf auth login`)
                    options["headers"] = {"Authorization": f"Bearer {token}"}
            else:
                options = dict(self.storage_options)
            logger.info("downloading %s -> %s", url, dest)
            with fsspec.open(url, "rb", **options) as src, os.fdopen(fd, "wb") as out:
                while block := src.read(1 << 22):
                    digest.update(block)
                    out.write(block)
            os.replace(tmp_name, dest)
        except FileNotFoundError as exc:
            cause = exc.__cause__  # fsspec's http raises FileNotFoundError for unreachable hosts too
            if cause is not None and not isinstance(cause, FileNotFoundError):
                reason = f"download failed: {type(cause).__name__}: {cause}"
            else:
                reason = f"not found at the URL ({exc})"
            raise self._not_found(kind, spec, filename, [*searched, url], reason) from exc
        except Exception as exc:  # network libraries raise many types (aiohttp, botocore, OSError, ...)
            raise self._not_found(
                kind, spec, filename, [*searched, url], f"download failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if os.path.exists(tmp_name):
                os.unlink(tmp_name)
        value = digest.hexdigest()
        _remember_sha256(dest, value)
        return value

    def _from_url(self, url: str, kind: str, spec: str, *, release: Release | None = None):
        name = release.filename if release else (url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "weights")
        cache_name = name if release else f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"
        candidates = []
        if (zoo := self._zoo_dir()) is not None:
            candidates.append(zoo / name)
        candidates.append(self.cache_dir / kind / cache_name)
        for cand in candidates:
            if cand.is_file():
                return cand, None
        searched = [str(c) for c in candidates]
        digest = self._download(url, candidates[-1], kind=kind, spec=spec, filename=name, searched=searched)
        return candidates[-1], digest

    # -- main entry --------------------------------------------------------------------------------------
    def locate(self, spec: str, kind: str) -> LocatedFile:
        """Resolve one spec to a local path (downloading into the cache when allowed)."""
        release = RELEASES.get(spec)
        if release is not None:
            if _RELEASE_KIND[spec] != kind:
                names = sorted(k for k, v in _RELEASE_KIND.items() if v == kind)
                raise ValueError(f"{spec!r} is not a {kind} release (known {kind} releases: {names})")
            path, digest = self._from_url(release.url, kind, spec, release=release)
            _check_hash(path, expected=release.sha256, source=spec)
            return LocatedFile(kind, spec, path, license=release.license, sha256=digest)
        if spec.startswith("file://"):
            spec_path = Path(spec[len("file://") :]).expanduser()
        elif "://" in spec:
            path, digest = self._from_url(spec, kind, spec)
            _check_hash(path, expected=None, source=spec)
            return LocatedFile(kind, spec, path, sha256=digest)
        else:
            spec_path = Path(spec).expanduser()
        if spec_path.is_dir():
            if kind != "sd":
                raise CheckpointError(f"{spec}: is a directory; {kind} weights must be a file")
            return LocatedFile(kind, spec, spec_path, is_diffusers_dir=True)
        searched = [str(spec_path.absolute())]
        zoo = self._zoo_dir()
        if not spec_path.is_file() and zoo is not None and spec_path.name:
            searched.append(str(zoo / spec_path.name))
            if (zoo / spec_path.name).is_file():
                spec_path = zoo / spec_path.name
        if spec_path.is_file():
            _check_hash(spec_path, expected=None, source=spec)
            return LocatedFile(kind, spec, spec_path)
        if kind == "sd" and "://" not in spec and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
            return self._hub_snapshot(spec)
        raise self._not_found(kind, spec, spec_path.name or spec, searched, "no such file")

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
                "sd", repo_id, repo_id, [str(self.cache_dir / "hub")],
                f"hub snapshot unavailable ({type(exc).__name__}: {exc})",
            ) from exc
        return LocatedFile("sd", repo_id, Path(path), is_diffusers_dir=True)


# ----------------------------------------------------------------------------------------------------------
# Reading files safely
# ----------------------------------------------------------------------------------------------------------
class _Placeholder:
    """Stands in for a training-metadata global (see :data:`METADATA_GLOBAL_PREFIXES`) while unpickling.

    Accepts any constructor arguments and any pickled state and keeps none of it: no code from the
    named module is imported or run. Weights are never placeholders (strict loading requires tensors).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _Placeholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<training metadata placeholder>"


def _is_metadata_global(name: str) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in METADATA_GLOBAL_PREFIXES)


def _is_torchscript(path: Path) -> bool:
    from .torchscript_weights import is_torchscript_archive

    return is_torchscript_archive(str(path))


OPENAI_CLIP_L14_336_SHA256 = "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"


def _read_torchscript(path: Path) -> dict[str, Any]:
    """A TorchScript archive's parameters and buffers, read without running anything from it.

    Only should the safe reader meet a construct it does not know AND the file be the official OpenAI
    ``ViT-L-14-336px.pt`` (its full sha256, published in its URL), ``torch.jit.load`` is used instead.
    """
    from .torchscript_weights import TorchScriptReadError, read_torchscript_state_dict

    try:
        return read_torchscript_state_dict(str(path))
    except TorchScriptReadError as exc:
        if file_sha256(path) != OPENAI_CLIP_L14_336_SHA256:
            raise CheckpointError(
                f"{path}: cannot read weights: {exc}. TorchScript archives are read without torch.jit.load "
                "(which could run code from the file); convert the file to safetensors or a plain state dict"
            ) from None
        logger.info("%s: the official OpenAI file (sha256 verified); reading it with torch.jit.load", path)
        module = torch.jit.load(str(path), map_location="cpu")
        state = dict(module.state_dict())
        del module
        return state


_REFUSAL_MARKERS = ("Unsupported global", "Trying to call reduce", "Can only build", "Can only create new object",
                    "is blocked", "Unsupported operand", "Unsupported class")


class _FilePages:
    """Hands the pages of a privately memory-mapped weights file back to the OS once tensors were copied out.

    Linux only (elsewhere :meth:`release` does nothing and memory peaks higher). Only address ranges of the
    mappings created by our own ``torch.load(mmap=True)`` call are touched; they are private file mappings
    that are never written, so ``MADV_DONTNEED`` merely drops clean pages (a later read re-faults them from
    the file), which is why releasing a page shared with a neighbouring tensor is harmless.
    """

    MADV_DONTNEED = 4

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions = regions
        self._madvise = None
        if regions:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                self._madvise = libc.madvise
            except (OSError, AttributeError):
                self.regions = []

    @staticmethod
    def mappings(path: Path) -> set[tuple[int, int]]:
        """Private mappings of ``path`` in this process (empty off Linux)."""
        if not sys.platform.startswith("linux"):
            return set()
        real = os.path.realpath(path)
        found = set()
        try:
            with open("/proc/self/maps") as fh:
                for line in fh:
                    parts = line.rstrip("\n").split(maxsplit=5)
                    if len(parts) == 6 and parts[5] == real and parts[1].endswith("p"):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        found.add((start, end))
        except OSError:
            return set()
        return found

    def release(self, tensor: torch.Tensor) -> None:
        if not self.regions or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        page = _mmap.PAGESIZE
        for lo, hi in self.regions:
            if lo <= start < hi:
                a = max(lo, start & ~(page - 1))
                b = min(hi, (start + nbytes + page - 1) & ~(page - 1))
                if b > a:
                    self._madvise(a, b - a, self.MADV_DONTNEED)
                return


def _read_weights(path: Path, *, mmap: bool = False) -> tuple[dict[str, Any], _FilePages | None]:
    """Read a weights file safely; returns the top-level dict and, when memory-mapped, its page releaser."""
    pages = None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path))), None
        if _is_torchscript(path):
            return _read_torchscript(path), None
        if zipfile.is_zipfile(path):
            # Refuse code-running pickles before unpickling anything, naming the globals; bind known
            # training-metadata globals to an inert placeholder.
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            refused = sorted(g for g in unsafe if not _is_metadata_global(g))
            if refused:
                raise CheckpointError(
                    f"{path}: cannot read weights: it pickles Python objects that would run code on load "
                    f"({', '.join(refused)}); refusing (weights_only=True). Convert the file to safetensors or "
                    "re-save only its tensors"
                )
            allowed = [(_Placeholder, g) for g in unsafe]
        else:
            allowed = []
        before = _FilePages.mappings(path) if mmap else set()
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        if mmap:
            pages = _FilePages(sorted(_FilePages.mappings(path) - before))
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as exc:
        text = str(exc)
        first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        if any(m in text for m in _REFUSAL_MARKERS):
            detail = next((line.strip() for line in text.splitlines() if any(m in line for m in _REFUSAL_MARKERS)), first)
            reason = (f"it pickles Python objects that would run code on load; refusing (weights_only=True): "
                      f"{detail}")
        elif isinstance(exc, EOFError) or any(
            s in text.lower() for s in ("zip", "eof", "truncat", "central directory", "ran out of input")
        ):
            reason = f"the file is truncated or corrupt ({type(exc).__name__}: {first})"
        else:
            reason = f"{type(exc).__name__}: {first}"
        raise CheckpointError(f"{path}: cannot read weights: {reason}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj), pages


def read_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read a weights file safely: safetensors, ``torch.load(weights_only=True)``, or a TorchScript archive.

    Returns the top-level object (a dict). Errors (:class:`CheckpointError`) name the file: unreadable or
    truncated files, pickles that would run code (refused; the code never runs), non-dict contents.
    """
    return _read_weights(Path(path), mmap=mmap)[0]


def _report(path, *, missing=(), unexpected=(), mismatched=(), what="", hint="") -> None:
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{path}: {what} does not match the model"]
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched keys", mismatched)):
        keys = list(keys)
        if keys:
            shown = "\n    ".join(keys[:25])
            more = f"\n    ... and {len(keys) - 25} more" if len(keys) > 25 else ""
            lines.append(f"  {title} ({len(keys)}):\n    {shown}{more}")
    if hint:
        lines.append(f"  {hint}")
    raise CheckpointError("\n".join(lines))


def _take(value: torch.Tensor, dtype: torch.dtype, pages: _FilePages | None) -> torch.Tensor:
    """``value`` as a contiguous ``dtype`` tensor in private memory; a memory-mapped source's pages are released.

    A tensor already in private memory with the right dtype and layout is returned as is (no copy).
    """
    if pages is None and value.dtype == dtype and value.is_contiguous():
        return value
    out = torch.empty(value.shape, dtype=dtype, device="cpu")
    out.copy_(value)
    if pages is not None:
        pages.release(value)
    return out


def _assign_strict(module: nn.Module, state: Mapping[str, Any], *, path, what: str, dtype=None,
                   pages: _FilePages | None = None, skip: Iterable[str] = (), names: Mapping[str, str] | None = None,
                   hint: str = "") -> None:
    """Strictly assign ``state`` into ``module`` (a meta-device module is fine): keys, shapes, dtype kinds.

    Floating tensors may come in any floating dtype (OpenAI CLIP files are fp16, SD files fp32) and are cast
    to ``dtype`` (default float32) one at a time; integer tensors must be integers. Module entries in ``skip``
    (buffers recreated afterwards) are not expected in ``state``. ``names`` maps our keys to the file's names
    for error messages.
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
    _report(path, missing=missing, unexpected=unexpected, mismatched=mismatched, what=what, hint=hint)
    target = dtype or torch.float32
    converted = {}
    for key, value in state.items():
        converted[key] = _take(value, target if value.is_floating_point() else expected[key].dtype, pages)
    module.load_state_dict(converted, strict=False, assign=True)


# ----------------------------------------------------------------------------------------------------------
# ODISE checkpoints
# ----------------------------------------------------------------------------------------------------------
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
    _report(path, missing=missing, unexpected=sorted(unexpected), mismatched=mismatched,
            what=f"ODISE {kind} checkpoint")
    with torch.no_grad():
        for key, value in renamed.items():
            ours[key].copy_(value)


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, extra: Mapping[str, Any] | None = None,
                    storage_options: dict | None = None) -> str:
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


# ----------------------------------------------------------------------------------------------------------
# Stable Diffusion
# ----------------------------------------------------------------------------------------------------------
def convert_sd_single_file(state: Mapping[str, torch.Tensor], cfg: ODISEConfig, *, path) -> tuple[dict, dict, dict]:
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
    _report(path, mismatched=[f"{k}: not a tensor" for k in non_tensors], what="Stable Diffusion single file")
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
    _report(path, unexpected=leftover, what="Stable Diffusion single file (keys not consumed by the conversion)",
            hint="expected an SD v1 file: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*")
    text.pop("text_model.embeddings.position_ids", None)
    return unet, vae, text


def _file_names(state: Mapping[str, torch.Tensor], *converted: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Converted (diffusers) key -> the file's own key, by tensor identity; for error messages."""
    by_ptr = {v.data_ptr(): k for k, v in state.items() if isinstance(v, torch.Tensor)}
    return {k: f"{by_ptr[v.data_ptr()]} (-> {k})" for d in converted for k, v in d.items() if v.data_ptr() in by_ptr}


_DIFFUSERS_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors", "model.safetensors", "diffusion_pytorch_model.bin", "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors", "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin", "pytorch_model.fp16.bin",
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
        if k not in ("class_embed_type", "sample_size", "scaling_factor") and k in got and _norm(got[k]) != _norm(v)
    ]
    if diffs:
        raise CheckpointError(f"{folder}/{sub}: architecture differs from the configured SD:\n  " + "\n  ".join(diffs))


def _norm(value):
    return list(value) if isinstance(value, (list, tuple)) else value


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


def _load_sd_text_encoder(cfg: ODISEConfig, text_sd: dict[str, Any], *, path, pages, file_prefix: str = ""):
    """SD's CLIP text encoder built on meta and filled strictly (fp32) from ``text_sd``.

    ``file_prefix``: prefix of these keys in the file (``cond_stage_model.transformer.``), for error messages.
    """
    from .build import build_sd_text_encoder

    with torch.device("meta"):
        text_encoder = build_sd_text_encoder(cfg)
    text_sd = _match_text_prefix({k: v for k, v in text_sd.items() if not k.endswith("embeddings.position_ids")},
                                 text_encoder)
    buffers = {k for k, _ in text_encoder.named_buffers()}
    names = {k: f"{file_prefix}text_model.{k.removeprefix('text_model.')}" for k in text_encoder.state_dict()}
    _assign_strict(text_encoder, text_sd, path=path, what="Stable Diffusion text encoder", pages=pages,
                   skip=buffers, names=names if file_prefix else None)
    _fix_text_encoder_buffers(text_encoder)
    return text_encoder


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


def _load_stable_diffusion(model: nn.Module, located: LocatedFile, *, dtype: torch.dtype | None) -> torch.Tensor:
    """Fill ``model.sd`` (UNet + VAE) from an SD source; returns the empty-prompt embedding ``1x77xD``.

    Order matters for memory: the text encoder is loaded, used once and freed before the UNet is read.
    """
    from .build import empty_prompt_embedding

    cfg: ODISEConfig = model.config
    path = located.path
    if located.is_diffusers_dir:
        _check_diffusers_config(path, "unet", cfg.stable_diffusion.unet)
        _check_diffusers_config(path, "vae", cfg.stable_diffusion.vae)
        sources = {}
        for sub in ("text_encoder", "unet", "vae"):
            file = _diffusers_weights_file(path, sub)
            sources[sub] = (file, *_read_weights(file, mmap=file.suffix != ".safetensors"))
        text_file, text_sd, text_pages = sources.pop("text_encoder")
        text_encoder = _load_sd_text_encoder(cfg, text_sd, path=text_file, pages=text_pages)
        del text_sd
        uncond = empty_prompt_embedding(text_encoder)
        del text_encoder
        for sub, module in (("unet", model.sd.unet), ("vae", model.sd.vae)):
            file, state, pages = sources.pop(sub)
            if hasattr(module, "_fix_state_dict_keys_on_load"):  # diffusers' own rename of pre-0.14 attention keys
                state = module._fix_state_dict_keys_on_load(dict(state))
            _assign_strict(module, state, path=file, what=f"Stable Diffusion {sub} (diffusers folder)", dtype=dtype,
                           pages=pages)
            del state, pages
        return uncond

    raw, pages = _read_weights(path, mmap=True)
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the 'state_dict' entry is a {type(state).__name__}, not a state dict")
    unet_sd, vae_sd, text_sd = convert_sd_single_file(state, cfg, path=path)
    names = _file_names(state, unet_sd, vae_sd)
    del raw, state
    hint = ("expected an SD v1 file: model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*; "
            "missing keys are given by their diffusers names")
    text_encoder = _load_sd_text_encoder(cfg, text_sd, path=path, pages=pages,
                                         file_prefix="cond_stage_model.transformer.")
    del text_sd
    uncond = empty_prompt_embedding(text_encoder)
    del text_encoder
    _assign_strict(model.sd.unet, unet_sd, path=path, what="Stable Diffusion UNet (model.diffusion_model.*)",
                   dtype=dtype, pages=pages, names=names, hint=hint)
    del unet_sd
    _assign_strict(model.sd.vae, vae_sd, path=path, what="Stable Diffusion VAE (first_stage_model.*)",
                   dtype=dtype, pages=pages, names=names, hint=hint)
    return uncond


# ----------------------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------------------
def _load_clip(model: nn.Module, located: LocatedFile, *, dtype: torch.dtype | None) -> None:
    """Fill the shared CLIP (``model.clip.model``, OpenAI names) from an OpenAI-layout file."""
    path = located.path
    raw, pages = _read_weights(path, mmap=True)
    state = raw.get("state_dict", raw)
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{path}: the 'state_dict' entry is a {type(state).__name__}, not a state dict")
    state = {k.removeprefix("module."): v for k, v in state.items() if k not in CLIP_IGNORED_KEYS}
    del raw
    clip_model = model.clip.model
    _assign_strict(clip_model, state, path=path, what="CLIP (OpenAI layout)", dtype=dtype, pages=pages)
    del state
    if getattr(clip_model, "attn_mask", None) is not None and clip_model.attn_mask.device.type == "meta":
        clip_model.attn_mask = _causal_mask(model.config.clip.context_length)


def _causal_mask(n: int) -> torch.Tensor:
    return torch.empty(n, n).fill_(float("-inf")).triu_(1)


# ----------------------------------------------------------------------------------------------------------
# Putting it together
# ----------------------------------------------------------------------------------------------------------
def materialize(model: nn.Module, located: Located, *, dtype: torch.dtype | None) -> None:
    """Fill SD / CLIP (built on the meta device) and the ODISE weights from the located files (strict), then
    compute the buffers derived from weights (empty-prompt embedding, initial null embedding).

    Steps, in the order that keeps host memory lowest: 1. CLIP; 2. SD text encoder (-> empty-prompt
    embedding, then freed), UNet, VAE; 3. ODISE weights; 4. derived buffers and the frozen dtype.
    """
    from .build import build_sd_text_encoder, empty_prompt_embedding

    # 1. CLIP (one shared instance)
    if located.clip is not None:
        _load_clip(model, located.clip, dtype=dtype)
    # 2. Stable Diffusion (UNet + VAE into the model; text encoder only to embed "")
    if located.sd is not None:
        uncond = _load_stable_diffusion(model, located.sd, dtype=dtype)
    else:
        uncond = empty_prompt_embedding(build_sd_text_encoder(model.config))
    model.captioner.set_uncond_context(uncond)
    # 3. ODISE trainable weights
    if located.checkpoint is not None:
        load_odise_checkpoint(model, located.checkpoint.path)
    # 4. buffers derived from loaded weights
    if located.checkpoint is None and model.head.null_embed is not None:
        with torch.no_grad():
            model.head.null_embed.copy_(model.clip.encode_text([""]).to(model.head.null_embed))
    if dtype is not None:
        model.set_frozen_dtype(dtype)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise AssertionError(f"tensors left on the meta device: {on_meta[:10]}")  # a loading bug
