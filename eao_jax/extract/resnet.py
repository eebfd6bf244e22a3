"""Bottleneck residual networks built from PyTorch state dicts: torchvision's 2-D ResNet-152 (the 2D
feature recipe) and, through `eao_jax.extract.resnext`, the 3-D ResNeXt-101 of the 3D recipe.

Both share one layout, channels last: a 7^d conv stem + BN + ReLU, a 3^d max-pool (stride 2,
padding 1), four stages of bottleneck blocks (1^d conv -> BN -> ReLU -> 3^d conv with the stage's
stride and the group count -> BN -> ReLU -> 1^d conv -> BN; plus the input, or a 1^d strided conv +
BN projection where the shape changes; ReLU). The first block of stages 2-4 has stride 2. BatchNorm
runs in eval mode (running statistics). Their state dicts share the keys too (`conv1`, `bn1`,
`layer{s}.{b}.conv{1,2,3}` / `bn{1,2,3}`, `layer{s}.0.downsample.{0,1}`, `fc`), so `build` reads
both: blocks per stage, widths and group count come from the shapes, every entry is shape-checked,
and a missing, unexpected or mis-shaped entry is named.

The 2D backbone (`from_state_dict`, `features`): (N, H, W, 3) normalised frames -> the last stage's
map (N, ceil(H/32), ceil(W/32), C) -> spatial mean -> L2-normalised (N, C); C = 2048 for ResNet-152
([3, 8, 36, 3] blocks).
"""

from __future__ import annotations

import dataclasses
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from eao_jax.extract.weights import StateDict, WeightsError, load_state_dict
from eao_jax.model import eao
from eao_jax.model.layers import BatchNorm

STAGES = 4
STEM_KERNEL, STEM_PADDING = 7, 3
_BN_EPS = 1e-5  # torch.nn.BatchNorm's default, which both reference networks use
# Our BatchNorm's variables -> the torch names.
_BN_KEYS = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_SHORTCUT_KEYS = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}


@dataclasses.dataclass(frozen=True)
class Stage:
    """`blocks` bottleneck blocks with `width` channels inside (the 3^d conv) and `out` after."""

    blocks: int
    width: int
    out: int


@dataclasses.dataclass(frozen=True)
class Spec:
    """Everything that shapes a network of this family; `build` infers it from a state dict."""

    ndim: int  # spatial dimensions: 2 (frames) or 3 (clips)
    stem_width: int
    stem_stride: tuple[int, ...]
    stages: tuple[Stage, ...]
    groups: int = 1  # of every 3^d conv (ResNeXt's cardinality)
    in_channels: int = 3


RESNET152 = Spec(ndim=2, stem_width=64, stem_stride=(2, 2),
                 stages=(Stage(3, 64, 256), Stage(8, 128, 512), Stage(36, 256, 1024), Stage(3, 512, 2048)))


class Conv(nnx.Module):
    """Bias-free convolution, channels last: (N, *S, cin) -> (N, *S', cout), `padding` zeros on both
    sides of each spatial axis (torch's `padding=p`). Kernel (*kernel, cin // groups, cout)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, ...], stride: tuple[int, ...],
                 padding: tuple[int, ...], groups: int = 1, *, rngs: nnx.Rngs):
        std = math.sqrt(2.0 / (math.prod(kernel) * cout))  # torchvision's kaiming_normal_(fan_out)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (*kernel, cin // groups, cout), jnp.float32))
        self.stride, self.padding, self.groups = tuple(stride), tuple(padding), groups

    def __call__(self, x: jax.Array) -> jax.Array:
        spatial = "DHW"[-(x.ndim - 2):]
        return lax.conv_general_dilated(
            x, self.kernel[...].astype(x.dtype), self.stride, [(p, p) for p in self.padding],
            dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"), feature_group_count=self.groups)


def _bn(features: int) -> BatchNorm:
    bn = BatchNorm(features, eps=_BN_EPS)
    bn.use_running_average = True  # a frozen feature extractor: eval mode only
    return bn


def max_pool(x: jax.Array) -> jax.Array:
    """3^d max-pool, stride 2, padding 1 (padded positions never win, as torch's MaxPool)."""
    nd = x.ndim - 2
    window, strides = (1, *(3,) * nd, 1), (1, *(2,) * nd, 1)
    pad = ((0, 0), *((1, 1),) * nd, (0, 0))
    return lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), lax.max, window, strides, pad)


class Bottleneck(nnx.Module):
    """(N, *S, cin) -> (N, *ceil(S / stride), cout)."""

    def __init__(self, cin: int, width: int, cout: int, stride: int, groups: int, ndim: int, *, rngs: nnx.Rngs):
        one, three, strides = (1,) * ndim, (3,) * ndim, (stride,) * ndim
        self.conv1 = Conv(cin, width, one, one, (0,) * ndim, rngs=rngs)
        self.bn1 = _bn(width)
        self.conv2 = Conv(width, width, three, strides, one, groups, rngs=rngs)
        self.bn2 = _bn(width)
        self.conv3 = Conv(width, cout, one, one, (0,) * ndim, rngs=rngs)
        self.bn3 = _bn(cout)
        if stride != 1 or cin != cout:
            self.downsample_conv = Conv(cin, cout, one, strides, (0,) * ndim, rngs=rngs)
            self.downsample_bn = _bn(cout)
        else:
            self.downsample_conv = self.downsample_bn = None

    def __call__(self, x: jax.Array) -> jax.Array:
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample_conv is None else self.downsample_bn(self.downsample_conv(x))
        return jax.nn.relu(out + shortcut)


class ResNet(nnx.Module):
    """(N, *S, in_channels) -> the last stage's map (N, *S', stages[-1].out); S' = S / 32 for the 2D
    stem (stride 2, 2), rounded up, and (T / 2 / 2 / 2 / 2 rounded up per step, H / 32, W / 32) for
    the 3D stem (stride 1, 2, 2)."""

    def __init__(self, spec: Spec, *, rngs: nnx.Rngs):
        nd = spec.ndim
        self.spec = spec
        self.conv1 = Conv(spec.in_channels, spec.stem_width, (STEM_KERNEL,) * nd, spec.stem_stride,
                          (STEM_PADDING,) * nd, rngs=rngs)
        self.bn1 = _bn(spec.stem_width)
        layers, cin = [], spec.stem_width
        for s, stage in enumerate(spec.stages):
            blocks = []
            for b in range(stage.blocks):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(Bottleneck(cin, stage.width, stage.out, stride, spec.groups, nd, rngs=rngs))
                cin = stage.out
            layers.append(nnx.List(blocks))
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        chex.assert_rank(x, self.spec.ndim + 2)
        chex.assert_axis_dimension(x, -1, self.spec.in_channels)
        x = max_pool(jax.nn.relu(self.bn1(self.conv1(x))))
        for stage in self.layers:
            for block in stage:
                x = block(x)
        return x


def l2_normalize(x: jax.Array) -> jax.Array:
    """Rows of (N, D) divided by max(|row|, 1e-12), as torch.nn.functional.normalize (the model's
    `l2_normalize` with the extractors' eps)."""
    return eao.l2_normalize(x, eps=1e-12)


def pooled(model: ResNet, frames: jax.Array) -> jax.Array:
    """2D: (N, H, W, 3) normalised frames -> (N, C) spatial mean of the last stage, float32."""
    chex.assert_rank(frames, 4)
    return model(frames).astype(jnp.float32).mean(axis=(1, 2))


def features(model: ResNet, frames: jax.Array) -> jax.Array:
    """2D recipe features: (N, H, W, 3) normalised frames -> (N, C) L2-normalised float32."""
    return l2_normalize(pooled(model, frames))


# ------------------------------------------------------------------------------------------------
# State dicts


def _dims(sd: StateDict, key: str, rank: int) -> tuple[int, ...]:
    shape = sd.shape(key)
    if len(shape) != rank:
        raise WeightsError(f"{sd.source}: {key} has shape {shape}, expected {rank} dimensions")
    return shape


def infer_spec(sd: StateDict, ndim: int, stem_stride: tuple[int, ...]) -> Spec:
    """The Spec a state dict describes: stem width, blocks per stage (`layer{s}.{b}` present from
    b = 0), each stage's widths (from its first block) and the group count (from layer1.0.conv2)."""
    rank = ndim + 2
    stem = _dims(sd, "conv1.weight", rank)
    stages = []
    for s in range(1, STAGES + 1):
        n = 0
        while f"layer{s}.{n}.conv1.weight" in sd:
            n += 1
        width = _dims(sd, f"layer{s}.0.conv1.weight", rank)[0]  # names the missing stage when n == 0
        out = _dims(sd, f"layer{s}.0.conv3.weight", rank)[0]
        stages.append(Stage(n, width, out))
    key = "layer1.0.conv2.weight"
    per_group = _dims(sd, key, rank)[1]
    if per_group < 1 or stages[0].width % per_group:
        raise WeightsError(f"{sd.source}: {key} has shape {sd.shape(key)}: {per_group} input channels per group "
                           f"do not divide the block's {stages[0].width} channels")
    return Spec(ndim=ndim, stem_width=stem[0], stem_stride=tuple(stem_stride), stages=tuple(stages),
                groups=stages[0].width // per_group, in_channels=stem[1])


def torch_key(path: tuple) -> str:
    """Our variable path -> its torch state-dict key, e.g. ('layers', 2, 0, 'downsample_bn', 'mean')
    -> 'layer3.0.downsample.1.running_mean'."""
    parts = [str(p) for p in path]
    prefix = ""
    if parts[0] == "layers":
        prefix, parts = f"layer{int(parts[1]) + 1}.{parts[2]}.", parts[3:]
    module, leaf = parts
    return f"{prefix}{_SHORTCUT_KEYS.get(module, module)}.{'weight' if leaf == 'kernel' else _BN_KEYS[leaf]}"


def _torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    # Our kernels are (*k, in, out), torch's (out, in, *k).
    return (shape[-1], shape[-2], *shape[:-2]) if path[-1] == "kernel" else shape


def torch_layout(spec: Spec) -> dict[str, tuple[int, ...]]:
    """The state-dict keys and shapes of the network `spec` describes (the classifier `fc` and
    BatchNorm's `num_batches_tracked` left out); nothing is allocated."""
    state = nnx.state(nnx.eval_shape(lambda: ResNet(spec, rngs=nnx.Rngs(0))))
    return {torch_key(path): _torch_shape(path, tuple(var.shape)) for path, var in nnx.to_flat_state(state)}


def build(sd: StateDict, ndim: int, stem_stride: tuple[int, ...]) -> ResNet:
    """A ResNet holding the state dict's weights; WeightsError naming any missing, mis-shaped,
    non-finite or unexpected entry (the classifier `fc` and BatchNorm's `num_batches_tracked` are
    not used)."""
    spec = infer_spec(sd, ndim, stem_stride)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: ResNet(spec, rngs=nnx.Rngs(0))))
    flat = {}
    for path, var in nnx.to_flat_state(state):
        key = torch_key(path)
        w = sd.take(key, _torch_shape(path, tuple(var.shape)))
        if not np.isfinite(w).all():  # would only surface later as NaN features
            raise WeightsError(f"{sd.source}: {key} holds NaN or Inf values")
        flat[path] = jnp.asarray(np.transpose(w, (*range(2, w.ndim), 1, 0)) if path[-1] == "kernel" else w)
    sd.skip(k for k in sd.state if k.startswith("fc.") or k.endswith(".num_batches_tracked"))
    sd.finish()
    nnx.replace_by_pure_dict(state, _nest(flat))
    return nnx.merge(graphdef, state)


def _nest(flat: dict[tuple, jax.Array]) -> dict:
    nested: dict = {}
    for path, value in flat.items():
        node = nested
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = value
    return nested


def from_state_dict(sd: StateDict) -> ResNet:
    """torchvision's 2-D ResNet (`resnet152-b121ed2d.pth`, IMAGENET1K_V1, or any depth per stage)."""
    return build(sd, 2, (2, 2))


def load(path: str | os.PathLike) -> ResNet:
    """`from_state_dict` of a .pth file (read without torch)."""
    return from_state_dict(StateDict(load_state_dict(path), os.fspath(path)))
