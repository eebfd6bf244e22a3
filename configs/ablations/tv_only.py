"""Text-video only model (the paper's TV model; released everything_at_once_tv.yaml).

No audio: the model has only the text and video token projections and is trained with the text-video
term (the audio terms of the released config have no embeddings and drop out).
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.modalities = ("text", "video")
    c.loss.weights = ml_collections.ConfigDict(dict(tv=1.0, ta=0.1, va=0.1, t_va=0.0, v_ta=0.0, a_tv=0.0))
    return c
