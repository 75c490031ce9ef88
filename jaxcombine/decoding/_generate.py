"""Jitted autoregressive decoding: a prefill, then one ``lax.while_loop`` of steps.

The loop is written against a *forward* (:mod:`._decodable`), so one model, a
stack of vmapped members or any combination of models decode through the
same code; the decoder is split once (``nnx.split``) and only its graph
definition is static under ``jax.jit``.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.decoding._beam import beam_search, check_beams
from jaxcombine.decoding._decodable import Decodable, check_new_tokens
from jaxcombine.decoding._prefill import (
    PrefixState,
    check_prefix,
    prefill_prompts,
    start_from_prefix,
)
from jaxcombine.decoding._sampling import Sampling, sample_tokens
from jaxcombine.models import Decoder

GREEDY = Sampling()


class _LoopState(NamedTuple):
    step: jax.Array  # [] int32: tokens generated so far
    tokens: jax.Array  # [B, N] int32 generated tokens, pad after a row finishes
    last: jax.Array  # [B] int32 most recent token
    done: jax.Array  # [B] bool
    cache: Any
    key: jax.Array


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
    ``pad_id``); the loop stops when every row has stopped. Token ``t + 1``
    is ``sample_tokens(logits_t)``, ``logits_0 = first_logits`` and
    ``logits_t`` the forward of token ``t`` on the cache (one step each).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import Decodable, Sampling, left_pad, prefill
    >>> d = Decodable.of(model)
    >>> tokens, mask = left_pad([[1, 2, 3]], 16, pad_id=0)
    >>> logits, cache = prefill(d.forward, d.params, tokens, mask, d.init_cache(1, 16 + 5))
    >>> def run(eos):
    ...     return decode_loop(d.forward, d.params, logits, cache, jax.random.key(0),
    ...                        jnp.array([eos]), jnp.int32(0), max_new_tokens=5,
    ...                        sampling=Sampling())[0].tolist()
    >>> out = run(-1)                                   # -1: no EOS
    >>> eos = out[2]
    >>> k = out.index(eos)                              # its first occurrence
    >>> run(eos) == out[: k + 1] + [0] * (4 - k)        # the row stops there, pad (0) after
    True
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


def strip_after_eos(row: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """Tokens up to and including the first EOS.

    >>> strip_after_eos([5, 7, 2, 0, 0], eos_ids=[2])
    [5, 7, 2]
    >>> strip_after_eos([5, 7], eos_ids=[2])
    [5, 7]
    """
    out = []
    for token in row:
        out.append(int(token))
        if token in eos_ids:
            break
    return out


def special_tokens(config, eos_token_ids=None, pad_token_id=None) -> tuple[tuple[int, ...], int]:
    """(EOS ids, pad id): the arguments, else the config's; pad falls back to the
    first EOS, then 0."""
    eos = tuple(config.eos_token_ids if eos_token_ids is None else eos_token_ids)
    if pad_token_id is not None:
        return eos, pad_token_id
    if config.pad_token_id is not None:
        return eos, config.pad_token_id
    return eos, (eos[0] if eos else 0)


def generate(
    model: Decoder | Decodable,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
    prefix: PrefixState | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
) -> list[list[int]]:
    """Continue each prompt; returns the new tokens per prompt (EOS included, prompt excluded).

    Greedy by default, as ``transformers`` ``generate(do_sample=False)``;
    ``num_beams=K > 1`` is beam search (:func:`~jaxcombine.decoding.beam_search`),
    as ``generate(num_beams=K, do_sample=False, length_penalty=length_penalty)``.
    ``model`` is a decoder or any :class:`Decodable` (an ensemble). With
    ``prefix`` (:func:`~jaxcombine.decoding.prefill_prefix`), each prompt
    continues the prefix, whose state is reused rather than recomputed; a
    prompt may then be empty.

    Greedy decoding emits ``y_t = argmax_v p(v | prompt, y_<t)``, so every
    new token is the argmax of one uncached forward pass over the result:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> new = generate(model, [[1, 2, 3]], max_new_tokens=5)[0]
    >>> len(new)
    5
    >>> logits = model(jnp.array([[1, 2, 3] + new])).logits[0]    # [8, V], no cache
    >>> new == logits[2:-1].argmax(-1).tolist()
    True
    """
    check_beams(num_beams, sampling)
    model = Decodable.of(model)
    config = model.config
    if prefix is None:
        model.check_prompts(prompts)
    else:
        check_prefix(model, prefix, prompts, max_new_tokens)
    check_new_tokens(max_new_tokens)
    eos, pad = special_tokens(config, eos_token_ids, pad_token_id)
    if prefix is None:
        logits, cache = prefill_prompts(model, prompts, pad, max_new_tokens)
    else:
        logits, cache = start_from_prefix(model, prefix, prompts, pad, max_new_tokens)
    eos_ids = jnp.asarray(eos or (-1,), jnp.int32)
    if num_beams > 1:
        out = beam_search(
            model.forward, model.params, logits, cache, eos_ids, jnp.int32(pad),
            num_beams=num_beams, max_new_tokens=max_new_tokens,
            length_penalty=float(length_penalty),
        )  # fmt: skip
    else:
        out = decode_loop(
            model.forward,
            model.params,
            logits,
            cache,
            jax.random.key(seed),
            eos_ids,
            jnp.int32(pad),
            max_new_tokens=max_new_tokens,
            sampling=sampling,
        )
    return [strip_after_eos(row, eos) for row in np.asarray(out)]
