"""Error kinds of the output's error rows, how exceptions map to them, and the fault-injection test hook.

Every sample that cannot be labelled becomes one error row (see :mod:`pipeline.schema`) with three columns:

* ``error``: a human-readable reason that names the image's own location (``... [file:///data/a.jpg]``);
* ``error_kind``: one of the stable snake_case kinds below (never renamed; new kinds may be added);
* ``retryable``: whether labelling the sample again may succeed (``--retry-errors`` relabels these).

One function, :func:`classify`, turns an exception (or a reason text) into ``(kind, retryable)``; every stage
of the pipeline (read, decode, model, post-process, encode, staging write) uses it, so the same failure is
always reported the same way.

Kinds (:data:`KINDS`; retryable ones first)
-------------------------------------------

===================  =========  ==========================================================================
kind                 retryable  meaning
===================  =========  ==========================================================================
network              yes        the storage could not be reached (connection refused/reset, DNS, HTTP 5xx,
                                throttling) after the in-task retries
timeout              yes        a storage read timed out
vanished             yes        a file or object that was listed is gone (ENOENT). Object stores and
                                network filesystems can briefly hide a file (eventual consistency), so a
                                missing file is retried in the task first, and the row stays retryable
shard_growing        yes        a tar shard ended early while it was still being written: its size, mtime
                                or ETag changed during the read, or it was modified less than
                                :data:`GROWING_WINDOW_S` seconds before the read began (a shard still
                                being uploaded). The samples after the cut are missing until a retry
io_error             yes        any other storage I/O error (EIO, a server error the client gave up on)
out_of_memory        yes        host ``MemoryError`` or CUDA out of memory, even after the image was
                                retried alone (batch 1) with post-processing in chunks
not_an_image         no         empty file, unknown format, or a format that is not accepted (e.g. EPS)
corrupt_image        no         the image decoder failed on the data (or an unsupported pixel layout)
truncated_image      no         the image file ends early
image_too_large      no         width x height above ``max_pixels`` (decompression-bomb guard)
member_too_large     no         a tar member above the reader's ``max_member_bytes``
no_image_member      no         a WebDataset sample without an image member (e.g. only ``.json``)
unsafe_member        no         a tar member with an absolute path, ``..``, a link or a device: never read
duplicate_key        no         a WebDataset key seen again after its sample ended (stored as ``<key>#dupN``)
truncated_shard      no         the tar shard is cut (and not growing): the sample being read and every
                                later sample are missing (one ``__shard__`` row says so)
corrupt_shard        no         not a readable tar archive, or an invalid tar header
access_denied        no         the storage refused to read the file (permissions, credentials)
read_error           no         an unexpected exception while reading one sample (a bug or odd data)
decode_error         no         an unexpected exception while decoding or resizing one image
model_error          no         the model raised for this image alone (batched and single retries both)
postprocess_error    no         panoptic / semantic / instance post-processing raised for this image
encode_error         no         RLE / PNG encoding or the overlay of this image raised
staging_error        no         the image's output row could not be converted for the staging Parquet file
unknown              no         an error that could not be classified (old outputs, foreign writers)
===================  =========  ==========================================================================

Fault injection (tests only)
----------------------------
Tests must see every stage fail for one sample and the run go on, without mocks. The hook is honoured only
when the environment variable ``ODISE_FAULT_INJECTION`` is ``1`` in the process that reads the shard (for a
local run: the CLI / driver process, whose environment Ray's workers inherit) **and** a WebDataset sample
carries a ``json`` member with ``{"odise_fault": "<fault>"}``. Production never sets the variable, and a
stray ``odise_fault`` field in user data does nothing without it. Faults (:data:`FAULTS`):

* ``read``, ``decode``, ``model``, ``postprocess``, ``encode``, ``stage``: raise :class:`InjectedFault` for
  that sample in that stage (the row gets ``read_error``, ``decode_error``, ... not retryable);
* ``oom``: a simulated out-of-memory (:class:`InjectedOutOfMemory`, a ``MemoryError``) in the model's
  forward pass, batched and alone -> ``out_of_memory``, retryable;
* ``oom_once``: out of memory in the batched forward pass only: the image is labelled alone (batch 1) with
  post-processing in chunks (no error row);
* ``postprocess_oom``: out of memory in the unchunked post-processing only: the chunked post-processing
  labels the image (no error row);
* ``decode_oom``: ``MemoryError`` while decoding -> ``out_of_memory``;
* ``stage_transient``: the first write of the staging file that holds the sample fails with a
  ``ConnectionError`` (per process); the write is retried with backoff and succeeds (no error row).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

__all__ = [
    "FAULTS",
    "FAULT_ENV",
    "FAULT_FIELD",
    "GROWING_WINDOW_S",
    "KINDS",
    "ErrorKind",
    "InjectedFault",
    "InjectedOutOfMemory",
    "KindedError",
    "classify",
    "fault_of",
    "faults_enabled",
    "inject",
    "is_out_of_memory",
    "is_retryable",
    "is_storage_error",
    "stage_kind",
]

#: A tar shard that ends early and was modified less than this many seconds before the read began is
#: taken for a shard still being written (``shard_growing``, retryable) rather than a damaged one.
GROWING_WINDOW_S = 300.0


@dataclass(frozen=True)
class ErrorKind:
    """One error kind: its stable ``name``, whether it is ``retryable``, what it means, what to do."""

    name: str
    retryable: bool
    meaning: str
    action: str


_KIND_LIST = (
    ErrorKind("network", True, "storage unreachable after retries", "rerun with --retry-errors"),
    ErrorKind("timeout", True, "a storage read timed out", "rerun with --retry-errors"),
    ErrorKind(
        "vanished", True, "a listed file is gone", "rerun with --retry-errors; remove it from the input"
    ),
    ErrorKind("shard_growing", True, "the shard was still being written", "rerun once the upload is done"),
    ErrorKind("io_error", True, "other storage I/O error", "rerun with --retry-errors; check the storage"),
    ErrorKind(
        "out_of_memory", True, "host or GPU memory ran out", "rerun with a smaller batch / more memory"
    ),
    ErrorKind("not_an_image", False, "empty or unknown format", "fix or drop the file"),
    ErrorKind("corrupt_image", False, "the decoder failed on the data", "fix or drop the file"),
    ErrorKind("truncated_image", False, "the image file ends early", "re-export the file"),
    ErrorKind("image_too_large", False, "above max_pixels", "raise --max-pixels or downscale the file"),
    ErrorKind("member_too_large", False, "tar member above the size limit", "split or downscale the sample"),
    ErrorKind("no_image_member", False, "sample without an image", "fix the shard"),
    ErrorKind("unsafe_member", False, "absolute path, '..', link or device member", "fix the shard"),
    ErrorKind("duplicate_key", False, "key repeated in the shard", "make keys unique"),
    ErrorKind("truncated_shard", False, "the shard is cut; later samples are missing", "re-upload the shard"),
    ErrorKind("corrupt_shard", False, "not a readable tar archive", "re-upload the shard"),
    ErrorKind("access_denied", False, "the storage refused the read", "fix permissions, then --retry-errors"),
    ErrorKind("read_error", False, "unexpected exception reading the sample", "report it with the row"),
    ErrorKind("decode_error", False, "unexpected exception decoding the image", "report it with the row"),
    ErrorKind("model_error", False, "the model raised for this image", "report it with the row"),
    ErrorKind("postprocess_error", False, "post-processing raised for this image", "report it with the row"),
    ErrorKind("encode_error", False, "RLE/PNG encoding raised for this image", "report it with the row"),
    ErrorKind("staging_error", False, "the row could not be written", "report it with the row"),
    ErrorKind("unknown", False, "unclassified error", "read the error text"),
)
#: Every kind by name (the closed list of values of the ``error_kind`` column).
KINDS: dict[str, ErrorKind] = {k.name: k for k in _KIND_LIST}

_STAGE_KINDS = {
    "read": "read_error",
    "decode": "decode_error",
    "model": "model_error",
    "postprocess": "postprocess_error",
    "encode": "encode_error",
    "stage": "staging_error",
}


def stage_kind(stage: str | None) -> str:
    """The kind of an unexpected, deterministic exception in a stage (``"model"`` -> ``"model_error"``)."""
    return _STAGE_KINDS.get(stage or "", "unknown")


def is_retryable(kind: str) -> bool:
    """Whether rows of this kind may succeed when labelled again (unknown kinds: no)."""
    entry = KINDS.get(kind)
    return bool(entry and entry.retryable)


class KindedError(Exception):
    """An exception that knows its error kind (``error_kind`` attribute); :func:`classify` uses it as is."""

    def __init__(self, message: str, kind: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown error kind {kind!r}; known: {sorted(KINDS)}")
        super().__init__(message)
        self.error_kind = kind


# --------------------------------------------------------------------------------------------------
# classify
# --------------------------------------------------------------------------------------------------
# Reason texts produced by pipeline.images and pipeline.shards (and older outputs): prefix -> kind.
_REASON_PREFIXES = (
    ("read error", "read_error"),
    ("decode error", "decode_error"),
    ("model error", "model_error"),
    ("post-processing error", "postprocess_error"),
    ("encode error", "encode_error"),
    ("staging error", "staging_error"),
    ("empty", "not_an_image"),
    ("not an image", "not_an_image"),
    ("truncated image", "truncated_image"),
    ("corrupt image", "corrupt_image"),
    ("unsupported image", "corrupt_image"),
    ("too large", "image_too_large"),
    ("out of memory", "out_of_memory"),
    ("no image member", "no_image_member"),
    ("no image bytes", "no_image_member"),
    ("unsafe tar member", "unsafe_member"),
    ("duplicate key", "duplicate_key"),
    ("shard still being written", "shard_growing"),
    ("truncated tar", "truncated_shard"),
    ("incomplete sample", "truncated_shard"),
    ("corrupt tar", "corrupt_shard"),
    ("not a readable tar", "corrupt_shard"),
    ("image file vanished", "vanished"),
    ("shard vanished", "vanished"),
)
_TRANSIENT_TEXT = (
    "connection reset",
    "connection refused",
    "connection aborted",
    "broken pipe",
    "temporary failure",
    "name or service not known",
    "service unavailable",
    "slowdown",
    "slow down",
    "internalerror",
    "internal error",
    "bad gateway",
    "gateway timeout",
    "too many requests",
    "throttl",
)


def _classify_reason(reason: str) -> str:
    text = reason.strip().lower()
    head = text.split(":", 1)[0].strip()
    if head in KINDS:  # "timeout: cannot read image ...": the kind leads the text
        return head
    for prefix, kind in _REASON_PREFIXES:
        if text.startswith(prefix):
            return kind
    if text.startswith("member ") and "too large" in text:
        return "member_too_large"
    if "timed out" in text or "timeout" in text:
        return "timeout"
    if any(t in text for t in _TRANSIENT_TEXT):
        return "network"
    return "unknown"


def is_out_of_memory(exc: BaseException) -> bool:
    """Host ``MemoryError``, ``torch.cuda.OutOfMemoryError`` (or another accelerator's OOM), by type or message.

    torch is not imported here: the CUDA class is recognised by name, and the message covers the
    ``RuntimeError("CUDA out of memory ...")`` of older torch versions.
    """
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ in ("OutOfMemoryError", "OutOfMemory"):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text and ("cuda" in text or "hip" in text or "mps" in text)
    )


def _storage_kind(exc: BaseException) -> str | None:
    """The kind of a storage / network exception, or None when it is not one."""
    name = type(exc).__name__
    text = f"{name}: {exc}".lower()
    if isinstance(exc, FileNotFoundError):
        return "vanished"
    if (
        isinstance(exc, PermissionError)
        or "accessdenied" in text
        or "forbidden" in text
        or "invalidaccesskeyid" in text
    ):
        return "access_denied"
    if isinstance(exc, TimeoutError) or "timeout" in name.lower() or "timed out" in text:
        return "timeout"
    if isinstance(exc, ConnectionError) or any(
        s in name for s in ("Connect", "Endpoint", "ServerDisconnected")
    ):
        return "network"
    module = type(exc).__module__ or ""
    if module.startswith(
        ("botocore", "aiobotocore", "aiohttp", "urllib3", "requests", "s3fs", "gcsfs", "fsspec")
    ):
        return (
            "network"
            if any(t in text for t in _TRANSIENT_TEXT) or "client" not in name.lower()
            else "io_error"
        )
    if isinstance(exc, OSError):
        return "network" if any(t in text for t in _TRANSIENT_TEXT) else "io_error"
    return None


def is_storage_error(exc: BaseException) -> bool:
    """True for exceptions raised by storage I/O (``OSError`` family, network and cloud-client errors)."""
    return _storage_kind(exc) is not None


def classify(exc_or_reason: BaseException | str, *, stage: str | None = None) -> tuple[str, bool]:
    """``(error kind, retryable)`` of an exception or of a reason text.

    Args:
        exc_or_reason: the exception raised for one sample, or an ``error`` text (rows of older outputs,
            reader records).
        stage: ``"read"``, ``"decode"``, ``"model"``, ``"postprocess"``, ``"encode"`` or ``"stage"``: the kind
            an otherwise unrecognised exception gets (``model_error`` ...).

    Rules, in order: an exception that carries ``error_kind`` (:class:`KindedError`,
    :class:`pipeline.images.ImageDecodeError`, injected faults) keeps it; out of memory (host or CUDA);
    storage errors (missing file -> ``vanished``, permissions -> ``access_denied``, timeouts, connection and
    HTTP 5xx / throttling -> ``network``, other ``OSError`` -> ``io_error``); anything else -> the stage's
    kind. Texts are matched on the stable reasons that :mod:`pipeline.images` and :mod:`pipeline.shards`
    write.
    """
    if isinstance(exc_or_reason, str):
        kind = _classify_reason(exc_or_reason)
        if kind == "unknown" and stage:
            kind = stage_kind(stage)
        return kind, is_retryable(kind)
    exc = exc_or_reason
    kind = getattr(exc, "error_kind", None)
    if not (isinstance(kind, str) and kind in KINDS):
        if is_out_of_memory(exc):
            kind = "out_of_memory"
        else:
            kind = _storage_kind(exc) or stage_kind(stage)
    return kind, is_retryable(kind)


# --------------------------------------------------------------------------------------------------
# Fault injection (tests only; see the module doc)
# --------------------------------------------------------------------------------------------------
FAULT_ENV = "ODISE_FAULT_INJECTION"
FAULT_FIELD = "odise_fault"
FAULTS = (
    "read",
    "decode",
    "model",
    "postprocess",
    "encode",
    "stage",
    "oom",
    "oom_once",
    "postprocess_oom",
    "decode_oom",
    "stage_transient",
)


class InjectedFault(KindedError):
    """The exception a test asked for (:func:`inject`); its kind is the stage's error kind."""


class InjectedOutOfMemory(MemoryError):
    """A simulated out-of-memory (a ``MemoryError``, so every OOM path treats it as the real thing)."""


def faults_enabled() -> bool:
    """True only when ``ODISE_FAULT_INJECTION=1`` in this process's environment."""
    return os.environ.get(FAULT_ENV, "") == "1"


def fault_of(meta: dict | None) -> str:
    """The fault a sample asks for (``meta`` = its parsed ``json`` member), or ``""``.

    ``""`` unless fault injection is enabled (:func:`faults_enabled`) and the value is one of :data:`FAULTS`.
    """
    if not meta or not faults_enabled():
        return ""
    value = meta.get(FAULT_FIELD)
    return value if isinstance(value, str) and value in FAULTS else ""


_transient_done: set[str] = set()


def inject(point: str, fault: str, key: str = "") -> None:
    """Raise the fault a sample carries when ``point`` is where it belongs; no-op for ``fault == ""``.

    Points: ``read``, ``decode``, ``model`` (the batched forward pass), ``model_single`` (the forward pass of
    the image alone), ``postprocess`` (every post-processing attempt), ``postprocess_unchunked`` (the first,
    unchunked one), ``encode``, ``stage`` (building the staging rows) and ``stage_write`` (writing them).
    ``fault`` comes from the row (set by the read stage through :func:`fault_of`), so nothing happens unless
    the reading process had fault injection enabled.
    """
    if not fault:
        return
    if fault == point or (fault == "model" and point == "model_single"):
        raise InjectedFault(f"injected {fault} fault for {key!r} (ODISE_FAULT_INJECTION)", stage_kind(fault))
    oom = (
        (fault == "decode_oom" and point == "decode")
        or (fault == "oom" and point in ("model", "model_single"))
        or (fault == "oom_once" and point == "model")
        or (fault == "postprocess_oom" and point == "postprocess_unchunked")
    )
    if oom:
        raise InjectedOutOfMemory(f"injected out of memory at {point} for {key!r} (ODISE_FAULT_INJECTION)")
    if fault == "stage_transient" and point == "stage_write" and key not in _transient_done:
        _transient_done.add(key)
        raise ConnectionError(f"injected transient write failure for {key!r} (ODISE_FAULT_INJECTION)")
