"""Cascades: the small model decodes, the large model (one model or an ensemble)
decides the steps where the small one is unsure. Oracles: the models' own
``generate`` at the extreme thresholds, and a slow Python loop over the
transformers models on the full prefix at every step."""

import math

import numpy as np
import pytest
import torch
from flax import nnx

from jaxcombine.decoding import (
    Sampling,
    cascade_generate,
    cascade_sweep,
    format_sweep,
    generate,
)
from jaxcombine.ensemble import Combination, stacked
from jaxcombine.errors import ConfigError, InputError, JaxcombineError
from jaxcombine.hf import load_model
from jaxcombine.models import Decoder, DecoderConfig
from tests import hf_models

B = hf_models.BOS
PROMPTS = [[B, 17, 42, 99, 7], [B, 3], [B, 120, 33, 8, 250, 61, 5, 77]]
N = 16


@pytest.fixture(scope="module")
def pair(tiny_models):
    """(small, large) jaxcombine models and their transformers references."""
    small, large = tiny_models["llama_gqa"], tiny_models["mistral"]  # mistral: sliding window 8
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only contend on a shared machine
    yield {
        "small": load_model(small),
        "large": load_model(large),
        "hf_small": hf_models.load_reference(small),
        "hf_large": hf_models.load_reference(large),
    }
    torch.set_num_threads(threads)
    _LOGP.clear()


_LOGP = {}  # (model, prefix) -> log-probabilities: reference paths share prefixes


def next_logp(model, ids) -> np.ndarray:
    """log p(. | ids) [V] of a transformers model, on the whole prefix (float64)."""
    key = (id(model), tuple(ids))
    if key not in _LOGP:
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double()
        _LOGP[key] = torch.log_softmax(logits, -1).numpy()
    return _LOGP[key]


def confidence(logp: np.ndarray, kind: str) -> float:
    if kind == "top_prob":
        return float(np.exp(logp.max()))
    entropy = -float(np.sum(np.exp(logp) * logp))
    return 1.0 - entropy / math.log(logp.shape[-1])


def reference_cascade(hf_small, large_logp, prompts, threshold, kind, mode, eos=()):
    """The cascade rule applied row by row, every model run on the full prefix:
    tokens, large-model steps per row, the steps where some row deferred, and
    the smallest |confidence - threshold| seen."""
    rows, large_steps, deferring, margin = [], [], set(), np.inf
    for prompt in prompts:
        seq, out, deferred, steps = list(prompt), [], False, 0
        for t in range(N):
            logp = next_logp(hf_small, seq)
            c = confidence(logp, kind)
            margin = min(margin, abs(c - threshold))
            deferred = (c < threshold) or (mode == "rest" and deferred)
            if deferred:
                logp, steps = large_logp(seq), steps + 1
                deferring.add(t)
            token = int(np.argmax(logp))
            out.append(token)
            seq.append(token)
            if token in eos:
                break
        rows.append(out)
        large_steps.append(steps)
    return rows, large_steps, sorted(deferring), margin


def catch_up_cost(deferring, prompt_bucket=16):
    """(calls, positions per row) of the large model catching up at the steps
    ``deferring``, as documented: the pending run (the prompt bucket at first,
    then the tokens since the last catch-up) in one chunk of the next power of
    two when that fits the cache (prompt bucket + N slots), else in chunks of
    the largest power of two left."""
    slots, calls, positions, fed = prompt_bucket + N, 0, 0, 0
    for t in deferring:
        while fed < prompt_bucket + t:
            pending = prompt_bucket + t - fed
            width = 1 << (pending - 1).bit_length()
            if fed + width > slots:
                width = 1 << (pending.bit_length() - 1)
            calls, positions, fed = calls + 1, positions + width, fed + min(width, pending)
    return calls, positions


def small_confidences(hf_small, kind):
    """Confidences of the small model along its own greedy continuations."""
    values = []
    for prompt in PROMPTS:
        seq = list(prompt)
        for _ in range(N):
            logp = next_logp(hf_small, seq)
            values.append(confidence(logp, kind))
            seq.append(int(np.argmax(logp)))
    return np.sort(values)


def pick_threshold(hf_small, large_logp, kind, mode, quantile, eos=()):
    """A threshold between two observed confidences near ``quantile`` at which the
    reference defers some steps and keeps others, with no confidence on its
    path within 1e-4 of it (float rounding cannot flip a decision); and the
    reference's outputs there."""
    values = small_confidences(hf_small, kind)
    mids = (values[1:] + values[:-1]) / 2
    order = np.argsort(np.abs(np.arange(len(mids)) - quantile * len(mids)))
    for threshold in mids[order]:
        ref = reference_cascade(hf_small, large_logp, PROMPTS, threshold, kind, mode, eos)
        rows, steps, _, margin = ref
        if margin > 1e-4 and 0 < sum(steps) < sum(len(r) for r in rows):
            return float(threshold), ref
    raise AssertionError("no usable threshold")


def test_threshold_zero_is_the_small_model_and_above_one_the_large(pair):
    small_free = generate(pair["small"], PROMPTS, max_new_tokens=N, eos_token_ids=())
    eos = (small_free[1][6],)  # reachable: row 1 stops at step 7 or earlier
    expected = generate(pair["small"], PROMPTS, max_new_tokens=N, eos_token_ids=eos)
    assert len(expected[1]) <= 7
    for mode in ("step", "rest"):
        out = cascade_generate(
            pair["small"], pair["large"], PROMPTS, threshold=0.0, mode=mode,
            max_new_tokens=N, eos_token_ids=eos,
        )  # fmt: skip
        assert out.tokens == expected
        assert out.large_steps == [0, 0, 0] and out.large_calls == 0
        assert out.large_positions == 0 and out.deferred == 0.0
        assert out.small_calls == max(len(r) for r in expected) - 1
    expected = generate(pair["large"], PROMPTS, max_new_tokens=N, eos_token_ids=())
    for mode in ("step", "rest"):
        out = cascade_generate(
            pair["small"], pair["large"], PROMPTS, threshold=1.5, mode=mode,
            max_new_tokens=N, eos_token_ids=(),
        )  # fmt: skip
        assert out.tokens == expected
        assert out.large_steps == [N] * 3 and out.deferred == 1.0
        # the prompt bucket (16) once, then one token per step
        assert out.large_calls == N and out.large_positions == 16 + N - 1
        assert out.small_calls == (N - 1 if mode == "step" else 0)


@pytest.mark.parametrize(
    "mode, kind, quantile",
    [
        ("step", "top_prob", 0.5),  # most steps defer
        ("step", "top_prob", 0.1),  # sparse: a first chunk with filler, a late split catch-up
        ("step", "entropy", 0.3),
        ("rest", "top_prob", 0.05),
        ("rest", "entropy", 0.05),
    ],
)
def test_intermediate_thresholds_equal_the_transformers_reference(pair, mode, kind, quantile):
    def large_logp(seq):
        return next_logp(pair["hf_large"], seq)

    threshold, (no_eos, *_) = pick_threshold(pair["hf_small"], large_logp, kind, mode, quantile)
    eos = (no_eos[2][9],)  # reached by row 2: the path up to it does not depend on EOS
    rows, steps, deferring, _ = reference_cascade(
        pair["hf_small"], large_logp, PROMPTS, threshold, kind, mode, eos
    )
    assert len(rows[2]) <= 10
    if mode == "rest":  # some row starts with the small model and then hands over
        assert any(0 < s < len(r) for s, r in zip(steps, rows, strict=True))
    out = cascade_generate(
        pair["small"], pair["large"], PROMPTS, threshold=threshold, confidence=kind, mode=mode,
        max_new_tokens=N, eos_token_ids=eos,
    )  # fmt: skip
    assert out.tokens == rows
    assert out.large_steps == steps
    # the large model runs only at the steps where some row defers
    assert (out.large_calls, out.large_positions) == catch_up_cost(deferring)


def test_an_ensemble_as_the_large_model(pair, tmp_path):
    paths = [hf_models.make_tiny_model(tmp_path / f"m{s}", "qwen2", seed=s) for s in (1, 2)]
    weights = (0.7, 0.3)
    ensemble = stacked([load_model(p) for p in paths], Combination("linear", weights))
    members = [hf_models.load_reference(p) for p in paths]

    def large_logp(seq):  # log sum_i w_i p_i
        probs = sum(w * np.exp(next_logp(m, seq)) for w, m in zip(weights, members, strict=True))
        return np.log(probs)

    threshold, expected = pick_threshold(pair["hf_small"], large_logp, "top_prob", "step", 0.5)
    always = reference_cascade(pair["hf_small"], large_logp, PROMPTS, 1.5, "top_prob", "step")
    for t, (rows, steps, deferring, _) in [(threshold, expected), (1.5, always)]:
        out = cascade_generate(
            pair["small"], ensemble, PROMPTS, threshold=t, max_new_tokens=N, eos_token_ids=()
        )
        assert (out.tokens, out.large_steps) == (rows, steps)
        assert (out.large_calls, out.large_positions) == catch_up_cost(deferring)


def test_always_deferring_samples_the_large_models_own_draws(pair):
    # the same key per step as generate's loop, and the large model's logits
    # through lazy catch-ups equal its own decoding's
    sampling = Sampling(temperature=1.0, top_k=40)
    expected = generate(
        pair["large"], PROMPTS, max_new_tokens=N, sampling=sampling, eos_token_ids=(), seed=3
    )
    out = cascade_generate(
        pair["small"], pair["large"], PROMPTS, threshold=1.5, max_new_tokens=N,
        sampling=sampling, eos_token_ids=(), seed=3,
    )  # fmt: skip
    assert out.tokens == expected


def test_the_sweep_trades_compute_for_quality(pair):
    def large_logp(seq):
        return next_logp(pair["hf_large"], seq)

    values = small_confidences(pair["hf_small"], "top_prob")
    thresholds = [0.0, *np.quantile(values, [0.05, 0.3, 0.7]), 1.0001, 2.0]
    for mode in ("rest", "step"):
        rows = cascade_sweep(
            pair["small"], pair["large"], PROMPTS, thresholds, mode=mode,
            max_new_tokens=N, eos_token_ids=(),
        )  # fmt: skip
        deferred = [r["deferred"] for r in rows]
        assert deferred[0] == 0.0 and deferred[-2:] == [1.0, 1.0]
        assert rows[0]["large_calls"] == 0 and rows[-1]["agreement"] == 1.0
        if mode == "rest":  # without EOS, provably monotone (see cascade_sweep)
            assert deferred == sorted(deferred) and 0 < deferred[2] < 1
    table = format_sweep(rows)
    assert len(table.splitlines()) == len(thresholds) + 2 and "agreement" in table

    # quality figures against the transformers models: NLL and agreement of the
    # small model's tokens (threshold 0) and the large model's (above 1)
    large_greedy, small_greedy = (
        reference_cascade(pair["hf_small"], large_logp, PROMPTS, t, "top_prob", "step")[0]
        for t in (2.0, 0.0)
    )
    for row, tokens in [(rows[0], small_greedy), (rows[-1], large_greedy)]:
        nll = -sum(
            next_logp(pair["hf_large"], prompt + out[:i])[out[i]]
            for prompt, out in zip(PROMPTS, tokens, strict=True)
            for i in range(len(out))
        ) / sum(len(out) for out in tokens)
        assert row["nll"] == pytest.approx(nll, rel=1e-4)
    pairs = zip(small_greedy, large_greedy, strict=True)
    same = sum(a == b for s, g in pairs for a, b in zip(s, g, strict=True))
    assert rows[0]["agreement"] == pytest.approx(same / (3 * N))


def test_clear_errors(pair):
    small, large = pair["small"], pair["large"]
    config = DecoderConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_layers=1,
                           num_heads=2, num_kv_heads=1, head_dim=8)  # fmt: skip
    other = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))  # no weights needed
    with pytest.raises(ConfigError, match="vocabulary"):
        cascade_generate(other, large, PROMPTS, threshold=0.5)
    with pytest.raises(InputError, match="unknown confidence 'entropyy'") as err:
        cascade_generate(small, large, PROMPTS, threshold=0.5, confidence="entropyy")
    assert "entropy" in err.value.fix
    with pytest.raises(InputError, match="mode"):
        cascade_generate(small, large, PROMPTS, threshold=0.5, mode="all")
    for bad in (-0.1, float("nan")):
        with pytest.raises(InputError, match="threshold"):
            cascade_generate(small, large, PROMPTS, threshold=bad)
    with pytest.raises(InputError, match="one number"):
        cascade_generate(small, large, PROMPTS, threshold=[0.1, 0.2])
    with pytest.raises(InputError, match="threshold"):
        cascade_sweep(small, large, PROMPTS, [0.0, -1.0])
    with pytest.raises(JaxcombineError, match="max_new_tokens"):
        cascade_generate(small, large, PROMPTS, threshold=0.5, max_new_tokens=0)
