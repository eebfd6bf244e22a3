"""Evaluation reports: results JSON (the schemas below), fixed-width tables, recall@K plot.

Retrieval JSON:
  {"task", "checkpoint", "step", "num_queries", "complete_dataset_size",
   "metrics": {"t2v": {"R1", "R5", "R10", "R50", "MedR", "MeanR", "geometric_mean_R1-R5-R10"}, ...}}
Localisation JSON:
  {"task", "checkpoint", "step", "num_videos", "settings": {...},
   "metrics": {"recall": mean, "per_task": {task: recall}}}   (per_task only for CrossTask; percent)
  CrossTask adds "averaged_over": [tasks in the mean] and, when some of the tasks to average (the 18
  primary ones) have no video, "missing_tasks": [those tasks].
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eao_jax.evaluation.retrieval import DIRECTIONS, MAIN_DIRECTIONS, RECALL_KS

TABLE_COLUMNS: tuple[str, ...] = ("R1", "R5", "R10", "R50", "MedR", "MeanR")


def retrieval_results(
    task: str,
    metrics: Mapping[str, Mapping[str, float]],
    num_queries: int,
    complete_dataset_size: int | None = None,
    checkpoint: str | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The retrieval results dict: metrics as returned by `compute_all_retrieval_metrics`."""
    if not metrics:
        raise ValueError("no retrieval metrics to report")
    for direction, m in metrics.items():
        missing = [c for c in TABLE_COLUMNS if c not in m]
        if missing:
            raise ValueError(f"metrics of direction {direction!r} lack {missing}")
    if complete_dataset_size is None:
        complete_dataset_size = num_queries
    return _to_jsonable(
        {
            "task": task,
            "checkpoint": checkpoint,
            "step": step,
            "num_queries": int(num_queries),
            "complete_dataset_size": int(complete_dataset_size),
            "metrics": {d: dict(m) for d, m in metrics.items()},
        }
    )


def localisation_results(
    task: str,
    summary: Mapping[str, Any],
    checkpoint: str | None = None,
    step: int | None = None,
) -> dict[str, Any]:
    """The localisation results dict from `evaluate_localisation` / `crosstask_recall` /
    `mining_youtube_recall` output (recall in percent, optional per_task and settings)."""
    if "recall" not in summary:
        raise ValueError(f"localisation summary has no 'recall' (keys: {sorted(summary)})")
    metrics: dict[str, Any] = {"recall": summary["recall"]}
    if "per_task" in summary:
        metrics["per_task"] = dict(summary["per_task"])
    num_videos = summary.get("num_videos")
    if isinstance(num_videos, Mapping):
        num_videos = sum(num_videos.values())
    out = {
        "task": task,
        "checkpoint": checkpoint,
        "step": step,
        "num_videos": num_videos,
        "settings": dict(summary.get("settings", {})),
        "metrics": metrics,
    }
    for key in ("averaged_over", "missing_tasks"):  # which tasks the CrossTask mean covers
        if key in summary:
            out[key] = list(summary[key])
    return _to_jsonable(out)


def write_results_json(path: str | os.PathLike, results: Mapping[str, Any]) -> None:
    """Write results as indented JSON (creates the parent folder). NaN/inf are rejected."""
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_to_jsonable(results), f, indent=2, allow_nan=False)
        f.write("\n")


def read_results_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a results JSON written by `write_results_json`; names the file on malformed content."""
    try:
        with open(path) as f:
            results = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({e})") from e
    if not isinstance(results, dict) or "task" not in results or "metrics" not in results:
        raise ValueError(f"{os.fspath(path)}: not a results file (needs 'task' and 'metrics')")
    return results


def format_retrieval_table(
    metrics: Mapping[str, Mapping[str, float]],
    directions: Sequence[str] | None = None,
    columns: Sequence[str] = TABLE_COLUMNS,
) -> str:
    """Fixed-width table: one row per direction (DIRECTIONS order by default), one column per metric."""
    if directions is None:
        directions = [d for d in DIRECTIONS if d in metrics] + [d for d in metrics if d not in DIRECTIONS]
    name_w = max([len("direction")] + [len(d) for d in directions])
    col_w = max(8, *(len(c) for c in columns))
    lines = ["direction".ljust(name_w) + "".join(c.rjust(col_w) for c in columns)]
    lines.append("-" * len(lines[0]))
    for d in directions:
        if d not in metrics:
            raise KeyError(f"no metrics for direction {d!r}")
        lines.append(d.ljust(name_w) + "".join(_fmt(metrics[d].get(c)).rjust(col_w) for c in columns))
    return "\n".join(lines)


def format_localisation_table(results_or_summary: Mapping[str, Any]) -> str:
    """Fixed-width table of per-task recall (if any) and the mean; accepts a results dict or a summary."""
    m = results_or_summary.get("metrics", results_or_summary)
    per_task = m.get("per_task", {})
    name_w = max([len("mean"), len("task")] + [len(str(t)) for t in per_task])
    lines = ["task".ljust(name_w) + "recall".rjust(10), "-" * (name_w + 10)]
    for t, r in per_task.items():
        lines.append(str(t).ljust(name_w) + _fmt(r).rjust(10))
    lines.append("mean".ljust(name_w) + _fmt(m["recall"]).rjust(10))
    missing = results_or_summary.get("missing_tasks")
    if missing:  # a partial CrossTask: say what the mean covers
        n = len(results_or_summary.get("averaged_over", ()))
        lines.append(f"(mean over the {n} of {n + len(missing)} tasks present; no video for {len(missing)})")
    return "\n".join(lines)


def plot_recall_at_k(
    path: str | os.PathLike,
    metrics: Mapping[str, Mapping[str, float]] | None = None,
    curves: Mapping[str, np.ndarray] | None = None,
    directions: Sequence[str] = MAIN_DIRECTIONS,
    title: str | None = None,
) -> None:
    """Write a PNG of recall@K for the main directions (matplotlib, Agg canvas; no pyplot state).

    Either `curves` ({direction: (K_max,) recall@1..K_max in percent, see `recall_at_k_curve`}) drawn as
    lines, or `metrics` (as in the results JSON) drawn as grouped bars at K = 1, 5, 10, 50. Directions
    absent from the given data are skipped; none present is an error.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if (metrics is None) == (curves is None):
        raise ValueError("give exactly one of `metrics` (bars at K=1/5/10/50) or `curves` (recall@1..K)")
    source = curves if curves is not None else metrics
    present = [d for d in directions if d in source]
    if not present:
        raise ValueError(f"none of the directions {list(directions)} is in the data ({sorted(source)})")

    fig = Figure(figsize=(6.4, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if curves is not None:
        for d in present:
            c = np.asarray(curves[d], dtype=np.float64)
            if c.ndim != 1 or c.size == 0:
                raise ValueError(f"recall curve of {d!r} must be a non-empty 1-D array, got shape {c.shape}")
            ax.plot(np.arange(1, c.size + 1), c, label=d)
        ax.set_xlabel("K")
    else:
        width = 0.8 / len(present)
        x = np.arange(len(RECALL_KS))
        for i, d in enumerate(present):
            vals = [float(metrics[d][f"R{k}"]) for k in RECALL_KS]
            ax.bar(x + (i - (len(present) - 1) / 2) * width, vals, width, label=d)
        ax.set_xticks(x)
        ax.set_xticklabels([f"R@{k}" for k in RECALL_KS])
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 100)
    ax.grid(True, alpha=0.3)
    ax.legend()
    if title:
        ax.set_title(title)
    save_png(fig, path)


def save_png(fig, path: str | os.PathLike) -> None:
    """Lays out `fig` and writes it as a PNG at `path`, creating the folder."""
    fig.tight_layout()
    parent = os.path.dirname(os.fspath(path))
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(os.fspath(path), format="png")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{float(v):.2f}"


def _to_jsonable(x: Any) -> Any:
    """Plain Python types (numpy scalars/arrays become float/int/list); NaN/inf rejected."""
    if isinstance(x, Mapping):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _to_jsonable(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        f = float(x)
        if not math.isfinite(f):
            raise ValueError(f"non-finite value {f} cannot go into the results JSON")
        return f
    if x is None or isinstance(x, str):
        return x
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    raise TypeError(f"cannot put a {type(x).__name__} into the results JSON")
