"""Data-aware merging: Fisher-weighted, RegMean, AdaMerging.

Oracles: slow per-example Python loops of ``jax.grad`` for the Fisher, numpy
per-element formulas, ``numpy.linalg.lstsq`` on the concatenated data for
RegMean (the paper's derivation), central finite differences for AdaMerging's
gradient, and :mod:`jaxcombine.tree` arithmetic for the merged parameters.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcombine import tree
from jaxcombine.errors import ConfigError
from jaxcombine.merging._adamerging import (
    adamerging,
    merge_with_coefficients,
    prediction_entropy,
)
from jaxcombine.merging._fisher import (
    expected_fisher_update,
    fisher_finalize,
    fisher_init,
    fisher_merge,
    fisher_update,
)
from jaxcombine.merging._regmean import (
    gram_finalize,
    gram_init,
    gram_update,
    linear_inputs,
    regmean_merge,
)
from jaxcombine.models import MLPClassifier

# ---------------------------------------------------------------------------- helpers


def _mlp(seed, hidden=(8,)):
    """4 inputs, 3 classes: one architecture throughout keeps compilations few."""
    return MLPClassifier(4, hidden, 3, rngs=nnx.Rngs(seed))


def _np(t):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(t)]


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(_np(a), _np(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def classifier():
    graphdef, state = nnx.split(_mlp(0))
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.normal(size=(16, 4)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 3, size=16), jnp.int32)

    def logits_fn(params, x):
        return nnx.merge(graphdef, params)(x)

    def log_prob_fn(params, example):
        x, y = example
        return jax.nn.log_softmax(logits_fn(params, x))[y]

    return state, xs, ys, logits_fn, log_prob_fn


# ---------------------------------------------------------------------------- Fisher


def test_empirical_fisher_equals_slow_loop_of_per_example_grads(classifier):
    state, xs, ys, _, log_prob_fn = classifier
    fast = fisher_finalize(
        jax.jit(fisher_update, static_argnums=3)(fisher_init(state), state, (xs, ys), log_prob_fn)
    )
    grad_one = jax.jit(jax.grad(log_prob_fn))
    total = None
    for n in range(xs.shape[0]):
        g = _np(grad_one(state, (xs[n], ys[n])))
        total = (
            [s * s for s in g]
            if total is None
            else [t + s * s for t, s in zip(total, g, strict=True)]
        )
    for got, want in zip(_np(fast), total, strict=True):
        np.testing.assert_allclose(got, want / xs.shape[0], rtol=1e-5, atol=1e-8)


def test_expected_fisher_equals_slow_loop_over_examples_and_classes(classifier):
    state, xs, _, logits_fn, _ = classifier
    fast = fisher_finalize(expected_fisher_update(fisher_init(state), state, xs, logits_fn))
    grad_one = jax.jit(jax.grad(lambda p, x, c: jax.nn.log_softmax(logits_fn(p, x))[c]))
    total = [np.zeros_like(x) for x in _np(state)]
    for n in range(xs.shape[0]):
        probs = np.asarray(jax.nn.softmax(logits_fn(state, xs[n])))
        for c in range(3):
            g = _np(grad_one(state, xs[n], c))
            total = [t + probs[c] * s * s for t, s in zip(total, g, strict=True)]
    for got, want in zip(_np(fast), total, strict=True):
        np.testing.assert_allclose(got, want / xs.shape[0], rtol=1e-5, atol=1e-8)


def test_fisher_accumulated_over_batches_equals_one_batch(classifier):
    state, xs, ys, _, log_prob_fn = classifier
    one = fisher_update(fisher_init(state), state, (xs, ys), log_prob_fn)
    many = fisher_init(state)
    for lo, hi in [(0, 4), (4, 8), (8, 16)]:
        many = fisher_update(many, state, (xs[lo:hi], ys[lo:hi]), log_prob_fn)
    assert int(many.count) == int(one.count) == 16
    _assert_trees_close(fisher_finalize(many), fisher_finalize(one))


def test_fisher_and_grams_of_a_batch_sharded_over_8_devices_equal_unsharded(classifier):
    state, xs, ys, logits_fn, log_prob_fn = classifier
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    shard = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
    xs_s, ys_s = jax.device_put(xs, shard), jax.device_put(ys, shard)
    assert len(xs_s.sharding.device_set) == 8
    for update, batch, batch_s, fn in [
        (fisher_update, (xs, ys), (xs_s, ys_s), log_prob_fn),
        (expected_fisher_update, xs, xs_s, logits_fn),
    ]:
        want = fisher_finalize(update(fisher_init(state), state, batch, fn))
        got = fisher_finalize(update(fisher_init(state), state, batch_s, fn))
        _assert_trees_close(got, want, rtol=1e-5, atol=1e-8)
    grams = gram_update(gram_init({"k": 4}), {"k": xs_s}).grams["k"]
    np.testing.assert_allclose(np.asarray(grams), np.asarray(xs.T @ xs), rtol=1e-5, atol=1e-5)


def _three_models(seed=0):
    rng = np.random.default_rng(seed)
    return [
        {"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype("f4")}
        for _ in range(3)
    ]


def test_equal_fishers_give_the_weighted_average():
    models = _three_models()
    fisher = jax.tree.map(lambda x: np.abs(x) + 0.5, models[0])
    weights = [0.2, 0.5, 1.3]
    merged = fisher_merge(models, [fisher] * 3, weights=weights)
    want = jax.tree.map(
        lambda *xs: sum(w * x for w, x in zip(weights, xs, strict=True)) / 2.0, *models
    )
    _assert_trees_close(merged, want)


def test_fisher_merge_matches_numpy_per_element_formula():
    models = _three_models(1)
    rng = np.random.default_rng(2)
    fishers = [jax.tree.map(lambda x: rng.exponential(size=x.shape), m) for m in models]
    fishers[0]["w"][0, :] = 0.0  # some zeros in one model
    for f in fishers:  # every model's Fisher is zero here: fallback to the weighted mean
        f["b"][1] = 0.0
    weights, eps = np.array([1.0, 2.0, 0.5]), 1e-6
    merged = fisher_merge(models, fishers, weights=weights, epsilon=eps)
    for name in ("w", "b"):
        th = np.stack([m[name] for m in models]).astype(np.float64)
        f = np.stack([fi[name] for fi in fishers]).astype(np.float64) + eps
        w = weights.reshape(-1, *[1] * (th.ndim - 1))
        want = (w * f * th).sum(0) / (w * f).sum(0)
        np.testing.assert_allclose(np.asarray(merged[name]), want, rtol=1e-5, atol=1e-6)
    mean_b1 = sum(w * m["b"][1] for w, m in zip(weights, models, strict=True)) / weights.sum()
    np.testing.assert_allclose(float(merged["b"][1]), mean_b1, rtol=1e-5)


def test_fisher_merge_of_classifier_states(classifier):
    state, xs, ys, logits_fn, log_prob_fn = classifier
    other = nnx.state(_mlp(7))
    fishers = [
        fisher_finalize(fisher_update(fisher_init(p), p, (xs, ys), log_prob_fn))
        for p in (state, other)
    ]
    merged = fisher_merge([state, other], fishers, weights=[0.25, 0.75])
    for got, a, b, fa, fb in zip(*map(_np, (merged, state, other, *fishers)), strict=True):
        fa, fb = 0.25 * (fa + 1e-8), 0.75 * (fb + 1e-8)
        np.testing.assert_allclose(got, (fa * a + fb * b) / (fa + fb), rtol=1e-5, atol=1e-6)
    assert logits_fn(merged, xs[0]).shape == (3,)


def test_fisher_merge_errors():
    models = _three_models()
    fishers = [jax.tree.map(np.ones_like, m) for m in models]
    with pytest.raises(ConfigError, match="different structure"):
        fisher_merge([models[0], {"w": models[1]["w"]}], fishers[:2])
    with pytest.raises(ConfigError, match="shape"):
        fisher_merge([models[0], {"w": np.ones((4, 2), "f4"), "b": models[1]["b"]}], fishers[:2])
    with pytest.raises(ConfigError, match="sum to zero"):
        fisher_merge(models, fishers, weights=[1.0, -1.0, 0.0])
    with pytest.raises(ConfigError, match="3 models but 2 Fishers"):
        fisher_merge(models, fishers[:2])
    with pytest.raises(ConfigError, match="expected 3 weights"):
        fisher_merge(models, fishers, weights=[1.0, 1.0])
    bad = [jax.tree.map(lambda x: -x, fishers[0]), *fishers[1:]]
    with pytest.raises(ConfigError, match="non-negative"):
        fisher_merge(models, bad)
    with pytest.raises(ConfigError, match="no examples"):
        fisher_finalize(fisher_init(models[0]))


# ---------------------------------------------------------------------------- RegMean


def _regression_setup(d=4, out=3, sizes=(7, 9, 6), seed=0):
    rng = np.random.default_rng(seed)
    xs = [rng.normal(size=(n, d)) * rng.uniform(0.5, 2.0, size=d) for n in sizes]
    models = [
        {
            "kernel": rng.normal(size=(d, out)).astype("f4"),
            "bias": rng.normal(size=out).astype("f4"),
        }
        for _ in sizes
    ]
    return xs, models


def _grams(xs, chunks=3):
    out = []
    for x in xs:
        state = gram_init({"kernel": x.shape[1]})
        for part in np.array_split(x, chunks):
            state = gram_update(state, {"kernel": jnp.asarray(part, jnp.float32)})
        out.append(gram_finalize(state))
    return out


def test_regmean_alpha_one_is_least_squares_on_concatenated_data():
    xs, models = _regression_setup()
    weights = np.array([1.0, 2.0, 0.5])
    merged = regmean_merge(models, _grams(xs), alpha=1.0, weights=weights)
    # min_W sum_i w_i ||X_i W - X_i W_i||^2  ==  lstsq on rows scaled by sqrt(w_i)
    a = np.concatenate([np.sqrt(w) * x for w, x in zip(weights, xs, strict=True)])
    b = np.concatenate(
        [np.sqrt(w) * x @ m["kernel"] for w, x, m in zip(weights, xs, models, strict=True)]
    )
    want = np.linalg.lstsq(a, b, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(merged["kernel"]), want, rtol=2e-4, atol=2e-4)
    bias = sum(w * m["bias"] for w, m in zip(weights, models, strict=True)) / weights.sum()
    np.testing.assert_allclose(np.asarray(merged["bias"]), bias, rtol=1e-5, atol=1e-6)


def test_gram_accumulated_over_batches_equals_one_batch():
    xs, _ = _regression_setup()
    x = jnp.asarray(xs[0], jnp.float32)
    one = gram_update(gram_init({"k": x}), {"k": x})
    many = _grams([xs[0]], chunks=3)[0]["kernel"]
    np.testing.assert_allclose(np.asarray(many), np.asarray(one.grams["k"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(many), xs[0].T @ xs[0], rtol=1e-5, atol=1e-5)
    mean = gram_finalize(one, mean=True)["k"]
    np.testing.assert_allclose(np.asarray(mean), xs[0].T @ xs[0] / len(xs[0]), rtol=1e-5)
    # leading axes are flattened: [B, T, d] counts B * T inputs
    state = gram_update(gram_init({"k": 4}), {"k": x[:6].reshape(2, 3, 4)})
    assert int(state.counts["k"]) == 6


def test_regmean_alpha_zero_is_per_row_weighted_mean():
    xs, models = _regression_setup(seed=1)
    merged = regmean_merge(models, _grams(xs), alpha=0.0)
    diag = np.stack([np.sum(x * x, axis=0) for x in xs])  # [M, d] = diag(X_i^T X_i)
    kernels = np.stack([m["kernel"] for m in models]).astype(np.float64)
    want = (diag[:, :, None] * kernels).sum(0) / diag.sum(0)[:, None]
    np.testing.assert_allclose(np.asarray(merged["kernel"]), want, rtol=1e-5, atol=1e-6)


def test_regmean_intermediate_alpha_matches_numpy_and_unseen_features_take_the_mean():
    xs, models = _regression_setup(d=5, seed=2)
    for x in xs:
        x[:, 3] = 0.0  # feature 3 never seen by any model
    alpha = 0.7
    merged = regmean_merge(models, _grams(xs), alpha=alpha)
    grams = [x.T @ x for x in xs]
    shrunk = [alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in grams]
    keep = [0, 1, 2, 4]
    a = sum(s[np.ix_(keep, keep)] for s in shrunk)
    b = sum(s[keep] @ m["kernel"] for s, m in zip(shrunk, models, strict=True))
    got = np.asarray(merged["kernel"])
    np.testing.assert_allclose(got[keep], np.linalg.solve(a, b), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got[3], np.mean([m["kernel"][3] for m in models], 0), rtol=1e-5)


def test_linear_inputs_of_mlp_classifier_match_a_manual_forward():
    model = _mlp(1, hidden=(8, 8))
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 4)), jnp.float32)
    inputs = linear_inputs(model, x)
    p = nnx.to_pure_dict(nnx.state(model))
    h0 = np.asarray(x).reshape(-1, 4)
    h1 = np.maximum(h0 @ p["layers"][0]["kernel"] + p["layers"][0]["bias"], 0)
    h2 = np.maximum(h1 @ p["layers"][1]["kernel"] + p["layers"][1]["bias"], 0)
    assert sorted(inputs) == ["head/kernel", "layers/0/kernel", "layers/1/kernel"]
    for key, want in [("layers/0/kernel", h0), ("layers/1/kernel", h1), ("head/kernel", h2)]:
        np.testing.assert_allclose(np.asarray(inputs[key]), want, rtol=1e-5, atol=1e-6)
    assert model(x).shape == (2, 6, 3)  # the model itself is untouched
    assert type(model.layers[0]).__name__ == "Dense"
    graphdef, state = nnx.split(model)
    jitted = jax.jit(lambda s, x: linear_inputs(nnx.merge(graphdef, s), x))(state, x)
    np.testing.assert_allclose(np.asarray(jitted["head/kernel"]), h2, rtol=1e-5, atol=1e-6)


def test_regmean_of_mlp_classifiers():
    """Merging copies of one model returns it; two models' head is the numpy formula."""
    rng = np.random.default_rng(3)
    models = [_mlp(1), _mlp(2)]
    states = [nnx.state(m) for m in models]
    xs = [jnp.asarray(rng.normal(size=(40, 4)), jnp.float32) for _ in models]
    grams = []
    for model, x in zip(models, xs, strict=True):
        state = gram_init(linear_inputs(model, x[:20]))
        for part in (x[:20], x[20:]):
            state = gram_update(state, linear_inputs(model, part))
        grams.append(gram_finalize(state))
    same = regmean_merge([states[0]] * 2, [grams[0]] * 2, alpha=0.9)
    _assert_trees_close(same, states[0], rtol=1e-4, atol=1e-5)

    merged = regmean_merge(states, grams, alpha=1.0)
    h = [  # the head's inputs, by hand: relu(x W_0 + b_0)
        np.maximum(np.asarray(x, np.float64) @ s["layers"][0]["kernel"] + s["layers"][0]["bias"], 0)
        for s, x in zip([nnx.to_pure_dict(st) for st in states], xs, strict=True)
    ]
    w = [np.asarray(s["head"]["kernel"][...], np.float64) for s in states]
    want = np.linalg.lstsq(
        np.concatenate(h), np.concatenate([a @ b for a, b in zip(h, w, strict=True)])
    )[0]
    # a ReLU unit dead on all inputs leaves an unseen row: it takes the mean
    seen = np.concatenate(h).any(0)
    got = np.asarray(merged["head"]["kernel"][...])
    np.testing.assert_allclose(got[seen], want[seen], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(got[~seen], ((w[0] + w[1]) / 2)[~seen], rtol=1e-5)
    bias = (states[0]["layers"][0]["bias"][...] + states[1]["layers"][0]["bias"][...]) / 2
    np.testing.assert_allclose(merged["layers"][0]["bias"][...], bias, rtol=1e-5, atol=1e-6)


def test_regmean_errors():
    xs, models = _regression_setup()
    grams = _grams(xs)
    with pytest.raises(ConfigError, match="3 models but 2 Gram"):
        regmean_merge(models, grams[:2])
    with pytest.raises(ConfigError, match="other layers"):
        regmean_merge(models, [grams[0], {"bias": np.eye(3)}, grams[2]])
    with pytest.raises(ConfigError, match="name no leaf"):
        regmean_merge(models, [{"dense/kernel": g["kernel"]} for g in grams])
    with pytest.raises(ConfigError, match="do not fit the kernel"):
        regmean_merge(models, [{"kernel": np.eye(3)}] * 3)
    with pytest.raises(ConfigError, match="different structure"):
        regmean_merge([models[0], {"kernel": models[1]["kernel"]}], grams[:2])
    with pytest.raises(ConfigError, match="differs from"):
        regmean_merge([models[0], {**models[1], "bias": np.ones(4, "f4")}], grams[:2])
    with pytest.raises(ConfigError, match="sum to zero"):
        regmean_merge(models, grams, weights=[0.0, 0.0, 0.0])
    with pytest.raises(ConfigError, match="non-negative"):
        regmean_merge(models, grams, weights=[2.0, -1.0, 1.0])
    with pytest.raises(ConfigError, match="alpha"):
        regmean_merge(models, grams, alpha=1.5)
    few = _grams([x[:1] for x in xs], chunks=1)  # 3 inputs for d_in = 4: singular
    with pytest.raises(ConfigError, match="singular"):
        regmean_merge(models, few, alpha=1.0)
    regmean_merge(models, few, alpha=0.9)  # shrinking fixes it
    with pytest.raises(ConfigError, match="missing"):
        gram_update(gram_init({"kernel": 4}), {"other": np.ones((2, 4))})
    with pytest.raises(ConfigError, match="input size 4"):
        gram_update(gram_init({"kernel": 4}), {"kernel": np.ones((2, 5))})
    with pytest.raises(ConfigError, match="no inputs"):
        gram_finalize(gram_init({"kernel": 4}))


# ---------------------------------------------------------------------------- AdaMerging


def _two_tasks():
    """Two MLPs fine-tuned from one base on two synthetic 3-class tasks (numpy + optax)."""
    rng = np.random.default_rng(0)
    graphdef, base = nnx.split(_mlp(0))
    apply = lambda p, x: nnx.merge(graphdef, p)(x)  # noqa: E731

    def task(dirs, shift):
        x = rng.normal(size=(128, 4)).astype("f4") + shift
        return jnp.asarray(x), jnp.asarray(np.argmax(x @ dirs, axis=1), jnp.int32)

    data = [task(rng.normal(size=(4, 3)), 0.5), task(rng.normal(size=(4, 3)), -0.5)]
    opt = optax.adam(3e-2)

    @jax.jit
    def step(p, s, x, y):
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()  # noqa: E731
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s, p)
        return optax.apply_updates(p, u), s

    tuned = []
    for x, y in data:
        p, s = base, opt.init(base)
        for _ in range(40):
            p, s = step(p, s, x, y)
        tuned.append(p)
    return base, tuned, apply, data


@pytest.fixture(scope="module")
def two_tasks():
    return _two_tasks()


def test_prediction_entropy_matches_numpy():
    logits = np.random.default_rng(0).normal(size=(2, 5, 4)) * 3
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    want = np.mean(-(p * np.log(p)).sum(-1))
    np.testing.assert_allclose(float(prediction_entropy(jnp.asarray(logits))), want, rtol=1e-5)
    two = prediction_entropy([jnp.asarray(logits), jnp.asarray(logits[..., :2])])
    p2 = np.exp(logits[..., :2]) / np.exp(logits[..., :2]).sum(-1, keepdims=True)
    np.testing.assert_allclose(float(two), want + np.mean(-(p2 * np.log(p2)).sum(-1)), rtol=1e-5)


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_gradient_matches_central_differences(two_tasks, granularity):
    base, tuned, apply, data = two_tasks
    taus = [tree.sub(m, base) for m in tuned]
    x = jnp.concatenate([data[0][0][:16], data[1][0][:16]])
    if granularity == "task":
        coeffs = jnp.array([0.3, 0.45])
    else:
        keys = [k.removesuffix("/value") for k in tree.leaf_paths(base)]
        coeffs = {k: jnp.array([0.3 + 0.05 * i, 0.4]) for i, k in enumerate(keys)}

    @jax.jit
    def h(c):
        return prediction_entropy(apply(merge_with_coefficients(base, taus, c), x))

    grad = jax.grad(h)(coeffs)
    flat, unravel = jax.flatten_util.ravel_pytree(coeffs)
    eps = 1e-2
    fd = np.array(
        [
            (h(unravel(flat.at[j].add(eps))) - h(unravel(flat.at[j].add(-eps)))) / (2 * eps)
            for j in range(flat.size)
        ]
    )
    np.testing.assert_allclose(jax.flatten_util.ravel_pytree(grad)[0], fd, rtol=2e-2, atol=2e-4)


def test_adamerging_decreases_entropy_and_returns_the_merge(two_tasks):
    base, tuned, apply, data = two_tasks
    batches = [jnp.concatenate([data[0][0][i : i + 32], data[1][0][i : i + 32]]) for i in (0, 32)]
    result = adamerging(base, tuned, apply, batches, steps=40, learning_rate=0.05)
    assert result.entropy.shape == (40,)
    start, end = float(result.entropy[:2].mean()), float(result.entropy[-2:].mean())
    assert end < start - 1e-3, (start, end)
    lam = np.asarray(result.coefficients)
    assert lam.shape == (2,) and np.all(np.isfinite(lam)) and np.all((lam >= 0) & (lam <= 1))
    want = tree.add(base, tree.add(tree.scale(tree.sub(tuned[0], base), lam[0]),
                                   tree.scale(tree.sub(tuned[1], base), lam[1])))  # fmt: skip
    _assert_trees_close(result.params, want, rtol=1e-5, atol=1e-6)


def test_adamerging_layer_wise(two_tasks):
    base, tuned, apply, data = two_tasks
    x = jnp.concatenate([data[0][0][:32], data[1][0][:32]])
    result = adamerging(
        base, tuned, apply, [x], granularity="layer", steps=25, learning_rate=0.05, clip=None
    )
    assert float(result.entropy[-1]) < float(result.entropy[0])
    keys = [k.removesuffix("/value") for k in tree.leaf_paths(base)]
    assert sorted(result.coefficients) == sorted(keys)
    for k in keys:
        assert result.coefficients[k].shape == (2,)
        assert np.all(np.isfinite(np.asarray(result.coefficients[k])))
    flat = zip(
        jax.tree.leaves(base),
        jax.tree.leaves(tuned[0]),
        jax.tree.leaves(tuned[1]),
        keys,
        jax.tree.leaves(result.params),
        strict=True,
    )
    for b, t0, t1, k, got in flat:
        lam = np.asarray(result.coefficients[k])
        want = b + lam[0] * (t0 - b) + lam[1] * (t1 - b)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    groups = adamerging(
        base, tuned, apply, [x], granularity=lambda k: k.split("/")[0], steps=2
    ).coefficients
    assert sorted(groups) == ["head", "layers"]


def test_adamerging_errors(two_tasks):
    base, tuned, apply, data = two_tasks
    x = data[0][0][:8]
    other = jax.tree.map(lambda x: x[:2] if x.ndim == 1 else x, tuned[1])  # biases cut
    with pytest.raises(ConfigError, match="differs from"):
        adamerging(base, [tuned[0], other], apply, [x], steps=1)
    with pytest.raises(ConfigError, match="non-empty list of batches"):
        adamerging(base, tuned, apply, x, steps=1)
    with pytest.raises(ConfigError, match="steps"):
        adamerging(base, tuned, apply, [x], steps=0)
    with pytest.raises(ConfigError, match="granularity"):
        adamerging(base, tuned, apply, [x], granularity="block", steps=1)
    with pytest.raises(ConfigError, match="logits"):
        adamerging(base, tuned, lambda p, x: apply(p, x).sum(), [x], steps=1)
    with pytest.raises(ConfigError, match="clip"):
        adamerging(base, tuned, apply, [x], steps=1, clip=(1.0, 0.0))
    with pytest.raises(ConfigError, match="expected 2 coefficients"):
        merge_with_coefficients(base, [tree.sub(t, base) for t in tuned], jnp.ones(3))
