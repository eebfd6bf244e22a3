"""The benchmark CLI (timing and --memory_only) and the analytic FLOP count against XLA's."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eao_jax import batch_contract, bench, flops, parallel, train
from eao_jax.loss import combinatorial_loss
from eao_jax.model import audio
from eao_jax.model.audio import DAVEnet
from eao_jax.model.fusion import FusionTransformer

REPO = pathlib.Path(__file__).resolve().parents[1]
BENCH_CONFIG = REPO / "configs" / "bench_cpu.py"


def _bench_config(arg: str | None = None):
    spec = importlib.util.spec_from_file_location("bench_cpu_config", BENCH_CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _small_config():
    """Large enough that matmuls dominate the element-wise work, small enough to compile fast."""
    c = _bench_config("tiny")
    m = c.model
    m.embed_dim, m.num_heads, m.projection_dim = 256, 4, 256
    m.video_dim, m.text_dim = 512, 128
    m.davenet.widths = (64, 64, 128)
    m.davenet.blocks = (1, 1)
    c.data.n_stft = 32
    return c


def test_conv_taps_by_hand():
    # k=3, pad 1, stride 1 over 4 frames: outputs see 2, 3, 3, 2 frames.
    assert flops.conv1d_taps(4, 3, 1) == 10
    # k=3, pad 1, stride 2 over 5 frames: outputs 0, 1, 2 see frames {0,1}, {1,2,3}, {3,4}.
    assert flops.conv1d_taps(5, 3, 2) == 7
    # k=9, pad 4, stride 2 over 192 frames: output 0 starts at frame -4 (4 taps lost), output 1 at -2 (2 lost);
    # output 94 ends at frame 192 (1 lost), output 95 at 194 (3 lost).
    assert flops.conv1d_taps(192, 9, 2) == 96 * 9 - 4 - 2 - 1 - 3


def test_bench_cli_prints_json_with_sane_numbers():
    cmd = [sys.executable, "-m", "eao_jax.bench", f"--config={BENCH_CONFIG}:tiny", "--steps=2", "--warmup=1",
           "--matmul_size=256", "--peak_every=1", "--devices=1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in bench.REQUIRED_KEYS:
        assert key in res, key
    for key in ("step_time_s", "clips_per_s", "model_flops_per_step", "analytic_flops_per_step",
                "achieved_flops_per_s", "matmul_peak_flops_per_s", "peak_fraction", "peak_memory_bytes"):
        assert res[key] > 0, (key, res[key])
    assert res["device_count"] == 1 and res["batch_size"] == 8 and res["steps"] == 2
    assert len(res["step_times_s"]) == 2
    assert res["step_time_s"] == pytest.approx(statistics.median(res["step_times_s"]), rel=1e-3, abs=1e-4)
    assert res["clips_per_s"] == pytest.approx(8 / res["step_time_s"], rel=1e-9)
    assert res["achieved_flops_per_s"] == pytest.approx(res["analytic_flops_per_step"] / res["step_time_s"], rel=1e-9)
    assert res["peak_fraction"] == pytest.approx(res["achieved_flops_per_s"] / res["matmul_peak_flops_per_s"],
                                                 rel=1e-9)
    assert res["matmul_peak_best_flops_per_s"] >= res["matmul_peak_flops_per_s"]
    assert res["analytic_flops_per_step"] == flops.train_step_flops(_bench_config("tiny"))["total"]
    assert np.isfinite(res["loss"])


def test_memory_only_on_fake_devices_accounts_for_the_arguments():
    config = _bench_config("tiny")
    config.mesh.fsdp = True
    config.mesh.fsdp_min_size = 0  # shard every parameter that divides, to see it in the numbers
    n = 4
    res = bench.memory_analysis(config, n_devices=n)
    for key in bench.MEMORY_KEYS:
        assert key in res, key
    assert res["device_count"] == n
    assert res["per_device_bytes"] == res["argument_bytes"] + res["output_bytes"] + res["temp_bytes"]
    assert res["per_device_bytes_net"] == res["per_device_bytes"] - res["alias_bytes"]
    # XLA's argument bytes are exactly our per-device account of the sharded state plus the batch shard,
    # less audio_STFT_nframes (int32, 8 / n rows per device), which jit drops as unused in training.
    unused = 4 * (8 // n)
    assert res["argument_bytes"] == (res["param_bytes"] + res["batch_stat_bytes"] + res["opt_state_bytes"]
                                     + res["batch_bytes"] - unused)
    # FSDP: the parameters take about 1/n of their bytes per device (small leaves stay replicated).
    total_param_bytes = 4 * res["n_params"]
    assert total_param_bytes / n <= res["param_bytes"] < 0.5 * total_param_bytes
    # The donated state is reused by the outputs.
    assert res["alias_bytes"] >= res["param_bytes"] + res["opt_state_bytes"]


def _xla_flops(fn, *args) -> float:
    return flops.xla_flops(jax.jit(fn).lower(*args).compile())


def test_analytic_flops_agree_with_xla_cost_analysis():
    config = bench._prepare(_small_config())
    m, d = config.model, config.data
    b = bench.global_batch_size(config)
    parts = flops.forward_parts(config)
    rngs = nnx.Rngs(0)

    # DAVEnet forward alone.
    dv = m.davenet
    net = DAVEnet(n_mels=dv.n_mels, blocks=tuple(dv.blocks), widths=tuple(dv.widths), kernel=dv.kernel,
                  bn_momentum=dv.bn_momentum, bn_eps=dv.bn_eps, rngs=rngs, dtype=np.float32)
    gd, st = nnx.split(net)
    spec = jax.ShapeDtypeStruct((b, dv.n_mels, d.n_stft), np.float32)
    xla = _xla_flops(lambda s, x: nnx.merge(gd, s)(x), st, spec)
    assert xla == pytest.approx(parts["davenet"], rel=0.03)

    # One fusion pass stack alone (3 passes x B sequences of all tokens).
    tr = FusionTransformer(m.embed_dim, m.depth, m.num_heads, m.mlp_ratio, qkv_bias=True, eps=1e-6, rngs=rngs,
                           dtype=np.float32)
    gd, st = nnx.split(tr)
    length = d.n_video_tokens + d.max_words + d.n_stft // 2 ** len(dv.blocks)
    x = jax.ShapeDtypeStruct((3 * b, length, m.embed_dim), np.float32)
    mask = jax.ShapeDtypeStruct((3 * b, 1, length, length), np.bool_)
    xla = _xla_flops(lambda s, x, mk: nnx.merge(gd, s)(x, mk), st, x, mask)
    assert xla == pytest.approx(parts["fusion"], rel=0.05)

    # The whole training step (forward, backward, Adam) on one device.
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    graphdef, abstract = train.abstract_train_state(config)
    shardings = train.state_shardings(abstract, mesh, config)
    step = train.make_train_step(config, mesh, graphdef, shardings)
    batch = {k: jax.ShapeDtypeStruct(s, t) for k, (s, t) in batch_contract.batch_shapes(config).items()}
    xla = flops.xla_flops(step.lower(parallel.with_shardings(abstract, shardings), batch).compile())
    analytic = flops.train_step_flops(config)["total"]
    # The analytic count leaves out element-wise work, which XLA counts: a little below, never above.
    assert analytic <= xla <= 1.08 * analytic


def _loss_and_grads(config, batch, mesh=None):
    model = train.create_train_state(config).model
    model.train()
    graphdef, state = nnx.split(model)

    def f(state, batch):
        def loss_fn(m):
            return combinatorial_loss(m(batch), config.loss)[0]

        return nnx.value_and_grad(loss_fn)(nnx.merge(graphdef, state))

    if mesh is None:
        return jax.jit(f)(state, batch)
    batch = parallel.global_batch(batch, mesh)
    with jax.set_mesh(mesh):  # the model's batch-sharding constraints apply
        return jax.jit(f)(state, batch)


def test_remat_chunked_passes_and_batch_constraints_leave_loss_and_grads_unchanged():
    config = bench._prepare(_bench_config("tiny"))
    batch = bench.synthetic_batch(config)
    loss, grads = _loss_and_grads(config, batch)
    # Both changes at once (one compile): fusion passes run one at a time, rematerialised, on a
    # 4-device mesh whose activations are pinned to the data axis.
    config.model.remat = True
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:4])
    loss_s, grads_s = _loss_and_grads(config, batch, mesh)
    np.testing.assert_allclose(loss_s, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grads_s), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_input_pipeline_throughput_on_the_tiny_synthetic_dataset(tmp_path):
    config = bench._prepare(_bench_config("tiny"))
    config.data.dataset, config.data.tfds_config, config.data.data_dir = "synthetic", "tiny", str(tmp_path)
    config.data.num_workers = 0
    res = bench.input_pipeline_throughput(config, 3)
    assert res["data_clips_per_s"] > 0 and res["data_batches"] == 3
    assert res["data_dataset"] == "synthetic/tiny"


@pytest.mark.parametrize("t,cin,cout,stride,kernel", [(12, 16, 24, 1, 9), (13, 8, 16, 2, 9), (24, 16, 8, 2, 9),
                                                       (10, 8, 16, 2, 1), (7, 4, 4, 1, 3)])
def test_conv1d_gradients_match_xla_convolution(t, cin, cout, stride, kernel):
    # DAVEnet's conv: XLA's convolution forward and kernel gradient, and (on CPU, for large kernels)
    # an input gradient computed on time-reversed data; all must equal plain autodiff of the conv.
    rng = np.random.default_rng(t * 100 + cin)
    x = jnp.asarray(rng.standard_normal((3, t, cin)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((kernel, cin, cout)) * 0.1, jnp.float32)
    y = audio.conv1d(x, w, stride)
    ref = audio._conv1d_xla(x, w, stride)
    assert y.shape == (3, -(-t // stride), cout)
    np.testing.assert_array_equal(y, ref)
    dy = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    ref_dx, ref_dw = jax.vjp(lambda a, b: audio._conv1d_xla(a, b, stride), x, w)[1](dy)
    dx, dw = jax.vjp(lambda a, b: audio.conv1d(a, b, stride), x, w)[1](dy)
    np.testing.assert_allclose(dx, ref_dx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, ref_dw, rtol=1e-5, atol=1e-5)
    # The reversed form itself, whichever path the size heuristic picked above.
    np.testing.assert_allclose(audio._reversed_input_grad(w, dy, t, stride), ref_dx, rtol=1e-5, atol=1e-5)


def test_demo_config_derives_steps_per_epoch_as_training_does():
    """`bench --config=configs/demo.py` (train.steps_per_epoch=-1) resolves the epoch length as training
    does, without preparing the data: 400 synthetic training videos // 16 per batch."""
    spec = importlib.util.spec_from_file_location("demo_cfg", pathlib.Path(__file__).parents[1] / "configs" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.get_config().train.steps_per_epoch == -1
    assert bench._prepare(demo.get_config()).train.steps_per_epoch == 25
    assert bench._prepare(demo.get_config("tiny")).train.steps_per_epoch == 12  # set explicitly: kept
