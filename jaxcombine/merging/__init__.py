"""Merging: task arithmetic and its relatives as pure functions over parameter pytrees.

Available so far: ``linear``, ``task_arithmetic``, ``ties`` (mergekit's
semantics, checked against mergekit's outputs) and their per-tensor leaf
functions. The rest of mergekit's methods follow.
"""

from jaxcombine.merging._methods import linear, task_arithmetic, ties
from jaxcombine.merging._task_arithmetic import (
    linear_leaf,
    magnitude_mask,
    rescale_l1,
    sign_consensus,
    task_arithmetic_leaf,
)

__all__ = [
    "linear",
    "linear_leaf",
    "magnitude_mask",
    "rescale_l1",
    "sign_consensus",
    "task_arithmetic",
    "task_arithmetic_leaf",
    "ties",
]
