"""S3D (eao_jax.extract.s3d) against the reference implementation, without torch.

Fixtures in tests/data/extract/ (s3d_small.pth, s3d_small_dict.npy, s3d_small.npz) were made by
running antoine77340/S3D_HowTo100M @ b8cd0bb (`s3dg.py`) with torch 2.13 on CPU, eval mode, seeded
random weights. The reference's channel counts are literals in `S3D.__init__`: the generator divided
each of them by 8 in its copy of the file (nothing else changed), which keeps the state dict under
1 MB; our converter reads every width from the state dict. BatchNorm running statistics are the
batch statistics of the input, perturbed (mean +- 0.3 std, variance x U(0.5, 2)), with random affine
weights, so a converter that ignores them fails (`test_batchnorm_statistics_matter`). Input: 2 clips
of 12 uint8 frames at 72x88 (odd pooled sizes: the ceil-mode pools' last windows run past the input).
The text branch (64-row embedding, 24-d words, 48 hidden) with a 50-word dictionary; the reference's
own word ids for each sentence are stored too.
"""

import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eao_jax.extract import s3d, weights


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def ref(data_dir):
    return dict(np.load(data_dir / "extract" / "s3d_small.npz"))


@pytest.fixture(scope="module")
def state(data_dir):
    return weights.load_state_dict(data_dir / "extract" / "s3d_small.pth")


@pytest.fixture(scope="module")
def vocab(data_dir):
    return s3d.load_word_dict(data_dir / "extract" / "s3d_small_dict.npy")


@pytest.fixture(scope="module")
def extractor(data_dir, vocab):
    # Two devices hold the fixture's two clips (one each) without padding.
    return s3d.Extractor(s3d.load(data_dir / "extract" / "s3d_small.pth"), vocab, batch_size=2,
                         devices=jax.devices()[:2])


def test_video_equals_reference(extractor, ref):
    out = extractor.video(ref["video"])  # uint8: scaled to [0, 1] inside, as the reference's input
    for key in ("mixed_5c", "video_embedding"):
        assert out[key].shape == ref[key].shape
        assert np.abs(_unit(out[key]) - _unit(ref[key])).max() <= 1e-4, key


def test_text_equals_reference(extractor, vocab, ref):
    sentences = [str(s) for s in ref["sentences"]]
    np.testing.assert_array_equal(s3d.word_ids(sentences, vocab), ref["text_ids"])
    out = extractor.text(sentences)
    assert np.abs(_unit(out) - _unit(ref["text_embedding"])).max() <= 1e-4


def test_batchnorm_statistics_matter(extractor, state, ref):
    """The same weights with BatchNorm left at its defaults (what a converter that drops the running
    statistics and affine weights would give) are far from the reference: the parity test can fail.
    (Run by the same compiled program, `Runner.load`.)"""
    plain = dict(state)
    for key, value in state.items():
        if key.endswith(("running_mean", "bn1.bias", "bn2.bias")):
            plain[key] = np.zeros_like(value)
        elif key.endswith(("running_var", "bn1.weight", "bn2.weight")):
            plain[key] = np.ones_like(value)
    runner = extractor.video_runner
    try:
        runner.load(s3d.from_state_dict(plain, "plain").video_net)
        out = runner(ref["video"])[:, :ref["mixed_5c"].shape[1]]
    finally:
        runner.load(s3d.from_state_dict(state, "fixture").video_net)
    assert np.abs(_unit(out) - _unit(ref["mixed_5c"])).max() > 0.05


def test_word_past_the_embedding_refused(extractor, vocab):
    """A dictionary longer than the checkpoint's embedding: the word past it is named (the reference
    raises an index error on it; JAX would silently clamp the id)."""
    extractor.vocab = {**vocab, "zebra": 64}
    try:
        with pytest.raises(ValueError, match="word 'zebra' has id 64 in the dictionary, past the checkpoint's 64"):
            extractor.text(["the zebra"])
    finally:
        extractor.vocab = vocab


def test_bfloat16_close(data_dir, ref):
    ex = s3d.Extractor(s3d.load(data_dir / "extract" / "s3d_small.pth"), batch_size=2, compute_dtype=jnp.bfloat16,
                       devices=jax.devices()[:2])
    out = ex.video(ref["video"])["mixed_5c"]
    cos = np.sum(_unit(out) * _unit(ref["mixed_5c"]), axis=-1)
    # Random weights through 20 BatchNorm'd layers amplify bfloat16 rounding (0.97 measured).
    assert cos.min() > 0.95


def test_config_inferred(state):
    cfg = s3d.infer_config(weights.StateDict(state, "x"))
    assert (cfg.stem, cfg.conv_2b, cfg.conv_2c, cfg.embed_dim) == (8, 8, 24, 32)
    assert cfg.blocks[0] == (8, 12, 16, 2, 4, 4) and cfg.mixed_5c_dim == 128
    assert (cfg.vocab_size, cfg.word_dim, cfg.text_hidden) == (64, 24, 48)


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("mixed_4c.conv_b0.bn1.running_var"), "missing entry 'mixed_4c.conv_b0.bn1.running_var'"),
    (lambda s: s.pop("text_module.fc2.bias"), "missing entry 'text_module.fc2.bias'"),
    (lambda s: s.update({"mixed_6a.weight": np.zeros(3, np.float32)}), "unexpected entries mixed_6a.weight"),
    (lambda s: s.update({"mixed_5b.conv_b2_b.conv2.weight": np.zeros((16, 16, 1, 3, 3), np.float32)}),
     "mixed_5b.conv_b2_b.conv2.weight has shape (16, 16, 1, 3, 3), expected (16, 16, 3, 1, 1)"),
    (lambda s: s.update({"gating.fc.bias": np.zeros(7, np.float32)}), "gating.fc.bias has shape (7,), expected (24,)"),
    (lambda s: s.update({"conv1.conv1.weight": np.zeros((8, 3, 3, 7, 7), np.float32)}),
     "conv1.conv1.weight has shape (8, 3, 3, 7, 7), expected (C, 24, 2, 4, 4)"),
])
def test_converter_names_bad_keys(state, edit, message):
    bad = dict(state)
    edit(bad)
    with pytest.raises(weights.WeightsError, match="^ckpt.pth: " + message.replace("(", r"\(").replace(")", r"\)")):
        s3d.from_state_dict(bad, "ckpt.pth")


def test_word_dict_object_array(tmp_path, vocab, data_dir):
    """An object array of words (np.save's pickle) reads the same as the string array, through the
    restricted unpickler; the last of a repeated word wins, as in the reference's dict."""
    words = list(np.load(data_dir / "extract" / "s3d_small_dict.npy"))  # numpy str scalars
    for entries in (words, [str(w) for w in words]):
        path = tmp_path / "dict.npy"
        np.save(path, np.array(entries + ["the"], dtype=object), allow_pickle=True)
        got = s3d.load_word_dict(path)
        assert got == {**vocab, "the": len(words) + 1}


def test_word_dict_refuses_code(tmp_path):
    """A .npy whose object pickle names anything but numpy's array reconstruction is refused by name,
    and nothing it names is called."""
    class Boom:
        def __reduce__(self):
            return (print, ("ran",))

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1,)})
    pickle.dump(Boom(), buf, protocol=3)
    path = tmp_path / "evil.npy"
    path.write_bytes(buf.getvalue())
    with pytest.raises(ValueError, match=r"evil.npy: refusing to load builtins.print"):
        s3d.load_word_dict(path)
    np.save(tmp_path / "cut.npy", np.array(["a", "b", "c"]))
    (tmp_path / "cut.npy").write_bytes((tmp_path / "cut.npy").read_bytes()[:-4])
    with pytest.raises(ValueError, match=r"cut.npy: truncated: its header announces 3 words of <U1"):
        s3d.load_word_dict(tmp_path / "cut.npy")
    np.save(tmp_path / "floats.npy", np.zeros(3))
    with pytest.raises(ValueError, match=r"floats.npy: expected an array of words, got dtype float64"):
        s3d.load_word_dict(tmp_path / "floats.npy")


def test_word_ids_rules(vocab):
    ids = s3d.word_ids(["THE tomato's", "unknown", "cut " * 20], vocab)
    assert ids[0].tolist()[:2] == [vocab["the"], 0]  # "tomato's" is one word (apostrophes join), not in vocab
    assert not ids[1].any()
    assert ids[2].tolist() == [vocab["cut"]] * 16
    with pytest.raises(TypeError, match="sentence 0 is a int"):
        s3d.word_ids([3], vocab)


def test_windows():
    frames = np.arange(40)[:, None, None, None] * np.ones((1, 2, 2, 3), np.uint8)
    clips = s3d.windows(frames, window=32, stride=16)
    assert clips.shape == (3, 32, 2, 2, 3)  # one clip per started second at 16 fps
    assert clips[1, :, 0, 0, 0].tolist() == list(range(16, 40)) + [39] * 8
    assert s3d.windows(frames[:1]).shape == (1, 32, 2, 2, 3)


def test_space_to_depth_order():
    x = np.arange(2 * 4 * 4 * 3, dtype=np.float32).reshape(1, 2, 4, 4, 3)
    y = np.asarray(s3d.space_to_depth(jnp.asarray(x)))
    # channel index = ((dt * 2 + dh) * 2 + dw) * 3 + c, as the reference's permute(0, 3, 5, 7, 1, ...)
    assert y.shape == (1, 1, 2, 2, 24)
    assert y[0, 0, 1, 0, (1 * 4 + 0 * 2 + 1) * 3 + 2] == x[0, 1, 2, 1, 2]


def test_tf_same_max_pool_ceil_mode():
    x = jnp.asarray(np.arange(5, dtype=np.float32).reshape(1, 1, 1, 5, 1))
    # kernel 2, stride 2, no zero pad: windows [0, 1], [2, 3], [4] (ceil mode)
    assert np.asarray(s3d.tf_same_max_pool(x, (1, 1, 2), (1, 1, 2)))[0, 0, 0, :, 0].tolist() == [1, 3, 4]
    # kernel 3, stride 2: one zero padded after (not -inf: the reference pads with zeros), windows
    # [0..2], [2..4], then [4, zero] running past the end
    y = -x
    assert np.asarray(s3d.tf_same_max_pool(y, (1, 1, 3), (1, 1, 2)))[0, 0, 0, :, 0].tolist() == [0, -2, 0]
