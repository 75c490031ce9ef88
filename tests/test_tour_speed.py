"""The speed section's helpers against obviously-correct references: the host-side
linear rule against a per-token float64 loop, the hand-written ensemble loop
against members re-run on the whole sequence at every step (no cache), and
the timing helper's call order."""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from jaxcombine import tree
from jaxcombine.decoding import DecoderForward, generate
from jaxcombine.ensemble import Combination, stacked
from jaxcombine.tour.lm import init_members, small_decoder
from jaxcombine.tour.sections.speed import host_mixture_argmax, interleaved_medians, member_loop


def _mixture_argmax_loop(logits, weights):
    """argmax_v sum_i w_i exp(z_iv) / sum_u exp(z_iu), one row and token at a time."""
    N, B, V = logits.shape
    out = []
    for b in range(B):
        best, best_p = -1, -1.0
        for v in range(V):
            p = 0.0
            for i in range(N):
                top = max(logits[i, b])
                total = sum(math.exp(z - top) for z in logits[i, b])
                p += weights[i] * math.exp(logits[i, b, v] - top) / total
            if p > best_p:
                best, best_p = v, p
        out.append(best)
    return out


def test_host_mixture_argmax_equals_a_loop_over_tokens():
    rng = np.random.default_rng(0)
    logits = 30.0 * rng.standard_normal((3, 4, 17))  # large logits: a naive exp overflows f32
    weights = np.array([0.5, 0.3, 0.2])
    assert host_mixture_argmax(logits, weights).tolist() == _mixture_argmax_loop(logits, weights)
    # A member far more confident than the others decides the mixture's argmax.
    logits[0, :, 5] = 1e3
    assert host_mixture_argmax(logits, weights).tolist() == [5, 5, 5, 5]


def _uncached_greedy(graphdef, members, prompt, new_tokens, context):
    """Greedy decoding of the uniform linear mixture, every member re-run on the whole
    sequence at every step (no cache), one prompt at a time. The sequence sits at
    the start of a zero-filled row of ``context`` tokens (one compiled shape);
    causal attention keeps the zeros after it from changing its logits."""
    forward = jax.jit(lambda params, row: nnx.merge(graphdef, params)(row).logits)
    sequence = list(prompt)
    for _ in range(new_tokens):
        row = np.zeros((1, context), np.int32)
        row[0, : len(sequence)] = sequence
        logits = [np.asarray(forward(p, row))[:, len(sequence) - 1] for p in members]
        weights = np.full(len(members), 1.0 / len(members))
        sequence += _mixture_argmax_loop(np.stack(logits).astype(np.float64), weights)
    return sequence[len(prompt) :]


def test_member_loop_equals_uncached_members_and_the_stacked_ensemble():
    config = small_decoder(40, hidden=16, layers=1, context=32)
    graphdef, params = init_members(config, [3, 5, 8])
    members = tree.unstack(params)
    prompts = [[1, 7, 22, 9, 31], [4, 2], [17, 17, 3]]  # different lengths: left padding
    loop = member_loop(DecoderForward(graphdef), members, config)
    got = loop(prompts, 6)
    expected = [_uncached_greedy(graphdef, members, p, 6, context=32) for p in prompts]
    assert got == expected
    ensemble = stacked([nnx.merge(graphdef, p) for p in members], Combination("linear"))
    assert generate(ensemble, prompts, max_new_tokens=6, eos_token_ids=()) == got


def test_interleaved_medians_warms_up_then_alternates():
    order = []
    calls = {
        "a": lambda: order.append("a") or "first a",
        "b": lambda: order.append("b") or "first b",
    }
    outputs, seconds = interleaved_medians(calls, repeats=3)
    assert order == ["a", "b"] * 4
    assert outputs == {"a": "first a", "b": "first b"}
    assert set(seconds) == {"a", "b"} and all(s >= 0 for s in seconds.values())
