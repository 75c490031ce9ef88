"""Routing for sparse mixtures of experts: pure functions of router logits.

Dimension letters (as in V-MoE and MaxText):

    G  groups: routing and capacity are per group (default: one sequence)
    S  group size: tokens per group
    E  experts
    C  capacity: slots per expert per group
    K  experts per token (top-k)
    D  model width
    F  expert hidden width

Token choice (Shazeer et al. 2017, arXiv:1701.06538; GShard, Lepikhin et al.
2020, arXiv:2006.16668; Switch, Fedus et al. 2021, arXiv:2101.03961; Mixtral,
Jiang et al. 2024, arXiv:2401.04088): each token takes the
top-K experts of ``softmax(logits)`` (weights renormalised over the K for
Mixtral, not for Switch). With a capacity, each expert has C slots per group;
slots are claimed first by every token's first choice, then by second
choices, and so on, in token order or by router probability (V-MoE's
batch-prioritised routing, Riquelme et al. 2021, arXiv:2106.05974). A choice
that finds its expert full is dropped: it contributes zero (the residual
carries the token).

Worked example, G = 1, S = 4 tokens, E = 4 experts, K = 2, C = 2::

    token   choices (expert, weight)   slot claimed
    t0      (e1, .6) (e2, .4)          e1#0   e2#1
    t1      (e1, .7) (e0, .3)          e1#1   e0#0
    t2      (e1, .5) (e2, .5)          e1 -   e2#2 -> dropped (C = 2)
    t3      (e2, .8) (e3, .2)          e2#0   e3#0

    round 1 (first choices, token order): e1 <- t0, t1 (full), t2 dropped;
                                          e2 <- t3
    round 2 (second choices):             e2 <- t0 (slot 1), e0 <- t1,
                                          e2 full for t2, e3 <- t3

``slots[g, s, k]`` holds the slot index, or C for a dropped choice (the
doctest of :func:`token_choice` runs this example). Dispatch
and combine use these indices (a gather into ``[G, E, C, D]`` expert inputs,
a gather back and a weighted sum over K): no ``[G, S, E, C]`` one-hot tensor
is built, unlike flaxformer's and V-MoE's einsum dispatch (kept in the tests
as the slow reference).

Both directions are gathers, forward and backward. A :class:`Layout` keeps
the map from rows of the experts' buffer ``[G, P, D]`` to token choices
(``rows``) and its inverse (``position``); the gradient of a gather by one
map is the gather by the other (plus a sum over K), so no scatter-add runs
in the backward pass (:func:`permute`, :func:`unsort`). With a capacity the
buffer is ``E * C`` rows, expert e owning rows ``[e C, (e + 1) C)``.

Dropless (MegaBlocks, Gale et al. 2022, arXiv:2211.15841): no capacity, so
every choice is computed and none is padded to a worst case. The N * K
choices are flattened, stably sorted by expert (:func:`sort_by_expert`), and
each expert's rows are contiguous, ``group_sizes[e]`` of them; the experts
then run as grouped matmuls (``jax.lax.ragged_dot``), and the outputs are
unsorted and summed over K with the combine weights. With ``block=b`` each
group is padded to a multiple of b rows (zero rows), so every b-row block
belongs to one expert; the buffer then has a static bound of
``b * floor((N K + E (b - 1)) / b)`` rows. In the example above, dropless,
sorted rows (block 1) are::

    e0: t1.1 | e1: t0.0 t1.0 t2.0 | e2: t0.1 t2.1 t3.0 | e3: t3.1
    group_sizes = [1, 3, 3, 1]

Expert choice (Zhou et al. 2022, arXiv:2202.09368): each expert takes the C
tokens of its group with the highest router probability; a token may get
zero or several experts. It looks at the whole group, future tokens
included, so it does not suit causal decoding.

Losses are returned, never added silently: the load-balancing loss
(Switch / GShard: E * sum_e f_e P_e, f_e the fraction of token choices routed
to e, P_e the mean router probability of e) and the router z-loss (ST-MoE,
Zoph et al. 2022, arXiv:2202.08906: mean of logsumexp(logits)^2).
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError

Priority = Literal["token", "probability"]
Rounding = Literal["ceil", "floor", "round"]


class Routing(NamedTuple):
    """Token-choice routing of one batch of groups.

    ``experts`` [G, S, K] the chosen expert per token and choice; ``weights``
    [G, S, K] its combine weight (0 where dropped); ``slots`` [G, S, K] its
    slot in the expert's buffer, ``capacity`` where dropped. Made by
    :func:`token_choice`:

    >>> routing = token_choice(jnp.array([[[0.9, 0.1], [0.8, 0.2]]]), 1, capacity=1,
    ...                        renormalize=False)
    >>> print(routing.experts[..., 0], routing.slots[..., 0], routing.weights[..., 0])
    [[0 0]] [[0 1]] [[0.9 0. ]]
    """

    experts: jax.Array
    weights: jax.Array
    slots: jax.Array
    capacity: int


def router_probabilities(logits: jax.Array) -> jax.Array:
    """``softmax(logits)`` over the last axis (experts), in float32 (Switch's
    selective precision, Fedus et al. 2021, arXiv:2101.03961).

    >>> print(router_probabilities(jnp.log(jnp.array([1.0, 3.0]))))
    [0.25 0.75]
    """
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def top_k_choice(probs: jax.Array, k: int, *, renormalize: bool) -> tuple[jax.Array, jax.Array]:
    """The K most probable experts per token and their weights ``[..., K]``.

    ``renormalize``: weights divided by their sum over the K (Mixtral),
    ``w_k = p_{e_k} / sum_j p_{e_j}``; otherwise the raw probabilities
    ``w_k = p_{e_k}`` (Switch top-1).

    >>> weights, experts = top_k_choice(jnp.array([0.1, 0.6, 0.3]), 2, renormalize=True)
    >>> print(experts, weights)      # 0.6 / 0.9, 0.3 / 0.9
    [1 2] [0.6667 0.3333]
    """
    check_k(k, probs.shape[-1])
    weights, experts = jax.lax.top_k(probs, k)
    if renormalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def check_k(k: int, num_experts: int) -> None:
    """Raise :class:`~jaxcombine.errors.ConfigError` unless ``1 <= k <= num_experts``.

    >>> check_k(3, 2)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: num_experts_per_token: experts per token k=3 must be ...
    """
    if not 1 <= k <= num_experts:
        raise ConfigError(
            f"experts per token k={k} must be between 1 and the number of experts ({num_experts})",
            where="num_experts_per_token",
            fix=f"choose k <= {num_experts}",
        )


def check_capacity_factor(capacity_factor: float) -> None:
    """Raise :class:`~jaxcombine.errors.ConfigError` unless ``capacity_factor > 0``.

    >>> check_capacity_factor(0.0)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: capacity_factor: capacity_factor must be > 0, got 0.0
    ...
    """
    if not capacity_factor > 0:
        raise ConfigError(
            f"capacity_factor must be > 0, got {capacity_factor}",
            where="capacity_factor",
            fix="use e.g. 1.25, or capacity_factor=None for dropless routing",
        )


def expert_capacity(
    group_size: int,
    num_experts: int,
    k: int,
    capacity_factor: float,
    *,
    rounding: Rounding = "ceil",
    multiple_of: int = 1,
    minimum: int = 1,
) -> int:
    """Slots per expert per group: ``round(capacity_factor * S * K / E)``.

    ``rounding``: "ceil" (GShard, MaxText), "floor" or "round" (Switch's T5X
    code rounds to the nearest integer); the result is then rounded up to a
    multiple of ``multiple_of`` (hardware-friendly sizes, e.g. 4 or 128) and
    is at least ``minimum``.

    >>> expert_capacity(10, 4, 2, 1.25)              # 1.25 * 10 * 2 / 4 = 6.25
    7
    >>> expert_capacity(10, 4, 2, 1.25, rounding="floor"), expert_capacity(10, 4, 2, 1.25,
    ...                                                                     multiple_of=4)
    (6, 8)
    """
    check_capacity_factor(capacity_factor)
    raw = capacity_factor * group_size * k / num_experts
    slots = {"ceil": math.ceil, "floor": math.floor, "round": round}[rounding](raw)
    slots = -(-slots // multiple_of) * multiple_of
    return max(int(slots), minimum)


def assign_slots(
    experts: jax.Array,
    num_experts: int,
    capacity: int,
    *,
    priority: jax.Array | None = None,
    mask: jax.Array | None = None,
) -> jax.Array:
    """Slot of every choice in its expert's buffer, ``capacity`` where it is full.

    ``experts`` [G, S, K]. Round k gives the k-th choices slots after every
    earlier round. Within a round tokens go in token order, or by descending
    ``priority`` [G, S] (batch-prioritised routing: the router's top
    probability), ties by token order. Tokens where ``mask`` [G, S] is False
    (padding) claim no slot (their slot is ``capacity``). Works with a
    [G, S, E] count, never a [G, S, E, C] tensor.

    Three tokens choose expert 0, which has two slots:

    >>> experts = jnp.zeros((1, 3, 1), jnp.int32)
    >>> print(assign_slots(experts, 2, 2)[..., 0])                    # token order
    [[0 1 2]]
    >>> print(assign_slots(experts, 2, 2, priority=jnp.array([[0.1, 0.9, 0.5]]))[..., 0])
    [[2 0 1]]
    >>> print(assign_slots(experts, 2, 2, mask=jnp.array([[False, True, True]]))[..., 0])
    [[2 0 1]]
    """
    G, S, K = experts.shape
    if priority is None:
        order = jnp.broadcast_to(jnp.arange(S), (G, S))
    else:
        order = jnp.argsort(-priority, axis=-1, stable=True)
    rank = jnp.argsort(order, axis=-1)  # token -> its place in the order
    ordered = jnp.take_along_axis(experts, order[..., None], axis=1)  # [G, S, K]
    if mask is not None:  # a padding token's choices point past the last expert: no hit
        valid = jnp.take_along_axis(mask.astype(bool), order, axis=1)
        ordered = jnp.where(valid[..., None], ordered, num_experts)
    filled = jnp.zeros((G, num_experts), jnp.int32)
    slots = []
    for choice in range(K):
        hits = jax.nn.one_hot(ordered[:, :, choice], num_experts, dtype=jnp.int32)  # [G, S, E]
        position = jnp.cumsum(hits, axis=1) - 1 + filled[:, None, :]
        slot = jnp.sum(position * hits, axis=-1)  # [G, S]
        slots.append(jnp.where((slot < capacity) & (jnp.sum(hits, -1) > 0), slot, capacity))
        filled = filled + jnp.sum(hits, axis=1)
    slots = jnp.stack(slots, axis=-1)  # in priority order
    return jnp.take_along_axis(slots, rank[..., None], axis=1).astype(jnp.int32)


def token_choice(
    probs: jax.Array,
    k: int,
    *,
    capacity: int | None,
    renormalize: bool,
    priority: Priority = "token",
    mask: jax.Array | None = None,
) -> Routing:
    """Top-K token-choice routing of router probabilities ``probs`` [G, S, E]
    (:func:`router_probabilities`) with ``capacity`` slots per expert.

    ``capacity=None``: no slot limit, no choice dropped (then ``slots`` still
    number each expert's tokens, and ``capacity`` is S * K). ``mask`` [G, S]:
    False for padding, which takes no slot and gets weight 0.

    The module docstring's worked example (K = 2, C = 2; t2 loses both choices):

    >>> probs = jnp.array([[[0, .6, .4, 0], [.3, .7, 0, 0], [0, .5, .5, 0], [0, 0, .8, .2]]])
    >>> routing = token_choice(probs, 2, capacity=2, renormalize=False)
    >>> print(routing.experts[0].tolist(), routing.slots[0].tolist())
    [[1, 2], [1, 0], [1, 2], [2, 3]] [[0, 1], [1, 0], [2, 2], [0, 0]]
    >>> print(routing.weights[0])
    [[0.6 0.4]
     [0.7 0.3]
     [0.  0. ]
     [0.8 0.2]]
    """
    G, S, E = probs.shape
    weights, experts = top_k_choice(probs, k, renormalize=renormalize)
    capacity = S * k if capacity is None else capacity
    order = jnp.max(probs, axis=-1) if priority == "probability" else None
    slots = assign_slots(experts, E, capacity, priority=order, mask=mask)
    weights = jnp.where(slots < capacity, weights, 0.0)
    return Routing(experts, weights, slots, capacity)


class Layout(NamedTuple):
    """Where token choices sit in the experts' row buffer ``[G, P, D]``.

    ``rows`` [G, P]: the choice ``s * K + k`` held by each row, ``S * K`` for
    an empty row; ``position`` [G, S, K]: the row of each choice, ``P`` for a
    dropped one; ``group_sizes`` [G, E]: rows per expert, experts in order
    (contiguous). ``rows`` and ``position`` are inverse maps on the kept choices:

    >>> layout = sort_by_expert(jnp.array([[[1], [0], [1]]]), 2)
    >>> print(layout.rows, layout.position[..., 0], layout.group_sizes)
    [[1 0 2]] [[1 0 2]] [[1 2]]
    >>> bool(jnp.all(jnp.take_along_axis(layout.position.reshape(1, -1), layout.rows, 1)
    ...               == jnp.arange(3)))
    True
    """

    rows: jax.Array
    position: jax.Array
    group_sizes: jax.Array


def capacity_layout(routing: Routing, num_experts: int) -> Layout:
    """The ``[G, E * C]`` buffer of a capacity: choice (s, k) at row ``e * C + slot``.

    Two experts with one slot each; the third token (expert 0 again) is dropped:

    >>> routing = token_choice(jnp.array([[[.9, .1], [.2, .8], [.7, .3]]]), 1, capacity=1,
    ...                        renormalize=False)
    >>> layout = capacity_layout(routing, 2)
    >>> print(layout.position[..., 0], layout.rows, layout.group_sizes)
    [[0 1 2]] [[0 1]] [[1 1]]
    """
    G, S, K = routing.experts.shape
    C = routing.capacity
    kept = routing.slots < C
    position = jnp.where(kept, routing.experts * C + routing.slots, num_experts * C)
    rows = _invert(position.reshape(G, S * K), num_experts * C)
    sizes = jnp.full((G, num_experts), C, jnp.int32)
    return Layout(rows, position.astype(jnp.int32), sizes)


def sorted_rows(num_choices: int, num_experts: int, block: int = 1) -> int:
    """Static row count of :func:`sort_by_expert`'s buffer: the most that
    ``sum_e ceil(n_e / b) * b`` can be when ``sum_e n_e = num_choices``.

    Eight choices over four experts in blocks of 4: the worst case is
    n = (5, 1, 1, 1), padded to 8 + 4 + 4 + 4 rows.

    >>> sorted_rows(8, 4), sorted_rows(8, 4, block=4)
    (8, 20)
    """
    if block == 1:
        return num_choices
    return block * ((num_choices + num_experts * (block - 1)) // block)


def sort_by_expert(experts: jax.Array, num_experts: int, *, block: int = 1) -> Layout:
    """Dropless layout: every choice of ``experts`` [G, S, K], grouped by expert.

    The S * K choices (flattened s-major, ``s * K + k``) are sorted by expert
    with a stable argsort, so rows of one expert keep token order; expert e
    holds ``n_e`` choices, padded with empty rows to ``ceil(n_e / b) * b``
    (``block`` b; 1: no padding, the layout of ``jax.lax.ragged_dot``).
    Padded groups start at ``sum_{e' < e} ceil(n_e' / b) * b``; the buffer has
    :func:`sorted_rows` rows, the unused tail empty. No choice is dropped.

    The module docstring's example, dropless (choice ``s * K + k``):

    >>> experts = jnp.array([[[1, 2], [1, 0], [1, 2], [2, 3]]])
    >>> layout = sort_by_expert(experts, 4)
    >>> print(layout.rows, layout.group_sizes)
    [[3 0 2 4 1 5 6 7]] [[1 3 3 1]]
    >>> layout = sort_by_expert(experts, 4, block=2)       # empty rows hold 8 = S * K
    >>> print(layout.rows, layout.group_sizes)
    [[3 8 0 2 4 8 1 5 6 8 7 8]] [[2 4 4 2]]
    """
    G, S, K = experts.shape
    if block < 1:
        raise ConfigError(f"block must be >= 1, got {block}", where="block", fix="use e.g. 128")
    flat = experts.reshape(G, S * K).astype(jnp.int32)
    order = jnp.argsort(flat, axis=-1, stable=True)  # sorted place -> choice
    counts = jnp.sum(jax.nn.one_hot(flat, num_experts, dtype=jnp.int32), axis=1)  # [G, E]
    sizes = -(-counts // block) * block
    shift = (jnp.cumsum(sizes, axis=-1) - sizes) - (jnp.cumsum(counts, axis=-1) - counts)
    expert_sorted = jnp.take_along_axis(flat, order, axis=-1)
    row = jnp.arange(S * K, dtype=jnp.int32) + jnp.take_along_axis(shift, expert_sorted, axis=-1)
    P = sorted_rows(S * K, num_experts, block)
    g = jnp.arange(G)[:, None]
    rows = jnp.full((G, P), S * K, jnp.int32).at[g, row].set(order.astype(jnp.int32))
    position = jnp.zeros((G, S * K), jnp.int32).at[g, order].set(row)
    return Layout(rows, position.reshape(G, S, K), sizes.astype(jnp.int32))


def _invert(position: jax.Array, num_rows: int) -> jax.Array:
    """``rows`` [G, P] from ``position`` [G, M] (entries >= P: dropped; empty rows get M)."""
    G, M = position.shape
    g = jnp.arange(G)[:, None]
    choice = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32), (G, M))
    return jnp.full((G, num_rows), M, jnp.int32).at[g, position].set(choice, mode="drop")


def _take(x: jax.Array, index: jax.Array) -> jax.Array:
    """``x[g, index[g, i]]`` for x [G, R, D], index [G, M]; out of range -> 0."""
    return jnp.take_along_axis(x, index[..., None], axis=1, mode="fill", fill_value=0)


@jax.custom_vjp
def permute(x: jax.Array, layout: Layout) -> jax.Array:
    """Experts' row buffer ``[G, P, D]`` from tokens ``x`` [G, S, D]:
    ``out[g, r] = x[g, rows[g, r] // K]``, zero for empty rows.

    Gradient: ``dx[g, s] = sum_k dout[g, position[g, s, k]]``, a gather (no
    scatter-add) since each kept choice has exactly one row.

    >>> layout = sort_by_expert(jnp.array([[[1], [0], [1]]]), 2)   # rows: t1, t0, t2
    >>> print(permute(jnp.array([[[10.0], [20.0], [30.0]]]), layout)[..., 0])
    [[20. 10. 30.]]
    """
    K = layout.position.shape[-1]
    return _take(x, layout.rows // K)


def _permute_fwd(x, layout):
    return permute(x, layout), layout


def _permute_bwd(layout, dout):
    G, S, K = layout.position.shape
    picked = _take(dout, layout.position.reshape(G, S * K)).reshape(G, S, K, -1)
    return jnp.sum(picked, axis=2), None


permute.defvjp(_permute_fwd, _permute_bwd)


@jax.custom_vjp
def unsort(out: jax.Array, weights: jax.Array, layout: Layout) -> jax.Array:
    """Token outputs [G, S, D] from the experts' rows ``out`` [G, P, D]:
    ``y[g, s] = sum_k weights[g, s, k] * out[g, position[g, s, k]]`` (a dropped
    choice contributes 0).

    Gradients, all gathers: ``dout[g, r] = w[c] * dy[g, c // K]`` with
    ``c = rows[g, r]`` (0 for empty rows), and
    ``dweights[g, s, k] = <dy[g, s], out[g, position[g, s, k]]>``.

    >>> layout = sort_by_expert(jnp.array([[[1], [0], [1]]]), 2)   # rows: t1, t0, t2
    >>> out = jnp.array([[[20.0], [10.0], [30.0]]])
    >>> print(unsort(out, jnp.array([[[1.0], [0.5], [2.0]]]), layout)[..., 0])
    [[10. 10. 60.]]
    """
    return _unsort(out, weights, layout)[0]


def _unsort(out, weights, layout):
    G, S, K = layout.position.shape
    picked = _take(out, layout.position.reshape(G, S * K)).reshape(G, S, K, -1)
    return jnp.einsum("gsk,gskd->gsd", weights.astype(out.dtype), picked), picked


def _unsort_fwd(out, weights, layout):
    return unsort(out, weights, layout), (out, weights, layout)


def _unsort_bwd(residuals, dy):
    out, weights, layout = residuals
    G, S, K = layout.position.shape
    _, picked = _unsort(out, weights, layout)
    dweights = jnp.einsum("gsd,gskd->gsk", dy.astype(jnp.float32), picked.astype(jnp.float32))
    w = _take(weights.reshape(G, S * K, 1), layout.rows)[..., 0]  # [G, P], 0 for empty rows
    dout = _take(dy, layout.rows // K) * w[..., None].astype(dy.dtype)
    return dout.astype(out.dtype), dweights.astype(weights.dtype), None


unsort.defvjp(_unsort_fwd, _unsort_bwd)


def dispatch(x: jax.Array, routing: Routing, num_experts: int) -> jax.Array:
    """Expert inputs ``[G, E, C, D]`` gathered from tokens ``x`` [G, S, D] (empty slots 0):
    ``inputs[g, e, c] = x[g, s]`` for the choice (s, k) with expert e and slot c.

    >>> routing = token_choice(jnp.array([[[.9, .1], [.2, .8], [.7, .3]]]), 1, capacity=2,
    ...                        renormalize=False)
    >>> print(dispatch(jnp.array([[[1.0], [2.0], [3.0]]]), routing, 2)[0, ..., 0])
    [[1. 3.]
     [2. 0.]]
    """
    G, S, D = x.shape
    inputs = permute(x, capacity_layout(routing, num_experts))
    return inputs.reshape(G, num_experts, routing.capacity, D)


def combine(expert_out: jax.Array, routing: Routing) -> jax.Array:
    """Token outputs [G, S, D]: sum over K of weight x the expert's output at its slot,
    ``y[g, s] = sum_k weights[g, s, k] * expert_out[g, e_k, slot_k]`` (0 when dropped).

    With identity experts, y = x * (sum of the kept weights), as in the module
    docstring's example (t2 dropped):

    >>> probs = jnp.array([[[0, .6, .4, 0], [.3, .7, 0, 0], [0, .5, .5, 0], [0, 0, .8, .2]]])
    >>> routing = token_choice(probs, 2, capacity=2, renormalize=False)
    >>> x = jnp.array([[[1.0], [2.0], [3.0], [4.0]]])
    >>> print(combine(dispatch(x, routing, 4), routing)[0, :, 0])
    [1. 2. 0. 4.]
    """
    G, E, C, D = expert_out.shape
    layout = capacity_layout(routing, E)
    return unsort(expert_out.reshape(G, E * C, D), routing.weights, layout)


class ExpertChoice(NamedTuple):
    """Expert-choice routing: ``tokens`` [G, E, C] each expert's tokens, ``weights`` [G, E, C]
    their router probabilities (made by :func:`expert_choice`).

    >>> choice = expert_choice(jnp.array([[[0.9, 0.1], [0.2, 0.8]]]), 1)
    >>> isinstance(choice, ExpertChoice), choice.tokens.tolist()
    (True, [[[0], [1]]])
    """

    tokens: jax.Array
    weights: jax.Array


def expert_choice(probs: jax.Array, capacity: int) -> ExpertChoice:
    """Each expert takes the ``capacity`` tokens of its group with the highest router
    probability (``probs`` [G, S, E], softmax over experts per token). Not for
    causal decoding: a token's experts depend on the later tokens of its group.
    Zhou et al. 2022, arXiv:2202.09368.

    >>> probs = jnp.array([[[.9, .1], [.6, .4], [.2, .8]]])
    >>> choice = expert_choice(probs, 1)           # expert 0 takes t0, expert 1 takes t2
    >>> print(choice.tokens[..., 0], choice.weights[..., 0])
    [[0 2]] [[0.9 0.8]]
    """
    S = probs.shape[1]
    if not 1 <= capacity <= S:
        raise ConfigError(
            f"expert-choice capacity {capacity} must be between 1 and the group size {S}",
            where="capacity",
            fix="lower capacity_factor or use larger groups",
        )
    weights, tokens = jax.lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)  # [G, E, C]
    return ExpertChoice(tokens.astype(jnp.int32), weights)


def expert_choice_dispatch(x: jax.Array, choice: ExpertChoice) -> jax.Array:
    """Expert inputs [G, E, C, D]: ``inputs[g, e, c] = x[g, tokens[g, e, c]]``.

    >>> choice = expert_choice(jnp.array([[[.9, .1], [.6, .4], [.2, .8]]]), 2)
    >>> print(expert_choice_dispatch(jnp.array([[[1.0], [2.0], [3.0]]]), choice)[0, ..., 0])
    [[1. 2.]
     [3. 2.]]
    """
    G, E, C = choice.tokens.shape
    picked = jnp.take_along_axis(x, choice.tokens.reshape(G, -1)[..., None], axis=1)
    return picked.reshape(G, E, C, x.shape[-1])


def expert_choice_combine(expert_out: jax.Array, choice: ExpertChoice, group_size: int):
    """Token outputs [G, S, D]: each token sums its experts' weighted outputs,
    ``y[g, s] = sum_{(e, c): tokens[g, e, c] = s} weights[g, e, c] * expert_out[g, e, c]``.

    With identity experts, t1 gets 0.6 + 0.4 = 1 of itself, t0 0.9 and t2 0.8:

    >>> choice = expert_choice(jnp.array([[[.9, .1], [.6, .4], [.2, .8]]]), 2)
    >>> x = jnp.array([[[1.0], [2.0], [3.0]]])
    >>> print(expert_choice_combine(expert_choice_dispatch(x, choice), choice, 3)[0, :, 0])
    [0.9 2.  2.4]
    """
    G, E, C, D = expert_out.shape
    weighted = expert_out * choice.weights[..., None].astype(expert_out.dtype)
    out = jnp.zeros((G, group_size, D), expert_out.dtype)
    g = jnp.arange(G)[:, None]
    return out.at[g, choice.tokens.reshape(G, -1)].add(weighted.reshape(G, -1, D))


def _token_mean(values: jax.Array, mask: jax.Array | None, axis=(0, 1)) -> jax.Array:
    """Mean over the token axes of ``values`` [G, S, ...], counting only ``mask`` [G, S]."""
    values = values.astype(jnp.float32)
    if mask is None:
        return jnp.mean(values, axis=axis)
    weight = mask.astype(jnp.float32).reshape(mask.shape + (1,) * (values.ndim - 2))
    total = jnp.sum(weight * jnp.ones_like(values), axis=axis)
    return jnp.sum(values * weight, axis=axis) / jnp.maximum(total, 1.0)


def load_balancing_loss(
    probs: jax.Array, experts: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Switch / GShard auxiliary loss, E * sum_e f_e * P_e, averaged over groups.

    ``probs`` [G, S, E] router probabilities, ``experts`` [G, S, K] the chosen
    experts (before capacity). f_e: choices routed to e over S (summing to K),
    P_e: mean probability of e; both over the tokens where ``mask`` [G, S] is
    True (as HF's ``attention_mask``), groups with no token left out. Equals
    HF's Switch ``load_balancing_loss_func`` for K = 1 and Mixtral's for
    G = 1. Minimal (1 for K = 1) when balanced.

    >>> half = jnp.full((1, 2, 2), 0.5)                  # f = P = (1/2, 1/2): 2 * 1/2
    >>> print(load_balancing_loss(half, jnp.array([[[0], [1]]])))
    1.0
    >>> all_e0 = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])   # f = P = (1, 0): 2 * 1
    >>> print(load_balancing_loss(all_e0, jnp.array([[[0], [0]]])))
    2.0
    """
    E = probs.shape[-1]
    if mask is None:
        mask = jnp.ones(probs.shape[:2], bool)
    counted = mask.astype(jnp.float32)[..., None]  # [G, S, 1]
    tokens = jnp.maximum(jnp.sum(counted, axis=1), 1.0)  # [G, 1]
    hits = jnp.sum(jax.nn.one_hot(experts, E, dtype=jnp.float32), axis=2)  # [G, S, E]
    fraction = jnp.sum(hits * counted, axis=1) / tokens  # [G, E]
    mean_prob = jnp.sum(probs.astype(jnp.float32) * counted, axis=1) / tokens  # [G, E]
    per_group = E * jnp.sum(fraction * mean_prob, axis=-1)
    present = jnp.any(mask, axis=1).astype(jnp.float32)
    return jnp.sum(per_group * present) / jnp.maximum(jnp.sum(present), 1.0)


def router_z_loss(logits: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE's z-loss (Zoph et al. 2022, arXiv:2202.08906): mean over tokens of
    logsumexp(logits)^2 (``logits`` [G, S, E]; tokens where ``mask`` [G, S] is True).

    >>> print(router_z_loss(jnp.zeros((1, 2, 4))))        # log(4)^2
    1.922
    """
    z = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return _token_mean(jnp.square(z), mask)


def router_stats(
    probs: jax.Array, routing: Routing, mask: jax.Array | None = None
) -> dict[str, jax.Array]:
    """For logging: ``load`` [E] share of choices per expert (before capacity),
    ``dropped`` fraction of choices over capacity, ``entropy``: :func:`router_entropy`;
    over the tokens where ``mask`` [G, S] is True.

    The module docstring's example: choices per expert 1, 3, 3, 1 of 8; 2 dropped:

    >>> probs = jnp.array([[[0, .6, .4, 0], [.3, .7, 0, 0], [0, .5, .5, 0], [0, 0, .8, .2]]])
    >>> stats = router_stats(probs, token_choice(probs, 2, capacity=2, renormalize=False))
    >>> print(stats["load"], stats["dropped"])
    [0.125 0.375 0.375 0.125] 0.25
    """
    E = probs.shape[-1]
    K = routing.experts.shape[-1]
    hits = jnp.sum(jax.nn.one_hot(routing.experts, E, dtype=jnp.float32), axis=2) / K
    load = _token_mean(hits, mask)
    over = jnp.mean((routing.slots >= routing.capacity).astype(jnp.float32), axis=-1)
    return {
        "load": load,
        "dropped": _token_mean(over, mask),
        "entropy": router_entropy(probs, mask),
    }


def expert_choice_stats(probs: jax.Array, choice: ExpertChoice) -> dict[str, jax.Array]:
    """:func:`router_stats` for expert choice: ``load`` is 1/E per expert by
    construction, ``dropped`` the fraction of tokens no expert took.

    >>> probs = jnp.array([[[.9, .1], [.6, .4], [.2, .8]]])
    >>> stats = expert_choice_stats(probs, expert_choice(probs, 1))   # t1 left out
    >>> print(stats["load"], stats["dropped"])
    [0.5 0.5] 0.3333
    """
    G, S, E = probs.shape
    taken = jnp.zeros((G, S), jnp.int32).at[jnp.arange(G)[:, None], choice.tokens.reshape(G, -1)]
    taken = taken.add(1)
    dropped = jnp.mean((taken == 0).astype(jnp.float32))
    return {"load": jnp.full((E,), 1.0 / E), "dropped": dropped, "entropy": router_entropy(probs)}


def router_entropy(probs: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean over tokens (where ``mask`` [G, S] is True) of the router distribution's
    entropy, ``-sum_e p_e log p_e`` (nats).

    >>> probs = jnp.array([[[.25, .25, .25, .25], [1.0, 0, 0, 0]]])
    >>> print(router_entropy(probs), router_entropy(probs, jnp.array([[True, False]])))
    0.6931 1.3863
    """
    p = probs.astype(jnp.float32)
    return _token_mean(-jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1), mask)
