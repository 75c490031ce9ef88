"""Dropless sparse MoE (MegaBlocks-style sort by expert + grouped matmuls).

Oracles: a Python loop for the expert-sorted layout, plain indexing (JAX's own
gather/scatter autodiff) for the custom-gradient permute and unsort, and a
dense loop over experts (every token through every expert, weighted by its
top-k weights) for the layer, outputs and gradients. The ragged_dot branch
(GPU/TPU) and the blocked CPU branch are each called directly on CPU and
compared with the loop.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxcombine.errors import ConfigError
from jaxcombine.moe import MoEConfig, SparseMoE
from jaxcombine.moe import layer as L
from jaxcombine.moe import routing as R

TOL = dict(atol=1e-5, rtol=1e-5)

# ---- slow references ---------------------------------------------------------------


def layout_by_loop(experts: np.ndarray, num_experts: int, block: int):
    """Rows of each expert in token order, each group padded to a multiple of block."""
    S, K = experts.shape
    rows, sizes = [], []
    for e in range(num_experts):
        mine = [s * K + k for s in range(S) for k in range(K) if experts[s, k] == e]
        padded = -(-len(mine) // block) * block
        rows += mine + [S * K] * (padded - len(mine))
        sizes.append(padded)
    return rows, sizes


def dense_loop(x, router, up, gate, down, *, k, renormalize, act):
    """y[n] = sum over experts e of w[n, e] * expert_e(x[n]), w = top-k weights (0 elsewhere)."""
    probs = jax.nn.softmax(x @ router, axis=-1)
    top, chosen = jax.lax.top_k(probs, k)
    if renormalize:
        top = top / jnp.sum(top, axis=-1, keepdims=True)
    y = jnp.zeros_like(x)
    for e in range(up.shape[0]):
        hidden = act(x @ gate[e]) * (x @ up[e]) if gate is not None else act(x @ up[e])
        w = jnp.sum(jnp.where(chosen == e, top, 0.0), axis=-1)
        y = y + w[..., None] * (hidden @ down[e])
    return y


def _params(key, E, D, F, gated=True, scale=0.25):
    ks = jax.random.split(key, 4)
    normal = lambda k, shape: scale * jax.random.normal(k, shape)  # noqa: E731
    return {
        "router": normal(ks[0], (D, E)),
        "up": normal(ks[1], (E, D, F)),
        "gate": normal(ks[2], (E, D, F)) if gated else None,
        "down": normal(ks[3], (E, F, D)),
    }


def _unbalanced(params, x, k):
    """Router and inputs that send every token to experts 0 (first) .. k-1."""
    x = x.at[..., 0].set(4.0)
    router = params["router"].at[0].set(0.0)
    router = router.at[0, :k].set(jnp.linspace(3.0, 2.0, k))
    return {**params, "router": router}, x


def _assert_trees_close(got, ref):
    got, ref = jax.tree.leaves(got), jax.tree.leaves(ref)
    assert len(got) == len(ref) and got
    for a, b in zip(got, ref, strict=True):
        np.testing.assert_allclose(a, b, **TOL)


# ---- layout, permute and unsort ----------------------------------------------------


def test_worked_example_of_the_docstring():
    experts = jnp.array([[[1, 2], [1, 0], [1, 2], [2, 3]]])
    layout = R.sort_by_expert(experts, 4)
    np.testing.assert_array_equal(layout.group_sizes, [[1, 3, 3, 1]])
    # e0: t1.1 | e1: t0.0 t1.0 t2.0 | e2: t0.1 t2.1 t3.0 | e3: t3.1   (choice = s * K + k)
    np.testing.assert_array_equal(layout.rows, [[3, 0, 2, 4, 1, 5, 6, 7]])


@pytest.mark.parametrize("block", [1, 2, 3, 8])
def test_sort_by_expert_equals_loop(block):
    rng = np.random.default_rng(block)
    for trial in range(10):
        S, E, K = int(rng.integers(1, 20)), int(rng.integers(1, 7)), 1
        K = min(int(rng.integers(1, 3)), E)
        if trial == 0:  # every token to the same experts
            experts = np.tile(np.arange(K), (S, 1))
        else:
            experts = np.stack([rng.choice(E, K, replace=False) for _ in range(S)])
        layout = R.sort_by_expert(jnp.asarray(experts)[None], E, block=block)
        rows, sizes = layout_by_loop(experts, E, block)
        P = R.sorted_rows(S * K, E, block)
        assert len(rows) <= P == layout.rows.shape[1]
        np.testing.assert_array_equal(layout.rows[0], rows + [S * K] * (P - len(rows)))
        np.testing.assert_array_equal(layout.group_sizes[0], sizes)
        # position is the inverse of rows on every choice
        flat = np.asarray(layout.position[0]).reshape(-1)
        np.testing.assert_array_equal(np.asarray(layout.rows[0])[flat], np.arange(S * K))


def test_capacity_layout_inverts_the_slots():
    G, S, E, K = 2, 12, 4, 2
    probs = R.router_probabilities(jax.random.normal(jax.random.key(0), (G, S, E)) * 2)
    routing = R.token_choice(probs, K, capacity=3, renormalize=True)
    layout = R.capacity_layout(routing, E)
    kept = np.asarray(routing.slots) < 3
    assert not kept.all()
    expected = np.asarray(routing.experts) * 3 + np.asarray(routing.slots)
    np.testing.assert_array_equal(np.asarray(layout.position)[kept], expected[kept])
    assert (np.asarray(layout.position)[~kept] == E * 3).all()
    for g in range(G):
        for r, c in enumerate(np.asarray(layout.rows[g])):
            if c < S * K:
                assert layout.position[g].reshape(-1)[c] == r


@pytest.mark.parametrize("block", [1, 4])
def test_permute_and_unsort_gradients_equal_plain_indexing(block):
    G, S, E, K, D = 2, 9, 3, 2, 5
    experts = jax.random.randint(jax.random.key(1), (G, S, K), 0, E)
    layout = R.sort_by_expert(experts, E, block=block)
    x = jax.random.normal(jax.random.key(2), (G, S, D))
    w = jax.random.uniform(jax.random.key(3), (G, S, K))
    head = jax.random.normal(jax.random.key(4), (D, D))

    def fast(x, w):
        rows = R.permute(x, layout)
        return jnp.sum(jnp.sin(R.unsort(jnp.tanh(rows @ head), w, layout)))

    def plain(x, w):  # JAX's own gather/scatter gradients
        padded = jnp.concatenate([x, jnp.zeros((G, 1, D))], axis=1)
        rows = padded[jnp.arange(G)[:, None], jnp.minimum(layout.rows // K, S)]
        out = jnp.tanh(rows @ head)
        picked = out[jnp.arange(G)[:, None, None], layout.position]  # [G, S, K, D]
        return jnp.sum(jnp.sin(jnp.einsum("gsk,gskd->gsd", w, picked)))

    np.testing.assert_allclose(fast(x, w), plain(x, w), **TOL)
    _assert_trees_close(jax.grad(fast, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w))
    _assert_trees_close(jax.jit(jax.grad(fast, (0, 1)))(x, w), jax.grad(plain, (0, 1))(x, w))


def test_bad_block():
    with pytest.raises(ConfigError, match="block must be >= 1"):
        R.sort_by_expert(jnp.zeros((1, 4, 1), jnp.int32), 2, block=0)
    with pytest.raises(ConfigError, match="multiple of block=4"):
        L.blocked_matmul(jnp.ones((6, 3)), jnp.ones((2, 3, 2)), jnp.array([4, 0]), 4)


# ---- the two grouped-matmul branches, called directly ------------------------------

BRANCHES = {
    "ragged_dot": (1, L.ragged_matmul),
    "blocked_4": (4, partial(L.blocked_matmul, block=4)),
    "blocked_cpu": (L.CPU_BLOCK, partial(L.blocked_matmul, block=L.CPU_BLOCK)),
}


@pytest.mark.parametrize("branch", list(BRANCHES))
@pytest.mark.parametrize("unbalanced,k", [(False, 1), (True, 2)])
def test_branch_equals_dense_loop(branch, unbalanced, k):
    E, D, F, N = 4, 8, 12, 22
    block, matmul = BRANCHES[branch]
    params = _params(jax.random.key(5), E, D, F)
    x = jax.random.normal(jax.random.key(6), (N, D))
    if unbalanced:
        params, x = _unbalanced(params, x, k)

    def fast(p, x):
        probs = R.router_probabilities(x @ p["router"])
        weights, experts = R.top_k_choice(probs, k, renormalize=True)
        y = L.dropless_experts(
            x, experts, weights, p["up"], p["gate"], p["down"],
            activation=jax.nn.silu, matmul=matmul, block=block,
        )  # fmt: skip
        return y

    ref = partial(dense_loop, k=k, renormalize=True, act=jax.nn.silu)
    if unbalanced:  # every token's first choice is expert 0
        assert (np.argmax(np.asarray(x @ params["router"]), axis=-1) == 0).all()

    def loss(fn):
        return lambda p, x: jnp.sum(jnp.sin(fn(p, x)))

    np.testing.assert_allclose(fast(params, x), ref(x, **params), **TOL)
    got = jax.jit(jax.grad(loss(fast), (0, 1)))(params, x)
    want = jax.jit(jax.grad(loss(lambda p, x: ref(x, **p)), (0, 1)))(params, x)
    _assert_trees_close(got, want)


@pytest.mark.parametrize("block", [1, 3])
def test_blocked_matmul_with_empty_groups_and_unused_tail(block):
    E, A, B = 5, 4, 6
    counts = np.array([0, 2, 0, 4, 1]) * block
    P = int(counts.sum()) + 2 * block  # two unused blocks at the end
    x = jax.random.normal(jax.random.key(7), (P, A))
    w = jax.random.normal(jax.random.key(8), (E, A, B))
    owner = np.repeat(np.arange(E), counts)

    def loop(x, w):
        used = len(owner)
        out = jnp.stack([x[r] @ w[owner[r]] for r in range(used)])
        return jnp.concatenate([out, jnp.zeros((P - used, B))])

    sizes = jnp.asarray(counts)
    fast = partial(L.blocked_matmul, group_sizes=sizes, block=block)
    np.testing.assert_allclose(fast(x, w), loop(x, w), **TOL)
    cot = jax.random.normal(jax.random.key(9), (P, B))
    got = jax.vjp(fast, x, w)[1](cot)
    want = jax.vjp(loop, x, w)[1](cot)
    _assert_trees_close(got, want)
    np.testing.assert_array_equal(got[1][0], 0.0)  # an expert with no rows gets no gradient


# ---- the layer ---------------------------------------------------------------------


@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("unbalanced", [False, True])
@pytest.mark.parametrize("k", [1, 2])
def test_dropless_layer_equals_dense_loop(k, unbalanced, renormalize):
    E, D, F = 4, 8, 16
    config = MoEConfig(E, D, F, num_experts_per_token=k, capacity_factor=None,
                       renormalize=renormalize)  # fmt: skip
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    params = _params(jax.random.key(10), E, D, F)
    x = jax.random.normal(jax.random.key(11), (2, 7, D))
    if unbalanced:
        params, x = _unbalanced(params, x, k)
    for name, value in params.items():
        getattr(layer, name)[...] = value
    graphdef, state = nnx.split(layer)
    ref = partial(dense_loop, k=k, renormalize=renormalize, act=jax.nn.silu)

    @jax.jit
    def forward(state, x):
        return nnx.merge(graphdef, state)(x)

    y, aux = forward(state, x)
    np.testing.assert_allclose(y, ref(x, **params), **TOL)
    assert float(aux.dropped) == 0.0
    if unbalanced:
        np.testing.assert_allclose(aux.load[:k], 1.0 / k)

    def loss(state, x):
        return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)[0]))

    def ref_loss(state, x):
        p = {name: state[name][...] for name in params}
        return jnp.sum(jnp.sin(ref(x, **p)))

    got = jax.jit(jax.grad(loss, (0, 1)))(state, x)
    want = jax.jit(jax.grad(ref_loss, (0, 1)))(state, x)
    _assert_trees_close(got, want)


def test_dropless_layer_ungated_with_groups():
    E, D, F = 3, 6, 10
    config = MoEConfig(E, D, F, num_experts_per_token=2, capacity_factor=None, group_size=4,
                       gated=False, activation="relu")  # fmt: skip
    layer = SparseMoE(config, rngs=nnx.Rngs(1))
    params = _params(jax.random.key(12), E, D, F, gated=False)
    for name, value in params.items():
        if value is not None:
            getattr(layer, name)[...] = value
    x = jax.random.normal(jax.random.key(13), (3, 8, D))
    ref = partial(dense_loop, k=2, renormalize=True, act=jax.nn.relu)
    np.testing.assert_allclose(layer(x)[0], ref(x, **params), **TOL)
    got = nnx.grad(lambda m, x: jnp.sum(jnp.sin(m(x)[0])), argnums=(0, 1))(layer, x)
    want = jax.grad(lambda p, x: jnp.sum(jnp.sin(ref(x, gate=None, **p))), (0, 1))(
        {n: v for n, v in params.items() if v is not None}, x
    )
    np.testing.assert_allclose(got[1], want[1], **TOL)
    for name in ("router", "up", "down"):
        np.testing.assert_allclose(getattr(got[0], name)[...], want[0][name], **TOL)


def test_layer_on_cpu_lowers_the_blocked_branch_only():
    config = MoEConfig(4, 8, 16, num_experts_per_token=2, capacity_factor=None)
    graphdef, state = nnx.split(SparseMoE(config, rngs=nnx.Rngs(0)))

    def loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0])

    hlo = jax.jit(jax.grad(loss)).lower(state, jnp.ones((2, 5, 8))).as_text()
    assert "while" in hlo
    assert "ragged_dot" not in hlo


@pytest.mark.parametrize("gated", [True, False])
def test_experts_cpu_loop_equals_einsum_branch(gated):
    E, D, F = 3, 6, 10
    p = _params(jax.random.key(14), E, D, F, gated=gated)
    inputs = jax.random.normal(jax.random.key(15), (2, E, 5, D))  # [G, E, C, D]
    weights = (p["up"], p["gate"], p["down"])

    def loss(fn):
        return lambda inputs, *w: jnp.sum(jnp.sin(fn(inputs, *w, activation=jax.nn.silu)))

    got = jax.grad(loss(L._experts_loop), (0, 1, 3))(inputs, *weights)
    want = jax.grad(loss(L._experts_einsum), (0, 1, 3))(inputs, *weights)
    _assert_trees_close(got, want)
    np.testing.assert_allclose(
        L._experts_loop(inputs, *weights, activation=jax.nn.silu),
        L._experts_einsum(inputs, *weights, activation=jax.nn.silu),
        **TOL,
    )
