"""Retrieval metrics: parity with the original's numbers, tie averaging, directions, clip averaging."""

import re

import numpy as np
import pytest

from eao_jax.evaluation import retrieval as rt


def _fixture_cases(npz):
    """[(sims, complete_size or None, {metric: value})] for every metrics group in the fixture."""
    groups: dict[str, dict[str, float]] = {}
    for key in npz.files:
        m = re.fullmatch(r"(metrics\d+(?:_complete\d+)?)/(.+)", key)
        if m:
            groups.setdefault(m.group(1), {})[m.group(2)] = float(npz[key])
    cases = []
    for group, expected in sorted(groups.items()):
        m = re.fullmatch(r"metrics(\d+)(?:_complete(\d+))?", group)
        sims = npz[f"sims{m.group(1)}"]
        cases.append((group, sims, int(m.group(2)) if m.group(2) else None, expected))
    return cases


def _sorted_rank_reference(row: np.ndarray, i: int) -> float:
    """Independent reference: positions of the diagonal's value in the descending-sorted row, averaged."""
    order = np.sort(row)[::-1]
    return float(np.mean(np.flatnonzero(order == row[i])))


def test_parity_with_original_metrics(data_dir):
    npz = np.load(data_dir / "metrics_and_video_tokens.npz")
    cases = _fixture_cases(npz)
    assert len(cases) >= 6  # 3 matrices, each plain and with a larger denominator
    assert any(c[2] is not None for c in cases)
    for group, sims, complete, expected in cases:
        # The fixture's matrices are rounded so that the diagonal is tied with other columns.
        diag = np.diag(sims)[:, None]
        assert np.count_nonzero(np.sum(sims == diag, axis=1) > 1) > 0, group
        got = rt.retrieval_metrics(sims, complete_dataset_size=complete)
        assert set(expected) <= set(got), (group, sorted(expected))
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=f"{group}/{name}")


def test_averaged_ranks_match_sorted_reference():
    rng = np.random.default_rng(0)
    sims = np.round(rng.normal(size=(40, 40)), 1).astype(np.float32)  # coarse values: many ties
    ranks = rt.averaged_ranks(sims, chunk_rows=7)  # chunk size not dividing N
    ref = np.array([_sorted_rank_reference(sims[i], i) for i in range(40)])
    np.testing.assert_array_equal(ranks, ref)
    assert np.any(ranks != np.floor(ranks))  # some ranks are fractional


def test_hand_made_ties_and_r1_rule():
    sims = np.array(
        [
            [0.9, 0.9, 0.1, 0.0],  # tied for first with one other column -> rank 0.5
            [0.5, 0.5, 0.5, 0.7],  # one above, tied with two -> positions 1,2,3 -> rank 2
            [0.1, 0.2, 0.8, 0.3],  # strictly first -> 0
            [0.4, 0.3, 0.2, 0.1],  # last -> 3
        ],
        dtype=np.float32,
    )
    np.testing.assert_array_equal(rt.averaged_ranks(sims), [0.5, 2.0, 0.0, 3.0])
    m = rt.retrieval_metrics(sims)
    assert m["R1"] == 25.0  # only exact rank 0 counts for R1 (the 0.5 tie does not)
    assert m["R5"] == 100.0
    assert m["MedR"] == pytest.approx(np.median([0.5, 2, 0, 3]) + 1)
    assert m["MeanR"] == pytest.approx(np.mean([0.5, 2, 0, 3]) + 1)
    m8 = rt.retrieval_metrics(sims, complete_dataset_size=8)
    assert m8["R1"] == 12.5 and m8["R5"] == 50.0
    assert m8["MedR"] == m["MedR"] and m8["MeanR"] == m["MeanR"]  # over evaluated rows only
    assert m8[rt.GEOMETRIC_MEAN_KEY] == pytest.approx((12.5 * 50.0 * 50.0) ** (1 / 3))


def test_recall_curve_agrees_with_metrics():
    rng = np.random.default_rng(1)
    sims = np.round(rng.normal(size=(120, 120)) + 3 * np.eye(120) * rng.random(120), 1)
    ranks = rt.averaged_ranks(sims)
    m = rt.metrics_from_ranks(ranks, complete_dataset_size=130)
    curve = rt.recall_at_k_curve(ranks, complete_dataset_size=130, max_k=50)
    assert curve.shape == (50,)
    assert np.all(np.diff(curve) >= 0)
    for k in rt.RECALL_KS:
        assert curve[k - 1] == pytest.approx(m[f"R{k}"])


def test_bad_inputs_are_errors():
    ok = np.eye(3)
    with pytest.raises(ValueError, match="square"):
        rt.retrieval_metrics(np.ones((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        rt.retrieval_metrics(np.where(ok > 0, np.nan, 0.0))
    with pytest.raises(ValueError, match="complete_dataset_size"):
        rt.retrieval_metrics(ok, complete_dataset_size=2)
    with pytest.raises(ValueError, match="NaN"):
        rt.cosine_similarity(np.array([[np.nan, 1.0]]), np.ones((1, 2)))
    with pytest.raises(ValueError, match="unknown retrieval direction"):
        rt.split_direction("t2x")


def test_cosine_similarity_renormalises_with_eps():
    a = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    b = np.array([[6.0, 8.0], [0.0, -2.0]], dtype=np.float32)
    s = rt.cosine_similarity(a, b)
    assert s.dtype == np.float32
    np.testing.assert_allclose(s, [[1.0, -0.8], [0.0, 0.0]], atol=1e-6)  # zero row stays zero


def _embeds(n: int, d: int = 16, seed: int = 0, noise: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, d))
    return {
        key: (latent + noise * rng.normal(size=(n, d))).astype(np.float32) * rng.uniform(0.5, 2.0)
        for key in rt.EMBED_KEYS.values()
    }


def test_all_eighteen_directions_and_reverse_is_transpose():
    embeds = _embeds(60)
    embeds["text_embed_nonempty_input_mask"] = np.ones(60)  # extra keys are ignored
    metrics = rt.compute_all_retrieval_metrics(embeds, complete_dataset_size=64)
    assert list(metrics) == list(rt.DIRECTIONS) and len(metrics) == 18
    # every direction equals the metrics of its own similarity matrix (query rows, target columns)
    for direction in ("t2v", "v2t", "va2t", "t+v2a", "a2t+v"):
        q, t = rt.split_direction(direction)
        sims = rt.cosine_similarity(embeds[rt.EMBED_KEYS[q]], embeds[rt.EMBED_KEYS[t]])
        assert metrics[direction] == rt.retrieval_metrics(sims, complete_dataset_size=64)
    # text and video share the latent: well above chance (R10 of chance ~ 16%)
    assert metrics["t2v"]["R10"] > 40.0
    assert metrics["t2v"] != metrics["v2t"]


def test_identical_embeddings_give_perfect_retrieval():
    embeds = _embeds(30, noise=0.0)
    m = rt.compute_all_retrieval_metrics(embeds, directions=["t2v", "v2t"])
    # noise 0: every embedding is a scaled copy of the latent, so the diagonal is always first
    assert m["t2v"]["R1"] == 100.0 and m["t2v"]["MedR"] == 1.0 and m["v2t"]["MeanR"] == 1.0


def test_missing_modalities():
    embeds = {k: v for k, v in _embeds(20).items() if k in ("text_embed", "video_embed", "tv_embed")}
    assert rt.available_directions(embeds) == ["t2v", "v2t"]
    assert list(rt.compute_all_retrieval_metrics(embeds)) == ["t2v", "v2t"]
    with pytest.raises(KeyError, match="audio_embed"):
        rt.compute_all_retrieval_metrics(embeds, directions=["t2a"])
    bad = dict(embeds, video_embed=embeds["video_embed"][:-1])
    with pytest.raises(ValueError, match="video_embed"):
        rt.compute_all_retrieval_metrics(bad)


def test_large_n_is_vectorised():
    # YouCook2 size: 3350 queries; ranks for a few rows checked against the sort-based reference.
    n = 3350
    rng = np.random.default_rng(2)
    t = rng.normal(size=(n, 8)).astype(np.float32)
    sims = rt.cosine_similarity(t, t + 0.5 * rng.normal(size=(n, 8)).astype(np.float32))
    sims = np.round(sims, 2)
    ranks = rt.averaged_ranks(sims)
    for i in (0, 1, 1234, n - 1):
        assert ranks[i] == _sorted_rank_reference(sims[i], i)


def test_average_embeddings_by_id():
    ids = ["b", "a", "b", "-1", "c", "a", "b"]
    x = np.arange(14, dtype=np.float32).reshape(7, 2)
    y = np.arange(7, dtype=np.float32)[:, None] * 10
    uniq, out = rt.average_embeddings_by_id(ids, {"video_embed": x, "text_embed": y})
    assert uniq == ["b", "a", "c"]  # order of first appearance, '-1' dropped
    np.testing.assert_allclose(out["video_embed"], [x[[0, 2, 6]].mean(0), x[[1, 5]].mean(0), x[4]])
    np.testing.assert_allclose(out["text_embed"][:, 0], [(0 + 20 + 60) / 3, (10 + 50) / 2, 40])
    assert out["video_embed"].dtype == np.float32
    # raw averaging (not of normalised vectors): the mean of [1,0] and [3,0] is [2,0]
    uniq, out = rt.average_embeddings_by_id(np.array([5, -1, 5]), {"e": np.array([[1.0, 0], [9, 9], [3, 0]])})
    assert uniq == [5]
    np.testing.assert_allclose(out["e"], [[2.0, 0.0]])
    with pytest.raises(ValueError, match="'e'"):
        rt.average_embeddings_by_id([1, 2], {"e": np.zeros((3, 2))})
