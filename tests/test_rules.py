"""Per-tensor settings against mergekit's own evaluate_setting (committed fixture)."""

import json
from pathlib import Path

import numpy as np
import pytest

from jaxcombine.errors import ConfigError
from jaxcombine.rules import evaluate_setting, layer_position, resolve

FIXTURE = json.loads((Path(__file__).parent / "fixtures/mergekit/rules.json").read_text())


def test_every_case_equals_mergekit():
    assert len(FIXTURE["cases"]) > 400
    for case in FIXTURE["cases"]:
        ours = evaluate_setting(case["name"], case["setting"], case["t"])
        expected = case["value"]
        if isinstance(expected, float):
            assert ours == pytest.approx(expected, abs=1e-12), case
        else:
            assert ours == expected, case


def test_layer_position_is_mergekits_t():
    assert layer_position("model.layers.0.mlp.up_proj.weight", 5) == 0.0
    assert layer_position("model.layers.4.mlp.up_proj.weight", 5) == 1.0
    assert layer_position("layers/2/mlp/up_proj/kernel", 5) == 0.5
    assert layer_position("model.layers.0.mlp.up_proj.weight", 1) == 1.0
    assert layer_position("model.embed_tokens.weight", 5) == 0.0
    assert layer_position("model.norm.weight", 5) == 0.0


def test_resolve_over_a_pytree():
    params = {
        "embed_tokens": {"embedding": np.zeros(2)},
        "layers": {
            i: {
                "self_attn": {"q_proj": {"kernel": np.zeros(2)}},
                "mlp": {"up_proj": {"kernel": np.zeros(2)}},
            }
            for i in range(3)
        },
    }
    setting = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"regex": r"mlp/\w+_proj", "value": 0.25},
        {"value": 0.5},
    ]
    values = resolve(params, setting)
    assert values["embed_tokens"]["embedding"] == 0.5
    assert [values["layers"][i]["self_attn"]["q_proj"]["kernel"] for i in range(3)] == [
        0.0,
        0.5,
        1.0,
    ]
    assert values["layers"][1]["mlp"]["up_proj"]["kernel"] == 0.25


def test_a_rule_matching_nothing_is_an_error():
    params = {"layers": {0: {"mlp": np.zeros(2)}}}
    with pytest.raises(ConfigError, match="'self_atn' matches no tensor"):
        resolve(params, [{"filter": "self_atn", "value": 1.0}, {"value": 0.0}], where="weight")
    assert resolve(params, [{"filter": "self_atn", "value": 1.0}], strict=False) == {
        "layers": {0: {"mlp": None}}
    }
    with pytest.raises(ConfigError, match="unknown rule keys"):
        evaluate_setting("x", [{"filtr": "mlp", "value": 1}])
