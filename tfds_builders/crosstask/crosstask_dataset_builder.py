"""CrossTask zero-shot step localisation (see tfds_builders/localization.py for the layout)."""

from __future__ import annotations

from tfds_builders import localization


class Crosstask(localization.LocalizationBuilder):
    """CrossTask videos: features, spectrogram, per-second step annotation, step texts of the task."""

    BUILDER_CONFIGS = localization.localization_configs()
    DEFAULT_CONFIG_NAME = "resnet"
    MANUAL_DOWNLOAD_INSTRUCTIONS = localization.__doc__
    MINING = False
