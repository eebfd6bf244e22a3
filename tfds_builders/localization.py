"""Shared builder for the step-localisation datasets CrossTask and Mining YouTube.

Manual directory (every location overridable with `paths=`):
  videos.csv                    columns `video_id` (and `task` for CrossTask); option `csv`
  features/<vid>_2d.npy         (T2, 2048) at 1/s; option `features_path`
  features/<vid>_3d.npy         (T3, 2048) at 1.5/s; fallback features/<vid>.npz key `features`
  audio/<vid>.npz               key `arr_0`, (40, T) log-mel at 100/s; option `features_path_audio`
  annotations/<task>_<vid>.npy  CrossTask, binary (T, K), one row per second; option `annot_path`
  annotations/<vid>.npy         Mining YouTube
  steps.json                    CrossTask: task id -> K step texts; Mining YouTube: video id -> steps;
                                option `steps_path`
One record per video (layout "localization") in the split `test`.
"""

from __future__ import annotations

import csv
import json
import os

import numpy as np

from eao_jax.data import validate as V
from tfds_builders import common


def localization_configs() -> list[common.FeatureConfig]:
    return [common.FeatureConfig(name="resnet", description="ResNet-152 (2D) + ResNeXt-101 (3D)",
                                 use_2d=True, use_3d=True, dim_2d=2048, dim_3d=2048)]


class LocalizationBuilder(common.EaoBuilder):
    MINING = False
    PATH_OPTIONS = ("csv", "features_path", "features_path_audio", "annot_path", "steps_path")

    def _layout_fields(self):
        return dict(common.LOCALIZATION_FIELDS)

    def _split_generators(self, dl_manager):
        csv_path = self._path(dl_manager, "csv", "videos.csv")
        if not os.path.exists(csv_path):
            raise FileNotFoundError(f"{csv_path}: video list not found (option `csv`)")
        need = ["video_id"] if self.MINING else ["video_id", "task"]
        with open(csv_path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or any(c not in reader.fieldnames for c in need):
                raise ValueError(f"{csv_path}: needs columns {need}, got {reader.fieldnames}")
            rows = [(r["video_id"], "" if self.MINING else str(r["task"])) for r in reader]
        self._feat = self._path(dl_manager, "features_path", "features")
        self._audio = self._path(dl_manager, "features_path_audio", "audio")
        self._annot = self._path(dl_manager, "annot_path", "annotations")
        self._steps_file = self._path(dl_manager, "steps_path", "steps.json")
        if not os.path.exists(self._steps_file):
            raise FileNotFoundError(f"{self._steps_file}: steps file not found (option `steps_path`)")
        with open(self._steps_file) as f:
            self._steps = json.load(f)
        self.info.metadata["layouts"]["test"] = "localization"
        self._set_complete_size("test", len(rows))
        return {"test": self._generate_examples(rows)}

    def _generate_examples(self, rows):
        def build(vid: str, task: str):
            ex = {"id": vid, "task": task}
            p2 = os.path.join(self._feat, vid + "_2d.npy")
            f2 = V.load_npy(p2, vid) if self.builder_config.use_2d else None
            p3 = os.path.join(self._feat, vid + "_3d.npy")
            if self.builder_config.use_3d:
                if os.path.exists(p3):
                    f3 = V.load_npy(p3, vid)
                else:
                    p3 = os.path.join(self._feat, vid + ".npz")
                    f3 = V.load_npz_key(p3, "features", vid)
            else:
                f3 = None
            ex["features_2d"] = self._features("2d", f2, vid, p2)
            ex["features_3d"] = self._features("3d", f3, vid, p3)
            pa = os.path.join(self._audio, vid + ".npz")
            ex["audio"] = self._spectrogram(V.load_npz_key(pa, "arr_0", vid), vid, pa)
            step_key = vid if self.MINING else task
            if step_key not in self._steps:
                raise V.BadItem(V.NO_CAPTION, vid, self._steps_file, f"no steps for {step_key!r}")
            steps = [V.check_caption(s, vid, self._steps_file) for s in self._steps[step_key]]
            pn = os.path.join(self._annot, (vid if self.MINING else f"{task}_{vid}") + ".npy")
            ann = V.load_npy(pn, vid)
            if ann.ndim != 2 or ann.shape[0] == 0 or ann.shape[1] != len(steps):
                raise V.BadItem(V.BAD_ANNOTATION, vid, pn,
                                f"annotation must be (T > 0, K = {len(steps)} steps), got shape {ann.shape}")
            if not np.isin(ann, (0, 1)).all():
                raise V.BadItem(V.BAD_ANNOTATION, vid, pn, "annotation values must be 0 or 1")
            ex["annotation"] = ann.astype(np.uint8)
            ex["steps"] = steps
            self._add_text(*steps)
            return ex

        return self._validated("test", ((i, lambda v=v, t=t: build(v, t)) for i, (v, t) in enumerate(rows)))
