"""The Everything-at-Once model: token projections, fusion passes, pooled output embeddings.

All modality combinations come from masked passes over one concatenated `[t | v | a]` sequence.
A *pass* partitions the modalities into *groups*; tokens attend only to valid tokens of their own
group. With no positional information beyond the optional per-modality embedding, a group behaves
exactly like a separate forward on just its modalities, so `{tv | a}`, `{ta | v}`, `{va | t}` give
all six embeddings with the token work of six passes, stacked on the batch axis as one transformer
call.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from eao_jax.model.audio import DAVEnet, check_audio_length, downsample_audio_mask, pool_audio_tokens
from eao_jax.model.fusion import FusionTransformer
from eao_jax.model.layers import Projection, layer_norm, vit_normal

MODALITIES = ("text", "video", "audio")  # fixed concatenation order, as the original
SHORT = {"text": "t", "video": "v", "audio": "a"}
Group = tuple[str, ...]
Pass = tuple[Group, ...]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def l2_normalize(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """x / max(||x||, eps) along the last axis (the original's normalize_embeddings)."""
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def pair_name(group: Group) -> str:
    return "".join(SHORT[m] for m in group)


def validate_model_config(cfg: ml_collections.ConfigDict) -> None:
    """Fail early, naming the field, on values the model cannot build."""
    mods = tuple(cfg.modalities)
    if not mods or any(m not in MODALITIES for m in mods) or len(set(mods)) != len(mods):
        raise ValueError(f"model.modalities must be distinct names from {MODALITIES}, got {mods}")
    if tuple(m for m in MODALITIES if m in mods) != mods:
        raise ValueError(f"model.modalities must follow the order {MODALITIES}, got {mods}")
    for field in ("embed_dim", "projection_dim", "video_dim", "text_dim", "num_heads"):
        if int(cfg[field]) <= 0:
            raise ValueError(f"model.{field} must be positive, got {cfg[field]}")
    if cfg.depth < 0:
        raise ValueError(f"model.depth must be >= 0, got {cfg.depth}")
    if cfg.embed_dim % cfg.num_heads:
        raise ValueError(f"model.embed_dim={cfg.embed_dim} is not divisible by model.num_heads={cfg.num_heads}")
    for field in ("token_projection", "projection"):
        if cfg[field] not in ("gated", "linear"):
            raise ValueError(f"model.{field} must be 'gated' or 'linear', got {cfg[field]!r}")
    if cfg.fusion not in ("shared", "per_modality"):
        raise ValueError(f"model.fusion must be 'shared' or 'per_modality', got {cfg.fusion!r}")
    if cfg.fusion == "per_modality" and cfg.use_cls_token:
        raise ValueError("model.use_cls_token needs model.fusion='shared'")
    if cfg.use_cls_token and cfg.individual_projections:
        raise ValueError("model.use_cls_token needs model.individual_projections=False (one shared projection)")
    if cfg.audio_pooling not in ("none", "clip", "nearest", "max_pool", "avg_pool"):
        raise ValueError(f"model.audio_pooling must be none|clip|nearest|max_pool|avg_pool, got {cfg.audio_pooling!r}")
    if cfg.dtype not in DTYPES:
        raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {cfg.dtype!r}")


class EverythingAtOnce(nnx.Module):
    """Embeds text, video and audio alone or in pairs into one space.

    Inputs (a batch dict): video (B, Nv, video_dim), video_mask (B, Nv); text (B, Nt, text_dim),
    text_mask (B, Nt); audio (B, n_mels, T) log-mel with audio_mask (B, T) and optionally
    audio_STFT_nframes (B,). Outputs: see `__call__`.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
        validate_model_config(cfg)
        self.modalities = tuple(cfg.modalities)
        self.dtype = DTYPES[cfg.dtype]
        dt = self.dtype
        d = cfg.embed_dim
        self.use_cls_token = bool(cfg.use_cls_token)
        self.per_modality_fusion = cfg.fusion == "per_modality"
        self.cross_modal = bool(cfg.cross_modal) and not self.per_modality_fusion and len(self.modalities) > 1
        self.audio_pooling = cfg.audio_pooling
        self.audio_pooling_tokens = int(cfg.audio_pooling_tokens)

        in_dims = {"video": cfg.video_dim, "text": cfg.text_dim}
        if "audio" in self.modalities:
            dv = cfg.davenet
            self.davenet = DAVEnet(n_mels=dv.n_mels, blocks=tuple(dv.blocks), widths=tuple(dv.widths),
                                   kernel=dv.kernel, bn_momentum=dv.bn_momentum, bn_eps=dv.bn_eps,
                                   rngs=rngs, dtype=dt, remat=cfg.remat)
            in_dims["audio"] = self.davenet.out_dim
        else:
            self.davenet = None

        self.token_proj = nnx.Dict({m: Projection(in_dims[m], d, cfg.token_projection, rngs=rngs, dtype=dt)
                                    for m in self.modalities})
        self.token_norm = nnx.Dict({m: layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dt)
                                    for m in self.modalities})
        self.masking_token = nnx.Param(vit_normal()(rngs.params(), (d,)))
        self.cls_token = nnx.Param(vit_normal()(rngs.params(), (d,))) if self.use_cls_token else None
        if cfg.use_positional_emb:
            lengths = {"video": cfg.max_video_tokens, "text": cfg.max_text_tokens, "audio": cfg.max_audio_tokens}
            self.pos_embed = nnx.Dict({m: nnx.Param(vit_normal()(rngs.params(), (lengths[m], d)))
                                       for m in self.modalities})
        else:
            self.pos_embed = None

        def transformer():
            return FusionTransformer(d, cfg.depth, cfg.num_heads, cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
                                     eps=cfg.layer_norm_eps, rngs=rngs, dtype=dt, remat=cfg.remat)

        if self.per_modality_fusion:
            self.fusion = nnx.Dict({m: transformer() for m in self.modalities})
        else:
            self.fusion = transformer()

        if cfg.individual_projections:
            self.proj = nnx.Dict({m: Projection(d, cfg.projection_dim, cfg.projection, rngs=rngs, dtype=dt)
                                  for m in self.modalities})
        else:
            self.proj = Projection(d, cfg.projection_dim, cfg.projection, rngs=rngs, dtype=dt)

    # ----------------------------------------------------------------------------------- inputs
    @property
    def input_dims(self) -> dict[str, int]:
        """Feature size of each input the model takes: the last axis of `video` and `text`
        (B, N, dim), the mel bands of `audio` (B, n_mels, T)."""
        dims = {m: int(self.token_proj[m].fc.in_features) for m in self.modalities if m != "audio"}
        if self.davenet is not None:
            dims["audio"] = int(self.davenet.n_mels)
        return dims

    @property
    def audio_downsampling(self) -> int:
        """STFT frames per audio token (DAVEnet halves the length in each stage)."""
        if self.davenet is None:
            raise ValueError(f"model.modalities={self.modalities} has no audio")
        return int(self.davenet.downsample)

    def check_audio_length(self, n_frames: int) -> None:
        """Raises ValueError for an audio length (STFT frames) the original cannot run either."""
        if self.davenet is None:
            raise ValueError(f"model.modalities={self.modalities} has no audio")
        check_audio_length(n_frames, len(self.davenet.stages))

    # ----------------------------------------------------------------------------------- tokens
    def embed_tokens(self, batch: Mapping[str, jax.Array], *, audio_pooling: tuple[str, int] | None = None
                     ) -> tuple[dict, dict, dict]:
        """Token projection + LayerNorm per modality, the masking token in slot 0 of empty inputs,
        then positional embeddings. Returns tokens {m: (B, N_m, D)}, masks {m: (B, N_m) bool} and
        nonempty {m: (B,) bool} (computed before the masking token is inserted).

        `audio_pooling` (mode, tokens) overrides the config's model.audio_pooling /
        audio_pooling_tokens for this call (evaluation strategies pool a trained model's audio).
        """
        pool_mode, pool_tokens = audio_pooling or (self.audio_pooling, self.audio_pooling_tokens)
        tokens, masks, nonempty = {}, {}, {}
        for m in self.modalities:
            for key in (m, f"{m}_mask"):
                if key not in batch:
                    raise KeyError(f"batch is missing '{key}' needed by model.modalities={self.modalities}")
            x = jnp.asarray(batch[m])
            mask = jnp.asarray(batch[f"{m}_mask"]) > 0
            if m == "audio":
                self.check_audio_length(x.shape[-1])  # any T the original runs
                x = self.davenet(x.astype(self.dtype))  # (B, ceil-halved T per stage, C)
                mask = downsample_audio_mask(mask, x.shape[1])
                if pool_mode != "none":
                    coef = -(-batch["audio_mask"].shape[1] // x.shape[1])
                    nframes = jnp.asarray(batch.get("audio_STFT_nframes", jnp.full(x.shape[:1], -1)))
                    # The original casts nframes / coef toward zero.
                    n_tok = jnp.trunc(nframes.astype(jnp.float32) / coef).astype(jnp.int32)
                    x, mask = pool_audio_tokens(x, mask, n_tok, int(pool_tokens), pool_mode)
            chex.assert_rank(x, 3)
            chex.assert_equal_shape_prefix((x, mask), 2)
            x = self.token_norm[m](self.token_proj[m](x.astype(self.dtype)))
            ne = mask.any(-1)
            first = jnp.arange(x.shape[1]) == 0
            fill = (~ne)[:, None] & first[None, :]  # (B, N) slot 0 of empty items
            x = jnp.where(fill[..., None], self.masking_token[...].astype(x.dtype), x)
            mask = mask | fill
            # The original's TransformerPerModalityModel builds positional embeddings but never adds them.
            if self.pos_embed is not None and not self.per_modality_fusion:
                pe = self.pos_embed[m][...]
                if x.shape[1] > pe.shape[0]:
                    raise ValueError(f"{m} has {x.shape[1]} tokens but the positional embedding covers "
                                     f"{pe.shape[0]} (model.max_{m}_tokens)")
                x = x + pe[: x.shape[1]].astype(x.dtype)
            tokens[m], masks[m], nonempty[m] = x, mask, ne
        return tokens, masks, nonempty

    # ----------------------------------------------------------------------------------- passes
    def default_passes(self, cross_modal: bool) -> list[Pass]:
        """Singles all in one pass; each pair in a pass with the remaining modality on its own."""
        mods = self.modalities
        if not cross_modal or len(mods) < 2:
            return [tuple((m,) for m in mods)]
        passes = []
        for pair in itertools.combinations(mods, 2):
            rest = tuple((m,) for m in mods if m not in pair)
            passes.append((pair,) + rest)
        if len(mods) == 2:  # {tv} alone does not give the singles
            passes.append(tuple((m,) for m in mods))
        return passes

    def run_passes(self, tokens: dict, masks: dict, passes: Sequence[Pass], *,
                   return_attention: bool = False) -> dict:
        """Runs `passes` as one transformer call over the concatenated sequence.

        Returns {group: pooled} where pooled is {m: (B, D)} masked means per modality of the group,
        or the group's CLS output (B, D) under `use_cls_token`.
        """
        mods = [m for m in MODALITIES if m in tokens]
        b = next(iter(tokens.values())).shape[0]
        n_groups = max(len(p) for p in passes)
        n_cls = n_groups if self.use_cls_token else 0
        spans, offset = {}, n_cls
        for m in mods:
            spans[m] = (offset, offset + tokens[m].shape[1])
            offset += tokens[m].shape[1]
        length = offset
        # Static group id of every position per pass; unused CLS slots get a group of their own.
        gid = np.zeros((len(passes), length), np.int32)
        for p, groups in enumerate(passes):
            for c in range(n_cls):
                gid[p, c] = c if c < len(groups) else n_groups + 1 + c
            for g, group in enumerate(groups):
                for m in group:
                    gid[p, spans[m][0]:spans[m][1]] = g
            covered = {m for group in groups for m in group}
            if covered != set(mods):
                for m in set(mods) - covered:  # isolate modalities a pass does not use
                    gid[p, spans[m][0]:spans[m][1]] = 2 * n_groups + 2 + MODALITIES.index(m)
        same_group = gid[:, :, None] == gid[:, None, :]  # (P, L, L)

        x = jnp.concatenate([tokens[m] for m in mods], axis=1)  # (B, L - n_cls, D)
        key_valid = jnp.concatenate([masks[m] for m in mods], axis=1)
        if n_cls:
            cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, n_cls, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)
            key_valid = jnp.concatenate([jnp.ones((b, n_cls), bool), key_valid], axis=1)
        n_pass = len(passes)
        # Passes are stacked batch-major, (B, P) -> B * P rows: the batch axis stays the leading one, so
        # a batch sharded over devices keeps its sharding through the reshape (pass-major stacking
        # would make GSPMD gather the whole global batch onto every device).
        xp = jnp.broadcast_to(x[:, None], (b, n_pass) + x.shape[1:]).reshape((b * n_pass,) + x.shape[1:])
        attn_mask = jnp.asarray(same_group)[None, :, None] & key_valid[:, None, None, None, :]
        attn_mask = attn_mask.reshape(b * n_pass, 1, length, length)
        if return_attention:
            weights = [w.reshape((b, n_pass) + w.shape[1:]).swapaxes(0, 1).reshape(w.shape)  # pass-major rows
                       for w in self.fusion.attention_weights(xp, attn_mask)]
            return {"weights": weights, "gid": gid, "spans": spans, "n_cls": n_cls}
        y = self.fusion(xp, attn_mask, chunks=n_pass).reshape((b, n_pass, length, -1))

        out = {}
        for p, groups in enumerate(passes):
            for g, group in enumerate(groups):
                if self.use_cls_token:
                    out[group] = y[:, p, g]
                else:
                    out[group] = {m: masked_mean(y[:, p, spans[m][0]:spans[m][1]], masks[m]) for m in group}
        return out

    def _project(self, m: str, x: jax.Array) -> jax.Array:
        proj = self.proj[m] if isinstance(self.proj, nnx.Dict) else self.proj
        return proj(x).astype(jnp.float32)

    # ----------------------------------------------------------------------------------- forward
    def __call__(self, batch: Mapping[str, jax.Array], *, cross_modal: bool | None = None,
                 late_fusion: bool = False, audio_pooling: tuple[str, int] | None = None) -> dict[str, jax.Array]:
        """Returns float32 embeddings (B, projection_dim):
        `{m}_embed` for each modality (not normalised); with cross_modal (default: the config's),
        fused pairs `tv_embed`, `ta_embed`, `va_embed` (normalised sides averaged); with late_fusion,
        `t+v_embed`, `t+a_embed`, `v+a_embed`; and `{m}_nonempty_input_mask` (B,) bool.
        `audio_pooling`: see `embed_tokens`.
        """
        cross_modal = self.cross_modal if cross_modal is None else cross_modal
        if cross_modal and self.per_modality_fusion:
            raise ValueError("model.fusion='per_modality' has no fused pairs; use cross_modal=False")
        tokens, masks, nonempty = self.embed_tokens(batch, audio_pooling=audio_pooling)
        out = {f"{m}_nonempty_input_mask": nonempty[m] for m in self.modalities}

        if self.per_modality_fusion:
            pooled = {}
            for m in self.modalities:
                y = self.fusion[m](tokens[m], masks[m][:, None, None, :])
                pooled[(m,)] = {m: masked_mean(y, masks[m])}
        else:
            pooled = self.run_passes(tokens, masks, self.default_passes(cross_modal))

        if self.use_cls_token:
            for group, v in pooled.items():
                name = group[0] if len(group) == 1 else pair_name(group)
                out[f"{name}_embed"] = self._project(group[0], v)
        else:
            # One projection call per modality over every pooled vector it projects.
            work: dict[str, list[tuple[Group, jax.Array]]] = {m: [] for m in self.modalities}
            for group, v in pooled.items():
                for m in group:
                    work[m].append((group, v[m]))
            projected: dict[tuple[Group, str], jax.Array] = {}
            for m, items in work.items():
                if not items:
                    continue
                # Stacked batch-major, (B, n, D) -> (B * n, D), so a sharded batch stays sharded.
                xs = jnp.stack([v for _, v in items], axis=1)
                ys = self._project(m, xs.reshape((-1, xs.shape[-1]))).reshape(xs.shape[:2] + (-1,))
                for i, (group, _) in enumerate(items):
                    projected[(group, m)] = ys[:, i]
            for group in pooled:
                if len(group) == 1:
                    out[f"{group[0]}_embed"] = projected[(group, group[0])]
                else:
                    x, y = group
                    out[f"{pair_name(group)}_embed"] = (
                        l2_normalize(projected[(group, x)]) + l2_normalize(projected[(group, y)])) / 2
        if late_fusion:
            for x, y in itertools.combinations(self.modalities, 2):
                out[f"{SHORT[x]}+{SHORT[y]}_embed"] = (
                    l2_normalize(out[f"{x}_embed"]) + l2_normalize(out[f"{y}_embed"])) / 2
        return out

    def attention_maps(self, batch: Mapping[str, jax.Array], passes: Sequence[Pass] | None = None, *,
                       audio_pooling: tuple[str, int] | None = None) -> dict:
        """Attention weights per block for `passes` (default: everything in one group, i.e. the
        tri-modal joint pass), with the group ids and modality spans of the sequence.
        `audio_pooling`: see `embed_tokens`."""
        if self.per_modality_fusion:
            raise ValueError("attention maps need model.fusion='shared'")
        tokens, masks, _ = self.embed_tokens(batch, audio_pooling=audio_pooling)
        passes = passes or [(tuple(self.modalities),)]
        res = self.run_passes(tokens, masks, passes, return_attention=True)
        res["masks"] = masks
        return res


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """(B, N, D), (B, N) -> (B, D) mean over valid tokens, accumulated in float32."""
    w = mask.astype(jnp.float32)
    s = jnp.einsum("bnd,bn->bd", x.astype(jnp.float32), w)
    return s / jnp.maximum(w.sum(-1, keepdims=True), 1.0)
