"""Task-vector algebra (Ilharco et al. 2023, "Editing models with task arithmetic").

Reference: arXiv:2212.04089.

A task vector is the difference between a fine-tuned model and the base it was
fine-tuned from, leaf by leaf:

    tau = theta_ft - theta_0

and models are edited by adding scaled task vectors back to the base:

    addition     theta = theta_0 + sum_i lambda_i tau_i           (multi-task)
    negation     theta = theta_0 - lambda tau                     (forgetting)
    analogy      theta = theta_0 + lambda (tau_C + (tau_B - tau_A))
                 ("A is to B as C is to D": tau_D ~ tau_C + tau_B - tau_A)

Every function here is pure, works on plain pytrees (nested dicts,
``nnx.State``) and under ``jax.jit``.

Dtypes. Floating leaves of task vectors are held in float32 (float64 for
float64 leaves), so ``apply_task_vector(base, task_vector(ft, base))`` gives
``ft`` back for bfloat16 and float16 models too; applying casts back to the
base's dtype. Integer and boolean leaves (step counters, integer buffers) are
not differences of anything: the models must agree on them, and they pass
through unchanged. Differing integer leaves raise a :class:`ConfigError` that
names the leaf (the check needs concrete values, so under ``jax.jit`` the
first tree's integer leaf is passed through unchecked).

Example::

    tau_math = task_vector(math_ft, base)
    tau_toxic = task_vector(toxic_ft, base)
    edited = apply_task_vector(base, add_task_vectors([tau_math, tau_toxic], [1.0, -0.5]))
    forgot = apply_task_vector(base, tau_toxic, scale=-1.0)     # = apply(base, negate(tau))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.tree import check_same_structure, path_string

PyTree = Any


def is_float(x) -> bool:
    """True for leaves that take part in arithmetic (floating or complex dtypes)."""
    return bool(jnp.issubdtype(jnp.result_type(x), jnp.inexact))


def work_dtype(*leaves):
    """float32, or wider when a leaf is wider (float64, complex)."""
    return jnp.promote_types(jnp.result_type(*leaves), jnp.float32)


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _short(x) -> str:
    text = np.array2string(np.asarray(x), threshold=6, edgeitems=2)
    return text if len(text) < 80 else text[:77] + "..."


def check_equal_integers(path: str, leaves: Sequence, names: Sequence[str], where: str) -> None:
    """Integer/boolean leaves at ``path`` must be equal in every tree (when concrete)."""
    if not all(_is_concrete(x) for x in leaves):
        return
    first = np.asarray(leaves[0])
    for name, leaf in zip(names[1:], leaves[1:], strict=True):
        if not np.array_equal(first, np.asarray(leaf)):
            raise ConfigError(
                f"integer leaf differs between {names[0]} ({_short(first)}) and {name} "
                f"({_short(leaf)}); integer and boolean leaves (step counters, integer "
                f"buffers) cannot be subtracted, added or averaged",
                where=f"{where}: {path}",
                fix="keep only float parameters, e.g. nnx.state(model, nnx.Param), or set the "
                "integer leaf to the same value in every model before combining",
            )


def check_scale(value, where: str) -> None:
    """A scale must be a finite number (a traced value is accepted unchecked)."""
    if not _is_concrete(value):
        return
    arr = np.asarray(value)
    if arr.ndim != 0 or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr):
        raise ConfigError(
            f"a scale must be one finite number, got {_short(value)}",
            where=where,
            fix="pass a float such as 1.0, 0.5 or -1.0",
        )


def check_integer_leaves(trees: Sequence[PyTree], names: Sequence[str], where: str) -> None:
    """Every integer/boolean leaf must be equal across ``trees`` (same structure assumed)."""
    flat = [jax.tree_util.tree_flatten_with_path(t)[0] for t in trees]
    for entries in zip(*flat, strict=True):
        leaves = [x for _, x in entries]
        if not any(is_float(x) for x in leaves):
            check_equal_integers(path_string(entries[0][0]), leaves, names, where)


def _map(fn, *trees):
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_string(p), *xs), *trees)


def task_vector(finetuned: PyTree, base: PyTree) -> PyTree:
    """tau = finetuned - base, leaf by leaf, floats in float32 or wider.

    Integer leaves (step counters) must be equal and pass through (Ilharco et
    al. 2023, arXiv:2212.04089).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging, tree
    >>> base = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "step": jnp.array(7)}
    >>> ft = {"w": jnp.array([1.5, 1.0], jnp.bfloat16), "step": jnp.array(7)}
    >>> tau = merging.task_vector(ft, base)
    >>> print(tau["w"], tau["w"].dtype, tau["step"])
    [ 0.5 -1. ] float32 7
    >>> tree.all_close(merging.apply_task_vector(base, tau), ft)
    True
    """
    check_same_structure([finetuned, base], ["finetuned", "base"])

    def leaf(path, ft, b):
        if is_float(ft) or is_float(b):
            work = work_dtype(ft, b)
            return jnp.asarray(ft, work) - jnp.asarray(b, work)
        check_equal_integers(path, [ft, b], ["finetuned", "base"], "task_vector")
        return ft

    return _map(leaf, finetuned, base)


def apply_task_vector(base: PyTree, tv: PyTree, scale=1.0) -> PyTree:
    """theta = base + scale * tau, in the base's dtypes.

    ``scale`` may be negative: ``scale=-1`` subtracts the task, which makes the
    model forget it (Ilharco et al. 2023, arXiv:2212.04089, section 3). Ilharco et al. choose the
    scale on held-out data, typically in [0, 1] for addition.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, tau = {"w": jnp.array([1.0, 1.0])}, {"w": jnp.array([2.0, -4.0])}
    >>> print(merging.apply_task_vector(base, tau, scale=0.5)["w"])    # 1 + 0.5 tau
    [ 2. -1.]
    >>> print(merging.apply_task_vector(base, tau, scale=-1.0)["w"])   # forget: 1 - tau
    [-1.  5.]
    """
    check_same_structure([base, tv], ["base", "task vector"])
    check_scale(scale, "apply_task_vector(scale)")

    def leaf(path, b, t):
        if is_float(b) or is_float(t):
            work = work_dtype(b, t)
            out = jnp.asarray(b, work) + jnp.asarray(scale, work) * jnp.asarray(t, work)
            return out.astype(jnp.result_type(b))
        check_equal_integers(path, [b, t], ["base", "task vector"], "apply_task_vector")
        return b

    return _map(leaf, base, tv)


def negate(tv: PyTree) -> PyTree:
    """-tau (integer leaves unchanged): applying it to the base forgets the task.

    theta_0 - tau (Ilharco et al. 2023, arXiv:2212.04089, section 3).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> neg = merging.negate({"w": jnp.array([2.0, -4.0]), "step": jnp.array(3)})
    >>> print(neg["w"], neg["step"])
    [-2.  4.] 3
    """
    return jax.tree.map(lambda t: -t if is_float(t) else t, tv)


def add_task_vectors(task_vectors: Sequence[PyTree], scales: Sequence[float] | None = None):
    """sum_i s_i tau_i, with s_i = 1 when ``scales`` is None.

    A multi-task model is ``apply_task_vector(base, add_task_vectors(taus, scales))``
    (Ilharco et al. 2023, arXiv:2212.04089, section 4).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> tau_a, tau_b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([2.0, 4.0])}
    >>> print(merging.add_task_vectors([tau_a, tau_b], [1.0, -0.5])["w"])   # a - b / 2
    [ 0. -2.]
    """
    task_vectors = list(task_vectors)
    if not task_vectors:
        raise ConfigError(
            "no task vectors to add",
            where="add_task_vectors(task_vectors)",
            fix="pass at least one task vector",
        )
    n = len(task_vectors)
    if scales is None:
        scales = [1.0] * n
    scales = list(scales)
    if len(scales) != n:
        raise ConfigError(
            f"got {len(scales)} scales for {n} task vectors",
            where="add_task_vectors(scales)",
            fix="pass one scale per task vector",
        )
    for i, s in enumerate(scales):
        check_scale(s, f"add_task_vectors(scales[{i}])")
    names = [f"task_vectors[{i}]" for i in range(n)]
    check_same_structure(task_vectors, names)

    def leaf(path, *taus):
        if any(is_float(t) for t in taus):
            work = work_dtype(*taus)
            total = jnp.asarray(scales[0], work) * jnp.asarray(taus[0], work)
            for s, t in zip(scales[1:], taus[1:], strict=True):
                total = total + jnp.asarray(s, work) * jnp.asarray(t, work)
            return total
        check_equal_integers(path, taus, names, "add_task_vectors")
        return taus[0]

    return _map(leaf, *task_vectors)


def analogy(base: PyTree, a: PyTree, b: PyTree, c: PyTree, scale=1.0) -> PyTree:
    """theta_0 + scale * (tau_c + (tau_b - tau_a)): "a is to b as c is to ?".

    ``a``, ``b`` and ``c`` are models fine-tuned from ``base``, with task
    vectors tau_x = x - theta_0 (Ilharco et al. 2023, arXiv:2212.04089, section 5, e.g. a =
    sentiment on Amazon, b = language modelling on Yelp, c = language modelling
    on Amazon, ? = sentiment on Yelp), e.g.
    ``analogy(base, amazon_lm, yelp_lm, amazon_sentiment, scale=0.5)``.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(2)}
    >>> a, b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([1.0, 1.0])}
    >>> c = {"w": jnp.array([0.0, 2.0])}
    >>> print(merging.analogy(base, a, b, c, scale=0.5)["w"])   # 0.5 ([0, 2] + [1, 1] - [1, 0])
    [0.  1.5]
    """
    names = ["base", "a", "b", "c"]
    check_same_structure([base, a, b, c], names)
    check_integer_leaves([base, a, b, c], names, "analogy")
    check_scale(scale, "analogy(scale)")
    tau = add_task_vectors(
        [task_vector(c, base), task_vector(b, base), task_vector(a, base)], [1.0, 1.0, -1.0]
    )
    return apply_task_vector(base, tau, scale)


__all__ = [
    "add_task_vectors",
    "analogy",
    "apply_task_vector",
    "negate",
    "task_vector",
]
