"""Test helpers that write images and tar / WebDataset shards (one set, shared by the test files).

* :func:`jpeg_bytes`: an RGB array as JPEG bytes, optionally resized;
* :func:`add_member`: one tar member (a regular file, or a link / device / FIFO for hostile-tar tests);
* :func:`tar_bytes` / :func:`write_tar`: a tar from ``(member name, bytes)`` pairs, in memory or to a file;
* :func:`webdataset_members`: WebDataset samples (``{key: jpg bytes}`` or ``[(key, {ext: bytes})]``) as
  ``(member name, bytes)`` pairs (``<key>.<ext>``), so ``write_tar(path, webdataset_members(...))`` writes a shard.
* :func:`openai_fp16`: which CLIP tensors OpenAI's file keeps in fp16 (for fake CLIP checkpoints).
* :func:`free_port` / :func:`stop_process`: for the servers and workers tests start as processes.

Tar members get ``mtime`` 0, so a shard's bytes depend only on its members (same input, same file).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import tarfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = [
    "add_member",
    "free_port",
    "jpeg_bytes",
    "openai_fp16",
    "stop_process",
    "tar_bytes",
    "webdataset_members",
    "write_tar",
]


def jpeg_bytes(arr: np.ndarray, size: int | tuple[int, int] | None = None, quality: int = 90) -> bytes:
    """``arr`` (HxWx3 uint8) as JPEG bytes; ``size`` = ``(width, height)`` (an int: a square) resizes it first."""
    from PIL import Image

    image = Image.fromarray(arr)
    if size is not None:
        image = image.resize((size, size) if isinstance(size, int) else tuple(size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def add_member(
    tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = ""
) -> None:
    """Add member ``name``: a regular file holding ``data``, or (``kind``) a link to ``link``, a device, a FIFO."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    info.mtime = 0
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def tar_bytes(members: Iterable[tuple[str, bytes]], *, format: int = tarfile.DEFAULT_FORMAT) -> bytes:
    """An uncompressed tar of ``(member name, bytes)`` pairs, in order (``format``: a ``tarfile`` format,
    e.g. ``tarfile.GNU_FORMAT`` for names that are not valid UTF-8)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=format) as tf:
        for name, data in members:
            add_member(tf, name, data)
    return buf.getvalue()


def write_tar(
    path: str | os.PathLike, members: Iterable[tuple[str, bytes]], *, format: int = tarfile.DEFAULT_FORMAT
) -> Path:
    """Write :func:`tar_bytes` of ``members`` to ``path``; returns the path."""
    path = Path(path)
    path.write_bytes(tar_bytes(members, format=format))
    return path


def webdataset_members(
    samples: Mapping[str, bytes] | Iterable[tuple[str, Mapping[str, bytes]]], ext: str = "jpg"
) -> list[tuple[str, bytes]]:
    """Members of a WebDataset shard: ``{key: bytes}`` gives ``<key>.<ext>`` members; ``[(key, {ext: bytes})]``
    gives ``<key>.<ext>`` for each of a sample's fields, in order."""
    if isinstance(samples, Mapping):
        return [(f"{key}.{ext}", data) for key, data in samples.items()]
    return [(f"{key}.{e}", data) for key, fields in samples for e, data in fields.items()]


_OPENAI_FP16_SUFFIXES = (
    "attn.in_proj_weight",
    "attn.in_proj_bias",
    "attn.out_proj.weight",
    "attn.out_proj.bias",
    "mlp.c_fc.weight",
    "mlp.c_fc.bias",
    "mlp.c_proj.weight",
    "mlp.c_proj.bias",
)
_OPENAI_FP16_KEYS = ("visual.conv1.weight", "visual.proj", "text_projection")


def openai_fp16(key: str) -> bool:
    """Whether OpenAI's CLIP ``.pt`` (its ``convert_weights``) holds tensor ``key`` (OpenAI layout) in fp16:
    Linear / Conv / attention weights and biases and the projections; every other tensor is fp32."""
    return key.endswith(_OPENAI_FP16_SUFFIXES) or key in _OPENAI_FP16_KEYS


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT (Prefect workers ignore SIGTERM while their server is gone), then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
