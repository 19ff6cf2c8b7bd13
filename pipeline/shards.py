"""Find and read input shards on any fsspec URL (local path, ``file://``, ``s3://``, ``gs://``, ``https://``).

Two steps, both usable from a Ray driver and from Ray CPU tasks (plain functions, picklable arguments):

1. :func:`list_shards` turns what the user typed into a sorted list of :class:`ShardRef`:

   * a glob (``s3://b/train/*.tar``), a brace pattern (``shard-{000000..000009}.tar``, expanded with
     ``braceexpand``; every expanded shard must exist), a manifest (``.txt`` / ``.lst`` / ``.manifest``:
     one URL per line, ``#`` comments, relative lines resolved against the manifest's folder), a folder
     (searched recursively) of ``.tar`` shards, or a folder / glob / manifest of loose images;
   * loose images are grouped, in sorted URL order, into *virtual shards* of ``images_per_virtual_shard``
     images (``kind="images"``), one group per folder the user named (a glob: its folder before the
     first wildcard; brace lists and manifests: each image's own folder). Keep the output folder out
     of the input folder, or its PNGs would be listed as inputs on the next run;
   * ``shard_id`` is a stable, filesystem-safe, unique name used for output files:
     ``<stem>-<first 8 hex of sha1(url)>`` for tars, ``<folder>-images-<index:06d>-<first 8 hex of
     sha1(url + member list)>`` for virtual shards (adding images to a folder changes the ids of the
     groups whose members changed, so a resumed run never treats a changed group as done);
   * anything that makes the input unreadable (missing file, empty glob, missing bucket, bad
     credentials, unreachable endpoint, unknown protocol) raises :class:`InputError` naming the URL and
     what to check. The check is quick: for ``s3://`` the listing uses bounded timeouts and retries
     (connect 5 s, read 30 s, 2 attempts; ``config_kwargs`` in the storage options override them)
     so a wrong endpoint fails in seconds, not minutes. Reading uses the options as given.

2. :func:`iter_samples` / :func:`read_shard` read one shard and yield :class:`RawSample` records.
   Tars are streamed through :mod:`tarfile` from the fsspec file; nothing is ever extracted to disk.

Guarantee: *every sample that exists yields exactly one record*, either with image bytes or with
``error`` set; keys are unique within a shard. The rules:

* WebDataset grouping: members are grouped by key = path up to the first dot of the file name
  (``a/b.seg.png`` -> key ``a/b``, field ``seg.png``); leading ``./`` is ignored. The image is the first
  present of :data:`IMAGE_EXTENSIONS` (in that priority order), ``json`` is parsed into ``meta``;
  other fields are ignored (and not read).
* a group with no image member -> error ``"no image member (have: json)"``;
* unsafe members (absolute paths, ``..`` components, symbolic/hard links, devices, fifos) are never
  read or written anywhere; their whole group becomes an error record naming the member and why;
* a member larger than ``max_member_bytes`` is not read; its group becomes an error record;
* a key that reappears after its group ended gets the key ``<key>#dup<n>`` and an error record;
* a truncated or corrupt tar: the complete samples before the damage are yielded, the sample being
  read when the data ended (if any) becomes an error record, and one shard-level error record with
  key :data:`SHARD_ERROR_KEY` (``"__shard__"``) says the shard is truncated and later samples, if
  any, are missing. A tar that ends at a member boundary without the end-of-archive marker, or
  whose next header is garbage (Python's tarfile would stop silently in both cases), is also
  reported this way (its complete samples are kept). An unreadable archive gives only the shard
  record. Compressed tars (``.tar.gz`` / ``.tgz``) rely on the decompressor to notice a cut.
* transient I/O failures (network errors after fsspec's own retries) are *raised*, not recorded, so
  the task can be retried; a shard that vanished after listing raises :class:`InputError`.

For virtual image shards each file is one sample with key = its path relative to the folder,
extension included (``cats/001.jpg``), so two files ``a.jpg`` and ``a.png`` never collide; a file that
vanished after listing gives an error record.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import hashlib
import json
import logging
import posixpath
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from fsspec.core import url_to_fs

__all__ = [
    "IMAGE_EXTENSIONS",
    "SHARD_ERROR_KEY",
    "InputError",
    "RawSample",
    "ShardRef",
    "iter_samples",
    "list_shards",
    "read_shard",
]

log = logging.getLogger(__name__)

#: Image field names / file extensions, in the priority used to pick a sample's image.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm", "jp2")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
MANIFEST_SUFFIXES = (".txt", ".lst", ".manifest")
#: Key of the one record that reports a shard-level problem (truncated / unreadable archive).
SHARD_ERROR_KEY = "__shard__"
#: Members larger than this are not read (an error record is produced instead).
DEFAULT_MAX_MEMBER_BYTES = 256 * 2**20

_GLOB_CHARS = re.compile(r"[*?\[]")
_BRACE = re.compile(r"\{[^{}]*(,|\.\.)[^{}]*\}")


class InputError(FileNotFoundError):
    """An input URL cannot be used: missing, empty, unreachable, access denied or unsupported.

    A subclass of ``FileNotFoundError`` (and so of ``OSError``); the message names the URL and what to
    check.
    """


@dataclass(frozen=True)
class ShardRef:
    """One unit of work: a tar shard or a virtual shard of loose images.

    Attributes:
        url: canonical URL (``file:///abs/x.tar``, ``s3://b/x.tar``); for virtual shards
            ``<folder url>#images-<index:06d>`` (``#rest-`` for the new images of a folder that grew since a
            committed run); an identifier, not an object to open.
        shard_id: stable, unique, filesystem-safe name (``[A-Za-z0-9._-]``, starts alphanumeric).
        kind: ``"tar"`` or ``"images"``.
        members: for virtual shards, the image URLs in order; empty for tars.
        root: for virtual shards, the folder URL that keys are relative to.
    """

    url: str
    shard_id: str
    kind: Literal["tar", "images"] = "tar"
    members: tuple[str, ...] = ()
    root: str = ""


@dataclass(frozen=True)
class RawSample:
    """One sample of a shard, before decoding.

    Attributes:
        key: unique within the shard (WebDataset key, or relative image path for virtual shards).
        image_bytes: the encoded image, or None for error records.
        image_ext: extension / field of the image (``"jpg"``), None if there is none.
        meta: the parsed ``json`` member (a dict), or None.
        error: None, or why the sample cannot be labelled.
        shard_url, shard_id: the shard it came from.
        shard_total: number of records in the whole shard (set by :func:`read_shard`; None while
            streaming with :func:`iter_samples`).
    """

    key: str
    image_bytes: bytes | None
    image_ext: str | None
    meta: dict[str, Any] | None
    error: str | None
    shard_url: str = ""
    shard_id: str = ""
    shard_total: int | None = None


# --------------------------------------------------------------------------------------------------
# Helpers: names, filesystems, errors
# --------------------------------------------------------------------------------------------------


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _safe_stem(name: str, fallback: str) -> str:
    """Filesystem-safe stem: ``[A-Za-z0-9._-]``, starting with a letter or digit (parquet readers
    skip files starting with ``.`` or ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    stem = re.sub(r"^[._-]+", "", stem)[:80]
    return stem or fallback


def _tar_stem(path: str) -> str:
    base = posixpath.basename(path.rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _ext(path: str) -> str:
    base = posixpath.basename(path)
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _is_tar(path: str) -> bool:
    return path.lower().endswith(TAR_SUFFIXES)


def _is_image(path: str) -> bool:
    return _ext(path) in IMAGE_EXTENSIONS


def _is_manifest(path: str) -> bool:
    return path.lower().endswith(MANIFEST_SUFFIXES)


def _has_protocol(url: str) -> bool:
    return "://" in url or url.startswith(("s3:", "gs:", "gcs:"))


def _protocols(fs) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _endpoint_hint(storage_options: dict[str, Any]) -> str:
    ep = (storage_options.get("client_kwargs") or {}).get("endpoint_url") or storage_options.get(
        "endpoint_url"
    )
    return f" endpoint_url={ep}" if ep else ""


def _probe_options(url: str, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Storage options for the listing: bounded timeouts/retries so a bad endpoint fails fast."""
    options = copy.deepcopy(storage_options)
    protocol = fsspec.utils.get_protocol(url)
    if protocol in ("s3", "s3a"):
        config = {
            "connect_timeout": 5,
            "read_timeout": 30,
            "retries": {"max_attempts": 2, "mode": "standard"},
        }
        config.update(options.get("config_kwargs") or {})
        options["config_kwargs"] = config
        options["skip_instance_cache"] = True  # a private instance: we lower its retries below
    return options


def _filesystem(url: str, storage_options: dict[str, Any] | None, *, probe: bool = False):
    """``(fs, stripped path)`` for a URL; unknown protocols / missing drivers raise :class:`InputError`."""
    options = dict(storage_options or {})
    if probe:
        options = _probe_options(url, options)
    try:
        fs, path = url_to_fs(url, **options)
    except (ImportError, ValueError) as exc:
        raise InputError(
            f"{url}: cannot open this kind of URL ({exc}); check the protocol and that its fsspec driver "
            "(s3fs, gcsfs, adlfs, ...) is installed"
        ) from exc
    if probe and "s3" in _protocols(fs):
        fs.retries = 2  # s3fs' own retry loop (class default 5, with sleeps); instance is private
    return fs, path


def _input_error(url: str, exc: BaseException, storage_options: dict[str, Any]) -> InputError:
    """Translate a filesystem exception into an :class:`InputError` that says what to check."""
    if isinstance(exc, InputError):
        return exc
    name = type(exc).__name__
    text = f"{name}: {exc}"
    if isinstance(exc, FileNotFoundError):
        hint = "not found; check the path, the bucket name and the pattern"
    elif (
        isinstance(exc, PermissionError)
        or "AccessDenied" in text
        or "Credentials" in name
        or "credentials" in text
    ):
        hint = "access denied; check the credentials (key/secret, profile, token) or use anon=True for public data"
    elif any(s in name for s in ("Connect", "Endpoint", "Timeout")) or isinstance(
        exc, (ConnectionError, TimeoutError)
    ):
        hint = f"cannot reach the storage endpoint{_endpoint_hint(storage_options)}; check endpoint_url and the network"
    else:
        hint = "cannot be read; check the URL, credentials and endpoint"
    return InputError(f"{url}: {hint} ({text})")


# --------------------------------------------------------------------------------------------------
# list_shards
# --------------------------------------------------------------------------------------------------


@dataclass
class _Found:
    """Accumulates what the input specs resolve to (order-independent: sorted at the end)."""

    tars: dict[str, None] = dataclasses.field(default_factory=dict)
    images: dict[str, str] = dataclasses.field(default_factory=dict)  # image url -> group root url

    def add_file(self, fs, path: str, root: str) -> bool:
        url = fs.unstrip_protocol(path)
        if _is_tar(path):
            self.tars.setdefault(url, None)
            return True
        if _is_image(path):
            self.images.setdefault(url, fs.unstrip_protocol(root.rstrip("/")) if root else "")
            return True
        return False


def _glob_base(path: str) -> str:
    """The folder part of a glob before its first magic component (``b/imgs/*/x.jpg`` -> ``b/imgs``)."""
    parts = path.split("/")
    keep = []
    for part in parts:
        if _GLOB_CHARS.search(part):
            break
        keep.append(part)
    return "/".join(keep) if len(keep) < len(parts) else posixpath.dirname(path)


def _resolve_dir(fs, path: str, url: str, found: _Found) -> None:
    files = sorted(fs.find(path, withdirs=False))
    n = sum(found.add_file(fs, f, path) for f in files)
    if n == 0:
        raise InputError(
            f"{url}: folder has no .tar shards and no images ({', '.join(IMAGE_EXTENSIONS)}); "
            f"found {len(files)} other files"
        )


def _resolve_glob(fs, path: str, url: str, found: _Found) -> None:
    matches = fs.glob(path, detail=True)
    if not matches:
        base = _glob_base(path)
        try:
            fs.ls(base, detail=False)
            why = ""
        except FileNotFoundError as exc:  # say which part is missing (e.g. "bucket does not exist")
            why = f" ({fs.unstrip_protocol(base)} does not exist: {exc})"
        raise InputError(f"{url}: no files match this pattern{why}; check the path, bucket and pattern")
    n = 0
    for p in sorted(matches):
        info = matches[p]
        if info.get("type") == "directory":
            _resolve_dir(fs, p, fs.unstrip_protocol(p), found)
            n += 1
        else:
            n += found.add_file(fs, p, _glob_base(path))
    if n == 0:
        raise InputError(f"{url}: {len(matches)} matches, none is a .tar shard, an image or a folder")


def _check_files_exist(fs, paths: list[str], origin: str) -> None:
    """Raise :class:`InputError` unless all ``paths`` (stripped) exist; one listing per parent folder."""
    missing: list[str] = []
    reasons: list[str] = []
    if "http" in _protocols(fs):
        missing = [p for p in paths if not fs.exists(p)]
    else:
        by_parent: dict[str, list[str]] = {}
        for p in paths:
            by_parent.setdefault(posixpath.dirname(p.rstrip("/")), []).append(p)
        for parent, children in sorted(by_parent.items()):
            try:
                listed = (
                    {e.rstrip("/") for e in fs.ls(parent, detail=False, refresh=True)} if parent else set()
                )
            except FileNotFoundError as exc:
                listed = set()
                reasons.append(f"{fs.unstrip_protocol(parent)} does not exist: {exc}")
            missing += [c for c in children if c.rstrip("/") not in listed]
    if missing:
        shown = ", ".join(fs.unstrip_protocol(m) for m in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        why = f" ({'; '.join(reasons[:2])})" if reasons else ""
        raise InputError(
            f"{origin}: {len(missing)} shard(s) do not exist: {shown}{more}{why}; check the path and pattern"
        )


def _resolve_explicit(fs, paths: list[str], origin: str, found: _Found) -> None:
    """Named files (from braces / manifests): files with a known suffix are checked in bulk."""
    simple = [p for p in paths if _is_tar(p) or _is_image(p)]
    _check_files_exist(fs, simple, origin)
    for p in simple:
        found.add_file(fs, p, posixpath.dirname(p))
    for p in paths:
        if p not in simple:
            _resolve_one(fs, p, fs.unstrip_protocol(p), found, allow_manifest=False)


def _read_manifest(fs, path: str, url: str, found: _Found, storage_options: dict[str, Any]) -> None:
    with fs.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    folder = posixpath.dirname(path)
    entries: list[tuple[int, str]] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        entries.append((lineno, line))
    if not entries:
        raise InputError(f"{url}: manifest lists no shards")
    plain: list[str] = []
    for lineno, line in entries:
        if _has_protocol(line) and fsspec.utils.get_protocol(line) in _protocols(fs):
            line_fs, line_path = fs, fs._strip_protocol(line)  # same storage: checked in bulk below
        elif _has_protocol(line):
            line_fs, line_path = _filesystem(line, storage_options, probe=True)
        else:
            line_fs = fs
            line_path = line if line.startswith("/") else posixpath.normpath(posixpath.join(folder, line))
        origin = f"{url} line {lineno}"
        if line_fs is fs and not _BRACE.search(line_path) and not _GLOB_CHARS.search(line_path):
            plain.append(line_path)
            continue
        try:
            _resolve_one(line_fs, line_path, origin, found, allow_manifest=False)
        except InputError:
            raise
        except Exception as exc:
            raise _input_error(origin, exc, storage_options) from exc
    if plain:
        _resolve_explicit(fs, plain, url, found)


def _resolve_one(
    fs, path: str, url: str, found: _Found, *, allow_manifest: bool, storage_options=None
) -> None:
    """Resolve one spec (stripped path on ``fs``) into ``found``."""
    if _BRACE.search(path):
        from braceexpand import braceexpand

        expanded = list(braceexpand(path))
        globs = [p for p in expanded if _GLOB_CHARS.search(p)]
        for g in globs:
            _resolve_glob(fs, g, url, found)
        _resolve_explicit(fs, [p for p in expanded if p not in globs], url, found)
        return
    if _GLOB_CHARS.search(path):
        _resolve_glob(fs, path, url, found)
        return
    info = fs.info(path)
    if info.get("type") == "directory":
        _resolve_dir(fs, path, url, found)
    elif _is_manifest(path):
        if not allow_manifest:
            raise InputError(f"{url}: manifests cannot list other manifests")
        _read_manifest(fs, path, url, found, storage_options or {})
    elif not found.add_file(fs, path, posixpath.dirname(path)):
        raise InputError(
            f"{url}: unsupported input file; expected a .tar shard, an image ({', '.join(IMAGE_EXTENSIONS)}), "
            f"a manifest ({', '.join(MANIFEST_SUFFIXES)}) or a folder"
        )


def _virtual_shards(images: dict[str, str], per_shard: int, label: str = "images") -> list[ShardRef]:
    groups: dict[str, list[str]] = {}
    for url, root in images.items():
        groups.setdefault(root, []).append(url)
    shards = []
    for root, urls in sorted(groups.items()):
        urls.sort()
        folder = _safe_stem(posixpath.basename(root.split("://", 1)[-1].rstrip("/")), "images")
        for index, start in enumerate(range(0, len(urls), per_shard)):
            members = tuple(urls[start : start + per_shard])
            url = f"{root}#{label}-{index:06d}"
            digest = _short_hash(url + "\n" + "\n".join(members))
            shard_id = f"{folder}-{label}-{index:06d}-{digest}"
            shards.append(ShardRef(url=url, shard_id=shard_id, kind="images", members=members, root=root))
    return shards


def exclude_labelled_images(
    shards: Sequence[ShardRef],
    committed: Mapping[str, Mapping[str, Any]],
    per_shard: int,
    load_members: Callable[[Mapping[str, Any]], Sequence[str]] | None = None,
) -> list[ShardRef]:
    """Keep a rerun over a grown (or regrouped) image folder from labelling any image twice.

    Virtual shards are named after their member list, so adding one image to a folder renames the
    group it falls in; without care, a rerun would label that group's old images again. ``committed``
    is :func:`pipeline.annotate.commit.committed_shards` (small markers: an image shard's marker names its
    folder, ``root``, and its member list file); ``load_members(marker)`` reads a committed shard's member
    list (:func:`pipeline.annotate.commit.load_members`; older markers carry ``members`` inline). Member
    lists are loaded only for folders that have pending (uncommitted) shards, i.e. folders that grew or were
    regrouped. For each such folder, images some committed shard already labelled are dropped and the rest
    regrouped into ``<folder>#rest-<index>`` shards (deterministic, so an interrupted rerun resumes them).
    Tar shards, committed shards and untouched folders are unchanged.
    """
    pending: dict[str, list[ShardRef]] = {}
    out: list[ShardRef] = []
    for shard in shards:
        if shard.kind == "images" and shard.shard_id not in committed:
            pending.setdefault(shard.root, []).append(shard)
        else:
            out.append(shard)
    for root, group in pending.items():
        covered: set[str] = set()
        for marker in committed.values():
            if marker.get("members"):  # markers written before member lists moved out of them
                covered.update(marker["members"])
            elif marker.get("kind") == "images" and marker.get("root") == root and load_members is not None:
                covered.update(load_members(marker))
        members = [m for shard in group for m in shard.members]
        if not any(m in covered for m in members):
            out.extend(group)
            continue
        rest = {m: root for m in members if m not in covered}
        skipped = len(members) - len(rest)
        log.info("%s: %d image(s) already labelled by committed shards; %d left to label", root, skipped, len(rest))
        out.extend(_virtual_shards(rest, per_shard, label="rest"))
    return sorted(out, key=lambda s: (s.url, s.shard_id))


def list_shards(
    input: str | Sequence[str],
    storage_options: dict[str, Any] | None = None,
    *,
    images_per_virtual_shard: int = 1000,
) -> list[ShardRef]:
    """Resolve input specs (globs, brace patterns, manifests, folders, files) into shards.

    Args:
        input: one spec or several (see the module doc for the accepted forms).
        storage_options: fsspec options, e.g. ``{"key", "secret", "client_kwargs": {"endpoint_url"}}``.
        images_per_virtual_shard: loose images per virtual shard (>= 1).

    Returns:
        Shards sorted by URL, duplicates removed (the same tar named twice counts once).

    Raises:
        InputError: a named shard is missing, a glob is empty, a folder has nothing usable, or the
            storage cannot be reached / read; the message names the URL and what to check.
    """
    if images_per_virtual_shard < 1:
        raise ValueError(f"images_per_virtual_shard must be >= 1, got {images_per_virtual_shard}")
    specs = [input] if isinstance(input, str) else list(input)
    if not specs or any(not isinstance(s, str) or not s.strip() for s in specs):
        raise InputError(f"no usable input given: {specs!r}")
    options = dict(storage_options or {})
    found = _Found()
    for spec in specs:
        spec = spec.strip()
        fs, path = _filesystem(spec, options, probe=True)
        try:
            _resolve_one(fs, path, spec, found, allow_manifest=True, storage_options=options)
        except InputError:
            raise
        except Exception as exc:
            raise _input_error(spec, exc, options) from exc

    shards = [
        ShardRef(url=u, shard_id=f"{_safe_stem(_tar_stem(u), 'shard')}-{_short_hash(u)}") for u in found.tars
    ]
    shards += _virtual_shards(found.images, images_per_virtual_shard)
    shards.sort(key=lambda s: s.url)
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):  # 32-bit hash collision of two equal stems: vanishingly rare
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"shard id collision {dup}; rename one of the shards")
    return shards


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def _unsafe_reason(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    if ".." in re.split(r"[/\\]", name):
        return "'..' path component"
    if member.issym():
        return "symbolic link"
    if member.islnk():
        return "hard link"
    if member.ischr() or member.isblk():
        return "device"
    if member.isfifo():
        return "fifo"
    if not (member.isfile() or member.isdir()):
        return f"special member type {member.type!r}"
    return None


def _split_key(name: str) -> tuple[str, str]:
    """WebDataset ``(key, field)``: path up to the first dot of the file name, and the rest lowercased."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return name, ""
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass
class _Group:
    key: str
    fields: dict[str, bytes | None] = dataclasses.field(default_factory=dict)
    problems: list[str] = dataclasses.field(default_factory=list)


class _TarReader:
    """Turns tar members into :class:`RawSample` records (the rules are in the module doc)."""

    def __init__(self, shard: ShardRef, max_member_bytes: int):
        self.shard = shard
        self.max_member_bytes = max_member_bytes
        self.seen: dict[str, int] = {}

    def sample(self, key: str, image: bytes | None, ext: str | None, meta: dict | None, error: str | None):
        return RawSample(key, image, ext, meta, error, shard_url=self.shard.url, shard_id=self.shard.shard_id)

    def unique_key(self, key: str) -> tuple[str, str | None]:
        """The key itself the first time; ``<key>#dup<n>`` (never used before) and an error after."""
        n = self.seen.get(key, 0) + 1
        self.seen[key] = n
        if n == 1:
            return key, None
        candidate = f"{key}#dup{n}"
        while candidate in self.seen:  # a real member could be named like that
            n += 1
            candidate = f"{key}#dup{n}"
        self.seen[candidate] = 1
        return candidate, f"duplicate key {key!r} in shard (occurrence {n}; keys must be unique)"

    def finish(self, group: _Group, extra_error: str | None = None) -> RawSample:
        key, dup_error = self.unique_key(group.key)
        meta = None
        if "json" in group.fields and group.fields["json"] is not None:
            try:
                parsed = json.loads(group.fields["json"])
                meta = parsed if isinstance(parsed, dict) else {"value": parsed}
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("%s: sample %r has invalid json (%s); meta dropped", self.shard.url, key, exc)
        image_ext = next((e for e in IMAGE_EXTENSIONS if e in group.fields), None)
        error = extra_error or dup_error
        if error is None and group.problems:
            error = "; ".join(group.problems)
        if error is None and image_ext is None:
            have = ", ".join(sorted(e or "<no extension>" for e in group.fields)) or "nothing"
            error = f"no image member (have: {have})"
        if error is None and group.fields[image_ext] is None:  # internal invariant
            error = "image member was not read"
        if error is not None:
            return self.sample(key, None, image_ext, meta, error)
        return self.sample(key, group.fields[image_ext], image_ext, meta, None)

    def shard_error(self, message: str) -> RawSample:
        key, _ = self.unique_key(SHARD_ERROR_KEY)
        return self.sample(key, None, None, None, message)

    def read(self, fileobj) -> Iterator[RawSample]:
        url = self.shard.url
        try:
            tf = tarfile.open(fileobj=fileobj, mode="r:*")
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            yield self.shard_error(f"not a readable tar archive ({type(exc).__name__}: {exc})")
            return
        group: _Group | None = None
        last_name = "<start of archive>"
        while True:
            try:
                member = tf.next()
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                yield from self._truncated(group, f"after member {last_name!r}: {type(exc).__name__}: {exc}")
                return
            if member is None:
                break
            reason = _unsafe_reason(member)
            if member.isdir() and reason is None:
                continue
            key, field = _split_key(member.name)
            if group is None or key != group.key:
                if group is not None:
                    yield self.finish(group)
                group = _Group(key)
            last_name = member.name
            if reason is not None:
                log.warning("%s: unsafe tar member %r (%s) not read", url, member.name, reason)
                group.problems.append(f"unsafe tar member {member.name!r} ({reason}) not read")
                group.fields.setdefault(field, None)
                continue
            if field not in IMAGE_EXTENSIONS and field != "json":
                group.fields.setdefault(field, None)
                continue
            if member.size > self.max_member_bytes:
                group.problems.append(
                    f"member {member.name!r} too large ({member.size} > {self.max_member_bytes} bytes)"
                )
                group.fields.setdefault(field, None)
                continue
            try:
                extracted = tf.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
                yield from self._truncated(group, f"in member {member.name!r}: {type(exc).__name__}: {exc}")
                return
            if len(data) != member.size:
                yield from self._truncated(
                    group, f"in member {member.name!r}: {len(data)} of {member.size} bytes"
                )
                return
            if field in group.fields:
                log.warning(
                    "%s: member %r repeats field %r of key %r; first one kept", url, member.name, field, key
                )
            group.fields.setdefault(field, data)
        if group is not None:
            yield self.finish(group)
        end = self._end_marker_problem(tf, fileobj)
        if end is not None:
            kind = "corrupt tar" if end.startswith("invalid") else "truncated tar"
            yield self.shard_error(f"{kind}: {end}; samples after this point (if any) are missing")

    def _truncated(self, group: _Group | None, detail: str) -> Iterator[RawSample]:
        log.warning("%s: truncated or corrupt tar %s", self.shard.url, detail)
        if group is not None:
            yield self.finish(group, extra_error=f"incomplete sample: tar data ends or is corrupt {detail}")
        yield self.shard_error(
            f"truncated tar: data ends or is corrupt {detail}; samples after this point are missing"
        )

    @staticmethod
    def _end_marker_problem(tf: tarfile.TarFile, fileobj) -> str | None:
        """Python's tarfile ends silently on a cut or corrupt header; look at where it stopped.

        Only for uncompressed archives: a compressed stream that ends early already fails in the
        decompressor (``EOFError``), and seeking back in it would mean decompressing it again.
        """
        if tf.fileobj is not fileobj:
            return None
        try:
            tf.fileobj.seek(tf.offset)
            block = tf.fileobj.read(tarfile.BLOCKSIZE)
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            return f"cannot read the end of the archive at byte {tf.offset} ({exc})"
        if len(block) == tarfile.BLOCKSIZE and block.count(0) == tarfile.BLOCKSIZE:
            return None
        if not block:
            return f"archive ends at byte {tf.offset} without an end-of-archive marker"
        if len(block) < tarfile.BLOCKSIZE:
            return f"header cut at byte {tf.offset} ({len(block)} of {tarfile.BLOCKSIZE} bytes)"
        return f"invalid tar header at byte {tf.offset}"


def _iter_tar(shard: ShardRef, storage_options: dict[str, Any], max_member_bytes: int) -> Iterator[RawSample]:
    fs, path = _filesystem(shard.url, storage_options)
    try:
        fileobj = fs.open(path, "rb")
    except FileNotFoundError as exc:
        raise InputError(f"{shard.url}: shard vanished after listing; check the path") from exc
    with fileobj:
        yield from _TarReader(shard, max_member_bytes).read(fileobj)


def _relative_key(url: str, root: str) -> str:
    prefix = root.rstrip("/") + "/"
    return url[len(prefix) :] if root and url.startswith(prefix) else posixpath.basename(url)


def _iter_images(shard: ShardRef, storage_options: dict[str, Any], chunk: int = 32) -> Iterator[RawSample]:
    if not shard.members:
        return
    fs, _ = _filesystem(shard.members[0], storage_options)
    for start in range(0, len(shard.members), chunk):
        urls = shard.members[start : start + chunk]
        paths = [fs._strip_protocol(u) for u in urls]
        data = fs.cat(paths, on_error="return")
        for url, path in zip(urls, paths, strict=True):
            key = _relative_key(url, shard.root)
            value = data.get(path, FileNotFoundError(path)) if isinstance(data, dict) else data
            if isinstance(value, FileNotFoundError):
                error = f"image file vanished after listing: {url}"
                yield RawSample(
                    key, None, _ext(url), None, error, shard_url=shard.url, shard_id=shard.shard_id
                )
            elif isinstance(value, BaseException):
                raise value  # transient I/O: let the task be retried
            else:
                yield RawSample(
                    key, value, _ext(url), None, None, shard_url=shard.url, shard_id=shard.shard_id
                )


def iter_samples(
    shard: ShardRef,
    storage_options: dict[str, Any] | None = None,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[RawSample]:
    """Stream a shard's samples (``shard_total`` is None; see :func:`read_shard`).

    Tars are read sequentially from the fsspec file (never extracted); only image and ``json``
    members are loaded into memory. See the module doc for grouping and error records.
    """
    if not isinstance(shard, ShardRef):
        raise TypeError(f"expected a ShardRef (from list_shards), got {type(shard).__name__}: {shard!r:.200}")
    options = dict(storage_options or {})
    if shard.kind == "tar":
        yield from _iter_tar(shard, options, max_member_bytes)
    elif shard.kind == "images":
        yield from _iter_images(shard, options)
    else:
        raise ValueError(f"unknown shard kind {shard.kind!r} for {shard.url}")


def read_shard(
    shard: ShardRef,
    storage_options: dict[str, Any] | None = None,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> list[RawSample]:
    """Read a whole shard; every record carries ``shard_total`` = the number of records (= distinct keys).

    The driver passes ``shard_total`` as ``expected_keys`` to :func:`pipeline.annotate.commit.commit_shard`.
    """
    samples = list(iter_samples(shard, storage_options, max_member_bytes=max_member_bytes))
    total = len(samples)
    return [dataclasses.replace(s, shard_total=total) for s in samples]
