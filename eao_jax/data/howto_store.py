"""Random access to the videos of a prepared HowTo-layout split, for training clip sampling.

Two record layouts (written by tfds_builders/howto100m):
  howto         one record per video (features, spectrogram, captions), decoded through TFDS;
  howto_chunks  per video a header record (captions, lengths) and chunk records of `chunk_seconds`;
                `train_index.npz` beside the records gives each video's first record. A video is
                opened by reading its header only; `ChunkedVideo.fetch` then reads the chunks the
                planned clips touch (one to three per clip, shared between a video's clips), parsed
                straight from the protobuf bytes (no per-feature TFDS decoding).

Both give objects with the `eao_jax.data.howto.ArrayVideo` interface plus `.caption` (a
`howto.Caption`). The store is picklable (grain worker processes each open their own readers) and
counts the records and bytes it read (`records_read`, `bytes_read`), for the loader benchmark.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from eao_jax import batch_contract
from eao_jax.data import records
from eao_jax.data.howto import ArrayVideo, Caption, ClipReads

INDEX_FILE = "train_index.npz"
LAYOUTS = ("howto", "howto_chunks")
_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Asks glibc to keep freed blocks below 64 MB for reuse instead of returning them to the OS.

    A reader allocates and frees ~150 KB records and ~50 MB clip arrays continuously; by default
    glibc maps and unmaps them, and first-touch page faults then cost as much as the reading
    (measured: ~15 % of the loader's CPU time on a VM). The process keeps its peak working set
    instead. No effect where mallopt is unavailable (not glibc).
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 512 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


class HowToStore:
    """The videos of one HowTo-layout split of a `PreparedDataset` (see the module docstring)."""

    # Records and bytes read by every store of this process (the loader benchmark reads them).
    total_records_read = 0
    total_bytes_read = 0

    def __init__(self, ds: Any, split: str):
        self.layout = ds.layout(split)
        if self.layout not in LAYOUTS:
            raise ValueError(f"{ds.path}: split {split!r} has layout {self.layout!r}, not a HowTo layout {LAYOUTS}")
        self.path, self.split = ds.path, split
        self.use_2d, self.use_3d = ds.use_2d, ds.use_3d
        self.records_read = 0
        self.bytes_read = 0
        if self.layout == "howto":
            self._src = ds.source(split)
            self._num_videos = len(self._src)
            return
        keep_freed_memory()
        md = ds.metadata
        self._src = ds.raw_source(split)
        index_path = os.path.join(ds.path, INDEX_FILE)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"{index_path}: the chunked split's video index is missing (prepare again)")
        with np.load(index_path) as z:
            self._first = np.ascontiguousarray(z["first_record"], np.int64)
            self._count = np.ascontiguousarray(z["num_records"], np.int64)
        self._num_videos = len(self._first)
        rows = md["chunk_rows"]
        self.rows = (int(rows["rows_2d"]), int(rows["rows_3d"]), int(rows["frames"]))
        self.feature_dtype = np.dtype(md.get("feature_dtype", "float16"))
        self.audio_dtype = np.dtype(md.get("audio_dtype", "float16"))
        self.dims = (int(md.get("dim_2d") or 0), int(md.get("dim_3d") or 0))

    def __len__(self) -> int:
        return self._num_videos

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        keep_freed_memory()  # in a grain worker process

    def read_raw(self, positions: list[int]) -> list[bytes]:
        out = [self._src[int(p)] for p in positions]
        self._count_read(len(out), sum(len(r) for r in out))
        return out

    def _count_read(self, n: int, nbytes: int) -> None:
        self.records_read += n
        self.bytes_read += nbytes
        HowToStore.total_records_read += n
        HowToStore.total_bytes_read += nbytes

    def videos(self, indices: list[int]) -> list[Any]:
        """The videos at `indices` (positions in the split's video order), headers read."""
        if self.layout == "howto":
            out = []
            for i in indices:
                rec = self._src[int(i)]
                self._count_read(1, sum(v.nbytes for v in rec.values() if isinstance(v, np.ndarray)))
                v = ArrayVideo(rec["audio"], rec["features_2d"] if self.use_2d else None,
                               rec["features_3d"] if self.use_3d else None)
                v.caption = Caption({"start": rec["caption_start"], "end": rec["caption_end"],
                                     "text": rec["caption_text"]})
                out.append(v)
            return out
        raws = self.read_raw([int(self._first[i]) for i in indices])
        return [ChunkedVideo(self, int(self._first[i]), int(self._count[i]) - 1, records.parse_example(r))
                for i, r in zip(indices, raws, strict=True)]

    def whole(self, index: int) -> dict[str, Any]:
        """Video `index` as whole arrays: id, features_2d, features_3d ((0, 0) when unused), audio,
        caption_start, caption_end, caption_text (str) -- the same in both layouts."""
        v = self.videos([index])[0]
        if isinstance(v, ChunkedVideo):
            v.fetch_all()
            f2, f3 = (v._block(p, 0, v.n_chunks - 1) if v.n_chunks else None for p in (0, 1))
            mel = v._block(2, 0, v.n_chunks - 1)
            vid = v.id
        else:
            f2, f3, mel = v.f2, v.f3, v.mel
            vid = self._src[int(index)]["id"]
        cap = v.caption
        empty = np.zeros((0, 0), mel.dtype)
        return dict(id=vid, features_2d=f2 if self.use_2d else empty, features_3d=f3 if self.use_3d else empty,
                    audio=mel, caption_start=cap.start, caption_end=cap.end,
                    caption_text=[t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in cap.text])

    def __getstate__(self) -> dict:
        s = dict(self.__dict__)
        s["records_read"] = s["bytes_read"] = 0
        return s


class ChunkedVideo:
    """A video in the chunked layout: lengths and captions from its header, rows from its chunks."""

    def __init__(self, store: HowToStore, first_record: int, n_chunks: int, header: Any):
        if records.raw_int(header["chunk"]) != -1:
            raise ValueError(f"{store.path}: record {first_record} is not a video header (index out of date?)")
        self._store, self._first = store, first_record
        self.id = records.raw_text(header["id"])
        self.n_chunks = n_chunks
        self.n_frames = records.raw_int(header["length_audio"])
        self.n_2d = records.raw_int(header["length_2d"]) if store.use_2d else None
        self.n_3d = records.raw_int(header["length_3d"]) if store.use_3d else None
        self.caption = Caption({"start": records.raw_array(header["caption_start"], np.float64),
                                "end": records.raw_array(header["caption_end"], np.float64),
                                "text": [bytes(t) for t in header["caption_text"]]})
        self._chunks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def fetch_all(self) -> None:
        self._read(range(self.n_chunks))

    def fetch(self, reads: list[ClipReads]) -> None:
        r2, r3, ra = self._store.rows
        need: set[int] = set()
        for r in reads:
            if r.a_hi > r.a_lo:
                need.update(range(r.a_lo // ra, (r.a_hi - 1) // ra + 1))
            if r.idx_2d is not None and len(r.idx_2d):
                need.update(range(int(r.idx_2d[0]) // r2, int(r.idx_2d[-1]) // r2 + 1))
            if r.r3_lo is not None and r.r3_hi > r.r3_lo:
                need.update(range(r.r3_lo // r3, (r.r3_hi - 1) // r3 + 1))
        self._read(need)

    def _read(self, chunks) -> None:
        missing = sorted(c for c in chunks if c not in self._chunks)
        if missing and missing[-1] >= self.n_chunks:
            raise IndexError(f"{self._store.path}: video {self.id!r} has {self.n_chunks} chunks, chunk {missing[-1]} "
                             "requested")
        store = self._store
        d2, d3 = store.dims
        for c, raw in zip(missing, store.read_raw([self._first + 1 + c for c in missing]), strict=True):
            f = records.parse_example(raw)
            self._chunks[c] = (records.raw_array(f["features_2d"], store.feature_dtype, (-1, d2) if d2 else None),
                               records.raw_array(f["features_3d"], store.feature_dtype, (-1, d3) if d3 else None),
                               records.raw_array(f["audio"], store.audio_dtype, (batch_contract.N_MELS, -1)))

    def _block(self, part: int, c0: int, c1: int) -> np.ndarray:
        if c0 == c1:
            return self._chunks[c0][part]
        return np.concatenate([self._chunks[c][part] for c in range(c0, c1 + 1)], axis=1 if part == 2 else 0)

    def _span(self, part: int, lo: int, hi: int) -> np.ndarray:
        """Rows (frames for audio) [lo, hi) of one part, copying only when they span chunks."""
        rows = self._store.rows[part]
        c0, c1 = lo // rows, (hi - 1) // rows
        pieces = []
        for c in range(c0, c1 + 1):
            arr, base = self._chunks[c][part], c * rows
            s, e = max(lo, base) - base, min(hi, base + rows) - base
            pieces.append(arr[:, s:e] if part == 2 else arr[s:e])
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1 if part == 2 else 0)

    def frames(self, lo: int, hi: int) -> np.ndarray:
        return self._span(2, lo, hi)

    def rows_2d(self, idx: np.ndarray) -> np.ndarray:
        if not len(idx):
            return np.zeros((0, self._store.dims[0]), self._store.feature_dtype)
        lo = int(idx[0])
        return self._span(0, lo, int(idx[-1]) + 1)[idx - lo]

    def rows_3d(self, lo: int, hi: int) -> np.ndarray:
        if hi <= lo:
            return np.zeros((0, self._store.dims[1]), self._store.feature_dtype)
        return self._span(1, lo, hi)
