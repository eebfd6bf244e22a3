"""DAVEnet (ResDavenet) audio CNN and the audio-token helpers around it.

The original treats the (40, T) log-mel spectrogram as a 1-channel image: a (40 x 1) stem conv
collapses the mel axis, then every conv is (1 x k) along time. Here that is written directly as
1-D convolutions over time on (B, T, C): the stem is a bias-free dense map over the 40 mel bins.
Layouts: v2 (paper) 6 stages [2,2,1,1,1,1] -> T/64; v1 4 stages [2,2,2,2] -> T/16. Any length T
works where the original's does: each stride-2 stage (kernel 9, padding 4) maps L to ceil(L / 2), and
the frame mask is max-pooled to the tokens with kernel = stride = ceil(T / tokens) (see
`audio_token_count`, `downsample_audio_mask`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from eao_jax.model.layers import BatchNorm, shard_batch


def _conv(cin: int, cout: int, kernel: int, stride: int, *, rngs: nnx.Rngs, dtype) -> nnx.Conv:
    # The original's init: N(0, sqrt(2 / (kh * kw * out_channels))).
    std = math.sqrt(2.0 / (kernel * cout))
    pad = kernel // 2
    return nnx.Conv(cin, cout, kernel_size=(kernel,), strides=(stride,), padding=[(pad, pad)],
                    use_bias=False, kernel_init=jax.nn.initializers.normal(std), dtype=dtype,
                    param_dtype=jnp.float32, rngs=rngs)


def _conv1d_xla(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    # What nnx.Conv computes: (B, T, Cin) * (k, Cin, Cout), zero padding k // 2 on both sides.
    pad = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (stride,), [(pad, pad)], dimension_numbers=("NWC", "WIO", "NWC"))


def _reversed_input_grad(w: jax.Array, dy: jax.Array, t_in: int, stride: int) -> jax.Array:
    """dx of `_conv1d_xla` as a correlation of the time-reversed (dilated) dy with the kernel,
    reversed back. The kernel then needs only its in/out channels swapped (a plain transpose),
    not the spatially reversed transposed copy XLA:CPU otherwise makes of every kernel each step."""
    k = w.shape[0]
    pad = k // 2
    dilated = stride * (dy.shape[1] - 1) + 1
    lo, hi = t_in + pad - dilated, k - 1 - pad
    r = lax.conv_general_dilated(dy[:, ::-1], w, (1,), [(lo, hi)], lhs_dilation=(stride,),
                                 dimension_numbers=("NWC", "WOI", "NWC"))
    return r[:, ::-1]


def _use_reversed_input_grad(x: jax.Array, w: jax.Array, dy: jax.Array) -> bool:
    # Measured on XLA:CPU (2 cores, fp32): it wins when the kernel outweighs the activations that
    # get reversed (dy and dx); elsewhere, and on other backends, XLA's own transpose is kept.
    k, cin, cout = w.shape
    return jax.default_backend() == "cpu" and k * cin * cout > x.shape[0] * (x.shape[1] * cin + dy.shape[1] * cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv1d(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """1-D convolution over time with `k // 2` zero padding: (B, T, Cin), (k, Cin, Cout) ->
    (B, ceil(T / stride), Cout). The forward pass and the kernel gradient are XLA's convolution;
    the input gradient may take the reversed form above (same values up to float rounding)."""
    return _conv1d_xla(x, w, stride)


def _conv1d_fwd(x: jax.Array, w: jax.Array, stride: int):
    return _conv1d_xla(x, w, stride), (x, w)


def _conv1d_bwd(stride: int, res, dy: jax.Array):
    x, w = res
    dw = jax.vjp(lambda w_: _conv1d_xla(x, w_, stride), w)[1](dy)[0]
    if _use_reversed_input_grad(x, w, dy):
        dx = _reversed_input_grad(w, dy, x.shape[1], stride)
    else:
        dx = jax.vjp(lambda x_: _conv1d_xla(x_, w, stride), x)[1](dy)[0]
    return dx, dw


conv1d.defvjp(_conv1d_fwd, _conv1d_bwd)


def _apply_conv(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """`conv(x)` (its kernel, stride and compute dtype) through `conv1d`."""
    w = conv.kernel[...]
    dtype = conv.dtype or jnp.result_type(x.dtype, w.dtype)
    stride = conv.strides[0] if isinstance(conv.strides, Sequence) else int(conv.strides)
    return conv1d(x.astype(dtype), w.astype(dtype), int(stride))


class BasicBlock(nnx.Module):
    """conv(k, stride) -> BN -> ReLU -> conv(k) -> BN, plus shortcut (1x1 conv stride + BN when the
    shape changes), then ReLU. (B, T, Cin) -> (B, ceil(T / stride), Cout)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, *, momentum: float, eps: float,
                 rngs: nnx.Rngs, dtype):
        self.conv1 = _conv(cin, cout, kernel, stride, rngs=rngs, dtype=dtype)
        self.bn1 = BatchNorm(cout, momentum=momentum, eps=eps)
        self.conv2 = _conv(cout, cout, kernel, 1, rngs=rngs, dtype=dtype)
        self.bn2 = BatchNorm(cout, momentum=momentum, eps=eps)
        if stride != 1 or cin != cout:
            self.down_conv = _conv(cin, cout, 1, stride, rngs=rngs, dtype=dtype)
            self.down_bn = BatchNorm(cout, momentum=momentum, eps=eps)
        else:
            self.down_conv = None
            self.down_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(shard_batch(_apply_conv(self.conv1, x))))
        out = self.bn2(shard_batch(_apply_conv(self.conv2, out)))
        residual = x if self.down_conv is None else self.down_bn(shard_batch(_apply_conv(self.down_conv, x)))
        return jax.nn.relu(out + residual)


def audio_token_count(n_frames: int, n_stages: int) -> int:
    """DAVEnet tokens for `n_frames` STFT frames: each stride-2 stage maps L to ceil(L / 2)."""
    n = int(n_frames)
    for _ in range(n_stages):
        n = -(-n // 2)
    return n


def check_audio_length(n_frames: int, n_stages: int) -> None:
    """Raises ValueError for lengths the original cannot run either: its frame mask, max-pooled with
    kernel = stride = ceil(T / tokens), then has fewer entries than DAVEnet has tokens (for example
    130 frames: 3 tokens, a 2-entry mask; the original fails in its attention with a shape error)."""
    n = audio_token_count(n_frames, n_stages)
    coef = -(-int(n_frames) // n)
    if int(n_frames) // coef != n:
        ok = next(t for t in range(int(n_frames), int(n_frames) + 2 ** n_stages + 1)
                  if t // -(-t // audio_token_count(t, n_stages)) == audio_token_count(t, n_stages))
        raise ValueError(
            f"audio of {n_frames} STFT frames gives {n} DAVEnet tokens but a mask of {int(n_frames) // coef} "
            f"(max-pooled by ceil({n_frames} / {n}) = {coef} frames, as the original, which fails on this "
            f"length too); pad the audio and audio_mask with zeros to, e.g., {ok} frames (any multiple of "
            f"{2 ** n_stages} works)")


class DAVEnet(nnx.Module):
    """(B, n_mels, T) log-mel -> (B, audio_token_count(T, len(blocks)), widths[-1]) audio tokens
    (T / 2**len(blocks) when T is a multiple of it)."""

    def __init__(self, *, n_mels: int, blocks: Sequence[int], widths: Sequence[int], kernel: int,
                 bn_momentum: float, bn_eps: float, rngs: nnx.Rngs, dtype, remat: bool = False):
        if len(widths) != len(blocks) + 1:
            raise ValueError(
                f"model.davenet.widths needs one stem width plus one per stage: {len(blocks)} stages "
                f"(model.davenet.blocks={tuple(blocks)}) but {len(widths)} widths")
        self.n_mels = n_mels
        std = math.sqrt(2.0 / (n_mels * widths[0]))
        self.stem = nnx.Linear(n_mels, widths[0], use_bias=False,
                               kernel_init=jax.nn.initializers.normal(std), dtype=dtype,
                               param_dtype=jnp.float32, rngs=rngs)
        self.stem_bn = BatchNorm(widths[0], momentum=bn_momentum, eps=bn_eps)
        stages = []
        cin = widths[0]
        for n_blocks, cout in zip(blocks, widths[1:], strict=True):
            stage = []
            for b in range(n_blocks):
                stage.append(BasicBlock(cin, cout, kernel, 2 if b == 0 else 1, momentum=bn_momentum,
                                        eps=bn_eps, rngs=rngs, dtype=dtype))
                cin = cout
            stages.append(nnx.List(stage))
        self.stages = nnx.List(stages)
        self.downsample = 2 ** len(blocks)
        self.out_dim = widths[-1]
        self.remat = remat

    def __call__(self, spec: jax.Array) -> jax.Array:
        if spec.ndim != 3 or spec.shape[1] != self.n_mels:
            raise ValueError(f"audio must be (B, {self.n_mels}, T), got {spec.shape}")
        x = jnp.swapaxes(spec, 1, 2)  # (B, T, n_mels)
        x = jax.nn.relu(self.stem_bn(shard_batch(self.stem(x))))
        for stage in self.stages:
            for block in stage:
                if self.remat:
                    x = nnx.remat(lambda b, y: b(y))(block, x)
                else:
                    x = block(x)
        return x


def downsample_audio_mask(frame_mask: jax.Array, n_tokens: int) -> jax.Array:
    """(B, T) frame mask -> (B, T // coef) token mask, coef = ceil(T / n_tokens): a token is valid when
    any of its frames is (max-pooling with kernel = stride = coef, as the original; trailing frames that
    fill no window are dropped, as its max_pool1d does). Raises ValueError when that leaves fewer mask
    entries than tokens (the original fails there too, see `check_audio_length`)."""
    b, t = frame_mask.shape
    coef = -(-t // n_tokens)
    n_out = t // coef
    if n_out != n_tokens:
        raise ValueError(f"an audio mask of {t} frames pools to {n_out} entries for {n_tokens} audio tokens "
                         "(the original fails on such lengths too)")
    return frame_mask[:, : n_out * coef].reshape(b, n_out, coef).max(-1)


def pool_audio_tokens(tokens: jax.Array, mask: jax.Array, n_valid: jax.Array, n_out: int,
                      strategy: str) -> tuple[jax.Array, jax.Array]:
    """Reduce (B, N, C) audio tokens to (B, n_out, C) for long-audio evaluation strategies.

    n_valid (B,) is the number of real tokens (audio_STFT_nframes // coef). Items with
    n_valid <= n_out keep their first n_out tokens ("clip"), as the original does; others are
    resampled from their first n_valid tokens: nearest (PyTorch legacy nearest), max_pool /
    avg_pool (adaptive pooling). The mask is the first n_out entries of the token mask.
    """
    b, n, c = tokens.shape
    if strategy == "none" or n <= n_out:
        return tokens, mask
    clip_tok, clip_mask = tokens[:, :n_out], mask[:, :n_out]
    if strategy == "clip":
        return clip_tok, clip_mask
    nv = jnp.maximum(n_valid.astype(jnp.int32), 1)[:, None]  # (B, 1)
    j = jnp.arange(n_out)[None, :]
    if strategy == "nearest":
        scale = nv.astype(jnp.float32) / n_out
        idx = jnp.minimum(jnp.floor(j.astype(jnp.float32) * scale).astype(jnp.int32), nv - 1)
        pooled = jnp.take_along_axis(tokens, idx[..., None], axis=1)
    elif strategy in ("max_pool", "avg_pool"):
        start = (j * nv) // n_out  # (B, n_out)
        end = -((-(j + 1) * nv) // n_out)
        pos = jnp.arange(n)[None, None, :]
        window = (pos >= start[..., None]) & (pos < end[..., None])  # (B, n_out, N)
        if strategy == "max_pool":
            vals = jnp.where(window[..., None], tokens[:, None], -jnp.inf)
            pooled = vals.max(2)
        else:
            w = window.astype(tokens.dtype)
            pooled = jnp.einsum("bon,bnc->boc", w, tokens) / w.sum(-1, keepdims=True)
    else:
        raise ValueError(f"model.audio_pooling must be none|clip|nearest|max_pool|avg_pool, got {strategy!r}")
    use_clip = (n_valid <= n_out)[:, None, None]
    return jnp.where(use_clip, clip_tok, pooled.astype(tokens.dtype)), clip_mask
