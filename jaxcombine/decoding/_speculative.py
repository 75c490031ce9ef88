"""Speculative decoding (Leviathan et al. 2023, arXiv:2211.17192; Chen et al.
2023, arXiv:2302.01318): a small draft model proposes, the target verifies.

Each iteration of one jitted ``lax.while_loop``:

1. the draft decodes ``g`` tokens ``d_1..d_g`` from the last emitted token
   ``x`` (one ``lax.scan`` of single-token steps; a last step feeds ``d_g``
   so the draft's cache holds every proposal), with distributions ``q_i``;
2. the target runs once over ``[x, d_1..d_g]`` and gives ``p_0..p_g``;
3. ``d_{i+1}`` is accepted while ``u_i < p_i(d_{i+1}) / q_i(d_{i+1})``
   (``u_i ~ U[0, 1)``); at the first rejection ``a`` a token is drawn from
   ``norm(max(0, p_a - q_a))``, and when all ``g`` are accepted a bonus token
   from ``p_g``. So each iteration emits ``a + 1`` tokens (1 to ``g + 1``)
   distributed exactly as the target samples them;
4. both caches drop the rejected tail (``forward.keep_slots``).

Greedy decoding is the same procedure with one-hot distributions at the
argmax: a proposal is accepted iff it is the target's argmax, and the
correction is the target's argmax, so the output equals the target's greedy
output (up to float ties: the target scores ``g + 1`` tokens in one call,
whose rounding can differ from one-token steps in the last bit).

The target can be any :class:`~jaxcombine.decoding.Decodable`: one model or
an ensemble (stacked members, any rule). Rows of a batch accept different
numbers of tokens; the caches stay aligned (slots a row rejected are invalid
keys), so a batch of B > 1 may use up to ``(g + 1)`` slots per emitted token
and its cache is sized for that worst case.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.decoding._decodable import Decodable, check_new_tokens, check_same_vocabulary
from jaxcombine.decoding._generate import GREEDY, special_tokens, strip_after_eos
from jaxcombine.decoding._prefill import prefill_prompts
from jaxcombine.decoding._sampling import Sampling, filter_logits
from jaxcombine.errors import InputError
from jaxcombine.models import Decoder


class Speculative(NamedTuple):
    """Tokens per prompt and how the draft fared.

    >>> out = Speculative(tokens=[[4, 5, 6, 7, 8]], target_calls=2, accepted=2)
    >>> out.tokens_per_call               # (5 - 1) tokens after the first over 2 calls
    2.0

    References: Leviathan et al. 2023, Fast Inference from Transformers via Speculative Decoding,
    arXiv:2211.17192.
    """

    tokens: list[list[int]]
    target_calls: int  # target forwards after the prefill
    accepted: int  # draft tokens accepted, over all rows

    @property
    def tokens_per_call(self) -> float:
        """Tokens a row gains per target forward, averaged over rows (plain
        decoding: 1; the first token, from the prefill, is not counted)."""
        gained = sum(len(t) - 1 for t in self.tokens) / len(self.tokens)
        return gained / max(self.target_calls, 1)


def distributions(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """The distributions tokens are drawn from: one-hot at the argmax when greedy,
    else softmax of the filtered logits (temperature, top-k, top-p)."""
    if sampling.greedy:
        return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jax.nn.softmax(filter_logits(logits, sampling), axis=-1)


def draw(key, probs: jax.Array, sampling: Sampling) -> jax.Array:
    """A token per row of ``probs`` [..., V]: its argmax when greedy (every
    distribution is then one-hot, or a residual that is one-hot), else a sample."""
    if sampling.greedy:
        return jnp.argmax(probs, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, jnp.log(probs)).astype(jnp.int32)


class _SpecState(NamedTuple):
    tokens: jax.Array  # [B, N + g + 1] emitted tokens (pad after a row finishes)
    count: jax.Array  # [B] tokens emitted per row
    last: jax.Array  # [B] the last emitted token
    done: jax.Array  # [B]
    target_cache: Any
    draft_cache: Any
    key: jax.Array
    calls: jax.Array  # [] target forwards
    accepted: jax.Array  # [] accepted proposals


@partial(
    jax.jit,
    static_argnames=("target", "draft", "num_draft_tokens", "max_new_tokens", "sampling"),
)
def speculative_loop(
    target,
    target_params,
    draft,
    draft_params,
    first_logits,
    target_cache,
    draft_cache,
    key,
    eos_ids,
    pad_id,
    *,
    num_draft_tokens: int,
    max_new_tokens: int,
    sampling: Sampling,
):
    """(tokens [B, max_new_tokens], target calls, accepted proposals) after both
    models prefilled the prompts; ``first_logits`` are the target's."""
    g, N = num_draft_tokens, max_new_tokens
    B = first_logits.shape[0]
    positions = jnp.arange(g + 1)

    def propose(state: _SpecState, key):
        def step(carry, step_key):
            cache, token = carry
            logits, cache = draft(draft_params, token[:, None], jnp.ones((B, 1), bool), cache)
            q = distributions(logits[:, -1], sampling)  # [B, V]
            proposal = draw(step_key, q, sampling)
            return (cache, proposal), (proposal, q)

        (cache, _), (proposals, q) = jax.lax.scan(
            step, (state.draft_cache, state.last), jax.random.split(key, g + 1)
        )
        # proposals [g + 1, B]: d_1..d_g and an unused one; q [g + 1, B, V].
        return cache, proposals[:g].T, jnp.swapaxes(q[:g], 0, 1)

    def body(state: _SpecState):
        key, propose_key, accept_key, fix_key = jax.random.split(state.key, 4)
        draft_cache, drafts, q = propose(state, propose_key)  # [B, g], [B, g, V]
        inputs = jnp.concatenate([state.last[:, None], drafts], axis=1)  # [B, g + 1]
        logits, target_cache = target(
            target_params, inputs, jnp.ones((B, g + 1), bool), state.target_cache
        )
        p = distributions(logits, sampling)  # [B, g + 1, V]
        p_d = jnp.take_along_axis(p[:, :g], drafts[..., None], axis=-1)[..., 0]  # [B, g]
        q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]
        u = jax.random.uniform(accept_key, (B, g))
        accepted = jnp.sum(jnp.cumprod(u * q_d < p_d, axis=1), axis=1)  # [B] in 0..g
        q_ext = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # q_g = 0: bonus from p_g
        p_a = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
        q_a = jnp.take_along_axis(q_ext, accepted[:, None, None], axis=1)[:, 0]
        residual = jnp.maximum(p_a - q_a, 0.0)
        residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, p_a)
        fix = draw(fix_key, residual, sampling)  # [B]
        # d_1..d_a, then the correction (or bonus) token: [B, g + 1]
        padded = jnp.pad(drafts, ((0, 0), (0, 1)))
        emitted = jnp.where(positions < accepted[:, None], padded, fix[:, None])
        is_eos = jnp.isin(emitted, eos_ids) & (positions <= accepted[:, None])
        first_eos = jnp.where(jnp.any(is_eos, 1), jnp.argmax(is_eos, 1), g + 1)
        n_emit = jnp.minimum(accepted + 1, first_eos + 1)
        n_emit = jnp.where(state.done, 0, jnp.minimum(n_emit, N - state.count))
        emitted = jnp.where(positions < n_emit[:, None], emitted, pad_id)
        tokens = jax.vmap(lambda row, new, at: jax.lax.dynamic_update_slice(row, new, (at,)))(
            state.tokens, emitted, state.count
        )
        count = state.count + n_emit
        done = state.done | (first_eos < n_emit) | (count >= N)
        last = jnp.take_along_axis(emitted, jnp.maximum(n_emit - 1, 0)[:, None], 1)[:, 0]
        last = jnp.where(n_emit > 0, last, state.last)
        keep = positions[None, :] <= jnp.where(state.done, 0, accepted)[:, None]  # [B, g + 1]
        return _SpecState(
            tokens, count, last, done,
            target.keep_slots(target_cache, keep), draft.keep_slots(draft_cache, keep), key,
            state.calls + 1, state.accepted + jnp.sum(jnp.where(state.done, 0, accepted)),
        )  # fmt: skip

    key, first_key = jax.random.split(key)
    first = draw(first_key, distributions(first_logits, sampling), sampling)  # [B]
    done = jnp.isin(first, eos_ids) | (N <= 1)
    start = _SpecState(
        tokens=jnp.full((B, N + g + 1), pad_id, jnp.int32).at[:, 0].set(first),
        count=jnp.ones((B,), jnp.int32),
        last=first,
        done=done,
        target_cache=target_cache,
        draft_cache=draft_cache,
        key=key,
        calls=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((), jnp.int32),
    )
    final = jax.lax.while_loop(lambda s: ~jnp.all(s.done), body, start)
    return final.tokens[:, :N], final.calls, final.accepted


def layer_skip_draft(model: Decoder, num_layers: int) -> Decoder:
    """A draft that shares ``model``'s weights: its first ``num_layers`` layers, then
    its final norm and head (self-speculative decoding by layer skipping: an
    early exit). No second model to train or load; the arrays are shared.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> draft = layer_skip_draft(model, 1)
    >>> draft.config.num_layers, len(draft.layers)
    (1, 1)
    >>> bool(jnp.array_equal(draft.lm_head.kernel.get_value(), model.lm_head.kernel.get_value()))
    True

    References: Zhang et al. 2023, Draft & Verify: Lossless Large Language Model Acceleration via
    Self-Speculative Decoding, arXiv:2309.08168; Elhoushi et al. 2024, LayerSkip: Enabling Early
    Exit Inference and Self-Speculative Decoding, arXiv:2404.16710.
    """
    total = model.config.num_layers
    if not 1 <= num_layers < total:
        raise InputError(
            f"a layer-skip draft keeps 1 to {total - 1} of the {total} layers, got {num_layers}",
            where="num_layers",
            fix="keep fewer layers than the model has",
        )
    config = model.config.replace(num_layers=num_layers)
    dtype = model.embed_tokens.embedding.get_value().dtype
    draft = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    state = nnx.to_pure_dict(nnx.state(model))
    state["layers"] = {i: state["layers"][i] for i in range(num_layers)}
    abstract = nnx.state(draft)
    nnx.replace_by_pure_dict(abstract, state)
    nnx.update(draft, abstract)
    return draft


def speculative_generate(
    target: Decoder | Decodable,
    draft: Decoder | Decodable,
    prompts: Sequence[Sequence[int]],
    *,
    num_draft_tokens: int = 4,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> Speculative:
    """Continue each prompt with ``target``'s distribution, ``draft`` proposing
    ``num_draft_tokens`` tokens per target call. Greedy output equals
    ``generate(target, ...)``; sampled output is distributed as the target's.

    See the module docstring for the acceptance rule.
    Each target call yields between 1 and ``num_draft_tokens + 1`` tokens;
    ``tokens_per_call`` of the result is the speed-up a free draft would give.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import generate
    >>> draft = layer_skip_draft(model, 1)
    >>> out = speculative_generate(model, draft, [[1, 2, 3]], num_draft_tokens=2,
    ...                            max_new_tokens=5)
    >>> out.tokens == generate(model, [[1, 2, 3]], max_new_tokens=5)   # greedy: the target's
    True
    >>> 1.0 <= out.tokens_per_call <= 3.0
    True

    References: Leviathan et al. 2023, Fast Inference from Transformers via Speculative Decoding,
    arXiv:2211.17192; Chen et al. 2023, Accelerating Large Language Model Decoding with Speculative
    Sampling, arXiv:2302.01318.
    """
    target, draft = Decodable.of(target), Decodable.of(draft)
    config = target.config
    check_same_vocabulary(draft, target, ("draft", "target"))
    if num_draft_tokens < 1:
        raise InputError(
            f"num_draft_tokens must be >= 1, got {num_draft_tokens}", where="num_draft_tokens"
        )
    check_new_tokens(max_new_tokens)
    target.check_prompts(prompts)
    draft.check_prompts(prompts)
    if len(prompts) > 1:  # rows accept different numbers of proposals
        target.check_no_gaps("speculative decoding of a batch")
        draft.check_no_gaps("speculative decoding of a batch")
    eos, pad = special_tokens(config, eos_token_ids, pad_token_id)
    g = num_draft_tokens
    slots = max_new_tokens + g + 1 if len(prompts) == 1 else (g + 1) * (max_new_tokens + 1)
    logits, target_cache = prefill_prompts(target, prompts, pad, slots)
    _, draft_cache = prefill_prompts(draft, prompts, pad, slots)
    tokens, calls, accepted = speculative_loop(
        target.forward, target.params, draft.forward, draft.params, logits, target_cache,
        draft_cache, jax.random.key(seed), jnp.asarray(eos or (-1,), jnp.int32), jnp.int32(pad),
        num_draft_tokens=g, max_new_tokens=max_new_tokens, sampling=sampling,
    )  # fmt: skip
    rows = [strip_after_eos(row, eos) for row in np.asarray(tokens)]
    return Speculative(rows, int(calls), int(accepted))
