"""Images + vocabulary -> typed panoptic / semantic / instance results.

The convenience layer on top of :class:`odise_model.model.ODISE` (as ``SamPredictor`` over ``Sam``):
it converts any image to RGB uint8, resizes it like the official test path (detectron2
``ResizeShortestEdge(1024, max_size=2560)``: PIL bilinear), pads to a multiple of 64, batches images (and all
their SD tiles), runs the model, post-processes each image at its original size and maps class indices to the
vocabulary's stable category ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .model import ODISE
from .postprocess import (
    instance_inference,
    mask_boxes,
    pack_masks,
    panoptic_inference,
    resize_mask_logits,
    semantic_argmax,
)
from .types import Instance, PanopticResult, Segment
from .vocabulary import Vocabulary, load_vocabulary

__all__ = ["Predictor", "RawPrediction", "to_rgb_array", "resize_image", "resized_size"]

logger = logging.getLogger(__name__)


def to_rgb_array(image: Any) -> np.ndarray:
    """Any numpy array or PIL image -> ``HxWx3`` uint8 RGB.

    numpy: ``HxW`` (gray), ``HxWx1``, ``HxWx3`` or ``HxWx4`` (alpha dropped); uint8, or float in [0, 1],
    or 16-bit integers (scaled). PIL: any mode, converted with ``Image.convert("RGB")``.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected a numpy array or PIL image, got {type(image).__name__}")
    arr = image
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 image, got shape {image.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"empty image of shape {image.shape}")
    if arr.dtype == np.uint8:
        pass
    elif arr.dtype in (np.uint16, np.int32, np.int64) and arr.max(initial=0) > 255:
        arr = (arr.astype(np.float64) / 65535.0 * 255.0 + 0.5).clip(0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        arr = (arr.astype(np.float64).clip(0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    else:
        arr = arr.clip(0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        arr = arr[:, :, :3]
    return np.ascontiguousarray(arr)


def resize_image(rgb: np.ndarray, short_side: int, max_size: int) -> np.ndarray:
    """``HxWx3`` uint8 -> resized as the official test path (PIL bilinear to :func:`resized_size`)."""
    from PIL import Image

    height, width = rgb.shape[:2]
    new_h, new_w = resized_size(height, width, short_side, max_size)
    if (new_h, new_w) == (height, width):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((new_w, new_h), Image.BILINEAR))


def resized_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Output ``(h, w)`` of detectron2 ``ResizeShortestEdge`` (short side -> ``short_side``, long side capped)."""
    scale = short_side * 1.0 / min(height, width)
    if height < width:
        new_h, new_w = short_side, scale * width
    else:
        new_h, new_w = scale * height, short_side
    if max(new_h, new_w) > max_size:
        scale = max_size * 1.0 / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    # at least 1 pixel: extreme aspect ratios (e.g. 3 x 5000) would otherwise round a side to 0
    return max(1, int(new_h + 0.5)), max(1, int(new_w + 0.5))


class Predictor:
    """Batched ODISE inference with a fixed (changeable) vocabulary.

    Args:
        model: a built :class:`ODISE`.
        vocabulary: a :class:`Vocabulary`, a built-in name, a ``classes.txt`` path, or a list of class names.
        batch_size: images per model call (their SD tiles are pooled).
        tile_batch_size: SD tiles per forward pass.
        use_clip: fuse with the MaskCLIP branch (official: yes).
        full_decode / sequential_tiles: reproduce the official execution (slower, same outputs).
    """

    def __init__(
        self,
        model: ODISE,
        vocabulary: Vocabulary | str | Sequence[str] = "coco_panoptic",
        *,
        batch_size: int = 4,
        tile_batch_size: int = 8,
        use_clip: bool = True,
        full_decode: bool = False,
        sequential_tiles: bool = False,
    ) -> None:
        self.model = model.eval()
        self.batch_size = max(1, int(batch_size))
        self.tile_batch_size = max(1, int(tile_batch_size))
        self.use_clip = use_clip
        self.full_decode = full_decode
        self.sequential_tiles = sequential_tiles
        self.set_vocabulary(vocabulary)

    def set_vocabulary(self, vocabulary: Vocabulary | str | Sequence[str]) -> None:
        """Switch vocabulary; its text embeddings are computed once and cached in the model."""
        self.vocabulary = load_vocabulary(vocabulary)
        self._isthing = torch.tensor([c.isthing for c in self.vocabulary], dtype=torch.bool)

    @property
    def device(self) -> torch.device:
        return self.model.device

    # --- preprocessing -------------------------------------------------------------------------------
    def prepare(self, image: Any) -> tuple[torch.Tensor, tuple[int, int], tuple[int, int]]:
        """Image -> (padded ``3xHpxWp`` float tensor in [0, 1] on CPU, resized ``(h, w)``, original ``(H, W)``)."""
        rgb = to_rgb_array(image)
        cfg = self.model.config.input
        return self.prepare_resized(resize_image(rgb, cfg.short_side, cfg.max_size), rgb.shape[:2])

    def prepare_resized(self, resized: np.ndarray, original_size: tuple[int, int]):
        """Like :meth:`prepare` for an image already resized by :func:`resize_image` (e.g. in a CPU task)."""
        new_h, new_w = resized.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(resized.transpose(2, 0, 1))).float() / 255.0
        div = self.model.config.input.size_divisibility
        pad_h, pad_w = (-new_h) % div, (-new_w) % div
        if pad_h or pad_w:
            tensor = F.pad(tensor, (0, pad_w, 0, pad_h), value=0.0)
        return tensor, (new_h, new_w), (int(original_size[0]), int(original_size[1]))

    # --- main entry --------------------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, images: Sequence[Any] | Any) -> list[PanopticResult]:
        """Label images.

        Args:
            images: a list of ``HxWx3`` uint8 numpy arrays or PIL images (any size, any mode), or one image.
        Returns:
            one :class:`PanopticResult` per image, at the image's own size.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        results: list[PanopticResult] = []
        for start in range(0, len(images), self.batch_size):
            results.extend(self.predict_prepared([self.prepare(im) for im in images[start : start + self.batch_size]]))
        return results

    def predict_prepared(self, prepared: Sequence[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]) -> list[PanopticResult]:
        """One model call on outputs of :meth:`prepare` / :meth:`prepare_resized` (all in one batch)."""
        return [raw.to_result() for raw in self.predict_prepared_raw(prepared)]

    def postprocess(
        self,
        mask_cls: torch.Tensor,
        mask_logits: torch.Tensor,
        padded_size: tuple[int, int],
        image_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> PanopticResult:
        """Model outputs of one image (``Qx(K+1)`` log-probs, ``Qxh/4xw/4`` logits) -> typed result."""
        return self.postprocess_raw(mask_cls, mask_logits, padded_size, image_size, output_size).to_result()

    def postprocess_raw(
        self,
        mask_cls: torch.Tensor,
        mask_logits: torch.Tensor,
        padded_size: tuple[int, int],
        image_size: tuple[int, int],
        output_size: tuple[int, int],
    ) -> RawPrediction:
        """Post-processing on the model's device; returns compact CPU arrays (instance masks bit-packed)."""
        cfg = self.model.config.postprocess
        masks = resize_mask_logits(mask_logits, padded_size, image_size, output_size)
        isthing = self._isthing.to(masks.device)
        categories = self.vocabulary.categories
        cat_ids = torch.tensor([c.id for c in categories], dtype=torch.int32, device=masks.device)

        panoptic = np.zeros(output_size, dtype=np.int32)
        segments: list[Segment] = []
        if cfg.panoptic_on:
            pan, segs = panoptic_inference(
                mask_cls,
                masks,
                isthing,
                object_mask_threshold=cfg.object_mask_threshold,
                overlap_threshold=cfg.overlap_threshold,
            )
            if segs:
                seg_masks = pan[None] == torch.tensor([s.id for s in segs], device=pan.device).view(-1, 1, 1)
                areas = seg_masks.flatten(1).sum(1).tolist()
                boxes = mask_boxes(seg_masks).tolist()
                for seg, area, box in zip(segs, areas, boxes):
                    cat = categories[seg.class_index]
                    segments.append(Segment(seg.id, cat.id, cat.name, seg.isthing, seg.score, int(area), tuple(box)))
            panoptic = pan.cpu().numpy().astype(np.int32)
        semantic = None
        if cfg.semantic_on:
            semantic = cat_ids[semantic_argmax(mask_cls, masks)].cpu().numpy()
        raw = RawPrediction(panoptic=panoptic, segments=segments, semantic=semantic, vocabulary=self.vocabulary)
        if cfg.instance_on:
            classes, scores, queries = instance_inference(
                mask_cls, masks, isthing, topk=cfg.topk_per_image, things_only=cfg.panoptic_on
            )
            unique, inverse = torch.unique(queries, return_inverse=True)
            binary = masks[unique] > 0  # one binary mask per distinct query, shared by its instances
            raw.instance_category_ids = cat_ids[classes].cpu().numpy().astype(np.int64)
            raw.instance_scores = scores.cpu().numpy().astype(np.float32)
            raw.instance_boxes = mask_boxes(binary)[inverse].cpu().numpy().astype(np.int64)
            raw.instance_masks_packed = pack_masks(binary)[inverse].cpu().numpy()
        return raw

    @torch.no_grad()
    def predict_prepared_raw(self, prepared) -> list[RawPrediction]:
        """Like :meth:`predict_prepared` but returns :class:`RawPrediction` (no per-instance mask unpacking)."""
        out: list[RawPrediction] = []
        if not prepared:
            return out
        vocab_emb = self.model.vocabulary_embedding(self.vocabulary)
        outputs = self.model.infer(
            [p[0].to(self.device) for p in prepared],
            [p[1] for p in prepared],
            vocab_emb,
            tile_batch_size=self.tile_batch_size,
            full_decode=self.full_decode,
            sequential_tiles=self.sequential_tiles,
            use_clip=self.use_clip,
        )
        for (tensor, resized, original), (mask_cls, mask_logits) in zip(prepared, outputs):
            padded = (int(tensor.shape[-2]), int(tensor.shape[-1]))
            out.append(self.postprocess_raw(mask_cls, mask_logits, padded, resized, original))
        return out


@dataclass
class RawPrediction:
    """Compact result of one image, cheap to move between processes.

    ``panoptic`` / ``semantic``: ``HxW`` int32 (segment ids / category ids); ``segments``: typed segments;
    instances as arrays: category ids ``N``, scores ``N``, boxes ``Nx4`` (x, y, w, h) and masks bit-packed
    ``N x ceil(H*W/8)`` uint8 (``numpy.packbits`` order over the flattened ``HxW`` mask).
    """

    panoptic: np.ndarray
    segments: list[Segment]
    semantic: np.ndarray | None
    vocabulary: Vocabulary
    instance_category_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    instance_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    instance_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    instance_masks_packed: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))

    def instance_mask(self, i: int) -> np.ndarray:
        h, w = self.panoptic.shape
        return np.unpackbits(self.instance_masks_packed[i], count=h * w).reshape(h, w).astype(bool)

    def to_result(self) -> PanopticResult:
        names = {c.id: c.name for c in self.vocabulary}
        instances = [
            Instance(int(cid), names[int(cid)], float(score), self.instance_mask(i), tuple(int(v) for v in box))
            for i, (cid, score, box) in enumerate(zip(self.instance_category_ids, self.instance_scores, self.instance_boxes))
        ]
        return PanopticResult(panoptic_seg=self.panoptic, segments=self.segments, semantic_seg=self.semantic, instances=instances)
