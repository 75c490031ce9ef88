"""Speculative decoding: greedy output equals the target's greedy output (one
model, an ensemble), sampled output follows the target's distribution."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcombine.decoding import (
    Sampling,
    filter_logits,
    generate,
    layer_skip_draft,
    speculative_generate,
)
from jaxcombine.ensemble import Combination, generate_ensemble, stacked
from jaxcombine.errors import ConfigError, InputError
from jaxcombine.hf import load_model
from jaxcombine.models import Decoder, DecoderConfig
from tests import hf_models

PROMPTS = [[hf_models.BOS, 17, 42, 99, 7], [hf_models.BOS, 3], [hf_models.BOS, 120, 33, 8, 250, 61]]


@pytest.fixture(scope="module")
def target(tiny_models):
    return load_model(tiny_models["llama_gqa"])


@pytest.mark.parametrize("num_draft_tokens", [1, 3, 6])
def test_greedy_equals_the_target_alone(target, tiny_models, num_draft_tokens):
    expected = generate(target, PROMPTS, max_new_tokens=24, eos_token_ids=())
    drafts = {
        "layer skip": layer_skip_draft(target, 1),
        "other model": load_model(tiny_models["llama_tied_llama3"]),
        "itself": target,
    }
    for name, draft in drafts.items():
        out = speculative_generate(
            target, draft, PROMPTS, num_draft_tokens=num_draft_tokens, max_new_tokens=24,
            eos_token_ids=(),
        )  # fmt: skip
        assert out.tokens == expected, name
        assert len(out.tokens[0]) == 24
        if name == "itself":  # every proposal accepted: g + 1 tokens per call
            assert out.accepted == out.target_calls * num_draft_tokens * len(PROMPTS)
            assert out.tokens_per_call == pytest.approx(23 / out.target_calls)
            assert out.target_calls == -(-23 // (num_draft_tokens + 1))


def test_greedy_stops_at_eos_like_the_target(target):
    free = generate(target, PROMPTS, max_new_tokens=16, eos_token_ids=())
    eos = (free[0][5], free[2][3])  # tokens the rows reach at different steps
    expected = generate(target, PROMPTS, max_new_tokens=16, eos_token_ids=eos)
    assert any(len(row) < 16 for row in expected)
    out = speculative_generate(
        target, layer_skip_draft(target, 1), PROMPTS, num_draft_tokens=4, max_new_tokens=16,
        eos_token_ids=eos,
    )  # fmt: skip
    assert out.tokens == expected


def test_an_ensemble_target_verifies_a_members_proposals(tmp_path):
    members = [
        load_model(hf_models.make_tiny_model(tmp_path / f"m{s}", "llama_gqa", seed=s))
        for s in range(2)
    ]
    combination = Combination("loglinear", (0.6, 0.4))
    expected = generate_ensemble(members, PROMPTS, combination, max_new_tokens=20, eos_token_ids=())
    out = speculative_generate(
        stacked(members, combination), members[0], PROMPTS, num_draft_tokens=3,
        max_new_tokens=20, eos_token_ids=(),
    )  # fmt: skip
    assert out.tokens == expected


def tiny(vocab, layers, seed):
    config = DecoderConfig(
        vocab_size=vocab, hidden_size=16, intermediate_size=32, num_layers=layers,
        num_heads=2, num_kv_heads=1, head_dim=8, max_position_embeddings=64,
    )  # fmt: skip
    model = Decoder(config, rngs=nnx.Rngs(seed))
    # Larger embeddings so the distributions are far from uniform.
    model.embed_tokens.embedding[...] = model.embed_tokens.embedding[...] * 60
    return model


def test_sampling_follows_the_targets_distribution():
    """The first two sampled tokens over many rows vs the exact target probabilities
    p(a) p(b | a), with a draft whose distribution is different."""
    target, draft = tiny(6, 2, 0), tiny(6, 1, 1)
    sampling = Sampling(temperature=1.0)
    prompt = [1, 4, 2]
    rows = 6000
    out = speculative_generate(
        target, draft, [prompt] * rows, num_draft_tokens=2, max_new_tokens=2,
        sampling=sampling, eos_token_ids=(), seed=7,
    )  # fmt: skip
    pairs = np.zeros((6, 6))
    for a, b in out.tokens:
        pairs[a, b] += 1
    exact = np.zeros((6, 6))
    first = jax.nn.softmax(filter_logits(target(jnp.asarray([prompt])).logits[:, -1], sampling))
    for a, b in itertools.product(range(6), range(6)):
        logits = target(jnp.asarray([prompt + [a]])).logits[:, -1]
        exact[a, b] = first[0, a] * jax.nn.softmax(filter_logits(logits, sampling))[0, b]
    assert exact.max() < 0.9  # not degenerate
    np.testing.assert_allclose(pairs / rows, exact, atol=0.025)
    assert 0 < out.accepted < rows * 2  # some proposals rejected, some accepted


def test_bad_drafts_and_settings(target, tiny_models):
    with pytest.raises(ConfigError, match="vocabulary"):
        speculative_generate(target, tiny(6, 1, 0), PROMPTS)
    with pytest.raises(InputError, match="num_draft_tokens"):
        speculative_generate(target, target, PROMPTS, num_draft_tokens=0)
    with pytest.raises(InputError, match="prompt is empty"):
        speculative_generate(target, target, [[]])
    with pytest.raises(InputError, match="keeps 1 to"):
        layer_skip_draft(target, target.config.num_layers)


def test_sliding_window_batches_are_refused_single_prompts_work(tiny_models):
    model = load_model(tiny_models["mistral"])
    draft = layer_skip_draft(model, 1)
    expected = generate(model, PROMPTS[:1], max_new_tokens=20, eos_token_ids=())
    out = speculative_generate(model, draft, PROMPTS[:1], max_new_tokens=20, eos_token_ids=())
    assert out.tokens == expected
    with pytest.raises(ConfigError, match="sliding-window"):
        speculative_generate(model, draft, PROMPTS, max_new_tokens=4)
