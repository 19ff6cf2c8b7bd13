"""Label a dataset: ``run_annotation(AnnotateConfig) -> RunSummary``.

* :mod:`pipeline.annotate.run` - the driver: checks, Ray Data pipeline, commits, summary;
* :mod:`pipeline.annotate.stages` - the Ray Data stages (read + decode, model, encode + stage);
* :mod:`pipeline.annotate.commit` - staging files, atomic per-shard commits, markers, provenance, summary.
"""
