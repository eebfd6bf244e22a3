"""TFDS builder `mining_youtube` (see mining_youtube_dataset_builder.py)."""

from tfds_builders.mining_youtube.mining_youtube_dataset_builder import MiningYoutube

__all__ = ["MiningYoutube"]
