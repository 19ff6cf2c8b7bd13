"""FiftyOne: one folder that loads as two FiftyOne dataset types, no FiftyOne needed to write it.

Layout (``<export>/``)::

    labels.json          COCODetectionDataset labels: COCO instances with RLE ``segmentation`` and ``score``
    labels/<stem>.png    ImageSegmentationDirectory masks: category id of the panoptic segment at each
                         pixel (0 = unlabeled); 8-bit PNG when every category id is < 256, else 16-bit
    mask_targets.json    {"<category id>": "<name>"} for the masks (``dataset.default_mask_targets``)
    data/<name>          the images, with --copy-images
    data.json            without --copy-images: {"<name>": "<local path or URL>"} (FiftyOne's data manifest)
    categories.json, provenance.json, export.json

``labels.json``: ``images`` (``id`` 1..N in export order, ``file_name`` = ``<shard_id>/<stem>.<ext>`` relative
to ``data/``, ``width``, ``height``, ``coco_url`` = the image's source URL, ``odise_image_id`` (string),
``key``, ``shard_id``, ``uncertainty``), ``annotations`` (one per kept instance: ``id``, ``image_id``,
``category_id``, ``segmentation`` {size, counts} compressed RLE, ``area``, ``bbox`` [x, y, w, h],
``iscrowd`` 0, ``score``; :func:`pipeline.encode.coco_instance_annotation`), ``categories`` (all of the vocabulary, with ``isthing``).

Load it (FiftyOne >= 0.23; checked with 1.22's importers)::

    import fiftyone as fo
    det = fo.Dataset.from_dir(dataset_dir="export/", dataset_type=fo.types.COCODetectionDataset,
                              label_types="segmentations", label_field="predictions")   # masks + confidence
    seg = fo.Dataset.from_dir(dataset_dir="export/", dataset_type=fo.types.ImageSegmentationDirectory,
                              label_field="semantic")
    seg.default_mask_targets = {int(k): v for k, v in json.load(open("export/mask_targets.json")).items()}

Without ``--copy-images`` add ``data_path="data.json"`` to both calls (FiftyOne's default looks for ``data/``
only). FiftyOne (open source) opens local files only: images in object storage need ``--copy-images``.
"""

from __future__ import annotations

import io
import logging
import os

import numpy as np
from PIL import Image

from pipeline.encode import coco_instance_annotation
from pipeline.export._io import JsonArraySpool, JsonObjectSpool, assemble_json, put_json, put_local
from pipeline.export.base import ExportContext, Writer, coco_categories, coco_image, semantic_map
from pipeline.export.reader import ExportItem

__all__ = ["FiftyOneWriter", "local_path_or_url"]

log = logging.getLogger(__name__)


def local_path_or_url(url: str) -> str:
    """``file:///x/a.jpg`` -> ``/x/a.jpg`` (what FiftyOne opens); other URLs unchanged."""
    return url[len("file://") :] if url.startswith("file://") else url


class FiftyOneWriter(Writer):
    """Writes the FiftyOne layout of the module doc."""

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.categories = coco_categories(ctx.source)
        self.dtype = np.uint8 if max(c["id"] for c in self.categories) < 256 else np.uint16
        self.images = JsonArraySpool(ctx.tmp)
        self.annotations = JsonArraySpool(ctx.tmp)
        self.manifest = JsonObjectSpool(ctx.tmp) if not ctx.config.copy_images else None
        self.next_image_id = 1
        self.next_ann_id = 1
        self.not_local = 0

    def image_path(self, item: ExportItem) -> str | None:
        return f"data/{item.name}"

    def add(self, item: ExportItem) -> None:
        row = item.row
        image_id = self.next_image_id
        self.next_image_id += 1
        self.images.add(
            {
                **coco_image(item, image_id),
                "key": row["key"],
                "shard_id": row["shard_id"],
                "uncertainty": round(item.uncertainty, 6),
            }
        )
        for inst in row["instances"]:
            self.annotations.add(coco_instance_annotation(inst, ann_id=self.next_ann_id, image_id=image_id))
            self.next_ann_id += 1
        buf = io.BytesIO()
        Image.fromarray(semantic_map(item, self.dtype)).save(buf, format="PNG")
        self.ctx.files.add(f"labels/{item.stem}.png", buf.getvalue())
        if self.manifest is not None:
            target = local_path_or_url(item.image_url)
            self.not_local += "://" in target
            self.manifest.add(item.name, target)

    def finish(self) -> dict[str, str]:
        ctx = self.ctx
        local = os.path.join(ctx.tmp, "labels.json")
        info = {"description": "ODISE pseudo-labels (odise-export --format fiftyone)", "version": "1.0"}
        assemble_json(
            local,
            {"info": info, "licenses": []},
            {"images": self.images, "annotations": self.annotations},
            {"categories": self.categories},
        )
        put_local(ctx.fs, ctx.root, "labels.json", local)
        files = {"labels": "labels.json", "masks": "labels/", "mask_targets": "mask_targets.json"}
        put_json(ctx.fs, f"{ctx.root}/mask_targets.json", {str(c["id"]): c["name"] for c in self.categories})
        if self.manifest is not None:
            local = os.path.join(ctx.tmp, "data.json")
            self.manifest.write(local)
            put_local(ctx.fs, ctx.root, "data.json", local)
            files["data"] = "data.json"
            if self.not_local:
                log.warning(
                    "%d image(s) are not local files (object storage or tar members): FiftyOne cannot open them "
                    "from data.json; export with --copy-images",
                    self.not_local,
                )
        else:
            files["data"] = "data/"
        for spool in (self.images, self.annotations, self.manifest):
            if spool is not None:
                spool.close()
        return files
