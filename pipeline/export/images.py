"""Read the images that labels point at, grouped so that every tar shard is streamed once.

Image URLs come from :func:`pipeline.export.reader.image_url_of`: plain file URLs (``file:///x/a.jpg``,
``s3://b/a.jpg``) or fsspec chained tar URLs (``tar://<member>::<tar URL>``). Reading one tar member at a
time would read the tar's index (every header) per image; instead:

* :func:`fetch_grouped` reads entries whose tar members are *consecutive* per tar by streaming that tar once
  with the one tar reader, :func:`pipeline.shards.iter_tar` (members matched by WebDataset key and extension,
  so ``./a.JPG`` matches ``a.jpg``; its rules for unsafe members, member size and truncation apply), and
  plain files in concurrent batches (``fs.cat``);
* :class:`GroupSpill` collects entries in any order on local disk (SQLite) and gives them back grouped by
  tar (for exports in uncertainty order, Label Studio tasks in review order): memory stays flat.

A missing image never stops the caller: its entry comes back with ``data=None`` and an error naming the URL.
Transient I/O errors (network; for tars, once the reader's own retries are spent) are raised, so a retried
task can redo the work.
"""

from __future__ import annotations

import os
import pickle
import sqlite3
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pipeline.export.reader import split_tar_url

__all__ = ["Fetched", "GroupSpill", "fetch_grouped", "group_of"]

T = TypeVar("T")


@dataclass
class Fetched(Generic[T]):
    """One entry's result: ``data`` (the image bytes) or ``error`` (why not)."""

    payload: T
    url: str
    data: bytes | None
    error: str | None = None


def group_of(url: str) -> str:
    """The tar URL an image URL lives in, or ``""`` for a plain file."""
    tar = split_tar_url(url)
    return tar[1] if tar else ""


_TAR_DAMAGE = ("truncated_shard", "corrupt_shard", "shard_growing")
"""Shard-level error kinds of :func:`pipeline.shards.iter_tar` that leave the rest of a tar's members missing;
any other (a storage failure that outlasted the reader's retries) is raised."""


def _fetch_tar(
    tar_url: str, entries: list[tuple[str, T]], storage_options: dict[str, Any]
) -> Iterator[Fetched[T]]:
    """The wanted members of one tar, read by the one tar reader (:func:`pipeline.shards.iter_tar`: its
    member rules, size limit and retries), in member order; then the entries not found, with why."""
    from pipeline.shards import SHARD_ERROR_KEY, iter_tar, split_key

    wanted: dict[tuple[str, str], list[tuple[str, T]]] = {}
    for url, payload in entries:
        member = split_tar_url(url)
        assert member is not None
        wanted.setdefault(split_key(member[0]), []).append((url, payload))
    fields_of: dict[str, list[str]] = {}
    for key, field in wanted:
        fields_of.setdefault(key, []).append(field)
    done: dict[tuple[str, str], str | None] = {}  # None: found, else why it cannot be read
    rest = ""  # why the members not reached are missing
    for sample in iter_tar(tar_url, storage_options, fields={field for _, field in wanted}):
        if sample.key.startswith(SHARD_ERROR_KEY) and not sample.present:
            if sample.error_kind == "vanished":
                rest = f"tar shard {tar_url} not found"
            elif sample.error_kind in _TAR_DAMAGE:
                rest = f"tar shard {tar_url} is unreadable or truncated ({sample.error})"
            else:  # transient I/O: let the caller's task be retried
                raise OSError(f"cannot read tar shard {tar_url}: {sample.error}")
            break
        for field in fields_of.get(sample.key, ()):
            ident = (sample.key, field)
            data = sample.files.get(field)
            if data is None:
                if sample.error:
                    done[ident] = f"{sample.key}.{field} in {tar_url} not read: {sample.error}"
                continue
            done[ident] = None
            for url, payload in wanted[ident]:
                yield Fetched(payload, url, data)
        if len(done) == len(wanted):
            break
    for ident, group in wanted.items():
        if ident in done and done[ident] is None:
            continue
        reason = done.get(ident) or rest or f"no member {ident[0]}.{ident[1]} in {tar_url}"
        for url, payload in group:
            yield Fetched(payload, url, None, reason)


def _fetch_files(entries: list[tuple[str, T]], storage_options: dict[str, Any]) -> Iterator[Fetched[T]]:
    from fsspec.core import url_to_fs

    by_protocol: dict[str, list[tuple[str, T]]] = {}
    for url, payload in entries:
        by_protocol.setdefault(url.split("://", 1)[0] if "://" in url else "file", []).append((url, payload))
    for group in by_protocol.values():
        fs, _ = url_to_fs(group[0][0], **storage_options)
        paths = [fs._strip_protocol(u) for u, _ in group]
        data = fs.cat(paths, on_error="return")
        if not isinstance(data, dict):  # one path: fsspec returns the bytes
            data = {paths[0]: data}
        for (url, payload), path in zip(group, paths, strict=True):
            value = data.get(path, FileNotFoundError(path))
            if isinstance(value, FileNotFoundError):
                yield Fetched(payload, url, None, f"image not found: {url}")
            elif isinstance(value, BaseException):
                raise value  # transient I/O: let the caller's task be retried
            else:
                yield Fetched(payload, url, value)


def fetch_grouped(
    entries: Iterable[tuple[str, T]], storage_options: dict[str, Any] | None = None, *, chunk: int = 32
) -> Iterator[Fetched[T]]:
    """Read the image of every ``(url, payload)`` entry, in groups (module doc).

    Entries of one tar must be consecutive (each run of one tar is streamed once); plain files are read
    ``chunk`` at a time. Results come in group order (within a tar: member order).
    """
    options = dict(storage_options or {})
    run: list[tuple[str, T]] = []
    run_group: str | None = None

    def flush() -> Iterator[Fetched[T]]:
        if not run:
            return
        if run_group:
            yield from _fetch_tar(run_group, run, options)
        else:
            yield from _fetch_files(run, options)

    for url, payload in entries:
        group = group_of(url)
        if run and (group != run_group or (not group and len(run) >= chunk)):
            yield from flush()
            run = []
        run_group = group
        run.append((url, payload))
    yield from flush()


class GroupSpill(Generic[T]):
    """``(url, payload)`` entries kept on local disk and given back grouped by tar (then in insertion order).

    Args:
        folder: a local temp folder (the SQLite file lives there).
    """

    def __init__(self, folder: str) -> None:
        handle, path = tempfile.mkstemp(prefix="images-", suffix=".sqlite", dir=folder)
        os.close(handle)
        self.db = sqlite3.connect(path)
        self.db.execute("PRAGMA journal_mode=OFF")
        self.db.execute("PRAGMA synchronous=OFF")
        self.db.execute("CREATE TABLE entries (grp TEXT, seq INTEGER PRIMARY KEY, url TEXT, payload BLOB)")
        self.count = 0

    def add(self, url: str, payload: T) -> None:
        self.db.execute(
            "INSERT INTO entries (grp, url, payload) VALUES (?, ?, ?)",
            (group_of(url), url, pickle.dumps(payload, protocol=pickle.HIGHEST_PROTOCOL)),
        )
        self.count += 1

    def __iter__(self) -> Iterator[tuple[str, T]]:
        self.db.commit()
        for url, blob in self.db.execute("SELECT url, payload FROM entries ORDER BY grp, seq"):
            yield url, pickle.loads(blob)

    def close(self) -> None:
        self.db.close()
