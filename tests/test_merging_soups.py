"""Task vectors, model soups and weight averaging, against numpy, optax and slow references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcombine.errors import ConfigError, JaxcombineError
from jaxcombine.merging._averaging import (
    ema,
    ema_init,
    ema_update,
    ema_value,
    running_average,
    running_average_init,
    running_average_update,
    running_average_value,
)
from jaxcombine.merging._soups import greedy_soup, uniform_soup
from jaxcombine.merging._task_vectors import (
    add_task_vectors,
    analogy,
    apply_task_vector,
    negate,
    task_vector,
)
from jaxcombine.models import MLPClassifier


def mlp_params(seed: int, dtype=jnp.float32) -> dict:
    model = MLPClassifier(6, (16, 16), 3, dtype=dtype, rngs=nnx.Rngs(seed))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def np_tree(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def assert_tree_close(actual, expected, *, rtol=1e-6, atol=1e-6):
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float64), e, rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- task vectors


def test_task_vector_algebra_matches_numpy():
    base, ft, a, b, c = (mlp_params(s) for s in range(5))
    nb, nft, na, nbb, nc = (np_tree(t) for t in (base, ft, a, b, c))

    tau = task_vector(ft, base)
    assert_tree_close(tau, jax.tree.map(np.subtract, nft, nb))
    assert_tree_close(apply_task_vector(base, tau), nft)
    for scale in (0.5, -1.0, 2.0):
        expected = jax.tree.map(lambda x, y, s=scale: x + s * (y - x), nb, nft)
        assert_tree_close(apply_task_vector(base, tau, scale), expected)
    assert_tree_close(negate(tau), jax.tree.map(lambda x, y: x - y, nb, nft))
    # forgetting: applying the negated vector equals scale=-1
    assert_tree_close(apply_task_vector(base, negate(tau)), apply_task_vector(base, tau, -1.0))

    taus = [task_vector(m, base) for m in (a, b, c)]
    scales = [0.3, -0.7, 1.5]
    expected = jax.tree.map(
        lambda x0, x1, x2, x3: sum(s * (x - x0) for s, x in zip(scales, (x1, x2, x3), strict=True)),
        nb,
        na,
        nbb,
        nc,
    )
    assert_tree_close(add_task_vectors(taus, scales), expected, atol=1e-5)
    assert_tree_close(
        add_task_vectors(taus),
        jax.tree.map(lambda x0, *xs: sum(x - x0 for x in xs), nb, na, nbb, nc),
    )

    expected = jax.tree.map(
        lambda x0, xa, xb, xc: x0 + 0.4 * ((xc - x0) + (xb - xa)), nb, na, nbb, nc
    )
    assert_tree_close(analogy(base, a, b, c, scale=0.4), expected, atol=1e-5)


def test_task_vector_functions_under_jit():
    base, ft, a, b, c = (mlp_params(s) for s in range(5))
    tau = task_vector(ft, base)
    assert_tree_close(jax.jit(task_vector)(ft, base), np_tree(tau), rtol=0, atol=0)
    assert_tree_close(
        jax.jit(apply_task_vector)(base, tau, -0.5), np_tree(apply_task_vector(base, tau, -0.5))
    )
    assert_tree_close(jax.jit(negate)(tau), np_tree(negate(tau)))
    assert_tree_close(
        jax.jit(add_task_vectors)([tau, tau], jnp.array([0.5, 0.25])),
        np_tree(add_task_vectors([tau, tau], [0.5, 0.25])),
    )
    assert_tree_close(jax.jit(analogy)(base, a, b, c, 0.7), np_tree(analogy(base, a, b, c, 0.7)))


def test_bfloat16_round_trip_is_exact():
    base, ft = mlp_params(0, jnp.bfloat16), mlp_params(1, jnp.bfloat16)
    tau = task_vector(ft, base)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tau))
    back = apply_task_vector(base, tau)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ft), strict=True):
        assert x.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x, np.float32), np.asarray(y, np.float32))


def with_counter(params, value):
    params = jax.tree.map(lambda x: x, params)
    params["layers"][0]["count"] = jnp.array(value, jnp.int32)
    return params


def test_integer_leaves_pass_through_or_are_refused_by_name():
    base, ft = with_counter(mlp_params(0), 7), with_counter(mlp_params(1), 7)
    tau = task_vector(ft, base)
    assert int(tau["layers"][0]["count"]) == 7
    assert int(apply_task_vector(base, tau, -1.0)["layers"][0]["count"]) == 7
    assert int(negate(tau)["layers"][0]["count"]) == 7
    assert int(uniform_soup([base, ft])["layers"][0]["count"]) == 7

    other = with_counter(mlp_params(1), 8)
    with pytest.raises(ConfigError, match="layers/0/count") as info:
        task_vector(other, base)
    assert "integer leaf differs" in str(info.value) and "How to fix" in str(info.value)
    with pytest.raises(ConfigError, match="layers/0/count"):
        apply_task_vector(base, task_vector(other, other))
    with pytest.raises(ConfigError, match="layers/0/count"):
        analogy(base, ft, other, ft)
    with pytest.raises(ConfigError, match="layers/0/count"):
        uniform_soup([base, other])
    with pytest.raises(ConfigError, match="layers/0/count"):
        greedy_soup([base, other], lambda p: 0.0)


def test_shape_and_structure_mismatch_name_the_leaf():
    base = mlp_params(0)
    wider = nnx.to_pure_dict(nnx.state(MLPClassifier(6, (16, 16), 4, rngs=nnx.Rngs(1)), nnx.Param))
    with pytest.raises(ConfigError, match="head/(bias|kernel)"):
        task_vector(wider, base)
    with pytest.raises(ConfigError, match="head/(bias|kernel)"):
        apply_task_vector(base, task_vector(wider, wider))
    deeper = nnx.to_pure_dict(
        nnx.state(MLPClassifier(6, (16, 16, 16), 3, rngs=nnx.Rngs(1)), nnx.Param)
    )
    with pytest.raises(ConfigError, match="layers/2"):
        task_vector(deeper, base)
    with pytest.raises(JaxcombineError, match="scale"):
        apply_task_vector(base, task_vector(base, base), float("nan"))
    with pytest.raises(ConfigError, match="one scale per task vector"):
        add_task_vectors([task_vector(base, base)] * 2, [1.0])
    with pytest.raises(ConfigError, match="at least one"):
        add_task_vectors([])


# --------------------------------------------------------------------------- uniform soup


def test_uniform_soup_of_copies_returns_the_model_and_matches_numpy():
    params = mlp_params(0)
    for n in (1, 3, 7):
        assert_tree_close(uniform_soup([params] * n), np_tree(params))
        assert_tree_close(jax.jit(uniform_soup)([params] * n), np_tree(params))
    assert_tree_close(uniform_soup([params] * 3, [0.2, 5.0, 1.3]), np_tree(params))

    models = [mlp_params(s) for s in range(4)]
    nps = [np_tree(m) for m in models]
    assert_tree_close(uniform_soup(models), jax.tree.map(lambda *x: np.mean(x, axis=0), *nps))
    w = [1.0, 2.0, 0.5, -0.25]
    expected = jax.tree.map(
        lambda *x: sum(wi * xi for wi, xi in zip(w, x, strict=True)) / sum(w), *nps
    )
    assert_tree_close(uniform_soup(models, w), expected, atol=2e-6)
    assert_tree_close(jax.jit(uniform_soup)(models, jnp.array(w)), expected, atol=2e-6)

    bf16 = [mlp_params(s, jnp.bfloat16) for s in range(3)]
    soup = uniform_soup(bf16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(soup))
    expected = jax.tree.map(lambda *x: np.mean(np.stack(x).astype(np.float64), 0), *bf16)
    assert_tree_close(soup, expected, rtol=2**-8, atol=1e-6)

    with pytest.raises(ConfigError, match="one weight per model"):
        uniform_soup(models, [1.0])
    with pytest.raises(ConfigError, match="sum to zero"):
        uniform_soup(models[:2], [1.0, -1.0])
    with pytest.raises(ConfigError, match="at least one model"):
        uniform_soup([])


# --------------------------------------------------------------------------- greedy soup


def reference_greedy_soup(models, eval_fn, strict=True):
    """Wortsman et al. 2022, Recipe 1, written plainly with numpy float64 averages."""
    models = [np_tree(m) for m in models]
    scores = [eval_fn(m) for m in models]
    order = sorted(range(len(models)), key=lambda i: scores[i], reverse=True)
    soup = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        candidate = soup + [i]
        average = jax.tree.map(
            lambda *x: np.mean(np.stack(x), axis=0), *[models[j] for j in candidate]
        )
        score = eval_fn(average)
        if score > best or (not strict and score >= best):
            soup, best = candidate, score
    average = jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0), *[models[j] for j in soup])
    return soup, best, average, scores


def toy_eval(target):
    """Minus the squared distance to a target point: higher is better."""

    def eval_fn(params):
        parts = jax.tree.map(
            lambda x, t: np.sum((np.asarray(x, np.float64) - t) ** 2), params, target
        )
        return -float(sum(jax.tree.leaves(parts)))

    return eval_fn


@pytest.mark.parametrize("seed", range(5))
def test_greedy_soup_matches_reference(seed):
    rng = np.random.default_rng(seed)
    target = np_tree(mlp_params(seed))
    models = []
    for i in range(6):
        noise = 0.05 + rng.uniform() * 1.0
        offset = rng.normal(size=()) * 0.3 * (i % 2)  # some models share a bias away from target
        models.append(
            jax.tree.map(
                lambda t, noise=noise, offset=offset: jnp.asarray(
                    t + offset + noise * rng.normal(size=t.shape), jnp.float32
                ),
                target,
            )
        )
    eval_fn = toy_eval(target)
    soup, record = greedy_soup(models, eval_fn)
    ref_soup, ref_score, ref_average, ref_scores = reference_greedy_soup(models, eval_fn)
    assert list(record.ingredients) == ref_soup
    np.testing.assert_allclose(record.scores, ref_scores, rtol=1e-12)
    np.testing.assert_allclose(record.score, ref_score, rtol=1e-5)
    assert_tree_close(soup, ref_average, rtol=1e-5, atol=1e-6)
    assert_tree_close(soup, np_tree(uniform_soup([models[i] for i in record.ingredients])))
    assert record.score >= max(record.scores)
    assert record.order[0] == int(np.argmax(ref_scores))
    assert [t.model for t in record.trials] == list(record.order[1:])
    assert [t.model for t in record.trials if t.accepted] == list(record.ingredients[1:])


def test_greedy_soup_ties_held_out_and_bad_scores():
    a = mlp_params(0)
    b = jax.tree.map(lambda x: x + 1.0, a)
    target = np_tree(a)
    eval_fn = toy_eval(target)
    # a copy of the best model leaves the soup unchanged: a tie
    _, record = greedy_soup([a, b, a], eval_fn)
    assert record.ingredients == (0,) and record.order == (0, 2, 1)
    _, record_ties = greedy_soup([a, b, a], eval_fn, strict=False)
    ref, *_ = reference_greedy_soup([a, b, a], eval_fn, strict=False)
    assert list(record_ties.ingredients) == ref == [0, 2]

    seen = []

    def eval_with_data(params, data):
        seen.append(data)
        return eval_fn(params)

    soup, record = greedy_soup([b, a], eval_with_data, held_out="val")
    assert set(seen) == {"val"} and record.ingredients == (1,)
    assert_tree_close(soup, target)

    soup, record = greedy_soup([a], eval_fn)
    assert record.ingredients == (0,) and record.trials == ()
    with pytest.raises(ConfigError, match="models\\[1\\]"):
        greedy_soup([a, b], lambda p: float("nan") if p is b else 0.0)
    with pytest.raises(ConfigError, match="one number"):
        greedy_soup([a, b], lambda p: "good")


def make_dataset(seed=0, n=3000, dim=6, classes=3):
    """Labels from a random two-layer teacher, 10% label noise."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(dim, 12))
    w2 = rng.normal(size=(12, classes))
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = np.argmax(np.maximum(x @ w1, 0) @ w2, axis=1)
    flip = rng.uniform(size=n) < 0.1
    y = np.where(flip, rng.integers(0, classes, size=n), y).astype(np.int32)
    return (x[:1500], y[:1500]), (x[1500:2250], y[1500:2250]), (x[2250:], y[2250:])


def test_greedy_soup_on_finetuned_classifiers():
    train_set, held_out, test = make_dataset()
    model = MLPClassifier(6, (32, 32), 3, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)

    def loss_fn(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    @jax.jit
    def accuracy_jit(params, x, y):
        return (nnx.merge(graphdef, params)(x).argmax(-1) == y).mean()

    def accuracy(params, data):
        return float(accuracy_jit(params, *data))

    def train(params, lr, seed, steps, data=train_set, batch=64):
        opt_state = optimizer.init(params)
        opt_state.hyperparams["learning_rate"] = jnp.asarray(lr)
        rng = np.random.default_rng(seed)
        x, y = data
        for _ in range(steps):
            idx = rng.integers(0, len(x), size=batch)
            params, opt_state = train_step(params, opt_state, x[idx], y[idx])
        return params

    # "pre-train" briefly on a third of the data, then fine-tune from that shared init
    pretrained = train(
        nnx.to_pure_dict(state),
        1e-2,
        seed=0,
        steps=60,
        data=(train_set[0][:500], train_set[1][:500]),
    )
    settings = [(3e-3, 1), (1e-2, 2), (1e-2, 3), (3e-2, 4), (1e-1, 5)]
    ingredients = [train(pretrained, lr, seed, steps=60) for lr, seed in settings]

    soup, record = greedy_soup(ingredients, accuracy, held_out=held_out)
    uniform = uniform_soup(ingredients)
    best = int(np.argmax([accuracy(m, held_out) for m in ingredients]))
    report = {
        "held_out": {
            "ingredients": [round(s, 4) for s in record.scores],
            "greedy": round(accuracy(soup, held_out), 4),
            "uniform": round(accuracy(uniform, held_out), 4),
        },
        "test": {
            "best_ingredient": round(accuracy(ingredients[best], test), 4),
            "greedy": round(accuracy(soup, test), 4),
            "uniform": round(accuracy(uniform, test), 4),
        },
        "greedy_ingredients": record.ingredients,
    }
    print("\nsoups on fine-tuned MLPs:", report)
    assert record.score == accuracy(soup, held_out)
    assert record.score >= max(record.scores)
    assert max(record.scores) > 0.7  # the ingredients did learn the task


# --------------------------------------------------------------------------- averaging


def checkpoints(k, dtype=jnp.float32):
    return [mlp_params(s, dtype) for s in range(k)]


def test_running_average_equals_numpy_mean():
    ckpts = checkpoints(5)
    update = jax.jit(running_average_update)
    state = running_average_init(ckpts[0])
    for i, p in enumerate(ckpts, start=1):
        state = update(state, p)
        expected = jax.tree.map(lambda *x: np.mean(x, axis=0), *[np_tree(c) for c in ckpts[:i]])
        assert_tree_close(jax.jit(running_average_value)(state), expected, atol=2e-6)
    assert int(state.count) == 5

    avg = running_average()
    s = avg.init(ckpts[0])
    for p in ckpts:
        s = avg.update(s, p)
    assert_tree_close(avg.value(s), np_tree(running_average_value(state)), rtol=1e-6)


def test_running_average_accumulates_bf16_in_float32():
    ckpts = checkpoints(8, jnp.bfloat16)
    state = running_average_init(ckpts[0])
    for p in ckpts:
        state = jax.jit(running_average_update)(state, p)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.mean))
    value = running_average_value(state)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(value))
    expected = jax.tree.map(lambda *x: np.mean(np.stack(x).astype(np.float64), 0), *ckpts)
    assert_tree_close(state.mean, expected, rtol=1e-6, atol=1e-6)
    assert_tree_close(value, expected, rtol=2**-8, atol=1e-6)


def reference_ema(params_seq, decay, warmup, debias):
    ema_, prod, out = None, 1.0, []
    for t, p in enumerate(params_seq):
        p = np_tree(p)
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        ema_ = (
            jax.tree.map(lambda x, d=d: (1 - d) * x, p)
            if ema_ is None
            else jax.tree.map(lambda e, x, d=d: d * e + (1 - d) * x, ema_, p)
        )
        prod *= d
        out.append(jax.tree.map(lambda e, c=1 - prod: e / c, ema_) if debias else ema_)
    return out


@pytest.mark.parametrize("warmup", [False, True])
@pytest.mark.parametrize("debias", [False, True])
def test_ema_matches_python_loop(warmup, debias):
    seq = checkpoints(6)
    update = jax.jit(ema_update, static_argnames="warmup")
    value = jax.jit(ema_value, static_argnames="debias")
    state = ema_init(seq[0])
    expected = reference_ema(seq, 0.8, warmup, debias)
    for p, e in zip(seq, expected, strict=True):
        state = update(state, p, 0.8, warmup=warmup)
        assert_tree_close(value(state, debias=debias), e, rtol=1e-5, atol=1e-6)

    averager = ema(0.8, debias=debias, warmup=warmup)
    s = averager.init(seq[0])
    for p in seq:
        s = jax.jit(averager.update)(s, p)
    assert_tree_close(averager.value(s), np_tree(value(state, debias=debias)), rtol=0, atol=0)


@pytest.mark.parametrize("debias", [False, True])
def test_ema_matches_optax(debias):
    seq = checkpoints(6)
    transform = optax.ema(0.9, debias=debias)
    opt_state = transform.init(seq[0])
    state = ema_init(seq[0])
    for p in seq:
        out, opt_state = transform.update(p, opt_state)
        state = jax.jit(ema_update)(state, p, 0.9)
        assert_tree_close(ema_value(state, debias=debias), np_tree(out), rtol=1e-5, atol=1e-6)
    # one step from a non-zero average is optax.incremental_update with step 1 - decay
    for warmup in (False, True):
        step = 1 - (min(0.9, (1 + 6) / (10 + 6)) if warmup else 0.9)
        new = ema_update(state, seq[0], 0.9, warmup=warmup)
        expected = optax.incremental_update(seq[0], state.ema, step)
        assert_tree_close(ema_value(new, debias=False), np_tree(expected), rtol=1e-6)


def test_ema_bf16_int_leaves_and_errors():
    seq = [with_counter(p, i) for i, p in enumerate(checkpoints(4, jnp.bfloat16))]
    state = ema_init(seq[0])
    for p in seq:
        state = jax.jit(ema_update)(state, p, 0.5)
    assert all(x.dtype in (jnp.float32, jnp.int32) for x in jax.tree.leaves(state.ema))
    value = ema_value(state)
    assert value["layers"][0]["kernel"].dtype == jnp.bfloat16
    assert int(value["layers"][0]["count"]) == 3  # the latest counter, not an average
    expected = reference_ema(seq, 0.5, False, True)[-1]
    np.testing.assert_allclose(
        np.asarray(value["head"]["kernel"], np.float64),
        expected["head"]["kernel"],
        rtol=2**-7,
        atol=1e-5,
    )

    with pytest.raises(ConfigError, match="decay"):
        ema_update(ema_init(seq[0]), seq[0], 1.5)
    with pytest.raises(ConfigError, match="decay"):
        ema(-0.1)
    with pytest.raises(ConfigError, match="head/kernel"):
        running_average_update(
            running_average_init(mlp_params(0)),
            checkpoints(1)[0] | {"head": {"bias": jnp.zeros(3), "kernel": jnp.zeros((16, 4))}},
        )


# --------------------------------------------------------------------------- states and meshes


def test_works_on_nnx_state_and_updates_the_model():
    base_model = MLPClassifier(6, (16, 16), 3, rngs=nnx.Rngs(0))
    ft_model = MLPClassifier(6, (16, 16), 3, rngs=nnx.Rngs(1))
    base, ft = nnx.state(base_model, nnx.Param), nnx.state(ft_model, nnx.Param)
    expected = 0.5 * (
        np.asarray(base_model.head.kernel[...]) + np.asarray(ft_model.head.kernel[...])
    )
    edited = apply_task_vector(base, task_vector(ft, base), 0.5)
    assert isinstance(edited, nnx.State)
    nnx.update(base_model, edited)
    np.testing.assert_allclose(np.asarray(base_model.head.kernel[...]), expected, atol=1e-6)
    assert isinstance(uniform_soup([base, ft]), nnx.State)


def test_sharded_over_eight_devices_gives_the_same_numbers():
    devices = np.array(jax.devices())
    assert devices.size == 8
    mesh = jax.sharding.Mesh(devices, ("x",))

    def spec(x):
        axes = [None] * x.ndim
        for i in reversed(range(x.ndim)):
            if x.shape[i] % 8 == 0:
                axes[i] = "x"
                break
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*axes))

    models = [mlp_params(s) for s in range(4)]
    sharded = [jax.tree.map(lambda x: jax.device_put(x, spec(x)), m) for m in models]
    assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(sharded[0]))

    def combine(ms):
        tau = add_task_vectors([task_vector(m, ms[0]) for m in ms[1:]], [0.5, -0.3, 0.2])
        edited = apply_task_vector(ms[0], tau, 0.8)
        state = ema_init(ms[0])
        for m in ms:
            state = ema_update(state, m, 0.7, warmup=True)
        avg = running_average_init(ms[0])
        for m in ms:
            avg = running_average_update(avg, m)
        return edited, uniform_soup(ms), ema_value(state), running_average_value(avg)

    expected = combine(models)
    actual = jax.jit(combine)(sharded)
    for a, e in zip(actual, expected, strict=True):
        assert_tree_close(a, np_tree(e), rtol=1e-6, atol=1e-6)
