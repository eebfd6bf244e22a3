r"""Training entry point.

  python -m eao_jax.main --config=configs/demo.py --workdir=/tmp/eao_demo
  python -m eao_jax.main --config=configs/howto100m.py --workdir=gs://bucket/eao \
      --config.data.data_dir=gs://bucket/tfds [--config.x=y ...]

The config file is an ml_collections `get_config()`; `--config.x=y` overrides any field (the
config is locked: an unknown field is an error). Fields a config file leaves out take the
defaults of the schema, `eao_jax.defaults.reference_config()`.

Sections: distributed init -> config check -> (train.train_and_evaluate:) mesh -> data -> abstract
init -> sharded init or restore (newest complete checkpoint in WORKDIR/checkpoints, else
`init_from`, else random) -> loop -> final save -> final evaluation.

WORKDIR receives checkpoints/ (Orbax: model, opt, config, data per step), metrics.jsonl,
tensorboard/, config.json and results/<task>.json. Rerunning the same command resumes.
SIGTERM (or a first Ctrl-C) saves a checkpoint at the current step and exits with status 0; a Ctrl-C
outside the training loop, or a second one, stops at once (exit status 130).
Exit status 1 with a one-line message for config errors, non-finite losses and any other error (the
traceback with --verbosity=1 or EAO_TRACEBACK=1; eao_jax.console).

Multi-process (one process per host, or per GPU): start the same command in every process with
the coordinator settings of `eao_jax.distributed` (--coordinator_address / --num_processes /
--process_id, the EAO_* variables, SLURM or Cloud TPU detection; see launch/). WORKDIR must be
one shared directory (all processes write their checkpoint shards there). Every process reads its
block of each global batch (the global batches are those of a 1-process run with the same config),
process 0 alone writes metrics.jsonl, TensorBoard, config.json, results and the console output.
SIGTERM under jax.distributed: JAX's preemption notifier (started by jax.distributed.initialize)
catches it in whichever process receives it and tells the coordination service, which picks a
step all processes will reach; at that step `CheckpointManager.reached_preemption` is true in
every process, they save it together and exit with status 0 ("preempted"). Ctrl-C is not handled
specially in a multi-process run. A run may resume with another device or process count (model
and optimizer state are resharded; the data position carries over, see eao_jax.checkpoint).
"""

from __future__ import annotations

import logging as py_logging
import sys

from absl import app, flags, logging

from eao_jax import console, distributed
from eao_jax.workdir_lock import WorkdirLockedError

_CONFIG = console.define_config_file("config", "Training config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, results. Resumes if it holds "
                               "checkpoints.")
_PROGRESS = flags.DEFINE_boolean("progress_bar", True, "Console progress bar (else a log line per log_every).")
flags.mark_flags_as_required(["config", "workdir"])
distributed.define_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    console.quiet_libraries()  # library INFO logs (Orbax, TFDS) drown the progress bar
    # ------------------------------------------------------------------- Distributed init (first JAX call)
    info = distributed.initialize_from_flags()

    from eao_jax import checkpoint, config_utils, train  # noqa: PLC0415 (after distributed init)

    workdir = _WORKDIR.value
    try:
        config = config_utils.complete_config(_CONFIG.value)
        config = train.prepare_config(config, workdir)
        result = train.train_and_evaluate(config, workdir, progress_bar=_PROGRESS.value)  # writes config.json
    except config_utils.ConfigError as e:
        _fail(f"Config error: {e}")
    except checkpoint.NonFiniteStateError as e:  # train.NonFiniteLossError included
        _fail(f"Training stopped: {e}")
    except checkpoint.CheckpointSaveError as e:
        _fail(f"Training stopped: {e}")
    except (WorkdirLockedError, checkpoint.CheckpointRestoreError) as e:
        _fail(f"Training refused: {e}")
    if info.is_main:
        for task, res in result.eval_results.items():
            print(train.format_eval(task, res))
        logging.info("Run %s at step %d.", result.status, result.step)
        print(f"{result.status} at step {result.step}; workdir {workdir}")


def _fail(line: str) -> None:
    """Ends the command with `line` on stderr in one write: Orbax / TensorStore threads may still be
    printing at exit, and a separate newline write would let their output into the line. The failed
    save's asyncio tasks would then log a page of tracebacks each at exit: the line has said it."""
    py_logging.getLogger("asyncio").setLevel(py_logging.CRITICAL)
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.exit(1)


if __name__ == "__main__":
    console.run("main", main, interrupted="rerun the same command to resume from the newest complete checkpoint in "
                "its workdir (or to start over without one)")
