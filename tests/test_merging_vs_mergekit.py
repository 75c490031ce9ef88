"""Merges against mergekit's own outputs (fixtures made by make_merge_fixtures.py)."""

from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxcombine import merging
from jaxcombine.errors import ConfigError

HERE = Path(__file__).parent / "fixtures" / "mergekit"


def tensors(name):
    return load_file(str(HERE / name / "model.safetensors"))


def config(method):
    return yaml.safe_load((HERE / f"{method}.yml").read_text())


def settings(cfg, key, default=None):
    return [m.get("parameters", {}).get(key, default) for m in cfg["models"]]


def assert_matches_mergekit(method, merged):
    expected = load_file(str(HERE / f"{method}.safetensors"))
    assert sorted(merged) == sorted(expected)
    for name, value in expected.items():
        err = np.max(np.abs(np.asarray(merged[name]) - value))
        assert err <= 1e-6, (name, err)


def test_linear():
    cfg = config("linear")
    models = [tensors(m["model"]) for m in cfg["models"]]
    assert_matches_mergekit("linear", merging.linear(models, weights=settings(cfg, "weight")))


def test_task_arithmetic():
    cfg = config("task_arithmetic")
    merged = merging.task_arithmetic(
        tensors("base"),
        [tensors(m["model"]) for m in cfg["models"]],
        weights=settings(cfg, "weight"),
        lambda_=cfg["parameters"]["lambda"],
    )
    assert_matches_mergekit("task_arithmetic", merged)


def test_ties():
    cfg = config("ties")
    merged = merging.ties(
        tensors("base"),
        [tensors(m["model"]) for m in cfg["models"]],
        weights=settings(cfg, "weight"),
        densities=settings(cfg, "density"),
    )
    assert_matches_mergekit("ties", merged)


def test_properties():
    base, ft1 = tensors("base"), tensors("ft1")
    # Merging N copies of a model returns it.
    same = merging.linear([ft1, ft1, ft1], weights=[0.2, 0.3, 0.5])
    for name, value in ft1.items():
        np.testing.assert_allclose(same[name], value, rtol=1e-6, atol=1e-7)
    # TIES at density 1 without sign election is task arithmetic.
    models = [ft1, tensors("ft2")]
    a = merging.task_arithmetic(
        base,
        models,
        weights=[0.4, 0.9],
        densities=[1.0, 1.0],
        sparsify="magnitude",
        normalize=False,
    )
    b = merging.task_arithmetic(base, models, weights=[0.4, 0.9])
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_bad_settings():
    base, ft1, ft2 = tensors("base"), tensors("ft1"), tensors("ft2")
    with pytest.raises(ConfigError, match="sum to zero"):
        merging.linear([ft1, ft2], weights=[1.0, -1.0])
    with pytest.raises(ConfigError, match=r"density=1.5 is outside \(0.0, 1.0\]"):
        merging.ties(base, [ft1, ft2], weights=[1, 1], densities=[0.5, 1.5])
    with pytest.raises(ConfigError, match="one weight setting per model"):
        merging.task_arithmetic(base, [ft1, ft2], weights=[1.0])
    del ft2["lm_head.weight"]
    with pytest.raises(ConfigError, match="missing.*lm_head.weight"):
        merging.task_arithmetic(base, [ft1, ft2], weights=[1.0, 1.0])
