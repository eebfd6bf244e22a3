"""Every experiment config: the released settings it encodes, and one training step at toy size.

The step test shrinks widths, DAVEnet and batch (keeping each config's structure: modalities, depth,
fusion, CLS token, positional embeddings, projections, cross-modal passes, loss weights, BatchNorm
mode) and runs the trainer's jitted step on a one-device mesh with a random batch of the config's
shapes. Configs identical at toy size share one compiled step.
"""

import json
import pathlib
import runpy

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from eao_jax import parallel, train
from eao_jax.config_utils import validate_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
FILES = ["howto100m.py", "finetune_msrvtt.py", "finetune_youcook2.py"] + sorted(
    f"ablations/{p.name}" for p in (CONFIGS / "ablations").glob("*.py"))
W_MAIN = dict(tv=1.0, ta=0.1, va=0.1, t_va=0.1, v_ta=0.1, a_tv=0.1)
W_EQUAL = dict(tv=1.0, ta=1.0, va=1.0, t_va=1.0, v_ta=1.0, a_tv=1.0)
W_PAIRS = dict(tv=1.0, ta=0.1, va=0.1, t_va=0.0, v_ta=0.0, a_tv=0.0)

# The released yaml values each config must carry (the original's configs).
EXPECTED = {
    "howto100m.py": {"model.depth": 1, "model.num_heads": 64, "model.embed_dim": 4096, "loss.weights": W_MAIN,
                     "data.videos_per_batch": 224, "data.clips_per_video": 10, "data.text_audio_misaligned": True},
    "finetune_msrvtt.py": {"data.dataset": "msrvtt", "data.split": "train", "data.videos_per_batch": 128,
                           "data.clips_per_video": 1, "data.n_video_tokens": 48, "data.n_stft": 3072,
                           "train.lr": 5e-5, "train.epochs": 25, "train.lr_decay": 0.9,
                           "train.use_eval_mode_always": True, "loss.weights": W_EQUAL, "eval.tasks": ("msrvtt",)},
    "finetune_youcook2.py": {"data.dataset": "youcook2", "data.videos_per_batch": 256, "data.n_video_tokens": 72,
                             "data.n_stft": 4608, "train.lr": 1e-5, "train.epochs": 5, "train.lr_decay": 0.9,
                             "train.use_eval_mode_always": True, "loss.weights": W_EQUAL,
                             "eval.tasks": ("youcook2",)},
    "ablations/tv_only.py": {"model.modalities": ("text", "video")},
    "ablations/s3d.py": {"model.video_dim": 1024, "data.tfds_config": "s3d", "loss.weights": W_MAIN},
    "ablations/clip.py": {"model.video_dim": 512, "data.tfds_config": "clip"},
    "ablations/no_transformer.py": {"model.depth": 0, "model.cross_modal": False, "loss.weights": W_PAIRS},
    "ablations/transformer_per_modality.py": {"model.fusion": "per_modality", "loss.weights": W_PAIRS},
    "ablations/fusion_no_comb.py": {"model.depth": 1, "model.cross_modal": False, "loss.weights": W_PAIRS},
    "ablations/cls_token.py": {"model.use_cls_token": True, "model.individual_projections": False},
    "ablations/shared_projection.py": {"model.use_cls_token": False, "model.individual_projections": False},
    "ablations/depth2_64heads_4096_112x10.py": {"model.depth": 2, "model.num_heads": 64, "model.embed_dim": 4096,
                                                "data.videos_per_batch": 112, "data.clips_per_video": 10,
                                                "train.steps_per_epoch": 10411},
    "ablations/depth2_64heads_4096_224x5.py": {"model.depth": 2, "model.num_heads": 64,
                                               "data.videos_per_batch": 224, "data.clips_per_video": 5},
    "ablations/depth2_32heads_2048.py": {"model.depth": 2, "model.num_heads": 32, "model.embed_dim": 2048},
    "ablations/depth4_16heads_1024.py": {"model.depth": 4, "model.num_heads": 16, "model.embed_dim": 1024},
    "ablations/aligned_audio_equal_weights.py": {"data.text_audio_misaligned": False, "loss.weights": W_EQUAL},
    "ablations/disentangled_equal_weights.py": {"data.text_audio_misaligned": True, "loss.weights": W_EQUAL},
    "ablations/positional_embeddings.py": {"model.use_positional_emb": True, "model.max_video_tokens": 12,
                                           "model.max_text_tokens": 20, "model.max_audio_tokens": 12,
                                           "eval.strategy": "clips_average"},
}


def load(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    return runpy.run_path(str(CONFIGS / name))["get_config"](arg)


def get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def test_every_config_file_is_covered():
    assert sorted(FILES) == sorted(EXPECTED)
    readme = (CONFIGS / "README.md").read_text()
    for name in FILES:
        assert f"configs/{name}" in readme, f"configs/README.md does not list configs/{name}"


@pytest.mark.parametrize("name", FILES)
def test_config_carries_the_released_settings(name):
    config = load(name)
    base = load("howto100m.py")
    for dotted, want in EXPECTED[name].items():
        assert get(config, dotted) == want, (name, dotted)
    # Everything not named differs from the main model only where the experiment says so.
    assert config.model.projection_dim == 6144 and config.loss.temperature == base.loss.temperature
    validate_config(config)  # field names and values the trainer accepts (full size, no mesh)


def test_finetune_backbone_argument():
    clip = load("finetune_msrvtt.py", "clip")
    assert (clip.model.video_dim, clip.data.tfds_config, clip.data.videos_per_batch) == (512, "clip", 64)
    assert load("finetune_youcook2.py", "s3d").model.video_dim == 1024
    with pytest.raises(ValueError, match="resnet"):
        load("finetune_msrvtt.py", "vit")


def toy(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The config at toy size, structure kept (see the module docstring)."""
    c = ml_collections.ConfigDict(config.to_dict())
    m, d = c.model, c.data
    m.embed_dim, m.num_heads, m.projection_dim, m.video_dim, m.text_dim = 8, 2, 8, 6, 5
    m.davenet.blocks, m.davenet.widths = (1,), (2, 4)  # /2 in time
    d.n_video_tokens = min(d.n_video_tokens, 6)
    d.max_words = min(d.max_words, 5)
    d.n_stft = 2 * 6  # 6 audio tokens
    m.max_video_tokens, m.max_text_tokens, m.max_audio_tokens = 6, 5, 6
    d.videos_per_batch, d.clips_per_video = 2, 2
    if c.train.steps_per_epoch < 1:
        c.train.steps_per_epoch = 10
    c.mesh.data, c.mesh.model, c.mesh.fsdp = -1, 1, False
    return c


def random_batch_for_config(config: ml_collections.ConfigDict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A batch of the config's shapes (B = videos_per_batch x clips_per_video): random features, random
    lengths, item 0 without text (a clip without narration); masked positions zero."""
    m, d = config.model, config.data
    b = d.videos_per_batch * d.clips_per_video
    shapes = {"video": (d.n_video_tokens, m.video_dim), "text": (d.max_words, m.text_dim)}
    batch = {}
    for key, (n, dim) in shapes.items():
        mask = (np.arange(n)[None] < rng.integers(1, n + 1, (b, 1))).astype(np.float32)
        batch[key] = rng.normal(size=(b, n, dim)).astype(np.float32) * mask[..., None]
        batch[f"{key}_mask"] = mask
    batch["text_mask"][0] = 0.0
    batch["text"][0] = 0.0
    t = d.n_stft
    amask = (np.arange(t)[None] < rng.integers(t // 2, t + 1, (b, 1))).astype(np.float32)
    batch["audio"] = (rng.normal(size=(b, m.davenet.n_mels, t)) * amask[:, None]).astype(np.float32)
    batch["audio_mask"] = amask
    batch["audio_STFT_nframes"] = np.full((b,), -1, np.int32)
    return batch


def initial_state(config: ml_collections.ConfigDict) -> tuple[nnx.GraphDef, nnx.State]:
    """The trainer's state structure (`train.abstract_train_state`) filled the way a fresh init is:
    Adam moments, counters zero; weights drawn with numpy (N(0, 1/fan_in)), biases and BatchNorm
    means 0, LayerNorm scales and BatchNorm variances 1. (An eager init spends ~10 s compiling each
    initialiser; the trainer's own jitted init is tested with the trainer.)"""
    graphdef, abstract = train.abstract_train_state(config)
    rng = np.random.default_rng(int(config.seed))

    def fill(path, x):
        name = path[-1].key if hasattr(path[-1], "key") else ""
        if path[0].key == "opt" or name in ("bias", "mean"):
            return np.zeros(x.shape, x.dtype)
        if name in ("scale", "var"):
            return np.ones(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else max(x.shape[0], 1)
        return rng.normal(0.0, fan_in ** -0.5, x.shape).astype(x.dtype)

    state = jax.tree.map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(abstract)))
    return graphdef, state


_COMPILED: dict[str, tuple] = {}


def compiled_step(config: ml_collections.ConfigDict, batch: dict[str, jax.Array]):
    """(initial state, compiled step) of a toy config, shared by configs equal at toy size. The
    trainer's jitted step is compiled at XLA backend optimisation level 0 (2-3x faster to build on CPU;
    the numbers do not matter here)."""
    key = json.dumps({k: config[k].to_dict() for k in ("model", "loss")} | {
        "eval_mode": bool(config.train.get("use_eval_mode_always", False)),
        "shape": [config.data[k] for k in ("videos_per_batch", "clips_per_video", "n_video_tokens", "max_words",
                                           "n_stft")]}, sort_keys=True, default=str)
    if key not in _COMPILED:
        mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
        graphdef, state = initial_state(config)
        shardings = train.state_shardings(state, mesh, config)
        state = jax.device_put(state, shardings)
        step = train.make_train_step(config, mesh, graphdef, shardings, donate=False)
        compiled = step.lower(state, batch).compile(compiler_options={"xla_backend_optimization_level": 0})
        _COMPILED[key] = (state, compiled)
    return _COMPILED[key]


@pytest.mark.parametrize("name", FILES)
def test_one_train_step_at_toy_size(name):
    config = toy(load(name))
    validate_config(config, n_devices=1)
    mesh = parallel.make_mesh(config.mesh, devices=jax.devices()[:1])
    batch = parallel.global_batch(random_batch_for_config(config, np.random.default_rng(0)), mesh)
    state, step = compiled_step(config, batch)
    new_state, metrics = step(state, batch)
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and np.isfinite(metrics["loss"]) and metrics["loss"] > 0
    # Terms that exist: weight > 0 and both embeddings computed by this model.
    w = config.loss.weights
    has_audio = "audio" in config.model.modalities
    fused = config.model.cross_modal and config.model.fusion == "shared" and has_audio
    expect = {t for t in ("tv", "ta", "va") if w[t] > 0 and (has_audio or t == "tv")}
    expect |= {t for t in ("t_va", "v_ta", "a_tv") if w[t] > 0 and fused}
    assert {k for k in metrics if k in W_MAIN} == expect
    assert metrics["tv_count"] == 3  # item 0 has no text
    old, new = nnx.to_pure_dict(state), nnx.to_pure_dict(new_state)
    assert int(new["opt"]["step"]) == int(old["opt"]["step"]) + 1
    changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))), old["model"], new["model"])
    assert changed["token_proj"]["video"]["fc"]["kernel"]
    if has_audio:  # BatchNorm running statistics: updated in training, frozen when fine-tuning
        stats = [v for p, v in jax.tree_util.tree_leaves_with_path(changed["davenet"])
                 if p[-1].key in ("mean", "var")]
        frozen = bool(config.train.get("use_eval_mode_always", False))
        assert stats and all(s == (not frozen) for s in stats), (
            f"{name}: train.use_eval_mode_always={frozen} but the step "
            f"{'changed' if frozen else 'did not change'} the BatchNorm running statistics")
