"""Stacked members: several decoders of one architecture as one vmapped forward.

Members with equal configs have equal NNX graph definitions, so their
parameters stack into one pytree with a leading member axis N. The ensemble's
forward ``vmap``s the decoder over (parameters, cache) and combines the
members' logits [N, B, T, V] with a :class:`~jaxcombine.ensemble.Combination`
into log-probabilities [B, T, V]; the decode loop of
:mod:`jaxcombine.decoding` runs it unchanged (log-probabilities are logits
to its samplers), so all members decode in one compiled ``while_loop``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine import tree
from jaxcombine.decoding import (
    Decodable,
    DecoderForward,
    PrefixState,
    Sampling,
    Score,
    check_beams,
    generate,
    keep_cache_slots,
    pad_cache_slots,
    score_with,
    take_cache_rows,
)
from jaxcombine.ensemble._rules import Combination
from jaxcombine.errors import ConfigError
from jaxcombine.models import Decoder, DecoderConfig, init_cache

_UNIFORM_LINEAR = Combination()
_GREEDY = Sampling()


@dataclasses.dataclass(frozen=True)
class StackedForward:
    """``forward(params, tokens, mask, cache, last_only)`` of N stacked members:
    combined log-probabilities [B, T, V] and the stacked caches.

    ``combination(vmap(member)(params))``: each member's logits [N, B, T, V]
    (:meth:`members`), then the rule over axis 0.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> graphdef, params = stack_members(members)
    >>> forward = StackedForward(graphdef, Combination("loglinear"))
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    >>> log_p, _ = forward(params, tokens, jnp.ones((1, 8), bool), None)
    >>> z = jnp.stack([m(tokens).logits for m in members])          # [N, B, T, V]
    >>> ref = jax.nn.log_softmax(jax.nn.log_softmax(z).mean(0))      # sum_i log p_i / 2
    >>> log_p.shape, bool(jnp.allclose(log_p, ref, atol=1e-5))
    ((1, 8, 16), True)
    """

    graphdef: Any
    combination: Combination

    def members(self, params, tokens, mask, cache, last_only=False):
        """Every member's logits [N, B, T, V] and the stacked caches."""
        one = DecoderForward(self.graphdef)
        return jax.vmap(lambda p, c: one(p, tokens, mask, c, last_only))(params, cache)

    def member_outputs(self, params, tokens, mask, cache, last_only=False):
        """Every member's :class:`~jaxcombine.models.DecoderOutput`, stacked on axis 0
        (logits [N, B, T, V], final hidden states [N, B, T, E], caches)."""
        one = DecoderForward(self.graphdef)
        return jax.vmap(lambda p, c: one.outputs(p, tokens, mask, c, last_only))(params, cache)

    def __call__(self, params, tokens, mask, cache, last_only=False):
        logits, cache = self.members(params, tokens, mask, cache, last_only)
        return self.combination(logits), cache

    @staticmethod
    def init_cache(params, config, batch, length, dtype):
        """Every member's empty cache, stacked on axis 0."""
        N = jax.tree.leaves(params)[0].shape[0]
        empty = init_cache(config, batch, length, dtype)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (N, *x.shape)), empty)

    @staticmethod
    def take_rows(cache, rows):
        """Rows ``rows`` of every member's cache (stacked on axis 0)."""
        return jax.vmap(take_cache_rows, in_axes=(0, None))(cache, rows)

    @staticmethod
    def pad_slots(cache, extra: int):
        """Every member's cache with ``extra`` empty slots appended."""
        return jax.vmap(lambda c: pad_cache_slots(c, extra))(cache)

    @staticmethod
    def keep_slots(cache, keep):
        """Every member's cache without the rejected tail of its last write."""
        return jax.vmap(keep_cache_slots, in_axes=(0, None))(cache, keep)


def check_same_architecture(configs: Sequence[DecoderConfig], names=None) -> None:
    """A :class:`ConfigError` naming the first member whose config differs from the
    first one's (dropout aside), and the differing fields.

    >>> from jaxcombine.models import DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> check_same_architecture([config, config.replace(dropout_rate=0.1)])   # silent
    >>> check_same_architecture([config, config.replace(num_layers=3)], ["base", "deep"])
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: deep: deep has a different architecture from base (num_layers)
      How to fix: stack members of one architecture; combine others as a tuple of models
    """
    if not configs:
        raise ConfigError("no members given", where="models", fix="pass at least one model")
    names = names or [f"member {i}" for i in range(len(configs))]
    first = configs[0]
    for name, config in zip(names[1:], configs[1:], strict=True):
        if config.replace(dropout_rate=first.dropout_rate) != first:
            diff = [
                f.name
                for f in dataclasses.fields(first)
                if getattr(first, f.name) != getattr(config, f.name)
            ]
            raise ConfigError(
                f"{name} has a different architecture from {names[0]} ({', '.join(diff)})",
                where=name,
                fix="stack members of one architecture; combine others as a tuple of models",
            )


def stack_members(models: Sequence[Decoder]) -> tuple[Any, Any]:
    """(graph definition, parameters stacked on a leading member axis) of ``models``,
    which must share one architecture (equal configs up to dropout).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> graphdef, params = stack_members(members)
    >>> params["lm_head"]["kernel"].shape                   # [N, E, V]
    (2, 8, 16)
    >>> bool(jnp.array_equal(params["lm_head"]["kernel"][1], members[1].lm_head.kernel.get_value()))
    True
    """
    check_same_architecture([m.config for m in models])
    splits = [nnx.split(m) for m in models]
    params = [p for _, p in splits]
    tree.check_same_structure(params, [f"member {i}" for i in range(len(models))])
    return splits[0][0], tree.stack(params)


def stacked(models: Sequence[Decoder], combination: Combination = _UNIFORM_LINEAR) -> Decodable:
    """Members of one architecture as one :class:`~jaxcombine.decoding.Decodable`:
    their parameters stacked, their forward vmapped, their logits combined.

    Everything that takes a :class:`~jaxcombine.decoding.Decodable` takes it:
    ``generate``, ``score_with``, ``prefill_prefix``, ``speculative_generate``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> from jaxcombine.decoding import generate
    >>> ens = stacked(members, Combination("linear"))
    >>> new = generate(ens, [[1, 2, 3]], max_new_tokens=5)[0]
    >>> z = jnp.stack([m(jnp.array([[1, 2, 3] + new])).logits[0] for m in members])
    >>> p = jax.nn.softmax(z).mean(0)                       # (p_1 + p_2) / 2, [8, V]
    >>> new == p[2:-1].argmax(-1).tolist()                  # greedy on the mixture
    True
    """
    combination.check_members(len(models))
    graphdef, params = stack_members(models)
    dtype = models[0].embed_tokens.embedding.get_value().dtype
    return Decodable(StackedForward(graphdef, combination), params, models[0].config, dtype)


def generate_ensemble(
    models: Sequence[Decoder],
    prompts: Sequence[Sequence[int]],
    combination: Combination = _UNIFORM_LINEAR,
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = _GREEDY,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    prefix: PrefixState | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Continue each prompt with the members' combined next-token distribution.

    Members of one architecture are stacked and decoded together in one
    jitted loop (:class:`StackedForward`), greedy, sampled or with
    ``num_beams`` beams. Returns the new tokens per prompt.
    ``prefix``: a state from ``prefill_prefix(stacked(models, combination), ids)``.

    ``generate(stacked(models, combination), prompts, ...)``; stack the
    members once with :func:`stacked` when generating many times.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> from jaxcombine.decoding import generate
    >>> rule = Combination("linear")                         # uniform mixture
    >>> new = generate_ensemble(members, [[1, 2, 3]], rule, max_new_tokens=5)
    >>> new == generate(stacked(members, rule), [[1, 2, 3]], max_new_tokens=5)
    True
    """
    check_beams(num_beams, sampling)  # before the members are stacked
    return generate(
        stacked(models, combination), prompts, max_new_tokens=max_new_tokens,
        sampling=sampling, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, seed=seed,
        prefix=prefix, num_beams=num_beams, length_penalty=length_penalty,
    )  # fmt: skip


def score_ensemble(
    models: Sequence[Decoder],
    ids: Sequence[int],
    combination: Combination = _UNIFORM_LINEAR,
    *,
    window: int | None = None,
    batch_size: int = 8,
) -> Score:
    """NLL of ``ids`` under the members' combined distribution, window by window
    as :func:`jaxcombine.decoding.score`: ``-sum_t log p_ens(x_t | x_<t)``, where
    ``p_ens`` is ``combination`` of the members' next-token distributions.

    For ``linear`` weights w: ``p_ens(v) = sum_i w_i p_i(v | x_<t)``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> ids = [1, 2, 3, 4, 5, 6, 7, 8]
    >>> s = score_ensemble(members, ids, Combination("linear", (0.75, 0.25)))
    >>> z = jnp.stack([m(jnp.array([ids])).logits[0] for m in members])
    >>> p = 0.75 * jax.nn.softmax(z[0]) + 0.25 * jax.nn.softmax(z[1])
    >>> ref = -sum(float(jnp.log(p[t - 1, ids[t]])) for t in range(1, 8)) / 7
    >>> s.count, abs(s.nll - ref) < 1e-5
    (7, True)
    """
    ensemble = stacked(models, combination)
    return score_with(
        ensemble.forward, ensemble.params, ensemble.config, ids,
        window=window, batch_size=batch_size,
    )  # fmt: skip
