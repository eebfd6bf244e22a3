"""Text-video retrieval (MSR-VTT `test`, YouCook2 `val`, synthetic `retrieval`): every item of the
split embedded once, all 18 directions the model's modalities allow, R@k over the complete split
(items the release lacks count as misses).

Long-video strategies (`strategy`), with the lengths of eval.at_once[dataset] (AT) and eval.clip (CLIP):
  at_once         the whole clip in one pass, AT video tokens / STFT frames (the paper's main setting)
  clip            the first CLIP tokens / frames (8 s)
  nearest         video nearest-resampled to CLIP tokens; the AT audio, whose DAVEnet tokens are
                  nearest-resampled inside the model to the tokens CLIP frames give
  max_pool        the same with max pooling
  clips_average   cut into AT / CLIP consecutive CLIP-long pieces, embed each, average the raw
                  embeddings per item (pieces with at most 70 percent real audio dropped)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from eao_jax import distributed
from eao_jax.evaluation import report
from eao_jax.evaluation import retrieval as ret_lib
from eao_jax.evaluators.embedder import Embedder, check_feature_dims

if TYPE_CHECKING:
    from eao_jax.evaluators import EvalContext
    from eao_jax.model.eao import EverythingAtOnce

STRATEGIES = ("at_once", "clip", "nearest", "max_pool", "clips_average")


def check(entry: ml_collections.ConfigDict, where: str) -> None:
    """Raises ValueError starting with `where` + the setting, for a setting this evaluator cannot run."""
    if entry.strategy not in STRATEGIES:
        raise ValueError(f"{where}strategy must be one of {', '.join(STRATEGIES)}, got {entry.strategy!r}")


def input_lengths(strategy: str, at_once: Mapping[str, int], clip: Mapping[str, int],
                  audio_downsampling: int) -> dict[str, Any]:
    """What `strategy` feeds the model: {n_video_tokens, n_stft, video_strategy, cut_clips,
    audio_pooling: (mode, tokens) or None (the model's own)} (see the module docstring)."""
    at_v, at_a = int(at_once["n_video_tokens"]), int(at_once["n_stft"])
    clip_v, clip_a = int(clip["n_video_tokens"]), int(clip["n_stft"])
    out = dict(n_video_tokens=clip_v, n_stft=clip_a, video_strategy="clip", cut_clips=0, audio_pooling=None)
    if strategy == "at_once":
        out.update(n_video_tokens=at_v, n_stft=at_a)
    elif strategy in ("nearest", "max_pool"):
        out.update(n_stft=at_a, video_strategy=strategy, audio_pooling=(strategy, clip_a // audio_downsampling))
    elif strategy == "clips_average":
        out.update(cut_clips=at_v // clip_v)
    elif strategy != "clip":
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    return out


def lengths_for(model: EverythingAtOnce, entry: ml_collections.ConfigDict, ctx: EvalContext) -> dict[str, Any]:
    """`input_lengths` of an entry, with its dataset's "at once" lengths."""
    if entry.dataset not in ctx.at_once:
        raise ValueError(f"eval.at_once has no lengths for {entry.dataset!r} (known: {', '.join(ctx.at_once)})")
    return input_lengths(entry.strategy, ctx.at_once[entry.dataset], ctx.clip, model.audio_downsampling)


def retrieval_embeddings(embedder: Embedder, batches: Iterable[Mapping[str, np.ndarray]], *,
                         clips_average: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Embeds padded retrieval batches (with `valid` and `index`) and returns (item indices (N,),
    {embedding name: (N, D) raw model outputs}) in index order; with `clips_average`, rows sharing an
    index are averaged (raw, before normalisation) and invalid (dropped) clips are removed."""
    rows: dict[str, list[np.ndarray]] = {}
    index_parts, valid_parts = [], []
    for batch in batches:
        out = embedder(batch, {"index": batch["index"], "valid": batch["valid"]})
        for k, v in out.items():
            if k.endswith("_embed"):
                rows.setdefault(k, []).append(np.asarray(v, np.float32))
        index_parts.append(out["index"])
        valid_parts.append(out["valid"])
    if not index_parts:
        raise ValueError("the retrieval split yielded no batch")
    index = np.concatenate(index_parts).astype(np.int64)
    valid = np.concatenate(valid_parts).astype(bool) & (index >= 0)
    embeds = {k: np.concatenate(v) for k, v in rows.items()}
    if clips_average:
        ids, embeds = ret_lib.average_embeddings_by_id(np.where(valid, index, -1), embeds)
        items = np.asarray(ids, np.int64)
    else:
        items = index[valid]
        embeds = {k: v[valid] for k, v in embeds.items()}
        if len(np.unique(items)) != len(items):
            raise ValueError("an item was embedded twice (duplicate `index` in the retrieval batches)")
    order = np.argsort(items, kind="stable")
    return items[order], {k: v[order] for k, v in embeds.items()}


def evaluate(model: EverythingAtOnce, entry: ml_collections.ConfigDict, ctx: EvalContext) -> dict[str, Any]:
    """The RESULTS.json dict (with `settings`) of `model` on the entry's split, plus `_ranks`
    {direction: (N,) ranks} (not JSON: popped by the writers) for the recall@K plot."""
    from eao_jax.data import pipelines  # noqa: PLC0415 (TFDS / grain only when evaluating)

    s = lengths_for(model, entry, ctx)
    if entry.strategy == "at_once" and getattr(model, "pos_embed", None) is not None:
        n = model.pos_embed["video"][...].shape[0]
        raise ValueError(f"the model has positional embeddings for {n}-token clips: evaluate it with strategy "
                         f"clip|nearest|max_pool|clips_average, not at once ({s['n_video_tokens']} video tokens)")
    embedder = Embedder(model, mesh=ctx.mesh, audio_pooling=s["audio_pooling"])
    bs = int(entry.batch_size)  # items per process and step; each becomes cut_clips rows with clips_average
    while (bs * max(1, s["cut_clips"])) % embedder.rows_per_process:
        bs += 1
    data = pipelines.load_retrieval(entry.dataset, ctx.data_dir, entry.split, config=ctx.tfds_config, batch_size=bs,
                                    n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"], max_words=ctx.max_words,
                                    video_strategy=s["video_strategy"], cut_clips=s["cut_clips"])
    check_feature_dims(model, data.video_dim, data.text_dim, f"{entry.dataset}/{entry.split}", ctx.tfds_config)
    distributed.log_if_main("%s (%s): %d of %d items, %d batches of %d per process", entry.task, entry.strategy,
                            data.num_items, data.complete_dataset_size, data.num_batches, bs)
    items, embeds = retrieval_embeddings(embedder, data, clips_average=bool(s["cut_clips"]))
    if len(items) != data.num_items:
        raise ValueError(f"{entry.task}: embedded {len(items)} items, the split has {data.num_items}")
    ranks = ret_lib.direction_ranks(embeds)
    metrics = {d: ret_lib.metrics_from_ranks(r, data.complete_dataset_size) for d, r in ranks.items()}
    results = report.retrieval_results(entry.task, metrics, len(items), data.complete_dataset_size,
                                       checkpoint=ctx.checkpoint, step=ctx.step)
    pooling = s["audio_pooling"][0] if s["audio_pooling"] else getattr(model, "audio_pooling", "none")
    results["settings"] = dict(strategy=entry.strategy, dataset=entry.dataset, split=entry.split,
                               tfds_config=ctx.tfds_config, n_video_tokens=s["n_video_tokens"], n_stft=s["n_stft"],
                               max_words=ctx.max_words, video_strategy=s["video_strategy"],
                               cut_clips=s["cut_clips"], audio_pooling=pooling)
    results["_ranks"] = ranks
    return results
