"""Runs a backbone over fixed-shape batches, split over the local devices.

Extraction feeds arbitrary numbers of frames or clips; the compiled program sees one static batch
shape (`batch_size`, rounded up to a multiple of the device count) and the last batch is zero-padded
and trimmed after, so one compilation serves a whole job. The parameters are an argument of the
jitted function (replicated), not constants baked into it: that keeps compilation fast for the
hundreds of MB of a ResNet-152.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from eao_jax.parallel import DATA_AXIS


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Every floating leaf of `tree` as `dtype` (integer leaves, such as counters, unchanged)."""
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


class Runner:
    """`runner(x)` = `apply(model, x)` for `x` of shape (N, ...), computed `batch_size` rows at a time.

    Args:
      model: an NNX module (eval mode).
      apply: `(model, x (B, ...)) -> (B, ...)`, pure; the result is returned as float32 numpy.
      batch_size: rows per device call (rounded up to a multiple of the local device count).
      compute_dtype: `jnp.bfloat16` on accelerators casts parameters and floating inputs (float32: exact).
      devices: default all local devices.
    """

    def __init__(self, model: nnx.Module, apply: Callable[[nnx.Module, jax.Array], jax.Array], batch_size: int,
                 *, compute_dtype: Any = jnp.float32, devices: list | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        devices = list(jax.local_devices() if devices is None else devices)
        self.mesh = jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices)
        self.batch_size = -(-batch_size // len(devices)) * len(devices)
        graphdef, state = nnx.split(model)
        replicated = NamedSharding(self.mesh, P())
        self._graphdef, self._replicated = graphdef, replicated
        self._state = jax.device_put(state, replicated)
        self._batch_sharding = NamedSharding(self.mesh, P(DATA_AXIS))

        def run(state, x):
            m = nnx.merge(graphdef, cast_floats(state, compute_dtype))
            return apply(m, cast_floats(x, compute_dtype)).astype(jnp.float32)  # token ids stay integers

        self._run = jax.jit(run, in_shardings=(replicated, self._batch_sharding), out_shardings=self._batch_sharding)

    def dispatch(self, x: np.ndarray) -> tuple[jax.Array, int]:
        """Starts one batch of at most `batch_size` rows (zero-padded to it) without waiting for it:
        returns the device result and the row count (`np.asarray(result)[:n]` waits)."""
        n = x.shape[0]
        if not 0 < n <= self.batch_size:
            raise ValueError(f"a batch holds 1 to {self.batch_size} rows, got {n}")
        if n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        return self._run(self._state, jax.device_put(x, self._batch_sharding)), n

    def lower(self, item_shape: tuple[int, ...], dtype: Any = np.float32) -> Any:
        """The jitted call lowered for one full batch of `item_shape` rows (for XLA's cost and
        memory analysis: `.compile().cost_analysis()`)."""
        x = jax.ShapeDtypeStruct((self.batch_size, *item_shape), dtype, sharding=self._batch_sharding)
        return self._run.lower(self._state, x)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.shape[0] == 0:
            raise ValueError("no rows to run the backbone on")
        outs = []
        for start in range(0, x.shape[0], self.batch_size):
            out, n = self.dispatch(x[start:start + self.batch_size])
            outs.append(np.asarray(out)[:n])
        return np.concatenate(outs)

    def load(self, model: nnx.Module) -> None:
        """Runs `model`'s weights from now on: the same architecture and shapes, so the compiled
        program is reused."""
        graphdef, state = nnx.split(model)
        shapes = [jnp.shape(x) for x in jax.tree.leaves(state)]
        if graphdef != self._graphdef or shapes != [jnp.shape(x) for x in jax.tree.leaves(self._state)]:
            raise ValueError("Runner.load: the model differs from the one this runner was built for")
        self._state = jax.device_put(state, self._replicated)
