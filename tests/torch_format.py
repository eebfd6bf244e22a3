"""Writes `torch.save`-format files (zip, pickle protocol 2) from numpy arrays, without torch: the test
side of `eao_jax.torch_pickle`, for checkpoints edited by tests. Arrays become tensors (the pickle
names torch._utils._rebuild_tensor_v2 and torch.<X>Storage exactly as torch.save does);
`Global(module, name)` writes any other global, to build files the reader must refuse.
`dump_plain` writes a plain pickle (`pickle.dump`) in which `Tensor(array)` is a torch tensor, as in
the released MSR-VTT / YouCook2 feature pickles."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any

import numpy as np

STORAGE = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
           np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage", np.dtype(np.int32): "IntStorage",
           np.dtype(np.int16): "ShortStorage", np.dtype(np.int8): "CharStorage", np.dtype(np.uint8): "ByteStorage",
           np.dtype(np.bool_): "BoolStorage"}


class Global:
    """Pickles as the global `module.name` (GLOBAL opcode), whatever that is."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce only checks that it is callable
        raise TypeError("a stand-in for pickling, not callable")


class Call:
    """Pickles as `func(*args)` (REDUCE), func a Global."""

    def __init__(self, func: Global, *args: Any):
        self.func, self.args = func, args


class _Storage:
    def __init__(self, key: str, array: np.ndarray):
        self.key, self.array = key, array


def _le_bytes(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def _tensor_reduce(storage: Any, arr: np.ndarray) -> tuple:
    """How torch reduces a C-contiguous tensor over `storage` (offset 0)."""
    stride = tuple(s // arr.itemsize for s in arr.strides) if arr.ndim else ()
    return (Global("torch._utils", "_rebuild_tensor_v2"),
            (storage, 0, tuple(arr.shape), stride, False, collections.OrderedDict()))


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, storages: list[_Storage], *, legacy: bool = False):
        super().__init__(file, protocol=2)
        self.storages, self.legacy = storages, legacy

    def _save_global_stub(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    dispatch[Global] = _save_global_stub

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):  # the legacy format adds the view metadata (none)
            pid = ("storage", Global("torch", STORAGE[obj.array.dtype]), obj.key, "cpu", obj.array.size)
            return (*pid, None) if self.legacy else pid
        return None

    def reducer_override(self, obj):
        if isinstance(obj, Call):
            return obj.func, obj.args
        if isinstance(obj, np.ndarray):
            arr = np.array(obj, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
            storage = _Storage(str(len(self.storages)), arr)
            self.storages.append(storage)
            return _tensor_reduce(storage, arr)
        return NotImplemented


def save(obj: Any, path: str | os.PathLike) -> None:
    storages: list[_Storage] = []
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", buf.getvalue())
        zf.writestr(f"{name}/byteorder", "little")
        for s in storages:
            zf.writestr(f"{name}/data/{s.key}", _le_bytes(s.array))
        zf.writestr(f"{name}/version", "3\n")


class Tensor:
    """In `dump_plain`: pickles as a torch tensor holding `array`, as `pickle.dump` of a tensor does."""

    def __init__(self, array: np.ndarray):
        self.array = np.array(array, order="C")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _legacy_storage_bytes(array: np.ndarray) -> bytes:
    """`torch.save(storage, _use_new_zipfile_serialization=False)`: how torch pickles a storage."""
    buf = io.BytesIO()
    for header in (_LEGACY_MAGIC, 1001, _LEGACY_SYS_INFO):
        pickle.dump(header, buf, protocol=2)
    storage = _Storage("0", array)
    _Pickler(buf, [], legacy=True).dump(storage)
    pickle.dump([storage.key], buf, protocol=2)
    buf.write(struct.pack("<q", array.size))
    buf.write(_le_bytes(array))
    return buf.getvalue()


class _PlainPickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[Global] = _Pickler._save_global_stub

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            storage = Call(Global("torch.storage", "_load_from_bytes"), _legacy_storage_bytes(obj.array.reshape(-1)))
            return _tensor_reduce(storage, obj.array)
        if isinstance(obj, Call):
            return obj.func, obj.args
        return NotImplemented


def dump_plain(obj: Any, file) -> None:
    """`pickle.dump(obj, file)` with each `Tensor` written as torch writes a tensor."""
    _PlainPickler(file, protocol=4).dump(obj)
