r"""Feature-extraction throughput of each backbone on this machine, and the cost of the recipes.

  python -m eao_jax.extract.bench                                  # every backbone, full size
  python -m eao_jax.extract.bench --backbones=resnet152 --batch=8 --repeats=5
  python -m eao_jax.extract.bench --tiny                           # reduced instances (a smoke test)

Each backbone runs through `runner.Runner` (jitted over a fixed batch, split over the local devices)
on random inputs of one recipe unit's shape (a 224 x 398 frame: a 720p video's short side at 224; a
16 x 112 x 112 clip), with random weights (the speed does not depend on them). After one untimed
call, `--repeats` timed calls, each from host input to host features as an extraction job runs
them; the median counts. FLOPs per unit are XLA's cost analysis of the compiled batch divided by the
batch (convolutions dominate; element-wise ops are counted too). Achieved FLOP/s are set against
the dense matmul peak (`eao_jax.flops.matmul_peak`, probed between the timed calls, median), as
`eao_jax.bench` does for training. A recipe's cost per second of video is its units per second
(1 frame for 2D, 24 / 16 = 1.5 clips for 3D) times the FLOPs per unit.

stderr gets one line per backbone; the last stdout line is a JSON object: device_kind,
device_count, dtype, matmul_peak_flops_per_s, backbones {name: {unit, batch, item_shape,
flops_per_unit, time_per_batch_s (median), times_s, units_per_s, achieved_flops_per_s,
peak_fraction, flops_per_cpu_s and peak_fraction_cpu_time (the same per second of process CPU time,
steadier on a shared machine), compile_time_s, units_per_video_second, flops_per_video_second,
video_seconds_per_s}}, matmul_peak_flops_per_cpu_s, recipe_flops_per_video_second {recipe: FLOPs,
"total": sum}.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from absl import app, flags

from eao_jax import flops as flops_lib
from eao_jax.lazy import lazy_import

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
nnx = lazy_import("flax.nnx")
frames_lib = lazy_import("eao_jax.extract.frames")
resnet = lazy_import("eao_jax.extract.resnet")
resnext = lazy_import("eao_jax.extract.resnext")
runner_lib = lazy_import("eao_jax.extract.runner")


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One benchmarked backbone: `make(tiny)` -> (model, apply) with random weights; `item_shape` is
    one unit's input (`tiny_item_shape` for the reduced instance); the recipe `recipe` makes
    `units_per_video_second` units per second of video."""

    unit: str
    recipe: str
    units_per_video_second: float
    item_shape: tuple[int, ...]
    tiny_item_shape: tuple[int, ...]
    batch: int
    make: Callable[[bool], tuple[Any, Callable]]


def _tiny_spec(ndim: int, stem_stride: tuple[int, ...], groups: int):
    # One narrow block per stage: compiles and runs in seconds, same code paths as the full network.
    return resnet.Spec(ndim=ndim, stem_width=8, stem_stride=stem_stride, groups=groups,
                       stages=tuple(resnet.Stage(1, 8 * 2 ** i, 16 * 2 ** i) for i in range(resnet.STAGES)))


def _resnet152(tiny: bool):
    spec = _tiny_spec(2, (2, 2), 1) if tiny else resnet.RESNET152
    return resnet.ResNet(spec, rngs=nnx.Rngs(0)), frames_lib.RECIPE_2D.apply


def _resnext101(tiny: bool):
    spec = _tiny_spec(3, resnext.STEM_STRIDE, 4) if tiny else resnext.RESNEXT101
    return resnet.ResNet(spec, rngs=nnx.Rngs(0)), frames_lib.RECIPE_3D.apply


BACKBONES: dict[str, Backbone] = {
    "resnet152": Backbone(unit="frame", recipe="2d", units_per_video_second=1.0, item_shape=(224, 398, 3),
                          tiny_item_shape=(64, 64, 3), batch=4, make=_resnet152),
    "resnext101": Backbone(unit="clip", recipe="3d", units_per_video_second=24 / 16, item_shape=(16, 112, 112, 3),
                           tiny_item_shape=(4, 112, 112, 3), batch=2, make=_resnext101),
    # The S3D, CLIP and log-mel recipes add their backbones here (recipes "s3d", "clip", "audio").
}
DTYPES = ("float32", "bfloat16")

def time_backbone(name: str, *, batch: int | None = None, repeats: int = 3, dtype: str = "float32",
                  tiny: bool = False, probe: Any = None, matmul_repeats: int = 3) -> dict[str, Any]:
    """Times one backbone (module doc); `probe` is `matmul_peak`'s probe, run after each timed call.
    Returns its entry of the JSON result plus "matmul_probes" (FLOP/s)."""
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    b = BACKBONES[name]
    model, apply = b.make(tiny)
    item = b.tiny_item_shape if tiny else b.item_shape
    run = runner_lib.Runner(model, apply, batch or b.batch, compute_dtype=jnp.dtype(dtype))
    n = run.batch_size
    t0 = time.perf_counter()
    compiled = run.lower(item).compile()
    compile_s = time.perf_counter() - t0
    # XLA's cost analysis describes one device's share of the batch.
    flops_per_unit = flops_lib.xla_flops(compiled) * len(run.mesh.devices.flat) / n
    x = np.random.default_rng(0).standard_normal((n, *item), dtype=np.float32)
    run(x)
    times, cpu_times, probes = [], [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run(x)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if probe is not None:
            probes.append(flops_lib.probe_matmul(*probe, matmul_repeats))
    t = statistics.median(times)
    return {"unit": b.unit, "recipe": b.recipe, "batch": n, "item_shape": list(item), "tiny": tiny,
            "flops_per_unit": flops_per_unit, "time_per_batch_s": t, "times_s": [round(s, 4) for s in times],
            "units_per_s": n / t, "achieved_flops_per_s": flops_per_unit * n / t, "compile_time_s": compile_s,
            "units_per_video_second": b.units_per_video_second,
            "flops_per_video_second": flops_per_unit * b.units_per_video_second,
            "video_seconds_per_s": n / t / b.units_per_video_second,
            "flops_per_cpu_s": flops_per_unit * n / statistics.median(cpu_times), "matmul_probes": probes}


def run_benchmark(names: list[str], *, batch: int | None = None, repeats: int = 3, dtype: str = "float32",
                  tiny: bool = False, matmul_size: int = 2048, matmul_repeats: int = 3) -> dict[str, Any]:
    """Times each backbone of `names` and returns the JSON result (module doc)."""
    unknown = [n for n in names if n not in BACKBONES]
    if unknown:
        raise ValueError(f"unknown backbone(s) {', '.join(unknown)}; known: {', '.join(BACKBONES)}")
    devices = jax.local_devices()
    first, probe = flops_lib.matmul_peak(matmul_size, jnp.dtype(dtype), matmul_repeats, devices[0])
    probes, results = [first], {}
    for name in names:
        res = time_backbone(name, batch=batch, repeats=repeats, dtype=dtype, tiny=tiny, probe=probe,
                            matmul_repeats=matmul_repeats)
        probes += res.pop("matmul_probes")
        results[name] = res
    # One probe runs on one device; accelerators add up, host (CPU) devices share the same cores.
    n_chips = 1 if devices[0].platform == "cpu" else len(devices)
    peak = statistics.median(p for p, _ in probes) * n_chips
    # Per second of process CPU time: steadier than wall time on a machine shared with other jobs.
    peak_cpu = statistics.median(c for _, c in probes)
    recipes: dict[str, float] = {}
    for res in results.values():
        res["peak_fraction"] = res["achieved_flops_per_s"] / peak
        res["peak_fraction_cpu_time"] = res["flops_per_cpu_s"] / peak_cpu
        recipes[res["recipe"]] = recipes.get(res["recipe"], 0.0) + res["flops_per_video_second"]
    recipes["total"] = sum(recipes.values())
    return {"device_kind": devices[0].device_kind, "device_count": len(devices), "platform": devices[0].platform,
            "dtype": dtype, "tiny": tiny, "matmul_size": matmul_size, "matmul_peak_flops_per_s": peak,
            "matmul_peak_flops_per_cpu_s": peak_cpu, "matmul_probes": len(probes), "backbones": results,
            "recipe_flops_per_video_second": recipes}


def _define_flags() -> dict[str, flags.FlagHolder]:
    # Defined only when run as a program, so that importing this module (for BACKBONES or
    # run_benchmark) never clashes with another tool's flags of the same name.
    return {
        "backbones": flags.DEFINE_list("backbones", list(BACKBONES),
                                       f"Which backbones to time: {', '.join(BACKBONES)}."),
        "batch": flags.DEFINE_integer("batch", None, "Units per call (default per backbone: "
                                      + ", ".join(f"{k} {v.batch}" for k, v in BACKBONES.items()) + ")."),
        "repeats": flags.DEFINE_integer("repeats", 3, "Timed calls per backbone (the median counts)."),
        "dtype": flags.DEFINE_enum("dtype", "float32", DTYPES, "Compute dtype (bfloat16 for accelerators)."),
        "tiny": flags.DEFINE_boolean("tiny", False, "Reduced instances (one narrow block per stage): a quick check "
                                     "that the command works, not a measurement of the real backbones."),
        "matmul_size": flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul of the peak probe."),
        "matmul_repeats": flags.DEFINE_integer("matmul_repeats", 3, "Matmuls per probe (the best counts)."),
    }


def main(options: dict[str, flags.FlagHolder], argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        values = {name: holder.value for name, holder in options.items()}
        res = run_benchmark(values.pop("backbones"), **values)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    for name, r in res["backbones"].items():
        print(f"{name}: {r['units_per_s']:.2f} {r['unit']}s/s ({r['batch']} x {tuple(r['item_shape'])} in "
              f"{r['time_per_batch_s']:.3f} s), {r['flops_per_unit'] / 1e9:.2f} GFLOP/{r['unit']}, "
              f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['peak_fraction']:.1f}% of the "
              f"{res['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s matmul peak "
              f"({100 * r['peak_fraction_cpu_time']:.1f}% per CPU second); "
              f"{r['flops_per_video_second'] / 1e9:.1f} GFLOP per second of video", file=sys.stderr)
    per_s = ", ".join(f"{k} {v / 1e9:.1f}" for k, v in res["recipe_flops_per_video_second"].items())
    print(f"GFLOP per second of video: {per_s}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    app.run(functools.partial(main, _define_flags()))
