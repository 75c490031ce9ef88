"""Choosing the next token from logits: greedy, temperature, top-k, top-p.

The filters run in the order transformers applies them: logits / T, then keep
the k largest, then keep the smallest set of tokens whose probability mass
reaches p (nucleus sampling, Holtzman et al. 2020, arXiv:1904.09751). The
most likely token is always kept.

>>> import jax.numpy as jnp
>>> from jaxcombine.decoding import Sampling, filter_logits
>>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
>>> p = jnp.exp(filter_logits(logits, Sampling(temperature=1.0, top_p=0.75)))
>>> (p / p.sum()).round(4).tolist()          # 0.5 + 0.3 >= 0.75: two tokens, renormalised
[[0.625, 0.375, 0.0, 0.0]]
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxcombine.errors import InputError


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens; ``temperature == 0`` means greedy (argmax).

    Otherwise tokens are drawn from ``softmax(filter_logits(logits))``:
    temperature, then top-k (0: off), then top-p (1.0: off).

    >>> Sampling().greedy
    True
    >>> Sampling(temperature=0.8, top_k=50, top_p=0.95).greedy
    False
    >>> Sampling(top_p=0.0)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: top_p: top_p must be in (0, 1], got 0.0
      How to fix: use 1.0 to disable nucleus filtering

    References: top-k sampling, Fan et al. 2018, Hierarchical Neural Story Generation,
    arXiv:1805.04833; nucleus (top-p) sampling, Holtzman et al. 2020, The Curious Case of Neural
    Text Degeneration, arXiv:1904.09751.
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
    """Temperature-scaled logits [B, V] with filtered-out tokens at -inf.

    ``z / T``; then top-k keeps ``z_v >= k-th largest``; then top-p keeps
    the largest tokens while the probability mass before them is ``< p``.
    Ties at a threshold are kept.

    >>> import jax.numpy as jnp
    >>> logits = jnp.array([[4.0, 2.0, 0.0, -2.0]])
    >>> filter_logits(logits, Sampling(temperature=2.0)).tolist()
    [[2.0, 1.0, 0.0, -1.0]]
    >>> filter_logits(logits, Sampling(temperature=1.0, top_k=2)).tolist()
    [[4.0, 2.0, -inf, -inf]]

    References: top-k sampling, Fan et al. 2018, Hierarchical Neural Story Generation,
    arXiv:1805.04833; nucleus (top-p) sampling, Holtzman et al. 2020, The Curious Case of Neural
    Text Degeneration, arXiv:1904.09751.
    """
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
    """Next tokens [B] from logits [B, V]: ``argmax_v z_v`` when greedy, else a
    draw from ``softmax(filter_logits(z))`` with ``key``.

    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.array([[0.0, 3.0, 1.0], [2.0, 0.0, 0.0]])
    >>> sample_tokens(logits, jax.random.key(0), Sampling()).tolist()
    [1, 0]
    >>> rows = jnp.tile(logits[:1], (200, 1))            # top-2 keeps tokens 1 and 2
    >>> drawn = sample_tokens(rows, jax.random.key(0), Sampling(temperature=1.0, top_k=2))
    >>> sorted(set(drawn.tolist()))
    [1, 2]

    References: top-k sampling, Fan et al. 2018, Hierarchical Neural Story Generation,
    arXiv:1805.04833; nucleus (top-p) sampling, Holtzman et al. 2020, The Curious Case of Neural
    Text Degeneration, arXiv:1904.09751.
    """
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling)).astype(jnp.int32)
