"""Weight matching: align model B's hidden units with model A's (Git Re-Basin).

Ainsworth, Hayase & Srinivasa 2023, "Git Re-Basin: Merging Models modulo
Permutation Symmetries", arXiv:2209.04836, section 3.2 (algorithm 2).

Weight matching looks for the permutations pi of B's units that bring its
weights closest to A's,

    max_pi  sum_W  < W_A, pi(W_B) >_F        (= min_pi ||W_A - pi(W_B)||^2 up to constants),

where pi(W_B) permutes each axis of every tensor by the permutation the
spec names for it. The problem couples permutations through tensors that
carry two of them (a kernel between two hidden layers), so it is solved by
coordinate descent: in random order, fix all permutations but one, P_l,
and solve for P_l exactly. With every other axis already permuted, the
objective is linear in P_l:

    sum_{(W, a) uses P_l}  < W_A^{(a)}, P_l  W_B^{(a), other axes permuted} >
        = sum_{i, j} C_ij [P_l]_ij,
    C = sum_{(W, a)}  W_A^{(a)} (W_B^{(a)})^T,

where W^{(a)} moves axis a to the front and flattens the rest ([n, -1]).
Maximising sum_ij C_ij P_ij over permutation matrices is a linear assignment
problem, solved exactly by :func:`linear_sum_assignment` (in JAX). A sweep
visits every permutation once; the loop stops after a sweep in which no
permutation improved the objective, or after ``max_iter`` sweeps. Each
accepted step strictly increases the objective, so the descent terminates.

The whole loop (sweeps, random order, assignments) is one jit-compiled
``lax.while_loop``; the permutation to re-solve is chosen by ``lax.switch``,
and permutations of equal size share one compiled assignment solver (a
32-layer decoder compiles one solver for its 32 MLP permutations). Cost
matrices are accumulated in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxcombine.permute._lap import linear_sum_assignment
from jaxcombine.permute._spec import (
    PermutationSpec,
    PermutationSpecError,
    flatten_params,
    permute_array,
)

PyTree = Any

# A step is accepted only if it improves the objective by more than this
# fraction of the cost matrix's scale (guards against float ties flip-flopping).
_REL_TOL = 1e-6


def weight_matching(
    spec: PermutationSpec,
    params_a: PyTree,
    params_b: PyTree,
    *,
    key: jax.Array,
    max_iter: int = 100,
    init_perms: Mapping[str, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Permutations of ``params_b``'s units that align it with ``params_a``.

    Coordinate descent over the permutations of ``spec`` (Git Re-Basin weight
    matching, algorithm 2), each step an exact linear assignment solved in JAX;
    see the module docstring for the math.

    Args:
      spec: the permutation spec of the architecture.
      params_a: the reference parameters (dict tree or ``nnx.State``).
      params_b: parameters of the same structure and shapes, to be aligned.
      key: a ``jax.random`` key for the order in which permutations are visited.
      max_iter: the maximum number of sweeps over all permutations.
      init_perms: starting permutations (default: the identity).

    Returns:
      A dict permutation name -> int32 index vector such that
      ``apply_permutation(spec, perms, params_b)`` is aligned with ``params_a``
      (and computes the same function as ``params_b``).

    A shuffled copy of ``params_a`` is matched back exactly, so the composed
    permutation is the identity:

    >>> import numpy as np
    >>> from jaxcombine.permute import apply_permutation, dense_chain_axes, random_perms
    >>> rng = np.random.default_rng(0)
    >>> params_a = {"layers": [{"kernel": rng.normal(size=(3, 8)), "bias": rng.normal(size=8)}],
    ...             "head": {"kernel": rng.normal(size=(8, 2)), "bias": rng.normal(size=2)}}
    >>> spec = PermutationSpec(dense_chain_axes(["layers/0", "head"]))
    >>> shuffle = random_perms(spec, params_a, jax.random.key(0))
    >>> params_b = apply_permutation(spec, shuffle, params_a)
    >>> perms = weight_matching(spec, params_a, params_b, key=jax.random.key(1))
    >>> print(shuffle["hidden_0"][perms["hidden_0"]])
    [0 1 2 3 4 5 6 7]

    To merge two models: ``jaxcombine.tree.lerp(params_a,
    apply_permutation(spec, perms, params_b), 0.5)``.

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836 (section 3.2, algorithm 2).
    """
    sizes = spec.sizes(params_a, name="params_a")
    spec.sizes(params_b, name="params_b")
    paths_a, arrays_a, _, _ = flatten_params(params_a)
    paths_b, arrays_b, _, _ = flatten_params(params_b)
    shapes_a = {p: jnp.shape(x) for p, x in zip(paths_a, arrays_a, strict=True)}
    for p, x in zip(paths_b, arrays_b, strict=True):
        if jnp.shape(x) != shapes_a[p]:
            raise PermutationSpecError(
                f"params_b has shape {jnp.shape(x)}, params_a has {shapes_a[p]}",
                where=f"weight_matching: {p}",
                fix="align two models of the same architecture and size",
            )
    if not isinstance(max_iter, int) or max_iter < 1:
        raise PermutationSpecError(
            f"max_iter must be a positive integer, got {max_iter!r}",
            where="weight_matching(max_iter)",
        )
    if init_perms is None:
        perms = {name: jnp.arange(size, dtype=jnp.int32) for name, size in sizes.items()}
    else:
        spec.check_perms(init_perms, sizes)
        perms = {name: jnp.asarray(init_perms[name], jnp.int32) for name in spec.names}
    if not spec.names:
        return {}
    a = dict(zip(paths_a, arrays_a, strict=True))
    b = dict(zip(paths_b, arrays_b, strict=True))
    # Only tensors that some permutation acts on enter the objective.
    used = {path for uses in spec.perm_to_axes.values() for path, _ in uses}
    a = {p: a[p] for p in sorted(used)}
    b = {p: b[p] for p in sorted(used)}
    return _weight_matching(spec, max_iter, a, b, perms, key)


def cost_matrix(
    spec: PermutationSpec,
    name: str,
    a: Mapping[str, jax.Array],
    b: Mapping[str, jax.Array],
    perms: Mapping[str, jax.Array],
) -> jax.Array:
    """C = sum over the axes (W, ax) permutation ``name`` acts on of W_A^{(ax)} (W_B^{(ax)})^T.

    ``a``, ``b``: path -> array; W_B has every other axis permuted by ``perms``.
    C[i, j] is the gain of putting B's unit j at A's position i.

    One kernel [in, h] and one bias [h]: C = W_A^T W_B + b_A b_B^T.

    >>> import numpy as np
    >>> spec = PermutationSpec({"k": (None, "h"), "b": ("h",)})
    >>> rng = np.random.default_rng(0)
    >>> a = {"k": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    >>> b = {"k": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    >>> c = cost_matrix(spec, "h", a, b, {"h": jnp.arange(4)})
    >>> np.allclose(c, a["k"].T @ b["k"] + np.outer(a["b"], b["b"]), atol=1e-5)
    True

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836 (section 3.2).
    """
    total = None
    for path, axis in spec.perm_to_axes[name]:
        entry = tuple(None if k == axis else q for k, q in enumerate(spec.axes[path]))
        wa = jnp.moveaxis(a[path].astype(jnp.float32), axis, 0)
        wb = jnp.moveaxis(permute_array(b[path], entry, perms).astype(jnp.float32), axis, 0)
        n = wa.shape[0]
        c = jnp.matmul(wa.reshape(n, -1), wb.reshape(n, -1).T, precision=jax.lax.Precision.HIGHEST)
        total = c if total is None else total + c
    return total


@functools.partial(jax.jit, static_argnums=(0, 1))
def _weight_matching(spec, max_iter, a, b, perms, key):
    names = spec.names
    # Permutations of one size share one compiled assignment solver: a group's
    # branch picks its member's cost matrix, solves, and writes the member back.
    sizes = {name: perms[name].shape[0] for name in names}
    groups = [[n for n in names if sizes[n] == size] for size in sorted(set(sizes.values()))]
    where = {n: (g, group.index(n)) for g, group in enumerate(groups) for n in group}
    group_of = jnp.array([where[n][0] for n in names])
    index_in_group = jnp.array([where[n][1] for n in names])

    def make_group_step(group):
        def cost_of(name):
            return lambda perms: (cost_matrix(spec, name, a, b, perms), perms[name])

        def write(name):
            return lambda perms, new: {**perms, name: new}

        def step(member, perms):
            c, current = jax.lax.switch(member, [cost_of(n) for n in group], perms)
            _, cols = linear_sum_assignment(c, maximize=True)
            rows = jnp.arange(c.shape[0])
            old = c[rows, current].sum()
            new = c[rows, cols].sum()
            improved = new - old > _REL_TOL * (jnp.abs(c).sum() / c.shape[0] + 1e-30)
            chosen = jnp.where(improved, cols, current).astype(jnp.int32)
            return jax.lax.switch(member, [write(n) for n in group], perms, chosen), improved

        return step

    group_steps = [make_group_step(group) for group in groups]

    def step_for(index, perms):
        """Re-solve permutation ``names[index]`` with all others fixed."""
        return jax.lax.switch(group_of[index], group_steps, index_in_group[index], perms)

    def sweep(state):
        it, key, perms, _ = state
        key, sub = jax.random.split(key)
        order = jax.random.permutation(sub, len(names))

        def visit(k, carry):
            perms, progress = carry
            perms, improved = step_for(order[k], perms)
            return perms, progress | improved

        perms, progress = jax.lax.fori_loop(0, len(names), visit, (perms, jnp.zeros((), bool)))
        return it + 1, key, perms, progress

    state = (jnp.zeros((), jnp.int32), key, dict(perms), jnp.ones((), bool))
    _, _, perms, _ = jax.lax.while_loop(lambda s: (s[0] < max_iter) & s[3], sweep, state)
    return perms
