"""The sharded train step: same numbers on 1 device and on 8 fake devices (meshes 8x1 and 4x2),
FSDP placement rules, the learning-rate schedule, skipped non-finite updates, bf16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eao_jax import parallel, train
from eao_jax.config_utils import reference_config

B = 16  # global batch (clips)


def tiny_config():
    c = reference_config()
    m = c.model
    m.embed_dim, m.num_heads, m.projection_dim = 32, 4, 16
    m.video_dim, m.text_dim = 8, 6
    m.davenet.blocks, m.davenet.widths = (1, 1), (8, 8, 16)
    c.data.videos_per_batch, c.data.clips_per_video = 4, 4
    # The attention key bias has an exactly zero gradient (softmax is shift-invariant): Adam would turn
    # its float noise into updates of up to lr (noise / (|noise| + eps)), different on every mesh. A
    # larger eps keeps such noise below the tolerance; real gradients (>> eps) still move by ~lr.
    c.train.steps_per_epoch, c.train.lr, c.train.eps = 3, 1e-4, 1e-3
    c.mesh.fsdp, c.mesh.fsdp_min_size = True, 64  # small threshold: the tiny model's matrices get sharded
    return c


def make_batch(seed=0):
    rng = np.random.default_rng(seed)
    batch = dict(
        video=rng.normal(size=(B, 5, 8)).astype(np.float32),
        video_mask=(rng.random((B, 5)) > 0.2).astype(np.float32),
        text=rng.normal(size=(B, 7, 6)).astype(np.float32),
        text_mask=(rng.random((B, 7)) > 0.3).astype(np.float32),
        audio=rng.normal(size=(B, 40, 32)).astype(np.float32),
        audio_mask=np.ones((B, 32), np.float32),
    )
    batch["text_mask"][:3] = 0  # clips without narration
    batch["audio_mask"][5, 16:] = 0
    for k in ("video", "text"):
        batch[k] *= batch[f"{k}_mask"][..., None]
    return batch


def numpy_state(abstract, seed=0):
    """An initial train state drawn on the host (no initialisation compile): parameters N(0, 0.2),
    BatchNorm mean 0 / var 1, optimizer moments and counters 0."""
    rng = np.random.default_rng(seed)

    def leaf(path, x):
        keys = [getattr(k, "key", None) for k in path]
        if keys[0] == "opt":
            return np.zeros(x.shape, x.dtype)
        if keys[-1] == "var":
            return np.ones(x.shape, x.dtype)
        if keys[-1] == "mean":
            return np.zeros(x.shape, x.dtype)
        return (0.2 * rng.normal(size=x.shape)).astype(x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(abstract))


@pytest.fixture(scope="module")
def initial():
    """One initial state (host), reused by every mesh."""
    c = tiny_config()
    graphdef, abstract = train.abstract_train_state(c)
    return c, graphdef, abstract, numpy_state(abstract)


def setup_step(initial, shape, config=None):
    c0, graphdef, abstract, pure = initial
    c = (config or c0).copy_and_resolve_references()
    c.mesh.data, c.mesh.model = shape
    mesh = parallel.make_mesh(c.mesh, jax.devices()[: shape[0] * shape[1]])
    if config is not None:
        graphdef, abstract = train.abstract_train_state(c)
    shardings = train.state_shardings(abstract, mesh, c)
    step = train.make_train_step(c, mesh, graphdef, shardings)

    def fresh_state():
        return train._fill(abstract, jax.device_put(pure, nnx.to_pure_dict(shardings)))

    return mesh, shardings, step, fresh_state


def run_step(setup, batch=None):
    mesh, shardings, step, fresh_state = setup
    state, metrics = step(fresh_state(), parallel.global_batch(batch or make_batch(0), mesh))
    return state, jax.device_get(metrics), shardings


@pytest.fixture(scope="module")
def single(initial):
    """The 1-device step (compiled once) and its result on the reference batch."""
    setup = setup_step(initial, (1, 1))
    state, metrics, _ = run_step(setup)
    return setup, jax.device_get(nnx.to_pure_dict(state)), metrics


def test_sharded_step_matches_single_device(initial, single):
    _, ref, ref_m = single
    assert ref_m["finite"] == 1 and np.isfinite(ref_m["loss"])
    before = initial[3]["model"]
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), ref["model"], before)
    assert max(jax.tree.leaves(moved)) > 5e-5  # the step did update the parameters
    for shape in ((8, 1), (4, 2)):
        state, m, shardings = run_step(setup_step(initial, shape))
        # The rules did shard something over both axes where the mesh has them.
        specs = [s.spec for s in jax.tree.leaves(nnx.to_pure_dict(shardings))]
        assert any(parallel.DATA_AXIS in tuple(s) for s in specs)
        if shape[1] > 1:
            assert any(parallel.MODEL_AXIS in tuple(s) for s in specs)
        got = jax.device_get(nnx.to_pure_dict(state))
        for k in ("loss", "tv", "ta", "va", "t_va", "v_ta", "a_tv", "grad_norm"):
            np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-5, err_msg=f"{k} on mesh {shape}")
        np.testing.assert_array_equal(m["tv_count"], ref_m["tv_count"])
        diff = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a, np.float64) - b))), got, ref)
        worst = max(jax.tree.leaves(diff))
        assert worst <= 1e-5, f"mesh {shape}: parameters/optimizer state differ by {worst}"
        # BatchNorm running statistics are global-batch statistics on every mesh.
        np.testing.assert_allclose(got["model"]["davenet"]["stem_bn"]["mean"],
                                   ref["model"]["davenet"]["stem_bn"]["mean"], atol=1e-6)


def test_param_spec_rules():
    c = tiny_config()
    c.mesh.data, c.mesh.model = 4, 2
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:8])
    spec = lambda shape, **kw: parallel.param_spec(shape, mesh, **{"fsdp": True, "fsdp_min_size": 64, **kw})
    assert spec((12, 40)) == jax.P(None, "data") or spec((12, 40)) == jax.P("model", "data")
    assert spec((12, 40)) == jax.P("model", "data")  # 40 % 4 == 0 (data), 12 % 2 == 0 (model)
    assert spec((9, 8, 16)) == jax.P(None, "model", "data")  # conv kernel: largest divisible dim
    assert spec((7,)) == jax.P()  # below fsdp_min_size
    assert spec((3, 5, 7)) == jax.P()  # nothing divisible
    assert spec((64, 32), fsdp=False) == jax.P("model", None)
    assert spec(()) == jax.P()


def test_learning_rate_is_per_epoch_staircase():
    c = tiny_config()
    c.train.lr, c.train.lr_decay, c.train.steps_per_epoch = 5e-5, 0.9, 4
    sched = train.learning_rate_schedule(c.train)
    got = [float(sched(s)) for s in range(10)]
    want = [5e-5 * 0.9 ** (s // 4) for s in range(10)]
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_non_finite_step_is_skipped(initial, single):
    bad = make_batch(0)
    bad["video"][1, 0, 0] = np.nan
    state, m, _ = run_step(single[0], batch=bad)
    assert m["finite"] == 0 and not np.isfinite(m["loss"])
    got = jax.device_get(nnx.to_pure_dict(state))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(initial[3]), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing changed: params, moments, BN stats, step


def test_bf16_compute_keeps_fp32_state(initial, single):
    c = initial[0].copy_and_resolve_references()
    c.model.dtype = "bfloat16"
    _, abstract = train.abstract_train_state(c)
    dtypes = {x.dtype for x in jax.tree.leaves(abstract) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {jnp.dtype(jnp.float32)}
    state, m, _ = run_step(setup_step(initial, (1, 1), config=c))
    assert m["finite"] == 1
    ref_m = single[2]
    assert m["loss"] != ref_m["loss"]  # bf16 matmuls did run
    assert abs(m["loss"] - ref_m["loss"]) < 0.02 * abs(ref_m["loss"])  # the same loss to ~1 %
    assert {x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)} == {
        jnp.dtype(jnp.float32)}


def test_non_finite_update_after_a_finite_gradient_is_skipped(initial, single):
    # An absurd but finite Adam first moment: loss and gradient stay finite, the bias-corrected moment
    # (mu / (1 - b1)) overflows to inf and so does the update. Nothing of it may reach the state.
    c0, graphdef, abstract, pure = initial
    mesh, shardings, step, _ = single[0]
    bad = jax.tree_util.tree_map_with_path(
        lambda p, x: np.full_like(x, 3e38) if "mu" in [str(getattr(k, "key", "")) for k in p] else x, pure)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(bad) if np.issubdtype(x.dtype, np.floating))
    state = train._fill(abstract, jax.device_put(bad, nnx.to_pure_dict(shardings)))
    state, m = step(state, parallel.global_batch(make_batch(0), mesh))
    m = jax.device_get(m)
    assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"]) and m["finite"] == 0
    got = jax.device_get(nnx.to_pure_dict(state))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(bad), strict=True):
        np.testing.assert_array_equal(a, b)  # the update was not applied
