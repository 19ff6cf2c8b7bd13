"""The pipeline's stages as Ray Data map functions (stateless CPU steps, one stateful GPU step).

Rows flowing through the pipeline (plain columns, so Arrow can carry them):

* ``kind``: ``"sample"`` or ``"end"`` (one per shard, after its last sample, carrying ``shard_total``)
* ``shard``, ``shard_id``, ``key``, ``image_ext``, ``image_url`` (stored form, see :mod:`pipeline.shards`),
  ``error`` (``""`` when fine), ``error_kind`` (``""`` or a :mod:`pipeline.errors` kind), ``retryable``,
  ``fault`` (``""`` unless a test injects a fault, see :mod:`pipeline.errors`)
* decode stage adds: ``image`` (the resized image's raw uint8 bytes), ``rh``, ``rw`` (its size),
  ``height``, ``width`` (original size), ``overlay`` (bool: render an overlay for this sample),
  ``overlay_name`` (its file name under ``overlays/<shard_id>/``)
* model stage adds: ``panoptic`` / ``semantic`` (int32 bytes at the original size), ``segments`` (JSON),
  ``inst_meta`` (JSON: category, score per instance), ``inst_masks`` (instance masks bit-packed on the GPU,
  ``N x ceil(H*W/8)`` bytes), ``uncertainty`` / ``branch_disagreement`` (float, NaN = null); the image is
  kept only for overlays
* encode/stage step writes staging Parquet files and emits small records for the driver.

Images travel as raw bytes plus their shape rather than as tensor columns, so ragged sizes never hit
Arrow's tensor extension types.

Per-sample isolation (no run stops for one sample): every stage turns an exception for one sample into that
sample's error row (``error`` names the image's location, ``error_kind`` and ``retryable`` from
:func:`pipeline.errors.classify`) and goes on; every sample still yields exactly one row, so the shard's
``end`` count stays right.

* read / decode (:class:`ReadShard`): the reader never raises for a shard's content or storage errors
  (:mod:`pipeline.shards`); an unexpected exception or ``MemoryError`` decoding one image becomes its row
  (``decode_error`` / ``out_of_memory``; a ``MemoryError`` is retried once after freeing memory). With
  ``copy_to`` (``--copy-images``) every image that decodes is copied, its original bytes unchanged, to
  ``<output>/images/<shard_id>/<name>`` (:func:`pipeline.annotate.coco.copied_image_name`: deterministic, so a
  rerun or a Ray retry rewrites the same file, atomically); a copy that still fails after the retries of
  :data:`WRITE_DELAYS_S` makes the image an error row (its storage kind, e.g. ``network``, retryable), so a
  labelled row's copy always exists and ``--retry-errors`` copies it later.
* model (:class:`Annotator`): a batch whose forward pass raises is retried one image at a time, so only
  the culprit gets ``model_error``. Out of memory (``torch.cuda.OutOfMemoryError`` or ``MemoryError``)
  in a batch retries each image alone (batch 1) with post-processing in chunks of queries
  (:meth:`odise_model.Predictor.postprocess_raw` ``chunk_queries``: identical outputs, a fraction of the
  memory); out of memory in post-processing retries it in chunks; out of memory again -> ``out_of_memory``
  (retryable). The CUDA cache is freed between attempts. Post-processing errors -> ``postprocess_error``.
* encode / stage (:class:`EncodeAndStage`): an encode exception -> ``encode_error``; a row that cannot be
  converted for the staging file (Arrow) -> ``staging_error`` (found row by row only when the batch fails);
  a staging write that fails with a retryable storage error is retried with backoff
  (:data:`WRITE_DELAYS_S`) and, if it keeps failing, the task raises so Ray retries it: staging files are
  write-once (random names) and the commit keeps one row per key, so nothing is lost or duplicated.
"""

from __future__ import annotations

import json
import logging
import math
import posixpath
import time
from typing import Any

import numpy as np

from pipeline.errors import classify, fault_of, inject, is_out_of_memory, is_retryable, is_storage_error
from pipeline.redact import redact_text

log = logging.getLogger(__name__)

__all__ = ["ReadShard", "Annotator", "EncodeAndStage", "overlay_plan", "overlay_file_name", "WRITE_DELAYS_S"]

#: Pauses (seconds) between attempts of a staging write that failed with a retryable storage error.
WRITE_DELAYS_S = (0.5, 2.0, 5.0)
#: Queries per chunk in the out-of-memory post-processing fallback.
OOM_CHUNK_QUERIES = 8


def overlay_plan(num_shards: int, overlays: int) -> int:
    """How many leading samples of each of the first shards get an overlay (total ``overlays``)."""
    if overlays <= 0 or num_shards <= 0:
        return 0
    return max(1, math.ceil(overlays / num_shards))


def _strip_image_ext(key: str) -> str:
    from pipeline.shards import IMAGE_EXTENSIONS

    folder, slash, base = key.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if dot and stem and ext.lower() in IMAGE_EXTENSIONS:
        return f"{folder}{slash}{stem}"
    return key


def overlay_file_name(key: str, taken: set[str]) -> str:
    """File name of a sample's JPEG overlay under ``overlays/<shard_id>/``: the key with its image extension
    *replaced* by ``.jpg`` (``astronaut.png`` -> ``astronaut.jpg``; WebDataset keys have none: ``cats/001`` ->
    ``cats/001.jpg``), made file-safe by :func:`pipeline.annotate.commit.key_to_filename`.

    Collisions within a shard (``a.jpg`` and ``a.png``) are resolved in reading order, deterministically: the
    first keeps ``a.jpg``, the next gets its full key (``a.png.jpg``), then ``a-2.jpg``, ``a-3.jpg`` ...
    ``taken`` holds the names already given in the shard and is updated.
    """
    from pipeline.annotate.commit import key_to_filename

    stem = key_to_filename(_strip_image_ext(key))
    name = f"{stem}.jpg"
    if name in taken:
        name = f"{key_to_filename(key)}.jpg"
    n = 2
    while name in taken:
        name = f"{stem}-{n}.jpg"
        n += 1
    taken.add(name)
    return name


def _empty_sample_row(shard: dict, key: str, *, error: str | None, ext: str | None) -> dict[str, Any]:
    return {
        "kind": "sample",
        "shard": shard["url"],
        "shard_id": shard["shard_id"],
        "key": key,
        "image_ext": ext or "",
        "image_url": "",
        "error": redact_text(error) if error else "",  # a reader's message may quote a signed URL
        "error_kind": "",
        "retryable": False,
        "fault": "",
        "image": b"",
        "rh": 0,
        "rw": 0,
        "height": 0,
        "width": 0,
        "overlay": False,
        "overlay_name": "",
        "shard_total": 0,
    }


def _sample_location(shard: dict, key: str) -> str:
    """Where a sample lives, for error messages: the image's own URL for image folders, ``<tar URL>:<key>``
    (the shard's URL for its shard-level row)."""
    if key.startswith("__shard__"):
        return str(shard["url"])
    if shard.get("kind") == "images" and shard.get("root"):
        return f"{str(shard['root']).rstrip('/')}/{key}"
    return f"{shard['url']}:{key}"


def _located(error: str, location: str) -> str:
    """``error`` naming ``location`` (appended in brackets unless the text names it already)."""
    return error if location in error or error.endswith("]") else f"{error} [{location}]"


def _set_error(row: dict[str, Any], message: str, kind: str) -> None:
    row.update(error=message, error_kind=kind, retryable=is_retryable(kind))


def _exception_text(stage: str, exc: BaseException, location: str) -> tuple[str, str]:
    """``(message, kind)`` of an exception for one sample in ``stage``."""
    kind, _ = classify(exc, stage=stage)
    label = {"postprocess": "post-processing", "stage": "staging"}.get(stage, stage)
    head = "out of memory" if kind == "out_of_memory" else f"{label} error"
    return f"{head}: {type(exc).__name__}: {exc} [{location}]", kind


def _free_memory() -> None:
    """Drop garbage and the CUDA caching allocator's free blocks between out-of-memory attempts."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - best effort
        pass


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
        copy_to: str | None = None,
        copy_storage_options: dict | None = None,
    ) -> None:
        self.copy_to = copy_to
        self.copy_storage_options = copy_storage_options or {}
        self.storage_options = storage_options
        self.short_side = short_side
        self.max_size = max_size
        self.max_pixels = max_pixels
        self.shard_index = shard_index
        self.overlays_per_shard = overlays_per_shard
        self.overlays_total = overlays_total
        self.rows_per_batch = rows_per_batch

    def _decode_resized(
        self, data: bytes, location: str, fault: str, key: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(original RGB, resized RGB)``; a ``MemoryError`` is retried once after freeing memory."""
        from odise_model.predictor import resize_image
        from pipeline.images import decode_image

        for attempt in range(2):
            try:
                inject("decode", fault, key)
                rgb = decode_image(data, max_pixels=self.max_pixels, source=location)
                return rgb, resize_image(rgb, self.short_side, self.max_size)
            except MemoryError:
                if attempt:
                    raise
                _free_memory()
        raise AssertionError("unreachable")  # pragma: no cover

    def _copy(self, shard: dict, sample, location: str) -> None:
        """Copy the sample's original bytes under ``<copy_to>/images/`` (atomic whole-file write); storage
        errors that may pass are retried after :data:`WRITE_DELAYS_S`, then raised."""
        from pipeline.annotate.coco import COPIED_IMAGES_DIR, copied_image_name
        from pipeline.storage import fs_root, write_bytes

        fs, root = fs_root(self.copy_to, self.copy_storage_options)
        rel = copied_image_name(shard.get("kind", ""), shard["shard_id"], sample.key, sample.image_ext)
        dest = posixpath.join(root, COPIED_IMAGES_DIR, rel)
        for attempt in range(len(WRITE_DELAYS_S) + 1):
            try:
                write_bytes(fs, dest, sample.image_bytes, durable=False)
                return
            except Exception as exc:
                if not (is_storage_error(exc) and classify(exc, stage="stage")[1]) or attempt == len(
                    WRITE_DELAYS_S
                ):
                    raise
                log.warning(
                    "copying %s to %s failed (%s: %s); retrying", location, dest, type(exc).__name__, exc
                )
            time.sleep(WRITE_DELAYS_S[attempt])

    def _decode(self, shard: dict, sample, position: int) -> dict[str, Any]:
        """Row of one sample; ``position`` = number of images of this shard decoded so far."""
        from pipeline.images import ImageDecodeError

        row = _empty_sample_row(shard, sample.key, error=None, ext=sample.image_ext)
        row["image_url"] = sample.image_url or ""
        location = sample.image_url or _sample_location(shard, sample.key)
        if sample.error:
            kind = sample.error_kind or classify(sample.error, stage="read")[0]
            _set_error(row, _located(sample.error, location), kind)
            return row
        if sample.image_bytes is None:
            _set_error(row, f"no image bytes [{location}]", "no_image_member")
            return row
        row["fault"] = fault = fault_of(sample.meta)
        try:
            rgb, resized = self._decode_resized(sample.image_bytes, location, fault, sample.key)
        except ImageDecodeError as exc:
            _set_error(row, str(exc), classify(exc, stage="decode")[0])
            return row
        except Exception as exc:  # noqa: BLE001 - MemoryError, decoder bugs: this image's row, not the job
            _set_error(row, *_exception_text("decode", exc, location))
            return row
        if self.copy_to:
            try:
                self._copy(shard, sample, location)
            except Exception as exc:  # noqa: BLE001 - this image's row: no labelled row without its copy
                kind = classify(exc, stage="stage")[0]
                _set_error(
                    row,
                    f"copying the image (--copy-images) failed: {type(exc).__name__}: {exc} [{location}]",
                    kind,
                )
                return row
        index = self.shard_index.get(shard["shard_id"], 0)
        overlay = (
            position < self.overlays_per_shard
            and index * self.overlays_per_shard + position < self.overlays_total
        )
        self._decoded += 1
        row.update(
            image=np.ascontiguousarray(resized).tobytes(),
            rh=int(resized.shape[0]),
            rw=int(resized.shape[1]),
            height=int(rgb.shape[0]),
            width=int(rgb.shape[1]),
            overlay=bool(overlay),
            overlay_name=overlay_file_name(sample.key, self._overlay_names) if overlay else "",
        )
        return row

    def __call__(self, batch: dict[str, Any]):
        from pipeline.shards import SHARD_ERROR_KEY, ShardRef, iter_samples

        for shard_json in batch["shard"]:
            shard = json.loads(shard_json)
            ref = ShardRef(
                url=shard["url"],
                shard_id=shard["shard_id"],
                kind=shard["kind"],
                members=tuple(shard.get("members", ())),
                root=shard.get("root", ""),
                access_urls=tuple(shard.get("access_urls", ())),  # signed URLs: opened, never recorded
            )
            rows: list[dict[str, Any]] = []
            total = 0
            shard_keys = 0  # rows with the shard-level key seen so far (keys stay unique)
            self._decoded = 0  # overlays go to the first images of a shard that decode
            self._overlay_names: set[str] = set()
            only = shard.get("only_keys")  # --retry-errors: read only these keys (None: every key)
            only = set(only) if only is not None else None
            try:
                for sample in iter_samples(ref, self.storage_options):
                    if only is not None and sample.key not in only:
                        continue
                    shard_keys += sample.key.startswith(SHARD_ERROR_KEY)
                    rows.append(self._decode(shard, sample, self._decoded))
                    total += 1
                    if len(rows) >= self.rows_per_batch:
                        yield _columns(rows)
                        rows = []
            except Exception as exc:  # noqa: BLE001 - the reader never raises by design; a bug ends the shard
                log.exception("%s: reading stopped after %d sample(s)", ref.url, total)
                key = SHARD_ERROR_KEY if not shard_keys else f"{SHARD_ERROR_KEY}#read{shard_keys + 1}"
                row = _empty_sample_row(shard, key, error=None, ext=None)
                message, kind = _exception_text("read", exc, ref.url)
                _set_error(row, f"{message}; samples after this point (if any) are missing", kind)
                rows.append(row)
                total += 1
            end = _empty_sample_row(shard, "", error=None, ext=None)
            end.update(kind="end", shard_total=total)
            rows.append(end)
            yield _columns(rows)


def _get(batch: dict[str, Any], name: str, i: int, default: Any) -> Any:
    """``batch[name][i]``, or ``default`` for batches made without the column (e.g. a benchmark's stand-in)."""
    column = batch.get(name)
    return default if column is None else column[i]


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r[k] for r in rows] for k in rows[0]}


class Annotator:
    """GPU stage: one model per actor, built once in ``__init__``; labels batches in ``__call__``.

    Args:
        model_kwargs: keyword arguments of :func:`odise_model.build_odise` (variant and weight sources).
        vocabulary_text: the vocabulary in canonical ``classes.txt`` form (parsed again here).
        predictor_kwargs: :class:`odise_model.Predictor` settings.
        overrides: threshold overrides (``object_mask_threshold``, ``overlap_threshold``) and fusion
            exponent overrides (``alpha``, ``beta``).
        device: ``"cuda"`` or ``"cpu"``.

    Failures are isolated per image (see the module doc): a failing batch is retried image by image, out of
    memory with post-processing in chunks of :data:`OOM_CHUNK_QUERIES` queries.
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
        post = {
            k: v
            for k, v in overrides.items()
            if k in ("object_mask_threshold", "overlap_threshold") and v is not None
        }
        fusion = {k: v for k, v in overrides.items() if k in ("alpha", "beta") and v is not None}
        cfg = cfg.replace(
            **({"postprocess": post} if post else {}), **({"classifier": fusion} if fusion else {})
        )
        self.model = odise_model.build_odise(cfg, device=device, **model_kwargs)
        vocab = odise_model.parse_vocabulary(vocabulary_text, source="run vocabulary")
        self.predictor = odise_model.Predictor(self.model, vocab, **predictor_kwargs)
        self.batch_size = self.predictor.batch_size
        self._names = {c.id: c.name for c in vocab}

    # --- one image's outcome ------------------------------------------------------------------------
    def _location(self, batch: dict[str, Any], i: int) -> str:
        return _get(batch, "image_url", i, "") or f"{batch['shard'][i]}:{batch['key'][i]}"

    def _fail(
        self, out: dict[str, Any], batch: dict[str, Any], i: int, stage: str, exc: BaseException
    ) -> None:
        message, kind = _exception_text(stage, exc, self._location(batch, i))
        log.warning("%s/%s: %s", batch["shard_id"][i], batch["key"][i], message)
        out["error"][i], out["error_kind"][i], out["retryable"][i] = message, kind, is_retryable(kind)

    def _store(self, out: dict[str, Any], i: int, raw) -> None:
        out["panoptic"][i] = raw.panoptic.astype(np.int32).tobytes()
        out["semantic"][i] = raw.semantic.astype(np.int32).tobytes() if raw.semantic is not None else b""
        out["segments"][i] = json.dumps([s.__dict__ for s in raw.segments])
        out["inst_meta"][i] = json.dumps(
            [
                {"category_id": int(c), "category_name": self._names[int(c)], "score": float(sc)}
                for c, sc in zip(raw.instance_category_ids, raw.instance_scores)
            ]
        )
        out["inst_masks"][i] = np.ascontiguousarray(raw.instance_masks_packed).tobytes()
        out["uncertainty"][i] = math.nan if raw.uncertainty is None else float(raw.uncertainty)
        out["branch_disagreement"][i] = (
            math.nan if raw.branch_disagreement is None else float(raw.branch_disagreement)
        )

    def _postprocess(self, out: dict, batch: dict, i: int, output, *, chunked_only: bool = False) -> None:
        """Post-process one image's model output into ``out``; out of memory -> in chunks; then an error row."""
        fault, key = _get(batch, "fault", i, ""), batch["key"][i]
        for chunk in (OOM_CHUNK_QUERIES,) if chunked_only else (None, OOM_CHUNK_QUERIES):
            oom = False
            try:
                inject("postprocess", fault, key)
                if chunk is None:
                    inject("postprocess_unchunked", fault, key)
                raw = self.predictor.postprocess_output(output, chunk_queries=chunk)
                self._store(out, i, raw)
                return
            except Exception as exc:  # noqa: BLE001 - this image's row, not the batch
                if chunk is not None or not is_out_of_memory(exc):
                    self._fail(out, batch, i, "postprocess", exc)
                    return
                oom = True
                log.warning(
                    "%s/%s: out of memory in post-processing; retrying in chunks", batch["shard_id"][i], key
                )
            if oom:
                _free_memory()

    def _label_alone(self, out: dict, batch: dict, i: int, prepared, *, after_oom: bool) -> None:
        """The image alone (batch 1); after an out-of-memory batch, post-processed in chunks."""
        output = None
        try:
            inject("model_single", _get(batch, "fault", i, ""), batch["key"][i])
            (output,) = self.predictor.infer_prepared([prepared])
        except Exception as exc:  # noqa: BLE001 - only the culprit gets the error
            self._fail(out, batch, i, "model", exc)
            oom = is_out_of_memory(exc)
        else:
            oom = False
        if oom:
            _free_memory()
        if output is not None:
            self._postprocess(out, batch, i, output, chunked_only=after_oom)

    def _label_batch(self, out: dict, batch: dict, idx: list[int], prepared: dict[int, Any]) -> None:
        outputs, oom = None, False
        try:
            for i in idx:
                inject("model", _get(batch, "fault", i, ""), batch["key"][i])
            outputs = self.predictor.infer_prepared([prepared[i] for i in idx])
        except Exception as exc:  # noqa: BLE001 - retried image by image below
            oom = is_out_of_memory(exc)
            log.warning(
                "batch of %d image(s) failed (%s: %s); retrying them one at a time",
                len(idx),
                type(exc).__name__,
                exc,
            )
        if outputs is None:  # outside the except block: the traceback (and its tensors) is gone
            _free_memory()
            for i in idx:
                self._label_alone(out, batch, i, prepared[i], after_oom=oom)
            return
        for i, output in zip(idx, outputs):
            self._postprocess(out, batch, i, output)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        n = len(batch["key"])
        out = {k: list(batch[k]) for k in batch}
        for col in ("panoptic", "semantic", "inst_masks"):
            out[col] = [b""] * n
        out["segments"] = [""] * n
        out["inst_meta"] = [""] * n
        out["uncertainty"] = [math.nan] * n
        out["branch_disagreement"] = [math.nan] * n
        for col, default in (("error_kind", ""), ("retryable", False), ("image_url", ""), ("fault", "")):
            out.setdefault(col, [default] * n)  # batches made without them (a benchmark's stand-in rows)
        todo = [i for i in range(n) if batch["kind"][i] == "sample" and not batch["error"][i]]
        prepared: dict[int, Any] = {}
        for i in todo:
            try:
                h, w = int(batch["rh"][i]), int(batch["rw"][i])
                image = np.frombuffer(batch["image"][i], dtype=np.uint8).reshape(h, w, 3)
                original = (int(batch["height"][i]), int(batch["width"][i]))
                prepared[i] = self.predictor.prepare_resized(image, original)
            except Exception as exc:  # noqa: BLE001
                self._fail(out, batch, i, "model", exc)
        ready = [i for i in todo if i in prepared]
        for start in range(0, len(ready), self.batch_size):
            self._label_batch(out, batch, ready[start : start + self.batch_size], prepared)
        for i in range(n):  # keep the image only where an overlay is wanted
            if not batch["overlay"][i] or out["error"][i]:
                out["image"][i] = b""
        return out


class EncodeAndStage:
    """CPU stage: encode results (RLE, PNG), render overlays, write staging Parquet; emit driver records."""

    def __init__(
        self, *, out_url: str, storage_options: dict, provenance_json: str, include_png: bool
    ) -> None:
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
        packed = (
            np.frombuffer(batch["inst_masks"][i], dtype=np.uint8).reshape(len(meta), -1) if meta else None
        )
        instances = []
        for j, inst in enumerate(meta):
            mask = np.unpackbits(packed[j], count=h * w).reshape(h, w).astype(bool)
            instances.append(
                Instance(inst["category_id"], inst["category_name"], inst["score"], mask, (0, 0, 0, 0))
            )
        return PanopticResult(
            panoptic_seg=panoptic, segments=segments, semantic_seg=semantic, instances=instances
        )

    def _write_overlay(self, batch: dict[str, Any], i: int, result) -> str:
        import io

        from PIL import Image

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
        name = _get(batch, "overlay_name", i, "") or overlay_file_name(batch["key"][i], set())
        rel = posixpath.join("overlays", batch["shard_id"][i], name)
        write_bytes(fs, posixpath.join(root, rel), buf.getvalue(), durable=False)
        return rel

    @staticmethod
    def _nullable(value: Any) -> float | None:
        return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    def _write(self, rows: list[dict[str, Any]], provenance, faults: dict) -> list[dict[str, Any]]:
        """:func:`write_staging` with retries (backoff) on retryable storage errors; other errors raise."""
        from pipeline.annotate.commit import write_staging

        for attempt in range(len(WRITE_DELAYS_S) + 1):
            try:
                for row in rows:
                    inject("stage_write", faults.get((row["shard_id"], row["key"]), ""), row["key"])
                return write_staging(rows, self.out_url, self.storage_options, provenance)
            except Exception as exc:
                kind, retryable = classify(exc, stage="stage")
                if not (is_storage_error(exc) and retryable) or attempt == len(WRITE_DELAYS_S):
                    raise
                delay = WRITE_DELAYS_S[attempt]
                log.warning(
                    "staging write failed (%s: %s: %s); retrying in %.1f s",
                    kind,
                    type(exc).__name__,
                    exc,
                    delay,
                )
            time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _stage(self, rows: list[dict[str, Any]], provenance, faults: dict, locations: dict):
        """Write the rows; a row that cannot be converted becomes its error row (found row by row)."""
        from pipeline.schema import error_row, rows_to_table

        try:
            for row in rows:
                inject("stage", faults.get((row["shard_id"], row["key"]), ""), row["key"])
            return self._write(rows, provenance, faults)
        except Exception as exc:
            if is_storage_error(exc) or is_out_of_memory(exc):
                raise  # the task fails and Ray retries it (write-once staging files: nothing duplicated)
            log.warning(
                "staging %d row(s) failed (%s: %s); checking them one by one",
                len(rows),
                type(exc).__name__,
                exc,
            )
        checked = []
        for row in rows:
            try:
                inject("stage", faults.get((row["shard_id"], row["key"]), ""), row["key"])
                rows_to_table([row], provenance)
                checked.append(row)
            except Exception as exc:  # noqa: BLE001 - this row's problem
                message, kind = _exception_text(
                    "stage", exc, locations.get((row["shard_id"], row["key"]), row["key"])
                )
                keep = {
                    k: row.get(k) for k in ("run_id", "shard", "shard_id", "key", "image_ext", "image_url")
                }
                checked.append(
                    error_row(**keep, error=message, error_kind=kind, retryable=is_retryable(kind))
                )
        return self._write(checked, provenance, faults)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from pipeline.encode import encode_result
        from pipeline.schema import RunProvenance, error_row, label_row

        provenance = RunProvenance.from_json(self.provenance_json)
        rows, records = [], []
        overlays: dict[str, list[str]] = {}
        faults: dict[tuple[str, str], str] = {}  # (shard_id, key) -> injected fault ("" normally)
        locations: dict[tuple[str, str], str] = {}
        for i in range(len(batch["key"])):
            common = {
                "run_id": provenance.run_id,
                "shard": batch["shard"][i],
                "shard_id": batch["shard_id"][i],
            }
            if batch["kind"][i] == "end":
                records.append(
                    {
                        "type": "end",
                        "shard_id": batch["shard_id"][i],
                        "shard": batch["shard"][i],
                        "count": int(batch["shard_total"][i]),
                        "keys": [],
                        "overlays": [],
                    }
                )
                continue
            key = batch["key"][i]
            ext = batch["image_ext"][i] or None
            url = _get(batch, "image_url", i, "") or None
            faults[(batch["shard_id"][i], key)] = _get(batch, "fault", i, "")
            location = locations[(batch["shard_id"][i], key)] = url or f"{batch['shard'][i]}:{key}"
            size = {"width": int(batch["width"][i]) or None, "height": int(batch["height"][i]) or None}
            if batch["error"][i]:
                kind = _get(batch, "error_kind", i, "") or classify(batch["error"][i])[0]
                rows.append(
                    error_row(
                        **common,
                        key=key,
                        error=batch["error"][i],
                        error_kind=kind,
                        retryable=is_retryable(kind),
                        image_ext=ext,
                        image_url=url,
                        **size,
                    )
                )
                continue
            try:
                inject("encode", _get(batch, "fault", i, ""), key)
                result = self._result(batch, i)
                encoded = encode_result(result, include_png=self.include_png)
                rows.append(
                    label_row(
                        **common,
                        key=key,
                        encoded=encoded,
                        image_ext=ext,
                        image_url=url,
                        uncertainty=self._nullable(_get(batch, "uncertainty", i, math.nan)),
                        branch_disagreement=self._nullable(_get(batch, "branch_disagreement", i, math.nan)),
                    )
                )
            except Exception as exc:  # noqa: BLE001 - this image's row, not the batch
                message, kind = _exception_text("encode", exc, location)
                log.warning("%s/%s: %s", batch["shard_id"][i], key, message)
                rows.append(
                    error_row(
                        **common,
                        key=key,
                        error=message,
                        error_kind=kind,
                        retryable=is_retryable(kind),
                        image_ext=ext,
                        image_url=url,
                        **size,
                    )
                )
                continue
            if batch["overlay"][i] and batch["image"][i]:
                try:
                    rel = self._write_overlay(batch, i, result)
                    overlays.setdefault(batch["shard_id"][i], []).append(rel)
                except Exception as exc:  # an overlay is a convenience; never fail a shard for it
                    log.warning("overlay for %s/%s failed: %s", batch["shard_id"][i], key, exc)
        if rows:
            for rec in self._stage(rows, provenance, faults, locations):
                records.append(
                    {
                        "type": "staged",
                        "shard_id": rec["shard_id"],
                        "shard": "",
                        "count": rec["n_rows"],
                        "keys": rec["keys"],
                        "overlays": overlays.pop(rec["shard_id"], []),
                    }
                )
        if not records:
            records.append(
                {"type": "none", "shard_id": "", "shard": "", "count": 0, "keys": [], "overlays": []}
            )
        return _columns(records)
