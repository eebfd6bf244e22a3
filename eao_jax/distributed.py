"""Multi-process (multi-host) start-up through JAX's distributed runtime.

Call :func:`initialize` first thing in a program, before any JAX computation (even
``jax.devices()``), then build meshes from ``jax.devices()`` as usual.

Where each setting comes from, highest precedence first (per setting):

1. an explicit argument of :func:`initialize` (``main``/``evaluate`` pass their
   ``--coordinator_address``, ``--num_processes``, ``--process_id``, ``--local_device_ids``
   flags, see :func:`define_flags` and :func:`initialize_from_flags`);
2. ``EAO_COORDINATOR_ADDRESS``, ``EAO_NUM_PROCESSES``, ``EAO_PROCESS_ID``, ``EAO_LOCAL_DEVICE_IDS``;
3. the variables JAX itself reads: ``JAX_COORDINATOR_ADDRESS``, ``JAX_LOCAL_DEVICE_IDS``
   (JAX defines no variable for the process count or id);
4. cluster detection: SLURM (``SLURM_NTASKS``, ``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ...)
   and Open MPI (``OMPI_COMM_WORLD_SIZE``, ``OMPI_COMM_WORLD_RANK``), read from the environment;
   a missing coordinator address is then derived by JAX's own cluster support (first node of
   the SLURM step, port from the job id or ``JAX_COORDINATOR_PORT``). On a Cloud TPU VM (TPU
   chips plus ``libtpu``) with nothing configured, ``jax.distributed.initialize()`` is called
   with no arguments and JAX reads the TPU metadata (this also enables JAX's preemption sync
   point on single-host TPU VMs, which Orbax uses to save on preemption).

With nothing configured (and not on a TPU VM, not under a multi-task SLURM/MPI step) the program
stays single-process and ``jax.distributed.initialize`` is not called. ``EAO_DISTRIBUTED`` (or
``--distributed``) = ``auto`` (default) | ``off`` (never initialise) | ``on`` (always call
``jax.distributed.initialize``, leaving unset values to JAX's auto-detection).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import threading
from collections.abc import Mapping, Sequence

from absl import flags, logging

ENV_COORDINATOR = "EAO_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "EAO_NUM_PROCESSES"
ENV_PROCESS_ID = "EAO_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "EAO_LOCAL_DEVICE_IDS"
ENV_MODE = "EAO_DISTRIBUTED"
JAX_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
JAX_ENV_LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"

# The variables JAX's SLURM support requires (jax/_src/clusters/slurm_cluster.py).
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_OMPI_URI = "OMPI_MCA_orte_hnp_uri"  # present only under mpirun/mpiexec (what JAX checks)

MODES = ("auto", "on", "off")

# HOST:PORT where HOST is a name, an IPv4 address or a bracketed IPv6 address.
_ADDRESS_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.\-]+):(\d{1,5})$")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """What :func:`initialize` set up.

    Attributes:
      process_id: this process's index, ``jax.process_index()``.
      num_processes: ``jax.process_count()``.
      coordinator_address: HOST:PORT of the coordinator, None when single-process.
      local_device_ids: devices this process was restricted to, None for all visible ones.
      source: where the settings came from (e.g. "EAO_* env", "slurm", "tpu", "single").
      distributed: True when ``jax.distributed`` is initialised.
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


@dataclasses.dataclass(frozen=True)
class Plan:
    """What :func:`resolve` decided, before anything is started.

    ``action`` is "single" (do not call ``jax.distributed.initialize``) or "initialize".
    Unset (None) values in an "initialize" plan are left to JAX's cluster auto-detection.
    ``sources`` maps each setting to the flag / env var / detector it came from.
    """

    action: str
    coordinator_address: str | None
    num_processes: int | None
    process_id: int | None
    local_device_ids: tuple[int, ...] | None
    cluster: str | None
    sources: Mapping[str, str]

    def describe(self) -> str:
        if self.action == "single":
            return "single"
        return ", ".join(sorted(set(self.sources.values()))) or "jax auto-detection"


_LOCK = threading.Lock()
_INFO: DistInfo | None = None


# --------------------------------------------------------------------------------------------
# Parsing and validation (pure functions, unit-tested without starting anything)


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _parse_int(value: object, label: str, *, minimum: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{label}={value!r} must be an integer")
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{label}={value!r} is not an integer") from None
    if isinstance(value, float) and value != number:
        raise ValueError(f"{label}={value!r} is not an integer")
    if number < minimum:
        raise ValueError(f"{label}={number} must be >= {minimum}")
    return number


def check_address(address: object, label: str) -> str:
    """Returns ``address`` if it is HOST:PORT with 1 <= PORT <= 65535, else a ValueError naming ``label``."""
    if not isinstance(address, str):
        raise ValueError(f"{label}={address!r} must be a HOST:PORT string")
    match = _ADDRESS_RE.match(address.strip())
    if not match:
        raise ValueError(
            f"{label}={address!r} is not HOST:PORT (e.g. 10.0.0.1:8476, node001:8476 or [::1]:8476)"
        )
    port = int(match.group(1))
    if not 1 <= port <= 65535:
        raise ValueError(f"{label}={address!r}: port {port} is outside 1..65535")
    return address.strip()


def parse_device_ids(value: object, label: str) -> tuple[int, ...]:
    """Parses ``"0,1,2"`` / ``[0, 1, 2]`` / ``3`` into a tuple of distinct non-negative ints."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
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


def _pick(explicit: object, flag: str, env: Mapping[str, str], env_names: Sequence[str]):
    """(value, label) of the highest-precedence setting: explicit > each env var in order."""
    if explicit is not None:
        return explicit, flag
    for name in env_names:
        value = _env_value(env, name)
        if value is not None:
            return value, name
    return None, None


def on_cloud_tpu_vm() -> bool:
    """True on a Cloud TPU VM with libtpu installed (no network access, no JAX backend start)."""
    if importlib.util.find_spec("libtpu") is None and not os.environ.get("TPU_LIBRARY_PATH"):
        return False
    try:  # JAX's own PCI scan for TPU chips (the check jax uses at import on TPU VMs).
        from jax._src import hardware_utils

        num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
        return num_chips > 0
    except (ImportError, AttributeError, OSError):
        return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"))


def _detect_cluster(env: Mapping[str, str]) -> tuple[str | None, dict[str, tuple[str, str]]]:
    """Returns (cluster name, {setting: (raw value, env var)}) for SLURM / Open MPI, else (None, {})."""
    if all(_env_value(env, v) is not None for v in _SLURM_VARS):
        return "slurm", {
            "num_processes": (env["SLURM_NTASKS"], "SLURM_NTASKS"),
            "process_id": (env["SLURM_PROCID"], "SLURM_PROCID"),
        }
    if _env_value(env, _OMPI_URI) is not None:
        found = {}
        if _env_value(env, "OMPI_COMM_WORLD_SIZE") is not None:
            found["num_processes"] = (env["OMPI_COMM_WORLD_SIZE"], "OMPI_COMM_WORLD_SIZE")
        if _env_value(env, "OMPI_COMM_WORLD_RANK") is not None:
            found["process_id"] = (env["OMPI_COMM_WORLD_RANK"], "OMPI_COMM_WORLD_RANK")
        return "ompi", found
    return None, {}


def resolve(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | int | str | None = None,
    *,
    mode: str | None = None,
    env: Mapping[str, str] | None = None,
    tpu_vm: bool | None = None,
) -> Plan:
    """Decides whether and how to start JAX's distributed runtime. Starts nothing.

    Args:
      coordinator_address, num_processes, process_id, local_device_ids: explicit settings
        (highest precedence); None means "not given".
      mode: "auto" | "on" | "off"; None reads ``EAO_DISTRIBUTED`` (default "auto").
      env: environment to read (default ``os.environ``).
      tpu_vm: whether this is a Cloud TPU VM; None detects it (only when needed).

    Raises:
      ValueError: a malformed or inconsistent setting; the message names its flag / env var.
    """
    env = os.environ if env is None else env
    if mode is None:
        mode_value, mode_label = _env_value(env, ENV_MODE) or "auto", ENV_MODE
    else:
        mode_value, mode_label = mode, "--distributed"
    mode_value = mode_value.lower()
    if mode_value not in MODES:
        raise ValueError(f"{mode_label}={mode_value!r} must be one of {', '.join(MODES)}")

    sources: dict[str, str] = {}
    addr, addr_label = _pick(coordinator_address, "--coordinator_address", env,
                             (ENV_COORDINATOR, JAX_ENV_COORDINATOR))
    n, n_label = _pick(num_processes, "--num_processes", env, (ENV_NUM_PROCESSES,))
    pid, pid_label = _pick(process_id, "--process_id", env, (ENV_PROCESS_ID,))
    ids, ids_label = _pick(local_device_ids, "--local_device_ids", env,
                           (ENV_LOCAL_DEVICE_IDS, JAX_ENV_LOCAL_DEVICE_IDS))

    # Validate everything that was given, even when mode=off, so typos never pass silently.
    if addr is not None:
        addr = check_address(addr, addr_label)
        sources["coordinator_address"] = addr_label
    if n is not None:
        n = _parse_int(n, n_label, minimum=1)
        sources["num_processes"] = n_label
    if pid is not None:
        pid = _parse_int(pid, pid_label, minimum=0)
        sources["process_id"] = pid_label
    if ids is not None:
        ids = parse_device_ids(ids, ids_label)
        sources["local_device_ids"] = ids_label

    def single() -> Plan:
        return Plan("single", None, 1, 0, ids, None, sources)

    if mode_value == "off":
        return single()

    cluster, detected = _detect_cluster(env)
    if n is None and "num_processes" in detected:
        raw, label = detected["num_processes"]
        n = _parse_int(raw, label, minimum=1)
        sources["num_processes"] = label
    if pid is None and "process_id" in detected:
        raw, label = detected["process_id"]
        pid = _parse_int(raw, label, minimum=0)
        sources["process_id"] = label
    if cluster is None and None in (addr, n, pid):
        # Only look at the hardware when something is left for JAX's TPU detection to fill.
        if tpu_vm if tpu_vm is not None else on_cloud_tpu_vm():
            cluster = "tpu"
    jax_fills_missing = cluster is not None or mode_value == "on"

    if n is not None and pid is not None and pid >= n:
        raise ValueError(
            f"{sources['process_id']}={pid} is out of range for {sources['num_processes']}={n}: "
            f"process ids run from 0 to {n - 1}"
        )
    if addr is None and n is None and pid is None:
        if jax_fills_missing:
            return Plan("initialize", None, None, None, ids, cluster, sources)
        return single()
    if n == 1 and mode_value != "on":
        return single()
    if not jax_fills_missing:
        given = ", ".join(f"{sources[k]}" for k in ("coordinator_address", "num_processes", "process_id")
                          if k in sources)
        if n is None:
            raise ValueError(
                f"the number of processes is unknown ({given} given): set --num_processes or "
                f"{ENV_NUM_PROCESSES}"
            )
        if pid is None:
            raise ValueError(
                f"this process's id is unknown ({given} given): set --process_id or {ENV_PROCESS_ID}"
            )
        if addr is None:
            raise ValueError(
                f"{n} processes need a coordinator: set --coordinator_address or {ENV_COORDINATOR} "
                f"(or {JAX_ENV_COORDINATOR}) to HOST:PORT of process 0"
            )
    return Plan("initialize", addr, n, pid, ids, cluster, sources)


# --------------------------------------------------------------------------------------------
# Starting the runtime


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
    """Starts JAX's distributed runtime when configured (see the module docstring), else nothing.

    Must run before any JAX computation. Safe to call more than once: later calls return the
    first call's :class:`DistInfo` (a later call that names different explicit settings raises).

    Args:
      coordinator_address: HOST:PORT of process 0's coordinator service.
      num_processes: total number of processes.
      process_id: this process's id in [0, num_processes).
      local_device_ids: restrict this process to these local devices (GPU: one process per GPU).
      mode: "auto" | "on" | "off" (None reads ``EAO_DISTRIBUTED``, default "auto").
      initialization_timeout: seconds to wait for all processes to connect.
      quiet_non_main: lower absl logging to WARNING on processes other than 0.

    Returns:
      The :class:`DistInfo` of this process.
    """
    global _INFO
    with _LOCK:
        if _INFO is not None:
            _check_consistent(_INFO, coordinator_address, num_processes, process_id)
            return _INFO

        import jax

        if jax.distributed.is_initialized():  # started by someone else: report, don't restart
            info = DistInfo(jax.process_index(), jax.process_count(), _jax_coordinator_address(),
                            None, "already initialised", True)
        else:
            plan = resolve(coordinator_address, num_processes, process_id, local_device_ids, mode=mode)
            if plan.action == "single":
                if plan.local_device_ids is not None:
                    logging.warning("Single process: ignoring local device ids %s (from %s).",
                                    plan.local_device_ids, plan.sources.get("local_device_ids"))
                info = DistInfo(0, 1, None, None, "single", False)
            else:
                info = _start(plan, initialization_timeout)
        _INFO = info
    if quiet_non_main:
        configure_logging(info.process_id)
    if info.distributed:
        log_if_main(
            "Distributed JAX: %d processes, coordinator %s, settings from %s.",
            info.num_processes, info.coordinator_address, info.source,
        )
    return info


def _start(plan: Plan, initialization_timeout: int) -> DistInfo:
    import jax

    logging.info("Starting jax.distributed (%s): coordinator=%s num_processes=%s process_id=%s "
                 "local_device_ids=%s", plan.describe(), plan.coordinator_address, plan.num_processes,
                 plan.process_id, plan.local_device_ids)
    try:
        jax.distributed.initialize(
            coordinator_address=plan.coordinator_address,
            num_processes=plan.num_processes,
            process_id=plan.process_id,
            local_device_ids=list(plan.local_device_ids) if plan.local_device_ids is not None else None,
            initialization_timeout=initialization_timeout,
        )
    except RuntimeError as e:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({e}). eao_jax.distributed.initialize() must be the "
            "first JAX call of the program, before anything touches jax devices."
        ) from e
    info = DistInfo(
        process_id=jax.process_index(),
        num_processes=jax.process_count(),
        coordinator_address=plan.coordinator_address or _jax_coordinator_address(),
        local_device_ids=plan.local_device_ids,
        source=plan.describe(),
        distributed=True,
    )
    for name, want, got in (("num_processes", plan.num_processes, info.num_processes),
                            ("process_id", plan.process_id, info.process_id)):
        if want is not None and want != got:
            raise RuntimeError(f"asked for {name}={want} ({plan.sources.get(name)}) but JAX reports {got}")
    return info


def _jax_coordinator_address() -> str | None:
    try:  # the address JAX derived itself (SLURM / TPU detection); not public API.
        from jax._src import distributed as jax_distributed

        return jax_distributed.global_state.coordinator_address
    except (ImportError, AttributeError):
        return None


def _check_consistent(info: DistInfo, coordinator_address, num_processes, process_id) -> None:
    for name, asked, have in (("coordinator_address", coordinator_address, info.coordinator_address),
                              ("num_processes", num_processes, info.num_processes),
                              ("process_id", process_id, info.process_id)):
        if asked is not None and str(asked) != str(have):
            raise ValueError(
                f"distributed runtime already initialised with {name}={have!r}; cannot re-initialise "
                f"with {name}={asked!r}"
            )


def get_info() -> DistInfo | None:
    """The :class:`DistInfo` of the first :func:`initialize` call, or None before it."""
    return _INFO


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


# --------------------------------------------------------------------------------------------
# Logging


def configure_logging(process_id: int | None = None) -> None:
    """On processes other than 0, only WARNING and above are logged (all hosts log the same steps)."""
    if process_id is None:
        process_id = 0 if is_main_process() else 1
    if process_id != 0:
        logging.set_verbosity(logging.WARNING)


def log_if_main(msg: str, *args, level: int = logging.INFO) -> None:
    """``absl.logging.log`` on process 0 only."""
    if is_main_process():
        logging.log(level, msg, *args)


# --------------------------------------------------------------------------------------------
# Flags for main / evaluate


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --coordinator_address, --num_processes, --process_id, --local_device_ids, --distributed.

    Idempotent: flags that already exist in ``flag_values`` are left alone.
    """
    def missing(name: str) -> bool:
        return name not in flag_values

    if missing("coordinator_address"):
        flags.DEFINE_string(
            "coordinator_address", None,
            f"HOST:PORT of process 0's JAX coordinator (multi-process runs off Cloud TPU). "
            f"Defaults to ${ENV_COORDINATOR}, ${JAX_ENV_COORDINATOR}, or SLURM/TPU detection.",
            flag_values=flag_values)
    if missing("num_processes"):
        flags.DEFINE_integer(
            "num_processes", None,
            f"Total number of processes. Defaults to ${ENV_NUM_PROCESSES} or SLURM_NTASKS.",
            flag_values=flag_values)
    if missing("process_id"):
        flags.DEFINE_integer(
            "process_id", None,
            f"This process's id in [0, num_processes). Defaults to ${ENV_PROCESS_ID} or SLURM_PROCID.",
            flag_values=flag_values)
    if missing("local_device_ids"):
        flags.DEFINE_list(
            "local_device_ids", None,
            f"Comma-separated local device ids this process uses. Defaults to ${ENV_LOCAL_DEVICE_IDS}, "
            f"${JAX_ENV_LOCAL_DEVICE_IDS}; under SLURM JAX picks one GPU per task (SLURM_LOCALID).",
            flag_values=flag_values)
    if missing("distributed"):
        flags.DEFINE_enum(
            "distributed", None, list(MODES),
            f"auto: start jax.distributed when configured or detected; off: never; on: always. "
            f"Defaults to ${ENV_MODE} or auto.",
            flag_values=flag_values)


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
