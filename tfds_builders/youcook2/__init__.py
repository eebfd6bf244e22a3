"""TFDS builder `youcook2` (see youcook2_dataset_builder.py)."""

from tfds_builders.youcook2.youcook2_dataset_builder import Youcook2

__all__ = ["Youcook2"]
