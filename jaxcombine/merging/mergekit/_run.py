"""Run a merge plan: stream one output tensor at a time from memory-mapped inputs to disk.

For each planned tensor, in order: read its inputs (one ``pread`` each into an
aligned buffer that XLA's CPU client uses in place; re-indexed onto the output
vocabulary where needed; checked finite with numpy on the host), then one
jitted call casts them to ``dtype``, merges them with the method's leaf
function and casts the result to the output dtype; the result's bytes go to
their place in the output shard. Reading ahead, computing and writing overlap (a reader thread at
most ``_READ_AHEAD_BYTES`` ahead, a writer thread behind), and only a few
tensors are alive at once, so peak memory does not grow with the model.

The output directory is built under a temporary name and renamed when
complete: a killed merge leaves no ``OUT_DIR``.
"""

from __future__ import annotations

import shutil
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import TensorError
from jaxcombine.hf._safetensors import SIDECAR_FILES, ShardWriter, parse_size
from jaxcombine.merging._engine import _tensor_key, merge_leaf_cast
from jaxcombine.merging.mergekit._chat import resolve_chat_template, write_chat_template
from jaxcombine.merging.mergekit._plan import MergePlan, PlannedTensor
from jaxcombine.merging.mergekit._vocab import write_tokenizer

_READ_AHEAD_BYTES = 128 << 20  # input bytes read ahead of the tensor being merged (>= 1 tensor)
_WRITE_BEHIND = 2


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


class _Reader:
    """Reads one planned tensor's inputs: cast, vocabulary-aligned, checked."""

    def __init__(self, plan: MergePlan):
        self.plan = plan

    def __call__(self, planned: PlannedTensor):
        config = self.plan.config
        arrays = {}
        for inp in planned.inputs:
            x = self.plan.models[inp.model].checkpoint.read(inp.tensor)
            if planned.vocab and config.dtype is not None and _is_float(x.dtype):
                x = x.astype(config.dtype)  # the fill rules average rows in this dtype
            arrays[inp] = x
        if planned.vocab:
            aligned = self.plan.vocab.align({i.model: a for i, a in arrays.items()})
            arrays = {i: aligned[i.model] for i in arrays}
        values = list(arrays.values())
        if _is_float(values[0].dtype):
            for inp, x in arrays.items():
                if not np.isfinite(x).all():
                    raise TensorError(
                        "tensor holds NaN or Inf",
                        where=f"{self.plan.models[inp.model].path}: {inp.tensor}",
                        fix="merge finite checkpoints (check the run that wrote them)",
                    )
        else:
            for inp, x in arrays.items():
                if not np.array_equal(x, values[0]):
                    raise TensorError(
                        "integer tensor differs between models; integer tensors cannot be averaged",
                        where=f"{self.plan.models[inp.model].path}: {inp.tensor}",
                        fix="make the integer tensors equal",
                    )
        base = arrays[planned.base] if planned.base is not None else None
        return base, [arrays[i] for i in planned.models]


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


def _input_bytes(planned: PlannedTensor) -> int:
    return planned.nbytes * len(planned.inputs)


def _stream(plan: MergePlan, writer: ShardWriter, key, progress: bool, place: _Placement):
    tensors = plan.tensors
    read = _Reader(plan)
    bar = tqdm(
        total=plan.total_bytes,
        unit="B",
        unit_scale=True,
        desc="merging",
        disable=not progress,
        dynamic_ncols=True,
    )

    done = [0]

    def finish(planned: PlannedTensor, out):
        writer.write(planned.name, np.asarray(out))
        done[0] += 1
        bar.set_postfix_str(f"{done[0]}/{len(tensors)} tensors", refresh=False)
        bar.update(planned.nbytes)

    dtype = plan.config.dtype
    with ThreadPoolExecutor(1) as reader, ThreadPoolExecutor(1) as writing:
        reads, ahead = deque(), 0
        writes = deque()
        for i, planned in enumerate(tensors):
            while ahead < len(tensors) and (
                ahead <= i
                or sum(_input_bytes(tensors[j]) for j in range(i, ahead)) < _READ_AHEAD_BYTES
            ):
                reads.append(reader.submit(read, tensors[ahead]))
                ahead += 1
            base, models = reads.popleft().result()
            inputs = place(([base] if base is not None else []) + models, planned.nbytes)
            if base is not None:
                base, models = inputs[0], inputs[1:]
            else:
                models = inputs
            tensor_key = _tensor_key(key, planned.name) if plan.method.random else None
            out = merge_leaf_cast(
                plan.method, base, models, planned.values, key=tensor_key,
                dtype=dtype if _is_float(inputs[0].dtype) else None, out_dtype=planned.dtype,
            )  # fmt: skip
            writes.append(writing.submit(finish, planned, out))
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
    on CPU).
    """
    start = time.perf_counter()
    max_bytes = parse_size(out_shard_size)
    try:
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            entries = [(t.name, t.shape, t.dtype) for t in plan.tensors]
            with ShardWriter(tmp, entries, max_shard_bytes=max_bytes) as writer:
                place = _Placement(shard_threshold)
                _stream(plan, writer, jax.random.key(seed), progress, place)
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
