"""Multi-process training on CPU: `python -m eao_jax.main` as 2 processes x 2 devices (loopback
coordinator) reaches the parameters of 1 process x 4 devices, its checkpoint evaluates in one process
with the same metrics, and it resumes in 1 process x 2 devices (other device and process counts).

The runs (module fixture `runs`, tiny synthetic config, 8 steps, checkpoints at 4 and 8):
  A  1 process x 4 devices                       (reference)
  B  2 processes x 2 devices, final evaluation   (A and B run at the same time)
  C  1 process x 2 devices resumed from B's step 4
Settings the comparison needs: FSDP on with a small threshold, so that the larger matrices are
sharded (and written shard by shard by both processes); Adam eps 1e-6 instead of the paper's 1e-8:
the attention key bias has an exactly-zero gradient in exact arithmetic (softmax ignores a per-query
constant), so its gradient is rounding noise, which Adam with eps 1e-8 turns into steps of about
1e-5 that differ between layouts; with 1e-6 every leaf agrees to ~5e-7. XLA's backend optimisation
level 0 only shortens compilation (all runs use it).
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from eao_jax import checkpoint as ckpt
from eao_jax.data import pipelines
from eao_jax.metrics_log import read_metrics
from tfds_builders import synthetic

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")
N_STEPS, EVERY = 8, 4
COMMON = (f"--config.train.num_steps={N_STEPS}", f"--config.checkpoint.every_steps={EVERY}",
          "--config.train.log_every=2", "--config.train.eps=1e-6", "--config.mesh.fsdp=True",
          "--config.mesh.fsdp_min_size=1024")
EVAL = ("--config.eval.tasks={'synthetic': {'batch_size': 16}}",)
# Settings of a parent process (a cluster job running the tests) that would make a worker distributed.
_DIST_VARS = ("EAO_COORDINATOR_ADDRESS", "EAO_NUM_PROCESSES", "EAO_PROCESS_ID", "EAO_LOCAL_DEVICE_IDS",
              "EAO_DISTRIBUTED", "JAX_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT",
              "SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID",
              "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK")


class _Proc:
    """A `python -m eao_jax.main` subprocess whose output goes to files (no pipe can fill up while
    the test waits for another process of the same run)."""

    def __init__(self, name: str, logs: pathlib.Path, workdir: pathlib.Path, data: pathlib.Path, *, devices: int,
                 overrides=(), coordinator: str | None = None, num_processes: int = 1, process_id: int = 0):
        env = {k: v for k, v in os.environ.items() if k not in _DIST_VARS}
        env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0",
                   JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]))
        if num_processes > 1:
            env.update(EAO_COORDINATOR_ADDRESS=coordinator, EAO_NUM_PROCESSES=str(num_processes),
                       EAO_PROCESS_ID=str(process_id))
        cmd = [sys.executable, "-m", "eao_jax.main", f"--config={DEMO}:tiny", f"--workdir={workdir}",
               "--progress_bar=false", f"--config.data.data_dir={data}", *COMMON, *overrides]
        self.name = name
        self.out_path, self.err_path = logs / f"{name}.out", logs / f"{name}.err"
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self._out, stderr=self._err, text=True)

    def wait(self, deadline: float) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return -999
        finally:
            self._out.close()
            self._err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()


def _wait_all(procs: list[_Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    try:
        codes = {p.name: p.wait(deadline) for p in procs}
    finally:
        for p in procs:
            p.kill()
    bad = {n: c for n, c in codes.items() if c != 0}
    if bad:
        tails = "\n".join(f"--- {p.name} (rc={codes[p.name]}, -999 = timed out):\n{p.stderr[-3000:]}"
                          for p in procs if p.name in bad)
        raise AssertionError(f"training runs failed: {bad}\n{tails}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import portpicker

    root = tmp_path_factory.mktemp("multiprocess")
    data = root / "data"
    synthetic.ensure_prepared(data, "tiny")  # once, before any run (the runs also share it)
    t0 = time.monotonic()
    coordinator = f"127.0.0.1:{portpicker.pick_unused_port()}"
    # A and B at the same time: B's processes wait on each other (collectives, barriers) for part of
    # the time, which A's compilation fills on a 2-core machine.
    procs = [_Proc("A", root, root / "A", data, devices=4)]
    procs += [_Proc(f"B{i}", root, root / "B", data, devices=2, overrides=EVAL, coordinator=coordinator,
                    num_processes=2, process_id=i) for i in (0, 1)]
    _wait_all(procs, 240)
    t_ab = time.monotonic() - t0
    # C: B's step-4 checkpoint (written by 2 processes over 4 devices) resumed by 1 process over 2 devices.
    (root / "C" / "checkpoints").mkdir(parents=True)
    shutil.copytree(root / "B" / "checkpoints" / str(EVERY), root / "C" / "checkpoints" / str(EVERY))
    c = _Proc("C", root, root / "C", data, devices=2)
    _wait_all([c], 180)
    print(f"\nmulti-process runs: A + B {t_ab:.1f} s, C {time.monotonic() - t0 - t_ab:.1f} s")
    return {"root": root, "data": data, "A": procs[0], "B0": procs[1], "B1": procs[2], "C": c}


def _restore(workdir: pathlib.Path, step: int = N_STEPS) -> tuple[dict, dict]:
    """(model variables, optimizer state) of a training checkpoint as host numpy trees."""
    from eao_jax import train  # noqa: PLC0415

    root = workdir / "checkpoints"
    config = ckpt.restore_config(root, step)
    _, abstract = train.abstract_train_state(config)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), nnx.to_pure_dict(abstract))
    mngr = ckpt.training_manager(root, read_only=True)
    try:
        model, opt, _ = ckpt.restore_training(mngr, step, model_target=target["model"], opt_target=target["opt"],
                                              with_data=False)
    finally:
        mngr.close()
    return jax.device_get(model), jax.device_get(opt)


def _assert_trees_close(a, b, atol, what):
    pa, ta = jax.tree_util.tree_flatten_with_path(a)
    pb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb, f"{what}: different tree structures"
    worst = max(((float(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).max()),
                  jax.tree_util.keystr(p)) for (p, x), (_, y) in zip(pa, pb, strict=True)), default=(0.0, ""))
    assert worst[0] <= atol, f"{what}: {worst[1]} differs by {worst[0]:.3g} (> {atol})"
    return worst[0]


def _losses(workdir):
    return {r["step"]: r["loss"] for r in read_metrics(workdir, "train")}


def test_two_processes_train_like_one(runs):
    root = runs["root"]
    model_a, opt_a = _restore(root / "A")
    model_b, opt_b = _restore(root / "B")
    # Every parameter and BatchNorm statistic, and Adam's moments and step counter.
    assert any("mean" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(model_a)[0])
    _assert_trees_close(model_a, model_b, 1e-5, "model variables, 1x4 vs 2x2")
    _assert_trees_close(opt_a, opt_b, 1e-5, "optimizer state, 1x4 vs 2x2")
    assert int(opt_a["step"]) == int(opt_b["step"]) == N_STEPS
    # The same global batches: the logged losses agree step by step (and training did progress).
    la, lb = _losses(root / "A"), _losses(root / "B")
    assert sorted(la) == sorted(lb) == [2, 4, 6, 8]
    np.testing.assert_allclose([lb[s] for s in sorted(lb)], [la[s] for s in sorted(la)], rtol=1e-5)
    assert la[8] < la[2] - 0.5


def test_two_process_run_writes_once_and_saves_per_process_data_state(runs):
    b = runs["root"] / "B"
    events = [r["message"] for r in read_metrics(b, "event")]
    assert events.count("initialised from scratch") == 1, events  # process 0 alone writes metrics.jsonl
    assert events.count("done (finished)") == 1
    assert len(read_metrics(b, "eval")) == 1
    assert f"finished at step {N_STEPS}" in runs["B0"].stdout and "finished at step" not in runs["B1"].stdout
    assert "t2v" in runs["B0"].stdout and "t2v" not in runs["B1"].stdout  # the results table: process 0 only
    assert json.loads((b / "config.json").read_text())["data"]["videos_per_batch"] == 4
    for step in (EVERY, N_STEPS):
        data = b / "checkpoints" / str(step) / "data"
        files = sorted(p.name for p in data.glob("process_*"))
        assert files == ["process_0-of-2.json", "process_1-of-2.json"]
        # Both processes are at the same global batch: the states are identical.
        states = [json.loads((data / f).read_text()) for f in files]
        assert states[0] == states[1] and states[0]["next_index"] == step
    # FSDP: some matrices were sharded over the 4-device data axis, and each process wrote its shards.
    model_dir = b / "checkpoints" / str(N_STEPS) / "model"
    specs = [json.loads(v)["partition_spec"] for v in json.loads((model_dir / "_sharding").read_text()).values()]
    assert any("data" in json.dumps(s) for s in specs) and any(not s for s in specs)
    assert (model_dir / "ocdbt.process_0").exists() and (model_dir / "ocdbt.process_1").exists()


def test_resume_with_other_device_and_process_counts(runs):
    root = runs["root"]
    c = root / "C"
    events = [r["message"] for r in read_metrics(c, "event")]
    assert events[0] == f"resumed from {c / 'checkpoints'}/{EVERY}", events
    assert "data iterator state written by 2 processes, resumed by 1" in runs["C"].stderr
    model_a, opt_a = _restore(root / "A")
    model_c, opt_c = _restore(c)
    _assert_trees_close(model_a, model_c, 1e-5, "model variables, 1x4 vs 2x2 resumed as 1x2")
    _assert_trees_close(opt_a, opt_c, 1e-5, "optimizer state, 1x4 vs 2x2 resumed as 1x2")
    # The resumed run read the global batches 5..8 that A read: same losses at steps 6 and 8.
    la, lc = _losses(root / "A"), _losses(c)
    assert sorted(lc) == [6, 8]
    np.testing.assert_allclose([lc[6], lc[8]], [la[6], la[8]], rtol=1e-5)


def test_two_process_checkpoint_evaluates_in_one_process(runs):
    from eao_jax.evaluators import evaluate  # noqa: PLC0415

    root, data = runs["root"], runs["data"]
    results = {}
    for name in ("A", "B"):
        model, config, step = ckpt.load_model(root / name / "checkpoints")  # this process: 1 x 8 devices
        assert step == N_STEPS
        results[name] = evaluate(model, "synthetic", data_dir=data, tfds_config="tiny", batch_size=16, config=config)
    assert results["A"]["num_queries"] == results["B"]["num_queries"] == synthetic.world.SPECS["tiny"].retrieval_items
    assert results["B"]["metrics"] == results["A"]["metrics"]
    assert len(results["A"]["metrics"]) == 18
    # ... and the 2-process evaluation at the end of B's training gave the same numbers.
    in_training = json.loads((root / "B" / "results" / "synthetic.json").read_text())
    assert in_training["step"] == N_STEPS and in_training["metrics"] == results["A"]["metrics"]


# ------------------------------------------------------------------------------------------------
# Without subprocesses: the data layout and the data state across process counts


def _pipeline_config(data_dir, split="train"):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.data = ml_collections.ConfigDict(dict(
        dataset="synthetic", data_dir=str(data_dir), tfds_config="tiny", split=split, videos_per_batch=4,
        clips_per_video=2, n_video_tokens=12, max_words=20, n_stft=64, min_time=8.0, text_audio_misaligned=True,
        num_workers=0, read_threads=2, prefetch=2))
    return c


@pytest.mark.parametrize("split", ["train", "retrieval"])  # HowTo layout (clips) and item layout (captions)
def test_global_batches_do_not_depend_on_the_process_count(tmp_path, split):
    synthetic.ensure_prepared(tmp_path, "tiny")
    c = _pipeline_config(tmp_path, split)
    layouts = {n: [pipelines.make_train_iterator(c, process_index=p, process_count=n) for p in range(n)]
               for n in (1, 2, 4)}
    n_steps = 8  # 24 train videos / 4 per step: crosses an epoch boundary (reshuffle)
    seen = set()
    for _ in range(n_steps):
        batches = {n: [next(it) for it in its] for n, its in layouts.items()}
        ref = batches[1][0]
        assert ref["video"].shape[0] == 8
        for n in (2, 4):
            assert all(b["video"].shape[0] == 8 // n for b in batches[n])
            for k in ref:  # process p's rows are rows p*8/n .. (p+1)*8/n - 1 of the 1-process batch
                np.testing.assert_array_equal(np.concatenate([b[k] for b in batches[n]]), ref[k], err_msg=k)
        seen.add(ref["audio"].tobytes())
    assert len(seen) == n_steps  # not one batch repeated
    states = {json.dumps(it.get_state(), sort_keys=True) for its in layouts.values() for it in its}
    assert states == {json.dumps({"next_index": n_steps})}  # one position, whatever the process count


def _write_states(d: pathlib.Path, states: dict[str, dict]) -> pathlib.Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, s in states.items():
        (d / name).write_text(json.dumps(s))
    return d


def test_data_state_carries_over_between_process_counts_or_fails_clearly(tmp_path):
    same = {"next_index": 7}
    d = _write_states(tmp_path / "ok", {"process_0-of-2.json": same, "process_1-of-2.json": same,
                                        "commit_success.txt": {}})
    assert ckpt.data_state_for_process_count(d, 1) == same
    assert ckpt.data_state_for_process_count(d, 4) == same
    d = _write_states(tmp_path / "one", {"process_0-of-1.json": same})
    assert ckpt.data_state_for_process_count(d, 2) == same

    d = _write_states(tmp_path / "differ", {"process_0-of-2.json": same, "process_1-of-2.json": {"next_index": 6}})
    with pytest.raises(ValueError, match=r"written by 2 processes whose data iterator states differ "
                                         r"\(process_0-of-2.json vs process_1-of-2.json\).*Resume with 2 processes"):
        ckpt.data_state_for_process_count(d, 1)
    d = _write_states(tmp_path / "missing", {"process_1-of-2.json": same})
    with pytest.raises(ValueError, match=r"states of processes \[0\] of 2 are missing"):
        ckpt.data_state_for_process_count(d, 1)
    d = _write_states(tmp_path / "mixed", {"process_0-of-1.json": same, "process_0-of-2.json": same,
                                           "process_1-of-2.json": same})
    with pytest.raises(ValueError, match=r"several process counts \(\[1, 2\]\)"):
        ckpt.data_state_for_process_count(d, 4)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "process_0-of-2.json").write_text("{not json")
    (tmp_path / "bad" / "process_1-of-2.json").write_text("{}")
    with pytest.raises(ValueError, match=r"process_0-of-2.json: unreadable data iterator state"):
        ckpt.data_state_for_process_count(tmp_path / "bad", 1)
    with pytest.raises(ValueError, match=r"no data iterator state"):
        ckpt.data_state_for_process_count(_write_states(tmp_path / "empty", {}), 1)
