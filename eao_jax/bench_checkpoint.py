r"""Checkpoint integrity benchmark: what the array digests add to a training save and restore.

  python -m eao_jax.bench_checkpoint --config=configs/howto100m.py [--fraction=0.125] [--dir=DIR]

Builds the training state the config describes (model parameters and statistics, Adam moments and
counters: `train.abstract_train_state`), filled with random values on one local device. Where the
whole state does not fit the machine, `--fraction` keeps its largest arrays up to that share of its
bytes (every cost measured streams over each byte once, so it scales with the bytes). Then, best of
`--repeats`, in fresh step directories under `--dir` (default: a temporary directory):

  digest_s             checkpoint.array_digests of the state (digest_compile_s: the first call, with
                       its compilation, once per run)
  orbax_save_s         Orbax alone: the model and opt items saved, until the save is finished
  save_s               checkpoint.save_training (finite check, digests, config), until finished
  orbax_restore_s      Orbax alone: the model and opt items restored
  restore_s            checkpoint.restore_training (the digests verified)

The last stdout line is one JSON object with these, measured_bytes, state_bytes (the whole state),
digest_gb_per_s, and *_full_s: each time scaled linearly to the whole state.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from eao_jax.lazy import lazy_import

# Imported on first use, so that `--help` answers without loading JAX / Flax / Orbax.
jax = lazy_import("jax")
nnx = lazy_import("flax.nnx")
ocp = lazy_import("orbax.checkpoint")
ckpt = lazy_import("eao_jax.checkpoint")
config_utils = lazy_import("eao_jax.config_utils")
train = lazy_import("eao_jax.train")


def _nested(flat: dict[tuple, Any]) -> dict:
    out: dict = {}
    for path, x in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = x
    return out


def random_state(config: ml_collections.ConfigDict, fraction: float, device: Any,
                 seed: int = 0) -> tuple[dict, int, int]:
    """({'model': ..., 'opt': ...} of random arrays on `device`, measured bytes, whole-state bytes): the
    largest arrays of the config's training state up to `fraction` of its bytes."""
    _, abstract = train.abstract_train_state(config)
    leaves = [(tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path), x)
              for path, x in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract))[0]]
    total = sum(x.size * x.dtype.itemsize for _, x in leaves)
    rng = np.random.default_rng(seed)
    chosen, measured = {}, 0
    for path, x in sorted(leaves, key=lambda p: -p[1].size * p[1].dtype.itemsize):
        if measured >= fraction * total:
            break
        value = (rng.standard_normal(x.shape, np.float32).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
                 else np.zeros(x.shape, x.dtype))
        chosen[path] = jax.device_put(value, device)
        measured += x.size * x.dtype.itemsize
    state = _nested(chosen)
    state.setdefault("opt", {})  # a fraction may keep model arrays only
    return state, measured, total


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(config: ml_collections.ConfigDict, *, fraction: float, directory: str, repeats: int) -> dict[str, Any]:
    config = config_utils.complete_config(config)
    # An epoch of one batch: the learning-rate schedule does not shape the state.
    config = config_utils.resolve_epoch_steps(config, config.data.videos_per_batch)
    device = jax.local_devices()[0]
    state, measured, total = random_state(config, fraction, device)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    res: dict[str, Any] = {"device_kind": device.device_kind, "fraction": fraction, "measured_bytes": measured,
                           "state_bytes": total, "arrays": len(jax.tree.leaves(state)), "repeats": repeats}
    t0 = time.perf_counter()
    ckpt.array_digests(state)
    res["digest_compile_s"] = time.perf_counter() - t0
    res["digest_s"] = _best(lambda: ckpt.array_digests(state), repeats)

    orbax = ocp.CheckpointManager(f"{directory}/orbax", options=ocp.CheckpointManagerOptions(create=True))
    ours = ckpt.training_manager(f"{directory}/ours", ml_collections.ConfigDict({"every_steps": 0, "keep": None}))
    steps = iter(range(1, 10**6))

    def orbax_save() -> None:
        orbax.save(next(steps), args=ocp.args.Composite(model=ocp.args.StandardSave(state["model"]),
                                                         opt=ocp.args.StandardSave(state["opt"])))
        orbax.wait_until_finished()

    def save() -> None:
        ckpt.save_training(ours, next(steps), model_vars=state["model"], opt_vars=state["opt"], config=config,
                           force=True)
        ckpt.wait_for_saves(ours)

    res["orbax_save_s"] = _best(orbax_save, repeats)
    res["save_s"] = _best(save, repeats)
    restore_args = ocp.args.Composite(model=ocp.args.StandardRestore(target["model"]),
                                      opt=ocp.args.StandardRestore(target["opt"]))
    res["orbax_restore_s"] = _best(lambda: orbax.restore(orbax.latest_step(), args=restore_args), repeats)
    res["restore_s"] = _best(lambda: ckpt.restore_training(ours, ours.latest_step(), model_target=target["model"],
                                                           opt_target=target["opt"]), repeats)
    orbax.close()
    ours.close()
    res["digest_gb_per_s"] = measured / res["digest_s"] / 1e9
    for key in ("digest_s", "orbax_save_s", "save_s", "orbax_restore_s", "restore_s"):
        res[key.removesuffix("_s") + "_full_s"] = res[key] * total / measured
    return res


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections), e.g. configs/howto100m.py.",
                                          lock_config=True)
_FRACTION = flags.DEFINE_float("fraction", 1.0, "Share of the state's bytes measured (its largest arrays).")
_DIR = flags.DEFINE_string("dir", None, "Where the checkpoints are written (default: a temporary directory).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Repetitions of each measurement (the fastest counts).")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not 0 < _FRACTION.value <= 1:
        raise app.UsageError(f"--fraction={_FRACTION.value} must be in (0, 1]")
    from eao_jax import console  # noqa: PLC0415

    console.quiet_libraries()
    with tempfile.TemporaryDirectory(dir=_DIR.value) as directory:
        res = run(_CONFIG.value, fraction=_FRACTION.value, directory=directory, repeats=_REPEATS.value)
    gb = res["measured_bytes"] / 1e9
    print(f"{gb:.2f} GB of {res['state_bytes'] / 1e9:.2f} GB: digests {res['digest_s']:.2f} s "
          f"({res['digest_gb_per_s']:.2f} GB/s; first call {res['digest_compile_s']:.2f} s); save "
          f"{res['save_s']:.2f} s vs Orbax alone {res['orbax_save_s']:.2f} s; restore {res['restore_s']:.2f} s vs "
          f"Orbax alone {res['orbax_restore_s']:.2f} s", file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    from eao_jax import console  # noqa: PLC0415

    console.run("bench_checkpoint", main)
