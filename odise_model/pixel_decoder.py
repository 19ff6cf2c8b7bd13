"""Mask2Former's multi-scale deformable-attention pixel decoder, in pure PyTorch (``grid_sample``).

No compiled op: :func:`ms_deform_attn` samples every level with ``F.grid_sample(bilinear, zeros padding,
align_corners=False)``, which is what the official CUDA kernel computes (``loc * size - 0.5`` bilinear
sampling, zero outside). Parameter names follow ``MSDeformAttnPixelDecoder`` so official keys map by prefix.

Data flow (``forward``): s3, s4, s5 -> 1x1 conv + GN (``input_proj``, ordered s5, s4, s3) -> 6 encoder layers
of multi-scale deformable self-attention -> FPN top-down to s2 (``adapter_1`` lateral, ``layer_1`` output)
-> ``mask_features`` (1x1 conv) at stride 4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import PixelDecoderConfig
from .layers import Conv2dNorm, c2_xavier_fill, sine_position_encoding

__all__ = ["ms_deform_attn", "MSDeformAttn", "PixelDecoder"]


def ms_deform_attn(
    value: torch.Tensor,
    spatial_shapes: Sequence[tuple[int, int]],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Multi-scale deformable attention core.

    Args:
        value: ``N x S x M x D`` (S = sum of H_l*W_l over levels, M heads, D = channels per head).
        spatial_shapes: ``[(H_l, W_l)]`` for the L levels, in the order they are concatenated in ``value``.
        sampling_locations: ``N x Lq x M x L x P x 2`` normalised (x, y) in [0, 1] (may fall outside).
        attention_weights: ``N x Lq x M x L x P`` (softmax over L*P already applied).
    Returns:
        ``N x Lq x (M*D)``.
    """
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    value_list = value.split([h * w for h, w in spatial_shapes], dim=1)
    grids = 2 * sampling_locations - 1
    sampled = []
    for lvl, (h, w) in enumerate(spatial_shapes):
        value_l = value_list[lvl].flatten(2).transpose(1, 2).reshape(n * m, d, h, w)
        grid_l = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)  # (N*M) x Lq x P x 2
        sampled.append(
            F.grid_sample(value_l, grid_l, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    weights = attention_weights.transpose(1, 2).reshape(n * m, 1, lq, levels * points)
    out = (torch.stack(sampled, dim=-2).flatten(-2) * weights).sum(-1).view(n, m * d, lq)
    return out.transpose(1, 2).contiguous()


class MSDeformAttn(nn.Module):
    """Deformable attention over L feature levels with P sampling points per head and level."""

    def __init__(self, d_model: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} must be divisible by n_heads {n_heads}")
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = (grid / grid.abs().max(-1, keepdim=True)[0]).view(self.n_heads, 1, 1, 2)
        grid = grid.repeat(1, self.n_levels, self.n_points, 1)
        for i in range(self.n_points):
            grid[:, :, i, :] *= i + 1
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.view(-1))
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        value_input: torch.Tensor,
        spatial_shapes: Sequence[tuple[int, int]],
    ) -> torch.Tensor:
        """``query`` ``NxLqxC``, ``reference_points`` ``NxLqxLx2`` in [0, 1], ``value_input`` ``NxSxC`` -> ``NxLqxC``."""
        n, lq, _ = query.shape
        value = self.value_proj(value_input).view(
            n, value_input.shape[1], self.n_heads, self.d_model // self.n_heads
        )
        offsets = self.sampling_offsets(query).view(n, lq, self.n_heads, self.n_levels, self.n_points, 2)
        weights = self.attention_weights(query).view(n, lq, self.n_heads, self.n_levels * self.n_points)
        weights = F.softmax(weights, -1).view(n, lq, self.n_heads, self.n_levels, self.n_points)
        shapes = torch.as_tensor(spatial_shapes, dtype=query.dtype, device=query.device)
        normalizer = torch.stack([shapes[:, 1], shapes[:, 0]], -1)  # (W, H) per level
        locations = (
            reference_points[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        )
        return self.output_proj(ms_deform_attn(value, spatial_shapes, locations, weights))


class DeformableEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention + FFN (ReLU)."""

    def __init__(self, d_model: int, ffn_dim: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes):
        src = self.norm1(src + self.self_attn(src + pos, reference_points, src, spatial_shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoder(nn.Module):
    """``MSDeformAttnTransformerEncoderOnly``: level embeddings + N encoder layers (params at ``encoder.layers.i``)."""

    def __init__(
        self, *, d_model: int, ffn_dim: int, num_layers: int, n_levels: int, n_heads: int, n_points: int
    ):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(n_levels, d_model))
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(
            DeformableEncoderLayer(d_model, ffn_dim, n_levels, n_heads, n_points) for _ in range(num_layers)
        )
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for layer in self.encoder.layers:
            layer.self_attn._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def reference_points(
        spatial_shapes: Sequence[tuple[int, int]], batch: int, device, dtype
    ) -> torch.Tensor:
        """Pixel centres of every level, normalised to [0, 1]: ``B x S x L x 2`` (x, y), no padding."""
        refs = []
        for h, w in spatial_shapes:
            ref_y, ref_x = torch.meshgrid(
                torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                indexing="ij",
            )
            refs.append(torch.stack((ref_x.reshape(-1) / w, ref_y.reshape(-1) / h), -1))
        ref = torch.cat(refs, 0)[None, :, None, :].expand(batch, -1, len(spatial_shapes), -1)
        return ref.to(dtype)

    def forward(self, srcs: Sequence[torch.Tensor], pos_embeds: Sequence[torch.Tensor]):
        """``srcs``/``pos_embeds``: per level ``BxCxH_lxW_l`` (low to high resolution) -> ``BxSxC``, shapes."""
        spatial_shapes = [(int(s.shape[2]), int(s.shape[3])) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], 1)
        pos = torch.cat(
            [
                p.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1)
                for lvl, p in enumerate(pos_embeds)
            ],
            1,
        )
        reference_points = self.reference_points(spatial_shapes, src.shape[0], src.device, src.dtype)
        for layer in self.encoder.layers:
            src = layer(src, pos, reference_points, spatial_shapes)
        return src, spatial_shapes


class PixelDecoder(nn.Module):
    """``MSDeformAttnPixelDecoder`` with one extra FPN level (s2) and mask features at ``common_stride``.

    Args:
        in_channels: channels of every input feature (``s2..s5`` -> 512 officially).
        in_strides: name -> stride of every input feature.
        cfg: :class:`PixelDecoderConfig`.
    """

    def __init__(
        self, *, in_channels: dict[str, int], in_strides: dict[str, int], cfg: PixelDecoderConfig
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.in_features = sorted(in_strides, key=lambda k: in_strides[k])  # s2 .. s5
        self.transformer_in_features = sorted(
            cfg.transformer_in_features, key=lambda k: in_strides[k]
        )  # s3..s5
        levels = len(self.transformer_in_features)
        self.input_proj = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(in_channels[name], cfg.conv_dim, kernel_size=1),
                nn.GroupNorm(cfg.norm_groups, cfg.conv_dim),
            )
            for name in self.transformer_in_features[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        self.transformer = DeformableEncoder(
            d_model=cfg.conv_dim,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            n_levels=levels,
            n_heads=cfg.num_heads,
            n_points=cfg.num_points,
        )
        self.mask_features = nn.Conv2d(cfg.conv_dim, cfg.mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

        min_stride = min(in_strides[k] for k in self.transformer_in_features)
        self.num_fpn_levels = int(math.log2(min_stride) - math.log2(cfg.common_stride))
        self.fpn_features = self.in_features[: self.num_fpn_levels]
        for idx, name in enumerate(self.fpn_features):
            lateral = Conv2dNorm(
                in_channels[name],
                cfg.conv_dim,
                kernel_size=1,
                bias=False,
                norm=nn.GroupNorm(cfg.norm_groups, cfg.conv_dim),
            )
            output = Conv2dNorm(
                cfg.conv_dim,
                cfg.conv_dim,
                kernel_size=3,
                padding=1,
                bias=False,
                norm=nn.GroupNorm(cfg.norm_groups, cfg.conv_dim),
                activation=F.relu,
            )
            c2_xavier_fill(lateral)
            c2_xavier_fill(output)
            self.add_module(f"adapter_{idx + 1}", lateral)
            self.add_module(f"layer_{idx + 1}", output)
        self.num_outputs = 3  # Mask2Former always feeds 3 scales to the transformer decoder

    def forward(self, features: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``features``: name -> ``BxCxH_sxW_s``.

        Returns ``(mask_features B x mask_dim x H/4 x W/4, [3 multi-scale maps, low to high resolution])``.
        Runs in float32 (deformable attention has no half-precision path in the official model).
        """
        with torch.autocast(device_type=next(iter(features.values())).device.type, enabled=False):
            dtype = self.mask_features.weight.dtype
            # 1. input projections and position encodings, low to high resolution
            srcs, pos = [], []
            for idx, name in enumerate(self.transformer_in_features[::-1]):
                x = features[name].to(dtype)
                srcs.append(self.input_proj[idx](x))
                b, _, h, w = x.shape
                pos.append(
                    sine_position_encoding(b, h, w, self.cfg.conv_dim // 2, device=x.device, dtype=dtype)
                )
            # 2. deformable encoder over the concatenated levels
            memory, shapes = self.transformer(srcs, pos)
            batch = memory.shape[0]
            outs = []
            for tokens, (h, w) in zip(memory.split([h * w for h, w in shapes], dim=1), shapes):
                outs.append(tokens.transpose(1, 2).reshape(batch, -1, h, w))
            # 3. extra FPN levels, top-down
            for idx, name in enumerate(self.fpn_features[::-1]):
                level = self.num_fpn_levels - idx
                lateral = getattr(self, f"adapter_{level}")(features[name].to(dtype))
                y = lateral + F.interpolate(
                    outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False
                )
                outs.append(getattr(self, f"layer_{level}")(y))
            return self.mask_features(outs[-1]), outs[: self.num_outputs]
