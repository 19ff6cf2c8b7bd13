"""The pipeline's stages as Ray Data map functions (stateless CPU steps, one stateful GPU step).

Rows flowing through the pipeline (plain columns, so Arrow can carry them):

* ``kind``: ``"sample"`` or ``"end"`` (one per shard, after its last sample, carrying ``shard_total``)
* ``shard``, ``shard_id``, ``key``, ``image_ext``, ``error``
* decode stage adds: ``image`` (the resized image's raw uint8 bytes), ``rh``, ``rw`` (its size),
  ``height``, ``width`` (original size), ``overlay`` (bool: render an overlay for this sample)
* model stage adds: ``panoptic`` / ``semantic`` (int32 bytes at the original size), ``segments`` (JSON),
  ``inst_meta`` (JSON: category, score per instance), ``inst_masks`` (instance masks bit-packed on the GPU,
  ``N x ceil(H*W/8)`` bytes); the image is kept only for overlays
* encode/stage step writes staging Parquet files and emits small records for the driver.

Images travel as raw bytes plus their shape rather than as tensor columns, so ragged sizes never hit
Arrow's tensor extension types.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["ReadShard", "Annotator", "EncodeAndStage", "overlay_plan"]


def overlay_plan(num_shards: int, overlays: int) -> int:
    """How many leading samples of each of the first shards get an overlay (total ``overlays``)."""
    if overlays <= 0 or num_shards <= 0:
        return 0
    return max(1, math.ceil(overlays / num_shards))


def _empty_sample_row(shard: dict, key: str, *, error: str | None, ext: str | None) -> dict[str, Any]:
    return {
        "kind": "sample",
        "shard": shard["url"],
        "shard_id": shard["shard_id"],
        "key": key,
        "image_ext": ext or "",
        "error": error or "",
        "image": b"",
        "rh": 0,
        "rw": 0,
        "height": 0,
        "width": 0,
        "overlay": False,
        "shard_total": 0,
    }



def _sample_location(shard: dict, key: str) -> str:
    """Where a sample lives, for error messages: the image's own URL for image folders, ``<tar URL>:<key>``."""
    if shard.get("kind") == "images" and shard.get("root"):
        return f"{str(shard['root']).rstrip('/')}/{key}"
    return f"{shard['url']}:{key}"

class ReadShard:
    """CPU stage: stream one shard, decode and resize every image; a generator of row batches.

    Undecodable / oversized samples become error rows (the job goes on); the shard's end is marked by an
    ``end`` row carrying the number of samples, so the driver knows when every row of a shard has arrived.
    A shard item with ``only_keys`` (a list; ``--retry-errors``) yields, and counts, only those keys.
    """

    def __init__(
        self,
        *,
        storage_options: dict,
        short_side: int,
        max_size: int,
        max_pixels: int,
        shard_index: dict[str, int],
        overlays_per_shard: int,
        overlays_total: int,
        rows_per_batch: int = 8,
    ) -> None:
        self.storage_options = storage_options
        self.short_side = short_side
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.shard_index = shard_index
        self.overlays_per_shard = overlays_per_shard
        self.overlays_total = overlays_total
        self.rows_per_batch = rows_per_batch

    def _decode(self, shard: dict, sample, position: int) -> dict[str, Any]:
        """Row of one sample; ``position`` = number of images of this shard decoded so far."""
        from odise_model.predictor import resize_image
        from pipeline.images import ImageDecodeError, decode_image

        row = _empty_sample_row(shard, sample.key, error=sample.error, ext=sample.image_ext)
        if sample.error:
            return row
        if sample.image_bytes is None:
            row["error"] = "no image bytes"
            return row
        try:
            rgb = decode_image(sample.image_bytes, max_pixels=self.max_pixels, source=_sample_location(shard, sample.key))
        except ImageDecodeError as exc:
            row["error"] = str(exc)
            return row
        resized = resize_image(rgb, self.short_side, self.max_size)
        index = self.shard_index.get(shard["shard_id"], 0)
        overlay = position < self.overlays_per_shard and index * self.overlays_per_shard + position < self.overlays_total
        self._decoded += 1
        row.update(
            image=np.ascontiguousarray(resized).tobytes(),
            rh=int(resized.shape[0]),
            rw=int(resized.shape[1]),
            height=int(rgb.shape[0]),
            width=int(rgb.shape[1]),
            overlay=bool(overlay),
        )
        return row

    def __call__(self, batch: dict[str, Any]):
        from pipeline.shards import ShardRef, iter_samples

        for shard_json in batch["shard"]:
            shard = json.loads(shard_json)
            ref = ShardRef(
                url=shard["url"],
                shard_id=shard["shard_id"],
                kind=shard["kind"],
                members=tuple(shard.get("members", ())),
                root=shard.get("root", ""),
            )
            rows: list[dict[str, Any]] = []
            total = 0
            self._decoded = 0  # overlays go to the first images of a shard that decode
            only = shard.get("only_keys")  # --retry-errors: read only these keys (None: every key)
            only = set(only) if only is not None else None
            for sample in iter_samples(ref, self.storage_options):
                if only is not None and sample.key not in only:
                    continue
                rows.append(self._decode(shard, sample, self._decoded))
                total += 1
                if len(rows) >= self.rows_per_batch:
                    yield _columns(rows)
                    rows = []
            end = _empty_sample_row(shard, "", error=None, ext=None)
            end.update(kind="end", shard_total=total)
            rows.append(end)
            yield _columns(rows)


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


class Annotator:
    """GPU stage: one model per actor, built once in ``__init__``; labels batches in ``__call__``.

    Args:
        model_kwargs: keyword arguments of :func:`odise_model.build_odise` (variant and weight sources).
        vocabulary_text: the vocabulary in canonical ``classes.txt`` form (parsed again here).
        predictor_kwargs: :class:`odise_model.Predictor` settings.
        postprocess: threshold overrides (``object_mask_threshold``, ``overlap_threshold``) and fusion
            exponent overrides (``alpha``, ``beta``).
        device: ``"cuda"`` or ``"cpu"``.
    """

    def __init__(
        self,
        *,
        model_kwargs: dict,
        vocabulary_text: str,
        predictor_kwargs: dict,
        overrides: dict,
        device: str,
    ) -> None:
        import torch

        import odise_model

        if device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("this replica was given a GPU slot but CUDA is not available")
        cfg = odise_model.load_config(model_kwargs.pop("config"))
        post = {k: v for k, v in overrides.items() if k in ("object_mask_threshold", "overlap_threshold") and v is not None}
        fusion = {k: v for k, v in overrides.items() if k in ("alpha", "beta") and v is not None}
        cfg = cfg.replace(**({"postprocess": post} if post else {}), **({"classifier": fusion} if fusion else {}))
        self.model = odise_model.build_odise(cfg, device=device, **model_kwargs)
        vocab = odise_model.parse_vocabulary(vocabulary_text, source="run vocabulary")
        self.predictor = odise_model.Predictor(self.model, vocab, **predictor_kwargs)
        self.batch_size = self.predictor.batch_size

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["key"])
        out = {k: list(batch[k]) for k in batch}
        for col in ("panoptic", "semantic", "inst_masks"):
            out[col] = [b""] * n
        out["segments"] = [""] * n
        out["inst_meta"] = [""] * n
        todo = [i for i in range(n) if batch["kind"][i] == "sample" and not batch["error"][i]]
        prepared = []
        for i in todo:
            h, w = int(batch["rh"][i]), int(batch["rw"][i])
            image = np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(h, w, 3)
            prepared.append(self.predictor.prepare_resized(image, (int(batch["height"][i]), int(batch["width"][i]))))
        results = []
        for start in range(0, len(prepared), self.batch_size):
            results.extend(self.predictor.predict_prepared_raw(prepared[start : start + self.batch_size]))
        for i, raw in zip(todo, results):
            out["panoptic"][i] = raw.panoptic.astype(np.int32).tobytes()
            out["semantic"][i] = raw.semantic.astype(np.int32).tobytes() if raw.semantic is not None else b""
            out["segments"][i] = json.dumps([s.__dict__ for s in raw.segments])
            names = {c.id: c.name for c in raw.vocabulary}
            out["inst_meta"][i] = json.dumps(
                [
                    {"category_id": int(c), "category_name": names[int(c)], "score": float(sc)}
                    for c, sc in zip(raw.instance_category_ids, raw.instance_scores)
                ]
            )
            out["inst_masks"][i] = np.ascontiguousarray(raw.instance_masks_packed).tobytes()
        for i in range(n):  # keep the image only where an overlay is wanted
            if not batch["overlay"][i]:
                out["image"][i] = b""
        return out


class EncodeAndStage:
    """CPU stage: encode results (RLE, PNG), render overlays, write staging Parquet; emit driver records."""

    def __init__(self, *, out_url: str, storage_options: dict, provenance_json: str, include_png: bool) -> None:
        self.out_url = out_url
        self.storage_options = storage_options
        self.provenance_json = provenance_json
        self.include_png = include_png

    def _result(self, batch: dict[str, Any], i: int):
        from odise_model.types import Instance, PanopticResult, Segment

        h, w = int(batch["height"][i]), int(batch["width"][i])
        panoptic = np.frombuffer(batch["panoptic"][i], dtype=np.int32).reshape(h, w)
        semantic = None
        if batch["semantic"][i]:
            semantic = np.frombuffer(batch["semantic"][i], dtype=np.int32).reshape(h, w)
        segments = [Segment(**{**s, "bbox": tuple(s["bbox"])}) for s in json.loads(batch["segments"][i])]
        meta = json.loads(batch["inst_meta"][i])
        packed = np.frombuffer(batch["inst_masks"][i], dtype=np.uint8).reshape(len(meta), -1) if meta else None
        instances = []
        for j, inst in enumerate(meta):
            mask = np.unpackbits(packed[j], count=h * w).reshape(h, w).astype(bool)
            instances.append(Instance(inst["category_id"], inst["category_name"], inst["score"], mask, (0, 0, 0, 0)))
        return PanopticResult(panoptic_seg=panoptic, segments=segments, semantic_seg=semantic, instances=instances)

    def _write_overlay(self, batch: dict[str, Any], i: int, result) -> str:
        import io

        from PIL import Image

        from pipeline.annotate.commit import key_to_filename
        from pipeline.encode import render_overlay
        from pipeline.storage import fs_root, write_bytes

        h, w = int(batch["rh"][i]), int(batch["rw"][i])
        image = np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(h, w, 3)
        height, width = result.panoptic_seg.shape
        if (h, w) != (height, width):  # back to the original size the labels are at
            image = np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
        buf = io.BytesIO()
        render_overlay(image, result).convert("RGB").save(buf, format="JPEG", quality=90)
        fs, root = fs_root(self.out_url, self.storage_options)
        rel = posixpath.join("overlays", batch["shard_id"][i], key_to_filename(batch["key"][i]) + ".jpg")
        write_bytes(fs, posixpath.join(root, rel), buf.getvalue(), durable=False)
        return rel

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pipeline.annotate.commit import write_staging
        from pipeline.encode import encode_result
        from pipeline.schema import RunProvenance, error_row, label_row

        provenance = RunProvenance.from_json(self.provenance_json)
        rows, records = [], []
        overlays: dict[str, list[str]] = {}
        for i in range(len(batch["key"])):
            common = {"run_id": provenance.run_id, "shard": batch["shard"][i], "shard_id": batch["shard_id"][i]}
            if batch["kind"][i] == "end":
                records.append({"type": "end", "shard_id": batch["shard_id"][i], "shard": batch["shard"][i],
                                "count": int(batch["shard_total"][i]), "keys": [], "overlays": []})
                continue
            ext = batch["image_ext"][i] or None
            if batch["error"][i]:
                size = {"width": int(batch["width"][i]) or None, "height": int(batch["height"][i]) or None}
                rows.append(error_row(**common, key=batch["key"][i], error=batch["error"][i], image_ext=ext, **size))
                continue
            result = self._result(batch, i)
            encoded = encode_result(result, include_png=self.include_png)
            rows.append(label_row(**common, key=batch["key"][i], encoded=encoded, image_ext=ext))
            if batch["overlay"][i] and batch["image"][i]:
                try:
                    rel = self._write_overlay(batch, i, result)
                    overlays.setdefault(batch["shard_id"][i], []).append(rel)
                except Exception as exc:  # an overlay is a convenience; never fail a shard for it
                    log.warning("overlay for %s/%s failed: %s", batch["shard_id"][i], batch["key"][i], exc)
        if rows:
            for rec in write_staging(rows, self.out_url, self.storage_options, provenance):
                records.append({"type": "staged", "shard_id": rec["shard_id"], "shard": "", "count": rec["n_rows"],
                                "keys": rec["keys"], "overlays": overlays.pop(rec["shard_id"], [])})
        if not records:
            records.append({"type": "none", "shard_id": "", "shard": "", "count": 0, "keys": [], "overlays": []})
        return _columns(records)
