r"""Zero-shot evaluation: text-video retrieval and step localisation from an Orbax checkpoint.

  python -m eao_jax.evaluate --task=youcook2 --checkpoint=DIR --data_dir=TFDS_DIR \
      [--step=N] [--strategy=at_once|clip|nearest|max_pool|clips_average] [--output=RESULTS.json] \
      [--batch_size=16] [--tfds_config=resnet|s3d|clip|tiny|default] \
      [--loc_embedding=v+a|va] [--decoder=dp|argmax|argmax_step|argmax_frame] [--convention=per_video|pooled]

Tasks:
  msrvtt, youcook2, synthetic    retrieval on MSR-VTT `test`, YouCook2 `val`, the synthetic `retrieval` split;
                                 all 18 directions the model's modalities allow, R@k over the complete split
                                 (MSR-VTT 1000, YouCook2 3350: items the release lacks count as misses)
  crosstask, mining_youtube,     step localisation: T x K cosine similarities between the K step texts
  synthetic_localization         (`text_embed`) and the T one-second windows (`v+a` or `va`), decoded per
                                 video; recall per task and the mean (CrossTask: over the 18 primary tasks)

Long-video strategies (retrieval), token counts per task:
  at_once         all of the clip in one pass: msrvtt 48 video tokens / 3072 STFT frames, youcook2 72 / 4608,
                  synthetic 48 / 3072 (the paper's main setting)
  clip            the first 12 tokens / 768 frames (8 s)
  nearest         video nearest-resampled to 12 tokens; the at-once audio, whose DAVEnet tokens are
                  nearest-resampled to 12 inside the model (model.audio_pooling='nearest')
  max_pool        the same with max pooling (model.audio_pooling='max_pool')
  clips_average   cut into consecutive 12-token / 768-frame clips (4 for msrvtt and synthetic, 6 for youcook2),
                  embed each, average the raw embeddings per item (clips with at most 70 percent real audio dropped)

The checkpoint is restored read-only, the model runs in eval mode (BatchNorm running statistics),
replicated, with each batch sharded over a 1-D `data` mesh of all devices. Under jax.distributed every
process embeds its share of the items; embeddings are gathered across processes before the metrics.
Process 0 prints the table and writes RESULTS.json (schema: eao_jax/evaluation/report.py) and, for retrieval,
RESULTS.png (recall@K of t2v, t2va, t2v+a).

Python API (also what training calls after each evaluation interval):
  evaluate_task(model, task, *, data_dir, strategy="at_once", ...) -> results dict
  evaluate_model(model, config, *, task, step=None, output=None) -> results dict   (train.py's hook)
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np
from absl import app, flags

from eao_jax import distributed
from eao_jax.evaluation import localisation as loc_lib
from eao_jax.evaluation import report
from eao_jax.evaluation import retrieval as ret_lib
from eao_jax.lazy import lazy_import

if TYPE_CHECKING:
    from eao_jax.model.eao import EverythingAtOnce

# Imported on first use, so that `--help` answers without loading JAX / Flax.
jax = lazy_import("jax")
nnx = lazy_import("flax.nnx")
multihost_utils = lazy_import("jax.experimental.multihost_utils")

DATA_AXIS = "data"
STRATEGIES = ("at_once", "clip", "nearest", "max_pool", "clips_average")
LOC_EMBEDDINGS = ("v+a", "va")
DEFAULT_LOC_EMBEDDING = "v+a"
DECODER_ALIASES = {"argmax": "argmax_frame"}  # MCN's alternative predictor labels each window
CLIP_TOKENS, CLIP_STFT = 12, 768  # one 8-s training clip: 12 video tokens, 768 frames = 12 audio tokens


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """What one evaluation task reads and how ("at once" lengths, clips for clips_average)."""

    dataset: str
    split: str
    kind: str  # "retrieval" | "localisation"
    n_video_tokens: int = CLIP_TOKENS  # at once
    n_stft: int = CLIP_STFT  # at once
    n_clips: int = 1  # clips_average
    benchmark: str = ""  # localisation: crosstask | mining_youtube (decoder defaults, task averaging)
    all_tasks: bool = False  # localisation: average over every task present (not CrossTask's primary 18)


TASKS: dict[str, TaskSpec] = {
    "msrvtt": TaskSpec("msrvtt", "test", "retrieval", 48, 3072, 4),
    "youcook2": TaskSpec("youcook2", "val", "retrieval", 72, 4608, 6),
    "synthetic": TaskSpec("synthetic", "retrieval", "retrieval", 48, 3072, 4),
    "crosstask": TaskSpec("crosstask", "test", "localisation", benchmark="crosstask"),
    "mining_youtube": TaskSpec("mining_youtube", "test", "localisation", benchmark="mining_youtube"),
    "synthetic_localization": TaskSpec("synthetic", "localization", "localisation", benchmark="crosstask",
                                       all_tasks=True),
}


# Builder config of the released datasets that matches a model's video token width.
BACKBONE_CONFIGS = {4096: "resnet", 1024: "s3d", 512: "clip"}
RELEASED_DATASETS = ("msrvtt", "youcook2", "crosstask", "mining_youtube")


def default_tfds_config(task: str, model: EverythingAtOnce) -> str | None:
    """The builder config to read when none is named: for the released datasets the one whose
    features match model.video_dim (resnet 4096, s3d 1024, clip 512); otherwise the prepared default."""
    if task_spec(task).dataset not in RELEASED_DATASETS or "video" not in model.modalities:
        return None
    return BACKBONE_CONFIGS.get(model.input_dims["video"])


def task_spec(task: str) -> TaskSpec:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return TASKS[task]


def strategy_settings(task: str, strategy: str) -> dict[str, Any]:
    """Input lengths and pooling of a retrieval strategy for a task (see the module docstring).

    Returns {n_video_tokens, n_stft, video_strategy, cut_clips, audio_pooling, audio_pooling_tokens};
    audio_pooling None means "keep the model's own setting".
    """
    spec = task_spec(task)
    if spec.kind != "retrieval":
        raise ValueError(f"--strategy applies to retrieval tasks; {task!r} evaluates 1-second windows")
    if strategy == "at_once":
        return dict(n_video_tokens=spec.n_video_tokens, n_stft=spec.n_stft, video_strategy="clip", cut_clips=0,
                    audio_pooling=None, audio_pooling_tokens=None)
    if strategy == "clip":
        return dict(n_video_tokens=CLIP_TOKENS, n_stft=CLIP_STFT, video_strategy="clip", cut_clips=0,
                    audio_pooling=None, audio_pooling_tokens=None)
    if strategy in ("nearest", "max_pool"):
        return dict(n_video_tokens=CLIP_TOKENS, n_stft=spec.n_stft, video_strategy=strategy, cut_clips=0,
                    audio_pooling=strategy, audio_pooling_tokens=CLIP_STFT // 64)
    if strategy == "clips_average":
        return dict(n_video_tokens=CLIP_TOKENS, n_stft=CLIP_STFT, video_strategy="clip", cut_clips=spec.n_clips,
                    audio_pooling=None, audio_pooling_tokens=None)
    raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")


def model_config_for_strategy(config: ml_collections.ConfigDict, task: str, strategy: str
                              ) -> ml_collections.ConfigDict:
    """A copy of a checkpoint's config whose model pools the audio tokens as `strategy` needs
    (nearest / max_pool: 12 tokens, as the original's audio_max_num_STFT_frames=768); for
    `load_model(config=...)`."""
    s = strategy_settings(task, strategy) if task_spec(task).kind == "retrieval" else {"audio_pooling": None}
    config = ml_collections.ConfigDict(config.to_dict())
    if s["audio_pooling"] is not None:
        config.model.audio_pooling = s["audio_pooling"]
        config.model.audio_pooling_tokens = s["audio_pooling_tokens"]
    return config


# ------------------------------------------------------------------------------------------------
# Sharded embedding of host batches


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


_FORWARD_CACHE: dict[tuple[str, bool, tuple[str, ...] | None, tuple[str, int] | None], Any] = {}
_FORWARD_CACHE_SIZE = 8


def _jitted_forward(graphdef: nnx.GraphDef, cross_modal: bool, outputs: tuple[str, ...] | None,
                    audio_pooling: tuple[str, int] | None = None):
    """The jitted eval forward for a model structure, reused across evaluations (periodic
    evaluations during training compile once). GraphDefs are not hashable: their repr, which
    holds every static attribute (pooling mode, eval flags), is the key."""
    key = (repr(graphdef), cross_modal, outputs, audio_pooling)
    if key not in _FORWARD_CACHE:
        def forward(state, batch, extra):
            out = nnx.merge(graphdef, state)(batch, cross_modal=cross_modal, late_fusion=True,
                                             audio_pooling=audio_pooling)
            out = {k: v for k, v in out.items() if outputs is None or k in outputs}
            return out, extra  # extra rows travel (and are gathered) with their embeddings

        if len(_FORWARD_CACHE) >= _FORWARD_CACHE_SIZE:
            _FORWARD_CACHE.pop(next(iter(_FORWARD_CACHE)))
        _FORWARD_CACHE[key] = jax.jit(forward)
    return _FORWARD_CACHE[key]


class Embedder:
    """Runs the model in eval mode on fixed-size host batches, sharded over the `data` axis.

    Each process passes its own rows (`local_batch_size` of them, a multiple of its data-axis
    devices); the outputs of every process are gathered, so every process gets the global rows
    (process 0's rows first). `audio_pooling` (mode, tokens) overrides the model's own.
    """

    def __init__(self, model: EverythingAtOnce, *, mesh: jax.sharding.Mesh | None = None,
                 cross_modal: bool | None = None, outputs: Sequence[str] | None = None,
                 audio_pooling: tuple[str, int] | None = None):
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
        self.outputs = tuple(outputs) if outputs is not None else None
        self.batch_sharding = jax.NamedSharding(mesh, jax.P(DATA_AXIS))
        self._forward = _jitted_forward(self.graphdef, self.cross_modal, self.outputs, audio_pooling)

    @property
    def rows_per_process(self) -> int:
        """Local rows must be a multiple of this (the data-axis devices of one process)."""
        return max(1, self.mesh.shape[DATA_AXIS] // jax.process_count())

    def round_batch_size(self, batch_size: int) -> int:
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

        out, ext = self._forward(self.state, to_global(local_batch), to_global(extra or {}))
        out, ext = multihost_utils.process_allgather((out, ext), tiled=True)
        return {**out, **ext}


def _model_inputs(batch: Mapping[str, np.ndarray], modalities: Sequence[str]) -> dict[str, np.ndarray]:
    keys = [k for m in modalities for k in (m, f"{m}_mask")]
    if "audio" in modalities:
        keys.append("audio_STFT_nframes")
    return {k: batch[k] for k in keys}


# ------------------------------------------------------------------------------------------------
# Retrieval


def retrieval_embeddings(embedder: Embedder, batches: Iterable[Mapping[str, np.ndarray]], *,
                         clips_average: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embeds padded retrieval batches (with `valid` and `index`) and returns (item indices (N,),
    {embedding name: (N, D) raw model outputs}) in index order; with `clips_average`, rows sharing an
    index are averaged (raw, before normalisation) and invalid (dropped) clips are removed."""
    rows: dict[str, list[np.ndarray]] = {}
    index_parts, valid_parts = [], []
    for batch in batches:
        out = embedder(_model_inputs(batch, embedder.modalities),
                       {"index": batch["index"], "valid": batch["valid"]})
        for k, v in out.items():
            if k.endswith("_embed"):
                rows.setdefault(k, []).append(np.asarray(v, np.float32))
        index_parts.append(out["index"])
        valid_parts.append(out["valid"])
    if not index_parts:
        raise ValueError("the retrieval split yielded no batch")
    index = np.concatenate(index_parts).astype(np.int64)
    valid = np.concatenate(valid_parts).astype(bool) & (index >= 0)
    embeds = {k: np.concatenate(v) for k, v in rows.items()}
    if clips_average:
        ids, embeds = ret_lib.average_embeddings_by_id(np.where(valid, index, -1), embeds)
        items = np.asarray(ids, np.int64)
    else:
        items = index[valid]
        embeds = {k: v[valid] for k, v in embeds.items()}
        if len(np.unique(items)) != len(items):
            raise ValueError("an item was embedded twice (duplicate `index` in the retrieval batches)")
    order = np.argsort(items, kind="stable")
    return items[order], {k: v[order] for k, v in embeds.items()}


def evaluate_retrieval(model: EverythingAtOnce, task: str, *, data_dir: str | os.PathLike,
                       strategy: str = "at_once", batch_size: int = 16, tfds_config: str | None = None,
                       mesh: jax.sharding.Mesh | None = None, max_words: int = 20,
                       checkpoint: str | None = None, step: int | None = None,
                       return_ranks: bool = False) -> dict[str, Any]:
    """Retrieval results (the RESULTS.json dict, plus `settings`) of `model` on a retrieval task.

    With `return_ranks`, the result also holds `_ranks` {direction: (N,) ranks} (not JSON: popped by
    the writers) for the recall@K plot.
    """
    from eao_jax.data import pipelines  # noqa: PLC0415 (TFDS / grain only when evaluating)

    spec = task_spec(task)
    s = strategy_settings(task, strategy)
    if strategy == "at_once" and getattr(model, "pos_embed", None) is not None:
        raise ValueError(f"the model has positional embeddings for {CLIP_TOKENS}-token clips: evaluate it with "
                         f"--strategy=clip|nearest|max_pool|clips_average, not at once "
                         f"({s['n_video_tokens']} video tokens)")
    pooling = None if s["audio_pooling"] is None else (s["audio_pooling"], int(s["audio_pooling_tokens"]))
    embedder = Embedder(model, mesh=mesh, audio_pooling=pooling)
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    bs = batch_size  # items per process and step; each becomes cut_clips rows with clips_average
    while (bs * max(1, s["cut_clips"])) % embedder.rows_per_process:
        bs += 1
    data = pipelines.load_retrieval(spec.dataset, data_dir, spec.split, config=tfds_config, batch_size=bs,
                                    n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"], max_words=max_words,
                                    video_strategy=s["video_strategy"], cut_clips=s["cut_clips"])
    _check_dims(model, data.video_dim, data.text_dim, f"{spec.dataset}/{spec.split}", tfds_config)
    distributed.log_if_main("%s (%s): %d of %d items, %d batches of %d per process", task, strategy,
                            data.num_items, data.complete_dataset_size, data.num_batches, bs)
    items, embeds = retrieval_embeddings(embedder, data, clips_average=bool(s["cut_clips"]))
    if len(items) != data.num_items:
        raise ValueError(f"{task}: embedded {len(items)} items, the split has {data.num_items}")
    ranks = ret_lib.direction_ranks(embeds)
    metrics = {d: ret_lib.metrics_from_ranks(r, data.complete_dataset_size) for d, r in ranks.items()}
    results = report.retrieval_results(task, metrics, len(items), data.complete_dataset_size,
                                       checkpoint=checkpoint, step=step)
    results["settings"] = dict(strategy=strategy, dataset=spec.dataset, split=spec.split, tfds_config=tfds_config,
                               n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"], max_words=max_words,
                               video_strategy=s["video_strategy"], cut_clips=s["cut_clips"],
                               audio_pooling=s["audio_pooling"] or getattr(model, "audio_pooling", "none"))
    if return_ranks:
        results["_ranks"] = ranks
    return results


def _check_dims(model: EverythingAtOnce, video_dim: int, text_dim: int, what: str, tfds_config: str | None) -> None:
    want_v = model.input_dims.get("video", video_dim)
    want_t = model.input_dims.get("text", text_dim)
    if video_dim != want_v:
        raise ValueError(f"{what} (builder config {tfds_config or 'default'}) has {video_dim}-d video tokens but the "
                         f"model expects model.video_dim={want_v}: choose the matching --tfds_config "
                         f"(resnet 4096, s3d 1024, clip 512)")
    if text_dim != want_t:
        raise ValueError(f"{what} has {text_dim}-d word vectors but the model expects model.text_dim={want_t} "
                         f"(prepare the dataset with the word2vec file the model was trained with)")


# ------------------------------------------------------------------------------------------------
# Localisation


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


def _empty_modality(model: EverythingAtOnce, m: str, rows: int) -> dict[str, np.ndarray]:
    """A one-token (or one-DAVEnet-token) all-masked input: the model needs every modality's keys."""
    if m == "audio":
        t = model.audio_downsampling
        return {"audio": np.zeros((rows, model.input_dims["audio"], t), np.float32),
                "audio_mask": np.zeros((rows, t), np.float32),
                "audio_STFT_nframes": np.full((rows,), -1, np.int32)}
    d = model.input_dims[m]
    return {m: np.zeros((rows, 1, d), np.float32), f"{m}_mask": np.zeros((rows, 1), np.float32)}


def _embed_rows(embedder: Embedder, model: EverythingAtOnce, arrays: Mapping[str, np.ndarray],
                present: Sequence[str], batch_size: int, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Embeds (T, ...) rows of the `present` modalities (others empty) in global chunks; returns
    {name: (T, D)}."""
    n = next(iter(arrays.values())).shape[0]
    global_rows = batch_size * jax.process_count()
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    row_parts = []
    for chunk, ids in _local_chunks(arrays, global_rows):
        batch = dict(chunk)
        for m in model.modalities:
            if m not in present:
                batch.update(_empty_modality(model, m, len(ids)))
        out = embedder(_model_inputs(batch, model.modalities), {"row": ids})
        keep = out["row"] >= 0
        row_parts.append(out["row"][keep])
        for k in names:
            parts[k].append(np.asarray(out[k][keep], np.float32))
    order = np.argsort(np.concatenate(row_parts), kind="stable")
    if len(order) != n:
        raise ValueError(f"embedded {len(order)} of {n} rows")
    return {k: np.concatenate(v)[order] for k, v in parts.items()}


def localisation_scores(embedder: Embedder, model: EverythingAtOnce, video: Mapping[str, Any], *,
                        embedding: str = DEFAULT_LOC_EMBEDDING, batch_size: int = 64,
                        step_batch_size: int = 16) -> np.ndarray:
    """(T, K) cosine similarities between a video's T one-second windows (`embedding`: 'v+a' or
    'va') and its K step texts (`text_embed`). Windows go in padded chunks of `batch_size` rows per
    process, steps in chunks of `step_batch_size` (two compiled shapes for the whole benchmark)."""
    key = f"{embedding}_embed"
    window_keys = ("video", "video_mask", "audio", "audio_mask", "audio_STFT_nframes")
    windows = {k: np.asarray(video[k]) for k in window_keys}
    steps = {k: np.asarray(video[k]) for k in ("text", "text_mask")}
    if windows["video"].shape[0] == 0 or steps["text"].shape[0] == 0:
        raise ValueError(f"video {video.get('id')!r}: no windows or no steps "
                         f"(T={windows['video'].shape[0]}, K={steps['text'].shape[0]})")
    win = _embed_rows(embedder, model, windows, ("video", "audio"), batch_size, [key])[key]
    txt = _embed_rows(embedder, model, steps, ("text",), step_batch_size, ["text_embed"])["text_embed"]
    return loc_lib.step_similarity(txt, win)


def evaluate_localisation(model: EverythingAtOnce, task: str, *, data_dir: str | os.PathLike,
                          embedding: str = DEFAULT_LOC_EMBEDDING, decoder: str = "dp",
                          log_softmax: bool | None = None, convention: str = "per_video",
                          batch_size: int = 64, tfds_config: str | None = None,
                          mesh: jax.sharding.Mesh | None = None, max_videos: int | None = None,
                          checkpoint: str | None = None, step: int | None = None) -> dict[str, Any]:
    """Localisation results (recall per task and mean, in percent) of `model` on a localisation task."""
    from eao_jax.data import pipelines  # noqa: PLC0415

    spec = task_spec(task)
    if spec.kind != "localisation":
        raise ValueError(f"{task!r} is a retrieval task")
    if embedding not in LOC_EMBEDDINGS:
        raise ValueError(f"loc_embedding must be one of {LOC_EMBEDDINGS}, got {embedding!r}")
    decoder = DECODER_ALIASES.get(decoder, decoder)
    if decoder not in loc_lib.DECODERS:
        raise ValueError(f"decoder must be one of {loc_lib.DECODERS + tuple(DECODER_ALIASES)}, got {decoder!r}")
    for m in ("text", "video", "audio"):
        if m not in model.modalities:
            raise ValueError(f"localisation with {embedding!r} needs a text-video-audio model; "
                             f"this one has {model.modalities}")
    if embedding == "va" and model.per_modality_fusion:
        raise ValueError("loc_embedding='va' needs fused pairs; model.fusion='per_modality' has none (use 'v+a')")
    cross_modal = embedding == "va"
    embedder = Embedder(model, mesh=mesh, cross_modal=cross_modal, outputs=(f"{embedding}_embed", "text_embed"))
    bs = embedder.round_batch_size(batch_size)
    step_bs = embedder.round_batch_size(16)
    data = pipelines.load_localization(spec.dataset, data_dir, spec.split, config=tfds_config,
                                       n_video_tokens=CLIP_TOKENS, n_stft=CLIP_STFT)
    _check_dims(model, data.dataset.video_dim, data.table.dim, f"{spec.dataset}/{spec.split}", tfds_config)
    n_videos = len(data) if max_videos is None else min(len(data), max_videos)
    distributed.log_if_main("%s: %d videos, windows in batches of %d per process", task, n_videos, bs)

    def scored():
        for i in range(n_videos):
            video = data[i]
            scores = localisation_scores(embedder, embedder.model, video, embedding=embedding, batch_size=bs,
                                         step_batch_size=step_bs)
            yield str(video["id"]), str(video.get("task", "")), scores, video["annotation"]

    summary = loc_lib.evaluate_localisation(
        scored(), spec.benchmark, decoder=decoder, log_softmax=log_softmax, convention=convention,
        tasks=None if spec.all_tasks else loc_lib.CROSSTASK_PRIMARY_TASKS)
    summary["settings"].update(embedding=embedding, dataset=spec.dataset, split=spec.split, tfds_config=tfds_config)
    return report.localisation_results(task, summary, checkpoint=checkpoint, step=step)


# ------------------------------------------------------------------------------------------------
# One entry for both kinds, the training hook, output files


def evaluate_task(model: EverythingAtOnce, task: str, *, data_dir: str | os.PathLike, strategy: str = "at_once",
                  config: ml_collections.ConfigDict | None = None, batch_size: int | None = None,
                  tfds_config: str | None = None, loc_embedding: str = DEFAULT_LOC_EMBEDDING,
                  decoder: str = "dp", log_softmax: bool | None = None, convention: str = "per_video",
                  mesh: jax.sharding.Mesh | None = None, checkpoint: str | None = None,
                  step: int | None = None, output: str | os.PathLike | None = None,
                  print_table: bool = False) -> dict[str, Any]:
    """Evaluates `model` on `task` (see the module docstring) and returns the results dict.

    config: the model's config; only `config.data.max_words` (default 20) is read here.
    tfds_config: the dataset's builder config (default: `default_tfds_config`).
    batch_size: per-process rows per step (default 16 for retrieval, 64 windows for localisation),
      rounded up to a multiple of the process's data-axis devices.
    output: when given, process 0 writes the JSON there and, for retrieval, the recall@K PNG
      next to it (same name, .png).
    """
    spec = task_spec(task)
    max_words = int(config.data.get("max_words", 20)) if config is not None and "data" in config else 20
    if tfds_config is None:
        tfds_config = default_tfds_config(task, model)
    if spec.kind == "retrieval":
        results = evaluate_retrieval(model, task, data_dir=data_dir, strategy=strategy,
                                     batch_size=batch_size or 16, tfds_config=tfds_config, mesh=mesh,
                                     max_words=max_words, checkpoint=checkpoint, step=step, return_ranks=True)
    else:
        if strategy not in (None, "at_once"):
            raise ValueError(f"--strategy={strategy} applies to retrieval tasks; {task!r} evaluates 1-second windows")
        results = evaluate_localisation(model, task, data_dir=data_dir, embedding=loc_embedding, decoder=decoder,
                                        log_softmax=log_softmax, convention=convention, batch_size=batch_size or 64,
                                        tfds_config=tfds_config, mesh=mesh, checkpoint=checkpoint, step=step)
    ranks = results.pop("_ranks", None)
    if distributed.is_main_process():
        if output is not None:
            write_outputs(output, results, ranks)
        if print_table:
            print(format_results(results))
    return results


def write_outputs(output: str | os.PathLike, results: Mapping[str, Any],
                  ranks: Mapping[str, np.ndarray] | None = None) -> str | None:
    """Writes RESULTS.json and, for retrieval, RESULTS.png (recall@1..50 of the main directions
    present). Returns the PNG path (or None)."""
    report.write_results_json(output, results)
    if "num_queries" not in results:
        return None
    png = os.path.splitext(os.fspath(output))[0] + ".png"
    present = [d for d in ret_lib.MAIN_DIRECTIONS if d in results["metrics"]]
    if not present:
        return None
    title = f"{results['task']} ({results.get('settings', {}).get('strategy', '')})"
    if ranks is not None:
        n = int(results["complete_dataset_size"])
        curves = {d: ret_lib.recall_at_k_curve(ranks[d], n, max_k=min(50, n)) for d in present}
        report.plot_recall_at_k(png, curves=curves, directions=present, title=title)
    else:
        report.plot_recall_at_k(png, metrics=results["metrics"], directions=present, title=title)
    return png


def format_results(results: Mapping[str, Any]) -> str:
    """The printed summary: header line plus the retrieval or localisation table."""
    s = results.get("settings", {})
    head = f"{results['task']}  checkpoint={results.get('checkpoint')}  step={results.get('step')}"
    if "num_queries" in results:
        head += (f"  strategy={s.get('strategy')}  evaluated {results['num_queries']} of "
                 f"{results['complete_dataset_size']}")
        return head + "\n" + report.format_retrieval_table(results["metrics"])
    head += (f"  videos={results.get('num_videos')}  embedding={s.get('embedding')}  decoder={s.get('decoder')}"
             f"  log_softmax={s.get('log_softmax')}")
    return head + "\n" + report.format_localisation_table(results)


def evaluate_model(model: EverythingAtOnce, config: ml_collections.ConfigDict, *, task: str,
                   step: int | None = None, output: str | os.PathLike | None = None,
                   checkpoint: str | None = None) -> dict[str, Any]:
    """The training hook (`train.run_evaluations`): evaluates with the settings of `config.eval`.

    Reads config.eval.data_dir (default config.data.data_dir), config.eval.batch_size and, when
    present, config.eval.strategy / tfds_config / loc_embedding / decoder. The builder config
    defaults to config.data.tfds_config when the task reads the training dataset (synthetic).
    """
    ev = config.get("eval", ml_collections.ConfigDict())
    data = config.get("data", ml_collections.ConfigDict())
    data_dir = ev.get("data_dir") or data.get("data_dir")
    if not data_dir:
        raise ValueError("config.eval.data_dir (or config.data.data_dir) must name the prepared datasets")
    tfds_config = ev.get("tfds_config")
    if tfds_config is None and data.get("dataset") == task_spec(task).dataset:
        tfds_config = data.get("tfds_config")
    return evaluate_task(model, task, data_dir=data_dir, strategy=ev.get("strategy") or "at_once", config=config,
                         batch_size=ev.get("batch_size"), tfds_config=tfds_config,
                         loc_embedding=ev.get("loc_embedding") or DEFAULT_LOC_EMBEDDING,
                         decoder=ev.get("decoder") or "dp", checkpoint=checkpoint, step=step, output=output)


# ------------------------------------------------------------------------------------------------
# Command line

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_enum("task", None, list(TASKS), "What to evaluate.")
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint directory (training workdir/checkpoints or convert "
                        "output).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest complete one).")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir holding the prepared dataset (default: the checkpoint "
                        "config's eval.data_dir or data.data_dir).")
    flags.DEFINE_string("tfds_config", None, "Builder config of the dataset (resnet | s3d | clip; synthetic: tiny | "
                        "default). Default: for the released datasets the one matching model.video_dim (4096 "
                        "resnet, 1024 s3d, 512 clip), else the prepared default.")
    flags.DEFINE_enum("strategy", "at_once", list(STRATEGIES), "Long-video strategy (retrieval tasks).")
    flags.DEFINE_string("output", None, "Results JSON (a recall@K PNG is written next to it for retrieval).")
    flags.DEFINE_integer("batch_size", None, "Items (retrieval, default 16) or windows (localisation, default 64) "
                         "per process and step.")
    flags.DEFINE_enum("loc_embedding", DEFAULT_LOC_EMBEDDING, list(LOC_EMBEDDINGS),
                      "Window embedding for localisation: late fusion v+a or fused va.")
    flags.DEFINE_enum("decoder", "dp", list(loc_lib.DECODERS) + list(DECODER_ALIASES),
                      "Localisation decoder: dp (ordered, one window per step) or argmax (best step per window).")
    flags.DEFINE_enum("log_softmax", "auto", ["auto", "true", "false"],
                      "Row log-softmax over steps before decoding (auto: Mining YouTube only, as MCN).")
    flags.DEFINE_enum("convention", "per_video", list(loc_lib.CONVENTIONS),
                      "CrossTask task recall: mean of per-video recalls, or hits pooled over a task's videos.")
    distributed.define_flags()
    flags.mark_flags_as_required(["task", "checkpoint"])


def data_dir_from_config(config: ml_collections.ConfigDict) -> str | None:
    """The TFDS data_dir a checkpoint's saved config names: eval.data_dir, else data.data_dir."""
    ev, data = config.get("eval", {}), config.get("data", {})
    return (ev.get("data_dir") if ev else None) or (data.get("data_dir") if data else None)


def main(argv: list[str]) -> None:
    del argv
    from eao_jax import console  # noqa: PLC0415

    console.quiet_libraries()
    distributed.initialize_from_flags()
    from eao_jax import checkpoint as ckpt  # noqa: PLC0415

    root = ckpt.checkpoint_root(FLAGS.checkpoint)  # a convert output, WORKDIR/checkpoints or WORKDIR
    step = ckpt.latest_step(root) if FLAGS.step is None else FLAGS.step
    saved = ckpt.restore_config(root, step)
    config = model_config_for_strategy(saved, FLAGS.task, FLAGS.strategy)
    mesh = eval_mesh()
    model, config, step = ckpt.load_model(root, step, config=config, sharding=jax.NamedSharding(mesh, jax.P()))
    data_dir = FLAGS.data_dir or data_dir_from_config(config)
    if not data_dir:
        raise app.UsageError("--data_dir is required (the checkpoint's config names no data_dir)")
    if task_spec(FLAGS.task).dataset == "synthetic":  # prepared on demand: by one process first
        from eao_jax.prepare import prepare_once  # noqa: PLC0415

        prepare_once("synthetic", data_dir, FLAGS.tfds_config)
    log_softmax = {"auto": None, "true": True, "false": False}[FLAGS.log_softmax]
    distributed.log_if_main("Evaluating %s step %d on %s over %d devices (%d processes).", FLAGS.checkpoint, step,
                            FLAGS.task, jax.device_count(), jax.process_count())
    results = evaluate_task(model, FLAGS.task, data_dir=data_dir, strategy=FLAGS.strategy, config=config,
                            batch_size=FLAGS.batch_size, tfds_config=FLAGS.tfds_config,
                            loc_embedding=FLAGS.loc_embedding, decoder=FLAGS.decoder, log_softmax=log_softmax,
                            convention=FLAGS.convention, mesh=mesh, checkpoint=os.fspath(root),
                            step=step, output=FLAGS.output, print_table=True)
    if distributed.is_main_process() and FLAGS.output:
        print(f"wrote {FLAGS.output}")
    del results


if __name__ == "__main__":
    define_flags()
    from eao_jax import console  # noqa: PLC0415

    app.run(console.report_errors("evaluate")(main))
