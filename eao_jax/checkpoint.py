"""Orbax checkpoints: one layout for training, conversion and evaluation.

A checkpoint directory is an Orbax `CheckpointManager` root with one folder per step. Each step
holds the items:
  model   - the model variables (nnx Params + BatchNorm statistics) as a pure nested dict
  config  - the full ml_collections config as JSON (enough to rebuild the model)
  opt     - optimizer state (training only)
  data    - the grain iterator state (training only)
  digest  - a 32-bit digest of every array of `model` and `opt` (JSON)
`convert` writes `model` + `config` + `digest`; training writes all five; `evaluate`, `embed` and
fine-tuning (`init_from`) read `model` + `config` (+ `digest`) only.

Integrity: Orbax's TensorStore files checksum their indexes and b-tree nodes but not the array
values (zarr's crc32c codec is not among the codecs Orbax lets a caller choose), so changed bytes in
a data file restore silently. Every array's digest is therefore computed where the array lives (one
jitted pass, no copy to the host), saved as the `digest` item in the same atomic step, and checked
against the restored arrays (`CheckpointDigestError` names the arrays that differ). The digest is the
sum modulo 2**32 of a bijective mix of each 32-bit word with its position in the array: any changed
word changes it, other damage goes unseen with a chance of about 2**-32 (as for a CRC32C), and a sum
does not depend on how the array is sharded or split over processes, so a step saved on one mesh
verifies when restored onto any other. One pass over the bytes, as fast as a plain sum where the
state lives (bench_checkpoint). A step without a `digest` item restores unverified.

Training (`train.py`) keeps one `CheckpointManager` open (`training_manager`): saves every
`checkpoint.every_steps`, keeps the last `checkpoint.keep`, writes asynchronously, and resumes from
the newest *complete* step (Orbax only lists steps whose write was committed). The grain iterator
state travels as per-process JSON files (`process_{i}-of-{n}.json`, grain's Orbax handler).

Multi-process: every process calls `save_training` / `restore_training` (Orbax coordinates the
writes: arrays are written shard by shard, the config once, and each process writes its own
`process_{i}-of-{n}.json`). Model and optimizer state restore onto any mesh (the targets carry the
new shardings), so a run may resume with a different device or process count. The data iterator
state is the number of global batches read (eao_jax.data.pipelines: process p reads block p of every
global batch of one global order), identical in every process's file; when the process count
changed, `restore_training` checks that the old files agree and carries that position over, so the
resumed run reads exactly the global batches the old one would have read next. Files that disagree
(or are missing) are an error that names them; never a silent restart of the data order.
"""

from __future__ import annotations

import contextlib
import json
import logging as py_logging
import os
import re
import sys
from collections.abc import Callable, Iterator
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from eao_jax.model.eao import EverythingAtOnce

MODEL_VARIABLES = (nnx.Param, nnx.BatchStat)


def resolve_path(path: str | os.PathLike) -> epath.Path:
    """A user-given path as Orbax needs it: local paths made absolute (Orbax refuses relative ones,
    and only at the first asynchronous write), `~` expanded; URLs such as gs://... unchanged."""
    s = os.fspath(path)
    if "://" in s:
        return epath.Path(s)
    return epath.Path(os.path.abspath(os.path.expanduser(s)))


CHECKPOINT_SUBDIR = "checkpoints"  # where a training workdir keeps its checkpoints


def checkpoint_root(path: str | os.PathLike) -> epath.Path:
    """The Orbax checkpoint root for what a user may pass as a checkpoint: a `convert` output, a
    training workdir's `checkpoints/` folder, or the training workdir itself."""
    root = resolve_path(path)
    if (root / CHECKPOINT_SUBDIR).is_dir():
        return root / CHECKPOINT_SUBDIR
    return root


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


class NonFiniteStateError(FloatingPointError):
    """A state holding NaN or Inf values: it is never written to (or read from) a checkpoint."""


@jax.jit
def _leaves_finite(leaves: list[jax.Array]) -> list[jax.Array]:
    # One boolean per leaf, reduced where the leaf lives: no parameter leaves its devices.
    return [jnp.isfinite(x).all() for x in leaves]


def nonfinite_leaves(tree: Any) -> list[str]:
    """The '/'-joined paths of the floating-point leaves of `tree` (numpy or jax arrays, sharded or
    not) that hold a NaN or Inf value."""
    flat = [(jax.tree_util.keystr(path, simple=True, separator="/"), x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    on_device = [(name, x) for name, x in flat if isinstance(x, jax.Array)]
    bad = [name for name, x in flat if not isinstance(x, jax.Array) and not np.isfinite(np.asarray(x)).all()]
    if on_device:
        ok = jax.device_get(_leaves_finite([x for _, x in on_device]))
        bad += [name for (name, _), good in zip(on_device, ok, strict=True) if not good]
    return sorted(bad)


def check_finite(tree: Any, what: str) -> None:
    """Raises NonFiniteStateError naming the leaves of `tree` with NaN/Inf values (`what` says whose)."""
    bad = nonfinite_leaves(tree)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(f"{what}: {len(bad)} arrays hold NaN or Inf values ({shown})")


# ------------------------------------------------------------------------------------------------
# TensorStore's reports after a failed read or write


def _is_closed_loop_report(unraisable: Any) -> bool:
    return isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"


def _drop_closed_loop_reports() -> None:
    """Drops, from now on in this process, the reports of TensorStore operations that complete into
    the event loop of an Orbax read or write that already failed and closed it.

    When one array of a restore (or save, in Orbax's background thread) fails, Orbax's `asyncio.run`
    ends while TensorStore still runs the other arrays' operations; each then schedules its result
    into the closed loop from a TensorStore thread, and the RuntimeError is printed through
    `sys.unraisablehook` (a traceback of 6 lines each, hundreds per failed step) at any time
    afterwards. Nothing waits for those results; the failure itself reaches the caller as an
    exception. Every other unraisable report passes through."""
    previous = sys.unraisablehook
    if getattr(previous, "_eao_drops_closed_loop", False):
        return

    def hook(unraisable: Any) -> None:
        if not _is_closed_loop_report(unraisable):
            previous(unraisable)

    hook._eao_drops_closed_loop = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


@contextlib.contextmanager
def _quiet_tensorstore() -> Iterator[None]:
    """Around an Orbax read that may fail: no page of asyncio JSON per un-retrieved future of the failed
    read, and no closed-loop tracebacks of its other operations (`_drop_closed_loop_reports`)."""
    _drop_closed_loop_reports()
    logger = py_logging.getLogger("asyncio")
    level = logger.level
    logger.setLevel(py_logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# ------------------------------------------------------------------------------------------------
# Array digests (see the module docstring)

DIGEST_ITEM = "digest"
DIGEST_ALGORITHM = "eao-fmix32-sum"  # named in the item, so that a reader can tell another scheme


def _fmix32(h: jax.Array) -> jax.Array:
    # MurmurHash3's finaliser: a bijection of uint32 in which every input bit flips ~half the output bits.
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as uint32 words (an 8-byte element gives two, on a trailing axis)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size in (4, 8):
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    return jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16}[size]).astype(jnp.uint32)


def _digest(x: jax.Array) -> jax.Array:
    w = _words(x)
    # The row-major position of each word (mod 2**32), from iotas: no reshape, so no resharding.
    pos, stride = jnp.zeros(w.shape, jnp.uint32), 1
    for axis in reversed(range(w.ndim)):
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * np.uint32(stride % 2**32)
        stride *= w.shape[axis]
    # A distinct odd-multiple key per position, so that moved (e.g. swapped) words change the sum too.
    return jnp.sum(_fmix32(w ^ (pos * np.uint32(0x9E3779B9))), dtype=jnp.uint32)


_digests_jit = jax.jit(lambda leaves: [_digest(x) for x in leaves])


def _host_words(x: Any) -> np.ndarray:
    # A host array's 8-byte elements as the uint32 pairs `_words` makes of a device array's.
    x = np.asarray(x)
    if x.dtype.itemsize == 8 and x.dtype != np.bool_:
        return np.ascontiguousarray(x).reshape(-1).view(np.uint32).reshape(x.shape + (2,))
    return x


def array_digests(tree: Any) -> dict[str, str]:
    """{'/'-joined path: 8 hex digits} for every array leaf of `tree` (jax arrays, sharded over any
    mesh and processes, or numpy arrays). Device arrays are digested where they live; host arrays on
    the CPU."""
    flat = [(jax.tree_util.keystr(path, simple=True, separator="/"), x)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0] if hasattr(x, "dtype")]
    on_device = [(name, x) for name, x in flat if isinstance(x, jax.Array)]
    on_host = [(name, x) for name, x in flat if not isinstance(x, jax.Array)]
    if on_host:
        try:
            host = jax.local_devices(backend="cpu")[0]
        except RuntimeError:  # JAX_PLATFORMS leaves the CPU backend out
            host = jax.local_devices()[0]
        on_host = [(name, jax.device_put(_host_words(x), host)) for name, x in on_host]
    out = {}
    for group in (on_device, on_host):
        if group:
            sums = jax.device_get(_digests_jit([x for _, x in group]))
            out.update({name: f"{int(v):08x}" for (name, _), v in zip(group, sums, strict=True)})
    return out


class CheckpointDigestError(ValueError):
    """Restored arrays differ from the digests saved with their step: the step's files are damaged."""

    def __init__(self, where: str, names: list[str]):
        self.names = names
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        self.reason = f"arrays differ from their saved digests ({shown})"
        super().__init__(f"{where}: {self.reason}")


def _digest_record(tree: dict) -> dict[str, Any]:
    return {"algorithm": DIGEST_ALGORITHM, "arrays": array_digests(tree)}


def _saved_digests(mngr: ocp.CheckpointManager, step: int) -> dict[str, str] | None:
    """The step's saved digests, or None when it has no `digest` item."""
    if not (epath.Path(mngr.directory) / str(step) / DIGEST_ITEM).is_dir():
        logging.warning("checkpoint step %d in %s has no array digests: its arrays are restored unverified",
                        step, mngr.directory)
        return None
    record = mngr.restore(step, args=ocp.args.Composite(**{DIGEST_ITEM: ocp.args.JsonRestore()}))[DIGEST_ITEM]
    if not isinstance(record, dict) or record.get("algorithm") != DIGEST_ALGORITHM \
            or not isinstance(record.get("arrays"), dict):
        raise ValueError(f"the {DIGEST_ITEM} item is not an {DIGEST_ALGORITHM} digest record")
    return record["arrays"]


def _verify(where: str, restored: dict, saved: dict[str, str] | None) -> None:
    """Raises CheckpointDigestError naming the restored arrays (a subtree of what was saved, e.g.
    {'model': ...}) whose digest differs from (or is missing in) `saved`."""
    if saved is None:
        return
    bad = sorted(name for name, got in array_digests(restored).items() if saved.get(name) != got)
    if bad:
        raise CheckpointDigestError(where, bad)


def save_model(directory: str | epath.Path, step: int, model_vars: dict,
               config: ml_collections.ConfigDict) -> epath.Path:
    """Writes a `model` + `config` checkpoint at `step` (used by `convert`). Raises
    NonFiniteStateError, writing nothing, when a variable holds NaN/Inf."""
    check_finite(model_vars, f"refusing to save the model at step {step}")
    _drop_closed_loop_reports()
    directory = resolve_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=None, enable_async_checkpointing=False, create=True)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        mngr.save(step, args=ocp.args.Composite(**{
            "model": ocp.args.StandardSave(model_vars),
            "config": ocp.args.JsonSave(config_to_json(config)),
            DIGEST_ITEM: ocp.args.JsonSave(_digest_record({"model": model_vars}))}), force=True)
        mngr.wait_until_finished()
    return directory


def _read_only_options() -> ocp.CheckpointManagerOptions:
    # Spelled out: Orbax warns about every option it has to change for a read-only manager.
    return ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)


def latest_step(directory: str | epath.Path) -> int:
    directory = checkpoint_root(directory)
    if not directory.exists():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    options = _read_only_options()
    with ocp.CheckpointManager(directory, options=options) as mngr:
        step = mngr.latest_step()
    if step is None:
        raise FileNotFoundError(f"no complete checkpoint step in {directory}")
    return step


def restore_config(directory: str | epath.Path, step: int | None = None) -> ml_collections.ConfigDict:
    directory = checkpoint_root(directory)
    step = latest_step(directory) if step is None else step
    options = _read_only_options()
    with ocp.CheckpointManager(directory, options=options) as mngr:
        restored = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    return config_from_json(restored.config)


def restore_model_variables(directory: str | epath.Path, step: int, target: dict) -> dict:
    """Restores the `model` item onto `target` (a pure dict of arrays or ShapeDtypeStructs with the
    wanted shardings). Raises CheckpointDigestError naming the arrays that differ from their saved
    digests."""
    options = _read_only_options()
    with ocp.CheckpointManager(checkpoint_root(directory), options=options) as mngr, _quiet_tensorstore():
        restored = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
        _verify(f"checkpoint {mngr.directory} at step {step}", {"model": restored.model},
                _saved_digests(mngr, step))
    return restored.model


def load_model(directory: str | epath.Path, step: int | None = None, *,
               config: ml_collections.ConfigDict | None = None,
               sharding: jax.sharding.Sharding | None = None) -> tuple[nnx.Module, ml_collections.ConfigDict, int]:
    """Rebuilds the model saved in `directory` (latest complete step by default) in eval mode.

    `config` overrides the saved config (its model section must describe the same parameters);
    `sharding` places every variable (default: replicated on the local devices).
    Returns (model, config, step). Raises NonFiniteStateError naming the variables when any holds
    NaN/Inf (embeddings, evaluations and plots of such a model would be NaN).
    """
    directory = checkpoint_root(directory)
    step = latest_step(directory) if step is None else step
    config = restore_config(directory, step) if config is None else config
    graphdef, abstract_state = nnx.split(abstract_model(config))
    if sharding is None:
        mesh = jax.sharding.Mesh(np.array(jax.local_devices()), ("data",))
        sharding = jax.sharding.NamedSharding(mesh, jax.P())
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(abstract_state))
    variables = restore_model_variables(directory, step, target)
    check_finite(variables, f"refusing to use the checkpoint {directory} at step {step}")
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

    ckpt_cfg: `config.checkpoint` (every_steps, keep, async_save). The manager's save policy owns
    the interval: `save(step)` without `force` saves the multiples of `every_steps` (none when it is
    0) and a step the preemption notifier reached; the final save needs `force=True`.
    """
    _drop_closed_loop_reports()  # a failed background save's (see there)
    cfg = ckpt_cfg if ckpt_cfg is not None else ml_collections.ConfigDict()
    every = int(cfg.get("every_steps", 1000) or 0)
    keep = cfg.get("keep", None)
    if read_only:
        options = _read_only_options()
    else:
        # Spelled out: Orbax's default policy would also save the first step of a fresh run.
        policies: list[ocp.checkpoint_managers.SaveDecisionPolicy] = [
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy()]
        if every > 0:
            policies.append(ocp.checkpoint_managers.FixedIntervalPolicy(every))
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
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
        DIGEST_ITEM: ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(resolve_path(directory), options=options, item_handlers=handlers)


def save_training(mngr: ocp.CheckpointManager, step: int, *, model_vars: dict, opt_vars: dict,
                  config: ml_collections.ConfigDict, data_state: IteratorSnapshot | None = None,
                  force: bool = False) -> bool:
    """Saves model, optimizer, config, the arrays' digests and (when given) the data iterator state at
    `step`.

    Returns whether a save was started (False off the save interval unless `force`). Asynchronous
    when the manager is: call `mngr.wait_until_finished()` before exiting. Every training save passes
    here, so this is where a non-finite state is refused (NonFiniteStateError, nothing written). A
    previous save that failed in the background raises CheckpointSaveError naming its own step.
    """
    if not (force or mngr.should_save(step)):
        return False
    wait_for_saves(mngr)  # Orbax's `save` would wait too, and report that failure as this step's
    state = {"model": model_vars, "opt": opt_vars}
    check_finite(state, f"refusing to save training step {step}")
    items = {"model": ocp.args.StandardSave(model_vars),
             "opt": ocp.args.StandardSave(opt_vars),
             "config": ocp.args.JsonSave(config_to_json(config)),
             DIGEST_ITEM: ocp.args.JsonSave(_digest_record(state))}
    if data_state is not None:
        items["data"] = grain.checkpoint.CheckpointSave(data_state)
    with _save_errors(mngr, step):
        return mngr.save(step, args=ocp.args.Composite(**items), force=force)


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (synchronously or in Orbax's background thread)."""


@contextlib.contextmanager
def _save_errors(mngr: ocp.CheckpointManager, step: int | None = None) -> Iterator[None]:
    """Turns any error of a checkpoint write into one CheckpointSaveError naming the directory."""
    try:
        yield
    except CheckpointSaveError:
        raise
    except Exception as e:
        what = f"step {step}" if step is not None else "a checkpoint"
        raise CheckpointSaveError(f"saving {what} in {mngr.directory} failed: {type(e).__name__}: {e}") from e


def check_save_errors(mngr: ocp.CheckpointManager) -> None:
    """Raises CheckpointSaveError when an asynchronous save has failed in the background (Orbax only
    reports it when asked: without this the loop would train on until the next save)."""
    # Orbax's finalize thread consumes the checkpointer's error (so `check_for_errors` misses it) and keeps
    # it until `wait_until_finished`, which returns at once when no save is in progress.
    if not mngr.is_saving_in_progress():
        wait_for_saves(mngr)


def wait_for_saves(mngr: ocp.CheckpointManager) -> None:
    """`mngr.wait_until_finished()`, a failed save raised as CheckpointSaveError naming its step."""
    # The step a save in flight (or one that failed) was started for is the manager's latest until
    # `wait_until_finished` drops a failed one.
    with _save_errors(mngr, mngr.latest_step()):
        mngr.wait_until_finished()


def close_manager(mngr: ocp.CheckpointManager, *, after_error: bool) -> None:
    """`mngr.close()` (it waits for a save in flight), a failed save raised as CheckpointSaveError.

    With `after_error` (the run is already stopping on an error, often that very save's) a failure
    here is logged instead: raised from a `finally`, it would replace the error being reported.
    """
    try:
        with _save_errors(mngr):
            mngr.close()
    except CheckpointSaveError as e:
        if not after_error:
            raise
        logging.warning("while stopping: %s", e)


def restore_training(mngr: ocp.CheckpointManager, step: int, *, model_target: dict, opt_target: dict,
                     with_data: bool = True) -> tuple[dict, dict, IteratorSnapshot | None]:
    """Restores (model_vars, opt_vars, data snapshot) of `step` onto the targets (pure dicts of
    ShapeDtypeStructs carrying concrete NamedShardings: Orbax cannot restore onto an AbstractMesh).

    The data snapshot is None when `with_data` is False or the step has no `data` item. A step
    written by a different number of processes restores the data position they agreed on (see the
    module docstring; `data_state_for_process_count`). Raises CheckpointDigestError naming the arrays
    that differ from the digests saved with the step.
    """
    items = dict(model=ocp.args.StandardRestore(model_target), opt=ocp.args.StandardRestore(opt_target))
    snapshot = None
    data_dir = epath.Path(mngr.directory) / str(step) / "data"
    if with_data and data_dir.exists():
        index, count = jax.process_index(), jax.process_count()
        if (data_dir / _state_file(index, count)).exists():
            snapshot = IteratorSnapshot()
            items["data"] = grain.checkpoint.CheckpointRestore(snapshot)
        else:  # written by another process count: read the files directly
            snapshot = IteratorSnapshot(data_state_for_process_count(data_dir, count))
    with _quiet_tensorstore():
        restored = mngr.restore(step, args=ocp.args.Composite(**items))
        _verify(f"checkpoint step {step} in {mngr.directory}", {"model": restored.model, "opt": restored.opt},
                _saved_digests(mngr, step))
    return restored.model, restored.opt, snapshot


class CheckpointRestoreError(RuntimeError):
    """No step of a training checkpoint directory restores completely; says what to delete."""


CORRUPT_SUBDIR = "corrupt_checkpoints"  # beside `checkpoints/`: steps a resume skipped, kept for inspection


def step_problem(directory: str | epath.Path, step: int) -> str | None:
    """Why training step `step` under `directory` is visibly incomplete (an empty step directory, a
    missing item or array manifest, a missing or unreadable data iterator file), or None. Damage
    inside the array files only shows when they are read and checked against the step's digests
    (`restore_newest_training`)."""
    d = epath.Path(directory) / str(step)
    if not d.is_dir():
        return "the step directory is missing"
    if not any(d.iterdir()):
        return "the step directory is empty"
    for item in ("model", "opt", "config"):
        if not (d / item).is_dir():
            return f"item '{item}' is missing"
    for item in ("model", "opt"):
        for name in ("manifest.ocdbt", "_METADATA"):
            if not (d / item / name).exists():
                return f"{item}/{name} is missing"
    data = d / "data"
    if data.is_dir():  # a step without `data` is legal: the data order then restarts
        own = data / _state_file(jax.process_index(), jax.process_count())
        files = [own] if own.exists() else sorted(f for f in data.iterdir() if _STATE_FILE_RE.match(f.name))
        if not files:
            return "data/ holds no data iterator state (process_<i>-of-<n>.json)"
        for f in files:
            try:
                json.loads(f.read_text())
            except (OSError, ValueError) as e:
                return f"data/{f.name} is not a readable data iterator state ({e})"
    return None


def _one_line(e: BaseException, limit: int = 160) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def restore_newest_training(mngr: ocp.CheckpointManager, *, model_target: dict, opt_target: dict,
                            check_config: Callable[[ml_collections.ConfigDict, int], None] | None = None
                            ) -> tuple[int, dict, dict, IteratorSnapshot | None, list[tuple[int, str]]] | None:
    """Restores the newest step of `mngr` that restores completely, its arrays matching their saved
    digests, walking back over damaged ones (one log line each, when set aside).

    Returns (step, model_vars, opt_vars, data snapshot, [(skipped step, why), ...]) or None when the
    directory holds no step. Skipped steps are moved to `../corrupt_checkpoints/` (so the run can
    write those steps again). `check_config(saved_config, step)` may refuse a step's config by
    raising: that error propagates (a changed config is not damage). Raises CheckpointRestoreError
    naming every step and what to delete when no step restores.
    """
    steps = sorted(mngr.all_steps(), reverse=True)
    if not steps:
        return None
    root = epath.Path(mngr.directory)
    skipped: list[tuple[int, str]] = []
    for step in steps:
        reason = step_problem(root, step)
        if reason is None:
            try:
                with _quiet_tensorstore():
                    saved = mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
                saved = config_from_json(saved)
            except Exception as e:
                reason = f"the config item cannot be read ({_one_line(e)})"
        if reason is None:
            if check_config is not None:
                check_config(saved, step)
            try:
                model_vars, opt_vars, snapshot = restore_training(mngr, step, model_target=model_target,
                                                                  opt_target=opt_target)
            except CheckpointDigestError as e:
                reason = e.reason
            except Exception as e:
                reason = f"restoring it failed ({_one_line(e)})"
        if reason is not None:
            skipped.append((step, reason))
            continue
        if skipped:
            _set_aside(mngr, skipped)
        return step, model_vars, opt_vars, snapshot, skipped
    listing = "; ".join(f"step {s}: {why}" for s, why in skipped)
    paths = " ".join(os.fspath(root / str(s)) for s, _ in skipped)
    if len(skipped) == 1:
        raise CheckpointRestoreError(f"checkpoint step {skipped[0][0]} in {root} cannot be restored ({skipped[0][1]}) "
                                     f"and there is no earlier step: delete {paths} to start this run from scratch")
    raise CheckpointRestoreError(f"no checkpoint step in {root} restores ({listing}): delete {paths} to start this "
                                 "run from scratch")


def _set_aside(mngr: ocp.CheckpointManager, skipped: list[tuple[int, str]]) -> None:
    """Moves damaged step directories out of the Orbax root (process 0, one log line per step; the others
    wait for it). `skipped`: [(step, why), ...]."""
    root = epath.Path(mngr.directory)
    if jax.process_index() == 0:
        dest = root.parent / CORRUPT_SUBDIR
        dest.mkdir(parents=True, exist_ok=True)
        for step, why in skipped:
            target, n = dest / str(step), 1
            while target.exists():
                target, n = dest / f"{step}.{n}", n + 1
            (root / str(step)).rename(target)
            logging.warning("checkpoint step %d in %s is damaged (%s): moved to %s", step, root, why, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        multihost_utils.sync_global_devices("eao_jax: damaged checkpoint steps set aside")
    mngr.reload()


_STATE_FILE_RE = re.compile(r"^process_(\d+)-of-(\d+)\.json$")


def _state_file(index: int, count: int) -> str:
    return f"process_{index}-of-{count}.json"  # grain's Orbax handler's name


def data_state_for_process_count(data_dir: str | epath.Path, process_count: int) -> dict:
    """The data iterator state of a checkpoint's `data` item whose files were written by a
    different number of processes than `process_count`.

    The training pipeline's state is the number of global batches read, the same in every
    process's file, so it carries over to any process count. Raises ValueError naming the files
    when they are incomplete, from mixed process counts, unreadable or not identical.
    """
    data_dir = epath.Path(data_dir)
    found: dict[int, dict[int, epath.Path]] = {}
    for f in data_dir.iterdir():
        m = _STATE_FILE_RE.match(f.name)
        if m:
            found.setdefault(int(m.group(2)), {})[int(m.group(1))] = f
    if not found:
        raise ValueError(f"{data_dir}: no data iterator state (process_<i>-of-<n>.json) in the checkpoint")
    if process_count in found:
        raise ValueError(f"{data_dir}: holds states written by {process_count} processes; restore them with "
                         "grain's handler")
    if len(found) > 1:
        raise ValueError(f"{data_dir}: data iterator states from several process counts ({sorted(found)})")
    (old_count, files), = found.items()
    missing = sorted(set(range(old_count)) - set(files))
    if missing:
        raise ValueError(f"{data_dir}: the data iterator states of processes {missing} of {old_count} are missing")
    states = []
    for i in range(old_count):
        try:
            states.append(json.loads(files[i].read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{files[i]}: unreadable data iterator state ({e})") from None
    differ = [files[i].name for i in range(1, old_count) if states[i] != states[0]]
    if differ:
        raise ValueError(
            f"{data_dir}: the checkpoint was written by {old_count} processes whose data iterator states differ "
            f"({files[0].name} vs {', '.join(differ)}), so the data position cannot be carried over to "
            f"{process_count} processes. Resume with {old_count} processes, or delete {data_dir} to restart "
            "the data order from the beginning (the model and optimizer still resume).")
    logging.warning("%s: data iterator state written by %d processes, resumed by %d: every process resumes "
                    "at the same global batch (%s).", data_dir, old_count, process_count, states[0])
    return states[0]
