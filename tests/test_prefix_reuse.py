"""Prefix-state reuse: requests started from a prefilled prefix (in memory or
loaded from disk) equal prefilling prefix + prompt from scratch."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcombine.decoding import (
    Decodable,
    Sampling,
    bucket_length,
    generate,
    left_pad,
    load_prefix,
    prefill,
    prefill_prefix,
    save_prefix,
    start_from_prefix,
)
from jaxcombine.ensemble import Combination, generate_ensemble, stacked
from jaxcombine.errors import ConfigError, InputError
from jaxcombine.hf import load_model
from tests import hf_models

PREFIX = [hf_models.BOS, 11, 23, 5, 87, 140, 9, 31, 64, 102, 77, 18, 45, 200, 3, 56, 19]
PROMPTS = [[17, 42, 99], [7], [], [120, 33, 8, 250, 61, 12, 90, 4, 38]]


@pytest.fixture(scope="module")
def models(tiny_models):
    return {kind: load_model(tiny_models[kind]) for kind in ("llama_gqa", "mixtral")}


@pytest.mark.parametrize("kind", ["llama_gqa", "mixtral"])
def test_prefix_reuse_equals_prefilling_from_scratch(models, kind):
    model = models[kind]
    state = prefill_prefix(model, PREFIX)
    reused = generate(model, PROMPTS, prefix=state, max_new_tokens=10, eos_token_ids=())
    scratch = generate(model, [PREFIX + p for p in PROMPTS], max_new_tokens=10, eos_token_ids=())
    assert reused == scratch
    # The first next-token logits of every row, against the full prompt prefilled alone.
    decodable = Decodable.of(model)
    first, _ = start_from_prefix(decodable, state, PROMPTS, 0, slots=4)
    for row, prompt in enumerate(PROMPTS):
        full = PREFIX + prompt
        tokens, mask = left_pad([full], bucket_length(len(full)), 0)
        expected, _ = prefill(
            decodable.forward, decodable.params, jnp.asarray(tokens), jnp.asarray(mask),
            decodable.init_cache(1, tokens.shape[1]),
        )  # fmt: skip
        np.testing.assert_allclose(first[row], expected[0], atol=2e-5, rtol=2e-5)


def test_sampling_from_a_prefix_equals_sampling_from_scratch(models):
    model = models["llama_gqa"]
    sampling = Sampling(temperature=0.9, top_k=20)
    state = prefill_prefix(model, PREFIX)
    options = dict(max_new_tokens=8, sampling=sampling, seed=3, eos_token_ids=())
    reused = generate(model, PROMPTS[:2], prefix=state, **options)
    assert reused == generate(model, [PREFIX + p for p in PROMPTS[:2]], **options)


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_members")
    return [
        load_model(hf_models.make_tiny_model(root / f"m{seed}", "llama_gqa", seed=seed))
        for seed in range(2)
    ]


@pytest.mark.parametrize("rule", ["linear", "loglinear"])
def test_ensemble_prefix_reuse_equals_from_scratch(members, rule):
    combination = Combination(rule, (0.7, 0.3))
    state = prefill_prefix(stacked(members, combination), PREFIX)
    options = dict(max_new_tokens=10, eos_token_ids=())
    reused = generate_ensemble(members, PROMPTS, combination, prefix=state, **options)
    scratch = generate_ensemble(members, [PREFIX + p for p in PROMPTS], combination, **options)
    assert reused == scratch


def test_saved_prefix_state_loads_and_equals_the_in_memory_one(models, members, tmp_path):
    model = models["llama_gqa"]
    state = prefill_prefix(model, PREFIX)
    path = save_prefix(state, tmp_path / "system")
    loaded = load_prefix(path, model)
    assert loaded.tokens == tuple(PREFIX)
    np.testing.assert_array_equal(loaded.logits, state.logits)
    for a, b in zip(loaded.cache.keys, state.cache.keys, strict=True):
        np.testing.assert_array_equal(a, b)
    options = dict(max_new_tokens=10, eos_token_ids=())
    assert generate(model, PROMPTS, prefix=loaded, **options) == generate(
        model, [PREFIX + p for p in PROMPTS], **options
    )
    # An ensemble's state round-trips too.
    ensemble = stacked(members, Combination("linear"))
    ens_path = save_prefix(prefill_prefix(ensemble, PREFIX), tmp_path / "ens")
    ens_state = load_prefix(ens_path, ensemble)
    assert generate_ensemble(members, PROMPTS, prefix=ens_state, **options) == generate_ensemble(
        members, [PREFIX + p for p in PROMPTS], **options
    )


def test_prefix_errors(models, members, tmp_path):
    model = models["llama_gqa"]
    state = prefill_prefix(model, PREFIX)
    with pytest.raises(InputError, match="different model"):
        generate(members[1], PROMPTS, prefix=state)
    with pytest.raises(InputError, match="different model"):
        generate(stacked(members[:1], Combination("loglinear")), PROMPTS, prefix=state)
    context = model.config.max_position_embeddings
    with pytest.raises(InputError, match="exceed the model's context"):
        generate(model, [[5] * (context - len(PREFIX))], prefix=state, max_new_tokens=4)
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(model, [[model.config.vocab_size]], prefix=state)
    with pytest.raises(InputError, match="prompt is empty"):
        prefill_prefix(model, [])
    path = save_prefix(state, tmp_path / "p")
    with pytest.raises(InputError, match="already exists"):
        save_prefix(state, path)
    with pytest.raises(InputError, match="different model"):
        load_prefix(path, members[1])
    with pytest.raises(InputError, match="not a saved prefix state"):
        load_prefix(tmp_path, model)


def test_sliding_window_prefix_reuse_has_no_gaps(tiny_models):
    model = load_model(tiny_models["mistral"])  # sliding window 8, shorter than the prefix
    assert model.config.sliding_window < len(PREFIX)
    state = prefill_prefix(model, PREFIX)
    prompts = [[17, 42, 99], [120, 33, 8]]  # one length: no padding between prefix and prompt
    options = dict(max_new_tokens=10, eos_token_ids=())
    reused = generate(model, prompts, prefix=state, **options)
    assert reused == generate(model, [PREFIX + p for p in prompts], **options)
    with pytest.raises(ConfigError, match="sliding-window"):
        generate(model, [[17, 42, 99], [7]], prefix=state, **options)
