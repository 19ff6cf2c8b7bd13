"""Data plane: shards in object storage -> Ray Data (decode on CPU, one ODISE model per GPU) -> Parquet + COCO.

Layout, by job, over a few shared modules:

* shared: :mod:`pipeline.config` (every run's settings), :mod:`pipeline.storage` (fsspec I/O),
  :mod:`pipeline.shards` (the one shard lister and tar reader), :mod:`pipeline.images` (the one image
  decoder), :mod:`pipeline.schema` (the output's Arrow schema), :mod:`pipeline.encode` (masks <-> RLE / PNG),
  :mod:`pipeline.groundtruth` (labeled shards and COCO panoptic ground truth), :mod:`pipeline.redact` (what a
  credential looks like; nothing recorded carries one);
* :mod:`pipeline.annotate`: label a dataset (``run_annotation``): checks, Ray stages, commits, COCO export;
* :mod:`pipeline.evaluate`: score an output against ground truth (``run_evaluation``);
* :mod:`pipeline.train`: fine-tune on labeled shards (``run_training``).

Entry point: ``pipeline.run_annotation(pipeline.AnnotateConfig(input=..., output=..., vocab_file=..., model=...))``.
Imports only ``odise_model``'s public API; no Prefect. Importing ``pipeline`` stays light (no Ray, no torch).
"""

from __future__ import annotations

from typing import Any

from pipeline.config import AnnotateConfig, RunSummary

__all__ = ["AnnotateConfig", "RunSummary", "run_annotation", "check_inputs"]


def __getattr__(name: str) -> Any:
    if name in ("run_annotation", "PipelineError"):
        from pipeline.annotate import run

        return getattr(run, name)
    if name in ("check_inputs", "OutputError"):
        from pipeline.annotate import checks

        return getattr(checks, name)
    raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
