"""TFDS builder `synthetic` (see synthetic_dataset_builder.py)."""

from tfds_builders.synthetic.synthetic_dataset_builder import Synthetic

__all__ = ["Synthetic"]
