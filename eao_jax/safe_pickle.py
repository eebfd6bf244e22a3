"""Unpickling of files from outside (released dataset pickles, torch checkpoints) without running
their code or trusting the sizes they declare.

A pickle names callables (GLOBAL) that the unpickler imports and calls (REDUCE, NEWOBJ), and
objects whose `__setstate__` it calls with data from the file (BUILD), so an ordinary `pickle.load`
of a downloaded file runs whatever the file says. `Unpickler` resolves a name only through the
allow-list its caller gives (the exact globals of one file format), refusing any other name with
`UnsafePickleError` before anything is called, and applies BUILD only where it knows the effect:

- numpy arrays: `_reconstruct` makes an empty array and BUILD fills it. numpy's own `__setstate__`
  trusts its input (a dtype whose flags come from the file turns raw bytes into object pointers),
  so the dtype is one numpy makes from its name and byte order (`numpy.dtype` here returns a
  stand-in that takes only those from its state: no real dtype ever gets state from a file) and
  the data's length is checked against the shape first. Object arrays hold items unpickled through
  the same allow-list.
- `collections.OrderedDict`: its instance dict (torch state dicts carry `_metadata`).
- pandas DataFrames (`PANDAS_GLOBALS`): stand-ins that keep the columns (a dict of 1-D arrays).

Any other BUILD is refused, naming the object's type. Lengths the file declares (bytes, frames)
are read in pieces, so a false length costs no more memory than the file holds.

This is pickle's pure-Python unpickler (`pickle._Unpickler`) with those hooks: the C unpickler calls
`__setstate__` itself, allocates a declared BYTEARRAY8 length before reading, and sizes its memo
by the largest index the file names (a 9-byte pickle with index 2**24 takes 256 MB; 2**31, 32 GB),
where this one keeps a dict. It reads a caption-like file (dicts of float arrays and lists of
strings) at ~13 MB/s, 8x slower than the C one (pandas DataFrames: 2x slower than pandas itself),
with 1.5x its memory; the files read here are read once per prepare or convert.
"""

from __future__ import annotations

import collections
import math
import pickle
import struct
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np


class UnsafePickleError(pickle.UnpicklingError):
    """The file names something outside its format's allow-list (a global, or state for an object)."""


_CHUNK = 1 << 20


class _Reader:
    """A file's read and readline for the unpickler: a length declared by the file is read in pieces,
    so it is trusted only as far as the bytes arrive (`f.read(n)` allocates n bytes first), and a short
    read is an error (the pure-Python unpickler does not check every length)."""

    def __init__(self, f: IO[bytes]):
        self._read, self.readline = f.read, f.readline

    def read(self, n: int) -> bytes:
        if n <= _CHUNK:
            data = self._read(n)
        else:
            parts, left = [], n
            while left:
                part = self._read(min(left, _CHUNK))
                if not part:
                    break
                parts.append(part)
                left -= len(part)
            data = b"".join(parts)
        if len(data) != n:
            if n == 1 and not data:
                raise EOFError("pickle data ended before its STOP opcode")
            raise pickle.UnpicklingError(f"truncated: {n} bytes declared, {len(data)} left in the file")
        return data


# ---- numpy ---------------------------------------------------------------------------------------

_DTYPE_KINDS = "biufcSUO"  # numbers, bool, bytes / unicode strings, objects: no structured dtypes


def _plain_dtype(spec: Any) -> np.dtype:
    try:
        dtype = np.dtype(spec)
    except Exception as e:
        raise UnsafePickleError(f"numpy dtype {spec!r:.80}: {e}") from None
    if dtype.kind not in _DTYPE_KINDS or dtype.fields is not None or dtype.subdtype is not None or not dtype.itemsize:
        raise UnsafePickleError(f"numpy dtype {dtype} (only plain numbers, strings and objects are read)")
    return dtype


class _Dtype:
    """Stands for `numpy.dtype(spec, align, copy)`: `dtype` is the plain dtype `spec` names, in the
    byte order its BUILD names (the rest of that state, flags included, is only checked). Arrays and
    scalars take the dtype; a bare dtype in a file stays this stand-in (no format read here holds one)."""

    dtype: np.dtype | None = None
    _built = True  # made by NEWOBJ (no __init__): no state either

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if not isinstance(spec, str):
            raise UnsafePickleError(f"numpy dtype from a {type(spec).__name__}")
        self.dtype, self._built = _plain_dtype(spec), False

    def set_state(self, state: Any) -> None:
        # numpy writes (3, byteorder, subarray, names, fields, elsize, alignment, flags).
        if self._built or not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3):
            raise UnsafePickleError(f"numpy dtype state {state!r:.80}")
        _, order, subarray, names, fields, elsize = state[:6]
        if subarray is not None or names is not None or fields is not None or order not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"numpy dtype state {state!r:.80} (only plain dtypes are read)")
        if elsize not in (-1, self.dtype.itemsize):
            raise UnsafePickleError(f"numpy dtype {self.dtype} with item size {elsize!r}")
        if order != "|":
            self.dtype = np.dtype(self.dtype.newbyteorder(order).str)  # (a native order: numpy's own dtype)
        self._built = True


def _as_dtype(d: Any) -> np.dtype:
    if isinstance(d, _Dtype) and d.dtype is not None:
        d._built = True  # in use: no later BUILD may change it
        return d.dtype
    raise UnsafePickleError(f"numpy dtype expected, got a {type(d).__name__}")


class _NdarrayName:
    """`numpy.ndarray` as named by a pickle: only an argument of `_reconstruct`, never called."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or not all(type(n) is int and 0 <= n < 2**62 for n in shape):
        raise UnsafePickleError(f"numpy array shape {shape!r:.80}")
    return shape


def _numpy_reconstruct(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    """`numpy.core.multiarray._reconstruct`: an empty array that the next BUILD fills."""
    if cls is not _NDARRAY:
        raise UnsafePickleError(f"numpy array reconstruction of {cls!r:.80}")
    return np.empty((0,), np.uint8)


def _set_array_state(arr: np.ndarray, state: Any) -> None:
    # Only an empty array (what _reconstruct returns) is filled: nothing views its memory.
    if arr.size or arr.base is not None:
        raise UnsafePickleError("numpy array state for an array that already holds data")
    if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
        raise UnsafePickleError(f"numpy array state {state!r:.80}")
    _, shape, dtype, fortran, data = state
    shape, dtype = _shape(shape), _as_dtype(dtype)
    n = math.prod(shape)
    if dtype.hasobject:
        if type(data) is not list or len(data) != n:
            raise UnsafePickleError(f"numpy object array of shape {shape} without a list of its {n} items")
    elif not isinstance(data, bytes | bytearray) or len(data) != n * dtype.itemsize:
        raise UnsafePickleError(f"numpy array of shape {shape} and dtype {dtype} without its {n * dtype.itemsize} "
                                "bytes")
    np.ndarray.__setstate__(arr, (1, shape, dtype, bool(fortran), data))


def _numpy_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """`numpy.core.numeric._frombuffer` (protocol 5 pickles of arrays)."""
    dtype, shape = _as_dtype(dtype), _shape(shape)
    n = math.prod(shape)
    if dtype.hasobject or not isinstance(buf, bytes | bytearray) or len(buf) != n * dtype.itemsize or \
            order not in ("C", "F"):
        raise UnsafePickleError(f"numpy array of shape {shape} and dtype {dtype} without its bytes")
    return np.frombuffer(buf, dtype).reshape(shape, order=order)


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """`numpy.core.multiarray.scalar`: a number from its bytes."""
    dtype = _as_dtype(dtype)
    if dtype.hasobject or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise UnsafePickleError(f"numpy scalar of dtype {dtype} that is not its bytes")
    return np.frombuffer(data, dtype)[0]


def _set_ordered_dict_state(d: collections.OrderedDict, state: Any) -> None:
    if not isinstance(state, dict) or not all(type(k) is str for k in state):
        raise UnsafePickleError(f"OrderedDict attributes {state!r:.80}")
    d.__dict__.update(state)


NUMPY_GLOBALS: dict[tuple[str, str], Any] = {
    **{(m, "_reconstruct"): _numpy_reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _numpy_scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _numpy_frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
}
"""numpy arrays (numeric, string or object items), dtypes and scalars, as numpy pickles them."""


def _latin1_bytes(text: Any, encoding: Any) -> bytes:
    """`_codecs.encode(text, 'latin1')`: how protocols 0-2 write bytes (other codecs are not allowed)."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with {type(text).__name__}, {encoding!r:.40} (only latin1 text)")
    return text.encode("latin1")


def _empty_bytes(*args: Any) -> bytes:
    """`bytes()`: how protocols 0-2 write b"" (`bytes(n)` would allocate n bytes)."""
    if args:
        raise UnsafePickleError("bytes() with arguments")
    return b""


CONTAINER_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    # What protocols 0-2 spell as globals (3+ have opcodes for most); `__builtin__`: Python 2 files.
    **{(m, t.__name__): t for m in ("builtins", "__builtin__") for t in (set, frozenset, complex, slice)},
    ("_codecs", "encode"): _latin1_bytes,
    **{(m, "bytes"): _empty_bytes for m in ("builtins", "__builtin__")},
}
"""Containers and values beyond those pickle encodes without a global (dict, list, tuple, str, bytes,
numbers, None, bool)."""

PLAIN_GLOBALS = {**NUMPY_GLOBALS, **CONTAINER_GLOBALS}


# ---- pandas data frames, as dicts of columns -----------------------------------------------------


class _IndexName:
    """A pandas index class as named by a pickle: only an argument of `_new_Index`."""

    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"pandas {self.name}"


_RANGE_INDEX = _IndexName("RangeIndex")


class _RangeLabels:
    """A RangeIndex's labels: their number and each one by position, never iterated (a `range` from a
    file could make `set(...)` allocate any size)."""

    __iter__ = None

    def __init__(self, start: int, stop: int, step: int):
        self._range = range(start, stop, step)

    def __len__(self) -> int:
        return len(self._range)

    def __getitem__(self, i: int) -> int:
        return self._range[i]


def _new_index(cls: Any, d: Any) -> Any:
    """`pandas.core.indexes.base._new_Index`: the index's labels."""
    if not isinstance(cls, _IndexName) or not isinstance(d, dict):
        raise UnsafePickleError(f"pandas index {cls!r:.40} from a {type(d).__name__}")
    if cls is _RANGE_INDEX:
        if not all(type(d.get(k)) is int for k in ("start", "stop", "step")) or d["step"] == 0:
            raise UnsafePickleError(f"pandas RangeIndex {d!r:.80}")
        return _RangeLabels(d["start"], d["stop"], d["step"])
    if not isinstance(d.get("data"), np.ndarray) or d["data"].ndim != 1:
        raise UnsafePickleError(f"pandas index without a 1-D array of labels: {d!r:.80}")
    return d["data"]


class _Block:
    """A pandas block: `values` (k, n) holds the columns at `placement` (a slice or k positions)."""

    values: np.ndarray | None = None

    def __init__(self, values: Any, placement: Any, ndim: Any = 2):
        if not isinstance(values, np.ndarray) or values.ndim != 2 or not isinstance(placement, slice | np.ndarray):
            raise UnsafePickleError(f"pandas block of {type(values).__name__} at {placement!r:.40}")
        self.values, self.placement = values, placement


class _Blocks:
    """A pandas BlockManager: `axes` [column labels, row labels] and `blocks`. pandas >= 1.3 pickles it
    as a call (blocks, axes); earlier ones as state whose version "0.14.1" entry holds them."""

    axes: list = []
    blocks: list = []

    def __init__(self, blocks: Any = (), axes: Any = ()):
        if not isinstance(blocks, tuple | list) or not isinstance(axes, tuple | list):
            raise UnsafePickleError(f"pandas BlockManager of {type(blocks).__name__}, {type(axes).__name__}")
        self.blocks, self.axes = list(blocks), list(axes)

    def set_state(self, state: Any) -> None:
        try:
            s = state[3]["0.14.1"]
            self.__init__([_Block(b["values"], b["mgr_locs"]) for b in s["blocks"]], s["axes"])
        except (TypeError, KeyError, IndexError):
            raise UnsafePickleError(f"pandas BlockManager state {state!r:.80}") from None

    def columns(self) -> dict[Any, np.ndarray]:
        if len(self.axes) != 2 or not all(isinstance(b, _Block) and b.values is not None for b in self.blocks):
            raise UnsafePickleError("pandas BlockManager that is not a 2-D frame of blocks")
        labels, rows = self.axes
        out = {}
        for b in self.blocks:
            at = range(len(labels))[b.placement] if isinstance(b.placement, slice) else b.placement.tolist()
            if b.values.shape != (len(at), len(rows)):
                raise UnsafePickleError(f"pandas block of shape {b.values.shape} for {len(at)} columns of {len(rows)} "
                                        "rows")
            for j, i in enumerate(at):
                out[labels[i]] = b.values[j]
        return out


class _Frame(dict):
    """`pandas.core.frame.DataFrame` read as a dict column label -> 1-D numpy array (its row labels
    are dropped), without pandas: the columns of the frame that was pickled."""

    def set_state(self, state: Any) -> None:
        mgr = state.get("_mgr", state.get("_data")) if isinstance(state, dict) else None
        if not isinstance(mgr, _Blocks):
            raise UnsafePickleError(f"pandas DataFrame state {state!r:.80}")
        self.update(mgr.columns())


PANDAS_GLOBALS: dict[tuple[str, str], Any] = {
    ("pandas.core.frame", "DataFrame"): _Frame,
    ("pandas.core.internals.managers", "BlockManager"): _Blocks,
    ("pandas.core.internals", "BlockManager"): _Blocks,  # pandas < 0.24
    ("pandas._libs.internals", "_unpickle_block"): _Block,
    ("pandas.core.indexes.base", "_new_Index"): _new_index,
    ("pandas.core.indexes.base", "Index"): _IndexName("Index"),
    ("pandas.core.indexes.range", "RangeIndex"): _RANGE_INDEX,
    ("pandas.core.indexes.numeric", "Int64Index"): _IndexName("Int64Index"),
}
"""pandas DataFrames, as dicts of their columns (how HowTo100M's caption.pickle may hold each
video's start / end / text)."""

# BUILD (state applied to an object), by the object's exact type.
SET_STATE: dict[type, Callable[[Any, Any], None]] = {
    np.ndarray: _set_array_state,
    _Dtype: _Dtype.set_state,
    collections.OrderedDict: _set_ordered_dict_state,
    _Blocks: _Blocks.set_state,
    _Frame: _Frame.set_state,
}


class Unpickler(pickle._Unpickler):
    """Unpickles `file` resolving globals only through `allowed` ((module, name) -> object) and BUILD
    only through `set_state` (exact type -> function(obj, state)).

    `source` names the file in errors; `what` completes "refusing to load MODULE.NAME: " (which
    objects the format holds). `persistent_load` resolves persistent ids (torch storages); without
    it a persistent id is an error.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: IO[bytes], source: str, allowed: Mapping[tuple[str, str], Any], what: str, *,
                 set_state: Mapping[type, Callable[[Any, Any], None]] = SET_STATE,
                 persistent_load: Callable[[Any], Any] | None = None):
        super().__init__(_Reader(file))
        self._source, self._allowed, self._what, self._set_state = source, allowed, what, set_state
        self._persistent_load = persistent_load

    def load(self) -> Any:
        try:
            return super().load()
        except UnsafePickleError as e:  # the allowed callables do not know the file: name it
            msg = str(e)
            raise UnsafePickleError(msg if msg.startswith(f"{self._source}: ") else f"{self._source}: {msg}") from None

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"{self._source}: refusing to load {module}.{name}: {self._what}, so that "
                                    "loading it cannot run code") from None

    def persistent_load(self, pid: Any) -> Any:
        if self._persistent_load is None:
            raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r:.80}")
        return self._persistent_load(pid)

    def _load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        set_state = self._set_state.get(type(inst))
        if set_state is None:
            raise UnsafePickleError(f"{self._source}: refusing to set the state of a {type(inst).__name__} "
                                    f"({self._what})")
        set_state(inst, state)

    def _load_bytearray8(self) -> None:
        (n,) = struct.unpack("<Q", self.read(8))
        self.append(bytearray(self.read(n)))  # read first: the length is the file's claim

    dispatch[pickle.BUILD[0]] = _load_build
    dispatch[pickle.BYTEARRAY8[0]] = _load_bytearray8
