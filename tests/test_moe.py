"""Sparse MoE routing and layer against slow references and HF's PyTorch blocks.

Oracles: a one-hot [G, S, E, C] einsum dispatch (flaxformer / V-MoE style), a
Python loop assigning slots, a dense loop over experts (outputs and
gradients), HF ``MixtralSparseMoeBlock`` and ``SwitchTransformersSparseMLP``,
and HF's loss functions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from jaxcombine.errors import ConfigError
from jaxcombine.moe import MoEConfig, SparseMoE
from jaxcombine.moe import routing as R

# ---- slow references ---------------------------------------------------------------


def slots_by_loop(experts: np.ndarray, num_experts: int, capacity: int, priority=None, mask=None):
    """Slot assignment written as the docstring says it: rounds, then tokens in order
    (padding, mask False, skipped)."""
    G, S, K = experts.shape
    slots = np.full((G, S, K), capacity)
    for g in range(G):
        order = range(S) if priority is None else np.argsort(-priority[g], kind="stable")
        filled = [0] * num_experts
        for k in range(K):
            for s in order:
                if mask is not None and not mask[g, s]:
                    continue
                e = experts[g, s, k]
                if filled[e] < capacity:
                    slots[g, s, k] = filled[e]
                filled[e] += 1
    return slots


def one_hot_masks(routing: R.Routing, num_experts: int):
    """flaxformer's dispatch [G, S, E, C] (0/1) and combine (weights) tensors."""
    C = routing.capacity
    kept = routing.slots < C
    e = jax.nn.one_hot(routing.experts, num_experts)  # [G, S, K, E]
    c = jax.nn.one_hot(jnp.where(kept, routing.slots, C), C)  # [G, S, K, C] (dropped: 0)
    dispatch = jnp.einsum("gske,gskc->gsec", e, c)
    combine = jnp.einsum("gsk,gske,gskc->gsec", routing.weights, e, c)
    return dispatch, combine


def dense_moe(layer: SparseMoE, x: jax.Array) -> jax.Array:
    """Every token through every expert, weighted by its renormalised top-k weights."""
    c = layer.config
    logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), layer.router[...])
    weights, experts = R.top_k_choice(
        R.router_probabilities(logits), c.num_experts_per_token, renormalize=c.renormalize
    )
    return dense_moe_with(layer, x, experts, weights)


def dense_moe_with(layer: SparseMoE, x, experts, weights):
    """Every token through every expert, weighted by given per-choice weights."""
    c = layer.config
    act = {"silu": jax.nn.silu, "relu": jax.nn.relu}[c.activation]
    out = jnp.zeros_like(x)
    for e in range(c.num_experts):
        up = x @ layer.up[...][e]
        hidden = act(x @ layer.gate[...][e]) * up if c.gated else act(up)
        w = jnp.sum(jnp.where(experts == e, weights, 0.0), axis=-1)
        out = out + w[..., None] * (hidden @ layer.down[...][e])
    return out


def _logits(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape) * 2.0


# ---- routing -----------------------------------------------------------------------


def test_worked_example_of_the_docstring():
    experts = jnp.array([[[1, 2], [1, 0], [1, 2], [2, 3]]])
    expected = [[[0, 1], [1, 0], [2, 2], [0, 0]]]
    np.testing.assert_array_equal(R.assign_slots(experts, 4, 2), expected)


@pytest.mark.parametrize("priority", [False, True])
def test_slots_equal_the_loop(priority):
    rng = np.random.default_rng(0)
    for _ in range(20):
        G, S, E, K = 2, int(rng.integers(1, 12)), int(rng.integers(2, 6)), 2
        K = min(K, E)
        experts = np.stack([[rng.choice(E, K, replace=False) for _ in range(S)] for _ in range(G)])
        capacity = int(rng.integers(1, 4))
        order = rng.random((G, S)) if priority else None
        got = R.assign_slots(jnp.asarray(experts), E, capacity, priority=order)
        np.testing.assert_array_equal(got, slots_by_loop(experts, E, capacity, order))
        mask = rng.random((G, S)) < 0.6
        got = R.assign_slots(jnp.asarray(experts), E, capacity, priority=order, mask=mask)
        np.testing.assert_array_equal(got, slots_by_loop(experts, E, capacity, order, mask))


@pytest.mark.parametrize("priority", ["token", "probability"])
def test_dispatch_and_combine_equal_one_hot_einsums(priority):
    G, S, E, K, D = 3, 16, 4, 2, 5
    logits = _logits(1, (G, S, E))
    x = jax.random.normal(jax.random.key(2), (G, S, D))
    capacity = R.expert_capacity(S, E, K, 0.75)
    probs = R.router_probabilities(logits)
    routing = R.token_choice(probs, K, capacity=capacity, renormalize=True, priority=priority)
    assert bool(jnp.any(routing.slots == capacity))  # some choices dropped
    dispatch_mask, combine_mask = one_hot_masks(routing, E)
    inputs = R.dispatch(x, routing, E)
    np.testing.assert_allclose(inputs, jnp.einsum("gsec,gsd->gecd", dispatch_mask, x), atol=1e-6)
    out = jax.random.normal(jax.random.key(3), inputs.shape)
    np.testing.assert_allclose(
        R.combine(out, routing), jnp.einsum("gsec,gecd->gsd", combine_mask, out), atol=1e-5
    )


def test_expert_capacity_rounding_and_errors():
    assert R.expert_capacity(4096, 8, 2, 1.25) == 1280
    assert R.expert_capacity(10, 4, 1, 1.0) == 3
    assert R.expert_capacity(10, 4, 1, 1.0, rounding="floor") == 2
    assert R.expert_capacity(10, 4, 1, 1.0, multiple_of=4) == 4
    with pytest.raises(ConfigError, match="capacity_factor must be > 0"):
        R.expert_capacity(10, 4, 1, 0.0)
    with pytest.raises(ConfigError, match="k=5 must be between 1 and the number of experts"):
        R.top_k_choice(jnp.ones((2, 4)) / 4, 5, renormalize=True)


def test_expert_choice_equals_loop():
    G, S, E, C, D = 2, 8, 4, 3, 5
    logits = _logits(4, (G, S, E))
    x = jax.random.normal(jax.random.key(5), (G, S, D))
    choice = R.expert_choice(R.router_probabilities(logits), C)
    w = jax.random.normal(jax.random.key(6), (E, D, D))
    out = jnp.einsum("gecd,edf->gecf", R.expert_choice_dispatch(x, choice), w)
    got = R.expert_choice_combine(out, choice, S)
    probs = np.asarray(R.router_probabilities(logits))
    expected = np.zeros((G, S, D), np.float32)
    for g in range(G):
        for e in range(E):
            for s in np.argsort(-probs[g, :, e], kind="stable")[:C]:
                expected[g, s] += probs[g, s, e] * (np.asarray(x)[g, s] @ np.asarray(w)[e])
    np.testing.assert_allclose(got, expected, atol=1e-5)


# ---- the layer against a dense loop over experts -----------------------------------


@pytest.mark.parametrize(
    "capacity_factor,priority,gated",
    [(None, "token", True), (8.0, "token", True), (8.0, "probability", False)],
)
def test_layer_equals_dense_loop_with_room_for_every_token(capacity_factor, priority, gated):
    config = MoEConfig(
        num_experts=4, hidden_size=8, intermediate_size=16, num_experts_per_token=2,
        capacity_factor=capacity_factor, priority=priority, gated=gated,
        activation="silu" if gated else "relu",
    )  # fmt: skip
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(7), (2, 6, 8))
    y, aux = layer(x)
    np.testing.assert_allclose(y, dense_moe(layer, x), atol=1e-5)
    assert float(aux.dropped) == 0.0

    def loss(fn):
        def f(model, x):
            out = fn(model, x)
            return jnp.sum(jnp.sin(out))

        return nnx.grad(f, argnums=(0, 1))

    (g_model, g_x) = loss(lambda m, x: m(x)[0])(layer, x)
    (r_model, r_x) = loss(dense_moe)(layer, x)
    np.testing.assert_allclose(g_x, r_x, atol=1e-5)
    got, ref = jax.tree.leaves(nnx.state(g_model)), jax.tree.leaves(nnx.state(r_model))
    assert len(got) == len(ref) >= 3
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_expert_choice_layer_equals_loop():
    config = MoEConfig(4, 8, 16, num_experts_per_token=1, capacity_factor=1.0,
                       routing="expert_choice")  # fmt: skip
    layer = SparseMoE(config, rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(9), (2, 6, 8))
    y, aux = layer(x)
    C = R.expert_capacity(6, 4, 1, 1.0)
    logits = jnp.einsum("btd,de->bte", x, layer.router[...])
    probs = np.asarray(R.router_probabilities(logits))
    expected = np.zeros((2, 6, 8), np.float32)
    taken = np.zeros((2, 6), bool)
    for g in range(2):
        for e in range(4):
            w_in = np.asarray(layer.gate[...][e]), np.asarray(layer.up[...][e])
            for s in np.argsort(-probs[g, :, e], kind="stable")[:C]:
                h = np.asarray(jax.nn.silu(x[g, s] @ w_in[0])) * (np.asarray(x[g, s]) @ w_in[1])
                expected[g, s] += probs[g, s, e] * (h @ np.asarray(layer.down[...][e]))
                taken[g, s] = True
    np.testing.assert_allclose(y, expected, atol=1e-5)
    np.testing.assert_allclose(aux.dropped, 1 - taken.mean(), atol=1e-6)


def test_groups_and_bad_group_size():
    config = MoEConfig(4, 8, 16, group_size=5)
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="do not split into groups of 5"):
        layer(jnp.ones((2, 6, 8)))
    with pytest.raises(ConfigError, match="capacity_factor must be > 0"):
        MoEConfig(4, 8, 16, capacity_factor=-1.0)
    with pytest.raises(ConfigError, match="k=6"):
        MoEConfig(4, 8, 16, num_experts_per_token=6)


# ---- HF PyTorch blocks ---------------------------------------------------------------


def _t(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x))


def test_layer_equals_hf_mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_config = MixtralConfig(
        hidden_size=16, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2
    )
    torch.manual_seed(0)
    block = MixtralSparseMoeBlock(hf_config).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = SparseMoE(
        MoEConfig(4, 16, 24, num_experts_per_token=2, capacity_factor=None),
        rngs=nnx.Rngs(0),
    )
    gate_up = block.experts.gate_up_proj.detach().numpy()  # [E, 2F, D]
    layer.router[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
    layer.gate[...] = jnp.asarray(gate_up[:, :24].transpose(0, 2, 1))
    layer.up[...] = jnp.asarray(gate_up[:, 24:].transpose(0, 2, 1))
    layer.down[...] = jnp.asarray(block.experts.down_proj.detach().numpy().transpose(0, 2, 1))
    x = np.random.default_rng(1).normal(size=(2, 7, 16)).astype(np.float32)
    with torch.no_grad():
        expected = block(_t(x)).numpy()
    np.testing.assert_allclose(layer(jnp.asarray(x))[0], expected, atol=1e-5)


def test_layer_equals_hf_switch_sparse_mlp_with_dropping():
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        SwitchTransformersSparseMLP,
    )

    E, D, F, T, capacity = 4, 16, 24, 10, 2
    hf_config = SwitchTransformersConfig(
        d_model=D, d_ff=F, num_experts=E, expert_capacity=capacity, router_bias=False,
        dense_act_fn="relu", dropout_rate=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    mlp = SwitchTransformersSparseMLP(hf_config).eval()
    for p in mlp.parameters():
        torch.nn.init.normal_(p, std=0.3)
    config = MoEConfig(
        E, D, F, num_experts_per_token=1, capacity_factor=capacity * E / T,
        capacity_rounding="round", renormalize=False, gated=False, activation="relu",
    )  # fmt: skip
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    layer.router[...] = jnp.asarray(mlp.router.classifier.weight.detach().numpy().T)
    experts = [getattr(mlp.experts, f"expert_{e}") for e in range(E)]
    layer.up[...] = jnp.asarray(np.stack([ex.wi.weight.detach().numpy().T for ex in experts]))
    layer.down[...] = jnp.asarray(np.stack([ex.wo.weight.detach().numpy().T for ex in experts]))
    x = np.random.default_rng(2).normal(size=(3, T, D)).astype(np.float32)
    with torch.no_grad():
        expected = mlp(_t(x)).numpy()
    y, aux = layer(jnp.asarray(x))
    assert float(aux.dropped) > 0  # capacity 2 of 10 tokens over 4 experts drops some
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_losses_equal_hf():
    from transformers.models.mixtral.modeling_mixtral import (
        load_balancing_loss_func as mixtral_loss,
    )
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        load_balancing_loss_func as switch_loss,
    )
    from transformers.models.switch_transformers.modeling_switch_transformers import (
        router_z_loss_func,
    )

    G, S, E = 3, 11, 6
    logits = np.asarray(_logits(8, (G, S, E)))
    probs = R.router_probabilities(jnp.asarray(logits))
    top1 = jnp.argmax(probs, axis=-1)[..., None]
    np.testing.assert_allclose(
        R.load_balancing_loss(probs, top1),
        switch_loss(_t(np.asarray(probs)), _t(np.asarray(top1[..., 0]))).item(),
        rtol=1e-5,
    )
    _, top2 = R.top_k_choice(probs[:1], 2, renormalize=True)
    expected = mixtral_loss((_t(logits[0]),), num_experts=E, top_k=2).item()
    np.testing.assert_allclose(R.load_balancing_loss(probs[:1], top2), expected, rtol=1e-5)
    np.testing.assert_allclose(
        R.router_z_loss(jnp.asarray(logits)), router_z_loss_func(_t(logits)).item(), rtol=1e-5
    )


def test_padding_takes_no_capacity_and_no_part_in_losses():
    """A mask keeps padding out of routing (slots by the loop that skips it), of the
    output (0) and of the losses and statistics (HF's functions with attention_mask)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    config = MoEConfig(4, 8, 16, 2, capacity_factor=0.75)
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    B, T = 2, 12
    x = jax.random.normal(jax.random.key(1), (B, T, 8))
    mask = np.ones((B, T), bool)
    mask[0, :5] = False  # left padding
    y, aux = layer(x, mask=jnp.asarray(mask))
    # The reference: top-k of the router, slots by the loop skipping padding, experts densely.
    logits = jnp.einsum("btd,de->bte", x, layer.router[...])
    probs = R.router_probabilities(logits)
    weights, experts = R.top_k_choice(probs, 2, renormalize=True)
    capacity = R.expert_capacity(T, 4, 2, 0.75)
    slots = slots_by_loop(np.asarray(experts), 4, capacity, mask=mask)
    assert np.any(slots[mask] == capacity)  # some real tokens are dropped too
    kept_weights = jnp.where(jnp.asarray(slots) < capacity, weights, 0.0)
    full = dense_moe_with(layer, x, experts, kept_weights)
    np.testing.assert_allclose(y, full, atol=1e-6)
    assert np.all(np.asarray(y)[~mask] == 0)
    # Losses and statistics count real tokens only.
    row = 0
    hf = load_balancing_loss_func(
        (_t(np.asarray(logits[row])),), num_experts=4, top_k=2,
        attention_mask=torch.tensor(mask[row : row + 1]),
    ).item()  # fmt: skip
    ours = R.load_balancing_loss(probs[row : row + 1], experts[row : row + 1], mask[row : row + 1])
    np.testing.assert_allclose(ours, hf, rtol=1e-5)
    real = jnp.asarray(mask)
    z = jax.nn.logsumexp(logits, axis=-1)[real]
    np.testing.assert_allclose(aux.router_z_loss, jnp.mean(z**2), rtol=1e-5)
    np.testing.assert_allclose(aux.dropped, np.mean(slots[mask] == capacity), rtol=1e-6)
    load = np.mean(np.asarray(jax.nn.one_hot(experts, 4))[mask], axis=(0, 1))
    np.testing.assert_allclose(aux.load, load, rtol=1e-6)
