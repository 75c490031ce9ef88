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


def model_sum(x: jax.Array) -> jax.Array:
    """sum_i x[i] over the leading axis, unrolled (N is static)."""
    return functools.reduce(operator.add, [x[i] for i in range(x.shape[0])])
