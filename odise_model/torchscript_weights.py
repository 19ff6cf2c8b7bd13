"""Read the tensors of a TorchScript archive (OpenAI's CLIP ``.pt`` files) without running anything from it.

``torch.jit.load`` deserialises the archive's TorchScript code and runs the ``__setstate__`` methods it
defines, so a hostile archive could run code when loaded. We never call it. A TorchScript archive is a zip:

    <name>/data.pkl            pickle of the module tree: objects of classes ``__torch__.<...>`` whose state
                               is a dict of attributes (tensors, submodules, flags)
    <name>/data/<key>          raw storage bytes, referenced from data.pkl by persistent id
    <name>/code/__torch__/...  the classes' TorchScript source, which declares for each class
                               ``__parameters__ = [...]`` and ``__buffers__ = [...]``

:func:`read_torchscript_state_dict` unpickles ``data.pkl`` with an unpickler that builds an inert record for
every ``__torch__`` object (its own ``__setstate__`` only stores the dict), rebuilds tensors from the raw
storages, and refuses every other global; then it walks the module tree and keeps, per class, exactly
the attributes the source declares as parameters or buffers: the names and tensors ``state_dict()`` of
``torch.jit.load(path)`` would give. The source is read as text (two regular expressions), never run.
"""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections import OrderedDict
from pathlib import PurePosixPath
from typing import Any

import torch

__all__ = ["TorchScriptReadError", "is_torchscript_archive", "read_torchscript_state_dict"]


class TorchScriptReadError(ValueError):
    """The archive cannot be read safely (unknown global, missing storage, malformed structure)."""


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}

# TorchScript's pickler wraps typed lists / values in these helpers; all are identity functions.
_JIT_PICKLE_HELPERS = {
    "build_intlist",
    "build_tensorlist",
    "build_doublelist",
    "build_boollist",
    "build_genericlist",
}

_CLASS = re.compile(r"^class\s+(\w+)\s*\(", re.MULTILINE)
_DECL = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*\[([^\]]*)\]", re.MULTILINE)


class _ScriptObject:
    """Inert stand-in for a ``__torch__`` object: remembers its class name and attribute dict, runs nothing."""

    qualname = "?"

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_state"] = state


def is_torchscript_archive(path: str) -> bool:
    """True for a zip holding TorchScript code (``<name>/code/`` or ``constants.pkl``)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _declarations(zf: zipfile.ZipFile, prefix: str) -> dict[str, tuple[set[str], set[str]]]:
    """``{"__torch__.a.b.Class": (parameter names, buffer names)}`` from the archive's source files."""
    out: dict[str, tuple[set[str], set[str]]] = {}
    code = f"{prefix}code/"
    for name in zf.namelist():
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module = ".".join(PurePosixPath(name[len(code) :]).with_suffix("").parts)
        text = zf.read(name).decode("utf-8", errors="replace")
        starts = [(m.start(), m.group(1)) for m in _CLASS.finditer(text)] + [(len(text), "")]
        for (start, cls), (end, _) in zip(starts, starts[1:], strict=False):
            params: set[str] = set()
            buffers: set[str] = set()
            for decl in _DECL.finditer(text, start, end):
                names = {n.strip().strip("'\"") for n in decl.group(2).split(",")} - {""}
                (params if decl.group(1) == "__parameters__" else buffers).update(names)
            out[f"{module}.{cls}"] = (params, buffers)
    return out


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, where: str) -> None:
        super().__init__(io.BytesIO(data))
        self.zf, self.prefix, self.where = zf, prefix, where
        self.storages: dict[str, torch.UntypedStorage] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self.classes:
                self.classes[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self.classes[qualname]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return torch._utils._rebuild_tensor_v2
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return lambda value: value
        if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
            return lambda value, _type: value
        raise TorchScriptReadError(
            f"{self.where}: the archive's data.pkl needs the global {module}.{name}, which a weights file has no "
            "reason to use; refusing to read it (nothing from the file was run)"
        )

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise TorchScriptReadError(f"{self.where}: unexpected persistent id {pid!r} in data.pkl")
        _, dtype, key, _location, numel = pid
        if not isinstance(dtype, torch.dtype):
            raise TorchScriptReadError(f"{self.where}: storage {key!r} has no known element type")
        if key not in self.storages:
            member = f"{self.prefix}data/{key}"
            try:
                raw = self.zf.read(member)
            except KeyError:
                raise TorchScriptReadError(
                    f"{self.where}: storage {member!r} is missing from the archive"
                ) from None
            untyped = (
                torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            )
            self.storages[key] = untyped
        untyped = self.storages[key]
        itemsize = torch.empty((), dtype=dtype).element_size()
        if untyped.nbytes() < int(numel) * itemsize:
            raise TorchScriptReadError(f"{self.where}: storage {key!r} is truncated")
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def read_torchscript_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a TorchScript archive, named as ``torch.jit.load(path).state_dict()``.

    Nothing from the archive is executed (see the module doc). Raises :class:`TorchScriptReadError`
    (naming the file) for an archive that needs anything beyond tensors, module objects and lists.
    """
    where = str(path)
    with zipfile.ZipFile(path) as zf:
        pickles = [n for n in zf.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise TorchScriptReadError(
                f"{where}: expected one <name>/data.pkl in the archive, found {len(pickles)}"
            )
        prefix = pickles[0][: -len("data.pkl")]
        declared = _declarations(zf, prefix)
        root = _Unpickler(zf.read(pickles[0]), zf, prefix, where).load()
    if not isinstance(root, _ScriptObject):
        raise TorchScriptReadError(f"{where}: data.pkl does not hold a TorchScript module")

    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(obj: _ScriptObject, prefix: str) -> None:
        if id(obj) in seen:
            return
        seen.add(id(obj))
        attrs = obj.__dict__.get("_state")
        if not isinstance(attrs, dict):
            return
        params_buffers = declared.get(obj.qualname)
        for name, value in attrs.items():
            if isinstance(value, _ScriptObject):
                walk(value, f"{prefix}{name}.")
            elif isinstance(value, torch.Tensor):
                if params_buffers is None or name in params_buffers[0] or name in params_buffers[1]:
                    state[f"{prefix}{name}"] = value.detach()

    walk(root, "")
    return state
