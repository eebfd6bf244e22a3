"""Training progress: a console progress bar, a JSON-lines metrics log and TensorBoard event files.

Everything is written by process 0 only; other processes get a silent logger.

Files under the workdir:
  metrics.jsonl   one JSON object per line: {"step", "time", "kind": "train"|"eval"|"event", ...}
                  (appended across restarts, so a resumed run continues the same file)
  tensorboard/    event files (tensorboardX); scalars "train/<name>" and "eval/<task>/<name>"
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Mapping
from typing import Any

from absl import logging

try:  # TensorBoard event files without TensorFlow.
    from tensorboardX import SummaryWriter
except ImportError:  # pragma: no cover - exercised only where tensorboardX is missing
    SummaryWriter = None

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tensorboard"

# Shown in the progress bar, in this order, when present.
_BAR_KEYS = ("loss", "tv", "ta", "va", "t_va", "v_ta", "a_tv", "lr", "clips_per_s", "data_wait")


def _jsonable(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf
    return v


def _tag(name: str) -> str:
    """A TensorBoard-legal tag ([A-Za-z0-9_./-]): "t+v2a" -> "t_v2a"."""
    return re.sub(r"[^A-Za-z0-9_./-]", "_", name)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}/"))
        elif isinstance(v, int | float) and not isinstance(v, bool):
            out[f"{prefix}{k}"] = float(v)
    return out


class MetricsLogger:
    """Progress bar + metrics.jsonl + TensorBoard for one training run.

    Args:
      workdir: where metrics.jsonl and tensorboard/ are written.
      total_steps: the last step of the run (for the bar).
      initial_step: the step the run (re)starts from.
      enabled: False on processes other than 0 (nothing is written).
      progress_bar: draw a tqdm bar on stderr (else one log line per `log` call).
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0, *,
                 enabled: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self._bar = None
        self._jsonl = None
        self._tb = None
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, METRICS_FILE), "a", buffering=1)  # noqa: SIM115
        if SummaryWriter is not None:
            self._tb = SummaryWriter(os.path.join(workdir, TB_DIR), flush_secs=30)
        else:
            logging.warning("tensorboardX is not installed: no TensorBoard event files are written.")
        if progress_bar:
            from tqdm import tqdm  # noqa: PLC0415

            self._bar = tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0, smoothing=0.1)

    def advance(self, n: int = 1) -> None:
        """Moves the bar by `n` steps (no device sync)."""
        if self._bar is not None:
            self._bar.update(n)

    def _write(self, record: dict) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(_jsonable(record)) + "\n")

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars of the last window of steps (averages), e.g. loss terms, lr, clips/s, data wait."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), "kind": "train", **metrics})
        if self._tb is not None:
            for k, v in _flatten(metrics).items():
                self._tb.add_scalar(_tag(f"train/{k}"), v, step)
        shown = {k: metrics[k] for k in _BAR_KEYS if k in metrics}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        else:
            print(f"step {step}/{self.total_steps} {text}", file=sys.stderr, flush=True)

    def log_eval(self, step: int, task: str, metrics: Mapping[str, Any]) -> None:
        """Evaluation results (nested dict, e.g. {"t2v": {"R1": ..}}) of `task` at `step`."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), "kind": "eval", "task": task, "metrics": metrics})
        if self._tb is not None:
            for k, v in _flatten(metrics).items():
                self._tb.add_scalar(_tag(f"eval/{task}/{k}"), v, step)

    def log_event(self, step: int, message: str, **extra: Any) -> None:
        """A run event (start, resume, checkpoint, preemption, stop) in the JSONL log and the console."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), "kind": "event", "message": message, **extra})
        self.write_line(f"[step {step}] {message}")

    def write_line(self, text: str) -> None:
        """A console line that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def flush(self) -> None:
        if self._tb is not None:
            self._tb.flush()
        if self._jsonl is not None:
            self._jsonl.flush()

    def close_bar(self) -> None:
        """Ends the progress bar (later lines print plainly)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _fmt(v: float) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
            return f"{v:.2e}"
        return f"{v:.4g}"
    return str(v)


def read_metrics(workdir: str | os.PathLike, kind: str | None = None) -> list[dict]:
    """The records of WORKDIR/metrics.jsonl (optionally only those of `kind`)."""
    path = os.path.join(workdir, METRICS_FILE)
    records = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e})") from None
            if kind is None or rec.get("kind") == kind:
                records.append(rec)
    return records
