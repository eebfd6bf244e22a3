"""Small building blocks shared by the model: initialisers, projections, LayerNorm, BatchNorm."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

DATA_AXIS = "data"  # the mesh axis the batch is split over (eao_jax.parallel.DATA_AXIS)


def shard_batch(x: jax.Array) -> jax.Array:
    """Pins an activation's leading (batch) axis to the mesh's ``data`` axis, other axes replicated.

    Under FSDP the large weights are sharded over ``data`` too; without this, GSPMD may follow the
    weight's sharding and split an activation over its feature axis, gathering the whole global
    batch onto every device. With the batch pinned it gathers the weight instead (FSDP proper).
    A no-op outside a mesh context (`jax.set_mesh`), with a data axis of size 1, or when the batch
    does not divide. Values are unchanged either way.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names:
        return x
    n = mesh.shape[DATA_AXIS]
    if n == 1 or x.ndim == 0 or x.shape[0] % n:
        return x
    return jax.lax.with_sharding_constraint(x, PartitionSpec(DATA_AXIS))


def torch_linear_init(fan_in: int):
    """PyTorch's default nn.Linear init, U(±1/sqrt(fan_in)) for weight and bias (kaiming-uniform a=√5)."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def vit_normal(stddev: float = 0.02):
    """timm's trunc_normal_(std=.02): the truncation is at ±2 absolute, i.e. 100 std, so a plain normal."""
    return jax.nn.initializers.normal(stddev)


def linear(
    din: int, dout: int, *, rngs: nnx.Rngs, dtype, init: str = "torch", use_bias: bool = True
) -> nnx.Linear:
    """A Linear with either PyTorch-default init ("torch") or timm ViT init ("vit": N(0, .02), zero bias)."""
    if init == "torch":
        k_init, b_init = torch_linear_init(din), torch_linear_init(din)
    elif init == "vit":
        k_init, b_init = vit_normal(), jax.nn.initializers.zeros
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Linear(
        din, dout, use_bias=use_bias, kernel_init=k_init, bias_init=b_init,
        dtype=dtype, param_dtype=jnp.float32, rngs=rngs,
    )


class Projection(nnx.Module):
    """Linear, optionally followed by context gating (the original's GatedEmbeddingUnit).

    gated:  y = z * sigmoid(W_g z + b_g),  z = W x + b.   linear: y = W x + b.
    Shapes: (..., din) -> (..., dout).
    """

    def __init__(self, din: int, dout: int, kind: str, *, rngs: nnx.Rngs, dtype=jnp.float32):
        if kind not in ("gated", "linear"):
            raise ValueError(f"projection kind must be 'gated' or 'linear', got {kind!r}")
        self.kind = kind
        self.fc = linear(din, dout, rngs=rngs, dtype=dtype)
        self.cg = linear(dout, dout, rngs=rngs, dtype=dtype) if kind == "gated" else None

    def __call__(self, x: jax.Array) -> jax.Array:
        z = shard_batch(self.fc(x))
        if self.cg is None:
            return z
        return z * jax.nn.sigmoid(shard_batch(self.cg(z)))


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype=jnp.float32) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class BatchNorm(nnx.Module):
    """BatchNorm over all axes but the last, with PyTorch semantics.

    Training normalises with the biased batch variance and updates the running variance with the
    unbiased one (as torch.nn.BatchNorm does); eval uses the running statistics. `momentum` is the
    weight of the old running value (Flax convention; PyTorch momentum 0.1 == 0.9 here).
    Statistics are computed in float32 whatever the compute dtype.
    """

    def __init__(self, features: int, *, momentum: float = 0.9, eps: float = 1e-5):
        self.scale = nnx.Param(jnp.ones((features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.momentum = momentum
        self.eps = eps
        self.use_running_average = False

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        axes = tuple(range(x.ndim - 1))
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            mean = xf.mean(axes)
            var = jnp.square(xf - mean).mean(axes)
            n = math.prod(x.shape[:-1])
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = m * self.mean[...] + (1 - m) * jax.lax.stop_gradient(mean)
            self.var[...] = m * self.var[...] + (1 - m) * jax.lax.stop_gradient(unbiased)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(x.dtype)

    def set_view(self, use_running_average: bool | None = None):
        """Used by `nnx.view`; model.train()/model.eval() set `use_running_average` directly."""
        if use_running_average is not None:
            self.use_running_average = use_running_average
