"""Console hygiene shared by the command lines (main, evaluate, convert, embed, attention, prepare, bench).

Library INFO logs (Orbax prints a dozen lines per checkpoint read or write, TFDS more) drown the
progress bar and the result tables, so a command logs WARNING and above unless `--verbosity` is
given. Orbax also logs every failure of its background save threads, each with a full traceback,
several times per failed save; those errors always reach our code as an exception
(`checkpoint.check_save_errors` / `wait_for_saves`), which reports them once, so they are dropped
from the log too (`--verbosity=0` shows them again), and so is its warning that a checkpoint is
opened read-only.

Errors (`run`): every command reports a failure as one line naming the thing that is wrong and exits with
status 1: a flag error, an error loading a `--config` file (`define_config_file`) or any error of the
command itself; the traceback is shown only with `--verbosity=1` or EAO_TRACEBACK=1. `--help` exits with
status 0, Ctrl-C with one line saying what the interruption left and status 130.
"""

from __future__ import annotations

import _thread
import functools
import importlib.util
import logging as py_logging
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from typing import Any, NoReturn

from absl import app, flags, logging
from ml_collections import config_flags

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


INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports a command that Ctrl-C ended
_FLAGS_HINT = "(--helpshort lists the flags)"


def _fail(line: str, status: int = 1) -> NoReturn:
    if want_traceback():
        traceback.print_exc()
    if _open_progress_bars():  # an interrupted bar leaves the line unfinished: the message starts a new one
        line = "\n" + line
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)


def _open_progress_bars() -> bool:
    tqdm = sys.modules.get("tqdm")
    return bool(tqdm is not None and getattr(tqdm.tqdm, "_instances", None))


Main = Callable[[list[str]], None]


def report_errors(prog: str, interrupted: str = "") -> Callable[[Main], Main]:
    """Decorates an absl `main`: any error ends the command with one line `prog: <message>` on stderr and
    exit status 1 (the traceback too when `want_traceback()`); Ctrl-C with `prog: interrupted; <interrupted>`
    and status 130. Exits pass through."""
    def wrap(main: Main) -> Main:
        @functools.wraps(main)
        def run(argv: list[str]) -> None:
            try:
                main(argv)
            except SystemExit:
                raise
            except KeyboardInterrupt:
                # Exiting (library threads and atexit hooks may take a moment): another Ctrl-C ends the process
                # at once, without a traceback from whatever cleanup it interrupts.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                _fail(f"{prog}: interrupted" + (f"; {interrupted}" if interrupted else ""), INTERRUPTED_STATUS)
            except app.UsageError as e:
                _fail(f"{prog}: {e} {_FLAGS_HINT}")
            except Exception as e:
                _fail(f"{prog}: {error_line(e)}")
        return run
    return wrap


# absl's help flags (--help, -?, --helpshort, --helpfull, --helpxml) print the help and exit with status 1.
_HELP_FLAG = re.compile(r"--?(help|helpshort|helpfull|helpxml|\?)(=.*)?")


def parse_flags(prog: str) -> Callable[[list[str]], list[str]]:
    """An `app.run` flags parser: absl's, with every flag error as one line `prog: <error>` (exit status 1),
    an override of an unknown field of a `--config` file as `Config error: <field> ...` naming the closest
    real one, and --help exiting with status 0."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except SystemExit as e:
            words = argv[1:argv.index("--")] if "--" in argv else argv[1:]
            if e.code == 1 and any(_HELP_FLAG.fullmatch(a) for a in words):
                sys.exit(0)  # the help was asked for and printed: a success
            raise
        except flags.Error as e:  # a config file's error (the context of absl's) says all there is to say
            hint = "" if isinstance(e.__context__, ConfigFileError) else f" {_FLAGS_HINT}"
            _fail(f"{prog}: {error_line(e)}{hint}")
        except (AttributeError, KeyError) as e:  # ml_collections: `--config.x=y` names a field that does not exist
            _fail(f"Config error: {_unknown_override(argv, e)}")
    return parse


def _unknown_override(argv: list[str], e: Exception) -> str:
    from eao_jax.config_utils import unknown_field_message  # noqa: PLC0415 (imports the model: only on error)

    prefixes = tuple(f"--{name}." for name in _CONFIG_FLAGS)
    names = [a.split("=")[0].split(".", 1)[1] for a in argv if a.startswith(prefixes)]
    msg = next((m for n in names if (m := unknown_field_message(n))), None)
    if msg is None:  # every name is a real field: the config file must leave one out
        msg = (f"{', '.join(names)}: a field the config file does not define cannot be set with --config.x=y "
               f"({str(e).strip(chr(39) + chr(34))})")
    return msg


def _redeliver_interrupts(previous: Callable[[Any], None]) -> Callable[[Any], None]:
    """An unraisable hook: a Ctrl-C that lands inside a callback whose exceptions Python discards (JAX's
    garbage-collection callback, a `__del__`) would print "Exception ignored ... KeyboardInterrupt" and
    be lost; it is raised again in the main thread instead (`interrupted` then reports it), from a timer
    thread so that it lands after the hook has returned."""
    def hook(unraisable: Any) -> None:
        if issubclass(unraisable.exc_type, KeyboardInterrupt):
            timer = threading.Timer(0.05, _thread.interrupt_main)
            timer.daemon = True
            timer.start()
        else:
            previous(unraisable)
    return hook


def run(prog: str, main: Main, *, interrupted: str = "") -> None:
    """`app.run(main)` with this module's error handling (`parse_flags`, `report_errors`)."""
    sys.unraisablehook = _redeliver_interrupts(sys.unraisablehook)
    app.run(report_errors(prog, interrupted)(main), flags_parser=parse_flags(prog))


# ------------------------------------------------------------------------------------------ --config files

_CONFIG_FLAGS: set[str] = set()


class ConfigFileError(ValueError):
    """A `--config` file that is missing or whose `get_config` fails (absl reports it as a flag error)."""


class _ConfigFileParser(flags.ArgumentParser):
    """Parses `--config=FILE.py[:ARG]` into `get_config(ARG)` of FILE.py (locked), as ml_collections does,
    but fails while the flags are parsed, with one line: ml_collections defers the error of a missing file
    to the config's first use, where it names no path, and quotes the traceback of an error in
    `get_config` as the flag error's message."""

    def __init__(self, name: str) -> None:
        self.name = name

    def parse(self, path: str) -> Any:
        file, colon, arg = path.partition(":")
        if not os.path.isfile(file):
            raise ConfigFileError(f"no config file at {file}")
        try:
            spec = importlib.util.spec_from_file_location(f"{self.name}_config", file)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigFileError(f"{file}: {error_line(e)}") from e
        if not callable(getattr(module, "get_config", None)):
            raise ConfigFileError(f"{file} defines no get_config()")
        try:
            config = module.get_config(*([arg] if colon else []))
        except Exception as e:
            raise ConfigFileError(error_line(e)) from e
        if callable(getattr(config, "lock", None)):
            config.lock()
        return config

    def flag_type(self) -> str:
        return "config object"


def define_config_file(name: str, help_string: str) -> flags.FlagHolder:
    """ml_collections' `DEFINE_config_file` (locked config, `--name.x=y` overrides) whose errors are one line
    naming the file and, for an error in `get_config(ARG)`, the message of that error (see `run`)."""
    holder = config_flags.DEFINE_config_file(name, None, help_string, lock_config=True)
    flags.FLAGS[name].parser = _ConfigFileParser(name)
    _CONFIG_FLAGS.add(name)
    return holder
