"""The 3D recipe's backbone: the 3-D ResNeXt-101 of the HowTo100M authors' `resnext101.pth`
(kenshohara's 3D-ResNets layout as video_feature_extractor's `resnext.py` builds it with
`shortcut_type='B', cardinality=32, sample_size=112, sample_duration=16, last_fc=False`).

That is `eao_jax.extract.resnet`'s bottleneck network in 3-D: a 7x7x7 stem with stride (1, 2, 2),
blocks [3, 4, 23, 3] (inferred from the state dict, as are the widths and the cardinality, 32:
128 / 256 / 512 / 1024 channels inside the blocks, 256 / 512 / 1024 / 2048 out), stride 2 on all
three axes at the first block of stages 2-4 and in the 3x3x3 max-pool, projection shortcuts
(type B: 1x1x1 conv + BN). The head is the reference's AvgPool3d((1, 4, 4), stride 1) and flatten:
a (16, 112, 112) clip leaves a (1, 4, 4) map, so the feature is its mean, 2048-d.
"""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
from jax import lax

from eao_jax.extract.resnet import ResNet, Spec, Stage, build, l2_normalize
from eao_jax.extract.weights import StateDict, load_state_dict

# The reference builds AvgPool3d((ceil(sample_duration / 16), ceil(sample_size / 32), ...)) with
# sample_duration 16, sample_size 112.
POOL_WINDOW = (1, 4, 4)
STEM_STRIDE = (1, 2, 2)

RESNEXT101 = Spec(ndim=3, stem_width=64, stem_stride=STEM_STRIDE, groups=32,
                  stages=(Stage(3, 128, 256), Stage(4, 256, 512), Stage(23, 512, 1024), Stage(3, 1024, 2048)))


def pooled(model: ResNet, clips: jax.Array) -> jax.Array:
    """(N, T, H, W, 3) clips (the recipe's (16, 112, 112)) -> (N, C * T' * H' * W') float32: the
    reference's average pool over (1, 4, 4) windows at stride 1, flattened channel-major as torch's
    `view(N, -1)`; (N, C) when the last map is (1, 4, 4)."""
    chex.assert_rank(clips, 5)
    x = model(clips).astype(jnp.float32)
    n, t, h, w, c = x.shape
    if t < POOL_WINDOW[0] or h < POOL_WINDOW[1] or w < POOL_WINDOW[2]:
        raise ValueError(f"clips of shape {clips.shape[1:4]} leave a ({t}, {h}, {w}) map, smaller than the "
                         f"{POOL_WINDOW} average pool (the recipe's clips are (16, 112, 112))")
    x = lax.reduce_window(x, 0.0, lax.add, (1, *POOL_WINDOW, 1), (1, 1, 1, 1, 1), "VALID") / (
        POOL_WINDOW[0] * POOL_WINDOW[1] * POOL_WINDOW[2])
    return jnp.moveaxis(x, -1, 1).reshape(n, -1)


def features(model: ResNet, clips: jax.Array) -> jax.Array:
    """3D recipe features: (N, 16, 112, 112, 3) clips -> (N, 2048) L2-normalised float32."""
    return l2_normalize(pooled(model, clips))


def from_state_dict(sd: StateDict) -> ResNet:
    """The 3-D ResNeXt of a 3D-ResNets state dict (`resnext101.pth`; any depth, width, cardinality)."""
    return build(sd, 3, STEM_STRIDE)


def load(path: str | os.PathLike) -> ResNet:
    """`from_state_dict` of a .pth file (read without torch; `{'state_dict': ...}` wrappers and
    DataParallel's `module.` prefixes are removed)."""
    return from_state_dict(StateDict(load_state_dict(path), os.fspath(path)))
