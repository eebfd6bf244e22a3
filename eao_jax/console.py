"""Console hygiene shared by the command lines (main, evaluate, convert, embed, attention).

Library INFO logs (Orbax prints a dozen lines per checkpoint read or write, TFDS more) drown the
progress bar and the result tables, so a command logs WARNING and above unless `--verbosity` is
given. Orbax also logs every failure of its background save threads, each with a full traceback,
several times per failed save; those errors always reach our code as an exception
(`checkpoint.check_save_errors` / `wait_for_saves`), which reports them once, so they are dropped
from the log too (`--verbosity=0` shows them again), and so is its warning that a checkpoint is
opened read-only.

Errors: every command reports a failure as one line naming the thing that is wrong and exits with
status 1 (`report_errors`); the traceback is shown only with `--verbosity=1` or EAO_TRACEBACK=1.
"""

from __future__ import annotations

import functools
import logging as py_logging
import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging

_DROPPED_WARNINGS = ("Given directory is read only", "Metadata file does not exist")


class _DropOrbaxErrors(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        if "orbax" not in record.pathname.replace("\\", "/"):
            return True
        # Every read of a checkpoint (evaluate, embed, attention) would warn that it reads it read-only, and
        # opening a directory with a damaged (emptied) step that the step's metadata file is missing (the
        # resume names that step once: checkpoint.restore_newest_training).
        return record.levelno < py_logging.ERROR and not str(record.msg).startswith(_DROPPED_WARNINGS)


_FILTER = _DropOrbaxErrors()


def quiet_libraries() -> None:
    """WARNING-level logging and no duplicated Orbax tracebacks, unless `--verbosity` was given."""
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    absl_logger = py_logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)


TRACEBACK_ENV = "EAO_TRACEBACK"  # set to 1 for the full traceback of a command-line error


def want_traceback() -> bool:
    """Whether a command-line error shows its traceback: `--verbosity=1` (or more) or EAO_TRACEBACK=1."""
    if os.environ.get(TRACEBACK_ENV, "").strip().lower() in ("1", "true", "yes"):
        return True
    return "verbosity" in flags.FLAGS and flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].value >= 1


def error_line(e: BaseException) -> str:
    """One line for an error: its message (first line), with the exception type when the message alone
    would not say what went wrong (an empty message, or a KeyError's bare key)."""
    text = str(e).strip()
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        text = e.args[0]
    first = text.splitlines()[0] if text else ""
    if not first:
        return type(e).__name__
    if type(e) in (KeyError, IndexError, TypeError, AttributeError, AssertionError, RuntimeError):
        return f"{type(e).__name__}: {first}"
    return first


def report_errors(prog: str) -> Callable[[Callable[[list[str]], None]], Callable[[list[str]], None]]:
    """Decorates an absl `main`: any error ends the command with one line `prog: <message>` on stderr and
    exit status 1 (the traceback too when `want_traceback()`). Usage errors and exits pass through."""
    def wrap(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
        @functools.wraps(main)
        def run(argv: list[str]) -> None:
            try:
                main(argv)
            except (SystemExit, KeyboardInterrupt, app.UsageError):
                raise
            except Exception as e:
                if want_traceback():
                    traceback.print_exc()
                print(f"{prog}: {error_line(e)}", file=sys.stderr, flush=True)
                sys.exit(1)
        return run
    return wrap
