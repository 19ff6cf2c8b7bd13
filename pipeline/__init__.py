"""Data plane: shards in object storage -> Ray Data (decode on CPU, one ODISE model per GPU) -> Parquet + COCO.

Entry point: ``pipeline.run_annotation(pipeline.AnnotateConfig(input=..., output=..., vocab_file=..., model=...))``.
Imports only ``odise_model``'s public API; no Prefect.
"""

from __future__ import annotations

from typing import Any

from .config import AnnotateConfig, RunSummary

__all__ = ["AnnotateConfig", "RunSummary", "run_annotation", "check_inputs"]


def __getattr__(name: str) -> Any:
    if name in ("run_annotation", "check_inputs", "PipelineError", "OutputError"):
        from . import run

        return getattr(run, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
