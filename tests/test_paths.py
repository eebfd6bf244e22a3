"""What a newcomer types: the README's quick start verbatim (relative --workdir) from a fresh directory,
then a relative init_from, and a failed background checkpoint save stopping the run at once with one
message. (Relative paths in evaluate: tests/test_evaluate.py; in convert and embed: tests/test_convert.py.)"""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from eao_jax import checkpoint as ckpt
from eao_jax import train

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("paths_jax_cache")


def _env(cache):
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _readme_train_command() -> list[str]:
    """The quick start's training command, exactly as the README writes it."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    line = next(ln for ln in block.splitlines() if "eao_jax.main" in ln)
    cmd = line.split("&&")[-1].split()
    assert cmd[:3] == ["python", "-m", "eao_jax.main"], line
    return cmd


def _fresh_checkout(tmp_path: pathlib.Path) -> pathlib.Path:
    """A new working directory with the repository's configs (the package is installed)."""
    root = tmp_path / "clone"
    shutil.copytree(REPO / "configs", root / "configs")
    return root


def test_readme_quick_start_verbatim_from_a_fresh_directory(cache, tmp_path, monkeypatch):
    cmd = _readme_train_command()
    workdir = next(a.split("=", 1)[1] for a in cmd if a.startswith("--workdir="))
    assert not os.path.isabs(workdir)  # the README's workdir is relative: that is what is tested
    # The README's command on the tiny config (seconds instead of minutes), with the demo's evaluation.
    cmd = [sys.executable if a == "python" else a.replace("configs/demo.py", "configs/demo.py:tiny,evaluate")
           for a in cmd]
    cmd += ["--progress_bar=false"]
    root = _fresh_checkout(tmp_path)
    proc = subprocess.run(cmd, cwd=root, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Checkpoint path should be absolute" not in proc.stderr
    res = json.loads((root / workdir / "results" / "synthetic.json").read_text())
    assert res["num_queries"] == 32 and 0 <= res["metrics"]["t2v"]["R10"] <= 100
    assert re.search(r"^t2v\s+[\d.]+", proc.stdout, re.M) and "finished at step 12" in proc.stdout
    assert ckpt.latest_step(root / workdir) == 12  # a training workdir is a checkpoint too
    saved = ckpt.restore_config(root / workdir)
    assert os.path.isabs(saved.data.data_dir)  # evaluate / attention find the data from anywhere

    # init_from, relative, as a workdir or its checkpoints/ folder, from another directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = os.path.relpath(root / workdir, elsewhere)
    monkeypatch.chdir(elsewhere)
    for given in (rel, os.path.join(rel, "checkpoints")):
        got_root, step = train.resolve_init_from(given)
        assert got_root == root / workdir / "checkpoints" and step == 12


_FAILING_DISK = textwrap.dedent("""
    import runpy, sys
    from orbax.checkpoint._src.serialization import tensorstore_utils

    def full_disk(*args, **kwargs):  # where Orbax's background save thread builds every array's store
        raise OSError("No space left on device")

    tensorstore_utils.build_kvstore_tspec = full_disk
    sys.argv = ["eao_jax.main"] + sys.argv[1:]
    runpy.run_module("eao_jax.main", run_name="__main__")
""")


def test_failed_background_save_stops_the_run_at_once(cache, tmp_path):
    script = tmp_path / "failing_disk.py"
    script.write_text(_FAILING_DISK)
    root = _fresh_checkout(tmp_path)
    proc = subprocess.run([sys.executable, str(script), "--config=configs/demo.py:tiny", "--workdir=run",
                           "--progress_bar=false", "--config.train.log_every=1"],
                          cwd=root, env=_env(cache), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ckdir = root / "run" / "checkpoints"
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"Training stopped: saving step 4 in {ckdir} failed: OSError: No space left on device"
    assert "Traceback" not in proc.stderr and sum("No space left" in ln for ln in lines) == 1
    # The save at step 4 (checkpoint.every_steps=4) failed in the background: the run stopped within a
    # step or two, long before the next save at step 8.
    steps = [json.loads(ln)["step"] for ln in (root / "run" / "metrics.jsonl").read_text().splitlines()
             if json.loads(ln)["kind"] == "train"]
    assert 4 <= max(steps) < 8, steps
    with pytest.raises(FileNotFoundError):
        ckpt.latest_step(ckdir)
