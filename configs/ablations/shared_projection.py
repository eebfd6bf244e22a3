"""One shared final projection (fusion design ablation; released ablation/fusion_design/shared_final_proj.yaml).

Mean pooling as the main model, but a single 4096->6144 gated projection for all modalities.
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.individual_projections = False
    return c
