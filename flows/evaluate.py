"""The ``evaluate`` flow: score an annotate output against ground truth.

Orchestration only: :func:`pipeline.evaluate.run.run_evaluation` (``EvaluateConfig`` -> ``EvaluationResult``;
metrics from :mod:`pipeline.evaluate.metrics`: PQ / SQ / RQ, mIoU, mask AP). The parameters are
``EvaluateConfig``'s fields (``json_output`` is the ``--json`` of ``odise-evaluate``); relative paths
resolve against the working directory.

Artifacts: ``evaluate-metrics`` (headline metrics, percent) and ``evaluate-per-class`` (per-class PQ).
"""

from __future__ import annotations

import os
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from pipeline.config import EvaluateConfig

from ._prefect import redacted_errors, retry_on_io_error, with_credentials
from .params import (
    build_model,
    check_parameters,
    resolve_path,
    result_dict,
)

__all__ = ["evaluate", "evaluate_config", "score", "headline_rows"]

_PATH_FIELDS = ("ground_truth", "ground_truth_png", "predictions", "json_output")


def evaluate_config(params: dict[str, Any], cwd: str | os.PathLike | None = None) -> EvaluateConfig:
    """Validate flow parameters into :class:`pipeline.config.EvaluateConfig` (``None`` = its default).

    Raises:
        ParameterError: naming the bad parameter.
    """
    values = {k: v for k, v in params.items() if v is not None}
    check_parameters(values)
    for name in _PATH_FIELDS:
        if isinstance(values.get(name), str):
            values[name] = resolve_path(values[name], cwd)
    shards = values.get("ground_truth_shards")
    if isinstance(shards, str):
        values["ground_truth_shards"] = resolve_path(shards, cwd)
    elif isinstance(shards, list):
        values["ground_truth_shards"] = [resolve_path(s, cwd) for s in shards]
    if isinstance(values.get("categories"), str):
        values["categories"] = resolve_path(values["categories"], cwd)
    return build_model(EvaluateConfig, values, what="evaluate")


def headline_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """Rows ``{"metric", "value"}`` of an ``EvaluationResult.to_dict()`` layout (values in percent)."""

    def pct(v: Any) -> Any:
        return None if v is None else round(100.0 * float(v), 2)

    rows: list[dict[str, Any]] = [{"metric": "images", "value": metrics.get("num_images")}]
    for group, m in (metrics.get("panoptic") or {}).items():
        if group != "per_class" and isinstance(m, dict):
            rows += [{"metric": f"{k.upper()} {group}", "value": pct(m.get(k))} for k in ("pq", "sq", "rq")]
            rows.append({"metric": f"categories {group}", "value": m.get("n")})
    for section, keys in (
        ("semantic", ("mIoU", "fwIoU", "pACC", "mACC")),
        ("instance", ("AP", "AP50", "AP75")),
    ):
        m = metrics.get(section)
        if isinstance(m, dict):
            rows += [{"metric": k, "value": pct(m.get(k))} for k in keys]
    for warning in ((metrics.get("details") or {}).get("warnings") or [])[:10]:
        rows.append({"metric": "warning", "value": str(warning)[:300]})
    return rows


def per_class_lines(metrics: dict[str, Any]) -> list[str]:
    """A per-class PQ / SQ / RQ (and IoU) table of an ``EvaluationResult.to_dict()`` layout, in percent."""

    def pct(v: Any) -> str:
        return "    -" if v is None else f"{100.0 * float(v):5.1f}"

    per_class = (metrics.get("panoptic") or {}).get("per_class") or {}
    iou = ((metrics.get("semantic") or {}).get("per_class")) or {}
    if not per_class:
        return []
    lines = [
        f"{'id':>5s} {'category':24s} {'kind':5s}  {'PQ':>5s}  {'SQ':>5s}  {'RQ':>5s} {'TP':>5s} {'FP':>5s} {'FN':>5s}"
        + ("    IoU" if iou else ""),
        "-" * (74 + (7 if iou else 0)),
    ]
    for cid, r in per_class.items():
        kind = "thing" if r.get("isthing") else "stuff"
        line = (
            f"{cid:>5s} {str(r.get('name'))[:24]:24s} {kind:5s}  {pct(r.get('pq'))}  {pct(r.get('sq'))}  "
            f"{pct(r.get('rq'))} {r.get('tp', 0):5d} {r.get('fp', 0):5d} {r.get('fn', 0):5d}"
        )
        if iou:
            line += f"  {pct((iou.get(cid) or {}).get('iou'))}"
        if r.get("counted") is False:
            line += "  (absent)"
        lines.append(line)
    return lines


@task(name="score", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_on_io_error)
@redacted_errors
def score(config: Any, storage_block: str | None = None) -> dict[str, Any]:
    """Call ``pipeline.evaluate.run.run_evaluation``; returns ``EvaluationResult.to_dict()`` (also written to ``json_output``)."""
    from pipeline.evaluate.run import run_evaluation

    return result_dict(run_evaluation(with_credentials(config, storage_block)))


@flow(name="evaluate", description="Score annotations (PQ, mIoU, mask AP) against panoptic ground truth.")
def evaluate(
    predictions: str,
    ground_truth: str | None = None,
    ground_truth_png: str | None = None,
    ground_truth_shards: str | list[str] | None = None,
    json_output: str | None = None,
    instance_ap: bool = True,
    semantic: bool = True,
    match: Literal["file_name", "image_id", "key"] = "file_name",
    categories: str | list[dict[str, Any]] | None = None,
    storage_options: dict[str, Any] | None = None,
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Compare ``predictions`` (an annotate output) with the ground truth.

    Args:
        predictions: output folder / URL of an ``annotate`` run.
        ground_truth: COCO panoptic JSON (path or URL); or give ``ground_truth_shards``.
        ground_truth_png: folder of the ground-truth panoptic PNGs (default: the JSON's path without ``.json``).
        ground_truth_shards: labeled WebDataset shards (folder, ``.tar`` URL or list) instead of a COCO JSON.
        json_output: write the metrics JSON here (path or URL).
        instance_ap: compute mask AP (pycocotools).
        semantic: compute mIoU / pixel accuracy.
        match: how ground-truth images pair with prediction rows: ``file_name``, ``image_id`` or ``key``.
        categories: evaluated categories (COCO list or JSON path/URL); default: the ground truth's.
        storage_options: fsspec options without credentials (endpoint, region).
        storage_block: Prefect Secret block with fsspec credentials (see the annotate flow).

    Returns:
        The metrics (``pipeline.evaluate.metrics.EvaluationResult.to_dict()`` layout).
    """
    params = dict(locals())
    block = params.pop("storage_block")
    logger = get_run_logger()
    config = evaluate_config(params)
    metrics = score(config, block)
    create_table_artifact(
        table=headline_rows(metrics),
        key="evaluate-metrics",
        description=f"metrics of {predictions} (percent)",
    )
    per_class = ((metrics.get("panoptic") or {}).get("per_class") or {}).values()
    if per_class:
        create_table_artifact(
            table=[
                {k: r.get(k) for k in ("name", "isthing", "pq", "sq", "rq", "tp", "fp", "fn", "counted")}
                for r in per_class
            ],
            key="evaluate-per-class",
            description="per-class panoptic quality",
        )
    overall = (metrics.get("panoptic") or {}).get("All") or {}
    logger.info(
        "PQ %s over %s images%s",
        overall.get("pq"),
        metrics.get("num_images"),
        f"; JSON: {json_output}" if json_output else "",
    )
    return metrics
