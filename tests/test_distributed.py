"""eao_jax.distributed: setting precedence, validation, and a real 2-process jax.distributed run."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
from absl import flags, logging

from eao_jax import distributed as dist

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Every variable resolve() may read; each test starts from an environment without them.
_DIST_VARS = (
    "EAO_COORDINATOR_ADDRESS", "EAO_NUM_PROCESSES", "EAO_PROCESS_ID", "EAO_LOCAL_DEVICE_IDS",
    "EAO_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
)

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[01-02]", "SLURM_NTASKS": "8",
         "SLURM_PROCID": "5", "SLURM_LOCALID": "1"}


@pytest.fixture
def clean(monkeypatch):
    """No distributed env vars, no TPU, no cached DistInfo, absl verbosity restored afterwards."""
    for name in _DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(dist, "on_cloud_tpu_vm", lambda: False)
    verbosity = logging.get_verbosity()
    dist._reset_for_tests()
    yield monkeypatch
    dist._reset_for_tests()
    logging.set_verbosity(verbosity)


# --------------------------------------------------------------------------------------------
# resolve(): precedence


def test_nothing_configured_is_single_process():
    plan = dist.resolve(env={}, tpu_vm=False)
    assert plan.action == "single"
    assert (plan.num_processes, plan.process_id, plan.coordinator_address) == (1, 0, None)


def test_explicit_arguments_beat_env():
    env = {"EAO_COORDINATOR_ADDRESS": "10.0.0.9:9999", "EAO_NUM_PROCESSES": "8", "EAO_PROCESS_ID": "7",
           "JAX_COORDINATOR_ADDRESS": "10.0.0.8:8888"}
    plan = dist.resolve("10.0.0.1:1234", 4, 2, [0, 1], env=env, tpu_vm=False)
    assert plan.action == "initialize"
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("10.0.0.1:1234", 4, 2)
    assert plan.local_device_ids == (0, 1)
    assert plan.sources == {"coordinator_address": "--coordinator_address",
                            "num_processes": "--num_processes", "process_id": "--process_id",
                            "local_device_ids": "--local_device_ids"}


def test_eao_env_beats_jax_env_and_each_setting_resolves_separately():
    env = {"EAO_COORDINATOR_ADDRESS": "host-a:1111", "JAX_COORDINATOR_ADDRESS": "host-b:2222",
           "EAO_NUM_PROCESSES": "3", "EAO_PROCESS_ID": "1", "JAX_LOCAL_DEVICE_IDS": "2,3"}
    plan = dist.resolve(process_id=2, env=env, tpu_vm=False)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("host-a:1111", 3, 2)
    assert plan.local_device_ids == (2, 3)
    assert plan.sources["coordinator_address"] == "EAO_COORDINATOR_ADDRESS"
    assert plan.sources["process_id"] == "--process_id"
    assert plan.sources["local_device_ids"] == "JAX_LOCAL_DEVICE_IDS"

    env.pop("EAO_COORDINATOR_ADDRESS")
    plan = dist.resolve(env=env, tpu_vm=False)
    assert plan.coordinator_address == "host-b:2222"
    assert plan.sources["coordinator_address"] == "JAX_COORDINATOR_ADDRESS"


def test_empty_env_values_count_as_unset():
    env = {"EAO_COORDINATOR_ADDRESS": "", "EAO_NUM_PROCESSES": "  ", "EAO_PROCESS_ID": ""}
    assert dist.resolve(env=env, tpu_vm=False).action == "single"


def test_one_process_never_starts_the_runtime():
    assert dist.resolve("127.0.0.1:1234", 1, 0, env={}, tpu_vm=False).action == "single"
    assert dist.resolve(env={**SLURM, "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, tpu_vm=False).action == "single"
    # ... unless forced on (a 1-process runtime still gives JAX's preemption sync point).
    assert dist.resolve("127.0.0.1:1234", 1, 0, mode="on", env={}, tpu_vm=False).action == "initialize"


def test_slurm_fills_count_and_id_and_leaves_the_address_to_jax():
    plan = dist.resolve(env=SLURM, tpu_vm=False)
    assert plan.action == "initialize" and plan.cluster == "slurm"
    assert (plan.num_processes, plan.process_id, plan.coordinator_address) == (8, 5, None)
    assert plan.sources == {"num_processes": "SLURM_NTASKS", "process_id": "SLURM_PROCID"}
    # The sbatch script exports the first node as coordinator; env beats SLURM values.
    plan = dist.resolve(env={**SLURM, "EAO_COORDINATOR_ADDRESS": "gpu01:12355", "EAO_NUM_PROCESSES": "16"},
                        tpu_vm=False)
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == ("gpu01:12355", 16, 5)
    # Missing SLURM_LOCALID: not a step JAX recognises, so nothing is detected.
    partial = {k: v for k, v in SLURM.items() if k != "SLURM_LOCALID"}
    assert dist.resolve(env=partial, tpu_vm=False).action == "single"


def test_open_mpi_detection():
    env = {"OMPI_MCA_orte_hnp_uri": "123.0;tcp://10.1.2.3:5000", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_RANK": "3"}
    plan = dist.resolve(env=env, tpu_vm=False)
    assert (plan.action, plan.cluster, plan.num_processes, plan.process_id) == ("initialize", "ompi", 4, 3)


def test_cloud_tpu_vm_calls_initialize_without_arguments():
    plan = dist.resolve(env={}, tpu_vm=True)
    assert plan.action == "initialize" and plan.cluster == "tpu"
    assert (plan.coordinator_address, plan.num_processes, plan.process_id) == (None, None, None)


def test_mode_on_and_off():
    plan = dist.resolve(env={"EAO_DISTRIBUTED": "on"}, tpu_vm=False)
    assert plan.action == "initialize" and plan.num_processes is None
    everything = {**SLURM, "EAO_COORDINATOR_ADDRESS": "h:1", "EAO_NUM_PROCESSES": "2", "EAO_PROCESS_ID": "1"}
    assert dist.resolve(env={**everything, "EAO_DISTRIBUTED": "off"}, tpu_vm=True).action == "single"
    # The argument beats the env var.
    assert dist.resolve(mode="auto", env={**everything, "EAO_DISTRIBUTED": "off"},
                        tpu_vm=False).action == "initialize"


# --------------------------------------------------------------------------------------------
# resolve(): validation errors name the flag or env var


@pytest.mark.parametrize(
    "kwargs, env, pattern",
    [
        ({}, {"EAO_COORDINATOR_ADDRESS": "localhost", "EAO_NUM_PROCESSES": "2", "EAO_PROCESS_ID": "0"},
         r"EAO_COORDINATOR_ADDRESS='localhost' is not HOST:PORT"),
        ({"coordinator_address": "10.0.0.1:70000", "num_processes": 2, "process_id": 0}, {},
         r"--coordinator_address='10.0.0.1:70000': port 70000 is outside"),
        ({}, {"JAX_COORDINATOR_ADDRESS": "a b:12", "EAO_NUM_PROCESSES": "2", "EAO_PROCESS_ID": "0"},
         r"JAX_COORDINATOR_ADDRESS='a b:12' is not HOST:PORT"),
        ({}, {"EAO_COORDINATOR_ADDRESS": "h:1", "EAO_NUM_PROCESSES": "two", "EAO_PROCESS_ID": "0"},
         r"EAO_NUM_PROCESSES='two' is not an integer"),
        ({"coordinator_address": "h:1", "num_processes": 0, "process_id": 0}, {},
         r"--num_processes=0 must be >= 1"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": -1}, {},
         r"--process_id=-1 must be >= 0"),
        ({}, {"EAO_COORDINATOR_ADDRESS": "h:1", "EAO_NUM_PROCESSES": "2", "EAO_PROCESS_ID": "2"},
         r"EAO_PROCESS_ID=2 is out of range for EAO_NUM_PROCESSES=2: process ids run from 0 to 1"),
        ({"process_id": 3}, {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "n1", "SLURM_NTASKS": "2",
                             "SLURM_PROCID": "1", "SLURM_LOCALID": "0"},
         r"--process_id=3 is out of range for SLURM_NTASKS=2"),
        ({"num_processes": 2, "process_id": 1}, {},
         r"2 processes need a coordinator: set --coordinator_address or EAO_COORDINATOR_ADDRESS"),
        ({}, {"EAO_COORDINATOR_ADDRESS": "h:1", "EAO_PROCESS_ID": "1"},
         r"number of processes is unknown \(EAO_COORDINATOR_ADDRESS, EAO_PROCESS_ID given\): "
         r"set --num_processes or EAO_NUM_PROCESSES"),
        ({"coordinator_address": "h:1", "num_processes": 4}, {},
         r"process's id is unknown .*set --process_id or EAO_PROCESS_ID"),
        ({}, {"EAO_LOCAL_DEVICE_IDS": "0,a"}, r"EAO_LOCAL_DEVICE_IDS entry='a' is not an integer"),
        ({"local_device_ids": "1,1"}, {}, r"--local_device_ids='1,1' repeats a device id"),
        ({}, {"EAO_DISTRIBUTED": "maybe"}, r"EAO_DISTRIBUTED='maybe' must be one of auto, on, off"),
        # mode=off still rejects malformed settings instead of ignoring a typo.
        ({"mode": "off"}, {"EAO_COORDINATOR_ADDRESS": "h:port"}, r"EAO_COORDINATOR_ADDRESS='h:port'"),
    ],
)
def test_bad_settings_fail_naming_their_source(kwargs, env, pattern):
    with pytest.raises(ValueError, match=pattern):
        dist.resolve(**kwargs, env=env, tpu_vm=False)


@pytest.mark.parametrize("address", ["10.0.0.1:8476", "node001.cluster:1", "[::1]:65535", "my_host-2:80"])
def test_good_addresses(address):
    assert dist.check_address(address, "X") == address


# --------------------------------------------------------------------------------------------
# initialize(): single process, caching, flags, logging (the runtime start itself is faked here)


def test_single_process_does_not_touch_jax_distributed(clean):
    import jax

    def boom(*a, **k):
        raise AssertionError("jax.distributed.initialize must not be called")

    clean.setattr(jax.distributed, "initialize", boom)
    info = dist.initialize()
    assert info == dist.DistInfo(0, 1, None, None, "single", False)
    assert dist.initialize() is info
    assert dist.get_info() is info and dist.is_main_process()


def _fake_start(calls):
    def start(plan, timeout):
        calls.append(plan)
        return dist.DistInfo(plan.process_id, plan.num_processes, plan.coordinator_address,
                             plan.local_device_ids, plan.describe(), True)
    return start


def test_initialize_from_flags_is_idempotent_and_rejects_conflicts(clean):
    calls = []
    clean.setattr(dist, "_start", _fake_start(calls))
    clean.setenv("EAO_NUM_PROCESSES", "99")  # a flag beats the env var
    fv = flags.FlagValues()
    dist.define_flags(fv)
    dist.define_flags(fv)  # second call is a no-op, not a DuplicateFlagError
    fv(["prog", "--coordinator_address=10.1.1.1:8476", "--num_processes=4", "--process_id=3",
        "--local_device_ids=0,1"])
    logging.set_verbosity(logging.INFO)
    info = dist.initialize_from_flags(fv)
    assert (info.process_id, info.num_processes, info.coordinator_address) == (3, 4, "10.1.1.1:8476")
    assert info.local_device_ids == (0, 1) and info.distributed and not info.is_main
    assert len(calls) == 1 and calls[0].sources["num_processes"] == "--num_processes"
    # Process 3 is quiet: INFO is dropped, warnings still show.
    assert logging.get_verbosity() == logging.WARNING
    assert not dist.is_main_process()

    assert dist.initialize() is info  # second call: cached, no second start
    assert dist.initialize(process_id=3) is info
    assert len(calls) == 1
    with pytest.raises(ValueError, match=r"already initialised with process_id=3.*process_id=1"):
        dist.initialize(process_id=1)


def test_log_if_main_only_logs_on_process_zero(clean):
    logged = []
    clean.setattr(logging, "log", lambda level, msg, *args: logged.append(msg % args))
    clean.setattr(dist, "_INFO", dist.DistInfo(1, 2, "h:1", None, "x", True))
    dist.log_if_main("step %d", 5)
    assert logged == []
    clean.setattr(dist, "_INFO", dist.DistInfo(0, 2, "h:1", None, "x", True))
    dist.log_if_main("step %d", 5)
    assert logged == ["step 5"]


# --------------------------------------------------------------------------------------------
# A real 2-process run on CPU: 2 processes x 2 fake devices, loopback coordinator.

_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from eao_jax import distributed as dist

    how, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if how == "env":  # EAO_* variables set by the parent
        info = dist.initialize()
    else:
        info = dist.initialize(f"127.0.0.1:{port}", 2, pid)
    assert dist.initialize() is info  # safe to call twice

    import jax
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(AxisType.Auto,))
    local = np.arange(1, 3, dtype=np.float32) + 2 * info.process_id  # (2,): [1,2] and [3,4]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local, (4,))
    psum = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, "data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(x)
    gathered = multihost_utils.process_allgather(x, tiled=True)
    print("RESULT " + json.dumps({
        "process_id": info.process_id, "num_processes": info.num_processes,
        "source": info.source, "distributed": info.distributed, "is_main": dist.is_main_process(),
        "process_index": jax.process_index(), "process_count": jax.process_count(),
        "device_count": jax.device_count(), "local_device_count": jax.local_device_count(),
        "psum": np.asarray(psum.addressable_data(0)).tolist(), "gathered": np.asarray(gathered).tolist(),
    }))
    """
)


def test_two_processes_initialise_and_psum():
    import portpicker

    port = portpicker.pick_unused_port()
    base = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    base.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                PYTHONPATH=os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]))
    env0 = {**base, "EAO_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "EAO_NUM_PROCESSES": "2",
            "EAO_PROCESS_ID": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, "env", str(port), "0"], env=env0,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-c", _WORKER, "args", str(port), "1"], env=base,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    ]
    start = time.monotonic()
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=max(5.0, 90 - (time.monotonic() - start)))
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    results = []
    for rc, out, err in outputs:
        assert rc == 0, f"worker failed (rc={rc}):\n{out}\n{err[-4000:]}"
        line = next(ln for ln in out.splitlines() if ln.startswith("RESULT "))
        results.append(json.loads(line[len("RESULT "):]))

    for pid, r in enumerate(results):
        assert (r["process_id"], r["process_index"]) == (pid, pid)
        assert r["num_processes"] == r["process_count"] == 2
        assert r["device_count"] == 4 and r["local_device_count"] == 2
        assert r["distributed"] and r["is_main"] == (pid == 0)
        assert r["psum"] == [10.0]  # 1 + 2 + 3 + 4 over the 4 devices of both processes
        assert r["gathered"] == [1.0, 2.0, 3.0, 4.0]
    assert "EAO_COORDINATOR_ADDRESS" in results[0]["source"]
    assert "--coordinator_address" in results[1]["source"]
