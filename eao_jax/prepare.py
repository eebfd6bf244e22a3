r"""Builds a TFDS dataset (ArrayRecord) from the released files, validating every item once.

  python -m eao_jax.prepare --dataset=NAME --manual_dir=RELEASED_FILES --data_dir=OUT \
      [--word2vec=GoogleNews-vectors-negative300.bin] [--config=resnet] [--skip_bad]

Datasets: howto100m, msrvtt, youcook2, crosstask, mining_youtube, synthetic (no manual_dir). The
released layouts are described in each builder's docstring (tfds_builders/<name>/); file locations
can be moved with --csv, --caption_path, --features_path, --features_path_3d, --features_path_audio,
--annot_path, --steps_path, --resnet_dir, --s3d_dir, --clip_dir (those the builder accepts).

Before the pass over the items: a missing or empty --manual_dir is refused naming the files it
should hold, and the --word2vec file is read through once (a truncated, empty or text-format file is
refused), so neither is found out only after every record was written.

Validation: a missing or truncated file, a wrong feature dimension, NaN/Inf values, an empty
spectrogram or feature array, an empty caption, a caption without a usable word (only punctuation,
or, given --word2vec, no word of its vocabulary) or a malformed annotation stops the prepare with an
error naming the file and the item. With --skip_bad such items are skipped and counted in
`prepare_report.json` next to the dataset. Training captions (MSR-VTT / YouCook2 `captions`) without
a usable word are dropped from their item and counted in the report's notes; HowTo100M keeps ASR
segments without one (their clips have no text, as in the original, also counted in the notes) and
refuses only a video none of whose segments has a usable word. Records are written to a temporary
directory that is renamed when complete, so an interrupted prepare leaves no half dataset; on a
local --data_dir one prepare of a dataset config runs at a time (a lock beside it), and the
temporary directories a killed prepare left are removed by the next one, however it is started
(this command, or the automatic synthetic prepare of training and evaluation). Preparing again is idempotent: an
existing dataset is kept; only a missing word-vector table is added when --word2vec is given.

Errors end the command with one line `prepare: <message>` and exit status 1, Ctrl-C with one line and
status 130 (eao_jax.console).
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import flags

PATH_FLAGS = ("csv", "caption_path", "features_path", "features_path_3d", "features_path_audio", "annot_path",
              "steps_path", "resnet_dir", "s3d_dir", "clip_dir")


def _parse_dims(s: str | None) -> tuple[int | None, int | None] | None:
    if not s:
        return None
    parts = [p.strip().lower() for p in s.split(",")]
    if len(parts) != 2:
        raise ValueError(f"--feature_dims must be 'D2,D3' (use 'none' for an unused slot), got {s!r}")
    return tuple(None if p in ("", "none") else int(p) for p in parts)  # type: ignore[return-value]


def prepare(dataset: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None, *,
            config: str | None = None, word2vec: str | os.PathLike | None = None, skip_bad: bool = False,
            paths: dict[str, str] | None = None, feature_dims: tuple[int | None, int | None] | None = None,
            progress: bool = False, beam_options: Any = None, workers: int | None = None,
            videos_per_shard: int | None = None, chunk_seconds: int | None = None) -> dict[str, Any]:
    """Prepares one dataset (see the module docstring). Returns the summary dict that `main` prints.

    HowTo100M only: `workers` runs the preparation on Apache Beam's DirectRunner over that many local
    processes (0: one per core), `beam_options` ('k=v,...' or PipelineOptions) on any Beam runner;
    `videos_per_shard` and `chunk_seconds` override the config's shard size and chunk length.

    Summary keys: dataset, path, status ("prepared" | "exists"), written {split: n},
    skipped {split: {reason: n}}, report (path of prepare_report.json), notes, word_table.
    """
    import tensorflow_datasets as tfds

    import tfds_builders
    from eao_jax.data import text as text_lib
    from tfds_builders import validate as V

    cls = tfds_builders.builder_class(dataset)
    extra: dict[str, Any] = {}
    if workers is not None:
        if beam_options is not None:
            raise ValueError("give either --workers or --beam_pipeline_options, not both")
        from tfds_builders.howto100m import beam_prepare

        beam_options = beam_prepare.local_options(workers)
    elif isinstance(beam_options, str):
        from tfds_builders.howto100m import beam_prepare

        beam_options = beam_prepare.pipeline_options(beam_options)
    if dataset == "howto100m":
        extra = dict(videos_per_shard=videos_per_shard, chunk_seconds=chunk_seconds, progress=progress)
    elif beam_options is not None or videos_per_shard or chunk_seconds:
        raise ValueError(f"--workers / --beam_pipeline_options / --videos_per_shard / --chunk_seconds apply to "
                         f"howto100m only ({dataset} is small enough for one process)")
    builder = cls(data_dir=os.fspath(data_dir), config=config, file_format="array_record", word2vec=word2vec,
                  skip_bad=skip_bad, paths={k: v for k, v in (paths or {}).items() if v},
                  feature_dims=feature_dims, **extra)
    path = os.fspath(builder.data_path)
    status = "exists"
    notes: list[str] = []
    if not builder.data_path.exists():
        status = "prepared"
        tfds.display_progress_bar(progress)
        dl_config = tfds.download.DownloadConfig(
            manual_dir=None if manual_dir is None else os.fspath(manual_dir), try_download_gcs=False,
            beam_options=beam_options)
        # The builder checks --manual_dir and --word2vec first and removes a killed prepare's leftovers.
        builder.download_and_prepare(download_config=dl_config)
        if builder.removed_leftovers:
            notes.append(f"removed leftovers of an interrupted prepare: {builder.removed_leftovers}")
    table_path = os.path.join(path, text_lib.WORD_VECTORS_FILE)
    if status == "exists" and word2vec is not None and not os.path.exists(table_path):
        from tfds_builders.words import KnownWords

        KnownWords.scan(word2vec)  # the checks (and messages) of a new prepare's word2vec file
        tokens = text_lib.read_tokens(os.path.join(path, text_lib.TOKENS_FILE))
        text_lib.build_word_table(word2vec, tokens).save(table_path)
        notes.append(f"added the word-vector table from {word2vec}")
    report_path = os.path.join(path, V.REPORT_FILE)
    with open(report_path) as f:
        report = json.load(f)
    table = None
    if os.path.exists(table_path):
        t = text_lib.WordTable.load(table_path)
        table = dict(words=len(t), dim=t.dim)
    return dict(dataset=dataset, path=path, status=status, written=report["written"], skipped=report["skipped"],
                report=report_path, notes=report["notes"] + notes, word_table=table)


def prepare_once(name: str, data_dir: str | os.PathLike, config: str | None = None) -> None:
    """Prepares the synthetic dataset (the only one prepared on demand) before anything opens it.

    Collective under jax.distributed: every process must call it. Process 0 prepares first while
    the others wait at a barrier, so processes sharing a filesystem never write the same dataset
    concurrently; on hosts with their own disks, each then prepares its local copy. Other datasets
    are prepared beforehand with this command: nothing to do.
    """
    if name != "synthetic":
        return
    import jax

    from tfds_builders.synthetic import ensure_prepared

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if jax.process_index() == 0:
            ensure_prepared(data_dir, config or "default")
        multihost_utils.sync_global_devices(f"eao_jax prepared synthetic/{config or 'default'}")
    ensure_prepared(data_dir, config or "default")


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['dataset']}: {'prepared' if s['status'] == 'prepared' else 'already prepared'} at {s['path']}"]
    for split, n in s["written"].items():
        skipped = s["skipped"].get(split, {})
        why = ", ".join(f"{k}: {v}" for k, v in skipped.items())
        lines.append(f"  {split}: {n} items written, {sum(skipped.values())} skipped" + (f" ({why})" if why else ""))
    if s["skipped"]:
        lines.append(f"  skipped items are listed in {s['report']}")
    for n in s["notes"]:
        lines.append(f"  note: {n}")
    t = s["word_table"]
    lines.append(f"  word table: {t['words']} words x {t['dim']}" if t else "  word table: none")
    return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
    flags.DEFINE_string("dataset", None, "howto100m | msrvtt | youcook2 | crosstask | mining_youtube | synthetic")
    flags.DEFINE_string("manual_dir", None, "directory holding the released files")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir to write to")
    flags.DEFINE_string("word2vec", None, "word2vec binary file (GoogleNews layout) for the vocabulary table")
    flags.DEFINE_string("config", None, "builder config (e.g. resnet, s3d, clip; synthetic: tiny, default)")
    flags.DEFINE_bool("skip_bad", False, "skip unusable items and count them in prepare_report.json")
    flags.DEFINE_string("feature_dims", None, "expected 'D2,D3' feature widths overriding the config's")
    flags.DEFINE_integer("workers", None, "howto100m: prepare on Apache Beam's DirectRunner with this many local "
                         "processes (0: one per core; needs the beam extra)")
    flags.DEFINE_string("beam_pipeline_options", None, "howto100m: Apache Beam pipeline options 'k=v,k=v' "
                        "(e.g. runner=DataflowRunner,project=...,region=...,temp_location=gs://...)")
    flags.DEFINE_integer("videos_per_shard", None, "howto100m: videos per output shard (default 128, ~1 GB)")
    flags.DEFINE_integer("chunk_seconds", None, "howto100m: seconds per chunk record (default 8; even)")
    for name in PATH_FLAGS:
        flags.DEFINE_string(name, None, f"location of the released `{name}` (relative to --manual_dir or absolute)")
    flags.mark_flags_as_required(["dataset", "data_dir"])


def main(argv: list[str]) -> None:
    del argv
    from eao_jax import console

    console.quiet_libraries()  # TFDS's INFO lines would drown the summary
    summary = prepare(FLAGS.dataset, FLAGS.data_dir, FLAGS.manual_dir, config=FLAGS.config,
                      word2vec=FLAGS.word2vec, skip_bad=FLAGS.skip_bad,
                      paths={k: getattr(FLAGS, k) for k in PATH_FLAGS},
                      feature_dims=_parse_dims(FLAGS.feature_dims), progress=True,
                      beam_options=FLAGS.beam_pipeline_options, workers=FLAGS.workers,
                      videos_per_shard=FLAGS.videos_per_shard, chunk_seconds=FLAGS.chunk_seconds)
    print(format_summary(summary))


if __name__ == "__main__":
    _define_flags()
    from eao_jax import console

    console.run("prepare", main, interrupted="a dataset is kept only once complete (its partial files are "
                "removed): rerun the same command to prepare it")
