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
   :func:`iter_tar` is the one tar reader under it, also used for labeled shards (ground truth and
   training, :mod:`pipeline.groundtruth`): ``key -> {field: bytes}`` with the same member rules.

Names that are not valid UTF-8 (a file ``bad\\xff.jpg``, a tar member with such a name): every key, URL and
member list this module returns is in *stored form* (:func:`encode_name`): valid UTF-8, and unchanged for
ordinary names; the undecodable bytes become ``%XX`` and, in such names, a literal ``%`` becomes ``%25``.
:func:`decode_name` gives back the real name; the readers open files and members by their real names.

Guarantee: *every sample that exists yields exactly one record*, either with image bytes or with
``error`` set (plus ``error_kind`` and ``retryable``, see :mod:`pipeline.errors`); keys are unique within a
shard. Reading never raises for a shard's content or for storage errors. The rules:

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
* a truncated or corrupt shard that is *still being written* (its size, mtime or ETag changed while it
  was read, or it was modified less than :data:`pipeline.errors.GROWING_WINDOW_S` before the read) gets
  the retryable kind ``shard_growing`` instead of ``truncated_shard`` / ``corrupt_shard``;
* retryable storage errors (network, timeout, a file listed and then missing, other I/O errors) are
  retried in the task after the pauses of :data:`RETRY_DELAYS_S` (a tar is read again from the start, the
  records already yielded are skipped); then they are recorded with their kind, retryable: for a tar as
  one :data:`SHARD_ERROR_KEY` record (the samples after that point are missing: relabel the whole shard),
  for an image file as its own record. A shard that vanished after listing is ``vanished``, retryable;
* an unexpected exception for one sample (e.g. while parsing its ``json``) becomes that sample's
  record (``read_error``).

For virtual image shards each file is one sample with key = its path relative to the folder,
extension included (``cats/001.jpg``), so two files ``a.jpg`` and ``a.png`` never collide; a file that
vanished after listing gives an error record.

Every record carries ``image_url``: the file's URL for image folders (``file:///data/a.jpg``,
``s3://b/a.jpg``), fsspec's chained URL of the member for tars (``tar://cats/001.jpg::s3://b/shard-000.tar``,
:func:`tar_member_url`), which ``fsspec.open`` opens as it is.

Signed URLs (``https://.../x.tar?X-Amz-Signature=...``, e.g. lines of a manifest): a :class:`ShardRef`'s
``url`` and ``members`` hold the URL *without* its user-info and signing parameters
(:func:`pipeline.redact.url_identity`), which is what outputs record and what shard ids and keys derive
from (re-signed URLs name the same shards); the URLs to open, signatures included, travel separately in
``access_urls`` and are never recorded. The suffix of an http(s) URL (``.tar``, ``.jpg``) is read from its
path, ignoring the query, and ``?`` in an http(s) query is not a wildcard.
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
import time
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import fsspec
from fsspec.core import url_to_fs

from pipeline.errors import GROWING_WINDOW_S, classify, fault_of, inject, is_retryable
from pipeline.redact import redact_text, url_identity

__all__ = [
    "ANNOTATE_FIELDS",
    "IMAGE_EXTENSIONS",
    "SHARD_ERROR_KEY",
    "InputError",
    "RawSample",
    "ShardRef",
    "TarSample",
    "decode_name",
    "decode_name_bytes",
    "encode_name",
    "iter_samples",
    "iter_tar",
    "iter_tar_fileobj",
    "list_shards",
    "read_shard",
    "split_key",
    "tar_member_url",
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
        access_urls: only for signed URLs: what to open instead of ``url`` (a tar: one URL) or of
            ``members`` (images: one per member, same order); empty otherwise. Never recorded or shown.
    """

    url: str
    shard_id: str
    kind: Literal["tar", "images"] = "tar"
    members: tuple[str, ...] = ()
    root: str = ""
    access_urls: tuple[str, ...] = dataclasses.field(default=(), repr=False)


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
        error_kind, retryable: the :mod:`pipeline.errors` kind of ``error`` and whether it may succeed later.
        image_url: where the image is (stored form): the file's URL for image folders, the member's
            chained URL ``tar://<member>::<tar URL>`` for tars (:func:`tar_member_url`); None if no image.
    """

    key: str
    image_bytes: bytes | None
    image_ext: str | None
    meta: dict[str, Any] | None
    error: str | None
    shard_url: str = ""
    shard_id: str = ""
    shard_total: int | None = None
    error_kind: str | None = None
    retryable: bool = False
    image_url: str | None = None


# --------------------------------------------------------------------------------------------------
# Helpers: names, filesystems, errors
# --------------------------------------------------------------------------------------------------


_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")


def encode_name(name: str) -> str:
    """The stored, valid-UTF-8 form of a file / member name or URL (keys, ``image_url``, shard URLs).

    Names arrive from the OS and from tar headers as Python strings in which bytes that are not valid
    UTF-8 are kept as surrogates (``os.fsdecode``'s ``surrogateescape``: byte ``0xFF`` -> ``"\\udcff"``);
    such strings cannot be written to Parquet, JSON or most APIs. The rule, reversible by
    :func:`decode_name`:

    * a name that is valid UTF-8 and holds no ``%`` followed by two hex digits is stored unchanged
      (``cats/001.jpg``, ``100%.jpg``), so the usual URL opens as it is;
    * any other name is percent-encoded: each byte that is not valid UTF-8 becomes ``%XX`` (upper-case
      hex) and every literal ``%`` becomes ``%25``; the rest stays as it is (``bad\\xff.jpg`` ->
      ``bad%FF.jpg``, a real ``a%41.jpg`` -> ``a%2541.jpg``).

    So a stored name holds a ``%XX`` sequence exactly when it was encoded, and decoding is unambiguous.
    """
    if not _needs_encoding(name):
        return name
    out = []
    for ch in name:
        code = ord(ch)
        if ch == "%":
            out.append("%25")
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape'd byte
            out.append(f"%{code - 0xDC00:02X}")
        elif 0xD800 <= code <= 0xDFFF:  # any other lone surrogate: its (invalid) UTF-8 bytes
            out.append("".join(f"%{b:02X}" for b in ch.encode("utf-8", "surrogatepass")))
        else:
            out.append(ch)
    return "".join(out)


def _needs_encoding(name: str) -> bool:
    return bool(_PERCENT_ESCAPE.search(name)) or any(0xD800 <= ord(c) <= 0xDFFF for c in name)


def decode_name_bytes(stored: str) -> bytes:
    """The raw bytes of a stored name (:func:`encode_name`): what the filesystem / tar header holds."""
    if not _PERCENT_ESCAPE.search(stored):
        return stored.encode("utf-8", "surrogateescape")
    out = bytearray()
    i = 0
    while i < len(stored):
        if stored[i] == "%" and _PERCENT_ESCAPE.match(stored, i):
            out.append(int(stored[i + 1 : i + 3], 16))
            i += 3
        else:
            out += stored[i].encode("utf-8", "surrogateescape")
            i += 1
    return bytes(out)


def decode_name(stored: str) -> str:
    """The name as Python's OS and tar APIs spell it (undecodable bytes as surrogates) from its stored form.

    ``decode_name(encode_name(n)) == n`` for every name from the OS or a tar header; stored names that
    needed no encoding come back unchanged. Open local files and tar members with the result.
    """
    if not _PERCENT_ESCAPE.search(stored):
        return stored
    return decode_name_bytes(stored).decode("utf-8", "surrogateescape")


def _short_hash(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def _safe_stem(name: str, fallback: str) -> str:
    """Filesystem-safe stem: ``[A-Za-z0-9._-]``, starting with a letter or digit (parquet readers
    skip files starting with ``.`` or ``_``)."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", name)
    stem = re.sub(r"^[._-]+", "", stem)[:80]
    return stem or fallback


def _path_part(path: str) -> str:
    """An http(s) URL without its query and fragment (where suffixes and wildcards are looked for)."""
    if path.startswith(("http://", "https://")):
        return path.split("#", 1)[0].split("?", 1)[0]
    return path


def _tar_stem(path: str) -> str:
    base = posixpath.basename(_path_part(path).rstrip("/"))
    for suffix in TAR_SUFFIXES:
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


def _ext(path: str) -> str:
    base = posixpath.basename(_path_part(path))
    return base.rsplit(".", 1)[-1].lower() if "." in base else ""


def _is_tar(path: str) -> bool:
    return _path_part(path).lower().endswith(TAR_SUFFIXES)


def _is_image(path: str) -> bool:
    return _ext(path) in IMAGE_EXTENSIONS


def _is_manifest(path: str) -> bool:
    return _path_part(path).lower().endswith(MANIFEST_SUFFIXES)


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
    text = redact_text(f"{name}: {exc}")  # library messages quote the URL they opened, signature included
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
    access: dict[str, str] = dataclasses.field(default_factory=dict)  # url -> signed url (only if different)

    def add_file(self, fs, path: str, root: str) -> bool:
        signed = encode_name(fs.unstrip_protocol(path))  # stored form: valid UTF-8 (see encode_name)
        url = url_identity(signed)  # what is recorded: no user-info, no signature
        if _is_tar(path):
            self.tars.setdefault(url, None)
        elif _is_image(path):
            self.images.setdefault(
                url, url_identity(encode_name(fs.unstrip_protocol(root.rstrip("/")))) if root else ""
            )
        else:
            return False
        if signed != url:
            self.access.setdefault(url, signed)
        return True


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
        found.add_file(fs, p, posixpath.dirname(_path_part(p)))
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
        pattern = _path_part(line_path)
        if line_fs is fs and not _BRACE.search(pattern) and not _GLOB_CHARS.search(pattern):
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
    if _BRACE.search(_path_part(path)):
        from braceexpand import braceexpand

        expanded = list(braceexpand(path))
        globs = [p for p in expanded if _GLOB_CHARS.search(p)]
        for g in globs:
            _resolve_glob(fs, g, url, found)
        _resolve_explicit(fs, [p for p in expanded if p not in globs], url, found)
        return
    if _GLOB_CHARS.search(_path_part(path)):
        _resolve_glob(fs, path, url, found)
        return
    info = fs.info(path)
    if info.get("type") == "directory":
        _resolve_dir(fs, path, url, found)
    elif _is_manifest(path):
        if not allow_manifest:
            raise InputError(f"{url}: manifests cannot list other manifests")
        _read_manifest(fs, path, url, found, storage_options or {})
    elif not found.add_file(fs, path, posixpath.dirname(_path_part(path))):
        raise InputError(
            f"{url}: unsupported input file; expected a .tar shard, an image ({', '.join(IMAGE_EXTENSIONS)}), "
            f"a manifest ({', '.join(MANIFEST_SUFFIXES)}) or a folder"
        )


def _virtual_shards(
    images: dict[str, str], per_shard: int, label: str = "images", access: Mapping[str, str] | None = None
) -> list[ShardRef]:
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
            signed = tuple((access or {}).get(m, m) for m in members)
            shards.append(
                ShardRef(
                    url=url,
                    shard_id=shard_id,
                    kind="images",
                    members=members,
                    root=root,
                    access_urls=signed if signed != members else (),
                )
            )
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
    access = {m: a for shard in shards for m, a in zip(shard.members, shard.access_urls)}
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
        log.info(
            "%s: %d image(s) already labelled by committed shards; %d left to label", root, skipped, len(rest)
        )
        out.extend(_virtual_shards(rest, per_shard, label="rest", access=access))
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
        ShardRef(
            url=u,
            shard_id=f"{_safe_stem(_tar_stem(u), 'shard')}-{_short_hash(u)}",
            access_urls=(found.access[u],) if u in found.access else (),
        )
        for u in found.tars
    ]
    shards += _virtual_shards(found.images, images_per_virtual_shard, access=found.access)
    shards.sort(key=lambda s: s.url)
    ids = [s.shard_id for s in shards]
    if len(set(ids)) != len(ids):  # 32-bit hash collision of two equal stems: vanishingly rare
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise InputError(f"shard id collision {dup}; rename one of the shards")
    return shards


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------

#: Fields the annotate reader loads (the image and ``json``); other members are listed, never read.
ANNOTATE_FIELDS = frozenset((*IMAGE_EXTENSIONS, "json"))
#: Pauses (seconds) before re-reading after a retryable storage error (network, timeout, a file listed and
#: then missing, other I/O errors); after the last one the error is recorded (retryable) and the run goes on.
RETRY_DELAYS_S = (0.5, 1.5)
_TAR_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


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


def split_key(name: str) -> tuple[str, str]:
    """WebDataset ``(key, field)``: path up to the first dot of the file name, and the rest lowercased."""
    while name.startswith("./"):
        name = name[2:]
    folder, _, base = name.rpartition("/")
    if "." not in base or base.startswith("."):
        return name, ""
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


@dataclass(frozen=True)
class TarSample:
    """One WebDataset sample of a tar shard as read by the one tar reader (:func:`iter_tar`).

    Attributes:
        key: the sample key in stored form (:func:`encode_name`), unique within the shard; problems of the
            whole shard use :data:`SHARD_ERROR_KEY`.
        files: ``{field: bytes}`` of the loaded fields (``"jpg"``, ``"json"``, ``"panoptic.png"`` ...).
        members: ``{field: member name}`` as stored in the tar (may hold undecodable bytes as surrogates).
        present: every field of the sample, loaded or not (``""`` for a member without an extension).
        error: None, or why the sample (or the rest of the shard) cannot be used.
        error_kind: the :mod:`pipeline.errors` kind of ``error``.
    """

    key: str
    files: dict[str, bytes]
    members: dict[str, str]
    present: tuple[str, ...]
    error: str | None = None
    error_kind: str | None = None


@dataclass
class _Group:
    key: str  # raw key (as in the tar)
    fields: dict[str, bytes | None] = dataclasses.field(default_factory=dict)
    members: dict[str, str] = dataclasses.field(default_factory=dict)
    problems: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (message, kind)


class _TarReader:
    """Turns tar members into :class:`TarSample` records (the rules are in the module doc).

    ``fields``: the fields to load (None: every field with a name); the others are listed in ``present``.
    """

    def __init__(self, url: str, max_member_bytes: int, fields: frozenset[str] | None):
        self.url = url
        self.max_member_bytes = max_member_bytes
        self.fields = fields
        self.seen: dict[str, int] = {}

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
        shown = encode_name(key)
        return candidate, f"duplicate key {shown!r} in shard (occurrence {n}; keys must be unique)"

    def finish(self, group: _Group, extra: tuple[str, str] | None = None) -> TarSample:
        key, dup_error = self.unique_key(group.key)
        problem = extra or ((dup_error, "duplicate_key") if dup_error else None)
        if problem is None and group.problems:
            problem = ("; ".join(m for m, _ in group.problems), group.problems[0][1])
        files = {f: data for f, data in group.fields.items() if data is not None}
        present = tuple(group.fields)
        if problem is not None:
            return TarSample(encode_name(key), {}, dict(group.members), present, problem[0], problem[1])
        return TarSample(encode_name(key), files, dict(group.members), present)

    def shard_error(self, message: str, kind: str) -> TarSample:
        key, _ = self.unique_key(SHARD_ERROR_KEY)
        return TarSample(key, {}, {}, (), message, kind)

    def wanted(self, field: str) -> bool:
        return bool(field) and (self.fields is None or field in self.fields)

    def read(self, fileobj) -> Iterator[TarSample]:
        url = self.url
        try:
            tf = tarfile.open(fileobj=fileobj, mode="r:*")
        except _TAR_ERRORS as exc:
            yield self.shard_error(
                f"not a readable tar archive ({type(exc).__name__}: {exc})", "corrupt_shard"
            )
            return
        group: _Group | None = None
        last_name = "<start of archive>"
        while True:
            try:
                member = tf.next()
            except _TAR_ERRORS as exc:
                yield from self._truncated(group, f"after member {last_name!r}: {type(exc).__name__}: {exc}")
                return
            if member is None:
                break
            reason = _unsafe_reason(member)
            if member.isdir() and reason is None:
                continue
            key, field = split_key(member.name)
            if group is None or key != group.key:
                if group is not None:
                    yield self.finish(group)
                group = _Group(key)
            last_name = encode_name(member.name)
            group.members.setdefault(field, member.name)
            if reason is not None:
                log.warning("%s: unsafe tar member %r (%s) not read", url, last_name, reason)
                group.problems.append(
                    (f"unsafe tar member {last_name!r} ({reason}) not read", "unsafe_member")
                )
                group.fields.setdefault(field, None)
                continue
            if not self.wanted(field):
                group.fields.setdefault(field, None)
                continue
            if member.size > self.max_member_bytes:
                group.problems.append(
                    (
                        f"member {last_name!r} too large ({member.size} > {self.max_member_bytes} bytes)",
                        "member_too_large",
                    )
                )
                group.fields.setdefault(field, None)
                continue
            try:
                extracted = tf.extractfile(member)
                data = extracted.read() if extracted is not None else b""
            except _TAR_ERRORS as exc:
                yield from self._truncated(group, f"in member {last_name!r}: {type(exc).__name__}: {exc}")
                return
            if len(data) != member.size:
                yield from self._truncated(
                    group, f"in member {last_name!r}: {len(data)} of {member.size} bytes"
                )
                return
            if field in group.fields:
                log.warning(
                    "%s: member %r repeats field %r of key %r; first one kept", url, last_name, field, key
                )
            group.fields.setdefault(field, data)
        if group is not None:
            yield self.finish(group)
        end = self._end_marker_problem(tf, fileobj)
        if end is not None:
            corrupt = end.startswith("invalid")
            kind, label = (
                ("corrupt_shard", "corrupt tar") if corrupt else ("truncated_shard", "truncated tar")
            )
            yield self.shard_error(f"{label}: {end}; samples after this point (if any) are missing", kind)

    def _truncated(self, group: _Group | None, detail: str) -> Iterator[TarSample]:
        log.warning("%s: truncated or corrupt tar %s", self.url, detail)
        if group is not None:
            yield self.finish(
                group, (f"incomplete sample: tar data ends or is corrupt {detail}", "truncated_shard")
            )
        yield self.shard_error(
            f"truncated tar: data ends or is corrupt {detail}; samples after this point are missing",
            "truncated_shard",
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


# --------------------------------------------------------------------------------------------------
# Reading with retries; shards still being written
# --------------------------------------------------------------------------------------------------


def _mtime(info: Mapping[str, Any]) -> float | None:
    """Modification time (POSIX seconds) from an fsspec ``info`` dict (local ``mtime``, S3 ``LastModified``,
    GCS ``updated``), or None."""
    from datetime import datetime

    for name in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        try:
            return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
        except ValueError:
            continue
    return None


def _stat(fs, path: str) -> dict[str, Any]:
    """``{"size", "mtime", "etag"}`` of a file, fresh (fsspec's listing cache invalidated first)."""
    fs.invalidate_cache(path)
    info = fs.info(path)
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    return {"size": info.get("size"), "mtime": _mtime(info), "etag": etag}


class _Growth:
    """Decides once whether a shard that ended early is still being written (see :mod:`pipeline.errors`)."""

    def __init__(self, fs, path: str, before: dict[str, Any], started: float) -> None:
        self.fs, self.path, self.before, self.started = fs, path, before, started
        self._why: str | None | bool = False  # False: not decided yet

    def why(self) -> str | None:
        """A reason text when the shard is growing, else None."""
        if self._why is False:
            self._why = self._decide()
        return self._why  # type: ignore[return-value]

    def _decide(self) -> str | None:
        try:
            after = _stat(self.fs, self.path)
        except Exception as exc:  # noqa: BLE001 - gone or unreadable while we read it: it is changing
            return f"it changed while being read ({type(exc).__name__}: {exc})"
        changed = [k for k in ("size", "mtime", "etag") if after.get(k) != self.before.get(k)]
        if changed:
            what = ", ".join(f"{k} {self.before.get(k)} -> {after.get(k)}" for k in changed)
            return f"it changed while being read ({what})"
        mtime = self.before.get("mtime")
        if mtime is not None and self.started - mtime < GROWING_WINDOW_S:
            return f"modified {max(0.0, self.started - mtime):.0f} s before the read (< {GROWING_WINDOW_S:.0f} s)"
        return None


def _upgrade_if_growing(sample: TarSample, growth: _Growth) -> TarSample:
    if sample.error_kind not in ("truncated_shard", "corrupt_shard"):
        return sample
    why = growth.why()
    if why is None:
        return sample
    return dataclasses.replace(
        sample, error=f"shard still being written ({why}): {sample.error}", error_kind="shard_growing"
    )


def iter_tar(
    url: str,
    storage_options: dict[str, Any] | None = None,
    *,
    fields: Collection[str] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
    open_url: str | None = None,
) -> Iterator[TarSample]:
    """The one tar reader: stream a WebDataset tar (never extracted) as :class:`TarSample` records.

    Used by annotate (:func:`iter_samples`), ground truth and training (:mod:`pipeline.groundtruth`). The
    member rules (grouping, unsafe members, size limit, duplicate keys, truncation) are in the module doc.

    Args:
        url: the shard's URL in stored form (:func:`encode_name`; a plain path or URL is fine).
        storage_options: fsspec options.
        fields: the fields to load (e.g. :data:`ANNOTATE_FIELDS`); None loads every field with a name.
        max_member_bytes: members above this size are not read (their sample gets ``member_too_large``).
        open_url: what to open when it differs from ``url`` (a signed URL, :class:`ShardRef` ``access_urls``);
            never shown: messages name ``url`` and are redacted.

    Never raises for the shard's content or storage: a retryable storage error (network, timeout, the file
    missing, other I/O) is retried after each pause of :data:`RETRY_DELAYS_S`, re-reading the shard and
    skipping the records already yielded; when the retries are spent, or for a non-retryable error, one
    :data:`SHARD_ERROR_KEY` record with the error's kind ends the shard. A shard that ends early is
    ``truncated_shard`` / ``corrupt_shard``, or ``shard_growing`` (retryable) when its size, mtime or ETag
    changed during the read or it was modified less than :data:`pipeline.errors.GROWING_WINDOW_S` before.
    """
    wanted = None if fields is None else frozenset(fields)
    fs, path = _filesystem(decode_name(open_url or url), storage_options)
    emitted = 0
    failures = 0
    reader = _TarReader(url, max_member_bytes, wanted)
    while True:
        produced = 0
        reader = _TarReader(url, max_member_bytes, wanted)
        try:
            started = time.time()
            before = _stat(fs, path)
            with fs.open(path, "rb") as fileobj:
                growth = _Growth(fs, path, before, started)
                for sample in reader.read(fileobj):
                    produced += 1
                    if produced <= emitted:  # already yielded by an attempt that failed later
                        continue
                    emitted += 1
                    yield _upgrade_if_growing(sample, growth)
            return
        except Exception as exc:  # noqa: BLE001 - every failure ends as a record; the run goes on
            kind, retryable = classify(exc, stage="read")
            if retryable and kind != "out_of_memory" and failures < len(RETRY_DELAYS_S):
                log.warning(
                    "%s: %s (%s); reading it again in %.1f s",
                    url,
                    kind,
                    redact_text(f"{type(exc).__name__}: {exc}"),
                    RETRY_DELAYS_S[failures],
                )
                time.sleep(RETRY_DELAYS_S[failures])
                failures += 1
                continue
            what = "shard vanished after listing" if kind == "vanished" else f"{kind}: cannot read the shard"
            if emitted:
                what += f" after {emitted} record(s)"
            detail = redact_text(f"{type(exc).__name__}: {exc}")  # library messages may quote a signed URL
            yield reader.shard_error(f"{what}: {detail}; samples after this point (if any) are missing", kind)
            return


def iter_tar_fileobj(
    fileobj,
    url: str,
    *,
    fields: Collection[str] | None = None,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[TarSample]:
    """Like :func:`iter_tar` on an already open binary file (no retries, no growth check): the member rules
    alone. ``url`` names the shard in messages."""
    yield from _TarReader(url, max_member_bytes, None if fields is None else frozenset(fields)).read(fileobj)


# --------------------------------------------------------------------------------------------------
# Annotate samples
# --------------------------------------------------------------------------------------------------


def tar_member_url(member: str, tar_url: str) -> str:
    """fsspec's chained URL of a tar member (``tar://cats/001.jpg::s3://b/shard-000.tar``), stored form.

    ``member`` is the name as in the tar (it may hold undecodable bytes as surrogates), ``tar_url`` the
    shard URL in stored form. ``fsspec.open(decode_name(url))`` opens the member (chained options:
    ``fsspec.open(url, s3={...})``); for names that need no encoding ``decode_name`` changes nothing.
    """
    return encode_name(f"tar://{member}::{decode_name(tar_url)}")


def _record(shard: ShardRef, key: str, *, image=None, ext=None, meta=None, error=None, kind=None, url=None):
    retryable = is_retryable(kind) if kind else False
    return RawSample(
        key,
        image,
        ext,
        meta,
        error,
        shard_url=shard.url,
        shard_id=shard.shard_id,
        error_kind=kind if error else None,
        retryable=retryable if error else False,
        image_url=url,
    )


def _annotate_sample(shard: ShardRef, sample: TarSample) -> RawSample:
    """A :class:`RawSample` from a tar sample (image = first present of :data:`IMAGE_EXTENSIONS`)."""
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in sample.present), None)
    url = tar_member_url(sample.members[image_ext], shard.url) if image_ext in sample.members else None
    if sample.error is not None:
        return _record(shard, sample.key, ext=image_ext, error=sample.error, kind=sample.error_kind, url=url)
    try:
        meta = None
        if "json" in sample.files:
            try:
                parsed = json.loads(sample.files["json"])
                meta = parsed if isinstance(parsed, dict) else {"value": parsed}
            except (ValueError, UnicodeDecodeError) as exc:
                log.warning("%s: sample %r has invalid json (%s); meta dropped", shard.url, sample.key, exc)
        inject("read", fault_of(meta), sample.key)
        if image_ext is None:
            have = ", ".join(sorted(e or "<no extension>" for e in sample.present)) or "nothing"
            return _record(
                shard, sample.key, meta=meta, error=f"no image member (have: {have})", kind="no_image_member"
            )
        if image_ext not in sample.files:  # internal invariant: a present image field is always loaded
            return _record(
                shard,
                sample.key,
                ext=image_ext,
                meta=meta,
                error="image member was not read",
                kind="read_error",
                url=url,
            )
        return _record(shard, sample.key, image=sample.files[image_ext], ext=image_ext, meta=meta, url=url)
    except Exception as exc:  # noqa: BLE001 - one sample's failure is its own error record
        kind, _ = classify(exc, stage="read")
        where = decode_name(url) if url else f"{shard.url}:{sample.key}"
        return _record(
            shard,
            sample.key,
            ext=image_ext,
            error=f"read error: {type(exc).__name__}: {exc} [{encode_name(where)}]",
            kind=kind,
            url=url,
        )


def _iter_tar(shard: ShardRef, storage_options: dict[str, Any], max_member_bytes: int) -> Iterator[RawSample]:
    opened = shard.access_urls[0] if shard.access_urls else None
    for sample in iter_tar(
        shard.url, storage_options, fields=ANNOTATE_FIELDS, max_member_bytes=max_member_bytes, open_url=opened
    ):
        yield _annotate_sample(shard, sample)


def _without_signatures(shard: ShardRef, samples: Iterator[RawSample]) -> Iterator[RawSample]:
    """For signed URLs: an error raised while reading is re-raised with its message redacted and without
    its chain (library errors quote the URL they opened, signature included; Ray would print them in its
    worker logs): ``InputError`` stays ``InputError``, anything else becomes ``OSError`` (a failed read,
    retried as I/O)."""
    if not shard.access_urls:
        yield from samples
        return
    try:
        yield from samples
    except InputError as exc:
        raise InputError(redact_text(str(exc))) from None
    except Exception as exc:
        raise OSError(f"{shard.url}: {redact_text(f'{type(exc).__name__}: {exc}')}") from None


def _relative_key(url: str, root: str) -> str:
    """Key of an image of a folder: its path relative to the folder (raw names in, stored form out)."""
    raw_url, raw_root = decode_name(url), decode_name(root)
    prefix = raw_root.rstrip("/") + "/"
    rel = raw_url[len(prefix) :] if raw_root and raw_url.startswith(prefix) else posixpath.basename(raw_url)
    return encode_name(rel)


def _read_one(fs, path: str, url: str, first: BaseException) -> bytes | BaseException:
    """Read one image again after a retryable error (pauses of :data:`RETRY_DELAYS_S`); the bytes or the
    last exception."""
    exc: BaseException = first
    for delay in RETRY_DELAYS_S:
        kind, retryable = classify(exc, stage="read")
        if not retryable or kind == "out_of_memory":
            return exc
        log.warning(
            "%s: %s (%s); reading it again in %.1f s",
            url,
            kind,
            redact_text(f"{type(exc).__name__}: {exc}"),
            delay,
        )
        time.sleep(delay)
        try:
            fs.invalidate_cache(path)
            return fs.cat_file(path)
        except Exception as again:  # noqa: BLE001
            exc = again
    return exc


def _iter_images(shard: ShardRef, storage_options: dict[str, Any], chunk: int = 32) -> Iterator[RawSample]:
    if not shard.members:
        return
    opened = shard.access_urls or shard.members  # signed URLs are opened, never recorded
    fs, _ = _filesystem(decode_name(opened[0]), storage_options)
    for start in range(0, len(shard.members), chunk):
        urls = shard.members[start : start + chunk]
        paths = [fs._strip_protocol(decode_name(u)) for u in opened[start : start + chunk]]
        try:
            data = fs.cat(paths, on_error="return")
        except Exception as exc:  # noqa: BLE001 - the whole batch failed: each file is retried alone below
            data = {p: exc for p in paths}
        for url, path in zip(urls, paths, strict=True):
            key = _relative_key(url, shard.root)
            ext = _ext(url) or None
            value = data.get(path, FileNotFoundError(path)) if isinstance(data, dict) else data
            if isinstance(value, BaseException):
                value = _read_one(fs, path, url, value)
            if isinstance(value, BaseException):
                kind, _ = classify(value, stage="read")
                if kind == "vanished":
                    error = f"image file vanished after listing: {url}"
                else:
                    error = (
                        redact_text(f"{kind}: cannot read image: {type(value).__name__}: {value}")
                        + f" [{url}]"
                    )
                yield _record(shard, key, ext=ext, error=error, kind=kind, url=url)
            else:
                yield _record(shard, key, image=value, ext=ext, url=url)


def iter_samples(
    shard: ShardRef,
    storage_options: dict[str, Any] | None = None,
    *,
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
) -> Iterator[RawSample]:
    """Stream a shard's samples (``shard_total`` is None; see :func:`read_shard`).

    Tars are read sequentially from the fsspec file (never extracted); only image and ``json``
    members are loaded into memory. See the module doc for grouping and error records. Never raises for
    the shard's content or for storage errors: they become error records (with kind and retryable flag).
    """
    if not isinstance(shard, ShardRef):
        raise TypeError(f"expected a ShardRef (from list_shards), got {type(shard).__name__}: {shard!r:.200}")
    options = dict(storage_options or {})
    if shard.kind == "tar":
        yield from _without_signatures(shard, _iter_tar(shard, options, max_member_bytes))
    elif shard.kind == "images":
        yield from _without_signatures(shard, _iter_images(shard, options))
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
