"""The synthetic dataset (see world.py for the world, splits and config sizes)."""

from __future__ import annotations

import numpy as np

from tfds_builders import common
from tfds_builders.synthetic import world as syn


def _configs() -> list[common.FeatureConfig]:
    out = []
    for name, spec in syn.SPECS.items():
        out.append(common.FeatureConfig(
            name=name, description=f"synthetic, {spec.train_videos} train videos, {spec.retrieval_items} "
                                   f"retrieval clips, {spec.localization_videos} localisation videos",
            use_2d=True, use_3d=True, dim_2d=spec.dim_2d, dim_3d=spec.dim_3d,
            feature_dtype=spec.feature_dtype, audio_dtype="float16", options=dict(spec=name)))
    return out


class Synthetic(common.EaoBuilder):
    """Learnable synthetic videos: train (HowTo layout), retrieval (eval items), localization (CrossTask)."""

    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "default"
    ARRAY_RECORD_OPTIONS = "uncompressed"  # random data barely compresses; decoding is 4x faster

    def _layout_fields(self):
        out = {}
        for fields in (common.HOWTO_FIELDS, common.ITEM_FIELDS, common.LOCALIZATION_FIELDS):
            out.update(fields)
        return out

    def _world(self) -> syn.World:
        if getattr(self, "_world_cache", None) is None:
            self._world_cache = syn.World(syn.SPECS[self.builder_config.options["spec"]])
        return self._world_cache

    def _split_generators(self, dl_manager):
        world = self._world()
        s = world.spec
        meta = self.info.metadata
        meta["layouts"].update(train="howto", retrieval="items", localization="localization")
        for split, n in (("train", s.train_videos), ("retrieval", s.retrieval_items),
                         ("localization", s.localization_videos)):
            self._set_complete_size(split, n)
        return {"train": self._generate_examples("train", syn.train_videos(world)),
                "retrieval": self._generate_examples("retrieval", syn.retrieval_items(world)),
                "localization": self._generate_examples("localization", syn.localization_videos(world))}

    def _generate_examples(self, split, examples):
        # The union of the three layouts: fields a split does not use are empty.
        empty = dict(caption_start=[], caption_end=[], caption_text=[], caption="", captions=[], item_index=-1,
                     task="", steps=[], annotation=np.zeros((0, 0), np.uint8))

        def build(ex):
            out = dict(empty)
            out.update(ex)
            name = out["id"]
            out["features_2d"] = self._features("2d", out["features_2d"], name, None)
            out["features_3d"] = self._features("3d", out["features_3d"], name, None)
            out["audio"] = self._spectrogram(out["audio"], name, None)
            out["caption_start"] = np.asarray(out["caption_start"], np.float64)
            out["caption_end"] = np.asarray(out["caption_end"], np.float64)
            self._add_text(*out["caption_text"], out["caption"], *out["captions"], *out["steps"])
            return out

        return self._validated(split, ((i, lambda ex=ex: build(ex)) for i, ex in enumerate(examples)))

    def _word_table(self):
        return self._world().table



