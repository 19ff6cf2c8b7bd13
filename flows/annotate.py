"""The ``annotate`` flow: validate parameters -> ``check`` -> ``label`` -> ``report``.

Orchestration only; the work is :func:`pipeline.annotate.run.run_annotation`:

1. the flow's parameters (named like :class:`pipeline.config.AnnotateConfig`'s fields, plus
   ``storage_block``) are validated into an ``AnnotateConfig`` by :func:`flows.params.annotate_config`
   (pydantic; relative paths resolved against the working directory) before any task starts;
2. ``check`` (:func:`pipeline.annotate.checks.check_inputs`): vocabulary parses, shards exist, output is writable,
   model config loads, weights are reachable, no other run holds the output's lease; fails fast (retried only
   on I/O / network errors). What it found (:class:`pipeline.annotate.checks.CheckedInputs`) goes to ``label``
   through an in-process hand-off (:func:`pipeline.annotate.checks.hand_over`), not as a task result: it is
   not JSON-serialisable and must not be persisted. ``odise-annotate`` hands its own check to ``check`` the
   same way, so one command checks once;
3. ``label`` (:func:`pipeline.annotate.run.run_annotation` with ``checked=``): takes the output's lease (one
   writer per output; a second run fails with the holder named, never retried), runs the Ray Data pipeline
   with per-shard commits; a progress artifact (key ``annotate-progress``) is updated as shards commit;
   reruns on the same input/output label only the shards not committed yet, so Prefect retries and reruns
   are safe;
4. ``report``: table artifacts (``annotate-summary``, ``annotate-categories``), a markdown artifact
   (``annotate-report``: plumbing-check warning, summary, link to the outputs, a few overlay images),
   a link artifact (``annotate-output``) and image artifacts for overlays served over http(s).

Credentials: see :mod:`flows.params` (environment or a Prefect Secret block named by ``storage_block``;
read inside the tasks, never logged, never in artifacts or outputs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import (
    create_image_artifact,
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from pipeline.config import AnnotateConfig, RunSummary
from pipeline.redact import redact, redact_text

from ._prefect import PLUMBING_NOTICE, forward_logs, redacted_errors, retry_on_io_error, with_credentials
from .params import annotate_config, config_default, is_url

__all__ = ["annotate", "check", "label", "report", "CheckReport", "progress_listener", "ARTIFACT_KEYS"]

ARTIFACT_KEYS = {
    "progress": "annotate-progress",
    "summary": "annotate-summary",
    "categories": "annotate-categories",
    "report": "annotate-report",
    "output": "annotate-output",
    "overlay": "annotate-overlay",
}
"""Artifact keys written by the flow (lowercase, dashes: Prefect's rule)."""

_D = config_default
_listeners: list[Callable[[dict[str, Any]], None]] = []


@contextlib.contextmanager
def progress_listener(fn: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Also send the ``label`` task's progress events to ``fn`` while the context is open (this process only).

    Events: ``{"event": "start", "output"}`` when the ``label`` task starts; ``{"event": "images", ...}``
    when labelling starts and as images are labelled, and ``{"event": "shard", ...}`` after each committed
    shard, both with the dict of ``run_annotation``'s ``on_progress`` (``shards_done``, ``shards_total``,
    ``images``, ``images_staged``, ``images_total``, ``images_total_estimated``, ``errors``, ``segments``,
    ``elapsed_s``); ``{"event": "done", "summary"}`` at the end.
    Used by ``odise-annotate`` for its terminal progress bar; the flow itself only needs the artifact.
    """
    _listeners.append(fn)
    try:
        yield
    finally:
        _listeners.remove(fn)


def _notify(event: dict[str, Any]) -> None:
    for fn in list(_listeners):
        try:
            fn(event)
        except Exception:  # noqa: BLE001 - a broken progress bar must not fail a run
            logging.getLogger(__name__).debug("progress listener failed", exc_info=True)


@dataclass
class CheckReport:
    """What ``check`` found: everything is in place for the run (small and loggable: no secrets)."""

    shards: int
    first_shards: list[str]
    categories: int
    vocabulary_sha256: str
    model: str
    plumbing_check: bool
    weights: dict[str, str | None] = field(default_factory=dict)
    images: int = 0
    """Images in the listed image-folder shards (tar shards are counted while they are read)."""


@task(name="check", retries=2, retry_delay_seconds=[5, 30], retry_condition_fn=retry_on_io_error)
@redacted_errors
def check(config: AnnotateConfig, storage_block: str | None = None) -> CheckReport:
    """Fail fast: vocabulary, shards, output, model config, weights and the output's lease
    (:func:`pipeline.annotate.checks.check_inputs`), unless this process checked ``config`` just before
    (``odise-annotate``); hands the result to ``label``."""
    from pipeline.annotate.checks import check_inputs, hand_over, take_over

    logger = get_run_logger()
    checked = take_over(config, storage_block)
    if checked is None:
        with forward_logs("pipeline", "odise_model"):
            checked = check_inputs(with_credentials(config, storage_block))
    else:
        logger.info("inputs were checked by the caller in this process; not checking again")
    hand_over(config, checked, storage_block)
    located = checked.located
    weights = {
        k: (None if f is None else str(f.path))
        for k, f in (("checkpoint", located.checkpoint), ("sd", located.sd), ("clip", located.clip))
    }
    result = CheckReport(
        shards=len(checked.shards),
        first_shards=[s.shard_id for s in checked.shards[:5]],
        categories=len(checked.vocabulary),
        vocabulary_sha256=checked.vocabulary.sha256(),
        model=checked.model_config.name,
        plumbing_check=config.is_plumbing_check,
        weights=weights,
        images=checked.images_known,
    )
    logger.info(
        "inputs OK: %d shard(s), %d categories, model %s, output %s",
        result.shards,
        result.categories,
        result.model,
        config.output,
    )
    return result


@task(name="label", retries=2, retry_delay_seconds=30, retry_condition_fn=retry_on_io_error)
@redacted_errors
def label(
    config: AnnotateConfig, storage_block: str | None = None, progress_artifact: UUID | None = None
) -> RunSummary:
    """Run the annotation pipeline (with the inputs ``check`` handed over, if any); update the progress
    artifact as shards commit."""
    from pipeline.annotate.checks import take_over
    from pipeline.annotate.run import run_annotation

    logger = get_run_logger()

    def on_progress(p: dict[str, Any]) -> None:
        done, total = p["shards_done"], max(1, p["shards_total"])
        staged, images_total = p.get("images_staged", p["images"]), p.get("images_total")
        of = f" of {'~' if p.get('images_total_estimated') else ''}{images_total}" if images_total else ""
        text = (
            f"{p['shards_done']}/{p['shards_total']} shards, {p['images']} images committed "
            f"({staged}{of} labelled so far), {p['errors']} errors, {p['elapsed_s']} s"
        )
        percent = 100.0 * done / total
        if images_total:  # images move within a shard: a folder of 1,000 images is one shard
            percent = min(100.0, 100.0 * staged / images_total)
        if p.get("event", "shard") != "shard":  # images staged inside a shard: only the bar moves
            _notify({**p, "event": "images"})
            return
        logger.info("committed: %s", text)
        if progress_artifact is not None:
            try:
                update_progress_artifact(artifact_id=progress_artifact, progress=percent, description=text)
            except Exception as exc:  # noqa: BLE001 - progress display must not fail the run
                logger.warning("could not update the progress artifact: %s", type(exc).__name__)
        _notify({**p, "event": "shard"})

    _notify({"event": "start", "output": config.output})
    with forward_logs("pipeline", "odise_model"):
        summary = run_annotation(
            with_credentials(config, storage_block),
            checked=take_over(config, storage_block),
            on_progress=on_progress,
        )
    if progress_artifact is not None:
        with contextlib.suppress(Exception):
            update_progress_artifact(
                artifact_id=progress_artifact,
                progress=100.0,
                description=f"done: {summary.shards_total} shards ({summary.shards_skipped} already committed), "
                f"{summary.images} images labelled now, {summary.errors} errors",
            )
    _notify({"event": "done", "summary": summary})
    logger.info(
        "labelled %d image(s) (%d errors, %d segments) in %.1f s; %d shard(s) committed now, %d skipped (already done)",
        summary.labelled,
        summary.errors,
        summary.segments,
        summary.elapsed_s,
        summary.shards_committed,
        summary.shards_skipped,
    )
    if summary.lease_takeover:
        taken = summary.lease_takeover
        logger.warning(
            "took over the stale lease of run %s on host %s (pid %s), last renewed %s",
            taken["run_id"],
            taken["host"],
            taken["pid"],
            taken["renewed_at"],
        )
    if summary.plumbing_check:
        logger.warning(PLUMBING_NOTICE.format(model=config.model))
    return summary


def _as_link(url: str) -> str:
    """A clickable form of an output URL (``file://`` for local paths)."""
    if is_url(url):
        return url
    return "file://" + os.path.abspath(url)


def _existing_overlays(config: AnnotateConfig, storage_block: str | None, limit: int) -> list[str]:
    """Overlay URLs already in the output (a rerun that labels nothing still shows some)."""
    from fsspec.core import url_to_fs

    try:
        opts = with_credentials(config, storage_block).out_storage_options
        fs, root = url_to_fs(config.output, **opts)
        found = sorted(fs.glob(posixpath.join(root.rstrip("/"), "overlays", "**", "*.jpg")))[:limit]
    except Exception:  # noqa: BLE001 - the report is best effort
        return []
    prefix = config.output.rstrip("/")
    rel = [posixpath.relpath(p, root.rstrip("/")) for p in found]
    return [posixpath.join(prefix, r) for r in rel]


def _layout(summary: RunSummary, config: AnnotateConfig) -> str:
    """The output's files, in words (the report's "Layout" line)."""
    parts = ["`parquet/<shard>.parquet` (one row per image: segments, RLE masks, panoptic PNG, `image_url`)"]
    if summary.coco_parts > 1:
        parts.append(f"`coco/index.json` listing {summary.coco_parts} parts (`coco/panoptic-NNNNN.json` + "
                     "`coco/instances-NNNNN.json`)")  # fmt: skip
    elif summary.coco:
        parts.append("`coco/panoptic.json` + `coco/instances.json` (listed in `coco/index.json`)")
    if summary.coco:
        parts.append("`coco/panoptic/<shard>/<name>.png` (the image's name with its extension replaced: "
                     "`astronaut.jpg` -> `astronaut.png`)")  # fmt: skip
    parts.append("`overlays/<shard>/<name>.jpg`")
    if config.copy_images:
        parts.append(
            "`images/<shard>/<name>` (the images, copied; COCO `file_name` is relative to `images/`)"
        )
    return ", ".join([*parts, "`provenance.json`", "`summary.json`"])


@task(name="report", retries=2, retry_delay_seconds=5, retry_condition_fn=retry_on_io_error)
@redacted_errors
def report(
    summary: RunSummary,
    checked: CheckReport,
    config: AnnotateConfig,
    storage_block: str | None = None,
    max_images: int = 4,
) -> dict[str, str]:
    """Artifacts: summary table, per-category table, markdown report with overlays, link to the outputs.

    Returns ``{artifact name: artifact id}``.
    """
    plumbing = summary.plumbing_check
    flag = "PLUMBING CHECK (random weights, labels are meaningless): " if plumbing else ""
    rows = [
        {"metric": "output", "value": summary.output},
        {
            "metric": "model",
            "value": checked.model + (" (PLUMBING CHECK: random weights)" if plumbing else ""),
        },
        {
            "metric": "vocabulary",
            "value": f"{config.vocabulary_spec} ({checked.categories} categories)",
        },
        {
            "metric": "shards (total / committed now / already done)",
            "value": f"{summary.shards_total} / {summary.shards_committed} / {summary.shards_skipped}",
        },
        {"metric": "images (this run)", "value": summary.images},
        {"metric": "labelled", "value": summary.labelled},
        {"metric": "errors", "value": summary.errors},
        {"metric": "segments", "value": summary.segments},
        {"metric": "elapsed (s)", "value": summary.elapsed_s},
        {"metric": "images / s", "value": summary.images_per_s},
        {"metric": "plumbing check", "value": plumbing},
    ]
    if summary.lease_takeover:
        taken = summary.lease_takeover
        rows.append(
            {
                "metric": "lease taken over from",
                "value": f"run {taken['run_id']} on {taken['host']} (pid {taken['pid']}), last renewed {taken['renewed_at']}",
            }
        )
    rows += [{"metric": f"error: {reason}", "value": n} for reason, n in summary.error_reasons.items()]
    ids: dict[str, str] = {}
    ids["summary"] = str(
        create_table_artifact(
            table=redact(rows), key=ARTIFACT_KEYS["summary"], description=f"{flag}annotation run summary"
        )
    )
    cats = [{"category": name, "segments": n} for name, n in summary.category_counts.items()] or [
        {"category": "(no new segments in this run)", "segments": 0}
    ]
    ids["categories"] = str(
        create_table_artifact(
            table=cats,
            key=ARTIFACT_KEYS["categories"],
            description=f"{flag}segments per category labelled in this run",
        )
    )

    overlays = list(summary.overlays[:max_images]) or _existing_overlays(config, storage_block, max_images)
    md = ["# Annotation run", ""]
    if plumbing:
        md += [
            "> **⚠ PLUMBING CHECK** — model `"
            + checked.model
            + "` has **random weights**: every label below is "
            "meaningless. The run only proves that reading, Ray, the model, encoding and writing work. "
            "Use `model=odise_label_coco` with the official weights for real labels.",
            "",
        ]
    link = _as_link(summary.output)
    md += [
        f"Outputs: [{summary.output}]({link})",
        "",
        "| | |",
        "|---|---|",
        f"| shards | {summary.shards_total} total, {summary.shards_committed} committed now, {summary.shards_skipped} already done |",
        f"| images this run | {summary.images} ({summary.labelled} labelled, {summary.errors} errors) |",
        f"| segments | {summary.segments} |",
        f"| time | {summary.elapsed_s:.1f} s ({summary.images_per_s:.2f} images/s) |",
        "",
        f"Layout: {_layout(summary, config)}. Every file and column: docs/output-format.md.",
        "",
    ]
    for name, url in sorted(summary.coco.items()):
        md.append(f"- COCO {name}: [{url}]({_as_link(url)})")
    if overlays:
        md += ["", "## Overlays", ""]
        md += [f"![{posixpath.basename(u)}]({_as_link(u)})" for u in overlays]
    ids["report"] = str(
        create_markdown_artifact(
            markdown=redact_text("\n".join(md)),
            key=ARTIFACT_KEYS["report"],
            description=f"{flag}annotation report",
        )
    )
    ids["output"] = str(
        create_link_artifact(
            link=redact_text(link),
            link_text=redact_text(summary.output),
            key=ARTIFACT_KEYS["output"],
            description=f"{flag}annotation outputs",
        )
    )
    for i, url in enumerate(u for u in overlays if u.startswith(("http://", "https://"))):
        ids[f"overlay-{i}"] = str(
            create_image_artifact(
                image_url=url, key=ARTIFACT_KEYS["overlay"], description=f"{flag}overlay {i}"
            )
        )
    return ids


@flow(name="annotate", description="Label images with open-vocabulary panoptic segmentation (ODISE).")
def annotate(
    input: str | list[str],
    output: str,
    vocab_file: str | None = None,
    vocab: str | list[str] | None = None,
    caption: str | None = None,
    merge_vocab: list[str] | None = None,
    preset: Literal["demo"] | None = None,
    model: str = _D("model"),
    checkpoint: str | None = None,
    sd_weights: str | None = None,
    clip_weights: str | None = None,
    pretrained: bool | None = None,
    offline: bool | None = None,
    cache_dir: str | None = None,
    batch_size: int = _D("batch_size"),
    tile_batch_size: int = _D("tile_batch_size"),
    num_actors: int | None = None,
    gpus_per_actor: float | None = None,
    cpus_per_actor: float = _D("cpus_per_actor"),
    device: Literal["auto", "cpu", "cuda"] = _D("device"),
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = _D("dtype"),
    object_mask_threshold: float | None = None,
    overlap_threshold: float | None = None,
    alpha: float | None = None,
    beta: float | None = None,
    include_png: bool = _D("include_png"),
    write_coco: bool = _D("write_coco"),
    overlays: int = _D("overlays"),
    max_pixels: int = _D("max_pixels"),
    images_per_virtual_shard: int = _D("images_per_virtual_shard"),
    ray_address: str | None = None,
    num_cpus: int | None = None,
    no_progress_timeout_s: float = _D("no_progress_timeout_s"),
    shared_filesystem: bool = _D("shared_filesystem"),
    lease_ttl_s: float = _D("lease_ttl_s"),
    lease_renew_s: float = _D("lease_renew_s"),
    storage_options: dict[str, Any] | None = None,
    output_storage_options: dict[str, Any] | None = None,
    allow_provenance_mismatch: bool = _D("allow_provenance_mismatch"),
    retry_errors: bool = _D("retry_errors"),
    relabel_changed: bool = _D("relabel_changed"),
    coco_max_images_per_file: int = _D("coco_max_images_per_file"),
    image_root: str | None = None,
    copy_images: bool = _D("copy_images"),
    storage_block: str | None = None,
) -> RunSummary:
    """Label every image of ``input`` into ``output`` (Parquet + COCO panoptic + overlays).

    Args:
        input: shards: glob, ``{000..009}`` brace pattern, manifest file, folder of ``.tar`` shards or folder of
            images; local paths (relative to the working directory) or URLs (``s3://bucket/shards/*.tar``).
        output: output folder or URL (``out/run1``, ``s3://bucket/labels/run1``); reruns into it label only what is missing.
        vocab_file: ``classes.txt`` path (relative to the working directory) or URL, or a built-in vocabulary
            name (``coco_panoptic``, ``ade20k_150``, ``lvis_1203``, ...); default ``coco_panoptic`` when
            ``vocab``, ``caption`` and ``preset`` give no classes.
        vocab: inline classes as in the ODISE demo: ``"person, man; sky [stuff]"`` or a list
            (``["person, man", "sky [stuff]"]``); added after ``vocab_file``'s classes.
        caption: a caption whose nouns become classes (``"a man walking a dog on the beach"``).
        merge_vocab: built-in vocabularies (or files) merged after ``vocab_file``.
        preset: ``demo``: the official demo (user classes as things + COCO + ADE + LVIS, overlap threshold 0,
            alpha 0.35, beta 0.65); settings given explicitly win.
        model: ``odise_label_coco`` (default), ``odise_caption_coco``, ``tiny`` (random weights: a plumbing check) or a JSON path.
        checkpoint: ODISE weights: release name, path or URL (default: the official release for the model).
        sd_weights: Stable Diffusion v1.3 weights: ``sd-v1-3``, ``.ckpt`` path/URL, diffusers folder or hub id.
        clip_weights: CLIP ViT-L/14-336 weights: ``openai`` or a file path/URL.
        pretrained: use the official weights for every source not given (default: yes, except for ``tiny``).
        offline: never touch the network for weights (default: ``$ODISE_OFFLINE`` / ``$HF_HUB_OFFLINE``).
        cache_dir: weights cache (default ``$ODISE_CACHE`` or ``~/.cache/odise_annotate``).
        batch_size: images per model call.
        tile_batch_size: Stable Diffusion tiles per forward pass.
        num_actors: model replicas (default: one per GPU, or 1 on CPU).
        gpus_per_actor: GPUs per replica (default 1 when the Ray cluster has GPUs, else 0; 0.5 packs two per GPU).
        cpus_per_actor: CPUs reserved per replica.
        device: ``auto`` (cuda when the Ray cluster has GPUs), ``cpu`` or ``cuda``.
        dtype: dtype of the frozen SD/CLIP weights: ``auto`` (bf16 on GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``.
        object_mask_threshold: override the model's object score threshold (0..1).
        overlap_threshold: override the model's overlap threshold (0..1).
        alpha: CLIP fusion exponent for classes seen in training (0..1).
        beta: CLIP fusion exponent for unseen classes (0..1).
        include_png: store the panoptic PNG bytes in the Parquet rows.
        write_coco: write COCO panoptic + instances exports under ``coco/``.
        overlays: number of overlay images written under ``overlays/``.
        max_pixels: decompression-bomb limit (pixels per image).
        images_per_virtual_shard: images per shard when the input is a folder of images.
        ray_address: existing Ray cluster (``auto``, ``ray://head:10001``); empty: start a local Ray.
        num_cpus: CPUs of the local Ray (default: all).
        no_progress_timeout_s: fail when the pipeline makes no progress for this long.
        shared_filesystem: local ``input`` / ``output`` paths are on a filesystem every Ray node mounts at the
            same path (NFS ...); without it a local path is refused on a cluster with nodes on other hosts.
        lease_ttl_s: seconds without renewal after which another run may take over the output's lease.
        lease_renew_s: seconds between renewals of the output's lease (below half of ``lease_ttl_s``).
        storage_options: fsspec options for input and output **without credentials** (e.g.
            ``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}``).
        output_storage_options: fsspec options for the output if different (no credentials either).
        allow_provenance_mismatch: allow adding labels to an output written with other settings.
        retry_errors: relabel the retryable error rows (network, timeout, vanished file, out of memory) of
            committed shards and replace those shards atomically (one row per key; the other rows are kept).
        relabel_changed: relabel committed shards whose source changed since their commit (size, ETag or
            mtime of the tar; the member list, sizes and mtimes of an image-folder shard) and replace them.
        coco_max_images_per_file: labelled images per COCO file; past it the export is split into numbered
            parts (``coco/panoptic-00000.json``, ...) listed in ``coco/index.json``.
        image_root: folder or URL that COCO ``file_name`` is relative to (default: image folders: relative
            to the input folder; tar members: ``<tar stem>/<member>``).
        copy_images: copy every image's original bytes to ``<output>/images/<shard_id>/<name>`` and make COCO
            ``file_name`` relative to that folder: the output is self-contained (detectron2, FiftyOne and CVAT
            open it as it is). Not with ``image_root``; an output is labelled with it on or off, not both.
        storage_block: name of a Prefect Secret (or ``json/<name>``) block holding fsspec credentials
            (``{"key": ..., "secret": ...}``); default: credentials from the environment / ``~/.aws``.

    Returns:
        The pipeline's :class:`~pipeline.config.RunSummary`.
    """
    params = dict(locals())
    logger = get_run_logger()
    # 1. parameters -> AnnotateConfig (pydantic; raises ParameterError naming the parameter)
    block = params.pop("storage_block")
    config = annotate_config(params)
    if config.is_plumbing_check:
        logger.warning(PLUMBING_NOTICE.format(model=config.model))
    # 2. check
    checked = check(config, block)
    # 3. label
    progress_id = create_progress_artifact(
        progress=0.0,
        key=ARTIFACT_KEYS["progress"],
        description=("PLUMBING CHECK (random weights): " if config.is_plumbing_check else "")
        + f"labelling {checked.shards} shard(s)",
    )
    summary = label(config, block, progress_id)
    # 4. report
    report(summary, checked, config, block)
    return summary
