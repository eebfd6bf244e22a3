"""The 2D and 3D feature recipes from decoded frames (video_feature_extractor: video_loader.py,
preprocessing.py, extract.py), channels last.

Decoding is the decoder's job: ffmpeg's `fps` filter, then `scale` to `output_size(h, w, size)`
(short side `size`, aspect kept, no crop), for 3D then a centre crop at `crop_offsets`, as rgb24.
The `scale` filter's default interpolation is ffmpeg's (bilinear up to 4.x, bicubic from 5.0) and
moves 2D features by up to ~7e-4: the decoder must name the one it uses.

- 2D (`RECIPE_2D`): 1 frame/s, short side 224; x / 255, then (x - ImageNet mean) / (std + 1e-8);
  ResNet-152, spatial mean, L2 -> one 2048-d row per frame.
- 3D (`RECIPE_3D`): 24 frames/s, short side 112, centre crop 112 x 112; 0-255 scale; zero frames
  appended up to a multiple of 16 BEFORE the mean (110.6, 103.2, 96.3) is subtracted (so padding
  frames hold -mean); non-overlapping 16-frame clips; ResNeXt-101, L2 -> one 2048-d row per 16
  frames (1.5 per second).

The features are L2-normalised float32; the released files hold them as float16 (`FEATURE_DTYPE`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np

from eao_jax.extract import resnet, resnext
from eao_jax.extract.decode import crop_offsets, output_size  # noqa: F401 (the recipes' sizes)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
KINETICS_MEAN = (110.6, 103.2, 96.3)  # the 3D network's input mean, on the 0-255 scale (std 1)
STD_EPS = 1e-8  # the reference adds it to the std (in float32: no-op for std 1)
CLIP_FRAMES = 16
FEATURE_DTYPE = np.float16


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected decoded rgb24 frames, uint8 (N, H, W, 3); got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0:
        raise ValueError("the video decoded to no frames")
    return frames


def normalize(x: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(x - mean) / (std + 1e-8) over the last (channel) axis, in float32 as the reference."""
    eps = np.float32(STD_EPS)
    return (x - np.asarray(mean, np.float32)) / (np.asarray(std, np.float32) + eps)


def frames_2d(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 -> (N, H, W, 3) float32 ResNet-152 input."""
    x = _check_frames(frames).astype(np.float32) / np.float32(255.0)
    return normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def clips_3d(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) uint8 (the recipe's H = W = 112) -> (ceil(N / 16), 16, H, W, 3) float32 clips:
    zero frames appended to a multiple of 16 first, then the mean subtracted from all of them."""
    x = _check_frames(frames).astype(np.float32)
    pad = -x.shape[0] % CLIP_FRAMES
    if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), np.float32)])
    x = normalize(x, KINETICS_MEAN, (1.0, 1.0, 1.0))
    return x.reshape(-1, CLIP_FRAMES, *x.shape[1:])


@dataclasses.dataclass(frozen=True)
class Recipe:
    """How one feature type is made: decode at `fps` with short side `size` (and a centre
    `size` x `size` crop when `center_crop`), `prepare` the uint8 frames, run `apply(model, batch)`
    (L2-normalised float32 rows, e.g. through `runner.Runner`)."""

    name: str
    fps: float
    size: int
    center_crop: bool
    prepare: Callable[[np.ndarray], np.ndarray]
    apply: Callable[[resnet.ResNet, jax.Array], jax.Array]
    frames_per_feature: int


RECIPE_2D = Recipe("2d", fps=1, size=224, center_crop=False, prepare=frames_2d, apply=resnet.features,
                   frames_per_feature=1)
RECIPE_3D = Recipe("3d", fps=24, size=112, center_crop=True, prepare=clips_3d, apply=resnext.features,
                   frames_per_feature=CLIP_FRAMES)
