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
