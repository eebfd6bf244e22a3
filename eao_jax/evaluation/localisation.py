"""Zero-shot step localisation (CrossTask, Mining YouTube): decoders and recall (numpy, host side).

Protocol (the MCN / CrossTask lineage that the original follows):
- scores: (T, K) similarity between each 1-second window of a video (rows) and each of its K step
  descriptions (columns);
- decoders:
  * 'dp': every step gets exactly one window, steps in their canonical order at strictly increasing
    times, maximising the summed score (CrossTask's `dp(..., exactly_one=True)` on cost = -scores,
    every other window being background at cost 0); needs T >= K;
  * 'argmax_step': each step independently takes its best window (order not enforced);
  * 'argmax_frame': each window is labelled with its best step (MCN's alternative predictor);
  optionally after a row log-softmax over the K steps (MCN does this for Mining YouTube only);
- per-video recall = #(annotated steps hit) / #(steps with any annotation in the video), where a step is
  hit when one of its predicted windows lies inside an annotated window of that step;
- CrossTask: mean per-video recall within a task, then mean over the 18 primary tasks ('per_video', MCN),
  or matches pooled over all videos of a task before dividing ('pooled', Zhukov's CrossTask code, which
  also decodes after a row log-softmax); a dataset holding only some primary tasks is averaged over
  those present, with a warning naming how many of the 18 they are;
- Mining YouTube: mean per-video recall over all videos.
Recall summaries are in percent (0..100), like the retrieval metrics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from absl import logging

from eao_jax.evaluation.retrieval import as_float_matrix

# The 18 annotated "primary" tasks of CrossTask (Zhukov et al., CVPR 2019): the task ids listed in
# crosstask_release/tasks_primary.txt of the CrossTask release (github.com/DmZhukov/CrossTask).
CROSSTASK_PRIMARY_TASKS: tuple[str, ...] = (
    "16815", "23521", "40567", "44047", "44789", "53193", "59684", "71781", "76400",
    "77721", "87706", "91515", "94276", "95603", "105222", "105253", "109972", "113766",
)  # fmt: skip

DECODERS: tuple[str, ...] = ("dp", "argmax_step", "argmax_frame")
CONVENTIONS: tuple[str, ...] = ("per_video", "pooled")


def step_similarity(step_embed: np.ndarray, window_embed: np.ndarray, eps: float = 1e-8) -> np.ndarray:
    """Cosine similarity between windows and steps: step_embed (K, D), window_embed (T, D) -> (T, K)."""
    steps = as_float_matrix(step_embed, "step embeddings")
    windows = as_float_matrix(window_embed, "window embeddings")
    if steps.shape[1] != windows.shape[1]:
        raise ValueError(f"embedding sizes differ: steps {steps.shape}, windows {windows.shape}")
    steps = steps / np.maximum(np.linalg.norm(steps, axis=1, keepdims=True), eps)
    windows = windows / np.maximum(np.linalg.norm(windows, axis=1, keepdims=True), eps)
    return windows @ steps.T


def log_softmax_rows(scores: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax over the K steps: (T, K) -> (T, K) float64."""
    s = as_float_matrix(scores, "scores").astype(np.float64)
    m = s.max(axis=1, keepdims=True)
    return s - m - np.log(np.sum(np.exp(s - m), axis=1, keepdims=True))


def ordered_step_times(scores: np.ndarray) -> np.ndarray:
    """Exactly-one ordered decoder: times t_0 < t_1 < ... < t_{K-1} maximising sum_k scores[t_k, k].

    Dynamic programme over steps with the time axis vectorised, O(T*K):
      F_0[t] = s[t, 0];  F_k[t] = s[t, k] + max_{t' < t} F_{k-1}[t']   (F_k[t] = -inf for t < k).
    On equal totals the earliest predecessor time is taken.

    Args:
      scores: (T, K) window-by-step scores (higher is better), T >= K >= 1.
    Returns:
      (K,) int64 strictly increasing window indices, one per step.
    """
    s = as_float_matrix(scores, "scores").astype(np.float64)
    num_t, num_k = s.shape
    if num_k == 0:
        raise ValueError("scores have no steps (K = 0)")
    if num_t < num_k:
        raise ValueError(
            f"the ordered exactly-one decoder needs at least as many windows as steps: T={num_t} < K={num_k}"
        )
    times = np.arange(num_t)
    back = np.zeros((num_k, num_t), dtype=np.int64)
    f = s[:, 0].copy()
    for k in range(1, num_k):
        # best[t] = max_{t' <= t} f[t'] with its earliest argmax; shifted by one it gives max over t' < t.
        best = np.maximum.accumulate(f)
        prev_best = np.concatenate(([-np.inf], best[:-1]))
        new_max = np.where(f > prev_best, times, 0)
        arg = np.maximum.accumulate(new_max)
        g = np.full(num_t, -np.inf)
        g[1:] = best[:-1] + s[1:, k]
        g[:k] = -np.inf  # step k cannot be placed before k earlier steps
        back[k, 1:] = arg[:-1]
        f = g
    out = np.empty(num_k, dtype=np.int64)
    out[-1] = int(np.argmax(f))
    for k in range(num_k - 1, 0, -1):
        out[k - 1] = back[k, out[k]]
    return out


def predict_steps(scores: np.ndarray, decoder: str = "dp", log_softmax: bool = False) -> np.ndarray:
    """Binary step predictions from window-by-step scores.

    Args:
      scores: (T, K) scores (e.g. `step_similarity`).
      decoder: 'dp' (ordered exactly-one), 'argmax_step' (best window per step) or 'argmax_frame'
        (best step per window).
      log_softmax: apply a row log-softmax over the K steps first (MCN's Mining YouTube setting).
    Returns:
      (T, K) int8 with 1 where window t is predicted to show step k.
    """
    s = log_softmax_rows(scores) if log_softmax else as_float_matrix(scores, "scores")
    num_t, num_k = s.shape
    y = np.zeros((num_t, num_k), dtype=np.int8)
    if decoder == "dp":
        y[ordered_step_times(s), np.arange(num_k)] = 1
    elif decoder == "argmax_step":
        y[np.argmax(s, axis=0), np.arange(num_k)] = 1
    elif decoder == "argmax_frame":
        y[np.arange(num_t), np.argmax(s, axis=1)] = 1
    else:
        raise ValueError(f"unknown decoder {decoder!r}; expected one of {DECODERS}")
    return y


def step_hits(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[int, int]:
    """(#annotated steps hit, #steps with any annotation) for one video.

    Args:
      y_true: (T, K) 0/1 annotation, one row per second.
      y_pred: (T, K) 0/1 prediction.
    """
    y_true = np.asarray(y_true)
    y_pred = np.asarray(y_pred)
    if y_true.ndim != 2 or y_true.shape != y_pred.shape:
        raise ValueError(f"annotation {y_true.shape} and prediction {y_pred.shape} must both be (T, K)")
    truth = y_true > 0
    annotated = truth.any(axis=0)
    hit = (truth & (y_pred > 0)).any(axis=0)
    return int(np.count_nonzero(hit & annotated)), int(np.count_nonzero(annotated))


def video_recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Per-video recall in [0, 1]; ValueError if the video has no annotated step."""
    hits, total = step_hits(y_true, y_pred)
    if total == 0:
        raise ValueError("the annotation has no annotated step; its recall is undefined")
    return hits / total


@dataclass(frozen=True)
class VideoResult:
    """Step hits of one video: `hits` of `total` annotated steps; `task` groups CrossTask videos."""

    video_id: str
    task: str
    hits: int
    total: int

    @property
    def recall(self) -> float:
        return self.hits / self.total


def evaluate_video(
    video_id: str,
    task: str,
    scores: np.ndarray,
    y_true: np.ndarray,
    decoder: str = "dp",
    log_softmax: bool = False,
) -> VideoResult:
    """Decode one video's (T, K) scores and score them against its (T, K) annotation."""
    scores = np.asarray(scores)
    y_true = np.asarray(y_true)
    if scores.shape != y_true.shape:
        raise ValueError(
            f"video {video_id!r} (task {task!r}): scores {scores.shape} and annotation {y_true.shape} differ"
        )
    try:
        y_pred = predict_steps(scores, decoder, log_softmax)
    except ValueError as e:
        raise ValueError(f"video {video_id!r} (task {task!r}): {e}") from e
    hits, total = step_hits(y_true, y_pred)
    if total == 0:
        raise ValueError(f"video {video_id!r} (task {task!r}): annotation has no annotated step")
    return VideoResult(str(video_id), str(task), hits, total)


def crosstask_recall(
    results: Iterable[VideoResult],
    convention: str = "per_video",
    tasks: Sequence[str] | None = CROSSTASK_PRIMARY_TASKS,
) -> dict[str, object]:
    """CrossTask recall per task and averaged over tasks, in percent.

    Args:
      results: one VideoResult per evaluated video.
      convention: 'per_video' (mean of per-video recalls within a task; MCN) or 'pooled'
        (sum of hits / sum of annotated steps over a task's videos; Zhukov's CrossTask code).
      tasks: the tasks averaged into 'recall' (default the 18 primary tasks). Those without any video
        are left out of the mean with a warning ("k of 18 ... present"), so a partial CrossTask
        evaluates over the tasks it has; none present is an error. None = every task present.
        Videos of other tasks are still reported per task.
    Returns:
      {'recall': mean over the selected tasks present, 'per_task': {task: recall},
       'num_videos': {task: count}, 'averaged_over': [task, ...]} plus 'missing_tasks': [task, ...]
      (selected tasks without videos) when there are any.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown CrossTask convention {convention!r}; expected one of {CONVENTIONS}")
    by_task: dict[str, list[VideoResult]] = {}
    for r in results:
        by_task.setdefault(str(r.task), []).append(r)
    if not by_task:
        raise ValueError("no video results to average")
    per_task: dict[str, float] = {}
    for task, videos in by_task.items():
        if convention == "per_video":
            per_task[task] = 100.0 * float(np.mean([v.recall for v in videos]))
        else:
            per_task[task] = 100.0 * sum(v.hits for v in videos) / sum(v.total for v in videos)
    selected = list(by_task) if tasks is None else [str(t) for t in tasks]
    present = [t for t in selected if t in per_task]
    missing = [t for t in selected if t not in per_task]
    if not present:
        raise ValueError(f"no evaluated video for any of the {len(selected)} CrossTask task(s) {missing} "
                         f"to average over; the videos' tasks are {sorted(by_task, key=_task_sort_key)}")
    out: dict[str, object] = {
        "recall": float(np.mean([per_task[t] for t in present])),
        "per_task": {t: per_task[t] for t in sorted(per_task, key=_task_sort_key)},
        "num_videos": {t: len(by_task[t]) for t in sorted(by_task, key=_task_sort_key)},
        "averaged_over": present,
    }
    if missing:
        what = "primary tasks" if tuple(selected) == CROSSTASK_PRIMARY_TASKS else "selected tasks"
        logging.warning("partial CrossTask: %d of %d %s present; the recall is the mean over these %d "
                        "(no video for %s)", len(present), len(selected), what, len(present), missing)
        out["missing_tasks"] = missing
    return out


def mining_youtube_recall(results: Iterable[VideoResult]) -> dict[str, object]:
    """Mining YouTube: mean per-video recall over all videos, in percent."""
    results = list(results)
    if not results:
        raise ValueError("no video results to average")
    return {"recall": 100.0 * float(np.mean([r.recall for r in results])), "num_videos": len(results)}


def evaluate_localisation(
    videos: Iterable[tuple[str, str, np.ndarray, np.ndarray]],
    benchmark: str,
    decoder: str = "dp",
    log_softmax: bool | None = None,
    convention: str = "per_video",
    tasks: Sequence[str] | None = CROSSTASK_PRIMARY_TASKS,
) -> dict[str, object]:
    """Decode and score a benchmark from (video_id, task, scores (T, K), annotation (T, K)) tuples.

    benchmark: 'crosstask' or 'mining_youtube'. log_softmax None = MCN's choice (on for Mining YouTube,
    off for CrossTask). convention and tasks only apply to CrossTask. Returns the dict of
    `crosstask_recall` / `mining_youtube_recall` plus the settings used.
    """
    if benchmark not in ("crosstask", "mining_youtube"):
        raise ValueError(f"unknown localisation benchmark {benchmark!r}; expected 'crosstask' or 'mining_youtube'")
    if log_softmax is None:
        log_softmax = benchmark == "mining_youtube"
    results = [evaluate_video(v, t, s, y, decoder, log_softmax) for v, t, s, y in videos]
    settings: dict[str, object] = {"decoder": decoder, "log_softmax": bool(log_softmax)}
    if benchmark == "crosstask":
        out = crosstask_recall(results, convention, tasks)
        settings["convention"] = convention
    else:
        out = mining_youtube_recall(results)
    return {**out, "settings": settings}


def _task_sort_key(task: str) -> tuple[int, int | str]:
    return (0, int(task)) if task.isdigit() else (1, task)
