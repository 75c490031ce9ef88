"""Task arithmetic and its sparsified, sign-elected relatives, one leaf at a time.

For a base theta_0 and fine-tuned models theta_i with task vectors
tau_i = theta_i - theta_0 (Ilharco et al. 2023, arXiv:2212.04089):

    tau_i'  = sparsify(tau_i, density_i)        # optional: keep the largest |tau|
    tau_i'' = w_i * tau_i'
    m       = consensus(tau'')                  # optional: TIES sign election
    delta   = sum_i m_i tau_i''  [ / sum_i m_i w_i  if normalize ]
    merged  = theta_0 + lambda * delta

TIES (Yadav et al. 2023, arXiv:2306.01708) is magnitude sparsification with
sign election by mass and normalisation. These are mergekit's semantics
(``generalized_task_arithmetic.py``): sparsification is per tensor, a divisor
of zero is replaced by one, and an empty consensus keeps the base.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError


def magnitude_mask(delta: jax.Array, density: float) -> jax.Array:
    """1 on the max(1, int(density * n)) entries of largest |delta|, else 0 (mergekit)."""
    if density >= 1:
        return jnp.ones_like(delta)
    if density <= 0 or delta.size == 0:
        return jnp.zeros_like(delta)
    k = max(1, int(density * delta.size))
    _, keep = jax.lax.top_k(jnp.abs(delta).reshape(-1).astype(jnp.float32), k)
    return jnp.zeros(delta.size, delta.dtype).at[keep].set(1).reshape(delta.shape)


def rescale_l1(delta: jax.Array, masked: jax.Array, eps: float = 1e-7) -> jax.Array:
    """``masked`` scaled to the L1 norm of ``delta`` (unchanged if either norm < eps)."""
    before = jnp.abs(delta).sum()
    after = jnp.abs(masked).sum()
    ok = (before >= eps) & (after >= eps)
    return jnp.where(ok, masked * (before / jnp.where(ok, after, 1.0)), masked)


def sign_consensus(deltas: jax.Array, method: str = "sum") -> jax.Array:
    """Mask [N, ...]: 1 where a model's sign agrees with the elected sign.

    ``sum``: the sign of the summed (weighted) deltas, TIES's election by mass;
    ``count``: the majority of signs. Ties elect +.
    """
    sign = jnp.sign(deltas)
    if method == "sum":
        elected = jnp.where(deltas.sum(axis=0) >= 0, 1.0, -1.0)
    elif method == "count":
        elected = jnp.where(sign.sum(axis=0) >= 0, 1.0, -1.0)
    else:
        raise ConfigError(
            f"unknown consensus method {method!r}; use 'sum' or 'count'", where="consensus"
        )
    return (sign == elected).astype(deltas.dtype)


def task_arithmetic_leaf(
    base: jax.Array,
    models: jax.Array,
    weights,
    densities=None,
    *,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
) -> jax.Array:
    """Merge one tensor: ``base`` [...] and stacked fine-tuned ``models`` [N, ...]."""
    n = models.shape[0]
    work = jnp.float32 if base.dtype != jnp.float64 else jnp.float64
    deltas = models.astype(work) - base.astype(work)[None]
    if sparsify is not None:
        if sparsify != "magnitude":
            raise ConfigError(f"unknown sparsification {sparsify!r}", where="sparsify")
        densities = [1.0] * n if densities is None else list(densities)
        pruned = []
        for i in range(n):
            masked = deltas[i] * magnitude_mask(deltas[i], densities[i])
            pruned.append(rescale_l1(deltas[i], masked) if rescale else masked)
        deltas = jnp.stack(pruned)
    w = jnp.asarray(weights, work).reshape((n,) + (1,) * base.ndim)
    deltas = deltas * w
    if consensus is not None:
        mask = sign_consensus(deltas, consensus)
        mixed = (deltas * mask).sum(axis=0)
        divisor = (w * mask).sum(axis=0)
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = deltas.sum(axis=0)
        divisor = w.sum(axis=0)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return (base.astype(work) + mixed).astype(base.dtype)


def linear_leaf(models: jax.Array, weights, *, normalize: bool = True) -> jax.Array:
    """sum_i w_i theta_i [/ sum_i w_i] for stacked ``models`` [N, ...] (Wortsman et al. 2022)."""
    work = jnp.float32 if models.dtype != jnp.float64 else jnp.float64
    w = jnp.asarray(weights, work).reshape((models.shape[0],) + (1,) * (models.ndim - 1))
    merged = (models.astype(work) * w).sum(axis=0)
    if normalize:
        merged = merged / w.sum(axis=0)
    return merged.astype(models.dtype)
