"""Settings and result of one export (``odise-export``, the Prefect ``export`` flow, :func:`run_export`).

Field names are the command-line flags (``--min-score``) and the flow parameters (``min_score``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["FORMATS", "ExportConfig", "ExportSummary", "Format", "Order"]

Format = Literal["fiftyone", "labelstudio", "datumaro", "cvat", "hf"]
"""Export targets; ``cvat`` is the ``datumaro`` layout (CVAT imports COCO through Datumaro)."""
FORMATS: tuple[str, ...] = ("fiftyone", "labelstudio", "datumaro", "cvat", "hf")
Order = Literal["key", "uncertainty"]


class ExportConfig(BaseModel):
    """One export of an annotate output to a review / training tool's format.

    Selection (every format): error rows are skipped; ``min_score`` drops segments and instances scored
    below it; ``order`` picks which images come first (``key``: the output's own order, shard by shard, key
    by key; ``uncertainty``: most uncertain first); ``max_images`` keeps the first N of that order.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    input: str = Field(
        ..., description="an odise-annotate output folder or URL (holds parquet/ and provenance.json)"
    )
    output: str = Field(..., description="export folder or URL (created; see --overwrite)")
    format: Format = Field(
        ..., description="fiftyone, labelstudio, datumaro (= cvat) or hf (Hugging Face datasets Parquet)"
    )
    min_score: float | None = Field(
        None, ge=0, le=1, description="drop segments and instances scored below this"
    )
    max_images: int | None = Field(
        None, ge=1, description="export at most this many images (the first of --order)"
    )
    order: Order = Field(
        "key", description="key: shard by shard, key by key; uncertainty: most uncertain images first"
    )
    copy_images: bool = Field(
        False,
        description="copy the images into the export (tar members: each tar streamed once) so it opens as it is; default: reference the images' URLs",
    )
    include_image: bool = Field(
        False, description="hf: store the image bytes in an `image` column (datasets.Image)"
    )
    image_url_prefix: str | None = Field(
        None,
        description="labelstudio: data.image = PREFIX + images/<file> for copied images (default /data/local-files/?d=)",
    )
    subset: str = Field(
        "default", description="datumaro: the subset name in annotations/instances_<subset>.json"
    )
    rows_per_file: int = Field(1000, ge=1, description="hf: rows per Parquet file")
    overwrite: bool = Field(False, description="replace a complete earlier export in the output folder")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the input (and the images)"
    )
    output_storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for the output (default: storage_options)"
    )

    @field_validator("input", "output")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must be a path or URL")
        return value.rstrip("/") if value != "/" else value

    @field_validator("subset")
    @classmethod
    def _safe_subset(cls, value: str) -> str:
        import re

        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", value):
            raise ValueError("must be letters, digits, '_' or '-' (it becomes part of file names)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> ExportConfig:
        if self.input.rstrip("/") == self.output.rstrip("/"):
            raise ValueError("output must not be the annotate output folder itself")
        if self.include_image and self.format != "hf":
            raise ValueError(f"include_image is for format hf (format {self.format}: use copy_images)")
        if self.image_url_prefix is not None and self.format != "labelstudio":
            raise ValueError(f"image_url_prefix is for format labelstudio, not {self.format}")
        return self

    @property
    def out_storage_options(self) -> dict[str, Any]:
        return self.storage_options if self.output_storage_options is None else self.output_storage_options

    @property
    def target(self) -> str:
        """The format with aliases resolved (``cvat`` -> ``datumaro``)."""
        return "datumaro" if self.format == "cvat" else self.format


@dataclass
class ExportSummary:
    """What an export did (also written to ``<output>/export.json`` with the file list).

    Attributes:
        format: the target written (``cvat`` reported as ``datumaro``).
        input, output: the annotate output read and the export folder.
        images: images exported.
        rows_read: Parquet rows read to select them (all rows, except with ``max_images`` in key order).
        error_rows: error rows skipped (of the rows read; with ``max_images`` and ``order=key`` reading stops
            early, so later error rows are not counted).
        segments, instances: segments / instances exported.
        segments_dropped, instances_dropped: dropped by ``min_score``.
        uncertainty_fallback: exported images whose ``uncertainty`` was null (1 - mean segment score used).
        images_copied: images copied into the export (``copy_images``).
        images_missing: images that could not be read for copying (listed in ``missing`` up to 20).
        files: ``{role: URL}`` of the main files written.
        model_version: the label source, from the provenance (``<variant>@<weights sha256[:12]>``).
        plumbing_check: the labels come from random weights (``tiny``).
        elapsed_s, images_per_s: wall time of the export and its throughput.
    """

    format: str
    input: str
    output: str
    order: str = "key"
    images: int = 0
    rows_read: int = 0
    error_rows: int = 0
    segments: int = 0
    instances: int = 0
    segments_dropped: int = 0
    instances_dropped: int = 0
    uncertainty_fallback: int = 0
    images_copied: int = 0
    images_missing: int = 0
    missing: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)
    model_version: str = ""
    plumbing_check: bool = False
    elapsed_s: float = 0.0
    images_per_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
