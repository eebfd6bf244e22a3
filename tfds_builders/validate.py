"""Prepare-time validation of released files and arrays.

Every check raises `BadItem` naming the item, the file and the reason. Builders either turn it into a
`PrepareError` (the default: the prepare stops, nothing is written) or, with `skip_bad`, record it in
a `Report` that is written next to the dataset (`prepare_report.json`).
"""

from __future__ import annotations

import collections
import json
import os
from typing import Any

import numpy as np

from eao_jax import safe_pickle, torch_pickle
from eao_jax.batch_contract import N_MELS

REPORT_FILE = "prepare_report.json"

# Reasons (the keys of the report's counts).
MISSING_FILE = "missing file"
UNREADABLE = "unreadable or truncated file"
MISSING_KEY = "missing key"
WRONG_SHAPE = "wrong array shape"
WRONG_DIM = "wrong feature dimension"
NON_FINITE = "NaN or Inf values"
EMPTY_SPEC = "empty spectrogram"
EMPTY_FEATURES = "empty features"
EMPTY_CAPTION = "empty caption"
NO_CAPTION = "no caption"
BAD_ANNOTATION = "bad annotation"


class BadItem(ValueError):
    """One item of a released dataset is unusable."""

    def __init__(self, reason: str, item: str, file: str | os.PathLike | None, detail: str = ""):
        self.reason, self.item, self.detail = reason, str(item), detail
        self.file = None if file is None else os.fspath(file)
        msg = f"{reason}: item {self.item!r}"
        if self.file:
            msg += f", file {self.file}"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


def with_dim_hint(e: BadItem, config_name: str, config_names: list[str]) -> BadItem:
    """A wrong-dimension BadItem extended with the way out: the builder config matching the files'
    backbone, or explicit widths (other BadItems are returned as they are)."""
    if e.reason != WRONG_DIM:
        return e
    return BadItem(e.reason, e.item, e.file, e.detail + (
        f"; if these files are another backbone, prepare with the matching --config ({', '.join(config_names)}) "
        f"or give --feature_dims=D2,D3 (config {config_name!r})"))


class PrepareError(ValueError):
    """A prepare stopped on bad input (rerun with --skip_bad to skip and count such items)."""


class Report:
    """Counts and lists the skipped items of a prepare, per split."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.written: collections.Counter = collections.Counter()
        self.notes: list[str] = []

    def skip(self, split: str, err: BadItem) -> None:
        self.items.append(dict(split=split, item=err.item, file=err.file, reason=err.reason, detail=err.detail))

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for it in self.items:
            out.setdefault(it["split"], collections.Counter())[it["reason"]] += 1
        return {s: dict(c) for s, c in out.items()}

    def to_json(self) -> dict[str, Any]:
        return dict(written=dict(self.written), skipped=self.counts(), skipped_items=self.items, notes=self.notes)

    def save(self, path: str | os.PathLike) -> None:
        path = os.fspath(path)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        os.replace(tmp, path)


def load_npz_key(path: str | os.PathLike, key: str, item: str) -> np.ndarray:
    """`np.load(path)[key]` (local or gs://), with missing / truncated files and missing keys reported
    as `BadItem`."""
    from etils import epath

    p = epath.Path(path)
    if not p.exists():
        raise BadItem(MISSING_FILE, item, path)
    try:
        with p.open("rb") as f, np.load(f, allow_pickle=False) as z:
            if key not in z.files:
                raise BadItem(MISSING_KEY, item, path, f"no key {key!r} (has {z.files})")
            return z[key]
    except BadItem:
        raise
    except Exception as e:  # zipfile.BadZipFile, EOFError, ValueError, zlib.error, OSError ...
        raise BadItem(UNREADABLE, item, path, f"{type(e).__name__}: {e}") from None


def load_npy(path: str | os.PathLike, item: str) -> np.ndarray:
    if not os.path.exists(path):
        raise BadItem(MISSING_FILE, item, path)
    try:
        return np.load(path, allow_pickle=False)
    except Exception as e:
        raise BadItem(UNREADABLE, item, path, f"{type(e).__name__}: {e}") from None


def _finite(arr: np.ndarray, what: str, item: str, file) -> None:
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
        raise BadItem(NON_FINITE, item, file, f"{what} has {bad} non-finite values")


def check_features(arr: Any, what: str, item: str, file, dim: int | None, dtype: np.dtype | str) -> np.ndarray:
    """Validates a (T, D) feature array and casts it to the storage dtype.

    Errors: not 2-D, D != dim (when dim is given), T == 0, NaN/Inf (also after the cast, so float32
    values beyond the float16 range are caught).
    """
    arr = as_numpy(arr, what, item, file)
    if arr.ndim != 2:
        raise BadItem(WRONG_SHAPE, item, file, f"{what} must be (T, D), got shape {arr.shape}")
    if dim is not None and arr.shape[1] != dim:
        raise BadItem(WRONG_DIM, item, file, f"{what} has dimension {arr.shape[1]}, expected {dim}")
    if arr.shape[0] == 0:
        raise BadItem(EMPTY_FEATURES, item, file, f"{what} has no time steps")
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.integer):
        raise BadItem(WRONG_SHAPE, item, file, f"{what} has non-numeric dtype {arr.dtype}")
    _finite(arr, what, item, file)
    with np.errstate(over="ignore"):  # overflow shows up as inf, reported just below
        out = arr.astype(dtype, copy=False)
    _finite(out, f"{what} (as {np.dtype(dtype).name})", item, file)
    return np.ascontiguousarray(out)


def check_spectrogram(arr: Any, item: str, file, dtype: np.dtype | str) -> np.ndarray:
    """Validates a (40, T) log-mel spectrogram (T > 0, finite) and casts it to the storage dtype."""
    arr = as_numpy(arr, "spectrogram", item, file)
    if arr.ndim != 2 or arr.shape[0] != N_MELS:
        raise BadItem(WRONG_SHAPE, item, file, f"spectrogram must be ({N_MELS}, T), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise BadItem(EMPTY_SPEC, item, file, "spectrogram has 0 frames")
    _finite(arr, "spectrogram", item, file)
    with np.errstate(over="ignore"):
        out = arr.astype(dtype, copy=False)
    _finite(out, f"spectrogram (as {np.dtype(dtype).name})", item, file)
    return np.ascontiguousarray(out)


def check_caption(text: Any, item: str, file) -> str:
    if text is None:
        raise BadItem(NO_CAPTION, item, file)
    if isinstance(text, bytes):
        text = text.decode("utf-8")
    text = str(text)
    if not text.strip():
        raise BadItem(EMPTY_CAPTION, item, file)
    return text


def as_numpy(x: Any, what: str, item: str, file) -> np.ndarray:
    """numpy view of an array (a pickle's torch tensors already are numpy arrays), else BadItem naming it."""
    try:
        return np.asarray(x)
    except Exception as e:
        raise BadItem(WRONG_SHAPE, item, file, f"{what} is not an array ({type(x).__name__}: {e})") from None


_PICKLE_CONTENT = ("only numpy arrays, pandas data frames, torch tensors and plain containers (dict, list, tuple, "
                   "numbers, strings) are read from a dataset pickle")


def load_pickle(path: str | os.PathLike) -> Any:
    """Unpickles a released file without running its code (`eao_jax.safe_pickle`): numpy arrays, plain
    containers, pandas data frames as dicts of columns and torch tensors as numpy arrays (no pandas or
    torch needed); any other global is refused, naming it (`PrepareError`)."""
    from etils import epath

    path = os.fspath(path)
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: file not found")
    allowed = {**safe_pickle.PLAIN_GLOBALS, **safe_pickle.PANDAS_GLOBALS,
               **torch_pickle.plain_pickle_globals(p.stat().length, path)}
    with p.open("rb") as f:
        try:
            return safe_pickle.Unpickler(f, path, allowed, _PICKLE_CONTENT).load()
        except safe_pickle.UnsafePickleError as e:
            raise PrepareError(str(e)) from None
        except Exception as e:
            raise PrepareError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
