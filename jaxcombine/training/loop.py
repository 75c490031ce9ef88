"""The training loop every job shares: a jitted step on a device mesh, exact resume.

The job supplies a pure loss ``loss_fn(params, batch, key, constants) -> (loss,
metrics)`` over the trainable parameters (an ``nnx.State`` of ``nnx.Param``;
``constants`` are arrays the step reads but never trains or saves, such as a
distillation's teachers), the initial
parameters, an optax optimiser and ``batch_at(step)``, the rows this process
holds of the global batch at ``step`` (a pure function of the step, so a
resumed job reads exactly the batches it would have read). :func:`train`
then

1. checks the job against the workdir's record (:func:`jaxcombine.checkpoint.check_job`);
2. places the parameters on the mesh by their logical axes and builds the
   optimiser state there;
3. restores the latest checkpoint if there is one (the train state is
   ``{"step", "params", "opt_state"}``; nothing else, so teachers and data
   never enter a checkpoint);
4. runs the jitted step ``state, batch, key -> state, metrics`` (state
   donated; the batch sharded over the mesh's ``data`` and ``expert`` axes,
   assembled from every process's rows; the loss a mean over the global batch,
   so the trajectory does not depend on how many processes feed it);
5. appends metrics to ``WORKDIR/metrics.jsonl`` every ``log_every`` steps,
   shows a progress bar with tokens/s on process 0, and saves a checkpoint
   every ``checkpoint_every`` steps and at the end (Orbax, async).

The step's key is ``fold_in(key(seed), step)``: resumed or not, step t sees
the same key, the same batch and the same state, so a resumed run ends with
bitwise the parameters of an uninterrupted one.

See :func:`train` for a run that resumes, checked against numpy.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxcombine.checkpoint import abstract_like, check_job, checkpoint_manager, restore_latest
from jaxcombine.data import global_batch_array
from jaxcombine.errors import ConfigError
from jaxcombine.sharding import DEFAULT_RULES, Rules, state_shardings

METRICS_FILE = "metrics.jsonl"
LossFn = Callable[[Any, Any, jax.Array, Any], tuple[jax.Array, Mapping[str, jax.Array]]]


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a global batch is split over: ``data`` and ``expert``
    (expert parallelism reuses the data devices for tokens, as in GShard,
    Lepikhin et al. 2020, arXiv:2006.16668).

    >>> from jax.sharding import AbstractMesh
    >>> batch_axes(AbstractMesh((2, 2, 2), ("data", "expert", "model")))
    ('data', 'expert')
    """
    return tuple(a for a in ("data", "expert") if a in mesh.shape)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over :func:`batch_axes`, everything else replicated.

    >>> import jax, numpy as np
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2),
    ...                          ("data", "expert", "model"))
    >>> batch_sharding(mesh).spec                  # a [B, ...] batch: B / 4 rows per device
    P(('data', 'expert'),)
    """
    return NamedSharding(mesh, P(batch_axes(mesh)))


def check_global_batch(global_batch: int, mesh: Mesh) -> None:
    """A :class:`ConfigError` unless ``global_batch`` splits evenly over the batch
    devices of ``mesh`` and over the processes.

    >>> from jax.sharding import AbstractMesh
    >>> check_global_batch(8, AbstractMesh((4, 2), ("data", "model")))    # 2 rows per device
    >>> check_global_batch(6, AbstractMesh((4, 2), ("data", "model")))
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: train.global_batch: global batch 6 is not divisible by the 4
    data-parallel devices (mesh {'data': 4, 'model': 2})
      How to fix: use a global batch that is a positive multiple of 4
    """
    devices = int(np.prod([mesh.shape[a] for a in batch_axes(mesh)]))
    for count, what in ((devices, "data-parallel devices"), (jax.process_count(), "processes")):
        if global_batch < 1 or global_batch % count:
            raise ConfigError(
                f"global batch {global_batch} is not divisible by the {count} {what} "
                f"(mesh {dict(mesh.shape)})",
                where="train.global_batch",
                fix=f"use a global batch that is a positive multiple of {count}",
            )


def place(tree: Any, shardings: Any) -> Any:
    """Host values (equal on every process) onto the mesh: each device gets its shard.

    >>> import jax, numpy as np
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    >>> x = place({"w": np.arange(6.0).reshape(2, 3)}, {"w": NamedSharding(mesh, P("data"))})
    >>> [shard.data.tolist() for shard in x["w"].addressable_shards]
    [[[0.0, 1.0, 2.0]], [[3.0, 4.0, 5.0]]]
    """

    def put(x, sharding):
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree, shardings)


def param_shardings(params: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Any:
    """A NamedSharding per parameter of an ``nnx.State``, from its logical axes
    (:func:`jaxcombine.sharding.state_shardings`), in the structure of ``params``.

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from flax import nnx
    >>> class Up(nnx.Module):
    ...     def __init__(self):
    ...         self.w = nnx.Param(jnp.ones((4, 8)), out_sharding=("embed", "mlp"),
    ...                            eager_sharding=False)
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))
    >>> param_shardings(nnx.state(Up(), nnx.Param), mesh)["w"].spec
    P(None, 'model')

    References: Xu et al. 2021, GSPMD: General and Scalable Parallelization for ML Computation
    Graphs, arXiv:2105.04663.
    """
    flat = state_shardings(params, mesh, rules)
    paths = [path for path, _ in nnx.to_flat_state(params)]
    return jax.tree.unflatten(jax.tree.structure(params), [flat[path] for path in paths])


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, compute_dtype=None):
    """``step(state, batch, key, constants) -> (state, metrics)``: gradient of ``loss_fn`` at the
    parameters (cast to ``compute_dtype`` for the forward if given: fp32 master
    weights, bf16 compute), the optimiser update, and metrics (``loss``,
    ``grad_norm``, the job's own).

        (loss, aux), g = value_and_grad(loss_fn)(cast(p), batch, key, constants)
        updates, opt_state = optimizer.update(g, opt_state, p);  p = p + updates

    >>> import jax.numpy as jnp, optax
    >>> loss_fn = lambda p, batch, key, constants: (jnp.sum((p["w"] - batch) ** 2), {})
    >>> opt = optax.sgd(0.25)
    >>> params = {"w": jnp.array([1.0, 2.0])}
    >>> state = {"step": 0, "params": params, "opt_state": opt.init(params)}
    >>> step = make_train_step(loss_fn, opt)
    >>> state, metrics = step(state, jnp.array([0.0, 4.0]), None, None)
    >>> state["step"], state["params"]["w"].tolist()     # w - 0.25 * 2 (w - batch)
    (1, [0.5, 3.0])
    >>> float(metrics["loss"]), float(metrics["grad_norm"])   # 1 + 4, |(2, -4)|
    (5.0, 4.4721)

    References: ``compute_dtype`` (fp32 master weights, low-precision compute): Micikevicius et al.
    2018, Mixed Precision Training, arXiv:1710.03740.
    """

    def compute_loss(params, batch, key, constants):
        if compute_dtype is not None:
            params = jax.tree.map(lambda p: p.astype(compute_dtype), params)
        return loss_fn(params, batch, key, constants)

    def step(state, batch, key, constants):
        (loss, metrics), grads = jax.value_and_grad(compute_loss, has_aux=True)(
            state["params"], batch, key, constants
        )
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}
        metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return step


def train(
    loss_fn: LossFn,
    params: Any,
    optimizer: optax.GradientTransformation,
    batch_at: Callable[[int], Any],
    *,
    mesh: Mesh,
    workdir: str | os.PathLike,
    job: Mapping,
    steps: int,
    global_batch: int,
    seed: int = 0,
    constants: Any = None,
    rules: Rules = DEFAULT_RULES,
    compute_dtype=None,
    log_every: int = 10,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 3,
    async_checkpoints: bool = True,
    tokens_per_row: int = 1,
    progress: bool = True,
) -> Any:
    """Train ``params`` for ``steps`` steps (resuming from ``workdir``); returns the
    final parameters (the steps are listed in the module docstring).

    ``batch_at(step)`` returns this process's ``global_batch // process_count``
    rows; ``tokens_per_row`` only scales the tokens/s shown and logged.

    Least squares by gradient descent on 2 devices, checked against the update
    w <- w - lr * 2 X^T (X w - y) / N written out in numpy; then resumed from
    its checkpoint at step 3 up to step 5:

    >>> import shutil, tempfile, jax, jax.numpy as jnp, numpy as np, optax
    >>> from flax import nnx
    >>> from jaxcombine.training import read_metrics, train
    >>> class Linear(nnx.Module):
    ...     def __init__(self):
    ...         self.w = nnx.Param(jnp.zeros(2))
    >>> x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 1.0]], np.float32)
    >>> y = x @ np.array([1.0, -2.0], np.float32)
    >>> def loss_fn(params, batch, key, constants):
    ...     return jnp.mean((batch["x"] @ params["w"][...] - batch["y"]) ** 2), {}
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    >>> workdir = tempfile.mkdtemp()
    >>> run = lambda steps: train(
    ...     loss_fn, nnx.state(Linear(), nnx.Param), optax.sgd(0.1), lambda step: {"x": x, "y": y},
    ...     mesh=mesh, workdir=workdir, job={"kind": "least squares"}, steps=steps,
    ...     global_batch=4, log_every=1, progress=False)
    >>> w = np.zeros(2)
    >>> for _ in range(3):
    ...     w -= 0.1 * 2 * x.T @ (x @ w - y) / len(y)
    >>> bool(np.allclose(run(3)["w"][...], w))
    True
    >>> for _ in range(2):
    ...     w -= 0.1 * 2 * x.T @ (x @ w - y) / len(y)
    >>> bool(np.allclose(run(5)["w"][...], w))              # resumes at step 3
    True
    >>> [r["step"] for r in read_metrics(workdir)], round(read_metrics(workdir)[0]["loss"], 4)
    ([1, 2, 3, 4, 5], 1.5)
    >>> shutil.rmtree(workdir)

    (The first loss is mean(y^2) = (1 + 4 + 1 + 0) / 4 = 1.5.)
    """
    check_global_batch(global_batch, mesh)
    if log_every < 1 or checkpoint_every < 1:
        raise ConfigError(
            f"log_every and checkpoint_every must be positive, got {log_every}, {checkpoint_every}",
            where="log_every",
        )
    workdir = Path(workdir)
    check_job(workdir, job)
    manager = checkpoint_manager(workdir, keep=keep_checkpoints, async_save=async_checkpoints)

    shardings = param_shardings(params, mesh, rules)
    state = _initial_state(params, shardings, optimizer, mesh)
    restored = restore_latest(manager, abstract_like(state))
    start = 0
    if restored is not None:
        start, state = restored
    _truncate_metrics(workdir / METRICS_FILE, start)

    rows = batch_sharding(mesh)
    state_sharding = _shardings_of(state)
    replicated = NamedSharding(mesh, P())
    constants = _on_mesh(constants, mesh)
    step_fn = jax.jit(
        make_train_step(loss_fn, optimizer, compute_dtype),
        in_shardings=(state_sharding, rows, replicated, _shardings_of(constants)),
        out_shardings=(state_sharding, replicated),
        donate_argnums=0,
    )
    base_key = jax.random.key(seed)
    main = jax.process_index() == 0
    bar = tqdm(total=steps, initial=start, disable=not (progress and main), unit="step")
    last_time, last_step = time.perf_counter(), start
    try:
        for step in range(start, steps):
            batch = _global_batch(batch_at(step), rows)
            key = jax.random.fold_in(base_key, step)
            state, metrics = step_fn(state, batch, key, constants)
            done = step + 1
            if done % log_every == 0 or done == steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                rate = (done - last_step) * global_batch * tokens_per_row / (now - last_time)
                last_time, last_step = now, done
                if main:
                    _append_metrics(
                        workdir / METRICS_FILE, {"step": done, **values, "tokens_per_s": rate}
                    )
                bar.set_postfix(loss=f"{values['loss']:.4f}", tok_s=f"{rate:.0f}")
            bar.update(1)
            if done % checkpoint_every == 0 or done == steps:
                manager.save(done, args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    finally:
        bar.close()
        manager.close()
    return state["params"]


def _initial_state(params, shardings, optimizer, mesh):
    """``{"step", "params", "opt_state"}`` on the mesh (the optimiser state built by
    a jitted init, so its moments inherit the parameters' shardings)."""
    params = place(params, shardings)
    replicated = NamedSharding(mesh, P())
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        jax.eval_shape(optimizer.init, params),
        shardings,
        transform_non_params=lambda _: replicated,
    )
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    step = place(np.zeros((), np.int32), replicated)
    return {"step": step, "params": params, "opt_state": opt_state}


def _on_mesh(tree: Any, mesh: Mesh) -> Any:
    """Arrays already placed on ``mesh`` as they are; anything else (host arrays, an
    array on one device) replicated on it with :func:`place`."""
    replicated = NamedSharding(mesh, P())

    def put(x):
        sharding = getattr(x, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh == mesh:
            return x
        return place(x, replicated)

    return jax.tree.map(put, tree)


def _shardings_of(tree: Any) -> Any:
    """The shardings of arrays already placed on the mesh (see :func:`place`)."""
    return jax.tree.map(lambda x: x.sharding, tree)


def _global_batch(local, sharding: NamedSharding):
    """This process's rows of every batch array -> global arrays sharded by rows."""
    return jax.tree.map(lambda x: global_batch_array(x, sharding), local)


def _append_metrics(path: Path, record: Mapping) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records after ``step`` (and a line cut short by a kill): a resumed run
    logs them again."""
    if jax.process_index() != 0 or not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("".join(f"{line}\n" for line in kept))
    tmp.replace(path)


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
    """The records of ``WORKDIR/metrics.jsonl``, in order: ``{"step", "loss",
    "grad_norm", ..., "tokens_per_s"}`` (see the module example); ``[]`` if none.

    >>> read_metrics("no/such/workdir")
    []
    """
    path = Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
