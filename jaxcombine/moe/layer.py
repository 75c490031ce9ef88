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

An expert is SwiGLU, ``down(act(gate x) * up x)`` (Mixtral), or with
``gated=False`` ``down(act(up x))`` (Switch: ReLU). Parameters carry logical
axes (``expert``, ``embed``, ``mlp``) for :func:`jaxcombine.sharding.shard_model`.
The call returns ``(y, aux)``; ``aux`` holds the load-balancing loss, the
router z-loss and routing statistics for the caller to weigh and log.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.errors import ConfigError
from jaxcombine.models._config import ACTIVATIONS
from jaxcombine.models._layers import activation, param
from jaxcombine.moe import routing as R


@dataclass(frozen=True)
class MoEConfig:
    """What a :class:`SparseMoE` layer computes.

    ``capacity_factor``: slots per expert = ceil(factor * S * K / E)
    (``capacity_rounding``, ``capacity_multiple_of``); ``None`` for dropless
    routing (every choice is computed). ``group_size``: tokens per routing
    group (default: one sequence per group). ``priority``: "token" or
    "probability" (batch-prioritised routing). ``routing``: "token_choice" or
    "expert_choice" (not for causal decoding). ``renormalize``: the K weights
    divided by their sum (Mixtral) or not (Switch).
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
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ConfigError(
                f"capacity_factor must be > 0, got {self.capacity_factor}",
                where="MoEConfig.capacity_factor",
                fix="use e.g. 1.25, or None for dropless routing",
            )
        if self.routing == "expert_choice" and self.capacity_factor is None:
            raise ConfigError(
                "expert-choice routing needs a capacity_factor",
                where="MoEConfig.capacity_factor",
                fix="set capacity_factor (each expert takes factor * S * K / E tokens)",
            )
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"unknown activation {self.activation!r}",
                where="MoEConfig.activation",
                fix=f"use one of {', '.join(ACTIVATIONS)} (HF's hidden_act names)",
            )


class MoEAux(NamedTuple):
    """What the layer returns besides its output (nothing is added to a loss silently)."""

    load_balancing_loss: jax.Array
    router_z_loss: jax.Array
    load: jax.Array  # [E] share of choices per expert
    dropped: jax.Array  # fraction of choices over capacity
    entropy: jax.Array  # mean router entropy (nats)


class SparseMoE(nnx.Module):
    """Sparse MoE feed-forward layer; ``layer(x [B, T, D]) -> (y [B, T, D], MoEAux)``."""

    def __init__(self, config: MoEConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        E, D, F = config.num_experts, config.hidden_size, config.intermediate_size
        self.config = config
        self.router = param(rngs, (D, E), ("embed", None), dtype)
        self.up = param(rngs, (E, D, F), ("expert", "embed", "mlp"), dtype)
        self.gate = (
            param(rngs, (E, D, F), ("expert", "embed", "mlp"), dtype) if config.gated else None
        )
        self.down = param(rngs, (E, F, D), ("expert", "mlp", "embed"), dtype)
        self.rngs = rngs if config.router_jitter > 0 else None

    def experts(self, inputs: jax.Array) -> jax.Array:
        """Every expert on its own rows: ``inputs`` [..., E, C, D] -> [..., E, C, D]."""
        act = activation(self.config.activation)
        up = jnp.einsum("...ecd,edf->...ecf", inputs, self.up[...])
        if self.gate is None:
            hidden = act(up)
        else:
            hidden = act(jnp.einsum("...ecd,edf->...ecf", inputs, self.gate[...])) * up
        return jnp.einsum("...ecf,efd->...ecd", hidden, self.down[...])

    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> tuple[jax.Array, MoEAux]:
        config = self.config
        B, T, D = x.shape
        groups = _groups(x, config.group_size)  # [G, S, D]
        S = groups.shape[1]
        routed = groups
        if config.router_jitter > 0 and not deterministic:
            noise = jax.random.uniform(
                self.rngs.jitter(), groups.shape, minval=1 - config.router_jitter,
                maxval=1 + config.router_jitter,
            )  # fmt: skip
            routed = groups * noise.astype(groups.dtype)
        logits = jnp.einsum(
            "gsd,de->gse", routed.astype(jnp.float32), self.router[...].astype(jnp.float32)
        )
        probs = R.router_probabilities(logits)
        E, K = config.num_experts, config.num_experts_per_token
        if config.routing == "expert_choice":
            choice = R.expert_choice(probs, self._capacity(S))
            out = self.experts(R.expert_choice_dispatch(groups, choice))
            y = R.expert_choice_combine(out, choice, S)
            balance, stats = jnp.float32(0.0), R.expert_choice_stats(probs, choice)
        else:
            capacity = None if config.capacity_factor is None else self._capacity(S)
            routing = R.token_choice(
                probs, K, capacity=capacity, renormalize=config.renormalize,
                priority=config.priority,
            )  # fmt: skip
            y = R.combine(self.experts(R.dispatch(groups, routing, E)), routing)
            balance, stats = (
                R.load_balancing_loss(probs, routing.experts),
                R.router_stats(probs, routing),
            )
        aux = MoEAux(
            balance, R.router_z_loss(logits), stats["load"], stats["dropped"], stats["entropy"]
        )
        return y.reshape(B, T, D).astype(x.dtype), aux

    def _capacity(self, group_size: int) -> int:
        c = self.config
        return R.expert_capacity(
            group_size, c.num_experts, c.num_experts_per_token, c.capacity_factor,
            rounding=c.capacity_rounding, multiple_of=c.capacity_multiple_of,
        )  # fmt: skip


def _groups(x: jax.Array, group_size: int | None) -> jax.Array:
    B, T, D = x.shape
    if group_size is None:
        return x
    if (B * T) % group_size:
        raise ConfigError(
            f"{B * T} tokens (batch {B} x length {T}) do not split into groups of {group_size}",
            where="MoEConfig.group_size",
            fix="choose a group size that divides batch x length, or None (one group per row)",
        )
    return x.reshape(-1, group_size, D)
