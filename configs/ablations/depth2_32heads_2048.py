"""Two fusion blocks, 32 heads, width 2048 (fusion transformer ablation;
released ablation/fusion_transformer/2blocks_32heads_2048hiden.yaml).

The token projections map to 2048 and the final projections read 2048 (head dim 64, MLP 2048).
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.depth = 2
    c.model.num_heads = 32
    c.model.embed_dim = 2048
    return c
