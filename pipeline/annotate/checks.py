"""Checks before an annotation run, and the run's provenance record.

:func:`check_inputs` validates everything that can be checked without building a model (vocabulary,
shards, output, model config, weights, the output's lease) and raises on the first problem, naming the
input, before Prefect or Ray start. It returns a typed :class:`CheckedInputs`, which is passed down instead
of checking again: ``odise-annotate`` checks, hands the result to the flow (:func:`hand_over` /
:func:`take_over`: an in-process hand-off keyed by the config, because a Prefect parameter cannot carry
it), the flow's ``check`` task passes it to its ``label`` task the same way, and ``label`` gives it to
``run_annotation(config, checked=...)``. One CLI run therefore lists the shards, writes the probe object and
reads the output's provenance once.

:func:`provenance_for` turns the checked inputs into the :class:`~pipeline.schema.RunProvenance` written
beside the labels. :func:`check_cluster_paths` refuses local paths on a Ray cluster with nodes on other
hosts (a pure function over ``ray.nodes()`` records).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pipeline.config import AnnotateConfig

if TYPE_CHECKING:
    from odise_model.config import ODISEConfig
    from odise_model.vocabulary import Vocabulary
    from odise_model.weights_sources import Located, WeightSources
    from pipeline.schema import RunProvenance
    from pipeline.shards import ShardRef

__all__ = [
    "CheckedInputs",
    "ClusterPathError",
    "OutputError",
    "check_cluster_paths",
    "check_inputs",
    "check_output_writable",
    "hand_over",
    "provenance_for",
    "remote_nodes",
    "resolve_vocabulary",
    "take_over",
]


class OutputError(OSError):
    """The output URL cannot be written (or lies inside the input)."""


class ClusterPathError(OutputError):
    """A local input/output path on a Ray cluster with nodes on other hosts (they cannot see it)."""


@dataclass(frozen=True)
class CheckedInputs:
    """What :func:`check_inputs` found, passed down so nothing is checked twice.

    Attributes:
        output: the output URL it was checked for (``run_annotation`` refuses a result for another output).
        vocabulary: the parsed vocabulary (``odise_model.Vocabulary``).
        shards: the listed shards (``pipeline.shards.ShardRef``), in order.
        model_config: the model's ``odise_model.config.ODISEConfig``.
        sources: the weight sources asked for (``odise_model.weights_sources.WeightSources``).
        located: the weights found on local disk (``odise_model.weights_sources.Located``; fetched into the
            cache when allowed).
        new_provenance: the provenance this run writes (``RunProvenance``; ``run_id`` is a placeholder).
        provenance: the output's existing ``provenance.json`` (None for a new output, or when
            ``allow_provenance_mismatch`` skipped the comparison).
        conditional_writes: the output store honours conditional writes (local: always; S3: probed); picks
            the lease mode (:mod:`pipeline.annotate.lease`).
        checked_at: ``time.time()`` of the check.

    ``checked["shards"]`` (mapping-style access) is kept for callers written against the former dict.
    """

    output: str
    vocabulary: Vocabulary
    shards: tuple[ShardRef, ...]
    model_config: ODISEConfig
    sources: WeightSources
    located: Located
    new_provenance: RunProvenance
    provenance: RunProvenance | None = None
    conditional_writes: bool = False
    checked_at: float = field(default_factory=time.time)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    @property
    def images_known(self) -> int:
        """Images in the listed image-folder shards (tar shards are counted only when read)."""
        return sum(len(s.members) for s in self.shards if s.kind == "images")


# --------------------------------------------------------------------------------------------------------
# 1. checks
# --------------------------------------------------------------------------------------------------------
def resolve_vocabulary(config: AnnotateConfig):
    """The run's vocabulary: ``vocab_file`` + ``vocab`` + ``caption`` nouns, then ``merge_vocab``, or the demo
    preset's list (:func:`odise_model.vocabulary.compose_vocabulary`; precedence in ``AnnotateConfig``'s doc)."""
    from odise_model.vocabulary import compose_vocabulary

    return compose_vocabulary(
        file=config.vocab_file,
        inline=config.vocab,
        caption=config.caption,
        merge_with=config.merge_vocab,
        demo=config.preset == "demo",
        storage_options=config.storage_options,
    )


def check_output_writable(url: str, storage_options: dict) -> bool:
    """Write and delete a probe object under ``url``; raise :class:`OutputError` naming the URL otherwise.

    Returns whether the store honours conditional writes (local: True; S3: the same probe object is PUT
    again with ``If-None-Match: *`` and a wrong ``If-Match``, both must be refused; other stores: False).
    """
    from fsspec.core import url_to_fs

    from pipeline.annotate.lease import honours_conditional_writes

    try:
        fs, root = url_to_fs(url, **storage_options)
        probe = posixpath.join(root.rstrip("/"), f".write-probe-{uuid.uuid4().hex}")
        local = not ("://" in url and not url.startswith("file://"))
        if local:
            if os.path.exists(root) and not os.path.isdir(root):
                raise OutputError(
                    f"output {url} is a file, not a folder; give a folder (it is created if missing)"
                )
            os.makedirs(root, exist_ok=True)
        fs.pipe_file(probe, b"ok")
        try:
            conditional = local or honours_conditional_writes(fs, probe)
        finally:
            fs.rm_file(probe)
        return conditional
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
            raise OutputError(
                f"output {config.output} lies inside the input folder {base}; its files would be read as input"
            )


def check_inputs(config: AnnotateConfig) -> CheckedInputs:
    """Validate everything that can be checked without building a model (fast; raises on the first problem).

    In order: the vocabulary parses; the shards exist (listed once); the output is not inside the input;
    the model config loads; the weights are reachable (fetched into the cache when allowed); the output is
    writable (one probe object, which also tells whether the store honours conditional writes); no live
    run holds the output's lease; the output's provenance (read once) matches this run's settings.

    Returns:
        :class:`CheckedInputs`.

    Raises:
        ``VocabularyError`` / ``FileNotFoundError`` (vocabulary), ``InputError`` (shards),
        :class:`OutputError`, ``ConfigError`` (model), ``WeightsNotFoundError`` / ``CheckpointError``
        (weights), :class:`~pipeline.annotate.lease.LeaseHeldError` (another run writes the output),
        ``ProvenanceMismatchError`` (the output holds labels of other settings).
    """
    import odise_model
    from odise_model.weights_sources import WeightLoader, WeightSources
    from pipeline.annotate.lease import check_not_leased
    from pipeline.shards import list_shards

    vocabulary = resolve_vocabulary(config)
    shards = list_shards(
        config.input, config.storage_options, images_per_virtual_shard=config.images_per_virtual_shard
    )
    _check_output_outside_input(config)
    model_cfg = odise_model.load_config(config.model)
    sources = WeightSources.resolve(
        model_cfg,
        checkpoint=config.checkpoint,
        sd_weights=config.sd_weights,
        clip_weights=config.clip_weights,
        pretrained=config.use_pretrained,
    )
    loader = WeightLoader(
        offline=config.offline, cache_dir=config.cache_dir, storage_options=config.storage_options
    )
    located = loader.locate_all(sources)
    conditional = check_output_writable(
        config.output, config.out_storage_options
    )  # creates a local output folder
    # another run writes this output: fail before Prefect or Ray start (the run takes the lease atomically)
    check_not_leased(config.output, config.out_storage_options)
    new = provenance_for(
        config, {"vocabulary": vocabulary, "model_config": model_cfg, "located": located}, "check"
    )
    existing = None
    if not config.allow_provenance_mismatch:
        # an output labelled with another model / vocabulary / thresholds: refuse now, not after Ray started
        from pipeline.annotate.commit import check_provenance

        existing = check_provenance(config.output, config.out_storage_options, new)
        _check_copy_images(config, existing)
    return CheckedInputs(
        output=config.output,
        vocabulary=vocabulary,
        shards=tuple(shards),
        model_config=model_cfg,
        sources=sources,
        located=located,
        new_provenance=new,
        provenance=existing,
        conditional_writes=conditional,
    )


def _check_copy_images(config: AnnotateConfig, existing: RunProvenance | None) -> None:
    """An output is labelled with ``copy_images`` on or off, not both: its COCO ``file_name`` of every image is
    relative to one root (``<output>/images/`` or the defaults)."""
    if existing is None:
        return
    was = bool(existing.settings.get("copy_images", False))
    if was != config.copy_images:
        from pipeline.annotate.commit import ProvenanceMismatchError

        raise ProvenanceMismatchError(
            f"{config.output} was labelled {'with' if was else 'without'} copy_images (--copy-images; "
            "provenance.json settings.copy_images); give the same setting, or use a new output folder "
            "(odise-export --copy-images makes a self-contained copy of an existing output)"
        )


# --------------------------------------------------------------------------------------------------------
# hand-off: check once per process, use the result in the next step
# --------------------------------------------------------------------------------------------------------
_HANDOFF: dict[str, CheckedInputs] = {}
_HANDOFF_LOCK = threading.Lock()
HANDOFF_MAX_AGE_S = 600.0
"""A handed-over result older than this is not used (the next step checks again)."""


def _handoff_key(config: AnnotateConfig, scope: str | None) -> str:
    text = config.model_dump_json() + "\x00" + (scope or "")
    return hashlib.sha256(text.encode()).hexdigest()


def hand_over(config: AnnotateConfig, checked: CheckedInputs, scope: str | None = None) -> None:
    """Leave ``checked`` for the next step of this process that runs ``config`` (see :func:`take_over`).

    ``scope`` separates otherwise equal configs (the flows pass the ``storage_block`` name: the checked
    config had that block's credentials merged in). Keys are hashes; no credential is kept as a key.
    """
    with _HANDOFF_LOCK:
        _HANDOFF[_handoff_key(config, scope)] = checked


def take_over(config: AnnotateConfig, scope: str | None = None) -> CheckedInputs | None:
    """The result handed over for ``config`` (removed: each result is used once), or None.

    None when nothing was handed over, when it is older than :data:`HANDOFF_MAX_AGE_S`, or when it was
    checked for another output; the caller then checks again.
    """
    with _HANDOFF_LOCK:
        checked = _HANDOFF.pop(_handoff_key(config, scope), None)
    if (
        checked is None
        or time.time() - checked.checked_at > HANDOFF_MAX_AGE_S
        or checked.output != config.output
    ):
        return None
    return checked


# --------------------------------------------------------------------------------------------------------
# cluster: local paths and nodes on other hosts
# --------------------------------------------------------------------------------------------------------
def _is_local_path(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def remote_nodes(
    nodes: Iterable[Mapping[str, Any]], *, driver_host: str, driver_addresses: Iterable[str]
) -> list[Mapping[str, Any]]:
    """The alive nodes of ``nodes`` (``ray.nodes()`` records) that are not on the driver's host.

    A node is on the driver's host when its ``NodeManagerHostname`` equals ``driver_host`` or its
    ``NodeManagerAddress`` is one of ``driver_addresses`` (the driver's IPs, loopback included).
    """
    addresses = set(driver_addresses) | {"127.0.0.1", "::1", "localhost"}
    return [
        n
        for n in nodes
        if n.get("Alive", True)
        and n.get("NodeManagerHostname") != driver_host
        and n.get("NodeManagerAddress") not in addresses
    ]


def check_cluster_paths(
    config: AnnotateConfig,
    nodes: Iterable[Mapping[str, Any]],
    *,
    driver_host: str,
    driver_addresses: Iterable[str],
) -> None:
    """Refuse local input/output paths when the Ray cluster has nodes on other hosts (pure function).

    Ray runs the read and write stages on any node; a plain path (or ``file://``) on the driver's disk does
    not exist there, unless ``config.shared_filesystem`` says every node mounts it at the same path.

    Raises:
        ClusterPathError: naming the local paths and the remote nodes.
    """
    if config.shared_filesystem:
        return
    specs = [config.input] if isinstance(config.input, str) else list(config.input)
    local = [("output", config.output)] if _is_local_path(config.output) else []
    local += [("input", s) for s in specs if _is_local_path(s)]
    if not local:
        return
    remote = remote_nodes(nodes, driver_host=driver_host, driver_addresses=driver_addresses)
    if not remote:
        return
    shown = ", ".join(
        f"{n.get('NodeManagerHostname') or '?'} ({n.get('NodeManagerAddress') or '?'})" for n in remote[:5]
    )
    more = f" and {len(remote) - 5} more" if len(remote) > 5 else ""
    paths = "; ".join(f"{what} {url}" for what, url in local)
    raise ClusterPathError(
        f"{paths}: a local path on a Ray cluster with nodes on other hosts ({shown}{more}), which cannot see it. "
        "Use object storage (s3://...) for inputs and outputs, or, if every node mounts this path at the same "
        "place (NFS ...), say so with --shared-filesystem (shared_filesystem=true)"
    )


# --------------------------------------------------------------------------------------------------------
# 2. provenance
# --------------------------------------------------------------------------------------------------------
def provenance_for(
    config: AnnotateConfig, checked: CheckedInputs | Mapping[str, Any], run_id: str
) -> RunProvenance:
    """The provenance record of a run of ``config`` over ``checked`` inputs, with id ``run_id``; URLs in it are
    redacted (no user-info, signatures, tokens)."""
    from pipeline.redact import redact, redact_text, redact_url, url_identity
    from pipeline.schema import RunProvenance

    model_cfg = checked["model_config"]
    vocab = checked["vocabulary"]
    located = checked["located"]
    weights = located.provenance()
    post = model_cfg.postprocess
    thresholds = {
        "object_mask_threshold": config.object_mask_threshold
        if config.object_mask_threshold is not None
        else post.object_mask_threshold,
        "overlap_threshold": config.overlap_threshold
        if config.overlap_threshold is not None
        else post.overlap_threshold,
        "alpha": config.alpha if config.alpha is not None else model_cfg.classifier.alpha,
        "beta": config.beta if config.beta is not None else model_cfg.classifier.beta,
    }
    # the vocabulary file by its identity (a signed URL without its signature), then any credential masked
    vocab_config = (
        config.model_copy(update={"vocab_file": url_identity(config.vocab_file)})
        if config.vocab_file
        else config
    )
    licences = sorted({w["license"] for w in weights.values() if w and w.get("license")})
    if config.is_plumbing_check:
        licences = ["none: random weights (plumbing check, labels are meaningless)"]
    return RunProvenance(
        run_id=run_id,
        model_variant=model_cfg.name,
        weights_sha256={k: (None if w is None else w["sha256"]) for k, w in weights.items()},
        vocabulary_source=redact_text(vocab_config.vocabulary_spec),
        vocabulary_sha256=vocab.sha256(),
        categories=vocab.coco_categories(),
        thresholds=thresholds,
        weights_licences="; ".join(licences),
        settings={
            "weights": {
                k: (None if w is None else redact_url(url_identity(str(w["source"]))))
                for k, w in weights.items()
            },
            "plumbing_check": config.is_plumbing_check,
            "input_resize": {"short_side": model_cfg.input.short_side, "max_size": model_cfg.input.max_size},
            "include_png": config.include_png,
            "copy_images": config.copy_images,
            "vocabulary": redact(vocab_config.vocabulary_settings, keys=False),
        },
    )
