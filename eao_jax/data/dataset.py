"""Opening a prepared dataset (no builder code needed: `tfds.builder_from_directory`)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

from eao_jax.data import records
from eao_jax.data.text import WORD_VECTORS_FILE, WordTable

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def dataset_path(name: str, data_dir: str | os.PathLike, config: str | None = None) -> str:
    """`<data_dir>/<name>/<config>/<newest version>` of a prepared dataset.

    `config=None` takes the default config recorded by TFDS (or the only one prepared).
    """
    root = os.path.join(os.fspath(data_dir), name)
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"{root}: dataset {name!r} is not prepared in {data_dir} "
            f"(python -m eao_jax.prepare --dataset={name} --data_dir={data_dir} ...)")
    subdirs = [d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith(".")]
    if not any(_VERSION_RE.match(d) for d in subdirs):  # builder with configs
        if config is None:
            meta = os.path.join(root, ".config", "metadata.json")
            configs = [d for d in subdirs if not d.startswith("incomplete")]
            if os.path.exists(meta):
                with open(meta) as f:
                    config = json.load(f)["default_config_name"]
                if config not in configs and len(configs) == 1:
                    config = configs[0]
            elif len(configs) == 1:
                config = configs[0]
            else:
                raise ValueError(f"{root}: several configs prepared ({configs}); choose one")
        root = os.path.join(root, config)
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: config {config!r} of {name!r} is not prepared in {data_dir}")
    versions = sorted((d for d in os.listdir(root) if _VERSION_RE.match(d)
                       and os.path.exists(os.path.join(root, d, "dataset_info.json"))),
                      key=lambda v: tuple(int(x) for x in v.split(".")))
    if not versions:
        raise FileNotFoundError(f"{root}: no complete prepared version (an interrupted prepare leaves none)")
    return os.path.join(root, versions[-1])


class RecordSource:
    """Random-access, picklable source of decoded records (arrays with 2-D shapes, texts as str)."""

    def __init__(self, tfds_source: Any):
        self._src = tfds_source

    def __len__(self) -> int:
        return len(self._src)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return records.decode(self._src[i])

    def __repr__(self) -> str:
        return f"RecordSource({self._src!r})"


class PreparedDataset:
    """A prepared dataset directory: splits, metadata and the word-vector table."""

    def __init__(self, path: str | os.PathLike):
        import tensorflow_datasets as tfds

        self.path = os.fspath(path)
        self._builder = tfds.builder_from_directory(self.path)
        md = self._builder.info.metadata
        self.metadata: dict[str, Any] = dict(md) if md is not None else {}

    @classmethod
    def open(cls, name: str, data_dir: str | os.PathLike, config: str | None = None) -> PreparedDataset:
        return cls(dataset_path(name, data_dir, config))

    @property
    def name(self) -> str:
        return self._builder.info.name

    @property
    def splits(self) -> list[str]:
        return list(self._builder.info.splits.keys())

    def _check_split(self, split: str) -> None:
        if split not in self._builder.info.splits:
            raise ValueError(f"{self.path}: no split {split!r}; splits: {self.splits}")

    def layout(self, split: str) -> str:
        """"howto" | "howto_chunks" | "items" | "localization"."""
        self._check_split(split)
        return self.metadata["layouts"][split]

    def num_examples(self, split: str) -> int:
        """Items of the split (videos of a chunked HowTo split, whose records are headers and chunks)."""
        self._check_split(split)
        if self.metadata["layouts"].get(split) == "howto_chunks":
            return int(self.metadata["num_examples"][split])
        return int(self._builder.info.splits[split].num_examples)

    def complete_dataset_size(self, split: str) -> int:
        """Items of the released split, written or not (the recall denominator)."""
        self._check_split(split)
        return int(self.metadata.get("complete_dataset_size", {}).get(split, self.num_examples(split)))

    def source(self, split: str) -> RecordSource:
        self._check_split(split)
        return RecordSource(self._builder.as_data_source(split=split))

    def raw_source(self, split: str) -> Any:
        """Random access to the split's serialized records (bytes; see `records.parse_example`)."""
        from tensorflow_datasets.core import decode

        self._check_split(split)
        return self._builder.as_data_source(split=split, deserialize_method=decode.DeserializeMethod.RAW_BYTES)

    def word_table(self) -> WordTable:
        return WordTable.load(os.path.join(self.path, WORD_VECTORS_FILE))

    @property
    def use_2d(self) -> bool:
        return bool(self.metadata.get("use_2d", True))

    @property
    def use_3d(self) -> bool:
        return bool(self.metadata.get("use_3d", True))

    @property
    def fps(self) -> tuple[float, float]:
        return float(self.metadata.get("fps_2d", 1.0)), float(self.metadata.get("fps_3d", 1.5))

    @property
    def video_dim(self) -> int:
        """Width of the video tokens, D2 + D3 of the used backbones."""
        return int((self.metadata.get("dim_2d") or 0) * self.use_2d + (self.metadata.get("dim_3d") or 0) * self.use_3d)
