"""Section 4 of the tour (alignment) against plain loops: the loss barrier, the stacked
interpolation paths and their distances, the classifier scores of stacked MLPs
(a numpy forward pass per model), the Gaussian-mixture table, and the pairs of
an MLP family (weight matching keeps model B's function)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcombine import tree
from jaxcombine.errors import InputError
from jaxcombine.models import MLPClassifier
from jaxcombine.permute import mlp_classifier_spec
from jaxcombine.tour.run import TINY, Tour
from jaxcombine.tour.sections import alignment


def barrier_loop(alphas, losses):
    """max over i of L_i - ((1 - a_i) L_0 + a_i L_last), one point at a time."""
    best = -np.inf
    for a, loss in zip(alphas, losses, strict=True):
        best = max(best, loss - ((1 - a) * losses[0] + a * losses[-1]))
    return best


def test_loss_barrier_equals_a_loop():
    rng = np.random.default_rng(0)
    for k in (2, 3, 11, 21):
        alphas = np.concatenate([[0.0], np.sort(rng.uniform(size=k - 2)), [1.0]])
        for _ in range(5):
            losses = rng.normal(size=k) * 3
            assert alignment.loss_barrier(alphas, losses) == pytest.approx(
                barrier_loop(alphas, losses), abs=1e-12
            )
    # a convex path has no barrier; a bump of height h over a flat line has barrier h
    alphas = np.linspace(0, 1, 11)
    assert alignment.loss_barrier(alphas, (alphas - 0.3) ** 2) == 0.0
    assert alignment.loss_barrier(alphas, 2.0 + 0.7 * (alphas == 0.5)) == pytest.approx(0.7)
    with pytest.raises(InputError, match="from 0 to 1"):
        alignment.loss_barrier([0.1, 1.0], [1.0, 2.0])
    with pytest.raises(InputError, match="shape"):
        alignment.loss_barrier([0.0, 1.0], [1.0, 2.0, 3.0])


def test_share_removed():
    assert alignment.share_removed(2.0, 0.5) == pytest.approx(0.75)
    assert alignment.share_removed(2.0, 3.0) == pytest.approx(-0.5)  # matching made it worse
    assert np.isnan(alignment.share_removed(0.0, 0.0))


def random_tree(rng):
    return {"a": {"w": rng.normal(size=(3, 4))}, "b": rng.normal(size=(5,))}


def test_stacked_lines_are_the_lerps_of_each_pair_in_order():
    rng = np.random.default_rng(1)
    pairs = [(random_tree(rng), random_tree(rng)) for _ in range(3)]
    alphas = np.array([0.0, 0.25, 0.5, 1.0])
    stacked, distances = alignment._stacked_lines(pairs, jnp.asarray(alphas, jnp.float32))
    for p, (a, b) in enumerate(pairs):
        flat_a = np.concatenate([a["a"]["w"].ravel(), a["b"]])
        flat_b = np.concatenate([b["a"]["w"].ravel(), b["b"]])
        expected = np.linalg.norm(flat_b - flat_a) / np.linalg.norm(flat_a)
        np.testing.assert_allclose(distances[p], expected, rtol=1e-5)
        for i, t in enumerate(alphas):
            row = p * len(alphas) + i
            for got, x, y in ((stacked["a"]["w"][row], a["a"]["w"], b["a"]["w"]),
                              (stacked["b"][row], a["b"], b["b"])):  # fmt: skip
                np.testing.assert_allclose(got, (1 - t) * x + t * y, rtol=1e-5, atol=1e-6)


def numpy_mlp(params, x):
    """The MLPClassifier forward pass in float64 numpy."""
    h = x.astype(np.float64)
    for k in range(len(params["layers"])):
        layer = params["layers"][k]
        h = np.maximum(h @ np.asarray(layer["kernel"], np.float64) + layer["bias"], 0.0)
    return h @ np.asarray(params["head"]["kernel"], np.float64) + params["head"]["bias"]


def test_classifier_scores_equal_each_model_run_alone():
    models = [MLPClassifier(6, (9, 7), 4, rngs=nnx.Rngs(s)) for s in (3, 4, 5)]
    graphdef, _ = nnx.split(models[0], nnx.Param)
    stacked = tree.stack([nnx.state(m, nnx.Param) for m in models])
    data = alignment.gaussian_mixture_table(50, split=0, features=6, classes=4, clusters=2)
    losses, accuracy = alignment.classifier_scores(graphdef, stacked, data)
    for m, model in enumerate(models):
        logits = numpy_mlp(nnx.to_pure_dict(nnx.state(model, nnx.Param)), data.features)
        log_probs = logits - logits.max(-1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
        expected_loss = -np.mean(log_probs[np.arange(len(data.labels)), data.labels])
        expected_accuracy = np.mean(logits.argmax(-1) == data.labels)
        np.testing.assert_allclose(losses[m], expected_loss, rtol=1e-5)
        assert accuracy[m] == pytest.approx(expected_accuracy)


def test_gaussian_mixture_rows_are_centres_labelled_by_cluster():
    kwargs = dict(features=5, classes=3, clusters=2)
    clean = alignment.gaussian_mixture_table(200, split=0, noise=0.0, **kwargs)
    centres = np.random.default_rng(0).normal(size=(6, 5))
    for x, y in zip(clean.features, clean.labels, strict=True):
        distances = [np.linalg.norm(x - c) for c in centres]
        nearest = int(np.argmin(distances))
        assert distances[nearest] < 1e-5  # each row is a centre ...
        assert y == nearest % 3  # ... and carries its class
    assert set(clean.labels.tolist()) == {0, 1, 2}
    noisy = alignment.gaussian_mixture_table(200, split=0, **kwargs)
    again = alignment.gaussian_mixture_table(200, split=0, **kwargs)
    other = alignment.gaussian_mixture_table(200, split=1, **kwargs)
    np.testing.assert_array_equal(noisy.features, again.features)
    assert not np.allclose(noisy.features, other.features)
    assert noisy.features.dtype == np.float32 and noisy.labels.dtype == np.int32


def test_matched_pair_keeps_model_b_and_moves_it_towards_a():
    tiny = dataclasses.replace(alignment.SIZES["tiny"], mlp_steps=25, table_rows=256)
    tour = Tour(Path("unused"), TINY)
    lines = alignment.mlp_lines(tour, tiny, 16, with_finetunes=True)
    assert list(lines.losses) == [alignment.INDEPENDENT, alignment.MATCHED, alignment.FINETUNES]
    independent, matched = lines.losses[alignment.INDEPENDENT], lines.losses[alignment.MATCHED]
    # both lines start at A and end at B (permuted, which computes the same function)
    np.testing.assert_allclose(matched[[0, -1]], independent[[0, -1]], rtol=1e-5)
    assert lines.distances[alignment.MATCHED] <= lines.distances[alignment.INDEPENDENT] + 1e-6
    assert lines.distances[alignment.FINETUNES] < lines.distances[alignment.INDEPENDENT]
    figures = lines.figures()
    assert figures[alignment.MATCHED]["barrier"] == alignment.loss_barrier(lines.alphas, matched)


def test_aligned_is_a_permutation_of_b():
    a, b = (nnx.state(MLPClassifier(4, (12, 8), 3, rngs=nnx.Rngs(s)), nnx.Param) for s in (0, 1))
    spec = mlp_classifier_spec(a)
    moved = alignment.aligned(spec, a, b, jax.random.key(0))
    x = np.random.default_rng(2).normal(size=(10, 4)).astype(np.float32)
    np.testing.assert_allclose(numpy_mlp(nnx.to_pure_dict(moved), x),
                               numpy_mlp(nnx.to_pure_dict(b), x), rtol=1e-5, atol=1e-6)  # fmt: skip
    for leaf_moved, leaf_b in zip(jax.tree.leaves(moved), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.sort(np.ravel(leaf_moved)), np.sort(np.ravel(leaf_b)))
