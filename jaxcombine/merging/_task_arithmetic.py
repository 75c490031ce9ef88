"""Task arithmetic and its sparsified, sign-elected relatives, one tensor at a time.

For a base theta_0 and fine-tuned models theta_i with task vectors
tau_i = theta_i - theta_0 (Ilharco et al. 2023, arXiv:2212.04089):

    tau_i'  = sparsify(tau_i, density_i)        # optional: magnitude, random, outliers, DELLA
    tau_i'' = w_i * tau_i'
    m       = consensus(tau'')                  # optional: sign election (TIES)
    delta   = sum_i m_i tau_i''  [ / sum_i m_i w_i  if normalize ]
    merged  = theta_0 + lambda * delta

Named methods are choices of the three steps (mergekit's
``generalized_task_arithmetic.py``):

=================  ===================  =========  =========  =======
method             sparsify             consensus  normalize  rescale
=================  ===================  =========  =========  =======
task_arithmetic    —                    —          no         no
ties               magnitude            sum        yes        no
dare_linear        random               —          no         l1
dare_ties          random               sum        no         l1
breadcrumbs        magnitude_outliers   —          no         no
breadcrumbs_ties   magnitude_outliers   sum        no         no
della_linear       della_magprune       —          no         l1
della              della_magprune       sum        yes        l1
=================  ===================  =========  =========  =======

mergekit's conventions are kept: sparsification is per tensor, a divisor of
zero (no agreeing model) is replaced by one, so such entries keep the base.

The papers' variants are options: ``consensus="count"`` (majority of signs
instead of mass), ``disjoint="mean"`` (TIES's unweighted mean of the agreeing
trimmed vectors, weights only steering the election), ``rescale="density"``
(DARE's 1/density) and ``rescale="probability"`` (DELLA's 1/p per entry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError
from jaxcombine.merging._ops import model_sum, unstack, work_dtype
from jaxcombine.merging._sparsify import sparsify as sparsify_tensor

CONSENSUS_METHODS = ("sum", "count")


def sign_consensus(deltas: jax.Array, method: str = "sum") -> jax.Array:
    """Mask [N, ...]: 1 where a model's sign agrees with the elected sign.

    ``sum``: the sign of the summed (weighted) deltas, TIES's election by mass;
    ``count``: the majority of signs. Ties elect +. A zero entry never agrees.
    (TIES, Yadav et al. 2023, arXiv:2306.01708.)

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import sign_consensus
    >>> deltas = jnp.array([[1.0, -2.0, 0.0], [-3.0, 1.0, 2.0]])   # sums -2, -1, 2
    >>> print(sign_consensus(deltas))
    [[0. 1. 0.]
     [1. 0. 1.]]
    >>> print(sign_consensus(deltas, "count"))                    # sign counts 0, 0, 1
    [[1. 0. 0.]
     [0. 1. 1.]]
    """
    return jnp.stack(_agreement(unstack(deltas), method))


def _agreement(deltas: list[jax.Array], method: str) -> list[jax.Array]:
    """:func:`sign_consensus` model by model."""
    signs = [jnp.sign(d) for d in deltas]
    if method == "sum":
        elected = jnp.where(model_sum(deltas) >= 0, 1.0, -1.0)
    elif method == "count":
        elected = jnp.where(model_sum(signs) >= 0, 1.0, -1.0)
    else:
        raise ConfigError(
            f"unknown consensus method {method!r}",
            where="consensus",
            fix="use 'sum' (TIES's election by mass) or 'count' (majority of signs)",
        )
    return [(sign == elected).astype(d.dtype) for sign, d in zip(signs, deltas, strict=True)]


def task_arithmetic_leaf(
    base: jax.Array,
    models: jax.Array,
    *,
    weight,
    density=None,
    gamma=None,
    epsilon=None,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool | str | None = False,
    disjoint: str = "weighted",
    lambda_: float = 1.0,
    int8_mask: bool = False,
    key: jax.Array | None = None,
) -> jax.Array:
    """Merge one tensor: ``base`` [...] and stacked fine-tuned ``models`` [N, ...].

    ``weight``, ``density``, ``gamma``, ``epsilon`` hold one value per model.
    ``rescale``: False/None, True or "l1" (mergekit), "density" or "probability".
    ``disjoint``: "weighted" (mergekit: divide by the summed weights of the
    agreeing models) or "mean" (TIES paper: weights steer the sign election, the
    agreeing trimmed vectors are averaged unweighted). ``int8_mask`` only saves
    memory in mergekit and changes no number; it is accepted and ignored. The
    formula and the named methods' choices are in the module docstring (task
    arithmetic, Ilharco et al. 2023, arXiv:2212.04089).

    TIES on one tensor, the example of :func:`~jaxcombine.merging.ties`:

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import task_arithmetic_leaf
    >>> models = jnp.array([[4.0, -1.0, 2.0, 0.5], [-2.5, 3.0, 2.0, 1.0]])
    >>> print(task_arithmetic_leaf(jnp.zeros(4), models, weight=(1.0, 1.0), density=(0.5, 0.5),
    ...                            sparsify="magnitude", consensus="sum", normalize=True))
    [4. 3. 2. 0.]
    """
    del int8_mask
    n = models.shape[0]
    work = work_dtype(base.dtype)
    theta_0 = base.astype(work)
    deltas = [m.astype(work) - theta_0 for m in unstack(models)]
    if sparsify is not None:
        mode = "l1" if rescale is True else (rescale or None)
        density = (1.0,) * n if density is None else tuple(density)
        keys = jax.random.split(key, n) if key is not None else [None] * n
        deltas = [
            sparsify_tensor(
                deltas[i],
                density[i],
                sparsify,
                key=keys[i],
                gamma=0.01 if gamma is None else gamma[i],
                epsilon=0.15 if epsilon is None else epsilon[i],
                rescale=mode,
            )
            for i in range(n)
        ]
    w = unstack(jnp.asarray(weight, work).reshape(n))
    weighted = [d * w_i for d, w_i in zip(deltas, w, strict=True)]
    if consensus is not None:
        masks = _agreement(weighted, consensus)
        if disjoint == "mean":
            mixed = model_sum([d * m for d, m in zip(deltas, masks, strict=True)])
            divisor = model_sum(masks)
        else:
            mixed = model_sum([x * m for x, m in zip(weighted, masks, strict=True)])
            divisor = model_sum([w_i * m for w_i, m in zip(w, masks, strict=True)])
        divisor = jnp.where(divisor == 0, 1.0, divisor)
    else:
        mixed = model_sum(weighted)
        divisor = model_sum(w)
        divisor = jnp.where(jnp.abs(divisor) < 1e-8, 1.0, divisor)
    if normalize or (consensus is not None and disjoint == "mean"):
        mixed = mixed / divisor
    mixed = mixed * jnp.asarray(lambda_, work)  # may be traced; times 1 is exact
    return (theta_0 + mixed).astype(base.dtype)


def linear_leaf(base, models: jax.Array, *, weight, normalize: bool = True) -> jax.Array:
    """sum_i w_i theta_i [/ sum_i w_i] for stacked ``models`` [N, ...] (Wortsman et al. 2022).

    Model soups, arXiv:2203.05482. ``base`` is unused (mergekit's linear ignores the base model).

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import linear_leaf
    >>> print(linear_leaf(None, jnp.array([[1.0, 2.0], [3.0, 6.0]]), weight=(1.0, 3.0)))
    [2.5 5. ]
    """
    del base
    work = work_dtype(models.dtype)
    w = unstack(jnp.asarray(weight, work).reshape(models.shape[0]))
    merged = model_sum([m.astype(work) * w_i for m, w_i in zip(unstack(models), w, strict=True)])
    if normalize:
        merged = merged / model_sum(w)
    return merged.astype(models.dtype)
