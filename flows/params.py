"""Flow parameters -> pipeline configs: validation, path resolution, credential rules (no Prefect import).

The Prefect flows, ``python -m flows.serve`` and the ``odise-*`` console scripts all go through these
functions, so a bad parameter gives the same message everywhere, before anything heavy starts
(no Ray, no model, no Prefect server needed to validate).

Rules
-----
* Relative local paths (``input``, ``output``, ``vocab_file``, ``merge_vocab`` entries, a model JSON,
  weights files, ``cache_dir``) are resolved against the **working directory** of the run (the shell's
  for the command line, the deployment's pull-step directory for a deployment) and passed on as
  absolute paths, so Ray workers and later retries see the same files. URLs (``s3://...``) are kept.
* ``vocab_file`` is a path or URL, or a built-in vocabulary name (``coco_panoptic``, ``ade20k_150``,
  ``lvis_1203``, ...) when no file of that name exists in the working directory. ``vocab`` (inline classes)
  and ``caption`` are text, checked when the config is built (errors name the class position).
* Credentials never travel as flow parameters (Prefect stores parameters and shows them in its UI):
  ``storage_options`` may hold endpoints, regions and similar settings only; keys that look like
  credentials (``key``, ``secret``, ``token``, ``password``, ...), credential headers
  (``headers.Authorization`` anywhere) and URLs with a ``user:password@`` are refused with a message that
  names the option path (never the value) and says where credentials go instead: the environment
  (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``~/.aws``, fsspec config files) or a Prefect Secret /
  JSON block named by ``storage_block``, which is read inside the tasks
  (:func:`flows._prefect.with_credentials`) and never logged (headers are allowed there).
* Every other parameter (input, output, vocabulary, weights URLs ...) is checked the same way: a URL with
  user-info or a presigned / token query (``X-Amz-Signature``, ``sig``, ``token`` ...) is refused; presigned
  inputs go in a manifest file instead (the pipeline records them without their signatures, see
  :mod:`pipeline.redact`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from pipeline.config import AnnotateConfig
from pipeline.redact import CREDENTIAL_KEYS, credential_findings

__all__ = [
    "ParameterError",
    "CREDENTIAL_KEYS",
    "annotate_config",
    "check_no_credentials",
    "check_parameters",
    "config_default",
    "credential_paths",
    "is_url",
    "resolve_path",
    "resolve_vocab_file",
    "user_errors",
]

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")

CREDENTIALS_HELP = (
    "credentials must not be passed as flow parameters (Prefect stores parameters and shows them in its UI); "
    "use the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, ~/.aws, fsspec config) "
    "or save them in a Prefect Secret block and pass its name as storage_block"
)

URL_CREDENTIALS_HELP = (
    "URLs with a user:password, a token or a signature are refused as parameters (Prefect stores parameters "
    "and shows them in its UI): list presigned input URLs in a manifest file (.txt, one URL per line) and "
    "pass the manifest as input, download signed weights or vocabulary files first, and give storage "
    "credentials through the environment or storage_block"
)


class ParameterError(ValueError):
    """A flow / command-line parameter is invalid; the message names the parameter (never a secret value)."""


def is_url(value: str) -> bool:
    """True for ``scheme://...`` (``file://`` included)."""
    return bool(_URL.match(value))


def config_default(name: str) -> Any:
    """The default of :class:`~pipeline.config.AnnotateConfig` field ``name`` (keeps flow/CLI defaults in sync)."""
    field = AnnotateConfig.model_fields[name]
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


def resolve_path(value: str, cwd: str | os.PathLike | None = None) -> str:
    """Absolute path for a local path (``~`` expanded, relative to ``cwd``); URLs unchanged.

    Glob / brace patterns stay patterns (only their directory part is made absolute).
    """
    if is_url(value):
        return value
    path = Path(os.path.expanduser(value))
    if not path.is_absolute():
        path = Path(cwd or os.getcwd()) / path
    return os.path.normpath(str(path))


def resolve_vocab_file(value: str, cwd: str | os.PathLike | None = None, *, name: str = "vocab_file") -> str:
    """A vocabulary source: a URL, an existing file (made absolute) or a built-in vocabulary name.

    Raises:
        ParameterError: neither a file in the working directory nor a built-in name.
    """
    from odise_model.vocabulary import BUILTIN_VOCABULARIES

    if is_url(value):
        return value
    path = resolve_path(value, cwd)
    if os.path.exists(path):
        return path
    if value in BUILTIN_VOCABULARIES:
        return value
    where = os.path.abspath(cwd or os.getcwd())
    raise ParameterError(
        f"invalid parameter {name}={value!r}: no such file {path} (relative paths are resolved against the "
        f"working directory {where}) and not a built-in vocabulary ({', '.join(BUILTIN_VOCABULARIES)})"
    )


def _maybe_local_file(value: str | None, cwd: str | os.PathLike | None) -> str | None:
    """Weights / model specs: an existing local file becomes absolute; release names and URLs stay."""
    if value is None or is_url(value):
        return value
    path = resolve_path(value, cwd)
    return path if os.path.exists(path) else value


def credential_paths(options: Any, prefix: str = "") -> list[str]:
    """Paths of the credentials in ``options`` (nested dicts included): credential keys, credential headers
    (``Authorization`` ...), URLs with user-info or credential query parameters (:mod:`pipeline.redact`)."""
    return [path for path, _ in credential_findings(options, prefix)]


def _describe(path: str, what: str) -> str:
    if what == "credential key":
        return f"{path} looks like a credential"
    if what == "header":
        return f"{path} is a credential header"
    if what == "user-info":
        return f"{path} is a URL with a user name / password (user-info)"
    return f"{path} is a URL with a credential ({what})"


def check_no_credentials(name: str, options: Any) -> None:
    """Refuse credentials in parameter ``name`` (options, a URL or a list of URLs): credential keys, headers
    such as ``Authorization``, user-info or credential query parameters in URLs. The message names where
    they are (``storage_options['client_kwargs']['endpoint_url']``), never their values."""
    check_parameters({name: options})


def check_parameters(values: Mapping[str, Any]) -> None:
    """:func:`check_no_credentials` on every parameter (paths, URLs, options) at once, before anything uses
    them; one error names every place a credential was found.

    Raises:
        ParameterError: ``invalid parameter <names>: <where and what>; <where credentials go instead>``.
    """
    found = [
        (name, path, what) for name, value in values.items() for path, what in credential_findings(value)
    ]
    if not found:
        return
    names = list(dict.fromkeys(name for name, _, _ in found))
    described = ", ".join(_describe(name + path, what) for name, path, what in found)
    urls_in_params = any(
        what not in ("credential key", "header") and "storage_options" not in name for name, _, what in found
    )
    options = any("storage_options" in name for name, _, _ in found)
    helps = ([CREDENTIALS_HELP] if options or not urls_in_params else []) + (
        [URL_CREDENTIALS_HELP] if urls_in_params else []
    )
    raise ParameterError(f"invalid parameter {', '.join(names)}: {described}; {'; '.join(helps)}")


def _validation_message(exc: ValidationError, params: Mapping[str, Any]) -> str:
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ())]
        field = loc[0] if loc else ""
        msg = err.get("msg", "invalid")
        if not field:
            parts.append(msg.removeprefix("Value error, "))
            continue
        shown = "" if "storage_options" in field else f"={params.get(field)!r}"
        where = field + "".join(f"[{p}]" for p in loc[1:])
        parts.append(f"{where}{shown}: {msg.removeprefix('Value error, ')}")
    return "invalid parameter " + "; ".join(parts)


def annotate_config(params: Mapping[str, Any], *, cwd: str | os.PathLike | None = None) -> AnnotateConfig:
    """Validate flow parameters (named like :class:`AnnotateConfig`'s fields) into an ``AnnotateConfig``.

    Local paths are resolved against ``cwd`` (default: the process's working directory); see the module
    doc. ``None`` values mean "the config's default".

    Raises:
        ParameterError: naming every bad parameter (values of storage options are never shown).
    """
    values = {k: v for k, v in params.items() if v is not None}
    unknown = sorted(set(values) - set(AnnotateConfig.model_fields))
    if unknown:
        raise ParameterError(f"unknown parameter(s) {unknown}; known: {sorted(AnnotateConfig.model_fields)}")
    check_parameters(values)
    try:
        if isinstance(values.get("input"), str):
            values["input"] = (
                resolve_path(values["input"], cwd) if values["input"].strip() else values["input"]
            )
        elif isinstance(values.get("input"), list | tuple):
            values["input"] = [
                resolve_path(v, cwd) if isinstance(v, str) and v.strip() else v for v in values["input"]
            ]
        if isinstance(values.get("output"), str) and values["output"].strip():
            values["output"] = resolve_path(values["output"], cwd)
        if isinstance(values.get("vocab_file"), str) and values["vocab_file"].strip():
            values["vocab_file"] = resolve_vocab_file(values["vocab_file"], cwd)
        if isinstance(values.get("merge_vocab"), list | tuple):
            values["merge_vocab"] = [
                resolve_vocab_file(v, cwd, name=f"merge_vocab[{i}]") if isinstance(v, str) else v
                for i, v in enumerate(values["merge_vocab"])
            ]
        for name in ("model", "checkpoint", "sd_weights", "clip_weights"):
            if isinstance(values.get(name), str):
                values[name] = _maybe_local_file(values[name], cwd)
        if isinstance(values.get("cache_dir"), str):
            values["cache_dir"] = resolve_path(values["cache_dir"], cwd)
        return AnnotateConfig(**values)
    except ValidationError as exc:
        raise ParameterError(_validation_message(exc, params)) from None


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "bad input or settings" (shown as one line, never retried)."""
    from odise_model import CheckpointError, WeightsNotFoundError
    from odise_model.config import ConfigError
    from odise_model.vocabulary import VocabularyError
    from pipeline.annotate.checks import OutputError
    from pipeline.annotate.commit import ProvenanceMismatchError
    from pipeline.annotate.lease import LeaseHeldError
    from pipeline.shards import InputError
    from pipeline.train.run import TrainOutputError, TrainStateError

    return (
        ParameterError,
        LeaseHeldError,
        TrainOutputError,
        TrainStateError,
        VocabularyError,
        ConfigError,
        CheckpointError,
        WeightsNotFoundError,
        InputError,
        OutputError,
        ProvenanceMismatchError,
        FileNotFoundError,
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
    )


def iter_causes(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and its ``__cause__`` / ``__context__`` chain (each once)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


_NETWORK_ERROR_NAMES = frozenset(
    {
        # botocore / aiobotocore
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        # aiohttp
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ClientPayloadError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        # httpx / urllib3 / requests / http.client
        "TransportError",
        "ProtocolError",
        "IncompleteRead",
        "ChunkedEncodingError",
        "RemoteDisconnected",
    }
)


def is_transient_io_error(exc: BaseException) -> bool:
    """True when retrying may help: an I/O or network error, not bad input.

    Walks the cause chain: any "bad input" error (:func:`user_errors`, ``ValueError``, ``TypeError``,
    ``KeyError``) in it means no retry; otherwise an ``OSError`` (connection resets, timeouts, DNS,
    ``OutputError`` caused by a network error) or a known network-library error means retry.
    """
    chain = list(iter_causes(exc))
    bad_input = user_errors() + (ValueError, TypeError, KeyError)
    for e in chain:
        if isinstance(e, bad_input) and not isinstance(e, _output_error_type()):
            return False
    for e in chain:
        if isinstance(e, OSError) and not isinstance(e, _output_error_type()):
            return True
        if any(cls.__name__ in _NETWORK_ERROR_NAMES for cls in type(e).__mro__):
            return True
    return False


def _output_error_type() -> type[BaseException]:
    from pipeline.annotate.checks import OutputError

    return OutputError


def build_model(cls: Any, params: Mapping[str, Any], *, what: str) -> Any:
    """``cls(**params)`` (a pydantic model or dataclass); errors become :class:`ParameterError` naming the field."""
    try:
        return cls(**params)
    except ValidationError as exc:
        raise ParameterError(
            _validation_message(exc, params).replace("invalid parameter", f"invalid {what} parameter", 1)
        ) from None
    except TypeError as exc:  # dataclass: unknown / missing field
        raise ParameterError(f"invalid {what} parameters: {exc}") from None


def result_dict(result: Any) -> dict[str, Any]:
    """A pipeline result as a dict (``to_dict()``, a dataclass, a pydantic model or a mapping)."""
    import dataclasses

    if hasattr(result, "to_dict"):
        return dict(result.to_dict())
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        return dataclasses.asdict(result)
    if hasattr(result, "model_dump"):
        return dict(result.model_dump())
    if isinstance(result, Mapping):
        return dict(result)
    return {"result": repr(result)}


def table_rows(data: Mapping[str, Any], prefix: str = "", *, max_rows: int = 200) -> list[dict[str, Any]]:
    """``[{"metric": "a.b", "value": v}, ...]``: nested mappings flattened, lists/None shown as JSON text."""
    import json

    rows: list[dict[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += table_rows(value, name + ".", max_rows=max_rows)
        elif isinstance(value, bool | int | float | str):
            rows.append({"metric": name, "value": value})
        else:
            rows.append({"metric": name, "value": json.dumps(value, default=str)[:500]})
        if len(rows) >= max_rows:
            break
    return rows[:max_rows]


def replace_fields(obj: Any, **changes: Any) -> Any:
    """A copy of a pydantic model or dataclass with ``changes`` (used for credentials inside tasks)."""
    import dataclasses

    if hasattr(obj, "model_copy"):
        return obj.model_copy(update=changes)
    return dataclasses.replace(obj, **changes)
