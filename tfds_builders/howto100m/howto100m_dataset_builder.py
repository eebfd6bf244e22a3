"""HowTo100M pre-training features in the released layout (REFERENCE_FACTS §1.3).

Manual directory (the original's `./data/howto`), every location overridable with `paths=`:
  HowTo100M_1166_videopaths.txt   csv with a `path` column (category/subfolder/video_id; a `None/`
                                  prefix is removed); option `csv`
  caption.pickle                  dict video_id -> {start, end, text} ASR segments; option `caption_path`
  features/<path>/<vid>_2d.npz    key `features`, (T2, 2048) at 1/s; fallback features/<path>_2d.npz;
                                  option `features_path`
  features/<path>/<vid>_3d.npz    key `features`, (T3, 2048) at 1.5/s; fallback <vid>.npz (S3D);
                                  option `features_path_3d` (default: features_path)
  audio_features/<path>/<vid>_spec.npz   key `arr_0`, (40, T) log-mel at 100/s; option `features_path_audio`

Configs: `resnet` (default; ResNet-152 + ResNeXt-101), `s3d` (3D slot only, 1024-d at 1/s, csv
HowTo100M_1166_videopaths_s3d.txt, new_s3d_features/), `clip` (2D slot only, 512-d at 1/s, csv
HowTo100M_1166_videopaths_CLIP.txt, clip_features/). Features and spectrograms are stored as
float16 (the released files are float16); the `*_fp32` configs keep float32.
One record per video with all its caption segments (layout "howto").
"""

from __future__ import annotations

import csv
import os

import numpy as np

from eao_jax.data import validate as V
from tfds_builders import common


def _configs() -> list[common.FeatureConfig]:
    base = {
        "resnet": dict(use_2d=True, use_3d=True, dim_2d=2048, dim_3d=2048, fps_3d=1.5,
                       options=dict(csv="HowTo100M_1166_videopaths.txt", features_path="features")),
        "s3d": dict(use_2d=False, use_3d=True, dim_2d=None, dim_3d=1024, fps_3d=1.0,
                    options=dict(csv="HowTo100M_1166_videopaths_s3d.txt", features_path="new_s3d_features")),
        "clip": dict(use_2d=True, use_3d=False, dim_2d=512, dim_3d=None, fps_2d=1.0,
                     options=dict(csv="HowTo100M_1166_videopaths_CLIP.txt", features_path="clip_features")),
    }
    out = []
    for name, kw in base.items():
        out.append(common.FeatureConfig(name=name, description=f"{name} features, float16 storage",
                                        feature_dtype="float16", audio_dtype="float16", **kw))
        out.append(common.FeatureConfig(name=name + "_fp32", description=f"{name} features, float32 storage",
                                        feature_dtype="float32", audio_dtype="float32", **kw))
    return out


def _read_paths(csv_path: str) -> list[str]:
    if not os.path.exists(csv_path):
        raise FileNotFoundError(f"{csv_path}: video list not found (option `csv`)")
    with open(csv_path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise ValueError(f"{csv_path}: the video list needs a `path` column, got {reader.fieldnames}")
        return [row["path"].replace("None/", "") for row in reader]


def caption_arrays(cap, vid: str, file: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated (start (S,), end (S,), text (S,)) of one video's ASR segments."""
    try:
        start = np.asarray(cap["start"], dtype=np.float64).reshape(-1)
        end = np.asarray(cap["end"], dtype=np.float64).reshape(-1)
        text = ["" if t is None else str(t) for t in list(cap["text"])]
    except Exception as e:
        raise V.BadItem(V.BAD_ANNOTATION, vid, file, f"caption is not start/end/text ({type(e).__name__}: {e})"
                        ) from None
    if not (len(start) == len(end) == len(text)):
        raise V.BadItem(V.BAD_ANNOTATION, vid, file,
                        f"caption start/end/text lengths differ ({len(start)}, {len(end)}, {len(text)})")
    if not (np.isfinite(start).all() and np.isfinite(end).all()):
        raise V.BadItem(V.NON_FINITE, vid, file, "caption start/end")
    if len(start) > 1 and np.any(np.diff(start) < 0):
        raise V.BadItem(V.BAD_ANNOTATION, vid, file, "caption segments are not sorted by start time")
    return start, end, text


class Howto100m(common.EaoBuilder):
    """HowTo100M: one record per video (features, spectrogram, ASR caption segments)."""

    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "resnet"
    PATH_OPTIONS = ("csv", "caption_path", "features_path", "features_path_3d", "features_path_audio")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def _layout_fields(self):
        return dict(common.HOWTO_FIELDS)

    def _split_generators(self, dl_manager):
        opts = self.builder_config.options
        csv_path = self._path(dl_manager, "csv", opts["csv"])
        self._feat = self._path(dl_manager, "features_path", opts["features_path"])
        self._feat3 = self._path(dl_manager, "features_path_3d", self._paths.get("features_path",
                                                                                    opts["features_path"]))
        self._audio = self._path(dl_manager, "features_path_audio", "audio_features")
        self._caption_file = self._path(dl_manager, "caption_path", "caption.pickle")
        paths = _read_paths(csv_path)
        self._captions = V.load_pickle(self._caption_file)
        self.info.metadata["layouts"]["train"] = "howto"
        self._set_complete_size("train", len(paths))
        return {"train": self._generate_examples(paths)}

    def _generate_examples(self, paths):
        def build(vid_path: str):
            vid = vid_path.split("/")[-1]
            ex = {"id": vid}
            p2 = os.path.join(self._feat, vid_path, vid + "_2d.npz")
            if not os.path.exists(p2):
                p2 = os.path.join(self._feat, vid_path + "_2d.npz")
            p3 = os.path.join(self._feat3, vid_path, vid + "_3d.npz")
            if not os.path.exists(p3):
                p3 = os.path.join(self._feat3, vid_path, vid + ".npz")
            cfg = self.builder_config
            f2 = V.load_npz_key(p2, "features", vid) if cfg.use_2d else None
            f3 = V.load_npz_key(p3, "features", vid) if cfg.use_3d else None
            ex["features_2d"] = self._features("2d", f2, vid, p2)
            ex["features_3d"] = self._features("3d", f3, vid, p3)
            pa = os.path.join(self._audio, vid_path, vid + "_spec.npz")
            ex["audio"] = self._spectrogram(V.load_npz_key(pa, "arr_0", vid), vid, pa)
            if vid not in self._captions:
                raise V.BadItem(V.NO_CAPTION, vid, self._caption_file, "video id not in the caption file")
            start, end, text = caption_arrays(self._captions[vid], vid, self._caption_file)
            self._add_text(*text)
            ex.update(caption_start=start, caption_end=end, caption_text=text)
            return ex

        return self._validated("train", ((i, lambda p=p: build(p)) for i, p in enumerate(paths)))
