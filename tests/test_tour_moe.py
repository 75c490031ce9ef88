"""Section 7 of the tour (sparse MoE): held-out scores against numpy and a counting
loop over the router's choices, parameter counts against built models."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcombine.data import PackedDataset
from jaxcombine.models import Decoder
from jaxcombine.moe import SparseMoE
from jaxcombine.tour.lm import init_members, small_decoder
from jaxcombine.tour.sections.moe import (
    FromStep,
    curve_steps,
    held_out_scores,
    moe_config,
    parameter_counts,
)

VOCAB, SEQ = 40, 8


def _dense():
    return small_decoder(VOCAB, hidden=16, layers=2, context=SEQ)


def _rows(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (count, SEQ + 1)).astype(np.int32)


def _param_count(config) -> int:
    model = Decoder(config, rngs=nnx.Rngs(0))
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def members():
    """kind -> (config, graphdef, params stacked over two seeds)."""
    configs = {"dense": _dense(), "moe": moe_config(_dense(), 4)}
    return {kind: (config, *init_members(config, [0, 1])) for kind, config in configs.items()}


def _member(params, i):
    return jax.tree.map(lambda x: x[i], params)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_held_out_nll_is_the_mean_token_nll(members, kind):
    _, graphdef, params = members[kind]
    rows = _rows(7)  # batches of 3: the last one padded
    nll, load = held_out_scores(graphdef, params, rows, batch_size=3)
    assert (load is not None) == (kind == "moe")
    logits_of = jax.jit(lambda p: nnx.merge(graphdef, p)(rows[:, :-1]).logits)
    for i, got in enumerate(nll):
        logits = np.asarray(logits_of(_member(params, i)), np.float64)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = np.take_along_axis(log_probs, rows[:, 1:, None], -1)
        np.testing.assert_allclose(got, -picked.mean(), rtol=1e-5)


def test_expert_load_counts_the_router_choices(members, monkeypatch):
    config, graphdef, params = members["moe"]
    rows = _rows(5)
    _, load = held_out_scores(graphdef, params, rows, batch_size=2)

    # Reference: each MoE layer's input and router, returned from a forward pass,
    # and the top-K experts of x . W_router counted token by token.
    seen = []
    original = SparseMoE.__call__

    def recording(self, x, **kwargs):
        seen.append((x, self.router[...]))
        return original(self, x, **kwargs)

    monkeypatch.setattr(SparseMoE, "__call__", recording)

    @jax.jit
    def moe_inputs(p):
        seen.clear()
        nnx.merge(graphdef, p)(rows[:, :-1])
        return list(seen)

    K, E = config.moe.num_experts_per_token, config.moe.num_experts
    for i in range(2):
        layers = moe_inputs(_member(params, i))
        assert len(layers) == config.num_layers
        for layer, (x, router) in enumerate(layers):
            x, router = np.asarray(x, np.float64), np.asarray(router, np.float64)
            counts = np.zeros(E)
            for token in x.reshape(-1, x.shape[-1]):
                for expert in np.argsort(-(token @ router))[:K]:
                    counts[expert] += 1
            expected = counts / (rows.shape[0] * SEQ * K)
            np.testing.assert_allclose(load[i, layer], expected, atol=1e-6)
            assert load[i, layer].sum() == pytest.approx(1.0)


def test_parameter_counts_active_equals_the_dense_model_plus_routers():
    dense = _dense()
    assert parameter_counts(dense) == (_param_count(dense), _param_count(dense))
    sparse = moe_config(dense, 4)  # 4 experts of half the dense width, top-2
    total, active = parameter_counts(sparse)
    assert total == _param_count(sparse)
    routers = dense.num_layers * dense.hidden_size * 4
    assert active == _param_count(dense) + routers
    every_expert = sparse.replace(moe=dataclasses.replace(sparse.moe, num_experts_per_token=4))
    assert parameter_counts(every_expert) == (total, total)


def test_curve_steps_are_evenly_spaced_and_hold_the_half_way_step():
    assert curve_steps(600, 4) == [150, 300, 450, 600]
    assert curve_steps(150, 3) == [50, 75, 100, 150]
    assert curve_steps(8, 2) == [4, 8]
    assert curve_steps(7, 1) == [3, 7]


def test_from_step_gives_the_batches_of_the_later_steps():
    data = PackedDataset(_rows(11))
    later = FromStep(data, 5)
    for t in range(4):
        np.testing.assert_array_equal(later.batch(t, 3, 7), data.batch(5 + t, 3, 7))
