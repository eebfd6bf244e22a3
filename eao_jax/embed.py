"""Embeddings for feature arrays: the public Python API and a command line.

  python -m eao_jax.embed --checkpoint=DIR --input=IN.npz --output=OUT.npz [--batch_size=256]

IN holds any of `video, video_mask, text, text_mask, audio, audio_mask[, audio_STFT_nframes]`
(the layout of the reference `input/*` arrays), B items each:
  video               (B, Nv, video_dim) float  video features, one row per token (per second)
  video_mask          (B, Nv)                   1 for real tokens, 0 for padding
  text                (B, Nt, text_dim)  float  word vectors
  text_mask           (B, Nt)                   1 for real words
  audio               (B, n_mels, T)     float  log-mel spectrogram, T STFT frames (any T the original
                                                runs: each DAVEnet stage maps T to ceil(T / 2))
  audio_mask          (B, T)                    per STFT FRAME (not per token): 1 for real frames; pooled
                                                to the tokens with kernel = stride = ceil(T / tokens)
  audio_STFT_nframes  (B,)               int    real frame count (only the audio pooling strategies use
                                                it; default -1, unknown)
An item whose mask is all zero has no such modality. OUT holds the L2-normalised embeddings of every
combination whose modalities are all in IN (`text_embed`, ..., `tv_embed`, ..., `t+v_embed`, ...),
(B, projection_dim) each, and the `*_nonempty_input_mask` arrays (B,). The model runs in eval mode
(BatchNorm running statistics), through the evaluators' forward (eao_jax/evaluators/embedder.py),
with the batch sharded over every device. Inputs and embeddings with NaN/Inf values are refused, and so is a
checkpoint whose weights hold any (`checkpoint.load_model`): nothing is written then.
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
from absl import flags

from eao_jax.evaluators.embedder import Embedder, embed_rows, empty_inputs
from eao_jax.lazy import lazy_import

if TYPE_CHECKING:
    from eao_jax.model.eao import EverythingAtOnce

# Imported on first use, so that `--help` answers without loading JAX / Flax / Orbax.
checkpoint = lazy_import("eao_jax.checkpoint")
eao = lazy_import("eao_jax.model.eao")


def _check_inputs(model: EverythingAtOnce, inputs: Mapping[str, np.ndarray]) -> tuple[dict, int]:
    present = [m for m in model.modalities if m in inputs]
    if not present:
        raise ValueError(f"input holds none of the model's modalities {model.modalities}")
    arrays, n = {}, None
    want_dim = model.input_dims
    for m in present:
        x = np.asarray(inputs[m], np.float32)
        if f"{m}_mask" not in inputs:
            raise KeyError(f"input has '{m}' but no '{m}_mask'")
        mask = np.asarray(inputs[f"{m}_mask"], np.float32)
        if x.ndim != 3:
            raise ValueError(f"input '{m}' must have 3 dimensions, got shape {x.shape}")
        if m == "audio":
            if x.shape[1] != want_dim["audio"]:
                raise ValueError(f"input 'audio' must be (B, {want_dim['audio']}, T), got {x.shape}")
            try:  # any length the original runs (not only multiples of model.audio_downsampling)
                model.check_audio_length(x.shape[2])
            except ValueError as e:
                raise ValueError(f"input 'audio': {e}") from None
            want_mask = (x.shape[0], x.shape[2])
        else:
            if x.shape[2] != want_dim[m]:
                raise ValueError(f"input '{m}' has feature dimension {x.shape[2]}, the model expects {want_dim[m]}")
            want_mask = x.shape[:2]
        if mask.shape != want_mask:
            raise ValueError(f"input '{m}_mask' has shape {mask.shape}, expected {want_mask}")
        for key, arr in ((m, x), (f"{m}_mask", mask)):
            if not np.isfinite(arr).all():
                raise ValueError(f"input '{key}' contains NaN or Inf")
        if n is not None and x.shape[0] != n:
            raise ValueError(f"input '{m}' has {x.shape[0]} items, other modalities have {n}")
        n = x.shape[0]
        arrays[m], arrays[f"{m}_mask"] = x, mask
    if n == 0:
        raise ValueError(f"input holds 0 items (the leading dimension of {', '.join(repr(m) for m in present)})")
    if "audio" in present:
        nframes = inputs.get("audio_STFT_nframes")
        if nframes is not None and np.size(nframes) != n:
            raise ValueError(f"input 'audio_STFT_nframes' has {np.size(nframes)} values (shape "
                             f"{np.shape(nframes)}), expected one per item ({n})")
        arrays["audio_STFT_nframes"] = (np.full((n,), -1, np.int32) if nframes is None
                                        else np.asarray(nframes, np.int32).reshape(n))
    # Absent modalities get one empty token so the forward runs; their outputs are dropped.
    for m in model.modalities:
        if m not in arrays:
            arrays.update(empty_inputs(model, m, n))
    return arrays, n


def _output_names(model: EverythingAtOnce, present: set[str], cross_modal: bool) -> list[str]:
    names = [f"{m}_embed" for m in model.modalities if m in present]
    mods = [m for m in model.modalities if m in present]
    for i, x in enumerate(mods):
        for y in mods[i + 1:]:
            if cross_modal:
                names.append(f"{eao.SHORT[x]}{eao.SHORT[y]}_embed")
            names.append(f"{eao.SHORT[x]}+{eao.SHORT[y]}_embed")
    return names + [f"{m}_nonempty_input_mask" for m in mods]


def embed(model: EverythingAtOnce, inputs: Mapping[str, np.ndarray], *, batch_size: int = 256
          ) -> dict[str, np.ndarray]:
    """L2-normalised embeddings of `inputs` (see module docstring); numpy in, numpy out."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    arrays, n = _check_inputs(model, inputs)
    present = {m for m in model.modalities if m in inputs}
    cross_modal = not model.per_modality_fusion and len(model.modalities) > 1
    names = _output_names(model, present, cross_modal)
    embedder = Embedder(model, cross_modal=cross_modal, outputs=names, normalize=True)
    result = embed_rows(embedder, arrays, embedder.round_batch_size(min(batch_size, n)), names)
    bad = [k for k, v in result.items() if not np.isfinite(v).all()]
    if bad:  # finite inputs were checked: the model's weights (or an overflow) made them
        raise FloatingPointError(f"embeddings {', '.join(bad)} hold NaN or Inf values (check the model's weights)")
    return result


def embed_checkpoint(checkpoint_dir: str, inputs: Mapping[str, np.ndarray], *, step: int | None = None,
                     batch_size: int = 256) -> dict[str, np.ndarray]:
    """`embed` with the model restored from an Orbax checkpoint (training or `convert` output)."""
    model, _, _ = checkpoint.load_model(checkpoint_dir, step)
    return embed(model, inputs, batch_size=batch_size)


def read_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of an input .npz, an `input/` prefix dropped from their names. Anything else (a missing
    file, another format, a damaged archive, an array of Python objects: never unpickled) raises
    ValueError('cannot read --input PATH: <why>')."""
    from eao_jax.console import error_line  # noqa: PLC0415

    where = f"cannot read --input {os.fspath(path)}"
    try:
        data = np.load(path)  # allow_pickle=False
    except OSError as e:
        raise ValueError(f"{where}: {e.strerror or error_line(e)}") from e
    except (ValueError, EOFError) as e:  # numpy found neither a zip nor an .npy header
        raise ValueError(f"{where}: not an .npz archive") from e
    except zipfile.BadZipFile as e:
        raise ValueError(f"{where}: a damaged .npz archive ({e})") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ValueError(f"{where}: a single .npy array, not an .npz archive of named arrays")
    inputs = {}
    with data:
        for key in data.files:
            try:
                inputs[key.split("/", 1)[1] if key.startswith("input/") else key] = data[key]
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"{where}: array {key!r}: {error_line(e)}") from e
    return inputs


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from eao_jax import console  # noqa: PLC0415

    console.quiet_libraries()
    inputs = read_inputs(FLAGS.input)
    out = embed_checkpoint(FLAGS.checkpoint, inputs, step=FLAGS.step, batch_size=FLAGS.batch_size)
    np.savez(FLAGS.output, **out)
    print(f"wrote {len(out)} arrays for {len(next(iter(out.values())))} items to {FLAGS.output}: "
          + ", ".join(sorted(out)))


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (training or convert output).",
                        required=True)
    flags.DEFINE_string("input", None, "Input .npz with features and masks.", required=True)
    flags.DEFINE_string("output", None, "Output .npz for the embeddings.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("batch_size", 256, "Items per forward pass.")
    from eao_jax import console  # noqa: PLC0415

    console.run("embed", main)
