"""Open-vocabulary classification of predicted masks, and the fusion with MaskCLIP.

Pieces (all tensors in, tensors out):

* :class:`VocabularyEmbedding`: CLIP text embeddings of every synonym of a vocabulary, for the diffusion
  branch (label variant: raw names; caption: "a photo of a {}.") and the MaskCLIP branch ("a photo of a {}."),
  plus the synonym -> class index and the seen / unseen flag of each class. Built once per vocabulary and
  cached by :class:`OpenVocabHead`.
* :class:`OpenVocabHead`: the trainable ``text_proj`` (CLIP text width -> mask-embedding width), the learned
  ``null_embed`` (label variant) and the no-object loss weights (official ``criterion.empty_weight``).
  Logits are ``logit_scale * cos(mask_embed, text_proj(text))``, max over each class's synonyms.
* :func:`fuse_probabilities`: the geometric ensemble with MaskCLIP (exponent ``alpha`` for classes seen in
  training, ``beta`` for unseen ones), and the final ``K+1`` class log-probabilities fed to post-processing.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["apply_prompt", "VocabularyEmbedding", "ensemble_max", "OpenVocabHead", "fuse_probabilities"]

PROMPTS = {None: "{}", "a": "a {}", "photo": "a photo of a {}.", "scene": "a photo of a {} in the scene."}


def apply_prompt(synonyms: Sequence[str], prompt: str | None) -> list[str]:
    """Official ``prompt_labels``: wrap each synonym in the template (``None`` = raw)."""
    template = PROMPTS[prompt]
    return [template.format(s) for s in synonyms]


def ensemble_max(logits: torch.Tensor, class_index: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Max over synonyms: ``...xS`` synonym logits -> ``...xK`` class logits (``class_index`` ``S`` in [0, K))."""
    out = logits.new_full((*logits.shape[:-1], num_classes), float("-inf"))
    index = class_index.to(logits.device).expand_as(logits)
    return out.scatter_reduce(-1, index, logits, reduce="amax", include_self=True)


@dataclass
class VocabularyEmbedding:
    """Text side of one vocabulary (K classes, S synonyms).

    Attributes:
        text: ``SxD`` CLIP embeddings for the diffusion branch.
        maskclip_text: ``SxD`` CLIP embeddings for the MaskCLIP branch.
        class_index: ``S`` long, class of each synonym.
        seen: ``K`` bool, class has a synonym in the training vocabulary.
        num_classes: K.
    """

    text: torch.Tensor
    maskclip_text: torch.Tensor
    class_index: torch.Tensor
    seen: torch.Tensor
    num_classes: int

    def to(self, device) -> VocabularyEmbedding:
        return VocabularyEmbedding(
            self.text.to(device),
            self.maskclip_text.to(device),
            self.class_index.to(device),
            self.seen.to(device),
            self.num_classes,
        )

    @classmethod
    def build(
        cls,
        synonyms: Sequence[Sequence[str]],
        *,
        encode_text: Callable[[Sequence[str]], torch.Tensor],
        text_prompt: str | None,
        maskclip_prompt: str | None,
        seen_synonyms: frozenset[str],
    ) -> VocabularyEmbedding:
        flat = [s for syns in synonyms for s in syns]
        class_index = torch.tensor([i for i, syns in enumerate(synonyms) for _ in syns], dtype=torch.long)
        text = encode_text(apply_prompt(flat, text_prompt))
        maskclip = (
            text if maskclip_prompt == text_prompt else encode_text(apply_prompt(flat, maskclip_prompt))
        )
        seen = torch.tensor([not seen_synonyms.isdisjoint(syns) for syns in synonyms], dtype=torch.bool)
        return cls(text.float(), maskclip.float(), class_index, seen, len(synonyms))


class OpenVocabHead(nn.Module):
    """Trainable text-side parameters and the diffusion-branch logits.

    Args:
        kind: ``"label"`` (learned null embedding, K+1 logits) or ``"caption"`` (K logits; the binary
            foreground head lives in the transformer decoder).
        clip_dim: CLIP text embedding width (768).
        projection_dim: mask embedding width (256).
        num_train_classes: classes of the training vocabulary (133); sizes ``empty_weight``.
        eos_coef: no-object weight.
    """

    def __init__(
        self, *, kind: str, clip_dim: int, projection_dim: int, num_train_classes: int, eos_coef: float
    ) -> None:
        super().__init__()
        self.kind = kind
        self.text_proj = nn.Linear(clip_dim, projection_dim)
        self.null_embed = nn.Parameter(torch.zeros(1, clip_dim)) if kind == "label" else None
        num_weights = num_train_classes + 1 if kind == "label" else 2
        weight = torch.ones(num_weights, device="cpu")
        weight[-1] = eos_coef
        self.register_buffer("empty_weight", weight)
        self._cache: OrderedDict[tuple, VocabularyEmbedding] = OrderedDict()

    def cached_embedding(
        self, key: tuple, build: Callable[[], VocabularyEmbedding], max_entries: int = 8
    ) -> VocabularyEmbedding:
        """Text embeddings per vocabulary, built once (LRU of ``max_entries``)."""
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        emb = build()
        self._cache[key] = emb
        while len(self._cache) > max_entries:
            self._cache.popitem(last=False)
        return emb

    def clear_cache(self) -> None:
        self._cache.clear()

    def logits(
        self, mask_embed: torch.Tensor, vocab: VocabularyEmbedding, logit_scale: torch.Tensor
    ) -> torch.Tensor:
        """Diffusion-branch logits.

        Args:
            mask_embed: ``BxQxP`` mask embeddings.
            vocab: text embeddings (``text`` is ``SxD``).
            logit_scale: 0-dim temperature (already ``min(exp(.), 100)``).
        Returns:
            ``BxQx(K+1)`` for the label variant (last = null / no-object), ``BxQxK`` for caption.
        """
        mask_embed = F.normalize(mask_embed, dim=-1)
        text = F.normalize(self.text_proj(vocab.text.to(mask_embed)), dim=-1)
        logits = ensemble_max(logit_scale * (mask_embed @ text.t()), vocab.class_index, vocab.num_classes)
        if self.null_embed is None:
            return logits
        null = F.normalize(self.text_proj(self.null_embed.to(mask_embed)), dim=-1)
        return torch.cat([logits, logit_scale * (mask_embed @ null.t())], dim=-1)


def fuse_probabilities(
    open_logits: torch.Tensor,
    clip_logits: torch.Tensor | None,
    seen: torch.Tensor,
    *,
    alpha: float,
    beta: float,
    p_background: torch.Tensor,
) -> torch.Tensor:
    """Final ``K+1`` class log-probabilities of every query (input of Mask2Former post-processing).

    ``p = softmax(open)^(1-a) * softmax(clip)^a`` with ``a = alpha`` for seen classes and ``beta`` for unseen
    ones, renormalised, scaled by ``1 - p_background``; ``p_background`` appended; ``log(p + 1e-8)`` as the
    official code. Computed from log-softmax, so an underflowing probability gives a very negative logit
    instead of the official ``-inf * 0 = NaN``.

    Args:
        open_logits: ``BxQxK`` diffusion-branch logits (null excluded).
        clip_logits: ``BxQxK`` MaskCLIP logits, or None to skip fusion.
        seen: ``K`` bool.
        p_background: ``BxQ`` probability of "no object".
    """
    log_p = F.log_softmax(open_logits.float(), dim=-1)
    if clip_logits is not None:
        log_q = F.log_softmax(clip_logits.float(), dim=-1)
        exponent = torch.where(seen.to(log_p.device), torch.tensor(alpha), torch.tensor(beta)).to(log_p)
        log_p = (1 - exponent) * log_p + exponent * log_q
    probs = F.softmax(log_p, dim=-1) * (1 - p_background.float()).unsqueeze(-1)
    return torch.log(torch.cat([probs, p_background.float().unsqueeze(-1)], dim=-1) + 1e-8)
