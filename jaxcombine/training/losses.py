"""Language-model losses: next-token cross-entropy and the MoE auxiliary terms.

    CE = mean over tokens t of -log softmax(z_t)[y_t]
    aux = w_lb * mean_layers(load-balancing loss) + w_z * mean_layers(router z-loss)

z_t are a token's logits and y_t its target; the auxiliary terms are Switch's
(arXiv:2101.03961) and ST-MoE's (arXiv:2202.08906).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx


def token_cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    """Mean over (unmasked) tokens of -log softmax(logits)[target], in float32;
    ``logits`` [..., V], ``targets`` [...] int, ``mask`` [...] bool.

        CE = sum_t m_t (logsumexp(z_t) - z_t[y_t]) / max(sum_t m_t, 1)

    >>> import jax.numpy as jnp, numpy as np
    >>> p = jnp.array([[0.25, 0.25, 0.5], [0.75, 0.25, 0.0]])
    >>> logits = jnp.log(p)
    >>> targets = jnp.array([2, 0])
    >>> bool(np.isclose(token_cross_entropy(logits, targets), -(np.log(1 / 2) + np.log(3 / 4)) / 2))
    True
    >>> float(token_cross_entropy(logits, targets, mask=jnp.array([True, False])))   # -log(1/2)
    0.6931
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    if mask is None:
        return jnp.mean(losses)
    mask = mask.astype(jnp.float32)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lm_loss(graphdef, moe_mesh=None):
    """``loss(params, rows [B, L+1], key, constants) -> (loss, {})`` for
    :func:`~jaxcombine.training.train`: the decoder ``graphdef`` with ``params``
    reads ``rows[:, :-1]``; the loss is the mean cross-entropy of ``rows[:, 1:]``
    (:func:`token_cross_entropy`): mean_{b,t} -log p(rows[b, t+1] | rows[b, :t+1]).

    The model is called as ``model(ids, moe_mesh=moe_mesh)`` and must return an
    object with ``.logits`` [B, L, V], like :class:`~jaxcombine.models.Decoder`.
    A bigram table checks the shift by hand:

    >>> import types, jax.numpy as jnp
    >>> from flax import nnx
    >>> class Bigram(nnx.Module):
    ...     def __init__(self):     # p(next | 0) = [1/2, 1/2], p(next | 1) = [1/4, 3/4]
    ...         self.table = nnx.Param(jnp.log(jnp.array([[0.5, 0.5], [0.25, 0.75]])))
    ...     def __call__(self, ids, moe_mesh=None):
    ...         return types.SimpleNamespace(logits=self.table[...][ids])
    >>> graphdef, params = nnx.split(Bigram())
    >>> loss, metrics = lm_loss(graphdef)(params, jnp.array([[0, 1, 1]]), None, None)
    >>> float(loss)                                   # (-log 1/2 - log 3/4) / 2
    0.4904
    """

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

        total = w_lb * mean_layers(balance) + w_z * mean_layers(z),  max_load = E * max(load)

    >>> import jax.numpy as jnp
    >>> from jaxcombine.moe import MoEAux
    >>> aux = MoEAux(load_balancing_loss=jnp.array([1.0, 1.2]), router_z_loss=jnp.array([2.0, 4.0]),
    ...              load=jnp.array([[0.25, 0.75], [0.5, 0.5]]), dropped=jnp.array([0.0, 0.1]),
    ...              entropy=jnp.array([0.6, 0.7]))                   # 2 MoE layers, 2 experts
    >>> total, metrics = moe_aux_losses(aux, load_balancing_weight=0.01, z_loss_weight=0.001)
    >>> float(total)                                                  # 0.01 * 1.1 + 0.001 * 3
    0.014
    >>> float(metrics["max_load"]), float(metrics["dropped"])        # 2 * 0.75, mean
    (1.5, 0.05)
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
