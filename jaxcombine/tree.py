"""Pytree math for parameters: stacking, arithmetic, path strings.

Many models of one architecture are one *stacked* pytree whose leaves carry a
leading model axis: merges reduce over that axis, ensembles ``vmap`` over it.
Every function takes and returns plain pytrees (nested dicts, ``nnx.State``)
and works under ``jax.jit`` and on sharded leaves.

Example::

    stacked = stack([params_a, params_b, params_c])     # leaves [3, ...]
    mean = jax.tree.map(lambda x: x.mean(0), stacked)
    assert all_close(unstack(stacked)[1], params_b)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError

PyTree = Any


def path_string(path: tuple, sep: str = "/") -> str:
    """A leaf path as 'layers/0/mlp/up_proj/kernel' (parts joined by ``sep``)."""
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
    """Path strings of every leaf, in ``jax.tree`` order."""
    return [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_same_structure(trees: Sequence[PyTree], names: Sequence[str] | None = None) -> None:
    """Raise a :class:`ConfigError` listing missing and extra paths, or differing shapes."""
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
    """One pytree whose leaves stack the trees' leaves along a new leading axis."""
    if not trees:
        raise ConfigError("nothing to stack", where="stack(trees)", fix="pass at least one tree")
    check_same_structure(trees)
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(stacked: PyTree) -> list[PyTree]:
    """The inverse of :func:`stack`."""
    n = jax.tree.leaves(stacked)[0].shape[0]
    return [jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n)]


def add(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.add, a, b)


def sub(a: PyTree, b: PyTree) -> PyTree:
    return jax.tree.map(jnp.subtract, a, b)


def scale(tree: PyTree, factor) -> PyTree:
    return jax.tree.map(lambda x: x * factor, tree)


def lerp(a: PyTree, b: PyTree, t) -> PyTree:
    """(1 - t) a + t b, leaf by leaf."""
    return jax.tree.map(lambda x, y: (1 - t) * x + t * y, a, b)


def dot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum over leaves of <a, b>, in float32."""
    parts = jax.tree.map(lambda x, y: jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32)), a, b)
    return sum(jax.tree.leaves(parts), jnp.zeros((), jnp.float32))


def norm(tree: PyTree) -> jax.Array:
    """The L2 norm of all leaves together."""
    return jnp.sqrt(dot(tree, tree))


def zeros_like(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def all_close(a: PyTree, b: PyTree, *, rtol: float = 1e-6, atol: float = 1e-6) -> bool:
    """True when the trees have equal structure and every leaf pair is close."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        bool(jnp.allclose(x, y, rtol=rtol, atol=atol))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )
