"""Model behaviour: parity with the authors' PyTorch outputs and the invariances the design relies on.
Converting and embedding need no torch: it is made unimportable for this module."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import random_batch, small_config

from eao_jax import checkpoint, convert, embed
from eao_jax.loss import combinatorial_loss
from eao_jax.model.eao import EverythingAtOnce, l2_normalize

pytestmark = pytest.mark.usefixtures("without_torch")


def test_torch_is_not_importable_here():
    with pytest.raises(ImportError):
        import torch  # noqa: F401



@pytest.fixture(scope="module")
def converted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "tva_small"
    convert.convert(str(data_dir / "tva_small.pth"), str(out))
    return out


@pytest.fixture(scope="module")
def reference(data_dir):
    with np.load(data_dir / "tva_small.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def model(converted):
    return checkpoint.load_model(converted)[0]


def test_inferred_config_matches_reference(converted, data_dir):
    ref = json.loads((data_dir / "tva_small.json").read_text())
    cfg = checkpoint.restore_config(converted).model
    assert (cfg.depth, cfg.embed_dim, cfg.num_heads, cfg.projection_dim) == (
        ref["depth"], ref["embed_dim"], ref["heads"], ref["proj_dim"])
    assert (cfg.video_dim, cfg.text_dim) == (ref["vdim"], ref["tdim"])
    assert tuple(cfg.davenet.widths) == tuple(ref["widths"])
    assert tuple(cfg.davenet.blocks) == (2, 2, 1, 1, 1, 1)
    assert cfg.token_projection == cfg.projection == "gated" and cfg.individual_projections
    assert not cfg.use_cls_token and not cfg.use_positional_emb
    assert checkpoint.latest_step(converted) == 78000


def test_embeddings_match_pytorch(model, reference):
    inputs = {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith("input/")}
    out = embed.embed(model, inputs)
    outputs = [k.split("/", 1)[1] for k in reference if k.startswith("output/")]
    assert len(outputs) == 12
    for name in outputs:
        ref = reference[f"output/{name}"]
        if name.endswith("_mask"):
            np.testing.assert_array_equal(out[name], ref.astype(bool), err_msg=name)
        else:
            np.testing.assert_allclose(out[name], np.asarray(l2_normalize(jnp.asarray(ref))), atol=1e-4,
                                       err_msg=name)


def test_loss_matches_pytorch(model, reference):
    from eao_jax.defaults import loss_config
    cfg = loss_config()
    inputs = {k.split("/", 1)[1]: jnp.asarray(v) for k, v in reference.items() if k.startswith("input/")}
    out = nnx.jit(lambda m, b: m(b, cross_modal=True))(model, inputs)
    total, info = combinatorial_loss(out, cfg)
    for term in ("tv", "ta", "va", "t_va", "v_ta", "a_tv"):
        np.testing.assert_allclose(float(info[term]), reference[f"loss/{term}"], rtol=1e-4, err_msg=term)
    np.testing.assert_allclose(float(total), reference["loss/total"], rtol=1e-4)


def test_embed_command_line(converted, data_dir, tmp_path, reference):
    out = tmp_path / "out.npz"
    # Relative paths, as a user types them.
    subprocess.run([sys.executable, "-m", "eao_jax.embed", f"--checkpoint={os.path.relpath(converted, tmp_path)}",
                    f"--input={os.path.relpath(data_dir / 'tva_small.npz', tmp_path)}", "--output=out.npz",
                    "--batch_size=4"], check=True, cwd=tmp_path)
    with np.load(out) as f:
        got = {k: f[k] for k in f.files}
    np.testing.assert_allclose(got["va_embed"], np.asarray(l2_normalize(jnp.asarray(reference["output/va_embed"]))),
                               atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got["text_embed"], axis=-1), 1.0, atol=1e-5)


def test_embed_subset_of_modalities(model, reference):
    """Only video + audio given: the outputs involving text are absent, the others unchanged."""
    inputs = {k.split("/", 1)[1]: v for k, v in reference.items()
              if k.startswith("input/") and "text" not in k}
    out = embed.embed(model, inputs)
    assert set(out) == {"video_embed", "audio_embed", "va_embed", "v+a_embed",
                        "video_nonempty_input_mask", "audio_nonempty_input_mask"}
    full = embed.embed(model, {k.split("/", 1)[1]: v for k, v in reference.items() if k.startswith("input/")})
    np.testing.assert_allclose(out["va_embed"], full["va_embed"], atol=1e-6)


@pytest.mark.parametrize("bad, message", [
    (lambda b: b.update(video=b["video"][..., :20]), "feature dimension 20"),
    (lambda b: b.update(text_mask=b["text_mask"][:, :3]), "text_mask"),
    (lambda b: b["video"].__setitem__((0, 0, 0), np.nan), "'video' contains NaN"),
    (lambda b: b.update(audio=b["audio"][:, :, :130], audio_mask=b["audio_mask"][:, :130]), "130 STFT frames gives 3"),
    (lambda b: b.pop("video_mask"), "no 'video_mask'"),
])
def test_embed_rejects_bad_input(model, reference, bad, message):
    inputs = {k.split("/", 1)[1]: v.copy() for k, v in reference.items() if k.startswith("input/")}
    bad(inputs)
    with pytest.raises((ValueError, KeyError), match=message):
        embed.embed(model, inputs)


def _forward(model, batch, cross_modal=True, late_fusion=False):
    fn = nnx.jit(lambda m, b: m(b, cross_modal=cross_modal, late_fusion=late_fusion))
    return {k: np.asarray(v) for k, v in fn(model, {k: jnp.asarray(v) for k, v in batch.items()}).items()}


def test_padding_invariance(model):
    """Extra padded video / text tokens (mask 0) change nothing."""
    batch = random_batch(np.random.default_rng(0))
    ref = _forward(model, batch, cross_modal=True, late_fusion=True)
    padded = dict(batch)
    for m, extra in (("video", 5), ("text", 3)):
        x, mask = batch[m], batch[f"{m}_mask"]
        garbage = np.random.default_rng(1).normal(size=(x.shape[0], extra, x.shape[2])).astype(np.float32)
        padded[m] = np.concatenate([x, garbage], axis=1)  # padded content is ignored, not just zeros
        padded[f"{m}_mask"] = np.concatenate([mask, np.zeros((x.shape[0], extra), np.float32)], axis=1)
    got = _forward(model, padded, cross_modal=True, late_fusion=True)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5, err_msg=k)


def test_token_permutation_invariance(model):
    batch = random_batch(np.random.default_rng(2), empty=False)
    ref = _forward(model, batch, cross_modal=True)
    perm = np.random.default_rng(3).permutation(batch["video"].shape[1])
    shuffled = dict(batch, video=batch["video"][:, perm], video_mask=batch["video_mask"][:, perm])
    got = _forward(model, shuffled, cross_modal=True)
    for k in ref:
        np.testing.assert_allclose(got[k], ref[k], atol=2e-5, err_msg=k)


def test_empty_modality(model):
    """An item without text: flagged empty, its text input ignored, the masking token used."""
    batch = random_batch(np.random.default_rng(4), empty=False)
    batch["text_mask"][1] = 0
    out = _forward(model, batch, cross_modal=True)
    assert not out["text_nonempty_input_mask"][1] and out["text_nonempty_input_mask"][[0, 2, 3]].all()
    changed = dict(batch, text=batch["text"] + 5.0)
    out2 = _forward(model, changed, cross_modal=True)
    np.testing.assert_allclose(out2["text_embed"][1], out["text_embed"][1], atol=1e-6)
    assert np.abs(out2["text_embed"][0] - out["text_embed"][0]).max() > 1e-3
    # The empty text embeds as the masking token alone: the same for any two text-less items.
    batch["text_mask"][2] = 0
    out3 = _forward(model, batch, cross_modal=True)
    np.testing.assert_allclose(out3["text_embed"][1], out3["text_embed"][2], atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"use_cls_token": True, "individual_projections": False},
                                       {"depth": 2}, {"depth": 0}])
def test_three_passes_equal_six_passes(overrides):
    """Masked passes over [t|v|a] give exactly what separate passes on each combination give."""
    model = EverythingAtOnce(small_config(**overrides), rngs=nnx.Rngs(0))
    model.eval()
    batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(5)).items()}
    groups = [("text",), ("video",), ("audio",), ("text", "video"), ("text", "audio"), ("video", "audio")]
    assert len(model.default_passes(cross_modal=True)) == 3

    @nnx.jit
    def both(model, batch):
        tokens, masks, _ = model.embed_tokens(batch)
        three = model.run_passes(tokens, masks, model.default_passes(cross_modal=True))
        six = {g: model.run_passes({m: tokens[m] for m in g}, {m: masks[m] for m in g}, [(g,)])[g] for g in groups}
        return three, six

    three, six = both(model, batch)
    assert set(three) == set(groups)
    for group in groups:
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), three[group], six[group])


def test_text_video_only_model():
    model = EverythingAtOnce(small_config(modalities=("text", "video")), rngs=nnx.Rngs(0))
    assert model.davenet is None
    batch = random_batch(np.random.default_rng(6))
    out = _forward(model, {k: v for k, v in batch.items() if not k.startswith("audio")}, cross_modal=True)
    assert set(out) == {"text_embed", "video_embed", "tv_embed", "text_nonempty_input_mask",
                        "video_nonempty_input_mask"}


def test_input_dims_and_audio_downsampling():
    tva = EverythingAtOnce(small_config(), rngs=nnx.Rngs(0))
    assert tva.input_dims == {"video": 24, "text": 10, "audio": 40}
    assert tva.audio_downsampling == 64  # six DAVEnet stages halve the frames
    tv = EverythingAtOnce(small_config(modalities=("text", "video")), rngs=nnx.Rngs(0))
    assert tv.input_dims == {"video": 24, "text": 10}
    with pytest.raises(ValueError, match="has no audio"):
        tv.audio_downsampling  # noqa: B018


def test_audio_pooling_argument_equals_a_pooling_config_and_leaves_the_model_alone():
    batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(8), t=768).items()}
    plain = EverythingAtOnce(small_config(), rngs=nnx.Rngs(0))
    pooled = EverythingAtOnce(small_config(audio_pooling="max_pool", audio_pooling_tokens=3), rngs=nnx.Rngs(0))
    plain.eval()
    pooled.eval()
    want = pooled(batch, cross_modal=True)
    got = plain(batch, cross_modal=True, audio_pooling=("max_pool", 3))
    for k in ("audio_embed", "ta_embed", "va_embed"):
        np.testing.assert_allclose(got[k], want[k], atol=1e-6)
    assert np.abs(np.asarray(plain(batch)["audio_embed"]) - np.asarray(want["audio_embed"])).max() > 1e-3
    assert (plain.audio_pooling, plain.audio_pooling_tokens) == ("none", 12)


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 5, "not divisible by model.num_heads"),
    ("token_projection", "mlp", "model.token_projection"),
    ("modalities", ("video", "text"), "model.modalities"),
    ("fusion", "late", "model.fusion"),
    ("use_cls_token", True, "individual_projections"),
])
def test_bad_model_config(field, value, message):
    with pytest.raises(ValueError, match=message):
        EverythingAtOnce(small_config(**{field: value}), rngs=nnx.Rngs(0))


def test_batchnorm_train_mode_updates_running_stats():
    model = EverythingAtOnce(small_config(), rngs=nnx.Rngs(0))
    model.train()
    before = np.asarray(model.davenet.stem_bn.mean[...]).copy()
    batch = {k: jnp.asarray(v) for k, v in random_batch(np.random.default_rng(7)).items()}
    fwd = nnx.jit(lambda m, b: m(b, cross_modal=False)["audio_embed"])
    fwd(model, batch)
    after = np.asarray(model.davenet.stem_bn.mean[...])
    assert np.abs(after - before).max() > 0
    model.eval()
    o1, o2 = fwd(model, batch), fwd(model, batch)
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(np.asarray(model.davenet.stem_bn.mean[...]), after)


def test_embed_any_audio_length_matches_pytorch(model, data_dir):
    """200 STFT frames (not a multiple of 64): DAVEnet gives 200 -> 100 -> 50 -> 25 -> 13 -> 7 -> 4 tokens,
    the frame mask is max-pooled by ceil(200 / 4) = 50, as in the original.

    tests/data/tva_small_audio200.npz was made with the authors' code (github.com/ninatu/everything_at_once
    at 4daeab6, model/fusion_model.py + model/utils/*, run from a copy outside this repository, timm 0.4.12,
    torch 2.13.0 CPU, torchvision and librosa stubbed as for tests/data/variants) on tva_small.pth, its
    shrunk DAVEnet rebuilt as for that fixture (ResDavenet, blocks [2,2,1,1,1,1], widths from
    tva_small.json, audio_token_proj rebuilt for the last width; that rebuilt model reproduces
    tva_small.npz to 2e-7). Inputs: tva_small.npz's video and text; audio N(0, 1) rounded to 1/4 (seed
    200) of 200, 150, 0, 120, 37, 200 real frames, zero beyond, with those frame masks and
    audio_STFT_nframes; outputs `model(data, force_cross_modal=True)` in eval mode, not normalised."""
    with np.load(data_dir / "tva_small_audio200.npz") as f:
        ref = {k: f[k] for k in f.files}
    inputs = {k.split("/", 1)[1]: v for k, v in ref.items() if k.startswith("input/")}
    assert inputs["audio"].shape[-1] == inputs["audio_mask"].shape[-1] == 200
    out = embed.embed(model, inputs)
    names = [k.split("/", 1)[1] for k in ref if k.startswith("output/")]
    assert len(names) == 12
    for name in names:
        want = ref[f"output/{name}"]
        if name.endswith("_mask"):
            np.testing.assert_array_equal(out[name], want.astype(bool), err_msg=name)
        else:
            np.testing.assert_allclose(out[name], np.asarray(l2_normalize(jnp.asarray(want))), atol=1e-4,
                                       err_msg=name)
    # Lengths the original cannot run either (its pooled mask is shorter than the tokens) are refused
    # with the reason and a length that works.
    short = {k: (v[..., :130] if k.startswith("audio") and k != "audio_STFT_nframes" else v)
             for k, v in inputs.items()}
    with pytest.raises(ValueError, match=r"130 STFT frames gives 3 DAVEnet tokens but a mask of 2.*e\.g\., 132"):
        embed.embed(model, short)
