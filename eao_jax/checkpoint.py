"""Orbax checkpoints: one layout for training, conversion and evaluation.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step. Each step
holds the items:
  model   - the model variables (nnx Params + BatchNorm statistics) as a pure nested dict
  config  - the full ml_collections config as JSON (enough to rebuild the model)
  opt     - optimizer state (training only)
  data    - the grain iterator state (training only)
`convert` writes `model` + `config`; training writes all four; `evaluate`, `embed` and fine-tuning
(`init_from`) read `model` + `config` only.

Training (`train.py`) keeps one `CheckpointManager` open (`training_manager`): saves every
`checkpoint.every_steps`, keeps the last `checkpoint.keep`, writes asynchronously, and resumes from
the newest *complete* step (Orbax only lists steps whose write was committed). The grain iterator
state travels as per-process JSON files (`process_{i}-of-{n}.json`, grain's Orbax handler).
"""

from __future__ import annotations

import json
from typing import Any

import grain
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


# ------------------------------------------------------------------------------------------------
# Training checkpoints (all four items)


class IteratorSnapshot:
    """A grain iterator state captured when a batch was taken (the prefetcher runs ahead of the
    training step, so the live iterator is already past the batches the saved model has seen).

    Duck-types what grain's Orbax handler needs from a non-`DatasetIterator` item:
    `get_state() -> bytes` for saving and `set_state(bytes)` / `start_prefetch()` for restoring.
    """

    def __init__(self, state: dict | bytes | None = None):
        self.state = state

    def get_state(self) -> bytes:
        if self.state is None:
            raise ValueError("no data iterator state was captured")
        if isinstance(self.state, bytes):
            return self.state
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes) -> None:
        self.state = json.loads(state.decode()) if isinstance(state, bytes | bytearray) else state

    def start_prefetch(self) -> None:  # grain's handler calls it after set_state
        pass


def training_manager(directory: str | epath.Path, ckpt_cfg: ml_collections.ConfigDict | None = None, *,
                     read_only: bool = False) -> ocp.CheckpointManager:
    """The training `CheckpointManager` over `directory` (created if missing).

    ckpt_cfg: `config.checkpoint` (every_steps, keep, async_save). Saving off the interval needs
    `force=True` (final save, preemption).
    """
    cfg = ckpt_cfg if ckpt_cfg is not None else ml_collections.ConfigDict()
    every = int(cfg.get("every_steps", 1000) or 0)
    keep = cfg.get("keep", None)
    if read_only:
        options = ocp.CheckpointManagerOptions(read_only=True)
    else:
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=max(every, 1) if every > 0 else 2**62,
            max_to_keep=int(keep) if keep else None,
            enable_async_checkpointing=bool(cfg.get("async_save", True)),
            create=True,
            cleanup_tmp_directories=True,
        )
    handlers = {
        "model": ocp.StandardCheckpointHandler(),
        "opt": ocp.StandardCheckpointHandler(),
        "config": ocp.JsonCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
    }
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers)


def save_training(mngr: ocp.CheckpointManager, step: int, *, model_vars: dict, opt_vars: dict,
                  config: ml_collections.ConfigDict, data_state: IteratorSnapshot | None = None,
                  force: bool = False) -> bool:
    """Saves model, optimizer, config and (when given) the data iterator state at `step`.

    Returns whether a save was started (False off the save interval unless `force`). Asynchronous
    when the manager is: call `mngr.wait_until_finished()` before exiting.
    """
    items = dict(model=ocp.args.StandardSave(model_vars),
                 opt=ocp.args.StandardSave(opt_vars),
                 config=ocp.args.JsonSave(config_to_json(config)))
    if data_state is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_state)
    return mngr.save(step, args=ocp.args.Composite(**items), force=force)


def restore_training(mngr: ocp.CheckpointManager, step: int, *, model_target: dict, opt_target: dict,
                     with_data: bool = True) -> tuple[dict, dict, IteratorSnapshot | None]:
    """Restores (model_vars, opt_vars, data snapshot) of `step` onto the targets (pure dicts of
    ShapeDtypeStructs carrying concrete NamedShardings, JAX_NOTES P3).

    The data snapshot is None when `with_data` is False or the step has no `data` item.
    """
    items = dict(model=ocp.args.StandardRestore(model_target), opt=ocp.args.StandardRestore(opt_target))
    snapshot = None
    if with_data and (epath.Path(mngr.directory) / str(step) / "data").exists():
        snapshot = IteratorSnapshot()
        items["data"] = grain.checkpoint.CheckpointRestore(snapshot)
    restored = mngr.restore(step, args=ocp.args.Composite(**items))
    return restored.model, restored.opt, snapshot
