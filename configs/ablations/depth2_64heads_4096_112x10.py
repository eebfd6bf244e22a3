"""Two fusion blocks, 64 heads, width 4096, batch 112 videos x 10 clips (fusion transformer ablation;
released ablation/fusion_transformer/2blocks_64heads_4096hidsize_112_10bs.yaml).

Half the videos per step (1,120 clips), so an epoch has twice the steps.
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
    c.data.videos_per_batch = 112
    c.data.clips_per_video = 10
    c.train.steps_per_epoch = 10411  # 1,166,089 videos // 112
    c.eval.every_steps = 10411
    return c
