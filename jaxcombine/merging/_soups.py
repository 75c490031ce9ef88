"""Model soups (Wortsman et al. 2022, "Model soups", arXiv:2203.05482).

Models fine-tuned from one pretrained initialisation (different learning
rates, seeds, data orders, augmentations) often lie in one basin of the loss,
so their weights can be averaged into one model that is as good as or better
than each, at the inference cost of one model.

* **Uniform soup**: theta = sum_i w_i theta_i / sum_i w_i (w_i = 1 by default).
* **Greedy soup** (the paper's Recipe 1): sort the ingredients by their own
  held-out score, best first; start the soup with the best; try each next
  ingredient in that order and keep it only if the *uniform average* of the
  kept ingredients plus the candidate scores strictly higher on the held-out
  set than the soup so far. By construction the greedy soup never scores
  below its best ingredient on that held-out set.

The paper's pseudo-code accepts ties (>=); its released code (and this
default) requires a strict improvement; ``strict=False`` accepts ties.

Averages are accumulated in float32 (float64 for float64 leaves) and cast back
to the models' dtypes. Integer and boolean leaves must be equal in every
model and pass through.

Example::

    soup = uniform_soup([params_a, params_b, params_c])
    soup, record = greedy_soup([params_a, params_b, params_c], accuracy, held_out=(x, y))
    record.ingredients        # e.g. (2, 0): the models in the soup, in the order added
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.merging._task_vectors import check_integer_leaves, is_float, work_dtype
from jaxcombine.tree import check_same_structure

PyTree = Any


def _names(n: int) -> list[str]:
    return [f"models[{i}]" for i in range(n)]


def _validate_models(models, where: str) -> list:
    models = list(models)
    if not models:
        raise ConfigError("no models to average", where=where, fix="pass at least one model")
    names = _names(len(models))
    check_same_structure(models, names)
    check_integer_leaves(models, names, where)
    return models


def _weighted_sum(models: Sequence[PyTree], weights) -> PyTree:
    """sum_i w_i theta_i in the working dtype; integer leaves from the first model."""

    def leaf(*xs):
        if not any(is_float(x) for x in xs):
            return xs[0]
        work = work_dtype(*xs)
        if weights is None:
            total = jnp.asarray(xs[0], work)
            for x in xs[1:]:
                total = total + jnp.asarray(x, work)
        else:
            total = jnp.asarray(weights[0], work) * jnp.asarray(xs[0], work)
            for w, x in zip(weights[1:], xs[1:], strict=True):
                total = total + jnp.asarray(w, work) * jnp.asarray(x, work)
        return total

    return jax.tree.map(leaf, *models)


def _divide(total: PyTree, divisor, like: PyTree) -> PyTree:
    """total / divisor (a number, or weights to sum), cast to the dtypes of ``like``."""

    def leaf(t, x):
        if not is_float(x):
            return t
        if isinstance(divisor, list):
            d = sum(jnp.asarray(w, t.dtype) for w in divisor)
        else:
            d = jnp.asarray(divisor, t.dtype)
        return (t / d).astype(jnp.result_type(x))

    return jax.tree.map(leaf, total, like)


def uniform_soup(models: Sequence[PyTree], weights: Sequence[float] | None = None) -> PyTree:
    """The (weighted) average sum_i w_i theta_i / sum_i w_i of ``models``.

    With ``weights=None`` every model counts once (the paper's uniform soup).
    Works under ``jax.jit``; the result has the first model's dtypes
    (Wortsman et al. 2022, arXiv:2203.05482).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([5.0, 6.0])}
    >>> print(merging.uniform_soup([a, b])["w"])                # (a + b) / 2
    [3. 4.]
    >>> print(merging.uniform_soup([a, b], [3.0, 1.0])["w"])    # (3 a + b) / 4
    [2. 3.]
    """
    where = "uniform_soup(models)"
    models = _validate_models(models, where)
    if weights is None:
        return _divide(_weighted_sum(models, None), float(len(models)), models[0])
    weights = list(weights)
    if len(weights) != len(models):
        raise ConfigError(
            f"got {len(weights)} weights for {len(models)} models",
            where="uniform_soup(weights)",
            fix="pass one weight per model, or weights=None for the uniform average",
        )
    if all(not isinstance(w, jax.core.Tracer) for w in weights):
        values = np.asarray(weights, np.float64)
        if not np.all(np.isfinite(values)) or abs(values.sum()) < 1e-12:
            raise ConfigError(
                f"weights must be finite and must not sum to zero, got {weights}",
                where="uniform_soup(weights)",
                fix="pass finite weights with a non-zero sum (they are normalised by their sum)",
            )
    return _divide(_weighted_sum(models, weights), weights, models[0])


class SoupTrial(NamedTuple):
    """One step of the greedy soup: the candidate model, the candidate soup's score, kept?

    ``GreedySoupRecord.trials`` holds one per candidate; see its example.

    References: Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models
    improves accuracy without increasing inference time, arXiv:2203.05482 (greedy soup, Recipe 1).
    """

    model: int
    score: float
    accepted: bool


class GreedySoupRecord(NamedTuple):
    """What :func:`greedy_soup` did.

    ``ingredients``: indices (into ``models``) of the models in the soup, in the
    order they were added (the first is the best single model); ``scores``:
    every model's own held-out score, in input order; ``order``: indices sorted
    by score, best first; ``trials``: one :class:`SoupTrial` per candidate after
    the first; ``score``: the soup's held-out score.

    With scores -|w - 1|, model 2 (w = 1.5) is the best; adding model 0 (w = 0)
    gives the soup w = 0.75, which scores higher (-0.25); adding model 1 (w = 4)
    would give w = 1.83 and is refused:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> models = [{"w": jnp.array([w])} for w in (0.0, 4.0, 1.5)]
    >>> soup, record = merging.greedy_soup(models, lambda p: -abs(float(p["w"][0]) - 1.0))
    >>> record.scores, record.order, record.ingredients
    ((-1.0, -3.0, -0.5), (2, 0, 1), (2, 0))
    >>> record.trials
    (SoupTrial(model=0, score=-0.25, accepted=True),
     SoupTrial(model=1, score=-0.8333, accepted=False))
    >>> print(soup["w"], record.score)
    [0.75] -0.25

    References: Wortsman et al. 2022, Model soups: averaging weights of multiple fine-tuned models
    improves accuracy without increasing inference time, arXiv:2203.05482 (greedy soup, Recipe 1).
    """

    ingredients: tuple[int, ...]
    scores: tuple[float, ...]
    order: tuple[int, ...]
    trials: tuple[SoupTrial, ...]
    score: float


@jax.jit
def _add(total: PyTree, params: PyTree) -> PyTree:
    return jax.tree.map(
        lambda t, x: t + jnp.asarray(x, t.dtype) if is_float(x) else t, total, params
    )


@jax.jit
def _mean(total: PyTree, count, like: PyTree) -> PyTree:
    return _divide(total, count, like)


def greedy_soup(
    models: Sequence[PyTree],
    eval_fn: Callable[..., float],
    *,
    held_out: Any = None,
    strict: bool = True,
) -> tuple[PyTree, GreedySoupRecord]:
    """Wortsman et al.'s greedy soup: add models best-first while the held-out score rises.

    ``eval_fn(params)`` (or ``eval_fn(params, held_out)`` when ``held_out`` is
    given) returns a number, higher is better (accuracy; pass minus a loss).
    Called N times for the single models and N - 1 times for candidate soups.

    Algorithm (arXiv:2203.05482, Recipe 1)::

        sort models by eval_fn, descending (ties keep input order)
        soup = [best]
        for m in the rest, in that order:
            if eval_fn(mean(soup + [m])) > eval_fn(mean(soup)):    # >= if not strict
                soup = soup + [m]
        return mean(soup)

    ``mean`` is the uniform average of the kept models (their float32 sum
    divided by their count), equal to ``uniform_soup`` of the ingredients.

    With ``held_out``, ``eval_fn`` receives it as its second argument (here a
    target the soup should approach; :class:`GreedySoupRecord` shows a record):

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> models = [{"w": jnp.array([w])} for w in (0.0, 4.0, 1.5)]
    >>> def score(params, target):          # higher is better, e.g. accuracy
    ...     return -abs(float(params["w"][0]) - target)
    >>> soup, record = merging.greedy_soup(models, score, held_out=1.0)
    >>> print(soup["w"], record.ingredients)        # (1.5 + 0) / 2; the 4 is refused
    [0.75] (2, 0)
    """
    where = "greedy_soup(models)"
    models = _validate_models(models, where)
    if not callable(eval_fn):
        raise ConfigError(
            f"eval_fn must be callable, got {type(eval_fn).__name__}",
            where="greedy_soup(eval_fn)",
            fix="pass a function params -> score (higher is better)",
        )

    def score(params, what: str) -> float:
        value = eval_fn(params) if held_out is None else eval_fn(params, held_out)
        try:
            value = float(value)
        except (TypeError, ValueError) as err:
            raise ConfigError(
                f"eval_fn must return one number, got {type(value).__name__}",
                where=f"greedy_soup(eval_fn) on {what}",
                fix="return a Python float or a scalar array (higher is better)",
            ) from err
        if not math.isfinite(value):
            raise ConfigError(
                f"eval_fn returned {value}",
                where=f"greedy_soup(eval_fn) on {what}",
                fix="return a finite score; check the model and the held-out data",
            )
        return value

    scores = tuple(score(m, f"models[{i}]") for i, m in enumerate(models))
    order = tuple(sorted(range(len(models)), key=lambda i: -scores[i]))
    best = order[0]
    ingredients = [best]
    soup, soup_score = models[best], scores[best]
    total = _weighted_sum([models[best]], None)
    trials = []
    for i in order[1:]:
        candidate_total = _add(total, models[i])
        candidate = _mean(candidate_total, float(len(ingredients) + 1), models[best])
        s = score(candidate, f"the soup of models {[*ingredients, i]}")
        accepted = s > soup_score or (not strict and s >= soup_score)
        trials.append(SoupTrial(i, s, accepted))
        if accepted:
            ingredients.append(i)
            total, soup, soup_score = candidate_total, candidate, s
    record = GreedySoupRecord(tuple(ingredients), scores, order, tuple(trials), soup_score)
    return soup, record


__all__ = ["GreedySoupRecord", "SoupTrial", "greedy_soup", "uniform_soup"]
