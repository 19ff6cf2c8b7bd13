"""Datumaro / CVAT: COCO instances and COCO panoptic in the COCO folder layout Datumaro imports.

Layout (``<export>/``, ``<subset>`` = ``--subset``, default ``default``)::

    annotations/instances_<subset>.json     COCO instances: RLE ``segmentation``, ``score``, ``iscrowd`` 0
    annotations/panoptic_<subset>.json      COCO panoptic: ``segments_info`` per image
    annotations/panoptic_<subset>/<stem>.png   panoptic PNGs (id = R + 256 G + 256^2 B, 0 = unlabeled)
    images/<subset>/<name>                  the images, with --copy-images
    categories.json, provenance.json, export.json

Both JSON files share ``images`` (``id`` 1..N in export order: small integers, safe in JavaScript front ends;
``file_name`` = ``<shard_id>/<stem>.<ext>`` relative to ``images/<subset>/``; ``width``, ``height``;
``coco_url`` = the image's source URL; ``odise_image_id`` as a string) and ``categories`` (every category of
the vocabulary, ``isthing`` 0/1, ``supercategory`` thing/stuff). Instances are the output's instance
predictions (``instances`` column); panoptic segments are its ``segments`` (after ``--min-score``; dropped
segments become unlabeled pixels in the PNG).

Import::

    import datumaro as dm
    instances = dm.Dataset.import_from("export/", "coco_instances")
    panoptic = dm.Dataset.import_from("export/", "coco_panoptic")

CVAT: zip the folder and upload it as "COCO 1.0" (instances) or import through Datumaro; CVAT needs the
images inside the archive, so use ``--copy-images``.
"""

from __future__ import annotations

import os

from pipeline.encode import coco_instance_annotation, coco_segment_info
from pipeline.export._io import JsonArraySpool, assemble_json, put_local
from pipeline.export.base import ExportContext, Writer, coco_categories, coco_image, panoptic_png
from pipeline.export.reader import ExportItem

__all__ = ["DatumaroWriter"]


class DatumaroWriter(Writer):
    """Writes the Datumaro COCO layout of the module doc."""

    columns = ("panoptic_png",)

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.subset = ctx.config.subset
        self.categories = coco_categories(ctx.source)
        self.images = JsonArraySpool(ctx.tmp)
        self.instances = JsonArraySpool(ctx.tmp)
        self.panoptic = JsonArraySpool(ctx.tmp)
        self.next_image_id = 1
        self.next_ann_id = 1

    def image_path(self, item: ExportItem) -> str | None:
        return f"images/{self.subset}/{item.name}"

    def add(self, item: ExportItem) -> None:
        row = item.row
        image_id = self.next_image_id
        self.next_image_id += 1
        self.images.add(coco_image(item, image_id))
        for inst in row["instances"]:
            self.instances.add(coco_instance_annotation(inst, ann_id=self.next_ann_id, image_id=image_id))
            self.next_ann_id += 1
        png_name = f"{item.stem}.png"
        self.ctx.files.add(f"annotations/panoptic_{self.subset}/{png_name}", panoptic_png(item))
        self.panoptic.add(
            {
                "image_id": image_id,
                "file_name": png_name,
                "segments_info": [coco_segment_info(s) for s in row["segments"]],
            }
        )

    def finish(self) -> dict[str, str]:
        ctx = self.ctx
        info = {"description": "ODISE pseudo-labels (odise-export --format datumaro)", "version": "1.0"}
        files = {}
        for name, spool in (("instances", self.instances), ("panoptic", self.panoptic)):
            local = os.path.join(ctx.tmp, f"{name}.json")
            assemble_json(
                local,
                {"info": info, "licenses": []},
                {"images": self.images, "annotations": spool},
                {"categories": self.categories},
            )
            rel = f"annotations/{name}_{self.subset}.json"
            put_local(ctx.fs, ctx.root, rel, local)
            files[name] = rel
        files["panoptic_png"] = f"annotations/panoptic_{self.subset}/"
        if ctx.config.copy_images:
            files["images"] = f"images/{self.subset}/"
        for spool in (self.images, self.instances, self.panoptic):
            spool.close()
        return files
