"""General ensembles (jaxcombine.ensemble.ensemble): members of different
architectures, vocabularies mapped by token string, a running Bayesian
posterior, a learned gate and MC-dropout members, against transformers models
run in a Python loop (or the jaxcombine model run member by member) with the
rules in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxcombine.decoding import (
    DecoderForward,
    generate,
    prefill_prefix,
    speculative_generate,
)
from jaxcombine.ensemble import Combination, Gate, MCDropout, ensemble, generate_ensemble
from jaxcombine.errors import ConfigError, InputError
from jaxcombine.hf import load_model
from jaxcombine.models import Decoder, init_cache
from tests import hf_models
from tests.test_ensemble_decode import np_log_softmax, reference_greedy, reference_rule

PROMPT = [hf_models.BOS, 17, 42, 99, 7]


@pytest.fixture(scope="module")
def refs(tiny_models):
    return {k: hf_models.load_reference(tiny_models[k]) for k in ("llama_gqa", "mistral", "qwen2")}


@pytest.fixture(scope="module")
def models(tiny_models):
    return {k: load_model(tiny_models[k]) for k in ("llama_gqa", "mistral", "qwen2")}


def ref_logits(refs, ids):
    with torch.no_grad():
        return np.stack([r(torch.tensor([ids])).logits[0].numpy() for r in refs])  # [N, T, V]


def per_step(decodable, ids, start, steps):
    """The ensemble's log-distributions for the positions predicting ids[start:]."""
    tokens = jnp.asarray([ids])
    out, _ = decodable.forward(decodable.params, tokens, jnp.ones(tokens.shape, bool), None)
    return np.asarray(out[0, start - 1 : start - 1 + steps])


def assert_dists(got, expected, atol=1e-5):
    finite = np.isfinite(expected)
    assert np.array_equal(finite, np.isfinite(got))
    np.testing.assert_allclose(got[finite], expected[finite], atol=atol)


@pytest.mark.parametrize(
    "rule,weights", [("linear", (0.5, 0.3, 0.2)), ("loglinear", (1.0, 0.5, -0.5))]
)
def test_members_of_three_architectures(refs, models, rule, weights):
    kinds = ("llama_gqa", "mistral", "qwen2")
    expected, dists = reference_greedy([refs[k] for k in kinds], PROMPT, rule, weights, 10)
    ens = ensemble([models[k] for k in kinds], Combination(rule, weights))
    assert len(ens.forward.groups) == 3
    assert generate(ens, [PROMPT], max_new_tokens=10)[0] == expected
    assert_dists(per_step(ens, PROMPT + expected, len(PROMPT), len(dists)), dists)


def permuted_member(model, keep):
    """``model`` relabelled: its token ``keep[j]`` becomes id j; others dropped."""
    config = model.config.replace(vocab_size=len(keep))
    state = nnx.to_pure_dict(nnx.state(model))
    state["embed_tokens"]["embedding"] = state["embed_tokens"]["embedding"][keep]
    state["lm_head"]["kernel"] = state["lm_head"]["kernel"][:, keep]
    member = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    abstract = nnx.state(member)
    nnx.replace_by_pure_dict(abstract, state)
    nnx.update(member, abstract)
    return member


@pytest.mark.parametrize("rule", ["linear", "logits"])
def test_vocabularies_mapped_by_token_string(refs, models, rule):
    V = hf_models.VOCAB
    rng = np.random.default_rng(0)
    dropped = set(rng.choice(np.arange(3, V), size=40, replace=False).tolist()) - set(PROMPT)
    keep = rng.permutation([i for i in range(V) if i not in dropped])
    shared = np.isin(np.arange(V), keep)
    first_vocab = {f"tok{i}": i for i in range(V)}
    other_vocab = {f"tok{int(old)}": new for new, old in enumerate(keep)}
    other = permuted_member(models["mistral"], keep)
    weights = (0.6, 0.4)
    ens = ensemble(
        [models["llama_gqa"], other], Combination(rule, weights),
        vocabularies=[first_vocab, other_vocab],
    )  # fmt: skip
    # Reference: both transformers models, distributions restricted to the shared tokens.
    ids, dists = list(PROMPT), []
    for _ in range(10):
        z = ref_logits([refs["llama_gqa"], refs["mistral"]], ids)[:, -1].astype(np.float64)
        z = np.where(shared, z, -1e9)  # each member renormalised over the shared tokens
        dist = np_log_softmax(np.where(shared, reference_rule(rule, z, weights), -np.inf))
        dists.append(dist)
        ids.append(int(np.argmax(dist)))
    expected = ids[len(PROMPT) :]
    assert generate(ens, [PROMPT], max_new_tokens=10, eos_token_ids=())[0] == expected
    assert all(t not in dropped for t in expected)
    assert_dists(per_step(ens, ids, len(PROMPT), 10), np.stack(dists))
    with pytest.raises(InputError, match="not in every member's vocabulary"):
        generate(ens, [PROMPT + [sorted(dropped)[0]]])


def test_posterior_coefficients_follow_the_prefix_likelihood(refs, models, tmp_path):
    kinds = ("llama_gqa", "mistral")
    prior = (0.7, 0.3)
    ens = ensemble(
        [models[k] for k in kinds], Combination("linear", prior), coefficients="posterior"
    )
    ids, dists, weights_seen = list(PROMPT), [], []
    for _ in range(10):
        logits = ref_logits([refs[k] for k in kinds], ids).astype(np.float64)  # [N, T, V]
        log_p = np_log_softmax(logits)
        evidence = np.array(
            [sum(log_p[i, s - 1, ids[s]] for s in range(1, len(ids))) for i in range(2)]
        )
        w = np.log(prior) + evidence
        w = np.exp(w - w.max())
        w = w / w.sum()
        weights_seen.append(w)
        dist = reference_rule("linear", logits[:, -1], w)
        dists.append(dist)
        ids.append(int(np.argmax(dist)))
    expected = ids[len(PROMPT) :]
    assert max(abs(w[0] - prior[0]) for w in weights_seen) > 0.05  # the weights did move
    prompts = [PROMPT, [hf_models.BOS, 3, 90]]
    got = generate(ens, prompts, max_new_tokens=10, eos_token_ids=())
    assert got[0] == expected
    assert got[1] == generate(ens, prompts[1:], max_new_tokens=10, eos_token_ids=())[0]
    assert_dists(per_step(ens, ids, len(PROMPT), 10), np.stack(dists), atol=1e-4)
    # The evidence is part of the prefix state: reuse equals from scratch.
    state = prefill_prefix(ens, PROMPT[:3])
    assert generate(ens, [PROMPT[3:]], prefix=state, max_new_tokens=10, eos_token_ids=()) == [
        expected
    ]
    with pytest.raises(ConfigError, match="posterior"):
        speculative_generate(ens, models["llama_gqa"], [PROMPT], max_new_tokens=4)


def test_a_gate_weights_every_step(models):
    members = [models["llama_gqa"], models["mistral"]]
    gate = Gate(2, members[0].config.hidden_size, rngs=nnx.Rngs(3))
    # A new gate is the uniform ensemble (zero output layer); give it weights
    # that vary with the hidden states, as a trained gate's do.
    gate.out.kernel[...] = jax.random.normal(jax.random.key(3), gate.out.kernel[...].shape)
    ens = ensemble(members, Combination("linear"), coefficients=gate)
    out = generate(ens, [PROMPT], max_new_tokens=8, eos_token_ids=())[0]
    # Reference: each member run alone (jaxcombine, full sequence), the gate on
    # their hidden states, the linear rule in numpy.
    ids = PROMPT + out
    tokens = jnp.asarray([ids])
    outs = [m(tokens) for m in members]
    hidden = jnp.stack([o.hidden for o in outs])  # [2, 1, T, E]
    w = np.asarray(gate(hidden))[:, 0]  # [2, T]
    logits = np.stack([np.asarray(o.logits[0]) for o in outs])
    expected = [
        reference_rule("linear", logits[:, t], w[:, t])
        for t in range(len(PROMPT) - 1, len(ids) - 1)
    ]
    assert [int(np.argmax(d)) for d in expected] == out
    assert_dists(per_step(ens, ids, len(PROMPT), len(out)), np.stack(expected))
    assert np.ptp(w[0]) > 1e-3  # per-step, not constant


def test_mc_dropout_members_equal_a_loop_over_members(models):
    model = models["llama_gqa"]
    samples, rate, seed, steps = 3, 0.2, 5, 8
    ens = ensemble([MCDropout(model, samples, rate)], seed=seed)
    out = generate(ens, [PROMPT], max_new_tokens=steps, eos_token_ids=())[0]
    # Reference: each sample its own model copy and cache, stepped one by one with
    # the documented keys split(fold_in(key(seed), call), samples)[k].
    dropout_model = nnx.merge(*nnx.split(model))
    dropout_model.config = model.config.replace(dropout_rate=rate)
    forward = DecoderForward(nnx.split(dropout_model)[0])
    params = nnx.split(dropout_model)[1]
    caches = [init_cache(model.config, 1, 16 + steps) for _ in range(samples)]
    expected = []
    tokens = jnp.asarray([[0] * (16 - len(PROMPT)) + PROMPT])  # left-padded as generate does
    mask = jnp.asarray([[False] * (16 - len(PROMPT)) + [True] * len(PROMPT)])
    for call in range(steps):
        keys = jax.random.split(jax.random.fold_in(jax.random.key(seed), call), samples)
        step_logits = []
        for k in range(samples):
            o = forward.outputs(params, tokens, mask, caches[k], True, dropout_key=keys[k])
            caches[k] = o.cache
            step_logits.append(np.asarray(o.logits[0, -1]))
        uniform = [1 / samples] * samples
        token = int(np.argmax(reference_rule("linear", np.stack(step_logits), uniform)))
        expected.append(token)
        tokens, mask = jnp.asarray([[token]]), jnp.ones((1, 1), bool)
    assert out == expected
    plain = generate(model, [PROMPT], max_new_tokens=steps, eos_token_ids=())[0]
    other_seed = generate(
        ensemble([MCDropout(model, samples, rate)], seed=seed + 1),
        [PROMPT],
        max_new_tokens=steps,
        eos_token_ids=(),
    )[0]
    assert out != plain or other_seed != plain  # dropout is on


def test_one_architecture_is_the_stacked_fast_path(models, tmp_path):
    members = [
        load_model(hf_models.make_tiny_model(tmp_path / f"m{s}", "llama_gqa", seed=s))
        for s in range(2)
    ]
    combination = Combination("loglinear", (0.6, 0.4))
    ens = ensemble(members, combination)
    assert len(ens.forward.groups) == 1
    assert generate(ens, [PROMPT], max_new_tokens=10) == generate_ensemble(
        members, [PROMPT], combination, max_new_tokens=10
    )


def test_bad_ensembles(models):
    a, b = models["llama_gqa"], models["mistral"]
    with pytest.raises(ConfigError, match="3 weights for 2 members"):
        ensemble([a, b], Combination("linear", (0.2, 0.3, 0.5)))
    small = permuted_member(b, np.arange(100))
    with pytest.raises(ConfigError, match="different sizes"):
        ensemble([a, small])
    vocab = {f"tok{i}": i for i in range(hf_models.VOCAB)}
    with pytest.raises(ConfigError, match="min_shared"):
        ensemble([a, small], vocabularies=[vocab, {f"tok{i}": i for i in range(100)}])
    with pytest.raises(ConfigError, match="gate"):
        ensemble([a, b], coefficients=Gate(3, a.config.hidden_size, rngs=nnx.Rngs(0)))
    with pytest.raises(ConfigError, match="unknown coefficients"):
        ensemble([a, b], coefficients="bayes")
    with pytest.raises(ConfigError, match="contrastive"):
        ensemble([a, b], Combination("contrastive"), coefficients="posterior")
    with pytest.raises(ConfigError, match="MC dropout"):
        ensemble([MCDropout(a, 4)])  # the checkpoint's dropout is 0
    with pytest.raises(ConfigError, match="no members"):
        ensemble([])
