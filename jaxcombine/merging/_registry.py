"""The registry: mergekit's method names -> the pytree functions and their specs.

``METHODS[name]`` is the public function (keyword arguments in Python style,
``weights=[...]``); ``SPECS[name]`` is its :class:`MergeMethod`, which
:func:`merge` and the ``jaxcombine merge`` command drive with mergekit-style
parameter dicts.
"""

from __future__ import annotations

from jaxcombine.merging import _methods

METHODS = {
    "linear": _methods.linear,
    "task_arithmetic": _methods.task_arithmetic,
    "ties": _methods.ties,
    "dare_ties": _methods.dare_ties,
    "dare_linear": _methods.dare_linear,
    "breadcrumbs": _methods.breadcrumbs,
    "breadcrumbs_ties": _methods.breadcrumbs_ties,
    "della": _methods.della,
    "della_linear": _methods.della_linear,
}

SPECS = {"linear": _methods.LINEAR_SPEC, **_methods.GTA_SPECS}
