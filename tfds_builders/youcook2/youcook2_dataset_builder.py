"""YouCook2 from the released pickles.

Splits (present when their files exist): `val` (youcook_val.pkl) and `train` (youcook_train.pkl).
As the original, only the clips whose ResNet pickle entry has `2d_full` are kept (11 validation
clips lack it); the others are not written but count in `complete_dataset_size` (the number of clips
in the pickle, 3350 for the released val file), so the evaluator scores them as misses.
Features: `2d_full` / `3d_full` for `resnet`; `s3d` / `clip` from the parallel pickles otherwise.
"""

from __future__ import annotations

from tfds_builders import pickle_items

MANUAL = pickle_items.__doc__ + "\n" + __doc__


class Youcook2(pickle_items.PickleItemsBuilder):
    """YouCook2 clips: features, spectrogram, caption (layout "items")."""

    BUILDER_CONFIGS = pickle_items.item_configs("2d_full", "3d_full")
    DEFAULT_CONFIG_NAME = "resnet"
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL
    SPLIT_FILES = {"val": "youcook_val.pkl", "train": "youcook_train.pkl"}

    def _keep(self, item: dict) -> bool:
        return "2d_full" in item

    def _on_dropped(self, split: str, n: int) -> None:
        self.info.metadata.setdefault("missing_2d_full", {})[split] = n
        if n:
            self._report.notes.append(
                f"{split}: {n} clips lack '2d_full' and are not written (counted as misses)")
