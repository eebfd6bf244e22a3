"""Two fusion blocks, 64 heads, width 4096, batch 224 videos x 5 clips (fusion transformer ablation;
released ablation/fusion_transformer/2blocks_64heads_4096hidsize_224_5bs.yaml).

Half the clips per video (1,120 clips per step) with the main model's number of videos per step.
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.depth = 2
    c.model.num_heads = 64
    c.model.embed_dim = 4096
    c.data.videos_per_batch = 224
    c.data.clips_per_video = 5
    return c
