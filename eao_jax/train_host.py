"""Host-side helpers of the training loop: device prefetch, stop flag, metric window.

`DevicePrefetcher` places the next batches on the devices in a background thread while the step
runs; `StopFlag` turns SIGTERM / a first Ctrl-C into a request to save and exit; `MetricWindow`
keeps the per-step device metrics un-fetched until the loop logs or saves (no per-step sync).
"""

from __future__ import annotations

import copy
import dataclasses
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import jax
import numpy as np

from eao_jax import parallel


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
