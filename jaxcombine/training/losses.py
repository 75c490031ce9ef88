"""Language-model losses: next-token cross-entropy and the MoE auxiliary terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Mean over (unmasked) tokens of -log softmax(logits)[target], in float32;
    ``logits`` [..., V], ``targets`` [...] int, ``mask`` [...] bool."""
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lm_loss(graphdef, moe_mesh=None):
    """``loss(params, rows [B, L+1], key, constants) -> (loss, {})`` for
    :func:`~jaxcombine.training.train`: the decoder ``graphdef`` with ``params``
    reads ``rows[:, :-1]``; the loss is the mean cross-entropy of ``rows[:, 1:]``."""

    def loss(params, rows, key, constants):
        del key, constants
        out = nnx.merge(graphdef, params)(rows[:, :-1], moe_mesh=moe_mesh)
        return token_cross_entropy(out.logits, rows[:, 1:]), {}

    return loss


def moe_aux_losses(moe_aux, load_balancing_weight: float, z_loss_weight: float):
    """(weighted sum, metrics) of a decoder's per-layer MoE terms
    (:class:`~jaxcombine.moe.MoEAux` stacked over MoE layers): the Switch
    load-balancing loss (Fedus et al. 2021, arXiv:2101.03961) and the router
    z-loss (Zoph et al. 2022, arXiv:2202.08906), each averaged over layers.

    Metrics: both losses, the fraction of dropped choices, router entropy and
    the busiest expert's share of choices relative to uniform (1 = balanced).
    """
    balance = jnp.mean(moe_aux.load_balancing_loss)
    z = jnp.mean(moe_aux.router_z_loss)
    num_experts = moe_aux.load.shape[-1]
    metrics = {
        "load_balancing_loss": balance,
        "router_z_loss": z,
        "dropped": jnp.mean(moe_aux.dropped),
        "router_entropy": jnp.mean(moe_aux.entropy),
        "max_load": jnp.max(moe_aux.load) * num_experts,
    }
    return load_balancing_weight * balance + z_loss_weight * z, metrics
