"""What the decoding functions need of "a model": one decoder, stacked members,
any combination of models.

A :class:`Decodable` bundles a static *forward* with its parameters, the
config that gives vocabulary, context and special tokens, and the cache dtype.
The forward is hashable (a static ``jax.jit`` argument) and implements

    forward(params, tokens [B, T], mask [B, T], cache, last_only=False)
        -> (logits [B, T, V], cache)
    forward.init_cache(params, config, batch, length, dtype) -> an empty cache
    forward.take_rows(cache, rows [B'])   -> the cache of those batch rows
    forward.pad_slots(cache, extra)       -> the cache with ``extra`` empty slots
    forward.keep_slots(cache, keep [B, T]) -> the cache without the rejected
                                            tail of its last T slots

(:class:`~jaxcombine.decoding.DecoderForward` for one decoder,
:class:`~jaxcombine.ensemble.StackedForward` for stacked members). Prefix
reuse, speculative decoding and cascades are written against this protocol,
so each works for a single model and for an ensemble alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.errors import ConfigError, InputError
from jaxcombine.models import Decoder, DecoderConfig, init_cache


@dataclasses.dataclass(frozen=True)
class DecoderForward:
    """``forward(params, tokens, mask, cache, last_only)`` of one split :class:`Decoder`.

    ``nnx.merge(graphdef, params)(tokens, token_mask=mask, cache=cache)``:
    a pure function of the parameters, hashable (a static ``jax.jit``
    argument), so the decoder is split once and only arrays cross ``jit``.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> graphdef, params = nnx.split(model)
    >>> forward = DecoderForward(graphdef)
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    >>> logits, cache = forward(params, tokens, tokens > 0, None)
    >>> logits.shape, bool(jnp.allclose(logits, model(tokens).logits))
    ((1, 8, 16), True)
    """

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
    def init_cache(params, config, batch, length, dtype):
        """An empty cache of ``batch`` rows and ``length`` slots."""
        del params
        return init_cache(config, batch, length, dtype)

    @staticmethod
    def take_rows(cache, rows):
        """The cache of batch rows ``rows`` [B'] (beam search reorders beams with it)."""
        return take_cache_rows(cache, rows)

    @staticmethod
    def pad_slots(cache, extra: int):
        """The cache with ``extra`` empty slots appended to every row."""
        return pad_cache_slots(cache, extra)

    @staticmethod
    def keep_slots(cache, keep):
        """Undo the rejected tail of the last write (speculative decoding)."""
        return keep_cache_slots(cache, keep)


def take_cache_rows(cache, rows):
    """Rows ``rows`` of a :class:`~jaxcombine.models.KVCache` (``next_index`` is shared).

    >>> import jax.numpy as jnp
    >>> from jaxcombine.models import DecoderConfig, init_cache
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> cache = init_cache(config, batch=2, max_length=4)._replace(next_position=jnp.array([3, 5]))
    >>> take_cache_rows(cache, jnp.array([1, 1, 0])).next_position.tolist()
    [5, 5, 3]
    """
    return cache._replace(
        keys=tuple(k[rows] for k in cache.keys),
        values=tuple(v[rows] for v in cache.values),
        key_valid=cache.key_valid[rows],
        next_position=cache.next_position[rows],
    )


def pad_cache_slots(cache, extra: int):
    """A :class:`~jaxcombine.models.KVCache` with ``extra`` invalid slots appended.

    >>> import jax.numpy as jnp
    >>> from jaxcombine.models import DecoderConfig, init_cache
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> cache = pad_cache_slots(init_cache(config, batch=2, max_length=4), 3)
    >>> cache.keys[0].shape, cache.key_valid.shape          # keys [B, K, S, D]
    ((2, 1, 7, 4), (2, 7))
    """

    def pad(x, axis):
        return jnp.pad(x, [(0, extra) if a == axis else (0, 0) for a in range(x.ndim)])

    return cache._replace(
        keys=tuple(pad(k, 2) for k in cache.keys),  # [B, K, S, D]
        values=tuple(pad(v, 2) for v in cache.values),
        key_valid=pad(cache.key_valid, 1),
    )


def keep_cache_slots(cache, keep):
    """Keep, per row, a prefix of the last ``T`` slots written; ``keep`` [B, T] bool
    is True on that prefix (at least the first slot). The rest become invalid
    keys, each row's next RoPE position counts only kept tokens, and the next
    write starts after the longest kept prefix (slots past it are free).

    >>> import jax.numpy as jnp
    >>> from jaxcombine.models import DecoderConfig, init_cache
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> cache = init_cache(config, batch=2, max_length=5)._replace(   # 3 tokens just written
    ...     key_valid=jnp.array([[1, 1, 1, 0, 0]] * 2, bool),
    ...     next_index=jnp.int32(3), next_position=jnp.array([3, 3]))
    >>> kept = keep_cache_slots(cache, jnp.array([[True, False, False], [True, True, False]]))
    >>> kept.key_valid.astype(int).tolist(), kept.next_position.tolist(), int(kept.next_index)
    ([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]], [1, 2], 2)
    """
    T = keep.shape[1]
    start = cache.next_index - T
    written = jax.lax.dynamic_slice_in_dim(cache.key_valid, start, T, axis=1)
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache.key_valid, written & keep, start, axis=1)
    kept = jnp.sum(keep, axis=1, dtype=jnp.int32)
    return cache._replace(
        key_valid=key_valid,
        next_position=cache.next_position - (T - kept),
        next_index=start + jnp.max(kept),
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Decodable:
    """A forward, its parameters, its config and its cache dtype.

    What the decoding functions take as "a model": :meth:`of` wraps a
    :class:`Decoder`; :func:`jaxcombine.ensemble.stacked` and
    :func:`jaxcombine.ensemble.ensemble` build one for several models.

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> d = Decodable.of(model)
    >>> type(d.forward).__name__, Decodable.of(d) is d
    ('DecoderForward', True)
    >>> d.init_cache(batch=2, length=8).key_valid.shape
    (2, 8)
    """

    forward: Any
    params: Any
    config: DecoderConfig
    dtype: Any = jnp.float32

    @classmethod
    def of(cls, model: Decoder | Decodable) -> Decodable:
        """``model`` itself if already decodable, else the split decoder."""
        if isinstance(model, Decodable):
            return model
        graphdef, params = nnx.split(model)
        dtype = model.embed_tokens.embedding.get_value().dtype
        return cls(DecoderForward(graphdef), params, model.config, dtype)

    def init_cache(self, batch: int, length: int):
        return self.forward.init_cache(self.params, self.config, batch, length, self.dtype)

    def check_prompts(self, prompts) -> None:
        """Clear errors for prompts this model cannot read: empty, longer than the
        context, ids outside the vocabulary, or (ensembles with mapped
        vocabularies) ids some member does not have."""
        from jaxcombine.decoding._prefill import validate_prompts

        validate_prompts(prompts, self.config.vocab_size, self.config.max_position_embeddings)
        for i, prompt in enumerate(prompts):
            self.check_readable(prompt, where=f"prompt {i}")

    def has_sliding_window(self) -> bool:
        """Whether any member has a sliding-window attention layer."""
        configs = [self.config] + [g.config for g in getattr(self.forward, "groups", ())]
        return any(c.window_of_layer(i) is not None for c in configs for i in range(c.num_layers))

    def check_no_gaps(self, what: str) -> None:
        """A :class:`ConfigError` if a member has sliding-window layers: windows are
        counted in cache slots, and ``what`` leaves invalid slots between real
        tokens, which would shift the window."""
        if self.has_sliding_window():
            raise ConfigError(
                f"{what} leaves gaps in the cache, which sliding-window attention "
                "would count as tokens",
                where="sliding_window",
                fix="run one prompt at a time (batch 1), or prompts of one length",
            )

    def check_readable(self, tokens, where: str) -> None:
        """An :class:`InputError` for ids some member of a vocabulary-mapped
        ensemble does not have (``forward.unreadable_tokens``)."""
        unreadable = getattr(self.forward, "unreadable_tokens", None)
        bad = [] if unreadable is None else unreadable(self.params, tokens)
        if bad:
            raise InputError(
                f"token ids {bad[:5]} are not in every member's vocabulary",
                where=where,
                fix="use tokens the members share (see jaxcombine.ensemble.ensemble)",
            )

    def fingerprint(self) -> str:
        """A short hash of the forward's settings, the config and every parameter's
        shape and sum: what a prefix state is checked against."""
        sums = _leaf_sums(self.params)
        text = json.dumps(
            {
                "forward": _describe(self.forward),
                "config": repr(self.config),
                "leaves": [
                    (jax.tree_util.keystr(path), f"{float(x):.5e}")
                    for path, x in jax.tree.leaves_with_path(sums)
                ],
                "shapes": [list(np.shape(x)) for x in jax.tree.leaves(self.params)],
            },
            sort_keys=True,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@jax.jit
def _leaf_sums(params):
    """Every leaf's sum (PRNG keys by their key data), compiled once per structure."""

    def total(x):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return jnp.sum(x, dtype=jnp.float32)

    return jax.tree.map(total, params)


def _describe(forward) -> str:
    """The forward's type and settings, graph definitions left out (the config and
    the parameters' shapes stand for them)."""
    fields = {
        f.name: repr(getattr(forward, f.name))
        for f in dataclasses.fields(forward)
        if "graphdef" not in f.name and f.name != "groups"
    }
    groups = [(repr(g.config), g.size, g.dropout) for g in getattr(forward, "groups", ())]
    return repr((type(forward).__name__, sorted(fields.items()), groups))


def check_new_tokens(max_new_tokens: int) -> None:
    """An :class:`InputError` unless at least one token is asked for."""
    if max_new_tokens < 1:
        raise InputError(
            f"max_new_tokens must be >= 1, got {max_new_tokens}", where="max_new_tokens"
        )


def check_same_vocabulary(model: Decodable, other: Decodable, names: tuple[str, str]) -> None:
    """A :class:`ConfigError` if two models that must decode the same token ids
    (draft and target, small and large) have vocabularies of different sizes."""
    if model.config.vocab_size != other.config.vocab_size:
        raise ConfigError(
            f"the {names[0]}'s vocabulary ({model.config.vocab_size} tokens) differs from "
            f"the {names[1]}'s ({other.config.vocab_size})",
            where=names[0],
            fix="use models that share one tokenizer",
        )
