"""Score any past annotation run against ground truth: ``run_evaluation(EvaluateConfig(...)) -> EvaluationResult``.

The ``odise-evaluate`` command and the Prefect ``evaluate`` flow call this; it imports neither Ray nor
Prefect nor torch. The metrics themselves live in :mod:`pipeline.evaluate.metrics` (COCO PQ / SQ / RQ, mIoU,
mask AP); this module reads the two sides, pairs them and feeds the evaluator.

Inputs
------
* Ground truth, one of:

  - a COCO panoptic JSON (``ground_truth``) + its folder of panoptic PNGs (``ground_truth_png``; default:
    the folder next to the JSON with the JSON's name minus ``.json``, the COCO layout
    ``panoptic_val2017.json`` + ``panoptic_val2017/``);
  - labeled WebDataset shards (``ground_truth_shards``: a folder, one ``.tar`` URL or a list of them; the
    categories come from ``categories.json`` in the (first) shard's folder). See :mod:`pipeline.groundtruth`.

  Only the JSON / the shards' segment lists and *encoded* PNGs are held in memory (a few tens of KB per
  image); each GT PNG is decoded when its image is scored.
* Predictions: the output folder of ``odise-annotate`` (``<predictions>/parquet/*.parquet``, one row per
  image, schema in :mod:`pipeline.schema`; ``<predictions>/provenance.json`` names the vocabulary). The
  Parquet files are streamed batch by batch (``pyarrow.dataset``), one image in memory at a time.
  Per row: ``panoptic_png`` is decoded (or, when the run did not store PNGs, the id map is rebuilt from
  the segments' RLEs); ``semantic_png`` gives the semantic prediction for mIoU (when absent, the
  panoptic prediction's categories are used); ``instances`` (RLE + score) give mask AP.

Categories
----------
The evaluated categories are the ground truth's (or ``categories``, a COCO ``categories`` list / JSON URL,
when given). Category ids must mean the same on both sides: the ids of the prediction vocabulary
(``provenance.json`` -> ``categories``) must be exactly the evaluated ids, otherwise
:class:`CategoryMismatchError` lists the ids only one side has (names may differ, e.g. COCO's
``wall-other-merged`` vs the vocabulary's ``wall``; an ``isthing`` disagreement is reported as a warning).
Id 0 is reserved for unlabeled pixels. Without a provenance record the predicted ids are checked row by
row instead.

Pairing ground truth with prediction rows (``match``)
----------------------------------------------------
Every GT image and every prediction row gets a *pairing name*; a row is paired with the GT image of the
same name. ``ext(x)`` removes a trailing image extension (``.jpg``, ``.jpeg``, ``.png``, ... as in
:data:`pipeline.shards.IMAGE_EXTENSIONS`, any case) from the last path component; paths use ``/``.

* ``"file_name"`` (default): GT name = ``ext(file_name)`` of the COCO ``images`` entry (shards: the
  ``file_name`` of ``segments.json``; when empty, the shard key); row name = ``ext(key)``. A row whose
  name matches no GT name is paired by base name (last path component) instead, when exactly one GT
  image has that base name. Examples: GT ``000000000139.jpg`` pairs with rows keyed
  ``000000000139.jpg`` (an annotate run over the image folder), ``val2017/000000000139.jpg`` (over a parent
  folder) or ``000000000139`` (a tar shard with member ``000000000139.jpg``).
* ``"image_id"``: GT name = ``str(image_id)``; row name = the base name of ``ext(key)``; on both sides an
  all-digit name loses its leading zeros. GT image id ``139`` pairs with rows keyed ``139`` (labeled
  shards made by :func:`pipeline.groundtruth.convert_coco_panoptic_to_shards`) or ``000000000139.jpg``.
* ``"key"``: GT name = the labeled shard's sample key (COCO JSON: ``sample_key(image_id)``, the key the
  converter writes); row name = ``key`` unchanged. For runs over labeled shards.

Two rows paired with one GT image, or two GT images with one name, are errors. Rows that pair with no GT
image are ignored and counted (``details.unmatched_predictions``); if *no* row pairs, the run fails with
examples of both sides' names and a hint to change ``match``. GT images without a prediction row count as
empty predictions (every GT segment a false negative) and are listed in ``details.missing_predictions``;
rows with an ``error`` (images the run could not label) count as empty predictions as well
(``details.error_rows``). Prediction and GT of a pair must have the same height and width.

Output
------
:class:`~pipeline.evaluate.metrics.EvaluationResult` whose ``details`` record sources, pairing counts and
examples, warnings and throughput; written as JSON (``EvaluationResult.to_dict`` layout) to ``json`` when
given (local path or fsspec URL). ``storage_options`` never appear in the output.
"""

from __future__ import annotations

import json
import logging
import posixpath
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EvaluateConfig, MatchMode
from pipeline.evaluate.metrics import EvaluationResult, PanopticEvaluator
from pipeline.groundtruth import (
    CATEGORIES_FILE,
    CocoPanopticReader,
    EncodedPanopticRecord,
    PanopticRecord,
    iter_labeled_shards_encoded,
    sample_key,
)
from pipeline.shards import SHARD_ERROR_KEY

__all__ = [
    "CategoryMismatchError",
    "run_evaluation",
    "gt_pairing_name",
    "prediction_pairing_name",
    "check_categories",
]

log = logging.getLogger(__name__)

_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif", "ppm", "pgm", "pnm", "jp2")
_EXAMPLES = 20  # names listed per category of problem in ``details``
_BATCH_ROWS = 32  # Parquet rows per streamed batch (each row holds two PNGs)


class CategoryMismatchError(ValueError):
    """Ground-truth and prediction category ids do not mean the same classes (or are unknown)."""


# --------------------------------------------------------------------------------------------------
# Pairing names
# --------------------------------------------------------------------------------------------------


def _strip_image_ext(name: str) -> str:
    name = name.replace("\\", "/").removeprefix("./")
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if dot and stem and ext.lower() in _IMAGE_EXTENSIONS:
        base = stem
    return f"{head}/{base}" if head else base


def _strip_zeros(name: str) -> str:
    return str(int(name)) if name.isdigit() else name


def gt_pairing_name(record: EncodedPanopticRecord, match: MatchMode) -> str:
    """Pairing name of a ground-truth image (rules in the module doc)."""
    if match == "file_name":
        return _strip_image_ext(record.file_name) if record.file_name else str(record.key or record.image_id)
    if match == "image_id":
        return _strip_zeros(str(record.image_id))
    if match == "key":
        return record.key if record.key is not None else sample_key(record.image_id)
    raise ValueError(f"unknown match mode {match!r}; use 'file_name', 'image_id' or 'key'")


def prediction_pairing_name(key: str, match: MatchMode) -> str:
    """Pairing name of a prediction row with sample ``key`` (rules in the module doc)."""
    if match == "file_name":
        return _strip_image_ext(key)
    if match == "image_id":
        return _strip_zeros(_strip_image_ext(key).rpartition("/")[2])
    if match == "key":
        return key
    raise ValueError(f"unknown match mode {match!r}; use 'file_name', 'image_id' or 'key'")


class _GTIndex:
    """Pairing name -> GT record index (and base name -> index for the ``file_name`` fallback)."""

    _AMBIGUOUS = -1

    def __init__(self, records: list[EncodedPanopticRecord], match: MatchMode) -> None:
        self.match = match
        self.names: list[str] = []
        self.by_name: dict[str, int] = {}
        self.by_base: dict[str, int] = {}
        for i, rec in enumerate(records):
            name = gt_pairing_name(rec, match)
            if name in self.by_name:
                other = records[self.by_name[name]]
                raise ValueError(
                    f"ground-truth images {other.image_id!r} ({other.where}) and {rec.image_id!r} ({rec.where}) "
                    f"have the same pairing name {name!r} under match={match!r}; use another match mode"
                )
            self.by_name[name] = i
            self.names.append(name)
            base = name.rpartition("/")[2]
            self.by_base[base] = self._AMBIGUOUS if base in self.by_base else i

    def lookup(self, name: str) -> int | None:
        idx = self.by_name.get(name)
        if idx is None and self.match == "file_name":
            idx = self.by_base.get(name.rpartition("/")[2])
            if idx == self._AMBIGUOUS:
                idx = None
        return idx


# --------------------------------------------------------------------------------------------------
# Categories
# --------------------------------------------------------------------------------------------------


def _read_json(url: str, storage_options: Mapping[str, Any], what: str) -> Any:
    import fsspec

    try:
        with fsspec.open(url, "rb", **dict(storage_options)) as f:
            raw = f.read()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{what} {url} not found") from e
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{what} {url} is not valid JSON ({e})") from e


def _categories_dict(raw: Any, where: str) -> dict[int, dict[str, Any]]:
    """A COCO ``categories`` list (or an object holding one) -> ``{id: category}``, checked."""
    if isinstance(raw, Mapping) and "categories" in raw:
        raw = raw["categories"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}: categories must be a non-empty list of {{'id', 'name', 'isthing'}}")
    out: dict[int, dict[str, Any]] = {}
    for c in raw:
        if not isinstance(c, Mapping) or not {"id", "name", "isthing"} <= set(c):
            raise ValueError(f"{where}: every category needs 'id', 'name' and 'isthing', got {c!r}")
        cat_id = int(c["id"])
        if cat_id in out:
            raise ValueError(f"{where}: category id {cat_id} appears twice")
        if cat_id == 0:
            raise ValueError(f"{where}: category id 0 is reserved for unlabeled pixels")
        out[cat_id] = dict(c)
    return out


def _fmt_ids(ids: set[int], cats: Mapping[int, Any], limit: int = 15) -> str:
    shown = ", ".join(f"{i} ({cats[i].get('name', '?')})" for i in sorted(ids)[:limit])
    return shown + (f", ... ({len(ids)} in all)" if len(ids) > limit else "")


def check_categories(
    evaluated: Mapping[int, Mapping[str, Any]],
    vocabulary: list[Mapping[str, Any]] | None,
    *,
    gt_where: str,
    pred_where: str,
) -> list[str]:
    """Check that the prediction vocabulary's ids are exactly the evaluated (GT) ids.

    Returns:
        Warnings (``isthing`` disagreements). Raises :class:`CategoryMismatchError` when the id sets
        differ, listing the ids (and names) found on one side only.
    """
    if vocabulary is None:
        return [f"{pred_where} has no provenance categories; predicted ids are checked row by row"]
    vocab = {int(c["id"]): c for c in vocabulary}
    only_gt = set(evaluated) - set(vocab)
    only_pred = set(vocab) - set(evaluated)
    if only_gt or only_pred:
        parts = []
        if only_gt:
            parts.append(f"ground-truth ids not in the prediction vocabulary: {_fmt_ids(only_gt, evaluated)}")
        if only_pred:
            parts.append(f"prediction vocabulary ids not in the ground truth: {_fmt_ids(only_pred, vocab)}")
        hint = (
            "The run must use a vocabulary whose ids are the ground truth's (e.g. vocab_file='coco_panoptic' "
            "for COCO panoptic), or pass `categories` to evaluate a different set."
        )
        raise CategoryMismatchError(
            f"category mismatch between {gt_where} ({len(evaluated)} categories) and the vocabulary of "
            f"{pred_where} ({len(vocab)} categories): {'; '.join(parts)}. {hint}"
        )
    warnings = []
    for cat_id, info in evaluated.items():
        gt_thing, pred_thing = bool(int(info["isthing"])), bool(int(vocab[cat_id].get("isthing", 0)))
        if gt_thing != pred_thing:
            warnings.append(
                f"category {cat_id}: ground truth {info.get('name')!r} isthing={gt_thing}, vocabulary "
                f"{vocab[cat_id].get('name')!r} isthing={pred_thing} (the ground truth's value is used)"
            )
    return warnings


# --------------------------------------------------------------------------------------------------
# Ground truth
# --------------------------------------------------------------------------------------------------


@dataclass
class _GroundTruth:
    categories: dict[int, dict[str, Any]]
    records: list[EncodedPanopticRecord]
    description: dict[str, Any]


def _load_ground_truth(cfg: EvaluateConfig) -> _GroundTruth:
    so = cfg.storage_options
    override = None
    if cfg.categories is not None:
        raw = cfg.categories
        where = "categories"
        if isinstance(raw, str):
            where = raw
            raw = _read_json(raw, so, "categories file")
        override = _categories_dict(raw, where)

    if cfg.ground_truth is not None:
        try:
            reader = CocoPanopticReader(cfg.ground_truth, str(cfg.png_dir), storage_options=so)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"ground-truth JSON {cfg.ground_truth} not found") from e
        categories = override or _categories_dict(list(reader.categories.values()), cfg.ground_truth)
        reader.categories = categories  # segments are checked against the evaluated categories
        records = list(reader.iter_encoded())
        description = {"kind": "coco_panoptic", "json": cfg.ground_truth, "png_dir": cfg.png_dir}
    else:
        shards = cfg.ground_truth_shards
        assert shards is not None
        if override is not None:
            categories = override
        else:
            first = shards if isinstance(shards, str) else shards[0]
            folder = posixpath.dirname(first) if first.endswith(".tar") else first.rstrip("/")
            url = f"{folder}/{CATEGORIES_FILE}"
            categories = _categories_dict(_read_json(url, so, "ground-truth categories"), url)
        try:
            records = list(iter_labeled_shards_encoded(shards, storage_options=so, categories=categories))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"ground-truth shards {shards}: {e}") from e
        description = {"kind": "labeled_shards", "shards": shards}
    if not records:
        raise ValueError(f"the ground truth ({description}) has no images")
    description["num_images"] = len(records)
    return _GroundTruth(categories, records, description)


# --------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------


@dataclass
class _Predictions:
    fs: Any
    root: str
    files: list[str]
    provenance: dict[str, Any] | None
    url: str
    uncommitted: list[str] = field(default_factory=list)

    def display(self, path: str) -> str:
        return self.fs.unstrip_protocol(path) if "://" in self.url else path


def _open_predictions(cfg: EvaluateConfig) -> _Predictions:
    from fsspec.core import url_to_fs

    url = cfg.predictions.rstrip("/")
    fs, root = url_to_fs(url, **cfg.storage_options)
    root = root.rstrip("/")
    if not fs.exists(root):
        raise FileNotFoundError(f"prediction folder {url} does not exist")
    parquet_dir = posixpath.join(root, "parquet")
    if not fs.isdir(parquet_dir):
        raise FileNotFoundError(
            f"{url} has no parquet/ folder: not an odise-annotate output (expected {url}/parquet/*.parquet)"
        )
    files = sorted(
        p
        for p in fs.find(parquet_dir)
        if p.endswith(".parquet") and not posixpath.basename(p).startswith((".", "_"))
    )
    if not files:
        raise FileNotFoundError(f"no Parquet files under {url}/parquet (has the run committed any shard?)")

    provenance = None
    prov_path = posixpath.join(root, "provenance.json")
    if fs.exists(prov_path):
        try:
            provenance = json.loads(fs.cat_file(prov_path))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{url}/provenance.json is not valid JSON ({e})") from e
    else:
        provenance = _schema_provenance(fs, files[0], url)

    committed = {
        posixpath.basename(p)[: -len(".json")] for p in fs.glob(posixpath.join(root, "_commits", "*.json"))
    }
    uncommitted = [p for p in files if posixpath.basename(p)[: -len(".parquet")] not in committed]
    return _Predictions(fs, root, files, provenance, url, [posixpath.basename(p) for p in uncommitted])


def _schema_provenance(fs: Any, path: str, url: str) -> dict[str, Any] | None:
    import pyarrow.parquet as pq

    from pipeline.schema import METADATA_PROVENANCE_KEY

    try:
        with fs.open(path, "rb") as f:
            schema = pq.read_schema(f)
    except Exception as e:  # noqa: BLE001 - any reader failure means the file is unreadable
        raise ValueError(f"unreadable predictions file {path} ({type(e).__name__}: {e})") from e
    raw = (schema.metadata or {}).get(METADATA_PROVENANCE_KEY)
    return None if raw is None else json.loads(raw)


def _iter_rows(preds: _Predictions, columns: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(file, row)`` for every row of every file, streamed ``_BATCH_ROWS`` rows at a time."""
    import pyarrow as pa
    import pyarrow.dataset as pads
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.schema import METADATA_VERSION_KEY, READABLE_SCHEMA_VERSIONS

    filesystem = None if isinstance(preds.fs, LocalFileSystem) else preds.fs
    for path in preds.files:
        shown = preds.display(path)
        try:
            dataset = pads.dataset(path, format="parquet", filesystem=filesystem)
            version = (dataset.schema.metadata or {}).get(METADATA_VERSION_KEY)
            if version is not None and version.decode() not in {str(v) for v in READABLE_SCHEMA_VERSIONS}:
                raise ValueError(
                    f"predictions file {shown} has schema version {version.decode()}, "
                    f"this reader knows versions {list(READABLE_SCHEMA_VERSIONS)}"
                )
            missing = [c for c in columns if c not in dataset.schema.names]
            if missing:
                raise ValueError(
                    f"predictions file {shown} lacks columns {missing}: not an odise-annotate output"
                )
            batches = dataset.to_batches(columns=columns, batch_size=_BATCH_ROWS)
            while True:
                try:
                    batch = next(batches)
                except StopIteration:
                    break
                for row in batch.to_pylist():
                    yield shown, row
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"unreadable predictions file {shown} ({type(e).__name__}: {e})") from e


# --------------------------------------------------------------------------------------------------
# One image
# --------------------------------------------------------------------------------------------------


@dataclass
class _Prediction:
    id_map: np.ndarray
    segments: list[dict[str, int]]
    semantic: np.ndarray | None
    instances: list[dict[str, Any]]
    source: str  # "panoptic_png" | "rle"


def _decode_prediction(
    row: dict[str, Any],
    shape: tuple[int, int],
    categories: Mapping[int, Any],
    where: str,
    cfg: EvaluateConfig,
) -> _Prediction:
    from pipeline.encode import png_to_panoptic, png_to_semantic, segments_to_panoptic

    height, width = shape
    if (row.get("height"), row.get("width")) != (height, width):
        raise ValueError(
            f"{where}: prediction is {row.get('height')}x{row.get('width')} (HxW) but the ground truth is "
            f"{height}x{width}"
        )
    segments = row.get("segments") or []
    used = {int(s["category_id"]) for s in segments}
    instances = []
    if cfg.instance_ap:
        instances = [
            {"category_id": int(i["category_id"]), "score": float(i["score"]), "segmentation": i["rle"]}
            for i in row.get("instances") or []
        ]
        used |= {i["category_id"] for i in instances}
    unknown = used - set(categories)
    if unknown:
        raise CategoryMismatchError(
            f"{where}: predicted category ids {sorted(unknown)[:10]} are not evaluated categories"
        )
    try:
        if row.get("panoptic_png"):
            id_map, source = png_to_panoptic(row["panoptic_png"]), "panoptic_png"
        else:
            for s in segments:
                if [int(v) for v in s["rle"]["size"]] != [height, width]:
                    raise ValueError(f"segment {s['id']} RLE size {s['rle']['size']} != {[height, width]}")
            id_map, source = segments_to_panoptic(segments, height, width), "rle"
        semantic = None
        if cfg.semantic and row.get("semantic_png"):
            semantic = png_to_semantic(row["semantic_png"])
            if semantic.shape != shape:
                raise ValueError(f"semantic_png is {semantic.shape}, expected {shape}")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    except Exception as e:  # noqa: BLE001 - PIL / pycocotools failures on corrupt bytes
        raise ValueError(f"{where}: unreadable prediction ({type(e).__name__}: {e})") from e
    if id_map.shape != shape:
        raise ValueError(f"{where}: panoptic_png is {id_map.shape}, expected {shape}")
    return _Prediction(
        id_map=id_map,
        segments=[{"id": int(s["id"]), "category_id": int(s["category_id"])} for s in segments],
        semantic=semantic,
        instances=instances,
        source=source,
    )


def _empty_prediction(shape: tuple[int, int]) -> _Prediction:
    return _Prediction(np.zeros(shape, np.int32), [], None, [], "empty")


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


class _Examples:
    """A counter that keeps the first few examples."""

    def __init__(self) -> None:
        self.count = 0
        self.examples: list[Any] = []

    def add(self, example: Any) -> None:
        self.count += 1
        if len(self.examples) < _EXAMPLES:
            self.examples.append(example)

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "examples": self.examples}


def _write_json(url: str, text: str, storage_options: Mapping[str, Any]) -> None:
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    fs, path = url_to_fs(url, **dict(storage_options))
    if isinstance(fs, LocalFileSystem):
        parent = posixpath.dirname(path)
        if parent:
            fs.makedirs(parent, exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(text.encode("utf-8"))


def run_evaluation(cfg: EvaluateConfig) -> EvaluationResult:
    """Score the predictions of ``cfg.predictions`` against the ground truth (see the module doc).

    Steps: 1. index the ground truth (JSON / shards; PNGs stay encoded); 2. open the predictions and check
    the categories; 3. stream the prediction rows, pair each with its GT image and add it to a
    :class:`~pipeline.evaluate.metrics.PanopticEvaluator`; 4. GT images without a row are added as empty
    predictions; 5. results (+ ``details``) are returned and, when ``cfg.json_output`` is set, written.

    Raises:
        FileNotFoundError: the prediction folder, its Parquet files, the GT JSON / PNGs / shards or the
            categories file are missing (the message names the path).
        CategoryMismatchError: GT and prediction category ids differ.
        ValueError: unreadable files (named), mismatched image sizes, ambiguous pairing, or no prediction
            row paired with any GT image.
    """
    started = time.perf_counter()
    # 1. ground truth
    gt = _load_ground_truth(cfg)
    index = _GTIndex(gt.records, cfg.match)
    # 2. predictions and categories
    preds = _open_predictions(cfg)
    vocab = preds.provenance.get("categories") if preds.provenance else None
    gt_where = cfg.ground_truth or str(cfg.ground_truth_shards)
    if cfg.categories is not None:
        gt_where = "the categories given"
    warnings = check_categories(gt.categories, vocab or None, gt_where=gt_where, pred_where=preds.url)
    if preds.uncommitted:
        warnings.append(
            f"{len(preds.uncommitted)} Parquet file(s) have no commit marker (run interrupted?); "
            f"scored anyway: {preds.uncommitted[:5]}"
        )
    for w in warnings:
        log.warning("%s", w)

    # 3. stream the predictions
    evaluator = PanopticEvaluator(
        gt.categories, semantic=cfg.semantic, instance=cfg.instance_ap, ignore_value=0
    )
    columns = ["shard_id", "key", "error", "width", "height", "segments", "panoptic_png"]
    columns += ["semantic_png"] if cfg.semantic else []
    columns += ["instances"] if cfg.instance_ap else []
    paired: dict[int, str] = {}
    unmatched, error_rows, shard_errors = _Examples(), _Examples(), _Examples()
    sources = {"panoptic_png": 0, "rle": 0, "semantic_png": 0, "semantic_from_panoptic": 0}
    rows_read = n_instances = 0

    def add(idx: int, record: PanopticRecord, pred: _Prediction, where: str) -> None:
        try:
            evaluator.add(
                record.id_map,
                record.segments,
                pred.id_map,
                pred.segments,
                image_id=index.names[idx],
                pred_semantic=pred.semantic,
                pred_instances=pred.instances,
            )
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e

    for shown, row in _iter_rows(preds, columns):
        rows_read += 1
        label = f"{row['shard_id']}/{row['key']}"
        if row["key"] == SHARD_ERROR_KEY:
            shard_errors.add({"row": label, "error": row.get("error")})
            continue
        idx = index.lookup(prediction_pairing_name(row["key"], cfg.match))
        if idx is None:
            unmatched.add(label)
            continue
        if idx in paired:
            raise ValueError(
                f"prediction rows {paired[idx]} and {label} (in {shown}) both pair with ground-truth image "
                f"{gt.records[idx].image_id!r} under match={cfg.match!r}"
            )
        paired[idx] = label
        record = gt.records[idx].decode()
        where = f"{shown}: row {label} (ground truth {record.image_id!r})"
        shape = (record.height, record.width)
        if row.get("error") is not None:
            error_rows.add({"row": label, "error": row["error"]})
            add(idx, record, _empty_prediction(shape), where)
            continue
        pred = _decode_prediction(row, shape, gt.categories, where, cfg)
        sources[pred.source] += 1
        sources["semantic_png" if pred.semantic is not None else "semantic_from_panoptic"] += 1
        n_instances += len(pred.instances)
        add(idx, record, pred, where)
        if len(paired) % 500 == 0:
            log.info("scored %d / %d images", len(paired), len(gt.records))

    if rows_read == 0:
        raise ValueError(f"{preds.url}: the Parquet files hold no rows")
    if not paired:
        gt_examples = index.names[:3]
        raise ValueError(
            f"no prediction row of {preds.url} pairs with a ground-truth image under match={cfg.match!r} "
            f"({rows_read} rows read; e.g. rows {unmatched.examples[:3]} -> names "
            f"{[prediction_pairing_name(r.split('/', 1)[1], cfg.match) for r in unmatched.examples[:3]]}, "
            f"ground-truth names {gt_examples}). Try match='file_name', 'image_id' or 'key' "
            "(see pipeline.evaluate.run)."
        )

    # 4. GT images without a prediction row: empty predictions
    missing = _Examples()
    for idx, rec in enumerate(gt.records):
        if idx not in paired:
            missing.add(index.names[idx])
            record = rec.decode()
            add(idx, record, _empty_prediction((record.height, record.width)), f"{rec.where} (no prediction)")
    if missing.count:
        warnings.append(
            f"{missing.count} ground-truth image(s) have no prediction row; scored as empty predictions"
        )
    if cfg.instance_ap and n_instances == 0:
        warnings.append(
            "the run has no instance predictions (instance output off?); mask AP is 0 or undefined"
        )

    # 5. results
    result = evaluator.result()
    elapsed = time.perf_counter() - started
    prov = preds.provenance or {}
    details = {
        "ground_truth": gt.description,
        "predictions": {
            "url": preds.url,
            "files": len(preds.files),
            "rows": rows_read,
            "run_id": prov.get("run_id"),
            "model_variant": prov.get("model_variant"),
            "vocabulary_source": prov.get("vocabulary_source"),
            "vocabulary_sha256": prov.get("vocabulary_sha256"),
            "plumbing_check": (prov.get("settings") or {}).get("plumbing_check"),
        },
        "match": cfg.match,
        "paired": len(paired),
        "missing_predictions": missing.to_dict(),
        "error_rows": error_rows.to_dict(),
        "unmatched_predictions": unmatched.to_dict(),
        "shard_errors": shard_errors.to_dict(),
        "prediction_sources": sources,
        "instance_predictions": n_instances,
        "warnings": warnings,
        "elapsed_s": round(elapsed, 3),
        "images_per_s": round(result.num_images / elapsed, 3) if elapsed > 0 else None,
    }
    result = EvaluationResult(**{**result.__dict__, "details": details})
    if cfg.json_output:
        _write_json(cfg.json_output, result.to_json() + "\n", cfg.storage_options)
    log.info(
        "evaluated %d images (%d paired, %d missing) in %.1f s: PQ %.4f",
        result.num_images,
        len(paired),
        missing.count,
        elapsed,
        result.overall.pq,
    )
    return result
