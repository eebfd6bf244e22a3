"""Reads PyTorch `.pth` files (`torch.save` output) without torch and without running their code; and
the tensors inside plain pickles (`plain_pickle_global`).

A `.pth` is a pickle whose tensors point at raw storages: since torch 1.6 a zip archive
(`<name>/data.pkl` + `<name>/data/<key>` + `<name>/byteorder`), before that the "legacy" stream of
pickles followed by the storages' bytes. Unpickling normally imports and calls whatever the pickle
names, so a checkpoint from the internet could run arbitrary code. `load` unpickles with an
allow-list instead: tensor rebuilds (`torch._utils._rebuild_tensor_v2` and its variants), typed
storages, `collections.OrderedDict`, numpy scalars / dtypes and the builtin containers and
primitives pickle itself encodes. Anything else is refused with `UnsafePickleError` naming it. Tensors
come back as numpy arrays (bfloat16 widened to float32); the containers as dicts, lists, tuples.

A TorchScript archive (`torch.jit.save`) is the same zip plus the module's code: its `data.pkl` names
the module classes (`__torch__.<...>`). With `torchscript=True` each such object is read as a
`ScriptModuleState`, a dict of its tensors and submodules; the archive's code is never read.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file names something that is not a tensor, a storage or a plain container."""


class TorchFormatError(ValueError):
    """The file is not a (readable) torch.save output."""


_BFLOAT16 = "bfloat16"
# Typed storage class names (torch.<Name>Storage) -> numpy dtype.
STORAGE_DTYPES: dict[str, Any] = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": _BFLOAT16, "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
# torch dtype names (torch.float32 pickles as GLOBAL torch float32) -> numpy dtype.
TORCH_DTYPES: dict[str, Any] = {
    "float64": np.float64, "double": np.float64, "float32": np.float32, "float": np.float32,
    "float16": np.float16, "half": np.float16, "bfloat16": _BFLOAT16, "int64": np.int64, "long": np.int64,
    "int32": np.int32, "int": np.int32, "int16": np.int16, "short": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}


class ScriptModuleState(dict):
    """A TorchScript module object (`__torch__.*` class) as `{attribute: array | ScriptModuleState}`:
    its tensors and submodules; other attributes (flags, numbers) are dropped and no code is run."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update((k, v) for k, v in state.items() if isinstance(v, np.ndarray | ScriptModuleState))


class _StorageType:
    """Stands for torch.<X>Storage / torch.UntypedStorage / a torch dtype while unpickling."""

    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """A storage's raw bytes and element type (the element type of an untyped storage comes from the
    tensor that views it)."""

    def __init__(self, data: bytes, dtype: Any):
        self.data, self.dtype = data, dtype

    def array(self, dtype: Any = None) -> np.ndarray:
        dtype = self.dtype if dtype is None else dtype
        if dtype == _BFLOAT16:  # the upper half of a float32
            raw = np.frombuffer(self.data, "<u2").astype(np.uint32) << 16
            return raw.view(np.float32)
        return np.frombuffer(self.data, np.dtype(dtype).newbyteorder("<"))


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any,
                    dtype: Any = None) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuild over a {type(storage).__name__}, not a storage")
    flat = storage.array(dtype)
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if not size:
        return np.array(flat[int(offset)])
    if any(s == 0 for s in size):
        return np.zeros(size, flat.dtype)
    last = int(offset) + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if int(offset) < 0 or last >= flat.size:
        raise TorchFormatError(f"tensor of size {size} and stride {stride} at offset {offset} overruns its storage "
                               f"of {flat.size} elements")
    view = np.lib.stride_tricks.as_strided(flat[int(offset):], size, tuple(s * flat.itemsize for s in stride))
    return np.array(view)  # owned, writable, native byte order


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
    return _rebuild_tensor(storage, offset, size, stride, dtype=getattr(dtype, "dtype", dtype))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _numpy_dtype(spec, *args):
    if not isinstance(spec, str):
        raise UnsafePickleError(f"numpy dtype from a {type(spec).__name__}")
    return np.dtype(spec)


def _numpy_scalar(dtype, data=None):
    if not isinstance(dtype, np.dtype) or (data is not None and not isinstance(data, bytes)) or dtype.hasobject:
        raise UnsafePickleError("numpy scalar that is not plain data")
    return np.frombuffer(data or b"\0" * dtype.itemsize, dtype)[0]


def _numpy_reconstruct(cls, shape, dtype):
    if cls is not np.ndarray:
        raise UnsafePickleError(f"numpy array reconstruction of {cls!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


_REBUILDS: dict[tuple[str, str], Callable] = {
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): np.ndarray,
}
# What pickle protocol 2 spells as globals for builtin types (protocols 3+ have opcodes for most).
_BUILTINS = {"set": set, "frozenset": frozenset, "complex": complex, "slice": slice, "bytearray": bytearray,
             "range": range}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: IO[bytes], load_storage: Callable[[tuple], _Storage], source: str, *,
                 deferred: bool = False, torchscript: bool = False):
        super().__init__(file)
        self._load_storage, self._source, self._deferred = load_storage, source, deferred
        self._torchscript = torchscript

    def find_class(self, module: str, name: str):
        if self._torchscript and module.startswith("__torch__."):
            return ScriptModuleState
        if self._deferred and module == "torch._utils" and name.startswith("_rebuild_tensor"):
            return _defer(_REBUILDS[(module, name)]) if (module, name) in _REBUILDS else self._refuse(module, name)
        if (module, name) in _REBUILDS:
            return _REBUILDS[(module, name)]
        if module in ("builtins", "__builtin__") and name in _BUILTINS:
            return _BUILTINS[name]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module == "torch" and name == "UntypedStorage":
            return _StorageType(name, np.uint8)
        if module == "torch" and name in TORCH_DTYPES:
            return _StorageType(name, TORCH_DTYPES[name])
        self._refuse(module, name)

    def _refuse(self, module: str, name: str):
        raise UnsafePickleError(
            f"{self._source}: refusing to load {module}.{name}: only tensors, storages and plain containers "
            "(dict, list, tuple, numbers, strings) are read from a checkpoint, so that loading it cannot run code")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] != "storage":
            raise TorchFormatError(f"{self._source}: unknown persistent id {pid!r}")
        return self._load_storage(pid)


def _check_storage_type(t: Any, source: str) -> _StorageType:
    if not isinstance(t, _StorageType):
        raise TorchFormatError(f"{source}: storage of unknown type {t!r}")
    return t


def _load_zip(zf: zipfile.ZipFile, source: str, torchscript: bool = False) -> Any:
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise TorchFormatError(f"{source}: a zip archive without exactly one data.pkl (not a torch.save file)")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and zf.read(f"{prefix}byteorder").strip() not in (b"little", b""):
        raise TorchFormatError(f"{source}: big-endian torch files are not supported")
    cache: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        _, storage_type, key, _location, numel = pid[:5]
        t = _check_storage_type(storage_type, source)
        if key not in cache:
            try:
                cache[key] = _Storage(zf.read(f"{prefix}data/{key}"), t.dtype)
            except KeyError:
                raise TorchFormatError(f"{source}: storage {key} is missing from the archive") from None
        return cache[key]

    with zf.open(pkl[0]) as f:
        return _Unpickler(io.BytesIO(f.read()), load_storage, source, torchscript=torchscript).load()


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(f: IO[bytes], source: str) -> Any:
    """The pre-1.6 stream: magic, protocol, sys info, the object, storage keys, then each storage as
    an int64 element count followed by its bytes (in key order). The storages' bytes follow the
    pickle, so its tensors are rebuilt afterwards (`_Pending`)."""
    def plain() -> Any:
        return _Unpickler(f, lambda pid: (_ for _ in ()).throw(TorchFormatError(f"{source}: unexpected storage")),
                          source).load()
    try:
        magic = plain()
    except Exception as e:
        raise TorchFormatError(f"{source}: not a torch.save file ({type(e).__name__}: {e})") from None
    if magic != _LEGACY_MAGIC:
        raise TorchFormatError(f"{source}: not a torch.save file")
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchFormatError(f"{source}: big-endian torch files are not supported")
    storages: dict[str, tuple[_StorageType, int]] = {}
    views: list[tuple[_Storage, str, int, int]] = []
    placeholders: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        _, storage_type, key, _location, numel, view_metadata = pid
        t = _check_storage_type(storage_type, source)
        storages.setdefault(key, (t, int(numel)))
        base = placeholders.setdefault(key, _Storage(b"", t.dtype))
        if view_metadata is None:
            return base
        view_key, offset, view_size = view_metadata
        view = _Storage(b"", t.dtype)
        views.append((view, key, int(offset), int(view_size)))
        return view

    obj = _Unpickler(f, load_storage, source, deferred=True).load()
    keys = plain()
    for key in keys:
        t, _ = storages[key]
        (numel,) = struct.unpack("<q", f.read(8))
        itemsize = 2 if t.dtype == _BFLOAT16 else np.dtype(t.dtype).itemsize
        data = f.read(numel * itemsize)
        if len(data) != numel * itemsize:
            raise TorchFormatError(f"{source}: truncated storage {key}")
        placeholders[key].data = data
    for view, key, offset, size in views:
        itemsize = 2 if view.dtype == _BFLOAT16 else np.dtype(view.dtype).itemsize
        view.data = placeholders[key].data[offset * itemsize:(offset + size) * itemsize]
    return _resolve(obj)


class _Pending:
    """A tensor whose legacy-format storage bytes come after the pickle."""

    def __init__(self, args: tuple, dtype: Any = None):
        self.args, self.dtype = args, dtype


def _resolve(obj: Any) -> Any:
    if isinstance(obj, _Pending):
        return _rebuild_tensor(*obj.args, dtype=obj.dtype)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def load(path_or_file: str | os.PathLike | IO[bytes], *, torchscript: bool = False) -> Any:
    """The object `torch.save` wrote, with tensors as numpy arrays; see the module docstring.
    `torchscript=True` also reads a `torch.jit.save` archive's module objects (`ScriptModuleState`).

    Raises FileNotFoundError, UnsafePickleError (the file names anything but tensors and plain
    containers) or TorchFormatError (not a torch.save file).
    """
    if isinstance(path_or_file, str | os.PathLike):
        source = os.fspath(path_or_file)
        with open(source, "rb") as f:
            return _load_file(f, source, torchscript)
    return _load_file(path_or_file, getattr(path_or_file, "name", "<stream>"), torchscript)


def _load_file(f: IO[bytes], source: str, torchscript: bool = False) -> Any:
    data = f.read()
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return _load_zip(zf, source, torchscript)
    return _load_legacy(io.BytesIO(data), source)


def _load_from_bytes(data: bytes) -> _Storage:
    """What `torch.storage._load_from_bytes` returns: a plain pickle (`pickle.dump`, not `torch.save`)
    stores each tensor's storage as the bytes of a legacy-format `torch.save` of it."""
    if not isinstance(data, bytes | bytearray):
        raise TorchFormatError(f"storage bytes expected, got {type(data).__name__}")
    storage = _load_legacy(io.BytesIO(data), "<pickled storage>")
    if not isinstance(storage, _Storage):
        raise TorchFormatError(f"pickled storage holds a {type(storage).__name__}, not a storage")
    return storage


def plain_pickle_global(module: str, name: str, source: str) -> Any:
    """The torch-free stand-in for a torch global named by a plain pickle (`pickle.dump` of objects
    holding tensors, such as the released MSR-VTT / YouCook2 feature pickles): tensors come back as
    numpy arrays. Raises UnsafePickleError for any other torch name."""
    if (module, name) == ("torch.storage", "_load_from_bytes"):
        return _load_from_bytes
    if module == "torch._utils" and (module, name) in _REBUILDS:
        return _REBUILDS[(module, name)]
    raise UnsafePickleError(f"{source}: refusing to load {module}.{name}: of torch, only tensors (with their "
                            "storages) are read from a pickle")


def _defer(fn: Callable) -> Callable:
    def rebuild(storage, offset, size, stride, *rest):
        dtype = None
        if fn is _rebuild_tensor_v3 and len(rest) >= 3:
            dtype = getattr(rest[2], "dtype", rest[2])
        return _Pending((storage, offset, size, stride), dtype)
    return rebuild
