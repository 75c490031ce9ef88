"""The tour's trainer: N members vmapped and scanned = each member trained alone
by the jitted step of jaxcombine.training, one step at a time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcombine import tree
from jaxcombine.data import TableDataset
from jaxcombine.errors import InputError
from jaxcombine.merging import ema
from jaxcombine.models import MLPClassifier
from jaxcombine.tour.fit import fit
from jaxcombine.training import adamw, make_train_step, token_cross_entropy


def _loss(graphdef):
    def loss(params, batch, key, constants):
        logits = nnx.merge(graphdef, params)(batch["x"], dropout_key=key)
        return token_cross_entropy(logits, batch["y"]), {}

    return loss


def _table(seed: int, rows: int = 90) -> TableDataset:
    x = np.random.default_rng(seed).normal(size=(rows, 3)).astype(np.float32)
    return TableDataset(x, (x[:, 0] * x[:, 1] > 0).astype(np.int64))


@pytest.mark.parametrize("per_member", [False, True], ids=["one dataset", "one per member"])
def test_vmapped_members_equal_members_trained_one_by_one(per_member):
    data = [_table(1, 90), _table(2, 70), _table(3, 50)] if per_member else _table(0)
    seeds = [3, 5, 8]
    models = [MLPClassifier(3, (16,), 2, dropout_rate=0.2, rngs=nnx.Rngs(s)) for s in seeds]
    graphdef, _ = nnx.split(models[0], nnx.Param)
    optimizer = adamw(1e-2, 23, warmup_steps=4)
    averager = ema(0.8, warmup=True)
    stacked = tree.stack([nnx.state(m, nnx.Param) for m in models])
    result = fit(
        stacked, _loss(graphdef), data, seeds=seeds, steps=23, batch_size=8,
        optimizer=optimizer, bootstrap=True, chunk=5, snapshot_steps=[7, 20], averager=averager,
    )  # fmt: skip
    assert result.losses.shape == (3, 23)
    assert sorted(result.snapshots) == [7, 20]
    step = jax.jit(make_train_step(_loss(graphdef), optimizer))
    for m, (model, seed) in enumerate(zip(models, seeds, strict=True)):
        member_data = data[m] if per_member else data
        params = nnx.state(model, nnx.Param)
        state = {"step": jnp.zeros((), jnp.int32), "params": params,
                 "opt_state": optimizer.init(params)}  # fmt: skip
        losses, average = [], averager.init(params)
        for t in range(23):
            batch = member_data.batch(t, 8, seed, bootstrap=True)
            state, metrics = step(state, batch, jax.random.fold_in(jax.random.key(seed), t), None)
            losses.append(float(metrics["loss"]))
            average = jax.jit(averager.update)(average, state["params"])
            if t + 1 in result.snapshots:
                _assert_close(tree.unstack(result.snapshots[t + 1])[m], state["params"])
        np.testing.assert_allclose(result.losses[m], losses, rtol=1e-5, atol=1e-6)
        _assert_close(tree.unstack(result.params)[m], state["params"])
        _assert_close(tree.unstack(result.average)[m], averager.value(average))


def _assert_close(got, expected):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_one_dataset_per_member_is_checked():
    models = [MLPClassifier(3, (4,), 2, rngs=nnx.Rngs(s)) for s in (0, 1)]
    graphdef, _ = nnx.split(models[0], nnx.Param)
    stacked = tree.stack([nnx.state(m, nnx.Param) for m in models])
    with pytest.raises(InputError, match="3 datasets for 2 members"):
        fit(stacked, _loss(graphdef), [_table(0)] * 3, seeds=[0, 1], steps=2, batch_size=4,
            optimizer=adamw(1e-2, 2))  # fmt: skip
