"""The ONE Arrow schema of the Parquet output (versioned) and the run's provenance record.

One row per input sample: either labelled (``error`` is null) or an error record (``error`` says why;
``segments``/``instances`` are empty lists, ``panoptic_png`` null, ``width``/``height`` null when the
image could not even be read). Files are plain Parquet: pyarrow, pandas and HF ``datasets`` read them
without this package.

Columns (``SCHEMA_VERSION = 2``; version 1 lacked ``image_url``, ``uncertainty``, ``branch_disagreement``,
``error_kind`` and ``retryable``):

==============  ===================================================================================
run_id          string, the run that produced the row
shard           string, URL of the input shard (for virtual image shards: ``<folder>#images-<n>`` / ``#rest-<n>``)
shard_id        string, filesystem-safe unique shard name (output file names)
key             string, sample key, unique within a shard (WebDataset key, or relative image path,
                extension included). Always valid UTF-8: a name that is not (``bad\\xff.jpg``) is stored
                percent-encoded, reversibly (``bad%FF.jpg``; in such names a literal ``%`` is ``%25``), see
                :func:`pipeline.shards.encode_name` / :func:`~pipeline.shards.decode_name`. Ordinary names
                (no ``%`` followed by two hex digits) are stored unchanged
image_id        int64, stable id of the image in this output, < 2**53: ``seq << 28 | rank`` (the shard's commit
                sequence number, the key's rank among the shard's sorted keys; see :func:`image_id`), set at commit
image_url       string, where the image is, in a form ``fsspec.open`` opens as it is: the file's URL for
                image folders (``file:///data/a.jpg``, ``s3://b/a.jpg``); fsspec's chained URL of the
                member for WebDataset shards (``tar://cats/001.jpg::s3://b/shard-000.tar``; storage options
                per protocol: ``fsspec.open(url, s3={...})``). Same encoding rule as ``key`` (apply
                ``decode_name`` first for the rare encoded names); null when there is no image (e.g. a
                sample without an image member, a shard-level row)
image_ext       string, extension of the image member / file ("jpg", "png", ...), null if none
width, height   int32, image size in pixels after EXIF orientation; null when unknown
segments        list<struct<id int32, category_id int32, category_name string, isthing bool,
                score float32, area int64, bbox fixed_size_list<float32>[4] (x, y, w, h in pixels),
                rle struct<size list<int32> [h, w], counts string (COCO compressed RLE)>>>
instances       list<struct<category_id int32, category_name string, score float32, bbox, rle>>
panoptic_png    binary, COCO panoptic PNG (id = R + 256 G + 256^2 B), null when not requested
semantic_png    binary, 16-bit grayscale PNG of the semantic output's category id per pixel (0 = none),
                null when not requested
uncertainty     float32, how unsure the labels are, in [0, 1]: mean over the image's segments of
                1 - the fused top-1 class probability of the segment's query (its first query for merged
                stuff segments; the segment's ``score``). Null for error rows and images without segments.
                Sort by it (descending) to review the worst labels first
branch_disagreement
                float32, in [0, 1]: fraction of the image's segments whose query has a different top class
                in the diffusion branch than in the CLIP (MaskCLIP) branch (null without segments or when
                the CLIP branch is off)
error           string, null when labelled: a human-readable reason that names the image's location
                (``... [file:///data/a.jpg]``; ``"__shard__"`` rows name the shard)
error_kind      string, null when labelled: a stable machine-readable kind, one of
                :data:`pipeline.errors.KINDS` (``not_an_image``, ``corrupt_image``, ``out_of_memory``,
                ``network``, ``shard_growing`` ...; the table is in :mod:`pipeline.errors` and the README)
retryable       bool, null when labelled: whether labelling the sample again may succeed (network,
                timeout, vanished file, shard still being written, other I/O error, out of memory).
                A retryable ``"__shard__"`` row means the samples after it are missing: relabel the shard
==============  ===================================================================================

Rows of the special key ``"__shard__"`` (:data:`pipeline.shards.SHARD_ERROR_KEY`) report a problem of the
whole tar shard (truncated, corrupt, vanished, unreadable): the samples after that point have no rows.

Schema-level metadata: ``odise_annotate.schema_version`` (ASCII int) and ``odise_annotate.provenance``
(JSON of :class:`RunProvenance`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

__all__ = [
    "SCHEMA_VERSION",
    "METADATA_PROVENANCE_KEY",
    "METADATA_VERSION_KEY",
    "RunProvenance",
    "error_row",
    "image_id",
    "image_id_for",
    "label_row",
    "output_field",
    "output_schema",
    "package_version",
    "provenance_from_schema",
    "rows_to_table",
]

SCHEMA_VERSION = 2
READABLE_SCHEMA_VERSIONS = (1, 2)
"""Versions the readers (evaluation, export) accept."""
METADATA_VERSION_KEY = b"odise_annotate.schema_version"
METADATA_PROVENANCE_KEY = b"odise_annotate.provenance"

RLE_TYPE = pa.struct([pa.field("size", pa.list_(pa.int32())), pa.field("counts", pa.string())])
BBOX_TYPE = pa.list_(pa.float32(), 4)
SEGMENT_TYPE = pa.struct(
    [
        pa.field("id", pa.int32()),
        pa.field("category_id", pa.int32()),
        pa.field("category_name", pa.string()),
        pa.field("isthing", pa.bool_()),
        pa.field("score", pa.float32()),
        pa.field("area", pa.int64()),
        pa.field("bbox", BBOX_TYPE),
        pa.field("rle", RLE_TYPE),
    ]
)
INSTANCE_TYPE = pa.struct(
    [
        pa.field("category_id", pa.int32()),
        pa.field("category_name", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("bbox", BBOX_TYPE),
        pa.field("rle", RLE_TYPE),
    ]
)

_FIELDS = [
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("shard", pa.string(), nullable=False),
    pa.field("shard_id", pa.string(), nullable=False),
    pa.field("key", pa.string(), nullable=False),
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("image_url", pa.string()),
    pa.field("image_ext", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("instances", pa.list_(INSTANCE_TYPE)),
    pa.field("panoptic_png", pa.binary()),
    pa.field("semantic_png", pa.binary()),
    pa.field("uncertainty", pa.float32()),
    pa.field("branch_disagreement", pa.float32()),
    pa.field("error", pa.string()),
    pa.field("error_kind", pa.string()),
    pa.field("retryable", pa.bool_()),
]
COLUMNS = tuple(f.name for f in _FIELDS)
_REQUIRED = ("run_id", "shard", "shard_id", "key")
_FIELD_BY_NAME = {f.name: f for f in _FIELDS}


def output_field(name: str, *, nullable: bool | None = None) -> pa.Field:
    """The output schema's column ``name`` (one of :data:`COLUMNS`), for formats that carry it on unchanged.

    Args:
        name: the column's name (``KeyError`` naming the known columns otherwise).
        nullable: override the field's nullability (None keeps the output schema's).
    """
    try:
        got = _FIELD_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no output column {name!r}; known: {list(COLUMNS)}") from None
    return got if nullable is None else got.with_nullable(nullable)


def package_version() -> str:
    """Installed version of the ``odise-annotate`` distribution, or ``"0+unknown"``."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("odise-annotate")
    except PackageNotFoundError:
        return "0+unknown"


def _utc_now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


@dataclass(frozen=True)
class RunProvenance:
    """What produced a run's labels; stored in every Parquet file and as ``provenance.json``.

    Attributes:
        run_id: unique id of the run (also in every row).
        model_variant: model config name (e.g. ``"odise_label_coco_50e"``).
        weights_sha256: ``{weight source name: sha256 hex or None when unknown}``.
        vocabulary_source: where the vocabulary came from (file path / URL / builtin name).
        vocabulary_sha256: :meth:`Vocabulary.sha256` of the vocabulary used.
        categories: COCO categories ``[{"id", "name", "isthing", ...}]`` of the vocabulary.
        thresholds: post-processing thresholds (``{"object_mask_threshold": 0.8, ...}``).
        package_version: version of this package.
        weights_licences: licence text / names of the model weights used.
        created_at: UTC ISO-8601 time the run was created.
        settings: any other run settings worth keeping (batch size, image size, ...), JSON-able.
        schema_version: the output schema version (:data:`SCHEMA_VERSION`).
    """

    run_id: str
    model_variant: str
    weights_sha256: dict[str, str | None] = field(default_factory=dict)
    vocabulary_source: str = ""
    vocabulary_sha256: str = ""
    categories: list[dict[str, Any]] = field(default_factory=list)
    thresholds: dict[str, float] = field(default_factory=dict)
    package_version: str = field(default_factory=package_version)
    weights_licences: str = ""
    created_at: str = field(default_factory=_utc_now)
    settings: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, *, indent: int | None = 2) -> str:
        """Deterministic JSON (sorted keys)."""
        return json.dumps(self.to_dict(), indent=indent, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunProvenance:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown provenance keys {unknown} (known: {sorted(known)})")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str | bytes) -> RunProvenance:
        return cls.from_dict(json.loads(text))

    def label_fingerprint(self) -> dict[str, Any]:
        """The fields that change what labels a run produces (used to refuse mixing runs in one output)."""
        return {
            "model_variant": self.model_variant,
            "weights_sha256": self.weights_sha256,
            "vocabulary_sha256": self.vocabulary_sha256,
            "categories": self.categories,
            "thresholds": self.thresholds,
            "schema_version": self.schema_version,
        }


def output_schema(provenance: RunProvenance | None = None) -> pa.Schema:
    """The output Arrow schema; metadata holds the schema version and, if given, the provenance JSON."""
    metadata = {METADATA_VERSION_KEY: str(SCHEMA_VERSION).encode()}
    if provenance is not None:
        metadata[METADATA_PROVENANCE_KEY] = provenance.to_json(indent=None).encode()
    return pa.schema(_FIELDS, metadata=metadata)


def provenance_from_schema(schema: pa.Schema) -> RunProvenance | None:
    """The :class:`RunProvenance` stored in a schema's metadata, or None."""
    raw = (schema.metadata or {}).get(METADATA_PROVENANCE_KEY)
    return None if raw is None else RunProvenance.from_json(raw)


IMAGE_ID_RANK_BITS = 28
"""Low bits of an image / annotation id: the rank of the key (or the instance's index) within its shard."""
MAX_SHARD_SEQ = 2**25
"""Commit sequence numbers are < 2**25, so ids stay < 2**53 (exact in JavaScript / JSON readers)."""


def image_id(seq: int, rank: int) -> int:
    """The image id of the key with ``rank`` (0-based, among the shard's sorted keys) in the shard committed with
    sequence number ``seq``: ``seq << 28 | rank`` (< 2**53). Limits: ``seq`` < 2**25 shards, ``rank`` < 2**28
    images per shard. The same layout numbers COCO instance annotations (``rank`` = the instance's running index
    within its shard). Replacing a shard keeps its ``seq``, so the ids of an unchanged key set do not change.

    Raises:
        ValueError: ``seq`` or ``rank`` out of range.
    """
    if not 0 <= seq < MAX_SHARD_SEQ:
        raise ValueError(f"shard sequence number {seq} out of range [0, {MAX_SHARD_SEQ})")
    if not 0 <= rank < 2**IMAGE_ID_RANK_BITS:
        raise ValueError(
            f"rank {rank} out of range [0, 2**{IMAGE_ID_RANK_BITS}): too many images in one shard"
        )
    return seq << IMAGE_ID_RANK_BITS | rank


def image_id_for(shard_id: str, key: str) -> int:
    """Placeholder image id (0) carried by staging rows; the real id, :func:`image_id`, is assigned at commit."""
    return 0


def label_row(
    *,
    run_id: str,
    shard: str,
    shard_id: str,
    key: str,
    encoded: dict[str, Any],
    image_ext: str | None = None,
    image_url: str | None = None,
    uncertainty: float | None = None,
    branch_disagreement: float | None = None,
) -> dict[str, Any]:
    """Row of a labelled sample from :func:`pipeline.encode.encode_result`'s output."""
    return {
        "run_id": run_id,
        "shard": shard,
        "shard_id": shard_id,
        "key": key,
        "image_id": image_id_for(shard_id, key),
        "image_url": image_url,
        "image_ext": image_ext,
        "width": encoded["width"],
        "height": encoded["height"],
        "segments": encoded["segments"],
        "instances": encoded.get("instances", []),
        "panoptic_png": encoded.get("panoptic_png"),
        "semantic_png": encoded.get("semantic_png"),
        "uncertainty": uncertainty,
        "branch_disagreement": branch_disagreement,
        "error": None,
        "error_kind": None,
        "retryable": None,
    }


def error_row(
    *,
    run_id: str,
    shard: str,
    shard_id: str,
    key: str,
    error: str,
    error_kind: str = "unknown",
    retryable: bool | None = None,
    image_ext: str | None = None,
    image_url: str | None = None,
    width: int | None = None,
    height: int | None = None,
) -> dict[str, Any]:
    """Row of a sample that could not be labelled.

    ``error`` must be a non-empty reason (naming the image's location), ``error_kind`` one of
    :data:`pipeline.errors.KINDS` (else ``ValueError``); ``retryable`` defaults to the kind's.
    """
    from pipeline.errors import KINDS, is_retryable

    if not error:
        raise ValueError("error rows need a non-empty error message")
    if error_kind not in KINDS:
        raise ValueError(f"unknown error_kind {error_kind!r} for {shard_id}/{key}; known: {sorted(KINDS)}")
    if retryable is None:
        retryable = is_retryable(error_kind)
    return {
        "run_id": run_id,
        "shard": shard,
        "shard_id": shard_id,
        "key": key,
        "image_id": image_id_for(shard_id, key),
        "image_url": image_url,
        "image_ext": image_ext,
        "width": width,
        "height": height,
        "segments": [],
        "instances": [],
        "panoptic_png": None,
        "semantic_png": None,
        "uncertainty": None,
        "branch_disagreement": None,
        "error": error,
        "error_kind": error_kind,
        "retryable": bool(retryable),
    }


def _normalise_row(row: dict[str, Any], index: int) -> dict[str, Any]:
    extra = set(row) - set(COLUMNS)
    if extra:
        raise ValueError(f"row {index} has unknown columns {sorted(extra)}; known: {list(COLUMNS)}")
    for name in _REQUIRED:
        if not row.get(name):
            raise ValueError(f"row {index} is missing {name!r}: { ({k: row.get(k) for k in _REQUIRED}) }")
    out = dict(row)
    if out.get("image_id") is None:
        out["image_id"] = image_id_for(out["shard_id"], out["key"])
    for name in ("segments", "instances"):
        if out.get(name) is None:
            out[name] = []
    if out.get("error") is None and (out.get("width") is None or out.get("height") is None):
        raise ValueError(f"labelled row {index} ({out['shard_id']}/{out['key']}) needs width and height")
    return out


def rows_to_table(rows: list[dict[str, Any]], provenance: RunProvenance | None) -> pa.Table:
    """Validate row dicts (as from :func:`label_row` / :func:`error_row`) and build an output table.

    Missing optional columns are filled (``image_id`` computed, lists empty, others null); unknown
    columns, missing ``run_id``/``shard``/``shard_id``/``key`` or a labelled row without a size raise
    ``ValueError`` naming the row.
    """
    normalised = [_normalise_row(r, i) for i, r in enumerate(rows)]
    return pa.Table.from_pylist(normalised, schema=output_schema(provenance))
