"""pyproject.toml: version ranges (not exact pins) that the tested environment satisfies."""

from __future__ import annotations

import importlib.metadata
import pathlib

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # standard library from Python 3.11
ROOT = pathlib.Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# The libraries whose APIs the code follows closely: each needs a floor and a cap.
CORE = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "tensorflow-datasets", "ml-collections",
        "chex")


def _requirements() -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in PROJECT["dependencies"]]
    return {r.name: r for r in reqs}


@pytest.mark.parametrize("name", CORE)
def test_core_dependencies_are_ranges_the_installed_version_satisfies(name):
    req = _requirements()[name]
    ops = {spec.operator for spec in req.specifier}
    assert ops == {">=", "<"}, f"{req}: expected a floor and a cap, not a pin"
    installed = importlib.metadata.version(name)
    assert req.specifier.contains(installed, prereleases=True), f"installed {name} {installed} is outside {req}"
    floor = next(spec.version for spec in req.specifier if spec.operator == ">=")
    assert floor == installed, f"{req}: the floor should be the tested version {installed}"


def test_no_exact_pins_anywhere():
    extras = [r for reqs in PROJECT["optional-dependencies"].values() for r in reqs]
    pinned = [r for r in [*PROJECT["dependencies"], *extras] if "==" in r]
    assert pinned == []


@pytest.mark.parametrize("extra", ["cuda12", "tpu"])
def test_accelerator_extras_install_jax_with_its_runtime_in_the_same_range(extra):
    (req,) = [Requirement(r) for r in PROJECT["optional-dependencies"][extra]]
    assert (req.name, req.extras) == ("jax", {extra})
    assert req.specifier == _requirements()["jax"].specifier
