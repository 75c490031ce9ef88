"""Weight averaging during training: running (checkpoint) averages and EMA.

Both are optax-style ``init`` / ``update`` pairs of pure functions over a
NamedTuple state, plus a ``value`` that reads the average out; all three run
under ``jax.jit``. Floating leaves are accumulated in float32 (float64 for
float64 parameters) even when the parameters are bfloat16, and ``value``
casts back to the parameters' dtypes (the state keeps a zero-size array per
leaf to remember them). Integer and boolean leaves (step counters) are not
averaged: the state holds the latest value.

**Running average** of the checkpoints theta_1 .. theta_K (Izmailov et al.
2018's SWA, arXiv:1803.05407, and checkpoint averaging in translation,
Vaswani et al. 2017, arXiv:1706.03762):

    mean_0 = 0,   mean_{k+1} = mean_k + (theta_{k+1} - mean_k) / (k + 1)

so that mean_K = (1/K) sum_k theta_k without keeping K copies.

**Exponential moving average** with decay d_t (Polyak & Juditsky 1992; optax
``ema``):

    ema_0 = 0,   ema_{t+1} = d_t ema_t + (1 - d_t) theta_{t+1}

* ``warmup=False``: d_t = decay.
* ``warmup=True``: d_t = min(decay, (1 + t) / (10 + t)) for the t-th update
  (t = 0, 1, ...), as TensorFlow's ``ExponentialMovingAverage(num_updates=...)``
  and many training codebases do, so the average forgets its early,
  poorly-trained iterates quickly and reaches ``decay`` after ~10 / (1 - decay)
  steps.
* ``debias=True`` (in :func:`ema_value`) divides by 1 - prod_t d_t, optax's
  bias correction (Kingma & Ba 2015, arXiv:1412.6980) generalised to a
  varying decay: the zero initialisation then has no weight and the result is
  a normalised weighted average of the iterates. With a constant decay this
  is ema / (1 - decay^t), exactly optax's ``ema(decay, debias=True)``.

Example::

    state = ema_init(params)
    for step in range(num_steps):
        params, opt_state = train_step(params, opt_state, batch)
        state = jax.jit(ema_update, static_argnames="warmup")(state, params, 0.999)
    eval_params = ema_value(state)                    # debiased, in params' dtypes

    avg = running_average_init(params)
    for checkpoint in last_checkpoints:
        avg = running_average_update(avg, checkpoint)
    averaged = running_average_value(avg)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.merging._task_vectors import is_float, work_dtype
from jaxcombine.tree import check_same_structure

PyTree = Any


def _accumulator(params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jnp.zeros(jnp.shape(x), work_dtype(x)) if is_float(x) else jnp.asarray(x),
        params,
    )


def _dtypes(params: PyTree) -> PyTree:
    return jax.tree.map(lambda x: jnp.zeros((0,), jnp.result_type(x)), params)


def _cast_back(average: PyTree, dtypes: PyTree) -> PyTree:
    return jax.tree.map(lambda a, d: a.astype(d.dtype), average, dtypes)


def _check_params(accumulated: PyTree, params: PyTree, where: str) -> None:
    check_same_structure([accumulated, params], [f"{where}(state)", f"{where}(params)"])


class RunningAverageState(NamedTuple):
    """The mean of the ``count`` parameter sets seen so far.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.running_average_init({"w": jnp.ones(2, jnp.bfloat16)})
    >>> state.mean["w"].dtype, int(state.count), state.dtypes["w"].dtype
    (dtype('float32'), 0, dtype(bfloat16))
    """

    mean: PyTree  # like params; floats in float32 (float64)
    count: jax.Array  # [] int32
    dtypes: PyTree  # like params, zero-size leaves in the params' dtypes


def running_average_init(params: PyTree) -> RunningAverageState:
    """An empty running average for parameters shaped like ``params``.

    The mean starts at zero with count 0 (float leaves in float32 or wider):

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.running_average_init({"w": jnp.ones(2)})
    >>> print(state.mean["w"], state.count)
    [0. 0.] 0

    References: Izmailov et al. 2018, Averaging Weights Leads to Wider Optima and Better
    Generalization (SWA), arXiv:1803.05407.
    """
    return RunningAverageState(_accumulator(params), jnp.zeros((), jnp.int32), _dtypes(params))


def running_average_update(state: RunningAverageState, params: PyTree) -> RunningAverageState:
    """mean_{k+1} = mean_k + (params - mean_k) / (k + 1).

    After K updates the mean is (1/K) sum_k theta_k, as in SWA:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.running_average_init({"w": jnp.zeros(1)})
    >>> for w in (1.0, 2.0, 6.0):
    ...     state = merging.running_average_update(state, {"w": jnp.array([w])})
    >>> print(state.mean["w"], state.count)           # (1 + 2 + 6) / 3
    [3.] 3

    References: Izmailov et al. 2018, Averaging Weights Leads to Wider Optima and Better
    Generalization (SWA), arXiv:1803.05407.
    """
    _check_params(state.mean, params, "running_average_update")
    count = state.count + 1

    def leaf(m, x):
        if not is_float(m):
            return jnp.asarray(x, m.dtype)
        return m + (jnp.asarray(x, m.dtype) - m) / count.astype(m.dtype)

    return RunningAverageState(jax.tree.map(leaf, state.mean, params), count, state.dtypes)


def running_average_value(state: RunningAverageState) -> PyTree:
    """The average, in the parameters' dtypes.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> params = {"w": jnp.array([1.0, 3.0], jnp.bfloat16)}
    >>> state = merging.running_average_update(merging.running_average_init(params), params)
    >>> value = merging.running_average_value(state)
    >>> print(value["w"], value["w"].dtype)
    [1 3] bfloat16

    References: Izmailov et al. 2018, Averaging Weights Leads to Wider Optima and Better
    Generalization (SWA), arXiv:1803.05407.
    """
    return _cast_back(state.mean, state.dtypes)


class EmaState(NamedTuple):
    """An exponential moving average and what debiasing needs.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.ema_update(merging.ema_init({"w": jnp.ones(1)}), {"w": jnp.ones(1)}, 0.9)
    >>> print(state.ema["w"], state.count, state.decay_product)   # 0.9 * 0 + 0.1 * 1
    [0.1] 1 0.9
    """

    ema: PyTree  # like params; floats in float32 (float64)
    count: jax.Array  # [] int32, number of updates
    decay_product: jax.Array  # [] float32, prod_t d_t (1 before any update)
    dtypes: PyTree  # like params, zero-size leaves in the params' dtypes


def ema_init(params: PyTree) -> EmaState:
    """A zero EMA for parameters shaped like ``params`` (as optax's ``ema``).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.ema_init({"w": jnp.ones(2, jnp.bfloat16)})
    >>> print(state.ema["w"], state.ema["w"].dtype, state.count, state.decay_product)
    [0. 0.] float32 0 1.0

    References: Polyak & Juditsky 1992, Acceleration of Stochastic Approximation by Averaging, SIAM
    J. Control Optim. 30(4).
    """
    return EmaState(
        _accumulator(params),
        jnp.zeros((), jnp.int32),
        jnp.ones((), jnp.float32),
        _dtypes(params),
    )


def ema_decay(decay, count, warmup: bool = False) -> jax.Array:
    """The decay used at update number ``count``: decay, or min(decay, (1+t)/(10+t)).

    >>> from jaxcombine import merging
    >>> [float(merging.ema_decay(0.99, t, warmup=True)) for t in (0, 90, 10_000)]
    [0.1, 0.91, 0.99]
    """
    decay = jnp.asarray(decay, jnp.float32)
    if not warmup:
        return decay
    t = jnp.asarray(count, jnp.float32)
    return jnp.minimum(decay, (1.0 + t) / (10.0 + t))


def _check_decay(decay) -> None:
    if isinstance(decay, jax.core.Tracer):
        return
    value = np.asarray(decay)
    if value.ndim != 0 or not np.isfinite(value) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(
            f"decay must be one number in [0, 1], got {decay}",
            where="ema_update(decay)",
            fix="pass e.g. 0.999 (the average's horizon is about 1 / (1 - decay) updates)",
        )


def ema_update(state: EmaState, params: PyTree, decay, *, warmup: bool = False) -> EmaState:
    """ema <- d ema + (1 - d) params, with d = :func:`ema_decay` (decay, count, warmup).

    Runs under ``jax.jit`` (``warmup`` static).

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> update = jax.jit(merging.ema_update, static_argnames="warmup")
    >>> state = merging.ema_init({"w": jnp.zeros(1)})
    >>> for w in (2.0, 4.0):
    ...     state = update(state, {"w": jnp.array([w])}, 0.5)
    >>> print(state.ema["w"])                # 0.5 (0.5 * 0 + 0.5 * 2) + 0.5 * 4
    [2.5]

    References: Polyak & Juditsky 1992, Acceleration of Stochastic Approximation by Averaging, SIAM
    J. Control Optim. 30(4).
    """
    _check_decay(decay)
    _check_params(state.ema, params, "ema_update")
    d = ema_decay(decay, state.count, warmup)

    def leaf(e, x):
        if not is_float(e):
            return jnp.asarray(x, e.dtype)
        dd = d.astype(e.dtype)
        return dd * e + (1 - dd) * jnp.asarray(x, e.dtype)

    return EmaState(
        jax.tree.map(leaf, state.ema, params),
        state.count + 1,
        state.decay_product * d,
        state.dtypes,
    )


def ema_value(state: EmaState, *, debias: bool = True) -> PyTree:
    """The EMA in the parameters' dtypes; ``debias`` divides by 1 - prod_t d_t.

    Before any update (or when every d_t is 1) there is nothing to debias and
    the stored EMA is returned (bias correction as in Adam).

    Two updates with d = 0.5 by 2 and 4: the EMA 2.5 is 0.25 * 2 + 0.5 * 4,
    and debiasing divides by 1 - 0.25 (weights 1/3 and 2/3):

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.ema_init({"w": jnp.zeros(1)})
    >>> for w in (2.0, 4.0):
    ...     state = merging.ema_update(state, {"w": jnp.array([w])}, 0.5)
    >>> print(merging.ema_value(state, debias=False)["w"], merging.ema_value(state)["w"])
    [2.5] [3.3333]

    References: debiasing as in Kingma & Ba 2015, Adam: A Method for Stochastic Optimization,
    arXiv:1412.6980; the EMA: Polyak & Juditsky 1992, Acceleration of Stochastic Approximation by
    Averaging, SIAM J. Control Optim. 30(4).
    """
    if not debias:
        return _cast_back(state.ema, state.dtypes)
    correction = 1.0 - state.decay_product

    def leaf(e):
        if not is_float(e):
            return e
        c = correction.astype(e.dtype)
        return jnp.where(c > 0, e / jnp.where(c > 0, c, 1), e)

    return _cast_back(jax.tree.map(leaf, state.ema), state.dtypes)


class Averager(NamedTuple):
    """An optax-style triple of pure functions: ``init(params)``, ``update(state, params)``,
    ``value(state)``.

    >>> from jaxcombine import merging
    >>> averager = merging.ema(0.999)
    >>> averager.init is merging.ema_init, merging.running_average().value.__name__
    (True, 'running_average_value')
    """

    init: Any
    update: Any
    value: Any


def running_average() -> Averager:
    """The running (uniform) average of every parameter set passed to ``update``.

    mean_K = (1/K) sum_k theta_k, as in SWA.

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> avg = merging.running_average()
    >>> state = avg.init({"w": jnp.zeros(2)})
    >>> for w in (1.0, 2.0):
    ...     state = jax.jit(avg.update)(state, {"w": jnp.full(2, w)})
    >>> print(avg.value(state)["w"])
    [1.5 1.5]

    References: Izmailov et al. 2018, Averaging Weights Leads to Wider Optima and Better
    Generalization (SWA), arXiv:1803.05407.
    """
    return Averager(running_average_init, running_average_update, running_average_value)


def ema(decay: float, *, debias: bool = True, warmup: bool = False) -> Averager:
    """An exponential moving average with its options bound.

    ema_t = d_t ema_{t-1} + (1 - d_t) theta_t, debiased by 1 - prod_t d_t (as in
    Adam, which divides by 1 - decay^t).

    ``debias`` and ``warmup`` as in :func:`ema_value` and :func:`ema_decay`.
    A debiased EMA of a constant is that constant:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> averager = merging.ema(0.9, warmup=True)
    >>> state = averager.init({"w": jnp.zeros(2)})
    >>> update = jax.jit(averager.update)
    >>> for _ in range(3):
    ...     state = update(state, {"w": jnp.full(2, 5.0)})
    >>> print(averager.value(state)["w"])
    [5. 5.]

    References: Polyak & Juditsky 1992, Acceleration of Stochastic Approximation by Averaging, SIAM
    J. Control Optim. 30(4); debiasing: Kingma & Ba 2015, Adam: A Method for Stochastic
    Optimization, arXiv:1412.6980.
    """
    _check_decay(decay)

    def update(state: EmaState, params: PyTree) -> EmaState:
        return ema_update(state, params, decay, warmup=warmup)

    def value(state: EmaState) -> PyTree:
        return ema_value(state, debias=debias)

    return Averager(ema_init, update, value)


__all__ = [
    "Averager",
    "EmaState",
    "RunningAverageState",
    "ema",
    "ema_decay",
    "ema_init",
    "ema_update",
    "ema_value",
    "running_average",
    "running_average_init",
    "running_average_update",
    "running_average_value",
]
