"""Training: state, sharded step and the sectioned loop behind `python -m eao_jax.main`.

State representation (one choice, used everywhere): a `TrainState` NNX module holding the model
and its `nnx.Optimizer`, split once into a static `graphdef` and an `nnx.State` pytree
`{"model": Params + BatchStats, "opt": {"step", "opt_state"}}`. The jitted step is a pure
function `(state, batch) -> (state, metrics)` that merges, differentiates with
`nnx.value_and_grad` (Params only; `jax.value_and_grad` fails on the RNG state), updates with
`nnx.Optimizer.update(model, grads)` and splits again; the state argument is donated. Checkpoints
store `nnx.to_pure_dict` of the two halves as the `model` and `opt` items (checkpoint.py), so
`model` has exactly the layout of a converted checkpoint.

Loop sections (`train_and_evaluate`; functions sharing one `_Run` record, in file order):
`_setup` (mesh, data, abstract state + shardings, checkpoint manager) -> `_restore_or_init`
(newest complete checkpoint, else init_from or a sharded init) -> `_start` (config.json, metrics
logger, stop flag, device prefetch) -> `_iterate` (async dispatch; metrics fetched every
`train.log_every` steps; next batch placed on the devices while the step runs; checkpoints when the
manager's save policy of `checkpoint.every_steps` says so; `_evaluate_if_due`; SIGTERM /
preemption) -> `_save_final` -> `_finish` (final evaluation). The host-side helpers (prefetcher,
stop flag, metric window) are in train_host.py.

Numerics: parameters and optimizer state are float32; `model.dtype="bfloat16"` makes the matmuls
and convolutions bf16 (the model casts), the loss is computed in float32 on the embeddings.
A step whose loss, gradient or updated state is not finite leaves the whole state unchanged on
device and reports `finite=0`; the host stops the run at the next metrics fetch (or before the next
checkpoint) with a `NonFiniteLossError`. Independently, every save (periodic, final, SIGTERM /
preemption) goes through `checkpoint.save_training`, which refuses a state holding NaN/Inf, so no
non-finite state is ever saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from flax import nnx

from eao_jax import checkpoint as ckpt
from eao_jax import evaluators, parallel
from eao_jax.config_utils import (
    RESUME_MAY_CHANGE,
    ConfigError,
    check_batch_against_model,
    resolve_epoch_steps,
    resume_differences,
    validate_config,
)
from eao_jax.loss import combinatorial_loss
from eao_jax.metrics_log import MetricsLogger
from eao_jax.model.eao import EverythingAtOnce
from eao_jax.train_host import DevicePrefetcher, MetricWindow, PrefetchedBatch, StopFlag
from eao_jax.workdir_lock import WorkdirLock

CHECKPOINT_SUBDIR = "checkpoints"
RESULTS_SUBDIR = "results"


class NonFiniteLossError(ckpt.NonFiniteStateError):
    """The loss, gradient or updated state became NaN/inf; the run stopped without saving that state."""


# ------------------------------------------------------------------------------------------------
# Optimizer


def learning_rate_schedule(train_cfg: ml_collections.ConfigDict) -> optax.Schedule:
    """lr * lr_decay ** (step // steps_per_epoch): the paper's per-epoch ExponentialLR (staircase)."""
    spe = int(train_cfg.steps_per_epoch)
    if spe < 1:
        raise ConfigError(f"train.steps_per_epoch must be resolved to a positive integer, got {spe}")
    return optax.exponential_decay(float(train_cfg.lr), transition_steps=spe,
                                   decay_rate=float(train_cfg.lr_decay), staircase=True)


def make_optimizer(train_cfg: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Adam (no weight decay, no clipping, no warm-up) with the per-epoch decay."""
    return optax.adam(learning_rate_schedule(train_cfg), b1=float(train_cfg.b1), b2=float(train_cfg.b2),
                      eps=float(train_cfg.eps))


# ------------------------------------------------------------------------------------------------
# State


class TrainState(nnx.Module):
    """The model and its optimizer (Adam moments over the nnx.Params; BatchStats are not optimised)."""

    def __init__(self, model: EverythingAtOnce, tx: optax.GradientTransformation):
        self.model = model
        self.opt = nnx.Optimizer(model, tx, wrt=nnx.Param)


def create_train_state(config: ml_collections.ConfigDict) -> TrainState:
    """A freshly initialised TrainState (call under jit with out_shardings for a sharded init)."""
    model = EverythingAtOnce(config.model, rngs=nnx.Rngs(int(config.seed)))
    return TrainState(model, make_optimizer(config.train))


def abstract_train_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, state of ShapeDtypeStructs): shapes first, nothing allocated."""
    return nnx.split(nnx.eval_shape(lambda: create_train_state(config)))


def state_shardings(abstract_state: nnx.State, mesh: jax.sharding.Mesh,
                    config: ml_collections.ConfigDict) -> nnx.State:
    """NamedShardings of the train state under the mesh rules of `parallel` (FSDP when configured)."""
    return parallel.state_shardings(abstract_state, mesh, config.mesh)


def init_train_state(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                     ) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """Sharded initialisation: every device creates only its shards. Returns (graphdef, state, shardings)."""
    graphdef, abstract = abstract_train_state(config)
    shardings = state_shardings(abstract, mesh, config)
    state = jax.jit(lambda: nnx.state(create_train_state(config)), out_shardings=shardings)()
    return graphdef, state, shardings


def model_from_state(graphdef: nnx.GraphDef, state: nnx.State, *, train: bool = False) -> EverythingAtOnce:
    """The model (sharing the state's arrays) in eval mode (or train mode)."""
    model = nnx.merge(graphdef, state).model
    if train:
        model.train()
    else:
        model.eval()
    return model


def _pure(state: nnx.State) -> dict:
    return nnx.to_pure_dict(state)


def _targets(abstract: nnx.State, shardings: nnx.State) -> dict:
    """Pure-dict restore targets (ShapeDtypeStructs with concrete NamedShardings: Orbax cannot restore
    onto an AbstractMesh)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        _pure(abstract), _pure(shardings))


def _fill(abstract: nnx.State, pure: Mapping) -> nnx.State:
    state = jax.tree.map(lambda x: x, abstract)  # a fresh State object to fill
    nnx.replace_by_pure_dict(state, pure)
    return state


# ------------------------------------------------------------------------------------------------
# The train step


def make_train_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, graphdef: nnx.GraphDef,
                    shardings: nnx.State, *, donate: bool = True) -> Callable:
    """The jitted step `(state, batch) -> (state, metrics)`.

    batch: {video (B, Nv, Dv), video_mask (B, Nv), text (B, Nt, Dt), text_mask (B, Nt),
    audio (B, 40, T), audio_mask (B, T), [audio_STFT_nframes (B,)]}, global arrays sharded over
    `data` (B = the global batch; the contrastive terms use all of it).
    metrics: replicated float32 scalars: loss, every loss term and its valid count (`{term}_count`),
    grad_norm, lr (of this step) and finite (1 when the update was applied, 0 when skipped).
    The model runs in train mode (BatchNorm batch statistics) unless `train.use_eval_mode_always`.
    """
    loss_cfg = config.loss
    schedule = learning_rate_schedule(config.train)
    eval_mode = bool(config.train.get("use_eval_mode_always", False))

    def step(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, jax.Array]]:
        # The model pins its activations to the `data` axis (layers.shard_batch); that needs the mesh
        # visible while tracing, or GSPMD may gather the global batch onto every device.
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return _step(state, batch)

    def _step(state: nnx.State, batch: dict[str, jax.Array]) -> tuple[nnx.State, dict[str, jax.Array]]:
        # The raw arrays of the incoming state: merge shares Variable objects with `state`, and the
        # forward pass (BatchNorm) and the optimizer update those in place.
        old_leaves = jax.tree.leaves(state)
        ts = nnx.merge(graphdef, state)
        if eval_mode:  # fine-tuning as the original: frozen BatchNorm running statistics
            ts.model.eval()
        else:  # BatchNorm: batch statistics, running statistics updated
            ts.model.train()

        def loss_fn(model):
            loss, info = combinatorial_loss(model(batch), loss_cfg)
            return loss, info

        (loss, info), grads = nnx.value_and_grad(loss_fn, has_aux=True)(ts.model)
        grad_norm = optax.tree.norm(grads)
        lr = schedule(ts.opt.step[...])
        ts.opt.update(ts.model, grads)
        new_state, finite = _keep_if_finite(nnx.state(ts), old_leaves, loss, grad_norm)
        metrics = {k: v.astype(jnp.float32) for k, v in info.items() if k != "total"}
        metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                       lr=jnp.asarray(lr, jnp.float32), finite=finite.astype(jnp.float32))
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


def _keep_if_finite(new_state: nnx.State, old_leaves: list[jax.Array], loss: jax.Array,
                    grad_norm: jax.Array) -> tuple[nnx.State, jax.Array]:
    """(`new_state`, True) when the loss, the gradient norm and every updated leaf are finite, else
    (the state of `old_leaves`, False): the whole update (params, moments, BatchNorm statistics, step)
    is skipped. Traced inside the step."""
    new_leaves, treedef = jax.tree.flatten(new_state)
    # A finite loss and gradient can still give a non-finite update (an absurd learning rate or
    # optimizer state), so the updated state itself is checked too.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    for leaf in new_leaves:
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            finite &= jnp.isfinite(leaf).all()
    kept = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in zip(new_leaves, old_leaves, strict=True)])
    return kept, finite


# ------------------------------------------------------------------------------------------------
# Data and evaluation hooks


def prepare_config(config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
    """Fills run-dependent defaults in place: the synthetic dataset, when `data.data_dir` is unset,
    lives in WORKDIR/data (prepared there on first use). Returns `config`."""
    if config.data.data_dir is None and config.data.dataset == "synthetic":
        config.data.data_dir = os.fspath(ckpt.resolve_path(workdir) / "data")
    # Saved with the checkpoints, where `evaluate` and `attention` read them: absolute, so that they
    # work from any directory.
    for section in ("data", "eval"):
        d = config[section].get("data_dir") if section in config else None
        if d:
            config[section].data_dir = os.fspath(ckpt.resolve_path(d))
    if config.get("init_from"):
        config.init_from = os.fspath(ckpt.resolve_path(config.init_from))
    if config.data.data_dir is None:
        raise ConfigError(f"data.data_dir: not set (the TFDS data_dir of the prepared {config.data.dataset!r} "
                          "dataset, see `python -m eao_jax.prepare`)")
    return config


def make_train_data(config: ml_collections.ConfigDict) -> tuple[Any, int]:
    """(this process's training iterator, number of training videos of the split).

    The iterator (eao_jax.data.pipelines, a checkpointable grain iterator) yields host batches of
    `videos_per_batch / process_count * clips_per_video` clips.
    """
    from eao_jax.data import pipelines  # noqa: PLC0415 (heavy import, only when training)
    from eao_jax.prepare import prepare_once  # noqa: PLC0415

    prepare_once(config.data.dataset, config.data.data_dir, config.data.get("tfds_config"))
    ds = pipelines.open_dataset(config.data.dataset, config.data.data_dir, config.data.get("tfds_config"))
    # Items of the split from its metadata: a chunked HowTo split has more records than videos.
    n_videos = ds.num_examples(config.data.get("split") or "train")
    return pipelines.make_train_iterator(config), n_videos


def format_eval(task: str, results: Mapping[str, Any]) -> str:
    """The printed table of one evaluation result."""
    del task  # the results name their task
    return evaluators.format_results(results)


def run_evaluations(model: EverythingAtOnce, config: ml_collections.ConfigDict, workdir: str,
                    step: int, tasks: tuple[str, ...] | None = None, *, final: bool = True) -> dict[str, dict]:
    """Zero-shot evaluation of `model` (eval mode) on the named entries `tasks` of config.eval.tasks
    (default: all of them).

    Writes WORKDIR/results/<name>.json (final) or WORKDIR/results/step_<step>/<name>.json
    (periodic), the schema of eao_jax/evaluation/report.py, plus the evaluator's recall@K plot, and returns
    {name: results}. Runs on every process (the evaluation is collective); process 0 writes.
    """
    tasks = tuple(evaluators.entries(config)) if tasks is None else tasks
    if not tasks:
        return {}
    out_dir = os.path.join(workdir, RESULTS_SUBDIR) if final else os.path.join(workdir, RESULTS_SUBDIR,
                                                                                 f"step_{step}")
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
    results = {}
    for task in tasks:
        results[task] = evaluators.run(model, config, task, step=step, checkpoint=str(_checkpoint_dir(workdir)),
                                       output=os.path.join(out_dir, f"{task}.json"))
    return results


# ------------------------------------------------------------------------------------------------
# The loop


@dataclasses.dataclass
class TrainResult:
    step: int  # last step reached (and saved)
    status: str  # "finished" | "preempted"
    last_metrics: dict[str, float]
    eval_results: dict[str, dict]


def _checkpoint_dir(workdir: str) -> epath.Path:
    return ckpt.resolve_path(workdir) / CHECKPOINT_SUBDIR


def resolve_init_from(path: str) -> tuple[epath.Path, int]:
    """A checkpoint root (converter output, or a training workdir) -> (root, latest complete step)."""
    root = ckpt.checkpoint_root(path)
    try:
        step = ckpt.latest_step(root)
    except FileNotFoundError as e:
        raise ConfigError(f"init_from: {e}") from None
    return root, step


def _check_init_from_config(root: epath.Path, step: int, config: ml_collections.ConfigDict) -> None:
    """The init_from checkpoint's parameter shapes must match config.model; names the fields that differ."""
    saved = ckpt.restore_config(root, step)
    ours = jax.tree.map(lambda x: x.shape, ckpt.model_variables(ckpt.abstract_model(config)))
    try:
        theirs = jax.tree.map(lambda x: x.shape, ckpt.model_variables(ckpt.abstract_model(saved)))
    except Exception as e:  # a config the model cannot build
        raise ConfigError(f"init_from: the model config saved in {root} cannot be built: {e}") from None
    if ours != theirs:
        diff = [f"model.{k}: checkpoint {saved.model[k]!r} vs config {config.model[k]!r}"
                for k in config.model.keys() if k in saved.model and saved.model[k] != config.model[k]
                and not isinstance(config.model[k], ml_collections.ConfigDict)]
        for k in config.model.davenet.keys():
            if k in saved.model.get("davenet", {}) and saved.model.davenet[k] != config.model.davenet[k]:
                diff.append(f"model.davenet.{k}: checkpoint {saved.model.davenet[k]!r} vs config "
                            f"{config.model.davenet[k]!r}")
        raise ConfigError(f"init_from={root}: the checkpoint's parameters do not match config.model ("
                          + ("; ".join(diff) or "parameter shapes differ") + ")")


def total_steps(config: ml_collections.ConfigDict) -> int:
    t = config.train
    return int(t.num_steps) if t.num_steps > 0 else int(t.epochs) * int(t.steps_per_epoch)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       progress_bar: bool = True) -> TrainResult:
    """Trains per `config` in `workdir` (resuming from its newest complete checkpoint), then evaluates.

    Raises ConfigError (before anything is compiled) for bad configs and for a resume whose config
    differs from the checkpoint's in a field that must not change, WorkdirLockedError when another
    training holds the workdir, CheckpointRestoreError when no checkpoint step restores,
    NonFiniteLossError when the loss diverges (nothing non-finite is saved).
    """
    validate_config(config, n_devices=jax.device_count(), process_count=jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    # Process 0 holds the lock for the job (every process of one job shares the workdir).
    lock = WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext()
    with lock:
        return _train_and_evaluate(config, workdir, progress_bar=progress_bar)


def _check_resume_config(config: ml_collections.ConfigDict, workdir: str) -> Callable:
    def check(saved: ml_collections.ConfigDict, step: int) -> None:
        diffs = resume_differences(saved, config)
        if diffs:
            first = diffs[0].split(":")[0]
            raise ConfigError(
                f"{first}: the config differs from the one checkpoint step {step} in {_checkpoint_dir(workdir)} "
                f"was written with ({'; '.join(diffs)}). A resumed run must keep these fields (it may change "
                f"{', '.join(p.rstrip('.') + ('.*' if p.endswith('.') else '') for p in RESUME_MAY_CHANGE)}): "
                "use the checkpoint's values, or another --workdir for a new run")
    return check


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                        progress_bar: bool = True) -> TrainResult:
    run = _setup(config, workdir)
    try:
        step, state, resume_msg = _restore_or_init(run)
    except BaseException:
        ckpt.close_manager(run.mngr, after_error=True)
        raise
    _start(run, step, resume_msg, progress_bar=progress_bar)
    train_step = make_train_step(config, run.mesh, run.graphdef, run.shardings)
    failed = True
    try:
        step, state, status = _iterate(run, train_step, step, state)
        _save_final(run, step, state, status)
        failed = False
    except BaseException:
        run.logger.close()
        raise
    finally:
        run.prefetch.close()
        run.stop.restore()
        ckpt.close_manager(run.mngr, after_error=failed)  # waits for a save in flight
    return _finish(run, step, state, status)


@dataclasses.dataclass
class _Run:
    """What the loop sections share. `_setup` fills the first block, `_start` the logger and the
    prefetcher; the last block changes as the loop runs."""

    config: ml_collections.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    graphdef: nnx.GraphDef
    abstract: nnx.State  # the train state's ShapeDtypeStructs
    shardings: nnx.State
    train_iter: Any  # this process's checkpointable data iterator
    num_steps: int
    clips_per_step: int
    mngr: ocp.CheckpointManager
    stop: StopFlag = dataclasses.field(default_factory=StopFlag)
    window: MetricWindow = dataclasses.field(default_factory=MetricWindow)
    logger: MetricsLogger | None = None
    prefetch: DevicePrefetcher | None = None
    last_saved: int | None = None  # the newest step saved (or resumed from)
    last_avg: dict[str, float] = dataclasses.field(default_factory=dict)  # the last logged metric averages
    data_state: Any = None  # the iterator state after the last batch the state has consumed


# --------------------------------------------------------------------------- Setup


def _setup(config: ml_collections.ConfigDict, workdir: str) -> _Run:
    """Mesh, data, the abstract state and its shardings, the checkpoint manager: nothing allocated."""
    mesh = parallel.make_mesh(config.mesh)
    logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size, jax.process_count())
    train_iter, n_videos = make_train_data(config)
    resolve_epoch_steps(config, n_videos)  # train.steps_per_epoch / every_steps = -1 of evaluations: from the data
    graphdef, abstract = abstract_train_state(config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["model"]))
    logging.info("Model: %.2f M parameters and statistics.", n_params / 1e6)
    return _Run(config=config, workdir=workdir, mesh=mesh, graphdef=graphdef, abstract=abstract,
                shardings=state_shardings(abstract, mesh, config), train_iter=train_iter,
                num_steps=total_steps(config),
                clips_per_step=config.data.videos_per_batch * config.data.clips_per_video,
                mngr=ckpt.training_manager(_checkpoint_dir(workdir), config.checkpoint))


# --------------------------------------------------------------------------- Restore or init


def _restore_or_init(run: _Run) -> tuple[int, nnx.State, str]:
    """(start step, state, resume message) from the newest checkpoint step that restores completely
    (damaged newer ones are skipped and set aside), else from `init_from` or a fresh sharded init.
    A restored data iterator state is set on `run.train_iter`."""
    restored = ckpt.restore_newest_training(
        run.mngr, model_target=_targets(run.abstract["model"], run.shardings["model"]),
        opt_target=_targets(run.abstract["opt"], run.shardings["opt"]),
        check_config=_check_resume_config(run.config, run.workdir))
    if restored is None:
        return _init(run)
    start_step, model_vars, opt_vars, snapshot, skipped = restored
    state = _fill(run.abstract, {"model": model_vars, "opt": opt_vars})
    msg = f"resumed from {_checkpoint_dir(run.workdir)}/{start_step}"
    if snapshot is None:
        msg += " (no data iterator state in the checkpoint: the data order restarts)"
    else:
        run.train_iter.set_state(snapshot.state)
        run.data_state = snapshot.state
    if skipped:
        msg += (" after skipping damaged newer steps (" + "; ".join(f"step {s}: {why}" for s, why in skipped)
                + f"; moved to {ckpt.resolve_path(run.workdir) / ckpt.CORRUPT_SUBDIR})")
    return start_step, state, msg


def _init(run: _Run) -> tuple[int, nnx.State, str]:
    """A fresh sharded state at step 0; with `init_from`, its model variables from that checkpoint."""
    _, state, _ = init_train_state(run.config, run.mesh)
    if not run.config.init_from:
        return 0, state, "initialised from scratch"
    root, step = resolve_init_from(run.config.init_from)
    _check_init_from_config(root, step, run.config)
    pure = _pure(state)
    pure["model"] = ckpt.restore_model_variables(root, step, _targets(run.abstract["model"], run.shardings["model"]))
    return 0, _fill(run.abstract, pure), f"model initialised from {root}/{step} (fresh optimizer)"


def _start(run: _Run, start_step: int, resume_msg: str, *, progress_bar: bool) -> None:
    """Writes config.json, opens the metrics logger, installs the stop flag and starts the prefetcher."""
    is_main = jax.process_index() == 0
    if is_main:  # under the workdir lock and after the resume check: never another run's record
        with open(os.path.join(run.workdir, "config.json"), "w") as f:
            f.write(json.dumps(ckpt.config_to_json(run.config), indent=1) + "\n")
    run.last_saved = start_step if run.mngr.latest_step() is not None else None
    run.logger = MetricsLogger(run.workdir, run.num_steps, start_step, enabled=is_main, progress_bar=progress_bar)
    run.logger.log_event(start_step, resume_msg, num_steps=run.num_steps, global_batch=run.clips_per_step,
                         mesh=dict(run.mesh.shape))
    if not jax.distributed.is_initialized():  # else JAX's preemption notifier owns SIGTERM (StopFlag)
        run.stop.install()
    run.prefetch = DevicePrefetcher(run.train_iter, run.mesh, size=max(int(run.config.data.get("prefetch", 2)), 1))


# --------------------------------------------------------------------------- Iterate


def _iterate(run: _Run, train_step: Callable, step: int, state: nnx.State) -> tuple[int, nnx.State, str]:
    """Steps from `step` to `train.num_steps` (or a stop request). Returns (step, state, status), the
    status "finished" or "preempted" (that step then saved). Dispatch is asynchronous: the host only
    waits on the devices to fetch metrics, save or evaluate."""
    first = True
    while step < run.num_steps:
        item = _next_batch(run, step, first=first)
        t_start = time.perf_counter()
        state, metrics = train_step(state, item.batch)
        ckpt.check_save_errors(run.mngr)  # a failed background save stops the run now
        step += 1
        run.data_state = item.data_state
        run.window.add(step, metrics, item.wait_s)
        run.logger.advance()
        if first:
            _log_first_step(run, step, metrics, t_start)
            first = False
        if _after_step(run, step, state):
            return step, state, "preempted"
    return step, state, "finished"


def _next_batch(run: _Run, step: int, *, first: bool) -> PrefetchedBatch:
    try:
        item = next(run.prefetch)
    except StopIteration:
        raise RuntimeError(f"the training data ran out at step {step} of {run.num_steps}") from None
    if first:  # a mismatch of data and model config is named here, not in a tracing error
        check_batch_against_model({k: v.shape for k, v in item.batch.items()}, run.config)
    return item


def _log_first_step(run: _Run, step: int, metrics: dict[str, jax.Array], t_start: float) -> None:
    jax.block_until_ready(metrics)
    took = time.perf_counter() - t_start
    run.logger.log_event(step, f"first step (compilation included) took {took:.1f} s")
    run.window.t0 = time.perf_counter()  # throughput excludes compilation
    run.logger.start_timing()  # and so does the progress bar's ETA


def _after_step(run: _Run, step: int, state: nnx.State) -> bool:
    """Metrics, preemption, periodic checkpoint and evaluation after `step`. True when the run stops
    (a stop request: that step was saved)."""
    preempted = run.stop.is_set() or run.mngr.reached_preemption(step)
    if step % run.config.train.log_every == 0 or step == run.num_steps:
        _check_window(run)
    if preempted:
        _save(run, step, state, force=True)
        ckpt.wait_for_saves(run.mngr)
        run.logger.log_event(step, f"stop requested ({run.stop.signal_name or 'preemption'}): saved step {step}")
        return True
    # The manager's save policy (checkpoint.every_steps, checkpoint.training_manager) decides; asking
    # first runs the metric check (a device sync) only before a save that happens.
    if run.mngr.should_save(step):
        _save(run, step, state, force=False)
    _evaluate_if_due(run, step, state)
    return False


def _check_window(run: _Run) -> None:
    """Fetches and logs the metric window; raises NonFiniteLossError at its first skipped step."""
    if not len(run.window):
        return
    last_step = run.window.steps[-1]
    avg, bad = run.window.fetch(run.clips_per_step)
    if bad is not None:
        raise _non_finite(run, *bad)
    run.last_avg = avg
    run.logger.log_train(last_step, avg)


def _non_finite(run: _Run, bad_step: int, m: dict[str, float]) -> NonFiniteLossError:
    terms = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in ("finite", "lr"))
    where = (f"the last checkpoint is step {run.last_saved} in {_checkpoint_dir(run.workdir)}"
             if run.last_saved is not None else "no checkpoint was saved")
    what = ("loss or gradient" if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
            else "update (parameters or optimizer state after a finite gradient)")
    msg = (f"non-finite {what} at step {bad_step} ({terms}); the update was skipped "
           f"and training stops: {where}. Lower train.lr or check the data and init_from.")
    run.logger.log_event(bad_step, "stopped: " + msg)
    return NonFiniteLossError(msg)


def _save(run: _Run, step: int, state: nnx.State, *, force: bool) -> None:
    """Saves `step` with the data iterator state after its batch; `force` bypasses the save policy."""
    _check_window(run)  # a skipped (non-finite) step stops the run before anything after it is saved
    snapshot = ckpt.IteratorSnapshot(run.data_state) if run.data_state is not None else None
    if ckpt.save_training(run.mngr, step, model_vars=_pure(state["model"]), opt_vars=_pure(state["opt"]),
                          config=run.config, data_state=snapshot, force=force):
        run.last_saved = step


def _evaluate_if_due(run: _Run, step: int, state: nnx.State) -> None:
    """The periodic evaluations (each eval.tasks entry's every_steps; the last step's are the final
    ones, in `_finish`)."""
    due = evaluators.due(run.config, step) if step != run.num_steps else ()
    if due:
        _check_window(run)  # close the throughput window before the (blocking) evaluation
        results = run_evaluations(model_from_state(run.graphdef, state), run.config, run.workdir, step, due,
                                  final=False)
        for task, res in results.items():
            run.logger.log_eval(step, task, res.get("metrics", res))
        run.window.t0 = time.perf_counter()


# --------------------------------------------------------------------------- Finish


def _save_final(run: _Run, step: int, state: nnx.State, status: str) -> None:
    """The last step, saved unless the policy or a stop request already did; waits for every save."""
    _check_window(run)
    if status == "finished" and run.last_saved != step:
        _save(run, step, state, force=True)
    ckpt.wait_for_saves(run.mngr)


def _finish(run: _Run, step: int, state: nnx.State, status: str) -> TrainResult:
    """The final evaluation (eval.at_end, finished runs only), then the logger is closed."""
    run.logger.close_bar()
    eval_results: dict[str, dict] = {}
    if status == "finished" and run.config.eval.get("at_end", True) and run.config.eval.tasks:
        eval_results = run_evaluations(model_from_state(run.graphdef, state), run.config, run.workdir, step)
        for task, res in eval_results.items():
            run.logger.log_eval(step, task, res.get("metrics", res))
    run.logger.log_event(step, f"done ({status})")
    run.logger.close()
    return TrainResult(step=step, status=status, last_metrics=run.last_avg, eval_results=eval_results)
