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

# Settings a parent process (a cluster job running the tests) could pass on; each test runs without them.
_DIST_VARS = (
    "EAO_COORDINATOR_ADDRESS", "EAO_NUM_PROCESSES", "EAO_PROCESS_ID", "EAO_LOCAL_DEVICE_IDS",
    "EAO_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT",
    "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
    "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "KUBERNETES_SERVICE_HOST",
)
# JAX's own error when it finds neither a coordinator address nor a cluster.
_NO_CLUSTER = ValueError("coordinator_address should be defined.")


@pytest.fixture
def clean(monkeypatch):
    """No distributed env vars, no cached DistInfo, absl verbosity restored afterwards."""
    for name in _DIST_VARS:
        monkeypatch.delenv(name, raising=False)
    verbosity = logging.get_verbosity()
    dist._reset_for_tests()
    yield monkeypatch
    dist._reset_for_tests()
    logging.set_verbosity(verbosity)


def _fake_jax_initialize(monkeypatch, error: Exception | None = None) -> list[dict]:
    """Replaces jax.distributed.initialize; returns the list its calls' arguments are appended to."""
    import jax

    calls: list[dict] = []

    def fake(**kwargs):
        calls.append(kwargs)
        if error is not None:
            raise error

    monkeypatch.setattr(jax.distributed, "initialize", fake)
    return calls


# --------------------------------------------------------------------------------------------
# resolve(): precedence


def test_nothing_configured_leaves_everything_to_jax():
    settings = dist.resolve(env={})
    assert settings == dist.Settings("auto")
    assert not settings.configured and settings.describe() == "JAX cluster detection"


def test_explicit_arguments_beat_env():
    env = {"EAO_COORDINATOR_ADDRESS": "10.0.0.9:9999", "EAO_NUM_PROCESSES": "8", "EAO_PROCESS_ID": "7"}
    s = dist.resolve("10.0.0.1:1234", 4, 2, [0, 1], env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == (
        "10.0.0.1:1234", 4, 2, (0, 1))
    assert s.sources == {"coordinator_address": "--coordinator_address", "num_processes": "--num_processes",
                         "process_id": "--process_id", "local_device_ids": "--local_device_ids"}


def test_each_setting_resolves_separately_and_jax_variables_are_left_to_jax():
    env = {"EAO_COORDINATOR_ADDRESS": "host-a:1111", "EAO_NUM_PROCESSES": "3", "EAO_LOCAL_DEVICE_IDS": "2,3",
           "JAX_COORDINATOR_ADDRESS": "host-b:2222", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    s = dist.resolve(process_id=2, env=env)
    assert (s.coordinator_address, s.num_processes, s.process_id, s.local_device_ids) == ("host-a:1111", 3, 2, (2, 3))
    assert s.sources == {"coordinator_address": "EAO_COORDINATOR_ADDRESS", "num_processes": "EAO_NUM_PROCESSES",
                         "process_id": "--process_id", "local_device_ids": "EAO_LOCAL_DEVICE_IDS"}
    # JAX reads its own variables and the cluster's; resolve() does not.
    s = dist.resolve(env={k: v for k, v in env.items() if not k.startswith("EAO_")})
    assert s == dist.Settings("auto")


def test_empty_env_values_count_as_unset():
    env = {"EAO_COORDINATOR_ADDRESS": "", "EAO_NUM_PROCESSES": "  ", "EAO_PROCESS_ID": "", "EAO_DISTRIBUTED": ""}
    assert dist.resolve(env=env) == dist.Settings("auto")


def test_mode_argument_beats_env():
    assert dist.resolve(env={"EAO_DISTRIBUTED": "OFF"}).mode == "off"
    assert dist.resolve(mode="auto", env={"EAO_DISTRIBUTED": "off"}).mode == "auto"


# --------------------------------------------------------------------------------------------
# resolve(): validation errors name the flag or env var


@pytest.mark.parametrize(
    "kwargs, env, pattern",
    [
        ({}, {"EAO_COORDINATOR_ADDRESS": "localhost"}, r"EAO_COORDINATOR_ADDRESS='localhost' is not HOST:PORT"),
        ({"coordinator_address": "10.0.0.1:70000"}, {},
         r"--coordinator_address='10.0.0.1:70000': port 70000 is outside"),
        ({"coordinator_address": "a b:12"}, {}, r"--coordinator_address='a b:12' is not HOST:PORT"),
        ({}, {"EAO_NUM_PROCESSES": "two"}, r"EAO_NUM_PROCESSES='two' is not an integer"),
        ({"num_processes": 0}, {}, r"--num_processes=0 must be >= 1"),
        ({"process_id": -1}, {}, r"--process_id=-1 must be >= 0"),
        ({}, {"EAO_NUM_PROCESSES": "2", "EAO_PROCESS_ID": "2"},
         r"EAO_PROCESS_ID=2 is out of range for EAO_NUM_PROCESSES=2: process ids run from 0 to 1"),
        ({"process_id": 3}, {"EAO_NUM_PROCESSES": "2"}, r"--process_id=3 is out of range for EAO_NUM_PROCESSES=2"),
        ({}, {"EAO_LOCAL_DEVICE_IDS": "0,a"}, r"EAO_LOCAL_DEVICE_IDS entry='a' is not an integer"),
        ({"local_device_ids": "1,1"}, {}, r"--local_device_ids='1,1' repeats a device id"),
        ({"local_device_ids": " , "}, {}, r"--local_device_ids=' , ' names no device ids"),
        ({}, {"EAO_DISTRIBUTED": "maybe"}, r"EAO_DISTRIBUTED='maybe' must be one of auto, on, off"),
        # mode=off still rejects malformed settings instead of ignoring a typo.
        ({"mode": "off"}, {"EAO_COORDINATOR_ADDRESS": "h:port"}, r"EAO_COORDINATOR_ADDRESS='h:port'"),
    ],
)
def test_bad_settings_fail_naming_their_source(kwargs, env, pattern):
    with pytest.raises(ValueError, match=pattern):
        dist.resolve(**kwargs, env=env)


@pytest.mark.parametrize("address", ["10.0.0.1:8476", "node001.cluster:1", "[::1]:65535", "my_host-2:80"])
def test_good_addresses(address):
    assert dist.check_address(address, "X") == address


# --------------------------------------------------------------------------------------------
# initialize(): when jax.distributed.initialize is called, and with what (JAX's side faked here)


def test_no_cluster_and_nothing_configured_is_single_process(clean):
    calls = _fake_jax_initialize(clean, _NO_CLUSTER)
    clean.setenv("EAO_LOCAL_DEVICE_IDS", "0,1")  # device ids alone do not make a multi-process run
    info = dist.initialize()
    assert info == dist.DistInfo(0, 1, None, None, "single", False)
    assert calls == [dict(coordinator_address=None, num_processes=None, process_id=None, local_device_ids=[0, 1],
                          initialization_timeout=300)]
    assert dist.initialize() is info and len(calls) == 1  # cached
    assert dist.is_main_process()


def test_off_and_one_process_never_call_jax(clean):
    calls = _fake_jax_initialize(clean)
    assert not dist.initialize(mode="off", coordinator_address="h:1", num_processes=2, process_id=1).distributed
    dist._reset_for_tests()
    assert not dist.initialize("127.0.0.1:1234", 1, 0).distributed
    assert calls == []
    dist._reset_for_tests()
    # ... unless forced on (a 1-process runtime still gives JAX's preemption sync point).
    assert dist.initialize("127.0.0.1:1234", 1, 0, mode="on").distributed
    assert len(calls) == 1


def test_unset_values_are_left_to_jax_cluster_detection(clean):
    # Inside a SLURM step of launch/slurm.sbatch: address and device ids exported, count and id from SLURM.
    calls = _fake_jax_initialize(clean)
    clean.setenv("EAO_COORDINATOR_ADDRESS", "gpu01:62002")
    clean.setenv("EAO_LOCAL_DEVICE_IDS", "0,1,2,3")
    info = dist.initialize()
    assert calls == [dict(coordinator_address="gpu01:62002", num_processes=None, process_id=None,
                          local_device_ids=[0, 1, 2, 3], initialization_timeout=300)]
    assert info.distributed and info.coordinator_address == "gpu01:62002" and info.local_device_ids == (0, 1, 2, 3)
    assert info.source == "EAO_COORDINATOR_ADDRESS, EAO_LOCAL_DEVICE_IDS"


@pytest.mark.parametrize(
    "kwargs, given",
    [({"process_id": 1}, r"given: --process_id"),  # configured, but incomplete and no cluster
     ({"mode": "on"}, r"given: JAX cluster detection")],  # forced on with nothing to go by
)
def test_incomplete_settings_without_a_cluster_fail_with_a_hint(clean, kwargs, given):
    _fake_jax_initialize(clean, _NO_CLUSTER)
    with pytest.raises(ValueError, match=rf"coordinator_address should be defined \({given}\)\. Set "
                                         r"--coordinator_address, --num_processes and --process_id"):
        dist.initialize(**kwargs)
    assert dist._INFO is None  # a failed start is not cached


def test_jax_errors_other_than_no_cluster_are_not_swallowed(clean):
    _fake_jax_initialize(clean, ValueError("process_id and num_processes must be nonnegative"))
    with pytest.raises(ValueError, match="process_id and num_processes must be nonnegative"):
        dist.initialize()
    _fake_jax_initialize(clean, RuntimeError("must be called before any JAX calls"))
    with pytest.raises(RuntimeError, match="must be the first JAX call of the program"):
        dist.initialize()


def _fake_start(calls):
    def start(settings, timeout):
        calls.append(settings)
        return dist.DistInfo(settings.process_id, settings.num_processes, settings.coordinator_address,
                             settings.local_device_ids, settings.describe(), True)
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
# Real runs on CPU: 2 processes x 2 fake devices with a loopback coordinator, and beside them one
# process with nothing configured, where JAX's own cluster detection finds nothing.

_WORKER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from eao_jax import distributed as dist

    how, port, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if how == "none":
        try:
            dist.initialize(process_id=1)
            error = None
        except ValueError as e:
            error = str(e)
        info = dist.initialize()  # the failed start left JAX untouched
        import jax
        import jax.numpy as jnp

        print("RESULT " + json.dumps({"error": error, "distributed": info.distributed, "source": info.source,
                                      "process_count": jax.process_count(), "sum": float(jnp.arange(4.0).sum())}))
        sys.exit(0)
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


def test_two_processes_initialise_and_psum_and_a_lone_process_stays_single():
    import portpicker

    port = portpicker.pick_unused_port()
    base = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
    base.update(XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
                TPU_SKIP_MDS_QUERY="1",  # no metadata-server lookup, even on a TPU VM
                PYTHONPATH=os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")]))
    env0 = {**base, "EAO_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "EAO_NUM_PROCESSES": "2",
            "EAO_PROCESS_ID": "0"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, "env", str(port), "0"], env=env0,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-c", _WORKER, "args", str(port), "1"], env=base,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        subprocess.Popen([sys.executable, "-c", _WORKER, "none", "0", "0"], env=base,
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

    lone = results.pop()
    assert lone["error"].startswith("jax.distributed.initialize: coordinator_address should be defined "
                                    "(given: --process_id)")
    assert (lone["distributed"], lone["source"], lone["process_count"], lone["sum"]) == (False, "single", 1, 6.0)
    for pid, r in enumerate(results):
        assert (r["process_id"], r["process_index"]) == (pid, pid)
        assert r["num_processes"] == r["process_count"] == 2
        assert r["device_count"] == 4 and r["local_device_count"] == 2
        assert r["distributed"] and r["is_main"] == (pid == 0)
        assert r["psum"] == [10.0]  # 1 + 2 + 3 + 4 over the 4 devices of both processes
        assert r["gathered"] == [1.0, 2.0, 3.0, 4.0]
    assert "EAO_COORDINATOR_ADDRESS" in results[0]["source"]
    assert "--coordinator_address" in results[1]["source"]
