"""TFDS builder `synthetic`: the world generator (world.py) and its builder (synthetic_dataset_builder.py)."""

from __future__ import annotations

import os

from tfds_builders.synthetic.synthetic_dataset_builder import Synthetic


def ensure_prepared(data_dir: str | os.PathLike, config: str = "default") -> str:
    """Prepares the synthetic dataset into `data_dir` if it is not there yet; returns its directory."""
    import tensorflow_datasets as tfds

    builder = Synthetic(data_dir=os.fspath(data_dir), config=config, file_format="array_record")
    if not builder.data_path.exists():
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return os.fspath(builder.data_path)


__all__ = ["Synthetic", "ensure_prepared"]
