"""Every run's settings in one place, validated once, up front (pydantic), and the annotate run's summary.

* :class:`WeightsSettings` - the model and its weight sources, shared by the jobs that build a model;
* :class:`AnnotateConfig` - what ``run_annotation`` takes, what the Prefect ``annotate`` flow's parameters map
  onto and what ``odise-annotate`` fills in (defaults fit one 24 GB GPU);
* :class:`TrainConfig` - ``run_training`` / ``odise-train`` / the ``train`` flow (defaults: the official recipe);
* :class:`EvaluateConfig` - ``run_evaluation`` / ``odise-evaluate`` / the ``evaluate`` flow.

Field names are the command-line flags (``--max-steps``) and the flow parameters (``max_steps``).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "WeightsSettings",
    "AnnotateConfig",
    "TrainConfig",
    "EvaluateConfig",
    "RunSummary",
    "MatchMode",
    "OFFICIAL_MAX_STEPS",
    "PRESETS",
    "uses_pretrained",
    "check_sources",
    "clean_output",
]


MatchMode = Literal["file_name", "image_id", "key"]
"""How ``odise-evaluate`` pairs ground-truth images with prediction rows (see :mod:`pipeline.evaluate.run`)."""

OFFICIAL_MAX_STEPS = 92_188
"""Iterations of the official 50-epoch COCO run (total batch 64)."""

PRESETS: dict[str, dict[str, Any]] = {
    "demo": {"overlap_threshold": 0.0, "alpha": 0.35, "beta": 0.65},
}
"""Settings of ``AnnotateConfig.preset``. ``demo`` is the official ``demo/demo.py``: it forces overlap
threshold 0 and CLIP fusion alpha 0.35 / beta 0.65, and labels with the user's classes (as things) followed
by COCO + ADE20K-150 + LVIS concatenated as the demo does (:func:`odise_model.vocabulary.demo_vocabulary`).
A setting given explicitly wins over the preset's."""

TINY_VARIANTS = ("tiny", "tiny_caption")
"""CPU-sized variants with random weights by default (tests, plumbing checks)."""


def uses_pretrained(model: str, pretrained: bool | None) -> bool:
    """Whether weight sources left unset get the official files: yes by default, except for the tiny variants."""
    return pretrained if pretrained is not None else model not in TINY_VARIANTS


def ray_init_address(ray_address: str | None) -> str:
    """What ``ray.init(address=...)`` gets for a run's ``ray_address``: the option if given, else
    ``$RAY_ADDRESS`` if set, else ``"local"``: a new local Ray. A bare ``ray.init()`` would instead join a
    cluster that someone started with ``ray start`` on this machine, which an empty ``ray_address`` (start a
    local Ray) must not do (and ``num_cpus`` cannot be given for a cluster that exists)."""
    return ray_address or os.environ.get("RAY_ADDRESS") or "local"


def check_sources(value: str | list[str], what: str) -> str | list[str]:
    """Validator body: an input spec (or list of them) must not be empty."""
    if isinstance(value, list) and not value or isinstance(value, str) and not value.strip():
        raise ValueError(f"{what} must name at least one shard, pattern, manifest or folder")
    return value


def clean_output(value: str) -> str:
    """Validator body: a non-empty output URL without a trailing slash."""
    if not value.strip():
        raise ValueError("output must be a path or URL")
    return value.rstrip("/") if value != "/" else value


class WeightsSettings(BaseModel):
    """The model and its weights: the fields every job that builds a model shares (annotate, train).

    Weights default to the official files for the official variants (``pretrained``); ``model="tiny"``
    without a checkpoint is a plumbing check with random weights.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = Field(
        "odise_label_coco",
        description="model variant (odise_label_coco, odise_caption_coco, tiny, tiny_caption) or JSON path",
    )
    checkpoint: str | None = Field(None, description="ODISE weights: release name, path or URL")
    sd_weights: str | None = Field(
        None, description="Stable Diffusion v1.3 weights: sd-v1-3, .ckpt path/URL, diffusers folder or hub id"
    )
    clip_weights: str | None = Field(None, description="CLIP ViT-L/14-336 weights: openai or a file path/URL")
    pretrained: bool | None = Field(
        None,
        description="use the official weights for every source not given (default: yes, except for tiny)",
    )
    offline: bool | None = Field(
        None, description="never touch the network for weights (default: $ODISE_OFFLINE/$HF_HUB_OFFLINE)"
    )
    cache_dir: str | None = Field(
        None, description="weights cache (default $ODISE_CACHE or ~/.cache/odise_annotate)"
    )

    @property
    def use_pretrained(self) -> bool:
        return uses_pretrained(self.model, self.pretrained)

    @property
    def is_plumbing_check(self) -> bool:
        """True when the job uses random weights (tiny model, no checkpoint)."""
        return self.checkpoint is None and not self.use_pretrained and self.sd_weights is None


class AnnotateConfig(WeightsSettings):
    """One annotation job.

    Inputs: ``input`` is a shard glob / brace pattern / manifest file / folder of tar shards / folder of images,
    on any fsspec URL.

    Vocabulary (:func:`odise_model.vocabulary.compose_vocabulary`): the user's classes come from
    ``vocab_file`` (a ``classes.txt`` path or URL, or a built-in name such as ``coco_panoptic``,
    ``lvis_1203``), ``vocab`` (inline, ``"person, man; sky [stuff]"`` or a list of such strings) and
    ``caption`` (its nouns), in that order, all that are given (a later class repeating an earlier one's
    synonym is dropped). ``merge_vocab`` lists are merged after them. ``vocab_file`` defaults to
    ``coco_panoptic`` only when neither ``vocab``, ``caption`` nor ``preset="demo"`` gives classes, so
    ``vocab="forklift; pallet"`` alone labels just those two. ``preset="demo"`` (see :data:`PRESETS`)
    puts the user's classes, as things, before COCO + ADE20K-150 + LVIS (or before ``merge_vocab`` when
    given) without deduplication, as the official demo; the preset's thresholds apply unless
    ``overlap_threshold`` / ``alpha`` / ``beta`` are given.
    Model: ``model`` is a variant name or JSON path; weights default to the official files for the official
    variants (``pretrained``); ``model="tiny"`` without a checkpoint is a plumbing check with random weights.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input: str | list[str] = Field(
        ...,
        description="shards: glob, {000..009} brace pattern, manifest, folder of .tar, or folder of images",
    )
    output: str = Field(..., description="output URL (local path, s3://bucket/prefix, ...)")
    vocab_file: str | None = Field(
        "coco_panoptic",
        description="classes.txt path or URL, or a built-in vocabulary name (the default coco_panoptic "
        "applies only when vocab, caption and preset give no classes)",
    )
    vocab: str | list[str] | None = Field(
        None,
        description="inline classes as in the ODISE demo: 'person, man; sky [stuff]' (';' between classes, "
        "',' between synonyms, optional [stuff]); added after vocab_file's",
    )
    caption: str | None = Field(
        None, description="a caption whose nouns become classes (one synonym each), added after vocab's"
    )
    merge_vocab: list[str] = Field(
        default_factory=list, description="built-in vocabularies merged after vocab_file"
    )
    preset: Literal["demo"] | None = Field(
        None,
        description="demo: the official demo's settings (user classes as things + COCO + ADE + LVIS, "
        "overlap_threshold 0, alpha 0.35, beta 0.65); explicit settings win",
    )

    batch_size: int = Field(4, ge=1, description="images per model call")
    tile_batch_size: int = Field(12, ge=1, description="SD tiles per forward pass")
    num_actors: int | None = Field(
        None, ge=1, description="model replicas (default: one per GPU, or 1 on CPU)"
    )
    gpus_per_actor: float | None = Field(
        None, ge=0, description="GPUs per replica (default 1 when GPUs exist, else 0)"
    )
    cpus_per_actor: float = Field(
        0.5,
        gt=0,
        description="CPUs reserved per replica (fractional avoids starving reads on small machines)",
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where replicas run")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="dtype of the frozen SD/CLIP weights (auto: bf16 on GPU, fp32 on CPU)"
    )

    object_mask_threshold: float | None = Field(
        None, ge=0, le=1, description="override the model's object score threshold"
    )
    overlap_threshold: float | None = Field(
        None, ge=0, le=1, description="override the model's overlap threshold"
    )
    alpha: float | None = Field(
        None, ge=0, le=1, description="CLIP fusion exponent for classes seen in training"
    )
    beta: float | None = Field(None, ge=0, le=1, description="CLIP fusion exponent for unseen classes")

    include_png: bool = Field(True, description="store the panoptic PNG bytes in the Parquet rows")
    write_coco: bool = Field(True, description="write COCO panoptic + instances exports under coco/")
    overlays: int = Field(8, ge=0, description="number of overlay images written under overlays/")
    max_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb limit (pixels per image)")
    images_per_virtual_shard: int = Field(
        1000, ge=1, description="images per shard when the input is a folder of images"
    )

    ray_address: str | None = Field(
        None,
        description="existing Ray cluster address ('auto', 'ray://host:10001'); empty: start a local Ray",
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    no_progress_timeout_s: float = Field(
        1800.0, gt=0, description="fail if the pipeline makes no progress for this long"
    )
    shared_filesystem: bool = Field(
        False,
        description="local input/output paths are on a filesystem every Ray node mounts at the same path (NFS ...); "
        "without it a local path is refused when the Ray cluster has nodes on other hosts",
    )
    lease_ttl_s: float = Field(
        300.0,
        ge=2,
        description="seconds without renewal after which another run may take over the output's lease",
    )
    lease_renew_s: float = Field(
        30.0, gt=0, description="seconds between renewals of the output's lease (< lease_ttl_s / 2)"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the input (e.g. S3 endpoint)"
    )
    output_storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for the output (default: storage_options)"
    )
    allow_provenance_mismatch: bool = Field(
        False, description="allow adding labels to an output written with other settings"
    )
    retry_errors: bool = Field(
        False,
        description="relabel the retryable error rows (network, timeout, vanished file, out of memory) of committed shards and replace those shards atomically",
    )
    relabel_changed: bool = Field(
        False,
        description="relabel committed shards whose source changed since their commit (size, ETag or mtime) and replace them atomically",
    )
    coco_max_images_per_file: int = Field(
        50_000,
        ge=1,
        description="labelled images per COCO file; past it the export is split into numbered parts listed in coco/index.json",
    )
    image_root: str | None = Field(
        None,
        description="COCO file_name is relative to this folder or URL (default: image folders: relative to the input folder; tar members: <tar stem>/<member>)",
    )
    copy_images: bool = Field(
        False,
        description="copy every image's original bytes into <output>/images/<shard_id>/<name> (COCO file_name "
        "relative to that folder), so the output opens as it is in detectron2, FiftyOne, CVAT; excludes image_root",
    )

    @field_validator("input")
    @classmethod
    def _input_not_empty(cls, value):
        return check_sources(value, "input")

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, value: str) -> str:
        return clean_output(value)

    @field_validator("ray_address")
    @classmethod
    def _empty_address_is_local(cls, value):
        return value or None

    @model_validator(mode="before")
    @classmethod
    def _preset_and_vocabulary_defaults(cls, data: Any) -> Any:
        """The preset's settings where none is given; no default ``vocab_file`` when other sources give classes."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.get("preset")
        if isinstance(preset, str) and preset in PRESETS:
            for key, value in PRESETS[preset].items():
                if data.get(key) is None:
                    data[key] = value
        if "vocab_file" not in data and (data.get("vocab") or data.get("caption") or preset == "demo"):
            data["vocab_file"] = None
        return data

    @field_validator("vocab")
    @classmethod
    def _inline_vocabulary(cls, value: str | list[str] | None) -> list[str] | None:
        """Checked now (errors name the class position and text); kept as the list of class texts."""
        if value is None:
            return None
        from odise_model.vocabulary import inline_classes, parse_inline_vocabulary

        parse_inline_vocabulary(value)
        return inline_classes(value)

    @field_validator("caption")
    @classmethod
    def _caption_has_nouns(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from odise_model.vocabulary import caption_vocabulary

        caption_vocabulary(value)  # raises naming the caption when it has no known noun
        return value

    @model_validator(mode="after")
    def _vocab_given(self):
        if not (self.vocab_file or self.vocab or self.caption or self.merge_vocab or self.preset == "demo"):
            raise ValueError("give vocab_file, vocab, caption, merge_vocab or preset='demo'")
        return self

    @model_validator(mode="after")
    def _copy_images_or_image_root(self):
        if self.copy_images and self.image_root:
            raise ValueError(
                f"copy_images and image_root={self.image_root!r} exclude each other: with copy_images the images "
                "are copied to <output>/images/, which is the COCO image root"
            )
        return self

    @model_validator(mode="after")
    def _lease_timing(self):
        if self.lease_renew_s >= self.lease_ttl_s / 2:
            raise ValueError(
                f"lease_renew_s ({self.lease_renew_s}) must be below half of lease_ttl_s ({self.lease_ttl_s})"
            )
        return self

    @property
    def vocabulary_spec(self) -> str:
        """Where the run's classes come from, in words (reports and ``provenance.json``'s ``vocabulary_source``)."""
        parts = [self.vocab_file] if self.vocab_file else []
        if self.vocab:
            parts.append("vocab '" + "; ".join(self.vocab) + "'")
        if self.caption:
            parts.append(f"caption {self.caption!r}")
        if self.preset == "demo":
            from odise_model.vocabulary import DEMO_VOCABULARIES

            user = ["(" + " + ".join(parts) + ") as things"] if parts else []
            return "preset demo: " + " + ".join(user + list(self.merge_vocab or DEMO_VOCABULARIES))
        return " + ".join(parts + list(self.merge_vocab))

    @property
    def vocabulary_settings(self) -> dict[str, Any]:
        """The vocabulary settings as given (``provenance.json`` ``settings.vocabulary``)."""
        return {
            "vocab_file": self.vocab_file,
            "vocab": self.vocab,
            "caption": self.caption,
            "merge_vocab": list(self.merge_vocab),
            "preset": self.preset,
        }

    @property
    def out_storage_options(self) -> dict[str, Any]:
        return self.storage_options if self.output_storage_options is None else self.output_storage_options


class TrainConfig(WeightsSettings):
    """One training run. Defaults are the official recipe; ``model="tiny"`` gives a CPU-sized plumbing run."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    train: str | list[str] = Field(
        ..., description="labeled shards: dataset folder / shard URL / list of shard URLs"
    )
    val: str | list[str] | None = Field(
        None, description="held-out labeled shards for periodic evaluation (PQ)"
    )
    output: str = Field(..., description="output URL: checkpoints/, metrics.jsonl, train_summary.json")
    checkpoint: str | None = Field(
        None, description="initial ODISE weights (release name, path or URL); ignored when resuming"
    )
    vocab: str | None = Field(
        None,
        description="training vocabulary (classes.txt / built-in name; default: the train categories.json, "
        "or the built-in vocabulary with the same ids, e.g. coco_panoptic)",
    )

    max_steps: int = Field(OFFICIAL_MAX_STEPS, ge=1, description="optimizer steps")
    batch_size: int = Field(
        2, ge=1, description="images per step, total over workers (official 64 = 32 GPUs x 2)"
    )
    lr: float = Field(1e-4, gt=0, description="base learning rate (AdamW)")
    weight_decay: float = Field(0.05, ge=0, description="weight decay (none on norms and biases)")
    warmup_factor: float = Field(
        0.067, gt=0, le=1, description="learning-rate factor at step 0 of the linear warm-up"
    )
    grad_clip: float | None = Field(
        0.01, gt=0, description="max global L2 norm of the gradients (None: no clipping)"
    )
    crop_size: int | None = Field(
        None,
        ge=32,
        description="LSJ crop size (default: the model's test short side: 1024 official, 128 tiny)",
    )
    min_scale: float = Field(0.1, gt=0, description="LSJ minimum scale")
    max_scale: float = Field(2.0, gt=0, description="LSJ maximum scale")
    shuffle_buffer: int = Field(512, ge=1, description="samples held for shuffling")
    num_points: int = Field(12544, ge=1, description="points of the matcher and the mask losses")
    num_words: int = Field(8, ge=1, description="caption words per image (caption variant)")
    tile_batch_size: int = Field(8, ge=1, description="SD tiles per forward pass")
    gradient_checkpointing: Literal["none", "projections", "all"] = Field(
        "projections",
        description="recompute activations in backward: projections (official use_checkpoint=True) or all (+ UNet)",
    )
    amp: bool | None = Field(None, description="bf16 autocast (default: on GPU)")

    eval_every: int = Field(4500, ge=0, description="evaluate every N steps (0: only at the end); needs val")
    eval_max_images: int | None = Field(
        None, ge=1, description="evaluate on at most this many held-out images"
    )
    eval_batch_size: int = Field(4, ge=1, description="images per predictor call during evaluation")
    eval_use_clip: bool | None = Field(
        None, description="fuse with MaskCLIP in evaluation (default: when real CLIP weights are loaded)"
    )
    checkpoint_every: int = Field(4500, ge=1, description="save a checkpoint every N steps (and at the end)")
    log_every: int = Field(20, ge=1, description="write a metrics line every N steps")

    num_workers: int = Field(1, ge=1, description="training processes (DDP through Ray Train when > 1)")
    use_gpu: bool | None = Field(None, description="train on GPUs (default: when CUDA is available)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per Ray worker")
    ray_address: str | None = Field(
        None, description="existing Ray cluster ('auto', 'ray://host:10001'); with it, training runs on Ray"
    )
    use_ray: bool | None = Field(
        None, description="run on Ray Train (default: when num_workers > 1 or ray_address is set)"
    )
    ray_storage_path: str | None = Field(None, description="Ray Train's own run folder (default: Ray's)")

    resume: bool = Field(False, description="continue from the last checkpoint under output, if any")
    seed: int = Field(42, ge=0, description="seed of the data order, augmentations and loss sampling")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for every URL (e.g. S3 endpoint)"
    )

    @field_validator("train")
    @classmethod
    def _train_not_empty(cls, value):
        return check_sources(value, "train")

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, value: str) -> str:
        return clean_output(value)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(
                f"batch_size {self.batch_size} must be a multiple of num_workers {self.num_workers}"
            )
        if self.num_workers > 1 and self.use_ray is False:
            raise ValueError("num_workers > 1 needs Ray Train (use_ray must not be False)")
        if self.min_scale > self.max_scale:
            raise ValueError(f"min_scale {self.min_scale} > max_scale {self.max_scale}")
        return self

    @property
    def uses_ray(self) -> bool:
        if self.use_ray is not None:
            return self.use_ray
        return self.num_workers > 1 or bool(self.ray_address)


class EvaluateConfig(BaseModel):
    """One evaluation: ground truth + an annotate output -> PQ / SQ / RQ, mIoU, mask AP.

    Give either ``ground_truth`` (+ optionally ``ground_truth_png``) or ``ground_truth_shards``. The output
    JSON path is the field ``json_output``, set as ``json=...`` (``EvaluateConfig(json="pq.json")``; a
    field named ``json`` would shadow ``BaseModel.json``).
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    ground_truth: str | None = Field(None, description="COCO panoptic JSON (path or URL)")
    ground_truth_png: str | None = Field(
        None, description="folder of the COCO panoptic PNGs (default: the JSON's path without .json)"
    )
    ground_truth_shards: str | list[str] | None = Field(
        None, description="labeled WebDataset shards: a folder, a .tar URL or a list of .tar URLs"
    )
    predictions: str = Field(..., description="an odise-annotate output folder (path or URL)")
    json_output: str | None = Field(None, alias="json", description="write the results as JSON here")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for every URL")
    instance_ap: bool = Field(True, description="compute mask AP from the runs' instances (pycocotools)")
    semantic: bool = Field(True, description="compute mIoU / pixel accuracy")
    match: MatchMode = Field("file_name", description="how GT images pair with prediction rows (module doc)")
    categories: str | list[dict[str, Any]] | None = Field(
        None, description="evaluated categories (COCO list or JSON URL); default: the ground truth's"
    )

    @model_validator(mode="after")
    def _one_ground_truth(self) -> EvaluateConfig:
        if (self.ground_truth is None) == (self.ground_truth_shards is None):
            raise ValueError("give exactly one of ground_truth (COCO panoptic JSON) and ground_truth_shards")
        if self.ground_truth_png is not None and self.ground_truth is None:
            raise ValueError("ground_truth_png goes with ground_truth (a COCO panoptic JSON)")
        if not self.predictions.strip():
            raise ValueError("predictions must be an annotate output folder")
        if isinstance(self.ground_truth_shards, list) and not self.ground_truth_shards:
            raise ValueError("ground_truth_shards is an empty list")
        return self

    @property
    def png_dir(self) -> str | None:
        """The COCO PNG folder in use (given, or derived from the JSON's name)."""
        if self.ground_truth is None:
            return None
        if self.ground_truth_png:
            return self.ground_truth_png
        base = self.ground_truth.rstrip("/")
        return base[: -len(".json")] if base.lower().endswith(".json") else base + "_png"


@dataclass
class RunSummary:
    """What a run did. ``images`` counts every input sample (labelled + errors) of the shards processed now.

    ``shards_retried`` / ``shards_relabelled``: committed shards replaced by ``retry_errors`` /
    ``relabel_changed``; ``changed_shards``: ``{"count", "first"}`` of committed shards whose source changed
    since their commit (relabelled only with ``relabel_changed``); ``coco``: URLs of the COCO files
    (``panoptic``, ``instances``, ``index``), ``coco_parts`` / ``coco_parts_rebuilt``: parts of the export and how
    many this run rebuilt."""

    run_id: str
    output: str
    images: int = 0
    labelled: int = 0
    errors: int = 0
    segments: int = 0
    shards_total: int = 0
    shards_committed: int = 0
    shards_skipped: int = 0
    elapsed_s: float = 0.0
    images_per_s: float = 0.0
    plumbing_check: bool = False
    category_counts: dict[str, int] = field(default_factory=dict)
    error_reasons: dict[str, int] = field(default_factory=dict)
    overlays: list[str] = field(default_factory=list)
    coco: dict[str, str] = field(default_factory=dict)
    lease_takeover: dict[str, Any] | None = None
    """The stale lease this run took over (``LeaseRecord`` fields: run_id, host, pid, since, renewed_at ...)."""
    shards_retried: int = 0
    shards_relabelled: int = 0
    changed_shards: dict[str, Any] = field(default_factory=dict)
    coco_parts: int = 0
    coco_parts_rebuilt: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
