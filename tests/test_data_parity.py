"""Parity of the deterministic data construction with the reference fixtures from the original code."""

import numpy as np
import pytest

from eao_jax.data import audio as audio_lib
from eao_jax.data import video as video_lib
from eao_jax.data.howto import clip_from_segment

CLIP_KEYS = ("text", "text_mask", "audio", "audio_mask", "video", "video_mask")


@pytest.fixture(scope="module")
def howto(data_dir):
    return np.load(data_dir / "howto_clip_construction.npz", allow_pickle=True)


@pytest.mark.parametrize("mode", ["aligned", "mis"])
def test_clip_from_segment_matches_reference(howto, mode):
    d = howto
    caption = {k: d[f"caption/{k}"] for k in ("start", "end", "text")}
    n_segments = len(caption["start"])
    assert n_segments == 12
    for ind in range(n_segments):
        out = clip_from_segment(caption, d["mel_spec"], d["features_2d"], d["features_3d"], ind,
                                word_vectors=d["word_vectors"], vocab=list(d["vocab"]),
                                misaligned=(mode == "mis"), min_time=8.0, max_words=20, n_stft=768,
                                n_video_tokens=12)
        p = f"clip{ind}_{mode}/"
        assert out["start"] == pytest.approx(float(d[p + "start"]), abs=1e-12), ind
        assert out["end"] == pytest.approx(float(d[p + "end"]), abs=1e-12), ind
        assert out["raw_text"] == str(d[p + "raw_text"]), ind
        assert out["nframes"] == int(d[p + "nframes"]), ind
        for k in CLIP_KEYS:
            assert out[k].shape == d[p + k].shape, (ind, k)
            assert out[k].dtype == np.float32, (ind, k)
            np.testing.assert_allclose(out[k], d[p + k], atol=1e-6, rtol=0, err_msg=f"segment {ind} {k}")


def test_misalignment_changes_only_audio(howto):
    d = howto
    caption = {k: d[f"caption/{k}"] for k in ("start", "end", "text")}
    differs = 0
    for ind in range(12):
        a = {m: clip_from_segment(caption, d["mel_spec"], d["features_2d"], d["features_3d"], ind,
                                  word_vectors=d["word_vectors"], vocab=list(d["vocab"]), misaligned=m)
             for m in (False, True)}
        for k in ("text", "video", "start", "end"):
            np.testing.assert_array_equal(a[False][k], a[True][k])
        differs += not np.array_equal(a[False]["audio"], a[True]["audio"])
    assert differs == 12  # the +4 s shift moves every clip's audio


def test_out_of_vocabulary_words_dropped_before_truncation(howto):
    d = howto
    # segment 8's text contains "OOV"; its grown span has > 20 tokens with OOV words among them
    caption = {k: d[f"caption/{k}"] for k in ("start", "end", "text")}
    vocab = list(d["vocab"])
    for ind in range(12):
        out = clip_from_segment(caption, d["mel_spec"], d["features_2d"], d["features_3d"], ind,
                                word_vectors=d["word_vectors"], vocab=vocab, misaligned=False)
        in_vocab = [w for w in out["raw_text"].split() if w in vocab][:20]
        expect = np.stack([d["word_vectors"][vocab.index(w)] for w in in_vocab])
        np.testing.assert_array_equal(out["text"][: len(in_vocab)], expect)
        assert out["text_mask"].sum() == len(in_vocab)
        assert not out["text"][len(in_vocab):].any()


@pytest.mark.parametrize("strategy", video_lib.STRATEGIES)
def test_video_tokens_match_reference(data_dir, strategy):
    m = np.load(data_dir / "metrics_and_video_tokens.npz")
    n_videos = len({k.split("/")[0] for k in m.files if k.startswith("video")})
    assert n_videos == 4
    for i in range(n_videos):
        video, mask = video_lib.video_tokens(m[f"video{i}/feat_2d"], m[f"video{i}/feat_3d"],
                                             int(m[f"video{i}/n_tokens"]), strategy)
        np.testing.assert_allclose(video, m[f"video{i}/{strategy}/video"], atol=1e-6, rtol=0, err_msg=f"video{i}")
        np.testing.assert_array_equal(mask, m[f"video{i}/{strategy}/mask"])


def test_nearest_indices_match_torch_legacy_nearest():
    torch = pytest.importorskip("torch")
    for n_in, n_out in [(7, 12), (10, 15), (33, 12), (50, 16), (40, 48), (24, 12), (12, 24), (5, 5), (97, 72),
                        (3, 100), (100, 3), (61, 49)]:
        x = torch.arange(n_in, dtype=torch.float32).view(1, 1, n_in)
        ref = torch.nn.functional.interpolate(x, size=n_out, mode="nearest").view(-1).long().numpy()
        np.testing.assert_array_equal(video_lib.nearest_indices(n_in, n_out), ref, err_msg=f"{n_in}->{n_out}")


def test_single_backbone_tokens():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((30, 4)).astype(np.float32)
    v, m = video_lib.video_tokens(None, f, 12, "clip")
    assert v.shape == (12, 4) and m.sum() == 12
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(v[3], f[3] / np.linalg.norm(f[3]), atol=1e-6)
    v, m = video_lib.video_tokens(f[:5], None, 12, "nearest")  # short: falls back to clip
    assert m.sum() == 5 and not v[5:].any()
    v, m = video_lib.video_tokens(f, None, 12, "max_pool")  # k = 2: pooled pairs, then nearest 15 -> 12
    pooled = f.reshape(15, 2, 4).max(1)
    np.testing.assert_allclose(v, pooled[video_lib.nearest_indices(15, 12)]
                               / np.linalg.norm(pooled[video_lib.nearest_indices(15, 12)], axis=1, keepdims=True),
                               atol=1e-6)


def test_empty_slice_gives_empty_video():
    v, m = video_lib.video_tokens(np.zeros((0, 3), np.float32), np.ones((4, 2), np.float32), 12, "clip")
    assert v.shape == (12, 5) and not v.any() and not m.any()


def test_time_frame_mapping():
    # librosa.time_to_frames(t, sr=16000, hop_length=160, n_fft=400) = (int(16000 t) - 200) // 160
    assert audio_lib.time_to_frame(1.0) == 98
    assert audio_lib.time_to_frame(8.0) == 798
    assert audio_lib.time_to_frame(0.0) == -2
    assert audio_lib.time_to_frame(0.0126) == 0
    assert audio_lib.frame_to_time(98) == pytest.approx(0.9925)
    for t in np.linspace(0, 50, 137):
        assert audio_lib.time_to_frame(t) == (int(t * 16000) - 200) // 160


def test_cut_into_clips_seventy_percent_rule():
    nv, ta, n = 12, 768, 4
    video = np.arange(n * nv * 3, dtype=np.float32).reshape(n * nv, 3)
    vmask = np.ones(n * nv, np.float32)
    audio = np.arange(40 * n * ta, dtype=np.float32).reshape(40, n * ta)
    for nframes, keep, nfr in [
        (768 * 2 + 538, [1, 1, 1, 0], [768, 768, 538, 768]),  # 538 > 0.7 * 768 = 537.6
        (768 * 2 + 537, [1, 1, 0, 0], [768, 768, 768, 768]),
        (100, [1, 0, 0, 0], [100, 768, 768, 768]),  # the first clip is always kept
    ]:
        amask = (np.arange(n * ta) < nframes).astype(np.float32)
        c = audio_lib.cut_into_clips(video, vmask, audio, amask, nframes, n)
        np.testing.assert_array_equal(c["keep"], np.asarray(keep, bool))
        np.testing.assert_array_equal(c["audio_STFT_nframes"], nfr)
        assert c["video"].shape == (n, nv, 3) and c["audio"].shape == (n, 40, ta)
        np.testing.assert_array_equal(c["audio"][2], audio[:, 2 * ta:3 * ta])
        np.testing.assert_array_equal(c["video"][1], video[nv:2 * nv])
