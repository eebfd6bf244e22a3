"""One training per workdir: an exclusive lock held for the whole run.

The lock is `fcntl.flock` on WORKDIR/.lock. The kernel drops it when the holding process exits, however
it exits (SIGKILL and crashes included), so a lock file left behind by a dead run never blocks the
next one; the file's content (pid, host, start time of the holder) only serves the error message.
Workdirs on object stores (gs://...) and filesystems without locks cannot be locked: a warning says
so and the run goes on unguarded.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import IO

from absl import logging

LOCK_FILE = ".lock"


class WorkdirLockedError(RuntimeError):
    """Another process is training in this workdir."""


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir's lock (raises WorkdirLockedError when taken)."""

    def __init__(self, workdir: str | os.PathLike):
        self.workdir = os.fspath(workdir)
        self.path = os.path.join(self.workdir, LOCK_FILE)
        self._file: IO[str] | None = None

    def acquire(self) -> WorkdirLock:
        if "://" in self.workdir:
            logging.warning("workdir %s is not a local path: it cannot be locked against a second training",
                            self.workdir)
            return self
        os.makedirs(self.workdir, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the run: the lock lives on this descriptor)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = _describe(f.read())
            f.close()
            raise WorkdirLockedError(
                f"workdir {self.workdir} is in use by another training ({holder}): wait for it to end or stop "
                "it, or give another --workdir") from None
        except OSError as e:  # e.g. ENOLCK on a filesystem without lock support
            logging.warning("workdir %s cannot be locked (%s): a second training there would not be refused",
                            self.workdir, e)
            return self
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}) + "\n")
        f.flush()
        self._file = f
        return self

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _describe(content: str) -> str:
    try:
        info = json.loads(content)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info["since"])))
        return f"pid {info['pid']} on host {info['host']}, started {since}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"
