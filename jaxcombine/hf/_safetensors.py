"""Safetensors checkpoints: index from headers, read one tensor at a time, write shards.

A model directory holds either ``model.safetensors`` or shards listed in
``model.safetensors.index.json``. :class:`SafetensorsCheckpoint` opens every
file, validates the headers (with the ``safetensors`` library) and collects
each tensor's name, shape, dtype and byte range *without reading tensor data*,
so all checks happen before heavy work. A tensor is then read with one
``pread`` into a fresh 64-byte-aligned buffer: no memory map keeps file pages
in the process, and JAX on CPU can use the buffer without copying it. Pickle
checkpoints are refused: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxcombine.errors import CheckpointError, TensorError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# Files copied from a source directory next to the written weights.
SIDECAR_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "generation_config.json",
)

PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth")

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(bool),
}

_CONVERT_HINT = (
    "convert it to safetensors in a trusted environment, e.g. "
    '`python -c "from transformers import AutoModelForCausalLM as M; '
    "M.from_pretrained('IN').save_pretrained('OUT')\"` (transformers writes safetensors)"
)


class TensorInfo(NamedTuple):
    """Where a tensor's data lies, from the file header (:class:`SafetensorsCheckpoint`
    ``.infos``, which has an example).

    >>> TensorInfo._fields
    ('name', 'shape', 'dtype', 'file', 'offset')
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    file: Path
    offset: int = 0  # first byte of the data in ``file``


def require_model_dir(model_dir: str | os.PathLike) -> Path:
    """The path as a directory, or a :class:`CheckpointError` that says how to get one.

    >>> require_model_dir("meta-llama/Llama-3.2-1B")
    Traceback (most recent call last):
    ...
    jaxcombine.errors.CheckpointError: meta-llama/Llama-3.2-1B: model directory does not exist
      How to fix: this looks like a Hugging Face hub id; download it first, ...
    """
    path = Path(model_dir)
    if not path.exists():
        fix = "pass the path of a local model directory"
        if re.fullmatch(r"[\w.-]+/[\w.-]+", str(model_dir)):
            fix = (
                "this looks like a Hugging Face hub id; download it first, e.g. "
                f"`huggingface-cli download {model_dir} --local-dir ./{path.name}`, "
                "and pass the local directory"
            )
        raise CheckpointError("model directory does not exist", where=str(model_dir), fix=fix)
    if not path.is_dir():
        raise CheckpointError(
            "expected a model directory, found a file",
            where=str(path),
            fix="pass the directory that holds config.json",
        )
    return path


def _open(file: Path):
    try:
        return safe_open(str(file), framework="np")
    except SafetensorError as e:
        raise CheckpointError(
            f"corrupted or truncated safetensors file ({e})",
            where=str(file),
            fix="download or copy the file again; its header does not match its contents",
        ) from None
    except OSError as e:
        raise CheckpointError(f"cannot open file ({e})", where=str(file)) from None


class SafetensorsCheckpoint:
    """The tensors of one model directory, indexed from the file headers only.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> tensors = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.int8)}
    >>> write_shards(tensors.items(), Path(tmp.name), max_shard_bytes=24)      # 24 + 4 bytes
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> with SafetensorsCheckpoint(tmp.name) as ckpt:             # headers only, both shards
    ...     info = ckpt.infos["a"]
    ...     print(info.shape, info.dtype, info.file.name)
    ...     print(ckpt.read("a"), ckpt.read("a", start=4, count=2))   # one tensor, numpy
    (2, 3) float32 model-00001-of-00002.safetensors
    [[0. 1. 2.]
     [3. 4. 5.]] [4. 5.]
    >>> tmp.cleanup()
    """

    def __init__(self, model_dir: str | os.PathLike):
        self.dir = require_model_dir(model_dir)
        files = self._files()
        self._fds: dict[Path, int] = {}
        self.infos: dict[str, TensorInfo] = {}
        try:
            for file in files:
                self._index_file(file)
            self._check_index()
        except BaseException:
            self.close()
            raise

    def _index_file(self, file: Path) -> None:
        handle = _open(file)  # validates the header against the file
        try:
            offsets = _data_offsets(file)
            for name in handle.keys():
                if name in self.infos:
                    raise CheckpointError(
                        f"tensor {name!r} appears in two files "
                        f"({self.infos[name].file.name} and {file.name})",
                        where=str(self.dir),
                        fix="remove the stale shard or fix the index",
                    )
                view = handle.get_slice(name)
                dtype = _DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise TensorError(
                        f"unsupported dtype {view.get_dtype()}; supported: {', '.join(_DTYPES)}",
                        where=f"{file}: {name}",
                    )
                shape = tuple(view.get_shape())
                self.infos[name] = TensorInfo(name, shape, dtype, file, offsets[name])
        finally:
            handle.__exit__(None, None, None)
        self._fds[file] = os.open(file, os.O_RDONLY)

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.exists():
            self._index = _read_json(index)
            weight_map = self._index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(
                    "index has no 'weight_map'",
                    where=str(index),
                    fix="regenerate the index with save_pretrained",
                )
            files = sorted({self.dir / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise CheckpointError(
                    f"shards named in the index are missing: {missing}",
                    where=str(index),
                    fix="copy the missing shard files",
                )
            return files
        self._index = None
        single = self.dir / SINGLE_FILE
        if single.exists():
            return [single]
        pickles = [name for name in PICKLE_FILES if (self.dir / name).exists()]
        if pickles:
            raise CheckpointError(
                f"only a pickle checkpoint ({pickles[0]}) was found; jaxcombine never "
                "unpickles files, since loading a pickle can run arbitrary code",
                where=str(self.dir),
                fix=_CONVERT_HINT,
            )
        raise CheckpointError(
            f"no {SINGLE_FILE} or {INDEX_FILE} found",
            where=str(self.dir),
            fix="point at a Hugging Face model directory saved with safetensors",
        )

    def _check_index(self) -> None:
        if self._index is None:
            return
        for name, file in self._index["weight_map"].items():
            info = self.infos.get(name)
            if info is None or info.file.name != file:
                raise CheckpointError(
                    f"the index puts tensor {name!r} in {file}, which does not hold it",
                    where=str(self.dir / INDEX_FILE),
                    fix="regenerate the index or copy the right shard",
                )

    def read(
        self, name: str, out: np.ndarray | None = None, *, start: int = 0, count: int | None = None
    ) -> np.ndarray:
        """Read one tensor as a numpy array (bf16 as ``ml_dtypes.bfloat16``), 64-byte aligned.

        ``start``/``count``: only the flat elements ``[start, start + count)``,
        as a 1-D array. ``out``: a contiguous array of the result's shape and
        dtype to read into (reusing buffers spares the page faults of fresh
        memory).
        """
        info = self.infos.get(name)
        if info is None:
            raise TensorError(f"no tensor named {name!r}", where=str(self.dir))
        size = int(np.prod(info.shape, dtype=np.int64))
        shape = info.shape if count is None else (count,)
        count = size - start if count is None else count
        if start < 0 or count < 0 or start + count > size:
            raise TensorError(f"elements [{start}, {start + count}) outside {size}", where=name)
        if out is None:
            out = aligned_empty(shape, info.dtype)
        elif out.shape != shape or out.dtype != info.dtype or not out.flags.c_contiguous:
            raise TensorError(
                f"cannot read {shape} {info.dtype} into {out.shape} {out.dtype}", where=name
            )
        data = memoryview(out.reshape(-1).view(np.uint8))
        position = info.offset + start * info.dtype.itemsize
        while data.nbytes:
            done = os.preadv(self._fds[info.file], [data], position)
            if done == 0:
                raise CheckpointError(
                    f"file ended while reading tensor {name!r}",
                    where=str(info.file),
                    fix="the file was truncated after it was opened; copy it again",
                )
            data, position = data[done:], position + done
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

    def __enter__(self) -> SafetensorsCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def aligned_empty(shape: tuple[int, ...], dtype, alignment: int = 64) -> np.ndarray:
    """An uninitialised array whose data starts on an ``alignment``-byte boundary
    (XLA's CPU client then uses the buffer in place instead of copying it)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _data_offsets(file: Path) -> dict[str, int]:
    """Where each tensor's data starts in a safetensors file (header already validated)."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return {
        name: 8 + size + meta["data_offsets"][0]
        for name, meta in header.items()
        if name != "__metadata__"
    }


def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"invalid JSON ({e})", where=str(path), fix="restore the file from its source"
        ) from None


_SIZE_UNITS = {
    "": 1,
    "K": 10**3,
    "M": 10**6,
    "B": 10**9,  # mergekit's --out-shard-size: 5B = 5 billion
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """Bytes from an int or a string: '5B' (mergekit: 5 billion), '500M', '5GB', '2GiB'.

    >>> parse_size("5B"), parse_size("500M"), parse_size("2GiB"), parse_size(1024)
    (5000000000, 500000000, 2147483648, 1024)
    """
    if isinstance(size, int):
        return size
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
    unit = match.group(2).upper() if match else None
    if unit not in _SIZE_UNITS:
        raise CheckpointError(
            f"cannot parse size {size!r}",
            where="shard size",
            fix="write it like '5B' (billions), '500M', '5GB', '2GiB' or a number of bytes",
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


_DTYPE_CODES = {dtype: code for code, dtype in _DTYPES.items()}


def shard_names(count: int, prefix: str = "model") -> list[str]:
    """HF's shard file names: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors``."""
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(out_dir: Path, weight_map: dict[str, str], total: int, prefix="model") -> None:
    """``model.safetensors.index.json`` for a sharded checkpoint."""
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    with open(out_dir / f"{prefix}.safetensors.index.json", "w") as f:
        json.dump(index, f, indent=2)


def write_shards(
    tensors: Iterable[tuple[str, np.ndarray]],
    out_dir: Path,
    *,
    max_shard_bytes: int,
    prefix: str = "model",
) -> list[str]:
    """Write ``tensors`` (streamed) as HF safetensors shards plus an index when sharded.

    A shard is flushed when adding the next tensor would pass
    ``max_shard_bytes``. One shard is written as ``model.safetensors``;
    several as ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json``. Returns the file names written.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> tensors = [(name, np.zeros(4, np.float32)) for name in ("a", "b", "c")]   # 16 bytes
    >>> write_shards(tensors, Path(tmp.name), max_shard_bytes=32)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    >>> json.loads((Path(tmp.name) / "model.safetensors.index.json").read_text())["weight_map"]
    {'a': 'model-00001-of-00002.safetensors', 'b': 'model-00001-of-00002.safetensors',
     'c': 'model-00002-of-00002.safetensors'}
    >>> tmp.cleanup()
    """
    pending: dict[str, np.ndarray] = {}
    pending_bytes = 0
    written: list[tuple[Path, list[str]]] = []
    total = 0

    def flush():
        nonlocal pending, pending_bytes
        path = out_dir / f".{prefix}-shard{len(written):05d}.tmp"
        save_file(pending, str(path), metadata={"format": "pt"})
        written.append((path, list(pending)))
        pending, pending_bytes = {}, 0

    for name, array in tensors:
        array = np.ascontiguousarray(array)
        if pending and pending_bytes + array.nbytes > max_shard_bytes:
            flush()
        pending[name] = array
        pending_bytes += array.nbytes
        total += array.nbytes
    if pending or not written:
        flush()

    names = shard_names(len(written), prefix)
    weight_map = {}
    for (path, tensor_names), final in zip(written, names, strict=True):
        path.rename(out_dir / final)
        weight_map.update({t: final for t in tensor_names})
    if len(names) > 1:
        write_index(out_dir, weight_map, total, prefix)
    return names


class ShardWriter:
    """Safetensors shards written in place, one tensor at a time, in any order.

    Every tensor's name, shape and dtype is known before any data exists (a
    merge plan), so each shard's header is written first and each tensor's
    bytes go straight to their offset (``os.pwrite``): memory holds one
    tensor, not one shard. Shards are cut greedily in the given order at
    ``max_shard_bytes`` (a tensor larger than that gets a shard of its own).
    The files are standard safetensors (header: 8-byte little-endian length,
    JSON padded to 8 bytes, then the data) plus the HF index when sharded.

    Example::

        with ShardWriter(out, [("w", (2, 3), np.float32)], max_shard_bytes=5e9) as w:
            w.write("w", np.ones((2, 3), np.float32))
    """

    def __init__(self, out_dir: Path, entries, *, max_shard_bytes: int, prefix: str = "model"):
        self.out_dir = Path(out_dir)
        groups: list[list[tuple[str, tuple, np.dtype, int]]] = [[]]
        size = 0
        for name, shape, dtype in entries:
            dtype = np.dtype(dtype)
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if groups[-1] and size + nbytes > max_shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append((name, tuple(shape), dtype, nbytes))
            size += nbytes
        self.files = shard_names(len(groups), prefix)
        self.prefix = prefix
        self._where: dict[str, tuple[int, int, int, tuple, np.dtype]] = {}
        self._fds: list[int] = []
        self.total = 0
        self._written: dict[str, int] = {}  # bytes written per tensor
        try:
            for shard, (group, file) in enumerate(zip(groups, self.files, strict=True)):
                self._fds.append(self._start_shard(shard, group, file))
        except BaseException:
            self.close()
            raise

    def _start_shard(self, shard: int, group, file: str) -> int:
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype, nbytes in group:
            code = _DTYPE_CODES.get(dtype)
            if code is None:
                raise TensorError(f"cannot write dtype {dtype}", where=name)
            header[name] = {
                "dtype": code,
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        fd = os.open(self.out_dir / file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, len(raw).to_bytes(8, "little") + raw)
        start = 8 + len(raw)
        os.ftruncate(fd, start + offset)
        for name, shape, dtype, nbytes in group:
            begin = header[name]["data_offsets"][0]
            self._where[name] = (shard, start + begin, nbytes, shape, dtype)
        self.total += offset
        return fd

    def write(self, name: str, array: np.ndarray, *, start: int | None = None) -> None:
        """Write a whole tensor, or (``start``) the flat elements from ``start`` on."""
        shard, position, nbytes, shape, dtype = self._where[name]
        whole = start is None
        if array.dtype != dtype or (whole and array.shape != shape):
            raise TensorError(
                f"planned {shape} {dtype}, got {array.shape} {array.dtype}", where=name
            )
        data = memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
        offset = 0 if whole else start * dtype.itemsize
        if offset + data.nbytes > nbytes:
            raise TensorError(f"bytes [{offset}, {offset + data.nbytes}) outside {nbytes}", name)
        position += offset
        self._written[name] = self._written.get(name, 0) + data.nbytes
        while data.nbytes:
            done = os.pwrite(self._fds[shard], data, position)
            data, position = data[done:], position + done

    def finish(self) -> list[str]:
        """Check that every planned byte was written, close, write the index."""
        missing = sorted(n for n, w in self._where.items() if self._written.get(n, 0) != w[2])
        if missing:
            raise TensorError(f"{len(missing)} planned tensors were not written: {missing[:3]}")
        self.close()
        if len(self.files) > 1:
            weight_map = {name: self.files[w[0]] for name, w in self._where.items()}
            write_index(self.out_dir, weight_map, self.total, self.prefix)
        return self.files

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_tensors(checkpoint: SafetensorsCheckpoint) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor of a checkpoint, read one at a time, in name order."""
    for name in sorted(checkpoint.infos):
        yield name, checkpoint.read(name)
