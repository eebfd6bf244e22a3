"""HowTo100M at scale: Beam preparation, prepare without TensorFlow past TFDS's memory threshold,
the chunked record layout (same batches as the per-video layout), kill-and-resume on it."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest
from fixtures_data import word2vec_fixture, write_howto

from eao_jax.data import pipelines
from eao_jax.data.dataset import PreparedDataset
from eao_jax.data.howto_store import HowToStore
from eao_jax.prepare import prepare


@pytest.fixture(scope="module")
def manual(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("howto_scale")
    videos = write_howto(tmp / "m", n_videos=9, seed=3)
    w2v, _ = word2vec_fixture(tmp)
    return tmp, videos, w2v


def _records(path):
    """The split's records, each as a canonical tuple of (feature, values) (protobuf map order is not)."""
    from eao_jax.data import records

    src = PreparedDataset(path).raw_source("train")
    out = []
    for i in range(len(src)):
        f = records.parse_example(src[i])
        out.append(tuple(sorted((k, tuple(bytes(x) if isinstance(x, memoryview) else x for x in v)
                                 if isinstance(v, list) else bytes(v)) for k, v in f.items())))
    return out


def _prep(manual, out, **kw):
    tmp, _, w2v = manual
    return prepare("howto100m", tmp / out, tmp / "m", config="resnet_fp32", word2vec=w2v, feature_dims=(6, 5),
                   chunk_seconds=4, **kw)


def test_beam_direct_runner_prepares_the_same_records(manual):
    pytest.importorskip("apache_beam", reason="the `beam` extra (pip install -e '.[beam]') is part of `test`")
    one = _prep(manual, "one", videos_per_shard=2)
    beam = _prep(manual, "beam", videos_per_shard=2, workers=2)  # DirectRunner, 2 worker processes
    assert one["written"] == beam["written"] == {"train": 9}
    files = sorted(f for f in os.listdir(beam["path"]) if ".array_record-" in f)
    assert len(files) == 5 and files[-1].endswith("-00004-of-00005")  # one shard per 2 videos
    a, b = _records(one["path"]), _records(beam["path"])
    assert set(a) == set(b) and len(a) == len(b)  # the same records ...
    assert a == b  # ... in the same (released) order, so the video index is the same
    for f in ("train_index.npz", "word_vectors.npz"):
        za, zb = np.load(os.path.join(one["path"], f)), np.load(os.path.join(beam["path"], f))
        assert za.files == zb.files and all(np.array_equal(za[k], zb[k]) for k in za.files)
    assert open(os.path.join(one["path"], "tokens.txt")).read() == open(os.path.join(beam["path"], "tokens.txt")).read()


def test_beam_prepare_counts_skipped_items_into_the_report(manual, tmp_path):
    pytest.importorskip("apache_beam")
    tmp, videos, w2v = manual
    m = tmp_path / "m"
    write_howto(m, n_videos=5, seed=3)
    vid = list(videos)[3]
    (m / "audio_features" / videos[vid]["path"] / f"{vid}_spec.npz").unlink()
    s = prepare("howto100m", tmp_path / "d", m, config="resnet_fp32", feature_dims=(6, 5), workers=2,
                videos_per_shard=2, skip_bad=True)
    assert s["written"] == {"train": 4} and s["skipped"] == {"train": {"missing file": 1}}
    report = json.loads(open(s["report"]).read())
    assert [it["item"] for it in report["skipped_items"]] == [vid]
    store = HowToStore(PreparedDataset(s["path"]), "train")
    assert [store.whole(i)["id"] for i in range(len(store))] == [v for v in list(videos)[:5] if v != vid]


def test_large_split_prepares_without_tensorflow(manual, tmp_path, monkeypatch):
    import importlib.util

    from tensorflow_datasets.core import shuffle

    assert importlib.util.find_spec("tensorflow") is None  # the project never installs TensorFlow
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 4096)  # TFDS spills to tf.io.gfile past this
    # TFDS's own writer path needs TensorFlow once a split passes the threshold:
    sh = shuffle.Shuffler(dirpath=str(tmp_path / "sh"), hash_salt="x", disable_shuffling=True)
    with pytest.raises(Exception, match="tensorflow"):
        for i in range(4):
            sh.add(i, b"x" * 2000)
    # ours does not: the HowTo builder (sharded tasks) and every other builder (streamed shards)
    s = _prep(manual, "notf", videos_per_shard=4)
    assert s["written"] == {"train": 9}
    assert PreparedDataset(s["path"])._builder.info.splits["train"].num_bytes > 100 * 4096
    s2 = prepare("synthetic", tmp_path / "syn", config="tiny")
    assert s2["written"] == {"train": 24, "retrieval": 32, "localization": 4}
    assert "tensorflow" not in {m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}


def _config(data_dir, tfds_config, **kw):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        dataset="howto100m", data_dir=str(data_dir), tfds_config=tfds_config, split="train", videos_per_batch=4,
        clips_per_video=3, n_video_tokens=12, max_words=20, n_stft=768, min_time=8.0, text_audio_misaligned=True,
        num_workers=0, read_threads=2, prefetch=2, worker_videos=2))
    c.data.update(kw)
    return c


@pytest.fixture(scope="module")
def both_layouts(manual):
    tmp, _, w2v = manual
    for cfg in ("resnet_fp32", "resnet_fp32_video"):
        prepare("howto100m", tmp / "layouts", tmp / "m", config=cfg, word2vec=w2v, feature_dims=(6, 5),
                chunk_seconds=4)
    return tmp / "layouts"


@pytest.mark.parametrize("tfds_config", ["resnet_fp32", "resnet_fp32_video"])
def test_an_epoch_counts_videos_not_records(both_layouts, tfds_config):
    """steps_per_epoch (the lr decay's epochs, every-epoch evaluations) is videos // videos_per_batch
    in both layouts, training and the benchmark alike, though the chunked split holds a header and
    several chunk records per video."""
    from eao_jax import bench, config_utils, train

    records = len(PreparedDataset.open("howto100m", both_layouts, tfds_config).raw_source("train"))
    assert records >= 5 * 9 if tfds_config == "resnet_fp32" else records == 9  # 20-40 s videos, 4-s chunks
    config = _config(both_layouts, tfds_config, videos_per_batch=2)
    config.train = ml_collections.ConfigDict(dict(steps_per_epoch=-1))
    config.eval = ml_collections.ConfigDict(dict(tasks=dict(youcook2=dict(every_steps=-1))))
    it, n_videos = train.make_train_data(config)
    assert n_videos == 9 and next(it)["video"].shape[0] == 2 * 3
    config_utils.resolve_epoch_steps(config, n_videos)
    assert config.train.steps_per_epoch == 9 // 2 and config.eval.tasks.youcook2.every_steps == 4
    assert bench._training_videos(config) == 9


def _take(it, n):
    return [next(it) for _ in range(n)]


def _same(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_chunked_layout_gives_the_per_video_layout_batches(both_layouts):
    ref = _take(pipelines.make_train_iterator(_config(both_layouts, "resnet_fp32_video"), process_index=0,
                                              process_count=1), 7)  # > 3 epochs of 9 videos
    chunked = _take(pipelines.make_train_iterator(_config(both_layouts, "resnet_fp32"), process_index=0,
                                                  process_count=1), 7)
    assert _same(ref, chunked)
    assert any(b["text_mask"].any() for b in ref) and all(b["audio_mask"].any() for b in ref)
    # neither the grouping of videos per reader element nor worker processes change a batch
    whole = _take(pipelines.make_train_iterator(_config(both_layouts, "resnet_fp32", worker_videos=4),
                                                process_index=0, process_count=1), 7)
    assert _same(ref, whole)
    it = pipelines.make_train_iterator(_config(both_layouts, "resnet_fp32", num_workers=2), process_index=0,
                                       process_count=1)
    assert _same(ref, _take(it, 7))
    it.close()


def test_chunk_reads_stay_under_the_clip_window(both_layouts):
    ds = PreparedDataset.open("howto100m", both_layouts, "resnet_fp32")
    store = HowToStore(ds, "train")
    it = pipelines.HowToBatch(store=store, table=ds.word_table(), n_clips=10, fps_2d=1.0, fps_3d=1.5, video_dim=11,
                              misaligned=True)
    before = store.records_read
    it.map([(p, p % len(store)) for p in range(9)])
    chunks = store.records_read - before - 9  # minus the headers
    # 4-s chunks, a clip touches at most its 12-s window: <= 5 chunks, whatever the video's length
    assert 0 < chunks <= 9 * 10 * 5
    assert chunks < sum(store.videos([i])[0].n_chunks for i in range(9))  # never the whole videos


_RESUMABLE = textwrap.dedent("""
    import json, pickle, sys
    import ml_collections
    from eao_jax.data import pipelines
    if __name__ == "__main__":  # grain's worker processes import this file again
        data_dir, state_file, out_file, n, resume = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
        c = ml_collections.ConfigDict(dict(seed=0, data=dict(
            dataset="howto100m", data_dir=data_dir, tfds_config="resnet_fp32", split="train", videos_per_batch=4,
            clips_per_video=3, n_video_tokens=12, max_words=20, n_stft=768, min_time=8.0, text_audio_misaligned=True,
            num_workers=1, read_threads=2, prefetch=2, worker_videos=2)))
        it = pipelines.make_train_iterator(c, process_index=0, process_count=1)
        count = 0
        if resume == "1":
            with open(state_file, "rb") as f:
                count, state = pickle.load(f)
            it.set_state(state)
        with open(out_file, "ab") as out:
            for _ in range(n):
                b = next(it)
                pickle.dump(b, out)
                out.flush()
                count += 1
                with open(state_file + ".tmp", "wb") as f:
                    pickle.dump((count, it.get_state()), f)
                import os
                os.replace(state_file + ".tmp", state_file)
                print("batch", flush=True)
        it.close()
""")


def _load_all(path):
    import pickle

    out = []
    with open(path, "rb") as f:
        while True:
            try:
                out.append(pickle.load(f))
            except EOFError:
                return out


def test_kill_and_resume_gives_the_same_batches(both_layouts, tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_RESUMABLE)
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    ref = tmp_path / "ref.pkl"
    subprocess.run([sys.executable, str(script), str(both_layouts), str(tmp_path / "s0"), str(ref), "6", "0"],
                   check=True, timeout=300, env=env, capture_output=True)
    state, got = tmp_path / "s1", tmp_path / "got.pkl"
    p = subprocess.Popen([sys.executable, str(script), str(both_layouts), str(state), str(got), "100", "0"],
                         stdout=subprocess.PIPE, text=True, env=env, start_new_session=True)
    for _ in range(3):  # let it finish three batches (and save their state), then kill -9 it
        assert p.stdout.readline().startswith("batch")
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    time.sleep(0.2)
    # the checkpoint says how many batches it covers; batches written after it are redone on resume
    import pickle

    with open(state, "rb") as f:
        n_done, _ = pickle.load(f)
    done = _load_all(got)
    assert n_done >= 3 and len(done) >= n_done
    with open(got, "wb") as f:
        for b in done[:n_done]:
            pickle.dump(b, f)
    subprocess.run([sys.executable, str(script), str(both_layouts), str(state), str(got), str(6 - n_done), "1"],
                   check=True, timeout=300, env=env, capture_output=True)
    assert _same(_load_all(ref), _load_all(got))


def test_worker_processes_build_clips_in_shared_memory():
    """In a worker process (grain's worker_init_fn ran) clip arrays are built in shared-memory files of
    their loader and pickled as the files' names; unpickling in the training process maps the memory
    and unlinks the name at once. The training process itself allocates plain arrays."""
    code = textwrap.dedent("""
        import os, pickle
        import numpy as np
        from multiprocessing.reduction import ForkingPickler
        from eao_jax.data import howto, workers
        kw = dict(video_dim=8, text_dim=4, max_words=3, n_stft=16, n_video_tokens=2)
        plain = howto.empty_clips(2, **kw)
        assert all(type(a) is np.ndarray for a in plain.values())
        loader = workers.Loader.new()
        workers.in_worker_process(loader, 0, 2)
        marker = loader.prefix + "w%x" % os.getpid()
        assert loader.names() == [marker] and loader.workers() == [os.getpid()]
        shared = howto.empty_clips(2, **kw)
        assert len(loader.names()) == 7 and shared["audio"].shape == (2, 40, 16) and shared["video"].shape == (2, 2, 8)
        for i, a in enumerate(shared.values()):
            a[...] = i
        row = pickle.loads(pickle.dumps(shared["audio"][1]))  # a view: pickled whole, the file stays
        assert len(loader.names()) == 7 and type(row) is not np.ndarray and (row == 4).all()
        got = pickle.loads(ForkingPickler.dumps(shared))  # as grain's queue does
        assert loader.names() == [marker]
        assert all(type(a) is np.ndarray and a.shape == shared[k].shape and (a == i).all()
                   for i, (k, a) in enumerate(got.items()))
        del shared
        got["audio"][0] += 1  # still mapped in this process
        assert (got["audio"][0] == 5).all()
        loader.remove()
        assert loader.names() == []
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
