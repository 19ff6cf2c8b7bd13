"""Shared builders for the commit / COCO tests: a provenance, categories, photo-like panoptic results, rows.

Not a test module (no ``test_`` prefix); imported by tests/test_commit.py, tests/test_coco.py and
tests/test_reruns.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from odise_model.types import Instance, PanopticResult, Segment, bbox_from_mask
from pipeline.encode import encode_result
from pipeline.schema import RunProvenance, error_row, label_row
from pipeline.shards import ShardRef

CATS = [
    {"id": 1, "name": "cat", "isthing": True},
    {"id": 2, "name": "dog", "isthing": True},
    {"id": 7, "name": "sky", "isthing": False},
    {"id": 8, "name": "grass", "isthing": False},
]
PROV = RunProvenance(
    run_id="run-0001",
    model_variant="odise_tiny_test",
    weights_sha256={"unet": "ab" * 32, "clip": None},
    vocabulary_source="tests",
    vocabulary_sha256="cd" * 32,
    categories=CATS,
    thresholds={"object_mask_threshold": 0.8, "overlap_threshold": 0.8},
    weights_licences="CreativeML OpenRAIL-M (SD); MIT (CLIP)",
    settings={"batch_size": 2},
)


def fake_result(seed: int, h: int = 24, w: int = 32) -> PanopticResult:
    """Photo-like layout: sky over grass, one or two animals at seeded positions, with instances."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    seg = np.where(yy < rng.integers(6, 14), 1, 2).astype(np.int32)
    segments = [(1, 7, "sky", False, 0.9), (2, 8, "grass", False, 0.85)]
    instances = []
    for k, (cid, name) in enumerate([(1, "cat"), (2, "dog")][: 1 + seed % 2]):
        cy, cx, r = rng.integers(6, h - 6), rng.integers(6, w - 6), rng.integers(3, 6)
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        seg[mask] = 3 + k
        segments.append((3 + k, cid, name, True, float(rng.uniform(0.5, 1.0))))
    segs = []
    for sid, cid, name, thing, score in segments:
        m = seg == sid
        if m.any():
            segs.append(Segment(sid, cid, name, thing, score, int(m.sum()), bbox_from_mask(m)))
            if thing:
                instances.append(Instance(cid, name, score * 0.9, m, bbox_from_mask(m)))
    return PanopticResult(panoptic_seg=seg, segments=segs, instances=instances)


def seed_of(key: str, salt: str = "") -> int:
    return int(hashlib.sha1((salt + key).encode()).hexdigest()[:6], 16)


def make_rows(
    shard: ShardRef,
    keys: list[str],
    *,
    include_png: bool = True,
    errors: tuple[str, ...] = (),
    retryable: tuple[str, ...] = (),
    ext: str | None = "jpg",
    salt: str = "",
    provenance: RunProvenance = PROV,
) -> list[dict]:
    """Rows of ``keys``: labelled (a seeded fake result), or error rows for ``errors`` / ``retryable`` keys
    (the latter with ``retryable=True``, kind ``network``). ``salt`` changes the labels."""
    rows = []
    for key in keys:
        common = {"run_id": provenance.run_id, "shard": shard.url, "shard_id": shard.shard_id, "key": key}
        if key in retryable:
            rows.append(
                error_row(
                    **common,
                    error="connection reset by peer",
                    error_kind="network",
                    retryable=True,
                    image_ext=ext,
                )  # fmt: skip
            )
        elif key in errors:
            rows.append(
                error_row(**common, error="truncated image", error_kind="truncated_image", image_ext=ext)
            )
        else:
            encoded = encode_result(fake_result(seed_of(key, salt)), include_png=include_png)
            rows.append(label_row(**common, encoded=encoded, image_ext=ext))
    return rows


def shard(i: int) -> ShardRef:
    return ShardRef(url=f"s3://data/train/shard-{i:06d}.tar", shard_id=f"shard-{i:06d}-0000abcd")


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_keys(path: Path) -> list[str]:
    return pq.read_table(path, columns=["key"]).column("key").to_pylist()


def coco_parts(coco_dir: Path) -> list[tuple[dict, Path]]:
    """``[(panoptic dict, instances path)]`` of every part listed in ``coco/index.json``."""
    index = json.loads((coco_dir / "index.json").read_text())
    return [
        (json.loads((coco_dir / p["panoptic"]).read_text()), coco_dir / p["instances"])
        for p in index["parts"]
    ]
