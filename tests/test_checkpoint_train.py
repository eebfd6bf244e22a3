"""Training checkpoints: model + optimizer + config + data iterator state, restored onto FSDP
shardings; the `model` item keeps the converter/evaluator layout."""

import json
import re
import types

import checkpoint_damage
import jax
import numpy as np
import pytest
from flax import nnx

from eao_jax import checkpoint as ckpt
from eao_jax import parallel, train
from eao_jax.config_utils import reference_config


def tiny_config():
    c = reference_config()
    m = c.model
    m.embed_dim, m.num_heads, m.projection_dim = 32, 4, 16
    m.video_dim, m.text_dim = 8, 6
    m.davenet.blocks, m.davenet.widths = (1, 1), (8, 8, 16)
    c.train.steps_per_epoch = 5
    c.mesh.data, c.mesh.model, c.mesh.fsdp, c.mesh.fsdp_min_size = 4, 2, True, 64
    c.checkpoint.every_steps, c.checkpoint.keep, c.checkpoint.async_save = 1, 2, True
    return c


def random_state(abstract, seed):
    """A state with random values (no initialisation compile needed): pure dict of numpy arrays."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: rng.normal(size=x.shape).astype(x.dtype) if np.issubdtype(x.dtype, np.floating)
                        else np.full(x.shape, seed, x.dtype), nnx.to_pure_dict(abstract))


@pytest.fixture(scope="module")
def setup():
    c = tiny_config()
    mesh = parallel.make_mesh(c.mesh, jax.devices()[:8])
    graphdef, abstract = train.abstract_train_state(c)
    shardings = train.state_shardings(abstract, mesh, c)
    return c, mesh, abstract, shardings


def test_save_restore_roundtrip_on_sharded_targets(setup, tmp_path):
    c, mesh, abstract, shardings = setup
    pure_sh = nnx.to_pure_dict(shardings)
    mngr = ckpt.training_manager(tmp_path, c.checkpoint)
    saved = {}
    for step in (1, 2, 3):
        values = jax.device_put(random_state(abstract, step), pure_sh)
        saved[step] = jax.device_get(values)
        data = ckpt.IteratorSnapshot({"next_index": 10 * step})
        assert ckpt.save_training(mngr, step, model_vars=values["model"], opt_vars=values["opt"], config=c,
                                  data_state=data)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [2, 3]  # keep = 2
    mngr.close()

    mngr = ckpt.training_manager(tmp_path, c.checkpoint)
    assert mngr.latest_step() == 3
    model, opt, snapshot = ckpt.restore_training(
        mngr, 3, model_target=train._targets(abstract["model"], shardings["model"]),
        opt_target=train._targets(abstract["opt"], shardings["opt"]))
    mngr.close()
    assert snapshot.state == {"next_index": 30}
    for got, want, sh in zip(jax.tree.leaves({"model": model, "opt": opt}), jax.tree.leaves(saved[3]),
                             jax.tree.leaves(pure_sh), strict=True):
        np.testing.assert_array_equal(np.asarray(got), want)
        assert got.sharding == sh  # restored straight onto the FSDP placement
    assert any("data" in tuple(s.spec) for s in jax.tree.leaves(pure_sh))
    # The state rebuilds into a TrainState.
    state = train._fill(abstract, {"model": model, "opt": opt})
    ts = nnx.merge(train.abstract_train_state(c)[0], state)
    assert int(ts.opt.step[...]) == 3

    # The data item is grain's per-process JSON.
    assert json.loads((tmp_path / "3" / "data" / "process_0-of-1.json").read_text()) == {"next_index": 30}
    # `model` has the converter's layout: the evaluator's reader loads it.
    loaded, config, step = ckpt.load_model(tmp_path)
    assert step == 3 and config.model.embed_dim == 32
    for a, b in zip(jax.tree.leaves(ckpt.model_variables(loaded)), jax.tree.leaves(saved[3]["model"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b)


def test_restore_without_data_item(setup, tmp_path):
    c, mesh, abstract, shardings = setup
    mngr = ckpt.training_manager(tmp_path, c.checkpoint)
    values = jax.device_put(random_state(abstract, 7), nnx.to_pure_dict(shardings))
    ckpt.save_training(mngr, 7, model_vars=values["model"], opt_vars=values["opt"], config=c, force=True)
    mngr.wait_until_finished()
    _, _, snapshot = ckpt.restore_training(
        mngr, 7, model_target=train._targets(abstract["model"], shardings["model"]),
        opt_target=train._targets(abstract["opt"], shardings["opt"]))
    mngr.close()
    assert snapshot is None


def test_init_from_checks_the_model_config(setup, tmp_path):
    c, mesh, abstract, shardings = setup
    ckpt.save_model(tmp_path / "conv", 0, jax.device_get(random_state(abstract, 1)["model"]), c)
    root, step = train.resolve_init_from(str(tmp_path / "conv"))
    assert step == 0
    train._check_init_from_config(root, step, c)  # same model: fine
    other = c.copy_and_resolve_references()
    other.model.embed_dim = 64
    with pytest.raises(ValueError, match=r"^init_from=.*model\.embed_dim: checkpoint 32 vs config 64"):
        train._check_init_from_config(root, step, other)
    with pytest.raises(ValueError, match=r"^init_from: "):
        train.resolve_init_from(str(tmp_path / "missing"))


def test_iterator_snapshot_roundtrip():
    snap = ckpt.IteratorSnapshot({"a": [1, 2], "b": "x"})
    other = ckpt.IteratorSnapshot()
    other.set_state(snap.get_state())
    assert other.state == {"a": [1, 2], "b": "x"}
    with pytest.raises(ValueError, match="no data iterator state"):
        ckpt.IteratorSnapshot().get_state()


class _FailingClose:
    """A manager whose save in flight fails when `close` waits for it (as Orbax raises it there)."""

    directory = "/ckpts"

    def close(self):
        raise ValueError("RESOURCE_EXHAUSTED: No space left on device")


def test_closing_a_manager_after_an_error_never_replaces_that_error(caplog):
    with pytest.raises(ckpt.CheckpointSaveError, match=r"saving a checkpoint in /ckpts failed: ValueError: "
                                                       r"RESOURCE_EXHAUSTED: No space left on device"):
        ckpt.close_manager(_FailingClose(), after_error=False)
    with caplog.at_level("WARNING"):  # the run already stops on an error: the one it reports stays
        ckpt.close_manager(_FailingClose(), after_error=True)
    assert "while stopping: saving a checkpoint in /ckpts failed" in caplog.text


def test_a_failed_run_reports_its_own_error_when_the_manager_fails_to_close(monkeypatch, tmp_path):
    """The loop's error (here a checkpoint save) is what `train_and_evaluate` raises, not the error of
    closing the manager in its `finally` (timing decided which one surfaced)."""
    idle = types.SimpleNamespace(close=lambda: None, restore=lambda: None)
    run = types.SimpleNamespace(mngr=_FailingClose(), prefetch=idle, stop=idle, logger=idle, mesh=None,
                                graphdef=None, shardings=None)
    monkeypatch.setattr(train, "_setup", lambda config, workdir: run)
    monkeypatch.setattr(train, "_restore_or_init", lambda run: (0, None, ""))
    monkeypatch.setattr(train, "_start", lambda *a, **k: None)
    monkeypatch.setattr(train, "make_train_step", lambda *a, **k: None)

    def iterate(*_):
        raise ckpt.CheckpointSaveError("saving step 12 in /ckpts failed: ValueError: disk full")

    monkeypatch.setattr(train, "_iterate", iterate)
    with pytest.raises(ckpt.CheckpointSaveError, match="saving step 12 in /ckpts failed"):
        train._train_and_evaluate(reference_config(), str(tmp_path))


def test_non_finite_state_is_never_saved(setup, tmp_path):
    # Every training save (periodic, final, SIGTERM/preemption) and `convert` go through these two writers.
    c, mesh, abstract, shardings = setup
    values = jax.device_put(random_state(abstract, 1), nnx.to_pure_dict(shardings))  # sharded device arrays
    mngr = ckpt.training_manager(tmp_path / "train", c.checkpoint)
    assert ckpt.save_training(mngr, 1, model_vars=values["model"], opt_vars=values["opt"], config=c)
    mngr.wait_until_finished()
    host = random_state(abstract, 2)
    host["opt"]["opt_state"][0]["nu"]["masking_token"][3] = np.inf
    bad = jax.device_put(host, nnx.to_pure_dict(shardings))
    with pytest.raises(ckpt.NonFiniteStateError, match=r"step 2: 1 arrays hold NaN or Inf values "
                                                       r"\(opt/opt_state/0/nu/masking_token\)"):
        ckpt.save_training(mngr, 2, model_vars=bad["model"], opt_vars=bad["opt"], config=c, force=True)
    mngr.wait_until_finished()
    assert mngr.all_steps() == [1]
    mngr.close()
    model_vars = random_state(abstract, 3)["model"]
    model_vars["fusion"]["blocks"][0]["fc1"]["kernel"][0, 0] = np.nan
    with pytest.raises(ckpt.NonFiniteStateError, match="fusion/blocks/0/fc1/kernel"):
        ckpt.save_model(tmp_path / "converted", 0, model_vars, c)
    assert not (tmp_path / "converted").exists()


def test_a_damaged_only_step_says_what_to_delete(setup, tmp_path):
    c, mesh, abstract, shardings = setup
    targets = dict(model_target=train._targets(abstract["model"], shardings["model"]),
                   opt_target=train._targets(abstract["opt"], shardings["opt"]))
    root = tmp_path / "checkpoints"
    mngr = ckpt.training_manager(root, c.checkpoint)
    assert ckpt.restore_newest_training(mngr, **targets) is None  # nothing saved yet: a fresh run
    for step in (4, 5):
        values = jax.device_put(random_state(abstract, step), nnx.to_pure_dict(shardings))
        ckpt.save_training(mngr, step, model_vars=values["model"], opt_vars=values["opt"], config=c,
                           data_state=ckpt.IteratorSnapshot({"next_index": step}), force=True)
    mngr.wait_until_finished()
    (root / "5" / "opt" / "manifest.ocdbt").unlink()
    step, model, _, snapshot, skipped = ckpt.restore_newest_training(mngr, **targets)
    assert (step, snapshot.state, skipped) == (4, {"next_index": 4}, [(5, "opt/manifest.ocdbt is missing")])
    want = random_state(abstract, 4)["model"]["masking_token"]
    np.testing.assert_array_equal(np.asarray(model["masking_token"]), want)
    assert mngr.all_steps() == [4] and (tmp_path / ckpt.CORRUPT_SUBDIR / "5").is_dir()
    (root / "4" / "data" / "process_0-of-1.json").write_text("{")
    with pytest.raises(ckpt.CheckpointRestoreError,
                       match=rf"^checkpoint step 4 in {root} cannot be restored \(data/process_0-of-1.json is "
                             rf"not a readable data iterator state .*\) and there is no earlier step: delete "
                             rf"{root / '4'} to start this run from scratch$"):
        ckpt.restore_newest_training(mngr, **targets)
    mngr.close()


@pytest.mark.parametrize("how", checkpoint_damage.KINDS)
def test_a_damaged_only_step_of_each_kind_says_what_to_delete(setup, tmp_path, how):
    c, mesh, abstract, shardings = setup
    targets = dict(model_target=train._targets(abstract["model"], shardings["model"]),
                   opt_target=train._targets(abstract["opt"], shardings["opt"]))
    root = tmp_path / "checkpoints"
    mngr = ckpt.training_manager(root, c.checkpoint)
    values = jax.device_put(random_state(abstract, 3), nnx.to_pure_dict(shardings))
    ckpt.save_training(mngr, 3, model_vars=values["model"], opt_vars=values["opt"], config=c,
                       data_state=ckpt.IteratorSnapshot({"next_index": 3}), force=True)
    mngr.wait_until_finished()
    mngr.close()
    checkpoint_damage.corrupt(root / "3", how)
    mngr = ckpt.training_manager(root, c.checkpoint)  # as a rerun of the training opens it
    with pytest.raises(ckpt.CheckpointRestoreError,
                       match=rf"^checkpoint step 3 in {re.escape(str(root))} cannot be restored "
                             rf"\({re.escape(checkpoint_damage.REASONS[how])}.*\) and there is no earlier step: "
                             rf"delete {re.escape(str(root / '3'))} to start this run from scratch$"):
        ckpt.restore_newest_training(mngr, **targets)
    mngr.close()
    assert (root / "3").is_dir()  # refusing deletes nothing


def test_array_digests_follow_the_values_not_the_placement(setup):
    # A step saved over one mesh is verified when restored onto another: the digest of an array is the same
    # however it is sharded, on the host or on devices; one changed bit or two swapped elements change it.
    c, mesh, abstract, shardings = setup
    host = random_state(abstract, 5)
    placed = jax.device_put(host, nnx.to_pure_dict(shardings))  # FSDP over the 4x2 mesh
    assert any(not x.sharding.is_fully_replicated for x in jax.tree.leaves(placed))
    want = ckpt.array_digests(host)
    assert ckpt.array_digests(placed) == want and len(want) == len(jax.tree.leaves(host))
    kernel = host["model"]["fusion"]["blocks"][0]["fc1"]["kernel"]
    flipped = kernel.copy()
    flipped.view(np.uint32)[3, 7] ^= 1 << 9
    swapped = kernel.copy()
    swapped[0, :2] = kernel[0, 1::-1]
    for other in (flipped, swapped):
        got = ckpt.array_digests({"model": {"fusion": {"blocks": {0: {"fc1": {"kernel": other}}}}}})
        assert got["model/fusion/blocks/0/fc1/kernel"] != want["model/fusion/blocks/0/fc1/kernel"]
