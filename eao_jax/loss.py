"""The combinatorial contrastive loss over the six modality combinations, with static shapes.

The original selects the items that have both sides of a term by boolean indexing. Here every term
sees the whole (global) batch: items lacking a side are removed as anchors (their rows and columns
get no loss) and as negatives (their logits are -inf), and each direction is averaged over the
valid count. A term with no valid item, or weight 0, is left out of the weighted mean.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections

from eao_jax.model.eao import l2_normalize

# (term, first embedding, second embedding, modalities that must be present)
TERMS = (
    ("tv", "text_embed", "video_embed", ("text", "video")),
    ("ta", "text_embed", "audio_embed", ("text", "audio")),
    ("va", "video_embed", "audio_embed", ("video", "audio")),
    ("t_va", "text_embed", "va_embed", ("text", "video", "audio")),
    ("v_ta", "video_embed", "ta_embed", ("text", "video", "audio")),
    ("a_tv", "audio_embed", "tv_embed", ("text", "video", "audio")),
)
LOSSES = ("NormSoftmax", "MMS")


def validate_loss_config(cfg: ml_collections.ConfigDict) -> None:
    if cfg.name not in LOSSES:
        raise ValueError(f"loss.name must be one of {LOSSES}, got {cfg.name!r}")
    if not cfg.temperature > 0:
        raise ValueError(f"loss.temperature must be > 0, got {cfg.temperature}")
    names = {t[0] for t in TERMS}
    for k, w in cfg.weights.items():
        if k not in names:
            raise ValueError(f"loss.weights.{k} is not a term; terms are {sorted(names)}")
        if w < 0:
            raise ValueError(f"loss.weights.{k} must be >= 0, got {w}")
    if sum(cfg.weights.values()) <= 0:
        raise ValueError("loss.weights are all zero: nothing to train")


def masked_contrastive(x: jax.Array, y: jax.Array, valid: jax.Array, *, name: str = "NormSoftmax",
                       temperature: float = 0.05, margin: float = 0.001) -> tuple[jax.Array, jax.Array]:
    """Symmetric contrastive loss between rows of x (N, P) and y (N, P); row i's positive is row i.

    NormSoftmax: -mean_i log softmax_row(S/τ)_ii - mean_j log softmax_col(S/τ)_jj with S the cosine
    similarities. MMS: the same on S - margin·I without temperature. Only items with valid (N,)
    take part. Returns (loss, number of valid items); the loss is 0 when no item is valid.
    """
    xn, yn = l2_normalize(x), l2_normalize(y)
    sim = xn @ yn.T  # (N, N)
    pos = jnp.sum(xn * yn, axis=-1)  # diagonal without gathering: sharding-friendly
    if name == "NormSoftmax":
        sim, pos = sim / temperature, pos / temperature
    elif name == "MMS":
        n = sim.shape[0]
        sim = sim - margin * jnp.eye(n, dtype=sim.dtype)
        pos = pos - margin
    else:
        raise ValueError(f"loss.name must be one of {LOSSES}, got {name!r}")
    pair_ok = valid[:, None] & valid[None, :]
    logits = jnp.where(pair_ok, sim, -jnp.inf)
    # Invalid rows would be all -inf: give them a harmless finite row, they are masked out below.
    safe = jnp.where(valid[:, None], logits, 0.0)
    safe_t = jnp.where(valid[:, None], logits.T, 0.0)
    row = jax.nn.logsumexp(safe, axis=1) - pos
    col = jax.nn.logsumexp(safe_t, axis=1) - pos
    count = valid.sum()
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    loss = (jnp.where(valid, row, 0.0).sum() + jnp.where(valid, col, 0.0).sum()) / denom
    return loss, count


def combinatorial_loss(outputs: Mapping[str, jax.Array], cfg: ml_collections.ConfigDict
                       ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted mean of the contrastive terms present in `outputs` (model embeddings + nonempty masks).

    Returns (loss, info) where info holds each term's value and valid count (`{term}_count`) and
    `total`; a term absent from the batch (no valid item) reports 0 and does not count in the mean.
    """
    loss_sum = jnp.zeros((), jnp.float32)
    weight_sum = jnp.zeros((), jnp.float32)
    info: dict[str, jax.Array] = {}
    for term, e1, e2, mods in TERMS:
        weight = float(cfg.weights.get(term, 0.0))
        if weight == 0 or e1 not in outputs or e2 not in outputs:
            continue
        valid = outputs[f"{mods[0]}_nonempty_input_mask"]
        for m in mods[1:]:
            valid = valid & outputs[f"{m}_nonempty_input_mask"]
        value, count = masked_contrastive(outputs[e1], outputs[e2], valid, name=cfg.name,
                                          temperature=cfg.temperature, margin=cfg.get("mms_margin", 0.001))
        present = (count > 0).astype(jnp.float32)
        info[term] = value
        info[f"{term}_count"] = count
        loss_sum = loss_sum + weight * value * present
        weight_sum = weight_sum + weight * present
    if not info:
        raise ValueError("no loss term applies: check loss.weights and model.modalities / cross_modal")
    total = loss_sum / jnp.maximum(weight_sum, 1e-12)
    info["total"] = total
    return total, info
