"""Tiny backbones for the extraction job's tests: random-weight ResNets of the real constructors
(`eao_jax.extract.resnet` / `resnext`), one block per stage and a few channels, written as PyTorch
checkpoints (tests/torch_format.py) so the command line loads them as it loads the public weights.

XLA's CPU 3-D convolution takes ~1.5 s per 16x112x112 clip whatever the width (the 7x7x7 stem), so
most job tests use `CHEAP_3D`: the 3D feature type's clips, normalisation and padding, with the tiny
2-D ResNet on each clip's mean frame as the network. The real tiny ResNeXt runs in the end-to-end test.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import torch_format

from eao_jax.extract import features, frames, resnet

DIM = 12  # the feature width: tests/data/tva_small takes 12 + 12 video dims


def tiny_state_dict(ndim: int, seed: int, out: int = DIM) -> dict[str, np.ndarray]:
    stem = (2, 2) if ndim == 2 else (1, 2, 2)
    spec = resnet.Spec(ndim=ndim, stem_width=4, stem_stride=stem, groups=1, stages=(
        resnet.Stage(1, 2, 4), resnet.Stage(1, 2, 6), resnet.Stage(1, 4, 8), resnet.Stage(1, 4, out)))
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in resnet.torch_layout(spec).items():
        if key.endswith(".weight") and len(shape) > 1:  # a conv kernel, torch's (out, in, *k)
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2 / np.prod(shape[1:]))).astype(np.float32)
        elif key.endswith((".weight", ".running_var")):
            sd[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        else:
            sd[key] = (0.1 * rng.standard_normal(shape)).astype(np.float32)
    return sd


def write_checkpoints(folder: str | os.PathLike) -> tuple[str, str]:
    """(2D, 3D) tiny .pth files in `folder`."""
    p2, p3 = os.path.join(folder, "tiny_2d.pth"), os.path.join(folder, "tiny_3d.pth")
    torch_format.save(tiny_state_dict(2, 0), p2)
    torch_format.save(tiny_state_dict(3, 1), p3)
    return p2, p3


def cheap_3d_net(model, clips):
    """The stand-in network on normalised (N, 16, H, W, 3) clips."""
    return resnet.features(model, clips.mean(axis=1))


def _cheap_apply(model, clips):
    return cheap_3d_net(model, frames.normalize(clips, frames.KINETICS_MEAN, (1.0, 1.0, 1.0)))


CHEAP_3D = dataclasses.replace(features.FEATURES["3d"], apply=_cheap_apply, load=None)


def feature_set(names: str, cheap_3d: bool = True) -> tuple[features.Feature, ...]:
    return tuple(CHEAP_3D if (f.name == "3d" and cheap_3d) else f for f in features.parse(names))
