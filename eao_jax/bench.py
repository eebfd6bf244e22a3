r"""Training-step benchmark and memory analysis (issue #7).

  python -m eao_jax.bench --config=configs/bench_cpu.py --steps=10
  python -m eao_jax.bench --config=configs/howto100m.py --config.model.dtype=bfloat16 \
      --memory_only --devices=8
  python -m eao_jax.bench --config=configs/bench_cpu.py --data --config.data.data_dir=DIR ...

Timing mode builds the real sharded train step (`train.make_train_step`: donated state, batch
sharded over the mesh's data axis) on synthetic batches of the config's shapes (fed through
`train_host.DevicePrefetcher`, as the training loop does), compiles it, runs `--warmup` steps and then
`--steps` timed steps. The dense matmul peak of the machine (`--matmul_size` square, in the step's
compute dtype, best of `--matmul_repeats`) is probed every `--peak_every` steps *between* the timed
steps, so both see the same machine load; the reported peak is the median of the probes.
The last stdout line is one JSON object:

  device_kind, device_count, batch_size, dtype, remat, steps, step_time_s (median of the timed steps,
  each step synchronised), step_times_s, step_time_async_s (the same steps dispatched back to back,
  one synchronisation at the end), clips_per_s, model_flops_per_step (XLA cost analysis, whole
  mesh; it counts element-wise ops and rematerialised work, and a scanned loop body once),
  analytic_flops_per_step (eao_jax.flops: the model's matmul/conv FLOPs), xla_to_analytic_flops,
  achieved_flops_per_s (analytic FLOPs / step_time_s: model FLOPs, so recomputation or padded work
  never counts as useful),
  matmul_peak_flops_per_s (median probe, x device_count on accelerators; host CPU devices share the
  same cores), matmul_peak_best_flops_per_s,
  peak_fraction (achieved / peak), step_time_min_s and peak_fraction_best (fastest step against the
  best probe: both from the machine's quietest moments), peak_memory_bytes (the allocator's peak
  where the device reports one, else XLA's memory analysis: arguments + outputs - aliased +
  temporaries), peak_memory_source,
  max_rss_bytes, compile_time_s; step_cpu_time_s, matmul_peak_flops_per_cpu_s and peak_fraction_cpu_time
  (the same ratio per second of process CPU time: on a machine shared with other jobs it is steadier
  than wall time, though spin-waiting threads count as busy); with --data: data_clips_per_s (host
  batches of the grain training pipeline, eao_jax.data.benchmark), data_startup_s.

`--memory_only` allocates nothing: it lowers and compiles the step from abstract shapes on a mesh of
`--devices` devices and prints XLA's per-device memory analysis; the last line is a JSON object with
per_device_bytes (arguments + outputs + temporaries), per_device_bytes_net (minus the donated bytes
that outputs reuse), the parts, and where the argument bytes go (params, batch stats, optimizer
state, batch).

`--devices=N` asks for N host (CPU) devices through XLA_FLAGS before JAX starts (fake devices, for
the memory analysis of a multi-chip mesh on one machine); when JAX is already running, the first N
devices are used. XLA CPU flags, if any, belong on the command line (XLA_FLAGS=...), not here.
"""

from __future__ import annotations

import os
import sys


def _request_host_devices(argv: list[str]) -> None:
    """Handles --devices=N before JAX initialises (the CPU device count is fixed once the backend is up)."""
    n = None
    for i, a in enumerate(argv):
        if a.startswith("--devices="):
            n = a.split("=", 1)[1]
        elif a == "--devices" and i + 1 < len(argv):
            n = argv[i + 1]
    if n is None or "jax" in sys.modules:
        return
    flag = f"--xla_force_host_platform_device_count={int(n)}"
    current = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in current:
        os.environ["XLA_FLAGS"] = (current + " " + flag).strip()


if __name__ == "__main__":
    _request_host_devices(sys.argv)

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from eao_jax import flops as flops_lib  # noqa: E402
from eao_jax.batch_contract import batch_shapes  # noqa: E402
from eao_jax.lazy import lazy_import  # noqa: E402

# Imported on first use, so that `--help` answers without loading JAX / Flax / Orbax.
jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
nnx = lazy_import("flax.nnx")
config_utils = lazy_import("eao_jax.config_utils")
parallel = lazy_import("eao_jax.parallel")
train = lazy_import("eao_jax.train")
train_host = lazy_import("eao_jax.train_host")
eao = lazy_import("eao_jax.model.eao")

REQUIRED_KEYS = ("device_kind", "device_count", "step_time_s", "clips_per_s", "model_flops_per_step",
                 "analytic_flops_per_step", "achieved_flops_per_s", "matmul_peak_flops_per_s",
                 "peak_fraction", "peak_memory_bytes")
MEMORY_KEYS = ("per_device_bytes", "per_device_bytes_net", "argument_bytes", "output_bytes", "alias_bytes",
               "temp_bytes", "generated_code_bytes", "device_count")


# ------------------------------------------------------------------------------------------------
# Shapes and synthetic batches


def global_batch_size(config: ml_collections.ConfigDict) -> int:
    return int(config.data.videos_per_batch) * int(config.data.clips_per_video)


def synthetic_batch(config: ml_collections.ConfigDict, seed: int = 0) -> dict[str, np.ndarray]:
    """A host batch of the config's shapes: N(0, 1) features, random valid lengths (at least one
    token, most items full), masked positions zero, a few items without text (as HowTo100M clips)."""
    rng = np.random.default_rng(seed)
    out = {}
    shapes = batch_shapes(config)
    for key, (shape, dtype) in shapes.items():
        if key.endswith("_mask") or key == "audio_STFT_nframes":
            continue
        out[key] = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    for mod in ("video", "text", "audio"):
        if f"{mod}_mask" not in shapes:
            continue
        b, n = shapes[f"{mod}_mask"][0]
        lengths = np.where(rng.random(b) < 0.7, n, rng.integers(1, n + 1, b))
        if mod == "text":
            lengths[rng.random(b) < 0.1] = 0  # clips without narration
        mask = (np.arange(n)[None] < lengths[:, None]).astype(np.float32)
        out[f"{mod}_mask"] = mask
        feat = out[mod]
        if mod == "audio":
            feat *= mask[:, None, :]
            out["audio_STFT_nframes"] = np.full((b,), -1, np.int32)
        else:
            feat *= mask[..., None]
    return out


def _cycle(batches: list[dict[str, np.ndarray]]) -> Iterator[dict[str, np.ndarray]]:
    i = 0
    while True:
        yield batches[i % len(batches)]
        i += 1


# ------------------------------------------------------------------------------------------------
# Measurements


def _device_peak_bytes(devices: list) -> int | None:
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 (backends without allocator statistics)
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _memory_numbers(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    if ma is None:
        raise RuntimeError("this backend returns no memory analysis for the compiled step")
    arg, out, alias, tmp = (int(ma.argument_size_in_bytes), int(ma.output_size_in_bytes),
                            int(ma.alias_size_in_bytes), int(ma.temp_size_in_bytes))
    return {"argument_bytes": arg, "output_bytes": out, "alias_bytes": alias, "temp_bytes": tmp,
            "generated_code_bytes": int(ma.generated_code_size_in_bytes),
            "per_device_bytes": arg + out + tmp, "per_device_bytes_net": arg + out - alias + tmp}


def _prepare(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    complete = getattr(config_utils, "complete_config", None)
    config = complete(config) if complete is not None else config
    # train.steps_per_epoch=-1 resolved as training does, from the number of training videos: the
    # synthetic dataset's is in its spec, a released dataset's is read from its prepared split when
    # data.data_dir holds it. The value only shapes the learning-rate schedule, never the cost of a
    # step, so without the dataset at hand one epoch is one batch.
    n_videos = _training_videos(config)
    return config_utils.resolve_epoch_steps(config, max(n_videos or 0, config.data.videos_per_batch))


def _training_videos(config: ml_collections.ConfigDict) -> int | None:
    d = config.data
    if d.dataset == "synthetic":
        from tfds_builders.synthetic import world  # noqa: PLC0415

        return world.SPECS[d.tfds_config or "default"].train_videos
    if d.get("data_dir"):
        try:
            from eao_jax.data import pipelines  # noqa: PLC0415

            return len(pipelines.open_dataset(d.dataset, d.data_dir, d.get("tfds_config")).source(
                d.get("split") or "train"))
        except Exception:  # not prepared here: the schedule's shape does not matter for timing
            return None
    return None


def _mesh(config: ml_collections.ConfigDict, n_devices: int | None) -> jax.sharding.Mesh:
    devices = jax.devices()
    if n_devices is not None:
        if n_devices > len(devices):
            raise ValueError(f"--devices={n_devices} but only {len(devices)} devices are available "
                             "(set it before JAX starts, or XLA_FLAGS=--xla_force_host_platform_device_count=N)")
        devices = devices[:n_devices]
    config_utils.validate_config(config, n_devices=len(devices))
    return parallel.make_mesh(config.mesh, devices)


def _compile(step: Any, mesh: jax.sharding.Mesh, state: Any, batch: Any) -> Any:
    """Lowers and compiles the jitted step. Traced under the mesh context, so the model's activation
    constraints (`layers.shard_batch`) see the mesh, as in the training loop."""
    with jax.set_mesh(mesh):
        return step.lower(state, batch).compile()


def _sharded_bytes(abstract: Any, shardings: Any) -> int:
    """Per-device bytes of a pytree of ShapeDtypeStructs under NamedShardings (largest shard)."""
    total = 0
    for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
        shard = s.shard_shape(tuple(x.shape))
        total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
    return total


def memory_analysis(config: ml_collections.ConfigDict, n_devices: int | None = None) -> dict[str, Any]:
    """Compiles the train step from abstract shapes on `n_devices` devices (nothing allocated) and
    returns XLA's per-device memory analysis plus where the argument bytes go (see module doc)."""
    config = _prepare(config)
    mesh = _mesh(config, n_devices)
    graphdef, abstract = train.abstract_train_state(config)
    shardings = train.state_shardings(abstract, mesh, config)
    abstract_state = parallel.with_shardings(abstract, shardings)
    bsh = parallel.batch_sharding(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(shape, dtype, sharding=bsh)
                      for k, (shape, dtype) in batch_shapes(config).items()}
    step = train.make_train_step(config, mesh, graphdef, shardings)
    t0 = time.perf_counter()
    compiled = _compile(step, mesh, abstract_state, abstract_batch)
    compile_s = time.perf_counter() - t0
    res: dict[str, Any] = {"mode": "memory_only", "device_count": mesh.size, "mesh": dict(mesh.shape),
                           "device_kind": mesh.devices.flat[0].device_kind, "batch_size": global_batch_size(config),
                           "dtype": config.model.dtype, "remat": bool(config.model.remat),
                           "fsdp": bool(config.mesh.fsdp), "compile_time_s": round(compile_s, 2)}
    res.update(_memory_numbers(compiled))
    model_abs, model_sh = abstract["model"], shardings["model"]
    p_abs, rest_abs = nnx.split_state(model_abs, nnx.Param, ...)
    p_sh, rest_sh = nnx.split_state(model_sh, nnx.Param, ...)
    res["param_bytes"] = _sharded_bytes(p_abs, p_sh)
    res["batch_stat_bytes"] = _sharded_bytes(rest_abs, rest_sh)
    res["opt_state_bytes"] = _sharded_bytes(abstract["opt"], shardings["opt"])
    res["batch_bytes"] = sum(int(np.prod(bsh.shard_shape(s.shape))) * np.dtype(s.dtype).itemsize
                             for s in abstract_batch.values())
    res["n_params"] = int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(p_abs)))
    res["per_device_gib"] = round(res["per_device_bytes"] / 2**30, 3)
    return res


def input_pipeline_throughput(config: ml_collections.ConfigDict, n_batches: int) -> dict[str, Any]:
    """Clips/s of the training input pipeline (grain, host side), through the data layer's own
    loader benchmark (`eao_jax.data.benchmark.run`, first batch not timed).

    Reads config.data (dataset, data_dir, tfds_config, batch size, num_workers, read_threads,
    prefetch). Without a data_dir it reads the synthetic `paper_dims` dataset (the released
    HowTo100M record sizes), prepared once in a temporary folder.
    """
    import tempfile  # noqa: PLC0415

    from eao_jax.data import benchmark  # noqa: PLC0415 (heavy, only with --data)

    d = config.data
    if d.get("data_dir") is None:
        dataset, builder_config = "synthetic", "paper_dims"
        data_dir = os.path.join(tempfile.gettempdir(), "eao_jax_benchmark_data")
    else:
        dataset, builder_config, data_dir = d.dataset, d.get("tfds_config"), d.data_dir
    from eao_jax.prepare import prepare_once  # noqa: PLC0415

    prepare_once(dataset, data_dir, builder_config)  # the synthetic dataset, before the pipeline reads it
    r = benchmark.run(data_dir=data_dir, dataset=dataset, config=builder_config,
                      workers=int(d.get("num_workers", 0) or 0), videos_per_batch=int(d.videos_per_batch),
                      clips_per_video=int(d.clips_per_video), batches=n_batches,
                      read_threads=int(d.get("read_threads", 2) or 2), prefetch=int(d.get("prefetch", 2) or 2),
                      seed=int(config.get("seed", 0)))
    return {"data_clips_per_s": float(r["clips_per_s"]), "data_startup_s": float(r["startup_s"]),
            "data_batches": n_batches, "data_dataset": f"{dataset}/{builder_config}",
            "data_workers": int(d.get("num_workers", 0) or 0)}


def run_benchmark(config: ml_collections.ConfigDict, *, steps: int = 10, warmup: int = 2,
                  n_devices: int | None = None, matmul_size: int = 2048, matmul_repeats: int = 3,
                  peak_every: int = 1, data_batches: int = 0) -> dict[str, Any]:
    """Times the real train step on synthetic batches and probes the matmul peak (module doc).
    Returns the result dict printed as the last line by the CLI."""
    if steps < 1 or warmup < 0 or peak_every < 1:
        raise ValueError(f"--steps ({steps}) and --peak_every ({peak_every}) must be >= 1, --warmup >= 0")
    config = _prepare(config)
    mesh = _mesh(config, n_devices)
    devices = list(mesh.devices.flat)
    b = global_batch_size(config)
    dtype = eao.DTYPES[config.model.dtype]

    graphdef, state, shardings = train.init_train_state(config, mesh)
    step_fn = train.make_train_step(config, mesh, graphdef, shardings)
    host_batches = [synthetic_batch(config, seed=i) for i in range(2)]
    prefetch = train_host.DevicePrefetcher(_cycle(host_batches), mesh, size=2)
    try:
        first = next(prefetch).batch
        t0 = time.perf_counter()
        compiled = _compile(step_fn, mesh, state, first)
        compile_s = time.perf_counter() - t0
        xla_flops = flops_lib.xla_flops(compiled)
        analytic = flops_lib.train_step_flops(config)["total"]
        # XLA's cost analysis describes one device's program of the partitioned step.
        xla_total = xla_flops * (len(devices) if len(devices) > 1 else 1)

        for _ in range(warmup):
            state, metrics = compiled(state, next(prefetch).batch)
        jax.block_until_ready((state, metrics) if warmup else state)

        peak0, probe = flops_lib.matmul_peak(matmul_size, dtype, matmul_repeats, devices[0])
        probes, times, cpu_times = [peak0], [], []
        for i in range(steps):
            batch = next(prefetch).batch
            t0, c0 = time.perf_counter(), time.process_time()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
            if (i + 1) % peak_every == 0:
                probes.append(flops_lib.probe_matmul(*probe, matmul_repeats))
        loss = float(metrics["loss"])

        # The same number of steps, dispatched back to back (no host synchronisation in the loop).
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = compiled(state, next(prefetch).batch)
        jax.block_until_ready((state, metrics))
        async_s = (time.perf_counter() - t0) / steps
        probes.append(flops_lib.probe_matmul(*probe, matmul_repeats))
    finally:
        prefetch.close()

    step_s = statistics.median(times)
    # Model FLOPs (analytic): the work the model needs, whatever the implementation recomputes
    # (remat) or XLA counts (element-wise ops; a scanned loop body only once).
    used_flops = float(analytic)
    achieved = used_flops / step_s
    peaks = [p for p, _ in probes]
    # One probe runs on one device; accelerators add up, host (CPU) devices share the same cores.
    n_chips = 1 if devices[0].platform == "cpu" else len(devices)
    peak = statistics.median(peaks) * n_chips
    # Load-independent view (a shared machine): FLOPs per second of process CPU time, step vs matmul.
    step_cpu = statistics.median(cpu_times)
    peak_cpu = statistics.median(c for _, c in probes)
    mem = _memory_numbers(compiled)
    dev_peak = _device_peak_bytes(devices)
    res: dict[str, Any] = {
        "mode": "timing", "device_kind": devices[0].device_kind, "device_count": len(devices),
        "platform": devices[0].platform, "mesh": dict(mesh.shape), "batch_size": b,
        "dtype": config.model.dtype, "remat": bool(config.model.remat), "steps": steps, "warmup": warmup,
        "step_time_s": step_s, "step_times_s": [round(t, 4) for t in times],
        "step_time_async_s": async_s, "clips_per_s": b / step_s,
        "model_flops_per_step": xla_total, "analytic_flops_per_step": float(analytic),
        "xla_to_analytic_flops": xla_total / used_flops,
        "achieved_flops_per_s": achieved, "matmul_peak_flops_per_s": peak,
        "matmul_peak_best_flops_per_s": max(peaks) * n_chips, "matmul_probes": len(peaks),
        "matmul_size": matmul_size, "matmul_dtype": jnp.dtype(dtype).name,
        "peak_fraction": achieved / peak,
        "step_time_min_s": min(times),
        "peak_fraction_best": used_flops / min(times) / (max(peaks) * n_chips),
        "step_cpu_time_s": step_cpu, "matmul_peak_flops_per_cpu_s": peak_cpu,
        "peak_fraction_cpu_time": used_flops / step_cpu / peak_cpu,
        "peak_memory_bytes": dev_peak if dev_peak is not None else mem["per_device_bytes_net"],
        "peak_memory_source": "allocator" if dev_peak is not None else "xla_memory_analysis",
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "compile_time_s": compile_s, "loss": loss,
    }
    if data_batches > 0:
        res.update(input_pipeline_throughput(config, data_batches))
    return res


# ------------------------------------------------------------------------------------------------
# CLI

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (ml_collections), e.g. configs/bench_cpu.py.",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after warm-up); the reported step time is their median.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DEVICES = flags.DEFINE_integer("devices", None, "Number of devices for the mesh (host devices are created "
                                "through XLA_FLAGS before JAX starts). Default: all.")
_MEMORY_ONLY = flags.DEFINE_boolean("memory_only", False, "Compile from abstract shapes and print XLA's "
                                    "per-device memory analysis; nothing is allocated or run.")
_DATA = flags.DEFINE_boolean("data", False, "Also measure the input pipeline (config.data) in clips/s.")
_DATA_BATCHES = flags.DEFINE_integer("data_batches", 20, "Batches timed with --data.")
_MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048, "Side of the square matmul of the peak probe.")
_MATMUL_REPEATS = flags.DEFINE_integer("matmul_repeats", 3, "Matmuls per probe (the best counts).")
_PEAK_EVERY = flags.DEFINE_integer("peak_every", 1, "Probe the matmul peak after every this many timed steps.")
flags.mark_flags_as_required(["config"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    config = _CONFIG.value
    if _MEMORY_ONLY.value:
        res = memory_analysis(config, _DEVICES.value)
        gib = {k: v / 2**30 for k, v in res.items() if k.endswith("_bytes")}
        print(f"per device: arguments {gib['argument_bytes']:.3f} GiB (params {gib['param_bytes']:.3f}, optimizer "
              f"{gib['opt_state_bytes']:.3f}, batch {gib['batch_bytes']:.3f}), outputs {gib['output_bytes']:.3f} GiB "
              f"(aliased {gib['alias_bytes']:.3f}), temporaries {gib['temp_bytes']:.3f} GiB; total "
              f"{res['per_device_gib']:.3f} GiB", file=sys.stderr)
    else:
        res = run_benchmark(config, steps=_STEPS.value, warmup=_WARMUP.value, n_devices=_DEVICES.value,
                            matmul_size=_MATMUL_SIZE.value, matmul_repeats=_MATMUL_REPEATS.value,
                            peak_every=_PEAK_EVERY.value, data_batches=_DATA_BATCHES.value if _DATA.value else 0)
        print(f"step {res['step_time_s']:.4f} s ({res['clips_per_s']:.1f} clips/s), "
              f"{res['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s = {100 * res['peak_fraction']:.1f}% of the "
              f"{res['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s matmul peak", file=sys.stderr)
    sys.stdout.flush()
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    app.run(main)
