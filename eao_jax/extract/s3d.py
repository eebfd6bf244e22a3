"""S3D-G from MIL-NCE (Miech et al., CVPR 2020), trained on HowTo100M: the video backbone of EAO's
S3D checkpoint, and its word-level text branch. Equal to antoine77340/S3D_HowTo100M's `s3dg.py`.

Video: clips (B, T, H, W, 3) in [0, 1] (or uint8 0-255), T, H, W even (the network was trained on
T = 32; H, W from 200 to 256 work) ->
  `mixed_5c` (B, C5) : the spatio-temporal mean of the last inception block (C5 = 1024),
  `video_embedding` (B, E) : Linear(mixed_5c), the joint text-video space (E = 512).
The network, as the reference implements it:
  - space-to-depth stem: each 2x2x2 cube of pixels becomes 24 channels (order dt, dh, dw, rgb), then
    a 2x4x4 convolution whose padding replicates TensorFlow's SAME (pad 1 | 2 on the low side less one);
  - 3D max pools padded the reference's way: `max(k - s, 0)` zeros split low/high (floor low), then
    ceil-mode windows (a window may run past the end);
  - separable 3D convolutions (1xkxk then kx1x1, each with BatchNorm in eval mode and ReLU), and
    self-gating (x * sigmoid(Linear(mean over T, H, W))) after conv_2c and on every inception branch.
Text: a sentence -> lower case -> words `[\\w']+` -> ids in the word dictionary (`s3d_dict.npy`,
1-based; unknown words dropped, then the first 16 kept, zero-padded) -> 300-d word embeddings ->
Linear 2048 + ReLU -> max over the 16 positions (padding positions included, as the reference: id 0
is a real row of the embedding) -> Linear -> `text_embedding` (B, E).

Weights: `s3d_howto100m.pth` (a plain state dict) and `s3d_dict.npy`, published with the reference
code. Every dimension is read from the state dict, so a narrower S3D loads too.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eao_jax.extract import weights
from eao_jax.extract.runner import Runner
from eao_jax.model.layers import BatchNorm

# Inception blocks in order, and the max pool (window, stride) that precedes a block, if any.
BLOCKS = ("mixed_3b", "mixed_3c", "mixed_4b", "mixed_4c", "mixed_4d", "mixed_4e", "mixed_4f", "mixed_5b",
          "mixed_5c")
_POOL_BEFORE = {"mixed_3b": ((1, 3, 3), (1, 2, 2)), "mixed_4b": ((3, 3, 3), (2, 2, 2)),
                "mixed_5b": ((2, 2, 2), (2, 2, 2))}
# An inception block's six widths: branch 0 (1x1), branch 1 (1x1 then 3x3x3), branch 2 (1x1 then
# 3x3x3), branch 3 (max pool then 1x1).
_BRANCHES = ("conv_b0", "conv_b1_a", "conv_b1_b", "conv_b2_a", "conv_b2_b", "conv_b3_b")
MAX_WORDS = 16
_WORD = re.compile(r"[\w']+")


@dataclasses.dataclass(frozen=True)
class S3DConfig:
    """Widths of an S3D (defaults: the released model's)."""

    stem: int = 64
    conv_2b: int = 64
    conv_2c: int = 192
    blocks: tuple[tuple[int, ...], ...] = (
        (64, 96, 128, 16, 32, 32), (128, 128, 192, 32, 96, 64), (192, 96, 208, 16, 48, 64),
        (160, 112, 224, 24, 64, 64), (128, 128, 256, 24, 64, 64), (112, 144, 288, 32, 64, 64),
        (256, 160, 320, 32, 128, 128), (256, 160, 320, 32, 128, 128), (384, 192, 384, 48, 128, 128))
    embed_dim: int = 512
    vocab_size: int = 66250  # rows of the word embedding (dictionary size + 1)
    word_dim: int = 300
    text_hidden: int = 2048

    @property
    def mixed_5c_dim(self) -> int:
        b = self.blocks[-1]
        return b[0] + b[2] + b[4] + b[5]


# ------------------------------------------------------------------------------------------------
# Layers


def _conv(cin: int, cout: int, window: Sequence[int], padding: Sequence[tuple[int, int]], rngs: nnx.Rngs) -> nnx.Conv:
    return nnx.Conv(cin, cout, tuple(window), padding=tuple(padding), use_bias=False, rngs=rngs)


def _bn(c: int) -> BatchNorm:
    bn = BatchNorm(c)
    bn.use_running_average = True  # extraction only: the checkpoint's running statistics
    return bn


class STConv3D(nnx.Module):
    """Conv -> BatchNorm -> ReLU. `separable`: the window (k, k, k) split into a (1, k, k) and a (k, 1, 1)
    convolution, each followed by BatchNorm and ReLU. (B, T, H, W, cin) -> (B, T', H', W', cout)."""

    def __init__(self, cin: int, cout: int, window: Sequence[int] = (1, 1, 1),
                 padding: Sequence[tuple[int, int]] = ((0, 0),) * 3, *, separable: bool = False, rngs: nnx.Rngs):
        if separable:
            (pt, ph, pw), (kt, kh, kw) = padding, window
            self.conv1 = _conv(cin, cout, (1, kh, kw), [(0, 0), ph, pw], rngs)
            self.conv2 = _conv(cout, cout, (kt, 1, 1), [pt, (0, 0), (0, 0)], rngs)
            self.bn2 = _bn(cout)
        else:
            self.conv1 = _conv(cin, cout, window, padding, rngs)
            self.conv2 = self.bn2 = None
        self.bn1 = _bn(cout)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.conv2 is not None:
            x = jax.nn.relu(self.bn2(self.conv2(x)))
        return x


def _separable(cin: int, cout: int, rngs: nnx.Rngs) -> STConv3D:
    return STConv3D(cin, cout, (3, 3, 3), ((1, 1),) * 3, separable=True, rngs=rngs)


class SelfGating(nnx.Module):
    """x * sigmoid(Linear(mean of x over T, H, W)), per channel. (B, T, H, W, C) -> same."""

    def __init__(self, c: int, *, rngs: nnx.Rngs):
        self.fc = nnx.Linear(c, c, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        w = jax.nn.sigmoid(self.fc(x.mean(axis=(1, 2, 3))))
        return x * w[:, None, None, None, :]


def _max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int], pads: Sequence[tuple[int, int]]
              ) -> jax.Array:
    """Max over (T, H, W) windows of (B, T, H, W, C); `pads` outside the input count as -inf."""
    return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max, (1, *window, 1), (1, *strides, 1),
                                 ((0, 0), *pads, (0, 0)))


def tf_same_max_pool(x: jax.Array, window: Sequence[int], strides: Sequence[int]) -> jax.Array:
    """The reference's `MaxPool3dTFPadding`: zero padding of max(k - s, 0) per axis (the smaller half
    first), then a ceil-mode max pool (the last window may run past the padded input; a window that
    would start past it is dropped). (B, T, H, W, C) -> (B, T', H', W', C)."""
    zero_pads, tails = [], []
    for size, k, s in zip(x.shape[1:4], window, strides, strict=True):
        total = max(k - s, 0)
        zero_pads.append((total // 2, total - total // 2))
        padded = size + total
        n_out = -(-(padded - k) // s) + 1
        if (n_out - 1) * s >= padded:
            n_out -= 1
        tails.append((0, max((n_out - 1) * s + k - padded, 0)))
    x = jnp.pad(x, ((0, 0), *zero_pads, (0, 0)))
    return _max_pool(x, window, strides, tails)


class InceptionBlock(nnx.Module):
    """Four gated branches concatenated: 1x1 | 1x1, sep 3x3x3 | 1x1, sep 3x3x3 | max 3x3x3, 1x1.
    (B, T, H, W, cin) -> (B, T, H, W, b0 + b1b + b2b + b3b)."""

    def __init__(self, cin: int, widths: Sequence[int], *, rngs: nnx.Rngs):
        b0, b1a, b1b, b2a, b2b, b3b = widths
        self.conv_b0 = STConv3D(cin, b0, rngs=rngs)
        self.conv_b1_a = STConv3D(cin, b1a, rngs=rngs)
        self.conv_b1_b = _separable(b1a, b1b, rngs)
        self.conv_b2_a = STConv3D(cin, b2a, rngs=rngs)
        self.conv_b2_b = _separable(b2a, b2b, rngs)
        self.conv_b3_b = STConv3D(cin, b3b, rngs=rngs)
        self.gating_b0, self.gating_b1 = SelfGating(b0, rngs=rngs), SelfGating(b1b, rngs=rngs)
        self.gating_b2, self.gating_b3 = SelfGating(b2b, rngs=rngs), SelfGating(b3b, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b0 = self.gating_b0(self.conv_b0(x))
        b1 = self.gating_b1(self.conv_b1_b(self.conv_b1_a(x)))
        b2 = self.gating_b2(self.conv_b2_b(self.conv_b2_a(x)))
        b3 = self.gating_b3(self.conv_b3_b(_max_pool(x, (3, 3, 3), (1, 1, 1), [(1, 1)] * 3)))
        return jnp.concatenate([b0, b1, b2, b3], axis=-1)


class SentenceEmbedding(nnx.Module):
    """Word ids (B, L) int (0 = padding) -> (B, embed_dim): max over L of ReLU(Linear(embedding)), then Linear."""

    def __init__(self, cfg: S3DConfig, *, rngs: nnx.Rngs):
        self.word_embd = nnx.Embed(cfg.vocab_size, cfg.word_dim, rngs=rngs)
        self.fc1 = nnx.Linear(cfg.word_dim, cfg.text_hidden, rngs=rngs)
        self.fc2 = nnx.Linear(cfg.text_hidden, cfg.embed_dim, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        chex.assert_rank(ids, 2)
        chex.assert_type(ids, int)
        x = jax.nn.relu(self.fc1(self.word_embd(ids)))
        return self.fc2(x.max(axis=1))


def space_to_depth(x: jax.Array) -> jax.Array:
    """(B, T, H, W, C) -> (B, T/2, H/2, W/2, 8C), channels ordered (dt, dh, dw, c) as the reference."""
    b, t, h, w, c = x.shape
    x = x.reshape(b, t // 2, 2, h // 2, 2, w // 2, 2, c)
    x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(b, t // 2, h // 2, w // 2, 8 * c)


class S3DVideo(nnx.Module):
    """The video network; see the module docstring. Attribute names follow the reference's modules."""

    def __init__(self, cfg: S3DConfig, *, rngs: nnx.Rngs):
        # 2x4x4 over the space-to-depth input; the reference pads (1, 2, 2) and drops the first output
        # of each axis, which is a (0, 1) | (1, 2) | (1, 2) padding.
        self.conv1 = STConv3D(24, cfg.stem, (2, 4, 4), ((0, 1), (1, 2), (1, 2)), rngs=rngs)
        self.conv_2b = STConv3D(cfg.stem, cfg.conv_2b, rngs=rngs)
        self.conv_2c = _separable(cfg.conv_2b, cfg.conv_2c, rngs)
        self.gating = SelfGating(cfg.conv_2c, rngs=rngs)
        cin = cfg.conv_2c
        for name, widths in zip(BLOCKS, cfg.blocks, strict=True):
            setattr(self, name, InceptionBlock(cin, widths, rngs=rngs))
            cin = widths[0] + widths[2] + widths[4] + widths[5]
        self.fc = nnx.Linear(cin, cfg.embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x (B, T, H, W, 3): floats in [0, 1], or uint8 0-255; T, H, W even.
        Returns (mixed_5c (B, C5), video_embedding (B, E))."""
        chex.assert_rank(x, 5)
        _, t, h, w, c = x.shape
        if c != 3 or t % 2 or h % 2 or w % 2:
            raise ValueError(f"S3D takes clips (B, T, H, W, 3) with T, H, W even; got {x.shape}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            x = x.astype(self.fc.kernel.dtype) / 255
        net = self.conv1(space_to_depth(x))
        net = tf_same_max_pool(net, (1, 3, 3), (1, 2, 2))  # maxpool_2a
        net = self.gating(self.conv_2c(self.conv_2b(net)))
        for name in BLOCKS:
            if name in _POOL_BEFORE:
                net = tf_same_max_pool(net, *_POOL_BEFORE[name])
            net = getattr(self, name)(net)
        mixed_5c = net.mean(axis=(1, 2, 3))
        return mixed_5c, self.fc(mixed_5c)


class S3D(nnx.Module):
    """`video_net` (S3DVideo: clips -> mixed_5c, video_embedding) and `text_module` (SentenceEmbedding:
    word ids -> text_embedding)."""

    def __init__(self, cfg: S3DConfig = S3DConfig(), *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.video_net = S3DVideo(cfg, rngs=rngs)
        self.text_module = SentenceEmbedding(cfg, rngs=rngs)


def _torch_key(path: tuple) -> str:
    # The reference keeps the video layers at the top level of its state dict.
    return weights.torch_key(path[1:] if path[0] == "video_net" else path)


# ------------------------------------------------------------------------------------------------
# Weights and the word dictionary


def infer_config(sd: weights.StateDict) -> S3DConfig:
    """Every width from the state dict's shapes (missing keys named)."""
    stem_shape = sd.shape("conv1.conv1.weight")
    if len(stem_shape) != 5 or stem_shape[1:] != (24, 2, 4, 4):
        raise weights.WeightsError(f"{sd.source}: conv1.conv1.weight has shape {stem_shape}, expected (C, 24, 2, 4, 4) "
                                   "(the space-to-depth stem of s3d_howto100m.pth)")
    blocks = tuple(tuple(sd.shape(f"{blk}.{br}.conv1.weight")[0] for br in _BRANCHES) for blk in BLOCKS)
    vocab, word_dim = sd.shape("text_module.word_embd.weight")
    return S3DConfig(stem=stem_shape[0], conv_2b=sd.shape("conv_2b.conv1.weight")[0],
                     conv_2c=sd.shape("conv_2c.conv1.weight")[0], blocks=blocks,
                     embed_dim=sd.shape("fc.weight")[0], vocab_size=vocab, word_dim=word_dim,
                     text_hidden=sd.shape("text_module.fc1.weight")[0])


def from_state_dict(state: dict[str, np.ndarray], source: str) -> S3D:
    """An S3D holding `state`'s weights (BatchNorm running statistics included); WeightsError naming
    any missing, mis-shaped or unexpected key."""
    sd = weights.StateDict(state, source)
    cfg = infer_config(sd)
    model = weights.fill_nnx(nnx.eval_shape(lambda: S3D(cfg, rngs=nnx.Rngs(0))), sd, _torch_key)
    sd.skip(k for k in state if k.endswith(".num_batches_tracked"))
    sd.finish()
    return model


def load(path: str | os.PathLike) -> S3D:
    """S3D from `s3d_howto100m.pth` (read without torch; its code is never run)."""
    return from_state_dict(weights.load_state_dict(path), os.fspath(path))


class _NpyObjectUnpickler(pickle.Unpickler):
    """An object array's pickle as `np.save` writes it: only numpy's array, dtype and string-scalar
    reconstruction are admitted, so its entries can only be plain values (str, numpy str, numbers)."""

    def find_class(self, module: str, name: str):
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return _empty_array if name == "_reconstruct" else _string_scalar
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return _word_dtype
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a word dictionary holds only an array "
                                     "of strings")


def _empty_array(cls: Any, shape: Any, dtype: Any) -> np.ndarray:
    if cls is not np.ndarray or tuple(shape) != (0,):
        raise pickle.UnpicklingError("only numpy's own array pickling is read")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)  # filled (and resized) by its __setstate__


def _word_dtype(spec: Any, *args: Any) -> np.dtype:
    if not isinstance(spec, str) or not re.fullmatch(r"O8|[US]\d+", spec):
        raise pickle.UnpicklingError(f"dtype {spec!r} in a word array")
    return np.dtype(spec, False, True)  # a copy, as numpy's own unpickling makes (its state is set next)


def _string_scalar(dtype: Any, data: Any) -> Any:
    """numpy's str / bytes scalars (an array's entries when it was built from numpy strings)."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in "US" or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a string")
    return np.frombuffer(data, dtype, count=1)[0]


def load_word_dict(path: str | os.PathLike) -> dict[str, int]:
    """`s3d_dict.npy` as {word: id}: ids are 1-based (0 pads), a repeated word keeps its last id (as the
    reference's dict). A string array is read with `allow_pickle=False`; an object array's pickle only
    through `_NpyObjectUnpickler` (never numpy's unrestricted one)."""
    source = os.fspath(path)
    if not os.path.exists(source):
        raise FileNotFoundError(f"{source}: no such word dictionary")
    with open(source, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            shape, _, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                               else np.lib.format.read_array_header_2_0(f))
        except ValueError as e:
            raise ValueError(f"{source}: not a .npy file ({e})") from None
        if len(shape) != 1:
            raise ValueError(f"{source}: expected a 1-D array of words, got shape {shape}")
        if dtype.hasobject:
            try:
                words = _NpyObjectUnpickler(f).load()
            except Exception as e:
                raise ValueError(f"{source}: {e}") from None
        elif dtype.kind in "US":
            if shape[0] * dtype.itemsize > os.path.getsize(source) - f.tell():  # never allocate past the file
                raise ValueError(f"{source}: truncated: its header announces {shape[0]} words of {dtype}")
            f.seek(0)
            words = np.load(f, allow_pickle=False)
        else:
            raise ValueError(f"{source}: expected an array of words, got dtype {dtype}")
    if not isinstance(words, np.ndarray) or words.shape != tuple(shape):
        raise ValueError(f"{source}: the word array does not match its header shape {shape}")
    out = {}
    for i, w in enumerate(words.tolist()):
        if isinstance(w, bytes):
            w = w.decode("utf-8")
        if not isinstance(w, str):
            raise ValueError(f"{source}: entry {i} is a {type(w).__name__}, not a word")
        out[w] = i + 1
    return out


def word_ids(sentences: Sequence[str], vocab: dict[str, int], max_words: int = MAX_WORDS) -> np.ndarray:
    """(N, max_words) int32 as the reference tokenises: lower case, `[\\w']+` words, words not in
    `vocab` dropped, the first `max_words` kept, zero padding."""
    out = np.zeros((len(sentences), max_words), np.int32)
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise TypeError(f"sentence {i} is a {type(s).__name__}, not a str")
        ids = [vocab[w] for w in _WORD.findall(s.lower()) if w in vocab][:max_words]
        out[i, :len(ids)] = ids
    return out


# ------------------------------------------------------------------------------------------------
# Extraction


def window_starts(n_frames: int, stride: int) -> np.ndarray:
    """Start frame of each window: one every `stride` frames while a window starts inside the video
    (ceil(n_frames / stride) windows); the last ones reach past the end (see `windows`)."""
    if n_frames < 1:
        raise ValueError("no frames")
    return np.arange(0, n_frames, stride)


def windows(frames: np.ndarray, window: int = 32, stride: int = 16) -> np.ndarray:
    """(N, H, W, 3) frames -> (ceil(N / stride), window, H, W, 3) clips starting every `stride` frames;
    frames past the end repeat the last one (so a video of any length gives one clip per stride)."""
    chex.assert_rank(frames, 4)
    starts = window_starts(frames.shape[0], stride)
    idx = np.minimum(starts[:, None] + np.arange(window)[None], frames.shape[0] - 1)
    return frames[idx]


class Extractor:
    """S3D jitted over fixed-shape batches (`Runner`): `video(clips)` and `text(sentences)`.

    Args:
      model: an S3D (`load`).
      vocab: {word: id} (`load_word_dict`), for `text`.
      batch_size: clips (or sentences) per device call.
      compute_dtype: jnp.bfloat16 on accelerators.
    """

    def __init__(self, model: S3D, vocab: dict[str, int] | None = None, *, batch_size: int = 8,
                 compute_dtype: Any = jnp.float32, devices: list | None = None):
        self.vocab, self._c5, self._rows = vocab, model.cfg.mixed_5c_dim, model.cfg.vocab_size
        self.video_runner = Runner(model.video_net, lambda m, x: jnp.concatenate(m(x), axis=-1), batch_size,
                             compute_dtype=compute_dtype, devices=devices)
        self.text_runner = Runner(model.text_module, lambda m, ids: m(ids), batch_size, compute_dtype=compute_dtype,
                            devices=devices)

    def video(self, clips: np.ndarray) -> dict[str, np.ndarray]:
        """clips (N, T, H, W, 3) uint8 (or float in [0, 1]) -> {"mixed_5c": (N, C5), "video_embedding": (N, E)}."""
        out = self.video_runner(clips)
        return {"mixed_5c": out[:, :self._c5], "video_embedding": out[:, self._c5:]}

    def text(self, sentences: Sequence[str]) -> np.ndarray:
        """(N,) sentences -> text_embedding (N, E)."""
        if self.vocab is None:
            raise ValueError("text needs the word dictionary (s3d_dict.npy): Extractor(model, load_word_dict(path))")
        ids = word_ids(sentences, self.vocab)
        if ids.max(initial=0) >= self._rows:  # the reference fails on such a word too (an index error)
            word = next(w for w, i in self.vocab.items() if i == ids.max())
            raise ValueError(f"word {word!r} has id {ids.max()} in the dictionary, past the checkpoint's "
                             f"{self._rows} word embeddings")
        return self.text_runner(ids)


def benchmark(batch_size: int = 4, frames: int = 32, size: int = 256, repeats: int = 3,
              compute_dtype: Any = jnp.float32, cfg: S3DConfig = S3DConfig()) -> dict[str, Any]:
    """The S3D video network (full size by default; random weights) on (batch_size, frames, size,
    size, 3) uint8 clips: clips per second on this machine and XLA's FLOPs per clip (`runner.measure`:
    rows_per_s = clips per second, flops_per_row = FLOPs per clip)."""
    from eao_jax.extract.runner import measure  # noqa: PLC0415

    model = S3DVideo(cfg, rngs=nnx.Rngs(0))
    runner = Runner(model, lambda m, x: m(x)[0], batch_size, compute_dtype=compute_dtype)
    clips = np.random.default_rng(0).integers(0, 256, (runner.batch_size, frames, size, size, 3), np.uint8)
    return {"backbone": "s3d", "clip_shape": [frames, size, size], **measure(runner, clips, repeats)}
