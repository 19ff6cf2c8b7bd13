"""Architecture as data: one frozen dataclass per component, loaded from ``configs/models/*.json``.

A variant is a JSON file (``odise_label_coco.json``, ``odise_caption_coco.json``, ``tiny.json``). Unknown keys
are errors (naming the file and the key), so a typo never silently falls back to a default. The three
third-party sub-configs (the diffusers UNet and VAE configs and the transformers CLIP text-encoder config)
are passed through verbatim to their libraries, which validate them; a string value there names a shared
JSON file relative to ``configs/models/`` (e.g. ``"sd_v1/unet.json"``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .resources import config_file

__all__ = [
    "InputConfig",
    "StableDiffusionConfig",
    "ClipConfig",
    "ProjectionConfig",
    "PixelDecoderConfig",
    "TransformerDecoderConfig",
    "ClassifierConfig",
    "PostprocessConfig",
    "ODISEConfig",
    "load_config",
    "BUILTIN_VARIANTS",
]

BUILTIN_VARIANTS = ("odise_label_coco", "odise_caption_coco", "tiny", "tiny_caption")


class ConfigError(ValueError):
    """A model config file is malformed (unknown key, wrong type, missing file)."""


@dataclass(frozen=True)
class InputConfig:
    """Test-time image preprocessing (official: ``ResizeShortestEdge(1024, max_size=2560)``, pad to 64).

    ``tile_size`` is the sliding-window size of the SD backbone (official 512): every tile is resized
    to ``tile_size`` x ``tile_size`` before Stable Diffusion, so SD always sees the same input size.
    """

    short_side: int = 1024
    max_size: int = 2560
    size_divisibility: int = 64
    tile_size: int = 512


@dataclass(frozen=True)
class StableDiffusionConfig:
    """Stable Diffusion v1 as a frozen feature extractor.

    Attributes:
        unet, vae: diffusers ``UNet2DConditionModel`` / ``AutoencoderKL`` configs (dicts).
        text_encoder: transformers ``CLIPTextConfig`` fields (dict); only used once to embed "".
        scaling_factor: latent scale (0.18215 for SD v1).
        beta_start, beta_end, num_train_timesteps: the ``scaled_linear`` DDPM schedule.
        timestep: diffusion step of the features (official 0, with noise added).
        noise_seed: seed of the CPU generator drawing the shared noise (official 42).
        encoder_taps / unet_taps / decoder_taps: ``(block, resnet)`` pairs; the tapped tensor is the
            input of ``down_blocks[block].resnets[resnet]`` (VAE encoder), ``up_blocks[..]`` (UNet,
            i.e. the concatenation of hidden state and skip) and ``up_blocks[..]`` (VAE decoder).
    """

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scaling_factor: float = 0.18215
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    timestep: int = 0
    noise_seed: int = 42
    encoder_taps: tuple[tuple[int, int], ...] = ((2, 1), (3, 1))
    unet_taps: tuple[tuple[int, int], ...] = ((0, 2), (1, 2), (2, 2), (3, 2))
    decoder_taps: tuple[tuple[int, int], ...] = ((0, 2), (1, 2))


@dataclass(frozen=True)
class ClipConfig:
    """open_clip ``CLIP`` architecture (``embed_dim``, ``vision_cfg``, ``text_cfg``) plus preprocessing."""

    embed_dim: int
    vision_cfg: dict[str, Any]
    text_cfg: dict[str, Any]
    quick_gelu: bool = True
    mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

    @property
    def image_size(self) -> int:
        return int(self.vision_cfg["image_size"])

    @property
    def context_length(self) -> int:
        return int(self.text_cfg.get("context_length", 77))


@dataclass(frozen=True)
class ProjectionConfig:
    """One GN bottleneck block per SD tap, projecting it to ``dim`` channels (official 512, 128, GN 32)."""

    dim: int = 512
    bottleneck_dim: int = 128
    norm_groups: int = 32
    min_stride: int = 4
    max_stride: int = 32


@dataclass(frozen=True)
class PixelDecoderConfig:
    """Mask2Former ``MSDeformAttnPixelDecoder`` (official: 256 ch, 6 layers, 8 heads, 4 points)."""

    conv_dim: int = 256
    mask_dim: int = 256
    norm_groups: int = 32
    num_layers: int = 6
    num_heads: int = 8
    ffn_dim: int = 1024
    num_points: int = 4
    transformer_in_features: tuple[str, ...] = ("s3", "s4", "s5")
    common_stride: int = 4


@dataclass(frozen=True)
class TransformerDecoderConfig:
    """Mask2Former masked-attention decoder with ODISE's ``PooledMaskEmbed`` head."""

    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 9
    mask_dim: int = 256
    num_feature_levels: int = 3
    temperature: float = 0.07


@dataclass(frozen=True)
class ClassifierConfig:
    """Open-vocabulary classification.

    Attributes:
        kind: ``"label"`` (K+1 logits with a learned null embedding) or ``"caption"`` (binary
            foreground head, caption-grounded embeddings).
        projection_dim: width of ``text_proj`` (= mask embedding width).
        text_prompt: prompt template of the diffusion branch's text embeddings (label: none;
            caption: ``"photo"`` = "a photo of a {}.").
        maskclip_prompt: prompt of the MaskCLIP branch (``"photo"``).
        alpha, beta: fusion exponents of the CLIP branch for classes seen / unseen in training.
        eos_coef: weight of the no-object class in the classification loss (stored in checkpoints).
        train_vocabulary: built-in vocabulary the model was trained on (decides seen vs unseen).
        maskclip_alignment: ``"official"`` pairs the unpadded image with masks of the padded tensor
            (reproduces the official numbers); ``"aligned"`` crops the masks to the image first.
    """

    kind: str = "label"
    projection_dim: int = 256
    text_prompt: str | None = None
    maskclip_prompt: str | None = "photo"
    alpha: float = 0.3
    beta: float = 0.7
    eos_coef: float = 0.1
    train_vocabulary: str = "coco_panoptic"
    maskclip_alignment: str = "official"


@dataclass(frozen=True)
class PostprocessConfig:
    """Mask2Former inference thresholds (official: object 0.0, overlap 0.8, top-100 instances)."""

    object_mask_threshold: float = 0.0
    overlap_threshold: float = 0.8
    topk_per_image: int = 100
    panoptic_on: bool = True
    semantic_on: bool = True
    instance_on: bool = True


@dataclass(frozen=True)
class ODISEConfig:
    """A complete ODISE variant. Built by :func:`odise_model.build_odise`."""

    name: str
    stable_diffusion: StableDiffusionConfig
    clip: ClipConfig
    input: InputConfig = field(default_factory=InputConfig)
    projection: ProjectionConfig = field(default_factory=ProjectionConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    transformer_decoder: TransformerDecoderConfig = field(default_factory=TransformerDecoderConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    official_checkpoint: str | None = None
    official_trainable_parameters: int | None = None

    def replace(self, **sections: Any) -> ODISEConfig:
        """Copy with some sections replaced; a dict value updates fields of that section.

        ``cfg.replace(postprocess={"overlap_threshold": 0.0}, classifier={"alpha": 0.35})``
        """
        updates = {}
        for name, value in sections.items():
            current = getattr(self, name)
            if isinstance(value, dict) and dataclasses.is_dataclass(current):
                unknown = set(value) - {f.name for f in dataclasses.fields(current)}
                if unknown:
                    raise ConfigError(f"unknown {name} setting(s): {sorted(unknown)}")
                value = dataclasses.replace(current, **value)
            updates[name] = value
        return dataclasses.replace(self, **updates)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "stable_diffusion": StableDiffusionConfig,
    "clip": ClipConfig,
    "input": InputConfig,
    "projection": ProjectionConfig,
    "pixel_decoder": PixelDecoderConfig,
    "transformer_decoder": TransformerDecoderConfig,
    "classifier": ClassifierConfig,
    "postprocess": PostprocessConfig,
}
_PASSTHROUGH = {
    ("stable_diffusion", "unet"),
    ("stable_diffusion", "vae"),
    ("stable_diffusion", "text_encoder"),
}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"model config file not found: {path}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None


def _to_tuple(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_to_tuple(v) for v in value)
    return value


def _build_section(cls: type, name: str, raw: Any, source: Path) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {name!r} must be an object, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) in {name!r}: {sorted(unknown)}")
    values = {}
    for key, value in raw.items():
        if (name, key) in _PASSTHROUGH:
            if isinstance(value, str):
                value = _read_json(_resolve(value, source.parent))
            values[key] = dict(value)
        elif isinstance(value, list):
            values[key] = _to_tuple(value)
        else:
            values[key] = value
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: section {name!r}: {exc}") from None


def _resolve(ref: str, base: Path) -> Path:
    """``ref`` relative to the config's folder; if absent there, the shipped file of that name (so a copy of
    a built-in config, e.g. to change the fusion weights, still finds ``sd_v1/unet.json``)."""
    path = Path(ref)
    if path.is_absolute():
        return path
    local = base / path
    if not local.exists():
        shipped = Path(config_file("models", *path.parts))
        if shipped.exists():
            return shipped
    return local


def load_config(spec: str | os.PathLike | ODISEConfig) -> ODISEConfig:
    """Load a model variant: a built-in name (see :data:`BUILTIN_VARIANTS`) or a JSON file path."""
    if isinstance(spec, ODISEConfig):
        return spec
    spec_str = os.fspath(spec)
    if spec_str in BUILTIN_VARIANTS:
        path = config_file("models", f"{spec_str}.json")
    else:
        path = Path(spec_str)
        if not path.exists():
            raise ConfigError(
                f"unknown model {spec_str!r}: not a built-in variant {list(BUILTIN_VARIANTS)} "
                f"and no such JSON file"
            )
    raw = _read_json(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a JSON object")
    top_fields = {f.name for f in dataclasses.fields(ODISEConfig)}
    unknown = set(raw) - top_fields
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key(s): {sorted(unknown)}")
    if "name" not in raw:
        raise ConfigError(f"{path}: missing 'name'")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            values[key] = _build_section(_SECTIONS[key], key, value, path)
        else:
            values[key] = value
    for required in ("stable_diffusion", "clip"):
        if required not in values:
            raise ConfigError(f"{path}: missing section {required!r}")
    cfg = ODISEConfig(**values)
    _check(cfg, path)
    return cfg


def _check(cfg: ODISEConfig, source: Path) -> None:
    if cfg.classifier.kind not in ("label", "caption"):
        raise ConfigError(
            f"{source}: classifier.kind must be 'label' or 'caption', got {cfg.classifier.kind!r}"
        )
    if cfg.classifier.maskclip_alignment not in ("official", "aligned"):
        raise ConfigError(f"{source}: classifier.maskclip_alignment must be 'official' or 'aligned'")
    for prompt in (cfg.classifier.text_prompt, cfg.classifier.maskclip_prompt):
        if prompt not in (None, "a", "photo", "scene"):
            raise ConfigError(
                f"{source}: unknown prompt template {prompt!r} (use null, 'a', 'photo', 'scene')"
            )
    if cfg.input.tile_size % cfg.input.size_divisibility and cfg.input.size_divisibility % 8:
        raise ConfigError(f"{source}: input.size_divisibility must be a multiple of 8")
