"""Logical axis names -> device mesh axes.

Layers name their parameter axes logically (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``expert``, ``batch``); a job chooses a
rules table mapping each logical name to a mesh axis (or None: replicated).
No layer names a mesh axis. Rules are ``(logical, mesh_axis)`` pairs, first
match wins (MaxText's ``logical_axis_rules``).

Example::

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    model = shard_model(model, mesh)            # params placed by DEFAULT_RULES
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxcombine.errors import ConfigError

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("head_dim", None),
    ("mlp", "model"),
    ("expert", "expert"),
)


def partition_spec(
    axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh,
    rules: Rules = DEFAULT_RULES,
    *,
    where: str = "parameter",
) -> PartitionSpec:
    """The mesh PartitionSpec for a value with logical ``axes`` and ``shape``.

    A logical name with no rule, or whose mesh axis is not in ``mesh`` or is
    already used by an earlier dimension, is replicated. A dimension that the
    mesh axis size does not divide is an error naming both sizes.
    """
    table = {}
    for logical, mesh_axis in rules:
        table.setdefault(logical, mesh_axis)
    used: set[str] = set()
    spec = []
    for axis, size in zip(axes, shape, strict=True):
        mesh_axis = table.get(axis) if axis is not None else None
        names = (mesh_axis,) if isinstance(mesh_axis, str) else tuple(mesh_axis or ())
        names = tuple(n for n in names if n in mesh.shape and n not in used)
        count = 1
        for n in names:
            count *= mesh.shape[n]
        if names and size % count:
            raise ConfigError(
                f"dimension {axis!r} of size {size} is not divisible by mesh axes {names} "
                f"of total size {count}",
                where=where,
                fix="change the mesh shape or map this logical axis to None in the rules",
            )
        used.update(names)
        spec.append(None if not names else names[0] if len(names) == 1 else names)
    return PartitionSpec(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """A NamedSharding for every variable of ``state`` (concrete or abstract), as a pure dict."""
    flat = {}
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        where = "/".join(map(str, path))
        flat[path] = NamedSharding(
            mesh, partition_spec(axes, variable.shape, mesh, rules, where=where)
        )
    return flat


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place ``model``'s parameters on ``mesh`` according to their logical axes (in place)."""
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    flat = [
        (path, variable.replace(jax.device_put(variable.get_value(), shardings[path])))
        for path, variable in nnx.to_flat_state(state)
    ]
    nnx.update(model, nnx.from_flat_state(flat))
    return model
