"""A Flax NNX decoder covering HF's Llama, Mistral and Qwen2 families.

Shapes use these letters: B batch, T new tokens, S cache slots, E embed
(hidden size), H query heads, K key/value heads, D head dim, F MLP hidden,
V vocabulary, L layers.

Every block is pre-norm:

    h = x + Attention(RMSNorm(x))          # RoPE on q and k, GQA, causal mask
    y = h + W_down(silu(W_gate RMSNorm(h)) * W_up RMSNorm(h))

or, on the layers ``config.is_moe_layer`` picks (Mixtral: all of them),
``y = h + SparseMoE(RMSNorm(h))`` (:mod:`jaxcombine.moe`), whose router
losses and statistics come back in ``DecoderOutput.moe_aux``.

and logits = RMSNorm(y_L) @ W_vocab (the embedding matrix when tied).
Parameters carry logical axis names (``vocab``, ``embed``, ``heads``,
``kv_heads``, ``head_dim``, ``mlp``) in their ``out_sharding`` metadata; a job
maps them to mesh axes with :func:`jaxcombine.sharding.shard_model`.

The KV cache is an explicit pytree (:class:`KVCache`) passed in and returned,
so a decode loop is a pure function of ``(params, cache)``. Left-padded
batches are supported: padding slots never become valid keys, and each row's
RoPE positions count only its real tokens (as HF ``generate`` does).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.errors import InputError
from jaxcombine.models._config import DecoderConfig
from jaxcombine.models._layers import Dense, Embedding, RMSNorm, activation, dropout
from jaxcombine.models._rope import apply_rope, inverse_frequencies
from jaxcombine.moe.layer import MoEAux, SparseMoE


class KVCache(NamedTuple):
    """Keys and values of every layer for the tokens decoded so far.

    Rows are aligned: slot ``next_index`` is written next in every row, and a
    left-padded prompt leaves its padding slots invalid in ``key_valid``.
    Made by :func:`init_cache`:

    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> cache = init_cache(config, batch=3, max_length=5)
    >>> cache.keys[1].shape, cache.key_valid.shape, cache.next_position.tolist()
    ((3, 1, 5, 4), (3, 5), [0, 0, 0])

    References: cached keys and values for incremental decoding: Shazeer 2019, Fast Transformer
    Decoding: One Write-Head is All You Need, arXiv:1911.02150; K key/value heads (GQA): Ainslie et
    al. 2023, arXiv:2305.13245.
    """

    keys: tuple[jax.Array, ...]  # L x [B, K, S, D]
    values: tuple[jax.Array, ...]  # L x [B, K, S, D]
    key_valid: jax.Array  # [B, S] bool
    next_index: jax.Array  # [] int32: the slot the next token goes to
    next_position: jax.Array  # [B] int32: the RoPE position of the next token

    @property
    def max_length(self) -> int:
        return self.key_valid.shape[1]


def init_cache(config: DecoderConfig, batch: int, max_length: int, dtype=jnp.float32) -> KVCache:
    """An empty cache with ``max_length`` slots per row.

    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    >>> cache = init_cache(config, batch=2, max_length=8)
    >>> len(cache.keys), cache.keys[0].shape, cache.max_length, int(cache.next_index)
    (2, (2, 2, 8, 4), 8, 0)

    Decoding appends to it: ``out = model(prompt, cache=cache)`` then
    ``model(next_token, cache=out.cache)`` (``jaxcombine.decoding.generate``).

    References: cached keys and values for incremental decoding: Shazeer 2019, Fast Transformer
    Decoding: One Write-Head is All You Need, arXiv:1911.02150; K key/value heads (GQA): Ainslie et
    al. 2023, arXiv:2305.13245.
    """
    shape = (batch, config.num_kv_heads, max_length, config.head_dim)  # the attention dots' layout
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        key_valid=jnp.zeros((batch, max_length), bool),
        next_index=jnp.zeros((), jnp.int32),
        next_position=jnp.zeros((batch,), jnp.int32),
    )


class DecoderOutput(NamedTuple):
    """What :class:`Decoder` returns (example there).

    >>> DecoderOutput._fields
    ('logits', 'hidden', 'cache', 'moe_aux')
    """

    logits: jax.Array  # [B, T, V]
    hidden: jax.Array  # [B, T, E], after the final norm
    cache: KVCache | None
    moe_aux: MoEAux | None = None  # per MoE layer, stacked on a leading axis


class Attention(nnx.Module):
    """Grouped-query attention with RoPE (Ainslie et al. 2023, arXiv:2305.13245)."""

    def __init__(self, config: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        E, H, K, D = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = Dense(
            (E, H, D), ("embed", "heads", "head_dim"), config.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.k_proj = Dense(
            (E, K, D), ("embed", "kv_heads", "head_dim"), config.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.v_proj = Dense(
            (E, K, D), ("embed", "kv_heads", "head_dim"), config.qkv_bias, dtype=dtype, rngs=rngs
        )
        self.o_proj = Dense(
            (H, D, E),
            ("heads", "head_dim", "embed"),
            config.o_bias,
            dtype=dtype,
            rngs=rngs,
            in_dims=2,
        )
        self.inv_freq = tuple(inverse_frequencies(config.rope, D).tolist())  # static

    def __call__(self, x, positions, mask, cache_kv, start):
        """x [B, T, E], positions [B, T], mask [B, T, S]; returns (y [B, T, E], (k, v))."""
        inv_freq = jnp.asarray(self.inv_freq, jnp.float32)
        q = apply_rope(self.q_proj(x), positions, inv_freq)  # [B, T, H, D]
        k = apply_rope(self.k_proj(x), positions, inv_freq).transpose(0, 2, 1, 3)  # [B, K, T, D]
        v = self.v_proj(x).transpose(0, 2, 1, 3)  # [B, K, T, D]
        if cache_kv is not None:
            k = jax.lax.dynamic_update_slice(
                cache_kv[0], k.astype(cache_kv[0].dtype), (0, 0, start, 0)
            )  # [B, K, S, D]
            v = jax.lax.dynamic_update_slice(
                cache_kv[1], v.astype(cache_kv[1].dtype), (0, 0, start, 0)
            )
        out = grouped_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask)  # [B, T, H, D]
        return self.o_proj(out), (k, v)


def grouped_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(D), masked) v with K key/value heads shared by groups of
    H / K query heads (GQA); q [B, T, H, D], k and v [B, K, S, D], mask [B, T, S]
    -> [B, T, H, D]. Scores and softmax in float32. Keys are kept head-major
    ([B, K, S, D]) so the cache is already in the dots' layout: stored
    [B, S, K, D], XLA:CPU transposed every layer's cache on every decode step.
    A query with no allowed key (left padding) attends uniformly, as
    ``jax.nn.dot_product_attention`` does."""
    B, T, H, D = q.shape
    K = k.shape[1]
    grouped = q.reshape(B, T, K, H // K, D)
    scores = jnp.einsum("btkgd,bksd->bkgts", grouped, k, preferred_element_type=jnp.float32)
    scores = scores * (D**-0.5)
    scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(B, T, H, D)


class MLP(nnx.Module):
    """SwiGLU feed-forward (Shazeer 2020, arXiv:2002.05202): down(act(gate x) * up x)."""

    def __init__(self, config: DecoderConfig, *, dtype, rngs: nnx.Rngs):
        E, F = config.hidden_size, config.intermediate_size
        self.hidden_act = config.hidden_act  # a name, so equal configs give equal graphdefs
        self.gate_proj = Dense((E, F), ("embed", "mlp"), config.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Dense((E, F), ("embed", "mlp"), config.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Dense((F, E), ("mlp", "embed"), config.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation(self.hidden_act)
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Attention then a feed-forward: the dense ``mlp`` or, on MoE layers, ``moe``."""

    def __init__(self, config: DecoderConfig, *, moe: bool = False, dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs
        )
        self.self_attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, dtype=dtype, rngs=rngs
        )
        self.mlp = None if moe else MLP(config, dtype=dtype, rngs=rngs)
        self.moe = SparseMoE(config.moe, dtype=dtype, rngs=rngs) if moe else None

    def __call__(
        self, x, positions, mask, cache_kv, start, dropout, token_mask=None, deterministic=True,
        moe_mesh=None,
    ):  # fmt: skip
        """Returns (y, (k, v), the MoE layer's aux or None); ``token_mask`` [B, T]
        keeps padding out of the MoE routing; ``moe_mesh`` runs the MoE layer
        expert-parallel on that mesh (:func:`~jaxcombine.moe.expert_parallel`)."""
        attn, kv = self.self_attn(self.input_layernorm(x), positions, mask, cache_kv, start)
        x = x + dropout(attn)
        h = self.post_attention_layernorm(x)
        if self.moe is None:
            ffn, aux = self.mlp(h), None
        elif moe_mesh is not None:
            from jaxcombine.moe.parallel import expert_parallel

            ffn, aux = expert_parallel(self.moe, h, moe_mesh, deterministic=deterministic)
        else:
            ffn, aux = self.moe(h, mask=token_mask, deterministic=deterministic)
        return x + dropout(ffn), kv, aux


class Decoder(nnx.Module):
    """The decoder-only language model (Llama: Touvron et al. 2023, arXiv:2302.13971;
    Mistral: arXiv:2310.06825; Qwen2: arXiv:2407.10671).

    With tied embeddings, logits = RMSNorm(h_L) @ E^T:

    >>> import numpy as np
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> graphdef, state = nnx.split(model)             # jit pure functions of the state
    >>> out = jax.jit(lambda state, tokens: nnx.merge(graphdef, state)(tokens))(
    ...     state, jnp.array([[1, 2, 3]]))
    >>> out.logits.shape, out.hidden.shape             # [B, T, V], [B, T, E]
    ((1, 3, 16), (1, 3, 8))
    >>> embedding = np.asarray(model.embed_tokens.embedding[...])
    >>> np.allclose(out.logits, out.hidden @ embedding.T, atol=1e-6)
    True
    """

    def __init__(self, config: DecoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        E, V = config.hidden_size, config.vocab_size
        self.embed_tokens = Embedding(V, E, dtype=dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                DecoderLayer(config, moe=config.is_moe_layer(i), dtype=dtype, rngs=rngs)
                for i in range(config.num_layers)
            ]
        )
        self.norm = RMSNorm(E, config.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Dense((E, V), ("embed", "vocab"), False, dtype=dtype, rngs=rngs)
        )

    def __call__(
        self,
        tokens: jax.Array,
        *,
        token_mask: jax.Array | None = None,
        cache: KVCache | None = None,
        dropout_key: jax.Array | None = None,
        last_only: bool = False,
        deterministic: bool = True,
        moe_mesh=None,
    ) -> DecoderOutput:
        """Run ``tokens`` [B, T] through the model.

        Args:
          tokens: token ids [B, T].
          token_mask: [B, T], True for real tokens, False for (left) padding.
          cache: if given, the tokens are appended at ``cache.next_index`` and
            attend to everything cached; the updated cache is returned.
          dropout_key: a PRNG key turns on residual dropout at
            ``config.dropout_rate`` (MC dropout); without it the model is
            deterministic.
          last_only: return logits and hidden states of the last position
            only ([B, 1, ...]), as a decoder's prefill needs.
          deterministic: False turns on MoE router jitter (training).
          moe_mesh: a mesh with ``data`` and ``expert`` axes: MoE layers run
            expert-parallel on it (experts sharded over ``expert``, routing
            groups over both; GShard's layout, the same numbers as unsharded).
            Not with ``token_mask`` (training on packed rows has no padding).
        """
        config = self.config
        B, T = tokens.shape
        if moe_mesh is not None and token_mask is not None:
            raise InputError(
                "expert-parallel MoE layers do not take a token mask",
                where="Decoder(moe_mesh=..., token_mask=...)",
                fix="train on packed rows without padding, or run without moe_mesh",
            )
        if token_mask is None:
            token_mask = jnp.ones((B, T), bool)
        token_mask = token_mask.astype(bool)
        offsets = jnp.maximum(jnp.cumsum(token_mask, axis=1, dtype=jnp.int32) - 1, 0)  # [B, T]
        if cache is None:
            start = jnp.zeros((), jnp.int32)
            positions = offsets
            key_valid = token_mask  # [B, S=T]
        else:
            start = cache.next_index
            positions = cache.next_position[:, None] + offsets
            key_valid = jax.lax.dynamic_update_slice(cache.key_valid, token_mask, (0, start))
        query_slot = start + jnp.arange(T)  # [T]
        key_slot = jnp.arange(key_valid.shape[1])  # [S]
        causal = key_slot[None, :] <= query_slot[:, None]  # [T, S]
        masks = {}

        def mask_for(window):
            if window not in masks:
                allowed = causal
                if window is not None:
                    allowed = allowed & (key_slot[None, :] > query_slot[:, None] - window)
                masks[window] = key_valid[:, None, :] & allowed[None]  # [B, T, S]
            return masks[window]

        dropout = _dropout_fn(config.dropout_rate, dropout_key, 2 * config.num_layers)
        x = self.embed_tokens(tokens)  # [B, T, E]
        new_keys, new_values, moe_aux = [], [], []
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.keys[i], cache.values[i])
            x, (k, v), aux = layer(
                x, positions, mask_for(config.window_of_layer(i)), cache_kv, start, dropout,
                token_mask, deterministic, moe_mesh,
            )  # fmt: skip
            new_keys.append(k)
            new_values.append(v)
            if aux is not None:
                moe_aux.append(aux)
        hidden = self.norm(x[:, -1:] if last_only else x)
        if self.lm_head is None:
            logits = jnp.einsum("bte,ve->btv", hidden, self.embed_tokens.embedding[...])
        else:
            logits = self.lm_head(hidden)
        new_cache = None
        if cache is not None:
            new_cache = KVCache(
                keys=tuple(new_keys),
                values=tuple(new_values),
                key_valid=key_valid,
                next_index=start + T,
                next_position=cache.next_position + token_mask.sum(axis=1, dtype=jnp.int32),
            )
        stacked_aux = jax.tree.map(lambda *a: jnp.stack(a), *moe_aux) if moe_aux else None
        return DecoderOutput(logits=logits, hidden=hidden, cache=new_cache, moe_aux=stacked_aux)


def _dropout_fn(rate: float, key: jax.Array | None, count: int):
    """A function applying inverted dropout with a fresh key per call, or the identity."""
    if key is None or rate == 0.0:
        return lambda x: x
    keys = iter(jax.random.split(key, count))
    return lambda x: dropout(x, rate, next(keys))
