"""Multi-process (multi-host) start-up through JAX's distributed runtime.

Call :func:`initialize` first thing in a program, before any JAX computation (even
``jax.devices()``), then build meshes from ``jax.devices()`` as usual.

Each setting is taken from the first of: an argument of :func:`initialize` (``main`` and
``evaluate`` pass their ``--coordinator_address``, ``--num_processes``, ``--process_id`` and
``--local_device_ids`` flags, see :func:`define_flags`), then ``EAO_COORDINATOR_ADDRESS``,
``EAO_NUM_PROCESSES``, ``EAO_PROCESS_ID``, ``EAO_LOCAL_DEVICE_IDS``. Whatever is still unset is
left to ``jax.distributed.initialize()``, which reads ``JAX_COORDINATOR_ADDRESS`` /
``JAX_LOCAL_DEVICE_IDS`` and detects SLURM, Open MPI, Kubernetes and Cloud TPU (single-host TPU
VMs included, where the runtime provides the preemption sync point Orbax saves on). Under SLURM
and Open MPI, JAX gives each process the one GPU of its local rank unless local device ids are set.

``--distributed`` / ``EAO_DISTRIBUTED``: ``auto`` (default) starts the runtime, except that with
nothing configured and no cluster found by JAX the program stays single-process; ``off`` never
starts it; ``on`` always does and fails if the settings are incomplete. An explicit
``num_processes=1`` is single-process unless ``on``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence

from absl import flags, logging

ENV = {"coordinator_address": "EAO_COORDINATOR_ADDRESS", "num_processes": "EAO_NUM_PROCESSES",
       "process_id": "EAO_PROCESS_ID", "local_device_ids": "EAO_LOCAL_DEVICE_IDS"}
ENV_MODE = "EAO_DISTRIBUTED"
MODES = ("auto", "on", "off")

# HOST:PORT where HOST is a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What :func:`resolve` found; None values are left to ``jax.distributed.initialize``.

    ``sources`` maps each setting that was given to its flag or environment variable.
    """

    mode: str
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def configured(self) -> bool:
        """True when any of address, process count or process id was given."""
        return any(k in self.sources for k in ("coordinator_address", "num_processes", "process_id"))

    def describe(self) -> str:
        return ", ".join(sorted(set(self.sources.values()))) or "JAX cluster detection"


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """What :func:`initialize` set up.

    ``coordinator_address`` is None when single-process or when JAX found it itself;
    ``source`` names where the settings came from ("single" when not distributed).
    """

    process_id: int
    num_processes: int
    coordinator_address: str | None
    local_device_ids: tuple[int, ...] | None
    source: str
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.process_id == 0


_SINGLE = DistInfo(0, 1, None, None, "single", False)
_LOCK = threading.Lock()
_INFO: DistInfo | None = None


def _parse_int(value: object, label: str, *, minimum: int) -> int:
    try:
        number = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"{label}={value!r} is not an integer") from None
    if number < minimum:
        raise ValueError(f"{label}={number} must be >= {minimum}")
    return number


def check_address(address: object, label: str) -> str:
    """Returns ``address`` if it is HOST:PORT with 1 <= PORT <= 65535, else a ValueError naming ``label``."""
    if not isinstance(address, str):
        raise ValueError(f"{label}={address!r} must be a HOST:PORT string")
    match = _ADDRESS_RE.match(address.strip())
    if not match:
        raise ValueError(f"{label}={address!r} is not HOST:PORT (e.g. 10.0.0.1:8476, node001:8476 or [::1]:8476)")
    if not 1 <= int(match.group(1)) <= 65535:
        raise ValueError(f"{label}={address!r}: port {int(match.group(1))} is outside 1..65535")
    return address.strip()


def parse_device_ids(value: object, label: str) -> tuple[int, ...]:
    """Parses ``"0,1,2"`` / ``[0, 1, 2]`` / ``3`` into a tuple of distinct non-negative ints."""
    if isinstance(value, str):
        parts: list[object] = [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, int) and not isinstance(value, bool):
        parts = [value]
    elif isinstance(value, Sequence):
        parts = list(value)
    else:
        raise ValueError(f"{label}={value!r} must be a comma-separated list of device ids")
    if not parts:
        raise ValueError(f"{label}={value!r} names no device ids")
    ids = tuple(_parse_int(p, f"{label} entry", minimum=0) for p in parts)
    if len(set(ids)) != len(ids):
        raise ValueError(f"{label}={value!r} repeats a device id")
    return ids


_PARSERS: dict[str, Callable[[object, str], object]] = {
    "coordinator_address": check_address,
    "num_processes": lambda v, label: _parse_int(v, label, minimum=1),
    "process_id": lambda v, label: _parse_int(v, label, minimum=0),
    "local_device_ids": parse_device_ids,
}


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | int | str | None = None,
    *,
    mode: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Reads and validates the explicit settings (arguments, then ``EAO_*`` variables). Starts nothing.

    Every given value is validated, even with mode "off", so a typo never passes silently.

    Raises:
      ValueError: a malformed or inconsistent setting; the message names its flag / variable.
    """
    env = os.environ if env is None else env
    mode_value, mode_label = (mode, "--distributed") if mode is not None else (env.get(ENV_MODE, ""), ENV_MODE)
    mode_value = mode_value.strip().lower() or "auto"
    if mode_value not in MODES:
        raise ValueError(f"{mode_label}={mode_value!r} must be one of {', '.join(MODES)}")
    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes,
                "process_id": process_id, "local_device_ids": local_device_ids}
    values: dict[str, object] = {}
    sources: dict[str, str] = {}
    for name, value in explicit.items():
        label = f"--{name}"
        if value is None:
            value, label = env.get(ENV[name], "").strip() or None, ENV[name]  # empty counts as unset
        if value is not None:
            values[name], sources[name] = _PARSERS[name](value, label), label
    n, pid = values.get("num_processes"), values.get("process_id")
    if isinstance(n, int) and isinstance(pid, int) and pid >= n:
        raise ValueError(f"{sources['process_id']}={pid} is out of range for {sources['num_processes']}={n}: "
                         f"process ids run from 0 to {n - 1}")
    return Settings(mode_value, sources=sources, **values)  # type: ignore[arg-type]


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | int | str | None = None,
    *,
    mode: str | None = None,
    initialization_timeout: int = 300,
    quiet_non_main: bool = True,
) -> DistInfo:
    """Starts JAX's distributed runtime as the module docstring describes.

    Must run before any JAX computation. Later calls return the first call's :class:`DistInfo`
    (one that names different explicit settings raises). ``quiet_non_main`` lowers absl logging to
    WARNING on processes other than 0.
    """
    global _INFO
    with _LOCK:
        if _INFO is not None:
            _check_consistent(_INFO, coordinator_address, num_processes, process_id)
            return _INFO
        import jax

        if jax.distributed.is_initialized():  # started by someone else: report, don't restart
            info = DistInfo(jax.process_index(), jax.process_count(), None, None, "already initialised", True)
        else:
            settings = resolve(coordinator_address, num_processes, process_id, local_device_ids, mode=mode)
            info = _start(settings, initialization_timeout)
        _INFO = info
    if quiet_non_main and not info.is_main:
        logging.set_verbosity(logging.WARNING)  # every process logs the same steps
    if info.distributed:
        log_if_main("Distributed JAX: %d processes, coordinator %s, settings from %s.", info.num_processes,
                    info.coordinator_address or "found by JAX", info.source)
    return info


def _start(settings: Settings, initialization_timeout: int) -> DistInfo:
    if settings.mode == "off" or (settings.num_processes == 1 and settings.mode != "on"):
        return _single(settings)
    import jax

    ids = settings.local_device_ids
    logging.info("Starting jax.distributed (%s): coordinator=%s num_processes=%s process_id=%s local_device_ids=%s",
                 settings.describe(), settings.coordinator_address, settings.num_processes, settings.process_id, ids)
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator_address, num_processes=settings.num_processes,
            process_id=settings.process_id, local_device_ids=list(ids) if ids is not None else None,
            initialization_timeout=initialization_timeout)
    except ValueError as e:
        # JAX's first check, reached before anything starts, when neither an address nor a cluster was found.
        if settings.mode == "auto" and not settings.configured and "coordinator_address" in str(e):
            return _single(settings)
        raise ValueError(
            f"jax.distributed.initialize: {str(e).rstrip('.')} (given: {settings.describe()}). Set "
            "--coordinator_address, --num_processes and --process_id (or the EAO_* variables), or run under "
            "SLURM, Open MPI, Kubernetes or on Cloud TPU, where JAX finds them.") from e
    except RuntimeError as e:
        raise RuntimeError(f"jax.distributed.initialize failed ({e}). eao_jax.distributed.initialize() must be "
                           "the first JAX call of the program, before anything touches jax devices.") from e
    info = DistInfo(jax.process_index(), jax.process_count(), settings.coordinator_address, ids,
                    settings.describe(), True)
    for name, want, got in (("num_processes", settings.num_processes, info.num_processes),
                            ("process_id", settings.process_id, info.process_id)):
        if want is not None and want != got:
            raise RuntimeError(f"asked for {name}={want} ({settings.sources.get(name)}) but JAX reports {got}")
    return info


def _single(settings: Settings) -> DistInfo:
    if settings.local_device_ids is not None:
        logging.warning("Single process: ignoring local device ids %s (from %s).", settings.local_device_ids,
                        settings.sources["local_device_ids"])
    return _SINGLE


def _check_consistent(info: DistInfo, coordinator_address, num_processes, process_id) -> None:
    for name, asked, have in (("coordinator_address", coordinator_address, info.coordinator_address),
                              ("num_processes", num_processes, info.num_processes),
                              ("process_id", process_id, info.process_id)):
        if asked is not None and have is not None and str(asked) != str(have):
            raise ValueError(f"distributed runtime already initialised with {name}={have!r}; cannot re-initialise "
                             f"with {name}={asked!r}")


def _reset_for_tests() -> None:
    """Forgets the cached :class:`DistInfo` (does not shut down a running runtime)."""
    global _INFO
    with _LOCK:
        _INFO = None


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, summaries and result files)."""
    if _INFO is not None:
        return _INFO.is_main
    import jax

    return jax.process_index() == 0


def log_if_main(msg: str, *args, level: int = logging.INFO) -> None:
    """``absl.logging.log`` on process 0 only."""
    if is_main_process():
        logging.log(level, msg, *args)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids, --distributed.

    Idempotent: flags that already exist in ``flag_values`` are left alone.
    """
    found = "JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud TPU)"
    specs = (
        (flags.DEFINE_string, "coordinator_address",
         f"HOST:PORT of process 0's JAX coordinator. Defaults to ${ENV['coordinator_address']}, "
         f"$JAX_COORDINATOR_ADDRESS or {found}."),
        (flags.DEFINE_integer, "num_processes",
         f"Total number of processes. Defaults to ${ENV['num_processes']} or {found}."),
        (flags.DEFINE_integer, "process_id",
         f"This process's id in [0, num_processes). Defaults to ${ENV['process_id']} or {found}."),
        (flags.DEFINE_list, "local_device_ids",
         f"Comma-separated local device ids this process uses. Defaults to ${ENV['local_device_ids']}, "
         "$JAX_LOCAL_DEVICE_IDS; under SLURM / Open MPI JAX picks one GPU per process (its local rank)."),
    )
    for define, name, help_text in specs:
        if name not in flag_values:
            define(name, None, help_text, flag_values=flag_values)
    if "distributed" not in flag_values:
        flags.DEFINE_enum("distributed", None, list(MODES),
                          "auto: start jax.distributed when configured or when JAX detects a cluster; off: never; "
                          f"on: always. Defaults to ${ENV_MODE} or auto.", flag_values=flag_values)


def initialize_from_flags(flag_values: flags.FlagValues = flags.FLAGS, **kwargs) -> DistInfo:
    """:func:`initialize` with the values of the flags from :func:`define_flags` (after parsing)."""
    return initialize(
        coordinator_address=flag_values["coordinator_address"].value,
        num_processes=flag_values["num_processes"].value,
        process_id=flag_values["process_id"].value,
        local_device_ids=flag_values["local_device_ids"].value,
        mode=flag_values["distributed"].value,
        **kwargs,
    )
