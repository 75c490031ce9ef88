"""Sampling filters against transformers' logits processors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jaxcombine.decoding import Sampling, filter_logits, sample_tokens
from jaxcombine.errors import InputError


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.9), (0.9, 20, 0.5), (2.0, 3, 0.3)],
)
def test_filters_match_transformers_warpers(temperature, top_k, top_p):
    logits = np.random.RandomState(0).randn(4, 64).astype(np.float32) * 3
    scores = torch.tensor(logits)
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = scores.numpy()
    ours = np.asarray(filter_logits(jnp.asarray(logits), Sampling(temperature, top_k, top_p)))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected))
    finite = ~np.isinf(expected)
    np.testing.assert_allclose(ours[finite], expected[finite], rtol=1e-6)


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    sampling = Sampling(temperature=1.0, top_p=0.8)  # keeps {0, 1}, renormalised 5/8, 3/8
    keys = jax.random.split(jax.random.key(0), 4000)
    draws = np.asarray(jax.vmap(lambda k: sample_tokens(logits, k, sampling))(keys))[:, 0]
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.625) < 0.03


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
    ],
)
def test_bad_sampling_options(kwargs, match):
    with pytest.raises(InputError, match=match):
        Sampling(**kwargs)
