"""`python -m eao_jax.main` as a subprocess on the tiny synthetic config: resume after SIGKILL reaches
the same parameters as an uninterrupted run, SIGTERM leaves a complete checkpoint, a diverging run
stops without saving non-finite state, and config errors fail before compilation."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from eao_jax import checkpoint as ckpt
from eao_jax.metrics_log import read_metrics
from eao_jax.model.eao import EverythingAtOnce

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.py")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One prepared tiny dataset and one JAX compilation cache for every run of this module."""
    root = tmp_path_factory.mktemp("main_shared")
    return {"data": root / "data", "cache": root / "jax_cache"}


def _env(shared):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=2",  # a 2-device data mesh
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(shared["cache"]),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return env


def _cmd(shared, workdir, *overrides):
    return [sys.executable, "-m", "eao_jax.main", f"--config={DEMO}:tiny", f"--workdir={workdir}",
            "--progress_bar=false", f"--config.data.data_dir={shared['data']}", *overrides]


def _run(shared, workdir, *overrides, timeout=300):
    return subprocess.run(_cmd(shared, workdir, *overrides), cwd=REPO, env=_env(shared), capture_output=True,
                          text=True, timeout=timeout)


def _final_params(workdir, step=None):
    root = pathlib.Path(workdir) / "checkpoints"
    step = ckpt.latest_step(root) if step is None else step
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          ckpt.model_variables(ckpt.abstract_model(ckpt.restore_config(root, step))))
    return step, jax.device_get(ckpt.restore_model_variables(root, step, target))


def _wait_for(predicate, proc, timeout, what):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run exited (rc={proc.returncode}) before {what}:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


N_STEPS, EVERY = 80, 8


def test_sigkill_then_resume_matches_uninterrupted_run(shared, tmp_path):
    common = (f"--config.train.num_steps={N_STEPS}", f"--config.checkpoint.every_steps={EVERY}",
              "--config.train.log_every=5")
    ref = _run(shared, tmp_path / "ref", *common)
    assert ref.returncode == 0, ref.stderr[-3000:]

    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(shared, work, *common), cwd=REPO, env=_env(shared),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckdir = work / "checkpoints"
    _wait_for(lambda: any((p / "commit_success.txt").exists() for p in ckdir.glob("[0-9]*")), proc, 240,
              "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = ckpt.latest_step(ckdir)
    assert EVERY <= killed_at < N_STEPS, f"the run was not interrupted (latest checkpoint {killed_at})"

    resumed = _run(shared, work, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [r["message"] for r in read_metrics(work, "event")]
    assert any(m.startswith("resumed from") for m in events), events

    step_ref, p_ref = _final_params(tmp_path / "ref")
    step_res, p_res = _final_params(work)
    assert step_ref == step_res == N_STEPS
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The runs did train: the parameters moved away from the initialisation.
    config = ckpt.restore_config(tmp_path / "ref" / "checkpoints", N_STEPS)
    init = ckpt.model_variables(EverythingAtOnce(config.model, rngs=nnx.Rngs(config.seed)))
    moved = [float(np.abs(a - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(init),
                                                                    strict=True)]
    assert max(moved) > 1e-2


def test_sigterm_saves_a_complete_checkpoint_and_exits_cleanly(shared, tmp_path):
    work = tmp_path / "term"
    proc = subprocess.Popen(_cmd(shared, work, "--config.train.num_steps=1000000",
                                 "--config.checkpoint.every_steps=0", "--config.train.log_every=2"),
                            cwd=REPO, env=_env(shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = work / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and '"kind": "train"' in metrics.read_text(), proc, 240, "training steps")
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "preempted at step" in out
    stop = [r for r in read_metrics(work, "event") if r["message"].startswith("stop requested (SIGTERM)")]
    assert len(stop) == 1
    step = ckpt.latest_step(work / "checkpoints")
    assert step == stop[0]["step"] > 0
    step_dir = work / "checkpoints" / str(step)
    assert (step_dir / "commit_success.txt").exists()
    for item in ("model", "opt", "config", "data"):
        assert (step_dir / item).is_dir(), f"checkpoint step {step} lacks item {item}"
    assert json.loads((step_dir / "data" / "process_0-of-1.json").read_text())  # grain iterator state
    model, config, got_step = ckpt.load_model(work / "checkpoints")
    assert got_step == step and config.data.dataset == "synthetic"
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(ckpt.model_variables(model)))


def test_non_finite_loss_stops_without_saving_it(shared, tmp_path):
    # Start from absurd weights (finite, 1e30-scaled): the first loss overflows. The step is skipped on
    # device and the run stops with a message; nothing is saved although every step would be.
    from eao_jax import config_utils  # noqa: PLC0415

    config = config_utils.complete_config(_load_demo_tiny())
    start = ckpt.model_variables(EverythingAtOnce(config.model, rngs=nnx.Rngs(0)))
    start = jax.tree_util.tree_map_with_path(
        lambda p, x: np.asarray(x) * (1.0 if p[-1].key in ("mean", "var") else 1e30), start)
    ckpt.save_model(tmp_path / "huge", 0, start, config)
    work = tmp_path / "nan"
    res = _run(shared, work, f"--config.init_from={tmp_path / 'huge'}", "--config.train.num_steps=20",
               "--config.checkpoint.every_steps=1", "--config.train.log_every=5")
    assert res.returncode == 1
    assert "Training stopped: non-finite loss or gradient at step 1 (" in res.stderr, res.stderr[-2000:]
    assert "no checkpoint was saved" in res.stderr
    assert not list((work / "checkpoints").glob("[0-9]*"))
    stopped = [r for r in read_metrics(work, "event") if r["message"].startswith("stopped: non-finite")]
    assert stopped and stopped[0]["step"] == 1


@pytest.mark.parametrize("overrides, field", [
    (("--config.train.lrr=1",), "train.lrr"),  # unknown field
    (("--config.model.num_heads=5",), "model.embed_dim"),  # 32 not divisible by 5 heads
    (("--config.data.videos_per_batch=3", "--config.data.clips_per_video=1"), "data.videos_per_batch"),  # 3 on 2
    (("--config.train.lr=inf",), "train.lr must be a finite number"),
    # 26 videos per batch from the 24 of the tiny split: batches would repeat videos as negatives.
    (("--config.data.videos_per_batch=26",), "data.videos_per_batch=26 is larger than the 24 training videos"),
])
def test_config_errors_fail_before_compiling(shared, tmp_path, overrides, field):
    t0 = time.time()
    res = _run(shared, tmp_path / "bad", *overrides, timeout=120)
    assert res.returncode == 1
    assert "Config error" in res.stderr and field in res.stderr, res.stderr[-2000:]
    assert not (tmp_path / "bad" / "checkpoints").exists()
    assert time.time() - t0 < 60


def test_init_from_loads_model_variables_with_a_fresh_optimizer(shared, tmp_path):
    from eao_jax import config_utils  # noqa: PLC0415

    spec_cfg = _load_demo_tiny()
    config = config_utils.complete_config(spec_cfg)
    start = ckpt.model_variables(EverythingAtOnce(config.model, rngs=nnx.Rngs(123)))  # not the run's seed 0
    ckpt.save_model(tmp_path / "converted", 0, start, config)
    work = tmp_path / "ft"
    res = _run(shared, work, f"--config.init_from={tmp_path / 'converted'}", "--config.train.num_steps=3",
               "--config.checkpoint.every_steps=0")
    assert res.returncode == 0, res.stderr[-3000:]
    events = [r["message"] for r in read_metrics(work, "event")]
    assert any(m.startswith("model initialised from") and "fresh optimizer" in m for m in events), events
    _, params = _final_params(work)
    scratch = ckpt.model_variables(EverythingAtOnce(config.model, rngs=nnx.Rngs(0)))
    kernel = ("token_proj", "video", "fc", "kernel")
    got, want, other = (_get(t, kernel) for t in (params, start, scratch))
    assert np.abs(got - want).max() < 0.01 < np.abs(got - other).max()  # 3 Adam steps of lr 1e-3 from `start`
    # The optimizer started fresh: its step counter is the 3 steps of this run.
    from eao_jax import train  # noqa: PLC0415

    _, abstract = train.abstract_train_state(config)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), nnx.to_pure_dict(abstract))
    mngr = ckpt.training_manager(work / "checkpoints", read_only=True)
    _, opt, _ = ckpt.restore_training(mngr, 3, model_target=target["model"], opt_target=target["opt"], with_data=False)
    mngr.close()
    assert int(opt["step"]) == 3


def _get(tree, path):
    for p in path:
        tree = tree[p]
    return np.asarray(tree)


def _load_demo_tiny():
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("_demo_cfg", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("tiny")


def _corrupt(step_dir: pathlib.Path, how: str) -> None:
    import shutil  # noqa: PLC0415

    if how == "truncated array file":
        f = max((step_dir / "model" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
        os.truncate(f, 100)
    elif how == "missing manifest":
        (step_dir / "model" / "manifest.ocdbt").unlink()
    elif how == "missing item":
        shutil.rmtree(step_dir / "opt")
    elif how == "empty step directory":
        shutil.rmtree(step_dir)
        step_dir.mkdir()
    elif how == "missing data iterator file":
        (step_dir / "data" / "process_0-of-1.json").unlink()
    elif how == "truncated data iterator file":
        os.truncate(step_dir / "data" / "process_0-of-1.json", 3)


CORRUPTIONS = {7: "truncated array file", 6: "missing manifest", 5: "missing item", 4: "empty step directory",
               3: "missing data iterator file", 2: "truncated data iterator file"}


def test_damaged_newest_checkpoints_are_skipped_and_the_run_ends_as_an_uninterrupted_one(shared, tmp_path):
    import shutil  # noqa: PLC0415

    common = ("--config.train.num_steps=8", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=20",
              "--config.train.log_every=4")
    ref = _run(shared, tmp_path / "ref", *common)
    assert ref.returncode == 0, ref.stderr[-3000:]
    work = tmp_path / "damaged"
    shutil.copytree(tmp_path / "ref" / "checkpoints", work / "checkpoints")
    shutil.rmtree(work / "checkpoints" / "8")
    for step, how in CORRUPTIONS.items():  # steps 7..2 each damaged in one way; step 1 intact
        _corrupt(work / "checkpoints" / str(step), how)
    # A lock file left by a dead training (its pid no longer runs) does not block.
    (work / ".lock").write_text(json.dumps({"pid": 2**22 + 17, "host": "gone", "since": 0}) + "\n")

    res = _run(shared, work, *common)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [r["message"] for r in read_metrics(work, "event") if r["message"].startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].startswith(f"resumed from {work / 'checkpoints'}/1 after skipping"), resumed
    for step, why in {7: "restoring it failed", 6: "model/manifest.ocdbt is missing", 5: "item 'opt' is missing",
                      4: "the step directory is empty", 3: "data/ holds no data iterator state",
                      2: "data/process_0-of-1.json is not a readable data iterator state"}.items():
        assert f"step {step}: {why}" in resumed[0], (step, resumed[0])
    assert sorted(int(p.name) for p in (work / "corrupt_checkpoints").iterdir()) == sorted(CORRUPTIONS)
    step_ref, p_ref = _final_params(tmp_path / "ref")
    step_res, p_res = _final_params(work)
    assert step_ref == step_res == 8
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    # Resuming with a changed model config names the field (before anything is restored or compiled).
    before = (work / "config.json").read_text()
    res = _run(shared, work, *common, "--config.model.embed_dim=64", "--config.train.num_steps=10", timeout=120)
    assert res.returncode == 1
    assert "Config error: model.embed_dim: the config differs from the one checkpoint step 8" in res.stderr, \
        res.stderr[-2000:]
    assert "model.embed_dim: checkpoint 32 vs config 64" in res.stderr and "Traceback" not in res.stderr
    assert (work / "config.json").read_text() == before  # the refused run did not overwrite the record
    assert ckpt.latest_step(work / "checkpoints") == 8

    # A second training on a workdir another one holds is refused, naming the holder.
    from eao_jax.workdir_lock import WorkdirLock  # noqa: PLC0415

    with WorkdirLock(work):
        res = _run(shared, work, *common, "--config.train.num_steps=10", timeout=120)
    assert res.returncode == 1
    assert f"Training refused: workdir {work} is in use by another training (pid {os.getpid()} on host" in res.stderr, \
        res.stderr[-2000:]
    assert ckpt.latest_step(work / "checkpoints") == 8
