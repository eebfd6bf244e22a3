"""The whole evaluation path on a fixture in the released YouCook2 layout: prepare the pickle with the
word2vec file, convert the released-format checkpoint, evaluate "at once" (72 video tokens, 4608 STFT
frames, 20 words) and reproduce the original's 18 retrieval directions (tests/data/youcook_e2e)."""

import json
import shutil

import pytest

from eao_jax import checkpoint, convert, evaluators, prepare
from eao_jax.evaluation.retrieval import DIRECTIONS


def test_youcook2_at_once_reproduces_the_original(data_dir, tmp_path):
    fixture = data_dir / "youcook_e2e"
    expected = json.loads((fixture / "youcook_e2e_expected.json").read_text())

    # The released layout: the ResNet pickle in the manual directory; features here are 12 + 12 wide.
    manual = tmp_path / "manual"
    manual.mkdir()
    shutil.copy(fixture / "youcook_val.pkl", manual / "youcook_val.pkl")
    summary = prepare.prepare("youcook2", tmp_path / "tfds", manual, word2vec=fixture / "word2vec_tiny.bin",
                              feature_dims=(12, 12))
    assert summary["written"]["val"] == expected["evaluated"] == 46  # 4 clips lack 2d_full

    convert.convert(str(fixture / "youcook_e2e_checkpoint.pth"), str(tmp_path / "ckpt"))
    model, _, step = checkpoint.load_model(tmp_path / "ckpt")

    out = tmp_path / "results" / "youcook2.json"
    res = evaluators.evaluate(model, "youcook2", data_dir=tmp_path / "tfds", strategy="at_once", batch_size=16,
                              output=out, checkpoint=str(tmp_path / "ckpt"), step=step)
    assert (res["settings"]["n_video_tokens"], res["settings"]["n_stft"]) == (
        expected["n_video_tokens"], expected["num_audio_STFT_frames"])
    assert res["num_queries"] == expected["evaluated"]
    assert res["complete_dataset_size"] == expected["complete_dataset_size"] == 50  # missing clips = misses
    assert json.loads(out.read_text()) == res and out.with_suffix(".png").exists()

    assert set(expected["metrics"]) == set(DIRECTIONS) == set(res["metrics"])
    for direction, want in expected["metrics"].items():
        got = res["metrics"][direction]
        for k in ("R1", "R5", "R10", "R50"):  # one clip of 50 = 2 points
            assert got[k] == pytest.approx(want[k], abs=2.0 + 1e-9), (direction, k, got[k], want[k])
        assert got["MedR"] == pytest.approx(want["MedR"], abs=1.0), (direction, got["MedR"], want["MedR"])
