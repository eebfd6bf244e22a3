"""The fusion transformer: pre-norm ViT blocks with key-padding / block attention masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from eao_jax.model.layers import layer_norm, linear


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
        qkv = self.qkv(x).reshape(n, length, 3, h, dim // h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (N, L, H, Dh)
        scale = (dim // h) ** -0.5
        logits = jnp.einsum("nqhd,nkhd->nhqk", q * jnp.asarray(scale, q.dtype), k,
                            preferred_element_type=jnp.float32)
        logits = jnp.where(mask, logits, -jnp.inf)
        weights = jax.nn.softmax(logits, axis=-1)
        out = jnp.einsum("nhqk,nkhd->nqhd", weights.astype(v.dtype), v).reshape(n, length, dim)
        out = self.proj(out)
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
        x = x + self.fc2(jax.nn.gelu(self.fc1(self.norm2(x)), approximate=False))
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

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        """x: (N, L, D), mask broadcastable to (N, 1, L, L) -> (N, L, D)."""
        for block in self.blocks:
            if self.remat:
                x = nnx.remat(lambda b, y, m: b(y, m))(block, x, mask)
            else:
                x = block(x, mask)
        return x

    def attention_weights(self, x: jax.Array, mask: jax.Array) -> list[jax.Array]:
        """Per-block attention weights (N, H, L, L), for the attention analysis."""
        out = []
        for block in self.blocks:
            x, w = block(x, mask, return_weights=True)
            out.append(w)
        return out
