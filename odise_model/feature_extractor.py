"""Stable Diffusion v1 as a frozen multi-scale feature extractor, with ODISE's sliding-window tiling.

Three pieces, used in this order by :class:`odise_model.model.ODISE`:

1. :func:`tile_boxes` / :func:`crop_tiles`: the official ``FeatureExtractorBackbone.slide_forward`` windows.
   A padded image ``HxW`` is cut into square windows of side ``c = min(tile_size, H, W)`` with stride ``c``;
   the last row / column is shifted back to end at the border (so windows may overlap). Each window is
   resized (bicubic, no antialias, as torchvision 0.14 did on tensors) to ``tile_size`` before SD.
2. :class:`StableDiffusionTaps`: VAE encoder -> UNet at timestep ``t`` (fixed shared noise) -> VAE decoder on
   diffusers modules, returning the inputs of the configured resnets (8 taps for SD v1). The VAE decoder stops
   after its last tap unless ``full_decode=True`` (the official code decodes the whole image).
3. :class:`FeatureProjections`: one GN bottleneck per tap (to ``dim`` channels), taps resized (nearest) to the
   window's resolution, summed per stride (clamped to [min_stride, max_stride]) into ``s2..s5``;
   :func:`stitch_tiles` writes windows into full-size maps and averages overlaps by a count map.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectionConfig, StableDiffusionConfig
from .layers import BottleneckBlock

__all__ = [
    "tile_boxes",
    "crop_tiles",
    "stitch_tiles",
    "sd_q_sample_coefficients",
    "StableDiffusionTaps",
    "FeatureProjections",
]

Box = tuple[int, int, int, int]  # y1, x1, y2, x2 in padded-image pixels


def tile_boxes(height: int, width: int, tile_size: int) -> list[Box]:
    """Sliding windows of the official ``slide_forward`` (``slide_training=True``) for an ``HxW`` image.

    Window side ``c = min(tile_size, height, width)``, stride ``c``, grid
    ``max(H - c + c - 1, 0) // c + 1`` rows (same for columns); the last window of a row / column ends at
    the border. Returns ``(y1, x1, y2, x2)`` boxes in row-major order, each ``c x c``.
    """
    crop = min(tile_size, height, width)
    h_grids = max(height - crop + crop - 1, 0) // crop + 1
    w_grids = max(width - crop + crop - 1, 0) // crop + 1
    boxes = []
    for h_idx in range(h_grids):
        for w_idx in range(w_grids):
            y2 = min(h_idx * crop + crop, height)
            x2 = min(w_idx * crop + crop, width)
            y1 = max(y2 - crop, 0)
            x1 = max(x2 - crop, 0)
            boxes.append((y1, x1, y2, x2))
    return boxes


def crop_tiles(image: torch.Tensor, boxes: Sequence[Box], tile_size: int) -> torch.Tensor:
    """Cut ``boxes`` out of one ``3xHxW`` image and resize each to ``tile_size`` (bicubic, no antialias).

    Returns ``Nx3xTxT`` with the input's value range (the official path feeds [0, 1]).
    """
    crops = torch.stack([image[:, y1:y2, x1:x2] for (y1, x1, y2, x2) in boxes])
    if crops.shape[-1] != tile_size or crops.shape[-2] != tile_size:
        crops = F.interpolate(
            crops, size=(tile_size, tile_size), mode="bicubic", align_corners=False, antialias=False
        )
    return crops


def stitch_tiles(
    tile_features: dict[str, torch.Tensor],
    boxes: Sequence[Box],
    image_size: tuple[int, int],
    strides: dict[str, int],
) -> dict[str, torch.Tensor]:
    """Write per-window feature maps into full-size maps and average where windows overlap.

    Args:
        tile_features: name -> ``NxCx(c/stride)x(c/stride)`` for the N windows of ONE image.
        boxes: the N windows, as returned by :func:`tile_boxes`.
        image_size: padded image ``(H, W)``; outputs are ``1xCx(H/stride)x(W/stride)``.
        strides: name -> stride.
    """
    height, width = image_size
    out = {}
    for name, feats in tile_features.items():
        stride = strides[name]
        acc = feats.new_zeros((1, feats.shape[1], height // stride, width // stride))
        count = feats.new_zeros((1, 1, height // stride, width // stride))
        for i, (y1, x1, y2, x2) in enumerate(boxes):
            ys, xs = slice(y1 // stride, y2 // stride), slice(x1 // stride, x2 // stride)
            acc[:, :, ys, xs] += feats[i : i + 1]
            count[:, :, ys, xs] += 1
        if bool((count == 0).any()):
            raise AssertionError("tiling left feature cells uncovered")  # internal invariant
        out[name] = acc / count
    return out


def sd_q_sample_coefficients(cfg: StableDiffusionConfig) -> tuple[float, float]:
    """``(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))`` of the ``scaled_linear`` schedule at ``cfg.timestep``.

    Computed in float64 like the official GLIDE-style diffusion (``ldm_linear``: betas are the squares of a
    linspace between ``sqrt(beta_start)`` and ``sqrt(beta_end)``); at t = 0: 0.99957 and 0.02915.
    """
    n = cfg.num_train_timesteps
    start, end = math.sqrt(cfg.beta_start), math.sqrt(cfg.beta_end)
    betas = [(start + (end - start) * i / (n - 1)) ** 2 for i in range(n)]
    alpha_bar = 1.0
    for beta in betas[: cfg.timestep + 1]:
        alpha_bar *= 1.0 - beta
    return math.sqrt(alpha_bar), math.sqrt(1.0 - alpha_bar)


class StableDiffusionTaps(nn.Module):
    """Frozen SD v1 (diffusers ``AutoencoderKL`` + ``UNet2DConditionModel``) returning intermediate features.

    The UNet config must use ``class_embed_type="identity"``: the implicit captioner's time conditioning is
    passed as ``class_labels`` and thereby added to the output of ``unet.time_embedding``, exactly where
    the official code adds ``cond_emb``. This adds no parameters.
    """

    def __init__(
        self, *, vae: nn.Module, unet: nn.Module, cfg: StableDiffusionConfig, tile_size: int
    ) -> None:
        super().__init__()
        self.vae = vae
        self.unet = unet
        self.cfg = cfg
        self.encoder_taps = [tuple(t) for t in cfg.encoder_taps]
        self.unet_taps = [tuple(t) for t in cfg.unet_taps]
        self.decoder_taps = [tuple(t) for t in cfg.decoder_taps]
        self.sqrt_alpha_bar, self.sqrt_one_minus_alpha_bar = sd_q_sample_coefficients(cfg)

        # Fixed noise shared by all images, drawn once on the CPU (official: seed 42, 1x4x64x64 for 512 tiles).
        latent_channels = int(vae.config.latent_channels)
        latent_size = tile_size // 8
        generator = torch.Generator(device="cpu").manual_seed(cfg.noise_seed)
        noise = torch.randn(1, latent_channels, latent_size, latent_size, generator=generator, device="cpu")
        self.register_buffer("shared_noise", noise, persistent=False)

        self._captured: dict[tuple[int, int], torch.Tensor] = {}
        for block, res in self.unet_taps:
            self.unet.up_blocks[block].resnets[res].register_forward_pre_hook(self._make_hook((block, res)))

    def _make_hook(self, key: tuple[int, int]):
        def hook(_module, args):
            self._captured[key] = args[0]

        return hook

    # --- channel and stride bookkeeping -------------------------------------------------------------
    @property
    def feature_channels(self) -> list[int]:
        """Channels of each tap, in output order (encoder, UNet, decoder)."""
        enc = [self.vae.encoder.down_blocks[b].resnets[r].in_channels for b, r in self.encoder_taps]
        unet = [self.unet.up_blocks[b].resnets[r].in_channels for b, r in self.unet_taps]
        dec = [self.vae.decoder.up_blocks[b].resnets[r].in_channels for b, r in self.decoder_taps]
        return enc + unet + dec

    @property
    def feature_strides(self) -> list[int]:
        """Native stride of each tap relative to the SD input (VAE latent stride 8)."""
        n_unet_levels = len(self.unet.up_blocks)
        enc = [2**b for b, _ in self.encoder_taps]
        unet = [8 * 2 ** (n_unet_levels - 1 - b) for b, _ in self.unet_taps]
        dec = [8 // 2**b for b, _ in self.decoder_taps]
        return enc + unet + dec

    # --- forward --------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """VAE encoder. ``x``: ``Nx3xSxS`` in [-1, 1]. Returns (scaled posterior mean ``Nx4x(S/8)x(S/8)``, taps)."""
        enc = self.vae.encoder
        taps = {}
        h = enc.conv_in(x)
        for b, block in enumerate(enc.down_blocks):
            for r, resnet in enumerate(block.resnets):
                if (b, r) in self.encoder_taps:
                    taps[(b, r)] = h
                h = resnet(h, None)
            if block.downsamplers is not None:
                for down in block.downsamplers:
                    h = down(h)
        h = enc.mid_block(h)
        h = enc.conv_out(enc.conv_act(enc.conv_norm_out(h)))
        if getattr(self.vae, "quant_conv", None) is not None:
            h = self.vae.quant_conv(h)
        mean = h[:, : h.shape[1] // 2]
        return mean * self.cfg.scaling_factor, [taps[k] for k in self.encoder_taps]

    def decode(self, latent: torch.Tensor, *, full_decode: bool = False) -> list[torch.Tensor]:
        """VAE decoder on the clean latent, stopping after the last tap unless ``full_decode``."""
        dec = self.vae.decoder
        taps = {}
        last = max(self.decoder_taps)
        z = latent / self.cfg.scaling_factor
        if getattr(self.vae, "post_quant_conv", None) is not None:
            z = self.vae.post_quant_conv(z)
        h = dec.conv_in(z)
        h = dec.mid_block(h, None)
        for b, block in enumerate(dec.up_blocks):
            for r, resnet in enumerate(block.resnets):
                if (b, r) in self.decoder_taps:
                    taps[(b, r)] = h
                    if (b, r) == last and not full_decode:
                        return [taps[k] for k in self.decoder_taps]
                h = resnet(h, None)
            if block.upsamplers is not None:
                for up in block.upsamplers:
                    h = up(h)
        dec.conv_out(dec.conv_act(dec.conv_norm_out(h)))  # official work, result unused
        return [taps[k] for k in self.decoder_taps]

    def forward(
        self,
        images: torch.Tensor,
        context: torch.Tensor,
        time_cond: torch.Tensor | None,
        *,
        full_decode: bool = False,
    ) -> list[torch.Tensor]:
        """All taps for a batch of SD-sized tiles.

        Args:
            images: ``Nx3xSxS`` in [0, 1] (S = tile size, a multiple of 64).
            context: ``NxLxD`` cross-attention context (implicit-caption tokens).
            time_cond: ``NxT`` added to the UNet time embedding, or None.
            full_decode: run the VAE decoder to the end (official behaviour; same taps, more work).
        Returns:
            8 tensors ``NxC_ixHxW`` (encoder taps, UNet taps, decoder taps), strides as ``feature_strides``.
        """
        # 1. VAE encoder: deterministic posterior mean, scaled
        latent, enc_taps = self.encode(images * 2.0 - 1.0)
        # 2. q_sample at t with the fixed shared noise
        noise = self.shared_noise.to(device=latent.device, dtype=latent.dtype)
        if noise.shape[-2:] != latent.shape[-2:]:
            noise = F.interpolate(noise, size=latent.shape[-2:], mode="bicubic", align_corners=False)
        noisy = latent * self.sqrt_alpha_bar + noise * self.sqrt_one_minus_alpha_bar
        # 3. UNet; taps captured by forward pre-hooks on the up-path resnets
        batch = latent.shape[0]
        timesteps = torch.full((batch,), self.cfg.timestep, device=latent.device, dtype=torch.long)
        self._captured = {}
        class_labels = time_cond.to(latent.dtype) if time_cond is not None else None
        if class_labels is None and getattr(self.unet, "class_embedding", None) is not None:
            class_labels = latent.new_zeros((batch, self.unet.config.block_out_channels[0] * 4))
        self.unet(noisy, timesteps, encoder_hidden_states=context.to(latent.dtype), class_labels=class_labels)
        unet_taps = [self._captured[k] for k in self.unet_taps]
        self._captured = {}
        # 4. VAE decoder of the clean latent
        dec_taps = self.decode(latent, full_decode=full_decode)
        return [*enc_taps, *unet_taps, *dec_taps]


class FeatureProjections(nn.Module):
    """Per-tap GN bottleneck projections, grouped and summed per (clamped) stride into ``s{log2 stride}``.

    Parameters live at ``projections.{i}.0.*`` (one ``nn.Sequential`` per tap, as detectron2's ``make_stage``).
    """

    def __init__(self, *, in_channels: Sequence[int], strides: Sequence[int], cfg: ProjectionConfig) -> None:
        super().__init__()
        self.projections = nn.ModuleList(
            nn.Sequential(
                BottleneckBlock(
                    c, cfg.dim, bottleneck_channels=cfg.bottleneck_dim, norm_groups=cfg.norm_groups
                )
            )
            for c in in_channels
        )
        clamped = [min(max(s, cfg.min_stride), cfg.max_stride) for s in strides]
        self.groups: dict[str, list[int]] = {}
        self.strides: dict[str, int] = {}
        for stride in sorted(set(clamped)):
            name = f"s{int(math.log2(stride))}"
            self.groups[name] = [i for i, s in enumerate(clamped) if s == stride]
            self.strides[name] = stride
        self.dim = cfg.dim

    def forward(self, taps: Sequence[torch.Tensor], window: int) -> dict[str, torch.Tensor]:
        """Project the taps of N windows of side ``window`` (before the resize to the SD tile size).

        Each tap is resized (nearest) to ``window / stride`` first, restoring the window's resolution.
        Returns name -> ``Nx dim x (window/stride) x (window/stride)``.
        """
        out = {}
        for name, indices in self.groups.items():
            size = (window // self.strides[name], window // self.strides[name])
            acc = None
            for idx in indices:
                tap = taps[idx]
                if tap.shape[-2:] != size:
                    tap = F.interpolate(tap, size=size, mode="nearest")
                projected = self.projections[idx](tap)
                acc = projected if acc is None else acc + projected
            out[name] = acc
        return out
