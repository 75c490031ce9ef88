"""One process of tests/test_distributed.py, started by ``jaxcombine.distributed.launch``
(not a test module).

    python tests/_distributed_worker.py OUT_DIR

Initialises twice (the second call must be a no-op), builds ``make_mesh()``
over every process's devices, places rows ``4 * p ... 4 * p + 3`` of a global
(8, 3) array from process ``p``'s local data, and computes a psum under
``shard_map`` and a jitted global mean. Writes OUT_DIR/process_P.json via a
temporary name.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcombine import distributed


def global_data() -> np.ndarray:
    """The (8, 3) array the processes hold between them (the test recomputes it)."""
    return (np.arange(24, dtype=np.float32).reshape(8, 3) - 5.0) ** 2 / 7.0


def main(out_dir: str) -> None:
    distributed.initialize()
    distributed.initialize()  # idempotent
    index, count = distributed.process_info()
    mesh = distributed.make_mesh()
    rows = len(jax.local_devices())
    local = global_data()[index * rows : (index + 1) * rows]
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)

    summed = jax.jit(
        jax.shard_map(
            lambda block: jax.lax.psum(jnp.sum(block, axis=0), "data"),
            mesh=mesh,
            in_specs=P("data"),
            out_specs=P(),
        )
    )(x)
    mean = jax.jit(lambda a: jnp.mean(a, axis=0), out_shardings=NamedSharding(mesh, P()))(x)
    result = {
        "process_info": [index, count],
        "is_main": distributed.is_main_process(),
        "device_count": jax.device_count(),
        "local_device_count": rows,
        "collectives": jax.config.jax_cpu_collectives_implementation,
        "mesh_shape": dict(mesh.shape),
        "mesh_axes": list(mesh.axis_names),
        "mesh_processes": [d.process_index for d in mesh.devices.flat],
        "global_shape": list(x.shape),
        "fully_addressable": x.is_fully_addressable,
        "psum": np.asarray(summed).tolist(),
        "mean": np.asarray(mean).tolist(),
    }
    path = os.path.join(out_dir, f"process_{index}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    main(sys.argv[1])
