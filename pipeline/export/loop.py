"""Close the loop: pseudo-labels (or their reviewed version) -> labeled WebDataset shards for ``odise-train``.

Two sources, one output (the labeled-shard format of :mod:`pipeline.groundtruth`, written by its
:class:`~pipeline.groundtruth.LabeledShardWriter`: ``<key>.jpg|png``, ``<key>.panoptic.png``,
``<key>.segments.json`` + ``categories.json``):

* :func:`annotate_to_shards`: an annotate output. Error rows are skipped; ``min_score`` keeps the confident
  segments only and leaves every other pixel void (0); images left without any segment are skipped (counted).
* :func:`labelstudio_to_shards`: a Label Studio JSON export after review (tasks written by
  ``odise-export --format labelstudio``, with ``annotations``); see :func:`pipeline.export.labelstudio.iter_reviewed`
  for which annotation is used and how brush masks become panoptic segments.

Sample keys are the image ids (:func:`pipeline.groundtruth.sample_key`); ``segments.json`` holds ``image_id``,
``file_name`` (the image's own name, so ``odise-evaluate`` pairs it with the annotate rows by file name),
``segments_info`` and ``image_url``. Image bytes are copied unchanged, except images that need their EXIF
orientation applied to match the labels, or whose format the training reader does not take (not JPEG or
PNG): those are stored as PNG. An image that cannot be read, or whose size does not match its labels, is
skipped and named in the summary (the run goes on). Images are read grouped by tar (each tar streamed once).
The output folder must not hold shards already (stale shards would mix into training).
"""

from __future__ import annotations

import io
import logging
import posixpath
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.export.images import GroupSpill, fetch_grouped
from pipeline.groundtruth import ConversionSummary, LabeledShardWriter, sample_key

__all__ = ["LoopSummary", "annotate_to_shards", "labelstudio_to_shards", "load_categories"]

log = logging.getLogger(__name__)

MAX_LISTED = 20


@dataclass
class LoopSummary:
    """What a conversion to labeled shards wrote and skipped.

    Attributes:
        source: ``"annotate"`` or ``"labelstudio"``.
        input, output: what was read and the shard folder.
        samples: samples written; shards: their shard URLs; categories_url: the ``categories.json`` written.
        segments: segments written; segments_dropped: dropped by ``min_score``.
        error_rows: annotate error rows skipped; skipped_empty: images left without segments.
        images_skipped: images that could not be read or did not match their labels (``skipped`` names up to 20).
        reviewed, unreviewed, skipped_unreviewed: Label Studio tasks with / without a completed annotation, and
            those skipped for it (``reviewed_only``); ignored_results: non-brush results by type.
    """

    source: str
    input: str
    output: str
    samples: int = 0
    shards: list[str] = field(default_factory=list)
    categories_url: str = ""
    segments: int = 0
    segments_dropped: int = 0
    error_rows: int = 0
    skipped_empty: int = 0
    images_skipped: int = 0
    skipped: list[str] = field(default_factory=list)
    reviewed: int = 0
    unreviewed: int = 0
    skipped_unreviewed: int = 0
    ignored_results: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def skip(self, reason: str) -> None:
        self.images_skipped += 1
        if len(self.skipped) < MAX_LISTED:
            self.skipped.append(reason)
        log.warning("sample skipped: %s", reason)


@dataclass
class _Pending:
    key: str
    ext: str
    width: int
    height: int
    png: bytes
    segments_json: dict[str, Any]
    where: str


def _training_image(data: bytes, ext: str, width: int, height: int, where: str) -> tuple[bytes, str]:
    """The image bytes (and extension) to store: unchanged when they match the labels, else a fixed PNG.

    Raises:
        ValueError: unreadable, or of another size than the labels even after EXIF orientation.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    ext = ext.lower()
    try:
        with Image.open(io.BytesIO(data)) as im:
            orientation = im.getexif().get(0x0112, 1) or 1
            fixed = ImageOps.exif_transpose(im) if orientation != 1 else im  # as annotate decodes it
            if fixed.size != (width, height):
                raise ValueError(
                    f"{where}: image is {fixed.size[0]}x{fixed.size[1]}, labels are {width}x{height}"
                )
            if orientation == 1 and ext in ("jpg", "jpeg", "png"):
                return data, ext
            buf = io.BytesIO()
            fixed.convert("RGB").save(buf, format="PNG")
            return buf.getvalue(), "png"
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"{where}: unreadable image ({type(exc).__name__}: {exc})") from exc


def _check_empty_output(url: str, options: Mapping[str, Any]) -> None:
    from pipeline.storage import fs_root

    fs, root = fs_root(url, dict(options))
    fs.invalidate_cache(root)
    if fs.exists(root) and [p for p in fs.glob(posixpath.join(root, "*.tar"))]:
        raise ValueError(
            f"shard folder {url} already holds shards; choose a new folder (stale shards would mix in)"
        )


def _write_all(
    entries: Iterator[tuple[str, _Pending]],
    writer: LabeledShardWriter,
    summary: LoopSummary,
    storage_options: Mapping[str, Any],
) -> None:
    for got in fetch_grouped(entries, dict(storage_options)):
        pending = got.payload
        if got.data is None:
            summary.skip(f"{pending.where}: {got.error}")
            continue
        try:
            image, ext = _training_image(got.data, pending.ext, pending.width, pending.height, pending.where)
        except ValueError as exc:
            summary.skip(str(exc))
            continue
        writer.write(
            key=pending.key,
            image_ext=ext,
            image_bytes=image,
            png_bytes=pending.png,
            segments_json=pending.segments_json,
            where=pending.where,
        )
        summary.segments += len(pending.segments_json["segments_info"])


def _finish(writer: LabeledShardWriter, summary: LoopSummary) -> LoopSummary:
    done: ConversionSummary = writer.close()
    summary.samples, summary.shards, summary.categories_url = (
        done.num_samples,
        done.shards,
        done.categories_url,
    )
    return summary


def annotate_to_shards(
    input: str,
    output: str,
    *,
    min_score: float | None = None,
    max_images: int | None = None,
    samples_per_shard: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
) -> LoopSummary:
    """An annotate output -> labeled shards (module doc); rows in the output's key order.

    Args:
        input: the annotate output (path or URL).
        output: the shard folder (new or without shards).
        min_score: keep segments scored at least this; the rest of the image is void.
        max_images: convert at most this many images (the first in key order).
        samples_per_shard: samples per shard.
        storage_options: fsspec options for the input and the images; output_storage_options for the output
            (default: the same).
    """
    from pipeline.encode import coco_segment_info
    from pipeline.export.base import panoptic_png
    from pipeline.export.labelstudio import original_file_name
    from pipeline.export.reader import SelectionStats, iter_items, open_output

    options = dict(storage_options or {})
    out_options = dict(options if output_storage_options is None else output_storage_options)
    source = open_output(input, options)
    _check_empty_output(output, out_options)
    summary = LoopSummary("annotate", input, output)
    stats = SelectionStats()

    def entries() -> Iterator[tuple[str, _Pending]]:
        for item in iter_items(
            source, columns=("panoptic_png",), min_score=min_score, max_images=max_images, stats=stats
        ):
            row = item.row
            if not row["segments"]:
                summary.skipped_empty += 1
                continue
            segments_info = [coco_segment_info(s) for s in row["segments"]]
            image_id = int(row["image_id"])
            meta = {
                "image_id": image_id,
                "file_name": original_file_name(row),
                "segments_info": segments_info,
                "image_url": item.image_url,
            }
            where = f"{input}: {row['shard_id']}/{row['key']}"
            pending = _Pending(
                sample_key(image_id),
                str(row.get("image_ext") or "jpg"),
                item.width,
                item.height,
                panoptic_png(item),
                meta,
                where,
            )
            yield item.image_url, pending

    with LabeledShardWriter(
        output, categories=source.categories, samples_per_shard=samples_per_shard, storage_options=out_options
    ) as writer:
        _write_all(entries(), writer, summary, options)
        _finish(writer, summary)
    summary.error_rows = stats.error_rows
    summary.segments_dropped = stats.segments_dropped
    return summary


def load_categories(
    spec: str | list[dict[str, Any]], storage_options: Mapping[str, Any] | None = None
) -> list[dict[str, Any]]:
    """COCO categories from a list, or a JSON file (path / URL) holding a list or an object with ``categories``
    (``categories.json`` of an export, ``provenance.json`` of an annotate output, a COCO file)."""
    import json

    import fsspec

    if isinstance(spec, list):
        cats = spec
    else:
        try:
            with fsspec.open(spec, "rb", **dict(storage_options or {})) as f:
                data = json.load(f)
        except FileNotFoundError as exc:
            raise FileNotFoundError(f"categories file {spec} not found") from exc
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"categories file {spec}: invalid JSON ({exc})") from exc
        cats = data.get("categories") if isinstance(data, dict) else data
    if (
        not isinstance(cats, list)
        or not cats
        or not all(isinstance(c, dict) and {"id", "name", "isthing"} <= set(c) for c in cats)
    ):
        raise ValueError(
            f"categories {spec if isinstance(spec, str) else '(list)'}: need a list of {{id, name, isthing}}"
        )
    return cats


def labelstudio_to_shards(
    tasks: str,
    output: str,
    *,
    categories: str | list[dict[str, Any]] | None = None,
    min_score: float | None = None,
    reviewed_only: bool = False,
    samples_per_shard: int = 1000,
    storage_options: Mapping[str, Any] | None = None,
    output_storage_options: Mapping[str, Any] | None = None,
) -> LoopSummary:
    """A Label Studio JSON export -> labeled shards (module doc).

    Args:
        tasks: the exported JSON (path or URL), e.g. ``project-1-at-....json`` or an export's ``tasks.json``.
        output: the shard folder (new or without shards).
        categories: the categories (list, or a JSON path / URL); default: ``categories.json`` next to ``tasks``.
        min_score: drop predicted results scored below it (reviewed results are kept).
        reviewed_only: skip tasks nobody completed (default: they keep their predictions).
        samples_per_shard: samples per shard.
        storage_options: fsspec options for the tasks file and the images; output_storage_options for the output.
    """
    from pipeline.export.labelstudio import ReviewStats, iter_reviewed

    options = dict(storage_options or {})
    out_options = dict(options if output_storage_options is None else output_storage_options)
    if categories is None:
        categories = posixpath.join(posixpath.dirname(tasks.rstrip("/")) or ".", "categories.json")
    cats = load_categories(categories, options)
    _check_empty_output(output, out_options)
    summary = LoopSummary("labelstudio", tasks, output)
    stats = ReviewStats()
    with tempfile.TemporaryDirectory(prefix="odise-loop-") as tmp:
        spill: GroupSpill[_Pending] = GroupSpill(tmp)
        for sample in iter_reviewed(
            tasks,
            cats,
            storage_options=options,
            min_score=min_score,
            reviewed_only=reviewed_only,
            stats=stats,
        ):
            meta = {
                "image_id": sample.image_id,
                "file_name": sample.file_name,
                "segments_info": sample.segments_info,
                "image_url": sample.image_url,
                "label_source": sample.source,
            }
            ext = posixpath.splitext(sample.file_name)[1].lstrip(".") or "jpg"
            spill.add(
                sample.image_url,
                _Pending(
                    sample_key(sample.image_id),
                    ext,
                    sample.width,
                    sample.height,
                    sample.png,
                    meta,
                    sample.where,
                ),
            )
        with LabeledShardWriter(
            output, categories=cats, samples_per_shard=samples_per_shard, storage_options=out_options
        ) as writer:
            _write_all(iter(spill), writer, summary, options)
            _finish(writer, summary)
        spill.close()
    summary.segments_dropped = stats.segments_dropped
    summary.skipped_empty = stats.skipped_empty
    summary.reviewed, summary.unreviewed = stats.reviewed, stats.unreviewed
    summary.skipped_unreviewed = stats.skipped_unreviewed
    summary.ignored_results = dict(stats.ignored_results)
    return summary
