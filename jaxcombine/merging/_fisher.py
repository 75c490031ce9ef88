"""Fisher-weighted merging (Matena & Raffel 2022, arXiv:2111.09832).

Each model i comes with the diagonal of its Fisher information F_i, a
per-parameter estimate of how much the model's likelihood cares about that
parameter. The merge is the per-element precision-weighted mean

    theta*_j = sum_i w_i (F_ij + eps) theta_ij / sum_i w_i (F_ij + eps),

which maximises sum_i w_i log p(theta | theta_i, F_i) under the Laplace
(diagonal Gaussian) approximation of each model's posterior. ``eps`` guards
the division: where every model's Fisher is 0 the merge falls back to the
plain weighted mean sum_i w_i theta_ij / sum_i w_i (and it is negligible
elsewhere, for eps small against the Fisher values).

The Fisher is accumulated optax-style, one batch at a time:

* *empirical* (:func:`fisher_update`): the mean over examples of the squared
  per-example gradient of the log-likelihood of the example's observed label,
  F = 1/N sum_n (d log p(y_n | x_n, theta) / d theta)^2;
* *expected* (:func:`expected_fisher_update`, classifiers): the label is
  drawn from the model's own predictive distribution, and the expectation
  over the C classes is taken exactly,
  F = 1/N sum_n sum_c p(c | x_n) (d log p(c | x_n, theta) / d theta)^2.

Example::

    state = fisher_init(params_a)
    for batch in batches_a:
        state = fisher_update(state, params_a, batch, log_prob_fn)
    fisher_a = fisher_finalize(state)
    ...
    merged = fisher_merge([params_a, params_b], [fisher_a, fisher_b])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.tree import check_same_structure, leaf_paths

PyTree = Any


class FisherState(NamedTuple):
    """Running sum of squared per-example gradients and the number of examples.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.fisher_init({"w": jnp.ones(2)})
    >>> print(state.sum_squares["w"], state.count)
    [0. 0.] 0
    """

    sum_squares: PyTree  # like params, float32
    count: jax.Array  # [] int32


def fisher_init(params: PyTree) -> FisherState:
    """An empty accumulator for the diagonal Fisher of ``params``.

    Sums are float32 whatever the parameters' dtype:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> merging.fisher_init({"w": jnp.ones(3, jnp.bfloat16)}).sum_squares["w"].dtype
    dtype('float32')

    References: Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging,
    arXiv:2111.09832.
    """
    return FisherState(
        sum_squares=jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), params),
        count=jnp.zeros((), jnp.int32),
    )


def _batch_size(batch: PyTree, where: str) -> int:
    sizes = {int(jnp.shape(x)[0]) for x in jax.tree.leaves(batch) if jnp.ndim(x) > 0}
    if len(sizes) != 1:
        raise ConfigError(
            f"the batch's leaves must share one leading example axis, got sizes {sorted(sizes)}",
            where=where,
            fix="pass a batch whose every array has shape [N, ...] for the same N",
        )
    return sizes.pop()


@jax.jit
def _accumulate(state: FisherState, per_example_squares: PyTree, n) -> FisherState:
    sums = jax.tree.map(lambda s, g: s + jnp.sum(g, axis=0), state.sum_squares, per_example_squares)
    return FisherState(sums, state.count + n)


def _square(tree: PyTree) -> PyTree:
    return jax.tree.map(lambda g: jnp.square(g.astype(jnp.float32)), tree)


def fisher_update(
    state: FisherState,
    params: PyTree,
    batch: PyTree,
    log_prob_fn: Callable[[PyTree, PyTree], jax.Array],
) -> FisherState:
    """Add a batch's squared per-example gradients (the empirical Fisher).

    ``log_prob_fn(params, example) -> []`` is the log-likelihood of ONE
    example (a leaf of ``batch`` without its leading axis), e.g.
    ``log_softmax(apply(params, x))[y]``. A per-example loss such as the
    negative log-likelihood gives the same squares. Do not pass a loss averaged
    over a batch: the gradients are taken per example with ``jax.vmap``
    (Matena & Raffel 2022, arXiv:2111.09832).

    For a classifier, ``log_prob_fn = lambda p, ex: log_softmax(apply(p, ex[0]))[ex[1]]``.
    Here a Gaussian likelihood log p(y | x, w) = -(y - w x)^2 / 2 at w = 0,
    whose gradient is y x: F = ((3 * 1)^2 + (1 * 2)^2) / 2 = 6.5.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> def log_prob_fn(params, example):
    ...     x, y = example
    ...     return -0.5 * (y - params["w"] * x) ** 2
    >>> params = {"w": jnp.zeros(())}
    >>> batch = (jnp.array([1.0, 2.0]), jnp.array([3.0, 1.0]))      # (xs, ys)
    >>> state = merging.fisher_update(merging.fisher_init(params), params, batch, log_prob_fn)
    >>> print(merging.fisher_finalize(state)["w"])
    6.5
    """
    n = _batch_size(batch, "fisher_update(batch)")
    return _accumulate(state, _per_example_squares(log_prob_fn, params, batch), n)


@partial(jax.jit, static_argnums=0)
def _per_example_squares(log_prob_fn, params, batch):
    return _square(jax.vmap(jax.grad(log_prob_fn), in_axes=(None, 0))(params, batch))


def expected_fisher_update(
    state: FisherState,
    params: PyTree,
    inputs: PyTree,
    logits_fn: Callable[[PyTree, PyTree], jax.Array],
) -> FisherState:
    """Add a batch to the expected Fisher of a classifier (labels from the model).

    ``logits_fn(params, x) -> [C]`` gives the logits of ONE input. For each
    input the squared gradient of log p(c | x) is averaged over the classes c
    with weights p(c | x) (exactly: C gradients per input, no sampling), the
    Fisher of Matena & Raffel 2022 (arXiv:2111.09832).

    Logits w x with w = 0 (p = 1/2 for both classes): d log p(c | x) / d w_j =
    x ([c = j] - 1/2), so F_j = mean_x x^2 / 4 = (1 + 4) / 2 / 4 = 0.625.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> params = {"w": jnp.zeros(2)}
    >>> state = merging.expected_fisher_update(merging.fisher_init(params), params,
    ...                                        jnp.array([1.0, 2.0]), lambda p, x: p["w"] * x)
    >>> print(merging.fisher_finalize(state)["w"])
    [0.625 0.625]
    """
    n = _batch_size(inputs, "expected_fisher_update(inputs)")
    return _accumulate(state, _expected_squares(logits_fn, params, inputs), n)


@partial(jax.jit, static_argnums=0)
def _expected_squares(logits_fn, params, inputs):
    def one(x):
        logits = logits_fn(params, x)
        if jnp.ndim(logits) != 1:
            raise ConfigError(
                f"logits_fn must return the logits [C] of one input, got shape {jnp.shape(logits)}",
                where="expected_fisher_update(logits_fn)",
                fix="return logits for a single example; the batch axis is vmapped",
            )
        probs = jax.lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32)))

        def log_prob(p, c):
            return jax.nn.log_softmax(logits_fn(p, x).astype(jnp.float32))[c]

        classes = jnp.arange(logits.shape[0])
        grads = jax.vmap(jax.grad(log_prob), in_axes=(None, 0))(params, classes)  # [C, ...]
        return jax.tree.map(lambda g2: jnp.tensordot(probs, g2, axes=1), _square(grads))

    return jax.vmap(one)(inputs)


def fisher_finalize(state: FisherState) -> PyTree:
    """The diagonal Fisher: the accumulated squares divided by the example count.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.FisherState({"w": jnp.array([6.0, 3.0])}, jnp.array(3))
    >>> print(merging.fisher_finalize(state)["w"])
    [2. 1.]

    References: Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging,
    arXiv:2111.09832.
    """
    count = int(state.count)
    if count == 0:
        raise ConfigError(
            "no examples were accumulated, so the Fisher is undefined",
            where="fisher_finalize(state)",
            fix="call fisher_update with at least one batch first",
        )
    return _divide(state.sum_squares, state.count)


@jax.jit
def _divide(sums: PyTree, count: jax.Array) -> PyTree:
    return jax.tree.map(lambda s: s / count, sums)


def check_weights(weights, n: int, where: str, *, nonnegative: str | None = None) -> np.ndarray:
    """Per-model weights as float64 numpy: n finite numbers, not summing to zero.

    ``nonnegative``: if given, negative weights are an error and this says why.
    """
    if weights is None:
        return np.full(n, 1.0 / n)
    values = np.asarray(weights, dtype=np.float64)
    if values.shape != (n,):
        raise ConfigError(
            f"expected {n} weights (one per model), got shape {values.shape}",
            where=where,
            fix="pass one weight per model, or weights=None for the uniform mean",
        )
    if not np.all(np.isfinite(values)):
        raise ConfigError(
            f"weights must be finite, got {values.tolist()}",
            where=where,
            fix="pass finite numbers",
        )
    if abs(values.sum()) < 1e-8:
        raise ConfigError(
            f"weights {values.tolist()} sum to zero, and the merge divides by their sum",
            where=where,
            fix="change the weights so that their sum is not zero",
        )
    if nonnegative and np.any(values < 0):
        raise ConfigError(
            f"weights must be non-negative, got {values.tolist()}",
            where=where,
            fix=f"use weights >= 0 ({nonnegative})",
        )
    return values


def check_models(models: Sequence[PyTree], where: str, *, base: PyTree | None = None) -> None:
    """At least one model; all of one structure and shapes (and the base's, if given)."""
    if not isinstance(models, Sequence) or isinstance(models, str) or len(models) == 0:
        raise ConfigError(
            "expected a non-empty list of models (pytrees)",
            where=where,
            fix="pass a list such as [params_a, params_b]",
        )
    trees = list(models) if base is None else [base, *models]
    names = [f"model {i}" for i in range(len(models))]
    names = names if base is None else ["base", *names]
    check_same_structure(trees, names)


def fisher_merge(
    models: Sequence[PyTree],
    fishers: Sequence[PyTree],
    *,
    weights: Sequence[float] | None = None,
    epsilon: float = 1e-8,
) -> PyTree:
    """Fisher-weighted average: sum_i w_i (F_i + eps) theta_i / sum_i w_i (F_i + eps).

    ``fishers[i]`` is a pytree like ``models[i]`` (from :func:`fisher_finalize`).
    ``weights`` default to uniform; they must not sum to zero. Where every
    Fisher is 0 the result is the weighted mean sum_i w_i theta_i / sum_i w_i.
    Leaves keep the models' dtype; the arithmetic is float32.

    Entry 0 is weighted by the Fishers 1 and 3; entry 1 has no Fisher and
    takes the plain mean:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> a, b = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([3.0, 3.0])}
    >>> fisher_a, fisher_b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([3.0, 0.0])}
    >>> print(merging.fisher_merge([a, b], [fisher_a, fisher_b])["w"])   # (1 + 9) / 4, 2
    [2.5 2. ]

    Reference: Matena & Raffel, "Merging Models with Fisher-Weighted
    Averaging", arXiv:2111.09832.
    """
    where = "fisher_merge"
    check_models(models, f"{where}(models)")
    if len(fishers) != len(models):
        raise ConfigError(
            f"got {len(models)} models but {len(fishers)} Fishers",
            where=f"{where}(fishers)",
            fix="pass one Fisher per model, in the same order",
        )
    for i, fisher in enumerate(fishers):
        check_same_structure([models[i], fisher], [f"model {i}", f"Fisher {i}"])
    if not (np.isfinite(epsilon) and epsilon > 0):
        raise ConfigError(
            f"epsilon must be a positive number, got {epsilon}",
            where=f"{where}(epsilon)",
            fix="use a small positive value such as 1e-8",
        )
    w = check_weights(
        weights,
        len(models),
        f"{where}(weights)",
        nonnegative="a negative weight could make the Fisher-weighted denominator vanish",
    )
    for i, fisher in enumerate(fishers):
        for path, leaf in zip(leaf_paths(fisher), jax.tree.leaves(fisher), strict=True):
            values = np.asarray(leaf)
            if np.any(values < 0) or not np.all(np.isfinite(values)):
                raise ConfigError(
                    "a Fisher diagonal must be finite and non-negative",
                    where=f"{where}(fishers[{i}]): {path}",
                    fix="pass the output of fisher_finalize (mean squared gradients)",
                )
    return _fisher_merge_jit(list(models), list(fishers), jnp.asarray(w, jnp.float32), epsilon)


@jax.jit
def _fisher_merge_jit(models, fishers, w, epsilon):
    def leaf(*pairs):
        thetas, fs = pairs[: len(w)], pairs[len(w) :]
        num = sum(
            w[i] * (fs[i].astype(jnp.float32) + epsilon) * thetas[i].astype(jnp.float32)
            for i in range(len(thetas))
        )
        den = sum(w[i] * (fs[i].astype(jnp.float32) + epsilon) for i in range(len(thetas)))
        return (num / den).astype(thetas[0].dtype)

    return jax.tree.map(leaf, *models, *fishers)
