"""The fusion transformer: pre-norm ViT blocks with key-padding / block attention masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eao_jax.model.layers import layer_norm, linear, shard_batch


class Attention(nnx.Module):
    """Multi-head self-attention with one fused qkv projection ordered [q | k | v] (timm layout)."""

    def __init__(self, dim: int, num_heads: int, *, qkv_bias: bool, rngs: nnx.Rngs, dtype):
        if dim % num_heads:
            raise ValueError(f"model.embed_dim={dim} is not divisible by model.num_heads={num_heads}")
        self.num_heads = num_heads
        self.qkv = linear(dim, 3 * dim, rngs=rngs, dtype=dtype, init="vit", use_bias=qkv_bias)
        self.proj = linear(dim, dim, rngs=rngs, dtype=dtype, init="vit")

    def __call__(self, x: jax.Array, mask: jax.Array, *, return_weights: bool = False):
        """x: (N, L, D); mask: bool, broadcastable to (N, H, L, L), True where query may see key.

        Every query row must have at least one visible key (guaranteed by the masking token).
        Returns (N, L, D), and the attention weights (N, H, L, L) when asked.
        """
        n, length, dim = x.shape
        h = self.num_heads
        qkv = shard_batch(self.qkv(x)).reshape(n, length, 3, h, dim // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, L, H, Dh)
        scale = (dim // h) ** -0.5
        logits = jnp.einsum("nqhd,nkhd->nhqk", q * jnp.asarray(scale, q.dtype), k,
                            preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights.astype(v.dtype), v).reshape(n, length, dim)
        out = shard_batch(self.proj(out))
        return (out, weights) if return_weights else out


class Block(nnx.Module):
    """x + Attn(LN(x)), then x + MLP(LN(x)); MLP = fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool, eps: float,
                 rngs: nnx.Rngs, dtype):
        hidden = int(dim * mlp_ratio)
        self.norm1 = layer_norm(dim, eps, rngs=rngs, dtype=dtype)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, rngs=rngs, dtype=dtype)
        self.norm2 = layer_norm(dim, eps, rngs=rngs, dtype=dtype)
        self.fc1 = linear(dim, hidden, rngs=rngs, dtype=dtype, init="vit")
        self.fc2 = linear(hidden, dim, rngs=rngs, dtype=dtype, init="vit")

    def __call__(self, x: jax.Array, mask: jax.Array, *, return_weights: bool = False):
        a = self.attn(self.norm1(x), mask, return_weights=return_weights)
        a, w = a if return_weights else (a, None)
        x = x + a
        x = x + shard_batch(self.fc2(jax.nn.gelu(shard_batch(self.fc1(self.norm2(x))), approximate=False)))
        return (x, w) if return_weights else x


class FusionTransformer(nnx.Module):
    """A stack of `depth` blocks (depth 0: identity). The original's final `norm` is never applied,
    so it is not built here (the converter drops it by name)."""

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_ratio: float, *, qkv_bias: bool,
                 eps: float, rngs: nnx.Rngs, dtype, remat: bool = False):
        self.blocks = nnx.List([
            Block(dim, num_heads, mlp_ratio, qkv_bias=qkv_bias, eps=eps, rngs=rngs, dtype=dtype)
            for _ in range(depth)
        ])
        self.remat = remat

    def __call__(self, x: jax.Array, mask: jax.Array, *, chunks: int = 1) -> jax.Array:
        """x: (N, L, D), mask broadcastable to (N, 1, L, L) -> (N, L, D).

        With remat and `chunks` > 1 (dividing N), the rows are run through the stack in `chunks`
        sequential groups (rows i with i % chunks == c form group c; for batch-major stacked passes
        that is one pass per group), each rematerialised: the backward pass then holds one group's
        intermediates at a time, not all of them (a single block's remat alone saves nothing).
        """
        x = shard_batch(x)
        if self.remat and chunks > 1 and len(self.blocks) and x.shape[0] % chunks == 0:
            return self._chunked(x, mask, chunks)
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda b, y, m: b(y, m))(block, x, mask)
            else:
                x = block(x, mask)
        return x

    def _chunked(self, x: jax.Array, mask: jax.Array, chunks: int) -> jax.Array:
        n = x.shape[0]
        mask = jnp.broadcast_to(mask, (n,) + mask.shape[1:])

        def split(a: jax.Array) -> jax.Array:
            # (N, ...) -> (chunks, N / chunks, ...) keeping the leading (sharded) order of rows.
            return a.reshape((n // chunks, chunks) + a.shape[1:]).swapaxes(0, 1)

        graphdef, state = nnx.split(self.blocks)

        @jax.checkpoint
        def run(xc: jax.Array, mc: jax.Array) -> jax.Array:
            for block in nnx.merge(graphdef, state):
                xc = block(xc, mc)
            return xc

        _, ys = jax.lax.scan(lambda carry, inp: (carry, run(*inp)), None, (split(x), split(mask)))
        return ys.swapaxes(0, 1).reshape(x.shape)

    def attention_weights(self, x: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """Per-block attention weights (N, H, L, L), for the attention analysis."""
        out = []
        for block in self.blocks:
            x, w = block(x, mask, return_weights=True)
            out.append(w)
        return out
