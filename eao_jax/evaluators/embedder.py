"""The model in eval mode on fixed-size host batches: the one forward every evaluator, `embed` and
`attention` share.

- `cached_jit(graphdef, key, build)`: one cache of jitted functions per model structure, so periodic
  evaluations during training (and repeated CLI calls in one process) compile once.
- `Embedder`: the eval forward, replicated model, batch sharded over a 1-D `data` mesh; outputs
  gathered over processes.
- `empty_inputs(model, m, rows)`: the all-masked stand-in for a modality an input lacks (the
  forward needs every modality's keys; an all-zero mask makes it an empty modality).
- `embed_rows`: (T, ...) rows of some modalities, in padded global chunks, back in row order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from eao_jax.defaults import VIDEO_DIMS
from eao_jax.lazy import lazy_import

if TYPE_CHECKING:
    from eao_jax.model.eao import EverythingAtOnce

jax = lazy_import("jax")
nnx = lazy_import("flax.nnx")
eao = lazy_import("eao_jax.model.eao")
multihost_utils = lazy_import("jax.experimental.multihost_utils")

DATA_AXIS = "data"
_CACHE: dict[tuple[str, Hashable], Any] = {}
_CACHE_SIZE = 8


def cached_jit(graphdef: nnx.GraphDef, key: Hashable, build: Callable[[], Any]) -> Any:
    """`build()` (a jitted function of one model structure) cached under (graphdef, key).

    GraphDefs are not hashable: their repr, which holds every static attribute (pooling mode, eval
    flags), is the key. The oldest of `_CACHE_SIZE` entries is dropped first."""
    full = (repr(graphdef), key)
    if full not in _CACHE:
        if len(_CACHE) >= _CACHE_SIZE:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[full] = build()
    return _CACHE[full]


def eval_mesh(devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 1-D ("data",) mesh over `devices` (default: every device of every process)."""
    devices = list(jax.devices() if devices is None else devices)
    return jax.sharding.Mesh(np.array(devices), (DATA_AXIS,))


def _state_mesh(state: Any) -> jax.sharding.Mesh | None:
    """The mesh the model's arrays live on when it has a `data` axis spanning every device."""
    meshes = {leaf.sharding.mesh for leaf in jax.tree.leaves(state)
              if isinstance(getattr(leaf, "sharding", None), jax.NamedSharding)}
    if len(meshes) == 1:
        mesh = meshes.pop()
        if DATA_AXIS in mesh.axis_names and mesh.size == jax.device_count():
            return mesh
    return None


def _forward(graphdef: nnx.GraphDef, cross_modal: bool, outputs: tuple[str, ...] | None,
             audio_pooling: tuple[str, int] | None, normalize: bool) -> Any:
    def build():
        def forward(state, batch, extra):
            out = nnx.merge(graphdef, state)(batch, cross_modal=cross_modal, late_fusion=True,
                                             audio_pooling=audio_pooling)
            out = {k: v for k, v in out.items() if outputs is None or k in outputs}
            if normalize:
                out = {k: v if k.endswith("_mask") else eao.l2_normalize(v) for k, v in out.items()}
            return out, extra  # extra rows travel (and are gathered) with their embeddings
        return jax.jit(forward)
    return cached_jit(graphdef, ("embed", cross_modal, outputs, audio_pooling, normalize), build)


class Embedder:
    """Runs the model in eval mode on fixed-size host batches, sharded over the `data` axis.

    Each process passes its own rows (a multiple of `rows_per_process`); the outputs of every
    process are gathered, so every process gets the global rows (process 0's rows first).
    cross_modal: also compute the fused pairs (default: when the model has a shared transformer).
    outputs: keep only these outputs (default all). audio_pooling: (mode, tokens) overriding the
    model's own. normalize: L2-normalise the embeddings (default: raw, as the metrics expect).
    """

    def __init__(self, model: EverythingAtOnce, *, mesh: jax.sharding.Mesh | None = None,
                 cross_modal: bool | None = None, outputs: Sequence[str] | None = None,
                 audio_pooling: tuple[str, int] | None = None, normalize: bool = False):
        graphdef, state = nnx.split(model)
        copy = nnx.merge(graphdef, state)  # shares the arrays; the caller's module keeps its mode
        copy.eval()
        self.model = copy
        self.graphdef, self.state = nnx.split(copy)
        state_mesh = _state_mesh(self.state)
        if mesh is None:
            mesh = state_mesh if state_mesh is not None else eval_mesh()
        if state_mesh != mesh:  # replicate the model on the evaluation mesh
            self.state = jax.device_put(self.state, jax.NamedSharding(mesh, jax.P()))
        self.mesh = mesh
        self.modalities = tuple(model.modalities)
        if cross_modal is None:
            cross_modal = not model.per_modality_fusion and len(model.modalities) > 1
        self.cross_modal = bool(cross_modal)
        self.batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
        self._forward = _forward(self.graphdef, self.cross_modal, None if outputs is None else tuple(outputs),
                                 audio_pooling, normalize)

    @property
    def rows_per_process(self) -> int:
        """Local rows must be a multiple of this (the data-axis devices of one process)."""
        return max(1, self.mesh.shape[DATA_AXIS] // jax.process_count())

    def round_batch_size(self, batch_size: int) -> int:
        """`batch_size` rounded up to a multiple of `rows_per_process`."""
        r = self.rows_per_process
        return max(r, int(math.ceil(batch_size / r)) * r)

    def __call__(self, local_batch: Mapping[str, np.ndarray],
                 extra: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Model inputs (B_local rows) -> {output: (B_global, ...) numpy}, gathered over processes.

        `extra` (B_local,) host arrays (item index, validity) come back gathered in the same row
        order as the embeddings, under their own keys.
        """
        def to_global(tree):
            return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                    for k, v in tree.items()}

        out, ext = self._forward(self.state, to_global(model_inputs(local_batch, self.modalities)),
                                 to_global(extra or {}))
        out, ext = multihost_utils.process_allgather((out, ext), tiled=True)
        return {**out, **ext}


def model_inputs(batch: Mapping[str, np.ndarray], modalities: Sequence[str]) -> dict[str, np.ndarray]:
    """The keys of `batch` the model reads for `modalities` (features, masks, audio frame counts)."""
    keys = [k for m in modalities for k in (m, f"{m}_mask")]
    if "audio" in modalities:
        keys.append("audio_STFT_nframes")
    return {k: batch[k] for k in keys}


def empty_inputs(model: EverythingAtOnce, m: str, rows: int) -> dict[str, np.ndarray]:
    """A one-token (audio: one-DAVEnet-token) all-masked input of modality `m` for `rows` items."""
    if m == "audio":
        t = model.audio_downsampling
        return {"audio": np.zeros((rows, model.input_dims["audio"], t), np.float32),
                "audio_mask": np.zeros((rows, t), np.float32),
                "audio_STFT_nframes": np.full((rows,), -1, np.int32)}
    return {m: np.zeros((rows, 1, model.input_dims[m]), np.float32), f"{m}_mask": np.zeros((rows, 1), np.float32)}


def _pad_rows(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[0] == n:
        return x
    out = np.zeros((n,) + x.shape[1:], x.dtype)
    out[: x.shape[0]] = x
    return out


def _local_chunks(arrays: Mapping[str, np.ndarray], global_rows: int
                  ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
    """Splits (T, ...) arrays into global chunks of `global_rows` (zero-padded) and yields this
    process's slice of each with the slice's row numbers (-1 for padding)."""
    n = next(iter(arrays.values())).shape[0]
    pc, pi = jax.process_count(), jax.process_index()
    local = global_rows // pc
    rows = np.arange(n, dtype=np.int32)
    for s in range(0, max(n, 1), global_rows):
        sl = slice(pi * local, (pi + 1) * local)
        chunk = {k: _pad_rows(v[s:s + global_rows], global_rows)[sl] for k, v in arrays.items()}
        ids = np.full((global_rows,), -1, np.int32)
        ids[: min(global_rows, n - s)] = rows[s:s + global_rows]
        yield chunk, ids[sl]


def embed_rows(embedder: Embedder, arrays: Mapping[str, np.ndarray], batch_size: int,
               names: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeds (T, ...) rows (every process passes all T) of the modalities `arrays` holds, the
    others empty, in global chunks of `batch_size` rows per process; returns {name: (T, ...)}."""
    model = embedder.model
    n = next(iter(arrays.values())).shape[0]
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    row_parts = []
    for chunk, ids in _local_chunks(arrays, batch_size * jax.process_count()):
        batch = dict(chunk)
        for m in model.modalities:
            if m not in batch:
                batch.update(empty_inputs(model, m, len(ids)))
        out = embedder(batch, {"row": ids})
        keep = out["row"] >= 0
        row_parts.append(out["row"][keep])
        for k in names:
            parts[k].append(np.asarray(out[k][keep]))
    order = np.argsort(np.concatenate(row_parts), kind="stable")
    if len(order) != n:
        raise ValueError(f"embedded {len(order)} of {n} rows")
    return {k: np.concatenate(v)[order] for k, v in parts.items()}


def check_feature_dims(model: EverythingAtOnce, video_dim: int, text_dim: int, what: str,
                       tfds_config: str | None) -> None:
    """Raises ValueError naming the model field when a prepared split's features do not fit the model."""
    want_v = model.input_dims.get("video", video_dim)
    want_t = model.input_dims.get("text", text_dim)
    if video_dim != want_v:
        raise ValueError(f"{what} (builder config {tfds_config or 'default'}) has {video_dim}-d video tokens but the "
                         f"model expects model.video_dim={want_v}: choose the matching --tfds_config ("
                         + ", ".join(f"{k} {v}" for k, v in VIDEO_DIMS.items()) + ")")
    if text_dim != want_t:
        raise ValueError(f"{what} has {text_dim}-d word vectors but the model expects model.text_dim={want_t} "
                         f"(prepare the dataset with the word2vec file the model was trained with)")
