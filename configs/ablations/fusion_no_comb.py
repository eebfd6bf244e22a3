"""Shared fusion transformer without the combinatorial pair terms (released ablation/architecture/fusion_no_comb.yaml).

The same model as the main one, but training runs only the single-modality passes (cross_modal False)
and the tv / ta / va terms (1 / 0.1 / 0.1); fused pairs are still computed at evaluation.
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.cross_modal = False
    c.loss.weights = ml_collections.ConfigDict(dict(tv=1.0, ta=0.1, va=0.1, t_va=0.0, v_ta=0.0, a_tv=0.0))
    return c
