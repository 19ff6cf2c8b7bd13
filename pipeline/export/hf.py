"""Hugging Face ``datasets``: Parquet files that ``load_dataset("parquet", ...)`` reads with typed features.

Layout (``<export>/``)::

    data/train-<00000>.parquet   --rows-per-file rows each, in export order
    README.md                    dataset card: the data files as the ``train`` split, the columns, the provenance
    categories.json, provenance.json, export.json

Columns: ``key``, ``file_name`` (the image's own file name), ``shard``, ``shard_id``, ``image_id`` (int64),
``image_url`` (where the image is), ``width``, ``height``, ``segments`` and ``instances`` (as in the annotate
output, after ``--min-score``), ``panoptic_png`` (COCO panoptic PNG bytes; rebuilt when ``--min-score``
dropped segments), ``semantic_png`` (the model's dense semantic output, 16-bit PNG bytes, unchanged),
``uncertainty`` and ``branch_disagreement`` (as stored; may be null), ``review_uncertainty`` (the value
``--order uncertainty`` sorts by: ``uncertainty``, or ``1 - mean segment score`` where it is null).
With ``--include-image`` (or ``--copy-images``) an ``image`` column ``struct<bytes: binary, path: string>``
holds the image file's bytes, and the Arrow schema metadata (key ``huggingface``) declares it a
``datasets.Image()`` feature, so::

    from datasets import load_dataset
    ds = load_dataset("parquet", data_files="export/data/*.parquet", split="train")
    ds[0]["image"]          # a PIL image
    ds.features["image"]    # Image(mode=None, decode=True)

Images are read after the labels, grouped by tar shard (each tar streamed once), through local temp files
(SQLite), then written in export order; memory does not grow with the export.
"""

from __future__ import annotations

import json
import os
import pickle
import sqlite3
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.export._io import put_json, put_local
from pipeline.export.base import ExportContext, Writer, panoptic_png
from pipeline.export.images import GroupSpill, fetch_grouped
from pipeline.export.labelstudio import original_file_name
from pipeline.export.reader import ExportItem
from pipeline.schema import output_field

__all__ = ["HFWriter", "IMAGE_TYPE", "hf_schema"]

IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
"""The Arrow type of a ``datasets.Image()`` feature."""


def hf_schema(include_image: bool) -> pa.Schema:
    """The Arrow schema of the export's Parquet files (``huggingface`` metadata when images are included)."""
    # the output's own column types (pipeline.schema), every column nullable in the export
    carried = ("shard", "shard_id", "image_id", "image_url", "width", "height", "segments", "instances")
    carried += ("panoptic_png", "semantic_png", "uncertainty", "branch_disagreement")
    fields = [
        output_field("key", nullable=True),
        pa.field("file_name", pa.string()),
        *(output_field(name, nullable=True) for name in carried),
        pa.field("review_uncertainty", pa.float32()),
    ]
    if not include_image:
        return pa.schema(fields)
    fields.append(pa.field("image", IMAGE_TYPE))
    features = {"info": {"features": {"image": {"_type": "Image"}}}}
    return pa.schema(fields, metadata={b"huggingface": json.dumps(features).encode()})


class HFWriter(Writer):
    """Writes the Hugging Face Parquet layout of the module doc."""

    columns = ("panoptic_png", "semantic_png")

    def __init__(self, ctx: ExportContext) -> None:
        super().__init__(ctx)
        self.include_image = ctx.config.include_image or ctx.config.copy_images
        self.schema = hf_schema(self.include_image)
        self.rows_per_file = ctx.config.rows_per_file
        self.files: list[str] = []
        self.batch: list[dict[str, Any]] = []
        self.writer: pq.ParquetWriter | None = None
        self.local = ""
        self.in_file = 0
        self.missing: list[str] = []
        self.images_read = 0
        self.position = 0
        self.spill: GroupSpill[tuple[int, bytes]] | None = GroupSpill(ctx.tmp) if self.include_image else None

    def image_path(self, item: ExportItem) -> str | None:
        return None  # images are embedded (--include-image), never copied as files

    def _record(self, item: ExportItem) -> dict[str, Any]:
        row = item.row
        return {
            "key": row["key"],
            "file_name": original_file_name(row),
            "shard": row["shard"],
            "shard_id": row["shard_id"],
            "image_id": int(row["image_id"]),
            "image_url": item.image_url,
            "width": item.width,
            "height": item.height,
            "segments": row["segments"],
            "instances": row["instances"],
            "panoptic_png": panoptic_png(item),
            "semantic_png": row.get("semantic_png"),
            "uncertainty": row.get("uncertainty"),
            "branch_disagreement": row.get("branch_disagreement"),
            "review_uncertainty": item.uncertainty,
        }

    def add(self, item: ExportItem) -> None:
        record = self._record(item)
        if self.spill is None:
            self._write(record)
        else:
            self.spill.add(
                item.image_url, (self.position, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL))
            )
        self.position += 1  # export order (rows come back grouped by tar, and are put back in this order)

    def _write(self, record: dict[str, Any]) -> None:
        self.batch.append(record)
        if len(self.batch) >= 64 or self.in_file + len(self.batch) >= self.rows_per_file:
            self._flush()

    def _flush(self) -> None:
        if not self.batch:
            return
        if self.writer is None:
            self.local = os.path.join(self.ctx.tmp, f"part-{len(self.files):05d}.parquet")
            self.writer = pq.ParquetWriter(self.local, self.schema, compression="zstd")
        self.writer.write_table(pa.Table.from_pylist(self.batch, schema=self.schema))
        self.in_file += len(self.batch)
        self.batch = []
        if self.in_file >= self.rows_per_file:
            self._close_file()

    def _close_file(self) -> None:
        if self.writer is None:
            return
        self.writer.close()
        rel = f"data/train-{len(self.files):05d}.parquet"
        put_local(self.ctx.fs, self.ctx.root, rel, self.local)
        os.remove(self.local)
        self.files.append(rel)
        self.writer, self.in_file = None, 0

    def _write_with_images(self) -> None:
        """Read the images grouped by tar, then write the rows in export order (both passes on local disk)."""
        assert self.spill is not None
        db = sqlite3.connect(os.path.join(self.ctx.tmp, "hf-rows.sqlite"))
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("CREATE TABLE rows (seq INTEGER PRIMARY KEY, blob BLOB)")
        for got in fetch_grouped(self.spill, self.ctx.source.storage_options):
            seq, blob = got.payload
            record = pickle.loads(blob)
            if got.data is None:
                self.missing.append(got.error or got.url)
                record["image"] = None
            else:
                self.images_read += 1
                record["image"] = {"bytes": got.data, "path": record["file_name"]}
            db.execute(
                "INSERT INTO rows VALUES (?, ?)",
                (seq, pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL)),
            )
        db.commit()
        for (blob,) in db.execute("SELECT blob FROM rows ORDER BY seq"):
            self._write(pickle.loads(blob))
        db.close()
        self.spill.close()

    def finish(self) -> dict[str, str]:
        if self.spill is not None:
            self._write_with_images()
        self._flush()
        self._close_file()
        ctx = self.ctx
        put_json(ctx.fs, f"{ctx.root}/categories.json", ctx.source.categories)
        card = os.path.join(ctx.tmp, "README.md")
        with open(card, "w", encoding="utf-8") as f:
            f.write(_dataset_card(ctx, self.include_image))
        put_local(ctx.fs, ctx.root, "README.md", card)
        return {"data": "data/", "card": "README.md", "categories": "categories.json"}


def _dataset_card(ctx: ExportContext, include_image: bool) -> str:
    source = ctx.source
    plumbing = (
        "\n**PLUMBING CHECK: these labels come from a model with random weights; they are meaningless.**\n"
        if source.plumbing_check
        else ""
    )
    names = ", ".join(f"{c['id']}: {c['name']}" for c in source.categories[:50])
    more = f" and {len(source.categories) - 50} more" if len(source.categories) > 50 else ""
    image_line = (
        "- `image`: the image file (`datasets.Image`)\n"
        if include_image
        else "- (no `image` column: see `image_url`)\n"
    )
    return (
        "---\n"
        "configs:\n"
        "- config_name: default\n"
        "  data_files:\n"
        "  - split: train\n"
        "    path: data/train-*.parquet\n"
        "---\n"
        "# ODISE open-vocabulary panoptic pseudo-labels\n"
        f"{plumbing}\n"
        f"Exported by `odise-export --format hf` from `{source.url}` (model `{source.model_version}`).\n\n"
        "```python\n"
        "from datasets import load_dataset\n"
        'ds = load_dataset("parquet", data_files="data/*.parquet", split="train")\n'
        "```\n\n"
        "Columns (see docs/output-format.md of odise-annotate):\n\n"
        "- `key`, `file_name`, `shard`, `shard_id`, `image_id`, `image_url`, `width`, `height`\n"
        "- `segments`, `instances`: category, score, area, bbox (x, y, w, h), COCO RLE mask\n"
        "- `panoptic_png`, `semantic_png`: PNG bytes\n"
        "- `uncertainty`, `branch_disagreement`, `review_uncertainty`\n"
        f"{image_line}\n"
        f"Categories: {names}{more} (`categories.json`).\n"
    )
