"""Console hygiene shared by the command lines (main, evaluate, convert, embed, attention).

Library INFO logs (Orbax prints a dozen lines per checkpoint read or write, TFDS more) drown the
progress bar and the result tables, so a command logs WARNING and above unless `--verbosity` is
given. Orbax also logs every failure of its background save threads, each with a full traceback,
several times per failed save; those errors always reach our code as an exception
(`checkpoint.check_save_errors` / `wait_for_saves`), which reports them once, so they are dropped
from the log too (`--verbosity=0` shows them again).
"""

from __future__ import annotations

import logging as py_logging

from absl import flags, logging


class _DropOrbaxErrors(py_logging.Filter):
    def filter(self, record: py_logging.LogRecord) -> bool:
        return not (record.levelno >= py_logging.ERROR and "orbax" in record.pathname.replace("\\", "/"))


_FILTER = _DropOrbaxErrors()


def quiet_libraries() -> None:
    """WARNING-level logging and no duplicated Orbax tracebacks, unless `--verbosity` was given."""
    if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
        return
    logging.set_verbosity(logging.WARNING)
    absl_logger = py_logging.getLogger("absl")
    if _FILTER not in absl_logger.filters:
        absl_logger.addFilter(_FILTER)
