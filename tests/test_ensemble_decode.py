"""Stacked ensembles decoded in one jitted loop, against transformers models run
in a Python loop and combined step by step with the papers' formulas (numpy)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxcombine.decoding import generate, score
from jaxcombine.ensemble import (
    Combination,
    StackedForward,
    generate_ensemble,
    score_ensemble,
    stack_members,
)
from jaxcombine.errors import ConfigError
from jaxcombine.hf import load_model, load_tokenizer
from tests import hf_models


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Three tiny Llamas of one architecture (different seeds), saved by transformers."""
    root = tmp_path_factory.mktemp("members")
    return [
        hf_models.make_tiny_model(root / f"m{seed}", "llama_gqa", seed=seed) for seed in range(3)
    ]


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_rule(rule, logits, weights, alpha=0.1):
    """The combined log-distribution of member logits [N, V], float64."""
    log_p = np_log_softmax(logits.astype(np.float64))
    w = np.asarray(weights, np.float64)
    if rule == "linear":
        return np.log(np.einsum("n,nv->v", w / w.sum(), np.exp(log_p)))
    if rule == "loglinear":
        return np_log_softmax(np.einsum("n,nv->v", w, log_p))
    if rule == "logits":
        return np_log_softmax(np.einsum("n,nv->v", w, logits.astype(np.float64)))
    plausible = log_p[0] >= log_p[0].max() + np.log(alpha)
    return np_log_softmax(np.where(plausible, log_p[0] - log_p[1], -np.inf))


def reference_greedy(refs, prompt, rule, weights, steps, alpha=0.1):
    """transformers models in a Python loop, full prefix every step (DExperts' code)."""
    ids, dists = list(prompt), []
    for _ in range(steps):
        with torch.no_grad():
            logits = np.stack([r(torch.tensor([ids])).logits[0, -1].numpy() for r in refs])
        dist = reference_rule(rule, logits, weights, alpha)
        dists.append(dist)
        ids.append(int(np.argmax(dist)))
        if ids[-1] == hf_models.EOS:
            break
    return ids[len(prompt) :], np.stack(dists)


CASES = [
    ("linear", (0.5, 0.3, 0.2)),
    ("loglinear", (0.5, 0.3, 0.2)),
    ("logits", (1.0, 1.5, -1.5)),  # DExperts: base + alpha (expert - anti-expert)
    ("linear", (0.7, 0.3)),
    ("contrastive", (1.0, 1.0)),
]


@pytest.mark.parametrize("rule,weights", CASES)
def test_greedy_and_per_step_distributions_equal_the_reference(members, rule, weights):
    n = len(weights)
    refs = [hf_models.load_reference(p) for p in members[:n]]
    models = [load_model(p) for p in members[:n]]
    combination = Combination(rule, weights)
    prompt = [hf_models.BOS, 17, 42, 99, 7]
    steps = 12
    expected_tokens, expected_dists = reference_greedy(refs, prompt, rule, weights, steps)
    ours = generate_ensemble(models, [prompt], combination, max_new_tokens=steps)[0]
    assert ours == expected_tokens
    # Per-step distributions: the stacked forward over the reference's sequence.
    graphdef, params = stack_members(models)
    sequence = jnp.asarray([prompt + expected_tokens])
    dists, _ = StackedForward(graphdef, combination)(
        params, sequence, jnp.ones(sequence.shape, bool), None
    )
    got = np.asarray(dists[0, len(prompt) - 1 : len(prompt) - 1 + len(expected_dists)])
    finite = np.isfinite(expected_dists)
    assert np.array_equal(finite, np.isfinite(got))
    np.testing.assert_allclose(got[finite], expected_dists[finite], atol=1e-5)


def test_left_padded_batch_equals_each_prompt_alone(members):
    models = [load_model(p) for p in members]
    combination = Combination("loglinear", (0.4, 0.4, 0.2))
    prompts = [[hf_models.BOS, 5, 6, 7, 8, 9, 10], [hf_models.BOS, 40], [hf_models.BOS, 3, 90]]
    together = generate_ensemble(models, prompts, combination, max_new_tokens=10)
    for prompt, row in zip(prompts, together, strict=True):
        assert generate_ensemble(models, [prompt], combination, max_new_tokens=10)[0] == row


def test_one_member_is_the_model_itself(members):
    model = load_model(members[0])
    prompts = [[hf_models.BOS, 11, 12], [hf_models.BOS, 70, 71, 72, 73]]
    for rule in ("linear", "loglinear", "logits"):
        ours = generate_ensemble([model], prompts, Combination(rule), max_new_tokens=12)
        assert ours == generate(model, prompts, max_new_tokens=12)


def test_stacked_members_equal_members_one_by_one(members):
    models = [load_model(p) for p in members]
    graphdef, params = stack_members(models)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, hf_models.VOCAB, (2, 9)))
    logits, _ = StackedForward(graphdef, Combination()).members(
        params, tokens, jnp.ones(tokens.shape, bool), None
    )
    for i, model in enumerate(models):
        np.testing.assert_allclose(logits[i], model(tokens).logits, atol=1e-5)


def test_bad_members(members, tiny_models):
    models = [load_model(p) for p in members[:2]]
    with pytest.raises(ConfigError, match="3 weights for 2 members"):
        generate_ensemble(models, [[1, 2]], Combination("linear", (0.2, 0.3, 0.5)))
    other = load_model(tiny_models["mistral"])
    with pytest.raises(ConfigError, match="member 1 has a different architecture"):
        generate_ensemble([models[0], other], [[1, 2]])


def run_cli(argv, capsys):
    import json

    from jaxcombine import cli

    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_cli_generate_with_several_models(members, capsys):
    argv = ["generate", "--prompt-ids", "1,17,42", "--max-new-tokens", "8", "--json"]
    for path in members[:2]:
        argv += ["--model", str(path)]
    code, out = run_cli(argv + ["--combine", "loglinear", "--weights", "0.7,0.3"], capsys)
    assert code == 0
    models = [load_model(p) for p in members[:2]]
    expected = generate_ensemble(
        models, [[1, 17, 42]], Combination("loglinear", (0.7, 0.3)), max_new_tokens=8
    )
    assert out["tokens"] == expected


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--weights", "0.5,0.3,0.2"], "3 weights for 2 members"),
        (["--weights", "1,-1"], "non-negative"),
        (["--weights", "a,b"], "cannot parse weights"),
        (["--combine", "contrastive", "--alpha", "2"], r"\[0, 1\]"),
    ],
)
def test_cli_bad_ensembles_fail_before_loading(members, capsys, monkeypatch, extra, message):
    import re

    from jaxcombine import hf

    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    argv = ["generate", "--prompt-ids", "1,2", "--model", str(members[0])]
    code, err = run_cli(argv + ["--model", str(members[1])] + extra, capsys)
    assert code == 2 and re.search(message, err)


def reference_ensemble_nll(refs, ids, rule, weights, window):
    """Summed NLL and count: transformers models run window by window, combined per
    position with the numpy rule."""
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            logits = np.stack([r(torch.tensor([chunk])).logits[0].numpy() for r in refs])
        for t in range(len(chunk) - 1):
            total -= reference_rule(rule, logits[:, t], weights)[chunk[t + 1]]
            count += 1
    return total, count


@pytest.mark.parametrize(
    "rule,weights", [("linear", (0.6, 0.4)), ("loglinear", (0.5, 0.3, 0.2)), ("linear", None)]
)
def test_cli_score_of_an_ensemble_equals_the_reference_nll(
    members, tmp_path, capsys, rule, weights
):
    n = 2 if weights is None else len(weights)
    text = " ".join(hf_models.CORPUS * 2)  # several context windows of 64 tokens
    text_file = tmp_path / "t.txt"
    text_file.write_text(text)
    ids = load_tokenizer(members[0]).encode(text).ids
    refs = [hf_models.load_reference(p) for p in members[:n]]
    total, count = reference_ensemble_nll(refs, ids, rule, weights or (1 / n,) * n, window=64)
    argv = ["score", "--text-file", str(text_file), "--combine", rule, "--json"]
    for path in members[:n]:
        argv += ["--model", str(path)]
    if weights:
        argv += ["--weights", ",".join(map(str, weights))]
    code, result = run_cli(argv, capsys)
    assert code == 0, result
    assert result["predicted_tokens"] == count and count > 64
    assert abs(result["nll"] - total / count) <= 1e-5 * (total / count)
    # The library call agrees, and a one-member "ensemble" scores as the model.
    models = [load_model(p) for p in members[:n]]
    ensemble = score_ensemble(models, ids, Combination(rule, weights), window=64)
    assert ensemble.count == count and ensemble.nll == pytest.approx(total / count, rel=1e-5)
    alone = score_ensemble(models[:1], ids, Combination(rule), window=64)
    assert alone.nll == pytest.approx(score(models[0], ids, window=64).nll, rel=1e-6)


def test_cli_score_bad_weights_fail_before_loading(members, tmp_path, capsys, monkeypatch):
    from jaxcombine import hf

    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox.")
    argv = ["score", "--model", str(members[0]), "--model", str(members[1])]
    code, err = run_cli(argv + ["--text-file", str(text), "--weights", "1,2,3"], capsys)
    assert code == 2 and "3 weights for 2 members" in err


def test_cli_members_of_different_architectures(members, tiny_models, tmp_path, capsys):
    """Llama + Mistral: generate and score equal transformers in a Python loop."""
    paths = [members[0], tiny_models["mistral"]]
    refs = [hf_models.load_reference(p) for p in paths]
    prompt = [hf_models.BOS, 17, 42, 99, 7]
    expected, _ = reference_greedy(refs, prompt, "linear", (0.7, 0.3), 8)
    argv = ["generate", "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", "8"]
    argv += ["--model", str(paths[0]), "--model", str(paths[1]), "--weights", "0.7,0.3", "--json"]
    code, result = run_cli(argv, capsys)
    assert code == 0, result
    assert result["tokens"] == [expected]
    text = tmp_path / "t.txt"
    text.write_text(" ".join(hf_models.CORPUS))
    ids = load_tokenizer(paths[0]).encode(text.read_text()).ids
    total, count = reference_ensemble_nll(refs, ids, "loglinear", (0.5, 0.5), window=64)
    argv = ["score", "--text-file", str(text), "--combine", "loglinear", "--json"]
    code, result = run_cli(argv + ["--model", str(paths[0]), "--model", str(paths[1])], capsys)
    assert code == 0, result
    assert result["nll"] == pytest.approx(total / count, rel=1e-5)
