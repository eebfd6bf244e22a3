"""Converter + model parity with the authors' PyTorch code for every model configuration it supports.

Each fixture in tests/data/variants/ (see its README.md) is a tiny random model saved in the released
checkpoint layout (`<name>.pth`) and the original's eval-mode outputs on a batch with empty and
partial modalities (`<name>.npz`: `input/*`, `output/*` of forward(data, force_cross_modal=True),
`loss/*` of its CombinatorialLoss). `variants.json` records what each checkpoint was built with.
Here every checkpoint is converted, restored and run through `embed`; embeddings must match after
L2 normalisation within 1e-4, masks exactly. All without torch (it is made unimportable here): the
.pth files are read by eao_jax.torch_pickle.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from eao_jax import checkpoint, convert, embed
from eao_jax.defaults import loss_config
from eao_jax.loss import combinatorial_loss
from eao_jax.model.eao import l2_normalize

# Listed explicitly so that a lost fixture fails instead of silently dropping out of the run.
PARITY = ("minimal", "shared_proj", "cls_token", "pos_emb", "depth0", "depth2", "per_modality", "per_modality_pos",
          "tv_only", "davenet_v1", "pool_nearest", "pool_max_pool", "pos_max_pool")
TERMS = ("tv", "ta", "va", "t_va", "v_ta", "a_tv")
ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("without_torch")


@pytest.fixture(scope="module")
def variants_dir(data_dir):
    return data_dir / "variants"


@pytest.fixture(scope="module")
def meta(variants_dir):
    return json.loads((variants_dir / "variants.json").read_text())


class _Cache:
    """Converts each checkpoint and embeds its inputs once per module (each costs a compilation)."""

    def __init__(self, variants_dir, tmp_factory):
        self.dir, self.tmp = variants_dir, tmp_factory
        self.converted, self.outputs = {}, {}

    def checkpoint(self, name):
        if name not in self.converted:
            out = self.tmp.mktemp(name) / "ckpt"
            convert.convert(str(self.dir / f"{name}.pth"), str(out))
            self.converted[name] = out
        return self.converted[name]

    def reference(self, name):
        with np.load(self.dir / f"{name}.npz") as f:
            return {k: f[k] for k in f.files}

    def inputs(self, name):
        return {k.split("/", 1)[1]: v for k, v in self.reference(name).items() if k.startswith("input/")}

    def embed(self, name):
        if name not in self.outputs:
            model = checkpoint.load_model(self.checkpoint(name))[0]
            self.outputs[name] = embed.embed(model, self.inputs(name))
        return self.outputs[name]


@pytest.fixture(scope="module")
def cache(variants_dir, tmp_path_factory):
    return _Cache(variants_dir, tmp_path_factory)


def _assert_outputs_match(got, ref, names, label):
    for name in names:
        want = ref[f"output/{name}"]
        assert name in got, f"{label}: embed() gives no {name!r} (has {sorted(got)})"
        if name.endswith("_mask"):
            np.testing.assert_array_equal(got[name], want.astype(bool), err_msg=f"{label} {name}")
        else:
            np.testing.assert_allclose(got[name], np.asarray(l2_normalize(jnp.asarray(want))), atol=ATOL,
                                       err_msg=f"{label} {name}")


def _compared_outputs(meta, name):
    # The TV-only original still runs (and reports) its unused audio branch; our TV-only model has none.
    skip = {"audio_nonempty_input_mask"} if meta["variants"][name]["arch_type"].endswith("TV_Only") else set()
    return [o for o in meta["variants"][name]["outputs"] if o not in skip]


def test_fixture_manifest(meta, variants_dir, cache):
    assert set(meta["variants"]) == set(PARITY) | {"no_config"}
    for name in PARITY:
        assert (variants_dir / f"{name}.pth").is_file() and (variants_dir / f"{name}.npz").is_file(), name
        ref = cache.reference(name)
        # Every batch has an item without each modality and one with it, so masks and masking tokens matter.
        for m in ("text", "video", "audio"):
            mask = ref[f"output/{m}_nonempty_input_mask"]
            assert mask.any() and not mask.all(), (name, m)
    assert (variants_dir / "no_config.pth").is_file()


@pytest.mark.parametrize("name", PARITY)
def test_inferred_config(name, meta, cache):
    want = meta["variants"][name]["expected_config"]
    ckpt = cache.checkpoint(name)
    cfg = checkpoint.restore_config(ckpt).model
    assert checkpoint.latest_step(ckpt) == meta["variants"][name]["step"]
    fields = ["embed_dim", "depth", "num_heads", "projection_dim", "token_projection", "projection",
              "individual_projections", "fusion", "cross_modal", "use_cls_token", "use_positional_emb",
              "video_dim", "text_dim"]
    if want["depth"]:
        fields += ["mlp_ratio", "qkv_bias"]
    got = {f: cfg[f] for f in fields}
    assert got == {f: want[f] for f in fields}
    assert tuple(cfg.modalities) == tuple(want["modalities"])
    if "audio" in want["modalities"]:
        assert tuple(cfg.davenet.blocks) == tuple(want["davenet_blocks"])
        assert tuple(cfg.davenet.widths) == tuple(want["davenet_widths"])
        assert cfg.audio_pooling == want["audio_pooling"]
        if want["audio_pooling_tokens"] is not None:
            assert cfg.audio_pooling_tokens == want["audio_pooling_tokens"]
    if want["use_positional_emb"]:
        assert (cfg.max_video_tokens, cfg.max_text_tokens) == (meta["video_tokens"], meta["text_tokens"])


@pytest.mark.parametrize("name", PARITY)
def test_embeddings_match_pytorch(name, meta, cache):
    names = _compared_outputs(meta, name)
    assert any(n.endswith("_embed") for n in names)
    _assert_outputs_match(cache.embed(name), cache.reference(name), names, name)


@pytest.mark.parametrize("name", PARITY)
def test_converted_loss_config(name, meta, cache):
    """The converted config trains with the loss the checkpoint was trained with (the original's
    CombinatorialLoss: a weight absent from the config is 0)."""
    want = meta["variants"][name]["expected_loss"]
    loss = checkpoint.restore_config(cache.checkpoint(name)).loss
    assert {t: float(loss.weights[t]) for t in TERMS} == want["weights"]
    assert loss.name == want["name"]
    assert loss.temperature == pytest.approx(want["temperature"])


@pytest.mark.parametrize("name", PARITY)
def test_loss_matches_pytorch(name, meta, cache):
    """Our combinatorial loss on our embeddings, with the loss settings of the original run."""
    ref = cache.reference(name)
    want = meta["variants"][name]["expected_loss"]
    cfg = loss_config()
    cfg.name, cfg.temperature = want["name"], want["temperature"]
    cfg.weights.update(want["weights"])
    out = {k: jnp.asarray(v) for k, v in cache.embed(name).items()}
    total, info = combinatorial_loss(out, cfg)
    terms = [t for t in meta["variants"][name]["loss_terms"] if t != "Retrieval"]
    assert terms
    for term in terms:
        np.testing.assert_allclose(float(info[term]), ref[f"loss/{term}"], rtol=1e-4, err_msg=f"{name} {term}")
    np.testing.assert_allclose(float(total), ref["loss/total"], rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("name,others", [("pool_nearest", ("clip", "max_pool")),
                                         ("pool_max_pool", ("clip", "nearest"))])
def test_pooling_fixture_tells_strategies_apart(name, others, cache):
    """The long-audio fixtures discriminate: another strategy changes items whose real length exceeds
    the token budget, and only those (the others fall back to clipping in every strategy)."""
    ckpt = cache.checkpoint(name)
    config = checkpoint.restore_config(ckpt)
    inputs = cache.inputs(name)
    coef = 2 ** len(config.model.davenet.blocks)  # STFT frames per audio token
    long = np.trunc(inputs["audio_STFT_nframes"] / coef) > config.model.audio_pooling_tokens
    assert long.any() and (~long).any()
    want = np.asarray(l2_normalize(jnp.asarray(cache.reference(name)["output/audio_embed"])))
    for strategy in others:
        config.model.audio_pooling = strategy
        model = checkpoint.load_model(ckpt, config=config)[0]
        got = embed.embed(model, {k: v for k, v in inputs.items() if k.startswith("audio")})["audio_embed"]
        np.testing.assert_allclose(got[~long], want[~long], atol=ATOL, err_msg=strategy)
        assert np.abs(got[long] - want[long]).max() > 1e-3, strategy


def test_checkpoint_without_config_needs_num_heads(meta, cache, variants_dir, tmp_path):
    info = meta["variants"]["no_config"]
    src = str(variants_dir / "no_config.pth")
    with pytest.raises(convert.ConversionError, match="--num_heads"):
        convert.convert(src, str(tmp_path / "no_heads"))
    cfg = convert.convert(src, str(tmp_path / "ok"), num_heads=info["num_heads"])
    assert cfg.model.num_heads == info["num_heads"]
    model = checkpoint.load_model(tmp_path / "ok")[0]
    ref_name = info["same_weights_as"]
    got = embed.embed(model, cache.inputs(ref_name))
    _assert_outputs_match(got, cache.reference(ref_name), _compared_outputs(meta, ref_name), "no_config")
    # The head count changes the result, so it cannot be guessed.
    convert.convert(src, str(tmp_path / "wrong"), num_heads=2 * info["num_heads"])
    wrong = embed.embed(checkpoint.load_model(tmp_path / "wrong")[0], cache.inputs(ref_name))
    assert np.abs(wrong["tv_embed"] - got["tv_embed"]).max() > 1e-3
