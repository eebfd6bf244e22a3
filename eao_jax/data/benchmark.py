r"""Loader benchmark: clips/s of the HowTo100M-layout training pipeline.

  python -m eao_jax.data.benchmark --workers=N [--data_dir=DIR] [--dataset=synthetic --config=default]
      [--videos_per_batch=32 --clips_per_video=10 --batches=40 --read_threads=2]

By default it prepares (once) and reads the synthetic dataset, whose `train` split is in the
HowTo100M layout and goes through the same clip pipeline (config `default`: the demo's small dims;
config `paper_dims`: 2048-d 2D + 2048-d 3D features stored in float16 and 300-d words, like the
released HowTo100M files). The first batch (worker start-up) is not timed.
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def run(*, data_dir: str, dataset: str = "synthetic", config: str | None = "default", workers: int = 0,
        videos_per_batch: int = 32, clips_per_video: int = 10, batches: int = 40, read_threads: int = 2,
        prefetch: int = 2, seed: int = 0) -> dict[str, float]:
    """Times `batches` training batches after the first; returns clips_per_s, batches_per_s, startup_s."""
    import ml_collections

    from eao_jax.data import pipelines

    c = ml_collections.ConfigDict()
    c.seed = seed
    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset, data_dir=data_dir, tfds_config=config, split="train", videos_per_batch=videos_per_batch,
        clips_per_video=clips_per_video, n_video_tokens=12, max_words=20, n_stft=768, min_time=8.0,
        text_audio_misaligned=True, num_workers=workers, read_threads=read_threads, prefetch=prefetch))
    t0 = time.perf_counter()
    it = pipelines.make_train_iterator(c, process_index=0, process_count=1)
    first = next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
        next(it)
    t2 = time.perf_counter()
    if hasattr(it, "close"):
        it.close()  # stops worker processes and frees their shared memory
    rows = first["video"].shape[0]
    return dict(clips_per_s=rows * batches / (t2 - t1), batches_per_s=batches / (t2 - t1), startup_s=t1 - t0,
                clips_per_batch=rows)


def main(argv: list[str]) -> None:
    del argv
    data_dir = FLAGS.data_dir or os.path.join(tempfile.gettempdir(), "eao_jax_benchmark_data")
    r = run(data_dir=data_dir, dataset=FLAGS.dataset, config=FLAGS.config, workers=FLAGS.workers,
            videos_per_batch=FLAGS.videos_per_batch, clips_per_video=FLAGS.clips_per_video, batches=FLAGS.batches,
            read_threads=FLAGS.read_threads, prefetch=FLAGS.prefetch)
    print(f"{FLAGS.dataset}/{FLAGS.config} workers={FLAGS.workers} read_threads={FLAGS.read_threads} "
          f"batch={int(r['clips_per_batch'])} clips: {r['clips_per_s']:.0f} clips/s "
          f"({r['batches_per_s']:.2f} batches/s; start-up {r['startup_s']:.1f} s)")


if __name__ == "__main__":
    flags.DEFINE_integer("workers", 0, "grain worker processes (0: in-process threads only)")
    flags.DEFINE_string("data_dir", None, "TFDS data_dir (default: a temporary folder; synthetic is prepared there)")
    flags.DEFINE_string("dataset", "synthetic", "a dataset with a HowTo-layout train split")
    flags.DEFINE_string("config", "default", "builder config")
    flags.DEFINE_integer("videos_per_batch", 32, "videos per batch")
    flags.DEFINE_integer("clips_per_video", 10, "clips per video")
    flags.DEFINE_integer("batches", 40, "timed batches")
    flags.DEFINE_integer("read_threads", 2, "grain ReadOptions.num_threads (per worker)")
    flags.DEFINE_integer("prefetch", 2, "batches buffered per worker")
    app.run(main)
