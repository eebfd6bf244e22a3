"""Config schema and validation for training: every error names the config field.

`validate_config` runs before any array is allocated or any function compiled. It checks
- unknown fields (a typo in a config file; `--config.x=y` overrides of unknown fields are already
  refused by the locked ConfigDict at flag parsing), against `reference_config()`;
- each section's values (model, loss, data, train, mesh, checkpoint, eval);
- consistency across sections: the global batch against the mesh's data axis and the process
  count, sequence lengths against positional embeddings, DAVEnet stages against the audio length.
Dataset-dependent checks (feature dimensions against `model.video_dim` / `text_dim` /
`davenet.n_mels`) are in `check_batch_against_model`, run on the first batch's shapes.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import ml_collections

from eao_jax.defaults import reference_config
from eao_jax.loss import validate_loss_config
from eao_jax.model.eao import validate_model_config
from eao_jax.parallel import mesh_shape


class ConfigError(ValueError):
    """A config value that cannot work; the message starts with the field name."""


def complete_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config` with every field it leaves out taken from `reference_config()` (a new, locked
    ConfigDict). Free-form sections (loss.weights) are taken whole from `config`. Raises ConfigError
    for unknown fields."""
    check_unknown_fields(config)

    def merge(ref: dict, user: Mapping, prefix: str) -> dict:
        out = dict(ref)
        for k, v in user.items():
            path = f"{prefix}{k}"
            if isinstance(v, Mapping) and isinstance(ref.get(k), Mapping) and path not in _FREE_FORM:
                out[k] = merge(ref[k], v, f"{path}.")
            else:
                out[k] = v
        return out

    user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    merged = ml_collections.ConfigDict(merge(reference_config().to_dict(), user, ""))
    merged.lock()
    return merged


# Sections whose sub-fields the schema does not pin (free-form dicts).
_FREE_FORM = ("loss.weights", "eval.tasks")  # eval.tasks: named entries, checked by eao_jax.evaluators


def check_unknown_fields(config: Mapping[str, Any], reference: Mapping[str, Any] | None = None,
                         prefix: str = "") -> None:
    """Raises ConfigError naming the first field of `config` that `reference` does not have."""
    reference = reference_config() if reference is None else reference
    for key in config.keys():
        path = f"{prefix}{key}"
        if key not in reference:
            raise ConfigError(_unknown_field(path, reference.keys()))
        value, ref = config[key], reference[key]
        if isinstance(value, Mapping | ml_collections.ConfigDict) and path not in _FREE_FORM:
            if not isinstance(ref, Mapping | ml_collections.ConfigDict):
                raise ConfigError(f"{path}: expected a value, got a section")
            check_unknown_fields(value, ref, prefix=f"{path}.")


def _unknown_field(path: str, known: Iterable[str]) -> str:
    """'<path>: unknown config field; did you mean <closest>?' (difflib), else the section's fields."""
    prefix, _, key = path.rpartition(".")
    known = sorted(set(known))
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    if close:
        return f"{path}: unknown config field; did you mean {prefix + '.' if prefix else ''}{close[0]}?"
    return f"{path}: unknown config field (fields of {prefix or 'the config'}: {', '.join(known)})"


def unknown_field_message(path: str, reference: Mapping[str, Any] | None = None) -> str | None:
    """The error for a dotted field path (`--config.<path>=...`) that `reference` (default:
    `reference_config()`) does not have, naming the path and the closest real field; None when the
    path exists (or lies in a free-form section)."""
    node: Any = reference_config() if reference is None else reference
    prefix = ""
    for key in path.split("."):
        if prefix[:-1] in _FREE_FORM:
            return None
        if not isinstance(node, Mapping | ml_collections.ConfigDict):
            return f"{path}: {prefix[:-1]} is a value, not a section"
        if key not in node:
            return _unknown_field(prefix + key, node.keys())
        node, prefix = node[key], f"{prefix}{key}."
    return None


def _positive_int(cfg, section: str, field: str, *, allow: tuple[int, ...] = ()) -> int:
    v = cfg.get(field)
    if isinstance(v, bool) or not isinstance(v, int) or (v < 1 and v not in allow):
        extra = f" (or {', '.join(map(str, allow))})" if allow else ""
        raise ConfigError(f"{section}.{field} must be a positive integer{extra}, got {v!r}")
    return v


def _validate_train(t: ml_collections.ConfigDict) -> None:
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    for f in ("b1", "b2"):
        if not 0 <= t[f] < 1:
            raise ConfigError(f"train.{f} must be in [0, 1), got {t[f]}")
    if not t.eps > 0:
        raise ConfigError(f"train.eps must be > 0, got {t.eps}")
    if not 0 < t.lr_decay <= 1:
        raise ConfigError(f"train.lr_decay must be in (0, 1], got {t.lr_decay}")
    _positive_int(t, "train", "epochs")
    _positive_int(t, "train", "steps_per_epoch", allow=(-1,))
    _positive_int(t, "train", "num_steps", allow=(-1,))
    _positive_int(t, "train", "log_every")


_FLOAT32_MAX = 3.4028234663852886e38  # numbers reach the step as float32: larger ones become inf


def _finite_float32(v: float) -> bool:
    return math.isfinite(v) and abs(v) <= _FLOAT32_MAX


def check_finite_numbers(config: Mapping[str, Any], prefix: str = "") -> None:
    """Raises ConfigError naming the first number of `config` that is NaN, infinite or beyond float32's
    range: no field takes one (an infinite learning rate, say, would turn every parameter non-finite
    in one step, and 1e39 is infinite once in float32)."""
    for key in config.keys():
        value, path = config[key], f"{prefix}{key}"
        if isinstance(value, Mapping | ml_collections.ConfigDict):
            check_finite_numbers(value, f"{path}.")
        elif isinstance(value, list | tuple):
            for i, v in enumerate(value):
                if isinstance(v, float) and not _finite_float32(v):
                    raise ConfigError(f"{path}[{i}] must be a finite number (float32), got {v}")
        elif isinstance(value, float) and not _finite_float32(value):
            raise ConfigError(f"{path} must be a finite number (float32), got {value}")


def validate_config(config: ml_collections.ConfigDict, *, n_devices: int | None = None,
                    process_count: int = 1) -> None:
    """Checks a training config before anything is built (see the module docstring).

    n_devices: number of devices the mesh will span (None skips the mesh checks).
    Fields the config leaves out are checked at their defaults (`complete_config`).
    Raises ConfigError whose message starts with the offending field.
    """
    config = complete_config(config)  # also refuses unknown fields
    check_finite_numbers(config)
    for section in ("model", "loss", "data", "train", "mesh", "checkpoint", "eval"):
        if section not in config:
            raise ConfigError(f"{section}: missing config section")
    try:
        validate_model_config(config.model)
        validate_loss_config(config.loss)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None
    m, d = config.model, config.data
    dv = m.davenet
    if "audio" in m.modalities and len(dv.widths) != len(dv.blocks) + 1:
        raise ConfigError(f"model.davenet.widths needs one stem width plus one per stage: "
                          f"{len(dv.blocks)} stages (model.davenet.blocks) but {len(dv.widths)} widths")
    if not isinstance(config.seed, int):
        raise ConfigError(f"seed must be an integer, got {config.seed!r}")

    # Data.
    for f in ("videos_per_batch", "clips_per_video", "n_video_tokens", "max_words", "n_stft"):
        _positive_int(d, "data", f)
    if "audio" in m.modalities:
        down = 2 ** len(dv.blocks)
        if d.n_stft < down:
            raise ConfigError(f"data.n_stft={d.n_stft} is shorter than one DAVEnet token "
                              f"({down} frames for {len(dv.blocks)} stages, model.davenet.blocks)")
    if m.use_positional_emb:
        lengths = {"video": (d.n_video_tokens, "data.n_video_tokens", "model.max_video_tokens"),
                   "text": (d.max_words, "data.max_words", "model.max_text_tokens")}
        if "audio" in m.modalities:
            lengths["audio"] = (d.n_stft // 2 ** len(dv.blocks), "data.n_stft // 2**len(model.davenet.blocks)",
                                "model.max_audio_tokens")
        for mod, (n, what, field) in lengths.items():
            if mod in m.modalities and n > m[field.split(".")[1]]:
                raise ConfigError(f"{field}={m[field.split('.')[1]]} is shorter than the {n} {mod} tokens of "
                                  f"a training clip ({what})")

    _validate_train(config.train)

    # Mesh and batch.
    mc = config.mesh
    if not isinstance(mc.fsdp_min_size, int) or mc.fsdp_min_size < 0:
        raise ConfigError(f"mesh.fsdp_min_size must be a non-negative integer, got {mc.fsdp_min_size!r}")
    global_batch = d.videos_per_batch * d.clips_per_video
    if process_count > 1 and d.videos_per_batch % process_count:
        raise ConfigError(f"data.videos_per_batch={d.videos_per_batch} is not divisible by the number of "
                          f"processes ({process_count}): each process loads an equal share of videos")
    if n_devices is not None:
        try:
            data_size, _ = mesh_shape(mc, n_devices)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if global_batch % data_size:
            raise ConfigError(
                f"data.videos_per_batch x data.clips_per_video = {d.videos_per_batch} x {d.clips_per_video} = "
                f"{global_batch} clips is not divisible by the mesh data axis (mesh.data -> {data_size} devices)")

    # Checkpoints and evaluation.
    c = config.checkpoint
    if not isinstance(c.every_steps, int) or c.every_steps < 0:
        raise ConfigError(f"checkpoint.every_steps must be >= 0 (0: only at the end), got {c.every_steps!r}")
    if c.keep is not None and (not isinstance(c.keep, int) or c.keep < 1):
        raise ConfigError(f"checkpoint.keep must be a positive integer or None (keep all), got {c.keep!r}")
    from eao_jax import evaluators  # noqa: PLC0415 (the evaluator registry checks its entries)

    try:
        evaluators.check(config)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def resolve_epoch_steps(config: ml_collections.ConfigDict, n_videos: int) -> ml_collections.ConfigDict:
    """Fills, in place, the fields derived from the size of the training split (`n_videos` videos):
    train.steps_per_epoch=-1 becomes n_videos // data.videos_per_batch (the original drops the last
    partial batch) and every_steps=-1 of an eval.tasks entry one epoch. Fields set to a number are kept. The one place
    that derives them: training calls it once the data is open, the benchmark with the dataset's size.
    Raises ConfigError when one batch needs more videos than the split has (a batch would repeat
    videos as each other's negatives). Returns `config`."""
    d, t = config.data, config.train
    if d.videos_per_batch > n_videos:
        raise ConfigError(f"data.videos_per_batch={d.videos_per_batch} is larger than the {n_videos} training "
                          f"videos of {d.dataset!r} (split {d.get('split') or 'train'!r})")
    if t.steps_per_epoch == -1:
        t.steps_per_epoch = n_videos // d.videos_per_batch
    for entry in config.eval.tasks.values():
        if entry.get("every_steps") == -1:
            entry.every_steps = t.steps_per_epoch
    return config


def check_batch_against_model(shapes: Mapping[str, tuple[int, ...]], config: ml_collections.ConfigDict,
                              source: str = "the training data") -> None:
    """Compares a batch's array shapes {key: shape} with the model config; raises ConfigError naming
    the model field whose dimension disagrees with the data (before compilation)."""
    m = config.model
    checks = [("video", -1, "model.video_dim", m.video_dim), ("text", -1, "model.text_dim", m.text_dim)]
    if "audio" in m.modalities:
        checks.append(("audio", 1, "model.davenet.n_mels", m.davenet.n_mels))
    for key, axis, field, want in checks:
        if key.split("_")[0] not in m.modalities:
            continue
        if key not in shapes:
            raise ConfigError(f"model.modalities includes {key!r} but {source} has no '{key}' entry")
        got = shapes[key][axis]
        if got != want:
            raise ConfigError(f"{field}={want} but {source} has {key} features of size {got} "
                              f"(shape {tuple(shapes[key])})")


# Fields a resumed run may change: how long it runs, how it logs, saves, evaluates, where it reads the
# data from and how it is laid out on the devices. Everything else (model, loss, seed, optimizer and
# schedule, what the data pipeline yields) must equal the checkpoint's, or the resumed run would not
# continue the saved one.
RESUME_MAY_CHANGE = ("train.num_steps", "train.epochs", "train.log_every", "checkpoint.", "eval.", "mesh.",
                     "init_from", "data.data_dir", "data.num_workers", "data.prefetch", "data.read_threads",
                     "data.read_buffer")


def _flat_json(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, Mapping | ml_collections.ConfigDict):
        out: dict[str, Any] = {}
        for k in d.keys():
            out.update(_flat_json(d[k], f"{prefix}{k}."))
        return out
    if isinstance(d, tuple):
        d = list(d)
    return {prefix[:-1]: d}


def resume_differences(saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> list[str]:
    """'field: checkpoint X vs config Y' for every field (present in both) that differs between the
    config a checkpoint was written with and the config resuming it, except RESUME_MAY_CHANGE."""
    import json  # noqa: PLC0415

    def flat(c):
        return _flat_json(json.loads(c.to_json_best_effort()) if isinstance(c, ml_collections.ConfigDict) else c)

    a, b = flat(saved), flat(config)
    diffs = []
    for key in sorted(set(a) & set(b)):
        if any(key == p or (p.endswith(".") and key.startswith(p)) for p in RESUME_MAY_CHANGE):
            continue
        if a[key] != b[key]:
            diffs.append(f"{key}: checkpoint {a[key]!r} vs config {b[key]!r}")
    return diffs
