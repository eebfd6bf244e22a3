"""Metrics logging: a failed writer is reported once and dropped (never a hang, never a crash), a resumed
run's steps do not overlap an earlier run's, and the ETA leaves out the compiling first step."""

import json
import os

import pytest

from eao_jax import metrics_log
from eao_jax.metrics_log import MetricsLogger, StepRate, eta_seconds, read_metrics, read_scalars


def test_eta_counts_only_the_steps_after_compilation():
    assert eta_seconds(90, 10, 5.0) == 45.0
    assert eta_seconds(0, 10, 5.0) == 0.0
    assert eta_seconds(-3, 10, 5.0) == 0.0  # past the end: nothing left
    assert eta_seconds(90, 0, 5.0) is None and eta_seconds(90, 10, 0.0) is None  # nothing measured yet

    # 100 steps; step 1 compiles for 40 s, then 10 steps take 5 s. The ETA is that of 0.5 s per step.
    r = StepRate()
    assert r.eta(1, 100, now=40.0) is None and r.rate(1, now=40.0) is None  # before start(): unknown
    r.start(1, now=40.0)
    assert r.rate(1, now=40.0) is None  # nothing measured since
    assert r.rate(11, now=45.0) == 2.0
    assert r.eta(11, 100, now=45.0) == pytest.approx(44.5)
    # An average over all steps since the start (what tqdm's rate does) would include the compile time:
    assert 89 * 45.0 / 11 == pytest.approx(364.1, abs=0.1)


def test_the_bar_shows_no_rate_or_eta_until_a_post_compilation_step(tmp_path, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(metrics_log, "_clock", lambda: now[0])
    log = MetricsLogger(tmp_path, total_steps=100, progress_bar=True)
    now[0] += 40.0
    log.advance(1)  # the compiling step: 40 s
    assert log._bar.format_dict["rate"] == 0 and "<?" in str(log._bar) and log.eta() is None
    log.start_timing()
    now[0] += 5.0
    log.advance(10)  # 10 steps in 5 s
    assert log._bar.format_dict["rate"] == 2.0 and "<00:44," in str(log._bar)  # 89 steps left
    assert log.eta() == 44.5
    log.close()


def _log_steps(log, steps, value=0.0):
    for s in steps:
        log.log_train(s, {"loss": float(s) + value, "lr": 1e-3})


def test_a_jsonl_file_on_a_full_disk_is_reported_once_and_dropped(tmp_path, capsys):
    os.symlink("/dev/full", tmp_path / "metrics.jsonl")  # every write fails with ENOSPC
    log = MetricsLogger(tmp_path, total_steps=10, progress_bar=False)
    _log_steps(log, range(1, 11))
    log.log_event(10, "done")
    log.close()
    err = capsys.readouterr().err
    want = (f"metrics: writing {tmp_path / 'metrics.jsonl'} failed (No space left on device); metrics.jsonl is off "
            "for the rest of the run (training goes on)")
    assert err.count("metrics: writing") == 1 and want in err, err
    assert "step 10/10 loss=10" in err and "[step 10] done" in err  # the console goes on
    assert [s for s, _ in read_scalars(tmp_path)["train/loss"]] == list(range(1, 11))  # TensorBoard goes on


def test_an_event_file_on_a_full_disk_is_reported_once_and_dropped(tmp_path, capsys):
    log = MetricsLogger(tmp_path, total_steps=10, progress_bar=False)
    path = log._tb.path
    log._tb._f.close()
    log._tb._f = open("/dev/full", "wb", buffering=0)  # noqa: SIM115  # the next write fails with ENOSPC
    _log_steps(log, range(1, 11))
    log.close()
    err = capsys.readouterr().err
    assert err.count("metrics: writing") == 1, err
    assert (f"metrics: writing {path} failed (No space left on device); TensorBoard logging is off for the rest "
            "of the run (training goes on)") in err
    assert [r["step"] for r in read_metrics(tmp_path, "train")] == list(range(1, 11))  # the JSONL file goes on
    dropped = [r for r in read_metrics(tmp_path, "event") if r["message"].startswith("metrics: writing")]
    assert len(dropped) == 1 and dropped[0]["step"] == 0


def test_a_resumed_run_replaces_what_an_earlier_run_logged_after_its_step(tmp_path, capsys):
    first = MetricsLogger(tmp_path, total_steps=8, progress_bar=False)
    _log_steps(first, range(1, 9))
    first.log_eval(8, "synthetic", {"t2v": {"R1": 1.0}})
    first.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "time": 1.0, "ki')  # torn by a kill

    second = MetricsLogger(tmp_path, total_steps=8, initial_step=4, progress_bar=False)
    # Steps 5..8 of the first run (4 train records, 1 eval) and the torn line moved aside.
    assert capsys.readouterr().err.count(
        "[step 4] an earlier run logged beyond step 4: 6 metrics.jsonl records moved to metrics.superseded.jsonl, "
        "5 TensorBoard events removed") == 1
    superseded = (tmp_path / "metrics.superseded.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in superseded[:5]] == [5, 6, 7, 8, 8] and superseded[5].endswith('"ki')
    _log_steps(second, range(5, 9), value=0.5)
    second.close()

    train = read_metrics(tmp_path, "train")
    assert [(r["step"], r["loss"]) for r in train] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 5.5), (6, 6.5),
                                                       (7, 7.5), (8, 8.5)]
    scalars = read_scalars(tmp_path)
    assert scalars["train/loss"] == [(r["step"], r["loss"]) for r in train]
    assert "eval/synthetic/t2v/R1" not in scalars  # step 8 of the first run
    # A later resume from the end changes nothing.
    third = MetricsLogger(tmp_path, total_steps=8, initial_step=8, progress_bar=False)
    third.close()
    assert read_scalars(tmp_path)["train/loss"] == scalars["train/loss"]
    assert len(read_metrics(tmp_path, "train")) == 8


def test_event_files_read_back_and_a_torn_tail_is_ignored(tmp_path):
    log = MetricsLogger(tmp_path, total_steps=3, progress_bar=False)
    _log_steps(log, (1, 2, 3))
    log.close()
    (name,) = os.listdir(tmp_path / metrics_log.TB_DIR)
    path = tmp_path / metrics_log.TB_DIR / name
    events = metrics_log.read_events(path)
    assert events[0].file_version == "brain.Event:2"
    assert [(e.step, {v.tag for v in e.summary.value}) for e in events[1:]] == [
        (s, {"train/loss", "train/lr"}) for s in (1, 2, 3)]
    os.truncate(path, path.stat().st_size - 3)
    assert [e.step for e in metrics_log.read_events(path)][1:] == [1, 2]
