"""Base-anchored merges, one tensor at a time: Model Stock, NearSwap, Arcee Fusion,
RAM, RAM+ (tensor-local), SCE, and passthrough.

Each function takes the base tensor ``base`` [...] and the other models stacked
on a leading axis, ``models`` [N, ...], and returns one tensor of the base's
shape with mergekit 0.1.5's semantics. Task vectors are tau_i = theta_i - theta_0.
Arithmetic is in float32 (float64 for float64 inputs); the result has the
input dtype, except where mergekit's result is promoted to float32
(``arcee_fusion`` and ``ramplus_tl`` return float32 for 16-bit inputs, as
mergekit does). mergekit runs these methods op by op in the input dtype, so for
16-bit inputs the results differ from its by 16-bit rounding (and a rounding
can move an entry across a threshold: arcee_fusion's, RAM's epsilon, SCE's
top-k).

**Model Stock** (Jang et al. 2024, arXiv:2403.19522): with cos θ the mean
pairwise cosine between the N task vectors (of the whole tensor, or of each
row along the last axis with ``filter_wise``)::

    t      = N cos θ / (1 + (N - 1) cos θ)          (0 if |1 + (N-1) cos θ| < 1e-6)
    merged = t · mean_i theta_i + (1 - t) · theta_0

**NearSwap** (https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001):
take the model's value where it is close to the base::

    w = clip(t / max(|theta_1 - theta_0|, 1e-6), 0, 1);   merged = w theta_1 + (1 - w) theta_0

**Arcee Fusion** (https://arcee.ai): importance
s = |tau| · KL(softmax(theta_1) || softmax(theta_0)) (per row, along the last
axis, each softmax + 1e-8); the model's value is kept where
s >= median(s) + 1.5 (q3(s) - q1(s)), the base's elsewhere.

**RAM** (Reinforced Agent Merging, arXiv:2601.13572): entries where only one
task vector is non-zero (|tau_i| > epsilon) take it unscaled; entries shared by
c > 1 models take their mean::

    merged = theta_0 + sum_i [c == 1] tau_i + [c > 1] tau_i / c

**RAM+ (tensor-local)** scales each model's unique entries by
lambda_i = 1 + r · clip(shared_i / unique_i, 0, alpha), counting model i's
shared and unique non-zero entries in this tensor.

**SCE** (Select, Calculate, Erase; Wan et al. 2024, arXiv:2408.07990): keep
the ``select_topk`` fraction of entries with the largest variance across the
task vectors, weight each task vector by its mean square (normalised to sum 1),
erase entries whose sign disagrees with the sign of sum_i tau_i, and average::

    merged = theta_0 + sum_i w_i m_i tau_i / max(sum_i w_i m_i, 1e-6)

**Passthrough** returns its single input, times ``scale`` if given.

Example::

    merged = model_stock_leaf(base_w, jnp.stack([ft1_w, ft2_w, ft3_w]))
    merged = sce_leaf(base_w, jnp.stack([ft1_w, ft2_w]), select_topk=0.1)
"""

from __future__ import annotations

from numbers import Real

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError
from jaxcombine.merging._geometric import (
    _arrays,
    _check_inputs,
    _io_dtype,
    _norm,
    _shared_number,
)
from jaxcombine.merging._ops import model_sum, top_k_mask, work_dtype


def model_stock_leaf(base: jax.Array, models: jax.Array, *, filter_wise: bool = False) -> jax.Array:
    """Model Stock of ``models`` [N >= 2, ...] around ``base`` [...].

    ``filter_wise``: one ratio t per row (slice along the last axis; a vector
    is one row) instead of one for the whole tensor. Where the denominator
    1 + (N - 1) cos θ vanishes the base is kept, as in mergekit. The formula is
    in the module docstring (Jang et al. 2024, arXiv:2403.19522).

    Row 0's task vectors are orthogonal (t = 0: the base), row 1's parallel
    (t = 1: their mean); over the whole tensor cos θ = 2/3 and t = 0.8:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import model_stock_leaf
    >>> merge = jax.jit(model_stock_leaf, static_argnames="filter_wise")
    >>> base = jnp.zeros((2, 2))
    >>> models = jnp.array([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 1.0]]])
    >>> print(merge(base, models, filter_wise=True))
    [[0. 0.]
     [1. 1.]]
    >>> print(merge(base, models))
    [[0.4 0.4]
     [0.8 0.8]]
    """
    base, models = _arrays(base, models)
    _check_inputs(
        "model_stock",
        base,
        models,
        base_required=True,
        min_models=2,
        rule="model_stock needs a base model and at least two fine-tuned models",
    )
    n = models.shape[0]
    dtype = _io_dtype(base, models)
    work = work_dtype(dtype)
    w0 = base.astype(work)
    ws = models.astype(work)
    if not filter_wise or base.ndim <= 1:
        w0 = w0.reshape(1, -1)
        ws = ws.reshape(n, 1, -1)
    offsets = ws - w0[None]  # [N, ..., C]
    norms = _norm(offsets, axis=-1)  # [N, ...]
    total = jnp.zeros(norms.shape[1:], work)
    for i in range(n):
        for j in range(i + 1, n):
            dot = (offsets[i] * offsets[j]).sum(axis=-1)
            total = total + jnp.clip(dot / jnp.maximum(norms[i] * norms[j], 1e-6), -1, 1)
    cos_theta = (total / (n * (n - 1) // 2))[..., None]
    denominator = 1 + (n - 1) * cos_theta
    singular = jnp.abs(denominator) < 1e-6
    t = jnp.where(singular, 0, (n * cos_theta) / jnp.where(singular, 1, denominator))
    average = model_sum(ws) / n
    return (t * average + (1 - t) * w0).reshape(base.shape).astype(dtype)


def nearswap_leaf(base: jax.Array, models: jax.Array, *, t) -> jax.Array:
    """NearSwap of ``models`` [1, ...] into ``base``: w = clip(t / |theta_1 - theta_0|, 0, 1).

    merged = w theta_1 + (1 - w) theta_0, per entry (no paper; see the module docstring).

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import nearswap_leaf
    >>> print(jax.jit(nearswap_leaf)(jnp.zeros(3), jnp.array([[0.05, 0.5, 2.0]]), t=0.1))
    [0.05 0.1  0.1 ]

    References: mergekit's ``nearswap`` (no paper of its own): Goddard et al. 2024, Arcee's
    MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257.
    """
    base, models = _arrays(base, models)
    _check_inputs(
        "nearswap",
        base,
        models,
        base_required=True,
        min_models=1,
        max_models=1,
        rule="nearswap takes the base model and exactly one other model",
    )
    if t is None:
        raise ConfigError(
            "nearswap needs t", where="merge_method nearswap, parameter t", fix="set t (a number)"
        )
    dtype = _io_dtype(base, models)
    work = work_dtype(dtype)
    a = base.astype(work)
    b = models[0].astype(work)
    weight = jnp.clip(t / jnp.maximum(jnp.abs(a - b), 1e-6), 0, 1)
    return (weight * b + (1 - weight) * a).astype(dtype)


def _quantile_indices(size: int) -> tuple[int, int, int]:
    """mergekit's ``long(q * (size - 1))`` for q = 1/4, 1/2, 3/4, in exact integers."""
    m = size - 1
    return m // 4, m // 2, (3 * m) // 4


def arcee_fusion_leaf(base: jax.Array, models: jax.Array) -> jax.Array:
    """Arcee Fusion of ``models`` [1, ...] into ``base``: keep the model's outlying changes.

    Quantiles are exact: the sorted importance scores at mergekit's indices
    ``floor(q (n - 1))``. mergekit sorts all n scores when n <= 1,000,000 (the
    same numbers), and for larger tensors a random sample of 1,000,000 drawn
    with replacement, so its threshold there is random and differs slightly.
    Returns float32 for 16-bit inputs, like mergekit (its mask is float32).

    (No paper: https://arcee.ai.) With one row the KL factor is common to all
    entries, so the outlying change 5 (above median + 1.5 IQR of |tau|) alone
    is kept:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import arcee_fusion_leaf
    >>> model = jnp.array([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0]])
    >>> print(jax.jit(arcee_fusion_leaf)(jnp.zeros(8), model))
    [0. 0. 0. 0. 0. 0. 0. 5.]
    """
    base, models = _arrays(base, models)
    _check_inputs(
        "arcee_fusion",
        base,
        models,
        base_required=True,
        min_models=1,
        max_models=1,
        rule="arcee_fusion takes the base model and exactly one other model",
    )
    dtype = jnp.result_type(_io_dtype(base, models), jnp.float32)
    work = work_dtype(dtype)
    b = base.astype(work)
    m = models[0].astype(work)
    if b.ndim == 0:
        b, m = b.reshape(1), m.reshape(1)
    eps = 1e-8
    p = jax.nn.softmax(m, axis=-1) + eps
    q = jax.nn.softmax(b, axis=-1) + eps
    kl = jnp.sum(p * jnp.log(p / q), axis=-1, keepdims=True)
    importance = jnp.abs(m - b) * kl
    if importance.size == 0:
        return base.astype(dtype)
    ordered = jnp.sort(importance.reshape(-1))
    i1, i2, i3 = _quantile_indices(importance.size)
    threshold = ordered[i2] + 1.5 * (ordered[i3] - ordered[i1])
    mask = (importance >= threshold).astype(work)
    return (b + (m - b) * mask).reshape(base.shape).astype(dtype)


def _ram_vectors(base, models, epsilon, work):
    n = models.shape[0]
    tv = (models.astype(work) - base.astype(work)[None]).reshape(n, -1)
    nonzero = jnp.abs(tv) > epsilon  # [N, D]
    counts = model_sum(nonzero.astype(jnp.int32))  # [D]
    return tv, nonzero, counts, counts > 1, counts == 1


def ram_leaf(base: jax.Array, models: jax.Array, *, epsilon: float = 1e-5) -> jax.Array:
    """RAM: entries changed (|tau_i| > ``epsilon``) by one model take its change, shared
    entries the mean of the changes. No models: the base.

    A change of 1e-6 is below ``epsilon`` and counts as none (arXiv:2601.13572):

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import ram_leaf
    >>> print(jax.jit(ram_leaf)(jnp.zeros(2), jnp.array([[1e-6, 2.0], [0.0, 4.0]])))
    [0. 3.]
    """
    base, models = _arrays(base, models)
    _check_inputs("ram", base, models, base_required=True)
    epsilon = _shared_number("ram", "epsilon", epsilon)
    dtype = _io_dtype(base, models)
    if models.shape[0] == 0:
        return base.astype(dtype)
    work = work_dtype(dtype)
    tv, nonzero, counts, overlap, unique = _ram_vectors(base, models, epsilon, work)
    tv = tv * nonzero
    merged = model_sum(tv * unique + tv * overlap / jnp.maximum(counts, 1))
    return (base.astype(work) + merged.reshape(base.shape)).astype(dtype)


def ramplus_tl_leaf(
    base: jax.Array,
    models: jax.Array,
    *,
    r: float = 0.1,
    alpha: float = 0.2,
    epsilon: float = 1e-5,
) -> jax.Array:
    """RAM+ (tensor-local): RAM with model i's unique entries scaled by
    lambda_i = 1 + r clip(shared_i / max(unique_i, epsilon), 0, alpha).

    lambda is computed in float32 as in mergekit (also for float64 inputs), and
    the result is float32 for 16-bit inputs (mergekit promotes by lambda).

    (arXiv:2601.13572.) Model 0 changes one shared and one unique entry:
    lambda_0 = 1 + 0.1 * clip(1 / 1, 0, 0.2) = 1.02 scales its unique 2:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import ramplus_tl_leaf
    >>> models = jnp.array([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    >>> print(jax.jit(ramplus_tl_leaf)(jnp.zeros(3), models))
    [2.   2.04 0.  ]
    """
    base, models = _arrays(base, models)
    _check_inputs("ramplus_tl", base, models, base_required=True)
    r = _shared_number("ramplus_tl", "r", r)
    alpha = _shared_number("ramplus_tl", "alpha", alpha)
    epsilon = _shared_number("ramplus_tl", "epsilon", epsilon)
    dtype = jnp.result_type(_io_dtype(base, models), jnp.float32)
    if models.shape[0] == 0:
        return base.astype(_io_dtype(base, models))
    work = work_dtype(dtype)
    tv, nonzero, counts, overlap, unique = _ram_vectors(base, models, epsilon, work)
    shared_counts = (nonzero & overlap).sum(axis=1).astype(jnp.float32)
    unique_counts = (nonzero & unique).sum(axis=1).astype(jnp.float32)
    rho = shared_counts / jnp.maximum(unique_counts, jnp.float32(epsilon))
    lambda_ = 1 + jnp.float32(r) * jnp.clip(rho, 0, jnp.float32(alpha))
    tv = tv * nonzero
    scaled = tv * unique * lambda_.astype(work)[:, None]
    merged = model_sum(scaled + tv * overlap / jnp.maximum(counts, 1))
    return (base.astype(work) + merged.reshape(base.shape)).astype(dtype)


def passthrough_leaf(base: jax.Array | None, models: jax.Array, *, scale=None) -> jax.Array:
    """The single input, times ``scale`` (a 1-tuple, or None for unscaled).

    The input is ``models[0]`` of ``models`` [1, ...]; mergekit ignores the base
    model, so ``base`` is only used when ``models`` is empty.

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import passthrough_leaf
    >>> print(passthrough_leaf(None, jnp.array([[1.0, 2.0]]), scale=(2.0,)))
    [2. 4.]

    References: mergekit's ``passthrough`` (no paper of its own): Goddard et al. 2024, Arcee's
    MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257.
    """
    where = "merge_method passthrough"
    base, models = _arrays(base, models)
    if base is not None and models.ndim >= 1 and models.shape[0] == 0:
        models = base[None]
    _check_inputs(
        "passthrough",
        None,
        models,
        base_required=False,
        min_models=1,
        max_models=1,
        rule="passthrough copies exactly one model; use slices to take layers from several",
    )
    x = models[0]
    if scale is None:
        return x
    if isinstance(scale, Real):
        scale = (scale,)
    scale = tuple(scale)
    if len(scale) != 1:
        raise ConfigError(
            f"scale has {len(scale)} values for one input",
            where=f"{where}, parameter scale",
            fix="give one scale (or none)",
        )
    (value,) = scale
    if value is None:
        return x
    _shared_number("passthrough", "scale", value)
    work = work_dtype(x.dtype)
    return (x.astype(work) * value).astype(x.dtype)


def _topk_variance_mask(tv: jax.Array, density: float) -> jax.Array:
    """mergekit's SCE selection: the floor(nnz · density) entries of largest variance.

    tv: [N, D]. nnz counts the entries whose task vectors are not all equal.
    Ties at the cut are broken by position (torch.topk leaves the order unspecified).
    """
    n, d = tv.shape
    mean = model_sum(tv) / n
    var = model_sum(jnp.square(tv - mean)) / n
    var = jnp.where(jnp.all(tv == tv[:1], axis=0), 0, var)  # exact zeros, like Welford's
    nonzero = jnp.count_nonzero(var)
    k = jnp.floor(nonzero.astype(jnp.float32) * jnp.float32(density)).astype(jnp.int32)
    return top_k_mask(var, k).astype(tv.dtype)


def sce_leaf(
    base: jax.Array,
    models: jax.Array,
    *,
    int8_mask: bool = False,
    select_topk: float = 1.0,
) -> jax.Array:
    """SCE of ``models`` [N, ...] around ``base``. No models: the base.

    ``select_topk`` < 1 keeps that fraction of the entries with non-zero
    variance across the task vectors (the largest variances), <= 0 none.
    ``int8_mask`` only saves memory in mergekit; accepted and ignored. The
    formula is in the module docstring (Wan et al. 2024, arXiv:2408.07990).

    Entries 1 and 2 vary across the task vectors (variances 1 and 2.25);
    ``select_topk=0.5`` keeps entry 2 alone, where the elected sign is - and
    model 1's -2 is the only agreeing change:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine.merging import sce_leaf
    >>> merge = jax.jit(sce_leaf, static_argnames="select_topk")
    >>> models = jnp.array([[1.0, 1.0, 1.0, 0.0], [1.0, 3.0, -2.0, 0.0]])
    >>> print(merge(jnp.zeros(4), models, select_topk=0.5))
    [ 0.  0. -2.  0.]
    """
    del int8_mask
    base, models = _arrays(base, models)
    _check_inputs("sce", base, models, base_required=True)
    select_topk = _shared_number("sce", "select_topk", select_topk)
    dtype = _io_dtype(base, models)
    n = models.shape[0]
    if n == 0:
        return base.astype(dtype)
    work = work_dtype(dtype)
    tv = (models.astype(work) - base.astype(work)[None]).reshape(n, -1)
    if select_topk <= 0:
        tv = tv * 0
    elif select_topk < 1:
        tv = tv * _topk_variance_mask(tv, select_topk)[None]
    elected = jnp.where(model_sum(tv) >= 0, 1, -1)
    agree = jnp.sign(tv) == elected  # [N, D]
    weights = jnp.square(tv).mean(axis=1)  # [N]
    weight_sum = weights.sum()
    tiny = jnp.abs(weight_sum) < 1e-6
    weights = jnp.where(tiny, 1 / n, weights / jnp.where(tiny, 1, weight_sum))
    erased = weights[:, None] * agree
    merged = model_sum(tv * erased) / jnp.maximum(model_sum(erased), 1e-6)
    return (base.astype(work) + merged.reshape(base.shape)).astype(dtype)


__all__ = [
    "arcee_fusion_leaf",
    "model_stock_leaf",
    "nearswap_leaf",
    "passthrough_leaf",
    "ram_leaf",
    "ramplus_tl_leaf",
    "sce_leaf",
]
