"""TFDS builder `msrvtt` (see msrvtt_dataset_builder.py)."""

from tfds_builders.msrvtt.msrvtt_dataset_builder import Msrvtt

__all__ = ["Msrvtt"]
