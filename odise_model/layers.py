"""Small building blocks shared by several components (no component imports another; all import this).

Parameter names follow detectron2 / Mask2Former (``conv.weight``, ``conv.norm.weight``, ``layers.0.weight``)
so the official checkpoint keys map onto ours with prefix renames only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Conv2dNorm", "BottleneckBlock", "MLP", "sine_position_encoding", "c2_xavier_fill", "c2_msra_fill"]


def c2_xavier_fill(module: nn.Module) -> None:
    """detectron2's Caffe2-style Xavier fill: kaiming uniform with a=1, zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


def c2_msra_fill(module: nn.Module) -> None:
    """detectron2's Caffe2-style MSRA fill: kaiming normal (fan_out, relu), zero bias."""
    nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    if module.bias is not None:
        nn.init.constant_(module.bias, 0)


class Conv2dNorm(nn.Conv2d):
    """``nn.Conv2d`` followed by an optional norm and activation (detectron2 ``layers.Conv2d``).

    The conv's own parameters stay at ``weight`` / ``bias`` and the norm lives at ``norm``, as in detectron2.
    """

    def __init__(self, *args, norm: nn.Module | None = None, activation=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.norm = norm
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class BottleneckBlock(nn.Module):
    """detectron2 ResNet bottleneck (1x1 -> 3x3 -> 1x1, GroupNorm after each conv, ReLU, projection shortcut).

    Input ``BxCinxHxW`` -> output ``BxCoutxHxW`` (stride 1). The shortcut is a 1x1 conv + norm only when
    ``Cin != Cout``; convs have no bias.
    """

    def __init__(
        self, in_channels: int, out_channels: int, *, bottleneck_channels: int, norm_groups: int
    ) -> None:
        super().__init__()

        def gn(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(norm_groups, c)

        if in_channels != out_channels:
            self.shortcut = Conv2dNorm(
                in_channels, out_channels, kernel_size=1, bias=False, norm=gn(out_channels)
            )
        else:
            self.shortcut = None
        self.conv1 = Conv2dNorm(
            in_channels, bottleneck_channels, kernel_size=1, bias=False, norm=gn(bottleneck_channels)
        )
        self.conv2 = Conv2dNorm(
            bottleneck_channels,
            bottleneck_channels,
            kernel_size=3,
            padding=1,
            bias=False,
            norm=gn(bottleneck_channels),
        )
        self.conv3 = Conv2dNorm(
            bottleneck_channels, out_channels, kernel_size=1, bias=False, norm=gn(out_channels)
        )
        for layer in (self.conv1, self.conv2, self.conv3, self.shortcut):
            if layer is not None:
                c2_msra_fill(layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x))
        out = F.relu(self.conv2(out))
        out = self.conv3(out)
        shortcut = self.shortcut(x) if self.shortcut is not None else x
        return F.relu(out + shortcut)


class MLP(nn.Module):
    """Multi-layer perceptron with ReLU between layers (Mask2Former ``MLP``); params at ``layers.{i}``."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(
            nn.Linear(n, k) for n, k in zip([input_dim, *hidden], [*hidden, output_dim])
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def sine_position_encoding(
    batch: int,
    height: int,
    width: int,
    num_pos_feats: int,
    *,
    device,
    dtype=torch.float32,
    temperature: float = 10000.0,
) -> torch.Tensor:
    """DETR / Mask2Former normalised sine position encoding (no padding mask).

    Returns ``Bx(2*num_pos_feats)xHxW``: first ``num_pos_feats`` channels encode y, the rest x, each as
    interleaved sin/cos of ``(cumsum / last) * 2pi / temperature^(2*(i//2)/num_pos_feats)``.
    """
    eps = 1e-6
    scale = 2 * math.pi
    y_embed = (
        torch.arange(1, height + 1, dtype=torch.float32, device=device)
        .view(1, height, 1)
        .expand(batch, height, width)
    )
    x_embed = (
        torch.arange(1, width + 1, dtype=torch.float32, device=device)
        .view(1, 1, width)
        .expand(batch, height, width)
    )
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    return pos.to(dtype)
