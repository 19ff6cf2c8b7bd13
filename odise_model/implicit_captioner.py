"""ODISE's implicit captioner: a CLIP image embedding becomes the text conditioning of Stable Diffusion.

``context = uncond + tanh(alpha_cond) * PositionalLinear(clip_embed)`` (77 tokens, added to the embedding of
the empty prompt) and ``time_cond = tanh(alpha_cond_time_embed) * PositionalLinear_time(clip_embed)``
(added to the UNet time embedding). Both gates start at zero, so an untrained captioner reproduces the
empty-prompt conditioning exactly.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PositionalLinear", "ImplicitCaptioner"]


class PositionalLinear(nn.Module):
    """``Linear(in, out)`` broadcast over ``seq_len`` positions plus a learned positional embedding.

    ``NxIn`` -> ``N x seq_len x Out``. Positional embedding initialised with a truncated normal (std 0.02).
    """

    def __init__(self, in_features: int, out_features: int, seq_len: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.positional_embedding = nn.Parameter(torch.zeros(1, seq_len, out_features))
        nn.init.trunc_normal_(self.positional_embedding, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).unsqueeze(1) + self.positional_embedding


class ImplicitCaptioner(nn.Module):
    """Trainable MLP + gates mapping a CLIP image embedding to SD conditioning.

    Args:
        clip_dim: width of the CLIP image embedding (768 for ViT-L/14-336).
        context_len, context_dim: SD text context shape (77 x 768 for SD v1).
        time_embed_dim: width of the UNet time embedding (1280 for SD v1).
    Buffers:
        uncond_context: ``1 x context_len x context_dim``, SD's text-encoder embedding of "" (set with
            :meth:`set_uncond_context` once SD's text encoder is loaded; not part of checkpoints).
    """

    def __init__(self, *, clip_dim: int, context_len: int, context_dim: int, time_embed_dim: int) -> None:
        super().__init__()
        self.clip_project = PositionalLinear(clip_dim, context_dim, context_len)
        self.alpha_cond = nn.Parameter(torch.zeros(1, context_len, context_dim))
        self.time_embed_project = PositionalLinear(clip_dim, time_embed_dim, 1)
        self.alpha_cond_time_embed = nn.Parameter(torch.zeros(time_embed_dim))
        self.register_buffer(
            "uncond_context", torch.zeros(1, context_len, context_dim, device="cpu"), persistent=False
        )

    @torch.no_grad()
    def set_uncond_context(self, embedding: torch.Tensor) -> None:
        """Store the empty-prompt embedding ``1 x context_len x context_dim``."""
        if tuple(embedding.shape) != tuple(self.uncond_context.shape):
            raise ValueError(
                f"empty-prompt embedding has shape {tuple(embedding.shape)}, expected {tuple(self.uncond_context.shape)}"
            )
        self.uncond_context = (
            embedding.detach().to(self.uncond_context.device, self.uncond_context.dtype).clone()
        )

    def forward(self, clip_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``clip_embed``: ``NxD`` projected CLIP image embeddings (not normalised).

        Returns ``(context N x L x C, time_cond N x T)``.
        """
        prefix = self.clip_project(clip_embed)
        context = self.uncond_context.to(prefix.dtype) + torch.tanh(self.alpha_cond) * prefix
        time_cond = (torch.tanh(self.alpha_cond_time_embed) * self.time_embed_project(clip_embed))[:, 0]
        return context, time_cond
