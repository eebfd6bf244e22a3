"""Released PyTorch checkpoint -> Orbax checkpoint of our model.

  python -m eao_jax.convert --torch_checkpoint=X.pth --output=DIR [--num_heads=N] [--overwrite]

Every dimension and option is inferred from the state dict: depth, widths, gated vs linear
projections, shared vs per-modality final projections, one transformer or one per modality, the
DAVEnet layout, CLS token and positional embeddings. The head count cannot be read off the weights:
it comes from the checkpoint's saved training config or from --num_heads. A key that cannot be
mapped, a parameter the model needs that the checkpoint lacks, or a tensor holding NaN/Inf values is
an error that names it. An --output that already holds anything is refused (converting twice into one
directory would mix two checkpoints there); --overwrite replaces an earlier convert output, which
convert marks with a file of its own (`CONVERT_MARKER`), and nothing else (a training run's
checkpoints, any other folder).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

import ml_collections
import numpy as np
from absl import flags, logging
from etils import epath

from eao_jax.defaults import loss_config, model_config
from eao_jax.lazy import lazy_import

# Imported on first use, so that `--help` answers without loading JAX / Flax / Orbax.
nnx = lazy_import("flax.nnx")
checkpoint = lazy_import("eao_jax.checkpoint")

# Defined by the original but never used in its forward pass: dropped on purpose.
UNUSED_KEYS = (
    re.compile(r"^fusion\.norm\.(weight|bias)$"),
    re.compile(r"^davenet\.batchnorm1\."),
    re.compile(r".*\.num_batches_tracked$"),
)
ARCH_TYPES = ("EverythingAtOnceModel", "EverythingAtOnceModel_TV_Only", "TransformerPerModalityModel")


class ConversionError(ValueError):
    pass


# Written into --output after the checkpoint: what --overwrite may replace is a directory holding it.
CONVERT_MARKER = "eao_convert.json"


def load_torch_checkpoint(path: str) -> tuple[dict[str, np.ndarray], dict[str, Any] | None, dict[str, Any]]:
    """Reads a released .pth: returns (state dict without 'module.' prefixes, training config or None,
    metadata such as epoch/step/arch).

    Read without torch by `eao_jax.torch_pickle`, which admits only tensors and plain containers: a
    checkpoint that names anything else is refused, so converting a downloaded file runs no code."""
    from eao_jax import torch_pickle  # noqa: PLC0415

    try:
        ckpt = torch_pickle.load(path)
    except FileNotFoundError:
        raise
    except Exception as e:
        msg = str(e)
        msg = msg[len(f"{path}: "):] if msg.startswith(f"{path}: ") else msg  # the path is named once
        raise ConversionError(f"cannot read torch checkpoint {path}: {msg}") from e
    if isinstance(ckpt, Mapping) and "state_dict" in ckpt:
        raw, config = ckpt["state_dict"], ckpt.get("config")
        meta = {k: ckpt.get(k) for k in ("arch", "epoch", "step")}
    elif isinstance(ckpt, Mapping) and all(hasattr(v, "shape") for v in ckpt.values()):
        raw, config, meta = ckpt, None, {}
    else:
        raise ConversionError(f"{path} holds neither a checkpoint dict with 'state_dict' nor a state dict")
    state = {}
    for k, v in raw.items():
        key = k[len("module."):] if k.startswith("module.") else k
        if not isinstance(v, np.ndarray):
            raise ConversionError(f"{path}: state dict entry {k!r} is a {type(v).__name__}, not a tensor")
        state[key] = v
    return state, (dict(config) if config is not None else None), meta


def _projection_kind(state: Mapping[str, np.ndarray], prefix: str) -> str | None:
    if f"{prefix}.cg.fc.weight" in state:
        return "gated"
    if f"{prefix}.weight" in state:
        return "linear"
    return None


def infer_model_config(state: Mapping[str, np.ndarray], torch_config: Mapping[str, Any] | None,
                       num_heads: int | None = None) -> ml_collections.ConfigDict:
    """Our model config for the original's state dict (+ its training config when present)."""
    args = {}
    arch_type = "EverythingAtOnceModel"
    if torch_config is not None:
        arch = torch_config.get("arch", {})
        arch_type = arch.get("type", arch_type)
        args = dict(arch.get("args", {}))
    if arch_type not in ARCH_TYPES:
        raise ConversionError(f"checkpoint config arch.type={arch_type!r} is not one of {ARCH_TYPES}")

    heads = num_heads
    saved_heads = args.get("fusion_params", {}).get("num_heads")
    if heads is None:
        heads = saved_heads
    elif saved_heads is not None and int(saved_heads) != int(heads):
        raise ConversionError(f"--num_heads={heads} contradicts the checkpoint config's num_heads={saved_heads}")
    if heads is None:
        raise ConversionError("the head count is not in the checkpoint (no config['arch']['args']['fusion_params']"
                              "['num_heads']): pass --num_heads")

    c = model_config()
    if "fusion.masking_token" not in state:
        raise ConversionError("missing key 'fusion.masking_token': not an Everything-at-Once checkpoint")
    c.embed_dim = int(state["fusion.masking_token"].shape[0])
    c.num_heads = int(heads)
    c.depth = len({int(m.group(1)) for k in state if (m := re.match(r"fusion\.blocks\.(\d+)\.", k))})
    if c.depth:
        c.mlp_ratio = state["fusion.blocks.0.mlp.fc1.weight"].shape[0] / c.embed_dim
        c.qkv_bias = "fusion.blocks.0.attn.qkv.bias" in state
    c.use_cls_token = "fusion.cls_token" in state
    c.fusion = "per_modality" if any(k.startswith("fusion_video.") for k in state) else "shared"
    # The original computes the fused pairs in training only when arch.args.cross_modal (default True) says so.
    c.cross_modal = (c.fusion == "shared" and arch_type == "EverythingAtOnceModel"
                     and bool(args.get("cross_modal", True)))

    if arch_type == "EverythingAtOnceModel_TV_Only":
        c.modalities = ("text", "video")
    else:
        c.modalities = ("text", "video", "audio")

    kind = _projection_kind(state, "video_token_proj")
    if kind is None:
        raise ConversionError("missing key 'video_token_proj.fc.weight' (or 'video_token_proj.weight')")
    c.token_projection = kind
    first = "video_token_proj.fc.weight" if kind == "gated" else "video_token_proj.weight"
    c.video_dim = int(state[first].shape[1])
    c.text_dim = int(state[first.replace("video", "text")].shape[1])

    if _projection_kind(state, "proj") is not None:
        c.individual_projections = False
        c.projection = _projection_kind(state, "proj")
        out_key = "proj.fc.weight" if c.projection == "gated" else "proj.weight"
    else:
        c.individual_projections = True
        c.projection = _projection_kind(state, "video_proj")
        if c.projection is None:
            raise ConversionError("missing key 'video_proj.fc.weight' (or 'proj.fc.weight')")
        out_key = "video_proj.fc.weight" if c.projection == "gated" else "video_proj.weight"
    c.projection_dim = int(state[out_key].shape[0])

    c.use_positional_emb = "video_pos_embed" in state
    if c.use_positional_emb:
        c.max_video_tokens = int(state["video_pos_embed"].shape[1])
        c.max_text_tokens = int(state["text_pos_embed"].shape[1])
        c.max_audio_tokens = int(state["audio_pos_embed"].shape[1])

    if "audio" in c.modalities:
        if "davenet.conv1.weight" not in state:
            raise ConversionError("missing key 'davenet.conv1.weight'")
        stem = state["davenet.conv1.weight"]  # (C0, 1, n_mels, 1)
        stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"davenet\.layer(\d+)\.", k))})
        blocks, widths = [], [int(stem.shape[0])]
        for s in stages:
            n = len({int(m.group(1)) for k in state if (m := re.match(rf"davenet\.layer{s}\.(\d+)\.", k))})
            blocks.append(n)
            widths.append(int(state[f"davenet.layer{s}.0.conv1.weight"].shape[0]))
        c.davenet.n_mels = int(stem.shape[2])
        c.davenet.blocks = tuple(blocks)
        c.davenet.widths = tuple(widths)
        c.davenet.kernel = int(state[f"davenet.layer{stages[0]}.0.conv1.weight"].shape[3])
        pooling = args.get("strategy_audio_pooling", "none")
        c.audio_pooling = pooling
        if args.get("audio_max_num_STFT_frames"):
            c.audio_pooling_tokens = int(args["audio_max_num_STFT_frames"]) // (2 ** len(blocks))
    return c


def _linear(w: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(w.T)


def _conv1d(w: np.ndarray) -> np.ndarray:
    """torch (out, in, 1, k) -> flax (k, in, out)."""
    return np.ascontiguousarray(w[:, :, 0, :].transpose(2, 1, 0))


def torch_key_to_path(key: str, cfg: ml_collections.ConfigDict) -> tuple[tuple[str, ...], Any] | None:
    """Our variable path and a layout transform for one torch key; None for keys to skip."""
    mods = ("text", "video", "audio")

    def projection(prefix: str, rest: str):
        table = {"fc.weight": (("fc", "kernel"), _linear), "fc.bias": (("fc", "bias"), None),
                 "cg.fc.weight": (("cg", "kernel"), _linear), "cg.fc.bias": (("cg", "bias"), None),
                 "weight": (("fc", "kernel"), _linear), "bias": (("fc", "bias"), None)}
        if rest not in table:
            return None
        sub, fn = table[rest]
        return prefix + sub, fn

    if key == "fusion.masking_token":
        return ("masking_token",), None
    if key == "fusion.cls_token":
        return ("cls_token",), lambda w: w.reshape(-1)
    for m in mods:
        if key == f"{m}_pos_embed":
            return ("pos_embed", m), lambda w: w.reshape(w.shape[-2], w.shape[-1])
        if key.startswith(f"{m}_token_proj."):
            return projection(("token_proj", m), key[len(f"{m}_token_proj."):])
        if key.startswith(f"{m}_norm_layer."):
            leaf = {"weight": "scale", "bias": "bias"}.get(key.rsplit(".", 1)[1])
            return (("token_norm", m, leaf), None) if leaf else None
        if key.startswith(f"{m}_proj."):
            return projection(("proj", m), key[len(f"{m}_proj."):])
    if key.startswith("proj."):
        return projection(("proj",), key[len("proj."):])

    m = re.match(r"^(fusion|fusion_text|fusion_video|fusion_audio)\.blocks\.(\d+)\.(.+)$", key)
    if m:
        which, idx, rest = m.group(1), m.group(2), m.group(3)
        if cfg.fusion == "per_modality":
            base = ("fusion", {"fusion": "text"}.get(which, which.replace("fusion_", "")), "blocks", idx)
        else:
            base = ("fusion", "blocks", idx)
        table = {
            "norm1.weight": (("norm1", "scale"), None), "norm1.bias": (("norm1", "bias"), None),
            "norm2.weight": (("norm2", "scale"), None), "norm2.bias": (("norm2", "bias"), None),
            "attn.qkv.weight": (("attn", "qkv", "kernel"), _linear), "attn.qkv.bias": (("attn", "qkv", "bias"), None),
            "attn.proj.weight": (("attn", "proj", "kernel"), _linear),
            "attn.proj.bias": (("attn", "proj", "bias"), None),
            "mlp.fc1.weight": (("fc1", "kernel"), _linear), "mlp.fc1.bias": (("fc1", "bias"), None),
            "mlp.fc2.weight": (("fc2", "kernel"), _linear), "mlp.fc2.bias": (("fc2", "bias"), None),
        }
        if rest not in table:
            return None
        sub, fn = table[rest]
        return base + sub, fn

    bn = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
    if key == "davenet.conv1.weight":
        return ("davenet", "stem", "kernel"), lambda w: np.ascontiguousarray(w[:, 0, :, 0].T)
    m = re.match(r"^davenet\.bn1\.(\w+)$", key)
    if m and m.group(1) in bn:
        return ("davenet", "stem_bn", bn[m.group(1)]), None
    m = re.match(r"^davenet\.layer(\d+)\.(\d+)\.(.+)$", key)
    if m:
        base = ("davenet", "stages", str(int(m.group(1)) - 1), m.group(2))
        rest = m.group(3)
        if rest in ("conv1.weight", "conv2.weight"):
            return base + (rest.split(".")[0], "kernel"), _conv1d
        if rest == "downsample.0.weight":
            return base + ("down_conv", "kernel"), _conv1d
        mm = re.match(r"^(bn1|bn2|downsample\.1)\.(\w+)$", rest)
        if mm and mm.group(2) in bn:
            name = {"bn1": "bn1", "bn2": "bn2", "downsample.1": "down_bn"}[mm.group(1)]
            return base + (name, bn[mm.group(2)]), None
    return None


def _is_ignored(key: str, cfg: ml_collections.ConfigDict) -> bool:
    if any(p.match(key) for p in UNUSED_KEYS):
        return True
    if cfg.fusion == "per_modality" and key.startswith("fusion_text."):
        return True  # the original's fusion_text is the same module as fusion: saved twice
    if cfg.fusion == "per_modality" and re.match(r"^fusion_(video|audio)\.(masking_token|norm\.)", key):
        return True  # per-modality transformers' own masking tokens and final norms are never used
    if "audio" not in cfg.modalities and (key.startswith(("davenet.", "audio_token_proj.", "audio_norm_layer.",
                                                          "audio_proj.", "audio_pos_embed"))):
        return True  # the TV-only model builds but never uses its audio branch
    return False


def convert_state(state: Mapping[str, np.ndarray], cfg: ml_collections.ConfigDict) -> dict:
    """Maps a torch state dict onto our model's variables; returns a pure nested dict.

    Raises ConversionError naming every unexpected torch key and every variable left unfilled.
    """
    abstract = checkpoint.abstract_model(ml_collections.ConfigDict({"model": cfg}))
    flat_target = {tuple(str(p) for p in path): v
                   for path, v in nnx.to_flat_state(nnx.state(abstract, checkpoint.MODEL_VARIABLES))}
    filled: dict[tuple[str, ...], np.ndarray] = {}
    unexpected, bad_shape, ignored, nonfinite = [], [], [], []
    for key, value in state.items():
        if _is_ignored(key, cfg):
            ignored.append(key)
            continue
        mapped = torch_key_to_path(key, cfg)
        if mapped is None or mapped[0] not in flat_target:
            unexpected.append(key)
            continue
        path, fn = mapped
        arr = np.asarray(fn(value) if fn else value, dtype=np.float32)
        want = tuple(flat_target[path].shape)
        if arr.shape != want:
            bad_shape.append(f"{key} {tuple(value.shape)} -> {'/'.join(path)} expects {want}")
            continue
        if not np.isfinite(arr).all():  # a NaN checkpoint would only give NaN embeddings downstream
            nonfinite.append(f"{key} ({arr.size - int(np.isfinite(arr).sum())} of {arr.size} values)")
        filled[path] = arr
    missing = sorted("/".join(p) for p in flat_target if p not in filled)
    problems = []
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(sorted(unexpected)))
    if bad_shape:
        problems.append("shape mismatches: " + "; ".join(bad_shape))
    if missing:
        problems.append("missing (no checkpoint key for): " + ", ".join(missing))
    if nonfinite:
        problems.append("tensors holding NaN or Inf: " + ", ".join(sorted(nonfinite)))
    if problems:
        raise ConversionError("cannot convert checkpoint: " + " | ".join(problems))
    if ignored:
        logging.info("ignored %d keys the original never uses: %s", len(ignored), ", ".join(sorted(ignored)[:8]))
    nested: dict = {}
    for path, arr in filled.items():
        node = nested
        for p in path[:-1]:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(path[-1]) if path[-1].isdigit() else path[-1]] = arr
    return nested


def _is_step_dir(p: epath.Path) -> bool:
    """An Orbax step directory (finished or a temporary one of an interrupted save)."""
    return p.is_dir() and p.name.split(".", 1)[0].isdigit()


def check_output(output: str | os.PathLike, overwrite: bool = False) -> list[epath.Path]:
    """Refuses an `output` that already holds anything (checked before the slow work): a second
    checkpoint there would sit beside the first and readers take the newest step. With `overwrite`,
    an earlier convert output (its CONVERT_MARKER and step directories, nothing else) is accepted;
    returns its step directories, to be removed once the new checkpoint is ready to be written."""
    out = checkpoint.resolve_path(output)
    if not out.exists():
        return []
    if not out.is_dir():
        raise ConversionError(f"--output {output} exists and is not a directory")
    entries = sorted(out.iterdir())
    if not entries:
        return []
    steps = [p for p in entries if _is_step_dir(p)]
    if not overwrite:
        what = f"checkpoint step(s) {', '.join(p.name for p in steps)}" if steps else f"{len(entries)} entries"
        raise ConversionError(f"--output {output} is not empty (it holds {what}): choose a new directory, or pass "
                              "--overwrite to replace an earlier convert output")
    others = [p.name for p in entries if not _is_step_dir(p) and p.name != CONVERT_MARKER]
    if others:
        raise ConversionError(f"--output {output} holds more than a convert output ({', '.join(others[:5])}): "
                              "refusing to overwrite it; choose a new directory")
    if not (out / CONVERT_MARKER).is_file():  # e.g. a training run's checkpoints: step directories alone
        raise ConversionError(f"--output {output} holds checkpoint step(s) {', '.join(p.name for p in steps)} that "
                              f"convert did not write (it has no {CONVERT_MARKER}): refusing to overwrite it; "
                              "choose a new directory")
    return steps


def convert(torch_checkpoint: str, output: str, num_heads: int | None = None, *,
            overwrite: bool = False) -> ml_collections.ConfigDict:
    """Converts a released checkpoint into an Orbax checkpoint at `output`; returns the saved config.

    `overwrite` replaces an earlier convert output at `output` (see `check_output`)."""
    old_steps = check_output(output, overwrite)
    state, torch_config, meta = load_torch_checkpoint(torch_checkpoint)
    model_cfg = infer_model_config(state, torch_config, num_heads)
    variables = convert_state(state, model_cfg)
    config = ml_collections.ConfigDict()
    config.model = model_cfg
    config.loss = loss_config()
    loss = (torch_config or {}).get("loss")
    if loss is not None and loss.get("type", "CombinatorialLoss") != "CombinatorialLoss":
        logging.warning("checkpoint config loss.type=%r is not CombinatorialLoss: keeping the default loss config",
                        loss.get("type"))
    elif loss is not None:
        largs = loss.get("args", {})
        # CombinatorialLoss's own defaults: every weight 0, NormSoftmax, temperature 0.05.
        for term in config.loss.weights:
            config.loss.weights[term] = float(largs.get(f"{term}_weight", 0.0))
        config.loss.name = str(largs.get("contrastive_loss", "NormSoftmax"))
        config.loss.temperature = float(largs.get("temperature", 0.05))
    config.source = ml_collections.ConfigDict({
        "torch_checkpoint": str(torch_checkpoint), "arch": str(meta.get("arch")),
        "epoch": int(meta.get("epoch") or 0), "step": int(meta.get("step") or 0)})
    for p in old_steps:  # only now: a conversion that fails leaves the earlier output intact
        p.rmtree()
    step = int(meta.get("step") or 0)
    directory = checkpoint.save_model(output, step, variables, config)
    (directory / CONVERT_MARKER).write_text(json.dumps(
        {"written_by": "eao_jax.convert", "torch_checkpoint": str(torch_checkpoint), "step": step}) + "\n")
    return config


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from eao_jax import console  # noqa: PLC0415

    console.quiet_libraries()
    cfg = convert(FLAGS.torch_checkpoint, FLAGS.output, FLAGS.num_heads, overwrite=FLAGS.overwrite)
    m = cfg.model
    print(f"converted {FLAGS.torch_checkpoint} -> {FLAGS.output}: modalities={tuple(m.modalities)} "
          f"embed_dim={m.embed_dim} depth={m.depth} heads={m.num_heads} projection_dim={m.projection_dim} "
          f"fusion={m.fusion} cls={m.use_cls_token} pos_emb={m.use_positional_emb}")


if __name__ == "__main__":
    flags.DEFINE_string("torch_checkpoint", None, "Released PyTorch checkpoint (.pth).", required=True)
    flags.DEFINE_string("output", None, "Output Orbax checkpoint directory.", required=True)
    flags.DEFINE_integer("num_heads", None, "Attention heads, when the checkpoint has no saved config.")
    flags.DEFINE_boolean("overwrite", False, "Replace an earlier convert output at --output.")
    from eao_jax import console  # noqa: PLC0415

    console.run("convert", main)
