"""Pytree math for parameters: stacking, arithmetic, path strings.

Many models of one architecture are one *stacked* pytree whose leaves carry a
leading model axis: merges reduce over that axis, ensembles ``vmap`` over it.
Every function takes and returns plain pytrees (nested dicts, ``nnx.State``)
and works under ``jax.jit`` and on sharded leaves.

A merge is a reduction over axis 0 of the stacked tree: for models
theta_1 ... theta_M, ``stack`` gives leaves theta[m, ...] and the uniform
average is mean_m theta[m] (model soups, Wortsman et al. 2022,
arXiv:2203.05482).

>>> import jax, jax.numpy as jnp
>>> from jaxcombine.tree import all_close, stack, unstack
>>> a, b, c = ({"w": jnp.array([x, 2 * x])} for x in (1.0, 2.0, 6.0))
>>> stacked = stack([a, b, c])                          # leaves [3, ...]
>>> stacked["w"].shape
(3, 2)
>>> jax.tree.map(lambda x: x.mean(0), stacked)["w"].tolist()   # (1 + 2 + 6) / 3 = 3
[3.0, 6.0]
>>> all_close(unstack(stacked)[1], b)
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError

PyTree = Any


def path_string(path: tuple, sep: str = "/") -> str:
    """A leaf path as 'layers/0/mlp/up_proj/kernel' (parts joined by ``sep``).

    Dict keys, sequence indices and attribute names each give one part.

    >>> import jax
    >>> params = {"layers": [{"mlp": {"kernel": 0}}]}
    >>> path, _ = jax.tree_util.tree_flatten_with_path(params)[0][0]
    >>> path_string(path), path_string(path, sep=".")
    ('layers/0/mlp/kernel', 'layers.0.mlp.kernel')
    """
    parts = []
    for key in path:
        for attr in ("key", "idx", "name"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return sep.join(parts)


def leaf_paths(tree: PyTree) -> list[str]:
    """Path strings of every leaf, in ``jax.tree`` order (dict keys sorted).

    >>> leaf_paths({"head": {"kernel": 0, "bias": 0}, "embed": [0, 0]})
    ['embed/0', 'embed/1', 'head/bias', 'head/kernel']
    """
    return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(trees: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
    """Raise a :class:`ConfigError` listing missing and extra paths, or differing shapes.

    Every tree is compared with the first; ``names`` (default ``tree 0``,
    ``tree 1``, ...) say which tree is at fault.

    >>> import numpy as np
    >>> a = {"w": np.zeros(2), "b": np.zeros(1)}
    >>> check_same_structure([a, {"w": np.ones(2), "b": np.ones(1)}])   # silent: same
    >>> check_same_structure([a, {"w": np.zeros(3), "b": np.zeros(1)}], ["base", "ft"])
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: ft: w: shape (3,) differs from (2,) in base
      How to fix: combine models of the same architecture and size
    """
    names = list(names or [f"tree {i}" for i in range(len(trees))])
    reference = {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(trees[0])[0]}
    for name, tree in zip(names[1:], trees[1:], strict=True):
        leaves = {path_string(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
        missing = sorted(set(reference) - set(leaves))
        extra = sorted(set(leaves) - set(reference))
        if missing or extra:
            raise ConfigError(
                f"{name} has a different structure from {names[0]}: missing {missing[:8]}, "
                f"extra {extra[:8]}",
                where=name,
                fix="combine models of the same architecture",
            )
        for path, leaf in leaves.items():
            if jnp.shape(leaf) != jnp.shape(reference[path]):
                raise ConfigError(
                    f"shape {jnp.shape(leaf)} differs from {jnp.shape(reference[path])} "
                    f"in {names[0]}",
                    where=f"{name}: {path}",
                    fix="combine models of the same architecture and size",
                )


def stack(trees: Sequence[PyTree]) -> PyTree:
    """One pytree whose leaves stack the trees' leaves along a new leading axis.

    stacked[m, ...] = trees[m] leaf by leaf; the trees must have one structure
    and equal shapes (:func:`check_same_structure`).

    >>> import jax.numpy as jnp
    >>> s = stack([{"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 4.0])}])
    >>> s["w"].tolist()
    [[1.0, 2.0], [3.0, 4.0]]
    """
    if not trees:
        raise ConfigError("nothing to stack", where="stack(trees)", fix="pass at least one tree")
    check_same_structure(trees)
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(stacked: PyTree) -> list[PyTree]:
    """The inverse of :func:`stack`: the list of trees ``stacked[m]``, m = 0 ... M - 1.

    >>> import jax.numpy as jnp
    >>> [t["w"].tolist() for t in unstack({"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])})]
    [[1.0, 2.0], [3.0, 4.0]]
    """
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def add(a: PyTree, b: PyTree) -> PyTree:
    """a + b, leaf by leaf (task arithmetic: base + task vector).

    >>> import jax.numpy as jnp
    >>> add({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, -1.0])})["w"].tolist()
    [1.5, 1.0]
    """
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    """a - b, leaf by leaf (a task vector: fine-tuned - base, Ilharco et al. 2023,
    arXiv:2212.04089).

    >>> import jax.numpy as jnp
    >>> sub({"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([0.5, -1.0])})["w"].tolist()
    [0.5, 3.0]
    """
    return jax.tree.map(jnp.subtract, a, b)


def scale(tree: PyTree, factor) -> PyTree:
    """factor * tree, leaf by leaf (``factor`` a scalar or a broadcastable array).

    >>> import jax.numpy as jnp
    >>> scale({"w": jnp.array([1.0, -2.0])}, -0.5)["w"].tolist()
    [-0.5, 1.0]
    """
    return jax.tree.map(lambda x: x * factor, tree)


def lerp(a: PyTree, b: PyTree, t) -> PyTree:
    """(1 - t) a + t b, leaf by leaf (linear interpolation between two models).

    >>> import jax.numpy as jnp
    >>> lerp({"w": jnp.array([0.0, 4.0])}, {"w": jnp.array([8.0, 0.0])}, 0.25)["w"].tolist()
    [2.0, 3.0]
    """
    return jax.tree.map(lambda x, y: (1 - t) * x + t * y, a, b)


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum over leaves of <a, b> = sum_leaves sum_i a_i b_i, in float32.

    >>> import jax.numpy as jnp
    >>> a = {"w": jnp.array([1.0, 2.0]), "b": jnp.array([3.0])}
    >>> b = {"w": jnp.array([4.0, 5.0]), "b": jnp.array([-1.0])}
    >>> float(dot(a, b))          # 1*4 + 2*5 + 3*(-1)
    11.0
    """
    parts = jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
    return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves together: sqrt(<tree, tree>) (:func:`dot`).

    >>> import jax.numpy as jnp
    >>> float(norm({"w": jnp.array([3.0]), "b": jnp.array([4.0])}))    # sqrt(9 + 16)
    5.0
    """
    return jnp.sqrt(dot(tree, tree))


def zeros_like(tree: PyTree) -> PyTree:
    """A tree of zeros with the shapes and dtypes of ``tree`` (an empty task vector).

    >>> import jax.numpy as jnp
    >>> zeros_like({"w": jnp.ones((2, 3), jnp.bfloat16)})["w"].dtype
    dtype(bfloat16)
    """
    return jax.tree.map(jnp.zeros_like, tree)


def all_close(a: PyTree, b: PyTree, *, rtol: float = 1e-6, atol: float = 1e-6) -> bool:
    """True when the trees have equal structure and every leaf pair is close:
    |x - y| <= atol + rtol |y| elementwise (``jnp.allclose``).

    >>> import jax.numpy as jnp
    >>> a = {"w": jnp.array([1.0, 2.0])}
    >>> all_close(a, {"w": a["w"] + 1e-7}), all_close(a, {"w": a["w"] + 1e-3})
    (True, False)
    >>> all_close(a, {"v": a["w"]})      # another structure
    False
    """
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        bool(jnp.allclose(x, y, rtol=rtol, atol=atol))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
