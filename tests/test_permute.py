"""Git Re-Basin alignment: the JAX assignment solver against SciPy, permuted models computing
the same function, weight matching recovering known permutations, the loss barrier between
two independently trained MLPs, and errors naming tensors and sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy.optimize import linear_sum_assignment as scipy_lsa

from jaxcombine import permute, tree
from jaxcombine.errors import ConfigError, JaxcombineError
from jaxcombine.models import Decoder, DecoderConfig, MLPClassifier
from jaxcombine.permute import (
    PermutationSpec,
    PermutationSpecError,
    apply_permutation,
    compose_perms,
    decoder_spec,
    invert_perms,
    linear_sum_assignment,
    mlp_classifier_spec,
    random_perms,
    weight_matching,
)

apply_jit = jax.jit(apply_permutation, static_argnums=0)


def is_identity(perms):
    return {name: bool(np.array_equal(p, np.arange(len(p)))) for name, p in perms.items()}


# --- the assignment solver against scipy.optimize.linear_sum_assignment -----------------


@pytest.mark.parametrize("shape", [(1, 1), (7, 7), (5, 9), (9, 5), (64, 64), (300, 300)])
@pytest.mark.parametrize("maximize", [False, True])
def test_lap_matches_scipy_on_random_costs(shape, maximize):
    rng = np.random.default_rng([*shape, int(maximize)])
    for _ in range(3):
        cost = rng.normal(size=shape).astype(np.float32) * 10 ** rng.uniform(-2, 3)
        rows, cols = linear_sum_assignment(jnp.asarray(cost), maximize=maximize)
        rows, cols = np.asarray(rows), np.asarray(cols)
        ref_rows, ref_cols = scipy_lsa(cost.astype(np.float64), maximize=maximize)
        ours = cost.astype(np.float64)[rows, cols].sum()
        best = cost.astype(np.float64)[ref_rows, ref_cols].sum()
        np.testing.assert_allclose(ours, best, rtol=1e-5, atol=1e-6 * np.abs(cost).max())
        assert len(set(cols.tolist())) == len(cols)  # a valid assignment
        # continuous random costs: the optimum is unique, so the assignment is the same
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(cols, ref_cols)


def test_lap_ties_and_integers_reach_the_optimal_total():
    rng = np.random.default_rng(0)
    for n in (4, 50):
        cost = rng.integers(0, 4, size=(n, n))  # many optimal assignments
        rows, cols = linear_sum_assignment(jnp.asarray(cost))
        ref_rows, ref_cols = scipy_lsa(cost)
        assert cost[np.asarray(rows), np.asarray(cols)].sum() == cost[ref_rows, ref_cols].sum()
        assert sorted(np.asarray(cols).tolist()) == list(range(n))
    rows, cols = linear_sum_assignment(jnp.array([[4.0, 1, 3], [2, 0, 5], [3, 2, 2]]))
    assert np.asarray(cols).tolist() == [1, 0, 2]
    with pytest.raises(ConfigError, match="2-D"):
        linear_sum_assignment(jnp.ones(3))


def test_lap_under_jit_and_vmap_matches_scipy():
    costs = np.random.default_rng(1).uniform(size=(4, 12, 12)).astype(np.float32)
    solve = jax.jit(jax.vmap(lambda c: linear_sum_assignment(c, maximize=True)[1]))
    for cost, cols in zip(costs, np.asarray(solve(jnp.asarray(costs))), strict=True):
        np.testing.assert_array_equal(cols, scipy_lsa(cost, maximize=True)[1])


# --- tiny models -----------------------------------------------------------------------


def mlp(seed, hidden=(24, 16)):
    return MLPClassifier(5, hidden, 3, rngs=nnx.Rngs(seed))


MHA = DecoderConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
)
GQA_TIED = DecoderConfig(
    vocab_size=40,
    hidden_size=16,
    intermediate_size=24,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    tie_word_embeddings=True,
)


@functools.cache
def decoder(config):
    """(graphdef, params) of a tiny decoder with random weights, biases and RMSNorm scales.

    Parameters are drawn with numpy into the abstract model's state (faster than eager init).
    """
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param
    )
    rng = np.random.default_rng(0)
    flat = jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape) * 0.1 + (x.ndim == 1) * 1.0, jnp.float32),
        nnx.to_pure_dict(state),
    )
    nnx.replace_by_pure_dict(state, flat)
    return graphdef, state


# --- permuted models compute the same function ----------------------------------------


def test_permuted_mlp_computes_the_same_function():
    model = mlp(0)
    graphdef, state = nnx.split(model, nnx.Param)
    spec = mlp_classifier_spec(model)
    assert spec.names == ("hidden_0", "hidden_1")
    assert spec.perm_to_axes["hidden_0"] == [
        ("layers/0/bias", 0),
        ("layers/0/kernel", 1),
        ("layers/1/kernel", 0),
    ]
    perms = random_perms(spec, state, jax.random.key(1))
    assert not any(is_identity(perms).values())
    permuted = apply_jit(spec, perms, state)
    assert isinstance(permuted, nnx.State)
    assert not tree.all_close(nnx.to_pure_dict(permuted), nnx.to_pure_dict(state))
    x = jax.random.normal(jax.random.key(2), (32, 5))
    forward = jax.jit(lambda params: nnx.merge(graphdef, params)(x))
    np.testing.assert_allclose(forward(permuted), model(x), atol=1e-5, rtol=1e-5)
    # plain dict trees give the same numbers; the inverse undoes the permutation
    pure = apply_permutation(spec, perms, nnx.to_pure_dict(state))
    assert tree.all_close(pure, nnx.to_pure_dict(permuted), rtol=0, atol=0)
    back = apply_permutation(spec, invert_perms(perms), pure)
    assert tree.all_close(back, nnx.to_pure_dict(state), rtol=0, atol=0)


@pytest.mark.parametrize(("config", "heads"), [(MHA, True), (MHA, False), (GQA_TIED, False)])
def test_permuted_decoder_computes_the_same_logits(config, heads):
    graphdef, state = decoder(config)
    spec = decoder_spec(state, heads=heads)
    expected = {"residual", "mlp_0", "mlp_1"} | ({"heads_0", "heads_1"} if heads else set())
    assert set(spec.names) == expected
    perms = random_perms(spec, state, jax.random.key(3))
    permuted = apply_jit(spec, perms, state)
    tokens = jax.random.randint(jax.random.key(4), (2, 7), 0, config.vocab_size)
    forward = jax.jit(lambda params: nnx.merge(graphdef, params)(tokens).logits)
    ours, reference = forward(permuted), forward(state)
    assert float(jnp.abs(reference).max()) > 1e-3
    np.testing.assert_allclose(ours, reference, atol=2e-5, rtol=1e-4)
    # the permutation really moved the weights
    moved = nnx.to_pure_dict(permuted)["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert not np.allclose(moved, nnx.to_pure_dict(state)["layers"][0]["mlp"]["up_proj"]["kernel"])


# --- weight matching recovers known permutations ---------------------------------------


def test_weight_matching_recovers_a_random_permutation_of_an_mlp():
    # the barrier test's architecture, so the compiled matching is shared
    state = nnx.state(MLPClassifier(2, (256, 256), 3, rngs=nnx.Rngs(5)), nnx.Param)
    spec = mlp_classifier_spec(state)
    perms = random_perms(spec, state, jax.random.key(6))
    permuted = apply_permutation(spec, perms, state)
    found = weight_matching(spec, state, permuted, key=jax.random.key(7))
    assert all(is_identity(compose_perms(found, perms)).values())
    assert tree.all_close(
        nnx.to_pure_dict(apply_permutation(spec, found, permuted)), nnx.to_pure_dict(state)
    )
    # starting at the answer stays there; nothing is permuted between identical models
    again = weight_matching(spec, state, permuted, key=jax.random.key(8), init_perms=found)
    assert all(bool(jnp.array_equal(again[k], found[k])) for k in found)
    same = weight_matching(spec, state, state, key=jax.random.key(9))
    assert all(is_identity(same).values())

    # on a mesh of 8 fake devices, with tensors sharded over their first axis: same numbers
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("x",))

    def shard(x):
        axes = ("x",) if x.shape[0] % 8 == 0 else ()
        spec = jax.sharding.PartitionSpec(*axes)
        return jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))

    sharded_a = jax.tree.map(shard, nnx.to_pure_dict(state))
    sharded_b = apply_jit(spec, perms, sharded_a)
    assert tree.all_close(sharded_b, nnx.to_pure_dict(permuted), rtol=0, atol=0)
    found_sharded = weight_matching(spec, sharded_a, sharded_b, key=jax.random.key(7))
    assert all(bool(jnp.array_equal(found_sharded[k], found[k])) for k in found)


@pytest.mark.parametrize(("config", "heads"), [(MHA, True), (GQA_TIED, False)])
def test_weight_matching_recovers_a_random_permutation_of_a_decoder(config, heads):
    _, state = decoder(config)
    spec = decoder_spec(state, heads=heads)
    perms = random_perms(spec, state, jax.random.key(12))
    permuted = apply_permutation(spec, perms, state)
    found = weight_matching(spec, state, permuted, key=jax.random.key(13))
    assert set(found) == set(spec.names)
    assert all(is_identity(compose_perms(found, perms)).values())


# --- on real data: matching removes most of the loss barrier ----------------------------


def spirals(points_per_class=300, classes=3, noise=0.2, seed=0):
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(classes):
        r = np.linspace(0.1, 1.0, points_per_class)
        t = 2 * np.pi * c / classes + 3 * np.pi * r + rng.normal(0, noise, points_per_class)
        xs.append(np.stack([r * np.cos(t), r * np.sin(t)], 1))
        ys.append(np.full(points_per_class, c))
    return jnp.asarray(np.concatenate(xs), jnp.float32), jnp.asarray(np.concatenate(ys))


def test_weight_matching_shrinks_the_loss_barrier_between_trained_mlps():
    x, y = spirals()
    graphdef, _ = nnx.split(MLPClassifier(2, (256, 256), 3, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    optimizer = optax.adam(3e-3)

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value

        (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), None, length=250)
        return params, losses[-1]

    models = []
    for seed in (0, 1):
        init = nnx.state(MLPClassifier(2, (256, 256), 3, rngs=nnx.Rngs(seed)), nnx.Param)
        params, final = train(init)
        assert float(final) < 0.05  # both fit the spirals
        models.append(params)
    a, b = models

    ts = jnp.linspace(0.0, 1.0, 11)
    path_loss = jax.jit(lambda p, q: jax.vmap(lambda t: loss(tree.lerp(p, q, t)))(ts))

    def barrier(p, q):
        losses = path_loss(p, q)
        return float(jnp.max(losses - ((1 - ts) * losses[0] + ts * losses[-1])))

    spec = mlp_classifier_spec(a)
    perms = weight_matching(spec, a, b, key=jax.random.key(0))
    aligned = apply_permutation(spec, perms, b)
    np.testing.assert_allclose(loss(aligned), loss(b), rtol=1e-4, atol=1e-6)
    naive, matched = barrier(a, b), barrier(a, aligned)
    print(f"loss barrier: {naive:.3f} without matching, {matched:.3f} with")
    assert naive > 0.3, naive  # a real barrier to remove
    assert matched <= 0.5 * naive, (naive, matched)


# --- bad input ---------------------------------------------------------------------------


def test_size_mismatch_names_both_tensors_and_sizes():
    state = nnx.to_pure_dict(nnx.state(mlp(0), nnx.Param))  # hidden (24, 16)
    axes = dict(mlp_classifier_spec(state).axes)
    axes["head/kernel"] = ("hidden_0", None)  # hidden_0 is 24 wide, head's input is 16
    axes["layers/1/kernel"] = ("hidden_0", None)
    axes["layers/1/bias"] = None
    with pytest.raises(PermutationSpecError) as info:
        PermutationSpec(axes).sizes(state)
    message = str(info.value)
    assert "'hidden_0'" in message
    assert "'head/kernel'" in message and "size 16" in message
    assert "size 24" in message and "'layers/0/bias'" in message
    assert isinstance(info.value, ConfigError) and isinstance(info.value, JaxcombineError)


def test_missing_and_extra_paths_are_listed():
    state = nnx.state(mlp(0), nnx.Param)
    axes = dict(mlp_classifier_spec(state).axes)
    del axes["head/bias"]
    axes["layers/0/kernel/value"] = (None, None)
    with pytest.raises(PermutationSpecError) as info:
        apply_permutation(PermutationSpec(axes), {}, state)
    message = str(info.value)
    assert "spec paths not in params: ['layers/0/kernel/value']" in message
    assert "params leaves not in the spec: ['head/bias']" in message
    with pytest.raises(PermutationSpecError, match="spec paths not in params_b"):
        small = nnx.state(mlp(0, hidden=(24,)), nnx.Param)
        weight_matching(mlp_classifier_spec(state), state, small, key=jax.random.key(0))


def test_other_bad_input():
    state = nnx.state(mlp(0), nnx.Param)
    spec = mlp_classifier_spec(state)
    axes = dict(spec.axes)
    axes["head/bias"] = (None, None)
    with pytest.raises(PermutationSpecError, match=r"head/bias: the spec gives 2 axes.*\(3,\)"):
        PermutationSpec(axes).sizes(state)
    with pytest.raises(PermutationSpecError, match="one permutation name or None per axis"):
        PermutationSpec({"head/bias": "hidden_0"})
    perms = random_perms(spec, state, jax.random.key(0))
    with pytest.raises(PermutationSpecError, match=r"missing \['hidden_1'\], unknown \['h'\]"):
        apply_permutation(spec, {"hidden_0": perms["hidden_0"], "h": perms["hidden_1"]}, state)
    with pytest.raises(
        PermutationSpecError, match=r"'hidden_1' has shape \(3,\), expected \(16,\)"
    ):
        apply_permutation(spec, {**perms, "hidden_1": jnp.arange(3)}, state)
    with pytest.raises(PermutationSpecError, match="max_iter"):
        weight_matching(spec, state, state, key=jax.random.key(0), max_iter=0)
    _, gqa = decoder(GQA_TIED)
    with pytest.raises(PermutationSpecError, match="grouped-query attention"):
        decoder_spec(gqa, heads=True)
    with pytest.raises(PermutationSpecError, match="no Decoder layers"):
        decoder_spec(state)
    # a spec is hashable (a static jit argument) and equal to a rebuilt one
    assert hash(spec) == hash(mlp_classifier_spec(mlp(3))) and spec == mlp_classifier_spec(mlp(3))
    assert permute.__all__ == sorted(permute.__all__)
    linear_only = nnx.state(MLPClassifier(5, (), 3, rngs=nnx.Rngs(0)), nnx.Param)
    assert mlp_classifier_spec(linear_only).names == ()
    assert (
        weight_matching(
            mlp_classifier_spec(linear_only), linear_only, linear_only, key=jax.random.key(0)
        )
        == {}
    )
