"""Merging: mergekit's methods, the papers' variants, soups and data-aware merges over pytrees.

* ``METHODS`` maps mergekit's 20 method names to pytree functions (``ties``,
  ``slerp``, ...); ``SPECS`` maps them to their contracts (parameters,
  defaults, base policy), which :func:`merge` drives with mergekit-style
  settings: scalars, layer gradients and ``{filter, value}`` rules.
* Per-tensor ("leaf") functions (``*_leaf``, :func:`sparsify`) merge one
  tensor at a time, for streamed merges.
* Task-vector algebra, uniform and greedy soups, running average and EMA.
* Data-aware merging: Fisher-weighted, RegMean, AdaMerging.

Each function's docstring gives its formula, its paper and a runnable example;
``docs/merging.md`` is the guide to choosing a method. Python keywords
(``weights=[...]``) or mergekit's parameter dicts give the same merge:

>>> import jax.numpy as jnp
>>> from jaxcombine import merging
>>> base = {"w": jnp.zeros(3)}
>>> ft_a, ft_b = {"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([3.0, 1.0, 0.0])}
>>> print(merging.ties(base, [ft_a, ft_b], weights=[1, 1], densities=[1.0, 1.0])["w"])
[ 2.  -2.   0.5]
>>> merged = merging.merge("ties", [ft_a, ft_b], base=base,
...                        model_parameters=[{"weight": 1, "density": 1.0}] * 2)
>>> print(merged["w"])
[ 2.  -2.   0.5]
"""

from jaxcombine.merging._adamerging import (
    AdaMergingResult,
    adamerging,
    merge_with_coefficients,
    prediction_entropy,
)
from jaxcombine.merging._averaging import (
    Averager,
    EmaState,
    RunningAverageState,
    ema,
    ema_decay,
    ema_init,
    ema_update,
    ema_value,
    running_average,
    running_average_init,
    running_average_update,
    running_average_value,
)
from jaxcombine.merging._engine import MergeMethod, Param, merge
from jaxcombine.merging._fisher import (
    FisherState,
    expected_fisher_update,
    fisher_finalize,
    fisher_init,
    fisher_merge,
    fisher_update,
)
from jaxcombine.merging._geometric import karcher_leaf, multislerp_leaf, nuslerp_leaf, slerp_leaf
from jaxcombine.merging._interpolation import (
    arcee_fusion,
    karcher,
    model_stock,
    multislerp,
    nearswap,
    nuslerp,
    passthrough,
    ram,
    ramplus_tl,
    sce,
    slerp,
)
from jaxcombine.merging._methods import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    della,
    della_linear,
    global_magnitude_prune,
    linear,
    task_arithmetic,
    ties,
)
from jaxcombine.merging._registry import METHODS, SPECS
from jaxcombine.merging._regmean import (
    GramState,
    gram_finalize,
    gram_init,
    gram_update,
    linear_inputs,
    regmean_merge,
)
from jaxcombine.merging._selective import (
    arcee_fusion_leaf,
    model_stock_leaf,
    nearswap_leaf,
    passthrough_leaf,
    ram_leaf,
    ramplus_tl_leaf,
    sce_leaf,
)
from jaxcombine.merging._soups import GreedySoupRecord, SoupTrial, greedy_soup, uniform_soup
from jaxcombine.merging._sparsify import (
    della_probabilities,
    magnitude_mask,
    magnitude_outliers_mask,
    rescale_l1,
    sparsify,
)
from jaxcombine.merging._task_arithmetic import linear_leaf, sign_consensus, task_arithmetic_leaf
from jaxcombine.merging._task_vectors import (
    add_task_vectors,
    analogy,
    apply_task_vector,
    negate,
    task_vector,
)

__all__ = [
    "METHODS",
    "SPECS",
    "AdaMergingResult",
    "Averager",
    "EmaState",
    "FisherState",
    "GramState",
    "GreedySoupRecord",
    "MergeMethod",
    "Param",
    "RunningAverageState",
    "SoupTrial",
    "adamerging",
    "add_task_vectors",
    "analogy",
    "apply_task_vector",
    "arcee_fusion",
    "arcee_fusion_leaf",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "della_probabilities",
    "ema",
    "ema_decay",
    "ema_init",
    "ema_update",
    "ema_value",
    "expected_fisher_update",
    "fisher_finalize",
    "fisher_init",
    "fisher_merge",
    "fisher_update",
    "global_magnitude_prune",
    "gram_finalize",
    "gram_init",
    "gram_update",
    "greedy_soup",
    "karcher",
    "karcher_leaf",
    "linear",
    "linear_inputs",
    "linear_leaf",
    "magnitude_mask",
    "magnitude_outliers_mask",
    "merge",
    "merge_with_coefficients",
    "model_stock",
    "model_stock_leaf",
    "multislerp",
    "multislerp_leaf",
    "nearswap",
    "nearswap_leaf",
    "negate",
    "nuslerp",
    "nuslerp_leaf",
    "passthrough",
    "passthrough_leaf",
    "prediction_entropy",
    "ram",
    "ram_leaf",
    "ramplus_tl",
    "ramplus_tl_leaf",
    "regmean_merge",
    "rescale_l1",
    "running_average",
    "running_average_init",
    "running_average_update",
    "running_average_value",
    "sce",
    "sce_leaf",
    "sign_consensus",
    "slerp",
    "slerp_leaf",
    "sparsify",
    "task_arithmetic",
    "task_arithmetic_leaf",
    "task_vector",
    "ties",
    "uniform_soup",
]
