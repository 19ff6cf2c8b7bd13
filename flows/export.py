"""The ``export`` flow: an annotate output -> FiftyOne / Label Studio / Datumaro (CVAT) / Hugging Face files.

Orchestration only: :func:`pipeline.export.run.run_export` (``ExportConfig`` -> ``ExportSummary``). The
parameters are ``ExportConfig``'s fields (the ``odise-export`` flags with underscores) plus
``storage_block``; relative paths resolve against the working directory. A retry (I/O errors only) is safe:
an unfinished export in the output folder is cleared and written again.

Artifacts: ``export-summary`` (table) and ``export-report`` (markdown: a PLUMBING CHECK warning when the labels
come from random weights, the files written, how to open them).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline.export.config import ExportConfig

from ._prefect import forward_logs, retry_on_io_error, with_credentials
from .params import build_model, check_no_credentials, resolve_path, table_rows

__all__ = ["export", "export_config", "run_export_task", "OPEN_HINTS"]

OPEN_HINTS = {
    "fiftyone": 'fo.Dataset.from_dir(dataset_dir="{out}", dataset_type=fo.types.COCODetectionDataset)',
    "labelstudio": "import {out}/tasks.json in a project whose labeling interface is {out}/labeling_config.xml",
    "datumaro": 'dm.Dataset.import_from("{out}", "coco_panoptic")  # or "coco_instances"',
    "hf": 'datasets.load_dataset("parquet", data_files="{out}/data/*.parquet", split="train")',
}
"""One line per target saying how to open an export (``{out}`` = the export folder)."""


def export_config(params: dict[str, Any], cwd: str | os.PathLike | None = None) -> ExportConfig:
    """Validate flow parameters into :class:`pipeline.export.config.ExportConfig` (``None`` = its default).

    Raises:
        ParameterError: naming the bad parameter.
    """
    values = {k: v for k, v in params.items() if v is not None}
    for name in ("storage_options", "output_storage_options"):
        check_no_credentials(name, values.get(name) or {})
    for name in ("input", "output"):
        if isinstance(values.get(name), str) and values[name].strip():
            values[name] = resolve_path(values[name], cwd)
    return build_model(ExportConfig, values, what="export")


@task(name="export", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_on_io_error)
def run_export_task(config: ExportConfig, storage_block: str | None = None) -> dict[str, Any]:
    """Call :func:`pipeline.export.run.run_export`; returns the ``ExportSummary`` as a dict."""
    from pipeline.export.run import run_export

    with forward_logs("pipeline"):
        return run_export(with_credentials(config, storage_block)).to_dict()


def report_markdown(summary: dict[str, Any]) -> str:
    """The ``export-report`` markdown of a summary."""
    lines = []
    if summary.get("plumbing_check"):
        lines += [
            "> **PLUMBING CHECK**: the exported labels come from a model with random weights; they are meaningless.",
            "",
        ]
    lines += [
        f"# {summary['format']} export of `{summary['input']}`",
        "",
        f"{summary['images']} image(s), {summary['segments']} segment(s) in {summary['elapsed_s']} s "
        f"({summary['images_per_s']} images/s); order `{summary['order']}`; labels `{summary['model_version']}`.",
        f"Skipped: {summary['error_rows']} error row(s), {summary['segments_dropped']} segment(s) below min_score; "
        f"images copied {summary['images_copied']}, missing {summary['images_missing']}.",
        "",
        "| file | URL |",
        "|---|---|",
        *[f"| {role} | `{url}` |" for role, url in summary["files"].items()],
        "",
        "Open it: `" + OPEN_HINTS[summary["format"]].format(out=summary["output"]) + "`",
    ]
    return "\n".join(lines)


@flow(
    name="export",
    description="Export an annotate output to FiftyOne, Label Studio, Datumaro/CVAT or HF datasets.",
)
def export(
    input: str,
    output: str,
    format: Literal["fiftyone", "labelstudio", "datumaro", "cvat", "hf"],
    min_score: float | None = None,
    max_images: int | None = None,
    order: Literal["key", "uncertainty"] = "key",
    copy_images: bool = False,
    include_image: bool = False,
    image_url_prefix: str | None = None,
    subset: str | None = None,
    rows_per_file: int | None = None,
    overwrite: bool = False,
    storage_options: dict[str, Any] | None = None,
    output_storage_options: dict[str, Any] | None = None,
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Export ``input`` (an annotate output) to ``output`` in ``format``.

    Args:
        input: the annotate output folder / URL.
        output: the export folder / URL.
        format: ``fiftyone``, ``labelstudio``, ``datumaro`` (= ``cvat``) or ``hf``.
        min_score: drop segments and instances scored below it.
        max_images: export at most this many images (the first of ``order``).
        order: ``key`` (the output's order) or ``uncertainty`` (most uncertain first).
        copy_images: copy the images into the export (each tar streamed once).
        include_image: ``hf``: store the image bytes (a ``datasets.Image`` column).
        image_url_prefix: ``labelstudio``: ``data.image`` prefix of copied images.
        subset: ``datumaro``: the subset name (default ``default``).
        rows_per_file: ``hf``: rows per Parquet file (default 1000).
        overwrite: replace a finished export in ``output``.
        storage_options: fsspec options without credentials (endpoint, region) for the input and images.
        output_storage_options: the same for the output (default: ``storage_options``).
        storage_block: Prefect Secret block with fsspec credentials (see the annotate flow).

    Returns:
        The ``ExportSummary`` as a dict.
    """
    params = dict(locals())
    block = params.pop("storage_block")
    logger = get_run_logger()
    config = export_config(params)
    summary = run_export_task(config, block)
    create_table_artifact(
        table=[r for r in table_rows(summary) if not r["metric"].startswith("files.")],
        key="export-summary",
        description=f"{summary['format']} export of {config.input}",
    )
    create_markdown_artifact(markdown=report_markdown(summary), key="export-report")
    if summary.get("plumbing_check"):
        logger.warning(
            "PLUMBING CHECK: the exported labels come from random weights (model %s)",
            summary["model_version"],
        )
    logger.info(
        "exported %s image(s) to %s (%s) in %.1f s",
        summary["images"],
        config.output,
        summary["format"],
        summary["elapsed_s"],
    )
    return summary
