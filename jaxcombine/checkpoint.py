"""Training checkpoints: Orbax's ``CheckpointManager`` plus a record of the job.

A training workdir holds

    WORKDIR/job.json          what the job is (model, data, optimiser, ...)
    WORKDIR/checkpoints/N/    Orbax checkpoints of the train state at step N

``job.json`` is written when a job first starts in the workdir; a job that
starts again there is compared with it before any checkpoint is read, so a
changed model shape, another job's workdir or a different optimiser fail
with an error naming every difference instead of a shape error deep inside
Orbax (or, worse, a silent restart). Keys that may change between runs (logging
and checkpoint intervals, say) are simply left out of
the description by the caller.

Checkpoints are Orbax's: written asynchronously, each step directory
appearing only when complete (a job killed while saving leaves only a
temporary directory, removed on the next start), the last ``keep`` kept, and
sharded arrays written by every process and restorable on any number of
processes (the target's shardings decide the layout).

>>> import shutil, tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
>>> from jaxcombine.checkpoint import abstract_like, check_job, checkpoint_manager, restore_latest
>>> workdir = tempfile.mkdtemp()
>>> state = {"step": jnp.array(0), "params": {"w": jnp.zeros(3)}}
>>> check_job(workdir, {"kind": "lm", "model": {"hidden_size": 64}})
>>> manager = checkpoint_manager(workdir, keep=3)
>>> print(restore_latest(manager, abstract_like(state)))      # a fresh start
None
>>> state = {"step": jnp.array(7), "params": {"w": jnp.array([1.0, 2.0, 3.0])}}
>>> manager.save(7, args=ocp.args.StandardSave(state))
True
>>> manager.wait_until_finished()
>>> step, restored = restore_latest(manager, abstract_like(state))
>>> step, restored["params"]["w"].tolist()
(7, [1.0, 2.0, 3.0])
>>> manager.close(); shutil.rmtree(workdir)
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcombine.errors import CheckpointError
from jaxcombine.tree import path_string

JOB_FILE = "job.json"


class JobMismatchError(CheckpointError):
    """A workdir's checkpoints belong to a different job or configuration."""


def job_differences(saved: Any, current: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON-like job descriptions,
    one per differing key (``model.hidden_size: 64 in the workdir, 128 now``).

    Tuples and lists compare equal (as they read back from JSON).

    >>> job_differences({"model": {"dim": 64}, "lr": 1e-3, "shape": [2, 3]},
    ...                 {"model": {"dim": 128}, "shape": (2, 3), "seed": 0})
    ['lr: 0.001 in the workdir, absent now', 'model.dim: 64 in the workdir, 128 now',
     'seed: absent in the workdir, 0 now']
    """
    if isinstance(saved, Mapping) and isinstance(current, Mapping):
        out = []
        for key in sorted(set(saved) | set(current), key=str):
            path = f"{where}.{key}" if where else str(key)
            if key not in current:
                out.append(f"{path}: {saved[key]!r} in the workdir, absent now")
            elif key not in saved:
                out.append(f"{path}: absent in the workdir, {current[key]!r} now")
            else:
                out.extend(job_differences(saved[key], current[key], path))
        return out
    if _jsonable(saved) != _jsonable(current):
        return [f"{where or 'job'}: {saved!r} in the workdir, {current!r} now"]
    return []


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def check_job(workdir: str | os.PathLike, job: Mapping) -> None:
    """Record ``job`` in ``workdir/job.json``, or check it against the record.

    Raises :class:`JobMismatchError` naming every difference when the workdir
    holds another job's record. Process 0 writes (via a temporary name); every
    process checks.

    >>> import shutil, tempfile
    >>> workdir = tempfile.mkdtemp()
    >>> check_job(workdir, {"kind": "lm", "layers": 2})      # records it
    >>> check_job(workdir, {"kind": "lm", "layers": 2})      # the same job: fine
    >>> check_job(workdir, {"kind": "moe", "layers": 2})
    Traceback (most recent call last):
    ...
    jaxcombine.checkpoint.JobMismatchError: .../job.json: the workdir holds checkpoints of a
    different job:
        kind: 'lm' in the workdir, 'moe' now
      How to fix: use a fresh workdir, or run with the configuration recorded there
    >>> shutil.rmtree(workdir)
    """
    path = Path(workdir) / JOB_FILE
    current = _jsonable(dict(job))
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"unreadable job record ({e})",
                where=str(path),
                fix="use a fresh workdir, or delete the workdir to start over",
            ) from e
        differences = job_differences(saved, current)
        if differences:
            raise JobMismatchError(
                "the workdir holds checkpoints of a different job:\n    "
                + "\n    ".join(differences),
                where=str(path),
                fix="use a fresh workdir, or run with the configuration recorded there",
            )
        return
    if jax.process_index() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{JOB_FILE}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        tmp.replace(path)


def checkpoint_manager(
    workdir: str | os.PathLike, *, keep: int = 3, async_save: bool = True
) -> ocp.CheckpointManager:
    """An Orbax manager of ``workdir/checkpoints`` keeping the last ``keep``
    checkpoints, saving asynchronously, removing half-written ones.

    See the module docstring for a save and restore.

    >>> checkpoint_manager("unused", keep=0)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.CheckpointError: keep_checkpoints: keep must be at least 1, got 0
      How to fix: keep at least the last checkpoint
    """
    if keep < 1:
        raise CheckpointError(
            f"keep must be at least 1, got {keep}",
            where="keep_checkpoints",
            fix="keep at least the last checkpoint",
        )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True,
    )
    return ocp.CheckpointManager(
        Path(workdir).absolute() / "checkpoints",
        options=options,
        item_handlers=ocp.StandardCheckpointHandler(),
    )


def abstract_like(state: Any) -> Any:
    """Shapes, dtypes and shardings of ``state``'s arrays: Orbax's restore target.

    >>> import jax.numpy as jnp
    >>> abstract_like({"w": jnp.zeros((2, 3), jnp.bfloat16)})["w"]
    ShapeDtypeStruct(shape=(2, 3), dtype=bfloat16, sharding=...)
    """
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state
    )


def restore_latest(manager: ocp.CheckpointManager, target: Any) -> tuple[int, Any] | None:
    """``(step, state)`` of the latest checkpoint restored onto ``target``'s
    shapes and shardings (:func:`abstract_like`), or None when there is none.

    Every array's shape and dtype is checked against the checkpoint's metadata
    first; a difference is a :class:`JobMismatchError` naming the array.

    >>> import shutil, tempfile, jax.numpy as jnp, orbax.checkpoint as ocp
    >>> workdir = tempfile.mkdtemp()
    >>> manager = checkpoint_manager(workdir, async_save=False)
    >>> manager.save(1, args=ocp.args.StandardSave({"w": jnp.zeros(4)}))
    True
    >>> restore_latest(manager, abstract_like({"w": jnp.zeros(5)}))     # model grew
    Traceback (most recent call last):
    ...
    jaxcombine.checkpoint.JobMismatchError: .../checkpoints/1: array w is float32[4] in the
    checkpoint, float32[5] now
      How to fix: resume with the configuration (model shape) the checkpoint was written with
    >>> manager.close(); shutil.rmtree(workdir)
    """
    step = manager.latest_step()
    if step is None:
        return None
    _check_shapes(manager, step, target)
    state = manager.restore(step, args=ocp.args.StandardRestore(target))
    return step, state


def _check_shapes(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
    where = str(manager.directory / str(step))
    saved = {
        _dotted(path): meta
        for path, meta in jax.tree.leaves_with_path(manager.item_metadata(step), is_leaf=_has_shape)
    }
    wanted = {_dotted(path): leaf for path, leaf in jax.tree.leaves_with_path(target)}
    fix = "resume with the configuration (model shape) the checkpoint was written with"
    for name, leaf in wanted.items():
        meta = saved.get(name)
        if meta is None:
            raise JobMismatchError(f"array {name} is not in the checkpoint", where=where, fix=fix)
        if tuple(meta.shape) != tuple(leaf.shape) or np.dtype(meta.dtype) != np.dtype(leaf.dtype):
            raise JobMismatchError(
                f"array {name} is {np.dtype(meta.dtype)}{list(meta.shape)} in the checkpoint, "
                f"{np.dtype(leaf.dtype)}{list(leaf.shape)} now",
                where=where,
                fix=fix,
            )
    extra = sorted(set(saved) - set(wanted))
    if extra:
        raise JobMismatchError(
            f"the checkpoint has arrays the job does not: {extra[:5]}", where=where, fix=fix
        )


def _dotted(path) -> str:
    """A key path as Orbax names arrays (``opt_state.1.0.count``), without the
    ``.value`` of NNX variables."""
    name = path_string(path, sep=".")
    return name.removesuffix(".value")


def _has_shape(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")
