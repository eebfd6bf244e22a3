"""CrossTask from the official release layout (tasks_primary.txt, videos.csv, annotations/*.csv):
the same records and the same evaluation numbers as the preprocessed layout of the same videos, and a
partial CrossTask (2 of the 18 primary tasks) evaluated over the tasks present with a warning."""

import logging

import numpy as np
import pytest
from fixtures_data import step_segments, word2vec_fixture, write_crosstask_official, write_localization
from test_evaluate import random_model, synthetic_model_config

from eao_jax import evaluators
from eao_jax.data import pipelines
from eao_jax.evaluation import localisation as loc_lib
from eao_jax.prepare import prepare
from tfds_builders import localization
from tfds_builders.validate import PrepareError

TASKS = loc_lib.CROSSTASK_PRIMARY_TASKS[:2]  # a partial CrossTask: 2 of the 18 primary tasks


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crosstask")
    videos = write_localization(tmp / "pre", n_videos=6, tasks=TASKS, seed=1)
    write_crosstask_official(tmp / "pre", tmp / "off")
    w2v, _ = word2vec_fixture(tmp)
    summaries = {name: prepare("crosstask", tmp / f"d_{name}", tmp / name, word2vec=w2v, feature_dims=(6, 5))
                 for name in ("pre", "off")}
    return tmp, videos, summaries


def test_official_release_files_parse(tmp_path):
    (tmp_path / "tasks.txt").write_text("16815\nJack Up a Car\nhttp://x\n3\nbrake on,raise jack,lower jack\n\n"
                                        "23521\nMake Jello Shots\nhttp://y\n2\npour water,stir mixture\n")
    assert localization.read_task_steps(tmp_path / "tasks.txt") == {
        "16815": ["brake on", "raise jack", "lower jack"], "23521": ["pour water", "stir mixture"]}
    (tmp_path / "bad.txt").write_text("16815\nJack Up a Car\nhttp://x\n4\nbrake on,raise jack,lower jack\n")
    with pytest.raises(ValueError, match="declares 4 steps but lists 3"):
        localization.read_task_steps(tmp_path / "bad.txt")
    (tmp_path / "videos.csv").write_text("16815,abc,https://u\n\n23521,def,https://v\n16815,abc,https://u\n")
    assert localization.read_video_list(tmp_path / "videos.csv") == [("abc", "16815"), ("def", "23521")]
    # 1-based steps; second 1.5 .. 3.2 covers rows 1, 2, 3; an end past T is cut at T
    (tmp_path / "a.csv").write_text("2,1.5,3.2\n1,0.0,1.0\n3,4.6,9.0\n")
    y = localization.read_step_segments(tmp_path / "a.csv", "vid", 6, 3)
    np.testing.assert_array_equal(y, [[1, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    for text, why in (("4,1,2\n", "step 4 is outside 1..3"), ("1,2\n", "expected 'step,start,end'"),
                      ("1,3,2\n", "not 0 <= start <= end")):
        (tmp_path / "b.csv").write_text(text)
        with pytest.raises(ValueError, match=why):
            localization.read_step_segments(tmp_path / "b.csv", "vid", 6, 3)
    ann = np.zeros((8, 2), np.uint8)
    ann[2:4, 0] = ann[5:6, 1] = 1
    assert step_segments(ann) == [(1, 2.25, 3.5), (2, 5.25, 5.5)]


def test_official_layout_prepares_the_same_records(layouts):
    tmp, videos, summaries = layouts
    assert summaries["pre"]["written"] == summaries["off"]["written"] == {"test": 6}
    notes = " | ".join(summaries["off"]["notes"])
    assert "official CrossTask layout" in notes
    assert "left out 1 videos of tasks not in tasks_primary.txt" in notes
    assert "left out 1 primary-task videos without an annotation file" in notes and "unannotated" in notes
    assert "2 of the 18 CrossTask primary tasks" in notes
    pre = pipelines.load_localization("crosstask", tmp / "d_pre", "test")
    off = pipelines.load_localization("crosstask", tmp / "d_off", "test")
    assert len(off) == 6 and off.complete_dataset_size == 6
    for a, b in zip(pre, off, strict=True):
        assert (a["id"], a["task"], a["steps"]) == (b["id"], b["task"], b["steps"])
        np.testing.assert_array_equal(b["annotation"], videos[b["id"]]["annotation"])
        for key in ("annotation", "video", "video_mask", "audio", "audio_mask", "audio_STFT_nframes", "text",
                    "text_mask"):
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert [v["task"] for v in off] == [TASKS[0], TASKS[1]] * 3


# Recall per task of the random model below on the fixture: task 0 has 3 videos of 3 steps, task 1 3 videos of
# 2 steps, so every value is a count of hit steps (e.g. pooled 11.1 = 1 of 9 steps, 16.7 = 1 of 6).
EXPECTED = {
    ("per_video", None, "dp"): (200 / 9, 0.0),
    ("pooled", True, "dp"): (100 / 9, 100 / 6),  # Zhukov's protocol
    ("per_video", None, "argmax_frame"): (100 / 3, 200 / 3),
}


@pytest.mark.parametrize("convention,log_softmax,decoder", list(EXPECTED))
def test_official_layout_evaluates_to_the_same_numbers(layouts, caplog, convention, log_softmax, decoder):
    tmp, _, _ = layouts
    model = random_model(synthetic_model_config(video_dim=11, text_dim=7))
    res = {}
    for name in ("pre", "off"):
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            res[name] = evaluators.evaluate(model, "crosstask", data_dir=tmp / f"d_{name}", tfds_config="resnet",
                                            convention=convention, log_softmax=log_softmax, decoder=decoder,
                                            batch_size=16)
        assert "partial CrossTask: 2 of 18 primary tasks present" in caplog.text
    pre, off = res["pre"], res["off"]
    assert off["metrics"] == pre["metrics"] and off["num_videos"] == pre["num_videos"] == 6
    assert off["settings"]["convention"] == convention and off["settings"]["log_softmax"] is bool(log_softmax)
    # the mean is over the 2 primary tasks present, the other 16 are named
    assert off["averaged_over"] == list(TASKS) and off["missing_tasks"] == list(loc_lib.CROSSTASK_PRIMARY_TASKS[2:])
    expected = EXPECTED[(convention, log_softmax, decoder)]
    assert off["metrics"]["per_task"] == {t: pytest.approx(r, abs=1e-9) for t, r in zip(TASKS, expected, strict=True)}
    assert off["metrics"]["recall"] == pytest.approx(sum(expected) / 2, abs=1e-9)
    table = evaluators.format_results(off)
    assert table.splitlines()[-1] == "(mean over the 2 of 18 tasks present; no video for 16)"


def test_official_layout_bad_annotation_is_named(tmp_path):
    write_localization(tmp_path / "pre", n_videos=2, tasks=TASKS)
    write_crosstask_official(tmp_path / "pre", tmp_path / "off")
    bad = tmp_path / "off" / "crosstask_release" / "annotations" / f"{TASKS[1]}_v1.csv"
    bad.write_text("3,1.0,2.0\n")  # task 1 has 2 steps
    with pytest.raises(PrepareError, match=r"v1.*step 3 is outside 1\.\.2"):
        prepare("crosstask", tmp_path / "d", tmp_path / "off", feature_dims=(6, 5))
    s = prepare("crosstask", tmp_path / "d2", tmp_path / "off", feature_dims=(6, 5), skip_bad=True)
    assert s["written"] == {"test": 1} and s["skipped"] == {"test": {"bad annotation": 1}}
