"""Step localisation: ordered exactly-one DP, argmax decoders, log-softmax option, recall conventions."""

import itertools
import logging

import numpy as np
import pytest

from eao_jax.evaluation import localisation as loc


def _brute_force_best(scores: np.ndarray) -> float:
    t, k = scores.shape
    return max(sum(scores[ts[j], j] for j in range(k)) for ts in itertools.combinations(range(t), k))


def test_dp_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(60):
        k = int(rng.integers(1, 5))
        t = int(rng.integers(k, 9))
        scores = rng.normal(size=(t, k))
        times = loc.ordered_step_times(scores)
        assert times.shape == (k,)
        assert np.all(np.diff(times) > 0) and times[0] >= 0 and times[-1] < t
        assert scores[times, np.arange(k)].sum() == pytest.approx(_brute_force_best(scores))


def test_dp_respects_order_where_argmax_does_not():
    # step 0 peaks at t=4, step 1 at t=1: per-step argmax is out of order.
    scores = np.array(
        [
            [0.1, 0.2],
            [0.2, 0.8],
            [0.3, 0.1],
            [0.1, 0.5],
            [0.9, 0.3],
        ]
    )
    y_arg = loc.predict_steps(scores, "argmax_step")
    assert list(np.argmax(y_arg, axis=0)) == [4, 1]
    # Ordered pairs (t0 < t1): (0,1) = 0.1 + 0.8 = 0.9 beats (2,3) = 0.8, (1,3) = 0.7, (3,4) = 0.4, ...
    np.testing.assert_array_equal(loc.ordered_step_times(scores), [0, 1])
    y = loc.predict_steps(scores, "dp")
    assert y.shape == (5, 2) and y.dtype == np.int8
    np.testing.assert_array_equal(y.sum(axis=0), [1, 1])  # exactly one window per step
    assert y.sum() == 2


def test_dp_exactly_one_and_tight_case():
    scores = np.random.default_rng(1).normal(size=(4, 4))
    np.testing.assert_array_equal(loc.ordered_step_times(scores), [0, 1, 2, 3])  # T == K forces diagonal
    # Step 1 wants the same window as step 0: exactly-one gives them different, increasing windows.
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    times = loc.ordered_step_times(scores)
    assert len(set(times.tolist())) == 3 and np.all(np.diff(times) > 0)
    assert scores[times, np.arange(3)].sum() == pytest.approx(2.0)


def test_dp_needs_enough_windows():
    with pytest.raises(ValueError, match=r"T=2 < K=3"):
        loc.ordered_step_times(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="NaN"):
        loc.predict_steps(np.array([[np.nan, 0.0]]))
    with pytest.raises(ValueError, match="unknown decoder"):
        loc.predict_steps(np.zeros((3, 2)), "viterbi")


def test_dp_long_video_is_fast_and_valid():
    rng = np.random.default_rng(2)
    scores = rng.normal(size=(3000, 20))
    times = loc.ordered_step_times(scores)
    assert np.all(np.diff(times) > 0)
    # local optimality: moving any one step within its free gap cannot improve the total
    bounds = np.concatenate(([-1], times, [3000]))
    for k in range(20):
        gap = scores[bounds[k] + 1 : bounds[k + 2], k]
        assert scores[times[k], k] == pytest.approx(gap.max())


def test_log_softmax_option_changes_the_decision():
    # Row 2 is high for every step; after the row log-softmax it is nearly uniform and loses to row 1.
    scores = np.array([[1.0, 0.0], [0.0, 0.3], [0.9, 1.0]])
    np.testing.assert_array_equal(loc.ordered_step_times(scores), [0, 2])  # 1.0 + 1.0
    lsm = loc.log_softmax_rows(scores)
    np.testing.assert_allclose(np.exp(lsm).sum(axis=1), 1.0)
    np.testing.assert_allclose(lsm[0], [-np.log1p(np.exp(-1.0)), -1.0 - np.log1p(np.exp(-1.0))])
    y = loc.predict_steps(scores, "dp", log_softmax=True)
    np.testing.assert_array_equal(np.argmax(y, axis=0), [0, 1])


def test_argmax_frame_decoder():
    scores = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.4]])
    y = loc.predict_steps(scores, "argmax_frame")
    np.testing.assert_array_equal(y, [[0, 1], [1, 0], [0, 1]])


def test_step_hits_and_video_recall():
    y_true = np.zeros((6, 3), dtype=np.int8)
    y_true[1:3, 0] = 1  # step 0 annotated at seconds 1-2
    y_true[4:6, 2] = 1  # step 2 at 4-5; step 1 never annotated
    y_pred = np.zeros_like(y_true)
    y_pred[2, 0] = 1  # inside step 0's segment -> hit
    y_pred[3, 1] = 1  # step 1 has no annotation: not counted
    y_pred[1, 2] = 1  # step 2 predicted inside step 0's segment -> miss
    assert loc.step_hits(y_true, y_pred) == (1, 2)
    assert loc.video_recall(y_true, y_pred) == 0.5
    with pytest.raises(ValueError, match="no annotated step"):
        loc.video_recall(np.zeros((4, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"\(T, K\)"):
        loc.step_hits(np.zeros((4, 2)), np.zeros((4, 3)))


def _results():
    r = loc.VideoResult
    return [
        r("v1", "A", 1, 1),  # 100 %
        r("v2", "A", 1, 4),  # 25 %
        r("v3", "B", 2, 3),  # 66.7 %
    ]


def test_crosstask_per_video_and_pooled_conventions():
    per_video = loc.crosstask_recall(_results(), "per_video", tasks=["A", "B"])
    assert per_video["per_task"] == {"A": pytest.approx(62.5), "B": pytest.approx(200 / 3)}
    assert per_video["recall"] == pytest.approx((62.5 + 200 / 3) / 2)
    assert per_video["num_videos"] == {"A": 2, "B": 1}
    pooled = loc.crosstask_recall(_results(), "pooled", tasks=["A", "B"])
    assert pooled["per_task"]["A"] == pytest.approx(100 * 2 / 5)
    assert pooled["recall"] == pytest.approx((40.0 + 200 / 3) / 2)
    # the mean covers only the selected tasks; other tasks are still reported
    only_a = loc.crosstask_recall(_results(), tasks=["A"])
    assert only_a["recall"] == pytest.approx(62.5) and "B" in only_a["per_task"]
    assert loc.crosstask_recall(_results(), tasks=None)["recall"] == per_video["recall"]
    with pytest.raises(ValueError, match="16815"):
        loc.crosstask_recall(_results())  # default: the 18 primary tasks, absent here
    with pytest.raises(ValueError, match="convention"):
        loc.crosstask_recall(_results(), "median", tasks=None)


def test_partial_crosstask_averages_over_the_primary_tasks_present(caplog):
    r = loc.VideoResult
    primary = loc.CROSSTASK_PRIMARY_TASKS
    results = [r("a", primary[0], 1, 2), r("b", primary[0], 2, 2), r("c", primary[5], 1, 3), r("d", "99999", 0, 1)]
    with caplog.at_level(logging.WARNING):
        out = loc.crosstask_recall(results)
    assert out["per_task"] == {primary[0]: 75.0, primary[5]: pytest.approx(100 / 3), "99999": 0.0}
    assert out["recall"] == pytest.approx((75.0 + 100 / 3) / 2)  # the related task 99999 is not averaged
    assert out["averaged_over"] == [primary[0], primary[5]]
    assert out["missing_tasks"] == [t for i, t in enumerate(primary) if i not in (0, 5)]
    assert "partial CrossTask: 2 of 18 primary tasks present" in caplog.text
    full = loc.crosstask_recall(_results(), tasks=["A", "B"])  # every selected task present: no warning
    assert "missing_tasks" not in full and full["averaged_over"] == ["A", "B"]
    with pytest.raises(ValueError, match="any of the 18 CrossTask task"):
        loc.crosstask_recall([r("d", "99999", 0, 1)])


def test_primary_tasks_constant():
    assert len(loc.CROSSTASK_PRIMARY_TASKS) == 18 == len(set(loc.CROSSTASK_PRIMARY_TASKS))
    assert "16815" in loc.CROSSTASK_PRIMARY_TASKS and "113766" in loc.CROSSTASK_PRIMARY_TASKS


def test_mining_youtube_mean_over_videos():
    out = loc.mining_youtube_recall(_results())
    assert out["recall"] == pytest.approx(100 * (1 + 0.25 + 2 / 3) / 3)
    assert out["num_videos"] == 3


def _video(rng, t, k, perfect):
    """A video whose windows are noisy copies of its step embeddings at annotated, ordered seconds."""
    steps = rng.normal(size=(k, 8))
    windows = 0.1 * rng.normal(size=(t, 8))
    y = np.zeros((t, k), dtype=np.int8)
    starts = np.sort(rng.choice(np.arange(0, t - 2, 3), size=k, replace=False))
    for j, s in enumerate(starts):
        y[s : s + 2, j] = 1
        if perfect:
            windows[s : s + 2] += steps[j]
    return loc.step_similarity(steps, windows), y


def test_evaluate_localisation_end_to_end():
    rng = np.random.default_rng(3)
    videos = []
    for task in loc.CROSSTASK_PRIMARY_TASKS:
        for i in range(2):
            s, y = _video(rng, 30, 4, perfect=(task != "16815"))
            videos.append((f"{task}_{i}", task, s, y))
    out = loc.evaluate_localisation(videos, "crosstask")
    assert out["settings"] == {"decoder": "dp", "log_softmax": False, "convention": "per_video"}
    assert all(out["per_task"][t] == 100.0 for t in loc.CROSSTASK_PRIMARY_TASKS[1:])
    assert out["per_task"]["16815"] < 100.0  # random windows for one task
    assert out["recall"] == pytest.approx(np.mean(list(out["per_task"].values())))
    mined = loc.evaluate_localisation([(v, "", s, y) for v, _, s, y in videos], "mining_youtube", decoder="argmax_step")
    assert mined["settings"] == {"decoder": "argmax_step", "log_softmax": True}
    assert mined["num_videos"] == len(videos)


def test_evaluate_video_errors_name_the_video():
    with pytest.raises(ValueError, match="'vid7'"):
        loc.evaluate_video("vid7", "A", np.zeros((5, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="'vid8'.*T=2 < K=3"):
        loc.evaluate_video("vid8", "A", np.zeros((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match="'vid9'.*no annotated step"):
        loc.evaluate_video("vid9", "A", np.zeros((4, 2)), np.zeros((4, 2)))
