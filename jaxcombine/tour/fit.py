"""Train several small models at once, in memory: the tour's trainer.

Members share one architecture and differ in their initial parameters, their
data order (``seeds``) and, for bagging, their bootstrap resamples. Their
parameters are stacked on a leading axis, the training step of
:func:`jaxcombine.training.make_train_step` is vmapped over that axis and
``lax.scan``-ed over ``chunk`` steps, so N members cost one compiled program
and one dispatch per chunk. Member ``m`` at step ``t`` sees exactly the batch
``data.batch(t, batch_size, seeds[m], bootstrap=...)`` (``data[m].batch(...)``
when each member has its own dataset, as fine-tunes on different tasks do)
and the key ``fold_in(key(seeds[m]), t)`` -- what
:func:`jaxcombine.training.train` would give a job with that seed, without
checkpoints or a mesh.

Example::

    graphdef, stacked_params = init_members(config, seeds=[0, 1, 2, 3])
    result = fit(stacked_params, lm_loss(graphdef), data, seeds=[0, 1, 2, 3],
                 steps=300, batch_size=32, optimizer=adamw(3e-3, 300))
    members = [nnx.merge(graphdef, p) for p in tree.unstack(result.params)]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from jaxcombine.errors import InputError
from jaxcombine.merging import Averager
from jaxcombine.training import make_train_step


@dataclasses.dataclass
class FitResult:
    """Stacked final parameters [N, ...], training losses [N, steps], the stacked
    parameters at each of ``snapshot_steps`` (after that many steps) and, with an
    ``averager``, its average of every step's parameters (stacked, else None)."""

    params: Any
    losses: np.ndarray
    snapshots: dict[int, Any]
    average: Any = None


def fit(
    params: Any,
    loss_fn: Callable,
    data,
    *,
    seeds: Sequence[int],
    steps: int,
    batch_size: int,
    optimizer: optax.GradientTransformation,
    bootstrap: bool = False,
    chunk: int = 25,
    snapshot_steps: Sequence[int] = (),
    constants: Any = None,
    averager: Averager | None = None,
    desc: str | None = None,
) -> FitResult:
    """Train the members whose parameters are stacked in ``params`` (leading axis N =
    ``len(seeds)``) with ``loss_fn(params, batch, key, constants) -> (loss, metrics)``
    on ``data`` (a :class:`~jaxcombine.data.PackedDataset` or
    :class:`~jaxcombine.data.TableDataset`, or a sequence of them, one per member).
    ``averager`` (e.g. :func:`jaxcombine.merging.ema`) is updated with each
    member's parameters after every step. See the module docstring.

    Two members from w = 0 and w = 1 fit ``y = 2 x`` by least squares:

    >>> import numpy as np, optax
    >>> from jaxcombine.data import TableDataset
    >>> x = np.arange(10, dtype=np.float32)[:, None]
    >>> data = TableDataset(x, 2 * np.arange(10, dtype=np.int32))
    >>> def loss_fn(params, batch, key, constants):
    ...     error = params["w"] * batch["x"][:, 0] - batch["y"]
    ...     return (error**2).mean(), {}
    >>> result = fit({"w": np.array([0.0, 1.0])}, loss_fn, data, seeds=[0, 1], steps=100,
    ...              batch_size=4, optimizer=optax.sgd(0.01))
    >>> np.round(result.params["w"], 3).tolist(), result.losses.shape
    ([2.0, 2.0], (2, 100))
    """
    count = len(seeds)
    datasets = list(data) if isinstance(data, (list, tuple)) else [data] * count
    if len(datasets) != count:
        raise InputError(
            f"{len(datasets)} datasets for {count} members",
            where="fit(data, seeds)",
            fix="give one dataset per member, or one dataset for all",
        )
    if jax.tree.leaves(params)[0].shape[0] != count:
        raise InputError(
            f"params are stacked for {jax.tree.leaves(params)[0].shape[0]} members, "
            f"seeds for {count}",
            where="fit(params, seeds)",
            fix="give one seed per stacked member",
        )
    step = make_train_step(loss_fn, optimizer)
    members_step = jax.vmap(step, in_axes=(0, 0, 0, None))

    @jax.jit
    def run_chunk(state, batches, steps_, seeds_, constants):
        def body(state, inputs):
            batch, t = inputs
            keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), t))(seeds_)
            state, average = state
            state, metrics = members_step(state, batch, keys, constants)
            if averager is not None:
                average = jax.vmap(averager.update)(average, state["params"])
            return (state, average), metrics["loss"]

        return jax.lax.scan(body, state, (batches, steps_))

    state = {
        "step": jnp.zeros((count,), jnp.int32),
        "params": params,
        "opt_state": jax.vmap(optimizer.init)(params),
    }
    average = None if averager is None else jax.vmap(averager.init)(params)
    seeds_array = jnp.asarray(seeds, jnp.uint32)
    losses, snapshots = [], {}
    wanted = sorted(set(snapshot_steps))
    bar = tqdm(total=steps, desc=desc, leave=False, disable=desc is None, unit="step")
    done = 0
    while done < steps:
        stop = min(done + chunk, steps, *[s for s in wanted if s > done] or [steps])
        span = range(done, stop)
        members = list(zip(datasets, seeds, strict=True))
        batches = [[d.batch(t, batch_size, seed, bootstrap=bootstrap) for d, seed in members]
                   for t in span]  # fmt: skip
        batches = stack_on_host([stack_on_host(members) for members in batches])
        span_array = jnp.asarray(np.arange(done, stop), jnp.uint32)
        (state, average), chunk_losses = run_chunk(
            (state, average), batches, span_array, seeds_array, constants
        )
        losses.append(np.asarray(chunk_losses))
        done = stop
        if done in wanted:
            snapshots[done] = jax.tree.map(jnp.copy, state["params"])
        bar.update(len(span))
    bar.close()
    if averager is not None:
        average = jax.vmap(averager.value)(average)
    return FitResult(state["params"], np.concatenate(losses).T, snapshots, average)


def stack_on_host(items: Sequence[Any]) -> Any:
    """Pytrees (batches, parameters) stacked on a new leading axis on the host (numpy):
    no device copies, and no eager device op compiled per leaf shape."""
    return jax.tree.map(lambda *xs: np.stack(xs), *items)
