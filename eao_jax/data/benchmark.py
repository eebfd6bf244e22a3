r"""Loader and prepare benchmark at HowTo100M scale.

  python -m eao_jax.data.benchmark [--videos=270] [--workers=1,2] [--batches=4] [--fixture_dir=DIR]
      [--layouts=howto_chunks,howto] [--prepare_workers=2] [--videos_per_batch=224 --clips_per_video=10]
      [--repeats=3]

It writes (once) a realistic HowTo100M fixture in the released layout: full feature widths (2D and
3D 2048-d float16 at 1 and 1.5 per second, 40-band float16 log-mel at 100 frames/s), videos of 2-12
minutes, about 90 ASR segments per 7-minute video drawn from a Zipf vocabulary, and a 300-d word2vec
file; 270 videos are about 2 GB of features. It then prepares the fixture in the chunked record
layout and in the earlier one-record-per-video layout, and reports, at the paper's shapes
(224 videos x 10 clips, 12 video tokens, 20 words, 768 STFT frames):
  - clips per CPU-second of one worker (in-process, the CPU time of all its threads; the median of
    `--repeats` fresh readers), bytes and records read per clip, the process RSS;
  - clips/s with N grain worker processes and the peak RSS of each worker;
  - prepare throughput: videos per CPU-second in one process and on Beam's DirectRunner with N
    workers (CPU time of the driver and its worker processes), and videos/s wall-clock.
The last line is a JSON object with every number. `run()` (one loader measurement) is also used
by `python -m eao_jax.bench --data`.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import tempfile
import time
from typing import Any

import numpy as np
from absl import flags

FLAGS = flags.FLAGS


# --------------------------------------------------------------------------------------------
# A realistic fixture in the released HowTo100M layout
# --------------------------------------------------------------------------------------------
def _vocabulary(n: int, rng: np.random.Generator) -> list[str]:
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words, seen = [], set()
    while len(words) < n:
        w = "".join(rng.choice(letters, size=int(rng.integers(2, 10))))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


def write_howto_fixture(root: str, n_videos: int, *, seed: int = 0, seconds: tuple[int, int] = (120, 720),
                        segments_per_minute: float = 13.0, vocab_size: int = 20000,
                        dims: tuple[int, int] = (2048, 2048)) -> dict[str, Any]:
    """Writes `root/manual` (csv, caption.pickle, features/, audio_features/) and `root/word2vec.bin`.

    Features are ReLU-like (about 40 % zeros), spectrograms dB-like (<= 0), both float16 as released;
    narration segments of 1-8 s with gaps cover the video (~90 segments in 7 minutes), 4-14 words each
    from a Zipf(1.1) vocabulary of which 80 % are in the word2vec file. Returns sizes.
    """
    rng = np.random.default_rng(seed)
    manual = os.path.join(root, "manual")
    os.makedirs(manual, exist_ok=True)
    vocab = _vocabulary(vocab_size, rng)
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    p /= p.sum()
    captions, paths, total_bytes, total_seconds = {}, [], 0, 0
    for i in range(n_videos):
        vid = f"v{i:07d}"
        path = f"category_{i % 7}/video_{i % 5}/{vid}"
        d = int(rng.integers(seconds[0], seconds[1] + 1))
        total_seconds += d
        f2 = np.maximum(rng.standard_normal((d, dims[0]), np.float32) * 0.5 + 0.12, 0).astype(np.float16)
        f3 = np.maximum(rng.standard_normal((int(d * 1.5), dims[1]), np.float32) * 0.5 + 0.12, 0).astype(np.float16)
        mel = np.minimum(rng.standard_normal((40, 100 * d), np.float32) * 12 - 45, 0).astype(np.float16)
        for sub, name, arrs in (("features", f"{vid}_2d.npz", dict(features=f2)),
                                ("features", f"{vid}_3d.npz", dict(features=f3)),
                                ("audio_features", f"{vid}_spec.npz", dict(arr_0=mel))):
            folder = os.path.join(manual, sub, path)
            os.makedirs(folder, exist_ok=True)
            np.savez(os.path.join(folder, name), **arrs)
        total_bytes += f2.nbytes + f3.nbytes + mel.nbytes
        n_seg = max(1, int(rng.poisson(segments_per_minute * d / 60)))
        lengths = rng.uniform(1.0, 8.0, n_seg)
        gaps = rng.exponential(max(0.05, (d - lengths.sum()) / n_seg), n_seg) if lengths.sum() < d else np.zeros(n_seg)
        starts = np.cumsum(gaps + np.concatenate([[0], lengths[:-1]]))
        keep = starts < d - 1
        starts, ends = starts[keep], np.minimum(starts[keep] + lengths[keep], d)
        texts = [" ".join(rng.choice(vocab, size=int(rng.integers(4, 15)), p=p)) for _ in range(len(starts))]
        captions[vid] = {"start": np.round(starts, 2), "end": np.round(ends, 2), "text": texts}
        paths.append(path)
    with open(os.path.join(manual, "HowTo100M_1166_videopaths.txt"), "w") as f:
        f.write("path\n" + "".join(p_ + "\n" for p_ in paths))
    with open(os.path.join(manual, "caption.pickle"), "wb") as f:
        pickle.dump(captions, f, protocol=4)
    known = vocab[: int(0.8 * vocab_size)]
    vecs = rng.standard_normal((len(known), 300)).astype("<f4")
    with open(os.path.join(root, "word2vec.bin"), "wb") as f:
        f.write(f"{len(known)} 300\n".encode())
        for w, v in zip(known, vecs, strict=True):
            f.write(w.encode() + b" " + v.tobytes() + b"\n")
    info = dict(videos=n_videos, feature_bytes=total_bytes, seconds=total_seconds,
                segments=sum(len(c["start"]) for c in captions.values()))
    with open(os.path.join(root, "fixture.json"), "w") as f:
        json.dump(info, f)
    return info


def ensure_fixture(root: str, n_videos: int) -> dict[str, Any]:
    info_path = os.path.join(root, "fixture.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info["videos"] == n_videos:
            return info
    shutil.rmtree(root, ignore_errors=True)
    return write_howto_fixture(root, n_videos)


# --------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------
def _cpu() -> float:
    """CPU seconds of this process (all threads) and of its finished, waited-for children."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def _rss(pid: int | None = None) -> int:
    import psutil

    return int(psutil.Process(pid).memory_info().rss)


def _worker_rss() -> list[int]:
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            out.append(int(p.memory_info().rss))
        except psutil.Error:
            pass
    return out


def _config(data_dir, dataset, config, workers, videos_per_batch, clips_per_video, read_threads, prefetch,
            read_buffer, seed):
    """The paper's data config (eao_jax.defaults) with the benchmark's sizes and reader settings."""
    import ml_collections

    from eao_jax.defaults import data_config

    c = ml_collections.ConfigDict()
    c.seed = seed
    c.data = data_config()
    c.data.update(dict(dataset=dataset, data_dir=data_dir, tfds_config=config, split="train",
                       videos_per_batch=videos_per_batch, clips_per_video=clips_per_video, num_workers=workers,
                       read_threads=read_threads, prefetch=prefetch, read_buffer=read_buffer))
    return c


def one_worker(*, data_dir: str, dataset: str = "howto100m", config: str | None = "resnet",
               videos_per_batch: int = 224, clips_per_video: int = 10, clips: int = 4480, read_threads: int = 1,
               read_buffer: int = 2, seed: int = 0) -> dict[str, float]:
    """What one reader (one grain worker process) produces: the elements it builds, iterated in this
    process. Returns clips_per_cpu_s (CPU time of all its threads), bytes_per_clip, records_per_clip,
    rss_bytes (peak sample)."""
    from eao_jax.data import pipelines
    from eao_jax.data.howto_store import HowToStore

    c = _config(data_dir, dataset, config, 0, videos_per_batch, clips_per_video, read_threads, 2, read_buffer, seed)
    it = iter(pipelines.train_dataset(c, process_index=0, process_count=1, elements_only=True))
    rows = next(it)["video"].shape[0]  # start-up not timed
    recs0, bytes0 = HowToStore.total_records_read, HowToStore.total_bytes_read
    cpu0, rss, n = time.process_time(), _rss(), 0
    while n < clips:
        n += next(it)["video"].shape[0]
        rss = max(rss, _rss())
    cpu = time.process_time() - cpu0
    del rows
    return dict(clips_per_cpu_s=n / cpu, bytes_per_clip=(HowToStore.total_bytes_read - bytes0) / n,
                records_per_clip=(HowToStore.total_records_read - recs0) / n, rss_bytes=rss)


def run(*, data_dir: str, dataset: str = "howto100m", config: str | None = "resnet", workers: int = 0,
        videos_per_batch: int = 224, clips_per_video: int = 10, batches: int = 4, read_threads: int = 2,
        prefetch: int = 2, read_buffer: int = 2, seed: int = 0) -> dict[str, float]:
    """Times `batches` training batches (the whole pipeline: readers, worker processes, batch assembly)
    after the first two.

    Returns clips_per_s (wall), clips_per_cpu_s (CPU time of this process and its threads, not of
    worker processes), batches_per_s, startup_s, clips_per_batch, rss_bytes (this process, peak
    sample) and worker_rss_bytes (peak of any worker process).
    """
    from eao_jax.data import pipelines

    c = _config(data_dir, dataset, config, workers, videos_per_batch, clips_per_video, read_threads, prefetch,
                read_buffer, seed)
    t0 = time.perf_counter()
    it = pipelines.make_train_iterator(c, process_index=0, process_count=1)
    rows = next(it)["video"].shape[0]
    startup = time.perf_counter() - t0
    # Not timed either: the second batch, while the first is still held, allocates the batch buffers
    # that later batches reuse (as a training loop holding one batch while the next is made).
    next(it)
    t1, cpu1 = time.perf_counter(), time.process_time()
    rss, wrss = _rss(), 0
    for _ in range(batches):
        next(it)
        rss = max(rss, _rss())
        wrss = max([wrss, *_worker_rss()])
    t2, cpu2 = time.perf_counter(), time.process_time()
    if hasattr(it, "close"):
        it.close()  # stops worker processes and frees their shared memory
    clips = rows * batches
    return dict(clips_per_s=clips / (t2 - t1), clips_per_cpu_s=clips / max(cpu2 - cpu1, 1e-9),
                batches_per_s=batches / (t2 - t1), startup_s=startup, clips_per_batch=rows, rss_bytes=rss,
                worker_rss_bytes=wrss)


def prepare_throughput(manual: str, out_dir: str, word2vec: str, config: str, workers: int | None,
                       videos_per_shard: int) -> dict[str, float]:
    """Prepares the fixture into a fresh `out_dir`; videos per CPU-second and per wall second."""
    from eao_jax.prepare import prepare

    shutil.rmtree(out_dir, ignore_errors=True)
    t0, c0 = time.perf_counter(), _cpu()
    s = prepare("howto100m", out_dir, manual, config=config, word2vec=word2vec, workers=workers,
                videos_per_shard=videos_per_shard)
    t1, c1 = time.perf_counter(), _cpu()
    n = s["written"]["train"]
    return dict(videos=n, videos_per_cpu_s=n / (c1 - c0), videos_per_s=n / (t1 - t0), cpu_s=c1 - c0, wall_s=t1 - t0)


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main(argv: list[str]) -> None:
    del argv
    import logging

    logging.getLogger("apache_beam").setLevel(logging.WARNING)
    root = FLAGS.fixture_dir or os.path.join(tempfile.gettempdir(), "eao_jax_howto_fixture")
    t = time.perf_counter()
    info = ensure_fixture(root, FLAGS.videos)
    print(f"fixture: {info['videos']} videos, {info['seconds'] / 3600:.1f} h, {info['feature_bytes'] / 2**30:.2f} GiB "
          f"of features, {info['segments']} ASR segments ({time.perf_counter() - t:.0f} s)", flush=True)
    manual, w2v = os.path.join(root, "manual"), os.path.join(root, "word2vec.bin")
    result: dict[str, Any] = dict(fixture=info, loader={}, prepare={})
    configs = {"howto_chunks": "resnet", "howto": "resnet_video"}
    for layout in FLAGS.layouts:
        data_dir = os.path.join(root, f"data_{layout}")
        cfg = configs[layout]
        if not os.path.isdir(os.path.join(data_dir, "howto100m", cfg)):
            p = prepare_throughput(manual, data_dir, w2v, cfg, None, FLAGS.videos_per_shard)
            result["prepare"][f"{layout}/1 process"] = p
            print(f"prepare {layout}: one process {p['videos_per_cpu_s']:.1f} videos per CPU-second "
                  f"({p['videos_per_s']:.1f} videos/s)", flush=True)
        size = _dir_bytes(os.path.join(data_dir, "howto100m", cfg))
        result["loader"][layout] = dict(prepared_bytes=size)
        # The machine may be shared: the median of `repeats` measurements, each a fresh reader.
        runs = [one_worker(data_dir=data_dir, config=cfg, videos_per_batch=FLAGS.videos_per_batch,
                           clips_per_video=FLAGS.clips_per_video,
                           clips=FLAGS.batches * FLAGS.videos_per_batch * FLAGS.clips_per_video)
                for _ in range(FLAGS.repeats)]
        w1 = dict(runs[int(np.argsort([r["clips_per_cpu_s"] for r in runs])[len(runs) // 2])],
                  clips_per_cpu_s_all=[r["clips_per_cpu_s"] for r in runs])
        result["loader"][layout]["one_worker"] = w1
        medians = ", ".join(f"{x:.0f}" for x in w1["clips_per_cpu_s_all"])
        print(f"loader {layout} ({size / 2**30:.2f} GiB prepared): one worker {w1['clips_per_cpu_s']:.0f} clips per "
              f"CPU-second (median of {medians}), {w1['bytes_per_clip'] / 1024:.0f} KiB and "
              f"{w1['records_per_clip']:.2f} records read per clip, RSS {w1['rss_bytes'] / 2**30:.2f} GiB", flush=True)
        for workers in (int(w) for w in FLAGS.workers):
            r = run(data_dir=data_dir, config=cfg, workers=workers, videos_per_batch=FLAGS.videos_per_batch,
                    clips_per_video=FLAGS.clips_per_video, batches=FLAGS.batches, read_threads=FLAGS.read_threads)
            result["loader"][layout][f"workers={workers}"] = r
            what = "in-process threads" if workers == 0 else f"{workers} worker processes"
            print(f"loader {layout}: {what} {r['clips_per_s']:.0f} clips/s (main process {r['clips_per_cpu_s']:.0f} "
                  f"clips per CPU-second), peak RSS per worker {r['worker_rss_bytes'] / 2**30:.2f} GiB, main process "
                  f"{r['rss_bytes'] / 2**30:.2f} GiB", flush=True)
    if FLAGS.prepare_workers:
        out = os.path.join(root, "data_beam")
        p = prepare_throughput(manual, out, w2v, "resnet", FLAGS.prepare_workers, FLAGS.videos_per_shard)
        result["prepare"][f"howto_chunks/DirectRunner {FLAGS.prepare_workers} workers"] = p
        print(f"prepare howto_chunks: DirectRunner {FLAGS.prepare_workers} workers {p['videos_per_cpu_s']:.1f} videos "
              f"per CPU-second ({p['videos_per_s']:.1f} videos/s)", flush=True)
        shutil.rmtree(out, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    flags.DEFINE_string("fixture_dir", None, "where the fixture and its prepared datasets live "
                        "(default: a folder in the temporary directory; reused when it has the same size)")
    flags.DEFINE_integer("videos", 270, "fixture videos (270: about 2 GiB of features)")
    flags.DEFINE_list("workers", ["2"], "grain worker process counts of the whole-pipeline measurements "
                      "(0: readers as threads of the training process)")
    flags.DEFINE_list("layouts", ["howto_chunks", "howto"], "record layouts to measure")
    flags.DEFINE_integer("prepare_workers", 2, "DirectRunner workers for the Beam prepare (0: skip)")
    flags.DEFINE_integer("videos_per_shard", 32, "videos per shard when preparing the fixture")
    flags.DEFINE_integer("videos_per_batch", 224, "videos per batch")
    flags.DEFINE_integer("clips_per_video", 10, "clips per video")
    flags.DEFINE_integer("batches", 4, "timed batches")
    flags.DEFINE_integer("repeats", 3, "one-reader measurements per layout (the median is reported)")
    flags.DEFINE_integer("read_threads", 1, "grain ReadOptions.num_threads (per worker)")
    from eao_jax import console

    console.run("data.benchmark", main)
