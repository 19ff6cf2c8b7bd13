"""Read an annotate output through its public contract (Parquet rows + provenance) and select what to export.

An annotate output (any fsspec URL) holds ``parquet/<shard_id>.parquet`` (one row per image, schema in
:mod:`pipeline.schema`, versions :data:`~pipeline.schema.READABLE_SCHEMA_VERSIONS`) and ``provenance.json``
(categories with ids, names and ``isthing``; model and weights). Nothing else is read: no commit markers, no
COCO files. Files are read one at a time in batches of :data:`BATCH_ROWS` rows, so memory does not grow with
the size of the output.

Selection, shared by every export target:

* error rows are skipped (counted);
* ``min_score`` drops the segments and instances scored below it (counted); the stored PNGs of such a row
  no longer match its segments (:attr:`ExportItem.filtered`), so writers rebuild masks from the segment RLEs;
* ``order="key"`` is the output's own order: shard files by name, rows by key (streamed; ``max_images``
  stops reading early);
* ``order="uncertainty"``: most uncertain first (ties: the key order). The value is the row's
  ``uncertainty`` column (mean over segments of 1 - the fused top-1 probability); where it is null (outputs
  written before the column was filled, schema version 1) it falls back to ``1 - mean segment score``, and
  to 1.0 for an image without segments (nothing found is worth a look). With ``max_images=N`` a heap of N
  rows is kept; without it the rows are sorted on local disk (SQLite), never in memory.

Image references (:func:`image_url_of`): the row's ``image_url`` when present, otherwise derived from
``shard`` + ``key``: an image-folder shard ``<folder URL>#images-000000`` gives ``<folder URL>/<key>``; a tar
shard gives fsspec's chained URL ``tar://<key>.<image_ext>::<tar URL>`` (openable with ``fsspec.open``).

Export names (:attr:`ExportItem.name`, :attr:`ExportItem.stem`): ``<shard_id>/<key without its image
extension>`` + ``.<image_ext>`` for the image, + ``.png`` for masks; keys made of unsafe characters are
flattened with a hash; two keys of one shard with the same stem (``a.jpg`` and ``a.png``) get
``-<sha1(key)[:8]>`` stems, so names never collide.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
import pickle
import posixpath
import re
import sqlite3
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.schema import (
    METADATA_PROVENANCE_KEY,
    METADATA_VERSION_KEY,
    READABLE_SCHEMA_VERSIONS,
)
from pipeline.shards import IMAGE_EXTENSIONS, TAR_SUFFIXES
from pipeline.storage import fs_root

__all__ = [
    "BATCH_ROWS",
    "AnnotateOutput",
    "ExportItem",
    "SelectionStats",
    "image_url_of",
    "iter_items",
    "open_output",
    "split_tar_url",
]

log = logging.getLogger(__name__)

BATCH_ROWS = 64
"""Rows decoded at a time from a Parquet file."""

BASE_COLUMNS = (
    "shard",
    "shard_id",
    "key",
    "image_id",
    "image_url",
    "image_ext",
    "width",
    "height",
    "segments",
    "instances",
    "uncertainty",
    "branch_disagreement",
    "error",
)
"""Columns every export reads; writers add ``panoptic_png`` / ``semantic_png`` when they need them."""

_VIRTUAL_FRAGMENT = re.compile(r"^(images|rest)-\d+$")
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9_+=,@-][A-Za-z0-9._+=,@-]*$")


# --------------------------------------------------------------------------------------------------
# The output
# --------------------------------------------------------------------------------------------------


@dataclass
class AnnotateOutput:
    """An opened annotate output.

    Attributes:
        url: the output URL as given.
        fs, root: its filesystem and stripped root path.
        files: the Parquet files (stripped paths), sorted by name (= shard id).
        provenance: the run's provenance dict (:class:`pipeline.schema.RunProvenance` layout).
        categories: COCO categories ``[{"id", "name", "isthing" 0/1, ...}]`` from the provenance.
        storage_options: fsspec options used to open it (also used for the images).
    """

    url: str
    fs: Any
    root: str
    files: list[str]
    provenance: dict[str, Any]
    categories: list[dict[str, Any]]
    storage_options: dict[str, Any] = field(default_factory=dict)

    @property
    def model_version(self) -> str:
        """``<model_variant>@<checkpoint sha256[:12]>``, ``@random-weights`` for a plumbing check, else ``@<run_id>``."""
        prov = self.provenance
        variant = str(prov.get("model_variant") or "unknown")
        sha = (prov.get("weights_sha256") or {}).get("checkpoint")
        if sha:
            return f"{variant}@{sha[:12]}"
        if self.plumbing_check:
            return f"{variant}@random-weights"
        return f"{variant}@{prov.get('run_id', 'unknown-run')}"

    @property
    def plumbing_check(self) -> bool:
        return bool((self.provenance.get("settings") or {}).get("plumbing_check"))

    def display(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if "://" in self.url else path


def open_output(url: str, storage_options: dict[str, Any] | None = None) -> AnnotateOutput:
    """Open an annotate output for reading: its Parquet files and provenance.

    Raises:
        FileNotFoundError: the folder, its ``parquet/`` folder or any Parquet file is missing (message names it).
        ValueError: no provenance (neither ``provenance.json`` nor Parquet metadata), invalid provenance JSON
            or a provenance without categories.
    """
    options = dict(storage_options or {})
    fs, root = fs_root(url, options)
    if not fs.exists(root):
        raise FileNotFoundError(f"annotate output {url} does not exist")
    parquet_dir = posixpath.join(root, "parquet")
    fs.invalidate_cache(parquet_dir)
    if not fs.isdir(parquet_dir):
        raise FileNotFoundError(
            f"{url} has no parquet/ folder: not an odise-annotate output (expected {url}/parquet/*.parquet)"
        )
    files = sorted(
        p
        for p in fs.find(parquet_dir, withdirs=False)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
    )
    if not files:
        raise FileNotFoundError(f"no Parquet files under {url}/parquet (has the run committed any shard?)")

    provenance: dict[str, Any] | None = None
    prov_path = posixpath.join(root, "provenance.json")
    try:
        raw = fs.cat_file(prov_path)
    except FileNotFoundError:
        raw = None
    if raw is not None:
        try:
            provenance = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{url}/provenance.json is not valid JSON ({exc})") from exc
    else:
        import pyarrow.parquet as pq

        with fs.open(files[0], "rb") as f:
            meta = pq.read_schema(f).metadata or {}
        if METADATA_PROVENANCE_KEY in meta:
            provenance = json.loads(meta[METADATA_PROVENANCE_KEY])
    if not isinstance(provenance, dict):
        raise ValueError(f"{url}: no provenance (no provenance.json and none in the Parquet metadata)")
    categories = provenance.get("categories")
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{url}/provenance.json has no categories")
    for i, cat in enumerate(categories):
        if not isinstance(cat, dict) or not {"id", "name", "isthing"} <= set(cat):
            raise ValueError(
                f"{url}/provenance.json: categories[{i}] needs id, name and isthing, got {cat!r}"
            )
    return AnnotateOutput(url, fs, root, files, provenance, categories, options)


# --------------------------------------------------------------------------------------------------
# Image references and export names
# --------------------------------------------------------------------------------------------------


def _is_tar_url(url: str) -> bool:
    return url.lower().split("?", 1)[0].endswith(TAR_SUFFIXES)


def split_tar_url(url: str) -> tuple[str, str] | None:
    """``(member, tar URL)`` of ``tar://<member>::<tar URL>`` (or the older ``<tar URL>#<member>``); else None."""
    if url.startswith("tar://") and "::" in url:
        member, _, target = url[len("tar://") :].partition("::")
        return member.lstrip("/"), target
    base, sep, member = url.partition("#")
    if sep and member and _is_tar_url(base):
        return member, base
    return None


def image_url_of(row: dict[str, Any]) -> str:
    """Where a row's image is: ``image_url`` when present, else derived from ``shard`` + ``key`` (module doc).

    Raises:
        ValueError: the shard is neither an image folder nor a tar, naming the row.
    """
    url = row.get("image_url")
    if url:
        tar = split_tar_url(url)
        return f"tar://{tar[0]}::{tar[1]}" if tar else url
    shard, key = str(row["shard"]), str(row["key"])
    base, sep, fragment = shard.partition("#")
    if sep and _VIRTUAL_FRAGMENT.match(fragment):
        return base.rstrip("/") + "/" + key
    if _is_tar_url(shard):
        ext = row.get("image_ext")
        return f"tar://{key}.{ext}::{shard}" if ext else f"tar://{key}::{shard}"
    raise ValueError(
        f"cannot locate the image of {row.get('shard_id')}/{key}: shard {shard!r} is neither an image folder "
        "(<folder>#images-N) nor a .tar shard, and the row has no image_url"
    )


def _safe_name(key: str) -> str:
    """A relative file name for a key: safe ``/``-separated components kept, anything else flattened + hash."""
    parts = key.split("/")
    if key and len(key) <= 200 and all(_SAFE_COMPONENT.match(p) for p in parts):
        return key
    flat = re.sub(r"[^A-Za-z0-9._-]+", "_", key).strip("._-")[:100] or "key"
    return f"{flat}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"


def _plain_stem(key: str) -> str:
    name = _safe_name(key)
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if dot and stem and ext.lower() in IMAGE_EXTENSIONS:
        base = stem
    return f"{folder}/{base}" if folder else base


def export_names(
    shard_id: str, key: str, image_ext: str | None, ambiguous: frozenset[str]
) -> tuple[str, str]:
    """``(stem, name)``: ``<shard_id>/<stem>`` and ``<shard_id>/<stem>.<ext>`` (see the module doc)."""
    stem = _plain_stem(key)
    if stem in ambiguous:
        stem = f"{stem}-{hashlib.sha1(key.encode()).hexdigest()[:8]}"
    ext = (image_ext or "").lower()
    stem = f"{shard_id}/{stem}"
    return stem, f"{stem}.{ext}" if ext else stem


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------


@dataclass
class ExportItem:
    """One labelled image selected for export.

    Attributes:
        row: the Parquet row (columns of :data:`BASE_COLUMNS` + the writer's); ``segments`` and ``instances``
            are already filtered by ``min_score``.
        image_url: where the image is (:func:`image_url_of`).
        stem, name: export names (module doc), e.g. ``images-000000-1a2b/astronaut`` and ``...astronaut.jpg``.
        uncertainty: the value ``order="uncertainty"`` sorts by, in [0, 1].
        uncertainty_fallback: True when ``uncertainty`` came from the segment scores (the column was null).
        filtered: ``min_score`` dropped segments of this row (its stored PNGs no longer match).
        seq: position in the key order (0-based), the tie-break of the uncertainty order.
    """

    row: dict[str, Any]
    image_url: str
    stem: str
    name: str
    uncertainty: float
    uncertainty_fallback: bool
    filtered: bool
    seq: int = 0

    @property
    def width(self) -> int:
        return int(self.row["width"])

    @property
    def height(self) -> int:
        return int(self.row["height"])


@dataclass
class SelectionStats:
    """Counts of what the selection skipped (filled while iterating)."""

    error_rows: int = 0
    rows_read: int = 0
    segments_dropped: int = 0
    instances_dropped: int = 0


def _fallback_uncertainty(segments: Sequence[dict[str, Any]]) -> float:
    if not segments:
        return 1.0
    return float(1.0 - sum(float(s["score"]) for s in segments) / len(segments))


def _ambiguous_stems(keys: Sequence[str]) -> frozenset[str]:
    counts = Counter(_plain_stem(k) for k in keys)
    return frozenset(s for s, n in counts.items() if n > 1)


def _iter_file(
    output: AnnotateOutput, path: str, columns: Sequence[str], batch_rows: int
) -> Iterator[dict[str, Any]]:
    """Rows of one Parquet file, ``batch_rows`` at a time; missing optional columns (older schemas) are None."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shown = output.display(path)
    try:
        with output.fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            meta = pf.schema_arrow.metadata or {}
            version = meta.get(METADATA_VERSION_KEY)
            if version is not None and version.decode() not in {str(v) for v in READABLE_SCHEMA_VERSIONS}:
                raise ValueError(
                    f"{shown} has schema version {version.decode()}; this reader knows versions "
                    f"{list(READABLE_SCHEMA_VERSIONS)} (upgrade odise-annotate)"
                )
            names = set(pf.schema_arrow.names)
            required = {"shard", "shard_id", "key", "segments", "error", "width", "height"}
            if not required <= names:
                raise ValueError(
                    f"{shown} lacks columns {sorted(required - names)}: not an odise-annotate output"
                )
            present = [c for c in columns if c in names]
            absent = [c for c in columns if c not in names]
            for batch in pf.iter_batches(batch_size=batch_rows, columns=present):
                for row in batch.to_pylist():
                    for c in absent:
                        row[c] = None
                    yield row
    except (pa.ArrowException, OSError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise FileNotFoundError(f"{shown} vanished while reading (is a run still writing?)") from exc
        raise ValueError(f"unreadable Parquet file {shown} ({type(exc).__name__}: {exc})") from exc


def _file_stems(output: AnnotateOutput, path: str) -> frozenset[str]:
    import pyarrow.parquet as pq

    with output.fs.open(path, "rb") as f:
        keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
    return _ambiguous_stems(keys)


def _key_order(
    output: AnnotateOutput,
    columns: Sequence[str],
    min_score: float | None,
    stats: SelectionStats,
    batch_rows: int,
) -> Iterator[ExportItem]:
    cols = list(dict.fromkeys([*BASE_COLUMNS, *columns]))
    seq = 0
    for path in output.files:
        ambiguous = _file_stems(output, path)
        for row in _iter_file(output, path, cols, batch_rows):
            stats.rows_read += 1
            if row.get("error") is not None:
                stats.error_rows += 1
                continue
            segments = list(row.get("segments") or [])
            instances = list(row.get("instances") or [])
            stored = row.get("uncertainty")
            uncertainty = float(stored) if stored is not None else _fallback_uncertainty(segments)
            filtered = False
            if min_score is not None:
                kept = [s for s in segments if float(s["score"]) >= min_score]
                kept_inst = [s for s in instances if float(s["score"]) >= min_score]
                stats.segments_dropped += len(segments) - len(kept)
                stats.instances_dropped += len(instances) - len(kept_inst)
                filtered = len(kept) != len(segments)
                segments, instances = kept, kept_inst
            row["segments"], row["instances"] = segments, instances
            stem, name = export_names(str(row["shard_id"]), str(row["key"]), row.get("image_ext"), ambiguous)
            yield ExportItem(
                row=row,
                image_url=image_url_of(row),
                stem=stem,
                name=name,
                uncertainty=min(max(uncertainty, 0.0), 1.0),
                uncertainty_fallback=stored is None,
                filtered=filtered,
                seq=seq,
            )
            seq += 1


class _DiskSort:
    """Items sorted by ``(-uncertainty, seq)`` on local disk (SQLite): memory stays flat for any output size."""

    def __init__(self, folder: str) -> None:
        handle, self.path = tempfile.mkstemp(prefix="order-", suffix=".sqlite", dir=folder)
        os.close(handle)
        self.db = sqlite3.connect(self.path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE items (u REAL, seq INTEGER, blob BLOB)")

    def add(self, item: ExportItem) -> None:
        self.db.execute(
            "INSERT INTO items VALUES (?, ?, ?)",
            (item.uncertainty, item.seq, pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)),
        )

    def __iter__(self) -> Iterator[ExportItem]:
        self.db.commit()
        for (blob,) in self.db.execute("SELECT blob FROM items ORDER BY u DESC, seq ASC"):
            yield pickle.loads(blob)

    def close(self) -> None:
        self.db.close()


def iter_items(
    output: AnnotateOutput,
    *,
    columns: Sequence[str] = (),
    min_score: float | None = None,
    max_images: int | None = None,
    order: str = "key",
    stats: SelectionStats | None = None,
    batch_rows: int = BATCH_ROWS,
) -> Iterator[ExportItem]:
    """The selected images of an output, in export order (see the module doc).

    Args:
        output: from :func:`open_output`.
        columns: extra Parquet columns the caller needs (``panoptic_png``, ``semantic_png``).
        min_score: drop segments / instances scored below it.
        max_images: stop after this many images.
        order: ``"key"`` or ``"uncertainty"``.
        stats: filled with the counts of skipped rows and dropped segments.
        batch_rows: rows decoded at a time.
    """
    stats = stats if stats is not None else SelectionStats()
    items = _key_order(output, columns, min_score, stats, batch_rows)
    if order == "key":
        yield from items if max_images is None else itertools.islice(items, max_images)  # stops reading at N
        return
    if order != "uncertainty":
        raise ValueError(f"order must be 'key' or 'uncertainty', got {order!r}")
    if max_images is not None:
        heap: list[tuple[float, int, ExportItem]] = []  # min-heap: the least uncertain (then latest) on top
        for item in items:
            entry = (item.uncertainty, -item.seq, item)
            if len(heap) < max_images:
                heapq.heappush(heap, entry)
            elif entry[:2] > heap[0][:2]:
                heapq.heapreplace(heap, entry)
        for _, _, item in sorted(heap, key=lambda e: (-e[0], -e[1])):
            yield item
        return
    with tempfile.TemporaryDirectory(prefix="odise-export-order-") as tmp:
        spill = _DiskSort(tmp)
        try:
            for item in items:
                spill.add(item)
            yield from spill
        finally:
            spill.close()
