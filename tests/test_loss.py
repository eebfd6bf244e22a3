"""The combinatorial loss: masking semantics against a boolean-indexing reference, and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import random_batch, small_config

from eao_jax.defaults import loss_config
from eao_jax.loss import combinatorial_loss, masked_contrastive, validate_loss_config
from eao_jax.model.eao import EverythingAtOnce


def reference_nce(x, y, temperature=0.05):
    """The original's NormSoftmax on the selected rows only (numpy, float64)."""
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-8)
    y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-8)
    s = x @ y.T / temperature

    def log_softmax(a):
        a = a - a.max(1, keepdims=True)
        return a - np.log(np.exp(a).sum(1, keepdims=True))

    return -np.diag(log_softmax(s)).mean() - np.diag(log_softmax(s.T)).mean()


def random_outputs(rng, n=12, p=16):
    out = {f"{k}_embed": rng.normal(size=(n, p)) for k in ("text", "video", "audio", "tv", "ta", "va")}
    out = {k: v.astype(np.float32) for k, v in out.items()}
    for m in ("text", "video", "audio"):
        out[f"{m}_nonempty_input_mask"] = rng.random(n) > 0.25
    return out


def test_terms_match_boolean_indexing():
    rng = np.random.default_rng(0)
    out = random_outputs(rng)
    cfg = loss_config()
    total, info = combinatorial_loss({k: jnp.asarray(v) for k, v in out.items()}, cfg)
    need = {"tv": ("text", "video"), "ta": ("text", "audio"), "va": ("video", "audio"),
            "t_va": ("text", "video", "audio"), "v_ta": ("text", "video", "audio"), "a_tv": ("text", "video", "audio")}
    pairs = {"tv": ("text", "video"), "ta": ("text", "audio"), "va": ("video", "audio"),
             "t_va": ("text", "va"), "v_ta": ("video", "ta"), "a_tv": ("audio", "tv")}
    num = den = 0.0
    for term, mods in need.items():
        keep = np.logical_and.reduce([out[f"{m}_nonempty_input_mask"] for m in mods])
        a, b = pairs[term]
        ref = reference_nce(out[f"{a}_embed"][keep].astype(np.float64), out[f"{b}_embed"][keep].astype(np.float64))
        np.testing.assert_allclose(float(info[term]), ref, rtol=1e-5, err_msg=term)
        assert int(info[f"{term}_count"]) == keep.sum()
        num += cfg.weights[term] * ref
        den += cfg.weights[term]
    np.testing.assert_allclose(float(total), num / den, rtol=1e-5)


def test_item_without_text_changes_no_text_term():
    rng = np.random.default_rng(1)
    out = random_outputs(rng)
    out["text_nonempty_input_mask"][:] = True
    out["text_nonempty_input_mask"][3] = False
    cfg = loss_config()
    _, info = combinatorial_loss({k: jnp.asarray(v) for k, v in out.items()}, cfg)
    changed = dict(out)
    for key in ("text_embed", "tv_embed", "ta_embed"):
        changed[key] = out[key].copy()
        changed[key][3] = rng.normal(size=out[key].shape[1]) * 100
    _, info2 = combinatorial_loss({k: jnp.asarray(v) for k, v in changed.items()}, cfg)
    for term in ("tv", "ta", "t_va", "v_ta", "a_tv", "va"):
        np.testing.assert_allclose(float(info2[term]), float(info[term]), rtol=1e-6, err_msg=term)


def test_absent_term_left_out_of_the_mean():
    rng = np.random.default_rng(2)
    out = random_outputs(rng)
    out["audio_nonempty_input_mask"][:] = False  # no audio anywhere: only tv remains
    total, info = combinatorial_loss({k: jnp.asarray(v) for k, v in out.items()}, loss_config())
    assert int(info["va_count"]) == 0 and float(info["va"]) == 0.0
    np.testing.assert_allclose(float(total), float(info["tv"]), rtol=1e-6)
    assert np.isfinite(float(total))


def test_mms_loss():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(6, 8)).astype(np.float32), rng.normal(size=(6, 8)).astype(np.float32)
    loss, _ = masked_contrastive(jnp.asarray(x), jnp.asarray(y), jnp.ones(6, bool), name="MMS", margin=0.001)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    yn = y / np.linalg.norm(y, axis=1, keepdims=True)
    s = xn @ yn.T - 0.001 * np.eye(6)
    ref = (-np.diag(s - np.log(np.exp(s).sum(1, keepdims=True))).mean()
           - np.diag(s.T - np.log(np.exp(s.T).sum(1, keepdims=True))).mean())
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)


def test_gradients_finite_with_empty_rows():
    model = EverythingAtOnce(small_config(), rngs=nnx.Rngs(0))
    model.train()
    batch = random_batch(np.random.default_rng(4))
    batch["audio_mask"][:] = 0  # no item has audio: every audio term is empty
    batch["audio"][:] = 0
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    cfg = loss_config()

    def loss_fn(m):
        return combinatorial_loss(m(batch, cross_modal=True), cfg)[0]

    loss, grads = nnx.jit(nnx.value_and_grad(loss_fn))(model)
    assert np.isfinite(float(loss))
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)


@pytest.mark.parametrize("field, value, message", [
    ("name", "Triplet", "loss.name"),
    ("temperature", 0.0, "loss.temperature"),
])
def test_bad_loss_config(field, value, message):
    cfg = loss_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=message):
        validate_loss_config(cfg)


def test_unknown_weight_rejected():
    cfg = loss_config()
    cfg.weights = dict(tv=1.0, tav=0.5)
    with pytest.raises(ValueError, match="loss.weights.tav"):
        validate_loss_config(cfg)
