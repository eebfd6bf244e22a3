"""Reports: results JSON schema and round trip, fixed-width tables, recall@K PNG."""

import json

import numpy as np
import pytest

from eao_jax.evaluation import localisation as loc
from eao_jax.evaluation import report
from eao_jax.evaluation import retrieval as rt

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _metrics(n=40, complete=45):
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(n, 8))
    embeds = {k: (latent + rng.normal(size=(n, 8))).astype(np.float32) for k in rt.EMBED_KEYS.values()}
    return rt.compute_all_retrieval_metrics(embeds, complete_dataset_size=complete), embeds


def test_retrieval_json_schema_and_round_trip(tmp_path):
    metrics, _ = _metrics()
    res = report.retrieval_results(
        "youcook2", metrics, num_queries=40, complete_dataset_size=45, checkpoint="/ckpt/7", step=np.int64(7)
    )
    assert list(res) == ["task", "checkpoint", "step", "num_queries", "complete_dataset_size", "metrics"]
    assert res["step"] == 7 and type(res["step"]) is int
    assert set(res["metrics"]) == set(rt.DIRECTIONS)
    assert set(report.TABLE_COLUMNS) <= set(res["metrics"]["t2v"])
    path = tmp_path / "sub" / "results.json"
    report.write_results_json(path, res)
    back = report.read_results_json(path)
    assert back == res
    assert back["metrics"]["t2va"]["R10"] == metrics["t2va"]["R10"]  # exact float round trip
    json.loads(path.read_text())  # plain JSON


def test_localisation_json_round_trip(tmp_path):
    results = [loc.VideoResult("v1", "16815", 1, 2), loc.VideoResult("v2", "23521", 3, 3)]
    summary = loc.crosstask_recall(results, tasks=["16815", "23521"])
    summary["settings"] = {"decoder": "dp", "log_softmax": False, "convention": "per_video"}
    res = report.localisation_results("crosstask", summary, checkpoint="ck", step=3)
    assert res["metrics"] == {"recall": 75.0, "per_task": {"16815": 50.0, "23521": 100.0}}
    assert res["num_videos"] == 2 and res["settings"]["decoder"] == "dp"
    report.write_results_json(tmp_path / "loc.json", res)
    assert report.read_results_json(tmp_path / "loc.json") == res
    table = report.format_localisation_table(res)
    assert "16815" in table and "50.00" in table and table.splitlines()[-1].split() == ["mean", "75.00"]
    # a partial CrossTask says what its mean covers, in the JSON and under the table
    partial = report.localisation_results("crosstask", loc.crosstask_recall(results), checkpoint="ck", step=3)
    assert partial["averaged_over"] == ["16815", "23521"] and len(partial["missing_tasks"]) == 16
    assert partial["metrics"]["recall"] == 75.0
    assert report.format_localisation_table(partial).splitlines()[-1] == (
        "(mean over the 2 of 18 tasks present; no video for 16)")


def test_bad_results_are_errors(tmp_path):
    metrics, _ = _metrics()
    with pytest.raises(ValueError, match="non-finite"):
        bad = {d: dict(m) for d, m in metrics.items()}
        bad["t2v"]["MeanR"] = float("nan")
        report.retrieval_results("msrvtt", bad, num_queries=40)
    with pytest.raises(ValueError, match="'t2v'.*MedR"):
        report.retrieval_results("msrvtt", {"t2v": {"R1": 1.0}}, num_queries=40)
    p = tmp_path / "broken.json"
    p.write_text('{"task": ')
    with pytest.raises(ValueError, match="broken.json"):
        report.read_results_json(p)


def test_retrieval_table_is_fixed_width():
    metrics, _ = _metrics()
    table = report.format_retrieval_table(metrics)
    lines = table.splitlines()
    assert len(lines) == 2 + 18
    assert len({len(line) for line in lines}) == 1  # every line the same width
    assert lines[0].split() == ["direction", *report.TABLE_COLUMNS]
    row = next(line for line in lines if line.startswith("t2v+a "))
    assert row.split()[1:] == [f"{metrics['t2v+a'][c]:.2f}" for c in report.TABLE_COLUMNS]
    with pytest.raises(KeyError, match="t2x"):
        report.format_retrieval_table(metrics, directions=["t2x"])


def _check_png(path):
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE)
    import matplotlib.image

    img = matplotlib.image.imread(str(path))
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_recall_plot_bars_and_curves(tmp_path):
    metrics, embeds = _metrics()
    report.plot_recall_at_k(tmp_path / "bars.png", metrics=metrics, title="youcook2")
    _check_png(tmp_path / "bars.png")
    ranks = rt.direction_ranks(embeds, directions=list(rt.MAIN_DIRECTIONS))
    curves = {d: rt.recall_at_k_curve(r, 45) for d, r in ranks.items()}
    report.plot_recall_at_k(tmp_path / "plots" / "curves.png", curves=curves)
    _check_png(tmp_path / "plots" / "curves.png")
    with pytest.raises(ValueError, match="exactly one"):
        report.plot_recall_at_k(tmp_path / "x.png")
    with pytest.raises(ValueError, match="none of the directions"):
        report.plot_recall_at_k(tmp_path / "x.png", metrics={"a2v": metrics["a2v"]})
