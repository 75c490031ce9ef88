"""Leaf merge functions (one tensor) against slow numpy transcriptions of the math.

Every reference below is a direct, loop-by-loop reading of the method in
float64 numpy (mergekit 0.1.5's semantics: its thresholds, clamps and branches);
the fast JAX functions run in float32 and must agree to float32 rounding.
Agreement with mergekit itself is checked end to end by
``test_merging_vs_mergekit.py``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcombine.errors import ConfigError
from jaxcombine.merging._geometric import karcher_leaf, multislerp_leaf, nuslerp_leaf, slerp_leaf
from jaxcombine.merging._selective import (
    arcee_fusion_leaf,
    model_stock_leaf,
    nearswap_leaf,
    passthrough_leaf,
    ram_leaf,
    ramplus_tl_leaf,
    sce_leaf,
)

RTOL, ATOL = 2e-5, 2e-6


def rand(seed, *shape):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def close(out, ref, rtol=RTOL, atol=ATOL):
    np.testing.assert_allclose(np.asarray(out, np.float64), ref, rtol=rtol, atol=atol)


def f64(x):
    return np.asarray(x, np.float64)


# --------------------------------------------------------------- references


def ref_slerp(a, b, t):
    a, b = f64(a).ravel(), f64(b).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    na, nb = (na if na > 1e-8 else 1.0), (nb if nb > 1e-8 else 1.0)
    dot = min(max(float(np.dot(a / na, b / nb)), -1.0), 1.0)
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s * a + math.sin(t * theta) / s * b


def ref_slerp_pair(t, v0, v1):
    """nuslerp's two-vector SLERP; (anti)parallel pairs are interpolated linearly."""
    u0 = v0 / max(np.linalg.norm(v0), 1e-7)
    u1 = v1 / max(np.linalg.norm(v1), 1e-7)
    cos = min(max(float(np.dot(u0, u1)), -1.0), 1.0)
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def ref_nuslerp(base, models, weight, row_wise=False, flatten=True):
    w0, w1 = weight
    t = 0.5 if abs(w0 + w1) < 1e-6 else w1 / (w0 + w1)
    v0, v1 = f64(models[0]), f64(models[1])
    if base is not None:
        v0, v1 = v0 - f64(base), v1 - f64(base)
    if flatten:
        out = ref_slerp_pair(t, v0.ravel(), v1.ravel()).reshape(v0.shape)
    else:
        # one direction per slice along the last axis; row_wise: transpose(0, -1) first
        a, b = (np.swapaxes(v0, 0, -1), np.swapaxes(v1, 0, -1)) if row_wise else (v0, v1)
        out = np.empty_like(a)
        for idx in np.ndindex(a.shape[:-1]):
            out[idx] = ref_slerp_pair(t, a[idx], b[idx])
        out = np.swapaxes(out, 0, -1) if row_wise else out
    return out if base is None else out + f64(base)


def ref_multislerp(base, models, weight, normalize_weights=True, eps=1e-8):
    xs = [f64(m).ravel() for m in models]
    if len(xs) == 1:
        return xs[0]
    if base is not None:
        xs = [x - f64(base).ravel() for x in xs]
    w = np.array(weight, np.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / (n + eps) for x, n in zip(xs, norms, strict=True)]
    mean = sum(wi * u for wi, u in zip(w, units, strict=True))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - np.dot(u, mean) * mean) for wi, u in zip(w, units, strict=True))
    tn = np.linalg.norm(tangent) + eps
    out = (mean * math.cos(tn) + tangent * math.sin(tn) / tn) * sum(
        n * wi for n, wi in zip(norms, w, strict=True)
    )
    return out if base is None else out + f64(base).ravel()


def ref_karcher(models, max_iter=10, tol=1e-5):
    xs = [f64(m).ravel() for m in models]
    n = len(xs)
    if n == 1:
        return xs[0]
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / nm if nm > 0 else np.zeros_like(x) for x, nm in zip(xs, norms, strict=True)]
    valid = [i for i in range(n) if norms[i] > tol]
    if not valid:
        return np.zeros_like(xs[0])
    alphas = [1 / len(valid)] * len(valid)
    vunits = [units[i] for i in valid]
    mean = sum(a * u for a, u in zip(alphas, vunits, strict=True))
    mn = np.linalg.norm(mean)
    mean = vunits[0].copy() if mn < tol else mean / mn
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for a, u in zip(alphas, vunits, strict=True):
            dot = min(max(float(np.dot(mean, u)), -1.0), 1.0)
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += a * theta / math.sin(theta) * (u - dot * mean)
        tn = np.linalg.norm(tangent)
        if tn < tol:
            break
        mean = math.cos(tn) * mean + math.sin(tn) * tangent / tn
        un = np.linalg.norm(mean)
        if un > tol:
            mean = mean / un
    return sum(nm / n for nm in norms) * mean


def ref_model_stock(base, models, filter_wise=False):
    w0 = f64(base)
    ws = [f64(m) for m in models]
    if filter_wise and w0.ndim > 1:
        rows = list(np.ndindex(w0.shape[:-1]))
    else:
        w0, ws, rows = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws], [(0,)]
    n = len(ws)
    out = np.empty_like(w0)
    for r in rows:
        offsets = [w[r] - w0[r] for w in ws]
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                norm = max(np.linalg.norm(offsets[i]) * np.linalg.norm(offsets[j]), 1e-6)
                cosines.append(min(max(np.dot(offsets[i], offsets[j]) / norm, -1.0), 1.0))
        cos = sum(cosines) / len(cosines)
        den = 1 + (n - 1) * cos
        t = 0.0 if abs(den) < 1e-6 else n * cos / den
        out[r] = t * sum(w[r] for w in ws) / n + (1 - t) * w0[r]
    return out.reshape(f64(base).shape)


def ref_nearswap(base, model, t):
    a, b = f64(base).ravel(), f64(model).ravel()
    out = np.empty_like(a)
    for j in range(a.size):
        w = min(max(t / max(abs(a[j] - b[j]), 1e-6), 0.0), 1.0)
        out[j] = w * b[j] + (1 - w) * a[j]
    return out.reshape(f64(base).shape)


def ref_arcee_fusion(base, model):
    b, m = f64(base), f64(model)

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(m) + 1e-8, softmax(b) + 1e-8
    kl = np.sum(p * np.log(p / q), axis=-1, keepdims=True)
    importance = np.abs(m - b) * kl
    s = np.sort(importance.ravel())
    n = s.size
    q1, med, q3 = (s[int(q * (n - 1))] for q in (0.25, 0.5, 0.75))
    keep = importance >= med + 1.5 * (q3 - q1)
    return np.where(keep, m, b)


def ref_ram(base, models, epsilon=1e-5, plus=None):
    b = f64(base).ravel()
    tvs = [f64(m).ravel() - b for m in models]
    n, d = len(tvs), b.size
    changed = [[abs(tv[j]) > epsilon for j in range(d)] for tv in tvs]
    counts = [sum(changed[i][j] for i in range(n)) for j in range(d)]
    lam = [1.0] * n
    if plus is not None:
        r, alpha = plus
        for i in range(n):
            shared = sum(1 for j in range(d) if changed[i][j] and counts[j] > 1)
            unique = sum(1 for j in range(d) if changed[i][j] and counts[j] == 1)
            lam[i] = 1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha)
    out = b.copy()
    for j in range(d):
        for i in range(n):
            if changed[i][j]:
                out[j] += tvs[i][j] * lam[i] if counts[j] == 1 else tvs[i][j] / counts[j]
    return out.reshape(f64(base).shape)


def ref_sce(base, models, select_topk=1.0):
    b = f64(base).ravel()
    tvs = np.stack([f64(m).ravel() - b for m in models])
    n, d = tvs.shape
    if select_topk < 1:
        keep = np.zeros(d)
        if select_topk > 0:
            var = [float(np.var(tvs[:, j])) for j in range(d)]
            nonzero = [j for j in range(d) if var[j] > 0]
            k = int(len(nonzero) * select_topk)
            for j in sorted(nonzero, key=lambda j: -var[j])[:k]:
                keep[j] = 1
        tvs = tvs * keep
    w = [float(np.mean(tv**2)) for tv in tvs]
    w = [1 / n] * n if abs(sum(w)) < 1e-6 else [x / sum(w) for x in w]
    out = b.copy()
    for j in range(d):
        sign = 1.0 if tvs[:, j].sum() >= 0 else -1.0
        agree = [i for i in range(n) if np.sign(tvs[i, j]) == sign]
        total = sum(w[i] for i in agree)
        out[j] += sum(w[i] * tvs[i, j] for i in agree) / max(total, 1e-6)
    return out.reshape(f64(base).shape)


# ------------------------------------------------------------- vs references


def run(fn, base, models, **kw):
    """The leaf under jax.jit, parameters static (as the engine calls it)."""
    return jax.jit(functools.partial(fn, **kw))(base, np.stack(models))


@pytest.mark.parametrize("shape", [(6, 5), (11,)])
def test_slerp_matches_reference(shape):
    a, b = rand(0, *shape), rand(1, *shape)
    near = 2 * a + 1e-4 * b  # |cos| > 0.9995: linear
    jitted = jax.jit(lambda a, m, t: slerp_leaf(a, m, t=t))  # t may be traced
    for t in [0.0, 0.3, 1.0, 1.4]:
        close(jitted(a, b[None], t), ref_slerp(a, b, t).reshape(shape))
        close(jitted(a, near[None], t), ref_slerp(a, near, t).reshape(shape))


@pytest.mark.parametrize("row_wise,flatten", [(False, True), (False, False), (True, False)])
def test_nuslerp_matches_reference(row_wise, flatten):
    base, m0, m1 = rand(0, 5, 8), rand(1, 5, 8), rand(2, 5, 8)
    m1[2] = 2 * m0[2]  # a parallel row (without base): linear branch or theta ~ 0
    kw = dict(nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    for b, weight in [(base, (1.0, 2.0)), (None, (1.0, 2.0)), (None, (1.0, -1.0))]:
        out = run(nuslerp_leaf, b, [m0, m1], weight=weight, **kw)
        close(out, ref_nuslerp(b, [m0, m1], weight, row_wise, flatten))


@pytest.mark.parametrize("n,normalize", [(2, True), (3, False), (5, True)])
def test_multislerp_matches_reference(n, normalize):
    xs = [rand(i, 4, 6) for i in range(n + 1)]
    weight = tuple(0.5 + 0.25 * i for i in range(n))
    for base in [xs[0], None]:
        out = run(multislerp_leaf, base, xs[1:], weight=weight, normalize_weights=normalize)
        close(out, ref_multislerp(base, xs[1:], weight, normalize).reshape(4, 6))


def test_multislerp_degenerate_mean_falls_back_to_linear():
    a = rand(0, 4, 6)
    z = np.zeros_like(a)
    for models, weight in [([a, -a], (1.0, 1.0)), ([a, -a, z], (1.0, 1.0, 2.0))]:
        out = run(multislerp_leaf, None, models, weight=weight)
        w = np.array(weight) / sum(weight)
        close(out, sum(wi * f64(m) for wi, m in zip(w, models, strict=True)), atol=1e-6)


KARCHER_INPUTS = {
    "two": [rand(0, 5, 4), rand(1, 5, 4)],
    "four": [rand(0, 5, 4), rand(1, 5, 4), rand(2, 5, 4), rand(3, 5, 4)],
    "zero input": [np.zeros((5, 4), np.float32), rand(1, 5, 4), 2 * rand(2, 5, 4)],
    "norm below tol": [1e-7 * rand(0, 5, 4), rand(1, 5, 4), rand(2, 5, 4)],
    "mean of two cancels": [rand(0, 5, 4), -rand(0, 5, 4), rand(2, 5, 4)],
}


@pytest.mark.parametrize(
    "inputs,max_iter,tol",
    [(name, 10, 1e-5) for name in KARCHER_INPUTS]
    + [("four", 0, 1e-5), ("four", 2, 1e-5), ("three", 40, 1e-3)],
)
def test_karcher_matches_reference(inputs, max_iter, tol):
    models = KARCHER_INPUTS.get(inputs) or [rand(i, 5, 4) for i in range(3)]
    out = run(karcher_leaf, None, models, max_iter=max_iter, tol=tol)
    close(out, ref_karcher(models, max_iter, tol).reshape(5, 4))


def test_karcher_all_tiny_is_zero():
    out = run(karcher_leaf, None, [1e-7 * rand(0, 3, 3), np.zeros((3, 3), np.float32)])
    np.testing.assert_array_equal(out, np.zeros((3, 3)))


@pytest.mark.parametrize("shape", [(6, 5), (7,), (2, 3, 4)])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_matches_reference(shape, filter_wise):
    xs = [rand(i, *shape) for i in range(4)]
    for n in [2, 3] if shape == (6, 5) else [3]:
        out = run(model_stock_leaf, xs[0], xs[1 : n + 1], filter_wise=filter_wise)
        close(out, ref_model_stock(xs[0], xs[1 : n + 1], filter_wise))


def test_model_stock_singular_keeps_base():
    base, d = rand(0, 4, 5), rand(1, 4, 5)
    for fw in [False, True]:
        out = run(model_stock_leaf, base, [base + d, base - d], filter_wise=fw)
        close(out, f64(base), atol=1e-6)


def test_nearswap_matches_reference():
    a = rand(0, 6, 5)
    b = a + 0.3 * rand(1, 6, 5)
    b[0] = a[0]
    jitted = jax.jit(lambda a, m, t: nearswap_leaf(a, m, t=t))
    for t in [0.001, 0.5, 10.0]:
        close(jitted(a, b[None], t), ref_nearswap(a, b, t))


@pytest.mark.parametrize("shape", [(8, 16), (50,), (3, 5, 7)])
def test_arcee_fusion_matches_reference(shape):
    a = rand(0, *shape)
    b = a + 0.01 * rand(1, *shape)
    b.reshape(-1)[::17] += 1.0  # a few outlying changes
    close(run(arcee_fusion_leaf, a, [b]), ref_arcee_fusion(a, b))


def sparse_models(n, shape=(7, 6)):
    base = rand(0, *shape)
    rng = np.random.default_rng(n)
    models = []
    for i in range(n):
        delta = rand(10 + i, *shape) * (rng.uniform(size=shape) < 0.5)
        delta[rng.uniform(size=shape) < 0.1] = 5e-6  # below RAM's epsilon
        models.append(base + delta)
    return base, models


@pytest.mark.parametrize("n", [1, 3])
def test_ram_and_ramplus_match_reference(n):
    base, models = sparse_models(n)
    close(run(ram_leaf, base, models), ref_ram(base, models))
    close(run(ram_leaf, base, models, epsilon=0.3), ref_ram(base, models, 0.3))
    close(run(ramplus_tl_leaf, base, models), ref_ram(base, models, plus=(0.1, 0.2)))
    out = run(ramplus_tl_leaf, base, models, r=0.5, alpha=0.9, epsilon=1e-4)
    close(out, ref_ram(base, models, 1e-4, plus=(0.5, 0.9)))


@pytest.mark.parametrize("n,select_topk", [(1, 0.5), (2, 1.0), (2, 0.1), (4, 0.5), (4, 0.0)])
def test_sce_matches_reference(n, select_topk):
    base, models = sparse_models(n)
    out = run(sce_leaf, base, models, select_topk=select_topk)
    close(out, ref_sce(base, models, select_topk))


def test_no_models_returns_base():
    base = rand(0, 3, 4)
    empty = np.zeros((0, 3, 4), np.float32)
    for fn in [ram_leaf, ramplus_tl_leaf, sce_leaf]:
        np.testing.assert_array_equal(fn(base, empty), base)


def test_passthrough():
    a = rand(0, 3, 4)
    np.testing.assert_array_equal(passthrough_leaf(None, a[None]), a)
    close(passthrough_leaf(None, a[None], scale=(0.5,)), 0.5 * f64(a), atol=0)
    np.testing.assert_array_equal(passthrough_leaf(None, a[None], scale=(None,)), a)


# --------------------------------------------------------------- properties


def test_slerp_endpoints():
    a, b = rand(0, 6, 5), rand(1, 6, 5)
    close(run(slerp_leaf, a, [b], t=0.0), f64(a), atol=1e-6)
    close(run(slerp_leaf, a, [b], t=1.0), f64(b), atol=1e-6)


def test_copies_merge_to_themselves():
    x, base = rand(0, 5, 6), rand(1, 5, 6)
    three = [x, x, x]
    close(run(nuslerp_leaf, None, three[:2], weight=(1.0, 3.0)), f64(x), atol=1e-6)
    close(run(nuslerp_leaf, base, three[:2], weight=(1.0, 3.0)), f64(x), atol=1e-6)
    close(run(multislerp_leaf, None, three, weight=(1.0, 2.0, 3.0)), f64(x), atol=1e-5)
    close(run(multislerp_leaf, base, three, weight=(1.0, 2.0, 3.0)), f64(x), atol=1e-5)
    close(run(karcher_leaf, None, three), f64(x), atol=1e-6)
    for fw in [False, True]:
        close(run(model_stock_leaf, base, three, filter_wise=fw), f64(x), atol=1e-6)


def test_float64_agrees_with_reference_tightly():
    with jax.enable_x64(True):
        xs = [rand(i, 4, 6).astype(np.float64) for i in range(3)]
        out = run(karcher_leaf, None, xs)
        assert out.dtype == jnp.float64
        np.testing.assert_allclose(out, ref_karcher(xs).reshape(4, 6), rtol=1e-12, atol=1e-13)


BASE, M1, M2, M3 = (rand(i, 4, 6) for i in range(4))
CALLS = {
    "slerp": (slerp_leaf, BASE, [M1], dict(t=0.3)),
    "nuslerp": (nuslerp_leaf, BASE, [M1, M2], dict(weight=(1.0, 2.0))),
    "multislerp": (multislerp_leaf, None, [M1, M2, M3], dict(weight=(1.0, 2.0, 0.5))),
    "karcher": (karcher_leaf, None, [M1, M2, M3], {}),
    "model_stock": (model_stock_leaf, BASE, [M1, M2, M3], dict(filter_wise=True)),
    "nearswap": (nearswap_leaf, BASE, [M1], dict(t=0.5)),
    "arcee_fusion": (arcee_fusion_leaf, BASE, [M1], {}),
    "ram": (ram_leaf, BASE, [M1, M2], {}),
    "ramplus_tl": (ramplus_tl_leaf, BASE, [M1, M2], {}),
    "passthrough": (passthrough_leaf, None, [M1], dict(scale=(2.0,))),
    "sce": (sce_leaf, BASE, [M1, M2, M3], dict(select_topk=0.3)),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_jit_matches_eager(name):
    fn, base, models, kw = CALLS[name]
    models = jnp.asarray(np.stack(models))
    eager = fn(base, models, **kw)
    jitted = jax.jit(functools.partial(fn, **kw))(base, models)
    np.testing.assert_allclose(eager, jitted, rtol=1e-5, atol=1e-6)


def finite_value_and_gradient(fn, base, models, kw):
    models = jnp.asarray(np.stack(models))

    def loss(m):
        out = fn(base, m, **kw)
        return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape)), out

    (_, out), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(models)
    assert bool(jnp.isfinite(out).all())
    assert bool(jnp.isfinite(grad).all())


@pytest.mark.parametrize("name", ["arcee_fusion", "nearswap", "ram", "ramplus_tl", "slerp"])
def test_gradients_are_finite(name):
    finite_value_and_gradient(*CALLS[name])


DEGENERATE = [
    (slerp_leaf, BASE, [BASE], dict(t=0.3)),  # identical: linear branch
    (slerp_leaf, np.zeros_like(BASE), [np.zeros_like(BASE)], dict(t=0.3)),
    (nuslerp_leaf, None, [M1, 2 * M1], dict(weight=(1.0, 1.0), nuslerp_flatten=False)),
    (multislerp_leaf, None, [M1, -M1, 0 * M1], dict(weight=(1.0, 1.0, 1.0))),
    (multislerp_leaf, BASE, [BASE, BASE], dict(weight=(1.0, 1.0))),
    (karcher_leaf, None, [M1, M1, M1], {}),
    (karcher_leaf, None, [0 * M1, 0 * M1], {}),
    (model_stock_leaf, BASE, [BASE + M1, BASE - M1], {}),
    (model_stock_leaf, BASE, [BASE, BASE], dict(filter_wise=True)),
    (sce_leaf, BASE, [BASE, BASE], dict(select_topk=0.5)),
]


@pytest.mark.parametrize("case", range(len(DEGENERATE)))
def test_degenerate_inputs_give_finite_values_and_gradients(case):
    """The methods with data-dependent branches, at their branch points."""
    finite_value_and_gradient(*DEGENERATE[case])


def test_dtypes():
    base = jax.ShapeDtypeStruct(BASE.shape, jnp.bfloat16)
    one, two = (jax.ShapeDtypeStruct((n, *BASE.shape), jnp.bfloat16) for n in (1, 2))

    def dtype(fn, models, **kw):
        return jax.eval_shape(functools.partial(fn, **kw), base, models).dtype

    assert dtype(slerp_leaf, one, t=0.5) == jnp.bfloat16
    assert dtype(karcher_leaf, two) == jnp.bfloat16
    assert dtype(model_stock_leaf, two) == jnp.bfloat16
    assert dtype(sce_leaf, two, select_topk=0.5) == jnp.bfloat16
    # mergekit promotes these two to float32 (by a float32 mask / lambda)
    assert dtype(arcee_fusion_leaf, one) == jnp.float32
    assert dtype(ramplus_tl_leaf, two) == jnp.float32


# ------------------------------------------------------------------- errors

WRONG_COUNTS = [
    (slerp_leaf, BASE, 2, dict(t=0.5)),
    (slerp_leaf, None, 1, dict(t=0.5)),
    (nuslerp_leaf, BASE, 1, dict(weight=(1.0,))),
    (nuslerp_leaf, None, 3, dict(weight=(1.0, 1.0, 1.0))),
    (multislerp_leaf, None, 0, dict(weight=())),
    (karcher_leaf, None, 0, {}),
    (model_stock_leaf, BASE, 1, {}),
    (model_stock_leaf, None, 3, {}),
    (nearswap_leaf, BASE, 2, dict(t=0.5)),
    (arcee_fusion_leaf, BASE, 2, {}),
    (arcee_fusion_leaf, BASE, 0, {}),
    (ram_leaf, None, 2, {}),
    (ramplus_tl_leaf, None, 2, {}),
    (sce_leaf, None, 2, {}),
    (passthrough_leaf, None, 2, {}),
]


@pytest.mark.parametrize("case", range(len(WRONG_COUNTS)))
def test_wrong_model_count_is_a_config_error(case):
    fn, base, n, kw = WRONG_COUNTS[case]
    models = np.stack([M1] * n) if n else np.zeros((0, 4, 6), np.float32)
    with pytest.raises(ConfigError) as err:
        fn(base, models, **kw)
    assert err.value.where and err.value.fix


def test_bad_parameters_are_config_errors():
    two = np.stack([M1, M2])
    with pytest.raises(ConfigError, match="weight"):
        nuslerp_leaf(BASE, two, weight=(1.0, 2.0, 3.0))
    with pytest.raises(ConfigError, match="sum to zero"):
        multislerp_leaf(None, two, weight=(1.0, -1.0))
    with pytest.raises(ConfigError, match="max_iter"):
        karcher_leaf(None, two, max_iter=2.5)
    with pytest.raises(ConfigError, match="shape"):
        ram_leaf(BASE[:2], two)
    with pytest.raises(ConfigError, match="floating"):
        sce_leaf(BASE.astype(np.int32), two.astype(np.int32))
