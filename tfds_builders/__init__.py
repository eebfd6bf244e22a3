"""TFDS builders of eao_jax: the released feature layouts converted once to ArrayRecord.

One `GeneratorBasedBuilder` per dataset, prepared from Python without TensorFlow
(`python -m eao_jax.prepare --dataset=NAME --manual_dir=... --data_dir=...`):

  howto100m        HowTo100M features + spectrograms + ASR captions (configs resnet, s3d, clip, *_fp32)
  msrvtt           released MSR-VTT pickles (configs resnet, s3d, clip)
  youcook2         released YouCook2 pickles (configs resnet, s3d, clip)
  crosstask        CrossTask step localisation (config resnet)
  mining_youtube   Mining YouTube step localisation (config resnet)
  synthetic        the learnable synthetic default (configs tiny, default); needs no manual files

Record fields and the files written beside the records are described in `tfds_builders.common`.
"""

from __future__ import annotations

import importlib

BUILDERS = {
    "howto100m": ("tfds_builders.howto100m", "Howto100m"),
    "msrvtt": ("tfds_builders.msrvtt", "Msrvtt"),
    "youcook2": ("tfds_builders.youcook2", "Youcook2"),
    "crosstask": ("tfds_builders.crosstask", "Crosstask"),
    "mining_youtube": ("tfds_builders.mining_youtube", "MiningYoutube"),
    "synthetic": ("tfds_builders.synthetic", "Synthetic"),
}


def builder_class(name: str):
    """The builder class of a dataset name (imported on demand)."""
    if name not in BUILDERS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(BUILDERS)}")
    module, cls = BUILDERS[name]
    return getattr(importlib.import_module(module), cls)
