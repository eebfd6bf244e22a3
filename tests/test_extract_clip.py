"""CLIP ViT (eao_jax.extract.clip) against the reference implementations, without torch.

Fixtures in tests/data/extract/ were made with torch 2.13 on CPU by openai/CLIP @ d05afc4
(`clip/model.py`, `clip/simple_tokenizer.py`) and ninatu/everything_at_once @ 4daeab6
(`everything_at_once/trainer/clip_utils.py::_apply_clip_text_model`, run as is with `clip.tokenize`
answering the stored ids):
  clip_small.pth / .npz: a reduced CLIP(embed 64, 32 px images in 8 px patches, vision width 128 x 2
    layers, text width 128 x 2 layers, context 24, vocabulary 300; 2 heads each, width // 64 as
    `build_model` infers), seeded random weights with random LayerNorm affine and attention biases,
    then `convert_weights` (fp16 linear / conv / attention / projections, as OpenAI's release; the
    outputs come from the same values in float32). Frames 32x41 uint8, centre-cropped and normalised
    as CLIP's preprocessing (torchvision CenterCrop + Normalize); EAO's per-token text outputs
    (20 positions, start token dropped) and mask; CLIP's end-of-text features.
  clip_tiny_jit.pt / clip_tiny.pth: one tiny CLIP saved by `torch.jit.trace` + `torch.jit.save` (all
    fp16, as OpenAI's TorchScript release; its code/ folder, the traced program, then removed: the
    reader never opens it) and as a plain state dict.
  clip_bpe_small.txt.gz / clip_tokens.json: the first 2000 merges of CLIP's BPE vocabulary and the
    reference tokenizer's ids (`clip.tokenize(..., truncate=True)`) for awkward strings (HTML
    entities, mojibake, contractions, CJK, emoji, special tokens, a text past the 77-token context).
"""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eao_jax.extract import clip, weights
from eao_jax.extract.runner import Runner


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def ref(data_dir):
    return dict(np.load(data_dir / "extract" / "clip_small.npz"))


@pytest.fixture(scope="module")
def state(data_dir):
    return weights.load_state_dict(data_dir / "extract" / "clip_small.pth")


@pytest.fixture(scope="module")
def extractor(data_dir):
    return clip.Extractor(clip.load(data_dir / "extract" / "clip_small.pth"), batch_size=8)


def test_image_features_equal_reference(extractor, ref):
    out = extractor.image(ref["frames"])  # 32x41 frames: centre crop and normalisation here
    assert out.shape == ref["image_features"].shape
    assert np.abs(_unit(out) - _unit(ref["image_features"])).max() <= 1e-4


def test_text_tokens_equal_eao(extractor, ref):
    """Per-token outputs after text_projection, start token dropped, 20 positions, mask before the
    end-of-text token: as EAO's CLIP variant (rows: short, empty, past the context, ...)."""
    ids = ref["text_ids"]  # includes ids > 256, which bfloat16 could not hold: ids must stay integers
    outputs = extractor.text_outputs(ids)
    tokens, mask = clip.text_tokens(outputs, ids)
    assert tokens.shape == ref["text_tokens"].shape
    np.testing.assert_array_equal(mask, ref["text_mask"])
    assert np.abs(_unit(tokens) - _unit(ref["text_tokens"])).max() <= 1e-4
    assert np.abs(_unit(clip.text_features(outputs, ids)) - _unit(ref["text_eot_features"])).max() <= 1e-4


def test_bfloat16_close(data_dir, ref):
    ex = clip.Extractor(clip.load(data_dir / "extract" / "clip_small.pth"), batch_size=8,
                        compute_dtype=jnp.bfloat16)
    image = ex.image(ref["frames"])
    assert np.sum(_unit(image) * _unit(ref["image_features"]), -1).min() > 0.99
    tokens, mask = clip.text_tokens(ex.text_outputs(ref["text_ids"]), ref["text_ids"])
    np.testing.assert_array_equal(mask, ref["text_mask"])
    cos = np.sum(_unit(tokens) * _unit(ref["text_tokens"]), -1)
    assert cos.min() > 0.99


def test_layernorm_affine_matters(extractor, state, ref):
    """LayerNorm left at weight 1 / bias 0 changes the features well past the tolerance (the fixture's
    random affine is checked), run by the same compiled program."""
    plain = {k: (np.ones_like(v) if "ln_" in k and k.endswith("weight") else
                 np.zeros_like(v) if "ln_" in k and k.endswith("bias") else v) for k, v in state.items()}
    runner = extractor.image_runner
    try:
        runner.load(clip.from_state_dict(plain, "plain").visual)
        out = runner(clip.centre_crop(ref["frames"], 32))
    finally:
        runner.load(clip.from_state_dict(state, "fixture").visual)
    assert np.abs(_unit(out) - _unit(ref["image_features"])).max() > 0.05


def test_config_inferred(state):
    cfg = clip.infer_config(weights.StateDict(state, "x"))
    assert cfg == clip.CLIPConfig(embed_dim=64, image_resolution=32, patch_size=8, vision_width=128, vision_layers=2,
                                  context_length=24, vocab_size=300, text_width=128, text_layers=2)


def test_torchscript_archive_reads_as_its_state_dict(data_dir):
    """OpenAI's release format: a torch.jit.save archive (fp16, with input_resolution / context_length /
    vocab_size entries) gives the same weights as the plain state dict of the same model."""
    a = clip.load(data_dir / "extract" / "clip_tiny_jit.pt")
    b = clip.load(data_dir / "extract" / "clip_tiny.pth")
    assert a.cfg == b.cfg and a.cfg.vision_width == 64
    flat_b = dict(nnx.to_flat_state(nnx.state(b)))
    for path, var in nnx.to_flat_state(nnx.state(a)):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(flat_b[path].get_value()), str(path))


def test_torchscript_archive_with_code_objects_refused(tmp_path):
    """An archive whose pickle names anything but tensors and module objects is refused in one line
    saying to convert it first; what it names is never called."""
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("model/data.pkl", b"\x80\x02cbuiltins\nprint\nq\x00X\x03\x00\x00\x00ranq\x01\x85q\x02Rq\x03.")
        zf.writestr("model/code/__torch__/model.py", "def forward(self): ...")
    with pytest.raises(weights.WeightsError, match=r"model.pt: this TorchScript archive .* refusing to load "
                       r"builtins.print.*convert it to a state dict first"):
        clip.load(path)


def _edited(state, edit):
    bad = dict(state)
    edit(bad)
    return bad


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("visual.transformer.resblocks.1.attn.in_proj_bias"),
     "missing entry 'visual.transformer.resblocks.1.attn.in_proj_bias'"),
    (lambda s: s.pop("transformer.resblocks.0.mlp.c_fc.weight"),
     "missing entry 'transformer.resblocks.0.mlp.c_fc.weight'"),
    (lambda s: s.pop("ln_final.weight"), "missing entry 'ln_final.weight'"),
    (lambda s: s.update({"visual.head.weight": np.zeros(3, np.float32)}), "unexpected entries visual.head.weight"),
    (lambda s: s.update({"visual.transformer.resblocks.3.ln_1.weight": np.ones(128, np.float32)}),
     "missing entry 'visual.transformer.resblocks.2."),
    (lambda s: s.update({"transformer.resblocks.1.attn.out_proj.weight": np.zeros((128, 64), np.float32)}),
     r"transformer.resblocks.1.attn.out_proj.weight has shape \(128, 64\), expected \(128, 128\)"),
    (lambda s: s.update({"visual.class_embedding": np.zeros(64, np.float32)}),
     r"visual.class_embedding has shape \(64,\), expected \(128,\)"),
    (lambda s: s.update({"visual.layer1.0.conv1.weight": np.zeros((64, 64, 1, 1), np.float32)}),
     "a ResNet CLIP"),
    (lambda s: s.update({"visual.conv1.weight": np.zeros((32, 3, 8, 8), np.float32)}),
     "vision_width=32 gives no attention head"),
])
def test_converter_names_bad_keys(state, edit, message):
    with pytest.raises(weights.WeightsError, match="^ckpt.pth: " + message):
        clip.from_state_dict(_edited(state, edit), "ckpt.pth")


def test_tokenizer_equals_reference(data_dir):
    expected = json.loads((data_dir / "extract" / "clip_tokens.json").read_text())
    tok = clip.Tokenizer(data_dir / "extract" / "clip_bpe_small.txt.gz")
    assert tok.vocab_size == expected["vocab_size"] and tok.eot == tok.vocab_size - 1
    np.testing.assert_array_equal(tok.tokenize(expected["strings"]), np.array(expected["ids"]))


def test_default_vocabulary_from_open_clip_wheel(tmp_path, monkeypatch, data_dir):
    """The vocabulary is found in an installed open_clip_torch by its file list (never imported);
    without it the error says how to get it."""
    (tmp_path / "open_clip").mkdir()
    vocab = (data_dir / "extract" / "clip_bpe_small.txt.gz").read_bytes()
    (tmp_path / "open_clip" / clip.VOCAB_FILE).write_bytes(vocab)

    class Dist:
        def locate_file(self, name):
            return tmp_path / name

    monkeypatch.setattr(clip.importlib.metadata, "distribution", lambda name: Dist())
    assert clip.default_vocab_path() == str(tmp_path / "open_clip" / clip.VOCAB_FILE)

    def missing(name):
        raise clip.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(clip.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps open_clip_torch"):
        clip.Tokenizer()


def test_tokenizer_must_match_the_checkpoint(state, data_dir):
    """The small vocabulary (2514 tokens) against the fixture's 300 embeddings: refused, not clamped."""
    small = clip.Tokenizer(data_dir / "extract" / "clip_bpe_small.txt.gz")
    ex = clip.Extractor(clip.from_state_dict(state, "x"), small)
    with pytest.raises(ValueError, match="the tokenizer has 2514 tokens, the checkpoint 300 token embeddings"):
        ex.text(["a photo"])


def test_centre_crop():
    frames = np.arange(5 * 8, dtype=np.uint8).reshape(1, 5, 8, 1) * np.ones((1, 1, 1, 3), np.uint8)
    # torchvision's offsets: int(round((8 - 5) / 2)) = 2 (round half to even), int(round(0 / 2)) = 0
    np.testing.assert_array_equal(clip.centre_crop(frames, 5)[0, :, :, 0], frames[0, :, 2:7, 0])
    with pytest.raises(ValueError, match="short side is 4 .* got 5x8"):
        clip.centre_crop(frames, 4)


def _vit_flops(cfg):
    """Matmul FLOPs per image of the ViT: patch embedding, blocks (qkv, out, MLP 4x, attention), proj."""
    n = (cfg.image_resolution // cfg.patch_size) ** 2
    length, w = n + 1, cfg.vision_width
    blocks = cfg.vision_layers * (24 * length * w * w + 4 * length * length * w)
    return 2 * n * 3 * cfg.patch_size ** 2 * w + blocks + 2 * w * cfg.embed_dim


def test_benchmark_flops(state):
    """`benchmark` on the reduced configuration: XLA's FLOPs per image agree with the matmul count
    (element-wise work adds a few percent)."""
    cfg = clip.infer_config(weights.StateDict(state, "x"))
    out = clip.benchmark(batch_size=8, repeats=1, cfg=cfg)
    assert out["image"]["rows_per_s"] > 0 and out["text"]["rows_per_s"] > 0
    assert 1.0 <= out["image"]["flops_per_row"] / _vit_flops(cfg) < 1.15


def test_runner_load_refuses_another_architecture(state):
    model = clip.from_state_dict(state, "x")
    runner = Runner(model.visual, lambda m, x: m(x), 8)
    with pytest.raises(ValueError, match="differs from the one this runner was built for"):
        runner.load(model.textual)
    assert runner(np.zeros((1, 32, 32, 3), np.uint8)).shape == (1, 64)
    assert len(jax.devices()) == 8 and runner.batch_size == 8  # one row per fake device


def test_script_module_state_keeps_tensors_and_submodules():
    """A TorchScript module object is read as its tensors and submodules; flags and numbers are dropped."""
    from eao_jax import torch_pickle

    obj = torch_pickle.ScriptModuleState()
    obj.__setstate__({"w": np.zeros(2), "training": True, "n": 3, "sub": torch_pickle.ScriptModuleState()})
    assert set(obj) == {"w", "sub"}


def test_torchscript_objects_only_when_asked(data_dir):
    """Plain checkpoint loading still refuses TorchScript module classes; CLIP's loader opts in."""
    from eao_jax import torch_pickle

    with pytest.raises(torch_pickle.UnsafePickleError, match=r"refusing to load __torch__\.model\.CLIP"):
        weights.load_state_dict(data_dir / "extract" / "clip_tiny_jit.pt")
