"""Merge methods over whole parameter pytrees, with per-tensor settings from rules.

Each method takes pytrees of one structure (``nnx.State``, nested dicts, or a
flat ``{hf_name: array}`` dict), resolves its settings per leaf with
:func:`jaxcombine.rules.resolve` (mergekit's scalars, layer gradients and
``{filter, value}`` lists), and maps a leaf function over the stacked models.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

from jaxcombine import rules
from jaxcombine.errors import ConfigError
from jaxcombine.merging._task_arithmetic import linear_leaf, task_arithmetic_leaf
from jaxcombine.tree import check_same_structure, leaf_paths, stack

Setting = Any


def _per_model(settings: Sequence[Setting] | Setting, n: int, name: str) -> list[Setting]:
    if not isinstance(settings, (list, tuple)) or len(settings) != n:
        raise ConfigError(
            f"expected one {name} setting per model ({n}), got {settings!r}",
            where=name,
            fix=f"pass a list of {n} settings, one per model, in the models' order",
        )
    return list(settings)


def _resolved(reference, settings: list[Setting], name: str, num_layers):
    """Per leaf, the list of per-model values of ``settings``."""
    trees = [
        rules.resolve(reference, s, num_layers=num_layers, where=f"{name}[{i}]")
        for i, s in enumerate(settings)
    ]
    return jax.tree.map(lambda *values: list(values), *trees)


def _check_values(paths, per_leaf, name: str, low: float, high: float, low_open=True):
    for path, values in zip(
        paths, jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, list)), strict=True
    ):
        for i, v in enumerate(values):
            if v is None:
                raise ConfigError(
                    f"no value of {name} applies to this tensor",
                    where=f"{path} (model {i})",
                    fix=f"add a catch-all rule {{value: ...}} to {name}",
                )
            if (v <= low if low_open else v < low) or v > high:
                raise ConfigError(
                    f"{name}={v} is outside {'(' if low_open else '['}{low}, {high}]",
                    where=f"{path} (model {i})",
                )


def linear(
    models: Sequence[Any],
    *,
    weights: Sequence[Setting],
    normalize: bool = True,
    num_layers: int | None = None,
):
    """Weighted average sum_i w_i theta_i / sum_i w_i (model soups, arXiv:2203.05482).

    Example::

        merged = linear([a, b], weights=[0.3, 0.7])
    """
    if len(models) < 1:
        raise ConfigError("linear needs at least one model", where="models")
    check_same_structure(models)
    per_leaf = _resolved(
        models[0], _per_model(weights, len(models), "weight"), "weight", num_layers
    )
    paths = leaf_paths(models[0])
    _check_values(paths, per_leaf, "weight", float("-inf"), float("inf"))
    if normalize:
        for path, w in zip(
            paths, jax.tree.leaves(per_leaf, is_leaf=lambda x: isinstance(x, list)), strict=True
        ):
            if abs(sum(w)) < 1e-12:
                raise ConfigError(
                    f"weights {w} sum to zero, and linear divides by the sum",
                    where=path,
                    fix="change the weights or set normalize=False",
                )
    stacked = stack(models)
    return jax.tree.map(
        lambda x, w: linear_leaf(x, w, normalize=normalize),
        stacked,
        per_leaf,
        is_leaf=lambda x: isinstance(x, list),
    )


def task_arithmetic(
    base,
    models: Sequence[Any],
    *,
    weights: Sequence[Setting],
    densities: Sequence[Setting] | None = None,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    num_layers: int | None = None,
):
    """theta_0 + lambda * combine_i(w_i * sparsify(theta_i - theta_0)), mergekit's general form.

    ``sparsify``: None or "magnitude" (per tensor, keep the largest |tau|);
    ``consensus``: None, "sum" (TIES sign election by mass) or "count";
    ``normalize``: divide by the summed weights of the agreeing models;
    ``rescale``: match the L1 norm of each pruned task vector to the unpruned.
    """
    if not models:
        raise ConfigError("task arithmetic needs at least one fine-tuned model", where="models")
    check_same_structure([base, *models], ["base", *(f"model {i}" for i in range(len(models)))])
    n = len(models)
    paths = leaf_paths(base)
    w = _resolved(base, _per_model(weights, n, "weight"), "weight", num_layers)
    _check_values(paths, w, "weight", float("-inf"), float("inf"))
    d = _resolved(
        base,
        _per_model(densities if densities is not None else [1.0] * n, n, "density"),
        "density",
        num_layers,
    )
    _check_values(paths, d, "density", 0.0, 1.0)
    stacked = stack(models)

    def leaf(b, x, wi, di):
        return task_arithmetic_leaf(
            b,
            x,
            wi,
            di,
            sparsify=sparsify,
            consensus=consensus,
            normalize=normalize,
            rescale=rescale,
            lambda_=lambda_,
        )

    is_list = lambda x: isinstance(x, list)
    return jax.tree.map(leaf, base, stacked, w, d, is_leaf=is_list)


def ties(
    base,
    models,
    *,
    weights,
    densities,
    lambda_: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    num_layers: int | None = None,
):
    """TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    Per tensor, keep each task vector's ``density`` fraction of largest
    magnitudes, elect the sign of the summed weighted vectors, and average the
    agreeing entries by weight (mergekit's ``ties``).
    """
    return task_arithmetic(
        base,
        models,
        weights=weights,
        densities=densities,
        sparsify="magnitude",
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        num_layers=num_layers,
    )
