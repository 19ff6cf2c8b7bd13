"""Model side of fine-tuning: a batch of augmented images + targets -> named, weighted losses.

:class:`TrainingModule` wraps an :class:`odise_model.ODISE` (the module DDP wraps when training on several
workers) and runs the official training forward:

1. backbone: CLIP tile embedding -> implicit captioner -> frozen Stable Diffusion -> projections, for all
   tiles of all images (gradients flow through the frozen UNet into the captioner MLP and its gates;
   no frozen parameter ever gets a ``.grad`` because they have ``requires_grad=False``: autograd
   differentiates with respect to the activations only, unlike the official code, which turns
   ``requires_grad`` on for the UNet);
2. mask generator: pixel decoder (float32) + masked-attention decoder -> final and aux predictions;
3. classification logits of every prediction:
   * label variant: ``logit_scale * cos(mask_embed, text_proj(CLIP(class synonym)))``, max over synonyms,
     plus the learned null embedding -> ``BxQx(K+1)`` over the training vocabulary;
   * caption variant: the binary foreground / no-object head (``class_embed``); targets become
     class-agnostic (label 0);
4. losses: :class:`odise_model.criterion.SetCriterion` (matching + CE / BCE / dice, deep supervision);
   caption variant also :class:`odise_model.criterion.MaskGroundingCriterion` against the caption words
   embedded with the frozen CLIP text tower ("a photo of a {}.") and the trainable ``text_proj``.

The frozen CLIP text embeddings of the vocabulary and of caption words are computed once and cached;
``text_proj`` is applied at every step, so the text side trains.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .classifier import apply_prompt
from .criterion import MaskGroundingCriterion, SetCriterion
from .matcher import HungarianMatcher
from .model import ODISE
from .transformer_decoder import MaskGeneratorOutput
from .vocabulary import Vocabulary

__all__ = ["LossConfig", "TrainingModule", "optimizer_param_groups", "NORM_MODULE_TYPES"]


@dataclass(frozen=True)
class LossConfig:
    """Loss settings (official values as defaults).

    Attributes:
        class_weight, mask_weight, dice_weight: weights of CE, BCE and dice (2 / 5 / 5), also the matcher costs.
        num_points: points of the matcher and of the mask losses (12,544).
        oversample_ratio, importance_sample_ratio: uncertainty point sampling of the mask losses (3.0 / 0.75).
        eos_coef: no-object weight; None takes the model config's ``classifier.eos_coef`` (0.1).
        grounding_weight: weight of the caption-grounding loss (1.0).
        gather_grounding: gather embeddings across workers for the grounding loss.
    """

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    eos_coef: float | None = None
    grounding_weight: float = 1.0
    gather_grounding: bool = True


NORM_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.GroupNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.LocalResponseNorm,
)
"""Module types whose parameters get ``weight_decay_norm`` (detectron2's list)."""


def optimizer_param_groups(
    model: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    weight_decay_norm: float = 0.0,
    weight_decay_bias: float = 0.0,
) -> list[dict]:
    """AdamW parameter groups as detectron2 ``get_default_optimizer_params(weight_decay_norm=0, weight_decay_bias=0)``.

    Every parameter with ``requires_grad`` (each once, in ``named_modules`` order): parameters of
    normalisation modules (:data:`NORM_MODULE_TYPES`) get ``weight_decay_norm``; other parameters named exactly
    ``bias`` get ``weight_decay_bias``; everything else ``weight_decay`` (that includes embeddings,
    ``null_embed``, ``logit_scale``, positional embeddings, the captioner gates and attention ``in_proj_bias``,
    as in detectron2, which has no embedding rule in the version ODISE uses). Parameters with equal settings
    are merged into one group (``reduce_param_groups``); group order is deterministic.

    Returns:
        ``[{"params": [...], "lr": lr, "weight_decay": wd, "names": [...]}, ...]`` (``names`` is ignored by
        the optimizer and kept for inspection).
    """
    groups: dict[float, dict] = OrderedDict()
    seen: set[int] = set()
    for _module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            if isinstance(module, NORM_MODULE_TYPES):
                wd = weight_decay_norm
            elif param_name == "bias":
                wd = weight_decay_bias
            else:
                wd = weight_decay
            group = groups.setdefault(wd, {"params": [], "lr": lr, "weight_decay": wd, "names": []})
            group["params"].append(param)
            group["names"].append(f"{_module_name}.{param_name}" if _module_name else param_name)
    return list(groups.values())


class TrainingModule(nn.Module):
    """Training forward of ODISE: images + targets (+ caption words) -> weighted losses.

    Args:
        model: the ODISE model (its ``train()`` keeps SD and CLIP in eval mode).
        vocabulary: label variant: the training classes (target ``labels`` index into it). Ignored for the
            caption variant, which trains a class-agnostic foreground head.
        losses: loss settings.
        tile_batch_size: SD tiles per forward pass.
        word_cache_size: caption words whose frozen CLIP embeddings are kept.
    """

    def __init__(
        self,
        model: ODISE,
        vocabulary: Vocabulary | None = None,
        *,
        losses: LossConfig = LossConfig(),
        tile_batch_size: int = 8,
        word_cache_size: int = 8192,
    ) -> None:
        super().__init__()
        self.model = model
        self.kind = model.config.classifier.kind
        if self.kind == "label" and vocabulary is None:
            raise ValueError("the label variant needs the training vocabulary")
        self.vocabulary = vocabulary
        self.loss_config = losses
        self.tile_batch_size = tile_batch_size
        eos_coef = losses.eos_coef if losses.eos_coef is not None else model.config.classifier.eos_coef
        matcher = HungarianMatcher(
            cost_class=losses.class_weight,
            cost_mask=losses.mask_weight,
            cost_dice=losses.dice_weight,
            num_points=losses.num_points,
        )
        self.criterion = SetCriterion(
            num_classes=len(vocabulary) if self.kind == "label" else 1,
            matcher=matcher,
            eos_coef=eos_coef,
            class_weight=losses.class_weight,
            mask_weight=losses.mask_weight,
            dice_weight=losses.dice_weight,
            num_points=losses.num_points,
            oversample_ratio=losses.oversample_ratio,
            importance_sample_ratio=losses.importance_sample_ratio,
        )
        self.grounding = (
            MaskGroundingCriterion(losses.grounding_weight, gather=losses.gather_grounding)
            if self.kind == "caption"
            else None
        )
        self._word_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._word_cache_size = word_cache_size

    # --- text side ---------------------------------------------------------------------------------------
    def word_embeddings(self, words: Sequence[Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Caption words -> (``BxKxP`` ``text_proj`` embeddings, ``BxK`` valid mask).

        ``words[b]`` is the list of K words of image b (the data side samples K = 8 with replacement), or
        empty for an image without words (then K placeholders ``""``, all invalid). Words are embedded with
        the model's diffusion-branch prompt (caption variant: "a photo of a {}.") by the frozen CLIP text
        tower (cached per prompt), then projected by the trainable ``text_proj``.
        """
        num_words = max((len(w) for w in words), default=0) or 1
        rows, valid = [], []
        for image_words in words:
            image_words = list(image_words)
            valid.append([True] * len(image_words) + [False] * (num_words - len(image_words)))
            rows.append(image_words + [""] * (num_words - len(image_words)))
        prompts = [
            [p if w else "" for p, w in zip(apply_prompt(r, self.model.config.classifier.text_prompt), r)]
            for r in rows
        ]
        flat = [p for r in prompts for p in r]
        missing = sorted({p for p in flat if p not in self._word_cache})
        if missing:
            emb = self.model.clip.encode_text(missing).float()
            for p, e in zip(missing, emb):
                self._word_cache[p] = e
        for p in flat:
            self._word_cache.move_to_end(p)
        text = torch.stack([self._word_cache[p] for p in flat]).to(self.model.device)
        while len(self._word_cache) > self._word_cache_size:
            self._word_cache.popitem(last=False)
        projected = self.model.head.text_proj(text).view(len(words), num_words, -1)
        return projected, torch.tensor(valid, dtype=torch.bool, device=projected.device)

    # --- forward -----------------------------------------------------------------------------------------
    def forward(
        self,
        images: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[dict[str, torch.Tensor]],
        words: Sequence[Sequence[str]] | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of one batch.

        Args:
            images: B images ``3xHxW`` in [0, 1], all the same size, H and W multiples of the model's
                ``size_divisibility`` (a list or a ``Bx3xHxW`` tensor), on the model's device.
            targets: per image ``{"labels": T long (indices into the training vocabulary), "masks": TxHxW}``
                (bool or float), masks covering the same ``HxW`` as the image.
            words: caption variant: per image its caption words (see :meth:`word_embeddings`).
            generator: RNG of the matcher's and criterion's point sampling (reproducible steps).
        Returns:
            weighted losses (``loss_ce``, ``loss_mask``, ``loss_dice`` and ``_{i}`` for aux output i; caption
            variant also ``loss_mask_word[_{i}]``); their sum is the training objective.
        """
        images = list(images)
        sizes = {tuple(im.shape[-2:]) for im in images}
        if len(sizes) != 1:
            raise ValueError(f"all images of a training batch must have the same size, got {sorted(sizes)}")
        if len(targets) != len(images):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        # 1. backbone features of every image (tiles pooled across images)
        features = self.model.backbone_features(images, tile_batch_size=self.tile_batch_size)
        batch = {name: torch.cat([f[name] for f in features]) for name in features[0]}
        # 2. mask generator: final + aux predictions
        outputs = self.model.mask_generator(batch)
        # 3. classification logits
        if self.kind == "label":
            vocab = self.model.vocabulary_embedding(self.vocabulary)

            def with_vocab_logits(pred: MaskGeneratorOutput) -> MaskGeneratorOutput:
                return pred.with_logits(self.model.head.logits(pred.mask_embed, vocab, pred.logit_scale))

            outputs = dataclasses.replace(
                with_vocab_logits(outputs),
                aux_outputs=tuple(with_vocab_logits(a) for a in outputs.aux_outputs),
            )
            loss_targets = list(targets)
        else:
            loss_targets = [{"labels": torch.zeros_like(t["labels"]), "masks": t["masks"]} for t in targets]
        # 4. losses
        losses = self.criterion(outputs, loss_targets, generator=generator)
        if self.grounding is not None:
            if words is None:
                raise ValueError(
                    "the caption variant needs caption words for every image (possibly empty lists)"
                )
            word_embed, word_valid = self.word_embeddings(words)
            losses.update(self.grounding(outputs, word_embed, word_valid))
        return losses
