"""Merging: mergekit's methods and the papers' variants as pure functions over pytrees.

``METHODS`` maps mergekit's method names to the functions; ``SPECS`` to their
contracts (parameters, defaults, base policy), which :func:`merge` drives with
mergekit-style settings. Per-tensor ("leaf") functions are exported for
streaming one tensor at a time.
"""

from jaxcombine.merging._engine import MergeMethod, Param, merge
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
from jaxcombine.merging._sparsify import (
    della_probabilities,
    magnitude_mask,
    magnitude_outliers_mask,
    rescale_l1,
    sparsify,
)
from jaxcombine.merging._task_arithmetic import linear_leaf, sign_consensus, task_arithmetic_leaf

__all__ = [
    "METHODS",
    "SPECS",
    "MergeMethod",
    "Param",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "della_probabilities",
    "global_magnitude_prune",
    "linear",
    "linear_leaf",
    "magnitude_mask",
    "magnitude_outliers_mask",
    "merge",
    "rescale_l1",
    "sign_consensus",
    "sparsify",
    "task_arithmetic",
    "task_arithmetic_leaf",
    "ties",
]
