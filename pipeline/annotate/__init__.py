"""Label a dataset: ``run_annotation(AnnotateConfig) -> RunSummary``.

* :mod:`pipeline.annotate.run` - the driver: checks, Ray Data pipeline, commits, summary;
* :mod:`pipeline.annotate.stages` - the Ray Data stages (read + decode, model, encode + stage);
* :mod:`pipeline.annotate.commit` - staging files, streaming atomic per-shard commits (and replacements for
  ``--retry-errors`` / ``--relabel-changed``), small markers, provenance, summary;
* :mod:`pipeline.annotate.coco` - per-shard COCO fragments, the incremental sharded COCO export and its index.
"""
