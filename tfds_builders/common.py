"""Shared machinery of the eao_jax TFDS builders (ArrayRecord, prepared without TensorFlow).

Record fields are named the same in every builder so one grain pipeline reads them all:

  id               Text
  features_2d      (T2, D2) float, 2D features at 1/s ((0, 0) when the backbone is not used)
  features_3d      (T3, D3) float, 3D features at 1.5/s (S3D: 1/s) ((0, 0) when not used)
                   (2-D arrays are stored flat with a `<name>_shape` field: eao_jax.data.records)
  audio            (40, T) float, log-mel spectrogram at 100 frames/s
  HowTo100M layout ("howto"):   caption_start (S,) float64, caption_end (S,) float64, caption_text (S,) Text
  eval-item layout ("items"):   caption Text (the evaluation caption), captions (C,) Text (training
                                captions; one is drawn per access), item_index int64 (position in the
                                released file)
  localisation ("localization"): task Text, steps (K,) Text, annotation (T, K) uint8 (one row per second)

Large arrays are stored as raw bytes (no protobuf float lists), so decoding is a memory copy.

Beside the records, in the dataset directory:
  tokens.txt            every distinct token of the dataset's texts (before the word2vec filter)
  word_vectors.npz      the word-vector table (see eao_jax.data.text) when word2vec was given
  prepare_report.json   items written, items skipped and why (always written; skips need skip_bad)
and `info.metadata` (metadata.json) holds: layouts, complete_dataset_size, num_examples, skipped,
use_2d/use_3d, dim_2d/dim_3d, fps_2d/fps_3d, feature_dtype, audio_dtype, word2vec.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from eao_jax import batch_contract
from eao_jax.data import records
from eao_jax.data import text as text_lib
from tfds_builders import validate as V
from tfds_builders import words, writer

BYTES = tfds.features.Encoding.BYTES


def array_feature(dtype, shape=(None, None)) -> tfds.features.Tensor:
    return tfds.features.Tensor(shape=shape, dtype=np.dtype(dtype).type, encoding=BYTES)


def matrix_feature(name: str, dtype) -> dict[str, Any]:
    """A 2-D array stored flat plus its shape (see eao_jax.data.records)."""
    return {name: array_feature(dtype, (None,)),
            name + "_shape": tfds.features.Tensor(shape=(2,), dtype=np.int64)}


def video_audio_features(feature_dtype, audio_dtype) -> dict[str, Any]:
    return {
        "id": tfds.features.Text(),
        **matrix_feature("features_2d", feature_dtype),
        **matrix_feature("features_3d", feature_dtype),
        "audio": array_feature(audio_dtype, (batch_contract.N_MELS, None)),
    }


HOWTO_FIELDS = {
    "caption_start": array_feature(np.float64, (None,)),
    "caption_end": array_feature(np.float64, (None,)),
    "caption_text": tfds.features.Sequence(tfds.features.Text()),
}
ITEM_FIELDS = {
    "caption": tfds.features.Text(),
    "captions": tfds.features.Sequence(tfds.features.Text()),
    "item_index": tfds.features.Scalar(np.int64),
}
LOCALIZATION_FIELDS = {
    "task": tfds.features.Text(),
    "steps": tfds.features.Sequence(tfds.features.Text()),
    **matrix_feature("annotation", np.uint8),
}


class FeatureConfig(tfds.core.BuilderConfig):
    """Which backbones a dataset variant uses and how its features are stored.

    Attributes:
      use_2d / use_3d: backbone slots used (S3D: 3D only; CLIP: 2D only).
      dim_2d / dim_3d: expected feature widths (None: taken from the first item, then enforced).
      fps_2d / fps_3d: features per second (ResNet 1, ResNeXt 1.5, S3D 1, CLIP 1).
      feature_dtype / audio_dtype: storage dtypes (float16 halves the size; the released HowTo100M
        features and spectrograms are float16 already).
      options: builder-specific settings (file names, pickle keys, sizes).
    """

    def __init__(self, *, use_2d: bool = True, use_3d: bool = True, dim_2d: int | None = 2048,
                 dim_3d: int | None = 2048, fps_2d: float = 1.0, fps_3d: float = 24.0 / 16.0,
                 feature_dtype: str = "float32", audio_dtype: str = "float32",
                 options: dict | None = None, **kwargs):
        super().__init__(**kwargs)
        self.use_2d, self.use_3d = use_2d, use_3d
        self.fps_2d, self.fps_3d = fps_2d, fps_3d
        self.dim_2d, self.dim_3d = dim_2d, dim_3d
        self.feature_dtype, self.audio_dtype = feature_dtype, audio_dtype
        self.options = dict(options or {})


PREPARE_LOCK = ".prepare.lock"  # beside the version directories of a config: one prepare at a time


@contextlib.contextmanager
def _prepare_lock(directory: str) -> Iterator[bool]:
    """Holds an exclusive lock on `directory`/.prepare.lock (blocking while another prepare of the same
    dataset config runs); yields whether it is held. The kernel drops the lock when its holder dies,
    so a killed prepare never blocks the next. Remote directories (gs://...) are not locked."""
    if "://" in directory:
        yield False
        return
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, PREPARE_LOCK), "a") as f:
        try:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                logging.warning("%s: another prepare of this dataset is running; waiting for it", directory)
                fcntl.flock(f, fcntl.LOCK_EX)
        except OSError as e:  # e.g. ENOLCK: a filesystem without locks
            logging.warning("%s: cannot lock (%s); preparing unguarded", directory, e)
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def remove_stale_incomplete(data_path: Any) -> list[str]:
    """Removes the `incomplete.*_<version>` directories a killed prepare left beside `data_path`
    (only call under the prepare lock: then no live prepare owns one)."""
    parent, suffix = os.fspath(data_path.parent), "_" + data_path.name
    removed = []
    if os.path.isdir(parent):
        for d in sorted(os.listdir(parent)):
            if d.startswith("incomplete.") and d.endswith(suffix):
                shutil.rmtree(os.path.join(parent, d), ignore_errors=True)
                removed.append(d)
    return removed


_EMPTY_FEATURES = {np.dtype(np.float16): np.zeros((0, 0), np.float16),
                   np.dtype(np.float32): np.zeros((0, 0), np.float32)}


class EaoBuilder(tfds.core.GeneratorBasedBuilder):
    """Base class: validation with an optional skip report, vocabulary table, metadata.

    Constructor keywords (beyond TFDS's data_dir / config / file_format):
      word2vec: path of a word2vec binary file (GoogleNews layout); the dataset's vocabulary subset
        is stored as word_vectors.npz beside the records.
      skip_bad: skip unusable items and count them in prepare_report.json instead of failing.
      paths: overrides of the released-file locations (keys in PATH_OPTIONS), absolute or relative to
        the manual directory.
      feature_dims: (dim_2d, dim_3d) overriding the config's expected widths (None entries: inferred).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    PATH_OPTIONS: tuple[str, ...] = ()
    # Extra ArrayRecord writer options, e.g. "uncompressed" (default: zstd, level 3).
    ARRAY_RECORD_OPTIONS: str | None = None

    def __init__(self, *, word2vec: str | os.PathLike | None = None, skip_bad: bool = False,
                 paths: dict[str, str] | None = None, feature_dims: tuple[int | None, int | None] | None = None,
                 **kwargs):
        paths = dict(paths or {})
        unknown = sorted(set(paths) - set(self.PATH_OPTIONS))
        if unknown:
            raise ValueError(f"{type(self).__name__}: unknown path option(s) {unknown}; "
                             f"accepted: {list(self.PATH_OPTIONS)}")
        self._word2vec = None if word2vec is None else os.fspath(word2vec)
        if self._word2vec is not None and not os.path.isfile(self._word2vec):
            raise FileNotFoundError(f"--word2vec: {self._word2vec}: file not found")
        self._skip_bad = skip_bad
        self._paths = paths
        self._feature_dims = feature_dims
        self._known: words.KnownWords | None = None
        self.removed_leftovers: list[str] = []
        super().__init__(**kwargs)

    def download_and_prepare(self, *, download_dir: str | os.PathLike | None = None,
                             download_config: tfds.download.DownloadConfig | None = None, **kwargs: Any) -> None:
        """TFDS's `download_and_prepare`, after the cheap checks that would otherwise fail only at the
        end of the pass (or inside TFDS): the manual directory exists and is not empty, the word2vec
        file reads completely. One prepare per dataset config at a time (a lock, local data_dir only);
        the temporary directories of a killed earlier prepare are removed first under that lock
        (`removed_leftovers` names them; on gs:// nothing is removed, a live prepare could own them)."""
        if self.MANUAL_DOWNLOAD_INSTRUCTIONS:
            self._check_manual_dir(None if download_config is None else download_config.manual_dir)
        with _prepare_lock(os.fspath(self.data_path.parent)) as locked:
            if self.data_path.exists():  # prepared meanwhile by the holder of the lock: TFDS reuses it
                return super().download_and_prepare(download_dir=download_dir, download_config=download_config,
                                                    **kwargs)
            if locked:
                self.removed_leftovers = remove_stale_incomplete(self.data_path)
                if self.removed_leftovers:
                    logging.warning("removed leftovers of an interrupted prepare: %s", self.removed_leftovers)
            if self._word2vec is not None:
                self._known = words.KnownWords.scan(self._word2vec)
            super().download_and_prepare(download_dir=download_dir, download_config=download_config, **kwargs)

    def _check_manual_dir(self, manual_dir: Any) -> None:
        files = ", ".join(self.manual_files()) or "see the builder's docstring"
        where = f"{self.name}: --manual_dir {manual_dir}"
        if manual_dir is None:
            raise FileNotFoundError(f"{self.name}: --manual_dir is required (the directory holding the released "
                                    f"files: {files})")
        path = os.fspath(manual_dir)
        if "://" in path:
            return  # checked by the reads themselves
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{where} does not exist; it should hold the released files: {files}")
        if not os.listdir(path):
            raise FileNotFoundError(f"{where} is empty; it should hold the released files: {files}")

    # -- things subclasses describe -----------------------------------------------------------
    def manual_files(self) -> list[str]:
        """The released files (and folders, ending in /) the manual directory holds, for messages."""
        return []

    def _layout_fields(self) -> dict[str, Any]:
        raise NotImplementedError

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        feats = video_audio_features(cfg.feature_dtype, cfg.audio_dtype)
        feats.update(self._layout_fields())
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(feats),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # records keep the released order; pipelines shuffle
        )

    # -- helpers for subclasses ---------------------------------------------------------------
    def _path(self, dl_manager, key: str, default: str) -> str:
        """A released-file location: the `paths` override or `default`, relative to the manual dir."""
        p = self._paths.get(key, default)
        if os.path.isabs(p):
            return p
        return os.path.join(os.fspath(dl_manager.manual_dir), p)

    def _add_text(self, *texts: str) -> None:
        for t in texts:
            self._tokens.update(text_lib.tokenize(t))

    def _caption_problem(self, text: str) -> str | None:
        """Why `text` gives the model no words (words.NO_WORDS / NO_KNOWN_WORDS), or None."""
        return words.caption_problem(text_lib.tokenize(text), self._known)

    def _usable_caption(self, text: Any, item: str, file, what: str = "caption") -> str:
        """A validated caption (V.check_caption) that has at least one usable word; else BadItem."""
        text = V.check_caption(text, item, file)
        problem = self._caption_problem(text)
        if problem is not None:
            raise words.bad_caption(problem, text, item, file, self._known, what)
        return text

    def _expected_dim(self, part: str) -> int | None:
        if self._dims.get(part) is not None:
            return self._dims[part]
        if self._feature_dims is not None:  # an override; None entries are inferred from the first item
            d = self._feature_dims[0 if part == "2d" else 1]
            return None if d is None else int(d)
        return getattr(self.builder_config, f"dim_{part}")

    def _features(self, part: str, arr: Any, item: str, file) -> np.ndarray:
        """Validated features of one backbone slot (zeros (0, 0) when the slot is not used)."""
        cfg = self.builder_config
        dtype = np.dtype(cfg.feature_dtype)
        if not getattr(cfg, f"use_{part}"):
            return _EMPTY_FEATURES[dtype]
        try:
            out = V.check_features(arr, f"{part.upper()} features", item, file, self._expected_dim(part), dtype)
        except V.BadItem as e:
            raise V.with_dim_hint(e, cfg.name, [c.name for c in self.BUILDER_CONFIGS]) from None
        self._dims[part] = out.shape[1]  # the first item fixes an inferred width
        return out

    def _spectrogram(self, arr: Any, item: str, file) -> np.ndarray:
        return V.check_spectrogram(arr, item, file, np.dtype(self.builder_config.audio_dtype))

    def _validated(self, split: str, items: Iterable[tuple[int, Callable[[], dict | None]]]
                   ) -> Iterator[tuple[int, dict]]:
        """Runs each item's builder; bad items stop the prepare or, with skip_bad, are counted."""
        for key, build in items:
            try:
                example = build()
            except V.BadItem as e:
                if not self._skip_bad:
                    raise V.PrepareError(
                        f"{self.name}/{split}: {e}. Fix the file or rerun with --skip_bad to skip and "
                        "count such items.") from None
                self._report.skip(split, e)
                continue
            if example is None:
                continue
            self._report.written[split] += 1
            yield key, records.flatten_matrices(example)

    def _set_complete_size(self, split: str, n: int) -> None:
        self.info.metadata.setdefault("complete_dataset_size", {})[split] = int(n)

    def _word_table(self) -> text_lib.WordTable | None:
        """The table written beside the records (default: the word2vec subset of the dataset tokens)."""
        if self._word2vec is None:
            return None
        return text_lib.build_word_table(self._word2vec, self._tokens)

    # -- TFDS hooks --------------------------------------------------------------------------
    def _generate_splits(self, dl_manager, download_config) -> list:
        """Writes each split's examples in generation order straight into shards (see
        `tfds_builders.writer`: no TensorFlow, no split held in memory)."""
        from tensorflow_datasets.core import utils as tfds_utils

        infos = []
        for split, gen in self._split_generators(dl_manager).items():
            examples = (ex for _, ex in tfds_utils.tqdm(gen, desc=f"{self.name}/{split}", unit=" items", leave=False))
            infos.append(writer.stream_split(self.info.features, examples, self._get_filename_template(split),
                                             options=self.ARRAY_RECORD_OPTIONS))
        return infos

    def _download_and_prepare(self, dl_manager, download_config) -> None:
        self._report = V.Report()
        self._tokens: set[str] = set()
        self._dims: dict[str, int | None] = {}
        meta = self.info.metadata
        meta["layouts"] = {}
        super()._download_and_prepare(dl_manager, download_config)

        cfg = self.builder_config
        out_dir = os.fspath(self.data_dir)  # the temporary directory TFDS renames when done
        text_lib.write_tokens(os.path.join(out_dir, text_lib.TOKENS_FILE), self._tokens)
        table = self._word_table()
        if table is not None:
            table.save(os.path.join(out_dir, text_lib.WORD_VECTORS_FILE))
            self._report.notes.append(
                f"word table: {len(table)} of {len(self._tokens)} distinct tokens found, dim {table.dim}")
        else:
            self._report.notes.append(
                "no word table (no --word2vec): rerun prepare with --word2vec=FILE to add it")
        self._report.save(os.path.join(out_dir, V.REPORT_FILE))
        meta.update(
            num_examples=dict(self._report.written),
            skipped={s: sum(c.values()) for s, c in self._report.counts().items()},
            use_2d=bool(cfg.use_2d), use_3d=bool(cfg.use_3d),
            dim_2d=self._dims.get("2d"), dim_3d=self._dims.get("3d"),
            fps_2d=float(cfg.fps_2d), fps_3d=float(cfg.fps_3d),
            feature_dtype=cfg.feature_dtype, audio_dtype=cfg.audio_dtype,
            word2vec=None if self._word2vec is None else os.path.basename(self._word2vec),
        )
        self.prepare_report = self._report
