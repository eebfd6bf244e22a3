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
video_seconds_per_s}}, matmul_peak_flops_per_cpu_s, decode (one entry per --decode_videos file:
`decode.bench_decode`'s result of the median run), audio (`logmel.bench_logmel`'s result, or null
with --noaudio), recipe_flops_per_video_second {recipe: FLOPs, "total": sum}. Recipes: 2d (ResNet-152),
3d (ResNeXt-101), s3d (mixed_5c of 32-frame windows, one per second), clip (ViT-B/32 image features,
one frame per second), audio (log-mel).
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

from eao_jax import console
from eao_jax import flops as flops_lib
from eao_jax.lazy import lazy_import

jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
nnx = lazy_import("flax.nnx")
frames_lib = lazy_import("eao_jax.extract.frames")
resnet = lazy_import("eao_jax.extract.resnet")
resnext = lazy_import("eao_jax.extract.resnext")
s3d = lazy_import("eao_jax.extract.s3d")
clip = lazy_import("eao_jax.extract.clip")
logmel = lazy_import("eao_jax.extract.logmel")
decode = lazy_import("eao_jax.extract.decode")
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


def _random(make: Callable[[], Any]) -> Any:
    """The module `make()` builds, with positive random weights drawn by numpy: the speed does not
    depend on them, and NNX's own initialisers compile one small program per parameter shape (43 s of
    a 2-core CPU for S3D's)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: make()))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda x: (0.02 * np.abs(rng.standard_normal(x.shape))).astype(x.dtype), state)
    return nnx.merge(graphdef, state)


def _tiny_spec(ndim: int, stem_stride: tuple[int, ...], groups: int):
    # One narrow block per stage: compiles and runs in seconds, same code paths as the full network.
    return resnet.Spec(ndim=ndim, stem_width=8, stem_stride=stem_stride, groups=groups,
                       stages=tuple(resnet.Stage(1, 8 * 2 ** i, 16 * 2 ** i) for i in range(resnet.STAGES)))


def _resnet152(tiny: bool):
    spec = _tiny_spec(2, (2, 2), 1) if tiny else resnet.RESNET152
    return _random(lambda: resnet.ResNet(spec, rngs=nnx.Rngs(0))), frames_lib.RECIPE_2D.apply


def _resnext101(tiny: bool):
    spec = _tiny_spec(3, resnext.STEM_STRIDE, 4) if tiny else resnext.RESNEXT101
    return _random(lambda: resnet.ResNet(spec, rngs=nnx.Rngs(0))), frames_lib.RECIPE_3D.apply


def tiny_s3d_config():
    """S3D with every width divided by 8 (the parity fixture's reduction)."""
    base = s3d.S3DConfig()
    return dataclasses.replace(base, stem=8, conv_2b=8, conv_2c=24, embed_dim=64,
                               blocks=tuple(tuple(max(1, w // 8) for w in b) for b in base.blocks))


def _s3d(tiny: bool):
    cfg = tiny_s3d_config() if tiny else s3d.S3DConfig()
    return _random(lambda: s3d.S3DVideo(cfg, rngs=nnx.Rngs(0))), lambda m, x: m(x)[0]  # mixed_5c, the EAO feature


def tiny_clip_config():
    """A 64-wide, 2-layer ViT on 64 x 64 frames in 16-pixel patches."""
    return dataclasses.replace(clip.CLIPConfig(), embed_dim=32, image_resolution=64, patch_size=16, vision_width=64,
                               vision_layers=2, context_length=16, vocab_size=512, text_width=64, text_layers=2)


def _clip_image(tiny: bool):
    cfg = tiny_clip_config() if tiny else clip.CLIPConfig()
    return _random(lambda: clip.CLIP(cfg, rngs=nnx.Rngs(0)).visual), lambda m, x: m(x)


BACKBONES: dict[str, Backbone] = {
    "resnet152": Backbone(unit="frame", recipe="2d", units_per_video_second=1.0, item_shape=(224, 398, 3),
                          tiny_item_shape=(64, 64, 3), batch=4, make=_resnet152),
    "resnext101": Backbone(unit="clip", recipe="3d", units_per_video_second=24 / 16, item_shape=(16, 112, 112, 3),
                           tiny_item_shape=(4, 112, 112, 3), batch=2, make=_resnext101),
    # S3D's windows: 32 frames at 16 fps every 16 frames, one per second (README: S3D and CLIP backbones).
    "s3d": Backbone(unit="clip", recipe="s3d", units_per_video_second=1.0, item_shape=(32, 256, 256, 3),
                    tiny_item_shape=(8, 64, 64, 3), batch=2, make=_s3d),
    "clip_image": Backbone(unit="frame", recipe="clip", units_per_video_second=1.0, item_shape=(224, 224, 3),
                           tiny_item_shape=(64, 64, 3), batch=8, make=_clip_image),
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


def time_decode(path: str, repeats: int = 3) -> dict[str, Any]:
    """One decode of `path` for the 2D and 3D recipes and the audio (`decode.bench_decode`), `repeats`
    times in this process: the run with the median CPU time, plus "cpu_s_all"."""
    runs = sorted((decode.bench_decode(path) for _ in range(repeats)), key=lambda r: r["cpu_s"])
    return {**runs[len(runs) // 2], "cpu_s_all": [round(r["cpu_s"], 4) for r in runs]}


def run_benchmark(names: list[str], *, batch: int | None = None, repeats: int = 3, dtype: str = "float32",
                  tiny: bool = False, matmul_size: int = 2048, matmul_repeats: int = 3,
                  audio: bool = True, decode_videos: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Times each backbone of `names` (and, with `audio`, the log-mel recipe on the host CPU; each of
    `decode_videos` decoded once for every recipe) and returns the JSON result (module doc)."""
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
    audio_res = None
    if audio:  # numpy on the host: seconds of audio per CPU-second, no device
        audio_res = logmel.bench_logmel(seconds=5.0 if tiny else 60.0, repeats=repeats)
        recipes["audio"] = audio_res["flops_per_audio_second"]
    recipes["total"] = sum(recipes.values())
    decoded = [time_decode(p, repeats) for p in decode_videos]
    return {"device_kind": devices[0].device_kind, "device_count": len(devices), "platform": devices[0].platform,
            "decode": decoded, "audio": audio_res, "dtype": dtype, "tiny": tiny, "matmul_size": matmul_size,
            "matmul_peak_flops_per_s": peak,
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
        "audio": flags.DEFINE_boolean("audio", True, "Also time the log-mel recipe (numpy, host CPU)."),
        "decode_videos": flags.DEFINE_list("decode_videos", [], "Video files to decode once each for the 2D and 3D "
                                           "frames and the audio (one process, one thread; e.g. a 360p and a 720p "
                                           "video of your data): frames per CPU-second and peak RSS."),
    }


def main(options: dict[str, flags.FlagHolder], argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    values = {name: holder.value for name, holder in options.items()}
    res = run_benchmark(values.pop("backbones"), **values)
    for name, r in res["backbones"].items():
        print(f"{name}: {r['units_per_s']:.2f} {r['unit']}s/s ({r['batch']} x {tuple(r['item_shape'])} in "
              f"{r['time_per_batch_s']:.3f} s), {r['flops_per_unit'] / 1e9:.2f} GFLOP/{r['unit']}, "
              f"{r['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * r['peak_fraction']:.1f}% of the "
              f"{res['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s matmul peak "
              f"({100 * r['peak_fraction_cpu_time']:.1f}% per CPU second); "
              f"{r['flops_per_video_second'] / 1e9:.1f} GFLOP per second of video", file=sys.stderr)
    if res["audio"]:
        a = res["audio"]
        print(f"audio (log-mel, host CPU): {a['logmel_audio_seconds_per_cpu_second']:.0f} s of audio per CPU-second "
              f"(16 kHz mono -> (40, T)); {a['mono_16k_audio_seconds_per_cpu_second']:.0f} for the 48 kHz 6-channel "
              f"mix + resample; {a['flops_per_audio_second'] / 1e6:.2f} MFLOP per second of audio", file=sys.stderr)
    for d in res["decode"]:
        print(f"decode {d['path']} ({d['size']}): {d['source_frames_per_cpu_s']:.0f} source frames per CPU-second "
              f"({d['2d_frames']} 2D + {d['3d_frames']} 3D frames and {d['audio_samples']} audio samples from "
              f"{d['source_frames']} in {d['cpu_s']:.2f} CPU-s), peak RSS {d['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    per_s = ", ".join(f"{k} {v / 1e9:.3g}" for k, v in res["recipe_flops_per_video_second"].items())
    print(f"GFLOP per second of video: {per_s}", file=sys.stderr)
    sys.stderr.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    console.run("extract.bench", functools.partial(main, _define_flags()))
