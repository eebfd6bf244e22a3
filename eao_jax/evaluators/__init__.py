"""Zero-shot evaluators: a registry of evaluation kinds, run on named config entries.

A config declares its evaluations in `eval.tasks`, `{name: {setting: value}}`: each entry names a
task of `defaults.EVAL_TASKS` (its key, or a `task` setting) and may change the settings of its
type (`defaults.EVAL_SETTINGS`: every_steps, batch_size, tfds_config, and the type's own, e.g. a
retrieval `strategy` or a localisation `decoder`). The type picks the module that runs it:

  retrieval      eao_jax.evaluators.retrieval      R@k of the 18 directions over a retrieval split
  localisation   eao_jax.evaluators.localisation   step localisation recall per task

Both share `eao_jax.evaluators.embedder` (the one cached eval forward, sharded over a `data` mesh,
gathered over processes). Every process runs an evaluation (it is collective); process 0 writes
RESULTS.json (schema: eao_jax/evaluation/report.py) and, for retrieval, RESULTS.png.

  entries(config)                   -> {name: complete settings}
  check(config)                     raises ValueError naming the entry and setting
  due(config, step)                 names whose every_steps divides `step`
  run(model, config, name, ...)     one entry -> results dict (training's hook and the CLI)
  evaluate(model, task, ...)        one task with keyword settings (the Python API)
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Mapping
from types import ModuleType
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from eao_jax import defaults

if TYPE_CHECKING:
    import jax

    from eao_jax.model.eao import EverythingAtOnce

# Evaluation type -> the module that runs it (imported on first use: checking a config loads no JAX).
KINDS = {"retrieval": "eao_jax.evaluators.retrieval", "localisation": "eao_jax.evaluators.localisation"}
RELEASED_DATASETS = ("msrvtt", "youcook2", "crosstask", "mining_youtube")
BACKBONE_CONFIGS = {dim: name for name, dim in defaults.VIDEO_DIMS.items()}  # builder config by video width


@dataclasses.dataclass(frozen=True)
class EvalContext:
    """What an evaluator needs besides the model and its entry."""

    data_dir: str | os.PathLike
    tfds_config: str | None  # the builder config to read (resolved)
    max_words: int  # text tokens per caption / step (data.max_words)
    clip: Mapping[str, int]  # eval.clip: one training-length clip {n_video_tokens, n_stft}
    at_once: Mapping[str, Mapping[str, int]]  # eval.at_once: {dataset: {n_video_tokens, n_stft}}
    mesh: jax.sharding.Mesh | None = None
    checkpoint: str | None = None  # recorded in the results
    step: int | None = None


def kind(name: str) -> ModuleType:
    """The evaluator module of an evaluation type."""
    if name not in KINDS:
        raise ValueError(f"unknown evaluation type {name!r}; known: {', '.join(KINDS)}")
    return importlib.import_module(KINDS[name])


def entries(config: ml_collections.ConfigDict) -> dict[str, ml_collections.ConfigDict]:
    """{name: complete settings} of config.eval.tasks, by name (a ConfigDict keeps its keys sorted)."""
    tasks = config.get("eval", {}).get("tasks") or {}
    return {name: defaults.eval_entry(name, settings) for name, settings in tasks.items()}


def check(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming eval.tasks.<name>.<setting> for an entry that cannot run."""
    for name, entry in entries(config).items():
        where = f"eval.tasks.{name}."
        every = entry.every_steps
        if isinstance(every, bool) or not isinstance(every, int) or every < -1:
            raise ValueError(f"{where}every_steps must be >= 0 (0: only at the end) or -1 (every epoch), "
                             f"got {every!r}")
        if isinstance(entry.batch_size, bool) or not isinstance(entry.batch_size, int) or entry.batch_size < 1:
            raise ValueError(f"{where}batch_size must be a positive integer, got {entry.batch_size!r}")
        kind(entry.type).check(entry, where)


def due(config: ml_collections.ConfigDict, step: int) -> tuple[str, ...]:
    """The entries to run after `step` during training (every_steps resolved to a positive number)."""
    return tuple(name for name, e in entries(config).items() if e.every_steps > 0 and step % e.every_steps == 0)


def default_tfds_config(entry: ml_collections.ConfigDict, model: EverythingAtOnce,
                        config: ml_collections.ConfigDict | None = None) -> str | None:
    """The builder config an entry reads when it names none: the training one when it evaluates the
    training dataset, for the released datasets the one whose features match the model's video
    width (resnet 4096, s3d 1024, clip 512), else the prepared default (None)."""
    data = config.get("data", {}) if config is not None else {}
    if data and data.get("dataset") == entry.dataset and data.get("tfds_config"):
        return data.get("tfds_config")
    if entry.dataset not in RELEASED_DATASETS or "video" not in model.modalities:
        return None
    return BACKBONE_CONFIGS.get(model.input_dims["video"])


def data_dir_from_config(config: ml_collections.ConfigDict) -> str | None:
    """The TFDS data_dir a (checkpoint's) config names: eval.data_dir, else data.data_dir."""
    ev, data = config.get("eval", {}), config.get("data", {})
    return (ev.get("data_dir") if ev else None) or (data.get("data_dir") if data else None)


def context(model: EverythingAtOnce, entry: ml_collections.ConfigDict, config: ml_collections.ConfigDict | None,
            **kw: Any) -> EvalContext:
    """The EvalContext of an entry under `config` (None: the schema's defaults); `kw` sets
    data_dir, mesh, checkpoint, step."""
    ref = defaults.reference_config()
    config = ref if config is None else config
    ev = config.get("eval", {})
    data_dir = kw.pop("data_dir", None) or data_dir_from_config(config)
    if not data_dir:
        raise ValueError("eval.data_dir (or data.data_dir) must name the prepared datasets")
    tfds = entry.tfds_config if entry.tfds_config is not None else default_tfds_config(entry, model, config)
    return EvalContext(data_dir=data_dir, tfds_config=tfds,
                       max_words=int(config.get("data", ref.data).get("max_words", ref.data.max_words)),
                       clip=dict(ev.get("clip", ref.eval.clip)), at_once=dict(ev.get("at_once", ref.eval.at_once)),
                       **kw)


def run_entry(model: EverythingAtOnce, entry: ml_collections.ConfigDict, config: ml_collections.ConfigDict | None,
              *, output: str | os.PathLike | None = None, print_table: bool = False, **kw: Any) -> dict[str, Any]:
    """Runs one complete entry; process 0 writes `output` (JSON, and the PNG for retrieval) and
    prints the table when asked. `kw`: see `context`."""
    from eao_jax import distributed  # noqa: PLC0415

    ctx = context(model, entry, config, **kw)
    results = kind(entry.type).evaluate(model, entry, ctx)
    ranks = results.pop("_ranks", None)
    if distributed.is_main_process():
        if output is not None:
            write_outputs(output, results, ranks)
        if print_table:
            print(format_results(results))
    return results


def run(model: EverythingAtOnce, config: ml_collections.ConfigDict, name: str, **kw: Any) -> dict[str, Any]:
    """Runs the entry `name` of config.eval.tasks (training's hook). `kw`: see `run_entry`."""
    return run_entry(model, entries(config)[name], config, **kw)


def evaluate(model: EverythingAtOnce, task: str, *, config: ml_collections.ConfigDict | None = None,
             data_dir: str | os.PathLike | None = None, mesh: jax.sharding.Mesh | None = None,
             checkpoint: str | None = None, step: int | None = None, output: str | os.PathLike | None = None,
             print_table: bool = False, **settings: Any) -> dict[str, Any]:
    """Evaluates `model` on `task` (a key of defaults.EVAL_TASKS) with `settings` (those of its type:
    batch_size, tfds_config, strategy / embedding, decoder, log_softmax, convention) and returns the
    results dict. `config` (the model's run config) supplies data.max_words, eval.clip / at_once
    and, without `data_dir`, the data_dir."""
    entry = defaults.eval_entry(task, settings, where=f"{task}: ")
    kind(entry.type).check(entry, f"{task}: ")
    return run_entry(model, entry, config, output=output, print_table=print_table, data_dir=data_dir, mesh=mesh,
                     checkpoint=checkpoint, step=step)


def write_outputs(output: str | os.PathLike, results: Mapping[str, Any],
                  ranks: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Writes RESULTS.json and, for retrieval, RESULTS.png (recall@1..50 of the main directions
    present). Returns the PNG path (or None)."""
    from eao_jax.evaluation import report  # noqa: PLC0415
    from eao_jax.evaluation import retrieval as ret_lib  # noqa: PLC0415

    report.write_results_json(output, results)
    if "num_queries" not in results:
        return None
    png = os.path.splitext(os.fspath(output))[0] + ".png"
    present = [d for d in ret_lib.MAIN_DIRECTIONS if d in results["metrics"]]
    if not present:
        return None
    title = f"{results['task']} ({results.get('settings', {}).get('strategy', '')})"
    if ranks is not None:
        n = int(results["complete_dataset_size"])
        curves = {d: ret_lib.recall_at_k_curve(ranks[d], n, max_k=min(50, n)) for d in present}
        report.plot_recall_at_k(png, curves=curves, directions=present, title=title)
    else:
        report.plot_recall_at_k(png, metrics=results["metrics"], directions=present, title=title)
    return png


def format_results(results: Mapping[str, Any]) -> str:
    """The printed summary: header line plus the retrieval or localisation table."""
    from eao_jax.evaluation import report  # noqa: PLC0415

    s = results.get("settings", {})
    head = f"{results['task']}  checkpoint={results.get('checkpoint')}  step={results.get('step')}"
    if "num_queries" in results:
        head += (f"  strategy={s.get('strategy')}  evaluated {results['num_queries']} of "
                 f"{results['complete_dataset_size']}")
        return head + "\n" + report.format_retrieval_table(results["metrics"])
    head += (f"  videos={results.get('num_videos')}  embedding={s.get('embedding')}  decoder={s.get('decoder')}"
             f"  log_softmax={s.get('log_softmax')}")
    return head + "\n" + report.format_localisation_table(results)
