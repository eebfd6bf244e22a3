"""Learned positional embeddings (long-video ablation: the pos_* evaluations of the paper).

Per-modality position embeddings for 12 video, 20 text and 12 audio tokens, added after the masking
token. The authors released only the evaluation configs (pos_*_clips / nearest / max); the training
config is assumed to be the main one plus positional embeddings. Such a model cannot take the 48/72
tokens of "at once": evaluate it with --strategy=clip, nearest, max_pool or clips_average.
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.use_positional_emb = True
    c.model.max_video_tokens = 12
    c.model.max_text_tokens = 20
    c.model.max_audio_tokens = 12
    c.eval.strategy = "clips_average"  # 12-token clips: "at once" would exceed the positional embeddings
    return c
