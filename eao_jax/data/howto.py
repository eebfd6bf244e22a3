"""HowTo100M training clips, sampled as the original's HowTo100M loader samples them.

Per clip: an 8 s window is drawn uniformly inside the video; the ASR segment covering its start (or
else its end) is grown with its nearest neighbours until it spans `min_time` seconds; the clip's
text is the words of the grown span (words of added segments appended at the end), its video the
2D/3D features of the span ("clip" strategy, 12 tokens), its audio the 768 STFT frames from the span
start, or, with the text-audio misalignment trick, from [start + min_time/2, start + 3 min_time/2].
A window that no segment covers has no text (all-zero mask), audio from the window start (not
shifted) and video of the window.

`clip_from_segment` is the deterministic part (given the segment index); `sample_clip` adds the
random window; `video_clips` / `fill_clips` build the clips of one video (the pipeline writes them
straight into the batch arrays).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from eao_jax import batch_contract
from eao_jax.data import audio as audio_lib
from eao_jax.data import video as video_lib
from eao_jax.data.records import half_to_float32
from eao_jax.data.text import WordTable, tokenize


class Caption:
    """Parallel ASR segment arrays (start (S,), end (S,), text (S,)) with lazily tokenised texts."""

    def __init__(self, caption: Mapping[str, Sequence]):
        self.start = np.asarray(caption["start"], dtype=np.float64).reshape(-1)
        self.end = np.asarray(caption["end"], dtype=np.float64).reshape(-1)
        self.text = caption["text"]
        if not (len(self.start) == len(self.end) == len(self.text)):
            raise ValueError(
                f"caption: start/end/text lengths differ ({len(self.start)}, {len(self.end)}, {len(self.text)})")
        self._tokens: dict[int, list[str]] = {}

    def __len__(self) -> int:
        return len(self.start)

    def tokens(self, i: int) -> list[str]:
        t = self._tokens.get(i)
        if t is None:
            s = self.text[i]
            if isinstance(s, bytes):
                s = s.decode("utf-8")
            t = self._tokens[i] = tokenize(s)
        return t


def grow_segment(caption: Caption, ind: int, min_time: float) -> tuple[float, float, list[str]]:
    """Grows segment `ind` with neighbours until it spans `min_time` s. Returns (start, end, words)."""
    n = len(caption)
    starts, ends = caption.start, caption.end
    s = e = ind
    words = list(caption.tokens(ind))
    diff = ends[e] - starts[s]
    while diff < min_time:
        if s > 0 and e < n - 1:
            d_next = ends[e + 1] - starts[s]
            d_prev = ends[e] - starts[s - 1]
            if d_prev <= d_next:  # the neighbour giving the shorter span
                s -= 1
                words.extend(caption.tokens(s))
            else:
                e += 1
                words.extend(caption.tokens(e))
        elif s > 0:
            s -= 1
            words.extend(caption.tokens(s))
        elif e < n - 1:
            e += 1
            words.extend(caption.tokens(e))
        else:
            break
        diff = ends[e] - starts[s]
    return float(starts[s]), float(ends[e]), words


def _plan_segment(caption: Caption, ind: int, misaligned: bool, min_time: float):
    """(start, end, words, audio frame slice) of the clip grown from segment `ind`."""
    start, end, words = grow_segment(caption, ind, min_time)
    if misaligned:
        # The original's backward-shift branch is unreachable ("random > 0"): always +min_time/2.
        a_start = start + 0.5 * min_time
        a_end = a_start + min_time
    else:
        a_start, a_end = start, end
    return start, end, words, slice(max(0, audio_lib.time_to_frame(a_start)), audio_lib.time_to_frame(a_end))


def _plan_random(caption: Caption, n_frames: int, rng: np.random.Generator, misaligned: bool, min_time: float,
                 n_stft: int):
    duration = int(audio_lib.frame_to_time(n_frames))
    start = rng.random() * max(0, duration - min_time)
    end = start + min_time
    if len(caption):
        starts, ends = caption.start, caption.end
        i_start = max(0, int(np.searchsorted(starts, start, side="left")) - 1)
        i_end = max(0, int(np.searchsorted(starts, end, side="left")) - 1)
        if starts[i_start] <= start <= ends[i_start]:
            return _plan_segment(caption, i_start, misaligned, min_time)
        if starts[i_end] <= end <= ends[i_end]:
            return _plan_segment(caption, i_end, misaligned, min_time)
    # No narration in the window: empty text, audio from the window start (not shifted).
    first = max(0, audio_lib.time_to_frame(start))
    return start, end, None, slice(first, first + n_stft)


class ArrayVideo:
    """A video held as whole arrays: mel (40, T), 2D (T2, D2) or None, 3D (T3, D3) or None.

    The clip writer reads videos through this interface (lengths, `frames`, `rows_2d`, `rows_3d`), so a
    store that holds videos in chunk records (`eao_jax.data.howto_store`) serves the same code.
    """

    def __init__(self, mel_spec: np.ndarray, features_2d: np.ndarray | None, features_3d: np.ndarray | None):
        self.mel, self.f2, self.f3 = mel_spec, features_2d, features_3d
        self.n_frames = int(mel_spec.shape[1])
        self.n_2d = None if features_2d is None else int(features_2d.shape[0])
        self.n_3d = None if features_3d is None else int(features_3d.shape[0])

    def fetch(self, reads: list[ClipReads]) -> None:
        """Makes the rows of `reads` available (nothing to do for whole arrays)."""

    def frames(self, lo: int, hi: int) -> np.ndarray:
        return self.mel[:, lo:hi]

    def rows_2d(self, idx: np.ndarray) -> np.ndarray:
        return self.f2[idx]

    def rows_3d(self, lo: int, hi: int) -> np.ndarray:
        return self.f3[lo:hi]


@dataclasses.dataclass(frozen=True)
class ClipReads:
    """The rows one planned clip reads: audio frames [a_lo, a_hi), 2D rows idx_2d (None: unused),
    3D rows [r3_lo, r3_hi) (r3_lo None: unused)."""

    a_lo: int
    a_hi: int
    idx_2d: np.ndarray | None
    r3_lo: int | None
    r3_hi: int | None


def _span(lo: int, hi: int, n: int) -> tuple[int, int]:
    """Python slice semantics of [lo:hi] on a length-n axis (negative ends count from the end)."""
    a, b, _ = slice(lo, hi).indices(n)
    return a, max(a, b)


def clip_reads(plan, video, *, n_stft: int, n_video_tokens: int, fps_2d: float, fps_3d: float) -> ClipReads:
    """What the clip of `plan` (start, end, words, audio frame slice) reads from `video`."""
    start, end, _, frames = plan
    a_lo, a_hi = _span(frames.start, frames.stop, video.n_frames)
    a_hi = min(a_hi, a_lo + n_stft)
    n2 = n3 = None
    if video.n_2d is not None:
        lo2, hi2 = _span(int(start * fps_2d), int(end * fps_2d) + 1, video.n_2d)
        n2 = hi2 - lo2
    if video.n_3d is not None:
        lo3, hi3 = _span(int(start * fps_3d), int(end * fps_3d) + 1, video.n_3d)
        n3 = hi3 - lo3
    idx2, m = video_lib.clip_rows(n2, n3, n_video_tokens)
    if n3 is None:  # 2D only: its first m rows
        return ClipReads(a_lo, a_hi, lo2 + np.arange(m), None, None)
    return ClipReads(a_lo, a_hi, None if idx2 is None else lo2 + idx2, lo3, lo3 + m)


def _write(out: dict[str, np.ndarray], row: int, plan, reads: ClipReads, video, table: WordTable, *,
           max_words: int) -> int:
    """Writes every value of clip row `row` (padding included, so the arrays need no zero fill);
    returns its real audio frames."""
    words = plan[2]
    n = max(reads.a_hi - reads.a_lo, 0)
    audio, amask = out["audio"][row], out["audio_mask"][row]
    if n:
        half_to_float32(video.frames(reads.a_lo, reads.a_hi), out=audio[:, :n])  # float16 storage
    audio[:, n:] = 0.0
    amask[:n] = 1.0
    amask[n:] = 0.0
    ids = table.ids(words)[:max_words] if words else []  # out-of-vocabulary words dropped before truncation
    k = len(ids)
    text, tmask = out["text"][row], out["text_mask"][row]
    if k:
        np.take(table.vectors, ids, axis=0, out=text[:k])
    text[k:] = 0.0
    tmask[:k] = 1.0
    tmask[k:] = 0.0
    rows2 = None if reads.idx_2d is None else video.rows_2d(reads.idx_2d)
    rows3 = None if reads.r3_lo is None else video.rows_3d(reads.r3_lo, reads.r3_hi)
    vid, vmask = out["video"][row], out["video_mask"][row]
    m = video_lib.write_clip_tokens(vid, vmask, rows2, rows3)
    vid[m:] = 0.0
    vmask[m:] = 0.0
    return n


def empty_clips(n: int, *, video_dim: int, text_dim: int, max_words: int = 20, n_stft: int = 768,
                n_video_tokens: int = 12) -> dict[str, np.ndarray]:
    """Uninitialised clip arrays for n rows (the batch contract's shapes); `_write` fills every value.

    In a grain worker process they are allocated in shared memory (`workers.empty`), which grain
    hands to the training process without another copy of the batch.
    """
    shapes = dict(video=(n, n_video_tokens, video_dim), video_mask=(n, n_video_tokens), text=(n, max_words, text_dim),
                  text_mask=(n, max_words), audio=(n, batch_contract.N_MELS, n_stft), audio_mask=(n, n_stft))
    from eao_jax.data import workers  # noqa: PLC0415 (imports grain: not for the CLIs' --help)

    return {k: workers.empty(v, np.float32) for k, v in shapes.items()}


def _video_dim(features_2d, features_3d) -> int:
    return sum(int(f.shape[1]) for f in (features_2d, features_3d) if f is not None)


def clip_from_segment(caption: Mapping[str, Sequence], mel_spec: np.ndarray, features_2d: np.ndarray | None,
                      features_3d: np.ndarray | None, index: int, *, word_vectors: np.ndarray | WordTable,
                      vocab: Sequence[str] | None = None, misaligned: bool, min_time: float = 8.0,
                      max_words: int = 20, n_stft: int = 768, n_video_tokens: int = 12) -> dict:
    """The training clip built around ASR segment `index` (deterministic).

    Args:
      caption: mapping with parallel `start` (S,), `end` (S,) seconds and `text` (S,) strings.
      mel_spec: (40, T) log-mel spectrogram at 100 frames/s.
      features_2d: (T2, D2) at 1/s or None; features_3d: (T3, D3) at 1.5/s or None.
      index: the segment the clip is grown from.
      word_vectors: (N, Dt) vectors of `vocab` (N,), or a `WordTable` (then `vocab` is unused).
      misaligned: take audio from [start + min_time/2, start + 3 min_time/2] (the main model).

    Returns:
      dict with start, end (seconds of the grown span), text (max_words, Dt), text_mask (max_words,),
      audio (40, n_stft), audio_mask (n_stft,), video (n_video_tokens, D2 + D3), video_mask
      (n_video_tokens,), plus nframes (real audio frames) and raw_text (space-joined words incl. OOV).
    """
    table = word_vectors if isinstance(word_vectors, WordTable) else WordTable(list(vocab), word_vectors)
    cap = Caption(caption)
    if not 0 <= index < len(cap):
        raise IndexError(f"clip_from_segment: segment index {index} outside [0, {len(cap)})")
    plan = _plan_segment(cap, int(index), misaligned, min_time)
    out = empty_clips(1, video_dim=_video_dim(features_2d, features_3d), text_dim=table.dim, max_words=max_words,
                      n_stft=n_stft, n_video_tokens=n_video_tokens)
    video = ArrayVideo(mel_spec, features_2d, features_3d)
    reads = clip_reads(plan, video, n_stft=n_stft, n_video_tokens=n_video_tokens, fps_2d=batch_contract.FPS_2D,
                       fps_3d=batch_contract.FPS_3D)
    n = _write(out, 0, plan, reads, video, table, max_words=max_words)
    res = {k: v[0] for k, v in out.items()}
    res.update(start=plan[0], end=plan[1], nframes=n, raw_text=" ".join(plan[2]))
    return res


def fill_clips(out: dict[str, np.ndarray], row0: int, caption: Mapping[str, Sequence] | Caption,
               video, rng: np.random.Generator, table: WordTable, n_clips: int, *, misaligned: bool,
               min_time: float = 8.0, max_words: int = 20, n_stft: int = 768, n_video_tokens: int = 12,
               fps_2d: float = batch_contract.FPS_2D, fps_3d: float = batch_contract.FPS_3D) -> list[tuple]:
    """Writes `n_clips` random clips of one video into rows row0.. of zero-filled clip arrays.

    `video` is an `ArrayVideo` or a store's chunked video (same interface): all clips are planned
    first, then the rows they need are fetched at once, then the clips are written.
    Returns the (start, end, words or None, audio frame slice) of each clip.
    """
    cap = caption if isinstance(caption, Caption) else Caption(caption)
    plans = [_plan_random(cap, video.n_frames, rng, misaligned, min_time, n_stft) for _ in range(n_clips)]
    reads = [clip_reads(p, video, n_stft=n_stft, n_video_tokens=n_video_tokens, fps_2d=fps_2d, fps_3d=fps_3d)
             for p in plans]
    video.fetch(reads)
    for j, (plan, r) in enumerate(zip(plans, reads, strict=True)):
        _write(out, row0 + j, plan, r, video, table, max_words=max_words)
    return plans


def sample_clip(caption: Mapping[str, Sequence] | Caption, mel_spec: np.ndarray, features_2d, features_3d,
                rng: np.random.Generator, table: WordTable, **kw) -> dict:
    """One random training clip of a video (a uniformly drawn `min_time` window)."""
    out = video_clips(caption, mel_spec, features_2d, features_3d, rng, table, 1, **kw)
    return {k: v[0] for k, v in out.items()}


def video_clips(caption: Mapping[str, Sequence] | Caption, mel_spec: np.ndarray, features_2d, features_3d,
                rng: np.random.Generator, table: WordTable, n_clips: int, *, max_words: int = 20,
                n_stft: int = 768, n_video_tokens: int = 12, **kw) -> dict[str, np.ndarray]:
    """`n_clips` random clips of one video, stacked: video (n, Nv, Dv), text (n, Nt, Dt), audio (n, 40, Ta), ...

    Also audio_STFT_nframes (n,) int32 = -1, as the original sets for HowTo100M.
    """
    out = empty_clips(n_clips, video_dim=_video_dim(features_2d, features_3d), text_dim=table.dim,
                      max_words=max_words, n_stft=n_stft, n_video_tokens=n_video_tokens)
    fill_clips(out, 0, caption, ArrayVideo(mel_spec, features_2d, features_3d), rng, table, n_clips,
               max_words=max_words, n_stft=n_stft, n_video_tokens=n_video_tokens, **kw)
    out["audio_STFT_nframes"] = np.full((n_clips,), -1, np.int32)
    return out
