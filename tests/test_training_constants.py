"""train() accepts constants wherever they live: on the mesh, on one device, on the host."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxcombine.training import place, train


class _Linear(nnx.Module):
    def __init__(self):
        self.w = nnx.Param(jnp.zeros(2))


X = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]], np.float32)


def _loss(params, batch, key, constants):
    # least squares towards targets held in the constants: y = X @ constants["w_true"]
    return jnp.mean((batch @ params["w"][...] - batch @ constants["w_true"]) ** 2), {}


def _train(constants, workdir, mesh):
    return train(_loss, nnx.state(_Linear(), nnx.Param), optax.sgd(0.1), lambda step: X,
                 mesh=mesh, workdir=workdir, job={"kind": "constants"}, steps=3, global_batch=4,
                 constants=constants, progress=False)  # fmt: skip


@pytest.mark.parametrize("where", ["host", "one device", "mesh"])
def test_constants_are_replicated_on_the_mesh(where, tmp_path):
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    w_true = np.array([1.0, -2.0], np.float32)
    constants = {
        "host": {"w_true": w_true},
        "one device": {"w_true": jax.device_put(w_true, jax.devices()[1])},
        "mesh": place({"w_true": w_true}, {"w_true": NamedSharding(mesh, P())}),
    }[where]
    w = np.zeros(2)
    y = X @ w_true
    for _ in range(3):  # gradient descent written out
        w -= 0.1 * 2 * X.T @ (X @ w - y) / len(y)
    np.testing.assert_allclose(_train(constants, tmp_path, mesh)["w"][...], w, rtol=1e-6)
