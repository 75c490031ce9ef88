"""Pytree functions and specs for mergekit's non-task-arithmetic methods.

The math, one tensor at a time, lives in ``_geometric.py`` (slerp, nuslerp,
multislerp, karcher) and ``_selective.py`` (model_stock, nearswap,
arcee_fusion, ram, ramplus_tl, passthrough, sce); here each method gets its
:class:`MergeMethod` (mergekit's parameters, defaults, base policy and model
count) and a thin function over whole pytrees whose settings may be scalars,
layer gradients or ``{filter, value}`` rules.

Example::

    merged = slerp(base, other, t=[0.0, 0.5, 1.0])           # t over the layers
    merged = model_stock(base, [ft_a, ft_b, ft_c])
    merged = multislerp([a, b, c], weights=[1.0, 1.0, 2.0])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxcombine.merging._engine import MergeMethod, Param, boolean, finite_number, merge
from jaxcombine.merging._geometric import karcher_leaf, multislerp_leaf, nuslerp_leaf, slerp_leaf
from jaxcombine.merging._methods import per_model, weights_sum_nonzero
from jaxcombine.merging._selective import (
    arcee_fusion_leaf,
    model_stock_leaf,
    nearswap_leaf,
    passthrough_leaf,
    ram_leaf,
    ramplus_tl_leaf,
    sce_leaf,
)

Setting = Any
NUMBER = finite_number()
POSITIVE = finite_number(0.0, low_open=True)
FRACTION = finite_number(0.0, 1.0)
# nuslerp and multislerp branch on their weights in Python, so these stay static.
WEIGHT = Param("weight", "model", check=NUMBER)


def _positive_int(value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return f"must be a positive integer, got {value!r}"
    return None


def _validate_multislerp(values: dict, where: str) -> None:
    if values["normalize_weights"]:
        weights_sum_nonzero(values, where)


SPECS = {
    spec.name: spec
    for spec in (
        MergeMethod(
            "slerp",
            slerp_leaf,
            (Param("t", check=NUMBER, traced=True),),
            base="required",
            min_models=1,
            max_models=1,
            reference="https://en.wikipedia.org/wiki/Slerp",
        ),
        MergeMethod(
            "nuslerp",
            nuslerp_leaf,
            (
                WEIGHT,
                Param("nuslerp_row_wise", default=False, check=boolean),
                Param("nuslerp_flatten", default=True, check=boolean),
            ),
            base="optional",
            min_models=2,
            max_models=2,
        ),
        MergeMethod(
            "multislerp",
            multislerp_leaf,
            (
                WEIGHT,
                Param("normalize_weights", default=True, check=boolean),
                Param("eps", default=1e-8, check=POSITIVE),
            ),
            base="optional",
            min_models=1,
            reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
            validate=_validate_multislerp,
        ),
        MergeMethod(
            "karcher",
            karcher_leaf,
            (
                Param("max_iter", default=10, check=_positive_int),
                Param("tol", default=1e-5, check=POSITIVE),
            ),
            base="none",
            reference="arXiv:2603.04972",
        ),
        MergeMethod(
            "model_stock",
            model_stock_leaf,
            (Param("filter_wise", default=False, check=boolean),),
            base="required",
            min_models=2,
            reference="arXiv:2403.19522",
        ),
        MergeMethod(
            "nearswap",
            nearswap_leaf,
            (Param("t", check=finite_number(0.0), traced=True),),
            base="required",
            min_models=1,
            max_models=1,
            reference="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
        ),
        MergeMethod(
            "arcee_fusion",
            arcee_fusion_leaf,
            (),
            base="required",
            min_models=1,
            max_models=1,
            reference="https://arcee.ai",
        ),
        MergeMethod(
            "ram",
            ram_leaf,
            (Param("epsilon", default=1e-5, check=finite_number(0.0)),),
            base="required",
            min_models=1,
            reference="arXiv:2601.13572",
        ),
        MergeMethod(
            "ramplus_tl",
            ramplus_tl_leaf,
            (
                Param("r", default=0.1, check=NUMBER),
                Param("alpha", default=0.2, check=finite_number(0.0)),
                Param("epsilon", default=1e-5, check=finite_number(0.0)),
            ),
            base="required",
            min_models=1,
            reference="arXiv:2601.13572",
        ),
        MergeMethod(
            "passthrough",
            passthrough_leaf,
            (Param("scale", "model", default=None, check=NUMBER),),
            base="none",
            min_models=1,
            max_models=1,
        ),
        MergeMethod(
            "sce",
            sce_leaf,
            (
                Param("select_topk", default=1.0, check=FRACTION),
                Param("int8_mask", default=False, check=boolean),
            ),
            base="required",
            min_models=1,
            reference="arXiv:2408.07990",
        ),
    )
}


def _call(name, models, base=None, *, num_layers=None, per=None, **shared):
    return merge(
        SPECS[name],
        models,
        base=base,
        model_parameters=per_model(len(models), **(per or {})),
        parameters={k: v for k, v in shared.items() if v is not None},
        num_layers=num_layers,
    )


def slerp(base, model, *, t: Setting, num_layers: int | None = None):
    """Spherical interpolation from ``base`` (t = 0) to ``model`` (t = 1), per tensor.

    Each tensor is flattened; with cos theta the cosine between the two,
    slerp = sin((1-t) theta)/sin theta * base + sin(t theta)/sin theta * model, and
    linear interpolation where |cos theta| > 0.9995 (mergekit's ``slerp``).
    ``t`` may be a layer gradient such as ``[0, 0.5, 1]`` or a list of filter rules.

    Two orthogonal unit vectors at t = 1/2 give a unit vector (lerp would give
    norm 0.71), and ``t=[0, 1]`` runs from the base in layer 0 to the model in
    the last layer:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, model = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
    >>> print(merging.slerp(base, model, t=0.5)["w"])          # [cos 45, sin 45]
    [0.7071 0.7071]
    >>> base3 = {"layers": [base] * 3}
    >>> merged = merging.slerp(base3, {"layers": [model] * 3}, t=[0.0, 1.0])
    >>> print(*[layer["w"] for layer in merged["layers"]])     # t = 0, 1/2, 1
    [1. 0.] [0.7071 0.7071] [0. 1.]

    References: Shoemake 1985, Animating Rotation with Quaternion Curves, SIGGRAPH '85; mergekit's
    ``slerp``: Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models,
    arXiv:2403.13257.
    """
    return _call("slerp", [model], base, num_layers=num_layers, t=t)


def nuslerp(
    models: Sequence[Any],
    *,
    weights: Sequence[Setting],
    base=None,
    nuslerp_row_wise: bool = False,
    nuslerp_flatten: bool = True,
    num_layers: int | None = None,
):
    """SLERP of two models (or of their task vectors, given a base) with t = w_1 / (w_0 + w_1).

    ``nuslerp_flatten`` (default) treats each tensor as one vector; otherwise
    rows are interpolated separately (along the first axis with
    ``nuslerp_row_wise``). mergekit's ``nuslerp`` (no paper); the formula is
    :func:`slerp`'s, sin((1-t) theta)/sin theta x_0 + sin(t theta)/sin theta x_1.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> a, b = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
    >>> merged = merging.nuslerp([a, b], weights=[1.0, 3.0])   # t = 3/4
    >>> print(merged["w"].round(4))                           # [cos 67.5, sin 67.5]
    [0.3827 0.9239]

    References: mergekit's ``nuslerp`` (no paper of its own): Goddard et al. 2024, Arcee's MergeKit:
    A Toolkit for Merging Large Language Models, arXiv:2403.13257; SLERP: Shoemake 1985, Animating
    Rotation with Quaternion Curves, SIGGRAPH '85.
    """
    return _call(
        "nuslerp",
        models,
        base,
        num_layers=num_layers,
        per={"weight": weights},
        nuslerp_row_wise=nuslerp_row_wise,
        nuslerp_flatten=nuslerp_flatten,
    )


def multislerp(
    models: Sequence[Any],
    *,
    weights: Sequence[Setting],
    base=None,
    normalize_weights: bool = True,
    eps: float = 1e-8,
    num_layers: int | None = None,
):
    """Barycentric interpolation of N models on the hypersphere (mergekit's ``multislerp``).

    Directions are averaged in the tangent space at their weighted mean and
    mapped back; the norm is the weighted mean of the norms. With a base the
    task vectors are interpolated and the base added back. Up to rounding::

        merged = (sum_i w_i x_i / |x_i|) / |sum_i w_i x_i / |x_i|| * sum_i w_i |x_i|

    (weights normalised to sum 1; https://goddard.blog/posts/multislerp-wow-what-a-cool-idea).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> a, b = {"w": jnp.array([2.0, 0.0])}, {"w": jnp.array([0.0, 4.0])}
    >>> print(merging.multislerp([a, b], weights=[1.0, 1.0])["w"])   # 3 [cos 45, sin 45]
    [2.1213 2.1213]
    """
    return _call(
        "multislerp",
        models,
        base,
        num_layers=num_layers,
        per={"weight": weights},
        normalize_weights=normalize_weights,
        eps=eps,
    )


def karcher(models: Sequence[Any], *, max_iter: int = 10, tol: float = 1e-5):
    """The Karcher (Riemannian) mean of the models' directions, scaled by their mean norm.

    arXiv:2603.04972 (mergekit's ``karcher``): uniform weights, fixed-point
    iteration on the unit sphere for at most ``max_iter`` steps, towards
    argmin_m sum_i arccos(<m, u_i>)^2 over unit m, u_i = x_i / |x_i|; the result
    is m * sum_i |x_i| / N.

    Directions at 0, 0 and 90 degrees: the Karcher mean lies at their mean
    angle, 30 degrees, where the normalised Euclidean mean (``multislerp``)
    lies at atan(1/2) = 26.6 degrees:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> x, y = {"w": jnp.array([1.0, 0.0])}, {"w": jnp.array([0.0, 1.0])}
    >>> print(merging.karcher([x, x, y])["w"])                 # [cos 30, sin 30]
    [0.8660 0.5   ]
    """
    return _call("karcher", models, max_iter=max_iter, tol=tol)


def model_stock(base, models: Sequence[Any], *, filter_wise: bool = False):
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): interpolate towards the average.

    With k fine-tunes whose task vectors have mean pairwise cosine cos theta,
    t = k cos theta / (1 + (k - 1) cos theta) and merged = t * mean_i theta_i +
    (1 - t) theta_0, per tensor (or per row with ``filter_wise``).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.array([1.0, 1.0])}
    >>> fts = [{"w": jnp.array([3.0, 1.0])}, {"w": jnp.array([2.0, 2.0])}]  # tau at 45 degrees
    >>> c = 2**-0.5
    >>> t = 2 * c / (1 + c)                                   # 0.828
    >>> print(merging.model_stock(base, fts)["w"])           # 1 + t ([2.5, 1.5] - 1)
    [2.2426 1.4142]
    >>> print(round(1 + 1.5 * t, 4), round(1 + 0.5 * t, 4))
    2.2426 1.4142
    """
    return _call("model_stock", models, base, filter_wise=filter_wise)


def nearswap(base, model, *, t: Setting, num_layers: int | None = None):
    """NearSwap: take ``model``'s value where it is within ~t of the base's.

    w = clip(t / |base - model|, 0, 1); merged = w * model + (1 - w) * base
    (per entry; mergekit's ``nearswap``, no paper:
    https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001). Entries
    within t of the base take the model's value, the others move t towards it:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, model = {"w": jnp.zeros(3)}, {"w": jnp.array([0.05, 0.5, 2.0])}
    >>> print(merging.nearswap(base, model, t=0.1)["w"])
    [0.05 0.1  0.1 ]

    References: mergekit's ``nearswap`` (no paper of its own): Goddard et al. 2024, Arcee's
    MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257.
    """
    return _call("nearswap", [model], base, num_layers=num_layers, t=t)


def arcee_fusion(base, model):
    """Arcee Fusion: keep ``model``'s change only where its importance is an outlier.

    importance = |model - base| * KL(softmax(model) || softmax(base)) per row; a
    change is kept where importance >= median + 1.5 IQR (exact quantiles;
    mergekit's ``arcee_fusion``, no paper: https://arcee.ai).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(8)}
    >>> model = {"w": jnp.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0])}
    >>> print(merging.arcee_fusion(base, model)["w"])   # cut: (0.4 + 1.5 (0.6 - 0.2)) KL
    [0. 0. 0. 0. 0. 0. 0. 5.]
    """
    return _call("arcee_fusion", [model], base)


def ram(base, models: Sequence[Any], *, epsilon: float = 1e-5):
    """Reinforced Agent Merging (arXiv:2601.13572): entries changed by one model are kept
    whole; entries changed (|tau| > epsilon) by several are averaged over those models.

    merged = theta_0 + sum_i [|tau_i| > eps] tau_i / max(c, 1), c the number of
    models that changed the entry.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(3)}
    >>> a, b = {"w": jnp.array([1.0, 2.0, 0.0])}, {"w": jnp.array([3.0, 0.0, 0.0])}
    >>> print(merging.ram(base, [a, b])["w"])                 # (1 + 3) / 2, 2 alone, none
    [2. 2. 0.]
    """
    return _call("ram", models, base, epsilon=epsilon)


def ramplus_tl(
    base, models: Sequence[Any], *, r: float = 0.1, alpha: float = 0.2, epsilon: float = 1e-5
):
    """RAM+ (tensor-local, arXiv:2601.13572): RAM with unique entries scaled up by
    1 + r * clip(shared / unique, 0, alpha) per model.

    ``shared`` and ``unique`` count the model's changed entries in the tensor
    that other models changed too, and that only it changed.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(3)}
    >>> a, b = {"w": jnp.array([1.0, 2.0, 0.0])}, {"w": jnp.array([3.0, 0.0, 0.0])}
    >>> print(merging.ramplus_tl(base, [a, b])["w"])          # a's unique 2 x (1 + 0.1 * 0.2)
    [2.   2.04 0.  ]
    """
    return _call("ramplus_tl", models, base, r=r, alpha=alpha, epsilon=epsilon)


def passthrough(model, *, scale: Setting = None, num_layers: int | None = None):
    """A copy of one model, each tensor optionally multiplied by ``scale`` (a setting).

    mergekit's ``passthrough``, the method of frankenmerges (layers stacked from
    several models with ``slices``, see :mod:`jaxcombine.merging.mergekit`).
    A rule that matches no tensor leaves it unscaled:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> model = {"mlp": jnp.array([1.0, 2.0]), "norm": jnp.array([1.0, 1.0])}
    >>> out = merging.passthrough(model, scale=[{"filter": "mlp", "value": 0.5}])
    >>> print(out["mlp"], out["norm"])
    [0.5 1. ] [1. 1.]

    References: mergekit's ``passthrough`` (no paper of its own): Goddard et al. 2024, Arcee's
    MergeKit: A Toolkit for Merging Large Language Models, arXiv:2403.13257; a published
    layer-stacking merge: depth up-scaling, Kim et al. 2023, SOLAR 10.7B: Scaling Large Language
    Models with Simple yet Effective Depth Up-Scaling, arXiv:2312.15166.
    """
    return _call("passthrough", [model], num_layers=num_layers, per={"scale": [scale]})


def sce(base, models: Sequence[Any], *, select_topk: Setting = 1.0):
    """SCE (Wan et al. 2024, arXiv:2408.07990): Select, Calculate, Erase.

    Keep the ``select_topk`` fraction of entries with the largest variance across
    task vectors, weight each task vector by its mean squared entry, erase
    entries that disagree with the elected sign, and average::

        merged = theta_0 + sum_i w_i m_i tau_i / sum_i w_i m_i,
        w_i = mean(tau_i^2) / sum_k mean(tau_k^2),  m_i = [sign(tau_i) = sign(sum_k tau_k)]

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(3)}
    >>> a = {"w": jnp.array([1.0, 2.0, -1.0])}     # mean square 2
    >>> b = {"w": jnp.array([3.0, -1.0, -1.0])}    # mean square 11/3; its -1 is erased
    >>> print(merging.sce(base, [a, b])["w"])      # (6 * 1 + 11 * 3) / 17 = 2.294
    [ 2.2941  2.     -1.    ]
    """
    return _call("sce", models, base, select_topk=select_topk)
