"""The training loop: its host-side pieces (device prefetch with iterator snapshots, metric windows) and
who decides the periodic checkpoints (the checkpoint manager's save policy)."""

import importlib.util
import pathlib

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from eao_jax import checkpoint as ckpt
from eao_jax import parallel, train
from eao_jax.config_utils import complete_config, reference_config
from eao_jax.train_host import DevicePrefetcher, MetricWindow

DEMO = pathlib.Path(__file__).resolve().parents[1] / "configs" / "demo.py"


def _mesh(n):
    c = reference_config()
    c.mesh.data, c.mesh.model = n, 1
    return parallel.make_mesh(c.mesh, jax.devices()[:n])


def _batches(n_items=40, batch=8):
    """A checkpointable grain iterator over generated batches (the training pipeline's kind of iterator)."""
    def make(i):
        rng = np.random.default_rng(i)
        return {"video": rng.normal(size=(3, 4)).astype(np.float32), "video_mask": np.ones((3,), np.float32),
                "id": np.int32(i)}
    return iter(grain.MapDataset.range(n_items).map(make).batch(batch, drop_remainder=True).to_iter_dataset())


def test_prefetcher_places_global_batches_and_snapshots_state():
    mesh = _mesh(4)
    reference = list(_batches())
    it = _batches()
    pf = DevicePrefetcher(it, mesh, size=2)
    got = list(pf)
    pf.close()
    assert len(got) == len(reference) == 5
    for item, ref in zip(got, reference, strict=True):
        assert set(item.batch) == {"video", "video_mask"}  # model inputs only; ids stay on the host
        assert item.batch["video"].sharding == parallel.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(item.batch["video"]), ref["video"])
    # Each batch carries the iterator state right after it: restoring it resumes with the next batch.
    fresh = _batches()
    fresh.set_state(got[2].data_state)
    np.testing.assert_array_equal(next(fresh)["video"], reference[3]["video"])


def test_prefetcher_reports_pipeline_errors():
    def broken():
        yield {"video": np.zeros((8, 3, 4), np.float32)}
        raise OSError("record 17 of shard 3 is truncated")

    pf = DevicePrefetcher(broken(), _mesh(2), get_state=lambda: {})
    next(pf)
    with pytest.raises(RuntimeError, match="training data pipeline failed: record 17 of shard 3 is truncated"):
        next(pf)
    pf.close()


def test_metric_window_averages_and_finds_the_first_non_finite_step():
    w = MetricWindow()
    for step, (loss, ok) in enumerate([(2.0, 1.0), (4.0, 1.0), (np.nan, 0.0), (3.0, 1.0)], start=11):
        w.add(step, {"loss": jnp.float32(loss), "finite": jnp.float32(ok)}, wait_s=0.5)
    avg, bad = w.fetch(clips_per_step=64)
    assert bad[0] == 13 and np.isnan(bad[1]["loss"])
    assert avg["data_wait"] == 0.5 and avg["clips_per_s"] > 0 and "finite" not in avg
    assert len(w) == 0  # reset
    w.add(1, {"loss": jnp.float32(2.0), "finite": jnp.float32(1.0)}, 0.0)
    w.add(2, {"loss": jnp.float32(4.0), "finite": jnp.float32(1.0)}, 0.0)
    avg, bad = w.fetch(clips_per_step=64)
    assert bad is None and avg["loss"] == 3.0


@pytest.mark.parametrize("every, saved", [(4, [4, 8]), (1, list(range(1, 11))), (0, [])])
def test_the_training_manager_saves_the_multiples_of_every_steps_only(tmp_path, every, saved):
    # Orbax's default policy would also save the first step of a fresh run; every_steps=0 saves nothing
    # unless forced (the final save).
    cfg = ml_collections.ConfigDict({"every_steps": every, "keep": None, "async_save": False})
    mngr = ckpt.training_manager(tmp_path, cfg)
    assert [s for s in range(1, 11) if mngr.should_save(s)] == saved
    mngr.close()


def _demo_tiny():
    spec = importlib.util.spec_from_file_location("_demo_cfg", DEMO)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return complete_config(module.get_config("tiny"))


def test_the_checkpoint_manager_decides_the_periodic_saves(tmp_path, monkeypatch):
    # checkpoint.every_steps=4 over 10 steps: the loop offers steps 4 and 8 to the manager unforced (its
    # policy saves them) and forces only the final step 10.
    calls = []
    save_training = ckpt.save_training

    def spy(mngr, step, **kw):
        started = save_training(mngr, step, **kw)
        calls.append((step, kw["force"], started))
        return started

    monkeypatch.setattr(ckpt, "save_training", spy)
    config = _demo_tiny()
    config.train.num_steps, config.train.log_every = 10, 5
    config.checkpoint.every_steps, config.checkpoint.keep = 4, None
    work = tmp_path / "work"
    train.prepare_config(config, str(work))
    result = train.train_and_evaluate(config, str(work), progress_bar=False)
    assert (result.step, result.status) == (10, "finished")
    assert calls == [(4, False, True), (8, False, True), (10, True, True)]
    assert sorted(int(p.name) for p in (work / "checkpoints").glob("[0-9]*")) == [4, 8, 10]
