"""`python -m eao_jax.main` as a subprocess on the tiny synthetic config: resume after SIGKILL, or over damaged
newest checkpoints, or after a full disk, reaches the same parameters as one uninterrupted reference run;
SIGTERM leaves a complete checkpoint; a non-finite loss or update is never saved (periodic, final and SIGTERM
saves); a full disk never hangs the run; a resumed run's metrics never overlap an earlier run's; config
errors fail before compilation."""

import contextlib
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import checkpoint_damage
import jax
import numpy as np
import pytest
from flax import nnx

from eao_jax import checkpoint as ckpt
from eao_jax.metrics_log import read_metrics, read_scalars
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
REF_EVERY = 4  # the reference run keeps a checkpoint every 4 steps: the parameters any shorter run must reach


@pytest.fixture(scope="module")
def reference(shared, tmp_path_factory):
    """One uninterrupted run of N_STEPS (checkpoints every REF_EVERY steps, all kept; metrics every 4 steps)
    for every test of the module that compares a resumed run's parameters with an uninterrupted one's."""
    work = tmp_path_factory.mktemp("reference") / "ref"
    res = _run(shared, work, f"--config.train.num_steps={N_STEPS}", f"--config.checkpoint.every_steps={REF_EVERY}",
               "--config.checkpoint.keep=100", "--config.train.log_every=4")
    assert res.returncode == 0, res.stderr[-3000:]
    return work


def _assert_params_equal(workdir, reference, step):
    got_step, got = _final_params(workdir)
    assert got_step == step
    _, want = _final_params(reference, step)
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_sigkill_then_resume_matches_uninterrupted_run(shared, reference, tmp_path):
    common = (f"--config.train.num_steps={N_STEPS}", f"--config.checkpoint.every_steps={EVERY}",
              "--config.train.log_every=5")
    work = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(shared, work, *common), cwd=REPO, env=_env(shared),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ckdir = work / "checkpoints"
    # A finished step: its final name (Orbax writes into `N.orbax-checkpoint-tmp-*` and renames it) and
    # its commit marker.
    _wait_for(lambda: any(p.name.isdigit() and (p / "commit_success.txt").exists() for p in ckdir.glob("[0-9]*")),
              proc, 240, "the first checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = ckpt.latest_step(ckdir)
    assert EVERY <= killed_at < N_STEPS, f"the run was not interrupted (latest checkpoint {killed_at})"

    resumed = _run(shared, work, *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    events = [r["message"] for r in read_metrics(work, "event")]
    assert any(m.startswith("resumed from") for m in events), events

    _assert_params_equal(work, reference, N_STEPS)
    _, p_ref = _final_params(reference, N_STEPS)
    # The runs did train: the parameters moved away from the initialisation.
    config = ckpt.restore_config(reference / "checkpoints", N_STEPS)
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


@pytest.fixture(scope="module")
def absurd_moments(reference, tmp_path_factory):
    """A workdir whose only checkpoint is the reference's step 4 with every Adam first moment set to 3e38:
    finite (it saves), but the next update overflows while the loss and the gradient stay finite."""
    from eao_jax import train  # noqa: PLC0415

    src = reference / "checkpoints"
    config = ckpt.restore_config(src, 4)
    _, abstract = train.abstract_train_state(config)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), nnx.to_pure_dict(abstract))
    mngr = ckpt.training_manager(src, read_only=True)
    model, opt, snapshot = ckpt.restore_training(mngr, 4, model_target=target["model"], opt_target=target["opt"])
    mngr.close()
    opt = jax.tree_util.tree_map_with_path(
        lambda p, x: np.full_like(x, 3e38) if "mu" in [str(getattr(k, "key", "")) for k in p] else np.asarray(x),
        jax.device_get(opt))
    work = tmp_path_factory.mktemp("absurd") / "work"
    mngr = ckpt.training_manager(work / "checkpoints", config.checkpoint)
    assert ckpt.save_training(mngr, 4, model_vars=jax.device_get(model), opt_vars=opt, config=config,
                              data_state=snapshot, force=True)
    mngr.wait_until_finished()
    mngr.close()
    return work


@pytest.mark.parametrize("save_path", ["periodic", "final", "sigterm"])
def test_a_non_finite_update_is_never_saved(shared, absurd_moments, tmp_path, save_path):
    # Resumed at step 4, step 5's update is non-finite (a finite loss and gradient): the step is skipped on
    # device and the run stops at the next save (or check) without saving, whichever save comes first.
    import shutil  # noqa: PLC0415

    work = tmp_path / "work"
    shutil.copytree(absurd_moments, work)
    if save_path == "sigterm":
        proc = subprocess.Popen(_cmd(shared, work, "--config.train.num_steps=1000000",
                                     "--config.checkpoint.every_steps=0", "--config.train.log_every=1000000"),
                                cwd=REPO, env=_env(shared), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = work / "metrics.jsonl"
        _wait_for(lambda: metrics.exists() and "first step (compilation included)" in metrics.read_text(), proc, 240,
                  "the first step")
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        rc = proc.returncode
    else:
        steps = {"periodic": ("--config.train.num_steps=12", "--config.checkpoint.every_steps=1"),
                 "final": ("--config.train.num_steps=6", "--config.checkpoint.every_steps=0")}[save_path]
        res = _run(shared, work, *steps, "--config.train.log_every=1000")
        rc, err = res.returncode, res.stderr
    assert rc == 1, err[-3000:]
    assert ("Training stopped: non-finite update (parameters or optimizer state after a finite gradient) at step 5 "
            in err), err[-3000:]
    assert f"the last checkpoint is step 4 in {work / 'checkpoints'}" in err
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == ["4"]
    assert not any(r["message"].startswith("stop requested") for r in read_metrics(work, "event"))


@contextlib.contextmanager
def _full_filesystem(path: pathlib.Path, size: str):
    """A tmpfs of `size` mounted at `path` (True), or False where mounting needs privileges this user lacks."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                                 capture_output=True).returncode == 0
    except FileNotFoundError:  # no mount command
        mounted = False
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


# Without a tmpfs: every file opened for writing under tensorboard/ is /dev/full (writes fail with ENOSPC).
_TB_ON_DEV_FULL = """
import builtins, os, runpy
_open = builtins.open
def _open_full(file, mode="r", *args, **kwargs):
    if isinstance(file, str | os.PathLike) and "/tensorboard/" in os.fspath(file) and set(mode) & set("wxa"):
        _open(file, "wb").close()
        return _open("/dev/full", "wb", *args, **kwargs)
    return _open(file, mode, *args, **kwargs)
builtins.open = _open_full
runpy.run_module("eao_jax.main", run_name="__main__", alter_sys=True)
"""


def test_a_full_tensorboard_disk_is_reported_and_training_goes_on(shared, reference, tmp_path):
    # tensorboardX's writer thread died of ENOSPC here and the training thread then waited forever on its full
    # queue (SIGTERM ignored). Now: one line naming the file, TensorBoard dropped, the run ends as usual.
    work = tmp_path / "work"
    args = ("--config.train.num_steps=24", f"--config.checkpoint.every_steps={REF_EVERY}", "--config.train.log_every=1")
    with _full_filesystem(work / "tensorboard", "64k") as mounted:
        cmd = _cmd(shared, work, *args)
        if mounted:
            subprocess.run(["dd", "if=/dev/zero", f"of={work / 'tensorboard' / 'fill'}", "bs=64k", "count=2"],
                           capture_output=True)
        else:
            cmd[1:3] = ["-c", _TB_ON_DEV_FULL]
        t0 = time.time()
        res = subprocess.run(cmd, cwd=REPO, env=_env(shared), capture_output=True, text=True, timeout=90)
    assert res.returncode == 0, res.stderr[-3000:]
    assert time.time() - t0 < 90
    lines = [x for x in res.stderr.splitlines() if x.startswith("metrics: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert re.fullmatch(rf"metrics: writing {re.escape(str(work / 'tensorboard'))}/events\.out\.tfevents\.\S+ failed "
                        r"\(No space left on device\); TensorBoard logging is off for the rest of the run \(training "
                        r"goes on\)", lines[0]), lines[0]
    assert [r["step"] for r in read_metrics(work, "train")] == list(range(1, 25))  # metrics.jsonl goes on
    _assert_params_equal(work, reference, 24)  # and so does training


def test_a_full_workdir_disk_stops_the_run_cleanly_and_earlier_checkpoints_restore(shared, reference, tmp_path):
    # The whole workdir on a 1.2 MB tmpfs: step 4's checkpoint (0.65 MB, about 1 MB while it is written) fits and
    # step 8's never does, whatever the timing of the asynchronous save against the training thread and the
    # metrics files. The run must stop with one message naming step 8, never hang.
    import shutil  # noqa: PLC0415

    work = tmp_path / "work"
    args = ("--config.train.num_steps=80", f"--config.checkpoint.every_steps={REF_EVERY}",
            "--config.train.log_every=1")
    with _full_filesystem(work, "1200k") as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root (the full TensorBoard disk test covers the hang without one)")
        res = _run(shared, work, *args)  # the timeout bounds a hang (a loaded machine needs minutes to start)
        copy = tmp_path / "copy"
        shutil.copytree(work, copy, symlinks=True)
    assert res.returncode == 1, res.stderr[-3000:]
    # Found within lines: a library thread's output may still end, without a newline, just before it.
    stopped = [x[x.index("Training stopped: "):] for x in res.stderr.splitlines() if "Training stopped: " in x]
    assert len(stopped) == 1, "\n".join(x[:300] for x in res.stderr.splitlines() if x[:1].strip())[-6000:]
    # The step named is the one whose save did not finish (its temporary directory is left), also when the next
    # save is what finds out.
    assert re.match(rf"Training stopped: saving step 8 in {re.escape(str(work / 'checkpoints'))} failed: "
                    r".*No space left on device", stopped[0]), stopped[0]
    assert sorted(p.name for p in (copy / "checkpoints").iterdir()) == ["4", "8.orbax-checkpoint-tmp"]
    for name in ("metrics.jsonl", "TensorBoard logging"):  # each reported at most once
        assert res.stderr.count(f"; {name} is off for the rest of the run") <= 1
    # The checkpoint written before the disk filled restores, and training resumes from it (elsewhere) to the
    # parameters of the uninterrupted run.
    res = _run(shared, copy, *args[1:], f"--config.train.num_steps={2 * REF_EVERY}")
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {copy / 'checkpoints'}/{REF_EVERY}" in res.stderr
    _assert_params_equal(copy, reference, 2 * REF_EVERY)


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


# Steps 36..8 of the reference run each damaged in one way; step 4 intact.
CORRUPTIONS = dict(zip(range(36, 7, -4), checkpoint_damage.KINDS, strict=True))
LAST = max(CORRUPTIONS) + REF_EVERY  # where the resumed run ends


def test_damaged_newest_checkpoints_are_skipped_and_the_run_ends_as_an_uninterrupted_one(shared, reference, tmp_path):
    import shutil  # noqa: PLC0415

    # The reference workdir (checkpoints, metrics.jsonl, TensorBoard up to step 80) cut back to step 36, as a
    # run that logged to 80 but whose checkpoints after 4 are all damaged.
    work = tmp_path / "damaged"
    shutil.copytree(reference, work)
    for p in (work / "checkpoints").glob("[0-9]*"):
        if int(p.name) > max(CORRUPTIONS):
            shutil.rmtree(p)
    for step, how in CORRUPTIONS.items():
        checkpoint_damage.corrupt(work / "checkpoints" / str(step), how)
    # A lock file left by a dead training (its pid no longer runs) does not block.
    (work / ".lock").write_text(json.dumps({"pid": 2**22 + 17, "host": "gone", "since": 0}) + "\n")

    common = (f"--config.train.num_steps={LAST}", f"--config.checkpoint.every_steps={REF_EVERY}",
              "--config.checkpoint.keep=100", "--config.train.log_every=4")
    res = _run(shared, work, *common)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = [r["message"] for r in read_metrics(work, "event") if r["message"].startswith("resumed from")]
    assert len(resumed) == 1 and resumed[0].startswith(f"resumed from {work / 'checkpoints'}/4 after skipping"), resumed
    for step, how in CORRUPTIONS.items():
        assert f"step {step}: {checkpoint_damage.REASONS[how]}" in resumed[0], (step, resumed[0])
    assert sorted(int(p.name) for p in (work / "corrupt_checkpoints").iterdir()) == sorted(CORRUPTIONS)
    _assert_params_equal(work, reference, LAST)
    # Besides the progress lines and the run's events, stderr holds one line per damaged step, no library
    # traceback (the failed reads' TensorStore operations end into a closed event loop).
    other = [x for x in res.stderr.splitlines() if not re.match(r"(step \d+/\d+ |\[step \d+\] )", x)]
    assert len(other) == len(CORRUPTIONS), "\n".join(other[:40])
    for step, how in CORRUPTIONS.items():
        line = next((x for x in other if f" checkpoint step {step} in " in x), "")
        assert re.search(rf"\] checkpoint step {step} in {re.escape(str(work / 'checkpoints'))} is damaged "
                         rf"\({re.escape(checkpoint_damage.REASONS[how])}.*\): moved to "
                         rf"{re.escape(str(work / 'corrupt_checkpoints' / str(step)))}$", line), (step, other)

    # The metrics of the reference run after step 4 were moved aside: every step is logged once, by the run
    # that produced the checkpoints, in metrics.jsonl and in TensorBoard alike.
    train = [(r["step"], r["loss"]) for r in read_metrics(work, "train")]
    assert [s for s, _ in train] == list(range(4, LAST + 1, 4))
    tb = read_scalars(work)["train/loss"]
    assert [s for s, _ in tb] == [s for s, _ in train]
    assert [v for _, v in tb] == pytest.approx([v for _, v in train], rel=1e-6)  # float32 in TensorBoard
    ref_loss = {r["step"]: r["loss"] for r in read_metrics(reference, "train")}
    assert [loss for _, loss in train] == pytest.approx([ref_loss[s] for s, _ in train], abs=1e-5)
    superseded = [json.loads(x) for x in (work / "metrics.superseded.jsonl").read_text().splitlines()]
    assert [r["step"] for r in superseded if r["kind"] == "train"] == list(range(8, N_STEPS + 1, 4))
    assert "an earlier run logged beyond step 4: " in res.stderr

    # Resuming with a changed model config names the field (before anything is restored or compiled).
    before = (work / "config.json").read_text()
    res = _run(shared, work, *common, "--config.model.embed_dim=64", f"--config.train.num_steps={LAST + 4}",
               timeout=120)
    assert res.returncode == 1
    assert f"Config error: model.embed_dim: the config differs from the one checkpoint step {LAST}" in res.stderr, \
        res.stderr[-2000:]
    assert "model.embed_dim: checkpoint 32 vs config 64" in res.stderr and "Traceback" not in res.stderr
    assert (work / "config.json").read_text() == before  # the refused run did not overwrite the record
    assert ckpt.latest_step(work / "checkpoints") == LAST

    # A second training on a workdir another one holds is refused, naming the holder.
    from eao_jax.workdir_lock import WorkdirLock  # noqa: PLC0415

    with WorkdirLock(work):
        res = _run(shared, work, *common, f"--config.train.num_steps={LAST + 4}", timeout=120)
    assert res.returncode == 1
    assert f"Training refused: workdir {work} is in use by another training (pid {os.getpid()} on host" in res.stderr, \
        res.stderr[-2000:]
    assert ckpt.latest_step(work / "checkpoints") == LAST


def test_a_damaged_only_checkpoint_is_refused_naming_what_to_delete(shared, reference, tmp_path):
    # Damage only reading the arrays reveals; the run refuses in one line, before compiling, deleting nothing.
    import shutil  # noqa: PLC0415

    root = tmp_path / "only" / "checkpoints"
    shutil.copytree(reference / "checkpoints" / "4", root / "4")
    checkpoint_damage.corrupt(root / "4", "truncated array files")
    res = _run(shared, root.parent, "--config.train.num_steps=8", timeout=120)
    assert res.returncode == 1
    # The whole of stderr: no traceback of the failed read's other TensorStore operations (they end into
    # Orbax's closed event loop) before or after the line.
    lines = res.stderr.splitlines()
    assert len(lines) == 1, res.stderr[-3000:]
    assert re.fullmatch(rf"Training refused: checkpoint step 4 in {re.escape(str(root))} cannot be restored "
                        rf"\(restoring it failed \(.+\)\) and there is no earlier step: delete "
                        rf"{re.escape(str(root / '4'))} to start this run from scratch", lines[0]), lines[0]
    assert sorted(p.name for p in root.iterdir()) == ["4"]
