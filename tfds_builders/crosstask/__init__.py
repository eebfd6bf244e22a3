"""TFDS builder `crosstask` (see crosstask_dataset_builder.py)."""

from tfds_builders.crosstask.crosstask_dataset_builder import Crosstask

__all__ = ["Crosstask"]
