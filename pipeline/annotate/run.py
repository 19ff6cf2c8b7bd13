"""``run_annotation(config) -> RunSummary``: label a whole dataset with Ray Data, exactly once per image.

Steps:

1. check inputs before anything heavy: vocabulary parses, shards exist and are readable, the output is
   writable and not inside the input, the model config loads and the weights are reachable (downloaded
   into the cache if allowed), no other run writes the output: every problem is reported here, before Ray
   starts or a model is built (skipped when the caller passes what it checked: ``checked=``);
2. the output's lease is taken (:mod:`pipeline.annotate.lease`: one writer per output, renewed by a
   heartbeat, released at the end, also on Ctrl-C and errors; a stale one is taken over and the summary
   says so); under it, provenance (model, weights sha256, vocabulary and its hash, thresholds, versions,
   licences) is written to ``<output>/provenance.json`` (a rerun into the same output must use the same
   settings); the commit markers are read once (small, concurrently); leftovers of interrupted runs are
   cleaned; the plan: shards not committed yet (each gets the next commit sequence number), committed
   shards to replace (``retry_errors``: only their retryable error rows are read again; ``relabel_changed``:
   shards whose source stamp changed; replacements an interrupted run left), and the sources that changed
   since their commit (reported);
3. Ray Data streaming: one read task per shard (stream the tar, decode, resize; CPU) -> an actor pool
   with one model per GPU (built once per actor) -> encode (RLE, PNG) and write staging files (CPU); the
   driver only sees small records (keys written per shard) and commits a shard (streaming its staging
   files, atomically, marker last) as soon as all of its keys are staged, and only while it still holds the
   lease, then forgets its keys; model replicas are spread over the cluster's nodes; local paths are refused
   on a cluster with nodes on other hosts unless ``shared_filesystem``;
4. the COCO export is brought up to date (only stale parts are rebuilt); ``summary.json`` is written from the
   markers alone. A run with nothing to do reads markers, lists folders, and writes only ``summary.json``.

No Prefect import here: flows call this function.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import posixpath
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.annotate.checks import CheckedInputs, check_cluster_paths, check_inputs
from pipeline.annotate.lease import LeaseMode, OutputLease
from pipeline.annotate.stages import Annotator, overlay_plan
from pipeline.config import AnnotateConfig, RunSummary, ray_init_address
from pipeline.redact import install_log_redaction, redact, redact_text
from pipeline.shards import ShardRef

log = logging.getLogger(__name__)

__all__ = ["run_annotation", "PipelineError"]


TRANSIENT_ERRORS = (
    "Connection reset",
    "ConnectionError",
    "ConnectTimeout",
    "ReadTimeout",
    "timed out",
    "Temporary failure",
    "Service Unavailable",
    "SlowDown",
    "InternalError",
)


class PipelineError(RuntimeError):
    """The Ray pipeline failed or ended without committing every shard it started."""


# --------------------------------------------------------------------------------------------------------
# 3. Ray
# --------------------------------------------------------------------------------------------------------
def _start_ray(config: AnnotateConfig) -> bool:
    """Connect to ``ray_address`` or start a local Ray; returns True when this call started it.

    Then refuses local input/output paths when the cluster has nodes on other hosts (unless
    ``shared_filesystem``; :func:`pipeline.annotate.checks.check_cluster_paths`).
    """
    import ray

    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "log_to_driver": True,
            "configure_logging": False,
        }
        address = ray_init_address(config.ray_address)
        if address == "local":
            kwargs["num_cpus"] = config.num_cpus
        ray.init(address=address, **kwargs)
        started = True
    try:
        _check_cluster(config)
    except BaseException:
        if started:
            ray.shutdown()
        raise
    return started


def _check_cluster(config: AnnotateConfig) -> None:
    """:func:`check_cluster_paths` with the connected cluster's nodes and this driver's host names / IPs."""
    import socket

    import ray

    host = socket.gethostname()
    addresses = {ray.util.get_node_ip_address()}
    try:
        addresses.update(socket.gethostbyname_ex(host)[2])
    except OSError:
        pass
    check_cluster_paths(config, ray.nodes(), driver_host=host, driver_addresses=addresses)


def _resources(config: AnnotateConfig) -> tuple[str, float, int]:
    """(device, GPUs per actor, number of actors)."""
    import ray

    gpus = float(ray.cluster_resources().get("GPU", 0))
    device = config.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise PipelineError("device='cuda' but the Ray cluster has no GPUs")
    per_actor = (
        config.gpus_per_actor if config.gpus_per_actor is not None else (1.0 if device == "cuda" else 0.0)
    )
    if config.num_actors is not None:
        actors = config.num_actors
    elif device == "cuda" and per_actor > 0:
        actors = max(1, int(gpus // per_actor))
    else:
        actors = 1
    return device, per_actor, actors


def _to_table(fn):
    """Wrap a dict-of-lists UDF so Ray Data always receives pyarrow tables (bytes stay binary)."""

    def wrapped(batch, **kwargs):
        import pyarrow as pa

        cols = batch.to_pydict() if hasattr(batch, "to_pydict") else batch
        out = fn(cols, **kwargs)
        if hasattr(out, "__next__"):
            return (pa.Table.from_pydict(o) for o in out)
        return pa.Table.from_pydict(out)

    return wrapped


class _TableAnnotator(Annotator):
    """:class:`Annotator` speaking pyarrow tables."""

    def __call__(self, batch):  # type: ignore[override]
        import pyarrow as pa

        return pa.Table.from_pydict(super().__call__(batch.to_pydict()))


def _build_dataset(
    config: AnnotateConfig, todo, checked: CheckedInputs, provenance, device, gpus_per_actor, actors
):
    import ray

    model_cfg = checked.model_config
    sources = checked.sources
    items = [{"shard": json.dumps(asdict(s))} for s in todo]
    shard_index = {s.shard_id: i for i, s in enumerate(todo)}
    per_shard = overlay_plan(len(todo), config.overlays)
    dtype = config.dtype if config.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    model_kwargs = {
        "config": config.model,
        "checkpoint": sources.checkpoint,
        "sd_weights": sources.sd,
        "clip_weights": sources.clip,
        "offline": True if checked.located.any() else config.offline,  # files were fetched in step 1
        "cache_dir": config.cache_dir,
        "storage_options": config.storage_options,
        "dtype": None if dtype == "fp32" else dtype,
        "random_weights": config.is_plumbing_check,  # the banner and provenance say so
    }
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        _to_table(_read_stage),
        fn_kwargs={
            "storage_options": config.storage_options,
            "short_side": model_cfg.input.short_side,
            "max_size": model_cfg.input.max_size,
            "max_pixels": config.max_pixels,
            "shard_index": shard_index,
            "overlays_per_shard": per_shard,
            "overlays_total": config.overlays,
            "copy_to": config.output if config.copy_images else None,
            "copy_storage_options": config.out_storage_options,
        },
        batch_size=1,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    ds = ds.map_batches(
        _TableAnnotator,
        fn_constructor_kwargs={
            "model_kwargs": model_kwargs,
            "vocabulary_text": checked.vocabulary.to_text(),
            "predictor_kwargs": {"batch_size": config.batch_size, "tile_batch_size": config.tile_batch_size},
            "overrides": {
                "object_mask_threshold": config.object_mask_threshold,
                "overlap_threshold": config.overlap_threshold,
                "alpha": config.alpha,
                "beta": config.beta,
            },
            "device": device,
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus_per_actor if device == "cuda" else 0,
        num_cpus=config.cpus_per_actor,
    )  # Ray Data spreads the replicas over the nodes (its default strategy, SPREAD), restarts a dead actor and
    # retries its batches (max_restarts / max_task_retries -1 by default)
    ds = ds.map_batches(
        _to_table(_encode_stage),
        fn_kwargs={
            "out_url": config.output,
            "storage_options": config.out_storage_options,
            "provenance_json": provenance.to_json(indent=None),
            "include_png": config.include_png,
        },
        batch_size=config.batch_size,
        batch_format="pyarrow",
        num_cpus=0.25,
    )
    return ds


def _read_stage(batch, **kwargs):
    from pipeline.annotate.stages import ReadShard

    return ReadShard(**kwargs)(batch)


def _encode_stage(batch, **kwargs):
    from pipeline.annotate.stages import EncodeAndStage

    return EncodeAndStage(**kwargs)(batch)


# --------------------------------------------------------------------------------------------------------
# 4. driver
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _RetryShard(ShardRef):
    """A committed shard whose retryable error rows are relabelled: the read stage reads only ``only_keys``."""

    only_keys: tuple[str, ...] = ()


@dataclass
class _WorkPlan:
    """What this run labels: ``todo`` (new shards, then replacements), each shard's commit ``seqs`` and
    ``modes`` (None: first commit, ``"retry"`` / ``"relabel"``: replacement), ``retry_keys`` per retried
    shard, ``direct``: interrupted retries with nothing left to relabel (re-committed from the base alone),
    ``stamps`` (source stamps of the listed shards), ``changed`` (committed shards whose source changed),
    ``shards`` (the listed shards, new images of grown folders regrouped), ``listed`` (those plus committed
    image shards of listed folders, for the summary), ``new`` (how many of ``todo`` are first commits)."""

    todo: list[ShardRef] = field(default_factory=list)
    seqs: dict[str, int] = field(default_factory=dict)
    modes: dict[str, str | None] = field(default_factory=dict)
    retry_keys: dict[str, list[str]] = field(default_factory=dict)
    direct: list[str] = field(default_factory=list)
    stamps: dict[str, Any] = field(default_factory=dict)
    changed: list[str] = field(default_factory=list)
    listed: list[ShardRef] = field(default_factory=list)
    shards: list[ShardRef] = field(default_factory=list)
    new: int = 0


def _retryable_keys(out: str, out_opts: dict, marker: dict) -> list[str]:
    """Keys of the committed shard's rows whose ``retryable`` is true (reads two columns of its Parquet)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(out, **out_opts)
    with fs.open(posixpath.join(root.rstrip("/"), marker["parquet"]), "rb") as fh:
        table = pq.read_table(fh, columns=["key", "retryable"])
    return sorted(table.filter(pc.fill_null(table.column("retryable"), False)).column("key").to_pylist())


def _plan_work(config: AnnotateConfig, shards: list[ShardRef], done: dict[str, dict]) -> _WorkPlan:
    """Decide what to label: shards not committed yet, committed shards to replace (``retry_errors``,
    ``relabel_changed``, replacements an interrupted run left), with their commit sequence numbers."""
    from pipeline.annotate.commit import (
        load_members,
        next_seq,
        pending_replacements,
        source_changed,
        source_stamps,
    )
    from pipeline.shards import SHARD_ERROR_KEY, exclude_labelled_images

    out, out_opts = config.output, config.out_storage_options
    plan = _WorkPlan()
    listed_roots = {s.root for s in shards if s.kind == "images"}
    # an image folder that grew since a committed run: label only its new images (never one twice);
    # member lists are loaded only for such folders
    shards = exclude_labelled_images(
        shards, done, config.images_per_virtual_shard, load_members=lambda m: load_members(out, out_opts, m)
    )
    plan.shards = shards
    by_id = {s.shard_id: s for s in shards}
    # committed image shards of a listed folder count as listed (not stale) in the summary
    plan.listed = list(shards) + [
        ShardRef(url=str(m.get("shard", "")), shard_id=sid, kind="images")
        for sid, m in done.items()
        if sid not in by_id and (m.get("root") or str(m.get("shard", "")).split("#", 1)[0]) in listed_roots
    ]
    plan.stamps = source_stamps(shards, config.storage_options)
    plan.changed = sorted(
        sid for sid in by_id if sid in done and source_changed(done[sid], plan.stamps.get(sid))
    )
    seq = next_seq(done)
    for s in shards:
        if s.shard_id not in done:
            plan.todo.append(s)
            plan.modes[s.shard_id], plan.seqs[s.shard_id] = None, seq
            seq += 1
    plan.new = len(plan.todo)

    pending = pending_replacements(out, out_opts)
    relabel = set(plan.changed) if config.relabel_changed else set()
    relabel |= {sid for sid, rec in pending.items() if sid in done and rec.get("mode") == "relabel"}
    retry = (
        {sid for sid, m in done.items() if int(m.get("n_retryable") or 0) > 0}
        if config.retry_errors
        else set()
    )
    retry |= {sid for sid, rec in pending.items() if sid in done and rec.get("mode") == "retry"}
    retry_keys = {}
    for sid in sorted(retry - relabel):
        keys = _retryable_keys(out, out_opts, done[sid])
        if SHARD_ERROR_KEY in keys:  # a shard-level error (e.g. a tar still being written): relabel it whole
            relabel.add(sid)
        else:
            retry_keys[sid] = keys
    for sid in sorted(relabel):
        ref = by_id.get(sid)
        if ref is None:
            log.warning("shard %s is to be relabelled but is not in the input any more; left as it is", sid)
            continue
        plan.todo.append(ref)
        plan.modes[sid], plan.seqs[sid] = "relabel", int(done[sid].get("seq", 0))
    for sid, keys in retry_keys.items():
        marker = done[sid]
        if not keys:
            plan.direct.append(sid)
            continue
        ref = by_id.get(sid)
        wanted = set(keys)
        if ref is None and marker.get("kind") == "images" and marker.get("root") in listed_roots:
            root = str(marker["root"]).rstrip("/") + "/"
            members = tuple(u for u in load_members(out, out_opts, marker) if u.removeprefix(root) in wanted)
            ref = ShardRef(
                url=str(marker["shard"]), shard_id=sid, kind="images", members=members, root=marker["root"]
            )
        elif ref is not None and ref.kind == "images":
            root = ref.root.rstrip("/") + "/"
            ref = dataclasses.replace(
                ref, members=tuple(u for u in ref.members if u.removeprefix(root) in wanted)
            )
        if ref is None:
            log.warning("shard %s has retryable errors but is not in the input any more; not retried", sid)
            continue
        if ref.kind == "images" and not ref.members:  # keys not found among the members: read them all
            ref = by_id.get(sid, ref)
        plan.todo.append(_RetryShard(**dataclasses.asdict(ref), only_keys=tuple(keys)))
        plan.modes[sid], plan.seqs[sid] = "retry", int(marker.get("seq", 0))
        plan.retry_keys[sid] = keys
    return plan


class ImageTotals:
    """How many images the shards being labelled hold: exact for image folders (listed), exact for tar shards
    once read (their ``end`` record), estimated for unread tars from the mean of the tars read so far.

    O(1) per update and per query, so the driver can call it on every progress event.
    """

    def __init__(self, todo: Sequence[ShardRef]) -> None:
        self._tars = {s.shard_id for s in todo if s.kind != "images"}
        self._known = sum(len(s.members) for s in todo if s.kind == "images")
        self._tar_images = 0
        self._tars_read: set[str] = set()

    def shard_ended(self, shard_id: str, count: int) -> None:
        """A shard's ``end`` record arrived with ``count`` samples."""
        if shard_id in self._tars and shard_id not in self._tars_read:
            self._tars_read.add(shard_id)
            self._tar_images += int(count)

    def as_dict(self) -> dict[str, Any]:
        """``{"images_total": int | None, "images_total_estimated": bool}`` (None: no tar read yet)."""
        unread = len(self._tars) - len(self._tars_read)
        if unread == 0:
            return {"images_total": self._known + self._tar_images, "images_total_estimated": False}
        if not self._tars_read:
            return {"images_total": None, "images_total_estimated": True}
        mean = self._tar_images / len(self._tars_read)
        return {
            "images_total": self._known + self._tar_images + round(mean * unread),
            "images_total_estimated": True,
        }


def run_annotation(
    config: AnnotateConfig,
    *,
    checked: CheckedInputs | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> RunSummary:
    """Label every image of ``config.input`` into ``config.output`` (see the module doc for the steps).

    ``checked`` is what :func:`~pipeline.annotate.checks.check_inputs` returned for this config (the CLI
    and the flow pass it, so the inputs are checked once); None: check here.

    ``on_progress`` is called with ``{"event", "shards_done", "shards_total", "images", "images_staged",
    "images_total", "images_total_estimated", "errors", "segments", "elapsed_s"}``: ``event="shard"`` after
    each committed shard (``images`` / ``errors`` / ``segments`` count committed shards), ``event="images"``
    when labelling starts and whenever newly labelled images are staged (``images_staged``, so progress
    moves within a large shard). ``images_total`` is the number of images in the shards labelled now
    (:class:`ImageTotals`: estimated while tar shards are unread, None before the first tar is read). The
    Prefect flow and the CLI turn it into a progress artifact / bar.

    Raises:
        LeaseHeldError: another live run holds the output's lease (checked before anything is written).
        LeaseLostError: this run lost the lease while running (it stopped before committing anything else).
    """
    started = time.perf_counter()
    install_log_redaction()  # no credential in any log record of this process (pipeline.redact)
    # 1. checks (once: the caller's, when given)
    if checked is None:
        checked = check_inputs(config)
    elif checked.output != config.output:
        raise ValueError(f"checked inputs are for output {checked.output}, not {config.output}")
    run_id = f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    if config.is_plumbing_check:
        log.warning("PLUMBING CHECK: model %r with random weights; the labels are meaningless", config.model)
    # 2. one writer per output: everything below (provenance, cleanup, labelling, commits) runs under the lease
    lease = OutputLease(
        config.output,
        config.out_storage_options,
        run_id=run_id,
        ttl_s=config.lease_ttl_s,
        renew_s=config.lease_renew_s,
        mode=lease_mode_for(config.output, checked.conditional_writes),
    )
    with lease:
        return _label_under_lease(config, checked, lease, run_id, started, on_progress)


def lease_mode_for(output: str, conditional_writes: bool) -> LeaseMode:
    """The lease mode of ``output`` given the checked store capability (:mod:`pipeline.annotate.lease`)."""
    if "://" not in output or output.startswith("file://"):
        return "local"
    return "conditional" if conditional_writes else "claims"


def _settle_provenance(config: AnnotateConfig, checked: CheckedInputs):
    """The output's provenance for this run, read at most once per run (in the checks).

    An existing compatible ``provenance.json`` was read by the checks; a new one is created here, under the
    lease, without overwriting one that appeared since the checks (local: hard link; S3 with conditional
    writes: ``If-None-Match: *``); when one did appear (or the store has no conditional writes) it is read
    and compared as usual (:func:`pipeline.annotate.commit.write_provenance`).
    """
    from pipeline.annotate.commit import write_provenance
    from pipeline.storage import create_exclusive, fs_root

    out, out_opts = config.output, config.out_storage_options
    provenance = checked.new_provenance
    if checked.provenance is not None:
        return checked.provenance
    if not config.allow_provenance_mismatch and checked.conditional_writes:
        fs, root = fs_root(out, out_opts)
        if create_exclusive(
            fs, posixpath.join(root, "provenance.json"), (provenance.to_json() + "\n").encode()
        ):
            return provenance
    return write_provenance(out, out_opts, provenance, allow_mismatch=config.allow_provenance_mismatch)


def _label_under_lease(
    config: AnnotateConfig,
    checked: CheckedInputs,
    lease: OutputLease,
    run_id: str,
    started: float,
    on_progress: Callable[[dict[str, Any]], None] | None,
) -> RunSummary:
    """Steps 2-4 of :func:`run_annotation`, while ``lease`` is held.

    Driver cost does not grow with the images: it keeps the small commit markers (no key or member lists),
    the keys of the shards in flight (freed at their commit), and commits stream their staging files.
    """
    from pipeline.annotate.coco import finalize_coco
    from pipeline.annotate.commit import (
        begin_replacement,
        clean_uncommitted,
        commit_shard,
        committed_shards,
        write_run_summary,
    )

    shards: list[ShardRef] = list(checked.shards)
    out, out_opts = config.output, config.out_storage_options
    # 2. provenance, cleanup, resume
    provenance = _settle_provenance(config, checked)
    provenance = type(provenance)(**{**provenance.to_dict(), "run_id": run_id})
    done = committed_shards(out, out_opts)  # small markers, fetched concurrently, read once per run
    cleaned = clean_uncommitted(out, out_opts, committed=done)
    if cleaned:
        log.info("cleaned leftovers of %d interrupted shard(s): %s", len(cleaned), cleaned[:10])
    plan = _plan_work(config, shards, done)
    summary = RunSummary(
        run_id=run_id,
        output=out,
        shards_total=len(plan.shards),
        shards_skipped=sum(1 for s in plan.shards if s.shard_id in done and not plan.modes.get(s.shard_id)),
        plumbing_check=config.is_plumbing_check,
    )
    summary.lease_takeover = lease.taken_over.to_dict() if lease.taken_over is not None else None
    summary.changed_shards = {
        "count": len(plan.changed),
        "first": plan.changed[:20],
        "relabelled": config.relabel_changed,
    }
    if plan.changed and not config.relabel_changed:
        log.warning(
            "%d committed shard(s) changed at the source since their commit (first: %s); rerun with "
            "--relabel-changed to relabel them",
            len(plan.changed),
            plan.changed[:5],
        )
    log.info(
        "%d shard(s): %d to label, %d already committed, %d to replace",
        summary.shards_total, plan.new, summary.shards_skipped, len(plan.todo) - plan.new + len(plan.direct),
    )  # fmt: skip
    categories = checked.vocabulary.coco_categories()
    counts: Counter = Counter()

    def record(sid: str, info, old: dict | None, staged: int) -> None:
        """Count a finished commit (a replacement counts what changed) and keep its marker."""
        mode = plan.modes.get(sid)
        summary.shards_committed += 1
        if mode == "retry" and old is not None:
            fixed = info.n_labelled - int(old.get("n_labelled", 0))
            summary.shards_retried += 1
            summary.images += staged
            summary.labelled += fixed
            summary.errors += staged - fixed
            summary.segments += info.n_segments - int(old.get("n_segments", 0))
        else:
            summary.shards_relabelled += mode == "relabel"
            summary.images += info.n_images
            summary.labelled += info.n_labelled
            summary.errors += info.n_errors
            summary.segments += info.n_segments
        counts.update(info.category_counts)
        done[sid] = info.to_marker()

    for sid in plan.modes:
        if plan.modes[sid] is not None:
            begin_replacement(out, out_opts, sid, mode=plan.modes[sid], run_id=run_id)
    for sid in plan.direct:  # an interrupted retry with nothing left to relabel: finish it from the base
        begin_replacement(out, out_opts, sid, mode="retry", run_id=run_id)
        shard = {
            "url": done[sid]["shard"],
            "shard_id": sid,
            "kind": done[sid].get("kind"),
            "root": done[sid].get("root"),
        }
        info = commit_shard(out, out_opts, shard=shard, expected_keys=0, provenance=provenance,
                            categories=categories, write_coco=config.write_coco, replace="retry", retry_keys=())  # fmt: skip
        plan.modes[sid] = "retry"
        record(sid, info, done[sid], 0)

    # 3. Ray pipeline
    todo = plan.todo
    if todo:
        import ray

        started_ray = _start_ray(config)
        try:
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            if hasattr(ctx, "execution_no_progress_timeout_s"):
                ctx.execution_no_progress_timeout_s = config.no_progress_timeout_s
            # transient storage errors in read / write tasks are retried (matched on the message)
            ctx.retried_map_errors = list(TRANSIENT_ERRORS)
            ctx.max_map_retries = 3
            device, gpus_per_actor, actors = _resources(config)
            ds = _build_dataset(config, todo, checked, provenance, device, gpus_per_actor, actors)
            by_id = {s.shard_id: s for s in todo}
            keys: dict[str, set[str]] = {s.shard_id: set() for s in todo}  # freed at each shard's commit
            totals: dict[str, int] = {}
            image_totals = ImageTotals(todo)
            staged_total = 0
            committing: dict[str, Future] = {}  # submitted commits
            staged_keys: dict[str, int] = {}  # keys each submitted commit staged
            harvested: set[str] = set()  # commits whose result is counted
            with ThreadPoolExecutor(max_workers=2, thread_name_prefix="commit") as pool:

                def commit(sid: str, expected: set[str]):
                    lease.ensure_held()  # a run that lost the output's lease commits nothing more
                    return commit_shard(
                        out,
                        out_opts,
                        shard=by_id[sid],
                        expected_keys=expected,
                        provenance=provenance,
                        categories=categories,
                        write_coco=config.write_coco,
                        seq=plan.seqs[sid],
                        source=plan.stamps.get(sid),
                        replace=plan.modes.get(sid),
                        retry_keys=plan.retry_keys.get(sid),
                    )

                def maybe_commit(sid: str) -> None:
                    if sid in totals and sid not in committing and len(keys[sid]) >= totals[sid]:
                        staged_keys[sid] = totals[sid]
                        committing[sid] = pool.submit(commit, sid, keys.pop(sid))

                def harvest(block: bool) -> None:
                    for sid, fut in committing.items():
                        if sid in harvested or not (block or fut.done()):
                            continue
                        info = fut.result()
                        harvested.add(sid)
                        plan.retry_keys.pop(sid, None)
                        record(sid, info, done.get(sid), staged_keys[sid])
                        if on_progress is not None:
                            on_progress(progress("shard"))

                def progress(event: str) -> dict[str, Any]:
                    return {
                        "event": event,
                        "shards_done": summary.shards_committed + summary.shards_skipped,
                        "shards_total": summary.shards_total,
                        "images": summary.images,
                        "images_staged": staged_total,
                        **image_totals.as_dict(),
                        "errors": summary.errors,
                        "segments": summary.segments,
                        "elapsed_s": round(time.perf_counter() - started, 1),
                    }

                if on_progress is not None:
                    on_progress(progress("images"))  # labelling starts: totals known so far
                try:
                    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                        for rec in batch.to_pylist():
                            sid = rec["shard_id"]
                            if rec["type"] == "end":
                                totals[sid] = rec["count"]
                                image_totals.shard_ended(sid, rec["count"])
                            elif rec["type"] == "staged":
                                if sid not in committing:
                                    before = len(keys[sid])
                                    keys[sid].update(rec["keys"])
                                    staged_total += len(keys[sid]) - before
                                summary.overlays.extend(posixpath.join(out, o) for o in rec["overlays"])
                                if on_progress is not None:
                                    on_progress(progress("images"))
                            else:
                                continue
                            maybe_commit(sid)
                        harvest(block=False)
                except Exception as exc:
                    message = redact_text(f"annotation pipeline failed: {type(exc).__name__}: {exc}")
                    raise PipelineError(message) from exc
                harvest(block=True)
            missing = sorted(sid for sid in by_id if sid not in committing)
            if missing:
                raise PipelineError(
                    f"{len(missing)} shard(s) did not receive all their samples and were not committed: {missing[:10]}; "
                    "rerun to retry them (committed shards are kept)"
                )
        finally:
            if started_ray:
                ray.shutdown()

    # 4. exports and summary (from the markers alone: a run with nothing to do reads no fragment, no Parquet)
    lease.ensure_held()
    if config.write_coco:
        coco = finalize_coco(
            out,
            out_opts,
            categories,
            markers=done,
            max_images_per_file=config.coco_max_images_per_file,
            image_root=config.image_root,
            copied_images=config.copy_images,
        )
        summary.coco = {k: coco[k] for k in ("panoptic", "instances", "index")}
        summary.coco_parts, summary.coco_parts_rebuilt = int(coco["parts"]), int(coco["rebuilt"])
    summary.elapsed_s = round(time.perf_counter() - started, 3)
    summary.images_per_s = round(summary.images / summary.elapsed_s, 3) if summary.elapsed_s else 0.0
    summary.category_counts = dict(counts.most_common())
    totals_file = write_run_summary(
        out,
        out_opts,
        provenance=None,
        shards=plan.listed,
        markers=done,
        # (errors by reason are the file's top-level "errors_by_reason", over every committed shard)
        extra={
            "last_run": redact(
                {k: v for k, v in summary.to_dict().items() if k != "error_reasons"}, keys=False
            ),
            "changed_shards": redact(summary.changed_shards, keys=False),
        },
    )
    summary.error_reasons = dict(totals_file.get("errors_by_reason", {}))
    return summary
