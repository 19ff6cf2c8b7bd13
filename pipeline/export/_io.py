"""Output helpers shared by the export writers: streamed JSON files, batched small files, the output folder.

Big JSON files (COCO ``labels.json``, Label Studio ``tasks.json``) are built in local temp files one object at a
time (:class:`pipeline.storage.JsonArraySpool`, shared with the annotate COCO export) and put whole at the end
(atomic: a reader never sees half a file), so memory does not grow with the number of images. Small files (PNG masks, copied images) are written in batches, each file atomic
(:func:`pipeline.storage.write_many`).
"""

from __future__ import annotations

import posixpath
from typing import Any

from pipeline.storage import (
    JsonArraySpool,
    json_bytes,
    put_local_file,
    write_bytes,
    write_json_object,
    write_many,
)

__all__ = [
    "FileBatch",
    "JsonArraySpool",
    "JsonObjectSpool",
    "assemble_json",
    "json_bytes",
    "put_json",
    "put_local",
]


class JsonObjectSpool:
    """The members of a JSON object (``"key":value``), appended one at a time to a local temp file."""

    def __init__(self, folder: str) -> None:
        self.body = JsonArraySpool(folder)

    def add(self, key: str, value: Any) -> None:
        if self.body.count:
            self.body.file.write(b",\n")
        self.body.file.write(json_bytes(key) + b":" + json_bytes(value))
        self.body.count += 1

    def write(self, path: str) -> None:
        """The whole object to the local file ``path``."""
        with open(path, "wb") as out:
            out.write(b"{\n")
            self.body.copy_to(out)
            out.write(b"\n}\n")

    def close(self) -> None:
        self.body.close()


def assemble_json(
    path: str, head: dict[str, Any], arrays: dict[str, JsonArraySpool], tail: dict[str, Any]
) -> None:
    """Write ``{**head, <name>: [<spooled array>], ..., **tail}`` to the local file ``path``."""
    with open(path, "wb") as out:
        write_json_object(out, head, arrays, tail)


def put_json(fs: Any, path: str, obj: Any) -> None:
    """Write a small JSON document (indented) atomically."""
    write_bytes(fs, path, json_bytes(obj, indent=2) + b"\n")


class FileBatch:
    """Small files for one output folder, written in batches (each file atomic; concurrent on object stores).

    Args:
        fs, root: the output filesystem and folder (stripped path).
        max_files, max_bytes: flush when either is reached.
    """

    def __init__(self, fs: Any, root: str, *, max_files: int = 64, max_bytes: int = 32 * 2**20) -> None:
        self.fs, self.root = fs, root
        self.max_files, self.max_bytes = max_files, max_bytes
        self.pending: dict[str, bytes] = {}
        self.size = 0
        self.written = 0

    def add(self, relative: str, data: bytes) -> None:
        self.pending[posixpath.join(self.root, relative)] = data
        self.size += len(data)
        if len(self.pending) >= self.max_files or self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            write_many(self.fs, self.pending)
            self.written += len(self.pending)
            self.pending, self.size = {}, 0


def put_local(fs: Any, root: str, relative: str, local_path: str) -> str:
    """Put a finished local file at ``root/relative`` (atomic); returns the destination (stripped path)."""
    dest = posixpath.join(root, relative)
    put_local_file(fs, local_path, dest)
    return dest
