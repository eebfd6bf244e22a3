"""The feature types the extraction job writes, one registry entry each (`FEATURES`).

An entry says where its files go in the released layout (folder, file suffix, npz key), which
decoded frames it reads (a `decode.FrameRecipe`: rate, short side, crop; None for the audio) and how
many frames make one output row, and how its backbone is loaded (from the public PyTorch weights,
through the converters of `eao_jax.extract`) and applied on the device to the decoded uint8 frames
(normalisation inside the jitted call, so the host ships bytes, not floats). Adding a feature type
is one entry here.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

from eao_jax.extract import decode


@dataclasses.dataclass(frozen=True)
class Window:
    """Rows from frames: windows of `frames` frames starting every `stride` frames while a window starts
    inside the video (ceil(n / stride) rows); the last ones reach past the end and are completed with
    black frames (`pad="zeros"`, as the 3D recipe pads before its mean) or the last frame repeated
    (`pad="repeat"`). `frames=1`: a row per frame, no window axis."""

    frames: int = 1
    stride: int = 1
    pad: str = "zeros"

    def __post_init__(self) -> None:
        if self.frames < 1 or self.stride < 1 or self.pad not in ("zeros", "repeat"):
            raise ValueError(f"bad window {self}")


@dataclasses.dataclass(frozen=True)
class Feature:
    """One feature type.

    name: its `--features` value. subdir / suffix / key: `<output>/<subdir>/<path>/<vid><suffix>`,
    npz key. frames: the decoded frames it reads (None: the audio, made on the host). window: how the
    frames make rows (a row per frame by default). apply: `(model, uint8 frames (B, H, W, 3) or windows
    (B, T, H, W, 3)) -> (B, D)` rows, jit-able. load: checkpoint file -> model. checkpoint_flag: the
    command-line flag naming it. prepare_config: the `prepare --dataset=howto100m` config whose slot it
    fills, and `slot` that slot.
    """

    name: str
    subdir: str
    suffix: str
    key: str
    frames: decode.FrameRecipe | None = None
    window: Window = dataclasses.field(default_factory=lambda: Window())
    apply: Callable[[Any, Any], Any] | None = None
    load: Callable[[str], Any] | None = None
    checkpoint_flag: str | None = None
    prepare_config: str | None = None
    slot: str | None = None

    def file(self, path: str) -> str:
        """This feature's file of the video with output path `path`, relative to the output root."""
        vid = path.rsplit("/", 1)[-1]
        return f"{self.subdir}/{path}/{vid}{self.suffix}"

    @property
    def on_device(self) -> bool:
        return self.frames is not None


def _as_input(model: Any, x: Any) -> Any:
    """Normalised pixels in the dtype of the network's first kernel (bfloat16 runs cast there)."""
    return x.astype(model.conv1.kernel[...].dtype)


def _apply_2d(model: Any, frames: Any) -> Any:
    import jax.numpy as jnp  # noqa: PLC0415 (JAX only when a backbone runs)

    from eao_jax.extract import frames as recipe  # noqa: PLC0415
    from eao_jax.extract import resnet  # noqa: PLC0415

    x = recipe.normalize(frames.astype(jnp.float32) / 255.0, recipe.IMAGENET_MEAN, recipe.IMAGENET_STD)
    return resnet.features(model, _as_input(model, x))


def _apply_3d(model: Any, clips: Any) -> Any:
    import jax.numpy as jnp  # noqa: PLC0415

    from eao_jax.extract import frames as recipe  # noqa: PLC0415
    from eao_jax.extract import resnext  # noqa: PLC0415

    x = recipe.normalize(clips.astype(jnp.float32), recipe.KINETICS_MEAN, (1.0, 1.0, 1.0))
    return resnext.features(model, _as_input(model, x))


def _l2(x: Any) -> Any:
    from eao_jax.extract import resnet  # noqa: PLC0415

    return resnet.l2_normalize(x)


def _apply_s3d(model: Any, windows: Any) -> Any:
    """S3D's `mixed_5c` (1024-d, EAO's S3D features) of uint8 windows (the network scales them to [0, 1])."""
    return _l2(model(windows)[0])


def _apply_clip(model: Any, frames: Any) -> Any:
    """CLIP's image features of uint8 frames whose short side is 224: the centre crop as CLIP's
    preprocessing (torchvision's CenterCrop offsets), then the network (which normalises uint8 input)."""
    r = model.resolution
    h, w = frames.shape[1:3]
    top, left = int(round((h - r) / 2.0)), int(round((w - r) / 2.0))
    return _l2(model(frames[:, top:top + r, left:left + r]))


def _load_s3d(path: str) -> Any:
    from eao_jax.extract import s3d  # noqa: PLC0415

    return s3d.load(_local(path)).video_net


def _load_clip(path: str) -> Any:
    from eao_jax.extract import clip  # noqa: PLC0415

    visual = clip.load(_local(path)).visual
    size = FEATURES["clip"].frames.short_side
    if visual.resolution != size:
        raise ValueError(f"{path}: a CLIP for {visual.resolution}x{visual.resolution} images; the clip feature type "
                         f"decodes frames with short side {size}, as ViT-B/32's preprocessing")
    return visual


def _load_2d(path: str) -> Any:
    from eao_jax.extract import resnet  # noqa: PLC0415

    return resnet.load(_local(path))


def _load_3d(path: str) -> Any:
    from eao_jax.extract import resnext  # noqa: PLC0415

    return resnext.load(_local(path))


def _local(path: str) -> str:
    """A checkpoint on an object store, copied to a local temporary file (the readers take files)."""
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: checkpoint file not found")
        return path
    import tempfile  # noqa: PLC0415

    from etils import epath  # noqa: PLC0415

    src = epath.Path(path)
    if not src.exists():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    fd, tmp = tempfile.mkstemp(suffix="_" + src.name)
    with os.fdopen(fd, "wb") as f:
        f.write(src.read_bytes())
    return tmp


FEATURES: dict[str, Feature] = {f.name: f for f in (
    Feature("2d", "features", "_2d.npz", "features", frames=decode.FRAMES_2D, apply=_apply_2d, load=_load_2d,
            checkpoint_flag="checkpoint_2d", prepare_config="resnet", slot="2d"),
    Feature("3d", "features", "_3d.npz", "features", frames=decode.FRAMES_3D, window=Window(16, 16), apply=_apply_3d,
            load=_load_3d, checkpoint_flag="checkpoint_3d", prepare_config="resnet", slot="3d"),
    # EAO's S3D variant: 1024-d mixed_5c, one per second (16 fps, 256 x 256 centre crop, 32-frame windows
    # every 16 frames); released as new_s3d_features/<path>/<vid>.npz.
    Feature("s3d", "new_s3d_features", ".npz", "features", frames=decode.FrameRecipe(fps=16, short_side=256, crop=True),
            window=Window(32, 16, "repeat"), apply=_apply_s3d, load=_load_s3d, checkpoint_flag="checkpoint_s3d",
            prepare_config="s3d", slot="3d"),
    # EAO's CLIP variant: 512-d ViT-B/32 image features, one frame per second.
    Feature("clip", "clip_features", "_2d.npz", "features", frames=decode.FrameRecipe(fps=1, short_side=224),
            apply=_apply_clip, load=_load_clip, checkpoint_flag="checkpoint_clip", prepare_config="clip", slot="2d"),
    Feature("audio", "audio_features", "_spec.npz", "arr_0"),
)}
AUDIO = "audio"


def parse(names: str | list[str]) -> tuple[Feature, ...]:
    """The registry entries of a `--features` value ("2d,3d,audio"), in registry order."""
    items = [n.strip().lower() for n in (names.split(",") if isinstance(names, str) else names)]
    items = [n for n in items if n]
    unknown = [n for n in items if n not in FEATURES]
    if unknown:
        raise ValueError(f"--features: unknown feature type {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(FEATURES)})")
    if not items:
        raise ValueError(f"--features: name at least one of {', '.join(FEATURES)}")
    return tuple(f for f in FEATURES.values() if f.name in items)


def prepare_config(features: tuple[Feature, ...]) -> str:
    """The `prepare --dataset=howto100m` config these features make: every slot of one config plus the
    audio; a ValueError naming what is missing otherwise."""
    names = {f.name for f in features}
    configs = list(dict.fromkeys(f.prepare_config for f in features if f.prepare_config))  # registry order
    for config in configs:
        need = {f.name for f in FEATURES.values() if f.prepare_config == config} | {AUDIO}
        if need <= names:
            return config
    options = "; ".join(
        f"{c}: {','.join(sorted({f.name for f in FEATURES.values() if f.prepare_config == c} | {AUDIO}))}"
        for c in dict.fromkeys(f.prepare_config for f in FEATURES.values() if f.prepare_config))
    raise ValueError(f"--features={','.join(sorted(names))} does not make a HowTo100M dataset; prepare needs "
                     f"one of: {options}")
