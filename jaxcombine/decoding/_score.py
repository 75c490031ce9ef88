"""Negative log-likelihood of a token sequence, window by window.

The sequence is cut into consecutive, non-overlapping windows of ``window``
tokens (default: the model's context length); inside each window every token
after the first is predicted from the ones before it, so a window of n tokens
contributes n - 1 predictions (the convention of ``transformers``' loss with
``labels=input_ids``):

    nll = - (1 / #predictions) * sum_windows sum_{t>=1} log p(x_t | x_<t in window)
    ppl = exp(nll)

>>> from jaxcombine.decoding import windows_of
>>> windows_of(list(range(7)), 3)     # 2 + 2 predictions; the lone token 6 is dropped
[[0, 1, 2], [3, 4, 5]]
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.decoding._decodable import DecoderForward
from jaxcombine.errors import InputError
from jaxcombine.models import Decoder


class Score(NamedTuple):
    """Summed NLL and the number of predicted tokens; ``nll`` is their ratio and
    ``ppl = exp(nll)``.

    >>> s = Score(nll_sum=6.0, count=3)
    >>> s.nll, round(s.ppl, 4)            # exp(2)
    (2.0, 7.3891)
    """

    nll_sum: float  # summed natural-log NLL
    count: int  # predicted tokens

    @property
    def nll(self) -> float:
        return self.nll_sum / self.count

    @property
    def ppl(self) -> float:
        return math.exp(self.nll)


def windows_of(ids: Sequence[int], window: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens; a last window of one token is dropped.

    >>> windows_of([1, 2, 3, 4, 5], 2)
    [[1, 2], [3, 4]]
    """
    chunks = [list(ids[i : i + window]) for i in range(0, len(ids), window)]
    return [c for c in chunks if len(c) > 1]


@partial(jax.jit, static_argnames=("forward",))
def window_nll(forward, params, tokens, mask):
    """Summed NLL [B] of right-padded windows ``tokens`` [B, W] (``mask`` marks real tokens).

    ``nll[b] = -sum_{t >= 1, mask[b, t]} log p(tokens[b, t] | tokens[b, <t])``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import DecoderForward
    >>> graphdef, params = nnx.split(model)
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 0, 0, 0, 0, 0]])
    >>> nll = window_nll(DecoderForward(graphdef), params, tokens, tokens > 0)
    >>> lp = jax.nn.log_softmax(model(tokens[:1]).logits[0])        # [8, V]
    >>> picked = [float(lp[t - 1, tokens[0, t]]) for t in range(1, 8)]
    >>> bool(jnp.isclose(nll[0], -sum(picked))), bool(jnp.isclose(nll[1], -sum(picked[:2])))
    (True, True)
    """
    logits, _ = forward(params, tokens, mask, None)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)  # [B, W-1, V]
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # [B, W-1]
    return -jnp.sum(jnp.where(mask[:, 1:], target, 0.0), axis=-1)


def score_windows(forward, params, windows: list[list[int]], width: int, batch_size: int):
    """Summed NLL and prediction count over right-padded batches of windows.

    Every batch is ``batch_size`` rows of ``width`` tokens (one compiled
    shape); :func:`window_nll` per batch, summed in float64.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import DecoderForward
    >>> graphdef, params = nnx.split(model)
    >>> forward = DecoderForward(graphdef)
    >>> windows = [[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3]]
    >>> s = score_windows(forward, params, windows, width=8, batch_size=2)
    >>> s.count                                          # 7 + 2 predictions
    9
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 0, 0, 0, 0, 0]])
    >>> bool(jnp.isclose(s.nll_sum, window_nll(forward, params, tokens, tokens > 0).sum()))
    True
    """
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        for row, chunk in enumerate(batch):
            tokens[row, : len(chunk)] = chunk
            mask[row, : len(chunk)] = True
        nll = window_nll(forward, params, jnp.asarray(tokens), jnp.asarray(mask))
        total += float(np.sum(np.asarray(nll, np.float64)))
        count += sum(len(c) - 1 for c in batch)
    return Score(total, count)


def scoring_windows(config, ids: Sequence[int], window: int | None) -> list[list[int]]:
    """``ids`` cut into windows for :func:`score_windows`, with clear errors for
    texts too short to score and ids outside ``config``'s vocabulary.
    ``window`` defaults to the context length (``max_position_embeddings``).

    >>> from jaxcombine.models import DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4, max_position_embeddings=4)
    >>> scoring_windows(config, [1, 2, 3, 4, 5, 6], None)
    [[1, 2, 3, 4], [5, 6]]
    >>> scoring_windows(config, [1], None)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: text: need at least 2 tokens to score, got 1
      How to fix: score a longer text
    """
    windows = windows_of(ids, window or config.max_position_embeddings)
    if not windows:
        raise InputError(
            f"need at least 2 tokens to score, got {len(ids)}",
            where="text",
            fix="score a longer text",
        )
    bad = sorted({int(t) for t in ids if not 0 <= int(t) < config.vocab_size})
    if bad:
        raise InputError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {config.vocab_size})",
            where="text",
            fix="use the model's own tokenizer",
        )
    return windows


def score_with(forward, params, config, ids, *, window=None, batch_size=8) -> Score:
    """:func:`score` for any ``forward`` (one model, an ensemble, ...).

    The windows (:func:`scoring_windows`) are right-padded to the longest
    and scored ``batch_size`` at a time (:func:`score_windows`).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> from jaxcombine.decoding import Decodable
    >>> d = Decodable.of(model)
    >>> ids = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3]
    >>> s = score_with(d.forward, d.params, d.config, ids, window=8)   # [1..8], [1, 2, 3]
    >>> s.count
    9
    >>> s == score(model, ids, window=8)                  # the same for a Decoder
    True
    """
    windows = scoring_windows(config, ids, window)
    width = max(len(c) for c in windows)
    return score_windows(forward, params, windows, width, min(batch_size, len(windows)))


def score(
    model: Decoder, ids: Sequence[int], *, window: int | None = None, batch_size: int = 8
) -> Score:
    """NLL of ``ids`` under ``model``, in windows of the context length.

    ``nll = -(1 / #predictions) sum_windows sum_{t >= 1} log p(x_t | x_<t)``
    (module docstring), ``ppl = exp(nll)``; as transformers' loss with
    ``labels=input_ids`` on each window.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(0))
    >>> ids = [1, 2, 3, 4, 5, 6, 7, 8]
    >>> s = score(model, ids)                            # one window: 7 predictions
    >>> s.count
    7
    >>> lp = jax.nn.log_softmax(model(jnp.array([ids])).logits[0])
    >>> ref = -sum(float(lp[t - 1, ids[t]]) for t in range(1, 8)) / 7
    >>> abs(s.nll - ref) < 1e-5
    True
    """
    graphdef, params = nnx.split(model)
    return score_with(
        DecoderForward(graphdef), params, model.config, ids, window=window, batch_size=batch_size
    )
