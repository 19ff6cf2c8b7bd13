"""The ``train`` flow: fine-tune ODISE on labeled shards (:func:`pipeline.train.run.run_training`).

Orchestration only. The flow's parameters are the commonly set fields of ``pipeline.train.run.TrainConfig``
(same names as the ``odise-train`` flags); ``options`` passes any other ``TrainConfig`` field by name.
``None`` means "TrainConfig's default". The training code (torch) is imported when the task runs. A table artifact
(``train-result``) holds the ``TrainSummary``. Retrying is safe: the task resumes from the last
checkpoint under ``output`` (``resume=True`` on a retry). A first attempt into an output that already holds
a training run without ``resume`` is refused (``pipeline.train.run.TrainOutputError``), never overwritten.
"""

from __future__ import annotations

import os
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.runtime import task_run

from pipeline.config import TrainConfig

from ._prefect import BlockCredentials, redacted_errors, retry_on_io_error
from .params import (
    ParameterError,
    build_model,
    check_parameters,
    replace_fields,
    resolve_path,
    result_dict,
    table_rows,
)

__all__ = ["train_flow", "train_config", "run_train"]

_PATH_FIELDS = ("output", "checkpoint", "sd_weights", "clip_weights", "cache_dir", "vocab")


def train_config(params: dict[str, Any], cwd: str | os.PathLike | None = None) -> TrainConfig:
    """Validate parameters (+ ``options``) into :class:`pipeline.config.TrainConfig`; local paths made absolute.

    Raises:
        ParameterError: naming the bad parameter.
    """
    values = {k: v for k, v in params.items() if v is not None and k != "options"}
    extra = {k: v for k, v in dict(params.get("options") or {}).items() if v is not None}
    overlap = sorted(set(values) & set(extra))
    if overlap:
        raise ParameterError(f"invalid parameter options: {overlap} are flow parameters, set them directly")
    values.update(extra)
    check_parameters(values)
    for name in ("train", "val"):
        if isinstance(values.get(name), str):
            values[name] = resolve_path(values[name], cwd)
        elif isinstance(values.get(name), list | tuple):
            values[name] = [resolve_path(v, cwd) for v in values[name]]
    for name in _PATH_FIELDS:
        value = values.get(name)
        if isinstance(value, str) and (
            name in ("output", "cache_dir") or os.path.exists(resolve_path(value, cwd))
        ):
            values[name] = resolve_path(
                value, cwd
            )  # weights / vocab: only existing files (else a release name)
    return build_model(TrainConfig, values, what="train")


@task(name="train", retries=1, retry_delay_seconds=30, retry_condition_fn=retry_on_io_error)
@redacted_errors
def run_train(config: TrainConfig, storage_block: str | None = None) -> dict[str, Any]:
    """Call ``pipeline.train.run.run_training`` (resuming on a retry); returns the ``TrainSummary`` as a dict.

    The block's credentials reach the training code as a :class:`~flows._prefect.BlockCredentials` pointer,
    loaded where the files are opened (this process, or each Ray Train worker): never as values in the
    config that Ray Train stores with its run.
    """
    from pipeline.train.run import run_training

    if task_run.run_count > 1 and not config.resume:
        config = replace_fields(config, resume=True)
    return result_dict(run_training(config, credentials=BlockCredentials.for_block(storage_block)))


@flow(name="train", description="Fine-tune ODISE on labeled WebDataset shards.")
def train_flow(
    train: str | list[str],
    output: str,
    val: str | list[str] | None = None,
    model: str | None = None,
    checkpoint: str | None = None,
    sd_weights: str | None = None,
    clip_weights: str | None = None,
    pretrained: bool | None = None,
    offline: bool | None = None,
    cache_dir: str | None = None,
    vocab: str | None = None,
    max_steps: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    eval_every: int | None = None,
    checkpoint_every: int | None = None,
    num_workers: int | None = None,
    use_gpu: bool | None = None,
    ray_address: str | None = None,
    resume: bool = False,
    seed: int | None = None,
    storage_options: dict[str, Any] | None = None,
    options: dict[str, Any] | None = None,
    storage_block: str | None = None,
) -> dict[str, Any]:
    """Train on ``train`` shards (evaluating on ``val``); checkpoints and metrics go under ``output``.

    Args:
        train: labeled shards (see ``pipeline/groundtruth.py``): dataset folder, shard URL or list of URLs.
        output: checkpoints/, metrics.jsonl, train_summary.json go here (path or URL).
        val: held-out labeled shards for periodic evaluation (PQ).
        model: ``odise_label_coco`` (default), ``odise_caption_coco``, ``tiny`` (quick check) or a JSON path.
        checkpoint: initial ODISE weights (release name, path or URL); ignored when resuming.
        sd_weights: Stable Diffusion v1.3 weights.
        clip_weights: CLIP ViT-L/14-336 weights.
        pretrained: official weights for every source not given (default: yes, except tiny).
        offline: never download weights.
        cache_dir: weights cache.
        vocab: training vocabulary (classes.txt / built-in name; default: the train categories.json).
        max_steps: optimizer steps (default: the official schedule's).
        batch_size: images per step, total over workers.
        lr: base learning rate (AdamW).
        eval_every: evaluate every N steps (0: only at the end); needs ``val``.
        checkpoint_every: save a checkpoint every N steps (and at the end).
        num_workers: training processes (DDP through Ray Train when > 1).
        use_gpu: train on GPUs (default: when CUDA is available).
        ray_address: existing Ray cluster; with it, training runs on Ray.
        resume: continue from the last checkpoint under ``output``.
        seed: seed of the data order, augmentations and loss sampling.
        storage_options: fsspec options without credentials (endpoint, region).
        options: any further ``TrainConfig`` field by name (e.g. ``{"crop_size": 256}``).
        storage_block: Prefect Secret block with fsspec credentials (see the annotate flow).

    Returns:
        The ``TrainSummary`` as a dict (also the ``train-result`` table artifact).
    """
    params = dict(locals())
    block = params.pop("storage_block")
    logger = get_run_logger()
    config = train_config(params)
    result = run_train(config, block)
    create_table_artifact(
        table=table_rows(result), key="train-result", description=f"training result ({config.model})"
    )
    logger.info("training finished at step %s; checkpoint %s", result.get("steps"), result.get("checkpoint"))
    return result
