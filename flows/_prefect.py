"""Prefect helpers shared by the flows: retry rule, credentials from blocks, log forwarding, artifact keys.

Nothing here does pipeline work; it only adapts Prefect to the rules in :mod:`flows.params`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from .params import ParameterError, is_transient_io_error

__all__ = [
    "retry_on_io_error",
    "load_storage_credentials",
    "with_credentials",
    "forward_logs",
    "PLUMBING_NOTICE",
]

log = logging.getLogger(__name__)

PLUMBING_NOTICE = (
    "PLUMBING CHECK: model {model!r} has random weights (no checkpoint); every label it writes is meaningless. "
    "This run only checks that the whole path (read, Ray, model, encode, write) works. "
    "Use model=odise_label_coco (or odise_caption_coco) with the official weights for real labels."
)


def retry_on_io_error(task: Task, task_run: TaskRun, state: State) -> bool:
    """``retry_condition_fn`` for the flows' tasks: retry I/O and network errors only, never bad input."""
    exc = state.data if isinstance(state.data, BaseException) else None
    if exc is None:
        try:
            state.result(raise_on_failure=True)
        except BaseException as raised:  # noqa: BLE001 - we only classify it
            exc = raised
    return exc is not None and is_transient_io_error(exc)


def load_storage_credentials(storage_block: str | None) -> dict[str, Any]:
    """fsspec options (credentials) from a Prefect block; ``{}`` when ``storage_block`` is empty.

    ``storage_block`` is ``"<name>"`` (a Secret block), ``"secret/<name>"`` or ``"json/<name>"``.
    The block's value is a JSON object of fsspec options, e.g. ``{"key": ..., "secret": ...,
    "client_kwargs": {"endpoint_url": ...}}``, applied to input and output; or
    ``{"storage_options": {...}, "output_storage_options": {...}}`` to give them separately.
    Errors name the block, never its content.
    """
    if not storage_block:
        return {}
    from prefect.blocks.core import Block

    ref = storage_block if "/" in storage_block else f"secret/{storage_block}"
    try:
        block = Block.load(ref)
    except (ValueError, KeyError) as exc:
        raise ParameterError(
            f"invalid parameter storage_block={storage_block!r}: cannot load block {ref!r} ({type(exc).__name__})"
        ) from None
    value = block.get() if hasattr(block, "get") else getattr(block, "value", None)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, Mapping):
        raise ParameterError(
            f"invalid parameter storage_block={storage_block!r}: the block's value must be a JSON object of fsspec options"
        )
    return dict(value)


def split_credentials(creds: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``(input options, output options or None)`` of a block's value (see :func:`load_storage_credentials`)."""
    if creds and set(creds) <= {"storage_options", "output_storage_options"}:
        out = creds.get("output_storage_options")
        return dict(creds.get("storage_options") or {}), None if out is None else dict(out)
    return dict(creds), dict(creds)


def with_credentials(config: Any, storage_block: str | None) -> Any:
    """``config`` (a pydantic config with ``storage_options``, and maybe ``output_storage_options``) with the
    block's credentials merged in.

    The returned copy lives only inside a task; it is never returned, logged or written.
    """
    creds = load_storage_credentials(storage_block)
    if not creds:
        return config
    inp, out = split_credentials(creds)
    update: dict[str, Any] = {"storage_options": {**config.storage_options, **inp}}
    has_output_options = "output_storage_options" in type(config).model_fields
    if has_output_options and (out is not None or config.output_storage_options is not None):
        base_out = (
            config.output_storage_options
            if config.output_storage_options is not None
            else config.storage_options
        )
        update["output_storage_options"] = {**base_out, **(out or {})}
    return config.model_copy(update=update)


@contextlib.contextmanager
def forward_logs(*names: str, level: int = logging.INFO) -> Iterator[None]:
    """Send records of the loggers ``names`` (e.g. ``pipeline``) to the current Prefect run's logs."""
    from prefect.logging.handlers import APILogHandler

    handler = APILogHandler()
    handler.setLevel(level)
    loggers = [logging.getLogger(n) for n in names]
    saved = [(lg, lg.level) for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.level == logging.NOTSET or lg.level > level:
            lg.setLevel(level)
    try:
        yield
    finally:
        for lg, lvl in saved:
            lg.removeHandler(handler)
            lg.setLevel(lvl)
