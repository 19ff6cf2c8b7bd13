"""Where weights files come from: release names, local paths, URLs, the caches, downloads and offline mode.

Job: turn what a user names (a spec per weight kind) into a file on local disk, or raise
:class:`WeightsNotFoundError` saying where it looked and how to provide the file. Nothing here reads a file's
contents except to hash it; reading is :mod:`odise_model.safe_load`.

Sources a user can name (see :class:`WeightSources`):

* ODISE checkpoints: a release name (``odise_label_coco_50e``, ``odise_caption_coco_50e``), a local path or any
  fsspec URL.
* Stable Diffusion v1.3: ``sd-v1-3`` (the official single file on the Hugging Face Hub), any single-file
  ``.ckpt`` / ``.safetensors`` path or URL, a diffusers-format folder, or a Hub id of one.
* CLIP ViT-L/14-336: ``openai`` (the OpenAI TorchScript file) or a file in the OpenAI layout.

Lookup order for a release name or URL (:meth:`WeightLoader.locate`):

1. ``$ODISE_MODEL_ZOO/<file name>`` (as the official code does);
2. ``<cache_dir>/<kind>/<file name>`` (``$ODISE_CACHE``, default ``~/.cache/odise_annotate``; URLs other than
   releases are cached as ``<sha1(url)[:10]>-<file name>``);
3. files on the Hub (``https://huggingface.co/<repo>/resolve/<revision>/<path>``, e.g. ``sd-v1-3``): the shared
   Hugging Face cache (``$HF_HUB_CACHE``, default ``~/.cache/huggingface/hub``), then
   :func:`huggingface_hub.hf_hub_download` into it (resumable; a file another tool already downloaded is found
   and not downloaded again);
4. any other URL (GitHub release, ``https://``, ``s3://``, ...): an fsspec download into the cache of step 2.

With ``offline=True`` (or ``ODISE_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``) steps 3 and 4 only look in the caches;
the network is never touched.

Tokens: the user's Hugging Face token (``$HF_TOKEN`` or the one ``hf auth login`` stored) is given to
``hf_hub_download`` for Hub files only, with the endpoint fixed to ``https://huggingface.co``
(:func:`hub_token`). It is never sent over plain ``http://`` or to any other host; fsspec downloads never
carry it.

Hashes: :func:`file_sha256` is remembered in ``<cache>/sha256.json`` keyed by path, size, mtime, inode and
ctime (a file rewritten with its size and mtime restored gets a new ctime, so it is hashed again). The memo
only saves re-hashing gigabytes for provenance records and corruption checks; nothing that could run code
depends on it (no loader runs code from a file, whatever its hash).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

from .weights_errors import CheckpointError, WeightsNotFoundError

if TYPE_CHECKING:  # pragma: no cover
    from .config import ODISEConfig

logger = logging.getLogger(__name__)

__all__ = [
    "Release",
    "RELEASES",
    "HubFile",
    "WeightSources",
    "LocatedFile",
    "Located",
    "WeightLoader",
    "WeightsNotFoundError",
    "hub_file",
    "hub_token",
    "default_cache_dir",
    "default_hub_cache_dir",
    "file_sha256",
    "remember_sha256",
]

HUB_HOST = "huggingface.co"
HUB_ENDPOINT = f"https://{HUB_HOST}"


# ----------------------------------------------------------------------------------------------------------
# Releases
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Release:
    url: str
    filename: str
    license: str
    kind: str  # "checkpoint" | "sd" | "clip"
    sha256: str | None = None  # full hash when known; otherwise a torch.hub-style prefix in the file name


RELEASES: dict[str, Release] = {
    "odise_label_coco_50e": Release(
        "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/odise_label_coco_50e-b67d2efc.pth",
        "odise_label_coco_50e-b67d2efc.pth",
        "CC BY-NC-SA 4.0 (NVIDIA ODISE weights)",
        "checkpoint",
    ),
    "odise_caption_coco_50e": Release(
        "https://github.com/NVlabs/ODISE/releases/download/v1.0.0/odise_caption_coco_50e-853cc971.pth",
        "odise_caption_coco_50e-853cc971.pth",
        "CC BY-NC-SA 4.0 (NVIDIA ODISE weights)",
        "checkpoint",
    ),
    "sd-v1-3": Release(
        "https://huggingface.co/CompVis/stable-diffusion-v-1-3-original/resolve/main/sd-v1-3.ckpt",
        "sd-v1-3.ckpt",
        "CreativeML OpenRAIL-M (Stable Diffusion v1)",
        "sd",
    ),
    "openai": Release(
        "https://openaipublic.azureedge.net/clip/models/"
        "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
        "ViT-L-14-336px.pt",
        "MIT (OpenAI CLIP)",
        "clip",
        sha256="3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
    ),
}
# torch.hub convention: "<name>-<first hex digits of the sha256>.<ext>"
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,64})\.[A-Za-z0-9]+$")


# ----------------------------------------------------------------------------------------------------------
# The Hugging Face Hub
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HubFile:
    """One file of a Hub repository, as ``hf_hub_download`` names it."""

    repo_id: str
    filename: str
    revision: str = "main"
    repo_type: str = "model"  # "model" | "dataset" | "space"

    def cache_path(self, hub_cache: Path) -> str:
        """Where the Hugging Face cache keeps it (for messages): ``<cache>/models--org--name/snapshots/...``."""
        folder = f"{self.repo_type}s--" + self.repo_id.replace("/", "--")
        return str(hub_cache / folder / "snapshots" / f"<{self.revision}>" / self.filename)


_HUB_PATH = re.compile(r"^/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


def hub_file(url: str) -> HubFile | None:
    """The Hub file a ``https://huggingface.co/<repo>/resolve/<revision>/<path>`` URL names, else None.

    Only ``https`` URLs of the host ``huggingface.co`` are Hub files; ``http://`` URLs and other hosts
    (mirrors, CDNs) are plain URLs, downloaded with fsspec and without a token.
    """
    parsed = urlparse(url)
    if parsed.scheme != "https" or (parsed.hostname or "").lower() != HUB_HOST:
        return None
    match = _HUB_PATH.match(parsed.path)
    if match is None:
        return None
    repo_type, repo_id, revision, filename = match.groups()
    return HubFile(
        repo_id=repo_id,
        filename=unquote(filename),
        revision=unquote(revision),
        repo_type={"datasets": "dataset", "spaces": "space"}.get(repo_type or "", "model"),
    )


def hub_token(url: str) -> str | None:
    """The user's Hugging Face token for ``url``: only for ``https://huggingface.co/...``, else None (never logged).

    From ``$HF_TOKEN`` / ``$HUGGING_FACE_HUB_TOKEN``, else the token ``hf auth login`` stored.
    """
    parsed = urlparse(url)
    if parsed.scheme != "https" or (parsed.hostname or "").lower() != HUB_HOST:
        return None
    if token := os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"):
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - no token store: download anonymously
        return None


def default_hub_cache_dir() -> Path:
    """The shared Hugging Face cache, read at call time: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    huggingface_hub's default (``~/.cache/huggingface/hub``)."""
    if value := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(value).expanduser()
    if value := os.environ.get("HF_HOME"):
        return Path(value).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


# ----------------------------------------------------------------------------------------------------------
# Cache folder, offline flag, hashes
# ----------------------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    """``$ODISE_CACHE``, else ``$XDG_CACHE_HOME/odise_annotate``, else ``~/.cache/odise_annotate``."""
    if os.environ.get("ODISE_CACHE"):
        return Path(os.environ["ODISE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "odise_annotate"


def _env_offline() -> bool:
    return any(
        os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("ODISE_OFFLINE", "HF_HUB_OFFLINE")
    )


def _sha256_memo_file() -> Path:
    return default_cache_dir() / "sha256.json"


def _memo_key(path: Path) -> str:
    """Path, size, mtime, inode and ctime: a rewrite changes ctime even when size and mtime are restored."""
    stat = path.stat()
    return f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ino}|{stat.st_ctime_ns}"


def remember_sha256(path: str | os.PathLike, value: str) -> None:
    """Record a file's sha256 in the memo (best effort), so it is hashed once."""
    path = Path(path).resolve()
    memo_file = _sha256_memo_file()
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    memo[_memo_key(path)] = value
    try:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo))
        os.replace(tmp, memo_file)
    except OSError:
        pass


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a local file, remembered in the cache's memo (see the module doc for what it is keyed by)."""
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
    remember_sha256(path, value)
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
        origin = (
            "the release's published sha256"
            if expected
            else (
                f"the hash prefix in its name ('-{want}', torch.hub convention; rename the file if that suffix is "
                "not a hash)"
            )
        )
        raise CheckpointError(
            f"{path}: sha256 mismatch for {source!r}: expected {want}..., got {actual[: len(want)]}... "
            f"(checked against {origin}). The file is corrupt, truncated or not the released one; delete it and "
            "download it again"
        )


# ----------------------------------------------------------------------------------------------------------
# What the user asked for, and what was found
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WeightSources:
    """What the user asked for: one spec (or None = random) per weight kind."""

    checkpoint: str | None = None
    sd: str | None = None
    clip: str | None = None

    @classmethod
    def resolve(
        cls, cfg: ODISEConfig, *, checkpoint=None, sd_weights=None, clip_weights=None, pretrained=False
    ):
        if pretrained:
            checkpoint = checkpoint or cfg.official_checkpoint
            sd_weights = sd_weights or "sd-v1-3"
            clip_weights = clip_weights or "openai"
            if checkpoint is None:
                raise ValueError(
                    f"variant {cfg.name!r} has no official checkpoint; pass checkpoint= explicitly"
                )
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
    "sd": "download "
    + RELEASES["sd-v1-3"].url
    + " (licence acceptance required on Hugging Face) and pass its "
    "path as sd_weights=... / --sd-weights, or put it (same file name) in $ODISE_MODEL_ZOO or the cache folder "
    "listed above, or fetch it into the Hugging Face cache (`hf download CompVis/stable-diffusion-v-1-3-original "
    "sd-v1-3.ckpt`)",
    "clip": "download " + RELEASES["openai"].url + " (OpenAI CLIP) and pass its path as clip_weights=... / "
    "--clip-weights, or put it (same file name) in $ODISE_MODEL_ZOO or the cache folder listed above",
}


# ----------------------------------------------------------------------------------------------------------
# Locating files
# ----------------------------------------------------------------------------------------------------------
class WeightLoader:
    """Resolves weight specs to local files (model zoo, caches, downloads) honouring offline mode.

    See the module doc for the lookup order. A local path that does not exist is also looked up by file name
    in ``$ODISE_MODEL_ZOO``. ``hub_cache_dir`` defaults to the shared Hugging Face cache.
    """

    def __init__(
        self,
        *,
        offline: bool | None = None,
        cache_dir=None,
        storage_options: dict | None = None,
        hub_cache_dir=None,
    ) -> None:
        self.offline = _env_offline() if offline is None else bool(offline)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        self._hub_cache_dir = Path(hub_cache_dir).expanduser() if hub_cache_dir else None
        self.storage_options = storage_options or {}

    @property
    def hub_cache_dir(self) -> Path:
        """The Hugging Face cache this loader reads and downloads Hub files into (resolved when first needed)."""
        return self._hub_cache_dir or default_hub_cache_dir()

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

    def locate(self, spec: str, kind: str) -> LocatedFile:
        """Resolve one spec to a local path (downloading into a cache when allowed)."""
        release = RELEASES.get(spec)
        if release is not None:
            if release.kind != kind:
                names = sorted(k for k, v in RELEASES.items() if v.kind == kind)
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
        if kind == "sd" and re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
            return self._hub_snapshot(spec)
        raise self._not_found(kind, spec, spec_path.name or spec, searched, "no such file")

    # -- helpers ---------------------------------------------------------------------------------------
    def _not_found(self, kind: str, spec: str, filename: str, searched: Iterable[str], reason: str):
        where = "\n    ".join(searched)
        return WeightsNotFoundError(
            f"{kind} weights file {filename!r} (from {spec!r}) not available: {reason}.\n"
            f"  searched:\n    {where}\n  how to provide: {_HINTS[kind]}"
        )

    def _offline_error(
        self, url: str, *, kind: str, spec: str, filename: str, searched: list[str]
    ) -> WeightsNotFoundError:
        """The error for a file that only a download from ``url`` could give, in offline mode."""
        return self._not_found(
            kind, spec, filename, [*searched, f"{url} (not tried: offline)"], "offline mode and no local copy"
        )

    @staticmethod
    def _zoo_dir() -> Path | None:
        zoo = os.environ.get("ODISE_MODEL_ZOO")
        return Path(zoo).expanduser() if zoo else None

    def _from_url(self, url: str, kind: str, spec: str, *, release: Release | None = None):
        """``(local path, sha256 if it was computed while downloading)`` for a release or URL."""
        name = (
            release.filename
            if release
            else (url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "weights")
        )
        cache_name = name if release else f"{hashlib.sha1(url.encode()).hexdigest()[:10]}-{name}"
        candidates = []
        if (zoo := self._zoo_dir()) is not None:
            candidates.append(zoo / name)
        candidates.append(self.cache_dir / kind / cache_name)
        for cand in candidates:
            if cand.is_file():
                return cand, None
        searched = [str(c) for c in candidates]
        if (hub := hub_file(url)) is not None:
            return self._from_hub(hub, url, kind=kind, spec=spec, filename=name, searched=searched), None
        digest = self._download(url, candidates[-1], kind=kind, spec=spec, filename=name, searched=searched)
        return candidates[-1], digest

    def _from_hub(
        self, hub: HubFile, url: str, *, kind: str, spec: str, filename: str, searched: list[str]
    ) -> Path:
        """A Hub file from the shared Hugging Face cache, else downloaded into it with ``hf_hub_download``."""
        from huggingface_hub import hf_hub_download, try_to_load_from_cache

        searched = [*searched, f"{hub.cache_path(self.hub_cache_dir)} (Hugging Face cache)"]
        cached = try_to_load_from_cache(
            hub.repo_id,
            hub.filename,
            cache_dir=self.hub_cache_dir,
            revision=hub.revision,
            repo_type=hub.repo_type,
        )
        if isinstance(cached, str):
            return Path(cached)
        if self.offline:
            raise self._offline_error(url, kind=kind, spec=spec, filename=filename, searched=searched)
        logger.info("downloading %s into the Hugging Face cache %s", url, self.hub_cache_dir)
        try:
            path = hf_hub_download(
                hub.repo_id,
                hub.filename,
                revision=hub.revision,
                repo_type=hub.repo_type,
                cache_dir=self.hub_cache_dir,
                endpoint=HUB_ENDPOINT,  # the host the URL names, over https, whatever $HF_ENDPOINT says
                token=hub_token(url) or False,  # False: send none (None would let huggingface_hub pick one)
            )
        except Exception as exc:  # huggingface_hub raises many types (gated, not found, offline, network)
            reason = f"download failed: {type(exc).__name__}: {exc}"
            if type(exc).__name__ == "GatedRepoError":
                reason += (
                    f" (accept the licence on https://{HUB_HOST}/{hub.repo_id} and log in: `hf auth login` "
                    "or $HF_TOKEN)"
                )
            raise self._not_found(kind, spec, filename, [*searched, url], reason) from exc
        return Path(path)

    def _download(
        self, url: str, dest: Path, *, kind: str, spec: str, filename: str, searched: list[str]
    ) -> str:
        """Stream ``url`` (any fsspec protocol) to ``dest`` atomically, without credentials for http(s); returns
        the sha256."""
        import fsspec

        if self.offline:
            raise self._offline_error(url, kind=kind, spec=spec, filename=filename, searched=searched)
        dest.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
        try:
            protocol = url.split("://", 1)[0]
            if protocol in ("http", "https"):
                options = {"block_size": 0}  # one streaming GET: no HEAD / range requests (plain servers)
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
        remember_sha256(dest, value)
        return value

    def _hub_snapshot(self, repo_id: str) -> LocatedFile:
        """A diffusers folder on the Hub: the shared Hugging Face cache (or ``<cache>/hub``, where earlier versions
        put snapshots), else ``snapshot_download`` into the shared cache."""
        from huggingface_hub import snapshot_download

        patterns = ["model_index.json", "unet/*", "vae/*", "text_encoder/*"]
        caches = [self.hub_cache_dir, self.cache_dir / "hub"]
        for cache in caches:
            try:
                path = snapshot_download(
                    repo_id, allow_patterns=patterns, cache_dir=str(cache), local_files_only=True
                )
                return LocatedFile("sd", repo_id, Path(path), is_diffusers_dir=True)
            except Exception:  # noqa: BLE001 - not in this cache
                continue
        searched = [str(c) for c in caches]
        if self.offline:
            raise self._not_found("sd", repo_id, repo_id, searched, "offline mode and no local copy")
        try:
            path = snapshot_download(
                repo_id,
                allow_patterns=patterns,
                cache_dir=str(self.hub_cache_dir),
                endpoint=HUB_ENDPOINT,  # as for Hub files: the token goes to https://huggingface.co only
                token=hub_token(f"{HUB_ENDPOINT}/{repo_id}") or False,
            )
        except Exception as exc:  # huggingface_hub raises several error types for gated / missing / network
            raise self._not_found(
                "sd", repo_id, repo_id, searched, f"hub snapshot unavailable ({type(exc).__name__}: {exc})"
            ) from exc
        return LocatedFile("sd", repo_id, Path(path), is_diffusers_dir=True)
