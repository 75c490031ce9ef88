"""Pytree toolkit: stacking, arithmetic against numpy, structure errors naming paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcombine import tree
from jaxcombine.errors import ConfigError
from jaxcombine.models import MLPClassifier


def params(seed):
    return nnx.to_pure_dict(nnx.state(MLPClassifier(3, (8,), 2, rngs=nnx.Rngs(seed)), nnx.Param))


def test_stack_unstack_round_trip_and_paths():
    trees = [params(s) for s in range(3)]
    stacked = tree.stack(trees)
    assert stacked["layers"][0]["kernel"].shape == (3, 3, 8)
    for original, back in zip(trees, tree.unstack(stacked), strict=True):
        assert tree.all_close(original, back, rtol=0, atol=0)
    assert tree.leaf_paths(trees[0]) == [
        "head/bias",
        "head/kernel",
        "layers/0/bias",
        "layers/0/kernel",
    ]


def test_arithmetic_matches_numpy():
    a, b = params(0), params(1)
    flat_a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)])
    flat_b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
    np.testing.assert_allclose(tree.dot(a, b), flat_a @ flat_b, rtol=1e-5)
    np.testing.assert_allclose(tree.norm(a), np.linalg.norm(flat_a), rtol=1e-5)
    mix = tree.lerp(a, b, 0.25)
    flat_mix = np.concatenate([np.ravel(x) for x in jax.tree.leaves(mix)])
    np.testing.assert_allclose(flat_mix, 0.75 * flat_a + 0.25 * flat_b, rtol=1e-6, atol=1e-7)
    assert tree.all_close(tree.sub(tree.add(a, b), b), a, atol=1e-6)
    assert tree.all_close(tree.scale(a, 2.0), tree.add(a, a))
    lerp_jit = jax.jit(tree.lerp)(a, b, 0.25)
    assert tree.all_close(lerp_jit, mix)


def test_structure_errors_name_paths_and_shapes():
    a = params(0)
    b = params(1)
    del b["head"]["bias"]
    with pytest.raises(ConfigError, match="missing.*head/bias"):
        tree.stack([a, b])
    c = MLPClassifier(3, (16,), 2, rngs=nnx.Rngs(0))
    c = nnx.to_pure_dict(nnx.state(c, nnx.Param))
    with pytest.raises(ConfigError, match=r"head/kernel: shape \(16, 2\) differs from \(8, 2\)"):
        tree.stack([a, c])
    assert jnp.shape(tree.zeros_like(a)["head"]["kernel"]) == (8, 2)
