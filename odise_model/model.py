"""The ODISE network: components wired together, batched over images and over SD tiles.

Built by :func:`odise_model.build.build_odise` (the only place sizes are decided); used through
:class:`odise_model.Predictor` for inference and by ``odise_model.training`` for fine-tuning.

Inference for a list of images (already resized so the short side is 1024 and padded to 64):

1. tiles: every image is cut into sliding windows (:func:`tile_boxes`); all windows of all images go
   through CLIP -> implicit captioner -> Stable Diffusion -> projections in chunks of ``tile_batch_size``;
2. stitch: per image, window features are written into full-size ``s2..s5`` maps (overlaps averaged);
3. mask generator: images of the same padded size are batched through the pixel decoder and the
   transformer decoder (different sizes run as separate groups, so results never depend on batching);
4. classification: diffusion-branch logits against the vocabulary's text embeddings, MaskCLIP logits
   (one ViT pass per image), geometric fusion -> ``K+1`` class log-probabilities per query.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from .classifier import OpenVocabHead, VocabularyEmbedding, ensemble_max, fuse_probabilities
from .clip import SharedCLIP
from .config import ODISEConfig
from .feature_extractor import FeatureProjections, StableDiffusionTaps, crop_tiles, stitch_tiles, tile_boxes
from .implicit_captioner import ImplicitCaptioner
from .pixel_decoder import PixelDecoder
from .transformer_decoder import MaskGeneratorOutput, TransformerDecoder
from .vocabulary import Vocabulary, load_vocabulary

__all__ = ["ODISE"]


class ODISE(nn.Module):
    """ODISE: SD features + Mask2Former mask generator + open-vocabulary classification with CLIP fusion.

    Sub-modules (names used by the checkpoint key map in :mod:`odise_model.checkpoint`):
    ``clip`` (frozen, shared), ``captioner`` (trainable), ``sd`` (frozen), ``projections``, ``pixel_decoder``,
    ``decoder``, ``head`` (trainable).
    """

    def __init__(
        self,
        *,
        config: ODISEConfig,
        clip: SharedCLIP,
        captioner: ImplicitCaptioner,
        sd: StableDiffusionTaps,
        projections: FeatureProjections,
        pixel_decoder: PixelDecoder,
        decoder: TransformerDecoder,
        head: OpenVocabHead,
    ) -> None:
        super().__init__()
        self.config = config
        self.clip = clip
        self.captioner = captioner
        self.sd = sd
        self.projections = projections
        self.pixel_decoder = pixel_decoder
        self.decoder = decoder
        self.head = head
        self._seen_synonyms: frozenset[str] | None = None
        self.gradient_checkpointing = "none"

    # --- bookkeeping ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.head.text_proj.weight.device

    def frozen_modules(self) -> list[nn.Module]:
        """Modules that are never trained (Stable Diffusion and CLIP)."""
        return [self.sd, self.clip]

    def train(self, mode: bool = True) -> ODISE:
        super().train(mode)
        for module in self.frozen_modules():
            module.eval()
        return self

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The official trainable set (28,067,009 parameters for the label variant)."""
        frozen = {id(p) for m in self.frozen_modules() for p in m.parameters()}
        return [(n, p) for n, p in self.named_parameters() if id(p) not in frozen]

    def set_gradient_checkpointing(self, mode: str = "projections") -> ODISE:
        """Trade compute for memory in training: ``"none"``, ``"projections"`` (the official
        ``use_checkpoint=True``: the per-tap projections are recomputed in backward) or ``"all"`` (also the
        UNet blocks, whose activations the backward pass to the captioner would otherwise keep)."""
        if mode not in ("none", "projections", "all"):
            raise ValueError(f"gradient checkpointing must be 'none', 'projections' or 'all', got {mode!r}")
        self.gradient_checkpointing = mode
        if mode == "all":
            self.sd.unet.enable_gradient_checkpointing()
        elif self.sd.unet.is_gradient_checkpointing:
            self.sd.unet.disable_gradient_checkpointing()
        return self

    def set_frozen_dtype(self, dtype: torch.dtype) -> ODISE:
        """Cast Stable Diffusion and CLIP (the frozen 98% of the weights) to ``dtype`` for inference."""
        for module in self.frozen_modules():
            module.to(dtype)
        return self

    # --- vocabulary --------------------------------------------------------------------------------
    def vocabulary_embedding(self, vocabulary: Vocabulary) -> VocabularyEmbedding:
        """CLIP text embeddings of a vocabulary for both branches; computed once per vocabulary (cached)."""
        cfg = self.config.classifier
        if self._seen_synonyms is None:
            train_vocab = load_vocabulary(cfg.train_vocabulary)
            self._seen_synonyms = frozenset(s for c in train_vocab for s in c.synonyms)
        key = (vocabulary.sha256(), cfg.text_prompt, cfg.maskclip_prompt, str(self.device))

        def build() -> VocabularyEmbedding:
            emb = VocabularyEmbedding.build(
                [c.synonyms for c in vocabulary],
                encode_text=self.clip.encode_text,
                text_prompt=cfg.text_prompt,
                maskclip_prompt=cfg.maskclip_prompt,
                seen_synonyms=self._seen_synonyms,
            )
            return emb.to(self.device)

        return self.head.cached_embedding(key, build)

    # --- 1-2. backbone -------------------------------------------------------------------------------
    def backbone_features(
        self,
        images: Sequence[torch.Tensor],
        *,
        tile_batch_size: int = 8,
        full_decode: bool = False,
        sequential_tiles: bool = False,
    ) -> list[dict[str, torch.Tensor]]:
        """``s2..s5`` feature maps for each padded image.

        Args:
            images: ``3xHxW`` float tensors in [0, 1], H and W multiples of ``size_divisibility``.
            tile_batch_size: SD tiles per forward pass (all images' tiles are pooled).
            full_decode: run the whole VAE decoder (official behaviour; same features, slower).
            sequential_tiles: one tile per SD pass, image by image (official behaviour, for comparisons).
        Returns:
            per image, name -> ``1 x dim x H/stride x W/stride``.
        """
        tile_size = self.config.input.tile_size
        sd_dtype = self.sd.unet.dtype
        proj_dtype = next(self.projections.parameters()).dtype
        # 1. all windows of all images, grouped by window side (usually all tile_size)
        per_image_boxes = [tile_boxes(int(im.shape[-2]), int(im.shape[-1]), tile_size) for im in images]
        jobs: dict[int, list[tuple[int, int]]] = defaultdict(list)  # window -> [(image, box index)]
        for i, boxes in enumerate(per_image_boxes):
            for j, (y1, _x1, y2, _x2) in enumerate(boxes):
                jobs[y2 - y1].append((i, j))
        results: list[dict[str, list]] = [defaultdict(lambda n=len(b): [None] * n) for b in per_image_boxes]
        for window, items in jobs.items():
            step = 1 if sequential_tiles else max(1, tile_batch_size)
            for start in range(0, len(items), step):
                chunk = items[start : start + step]
                tiles = torch.cat(
                    [crop_tiles(images[i], [per_image_boxes[i][j]], tile_size) for i, j in chunk]
                ).to(sd_dtype)
                # 1a. implicit captioner on the CLIP embedding of each tile
                context, time_cond = self.captioner(self.clip.encode_tiles(tiles).to(proj_dtype))
                # 1b. Stable Diffusion taps
                taps = self.sd(tiles, context.to(sd_dtype), time_cond.to(sd_dtype), full_decode=full_decode)
                # 1c. projections at the window's resolution
                taps = [t.to(proj_dtype) for t in taps]
                if self.gradient_checkpointing != "none" and torch.is_grad_enabled():
                    feats = torch.utils.checkpoint.checkpoint(
                        self.projections, taps, window, use_reentrant=False
                    )
                else:
                    feats = self.projections(taps, window)
                for k, (i, j) in enumerate(chunk):
                    for name, value in feats.items():
                        results[i][name][j] = value[k : k + 1]
        # 2. stitch windows into full maps
        out = []
        for i, boxes in enumerate(per_image_boxes):
            tile_feats = {name: torch.cat(vals) for name, vals in results[i].items()}
            size = (int(images[i].shape[-2]), int(images[i].shape[-1]))
            out.append(stitch_tiles(tile_feats, boxes, size, self.projections.strides))
        return out

    # --- 3. mask generator --------------------------------------------------------------------------
    def mask_generator(self, features: dict[str, torch.Tensor]) -> MaskGeneratorOutput:
        """Pixel decoder + transformer decoder on ``BxCxhxw`` maps of equal size (see ``TransformerDecoder``).

        Returns the last layer's :class:`~odise_model.transformer_decoder.MaskGeneratorOutput` (masks
        ``BxQxh/4xw/4``, mask embeddings ``BxQxP``, temperature; the caption variant's ``BxQx2`` logits), with
        the earlier layers' in ``aux_outputs``.
        """
        mask_features, multi_scale = self.pixel_decoder(features)
        return self.decoder(multi_scale, mask_features)

    # --- 4. classification ----------------------------------------------------------------------------
    def open_logits(self, outputs: MaskGeneratorOutput, vocab: VocabularyEmbedding) -> torch.Tensor:
        """Diffusion-branch logits ``BxQx(K+1)`` (label) or ``BxQxK`` (caption) of one decoder output."""
        return self.head.logits(outputs.mask_embed, vocab, outputs.logit_scale)

    def clip_logits(
        self, images: Sequence[torch.Tensor], mask_logits: torch.Tensor, vocab: VocabularyEmbedding
    ) -> torch.Tensor:
        """MaskCLIP logits ``BxQxK``.

        ``images``: per image ``3xhxw`` in [0, 1] (the resized, unpadded image); ``mask_logits``: ``BxQxHpxWp``
        (stride 4 of the padded input). With ``maskclip_alignment="aligned"`` the masks are cropped to the
        image first; ``"official"`` pairs the whole padded mask with the unpadded image as the official code.
        """
        size = self.clip.image_size
        aligned = self.config.classifier.maskclip_alignment == "aligned"
        stride = self.config.pixel_decoder.common_stride
        imgs, masks = [], []
        for b, image in enumerate(images):
            m = mask_logits[b : b + 1].float()
            if aligned:
                h, w = image.shape[-2:]
                m = F.interpolate(m, scale_factor=stride, mode="bilinear", align_corners=False)[:, :, :h, :w]
            imgs.append(
                F.interpolate(image[None].float(), size=(size, size), mode="bilinear", align_corners=False)
            )
            masks.append(F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False))
        mask_embed = self.clip.mask_embed(torch.cat(imgs), torch.cat(masks)).float()
        text = F.normalize(vocab.maskclip_text.to(mask_embed), dim=-1)
        logits = (
            torch.einsum("bqc,nc->bqn", F.normalize(mask_embed, dim=-1), text) * self.clip.logit_scale.float()
        )
        return ensemble_max(logits, vocab.class_index, vocab.num_classes)

    def class_log_probs(
        self,
        outputs: MaskGeneratorOutput,
        vocab: VocabularyEmbedding,
        images: Sequence[torch.Tensor] | None,
        branches: dict | None = None,
    ) -> torch.Tensor:
        """Final ``BxQx(K+1)`` class log-probabilities (fused with MaskCLIP unless ``images`` is None).

        When a dict is given as ``branches``, it receives each branch's top class per query (read-only
        argmaxes of the logits fused here; the returned values do not change): ``"diffusion_top"``
        ``BxQ`` long in [0, K) and ``"clip_top"`` ``BxQ`` long, or None without the CLIP branch.
        """
        cfg = self.config.classifier
        open_logits = self.open_logits(outputs, vocab).float()
        if cfg.kind == "label":
            p_background = F.softmax(open_logits, dim=-1)[..., -1]
            open_logits = open_logits[..., :-1]
        else:
            p_background = F.softmax(outputs.pred_logits.float(), dim=-1)[..., -1]
        clip_logits = None
        if images is not None:
            clip_logits = self.clip_logits(images, outputs.pred_masks, vocab)
        if branches is not None:
            branches["diffusion_top"] = open_logits.argmax(-1)
            branches["clip_top"] = None if clip_logits is None else clip_logits.argmax(-1)
        return fuse_probabilities(
            open_logits, clip_logits, vocab.seen, alpha=cfg.alpha, beta=cfg.beta, p_background=p_background
        )

    # --- everything ---------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(
        self,
        images: Sequence[torch.Tensor],
        unpadded_sizes: Sequence[tuple[int, int]],
        vocab: VocabularyEmbedding,
        *,
        tile_batch_size: int = 8,
        full_decode: bool = False,
        sequential_tiles: bool = False,
        use_clip: bool = True,
        return_branches: bool = False,
    ) -> list[tuple[torch.Tensor, ...]]:
        """Class log-probs ``Qx(K+1)`` and mask logits ``QxHp/4xWp/4`` for each padded image.

        ``unpadded_sizes[i]`` is the resized image size inside ``images[i]`` (for MaskCLIP). With
        ``return_branches`` each tuple has a third item: ``{"diffusion_top": Q long, "clip_top": Q long or
        None}``, each branch's top class per query (see :meth:`class_log_probs`); nothing else changes.
        """
        features = self.backbone_features(
            images,
            tile_batch_size=tile_batch_size,
            full_decode=full_decode,
            sequential_tiles=sequential_tiles,
        )
        groups: dict[tuple[int, int], list[int]] = defaultdict(list)
        for i, image in enumerate(images):
            groups[(int(image.shape[-2]), int(image.shape[-1]))].append(i)
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(images)
        for indices in groups.values():
            batch = {name: torch.cat([features[i][name] for i in indices]) for name in features[indices[0]]}
            outputs = self.mask_generator(batch)
            clip_images = None
            if use_clip:
                clip_images = [images[i][:, : unpadded_sizes[i][0], : unpadded_sizes[i][1]] for i in indices]
            branches: dict | None = {} if return_branches else None
            log_probs = self.class_log_probs(outputs, vocab, clip_images, branches)
            for k, i in enumerate(indices):
                results[i] = (log_probs[k], outputs.pred_masks[k].float())
                if branches is not None:
                    clip_top = branches["clip_top"]
                    extra = {
                        "diffusion_top": branches["diffusion_top"][k],
                        "clip_top": None if clip_top is None else clip_top[k],
                    }
                    results[i] = (*results[i], extra)
        return results  # type: ignore[return-value]
