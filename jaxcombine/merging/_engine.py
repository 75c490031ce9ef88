"""The merge engine: a method's per-tensor function mapped over pytrees, settings from rules.

A :class:`MergeMethod` declares what mergekit's method spec declares: a
per-tensor ("leaf") function, its parameters (shared, or one value per
fine-tuned model) with defaults and checks, whether a base model is required,
optional or not used, and how many models it accepts. :func:`merge` then

1. validates everything before any arithmetic: method name, parameter names,
   model count, tree structures and shapes, every parameter's value for every
   tensor (mergekit's scalars, layer gradients and ``{filter, value}`` rules,
   resolved by :mod:`jaxcombine.rules`), NaN/Inf in the inputs, integer leaves;
2. merges leaf by leaf with the leaf function jitted, parameters static.

Parameter precedence is mergekit's: a model's own setting, then the global
``parameters`` entry, then the method's default; a rule list in which no rule
matches a tensor falls through to the next source.

Random methods get a key per tensor, ``fold_in(key, crc32(tensor path))``, so a
tensor's randomness depends on its name only (the same in a streamed merge that
visits one tensor at a time).

Example::

    merged = merge("ties", [ft_a, ft_b], base=base,
                   model_parameters=[{"weight": 1.0, "density": 0.5}] * 2,
                   parameters={"lambda": 0.9})
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine import rules
from jaxcombine.errors import ConfigError, closest
from jaxcombine.tree import check_same_structure, path_string

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """A method parameter under mergekit's name.

    ``scope``: "shared" (one value per tensor) or "model" (one per model).
    ``check(value) -> str | None`` returns what is wrong with a value.
    ``arg``: the leaf function's keyword, where mergekit's name is not a valid
    Python name (``lambda`` -> ``lambda_``).
    ``traced``: the leaf receives the value as an array rather than a static
    Python value, so tensors that differ only in this value (a weight given as
    a layer gradient) share one compiled function.

    >>> from jaxcombine import merging
    >>> [p.name for p in merging.SPECS["ties"].params]
    ['weight', 'density', 'normalize', 'rescale', 'lambda', 'int8_mask']
    >>> merging.Param("lambda", default=1.0, arg="lambda_").keyword
    'lambda_'
    """

    name: str
    scope: Literal["shared", "model"] = "shared"
    default: Any = REQUIRED
    check: Callable[[Any], str | None] | None = None
    arg: str | None = None
    traced: bool = False

    @property
    def keyword(self) -> str:
        return self.arg or self.name


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: a leaf function ``leaf(base, models, **params)`` and its contract.

    ``base``: "required", "optional" or "none" (the leaf gets ``base=None``).
    ``min_models`` / ``max_models`` count the models besides the base.
    ``random``: the leaf takes ``key=`` and the merge needs a key.
    ``validate(values, where)``: extra checks across one tensor's parameters.
    ``elementwise``: entry i of the result depends only on entry i of the
    inputs (and the parameters), so a tensor may be merged in flat chunks of
    any size (``jaxcombine merge`` streams such methods in fixed-size chunks:
    one compiled function for every tensor).

    A new method is a leaf function and its parameters; :func:`merge` then
    gives it mergekit-style settings. Here theta_0 + t (mean_i theta_i - theta_0):

    >>> import jax.numpy as jnp
    >>> from jaxcombine.merging import MergeMethod, Param, merge
    >>> def towards_mean(base, models, *, t):      # base [...], models [N, ...]
    ...     return base + t * (models.mean(axis=0) - base)
    >>> method = MergeMethod("towards_mean", towards_mean, (Param("t", default=0.5),),
    ...                      base="required")
    >>> fts = [{"w": jnp.array([2.0])}, {"w": jnp.array([4.0])}]
    >>> print(merge(method, fts, base={"w": jnp.array([0.0])})["w"])   # 0 + 0.5 (3 - 0)
    [1.5]
    """

    name: str
    leaf: Callable
    params: tuple[Param, ...] = ()
    base: Literal["required", "optional", "none"] = "none"
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    reference: str = ""
    fixed: Mapping[str, Any] = field(default_factory=dict)
    validate: Callable[[dict, str], None] | None = None
    elementwise: bool = False


def finite_number(low=float("-inf"), high=float("inf"), low_open=False, high_open=False):
    """A check: a finite real number within the bounds."""

    def check(value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"must be a number, got {value!r}"
        if not np.isfinite(value):
            return f"must be finite, got {value}"
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if too_low or too_high:
            return (
                f"={value} is outside {'(' if low_open else '['}{low}, {high}"
                f"{')' if high_open else ']'}"
            )
        return None

    return check


def boolean(value):
    return None if isinstance(value, bool) else f"must be true or false, got {value!r}"


def unknown_parameter(method: MergeMethod, name: str, where: str) -> ConfigError:
    """The error for a setting ``method`` does not take, with the closest valid name."""
    return ConfigError(
        f"unknown parameter {name!r} for {method.name}",
        where=where,
        fix=closest(name, {p.name for p in method.params}),
    )


def _tensor_key(key: jax.Array, path: str) -> jax.Array:
    return jax.random.fold_in(key, zlib.crc32(path.encode()) & 0x7FFFFFFF)


_JITTED: dict = {}


def _jitted(leaf: Callable, static: tuple[str, ...], dtype=None, out_dtype=None):
    """``leaf`` compiled with the models stacked inside (one compile per static setting).

    ``dtype``: the inputs are cast to it inside the compiled function (the
    compute dtype); ``out_dtype``: the result is cast to it.
    """
    cache_key = (leaf, static, dtype, out_dtype)
    if cache_key not in _JITTED:

        def stacked(base, models, **kwargs):
            if dtype is not None:
                base = None if base is None else base.astype(dtype)
                models = [m.astype(dtype) for m in models]
            out = leaf(base, jnp.stack(models), **kwargs)
            return out if out_dtype is None else out.astype(out_dtype)

        _JITTED[cache_key] = jax.jit(stacked, static_argnames=static)
    return _JITTED[cache_key]


def _check_inputs(method: MergeMethod, models, base):
    if method.base == "required" and base is None:
        raise ConfigError(
            f"{method.name} needs a base model",
            where=f"{method.name}(base=...)",
            fix="pass the model the fine-tunes started from as base",
        )
    check_model_count(method, len(models), f"{method.name}(models)", "pass {want} models")


def check_model_count(method: MergeMethod, n: int, where: str, fix: str) -> None:
    """A ConfigError unless ``n`` models (besides the base) suit ``method``; ``fix`` may
    name ``{want}``."""
    low, high = method.min_models, method.max_models
    if n < low or (high is not None and n > high):
        want = (
            f"exactly {low}"
            if low == high
            else f"at least {low}" + (f" and at most {high}" if high is not None else "")
        )
        raise ConfigError(
            f"{method.name} takes {want} model(s) besides the base, got {n}",
            where=where,
            fix=fix.format(want=want),
        )


def _check_param_names(method: MergeMethod, model_parameters, parameters):
    known = {p.name: p for p in method.params}
    for name in parameters:
        if name not in known:
            raise unknown_parameter(method, name, f"parameters.{name}")
    for i, own in enumerate(model_parameters):
        for name in own:
            if name not in known:
                raise unknown_parameter(method, name, f"models[{i}].parameters.{name}")
            if known[name].scope != "model":
                raise ConfigError(
                    f"{name!r} is one value for the whole merge in {method.name}, "
                    "not a per-model parameter",
                    where=f"models[{i}].parameters.{name}",
                    fix=f"move {name} to the global parameters",
                )


def _checked(method: MergeMethod, param: Param, value, where: str):
    """A resolved value, the default where unset, checked (or a ConfigError naming ``where``)."""
    if value is None:
        if param.default is REQUIRED:
            raise ConfigError(
                f"{method.name} needs {param.name!r} and none applies to this tensor",
                where=where,
                fix=f"set {param.name} (add a catch-all rule {{value: ...}} if you use filters)",
            )
        value = param.default
    if param.check is not None and value is not None:
        problem = param.check(value)
        if problem:
            sep = "" if problem.startswith("=") else " "
            raise ConfigError(f"{param.name}{sep}{problem}", where=where)
    return value


def leaf_parameters(method: MergeMethod, path: str, values: Mapping[str, Any]) -> dict:
    """The leaf function's keywords for one tensor, from already-resolved settings.

    ``values[name]`` is the setting that applies to this tensor (``None``:
    unset): one value for a shared parameter, one per model for a per-model
    parameter. Defaults are filled in and every value is checked.
    """
    out = dict(method.fixed)
    for param in method.params:
        value = values.get(param.name)
        if param.scope == "shared":
            out[param.keyword] = _checked(method, param, value, path)
        else:
            out[param.keyword] = tuple(
                _checked(method, param, v, f"{path} (model {i})") for i, v in enumerate(value)
            )
    if method.validate is not None:
        method.validate(out, path)
    return out


def _resolve_params(method, reference, model_parameters, parameters, num_layers):
    """Per leaf path, the dict of static keyword values for the leaf function."""
    paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(reference)[0]]
    if num_layers is None:
        indices = [i for i in map(rules.layer_index, paths) if i is not None]
        num_layers = max(indices) + 1 if indices else 1

    def per_leaf(setting, where):
        if setting is None:
            return [None] * len(paths)
        return jax.tree.leaves(
            rules.resolve(reference, setting, num_layers=num_layers, where=where),
            is_leaf=lambda x: x is None,
        )

    columns = {}
    for param in method.params:
        shared = per_leaf(parameters.get(param.name), f"parameters.{param.name}")
        if param.scope == "shared":
            columns[param.name] = shared
            continue
        own = [
            per_leaf(mp.get(param.name), f"models[{i}].parameters.{param.name}")
            for i, mp in enumerate(model_parameters)
        ]
        columns[param.name] = [
            tuple(o[j] if o[j] is not None else shared[j] for o in own) for j in range(len(paths))
        ]
    values = [
        leaf_parameters(method, path, {name: col[j] for name, col in columns.items()})
        for j, path in enumerate(paths)
    ]
    return paths, values


def merge_leaf(
    method: MergeMethod, base, models: Sequence, values: Mapping[str, Any], *, key=None,
    dtype=None, out_dtype=None,
):  # fmt: skip
    """One tensor merged: ``method.leaf`` jitted, static settings as static arguments.

    ``models`` are the fine-tuned tensors (stacked inside the compiled
    function), ``values`` the keywords from :func:`leaf_parameters`, ``key`` the
    tensor's own key for random methods. ``dtype`` / ``out_dtype``: the inputs
    and the result cast inside the compiled function (no host-side casts).
    Integer tensors are returned unchanged.
    """
    first = base if base is not None else models[0]
    if not jnp.issubdtype(jnp.result_type(first), jnp.inexact):
        return first
    return _call(method, values, key, dtype, out_dtype)(base, tuple(models))


def _call(method: MergeMethod, values, key, dtype=None, out_dtype=None):
    traced = {p.keyword for p in method.params if p.traced}
    real = jax.dtypes.canonicalize_dtype(np.float64)  # float32 unless x64 is on
    kwargs = {k: np.asarray(v, real) if k in traced else v for k, v in values.items()}
    static = tuple(sorted(k for k in kwargs if k not in traced))
    if method.random:
        kwargs["key"] = key
    dtype = None if dtype is None else jnp.dtype(dtype)
    out_dtype = None if out_dtype is None else jnp.dtype(out_dtype)
    compiled = _jitted(method.leaf, static, dtype, out_dtype)
    return lambda base, models: compiled(base, models, **kwargs)


def _check_data(paths, base_leaves, model_leaves):
    """NaN/Inf anywhere, or integer leaves that differ between models, are errors."""
    for j, path in enumerate(paths):
        named = ([("base", base_leaves[j])] if base_leaves is not None else []) + [
            (f"model {i}", leaves[j]) for i, leaves in enumerate(model_leaves)
        ]
        if any(isinstance(x, jax.core.Tracer) for _, x in named):
            continue  # inside an outer jit: values are not known here
        first_name, first = named[0]
        if not jnp.issubdtype(jnp.result_type(first), jnp.inexact):
            for name, x in named[1:]:
                if not bool(jnp.array_equal(x, first)):
                    raise ConfigError(
                        f"integer tensor differs between {first_name} and {name}; integer "
                        "tensors (counters, indices, masks) cannot be averaged",
                        where=path,
                        fix="make the integer tensors equal, or remove them before merging",
                    )
            continue
        for name, x in named:
            if not bool(jnp.isfinite(x).all()):
                raise ConfigError(
                    f"{name} holds NaN or Inf",
                    where=path,
                    fix="merge finite checkpoints (check the training run that wrote this one)",
                )


def merge(
    method: MergeMethod | str,
    models: Sequence[Any],
    *,
    base: Any = None,
    model_parameters: Sequence[Mapping[str, Any]] | None = None,
    parameters: Mapping[str, Any] | None = None,
    key: jax.Array | None = None,
    num_layers: int | None = None,
    check_finite: bool = True,
):
    """Merge pytrees with ``method`` (a :class:`MergeMethod` or a name in ``SPECS``).

    ``model_parameters[i]`` holds model i's settings, ``parameters`` the global
    ones, both mergekit-style (scalar, layer gradient or ``{filter, value}``
    rules). ``num_layers`` sets the layer count for gradients (default: one
    more than the largest layer index in the paths). Random methods need
    ``key``; ``check_finite`` refuses NaN/Inf inputs by name. The per-method
    math is in each method's function (``merging.ties`` and so on); settings
    follow mergekit (Goddard et al. 2024, arXiv:2403.13257).

    A weight that is a layer gradient (0 to 1 over three layers) for the
    attention and 0.5 elsewhere:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"layers": [{"attn": jnp.zeros(1), "mlp": jnp.zeros(1)}] * 3}
    >>> ft = {"layers": [{"attn": jnp.ones(1), "mlp": jnp.ones(1)}] * 3}
    >>> weight = [{"filter": "attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    >>> merged = merging.merge("task_arithmetic", [ft], base=base,
    ...                        model_parameters=[{"weight": weight}])
    >>> print([(float(x["attn"][0]), float(x["mlp"][0])) for x in merged["layers"]])
    [(0.0, 0.5), (0.5, 0.5), (1.0, 0.5)]
    """
    if isinstance(method, str):
        from jaxcombine.merging._registry import SPECS

        if method not in SPECS:
            raise ConfigError(
                f"unknown merge method {method!r}",
                where="merge_method",
                fix=closest(method, SPECS),
            )
        method = SPECS[method]
    models = list(models)
    if method.base == "none" and base is not None:
        raise ConfigError(
            f"{method.name} does not use a base model",
            where=f"{method.name}(base=...)",
            fix="pass the base among the models, or drop it",
        )
    _check_inputs(method, models, base)
    model_parameters = list(model_parameters or [{} for _ in models])
    parameters = dict(parameters or {})
    if len(model_parameters) != len(models):
        raise ConfigError(
            f"{len(model_parameters)} model parameter sets for {len(models)} models",
            where="model_parameters",
            fix="give one dict of parameters per model, in the models' order",
        )
    _check_param_names(method, model_parameters, parameters)
    if method.random and key is None:
        raise ConfigError(
            f"{method.name} is random and needs a key",
            where=f"{method.name}(key=...)",
            fix="pass key=jax.random.key(seed); the same key gives the same merge",
        )
    trees = ([base] if base is not None else []) + models
    names = (["base"] if base is not None else []) + [f"model {i}" for i in range(len(models))]
    check_same_structure(trees, names)
    reference = trees[0]
    paths, values = _resolve_params(method, reference, model_parameters, parameters, num_layers)

    treedef = jax.tree.structure(reference)
    base_leaves = jax.tree.leaves(base) if base is not None else None
    model_leaves = [jax.tree.leaves(m) for m in models]
    if check_finite:
        _check_data(paths, base_leaves, model_leaves)

    out = [
        merge_leaf(
            method,
            base_leaves[j] if base_leaves is not None else None,
            [leaves[j] for leaves in model_leaves],
            values[j],
            key=_tensor_key(key, path) if method.random else None,
        )
        for j, path in enumerate(paths)
    ]
    return jax.tree.unflatten(treedef, out)
