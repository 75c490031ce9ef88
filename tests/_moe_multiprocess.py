"""One of two processes for tests/test_moe_parallel.py (not a test module).

    python tests/_moe_multiprocess.py PROCESS_ID PORT OUT_DIR

Each process has 4 CPU devices (XLA_FLAGS set by the parent) and joins the
other over gloo. Both build the same layer and input from the same seeds,
place the parameters by their logical axes and the input from its local
shards, and run a jitted forward + gradient of the expert-parallel layer on
an 8-device mesh. Results are gathered to every process; process 0 compares
them with the unsharded layer run on its own first device and writes
OUT_DIR/verdict.json (via a temporary name).
"""

from __future__ import annotations

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402


def main(process_id: int, port: int, out_dir: str) -> None:
    jax.distributed.initialize(
        coordinator_address=f"localhost:{port}", num_processes=2, process_id=process_id,
        initialization_timeout=120,
    )  # fmt: skip
    from jaxcombine.moe import MoEConfig, SparseMoE
    from jaxcombine.moe.parallel import expert_parallel
    from jaxcombine.sharding import state_shardings

    assert jax.process_count() == 2 and jax.device_count() == 8, jax.devices()
    devices = np.array(jax.devices())  # process 0 holds 0-3, process 1 holds 4-7
    cases = {
        # expert axis [0, 2, 4, 6] / [1, 3, 5, 7]: every all_to_all crosses processes
        "data2_expert4_across": (
            Mesh(devices.reshape(4, 2).T, ("data", "expert")),
            "data",
            MoEConfig(8, 16, 24, capacity_factor=0.5),
        ),  # fmt: skip
        "expert8_dropless": (
            Mesh(devices, ("expert",)),
            None,
            MoEConfig(8, 16, 24, capacity_factor=None),
        ),  # fmt: skip
    }
    verdict = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    verdict["cases"] = {}
    x_host = np.random.default_rng(0).normal(size=(8, 6, 16)).astype(np.float32)
    for name, (mesh, data_axis, config) in cases.items():
        layer = SparseMoE(config, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(layer)
        host_state = jax.tree.map(np.asarray, state)
        shardings = state_shardings(state, mesh)
        flat = [
            (path, v.replace(_global(np.asarray(v.get_value()), shardings[path])))
            for path, v in nnx.to_flat_state(state)
        ]
        global_state = nnx.from_flat_state(flat)
        tokens = P((data_axis, "expert")) if data_axis else P("expert")
        x = _global(x_host, NamedSharding(mesh, tokens))
        assert not x.is_fully_addressable  # each process holds half of the rows

        def f(state, x, graphdef=graphdef, mesh=mesh, data_axis=data_axis):
            y, aux = expert_parallel(nnx.merge(graphdef, state), x, mesh, data_axis=data_axis)
            return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss + 0.1 * aux.router_z_loss, (y, aux)

        got = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(global_state, x)
        got = multihost_utils.process_allgather(got, tiled=True)
        if process_id == 0:
            verdict["cases"][name] = _compare(got, graphdef, host_state, x_host)
    if process_id == 0:
        path = os.path.join(out_dir, "verdict.json")
        with open(path + ".tmp", "w") as f:
            json.dump(verdict, f, indent=1)
        os.replace(path + ".tmp", path)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


def _global(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array whose local shards this process cuts from its host copy."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _compare(got, graphdef, host_state, x_host) -> dict:
    """The unsharded layer on this process's first device vs the gathered results."""
    device = jax.local_devices()[0]
    state, x = jax.device_put((host_state, x_host), device)

    def f(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(jnp.sin(y)) + aux.load_balancing_loss + 0.1 * aux.router_z_loss, (y, aux)

    ref = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(state, x)
    got_leaves, ref_leaves = jax.tree.leaves(got), jax.tree.leaves(ref)
    if len(got_leaves) != len(ref_leaves):
        return {"ok": False, "why": f"{len(got_leaves)} results vs {len(ref_leaves)}"}
    errors = []
    for a, b in zip(got_leaves, ref_leaves, strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            return {"ok": False, "why": f"shape {a.shape} vs {b.shape}"}
        errors.append(float(np.max(np.abs(a - b))) if a.size else 0.0)
    (_, (_, aux)), _ = got
    return {
        "ok": max(errors) < 1e-5,
        "compared": len(errors),
        "max_error": max(errors),
        "dropped": float(aux.dropped),
    }


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
