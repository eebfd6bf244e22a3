"""The evaluator on the tiny synthetic dataset: sharded embeddings equal a plain single-device forward,
results JSON / table / plot, long-video strategies, localisation end to end, and the CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eao_jax import checkpoint as ckpt
from eao_jax import defaults, evaluators
from eao_jax.data import pipelines
from eao_jax.defaults import loss_config, model_config
from eao_jax.evaluation import localisation as loc_lib
from eao_jax.evaluation import retrieval as ret_lib
from eao_jax.evaluators import embedder as embedder_lib
from eao_jax.evaluators import localisation as loc_eval
from eao_jax.evaluators import retrieval as ret_eval
from eao_jax.model.eao import EverythingAtOnce
from tfds_builders.synthetic import ensure_prepared

SYN = "tiny"  # synthetic builder config: 32 retrieval clips, 4 localisation videos (2 tasks x 4 steps)


def synthetic_model_config(**overrides):
    """A toy TVA model for the synthetic data (2D 32 + 3D 32 video dims, 16-d words)."""
    c = model_config()
    c.video_dim, c.text_dim, c.embed_dim, c.num_heads, c.projection_dim = 64, 16, 16, 2, 16
    c.davenet.blocks = (1, 1, 1, 1, 1, 1)  # /64 like the paper's DAVEnet: 768 frames -> 12 tokens
    c.davenet.widths = (4, 4, 4, 4, 8, 8, 8)
    for k, v in overrides.items():
        c[k] = v
    return c


def random_model(cfg, seed: int = 0) -> EverythingAtOnce:
    """The model in eval mode with numpy-drawn parameters: weights N(0, 1/fan_in), biases and BatchNorm
    means 0, LayerNorm scales and BatchNorm variances 1. Skips the per-initialiser XLA compiles of an
    eager init (about 10 s on CI), which these tests do not need."""
    abstract = nnx.eval_shape(lambda: EverythingAtOnce(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, x):
        name = path[-1].key
        if name in ("bias", "mean"):
            return jnp.zeros(x.shape, x.dtype)
        if name in ("scale", "var"):
            return jnp.ones(x.shape, x.dtype)
        fan_in = int(np.prod(x.shape[:-1])) if len(x.shape) > 1 else x.shape[0]
        return jnp.asarray(rng.normal(0.0, fan_in ** -0.5, x.shape), x.dtype)

    pure = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


@pytest.fixture(scope="module")
def syn_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("synthetic_data")
    ensure_prepared(d, SYN)
    return d


@pytest.fixture(scope="module")
def model():
    return random_model(synthetic_model_config())


_REFERENCE: dict = {}


@pytest.fixture(scope="module")
def reference(model, syn_dir):
    """reference(strategy) -> (ids, embeddings), computed once per strategy."""
    def get(strategy):
        if strategy not in _REFERENCE:
            _REFERENCE[strategy] = reference_embeddings(model, syn_dir, strategy)
        return _REFERENCE[strategy]
    _REFERENCE.clear()
    return get


def lengths(strategy, dataset="synthetic", audio_downsampling=64):
    """What `strategy` feeds the model, with the schema's eval.at_once / eval.clip lengths."""
    ev = defaults.eval_config()
    return ret_eval.input_lengths(strategy, ev.at_once[dataset], ev.clip, audio_downsampling)


def reference_embeddings(model, syn_dir, strategy):
    """Item ids and raw embeddings from a plain single-device forward over the pipeline's batches."""
    s = lengths(strategy)
    data = pipelines.load_retrieval("synthetic", syn_dir, "retrieval", config=SYN, batch_size=32,
                                    n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"], max_words=20,
                                    video_strategy=s["video_strategy"], cut_clips=s["cut_clips"],
                                    process_index=0, process_count=1)
    forward = nnx.jit(lambda m, b: m(b, cross_modal=True, late_fusion=True))
    rows, index, valid = {}, [], []
    for batch in data:
        out = forward(model, {k: v for k, v in batch.items() if k not in ("valid", "index")})
        for k, v in out.items():
            if k.endswith("_embed"):
                rows.setdefault(k, []).append(np.asarray(v))
        index.append(batch["index"])
        valid.append(batch["valid"])
    index, valid = np.concatenate(index), np.concatenate(valid)
    embeds = {k: np.concatenate(v) for k, v in rows.items()}
    ids, embeds = ret_lib.average_embeddings_by_id(np.where(valid, index, -1), embeds)
    order = np.argsort(ids)
    return np.asarray(ids)[order], {k: v[order] for k, v in embeds.items()}


def test_strategy_lengths_follow_the_paper():
    s = lengths("at_once", "msrvtt")
    assert (s["n_video_tokens"], s["n_stft"], s["cut_clips"], s["audio_pooling"]) == (48, 3072, 0, None)
    s = lengths("at_once", "youcook2")
    assert (s["n_video_tokens"], s["n_stft"]) == (72, 4608)
    s = lengths("clip", "youcook2")
    assert (s["n_video_tokens"], s["n_stft"], s["video_strategy"]) == (12, 768, "clip")
    for strategy in ("nearest", "max_pool"):
        s = lengths(strategy, "msrvtt")
        assert (s["n_video_tokens"], s["n_stft"], s["video_strategy"]) == (12, 3072, strategy)
        assert s["audio_pooling"] == (strategy, 12)  # the 12 DAVEnet tokens of 768 frames, as the original
    assert lengths("nearest", "msrvtt", audio_downsampling=16)["audio_pooling"] == ("nearest", 48)
    assert lengths("clips_average", "msrvtt")["cut_clips"] == 4
    s = lengths("clips_average", "youcook2")
    assert (s["cut_clips"], s["n_video_tokens"], s["n_stft"]) == (6, 12, 768)
    with pytest.raises(ValueError, match="unknown strategy"):
        lengths("sliding")


def test_config_entries_complete_check_and_schedule():
    c = defaults.reference_config()
    c.eval.tasks = {"msrvtt": defaults.eval_settings("msrvtt", every_steps=5),
                    "yc_clip": {"task": "youcook2", "strategy": "clip"},  # partial: the rest are defaults
                    "crosstask": {"every_steps": 2, "decoder": "argmax"}}
    e = evaluators.entries(c)
    assert list(e) == ["crosstask", "msrvtt", "yc_clip"]
    assert (e["yc_clip"].task, e["yc_clip"].type, e["yc_clip"].split, e["yc_clip"].strategy) == (
        "youcook2", "retrieval", "val", "clip")
    assert (e["yc_clip"].batch_size, e["crosstask"].batch_size, e["crosstask"].embedding) == (16, 64, "v+a")
    evaluators.check(c)
    assert evaluators.due(c, 10) == ("crosstask", "msrvtt") and evaluators.due(c, 4) == ("crosstask",)
    assert evaluators.due(c, 3) == ()
    for tasks, match in [({"crosstask": {"strategy": "clip"}}, r"eval.tasks.crosstask.strategy: not a setting"),
                         ({"kinetics": {}}, r"eval.tasks.kinetics.task: unknown task 'kinetics'"),
                         ({"crosstask": {"decoder": "viterbi"}}, r"eval.tasks.crosstask.decoder must be one of"),
                         ({"msrvtt": {"strategy": "sliding"}}, r"eval.tasks.msrvtt.strategy must be one of"),
                         ({"msrvtt": {"every_steps": -2}}, r"eval.tasks.msrvtt.every_steps must be"),
                         ({"msrvtt": {"batch_size": 0}}, r"eval.tasks.msrvtt.batch_size must be")]:
        c.eval.tasks = tasks
        with pytest.raises(ValueError, match=match):
            evaluators.check(c)


def test_one_cached_forward_serves_evaluators_and_attention(model):
    from eao_jax import attention  # noqa: PLC0415

    a = embedder_lib.Embedder(model, outputs=("t2v",))
    b = embedder_lib.Embedder(model, outputs=("t2v",))
    assert a._forward is b._forward  # one compiled forward per model structure and outputs
    assert embedder_lib.Embedder(model, outputs=("v+a_embed",))._forward is not a._forward
    graphdef, _ = nnx.split(model)
    run, _ = attention._attention_fn(graphdef, (("text", "video", "audio"),), None)
    assert attention._attention_fn(graphdef, (("text", "video", "audio"),), None)[0] is run
    assert any(key[1][0] == "attention" for key in embedder_lib._CACHE)


def test_default_builder_config_follows_video_dim(model):
    resnet = random_model(synthetic_model_config(video_dim=4096))
    s3d = random_model(synthetic_model_config(video_dim=1024))
    yc, msr, syn = (defaults.eval_entry(t) for t in ("youcook2", "msrvtt", "synthetic"))
    assert evaluators.default_tfds_config(yc, resnet) == "resnet"
    assert evaluators.default_tfds_config(msr, s3d) == "s3d"
    assert evaluators.default_tfds_config(syn, resnet) is None  # prepared default
    assert evaluators.default_tfds_config(yc, model) is None  # 64-d: no released backbone
    trained = defaults.reference_config()
    trained.data.dataset, trained.data.tfds_config = "synthetic", "tiny"
    assert evaluators.default_tfds_config(syn, model, trained) == "tiny"  # the training dataset's config


@pytest.mark.parametrize("strategy", ["at_once", "clips_average"])
def test_sharded_embeddings_equal_single_device_forward(model, syn_dir, reference, strategy):
    ref_ids, ref = reference(strategy)
    s = lengths(strategy)
    embedder = embedder_lib.Embedder(model)  # all 8 devices, batch sharded over `data`
    assert embedder.mesh.shape["data"] == jax.device_count() == 8
    per_step = 8 // max(1, s["cut_clips"])  # items per step (each clips_average item is 4 rows)
    data = pipelines.load_retrieval("synthetic", syn_dir, "retrieval", config=SYN, batch_size=per_step,
                                    n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"], max_words=20,
                                    video_strategy=s["video_strategy"], cut_clips=s["cut_clips"])
    ids, embeds = ret_eval.retrieval_embeddings(embedder, data, clips_average=strategy == "clips_average")
    np.testing.assert_array_equal(ids, np.arange(32))
    np.testing.assert_array_equal(ref_ids, ids)
    assert set(embeds) == set(ref) and len(embeds) == 9
    for k in ref:  # (the reference averages the 4 clip rows of each item itself)
        np.testing.assert_allclose(embeds[k], ref[k], atol=2e-5, err_msg=k)


def test_evaluate_task_results_json_table_and_plot(model, syn_dir, reference, tmp_path):
    out = tmp_path / "res" / "synthetic.json"
    # 5 items per step: rounded up to the 8 devices, the last batch padded.
    res = evaluators.evaluate(model, "synthetic", data_dir=syn_dir, tfds_config=SYN, batch_size=5,
                                 output=out, checkpoint="CKPT", step=3)
    on_disk = json.loads(out.read_text())
    assert on_disk == res
    assert (res["task"], res["checkpoint"], res["step"]) == ("synthetic", "CKPT", 3)
    assert res["num_queries"] == res["complete_dataset_size"] == 32
    assert res["settings"]["strategy"] == "at_once" and res["settings"]["n_video_tokens"] == 48
    assert list(res["metrics"]) == list(ret_lib.DIRECTIONS)
    _, ref = reference("at_once")
    expected = ret_lib.compute_all_retrieval_metrics(ref, 32)
    for d, m in expected.items():
        for k in ("R1", "R5", "R10", "R50", "MedR", "MeanR"):
            assert res["metrics"][d][k] == pytest.approx(m[k], abs=1e-6), (d, k)
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = evaluators.format_results(res)
    assert "t2v+a" in table and "evaluated 32 of 32" in table


def test_pooling_strategy_leaves_the_model_unchanged(model, syn_dir):
    res = evaluators.evaluate(model, "synthetic", data_dir=syn_dir, tfds_config=SYN, strategy="nearest",
                                 batch_size=8)
    assert res["settings"]["audio_pooling"] == "nearest" and res["settings"]["n_video_tokens"] == 12
    assert model.audio_pooling == "none"  # the override was temporary
    for m in res["metrics"].values():
        assert 0 <= m["R1"] <= m["R5"] <= m["R10"] <= m["R50"] <= 100
        assert 1 <= m["MedR"] <= 32


def test_bad_requests_fail_with_clear_errors(model, syn_dir):
    pos = random_model(synthetic_model_config(use_positional_emb=True))
    with pytest.raises(ValueError, match="positional embeddings"):
        evaluators.evaluate(pos, "synthetic", data_dir=syn_dir, tfds_config=SYN)
    with pytest.raises(ValueError, match="synthetic_localization: strategy: not a setting of a localisation"):
        evaluators.evaluate(model, "synthetic_localization", data_dir=syn_dir, tfds_config=SYN, strategy="clip")
    with pytest.raises(ValueError, match="decoder must be one of"):
        evaluators.evaluate(model, "synthetic_localization", data_dir=syn_dir, tfds_config=SYN, decoder="viterbi")
    per_mod = random_model(synthetic_model_config(fusion="per_modality"))
    with pytest.raises(ValueError, match="fused pairs"):
        evaluators.evaluate(per_mod, "synthetic_localization", data_dir=syn_dir, tfds_config=SYN,
                            embedding="va")
    wrong = random_model(synthetic_model_config(video_dim=24))
    with pytest.raises(ValueError, match="model.video_dim=24"):
        evaluators.evaluate(wrong, "synthetic", data_dir=syn_dir, tfds_config=SYN)
    with pytest.raises(FileNotFoundError, match="youcook2"):
        evaluators.evaluate(model, "youcook2", data_dir=syn_dir)


def test_localisation_end_to_end(model, syn_dir, tmp_path):
    out = tmp_path / "loc.json"
    res = evaluators.evaluate(model, "synthetic_localization", data_dir=syn_dir, tfds_config=SYN, batch_size=16,
                                 output=out)
    assert json.loads(out.read_text()) == res
    assert not out.with_suffix(".png").exists()
    assert res["task"] == "synthetic_localization" and res["num_videos"] == 4
    assert res["settings"]["embedding"] == "v+a" and res["settings"]["decoder"] == "dp"
    assert res["settings"]["log_softmax"] is False and res["settings"]["convention"] == "per_video"
    per_task = res["metrics"]["per_task"]
    assert len(per_task) == 2
    assert all(0.0 <= r <= 100.0 for r in per_task.values())
    assert res["metrics"]["recall"] == pytest.approx(np.mean(list(per_task.values())))
    assert "mean" in evaluators.format_results(res)

    # The (T, K) scores of one video equal cosine(text_embed of the steps, v+a of the windows) from a
    # plain forward, and the recall follows from decoding them.
    data = pipelines.load_localization("synthetic", syn_dir, "localization", config=SYN, n_video_tokens=12,
                                       n_stft=768, max_words=20)
    video = data[0]
    # The same batch sizes as the evaluation above: its compiled forward is reused.
    embedder = embedder_lib.Embedder(model, outputs=("v+a_embed", "text_embed"), cross_modal=False)
    scores = loc_eval.localisation_scores(embedder, video, embedding="v+a", batch_size=16, step_batch_size=16)
    t, k = video["annotation"].shape
    assert scores.shape == (t, k)
    forward = nnx.jit(lambda m, b: m(b, cross_modal=False, late_fusion=True))
    win = forward(model, {key: video[key] for key in ("video", "video_mask", "audio", "audio_mask",
                                                      "audio_STFT_nframes")}
                  | {"text": np.zeros((t, 1, 16), np.float32), "text_mask": np.zeros((t, 1), np.float32)})
    txt = forward(model, {"text": video["text"], "text_mask": video["text_mask"],
                          "video": np.zeros((k, 1, 64), np.float32), "video_mask": np.zeros((k, 1), np.float32),
                          "audio": np.zeros((k, 40, 64), np.float32), "audio_mask": np.zeros((k, 64), np.float32),
                          "audio_STFT_nframes": np.full((k,), -1, np.int32)})
    expected = loc_lib.step_similarity(np.asarray(txt["text_embed"]), np.asarray(win["v+a_embed"]))
    np.testing.assert_allclose(scores, expected, atol=2e-5)


def test_training_hook_runs_a_named_entry_of_the_config(model, syn_dir, tmp_path):
    config = defaults.reference_config()
    config.model = synthetic_model_config()
    config.data.dataset, config.data.data_dir, config.data.tfds_config = "synthetic", os.fspath(syn_dir), SYN
    config.eval.tasks = {"syn_clip": {"task": "synthetic", "strategy": "clip", "batch_size": 8}}
    res = evaluators.run(model, config, "syn_clip", step=11, output=tmp_path / "r.json")
    assert res["step"] == 11 and res["num_queries"] == 32 and (tmp_path / "r.png").exists()
    # The entry's settings, and the training dataset's builder config, were used.
    assert (res["settings"]["strategy"], res["settings"]["n_video_tokens"], res["settings"]["tfds_config"]) == (
        "clip", 12, SYN)


def test_cli_on_a_saved_checkpoint(model, syn_dir, tmp_path):
    config = ckpt.config_from_json({"model": synthetic_model_config().to_dict(), "loss": loss_config().to_dict()})
    ckpt.save_model(tmp_path / "ckpt", 7, ckpt.model_variables(model), config)
    out = tmp_path / "cli" / "results.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Relative paths everywhere (checkpoint, data_dir, output), as a user types them.
    proc = subprocess.run(
        [sys.executable, "-m", "eao_jax.evaluate", "--task=synthetic", "--checkpoint=ckpt",
         f"--data_dir={os.path.relpath(syn_dir, tmp_path)}", f"--tfds_config={SYN}", "--output=cli/results.json",
         "--batch_size=8"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "orbax" not in proc.stderr.lower(), proc.stderr[-3000:]  # as quiet as main: no Orbax INFO dump
    res = json.loads(out.read_text())
    assert res["step"] == 7 and res["checkpoint"] == os.fspath(tmp_path / "ckpt")
    assert res["num_queries"] == 32 and "t2v" in proc.stdout and "evaluated 32 of 32" in proc.stdout
    assert out.with_suffix(".png").exists()
    # Same numbers as evaluating the in-memory model.
    direct = evaluators.evaluate(model, "synthetic", data_dir=syn_dir, tfds_config=SYN, batch_size=8)
    for d in ret_lib.DIRECTIONS:
        for key in ("R1", "R5", "R10", "MedR"):
            assert res["metrics"][d][key] == pytest.approx(direct["metrics"][d][key], abs=1e-6), (d, key)
