"""The training pipeline's grain worker processes: their output in shared memory, and their liveness.

Shared memory. A worker builds its elements in shared-memory files in /dev/shm that the training
process maps without a copy (`empty`). The names say whose they are (numbers in hex):
`eao_<N>_<P>_<S>_<loader>_<W>_<n>`, N the pid namespace, P and S the training process's pid and
start time, W the worker's pid; the training process's multiprocessing semaphores (grain's queues
and events) are `sem.eao_<N>_<P>_<S>-...`. The training process unlinks a segment as soon as it has
mapped it, while unpickling the element (both sides have mapped it then; the memory lives until the
last array using it is dropped), so only segments in flight (built, not yet received) have a name.
Closing the loader, or the training process exiting, removes those its workers built but never
sent, and a loader starting on the host removes every segment and semaphore whose training process
is gone (`remove_orphans`): what a kill -9 of the whole process group leaves. grain copies no array
into shared memory itself (its random `psm_` names could not be traced back to a run): arrays not
built here (a few small ones) are pickled.

Liveness. grain raises when a worker ends with a non-zero status but waits forever for one that
ended with status 0 (a `sys.exit()` while starting, say). Each worker announces itself with an empty
marker file `eao_<N>_<P>_<S>_<loader>_w<W>`, and `WatchWorkers` raises, one line, as soon as an
announced worker is gone while the training process waits for data.

Linux only (/dev/shm, /proc): elsewhere workers pickle their arrays and nothing is swept or watched.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import mmap
import multiprocessing
import os
import queue
import re
import secrets
import threading
from multiprocessing import util as mp_util
from typing import Any

import grain
import numpy as np

SHM_DIR = "/dev/shm"
# Ours: a segment `eao_<N>_<P>_<S>_...` or a semaphore `sem.eao_<N>_<P>_<S>-...`.
_OURS = re.compile(r"^(?:sem\.)?eao_([0-9a-f]+)_([0-9a-f]+)_([0-9a-f]+)[_-]")
# The smallest array grain copies into shared memory itself: none (see the module docstring).
NO_SHM_COPIES = grain.experimental.DatasetOptions(min_shm_size=1 << 62)
_POLL_S = 0.25  # how often a waiting training process checks its workers


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks after boot) of a process, None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:  # not ours to read: treated as alive
        return "?", 0
    return fields[0].decode(), int(fields[19])


def _alive(pid: int, start: int | None = None) -> bool:
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X") and (start is None or st[1] in (0, start))


def _pid_namespace() -> int:
    # Containers may share /dev/shm but not their pids: a pid is only compared within its namespace.
    return int(os.readlink("/proc/self/ns/pid").split("[")[1].rstrip("]"))


def shared_memory_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.path.isdir("/proc")


def process_prefix() -> str:
    """`eao_<pid namespace>_<pid>_<start time>` of this process (namespace and start 0 without /proc)."""
    pid = os.getpid()
    if not shared_memory_available():
        return f"eao_0_{pid:x}_0"
    return f"eao_{_pid_namespace():x}_{pid:x}_{_stat(pid)[1]:x}"


@dataclasses.dataclass(frozen=True)
class Loader:
    """One loader's shared-memory names (picklable: grain hands it to the workers)."""

    prefix: str  # eao_<N>_<P>_<S>_<loader>_

    @classmethod
    def new(cls) -> Loader:
        """A loader of this process. Also names this process's multiprocessing semaphores after it:
        multiprocessing has no public option for it (`_config["semprefix"]`, "/mp" by default), and
        grain's queues and events would otherwise leave `sem.mp-*` files no one can trace back."""
        cfg = getattr(multiprocessing.current_process(), "_config", None)
        if isinstance(cfg, dict) and "semprefix" in cfg:
            cfg["semprefix"] = "/" + process_prefix()
        return cls(f"{process_prefix()}_{secrets.token_hex(3)}_")

    def names(self) -> list[str]:
        """This loader's files now in /dev/shm."""
        if not shared_memory_available():
            return []
        return [n for n in os.listdir(SHM_DIR) if n.startswith(self.prefix)]

    def workers(self) -> list[int]:
        """Pids of the workers that announced themselves."""
        marker = self.prefix + "w"
        return [int(n[len(marker):], 16) for n in self.names() if n.startswith(marker)]

    def remove(self) -> None:
        """Removes this loader's files (call once its workers have stopped)."""
        for name in self.names():
            _unlink(name)


def _unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except OSError:  # gone already, or not ours to remove
        pass


def remove_orphans() -> int:
    """Removes the segments and semaphores of training processes that are gone; returns how many."""
    if not shared_memory_available():
        return 0
    ns = _pid_namespace()
    removed = 0
    for name in os.listdir(SHM_DIR):
        m = _OURS.match(name)
        if m and int(m[1], 16) == ns and not _alive(int(m[2], 16), int(m[3], 16)):
            _unlink(name)
            removed += 1
    return removed


# --------------------------------------------------------------------------------------------
# In a worker process
_loader: Loader | None = None
_counter = itertools.count()


def in_worker_process(loader: Loader, worker_index: int, worker_count: int) -> None:
    """grain `worker_init_fn`: announces the worker (its marker file) and allocates `empty` arrays in
    shared memory from now on."""
    del worker_index, worker_count
    global _loader
    if shared_memory_available():
        _loader = loader
        os.close(os.open(os.path.join(SHM_DIR, f"{loader.prefix}w{os.getpid():x}"), os.O_CREAT | os.O_EXCL, 0o600))


class _Outgoing(np.ndarray):
    """A worker's array in a shared-memory file: pickled as the file's name (its views and results
    computed from it are ordinary arrays, pickled whole)."""

    _segment: str | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self._segment = None

    def __reduce_ex__(self, protocol: int):
        if self._segment is None:
            return super().__reduce_ex__(protocol)
        return _receive, (self._segment, self.shape, self.dtype.str)

    def __reduce__(self):
        if self._segment is None:
            return super().__reduce__()
        return _receive, (self._segment, self.shape, self.dtype.str)


def _map(name: str, flags: int, size: int) -> mmap.mmap:
    fd = os.open(os.path.join(SHM_DIR, name), flags, 0o600)
    try:
        if flags & os.O_CREAT:
            os.ftruncate(fd, size)
        return mmap.mmap(fd, size)
    finally:
        os.close(fd)


def empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array: in a worker process (`in_worker_process` ran) in a shared-memory file
    of its loader, which reaches the training process without another copy."""
    if _loader is None:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    n = math.prod(shape)
    name = f"{_loader.prefix}{os.getpid():x}_{next(_counter):x}"
    buf = _map(name, os.O_RDWR | os.O_CREAT | os.O_EXCL, max(1, n * dtype.itemsize))
    out = np.frombuffer(buf, dtype, n).reshape(shape).view(_Outgoing)
    out._segment = name
    return out


def _receive(name: str, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """In the training process (unpickling an element): maps a worker's array, then unlinks its name."""
    dt = np.dtype(dtype)
    n = math.prod(shape)
    buf = _map(name, os.O_RDWR, max(1, n * dt.itemsize))
    _unlink(name)
    return np.frombuffer(buf, dt, n).reshape(shape)


# --------------------------------------------------------------------------------------------
# In the training process
class WatchWorkers(grain.IterDataset):
    """`parent`'s elements, raising as soon as one of the loader's workers is gone while waiting."""

    def __init__(self, parent: grain.IterDataset, loader: Loader):
        super().__init__(parent)
        self._loader = loader

    def __iter__(self) -> grain.DatasetIterator:
        return _WatchedIterator(self._parent.__iter__(), self._loader)

    def __str__(self) -> str:
        return f"WatchWorkers({self._loader.prefix})"


def _serve(parent: grain.DatasetIterator, requests: queue.Queue, results: queue.Queue) -> None:
    """The thread that reads the parent (it holds no reference to the watching iterator, so that an
    iterator dropped without `close` is still collected and closed)."""
    while requests.get():
        try:
            results.put((next(parent), None))
        except BaseException as e:  # noqa: BLE001 (handed to the waiting thread)
            results.put((None, e))


class _WatchedIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, loader: Loader):
        super().__init__(parent)
        self._loader = loader
        self._requests: queue.Queue = queue.Queue()
        self._results: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._failed: RuntimeError | None = None
        # Run at exit after grain's own finalizers (priority 1) have stopped the workers.
        self._remove = mp_util.Finalize(self, loader.remove, exitpriority=0)

    def __next__(self) -> Any:
        if self._failed is not None:
            raise self._failed
        self._assert_not_closed()
        if self._thread is None:
            self._thread = threading.Thread(target=_serve, args=(self._parent, self._requests, self._results),
                                            name="eao-watched-loader", daemon=True)
            self._thread.start()
        self._requests.put(True)
        while True:
            try:
                element, err = self._results.get(timeout=_POLL_S)
                break
            except queue.Empty:
                gone = [pid for pid in self._loader.workers() if not _alive(pid)]
                if gone:
                    self._failed = RuntimeError(
                        f"data loader: worker process {gone[0]} exited while the training process waited for "
                        "its data (its output above may say why)")
                    raise self._failed from None
        if err is not None:
            raise err
        return element

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state)

    def close(self) -> None:
        if self._closed:
            return
        self._requests.put(False)
        if self._failed is None:
            super().close()  # stops the workers
            self._remove()
        else:
            # The reading thread waits for the dead worker inside grain, which gives up only when its
            # innermost iterators close (grain does at exit): closing from the outside would wait for
            # it. The files go at exit too (`_remove` runs after grain's finalizers).
            self._closed = True
            threading.Thread(target=self._parent.close, daemon=True).start()

    def __str__(self) -> str:
        return f"WatchWorkers({self._loader.prefix})"
