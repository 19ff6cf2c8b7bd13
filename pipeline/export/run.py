"""``run_export(config) -> ExportSummary``: read an annotate output, select, write one target, copy images.

Steps:

1. open the annotate output (:func:`pipeline.export.reader.open_output`): fails at once, naming the input,
   when it is missing or not an annotate output;
2. prepare the export folder: an empty or new folder is used as it is; a folder holding an *unfinished* export
   (``export.json`` with ``"complete": false``, left by a crash) is cleared and written again; a *finished*
   export is replaced only with ``overwrite``; any other non-empty folder is refused (never deleted);
3. stream the selected images (:func:`~pipeline.export.reader.iter_items`) into the target's writer;
4. with ``copy_images``, copy the images next to the labels, grouped by tar (each tar streamed once);
5. write ``provenance.json`` (the source's) and finally ``export.json`` (``"complete": true``, the summary and
   the files): an export is complete iff its ``export.json`` says so.

No Prefect and no Ray here (the ``export`` flow wraps this function); memory does not grow with the output.
"""

from __future__ import annotations

import logging
import posixpath
import tempfile
import time
from typing import Any

from pipeline.export._io import FileBatch, json_bytes, put_json
from pipeline.export.base import ExportContext, Writer
from pipeline.export.config import ExportConfig, ExportSummary
from pipeline.export.images import GroupSpill, fetch_grouped
from pipeline.export.reader import AnnotateOutput, SelectionStats, iter_items, open_output
from pipeline.storage import fs_root, list_files, read_bytes, utc_now, write_bytes

__all__ = ["ExportOutputError", "WRITERS", "check_export", "run_export", "writer_class"]

log = logging.getLogger(__name__)

MANIFEST = "export.json"
MAX_LISTED_MISSING = 20


class ExportOutputError(ValueError):
    """The export folder cannot be used (holds other files, or a finished export without ``overwrite``)."""


def writer_class(target: str) -> type[Writer]:
    """The writer of a target (imports only that target's module)."""
    if target == "fiftyone":
        from pipeline.export.fiftyone import FiftyOneWriter

        return FiftyOneWriter
    if target == "labelstudio":
        from pipeline.export.labelstudio import LabelStudioWriter

        return LabelStudioWriter
    if target == "datumaro":
        from pipeline.export.datumaro import DatumaroWriter

        return DatumaroWriter
    if target == "hf":
        from pipeline.export.hf import HFWriter

        return HFWriter
    raise ValueError(f"unknown export format {target!r}")


WRITERS = ("fiftyone", "labelstudio", "datumaro", "hf")


def _output_state(config: ExportConfig) -> tuple[Any, str, bool]:
    """``(fs, root, needs clearing)`` of the export folder; raises :class:`ExportOutputError` when unusable."""
    import json

    fs, root = fs_root(config.output, config.out_storage_options)
    existing = list_files(fs, root)
    if not existing:
        return fs, root, False
    raw = read_bytes(fs, posixpath.join(root, MANIFEST))
    if raw is None:
        raise ExportOutputError(
            f"export folder {config.output} is not empty and holds no {MANIFEST} (not an earlier export); "
            "choose a new or empty folder"
        )
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = {"complete": False}
    if manifest.get("complete") and not config.overwrite:
        raise ExportOutputError(
            f"export folder {config.output} already holds a finished {manifest.get('format')} export; "
            "pass overwrite (--overwrite) to replace it, or choose a new folder"
        )
    return fs, root, True


def check_export(config: ExportConfig) -> AnnotateOutput:
    """Steps 1-2 without writing anything: the input opens and the export folder is usable.

    Raises:
        FileNotFoundError / ValueError: the input (named); ExportOutputError: the export folder.
    """
    source = open_output(config.input, config.storage_options)
    _output_state(config)
    return source


def _prepare_output(config: ExportConfig) -> tuple[Any, str]:
    """Step 2 of the module doc; returns ``(fs, root)`` of a folder that is ready to be written."""
    fs, root, clear = _output_state(config)
    if clear:
        log.info("clearing %s (an earlier export)", config.output)
        fs.rm(root, recursive=True)
        fs.invalidate_cache(root)
    return fs, root


def _copy_images(ctx: ExportContext, spill: GroupSpill[str], summary: ExportSummary) -> None:
    batch = FileBatch(ctx.fs, ctx.root)
    for got in fetch_grouped(spill, ctx.source.storage_options):
        if got.data is None:
            summary.images_missing += 1
            if len(summary.missing) < MAX_LISTED_MISSING:
                summary.missing.append(got.error or got.url)
            log.warning("image not copied: %s", got.error)
            continue
        batch.add(got.payload, got.data)
        summary.images_copied += 1
    batch.flush()


def run_export(config: ExportConfig) -> ExportSummary:
    """Export an annotate output (module doc).

    Raises:
        FileNotFoundError: the input is missing or not an annotate output.
        ValueError: invalid provenance or Parquet files (named).
        ExportOutputError: the export folder cannot be used.
    """
    started = time.perf_counter()
    # 1. the input
    source = open_output(config.input, config.storage_options)
    target = config.target
    writer_cls = writer_class(target)
    summary = ExportSummary(
        format=target,
        input=config.input,
        output=config.output,
        order=config.order,
        model_version=source.model_version,
        plumbing_check=source.plumbing_check,
    )
    # 2. the output folder
    fs, root = _prepare_output(config)
    manifest_path = posixpath.join(root, MANIFEST)
    head = {"complete": False, "format": target, "input": config.input, "started_at": utc_now()}
    write_bytes(fs, manifest_path, json_bytes(head, indent=2) + b"\n")

    with tempfile.TemporaryDirectory(prefix="odise-export-") as tmp:
        ctx = ExportContext(
            config=config, source=source, fs=fs, root=root, tmp=tmp, files=FileBatch(fs, root)
        )
        writer = writer_cls(ctx)
        embeds = target == "hf"  # images go into the Parquet rows, not next to them
        spill: GroupSpill[str] | None = GroupSpill(tmp) if config.copy_images and not embeds else None
        stats = SelectionStats()
        # 3. labels
        for item in iter_items(
            source,
            columns=writer.columns,
            min_score=config.min_score,
            max_images=config.max_images,
            order=config.order,
            stats=stats,
        ):
            writer.add(item)
            summary.images += 1
            summary.segments += len(item.row["segments"])
            summary.instances += len(item.row["instances"]) if writer.exports_instances else 0
            summary.uncertainty_fallback += int(item.uncertainty_fallback)
            if spill is not None:
                dest = writer.image_path(item)
                if dest is not None:
                    spill.add(item.image_url, dest)
        ctx.files.flush()
        files = writer.finish()
        ctx.files.flush()
        # 4. images
        if spill is not None:
            _copy_images(ctx, spill, summary)
            spill.close()
        for attr in ("missing", "images_read"):  # writers that embed images (hf) report their own
            value = getattr(writer, attr, None)
            if attr == "missing" and value:
                summary.images_missing += len(value)
                summary.missing.extend(value[: MAX_LISTED_MISSING - len(summary.missing)])
            elif attr == "images_read" and value:
                summary.images_copied += int(value)

    # 5. provenance and the manifest (last)
    put_json(fs, posixpath.join(root, "provenance.json"), source.provenance)
    files["provenance"] = "provenance.json"
    summary.rows_read = stats.rows_read
    summary.error_rows = stats.error_rows
    summary.segments_dropped = stats.segments_dropped
    summary.instances_dropped = stats.instances_dropped
    summary.files = {role: ctx.url_of(rel) for role, rel in files.items()}
    summary.elapsed_s = round(time.perf_counter() - started, 3)
    summary.images_per_s = round(summary.images / summary.elapsed_s, 2) if summary.elapsed_s > 0 else 0.0
    manifest = {
        **head,
        "complete": True,
        "finished_at": utc_now(),
        "selection": {"min_score": config.min_score, "max_images": config.max_images, "order": config.order},
        "files": files,
        "summary": summary.to_dict(),
    }
    write_bytes(fs, manifest_path, json_bytes(manifest, indent=2) + b"\n")
    return summary
