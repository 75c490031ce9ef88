"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

The filters run in the order transformers applies them: logits / T, then keep
the k largest, then keep the smallest set of tokens whose probability mass
reaches p (nucleus sampling, Holtzman et al. 2020, arXiv:1904.09751). The
most likely token is always kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcombine.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens; ``temperature == 0`` means greedy (argmax).

    Example::

        Sampling()                                   # greedy
        Sampling(temperature=0.8, top_k=50, top_p=0.95)
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise InputError(
                f"temperature must be >= 0, got {self.temperature}",
                where="temperature",
                fix="use 0 for greedy decoding",
            )
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(
                f"top_k must be a non-negative integer, got {self.top_k}",
                where="top_k",
                fix="use 0 to disable top-k filtering",
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InputError(
                f"top_p must be in (0, 1], got {self.top_p}",
                where="top_p",
                fix="use 1.0 to disable nucleus filtering",
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature-scaled logits [B, V] with filtered-out tokens at -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < sampling.top_p, sorted_logits, jnp.inf)
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Next tokens [B] from logits [B, V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling)).astype(jnp.int32)
