"""``SparseMoE``: a sparse mixture-of-experts feed-forward layer (Flax NNX).

The routing math lives in :mod:`jaxcombine.moe.routing`; this layer owns the
parameters and runs the experts. Letters as there: G groups, S group size,
E experts, C capacity, K experts per token, D model width, F expert width.

    logits  = x . W_router                              # [G, S, E], float32
    probs   = softmax(logits)
    routing = token_choice(probs, K, capacity)          # or expert_choice
    inputs  = dispatch(x, routing)                      # [G, E, C, D] gathered
    outputs = expert_e(inputs[:, e])  for every e       # batched over E
    y       = combine(outputs, routing)                 # [G, S, D]

Dropless (``capacity_factor=None``; MegaBlocks, arXiv:2211.15841): the N * K
choices of all N = G * S tokens are sorted by expert (``sort_by_expert``),
each expert multiplies its own contiguous rows (a grouped matmul), and the
rows are unsorted and summed over K with the combine weights::

    rows  = permute(x, sort_by_expert(experts))         # [P, D], P >= N * K
    h     = act(gmm(rows, W_gate)) * gmm(rows, W_up)    # [P, F]
    y     = unsort(gmm(h, W_down), weights)             # [N, D]

with ``gmm(x, W)[r] = x[r] @ W[e(r)]``, e(r) the expert owning row r. On GPU
and TPU gmm is ``jax.lax.ragged_dot`` (rows unpadded); XLA:CPU computes
ragged_dot densely (E times the work), so on CPU gmm is
:func:`blocked_matmul`, a loop over blocks of ``CPU_BLOCK`` rows (groups
padded to whole blocks) that stops at the last used block. The choice is made
by ``jax.lax.platform_dependent`` when the function is lowered. Both are exact
(equal to a dense loop over experts) and differentiable.

An expert is SwiGLU, ``down(act(gate x) * up x)`` (Mixtral), or with
``gated=False`` ``down(act(up x))`` (Switch: ReLU). Parameters carry logical
axes (``expert``, ``embed``, ``mlp``) for :func:`jaxcombine.sharding.shard_model`.
The call returns ``(y, aux)``; ``aux`` holds the load-balancing loss, the
router z-loss and routing statistics for the caller to weigh and log.

References: Shazeer et al. 2017 (arXiv:1701.06538); GShard (arXiv:2006.16668);
Switch (arXiv:2101.03961); ST-MoE (arXiv:2202.08906); Mixtral
(arXiv:2401.04088); MegaBlocks (arXiv:2211.15841). :class:`SparseMoE` has a
runnable example checked against a dense loop over experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.errors import ConfigError
from jaxcombine.moe import routing as R

# Rows per block of the CPU grouped matmul. bench/moe.py --blocks (T = 4096,
# D = 512): 128 and 256 within noise at 8 and 64 experts, 32 ~15% slower at
# 64. Padding is at most E * (CPU_BLOCK - 1) rows.
CPU_BLOCK = 256


GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


# jaxcombine.models imports this module (Mixtral layers), so its helpers are
# imported when used, not at import time (no import cycle).
def _activation(name: str):
    from jaxcombine.models._layers import activation

    return activation(name)


def _param(*args):
    from jaxcombine.models._layers import param

    return param(*args)


def _activation_names():
    from jaxcombine.models._config import ACTIVATIONS

    return ACTIVATIONS


@dataclass(frozen=True)
class MoEConfig:
    """What a :class:`SparseMoE` layer computes.

    ``capacity_factor``: slots per expert = ceil(factor * S * K / E)
    (``capacity_rounding``, ``capacity_multiple_of``); ``None`` for dropless
    routing (every choice is computed). ``group_size``: tokens per routing
    group (default: one sequence per group). ``priority``: "token" or
    "probability" (batch-prioritised routing). ``routing``: "token_choice" or
    "expert_choice" (not for causal decoding). ``renormalize``: the K weights
    divided by their sum (Mixtral) or not (Switch). ``gated``: SwiGLU experts
    (Mixtral) or ``down(act(up x))`` (Switch). ``router_jitter``: multiplicative
    uniform noise on the router's input when training (Switch).

    >>> config = MoEConfig(num_experts=4, hidden_size=8, intermediate_size=16)
    >>> config.capacity(10)                     # ceil(1.25 * 10 tokens * 2 / 4)
    7
    >>> MoEConfig(4, 8, 16, group_size=4).group_shape(2, 6)   # 12 tokens in groups of 4
    (3, 4)
    >>> print(MoEConfig(4, 8, 16, capacity_factor=None).capacity(10))   # dropless
    None

    References: Shazeer et al. 2017, arXiv:1701.06538; Switch (Fedus et al. 2021, arXiv:2101.03961);
    Mixtral (Jiang et al. 2024, arXiv:2401.04088); dropless: MegaBlocks (Gale et al. 2022,
    arXiv:2211.15841); batch-prioritised routing: V-MoE (Riquelme et al. 2021, arXiv:2106.05974);
    expert choice (Zhou et al. 2022, arXiv:2202.09368).
    """

    num_experts: int
    hidden_size: int
    intermediate_size: int
    num_experts_per_token: int = 2
    capacity_factor: float | None = 1.25
    capacity_rounding: R.Rounding = "ceil"
    capacity_multiple_of: int = 1
    group_size: int | None = None
    priority: R.Priority = "token"
    routing: Literal["token_choice", "expert_choice"] = "token_choice"
    renormalize: bool = True
    gated: bool = True
    activation: str = "silu"
    router_jitter: float = 0.0

    def __post_init__(self):
        if self.routing == "token_choice":
            R.check_k(self.num_experts_per_token, self.num_experts)
        if self.capacity_factor is not None:
            R.check_capacity_factor(self.capacity_factor)
        if self.routing == "expert_choice" and self.capacity_factor is None:
            raise ConfigError(
                "expert-choice routing needs a capacity_factor",
                where="MoEConfig.capacity_factor",
                fix="set capacity_factor (each expert takes factor * S * K / E tokens)",
            )
        if self.activation not in _activation_names():
            raise ConfigError(
                f"unknown activation {self.activation!r}",
                where="MoEConfig.activation",
                fix=f"use one of {', '.join(_activation_names())} (HF's hidden_act names)",
            )

    def group_shape(self, batch: int, length: int) -> tuple[int, int]:
        """(G, S): routing groups of ``group_size`` tokens, or one per sequence."""
        if self.group_size is None:
            return batch, length
        if (batch * length) % self.group_size:
            raise ConfigError(
                f"{batch * length} tokens (batch {batch} x length {length}) do not split into "
                f"groups of {self.group_size}",
                where="MoEConfig.group_size",
                fix="choose a group size that divides batch x length, or None (one group per row)",
            )
        return batch * length // self.group_size, self.group_size

    def capacity(self, group_size: int) -> int | None:
        """Slots per expert in a group of ``group_size`` tokens; None when dropless."""
        if self.capacity_factor is None:
            return None
        return R.expert_capacity(
            group_size, self.num_experts, self.num_experts_per_token, self.capacity_factor,
            rounding=self.capacity_rounding, multiple_of=self.capacity_multiple_of,
        )  # fmt: skip


class MoEAux(NamedTuple):
    """What the layer returns besides its output (nothing is added to a loss silently):
    the load-balancing loss and router z-loss (:mod:`~jaxcombine.moe.routing`), and
    statistics to log. An example is in :class:`SparseMoE`.

    >>> MoEAux._fields
    ('load_balancing_loss', 'router_z_loss', 'load', 'dropped', 'entropy')

    References: load balancing: Fedus et al. 2021, Switch Transformers: Scaling to Trillion
    Parameter Models with Simple and Efficient Sparsity, arXiv:2101.03961; router z-loss: Zoph et
    al. 2022, ST-MoE: Designing Stable and Transferable Sparse Expert Models, arXiv:2202.08906.
    """

    load_balancing_loss: jax.Array
    router_z_loss: jax.Array
    load: jax.Array  # [E] share of choices per expert
    dropped: jax.Array  # fraction of choices over capacity
    entropy: jax.Array  # mean router entropy (nats)


class ExpertWeights(NamedTuple):
    """The experts' parameters: ``up``, ``gate`` [E, D, F] (None: not gated,
    Switch), ``down`` [E, F, D] (:meth:`SparseMoE.expert_weights`; used by
    :func:`expert_ffn`, which has an example).

    Four ungated ReLU experts of ones: relu(8) * 16 = 128 per output unit.

    >>> weights = ExpertWeights(up=jnp.ones((4, 8, 16)), gate=None, down=jnp.ones((4, 16, 8)))
    >>> print(expert_ffn(weights, jnp.ones((4, 1, 8)), "relu")[:, 0, 0])    # [E, C, D]
    [128. 128. 128. 128.]
    """

    up: jax.Array
    gate: jax.Array | None
    down: jax.Array


class SparseMoE(nnx.Module):
    """Sparse MoE feed-forward layer; ``layer(x [B, T, D]) -> (y [B, T, D], MoEAux)``.

    ``y[n] = sum_{e in topK(p_n)} w_{n,e} expert_e(x[n])`` with
    ``p_n = softmax(x[n] W_router)`` and ``w`` the top-K probabilities,
    renormalised (Mixtral) or not (Switch); a choice over capacity contributes 0.

    Top-2 of 4 SwiGLU experts with room for every token (capacity 2.0 * S * K / E
    = S) equals a loop over tokens and their experts written out in numpy:

    >>> import numpy as np
    >>> config = MoEConfig(num_experts=4, hidden_size=4, intermediate_size=4,
    ...                    num_experts_per_token=2, capacity_factor=2.0)
    >>> graphdef, state = nnx.split(SparseMoE(config, rngs=nnx.Rngs(0)))
    >>> x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)   # [B, T, D]
    >>> y, aux = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))(state, x)
    >>> y.shape, float(aux.dropped), float(aux.load.sum())
    ((2, 3, 4), 0.0, 1.0)
    >>> W = {name: np.asarray(v) for name, v in nnx.to_pure_dict(state).items()}
    >>> tokens, silu = x.reshape(6, 4), lambda a: a / (1 + np.exp(-a))
    >>> p = np.exp(tokens @ W["router"]); p /= p.sum(-1, keepdims=True)
    >>> expected = np.zeros_like(tokens)
    >>> for n, v in enumerate(tokens):
    ...     top = np.argsort(-p[n])[:2]
    ...     for e in top:
    ...         h = silu(v @ W["gate"][e]) * (v @ W["up"][e])
    ...         expected[n] += p[n, e] / p[n, top].sum() * (h @ W["down"][e])
    >>> np.allclose(y.reshape(6, 4), expected, atol=1e-6)
    True

    References: Shazeer et al. 2017, Outrageously Large Neural Networks: The Sparsely-Gated
    Mixture-of-Experts Layer, arXiv:1701.06538; Jiang et al. 2024, Mixtral of Experts,
    arXiv:2401.04088; Switch (Fedus et al. 2021, arXiv:2101.03961).
    """

    def __init__(self, config: MoEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
        self.config = config
        self.router = _param(rngs, (D, E), ("embed", None), dtype)
        self.up = _param(rngs, (E, D, F), ("expert", "embed", "mlp"), dtype)
        self.gate = (
            _param(rngs, (E, D, F), ("expert", "embed", "mlp"), dtype) if config.gated else None
        )
        self.down = _param(rngs, (E, F, D), ("expert", "mlp", "embed"), dtype)
        self.rngs = rngs if config.router_jitter > 0 else None

    def expert_weights(self) -> ExpertWeights:
        gate = None if self.gate is None else self.gate[...]
        return ExpertWeights(self.up[...], gate, self.down[...])

    def experts(self, inputs: jax.Array) -> jax.Array:
        """Every expert on its own rows: ``inputs`` [..., E, C, D] -> [..., E, C, D]."""
        return expert_ffn(self.expert_weights(), inputs, self.config.activation)

    def __call__(
        self, x: jax.Array, *, mask: jax.Array | None = None, deterministic: bool = True
    ) -> tuple[jax.Array, MoEAux]:
        """``x`` [B, T, D]; ``mask`` [B, T] False for padding, which is routed
        nowhere (takes no capacity, output 0) and left out of losses and
        statistics; ``deterministic=False`` turns on router jitter."""
        config = self.config
        B, T, D = x.shape
        G, S = config.group_shape(B, T)
        groups = x.reshape(G, S, D)
        if mask is not None:
            mask = mask.astype(bool).reshape(G, S)
        logits = router_logits(self.router[...], self.router_inputs(groups, deterministic))
        if config.routing == "expert_choice":
            probs = R.router_probabilities(logits)
            choosable = probs if mask is None else probs * mask[..., None]  # padding: weight 0
            choice = R.expert_choice(choosable, config.capacity(S))
            out = self.experts(R.expert_choice_dispatch(groups, choice))
            y = R.expert_choice_combine(out, choice, S)
            stats = R.expert_choice_stats(probs, choice)
            aux = MoEAux(
                jnp.float32(0.0), R.router_z_loss(logits, mask), stats["load"],
                stats["dropped"], stats["entropy"],
            )  # fmt: skip
        else:
            capacity = config.capacity(S)
            routing, aux = route_tokens(config, logits, capacity, mask)
            if capacity is None:
                y = self._dropless(groups, routing)
            else:
                inputs = R.dispatch(groups, routing, config.num_experts)
                y = R.combine(self.experts(inputs), routing)
        return y.reshape(B, T, D).astype(x.dtype), aux

    def router_inputs(self, groups: jax.Array, deterministic: bool) -> jax.Array:
        """What the router sees: the tokens, times uniform(1 - j, 1 + j) noise when
        training with ``router_jitter`` j (Switch; HF Mixtral's ``router_jitter_noise``)."""
        j = self.config.router_jitter
        if j == 0 or deterministic:
            return groups
        noise = jax.random.uniform(self.rngs.jitter(), groups.shape, minval=1 - j, maxval=1 + j)
        return groups * noise.astype(groups.dtype)

    def _dropless(self, groups: jax.Array, routing: R.Routing) -> jax.Array:
        """Every choice computed (no capacity): :func:`dropless_experts` over all tokens."""
        G, S, D = groups.shape
        weights = self.expert_weights()
        act = _activation(self.config.activation)
        tokens, experts = groups.reshape(G * S, D), routing.experts.reshape(G * S, -1)
        combine = routing.weights.reshape(G * S, -1)

        def run(block: int, matmul: GroupedMatmul):
            return partial(dropless_experts, block=block, matmul=matmul, activation=act)

        y = jax.lax.platform_dependent(
            tokens, experts, combine, *weights,
            cpu=run(CPU_BLOCK, partial(blocked_matmul, block=CPU_BLOCK)),
            default=run(1, ragged_matmul),
        )  # fmt: skip
        return y.reshape(G, S, D)


def router_logits(router: jax.Array, tokens: jax.Array) -> jax.Array:
    """``tokens`` [G, S, D] . ``router`` [D, E] in float32 (Switch's selective precision).

    >>> logits = router_logits(jnp.eye(2, dtype=jnp.bfloat16), jnp.array([[[1.0, 2.0]]]))
    >>> print(logits, logits.dtype)
    [[[1. 2.]]] float32
    """
    return jnp.einsum("gsd,de->gse", tokens.astype(jnp.float32), router.astype(jnp.float32))


def route_tokens(
    config: MoEConfig, logits: jax.Array, capacity: int | None, mask: jax.Array | None = None
) -> tuple[R.Routing, MoEAux]:
    """Token-choice routing of router ``logits`` [G, S, E] with ``capacity``
    (None: dropless) and its losses and statistics over the ``mask``ed tokens.

    >>> config = MoEConfig(2, 4, 8, num_experts_per_token=1, capacity_factor=None)
    >>> logits = jnp.array([[[2.0, 0.0], [0.0, 2.0], [3.0, 0.0]]])
    >>> routing, aux = jax.jit(route_tokens, static_argnums=(0, 2))(config, logits, None)
    >>> print(routing.experts[..., 0], aux.load, aux.dropped)
    [[0 1 0]] [0.6667 0.3333] 0.0
    """
    probs = R.router_probabilities(logits)
    routing = R.token_choice(
        probs, config.num_experts_per_token, capacity=capacity,
        renormalize=config.renormalize, priority=config.priority, mask=mask,
    )  # fmt: skip
    stats = R.router_stats(probs, routing, mask)
    aux = MoEAux(
        R.load_balancing_loss(probs, routing.experts, mask), R.router_z_loss(logits, mask),
        stats["load"], stats["dropped"], stats["entropy"],
    )  # fmt: skip
    return routing, aux


# ---- expert feed-forwards ------------------------------------------------------------


def expert_ffn(weights: ExpertWeights, inputs: jax.Array, activation_name: str) -> jax.Array:
    """Every expert on its own rows: ``inputs`` [..., E, C, D] -> [..., E, C, D].

    ``down(act(gate x) * up x)`` (SwiGLU, Mixtral), or ``down(act(up x))``
    when ``weights.gate`` is None (Switch). Batched einsums over E on GPU/TPU;
    on CPU a loop over experts (:func:`blocked_matmul` with one block per
    expert), which XLA:CPU runs ~1.5x faster than the batched einsum, forward
    and backward (bench/moe.py).

    >>> import numpy as np
    >>> up, gate, down = (np.random.default_rng(0).normal(size=s).astype(np.float32)
    ...                   for s in [(2, 4, 8), (2, 4, 8), (2, 8, 4)])
    >>> inputs = np.random.default_rng(1).normal(size=(2, 3, 4)).astype(np.float32)
    >>> out = expert_ffn(ExpertWeights(up, gate, down), inputs, "silu")    # [E, C, D]
    >>> silu = lambda a: a / (1 + np.exp(-a))
    >>> all(np.allclose(out[e], (silu(inputs[e] @ gate[e]) * (inputs[e] @ up[e])) @ down[e],
    ...                 atol=1e-4) for e in range(2))
    True
    """
    act = _activation(activation_name)
    return jax.lax.platform_dependent(
        inputs, *weights,
        cpu=partial(_experts_loop, activation=act),
        default=partial(_experts_einsum, activation=act),
    )  # fmt: skip


def grouped_ffn(
    weights: ExpertWeights,
    rows: jax.Array,
    group_sizes: jax.Array,
    activation_name: str,
    matmul: GroupedMatmul | None = None,
) -> jax.Array:
    """:func:`expert_ffn` on rows sorted by expert: ``rows`` [M, D], the first
    ``group_sizes[0]`` for expert 0, the next for expert 1, ...; with
    ``matmul`` (default :func:`ragged_matmul`: rows past ``sum(group_sizes)``
    give 0).

    Row 0 belongs to expert 0, rows 1 and 2 to expert 1 (ungated ReLU experts):

    >>> import numpy as np
    >>> up, down = np.arange(16.0).reshape(2, 2, 4) / 8, np.ones((2, 4, 2)) / 4
    >>> rows = np.array([[1.0, -1.0], [1.0, 2.0], [0.5, 0.5]])
    >>> out = grouped_ffn(ExpertWeights(up, None, down), rows, jnp.array([1, 2]), "relu")
    >>> expected = [np.maximum(r @ up[e], 0) @ down[e] for r, e in zip(rows, [0, 1, 1])]
    >>> np.allclose(out, expected)
    True
    """
    grouped = partial(matmul or ragged_matmul, group_sizes=group_sizes)
    return _ffn(rows, *weights, activation=_activation(activation_name), matmul=grouped)


def _experts_einsum(inputs, up, gate, down, *, activation):
    hidden = jnp.einsum("...ecd,edf->...ecf", inputs, up)
    if gate is not None:
        hidden = activation(jnp.einsum("...ecd,edf->...ecf", inputs, gate)) * hidden
    else:
        hidden = activation(hidden)
    return jnp.einsum("...ecf,efd->...ecd", hidden, down)


def _experts_loop(inputs, up, gate, down, *, activation):
    """:func:`_experts_einsum` as grouped matmuls over expert-major rows [E * M, D]."""
    E, C, D = inputs.shape[-3:]
    rows = jnp.moveaxis(inputs, -3, 0)  # [E, ..., C, D]
    lead = rows.shape[1:-1]
    M = math.prod(lead)
    matmul = partial(blocked_matmul, group_sizes=jnp.full((E,), M, jnp.int32), block=M)
    out = _ffn(rows.reshape(E * M, D), up, gate, down, activation=activation, matmul=matmul)
    return jnp.moveaxis(out.reshape(E, *lead, D), 0, -3)


def _ffn(rows, up, gate, down, *, activation, matmul):
    if gate is None:
        hidden = activation(matmul(rows, up))
    else:
        hidden = activation(matmul(rows, gate)) * matmul(rows, up)
    return matmul(hidden, down)


# ---- dropless: grouped matmuls over expert-sorted rows -------------------------------


def dropless_experts(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    up: jax.Array,
    gate: jax.Array | None,
    down: jax.Array,
    *,
    activation: Callable[[jax.Array], jax.Array],
    matmul: GroupedMatmul,
    block: int = 1,
) -> jax.Array:
    """Dropless MoE feed-forward of tokens ``x`` [N, D] (MegaBlocks).

    ``experts``, ``weights`` [N, K]: each token's chosen experts and combine
    weights; ``up``, ``gate`` [E, D, F] (``gate`` None: ungated), ``down``
    [E, F, D]. ``y[n] = sum_k weights[n, k] * expert_{experts[n, k]}(x[n])``,
    computed on the choices sorted by expert (:func:`~.routing.sort_by_expert`
    with ``block``) with ``matmul(rows [P, A], w [E, A, B], group_sizes [E])
    -> [P, B]`` (:func:`ragged_matmul`, or :func:`blocked_matmul` with the
    same ``block``).

    Two tokens, two choices each, ungated identity-activation experts
    ``expert_e(x) = x up_e down_e``:

    >>> import numpy as np
    >>> up = np.stack([np.eye(2), 2 * np.eye(2)]).astype(np.float32)    # [E, D, F]
    >>> down = np.stack([np.eye(2), np.eye(2)]).astype(np.float32)      # [E, F, D]
    >>> x = np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)
    >>> experts, weights = np.array([[0, 1], [1, 0]]), np.array([[0.5, 0.5], [0.25, 0.75]])
    >>> y = dropless_experts(x, experts, weights, up, None, down, activation=lambda a: a,
    ...                      matmul=partial(blocked_matmul, block=2), block=2)
    >>> print(y)                          # 0.5 x + 0.5 (2x); 0.25 (2x) + 0.75 x
    [[1.5  3.  ]
     [3.75 5.  ]]
    """
    N, D = x.shape
    layout = R.sort_by_expert(experts[None], up.shape[0], block=block)
    sizes = layout.group_sizes[0]
    rows = R.permute(x[None], layout)[0]  # [P, D]
    grouped = partial(matmul, group_sizes=sizes)
    out = _ffn(rows, up, gate, down, activation=activation, matmul=grouped)  # [P, D]
    return R.unsort(out[None], weights[None], layout)[0]


def ragged_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """``x[r] @ w[e(r)]`` by ``jax.lax.ragged_dot`` (GPU/TPU kernels; dense on CPU).
    Rows past ``sum(group_sizes)`` are 0.

    >>> w = jnp.stack([jnp.eye(2), 10 * jnp.eye(2)])       # expert 0: x, expert 1: 10 x
    >>> print(ragged_matmul(jnp.ones((4, 2)), w, jnp.array([1, 2])))
    [[ 1.  1.]
     [10. 10.]
     [10. 10.]
     [ 0.  0.]]
    """
    return jax.lax.ragged_dot(x, w, group_sizes)


@partial(jax.custom_vjp, nondiff_argnums=(3,))
def blocked_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array, block: int) -> jax.Array:
    """Grouped matmul ``out[r] = x[r] @ w[e(r)]`` as a loop over blocks of rows.

    ``x`` [P, A] with P a multiple of ``block``, ``w`` [E, A, B],
    ``group_sizes`` [E] multiples of ``block`` (:func:`~.routing.sort_by_expert`
    with the same block), so block i belongs to one expert e_i. The loop runs
    over the ``sum(group_sizes) / block`` used blocks only (a ``while`` with
    a traced bound: rows past them are 0), so the work is that of the routed
    rows plus the padding, not E times it. Gradients (MegaBlocks' gmm / tgmm):
    ``dx[r] = dout[r] @ w[e(r)]^T`` by the same loop, and
    ``dw[e] = sum_{blocks i of e} x_i^T dout_i``, accumulated in place.

    >>> w = jnp.stack([jnp.eye(2), 10 * jnp.eye(2)])       # expert 0: x, expert 1: 10 x
    >>> out = blocked_matmul(jnp.ones((6, 2)), w, jnp.array([2, 2]), 2)
    >>> print(out[:, 0])                                   # the last block is unused
    [ 1.  1. 10. 10.  0.  0.]
    >>> bool(jnp.all(out[:4] == ragged_matmul(jnp.ones((4, 2)), w, jnp.array([2, 2]))))
    True
    """
    return _blocked(x, w, group_sizes, block, transpose=False)


def _block_experts(group_sizes, num_blocks: int, block: int):
    ends = jnp.cumsum(group_sizes)
    starts = jnp.arange(num_blocks, dtype=ends.dtype) * block
    which = jnp.searchsorted(ends, starts, side="right")
    return jnp.minimum(which, group_sizes.shape[0] - 1), ends[-1] // block


def _blocked(x, w, group_sizes, block, *, transpose: bool):
    P = x.shape[0]
    if P % block:
        raise ConfigError(
            f"blocked_matmul needs a row count that is a multiple of block={block}, got {P}",
            where="blocked_matmul",
            fix="lay the rows out with routing.sort_by_expert(..., block=block)",
        )
    owner, used = _block_experts(group_sizes, P // block, block)
    contract = ((1,), (1,) if transpose else (0,))  # x_i [b, A] . w_e [A, B] (or [B, A])
    out_dim = w.shape[1] if transpose else w.shape[2]
    dtype = jnp.result_type(x.dtype, w.dtype)

    def body(i, out):
        rows = jax.lax.dynamic_slice_in_dim(x, i * block, block)
        w_e = jax.lax.dynamic_index_in_dim(w, owner[i], keepdims=False)
        y = jax.lax.dot_general(rows, w_e, (contract, ((), ())))
        return jax.lax.dynamic_update_slice_in_dim(out, y.astype(dtype), i * block, axis=0)

    # zeros typed like x . w, so the carry varies over the same shard_map axes as the body's
    init = jnp.zeros_like(x[0, 0] * w[0, 0, 0], shape=(P, out_dim), dtype=dtype)
    return jax.lax.fori_loop(0, used, body, init)


def _blocked_fwd(x, w, group_sizes, block):
    return blocked_matmul(x, w, group_sizes, block), (x, w, group_sizes)


def _blocked_bwd(block, residuals, dout):
    x, w, group_sizes = residuals
    dx = _blocked(dout, w, group_sizes, block, transpose=True)
    owner, used = _block_experts(group_sizes, x.shape[0] // block, block)
    acc = jnp.promote_types(w.dtype, jnp.float32)

    def body(i, dw):
        rows = jax.lax.dynamic_slice_in_dim(x, i * block, block)
        grads = jax.lax.dynamic_slice_in_dim(dout, i * block, block)
        e = owner[i]
        update = jax.lax.dot_general(rows, grads, (((0,), (0,)), ((), ())))  # [A, B]
        old = jax.lax.dynamic_index_in_dim(dw, e, keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(dw, old + update.astype(acc), e, axis=0)

    init = jnp.zeros_like(x[0, 0] * dout[0, 0], shape=w.shape, dtype=acc)
    dw = jax.lax.fori_loop(0, used, body, init)
    like = x[0, 0] * dout[0, 0] * w[0, 0, 0]
    return _cotangent_for(dx.astype(x.dtype), x, like), _cotangent_for(dw, w, like), None


def _cotangent_for(ct: jax.Array, primal: jax.Array, like: jax.Array) -> jax.Array:
    """``ct`` (typed like ``like`` inside ``jax.shard_map``) as ``primal``'s cotangent:
    summed over the mesh axes along which ``primal`` does not vary, as the
    transpose of JAX's implicit broadcast does. Outside shard_map: ``ct``."""
    zero = jnp.zeros_like(like, dtype=primal.dtype)
    _, pull = jax.vjp(lambda p: p + zero, primal)
    return pull(ct.astype(primal.dtype))[0]


blocked_matmul.defvjp(_blocked_fwd, _blocked_bwd)
