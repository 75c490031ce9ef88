"""Random methods checked statistically, the papers' variants against numpy, properties, errors."""

from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from jaxcombine import merging
from jaxcombine.errors import ConfigError, JaxcombineError

HERE = Path(__file__).parent / "fixtures" / "mergekit"


def tensors(name):
    return load_file(str(HERE / name / "model.safetensors"))


@pytest.fixture(scope="module")
def models():
    return tensors("base"), tensors("ft1"), tensors("ft2"), tensors("ft3")


def flat(tree):
    return np.concatenate([np.asarray(tree[k], np.float64).ravel() for k in sorted(tree)])


def delta(merged, base):
    return {k: np.asarray(merged[k], np.float64) - base[k] for k in base}


# ---- random methods: statistics, reproducibility -------------------------------------


@pytest.mark.parametrize("density", [0.2, 0.7])
def test_dare_keeps_density_fraction_and_rescales(models, density):
    base, ft1, _, _ = models
    key = jax.random.key(0)
    tau = delta(ft1, base)
    raw = merging.dare_linear(
        base, [ft1], weights=[1.0], densities=[density], key=key, rescale=False
    )
    kept = flat(delta(raw, base)) != 0
    n = kept.size
    assert abs(kept.mean() - density) < 4 * np.sqrt(density * (1 - density) / n)
    # Survivors are the task vector's own entries.
    np.testing.assert_allclose(flat(delta(raw, base))[kept], flat(tau)[kept], atol=2e-7)
    # mergekit's rescale: each tensor's L1 norm is that of the unpruned task vector.
    l1 = merging.dare_linear(base, [ft1], weights=[1.0], densities=[density], key=key)
    # (A tensor whose every entry was dropped stays zero, as in mergekit.)
    for name, d in delta(l1, base).items():
        if (delta(raw, base)[name] != 0).any():
            np.testing.assert_allclose(np.abs(d).sum(), np.abs(tau[name]).sum(), rtol=1e-4)
        else:
            assert not d.any()
    # The paper's rescale: survivors divided by the density, same mask for the same key.
    paper = merging.dare_linear(
        base, [ft1], weights=[1.0], densities=[density], key=key, rescale="density"
    )
    np.testing.assert_allclose(
        flat(delta(paper, base)), flat(delta(raw, base)) / density, rtol=1e-5, atol=1e-6
    )


def test_random_methods_are_reproducible(models):
    base, ft1, ft2, _ = models
    kwargs = dict(weights=[1.0, 0.5], densities=[0.5, 0.5])
    for method in (merging.dare_ties, merging.dare_linear, merging.della, merging.della_linear):
        a = method(base, [ft1, ft2], key=jax.random.key(7), **kwargs)
        b = method(base, [ft1, ft2], key=jax.random.key(7), **kwargs)
        c = method(base, [ft1, ft2], key=jax.random.key(8), **kwargs)
        np.testing.assert_array_equal(flat(a), flat(b))
        assert not np.array_equal(flat(a), flat(c))


def test_della_keeps_large_magnitudes_more_often(models):
    base, ft1, _, _ = models
    density, epsilon = 0.5, 0.3
    fractions = {"low": [], "high": []}
    total_kept, total = 0, 0
    for seed in range(4):
        merged = merging.della_linear(
            base,
            [ft1],
            weights=[1.0],
            densities=[density],
            epsilons=[epsilon],
            key=jax.random.key(seed),
            rescale=False,
        )
        for name, d in delta(merged, base).items():
            tau = np.abs(ft1[name] - base[name]).reshape(-1, ft1[name].shape[-1])
            rows = tau if ft1[name].ndim > 1 else tau.reshape(1, -1)
            kept = (d != 0).reshape(rows.shape)
            ranks = rows.argsort(axis=1).argsort(axis=1) / max(rows.shape[1] - 1, 1)
            fractions["low"].append(kept[ranks < 0.25].mean())
            fractions["high"].append(kept[ranks > 0.75].mean())
            total_kept += kept.sum()
            total += kept.size
    assert abs(total_kept / total - density) < 0.02
    # Keep probability runs from density - eps (0.2) to density + eps (0.8) with rank.
    assert np.mean(fractions["low"]) < 0.3 < 0.7 < np.mean(fractions["high"])


def test_della_probability_rescale_divides_by_each_keep_probability(models):
    base, ft1, _, _ = models
    key = jax.random.key(3)
    kwargs = dict(weights=[1.0], densities=[0.4], epsilons=[0.1], key=key)
    raw = delta(merging.della_linear(base, [ft1], rescale=False, **kwargs), base)
    scaled = delta(merging.della_linear(base, [ft1], rescale="probability", **kwargs), base)
    for name in raw:
        probs = np.asarray(merging.della_probabilities(ft1[name] - base[name], 0.4, 0.1))
        np.testing.assert_allclose(scaled[name], raw[name] / probs, rtol=1e-5, atol=1e-6)


def test_della_probabilities_equal_ranks_by_double_argsort():
    """The one-sort ranks against numpy's argsort of argsort, per row (no ties in the data)."""
    rng = np.random.default_rng(1)
    for shape in [(7, 33), (33,), (4, 5, 6)]:
        x = rng.normal(size=shape).astype(np.float32)
        rows = np.abs(x[None] if x.ndim < 2 else x)
        ranks = rows.argsort(axis=1).argsort(axis=1) / max(rows.shape[1] - 1, 1)
        expected = (0.4 - 0.15) + ranks * 2 * 0.15
        got = np.asarray(merging.della_probabilities(x, 0.4, 0.15))
        np.testing.assert_allclose(got, expected.reshape(shape), atol=1e-6)


# ---- the papers' variants against numpy ----------------------------------------------


def numpy_ties(base, models, weights, keep_masks, election="sum", disjoint="weighted"):
    out = {}
    for name in base:
        taus = np.stack(
            [
                (m[name] - base[name]) * keep[name]
                for m, keep in zip(models, keep_masks, strict=True)
            ]
        )
        w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * base[name].ndim)
        weighted = taus * w
        votes = weighted.sum(0) if election == "sum" else np.sign(taus).sum(0)
        elected = np.where(votes >= 0, 1.0, -1.0)
        agree = np.sign(weighted) == elected
        if disjoint == "mean":
            total, count = (taus * agree).sum(0), agree.sum(0)
        else:
            total, count = (weighted * agree).sum(0), (w * agree).sum(0)
        out[name] = base[name] + total / np.where(count == 0, 1, count)
    return out


def test_ties_whole_model_topk_and_unweighted_disjoint_mean(models):
    base, ft1, ft2, ft3 = models
    fts, weights, densities = [ft1, ft2, ft3], [1.0, 0.6, 0.3], [0.3, 0.5, 0.2]
    masks = []
    for ft, density in zip(fts, densities, strict=True):
        magnitudes = np.abs(flat(ft) - flat(base))
        threshold = np.sort(magnitudes)[::-1][max(1, int(density * magnitudes.size)) - 1]
        masks.append({k: np.abs(ft[k] - base[k]) >= threshold for k in base})
    for disjoint in ("weighted", "mean"):
        ours = merging.ties(
            base, fts, weights=weights, densities=densities, topk="model", disjoint=disjoint
        )
        expected = numpy_ties(base, fts, weights, masks, disjoint=disjoint)
        for name in base:
            np.testing.assert_allclose(ours[name], expected[name], atol=1e-6, err_msg=name)


def test_sign_election_by_count(models):
    base, ft1, ft2, ft3 = models
    fts, weights = [ft1, ft2, ft3], [2.0, 0.3, 0.3]
    ours = merging.ties(base, fts, weights=weights, densities=[1.0] * 3, consensus="count")
    ones = [{k: np.ones_like(v, bool) for k, v in base.items()}] * 3
    expected = numpy_ties(base, fts, weights, ones, election="count")
    for name in base:
        np.testing.assert_allclose(ours[name], expected[name], atol=1e-6, err_msg=name)


# ---- properties over the whole registry ----------------------------------------------


@pytest.mark.parametrize("name", sorted(merging.SPECS))
def test_merging_copies_of_a_model_returns_it(models, name):
    _, ft1, _, _ = models
    spec = merging.SPECS[name]
    n = max(spec.min_models, 2 if spec.max_models is None else spec.max_models)
    weight = next((p for p in spec.params if p.name == "weight"), None)
    model_parameters = [{"weight": 0.5} if weight is not None else {} for _ in range(n)]
    needs_t = any(p.name == "t" for p in spec.params)
    merged = merging.merge(
        spec,
        [ft1] * n,
        base=None if spec.base == "none" else ft1,
        model_parameters=model_parameters,
        parameters={"t": 0.5} if needs_t else {},
        key=jax.random.key(0) if spec.random else None,
    )
    for tensor, value in ft1.items():
        np.testing.assert_allclose(merged[tensor], value, atol=1e-6, err_msg=tensor)


def test_merges_run_under_an_outer_jit(models):
    """Inside jax.jit the value checks step aside (tracers) and the numbers are the same."""
    base, ft1, ft2, _ = models
    kwargs = dict(weights=[1.0, 0.5], densities=[0.4, 0.6])
    eager = merging.ties(base, [ft1, ft2], **kwargs)
    jitted = jax.jit(lambda b, a, c: merging.ties(b, [a, c], **kwargs))(base, ft1, ft2)
    for name in base:
        np.testing.assert_allclose(jitted[name], eager[name], atol=1e-7, err_msg=name)


# ---- bad input: a clear error naming the leaf ----------------------------------------


def test_errors_name_the_tensor(models):
    base, ft1, ft2, _ = models
    bad = dict(ft2)
    bad["model.layers.0.mlp.up_proj.weight"] = bad["model.layers.0.mlp.up_proj.weight"][:, :8]
    with pytest.raises(ConfigError, match=r"model.layers.0.mlp.up_proj.weight.*\(32, 8\)"):
        merging.task_arithmetic(base, [ft1, bad], weights=[1, 1])
    nan = dict(ft2)
    nan["model.norm.weight"] = nan["model.norm.weight"].copy()
    nan["model.norm.weight"][3] = np.nan
    with pytest.raises(ConfigError, match=r"model.norm.weight.*NaN or Inf"):
        merging.linear([ft1, nan], weights=[1, 1])
    inf = dict(ft1)
    inf["lm_head.weight"] = np.full_like(inf["lm_head.weight"], np.inf)
    with pytest.raises(ConfigError, match=r"lm_head.weight.*model 0 holds NaN or Inf"):
        merging.ties(base, [inf, ft2], weights=[1, 1], densities=[0.5, 0.5])
    counters = [dict(m, step=np.array([s], np.int32)) for m, s in ((base, 3), (ft1, 3), (ft2, 4))]
    with pytest.raises(ConfigError, match="step.*integer tensor differs between base and model 1"):
        merging.task_arithmetic(counters[0], counters[1:], weights=[1, 1])
    same = merging.task_arithmetic(counters[0], [counters[1]] * 2, weights=[1, 1])
    assert same["step"].tolist() == [3]


def test_errors_in_settings(models):
    base, ft1, ft2, _ = models
    with pytest.raises(ConfigError, match="sum to zero"):
        merging.task_arithmetic(base, [ft1, ft2], weights=[0.5, -0.5], normalize=True)
    with pytest.raises(ConfigError, match="epsilon=0.3 with density=0.8"):
        merging.della(
            base, [ft1], weights=[1], densities=[0.8], epsilons=[0.3], key=jax.random.key(0)
        )
    with pytest.raises(ConfigError, match="exactly 1 model"):
        merging.merge("slerp", [ft1, ft2], base=base, parameters={"t": 0.5})
    with pytest.raises(ConfigError, match="at least 2 model"):
        merging.merge("model_stock", [ft1], base=base)
    with pytest.raises(ConfigError, match="needs a base model"):
        merging.merge("ties", [ft1, ft2], model_parameters=[{"weight": 1}] * 2)
    with pytest.raises(ConfigError, match="random and needs a key"):
        merging.merge("dare_ties", [ft1], base=base, model_parameters=[{"weight": 1}])
    with pytest.raises(ConfigError, match="did you mean 'ties'"):
        merging.merge("tie", [ft1], base=base)
    with pytest.raises(ConfigError, match="did you mean 'density'"):
        merging.merge("ties", [ft1], base=base, model_parameters=[{"weight": 1, "densty": 0.5}])
    with pytest.raises(ConfigError, match="'lambda' is one value for the whole merge"):
        merging.merge("ties", [ft1], base=base, model_parameters=[{"weight": 1, "lambda": 2}])
    with pytest.raises(ConfigError, match="lm_head.weight.*needs 'weight' and none applies"):
        merging.merge(
            "ties",
            [ft1],
            base=base,
            model_parameters=[{"weight": [{"filter": "mlp", "value": 1.0}]}],
        )
    with pytest.raises(ConfigError, match="'mpl' matches no tensor"):
        merging.ties(
            base, [ft1], weights=[[{"filter": "mpl", "value": 1.0}, {"value": 0}]], densities=[1]
        )
    with pytest.raises(ConfigError, match="weight must be finite"):
        merging.linear([ft1, ft2], weights=[1.0, float("nan")])
    with pytest.raises(JaxcombineError, match="one weight setting per model"):
        merging.linear([ft1, ft2], weights=[1.0])


# ---- the sort-free top-k against lax.top_k and a stable argsort ---------------------


@pytest.mark.parametrize("path", ["platform", "radix"])
def test_top_k_mask_equals_stable_sorts(path):
    """lax.top_k's set (ties to the lower index) and a stable ascending sort's top; both
    the path of this platform (numpy on the host, on CPU) and the accelerators' radix select."""
    import jax.numpy as jnp

    from jaxcombine.merging._ops import _top_k_by_radix, magnitude_bits, top_k_mask

    def radix(x, k, ties):
        return _top_k_by_radix(magnitude_bits(x), jnp.int32(k), ties).reshape(x.shape)

    mask = top_k_mask if path == "platform" else lambda x, k, ties: radix(x, k, ties)
    masks = jax.jit(lambda x, k: (mask(x, k, ties="low"), mask(x, k, ties="high")))
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = (1, 7, 64, 257)[trial % 4]
        x = np.abs(rng.normal(size=n)).astype(np.float32)
        if trial % 3 == 0:
            x = np.round(x * 3) / 3  # many ties and zeros
        k = int(rng.integers(0, n + 2))
        kk = min(k, n)
        low = np.zeros(n, bool)
        low[np.argsort(-x, kind="stable")[:kk]] = True
        high = np.zeros(n, bool)
        high[np.argsort(x, kind="stable")[n - kk :]] = True
        got_low, got_high = masks(x, k)
        np.testing.assert_array_equal(np.asarray(got_low), low)
        np.testing.assert_array_equal(np.asarray(got_high), high)


def test_kth_largest_radix_equals_host_select():
    """The accelerator path (31-pass radix select) and the CPU path (np.partition) agree."""
    import jax.numpy as jnp

    from jaxcombine.merging._ops import _kth_by_radix, _kth_on_host, magnitude_bits

    both = jax.jit(lambda bits, k: (_kth_by_radix(bits, k), _kth_on_host(bits, k)))
    rng = np.random.default_rng(1)
    for trial in range(40):
        sizes = [(1,), (7,), (64, 3), (257,)][: 1 + trial % 4]
        xs = [np.abs(rng.normal(size=s)).astype(np.float32) for s in sizes]
        if trial % 3 == 0:
            xs = [np.round(x * 3) / 3 for x in xs]  # many ties and zeros
        total = sum(x.size for x in xs)
        k = int(rng.integers(-1, total + 2))
        radix, host = both([magnitude_bits(jnp.asarray(x)) for x in xs], jnp.int32(k))
        assert int(radix) == int(host), (trial, k)
        if 1 <= k <= total:
            expected = np.sort(np.concatenate([x.ravel() for x in xs]))[::-1][k - 1]
            assert np.float32(jax.lax.bitcast_convert_type(radix, jnp.float32)) == expected
