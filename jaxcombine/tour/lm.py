"""Small language models for the tour: configs, stacked initialisation, held-out NLL.

Every model of a section shares one :class:`~jaxcombine.models.DecoderConfig`,
so members stack on a leading axis (:func:`init_members`) and train together
(:func:`jaxcombine.tour.fit.fit`). :func:`held_out_nll` scores every member and
every combination rule on the same held-out rows in one jitted pass per batch:

    NLL = -(1 / #tokens) sum_t log p(x_t | x_<t)

with ``p`` a member's softmax or the combined distribution of
:class:`~jaxcombine.ensemble.Combination`.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine import tree
from jaxcombine.ensemble import Combination
from jaxcombine.models import Decoder, DecoderConfig


def small_decoder(vocab_size: int, *, hidden: int = 64, layers: int = 2, context: int = 128,
                  **overrides) -> DecoderConfig:  # fmt: skip
    """A Llama-style decoder with ``hidden`` width (4 heads of hidden / 4, 2 KV heads,
    SwiGLU of 3 x hidden).

    >>> config = small_decoder(100, hidden=32, layers=1)
    >>> config.num_heads, config.num_kv_heads, config.head_dim, config.intermediate_size
    (4, 2, 8, 96)
    """
    fields = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=3 * hidden,
        num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=hidden // 4,
        max_position_embeddings=context,
    )  # fmt: skip
    return DecoderConfig(**{**fields, **overrides})


def init_members(config: DecoderConfig, seeds: Sequence[int]) -> tuple[Any, Any]:
    """(graph definition, parameters stacked over ``seeds``): member ``i`` is
    ``Decoder(config, rngs=nnx.Rngs(seeds[i]))``.

    >>> graphdef, params = init_members(small_decoder(11, hidden=16, layers=1), [0, 1, 2])
    >>> {x.shape[0] for x in jax.tree.leaves(params)}
    {3}
    """
    models = [Decoder(config, rngs=nnx.Rngs(seed)) for seed in seeds]
    graphdef, _ = nnx.split(models[0], nnx.Param)
    return graphdef, tree.stack([nnx.state(m, nnx.Param) for m in models])


def padded_batches(rows: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(batch [batch_size, L], real [batch_size] bool)`` over ``rows`` in order; the
    last batch is padded with zero rows marked not real, so one compiled program
    serves every batch.

    >>> [(batch.tolist(), real.tolist()) for batch, real in padded_batches(np.arange(3), 2)]
    [([0, 1], [True, True]), ([2, 0], [True, False])]
    """
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        padded = np.zeros((batch_size, *rows.shape[1:]), rows.dtype)
        padded[: len(batch)] = batch
        yield padded, np.arange(batch_size) < len(batch)


@functools.cache
def _nll_sums(graphdef, rules: tuple[tuple[str, Combination], ...]):
    """The jitted pass of :func:`held_out_nll` (built once per model and rules, so
    repeated evaluations -- soups, interpolations -- compile once per shape; the last
    batch is padded with rows weighted 0, so every batch has one shape)."""

    @jax.jit
    def sums(params, batch, real):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits = jax.vmap(lambda p: nnx.merge(graphdef, p)(inputs).logits)(params)
        logits = logits.astype(jnp.float32)

        def picked(log_probs):  # [..., B, T, V] -> summed log-prob of the real rows' targets
            idx = jnp.broadcast_to(targets[..., None], log_probs.shape[:-1] + (1,))
            per_row = jnp.sum(jnp.take_along_axis(log_probs, idx, -1), axis=(-2, -1))
            return per_row @ real

        members = -picked(jax.nn.log_softmax(logits, -1))
        combined = {name: -picked(rule(logits)) for name, rule in rules}
        return members, combined

    return sums


def held_out_nll(
    graphdef,
    stacked_params,
    rows: np.ndarray,
    rules: Mapping[str, Combination] | None = None,
    *,
    batch_size: int = 32,
) -> dict[str, Any]:
    """Mean NLL per token of ``rows`` [R, L+1] (inputs ``row[:-1]``, targets
    ``row[1:]``): ``{"members": [N floats], rule name: float, ...}``.

    Two random members and their linear mixture, against the NLL written out:

    >>> import jax, numpy as np
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> graphdef, params = init_members(small_decoder(11, hidden=16, layers=1), seeds=[0, 1])
    >>> rows = np.random.default_rng(0).integers(0, 11, size=(3, 6))
    >>> nll = held_out_nll(graphdef, params, rows, {"linear": Combination("linear")})
    >>> log_p = jax.jit(jax.vmap(
    ...     lambda p: jax.nn.log_softmax(nnx.merge(graphdef, p)(rows[:, :-1]).logits)))(params)
    >>> member_nll = -np.take_along_axis(np.asarray(log_p), rows[None, :, 1:, None], -1)
    >>> bool(np.allclose(nll["members"], member_nll.mean(axis=(1, 2, 3)), atol=1e-5))
    True
    >>> bool(min(nll["members"]) - 1e-6 <= nll["linear"] <= max(nll["members"]) + 1e-6)
    True
    """
    rules = dict(rules or {})
    sums = _nll_sums(graphdef, tuple(rules.items()))
    rows = np.asarray(rows)
    member_total, combined_total = 0.0, dict.fromkeys(rules, 0.0)
    for padded, real in padded_batches(rows, batch_size):
        members, combined = sums(stacked_params, jnp.asarray(padded), jnp.asarray(real, np.float32))
        member_total = member_total + np.asarray(members, np.float64)
        for name in rules:
            combined_total[name] += float(combined[name])
    tokens = rows.shape[0] * (rows.shape[1] - 1)
    return {
        "members": [float(x) for x in np.atleast_1d(member_total) / tokens],
        **{name: total / tokens for name, total in combined_total.items()},
    }
