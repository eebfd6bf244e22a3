"""grain pipelines over prepared datasets: training clips, retrieval eval items, localisation windows.

Public API
----------
Training (HowTo100M and the synthetic `train` split, or fine-tuning on MSR-VTT / YouCook2 items):

    it = make_train_iterator(config, process_index=None, process_count=None, seed=None)
    batch = next(it)            # dict of host-local numpy arrays, fixed shapes
    state = it.get_state(); it.set_state(state)      # or, in an Orbax composite checkpoint:
    #   data=grain.checkpoint.CheckpointSave(it) / grain.checkpoint.CheckpointRestore(it)

  Uses config.seed and config.data.*: dataset, data_dir, tfds_config (None: the default builder
  config), split ("train"), videos_per_batch, clips_per_video, n_video_tokens, max_words, n_stft,
  min_time, text_audio_misaligned, num_workers (0: in-process threads; > 0: grain worker processes,
  whose batches reach the main process through shared memory without a copy: `eao_jax.data.workers`),
  read_threads (threads per process, default 2), read_buffer (elements read ahead per reader, default
  4), prefetch (elements buffered per worker), worker_videos (HowTo layouts: videos per element a
  reader builds, a divisor of the process's videos per batch; default the largest up to 16; the main
  process concatenates the elements of a batch into reused arrays), video_strategy (fine-tuning
  only; default "clip").
  Fields beyond those of `eao_jax.defaults.data_config()` are optional.
  The global batch is videos_per_batch x clips_per_video clips, flattened. Every process walks the
  same shuffled, repeated video order (from config.seed); global batch k is positions
  k*videos_per_batch .. (k+1)*videos_per_batch - 1 of it, and process p reads only its contiguous
  block of videos_per_batch / process_count of them. A video's clips are drawn from a generator
  seeded by (seed, its position in the order), so the global batch k (process 0's rows, then process
  1's, ...) is the same whatever the number of processes: a 2-process run and a 1-process run see
  identical global batches, and the iterator state (the number of batches read) means the same
  thing under any process count (see `eao_jax.checkpoint.restore_training`).
  For item datasets (msrvtt, youcook2) every row is a different item with a randomly drawn caption
  (the original's MSR-VTT fine-tuning sampler), videos_per_batch x clips_per_video rows per step,
  split into per-process blocks in the same way.
  Batch (B = local rows): video (B, Nv, Dv), video_mask (B, Nv), text (B, Nt, Dt), text_mask (B, Nt),
  audio (B, 40, T_stft), audio_mask (B, T_stft), audio_STFT_nframes (B,) int32 (-1 for HowTo100M).
  Batches are deterministic from the seed, whatever num_workers and process count (each batch is
  built whole by one transform, each video with its own generator). Iterator state restores into an
  iterator with the same num_workers.

Retrieval evaluation (msrvtt `test`, youcook2 `val`, synthetic `retrieval`):

    data = load_retrieval("youcook2", data_dir, "val", batch_size=16, n_video_tokens=72, n_stft=4608)
    data.num_items, data.complete_dataset_size, data.ids
    for batch in data: ...      # the batch contract plus valid (B,) bool and index (B,) int32

  Every process gets the same number of batches (items process_index::process_count, the last batch
  padded with zero rows, valid False, index -1). `index` is the item's position in the split.
  video_strategy: "clip" | "nearest" | "max_pool" (long-video strategies). cut_clips=n ("cut into clips and
  average"): each item becomes n rows of n_video_tokens tokens / n_stft frames (so pass 12 / 768);
  a dropped clip (<= 70 % real audio, not the first) has valid False but keeps its index; the
  evaluator averages the embeddings of valid rows with the same index.

Localisation (crosstask / mining_youtube `test`, synthetic `localization`):

    data = load_localization("crosstask", data_dir, "test")
    for video in data:          # per video: T one-second windows and K step texts
        video["video"] (T, Nv, Dv), video["audio"] (T, 40, n_stft), video["text"] (K, Nt, Dt),
        video["annotation"] (T, K) float32, video["id"], video["task"], masks, audio_STFT_nframes (T,)
        for chunk in window_batches(video, 64): ...   # fixed-size padded window batches + valid

  As the original, a window's audio keeps its real frames past the mask: the crop of second i is
  frames frame(i)..frame(i + 1) (100 frames; 98 for i = 0) while the mask covers frame(0)..frame(1)
  of the crop (98 frames).

The word-vector table beside the dataset gives Dt; a dataset prepared without --word2vec has none.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import sys
from collections.abc import Iterator
from typing import Any

import grain
import numpy as np

from eao_jax import batch_contract
from eao_jax.data import audio as audio_lib
from eao_jax.data import howto, workers
from eao_jax.data import video as video_lib
from eao_jax.data.dataset import PreparedDataset
from eao_jax.data.howto_store import HowToStore
from eao_jax.data.text import WordTable


def open_dataset(name: str, data_dir: str | os.PathLike, config: str | None = None) -> PreparedDataset:
    """Opens a prepared dataset (pipelines only read: preparing, the synthetic dataset's on-demand
    one included, happens before, in `eao_jax.prepare`)."""
    return PreparedDataset.open(name, data_dir, config)


def _features(rec: dict, use_2d: bool, use_3d: bool):
    f2 = rec["features_2d"] if use_2d else None
    f3 = rec["features_3d"] if use_3d else None
    return f2, f3


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def position_rng(seed: int, position: int) -> np.random.Generator:
    """The generator of the element at `position` of the global training order: it depends on
    the seed and the position only (not on the batch, the process or the process count)."""
    return np.random.Generator(np.random.Philox(np.random.SeedSequence([int(seed), int(position)])))


class ProcessBlocks(grain.MapDataset):
    """This process's contiguous block of every global batch of a (shuffled, repeated) order.

    Global batch k is elements k*global_rows .. (k+1)*global_rows - 1 of `parent`; process p's
    element j (of batch k = j // local_rows) is parent position
    k*global_rows + p*local_rows + j % local_rows, with local_rows = global_rows / process_count.
    Elements are (position, record) pairs, the position seeding that element's randomness
    (`position_rng`). Only this process's records are read.
    """

    def __init__(self, parent: grain.MapDataset, global_rows: int, process_index: int, process_count: int):
        super().__init__(parent)
        if global_rows % process_count:
            raise ValueError(f"{global_rows} rows per global batch are not divisible by the process count "
                             f"{process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}")
        self._global_rows = global_rows
        self._local_rows = global_rows // process_count
        self._offset = process_index * self._local_rows
        self._length = (len(parent) // global_rows) * self._local_rows

    def __len__(self) -> int:
        return self._length

    def position(self, index: int) -> int:
        """The parent (global order) position of this process's element `index`."""
        batch, row = divmod(index, self._local_rows)
        return batch * self._global_rows + self._offset + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        pos = self.position(index)
        return pos, self._parent[pos]

    def __str__(self) -> str:
        return (f"ProcessBlocks(rows {self._offset}..{self._offset + self._local_rows - 1} of every "
                f"{self._global_rows})")


@dataclasses.dataclass
class HowToBatch(grain.transforms.Map):
    """A list of (position, video index) -> `n_clips` random clips of each of those videos, written
    into one batch; each video's clips come from `position_rng(seed, position)`."""

    store: HowToStore
    table: WordTable
    n_clips: int
    fps_2d: float
    fps_3d: float
    video_dim: int
    misaligned: bool
    min_time: float = 8.0
    max_words: int = 20
    n_stft: int = 768
    n_video_tokens: int = 12
    seed: int = 0

    def map(self, items: list[tuple[int, int]]) -> dict[str, np.ndarray]:
        n = self.n_clips
        out = howto.empty_clips(len(items) * n, video_dim=self.video_dim, text_dim=self.table.dim,
                                max_words=self.max_words, n_stft=self.n_stft, n_video_tokens=self.n_video_tokens)
        videos = self.store.videos([int(i) for _, i in items])
        for v, ((position, _), video) in enumerate(zip(items, videos, strict=True)):
            howto.fill_clips(out, v * n, video.caption, video, position_rng(self.seed, position), self.table, n,
                             misaligned=self.misaligned, min_time=self.min_time, max_words=self.max_words,
                             n_stft=self.n_stft, n_video_tokens=self.n_video_tokens, fps_2d=self.fps_2d,
                             fps_3d=self.fps_3d)
        out["audio_STFT_nframes"] = np.full((len(items) * n,), -1, np.int32)  # as the original for HowTo100M
        return out


class BatchBuffers:
    """Reusable host arrays for assembled batches.

    A paper-size batch is ~0.77 GB; a fresh allocation of that size is mapped from the OS and its
    first-touch page faults cost more than copying the clips into it. An array is reused once
    nothing but this pool refers to it any more (the consumer dropped the batch and any transfer of
    it finished), so a batch a caller still holds is never overwritten.
    """

    def __init__(self, max_arrays: int = 32):
        self._arrays: list[np.ndarray] = []
        self._max = max_arrays

    def get(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        for a in self._arrays:
            # references: the list, the loop variable and getrefcount's argument
            if a.shape == shape and a.dtype == dtype and sys.getrefcount(a) <= 3:
                return a
        a = np.empty(shape, dtype)
        if len(self._arrays) < self._max:
            self._arrays.append(a)
        return a


@dataclasses.dataclass
class ConcatBatches:
    """Concatenates the elements of one batch (groups of videos) along the rows, into reused arrays."""

    buffers: BatchBuffers = dataclasses.field(default_factory=BatchBuffers)

    def __call__(self, parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        out = {}
        for k in parts[0]:
            first = parts[0][k]
            rows = sum(p[k].shape[0] for p in parts)
            dst = self.buffers.get((rows,) + first.shape[1:], first.dtype)
            np.concatenate([p[k] for p in parts], out=dst)
            out[k] = dst
        return out

    def __getstate__(self) -> dict:
        return {"buffers": BatchBuffers()}


def worker_group(local_videos: int, requested: int | None) -> int:
    """Videos per element a reader builds (the batch is then `local_videos / group` elements): the
    largest divisor of local_videos not above `requested` (default 16), so that a worker holds a few
    tens of MB of clips instead of a whole batch (~0.77 GB at the paper's 224 x 10 clips)."""
    cap = 16 if requested is None else int(requested)
    if cap <= 0:
        raise ValueError(f"config.data.worker_videos must be positive, got {cap}")
    return max(d for d in range(1, min(cap, local_videos) + 1) if local_videos % d == 0)


@dataclasses.dataclass
class ItemInputs:
    """An items-layout record -> one model input (eval caption, or a random caption when training)."""

    table: WordTable
    use_2d: bool
    use_3d: bool
    n_video_tokens: int
    n_stft: int
    max_words: int = 20
    strategy: str = "clip"
    n_clips: int = 1  # > 1: cut into clips (n_video_tokens / n_stft per clip)

    def __call__(self, rec: dict, caption: str | None = None) -> dict[str, np.ndarray]:
        f2, f3 = _features(rec, self.use_2d, self.use_3d)
        video, video_mask = video_lib.video_tokens(f2, f3, self.n_video_tokens * self.n_clips, self.strategy)
        audio, audio_mask, nframes = audio_lib.pad(rec["audio"], self.n_stft * self.n_clips)
        text, text_mask = self.table.encode(rec["caption"] if caption is None else caption, self.max_words)
        if self.n_clips > 1:
            c = audio_lib.cut_into_clips(video, video_mask, audio, audio_mask, nframes, self.n_clips)
            n = self.n_clips
            return dict(video=c["video"], video_mask=c["video_mask"], audio=c["audio"], audio_mask=c["audio_mask"],
                        audio_STFT_nframes=c["audio_STFT_nframes"], keep=c["keep"],
                        text=np.broadcast_to(text, (n,) + text.shape).copy(),
                        text_mask=np.broadcast_to(text_mask, (n,) + text_mask.shape).copy())
        return dict(video=video[None], video_mask=video_mask[None], text=text[None], text_mask=text_mask[None],
                    audio=audio[None], audio_mask=audio_mask[None],
                    audio_STFT_nframes=np.asarray([nframes], np.int32), keep=np.ones((1,), bool))


@dataclasses.dataclass
class RandomCaptionBatch(grain.transforms.Map):
    """Fine-tuning sampler: each (position, item) with a caption drawn uniformly from its captions
    (by `position_rng(seed, position)`), stacked."""

    inputs: ItemInputs
    seed: int = 0

    def map(self, recs: list[tuple[int, dict]]) -> dict[str, np.ndarray]:
        rows = []
        for position, rec in recs:
            caps = rec["captions"] or [rec["caption"]]
            rng = position_rng(self.seed, position)
            rows.append(self.inputs(rec, caps[int(rng.integers(len(caps)))]))
        out = {}
        for k in batch_contract.KEYS:
            parts = [r[k] for r in rows]
            shape = (sum(len(p) for p in parts),) + parts[0].shape[1:]
            out[k] = np.concatenate(parts, out=workers.empty(shape, parts[0].dtype))  # shared memory in a worker
        return out


def _cfg(data, key: str, default):
    return data[key] if key in data and data[key] is not None else default


def train_dataset(config, *, process_index: int | None = None, process_count: int | None = None,
                  seed: int | None = None, elements_only: bool = False) -> grain.IterDataset:
    """The training `IterDataset` (see the module docstring); `make_train_iterator` iterates it.

    `elements_only`: the elements one reader (a worker process, or the training process with
    num_workers=0) builds, before worker processes and batch assembly (for the loader benchmark).
    """
    import jax

    data = config.data
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    seed = int(config.seed if seed is None else seed)
    vpb, cpv = int(data.videos_per_batch), int(data.clips_per_video)
    if vpb <= 0 or cpv <= 0:
        raise ValueError(f"config.data.videos_per_batch ({vpb}) and clips_per_video ({cpv}) must be positive")
    if vpb % pc:
        raise ValueError(f"config.data.videos_per_batch={vpb} is not divisible by the process count {pc}")
    if data.data_dir is None:
        raise ValueError("config.data.data_dir is not set (the TFDS data_dir written by eao_jax.prepare)")
    ds = open_dataset(data.dataset, data.data_dir, _cfg(data, "tfds_config", None))
    split = _cfg(data, "split", "train")
    layout = ds.layout(split)
    table = ds.word_table()
    fps_2d, fps_3d = ds.fps
    local_videos = vpb // pc
    group = 1
    if layout in ("howto", "howto_chunks"):
        store = HowToStore(ds, split)
        n_items = len(store)
        transform = HowToBatch(
            store=store, table=table, n_clips=cpv, fps_2d=fps_2d, fps_3d=fps_3d, video_dim=ds.video_dim,
            misaligned=bool(data.text_audio_misaligned), min_time=float(data.min_time),
            max_words=int(data.max_words), n_stft=int(data.n_stft), n_video_tokens=int(data.n_video_tokens),
            seed=seed)
        group = worker_group(local_videos, _cfg(data, "worker_videos", None))
        rows = group
    elif layout == "items":
        src = ds.source(split)
        n_items = len(src)
        transform = RandomCaptionBatch(ItemInputs(
            table=table, use_2d=ds.use_2d, use_3d=ds.use_3d, n_video_tokens=int(data.n_video_tokens),
            n_stft=int(data.n_stft), max_words=int(data.max_words),
            strategy=_cfg(data, "video_strategy", "clip")), seed=seed)
        rows = local_videos * cpv
    else:
        raise ValueError(f"{ds.path}: split {split!r} has layout {layout!r}; training needs 'howto', "
                         "'howto_chunks' or 'items'")
    if n_items == 0:
        raise ValueError(f"{ds.path}: split {split!r} is empty")
    # Shuffle (reshuffled each epoch) and repeat: the global order of item indices, the same on every
    # process (HowTo stores are read inside the transform; item records are read by grain).
    if layout == "items":
        order = grain.MapDataset.source(src).seed(seed).shuffle().repeat()
    else:
        order = grain.MapDataset.range(n_items).seed(seed).shuffle().repeat()
    per_process = rows * (local_videos // group) if layout != "items" else rows
    # This process's block of each global batch (contiguous, so that the global batch assembled by
    # `jax.make_array_from_process_local_data` in process order is the 1-process batch).
    local = ProcessBlocks(order, per_process * pc, pi, pc)
    # Each element (a group of videos, or a whole items batch) is built by one transform, each video
    # with its own generator, so the content does not depend on threads, workers or grouping.
    elements = local.batch(rows, drop_remainder=True, batch_fn=list).map(transform)
    # read_buffer counts elements: whole batches for item datasets, groups of videos for HowTo.
    read = grain.ReadOptions(num_threads=int(_cfg(data, "read_threads", 2)),
                             prefetch_buffer_size=int(_cfg(data, "read_buffer", 4)))
    it = elements.to_iter_dataset(read)
    if elements_only:
        return it
    n_workers = int(_cfg(data, "num_workers", 0))
    loader = None
    if n_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's worker setup reads its absl flags (defaults outside an app)
            flags.FLAGS.mark_as_parsed()
        # Shared memory named per run, left-overs of killed runs removed (eao_jax.data.workers).
        workers.remove_orphans()
        loader = workers.Loader.new()
        it = grain.experimental.WithOptionsIterDataset(it, workers.NO_SHM_COPIES)
        it = it.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=n_workers, per_worker_buffer_size=int(_cfg(data, "prefetch", 2))),
            worker_init_fn=functools.partial(workers.in_worker_process, loader))
    if layout != "items":
        it = it.batch(local_videos // group, drop_remainder=True, batch_fn=ConcatBatches())
    if loader is not None:
        it = workers.WatchWorkers(it, loader)
    return it


def make_train_iterator(config, *, process_index: int | None = None, process_count: int | None = None,
                        seed: int | None = None) -> grain.DatasetIterator:
    """An iterator of host-local training batches with checkpointable state (get_state / set_state)."""
    return iter(train_dataset(config, process_index=process_index, process_count=process_count, seed=seed))


# --------------------------------------------------------------------------------------------
# Retrieval evaluation
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass
class _EvalMap:
    inputs: ItemInputs

    def __call__(self, rec: dict) -> dict[str, np.ndarray]:
        return self.inputs(rec)


class RetrievalData:
    """Fixed-shape padded retrieval-evaluation batches of one split (see the module docstring).

    Attributes:
      num_items: items in the prepared split (evaluated).
      complete_dataset_size: items of the released split (recall denominator; >= num_items).
      ids: (num_items,) item ids in split order (`index` refers to these).
      video_dim / text_dim: Dv and Dt of the batches.
    """

    def __init__(self, ds: PreparedDataset, split: str, *, batch_size: int, n_video_tokens: int, n_stft: int,
                 max_words: int = 20, video_strategy: str = "clip", cut_clips: int = 0,
                 process_index: int = 0, process_count: int = 1, read_threads: int = 2):
        if ds.layout(split) != "items":
            raise ValueError(f"{ds.path}: split {split!r} is not a retrieval split (layout {ds.layout(split)!r})")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if cut_clips and video_strategy != "clip":
            raise ValueError("cut_clips needs video_strategy='clip' (as the original)")
        if n_stft % 64:
            raise ValueError(f"n_stft={n_stft} must be a multiple of 64 (DAVEnet v2 downsampling)")
        self.dataset, self.split = ds, split
        self.batch_size = batch_size
        self.process_index, self.process_count = process_index, process_count
        self.read_threads = read_threads
        self.table = ds.word_table()
        self.inputs = ItemInputs(table=self.table, use_2d=ds.use_2d, use_3d=ds.use_3d,
                                 n_video_tokens=n_video_tokens, n_stft=n_stft, max_words=max_words,
                                 strategy=video_strategy, n_clips=max(1, int(cut_clips)))
        self._src = ds.source(split)
        self.num_items = len(self._src)
        self.complete_dataset_size = ds.complete_dataset_size(split)
        self._ids: list[str] | None = None
        self.video_dim = ds.video_dim
        self.text_dim = self.table.dim

    @property
    def ids(self) -> list[str]:
        if self._ids is None:
            self._ids = [self._src[i]["id"] for i in range(self.num_items)]
        return self._ids

    @property
    def num_batches(self) -> int:
        """Batches per process (the same on every process)."""
        per_process = math.ceil(self.num_items / self.process_count)
        return max(1, math.ceil(per_process / self.batch_size))

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        pi, pc, bs = self.process_index, self.process_count, self.batch_size
        local = list(range(pi, self.num_items, pc))
        ds = (grain.MapDataset.source(self._src)[pi::pc].map(_EvalMap(self.inputs))
              .to_iter_dataset(grain.ReadOptions(num_threads=self.read_threads, prefetch_buffer_size=2 * bs)))
        n_clips = self.inputs.n_clips
        elements = iter(ds)
        for b in range(self.num_batches):
            idx = local[b * bs:(b + 1) * bs]
            rows = [next(elements) for _ in idx]
            yield _pad_eval_batch(rows, idx, bs, n_clips, self._row_shapes())

    def _row_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        inp, n = self.inputs, 1
        nv, ta = inp.n_video_tokens, inp.n_stft
        return {"video": ((n, nv, self.video_dim), np.float32), "video_mask": ((n, nv), np.float32),
                "text": ((n, inp.max_words, self.text_dim), np.float32), "text_mask": ((n, inp.max_words), np.float32),
                "audio": ((n, batch_contract.N_MELS, ta), np.float32), "audio_mask": ((n, ta), np.float32),
                "audio_STFT_nframes": ((n,), np.int32)}


def _pad_eval_batch(rows: list[dict], idx: list[int], bs: int, n_clips: int, shapes) -> dict[str, np.ndarray]:
    out = {}
    for k, (shape, dtype) in shapes.items():
        arr = np.zeros((bs * n_clips,) + shape[1:], dtype)
        for j, r in enumerate(rows):
            arr[j * n_clips:(j + 1) * n_clips] = r[k]
        out[k] = arr
    valid = np.zeros((bs * n_clips,), bool)
    index = np.full((bs * n_clips,), -1, np.int32)
    for j, (r, i) in enumerate(zip(rows, idx, strict=True)):
        valid[j * n_clips:(j + 1) * n_clips] = r["keep"]
        index[j * n_clips:(j + 1) * n_clips] = i
    out["valid"], out["index"] = valid, index
    return out


def load_retrieval(dataset: str, data_dir: str | os.PathLike, split: str, *, config: str | None = None,
                   batch_size: int, n_video_tokens: int, n_stft: int, max_words: int = 20,
                   video_strategy: str = "clip", cut_clips: int = 0, process_index: int | None = None,
                   process_count: int | None = None) -> RetrievalData:
    """Retrieval-evaluation batches of a prepared split (see `RetrievalData` and the module docstring)."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    return RetrievalData(open_dataset(dataset, data_dir, config), split, batch_size=batch_size,
                         n_video_tokens=n_video_tokens, n_stft=n_stft, max_words=max_words,
                         video_strategy=video_strategy, cut_clips=cut_clips,
                         process_index=process_index, process_count=process_count)


# --------------------------------------------------------------------------------------------
# Localisation
# --------------------------------------------------------------------------------------------
def localization_windows(rec: dict, table: WordTable, *, use_2d: bool = True, use_3d: bool = True,
                         fps_2d: float = 1.0, fps_3d: float = 1.5, n_video_tokens: int = 12, n_stft: int = 768,
                         max_words: int = 20, clip_radius: int = 0, audio_padding: int = 0) -> dict[str, Any]:
    """One localisation video -> its T one-second windows and K step texts.

    Window i covers seconds [i - r, i + r + 1] clipped to [0, T]; its audio is the spectrogram of the
    window widened by `audio_padding` s per side, padded to n_stft frames, with the mask zeroed outside
    the unwidened window; its video takes features floor(start*fps) to ceil(end*fps) ("clip").
    """
    ann = np.asarray(rec["annotation"])
    t_total = ann.shape[0]
    f2, f3 = _features(rec, use_2d, use_3d)
    mel = rec["audio"]
    video = np.zeros((t_total, n_video_tokens, 0), np.float32)
    audio = np.zeros((t_total, batch_contract.N_MELS, n_stft), np.float32)
    amask = np.zeros((t_total, n_stft), np.float32)
    nfr = np.zeros((t_total,), np.int32)
    vids, vmasks = [], []
    for i in range(t_total):
        start, end = max(0, i - clip_radius), min(i + clip_radius + 1, t_total)
        p_start, p_end = max(0, start - audio_padding), min(end + audio_padding, t_total)
        a, m, n = audio_lib.pad(audio_lib.crop(mel, p_start, p_end), n_stft)
        first = max(0, audio_lib.time_to_frame(start - p_start))
        last = audio_lib.time_to_frame(end - p_start)
        m[:first] = 0.0
        m[last:] = 0.0
        audio[i], amask[i], nfr[i] = a, m, n
        s2 = None if f2 is None else video_lib.time_slice(f2, fps_2d, start, end, accurate_borders=True)
        s3 = None if f3 is None else video_lib.time_slice(f3, fps_3d, start, end, accurate_borders=True)
        v, vm = video_lib.video_tokens(s2, s3, n_video_tokens, "clip")
        vids.append(v)
        vmasks.append(vm)
    if vids:
        video = np.stack(vids)
    texts, tmasks = zip(*(table.encode(s, max_words) for s in rec["steps"]), strict=True) if rec["steps"] else ((), ())
    k = ann.shape[1]
    return dict(id=rec["id"], task=rec.get("task", ""), steps=list(rec["steps"]),
                video=video, video_mask=np.stack(vmasks) if vmasks else np.zeros((0, n_video_tokens), np.float32),
                audio=audio, audio_mask=amask, audio_STFT_nframes=nfr,
                text=np.stack(texts) if texts else np.zeros((0, max_words, table.dim), np.float32),
                text_mask=np.stack(tmasks) if tmasks else np.zeros((0, max_words), np.float32),
                annotation=ann.astype(np.float32).reshape(t_total, k))


class LocalizationData:
    """Iterates the videos of a localisation split as dicts of windows (see `localization_windows`)."""

    def __init__(self, ds: PreparedDataset, split: str, **window_kw):
        if ds.layout(split) != "localization":
            raise ValueError(f"{ds.path}: split {split!r} is not a localisation split (layout {ds.layout(split)!r})")
        self.dataset, self.split = ds, split
        self.table = ds.word_table()
        fps_2d, fps_3d = ds.fps
        self.window_kw = dict(use_2d=ds.use_2d, use_3d=ds.use_3d, fps_2d=fps_2d, fps_3d=fps_3d, **window_kw)
        self._src = ds.source(split)
        self.num_videos = len(self._src)
        self.complete_dataset_size = ds.complete_dataset_size(split)

    def __len__(self) -> int:
        return self.num_videos

    def __getitem__(self, i: int) -> dict[str, Any]:
        return localization_windows(self._src[i], self.table, **self.window_kw)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(self.num_videos):
            yield self[i]


def load_localization(dataset: str, data_dir: str | os.PathLike, split: str = "test", *,
                      config: str | None = None, n_video_tokens: int = 12, n_stft: int = 768, max_words: int = 20,
                      clip_radius: int = 0, audio_padding: int = 0) -> LocalizationData:
    """Per-video localisation inputs of a prepared split (see the module docstring)."""
    return LocalizationData(open_dataset(dataset, data_dir, config), split, n_video_tokens=n_video_tokens,
                            n_stft=n_stft, max_words=max_words, clip_radius=clip_radius, audio_padding=audio_padding)


def window_batches(video: dict[str, Any], batch_size: int) -> Iterator[dict[str, np.ndarray]]:
    """Fixed-size chunks of a video's windows: video/audio keys padded with zeros, plus valid (B,) bool."""
    keys = ("video", "video_mask", "audio", "audio_mask", "audio_STFT_nframes")
    t_total = video["video"].shape[0]
    for s in range(0, t_total, batch_size):
        out = {}
        n = min(batch_size, t_total - s)
        for k in keys:
            arr = np.zeros((batch_size,) + video[k].shape[1:], video[k].dtype)
            arr[:n] = video[k][s:s + n]
            out[k] = arr
        out["valid"] = np.arange(batch_size) < n
        yield out
