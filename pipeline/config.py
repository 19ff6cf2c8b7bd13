"""Settings of an annotation run, validated once, up front (pydantic), and the run's summary.

``AnnotateConfig`` is what ``run_annotation`` takes, what the Prefect ``annotate`` flow's parameters map onto
and what the ``odise-annotate`` command line fills in. Defaults fit one 24 GB GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["AnnotateConfig", "RunSummary", "uses_pretrained", "check_sources", "clean_output"]


TINY_VARIANTS = ("tiny", "tiny_caption")
"""CPU-sized variants with random weights by default (tests, plumbing checks)."""


def uses_pretrained(model: str, pretrained: bool | None) -> bool:
    """Whether weight sources left unset get the official files: yes by default, except for the tiny variants."""
    return pretrained if pretrained is not None else model not in TINY_VARIANTS


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


class AnnotateConfig(BaseModel):
    """One annotation job.

    Inputs: ``input`` is a shard glob / brace pattern / manifest file / folder of tar shards / folder of images,
    on any fsspec URL. ``vocab_file`` is a ``classes.txt`` path or URL, or a built-in vocabulary name
    (``coco_panoptic``, ``ade20k_150``); ``merge_vocab`` adds built-in vocabularies after it.
    Model: ``model`` is a variant name or JSON path; weights default to the official files for the official
    variants (``pretrained``); ``model="tiny"`` without a checkpoint is a plumbing check with random weights.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input: str | list[str] = Field(..., description="shards: glob, {000..009} brace pattern, manifest, folder of .tar, or folder of images")
    output: str = Field(..., description="output URL (local path, s3://bucket/prefix, ...)")
    vocab_file: str | None = Field("coco_panoptic", description="classes.txt path or URL, or a built-in vocabulary name")
    merge_vocab: list[str] = Field(default_factory=list, description="built-in vocabularies merged after vocab_file")

    model: str = Field("odise_label_coco", description="model variant (odise_label_coco, odise_caption_coco, tiny, tiny_caption) or JSON path")
    checkpoint: str | None = Field(None, description="ODISE weights: release name, path or URL")
    sd_weights: str | None = Field(None, description="Stable Diffusion v1.3 weights: sd-v1-3, .ckpt path/URL, diffusers folder or hub id")
    clip_weights: str | None = Field(None, description="CLIP ViT-L/14-336 weights: openai or a file path/URL")
    pretrained: bool | None = Field(None, description="use the official weights for every source not given (default: yes, except for tiny)")
    offline: bool | None = Field(None, description="never touch the network for weights (default: $ODISE_OFFLINE/$HF_HUB_OFFLINE)")
    cache_dir: str | None = Field(None, description="weights cache (default $ODISE_CACHE or ~/.cache/odise_annotate)")

    batch_size: int = Field(4, ge=1, description="images per model call")
    tile_batch_size: int = Field(12, ge=1, description="SD tiles per forward pass")
    num_actors: int | None = Field(None, ge=1, description="model replicas (default: one per GPU, or 1 on CPU)")
    gpus_per_actor: float | None = Field(None, ge=0, description="GPUs per replica (default 1 when GPUs exist, else 0)")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs reserved per replica (fractional avoids starving reads on small machines)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where replicas run")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="dtype of the frozen SD/CLIP weights (auto: bf16 on GPU, fp32 on CPU)")

    object_mask_threshold: float | None = Field(None, ge=0, le=1, description="override the model's object score threshold")
    overlap_threshold: float | None = Field(None, ge=0, le=1, description="override the model's overlap threshold")
    alpha: float | None = Field(None, ge=0, le=1, description="CLIP fusion exponent for classes seen in training")
    beta: float | None = Field(None, ge=0, le=1, description="CLIP fusion exponent for unseen classes")

    include_png: bool = Field(True, description="store the panoptic PNG bytes in the Parquet rows")
    write_coco: bool = Field(True, description="write COCO panoptic + instances exports under coco/")
    overlays: int = Field(8, ge=0, description="number of overlay images written under overlays/")
    max_pixels: int = Field(89_478_485, ge=1, description="decompression-bomb limit (pixels per image)")
    images_per_virtual_shard: int = Field(1000, ge=1, description="images per shard when the input is a folder of images")

    ray_address: str | None = Field(None, description="existing Ray cluster address ('auto', 'ray://host:10001'); empty: start a local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all)")
    no_progress_timeout_s: float = Field(1800.0, gt=0, description="fail if the pipeline makes no progress for this long")
    storage_options: dict[str, Any] = Field(default_factory=dict, description="fsspec options for the input (e.g. S3 endpoint)")
    output_storage_options: dict[str, Any] | None = Field(None, description="fsspec options for the output (default: storage_options)")
    allow_provenance_mismatch: bool = Field(False, description="allow adding labels to an output written with other settings")

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

    @model_validator(mode="after")
    def _vocab_given(self):
        if not self.vocab_file and not self.merge_vocab:
            raise ValueError("give vocab_file and/or merge_vocab")
        return self

    @property
    def is_plumbing_check(self) -> bool:
        """True when the run labels with random weights (tiny model, no checkpoint)."""
        return self.checkpoint is None and not self.use_pretrained and self.sd_weights is None

    @property
    def use_pretrained(self) -> bool:
        return uses_pretrained(self.model, self.pretrained)

    @property
    def out_storage_options(self) -> dict[str, Any]:
        return self.storage_options if self.output_storage_options is None else self.output_storage_options


@dataclass
class RunSummary:
    """What a run did. ``images`` counts every input sample (labelled + errors) of the shards processed now."""

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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
