"""Permutation specs: which axis of which tensor each permutation acts on.

A network has many equivalent parameterisations: permuting the hidden units
of a layer (the output axis of its kernel and bias, the input axis of the
next kernel) leaves its function unchanged. A :class:`PermutationSpec`
records, for every parameter, which named permutation acts on each axis:

    spec = PermutationSpec({
        "layers/0/kernel": (None, "hidden_0"),      # [in, h0]
        "layers/0/bias": ("hidden_0",),
        "head/kernel": ("hidden_0", None),          # [h0, classes]
        "head/bias": None,                          # not permuted
    })

Paths are :func:`jaxcombine.tree.path_string` of the leaves of a plain dict
tree, or of an ``nnx.State`` whose ``Variable`` leaves count as one leaf each
(so ``"layers/0/kernel"``, not ``"layers/0/kernel/value"``).

Every leaf of the parameters must be listed: a tensor that no permutation
touches is written ``None`` (or a tuple of ``None``, one per axis). Nothing is
skipped silently. The inverse map, permutation name -> [(path, axis), ...], is
derived (:attr:`PermutationSpec.perm_to_axes`) and validated against the
parameters by :meth:`PermutationSpec.sizes`: paths missing from the
parameters, parameters missing from the spec, wrong ranks, and one
permutation acting on axes of different sizes are errors that name the
tensors and sizes.

Convention: applying ``perm`` to an axis takes ``x[..., perm[i], ...]`` into
position i (``jnp.take(x, perm, axis)``), as in git-re-basin (Ainsworth,
Hayase & Srinivasa 2023, arXiv:2209.04836).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.errors import ConfigError
from jaxcombine.tree import path_string

PyTree = Any
Axes = tuple[str | None, ...]


class PermutationSpecError(ConfigError):
    """A permutation spec does not fit the parameters, or permutations do not fit the spec.

    >>> PermutationSpec({"w": (None, "h")}).sizes({"w": jnp.zeros(3)})
    Traceback (most recent call last):
    ...
    jaxcombine.permute._spec.PermutationSpecError: permutation spec: w: the spec gives 2 axes ...
    """


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def flatten_params(params: PyTree) -> tuple[list[str], list[jax.Array], list, Any]:
    """(paths, arrays, leaves, treedef); ``nnx.Variable`` leaves count as one leaf."""
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)
    paths = [path_string(p) for p, _ in flat]
    leaves = [x for _, x in flat]
    arrays = [x.get_value() if _is_variable(x) else x for x in leaves]
    return paths, arrays, leaves, treedef


def unflatten_params(treedef, leaves: list, arrays: list[jax.Array]) -> PyTree:
    """Rebuild a tree from :func:`flatten_params` output with new arrays."""
    new = [
        leaf.replace(x) if _is_variable(leaf) else x for leaf, x in zip(leaves, arrays, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


class PermutationSpec:
    """Parameter path -> permutation name (or None) per axis, and its inverse.

    Args:
      axes: a mapping from path string to a tuple with one entry per axis of
        the tensor: a permutation name, or ``None`` for an axis that is not
        permuted. ``None`` instead of a tuple marks a tensor that is not
        permuted at all (any rank).

    Attributes:
      axes: the mapping, with tuples.
      perm_to_axes: permutation name -> list of ``(path, axis)`` it acts on.
      names: the permutation names, sorted.

    The spec is hashable, so it can be a static argument of ``jax.jit``.

    >>> spec = PermutationSpec({"layers/0/kernel": (None, "h"), "layers/0/bias": ("h",),
    ...                         "head/kernel": ("h", None), "head/bias": None})
    >>> spec.perm_to_axes
    {'h': [('head/kernel', 0), ('layers/0/bias', 0), ('layers/0/kernel', 1)]}
    >>> spec.sizes({"layers": [{"kernel": jnp.zeros((3, 5)), "bias": jnp.zeros(5)}],
    ...             "head": {"kernel": jnp.zeros((5, 2)), "bias": jnp.zeros(2)}})
    {'h': 5}

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836 (its permutation specs).
    """

    def __init__(self, axes: Mapping[str, Axes | None]):
        if not isinstance(axes, Mapping):
            raise PermutationSpecError(
                f"a permutation spec is a mapping path -> axes, got {type(axes).__name__}",
                where="PermutationSpec(axes)",
            )
        clean: dict[str, Axes | None] = {}
        for path, entry in axes.items():
            if not isinstance(path, str):
                raise PermutationSpecError(
                    f"spec keys are path strings like 'layers/0/kernel', got {path!r}",
                    where="PermutationSpec(axes)",
                )
            if entry is not None:
                if isinstance(entry, str) or not isinstance(entry, (tuple, list)):
                    raise PermutationSpecError(
                        f"axes must be a tuple with one permutation name or None per axis, "
                        f"got {entry!r}",
                        where=f"permutation spec: {path}",
                        fix=f"write e.g. {path!r}: ({entry!r},) for a 1-D tensor",
                    )
                entry = tuple(entry)
                bad = [a for a in entry if a is not None and not isinstance(a, str)]
                if bad:
                    raise PermutationSpecError(
                        f"axis entries must be permutation names or None, got {bad}",
                        where=f"permutation spec: {path}",
                    )
            clean[path] = entry
        self.axes: dict[str, Axes | None] = dict(sorted(clean.items()))
        inverse: dict[str, list[tuple[str, int]]] = {}
        for path, entry in self.axes.items():
            for axis, name in enumerate(entry or ()):
                if name is not None:
                    inverse.setdefault(name, []).append((path, axis))
        self.perm_to_axes: dict[str, list[tuple[str, int]]] = dict(sorted(inverse.items()))
        self.names: tuple[str, ...] = tuple(self.perm_to_axes)
        self._key = tuple(self.axes.items())

    def __eq__(self, other) -> bool:
        return isinstance(other, PermutationSpec) and self._key == other._key

    def __hash__(self) -> int:
        return hash(self._key)

    def __repr__(self) -> str:
        lines = [f"  {path!r}: {entry!r}," for path, entry in self.axes.items()]
        return "PermutationSpec({\n" + "\n".join(lines) + "\n})"

    def sizes(self, params: PyTree, *, name: str = "params") -> dict[str, int]:
        """Validate the spec against ``params`` and return permutation name -> size.

        Raises :class:`PermutationSpecError` when spec paths are missing from
        the parameters, parameters are missing from the spec, an axes tuple
        has the wrong length, or one permutation acts on axes of different
        sizes (naming both tensors and both sizes).
        """
        paths, arrays, _, _ = flatten_params(params)
        shapes = {p: tuple(jnp.shape(x)) for p, x in zip(paths, arrays, strict=True)}
        return self._sizes_from_shapes(shapes, name)

    def _sizes_from_shapes(
        self, shapes: Mapping[str, tuple[int, ...]], name: str
    ) -> dict[str, int]:
        missing = sorted(set(self.axes) - set(shapes))
        extra = sorted(set(shapes) - set(self.axes))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"spec paths not in {name}: {missing}")
            if extra:
                parts.append(f"{name} leaves not in the spec: {extra}")
            raise PermutationSpecError(
                "the permutation spec does not match the parameters; " + "; ".join(parts),
                where=f"PermutationSpec vs {name}",
                fix="list every parameter path exactly once (write None for tensors that "
                "are not permuted), spelled as jaxcombine.tree.path_string gives it",
            )
        for path, entry in self.axes.items():
            if entry is not None and len(entry) != len(shapes[path]):
                raise PermutationSpecError(
                    f"the spec gives {len(entry)} axes {entry} for a tensor of shape "
                    f"{shapes[path]} ({len(shapes[path])} axes)",
                    where=f"permutation spec: {path}",
                    fix="give one entry (a permutation name or None) per axis",
                )
        sizes: dict[str, int] = {}
        first: dict[str, tuple[str, int]] = {}
        for perm, uses in self.perm_to_axes.items():
            for path, axis in uses:
                size = shapes[path][axis]
                if perm not in sizes:
                    sizes[perm], first[perm] = size, (path, axis)
                elif size != sizes[perm]:
                    path0, axis0 = first[perm]
                    raise PermutationSpecError(
                        f"permutation {perm!r} acts on axes of different sizes: axis {axis0} of "
                        f"{path0!r} has size {sizes[perm]} but axis {axis} of {path!r} has size "
                        f"{size}",
                        where=f"permutation spec ({name})",
                        fix="use one permutation name only for axes that index the same units",
                    )
        return sizes

    def check_perms(self, perms: Mapping[str, jax.Array], sizes: Mapping[str, int]) -> None:
        """Raise unless ``perms`` has exactly the spec's names, each a vector of the right size."""
        missing = sorted(set(self.names) - set(perms))
        extra = sorted(set(perms) - set(self.names))
        if missing or extra:
            raise PermutationSpecError(
                f"permutations do not match the spec: missing {missing}, unknown {extra}",
                where="perms",
                fix=f"pass one index vector per permutation name: {list(self.names)}",
            )
        for perm in self.names:
            shape = tuple(jnp.shape(perms[perm]))
            if shape != (sizes[perm],):
                raise PermutationSpecError(
                    f"permutation {perm!r} has shape {shape}, expected ({sizes[perm]},)",
                    where=f"perms[{perm!r}]",
                    fix="pass an index vector with one entry per unit",
                )


def identity_perms(spec: PermutationSpec, params: PyTree) -> dict[str, jax.Array]:
    """The identity permutation for every name in ``spec`` (int32 ``arange``).

    >>> spec = PermutationSpec({"w": (None, "h")})
    >>> identity_perms(spec, {"w": jnp.zeros((2, 3))})
    {'h': Array([0, 1, 2], dtype=int32)}
    """
    return {name: jnp.arange(size, dtype=jnp.int32) for name, size in spec.sizes(params).items()}


def random_perms(spec: PermutationSpec, params: PyTree, key: jax.Array) -> dict[str, jax.Array]:
    """An independent uniformly random permutation for every name in ``spec``.

    >>> spec = PermutationSpec({"w": (None, "h")})
    >>> perm = random_perms(spec, {"w": jnp.zeros((2, 5))}, jax.random.key(0))["h"]
    >>> sorted(perm.tolist())
    [0, 1, 2, 3, 4]
    """
    return _random_perms(key, tuple(spec.sizes(params).items()))


@functools.partial(jax.jit, static_argnums=1)
def _random_perms(key, sizes):
    keys = jax.random.split(key, max(len(sizes), 1))
    return {
        name: jax.random.permutation(k, size).astype(jnp.int32)
        for k, (name, size) in zip(keys, sizes, strict=False)
    }


def invert_perms(perms: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """The inverse of every permutation: ``inv[perm[i]] = i``.

    >>> invert_perms({"h": jnp.array([2, 0, 1])})["h"]
    Array([1, 2, 0], dtype=int32)
    """
    return {name: jnp.argsort(p).astype(jnp.int32) for name, p in perms.items()}


def compose_perms(
    outer: Mapping[str, jax.Array], inner: Mapping[str, jax.Array]
) -> dict[str, jax.Array]:
    """Permutations equivalent to applying ``inner`` then ``outer``: ``inner[outer]``.

    ``apply_permutation(spec, outer, apply_permutation(spec, inner, p))`` equals
    ``apply_permutation(spec, compose_perms(outer, inner), p)``.

    >>> spec, p = PermutationSpec({"v": ("h",)}), {"v": jnp.array([10, 20, 30])}
    >>> outer, inner = {"h": jnp.array([1, 2, 0])}, {"h": jnp.array([2, 1, 0])}
    >>> apply_permutation(spec, outer, apply_permutation(spec, inner, p))["v"]
    Array([20, 10, 30], dtype=int32)
    >>> apply_permutation(spec, compose_perms(outer, inner), p)["v"]
    Array([20, 10, 30], dtype=int32)
    """
    return {name: jnp.asarray(inner[name])[jnp.asarray(outer[name])] for name in outer}


def permute_array(x: jax.Array, entry: Axes | None, perms: Mapping[str, jax.Array]) -> jax.Array:
    """Apply to ``x`` the permutations named per axis by ``entry``."""
    for axis, name in enumerate(entry or ()):
        if name is not None:
            x = jnp.take(x, perms[name], axis=axis)
    return x


def apply_permutation(
    spec: PermutationSpec, perms: Mapping[str, jax.Array], params: PyTree
) -> PyTree:
    """Permute every axis of ``params`` named in ``spec``; a pure, jit-able function.

    For a tensor W with axes (p_0, ..., p_k) in the spec, the result is

        W'[i_0, ..., i_k] = W[P_0[i_0], ..., P_k[i_k]]

    with P_a = ``perms[p_a]`` (the identity where p_a is None). The output has
    the structure of ``params`` (a dict or an ``nnx.State``). A consistent spec
    makes the permuted network compute the same function:

    >>> from jaxcombine.permute import dense_chain_axes
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> params = {"layers": [{"kernel": rng.normal(size=(3, 5)), "bias": rng.normal(size=5)}],
    ...           "head": {"kernel": rng.normal(size=(5, 2)), "bias": rng.normal(size=2)}}
    >>> spec = PermutationSpec(dense_chain_axes(["layers/0", "head"]))
    >>> permuted = apply_permutation(spec, {"hidden_0": jnp.array([4, 3, 2, 1, 0])}, params)
    >>> np.allclose(permuted["layers"][0]["bias"], params["layers"][0]["bias"][::-1])
    True
    >>> def mlp(p, x):
    ...     hidden = np.maximum(x @ p["layers"][0]["kernel"] + p["layers"][0]["bias"], 0)
    ...     return hidden @ p["head"]["kernel"] + p["head"]["bias"]
    >>> x = rng.normal(size=(4, 3))
    >>> np.allclose(mlp(params, x), mlp(jax.tree.map(np.asarray, permuted), x))
    True

    Under ``jax.jit`` the spec is static:
    ``jax.jit(apply_permutation, static_argnums=0)(spec, perms, params)``.

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836.
    """
    sizes = spec.sizes(params)
    spec.check_perms(perms, sizes)
    paths, arrays, leaves, treedef = flatten_params(params)
    new = [permute_array(x, spec.axes[p], perms) for p, x in zip(paths, arrays, strict=True)]
    return unflatten_params(treedef, leaves, new)
