"""Reading weights files without running code from them, and copying their tensors out of memory maps.

Job: bytes on local disk -> a dict of tensors (plus inert placeholders for training metadata), never executing
anything the file names. Where a file comes from is :mod:`odise_model.weights_sources`; how its keys map onto
the model is :mod:`odise_model.checkpoint` and :mod:`odise_model.sd_convert`.

* safetensors: :func:`safetensors.torch.load_file`.
* Pickles (``torch.save`` zips and legacy pickles): ``torch.load(weights_only=True)``. PyTorch-Lightning and
  detectron2 training files (the official SD ``.ckpt`` among them) also pickle training metadata
  (``pytorch_lightning...ModelCheckpoint`` callback state, numpy scalars, fvcore schedulers) that
  ``weights_only`` refuses; the globals listed in :data:`METADATA_GLOBAL_PREFIXES` are bound to
  :class:`MetadataPlaceholder`, which stores nothing and runs nothing. Any other global is refused before
  unpickling, naming it.
* TorchScript archives (OpenAI's CLIP ``.pt``): :mod:`odise_model.torchscript_weights` unpickles the module
  tree into inert records and keeps the declared parameters and buffers. ``torch.jit.load`` is never called,
  for any file: it runs the archive's TorchScript ``__setstate__`` methods. An archive the inert reader cannot
  read is refused (:class:`CheckpointError`), whatever its hash.

Memory: :func:`read_weights` with ``mmap=True`` memory-maps ``torch.save`` files; :func:`copy_out` copies (and
casts) one tensor into private memory and hands the file pages it came from back to the OS
(:class:`FilePages`, Linux ``madvise(MADV_DONTNEED)``), so loading peaks near the model's size, not model + file.
"""

from __future__ import annotations

import ctypes
import mmap as _mmap
import os
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .torchscript_weights import TorchScriptReadError, is_torchscript_archive, read_torchscript_state_dict
from .weights_errors import CheckpointError

__all__ = [
    "METADATA_GLOBAL_PREFIXES",
    "MetadataPlaceholder",
    "FilePages",
    "read_weights",
    "read_checkpoint_file",
    "copy_out",
]

# Pickle globals of training metadata found in official training files (PyTorch-Lightning callback state in
# SD .ckpt files, detectron2 / fvcore trainer state, numpy scalars). When unpickling they are bound to an inert
# placeholder: nothing from these modules is imported or called. A name ending in "." is a prefix.
METADATA_GLOBAL_PREFIXES: tuple[str, ...] = (
    "pytorch_lightning.",
    "lightning.",
    "lightning_fabric.",
    "fvcore.",
    "detectron2.",
    "iopath.",
    "omegaconf.",
    "numpy.core.multiarray.scalar",
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct",
    "numpy._core.multiarray._reconstruct",
    "numpy.ndarray",
    "numpy.dtype",
    "numpy.dtypes.",
    "_codecs.encode",
    "__builtin__.set",
    "builtins.set",
)


class MetadataPlaceholder:
    """Stands in for a training-metadata global (see :data:`METADATA_GLOBAL_PREFIXES`) while unpickling.

    Accepts any constructor arguments and any pickled state and keeps none of it: no code from the
    named module is imported or run. Weights are never placeholders (strict loading requires tensors).
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> MetadataPlaceholder:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __repr__(self) -> str:
        return "<training metadata placeholder>"


def _is_metadata_global(name: str) -> bool:
    return any(name.startswith(p) if p.endswith(".") else name == p for p in METADATA_GLOBAL_PREFIXES)


def _read_torchscript(path: Path) -> dict[str, Any]:
    """A TorchScript archive's parameters and buffers, read without running anything from it (or refused)."""
    try:
        return read_torchscript_state_dict(str(path))
    except TorchScriptReadError as exc:
        raise CheckpointError(
            f"{path}: cannot read weights: {exc}. TorchScript archives are read without torch.jit.load "
            "(which could run code from the file); convert the file to safetensors or a plain state dict"
        ) from None


_REFUSAL_MARKERS = (
    "Unsupported global",
    "Trying to call reduce",
    "Can only build",
    "Can only create new object",
    "is blocked",
    "Unsupported operand",
    "Unsupported class",
)


class FilePages:
    """Hands the pages of a privately memory-mapped weights file back to the OS once tensors were copied out.

    Linux only (elsewhere :meth:`release` does nothing and memory peaks higher). Only address ranges of the
    mappings created by our own ``torch.load(mmap=True)`` call are touched; they are private file mappings
    that are never written, so ``MADV_DONTNEED`` merely drops clean pages (a later read re-faults them from
    the file), which is why releasing a page shared with a neighbouring tensor is harmless.
    """

    MADV_DONTNEED = 4

    def __init__(self, regions: list[tuple[int, int]]) -> None:
        self.regions = regions
        self._madvise = None
        if regions:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
                libc.madvise.restype = ctypes.c_int
                self._madvise = libc.madvise
            except (OSError, AttributeError):
                self.regions = []

    @staticmethod
    def mappings(path: Path) -> set[tuple[int, int]]:
        """Private mappings of ``path`` in this process (empty off Linux)."""
        if not sys.platform.startswith("linux"):
            return set()
        real = os.path.realpath(path)
        found = set()
        try:
            with open("/proc/self/maps") as fh:
                for line in fh:
                    parts = line.rstrip("\n").split(maxsplit=5)
                    if len(parts) == 6 and parts[5] == real and parts[1].endswith("p"):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        found.add((start, end))
        except OSError:
            return set()
        return found

    def release(self, tensor: torch.Tensor) -> None:
        if not self.regions or tensor.device.type != "cpu":
            return
        storage = tensor.untyped_storage()
        start, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0:
            return
        page = _mmap.PAGESIZE
        for lo, hi in self.regions:
            if lo <= start < hi:
                a = max(lo, start & ~(page - 1))
                b = min(hi, (start + nbytes + page - 1) & ~(page - 1))
                if b > a:
                    self._madvise(a, b - a, self.MADV_DONTNEED)
                return


def read_weights(path: Path, *, mmap: bool = False) -> tuple[dict[str, Any], FilePages | None]:
    """Read a weights file safely; returns the top-level dict and, when memory-mapped, its page releaser.

    Raises :class:`CheckpointError` naming the file for unreadable, truncated or code-running files.
    """
    path = Path(path)
    pages = None
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return dict(load_file(str(path))), None
        if is_torchscript_archive(str(path)):
            return _read_torchscript(path), None
        if zipfile.is_zipfile(path):
            # Refuse code-running pickles before unpickling anything, naming the globals; bind known
            # training-metadata globals to an inert placeholder.
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
            refused = sorted(g for g in unsafe if not _is_metadata_global(g))
            if refused:
                raise CheckpointError(
                    f"{path}: cannot read weights: it pickles Python objects that would run code on load "
                    f"({', '.join(refused)}); refusing (weights_only=True). Convert the file to safetensors or "
                    "re-save only its tensors"
                )
            allowed = [(MetadataPlaceholder, g) for g in unsafe]
        else:
            allowed = []
        before = FilePages.mappings(path) if mmap else set()
        with torch.serialization.safe_globals(allowed):
            obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
        if mmap:
            pages = FilePages(sorted(FilePages.mappings(path) - before))
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as exc:
        text = str(exc)
        first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
        if any(m in text for m in _REFUSAL_MARKERS):
            detail = next(
                (line.strip() for line in text.splitlines() if any(m in line for m in _REFUSAL_MARKERS)),
                first,
            )
            reason = (
                f"it pickles Python objects that would run code on load; refusing (weights_only=True): "
                f"{detail}"
            )
        elif isinstance(exc, EOFError) or any(
            s in text.lower() for s in ("zip", "eof", "truncat", "central directory", "ran out of input")
        ):
            reason = f"the file is truncated or corrupt ({type(exc).__name__}: {first})"
        else:
            reason = f"{type(exc).__name__}: {first}"
        raise CheckpointError(f"{path}: cannot read weights: {reason}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return dict(obj), pages


def read_checkpoint_file(path: str | os.PathLike, *, mmap: bool = False) -> dict[str, Any]:
    """Read a weights file safely: safetensors, ``torch.load(weights_only=True)``, or a TorchScript archive.

    Returns the top-level object (a dict). Errors (:class:`CheckpointError`) name the file: unreadable or
    truncated files, pickles that would run code (refused; the code never runs), non-dict contents.
    """
    return read_weights(Path(path), mmap=mmap)[0]


def copy_out(value: torch.Tensor, dtype: torch.dtype, pages: FilePages | None) -> torch.Tensor:
    """``value`` as a contiguous ``dtype`` tensor in private memory; a memory-mapped source's pages are released.

    A tensor already in private memory with the right dtype and layout is returned as is (no copy).
    """
    if pages is None and value.dtype == dtype and value.is_contiguous():
        return value
    out = torch.empty(value.shape, dtype=dtype, device="cpu")
    out.copy_(value)
    if pages is not None:
        pages.release(value)
    return out
