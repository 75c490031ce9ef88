"""Sparsifying task vectors: which entries of tau = theta - theta_0 survive, and rescaling.

Each function returns a *mask* (0/1, or a keep probability for DELLA) for one
tensor; :func:`sparsify` applies it and optionally rescales the survivors.

=====================  ==========================================================
``magnitude``          keep the ``max(1, int(density n))`` largest |tau|
                       (TIES, Yadav et al. 2023, arXiv:2306.01708)
``random``             keep each entry with probability ``density`` (DARE,
                       Yu et al. 2023, arXiv:2311.03099)
``magnitude_outliers`` drop the ``int(gamma n)`` largest |tau| as outliers, then
                       the smallest, keeping ``int(density n)`` (Model Breadcrumbs,
                       Davari & Belilovsky 2023, arXiv:2312.06795)
``della_magprune``     keep entry j of a row with probability
                       ``p_j = density - epsilon + 2 epsilon r_j``, r_j its
                       magnitude rank in [0, 1] within the row (DELLA, Deep et al.
                       2024, arXiv:2406.11617)
=====================  ==========================================================

Rescaling (``rescale``):

* ``"l1"`` (mergekit's, the default wherever mergekit rescales): scale the
  pruned tensor so its L1 norm equals the unpruned one's (unchanged when either
  norm is below 1e-7).
* ``"density"`` (the DARE paper): divide the survivors by ``density``, which
  keeps the expectation E[mask tau / density] = tau.
* ``"probability"`` (the DELLA paper): divide each survivor by its own keep
  probability p_j.

These follow mergekit's ``sparsify.py`` exactly for the mask rules (including
its rank normalisation along axis 1 for DELLA), so deterministic methods match
mergekit to float precision; random masks come from ``jax.random`` and match
mergekit in distribution only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError
from jaxcombine.merging._ops import top_k_mask

SPARSIFY_METHODS = ("magnitude", "random", "magnitude_outliers", "della_magprune")
RESCALE_MODES = ("l1", "density", "probability")


def magnitude_mask(delta: jax.Array, density: float) -> jax.Array:
    """1 on the max(1, int(density * n)) entries of largest |delta|, else 0 (mergekit).

    TIES's trim (Yadav et al. 2023, arXiv:2306.01708); ties at the cut go to
    the lower index.

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import magnitude_mask
    >>> print(magnitude_mask(jnp.array([3.0, -1.0, 2.0, 0.5]), 0.5))
    [1. 0. 1. 0.]
    """
    if density >= 1:
        return jnp.ones_like(delta)
    if density <= 0 or delta.size == 0:
        return jnp.zeros_like(delta)
    k = max(1, int(density * delta.size))
    return top_k_mask(jnp.abs(delta), k).astype(delta.dtype)


def magnitude_outliers_mask(delta: jax.Array, density: float, gamma: float = 0.01) -> jax.Array:
    """Model Breadcrumbs: drop the int(gamma n) largest |delta|, then the smallest.

    Sorting |delta| ascending, the kept entries are ranks
    ``[n_bot, n_bot + int(density n))`` with ``n_bot = max(0, n - int(density n) - int(gamma n))``:
    when density + gamma > 1 fewer outliers are dropped so the density is kept.
    (Davari & Belilovsky 2023, arXiv:2312.06795.)

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import magnitude_outliers_mask
    >>> print(magnitude_outliers_mask(jnp.arange(1.0, 11.0), 0.5, gamma=0.1))
    [0. 0. 0. 0. 1. 1. 1. 1. 1. 0.]
    """
    if density >= 1:
        return jnp.ones_like(delta)
    n = delta.size
    target = int(density * n)
    n_bot = max(0, n - target - int(gamma * n))
    # Ranks [n_bot, n_bot + target) of a stable ascending sort: the n - n_bot largest
    # minus the n - n_bot - target largest, equal values ordered by index.
    magnitudes = jnp.abs(delta)
    kept = top_k_mask(magnitudes, n - n_bot, ties="high")
    outliers = top_k_mask(magnitudes, n - n_bot - target, ties="high")
    return (kept & ~outliers).astype(delta.dtype)


def della_probabilities(delta: jax.Array, density: float, epsilon: float) -> jax.Array:
    """DELLA's keep probability per entry: density - epsilon + 2 epsilon * rank in [0, 1].

    Ranks of |delta| are taken along axis 1 (a 1-D tensor is one row), as
    mergekit does; a row of one entry gets rank 0. The rank is normalised to
    [0, 1] by the row length minus one (Deep et al. 2024, arXiv:2406.11617).

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import della_probabilities
    >>> delta = jnp.array([[1.0, 3.0, 2.0], [6.0, 5.0, 4.0]])
    >>> print(jax.jit(della_probabilities)(delta, 0.5, 0.1))
    [[0.4 0.6 0.5]
     [0.6 0.5 0.4]]
    """
    x = delta[None] if delta.ndim < 2 else delta
    # Rows along axis 1: move it last and flatten the rest into [R, L].
    moved = jnp.moveaxis(jnp.abs(x).astype(jnp.float32), 1, -1)
    length = moved.shape[-1]
    rows = moved.reshape(-1, length)
    order = jnp.argsort(rows, axis=1)  # one sort; its inverse permutation is the rank
    columns = jnp.broadcast_to(jnp.arange(length, dtype=jnp.float32), rows.shape)
    ranks = (
        jnp.zeros(rows.shape, jnp.float32)
        .at[jnp.arange(rows.shape[0])[:, None], order]
        .set(columns)
    )
    ranks = jnp.moveaxis(ranks.reshape(moved.shape), -1, 1)
    rank_norm = jnp.clip(ranks / max(length - 1, 1), 0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    return probs.reshape(delta.shape)


def rescale_l1(delta: jax.Array, masked: jax.Array, eps: float = 1e-7) -> jax.Array:
    """``masked`` scaled to the L1 norm of ``delta`` (unchanged if either norm < eps).

    masked * sum|delta| / sum|masked|, mergekit's rescaling for DARE
    (arXiv:2311.03099) and DELLA (arXiv:2406.11617).

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import rescale_l1
    >>> print(rescale_l1(jnp.array([1.0, -2.0, 3.0, -4.0]), jnp.array([0.0, -2.0, 0.0, -4.0])))
    [ 0.     -3.3333  0.     -6.6667]
    """
    before = jnp.abs(delta).sum()
    after = jnp.abs(masked).sum()
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def check_density(density: float, method: str, epsilon: float | None = None, where: str = ""):
    """Errors for a density outside (0, 1] or a DELLA epsilon leaving (0, 1)."""
    if not 0 < density <= 1:
        raise ConfigError(
            f"density={density} is outside (0, 1]",
            where=where or "density",
            fix="density is the fraction of task-vector entries kept: choose it in (0, 1]",
        )
    bad_epsilon = epsilon is None or not 0 <= epsilon < min(density, 1 - density)
    if method == "della_magprune" and density < 1 and bad_epsilon:
        raise ConfigError(
            f"epsilon={epsilon} with density={density}: density +/- epsilon must lie in (0, 1)",
            where=where or "epsilon",
            fix=f"choose epsilon < {min(density, 1 - density):.6g}",
        )


def sparsify(
    delta: jax.Array,
    density: float,
    method: str,
    *,
    key: jax.Array | None = None,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    rescale: str | None = None,
) -> jax.Array:
    """Sparsify one task-vector tensor with ``method`` and optionally rescale it.

    Returns rescale(mask * delta); the masks and rescalings are in the module
    docstring (TIES arXiv:2306.01708, DARE arXiv:2311.03099, Breadcrumbs
    arXiv:2312.06795, DELLA arXiv:2406.11617). Random methods (``random``,
    ``della_magprune``) need ``key``.

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import sparsify
    >>> tau = jnp.array([1.0, 2.0, -3.0, 4.0])
    >>> print(sparsify(tau, 0.5, "magnitude", rescale="l1"))   # [0, 0, -3, 4] * 10 / 7
    [ 0.      0.     -4.2857  5.7143]
    >>> pruned = sparsify(tau, 0.5, "random", key=jax.random.key(0), rescale="density")
    >>> print(bool(jnp.all((pruned == 0) | (pruned == 2 * tau))))
    True
    """
    if method not in SPARSIFY_METHODS:
        raise ConfigError(
            f"unknown sparsification {method!r}",
            where="sparsify",
            fix=f"use one of {', '.join(SPARSIFY_METHODS)}",
        )
    if rescale is not None and rescale not in RESCALE_MODES:
        raise ConfigError(
            f"unknown rescale mode {rescale!r}",
            where="rescale",
            fix=f"use one of {', '.join(RESCALE_MODES)} or None",
        )
    if density >= 1:
        return delta
    probs = None
    if method == "magnitude":
        mask = magnitude_mask(delta, density)
    elif method == "magnitude_outliers":
        mask = magnitude_outliers_mask(delta, density, gamma)
    else:
        if key is None:
            raise ConfigError(
                f"{method} sparsification is random and needs a key",
                where="key",
                fix="pass key=jax.random.key(seed)",
            )
        probs = (
            jnp.full(delta.shape, density, jnp.float32)
            if method == "random"
            else della_probabilities(delta, density, epsilon)
        )
        mask = jax.random.bernoulli(key, probs).astype(delta.dtype)
    masked = delta * mask
    if rescale == "l1":
        return rescale_l1(delta, masked)
    if rescale == "density":
        return masked / density
    if rescale == "probability":
        keep = probs if probs is not None else jnp.full(delta.shape, density, jnp.float32)
        return masked / keep.astype(delta.dtype)
    return masked
