r"""Attention analysis: how much each modality's tokens attend to each modality, per block and head.

  python -m eao_jax.attention --checkpoint=DIR --task=youcook2 --data_dir=TFDS_DIR --output=attention.png \
      [--num_items=16] [--strategy=at_once] [--groups=tva | t,v,a | tv,a] [--tfds_config=...]

For a batch of evaluation items (the task's "at once" inputs by default) the model runs one fusion
pass in which the modalities of each group attend to each other (default: text, video and audio all
in one group, the tri-modal joint pass that shows cross-modal attention). For every block, head h,
query modality q and key modality k it reports

    A[h, q, k] = mean over the valid query tokens of modality q (over the batch) of
                 sum over the key tokens of modality k of the attention weight,

the share of a q-token's attention that goes to modality k. Each row A[h, q, :] sums to 1 over the
key modalities; padded (masked) keys get zero weight. An empty modality is represented by the
model's masking token, which counts as one valid token (as the model sees it). With a CLS token
(ablation) the CLS positions form a "cls" row and column.

Writes the heat maps (mean over heads, and every head) as a PNG and the numbers as JSON next to it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import flags

from eao_jax import defaults
from eao_jax.evaluation.report import save_png
from eao_jax.evaluators.embedder import cached_jit
from eao_jax.lazy import lazy_import

if TYPE_CHECKING:
    from eao_jax.model.eao import EverythingAtOnce

# Imported on first use, so that `--help` answers without loading JAX / Flax.
jax = lazy_import("jax")
jnp = lazy_import("jax.numpy")
nnx = lazy_import("flax.nnx")
eao = lazy_import("eao_jax.model.eao")

CLS = "cls"


def parse_groups(spec: str | Sequence[Sequence[str]] | None, modalities: Sequence[str]) -> tuple[tuple[str, ...], ...]:
    """'tva' / 't,v,a' / 'tv,a' / [['text', 'video'], ['audio']] -> groups of modality names.

    None: all of the model's modalities in one group. Every model modality must appear once.
    """
    if spec is None:
        return (tuple(modalities),)
    long = {v: k for k, v in eao.SHORT.items()}
    if isinstance(spec, str):
        spec = [[long.get(c, c) for c in part.strip()] for part in spec.split(",") if part.strip()]
    groups = tuple(tuple(m for m in eao.MODALITIES if m in g) for g in spec)
    flat = [m for g in spec for m in g]
    if sorted(flat) != sorted(modalities) or any(not g for g in groups):
        raise ValueError(f"groups {spec!r} must list each of the model's modalities {tuple(modalities)} exactly once")
    return groups


def modality_attention(model: EverythingAtOnce, batch: Mapping[str, np.ndarray],
                       groups: str | Sequence[Sequence[str]] | None = None,
                       valid: np.ndarray | None = None,
                       audio_pooling: tuple[str, int] | None = None) -> dict[str, Any]:
    """Mean attention per (query modality, key modality) and head for one pass over `batch`.

    Args:
      model: a model with a shared fusion transformer (`model.fusion='shared'`), used in eval mode.
      batch: model inputs (the batch contract), B items.
      groups: the pass (see `parse_groups`); default: all modalities attend to each other.
      valid: (B,) bool, items to average over (default all; padded rows of eval batches excluded).
      audio_pooling: (mode, tokens) overriding the model's audio pooling (retrieval strategies).
    Returns:
      {"labels": [M names], "groups": [[...]], "per_head": (depth, H, M, M), "mean": (depth, M, M)
       (mean over heads), "query_tokens": (M,) number of valid query tokens averaged per label}.
      Rows of per_head / mean sum to 1 over the key axis (for labels with query tokens).
    """
    if model.per_modality_fusion:
        raise ValueError("attention analysis needs model.fusion='shared' (one transformer over all modalities)")
    groups = parse_groups(groups, model.modalities)
    inputs = {k: np.asarray(v) for k, v in batch.items() if k.split("_")[0] in model.modalities}
    b = next(iter(inputs.values())).shape[0]
    valid = np.ones((b,), bool) if valid is None else np.asarray(valid, bool).reshape(b)
    graphdef, state = nnx.split(model)
    run, static = _attention_fn(graphdef, groups, audio_pooling)
    per_head, count = jax.device_get(run(state, inputs, jnp.asarray(valid)))
    if per_head.shape[0] == 0:
        raise ValueError("the model has no fusion block (model.depth=0): there is no attention to analyse")
    return {"labels": static["labels"], "groups": [list(g) for g in groups], "per_head": np.asarray(per_head),
            "mean": np.asarray(per_head).mean(axis=1), "query_tokens": np.asarray(count)}


def _attention_fn(graphdef: nnx.GraphDef, groups: tuple[tuple[str, ...], ...],
                  audio_pooling: tuple[str, int] | None) -> tuple[Any, dict]:
    """(jitted (state, inputs, valid) -> (per_head (depth, H, M, M), count (M,)), dict that receives
    the labels when tracing), cached per model structure and pass (the evaluators' cache)."""
    return cached_jit(graphdef, ("attention", groups, audio_pooling), lambda: _build_attention_fn(
        graphdef, groups, audio_pooling))


def _build_attention_fn(graphdef: nnx.GraphDef, groups: tuple[tuple[str, ...], ...],
                        audio_pooling: tuple[str, int] | None) -> tuple[Any, dict]:
    static: dict[str, Any] = {}

    @jax.jit
    def run(state, inputs, valid):
        m = nnx.merge(graphdef, state)
        m.eval()
        res = m.attention_maps(inputs, [groups], audio_pooling=audio_pooling)
        spans, n_cls = res["spans"], res["n_cls"]
        b = valid.shape[0]
        length = max(e for _, e in spans.values())
        labels = ([CLS] if n_cls else []) + [x for x in eao.MODALITIES if x in spans]
        onehot = np.zeros((length, len(labels)), np.float32)  # position -> label
        if n_cls:
            onehot[:n_cls, 0] = 1.0
        for x, (s, e) in spans.items():
            onehot[s:e, labels.index(x)] = 1.0
        static["labels"] = labels  # trace-time side output (python values cannot leave jit)
        masks = res["masks"]
        qvalid = jnp.concatenate([jnp.ones((b, n_cls), bool)] + [masks[x] for x in eao.MODALITIES if x in spans], 1)
        qw = (qvalid & valid[:, None]).astype(jnp.float32)  # (B, L)
        oh = jnp.asarray(onehot)
        count = jnp.einsum("bi,iq->q", qw, oh)
        per_block = []
        for w in res["weights"]:  # (B, H, L, L), one pass
            mass = jnp.einsum("bhij,jk->bhik", w.astype(jnp.float32), oh)  # share of each query on each label
            per_block.append(jnp.einsum("bi,iq,bhik->hqk", qw, oh, mass) / jnp.maximum(count, 1.0)[None, :, None])
        return jnp.stack(per_block) if per_block else jnp.zeros((0, 1, len(labels), len(labels))), count

    return run, static


def attention_json(result: Mapping[str, Any], **extra: Any) -> dict[str, Any]:
    """The JSON document: labels, groups, per block the mean (M, M) and per-head (H, M, M) shares."""
    return {**extra, "labels": list(result["labels"]), "groups": result["groups"],
            "query_tokens": {lab: float(c) for lab, c in zip(result["labels"], result["query_tokens"], strict=True)},
            "blocks": [{"mean": np.round(m, 6).tolist(), "per_head": np.round(h, 6).tolist()}
                       for m, h in zip(result["mean"], result["per_head"], strict=True)]}


def plot_attention(path: str | os.PathLike, result: Mapping[str, Any], title: str | None = None) -> None:
    """Heat maps per block: mean over heads (query x key modality, annotated) and every head
    (rows: heads, columns: query->key pairs)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415

    labels = list(result["labels"])
    short = [eao.SHORT.get(x, x) for x in labels]
    per_head, mean = np.asarray(result["per_head"]), np.asarray(result["mean"])
    depth, heads, m, _ = per_head.shape
    fig = Figure(figsize=(4.0 + max(4.0, 0.45 * m * m), 1.0 + 3.2 * depth), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(depth, 2, squeeze=False, gridspec_kw={"width_ratios": [1.0, max(1.2, 0.12 * m * m)]})
    for d in range(depth):
        ax = axes[d, 0]
        im = ax.imshow(mean[d], vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_xticks(range(m), labels=[f"{s}" for s in short])
        ax.set_yticks(range(m), labels=[f"{s}" for s in short])
        ax.set_xlabel("key modality")
        ax.set_ylabel("query modality")
        ax.set_title(f"block {d}: mean over {heads} heads")
        for q in range(m):
            for k in range(m):
                ax.text(k, q, f"{mean[d, q, k]:.2f}", ha="center", va="center",
                        color="white" if mean[d, q, k] < 0.5 else "black", fontsize=8)
        ax2 = axes[d, 1]
        ax2.imshow(per_head[d].reshape(heads, m * m), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto",
                   interpolation="nearest")
        ax2.set_xticks(range(m * m), labels=[f"{short[q]}>{short[k]}" for q in range(m) for k in range(m)],
                       rotation=90, fontsize=7)
        ax2.set_yticks(range(0, heads, max(1, heads // 8)))
        ax2.set_ylabel("head")
        ax2.set_title(f"block {d}: per head (query>key)")
        fig.colorbar(im, ax=ax2, fraction=0.03)
    if title:
        fig.suptitle(title)
    save_png(fig, path)


def analyse_checkpoint(checkpoint: str, task: str, output: str | os.PathLike, *, data_dir: str | None = None,
                       step: int | None = None, num_items: int = 16, strategy: str = "at_once",
                       groups: str | None = None, tfds_config: str | None = None) -> dict[str, Any]:
    """Restores `checkpoint`, runs `modality_attention` on the first `num_items` items of a retrieval
    task's split and writes OUTPUT.png and OUTPUT.json. Returns the JSON document.

    `checkpoint` is a convert output, a training WORKDIR or its checkpoints/ folder; `data_dir`
    defaults to the one the checkpoint's config names (eval.data_dir, else data.data_dir), as in
    `evaluate`."""
    import json  # noqa: PLC0415

    from eao_jax import checkpoint as ckpt  # noqa: PLC0415
    from eao_jax import evaluators  # noqa: PLC0415
    from eao_jax.data import pipelines  # noqa: PLC0415
    from eao_jax.evaluators import retrieval  # noqa: PLC0415

    entry = defaults.eval_entry(task, {"strategy": strategy, "tfds_config": tfds_config}, where=f"{task}: ")
    if entry.type != "retrieval":
        raise ValueError(f"attention analysis reads the items of a retrieval task, not {task!r}")
    retrieval.check(entry, "--")
    if strategy == "clips_average":
        raise ValueError("attention analysis takes one pass per item: use at_once, clip, nearest or max_pool")
    model, config, step = ckpt.load_model(checkpoint, step)
    checkpoint = ckpt.checkpoint_root(checkpoint)
    ctx = evaluators.context(model, entry, config, data_dir=data_dir)
    s = retrieval.lengths_for(model, entry, ctx)
    if entry.dataset == "synthetic":  # prepared on demand, as in evaluate
        from eao_jax.prepare import prepare_once  # noqa: PLC0415

        prepare_once("synthetic", ctx.data_dir, ctx.tfds_config)
    data = pipelines.load_retrieval(entry.dataset, ctx.data_dir, entry.split, config=ctx.tfds_config,
                                    batch_size=num_items, n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"],
                                    max_words=ctx.max_words, video_strategy=s["video_strategy"], process_index=0,
                                    process_count=1)
    batch = next(iter(data))
    result = modality_attention(model, batch, groups, valid=batch["valid"], audio_pooling=s["audio_pooling"])
    doc = attention_json(result, task=task, checkpoint=os.fspath(checkpoint), step=step,
                         num_items=int(np.count_nonzero(batch["valid"])), strategy=strategy)
    png = os.fspath(output)
    plot_attention(png, result, title=f"{task} ({strategy}), step {step}")
    with open(os.path.splitext(png)[0] + ".json", "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")
    return doc


FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    del argv
    from eao_jax import console  # noqa: PLC0415

    console.quiet_libraries()
    doc = analyse_checkpoint(FLAGS.checkpoint, FLAGS.task, FLAGS.output, data_dir=FLAGS.data_dir, step=FLAGS.step,
                             num_items=FLAGS.num_items, strategy=FLAGS.strategy, groups=FLAGS.groups,
                             tfds_config=FLAGS.tfds_config)
    labels = doc["labels"]
    for d, block in enumerate(doc["blocks"]):
        print(f"block {d}: mean attention share (rows: query, columns: key) over {doc['num_items']} items")
        print("      " + "".join(f"{lab:>8}" for lab in labels))
        for lab, row in zip(labels, block["mean"], strict=True):
            print(f"{lab:>6}" + "".join(f"{v:8.3f}" for v in row))
    print(f"wrote {FLAGS.output} and {os.path.splitext(FLAGS.output)[0]}.json")


if __name__ == "__main__":
    flags.DEFINE_string("checkpoint", None, "Orbax checkpoint: convert output, training workdir or its "
                        "checkpoints/ folder.", required=True)
    flags.DEFINE_enum("task", None, ["msrvtt", "youcook2", "synthetic"], "Retrieval task whose items to use.",
                      required=True)
    flags.DEFINE_string("output", None, "Output PNG (the numbers go to the same name with .json).", required=True)
    flags.DEFINE_string("data_dir", None, "TFDS data_dir of the prepared dataset (default: the checkpoint "
                        "config's eval.data_dir or data.data_dir).")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_integer("num_items", 16, "Items in the analysed batch.")
    flags.DEFINE_enum("strategy", "at_once", ["at_once", "clip", "nearest", "max_pool"], "Input lengths.")
    flags.DEFINE_string("groups", None, "Modalities attending to each other, e.g. 'tva' (default) or 'tv,a'.")
    flags.DEFINE_string("tfds_config", None, "Builder config of the dataset (default: the prepared default).")
    from eao_jax import console  # noqa: PLC0415

    console.run("attention", main)
