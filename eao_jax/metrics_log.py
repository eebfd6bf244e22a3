"""Training progress: a console progress bar, a JSON-lines metrics log and TensorBoard event files.

Everything is written by process 0 only; other processes get a silent logger.

Files under the workdir:
  metrics.jsonl             one JSON object per line: {"step", "time", "kind": "train"|"eval"|"event", ...}
                            (appended across restarts, so a resumed run continues the same file)
  metrics.superseded.jsonl  records an earlier run wrote after the step a later run resumed from
  tensorboard/              event files; scalars "train/<name>" and "eval/<task>/<name>"

Logging never blocks training. Both files are written by the training thread itself, in plain
buffered writes: there is no writer thread whose death could leave the loop waiting forever on a
full queue (tensorboardX's SummaryWriter does exactly that when its thread dies of a full disk).
The first failed write of a file (disk full, I/O error) is reported once, as one console line
naming the file and the error, and that file is dropped for the rest of the run; training goes
on. On a full disk the run then stops at its next checkpoint save with the save's own message,
and the checkpoints written before stay complete.

Resume: a run starting at step S first removes what an earlier run logged after S (it got further
than its last complete checkpoint), so the steps of the two runs never overlap: lines of
metrics.jsonl with a step after S move to metrics.superseded.jsonl, and TensorBoard events after
S are removed from the event files (their values are in the superseded lines).

The progress bar's rate and ETA count only the steps after `start_timing()` (called once the
first step, which includes the compilation, has finished).
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import struct
import sys
import time
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event
from tensorboardX.proto.summary_pb2 import Summary

METRICS_FILE = "metrics.jsonl"
SUPERSEDED_FILE = "metrics.superseded.jsonl"
TB_DIR = "tensorboard"
FLUSH_SECS = 10.0  # TensorBoard files are flushed at most this often (and at close)
_clock = time.perf_counter  # of the progress rate and ETA (a module attribute: tests replace it)

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


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------------------------------
# ETA


def eta_seconds(steps_left: int, timed_steps: int, timed_seconds: float) -> float | None:
    """Seconds until `steps_left` more steps are done at the rate of `timed_steps` steps measured over
    `timed_seconds` (steps that exclude the compilation); None before any step was measured."""
    if timed_steps <= 0 or timed_seconds <= 0:
        return None
    return max(steps_left, 0) * timed_seconds / timed_steps


class StepRate:
    """Steps per second since `start` (the end of the compiling first step); None before."""

    def __init__(self) -> None:
        self._start: tuple[int, float] | None = None

    def start(self, n: int, now: float) -> None:
        self._start = (n, now)

    def rate(self, n: int, now: float) -> float | None:
        if self._start is None:
            return None
        n0, t0 = self._start
        return (n - n0) / (now - t0) if n > n0 and now > t0 else None

    def eta(self, n: int, total: int, now: float) -> float | None:
        if self._start is None:
            return None
        n0, t0 = self._start
        return eta_seconds(total - n, n - n0, now - t0)


def _bar_class() -> type:
    from tqdm import tqdm  # noqa: PLC0415

    class _Bar(tqdm):
        """tqdm whose rate (and so ETA) is that of the steps after the compilation: tqdm's own average
        would include the first step's compile time, minutes on a large model."""

        def __init__(self, *args: Any, step_rate: StepRate, **kwargs: Any):
            self._step_rate = step_rate
            super().__init__(*args, **kwargs)

        @property
        def format_dict(self) -> dict:
            d = super().format_dict
            # 0 makes tqdm print "?" for the rate and the ETA until a post-compilation step is measured.
            d["rate"] = self._step_rate.rate(self.n, _clock()) or 0
            return d

    return _Bar


def _plural(n: int, what: str) -> str:
    return f"{n} {what}{'' if n == 1 else 's'}"


def _fmt_interval(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ------------------------------------------------------------------------------------------------
# TensorBoard event files (TFRecord framing of Event protos)


def _masked_crc(data: bytes) -> int:
    x = crc32c(data) & 0xFFFFFFFF
    return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _frame(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data)))


def read_event_records(path: str | os.PathLike) -> Iterator[bytes]:
    """The serialized Event protos of an event file, up to the first damaged or torn record."""
    with open(path, "rb") as f:
        while True:
            header = f.read(12)
            if len(header) < 12:
                return
            (length,), (crc,) = struct.unpack("<Q", header[:8]), struct.unpack("<I", header[8:])
            if crc != _masked_crc(header[:8]):
                return
            data, tail = f.read(length), f.read(4)
            if len(data) < length or len(tail) < 4 or struct.unpack("<I", tail)[0] != _masked_crc(data):
                return
            yield data


def read_events(path: str | os.PathLike) -> list[Event]:
    """The Event protos of an event file."""
    out = []
    for data in read_event_records(path):
        e = Event()
        e.ParseFromString(data)
        out.append(e)
    return out


def read_scalars(workdir: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file under WORKDIR/tensorboard, files in name order
    (the order TensorBoard reads them)."""
    tb = os.path.join(workdir, TB_DIR)
    out: dict[str, list[tuple[int, float]]] = {}
    for name in sorted(os.listdir(tb)):
        if "tfevents" not in name:
            continue
        for e in read_events(os.path.join(tb, name)):
            for v in e.summary.value:
                out.setdefault(v.tag, []).append((int(e.step), float(v.simple_value)))
    return out


class _EventFile:
    """One event file, written synchronously (no thread, no queue)."""

    def __init__(self, directory: str):
        os.makedirs(directory, exist_ok=True)
        base = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(directory, base)
        for i in range(1, 100):  # never overwrite an earlier run's file
            try:
                self._f: BinaryIO = open(self.path, "xb")  # noqa: SIM115
                break
            except FileExistsError:
                self.path = os.path.join(directory, f"{base}.{i}")
        else:
            raise FileExistsError(f"{self.path}: event file names exhausted")
        self._last_flush = time.monotonic()
        self.write(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def write(self, event: Event) -> None:
        self._f.write(_frame(event.SerializeToString()))

    def add_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        summary = Summary(value=[Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])
        self.write(Event(wall_time=time.time(), step=int(step), summary=summary))
        if time.monotonic() - self._last_flush > FLUSH_SECS:
            self.flush()

    def flush(self) -> None:
        self._f.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._f.close()


# ------------------------------------------------------------------------------------------------
# Resume: remove what an earlier run logged after the resumed step


def _step_of(line: str) -> int | None:
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec.get("step") if isinstance(rec, dict) and isinstance(rec.get("step"), int) else None


def supersede_jsonl(workdir: str | os.PathLike, step: int) -> int:
    """Moves the lines of WORKDIR/metrics.jsonl with a step after `step` (and torn lines, from a killed
    run) to metrics.superseded.jsonl. Returns how many moved. The metrics file is replaced atomically,
    so a failure leaves it as it was."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(path):
        return 0
    keep, moved = [], []
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            s = _step_of(line)
            (keep if s is not None and s <= step else moved).append(line if line.endswith("\n") else line + "\n")
    if not moved:
        return 0
    with open(os.path.join(workdir, SUPERSEDED_FILE), "a") as f:
        f.writelines(moved)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
    return len(moved)


def supersede_events(workdir: str | os.PathLike, step: int) -> int:
    """Removes the events with a step after `step` from the event files under WORKDIR/tensorboard
    (each rewritten atomically under its own name, so the reading order stays). Returns how many."""
    tb = os.path.join(workdir, TB_DIR)
    if not os.path.isdir(tb):
        return 0
    removed = 0
    for name in sorted(os.listdir(tb)):
        path = os.path.join(tb, name)
        if "tfevents" not in name or not os.path.isfile(path):
            continue
        keep, n_late = [], 0
        for data in read_event_records(path):
            e = Event()
            e.ParseFromString(data)
            if e.step > step:
                n_late += 1
            else:
                keep.append(data)
        if not n_late:
            continue
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.writelines(_frame(d) for d in keep)
        os.replace(tmp, path)
        removed += n_late
    return removed


# ------------------------------------------------------------------------------------------------
# The logger


class MetricsLogger:
    """Progress bar + metrics.jsonl + TensorBoard for one training run.

    Args:
      workdir: where metrics.jsonl and tensorboard/ are written.
      total_steps: the last step of the run (for the bar).
      initial_step: the step the run (re)starts from; what earlier runs logged after it is removed.
      enabled: False on processes other than 0 (nothing is written).
      progress_bar: draw a tqdm bar on stderr (else one log line per `log` call).
    """

    def __init__(self, workdir: str | os.PathLike, total_steps: int, initial_step: int = 0, *,
                 enabled: bool = True, progress_bar: bool = True):
        self.enabled = enabled
        self.total_steps = total_steps
        self._n = initial_step
        self._rate = StepRate()
        self._bar = None
        self._jsonl = None
        self._tb: _EventFile | None = None
        if not enabled:
            return
        workdir = os.fspath(workdir)
        self._jsonl_path = os.path.join(workdir, METRICS_FILE)
        self._tb_dir = os.path.join(workdir, TB_DIR)
        if progress_bar:  # first, so that the messages below print above it
            self._bar = _bar_class()(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                                     file=sys.stderr, mininterval=1.0, step_rate=self._rate)
        os.makedirs(workdir, exist_ok=True)
        notes = []
        # Each sink: drop what an earlier run logged after initial_step, then open; a failure of either
        # is reported once and leaves that sink off.
        try:
            if n := supersede_jsonl(workdir, initial_step):
                notes.append(f"{_plural(n, 'metrics.jsonl record')} moved to {SUPERSEDED_FILE}")
            self._jsonl = open(self._jsonl_path, "a", buffering=1)  # noqa: SIM115
        except OSError as e:
            self._report(self._jsonl_path, "metrics.jsonl", e)
        try:
            if n := supersede_events(workdir, initial_step):
                notes.append(f"{_plural(n, 'TensorBoard event')} removed")
            self._tb = _EventFile(self._tb_dir)
        except OSError as e:
            self._report(self._tb_dir, "TensorBoard logging", e)
        if notes:
            self.log_event(initial_step, f"an earlier run logged beyond step {initial_step}: " + ", ".join(notes))

    # ---------------------------------------------------------------- failures: report once, drop
    def _report(self, path: str, what: str, e: BaseException) -> None:
        msg = f"metrics: writing {path} failed ({_why(e)}); {what} is off for the rest of the run (training goes on)"
        self.write_line(msg)
        if self._jsonl is not None and what != "metrics.jsonl":
            self._write({"step": self._n, "time": time.time(), "kind": "event", "message": msg})

    def _drop_jsonl(self, e: BaseException) -> None:
        f, self._jsonl = self._jsonl, None
        try:
            f.close()  # may fail again on the same buffered data
        except OSError:
            pass
        self._report(self._jsonl_path, "metrics.jsonl", e)

    def _drop_tb(self, e: BaseException) -> None:
        tb, self._tb = self._tb, None
        try:
            tb.close()
        except OSError:
            pass
        self._report(tb.path, "TensorBoard logging", e)

    def _write(self, record: dict) -> None:
        if self._jsonl is None:
            return
        line = json.dumps(_jsonable(record)) + "\n"
        try:
            self._jsonl.write(line)
        except OSError as e:
            self._drop_jsonl(e)

    def _scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if self._tb is None or not scalars:
            return
        try:
            self._tb.add_scalars(step, scalars)
        except OSError as e:
            self._drop_tb(e)

    # ---------------------------------------------------------------- progress
    def advance(self, n: int = 1) -> None:
        """Moves the bar by `n` steps (no device sync)."""
        self._n += n
        if self._bar is not None:
            self._bar.update(n)

    def start_timing(self) -> None:
        """Rate and ETA count the steps from now on (call after the compiling first step)."""
        self._rate.start(self._n, _clock())

    def eta(self) -> float | None:
        """Seconds left at the rate measured since `start_timing`; None before."""
        return self._rate.eta(self._n, self.total_steps, _clock())

    def log_train(self, step: int, metrics: Mapping[str, float]) -> None:
        """Scalars of the last window of steps (averages), e.g. loss terms, lr, clips/s, data wait."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), "kind": "train", **metrics})
        self._scalars(step, {_tag(f"train/{k}"): v for k, v in _flatten(metrics).items()})
        shown = {k: metrics[k] for k in _BAR_KEYS if k in metrics}
        text = " ".join(f"{k}={_fmt(v)}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)
        else:
            eta = self.eta()
            if eta is not None:
                text += f" eta={_fmt_interval(eta)}"
            print(f"step {step}/{self.total_steps} {text}", file=sys.stderr, flush=True)

    def log_eval(self, step: int, task: str, metrics: Mapping[str, Any]) -> None:
        """Evaluation results (nested dict, e.g. {"t2v": {"R1": ..}}) of `task` at `step`."""
        if not self.enabled:
            return
        self._write({"step": step, "time": time.time(), "kind": "eval", "task": task, "metrics": metrics})
        self._scalars(step, {_tag(f"eval/{task}/{k}"): v for k, v in _flatten(metrics).items()})

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
            try:
                self._tb.flush()
            except OSError as e:
                self._drop_tb(e)
        if self._jsonl is not None:
            try:
                self._jsonl.flush()
            except OSError as e:
                self._drop_jsonl(e)

    def close_bar(self) -> None:
        """Ends the progress bar (later lines print plainly)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        """Flushes and closes the files (a failure is reported like any other write failure)."""
        self.close_bar()
        self.flush()
        for attr in ("_tb", "_jsonl"):
            f = getattr(self, attr)
            setattr(self, attr, None)
            if f is not None:
                try:
                    f.close()
                except OSError as e:
                    self.write_line(f"metrics: closing {getattr(f, 'path', None) or getattr(f, 'name', '')} "
                                    f"failed ({_why(e)})")


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
