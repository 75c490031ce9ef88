"""Expert-parallel SparseMoE against the unsharded layer.

Oracle: the unsharded :class:`SparseMoE` with the same parameters (outputs,
aux losses and statistics, gradients w.r.t. the input and every parameter),
on 8 fake CPU devices and across 2 processes x 4 devices (gloo collectives);
:func:`dense_ragged_all_to_all` against the example and the pseudocode of
``jax.lax.ragged_all_to_all``'s docstring; the ragged exchange is checked by
lowering for TPU and GPU (XLA:CPU cannot compile it).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxcombine.errors import ConfigError
from jaxcombine.moe import MoEConfig, SparseMoE
from jaxcombine.moe.parallel import dense_ragged_all_to_all, expert_parallel

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-5


def _mesh(shape, names):
    return Mesh(np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape), names)


def _loss(y, aux):
    return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss + 0.1 * aux.router_z_loss


def _step(graphdef, moe):
    """A jitted training-style step over the split state ``(params, rest, x)``:
    loss, y, aux and the gradients w.r.t. the parameters and x. ``nnx.grad``
    inside: the jitter's RNG count is updated in the gradient's trace."""

    def f(model, x):
        y, aux = moe(model, x)
        return _loss(y, aux), (y, aux)

    @jax.jit
    def step(params, rest, x):
        grad = nnx.value_and_grad(f, argnums=(0, 1), has_aux=True)
        return grad(nnx.merge(graphdef, params, rest), x)

    return step


def _assert_same(got, ref):
    (loss, (y, aux)), grads = got
    (r_loss, (r_y, r_aux)), r_grads = ref
    np.testing.assert_allclose(y, r_y, atol=ATOL)
    np.testing.assert_allclose(loss, r_loss, atol=ATOL, rtol=1e-6)
    for name, a, b in zip(aux._fields, aux, r_aux, strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL, err_msg=name)
    leaves, r_leaves = jax.tree.leaves(grads), jax.tree.leaves(r_grads)
    assert len(leaves) == len(r_leaves) >= 4  # x, router, up, down (+ gate)
    for a, b in zip(leaves, r_leaves, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=ATOL)
    return aux


CASES = {
    # 2 x 4 mesh, SwiGLU, capacity small enough to drop choices
    "data2_expert4_dropping": dict(
        mesh=((2, 4), ("data", "expert")),
        kw={},
        config=dict(capacity_factor=0.5),
        batch=(8, 12),
    ),  # fmt: skip
    # 1 x 8 mesh, Switch-style top-1 ReLU, priority routing, groups of 6, jitter
    "data1_expert8_priority_jitter": dict(
        mesh=((1, 8), ("data", "expert")),
        kw=dict(deterministic=False),
        config=dict(
            num_experts_per_token=1,
            capacity_factor=1.0,
            priority="probability",
            renormalize=False,
            gated=False,
            activation="relu",
            group_size=6,
            router_jitter=0.1,
        ),
        batch=(4, 24),
    ),  # fmt: skip
    # 1-D expert mesh, dropless (counts exchange + ragged exchange, dense on CPU)
    "expert8_dropless": dict(
        mesh=((8,), ("expert",)),
        kw=dict(data_axis=None),
        config=dict(capacity_factor=None),
        batch=(8, 10),
    ),  # fmt: skip
    # 4 x 2 mesh with a third, unused axis; dropless with 2 experts per device
    "data2_expert2_model2_dropless": dict(
        mesh=((2, 2, 2), ("data", "expert", "model")),
        kw={},
        config=dict(capacity_factor=None),
        batch=(4, 6),
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", list(CASES))
def test_equals_unsharded_layer(case):
    spec = CASES[case]
    mesh = _mesh(*spec["mesh"])
    config = MoEConfig(num_experts=8, hidden_size=16, intermediate_size=24, **spec["config"])
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(layer, nnx.Param, ...)  # rest: the jitter's RNG
    x = jax.random.normal(jax.random.key(1), (*spec["batch"], 16))
    kw = spec["kw"]
    deterministic = kw.get("deterministic", True)

    got = _step(graphdef, lambda m, x: expert_parallel(m, x, mesh, **kw))(params, rest, x)
    ref = _step(graphdef, lambda m, x: m(x, deterministic=deterministic))(params, rest, x)
    aux = _assert_same(got, ref)
    if config.capacity_factor is not None:
        assert float(aux.dropped) > 0  # the same choices dropped as unsharded
    else:
        assert float(aux.dropped) == 0
    if not deterministic:  # the noise changes the routing: compare with a noiseless call
        (_, (y_plain, _)), _ = ref
        layer_plain = nnx.merge(graphdef, params, rest)
        assert not np.allclose(y_plain, layer_plain(x)[0], atol=1e-4)


class Block(nnx.Module):
    """A residual block whose MoE runs expert-parallel from ``__call__``."""

    def __init__(self, config: MoEConfig, mesh: Mesh, *, rngs: nnx.Rngs):
        self.moe = SparseMoE(config, rngs=rngs)
        self.mesh = mesh

    def __call__(self, x):
        y, aux = expert_parallel(self.moe, x, self.mesh)
        return x + y, aux


def test_from_a_module_call_in_a_training_step():
    """Sharded parameters (jaxcombine.sharding), an optimizer-free SGD step in
    jax.jit over the split state; the new parameters equal the unsharded step's."""
    from jaxcombine.sharding import shard_model

    mesh = _mesh((2, 4), ("data", "expert"))
    config = MoEConfig(8, 16, 24, capacity_factor=0.75)
    block = shard_model(Block(config, mesh, rngs=nnx.Rngs(3)), mesh)
    assert block.moe.up[...].sharding.spec == P("expert", None, None)
    x = jax.random.normal(jax.random.key(4), (8, 6, 16))

    def make_step(forward):
        graphdef, state = nnx.split(block)

        @jax.jit
        def step(state, x):
            def loss(state):
                y, aux = forward(nnx.merge(graphdef, state), x)
                return jnp.mean(y**2) + 0.01 * aux.load_balancing_loss

            value, grads = jax.value_and_grad(loss)(state)
            return value, jax.tree.map(lambda p, g: p - 0.5 * g, state, grads)

        return step(state, x)

    def unsharded(block, x):
        y, aux = block.moe(x)
        return x + y, aux

    loss, new = make_step(lambda m, x: m(x))
    r_loss, r_new = make_step(unsharded)
    np.testing.assert_allclose(loss, r_loss, atol=ATOL)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(r_new), strict=True):
        np.testing.assert_allclose(a, b, atol=ATOL)
    _, old = nnx.split(block)
    assert not np.allclose(jax.tree.leaves(new)[-1], jax.tree.leaves(old)[-1])
    y, aux = block(x)  # eagerly
    graphdef, state = nnx.split(block)
    r_y, r_aux = jax.jit(lambda state, x: unsharded(nnx.merge(graphdef, state), x))(state, x)
    np.testing.assert_allclose(y, r_y, atol=ATOL)
    np.testing.assert_allclose(aux.dropped, r_aux.dropped, atol=ATOL)


# ---- the ragged exchange ---------------------------------------------------------------


def _ragged_by_pseudocode(operands, outputs, input_offsets, send_sizes, output_offsets, recv):
    """``ragged_all_to_all`` written as its docstring's SEND/RECEIVE pseudocode (numpy)."""
    n, N = len(operands), len(send_sizes[0])
    per = N // n
    results = [o.copy() for o in outputs]
    for src in range(n):
        for i in range(N):
            dst = i // per
            data = operands[src][input_offsets[src][i] : input_offsets[src][i] + send_sizes[src][i]]
            j = src * per + i % per  # the receiver's slice index for this sender's slice i
            assert recv[dst][j] == len(data)
            start = output_offsets[src][i]
            results[dst][start : start + len(data)] = data
    return results


def _run_dense(mesh, *arrays):
    f = jax.shard_map(
        lambda *a: dense_ragged_all_to_all(*a, axis_name="x"),
        mesh=mesh, in_specs=P("x"), out_specs=P("x"),
    )  # fmt: skip
    return np.asarray(jax.jit(f)(*(jnp.concatenate(a) for a in arrays)))


def test_dense_ragged_all_to_all_equals_the_docstring_example():
    mesh = _mesh((2,), ("x",))
    got = _run_dense(
        mesh,
        [np.array([1, 2, 2.0]), np.array([3, 4, 0.0])],  # operand
        [np.zeros(4), np.zeros(4)],  # output
        [np.array([0, 1]), np.array([0, 1])],  # input_offsets
        [np.array([1, 2]), np.array([1, 1])],  # send_sizes
        [np.array([0, 0]), np.array([1, 2])],  # output_offsets
        [np.array([1, 1]), np.array([2, 1])],  # recv_sizes
    )
    np.testing.assert_array_equal(got, [1, 3, 0, 0, 2, 2, 4, 0])  # as documented


def test_dense_ragged_all_to_all_equals_the_pseudocode():
    """4 devices, 2 slices per device, random sizes, rows of width 3."""
    n, per, M, W = 4, 2, 7, 3
    R = n * per * 2  # room for the most rows a device can receive
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, 3, (n, n * per))  # sizes[src, i]: slice i of device src
    operands = [rng.normal(size=(M, W)).astype(np.float32) for _ in range(n)]
    outputs = [np.full((R, W), -1.0, np.float32) for _ in range(n)]
    in_off = [rng.integers(0, M - sizes[src] + 1) for src in range(n)]  # slices may overlap
    out_off, recv = [], []
    for src in range(n):
        offs = []
        for i in range(n * per):
            dst, k = divmod(i, per)
            before = [sizes[s, dst * per + kk] for s in range(n) for kk in range(per)]
            offs.append(sum(before[: src * per + k]))
        out_off.append(np.array(offs))
    for dst in range(n):
        recv.append(np.array([sizes[s, dst * per + k] for s in range(n) for k in range(per)]))
    expected = _ragged_by_pseudocode(operands, outputs, in_off, list(sizes), out_off, recv)
    got = _run_dense(
        _mesh((n,), ("x",)), operands, outputs, in_off, list(sizes), out_off, recv
    ).reshape(n, R, W)
    np.testing.assert_array_equal(got, np.stack(expected))
    assert (got != -1).any() and (got == -1).any()


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_ragged_exchange_lowers_for_accelerators(platform):
    """Forward and backward of the dropless path with ``jax.lax.ragged_all_to_all``:
    2 exchanges forward, 2 in the gradient, over the expert axis's replica groups."""
    mesh = _mesh((2, 4), ("data", "expert"))
    layer = SparseMoE(MoEConfig(8, 16, 24, capacity_factor=None), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    x = jax.ShapeDtypeStruct((8, 6, 16), jnp.float32)

    def text(exchange):
        def f(state, x):
            return _loss(*expert_parallel(nnx.merge(graphdef, state), x, mesh, exchange=exchange))

        traced = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).trace(state, x)
        return traced.lower(lowering_platforms=(platform,)).as_text()

    ragged = text("ragged")
    calls = [line for line in ragged.splitlines() if "custom_call @ragged_all_to_all" in line]
    assert len(calls) == 4
    assert all("replica_groups = dense<[[0, 1, 2, 3], [4, 5, 6, 7]]>" in c for c in calls)
    assert "chlo.ragged_dot" in ragged  # the grouped expert matmuls
    assert "ragged_all_to_all" not in text("dense")
    assert "ragged_all_to_all" not in text("auto")  # the mesh is on CPU


# ---- bad input ---------------------------------------------------------------------------


def _bad(config=None, shape=(8, 6, 16), mesh=((2, 4), ("data", "expert")), **kw):
    config = config or MoEConfig(8, 16, 24)
    layer = SparseMoE(config, rngs=nnx.Rngs(0))
    # an abstract input: the error must come before any array is touched
    expert_parallel(layer, jax.ShapeDtypeStruct(shape, jnp.float32), _mesh(*mesh), **kw)


def test_bad_input_errors():
    with pytest.raises(ConfigError, match=r"num_experts=6 is not divisible by the size 4") as e:
        _bad(MoEConfig(6, 16, 24))
    assert "multiple of 4 experts" in str(e.value)
    with pytest.raises(ConfigError, match=r"4 routing groups .* not divisible by the 8 devices"):
        _bad(shape=(4, 6, 16))
    with pytest.raises(ConfigError, match=r"data=1 x expert=8") as e:
        _bad(
            MoEConfig(8, 16, 24, group_size=4), shape=(2, 6, 16), mesh=((1, 8), ("data", "expert"))
        )
    assert "multiple of 8 groups" in str(e.value)
    with pytest.raises(ConfigError, match="do not split into groups of 5"):
        _bad(MoEConfig(8, 16, 24, group_size=5))
    with pytest.raises(ConfigError, match=r"(?s)data_axis='data' is not an axis.*data_axis=None"):
        _bad(mesh=((8,), ("expert",)))
    with pytest.raises(ConfigError, match="expert_axis='experts' is not an axis"):
        _bad(expert_axis="experts")
    with pytest.raises(ConfigError, match="both 'expert'"):
        _bad(data_axis="expert")
    with pytest.raises(ConfigError, match="token-choice routing, not 'expert_choice'"):
        _bad(MoEConfig(8, 16, 24, num_experts_per_token=1, routing="expert_choice"))
    with pytest.raises(ConfigError, match="unknown exchange 'fast'"):
        _bad(exchange="fast")


def test_a_mesh_with_explicit_axes_is_refused_clearly():
    """jax.make_mesh gives Explicit axes by default; shard_map's own error would not say so."""
    layer = SparseMoE(MoEConfig(8, 16, 24), rngs=nnx.Rngs(0))
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    with pytest.raises(ConfigError, match=r"mesh axes \['data', 'expert'\] are Explicit") as e:
        expert_parallel(layer, jax.ShapeDtypeStruct((8, 6, 16), jnp.float32), mesh)
    assert "jaxcombine.distributed.make_mesh" in str(e.value)


# ---- two processes ---------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_equal_unsharded(tmp_path):
    """2 processes x 4 CPU devices (gloo); meshes whose expert axis spans both processes."""
    port = _free_port()
    env = dict(os.environ)
    env.update(
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    script = str(Path(__file__).with_name("_moe_multiprocess.py"))
    children = [
        subprocess.Popen(
            [sys.executable, script, str(i), str(port), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(2)
    ]
    logs = []
    try:
        for child in children:
            out, _ = child.communicate(timeout=420)
            logs.append(out)
    except subprocess.TimeoutExpired:
        for child in children:
            child.kill()
        for child in children:
            child.communicate()
        pytest.fail("a child process hung (killed after 420 s)")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for i, child in enumerate(children):
        assert child.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["process_count"] == 2 and verdict["device_count"] == 8
    assert set(verdict["cases"]) == {"data2_expert4_across", "expert8_dropless"}
    for name, case in verdict["cases"].items():
        assert case["ok"], (name, case)
        assert case["compared"] == 12  # loss, y, 5 aux fields, 4 parameter gradients, x gradient
        assert case["max_error"] < ATOL
    assert verdict["cases"]["data2_expert4_across"]["dropped"] > 0
