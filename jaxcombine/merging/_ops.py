"""Array helpers shared by the per-tensor merge functions.

``model_sum(x)`` sums over the leading model axis of ``x`` [N, ...] as N - 1
elementwise additions. It gives the same numbers as ``x.sum(axis=0)`` up to
float rounding order, and is much faster on XLA:CPU: measured with jaxlib
0.10.2 on a [3, 2048, 2048] float32 array, ``x.sum(0)`` takes about 60 ms and
``(x * w[:, None, None]).sum(0)`` about 13 s (an XLA:CPU fusion problem), the
unrolled sum about 3 ms. N is small and static (the number of models).
"""

from __future__ import annotations

import functools
import operator

import jax
import jax.numpy as jnp


def work_dtype(dtype):
    """The dtype merges compute in: float64 for float64 inputs, else float32."""
    return jnp.float64 if dtype == jnp.float64 else jnp.float32


def model_sum(x: jax.Array) -> jax.Array:
    """sum_i x[i] over the leading axis, unrolled (N is static)."""
    return functools.reduce(operator.add, [x[i] for i in range(x.shape[0])])


def top_k_mask(values: jax.Array, k, *, ties: str = "low") -> jax.Array:
    """Boolean mask of the ``k`` largest entries of a non-negative float array (any shape).

    The same set as ``jax.lax.top_k(values.ravel(), k)`` (``ties="low"``: among
    equal values the lower flat index wins; ``"high"``: the higher index wins),
    found without sorting: for non-negative IEEE floats the int32 bit pattern
    is ordered like the value, so the k-th largest value is built bit by bit
    from the top in 31 counting passes (a radix select), and ties at that value
    are taken in index order. On XLA:CPU a full sort of 11.5M float32 takes
    about 4 s; this takes about 0.2 s. ``k`` may be traced; ``k <= 0`` gives an
    all-False mask and ``k >= size`` an all-True one.
    """
    bits = magnitude_bits(values)
    k = jnp.asarray(k, jnp.int32)
    threshold = kth_largest_bits([bits], k)
    above = bits > threshold
    tied = bits == threshold
    room = k - jnp.sum(above, dtype=jnp.int32)
    if ties == "low":
        order = jnp.cumsum(tied, dtype=jnp.int32)
    else:
        order = jnp.cumsum(tied[::-1], dtype=jnp.int32)[::-1]
    mask = above | (tied & (order <= room))
    return (mask & (k > 0)).reshape(values.shape)


def magnitude_bits(values: jax.Array) -> jax.Array:
    """The int32 bit patterns of non-negative floats, flattened: ordered like the values."""
    return jax.lax.bitcast_convert_type(values.reshape(-1).astype(jnp.float32), jnp.int32)


def kth_largest_bits(bits: list[jax.Array], k) -> jax.Array:
    """The bit pattern of the k-th largest value over several :func:`magnitude_bits` arrays.

    31 passes, each counting the entries at or above a candidate in every array,
    so a whole model's threshold needs no concatenation (the largest T with
    count(bits >= T) >= k).
    """
    k = jnp.asarray(k, jnp.int32)

    def count_at_least(candidate):
        return sum(jnp.sum(b >= candidate, dtype=jnp.int32) for b in bits)

    def refine(i, threshold):
        candidate = threshold | jnp.left_shift(jnp.int32(1), 30 - i)
        return jnp.where(count_at_least(candidate) >= k, candidate, threshold)

    return jax.lax.fori_loop(0, 31, refine, jnp.int32(0))
