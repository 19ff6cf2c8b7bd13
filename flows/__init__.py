"""Orchestration: Prefect flows, deployments and console scripts calling :mod:`pipeline` (which never imports this).

* :mod:`flows.annotate` - the ``annotate`` flow (check -> label -> report) over :func:`pipeline.annotate.run.run_annotation`;
* :mod:`flows.evaluate` - the ``evaluate`` flow over :func:`pipeline.evaluate.run.run_evaluation`;
* :mod:`flows.train` - the ``train`` flow over :func:`pipeline.train.run.run_training`;
* :mod:`flows.export` - the ``export`` flow over :func:`pipeline.export.run.run_export`;
* :mod:`flows.serve` - ``python -m flows.serve``: the deployments of ``prefect.yaml`` without a work pool;
* :mod:`flows.cli` - ``odise-annotate`` / ``odise-evaluate`` / ``odise-train`` / ``odise-convert`` / ``odise-export``;
* :mod:`flows.params` - parameter validation, path resolution and credential rules (no Prefect import).

Importing ``flows`` itself imports nothing heavy (no Prefect, Ray or torch).
"""
