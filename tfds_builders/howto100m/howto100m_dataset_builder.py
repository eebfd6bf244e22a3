"""HowTo100M pre-training features in the released layout.

Manual directory (the original's `./data/howto`), every location overridable with `paths=`:
  HowTo100M_1166_videopaths.txt   csv with a `path` column (category/subfolder/video_id; a `None/`
                                  prefix is removed); option `csv`
  caption.pickle                  dict video_id -> {start, end, text} ASR segments; option `caption_path`
  features/<path>/<vid>_2d.npz    key `features`, (T2, 2048) at 1/s; fallback features/<path>_2d.npz;
                                  option `features_path`
  features/<path>/<vid>_3d.npz    key `features`, (T3, 2048) at 1.5/s; fallback <vid>.npz (S3D);
                                  option `features_path_3d` (default: features_path)
  audio_features/<path>/<vid>_spec.npz   key `arr_0`, (40, T) log-mel at 100/s; option `features_path_audio`
Paths may be local or gs:// (epath).

Configs: `resnet` (default; ResNet-152 + ResNeXt-101, 2048 + 2048), `s3d` (3D slot only, 1024-d at
1/s, csv HowTo100M_1166_videopaths_s3d.txt, new_s3d_features/), `clip` (2D slot only, 512-d at 1/s,
csv HowTo100M_1166_videopaths_CLIP.txt, clip_features/). Features and spectrograms are stored as
float16 (the released files are float16); `*_fp32` configs keep float32. Records are in the chunked
layout ("howto_chunks", see tfds_builders/howto100m/shards.py: a header with the captions, then
chunks of `chunk_seconds` = 8 s, uncompressed) so a training clip reads only the chunks under its
window; `*_video` configs keep the earlier one-record-per-video layout ("howto", zstd), for
comparison. Feature widths come from the config (or the builder's `feature_dims`).

Preparation (see `Howto100m._generate_splits`): the video list is cut into shards of
`videos_per_shard` videos; caption.pickle is read once and split into one small caption file per
shard; each shard is then one independent task (tfds_builders.howto100m.shards.run_shard) run in
this process, or, given Beam pipeline options, on Apache Beam (DirectRunner over local cores,
Dataflow, Spark, Flink). Only small per-shard summaries come back: records per video (the index
`train_index.npz` beside the dataset), the vocabulary (merged into the word-vector table) and the
skipped items (merged into prepare_report.json).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Any

import numpy as np
from etils import epath

from tfds_builders import common
from tfds_builders import validate as V
from tfds_builders.howto100m import shards

INDEX_FILE = "train_index.npz"
CHUNK_SECONDS = 8
VIDEOS_PER_SHARD = 128  # ~1 GB per shard at the released sizes (~7.7 MB per video)


def _configs() -> list[common.FeatureConfig]:
    base = {
        "resnet": dict(use_2d=True, use_3d=True, dim_2d=2048, dim_3d=2048, fps_3d=1.5,
                       options=dict(csv="HowTo100M_1166_videopaths.txt", features_path="features")),
        "s3d": dict(use_2d=False, use_3d=True, dim_2d=None, dim_3d=1024, fps_3d=1.0,
                    options=dict(csv="HowTo100M_1166_videopaths_s3d.txt", features_path="new_s3d_features")),
        "clip": dict(use_2d=True, use_3d=False, dim_2d=512, dim_3d=None, fps_2d=1.0,
                     options=dict(csv="HowTo100M_1166_videopaths_CLIP.txt", features_path="clip_features")),
    }
    out = []
    for name, kw in base.items():
        for suffix, dtype in (("", "float16"), ("_fp32", "float32")):
            for layout_suffix, layout in (("", "howto_chunks"), ("_video", "howto")):
                kw2 = dict(kw, options=dict(kw["options"], layout=layout, chunk_seconds=CHUNK_SECONDS,
                                            videos_per_shard=VIDEOS_PER_SHARD))
                out.append(common.FeatureConfig(
                    name=name + suffix + layout_suffix,
                    description=f"{name} features, {dtype} storage, {layout} record layout",
                    feature_dtype=dtype, audio_dtype=dtype, **kw2))
    return out


def read_paths(csv_path: str) -> list[str]:
    """The `path` column of the video list (a `None/` prefix removed)."""
    p = epath.Path(csv_path)
    if not p.exists():
        raise FileNotFoundError(f"{csv_path}: video list not found (option `csv`)")
    reader = csv.DictReader(io.StringIO(p.read_text()))
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise ValueError(f"{csv_path}: the video list needs a `path` column, got {reader.fieldnames}")
    return [row["path"].replace("None/", "") for row in reader]


def run_shards(tasks: list[shards.ShardTask], beam_options: Any = None, progress: bool = False) -> None:
    """Runs every shard task, here in order or, with Beam pipeline options, on Apache Beam."""
    if beam_options is None:
        from tensorflow_datasets.core import utils as tfds_utils

        bar = tfds_utils.tqdm(total=sum(len(t.videos) for t in tasks), desc="howto100m/train", unit=" videos",
                              disable=not progress)
        for t in tasks:
            if shards.run_shard(t, progress=bar.update)["error"] is not None:
                break  # the driver reports it
        bar.close()
        return
    from tfds_builders.howto100m import beam_prepare

    beam_prepare.run(tasks, beam_options)


class Howto100m(common.EaoBuilder):
    """HowTo100M: per video its features, spectrogram and ASR caption segments (chunked records)."""

    BUILDER_CONFIGS = _configs()
    DEFAULT_CONFIG_NAME = "resnet"
    PATH_OPTIONS = ("csv", "caption_path", "features_path", "features_path_3d", "features_path_audio")
    MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__

    def __init__(self, *, videos_per_shard: int | None = None, chunk_seconds: int | None = None,
                 progress: bool = False, **kwargs):
        self._videos_per_shard = videos_per_shard
        self._chunk_seconds = chunk_seconds
        self._progress = progress
        super().__init__(**kwargs)
        vps, cs = self._shard_videos(), self._chunk_size()
        if vps <= 0:
            raise ValueError(f"howto100m: videos_per_shard must be positive, got {vps}")
        spec = self._spec("", "", "")
        r2, r3, ra = spec.rows_per_chunk()
        if cs <= 0 or not (math.isclose(r2, cs * spec.fps_2d) and math.isclose(r3, cs * spec.fps_3d)):
            raise ValueError(f"howto100m: chunk_seconds={cs} must be a positive number of seconds holding whole "
                             f"feature rows at {spec.fps_2d}/s and {spec.fps_3d}/s (e.g. an even number)")

    def manual_files(self) -> list[str]:
        opts = self.builder_config.options
        return [opts["csv"], "caption.pickle", opts["features_path"] + "/", "audio_features/"]

    def _shard_videos(self) -> int:
        return int(self._videos_per_shard or self.builder_config.options["videos_per_shard"])

    def _chunk_size(self) -> int:
        return int(self._chunk_seconds or self.builder_config.options["chunk_seconds"])

    def _info(self):
        import tensorflow_datasets as tfds

        cfg = self.builder_config
        return self.dataset_info_from_configs(
            features=shards.record_features(cfg.options["layout"], cfg.feature_dtype, cfg.audio_dtype),
            metadata=tfds.core.MetadataDict(), disable_shuffling=True)

    def _spec(self, feat: str, feat3: str, audio: str) -> shards.VideoSpec:
        cfg = self.builder_config
        dims = {}
        for i, part in enumerate(("2d", "3d")):
            d = getattr(cfg, f"dim_{part}")
            if self._feature_dims is not None and self._feature_dims[i] is not None:
                d = int(self._feature_dims[i])
            if getattr(cfg, f"use_{part}") and d is None:
                raise ValueError(f"howto100m/{cfg.name}: the {part.upper()} feature width is unknown; "
                                 "give feature_dims (--feature_dims=D2,D3)")
            dims[part] = d
        layout = cfg.options["layout"]
        return shards.VideoSpec(
            features_path=feat, features_path_3d=feat3, features_path_audio=audio, use_2d=cfg.use_2d,
            use_3d=cfg.use_3d, dim_2d=dims["2d"] if cfg.use_2d else None, dim_3d=dims["3d"] if cfg.use_3d else None,
            fps_2d=float(cfg.fps_2d), fps_3d=float(cfg.fps_3d), feature_dtype=cfg.feature_dtype,
            audio_dtype=cfg.audio_dtype, layout=layout, chunk_seconds=self._chunk_size(), config_name=cfg.name,
            array_record_options="uncompressed" if layout == "howto_chunks" else None)

    def _split_generators(self, dl_manager):
        raise NotImplementedError  # the splits are written by _generate_splits (shard tasks)

    def _generate_examples(self):
        raise NotImplementedError

    def _generate_splits(self, dl_manager, download_config) -> list:
        import tensorflow_datasets as tfds

        opts = self.builder_config.options
        csv_path = self._path(dl_manager, "csv", opts["csv"])
        feat = self._path(dl_manager, "features_path", opts["features_path"])
        feat3 = self._path(dl_manager, "features_path_3d", self._paths.get("features_path", opts["features_path"]))
        audio = self._path(dl_manager, "features_path_audio", "audio_features")
        caption_file = self._path(dl_manager, "caption_path", "caption.pickle")
        spec = self._spec(feat, feat3, audio)
        paths = read_paths(csv_path)
        if not paths:
            raise V.PrepareError(f"{csv_path}: the video list is empty")
        if not epath.Path(caption_file).exists():
            raise FileNotFoundError(f"{caption_file}: caption file not found (option `caption_path`)")

        out = epath.Path(self.data_path)  # the temporary directory TFDS renames when done
        work = out / "_work"
        work.mkdir(parents=True, exist_ok=True)
        known_path = None
        if self._known is not None:  # the word2vec vocabulary, for the workers' caption checks
            known_path = str(work / "known_words.npy")
            self._known.save(known_path)
        vps = self._shard_videos()
        groups = [tuple(enumerate(paths))[i:i + vps] for i in range(0, len(paths), vps)]
        tasks = [shards.ShardTask(index=i, videos=g, captions=str(work / f"captions-{i:05d}.json"),
                                  caption_source=caption_file,
                                  output=str(work / f"shard-{i:05d}.array_record"),
                                  summary=str(work / f"summary-{i:05d}.json"), spec=spec, skip_bad=self._skip_bad,
                                  known_words=known_path)
                 for i, g in enumerate(groups)]
        split_captions(caption_file, tasks)
        run_shards(tasks, download_config.beam_options, progress=self._progress)
        summaries = [read_summary(t) for t in tasks]

        # Merge the summaries (in shard order: the order of the records).
        template = self._get_filename_template("train")
        written = [s for s in summaries if s is not None and s["num_examples"]]
        for s in summaries:
            if s is None:
                continue
            for item in s["skipped"]:
                self._report.items.append(item)
            if s["error"] is not None:
                raise V.PrepareError(f"{self.name}/train: {s['error']}. Fix the file or rerun with --skip_bad to "
                                     "skip and count such items.")
            self._tokens.update(s["tokens"])
        missing = [t.index for t, s in zip(tasks, summaries, strict=True) if s is None]
        if missing:
            raise V.PrepareError(f"{self.name}/train: shards {missing} were not prepared (no summary)")
        segments = sum(s.get("segments", 0) for s in summaries if s is not None)
        unusable = sum(s.get("unusable_segments", 0) for s in summaries if s is not None)
        if unusable:
            self._report.notes.append(
                f"{unusable} of {segments} caption segments have no usable word (only punctuation"
                f"{', or no word2vec word' if self._known is not None else ''}): kept, their clips have no text")
        if not written:
            raise V.PrepareError(f"{self.name}/train: no video was written ({len(self._report.items)} skipped)")
        positions, sizes = [], []
        for s in written:
            for pos, n in s["written"]:
                positions.append(pos)
                sizes.append(n)
        self._report.written["train"] += len(positions)
        for i, s in enumerate(written):
            src = epath.Path(tasks[s["index"]].output)
            src.rename(template.sharded_filepath(shard_index=i, num_shards=len(written)))
        sizes_a = np.asarray(sizes, np.int64)
        first = np.concatenate([[0], np.cumsum(sizes_a)[:-1]]).astype(np.int64)
        with (out / INDEX_FILE).open("wb") as f:
            np.savez(f, video_position=np.asarray(positions, np.int64), first_record=first, num_records=sizes_a)
        work.rmtree()

        meta = self.info.metadata
        meta["layouts"]["train"] = spec.layout
        r2, r3, ra = spec.rows_per_chunk()
        meta.update(chunk_seconds=spec.chunk_seconds, chunk_rows=dict(rows_2d=r2, rows_3d=r3, frames=ra),
                    num_records=dict(train=int(sizes_a.sum())))
        self._dims.update({"2d": spec.dim_2d, "3d": spec.dim_3d})
        self._set_complete_size("train", len(paths))
        return [tfds.core.SplitInfo(name="train", shard_lengths=[s["num_examples"] for s in written],
                                    num_bytes=sum(s["num_bytes"] for s in written), filename_template=template)]


def split_captions(caption_file: str, tasks: list[shards.ShardTask]) -> None:
    """Reads caption.pickle once and writes each shard's captions to its own small file (JSON, see
    `shards.write_captions`).

    The released pickle cannot be read partially, so this is the one step that holds all captions
    (about 20-25 GB for the full HowTo100M); workers only ever load their shard's file.
    """
    captions = V.load_pickle(caption_file)
    if not hasattr(captions, "get"):
        raise V.PrepareError(f"{caption_file}: expected a dict video_id -> caption, got {type(captions).__name__}")
    for t in tasks:
        part = {}
        for _, path in t.videos:
            vid = shards.video_id(path)
            cap = captions.get(vid)
            if cap is not None:
                part[vid] = cap
        shards.write_captions(t.captions, part, caption_file)
    del captions


def read_summary(task: shards.ShardTask) -> dict | None:
    import json

    p = epath.Path(task.summary)
    return json.loads(p.read_text()) if p.exists() else None
