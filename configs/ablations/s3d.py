"""S3D video features (stronger backbone; released ablation/stronger_backbone/s3d.yaml).

S3D features (1024-d, 1 per second) fill the 3D slot; no 2D features. 12 tokens cover 12 s.
Prepare HowTo100M with --config=s3d (the builder config sets the feature files and rate).
"""

import pathlib
import runpy

import ml_collections

BASE = pathlib.Path(__file__).resolve().parents[1] / "howto100m.py"  # the paper's main TVA model


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = runpy.run_path(str(BASE))["get_config"](arg)
    c.model.video_dim = 1024
    c.data.tfds_config = "s3d"
    return c
