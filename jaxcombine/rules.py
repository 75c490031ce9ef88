"""Per-tensor settings from rules over tensor names (mergekit's semantics, exactly).

A *setting* is one of:

* a scalar (``0.5``, ``True``, ``"sum"``): the same value for every tensor;
* a list of scalars, a *gradient*: numbers are interpolated linearly over the
  layer position t in [0, 1] (``scaled = t (n - 1)``, between entries
  ``floor(scaled)`` and the next); non-numbers are picked at
  ``int(t (n - 1))``;
* a list of rules ``{"filter": s, "value": v}``: the first rule whose filter is
  a substring of the tensor name (or is ``None`` / ``"*"``) gives the value,
  itself a scalar or a gradient; ``{"regex": r, "value": v}`` matches with
  ``re.search``. No matching rule gives ``None`` (the next source of settings
  decides, as in mergekit's precedence).

The layer position of a tensor in layer i of a model with N layers is
t = i / (N - 1) (t = 1 when N = 1); tensors outside the layers (embeddings,
final norm, head) get t = 0, as mergekit plans them.

Example::

    weight = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
    evaluate_setting("model.layers.3.self_attn.q_proj.weight", weight, t=0.75)   # 0.75
    resolve(params, weight)        # a pytree of values, one per leaf
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax

from jaxcombine.errors import ConfigError
from jaxcombine.tree import path_string

Scalar = float | int | bool | str
_LAYER = re.compile(r"(?:^|[./])layers[./](\d+)(?:[./]|$)")


def _is_scalar(value) -> bool:
    return isinstance(value, (float, int, bool, str))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _rule_matches(rule: Mapping, name: str) -> bool:
    if "regex" in rule:
        return re.search(rule["regex"], name) is not None
    pattern = rule.get("filter")
    return pattern is None or pattern == "*" or (bool(name) and pattern in name)


def _check_rule(rule, where: str) -> None:
    if not isinstance(rule, Mapping) or "value" not in rule:
        raise ConfigError(
            f"expected a scalar, a list of numbers or a list of {{filter, value}} rules, got "
            f"{rule!r}",
            where=where,
            fix="write rules as {filter: self_attn, value: 0.5}",
        )
    unknown = set(rule) - {"filter", "regex", "value"}
    if unknown:
        raise ConfigError(
            f"unknown rule keys {sorted(unknown)}",
            where=where,
            fix="a rule has 'filter' (or 'regex') and 'value'",
        )


def evaluate_setting(name: str, setting: Any, t: float = 0.0, *, where: str = "setting") -> Any:
    """The value of ``setting`` for tensor ``name`` at layer position ``t`` (or None)."""
    if isinstance(setting, Mapping):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list):
        raise ConfigError(
            f"unexpected setting {setting!r}",
            where=where,
            fix="use a scalar, a list of numbers or a list of rules",
        )
    if not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    for rule in setting:
        _check_rule(rule, where)
        if _rule_matches(rule, name):
            return evaluate_setting(name, rule["value"], t, where=where)
    return None


def layer_index(name: str) -> int | None:
    """The layer number in 'model.layers.7.mlp...' or 'layers/7/mlp/...', else None."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t: i / (N - 1) inside the layers (1 when N = 1), 0 outside them."""
    index = layer_index(name)
    if index is None:
        return 0.0
    return index / (num_layers - 1) if num_layers > 1 else 1.0


def resolve(
    tree,
    setting: Any,
    *,
    num_layers: int | None = None,
    strict: bool = True,
    where: str = "setting",
):
    """A pytree like ``tree`` holding the value of ``setting`` for each leaf's path.

    ``num_layers`` defaults to 1 + the largest layer index among the leaves.
    With ``strict``, a ``{filter}``/``{regex}`` rule that matches no leaf at all
    is an error naming it (usually a typo).
    """
    paths = [path_string(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    if num_layers is None:
        indices = [i for i in map(layer_index, paths) if i is not None]
        num_layers = max(indices) + 1 if indices else 1
    if strict:
        check_rules_match(setting, paths, where)
    values = [
        evaluate_setting(p, setting, layer_position(p, num_layers), where=where) for p in paths
    ]
    return jax.tree.unflatten(jax.tree.structure(tree), values)


def check_rules_match(setting, paths: list[str], where: str) -> None:
    """A ConfigError naming the first ``{filter}``/``{regex}`` rule that matches no path."""
    rules = [setting] if isinstance(setting, Mapping) else setting
    if not isinstance(rules, list) or all(_is_scalar(v) for v in rules):
        return
    for rule in rules:
        _check_rule(rule, where)
        pattern = rule.get("regex", rule.get("filter"))
        if pattern in (None, "*"):
            continue
        if not any(_rule_matches(rule, p) for p in paths):
            raise ConfigError(
                f"rule {pattern!r} matches no tensor (for example {paths[:3]})",
                where=where,
                fix="check the spelling of the filter against the tensor names",
            )
