"""Model results -> output bytes: COCO panoptic PNGs, COCO RLE masks, segment records, overlays.

Everything here is a pure function of its arguments (no I/O, no global state) so it can run in any
Ray CPU task. ``pycocotools`` is imported where used.

Encodings:

* Panoptic PNG (COCO panoptic format): RGB, segment ``id = R + 256 * G + 256**2 * B``; 0 = unlabeled.
* RLE (COCO compressed RLE, column-major as pycocotools expects): ``{"size": [h, w], "counts": str}``;
  ``counts`` is the ASCII string pycocotools produces, decoded to ``str`` for JSON / Parquet.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

if TYPE_CHECKING:  # only attributes are used: no import of the model package at run time
    from odise_model import PanopticResult

__all__ = [
    "category_colour",
    "coco_instance_annotation",
    "coco_segment_info",
    "encode_result",
    "mask_to_rle",
    "panoptic_to_png",
    "png_to_panoptic",
    "render_overlay",
    "rle_area",
    "rle_bbox",
    "rle_to_mask",
    "segments_to_panoptic",
]

log = logging.getLogger(__name__)

_MAX_SEGMENT_ID = 256**3 - 1


# --------------------------------------------------------------------------------------------------
# Panoptic PNG
# --------------------------------------------------------------------------------------------------


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """``HxWx3`` uint8 RGB -> ``HxW`` int32 ids ``R + 256*G + 256**2*B`` (panopticapi's ``rgb2id``)."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb2id expects an HxWx3 array, got shape {rgb.shape}")
    rgb = rgb.astype(np.int32)
    return rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]


def id2rgb(id_map: np.ndarray) -> np.ndarray:
    """``HxW`` integer ids in ``[0, 256**3)`` -> ``HxWx3`` uint8 RGB (inverse of :func:`rgb2id`)."""
    ids = np.asarray(id_map)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"panoptic ids must be an HxW integer array, got {ids.dtype} {ids.shape}")
    if ids.size and (int(ids.min()) < 0 or int(ids.max()) > _MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must be in [0, {_MAX_SEGMENT_ID}], got [{ids.min()}, {ids.max()}]")
    # little-endian uint32 bytes are (R, G, B, 0): one conversion and one copy instead of three masks + a stack
    quad = np.ascontiguousarray(ids, dtype="<u4").view(np.uint8).reshape(*ids.shape, 4)
    return np.ascontiguousarray(quad[..., :3])


def panoptic_to_png(panoptic_seg: np.ndarray) -> bytes:
    """Encode segment ids as a COCO panoptic PNG (lossless).

    Args:
        panoptic_seg: ``HxW`` integer array of segment ids in [0, 256**3 - 1]; 0 = unlabeled.

    Returns:
        PNG bytes of an ``HxWx3`` RGB image with ``id = R + 256 * G + 256**2 * B``.
    """
    buf = io.BytesIO()
    Image.fromarray(id2rgb(panoptic_seg), "RGB").save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def png_to_panoptic(data: bytes, *, where: str = "panoptic PNG") -> np.ndarray:
    """Decode a COCO panoptic PNG (8-bit RGB) to an ``HxW`` int32 id map; errors name ``where``."""
    from PIL import UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            if im.mode != "RGB":
                raise ValueError(f"{where}: panoptic PNG must be RGB, got mode {im.mode!r}")
            return rgb2id(np.asarray(im))
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:  # truncated / not a PNG
        raise ValueError(f"{where}: unreadable panoptic PNG ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------------
# RLE
# --------------------------------------------------------------------------------------------------


def semantic_to_png(semantic: np.ndarray) -> bytes:
    """``HxW`` category ids (0..65535) -> 16-bit grayscale PNG bytes."""
    arr = np.asarray(semantic)
    if arr.ndim != 2 or (arr.size and (arr.min() < 0 or arr.max() > 65535)):
        raise ValueError(f"semantic map must be HxW with ids in [0, 65535], got shape {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def png_to_semantic(data: bytes) -> np.ndarray:
    """Inverse of :func:`semantic_to_png`: ``HxW`` int32 category ids."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im).astype(np.int32)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """COCO compressed RLE of an ``HxW`` boolean mask: ``{"size": [h, w], "counts": str}``.

    The same string as ``pycocotools.mask.encode(np.asfortranarray(mask))``, computed from the mask's bounding
    box only: the runs of the (transposed) crop are found with numpy and compressed by pycocotools
    (``frPyObjects``), so a small object in a large image costs little (no full-image Fortran copy).
    """
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be HxW, got shape {m.shape}")
    h, w = m.shape
    starts, ends = _mask_runs(m.astype(bool, copy=False))
    return {"size": [int(h), int(w)], "counts": _compress(starts, ends, h, w)}


def _mask_runs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Runs of foreground of an ``HxW`` bool mask in column-major (COCO) pixel order: ``[starts, ends)``
    (int64, sorted, never adjacent), found inside the mask's bounding box."""
    h, w = mask.shape
    cols = np.flatnonzero(mask.any(axis=0))
    if cols.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    band = mask[:, x0:x1]
    rows = np.flatnonzero(band.any(axis=1))
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    hc = y1 - y0
    padded = np.zeros((x1 - x0, hc + 2), np.int8)  # each crop column, transposed, with a 0 above and below
    padded[:, 1:-1] = band[y0:y1].T
    step = np.diff(padded.ravel())
    up, down = np.flatnonzero(step == 1) + 1, np.flatnonzero(step == -1) + 1
    col_s, row_s = np.divmod(up, hc + 2)
    col_e, row_e = np.divmod(down, hc + 2)
    starts = (x0 + col_s) * h + y0 + row_s - 1
    ends = (x0 + col_e) * h + y0 + row_e - 1
    if hc == h and starts.size > 1:  # a run reaching the bottom continues at the top of the next column
        joined = starts[1:] == ends[:-1]
        if joined.any():
            starts = starts[np.concatenate(([True], ~joined))]
            ends = ends[np.concatenate((~joined, [True]))]
    return starts, ends


def _compress(starts: np.ndarray, ends: np.ndarray, h: int, w: int) -> str:
    """COCO compressed RLE string of the runs ``[starts, ends)`` (pycocotools' ``rleEncode`` counts: zeros,
    ones, zeros, ..., the last run included, then ``rleToString``)."""
    from pycocotools import mask as mask_utils

    total = h * w
    if starts.size == 0:
        counts = np.array([total], np.uint32)
    else:
        edges = np.empty(2 * starts.size, np.int64)
        edges[0::2], edges[1::2] = starts, ends
        counts = np.diff(edges, prepend=0)
        if edges[-1] < total:
            counts = np.append(counts, total - edges[-1])
        counts = counts.astype(np.uint32)
    rle = mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)
    return rle["counts"].decode("ascii")


def _label_map_runs(seg_map: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """``{id: (starts, ends)}``: the column-major runs of every id of an ``HxW`` integer map, in one pass."""
    flat = np.ascontiguousarray(seg_map.T).ravel()
    if flat.size == 0:
        return {}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [flat.size]))
    values = flat[starts]
    order = np.argsort(values, kind="stable")
    values, starts, ends = values[order], starts[order], ends[order]
    ids, first = np.unique(values, return_index=True)
    bounds = np.append(first, values.size)
    return {
        int(v): (starts[bounds[i] : bounds[i + 1]], ends[bounds[i] : bounds[i + 1]])
        for i, v in enumerate(ids)
    }


def _coco_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {
        "size": [int(s) for s in rle["size"]],
        "counts": counts.encode("ascii") if isinstance(counts, str) else counts,
    }


def rle_to_mask(rle: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`mask_to_rle`: ``HxW`` bool array."""
    from pycocotools import mask as mask_utils

    return mask_utils.decode(_coco_rle(rle)).astype(bool)


def rle_area(rle: dict[str, Any]) -> int:
    """Number of foreground pixels of an RLE (no decoding)."""
    from pycocotools import mask as mask_utils

    return int(mask_utils.area(_coco_rle(rle)))


def rle_bbox(rle: dict[str, Any]) -> list[float]:
    """Tight COCO box ``[x, y, w, h]`` (floats, pixels) of an RLE; zeros when empty."""
    from pycocotools import mask as mask_utils

    return [float(v) for v in mask_utils.toBbox(_coco_rle(rle))]


def segments_to_panoptic(segments: list[dict[str, Any]], height: int, width: int) -> np.ndarray:
    """Rebuild an ``HxW`` int32 segment-id map from segment records (``id`` + ``rle``).

    Used when the PNG was not kept: segments of one image never overlap, so painting them in any
    order gives the original map.
    """
    out = np.zeros((height, width), np.int32)
    for seg in segments:
        out[rle_to_mask(seg["rle"])] = int(seg["id"])
    return out


# --------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------


def encode_result(result: PanopticResult, *, include_png: bool) -> dict[str, Any]:
    """Turn a :class:`PanopticResult` into the plain records stored in the output schema.

    Areas and boxes are recomputed from the masks (so the RLE, the PNG and the numbers agree exactly).
    Segments whose id does not occur in ``panoptic_seg`` are dropped, and pixels whose id has no
    segment are set to 0 (unlabeled); both are logged, since they mean the model's result was
    inconsistent.

    Args:
        result: the model's result for one image (``panoptic_seg`` is ``HxW`` int).
        include_png: also return the COCO panoptic PNG bytes.

    Returns:
        ``{"width": int, "height": int, "segments": [...], "instances": [...], "panoptic_png": bytes|None}``
        where a segment is ``{"id", "category_id", "category_name", "isthing", "score", "area",
        "bbox": [x, y, w, h], "rle": {"size": [h, w], "counts": str}}`` (ordered by id) and an
        instance is ``{"category_id", "category_name", "score", "bbox", "rle"}`` (result order).
    """
    seg_map = np.asarray(result.panoptic_seg)
    if seg_map.ndim != 2:
        raise ValueError(f"panoptic_seg must be HxW, got {seg_map.shape}")
    height, width = seg_map.shape
    by_id = {}
    for seg in result.segments:
        if int(seg.id) in by_id:
            raise ValueError(f"duplicate segment id {seg.id} in result")
        if int(seg.id) <= 0:
            raise ValueError(f"segment ids must be >= 1, got {seg.id}")
        by_id[int(seg.id)] = seg

    runs = _label_map_runs(seg_map)  # every segment's RLE from one column-major pass over the map
    present = set(runs) - {0}
    unknown = sorted(present - set(by_id))
    if unknown:
        log.warning("panoptic_seg has ids without a segment %s; set to unlabeled", unknown[:10])
        seg_map = np.where(np.isin(seg_map, unknown), 0, seg_map)
    missing = sorted(set(by_id) - present)
    if missing:
        log.warning("segments %s have no pixels in panoptic_seg; dropped", missing[:10])

    segments = []
    for seg_id in sorted(present - set(unknown)):
        seg = by_id[seg_id]
        rle = {"size": [int(height), int(width)], "counts": _compress(*runs[seg_id], height, width)}
        segments.append(
            {
                "id": seg_id,
                "category_id": int(seg.category_id),
                "category_name": str(seg.category_name),
                "isthing": bool(seg.isthing),
                "score": float(seg.score),
                "area": rle_area(rle),
                "bbox": rle_bbox(rle),
                "rle": rle,
            }
        )

    instances = []
    for inst in result.instances:
        mask = np.asarray(inst.mask)
        if mask.shape != (height, width):
            raise ValueError(f"instance mask shape {mask.shape} != panoptic_seg shape {(height, width)}")
        rle = mask_to_rle(mask)
        instances.append(
            {
                "category_id": int(inst.category_id),
                "category_name": str(inst.category_name),
                "score": float(inst.score),
                "bbox": rle_bbox(rle),
                "rle": rle,
            }
        )

    return {
        "width": int(width),
        "height": int(height),
        "segments": segments,
        "instances": instances,
        "panoptic_png": panoptic_to_png(seg_map) if include_png else None,
        "semantic_png": (
            semantic_to_png(result.semantic_seg) if include_png and result.semantic_seg is not None else None
        ),
    }


def coco_segment_info(segment: Mapping[str, Any]) -> dict[str, Any]:
    """The COCO panoptic ``segments_info`` entry of an output segment (a record of :func:`encode_result`).

    Returns:
        ``{"id": int, "category_id": int, "area": int (pixels), "bbox": [x, y, w, h] floats, "iscrowd": 0}``.
    """
    return {
        "id": int(segment["id"]),
        "category_id": int(segment["category_id"]),
        "area": int(segment["area"]),
        "bbox": [float(v) for v in segment["bbox"]],
        "iscrowd": 0,
    }


def coco_instance_annotation(instance: Mapping[str, Any], *, ann_id: int, image_id: int) -> dict[str, Any]:
    """The COCO instances annotation of an output instance (a record of :func:`encode_result`).

    Args:
        instance: ``{"category_id", "score", "bbox", "rle": {"size", "counts"}, ...}``.
        ann_id, image_id: the annotation's and its image's ids in the COCO file.

    Returns:
        ``{"id", "image_id", "category_id", "segmentation": {"size": [h, w], "counts": str} (compressed RLE),
        "area": float (pixels of the RLE), "bbox": [x, y, w, h] floats, "iscrowd": 0, "score": float}``.
    """
    rle = {"size": [int(v) for v in instance["rle"]["size"]], "counts": instance["rle"]["counts"]}
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": int(instance["category_id"]),
        "segmentation": rle,
        "area": float(rle_area(rle)),
        "bbox": [float(v) for v in instance["bbox"]],
        "iscrowd": 0,
        "score": float(instance["score"]),
    }


# --------------------------------------------------------------------------------------------------
# Colours and overlay
# --------------------------------------------------------------------------------------------------


def category_colour(category_id: int) -> tuple[int, int, int]:
    """Deterministic, saturated RGB colour (0..255 each) for a category id; the same in every process."""
    digest = hashlib.sha1(f"category:{int(category_id)}".encode()).digest()
    hue = digest[0] / 256.0 + digest[1] / 65536.0
    sat = 0.55 + 0.4 * digest[2] / 255.0
    val = 0.65 + 0.35 * digest[3] / 255.0
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return (round(r * 255), round(g * 255), round(b * 255))


def _segment_colour(category_id: int, segment_id: int, isthing: bool) -> tuple[int, int, int]:
    base = np.array(category_colour(category_id), np.int32)
    if isthing:  # per-instance jitter so touching instances of one class stay distinguishable
        digest = hashlib.sha1(f"segment:{int(segment_id)}".encode()).digest()
        base = base + (np.frombuffer(digest[:3], np.uint8).astype(np.int32) % 61 - 30)
    r, g, b = np.clip(base, 0, 255).tolist()
    return (r, g, b)


def _label_point(mask: np.ndarray) -> tuple[int, int]:
    """``(x, y)`` of the pixel deepest inside ``mask`` (a centroid that always lies on the segment)."""
    from scipy import ndimage

    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return int(x), int(y)


def render_overlay(image: np.ndarray, result: PanopticResult, *, alpha: float = 0.5) -> Image.Image:
    """Draw the panoptic result over the photo for a quick visual check.

    Args:
        image: ``HxWx3`` (or ``HxW`` grey) uint8 photo, same size as ``result.panoptic_seg``.
        result: the model's result.
        alpha: opacity of the colour fill in [0, 1].

    Returns:
        RGB ``PIL.Image`` of size ``(W, H)``: colour per category (things jittered per instance),
        white segment boundaries, and a ``"<name> <score>"`` label at each segment's deepest point,
        in Pillow's built-in default font.
    """
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    seg_map = np.asarray(result.panoptic_seg)
    if img.shape[:2] != seg_map.shape or img.shape[2] != 3:
        raise ValueError(f"image {img.shape} does not match panoptic_seg {seg_map.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")

    # 1. colour fill.
    colours = np.zeros(img.shape, np.float32)
    labelled = seg_map > 0
    for seg in result.segments:
        colours[seg_map == seg.id] = _segment_colour(seg.category_id, seg.id, seg.isthing)
    out = img.astype(np.float32)
    out[labelled] = (1.0 - alpha) * out[labelled] + alpha * colours[labelled]

    # 2. boundaries: pixels whose right or lower neighbour belongs to another segment.
    edge = np.zeros(seg_map.shape, bool)
    edge[:, :-1] |= seg_map[:, :-1] != seg_map[:, 1:]
    edge[:-1, :] |= seg_map[:-1, :] != seg_map[1:, :]
    out[edge] = 255.0
    pil = Image.fromarray(np.clip(np.round(out), 0, 255).astype(np.uint8), "RGB")

    # 3. labels.
    draw = ImageDraw.Draw(pil)
    font = ImageFont.load_default()
    for seg in result.segments:
        mask = seg_map == seg.id
        if not mask.any():
            continue
        x, y = _label_point(mask)
        text = f"{seg.category_name} {seg.score:.2f}"
        # no anchors: the bitmap fallback font (Pillow without FreeType) does not support them.
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tx, ty = x - (right - left) // 2 - left, y - (bottom - top) // 2 - top
        tx = min(max(tx, 2 - left), pil.width - 3 - right)  # keep the label inside the image
        ty = min(max(ty, 1 - top), pil.height - 2 - bottom)
        draw.rectangle((tx + left - 2, ty + top - 1, tx + right + 2, ty + bottom + 1), fill=(0, 0, 0))
        draw.text((tx, ty), text, fill=(255, 255, 255), font=font)
    return pil
