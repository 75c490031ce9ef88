"""Cascades: a small model decodes and hands a step (or the rest of the
sequence) to a large model when it is unsure.

At every step ``t`` the small model's next-token distribution ``q_t`` gives a
confidence ``c_t`` in [0, 1]:

    top_prob   c = max_v q_t(v)
    entropy    c = 1 - H(q_t) / log V,   H(q) = -sum_v q(v) log q(v)

(1 for a one-hot distribution, 0 for a uniform one). A row *defers* when
``c_t < threshold``: the step is then decided by the large model's
distribution given the full prefix (prompt and every token emitted so far),
else by the small model's. With ``mode="rest"`` a row that deferred once is
decided by the large model at every later step. Threshold 0 never defers (the
small model alone), a threshold above 1 always does (the large model alone).
Confidences come from the models' plain softmax; tokens are then chosen with
``sampling`` (greedy by default) from the deciding model's logits.

One jitted ``lax.while_loop`` runs the steps. The small model feeds one token
per step; the large model computes only at steps where some row defers. Its
cache lags behind: the loop remembers how many positions of the (left-padded)
sequences it holds (``fed``, the same for every row, since every catch-up
feeds all rows) and, when a row defers, feeds the ``k`` pending ones (at the
first deferral the prompt as well) and reads the logits after the last.
Chunks have power-of-two widths, one compiled branch each (``lax.switch``).
A catch-up is one chunk of the smallest width ``>= k``; the filler positions
after the pending tokens are dropped from the cache afterwards
(``forward.keep_slots``), so the next chunk writes right after the last real
token and a row's tokens sit in consecutive slots, as sliding windows need.
Where that chunk would run past the end of the cache, a chunk of the largest
width ``<= k`` goes first and the rest follows the same way. So the large
model's cache has ``P + N`` slots, as in plain decoding (prompt bucket ``P``,
``N`` new tokens), and a catch-up of ``k`` positions runs fewer than ``2k``
in one call (at most ``log2(k) + 1`` near the end of the cache). The filler
runs through the model as tokens: a capacity-limited MoE routes it too
(dropless MoEs, as transformers' Mixtral, are not affected). The large model
runs for the whole batch at once: in a batch, a step costs a catch-up when
any row defers. In ``rest`` mode the small model stops computing once every
live row has deferred. :class:`Cascade` reports both models' calls and the
large model's positions.

References: cascades of models of growing cost (Viola & Jones 2001);
confidence-based deferral for language models (Chen et al. 2023, FrugalGPT,
arXiv:2305.05176; Gupta et al. 2024, arXiv:2404.10136); token-level deferral
(Narasimhan et al. 2024, arXiv:2405.19261).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.decoding._decodable import Decodable, check_new_tokens, check_same_vocabulary
from jaxcombine.decoding._generate import GREEDY, generate, special_tokens, strip_after_eos
from jaxcombine.decoding._prefill import (
    bucket_length,
    left_pad,
    prefill_prompts,
)
from jaxcombine.decoding._sampling import Sampling, sample_tokens
from jaxcombine.errors import InputError, closest
from jaxcombine.models import Decoder

CONFIDENCES = ("top_prob", "entropy")
MODES = ("step", "rest")


class Cascade(NamedTuple):
    """Tokens per prompt and what each model computed.

    >>> out = Cascade(tokens=[[4, 5, 6], [7]], large_steps=[1, 0], large_calls=2,
    ...               large_positions=20, small_calls=3)
    >>> out.deferred                      # 1 of 4 emitted tokens decided by the large model
    0.25

    References: Gupta et al. 2024, Language Model Cascades: Token-level Uncertainty and Beyond,
    arXiv:2404.10136.
    """

    tokens: list[list[int]]
    large_steps: list[int]  # per row: steps decided by the large model
    large_calls: int  # large-model forwards (catch-ups), the prompt's included
    large_positions: int  # token positions per row the large model ran, filler included
    small_calls: int  # small-model forwards after its prefill

    @property
    def deferred(self) -> float:
        """Fraction of the emitted tokens that the large model decided."""
        return sum(self.large_steps) / max(sum(len(t) for t in self.tokens), 1)


def confidence_of(logits: jax.Array, kind: str) -> jax.Array:
    """Confidence [B] in [0, 1] of the next-token distribution softmax(``logits`` [B, V])."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if kind == "top_prob":
        return jnp.exp(jnp.max(logp, axis=-1))
    p = jnp.exp(logp)
    entropy = -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)
    return jnp.clip(1.0 - entropy / math.log(logits.shape[-1]), 0.0, 1.0)


def chunk_widths(slots: int) -> tuple[int, ...]:
    """The chunk widths a catch-up may use: the powers of two up to ``slots``."""
    return tuple(1 << i for i in range(slots.bit_length()))


class _CascadeState(NamedTuple):
    step: jax.Array  # [] int32: tokens emitted so far
    tokens: jax.Array  # [B, N] emitted tokens, pad after a row finishes
    seq: jax.Array  # [B, P + N] left-padded prompts, then the emitted tokens
    done: jax.Array  # [B] bool
    deferred: jax.Array  # [B] bool: deferred once (``rest`` mode keeps deferring)
    small_logits: jax.Array  # [B, V] the small model's logits for this step
    small_cache: Any
    large_cache: Any
    fed: jax.Array  # [] int32: positions of ``seq`` the large cache holds
    key: jax.Array
    large_steps: jax.Array  # [B] int32
    large_calls: jax.Array  # [] int32
    large_positions: jax.Array  # [] int32
    small_calls: jax.Array  # [] int32


@partial(
    jax.jit,
    static_argnames=(
        "small", "large", "prompt_length", "max_new_tokens", "confidence", "mode", "sampling",
    ),
)  # fmt: skip
def cascade_loop(
    small,
    small_params,
    large,
    large_params,
    first_logits,
    small_cache,
    large_cache,
    seq,
    valid,
    threshold,
    key,
    eos_ids,
    pad_id,
    *,
    prompt_length: int,
    max_new_tokens: int,
    confidence: str,
    mode: str,
    sampling: Sampling,
):
    """The cascade after the small model's prefill; ``large_cache`` is empty.

    ``seq`` [B, P + N] holds the left-padded prompts in ``[0, P)`` and ``valid``
    [B, P + N] their mask (True from ``P`` on); the large cache has ``P + N``
    slots. Returns
    (tokens [B, N], large steps [B], large calls, large positions, small calls).
    """
    P, N = prompt_length, max_new_tokens
    B, V = first_logits.shape
    slots = seq.shape[1]  # the large cache's slots
    widths = chunk_widths(slots)

    def feed(width: int):
        def run(cache, seq, fed, count):
            """Feed ``seq[:, fed : fed + width]``, keep its first ``count`` positions."""
            tokens = jax.lax.dynamic_slice_in_dim(seq, fed, width, axis=1)  # [B, w]
            mask = jax.lax.dynamic_slice_in_dim(valid, fed, width, axis=1)
            logits, cache = large(large_params, tokens, mask, cache)  # [B, w, V]
            keep = jnp.broadcast_to(jnp.arange(width) < count, (B, width))
            last = jax.lax.dynamic_index_in_dim(logits, count - 1, axis=1, keepdims=False)
            return last.astype(jnp.float32), large.keep_slots(cache, keep)

        return run

    def catch_up(state: _CascadeState, target):
        """Feed ``seq[:, state.fed : target]`` to the large model (nothing when
        ``target == state.fed``): its logits after the last position [B, V], its
        cache, and the calls and positions that took."""
        sizes = jnp.asarray(widths)

        def chunk(carry):
            _, cache, fed, calls, positions = carry
            pending = target - fed
            up = jnp.searchsorted(sizes, pending)  # smallest width >= pending (if any)
            down = jnp.searchsorted(sizes, pending, side="right") - 1  # largest <= pending
            fits = (up < len(widths)) & (fed + sizes[jnp.minimum(up, len(widths) - 1)] <= slots)
            branch = jnp.where(fits, up, down)
            count = jnp.minimum(sizes[branch], pending)
            logits, cache = jax.lax.switch(
                branch, [feed(w) for w in widths], cache, state.seq, fed, count
            )
            return logits, cache, fed + count, calls + 1, positions + sizes[branch]

        zero = jnp.zeros((), jnp.int32)
        start = (jnp.zeros((B, V), jnp.float32), state.large_cache, state.fed, zero, zero)
        return jax.lax.while_loop(lambda c: c[2] < target, chunk, start)

    def body(state: _CascadeState) -> _CascadeState:
        live = ~state.done
        unsure = confidence_of(state.small_logits, confidence) < threshold  # [B]
        defer = live & (unsure | (state.deferred if mode == "rest" else False))
        target = jnp.where(jnp.any(defer), P + state.step, state.fed)
        large_logits, large_cache, fed, calls, positions = catch_up(state, target)
        logits = jnp.where(defer[:, None], large_logits, state.small_logits.astype(jnp.float32))
        key, sub = jax.random.split(state.key)
        token = jnp.where(state.done, pad_id, sample_tokens(logits, sub, sampling))  # [B]
        tokens = jax.lax.dynamic_update_slice(state.tokens, token[:, None], (0, state.step))
        seq = jax.lax.dynamic_update_slice(state.seq, token[:, None], (0, P + state.step))
        done = state.done | jnp.isin(token, eos_ids)
        deferred = state.deferred | defer
        # The small model's next step, unless nothing will read it.
        needed = (state.step + 1 < N) & ~jnp.all(done)
        if mode == "rest":
            needed &= jnp.any(~done & ~deferred)

        def small_step(cache):
            out, cache = small(small_params, token[:, None], jnp.ones((B, 1), bool), cache)
            return out[:, -1].astype(state.small_logits.dtype), cache

        small_logits, small_cache = jax.lax.cond(
            needed, small_step, lambda c: (state.small_logits, c), state.small_cache
        )
        return _CascadeState(
            step=state.step + 1,
            tokens=tokens,
            seq=seq,
            done=done,
            deferred=deferred,
            small_logits=small_logits,
            small_cache=small_cache,
            large_cache=large_cache,
            fed=fed,
            key=key,
            large_steps=state.large_steps + defer,
            large_calls=state.large_calls + calls,
            large_positions=state.large_positions + positions,
            small_calls=state.small_calls + needed,
        )

    zero = jnp.zeros((), jnp.int32)
    start = _CascadeState(
        step=zero,
        tokens=jnp.full((B, N), pad_id, jnp.int32),
        seq=seq,
        done=jnp.zeros((B,), bool),
        deferred=jnp.zeros((B,), bool),
        small_logits=first_logits,
        small_cache=small_cache,
        large_cache=large_cache,
        fed=zero,
        key=key,
        large_steps=jnp.zeros((B,), jnp.int32),
        large_calls=zero,
        large_positions=zero,
        small_calls=zero,
    )
    final = jax.lax.while_loop(lambda s: (s.step < N) & ~jnp.all(s.done), body, start)
    return (
        final.tokens, final.large_steps, final.large_calls, final.large_positions,
        final.small_calls,
    )  # fmt: skip


def check_cascade(small: Decodable, large: Decodable, threshold, confidence, mode) -> None:
    """Clear errors for models that cannot cascade and for bad settings."""
    check_same_vocabulary(small, large, ("small model", "large model"))
    if confidence not in CONFIDENCES:
        raise InputError(
            f"unknown confidence {confidence!r}",
            where="confidence",
            fix=closest(confidence, CONFIDENCES),
        )
    if mode not in MODES:
        raise InputError(f"unknown cascade mode {mode!r}", where="mode", fix=closest(mode, MODES))
    thresholds = np.atleast_1d(np.asarray(threshold, np.float64))
    if thresholds.ndim != 1 or not np.all(thresholds >= 0):  # NaN fails too
        raise InputError(
            f"a cascade threshold is a confidence in [0, 1] (above 1: always defer), "
            f"got {threshold!r}",
            where="threshold",
            fix="use 0 for the small model alone, a value above 1 for the large model alone",
        )


def cascade_generate(
    small: Decoder | Decodable,
    large: Decoder | Decodable,
    prompts: Sequence[Sequence[int]],
    *,
    threshold: float,
    confidence: str = "top_prob",
    mode: str = "step",
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int = 0,
) -> Cascade:
    """Continue each prompt with ``small``, deferring to ``large`` (one model or
    any :class:`Decodable`, e.g. an ensemble) where the small model's
    ``confidence`` is under ``threshold``; see the module docstring.

    Threshold 0 gives ``generate(small, ...)`` and runs no large forward; a
    threshold above 1 gives ``generate(large, ...)`` (the same tokens for the
    same ``seed`` when sampling: both use the decode loop's key sequence).
    EOS and pad ids default to the large model's.

    The two ends, on a large model and its one-layer draft as the small one:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import layer_skip_draft
    >>> small = layer_skip_draft(model, 1)
    >>> def greedy_of(m, new):   # is every new token m's argmax after the tokens before it?
    ...     return new == m(jnp.array([[1, 2, 3] + new])).logits[0, 2:-1].argmax(-1).tolist()
    >>> never = cascade_generate(small, model, [[1, 2, 3]], threshold=0.0, max_new_tokens=5)
    >>> greedy_of(small, never.tokens[0]), never.large_calls
    (True, 0)
    >>> always = cascade_generate(small, model, [[1, 2, 3]], threshold=1.1, max_new_tokens=5)
    >>> greedy_of(model, always.tokens[0]), always.deferred
    (True, 1.0)

    References: Chen et al. 2023, FrugalGPT: How to Use Large Language Models While Reducing Cost
    and Improving Performance, arXiv:2305.05176; Gupta et al. 2024, Language Model Cascades:
    Token-level Uncertainty and Beyond, arXiv:2404.10136; Narasimhan et al. 2024, Faster Cascades
    via Speculative Decoding, arXiv:2405.19261 (token-level deferral).
    """
    small, large = Decodable.of(small), Decodable.of(large)
    check_cascade(small, large, threshold, confidence, mode)
    if np.ndim(threshold) != 0:
        raise InputError(
            f"threshold must be one number, got {threshold!r}",
            where="threshold",
            fix="use cascade_sweep for several thresholds",
        )
    check_new_tokens(max_new_tokens)
    small.check_prompts(prompts)
    large.check_prompts(prompts)
    eos, pad = special_tokens(large.config, eos_token_ids, pad_token_id)
    P, N = bucket_length(max(len(p) for p in prompts)), max_new_tokens
    first_logits, small_cache = prefill_prompts(small, prompts, pad, N)
    length = P + N  # the large cache's slots, as in plain decoding
    prompt, mask = left_pad(prompts, P, pad)
    seq = np.full((len(prompts), length), pad, np.int32)
    seq[:, :P] = prompt
    valid = np.ones((len(prompts), length), bool)
    valid[:, :P] = mask
    tokens, large_steps, calls, positions, small_calls = cascade_loop(
        small.forward, small.params, large.forward, large.params, first_logits, small_cache,
        large.init_cache(len(prompts), length), jnp.asarray(seq), jnp.asarray(valid),
        jnp.float32(threshold), jax.random.key(seed), jnp.asarray(eos or (-1,), jnp.int32),
        jnp.int32(pad), prompt_length=P, max_new_tokens=N, confidence=confidence, mode=mode,
        sampling=sampling,
    )  # fmt: skip
    return Cascade(
        tokens=[strip_after_eos(row, eos) for row in np.asarray(tokens)],
        large_steps=[int(n) for n in np.asarray(large_steps)],
        large_calls=int(calls),
        large_positions=int(positions),
        small_calls=int(small_calls),
    )


@partial(jax.jit, static_argnames=("forward",))
def _continuation_nll(forward, params, tokens, mask, scored):
    """Summed NLL [B] of the positions ``scored`` [B, L] of right-padded ``tokens``."""
    logits, _ = forward(params, tokens, mask, None)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, L - 1]
    return -jnp.sum(jnp.where(scored[:, 1:], picked, 0.0), axis=-1)


def continuation_nll(model: Decoder | Decodable, prompts, continuations) -> float:
    """Mean NLL per token of each continuation given its prompt under ``model``:
    ``-(1 / sum_b n_b) sum_b sum_t log p(y_bt | prompt_b, y_b<t)``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> nll = continuation_nll(model, [[1, 2, 3]], [[4, 5, 6, 7, 8]])
    >>> lp = jax.nn.log_softmax(model(jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])).logits[0])
    >>> ref = -sum(float(lp[t - 1, t + 1]) for t in range(3, 8)) / 5   # token at t is t + 1
    >>> abs(nll - ref) < 1e-5
    True
    """
    model = Decodable.of(model)
    rows = [list(p) + list(c) for p, c in zip(prompts, continuations, strict=True)]
    length = bucket_length(max(len(r) for r in rows))
    tokens = np.zeros((len(rows), length), np.int32)
    mask = np.zeros((len(rows), length), bool)
    scored = np.zeros((len(rows), length), bool)
    for i, (row, prompt) in enumerate(zip(rows, prompts, strict=True)):
        tokens[i, : len(row)] = row
        mask[i, : len(row)] = True
        scored[i, len(prompt) : len(row)] = True
    nll = _continuation_nll(
        model.forward, model.params, jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(scored)
    )
    return float(np.sum(np.asarray(nll, np.float64))) / max(int(scored.sum()), 1)


def agreement(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> float:
    """Token-level agreement: positions where both rows hold the same token, over
    the longer row's length, summed over rows."""
    pairs = list(zip(outputs, reference, strict=True))
    same = sum(int(a == b) for out, ref in pairs for a, b in zip(out, ref, strict=False))
    return same / max(sum(max(len(out), len(ref)) for out, ref in pairs), 1)


def cascade_sweep(
    small: Decoder | Decodable,
    large: Decoder | Decodable,
    prompts: Sequence[Sequence[int]],
    thresholds: Sequence[float],
    *,
    confidence: str = "top_prob",
    mode: str = "step",
    max_new_tokens: int = 32,
    eos_token_ids: Sequence[int] | None = None,
    pad_token_id: int | None = None,
) -> list[dict]:
    """Quality against compute as the threshold moves (greedy decoding).

    One row per threshold: ``deferred`` (fraction of tokens the large model
    decided), ``large_calls`` and ``large_positions`` (:class:`Cascade`),
    ``agreement`` (token-level, with the large model's own greedy output) and
    ``nll`` (mean NLL of the produced tokens under the large model). In
    ``rest`` mode without EOS, ``deferred`` never decreases with the threshold
    (a row defers at the first step its own greedy path is unsure, which comes
    no later for a higher threshold); in ``step`` mode deferring changes the
    path, and with it the later confidences, so it need not be monotone.
    :func:`format_sweep` prints the rows as a table.

    Above threshold 1 every token is deferred, and the output is the large
    model's own (agreement 1):

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import layer_skip_draft
    >>> rows = cascade_sweep(layer_skip_draft(model, 1), model, [[1, 2, 3]], [0.0, 1.1],
    ...                      max_new_tokens=5)
    >>> [(r["threshold"], r["deferred"], r["agreement"]) for r in rows][1]
    (1.1, 1.0, 1.0)
    >>> rows[0]["large_calls"], rows[0]["nll"] > rows[1]["nll"]      # the large model's own
    (0, True)

    References: Gupta et al. 2024, Language Model Cascades: Token-level Uncertainty and Beyond,
    arXiv:2404.10136 (deferral curves: quality against the large model's cost).
    """
    small, large = Decodable.of(small), Decodable.of(large)
    check_cascade(small, large, list(thresholds), confidence, mode)
    special = dict(eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)
    reference = generate(large, prompts, max_new_tokens=max_new_tokens, **special)
    rows = []
    for threshold in thresholds:
        out = cascade_generate(
            small, large, prompts, threshold=threshold, confidence=confidence, mode=mode,
            max_new_tokens=max_new_tokens, **special,
        )  # fmt: skip
        rows.append(
            {
                "threshold": float(threshold),
                "deferred": out.deferred,
                "large_calls": out.large_calls,
                "large_positions": out.large_positions,
                "agreement": agreement(out.tokens, reference),
                "nll": continuation_nll(large, prompts, out.tokens),
            }
        )
    return rows


def format_sweep(rows: Sequence[dict]) -> str:
    """The rows of :func:`cascade_sweep` (or any dicts of one set of keys) as a text table.

    Floats get four decimals, columns are right-aligned.

    >>> print(format_sweep([{"threshold": 0.0, "deferred": 0.0, "large_calls": 1},
    ...                     {"threshold": 0.5, "deferred": 0.25, "large_calls": 3}]))
    threshold  deferred  large_calls
    ---------  --------  -----------
       0.0000    0.0000            1
       0.5000    0.2500            3
    """
    if not rows:
        return ""
    keys = list(rows[0])

    def cell(value):
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    cells = [keys] + [[cell(row[k]) for k in keys] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(keys))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
