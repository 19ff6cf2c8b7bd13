"""What every export writer shares: the context it writes into, the writer interface, mask helpers.

A writer gets the selected images one at a time (:meth:`Writer.add`, an :class:`~pipeline.export.reader.ExportItem`
each) and writes its files under the export folder; :meth:`Writer.finish` completes the big files and returns
them by role. Copying images is not the writer's job: it only says where a copied image goes
(:meth:`Writer.image_path`), and :func:`pipeline.export.run.run_export` copies them afterwards, each tar once.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.encode import panoptic_to_png, rle_to_mask, segments_to_panoptic
from pipeline.export._io import FileBatch
from pipeline.export.config import ExportConfig
from pipeline.export.reader import AnnotateOutput, ExportItem

__all__ = [
    "ExportContext",
    "Writer",
    "coco_categories",
    "coco_image",
    "panoptic_png",
    "segment_masks",
    "semantic_map",
]


@dataclass
class ExportContext:
    """Where and how a writer writes.

    Attributes:
        config: the export settings.
        source: the annotate output being exported.
        fs, root: the output filesystem and export folder (stripped path).
        tmp: a local temp folder for files built before they are put whole.
        files: batched writer of small files (masks) under ``root``.
    """

    config: ExportConfig
    source: AnnotateOutput
    fs: Any
    root: str
    tmp: str
    files: FileBatch

    def url_of(self, relative: str) -> str:
        """The URL (or local path) of a file of the export."""
        path = f"{self.root}/{relative}"
        return self.fs.unstrip_protocol(path) if "://" in self.config.output else path


class Writer:
    """One export target. Subclasses set :attr:`columns` and implement the three methods."""

    columns: tuple[str, ...] = ()
    """Parquet columns needed beyond :data:`pipeline.export.reader.BASE_COLUMNS`."""
    exports_instances: bool = True
    """Whether the target holds the instance predictions (counted in the summary)."""

    def __init__(self, ctx: ExportContext) -> None:
        self.ctx = ctx

    def image_path(self, item: ExportItem) -> str | None:
        """Relative path of the copied image in the export (``--copy-images``), or None if this format embeds it."""
        raise NotImplementedError

    def add(self, item: ExportItem) -> None:
        """Write (or spool) the labels of one image."""
        raise NotImplementedError

    def finish(self) -> dict[str, str]:
        """Complete the export's files; returns ``{role: path relative to the export folder}``."""
        raise NotImplementedError


def coco_categories(source: AnnotateOutput) -> list[dict[str, Any]]:
    """COCO categories of the output: ``{"id", "name", "supercategory" ("thing"/"stuff"), "isthing" 0/1}``."""
    return [
        {
            "id": int(c["id"]),
            "name": str(c["name"]),
            "supercategory": str(c.get("supercategory") or ("thing" if c["isthing"] else "stuff")),
            "isthing": int(bool(c["isthing"])),
        }
        for c in source.categories
    ]


def coco_image(item: ExportItem, image_id: int) -> dict[str, Any]:
    """The COCO ``images`` entry of an item: ``{"id": image_id, "file_name": item.name, "width", "height",
    "coco_url": the image's source URL, "odise_image_id": the output's image id as a string}``."""
    return {
        "id": image_id,
        "file_name": item.name,
        "width": item.width,
        "height": item.height,
        "coco_url": item.image_url,
        "odise_image_id": str(item.row["image_id"]),
    }


def segment_masks(item: ExportItem) -> Iterator[tuple[dict[str, Any], np.ndarray]]:
    """``(segment, HxW bool mask)`` for every (kept) segment of an item, decoded from its RLE."""
    for seg in item.row["segments"]:
        yield seg, rle_to_mask(seg["rle"])


def panoptic_png(item: ExportItem) -> bytes:
    """COCO panoptic PNG of the kept segments: the stored PNG when nothing was dropped, else rebuilt from RLEs."""
    stored = item.row.get("panoptic_png")
    if stored is not None and not item.filtered:
        return stored
    return panoptic_to_png(segments_to_panoptic(item.row["segments"], item.height, item.width))


def semantic_map(item: ExportItem, dtype: Any = np.uint16) -> np.ndarray:
    """``HxW`` category id of the kept panoptic segment at each pixel (0 = unlabeled)."""
    out = np.zeros((item.height, item.width), dtype)
    for seg, mask in segment_masks(item):
        out[mask] = int(seg["category_id"])
    return out
