"""Prepare-time validation: every bad-input rule, --skip_bad reports, idempotence, interrupted prepares."""

import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch_format
from fixtures_data import howto_file, item_list, word2vec_fixture, write_howto, write_localization, write_pickle

from eao_jax.data.dataset import PreparedDataset
from eao_jax.data.howto_store import HowToStore
from eao_jax.prepare import prepare
from tfds_builders.validate import PrepareError, load_pickle


def _howto(tmp_path, n=3, seed=0):
    videos = write_howto(tmp_path / "m", n_videos=n, seed=seed)
    return videos, list(videos)


def _prep_howto(tmp_path, **kw):
    return prepare("howto100m", tmp_path / "d", tmp_path / "m", config="resnet_fp32", feature_dims=(6, 5), **kw)


def _no_dataset_left(tmp_path):
    root = tmp_path / "d" / "howto100m" / "resnet_fp32"
    return not root.exists() or not [d for d in os.listdir(root) if not d.startswith(".")]


def test_missing_file(tmp_path):
    videos, ids = _howto(tmp_path)
    f = howto_file(tmp_path / "m", videos, ids[1], "3d")
    f.unlink()
    with pytest.raises(PrepareError, match=rf"missing file: item '{ids[1]}', file .*{ids[1]}\.npz"):
        _prep_howto(tmp_path)
    assert _no_dataset_left(tmp_path)


def test_truncated_file(tmp_path):
    videos, ids = _howto(tmp_path)
    f = howto_file(tmp_path / "m", videos, ids[2], "spec")
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(PrepareError, match=rf"unreadable or truncated file: item '{ids[2]}', file {f}"):
        _prep_howto(tmp_path)
    assert _no_dataset_left(tmp_path)


def test_wrong_feature_dimension(tmp_path):
    videos, ids = _howto(tmp_path)
    f = howto_file(tmp_path / "m", videos, ids[0], "2d")
    np.savez(f, features=np.ones((30, 7), np.float32))
    with pytest.raises(PrepareError, match=rf"wrong feature dimension: item '{ids[0]}', file {f}: 2D features has "
                                           "dimension 7, expected 6"):
        _prep_howto(tmp_path)


def test_widths_come_from_the_config(tmp_path):
    _howto(tmp_path)
    # no 3D override: the config's width (2048) is expected, not the first video's; the error says how out
    with pytest.raises(PrepareError, match=r"item 'vid000'.*3D features has dimension 5, expected 2048; .*--config"
                                           r".*--feature_dims=D2,D3"):
        prepare("howto100m", tmp_path / "d", tmp_path / "m", config="resnet_fp32", feature_dims=(6, None))


@pytest.mark.parametrize("kind,value", [("2d", np.nan), ("3d", np.inf), ("spec", -np.inf)])
def test_non_finite_values(tmp_path, kind, value):
    videos, ids = _howto(tmp_path)
    f = howto_file(tmp_path / "m", videos, ids[1], kind)
    with np.load(f) as z:
        key = z.files[0]
        arr = z[key].copy()
    arr.flat[5] = value
    np.savez(f, **{key: arr})
    with pytest.raises(PrepareError, match=rf"NaN or Inf values: item '{ids[1]}', file {f}"):
        _prep_howto(tmp_path)


def test_float16_overflow_is_caught(tmp_path):
    videos, ids = _howto(tmp_path)
    f = howto_file(tmp_path / "m", videos, ids[0], "2d")
    np.savez(f, features=np.full((30, 6), 1e6, np.float32))  # finite in float32, inf in float16
    with pytest.raises(PrepareError, match=r"NaN or Inf values.*2D features \(as float16\)"):
        prepare("howto100m", tmp_path / "d", tmp_path / "m", feature_dims=(6, 5))


def test_empty_spectrogram(tmp_path):
    videos, ids = _howto(tmp_path)
    f = howto_file(tmp_path / "m", videos, ids[0], "spec")
    np.savez(f, np.zeros((40, 0), np.float16))
    with pytest.raises(PrepareError, match=rf"empty spectrogram: item '{ids[0]}', file {f}"):
        _prep_howto(tmp_path)


def test_video_without_caption(tmp_path):
    videos, ids = _howto(tmp_path)
    caps = load_pickle(tmp_path / "m" / "caption.pickle")
    del caps[ids[2]]
    write_pickle(tmp_path / "m" / "caption.pickle", caps)
    with pytest.raises(PrepareError, match=rf"no caption: item '{ids[2]}', file .*caption.pickle"):
        _prep_howto(tmp_path)


def test_howto_bad_captions_are_named_per_video(tmp_path):
    """Captions go to the shard workers as JSON (not pickle): one that fails the caption checks there
    is reported for its video, naming the released file."""
    _, ids = _howto(tmp_path, n=4)
    caps = load_pickle(tmp_path / "m" / "caption.pickle")
    caps[ids[1]]["end"] = caps[ids[1]]["end"][:-1]
    caps[ids[2]]["start"] = caps[ids[2]]["start"][::-1].copy()
    caps[ids[3]]["start"][0] = np.inf
    write_pickle(tmp_path / "m" / "caption.pickle", caps)
    with pytest.raises(PrepareError, match=rf"howto100m/train: bad annotation: item '{ids[1]}', file "
                                           r".*caption\.pickle: caption start/end/text lengths differ"):
        _prep_howto(tmp_path)
    s = _prep_howto(tmp_path, skip_bad=True)
    assert s["written"] == {"train": 1} and s["skipped"] == {"train": {"bad annotation": 2, "NaN or Inf values": 1}}
    report = json.loads(open(s["report"]).read())
    assert {(it["item"], it["detail"]) for it in report["skipped_items"]} == {
        (ids[1], f"caption start/end/text lengths differ ({len(caps[ids[1]]['start'])}, "
                 f"{len(caps[ids[1]]['end'])}, {len(caps[ids[1]]['text'])})"),
        (ids[2], "caption segments are not sorted by start time"), (ids[3], "caption start/end")}
    assert {it["file"] for it in report["skipped_items"]} == {str(tmp_path / "m" / "caption.pickle")}


def test_empty_caption_and_nan_in_pickles(tmp_path):
    items = item_list(4)
    items[2]["eval_caption"] = "  "
    write_pickle(tmp_path / "m" / "msrvtt_jsfusion_test.pkl", items)  # the flat layout is accepted too
    with pytest.raises(PrepareError, match=r"msrvtt/test: empty caption: item 'clip2', file .*msrvtt_jsfusion_test"):
        prepare("msrvtt", tmp_path / "d", tmp_path / "m", feature_dims=(6, 5))
    items[2]["eval_caption"] = "cut the onion"
    items[3]["3d"][0, 0] = np.nan
    write_pickle(tmp_path / "m" / "msrvtt_jsfusion_test.pkl", items)
    with pytest.raises(PrepareError, match=r"NaN or Inf values: item 'clip3'.*3D features has 1 non-finite"):
        prepare("msrvtt", tmp_path / "d", tmp_path / "m", feature_dims=(6, 5))


def test_bad_annotation(tmp_path):
    write_localization(tmp_path / "m", n_videos=3)
    np.save(tmp_path / "m" / "annotations" / "t2_v1.npy", np.ones((12, 5), np.float32))  # t2 has 2 steps
    with pytest.raises(PrepareError, match=r"bad annotation: item 'v1', file .*t2_v1\.npy: annotation must be "
                                           r"\(T > 0, K = 2 steps\)"):
        prepare("crosstask", tmp_path / "d", tmp_path / "m", feature_dims=(6, 5))


def test_skip_bad_writes_a_counted_report(tmp_path):
    videos, ids = write_howto(tmp_path / "m", n_videos=6), None
    ids = list(videos)
    howto_file(tmp_path / "m", videos, ids[0], "3d").unlink()
    f = howto_file(tmp_path / "m", videos, ids[2], "2d")
    f.write_bytes(f.read_bytes()[:100])
    np.savez(howto_file(tmp_path / "m", videos, ids[3], "spec"), np.zeros((40, 0), np.float16))
    np.savez(howto_file(tmp_path / "m", videos, ids[4], "2d"), features=np.full((9, 6), np.nan, np.float32))
    s = _prep_howto(tmp_path, skip_bad=True)
    assert s["written"] == {"train": 2}
    assert s["skipped"] == {"train": {"missing file": 1, "unreadable or truncated file": 1, "empty spectrogram": 1,
                                      "NaN or Inf values": 1}}
    report = json.loads(open(s["report"]).read())
    assert os.path.dirname(s["report"]) == s["path"]
    assert sorted(it["item"] for it in report["skipped_items"]) == sorted([ids[0], ids[2], ids[3], ids[4]])
    assert all(it["file"] for it in report["skipped_items"])
    ds = PreparedDataset(s["path"])
    assert ds.num_examples("train") == 2 and ds.complete_dataset_size("train") == 6
    assert ds.metadata["skipped"] == {"train": 4}
    store = HowToStore(ds, "train")
    assert [store.whole(i)["id"] for i in range(len(store))] == [ids[1], ids[5]]


def test_prepare_is_idempotent_and_adds_the_table_later(tmp_path):
    _howto(tmp_path)
    s1 = _prep_howto(tmp_path)
    assert s1["status"] == "prepared" and s1["word_table"] is None
    files = {f: os.stat(os.path.join(s1["path"], f)).st_mtime_ns for f in os.listdir(s1["path"])}
    s2 = _prep_howto(tmp_path)
    assert s2["status"] == "exists" and s2["written"] == s1["written"]
    assert {f: os.stat(os.path.join(s1["path"], f)).st_mtime_ns for f in os.listdir(s1["path"])} == files
    w2v, _ = word2vec_fixture(tmp_path)
    s3 = _prep_howto(tmp_path, word2vec=w2v)
    assert s3["status"] == "exists" and s3["word_table"]["dim"] == 7
    assert PreparedDataset(s3["path"]).word_table().dim == 7


def test_interrupted_prepare_leaves_no_half_dataset(tmp_path, monkeypatch):
    _howto(tmp_path, n=4)
    from tfds_builders.howto100m import shards as hb

    real = hb.video_records
    calls = {"n": 0}

    def interrupting(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(hb, "video_records", interrupting)
    with pytest.raises(KeyboardInterrupt):
        _prep_howto(tmp_path)
    assert _no_dataset_left(tmp_path)  # neither a version directory nor a temporary one
    monkeypatch.setattr(hb, "video_records", real)
    # a killed prepare (no cleanup) leaves a temporary directory: the next prepare removes it
    stale = tmp_path / "d" / "howto100m" / "resnet_fp32" / "incomplete.ABC123_1.0.0"
    stale.mkdir(parents=True)
    (stale / "howto100m-train.array_record-00000-of-00001").write_bytes(b"partial")
    s = _prep_howto(tmp_path)
    assert s["written"] == {"train": 4} and not stale.exists()
    assert any("interrupted" in n for n in s["notes"])


def test_pickles_holding_torch_tensors_load_without_torch(tmp_path, monkeypatch):
    audio = np.arange(40 * 7, dtype=np.float32).reshape(40, 7)
    write_pickle(tmp_path / "a.pkl", [{"id": "v", "audio": torch_format.Tensor(audio), "n": torch_format.Tensor(
        np.array([3, -1], np.int64)), "h": torch_format.Tensor(np.ones((2, 3), np.float16))}])
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    (item,) = load_pickle(tmp_path / "a.pkl")
    for key, want in (("audio", audio), ("n", np.array([3, -1], np.int64)), ("h", np.ones((2, 3), np.float16))):
        assert type(item[key]) is np.ndarray and item[key].dtype == want.dtype
        np.testing.assert_array_equal(item[key], want)


def test_a_pickle_naming_another_torch_object_is_refused_by_name(tmp_path):
    write_pickle(tmp_path / "a.pkl", {"x": torch_format.Call(torch_format.Global("torch", "load"), "other.pth")})
    with pytest.raises(PrepareError, match=r"a\.pkl: refusing to load torch\.load: only numpy arrays, pandas data "
                                           r"frames, torch tensors and plain containers .* are read from a dataset "
                                           r"pickle"):
        load_pickle(tmp_path / "a.pkl")


def test_torch_tensors_pickled_by_torch_read_as_torch_reads_them(tmp_path):
    """The reader against torch's own `pickle.dump` of tensors (dtypes, a view with a storage offset, a
    transposed one, a scalar), and the test writer against torch's `pickle.load`."""
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {"f32": base, "view": base[1:, 2:5], "t": base.t(), "f16": base.half(), "i64": torch.arange(5),
               "scalar": torch.tensor(2.5, dtype=torch.float64), "bool": base > 10}
    with open(tmp_path / "torch.pkl", "wb") as f:
        pickle.dump(tensors, f)
    ours = load_pickle(tmp_path / "torch.pkl")
    for key, t in tensors.items():
        assert ours[key].dtype == t.numpy().dtype, key
        np.testing.assert_array_equal(ours[key], t.numpy(), err_msg=key)
    write_pickle(tmp_path / "ours.pkl", {k: torch_format.Tensor(t.numpy()) for k, t in tensors.items()})
    with open(tmp_path / "ours.pkl", "rb") as f:
        back = pickle.load(f)
    for key, t in tensors.items():
        assert isinstance(back[key], torch.Tensor) and back[key].dtype == t.dtype, key
        assert torch.equal(back[key], t), key


def test_missing_manual_files_and_bad_options(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("")
    with pytest.raises(FileNotFoundError, match=r"youcook2/resnet: no split found; looked for val: .*youcook_val\.pkl"):
        prepare("youcook2", tmp_path / "d", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="HowTo100M_1166_videopaths.txt: video list not found"):
        prepare("howto100m", tmp_path / "d", tmp_path / "m")
    with pytest.raises(ValueError, match=r"unknown path option\(s\) \['annot_path'\]"):
        prepare("howto100m", tmp_path / "d", tmp_path / "m", paths={"annot_path": "x"})
    with pytest.raises(ValueError, match="unknown dataset 'kinetics'"):
        prepare("kinetics", tmp_path / "d", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="--word2vec: .*nope.bin: file not found"):
        prepare("msrvtt", tmp_path / "d", tmp_path / "m", word2vec=tmp_path / "nope.bin")


def test_cli_prints_summary_and_fails_cleanly(tmp_path):
    import subprocess

    write_howto(tmp_path / "m", n_videos=2)
    cmd = [sys.executable, "-m", "eao_jax.prepare", "--dataset=howto100m", f"--manual_dir={tmp_path / 'm'}",
           f"--data_dir={tmp_path / 'd'}", "--config=resnet_fp32", "--feature_dims=6,5"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "howto100m: prepared at" in out.stdout and "train: 2 items written, 0 skipped" in out.stdout
    out = subprocess.run(cmd[:-1] + ["--feature_dims=8,5", "--config=resnet"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines()[-1].startswith(
        "prepare: howto100m/train: wrong feature dimension")
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------
# Checked before the pass over the items: the manual directory and the word2vec file.


def test_missing_or_empty_manual_dir_names_it_and_the_files_it_needs(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^msrvtt: --manual_dir .*absent does not exist; it should hold "
                                                r"the released files: msrvtt_jsfusion_test\.pkl, "):
        prepare("msrvtt", tmp_path / "d", tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^howto100m: --manual_dir .*empty is empty; it should hold the "
                                                r"released files: HowTo100M_1166_videopaths\.txt, caption\.pickle"):
        prepare("howto100m", tmp_path / "d", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match=r"^crosstask: --manual_dir is required .*videos\.csv, steps\.json"):
        prepare("crosstask", tmp_path / "d")
    # Empty lists name their file.
    write_pickle(tmp_path / "m" / "msrvtt_jsfusion_test.pkl", [])
    with pytest.raises(PrepareError, match=r"m/msrvtt_jsfusion_test\.pkl: the item list is empty"):
        prepare("msrvtt", tmp_path / "d", tmp_path / "m")
    write_localization(tmp_path / "l", n_videos=1)
    (tmp_path / "l" / "videos.csv").write_text("video_id,task\n")
    with pytest.raises(PrepareError, match=r"l/videos\.csv: the video list is empty"):
        prepare("crosstask", tmp_path / "d", tmp_path / "l")
    assert not [p for p in (tmp_path / "d").rglob("*") if p.is_dir() and p.name[0].isdigit()]  # nothing prepared


def test_cli_empty_manual_dir_is_one_line(tmp_path):
    import subprocess

    (tmp_path / "empty").mkdir()
    out = subprocess.run([sys.executable, "-m", "eao_jax.prepare", "--dataset=youcook2", "--data_dir=d",
                          f"--manual_dir={tmp_path / 'empty'}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr and "AssertionError" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        f"prepare: youcook2: --manual_dir {tmp_path / 'empty'} is empty; it should hold the released files: "
        "youcook_val.pkl, youcook_train.pkl (any of these splits; in resnet/ or directly)"]


def _text_word2vec(path, dim=7):
    rows = [w + "".join(f" {v:.4f}" for v in np.linspace(-1, 1, dim)) for w in ("cut", "the", "onion")]
    path.write_text(f"3 {dim}\n" + "\n".join(rows) + "\n")


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-10]), r"truncated at word 11 of 12"),
    (lambda p: p.write_bytes(b""), "empty file"),
    (lambda p: p.write_bytes(b"GoogleNews\n" + p.read_bytes()), r"not a word2vec binary file \(the first line"),
    (_text_word2vec, "this is the text word2vec format; give the binary one"),
])
def test_bad_word2vec_is_refused_before_any_video_is_read(tmp_path, monkeypatch, damage, message):
    from tfds_builders.howto100m import shards as hb

    _howto(tmp_path)
    w2v, _ = word2vec_fixture(tmp_path)
    damage(w2v)
    real, reads = hb.load_video, []
    monkeypatch.setattr(hb, "load_video", lambda *a, **k: reads.append(a[1]) or real(*a, **k))
    with pytest.raises(PrepareError, match=rf"^--word2vec .*w2v\.bin: {message}"):
        _prep_howto(tmp_path, word2vec=w2v)
    assert reads == [] and _no_dataset_left(tmp_path)
    # Adding the table to an existing dataset checks the file the same way.
    s = _prep_howto(tmp_path)
    with pytest.raises(PrepareError, match=rf"^--word2vec .*w2v\.bin: {message}"):
        _prep_howto(tmp_path, word2vec=w2v)
    assert not os.path.exists(os.path.join(s["path"], "word_vectors.npz"))


# ---------------------------------------------------------------------------------------------------
# Captions that give the model no text: only punctuation, or (given word2vec) no word it knows.


def test_item_captions_without_usable_words(tmp_path):
    w2v, _ = word2vec_fixture(tmp_path)
    items = item_list(5)
    for it in items:
        it["caption"], it["eval_caption"] = ["cut the onion", "stir"], "add salt"
    items[1]["eval_caption"] = "?! ..."
    items[3]["eval_caption"] = "OOV zzz"  # words, but none in the word2vec file
    items[4]["caption"] = ["cut the onion", "-- !", "zzz OOV", "add salt"]
    write_pickle(tmp_path / "m" / "msrvtt_jsfusion_test.pkl", items)
    with pytest.raises(PrepareError, match=r"msrvtt/test: caption without words: item 'clip1', file .*msrvtt_jsfusion"
                                           r"_test\.pkl: eval_caption '\?! \.\.\.' has no word \(only punctuation"):
        prepare("msrvtt", tmp_path / "d", tmp_path / "m", word2vec=w2v, feature_dims=(6, 5))
    s = prepare("msrvtt", tmp_path / "d", tmp_path / "m", word2vec=w2v, feature_dims=(6, 5), skip_bad=True)
    assert s["written"] == {"test": 3}
    assert s["skipped"] == {"test": {"caption without words": 1, "caption without known words": 1}}
    report = json.loads(open(s["report"]).read())
    assert {it["item"]: it["detail"] for it in report["skipped_items"]} == {
        "clip1": "eval_caption '?! ...' has no word (only punctuation or symbols)",
        "clip3": "eval_caption 'OOV zzz' has no word in the word2vec vocabulary (w2v.bin)"}
    assert "test: 2 training captions without a usable word (only punctuation, or no word2vec word) dropped " \
           "from their items" in s["notes"]
    src = PreparedDataset(s["path"]).source("test")
    by_id = {src[i]["id"]: src[i] for i in range(len(src))}
    assert list(by_id["clip4"]["captions"]) == ["cut the onion", "add salt"]
    assert list(by_id["clip0"]["captions"]) == ["cut the onion", "stir"]
    # Without word2vec the vocabulary is unknown: only the punctuation rule applies.
    s = prepare("msrvtt", tmp_path / "d2", tmp_path / "m", feature_dims=(6, 5), skip_bad=True)
    assert s["written"] == {"test": 4} and s["skipped"] == {"test": {"caption without words": 1}}


def test_step_text_without_words_is_refused(tmp_path):
    write_localization(tmp_path / "m", n_videos=2)
    steps = json.loads((tmp_path / "m" / "steps.json").read_text())
    steps["t2"][1] = "!!"
    (tmp_path / "m" / "steps.json").write_text(json.dumps(steps))
    with pytest.raises(PrepareError, match=r"crosstask/test: caption without words: item 'v1', file .*steps\.json: "
                                           r"step '!!' has no word"):
        prepare("crosstask", tmp_path / "d", tmp_path / "m", feature_dims=(6, 5))


def test_howto_video_without_usable_caption_words(tmp_path):
    videos, ids = _howto(tmp_path, n=3)
    caps = load_pickle(tmp_path / "m" / "caption.pickle")
    n0 = len(caps[ids[0]]["text"])
    caps[ids[0]]["text"] = ["cut the onion"] * (n0 - 1) + ["zzz OOV ..."]  # one unusable segment: kept
    caps[ids[1]]["text"] = ["..."] * len(caps[ids[1]]["text"])
    caps[ids[2]]["text"] = ["OOV, zzz!"] * len(caps[ids[2]]["text"])
    write_pickle(tmp_path / "m" / "caption.pickle", caps)
    w2v, _ = word2vec_fixture(tmp_path)
    with pytest.raises(PrepareError, match=rf"howto100m/train: caption without words: item '{ids[1]}', file .*caption"
                                           rf"\.pickle: none of its {len(caps[ids[1]]['text'])} caption segments has "
                                           r"a usable word \(e\.g\. caption segment '\.\.\.' has no word"):
        _prep_howto(tmp_path, word2vec=w2v)
    assert _no_dataset_left(tmp_path)
    s = _prep_howto(tmp_path, word2vec=w2v, skip_bad=True)
    assert s["written"] == {"train": 1}
    assert s["skipped"] == {"train": {"caption without words": 1, "caption without known words": 1}}
    assert f"1 of {n0} caption segments have no usable word (only punctuation, or no word2vec word): kept, their " \
           "clips have no text" in s["notes"]
    store = HowToStore(PreparedDataset(s["path"]), "train")
    assert [store.whole(i)["id"] for i in range(len(store))] == [ids[0]]


# ---------------------------------------------------------------------------------------------------
# A killed prepare (SIGKILL: no cleanup runs) and the next one.


# The automatic synthetic prepare of training and evaluation is this builder call.
_AUTO_PREPARE = """
import os, signal, sys
import tensorflow_datasets as tfds
from tfds_builders import writer
from tfds_builders.synthetic import Synthetic
real, n = writer.ShardWriter.write, [0]
def dying(self, example):
    n[0] += 1
    if n[0] == int(sys.argv[2]):  # killed mid-split, as by the OOM killer or kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, example)
writer.ShardWriter.write = dying
b = Synthetic(data_dir=sys.argv[1], config="tiny", file_format="array_record")
b.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
print(b.data_path, b.removed_leftovers)
"""


def test_killed_automatic_synthetic_prepare_leaves_nothing_for_the_next(tmp_path):
    import subprocess

    def run(kill_at):
        return subprocess.run([sys.executable, "-c", _AUTO_PREPARE, str(tmp_path / "d"), str(kill_at)],
                              capture_output=True, text=True, timeout=120)

    out = run(5)
    assert out.returncode == -9, out.stderr[-2000:]
    root = tmp_path / "d" / "synthetic" / "tiny"
    left = [d for d in os.listdir(root) if d.startswith("incomplete.")]
    assert len(left) == 1  # what the kill left behind
    out = run(-1)
    assert out.returncode == 0, out.stderr[-2000:]
    path, removed = out.stdout.strip().splitlines()[-1].split(" ", 1)
    assert removed == str(left)
    assert sorted(d for d in os.listdir(root) if not d.startswith(".")) == ["1.0.0"]
    assert PreparedDataset(path).num_examples("train") > 0


def test_wrong_dimension_names_the_way_out_for_item_datasets(tmp_path):
    write_pickle(tmp_path / "m" / "msrvtt_jsfusion_test.pkl", item_list(3))  # 2D features are 6-d
    with pytest.raises(PrepareError, match=r"wrong feature dimension: item 'clip0'.*2D features has dimension 6, "
                                           r"expected 7; .*--config \(resnet, s3d, clip\).*--feature_dims=D2,D3"):
        prepare("msrvtt", tmp_path / "d", tmp_path / "m", feature_dims=(7, 5))


PANDAS_CAPTIONS = {"vidA": {"start": [0.5, 2.25, 7.1], "end": [2.0, 4.0, 9.95], "text": ["cut the onion", "stir",
                                                                                         "añade sal"]},
                   "vidB": {"start": [1.0], "end": [3.5], "text": ["heat oil"]}}


@pytest.mark.parametrize("version", ["1.5.3", "2.2.3"])
def test_pandas_data_frames_read_as_dicts_of_columns_without_pandas(data_dir, version, monkeypatch):
    """caption.pickle may hold each video's captions as a pandas DataFrame: files pickled by pandas
    itself (tests/data/pandas_captions) read as dicts of their columns, pandas not imported."""
    monkeypatch.setitem(sys.modules, "pandas", None)
    caps = load_pickle(data_dir / "pandas_captions" / f"caption-pandas-{version}.pickle")
    assert list(caps) == list(PANDAS_CAPTIONS)
    for vid, want in PANDAS_CAPTIONS.items():
        assert list(caps[vid]) == ["start", "end", "text"]
        for k, v in want.items():
            assert caps[vid][k].tolist() == v and caps[vid][k].dtype == (object if k == "text" else np.float64)


def test_howto_captions_as_pandas_0_2x_data_frames(tmp_path):
    """The pandas 0.2x layout (a BlockManager's state, not a call) through a whole prepare."""
    from fixtures_data import pandas_frame

    videos, ids = _howto(tmp_path, n=2)
    frames = {vid: pandas_frame({k: list(v["caption"][k]) for k in ("start", "end", "text")})
              for vid, v in videos.items()}
    write_pickle(tmp_path / "m" / "caption.pickle", frames)
    s = _prep_howto(tmp_path)
    assert s["written"] == {"train": 2}
    store = HowToStore(PreparedDataset(s["path"]), "train")
    for i, vid in enumerate(ids):
        r = store.whole(i)
        assert r["id"] == vid and r["caption_text"] == videos[vid]["caption"]["text"]
        np.testing.assert_array_equal(r["caption_start"], videos[vid]["caption"]["start"])
        np.testing.assert_array_equal(r["caption_end"], videos[vid]["caption"]["end"])
