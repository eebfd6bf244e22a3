"""Each TFDS builder from tiny fixtures in the released layouts, read back through the grain pipelines."""

import os

import ml_collections
import numpy as np
import pytest
from fixtures_data import WORDS, item_list, word2vec_fixture, write_howto, write_localization, write_pickle

from eao_jax.data import pipelines
from eao_jax.data import video as video_lib
from eao_jax.data.dataset import PreparedDataset
from eao_jax.data.howto_store import HowToStore
from eao_jax.prepare import prepare
from tfds_builders.validate import load_pickle


def _train_config(dataset, data_dir, tfds_config=None, vpb=2, cpv=3, **kw):
    c = ml_collections.ConfigDict()
    c.seed = 3
    c.data = ml_collections.ConfigDict(dict(
        dataset=dataset, data_dir=str(data_dir), tfds_config=tfds_config, split="train", videos_per_batch=vpb,
        clips_per_video=cpv, n_video_tokens=12, max_words=20, n_stft=768, min_time=8.0,
        text_audio_misaligned=True, num_workers=0, read_threads=1, prefetch=2, video_strategy="clip"))
    c.data.update(kw)
    return c


def _assert_masked_zero(batch):
    for x, m in (("video", "video_mask"), ("text", "text_mask")):
        assert not batch[x][batch[m] == 0].any(), x
    assert not np.moveaxis(batch["audio"], 1, 2)[batch["audio_mask"] == 0].any()


@pytest.fixture(scope="module", params=["resnet_fp32", "resnet_fp32_video"])
def howto(tmp_path_factory, request):
    tmp = tmp_path_factory.mktemp("howto")
    videos = write_howto(tmp / "manual", n_videos=4, fallback_paths=True)
    w2v, vecs = word2vec_fixture(tmp)
    s = prepare("howto100m", tmp / "data", tmp / "manual", config=request.param, word2vec=w2v, feature_dims=(6, 5),
                chunk_seconds=4)
    return tmp, videos, vecs, s, request.param


def test_howto100m_records(howto):
    tmp, videos, vecs, summary, config = howto
    assert summary["status"] == "prepared" and summary["written"] == {"train": 4} and summary["skipped"] == {}
    ds = PreparedDataset.open("howto100m", tmp / "data", config)
    layout = "howto" if config.endswith("_video") else "howto_chunks"
    assert ds.layout("train") == layout and ds.complete_dataset_size("train") == 4
    assert (ds.metadata["dim_2d"], ds.metadata["dim_3d"], ds.video_dim) == (6, 5, 11)
    store = HowToStore(ds, "train")
    got = {r["id"]: r for r in (store.whole(i) for i in range(len(store)))}
    assert list(got) == list(videos)  # the released order
    for vid, v in videos.items():
        r = got[vid]
        np.testing.assert_array_equal(r["features_2d"], v["f2"])
        np.testing.assert_array_equal(r["features_3d"], v["f3"])
        np.testing.assert_array_equal(r["audio"], v["spec"].astype(np.float16))  # released spec is float16
        np.testing.assert_array_equal(r["caption_start"], v["caption"]["start"])
        np.testing.assert_array_equal(r["caption_end"], v["caption"]["end"])
        assert r["caption_text"] == v["caption"]["text"]
    if layout == "howto_chunks":  # a header and ceil(seconds / 4) chunks per video, in the released order
        n = [1 + max(-(-len(v["f2"]) // 4), -(-len(v["f3"]) // 6), -(-v["spec"].shape[1] // 400))
             for v in videos.values()]
        assert ds.num_examples("train") == 4 and len(ds.raw_source("train")) == sum(n) == ds.metadata["num_records"][
            "train"]
        assert ds.metadata["chunk_rows"] == {"rows_2d": 4, "rows_3d": 6, "frames": 400}
    table = ds.word_table()
    tokens = {w for v in videos.values() for t in v["caption"]["text"] for w in t.split()}
    assert set(table.words) == tokens & set(WORDS)  # the dataset's words that word2vec has
    for w in table.words:
        np.testing.assert_array_equal(table.vectors[table.index[w]], vecs[w])


def test_howto100m_training_batches(howto):
    tmp, videos, vecs, _, config = howto
    it = pipelines.make_train_iterator(_train_config("howto100m", tmp / "data", config),
                                       process_index=0, process_count=1)
    specs = [v["spec"].astype(np.float16).astype(np.float32) for v in videos.values()]
    for _ in range(3):
        b = next(it)
        assert b["video"].shape == (6, 12, 11) and b["text"].shape == (6, 20, 7) and b["audio"].shape == (6, 40, 768)
        assert b["audio_STFT_nframes"].tolist() == [-1] * 6
        _assert_masked_zero(b)
        for i in range(6):
            n = int(b["audio_mask"][i].sum())
            assert b["audio_mask"][i, :n].all()
            a = b["audio"][i, :, :n]
            # the clip audio is a contiguous window of one video's spectrogram
            found = any(np.array_equal(s[:, o:o + n], a) for s in specs for o in range(s.shape[1] - n + 1)
                        if s[0, o] == a[0, 0])
            assert found or n == 0
            nv = int(b["video_mask"][i].sum())
            np.testing.assert_allclose(np.linalg.norm(b["video"][i, :nv, :6], axis=1), 1, atol=1e-5)
            np.testing.assert_allclose(np.linalg.norm(b["video"][i, :nv, 6:], axis=1), 1, atol=1e-5)
            for j in range(int(b["text_mask"][i].sum())):
                assert any(np.array_equal(b["text"][i, j], v) for v in vecs.values())


def test_howto100m_float16_storage(tmp_path):
    videos = write_howto(tmp_path / "manual", n_videos=2, seed=1)
    prepare("howto100m", tmp_path / "data", tmp_path / "manual", feature_dims=(6, 5))  # default config: float16
    ds = PreparedDataset.open("howto100m", tmp_path / "data")
    r = HowToStore(ds, "train").whole(0)
    assert r["features_2d"].dtype == np.float16 and r["audio"].dtype == np.float16
    np.testing.assert_array_equal(r["features_2d"], videos[r["id"]]["f2"].astype(np.float16))
    with pytest.raises(FileNotFoundError, match="--word2vec"):
        ds.word_table()


@pytest.fixture(scope="module")
def youcook(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("youcook")
    (tmp / "manual" / "resnet").mkdir(parents=True)
    (tmp / "manual" / "resnet" / "youcook_val.pkl").write_bytes((data_dir / "youcook_e2e" / "youcook_val.pkl")
                                                                .read_bytes())
    s = prepare("youcook2", tmp / "data", tmp / "manual", word2vec=data_dir / "youcook_e2e" / "word2vec_tiny.bin",
                feature_dims=(12, 12))
    items = load_pickle(data_dir / "youcook_e2e" / "youcook_val.pkl")  # spectrograms: torch tensors -> numpy
    return tmp, items, s


def test_youcook2_e2e_fixture_items(youcook):
    tmp, items, summary = youcook
    kept = [it for it in items if "2d_full" in it]
    assert (len(items), len(kept)) == (50, 46)
    assert summary["written"] == {"val": 46}
    data = pipelines.load_retrieval("youcook2", tmp / "data", "val", batch_size=16, n_video_tokens=72, n_stft=4608,
                                    process_index=0, process_count=1)
    assert (data.num_items, data.complete_dataset_size, data.num_batches) == (46, 50, 3)
    assert data.ids == [str(it["id"]) for it in kept]
    batches = list(data)
    assert len(batches) == 3
    index = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert index[valid].tolist() == list(range(46)) and (index[~valid] == -1).all() and valid.sum() == 46
    table = data.table
    for b in batches:
        assert b["video"].shape == (16, 72, 24) and b["audio"].shape == (16, 40, 4608)
        assert b["text"].shape == (16, 20, 10)
        _assert_masked_zero(b)
        assert not b["video"][~b["valid"]].any() and not b["audio_mask"][~b["valid"]].any()
        for row in np.flatnonzero(b["valid"]):
            it = kept[b["index"][row]]
            v, m = video_lib.video_tokens(it["2d_full"], it["3d_full"], 72, "clip")
            np.testing.assert_allclose(b["video"][row], v, atol=1e-7)
            spec = it["audio"]
            n = min(spec.shape[1], 4608)
            assert b["audio_STFT_nframes"][row] == n
            np.testing.assert_array_equal(b["audio"][row, :, :n], spec[:, :n])
            t, tm = table.encode(it["caption"], 20)
            np.testing.assert_array_equal(b["text"][row], t)
            np.testing.assert_array_equal(b["text_mask"][row], tm)


@pytest.mark.parametrize("strategy,cut", [("nearest", 0), ("max_pool", 0), ("clip", 6)])
def test_youcook2_long_video_strategies(youcook, strategy, cut):
    tmp, items, _ = youcook
    kept = [it for it in items if "2d_full" in it]
    data = pipelines.load_retrieval("youcook2", tmp / "data", "val", batch_size=8, n_video_tokens=12,
                                    n_stft=768 if cut else 4608, video_strategy=strategy, cut_clips=cut,
                                    process_index=0, process_count=1)
    b = next(iter(data))
    n = max(cut, 1)
    assert b["video"].shape == (8 * n, 12, 24) and b["index"].shape == (8 * n,)
    for row in range(8 * n):
        it = kept[b["index"][row]]
        if cut:
            j = row % n
            full, _ = video_lib.video_tokens(it["2d_full"], it["3d_full"], 72, "clip")
            np.testing.assert_allclose(b["video"][row], full[12 * j:12 * (j + 1)], atol=1e-7)
            nframes = min(it["audio"].shape[1], 4608)
            assert b["valid"][row] == (j == 0 or nframes - 768 * j > 0.7 * 768)
        else:
            v, _ = video_lib.video_tokens(it["2d_full"], it["3d_full"], 12, strategy)
            np.testing.assert_allclose(b["video"][row], v, atol=1e-7)


def test_msrvtt_pickles_with_torch_audio_and_clip_backbone(tmp_path):
    w2v, _ = word2vec_fixture(tmp_path)
    items = item_list(7, torch_audio=True, seed=2)
    write_pickle(tmp_path / "m" / "resnet" / "msrvtt_jsfusion_test.pkl", items)
    write_pickle(tmp_path / "m" / "resnet" / "msrvtt_train.pkl", items[:5])
    rng = np.random.default_rng(0)
    clip_items = [{"id": it["id"], "clip": rng.standard_normal((len(it["2d"]), 8)).astype(np.float32)} for it in items]
    write_pickle(tmp_path / "m" / "clip" / "msrvtt_jsfusion_test.pkl", clip_items)
    write_pickle(tmp_path / "m" / "clip" / "msrvtt_train.pkl", clip_items[:5])
    s = prepare("msrvtt", tmp_path / "d", tmp_path / "m", word2vec=w2v, feature_dims=(6, 5))
    assert s["written"] == {"test": 7, "train": 5}
    s = prepare("msrvtt", tmp_path / "d", tmp_path / "m", config="clip", word2vec=w2v, feature_dims=(8, None))
    ds = PreparedDataset.open("msrvtt", tmp_path / "d", "clip")
    assert (ds.use_2d, ds.use_3d, ds.video_dim) == (True, False, 8)
    data = pipelines.load_retrieval("msrvtt", tmp_path / "d", "test", config="clip", batch_size=4, n_video_tokens=48,
                                    n_stft=3072, process_index=0, process_count=1)
    b = next(iter(data))
    for row in range(4):
        it, ci = items[b["index"][row]], clip_items[b["index"][row]]
        v, _ = video_lib.video_tokens(ci["clip"], None, 48, "clip")
        np.testing.assert_allclose(b["video"][row], v, atol=1e-7)
        np.testing.assert_array_equal(b["text"][row], data.table.encode(it["eval_caption"], 20)[0])
        audio = it["audio"].array  # written as a torch tensor
        n = min(audio.shape[1], 3072)
        np.testing.assert_array_equal(b["audio"][row, :, :n], audio[:, :n])
    # fine-tuning sampler: a random caption of the item's captions per access
    it = pipelines.make_train_iterator(_train_config("msrvtt", tmp_path / "d", "resnet", vpb=5, cpv=1,
                                                     n_video_tokens=48, n_stft=3072), process_index=0, process_count=1)
    table = PreparedDataset.open("msrvtt", tmp_path / "d", "resnet").word_table()
    encodings = {tuple(table.encode(c, 20)[1]) + tuple(table.encode(c, 20)[0].ravel()) for x in items[:5]
                 for c in x["caption"]}
    seen = set()
    for _ in range(6):
        b = next(it)
        assert b["video"].shape == (5, 48, 11) and b["audio"].shape == (5, 40, 3072)
        for row in range(5):
            key = tuple(b["text_mask"][row]) + tuple(b["text"][row].ravel())
            assert key in encodings
            seen.add(key)
    assert len(seen) > 5  # different captions are drawn across epochs


def test_msrvtt_recall_denominator_rule(tmp_path):
    from tfds_builders.msrvtt import Msrvtt
    from tfds_builders.validate import Report

    b = Msrvtt(data_dir=str(tmp_path))
    b._report = Report()
    assert b._complete_size("test", 968) == 1000  # the JSFusion 1k-A test set: 32 clips lack audio
    assert b._complete_size("test", 1000) == 1000 and b._complete_size("train", 968) == 968


@pytest.mark.parametrize("name,mining", [("crosstask", False), ("mining_youtube", True)])
def test_localization_builders(tmp_path, name, mining):
    videos = write_localization(tmp_path / "m", n_videos=3, mining=mining)
    w2v, vecs = word2vec_fixture(tmp_path)
    s = prepare(name, tmp_path / "d", tmp_path / "m", word2vec=w2v, feature_dims=(6, 5))
    assert s["written"] == {"test": 3}
    data = pipelines.load_localization(name, tmp_path / "d", "test")
    assert len(data) == 3 and data.complete_dataset_size == 3
    for v in data:
        ref = videos[v["id"]]
        t, k = ref["annotation"].shape
        assert v["annotation"].shape == (t, k) and v["text"].shape == (k, 20, 7)
        np.testing.assert_array_equal(v["annotation"], ref["annotation"])
        assert v["steps"] == ref["steps"] and v["task"] == ("" if mining else ref["task"])
        assert v["video"].shape == (t, 12, 11) and v["audio"].shape == (t, 40, 768)
        # window i crops frames [max(0, frame(i)), frame(i + 1)): 98 for i = 0, 100 after; the mask keeps
        # the window's own frames [max(0, frame(0)), frame(1)) = 98 frames
        assert v["audio_STFT_nframes"][0] == 98 and (v["audio_STFT_nframes"][1:] == 100).all()
        np.testing.assert_array_equal(v["audio"][0, :, :98], ref["spec"][:, :98])
        np.testing.assert_array_equal(v["audio"][3, :, :100], ref["spec"][:, 298:398])
        assert (v["audio_mask"].sum(1) == 98).all() and (v["audio_mask"][:, :98] == 1).all()
        # video of second i: 2D feature i, 3D features floor(1.5 i) .. ceil(1.5 (i + 1))
        for i in (0, 1, t - 1):
            f3 = ref["f3"][int(np.floor(1.5 * i)):int(np.ceil(1.5 * (i + 1)))]
            tok, m = video_lib.video_tokens(ref["f2"][i:i + 1], f3, 12, "clip")
            np.testing.assert_allclose(v["video"][i], tok, atol=1e-7)
            np.testing.assert_array_equal(v["video_mask"][i], m)
        for j, step in enumerate(ref["steps"]):
            np.testing.assert_array_equal(v["text"][j], data.table.encode(step, 20)[0])
        chunks = list(pipelines.window_batches(v, 8))
        assert len(chunks) == -(-t // 8) and all(c["video"].shape == (8, 12, 11) for c in chunks)
        assert sum(c["valid"].sum() for c in chunks) == t


def test_synthetic_tiny_all_splits(tmp_path):
    from tfds_builders import synthetic

    path = synthetic.ensure_prepared(tmp_path, "tiny")
    ds = PreparedDataset(path)
    spec = synthetic.world.SPECS["tiny"]
    assert {s: ds.layout(s) for s in ds.splits} == {"train": "howto", "retrieval": "items",
                                                   "localization": "localization"}
    assert ds.num_examples("train") == spec.train_videos
    assert ds.complete_dataset_size("retrieval") == spec.retrieval_items
    it = pipelines.make_train_iterator(_train_config("synthetic", tmp_path, "tiny", vpb=4, cpv=2),
                                       process_index=0, process_count=1)
    b = next(it)
    assert b["video"].shape == (8, 12, 64) and b["text"].shape == (8, 20, 16)
    _assert_masked_zero(b)
    r = pipelines.load_retrieval("synthetic", tmp_path, "retrieval", config="tiny", batch_size=8, n_video_tokens=48,
                                 n_stft=3072, process_index=0, process_count=1)
    b = next(iter(r))
    assert b["video"].shape == (8, 48, 64) and b["valid"].all() and (b["text_mask"].sum(1) > 0).all()
    loc = pipelines.load_localization("synthetic", tmp_path, "localization", config="tiny")
    v = loc[0]
    assert v["annotation"].shape[1] == spec.steps_per_task and v["annotation"].sum() > 0
    assert synthetic.ensure_prepared(tmp_path, "tiny") == path  # already there: nothing to do
    # the synthetic records are written uncompressed
    from array_record.python import array_record_module

    shard = next(p for p in os.listdir(path) if p.startswith("synthetic-train.array_record"))
    reader = array_record_module.ArrayRecordReader(f"{path}/{shard}")
    assert "uncompressed" in reader.writer_options_string()


def test_howto100m_single_backbone_s3d(tmp_path):
    """S3D: 3D slot only (1 feature/s), found through the `<vid>.npz` fallback when `<vid>_3d.npz` is absent."""
    videos = write_howto(tmp_path / "m", n_videos=3, seed=4, fallback_paths=True)
    w2v, _ = word2vec_fixture(tmp_path)
    s = prepare("howto100m", tmp_path / "d", tmp_path / "m", config="s3d_fp32", word2vec=w2v, feature_dims=(None, 5),
                paths={"csv": "HowTo100M_1166_videopaths.txt", "features_path": "features"})
    assert s["written"] == {"train": 3}
    ds = PreparedDataset.open("howto100m", tmp_path / "d", "s3d_fp32")
    assert (ds.use_2d, ds.use_3d, ds.fps, ds.video_dim) == (False, True, (1.0, 1.0), 5)
    store = HowToStore(ds, "train")
    r = {v["id"]: v for v in (store.whole(i) for i in range(3))}
    for vid, v in videos.items():
        np.testing.assert_array_equal(r[vid]["features_3d"], v["f3"])
        assert r[vid]["features_2d"].shape == (0, 0)
    b = next(pipelines.make_train_iterator(_train_config("howto100m", tmp_path / "d", "s3d_fp32", vpb=3, cpv=2),
                                           process_index=0, process_count=1))
    assert b["video"].shape == (6, 12, 5)
    # 8 s windows at 1 feature/s: int(start) .. int(end) + 1 gives 9 or more 3D features (12 tokens max)
    assert (b["video_mask"].sum(1) >= 9).all()
    np.testing.assert_allclose(np.linalg.norm(b["video"], axis=2), b["video_mask"], atol=1e-5)
