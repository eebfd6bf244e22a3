"""Reads PyTorch `.pth` files (`torch.save` output) without torch and without running their code; and
the tensors inside plain pickles (`plain_pickle_globals`).

A `.pth` is a pickle whose tensors point at raw storages: since torch 1.6 a zip archive
(`<name>/data.pkl` + `<name>/data/<key>` + `<name>/byteorder`), before that the "legacy" stream of
pickles followed by the storages' bytes. Unpickling normally imports and calls whatever the pickle
names, so a checkpoint from the internet could run arbitrary code. `load` unpickles with
`eao_jax.safe_pickle` and an allow-list instead: tensor rebuilds (`torch._utils._rebuild_tensor_v2`
and its variants), typed storages and torch dtypes, and safe_pickle's numpy arrays / scalars and
plain containers. Anything else is refused with `UnsafePickleError` naming it. Tensors come back as
numpy arrays (bfloat16 widened to float32); the containers as dicts, lists, tuples.

A tensor is a view (offset, size, stride) of its storage, all numbers from the file, so each view
is checked before numpy sees it: strides and offset >= 0 (torch never writes negative strides),
the last element inside the storage, and at most max(the storage's bytes, 64 MiB) materialised
(a stride of 0 repeats an element: a broadcast tensor is copied out only that far). A file's tensors
and the archive entries it inflates take at most `EXPANSION` times its size in memory (at least
64 MiB): each entry's declared size is checked against that, and a storage's against the size the
pickle declares for it, before it is read; a legacy storage's declared length against the bytes
left in the file.

A TorchScript archive (`torch.jit.save`) is the same zip plus the module's code: its `data.pkl` names
the module classes (`__torch__.<...>`). With `torchscript=True` each such object is read as a
`ScriptModuleState`, a dict of its tensors and submodules; the archive's code is never read.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zipfile
from collections.abc import Callable
from typing import IO, Any

import numpy as np

from eao_jax import safe_pickle
from eao_jax.safe_pickle import UnsafePickleError  # noqa: F401 (callers catch it from here)


class TorchFormatError(ValueError):
    """The file is not a (readable) torch.save output."""


EXPAND_BYTES = 64 << 20  # what a tensor or a file may materialise beyond its own bytes
EXPANSION = 8  # bytes a file's tensors and archive entries may take in memory, per byte of the file

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
_WHAT = ("only tensors, storages and plain containers (dict, list, tuple, numbers, strings) are read from a "
         "checkpoint")


def _itemsize(dtype: Any) -> int:
    return 2 if dtype == _BFLOAT16 else np.dtype(dtype).itemsize


class ScriptModuleState(dict):
    """A TorchScript module object (`__torch__.*` class) as `{attribute: array | ScriptModuleState}`:
    its tensors and submodules; other attributes (flags, numbers) are dropped and no code is run."""


def _set_script_state(obj: ScriptModuleState, state: Any) -> None:
    if isinstance(state, dict):
        obj.update((k, v) for k, v in state.items() if isinstance(v, np.ndarray | ScriptModuleState))


class _ScriptGlobals(dict):
    """Checkpoint globals plus every `__torch__.*` name (a TorchScript module class) as ScriptModuleState."""

    def __missing__(self, key: tuple[str, str]) -> type:
        if key[0].startswith("__torch__."):
            return ScriptModuleState
        raise KeyError(key)


class _StorageType:
    """Stands for torch.<X>Storage / torch.UntypedStorage / a torch dtype while unpickling."""

    def __init__(self, name: str, dtype: Any):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_TORCH_TYPES: dict[tuple[str, str], _StorageType] = {
    **{("torch", n): _StorageType(n, d) for n, d in TORCH_DTYPES.items()},
    **{("torch", n): _StorageType(n, d) for n, d in STORAGE_DTYPES.items()},
    ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
}


class _Storage:
    """A storage's raw bytes and element type (the element type of an untyped storage comes from the
    tensor that views it)."""

    def __init__(self, data: bytes, dtype: Any):
        self.data, self.dtype = data, dtype

    def array(self, dtype: Any, start: int, stop: int) -> np.ndarray:
        """Elements [start, stop) as `dtype` (bfloat16: as float32)."""
        n = _itemsize(dtype)
        raw = memoryview(self.data)[start * n:stop * n]
        if dtype == _BFLOAT16:  # the upper half of a float32
            return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        return np.frombuffer(raw, np.dtype(dtype).newbyteorder("<"))


class _Budget:
    """What one file may still materialise (see the module docstring)."""

    def __init__(self, file_bytes: int, source: str):
        self.left, self.source = max(EXPAND_BYTES, EXPANSION * file_bytes), source
        self.limit = self.left

    def take(self, n: int, what: str) -> None:
        if n > self.left:
            raise TorchFormatError(f"{self.source}: {what} would take {n} bytes, over the {self.limit} bytes a file of "
                                   f"this size may materialise ({EXPANSION}x its size, at least {EXPAND_BYTES})")
        self.left -= n


def _ints(v: Any, what: str) -> tuple[int, ...]:
    if not isinstance(v, tuple | list) or not all(type(x) is int for x in v):
        raise TorchFormatError(f"tensor {what} {v!r:.80} is not a tuple of integers")
    return tuple(v)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: Any, budget: _Budget) -> np.ndarray:
    """The tensor `storage[offset + sum(i_k * stride_k)]` of shape `size`, as an owned array, after
    checking the view against the storage and the budget."""
    if not isinstance(storage, _Storage):
        raise UnsafePickleError(f"tensor rebuild over a {type(storage).__name__}, not a storage")
    if dtype is None:
        dtype = storage.dtype
    elif isinstance(dtype, _StorageType):
        dtype = dtype.dtype
    else:
        raise UnsafePickleError(f"tensor of dtype {dtype!r:.80}, not a torch dtype")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    itemsize, out_itemsize = _itemsize(dtype), (4 if dtype == _BFLOAT16 else _itemsize(dtype))
    n_storage = len(storage.data) // itemsize
    view = f"tensor of size {size} and stride {stride} at offset {offset!r:.40}"
    if type(offset) is not int or offset < 0 or len(size) != len(stride) or min(size + stride, default=0) < 0:
        raise TorchFormatError(f"{budget.source}: {view}: sizes, strides and offset must be non-negative, one stride "
                               "per dimension")
    if math.prod(max(n, 1) for n in size) * out_itemsize >= 2**62:
        raise TorchFormatError(f"{budget.source}: {view}: too large")
    numel = math.prod(size)
    if numel == 0:
        return np.zeros(size, np.float32 if dtype == _BFLOAT16 else dtype)
    last = offset + sum((n - 1) * st for n, st in zip(size, stride, strict=True))
    if last >= n_storage:
        raise TorchFormatError(f"{budget.source}: {view} overruns its storage of {n_storage} elements")
    out_bytes = numel * out_itemsize
    if out_bytes > max(n_storage * out_itemsize, EXPAND_BYTES):
        raise TorchFormatError(f"{budget.source}: {view} repeats elements (zero or overlapping strides) into "
                               f"{out_bytes} bytes, more than its storage ({n_storage * out_itemsize}) and "
                               f"{EXPAND_BYTES}")
    budget.take(out_bytes, view)
    flat = storage.array(dtype, offset, last + 1)
    # A dimension of size 1 never steps: its stride (any number) must not reach numpy.
    strides = tuple(st * flat.itemsize if n > 1 else 0 for n, st in zip(size, stride, strict=True))
    return np.array(np.lib.stride_tricks.as_strided(flat, size, strides))  # owned, writable, native order


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    return data


def _rebuilds(make: Callable[[Any, Any, Any, Any, Any], Any]) -> dict[tuple[str, str], Callable]:
    """torch._utils' tensor rebuilds, each calling make(storage, offset, size, stride, dtype)."""
    def v1(storage, offset, size, stride):
        return make(storage, offset, size, stride, None)

    def v2(storage, offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
        return make(storage, offset, size, stride, None)

    def v3(storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
        return make(storage, offset, size, stride, dtype)

    return {("torch._utils", "_rebuild_tensor"): v1, ("torch._utils", "_rebuild_tensor_v2"): v2,
            ("torch._utils", "_rebuild_tensor_v3"): v3,
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state}


def _checkpoint_globals(budget: _Budget) -> dict[tuple[str, str], Any]:
    def make(storage, offset, size, stride, dtype):
        return _tensor(storage, offset, size, stride, dtype, budget)
    return {**safe_pickle.PLAIN_GLOBALS, **_TORCH_TYPES, **_rebuilds(make)}


def _unpickle(f: IO[bytes], source: str, allowed: dict, load_storage: Callable[[tuple], _Storage] | None, *,
              torchscript: bool = False) -> Any:
    set_state = safe_pickle.SET_STATE
    if torchscript:
        allowed = _ScriptGlobals(allowed)
        set_state = {**set_state, ScriptModuleState: _set_script_state}
    return safe_pickle.Unpickler(f, source, allowed, _WHAT, set_state=set_state, persistent_load=load_storage).load()


def _check_storage_type(t: Any, source: str) -> _StorageType:
    if not isinstance(t, _StorageType):
        raise TorchFormatError(f"{source}: storage of unknown type {t!r:.80}")
    return t


def _read_entry(zf: zipfile.ZipFile, name: str, budget: _Budget) -> bytes:
    info = zf.getinfo(name)
    budget.take(info.file_size, f"archive entry {name} ({info.compress_size} bytes compressed)")
    return zf.read(info)


def _load_zip(zf: zipfile.ZipFile, source: str, budget: _Budget, torchscript: bool = False) -> Any:
    names = zf.namelist()
    pkl = [n for n in names if n == "data.pkl" or n.endswith("/data.pkl")]
    if len(pkl) != 1:
        raise TorchFormatError(f"{source}: a zip archive without exactly one data.pkl (not a torch.save file)")
    prefix = pkl[0][: -len("data.pkl")]
    if f"{prefix}byteorder" in names and _read_entry(zf, f"{prefix}byteorder", budget).strip() not in (b"little", b""):
        raise TorchFormatError(f"{source}: big-endian torch files are not supported")
    cache: dict[str, _Storage] = {}

    def load_storage(pid: tuple) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise TorchFormatError(f"{source}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, numel = pid[:5]
        t = _check_storage_type(storage_type, source)
        name = f"{prefix}data/{key}"
        if key not in cache:
            if name not in names:
                raise TorchFormatError(f"{source}: storage {key} is missing from the archive")
            declared = numel * _itemsize(t.dtype) if type(numel) is int and numel >= 0 else None
            if zf.getinfo(name).file_size != declared:
                raise TorchFormatError(f"{source}: storage {key} holds {zf.getinfo(name).file_size} bytes, its "
                                       f"pickle declares {numel!r:.40} elements of {t!r}")
            cache[key] = _Storage(_read_entry(zf, name, budget), t.dtype)
        return cache[key]

    data = _read_entry(zf, pkl[0], budget)
    return _unpickle(io.BytesIO(data), source, _checkpoint_globals(budget), load_storage, torchscript=torchscript)


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(f: io.BytesIO, source: str, budget: _Budget) -> Any:
    """The pre-1.6 stream: magic, protocol, sys info, the object, storage keys, then each storage as
    an int64 element count followed by its bytes (in key order). The storages' bytes follow the
    pickle, so its tensors are rebuilt afterwards (`_Pending`)."""
    def plain() -> Any:
        return _unpickle(f, source, safe_pickle.PLAIN_GLOBALS, None)
    start = f.tell()
    end = f.seek(0, io.SEEK_END)
    f.seek(start)
    try:
        magic = plain()
    except UnsafePickleError:
        raise
    except Exception as e:
        raise TorchFormatError(f"{source}: not a torch.save file ({type(e).__name__}: {e})") from None
    if magic != _LEGACY_MAGIC:
        raise TorchFormatError(f"{source}: not a torch.save file")
    plain()  # protocol version
    sys_info = plain()
    if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
        raise TorchFormatError(f"{source}: big-endian torch files are not supported")
    storages: dict[Any, _Storage] = {}
    views: list[tuple[_Storage, Any, Any, Any]] = []

    def load_storage(pid: tuple) -> _Storage:
        if not isinstance(pid, tuple) or len(pid) != 6 or pid[0] != "storage":
            raise TorchFormatError(f"{source}: unknown persistent id {pid!r:.80}")
        _, storage_type, key, _location, _numel, view_metadata = pid
        t = _check_storage_type(storage_type, source)
        base = storages.setdefault(key, _Storage(b"", t.dtype))
        if view_metadata is None:
            return base
        _view_key, offset, view_size = view_metadata
        view = _Storage(b"", t.dtype)
        views.append((view, key, offset, view_size))
        return view

    pending = {**safe_pickle.PLAIN_GLOBALS, **_TORCH_TYPES, **_rebuilds(_Pending)}
    obj = _unpickle(f, source, pending, load_storage)
    keys = plain()
    if not isinstance(keys, list):
        raise TorchFormatError(f"{source}: storage keys are a {type(keys).__name__}, not a list")
    for key in keys:
        if key not in storages:
            raise TorchFormatError(f"{source}: storage {key!r:.40} is not used by the pickle")
        head = f.read(8)
        if len(head) != 8:
            raise TorchFormatError(f"{source}: truncated storage {key}")
        (numel,) = struct.unpack("<q", head)
        nbytes, left = numel * _itemsize(storages[key].dtype), end - f.tell()
        if numel < 0 or nbytes > left:
            raise TorchFormatError(f"{source}: storage {key} declares {numel} elements, {left} bytes are left in "
                                   "the file (truncated)")
        storages[key].data = f.read(nbytes)
    for view, key, offset, size in views:
        n = _itemsize(view.dtype)
        if not (type(offset) is int and type(size) is int and 0 <= offset and 0 <= size
                and (offset + size) * n <= len(storages[key].data)):
            raise TorchFormatError(f"{source}: storage view {offset!r:.40}+{size!r:.40} outside storage {key}")
        view.data = storages[key].data[offset * n:(offset + size) * n]
    return _resolve(obj, budget)


class _Pending:
    """A tensor whose legacy-format storage bytes come after the pickle."""

    def __init__(self, storage: Any, offset: Any, size: Any, stride: Any, dtype: Any):
        self.args = (storage, offset, size, stride, dtype)


def _resolve(obj: Any, budget: _Budget, seen: set[int] | None = None) -> Any:
    """`obj` with its `_Pending` tensors rebuilt; dicts and lists in place (keeping an OrderedDict's
    `_metadata`), each once (a pickle may share or nest them in cycles)."""
    seen = set() if seen is None else seen
    if isinstance(obj, _Pending):
        return _tensor(*obj.args, budget)
    if isinstance(obj, dict | list) and id(obj) not in seen:
        seen.add(id(obj))
        for k in list(obj.keys() if isinstance(obj, dict) else range(len(obj))):
            obj[k] = _resolve(obj[k], budget, seen)
    elif isinstance(obj, tuple):
        return tuple(_resolve(v, budget, seen) for v in obj)
    return obj


def load(path_or_file: str | os.PathLike | IO[bytes], *, torchscript: bool = False) -> Any:
    """The object `torch.save` wrote, with tensors as numpy arrays; see the module docstring.
    `torchscript=True` also reads a `torch.jit.save` archive's module objects (`ScriptModuleState`).

    Raises FileNotFoundError, UnsafePickleError (the file names anything but tensors and plain
    containers) or TorchFormatError (not a torch.save file, or tensors / entries outside its bounds).
    """
    if isinstance(path_or_file, str | os.PathLike):
        source = os.fspath(path_or_file)
        with open(source, "rb") as f:
            return _load_file(f, source, torchscript)
    return _load_file(path_or_file, getattr(path_or_file, "name", "<stream>"), torchscript)


def _load_file(f: IO[bytes], source: str, torchscript: bool = False) -> Any:
    data = f.read()
    budget = _Budget(len(data), source)
    if zipfile.is_zipfile(io.BytesIO(data)):
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            return _load_zip(zf, source, budget, torchscript)
    return _load_legacy(io.BytesIO(data), source, budget)


def plain_pickle_globals(file_bytes: int, source: str) -> dict[tuple[str, str], Any]:
    """The torch names a plain pickle (`pickle.dump` of objects holding tensors, such as the released
    MSR-VTT / YouCook2 feature pickles) may use, for one load of a file of `file_bytes` named
    `source`: tensor rebuilds (tensors come back as numpy arrays), torch dtypes, and
    `torch.storage._load_from_bytes`, which a plain pickle stores each tensor's storage as (the bytes
    of a legacy-format `torch.save` of it)."""
    budget = _Budget(file_bytes, source)

    def load_from_bytes(data: Any) -> _Storage:
        if not isinstance(data, bytes | bytearray):
            raise TorchFormatError(f"storage bytes expected, got {type(data).__name__}")
        storage = _load_legacy(io.BytesIO(data), "a pickled storage", budget)  # (the file is named around it)
        if not isinstance(storage, _Storage):
            raise TorchFormatError(f"pickled storage holds a {type(storage).__name__}, not a storage")
        return storage

    def make(storage, offset, size, stride, dtype):
        return _tensor(storage, offset, size, stride, dtype, budget)

    return {**_TORCH_TYPES, **_rebuilds(make), ("torch.storage", "_load_from_bytes"): load_from_bytes}
