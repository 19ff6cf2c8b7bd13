"""Parquet and COCO outputs with exactly-once, atomic per-shard commits, on any fsspec URL.

Layout under ``out_url`` (local path, ``file://``, ``s3://`` ...)::

    parquet/<shard_id>.parquet            final rows of one committed shard (one file per shard)
    coco/panoptic/<shard_id>/<name>.png   COCO panoptic PNGs (the image's extension replaced, see png_names)
    coco/_parts/<shard_id>.jsonl          per-shard COCO fragment, one JSON line per labelled image
    coco/panoptic.json, coco/instances.json, coco/index.json
                                          merged exports (numbered parts past a size), see pipeline.annotate.coco
    _staging/<shard_id>/<uuid>.parquet    rows written by parallel write tasks, before the commit
    _members/<shard_id>.json              image-folder shards: the image URLs the shard labelled
    _commits/<shard_id>.json              commit marker, written LAST (small: counts, digests, source, seq)
    _replacing/<shard_id>.json            a replacement (--retry-errors / --relabel-changed) in progress
    provenance.json, summary.json

How "never lose or duplicate a label" is kept:

* Write tasks only ever create *new* staging files (random names), each written whole in one PUT
  (object stores) or as a temp file + ``os.replace`` (local). A retried task adds a duplicate file;
  nothing is overwritten.
* :func:`commit_shard` streams, with memory bounded by the number of keys (not the shard's bytes):
  pass 1 reads only the ``key`` / ``error`` (and ``image_ext``, ``shard``) columns of every staging file and
  picks exactly one row per key (a labelled row beats an error row; ties go to the first file in name order,
  then row order); it refuses to commit unless the distinct keys are the expected ones. Pass 2 streams the
  winning rows, batch by batch, into a :class:`pyarrow.parquet.ParquetWriter`, the shard's PNGs and its
  COCO fragment (each through a local temp file published atomically), under deterministic names; only
  then the marker ``_commits/<shard_id>.json``; then it deletes the staging files it read.
* Row order of a shard's Parquet file: staging-file name order, then row order within a file (deterministic
  for a given set of staging files, not sorted); a ``retry`` replacement keeps the shard's other rows in
  their order and appends the relabelled ones. ``image_id = seq << 28 | rank of the key among the shard's
  sorted keys`` (:func:`pipeline.schema.image_id`), so sorting by ``image_id`` gives key order.
* Ids: the driver (the one writer of the output) gives each new shard a commit sequence number
  ``seq = max(seq of existing markers) + 1`` (:func:`next_seq`); it is stored in the marker. A replaced shard
  keeps its seq, so its ids do not change while its key set does not. Limits: < 2**25 shards, < 2**28 images
  (and < 2**28 COCO instances) per shard; all ids < 2**53.
* A shard is committed iff its marker exists. A crash before the marker leaves a shard uncommitted:
  rerunning it (after :func:`prepare_shard_for_rerun`, or just committing again) overwrites the same
  files. A crash after the marker only leaves staging files, which later calls delete.
* Committing an already committed shard is a no-op returning the marker's :class:`CommitInfo` (the
  first commit is final), except for an explicit replacement: ``replace="retry"`` relabels only the
  rows whose ``retryable`` is true (the committed Parquet is the base: its other rows are kept as they were),
  ``replace="relabel"`` rebuilds the shard from new staging files (its source changed). The driver first
  records the replacement in ``_replacing/<shard_id>.json``; every file is replaced atomically, the marker
  last, then the record is deleted. A crash in between leaves the record, and the next run completes the
  replacement (each file is at every moment either the old or the new complete version; the Parquet
  always has exactly one row per key).
* Files are written atomically: locally via a hidden temp file (``.name.tmp-<uuid>``, fsync'ed for
  Parquet, fragments and markers) and ``os.replace``; on object stores as one whole-object PUT (or a
  multipart upload, which is also all-or-nothing). Hidden (``.``) and ``_`` names are skipped by
  ``pyarrow.dataset``, so ``pyarrow.dataset.dataset(f"{out}/parquet")`` only ever sees complete files.
  A Parquet file may exist briefly without its marker (between the outputs and the marker); it is
  complete and deduplicated, and :func:`clean_uncommitted` removes it if the shard is never committed.
* Markers are read with retries: a transient failure (connection reset, timeout) is retried and then
  raised, never taken for "not committed" (which would relabel the shard and delete its outputs).

All functions are stateless and take plain, picklable arguments, so they can run in Ray tasks.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.annotate.coco import (
    FRAGMENT_SUFFIX,
    PARTS_DIR,
    PNG_DIR,
    copied_image_name,
    default_coco_url,
    default_file_name,
    finalize_coco,
    fragment_record,
    json_bytes,
    key_to_filename,
    png_names,
    test_pause,
)
from pipeline.encode import panoptic_to_png, segments_to_panoptic
from pipeline.schema import (
    COLUMNS,
    METADATA_VERSION_KEY,
    SCHEMA_VERSION,
    RunProvenance,
    image_id,
    output_schema,
    rows_to_table,
)
from pipeline.storage import (
    cat_many,
    delete,
    fs_root,
    is_local,
    list_children,
    list_files,
    open_atomic,
    read_bytes,
    remove_empty_dir,
    utc_now,
    write_bytes,
    write_many,
)

__all__ = [
    "CommitError",
    "CommitInfo",
    "PreparedCommit",
    "ProvenanceMismatchError",
    "begin_replacement",
    "clean_uncommitted",
    "clear_staging",
    "commit_shard",
    "committed_shards",
    "finalize_coco",
    "key_to_filename",
    "load_members",
    "next_seq",
    "pending_replacements",
    "prepare_shard_for_rerun",
    "source_changed",
    "source_stamps",
    "write_commit_marker",
    "write_provenance",
    "write_run_summary",
    "write_shard_outputs",
    "write_staging",
]

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
COMMITS_DIR = "_commits"
MEMBERS_DIR = "_members"
REPLACING_DIR = "_replacing"
PARQUET_DIR = "parquet"
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_PARQUET_COMPRESSION = "zstd"
_ROW_GROUP_ROWS = 1024
_ROW_GROUP_BYTES = 64 * 2**20
_PREFETCH_BYTES = 64 * 2**20  # staging bytes kept between the two passes on object stores
_PASS1_COLUMNS = ["key", "error", "image_ext", "shard", "shard_id"]
Replace = Literal["retry", "relabel"]


class CommitError(RuntimeError):
    """A shard cannot be committed (wrong number of keys, foreign rows, no staging files)."""


class ProvenanceMismatchError(ValueError):
    """The output folder already holds labels made with a different model / vocabulary / thresholds."""


@dataclass(frozen=True)
class CommitInfo:
    """What a commit wrote; stored as the marker ``_commits/<shard_id>.json`` (small: no key or member lists).

    Paths are relative to the output root. ``parquet_sha256`` is the hex digest of the final file.
    ``seq``: the shard's commit sequence number (ids are ``seq << 28 | ...``). ``kind``: ``"tar"`` or
    ``"images"``; ``root``: the image folder's URL for image shards. ``source``: the shard's tar ``{"size",
    "etag"}`` or ``{"size", "mtime"}``, or for image shards ``{"n", "digest"}`` (sha1 over member URL, size and
    ETag/mtime), captured when the input was listed (None when unknown). ``n_errors_by_kind``: error rows per
    ``error_kind``; ``n_retryable``: error rows whose ``retryable`` is true; ``errors_by_reason``: the 20 most
    common :func:`error_reason` texts. ``members_file``: ``_members/<shard_id>.json`` (image shards; the URLs
    the shard labelled), ``n_members`` its length. ``replaced``: ``"retry"`` / ``"relabel"`` when this commit
    replaced an earlier one. ``category_counts`` (segments per category name) is returned by the commit but not
    stored in the marker.
    """

    shard: str
    shard_id: str
    n_images: int
    n_labelled: int
    n_errors: int
    n_segments: int
    n_instances: int
    parquet: str
    parquet_sha256: str
    parquet_bytes: int
    coco_part: str | None
    run_id: str
    schema_version: int
    n_staging_files: int
    n_duplicates_dropped: int
    committed_at: str
    seq: int = 0
    kind: str = "tar"
    root: str = ""
    source: dict[str, Any] | None = None
    n_retryable: int = 0
    n_errors_by_kind: dict[str, int] = field(default_factory=dict)
    errors_by_reason: dict[str, int] = field(default_factory=dict)
    members_file: str | None = None
    n_members: int = 0
    replaced: str | None = None
    category_counts: dict[str, int] = field(default_factory=dict, compare=False)

    def to_marker(self) -> dict[str, Any]:
        marker = asdict(self)
        marker.pop("category_counts")
        return marker

    @classmethod
    def from_marker(cls, marker: Mapping[str, Any]) -> CommitInfo:
        names = {f.name for f in fields(cls)} - {"category_counts"}
        return cls(**{k: v for k, v in marker.items() if k in names})


@dataclass(frozen=True)
class PreparedCommit:
    """Result of :func:`write_shard_outputs`: everything but the marker is written.

    ``members``: the image URLs of an image shard (written beside the marker); ``stale_pngs``: PNGs of an
    earlier attempt or version of the shard that no longer belong to it (deleted after the marker).
    """

    info: CommitInfo
    staging_files: tuple[str, ...]
    members: tuple[str, ...] = ()
    stale_pngs: tuple[str, ...] = ()


# --------------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------------


def _check_shard_id(shard_id: str) -> str:
    if not isinstance(shard_id, str) or not _SHARD_ID.match(shard_id):
        raise ValueError(f"unsafe shard_id {shard_id!r}: use [A-Za-z0-9._-], starting with a letter or digit")
    return shard_id


def _attr(shard: Any, name: str, default: Any = None) -> Any:
    if isinstance(shard, Mapping):
        return shard.get(name, default)
    return getattr(shard, name, default)


def _shard_fields(shard: Any) -> tuple[str, str]:
    """``(url, shard_id)`` of a :class:`~pipeline.shards.ShardRef`, any object with those attributes, or a dict."""
    return str(_attr(shard, "url")), _check_shard_id(_attr(shard, "shard_id"))


def _shard_kind_root(shard: Any) -> tuple[str, str]:
    url = str(_attr(shard, "url"))
    kind = _attr(shard, "kind") or ("images" if "#images-" in url or "#rest-" in url else "tar")
    root = _attr(shard, "root") or (url.split("#", 1)[0] if kind == "images" else "")
    return str(kind), str(root)


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=_PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes()


def _is_collection(value: Any) -> bool:
    return isinstance(value, Collection) and not isinstance(value, (str, bytes))


def _category_ids(categories: list[dict[str, Any]]) -> set[int]:
    ids = set()
    for i, cat in enumerate(categories):
        missing = {"id", "name", "isthing"} - set(cat)
        if missing:
            raise ValueError(f"category {i} {cat!r} lacks {sorted(missing)}")
        ids.add(int(cat["id"]))
    return ids


class _HashingWriter(io.RawIOBase):
    """Binary file wrapper that hashes (sha256) and counts what is written through it."""

    def __init__(self, raw):
        self.raw, self.sha, self.n = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        self.sha.update(data)
        self.n += len(data)
        return self.raw.write(data)

    def tell(self) -> int:
        return self.n


# --------------------------------------------------------------------------------------------------
# Staging
# --------------------------------------------------------------------------------------------------


def write_staging(
    rows: list[dict[str, Any]] | pa.Table,
    out_url: str,
    storage_options: dict[str, Any] | None,
    provenance: RunProvenance | None,
) -> list[dict[str, Any]]:
    """Write rows (any mix of shards) to new staging files, one file per shard present.

    Args:
        rows: output rows (see :mod:`pipeline.schema`), as dicts or a table with the same columns.
        out_url, storage_options: the output root and its fsspec options.
        provenance: stored in the staging files' schema metadata.

    Returns:
        One record per shard: ``{"shard_id", "path", "n_rows", "n_keys", "keys"}`` (``keys`` sorted,
        distinct). The driver unions ``keys`` per shard and commits when it reaches the shard's
        ``shard_total`` (counting rows would double-count a retried task).
    """
    if isinstance(rows, pa.Table):
        rows = rows.select(list(COLUMNS)).to_pylist() if rows.num_rows else []
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for i, row in enumerate(rows):
        sid = row.get("shard_id")
        if not sid:
            raise ValueError(f"row {i} has no shard_id")
        by_shard.setdefault(_check_shard_id(sid), []).append(row)
    fs, root = fs_root(out_url, storage_options)
    records = []
    for sid, group in by_shard.items():
        table = rows_to_table(group, provenance)
        path = posixpath.join(root, STAGING_DIR, sid, f"{uuid.uuid4().hex}.parquet")
        write_bytes(fs, path, _table_bytes(table), durable=True)
        keys = sorted({r["key"] for r in group})
        records.append(
            {"shard_id": sid, "path": path, "n_rows": len(group), "n_keys": len(keys), "keys": keys}
        )
    return records


def clear_staging(out_url: str, storage_options: dict[str, Any] | None, shard_id: str) -> int:
    """Delete all staging files of one shard; returns how many were deleted."""
    fs, root = fs_root(out_url, storage_options)
    folder = posixpath.join(root, STAGING_DIR, _check_shard_id(shard_id))
    n = delete(fs, list_files(fs, folder))
    if is_local(fs) and os.path.isdir(folder):
        shutil.rmtree(folder, ignore_errors=True)  # also hidden temp files of crashed writers
    return n


# --------------------------------------------------------------------------------------------------
# Markers, members, sequence numbers, sources
# --------------------------------------------------------------------------------------------------


def _read_marker(fs, root: str, shard_id: str) -> dict[str, Any] | None:
    raw = read_bytes(fs, posixpath.join(root, COMMITS_DIR, f"{shard_id}.json"))
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        log.warning("unreadable commit marker for %s; treating the shard as uncommitted", shard_id)
        return None


def committed_shards(out_url: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{shard_id: marker dict}`` of every committed shard: a fresh listing of ``_commits/``, markers fetched
    concurrently (256 at a time). Markers are small (no key or member lists), so this is the driver's whole
    per-shard state. A marker read that fails transiently is retried, then raises ``OSError``: it is never
    taken for "uncommitted"."""
    fs, root = fs_root(out_url, storage_options)
    paths = [p for p in list_files(fs, posixpath.join(root, COMMITS_DIR)) if p.endswith(".json")]
    out: dict[str, dict[str, Any]] = {}
    for path, raw in cat_many(fs, paths, what="commit marker"):
        try:
            marker = json.loads(raw)
        except ValueError:
            log.warning("unreadable commit marker %s; shard treated as uncommitted", path)
            continue
        out[posixpath.basename(path)[: -len(".json")]] = marker
    return out


def next_seq(markers: Mapping[str, Mapping[str, Any]]) -> int:
    """The next free commit sequence number: ``max(seq of the markers) + 1``; 1 for an empty output, so no
    image or annotation id is ever 0 (some COCO tools take id 0 for "none")."""
    return max((int(m.get("seq", 0)) for m in markers.values()), default=0) + 1


def load_members(
    out_url: str, storage_options: dict[str, Any] | None, marker: Mapping[str, Any]
) -> list[str]:
    """The image URLs a committed image-folder shard labelled (``_members/<shard_id>.json``; older markers
    carried them inline as ``members``)."""
    if marker.get("members"):
        return list(marker["members"])
    rel = marker.get("members_file")
    if not rel:
        return []
    fs, root = fs_root(out_url, storage_options)
    raw = read_bytes(fs, posixpath.join(root, rel))
    if raw is None:
        raise CommitError(f"member list {rel} of committed shard {marker.get('shard_id')} is missing")
    return list(json.loads(raw))


def _source_stamp(info: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if info is None:
        return None
    etag = info.get("ETag") or info.get("etag") or info.get("md5Hash")
    if etag:
        return {"size": int(info.get("size") or 0), "etag": str(etag).strip('"')}
    mtime = info.get("mtime", info.get("LastModified", info.get("updated")))
    if hasattr(mtime, "isoformat"):
        mtime = mtime.isoformat()
    return {"size": int(info.get("size") or 0), "mtime": mtime}


def source_stamps(
    shards: Sequence[Any], storage_options: dict[str, Any] | None
) -> dict[str, dict[str, Any] | None]:
    """``{shard_id: stamp}`` of the shards' sources, from one listing per folder (no file is opened).

    A tar's stamp is ``{"size", "etag"}`` (object stores) or ``{"size", "mtime"}`` (local files); an image
    shard's is ``{"n", "digest"}``: sha1 over its members' ``url, size, etag or mtime`` lines. A stamp is
    None when the file (or one member) is not found. Recorded in the marker (``source``); a later run
    compares it with :func:`source_changed`.
    """
    from fsspec.core import url_to_fs

    urls: list[str] = []
    for shard in shards:
        kind, _ = _shard_kind_root(shard)
        urls.extend(_attr(shard, "members") or () if kind == "images" else (str(_attr(shard, "url")),))
    infos: dict[str, Mapping[str, Any]] = {}
    by_fs: dict[str, tuple[Any, dict[str, list[str]]]] = {}
    for url in urls:
        proto = url.split("://", 1)[0] if "://" in url else "file"
        if proto not in by_fs:
            by_fs[proto] = (url_to_fs(url, **(storage_options or {}))[0], {})
        fs, parents = by_fs[proto]
        path = fs._strip_protocol(url)
        parents.setdefault(posixpath.dirname(path), []).append(url)
    for fs, parents in by_fs.values():
        for parent, members in parents.items():
            try:
                listing = {e["name"].rstrip("/"): e for e in fs.ls(parent, detail=True, refresh=True)}
            except FileNotFoundError:
                continue
            except Exception as exc:  # noqa: BLE001 - a stamp is informative: unknown, not a failed run
                log.warning("cannot list %s for source stamps (%s: %s); their changes go unnoticed this run",
                            parent, type(exc).__name__, exc)  # fmt: skip
                continue
            for url in members:
                entry = listing.get(fs._strip_protocol(url).rstrip("/"))
                if entry is not None:
                    infos[url] = entry
    stamps: dict[str, dict[str, Any] | None] = {}
    for shard in shards:
        _, sid = _shard_fields(shard)
        kind, _ = _shard_kind_root(shard)
        if kind != "images":
            stamps[sid] = _source_stamp(infos.get(str(_attr(shard, "url"))))
            continue
        members = list(_attr(shard, "members") or ())
        lines = []
        for url in members:
            stamp = _source_stamp(infos.get(url))
            if stamp is None:
                lines = None
                break
            lines.append(f"{url}\t{stamp['size']}\t{stamp.get('etag', stamp.get('mtime'))}")
        stamps[sid] = (
            None
            if lines is None
            else {"n": len(members), "digest": hashlib.sha1("\n".join(lines).encode()).hexdigest()}
        )
    return stamps


def source_changed(marker: Mapping[str, Any], stamp: Mapping[str, Any] | None) -> bool:
    """True when both the marker's ``source`` and ``stamp`` are known and differ."""
    recorded = marker.get("source")
    return recorded is not None and stamp is not None and dict(recorded) != dict(stamp)


def begin_replacement(
    out_url: str, storage_options: dict[str, Any] | None, shard_id: str, *, mode: Replace, run_id: str
) -> None:
    """Record that a committed shard is about to be replaced (``_replacing/<shard_id>.json``); the commit that
    replaces it deletes the record, a crash leaves it for the next run (:func:`pending_replacements`)."""
    fs, root = fs_root(out_url, storage_options)
    body = {"shard_id": _check_shard_id(shard_id), "mode": mode, "run_id": run_id, "since": utc_now()}
    write_bytes(fs, posixpath.join(root, REPLACING_DIR, f"{shard_id}.json"), json_bytes(body))


def pending_replacements(out_url: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{shard_id: record}`` of replacements an interrupted run left unfinished."""
    fs, root = fs_root(out_url, storage_options)
    paths = [p for p in list_files(fs, posixpath.join(root, REPLACING_DIR)) if p.endswith(".json")]
    out = {}
    for path, raw in cat_many(fs, paths, what="replacement record"):
        try:
            out[posixpath.basename(path)[: -len(".json")]] = json.loads(raw)
        except ValueError:
            out[posixpath.basename(path)[: -len(".json")]] = {"mode": "relabel"}
    return out


def _end_replacement(fs, root: str, shard_id: str) -> None:
    delete(fs, [posixpath.join(root, REPLACING_DIR, f"{shard_id}.json")])


# --------------------------------------------------------------------------------------------------
# Commit
# --------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    """One input of a commit: the committed Parquet (``base``) or a staging file."""

    path: str
    base: bool = False
    data: bytes | None = None  # object stores: the staging file's bytes, kept while they are small in total
    keys: pa.Table | None = None  # object stores: its pass-1 columns, read from the bytes fetched once

    def parquet(self, fs) -> pq.ParquetFile:
        if self.data is not None:
            return pq.ParquetFile(pa.BufferReader(self.data))
        return pq.ParquetFile(fs.open(self.path, "rb"))


def _check_version(path: str, schema: pa.Schema) -> None:
    version = (schema.metadata or {}).get(METADATA_VERSION_KEY, b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise CommitError(f"staging file {path} has schema version {version}, expected {SCHEMA_VERSION}")


def _iter_sources(
    fs, sources: list[_Source], columns: list[str] | None, batch_rows: int
) -> Iterator[tuple[int, int, pa.Table]]:
    """``(source index, first row, table)`` batches of every source in order (bounded memory)."""
    for idx, src in enumerate(sources):
        if columns == _PASS1_COLUMNS and src.keys is not None:
            yield idx, 0, src.keys
            continue
        pf = src.parquet(fs)
        try:
            _check_version(src.path, pf.schema_arrow)
            offset = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                yield idx, offset, pa.Table.from_batches([batch])
                offset += batch.num_rows
        finally:
            pf.close()


def _prefetch_staging(fs, paths: list[str]) -> list[_Source]:
    """Staging sources. On object stores the (small) files are fetched concurrently, 64 at a time; their pass-1
    columns are read from those bytes, and the bytes kept while they total 64 MiB (else fetched again in pass 2:
    at most two GETs per file)."""
    if is_local(fs):
        return [_Source(p) for p in paths]
    sources, budget = [], _PREFETCH_BYTES
    for path, data in cat_many(fs, paths, chunk=64, what="staging file"):
        pf = pq.ParquetFile(pa.BufferReader(data))
        _check_version(path, pf.schema_arrow)
        keys = pf.read(columns=_PASS1_COLUMNS)
        keep = data if budget >= len(data) else None
        budget -= len(data) if keep is not None else 0
        sources.append(_Source(path, data=keep, keys=keys))
    if len(sources) != len(paths):
        raise CommitError(f"{len(paths) - len(sources)} staging file(s) vanished while committing")
    return sources


def _winners(
    fs,
    sources: list[_Source],
    best: dict[str, tuple[int, int, int]],
    rank_of: dict[str, int],
    seq: int,
    schema: pa.Schema,
    batch_rows: int,
) -> Iterator[tuple[pa.Table, bool]]:
    """Pass 2's input: ``(rows, from the base)`` batches of the winning rows in source order, final ``image_id``."""
    for idx, offset, table in _iter_sources(fs, sources, None, batch_rows):
        keys = table.column("key").to_pylist()
        take = [i for i, k in enumerate(keys) if best[k][1:] == (idx, offset + i)]
        if take:
            sub = table.take(pa.array(take, pa.int64())).select(list(COLUMNS))
            ids = pa.array([image_id(seq, rank_of[keys[i]]) for i in take], pa.int64())
            yield sub.set_column(COLUMNS.index("image_id"), "image_id", ids).cast(schema), sources[idx].base


def _write_parquet(
    raw, schema: pa.Schema, batches: Iterator[tuple[pa.Table, bool]], sink: _Pass2Sink
) -> tuple[str, int]:
    """Write the batches through a ParquetWriter (row groups of about 1024 rows / 64 MiB) to ``raw``, handing each
    to ``sink``; returns the file's sha256 and size."""
    out = _HashingWriter(raw)
    writer = pq.ParquetWriter(out, schema, compression=_PARQUET_COMPRESSION)
    buffered: list[pa.Table] = []
    try:
        for sub, from_base in batches:
            sink.add(sub, from_base)
            buffered.append(sub)
            if (
                sum(t.num_rows for t in buffered) >= _ROW_GROUP_ROWS
                or sum(t.nbytes for t in buffered) >= _ROW_GROUP_BYTES
            ):
                writer.write_table(pa.concat_tables(buffered))
                buffered = []
        if buffered:
            writer.write_table(pa.concat_tables(buffered))
    finally:
        writer.close()  # on an error too: the temp file is then discarded, never published
    return out.sha.hexdigest(), out.n


class _Pass2Sink:
    """Pass 2's per-row outputs of one shard: the marker's counts, the COCO fragment lines (a local file) and the
    panoptic PNGs (written batch by batch; a retry keeps the PNGs of the rows it keeps)."""

    def __init__(self, fs, root: str, *, shard: tuple[str, str, str, str], seq: int, names: dict[str, str],
                 known: set[int] | None, fragment: str | None) -> None:  # fmt: skip
        self.fs, self.root, self.seq, self.names, self.known = fs, root, seq, names, known
        self.shard_url, self.sid, self.kind, self.shard_root = shard
        self.fragment_path = fragment
        self.fragment = open(fragment, "wb") if fragment else None
        self.tally: Counter = Counter()
        self.by_kind: Counter = Counter()
        self.reasons: Counter = Counter()
        self.categories: Counter = Counter()
        self.n_instances = 0
        self.copied_images = False  # --copy-images: COCO file_name is the copy's name under <output>/images/

    def add(self, rows: pa.Table, from_base: bool) -> None:
        pngs: dict[str, bytes] = {}
        for row in rows.to_pylist():
            self.tally["segments"] += len(row["segments"] or ())
            if row["error"] is not None:
                self.tally["errors"] += 1
                self.tally["retryable"] += bool(row.get("retryable"))
                self.by_kind[row.get("error_kind") or "error"] += 1
                self.reasons[error_reason(row["error"])] += 1
                continue
            self.tally["labelled"] += 1
            self.categories.update(s["category_name"] for s in row["segments"] or ())
            if self.known is not None:
                used = {s["category_id"] for s in row["segments"] or ()} | {
                    s["category_id"] for s in row["instances"] or ()
                }
                if used - self.known:
                    raise CommitError(
                        f"shard {self.sid}: category ids {sorted(used - self.known)[:10]} are not in the vocabulary"
                    )
            if self.fragment is not None:
                self._coco(row, pngs, keep_png=from_base)
            self.n_instances += len(row["instances"] or ())
        write_many(self.fs, pngs)

    def _coco(self, row: dict[str, Any], pngs: dict[str, bytes], keep_png: bool) -> None:
        key, ext = row["key"], row["image_ext"]
        png_file = f"{self.sid}/{self.names[key]}"
        record = fragment_record(
            row,
            seq=self.seq,
            first_instance=self.n_instances,
            file_name=copied_image_name(self.kind, self.sid, key, ext)
            if self.copied_images
            else default_file_name(self.kind, self.shard_url, key, ext),
            coco_url=row.get("image_url")
            or default_coco_url(self.kind, self.shard_url, self.shard_root, key, ext),
            png_file=png_file,
        )
        self.fragment.write(json_bytes(record) + b"\n")
        if not keep_png:
            png = row["panoptic_png"]
            if png is None:  # not kept in the Parquet: rebuild from the (non-overlapping) segment RLEs
                png = panoptic_to_png(segments_to_panoptic(row["segments"], row["height"], row["width"]))
            pngs[posixpath.join(self.root, PNG_DIR, png_file)] = png

    def close(self) -> None:
        if self.fragment is not None and not self.fragment.closed:
            self.fragment.close()


def write_shard_outputs(
    out_url: str,
    storage_options: dict[str, Any] | None,
    *,
    shard: Any,
    expected_keys: int | Collection[str] | None,
    provenance: RunProvenance,
    categories: list[dict[str, Any]] | None = None,
    write_coco: bool = True,
    seq: int | None = None,
    source: Mapping[str, Any] | None = None,
    replace: Replace | None = None,
    retry_keys: Collection[str] | None = None,
    batch_rows: int = 256,
) -> PreparedCommit:
    """Everything of :func:`commit_shard` but the marker and the cleanup (streaming, bounded memory).

    Exposed so that a crash between the outputs and the marker can be reproduced in tests. Arguments as in
    :func:`commit_shard`; ``batch_rows`` is the pass-2 batch size.
    """
    shard_url, sid = _shard_fields(shard)
    kind, shard_root = _shard_kind_root(shard)
    fs, root = fs_root(out_url, storage_options)
    schema = output_schema(provenance)
    known = _category_ids(categories) if categories is not None else None

    # 0. what this commit builds on: nothing, or (retry) the committed Parquet.
    marker = _read_marker(fs, root, sid) if replace is not None else None
    if replace is not None and marker is None:
        raise CommitError(f"shard {sid}: replace={replace!r} but the shard is not committed")
    if seq is None:
        seq = (
            int(marker["seq"]) if marker is not None else next_seq(committed_shards(out_url, storage_options))
        )
    retry = set(retry_keys or ()) if replace == "retry" else None
    staged = list_files(fs, posixpath.join(root, STAGING_DIR, sid))
    expects_nothing = expected_keys == 0 or (_is_collection(expected_keys) and len(expected_keys) == 0)
    if not staged and not expects_nothing and replace != "retry":
        raise CommitError(f"shard {sid}: no staging files under {STAGING_DIR}/{sid}; nothing to commit")
    sources = _prefetch_staging(fs, staged)
    if replace == "retry":
        sources.insert(0, _Source(posixpath.join(root, marker["parquet"]), base=True))

    # 1. pass 1: one winner per key from the key / error columns only.
    #    rank: base row kept (-1) < labelled (0) < error (1) < base row being retried (2); then source, row.
    best: dict[str, tuple[int, int, int]] = {}
    ext_of: dict[str, str | None] = {}
    staged_keys: set[str] = set()
    n_staged_rows = 0
    for idx, offset, table in _iter_sources(fs, sources, _PASS1_COLUMNS, 65536):
        src = sources[idx]
        pairs = set(zip(table.column("shard").to_pylist(), table.column("shard_id").to_pylist(), strict=True))
        foreign = (
            {p for p in pairs if p != (shard_url, sid)} if not src.base else {p for p in pairs if p[1] != sid}
        )
        if foreign:
            raise CommitError(f"shard {sid}: {src.path} holds rows of other shards {sorted(foreign)[:3]}")
        keys = table.column("key").to_pylist()
        labelled = table.column("error").is_null().to_pylist()
        exts = table.column("image_ext").to_pylist()
        for i, (key, ok, ext) in enumerate(zip(keys, labelled, exts, strict=True)):
            if src.base:
                level = 2 if key in retry else -1
            else:
                level = 0 if ok else 1
                staged_keys.add(key)
                n_staged_rows += 1
            rank = (level, idx, offset + i)
            if key not in best or rank < best[key]:
                best[key] = rank
                ext_of[key] = ext
    if retry is not None:
        unexpected = staged_keys - retry
        if unexpected:
            raise CommitError(f"shard {sid}: staged keys {sorted(unexpected)[:5]} were not being retried")
        check_keys = staged_keys
    else:
        check_keys = set(best)
    if _is_collection(expected_keys):
        want = set(expected_keys)
        if check_keys != want:
            raise CommitError(
                f"shard {sid}: staged keys differ from the expected ones (missing {sorted(want - check_keys)[:5]}, "
                f"unexpected {sorted(check_keys - want)[:5]}); not committed"
            )
    elif expected_keys is not None and len(check_keys) != expected_keys:
        raise CommitError(
            f"shard {sid}: {len(check_keys)} distinct keys staged, expected {expected_keys}; not committed "
            "(some samples are missing: rerun the shard)"
        )
    n_dropped = n_staged_rows - len(staged_keys)
    del staged_keys
    order = sorted(best)
    rank_of = {key: i for i, key in enumerate(order)}
    names = png_names((key, ext_of[key]) for key in order) if write_coco else {}
    del order, ext_of

    # 2. pass 2: stream the winners into the Parquet, the PNGs and the COCO fragment.
    parquet_rel = f"{PARQUET_DIR}/{sid}.parquet"
    part_rel = f"{PARTS_DIR}/{sid}{FRAGMENT_SUFFIX}" if write_coco else None
    with tempfile.TemporaryDirectory(prefix="odise-commit-") as tmp:
        sink = _Pass2Sink(fs, root, shard=(shard_url, sid, kind, shard_root), seq=seq, names=names, known=known,
                          fragment=os.path.join(tmp, "fragment.jsonl") if write_coco else None)  # fmt: skip
        sink.copied_images = bool(provenance.settings.get("copy_images"))  # the output's setting (provenance)
        try:
            winners = _winners(fs, sources, best, rank_of, seq, schema, batch_rows)
            with open_atomic(fs, posixpath.join(root, parquet_rel)) as raw:
                digest, size = _write_parquet(raw, schema, winners, sink)
        finally:
            sink.close()
        if part_rel is not None:
            with (
                open(sink.fragment_path, "rb") as src,
                open_atomic(fs, posixpath.join(root, part_rel)) as dst,
            ):
                shutil.copyfileobj(src, dst)
    tally = sink.tally

    # 3. PNGs of an earlier attempt / version that are not this shard's any more (deleted after the marker).
    stale: tuple[str, ...] = ()
    if write_coco:
        wanted = {posixpath.join(root, PNG_DIR, sid, n) for n in names.values()}
        stale = tuple(p for p in list_files(fs, posixpath.join(root, PNG_DIR, sid)) if p not in wanted)

    # 4. the marker's content.
    n_images = len(best)
    members = tuple(_attr(shard, "members") or ()) if kind == "images" else ()
    if replace == "retry" and kind == "images" and marker is not None:
        members = tuple(load_members(out_url, storage_options, marker))  # the shard keeps its members
    info = CommitInfo(
        shard=shard_url,
        shard_id=sid,
        n_images=n_images,
        n_labelled=tally["labelled"],
        n_errors=tally["errors"],
        n_segments=tally["segments"],
        n_instances=sink.n_instances,
        parquet=parquet_rel,
        parquet_sha256=digest,
        parquet_bytes=size,
        coco_part=part_rel,
        run_id=provenance.run_id,
        schema_version=SCHEMA_VERSION,
        n_staging_files=len(staged),
        n_duplicates_dropped=n_dropped,
        committed_at=utc_now(),
        seq=int(seq),
        kind=kind,
        root=shard_root,
        # a retry keeps the shard's recorded source (its other rows were labelled from it); else the given stamp
        source=(marker or {}).get("source") if replace == "retry" else (dict(source) if source else None),
        n_retryable=tally["retryable"],
        n_errors_by_kind=dict(sorted(sink.by_kind.items())),
        errors_by_reason=dict(sink.reasons.most_common(20)),
        members_file=f"{MEMBERS_DIR}/{sid}.json" if kind == "images" else None,
        n_members=len(members),
        replaced=replace,
        category_counts=dict(sink.categories),
    )
    return PreparedCommit(info=info, staging_files=tuple(staged), members=members, stale_pngs=stale)


def write_commit_marker(
    out_url: str, storage_options: dict[str, Any] | None, info: CommitInfo, members: Sequence[str] = ()
) -> str:
    """Write the member list (image shards) and then ``_commits/<shard_id>.json`` atomically; from now on the
    shard is committed."""
    fs, root = fs_root(out_url, storage_options)
    sid = _check_shard_id(info.shard_id)
    if info.members_file:
        write_bytes(fs, posixpath.join(root, info.members_file), json_bytes(list(members)))
    path = posixpath.join(root, COMMITS_DIR, f"{sid}.json")
    write_bytes(fs, path, json.dumps(info.to_marker(), indent=1, sort_keys=True).encode())
    return path


def commit_shard(
    out_url: str,
    storage_options: dict[str, Any] | None,
    *,
    shard: Any,
    expected_keys: int | Collection[str] | None,
    provenance: RunProvenance,
    categories: list[dict[str, Any]] | None = None,
    write_coco: bool = True,
    seq: int | None = None,
    source: Mapping[str, Any] | None = None,
    replace: Replace | None = None,
    retry_keys: Collection[str] | None = None,
) -> CommitInfo:
    """Commit one shard exactly once (see the module doc for the protocol).

    Args:
        out_url, storage_options: the output root and its fsspec options.
        shard: a :class:`~pipeline.shards.ShardRef` (or anything with ``url`` and ``shard_id``, or a
            dict with those keys; ``kind`` / ``root`` / ``members`` for image shards).
        expected_keys: number of distinct keys the staging files must have (``RawSample.shard_total``),
            or the exact set of keys (stronger); None skips the check (manual recovery only). For
            ``replace="retry"`` this is about the staged (relabelled) keys only.
        provenance: stored in the final Parquet's schema metadata; its ``run_id`` goes in the marker.
        categories: COCO categories; when given, every category id used must be one of them.
        write_coco: write the PNGs and the COCO fragment (needed by :func:`finalize_coco`).
        seq: the shard's commit sequence number (the driver hands out :func:`next_seq`); default: the
            marker's for a replacement, else ``next_seq`` of the output's markers (one writer only!).
        source: the shard's source stamp (:func:`source_stamps`), stored in the marker.
        replace: None (first commit; a committed shard is left as it is), ``"retry"`` (relabel the
            ``retry_keys`` rows of the committed shard; the other rows are kept as they were) or
            ``"relabel"`` (rebuild the committed shard from new staging files). Both keep the seq.
        retry_keys: the keys being relabelled (``replace="retry"``).

    Returns:
        The :class:`CommitInfo` written to the marker (or the existing one if already committed).

    Raises:
        CommitError: wrong number of distinct keys, foreign rows or unknown category ids; nothing of
            the shard is marked committed.
    """
    _, sid = _shard_fields(shard)
    fs, root = fs_root(out_url, storage_options)
    if replace is None:
        # committed already: the first commit is final; drop leftovers of late or retried writers.
        marker = _read_marker(fs, root, sid)
        if marker is not None:
            n = clear_staging(out_url, storage_options, sid)
            if n:
                log.info("shard %s already committed; deleted %d leftover staging files", sid, n)
            return CommitInfo.from_marker(marker)
    prepared = write_shard_outputs(
        out_url,
        storage_options,
        shard=shard,
        expected_keys=expected_keys,
        provenance=provenance,
        categories=categories,
        write_coco=write_coco,
        seq=seq,
        source=source,
        replace=replace,
        retry_keys=retry_keys,
    )
    test_pause("commit", sid)
    # the marker, last.
    write_commit_marker(out_url, storage_options, prepared.info, prepared.members)
    # staging files we read (files that arrive later are removed by the next commit / cleanup), stale PNGs.
    delete(fs, prepared.staging_files)
    delete(fs, prepared.stale_pngs)
    remove_empty_dir(fs, posixpath.join(root, STAGING_DIR, sid))
    if replace is not None:
        _end_replacement(fs, root, sid)
    return prepared.info


# --------------------------------------------------------------------------------------------------
# Cleanup
# --------------------------------------------------------------------------------------------------


def prepare_shard_for_rerun(
    out_url: str, storage_options: dict[str, Any] | None, shard_id: str, *, committed: bool | None = None
) -> dict[str, Any]:
    """Drop every leftover of an *uncommitted* shard (staging, PNGs, fragment, member list, final Parquet).

    Call before re-processing a shard that an interrupted run left behind. A committed shard is left
    alone (``committed``: already known, else its marker is read). Must not run while another process is
    still writing this shard.

    Returns:
        ``{"shard_id", "committed": bool, "deleted": number of files deleted}``.
    """
    fs, root = fs_root(out_url, storage_options)
    _check_shard_id(shard_id)
    if committed is None:
        committed = _read_marker(fs, root, shard_id) is not None
    if committed:
        return {"shard_id": shard_id, "committed": True, "deleted": 0}
    deleted = clear_staging(out_url, storage_options, shard_id)
    deleted += delete(fs, list_files(fs, posixpath.join(root, PNG_DIR, shard_id)))
    singles = [
        posixpath.join(root, PARTS_DIR, f"{shard_id}{FRAGMENT_SUFFIX}"),
        posixpath.join(root, PARQUET_DIR, f"{shard_id}.parquet"),
        posixpath.join(root, MEMBERS_DIR, f"{shard_id}.json"),
        posixpath.join(root, REPLACING_DIR, f"{shard_id}.json"),
    ]
    for p in singles:
        fs.invalidate_cache(p)
    deleted += delete(fs, [p for p in singles if fs.exists(p)])
    if is_local(fs):
        shutil.rmtree(posixpath.join(root, PNG_DIR, shard_id), ignore_errors=True)
        for folder in (posixpath.join(root, d) for d in (PARQUET_DIR, PARTS_DIR, COMMITS_DIR, MEMBERS_DIR)):
            if os.path.isdir(folder):  # hidden temp files of a writer that crashed mid-write
                for name in os.listdir(folder):
                    if name.startswith(f".{shard_id}.") and ".tmp-" in name:
                        os.remove(os.path.join(folder, name))
    return {"shard_id": shard_id, "committed": False, "deleted": deleted}


def clean_uncommitted(
    out_url: str,
    storage_options: dict[str, Any] | None,
    *,
    committed: Mapping[str, Any] | None = None,
) -> list[str]:
    """Before a (re)run: clean every uncommitted shard's leftovers and committed shards' stray staging.

    ``committed``: the markers when already read (:func:`committed_shards`). Lists ``_staging/``,
    ``coco/panoptic/``, ``parquet/``, ``coco/_parts/`` and ``_members/`` (no file is read). Returns the ids of
    the uncommitted shards that had leftovers. Must not run concurrently with a run writing to the same output.
    """
    fs, root = fs_root(out_url, storage_options)
    done = set(committed if committed is not None else committed_shards(out_url, storage_options))
    staging = set(list_children(fs, posixpath.join(root, STAGING_DIR)))
    seen = set(staging)
    seen.update(list_children(fs, posixpath.join(root, PNG_DIR)))
    for folder, suffix in (
        (PARQUET_DIR, ".parquet"),
        (PARTS_DIR, FRAGMENT_SUFFIX),
        (PARTS_DIR, ".json"),
        (MEMBERS_DIR, ".json"),
    ):
        seen.update(
            n[: -len(suffix)] for n in list_children(fs, posixpath.join(root, folder)) if n.endswith(suffix)
        )
    cleaned = []
    for sid in sorted(seen):
        if not _SHARD_ID.match(sid):
            continue
        if sid in done:
            if sid in staging:
                clear_staging(out_url, storage_options, sid)
        else:
            prepare_shard_for_rerun(out_url, storage_options, sid, committed=False)
            cleaned.append(sid)
    return cleaned


# --------------------------------------------------------------------------------------------------
# Provenance and summary
# --------------------------------------------------------------------------------------------------


def write_provenance(
    out_url: str,
    storage_options: dict[str, Any] | None,
    provenance: RunProvenance,
    *,
    allow_mismatch: bool = False,
) -> RunProvenance:
    """Write ``provenance.json`` unless present; refuse to mix labels of different models/vocabularies.

    Returns:
        The provenance now on disk (the existing one when it is compatible).

    Raises:
        ProvenanceMismatchError: the existing file has a different :meth:`RunProvenance.label_fingerprint`
            (unless ``allow_mismatch``, which overwrites it).
    """
    fs, root = fs_root(out_url, storage_options)
    path = posixpath.join(root, "provenance.json")
    if not allow_mismatch:
        existing = check_provenance(out_url, storage_options, provenance)
        if existing is not None:
            return existing
    write_bytes(fs, path, (provenance.to_json() + "\n").encode())
    return provenance


def check_provenance(
    out_url: str, storage_options: dict[str, Any] | None, provenance: RunProvenance
) -> RunProvenance | None:
    """The output's existing provenance if compatible with ``provenance`` (None when there is none yet).

    Raises:
        ProvenanceMismatchError: the output holds labels of another model / weights / vocabulary /
            thresholds; the message lists what differs.
    """
    fs, root = fs_root(out_url, storage_options)
    raw = read_bytes(fs, posixpath.join(root, "provenance.json"))
    if raw is None:
        return None
    existing = RunProvenance.from_json(raw)
    old, new = existing.label_fingerprint(), provenance.label_fingerprint()
    diff = sorted(k for k in old if old[k] != new[k])
    if diff:
        raise ProvenanceMismatchError(
            f"{out_url} already holds labels made with different {', '.join(diff)} (see its provenance.json); "
            "use a new output folder, or allow_provenance_mismatch to relabel into it anyway"
        )
    return existing


def error_reason(error: str) -> str:
    """The kind of an error record: its text without the trailing ``[location]`` and the details after ``:``
    (``"truncated image [file:///x/a.jpg]"`` -> ``"truncated image"``)."""
    text = error.strip()
    if text.endswith("]") and " [" in text:
        text = text[: text.rindex(" [")]
    return text.split(":", 1)[0].strip()[:120] or "error"


_TOTALS = (
    "n_images",
    "n_labelled",
    "n_errors",
    "n_segments",
    "n_instances",
    "n_duplicates_dropped",
    "n_retryable",
)


def write_run_summary(
    out_url: str,
    storage_options: dict[str, Any] | None,
    *,
    provenance: RunProvenance | None = None,
    shards: Sequence[Any] | None = None,
    extra: dict[str, Any] | None = None,
    markers: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json`` from the commit markers alone (no Parquet is opened) and return it.

    Keys: ``run_id``, ``schema_version``, ``written_at``, ``n_shards_committed``, ``n_images``,
    ``n_labelled``, ``n_errors``, ``n_segments``, ``n_instances``, ``n_duplicates_dropped``, ``n_retryable``
    (error rows ``--retry-errors`` would relabel), ``errors_by_kind`` (``error_kind`` -> count),
    ``errors_by_reason`` (:func:`error_reason` -> count, 20 most common; per shard the marker keeps its 20 most
    common), and when ``shards`` (the run's input) is given ``n_shards_listed``, ``pending_shards`` (listed,
    not committed) and ``stale_shards`` (committed, no longer listed); plus ``extra``.

    Args:
        markers: ``{shard_id: marker}`` when the caller has them (default: :func:`committed_shards`).
    """
    fs, root = fs_root(out_url, storage_options)
    if markers is None:
        markers = committed_shards(out_url, storage_options)
    totals: Counter = Counter()
    kinds: Counter = Counter()
    reasons: Counter = Counter()
    for m in markers.values():
        for k in _TOTALS:
            totals[k] += int(m.get(k, 0) or 0)
        kinds.update(m.get("n_errors_by_kind") or {})
        reasons.update(m.get("errors_by_reason") or {})
    summary: dict[str, Any] = {
        "run_id": provenance.run_id if provenance else None,
        "schema_version": SCHEMA_VERSION,
        "written_at": utc_now(),
        "n_shards_committed": len(markers),
        **{k: totals[k] for k in _TOTALS},
        "errors_by_kind": dict(kinds.most_common()),
        "errors_by_reason": dict(reasons.most_common(20)),
    }
    if shards is not None:
        listed = {_shard_fields(s)[1] for s in shards}
        summary["n_shards_listed"] = len(listed)
        summary["pending_shards"] = sorted(listed - set(markers))
        summary["stale_shards"] = sorted(set(markers) - listed)
    summary.update(extra or {})
    if provenance is not None:
        write_provenance(out_url, storage_options, provenance)
    write_bytes(
        fs,
        posixpath.join(root, "summary.json"),
        (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(),
    )
    return summary
