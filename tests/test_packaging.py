"""pyproject.toml: version ranges (not exact pins) that the tested environment satisfies.

jax 0.11+ needs Python 3.12, so jax, jaxlib and flax have one range for Python 3.11 and one for 3.12+
(environment markers); every other core dependency has one range for all."""

from __future__ import annotations

import importlib.metadata
import pathlib
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The libraries whose APIs the code follows closely: each needs a floor and a cap.
CORE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "ml-collections",
        "chex", "av")


PYTHONS = ("3.11", "3.12", "3.13", "3.14")


def _applies(req: Requirement, python: str | None) -> bool:
    """Whether `req` applies on `python` ("3.12"; None: the running interpreter)."""
    if req.marker is None:
        return True
    return req.marker.evaluate(None if python is None else {"python_version": python, "python_full_version": python})


def _requirements(python: str | None = None, reqs: list[str] | None = None) -> dict[str, Requirement]:
    """The requirements that apply on `python`, by name; a name listed twice for one Python is an error."""
    out: dict[str, Requirement] = {}
    for r in map(Requirement, PROJECT["dependencies"] if reqs is None else reqs):
        if _applies(r, python):
            assert r.name not in out, f"{r} and {out[r.name]} both apply on Python {python}"
            out[r.name] = r
    return out


@pytest.mark.parametrize("name", CORE)
def test_core_dependencies_are_ranges_the_installed_version_satisfies(name):
    req = _requirements()[name]
    ops = {spec.operator for spec in req.specifier}
    assert ops == {">=", "<"}, f"{req}: expected a floor and a cap, not a pin"
    installed = importlib.metadata.version(name)
    assert req.specifier.contains(installed, prereleases=True), f"installed {name} {installed} is outside {req}"
    floor = next(spec.version for spec in req.specifier if spec.operator == ">=")
    # The floor is a tested version: CI installs it, or (jax / jaxlib on Python 3.12+, whose floor is the
    # newest release with CUDA 12 and TPU runtimes) a later patch release of it, the newest a plain install takes.
    assert Version(installed).release[:2] == Version(floor).release[:2] and Version(installed) >= Version(floor), (
        f"{req}: the floor should be the tested version {installed} (or an earlier patch release of the same minor)")


def test_no_exact_pins_anywhere():
    extras = [r for reqs in PROJECT["optional-dependencies"].values() for r in reqs]
    pinned = [r for r in [*PROJECT["dependencies"], *extras] if "==" in r]
    assert pinned == []


@pytest.mark.parametrize("python", PYTHONS)
def test_every_supported_python_gets_exactly_one_range_of_each_core_dependency(python):
    assert set(CORE) <= set(_requirements(python))


def test_jax_jaxlib_and_flax_move_to_the_newest_set_on_python_3_12():
    old, new = _requirements("3.11"), _requirements("3.12")
    for name in ("jax", "jaxlib"):
        assert old[name].specifier.contains("0.10.2") and not old[name].specifier.contains("0.11.0")
        assert new[name].specifier.contains("0.12.1") and not new[name].specifier.contains("0.10.2")
    assert new["flax"].specifier.contains("0.12.12") and not new["flax"].specifier.contains("0.12.8")
    assert old["jax"].specifier == old["jaxlib"].specifier and new["jax"].specifier == new["jaxlib"].specifier


@pytest.mark.parametrize("python", PYTHONS)
@pytest.mark.parametrize("extra", ["cuda12", "tpu"])
def test_accelerator_extras_install_jax_with_its_runtime_in_the_same_range(extra, python):
    req = _requirements(python, PROJECT["optional-dependencies"][extra])["jax"]
    assert req.extras == {extra}
    assert req.specifier == _requirements(python)["jax"].specifier
