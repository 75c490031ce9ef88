"""Expert parallelism for :class:`SparseMoE` (token choice): experts sharded
over a mesh axis, tokens exchanged with all-to-all (GShard, arXiv:2006.16668;
Switch, arXiv:2101.03961).

Layout (GShard's and MaxText's): the expert axis reuses the data devices.
On a mesh with axes ``("data", "expert")`` of sizes ``n_d x n_e``:

    groups  G   sharded over data x expert (data major): G / (n_d n_e) per device
    experts E   sharded over expert, replicated over data: E / n_e per device
    router      replicated

so every device routes its own groups, and the exchange runs among the
``n_e`` devices of one data index. A 1-D mesh ``("expert",)`` (with
``data_axis=None``) is the same with ``n_d = 1``. Other mesh axes replicate
the computation. Letters as in :mod:`jaxcombine.moe.routing`; ``n = n_e``,
``El = E / n`` local experts, ``g`` local groups.

Capacity mode (``capacity_factor`` set), per device::

    routing = token_choice(softmax(x_g . W_router))      # [g, S, K], own groups
    inputs  = dispatch(x_g, routing)                      # [g, E, C, D]
    inputs  = all_to_all(inputs, split E, concat G)       # [n g, El, C, D]
    outputs = expert_ffn(local experts, inputs)           # [n g, El, C, D]
    outputs = all_to_all(outputs, split G, concat E)      # [g, E, C, D]
    y       = combine(outputs, routing)                   # [g, S, D]

Routing and capacity are per group, so the same choices are dropped as in
the unsharded layer. Losses and statistics are means over groups (or tokens),
each device holds the same number of them, so ``pmean`` over the token axes
gives the unsharded values.

Dropless mode (``capacity_factor=None``): the ``g S K`` choices are sorted by
expert; the per-expert counts are exchanged first (``all_to_all``), then the
rows with :func:`jax.lax.ragged_all_to_all` into a buffer of ``n g S K`` rows
(the worst case: every choice of every device lands on one device); the local
experts run as grouped matmuls (:func:`jax.lax.ragged_dot`), and the rows go
back the same way (MegaBlocks, arXiv:2211.15841; MaxText's ragged path).
XLA:CPU has no ragged all-to-all, so on CPU (``exchange="auto"``) the same
exchange is done by :func:`dense_ragged_all_to_all`, a padded all-to-all
with ``ragged_all_to_all``'s semantics.

Example::

    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "expert"))
    layer = SparseMoE(MoEConfig(8, 64, 128), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)

    @jax.jit
    def loss(state, x):
        y, aux = expert_parallel(nnx.merge(graphdef, state), x, mesh)
        return jnp.mean(y**2) + 1e-2 * aux.load_balancing_loss

    grads = jax.grad(loss)(state, x)   # x: [B, T, D], B a multiple of 8
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxcombine.errors import ConfigError, InputError
from jaxcombine.moe import layer as moe_layer
from jaxcombine.moe import routing as R

if TYPE_CHECKING:
    from jaxcombine.moe.layer import MoEAux, MoEConfig, SparseMoE

Exchange = Literal["auto", "ragged", "dense"]


def expert_parallel(
    layer: SparseMoE,
    x: jax.Array,
    mesh: Mesh,
    *,
    data_axis: str | None = "data",
    expert_axis: str = "expert",
    deterministic: bool = True,
    exchange: Exchange = "auto",
) -> tuple[jax.Array, MoEAux]:
    """``layer(x)`` with the experts sharded over ``mesh`` axis ``expert_axis``
    and the routing groups over ``data_axis`` x ``expert_axis``: the same
    ``(y [B, T, D], MoEAux)`` as the unsharded layer.

    Works eagerly, under :func:`jax.jit` and :func:`jax.grad` (of the layer's
    state through ``nnx.split``/``nnx.merge``, or :func:`nnx.grad`), and from a
    module's ``__call__``. Router jitter (``deterministic=False``) draws the
    same noise as the layer and, as for the layer, needs :func:`nnx.grad`
    (its RNG count is updated inside the gradient's trace).

    ``exchange`` (dropless routing only): "ragged"
    (:func:`jax.lax.ragged_all_to_all`, GPU/TPU), "dense"
    (:func:`dense_ragged_all_to_all`, any backend) or "auto" (dense on CPU).

    Raises :class:`ConfigError` before any tracing when the mesh axes are
    missing, ``num_experts`` is not a multiple of the expert-axis size, or
    the number of groups is not a multiple of the devices that shard them.

    Four experts over the ``expert`` axis of a 2 x 4 mesh, eight sequences
    (routing groups), capacity factor 1: the same outputs and the same dropped
    choices as the unsharded layer.

    >>> import numpy as np
    >>> from flax import nnx
    >>> from jaxcombine.moe import MoEConfig, SparseMoE
    >>> mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "expert"))
    >>> layer = SparseMoE(MoEConfig(4, 4, 4, capacity_factor=1.0), rngs=nnx.Rngs(0))
    >>> graphdef, state = nnx.split(layer)
    >>> x = np.random.default_rng(0).normal(size=(8, 3, 4)).astype(np.float32)
    >>> sharded = jax.jit(lambda s, x: expert_parallel(nnx.merge(graphdef, s), x, mesh))
    >>> y, aux = sharded(state, x)
    >>> y_ref, aux_ref = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    >>> bool(np.allclose(y, y_ref, atol=1e-6)), float(aux.dropped) == float(aux_ref.dropped)
    (True, True)

    References: Lepikhin et al. 2020, GShard: Scaling Giant Models with Conditional Computation and
    Automatic Sharding, arXiv:2006.16668; dropless exchange as in MegaBlocks (Gale et al. 2022,
    arXiv:2211.15841).
    """
    config = layer.config
    plan = _plan(config, x.shape, mesh, data_axis, expert_axis, exchange)
    groups = x.reshape(plan.groups, plan.group_size, x.shape[-1])  # [G, S, D]
    routed = layer.router_inputs(groups, deterministic)
    body = _capacity_body if plan.capacity is not None else _dropless_body
    tokens = P(plan.token_axes)
    run = jax.shard_map(
        lambda router, weights, groups, routed: body(plan, config, router, weights, groups, routed),
        mesh=mesh,
        in_specs=(P(), P(expert_axis), tokens, tokens),
        out_specs=(tokens, P()),
    )
    y, aux = run(layer.router[...], layer.expert_weights(), groups, routed)
    return y.reshape(x.shape).astype(x.dtype), aux


# ---- plan and validation -------------------------------------------------------------


class _Plan(NamedTuple):
    groups: int  # G
    group_size: int  # S
    capacity: int | None  # C, None: dropless
    token_axes: tuple[str, ...]  # mesh axes sharding G
    expert_axis: str
    experts: int  # n = size of the expert axis
    ragged: bool  # dropless exchange with ragged_all_to_all


def _plan(
    config: MoEConfig, shape, mesh: Mesh, data_axis, expert_axis, exchange: Exchange
) -> _Plan:
    where = "expert_parallel"
    if config.routing != "token_choice":
        raise ConfigError(
            f"expert parallelism supports token-choice routing, not {config.routing!r}",
            where="MoEConfig.routing",
            fix="use routing='token_choice', or call the layer unsharded",
        )
    if exchange not in ("auto", "ragged", "dense"):
        raise ConfigError(
            f"unknown exchange {exchange!r}",
            where=where,
            fix="use 'auto', 'ragged' (GPU/TPU) or 'dense'",
        )
    axes = dict(mesh.shape)
    for name, axis in (("expert_axis", expert_axis), ("data_axis", data_axis)):
        if axis is not None and axis not in axes:
            raise ConfigError(
                f"{name}={axis!r} is not an axis of the mesh {axes}",
                where=where,
                fix=f"name a mesh axis ({', '.join(map(repr, axes))})"
                + (", or data_axis=None for a 1-D expert mesh" if name == "data_axis" else ""),
            )
    explicit = [
        name
        for name, kind in zip(mesh.axis_names, mesh.axis_types, strict=True)
        if kind == jax.sharding.AxisType.Explicit
    ]
    if explicit:
        raise ConfigError(
            f"mesh axes {explicit} are Explicit (jax.make_mesh's default); expert_parallel "
            "places the exchange itself with shard_map over Auto axes",
            where=where,
            fix="build the mesh with jaxcombine.distributed.make_mesh, or pass "
            "axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names) to jax.make_mesh",
        )
    if data_axis == expert_axis:
        raise ConfigError(
            f"data_axis and expert_axis are both {expert_axis!r}",
            where=where,
            fix="groups are sharded over data x expert already: pass data_axis=None",
        )
    E, n = config.num_experts, axes[expert_axis]
    if E % n:
        raise ConfigError(
            f"num_experts={E} is not divisible by the size {n} of mesh axis {expert_axis!r}",
            where="MoEConfig.num_experts",
            fix=f"use a multiple of {n} experts, or an expert axis whose size divides {E}",
        )
    if len(shape) != 3 or shape[-1] != config.hidden_size:
        raise InputError(
            f"input of shape {tuple(shape)}, expected [batch, length, {config.hidden_size}]",
            where=where,
        )
    B, T, _ = shape
    G, S = config.group_shape(B, T)
    token_axes = (expert_axis,) if data_axis is None else (data_axis, expert_axis)
    devices = 1
    for axis in token_axes:
        devices *= axes[axis]
    if G % devices:
        sizes = " x ".join(f"{a}={axes[a]}" for a in token_axes)
        raise ConfigError(
            f"{G} routing groups (batch {B} x length {T} / group size {S}) are not divisible "
            f"by the {devices} devices that shard them ({sizes})",
            where=where,
            fix=f"use a batch (or a group_size) giving a multiple of {devices} groups, "
            "or a smaller mesh",
        )
    capacity = config.capacity(S)
    mesh_devices = getattr(mesh, "devices", None)  # None: an AbstractMesh
    platform = jax.default_backend() if mesh_devices is None else mesh_devices.flat[0].platform
    ragged = exchange == "ragged" or (exchange == "auto" and platform != "cpu")
    return _Plan(G, S, capacity, token_axes, expert_axis, n, ragged)


# ---- per-device bodies (inside shard_map) ------------------------------------------


def _route(plan: _Plan, config: MoEConfig, router, routed):
    logits = moe_layer.router_logits(router, routed)
    routing, aux = moe_layer.route_tokens(config, logits, plan.capacity)
    # every device holds as many groups (and tokens): the mean of means is the mean
    return routing, jax.tree.map(lambda a: jax.lax.pmean(a, plan.token_axes), aux)


def _capacity_body(plan, config, router, weights, groups, routed):
    routing, aux = _route(plan, config, router, routed)
    axis = plan.expert_axis
    inputs = R.dispatch(groups, routing, config.num_experts)  # [g, E, C, D]
    inputs = jax.lax.all_to_all(inputs, axis, split_axis=1, concat_axis=0, tiled=True)
    outputs = moe_layer.expert_ffn(weights, inputs, config.activation)  # [n g, El, C, D]
    outputs = jax.lax.all_to_all(outputs, axis, split_axis=0, concat_axis=1, tiled=True)
    return R.combine(outputs, routing), aux  # [g, S, D]


def _dropless_body(plan, config, router, weights, groups, routed):
    routing, aux = _route(plan, config, router, routed)
    axis, n = plan.expert_axis, plan.experts
    E, K = config.num_experts, config.num_experts_per_token
    El = E // n
    g, S, D = groups.shape
    N = g * S * K  # choices on this device
    a2a = lambda v: jax.lax.all_to_all(v, axis, 0, 0, tiled=True)  # noqa: E731
    send = jax.lax.ragged_all_to_all if plan.ragged else dense_ragged_all_to_all

    choice_expert = routing.experts.reshape(N)
    order = jnp.argsort(choice_expert, stable=True)  # choices sorted by expert
    rows = groups.reshape(g * S, D)[order // K]  # [N, D]
    counts = jnp.bincount(choice_expert, length=E).astype(jnp.int32)  # [E]
    send_sizes = jnp.sum(counts.reshape(n, El), axis=1)  # [n] to each device
    input_offsets = _exclusive_cumsum(send_sizes)
    recv_counts = a2a(counts.reshape(n, El))  # [n, El]: from device i, per local expert
    recv_sizes = jnp.sum(recv_counts, axis=1)
    recv_offsets = _exclusive_cumsum(recv_sizes)  # where device i's rows land here
    output_offsets = a2a(recv_offsets)  # where mine land on device i

    M = n * N  # worst case: every choice of every device comes here
    received = send(
        rows, jnp.zeros((M, D), rows.dtype), input_offsets, send_sizes, output_offsets,
        recv_sizes, axis_name=axis,
    )  # fmt: skip  # [M, D] blocks by source device, each sorted by local expert
    local = jnp.repeat(
        jnp.append(jnp.tile(jnp.arange(El, dtype=jnp.int32), n), El),
        jnp.append(recv_counts.reshape(-1), M - jnp.sum(recv_counts)),
        total_repeat_length=M,
    )  # local expert of every received row, El for the empty tail
    by_expert = jnp.argsort(local, stable=True)
    out = moe_layer.grouped_ffn(
        weights, received[by_expert], jnp.sum(recv_counts, axis=0), config.activation
    )
    out = jnp.zeros_like(out).at[by_expert].set(out)  # back to the received order
    back = send(
        out, jnp.zeros((N, D), out.dtype), recv_offsets, recv_sizes, a2a(input_offsets),
        send_sizes, axis_name=axis,
    )  # fmt: skip  # [N, D] in the sorted order
    choices = jnp.zeros_like(back).at[order].set(back).reshape(g, S, K, D)
    weights_k = routing.weights.astype(choices.dtype)
    return jnp.einsum("gsk,gskd->gsd", weights_k, choices), aux


def _exclusive_cumsum(v: jax.Array) -> jax.Array:
    return jnp.cumsum(v) - v


def dense_ragged_all_to_all(
    operand: jax.Array,
    output: jax.Array,
    input_offsets: jax.Array,
    send_sizes: jax.Array,
    output_offsets: jax.Array,
    recv_sizes: jax.Array,
    *,
    axis_name: str,
) -> jax.Array:
    """:func:`jax.lax.ragged_all_to_all` from a padded :func:`jax.lax.all_to_all`.

    Same arguments and result (slice ``i`` of ``operand`` goes to device
    ``i // (len(send_sizes) / axis size)`` and lands at ``output_offsets[i]``
    of its output), for backends without the ragged op (XLA:CPU). Every
    slice is padded to ``operand.shape[0]`` rows: traffic and memory are
    ``len(send_sizes) x operand`` instead of the rows sent.

    Two devices: device 0 holds rows 1 2 3 4 and sends one row to itself and
    two to device 1; device 1 holds 5 6 7 8 and sends two rows to device 0 and
    one to itself. Each device's output receives device 0's rows first:

    >>> import numpy as np
    >>> mesh = Mesh(np.array(jax.devices()[:2]), ("x",))
    >>> def exchange(operand, input_offsets, send_sizes, output_offsets, recv_sizes):
    ...     out = dense_ragged_all_to_all(
    ...         operand[0], jnp.zeros(4), input_offsets[0], send_sizes[0], output_offsets[0],
    ...         recv_sizes[0], axis_name="x")
    ...     return out[None]
    >>> run = jax.jit(jax.shard_map(exchange, mesh=mesh, in_specs=(P("x"),) * 5,
    ...                             out_specs=P("x")))
    >>> print(run(jnp.array([[1.0, 2, 3, 4], [5, 6, 7, 8]]),
    ...           jnp.array([[0, 1], [0, 2]]), jnp.array([[1, 2], [2, 1]]),   # offsets, sizes
    ...           jnp.array([[0, 0], [1, 2]]), jnp.array([[1, 2], [2, 1]])))  # to, received
    [[1. 5. 6. 0.]
     [2. 3. 7. 0.]]
    """
    M = operand.shape[0]
    tail = operand.shape[1:]
    r = jnp.arange(M, dtype=jnp.int32)
    take = input_offsets[:, None] + r  # [N, M]
    padded = jnp.take(operand, jnp.clip(take, 0, M - 1), axis=0)
    keep = (r < send_sizes[:, None]).reshape(take.shape + (1,) * len(tail))
    padded = jnp.where(keep, padded, jnp.zeros((), operand.dtype))
    received = jax.lax.all_to_all(padded, axis_name, 0, 0, tiled=True)  # [N, M, ...]
    offsets = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)
    dest = jnp.where(r < recv_sizes[:, None], offsets[:, None] + r, output.shape[0])
    return output.at[dest.reshape(-1)].set(received.reshape((-1,) + tail), mode="drop")
