"""Orbax checkpoints: one layout for training, conversion and evaluation.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step. Each step
holds the items:
  model   - the model variables (nnx Params + BatchNorm statistics) as a pure nested dict
  config  - the full ml_collections config as JSON (enough to rebuild the model)
  opt     - optimizer state (training only)
  data    - the grain iterator state (training only)
`convert` writes `model` + `config`; training writes all four; `evaluate`, `embed` and fine-tuning
(`init_from`) read `model` + `config` only.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from eao_jax.model.eao import EverythingAtOnce

MODEL_VARIABLES = (nnx.Param, nnx.BatchStat)


def config_to_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A JSON-safe dict of the config (tuples become lists; placeholders None)."""
    return json.loads(config.to_json_best_effort())


def config_from_json(data: dict[str, Any]) -> ml_collections.ConfigDict:
    def fix(d):
        if isinstance(d, dict):
            return {k: fix(v) for k, v in d.items()}
        if isinstance(d, list):
            return tuple(fix(v) for v in d)
        return d
    return ml_collections.ConfigDict(fix(data))


def model_variables(model: nnx.Module) -> dict:
    """The checkpointed part of a model: {path: array} nested pure dict of Params and BatchStats."""
    return nnx.to_pure_dict(nnx.state(model, MODEL_VARIABLES))


def abstract_model(config: ml_collections.ConfigDict) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves (nothing allocated)."""
    return nnx.eval_shape(lambda: EverythingAtOnce(config.model, rngs=nnx.Rngs(0)))


def save_model(directory: str | epath.Path, step: int, model_vars: dict,
               config: ml_collections.ConfigDict) -> epath.Path:
    """Writes a `model` + `config` checkpoint at `step` (used by `convert`)."""
    directory = epath.Path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        mngr.save(step, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model_vars),
            config=ocp.args.JsonSave(config_to_json(config))), force=True)
        mngr.wait_until_finished()
    return directory


def latest_step(directory: str | epath.Path) -> int:
    directory = epath.Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint step in {directory}")
    return step


def restore_config(directory: str | epath.Path, step: int | None = None) -> ml_collections.ConfigDict:
    directory = epath.Path(directory)
    step = latest_step(directory) if step is None else step
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_from_json(restored.config)


def restore_model_variables(directory: str | epath.Path, step: int, target: dict) -> dict:
    """Restores the `model` item onto `target` (a pure dict of arrays or ShapeDtypeStructs with the
    wanted shardings)."""
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(epath.Path(directory), options=options) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    return restored.model


def load_model(directory: str | epath.Path, step: int | None = None, *,
               config: ml_collections.ConfigDict | None = None,
               sharding: jax.sharding.Sharding | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """Rebuilds the model saved in `directory` (latest complete step by default) in eval mode.

    `config` overrides the saved config (its model section must describe the same parameters);
    `sharding` places every variable (default: replicated on the local devices).
    Returns (model, config, step).
    """
    step = latest_step(directory) if step is None else step
    config = restore_config(directory, step) if config is None else config
    graphdef, abstract_state = nnx.split(abstract_model(config))
    if sharding is None:
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(abstract_state))
    variables = restore_model_variables(directory, step, target)
    model = nnx.merge(graphdef, abstract_state)
    state = nnx.state(model, MODEL_VARIABLES)
    nnx.replace_by_pure_dict(state, variables)
    nnx.update(model, state)
    model.eval()
    return model, config, step
