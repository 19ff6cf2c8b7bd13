"""The one place where ODISE components are sized and wired from a config, and where weights are attached.

``build_odise("tiny")`` gives a seeded random model (tests, plumbing checks);
``build_odise("odise_label_coco", pretrained=True)`` or with explicit ``checkpoint=`` / ``sd_weights=`` /
``clip_weights=`` sources gives the official weights. :func:`materialize` attaches them, using the loader
modules, none of which imports this one: :mod:`~odise_model.weights_sources` (where files come from),
:mod:`~odise_model.safe_load` (reading without running code), :mod:`~odise_model.sd_convert` (SD's key map)
and :mod:`~odise_model.checkpoint` (ODISE's key map, strict loading, saving). With weights, Stable
Diffusion and CLIP are first built on the ``meta`` device (no memory) and their tensors are then assigned from
memory-mapped files one at a time (cast to ``dtype`` on the way, file pages released after each copy), so
building the official-size model peaks near the size of the model itself in host memory, never model + files
(measured in ``tests/test_checkpoint_full_size.py``).
"""

from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from .checkpoint import load_clip_weights, load_odise_checkpoint
from .classifier import OpenVocabHead
from .clip import SharedCLIP
from .config import ODISEConfig, load_config
from .feature_extractor import FeatureProjections, StableDiffusionTaps
from .implicit_captioner import ImplicitCaptioner
from .model import ODISE
from .pixel_decoder import PixelDecoder
from .sd_convert import empty_prompt_embedding, load_sd_part, load_sd_text_encoder, read_stable_diffusion
from .transformer_decoder import TransformerDecoder
from .vocabulary import load_vocabulary
from .weights_sources import Located, WeightLoader, WeightSources

__all__ = ["build_odise", "build_components", "build_sd_text_encoder", "materialize", "parse_dtype"]


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """``None``, a torch dtype, or one of ``fp32 / float32 / bf16 / bfloat16 / fp16 / float16`` (float32 -> None)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return None if dtype in (None, torch.float32) else dtype
    names = {
        "fp32": None,
        "float32": None,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
    }
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
    return names[dtype]


def build_sd_text_encoder(cfg: ODISEConfig):
    """SD's CLIP text encoder (transformers ``CLIPTextModel``) from the config, random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**cfg.stable_diffusion.text_encoder)).eval()


def build_components(cfg: ODISEConfig, *, meta_sd: bool = False, meta_clip: bool = False) -> ODISE:
    """Construct every component with the sizes of ``cfg`` (random initialisation).

    ``meta_sd`` / ``meta_clip`` build Stable Diffusion / CLIP on the ``meta`` device (no memory) because their
    weights will be assigned from files; the trainable parts are always real tensors.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    sd_cfg = cfg.stable_diffusion
    if sd_cfg.unet.get("class_embed_type") != "identity":
        raise ValueError(
            "stable_diffusion.unet.class_embed_type must be 'identity' (carries the captioner's time conditioning)"
        )
    with torch.device("meta") if meta_clip else nullcontext():
        clip = SharedCLIP(cfg.clip)
    with torch.device("meta") if meta_sd else nullcontext():
        vae = AutoencoderKL(**sd_cfg.vae)
        unet = UNet2DConditionModel(**sd_cfg.unet)
        sd = StableDiffusionTaps(vae=vae, unet=unet, cfg=sd_cfg, tile_size=cfg.input.tile_size)
    sd.requires_grad_(False)
    sd.eval()
    captioner = ImplicitCaptioner(
        clip_dim=cfg.clip.embed_dim,
        context_len=int(sd_cfg.text_encoder.get("max_position_embeddings", 77)),
        context_dim=int(unet.config.cross_attention_dim),
        time_embed_dim=int(unet.time_embedding.linear_2.out_features),
    )
    projections = FeatureProjections(
        in_channels=sd.feature_channels, strides=sd.feature_strides, cfg=cfg.projection
    )
    in_channels = {name: cfg.projection.dim for name in projections.strides}
    pixel_decoder = PixelDecoder(
        in_channels=in_channels, in_strides=projections.strides, cfg=cfg.pixel_decoder
    )
    decoder = TransformerDecoder(
        in_channels=cfg.pixel_decoder.conv_dim,
        cfg=cfg.transformer_decoder,
        projection_dim=cfg.classifier.projection_dim,
        binary_class_head=cfg.classifier.kind == "caption",
    )
    head = OpenVocabHead(
        kind=cfg.classifier.kind,
        clip_dim=cfg.clip.embed_dim,
        projection_dim=cfg.classifier.projection_dim,
        num_train_classes=len(load_vocabulary(cfg.classifier.train_vocabulary)),
        eos_coef=cfg.classifier.eos_coef,
    )
    return ODISE(
        config=cfg,
        clip=clip,
        captioner=captioner,
        sd=sd,
        projections=projections,
        pixel_decoder=pixel_decoder,
        decoder=decoder,
        head=head,
    )


def build_odise(
    config: str | os.PathLike | ODISEConfig = "tiny",
    *,
    checkpoint: str | None = None,
    sd_weights: str | None = None,
    clip_weights: str | None = None,
    pretrained: bool = False,
    offline: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    storage_options: dict | None = None,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
    random_weights: bool = False,
) -> ODISE:
    """Build an ODISE model.

    Args:
        config: ``"tiny"``, ``"odise_label_coco"``, ``"odise_caption_coco"``, a JSON path or an
            :class:`ODISEConfig`.
        checkpoint: ODISE weights: a release name (``"odise_label_coco_50e"``), local path or fsspec URL
            (s3://, gs://, https://); official layout ``{"model": state_dict}``.
        sd_weights: Stable Diffusion v1.3: ``"sd-v1-3"`` (official file), a single-file ``.ckpt`` /
            ``.safetensors`` path or URL, a diffusers folder or a hub id.
        clip_weights: CLIP ViT-L/14-336: ``"openai"`` (open_clip's tag) or a file in the OpenAI layout.
        pretrained: fill every source left as None with the official one for this variant.
        offline: never touch the network (default: ``$ODISE_OFFLINE`` / ``$HF_HUB_OFFLINE``); a missing
            file raises :class:`odise_model.WeightsNotFoundError` saying where it was looked for.
        cache_dir: download cache (default ``$ODISE_CACHE`` or ``~/.cache/odise_annotate``).
        storage_options: fsspec options for remote sources (e.g. an S3 endpoint).
        dtype: cast the frozen SD and CLIP weights to this dtype (``torch.bfloat16`` / ``"bf16"``) while they
            are loaded (so the fp32 copy never exists: about half the host memory); trainable parts, and the
            empty-prompt embedding (computed in fp32), stay float32. Default: float32.
        device: where the model lives.
        seed: seed of the random initialisation (when some weights are not given).
        random_weights: allow a variant that has official weights (``odise_label_coco``,
            ``odise_caption_coco``: its config names an ``official_checkpoint``) to be built with no weights
            at all. Without it that raises ``ValueError``: random weights give meaningless labels, so they
            must be asked for (tests, plumbing checks, benchmarks). The tiny variants have no official
            weights and are random by design; they need no flag.
    Returns:
        the model in eval mode. With no weight arguments (and ``pretrained=False``) all weights are random
        (seeded); a model with random weights only produces plumbing-check output.
    Raises:
        ValueError: an official variant without any weights and without ``random_weights=True``.
    """
    cfg = load_config(config)
    dtype = parse_dtype(dtype)
    sources = WeightSources.resolve(
        cfg, checkpoint=checkpoint, sd_weights=sd_weights, clip_weights=clip_weights, pretrained=pretrained
    )
    no_weights = all(s is None for s in (sources.checkpoint, sources.sd, sources.clip))
    if cfg.official_checkpoint and no_weights and not random_weights:
        raise ValueError(
            f"build_odise({cfg.name!r}) without weights would return a model with RANDOM weights, whose labels "
            "are meaningless. Pass pretrained=True for the official weights, checkpoint= / sd_weights= / "
            "clip_weights= for your own files, or random_weights=True if random weights are what you want "
            "(tests, plumbing checks, benchmarks)."
        )
    loader = WeightLoader(offline=offline, cache_dir=cache_dir, storage_options=storage_options)
    # Fail fast: find every file (downloading if allowed) before building anything big.
    located = loader.locate_all(sources)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_components(cfg, meta_sd=located.sd is not None, meta_clip=located.clip is not None)
        materialize(model, located, dtype=dtype)
    model.weight_provenance = located.provenance()
    return model.to(device).eval()


def materialize(model: ODISE, located: Located, *, dtype: torch.dtype | None) -> None:
    """Fill SD / CLIP (built on the meta device) and the ODISE weights from the located files (strict), then
    compute the buffers derived from weights (empty-prompt embedding, initial null embedding).

    The steps are in the order that keeps host memory lowest: each tensor is copied out of its memory-mapped
    file and the file's pages are released at once; SD's text encoder is loaded, used once and freed before
    the UNet is read.
    """
    cfg = model.config
    # 1. CLIP (one shared instance)
    if located.clip is not None:
        load_clip_weights(
            model.clip.model, located.clip.path, dtype=dtype, context_length=cfg.clip.context_length
        )
    # 2. Stable Diffusion: text encoder -> empty-prompt embedding (then freed); UNet and VAE into the model
    if located.sd is not None:
        parts = read_stable_diffusion(located.sd.path, cfg)
        with torch.device("meta"):
            text_encoder = build_sd_text_encoder(cfg)
        load_sd_text_encoder(text_encoder, parts.pop("text_encoder"))
        uncond = empty_prompt_embedding(text_encoder)
        del text_encoder
        load_sd_part(model.sd.unet, parts.pop("unet"), dtype=dtype)
        load_sd_part(model.sd.vae, parts.pop("vae"), dtype=dtype)
    else:
        uncond = empty_prompt_embedding(build_sd_text_encoder(cfg))
    model.captioner.set_uncond_context(uncond)
    # 3. ODISE trainable weights
    if located.checkpoint is not None:
        load_odise_checkpoint(model, located.checkpoint.path)
    # 4. buffers derived from loaded weights, and the frozen dtype
    if located.checkpoint is None and model.head.null_embed is not None:
        with torch.no_grad():
            model.head.null_embed.copy_(model.clip.encode_text([""]).to(model.head.null_embed))
    if dtype is not None:
        model.set_frozen_dtype(dtype)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if on_meta:
        raise AssertionError(f"tensors left on the meta device: {on_meta[:10]}")  # a loading bug
