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

These are the settings of mergekit (Goddard et al. 2024, arXiv:2403.13257).

>>> from jaxcombine.rules import evaluate_setting, resolve
>>> weight = [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.5}]
>>> evaluate_setting("model.layers.3.self_attn.q_proj.weight", weight, t=0.75)
0.75
>>> evaluate_setting("model.layers.3.mlp.up_proj.weight", weight, t=0.75)
0.5
>>> params = {"layers": [{"self_attn": 0, "mlp": 0} for _ in range(3)]}
>>> resolve(params, weight)        # t = 0, 1/2, 1 in layers 0, 1, 2
{'layers': [{'mlp': 0.5, 'self_attn': 0.0}, {'mlp': 0.5, 'self_attn': 0.5},
            {'mlp': 0.5, 'self_attn': 1.0}]}
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
    """The value of ``setting`` for tensor ``name`` at layer position ``t`` (or None).

    A gradient ``[v_0, ..., v_{n-1}]`` gives, with s = t (n - 1) and
    i = floor(s), (1 - (s - i)) v_i + (s - i) v_{i+1} (v_{n-1} at t = 1).

    >>> evaluate_setting("any", 0.3)                       # a scalar: everywhere
    0.3
    >>> evaluate_setting("any", [0.0, 1.0, 0.5], t=0.75)   # s = 1.5: (1 + 0.5) / 2
    0.75
    >>> evaluate_setting("any", ["a", "b", "c"], t=0.9)    # non-numbers: int(1.8) = 1
    'b'
    >>> rules = [{"regex": "^layers.*mlp", "value": 2.0}, {"filter": "attn", "value": 1.0}]
    >>> evaluate_setting("layers.0.mlp.w", rules), evaluate_setting("embed", rules)
    (2.0, None)
    """
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
    """The layer number in 'model.layers.7.mlp...' or 'layers/7/mlp/...', else None.

    >>> layer_index("model.layers.7.mlp.up_proj.weight"), layer_index("layers/12/attn")
    (7, 12)
    >>> layer_index("model.embed_tokens.weight") is None
    True
    """
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def layer_position(name: str, num_layers: int) -> float:
    """mergekit's t: i / (N - 1) inside the layers (1 when N = 1), 0 outside them.

    >>> layer_position("model.layers.3.mlp.w", 5), layer_position("lm_head.weight", 5)
    (0.75, 0.0)
    >>> layer_position("layers/0/mlp", 1)
    1.0
    """
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

    >>> params = {"layers": [{"attn": 0, "mlp": 0}, {"attn": 0, "mlp": 0}]}
    >>> resolve(params, [1.0, 3.0])                    # t = 0 in layer 0, t = 1 in layer 1
    {'layers': [{'attn': 1.0, 'mlp': 1.0}, {'attn': 3.0, 'mlp': 3.0}]}
    >>> resolve(params, [{"filter": "atn", "value": 1.0}], where="weight")
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: weight: rule 'atn' matches no tensor (for example
    ['layers/0/attn', 'layers/0/mlp', 'layers/1/attn'])
      How to fix: check the spelling of the filter against the tensor names
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
    """A ConfigError naming the first ``{filter}``/``{regex}`` rule that matches no path.

    Catch-all rules (no filter, ``None`` or ``"*"``), scalars and gradients pass.

    >>> check_rules_match([{"filter": "mlp", "value": 1}], ["layers/0/mlp"], "weight")
    >>> check_rules_match([{"regex": "^head", "value": 1}], ["layers/0/mlp"], "weight")
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: weight: rule '^head' matches no tensor ...
    """
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
