"""Label Studio: tasks with brush-mask predictions to review, and reviewed exports read back.

Export layout (``<export>/``)::

    tasks.json            a JSON array of tasks (import it in Label Studio: Project -> Import)
    labeling_config.xml   the matching labeling interface: <Image name="image"> + <BrushLabels name="label">
                          with one <Label> per category (Project -> Settings -> Labeling Interface -> Code)
    categories.json       the categories (ids, names, isthing) for converting reviewed tasks back
    images/<name>         the images, with --copy-images
    provenance.json, export.json

A task::

    {"data": {"image": "<URL Label Studio loads>", "image_url": "<the image's source URL>",
              "file_name": "astronaut.jpg", "key": ..., "shard": ..., "shard_id": ...,
              "odise_image_id": "<id as a string: JavaScript rounds integers above 2**53>",
              "uncertainty": 0.42},
     "predictions": [{"model_version": "<variant>@<weights sha256[:12]>", "score": 1 - uncertainty,
                      "result": [{"id": "seg<segment id>", "type": "brushlabels", "from_name": "label",
                                  "to_name": "image", "original_width": W, "original_height": H,
                                  "image_rotation": 0, "score": <segment score>,
                                  "value": {"format": "rle", "rle": [...], "brushlabels": ["<category>"]}},
                                 ...]}]}

One result per kept panoptic segment (things and stuff; they do not overlap); the brush RLE is
``label_studio_converter.brush.mask2rle`` of the segment mask (0/255). ``data.image``: without
``--copy-images`` the image's URL (``s3://`` works with a Label Studio cloud storage; ``tar://`` members do
not: copy them); with ``--copy-images`` ``<prefix>images/<name>``, where the prefix defaults to
``/data/local-files/?d=`` (start Label Studio with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT=<export folder>``), or ``--image-url-prefix http://host/export/``.
The prediction ``score`` is ``1 - uncertainty``, so sorting by prediction score in Label Studio shows the
most uncertain images first, as ``--order uncertainty`` does.

Reading back (:func:`iter_reviewed`): Label Studio's JSON export (Export -> JSON) lists tasks with their
``annotations``. Per task the reviewed annotation is used (the ``ground_truth`` one, else the most recently
updated that was not cancelled); a task nobody reviewed keeps its predictions (or is skipped with
``reviewed_only``). Brush results are decoded with ``brush.decode_rle`` (alpha channel >= 128); later results
paint over earlier ones where they overlap (the panoptic map has one segment per pixel); other result types
are counted and ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any
from xml.sax.saxutils import quoteattr

import numpy as np

from pipeline.encode import category_colour, panoptic_to_png
from pipeline.export._io import JsonArraySpool, put_json, put_local
from pipeline.export.base import ExportContext, Writer, coco_categories, segment_masks
from pipeline.export.reader import ExportItem

__all__ = [
    "DEFAULT_IMAGE_PREFIX",
    "LabelStudioWriter",
    "ReviewStats",
    "ReviewedSample",
    "brush_to_mask",
    "iter_reviewed",
    "labeling_config",
    "mask_to_brush",
    "original_file_name",
]

DEFAULT_IMAGE_PREFIX = "/data/local-files/?d="
FROM_NAME, TO_NAME = "label", "image"


def mask_to_brush(mask: np.ndarray) -> list[int]:
    """Label Studio brush RLE of an ``HxW`` bool mask (``label_studio_converter.brush.mask2rle`` of 0/255)."""
    from label_studio_converter.brush import mask2rle

    return [int(v) for v in mask2rle(np.where(np.asarray(mask, bool), 255, 0).astype(np.uint8))]


def brush_to_mask(rle: list[int], height: int, width: int) -> np.ndarray:
    """Inverse of :func:`mask_to_brush`: ``HxW`` bool mask (alpha channel >= 128) via ``brush.decode_rle``."""
    from label_studio_converter.brush import decode_rle

    flat = decode_rle(rle)
    if flat.size != height * width * 4:
        raise ValueError(
            f"brush RLE holds {flat.size} values, expected {height}x{width}x4 = {height * width * 4}"
        )
    return flat.reshape(height, width, 4)[:, :, 3] >= 128


def labeling_config(categories: list[dict[str, Any]]) -> str:
    """The labeling interface XML: an ``Image`` and ``BrushLabels`` with every category, coloured as the overlays."""
    lines = [
        "<View>",
        f'  <Image name="{TO_NAME}" value="$image" zoom="true" zoomControl="true"/>',
        f'  <BrushLabels name="{FROM_NAME}" toName="{TO_NAME}">',
    ]
    for cat in categories:
        r, g, b = category_colour(int(cat["id"]))
        lines.append(f'    <Label value={quoteattr(str(cat["name"]))} background="#{r:02x}{g:02x}{b:02x}"/>')
    lines += ["  </BrushLabels>", "</View>", ""]
    return "\n".join(lines)


def original_file_name(row: Mapping[str, Any]) -> str:
    """The image's own file name: the key when it ends in its extension, else ``<key>.<ext>``."""
    key, ext = str(row["key"]), (row.get("image_ext") or "")
    if not ext or key.lower().endswith(f".{ext.lower()}"):
        return key
    return f"{key}.{ext}"


class LabelStudioWriter(Writer):
    """Writes the Label Studio layout of the module doc."""

    exports_instances = False

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.categories = coco_categories(ctx.source)
        names = [c["name"] for c in self.categories]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(
                f"{ctx.source.url}: category names {duplicates} repeat; Label Studio labels must be unique"
            )
        self.tasks = JsonArraySpool(ctx.tmp)
        self.model_version = ctx.source.model_version
        self.prefix = (
            ctx.config.image_url_prefix if ctx.config.image_url_prefix is not None else DEFAULT_IMAGE_PREFIX
        )

    def image_path(self, item: ExportItem) -> str | None:
        return f"images/{item.name}"

    def add(self, item: ExportItem) -> None:
        row = item.row
        width, height = item.width, item.height
        results = []
        for seg, mask in segment_masks(item):
            results.append(
                {
                    "id": f"seg{int(seg['id'])}",
                    "type": "brushlabels",
                    "from_name": FROM_NAME,
                    "to_name": TO_NAME,
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "score": round(float(seg["score"]), 6),
                    "value": {
                        "format": "rle",
                        "rle": mask_to_brush(mask),
                        "brushlabels": [seg["category_name"]],
                    },
                }
            )
        image = f"{self.prefix}{self.image_path(item)}" if self.ctx.config.copy_images else item.image_url
        self.tasks.add(
            {
                "data": {
                    "image": image,
                    "image_url": item.image_url,
                    "file_name": original_file_name(row),
                    "key": row["key"],
                    "shard": row["shard"],
                    "shard_id": row["shard_id"],
                    "odise_image_id": str(row["image_id"]),
                    "uncertainty": round(item.uncertainty, 6),
                },
                "predictions": [
                    {
                        "model_version": self.model_version,
                        "score": round(1.0 - item.uncertainty, 6),
                        "result": results,
                    }
                ],
            }
        )

    def finish(self) -> dict[str, str]:
        ctx = self.ctx
        local = os.path.join(ctx.tmp, "tasks.json")
        with open(local, "wb") as out:
            out.write(b"[\n")
            self.tasks.copy_to(out)
            out.write(b"\n]\n")
        self.tasks.close()
        put_local(ctx.fs, ctx.root, "tasks.json", local)
        config = os.path.join(ctx.tmp, "labeling_config.xml")
        with open(config, "w", encoding="utf-8") as f:
            f.write(labeling_config(self.categories))
        put_local(ctx.fs, ctx.root, "labeling_config.xml", config)
        put_json(ctx.fs, f"{ctx.root}/categories.json", ctx.source.categories)
        files = {
            "tasks": "tasks.json",
            "labeling_config": "labeling_config.xml",
            "categories": "categories.json",
        }
        if ctx.config.copy_images:
            files["images"] = "images/"
        return files


# --------------------------------------------------------------------------------------------------
# Reading reviewed tasks back
# --------------------------------------------------------------------------------------------------


@dataclass
class ReviewStats:
    """Counts of :func:`iter_reviewed`."""

    tasks: int = 0
    reviewed: int = 0
    unreviewed: int = 0
    skipped_unreviewed: int = 0
    skipped_empty: int = 0
    segments: int = 0
    segments_dropped: int = 0
    ignored_results: dict[str, int] = field(default_factory=dict)


@dataclass
class ReviewedSample:
    """One task as a panoptic sample (PNG + segments), ready for :class:`pipeline.groundtruth.LabeledShardWriter`.

    Attributes:
        image_url: where the image is (``data.image_url`` of tasks written by ``odise-export``, else ``data.image``).
        image_id: ``data.odise_image_id`` (int) when present, else ``task-<task id>``.
        file_name: the image's file name.
        png: COCO panoptic PNG bytes.
        segments_info: COCO ``segments_info`` (``id``, ``category_id``, ``area``, ``bbox``, ``iscrowd`` 0).
        source: ``"annotation"`` or ``"prediction"``.
        where: the task, for messages.
        width, height: the size of the labels (the results' ``original_width`` / ``original_height``).
    """

    image_url: str
    image_id: int | str
    file_name: str
    png: bytes
    segments_info: list[dict[str, Any]]
    source: str
    where: str
    width: int = 0
    height: int = 0


def _pick_annotation(task: Mapping[str, Any]) -> Mapping[str, Any] | None:
    done = [a for a in task.get("annotations") or [] if isinstance(a, Mapping) and not a.get("was_cancelled")]
    if not done:
        return None
    truth = [a for a in done if a.get("ground_truth")]
    pool = truth or done
    return max(
        enumerate(pool), key=lambda ia: (str(ia[1].get("updated_at") or ia[1].get("created_at") or ""), ia[0])
    )[1]


def _bbox(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]


def iter_reviewed(
    url: str,
    categories: list[dict[str, Any]],
    *,
    storage_options: Mapping[str, Any] | None = None,
    min_score: float | None = None,
    reviewed_only: bool = False,
    stats: ReviewStats | None = None,
) -> Iterator[ReviewedSample]:
    """Stream a Label Studio JSON export (a list of tasks) as panoptic samples (module doc).

    Args:
        url: the exported JSON (path or URL); read incrementally (``ijson``), never whole.
        categories: COCO categories; result labels are matched to them by name.
        storage_options: fsspec options.
        min_score: drop predicted results scored below it (reviewed results carry no score and are kept).
        reviewed_only: skip tasks without a completed annotation instead of using their predictions.
        stats: filled with counts.

    Raises:
        ValueError: a label that is not a category, a task without an image, or a result whose size does
            not match its RLE; the message names the task.
    """
    import fsspec
    import ijson

    stats = stats if stats is not None else ReviewStats()
    by_name = {str(c["name"]): c for c in categories}
    with fsspec.open(url, "rb", **dict(storage_options or {})) as f:
        for index, task in enumerate(ijson.items(f, "item", use_float=True)):
            stats.tasks += 1
            where = f"{url}: task {task.get('id', index)!r}"
            annotation = _pick_annotation(task)
            if annotation is not None:
                stats.reviewed += 1
                results, source = list(annotation.get("result") or []), "annotation"
            else:
                stats.unreviewed += 1
                if reviewed_only:
                    stats.skipped_unreviewed += 1
                    continue
                predictions = [p for p in task.get("predictions") or [] if isinstance(p, Mapping)]
                results, source = (
                    (list(predictions[-1].get("result") or []) if predictions else []),
                    "prediction",
                )
            sample = _task_sample(task, results, source, by_name, min_score, stats, where)
            if sample is None:
                stats.skipped_empty += 1
                continue
            yield sample


def _task_sample(
    task: Mapping[str, Any],
    results: list[Any],
    source: str,
    by_name: Mapping[str, Mapping[str, Any]],
    min_score: float | None,
    stats: ReviewStats,
    where: str,
) -> ReviewedSample | None:
    data = task.get("data") or {}
    image_url = data.get("image_url") or data.get("image")
    if not image_url:
        raise ValueError(f"{where}: no data.image_url / data.image")
    id_map: np.ndarray | None = None
    categories: list[int] = []
    for result in results:
        kind = str(result.get("type", "")).lower()
        if kind != "brushlabels" or (result.get("value") or {}).get("format", "rle") != "rle":
            stats.ignored_results[kind or "?"] = stats.ignored_results.get(kind or "?", 0) + 1
            continue
        score = result.get("score")
        if min_score is not None and score is not None and float(score) < min_score:
            stats.segments_dropped += 1
            continue
        labels = result["value"].get("brushlabels") or []
        if len(labels) != 1 or labels[0] not in by_name:
            raise ValueError(f"{where}: brush label {labels!r} is not one category of {sorted(by_name)[:20]}")
        height, width = int(result["original_height"]), int(result["original_width"])
        mask = brush_to_mask(result["value"]["rle"], height, width)
        if id_map is None:
            id_map = np.zeros((height, width), np.int32)
        elif id_map.shape != (height, width):
            raise ValueError(f"{where}: results of sizes {id_map.shape} and {(height, width)}")
        categories.append(int(by_name[labels[0]]["id"]))
        id_map[mask] = len(categories)  # later results paint over earlier ones
    if id_map is None:
        return None
    segments = []
    for seg_id, cat_id in enumerate(categories, start=1):
        mask = id_map == seg_id
        if not mask.any():
            continue
        segments.append(
            {"id": seg_id, "category_id": cat_id, "area": int(mask.sum()), "bbox": _bbox(mask), "iscrowd": 0}
        )
    if not segments:
        return None
    stats.segments += len(segments)
    raw_id = data.get("odise_image_id")
    image_id: int | str = (
        int(raw_id) if isinstance(raw_id, str) and raw_id.isdigit() else f"task-{task.get('id')}"
    )
    file_name = data.get("file_name") or os.path.basename(str(image_url).split("::", 1)[0].split("?", 1)[0])
    return ReviewedSample(
        image_url=str(image_url),
        image_id=image_id,
        file_name=str(file_name),
        png=panoptic_to_png(id_map),
        segments_info=segments,
        source=source,
        where=where,
        width=int(id_map.shape[1]),
        height=int(id_map.shape[0]),
    )
