"""Output helpers shared by the export writers: streamed JSON files, batched small files, the output folder.

Big JSON files (COCO ``labels.json``, Label Studio ``tasks.json``) are built in local temp files one object at a
time and put whole at the end (atomic: a reader never sees half a file), so memory does not grow with the
number of images. Small files (PNG masks, copied images) are written in batches, each file atomic
(:func:`pipeline.storage.write_many`).
"""

from __future__ import annotations

import json
import os
import posixpath
import shutil
import tempfile
from typing import IO, Any

from pipeline.storage import put_local_file, write_bytes, write_many

__all__ = [
    "FileBatch",
    "JsonArraySpool",
    "JsonObjectSpool",
    "assemble_json",
    "json_bytes",
    "put_json",
    "put_local",
]


def json_bytes(obj: Any, *, indent: int | None = None) -> bytes:
    """UTF-8 JSON (non-ASCII kept), compact unless ``indent``."""
    separators = None if indent else (",", ":")
    return json.dumps(obj, ensure_ascii=False, indent=indent, separators=separators).encode("utf-8")


class JsonArraySpool:
    """The body of a JSON array (``obj,\\nobj,...``), appended one object at a time to a local temp file."""

    def __init__(self, folder: str) -> None:
        self.file: IO[bytes] = tempfile.TemporaryFile(mode="w+b", dir=folder)
        self.count = 0

    def add(self, obj: Any) -> None:
        if self.count:
            self.file.write(b",\n")
        self.file.write(json_bytes(obj))
        self.count += 1

    def copy_to(self, out: IO[bytes]) -> None:
        self.file.flush()
        self.file.seek(0)
        shutil.copyfileobj(self.file, out)
        self.file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self.file.close()


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
        out.write(b"{")
        first = True
        for name, value in head.items():
            out.write((b"" if first else b",") + json_bytes(name) + b":" + json_bytes(value))
            first = False
        for name, array in arrays.items():
            out.write((b"" if first else b",") + json_bytes(name) + b":[\n")
            array.copy_to(out)
            out.write(b"\n]")
            first = False
        for name, value in tail.items():
            out.write((b"" if first else b",") + json_bytes(name) + b":" + json_bytes(value))
            first = False
        out.write(b"}\n")


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
