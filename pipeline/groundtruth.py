"""Ground truth: COCO panoptic reader and labeled WebDataset shards (format, reader, converter).

Everything here reads and writes local paths or fsspec URLs (``s3://bucket/prefix`` with
``storage_options``, e.g. ``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}``).
fsspec and webdataset are imported only when used. No file is ever extracted to disk.

Panoptic PNG encoding
---------------------
An RGB PNG whose pixel ``(R, G, B)`` holds the segment id ``R + 256*G + 256**2*B`` (COCO panoptic,
``panopticapi.utils.rgb2id``); id 0 = VOID / unlabeled. See :func:`rgb2id` and :func:`id2rgb`.

COCO panoptic input
-------------------
A JSON file with ``images`` (``id``, ``file_name``, ``height``, ``width``), ``annotations``
(``image_id``, ``file_name`` of the panoptic PNG, ``segments_info``: ``[{"id", "category_id",
"area", "bbox": [x, y, w, h], "iscrowd"}]``) and ``categories`` (``[{"id", "name", "isthing", ...}]``),
plus a folder of panoptic PNGs and (optionally) a folder of images. :class:`CocoPanopticReader`
iterates the annotations lazily (one PNG decoded at a time) as :class:`PanopticRecord` objects.

Labeled WebDataset shards (format version 1)
--------------------------------------------
The training / evaluation input format of this product. A dataset is a folder (local or URL)::

    <dataset>/categories.json        COCO "categories" list: [{"id", "name", "isthing", ...}, ...]
    <dataset>/shard-000000.tar       samples 0 .. N-1
    <dataset>/shard-000001.tar       ...

Each shard is an uncompressed POSIX tar; each sample is three consecutive members sharing a key
(the WebDataset convention: the key is the member name up to the first dot of its base name; read by
:mod:`pipeline.shards`, the one tar reader, with its safe-member and truncation rules)::

    <key>.jpg  (or <key>.png)        the image file, bytes exactly as in the source dataset
    <key>.panoptic.png               panoptic PNG, RGB id encoding above, same height and width
    <key>.segments.json              UTF-8 JSON object:
        {"image_id": int | str,      the COCO image id
         "file_name": str,           the COCO image file name (e.g. "000000000139.jpg")
         "segments_info": [{"id", "category_id", "area", "bbox", "iscrowd"}, ...],   as in COCO
         "caption": str,             optional, only present when a caption is known
         "captions": [str, ...],     optional: all captions of the image when there are several (COCO
                                     Captions has ~5); "caption" is then the first; training samples one
         "nouns": [str, ...]}        optional: the caption's nouns, extracted offline (training uses them
                                     instead of its lexicon-based extractor; see pipeline.train.data)

``<key>`` is the image id as a string with every character outside ``[A-Za-z0-9_-]`` replaced by
``_`` (no dots, so the WebDataset key split is unambiguous); keys are unique within a dataset. Member
names are relative; readers skip members whose names are absolute or contain ``..``. Every
``category_id`` is an ``id`` of ``categories.json``; segment ids are unique per sample and > 0.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.encode import id2rgb, panoptic_to_png, png_to_panoptic, rgb2id

__all__ = [
    "CATEGORIES_FILE",
    "SegmentInfo",
    "PanopticRecord",
    "EncodedPanopticRecord",
    "ConversionSummary",
    "rgb2id",
    "id2rgb",
    "decode_panoptic_png",
    "encode_panoptic_png",
    "sample_key",
    "CocoPanopticReader",
    "read_categories",
    "write_categories",
    "list_shards",
    "iter_labeled_shards",
    "iter_labeled_shards_encoded",
    "iter_shard_samples",
    "iter_tar_samples",
    "record_from_sample",
    "convert_coco_panoptic_to_shards",
    "LabeledShardWriter",
]

logger = logging.getLogger(__name__)

CATEGORIES_FILE = "categories.json"
"""Name of the categories sidecar next to the shards of a labeled dataset."""
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")
"""Image member suffixes accepted in labeled shards (``png`` is the image, ``panoptic.png`` the GT)."""


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SegmentInfo:
    """One COCO panoptic ``segments_info`` entry.

    Attributes:
        id: segment id in the id map, >= 1.
        category_id: a category ``id``.
        area: pixel count as stored in the annotation.
        bbox: ``(x, y, w, h)`` in pixels as stored in the annotation.
        iscrowd: 1 for a crowd region, else 0.
    """

    id: int
    category_id: int
    area: int
    bbox: tuple[int, int, int, int]
    iscrowd: int = 0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, where: str = "segments_info") -> SegmentInfo:
        """Parse and check a COCO ``segments_info`` dict (missing ``area`` / ``bbox`` -> 0)."""
        try:
            seg_id, cat_id = int(d["id"]), int(d["category_id"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: entry needs integer 'id' and 'category_id', got {d!r}") from e
        if seg_id <= 0 or seg_id >= 256**3:
            raise ValueError(f"{where}: segment id {seg_id} must be in [1, {256**3})")
        bbox = d.get("bbox", (0, 0, 0, 0))
        if len(bbox) != 4:
            raise ValueError(f"{where}: segment {seg_id} bbox must have 4 numbers, got {bbox!r}")
        return cls(
            id=seg_id,
            category_id=cat_id,
            area=int(d.get("area", 0)),
            bbox=tuple(int(round(float(v))) for v in bbox),  # type: ignore[arg-type]
            iscrowd=int(bool(d.get("iscrowd", 0))),
        )

    def to_dict(self) -> dict[str, Any]:
        """The COCO ``segments_info`` dict."""
        return {
            "id": self.id,
            "category_id": self.category_id,
            "area": self.area,
            "bbox": list(self.bbox),
            "iscrowd": self.iscrowd,
        }


@dataclass
class PanopticRecord:
    """One ground-truth image.

    Attributes:
        image_id: COCO image id (int, or str for datasets such as Cityscapes).
        file_name: image file name (COCO ``images[].file_name``).
        height, width: size of the image and of ``id_map``.
        id_map: ``HxW`` int32 segment ids, 0 = VOID.
        segments: the segments of the image, in annotation order.
        image_bytes: the encoded image file, unchanged, or None when not read.
        caption: optional caption.
        captions: optional list of all captions when there are several (``caption`` is the first).
        panoptic_file_name: the panoptic PNG's file name in a COCO folder (None from shards).
        key: the WebDataset sample key (None from a COCO folder).
    """

    image_id: int | str
    file_name: str
    height: int
    width: int
    id_map: np.ndarray
    segments: list[SegmentInfo]
    image_bytes: bytes | None = None
    caption: str | None = None
    panoptic_file_name: str | None = None
    key: str | None = None
    captions: list[str] | None = None

    def decode_image(self, *, max_pixels: int | None = None) -> np.ndarray:
        """The image as ``HxWx3`` uint8 RGB (requires ``image_bytes``), decoded by the pipeline's one image
        decoder (:func:`pipeline.images.decode_image`: EXIF orientation applied, alpha on white,
        decompression-bomb guard at ``max_pixels``, default :data:`pipeline.images.DEFAULT_MAX_PIXELS`).

        Raises:
            ValueError: no image bytes, or :class:`pipeline.images.ImageDecodeError` (a ``ValueError``)
                naming the image.
        """
        from pipeline.images import DEFAULT_MAX_PIXELS, decode_image

        if self.image_bytes is None:
            raise ValueError(f"image {self.image_id!r}: no image bytes were read")
        where = f"image {self.image_id!r}" + (
            f" (sample {self.key!r})" if self.key else f" ({self.file_name})"
        )
        return decode_image(self.image_bytes, max_pixels=max_pixels or DEFAULT_MAX_PIXELS, source=where)

    def segments_json(self) -> dict[str, Any]:
        """The ``<key>.segments.json`` object of the labeled-shard format."""
        out: dict[str, Any] = {
            "image_id": self.image_id,
            "file_name": self.file_name,
            "segments_info": [s.to_dict() for s in self.segments],
        }
        if self.caption is not None:
            out["caption"] = self.caption
        if self.captions and len(self.captions) > 1:
            out["captions"] = list(self.captions)
        return out


@dataclass(frozen=True)
class EncodedPanopticRecord:
    """One ground-truth image whose panoptic PNG is not decoded yet (small: a dataset's worth fits in memory).

    Used to index a whole ground truth before pairing it with predictions in any order
    (:mod:`pipeline.evaluate.run`); :meth:`decode` gives the full :class:`PanopticRecord` when needed.

    Attributes:
        image_id, file_name, segments, caption, key: as in :class:`PanopticRecord`.
        where: human-readable location for error messages (file and annotation / shard and sample).
        png_bytes: the panoptic PNG bytes (labeled shards), or None when it is read from ``png_url``.
        png_url: URL of the panoptic PNG (COCO folder), or None when ``png_bytes`` is given.
        height, width: the size the ``images`` entry declares (COCO), or None when unknown (shards).
        panoptic_file_name: the PNG's file name in a COCO folder (None from shards).
        storage_options: fsspec options used to read ``png_url``.
    """

    image_id: int | str
    file_name: str
    segments: list[SegmentInfo]
    where: str
    png_bytes: bytes | None = None
    png_url: str | None = None
    height: int | None = None
    width: int | None = None
    caption: str | None = None
    key: str | None = None
    panoptic_file_name: str | None = None
    storage_options: Mapping[str, Any] | None = None

    def read_png(self) -> bytes:
        """The panoptic PNG bytes (read from ``png_url`` if not held)."""
        if self.png_bytes is not None:
            return self.png_bytes
        if self.png_url is None:
            raise ValueError(f"{self.where}: no panoptic PNG bytes and no PNG URL")
        try:
            return _read_bytes(self.png_url, self.storage_options)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{self.where}: panoptic PNG {self.png_url} not found") from e

    def decode(self, image_bytes: bytes | None = None) -> PanopticRecord:
        """Read (if needed) and decode the PNG; check its size against ``height`` / ``width`` when known."""
        where = f"{self.where}: {self.png_url or 'panoptic.png'}"
        id_map = decode_panoptic_png(self.read_png(), where=where)
        height, width = id_map.shape
        if (self.height or height, self.width or width) != (height, width):
            raise ValueError(
                f"{self.where}: panoptic PNG is {height}x{width} but 'images' says {self.height}x{self.width}"
            )
        return PanopticRecord(
            image_id=self.image_id,
            file_name=self.file_name,
            height=int(height),
            width=int(width),
            id_map=id_map,
            segments=list(self.segments),
            image_bytes=image_bytes,
            caption=self.caption,
            panoptic_file_name=self.panoptic_file_name,
            key=self.key,
        )


@dataclass(frozen=True)
class ConversionSummary:
    """What :func:`convert_coco_panoptic_to_shards` wrote.

    Attributes:
        shards: URLs of the shards, in order.
        num_samples: samples written.
        categories_url: URL of ``categories.json``.
        samples_per_shard: the shard size used (the last shard may be smaller).
    """

    shards: list[str]
    num_samples: int
    categories_url: str
    samples_per_shard: int


# --------------------------------------------------------------------------------------------------
# Panoptic PNG encoding
# --------------------------------------------------------------------------------------------------


# One codec for the whole package (pipeline.encode); the names below are kept for this module's users.
encode_panoptic_png = panoptic_to_png
decode_panoptic_png = png_to_panoptic


def sample_key(image_id: int | str) -> str:
    """WebDataset key of an image id: characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    key = re.sub(r"[^A-Za-z0-9_-]", "_", str(image_id))
    if not key:
        raise ValueError(f"image id {image_id!r} gives an empty sample key")
    return key


# --------------------------------------------------------------------------------------------------
# fsspec helpers
# --------------------------------------------------------------------------------------------------


def _join(base: str, name: str) -> str:
    return base.rstrip("/") + "/" + name


def _safe_relative(name: str, where: str) -> str:
    """Reject absolute names and ``..`` components of a file name read from a dataset."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or ".." in norm.split("/") or re.match(r"^[A-Za-z]:", norm):
        raise ValueError(f"{where}: unsafe file name {name!r} (absolute or containing '..')")
    return norm


def _read_bytes(url: str, storage_options: Mapping[str, Any] | None) -> bytes:
    import fsspec

    with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
        return f.read()


def _read_json(url: str, storage_options: Mapping[str, Any] | None) -> Any:
    try:
        return json.loads(_read_bytes(url, storage_options))
    except json.JSONDecodeError as e:
        raise ValueError(f"{url}: invalid JSON ({e})") from e


def _check_categories(categories: Any, where: str) -> dict[int, dict[str, Any]]:
    """COCO ``categories`` list -> ``{id: dict}``, checked."""
    if not isinstance(categories, list) or not categories:
        raise ValueError(f"{where}: 'categories' must be a non-empty list")
    out: dict[int, dict[str, Any]] = {}
    for c in categories:
        if not isinstance(c, Mapping) or "id" not in c or "name" not in c or "isthing" not in c:
            raise ValueError(f"{where}: every category needs 'id', 'name' and 'isthing', got {c!r}")
        cat_id = int(c["id"])
        if cat_id in out:
            raise ValueError(f"{where}: category id {cat_id} appears twice")
        out[cat_id] = dict(c)
    return out


def _parse_segments(
    segments_info: Any, categories: Mapping[int, Any] | None, where: str
) -> list[SegmentInfo]:
    """Parse ``segments_info``; check unique ids and (when ``categories`` is given) known categories."""
    if not isinstance(segments_info, list):
        raise ValueError(f"{where}: 'segments_info' must be a list")
    segments = [SegmentInfo.from_dict(s, where=where) for s in segments_info]
    seen: set[int] = set()
    for s in segments:
        if s.id in seen:
            raise ValueError(f"{where}: segment id {s.id} appears twice")
        seen.add(s.id)
        if categories is not None and s.category_id not in categories:
            raise ValueError(f"{where}: segment {s.id} has unknown category_id {s.category_id}")
    return segments


# --------------------------------------------------------------------------------------------------
# COCO panoptic reader
# --------------------------------------------------------------------------------------------------


class CocoPanopticReader:
    """Lazy reader of a COCO panoptic dataset (JSON + PNG folder, optional image folder).

    The JSON is loaded once (it holds the categories and the image list); PNGs and images are read
    one at a time while iterating, in the order of ``annotations``.

    Args:
        json_url: path or fsspec URL of the panoptic JSON.
        png_dir: folder (path or URL) of the panoptic PNGs (``annotations[].file_name``).
        image_dir: folder of the images (``images[].file_name``); when given, records carry
            ``image_bytes``.
        storage_options: fsspec options for every URL (e.g. S3 endpoint and credentials).

    Attributes:
        categories: ``{category_id: COCO category dict}`` in file order.
    """

    def __init__(
        self,
        json_url: str,
        png_dir: str,
        *,
        image_dir: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.json_url, self.png_dir, self.image_dir = json_url, png_dir, image_dir
        self.storage_options = dict(storage_options or {})
        data = _read_json(json_url, self.storage_options)
        if not isinstance(data, Mapping) or "annotations" not in data or "categories" not in data:
            raise ValueError(f"{json_url}: a COCO panoptic JSON needs 'annotations' and 'categories'")
        self.categories = _check_categories(data["categories"], json_url)
        self._images = {img["id"]: img for img in data.get("images", [])}
        self._annotations = list(data["annotations"])
        for k, ann in enumerate(self._annotations):
            where = f"{json_url}: annotations[{k}]"
            if "image_id" not in ann or "file_name" not in ann or "segments_info" not in ann:
                raise ValueError(f"{where} needs 'image_id', 'file_name' and 'segments_info'")
            if ann["image_id"] not in self._images:
                raise ValueError(f"{where}: image_id {ann['image_id']!r} is not in 'images'")

    def __len__(self) -> int:
        return len(self._annotations)

    def iter_encoded(self) -> Iterator[EncodedPanopticRecord]:
        """Every annotation as an :class:`EncodedPanopticRecord` (JSON only: no PNG is read here)."""
        for k, ann in enumerate(self._annotations):
            image_id = ann["image_id"]
            info = self._images[image_id]
            where = f"{self.json_url}: annotations[{k}] (image_id {image_id!r})"
            segments = _parse_segments(ann["segments_info"], self.categories, where)
            png_name = _safe_relative(str(ann["file_name"]), where)
            height, width = info.get("height"), info.get("width")
            yield EncodedPanopticRecord(
                image_id=image_id,
                file_name=str(info.get("file_name", "")),
                segments=segments,
                where=where,
                png_url=_join(self.png_dir, png_name),
                height=None if height is None else int(height),
                width=None if width is None else int(width),
                caption=ann.get("caption", info.get("caption")),
                panoptic_file_name=png_name,
                storage_options=self.storage_options,
            )

    def _iter_raw(self, read_images: bool) -> Iterator[tuple[PanopticRecord, bytes]]:
        """Records plus the panoptic PNG bytes as stored."""
        for encoded in self.iter_encoded():
            png_bytes = encoded.read_png()
            encoded = dataclasses.replace(encoded, png_bytes=png_bytes)
            image_bytes = None
            if read_images:
                if not encoded.file_name:
                    raise ValueError(f"{encoded.where}: 'images' entry has no file_name")
                image_url = _join(str(self.image_dir), _safe_relative(encoded.file_name, encoded.where))
                image_bytes = _read_bytes(image_url, self.storage_options)
            yield encoded.decode(image_bytes), png_bytes

    def __iter__(self) -> Iterator[PanopticRecord]:
        for record, _ in self._iter_raw(read_images=self.image_dir is not None):
            yield record


# --------------------------------------------------------------------------------------------------
# Labeled WebDataset shards: reading
# --------------------------------------------------------------------------------------------------


def read_categories(
    url: str, *, storage_options: Mapping[str, Any] | None = None
) -> dict[int, dict[str, Any]]:
    """``{category_id: category dict}`` from a ``categories.json`` URL or a dataset folder URL."""
    if not url.rstrip("/").endswith(".json"):
        url = _join(url, CATEGORIES_FILE)
    return _check_categories(_read_json(url, storage_options), url)


def write_categories(
    categories: Iterable[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
    url: str,
    *,
    storage_options: Mapping[str, Any] | None = None,
) -> str:
    """Write a COCO ``categories`` list to ``url`` (a ``.json`` URL or a dataset folder); returns the URL."""
    import fsspec

    cats = list(categories.values()) if isinstance(categories, Mapping) else list(categories)
    _check_categories(cats, "categories")
    if not url.rstrip("/").endswith(".json"):
        url = _join(url, CATEGORIES_FILE)
    with fsspec.open(url, "wb", **dict(storage_options or {})) as f:
        f.write(json.dumps(cats, indent=1).encode("utf-8"))
    return url


def list_shards(url: str, *, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Shard URLs of a dataset: a ``.tar`` URL itself, or the sorted ``*.tar`` files of a folder (searched
    recursively), a glob, a brace pattern or a manifest; listed by :func:`pipeline.shards.list_shards`, the
    one shard lister. Plain paths stay plain paths; URLs keep their protocol.

    Raises:
        FileNotFoundError: nothing found (:class:`pipeline.shards.InputError` names the URL).
    """
    from pipeline.shards import decode_name
    from pipeline.shards import list_shards as list_inputs

    refs = [r for r in list_inputs(url, dict(storage_options or {})) if r.kind == "tar"]
    if not refs:
        raise FileNotFoundError(f"no *.tar shards under {url}")
    plain = "://" not in url
    out = []
    for ref in refs:
        shard = decode_name(ref.url)
        out.append(shard.removeprefix("file://") if plain else shard)
    return out


def _labeled(samples: Iterable[Any], shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {field: bytes})`` of usable samples of a labeled shard from :mod:`pipeline.shards` records.

    Samples with an unsafe member and members without a ``key.suffix`` name are skipped (logged); a damaged
    shard (truncated, corrupt, unreadable), a duplicate key or an oversized member raise ``ValueError``
    naming the shard (a vanished shard: ``FileNotFoundError``): ground truth is never silently partial.
    """
    from pipeline.shards import SHARD_ERROR_KEY

    for sample in samples:
        if sample.error is None:
            if not sample.files and set(sample.present) <= {""}:
                logger.warning("%s: skipping tar member without a key.suffix name: %r", shard, sample.key)
                continue
            yield sample.key, dict(sample.files)
        elif sample.key.startswith(SHARD_ERROR_KEY):
            error = FileNotFoundError if sample.error_kind == "vanished" else ValueError
            raise error(f"{shard}: {sample.error}")
        elif sample.error_kind == "unsafe_member":
            logger.warning("%s: skipping sample %r: %s", shard, sample.key, sample.error)
        else:
            raise ValueError(f"{shard}: sample {sample.key!r}: {sample.error}")


def iter_tar_samples(fileobj: Any, shard: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream an open tar (never extracted) and group its members by WebDataset key: ``(key, {field: bytes})``.

    The member rules are :mod:`pipeline.shards`' (the one tar reader); see :func:`_labeled` for what is
    skipped and what raises.
    """
    from pipeline.shards import iter_tar_fileobj

    yield from _labeled(iter_tar_fileobj(fileobj, shard), shard)


def iter_shard_samples(
    shard: str, storage_options: Mapping[str, Any] | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Like :func:`iter_tar_samples` for a shard URL, read by :func:`pipeline.shards.iter_tar` (retries of
    transient storage errors, truncation and "still being written" detection)."""
    from pipeline.shards import encode_name, iter_tar

    yield from _labeled(iter_tar(encode_name(shard), dict(storage_options or {}), fields=None), shard)


def _encoded_from_sample(
    key: str, files: Mapping[str, bytes], shard: str, categories: Mapping[int, Any] | None
) -> EncodedPanopticRecord:
    where = f"{shard}: sample {key!r}"
    for needed in ("segments.json", "panoptic.png"):
        if needed not in files:
            raise ValueError(f"{where} has no {needed} member (has {sorted(files)})")
    try:
        meta = json.loads(files["segments.json"].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where}: invalid segments.json ({e})") from e
    if not isinstance(meta, Mapping) or "segments_info" not in meta:
        raise ValueError(f"{where}: segments.json must be an object with 'segments_info'")
    segments = _parse_segments(meta["segments_info"], categories, where)
    return EncodedPanopticRecord(
        image_id=meta.get("image_id", key),
        file_name=str(meta.get("file_name", "")),
        segments=segments,
        where=where,
        png_bytes=files["panoptic.png"],
        caption=meta.get("caption"),
        key=key,
    )


def record_from_sample(
    key: str, files: Mapping[str, bytes], shard: str, categories: Mapping[int, Any] | None
) -> PanopticRecord:
    image_ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
    encoded = _encoded_from_sample(key, files, shard, categories)
    return encoded.decode(files[image_ext] if image_ext else None)


def _shard_urls(urls: str | Sequence[str], storage_options: Mapping[str, Any] | None) -> list[str]:
    return list_shards(urls, storage_options=storage_options) if isinstance(urls, str) else list(urls)


def iter_labeled_shards_encoded(
    urls: str | Sequence[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    categories: Mapping[int, Any] | None = None,
) -> Iterator[EncodedPanopticRecord]:
    """Like :func:`iter_labeled_shards`, but PNGs stay encoded and image bytes are dropped.

    For indexing a whole labeled dataset in memory (e.g. to pair it with predictions in any order).
    """
    for shard in _shard_urls(urls, storage_options):
        for key, files in iter_shard_samples(shard, storage_options):
            yield _encoded_from_sample(key, files, shard, categories)


def iter_labeled_shards(
    urls: str | Sequence[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    categories: Mapping[int, Any] | None = None,
) -> Iterator[PanopticRecord]:
    """Iterate the samples of labeled shards as :class:`PanopticRecord` (streaming, one at a time).

    Args:
        urls: a dataset folder (all its ``*.tar``, sorted), one shard URL, or a list of shard URLs.
        storage_options: fsspec options.
        categories: when given (e.g. :func:`read_categories`), every segment's ``category_id`` is
            checked against it.

    Raises:
        ValueError: a sample lacks ``segments.json`` / ``panoptic.png`` or holds invalid data.
    """
    for shard in _shard_urls(urls, storage_options):
        for key, files in iter_shard_samples(shard, storage_options):
            yield record_from_sample(key, files, shard, categories)


# --------------------------------------------------------------------------------------------------
# Labeled WebDataset shards: writing
# --------------------------------------------------------------------------------------------------


def _image_extension(file_name: str, where: str) -> str:
    ext = posixpath.splitext(file_name)[1].lower().lstrip(".")
    if ext == "jpeg":
        ext = "jpg"
    if ext not in ("jpg", "png"):
        raise ValueError(f"{where}: image {file_name!r} must be .jpg/.jpeg or .png")
    return ext


class _ShardOutput:
    """One shard being written to ``<name>.tmp`` and moved to ``<name>`` only once complete, so a
    reader never sees a half-written shard (on object stores the move is a server-side copy)."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs, self.path, self.tmp = fs, path, path + ".tmp"
        self.file = fs.open(self.tmp, "wb")

    def commit(self) -> None:
        self.file.close()
        self.fs.mv(self.tmp, self.path)

    def abort(self) -> None:
        try:
            self.file.close()
        finally:
            if self.fs.exists(self.tmp):
                self.fs.rm(self.tmp)


class LabeledShardWriter:
    """Write labeled samples into WebDataset shards of ``samples_per_shard`` (format in the module doc).

    Each shard is written to ``<name>.tmp`` and moved to ``<name>`` once complete, so a reader never sees a
    half-written shard; :meth:`close` commits the last shard and writes ``categories.json``. On an error,
    :meth:`abort` (or leaving the ``with`` block by an exception) drops the unfinished shard; shards already
    committed stay. Used by :func:`convert_coco_panoptic_to_shards` and by the exports' loop
    (:mod:`pipeline.export.loop`: annotate outputs and Label Studio exports -> training shards).

    Args:
        out_url: output folder (path or URL); created if needed; same-named shards are overwritten.
        categories: COCO categories (``[{"id", "name", "isthing", ...}]``) written to ``categories.json``;
            every segment's ``category_id`` must be one of them.
        samples_per_shard: samples per shard (>= 1).
        storage_options: fsspec options.
        shard_name: shard file name pattern with an ``{index}`` field.
    """

    def __init__(
        self,
        out_url: str,
        *,
        categories: Iterable[Mapping[str, Any]] | Mapping[int, Mapping[str, Any]],
        samples_per_shard: int = 1000,
        storage_options: Mapping[str, Any] | None = None,
        shard_name: str = "shard-{index:06d}.tar",
    ) -> None:
        import fsspec.core

        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        if "{index" not in shard_name or not shard_name.endswith(".tar"):
            raise ValueError(f"shard_name must contain '{{index...}}' and end in .tar, got {shard_name!r}")
        cats = list(categories.values()) if isinstance(categories, Mapping) else list(categories)
        self.categories = _check_categories(cats, "categories")
        self.out_url, self.samples_per_shard, self.shard_name = out_url, samples_per_shard, shard_name
        self.options = dict(storage_options or {})
        self.fs, self.out_path = fsspec.core.url_to_fs(out_url, **self.options)
        self.fs.makedirs(self.out_path, exist_ok=True)
        self.shards: list[str] = []
        self.count = 0
        self._keys: dict[str, Any] = {}
        self._output: _ShardOutput | None = None
        self._writer: Any = None

    def write(
        self,
        *,
        key: str,
        image_ext: str,
        image_bytes: bytes,
        png_bytes: bytes,
        segments_json: Mapping[str, Any],
        where: str = "",
    ) -> None:
        """Add one sample: the image bytes as they are, its panoptic PNG and its ``segments.json`` object.

        Raises:
            ValueError: the key is not a valid sample key or was used already, the extension is not
                ``jpg`` / ``png``, or a segment has a category that is not in ``categories``.
        """
        from webdataset.writer import TarWriter  # heavy import (pulls torch): only here

        where = where or f"sample {key!r}"
        if sample_key(key) != key:
            raise ValueError(f"{where}: sample key {key!r} has characters outside [A-Za-z0-9_-]")
        if key in self._keys:
            raise ValueError(f"{where}: sample key {key!r} already used by {self._keys[key]}")
        ext = "jpg" if image_ext.lower() in ("jpg", "jpeg") else image_ext.lower()
        if ext not in ("jpg", "png"):
            raise ValueError(f"{where}: image extension must be jpg/jpeg or png, got {image_ext!r}")
        _parse_segments(list(segments_json.get("segments_info", [])), self.categories, where)
        self._keys[key] = where
        if self._writer is None:
            name = self.shard_name.format(index=len(self.shards))
            self._output = _ShardOutput(self.fs, _join(self.out_path, name))
            self._writer = TarWriter(self._output.file, encoder=False, mtime=0.0)
            self.shards.append(_join(self.out_url, name))
        self._writer.write(
            {
                "__key__": key,
                ext: image_bytes,
                "panoptic.png": png_bytes,
                "segments.json": json.dumps(dict(segments_json)).encode("utf-8"),
            }
        )
        self.count += 1
        if self.count % self.samples_per_shard == 0:
            self._commit()

    def _commit(self) -> None:
        if self._writer is not None:
            self._writer.close()
            assert self._output is not None
            self._output.commit()
            self._writer, self._output = None, None

    def close(self) -> ConversionSummary:
        """Commit the last shard, write ``categories.json``; returns what was written."""
        self._commit()
        categories_url = write_categories(
            list(self.categories.values()), _join(self.out_url, CATEGORIES_FILE), storage_options=self.options
        )
        return ConversionSummary(
            shards=list(self.shards),
            num_samples=self.count,
            categories_url=categories_url,
            samples_per_shard=self.samples_per_shard,
        )

    def abort(self) -> None:
        """Drop the unfinished shard (committed shards stay)."""
        if self._output is not None:
            try:
                self._writer.close()
            except Exception:  # the original error is the one to report
                logger.debug("closing the unfinished shard failed", exc_info=True)
            self._output.abort()
            self._writer, self._output = None, None

    def __enter__(self) -> LabeledShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()


def convert_coco_panoptic_to_shards(
    json_url: str,
    png_dir: str,
    image_dir: str,
    out_url: str,
    *,
    samples_per_shard: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    captions: Mapping[Any, str | Sequence[str]] | None = None,
    shard_name: str = "shard-{index:06d}.tar",
) -> ConversionSummary:
    """Convert a COCO panoptic dataset to labeled WebDataset shards (format in the module doc).

    Steps: 1. read the JSON; 2. for each annotation read the image bytes and the panoptic PNG
    (decoded once to check it; both are stored unchanged); 3. write samples with
    :class:`LabeledShardWriter`, ``samples_per_shard`` per shard; 4. write ``categories.json``.

    Args:
        json_url, png_dir, image_dir: the COCO panoptic dataset (paths or fsspec URLs).
        out_url: output folder (path or URL); created if needed; existing shards of the same names
            are overwritten.
        samples_per_shard: samples per shard (>= 1).
        storage_options: fsspec options for every URL.
        captions: optional ``{image_id: caption or [captions]}`` stored in ``segments.json`` (several
            captions: ``caption`` is the first, ``captions`` all of them); a caption already
            in the COCO JSON (``annotations[].caption`` or ``images[].caption``) is used otherwise.
        shard_name: shard file name pattern with an ``{index}`` field.

    Returns:
        A :class:`ConversionSummary` with the shard URLs, the sample count and the categories URL.
    """
    # 1. Inputs.
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if "{index" not in shard_name or not shard_name.endswith(".tar"):
        raise ValueError(f"shard_name must contain '{{index...}}' and end in .tar, got {shard_name!r}")
    options = dict(storage_options or {})
    reader = CocoPanopticReader(json_url, png_dir, image_dir=image_dir, storage_options=options)

    # 2-4. Samples, rotated into shards; categories.json at the end.
    with LabeledShardWriter(
        out_url,
        categories=reader.categories,
        samples_per_shard=samples_per_shard,
        storage_options=options,
        shard_name=shard_name,
    ) as writer:
        keys: dict[str, Any] = {}
        for record, png_bytes in reader._iter_raw(read_images=True):
            where = f"{json_url}: image_id {record.image_id!r}"
            key = sample_key(record.image_id)
            if key in keys:
                raise ValueError(f"{where}: sample key {key!r} already used by image_id {keys[key]!r}")
            keys[key] = record.image_id
            if captions is not None and record.image_id in captions:
                given = captions[record.image_id]
                texts = [given] if isinstance(given, str) else [str(c) for c in given]
                texts = [t.strip() for t in texts if str(t).strip()]
                if texts:
                    record.caption, record.captions = texts[0], texts
            assert record.image_bytes is not None
            writer.write(
                key=key,
                image_ext=_image_extension(record.file_name, where),
                image_bytes=record.image_bytes,
                png_bytes=png_bytes,
                segments_json=record.segments_json(),
                where=where,
            )
        return writer.close()
