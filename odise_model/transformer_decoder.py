"""Mask2Former masked-attention transformer decoder with ODISE's pooled mask embedding.

``N`` learned queries attend (cross-attention first, then self-attention, then FFN; post-norm) to the three
pixel-decoder scales in turn (stride 32, 16, 8, 32, ...). Cross-attention of each layer is masked by the
previous layer's mask prediction (``sigmoid < 0.5`` blocked, resized to that level; a query whose mask is
empty everywhere attends everywhere). After the learned queries and after every layer the heads predict:

* masks: ``mask_embed`` MLP(query) . mask_features, ``BxQxH/4xW/4`` logits,
* class-agnostic "mask embeddings" for open-vocabulary classification (``PooledMaskEmbed``):
  ``MLP(LN(LN(pool(mask_features, sigmoid(mask) > 0.5)) @ pool_proj + query))``,
* for the caption variant, a binary foreground / no-object logit pair (``class_embed``).

Parameter names follow the official ``sem_seg_head.predictor.*``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import TransformerDecoderConfig
from .layers import MLP, sine_position_encoding

__all__ = ["TransformerDecoder", "PooledMaskEmbed", "MaskGeneratorOutput", "mask_pooling"]


@dataclass(frozen=True)
class MaskGeneratorOutput:
    """Predictions of the mask generator (pixel decoder + transformer decoder) for one decoder stage.

    ``B`` images, ``Q`` queries, masks at stride 4 of the padded input (``h = H/4``, ``w = W/4``).

    Attributes:
        pred_masks: ``BxQxhxw`` mask logits.
        mask_embed: ``BxQxP`` mask embeddings (not normalised; ``P`` = the text projection width), matched
            against text embeddings for open-vocabulary classification.
        logit_scale: 0-dim temperature ``min(exp(logit_scale), 100)`` of that matching.
        pred_logits: class logits: ``BxQx2`` object / no-object of the caption variant's binary head; ``None``
            for the label variant until training adds its ``BxQx(K+1)`` vocabulary logits
            (:meth:`with_logits`).
        aux_outputs: the same predictions for the learned queries and layers ``1..L-1`` (deep
            supervision), oldest first; empty for those entries themselves.
    """

    pred_masks: torch.Tensor
    mask_embed: torch.Tensor
    logit_scale: torch.Tensor
    pred_logits: torch.Tensor | None = None
    aux_outputs: tuple[MaskGeneratorOutput, ...] = ()

    def with_logits(self, pred_logits: torch.Tensor) -> MaskGeneratorOutput:
        """A copy with ``pred_logits`` set (the aux outputs are kept as they are)."""
        return dataclasses.replace(self, pred_logits=pred_logits)

    # Read-only key access, as diffusers' ``BaseOutput``: ``out["pred_masks"]`` and ``"pred_logits" in out``
    # keep code written against the former dict working; a field that is None (or an empty ``aux_outputs``)
    # counts as absent, as the dict had no such key. Attribute access is the interface.
    def __getitem__(self, key: str) -> torch.Tensor | tuple[MaskGeneratorOutput, ...]:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str) or key not in _OUTPUT_FIELDS:
            return False
        value = getattr(self, key)
        return value is not None and not (isinstance(value, tuple) and not value)

    def keys(self) -> list[str]:
        """Names of the fields that are set, in declaration order."""
        return [name for name in _OUTPUT_FIELDS if name in self]


_OUTPUT_FIELDS = tuple(f.name for f in dataclasses.fields(MaskGeneratorOutput))


def mask_pooling(features: torch.Tensor, mask_logits: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Average of ``features`` (``BxCxHxW``) inside each hard mask ``sigmoid(mask_logits) > threshold``.

    ``mask_logits``: ``BxQxHxW`` (detached). Returns ``BxQxC``; empty masks give zeros (area + 1e-8).
    """
    masks = (mask_logits.detach().sigmoid() > threshold).to(features.dtype)
    denom = masks.sum(dim=(-1, -2), keepdim=True) + 1e-8
    return torch.einsum("bchw,bqhw->bqc", features, masks / denom)


class PooledMaskEmbed(nn.Module):
    """ODISE ``PooledMaskEmbed``: mask-pooled pixel features + query -> embedding for text matching.

    Parameters: ``pool_proj`` (LayerNorm + Linear), ``mask_embed`` (LayerNorm + 3-layer MLP),
    ``logit_scale`` (0-dim, init ``log(1/temperature)``, used as ``min(exp(.), 100)``).
    """

    def __init__(self, hidden_dim: int, mask_dim: int, projection_dim: int, temperature: float) -> None:
        super().__init__()
        self.pool_proj = nn.Sequential(nn.LayerNorm(hidden_dim), nn.Linear(hidden_dim, hidden_dim))
        self.mask_embed = nn.Sequential(nn.LayerNorm(mask_dim), MLP(mask_dim, hidden_dim, projection_dim, 3))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))

    def forward(
        self, query: torch.Tensor, mask_features: torch.Tensor, mask_logits: torch.Tensor
    ) -> torch.Tensor:
        """``query`` ``BxQxC``, ``mask_features`` ``BxCxHxW``, ``mask_logits`` ``BxQxHxW`` -> ``BxQxP``."""
        pooled = self.pool_proj(mask_pooling(mask_features, mask_logits))
        return self.mask_embed(pooled + query)

    def scale(self) -> torch.Tensor:
        return torch.clamp(self.logit_scale.exp(), max=100)


class SelfAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
        q = k = tgt + query_pos
        return self.norm(tgt + self.self_attn(q, k, value=tgt, need_weights=False)[0])


class CrossAttentionLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=0.0)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt, memory, memory_mask, pos, query_pos):
        out = self.multihead_attn(
            query=tgt + query_pos, key=memory + pos, value=memory, attn_mask=memory_mask, need_weights=False
        )[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    def __init__(self, d_model: int, dim_feedforward: int) -> None:
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, tgt: torch.Tensor) -> torch.Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class TransformerDecoder(nn.Module):
    """Masked-attention decoder producing per-layer masks, mask embeddings and (caption) binary logits.

    Args:
        in_channels: channels of the multi-scale features (must equal ``hidden_dim``: no input projection,
            as the official ``enforce_input_project=False``).
        cfg: sizes.
        projection_dim: width of the mask embeddings (= ``text_proj`` output).
        binary_class_head: add ``class_embed`` = Linear(hidden, 2) (caption variant).
    """

    def __init__(
        self, *, in_channels: int, cfg: TransformerDecoderConfig, projection_dim: int, binary_class_head: bool
    ) -> None:
        super().__init__()
        if in_channels != cfg.hidden_dim:
            raise ValueError(
                f"pixel decoder width {in_channels} must equal decoder hidden_dim {cfg.hidden_dim}"
            )
        self.cfg = cfg
        self.num_heads = cfg.num_heads
        self.num_layers = cfg.num_layers
        self.num_feature_levels = cfg.num_feature_levels
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(cfg.hidden_dim, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(cfg.hidden_dim, cfg.num_heads) for _ in range(cfg.num_layers)
        )
        self.transformer_ffn_layers = nn.ModuleList(
            FFNLayer(cfg.hidden_dim, cfg.ffn_dim) for _ in range(cfg.num_layers)
        )
        for layer in [
            *self.transformer_self_attention_layers,
            *self.transformer_cross_attention_layers,
            *self.transformer_ffn_layers,
        ]:
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
        self.decoder_norm = nn.LayerNorm(cfg.hidden_dim)
        self.query_feat = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.query_embed = nn.Embedding(cfg.num_queries, cfg.hidden_dim)
        self.level_embed = nn.Embedding(cfg.num_feature_levels, cfg.hidden_dim)
        self.mask_embed = MLP(cfg.hidden_dim, cfg.hidden_dim, cfg.mask_dim, 3)
        self.post_mask_embed = PooledMaskEmbed(cfg.hidden_dim, cfg.mask_dim, projection_dim, cfg.temperature)
        self.class_embed = nn.Linear(cfg.hidden_dim, 2) if binary_class_head else None

    def _heads(self, output: torch.Tensor, mask_features: torch.Tensor, attn_size: tuple[int, int]) -> dict:
        decoder_output = self.decoder_norm(output).transpose(0, 1)  # B x Q x C
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(decoder_output), mask_features)
        pred = {
            "pred_masks": masks,
            "mask_embed": self.post_mask_embed(decoder_output, mask_features, masks),
        }
        if self.class_embed is not None:
            pred["pred_logits"] = self.class_embed(decoder_output)
        attn = F.interpolate(masks, size=attn_size, mode="bilinear", align_corners=False)
        attn = attn.sigmoid().flatten(2).unsqueeze(1).repeat(1, self.num_heads, 1, 1).flatten(0, 1) < 0.5
        return pred, attn.detach()

    def forward(self, features: list[torch.Tensor], mask_features: torch.Tensor) -> MaskGeneratorOutput:
        """Run the decoder.

        Args:
            features: 3 maps ``BxCxH_lxW_l`` from the pixel decoder, low to high resolution.
            mask_features: ``BxCxH/4xW/4``.
        Returns:
            :class:`MaskGeneratorOutput` of the last layer: ``pred_masks`` (``BxQxH/4xW/4`` logits),
            ``mask_embed`` (``BxQxP``), ``logit_scale`` (0-dim), ``pred_logits`` (``BxQx2``, caption variant
            only; else None) and ``aux_outputs``: the same for the learned queries and layers 1..L-1.
        """
        # 1. flatten the levels: HW x B x C, with sine position encodings and level embeddings
        src, pos, sizes = [], [], []
        for i in range(self.num_feature_levels):
            b, c, h, w = features[i].shape
            sizes.append((h, w))
            pe = sine_position_encoding(b, h, w, c // 2, device=features[i].device, dtype=features[i].dtype)
            pos.append(pe.flatten(2).permute(2, 0, 1))
            src.append((features[i].flatten(2) + self.level_embed.weight[i][None, :, None]).permute(2, 0, 1))
        batch = src[0].shape[1]
        # 2. learned queries: Q x B x C
        query_embed = self.query_embed.weight.unsqueeze(1).repeat(1, batch, 1)
        output = self.query_feat.weight.unsqueeze(1).repeat(1, batch, 1)
        # 3. predictions on the learned queries, then one per layer
        predictions = []
        pred, attn_mask = self._heads(output, mask_features, sizes[0])
        predictions.append(pred)
        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask[torch.where(attn_mask.sum(-1) == attn_mask.shape[-1])] = False
            output = self.transformer_cross_attention_layers[i](
                output, src[level], attn_mask, pos[level], query_embed
            )
            output = self.transformer_self_attention_layers[i](output, query_embed)
            output = self.transformer_ffn_layers[i](output)
            pred, attn_mask = self._heads(output, mask_features, sizes[(i + 1) % self.num_feature_levels])
            predictions.append(pred)
        logit_scale = self.post_mask_embed.scale()
        stages = [MaskGeneratorOutput(logit_scale=logit_scale, **pred) for pred in predictions]
        return dataclasses.replace(stages[-1], aux_outputs=tuple(stages[:-1]))
