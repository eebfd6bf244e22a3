"""Backbone weights from public PyTorch checkpoints, read without torch (`eao_jax.torch_pickle`).

`load_state_dict` reads a `.pth` into a flat `{key: np.ndarray}`; `StateDict` hands its entries to a
converter one key at a time, checking each shape, and `finish` names every key no converter took, so
a checkpoint of another architecture (or a truncated one) is refused by name instead of loading
half its weights. `fill_nnx` fills an (abstract) NNX module from a `StateDict` whose keys follow the
module's attribute paths (`torch_key`), moving Linear and Conv weights to Flax's layouts.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# Wrappers that training scripts put around a state dict, and the prefix DataParallel adds to keys.
_WRAPPERS = ("state_dict", "model", "model_state_dict", "net")
_PARALLEL_PREFIX = "module."


class WeightsError(ValueError):
    """A checkpoint does not hold the weights a backbone expects (the message names the key)."""


def flatten(obj: Any, source: str, prefix: str = "") -> dict[str, np.ndarray]:
    """`{dotted.key: array}` from nested dicts of arrays; anything else is refused by key."""
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, source, f"{name}."))
        elif isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[name] = np.asarray(value)  # e.g. BatchNorm's num_batches_tracked saved as a number
        else:
            raise WeightsError(f"{source}: entry {name!r} is a {type(value).__name__}, not an array")
    return out


def unwrap(obj: Any, source: str) -> dict[str, np.ndarray]:
    """The flat state dict inside a loaded checkpoint (unwrapping `{"state_dict": ...}` and the like,
    dropping DataParallel's `module.` prefix)."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a state dict (a mapping of names to tensors), "
                           f"got a {type(obj).__name__}")
    for wrapper in _WRAPPERS:
        if wrapper in obj and isinstance(obj[wrapper], Mapping):
            obj = obj[wrapper]
            break
    state = flatten(obj, source)
    if state and all(k.startswith(_PARALLEL_PREFIX) for k in state):
        state = {k[len(_PARALLEL_PREFIX):]: v for k, v in state.items()}
    if not state:
        raise WeightsError(f"{source}: the checkpoint holds no tensors")
    return state


def load_state_dict(path: str | os.PathLike, *, torchscript: bool = False) -> dict[str, np.ndarray]:
    """A `.pth` (zip or legacy `torch.save`) as `{key: np.ndarray}`; its code is never run.
    `torchscript=True` also reads a `torch.jit.save` archive: its modules' tensors, keyed by attribute
    path as in the module's `state_dict()`."""
    from eao_jax import torch_pickle  # noqa: PLC0415 (keeps --help light)

    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such checkpoint file")
    return unwrap(torch_pickle.load(source, torchscript=torchscript), source)


class StateDict:
    """Hands out a state dict's arrays by key, checking shapes, and remembers which were taken."""

    def __init__(self, state: Mapping[str, np.ndarray], source: str):
        self.state, self.source = dict(state), source
        self.taken: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self.state

    def keys_with_prefix(self, prefix: str) -> list[str]:
        return sorted(k for k in self.state if k.startswith(prefix))

    def shape(self, key: str) -> tuple[int, ...]:
        """The shape of `key` without taking it (for inferring dimensions)."""
        return tuple(self._get(key).shape)

    def take(self, key: str, shape: tuple[int, ...] | None = None, dtype: Any = np.float32) -> np.ndarray:
        """The array at `key` as `dtype`; WeightsError naming the key when missing or mis-shaped."""
        value = self._get(key)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise WeightsError(f"{self.source}: {key} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.taken.add(key)
        return np.asarray(value, dtype=dtype)

    def skip(self, keys: Iterable[str]) -> None:
        """Marks entries the backbone does not use (classifier heads, counters) as handled."""
        self.taken.update(k for k in keys if k in self.state)

    def finish(self) -> None:
        """WeightsError naming the entries no converter took (another architecture's checkpoint)."""
        left = sorted(set(self.state) - self.taken)
        if left:
            shown = ", ".join(left[:8]) + (f", ... ({len(left)} in all)" if len(left) > 8 else "")
            raise WeightsError(f"{self.source}: unexpected entries {shown}")

    def _get(self, key: str) -> np.ndarray:
        if key not in self.state:
            raise WeightsError(f"{self.source}: missing entry {key!r}")
        return self.state[key]


# NNX leaf name -> the PyTorch parameter or buffer it comes from.
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight", "mean": "running_mean",
               "var": "running_var"}


def torch_key(path: tuple) -> str:
    """The PyTorch key of an NNX state path whose module attributes are named as the PyTorch modules
    (list indices as Sequential's "0", "1", ...): ('mixed_3b', 'conv_b0', 'bn1', 'var') ->
    'mixed_3b.conv_b0.bn1.running_var'."""
    *modules, leaf = (str(p) for p in path)
    return ".".join([*modules, _TORCH_LEAF.get(leaf, leaf)])


def fill_nnx(model: Any, sd: StateDict, key_of: Any = torch_key) -> Any:
    """`model` (an NNX module, typically abstract from `nnx.eval_shape`) with every array taken from
    `sd` at `key_of(path)`: a `kernel` of rank 2 is a transposed Linear weight (out, in), one of rank
    k + 2 a Conv weight (out, in, *window) moved to (*window, in, out); any other leaf keeps its
    shape. Each shape is checked (WeightsError naming the key); `sd.finish()` is left to the caller."""
    import jax.numpy as jnp  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    arrays = {}
    for path, var in flat:
        shape = tuple(var.get_value().shape)
        key = key_of(path)
        if path[-1] == "kernel" and len(shape) == 2:
            value = sd.take(key, shape[::-1]).T
        elif path[-1] == "kernel" and len(shape) > 2:
            torch_shape = (shape[-1], shape[-2], *shape[:-2])
            value = np.moveaxis(sd.take(key, torch_shape), (0, 1), (-1, -2))
        else:
            value = sd.take(key, shape)
        arrays[path] = jnp.asarray(np.ascontiguousarray(value), var.get_value().dtype)
    for path, var in flat:  # only once every key was found and checked
        var.set_value(arrays[path])
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
