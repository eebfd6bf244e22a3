"""Device mesh, sharding rules and global batches.

The mesh has two named axes, ``("data", "model")``, both of `AxisType.Auto`
(`jax.make_mesh` would default to Explicit, under which the global-batch NCE `a @ b.T` does not
type-check). The batch is split over ``data``; the combinatorial loss is written on the *global*
batch and GSPMD inserts the collectives, so a sharded step computes the same numbers as a
single-device step.

Parameter placement is rule-based on shapes alone (no annotations in the model):
- a leaf with fewer than ``mesh.fsdp_min_size`` elements (or any leaf when ``mesh.fsdp`` is off
  and ``mesh.model == 1``) is replicated;
- with ``mesh.fsdp``, the largest dimension divisible by the data-axis size is sharded over
  ``data`` (FSDP / ZeRO-3: parameters are all-gathered for the compute, gradients reduce-scattered);
- with ``mesh.model > 1``, the largest remaining dimension divisible by the model-axis size is
  sharded over ``model``.
Adam's moments have the shapes of their parameters, so the same rule places them identically
("optimizer state follows params"); scalar counters are replicated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from eao_jax import batch_contract

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)

# Batch entries the model consumes (host numpy -> global jax.Array); other entries (ids, strings)
# stay on the host.


def mesh_shape(mesh_cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int]:
    """(data, model) axis sizes for `n_devices`; ``mesh.data = -1`` takes all devices left over.

    Raises ValueError naming the field when the sizes do not multiply to `n_devices`.
    """
    model = int(mesh_cfg.get("model", 1))
    data = int(mesh_cfg.get("data", -1))
    if model < 1:
        raise ValueError(f"mesh.model must be >= 1, got {model}")
    if data == -1:
        if n_devices % model:
            raise ValueError(f"mesh.model={model} does not divide the number of devices ({n_devices})")
        data = n_devices // model
    if data < 1:
        raise ValueError(f"mesh.data must be >= 1 or -1 (all remaining devices), got {data}")
    if data * model != n_devices:
        raise ValueError(f"mesh.data={data} x mesh.model={model} = {data * model} devices, "
                         f"but {n_devices} devices are available")
    return data, model


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: list | None = None) -> jax.sharding.Mesh:
    """The ("data", "model") mesh with Auto axes over `devices` (default: all global devices)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``, replicated over ``model``."""
    return NamedSharding(mesh, P(DATA_AXIS))


def param_spec(shape: tuple[int, ...], mesh: jax.sharding.Mesh, *, fsdp: bool, fsdp_min_size: int) -> P:
    """The PartitionSpec of one parameter (or optimizer moment) of `shape` under the rules above."""
    if not shape or int(np.prod(shape)) < fsdp_min_size:
        return P()
    spec: list[str | None] = [None] * len(shape)

    def pick(axis: str, size: int) -> None:
        if size <= 1:
            return
        # Largest divisible dimension; the last one on ties (usually the output features).
        best = None
        for i, d in enumerate(shape):
            if spec[i] is None and d % size == 0 and (best is None or d >= shape[best]):
                best = i
        if best is not None:
            spec[best] = axis

    if fsdp:
        pick(DATA_AXIS, mesh.shape[DATA_AXIS])
    pick(MODEL_AXIS, mesh.shape[MODEL_AXIS])
    return P(*spec) if any(spec) else P()


def state_shardings(abstract_state: Any, mesh: jax.sharding.Mesh, mesh_cfg: ml_collections.ConfigDict) -> Any:
    """NamedShardings (concrete mesh: Orbax cannot restore onto an AbstractMesh) for every leaf of an
    abstract pytree of arrays or ShapeDtypeStructs (nnx.State or pure dicts)."""
    fsdp = bool(mesh_cfg.get("fsdp", False))
    min_size = int(mesh_cfg.get("fsdp_min_size", 2**18))

    def one(x):
        shape = tuple(getattr(x, "shape", ()))
        return NamedSharding(mesh, param_spec(shape, mesh, fsdp=fsdp, fsdp_min_size=min_size))

    return jax.tree.map(one, abstract_state)


def with_shardings(abstract_state: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying `shardings` (targets for sharded init or Orbax restore)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a host batch that the model consumes."""
    return {k: batch[k] for k in batch_contract.KEYS if k in batch}


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over ``data``.

    Every process passes its own slice; the global batch is the concatenation in process order
    (`jax.make_array_from_process_local_data`, multi-host safe).
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in model_inputs(local_batch).items()}
