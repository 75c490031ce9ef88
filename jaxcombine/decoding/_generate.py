"""Jitted autoregressive decoding: a prefill, then one ``lax.while_loop`` of steps.

The loop is written against a *forward function* ``forward(params, tokens,
mask, cache) -> (logits [B, T, V], cache)``, so one model, a stack of
vmapped members or any combination of models decode through the same code.
:class:`DecoderForward` is the forward of one NNX decoder; it is split once
(``nnx.split``) and only its graph definition is static under ``jax.jit``.

Prompts of different lengths are left-padded to a length bucket (a power of
two, at least 16), so new prompt lengths reuse compiled code.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.decoding._sampling import Sampling, sample_tokens
from jaxcombine.errors import InputError
from jaxcombine.models import Decoder, init_cache


@dataclasses.dataclass(frozen=True)
class DecoderForward:
    """``forward(params, tokens, mask, cache, last_only)`` of one split :class:`Decoder`."""

    graphdef: Any

    def outputs(self, params, tokens, mask, cache, last_only=False, dropout_key=None):
        """The decoder's full :class:`~jaxcombine.models.DecoderOutput` (logits,
        final hidden states, cache); ``dropout_key`` turns on MC dropout."""
        return nnx.merge(self.graphdef, params)(
            tokens, token_mask=mask, cache=cache, last_only=last_only, dropout_key=dropout_key
        )

    def __call__(self, params, tokens, mask, cache, last_only=False):
        out = self.outputs(params, tokens, mask, cache, last_only)
        return out.logits, out.cache

    @staticmethod
    def take_rows(cache, rows):
        """The cache of batch rows ``rows`` [B'] (beam search reorders beams with it)."""
        return take_cache_rows(cache, rows)


def take_cache_rows(cache, rows):
    """Rows ``rows`` of a :class:`~jaxcombine.models.KVCache` (``next_index`` is shared)."""
    return cache._replace(
        keys=tuple(k[rows] for k in cache.keys),
        values=tuple(v[rows] for v in cache.values),
        key_valid=cache.key_valid[rows],
        next_position=cache.next_position[rows],
    )


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """Prompts as left-padded ``tokens`` [B, length] int32 and ``mask`` [B, length] bool."""
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = True
    return tokens, mask


GREEDY = Sampling()


class _LoopState(NamedTuple):
    step: jax.Array  # [] int32: tokens generated so far
    tokens: jax.Array  # [B, N] int32 generated tokens, pad after a row finishes
    last: jax.Array  # [B] int32 most recent token
    done: jax.Array  # [B] bool
    cache: Any
    key: jax.Array


@partial(jax.jit, static_argnames=("forward",))
def prefill(forward, params, tokens, mask, cache):
    """Run the prompt through ``forward``; logits of the last position [B, V] and the cache."""
    logits, cache = forward(params, tokens, mask, cache, last_only=True)
    return logits[:, -1], cache


@partial(jax.jit, static_argnames=("forward", "max_new_tokens", "sampling"))
def decode_loop(
    forward,
    params,
    first_logits,
    cache,
    key,
    eos_ids,
    pad_id,
    *,
    max_new_tokens: int,
    sampling: Sampling,
):
    """Generate up to ``max_new_tokens`` tokens [B, N] after a prefill.

    A row stops after it emits a token in ``eos_ids`` (later slots hold
    ``pad_id``); the loop stops when every row has stopped.
    """
    batch = first_logits.shape[0]

    def emit(state: _LoopState, logits) -> _LoopState:
        key, sub = jax.random.split(state.key)
        token = sample_tokens(logits, sub, sampling)  # [B]
        token = jnp.where(state.done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
        done = state.done | jnp.isin(token, eos_ids)
        return _LoopState(state.step + 1, tokens, token, done, state.cache, key)

    def cond(state: _LoopState):
        return (state.step < max_new_tokens) & ~jnp.all(state.done)

    def body(state: _LoopState):
        logits, cache = forward(
            params, state.last[:, None], jnp.ones((batch, 1), bool), state.cache
        )
        return emit(state._replace(cache=cache), logits[:, -1])

    start = _LoopState(
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
        last=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        cache=cache,
        key=key,
    )
    final = jax.lax.while_loop(cond, body, emit(start, first_logits))
    return final.tokens


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int) -> None:
    """Non-empty prompts of in-vocabulary ids that fit the context (an :class:`InputError`)."""
    if not prompts:
        raise InputError("no prompts given", where="prompts", fix="pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise InputError(
                "prompt is empty",
                where=f"prompt {i}",
                fix="give at least one token (a BOS token is enough)",
            )
        if len(prompt) > context:
            raise InputError(
                f"prompt has {len(prompt)} tokens, more than the model's context of {context}",
                where=f"prompt {i}",
                fix="shorten the prompt",
            )
        bad = [t for t in prompt if not 0 <= int(t) < vocab_size]
        if bad:
            raise InputError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})",
                where=f"prompt {i}",
                fix="check the tokenizer matches the model",
            )


def strip_after_eos(row: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS."""
    out = []
    for token in row:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (EOS included, prompt excluded).

    Greedy by default, as ``transformers`` ``generate(do_sample=False)``.

    Example::

        model = jaxcombine.hf.load_model("tiny-llama")
        generate(model, [[1, 15, 27], [1, 9]], max_new_tokens=8)
    """
    graphdef, params = nnx.split(model)
    dtype = model.embed_tokens.embedding.get_value().dtype
    return generate_with(
        DecoderForward(graphdef), params, model.config, prompts,
        make_cache=lambda batch, length: init_cache(model.config, batch, length, dtype),
        max_new_tokens=max_new_tokens, sampling=sampling, eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id, seed=seed,
    )  # fmt: skip


def generate_with(
    forward,
    params,
    config,
    prompts: Sequence[Sequence[int]],
    *,
    make_cache,
    max_new_tokens: int,
    sampling: Sampling,
    eos_token_ids: Sequence[int] | None,
    pad_token_id: int | None,
    seed: int,
) -> list[list[int]]:
    """:func:`generate` for any ``forward`` (one model, stacked members, ...):
    ``config`` gives the vocabulary, context and special tokens,
    ``make_cache(batch, length)`` an empty cache for ``forward``."""
    validate_prompts(prompts, config.vocab_size, config.max_position_embeddings)
    if max_new_tokens < 1:
        raise InputError(
            f"max_new_tokens must be >= 1, got {max_new_tokens}", where="max_new_tokens"
        )
    eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    pad = (
        pad_token_id
        if pad_token_id is not None
        else (config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else 0))
    )
    length = bucket_length(max(len(p) for p in prompts))
    tokens, mask = left_pad(prompts, length, pad)
    cache = make_cache(len(prompts), length + max_new_tokens)
    logits, cache = prefill(forward, params, jnp.asarray(tokens), jnp.asarray(mask), cache)
    out = decode_loop(
        forward,
        params,
        logits,
        cache,
        jax.random.key(seed),
        jnp.asarray(eos or (-1,), jnp.int32),
        jnp.int32(pad),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
    )
    return [strip_after_eos(row, eos) for row in np.asarray(out)]
