"""CLS token instead of mean pooling (fusion design ablation; released ablation/fusion_design/cls_token.yaml).

A learned CLS token is prepended to every group of a pass; its output, through one shared final
projection (individual_projections False, required with a CLS token), is the embedding.
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.use_cls_token = True
    c.model.individual_projections = False
    return c
