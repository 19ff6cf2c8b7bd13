"""Checks before an annotation run, and the run's provenance record.

:func:`check_inputs` validates everything that can be checked without building a model (vocabulary,
shards, output, model config, weights) and raises on the first problem, naming the input, before Prefect
or Ray start. :func:`provenance_for` turns the checked inputs into the :class:`~pipeline.schema.RunProvenance`
written beside the labels.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

from pipeline.config import AnnotateConfig

__all__ = ["OutputError", "check_inputs", "check_output_writable", "provenance_for", "resolve_vocabulary"]


class OutputError(OSError):
    """The output URL cannot be written (or lies inside the input)."""


# --------------------------------------------------------------------------------------------------------
# 1. checks
# --------------------------------------------------------------------------------------------------------
def resolve_vocabulary(config: AnnotateConfig):
    """The run's vocabulary: ``vocab_file`` (path, URL or built-in name) merged with ``merge_vocab``."""
    from odise_model.vocabulary import load_vocabulary

    if config.vocab_file:
        return load_vocabulary(config.vocab_file, merge_with=config.merge_vocab or None, storage_options=config.storage_options)
    first, *rest = config.merge_vocab
    return load_vocabulary(first, merge_with=rest or None)


def check_output_writable(url: str, storage_options: dict) -> None:
    """Write and delete a probe object under ``url``; raise :class:`OutputError` naming the URL otherwise."""
    from fsspec.core import url_to_fs

    try:
        fs, root = url_to_fs(url, **storage_options)
        probe = posixpath.join(root.rstrip("/"), f".write-probe-{uuid.uuid4().hex}")
        if not ("://" in url and not url.startswith("file://")):
            if os.path.exists(root) and not os.path.isdir(root):
                raise OutputError(f"output {url} is a file, not a folder; give a folder (it is created if missing)")
            os.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except OutputError:
        raise
    except Exception as exc:
        raise OutputError(f"output {url} is not writable: {type(exc).__name__}: {exc}") from exc


def _check_output_outside_input(config: AnnotateConfig) -> None:
    specs = [config.input] if isinstance(config.input, str) else config.input
    out = config.output
    if "://" in out and not out.startswith("file://"):
        return
    out_abs = os.path.abspath(out.removeprefix("file://"))
    for spec in specs:
        if "://" in spec and not spec.startswith("file://"):
            continue
        base = spec.removeprefix("file://")
        if not os.path.isdir(base):  # a shard, pattern or manifest: outputs never match it
            continue
        base = os.path.abspath(base)
        if out_abs == base or out_abs.startswith(base + os.sep):
            raise OutputError(f"output {config.output} lies inside the input folder {base}; its files would be read as input")


def check_inputs(config: AnnotateConfig) -> dict[str, Any]:
    """Validate everything that can be checked without building a model (fast; raises on the first problem).

    Returns ``{"vocabulary", "shards", "model_config", "located", "weights"}`` for the run.
    Raises ``VocabularyError`` / ``FileNotFoundError`` (vocabulary), ``InputError`` (shards),
    :class:`OutputError`, ``ConfigError`` (model), ``WeightsNotFoundError`` / ``CheckpointError`` (weights).
    """
    import odise_model
    from odise_model.weights_sources import WeightLoader, WeightSources
    from pipeline.shards import list_shards

    vocabulary = resolve_vocabulary(config)
    shards = list_shards(config.input, config.storage_options, images_per_virtual_shard=config.images_per_virtual_shard)
    _check_output_outside_input(config)
    model_cfg = odise_model.load_config(config.model)
    sources = WeightSources.resolve(
        model_cfg,
        checkpoint=config.checkpoint,
        sd_weights=config.sd_weights,
        clip_weights=config.clip_weights,
        pretrained=config.use_pretrained,
    )
    loader = WeightLoader(offline=config.offline, cache_dir=config.cache_dir, storage_options=config.storage_options)
    located = loader.locate_all(sources)
    check_output_writable(config.output, config.out_storage_options)  # it creates a local output folder
    checked = {"vocabulary": vocabulary, "shards": shards, "model_config": model_cfg, "located": located, "sources": sources}
    if not config.allow_provenance_mismatch:
        # an output labelled with another model / vocabulary / thresholds: refuse now, not after Ray started
        from pipeline.annotate.commit import check_provenance

        check_provenance(config.output, config.out_storage_options, provenance_for(config, checked, "check"))
    return checked


# --------------------------------------------------------------------------------------------------------
# 2. provenance
# --------------------------------------------------------------------------------------------------------
def provenance_for(config: AnnotateConfig, checked: dict[str, Any], run_id: str):
    """The run's :class:`~pipeline.schema.RunProvenance`; URLs in it are redacted (no user-info, signatures, tokens)."""
    from pipeline.redact import redact_url, url_identity
    from pipeline.schema import RunProvenance

    model_cfg = checked["model_config"]
    vocab = checked["vocabulary"]
    located = checked["located"]
    weights = located.provenance()
    post = model_cfg.postprocess
    thresholds = {
        "object_mask_threshold": config.object_mask_threshold if config.object_mask_threshold is not None else post.object_mask_threshold,
        "overlap_threshold": config.overlap_threshold if config.overlap_threshold is not None else post.overlap_threshold,
        "alpha": config.alpha if config.alpha is not None else model_cfg.classifier.alpha,
        "beta": config.beta if config.beta is not None else model_cfg.classifier.beta,
    }
    licences = sorted({w["license"] for w in weights.values() if w and w.get("license")})
    if config.is_plumbing_check:
        licences = ["none: random weights (plumbing check, labels are meaningless)"]
    return RunProvenance(
        run_id=run_id,
        model_variant=model_cfg.name,
        weights_sha256={k: (None if w is None else w["sha256"]) for k, w in weights.items()},
        vocabulary_source=redact_url(url_identity(str(config.vocab_file or "+".join(config.merge_vocab)))),
        vocabulary_sha256=vocab.sha256(),
        categories=vocab.coco_categories(),
        thresholds=thresholds,
        weights_licences="; ".join(licences),
        settings={
            "weights": {k: (None if w is None else redact_url(url_identity(str(w["source"])))) for k, w in weights.items()},
            "plumbing_check": config.is_plumbing_check,
            "input_resize": {"short_side": model_cfg.input.short_side, "max_size": model_cfg.input.max_size},
            "include_png": config.include_png,
        },
    )
