"""Exports of annotate outputs to the tools people review and train with, and back (the loop).

* :func:`run_export` (``odise-export``, the ``export`` flow): one annotate output -> FiftyOne, Label Studio,
  Datumaro / CVAT or Hugging Face ``datasets`` files (one module per target: :mod:`.fiftyone`,
  :mod:`.labelstudio`, :mod:`.datumaro`, :mod:`.hf`), with the selection of :mod:`.reader` (``min_score``,
  ``max_images``, ``order``) and image copying of :mod:`.images` (each tar streamed once);
* :mod:`.loop` (``odise-convert --from annotate|labelstudio``): an annotate output or a reviewed Label Studio
  export -> labeled WebDataset shards for ``odise-train`` / ``odise-evaluate``.

The file layouts are documented in each module and in docs/output-format.md.
"""

from pipeline.export.config import FORMATS, ExportConfig, ExportSummary

__all__ = ["FORMATS", "ExportConfig", "ExportSummary", "run_export"]


def run_export(config: ExportConfig) -> ExportSummary:
    """Export an annotate output (see :mod:`pipeline.export.run`)."""
    from pipeline.export.run import run_export as _run

    return _run(config)
