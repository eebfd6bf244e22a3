"""Training: state, sharded step and the sectioned loop behind `python -m eao_jax.main`.

State representation (one choice, used everywhere): a `TrainState` NNX module holding the model
and its `nnx.Optimizer`, split once into a static `graphdef` and an `nnx.State` pytree
`{"model": Params + BatchStats, "opt": {"step", "opt_state"}}`. The jitted step is a pure
function `(state, batch) -> (state, metrics)` that merges, differentiates with
`nnx.value_and_grad` (Params only; `jax.value_and_grad` fails on the RNG state), updates with
`nnx.Optimizer.update(model, grads)` and splits again; the state argument is donated. Checkpoints
store `nnx.to_pure_dict` of the two halves as the `model` and `opt` items (checkpoint.py), so
`model` has exactly the layout of a converted checkpoint.

Loop sections (`train_and_evaluate`): setup -> mesh -> data -> abstract init + shardings ->
restore / init_from / sharded init -> compile -> loop (async dispatch; metrics fetched every
`train.log_every` steps; next batch placed on the devices while the step runs; periodic
checkpoints and evaluations; SIGTERM / preemption) -> final save -> final evaluation.

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
import copy
import dataclasses
import json
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
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
        new_leaves, treedef = jax.tree.flatten(nnx.state(ts))
        # A finite loss and gradient can still give a non-finite update (an absurd learning rate or
        # optimizer state), so the updated state itself is checked too.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        for leaf in new_leaves:
            if jnp.issubdtype(leaf.dtype, jnp.inexact):
                finite &= jnp.isfinite(leaf).all()
        # Skip the whole update (params, moments, BatchNorm statistics, step) when non-finite.
        new_state = jax.tree.unflatten(treedef, [jnp.where(finite, n, o) for n, o in
                                                 zip(new_leaves, old_leaves, strict=True)])
        metrics = {k: v.astype(jnp.float32) for k, v in info.items() if k != "total"}
        metrics.update(loss=loss.astype(jnp.float32), grad_norm=grad_norm.astype(jnp.float32),
                       lr=jnp.asarray(lr, jnp.float32), finite=finite.astype(jnp.float32))
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,) if donate else ())


# ------------------------------------------------------------------------------------------------
# Host-side helpers: device prefetch, preemption flag, metric windows


@dataclasses.dataclass
class PrefetchedBatch:
    batch: dict[str, jax.Array]  # global arrays on the devices
    data_state: Any  # the iterator state right after this batch was read
    wait_s: float  # time the consumer waited for it


class DevicePrefetcher:
    """Reads host batches in a background thread and places them on the devices (global arrays),
    keeping up to `size` batches ready, so the host->device copy overlaps the running step.

    Each batch carries the iterator state captured just after it was read: saving that state with
    the model that consumed the batch resumes exactly after it, although the reader runs ahead.
    """

    def __init__(self, iterator: Iterator[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh, size: int = 2,
                 get_state: Callable[[], Any] | None = None):
        self._it = iterator
        self._mesh = mesh
        self._get_state = get_state if get_state is not None else getattr(iterator, "get_state", None)
        self._q: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="device-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for host_batch in self._it:
                state = copy.deepcopy(self._get_state()) if self._get_state is not None else None
                item = (parallel.global_batch(host_batch, self._mesh), state, None)
                while not self._stop.is_set():
                    try:
                        self._q.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final(StopIteration())
        except BaseException as e:  # surfaced in the consumer
            self._put_final(e)

    def _put_final(self, exc: BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._q.put((None, None, exc), timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> DevicePrefetcher:
        return self

    def __next__(self) -> PrefetchedBatch:
        t0 = time.perf_counter()
        batch, state, exc = self._q.get()
        wait = time.perf_counter() - t0
        if exc is not None:
            if isinstance(exc, StopIteration):
                raise StopIteration
            raise RuntimeError(f"the training data pipeline failed: {exc}") from exc
        return PrefetchedBatch(batch, state, wait)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


class StopFlag:
    """Set by SIGTERM (preemption, scancel, docker stop) or a first Ctrl-C: the loop saves and exits.

    Only installed in single-process runs: with jax.distributed, JAX's preemption notifier owns
    SIGTERM (in any process) and the loop asks Orbax's `reached_preemption(step)`, true in every
    process at the same step (chosen by the coordination service); all processes then save that
    step and stop, as here.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.event.is_set():
            raise KeyboardInterrupt  # second Ctrl-C: stop now
        self.signal_name = signal.Signals(signum).name
        self.event.set()

    def is_set(self) -> bool:
        return self.event.is_set()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class MetricWindow:
    """Per-step device metrics kept un-fetched until the next log / checkpoint (no per-step sync)."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.metrics: list[dict[str, jax.Array]] = []
        self.data_wait = 0.0
        self.t0 = time.perf_counter()

    def add(self, step: int, metrics: dict[str, jax.Array], wait_s: float) -> None:
        self.steps.append(step)
        self.metrics.append(metrics)
        self.data_wait += wait_s

    def __len__(self) -> int:
        return len(self.steps)

    def fetch(self, clips_per_step: int) -> tuple[dict[str, float], tuple[int, dict[str, float]] | None]:
        """Fetches and averages the window. Returns (averages, (step, metrics) of the first step
        whose update was skipped as non-finite, or None). Resets the window."""
        host = jax.device_get(self.metrics)
        elapsed = time.perf_counter() - self.t0
        bad = None
        for step, m in zip(self.steps, host, strict=True):
            if m["finite"] < 1:
                bad = (step, {k: float(v) for k, v in m.items()})
                break
        avg = {k: float(np.mean([m[k] for m in host])) for k in host[0]} if host else {}
        n = len(self.steps)
        avg.pop("finite", None)
        if n:
            avg["clips_per_s"] = n * clips_per_step / max(elapsed, 1e-9)
            avg["data_wait"] = self.data_wait / n
            avg["step_time"] = elapsed / n
        self.__init__()
        return avg, bad


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
    n_videos = len(ds.source(config.data.get("split") or "train"))
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
    # --------------------------------------------------------------------------- Setup
    process_index, process_count = jax.process_index(), jax.process_count()
    is_main = process_index == 0

    # --------------------------------------------------------------------------- Mesh
    mesh = parallel.make_mesh(config.mesh)
    logging.info("Mesh %s over %d devices (%d processes).", dict(mesh.shape), mesh.size, process_count)

    # --------------------------------------------------------------------------- Data
    train_iter, n_videos = make_train_data(config)
    resolve_epoch_steps(config, n_videos)  # train.steps_per_epoch / every_steps = -1 of evaluations: from the data
    num_steps = total_steps(config)
    clips_per_step = config.data.videos_per_batch * config.data.clips_per_video

    # --------------------------------------------------------------------------- Model: shapes first
    graphdef, abstract = abstract_train_state(config)
    shardings = state_shardings(abstract, mesh, config)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract["model"]))
    logging.info("Model: %.2f M parameters and statistics.", n_params / 1e6)

    # --------------------------------------------------------------------------- Restore or init
    mngr = ckpt.training_manager(_checkpoint_dir(workdir), config.checkpoint)
    data_state = None
    try:  # the newest step that restores completely; damaged newer ones are skipped and set aside
        restored = ckpt.restore_newest_training(
            mngr, model_target=_targets(abstract["model"], shardings["model"]),
            opt_target=_targets(abstract["opt"], shardings["opt"]), check_config=_check_resume_config(config, workdir))
    except BaseException:
        mngr.close()
        raise
    if restored is not None:
        start_step, model_vars, opt_vars, snapshot, skipped = restored
        state = _fill(abstract, {"model": model_vars, "opt": opt_vars})
        if snapshot is not None:
            train_iter.set_state(snapshot.state)
            data_state = snapshot.state
        resume_msg = f"resumed from {_checkpoint_dir(workdir)}/{start_step}"
        if snapshot is None:
            resume_msg += " (no data iterator state in the checkpoint: the data order restarts)"
        if skipped:
            resume_msg += (" after skipping damaged newer steps (" + "; ".join(f"step {s}: {why}" for s, why in skipped)
                           + f"; moved to {ckpt.resolve_path(workdir) / ckpt.CORRUPT_SUBDIR})")
    else:
        start_step = 0
        _, state, _ = init_train_state(config, mesh)
        resume_msg = "initialised from scratch"
        if config.init_from:
            root, step = resolve_init_from(config.init_from)
            _check_init_from_config(root, step, config)
            model_vars = ckpt.restore_model_variables(root, step, _targets(abstract["model"], shardings["model"]))
            pure = _pure(state)
            pure["model"] = model_vars
            state = _fill(abstract, pure)
            resume_msg = f"model initialised from {root}/{step} (fresh optimizer)"

    if is_main:  # under the workdir lock and after the resume check: never another run's record
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(json.dumps(ckpt.config_to_json(config), indent=1) + "\n")
    logger = MetricsLogger(workdir, num_steps, start_step, enabled=is_main, progress_bar=progress_bar)
    logger.log_event(start_step, resume_msg, num_steps=num_steps, global_batch=clips_per_step,
                     mesh=dict(mesh.shape))
    stop = StopFlag()
    if not jax.distributed.is_initialized():
        stop.install()
    prefetch = DevicePrefetcher(train_iter, mesh, size=max(int(config.data.get("prefetch", 2)), 1))

    train_step = make_train_step(config, mesh, graphdef, shardings)
    window = MetricWindow()
    last_avg: dict[str, float] = {}
    last_saved = start_step if mngr.latest_step() is not None else None
    status = "finished"
    step = start_step

    def check_window() -> None:
        nonlocal last_avg
        if not len(window):
            return
        avg, bad = window.fetch(clips_per_step)
        if bad is not None:
            bad_step, m = bad
            terms = ", ".join(f"{k}={v:.4g}" for k, v in m.items() if k not in ("finite", "lr"))
            where = (f"the last checkpoint is step {last_saved} in {_checkpoint_dir(workdir)}"
                     if last_saved is not None else "no checkpoint was saved")
            what = ("loss or gradient" if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]))
                    else "update (parameters or optimizer state after a finite gradient)")
            msg = (f"non-finite {what} at step {bad_step} ({terms}); the update was skipped "
                   f"and training stops: {where}. Lower train.lr or check the data and init_from.")
            logger.log_event(bad_step, "stopped: " + msg)
            raise NonFiniteLossError(msg)
        last_avg = avg
        logger.log_train(window_last_step, avg)

    def save(step: int, force: bool) -> None:
        nonlocal last_saved
        check_window()
        if ckpt.save_training(mngr, step, model_vars=_pure(state["model"]), opt_vars=_pure(state["opt"]),
                              config=config, data_state=ckpt.IteratorSnapshot(data_state) if data_state is not None
                              else None, force=force):
            last_saved = step

    window_last_step = start_step
    try:
        # ----------------------------------------------------------------------- Loop
        first = True
        while step < num_steps:
            try:
                item = next(prefetch)
            except StopIteration:
                raise RuntimeError(f"the training data ran out at step {step} of {num_steps}") from None
            if first:
                check_batch_against_model({k: v.shape for k, v in item.batch.items()}, config)
                t_compile = time.perf_counter()
            state, metrics = train_step(state, item.batch)
            ckpt.check_save_errors(mngr, last_saved)  # a failed background save stops the run now
            step += 1
            data_state = item.data_state
            window.add(step, metrics, item.wait_s)
            window_last_step = step
            logger.advance()
            if first:
                jax.block_until_ready(metrics)
                took = time.perf_counter() - t_compile
                logger.log_event(step, f"first step (compilation included) took {took:.1f} s")
                window.t0 = time.perf_counter()  # throughput excludes compilation
                logger.start_timing()  # and so does the progress bar's ETA
                first = False

            preempted = stop.is_set() or mngr.reached_preemption(step)
            if step % config.train.log_every == 0 or step == num_steps:
                check_window()
            if preempted:
                save(step, force=True)
                ckpt.wait_for_saves(mngr)
                status = "preempted"
                logger.log_event(step, f"stop requested ({stop.signal_name or 'preemption'}): saved step {step}")
                break
            every_save = int(config.checkpoint.every_steps)
            if step == num_steps or (every_save and step % every_save == 0):
                save(step, force=True)  # the interval is decided here, not by the manager
            due = evaluators.due(config, step) if step != num_steps else ()
            if due:
                check_window()  # close the throughput window before the (blocking) evaluation
                results = run_evaluations(model_from_state(graphdef, state), config, workdir, step, due, final=False)
                for task, res in results.items():
                    logger.log_eval(step, task, res.get("metrics", res))
                window.t0 = time.perf_counter()
        check_window()
        if status == "finished" and last_saved != step:
            save(step, force=True)
        ckpt.wait_for_saves(mngr)
    except BaseException:
        logger.close()
        raise
    finally:
        prefetch.close()
        stop.restore()
        mngr.close()  # waits for a save in flight

    # --------------------------------------------------------------------------- Final evaluation
    logger.close_bar()
    eval_results: dict[str, dict] = {}
    if status == "finished" and config.eval.get("at_end", True) and config.eval.tasks:
        eval_results = run_evaluations(model_from_state(graphdef, state), config, workdir, step)
        for task, res in eval_results.items():
            logger.log_eval(step, task, res.get("metrics", res))
    logger.log_event(step, f"done ({status})")
    logger.close()
    return TrainResult(step=step, status=status, last_metrics=last_avg, eval_results=eval_results)
