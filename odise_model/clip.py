"""The ONE frozen CLIP (open_clip, ViT-L/14-336 ``openai`` officially) used three ways:

* image embedding of each SD tile for the implicit captioner (:meth:`SharedCLIP.encode_tiles`),
* text embeddings of the vocabulary for both classification branches (:meth:`SharedCLIP.encode_text`),
* MaskCLIP mask embeddings, one ViT pass per image with one extra token per mask (:meth:`SharedCLIP.mask_embed`).

The official code builds three identical copies; sharing one saves ~1.7 GB of weights in fp32.
Weights are in open_clip's OpenAI layout (``visual.transformer.resblocks.N.attn.in_proj_weight`` ...),
held at ``model.*``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ClipConfig

__all__ = ["SharedCLIP"]


class SharedCLIP(nn.Module):
    """Frozen open_clip ``CLIP`` built from a :class:`ClipConfig` (no download, random weights until loaded)."""

    def __init__(self, cfg: ClipConfig) -> None:
        super().__init__()
        import open_clip

        self.cfg = cfg
        self.model = open_clip.CLIP(
            embed_dim=cfg.embed_dim,
            vision_cfg=open_clip.model.CLIPVisionCfg(**cfg.vision_cfg),
            text_cfg=open_clip.model.CLIPTextCfg(**cfg.text_cfg),
            quick_gelu=cfg.quick_gelu,
        )
        self.register_buffer(
            "pixel_mean", torch.tensor(cfg.mean, device="cpu").view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "pixel_std", torch.tensor(cfg.std, device="cpu").view(1, 3, 1, 1), persistent=False
        )
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> SharedCLIP:  # always frozen, always in eval mode
        return super().train(False)

    @property
    def embed_dim(self) -> int:
        return int(self.cfg.embed_dim)

    @property
    def image_size(self) -> int:
        return self.cfg.image_size

    @property
    def logit_scale(self) -> torch.Tensor:
        """CLIP's own temperature, ``min(exp(logit_scale), 100)``."""
        return torch.clamp(self.model.logit_scale.exp(), max=100)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.pixel_mean.to(x)) / self.pixel_std.to(x)

    # --- captioner -----------------------------------------------------------------------------------
    def encode_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """Projected CLS embeddings (not L2-normalised) of square tiles ``Nx3xSxS`` in [0, 1] -> ``NxD``.

        Preprocessing as open_clip's eval transform without ToTensor: resize to ``image_size`` (bicubic,
        no antialias), center crop (a no-op for squares), CLIP mean/std.
        """
        size = self.image_size
        if tiles.shape[-1] != size or tiles.shape[-2] != size:
            tiles = F.interpolate(
                tiles, size=(size, size), mode="bicubic", align_corners=False, antialias=False
            )
        x = self._normalize(tiles).to(self.model.visual.conv1.weight.dtype)
        return self.model.encode_image(x)

    # --- text ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """CLIP text embeddings (EOT token @ text_projection, not normalised), ``len(texts) x D`` float32."""
        import open_clip

        device = self.model.token_embedding.weight.device
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = open_clip.tokenize(
                list(texts[start : start + batch_size]), context_length=self.cfg.context_length
            )
            out.append(self.model.encode_text(tokens.to(device)).float())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=device)

    # --- MaskCLIP -------------------------------------------------------------------------------------
    def mask_embed(self, images: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
        """MaskCLIP embeddings of Q masks per image with one ViT pass per image.

        Args:
            images: ``Bx3xHxW`` in [0, 1] (any size; bilinearly resized to the CLIP input, aspect not kept).
            mask_logits: ``BxQxhxw`` mask logits (any size; bilinearly resized to the CLIP input).
        Returns:
            ``BxQxD`` projected mask-token outputs. Mask tokens are copies of the CLS token after ``ln_pre``;
            no token attends to mask tokens; mask token q attends to CLS and to patches whose max-pooled
            mask probability is >= 0.5.
        """
        visual = self.model.visual
        size = self.image_size
        dtype = visual.conv1.weight.dtype
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", align_corners=False)
        masks = F.interpolate(mask_logits.float(), size=(size, size), mode="bilinear", align_corners=False)
        batch, num_masks = masks.shape[:2]

        # 1. patch-level masks: max-pool of probabilities over each patch; True = masked out
        patch = visual.conv1.kernel_size
        patch_masked = F.max_pool2d(masks.sigmoid(), kernel_size=patch, stride=visual.conv1.stride) < 0.5
        patch_masked = patch_masked.flatten(2)  # B x Q x P
        # 2. tokens: [Q mask tokens, CLS, P patches]
        x = visual.conv1(self._normalize(images).to(dtype)).flatten(2).transpose(1, 2)  # B x P x W
        cls = visual.class_embedding.to(dtype).view(1, 1, -1).expand(batch, 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(dtype)
        x = visual.ln_pre(x)
        x = torch.cat([x[:, :1].expand(-1, num_masks, -1), x], dim=1)  # B x (Q+1+P) x W
        # 3. additive attention mask (-inf = blocked); open_clip casts masks to float, so no bool masks
        total = x.shape[1]
        num_patches = patch_masked.shape[-1]
        blocked = torch.zeros(batch, total, total, dtype=torch.bool, device=x.device)
        blocked[:, :, :num_masks] = True
        blocked[:, :num_masks, total - num_patches :] = patch_masked
        heads = visual.transformer.resblocks[0].attn.num_heads
        attn_mask = torch.zeros(blocked.shape, dtype=x.dtype, device=x.device).masked_fill(
            blocked, float("-inf")
        )
        attn_mask = attn_mask.repeat_interleave(heads, dim=0)  # (B*heads) x L x L
        # 4. transformer, then ln_post + projection of the mask tokens
        x = visual.transformer(x, attn_mask=attn_mask)
        x = visual.ln_post(x[:, :num_masks])
        if visual.proj is not None:
            x = x @ visual.proj
        return x
