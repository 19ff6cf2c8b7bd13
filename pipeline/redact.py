"""Keep credentials out of everything a run records: one place that knows what a credential looks like.

Credentials hide in four forms besides the plain ``key`` / ``secret`` storage options:

* user-info in a URL: ``http://user:password@minio:9000`` (an ``endpoint_url``, an input URL ...);
* request headers: ``{"headers": {"Authorization": "Bearer ..."}}`` anywhere in fsspec options
  (``client_kwargs.headers`` for s3fs, ``headers`` for http);
* presigned / SAS / token query strings: ``?X-Amz-Signature=...&X-Amz-Credential=...``,
  ``X-Amz-Security-Token``, ``X-Goog-Signature``, Azure ``sig=``, ``token=``, ``access_token=`` ...;
* fsspec option keys: ``key``, ``secret``, ``token``, ``password``, ``*_token`` ... (:data:`CREDENTIAL_KEYS`).

What this module offers, and who uses it:

* :func:`redact_url` / :func:`redact_text`: user-info and credential query values replaced by ``***``
  (``http://***@host/x?X-Amz-Signature=***&versionId=3``); for URLs in provenance, summaries, error
  messages, logs and Prefect artifacts;
* :func:`redact`: the same over nested options / dicts / lists (credential keys and headers masked);
* :func:`url_identity`: a URL without its user-info and without the parameters of a signed URL (the
  signature, the credential, the expiry ...), so a re-signed URL names the same object. Inputs are
  recorded (``shard`` / ``image_url`` columns, commit markers, shard ids) in this form: a presigned
  input is stored as the object's plain URL, never with its signature, and re-signing the URLs of an
  interrupted run resumes it instead of labelling everything again;
* :func:`credential_findings` / :func:`url_credentials`: *where* credentials are (option paths and the kind of
  credential, never the value), for the refusals in :mod:`flows.params` and :mod:`pipeline.train.run`;
* :func:`install_log_redaction`: every log record of the process passes through :func:`redact_text`
  (message and traceback) before any handler sees it.

No secret value is ever part of a message produced here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "CREDENTIAL_KEYS",
    "CREDENTIAL_HEADERS",
    "MASK",
    "credential_findings",
    "install_log_redaction",
    "is_credential_key",
    "is_credential_query_param",
    "redact",
    "redact_exception",
    "redact_text",
    "redact_url",
    "url_credentials",
    "url_identity",
]

MASK = "***"

CREDENTIAL_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "passwd",
        "access_key",
        "secret_key",
        "access_key_id",
        "secret_access_key",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "session_token",
        "security_token",
        "sas_token",
        "account_key",
        "client_secret",
        "connection_string",
        "credentials",
        "api_key",
        "private_key",
    }
)
"""Option keys that hold credentials (compared lower-case, ``-`` read as ``_``); keys ending in
``_secret``, ``_token`` or ``_password`` too (:func:`is_credential_key`)."""

_CREDENTIAL_SUFFIXES = ("_secret", "_token", "_password")

CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy_authorization", "cookie", "x_api_key", "api_key_header", "x_auth_key"}
)
"""HTTP header names (lower-case, ``-`` read as ``_``) whose values are credentials; ``*_token`` headers
(``X-Amz-Security-Token``, ``X-Auth-Token``) are covered by the key rule."""

_QUERY_NAMES = frozenset(
    {
        "x-amz-signature",
        "x-amz-credential",
        "x-amz-security-token",
        "x-goog-signature",
        "x-goog-credential",
        "signature",
        "awsaccesskeyid",
        "sig",
        "token",
        "access_token",
        "id_token",
        "refresh_token",
        "api_key",
        "apikey",
        "api-key",
        "key",
        "password",
        "passwd",
        "pwd",
        "secret",
        "client_secret",
        "auth",
        "authorization",
        "code",
        "sas",
        "sas_token",
    }
)
_QUERY_SUFFIXES = ("token", "signature", "secret", "password", "credential", "credentials", "_key", "-key")

# Parameters of a signed URL that change each time it is signed (dropped by url_identity when signed).
_SIGNING_PREFIXES = ("x-amz-", "x-goog-")
_SIGNING_NAMES = frozenset({"expires", "signature", "awsaccesskeyid", "googleaccessid"})
_AZURE_SAS = frozenset(
    {"sv", "ss", "srt", "sp", "se", "st", "spr", "sig", "sr", "si", "sdd", "skoid", "sktid", "skt", "ske"}
    | {"sks", "skv", "saoid", "suoid", "scid", "sip", "ses", "rscc", "rscd", "rsce", "rscl", "rsct"}
)

_URL_IN_TEXT = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)([^/\s@'\"<>]+)@")
_PARAM_IN_TEXT = re.compile(r"(?i)(?<=[?&;])([A-Za-z0-9_.~-]+)=([^&#\s'\"<>;]*)")
_HEADER_IN_TEXT = re.compile(
    r"(?i)\b((?:proxy-)?authorization|x-api-key|cookie)(['\"]?\s*[:=]\s*['\"]?)([^'\",}\r\n]+)"
)


def _norm(name: Any) -> str:
    return str(name).strip().lower().replace("-", "_")


def is_credential_key(name: Any) -> bool:
    """True for an option or header name that holds a credential (``secret``, ``aws_session_token``,
    ``Authorization``, ``X-Amz-Security-Token`` ...)."""
    norm = _norm(name)
    return norm in CREDENTIAL_KEYS or norm in CREDENTIAL_HEADERS or norm.endswith(_CREDENTIAL_SUFFIXES)


def is_credential_query_param(name: str) -> bool:
    """True for a URL query parameter whose value is a credential (``X-Amz-Signature``, ``sig``, ``token`` ...)."""
    low = name.strip().lower()
    return low in _QUERY_NAMES or low.endswith(_QUERY_SUFFIXES)


def _mask_param(match: re.Match) -> str:
    name, value = match.group(1), match.group(2)
    return f"{name}={MASK}" if is_credential_query_param(name) and value else match.group(0)


def redact_text(text: str) -> str:
    """``text`` with every URL user-info, credential query value and ``Authorization: ...`` header value
    replaced by ``***`` (free text: log messages, error messages, markdown)."""
    if not isinstance(text, str) or not text:
        return text
    out = _URL_IN_TEXT.sub(lambda m: f"{m.group(1)}{MASK}@", text) if "@" in text else text
    if "=" in out:
        out = _PARAM_IN_TEXT.sub(_mask_param, out)
    if any(h in out.lower() for h in ("authorization", "x-api-key", "cookie")):
        out = _HEADER_IN_TEXT.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}", out)
    return out


def redact_url(url: str) -> str:
    """A URL safe to record: user-info -> ``***@``, credential query values -> ``***`` (the rest unchanged).

    ``http://u:p@h:9000/b?X-Amz-Signature=abc&versionId=3`` -> ``http://***@h:9000/b?X-Amz-Signature=***&versionId=3``.
    """
    return redact_text(url)


def url_credentials(url: str) -> list[str]:
    """What in ``url`` is a credential: ``["user-info", "query parameter 'X-Amz-Signature'", ...]`` (no values).

    User-info counts when it holds a password, or for http(s) URLs any user-info (tokens are sent as user
    names); ``sftp://user@host`` alone is not a credential.
    """
    if not isinstance(url, str) or "://" not in url:
        return []
    found: list[str] = []
    try:
        parts = urlsplit(url)
    except ValueError:
        return [] if redact_text(url) == url else ["credential-like text"]
    netloc = parts.netloc
    if "@" in netloc:
        userinfo = netloc.rsplit("@", 1)[0]
        if ":" in userinfo or parts.scheme.lower() in ("http", "https"):
            found.append("user-info")
    for name, value in _query_pairs(parts.query):
        if value and is_credential_query_param(name):
            found.append(f"query parameter {name!r}")
    return found


def _query_pairs(query: str) -> list[tuple[str, str]]:
    pairs = []
    for piece in re.split(r"[&;]", query):
        if piece:
            name, _, value = piece.partition("=")
            pairs.append((name, value))
    return pairs


def url_identity(url: str) -> str:
    """The URL of the object itself: without user-info, and, for a signed URL (one with a credential query
    parameter), without its signing parameters (``X-Amz-*``, ``X-Goog-*``, ``Expires``, ``Signature``, Azure SAS
    fields) and credential parameters. Other query parameters (``versionId``) are kept in order.

    Unsigned URLs and local paths are returned unchanged (apart from user-info), so the identity of every
    ordinary input is its URL.
    """
    if not isinstance(url, str) or "://" not in url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    netloc = parts.netloc.rsplit("@", 1)[1] if "@" in parts.netloc else parts.netloc
    query = parts.query
    if query:
        pairs = re.split(r"[&;]", query)
        names = [p.partition("=")[0].lower() for p in pairs]
        signed = any(is_credential_query_param(n) for n in names)
        if signed:
            azure = "sig" in names

            def keep(name: str) -> bool:
                if (
                    is_credential_query_param(name)
                    or name in _SIGNING_NAMES
                    or name.startswith(_SIGNING_PREFIXES)
                ):
                    return False
                return not (azure and name in _AZURE_SAS)

            query = "&".join(p for p, n in zip(pairs, names) if p and keep(n))
    if netloc == parts.netloc and query == parts.query:
        return url
    rebuilt = f"{parts.scheme}://{netloc}{parts.path}"
    if query:
        rebuilt += f"?{query}"
    if parts.fragment:
        rebuilt += f"#{parts.fragment}"
    return rebuilt


def redact(obj: Any, *, keys: bool = True) -> Any:
    """A copy of ``obj`` (nested mappings, lists, tuples, strings) safe to record: strings pass through
    :func:`redact_text`; with ``keys`` (options, headers) values under credential keys or credential headers
    become ``***`` too (leave it off for records whose keys are data, e.g. category names)."""
    if isinstance(obj, Mapping):
        return {
            k: (MASK if keys and is_credential_key(k) and v not in (None, "") else redact(v, keys=keys))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [redact(v, keys=keys) for v in obj]
    if isinstance(obj, tuple):
        return tuple(redact(v, keys=keys) for v in obj)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj


def credential_findings(options: Any, prefix: str = "") -> list[tuple[str, str]]:
    """``[(path, what), ...]``: where ``options`` (nested dicts / lists) hold credentials, e.g.
    ``("['client_kwargs']['endpoint_url']", "user-info")``, ``("['headers']['Authorization']", "header")``,
    ``("['secret']", "credential key")``. Values are never part of the result."""
    found: list[tuple[str, str]] = []
    if isinstance(options, Mapping):
        for key, value in options.items():
            path = f"{prefix}[{key!r}]"
            norm = _norm(key)
            if norm in CREDENTIAL_HEADERS:
                found.append((path, "header"))
            elif is_credential_key(key):
                found.append((path, "credential key"))
            else:
                found += credential_findings(value, path)
    elif isinstance(options, list | tuple):
        for i, value in enumerate(options):
            found += credential_findings(value, f"{prefix}[{i}]")
    elif isinstance(options, str):
        found += [(prefix, what) for what in url_credentials(options)]
    return found


# --------------------------------------------------------------------------------------------------
# Exceptions and logs
# --------------------------------------------------------------------------------------------------
def redact_exception(exc: BaseException) -> BaseException:
    """Redact, in place, the string arguments (and ``OSError`` file names, notes) of ``exc`` and of every
    exception in its cause / context chain; returns ``exc``. Its type, traceback and chain are kept, so
    retry rules that look at types still work."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        try:
            if any(isinstance(a, str) for a in cur.args):
                cur.args = tuple(redact_text(a) if isinstance(a, str) else a for a in cur.args)
            if isinstance(cur, OSError):
                for attr in ("filename", "filename2"):
                    value = getattr(cur, attr, None)
                    if isinstance(value, str):
                        setattr(cur, attr, redact_text(value))
            notes = getattr(cur, "__notes__", None)
            if notes:
                cur.__notes__ = [redact_text(n) if isinstance(n, str) else n for n in notes]
        except (AttributeError, TypeError):  # exotic exceptions with read-only args
            pass
        cur = cur.__cause__ or cur.__context__
    return exc


_installed = False


def install_log_redaction() -> None:
    """Pass every log record of this process through :func:`redact_text` when it is created.

    The message (``msg % args``) and the formatted traceback of records that carry credentials are replaced
    by their redacted text (and the logged exception is redacted in place, for handlers that render it
    themselves), before any handler (console, file, Prefect's API handler, pytest's capture) sees them.
    Idempotent; installed by the pipeline's entry points (``run_annotation``, ``run_training``) and by the
    flows.
    """
    global _installed
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string is the handler's business
            return record
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            clean = redact_text(text)
            if clean != text:
                record.exc_text = clean
                redact_exception(record.exc_info[1])  # for handlers that render exc_info themselves (rich)
        return record

    logging.setLogRecordFactory(factory)
    _installed = True
