"""Storage: the few fsspec operations every job uses, atomic where the output's guarantees need it.

One module for reading and writing on any fsspec URL (local path, ``file://``, ``s3://``, ``gs://`` ...), so
the annotate commits, the training checkpoints and the exports share one meaning of "written":

* :func:`write_bytes` writes a whole file atomically: locally a hidden temp file (``.name.tmp-<uuid>``,
  fsync'ed when ``durable``) then ``os.replace``; on object stores one whole-object PUT (or a multipart upload,
  which is also all-or-nothing). Readers never see half a file.
* :func:`list_files` / :func:`list_children` list fresh (fsspec's listing cache is invalidated first) and skip
  hidden names, so temp files of a writer in progress are never taken for outputs.
* :func:`open_atomic` streams a large file (a shard's final Parquet, a COCO part) through a local file and
  publishes it atomically, so nothing of its size is held in memory.
* :func:`cat_many` fetches many small files concurrently; a missing file is left out, a transient failure is
  retried with backoff and then raised, never taken for "missing".
* :class:`JsonArraySpool` and :func:`write_json_object` build a big JSON file (a COCO file, Label Studio tasks)
  one object at a time through local temp files, so memory does not grow with the number of objects.

Functions are stateless and take plain, picklable arguments (usable in Ray tasks).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from typing import IO, Any

from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

log = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.2, 1.0, 3.0)
"""Backoff between attempts of :func:`cat_many` (4 attempts in all)."""

__all__ = [
    "JsonArraySpool",
    "cat_many",
    "create_exclusive",
    "delete",
    "fs_root",
    "is_local",
    "json_bytes",
    "list_children",
    "list_files",
    "open_atomic",
    "put_local_file",
    "read_bytes",
    "remove_empty_dir",
    "utc_now",
    "write_bytes",
    "write_json_object",
    "write_many",
]


def fs_root(url: str, storage_options: dict[str, Any] | None):
    """``(filesystem, path without protocol and trailing slash)`` of a URL or local path."""
    fs, root = url_to_fs(url, **(storage_options or {}))
    return fs, root.rstrip("/")


def is_local(fs) -> bool:
    """True for the local filesystem (atomic rename, fsync and O_EXCL are available)."""
    return isinstance(fs, LocalFileSystem)


def utc_now() -> str:
    """UTC time, ISO-8601, whole seconds."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _temp_beside(path: str) -> str:
    """A hidden temp name beside the local ``path`` (``.name.tmp-<uuid>``), its folder created."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")


def _write_file(path: str, data: bytes, *, durable: bool) -> None:
    """Write ``data`` to the local file ``path`` (fsync'ed when ``durable``)."""
    with open(path, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def write_bytes(fs, path: str, data: bytes, *, durable: bool = True) -> None:
    """Write a whole file atomically: local temp file + ``os.replace``; remote single PUT/multipart."""
    if is_local(fs):
        tmp = _temp_beside(path)
        try:
            _write_file(tmp, data, durable=durable)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
    else:
        fs.pipe_file(path, data)


def create_exclusive(fs, path: str, data: bytes) -> bool:
    """Create ``path`` with ``data`` unless it exists; True when created, False when it already existed.

    Atomic and never overwriting: locally a complete, fsync'ed hidden temp file hard-linked to ``path``
    (``os.link`` fails on an existing name); on S3 one ``PUT`` with ``If-None-Match: *`` (s3fs
    ``mode="create"``; only stores that honour it, see :func:`pipeline.annotate.lease.honours_conditional_writes`).

    Raises:
        NotImplementedError: another store (callers fall back to read-compare-write).
    """
    if is_local(fs):
        tmp = _temp_beside(path)
        try:
            _write_file(tmp, data, durable=True)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # no hard links on this filesystem: O_EXCL create (content written right after)
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    return False
                try:
                    os.write(fd, data)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            return True
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    if not any(p in ("s3", "s3a") for p in protocols):
        raise NotImplementedError(f"exclusive create is not available on {protocols[0]}://")
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def write_many(fs, files: dict[str, bytes]) -> None:
    """Write many small files (PNGs); each one atomic, not fsync'ed; concurrent on object stores."""
    if not files:
        return
    if is_local(fs):
        for path, data in files.items():
            write_bytes(fs, path, data, durable=False)
    else:
        items = list(files.items())
        for start in range(0, len(items), 256):
            fs.pipe(dict(items[start : start + 256]))


def put_local_file(fs, local_path: str, path: str) -> None:
    """Move a finished local file to ``path`` atomically (local: copy to hidden temp + replace)."""
    if is_local(fs):
        tmp = _temp_beside(path)
        shutil.copyfile(local_path, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    else:
        fs.put_file(local_path, path)


def read_bytes(fs, path: str) -> bytes | None:
    """The whole file, or None when it does not exist. Transient failures (anything but "not found" /
    "permission denied") are retried after :data:`RETRY_DELAYS_S`, then raised: never taken for "missing"."""
    for attempt in range(len(RETRY_DELAYS_S) + 1):
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as exc:
            if _permanent(exc) or attempt == len(RETRY_DELAYS_S):
                raise
            log.warning("reading %s failed (%s: %s); retrying", path, type(exc).__name__, exc)
            time.sleep(RETRY_DELAYS_S[attempt])
    return None  # not reached


def list_files(fs, folder: str) -> list[str]:
    """Fresh, sorted listing of the files under ``folder`` (recursive), hidden temp files excluded."""
    fs.invalidate_cache(folder)
    try:
        found = fs.find(folder, withdirs=False)
    except FileNotFoundError:
        return []
    return sorted(p for p in found if not posixpath.basename(p).startswith("."))


def list_children(fs, folder: str) -> list[str]:
    """Fresh listing of the direct children names of ``folder`` (files and folders)."""
    fs.invalidate_cache(folder)
    try:
        entries = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return []
    names = [posixpath.basename(e.rstrip("/")) for e in entries]
    return sorted(n for n in names if n and not n.startswith("."))


def delete(fs, paths: Iterable[str]) -> int:
    """Delete files (missing ones are fine); returns how many were asked for (local: how many existed)."""
    paths = list(paths)
    if not paths:
        return 0
    if is_local(fs):
        n = 0
        for p in paths:
            try:
                os.remove(p)
                n += 1
            except FileNotFoundError:
                pass
        return n
    fs.rm(paths)
    for p in paths:
        fs.invalidate_cache(p)
    return len(paths)


def remove_empty_dir(fs, folder: str) -> None:
    """Remove a local folder if it is empty (object stores have no folders)."""
    if is_local(fs):
        try:
            os.rmdir(folder)
        except OSError:
            pass


@contextlib.contextmanager
def open_atomic(fs, path: str, *, durable: bool = True) -> Iterator[Any]:
    """A binary file object to stream a whole file into; ``path`` appears only when the block ends cleanly.

    Locally the data goes to a hidden temp file beside ``path`` (``.name.tmp-<uuid>``, fsync'ed when ``durable``)
    that is then renamed over ``path``; on object stores it goes to a local temporary file that is uploaded in
    one ``put_file`` (a single PUT or a multipart upload: all or nothing). An exception inside the block (or
    a crash) publishes nothing and leaves ``path`` as it was.
    """
    if is_local(fs):
        tmp = _temp_beside(path)
    else:
        handle, tmp = tempfile.mkstemp(prefix="odise-upload-")
        os.close(handle)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            if durable and is_local(fs):
                os.fsync(f.fileno())
        if is_local(fs):
            os.replace(tmp, path)
        else:
            fs.put_file(tmp, path)
            fs.invalidate_cache(path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def json_bytes(obj: Any, *, indent: int | None = None, sort_keys: bool = False) -> bytes:
    """UTF-8 JSON (non-ASCII kept), compact unless ``indent``; keys sorted when ``sort_keys``."""
    separators = None if indent else (",", ":")
    return json.dumps(
        obj, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys
    ).encode("utf-8")


class JsonArraySpool:
    """The body of a JSON array (``obj,\\nobj,...``), appended one object at a time to a local temp file.

    Args:
        folder: local folder of the temp file (deleted when closed).
        sort_keys: write each object with sorted keys (deterministic bytes).
    """

    def __init__(self, folder: str, *, sort_keys: bool = False) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(mode="w+b", dir=folder)
        self.sort_keys = sort_keys
        self.count = 0

    def add(self, obj: Any) -> None:
        if self.count:
            self.file.write(b",\n")
        self.file.write(json_bytes(obj, sort_keys=self.sort_keys))
        self.count += 1

    def copy_to(self, out: IO[bytes]) -> None:
        """Copy the body so far to ``out``; more objects may be added afterwards."""
        self.file.flush()
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        self.file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.file.close()


def write_json_object(
    out: IO[bytes],
    head: dict[str, Any],
    arrays: dict[str, JsonArraySpool],
    tail: dict[str, Any],
    *,
    sort_keys: bool = False,
) -> None:
    """Write ``{**head, <name>: [<spooled array>], ..., **tail}`` (members in that order) to the binary file
    ``out``; ``sort_keys`` sorts the keys inside the head and tail values."""
    sep = b"{"
    for name, value in (*head.items(), *arrays.items(), *tail.items()):
        out.write(sep + json_bytes(name) + b":")
        if isinstance(value, JsonArraySpool):
            out.write(b"[\n")
            value.copy_to(out)
            out.write(b"\n]")
        else:
            out.write(json_bytes(value, sort_keys=sort_keys))
        sep = b","
    out.write(b"}\n" if sep == b"," else b"{}\n")


def _permanent(exc: BaseException) -> bool:
    return isinstance(exc, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError))


def cat_many(fs, paths: list[str], *, chunk: int = 256, what: str = "file") -> Iterator[tuple[str, bytes]]:
    """``(path, bytes)`` of every file of ``paths`` that exists, in order, fetched ``chunk`` at a time concurrently.

    A missing file is left out (logged). Any other failure (connection reset, timeout, throttling, a server
    error) is retried, each failed path again, after :data:`RETRY_DELAYS_S`; a path that still fails raises
    ``OSError`` naming it (with the cause chained): a transient fault is never taken for a missing file.
    """
    for start in range(0, len(paths), chunk):
        part = paths[start : start + chunk]
        try:
            blobs = fs.cat(part, on_error="return")  # a list in -> {path: bytes or exception} out
        except Exception:  # noqa: BLE001 - e.g. the listing behind a local expand_path: fetch one by one
            blobs = {}
        if not isinstance(blobs, dict):
            blobs = {part[0]: blobs}
        for path in part:
            value = blobs[path] if path in blobs else _fetch_one(fs, path)
            attempt = 0
            while (
                isinstance(value, BaseException) and not _permanent(value) and attempt < len(RETRY_DELAYS_S)
            ):
                log.warning(
                    "reading %s %s failed (%s: %s); retrying", what, path, type(value).__name__, value
                )
                time.sleep(RETRY_DELAYS_S[attempt])
                attempt += 1
                value = _fetch_one(fs, path)
            if isinstance(value, FileNotFoundError):
                log.warning("%s %s vanished after listing; skipped", what, path)
                continue
            if isinstance(value, BaseException):
                raise OSError(f"cannot read {what} {path}: {type(value).__name__}: {value}") from value
            yield path, value


def _fetch_one(fs, path: str) -> bytes | BaseException:
    try:
        return fs.cat_file(path)
    except Exception as exc:  # noqa: BLE001 - classified by the caller
        return exc
