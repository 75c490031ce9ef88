"""The prefill: prompts left-padded to a length bucket and run through the model
in one call, and prefix-state reuse on top of it.

Prompts of different lengths are left-padded to a length bucket (a power of
two, at least 16), so new prompt lengths reuse compiled code.

Prefix-state reuse. A system prompt or a block of few-shot examples is the same at the start of
many requests. :func:`prefill_prefix` runs it through the model (every member
of an ensemble) once and keeps the KV cache of exactly its tokens plus the
next-token logits after it, a :class:`PrefixState`. A request then starts from
the state: the cache is copied to every row of the batch, grown by empty slots,
and only the continuations are prefilled (left-padded, so padding slots sit
between the prefix and each continuation; they are never valid keys and RoPE
positions count real tokens only, so the attention sees exactly the tokens of
``prefix + continuation``). Greedy outputs equal prefilling ``prefix +
continuation`` from scratch; logits agree to float rounding (the matmuls
are split differently).

A state can be saved to a directory (Orbax; written under a temporary name
and renamed when complete) and loaded later against the same model, which is
checked by a fingerprint of the config and the parameters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.decoding._decodable import Decodable
from jaxcombine.errors import InputError

_FORMAT = "jaxcombine.prefix_state/1"


def bucket_length(n: int, minimum: int = 16) -> int:
    """The smallest power of two >= max(n, minimum).

    >>> bucket_length(3), bucket_length(16), bucket_length(17)
    (16, 16, 32)
    """
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    """Prompts as left-padded ``tokens`` [B, length] int32 and ``mask`` [B, length] bool.

    >>> tokens, mask = left_pad([[5, 6, 7], [8]], 4, pad_id=0)
    >>> tokens.tolist(), mask.astype(int).tolist()
    ([[0, 5, 6, 7], [0, 0, 0, 8]], [[0, 1, 1, 1], [0, 0, 0, 1]])
    """
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, length - len(prompt) :] = prompt
            mask[row, length - len(prompt) :] = True
    return tokens, mask


@partial(jax.jit, static_argnames=("forward",))
def prefill(forward, params, tokens, mask, cache):
    """Run the prompt through ``forward``; logits of the last position [B, V] and the cache.

    ``tokens`` and ``mask`` [B, T] as :func:`left_pad` makes them; the cache
    (``forward.init_cache``) must have at least T free slots.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import Decodable
    >>> d = Decodable.of(model)
    >>> ids = [1, 2, 3, 4, 5, 6, 7, 8]
    >>> tokens, mask = left_pad([ids], 16, pad_id=0)
    >>> last, cache = prefill(d.forward, d.params, tokens, mask, d.init_cache(1, 16 + 5))
    >>> ref = model(jnp.array([ids])).logits[:, -1]        # no padding, no cache
    >>> bool(jnp.allclose(last, ref, atol=1e-5)), int(cache.next_index)
    (True, 16)
    """
    logits, cache = forward(params, tokens, mask, cache, last_only=True)
    return logits[:, -1], cache


def validate_prompts(prompts: Sequence[Sequence[int]], vocab_size: int, context: int) -> None:
    """Non-empty prompts of in-vocabulary ids that fit the context (an :class:`InputError`).

    >>> validate_prompts([[1, 2], [3]], vocab_size=16, context=8)   # silent: fine
    >>> validate_prompts([[1, 2], [3, 17]], vocab_size=16, context=8)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: prompt 1: token ids [17] are outside the vocabulary [0, 16)
      How to fix: check the tokenizer matches the model
    """
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


def prefill_prompts(model: Decodable, prompts, pad_id: int, slots: int):
    """Last-position logits [B, V] and cache (``slots`` free slots per row) of the
    prompts, left-padded to their length bucket."""
    length = bucket_length(max(len(p) for p in prompts))
    tokens, mask = left_pad(prompts, length, pad_id)
    cache = model.init_cache(len(prompts), length + slots)
    return prefill(model.forward, model.params, jnp.asarray(tokens), jnp.asarray(mask), cache)


@dataclasses.dataclass(frozen=True, eq=False)
class PrefixState:
    """The model's state after ``tokens``: a one-row cache of ``len(tokens)`` slots
    and the next-token logits [1, V]; ``fingerprint`` names the model that made it.

    Made by :func:`prefill_prefix` (or :func:`load_prefix`), used by
    ``generate(..., prefix=state)``; see :func:`start_from_prefix`.

    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> state = prefill_prefix(Decoder(config, rngs=nnx.Rngs(0)), [1, 2, 3])
    >>> state.tokens, int(state.cache.next_index), state.logits.shape, len(state.fingerprint)
    ((1, 2, 3), 3, (1, 16), 16)
    """

    tokens: tuple[int, ...]
    cache: Any
    logits: jax.Array
    fingerprint: str


def prefill_prefix(model, tokens: Sequence[int]) -> PrefixState:
    """Run ``tokens`` through ``model`` (a :class:`~jaxcombine.models.Decoder` or a
    :class:`Decodable`, e.g. an ensemble) once; the state later requests start from.

    Requests then continue the prefix without recomputing it: greedy output
    equals decoding ``prefix + prompt`` from scratch (module docstring).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import generate
    >>> system = prefill_prefix(model, [1, 2, 3])       # once
    >>> system.logits.shape, system.cache.key_valid.shape
    ((1, 16), (1, 3))
    >>> reused = generate(model, [[4, 5]], max_new_tokens=5, prefix=system)
    >>> reused == generate(model, [[1, 2, 3, 4, 5]], max_new_tokens=5)   # from scratch
    True
    """
    model = Decodable.of(model)
    tokens = tuple(int(t) for t in tokens)
    model.check_prompts([tokens])
    ids = jnp.asarray([tokens], jnp.int32)
    cache = model.init_cache(1, len(tokens))
    logits, cache = prefill(model.forward, model.params, ids, jnp.ones_like(ids, bool), cache)
    return PrefixState(tokens, cache, logits, model.fingerprint())


def check_prefix(model: Decodable, prefix: PrefixState, prompts, max_new_tokens: int) -> None:
    """Clear errors for a prefix state of another model or requests that do not fit."""
    if prefix.fingerprint != model.fingerprint():
        raise InputError(
            "the prefix state was made by a different model (or ensemble, or rule)",
            where="prefix",
            fix="prefill the prefix with the model you generate with",
        )
    context = model.config.max_position_embeddings
    for i, prompt in enumerate(prompts):
        total = len(prefix.tokens) + len(prompt) + max_new_tokens
        if total > context:
            raise InputError(
                f"prefix ({len(prefix.tokens)}) + prompt ({len(prompt)}) + new tokens "
                f"({max_new_tokens}) = {total} exceed the model's context of {context}",
                where=f"prompt {i}",
                fix="shorten the prompt or generate fewer tokens",
            )
        bad = [t for t in prompt if not 0 <= int(t) < model.config.vocab_size]
        if bad:
            raise InputError(
                f"token ids {bad[:5]} are outside the vocabulary",
                where=f"prompt {i}",
                fix="check the tokenizer matches the model",
            )
        model.check_readable(prompt, where=f"prompt {i}")


def start_from_prefix(model: Decodable, prefix: PrefixState, prompts, pad_id: int, slots: int):
    """First logits [B, V] and cache (``slots`` free slots per row after the
    prompts) for ``prefix + prompt`` in every row; a prompt may be empty.

    The prefix's cache is copied to every row, the prompts are left-padded
    to a bucket after it and prefilled; padding slots are never valid keys,
    so the logits are those of ``prefix + prompt``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import Decodable
    >>> d = Decodable.of(model)
    >>> state = prefill_prefix(d, [1, 2, 3])
    >>> logits, cache = start_from_prefix(d, state, [[4, 5, 6, 7, 8], []], pad_id=0, slots=4)
    >>> ref = model(jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])).logits[0, -1]   # from scratch
    >>> bool(jnp.allclose(logits[0], ref, atol=1e-5))
    True
    >>> bool(jnp.array_equal(logits[1], state.logits[0]))         # empty prompt: the prefix's
    True
    """
    batch = len(prompts)
    longest = max(len(p) for p in prompts)
    if len({len(p) for p in prompts}) > 1:  # padding between prefix and prompt
        model.check_no_gaps("a prefix state with prompts of different lengths")
    cache = model.forward.take_rows(prefix.cache, jnp.zeros((batch,), jnp.int32))
    logits = jnp.broadcast_to(prefix.logits, (batch, prefix.logits.shape[-1]))
    if longest == 0:
        return logits, model.forward.pad_slots(cache, slots)
    # Sliding windows count slots: no bucket padding between prefix and prompt.
    length = longest if model.has_sliding_window() else bucket_length(longest)
    cache = model.forward.pad_slots(cache, length + slots)
    tokens, mask = left_pad(prompts, length, pad_id)
    suffix_logits, cache = prefill(
        model.forward, model.params, jnp.asarray(tokens), jnp.asarray(mask), cache
    )
    empty = jnp.asarray([len(p) == 0 for p in prompts])[:, None]
    return jnp.where(empty, logits, suffix_logits), cache


def save_prefix(prefix: PrefixState, path) -> Path:
    """Write ``prefix`` to the directory ``path`` (Orbax, atomic); returns the path.

    The directory holds ``meta/`` (format, tokens, model fingerprint) and
    ``state/`` (cache and logits); an existing ``path`` is an error.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> state = prefill_prefix(model, [1, 2, 3])
    >>> path = save_prefix(state, pathlib.Path(tmp.name) / "system")
    >>> (path / "meta").is_dir(), (path / "state").is_dir()
    (True, True)
    >>> loaded = load_prefix(path, model)
    >>> loaded.tokens, bool(jnp.array_equal(loaded.logits, state.logits))
    ((1, 2, 3), True)
    >>> tmp.cleanup()
    """
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    if path.exists():
        raise InputError(
            "the prefix state directory already exists",
            where=str(path),
            fix="choose a new path or delete the old state",
        )
    meta = {"format": _FORMAT, "tokens": list(prefix.tokens), "fingerprint": prefix.fingerprint}
    state = {"cache": prefix.cache, "logits": prefix.logits}
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        checkpointer.save(
            path,
            ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        )
    return path


def load_prefix(path, model) -> PrefixState:
    """The prefix state saved at ``path``, checked against ``model`` (a Decoder or
    :class:`Decodable`) before its arrays are read.

    A model with other parameters (or another ensemble rule) is refused,
    by the fingerprint (:meth:`Decodable.fingerprint`):

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> import tempfile, pathlib
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = save_prefix(prefill_prefix(model, [1, 2, 3]), pathlib.Path(tmp.name) / "system")
    >>> load_prefix(path, model).tokens
    (1, 2, 3)
    >>> load_prefix(path, Decoder(config, rngs=nnx.Rngs(1)))
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: ...: the prefix state was made by a different model (or ...)
      How to fix: load it with the model that saved it, or prefill the prefix again
    >>> tmp.cleanup()
    """
    import orbax.checkpoint as ocp

    model = Decodable.of(model)
    path = Path(path).absolute()
    if not (path / "meta").is_dir() or not (path / "state").is_dir():
        raise InputError(
            "not a saved prefix state (no meta/ and state/ inside)",
            where=str(path),
            fix="pass a directory written by jaxcombine.decoding.save_prefix",
        )
    with ocp.Checkpointer(ocp.CompositeCheckpointHandler()) as checkpointer:
        meta = checkpointer.restore(path, ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        if meta.get("format") != _FORMAT:
            raise InputError(
                f"unknown prefix state format {meta.get('format')!r}",
                where=str(path),
                fix=f"save it again with this version of jaxcombine ({_FORMAT})",
            )
        if meta["fingerprint"] != model.fingerprint():
            raise InputError(
                "the prefix state was made by a different model (or ensemble, or rule)",
                where=str(path),
                fix="load it with the model that saved it, or prefill the prefix again",
            )
        tokens = tuple(meta["tokens"])
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        ids = jnp.zeros((1, len(tokens)), jnp.int32)
        logits, cache = jax.eval_shape(
            lambda: prefill(
                model.forward, model.params, ids, ids == 0, model.init_cache(1, len(tokens))
            )
        )
        abstract = {"cache": cache, "logits": logits}
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract
        )
        state = checkpointer.restore(
            path, ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        ).state
    return PrefixState(tokens, state["cache"], state["logits"], meta["fingerprint"])
