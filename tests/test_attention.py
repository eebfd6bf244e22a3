"""Attention analysis: per-(query modality, key modality) attention shares of a tiny random model."""

import json

import numpy as np
import pytest
from flax import nnx
from model_utils import random_batch, small_config
from test_evaluate import SYN, random_model, synthetic_model_config

from eao_jax import attention
from eao_jax import checkpoint as ckpt
from eao_jax.defaults import loss_config
from tfds_builders.synthetic import ensure_prepared


@pytest.fixture(scope="module")
def model():
    return random_model(small_config(depth=2))


@pytest.fixture(scope="module")
def batch():
    return random_batch(np.random.default_rng(0))  # items 1-3 lack text / audio / video


def test_rows_sum_to_one_over_key_modalities(model, batch):
    res = attention.modality_attention(model, batch)
    assert res["labels"] == ["text", "video", "audio"]
    assert res["per_head"].shape == (2, 4, 3, 3) and res["mean"].shape == (2, 3, 3)
    np.testing.assert_allclose(res["per_head"].sum(-1), 1.0, atol=1e-5)
    np.testing.assert_allclose(res["mean"], res["per_head"].mean(1), atol=1e-7)
    assert (res["per_head"] >= 0).all()
    # Query tokens counted: valid tokens per modality, an empty modality's masking token included.
    for i, m in enumerate(res["labels"]):
        mask = batch[f"{m}_mask"] > 0
        if m == "audio":  # DAVEnet tokens (64 frames each) valid when any of their frames is
            mask = mask.reshape(mask.shape[0], -1, 64).any(-1)
        want = mask.sum() + (~mask.any(1)).sum()
        assert res["query_tokens"][i] == want


def test_matches_the_token_level_attention_maps(model, batch):
    """The shares are the per-token attention weights summed over each key modality and averaged over
    the valid queries; masked keys have exactly zero weight."""
    weights, masks = nnx.jit(lambda m, b: (lambda r: (r["weights"], r["masks"]))(m.attention_maps(b)))(model, batch)
    labels = ["text", "video", "audio"]
    spans, start = {}, 0  # the model concatenates [text | video | audio] tokens
    for m in labels:
        spans[m] = (start, start + masks[m].shape[1])
        start += masks[m].shape[1]
    res = attention.modality_attention(model, batch)
    for d, w in enumerate(weights):
        w = np.asarray(w)  # (B, H, L, L)
        key_valid = np.concatenate([np.asarray(masks[m]) for m in labels], 1)
        assert (w[:, :, :, ~key_valid.any(0)] == 0).all()
        for b in range(w.shape[0]):
            assert (w[b][:, :, ~key_valid[b]] == 0).all()
        for q, mq in enumerate(labels):
            sq, eq = spans[mq]
            qmask = np.asarray(masks[mq])  # (B, Nq)
            for k, mk in enumerate(labels):
                sk, ek = spans[mk]
                share = w[:, :, sq:eq, sk:ek].sum(-1)  # (B, H, Nq)
                want = (share * qmask[:, None]).sum((0, 2)) / qmask.sum()
                np.testing.assert_allclose(res["per_head"][d, :, q, k], want, atol=1e-5)


def test_padding_does_not_change_the_result(model, batch):
    noisy = {k: v.copy() for k, v in batch.items()}
    rng = np.random.default_rng(1)
    for m in ("video", "text"):  # garbage in the masked positions
        pad = noisy[f"{m}_mask"] == 0
        noisy[m][pad] = rng.normal(size=noisy[m][pad].shape) * 5
    a = attention.modality_attention(model, batch)
    b = attention.modality_attention(model, noisy)
    np.testing.assert_allclose(a["per_head"], b["per_head"], atol=1e-6)
    # Invalid items are left out of the average.
    c = attention.modality_attention(model, batch, valid=np.arange(6) < 3)
    d = attention.modality_attention(model, {k: v[:3] for k, v in batch.items()})
    np.testing.assert_allclose(c["per_head"], d["per_head"], atol=1e-6)


def test_separate_groups_do_not_attend_across(model, batch):
    res = attention.modality_attention(model, batch, "tv,a")
    per_head = res["per_head"]
    np.testing.assert_allclose(per_head[:, :, 2, 2], 1.0, atol=1e-6)  # audio attends only to audio
    np.testing.assert_allclose(per_head[:, :, :2, 2], 0.0, atol=1e-7)
    np.testing.assert_allclose(per_head.sum(-1), 1.0, atol=1e-5)
    assert res["groups"] == [["text", "video"], ["audio"]]


def test_cls_token_and_bad_requests(batch):
    cls = random_model(small_config(use_cls_token=True, individual_projections=False))
    res = attention.modality_attention(cls, batch)
    assert res["labels"] == ["cls", "text", "video", "audio"] and res["query_tokens"][0] == 6
    np.testing.assert_allclose(res["per_head"].sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ValueError, match="exactly once"):
        attention.parse_groups("tv", ("text", "video", "audio"))
    with pytest.raises(ValueError, match="depth=0"):
        attention.modality_attention(random_model(small_config(depth=0)), batch)
    with pytest.raises(ValueError, match="shared"):
        attention.modality_attention(random_model(small_config(fusion="per_modality")), batch)


def test_analyse_checkpoint_writes_png_and_json(tmp_path):
    data_dir = tmp_path / "data"
    ensure_prepared(data_dir, SYN)
    model = random_model(synthetic_model_config())
    config = ckpt.config_from_json({"model": synthetic_model_config().to_dict(), "loss": loss_config().to_dict()})
    ckpt.save_model(tmp_path / "ckpt", 5, ckpt.model_variables(model), config)
    doc = attention.analyse_checkpoint(str(tmp_path / "ckpt"), "synthetic", tmp_path / "out" / "att.png",
                                       data_dir=str(data_dir), num_items=4, strategy="clip", tfds_config=SYN)
    assert (tmp_path / "out" / "att.png").read_bytes()[:4] == b"\x89PNG"
    on_disk = json.loads((tmp_path / "out" / "att.json").read_text())
    assert on_disk == doc and doc["step"] == 5 and doc["num_items"] == 4
    assert doc["labels"] == ["text", "video", "audio"] and len(doc["blocks"]) == 1
    mean = np.asarray(doc["blocks"][0]["mean"])
    np.testing.assert_allclose(mean.sum(1), 1.0, atol=1e-4)
    assert np.asarray(doc["blocks"][0]["per_head"]).shape == (2, 3, 3)
