"""Test setup: 8 fake CPU devices must be requested before JAX initialises its backend."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pathlib  # noqa: E402

import pytest  # noqa: E402

DATA = pathlib.Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def data_dir() -> pathlib.Path:
    return DATA


@pytest.fixture(scope="module")
def without_torch():
    """`import torch` fails in the module's tests, as on a plain `pip install -e .` (torch may already
    be imported by other modules of the session: every torch module is hidden, not only the top one)."""
    import sys  # noqa: PLC0415

    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in sys.modules if n == "torch" or n.startswith("torch.")]:
            mp.setitem(sys.modules, name, None)
        mp.setitem(sys.modules, "torch", None)
        yield
