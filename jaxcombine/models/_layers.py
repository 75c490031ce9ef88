"""Small NNX building blocks whose parameters carry logical axis names."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_INIT_STD = 0.02


def param(rngs: nnx.Rngs, shape, axes, dtype, init="normal", std=_INIT_STD) -> nnx.Param:
    """A parameter tagged with logical axis names (sharded later by rules)."""
    if init == "normal":
        value = std * jax.random.normal(rngs.params(), shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    else:
        value = jnp.zeros(shape, dtype)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """y = w * x / sqrt(mean(x^2) + eps), computed in float32 (Zhang & Sennrich 2019)."""

    def __init__(self, dim: int, eps: float, *, dtype, rngs: nnx.Rngs):
        self.eps = eps
        self.scale = param(rngs, (dim,), ("embed",), dtype, init="ones")

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


class Embedding(nnx.Module):
    """Token embedding table [V, E]."""

    def __init__(self, vocab_size: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = param(rngs, (vocab_size, dim), ("vocab", "embed"), dtype)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], tokens, axis=0)


class Dense(nnx.Module):
    """y = x . W + b, contracting the last ``in_dims`` axes of x with the first of W."""

    def __init__(
        self,
        shape,
        axes,
        use_bias: bool,
        *,
        dtype,
        rngs: nnx.Rngs,
        in_dims: int = 1,
        init_scale: float = _INIT_STD,
    ):
        self.in_dims = in_dims
        self.kernel = param(rngs, shape, axes, dtype, std=init_scale)
        self.bias = (
            param(rngs, shape[in_dims:], axes[in_dims:], dtype, "zeros") if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        y = jnp.tensordot(x, kernel, axes=self.in_dims)
        return y if self.bias is None else y + self.bias[...]


def dropout(x: jax.Array, rate: float, key: jax.Array) -> jax.Array:
    """Inverted dropout: zero each entry with probability ``rate``, scale the rest by 1/(1-rate)."""
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def activation(name: str):
    """The activation function of an HF ``hidden_act`` name (see ``ACTIVATIONS``)."""
    return {
        "silu": jax.nn.silu,
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    }[name]
