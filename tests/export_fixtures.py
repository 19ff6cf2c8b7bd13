"""A small annotate output built from real photos-like images and real encoders, for the export tests.

Written through the public contract only (``pipeline.encode.encode_result`` -> ``pipeline.schema.label_row`` /
``error_row`` -> ``rows_to_table`` -> ``parquet/<shard_id>.parquet`` + ``provenance.json``), on any fsspec URL
(local folder or the moto S3 server). Two shards:

* an image folder ``<images>/`` (virtual shard ``<images>#images-000000``): ``a.jpg`` (30x40), ``b.jpg`` (32x32),
  ``sub/c.png`` (24x48); ``uncertainty`` filled (0.2, 0.8, 0.5);
* a WebDataset tar ``<tar>``: ``x1.jpg``, ``./x2.JPG`` (key ``x2``, extension ``jpg``) and ``broken.jpg``
  (an error row); ``uncertainty`` null (schema-1-like rows: the exports fall back to 1 - mean score).

Segments are rectangles painted in order (later ones on top), with chosen scores.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from helpers import tar_bytes
from PIL import Image

CATEGORIES = [
    {"id": 1, "name": "person", "isthing": 1, "synonyms": ["person", "man", "woman"]},
    {"id": 2, "name": "cat", "isthing": 1, "synonyms": ["cat", "kitten"]},
    {"id": 7, "name": "sky", "isthing": 0, "synonyms": ["sky", "clouds"]},
]
NAMES = {c["id"]: c["name"] for c in CATEGORIES}
IMAGES_SHARD_ID = "imgs-images-000000-0badcafe"
TAR_SHARD_ID = "s0-12345678"

# key -> (height, width, format, [(category_id, score, (y0, y1, x0, x1)), ...], uncertainty)
FOLDER_SAMPLES = {
    "a.jpg": (30, 40, "JPEG", [(7, 0.3, (0, 12, 0, 40)), (1, 0.9, (8, 26, 5, 20))], 0.2),
    "b.jpg": (32, 32, "JPEG", [(2, 0.6, (2, 30, 2, 18)), (1, 0.2, (10, 20, 20, 30))], 0.8),
    "sub/c.png": (24, 48, "PNG", [(7, 0.95, (0, 24, 0, 48))], 0.5),
}
TAR_SAMPLES = {
    "x1": (28, 36, "JPEG", [(7, 0.4, (0, 10, 0, 36)), (1, 0.7, (12, 27, 3, 30))], None),
    "x2": (20, 20, "JPEG", [(2, 0.1, (5, 15, 5, 15))], None),
}
TAR_MEMBERS = {"x1": "x1.jpg", "x2": "./x2.JPG"}


@dataclass
class Expected:
    """What the fixture wrote, for comparisons."""

    output: str
    images_url: str
    tar_url: str
    image_bytes: dict[str, bytes] = field(default_factory=dict)  # key -> file bytes
    id_maps: dict[str, np.ndarray] = field(default_factory=dict)  # key -> HxW segment ids
    segments: dict[str, list[tuple[int, int, float]]] = field(
        default_factory=dict
    )  # key -> [(id, cat, score)]
    uncertainty: dict[str, float] = field(default_factory=dict)  # key -> the value the exports sort by

    def semantic(self, key: str, min_score: float | None = None) -> np.ndarray:
        out = np.zeros(self.id_maps[key].shape, np.int32)
        for seg_id, cat, score in self.segments[key]:
            if min_score is None or score >= min_score:
                out[self.id_maps[key] == seg_id] = cat
        return out


def _image(rng: np.random.Generator, h: int, w: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def _result(h: int, w: int, specs: list[tuple[int, float, tuple[int, int, int, int]]]):
    from odise_model.types import Instance, PanopticResult, Segment

    id_map = np.zeros((h, w), np.int32)
    for k, (_, _, (y0, y1, x0, x1)) in enumerate(specs, start=1):
        id_map[y0:y1, x0:x1] = k
    segments, instances = [], []
    semantic = np.zeros((h, w), np.int32)
    for k, (cat, score, _) in enumerate(specs, start=1):
        mask = id_map == k
        ys, xs = np.nonzero(mask)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1))
        thing = bool(next(c["isthing"] for c in CATEGORIES if c["id"] == cat))
        segments.append(Segment(k, cat, NAMES[cat], thing, score, int(mask.sum()), bbox))
        semantic[mask] = cat
        if thing:
            instances.append(Instance(cat, NAMES[cat], score * 0.9, mask, bbox))
    return PanopticResult(
        panoptic_seg=id_map, segments=segments, semantic_seg=semantic, instances=instances
    ), id_map


def write_annotate_output(
    output: str, images_url: str, tar_url: str, storage_options: dict[str, Any] | None = None, seed: int = 0
) -> Expected:
    """Write the images, the tar and the annotate output described in the module doc; returns what to expect."""
    import fsspec
    import pyarrow.parquet as pq

    from pipeline.encode import encode_result
    from pipeline.schema import RunProvenance, error_row, image_id, label_row, rows_to_table

    options = dict(storage_options or {})
    rng = np.random.default_rng(seed)
    expected = Expected(output, images_url, tar_url)
    provenance = RunProvenance(
        run_id="test-run",
        model_variant="tiny",
        categories=CATEGORIES,
        settings={"plumbing_check": True},
        weights_sha256={"checkpoint": None},
    )

    def put(url: str, data: bytes) -> None:
        with fsspec.open(url, "wb", **options) as f:
            f.write(data)

    def add(key: str, spec: tuple, shard: str, shard_id: str, rows: list, ext: str) -> None:
        h, w, fmt, segs, uncertainty = spec
        result, id_map = _result(h, w, segs)
        encoded = encode_result(result, include_png=True)
        rows.append(
            label_row(
                run_id="test-run",
                shard=shard,
                shard_id=shard_id,
                key=key,
                encoded=encoded,
                image_ext=ext,
                uncertainty=uncertainty,
                branch_disagreement=None if uncertainty is None else 0.5,
            )
        )
        expected.id_maps[key] = id_map
        expected.segments[key] = [(k, cat, score) for k, (cat, score, _) in enumerate(segs, start=1)]
        scores = [score for _, score, _ in segs]
        expected.uncertainty[key] = (
            uncertainty if uncertainty is not None else 1.0 - sum(scores) / len(scores)
        )

    # 1. the image folder and its shard
    folder_rows: list[dict[str, Any]] = []
    for key, spec in FOLDER_SAMPLES.items():
        data = _image(rng, spec[0], spec[1], spec[2])
        put(f"{images_url}/{key}", data)
        expected.image_bytes[key] = data
        add(key, spec, f"{images_url}#images-000000", IMAGES_SHARD_ID, folder_rows, key.rsplit(".", 1)[1])

    # 2. the tar and its shard (members in key order, as WebDataset writers do)
    tar_rows: list[dict[str, Any]] = [
        error_row(
            run_id="test-run",
            shard=tar_url,
            shard_id=TAR_SHARD_ID,
            key="broken",
            error="truncated image [broken.jpg]",
            image_ext="jpg",
        )
    ]
    members = [("broken.jpg", b"\xff\xd8 not a jpeg")]
    for key, spec in TAR_SAMPLES.items():
        data = _image(rng, spec[0], spec[1], spec[2])
        expected.image_bytes[key] = data
        members.append((TAR_MEMBERS[key], data))
        members.append((f"{key}.json", json.dumps({"key": key}).encode()))
        add(key, spec, tar_url, TAR_SHARD_ID, tar_rows, "jpg")
    put(tar_url, tar_bytes(members))

    # 3. the annotate output: one Parquet file per shard, rows sorted by key, ids as a commit assigns them
    #    (shard sequence numbers 1, 2; the key's rank in its shard), and provenance.json
    for seq, (shard_id, rows) in enumerate(
        ((IMAGES_SHARD_ID, folder_rows), (TAR_SHARD_ID, tar_rows)), start=1
    ):
        rows = sorted(rows, key=lambda r: r["key"])
        for rank, row in enumerate(rows):
            row["image_id"] = image_id(seq, rank)
        table = rows_to_table(rows, provenance)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        put(f"{output}/parquet/{shard_id}.parquet", sink.getvalue())
    put(f"{output}/provenance.json", provenance.to_json().encode())
    return expected


LABELLED_KEY_ORDER = ["a.jpg", "b.jpg", "sub/c.png", "x1", "x2"]
"""The export order by key: shard files by name, then keys (the error row ``broken`` is skipped)."""
