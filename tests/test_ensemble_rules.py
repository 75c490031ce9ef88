"""Combination rules against float64 numpy written from the papers' formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcombine.ensemble import Combination, contrastive, linear, logit_arithmetic, loglinear
from jaxcombine.errors import ConfigError

N, B, V = 3, 4, 11


def member_logits(seed=0, scale=3.0):
    return np.random.default_rng(seed).normal(size=(N, B, V)) * scale


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_softmax(z):
    return np.exp(np_log_softmax(z))


W = np.array([0.5, 0.3, 0.2])


def test_linear_is_the_mixture_of_probabilities():
    z = member_logits()
    expected = np.log(np.einsum("n,nbv->bv", W, np_softmax(z)))
    np.testing.assert_allclose(linear(jnp.asarray(z), W), expected, atol=1e-5)
    # Weights are normalised: scaling them changes nothing.
    np.testing.assert_allclose(linear(jnp.asarray(z), 4 * W), expected, atol=1e-5)


def test_linear_in_log_space_does_not_underflow():
    z = np.zeros((2, 1, 3))
    z[0, 0] = [0.0, -200.0, -200.0]  # p = e^-200 for tokens 1 and 2: 0 in float32
    z[1, 0] = [0.0, -300.0, 0.0]
    out = np.asarray(linear(jnp.asarray(z), np.array([0.5, 0.5])))
    assert np.all(np.isfinite(out))
    np.testing.assert_allclose(out[0, 1], np.log(0.5) - 200.0, rtol=1e-5)


def test_loglinear_is_the_normalised_product():
    z = member_logits(1)
    expected = np_log_softmax(np.einsum("n,nbv->bv", W, np_log_softmax(z)))
    np.testing.assert_allclose(loglinear(jnp.asarray(z), W), expected, atol=1e-5)


def test_logit_arithmetic_is_dexperts():
    """DExperts: z_base + alpha (z_expert - z_anti), weights (1, alpha, -alpha)."""
    z = member_logits(2)
    alpha = 2.0
    expected = np_log_softmax(z[0] + alpha * (z[1] - z[2]))
    combined = logit_arithmetic(jnp.asarray(z), np.array([1.0, alpha, -alpha]))
    np.testing.assert_allclose(combined, expected, atol=1e-5)


def test_contrastive_decoding():
    z = member_logits(3)
    alpha = 0.1
    log_e, log_a = np_log_softmax(z[0]), np_log_softmax(z[1])
    plausible = np_softmax(z[0]) >= alpha * np_softmax(z[0]).max(axis=-1, keepdims=True)
    out = np.asarray(contrastive(jnp.asarray(z[0]), jnp.asarray(z[1]), alpha))
    assert np.all(np.isneginf(out[~plausible]))
    scores = np.where(plausible, log_e - log_a, -np.inf)
    np.testing.assert_allclose(out[plausible], np_log_softmax(scores)[plausible], atol=1e-5)
    # The greedy token is the best expert-minus-amateur score among plausible tokens.
    np.testing.assert_array_equal(out.argmax(-1), scores.argmax(-1))


@pytest.mark.parametrize("rule", ["linear", "loglinear", "logits"])
def test_one_member_is_the_model_itself(rule):
    z = member_logits(4)[:1]
    out = Combination(rule)(jnp.asarray(z))
    np.testing.assert_allclose(out, np_log_softmax(z[0]), atol=1e-5)


@pytest.mark.parametrize("rule", ["linear", "loglinear", "logits"])
def test_per_row_weights_equal_row_by_row(rule):
    z = jnp.asarray(member_logits(5))
    rows = np.random.default_rng(6).dirichlet(np.ones(N), size=B).T  # [N, B]
    combination = Combination(rule)
    together = combination(z, jnp.asarray(rows))
    for b in range(B):
        alone = combination(z[:, b : b + 1], jnp.asarray(rows[:, b]))
        np.testing.assert_allclose(together[b], alone[0], atol=1e-6)


def test_rules_are_jittable_and_differentiable():
    z = jnp.asarray(member_logits(7))
    for rule in ("linear", "loglinear", "logits"):
        combination = Combination(rule)
        grad = jax.jit(jax.grad(lambda w, c=combination: c(z, w)[:, 0].sum()))(jnp.asarray(W))
        assert grad.shape == (N,) and bool(jnp.all(jnp.isfinite(grad)))


def test_bad_combinations():
    with pytest.raises(ConfigError, match="unknown combination rule 'mean'"):
        Combination("mean")
    with pytest.raises(ConfigError, match="2 weights for 3 members"):
        Combination("linear", (0.5, 0.5))(jnp.asarray(member_logits()))
    with pytest.raises(ConfigError, match="non-negative"):
        Combination("linear", (1.0, -0.5))
    with pytest.raises(ConfigError, match="two members"):
        Combination("contrastive")(jnp.asarray(member_logits()))
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        Combination("contrastive", alpha=1.5)
