"""Every experiment config: the values the replaced config files produced, the released settings it
encodes, the config argument, one training step at toy size, and one ablation trained end to end.

`tests/data/configs_before_variants.json` holds what the config files before the variant table
(configs/ablations/*.py, finetune_msrvtt.py, finetune_youcook2.py, ...) produced, dumped from those
files before they were removed: each `--config` string of today must give exactly those values.

The step test shrinks widths, DAVEnet and batch (keeping each config's structure: modalities, depth,
fusion, CLS token, positional embeddings, projections, cross-modal passes, loss weights, BatchNorm
mode) and runs the trainer's jitted step on a one-device mesh with a random batch of the config's
shapes. Configs identical at toy size share one compiled step.
"""

import json
import os
import pathlib
import runpy
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from eao_jax import evaluators, parallel, train
from eao_jax.config_utils import ConfigError, complete_config, resolve_epoch_steps, validate_config
from eao_jax.defaults import apply_overrides, parse_arg, reference_config
from eao_jax.metrics_log import read_metrics

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
BEFORE = json.loads((REPO / "tests" / "data" / "configs_before_variants.json").read_text())
HOWTO100M_TRAIN_VIDEOS = 1_166_089  # the released HowTo100M feature set: 5205 steps of 224 videos
HOWTO = runpy.run_path(str(CONFIGS / "howto100m.py"))

# Each replaced config file (and argument) -> the `--config` string (relative to configs/) replacing it.
REPLACED = {"howto100m.py": "howto100m.py"}
REPLACED.update({f"ablations/{name}.py": f"howto100m.py:variant={name}" for name in HOWTO["VARIANTS"]})
REPLACED.update({f"ablations/{b}.py": f"howto100m.py:backbone={b}" for b in ("s3d", "clip")})
for _ds in ("msrvtt", "youcook2"):
    for _b in ("", "s3d", "clip"):
        REPLACED[f"finetune_{_ds}.py" + (f":{_b}" if _b else "")] = (
            f"finetune.py:dataset={_ds}" + (f",backbone={_b}" if _b else ""))
REPLACED.update({k: k for k in ("bench_cpu.py", "bench_cpu.py:tiny", "demo.py", "demo.py:tiny")})
# Fields that changed on purpose: the benchmark no longer inherits the pre-training run's evaluation
# schedule and hard-coded epoch length (it never evaluates; the epoch length only shapes its schedule).
CHANGED = {"bench_cpu.py": {"train.steps_per_epoch": -1, "eval.every_steps": 0, "eval.tasks": []}}
CHANGED["bench_cpu.py:tiny"] = CHANGED["bench_cpu.py"]
NEW_FIELDS = {f"eval.at_once.{task}.{f}" for task in ("msrvtt", "youcook2", "synthetic")
              for f in ("n_video_tokens", "n_stft")} | {"eval.clip.n_video_tokens", "eval.clip.n_stft"}
# The evaluation section before named entries: one task list sharing one schedule and settings.
OLD_EVAL = ("eval.tasks", "eval.every_steps", "eval.batch_size", "eval.strategy", "eval.tfds_config",
            "eval.loc_embedding", "eval.decoder")


def old_eval_entries(want: dict) -> dict:
    """The named entries a replaced file's evaluation section meant (its fields popped from `want`)."""
    old = {k: want.pop(k) for k in OLD_EVAL}
    return {task: {"every_steps": old["eval.every_steps"], "batch_size": old["eval.batch_size"],
                   "strategy": old["eval.strategy"] or "at_once", "tfds_config": old["eval.tfds_config"]}
            for task in old["eval.tasks"]}

W_MAIN = dict(tv=1.0, ta=0.1, va=0.1, t_va=0.1, v_ta=0.1, a_tv=0.1)
W_EQUAL = dict(tv=1.0, ta=1.0, va=1.0, t_va=1.0, v_ta=1.0, a_tv=1.0)
W_PAIRS = dict(tv=1.0, ta=0.1, va=0.1, t_va=0.0, v_ta=0.0, a_tv=0.0)
EVAL_AT_END = dict(every_steps=0, batch_size=16, strategy="at_once", tfds_config=None)

# The released yaml values each experiment must carry (the original's configs).
EXPECTED = {
    "howto100m.py": {"model.depth": 1, "model.num_heads": 64, "model.embed_dim": 4096, "loss.weights": W_MAIN,
                     "data.videos_per_batch": 224, "data.clips_per_video": 10, "data.text_audio_misaligned": True},
    "finetune.py:dataset=msrvtt": {"data.dataset": "msrvtt", "data.split": "train", "data.videos_per_batch": 128,
                                   "data.clips_per_video": 1, "data.n_video_tokens": 48, "data.n_stft": 3072,
                                   "train.lr": 5e-5, "train.epochs": 25, "train.lr_decay": 0.9,
                                   "train.use_eval_mode_always": True, "loss.weights": W_EQUAL,
                                   "eval.tasks": {"msrvtt": EVAL_AT_END}},
    "finetune.py:dataset=youcook2": {"data.dataset": "youcook2", "data.videos_per_batch": 256,
                                     "data.n_video_tokens": 72, "data.n_stft": 4608, "train.lr": 1e-5,
                                     "train.epochs": 5, "train.lr_decay": 0.9, "train.use_eval_mode_always": True,
                                     "loss.weights": W_EQUAL, "eval.tasks": {"youcook2": EVAL_AT_END}},
    "howto100m.py:variant=tv_only": {"model.modalities": ("text", "video")},
    "howto100m.py:backbone=s3d": {"model.video_dim": 1024, "data.tfds_config": "s3d", "loss.weights": W_MAIN},
    "howto100m.py:backbone=clip": {"model.video_dim": 512, "data.tfds_config": "clip"},
    "howto100m.py:variant=no_transformer": {"model.depth": 0, "model.cross_modal": False, "loss.weights": W_PAIRS},
    "howto100m.py:variant=transformer_per_modality": {"model.fusion": "per_modality", "loss.weights": W_PAIRS},
    "howto100m.py:variant=fusion_no_comb": {"model.depth": 1, "model.cross_modal": False, "loss.weights": W_PAIRS},
    "howto100m.py:variant=cls_token": {"model.use_cls_token": True, "model.individual_projections": False},
    "howto100m.py:variant=shared_projection": {"model.use_cls_token": False, "model.individual_projections": False},
    "howto100m.py:variant=depth2_64heads_4096_112x10": {"model.depth": 2, "model.num_heads": 64,
                                                        "model.embed_dim": 4096, "data.videos_per_batch": 112,
                                                        "data.clips_per_video": 10},
    "howto100m.py:variant=depth2_64heads_4096_224x5": {"model.depth": 2, "model.num_heads": 64,
                                                       "data.videos_per_batch": 224, "data.clips_per_video": 5},
    "howto100m.py:variant=depth2_32heads_2048": {"model.depth": 2, "model.num_heads": 32, "model.embed_dim": 2048},
    "howto100m.py:variant=depth4_16heads_1024": {"model.depth": 4, "model.num_heads": 16, "model.embed_dim": 1024},
    "howto100m.py:variant=aligned_audio_equal_weights": {"data.text_audio_misaligned": False,
                                                         "loss.weights": W_EQUAL},
    "howto100m.py:variant=disentangled_equal_weights": {"data.text_audio_misaligned": True, "loss.weights": W_EQUAL},
    "howto100m.py:variant=positional_embeddings": {"model.use_positional_emb": True, "model.max_video_tokens": 12,
                                                   "model.max_text_tokens": 20, "model.max_audio_tokens": 12,
                                                   "eval.tasks.msrvtt.strategy": "clips_average",
                                                   "eval.tasks.youcook2.strategy": "clips_average"},
}
# The paper's experiments (fine-tuning: the default backbone; the others are in REPLACED).
EXPERIMENTS = sorted({v for k, v in REPLACED.items()
                      if not k.startswith(("bench_cpu", "demo")) and ",backbone" not in v})


def load(spec: str) -> ml_collections.ConfigDict:
    """The config of a `--config` string relative to configs/ (FILE.py[:ARG], split as config_flags does)."""
    name, _, arg = spec.partition(":")
    return runpy.run_path(str(CONFIGS / name))["get_config"](arg or None)


def get(config, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


@pytest.mark.parametrize("old", sorted(REPLACED))
def test_config_string_gives_the_values_of_the_replaced_file(old):
    config = complete_config(load(REPLACED[old]))  # the trainer's view: every field of the schema
    if REPLACED[old].startswith("howto100m.py"):  # epoch lengths derived as training does
        resolve_epoch_steps(config, HOWTO100M_TRAIN_VIDEOS)
    got = {k: v for k, v in flat(json.loads(config.to_json_best_effort())).items() if not k.startswith("eval.tasks.")}
    want = {**BEFORE["howto100m.py"], **BEFORE["differences"].get(old, {}), **CHANGED.get(old, {})}
    want_entries = old_eval_entries(want)
    assert set(got) - set(want) == NEW_FIELDS and not set(want) - set(got)
    assert {k: got[k] for k in want} == want
    entries = evaluators.entries(config)
    assert {name: {k: e[k] for k in ("every_steps", "batch_size", "strategy", "tfds_config")}
            for name, e in entries.items()} == want_entries


def test_every_variant_and_backbone_replaces_a_file_and_is_documented():
    assert not (CONFIGS / "ablations").exists()
    arguments = {v.partition(":")[2] for v in REPLACED.values()}
    assert {f"variant={v}" for v in HOWTO["VARIANTS"]} <= arguments
    assert {f"backbone={b}" for b in HOWTO["BACKBONES"] if b != "resnet"} <= arguments
    assert sorted(EXPECTED) == EXPERIMENTS
    readme = (CONFIGS / "README.md").read_text()
    for spec in EXPERIMENTS:
        assert f"`--config=configs/{spec}`" in readme, f"configs/README.md does not list --config=configs/{spec}"
    # The documented step counts are what the derivation gives for the full HowTo100M.
    assert resolve_epoch_steps(load("howto100m.py"), HOWTO100M_TRAIN_VIDEOS).train.steps_per_epoch == 5205
    c = resolve_epoch_steps(load("howto100m.py:variant=depth2_64heads_4096_112x10"), HOWTO100M_TRAIN_VIDEOS)
    assert (c.train.steps_per_epoch, c.eval.tasks.msrvtt.every_steps, c.eval.tasks.youcook2.every_steps) == (
        10411, 10411, 10411)


@pytest.mark.parametrize("spec", EXPERIMENTS)
def test_config_carries_the_released_settings(spec):
    config = load(spec)
    for dotted, want in EXPECTED[spec].items():
        assert get(config, dotted) == want, (spec, dotted)
    assert config.model.projection_dim == 6144 and config.loss.temperature == 0.05
    validate_config(config)  # field names and values the trainer accepts (full size, no mesh)


def test_arguments_combine_and_name_their_errors():
    c = load("howto100m.py:variant=cls_token,backbone=s3d")
    assert (c.model.use_cls_token, c.model.individual_projections, c.model.video_dim, c.data.tfds_config) == (
        True, False, 1024, "s3d")
    c = load("howto100m.py:variant=cls_token+depth2_32heads_2048+aligned_audio_equal_weights")
    assert (c.model.use_cls_token, c.model.depth, c.model.embed_dim, c.data.text_audio_misaligned) == (
        True, 2, 2048, False)
    with pytest.raises(ValueError, match=r"loss\.weights: set to .* and to .* by the combined variants"):
        load("howto100m.py:variant=no_transformer+aligned_audio_equal_weights")  # weights 0.1 vs 1
    with pytest.raises(ValueError, match="unknown variant 'cls'; known: tv_only, no_transformer"):
        load("howto100m.py:variant=cls")
    with pytest.raises(ValueError, match="unknown backbone 'vit'"):
        load("howto100m.py:backbone=vit")
    with pytest.raises(ValueError, match=r"unknown key 'varaint'; known: variant='', backbone='resnet'"):
        load("howto100m.py:varaint=cls_token")
    with pytest.raises(ValueError, match="expected variant=VALUE"):
        load("howto100m.py:variant")
    clip = load("finetune.py:dataset=msrvtt,backbone=clip")
    assert (clip.model.video_dim, clip.data.tfds_config, clip.data.videos_per_batch) == (512, "clip", 64)
    assert load("finetune.py:dataset=youcook2,backbone=clip").data.videos_per_batch == 256
    with pytest.raises(ValueError, match="dataset= must be one of msrvtt, youcook2, got ''"):
        load("finetune.py")
    with pytest.raises(ValueError, match="backbone= must be one of resnet, s3d, clip"):
        load("finetune.py:dataset=msrvtt,backbone=vit")


def test_parse_arg_types_and_apply_overrides():
    args = parse_arg("n=3,lr=0.5,name=x,tiny", n=1, lr=1.0, name="", tiny=False, flag=True)
    assert args.to_dict() == {"n": 3, "lr": 0.5, "name": "x", "tiny": True, "flag": True}
    assert parse_arg("flag=false", flag=True).flag is False and parse_arg(None, n=1).n == 1
    with pytest.raises(ValueError, match="n takes a value of type int"):
        parse_arg("n=x", n=1)
    with pytest.raises(ValueError, match="flag takes true or false"):
        parse_arg("flag=maybe", flag=True)
    c = apply_overrides(reference_config(), {"model.depth": 3, "loss.weights": W_EQUAL}, {"model.depth": 3})
    assert c.model.depth == 3 and c.loss.weights.to_dict() == W_EQUAL
    with pytest.raises(KeyError, match="model.dept: not a config field"):
        apply_overrides(reference_config(), {"model.dept": 3})


def test_resolve_epoch_steps():
    c = reference_config()
    c.eval.tasks = {"msrvtt": {"every_steps": -1}, "youcook2": {"every_steps": 3}, "crosstask": {}}
    resolve_epoch_steps(c, 1000)
    assert (c.train.steps_per_epoch, c.eval.tasks.msrvtt.every_steps) == (1000 // 224, 1000 // 224)
    assert c.eval.tasks.youcook2.every_steps == 3 and evaluators.entries(c)["crosstask"].every_steps == 0
    c = reference_config()
    c.train.steps_per_epoch = 7  # numbers are kept
    c.eval.tasks = {"msrvtt": {"every_steps": 0}}
    assert (resolve_epoch_steps(c, 1000).train.steps_per_epoch, c.eval.tasks.msrvtt.every_steps) == (7, 0)
    with pytest.raises(ConfigError, match=r"^data\.videos_per_batch=224 is larger than the 100 training videos "
                                          r"of 'howto100m' \(split 'train'\)"):
        resolve_epoch_steps(reference_config(), 100)


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


@pytest.mark.parametrize("name", EXPERIMENTS)
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


# The paper's CLS-token ablation at toy size on the tiny synthetic dataset (24 videos, 4 per step:
# 6 steps per epoch): everything but the sizes, the data and the numerics comes from the string.
ABLATION = "configs/howto100m.py:variant=cls_token"
TINY = ("--config.data.dataset=synthetic", "--config.data.tfds_config=tiny", "--config.data.videos_per_batch=4",
        "--config.data.clips_per_video=2", "--config.data.n_stft=64", "--config.data.num_workers=0",
        "--config.model.video_dim=64", "--config.model.text_dim=16", "--config.model.embed_dim=32",
        "--config.model.num_heads=4", "--config.model.projection_dim=32", "--config.model.davenet.blocks=(1,1)",
        "--config.model.davenet.widths=(8,8,16)", "--config.model.dtype=float32", "--config.mesh.fsdp=false",
        "--config.train.lr=1e-3", "--config.train.num_steps=12", "--config.train.log_every=3",
        "--config.checkpoint.every_steps=0",
        "--config.eval.tasks={'synthetic': {'every_steps': -1, 'strategy': 'clip', 'batch_size': 32}}")


def test_paper_ablation_trains_end_to_end_from_its_config_string(tmp_path):
    work = tmp_path / "work"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "eao_jax.main", f"--config={ABLATION}", f"--workdir={work}",
                           "--progress_bar=false", f"--config.data.data_dir={tmp_path / 'data'}", *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((work / "config.json").read_text())
    # The variant's fields, the paper's defaults it keeps, and the epoch length derived from the data.
    assert (saved["model"]["use_cls_token"], saved["model"]["individual_projections"]) == (True, False)
    assert saved["loss"]["weights"] == W_MAIN and saved["data"]["text_audio_misaligned"] is True
    assert saved["model"]["remat"] is True and saved["train"]["lr_decay"] == 0.9
    assert (saved["train"]["steps_per_epoch"], saved["eval"]["tasks"]["synthetic"]["every_steps"]) == (6, 6)
    steps = [r for r in read_metrics(work, "train")]
    assert steps[-1]["step"] == 12 and all(np.isfinite(r["loss"]) for r in steps)
    # Evaluated after each epoch (every_steps=-1, as the entries of configs/howto100m.py) and at the end.
    evals = [(r["step"], r["task"]) for r in read_metrics(work, "eval")]
    assert evals == [(6, "synthetic"), (12, "synthetic")]
    final = [r for r in read_metrics(work, "eval")][-1]["metrics"]
    assert 0.0 <= final["t2v"]["R10"] <= 100.0
