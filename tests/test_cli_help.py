"""Every command-line tool answers `--help` (and --helpshort, --helpfull) with exit status 0, without importing
JAX, Flax, Orbax, TFDS, grain, Beam or torch (those take seconds to import; they load after flag parsing, when
the tool runs)."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

CLIS = ("eao_jax.main", "eao_jax.evaluate", "eao_jax.convert", "eao_jax.embed", "eao_jax.attention",
        "eao_jax.prepare", "eao_jax.bench", "eao_jax.bench_checkpoint", "eao_jax.data.benchmark", "eao_jax.extract",
        "eao_jax.extract.bench")
HEAVY = ("jax", "flax", "orbax", "tensorflow", "tensorflow_datasets", "grain", "apache_beam", "torch")

# Runs the tool as `python -m` would (run_name "__main__"), then reports its exit status and which heavy
# packages got imported.
_PROBE = """
import runpy, sys
sys.argv = [{mod!r}, "--help"]
code = "no exit"
try:
    runpy.run_module({mod!r}, run_name="__main__", alter_sys=True)
except SystemExit as e:  # absl exits after printing the help
    code = e.code
print("EXIT=" + repr(code))
print("IMPORTED=" + ",".join(m for m in {heavy!r} if m in sys.modules))
"""


@pytest.mark.parametrize("mod", CLIS)
def test_help_imports_no_heavy_package(mod: str) -> None:
    proc = subprocess.run([sys.executable, "-c", _PROBE.format(mod=mod, heavy=HEAVY)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Try --helpfull" in proc.stdout, (proc.stdout[-2000:], proc.stderr[-2000:])  # the help was printed
    *_, exit_line, last = proc.stdout.strip().splitlines()
    assert exit_line in ("EXIT=0", "EXIT=None"), f"`python -m {mod} --help` exits with {exit_line}"
    assert last.startswith("IMPORTED="), proc.stdout[-2000:]
    imported = [m for m in last.removeprefix("IMPORTED=").split(",") if m]
    assert not imported, f"`python -m {mod} --help` imports {imported}"


@pytest.mark.parametrize("flag", ["--helpshort", "--helpfull", "-?"])
def test_every_help_flag_exits_0(flag: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "eao_jax.convert", flag], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stderr[-2000:])
    assert "--torch_checkpoint" in proc.stdout and not proc.stderr.strip(), proc.stderr[-2000:]
