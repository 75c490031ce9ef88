"""Linear averaging and the task-arithmetic family over whole pytrees.

Every function here is a thin wrapper: it turns keyword arguments into
mergekit-style settings (one per model, each a scalar, a layer gradient or a
list of ``{filter, value}`` rules) and calls :func:`jaxcombine.merging.merge`
with the method's :class:`MergeMethod`. The math lives in
``_task_arithmetic.py`` and ``_sparsify.py``.

Example::

    merged = ties(base, [math_ft, code_ft], weights=[1.0, 0.5], densities=[0.2, 0.2])
    merged = dare_ties(base, [a, b], weights=[1, 1], densities=[0.3, 0.3],
                       key=jax.random.key(0))
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError
from jaxcombine.merging._engine import MergeMethod, Param, boolean, finite_number, merge
from jaxcombine.merging._ops import kth_largest_bits, magnitude_bits
from jaxcombine.merging._sparsify import RESCALE_MODES, check_density
from jaxcombine.merging._task_arithmetic import linear_leaf, task_arithmetic_leaf
from jaxcombine.tree import check_same_structure

Setting = Any

WEIGHT = Param("weight", "model", check=finite_number(), traced=True)
DENSITY = Param("density", "model", 1.0, finite_number(0.0, 1.0, low_open=True))
LAMBDA = Param("lambda", "shared", 1.0, finite_number(), arg="lambda_", traced=True)
INT8_MASK = Param("int8_mask", "shared", False, boolean)


def _rescale_mode(value):
    if isinstance(value, bool) or value in RESCALE_MODES:
        return None
    return f"must be true, false or one of {', '.join(RESCALE_MODES)}; got {value!r}"


def weights_sum_nonzero(values: dict, where: str) -> None:
    """Where a method divides by sum_i w_i, that sum must not be zero."""
    if abs(sum(values["weight"])) < 1e-8:
        raise ConfigError(
            f"weights {list(values['weight'])} sum to zero, and the merge divides by their sum",
            where=where,
            fix="change the weights, or turn normalize off",
        )


def _validate_gta(values: dict, where: str) -> None:
    if "epsilon" in values:
        for i, (d, e) in enumerate(zip(values["density"], values["epsilon"], strict=True)):
            check_density(d, "della_magprune", e, where=f"{where} (model {i})")
    if values["normalize"] and values["consensus"] is None:
        weights_sum_nonzero(values, where)


def _validate_linear(values: dict, where: str) -> None:
    if values["normalize"]:
        weights_sum_nonzero(values, where)


def gta_method(
    name: str,
    *,
    sparsify: str | None,
    consensus: str | None,
    normalize: bool,
    rescale: bool | str,
    disjoint: str = "weighted",
    reference: str = "",
) -> MergeMethod:
    """The :class:`MergeMethod` of one choice of sparsify / consensus / defaults."""
    params = [
        WEIGHT,
        DENSITY,
        Param("normalize", "shared", normalize, boolean),
        Param("rescale", "shared", rescale, _rescale_mode),
        LAMBDA,
        INT8_MASK,
    ]
    if sparsify == "magnitude_outliers":
        params.append(Param("gamma", "model", 0.01, finite_number(0.0, 1.0)))
    if sparsify == "della_magprune":
        params.append(Param("epsilon", "model", 0.15, finite_number(0.0, 1.0)))
    return MergeMethod(
        name=name,
        leaf=task_arithmetic_leaf,
        params=tuple(params),
        base="required",
        random=sparsify in ("random", "della_magprune"),
        reference=reference,
        fixed={"sparsify": sparsify, "consensus": consensus, "disjoint": disjoint},
        validate=_validate_gta,
        elementwise=sparsify is None and consensus is None,
    )


GTA_SPECS = {
    spec.name: spec
    for spec in (
        gta_method(
            "task_arithmetic",
            sparsify=None,
            consensus=None,
            normalize=False,
            rescale=False,
            reference="arXiv:2212.04089",
        ),
        gta_method(
            "ties",
            sparsify="magnitude",
            consensus="sum",
            normalize=True,
            rescale=False,
            reference="arXiv:2306.01708",
        ),
        gta_method(
            "dare_ties",
            sparsify="random",
            consensus="sum",
            normalize=False,
            rescale=True,
            reference="arXiv:2311.03099",
        ),
        gta_method(
            "dare_linear",
            sparsify="random",
            consensus=None,
            normalize=False,
            rescale=True,
            reference="arXiv:2311.03099",
        ),
        gta_method(
            "breadcrumbs",
            sparsify="magnitude_outliers",
            consensus=None,
            normalize=False,
            rescale=False,
            reference="arXiv:2312.06795",
        ),
        gta_method(
            "breadcrumbs_ties",
            sparsify="magnitude_outliers",
            consensus="sum",
            normalize=False,
            rescale=False,
            reference="arXiv:2312.06795",
        ),
        gta_method(
            "della",
            sparsify="della_magprune",
            consensus="sum",
            normalize=True,
            rescale=True,
            reference="arXiv:2406.11617",
        ),
        gta_method(
            "della_linear",
            sparsify="della_magprune",
            consensus=None,
            normalize=False,
            rescale=True,
            reference="arXiv:2406.11617",
        ),
    )
}

LINEAR_SPEC = MergeMethod(
    name="linear",
    leaf=linear_leaf,
    params=(
        Param("weight", "model", check=finite_number(), traced=True),
        Param("normalize", "shared", True, boolean),
    ),
    base="none",
    reference="arXiv:2203.05482",
    validate=_validate_linear,
    elementwise=True,
)


def per_model(n: int, **settings) -> list[dict]:
    """``weights=[...]``, ``densities=[...]`` -> one mergekit parameter dict per model."""
    out = [{} for _ in range(n)]
    for name, values in settings.items():
        if values is None:
            continue
        if not isinstance(values, (list, tuple)) or len(values) != n:
            raise ConfigError(
                f"expected one {name} setting per model ({n}), got {values!r}",
                where=name,
                fix=f"pass a list of {n} settings, one per model, in the models' order",
            )
        for i, value in enumerate(values):
            out[i][name] = value
    return out


def _shared(**settings) -> dict:
    return {k: v for k, v in settings.items() if v is not None}


def linear(
    models: Sequence[Any],
    *,
    weights: Sequence[Setting],
    normalize: bool = True,
    num_layers: int | None = None,
):
    """Weighted average sum_i w_i theta_i / sum_i w_i (mergekit's ``linear``).

    ``normalize=False`` gives the plain weighted sum sum_i w_i theta_i. Each
    weight may be a layer gradient or a list of ``{filter, value}`` rules. The
    uniform soup of Wortsman et al. 2022, "Model soups", arXiv:2203.05482.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> a, b = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([3.0, 6.0])}
    >>> print(merging.linear([a, b], weights=[1.0, 3.0])["w"])   # (1 a + 3 b) / 4
    [2.5 5. ]
    """
    return merge(
        LINEAR_SPEC,
        models,
        model_parameters=per_model(len(models), weight=weights),
        parameters={"normalize": normalize},
        num_layers=num_layers,
    )


def task_arithmetic(
    base,
    models: Sequence[Any],
    *,
    weights: Sequence[Setting],
    densities: Sequence[Setting] | None = None,
    sparsify: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool | str = False,
    disjoint: str = "weighted",
    gammas: Sequence[Setting] | None = None,
    epsilons: Sequence[Setting] | None = None,
    lambda_: Setting = 1.0,
    key: jax.Array | None = None,
    num_layers: int | None = None,
):
    """theta_0 + lambda * combine_i(w_i * sparsify(theta_i - theta_0)): the general form.

    Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089) with every option of
    the family: ``sparsify`` None, "magnitude", "random", "magnitude_outliers"
    or "della_magprune"; ``consensus`` None, "sum" (TIES) or "count";
    ``normalize`` divides by the summed weights of agreeing models; ``rescale``
    False, True/"l1" (mergekit), "density" (DARE paper) or "probability"
    (DELLA paper); ``disjoint`` "weighted" (mergekit) or "mean" (TIES paper).
    With only ``weights`` given it is mergekit's ``task_arithmetic``:
    theta_0 + lambda sum_i w_i (theta_i - theta_0).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.array([1.0, 1.0, 1.0])}
    >>> a = {"w": jnp.array([2.0, 1.0, 0.0])}             # tau_a = [1, 0, -1]
    >>> b = {"w": jnp.array([1.0, 3.0, 1.0])}             # tau_b = [0, 2, 0]
    >>> print(merging.task_arithmetic(base, [a, b], weights=[1.0, 1.0], lambda_=0.5)["w"])
    [1.5 2.  0.5]
    >>> print(merging.task_arithmetic(base, [a], weights=[-1.0])["w"])   # negation
    [0. 1. 2.]
    """
    method = gta_method(
        "task_arithmetic",
        sparsify=sparsify,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        disjoint=disjoint,
    )
    return merge(
        method,
        models,
        base=base,
        model_parameters=per_model(
            len(models), weight=weights, density=densities, gamma=gammas, epsilon=epsilons
        ),
        parameters=_shared(**{"lambda": lambda_}),
        key=key,
        num_layers=num_layers,
    )


def _named(name, base, models, key=None, num_layers=None, shared=None, **per):
    return merge(
        GTA_SPECS[name],
        models,
        base=base,
        model_parameters=per_model(len(models), **per),
        parameters=_shared(**(shared or {})),
        key=key,
        num_layers=num_layers,
    )


def ties(
    base,
    models,
    *,
    weights,
    densities,
    lambda_: Setting = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    topk: str = "tensor",
    disjoint: str = "weighted",
    num_layers: int | None = None,
):
    """TIES-merging (Yadav et al. 2023, arXiv:2306.01708): trim, elect sign, disjoint merge.

    Keep each task vector's ``density`` fraction of largest magnitudes, elect
    each entry's sign by the mass of the weighted vectors, and average the
    agreeing entries weighted by ``weights`` (mergekit's ``ties``)::

        tau_i' = tau_i * [|tau_i| among the top density_i of |tau_i|]
        s      = sign(sum_i w_i tau_i')                          (elected sign, + on ties)
        merged = theta_0 + lambda sum_i [sign(tau_i') = s] w_i tau_i'
                            / sum_i [sign(tau_i') = s] w_i      (divisor 0 -> 1)

    The paper's variants: ``topk="model"`` trims over the whole model (one
    magnitude threshold per task vector across all tensors; ``densities`` must
    be plain numbers) instead of per tensor; ``disjoint="mean"`` averages the
    agreeing entries unweighted; ``consensus="count"`` elects by majority.

    Entry 0 below: the trimmed vectors disagree (4 and -2.5), + wins by mass and
    a's 4 is kept, where task arithmetic would give 1.5:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(4)}
    >>> a = {"w": jnp.array([4.0, -1.0, 2.0, 0.5])}       # top half kept: [4, 0, 2, 0]
    >>> b = {"w": jnp.array([-2.5, 3.0, 2.0, 1.0])}       # top half kept: [-2.5, 3, 0, 0]
    >>> print(merging.ties(base, [a, b], weights=[1.0, 1.0], densities=[0.5, 0.5])["w"])
    [4. 3. 2. 0.]
    """
    if topk not in ("tensor", "model"):
        raise ConfigError(
            f"unknown topk scope {topk!r}", where="topk", fix="use 'tensor' or 'model'"
        )
    if topk == "model":
        models = global_magnitude_prune(base, models, densities)
        densities = [1.0] * len(models)
    method = gta_method(
        "ties",
        sparsify="magnitude",
        consensus=consensus,
        normalize=normalize,
        rescale=False,
        disjoint=disjoint,
    )
    return merge(
        method,
        models,
        base=base,
        model_parameters=per_model(len(models), weight=weights, density=densities),
        parameters=_shared(**{"lambda": lambda_}),
        num_layers=num_layers,
    )


def global_magnitude_prune(base, models, densities: Sequence[float]):
    """Each model's task vector pruned to its ``density`` largest |tau| over all tensors.

    Returns base + pruned tau per model; k_i = max(1, int(density_i * total)),
    exactly k_i entries (ties at the cut taken in leaf order). The threshold is
    found by counting passes over the leaves (a radix select), so the model is
    never concatenated. Integer leaves are left as they are. Used by
    ``ties(..., topk="model")``, the TIES paper's trim (Yadav et al. 2023,
    arXiv:2306.01708).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    >>> ft = {"a": jnp.array([5.0, 1.0]), "b": jnp.array([2.0, -4.0])}
    >>> (pruned,) = merging.global_magnitude_prune(base, [ft], [0.5])   # k = 2 of 4
    >>> print(pruned["a"], pruned["b"])
    [5. 0.] [ 0. -4.]
    """
    check_same_structure([base, *models])
    per_model(len(models), density=densities)
    is_float = [jnp.issubdtype(jnp.result_type(b), jnp.inexact) for b in jax.tree.leaves(base)]
    base_leaves = [jnp.asarray(b, jnp.float32) for b in jax.tree.leaves(base)]
    out = []
    for i, (model, density) in enumerate(zip(models, densities, strict=True)):
        if isinstance(density, bool) or not isinstance(density, (int, float)):
            raise ConfigError(
                f"a whole-model top-k needs one number per model, got {density!r}",
                where=f"densities[{i}]",
                fix="pass plain numbers, or use topk='tensor' for per-tensor rules",
            )
        check_density(density, "magnitude", where=f"densities[{i}]")
        leaves = jax.tree.leaves(model)
        taus = [jnp.asarray(m, jnp.float32) - b for m, b in zip(leaves, base_leaves, strict=True)]
        bits = [magnitude_bits(jnp.abs(t)) for t, f in zip(taus, is_float, strict=True) if f]
        k = max(1, int(density * sum(b.size for b in bits)))
        threshold = kth_largest_bits(bits, k)
        # Entries above the k-th largest magnitude, then ties in leaf order up to k.
        room = k - sum(int(jnp.sum(b > threshold)) for b in bits)
        pruned, float_index = [], 0
        for leaf, base_leaf, tau, floating in zip(leaves, base_leaves, taus, is_float, strict=True):
            if not floating:
                pruned.append(leaf)
                continue
            b = bits[float_index]
            float_index += 1
            tied = b == threshold
            keep = (b > threshold) | (tied & (jnp.cumsum(tied) <= room))
            room -= int(jnp.sum(tied & keep))
            kept = jnp.where(keep.reshape(tau.shape), tau, 0.0)
            pruned.append((base_leaf + kept).astype(jnp.result_type(leaf)))
        out.append(jax.tree.unflatten(jax.tree.structure(model), pruned))
    return out


def dare_ties(
    base,
    models,
    *,
    weights,
    densities,
    key: jax.Array,
    lambda_: Setting = 1.0,
    normalize: bool = False,
    rescale: bool | str = True,
    num_layers: int | None = None,
):
    """DARE + TIES (Yu et al. 2023, arXiv:2311.03099): drop at random, rescale, elect sign.

    Each entry of tau_i is kept with probability ``density``; survivors are
    rescaled so the L1 norm of tau_i is kept (mergekit; ``rescale="density"``
    divides by the density as in the paper), then signs are elected as in TIES::

        tau_i' = rescale(m_i * tau_i),  m_i ~ Bernoulli(density_i)
        merged = theta_0 + lambda sum_i [sign(tau_i') = s] w_i tau_i',  s = sign(sum_i w_i tau_i')

    At density 1 nothing is dropped; at entry 0 below the models disagree and
    b's -1 loses the election (2, where task arithmetic gives 1):

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(2)}
    >>> a, b = {"w": jnp.array([2.0, -1.0])}, {"w": jnp.array([-1.0, -1.0])}
    >>> merged = merging.dare_ties(base, [a, b], weights=[1.0, 1.0], densities=[1.0, 1.0],
    ...                            key=jax.random.key(0))
    >>> print(merged["w"])
    [ 2. -2.]
    """
    return _named(
        "dare_ties",
        base,
        models,
        key,
        num_layers,
        {"lambda": lambda_, "normalize": normalize, "rescale": rescale},
        weight=weights,
        density=densities,
    )


def dare_linear(
    base,
    models,
    *,
    weights,
    densities,
    key: jax.Array,
    lambda_: Setting = 1.0,
    normalize: bool = False,
    rescale: bool | str = True,
    num_layers: int | None = None,
):
    """DARE (Yu et al. 2023, arXiv:2311.03099) without sign election: drop, rescale, add.

    merged = theta_0 + lambda sum_i w_i rescale(m_i * tau_i) with m_i ~
    Bernoulli(density_i) per entry. ``rescale=True`` (mergekit) keeps each
    pruned tensor's L1 norm, ``"density"`` divides by the density (the paper),
    so every survivor is tau / density:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, ft = {"w": jnp.zeros(1000)}, {"w": jnp.ones(1000)}
    >>> merged = merging.dare_linear(base, [ft], weights=[1.0], densities=[0.25],
    ...                              key=jax.random.key(0), rescale="density")
    >>> w = merged["w"]
    >>> print(bool(jnp.all((w == 0) | (w == 4.0))), 0.2 < float(jnp.mean(w != 0)) < 0.3)
    True True
    """
    return _named(
        "dare_linear",
        base,
        models,
        key,
        num_layers,
        {"lambda": lambda_, "normalize": normalize, "rescale": rescale},
        weight=weights,
        density=densities,
    )


def breadcrumbs(
    base,
    models,
    *,
    weights,
    densities,
    gammas=None,
    lambda_: Setting = 1.0,
    normalize: bool = False,
    num_layers: int | None = None,
):
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795).

    Per tensor, drop the ``gamma`` fraction of largest |tau| (outliers) and the
    smallest, keeping ``density`` of the entries; then add the weighted vectors:
    merged = theta_0 + lambda sum_i w_i m_i tau_i, with m_i keeping the ranks
    [n - k - int(gamma n), n - int(gamma n)) of |tau_i| in ascending order,
    k = int(density n) (``gamma`` defaults to 0.01).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, ft = {"w": jnp.zeros(10)}, {"w": jnp.arange(1.0, 11.0)}   # |tau| = 1..10
    >>> merged = merging.breadcrumbs(base, [ft], weights=[1.0], densities=[0.5], gammas=[0.1])
    >>> print(merged["w"])                       # the outlier 10 and the four smallest dropped
    [0. 0. 0. 0. 5. 6. 7. 8. 9. 0.]
    """
    return _named(
        "breadcrumbs",
        base,
        models,
        None,
        num_layers,
        {"lambda": lambda_, "normalize": normalize},
        weight=weights,
        density=densities,
        gamma=gammas,
    )


def breadcrumbs_ties(
    base,
    models,
    *,
    weights,
    densities,
    gammas=None,
    lambda_: Setting = 1.0,
    normalize: bool = False,
    num_layers: int | None = None,
):
    """Model Breadcrumbs with TIES sign election (arXiv:2312.06795, arXiv:2306.01708).

    The Breadcrumbs masks of :func:`breadcrumbs`, then the sum of the weighted
    entries that agree with the elected sign s = sign(sum_i w_i m_i tau_i).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"w": jnp.zeros(4)}
    >>> a = {"w": jnp.array([1.0, 2.0, 3.0, 4.0])}        # kept: [0, 2, 3, 0]
    >>> b = {"w": jnp.array([-1.0, -3.0, -2.0, -4.0])}    # kept: [0, -3, -2, 0]
    >>> kw = dict(weights=[1.0, 1.0], densities=[0.5, 0.5], gammas=[0.25, 0.25])
    >>> print(merging.breadcrumbs_ties(base, [a, b], **kw)["w"])
    [ 0. -3.  3.  0.]
    >>> print(merging.breadcrumbs(base, [a, b], **kw)["w"])   # without the election
    [ 0. -1.  1.  0.]
    """
    return _named(
        "breadcrumbs_ties",
        base,
        models,
        None,
        num_layers,
        {"lambda": lambda_, "normalize": normalize},
        weight=weights,
        density=densities,
        gamma=gammas,
    )


def della(
    base,
    models,
    *,
    weights,
    densities,
    key: jax.Array,
    epsilons=None,
    lambda_: Setting = 1.0,
    normalize: bool = True,
    rescale: bool | str = True,
    num_layers: int | None = None,
):
    """DELLA-merging (Deep et al. 2024, arXiv:2406.11617): MagPrune, elect sign, fuse.

    Entry j of a row is kept with probability density - epsilon + 2 epsilon
    rank_j (larger magnitudes are kept more often); survivors are rescaled to
    the L1 norm (mergekit) or by 1/p_j (``rescale="probability"``, the paper);
    then TIES sign election and a weighted disjoint mean. ``epsilon`` defaults
    to 0.15 and density +/- epsilon must stay in (0, 1).

    With ``rescale="probability"`` every survivor is tau_j / p_j
    (:func:`della_probabilities` gives p):

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, ft = {"w": jnp.zeros((1, 5))}, {"w": jnp.array([[1.0, 2.0, 3.0, 4.0, 5.0]])}
    >>> p = merging.della_probabilities(ft["w"], 0.5, 0.2)
    >>> print(p)
    [[0.3 0.4 0.5 0.6 0.7]]
    >>> merged = merging.della(base, [ft], weights=[1.0], densities=[0.5], epsilons=[0.2],
    ...                        key=jax.random.key(0), rescale="probability")
    >>> w = merged["w"]
    >>> print(bool(jnp.all((w == 0) | jnp.isclose(w, ft["w"] / p))))
    True
    """
    return _named(
        "della",
        base,
        models,
        key,
        num_layers,
        {"lambda": lambda_, "normalize": normalize, "rescale": rescale},
        weight=weights,
        density=densities,
        epsilon=epsilons,
    )


def della_linear(
    base,
    models,
    *,
    weights,
    densities,
    key: jax.Array,
    epsilons=None,
    lambda_: Setting = 1.0,
    normalize: bool = False,
    rescale: bool | str = True,
    num_layers: int | None = None,
):
    """DELLA's MagPrune without sign election (arXiv:2406.11617).

    merged = theta_0 + lambda sum_i w_i rescale(m_i * tau_i), m_ij ~ Bernoulli(p_ij)
    with p from :func:`della_probabilities`; with mergekit's default rescaling
    each pruned tensor keeps its L1 norm:

    >>> import jax, jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, ft = {"w": jnp.zeros((1, 8))}, {"w": jnp.arange(1.0, 9.0)[None]}
    >>> merged = merging.della_linear(base, [ft], weights=[1.0], densities=[0.5],
    ...                               key=jax.random.key(0))
    >>> print(float(jnp.abs(merged["w"]).sum()), float(ft["w"].sum()))   # L1 norms
    36.0 36.0
    """
    return _named(
        "della_linear",
        base,
        models,
        key,
        num_layers,
        {"lambda": lambda_, "normalize": normalize, "rescale": rescale},
        weight=weights,
        density=densities,
        epsilon=epsilons,
    )
