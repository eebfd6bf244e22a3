"""Step localisation (CrossTask, Mining YouTube, synthetic `localization`): T x K cosine
similarities between the K step texts (`text_embed`) and the T one-second windows of a video
(`v+a` late fusion or the fused pair `va`, each window eval.clip long), decoded per video; recall per
task and the mean (CrossTask: over the 18 primary tasks unless the task sets all_tasks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import ml_collections
import numpy as np

from eao_jax import distributed
from eao_jax.evaluation import localisation as loc_lib
from eao_jax.evaluation import report
from eao_jax.evaluators.embedder import Embedder, check_feature_dims, embed_rows

if TYPE_CHECKING:
    from eao_jax.evaluators import EvalContext
    from eao_jax.model.eao import EverythingAtOnce

EMBEDDINGS = ("v+a", "va")
DECODER_ALIASES = {"argmax": "argmax_frame"}  # MCN's alternative predictor labels each window
DECODERS = loc_lib.DECODERS + tuple(DECODER_ALIASES)
WINDOW_KEYS = ("video", "video_mask", "audio", "audio_mask", "audio_STFT_nframes")
STEP_BATCH = 16  # step texts per process and forward (a second compiled shape)


def check(entry: ml_collections.ConfigDict, where: str) -> None:
    """Raises ValueError starting with `where` + the setting, for a setting this evaluator cannot run."""
    if entry.embedding not in EMBEDDINGS:
        raise ValueError(f"{where}embedding must be one of {', '.join(EMBEDDINGS)}, got {entry.embedding!r}")
    if entry.decoder not in DECODERS:
        raise ValueError(f"{where}decoder must be one of {', '.join(DECODERS)}, got {entry.decoder!r}")
    if entry.convention not in loc_lib.CONVENTIONS:
        raise ValueError(f"{where}convention must be one of {', '.join(loc_lib.CONVENTIONS)}, "
                         f"got {entry.convention!r}")
    if entry.log_softmax not in (None, True, False):
        raise ValueError(f"{where}log_softmax must be true, false or None (auto), got {entry.log_softmax!r}")


def check_model(model: EverythingAtOnce, embedding: str) -> None:
    """Raises ValueError when the model cannot make the window embedding `embedding`."""
    if not {"text", "video", "audio"} <= set(model.modalities):
        raise ValueError(f"localisation with {embedding!r} needs a text-video-audio model; "
                         f"this one has {model.modalities}")
    if embedding == "va" and model.per_modality_fusion:
        raise ValueError("embedding 'va' needs fused pairs; model.fusion='per_modality' has none (use 'v+a')")


def localisation_scores(embedder: Embedder, video: Mapping[str, Any], *, embedding: str, batch_size: int,
                        step_batch_size: int) -> np.ndarray:
    """(T, K) cosine similarities between a video's T windows (`embedding`: 'v+a' or 'va') and its
    K step texts. Windows go in padded chunks of `batch_size` rows per process, steps in chunks of
    `step_batch_size` (two compiled shapes for the whole benchmark)."""
    key = f"{embedding}_embed"
    windows = {k: np.asarray(video[k]) for k in WINDOW_KEYS}
    steps = {k: np.asarray(video[k]) for k in ("text", "text_mask")}
    if windows["video"].shape[0] == 0 or steps["text"].shape[0] == 0:
        raise ValueError(f"video {video.get('id')!r}: no windows or no steps "
                         f"(T={windows['video'].shape[0]}, K={steps['text'].shape[0]})")
    win = embed_rows(embedder, windows, batch_size, [key])[key]
    txt = embed_rows(embedder, steps, step_batch_size, ["text_embed"])["text_embed"]
    return loc_lib.step_similarity(np.asarray(txt, np.float32), np.asarray(win, np.float32))


def evaluate(model: EverythingAtOnce, entry: ml_collections.ConfigDict, ctx: EvalContext,
             max_videos: int | None = None) -> dict[str, Any]:
    """Localisation results (recall per task and mean, in percent) of `model` on the entry's split."""
    from eao_jax.data import pipelines  # noqa: PLC0415 (TFDS / grain only when evaluating)

    check_model(model, entry.embedding)
    decoder = DECODER_ALIASES.get(entry.decoder, entry.decoder)
    key = f"{entry.embedding}_embed"
    embedder = Embedder(model, mesh=ctx.mesh, cross_modal=entry.embedding == "va", outputs=(key, "text_embed"))
    bs = embedder.round_batch_size(int(entry.batch_size))
    step_bs = embedder.round_batch_size(STEP_BATCH)
    data = pipelines.load_localization(entry.dataset, ctx.data_dir, entry.split, config=ctx.tfds_config,
                                       n_video_tokens=int(ctx.clip["n_video_tokens"]), n_stft=int(ctx.clip["n_stft"]),
                                       max_words=ctx.max_words)
    check_feature_dims(model, data.dataset.video_dim, data.table.dim, f"{entry.dataset}/{entry.split}",
                       ctx.tfds_config)
    n_videos = len(data) if max_videos is None else min(len(data), max_videos)
    distributed.log_if_main("%s: %d videos, windows in batches of %d per process", entry.task, n_videos, bs)

    def scored():
        for i in range(n_videos):
            video = data[i]
            scores = localisation_scores(embedder, video, embedding=entry.embedding, batch_size=bs,
                                         step_batch_size=step_bs)
            yield str(video["id"]), str(video.get("task", "")), scores, video["annotation"]

    summary = loc_lib.evaluate_localisation(
        scored(), entry.benchmark, decoder=decoder, log_softmax=entry.log_softmax, convention=entry.convention,
        tasks=None if entry.get("all_tasks", False) else loc_lib.CROSSTASK_PRIMARY_TASKS)
    summary["settings"].update(embedding=entry.embedding, dataset=entry.dataset, split=entry.split,
                               tfds_config=ctx.tfds_config)
    return report.localisation_results(entry.task, summary, checkpoint=ctx.checkpoint, step=ctx.step)
