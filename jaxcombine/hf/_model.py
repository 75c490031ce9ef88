"""Load a Hugging Face model directory into the NNX decoder, and write one back.

Loading checks everything that the headers can tell before reading any tensor
data: the config, every expected tensor's presence and shape, unexpected
tensors. Tensors are then read one at a time (memory-mapped), laid out for the
model and placed on devices; with a mesh, each device receives only its shard.
Writing goes to a temporary directory renamed when complete.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import TensorError
from jaxcombine.hf._config import config_from_hf, config_to_hf, read_hf_config
from jaxcombine.hf._names import TensorMap, decoder_tensor_maps, is_recomputed_buffer
from jaxcombine.hf._safetensors import (
    SIDECAR_FILES,
    SafetensorsCheckpoint,
    parse_size,
    require_model_dir,
    write_shards,
)
from jaxcombine.models import Decoder, DecoderConfig
from jaxcombine.sharding import DEFAULT_RULES, Rules, state_shardings

_DTYPE_NAMES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def load_config(model_dir: str | os.PathLike, **overrides) -> DecoderConfig:
    """The :class:`DecoderConfig` of an HF model directory (keyword overrides applied).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = (Path(tmp.name) / "config.json").write_text(json.dumps({"model_type": "mistral",
    ...     "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
    ...     "num_attention_heads": 2, "sliding_window": 4}))
    >>> config = load_config(tmp.name, dropout_rate=0.1)
    >>> config.model_type, config.window_of_layer(0), config.dropout_rate
    ('mistral', 4, 0.1)
    >>> tmp.cleanup()
    """
    path = require_model_dir(model_dir)
    config = config_from_hf(read_hf_config(path), where=str(path / "config.json"))
    return config.replace(**overrides) if overrides else config


def _check_tensors(
    ckpt: SafetensorsCheckpoint, maps: list[TensorMap], config: DecoderConfig
) -> None:
    """Every expected tensor present with its shape; nothing unexpected."""
    expected = {m.hf_name for m in maps}
    missing = list(dict.fromkeys(m.hf_name for m in maps if m.hf_name not in ckpt.infos))
    experts = config.moe.num_experts if config.moe is not None else 0
    if missing and any(".experts." in name for name in missing):
        raise TensorError(
            f"{len(missing)} expert tensor(s) are missing, e.g. {', '.join(missing[:3])}; "
            f"config.json declares {experts} experts (num_local_experts) per MoE layer",
            where=str(ckpt.dir),
            fix="check num_local_experts in config.json, or that every expert's w1/w2/w3 "
            "was written (an interrupted merge or copy leaves experts out)",
        )
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        )
        raise TensorError(
            f"{len(missing)} tensor(s) that config.json requires are missing: {shown}",
            where=str(ckpt.dir),
            fix="check that config.json belongs to these weights (num_hidden_layers, "
            "tie_word_embeddings, biases)",
        )
    allowed = set(expected)
    if config.tie_word_embeddings:
        allowed.add("lm_head.weight")  # checked equal to the embedding on load
    unexpected = sorted(n for n in ckpt.infos if n not in allowed and not is_recomputed_buffer(n))
    if unexpected:
        raise TensorError(
            f"{len(unexpected)} tensor(s) not used by a {config.model_type} model: "
            + ", ".join(unexpected[:8]),
            where=str(ckpt.dir),
            fix="check model_type and the layer count in config.json; jaxcombine does not "
            "skip tensors silently",
        )
    for m in maps:
        info = ckpt.infos[m.hf_name]
        if info.shape != m.hf_shape:
            raise TensorError(
                f"shape {info.shape} in the file disagrees with {m.hf_shape} implied by "
                "config.json",
                where=f"{info.file}: {m.hf_name}",
                fix="check hidden_size, intermediate_size, head counts and vocab_size in "
                "config.json",
            )
        if not np.issubdtype(info.dtype, np.floating) and info.dtype.name != "bfloat16":
            raise TensorError(
                f"expected a floating-point tensor, found {info.dtype}",
                where=f"{info.file}: {m.hf_name}",
            )


def load_model(
    model_dir: str | os.PathLike,
    *,
    dtype=None,
    dropout_rate: float = 0.0,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
) -> Decoder:
    """Build a :class:`~jaxcombine.models.Decoder` from an HF model directory.

    Args:
      model_dir: a directory with ``config.json`` and ``model.safetensors`` (or
        shards with ``model.safetensors.index.json``).
      dtype: parameter and compute dtype; default: the checkpoint's
        (the embedding's dtype).
      dropout_rate: residual dropout, used only when a dropout key is passed
        to the forward (MC dropout).
      mesh, rules: place each parameter on ``mesh`` by its logical axes; each
        device receives only its shard.

    A tiny random Llama written with :func:`write_shards`, then loaded: the
    kernel is the HF weight transposed, with the head axes split out.

    >>> import json, tempfile
    >>> from jaxcombine.hf import config_from_hf, decoder_tensor_maps, write_shards
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name) / "tiny"; root.mkdir()
    >>> hf = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
    ...       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    >>> _ = (root / "config.json").write_text(json.dumps(hf))
    >>> rng = np.random.default_rng(0)                        # a tiny random Llama on disk
    >>> tensors = {m.hf_name: rng.normal(size=m.hf_shape).astype(np.float32)
    ...            for m in decoder_tensor_maps(config_from_hf(hf))}
    >>> write_shards(tensors.items(), root, max_shard_bytes=10**9)
    ['model.safetensors']
    >>> model = load_model(root)
    >>> q = np.asarray(model.layers[0].self_attn.q_proj.kernel[...])       # [E, H, D]
    >>> weight = tensors["model.layers.0.self_attn.q_proj.weight"]               # [H*D, E]
    >>> q.shape, np.array_equal(q.reshape(8, 8), weight.T)
    ((8, 2, 4), True)
    >>> tmp.cleanup()

    Then ``model(jnp.array([[1, 5, 9]])).logits`` as for any
    :class:`~jaxcombine.models.Decoder`.
    """
    path = require_model_dir(model_dir)
    config = load_config(path, dropout_rate=dropout_rate)
    with SafetensorsCheckpoint(path) as ckpt:
        maps = decoder_tensor_maps(config, moe_layout=_moe_layout(ckpt))
        _check_tensors(ckpt, maps, config)
        if dtype is None:
            dtype = ckpt.infos["model.embed_tokens.weight"].dtype
        dtype = jnp.dtype(dtype)
        abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
        graphdef, abstract_state = nnx.split(abstract)
        shardings = state_shardings(abstract_state, mesh, rules) if mesh is not None else None
        shapes = {p: v.shape for p, v in nnx.to_flat_state(abstract_state)}
        stacked: dict = {}  # expert slices gathered before placement
        values = {}
        for m in maps:
            array = m.to_model(ckpt.read(m.hf_name)).astype(dtype)
            if m.expert is not None:
                stack = stacked.setdefault(m.path, np.empty(shapes[m.path], dtype))
                stack[m.expert] = array
                if m.expert < len(stack) - 1:
                    continue
                array = stacked.pop(m.path)
            values[m.path] = _place(array, None if shardings is None else shardings[m.path])
        if config.tie_word_embeddings and "lm_head.weight" in ckpt.infos:
            head = ckpt.read("lm_head.weight")
            if not np.array_equal(head, ckpt.read("model.embed_tokens.weight")):
                raise TensorError(
                    "config.json sets tie_word_embeddings=true but lm_head.weight differs "
                    "from model.embed_tokens.weight",
                    where=str(ckpt.dir),
                    fix="set tie_word_embeddings to false in config.json",
                )
    flat = [(p, v.replace(values[p])) for p, v in nnx.to_flat_state(abstract_state)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _moe_layout(ckpt: SafetensorsCheckpoint) -> str:
    """Per-expert hub names, or transformers 5's fused expert tensors."""
    fused = any(n.endswith(".mlp.experts.gate_up_proj") for n in ckpt.infos)
    return "fused" if fused else "experts"


def _place(array: np.ndarray, sharding) -> jax.Array:
    if sharding is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _to_host(value: jax.Array) -> np.ndarray:
    if isinstance(value, jax.Array) and not value.is_fully_addressable:
        value = multihost_utils.process_allgather(value, tiled=True)
    return np.asarray(jax.device_get(value))


def hf_tensors(model: Decoder, dtype=None):
    """The model's parameters as (HF name, numpy array) pairs, one at a time, in
    :func:`decoder_tensor_maps` order (``dtype``: cast each).

    The tensors of a loaded checkpoint come back bit for bit:

    >>> import json, tempfile
    >>> from jaxcombine.hf import config_from_hf, decoder_tensor_maps, write_shards
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name) / "tiny"; root.mkdir()
    >>> hf = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
    ...       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    >>> _ = (root / "config.json").write_text(json.dumps(hf))
    >>> rng = np.random.default_rng(0)                        # a tiny random Llama on disk
    >>> tensors = {m.hf_name: rng.normal(size=m.hf_shape).astype(np.float32)
    ...            for m in decoder_tensor_maps(config_from_hf(hf))}
    >>> write_shards(tensors.items(), root, max_shard_bytes=10**9)
    ['model.safetensors']
    >>> pairs = list(hf_tensors(load_model(root)))
    >>> pairs[0][0], all(np.array_equal(tensors[name], x) for name, x in pairs)
    ('model.embed_tokens.weight', True)
    >>> tmp.cleanup()
    """
    state = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    host = {}  # a stacked expert parameter is gathered once, written expert by expert
    for m in decoder_tensor_maps(model.config):
        if m.path not in host:
            host[m.path] = _to_host(state[m.path].get_value())
        value = host[m.path] if m.expert is None else host[m.path][m.expert]
        if m.expert is None or m.expert == len(host[m.path]) - 1:
            del host[m.path]
        array = m.to_hf(value)
        yield m.hf_name, array if dtype is None else array.astype(dtype)


def save_model(
    model: Decoder,
    out_dir: str | os.PathLike,
    *,
    source_dir: str | os.PathLike | None = None,
    dtype: str | None = None,
    max_shard_size: str | int = "5GB",
    overwrite: bool = False,
    extra_files: Sequence[str | os.PathLike] = (),
) -> Path:
    """Write ``model`` as an HF directory that ``transformers`` loads.

    The directory gets ``config.json`` (``source_dir``'s config with this
    model's architecture fields, or a fresh one), safetensors shards of at most
    ``max_shard_size`` with an index when there are several, and the tokenizer
    and generation files of ``source_dir``. It appears only when complete. In a
    multi-process job every process must call this; process 0 writes.

    Args:
      dtype: "float32", "bfloat16" or "float16"; default: the parameters' dtype.
      extra_files: files copied into the directory (a trained model's
        ``tokenizer.json``, say) before it appears.

    A load / save round trip of a tiny random Llama, in bfloat16:

    >>> import json, tempfile
    >>> from jaxcombine.hf import config_from_hf, decoder_tensor_maps, write_shards
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name) / "tiny"; root.mkdir()
    >>> hf = {"model_type": "llama", "vocab_size": 16, "hidden_size": 8, "intermediate_size": 8,
    ...       "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    >>> _ = (root / "config.json").write_text(json.dumps(hf))
    >>> rng = np.random.default_rng(0)                        # a tiny random Llama on disk
    >>> tensors = {m.hf_name: rng.normal(size=m.hf_shape).astype(np.float32)
    ...            for m in decoder_tensor_maps(config_from_hf(hf))}
    >>> write_shards(tensors.items(), root, max_shard_bytes=10**9)
    ['model.safetensors']
    >>> out = save_model(load_model(root), root.parent / "copy", source_dir=root, dtype="bfloat16")
    >>> sorted(p.name for p in out.iterdir())
    ['config.json', 'model.safetensors']
    >>> json.loads((out / "config.json").read_text())["architectures"]
    ['LlamaForCausalLM']
    >>> with SafetensorsCheckpoint(out) as saved:
    ...     w = saved.read("model.layers.0.mlp.down_proj.weight")
    >>> w.dtype, np.array_equal(w, tensors["model.layers.0.mlp.down_proj.weight"].astype(w.dtype))
    (dtype(bfloat16), True)
    >>> tmp.cleanup()
    """
    base = read_hf_config(source_dir) if source_dir is not None else None
    param_dtype = model.embed_tokens.embedding.get_value().dtype
    out_dtype = jnp.dtype(_DTYPE_NAMES[dtype]) if dtype is not None else jnp.dtype(param_dtype)
    hf = config_to_hf(model.config, base=base, dtype=out_dtype.name)  # checked before writing
    tensors = hf_tensors(model, out_dtype)
    out = Path(out_dir)
    if jax.process_index() != 0:
        for _ in tensors:  # take part in the gathers of sharded parameters
            pass
        return out
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_shards(tensors, tmp, max_shard_bytes=parse_size(max_shard_size))
        with open(tmp / "config.json", "w") as f:
            json.dump(hf, f, indent=2, sort_keys=True)
        if source_dir is not None:
            for name in SIDECAR_FILES:
                if (Path(source_dir) / name).exists():
                    shutil.copy2(Path(source_dir) / name, tmp / name)
        for path in extra_files:
            shutil.copy2(path, tmp / Path(path).name)
    return out
