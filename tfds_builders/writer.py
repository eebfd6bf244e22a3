"""Writing TFDS ArrayRecord shards directly, without TFDS's shuffling writer.

TFDS's own writer routes every example through a `Shuffler` that keeps the whole split in memory up
to 1 GB and then spills it to temporary bucket files through `tf.io.gfile`, which needs TensorFlow;
its Beam writers move every serialized example through a shuffle (a GroupByKey, held in the runner's
memory on the DirectRunner). Our builders write records in a known order anyway (records keep the
released order; training shuffles by index), so they serialize with TFDS's serializer and append
straight to shard files: constant memory, no TensorFlow, any split size, and the position of every
record is known when it is written. The result is an ordinary TFDS dataset
(`tfds.builder_from_directory`, `as_data_source`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from typing import Any

from etils import epath

DEFAULT_OPTIONS = "group_size:1"  # one record per chunk: random access (what TFDS writes)
MAX_SHARD_BYTES = 1 << 30


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


class ShardWriter:
    """Serializes examples (TFDS features) and appends them to one ArrayRecord file.

    Remote destinations (gs://...) are written to a local temporary file and copied when closed.
    """

    def __init__(self, features: Any, path: str | os.PathLike, options: str | None = None):
        from array_record.python import array_record_module
        from tensorflow_datasets.core import example_serializer

        self._features = features
        self._serializer = example_serializer.ExampleSerializer(features.get_serialized_info())
        self.path = epath.Path(path)
        self._local = self.path if _is_local(self.path) else epath.Path(
            tempfile.mkstemp(suffix=".array_record")[1])
        self._local.parent.mkdir(parents=True, exist_ok=True)
        opts = DEFAULT_OPTIONS + ("," + options if options else "")
        self._writer = array_record_module.ArrayRecordWriter(os.fspath(self._local), opts)
        self.num_examples = 0
        self.num_bytes = 0

    def serialize(self, example: dict[str, Any]) -> bytes:
        return self._serializer.serialize_example(self._features.encode_example(example))

    def write(self, example: dict[str, Any]) -> int:
        """Writes one example; returns its position in this file."""
        return self.write_serialized(self.serialize(example))

    def write_serialized(self, data: bytes) -> int:
        self._writer.write(data)
        self.num_examples += 1
        self.num_bytes += len(data)
        return self.num_examples - 1

    def close(self) -> None:
        self._writer.close()
        if self._local != self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._local.open("rb") as src, self.path.open("wb") as dst:
                shutil.copyfileobj(src, dst, 16 << 20)
            self._local.unlink()


def stream_split(features: Any, examples: Iterable[dict[str, Any]], template: Any, *,
                 options: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES) -> Any:
    """Writes examples in order into shards of at most ~`max_shard_bytes`; returns the SplitInfo.

    Shards are written under temporary names and renamed to TFDS's `-XXXXX-of-NNNNN` names once
    their number is known. `template` is the builder's `ShardedFileTemplate` of the split.
    """
    import tensorflow_datasets as tfds

    parts: list[tuple[epath.Path, int, int]] = []
    writer = None
    try:
        for ex in examples:
            if writer is None:
                writer = ShardWriter(features, template.data_dir / f".{template.split}-part{len(parts):05d}",
                                     options)
            writer.write(ex)
            if writer.num_bytes >= max_shard_bytes:
                writer.close()
                parts.append((writer.path, writer.num_examples, writer.num_bytes))
                writer = None
        if writer is not None:
            writer.close()
            parts.append((writer.path, writer.num_examples, writer.num_bytes))
            writer = None
    finally:
        if writer is not None:
            writer.close()
    if not parts:
        raise ValueError(f"split {template.split!r}: no examples were written")
    for i, (p, _, _) in enumerate(parts):
        p.rename(template.sharded_filepath(shard_index=i, num_shards=len(parts)))
    return tfds.core.SplitInfo(name=template.split, shard_lengths=[n for _, n, _ in parts],
                               num_bytes=sum(b for _, _, b in parts), filename_template=template)
