"""Fine-tuning ODISE on labeled shards: settings, the training loop, checkpoints, metrics, evaluation.

``run_training(TrainConfig(...)) -> TrainSummary`` is what the ``odise-train`` command and the Prefect
``train`` flow call; it imports no Prefect. Field names of :class:`TrainConfig` are the command-line flags
(``--train``, ``--val``, ``--output``, ``--model``, ``--max-steps``, ``--resume``, ...).

Recipe (official ODISE, ``configs/common/*`` at commit 2b187e4, unless a setting says otherwise):

* data: :class:`pipeline.train.data.TrainDataStream` (COCO LSJ: flip, scale 0.1-2.0, fixed ``crop_size``
  crop with padding; crowd dropped; deterministic and resumable);
* losses: :class:`odise_model.training.TrainingModule` (Hungarian matching 2/5/5 on 12,544 points, set
  criterion with importance sampling, no-object weight 0.1, deep supervision; caption variant adds the
  grounding loss);
* optimizer: AdamW, ``lr`` 1e-4, weight decay 0.05, none on normalisation parameters and biases
  (detectron2 ``get_default_optimizer_params(weight_decay_norm=0, weight_decay_bias=0)``), default betas;
* schedule (:func:`lr_multiplier`): linear warm-up from 0.067 over the first ``500/184375`` of
  ``max_steps`` (about 250 iterations of the official 92,188), then x0.1 at 88.9% and x0.01 at 96.3%
  (the official 100-epoch LSJ schedule expressed as fractions, evaluated at ``step / max_steps``);
* gradient clipping: global L2 norm 0.01 over the optimizer's parameters;
* bf16 autocast on GPU (the pixel decoder runs in float32 inside the model);
* workers: one process by default; ``num_workers > 1`` or a ``ray_address`` runs the same loop on Ray Train
  (``TorchTrainer``, DDP; ``batch_size`` is the total over workers, as the official ``total_batch_size``).

Outputs under ``output`` (any fsspec URL)::

    checkpoints/model_0004500.pth   official layout {"model": ...} + {"trainer": optimizer, step, data, rng, ...}
    checkpoints/last_checkpoint     name of the newest checkpoint (detectron2 convention)
    metrics.jsonl                   one JSON object per line: {"type": "train"|"eval", "step": ..., ...}
    train_summary.json              the TrainSummary of the last run

``resume=True`` continues from ``last_checkpoint`` (model, optimizer, schedule step, data position, RNG);
the next steps are exactly those an uninterrupted run would take (tested).

Output safety:

* an output that already holds a training run (``metrics.jsonl``, ``train_summary.json`` or anything
  under ``checkpoints/``) is refused without ``resume=True`` (:class:`TrainOutputError`, exit code 2 of
  ``odise-train``): a new run never empties another run's metrics or overwrites its checkpoints;
* every file is written whole through :func:`pipeline.storage.write_bytes` (locally: temp file, fsync,
  ``os.replace``; object stores: one PUT); a checkpoint is fsync'ed (and its folder, locally) before
  ``last_checkpoint`` names it, and ``last_checkpoint`` itself is replaced atomically;
* an empty or torn ``last_checkpoint``, one naming a missing file, or checkpoints without a
  ``last_checkpoint`` stop a resume with :class:`TrainStateError` naming the file (never a silent restart
  at step 0).

Credentials: ``run_training(cfg, credentials=...)`` takes a picklable loader (``.load() -> dict`` of fsspec
options, e.g. ``flows._prefect.BlockCredentials``) that is called where files are opened. Ray Train keeps
``train_loop_config`` in its run state, so only the loader (a block name) goes there, never values; a
``TrainConfig`` whose ``storage_options`` hold credentials is refused for Ray runs
(:mod:`pipeline.redact` decides what a credential is).
"""

from __future__ import annotations

import bisect
import contextlib
import io
import json
import logging
import os
import posixpath
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from pipeline.config import TrainConfig, ray_init_address
from pipeline.redact import credential_findings, install_log_redaction
from pipeline.storage import fs_root, is_local, list_files, read_bytes, write_bytes

__all__ = [
    "TrainSummary",
    "TrainOutputError",
    "TrainStateError",
    "CredentialsLoader",
    "run_training",
    "lr_multiplier",
    "evaluate_on_shards",
    "last_checkpoint",
    "check_output",
]

logger = logging.getLogger(__name__)

_SCHEDULE_UPDATES = 184_375  # the official schedule is the 100-epoch LSJ one, evaluated at step / max_steps
_WARMUP_FRACTION = 500 / _SCHEDULE_UPDATES
_MILESTONES = (163_889, 177_546)


@dataclass
class TrainSummary:
    """What a training run did.

    Attributes:
        output: the output URL.
        model: the variant.
        start_step: step the run started from (> 0 when resumed).
        steps: step reached (= ``max_steps`` when finished).
        checkpoint: URL of the newest checkpoint.
        metrics: URL of ``metrics.jsonl``.
        last_eval: the last evaluation (``{"step", "PQ", "SQ", "RQ", ...}``) or None.
        wall_time_s: seconds of the whole run; train_time_s: seconds in training steps.
        images_per_s: training images per second over all workers.
        num_workers, device: where it ran.
    """

    output: str
    model: str
    start_step: int
    steps: int
    checkpoint: str | None
    metrics: str
    last_eval: dict[str, Any] | None
    wall_time_s: float
    train_time_s: float
    images_per_s: float
    num_workers: int
    device: str
    losses: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------------


def lr_multiplier(step: int, max_steps: int, *, warmup_factor: float = 0.067) -> float:
    """Learning-rate factor of ``step`` (0-based) as detectron2's ``LRMultiplier`` of the official config.

    ``where = step / max_steps``; during the warm-up (``where < 500/184375``) the factor rises linearly from
    ``warmup_factor`` to 1; afterwards it is ``[1, 0.1, 0.01][bisect_right([163889, 177546],
    int((where + 1e-6) * 184375))]`` (fvcore ``MultiStepParamScheduler``), i.e. drops at 88.9% and 96.3%.
    """
    where = step / max_steps
    if where < _WARMUP_FRACTION:
        alpha = where / _WARMUP_FRACTION
        return warmup_factor * (1 - alpha) + alpha
    epoch = int((where + 1e-6) * _SCHEDULE_UPDATES)
    return (1.0, 0.1, 0.01)[bisect.bisect_right(_MILESTONES, epoch)]


# --------------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------------


class TrainOutputError(ValueError):
    """The output already holds a training run and ``resume`` is not set (the message names the output)."""


class TrainStateError(ValueError):
    """The checkpoint state under an output is damaged (empty / torn ``last_checkpoint``, missing file)."""


class CredentialsLoader(Protocol):
    """A picklable source of fsspec credentials, resolved where files are opened (e.g. a Ray Train worker)."""

    def load(self) -> dict[str, Any]: ...


_CHECKPOINT_NAME = re.compile(r"^model_\d+\.pth$")
_RUN_FILES = ("metrics.jsonl", "train_summary.json")


def _read_text(url: str, storage_options: dict) -> str | None:
    fs, path = fs_root(url, storage_options)
    data = read_bytes(fs, path)
    return None if data is None else data.decode("utf-8")


def _write(url: str, data: bytes, storage_options: dict) -> None:
    """Write a whole file atomically and durably (:func:`pipeline.storage.write_bytes`)."""
    fs, path = fs_root(url, storage_options)
    write_bytes(fs, path, data, durable=True)


def _fsync_dir(fs, folder: str) -> None:
    """Make a local rename in ``folder`` durable (no-op on object stores and where directories can't sync)."""
    if not is_local(fs):
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _checkpoints(output: str, storage_options: dict) -> list[str]:
    """Names of the files under ``<output>/checkpoints`` (hidden temp files excluded)."""
    fs, root = fs_root(f"{output.rstrip('/')}/checkpoints", storage_options)
    return [posixpath.relpath(p, root) for p in list_files(fs, root)]


def check_output(cfg: TrainConfig, storage_options: dict | None = None) -> None:
    """Refuse to start a new run (``resume`` not set) into an output that holds a training run.

    Raises:
        TrainOutputError: naming the output and the files found there.
    """
    if cfg.resume:
        return
    options = dict(cfg.storage_options if storage_options is None else storage_options)
    base = cfg.output.rstrip("/")
    found = [name for name in _RUN_FILES if _read_text(f"{base}/{name}", options) is not None]
    found += [f"checkpoints/{name}" for name in _checkpoints(base, options)[:3]]
    if found:
        raise TrainOutputError(
            f"output {cfg.output} already holds a training run ({', '.join(found)}); a new run would empty its "
            "metrics.jsonl and overwrite its checkpoints. Continue it with --resume (resume=True), or choose a "
            "new output folder"
        )


def last_checkpoint(output: str, storage_options: dict | None = None) -> str | None:
    """URL of the newest checkpoint under ``output`` (named by ``checkpoints/last_checkpoint``), or None when
    the output has no checkpoint yet.

    Raises:
        TrainStateError: ``last_checkpoint`` is empty or torn, names something that is not a checkpoint file
            of this folder or a file that does not exist, or is missing while checkpoints exist.
    """
    options = dict(storage_options or {})
    folder = f"{output.rstrip('/')}/checkpoints"
    pointer = f"{folder}/last_checkpoint"
    text = _read_text(pointer, options)
    existing = [n for n in _checkpoints(output, options) if _CHECKPOINT_NAME.match(n)]
    if text is None:
        if existing:
            raise TrainStateError(
                f"{pointer} is missing but {folder} holds checkpoints ({', '.join(sorted(existing)[-3:])}); "
                "refusing to restart at step 0. Write the name of the checkpoint to resume from into that file "
                "(e.g. the newest one), or choose a new output folder"
            )
        return None
    name = text.strip()
    if not name:
        raise TrainStateError(
            f"{pointer} is empty (a torn write?); refusing to restart at step 0. It must name the checkpoint to "
            f"resume from ({', '.join(sorted(existing)[-3:]) or 'no checkpoint files found'})"
        )
    if not _CHECKPOINT_NAME.match(name) or len(text.splitlines()) > 1:
        raise TrainStateError(
            f"{pointer} does not name a checkpoint file (expected one line like model_0004500.pth, got "
            f"{name[:80]!r}); refusing to guess"
        )
    if name not in existing:
        raise TrainStateError(
            f"{pointer} names {name}, which is not in {folder}; refusing to restart at step 0 "
            f"(found: {', '.join(sorted(existing)[-3:]) or 'no checkpoint files'})"
        )
    return f"{folder}/{name}"


def _local_copy(url: str, folder: str, storage_options: dict) -> str:
    fs, path = fs_root(url, storage_options)
    if is_local(fs):
        return path
    local = os.path.join(folder, os.path.basename(path))
    fs.get_file(path, local)
    return local


def _save_checkpoint(model, url: str, trainer_state: dict[str, Any], storage_options: dict) -> None:
    """Write ``{"model": official layout, "trainer": state}`` whole and durably (fsync'ed file and folder)."""
    import torch

    from odise_model.checkpoint import official_state_dict

    buffer = io.BytesIO()
    torch.save({"model": official_state_dict(model), "trainer": trainer_state}, buffer)
    fs, path = fs_root(url, storage_options)
    write_bytes(fs, path, buffer.getvalue(), durable=True)
    _fsync_dir(fs, posixpath.dirname(path))


class _MetricsLog:
    """``metrics.jsonl`` kept in memory and rewritten whole on each flush (object stores cannot append).

    On resume the lines of steps after the checkpoint (written by the interrupted run) are dropped.
    """

    def __init__(self, url: str, storage_options: dict, *, resume_step: int | None) -> None:
        self.url, self.storage_options = url, storage_options
        self.lines: list[str] = []
        if resume_step is not None:
            text = _read_text(url, storage_options) or ""
            for line in text.splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        self.lines.append(line)
                except json.JSONDecodeError:
                    continue
        self.flush()

    def log(self, record: dict[str, Any]) -> None:
        self.lines.append(json.dumps(record, allow_nan=False, default=float))
        self.flush()

    def flush(self) -> None:
        _write(
            self.url,
            ("\n".join(self.lines) + ("\n" if self.lines else "")).encode("utf-8"),
            self.storage_options,
        )


def _dataset_folder(spec: str | list[str]) -> str:
    """The folder holding ``categories.json`` for a dataset spec (folder, shard or list of shards)."""
    first = spec if isinstance(spec, str) else spec[0]
    if first.endswith(".tar"):
        return first.rsplit("/", 1)[0] if "/" in first else "."
    return first.rstrip("/")


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def evaluate_on_shards(
    model,
    vocabulary,
    urls: str | list[str],
    *,
    storage_options: dict | None = None,
    max_images: int | None = None,
    use_clip: bool = True,
    batch_size: int = 4,
    autocast_dtype=None,
):
    """Panoptic quality of ``model`` on labeled shards, through :class:`odise_model.Predictor`.

    Every GT category must be in ``vocabulary`` (matched by id). Returns a
    :class:`pipeline.evaluate.metrics.EvaluationResult` (PQ / SQ / RQ, things / stuff, semantic metrics).
    The model is left in eval mode.
    """
    import torch

    import odise_model
    from pipeline.evaluate.metrics import PanopticEvaluator
    from pipeline.groundtruth import iter_labeled_shards

    categories = {c.id: {"name": c.name, "isthing": c.isthing} for c in vocabulary}
    predictor = odise_model.Predictor(model, vocabulary, batch_size=batch_size, use_clip=use_clip)
    evaluator = PanopticEvaluator(categories, semantic=True)
    device_type = model.device.type
    autocast = (
        torch.autocast(device_type=device_type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )

    def flush(records):
        with autocast:
            results = predictor.predict([r.decode_image() for r in records])
        for record, result in zip(records, results):
            unknown = {s.category_id for s in record.segments} - set(categories)
            if unknown:
                raise ValueError(
                    f"held-out image {record.image_id!r}: categories {sorted(unknown)} are not in the vocabulary"
                )
            evaluator.add(
                record.id_map,
                record.segments,
                result.panoptic_seg,
                result.segments,
                image_id=record.image_id,
                pred_semantic=result.semantic_seg,
            )

    pending = []
    count = 0
    for record in iter_labeled_shards(urls, storage_options=storage_options):
        if max_images is not None and count >= max_images:
            break
        pending.append(record)
        count += 1
        if len(pending) >= batch_size:
            flush(pending)
            pending = []
    if pending:
        flush(pending)
    return evaluator.result()


def _eval_record(step: int, result) -> dict[str, Any]:
    d = result.to_dict()
    pan = d["panoptic"]
    out = {
        "type": "eval",
        "step": step,
        "num_images": d["num_images"],
        "PQ": pan["All"]["pq"],
        "SQ": pan["All"]["sq"],
        "RQ": pan["All"]["rq"],
        "PQ_th": pan["Things"]["pq"],
        "PQ_st": pan["Stuff"]["pq"],
        "per_class": {
            k: {"name": v["name"], "pq": v["pq"], "tp": v["tp"], "fp": v["fp"], "fn": v["fn"]}
            for k, v in pan["per_class"].items()
        },
    }
    if d["semantic"] is not None:
        out["mIoU"] = d["semantic"]["mIoU"]
    return out


# --------------------------------------------------------------------------------------------------
# The loop (one worker)
# --------------------------------------------------------------------------------------------------


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 1_009 + rank) % (2**63 - 1)


def _train_worker(
    cfg: TrainConfig, *, rank: int = 0, world_size: int = 1, device=None
) -> dict[str, Any] | None:
    """Run the training loop in this process (rank ``rank`` of ``world_size``); rank 0 returns the summary dict.

    With ``world_size > 1`` a ``torch.distributed`` process group must be initialised (Ray Train does it).
    """
    import torch

    import odise_model
    from odise_model.training import LossConfig, TrainingModule, optimizer_param_groups
    from pipeline.groundtruth import read_categories
    from pipeline.train.data import (
        DataPosition,
        TrainDataStream,
        class_index_map,
        noun_lexicon,
        training_vocabulary,
    )

    t_start = time.time()
    options = dict(cfg.storage_options)
    distributed = world_size > 1
    device = torch.device(device if device is not None else ("cuda" if _use_gpu(cfg) else "cpu"))
    use_amp = cfg.amp if cfg.amp is not None else device.type == "cuda"
    ckpt_dir = f"{cfg.output}/checkpoints"
    torch.manual_seed(cfg.seed + rank)

    with tempfile.TemporaryDirectory(prefix="odise-train-") as tmp:
        # 1. model: initial weights, or the last checkpoint when resuming
        resume_url = last_checkpoint(cfg.output, options) if cfg.resume else None
        trainer_state: dict[str, Any] | None = None
        initial = cfg.checkpoint
        if resume_url is not None:
            local = _local_copy(resume_url, tmp, options)
            trainer_state = torch.load(local, map_location="cpu", weights_only=True).get("trainer")
            if trainer_state is None:
                raise ValueError(f"{resume_url} has no trainer state; cannot resume from it")
            initial = local
            if rank == 0:
                logger.info("resuming from %s (step %d)", resume_url, trainer_state["step"])
        pretrained = cfg.use_pretrained
        model = odise_model.build_odise(
            cfg.model,
            checkpoint=initial,
            sd_weights=cfg.sd_weights,
            clip_weights=cfg.clip_weights,
            pretrained=pretrained,
            offline=cfg.offline,
            cache_dir=cfg.cache_dir,
            storage_options=options,
            device=device,
            seed=cfg.seed,
            random_weights=cfg.is_plumbing_check,
        )
    model.train()
    model.set_gradient_checkpointing(cfg.gradient_checkpointing)
    kind = model.config.classifier.kind
    clip_loaded = bool((getattr(model, "weight_provenance", None) or {}).get("clip"))
    use_clip = cfg.eval_use_clip if cfg.eval_use_clip is not None else clip_loaded

    # 2. vocabulary and data
    train_categories = read_categories(_dataset_folder(cfg.train), storage_options=options)
    vocabulary = training_vocabulary(
        cfg.vocab,
        train_categories,
        source=f"{_dataset_folder(cfg.train)}/categories.json",
        storage_options=options,
    )
    class_index = class_index_map(vocabulary, train_categories, where=str(cfg.train))
    crop_size = cfg.crop_size or model.config.input.short_side
    stream = TrainDataStream(
        cfg.train,
        class_index=class_index,
        crop_size=crop_size,
        seed=cfg.seed,
        rank=rank,
        world_size=world_size,
        min_scale=cfg.min_scale,
        max_scale=cfg.max_scale,
        size_divisibility=model.config.input.size_divisibility,
        shuffle_buffer=cfg.shuffle_buffer,
        num_words=cfg.num_words if kind == "caption" else 0,
        lexicon=noun_lexicon(extra=[s for c in vocabulary for s in c.synonyms])
        if kind == "caption"
        else None,
        categories=train_categories,
        storage_options=options,
        position=DataPosition.from_dict(trainer_state["data"]) if trainer_state else None,
    )
    per_worker = cfg.batch_size // world_size

    # 3. losses, optimizer, distributed wrapper
    module = TrainingModule(
        model,
        vocabulary if kind == "label" else None,
        losses=LossConfig(num_points=cfg.num_points),
        tile_batch_size=cfg.tile_batch_size,
    )
    groups = optimizer_param_groups(model, lr=cfg.lr, weight_decay=cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    optimizer = torch.optim.AdamW(
        [{k: v for k, v in g.items() if k != "names"} for g in groups],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
    )
    start_step = 0
    if trainer_state is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
        start_step = int(trainer_state["step"])
        rng = trainer_state.get("rng") or {}
        if rank == 0 and "torch" in rng:
            torch.set_rng_state(rng["torch"])
    forward = module
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        # frozen SD / CLIP: identical on every worker (same files or seed); never broadcast or reduced
        frozen = [n for n, p in module.named_parameters() if not p.requires_grad]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, frozen)
        forward = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, broadcast_buffers=False
        )

    # 4. outputs
    metrics = (
        _MetricsLog(f"{cfg.output}/metrics.jsonl", options, resume_step=start_step if cfg.resume else None)
        if rank == 0
        else None
    )
    last_ckpt = resume_url
    last_eval: dict[str, Any] | None = None
    last_losses: dict[str, float] = {}
    train_time = 0.0

    def save(step_done: int) -> str:
        name = f"model_{step_done:07d}.pth"
        url = f"{ckpt_dir}/{name}"
        state = {
            "step": step_done,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"type": "warmup_multistep", "step": step_done, "max_steps": cfg.max_steps},
            "data": stream.position.to_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "config": cfg.model_dump(mode="json", exclude={"storage_options"}),
            "vocabulary": vocabulary.to_text(),
        }
        _save_checkpoint(model, url, state, options)  # fsync'ed before last_checkpoint names it
        _write(f"{ckpt_dir}/last_checkpoint", name.encode("utf-8"), options)
        return url

    def evaluate(step_done: int) -> dict[str, Any]:
        result = evaluate_on_shards(
            model,
            vocabulary,
            cfg.val,
            storage_options=options,
            max_images=cfg.eval_max_images,
            use_clip=use_clip,
            batch_size=cfg.eval_batch_size,
            autocast_dtype=torch.bfloat16 if use_amp and device.type == "cuda" else None,
        )
        model.train()
        return _eval_record(step_done, result)

    # 5. the loop
    window_start, window_images = time.time(), 0
    for step in range(start_step, cfg.max_steps):
        t0 = time.time()
        factor = lr_multiplier(step, cfg.max_steps, warmup_factor=cfg.warmup_factor)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        samples = stream.next_batch(per_worker)
        images = [s.image.to(device, non_blocking=True) for s in samples]
        targets = [{"labels": s.labels.to(device), "masks": s.masks.to(device)} for s in samples]
        words = [s.words for s in samples] if kind == "caption" else None
        t_data = time.time() - t0
        generator = torch.Generator().manual_seed(_step_seed(cfg.seed, step, rank))
        autocast = (
            torch.autocast(device_type=device.type, dtype=torch.bfloat16)
            if use_amp
            else contextlib.nullcontext()
        )
        with autocast:
            losses = forward(images, targets, words, generator=generator)
        total = sum(losses.values())
        if not bool(torch.isfinite(total)):
            raise FloatingPointError(
                f"loss is {float(total)} at step {step}: { {k: float(v) for k, v in losses.items()} }"
            )
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip else None
        optimizer.step()
        done = step + 1
        step_time = time.time() - t0
        train_time += step_time
        window_images += cfg.batch_size

        if done % cfg.log_every == 0 or done == cfg.max_steps:
            names = sorted(losses)
            values = torch.stack([losses[n].detach().float() for n in names] + [total.detach().float()])
            if distributed:
                torch.distributed.all_reduce(values)
                values /= world_size
            last_losses = {n: float(v) for n, v in zip(names, values[:-1])}
            if metrics is not None:
                elapsed = time.time() - window_start
                metrics.log(
                    {
                        "type": "train",
                        "step": done,
                        "lr": cfg.lr * factor,
                        "loss": float(values[-1]),
                        "losses": last_losses,
                        "grad_norm": float(grad_norm)
                        if grad_norm is not None and bool(torch.isfinite(grad_norm))
                        else None,
                        "step_time_s": round(step_time, 4),
                        "data_time_s": round(t_data, 4),
                        "images_per_s": round(window_images / max(elapsed, 1e-9), 3),
                        "time_s": round(time.time() - t_start, 2),
                    }
                )
            window_start, window_images = time.time(), 0
        if done % cfg.checkpoint_every == 0 or done == cfg.max_steps:
            if rank == 0:
                last_ckpt = save(done)
            if distributed:
                torch.distributed.barrier()
        if cfg.val is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.max_steps):
            if rank == 0:
                last_eval = evaluate(done)
                metrics.log(last_eval)
                logger.info("step %d: PQ %.2f", done, 100 * (last_eval["PQ"] or 0.0))
            if distributed:
                torch.distributed.barrier()

    if rank != 0:
        return None
    summary = TrainSummary(
        output=cfg.output,
        model=cfg.model,
        start_step=start_step,
        steps=max(start_step, cfg.max_steps),
        checkpoint=last_ckpt,
        metrics=f"{cfg.output}/metrics.jsonl",
        last_eval={k: v for k, v in last_eval.items() if k != "per_class"} if last_eval else None,
        wall_time_s=round(time.time() - t_start, 2),
        train_time_s=round(train_time, 2),
        images_per_s=round((cfg.max_steps - start_step) * cfg.batch_size / train_time, 3)
        if train_time
        else 0.0,
        num_workers=world_size,
        device=str(device),
        losses=last_losses,
    )
    _write(
        f"{cfg.output}/train_summary.json", json.dumps(summary.to_dict(), indent=2).encode("utf-8"), options
    )
    return summary.to_dict()


def _use_gpu(cfg: TrainConfig) -> bool:
    if cfg.use_gpu is not None:
        return cfg.use_gpu
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------
# Ray Train
# --------------------------------------------------------------------------------------------------


def _ray_train_loop(config: dict[str, Any]) -> None:
    """``train_loop_per_worker`` of the ``TorchTrainer``: the process group is already set up by Ray Train.

    ``config``: ``{"cfg": TrainConfig as JSON (no credentials), "credentials": CredentialsLoader or None}``;
    the loader's options are merged into ``storage_options`` here, inside the worker.
    """
    import ray.train
    import ray.train.torch
    import torch

    install_log_redaction()
    cfg = TrainConfig(**config["cfg"])
    loader = config.get("credentials")
    if loader is not None:
        cfg = cfg.model_copy(update={"storage_options": {**cfg.storage_options, **loader.load()}})
    context = ray.train.get_context()
    device = ray.train.torch.get_device()
    if device.type == "cpu":
        # as many threads as CPUs reserved (Ray leaves torch's default, all cores, for fractional CPUs:
        # oversubscribed threads make small CPU steps tens of times slower)
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    _train_worker(cfg, rank=context.get_world_rank(), world_size=context.get_world_size(), device=device)


def _run_with_ray(cfg: TrainConfig, credentials: CredentialsLoader | None = None) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    found = credential_findings(cfg.storage_options)
    if found:
        raise ValueError(
            f"storage_options hold credentials ({', '.join('storage_options' + p for p, _ in found)}); Ray Train "
            "keeps train_loop_config in its run state, so they are not passed to the training workers: give the "
            "workers credentials through their environment (AWS_ACCESS_KEY_ID ..., ~/.aws) or pass "
            "run_training(..., credentials=<loader>) (the train flow's storage_block does this)"
        )
    started = False
    if not ray.is_initialized():
        ray.init(address=ray_init_address(cfg.ray_address), include_dashboard=False, log_to_driver=True)
        started = True
    try:
        use_gpu = cfg.use_gpu if cfg.use_gpu is not None else bool(ray.cluster_resources().get("GPU", 0))
        trainer = TorchTrainer(
            _ray_train_loop,
            train_loop_config={"cfg": cfg.model_dump(mode="json"), "credentials": credentials},
            scaling_config=ScalingConfig(
                num_workers=cfg.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": cfg.cpus_per_worker},
            ),
            run_config=RunConfig(name=f"odise-train-{int(time.time())}", storage_path=cfg.ray_storage_path),
        )
        result = trainer.fit()
        if getattr(result, "error", None) is not None:
            raise RuntimeError(f"Ray Train run failed: {result.error}") from result.error
    finally:
        if started:
            ray.shutdown()


def run_training(cfg: TrainConfig, *, credentials: CredentialsLoader | None = None) -> TrainSummary:
    """Train (or resume) as configured; returns the summary written to ``<output>/train_summary.json``.

    One process by default; Ray Train with ``num_workers`` DDP workers when ``num_workers > 1`` or
    ``ray_address`` is set (``use_gpu``: one GPU per worker). ``credentials``: a picklable loader of fsspec
    credentials merged into ``storage_options`` where files are opened (see the module doc).

    Raises:
        TrainOutputError: ``output`` holds a training run and ``resume`` is not set.
        TrainStateError: resuming from a damaged ``last_checkpoint``.
        ValueError: credentials in ``storage_options`` of a Ray Train run.
    """
    install_log_redaction()
    options = {**cfg.storage_options, **(credentials.load() if credentials is not None else {})}
    check_output(cfg, options)
    if cfg.resume:
        last_checkpoint(cfg.output, options)  # a damaged state fails here, before any worker starts
    if cfg.uses_ray:
        _run_with_ray(cfg, credentials)
        text = _read_text(f"{cfg.output}/train_summary.json", options)
        if text is None:
            raise RuntimeError(f"the Ray Train run wrote no {cfg.output}/train_summary.json")
        return TrainSummary(**json.loads(text))
    local = cfg if credentials is None else cfg.model_copy(update={"storage_options": options})
    summary = _train_worker(local)
    assert summary is not None
    return TrainSummary(**summary)
