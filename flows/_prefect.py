"""Prefect helpers shared by the flows: retry rule, credentials from blocks, log forwarding, artifact keys.

Nothing here does pipeline work; it only adapts Prefect to the rules in :mod:`flows.params`.

Importing this module installs :func:`pipeline.redact.install_log_redaction` (every log record of the process
is redacted before a handler sees it: Prefect's API handler, the console, files); the tasks wrap their
bodies in :func:`redacted_errors` so a failed task's message and traceback (which Prefect stores) carry no
credentials either.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

from prefect.client.schemas.objects import TaskRun
from prefect.states import State
from prefect.tasks import Task

from pipeline.redact import install_log_redaction, redact_exception

from .params import ParameterError, is_transient_io_error

__all__ = [
    "retry_on_io_error",
    "load_storage_credentials",
    "with_credentials",
    "forward_logs",
    "redacted_errors",
    "BlockCredentials",
    "PLUMBING_NOTICE",
]

log = logging.getLogger(__name__)
install_log_redaction()

F = TypeVar("F", bound=Callable[..., Any])

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


def redacted_errors(fn: F) -> F:
    """Decorator (under ``@task``): an exception leaving ``fn`` has its messages redacted in place
    (:func:`pipeline.redact.redact_exception`: URL user-info, signatures, tokens -> ``***``; type and chain
    kept, so :func:`retry_on_io_error` still classifies it) before Prefect records the failure."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            redact_exception(exc)
            raise

    return wrapper  # type: ignore[return-value]


@dataclasses.dataclass(frozen=True)
class BlockCredentials:
    """A picklable pointer to storage credentials in a Prefect block, resolved where it is used.

    Ray Train keeps ``train_loop_config`` in its run state, so the ``train`` flow hands the training
    workers this object (the block's name and the Prefect API URL, no secret) instead of the block's
    values; each worker calls :meth:`load`. Workers need access to the Prefect API (and, for Prefect Cloud,
    ``PREFECT_API_KEY`` in their environment).

    Attributes:
        block: the ``storage_block`` parameter (``"<name>"``, ``"secret/<name>"`` or ``"json/<name>"``).
        api_url: the Prefect API the flow used (None: the worker's own setting).
    """

    block: str
    api_url: str | None = None

    @classmethod
    def for_block(cls, storage_block: str | None) -> BlockCredentials | None:
        """The pointer for ``storage_block`` and the current Prefect API, or None without a block."""
        if not storage_block:
            return None
        from prefect.settings import PREFECT_API_URL

        return cls(block=storage_block, api_url=PREFECT_API_URL.value() or None)

    def load(self) -> dict[str, Any]:
        """The block's fsspec options for a config with one ``storage_options`` (the input part of a split
        block, as :func:`with_credentials`)."""
        context = contextlib.nullcontext()
        if self.api_url:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            context = temporary_settings(updates={PREFECT_API_URL: self.api_url})
        with context:
            creds = load_storage_credentials(self.block)
        return split_credentials(creds)[0] if creds else {}


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
