"""Run a merge plan: stream the output to disk one unit at a time.

A unit is one output tensor, or for elementwise methods one flat chunk of it
(:func:`_units`). For each unit, in order: read its inputs (one ``pread`` each
into a reused aligned buffer that XLA's CPU client uses in place; re-indexed
onto the output vocabulary where needed; checked finite with numpy on the
host), then one jitted call casts them to ``dtype``, merges them with the
method's leaf function and casts the result to the output dtype; the result's
bytes go to their place in the output shard. Reading ahead, computing and
writing overlap (reader threads at most ``_READ_AHEAD_BYTES`` ahead, a writer
thread behind), and only a few units are alive at once, so peak memory does
not grow with the model.

The output directory is built under a temporary name and renamed when
complete: a killed merge leaves no ``OUT_DIR``.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import TensorError
from jaxcombine.hf._safetensors import SIDECAR_FILES, ShardWriter, aligned_empty, parse_size
from jaxcombine.merging._engine import _tensor_key, merge_leaf
from jaxcombine.merging.mergekit._chat import resolve_chat_template, write_chat_template
from jaxcombine.merging.mergekit._plan import MergePlan, PlannedTensor
from jaxcombine.merging.mergekit._vocab import write_tokenizer

_READ_AHEAD_BYTES = 128 << 20  # input bytes read ahead of the unit being merged (>= 1 unit)
_WRITE_BEHIND = 4  # units whose output is being written while the next are merged
_CHUNK = 1 << 20  # elements per chunk for elementwise methods (4 MiB of float32)
_SMALL_CHUNK = 1 << 16  # the chunk of tensors below it (norms, biases): two compiled shapes


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


class _Buffers:
    """Aligned input buffers, reused across tensors of the same shape and dtype.

    Fresh memory costs a page fault per page on first touch (on some virtual
    machines several microseconds each); a merge reads the same few shapes
    over and over, so a buffer goes back here once its tensor is written.
    """

    def __init__(self):
        self._free: dict[tuple, list[np.ndarray]] = {}
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        with self._lock:
            free = self._free.get((shape, np.dtype(dtype)))
            if free:
                return free.pop()
        return aligned_empty(shape, dtype)

    def give(self, arrays) -> None:
        with self._lock:
            for x in arrays:
                self._free.setdefault((x.shape, x.dtype), []).append(x)


class _Reader:
    """Reads one planned tensor's inputs: checked, cast, vocabulary-aligned.

    Returns ``(base, models, buffers)``, ``buffers`` to hand back to
    :class:`_Buffers` once the merged tensor is written.
    """

    def __init__(self, plan: MergePlan, buffers: _Buffers):
        self.plan = plan
        self.buffers = buffers

    def __call__(self, unit: _Unit):
        planned, config = unit.planned, self.plan.config
        arrays, buffers = {}, []
        for inp in planned.inputs:
            checkpoint = self.plan.models[inp.model].checkpoint
            info = checkpoint.infos[inp.tensor]
            if unit.count is None:
                x = checkpoint.read(inp.tensor, out=self.buffers.take(info.shape, info.dtype))
                buffers.append(x)
            else:  # one flat chunk, in a buffer of the full chunk size (the tail zeroed)
                buffer = self.buffers.take((unit.size,), info.dtype)
                buffers.append(buffer)
                x = checkpoint.read(
                    inp.tensor, out=buffer[: unit.count], start=unit.start, count=unit.count
                )
                buffer[unit.count :] = 0
            where = f"{self.plan.models[inp.model].path}: {inp.tensor}"
            if _is_float(x.dtype) and not np.isfinite(x).all():
                raise TensorError(
                    "tensor holds NaN or Inf",
                    where=where,
                    fix="merge finite checkpoints (check the run that wrote them)",
                )
            if not _is_float(x.dtype) and arrays and not np.array_equal(x, buffers[0]):
                raise TensorError(
                    "integer tensor differs between models; integer tensors cannot be averaged",
                    where=where,
                    fix="make the integer tensors equal",
                )
            if planned.vocab and config.dtype is not None and _is_float(x.dtype):
                x = x.astype(config.dtype)  # the fill rules average rows in this dtype
            arrays[inp] = x if unit.count is None else buffers[-1]
        if planned.vocab:
            aligned = self.plan.vocab.align({i.model: a for i, a in arrays.items()})
            arrays = {i: aligned[i.model] for i in arrays}
        base = arrays[planned.base] if planned.base is not None else None
        return base, [arrays[i] for i in planned.models], buffers


class _Placement:
    """Shards a tensor's inputs over the local devices when it is too large for one."""

    def __init__(self, threshold: int | None):
        devices = jax.local_devices()
        if threshold is None and devices[0].platform != "cpu":
            stats = devices[0].memory_stats() or {}
            limit = stats.get("bytes_limit")
            threshold = limit // 4 if limit else None
        self.threshold = threshold if len(devices) > 1 else None
        self.mesh = Mesh(np.array(devices), ("devices",))

    def __call__(self, arrays: list, nbytes: int):
        if self.threshold is None or nbytes * len(arrays) <= self.threshold:
            return arrays
        shape = arrays[0].shape
        n = self.mesh.size
        axis = next((a for a, d in enumerate(shape) if d % n == 0), None)
        if axis is None:
            return arrays
        spec = [None] * len(shape)
        spec[axis] = "devices"
        sharding = NamedSharding(self.mesh, PartitionSpec(*spec))
        return [jax.device_put(x, sharding) for x in arrays]


@dataclass(frozen=True)
class _Unit:
    """A piece of work: a whole tensor, or ``count`` flat elements from ``start``
    merged as a chunk of ``size`` (the tail chunk zero-padded to it)."""

    planned: PlannedTensor
    start: int = 0
    count: int | None = None
    size: int = 0

    @property
    def last(self) -> bool:
        """The unit that completes its tensor."""
        size = int(np.prod(self.planned.shape, dtype=np.int64))
        return self.count is None or self.start + self.count == size

    @property
    def nbytes(self) -> int:
        """Output bytes of this unit."""
        if self.count is None:
            return self.planned.nbytes
        return self.count * self.planned.dtype.itemsize


def _units(plan: MergePlan, chunk: int, small: int) -> list[_Unit]:
    """Whole tensors, except that float tensors of an elementwise method are cut in
    flat chunks of ``chunk`` elements (``small`` for tensors of at most that
    size): the chunks have two shapes, so two compiled functions merge every
    tensor, and the buffers are reused from chunk to chunk."""
    units = []
    for planned in plan.tensors:
        first = plan.models[planned.inputs[0].model].checkpoint.infos[planned.inputs[0].tensor]
        size = int(np.prod(planned.shape, dtype=np.int64))
        if plan.method.elementwise and not planned.vocab and _is_float(first.dtype) and size:
            step = small if size <= small else chunk
            for start in range(0, size, step):
                units.append(_Unit(planned, start, min(step, size - start), step))
        else:
            units.append(_Unit(planned))
    return units


def _stream(plan: MergePlan, writer: ShardWriter, key, progress: bool, place: _Placement):
    units = _units(plan, _CHUNK, _SMALL_CHUNK)
    buffers = _Buffers()
    read = _Reader(plan, buffers)
    bar = tqdm(
        total=plan.total_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=not progress,
        dynamic_ncols=True,
    )
    done = [0]

    def finish(unit: _Unit, out, used):
        out = np.asarray(out)
        if unit.count is None:
            writer.write(unit.planned.name, out)
        else:
            writer.write(unit.planned.name, out[: unit.count], start=unit.start)
        buffers.give(used)  # the computation that read them is done
        if unit.last:
            done[0] += 1
            bar.set_postfix_str(f"{done[0]}/{len(plan.tensors)} tensors", refresh=False)
        bar.update(unit.nbytes)

    def input_bytes(unit: _Unit) -> int:
        return unit.nbytes * len(unit.planned.inputs)

    dtype = plan.config.dtype
    with ThreadPoolExecutor(2) as reader, ThreadPoolExecutor(1) as writing:
        reads, writes = deque(), deque()
        ahead, ahead_bytes = 0, 0  # units submitted to the readers, their input bytes not merged
        for unit in units:
            while ahead < len(units) and (not reads or ahead_bytes < _READ_AHEAD_BYTES):
                reads.append(reader.submit(read, units[ahead]))
                ahead_bytes += input_bytes(units[ahead])
                ahead += 1
            base, models, used = reads.popleft().result()
            ahead_bytes -= input_bytes(unit)
            planned = unit.planned
            inputs = ([base] if base is not None else []) + models
            if unit.count is None:
                inputs = place(inputs, planned.nbytes)
            if base is not None:
                base, models = inputs[0], inputs[1:]
            else:
                models = inputs
            tensor_key = _tensor_key(key, planned.name) if plan.method.random else None
            out = merge_leaf(
                plan.method, base, models, planned.values, key=tensor_key,
                dtype=dtype if _is_float(inputs[0].dtype) else None, out_dtype=planned.dtype,
            )  # fmt: skip
            writes.append(writing.submit(finish, unit, out, used))
            while len(writes) > _WRITE_BEHIND:
                writes.popleft().result()
        for w in writes:
            w.result()
    bar.close()


def _write_sidecars(plan: MergePlan, out: Path) -> None:
    import json

    (out / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
    donor = plan.models[plan.donor].path
    if plan.vocab is not None:
        write_tokenizer(plan.vocab, out)
        for name in ("generation_config.json",):
            if (donor / name).is_file():
                shutil.copy(donor / name, out / name)
    else:
        for name in SIDECAR_FILES:
            if (donor / name).is_file():
                shutil.copy(donor / name, out / name)
    template = resolve_chat_template(
        plan.config.chat_template, [m.path for m in plan.models.values()]
    )
    if template is not None:
        write_chat_template(template, out)
    text = plan.config.text or yaml.safe_dump({"merge_method": plan.method.name})
    (out / "mergekit_config.yml").write_text(text)
    (out / "README.md").write_text(
        f"---\ntags:\n- merge\n- jaxcombine\n---\n# {out.name}\n\n"
        f"Merged with `jaxcombine merge` ({plan.method.name}) from: "
        + ", ".join(f"`{ref}`" for ref in plan.models)
        + f".\n\n```yaml\n{text.rstrip()}\n```\n"
    )


def run_merge(
    plan: MergePlan,
    out_dir,
    *,
    seed: int = 0,
    out_shard_size: str | int = "5B",
    overwrite: bool = False,
    progress: bool = True,
    shard_threshold: int | None = None,
) -> dict:
    """Execute ``plan`` into ``out_dir``; returns a summary (and closes the plan's files).

    ``seed`` keys the random methods (tensor keys are folded from it by tensor
    name). ``shard_threshold``: bytes above which a tensor's inputs are split
    over the local devices (default: a quarter of an accelerator's memory; never
    on CPU). ``out_shard_size`` bounds each safetensors shard ("5B", "500MB" or
    bytes); ``overwrite`` replaces an existing ``out_dir``.

    A linear merge (weights 1 and 3: (1 * 1 + 3 * 5) / 4 = 4) written in bfloat16:

    >>> import json, pathlib, tempfile
    >>> import numpy as np
    >>> from safetensors.numpy import load_file
    >>> from jaxcombine.hf import write_shards
    >>> from jaxcombine.merging.mergekit import parse_merge_config, plan_merge, run_merge
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = pathlib.Path(tmp.name)
    >>> for name, value in [("model-a", 1.0), ("model-b", 5.0)]:
    ...     (root / name).mkdir()
    ...     _ = (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": 1}))
    ...     tensor = ("model.layers.0.mlp.weight", np.full((2, 2), value, np.float32))
    ...     _ = write_shards([tensor], root / name, max_shard_bytes=1 << 20)
    >>> config = parse_merge_config({"merge_method": "linear", "out_dtype": "bfloat16",
    ...     "models": [{"model": "model-a", "parameters": {"weight": 1.0}},
    ...                {"model": "model-b", "parameters": {"weight": 3.0}}]}, config_dir=root)
    >>> summary = run_merge(plan_merge(config), root / "merged", progress=False)
    >>> summary["tensors"], summary["shards"]
    (1, 1)
    >>> w = load_file(str(root / "merged" / "model.safetensors"))["model.layers.0.mlp.weight"]
    >>> print(w.astype(np.float32), w.dtype)
    [[4. 4.]
     [4. 4.]] bfloat16
    >>> json.loads((root / "merged" / "config.json").read_text())["torch_dtype"]
    'bfloat16'
    >>> tmp.cleanup()

    References: Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models,
    arXiv:2403.13257.
    """
    start = time.perf_counter()
    max_bytes = parse_size(out_shard_size)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            entries = [(t.name, t.shape, t.dtype) for t in plan.tensors]
            with ShardWriter(tmp, entries, max_shard_bytes=max_bytes) as writer:
                place = _Placement(shard_threshold)
                key = jax.random.key(seed) if plan.method.random else None
                _stream(plan, writer, key, progress, place)
                files = writer.finish()
            _write_sidecars(plan, tmp)
    finally:
        plan.close()
    seconds = time.perf_counter() - start
    return {
        "out": str(out_dir),
        "method": plan.method.name,
        "tensors": len(plan.tensors),
        "bytes": plan.total_bytes,
        "shards": len(files),
        "seconds": round(seconds, 3),
        "message": f"merged {len(plan.tensors)} tensors ({plan.total_bytes / 1e9:.3f} GB, "
        f"{len(files)} shard(s)) with {plan.method.name} into {out_dir} in {seconds:.1f} s",
    }
