r"""Video files -> training-ready features in the released HowTo100M layout.

  python -m eao_jax.extract --videos=DIR|LIST --output=OUT [--features=2d,3d,audio] \
      --checkpoint_2d=resnet152-b121ed2d.pth --checkpoint_3d=resnext101.pth \
      [--captions=captions.json] [--then_prepare=TFDS_DIR [--word2vec=GoogleNews-vectors-negative300.bin]]

--videos: a folder (walked for video files) or a list file (one video per line, or a CSV with a
`video` column and optionally `path`, the output path); relative entries are relative to the list.
OUT (local or gs://) receives features/<path>/<vid>_2d.npz and _3d.npz (key `features`),
audio_features/<path>/<vid>_spec.npz (key `arr_0`), all float16, videos.csv (the finished videos),
extract_report.json (counts, each failure with its reason, notes) and, given --captions,
caption.pickle: the files `python -m eao_jax.prepare --dataset=howto100m --manual_dir=OUT
--csv=videos.csv` reads (the command is printed at the end; --then_prepare runs it).

Each video is decoded once, in worker processes (--workers, default one per core less one); the
backbones run on the local devices over fixed-shape batches (--batch_size frames or clips). Rerunning
the same command resumes: finished videos are skipped, partial ones completed, and nothing is ever
left half-written. Multi-process (one process per host or per GPU): start the same command in every
process with the coordinator settings of eao_jax.distributed (see launch/); each takes its block of
the list, and process 0 merges the reports.

Bad videos are skipped, counted and named with their reason in the report; errors of the command
itself end it with one line `extract: <message>` and exit status 1 (eao_jax.console).
"""

from __future__ import annotations

from absl import app, flags

from eao_jax.extract import features as features_lib

FLAGS = flags.FLAGS


def _define_flags() -> None:
    from eao_jax import distributed  # noqa: PLC0415

    flags.DEFINE_string("videos", None, "folder of video files (walked) or list file (.txt: one per line; .csv: "
                        "columns video[,path])", required=True)
    flags.DEFINE_string("output", None, "output folder (local or gs://), the manual_dir prepare reads", required=True)
    flags.DEFINE_string("features", "2d,3d,audio", f"feature types to write: {', '.join(features_lib.FEATURES)}")
    for f in features_lib.FEATURES.values():
        if f.checkpoint_flag:
            flags.DEFINE_string(f.checkpoint_flag, None, f"weights of the {f.name} backbone (the public PyTorch "
                                ".pth, read without torch)")
    flags.DEFINE_integer("batch_size", 32, "frames (2D) or clips (3D) per device call, over the local devices")
    flags.DEFINE_integer("workers", 0, "decoding processes (0: one per available core, less one)")
    flags.DEFINE_string("interpolation", "bicubic", "frame scaling (ffmpeg's scale flags; bicubic is the ffmpeg "
                        "command line's default, which the released features used)")
    flags.DEFINE_bool("bf16", False, "run the backbones in bfloat16 (faster on accelerators; float32 is exact)")
    flags.DEFINE_string("captions", None, "captions (.json / .csv / caption.pickle) to write caption.pickle for")
    flags.DEFINE_string("then_prepare", None, "then build the TFDS dataset into this data_dir (needs --captions)")
    flags.DEFINE_string("word2vec", None, "--then_prepare: word2vec binary for the vocabulary table")
    flags.DEFINE_bool("progress_bar", True, "progress bar (process 0)")
    distributed.define_flags()


def prepare_command(output: str, data_dir: str, config: str, dims: tuple[int | None, int | None],
                    word2vec: str | None = None) -> str:
    """The prepare command line for an extraction's output."""
    import shlex  # noqa: PLC0415

    from eao_jax.extract import outputs  # noqa: PLC0415

    args = ["python", "-m", "eao_jax.prepare", "--dataset=howto100m", f"--config={config}", f"--manual_dir={output}",
            f"--csv={outputs.LIST_FILE}", f"--data_dir={data_dir}",
            "--feature_dims=" + ",".join("none" if d is None else str(d) for d in dims)]
    if word2vec:
        args.append(f"--word2vec={word2vec}")
    return " ".join(shlex.quote(a) for a in args)


def _summary(report: dict, output: str) -> list[str]:
    lines = [f"extract: {report['finished']} of {report['videos']} videos finished in {output} "
             f"({report['extracted']} now, {report['already_done']} before; {report['failed']} failed)"]
    for reason, n in report["failure_counts"].items():
        lines.append(f"  failed: {reason}: {n}")
    if report["notes"]:
        lines.append(f"  notes: {len(report['notes'])} (e.g. {report['notes'][0]['path']}: "
                     f"{report['notes'][0]['note']})")
    if report.get("without_captions"):
        lines.append(f"  {len(report['without_captions'])} finished videos have no captions (prepare --skip_bad "
                     "skips them)")
    procs = report.get("processes", [])
    wall = max((p["seconds"]["wall"] for p in procs), default=0.0)
    if report["extracted"] and wall > 0:
        lines.append(f"  {sum(p['videos_per_hour'] for p in procs):.0f} videos per hour, "
                     f"{report['video_seconds'] / wall:.1f} seconds of video per second ({wall:.1f} s; the "
                     "report's 'seconds' say where the time went)")
    lines.append(f"  report: {output.rstrip('/')}/extract_report.json")
    return lines


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from eao_jax import console, distributed  # noqa: PLC0415

    console.quiet_libraries()
    feats = features_lib.parse(FLAGS.features)
    missing = [f"--{f.checkpoint_flag}" for f in feats if f.on_device and not FLAGS[f.checkpoint_flag].value]
    if missing:
        raise ValueError(f"--features={FLAGS.features} needs {' and '.join(missing)} (the backbone weights)")
    config = None
    if FLAGS.then_prepare:
        config = features_lib.prepare_config(feats)
        if not FLAGS.captions:
            raise ValueError("--then_prepare needs --captions (HowTo100M's dataset pairs each video with its "
                             "narration)")
    from eao_jax.extract import job, outputs  # noqa: PLC0415

    settings = job.Settings(output=FLAGS.output, features=feats, batch_size=FLAGS.batch_size, workers=FLAGS.workers,
                            interpolation=FLAGS.interpolation, compute_dtype="bfloat16" if FLAGS.bf16 else "float32",
                            captions=FLAGS.captions, progress=FLAGS.progress_bar)
    videos = outputs.list_videos(FLAGS.videos)
    info = distributed.initialize_from_flags()
    models = {f.name: f.load(FLAGS[f.checkpoint_flag].value) for f in feats if f.on_device}
    barrier = None
    if info.num_processes > 1:
        from jax.experimental import multihost_utils  # noqa: PLC0415

        barrier = multihost_utils.sync_global_devices
    report = job.run(videos, settings, models, process_id=info.process_id, num_processes=info.num_processes,
                     barrier=barrier)
    if not info.is_main:
        return
    print("\n".join(_summary(report, FLAGS.output)), flush=True)
    slot_dims = (next((report["dims"].get(f.name) for f in feats if f.slot == "2d"), None),
                 next((report["dims"].get(f.name) for f in feats if f.slot == "3d"), None))
    if FLAGS.then_prepare:
        from eao_jax import prepare  # noqa: PLC0415

        summary = prepare.prepare("howto100m", FLAGS.then_prepare, FLAGS.output, config=config,
                                  word2vec=FLAGS.word2vec, paths={"csv": outputs.LIST_FILE}, feature_dims=slot_dims,
                                  progress=FLAGS.progress_bar)
        print(prepare.format_summary(summary))
    else:
        try:
            config = features_lib.prepare_config(feats)
        except ValueError:
            return  # these features alone do not make a HowTo100M dataset
        print("next, the TFDS dataset (with the captions as caption.pickle in the output: --captions):\n  "
              + prepare_command(FLAGS.output, "TFDS_DIR", config, slot_dims, FLAGS.word2vec))


if __name__ == "__main__":
    _define_flags()
    from eao_jax import console

    console.run("extract", main, interrupted="rerun the same command to go on (finished videos are kept)")
