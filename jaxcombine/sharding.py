"""Logical axis names -> device mesh axes.

Layers name their parameter axes logically (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``, ``expert``, ``batch``); a job chooses a
rules table mapping each logical name to a mesh axis (or None: replicated).
No layer names a mesh axis. Rules are ``(logical, mesh_axis)`` pairs, first
match wins (MaxText's ``logical_axis_rules``).

The compiler then partitions the computation from these annotations (GSPMD,
Xu et al. 2021, arXiv:2105.04663). A dimension of size n mapped to mesh axes
of total size k holds n / k entries on each device.

>>> from jax.sharding import AbstractMesh
>>> from jaxcombine.sharding import partition_spec
>>> mesh = AbstractMesh((2, 4), ("data", "model"))
>>> partition_spec(("embed", "mlp"), (16, 64), mesh)     # an MLP kernel: 64 / 4 per device
P(None, 'model')
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

    ``mesh`` may be an ``AbstractMesh`` (only its axis sizes are read).

    >>> from jax.sharding import AbstractMesh
    >>> mesh = AbstractMesh((2, 4), ("data", "model"))
    >>> partition_spec(("vocab", "embed"), (32, 16), mesh)
    P('model', None)
    >>> partition_spec(("heads", "mlp"), (8, 64), mesh)    # 'model' already taken by heads
    P('model', None)
    >>> partition_spec(("batch", "embed"), (6, 16), mesh, [("batch", ("data", "model"))])
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: parameter: dimension 'batch' of size 6 is not divisible by
    mesh axes ('data', 'model') of total size 8
      How to fix: change the mesh shape or map this logical axis to None in the rules
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
    """A NamedSharding for every variable of ``state`` (concrete or abstract), as a pure dict.

    Keys are the variables' paths (tuples); a variable without ``out_sharding``
    metadata is replicated.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> class Layer(nnx.Module):
    ...     def __init__(self):
    ...         self.w = nnx.Param(jnp.ones((4, 8)), out_sharding=("embed", "mlp"),
    ...                            eager_sharding=False)
    ...         self.b = nnx.Param(jnp.zeros(8))
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    >>> shardings = state_shardings(nnx.state(Layer()), mesh)
    >>> {path: s.spec for path, s in sorted(shardings.items())}
    {('b',): P(None,), ('w',): P(None, 'model')}
    """
    flat = {}
    for path, variable in nnx.to_flat_state(state):
        axes = variable.get_metadata().get("out_sharding") or (None,) * len(variable.shape)
        where = "/".join(map(str, path))
        flat[path] = NamedSharding(
            mesh, partition_spec(axes, variable.shape, mesh, rules, where=where)
        )
    return flat


def shard_model(model: nnx.Module, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.Module:
    """Place ``model``'s parameters on ``mesh`` according to their logical axes (in place).

    Returns ``model`` itself, each variable moved by ``jax.device_put`` to its
    :func:`state_shardings` entry; the values are unchanged.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> from jaxcombine.sharding import shard_model
    >>> class MLP(nnx.Module):
    ...     def __init__(self):
    ...         self.up = nnx.Param(jnp.ones((4, 8)), out_sharding=("embed", "mlp"),
    ...                             eager_sharding=False)
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    >>> model = shard_model(MLP(), mesh)         # params placed by DEFAULT_RULES
    >>> model.up[...].sharding.spec, model.up[...].addressable_shards[0].data.shape  # 8 / 4
    (P(None, 'model'), (4, 2))
    """
    graphdef, state = nnx.split(model)
    shardings = state_shardings(state, mesh, rules)
    flat = [
        (path, variable.replace(jax.device_put(variable.get_value(), shardings[path])))
        for path, variable in nnx.to_flat_state(state)
    ]
    nnx.update(model, nnx.from_flat_state(flat))
    return model
