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
    instance_inference_chunked,
    instance_masks_chunked,
    mask_boxes,
    pack_masks,
    panoptic_inference,
    panoptic_inference_chunked,
    resize_mask_logits,
    semantic_argmax,
    semantic_argmax_chunked,
)
from .types import Instance, PanopticResult, Segment
from .vocabulary import Vocabulary, load_vocabulary

__all__ = ["ModelOutput", "Predictor", "RawPrediction", "to_rgb_array", "resize_image", "resized_size"]

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
            results.extend(
                self.predict_prepared([self.prepare(im) for im in images[start : start + self.batch_size]])
            )
        return results

    def predict_prepared(
        self, prepared: Sequence[tuple[torch.Tensor, tuple[int, int], tuple[int, int]]]
    ) -> list[PanopticResult]:
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
        *,
        chunk_queries: int | None = None,
        branches: dict | None = None,
    ) -> RawPrediction:
        """Post-processing on the model's device; returns compact CPU arrays (instance masks bit-packed).

        Args:
            mask_cls, mask_logits, padded_size, image_size, output_size: as :meth:`postprocess`.
            chunk_queries: None (default) resizes all ``Q`` masks to the output size at once; an int holds at
                most that many full-size masks at a time (the out-of-memory fallback for very large images;
                same outputs, at the cost of recomputing the resize a few times).
            branches: ``{"diffusion_top": Q, "clip_top": Q or None}`` from :meth:`ODISE.infer` with
                ``return_branches``; fills the per-query fields and the uncertainty of the result.
        """
        cfg = self.model.config.postprocess
        chunked = chunk_queries is not None
        device = mask_logits.device
        if chunked:
            masks = None

            def masks_for(idx: torch.Tensor) -> torch.Tensor:
                return resize_mask_logits(mask_logits[idx], padded_size, image_size, output_size)
        else:
            masks = resize_mask_logits(mask_logits, padded_size, image_size, output_size)
        isthing = self._isthing.to(device)
        categories = self.vocabulary.categories
        cat_ids = torch.tensor([c.id for c in categories], dtype=torch.int32, device=device)

        panoptic = np.zeros(output_size, dtype=np.int32)
        segments: list[Segment] = []
        segment_queries: list[int] = []
        if cfg.panoptic_on:
            thresholds = {
                "object_mask_threshold": cfg.object_mask_threshold,
                "overlap_threshold": cfg.overlap_threshold,
            }
            if chunked:
                pan, segs = panoptic_inference_chunked(
                    mask_cls, masks_for, output_size, isthing, chunk=chunk_queries, **thresholds
                )
            else:
                pan, segs = panoptic_inference(mask_cls, masks, isthing, **thresholds)
            if segs:
                seg_masks = pan[None] == torch.tensor([s.id for s in segs], device=pan.device).view(-1, 1, 1)
                areas = seg_masks.flatten(1).sum(1).tolist()
                boxes = mask_boxes(seg_masks).tolist()
                for seg, area, box in zip(segs, areas, boxes):
                    cat = categories[seg.class_index]
                    segments.append(
                        Segment(seg.id, cat.id, cat.name, seg.isthing, seg.score, int(area), tuple(box))
                    )
                    segment_queries.append(seg.query)
            panoptic = pan.cpu().numpy().astype(np.int32)
        semantic = None
        if cfg.semantic_on:
            if chunked:
                semantic = (
                    cat_ids[semantic_argmax_chunked(mask_cls, masks_for, output_size, chunk=chunk_queries)]
                    .cpu()
                    .numpy()
                )
            else:
                semantic = cat_ids[semantic_argmax(mask_cls, masks)].cpu().numpy()
        raw = RawPrediction(
            panoptic=panoptic, segments=segments, semantic=semantic, vocabulary=self.vocabulary
        )
        if cfg.instance_on:
            options = {"topk": cfg.topk_per_image, "things_only": cfg.panoptic_on}
            if chunked:
                classes, scores, queries = instance_inference_chunked(
                    mask_cls, masks_for, isthing, chunk=chunk_queries, **options
                )
            else:
                classes, scores, queries = instance_inference(mask_cls, masks, isthing, **options)
            unique, inverse = torch.unique(queries, return_inverse=True)
            if chunked and unique.numel():
                boxes_u, packed_u = instance_masks_chunked(masks_for, unique, chunk=chunk_queries)
            else:
                empty = torch.zeros((0, *output_size), dtype=torch.bool, device=device)
                binary = (masks[unique] > 0) if masks is not None else empty  # one mask per distinct query
                boxes_u, packed_u = mask_boxes(binary), pack_masks(binary)
            raw.instance_category_ids = cat_ids[classes].cpu().numpy().astype(np.int64)
            raw.instance_scores = scores.cpu().numpy().astype(np.float32)
            raw.instance_boxes = boxes_u[inverse].cpu().numpy().astype(np.int64)
            raw.instance_masks_packed = packed_u[inverse].cpu().numpy()
        self._query_fields(raw, mask_cls, cat_ids, segment_queries, branches)
        return raw

    @staticmethod
    def _query_fields(
        raw: RawPrediction,
        mask_cls: torch.Tensor,
        cat_ids: torch.Tensor,
        segment_queries: list[int],
        branches: dict | None,
    ) -> None:
        """Per-query top classes and the image's uncertainty (read-only: from values already computed)."""
        num_classes = mask_cls.shape[-1] - 1
        top_prob, top = F.softmax(mask_cls.float(), dim=-1).max(-1)
        raw.query_top_prob = top_prob.cpu().numpy().astype(np.float32)
        top_ids = torch.where(
            top < num_classes,
            cat_ids[top.clamp(max=num_classes - 1)],
            torch.zeros_like(top, dtype=cat_ids.dtype),
        )
        raw.query_top_class = top_ids.cpu().numpy().astype(np.int64)  # 0 = "no object"
        raw.segment_queries = np.asarray(segment_queries, dtype=np.int64)
        if segment_queries:
            raw.uncertainty = float(np.mean(1.0 - raw.query_top_prob[raw.segment_queries]))
        if branches is None:
            return
        raw.diffusion_top_class = cat_ids[branches["diffusion_top"]].cpu().numpy().astype(np.int64)
        if branches.get("clip_top") is not None:
            raw.clip_top_class = cat_ids[branches["clip_top"]].cpu().numpy().astype(np.int64)
            if segment_queries:
                q = raw.segment_queries
                raw.branch_disagreement = float(np.mean(raw.diffusion_top_class[q] != raw.clip_top_class[q]))

    @torch.no_grad()
    def infer_prepared(self, prepared) -> list[ModelOutput]:
        """The model's forward pass on outputs of :meth:`prepare` / :meth:`prepare_resized` (one batch), without
        post-processing; each :class:`ModelOutput` goes to :meth:`postprocess_output`."""
        if not prepared:
            return []
        vocab_emb = self.model.vocabulary_embedding(self.vocabulary)
        outputs = self.model.infer(
            [p[0].to(self.device) for p in prepared],
            [p[1] for p in prepared],
            vocab_emb,
            tile_batch_size=self.tile_batch_size,
            full_decode=self.full_decode,
            sequential_tiles=self.sequential_tiles,
            use_clip=self.use_clip,
            return_branches=True,
        )
        out = []
        for (tensor, resized, original), (mask_cls, mask_logits, branches) in zip(prepared, outputs):
            padded = (int(tensor.shape[-2]), int(tensor.shape[-1]))
            out.append(ModelOutput(mask_cls, mask_logits, padded, tuple(resized), tuple(original), branches))
        return out

    @torch.no_grad()
    def postprocess_output(self, output: ModelOutput, *, chunk_queries: int | None = None) -> RawPrediction:
        """:meth:`postprocess_raw` of one :class:`ModelOutput` (``chunk_queries``: see there)."""
        return self.postprocess_raw(
            output.mask_cls,
            output.mask_logits,
            output.padded_size,
            output.image_size,
            output.output_size,
            chunk_queries=chunk_queries,
            branches=output.branches,
        )

    @torch.no_grad()
    def predict_prepared_raw(self, prepared, *, chunk_queries: int | None = None) -> list[RawPrediction]:
        """Like :meth:`predict_prepared` but returns :class:`RawPrediction` (no per-instance mask unpacking)."""
        return [
            self.postprocess_output(o, chunk_queries=chunk_queries) for o in self.infer_prepared(prepared)
        ]


@dataclass
class ModelOutput:
    """The model's raw output for one image (on the model's device), before post-processing.

    ``mask_cls``: ``Qx(K+1)`` class log-probabilities; ``mask_logits``: ``QxHp/4xWp/4``; ``padded_size``,
    ``image_size`` (resized, unpadded), ``output_size`` (original); ``branches``: each branch's top class
    per query (``{"diffusion_top": Q, "clip_top": Q or None}``, class indices in [0, K)).
    """

    mask_cls: torch.Tensor
    mask_logits: torch.Tensor
    padded_size: tuple[int, int]
    image_size: tuple[int, int]
    output_size: tuple[int, int]
    branches: dict | None = None


@dataclass
class RawPrediction:
    """Compact result of one image, cheap to move between processes.

    ``panoptic`` / ``semantic``: ``HxW`` int32 (segment ids / category ids); ``segments``: typed segments;
    instances as arrays: category ids ``N``, scores ``N``, boxes ``Nx4`` (x, y, w, h) and masks bit-packed
    ``N x ceil(H*W/8)`` uint8 (``numpy.packbits`` order over the flattened ``HxW`` mask).

    Per query (``Q``): ``query_top_prob`` (fused top-1 probability, "no object" included, float32),
    ``query_top_class`` (its category id, 0 = "no object"), ``diffusion_top_class`` / ``clip_top_class``
    (each branch's top category id; None when unknown / without the CLIP branch); ``segment_queries``: the
    query of each segment (its first one for merged stuff). Per image: ``uncertainty`` = mean over segments
    of ``1 - query_top_prob`` of the segment's query (None without segments) and ``branch_disagreement`` =
    fraction of segments whose two branches' top classes differ (None without segments or CLIP branch).
    """

    panoptic: np.ndarray
    segments: list[Segment]
    semantic: np.ndarray | None
    vocabulary: Vocabulary
    instance_category_ids: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    instance_scores: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    instance_boxes: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), np.int64))
    instance_masks_packed: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    query_top_prob: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    query_top_class: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    diffusion_top_class: np.ndarray | None = None
    clip_top_class: np.ndarray | None = None
    segment_queries: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    uncertainty: float | None = None
    branch_disagreement: float | None = None

    def instance_mask(self, i: int) -> np.ndarray:
        h, w = self.panoptic.shape
        return np.unpackbits(self.instance_masks_packed[i], count=h * w).reshape(h, w).astype(bool)

    def to_result(self) -> PanopticResult:
        names = {c.id: c.name for c in self.vocabulary}
        instances = [
            Instance(
                int(cid), names[int(cid)], float(score), self.instance_mask(i), tuple(int(v) for v in box)
            )
            for i, (cid, score, box) in enumerate(
                zip(self.instance_category_ids, self.instance_scores, self.instance_boxes)
            )
        ]
        return PanopticResult(
            panoptic_seg=self.panoptic,
            segments=self.segments,
            semantic_seg=self.semantic,
            instances=instances,
            uncertainty=self.uncertainty,
            branch_disagreement=self.branch_disagreement,
        )
