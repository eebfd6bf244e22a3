"""CLIP video features (stronger backbone; released ablation/stronger_backbone/clip.yaml).

CLIP ViT-B/32 image features (512-d, 1 per second) fill the 2D slot; no 3D features. Prepare
HowTo100M with --config=clip. Deviation: the released config also replaces word2vec by frozen CLIP
text-token features (text_dim 512, use_clip_text_model); eao_jax has no CLIP text encoder, so this
config keeps the 300-d word2vec text input.
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.video_dim = 512
    c.data.tfds_config = "clip"
    return c
