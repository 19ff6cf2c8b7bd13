"""Parquet and COCO outputs with exactly-once, atomic per-shard commits, on any fsspec URL.

Layout under ``out_url`` (local path, ``file://``, ``s3://`` ...)::

    parquet/<shard_id>.parquet            final rows of one committed shard (one file per shard)
    coco/panoptic/<shard_id>/<key>.png    COCO panoptic PNGs (key made file-safe, see key_to_filename)
    coco/_parts/<shard_id>.json           per-shard COCO fragment (images, panoptic + instance annotations)
    coco/panoptic.json, coco/instances.json   merged exports, rebuilt by finalize_coco
    _staging/<shard_id>/<uuid>.parquet    rows written by parallel write tasks, before the commit
    _commits/<shard_id>.json              commit marker, written LAST
    provenance.json, summary.json

How "never lose or duplicate a label" is kept:

* Write tasks only ever create *new* staging files (random names), each written whole in one PUT
  (object stores) or as a temp file + ``os.replace`` (local). A retried task adds a duplicate file;
  nothing is overwritten.
* :func:`commit_shard` reads every staging file of a shard, keeps exactly one row per key
  (a labelled row beats an error row; ties go to the first file in name order, then row order),
  refuses to commit unless the number of distinct keys equals ``expected_keys``, sorts by key and
  writes the shard's PNGs, COCO fragment and final Parquet under deterministic names; only then
  the marker ``_commits/<shard_id>.json``; then it deletes the staging files it read.
* A shard is committed iff its marker exists. A crash before the marker leaves a shard uncommitted:
  rerunning it (after :func:`prepare_shard_for_rerun`, or just committing again) overwrites the same
  files. A crash after the marker only leaves staging files, which later calls delete.
* Committing an already committed shard is a no-op returning the marker's :class:`CommitInfo`
  (the first commit is final; delete the marker to relabel a shard).
* Files are written atomically: locally via a hidden temp file (``.name.tmp-<uuid>``, fsync'ed for
  Parquet, fragments and markers) and ``os.replace``; on object stores as one whole-object PUT (or a
  multipart upload, which is also all-or-nothing). Hidden (``.``) and ``_`` names are skipped by
  ``pyarrow.dataset``, so ``pyarrow.dataset.dataset(f"{out}/parquet")`` only ever sees complete files.
  A Parquet file may exist briefly without its marker (between step 5 and 6 of a commit); it is
  complete and deduplicated, and :func:`clean_uncommitted` removes it if the shard is never committed.

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
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.encode import category_colour, panoptic_to_png, rle_area, segments_to_panoptic
from pipeline.schema import (
    COLUMNS,
    METADATA_VERSION_KEY,
    SCHEMA_VERSION,
    RunProvenance,
    output_schema,
    rows_to_table,
)
from pipeline.storage import (
    delete,
    fs_root,
    is_local,
    list_children,
    list_files,
    put_local_file,
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
    "clean_uncommitted",
    "clear_staging",
    "commit_shard",
    "committed_shards",
    "finalize_coco",
    "key_to_filename",
    "prepare_shard_for_rerun",
    "write_commit_marker",
    "write_provenance",
    "write_run_summary",
    "write_shard_outputs",
    "write_staging",
]

log = logging.getLogger(__name__)

STAGING_DIR = "_staging"
COMMITS_DIR = "_commits"
PARQUET_DIR = "parquet"
PARTS_DIR = "coco/_parts"
PNG_DIR = "coco/panoptic"
_SHARD_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*$")
_PARQUET_COMPRESSION = "zstd"


class CommitError(RuntimeError):
    """A shard cannot be committed (wrong number of keys, foreign rows, no staging files)."""


class ProvenanceMismatchError(ValueError):
    """The output folder already holds labels made with a different model / vocabulary / thresholds."""


@dataclass(frozen=True)
class CommitInfo:
    """What a commit wrote; stored as the marker ``_commits/<shard_id>.json``.

    Paths are relative to the output root. ``parquet_sha256`` is the hex digest of the final file.
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
    # image-folder shards only: the image URLs the shard labelled (a rerun over a grown folder skips them)
    members: tuple[str, ...] = ()

    def to_marker(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_marker(cls, marker: dict[str, Any]) -> CommitInfo:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in marker.items() if k in names}
        values["members"] = tuple(values.get("members") or ())
        return cls(**values)


@dataclass(frozen=True)
class PreparedCommit:
    """Result of :func:`write_shard_outputs`: everything but the marker is written."""

    info: CommitInfo
    staging_files: tuple[str, ...]


# --------------------------------------------------------------------------------------------------
# Small I/O helpers
# --------------------------------------------------------------------------------------------------


def _check_shard_id(shard_id: str) -> str:
    if not isinstance(shard_id, str) or not _SHARD_ID.match(shard_id):
        raise ValueError(f"unsafe shard_id {shard_id!r}: use [A-Za-z0-9._-], starting with a letter or digit")
    return shard_id


def _shard_fields(shard: Any) -> tuple[str, str]:
    """``(url, shard_id)`` of a :class:`~pipeline.shards.ShardRef`, any object with those attributes, or a dict."""
    if isinstance(shard, dict):
        return str(shard["url"]), _check_shard_id(shard["shard_id"])
    return str(shard.url), _check_shard_id(shard.shard_id)


def _shard_members(shard: Any) -> Sequence[str]:
    if isinstance(shard, dict):
        return shard.get("members") or ()
    return getattr(shard, "members", ()) or ()


def key_to_filename(key: str) -> str:
    """File-safe relative name for a sample key (no extension added).

    Keys made of safe ``/``-separated components (``[A-Za-z0-9._+=,@-]``, none starting with ``.``)
    are used as they are, sub-folders included; anything else (``..``, absolute paths, spaces,
    ``#``, non-ASCII, > 200 chars) becomes ``<sanitised>-<first 8 hex of sha1(key)>`` in one component.
    """
    parts = key.split("/")
    if key and len(key) <= 200 and all(_SAFE_COMPONENT.match(p) for p in parts):
        return key
    flat = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-")[:100] or "key"
    return f"{flat}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _table_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=_PARQUET_COMPRESSION)
    return sink.getvalue().to_pybytes()


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


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
# Commit
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


def _read_staged(fs, paths: Sequence[str], schema: pa.Schema) -> pa.Table:
    tables = []
    for path in paths:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        version = (table.schema.metadata or {}).get(METADATA_VERSION_KEY, b"?").decode()
        if version != str(SCHEMA_VERSION):
            raise CommitError(f"staging file {path} has schema version {version}, expected {SCHEMA_VERSION}")
        tables.append(table.select(list(COLUMNS)).cast(schema))
    if not tables:
        return schema.empty_table()
    return pa.concat_tables(tables)


def _deduplicate(table: pa.Table) -> tuple[pa.Table, int]:
    """One row per key (labelled beats error; then earliest row), sorted by key. Returns (table, n dropped)."""
    keys = table.column("key").to_pylist()
    labelled = table.column("error").is_null().to_pylist()
    best: dict[str, tuple[int, int]] = {}
    for idx, (key, ok) in enumerate(zip(keys, labelled, strict=True)):
        rank = (0 if ok else 1, idx)  # rows are concatenated in staging-file name order
        if key not in best or rank < best[key]:
            best[key] = rank
    order = [best[k][1] for k in sorted(best)]
    return table.take(pa.array(order, pa.int64())), len(keys) - len(order)


def _coco_file_name(shard_id: str, key: str, ext: str | None) -> str:
    if ext and not key.lower().endswith(f".{ext.lower()}"):
        return f"{shard_id}/{key}.{ext}"
    return f"{shard_id}/{key}"


def _coco_fragment(
    shard_url: str, shard_id: str, table: pa.Table, root: str
) -> tuple[dict, dict[str, bytes]]:
    """COCO fragment of the labelled rows of one shard and the PNG files ``{abs path: bytes}``."""
    images, panoptic, instances = [], [], []
    pngs: dict[str, bytes] = {}
    for row in table.filter(table.column("error").is_null()).to_pylist():
        image_id, key = int(row["image_id"]), row["key"]
        width, height = int(row["width"]), int(row["height"])
        images.append(
            {
                "id": image_id,
                "file_name": _coco_file_name(shard_id, key, row["image_ext"]),
                "width": width,
                "height": height,
            }
        )
        png_name = f"{shard_id}/{key_to_filename(key)}.png"
        png = row["panoptic_png"]
        if png is None:  # not kept in the Parquet: rebuild from the (non-overlapping) segment RLEs
            png = panoptic_to_png(segments_to_panoptic(row["segments"], height, width))
        pngs[posixpath.join(root, PNG_DIR, png_name)] = png
        panoptic.append(
            {
                "image_id": image_id,
                "file_name": png_name,
                "segments_info": [
                    {
                        "id": int(s["id"]),
                        "category_id": int(s["category_id"]),
                        "area": int(s["area"]),
                        "bbox": [float(v) for v in s["bbox"]],
                        "iscrowd": 0,
                    }
                    for s in row["segments"]
                ],
            }
        )
        for inst in row["instances"]:
            rle = {"size": [int(v) for v in inst["rle"]["size"]], "counts": inst["rle"]["counts"]}
            instances.append(
                {
                    "image_id": image_id,
                    "category_id": int(inst["category_id"]),
                    "segmentation": rle,
                    "area": float(rle_area(rle)),
                    "bbox": [float(v) for v in inst["bbox"]],
                    "iscrowd": 0,
                    "score": float(inst["score"]),
                }
            )
    fragment = {
        "shard": shard_url,
        "shard_id": shard_id,
        "images": images,
        "panoptic": panoptic,
        "instances": instances,
    }
    return fragment, pngs


def write_shard_outputs(
    out_url: str,
    storage_options: dict[str, Any] | None,
    *,
    shard: Any,
    expected_keys: int | Collection[str] | None,
    provenance: RunProvenance,
    categories: list[dict[str, Any]] | None = None,
    write_coco: bool = True,
) -> PreparedCommit:
    """Steps 1-5 of :func:`commit_shard`: everything except the marker and the staging cleanup.

    Exposed so that a crash between the outputs and the marker can be reproduced in tests.
    """
    shard_url, sid = _shard_fields(shard)
    fs, root = fs_root(out_url, storage_options)
    schema = output_schema(provenance)

    # 1. read every staging file of the shard, in name order.
    staged = list_files(fs, posixpath.join(root, STAGING_DIR, sid))
    expects_nothing = expected_keys == 0 or (_is_collection(expected_keys) and len(expected_keys) == 0)
    if not staged and not expects_nothing:
        raise CommitError(f"shard {sid}: no staging files under {STAGING_DIR}/{sid}; nothing to commit")
    table = _read_staged(fs, staged, schema)
    foreign = {
        (u, s)
        for u, s in zip(table.column("shard").to_pylist(), table.column("shard_id").to_pylist(), strict=True)
    }
    foreign -= {(shard_url, sid)}
    if foreign:
        raise CommitError(f"shard {sid}: staging files hold rows of other shards {sorted(foreign)[:3]}")

    # 2. one row per key, sorted; check the count.
    table, n_dropped = _deduplicate(table)
    if _is_collection(expected_keys):
        got, want = set(table.column("key").to_pylist()), set(expected_keys)
        if got != want:
            raise CommitError(
                f"shard {sid}: staged keys differ from the expected ones (missing {sorted(want - got)[:5]}, "
                f"unexpected {sorted(got - want)[:5]}); not committed"
            )
    elif expected_keys is not None and table.num_rows != expected_keys:
        raise CommitError(
            f"shard {sid}: {table.num_rows} distinct keys staged, expected {expected_keys}; not committed "
            "(some samples are missing: rerun the shard)"
        )
    if categories is not None:
        known = _category_ids(categories)
        used = {s["category_id"] for v in table.column("segments").to_pylist() for s in v}
        used |= {s["category_id"] for v in table.column("instances").to_pylist() for s in v}
        if used - known:
            raise CommitError(
                f"shard {sid}: category ids {sorted(used - known)[:10]} are not in the vocabulary"
            )

    # 3. PNGs and the COCO fragment (PNGs of an earlier, interrupted attempt that are no longer wanted go).
    part_rel = None
    n_instances = sum(len(v) for v in table.column("instances").to_pylist())
    if write_coco:
        fragment, pngs = _coco_fragment(shard_url, sid, table, root)
        old = set(list_files(fs, posixpath.join(root, PNG_DIR, sid)))
        delete(fs, sorted(old - set(pngs)))
        write_many(fs, pngs)
        part_rel = f"{PARTS_DIR}/{sid}.json"
        write_bytes(fs, posixpath.join(root, part_rel), _json_bytes(fragment))

    # 4. the final Parquet, whole, under its final name.
    data = _table_bytes(table.replace_schema_metadata(schema.metadata))
    parquet_rel = f"{PARQUET_DIR}/{sid}.parquet"
    write_bytes(fs, posixpath.join(root, parquet_rel), data)

    # 5. the marker's content.
    n_labelled = table.column("error").null_count
    info = CommitInfo(
        shard=shard_url,
        shard_id=sid,
        n_images=table.num_rows,
        n_labelled=n_labelled,
        n_errors=table.num_rows - n_labelled,
        n_segments=sum(len(v) for v in table.column("segments").to_pylist()),
        n_instances=n_instances,
        parquet=parquet_rel,
        parquet_sha256=hashlib.sha256(data).hexdigest(),
        parquet_bytes=len(data),
        coco_part=part_rel,
        run_id=provenance.run_id,
        schema_version=SCHEMA_VERSION,
        n_staging_files=len(staged),
        n_duplicates_dropped=n_dropped,
        committed_at=utc_now(),
        members=tuple(_shard_members(shard)),
    )
    return PreparedCommit(info=info, staging_files=tuple(staged))


def write_commit_marker(out_url: str, storage_options: dict[str, Any] | None, info: CommitInfo) -> str:
    """Step 6: write ``_commits/<shard_id>.json`` atomically; from now on the shard is committed."""
    fs, root = fs_root(out_url, storage_options)
    path = posixpath.join(root, COMMITS_DIR, f"{_check_shard_id(info.shard_id)}.json")
    write_bytes(fs, path, json.dumps(info.to_marker(), indent=2, sort_keys=True).encode())
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
) -> CommitInfo:
    """Commit one shard exactly once (see the module doc for the protocol).

    Args:
        out_url, storage_options: the output root and its fsspec options.
        shard: a :class:`~pipeline.shards.ShardRef` (or anything with ``url`` and ``shard_id``, or a
            dict with those keys).
        expected_keys: number of distinct keys the shard must have (``RawSample.shard_total``),
            or the exact set of keys (stronger); None skips the check (manual recovery only).
        provenance: stored in the final Parquet's schema metadata; its ``run_id`` goes in the marker.
        categories: COCO categories; when given, every category id used must be one of them.
        write_coco: write the PNGs and the COCO fragment (needed by :func:`finalize_coco`).

    Returns:
        The :class:`CommitInfo` written to the marker (or the existing one if already committed).

    Raises:
        CommitError: wrong number of distinct keys, foreign rows or unknown category ids; nothing of
            the shard is marked committed.
    """
    _, sid = _shard_fields(shard)
    fs, root = fs_root(out_url, storage_options)
    # 0. committed already: the first commit is final; drop leftovers of late or retried writers.
    marker = _read_marker(fs, root, sid)
    if marker is not None:
        n = clear_staging(out_url, storage_options, sid)
        if n:
            log.info("shard %s already committed; deleted %d leftover staging files", sid, n)
        return CommitInfo.from_marker(marker)
    # 1-5. outputs.
    prepared = write_shard_outputs(
        out_url,
        storage_options,
        shard=shard,
        expected_keys=expected_keys,
        provenance=provenance,
        categories=categories,
        write_coco=write_coco,
    )
    # 6. the marker, last.
    write_commit_marker(out_url, storage_options, prepared.info)
    # 7. staging files we read (files that arrive later are removed by the next commit / cleanup).
    delete(fs, prepared.staging_files)
    remove_empty_dir(fs, posixpath.join(root, STAGING_DIR, sid))
    return prepared.info


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


# --------------------------------------------------------------------------------------------------
# State and cleanup
# --------------------------------------------------------------------------------------------------


def committed_shards(out_url: str, storage_options: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """``{shard_id: marker dict}`` of every committed shard (fresh listing; markers fetched concurrently)."""
    fs, root = fs_root(out_url, storage_options)
    paths = [p for p in list_files(fs, posixpath.join(root, COMMITS_DIR)) if p.endswith(".json")]
    out: dict[str, dict[str, Any]] = {}
    for start in range(0, len(paths), 512):
        chunk = paths[start : start + 512]
        blobs = fs.cat(chunk, on_error="omit")  # a list in -> {path: bytes} out, fetched concurrently
        for path in chunk:
            raw = blobs.get(path)
            if raw is None:
                continue
            try:
                marker = json.loads(raw)
            except ValueError:
                log.warning("unreadable commit marker %s; shard treated as uncommitted", path)
                continue
            out[posixpath.basename(path)[: -len(".json")]] = marker
    return out


def prepare_shard_for_rerun(
    out_url: str, storage_options: dict[str, Any] | None, shard_id: str
) -> dict[str, Any]:
    """Drop every leftover of an *uncommitted* shard (staging, PNGs, fragment, final Parquet).

    Call before re-processing a shard that an interrupted run left behind. A committed shard is left
    alone. Must not run while another process is still writing this shard.

    Returns:
        ``{"shard_id", "committed": bool, "deleted": number of files deleted}``.
    """
    fs, root = fs_root(out_url, storage_options)
    _check_shard_id(shard_id)
    if _read_marker(fs, root, shard_id) is not None:
        return {"shard_id": shard_id, "committed": True, "deleted": 0}
    deleted = clear_staging(out_url, storage_options, shard_id)
    deleted += delete(fs, list_files(fs, posixpath.join(root, PNG_DIR, shard_id)))
    singles = [
        posixpath.join(root, PARTS_DIR, f"{shard_id}.json"),
        posixpath.join(root, PARQUET_DIR, f"{shard_id}.parquet"),
    ]
    for p in singles:
        fs.invalidate_cache(p)
    deleted += delete(fs, [p for p in singles if fs.exists(p)])
    if is_local(fs):
        shutil.rmtree(posixpath.join(root, PNG_DIR, shard_id), ignore_errors=True)
        for folder in (posixpath.join(root, d) for d in (PARQUET_DIR, PARTS_DIR, COMMITS_DIR)):
            if os.path.isdir(folder):  # hidden temp files of a writer that crashed mid-write
                for name in os.listdir(folder):
                    if name.startswith(f".{shard_id}.") and ".tmp-" in name:
                        os.remove(os.path.join(folder, name))
    return {"shard_id": shard_id, "committed": False, "deleted": deleted}


def clean_uncommitted(out_url: str, storage_options: dict[str, Any] | None) -> list[str]:
    """Before a (re)run: clean every uncommitted shard's leftovers and committed shards' stray staging.

    Returns the ids of the uncommitted shards that had leftovers. Must not run concurrently with a
    run writing to the same output.
    """
    fs, root = fs_root(out_url, storage_options)
    committed = set(committed_shards(out_url, storage_options))
    seen: set[str] = set()
    seen.update(list_children(fs, posixpath.join(root, STAGING_DIR)))
    seen.update(list_children(fs, posixpath.join(root, PNG_DIR)))
    for folder, suffix in ((PARQUET_DIR, ".parquet"), (PARTS_DIR, ".json")):
        seen.update(
            n[: -len(suffix)] for n in list_children(fs, posixpath.join(root, folder)) if n.endswith(suffix)
        )
    cleaned = []
    for sid in sorted(seen):
        if not _SHARD_ID.match(sid):
            continue
        if sid in committed:
            clear_staging(out_url, storage_options, sid)
        else:
            prepare_shard_for_rerun(out_url, storage_options, sid)
            cleaned.append(sid)
    return cleaned


# --------------------------------------------------------------------------------------------------
# COCO export
# --------------------------------------------------------------------------------------------------


class _JsonArrayFile:
    """Append JSON objects to a local temp file as the body of a JSON array (bounded memory)."""

    def __init__(self, folder: str):
        self.file = tempfile.TemporaryFile(mode="w+b", dir=folder)
        self.count = 0

    def add(self, obj: Any) -> None:
        if self.count:
            self.file.write(b",\n")
        self.file.write(_json_bytes(obj))
        self.count += 1

    def copy_to(self, out: io.BufferedIOBase) -> None:
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)


def _assemble(
    path: str, head: dict[str, Any], arrays: dict[str, _JsonArrayFile], tail: dict[str, Any]
) -> None:
    with open(path, "wb") as out:
        out.write(_json_bytes(head)[:-1])  # "{...": keep the object open
        for name, array in arrays.items():
            out.write(f',"{name}":[\n'.encode())
            array.copy_to(out)
            out.write(b"\n]")
        for name, value in tail.items():
            out.write(f',"{name}":'.encode() + _json_bytes(value))
        out.write(b"}\n")


def finalize_coco(
    out_url: str,
    storage_options: dict[str, Any] | None,
    categories: list[dict[str, Any]],
    *,
    description: str = "ODISE open-vocabulary panoptic pseudo-labels",
) -> dict[str, str]:
    """Merge the fragments of all *committed* shards into ``coco/panoptic.json`` and ``coco/instances.json``.

    * ``panoptic.json``: ``images`` (``id`` = schema ``image_id``, ``file_name`` = ``<shard_id>/<key>.<ext>``,
      ``width``, ``height``), ``annotations`` (``image_id``, ``file_name`` = ``<shard_id>/<key>.png`` under
      ``coco/panoptic/``, ``segments_info`` [``id``, ``category_id``, ``area``, ``bbox``, ``iscrowd`` 0]),
      ``categories`` (``id``, ``name``, ``supercategory``, ``isthing`` 0/1, ``color`` [r, g, b]).
    * ``instances.json``: the same ``images``; ``annotations`` with RLE ``segmentation``, ``area``, ``bbox``,
      ``iscrowd`` 0, ``score`` and ids 1..N in shard/image order; ``categories`` = *all* categories
      (things and stuff, with ``isthing``) so category ids mean the same in both files.

    Error rows are not exported. Shards committed without COCO output are skipped (logged). Memory is
    bounded: the arrays are streamed through local temp files, then each file is put whole (atomic).

    Returns:
        ``{"panoptic": url, "instances": url}``.

    Raises:
        ValueError: a committed shard uses a category id that is not in ``categories``.
    """
    known = _category_ids(categories)
    fs, root = fs_root(out_url, storage_options)
    markers = committed_shards(out_url, storage_options)
    part_paths = []
    for sid in sorted(markers):
        rel = markers[sid].get("coco_part")
        if rel is None:
            log.warning("shard %s was committed without COCO output; not in the COCO exports", sid)
            continue
        part_paths.append(posixpath.join(root, rel))

    pan_cats = [
        {
            "id": int(c["id"]),
            "name": str(c["name"]),
            "supercategory": str(c.get("supercategory", "")),
            "isthing": int(bool(c["isthing"])),
            "color": list(category_colour(int(c["id"]))),
        }
        for c in categories
    ]
    inst_cats = [{k: c[k] for k in ("id", "name", "supercategory", "isthing")} for c in pan_cats]
    info = {"description": description, "date_created": utc_now(), "version": str(SCHEMA_VERSION)}

    with tempfile.TemporaryDirectory(prefix="odise-coco-") as tmp:
        images, pan_anns, inst_anns = _JsonArrayFile(tmp), _JsonArrayFile(tmp), _JsonArrayFile(tmp)
        unknown: set[int] = set()
        next_id = 1
        for start in range(0, len(part_paths), 64):
            chunk = part_paths[start : start + 64]
            blobs = fs.cat(chunk)  # a list in -> {path: bytes} out, fetched concurrently
            for path in chunk:
                part = json.loads(blobs[path])
                for image in part["images"]:
                    images.add(image)
                for ann in part["panoptic"]:
                    unknown |= {s["category_id"] for s in ann["segments_info"]} - known
                    pan_anns.add(ann)
                for ann in part["instances"]:
                    unknown |= {ann["category_id"]} - known
                    inst_anns.add({"id": next_id, **ann})
                    next_id += 1
        if unknown:
            raise ValueError(
                f"committed labels use category ids {sorted(unknown)[:10]} missing from `categories`"
            )
        outputs = {}
        for name, arrays, cats in (
            ("panoptic", {"images": images, "annotations": pan_anns}, pan_cats),
            ("instances", {"images": images, "annotations": inst_anns}, inst_cats),
        ):
            local = os.path.join(tmp, f"{name}.json")
            _assemble(local, {"info": info, "licenses": []}, arrays, {"categories": cats})
            dest = posixpath.join(root, "coco", f"{name}.json")
            put_local_file(fs, local, dest)
            outputs[name] = fs.unstrip_protocol(dest)
    return outputs


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


def write_run_summary(
    out_url: str,
    storage_options: dict[str, Any] | None,
    *,
    provenance: RunProvenance | None = None,
    shards: Sequence[Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``summary.json`` from the commit markers (and ``provenance.json`` if given) and return it.

    Keys: ``run_id``, ``schema_version``, ``written_at``, ``n_shards_committed``, ``n_images``,
    ``n_labelled``, ``n_errors``, ``n_segments``, ``n_instances``, ``n_duplicates_dropped``,
    ``errors_by_reason`` (:func:`error_reason` -> count, 20 most common),
    and when ``shards`` (the run's input) is given ``pending_shards`` (listed, not committed) and
    ``stale_shards`` (committed, no longer listed); plus ``extra``.
    """
    fs, root = fs_root(out_url, storage_options)
    markers = committed_shards(out_url, storage_options)
    totals = Counter()
    reasons: Counter[str] = Counter()
    for _sid, m in sorted(markers.items()):
        for k in ("n_images", "n_labelled", "n_errors", "n_segments", "n_instances", "n_duplicates_dropped"):
            totals[k] += int(m.get(k, 0))
        if m.get("n_errors"):
            with fs.open(posixpath.join(root, m["parquet"]), "rb") as f:
                errors = pq.read_table(f, columns=["error"]).column("error").drop_null().to_pylist()
            reasons.update(error_reason(e) for e in errors)
    summary: dict[str, Any] = {
        "run_id": provenance.run_id if provenance else None,
        "schema_version": SCHEMA_VERSION,
        "written_at": utc_now(),
        "n_shards_committed": len(markers),
        **{
            k: totals[k]
            for k in (
                "n_images",
                "n_labelled",
                "n_errors",
                "n_segments",
                "n_instances",
                "n_duplicates_dropped",
            )
        },
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
