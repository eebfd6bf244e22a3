r"""Zero-shot evaluation of an Orbax checkpoint on one task (the evaluators of eao_jax/evaluators).

  python -m eao_jax.evaluate --task=youcook2 --checkpoint=DIR [--data_dir=TFDS_DIR] [--step=N] \
      [--output=RESULTS.json] [--batch_size=16] [--tfds_config=resnet|s3d|clip|tiny|default] \
      [--strategy=at_once|clip|nearest|max_pool|clips_average]                       (retrieval) \
      [--embedding=v+a|va] [--decoder=dp|argmax|argmax_step|argmax_frame] [--convention=per_video|pooled]

Tasks: msrvtt, youcook2, synthetic (retrieval: all 18 directions, R@k over the complete split;
MSR-VTT 1000, YouCook2 3350, items the release lacks count as misses); crosstask, mining_youtube,
synthetic_localization (step localisation recall per task and the mean). Settings left out take the
defaults of the task's type; the "at once" lengths (MSR-VTT 48 video tokens / 3072 STFT frames,
YouCook2 72 / 4608) come from the checkpoint config's eval.at_once.

The checkpoint is restored read-only, the model runs in eval mode (BatchNorm running statistics),
replicated, with each batch sharded over a 1-D `data` mesh of all devices. Under jax.distributed every
process embeds its share; process 0 prints the table and writes RESULTS.json and, for retrieval,
RESULTS.png (recall@K of t2v, t2va, t2v+a).
"""

from __future__ import annotations

import os

from absl import app, flags

from eao_jax import defaults, distributed

FLAGS = flags.FLAGS
# Flags that are settings of an evaluation entry: passed on only when given, so that a setting the
# task's type lacks (say --strategy for crosstask) is refused by name.
SETTING_FLAGS = ("batch_size", "tfds_config", "strategy", "embedding", "decoder", "log_softmax", "convention")


def define_flags() -> None:
    ret, loc = defaults.EVAL_SETTINGS["retrieval"], defaults.EVAL_SETTINGS["localisation"]
    flags.DEFINE_enum("task", None, list(defaults.EVAL_TASKS), "What to evaluate.")
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (training workdir/checkpoints or convert "
                        "output).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the prepared dataset (default: the checkpoint "
                        "config's eval.data_dir or data.data_dir).")
    flags.DEFINE_string("output", None, "Results JSON (a recall@K PNG is written next to it for retrieval).")
    flags.DEFINE_string("tfds_config", None, "Builder config of the dataset (resnet | s3d | clip; synthetic: tiny | "
                        "default). Default: the training one for the training dataset; for the released datasets "
                        "the one matching model.video_dim (4096 resnet, 1024 s3d, 512 clip).")
    flags.DEFINE_integer("batch_size", None, f"Items (retrieval, default {ret['batch_size']}) or windows "
                         f"(localisation, default {loc['batch_size']}) per process and step.")
    flags.DEFINE_enum("strategy", None, ["at_once", "clip", "nearest", "max_pool", "clips_average"],
                      f"Retrieval: long-video strategy (default {ret['strategy']}).")
    flags.DEFINE_enum("embedding", None, ["v+a", "va"], f"Localisation: window embedding, late fusion v+a or "
                      f"fused va (default {loc['embedding']}).")
    flags.DEFINE_enum("decoder", None, ["dp", "argmax", "argmax_step", "argmax_frame"], "Localisation: dp "
                      "(ordered, one window per step) or argmax (best step per window); default dp.")
    flags.DEFINE_enum("log_softmax", None, ["auto", "true", "false"], "Localisation: row log-softmax over steps "
                      "before decoding (auto: Mining YouTube only, as MCN).")
    flags.DEFINE_enum("convention", None, ["per_video", "pooled"], "CrossTask task recall: mean of per-video "
                      "recalls, or hits pooled over a task's videos (default per_video).")
    distributed.define_flags()
    flags.mark_flags_as_required(["task", "checkpoint"])


def settings_from_flags() -> dict:
    """The entry settings the command line gives (log_softmax auto -> None)."""
    out = {k: FLAGS[k].value for k in SETTING_FLAGS if FLAGS[k].value is not None}
    if "log_softmax" in out:
        out["log_softmax"] = {"auto": None, "true": True, "false": False}[out["log_softmax"]]
    return out


def main(argv: list[str]) -> None:
    del argv
    from eao_jax import console  # noqa: PLC0415

    console.quiet_libraries()
    distributed.initialize_from_flags()
    import jax  # noqa: PLC0415

    from eao_jax import checkpoint as ckpt  # noqa: PLC0415
    from eao_jax import evaluators  # noqa: PLC0415
    from eao_jax.evaluators.embedder import eval_mesh  # noqa: PLC0415

    # Bad settings fail before the restore.
    entry = defaults.eval_entry(FLAGS.task, settings_from_flags(), where="--")
    evaluators.kind(entry.type).check(entry, "--")
    root = ckpt.checkpoint_root(FLAGS.checkpoint)  # a convert output, WORKDIR/checkpoints or WORKDIR
    mesh = eval_mesh()
    model, config, step = ckpt.load_model(root, FLAGS.step, sharding=jax.NamedSharding(mesh, jax.P()))
    data_dir = FLAGS.data_dir or evaluators.data_dir_from_config(config)
    if not data_dir:
        raise app.UsageError("--data_dir is required (the checkpoint's config names no data_dir)")
    if entry.dataset == "synthetic":  # prepared on demand: by one process first
        from eao_jax.prepare import prepare_once  # noqa: PLC0415

        prepare_once("synthetic", data_dir, entry.tfds_config or evaluators.default_tfds_config(entry, model, config))
    distributed.log_if_main("Evaluating %s step %d on %s over %d devices (%d processes).", FLAGS.checkpoint, step,
                            FLAGS.task, jax.device_count(), jax.process_count())
    evaluators.run_entry(model, entry, config, output=FLAGS.output, print_table=True, data_dir=data_dir, mesh=mesh,
                         checkpoint=os.fspath(root), step=step)
    if distributed.is_main_process() and FLAGS.output:
        print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
    define_flags()
    from eao_jax import console  # noqa: PLC0415

    console.run("evaluate", main)
