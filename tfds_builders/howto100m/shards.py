"""HowTo100M preparation units: one video -> validated records; one shard of videos -> one file.

Everything a worker needs is in a picklable `ShardTask` (file locations, widths, dtypes, layout,
the shard's own caption file), so the same `run_shard` runs in the preparing process, in a Beam
DirectRunner worker or on Dataflow / Spark / Flink. A worker holds one video at a time; what goes
back to the driver is a small JSON summary beside the shard (records per video, the shard's
vocabulary, skipped items).

Record layouts:
  howto         one record per video: id, features_2d, features_3d, audio, caption_start/end/text.
  howto_chunks  per video, a header record (chunk = -1: id, caption_start/end/text, num_chunks and
                the full lengths length_2d / length_3d / length_audio) followed by `num_chunks`
                chunk records (chunk = c: rows [c*R, (c+1)*R) of each array, R = chunk_seconds x the
                array's rate: 2D 1/s, 3D 1.5/s (S3D 1/s), audio 100 frames/s). A training clip
                reads the header and the one to three chunks under its window, never the whole video.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from etils import epath

from eao_jax import batch_contract
from eao_jax.data import audio as audio_lib
from eao_jax.data import records
from eao_jax.data import text as text_lib
from tfds_builders import validate as V
from tfds_builders import words

LAYOUTS = ("howto", "howto_chunks")
HEADER = -1


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """How to find, validate and lay out one video's records."""

    features_path: str
    features_path_3d: str
    features_path_audio: str
    use_2d: bool
    use_3d: bool
    dim_2d: int | None
    dim_3d: int | None
    fps_2d: float
    fps_3d: float
    feature_dtype: str
    audio_dtype: str
    layout: str
    chunk_seconds: int
    config_name: str
    array_record_options: str | None = None

    def rows_per_chunk(self) -> tuple[int, int, int]:
        """(2D rows, 3D rows, audio frames) of one chunk."""
        return (int(round(self.chunk_seconds * self.fps_2d)), int(round(self.chunk_seconds * self.fps_3d)),
                int(round(self.chunk_seconds / audio_lib.HOP * audio_lib.SAMPLE_RATE)))


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One output shard: its videos ((position in the video list, path) pairs) and files."""

    index: int
    videos: tuple[tuple[int, str], ...]
    captions: str  # JSON (write_captions): video id -> caption of this shard's videos only
    caption_source: str  # the released caption file (named in messages)
    output: str  # the shard's ArrayRecord file
    summary: str  # the shard's JSON summary
    spec: VideoSpec
    skip_bad: bool
    known_words: str | None = None  # words.KnownWords file of the word2vec vocabulary (None: not given)


def video_id(path: str) -> str:
    return path.split("/")[-1]


def _exists(p: str) -> bool:
    return epath.Path(p).exists()


def video_files(spec: VideoSpec, path: str) -> tuple[str, str, str]:
    """(2D, 3D, spectrogram) files of a video, with the released layout's fallbacks."""
    vid = video_id(path)
    p2 = f"{spec.features_path}/{path}/{vid}_2d.npz"
    if spec.use_2d and not _exists(p2):
        p2 = f"{spec.features_path}/{path}_2d.npz"
    p3 = f"{spec.features_path_3d}/{path}/{vid}_3d.npz"
    if spec.use_3d and not _exists(p3):
        p3 = f"{spec.features_path_3d}/{path}/{vid}.npz"
    return p2, p3, f"{spec.features_path_audio}/{path}/{vid}_spec.npz"


def caption_arrays(cap: Any, vid: str, file: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Validated (start (S,), end (S,), text (S,)) of one video's ASR segments."""
    try:
        start = np.asarray(cap["start"], dtype=np.float64).reshape(-1)
        end = np.asarray(cap["end"], dtype=np.float64).reshape(-1)
        text = ["" if t is None else str(t) for t in list(cap["text"])]
    except Exception as e:
        raise V.BadItem(V.BAD_ANNOTATION, vid, file, f"caption is not start/end/text ({type(e).__name__}: {e})"
                        ) from None
    if not (len(start) == len(end) == len(text)):
        raise V.BadItem(V.BAD_ANNOTATION, vid, file,
                        f"caption start/end/text lengths differ ({len(start)}, {len(end)}, {len(text)})")
    if not (np.isfinite(start).all() and np.isfinite(end).all()):
        raise V.BadItem(V.NON_FINITE, vid, file, "caption start/end")
    if len(start) > 1 and np.any(np.diff(start) < 0):
        raise V.BadItem(V.BAD_ANNOTATION, vid, file, "caption segments are not sorted by start time")
    return start, end, text


def write_captions(path: str, captions: dict[str, Any], source: str) -> None:
    """Writes a shard's captions as JSON, video id -> {start, end, text} as `caption_arrays` validates
    them (JSON writes a float by its shortest exact repr: the times read back bit-identical), or
    {bad: [reason, detail]} for a caption it refuses (`load_video` reports it for its video)."""
    out: dict[str, Any] = {}
    for vid, cap in captions.items():
        try:
            start, end, text = caption_arrays(cap, vid, source)
        except V.BadItem as e:
            out[vid] = {"bad": [e.reason, e.detail]}
            continue
        out[vid] = {"start": start.tolist(), "end": end.tolist(), "text": text}
    with epath.Path(path).open("w") as f:
        json.dump(out, f, allow_nan=False)


_EMPTY = {np.dtype(np.float16): np.zeros((0, 0), np.float16), np.dtype(np.float32): np.zeros((0, 0), np.float32)}


def load_video(spec: VideoSpec, path: str, caption: Any, caption_file: str) -> dict[str, Any]:
    """Reads and validates one video: id, features_2d, features_3d, audio, caption_start/end/text."""
    vid = video_id(path)
    p2, p3, pa = video_files(spec, path)
    fdt = np.dtype(spec.feature_dtype)
    ex: dict[str, Any] = {"id": vid}
    for part, use, p, dim in (("2d", spec.use_2d, p2, spec.dim_2d), ("3d", spec.use_3d, p3, spec.dim_3d)):
        if not use:
            ex[f"features_{part}"] = _EMPTY[fdt]
            continue
        arr = V.load_npz_key(p, "features", vid)
        try:
            ex[f"features_{part}"] = V.check_features(arr, f"{part.upper()} features", vid, p, dim, fdt)
        except V.BadItem as e:
            raise V.with_dim_hint(e, spec.config_name, ["resnet", "s3d", "clip"]) from None
    ex["audio"] = V.check_spectrogram(V.load_npz_key(pa, "arr_0", vid), vid, pa, np.dtype(spec.audio_dtype))
    if caption is None:
        raise V.BadItem(V.NO_CAPTION, vid, caption_file, "video id not in the caption file")
    if isinstance(caption, dict) and set(caption) == {"bad"}:  # refused by write_captions
        raise V.BadItem(caption["bad"][0], vid, caption_file, caption["bad"][1])
    start, end, text = caption_arrays(caption, vid, caption_file)
    ex.update(caption_start=start, caption_end=end, caption_text=text)
    return ex


def num_chunks(spec: VideoSpec, video: dict[str, Any]) -> int:
    r2, r3, ra = spec.rows_per_chunk()
    n = math.ceil(video["audio"].shape[1] / ra)
    if spec.use_2d:
        n = max(n, math.ceil(video["features_2d"].shape[0] / r2))
    if spec.use_3d:
        n = max(n, math.ceil(video["features_3d"].shape[0] / r3))
    return n


def video_records(spec: VideoSpec, video: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of one validated video in the spec's layout (2-D arrays flattened)."""
    if spec.layout == "howto":
        return [records.flatten_matrices(dict(video))]
    f2, f3, audio = video["features_2d"], video["features_3d"], video["audio"]
    r2, r3, ra = spec.rows_per_chunk()
    n = num_chunks(spec, video)
    no_caption = dict(caption_start=np.zeros((0,), np.float64), caption_end=np.zeros((0,), np.float64),
                      caption_text=[])
    empty_f, empty_a = _EMPTY[f2.dtype], np.zeros((batch_contract.N_MELS, 0), audio.dtype)
    out = [records.flatten_matrices(dict(
        id=video["id"], chunk=HEADER, num_chunks=n, length_2d=f2.shape[0], length_3d=f3.shape[0],
        length_audio=audio.shape[1], caption_start=video["caption_start"], caption_end=video["caption_end"],
        caption_text=video["caption_text"], features_2d=empty_f, features_3d=empty_f, audio=empty_a))]
    for c in range(n):
        out.append(records.flatten_matrices(dict(
            id=video["id"], chunk=c, num_chunks=n, length_2d=0, length_3d=0, length_audio=0, **no_caption,
            features_2d=f2[c * r2:(c + 1) * r2] if spec.use_2d else empty_f,
            features_3d=f3[c * r3:(c + 1) * r3] if spec.use_3d else empty_f,
            audio=np.ascontiguousarray(audio[:, c * ra:(c + 1) * ra]))))
    return out


def record_features(layout: str, feature_dtype: str, audio_dtype: str) -> Any:
    """The TFDS FeaturesDict of a HowTo100M layout."""
    import tensorflow_datasets as tfds

    from tfds_builders import common

    feats = common.video_audio_features(feature_dtype, audio_dtype)
    feats.update(common.HOWTO_FIELDS)
    if layout == "howto_chunks":
        feats.update({k: tfds.features.Scalar(np.int64) for k in
                      ("chunk", "num_chunks", "length_2d", "length_3d", "length_audio")})
    elif layout != "howto":
        raise ValueError(f"unknown HowTo100M record layout {layout!r}; known: {LAYOUTS}")
    return tfds.features.FeaturesDict(feats)


_KNOWN: dict[str, words.KnownWords] = {}  # per worker process: the vocabulary is read once


def _known_words(path: str | None) -> words.KnownWords | None:
    if path is None:
        return None
    if path not in _KNOWN:
        _KNOWN.clear()
        _KNOWN[path] = words.KnownWords.load(path)
    return _KNOWN[path]


def run_shard(task: ShardTask, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Prepares one shard: writes its records to `task.output` and its summary to `task.summary`.

    The summary (also returned): index, written [[video position, records], ...] in record order,
    num_examples, num_bytes, tokens (the shard's distinct tokens), skipped [items], error (the first
    bad item when skip_bad is off: it stops the shard, and the driver reports it), segments and
    unusable_segments (caption segments written, and those without a usable word).
    """
    from tfds_builders.writer import ShardWriter

    spec = task.spec
    with epath.Path(task.captions).open("r") as f:
        captions = json.load(f)
    writer = ShardWriter(record_features(spec.layout, spec.feature_dtype, spec.audio_dtype), task.output,
                         spec.array_record_options)
    known = _known_words(task.known_words)
    tokens: set[str] = set()
    summary: dict[str, Any] = dict(index=task.index, written=[], skipped=[], error=None, segments=0,
                                   unusable_segments=0)
    try:
        for position, path in task.videos:
            vid = video_id(path)
            try:
                video = load_video(spec, path, captions.get(vid), task.caption_source)
                segment_tokens = [text_lib.tokenize(t) for t in video["caption_text"]]
                unusable = words.check_segments(segment_tokens, video["caption_text"], vid, task.caption_source,
                                                known)
            except V.BadItem as e:
                item = dict(split="train", item=e.item, file=e.file, reason=e.reason, detail=e.detail)
                summary["skipped"].append(item)
                if not task.skip_bad:
                    summary["error"] = str(e)
                    break
                continue
            finally:
                if progress is not None:
                    progress(1)
            for t in segment_tokens:
                tokens.update(t)
            summary["segments"] += len(segment_tokens)
            summary["unusable_segments"] += unusable
            recs = video_records(spec, video)
            for r in recs:
                writer.write(r)
            summary["written"].append([int(position), len(recs)])
    finally:
        writer.close()
    summary.update(num_examples=writer.num_examples, num_bytes=writer.num_bytes, tokens=sorted(tokens))
    with epath.Path(task.summary).open("w") as f:
        json.dump(summary, f)
    return summary
