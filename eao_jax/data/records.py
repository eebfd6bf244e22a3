"""Record fields shared by the TFDS builders and the grain pipelines.

2-D arrays whose width is only known at prepare time (features, annotation matrices) are stored flat
with a `<name>_shape` (2,) int64 field beside them: TFDS cannot decode zero-sized tensors with two
unknown dimensions, and a backbone that a config does not use is stored as a (0, 0) array.
"""

from __future__ import annotations

from typing import Any

import numpy as np

MATRIX_FIELDS = ("features_2d", "features_3d", "annotation")
TEXT_FIELDS = ("id", "caption", "task")
TEXT_LIST_FIELDS = ("caption_text", "captions", "steps")


def flatten_matrices(example: dict[str, Any]) -> dict[str, Any]:
    """Replaces each 2-D matrix field by its flat values and a `<name>_shape` field (in place)."""
    for k in MATRIX_FIELDS:
        if k in example:
            x = np.asarray(example[k])
            if x.ndim != 2:
                raise ValueError(f"record field {k} must be 2-D, got shape {x.shape}")
            example[k] = np.ascontiguousarray(x).reshape(-1)
            example[k + "_shape"] = np.asarray(x.shape, np.int64)
    return example


def decode(record: dict[str, Any]) -> dict[str, Any]:
    """A decoded TFDS record -> arrays with their 2-D shapes and texts as str."""
    out = {}
    for k, v in record.items():
        if k.endswith("_shape") and k[:-6] in MATRIX_FIELDS:
            continue
        if k in MATRIX_FIELDS:
            v = np.asarray(v).reshape(tuple(int(n) for n in record[k + "_shape"]))
        elif k in TEXT_FIELDS:
            v = v.decode("utf-8") if isinstance(v, bytes) else str(v)
        elif k in TEXT_LIST_FIELDS:
            v = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in v]
        out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Fast reading of serialized records (training hot path)
# --------------------------------------------------------------------------------------------
# TFDS writes each record as a `tf.train.Example` protobuf. Decoding one through TFDS's generic
# per-feature path costs about 130 us per record, more than reading it; the training loader parses
# the protobuf itself (about 20 us) and views the byte fields as arrays.


def parse_example(raw: bytes) -> Any:
    """A serialized `tf.train.Example` -> its feature map (name -> `Feature` protobuf)."""
    from tensorflow_datasets.proto import tf_example_pb2

    return tf_example_pb2.Example.FromString(raw).features.feature


def raw_array(feature: Any, dtype, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A BYTES-encoded tensor feature as a read-only array (`shape` may hold one -1)."""
    values = feature.bytes_list.value
    arr = np.frombuffer(values[0], dtype=dtype) if values else np.zeros((0,), dtype)
    return arr if shape is None else arr.reshape(shape)


def raw_int(feature: Any) -> int:
    return int(feature.int64_list.value[0])


def raw_text(feature: Any) -> str:
    values = feature.bytes_list.value
    return values[0].decode("utf-8") if values else ""
