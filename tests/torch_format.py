"""Writes `torch.save`-format files (zip, pickle protocol 2) from numpy arrays, without torch: the test
side of `eao_jax.torch_pickle`, for checkpoints edited by tests. Arrays become tensors (the pickle
names torch._utils._rebuild_tensor_v2 and torch.<X>Storage exactly as torch.save does);
`Global(module, name)` writes any other global, `Call(func, *args)` a call, `New(cls, *args)` an
instance (NEWOBJ) and `Build(obj, state)` state set on an object, to build other formats' objects
and files the reader must refuse; `View` a tensor with any offset,
size and stride; `Zeros` a tensor whose storage entry is deflated (a zip bomb). `save_legacy` writes
the pre-1.6 format. `dump_plain` writes a plain pickle (`pickle.dump`) in which `Tensor(array)` is a
torch tensor, as in the released MSR-VTT / YouCook2 feature pickles."""

from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
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
    """Pickles as `func(*args)` (REDUCE); func a Global or another Call (a call of a call's result)."""

    def __init__(self, func: Global | Call, *args: Any):
        self.func, self.args = func, args

    __call__ = Global.__call__


class Build:
    """Pickles as `obj` followed by BUILD with `state` (what `__setstate__` receives)."""

    def __init__(self, obj: Any, state: Any):
        self.obj, self.state = obj, state


class New:
    """Pickles as `cls.__new__(cls, *args)` (NEWOBJ), cls a Global: how pickle writes most instances."""

    def __init__(self, cls: Global, *args: Any):
        self.cls, self.args = cls, args


class View:
    """A tensor over a storage holding the 1-D array `storage` (Views of one array share one storage),
    with the view's numbers as given."""

    def __init__(self, storage: np.ndarray, offset: int, size: tuple, stride: tuple):
        assert storage.ndim == 1
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride


class Zeros:
    """In `save`: a 1-D float32 tensor of `n` zeros whose storage entry is deflated: a few KB per GiB."""

    def __init__(self, n: int):
        self.n = n


class _Storage:
    def __init__(self, key: str, array: np.ndarray | None, zeros: int = 0):
        self.key, self.array, self.zeros = key, array, zeros  # zeros: a deflated float32 storage of that many

    def type_and_numel(self) -> tuple[str, int]:
        return ("FloatStorage", self.zeros) if self.array is None else (STORAGE[self.array.dtype], self.array.size)


def _le_bytes(array: np.ndarray) -> bytes:
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def _rebuild(storage: Any, offset: int, size: tuple, stride: tuple) -> tuple:
    return (Global("torch._utils", "_rebuild_tensor_v2"),
            (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict()))


def _tensor_reduce(storage: Any, arr: np.ndarray) -> tuple:
    """How torch reduces a C-contiguous tensor over `storage` (offset 0)."""
    return _rebuild(storage, 0, arr.shape, tuple(s // arr.itemsize for s in arr.strides) if arr.ndim else ())


class _Pickler(pickle._Pickler):
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, file, storages: list[_Storage], *, legacy: bool = False, protocol: int = 2):
        super().__init__(file, protocol=protocol)
        self.storages, self.legacy = storages, legacy
        self._by_array: dict[int, _Storage] = {}  # Views of one array share its storage

    def _save_global_stub(self, obj: Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)

    def _save_build(self, obj: Build) -> None:
        self.save(obj.obj)
        self.save(obj.state)
        self.write(pickle.BUILD)

    def _save_new(self, obj: New) -> None:
        self.save(obj.cls)
        self.save(obj.args)
        self.write(pickle.NEWOBJ)
        self.memoize(obj)

    dispatch[Global] = _save_global_stub
    dispatch[Build] = _save_build
    dispatch[New] = _save_new

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):  # the legacy format adds the view metadata (none)
            name, numel = obj.type_and_numel()
            pid = ("storage", Global("torch", name), obj.key, "cpu", numel)
            return (*pid, None) if self.legacy else pid
        return None

    def _storage(self, array: np.ndarray | None, zeros: int = 0) -> _Storage:
        storage = _Storage(str(len(self.storages)), array, zeros)
        self.storages.append(storage)
        return storage

    def reducer_override(self, obj):
        if isinstance(obj, Call):
            return obj.func, obj.args
        if isinstance(obj, View):
            if id(obj.storage) not in self._by_array:
                self._by_array[id(obj.storage)] = self._storage(obj.storage)
            return _rebuild(self._by_array[id(obj.storage)], obj.offset, obj.size, obj.stride)
        if isinstance(obj, Zeros):
            return _rebuild(self._storage(None, obj.n), 0, (obj.n,), (1,))
        if isinstance(obj, np.ndarray):
            arr = np.array(obj, order="C")  # (ascontiguousarray would make a 0-d array 1-d)
            return _tensor_reduce(self._storage(arr), arr)
        return NotImplemented


_MIB_OF_ZEROS = None


def _write_deflated_zeros(zf: zipfile.ZipFile, name: str, nbytes: int) -> None:
    """An entry of `nbytes` zeros, deflated (nbytes a multiple of 1 MiB): one compressed MiB of zeros,
    flushed so that it stands alone, repeated. Its CRC is not computed (0): a reader that checks the
    declared size first never inflates it."""
    global _MIB_OF_ZEROS
    if _MIB_OF_ZEROS is None:
        c = zlib.compressobj(9, zlib.DEFLATED, -15)
        _MIB_OF_ZEROS = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    raw = _MIB_OF_ZEROS * (nbytes >> 20) + zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    info = zipfile.ZipInfo(name)
    info.compress_type, info.file_size, info.compress_size, info.CRC = zipfile.ZIP_DEFLATED, nbytes, len(raw), 0
    info.header_offset = zf.fp.tell()
    zf.fp.write(info.FileHeader())
    zf.fp.write(raw)
    # What ZipFile.write does after an entry, so that close() writes it into the central directory.
    zf.filelist.append(info)
    zf.NameToInfo[name] = info
    zf.start_dir = zf.fp.tell()
    zf._didModify = True


def save(obj: Any, path: str | os.PathLike) -> None:
    storages: list[_Storage] = []
    buf = io.BytesIO()
    _Pickler(buf, storages).dump(obj)
    name = os.path.splitext(os.path.basename(os.fspath(path)))[0] or "archive"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{name}/data.pkl", buf.getvalue())
        zf.writestr(f"{name}/byteorder", "little")
        for s in storages:
            if s.array is None:
                _write_deflated_zeros(zf, f"{name}/data/{s.key}", 4 * s.zeros)
            else:
                zf.writestr(f"{name}/data/{s.key}", _le_bytes(s.array))
        zf.writestr(f"{name}/version", "3\n")


class Tensor:
    """In `dump_plain`: pickles as a torch tensor holding `array`, as `pickle.dump` of a tensor does."""

    def __init__(self, array: np.ndarray):
        self.array = np.array(array, order="C")


_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_SYS_INFO = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}


def _legacy_bytes(obj: Any, storages: list[_Storage] | None = None) -> bytes:
    """`torch.save(obj, _use_new_zipfile_serialization=False)`: headers, the object, its storages' keys,
    then each storage as its element count and bytes. `storages`: ones `obj` holds directly."""
    storages = [] if storages is None else storages
    buf = io.BytesIO()
    for header in (_LEGACY_MAGIC, 1001, _LEGACY_SYS_INFO):
        pickle.dump(header, buf, protocol=2)
    _Pickler(buf, storages, legacy=True).dump(obj)
    pickle.dump([s.key for s in storages], buf, protocol=2)
    for s in storages:
        buf.write(struct.pack("<q", s.array.size))
        buf.write(_le_bytes(s.array))
    return buf.getvalue()


def save_legacy(obj: Any, path: str | os.PathLike) -> None:
    with open(path, "wb") as f:
        f.write(_legacy_bytes(obj))


def _legacy_storage_bytes(array: np.ndarray) -> bytes:
    """How torch pickles a storage: `torch.save(storage, _use_new_zipfile_serialization=False)`."""
    storage = _Storage("0", array)
    return _legacy_bytes(storage, [storage])


class _PlainPickler(_Pickler):
    def __init__(self, file, protocol: int):
        super().__init__(file, [], protocol=protocol)

    def reducer_override(self, obj):
        if isinstance(obj, Tensor):
            storage = Call(Global("torch.storage", "_load_from_bytes"), _legacy_storage_bytes(obj.array.reshape(-1)))
            return _tensor_reduce(storage, obj.array)
        if isinstance(obj, Call):
            return obj.func, obj.args
        return NotImplemented

    def persistent_id(self, obj):
        return None


def dump_plain(obj: Any, file) -> None:
    """`pickle.dump(obj, file)` with each `Tensor` written as torch writes a tensor (and `Global`,
    `Call`, `Build` as above; numpy arrays as numpy pickles them)."""
    _PlainPickler(file, protocol=4).dump(obj)
