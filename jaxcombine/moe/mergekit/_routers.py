"""Router rows: the prompts tokenised as mergekit-moe does, then each layer's rows by
gate_mode (summed embeddings, the base model's hidden states, or random)."""

from __future__ import annotations

import functools
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxcombine.errors import CheckpointError, ConfigError
from jaxcombine.moe.mergekit._config import PROMPT_MODES, MoEMergeConfig

if TYPE_CHECKING:
    from jaxcombine.moe.mergekit._plan import MoEPlan

_HIDDEN_BATCH = 8  # prompts per forward pass (one compiled shape per length bucket)


def _bos_text(path: Path) -> str:
    """The BOS token's text (tokenizer_config.json, else special_tokens_map.json), or ''."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            bos = json.loads(file.read_text()).get("bos_token")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError("invalid JSON", where=str(file)) from None
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str):
            return bos
    return ""


def tokenize_prompts(tokenizer, bos: str, prompts) -> list[list[int]]:
    """mergekit-moe's tokenisation: ``bos + prompt``, no special tokens added.

    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tokenizer = Tokenizer(models.WordLevel({"<s>": 0, "def": 1, "f": 2, "?": 3}, "?"))
    >>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> _ = tokenizer.add_special_tokens(["<s>"])
    >>> tokenize_prompts(tokenizer, "<s>", ["def f", "x"])
    [[0, 1, 2], [0, 3]]
    """
    return [tokenizer.encode(bos + p, add_special_tokens=False).ids for p in prompts]


def _prompt_ids(config: MoEMergeConfig, vocab_size: int, max_positions: int | None):
    if config.gate_mode not in PROMPT_MODES:
        return [([], []) for _ in config.experts]
    from jaxcombine.hf._tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.base_path)
    except CheckpointError as e:
        raise CheckpointError(
            f"gate_mode {config.gate_mode} tokenizes the prompts with the base model's "
            f"tokenizer: {e.message}",
            where=f"base_model: {e.where}",
            fix="add the base model's tokenizer.json, or use gate_mode: random",
        ) from None
    bos = _bos_text(config.base_path)
    out = []
    for i, e in enumerate(config.experts):
        groups = []
        for key, prompts in (("positive", e.positive_prompts), ("negative", e.negative_prompts)):
            ids = tokenize_prompts(tokenizer, bos, prompts)
            for j, row in enumerate(ids):
                where = f"experts[{i}].{key}_prompts[{j}]"
                if not row:
                    raise ConfigError(
                        "prompt has no tokens (and the tokenizer has no BOS token)",
                        where=where,
                        fix="write a non-empty prompt",
                    )
                if max(row) >= vocab_size:
                    raise CheckpointError(
                        f"the tokenizer gives id {max(row)} but the base model has "
                        f"{vocab_size} embedding rows",
                        where=where,
                        fix="the base model's tokenizer.json does not belong to its weights",
                    )
                if max_positions is not None and len(row) > max_positions:
                    raise ConfigError(
                        f"prompt has {len(row)} tokens, more than the base model's "
                        f"max_position_embeddings {max_positions}",
                        where=where,
                        fix="shorten the prompt",
                    )
            groups.append(ids)
        out.append(tuple(groups))
    return out


def _normalize(x: np.ndarray) -> np.ndarray:
    """``x / max(|x|, 1e-8)`` along the last axis (mergekit's clamp)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def cheap_embed_rows(embedding: np.ndarray, prompt_ids, num_layers: int) -> np.ndarray:
    """Router rows [L, X, E] from summed token embeddings (gate_mode cheap_embed).

    ``prompt_ids``: per expert, (positive, negative) lists of token id lists.
    Row m is ``n(n(sum e(pos)) - n(sum e(neg)))``, the same in every layer.

    Expert 0: prompt [0], e = (1, 0). Expert 1: prompt [1, 2] against [0],
    n((1, 2) / sqrt(5) - (1, 0)) = n(-0.553, 0.894):

    >>> embedding = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    >>> rows = cheap_embed_rows(embedding, [([[0]], []), ([[1, 2]], [[0]])], num_layers=2)
    >>> print(rows.shape, rows[1])
    (2, 2, 2) [[ 1.      0.    ]
     [-0.5257  0.8507]]

    References: mergekit-moe's gate modes (no paper of their own), part of MergeKit (Goddard et al.
    2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257).
    """
    embedding = np.asarray(embedding, np.float32)

    def summed(group):
        return _normalize(sum(embedding[np.asarray(ids)].sum(0) for ids in group))

    rows = []
    for positive, negative in prompt_ids:
        v = summed(positive)
        if negative:
            v = v - summed(negative)
        rows.append(_normalize(v))
    return np.broadcast_to(np.stack(rows), (num_layers, len(rows), embedding.shape[1])).copy()


def layer_input_states(model, prompts: list[list[int]], *, average: bool = False) -> np.ndarray:
    """The residual stream entering each layer, per prompt: [L, P, E] float32.

    At each prompt's last token, or (``average``) the mean over its tokens. The
    prompts are run unpadded-equivalently: right-padded to a length bucket
    with a token mask (causal attention never lets a real token see padding),
    ``_HIDDEN_BATCH`` at a time through one jitted function of the model's state.

    Layer 0's input is the token embedding:

    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> states = layer_input_states(model, [[1, 2, 3], [4, 5]])       # [L, P, E]
    >>> embedding = np.asarray(model.embed_tokens.embedding[...])
    >>> states.shape, np.allclose(states[0], embedding[[3, 5]])       # last tokens: 3 and 5
    ((2, 2, 8), True)
    >>> mean = layer_input_states(model, [[1, 2, 3]], average=True)
    >>> np.allclose(mean[0, 0], embedding[[1, 2, 3]].mean(0))
    True

    Another model of the same architecture reuses the compiled program:

    >>> compiled = _layer_inputs_program()._cache_size()
    >>> _ = layer_input_states(Decoder(config, rngs=nnx.Rngs(1)), [[1, 2, 3], [4, 5]])
    >>> _layer_inputs_program()._cache_size() == compiled
    True
    """
    from flax import nnx

    graphdef, state = nnx.split(model)
    run = _layer_inputs_program()
    num_layers = len(model.layers)
    out = []
    for start in range(0, len(prompts), _HIDDEN_BATCH):
        batch = prompts[start : start + _HIDDEN_BATCH]
        T = max(len(p) for p in batch)
        T = 1 << (T - 1).bit_length() if T > 16 else 16  # a few compiled lengths
        tokens = np.zeros((_HIDDEN_BATCH, T), np.int32)
        lengths = np.ones(_HIDDEN_BATCH, np.int32)
        for j, p in enumerate(batch):
            tokens[j, : len(p)] = p
            lengths[j] = len(p)
        states = run(graphdef, state, tokens, lengths, num_layers=num_layers, average=average)
        out.append(np.asarray(states)[:, : len(batch)])
    return np.concatenate(out, axis=1)


@functools.cache
def _layer_inputs_program():
    """One jitted program for every call of :func:`layer_input_states` (the model's
    graph is a static argument: models of one architecture share the compilations)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @partial(jax.jit, static_argnames=("graphdef", "num_layers", "average"))
    def run(graphdef, state, tokens, lengths, *, num_layers, average):
        T = tokens.shape[1]
        mask = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
        net = nnx.merge(graphdef, state)
        _, seen = nnx.capture(net, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            tokens, token_mask=mask
        )
        # input of layer 0: the embedding; of layer i: the output of layer i - 1
        xs = [seen["embed_tokens"]["__call__"].get_value()[0]]
        xs += [seen["layers"][i]["__call__"].get_value()[0][0] for i in range(num_layers - 1)]
        xs = jnp.stack(xs).astype(jnp.float32)  # [L, B, T, E]
        if average:
            return (xs * mask[None, :, :, None]).sum(2) / lengths[None, :, None]
        return jnp.take_along_axis(xs, (lengths - 1)[None, :, None, None], axis=2)[:, :, 0]

    return run


def hidden_rows(model, prompt_ids, *, average: bool = False) -> np.ndarray:
    """Router rows [L, X, E] from the base model's hidden states (gate_mode hidden*).

    Row m of layer l is ``n(mean_p h_l(p) - mean_q h_l(q))`` over expert m's
    positive prompts p and negative prompts q (see :func:`layer_input_states`).

    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> rows = hidden_rows(model, [([[1, 2, 3]], [[4, 5]]), ([[4, 5]], [])])   # [L, X, E]
    >>> h = layer_input_states(model, [[1, 2, 3], [4, 5]])
    >>> v = h[:, 0] - h[:, 1]                        # expert 0: positive minus negative
    >>> rows.shape, np.allclose(rows[:, 0], v / np.linalg.norm(v, axis=-1, keepdims=True))
    ((2, 2, 8), True)

    References: mergekit-moe's gate modes (no paper of their own), part of MergeKit (Goddard et al.
    2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257).
    """
    flat = [ids for positive, negative in prompt_ids for ids in (*positive, *negative)]
    states = layer_input_states(model, flat, average=average)  # [L, P, E]
    rows, at = [], 0
    for positive, negative in prompt_ids:
        v = states[:, at : at + len(positive)].mean(1)
        at += len(positive)
        if negative:
            v = v - states[:, at : at + len(negative)].mean(1)
            at += len(negative)
        rows.append(_normalize(v))
    return np.stack(rows, axis=1)


def random_rows(key, num_layers: int, num_experts: int, hidden: int, *, uniform: bool = False):
    """Router rows [L, X, E]: standard normal, or uniform on ``[-1/sqrt(E), 1/sqrt(E))``
    (torch's ``nn.Linear`` initialisation), from the ``jax.random`` ``key``.

    >>> import jax
    >>> rows = random_rows(jax.random.key(0), 2, 3, 16, uniform=True)
    >>> rows.shape, bool(np.all(np.abs(rows) <= 0.25))                # 1 / sqrt(16)
    ((2, 3, 16), True)
    """
    import jax

    shape = (num_layers, num_experts, hidden)
    if uniform:
        scale = float(np.sqrt(1.0 / hidden))
        return np.asarray(jax.random.uniform(key, shape, minval=-scale, maxval=scale))
    return np.asarray(jax.random.normal(key, shape))


def router_rows(plan: MoEPlan, *, seed: int = 0) -> np.ndarray:
    """Every layer's router rows [L, X, E] float32, by the plan's gate_mode:
    :func:`cheap_embed_rows`, :func:`hidden_rows` (the base model loaded and run)
    or :func:`random_rows` keyed by ``seed``; :func:`run_moe` writes them as
    ``block_sparse_moe.gate.weight`` (its example checks that).

    A random plan needs no checkpoint (``plan_moe`` makes real plans):

    >>> from jaxcombine.moe.mergekit import Expert, MoEMergeConfig, MoEPlan
    >>> experts = (Expert("a", Path("a")), Expert("b", Path("b")))
    >>> config = MoEMergeConfig("base", Path("base"), experts, gate_mode="uniform_random")
    >>> plan = MoEPlan(config, {}, [], {}, np.dtype("float32"), num_layers=2, hidden_size=16,
    ...                prompt_ids=[([], [])] * 2)
    >>> rows = router_rows(plan, seed=0)
    >>> rows.shape, bool(np.all(np.abs(rows) <= 0.25))                # [L, X, E], 1 / sqrt(16)
    ((2, 2, 16), True)

    References: mergekit-moe's gate modes (no paper of their own), part of MergeKit (Goddard et al.
    2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257).
    """
    import jax

    config, L, E = plan.config, plan.num_layers, plan.hidden_size
    X = len(config.experts)
    mode = config.gate_mode
    if mode in ("random", "uniform_random"):
        key = jax.random.fold_in(jax.random.key(seed), 0)
        return random_rows(key, L, X, E, uniform=mode == "uniform_random")
    if mode == "cheap_embed":
        base = plan.checkpoints[config.base_model]
        return cheap_embed_rows(base.read("model.embed_tokens.weight"), plan.prompt_ids, L)
    import jax.numpy as jnp

    from jaxcombine.hf import load_model

    model = load_model(config.base_path, dtype=jnp.float32)
    return hidden_rows(model, plan.prompt_ids, average=mode == "hidden_avg")
