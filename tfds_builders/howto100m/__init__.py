"""TFDS builder `howto100m` (see howto100m_dataset_builder.py)."""

from tfds_builders.howto100m.howto100m_dataset_builder import Howto100m

__all__ = ["Howto100m"]
