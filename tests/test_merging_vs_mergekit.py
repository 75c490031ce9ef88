"""Merges against mergekit's own outputs (fixtures made by make_merge_fixtures.py).

Each committed ``NAME.yml`` is a mergekit config that mergekit 0.1.5 turned into
``NAME.safetensors``; the test reads the same config into
:func:`jaxcombine.merging.merge` (models, base, per-model and global parameters,
with mergekit's precedence) and compares every tensor (max abs error <= 1e-6).
"""

from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from jaxcombine import merging
from jaxcombine.errors import ConfigError

HERE = Path(__file__).parent / "fixtures" / "mergekit"
GOLDEN = sorted(p.stem for p in HERE.glob("*.yml"))


def tensors(name):
    return load_file(str(HERE / name / "model.safetensors"))


def config(name):
    return yaml.safe_load((HERE / f"{name}.yml").read_text())


def settings(cfg, key, default=None):
    return [m.get("parameters", {}).get(key, default) for m in cfg["models"]]


def merge_like_mergekit(cfg):
    """mergekit's reading of a config: the base model is set apart unless the method
    has no base, and models listed as the base contribute no per-model settings."""
    spec = merging.SPECS[cfg["merge_method"]]
    base_name = cfg.get("base_model") if spec.base != "none" else None
    entries = [m for m in cfg["models"] if m["model"] != base_name]
    return merging.merge(
        spec,
        [tensors(m["model"]) for m in entries],
        base=tensors(base_name) if base_name else None,
        model_parameters=[m.get("parameters", {}) for m in entries],
        parameters=cfg.get("parameters", {}),
    )


def assert_matches_mergekit(name, merged):
    expected = load_file(str(HERE / f"{name}.safetensors"))
    assert sorted(merged) == sorted(expected)
    for tensor, value in expected.items():
        err = np.max(np.abs(np.asarray(merged[tensor], np.float64) - value))
        assert err <= 1e-6, (tensor, err)


def test_every_mergekit_method_has_a_golden_output():
    deterministic = {name for name, spec in merging.SPECS.items() if not spec.random}
    covered = {config(name)["merge_method"] for name in GOLDEN}
    assert deterministic <= covered, deterministic - covered


@pytest.mark.parametrize("name", GOLDEN)
def test_config_equals_mergekit(name):
    assert_matches_mergekit(name, merge_like_mergekit(config(name)))


def test_linear_function():
    cfg = config("linear")
    models = [tensors(m["model"]) for m in cfg["models"]]
    assert_matches_mergekit("linear", merging.linear(models, weights=settings(cfg, "weight")))


def test_task_arithmetic_function():
    cfg = config("task_arithmetic")
    merged = merging.task_arithmetic(
        tensors("base"),
        [tensors(m["model"]) for m in cfg["models"]],
        weights=settings(cfg, "weight"),
        lambda_=cfg["parameters"]["lambda"],
    )
    assert_matches_mergekit("task_arithmetic", merged)


def test_ties_function():
    cfg = config("ties")
    merged = merging.ties(
        tensors("base"),
        [tensors(m["model"]) for m in cfg["models"]],
        weights=settings(cfg, "weight"),
        densities=settings(cfg, "density"),
    )
    assert_matches_mergekit("ties", merged)


def test_breadcrumbs_function():
    cfg = config("breadcrumbs")
    merged = merging.breadcrumbs(
        tensors("base"),
        [tensors(m["model"]) for m in cfg["models"]],
        weights=settings(cfg, "weight"),
        densities=settings(cfg, "density"),
        gammas=settings(cfg, "gamma"),
    )
    assert_matches_mergekit("breadcrumbs", merged)


def shard_over_mesh(tree):
    """Every 2-D tensor split over a (2, 4) mesh of the 8 fake devices."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def shard(x):
        spec = [None] * x.ndim
        if x.ndim == 2 and x.shape[0] % 2 == 0 and x.shape[1] % 4 == 0:
            spec = ["data", "model"]
        return jax.device_put(
            x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*spec))
        )

    return {k: shard(v) for k, v in tree.items()}


@pytest.mark.parametrize("name", ["ties", "slerp", "model_stock", "sce", "karcher", "della"])
def test_sharded_merge_equals_unsharded(name):
    """The same merge with every input sharded over 8 devices gives the same tensors."""
    spec = merging.SPECS[name]
    cfg = config(name) if (HERE / f"{name}.yml").exists() else config("ties")
    base_name = cfg.get("base_model") if spec.base != "none" else None
    entries = [m for m in cfg["models"] if m["model"] != base_name]
    own = [dict(m.get("parameters", {})) for m in entries]
    if name == "della":
        own = [dict(p, epsilon=0.05) for p in own]
    kwargs = dict(
        model_parameters=own,
        parameters=cfg.get("parameters", {}),
        key=jax.random.key(0) if spec.random else None,
    )
    inputs = [tensors(m["model"]) for m in entries]
    base = tensors(base_name) if base_name else None
    expected = merging.merge(spec, inputs, base=base, **kwargs)
    sharded = merging.merge(
        spec,
        [shard_over_mesh(m) for m in inputs],
        base=shard_over_mesh(base) if base is not None else None,
        **kwargs,
    )
    assert len(sharded["model.layers.0.mlp.up_proj.weight"].sharding.device_set) == 8
    for tensor in expected:
        np.testing.assert_allclose(
            np.asarray(sharded[tensor]), np.asarray(expected[tensor]), rtol=1e-6, atol=1e-7
        )


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
