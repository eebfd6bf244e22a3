"""Config validation: every error names its field and happens before anything is built."""

import importlib.util
import pathlib

import ml_collections
import pytest

from eao_jax import config_utils
from eao_jax.config_utils import ConfigError, check_batch_against_model, complete_config, validate_config

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_cfg_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def demo(arg: str | None = None) -> ml_collections.ConfigDict:
    return complete_config(load_config("demo", arg))


@pytest.mark.parametrize("name, arg, n_devices", [("demo", None, 2), ("demo", "tiny", 8), ("howto100m", None, 8)])
def test_shipped_configs_are_valid(name, arg, n_devices):
    validate_config(complete_config(load_config(name, arg)), n_devices=n_devices)


def test_complete_config_fills_missing_fields_and_keeps_given_ones():
    # A config file that leaves out train.num_steps, eval.at_end and data.tfds_config.
    c = load_config("howto100m").to_dict()
    del c["train"]["num_steps"], c["eval"]["at_end"], c["data"]["tfds_config"]
    c = ml_collections.ConfigDict(c)
    full = complete_config(c)
    assert full.train.num_steps == -1 and full.eval.at_end is True and full.data.tfds_config is None
    assert full.train.lr == c.train.lr and full.data.videos_per_batch == 224
    # Free-form loss weights come whole from the file, not merged with the defaults.
    c = load_config("howto100m")
    c.loss.weights = ml_collections.ConfigDict(dict(tv=1.0, ta=0.1, va=0.1))
    assert sorted(complete_config(c).loss.weights.keys()) == ["ta", "tv", "va"]
    with pytest.raises(AttributeError):  # the result is locked like a --config flag value
        full.train.new_field = 1


@pytest.mark.parametrize("section, field", [(None, "learning_rate"), ("train", "lr_decya"), ("model", "embedim"),
                                            ("checkpoint", "every"), ("model.davenet", "width")])
def test_unknown_field_is_named(section, field):
    c = demo()
    c.unlock()
    node = c
    for part in (section.split(".") if section else []):
        node = node[part]
    node[field] = 1
    path = f"{section}.{field}" if section else field
    with pytest.raises(ConfigError, match=rf"^{path}: unknown config field"):
        validate_config(c, n_devices=1)
    with pytest.raises(ConfigError, match=rf"^{path}: unknown config field"):
        complete_config(c)


@pytest.mark.parametrize("edit, field", [
    (lambda c: setattr(c.model, "num_heads", 5), "model.embed_dim"),
    (lambda c: setattr(c.model.davenet, "widths", (8, 8)), "model.davenet.widths"),
    (lambda c: setattr(c.data, "n_stft", 32), "data.n_stft"),
    (lambda c: (setattr(c.model, "use_positional_emb", True), setattr(c.model, "max_video_tokens", 8)),
     "model.max_video_tokens"),
    (lambda c: setattr(c.train, "lr", 0.0), "train.lr"),
    (lambda c: setattr(c.train, "lr_decay", 1.5), "train.lr_decay"),
    (lambda c: setattr(c.train, "steps_per_epoch", 0), "train.steps_per_epoch"),
    (lambda c: setattr(c.train, "log_every", 0), "train.log_every"),
    (lambda c: setattr(c.data, "clips_per_video", 0), "data.clips_per_video"),
    (lambda c: setattr(c.checkpoint, "keep", 0), "checkpoint.keep"),
    (lambda c: setattr(c.eval, "tasks", {"imagenet": {}}), "eval.tasks.imagenet.task"),
    (lambda c: setattr(c.eval, "tasks", {"msrvtt": {"every_steps": -2}}), "eval.tasks.msrvtt.every_steps"),
    (lambda c: setattr(c.eval, "tasks", {"crosstask": {"strategy": "clip"}}), "eval.tasks.crosstask.strategy"),
    (lambda c: setattr(c.loss.weights, "tv", -1.0), "loss.weights.tv"),
    (lambda c: setattr(c.mesh, "model", 3), "mesh.model"),
    # Non-finite numbers anywhere: an infinite learning rate passes `lr > 0` but makes every update inf.
    (lambda c: setattr(c.train, "lr", float("inf")), "train.lr"),
    (lambda c: setattr(c.train, "eps", float("nan")), "train.eps"),
    (lambda c: setattr(c.loss, "temperature", float("inf")), "loss.temperature"),
    (lambda c: setattr(c.loss.weights, "tv", float("nan")), "loss.weights.tv"),
    (lambda c: setattr(c.data, "min_time", float("inf")), "data.min_time"),
    # Finite in Python but infinite in float32, the precision the step computes in.
    (lambda c: setattr(c.train, "lr", 1e39), "train.lr must be a finite number \\(float32\\), got 1e\\+39"),
])
def test_bad_values_are_named(edit, field):
    c = demo()  # demo: embed 128, 4 heads, 6 DAVEnet stages (n_stft >= 64), 12 video tokens
    edit(c)
    with pytest.raises(ConfigError, match=rf"^{field}"):
        validate_config(c, n_devices=2)


def test_global_batch_must_divide_over_the_data_axis():
    c = demo()  # 16 videos x 4 clips = 64 clips
    validate_config(c, n_devices=8)
    c.data.videos_per_batch, c.data.clips_per_video = 5, 3  # 15 clips
    with pytest.raises(ConfigError, match=r"^data\.videos_per_batch x data\.clips_per_video = 5 x 3 = 15 clips "
                                          r"is not divisible by the mesh data axis \(mesh\.data -> 2 devices\)"):
        validate_config(c, n_devices=2)
    c.data.videos_per_batch, c.data.clips_per_video = 16, 4
    c.mesh.model = 2  # 8 devices = 4 data x 2 model: 64 % 4 == 0
    validate_config(c, n_devices=8)
    c.mesh.data = 3
    with pytest.raises(ConfigError, match=r"^mesh\.data=3 x mesh\.model=2 = 6 devices, but 8"):
        validate_config(c, n_devices=8)
    c.mesh.data = -1
    c.data.videos_per_batch = 6
    with pytest.raises(ConfigError, match=r"^data\.videos_per_batch=6 is not divisible by the number of processes"):
        validate_config(c, n_devices=8, process_count=4)


def test_batch_shapes_are_checked_against_the_model():
    c = demo()
    shapes = {"video": (64, 12, 64), "text": (64, 20, 16), "audio": (64, 40, 768)}
    check_batch_against_model(shapes, c)
    with pytest.raises(ConfigError, match=r"^model\.video_dim=64 but the training data has video features of size "
                                          r"4096"):
        check_batch_against_model({**shapes, "video": (64, 12, 4096)}, c)
    with pytest.raises(ConfigError, match=r"^model\.text_dim=16"):
        check_batch_against_model({**shapes, "text": (64, 20, 300)}, c)
    with pytest.raises(ConfigError, match=r"^model\.davenet\.n_mels=40"):
        check_batch_against_model({**shapes, "audio": (64, 80, 768)}, c)


def test_reference_config_covers_the_paper_config():
    # Every field of configs/howto100m.py is a known field (the schema is not stale).
    config_utils.check_unknown_fields(load_config("howto100m"))
