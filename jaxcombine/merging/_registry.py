"""The registry: mergekit's method names -> the pytree functions and their specs.

``METHODS[name]`` is the public function (keyword arguments in Python style,
``weights=[...]``); ``SPECS[name]`` is its :class:`MergeMethod`, which
:func:`merge` and the ``jaxcombine merge`` command drive with mergekit-style
parameter dicts. Both hold exactly mergekit's 20 method names.

>>> from jaxcombine.merging import METHODS, SPECS
>>> len(METHODS), sorted(METHODS) == sorted(SPECS)
(20, True)
>>> SPECS["dare_ties"].base, SPECS["dare_ties"].random, SPECS["dare_ties"].reference
('required', True, 'arXiv:2311.03099')
"""

from __future__ import annotations

from jaxcombine.merging import _interpolation, _methods

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
    "slerp": _interpolation.slerp,
    "nuslerp": _interpolation.nuslerp,
    "multislerp": _interpolation.multislerp,
    "karcher": _interpolation.karcher,
    "model_stock": _interpolation.model_stock,
    "nearswap": _interpolation.nearswap,
    "sce": _interpolation.sce,
    "ram": _interpolation.ram,
    "ramplus_tl": _interpolation.ramplus_tl,
    "arcee_fusion": _interpolation.arcee_fusion,
    "passthrough": _interpolation.passthrough,
}

SPECS = {"linear": _methods.LINEAR_SPEC, **_methods.GTA_SPECS, **_interpolation.SPECS}
