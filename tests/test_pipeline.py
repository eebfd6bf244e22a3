"""grain pipelines: determinism, per-process sharding, checkpointable iterator state, padded eval batches."""

import grain
import ml_collections
import numpy as np
import pytest

from eao_jax.data import pipelines
from tfds_builders import synthetic


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    synthetic.ensure_prepared(d, "tiny")
    return d


def _config(data_dir, **kw):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.data = ml_collections.ConfigDict(dict(
        dataset="synthetic", data_dir=str(data_dir), tfds_config="tiny", split="train", videos_per_batch=4,
        clips_per_video=2, n_video_tokens=12, max_words=20, n_stft=768, min_time=8.0, text_audio_misaligned=True,
        num_workers=0, read_threads=2, prefetch=2))
    c.data.update(kw)
    return c


def _take(it, n):
    return [next(it) for _ in range(n)]


def _equal(a, b):
    return all(np.array_equal(x[k], y[k]) for x, y in zip(a, b, strict=True) for k in x)


def test_deterministic_from_the_seed(syn_dir):
    c = _config(syn_dir)
    a = _take(pipelines.make_train_iterator(c, process_index=0, process_count=1), 8)  # > 1 epoch of 24 videos
    b = _take(pipelines.make_train_iterator(c, process_index=0, process_count=1), 8)
    assert _equal(a, b)
    d = _take(pipelines.make_train_iterator(c, process_index=0, process_count=1, seed=1), 8)
    assert not _equal(a, d)
    # epochs are reshuffled: the first video of each batch over 2 epochs is not a repeated sequence
    assert not np.array_equal(a[0]["video"], a[6]["video"])


def test_fixed_shapes_and_masks(syn_dir):
    for b in _take(pipelines.make_train_iterator(_config(syn_dir), process_index=0, process_count=1), 6):
        assert {k: v.shape for k, v in b.items()} == {
            "video": (8, 12, 64), "video_mask": (8, 12), "text": (8, 20, 16), "text_mask": (8, 20),
            "audio": (8, 40, 768), "audio_mask": (8, 768), "audio_STFT_nframes": (8,)}
        assert all(b[k].dtype == np.float32 for k in b if k != "audio_STFT_nframes")
        assert b["audio_STFT_nframes"].dtype == np.int32
        for k in ("video_mask", "text_mask", "audio_mask"):
            assert set(np.unique(b[k])) <= {0.0, 1.0}
            # masks are prefixes: real positions first, padding after
            assert (np.diff(b[k], axis=1) <= 0).all()
        assert not b["video"][b["video_mask"] == 0].any() and not b["text"][b["text_mask"] == 0].any()


def test_process_sharding(syn_dir):
    c = _config(syn_dir)
    full = _take(pipelines.make_train_iterator(c, process_index=0, process_count=1), 3)
    parts = [_take(pipelines.make_train_iterator(c, process_index=p, process_count=2), 3) for p in (0, 1)]
    for p in parts:
        assert p[0]["video"].shape == (4, 12, 64)  # 2 of the 4 videos x 2 clips
    # process p gets block p of each global batch (tests/test_multiprocess.py checks the rows equal the full run's)
    def vids(batch, n):
        return {batch["video"][i * 2, 0].tobytes() for i in range(n)}

    assert not (vids(parts[0][0], 2) & vids(parts[1][0], 2))
    with pytest.raises(ValueError, match="videos_per_batch=4 is not divisible by the process count 3"):
        pipelines.make_train_iterator(c, process_index=0, process_count=3)
    assert full[0]["video"].shape[0] == 8


def test_iterator_state_get_set(syn_dir):
    it = pipelines.make_train_iterator(_config(syn_dir), process_index=0, process_count=1)
    _take(it, 5)
    state = it.get_state()
    after = _take(it, 3)
    it2 = pipelines.make_train_iterator(_config(syn_dir), process_index=0, process_count=1)
    it2.set_state(state)
    assert _equal(after, _take(it2, 3))


def test_iterator_state_in_orbax_checkpoint(syn_dir, tmp_path):
    import orbax.checkpoint as ocp

    it = pipelines.make_train_iterator(_config(syn_dir), process_index=0, process_count=1)
    _take(it, 4)
    opts = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=opts) as mngr:
        mngr.save(4, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    after = _take(it, 2)
    it2 = pipelines.make_train_iterator(_config(syn_dir), process_index=0, process_count=1)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=opts) as mngr:
        mngr.restore(mngr.latest_step(), args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2)))
    assert _equal(after, _take(it2, 2))


def test_worker_processes_match_in_process(syn_dir):
    # whole batches are built by one transform, so the worker count does not change the batches
    c = _config(syn_dir)
    ref = _take(pipelines.make_train_iterator(c, process_index=0, process_count=1), 3)
    c.data.num_workers = 2
    it = pipelines.make_train_iterator(c, process_index=0, process_count=1)
    got = _take(it, 3)
    assert _equal(ref, got)
    state = it.get_state()
    nxt = _take(it, 1)
    it.close()
    it2 = pipelines.make_train_iterator(c, process_index=0, process_count=1)
    it2.set_state(state)  # (a state restores into an iterator with the same num_workers)
    assert _equal(nxt, _take(it2, 1))
    it2.close()


def test_eval_batches_padded_and_sharded(syn_dir):
    n = synthetic.world.SPECS["tiny"].retrieval_items
    seen = []
    shapes = set()
    n_batches = set()
    for p in range(3):
        data = pipelines.load_retrieval("synthetic", syn_dir, "retrieval", config="tiny", batch_size=5,
                                        n_video_tokens=48, n_stft=3072, process_index=p, process_count=3)
        batches = list(data)
        n_batches.add(len(batches))
        for b in batches:
            shapes.add(tuple(v.shape for v in b.values()))
            seen += b["index"][b["valid"]].tolist()
            assert (b["index"][~b["valid"]] == -1).all() and not b["audio"][~b["valid"]].any()
    assert len(shapes) == 1 and n_batches == {3}  # ceil(ceil(32 / 3) / 5) batches on every process
    assert sorted(seen) == list(range(n))


def test_bad_eval_and_train_arguments(syn_dir):
    with pytest.raises(ValueError, match="multiple of 64"):
        pipelines.load_retrieval("synthetic", syn_dir, "retrieval", config="tiny", batch_size=4, n_video_tokens=48,
                                 n_stft=3000, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="not a retrieval split"):
        pipelines.load_retrieval("synthetic", syn_dir, "train", config="tiny", batch_size=4, n_video_tokens=48,
                                 n_stft=3072, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="no split 'val'"):
        pipelines.load_retrieval("synthetic", syn_dir, "val", config="tiny", batch_size=4, n_video_tokens=48,
                                 n_stft=3072, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="training needs 'howto', 'howto_chunks' or 'items'"):
        pipelines.make_train_iterator(_config(syn_dir, split="localization"), process_index=0, process_count=1)
    with pytest.raises(ValueError, match="must be positive"):
        pipelines.make_train_iterator(_config(syn_dir, clips_per_video=0), process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="'msrvtt' is not prepared"):
        pipelines.make_train_iterator(_config(syn_dir, dataset="msrvtt"), process_index=0, process_count=1)
