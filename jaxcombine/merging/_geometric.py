"""Spherical merges, one tensor at a time: SLERP, NuSLERP, Multi-SLERP, Karcher mean.

Each function takes the base tensor ``base`` [...] (or ``None``) and the other
models stacked on a leading axis, ``models`` [N, ...], and returns one tensor
of the base's shape, with mergekit 0.1.5's semantics. All arithmetic is in
float32 (float64 for float64 inputs); the result has the input dtype. (mergekit
runs nuslerp, multislerp and karcher's unit vectors op by op in the input
dtype, so for 16-bit inputs those results differ by 16-bit rounding.)

**SLERP** (Shoemake 1985; https://en.wikipedia.org/wiki/Slerp), whole tensor
flattened to one vector, base ``a`` and model ``b``::

    cos θ = <a/|a|, b/|b|>                      (a norm <= 1e-8 counts as 1)
    slerp = sin((1-t)θ)/sin θ · a + sin(tθ)/sin θ · b
    lerp  = (1-t) a + t b                        if |cos θ| > 0.9995

**NuSLERP** (mergekit's "nuslerp"): SLERP of two models with weights
``t = w_1 / (w_0 + w_1)`` (0.5 if the weights sum to zero), of the task vectors
``theta_i - base`` when a base is given (the base is added back), of the whole
flattened tensor (``nuslerp_flatten``, the default) or row by row (one
direction per slice along the last axis, or along the first axis with
``nuslerp_row_wise``). Rows that are (anti)parallel, 1 - cos²θ <= 1e-16, are
interpolated linearly.

**Multi-SLERP** (Goddard, https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):
barycentric interpolation on the hypersphere of N flattened (task) vectors x_i
with weights w_i (normalised to sum 1 by default)::

    u_i = x_i / (|x_i| + eps)
    m   = sum_i w_i u_i / |sum_i w_i u_i|                    # tangent point
    v   = sum_i w_i (u_i - <u_i, m> m)                      # tangent-space mean
    out = (cos|v|' m + sin|v|' / |v|' · v) · sum_i w_i |x_i|,   |v|' = |v| + eps

(In exact arithmetic v = 0, since sum_i w_i u_i is parallel to m, so this is
the direction of sum_i w_i u_i scaled by the weighted mean norm; the map is
kept as mergekit writes it, rounding included.)

**Karcher mean** (the Riemannian centre of mass on the unit sphere;
Karcher 1977; mergekit's reference arXiv:2603.04972): with unit vectors u_i of
the inputs whose norm exceeds ``tol`` and equal weights a_i summing to 1 over
them, start from the normalised Euclidean mean m (the first such u_i if that
mean is shorter than ``tol``) and repeat ``max_iter`` times::

    θ_i = arccos <m, u_i>
    v   = sum_{i: θ_i >= tol} a_i θ_i / sin θ_i · (u_i - cos θ_i m)
    stop if |v| < tol,   else  m <- normalise(cos|v| m + sin|v| v / |v|)

    karcher = (sum_i |x_i| / N) · m

Example::

    merged = slerp_leaf(base_w, jnp.stack([ft_w]), t=0.3)
    merged = multislerp_leaf(None, jnp.stack([w1, w2, w3]), weight=(1.0, 1.0, 2.0))
    merged = karcher_leaf(None, jnp.stack([w1, w2, w3]))

The functions are pure and ``jax.jit``-able with the parameters static; branches
on data use ``jnp.where`` with a finite unselected side, so gradients stay
finite where mergekit's are.
"""

from __future__ import annotations

from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.merging._ops import model_sum, work_dtype


def _io_dtype(base: jax.Array | None, models: jax.Array):
    """The dtype mergekit merges in: the promotion of all inputs' dtypes."""
    return models.dtype if base is None else jnp.result_type(base.dtype, models.dtype)


def _arrays(base, models):
    return (None if base is None else jnp.asarray(base)), jnp.asarray(models)


def _norm(x: jax.Array, axis=None, keepdims: bool = False) -> jax.Array:
    """Euclidean norm whose gradient at zero is 0, not NaN."""
    sq = jnp.sum(x * x, axis=axis, keepdims=keepdims)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1)), 0)


def _check_inputs(
    method: str,
    base: jax.Array | None,
    models: jax.Array,
    *,
    base_required: bool,
    min_models: int = 0,
    max_models: int | None = None,
    rule: str = "",
) -> None:
    """Static checks: base presence, number of non-base models, shapes, dtype."""
    where = f"merge_method {method}"
    if base_required and base is None:
        raise ConfigError(
            f"{method} needs a base model tensor, got none",
            where=where,
            fix="set base_model (and pass its tensor as base)",
        )
    if models.ndim < 1:
        raise ConfigError(
            f"models must be stacked on a leading model axis [N, ...]; got shape {models.shape}",
            where=where,
            fix="stack the non-base models' tensors with jnp.stack",
        )
    n = models.shape[0]
    if n < min_models or (max_models is not None and n > max_models):
        if max_models == min_models:
            want = f"exactly {min_models}"
        elif max_models is None:
            want = f"at least {min_models}"
        else:
            want = f"{min_models} to {max_models}"
        raise ConfigError(
            f"{method} takes {want} non-base model(s){' and a base' if base_required else ''};"
            f" got {n}",
            where=where,
            fix=rule or f"list {want} models besides the base model",
        )
    if base is not None and tuple(base.shape) != tuple(models.shape[1:]):
        raise ConfigError(
            f"base has shape {tuple(base.shape)} but the models have {tuple(models.shape[1:])}",
            where=where,
            fix="merge tensors of one shape (check that the models share an architecture)",
        )
    for name, x in (("base", base), ("models", models)):
        if x is not None and not jnp.issubdtype(x.dtype, jnp.floating):
            raise ConfigError(
                f"{method} merges floating-point tensors; {name} has dtype {x.dtype}",
                where=where,
                fix="merge only floating-point parameters (copy integer buffers unchanged)",
            )


def _per_model(method: str, name: str, values, n: int) -> tuple[float, ...]:
    """A per-model parameter as a tuple of ``n`` finite Python floats."""
    where = f"merge_method {method}, parameter {name}"
    if values is None:
        raise ConfigError(
            f"{method} needs {name}, one value per non-base model", where=where, fix=f"set {name}"
        )
    if isinstance(values, Real):
        values = (values,) * n
    values = tuple(values)
    if len(values) != n:
        raise ConfigError(
            f"{name} has {len(values)} values for {n} non-base models",
            where=where,
            fix=f"give one {name} per non-base model",
        )
    for v in values:
        if isinstance(v, bool) or not isinstance(v, Real) or not np.isfinite(v):
            raise ConfigError(
                f"{name} values must be finite numbers; got {values}",
                where=where,
                fix=f"set {name} to numbers",
            )
    return tuple(float(v) for v in values)


def _shared_number(method: str, name: str, value, *, integer: bool = False, low=None):
    where = f"merge_method {method}, parameter {name}"
    kind = int if integer else Real
    if isinstance(value, bool) or not isinstance(value, kind) or not np.isfinite(value):
        raise ConfigError(
            f"{name} must be a finite {'integer' if integer else 'number'}; got {value!r}",
            where=where,
            fix=f"set {name} to a {'whole ' if integer else ''}number",
        )
    if low is not None and value < low:
        raise ConfigError(
            f"{name} must be >= {low}; got {value!r}", where=where, fix=f"set {name} >= {low}"
        )
    return value


def slerp_leaf(base: jax.Array, models: jax.Array, *, t) -> jax.Array:
    """SLERP from ``base`` [...] (t = 0) to ``models[0]`` (t = 1) of ``models`` [1, ...].

    The tensors are flattened to one vector each. ``t`` is mergekit's
    interpolation factor (any real number; it may also be a traced scalar).
    Collinear and antipodal pairs (|cos θ| > 0.9995) are interpolated linearly.
    The formula is in the module docstring.

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import slerp_leaf
    >>> print(jax.jit(slerp_leaf)(jnp.array([1.0, 0.0]), jnp.array([[0.0, 1.0]]), t=1 / 3))
    [0.8660 0.5   ]

    (sin(60°) / sin(90°) · a + sin(30°) / sin(90°) · b = [cos 30°, sin 30°].)

    References: Shoemake 1985, Animating Rotation with Quaternion Curves, SIGGRAPH '85; mergekit's
    ``slerp``: Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models,
    arXiv:2403.13257.
    """
    base, models = _arrays(base, models)
    _check_inputs(
        "slerp",
        base,
        models,
        base_required=True,
        min_models=1,
        max_models=1,
        rule="slerp interpolates between the base model and exactly one other model;"
        " use multislerp, nuslerp or karcher for more",
    )
    if t is None:
        raise ConfigError(
            "slerp needs t", where="merge_method slerp, parameter t", fix="set t (a number)"
        )
    dot_threshold, eps = 0.9995, 1e-8
    dtype = _io_dtype(base, models)
    work = work_dtype(dtype)
    a = base.astype(work).reshape(-1)
    b = models[0].astype(work).reshape(-1)
    t = jnp.asarray(t, work)
    if a.size == 0:
        return base.astype(dtype)
    norm_a = _norm(a)
    norm_b = _norm(b)
    norm_a = jnp.where(norm_a > eps, norm_a, 1)
    norm_b = jnp.where(norm_b > eps, norm_b, 1)
    dot = jnp.clip(jnp.sum((a / norm_a) * (b / norm_b)), -1, 1)
    linear = jnp.abs(dot) > dot_threshold
    theta = jnp.arccos(jnp.where(linear, 0, dot))
    sin_theta = jnp.sin(theta)
    coef_a = jnp.where(linear, 1 - t, jnp.sin((1 - t) * theta) / sin_theta)
    coef_b = jnp.where(linear, t, jnp.sin(t * theta) / sin_theta)
    return (coef_a * a + coef_b * b).reshape(base.shape).astype(dtype)


def _nuslerp(t: float, v0: jax.Array, v1: jax.Array, *, row_wise: bool, flatten: bool):
    """SLERP of v0 and v1 per row (last axis; first axis if row_wise) or flattened."""
    eps = 1e-8
    shape = v0.shape
    if flatten or v0.ndim == 0:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = jnp.swapaxes(v0, 0, -1), jnp.swapaxes(v1, 0, -1)

    def unit(x):
        return x / jnp.maximum(_norm(x, axis=-1, keepdims=True), 1e-7)

    cos_theta = jnp.clip(jnp.sum(unit(v0) * unit(v1), axis=-1, keepdims=True), -1, 1)
    colinear = (1 - jnp.square(cos_theta)) <= eps**2
    theta = jnp.arccos(jnp.where(colinear, 0, cos_theta))
    sin_theta = jnp.sin(theta)
    result = (jnp.sin((1 - t) * theta) * v0 + jnp.sin(t * theta) * v1) / sin_theta
    result = jnp.where(colinear, (1 - t) * v0 + t * v1, result)
    if row_wise and not flatten and len(shape) > 0:
        result = jnp.swapaxes(result, 0, -1)
    return result.reshape(shape)


def nuslerp_leaf(
    base: jax.Array | None,
    models: jax.Array,
    *,
    weight,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
) -> jax.Array:
    """NuSLERP of the two ``models`` [2, ...] with ``weight`` = (w_0, w_1), around ``base``.

    ``t = w_1 / (w_0 + w_1)`` (0.5 when |w_0 + w_1| < 1e-6). With a base, the
    task vectors ``models[i] - base`` are interpolated and the base added back.
    ``nuslerp_flatten`` (default): one direction for the whole tensor; otherwise
    one per row along the last axis, or along the first axis if
    ``nuslerp_row_wise``.

    As in mergekit, the (anti)parallel test 1 - cos²θ <= 1e-16 is finer than
    float32 resolution, so it fires only when cos θ rounds to exactly ±1; an
    antiparallel row that misses it divides by sin θ ~ 3e-4 and comes out very
    large, in mergekit as here (which rows miss it depends on rounding).

    Task vectors [1, 0] and [0, 1] around the base [1, 1], t = 1/2 (mergekit's
    ``nuslerp``, no paper):

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import nuslerp_leaf
    >>> merge = jax.jit(nuslerp_leaf, static_argnames="weight")   # weights are static
    >>> base = jnp.array([1.0, 1.0])
    >>> print(merge(base, jnp.array([[2.0, 1.0], [1.0, 2.0]]), weight=(1.0, 1.0)))
    [1.7071 1.7071]

    References: mergekit's ``nuslerp`` (no paper of its own): Goddard et al. 2024, Arcee's MergeKit:
    A Toolkit for Merging Large Language Models, arXiv:2403.13257; SLERP: Shoemake 1985, Animating
    Rotation with Quaternion Curves, SIGGRAPH '85.
    """
    base, models = _arrays(base, models)
    _check_inputs(
        "nuslerp",
        base,
        models,
        base_required=False,
        min_models=2,
        max_models=2,
        rule="nuslerp interpolates exactly two models (plus an optional base);"
        " use multislerp or karcher for more",
    )
    w = _per_model("nuslerp", "weight", weight, 2)
    total = w[0] + w[1]
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    dtype = _io_dtype(base, models)
    work = work_dtype(dtype)
    v0, v1 = models[0].astype(work), models[1].astype(work)
    opts = dict(row_wise=bool(nuslerp_row_wise), flatten=bool(nuslerp_flatten))
    if base is None:
        return _nuslerp(t, v0, v1, **opts).astype(dtype)
    b = base.astype(work)
    return (b + _nuslerp(t, v0 - b, v1 - b, **opts)).astype(dtype)


def multislerp_leaf(
    base: jax.Array | None,
    models: jax.Array,
    *,
    weight,
    normalize_weights: bool = True,
    eps: float = 1e-8,
) -> jax.Array:
    """Multi-SLERP: weighted barycentre on the hypersphere of ``models`` [N, ...].

    ``weight``: one value per model. With a base, the task vectors
    ``models[i] - base`` are interpolated and the base added back. One model is
    returned unchanged (mergekit's shortcut, base ignored).

    Where mergekit stops: if the weighted mean of the unit vectors is shorter
    than ``eps`` (antipodal inputs whose weights cancel), mergekit falls back to
    the linear combination sum_i w_i x_i for two models and raises for more.
    This function returns that linear combination (plus the base) for any N,
    finite and without an error, so it can run under ``jax.jit``.

    Weights (2, 1, 1) on directions [1, 0], [0, 1], [0, 1] give the 45° direction
    with the weighted mean norm 1
    (https://goddard.blog/posts/multislerp-wow-what-a-cool-idea):

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import multislerp_leaf
    >>> merge = jax.jit(multislerp_leaf, static_argnames="weight")
    >>> x = jnp.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    >>> print(merge(None, x, weight=(2.0, 1.0, 1.0)))
    [0.7071 0.7071]
    """
    base, models = _arrays(base, models)
    _check_inputs(
        "multislerp",
        base,
        models,
        base_required=False,
        min_models=1,
        rule="list at least one model",
    )
    n = models.shape[0]
    w = _per_model("multislerp", "weight", weight, n)
    eps = _shared_number("multislerp", "eps", eps, low=0)
    if normalize_weights and sum(w) == 0:
        raise ConfigError(
            f"weights {list(w)} sum to zero and normalize_weights divides by their sum",
            where="merge_method multislerp, parameter weight",
            fix="change the weights, or set normalize_weights: false",
        )
    dtype = _io_dtype(base, models)
    if n == 1:
        return models[0].astype(dtype)
    work = work_dtype(dtype)
    x = models.astype(work)
    if base is not None:
        x = x - base.astype(work)[None]
    flat = x.reshape(n, -1)
    wv = jnp.asarray(w, work)
    if normalize_weights:
        wv = wv / wv.sum()

    norms = _norm(flat, axis=-1, keepdims=True)  # [N, 1]
    units = flat / (norms + eps)
    mean = model_sum(units * wv[:, None])
    mean_norm = _norm(mean)
    degenerate = mean_norm < eps
    mean = mean / jnp.where(degenerate, 1, mean_norm)

    dots = (units @ mean)[:, None]  # a mat-vec: XLA:CPU runs (units * mean).sum(-1) slowly
    tangent = model_sum((units - dots * mean) * wv[:, None])
    tangent_norm = _norm(tangent) + eps
    result = mean * jnp.cos(tangent_norm) + tangent * (jnp.sin(tangent_norm) / tangent_norm)
    result = result * (norms[:, 0] * wv).sum()

    linear = model_sum(flat * wv[:, None])
    result = jnp.where(degenerate, linear, result).reshape(models.shape[1:])
    if base is not None:
        result = result + base.astype(work)
    return result.astype(dtype)


def karcher_leaf(
    base: jax.Array | None,
    models: jax.Array,
    *,
    max_iter: int = 10,
    tol: float = 1e-5,
) -> jax.Array:
    """Karcher mean on the hypersphere of all inputs ``models`` [N, ...] (``base`` ignored).

    mergekit's karcher treats the base model as one more input, so ``models``
    holds every input in mergekit's order (the order decides which unit vector
    starts the iteration when the Euclidean mean vanishes). Uniform weights 1/N.

    The loop runs ``max_iter`` masked steps (``lax.fori_loop``, differentiable):
    a step after mergekit's early stop (|v| < tol) changes nothing, and inputs
    with θ_i < tol are left out of v, as mergekit's ``continue`` does. Edge
    cases give mergekit's numbers: inputs with norm <= tol are left out of the
    direction (but count in the scale); if all are, the result is zero; a single
    input is returned unchanged.

    Directions at 0°, 0° and 90°: the Karcher mean (arXiv:2603.04972) is at
    their mean angle, 30°:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import karcher_leaf
    >>> print(jax.jit(karcher_leaf)(None, jnp.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])))
    [0.8660 0.5   ]
    """
    del base
    models = jnp.asarray(models)
    _check_inputs("karcher", None, models, base_required=False, min_models=1)
    max_iter = _shared_number("karcher", "max_iter", max_iter, integer=True, low=0)
    tol = _shared_number("karcher", "tol", tol)
    n = models.shape[0]
    if n == 1:
        return models[0]
    work = work_dtype(models.dtype)
    x = models.astype(work).reshape(n, -1)
    norms = _norm(x, axis=1)  # [N]
    zero = norms == 0
    units = jnp.where(zero[:, None], 0, x / jnp.where(zero, 1, norms)[:, None])
    valid = norms > tol
    count = valid.sum()
    alphas = jnp.where(valid, 1 / jnp.maximum(count, 1).astype(work), 0)

    mean = model_sum(alphas[:, None] * units)
    mean_norm = _norm(mean)
    small = mean_norm < tol
    first_valid = units[jnp.argmax(valid)]
    mean = jnp.where(small, first_valid, mean / jnp.where(small, 1, mean_norm))

    def step(_, carry):
        mean, done = carry
        dot = jnp.clip(jnp.sum(units * mean, axis=1), -1, 1)  # [N]
        theta = jnp.arccos(jax.lax.stop_gradient(dot))
        active = valid & (theta >= tol)
        # arccos' is infinite at +-1: differentiate only strictly inside.
        inside = active & (jnp.abs(dot) < 1)
        theta = jnp.where(inside, jnp.arccos(jnp.where(inside, dot, 0)), theta)
        theta = jnp.where(active, theta, 1)
        coef = jnp.where(active, alphas * (theta / jnp.sin(theta)), 0)
        tangent = model_sum(coef[:, None] * (units - dot[:, None] * mean))
        tangent_norm = _norm(tangent)
        stop = done | (tangent_norm < tol)
        safe_norm = jnp.where(stop, 1, tangent_norm)
        moved = jnp.cos(safe_norm) * mean + jnp.sin(safe_norm) * (tangent / safe_norm)
        moved_norm = _norm(moved)
        renorm = moved_norm > tol
        moved = jnp.where(renorm, moved / jnp.where(renorm, moved_norm, 1), moved)
        return jnp.where(stop, mean, moved), stop

    mean, _ = jax.lax.fori_loop(0, max_iter, step, (mean, jnp.zeros((), bool)))
    scale = ((1 / n) * norms).sum()
    result = jnp.where(count > 0, scale * mean, 0)
    return result.reshape(models.shape[1:]).astype(models.dtype)


__all__ = ["karcher_leaf", "multislerp_leaf", "nuslerp_leaf", "slerp_leaf"]
