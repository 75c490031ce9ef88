"""Extract a LoRA adapter from a fine-tuned model: the best low-rank fit of its task vector.

For every linear weight :math:`W \\in R^{out \\times in}` of the transformer
layers (and an untied ``lm_head``) the task vector is
:math:`D = W_{model} - W_{base}`. LoRA (Hu et al. 2021, arXiv:2106.09685)
replaces it by :math:`\\frac{\\alpha}{r} B A` with :math:`B \\in R^{out \\times r}`,
:math:`A \\in R^{r \\times in}`. With the thin SVD :math:`D = U S V^T`,

.. math::

    B = U_{:, :r} \\operatorname{diag}(S_{:r}), \\qquad A = V^T_{:r, :}

and :math:`\\alpha = r` (scaling 1) make :math:`BA` the best rank-``r``
approximation of :math:`D` in Frobenius norm (Eckart–Young), with error
:math:`\\|D - BA\\|_F = \\sqrt{\\sum_{i > r} s_i^2}`; a fine-tune whose update has
rank at most ``r`` is recovered exactly. Each module gets
``r = min(max_rank, *D.shape)``; modules below the adapter's rank are listed
in ``rank_pattern`` / ``alpha_pattern``. The SVD runs in float32 under
``jax.jit`` on the default device.

Every tensor that differs from the base ends up in the adapter, in the form
PEFT (``peft.PeftModel.from_pretrained``) loads:

* linear weights: ``lora_A`` / ``lora_B``;
* ``embed_tokens`` (untied): PEFT's embedding LoRA, which stores the
  transpose, ``lora_embedding_A = (US)^T`` ``[r, vocab]`` and
  ``lora_embedding_B = V`` ``[hidden, r]`` (PEFT computes ``(B A)^T``);
* biases of linear modules: the fine-tuned bias itself (``bias: "lora_only"``,
  or ``"all"`` when a module without a LoRA has one), loaded in place of the
  base bias, as PEFT does for biases;
* anything else (norm weights, tied embeddings, …): the whole module in
  ``modules_to_save`` with its fine-tuned tensors. A tied ``embed_tokens``
  takes ``lm_head`` with it, since the output layer shares its weight.

Tensors equal to the base are left out and counted. The checkpoints are
checked from their headers first, then read one module at a time; only the
adapter is held in memory. With tied embeddings a stored ``lm_head.weight`` is
an alias of the embedding and is not read. mergekit's ``mergekit-extract-lora``
(arcee-ai/mergekit) extracts LoRA adapters the same way, with PyTorch.

Example (runnable in :func:`extract_lora`)::

    result = extract_lora("ft-model", "base-model", "adapter", max_rank=16)
    print(result["message"])
    # then: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base-model"), "adapter")
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import ConfigError, InputError, TensorError, UnsupportedModelError
from jaxcombine.hf import SafetensorsCheckpoint, read_hf_config, require_model_dir

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PREFIX = "base_model.model."

_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}
_IN_LAYERS = re.compile(r"(?:^|\.)layers\.\d+\.")


class _Module(NamedTuple):
    """One PyTorch module of the checkpoint: its path and how a change to it is stored."""

    path: str
    kind: str  # "linear" | "embedding" | "tied_embedding" | "other"
    params: tuple[str, ...]  # parameter names, e.g. ("bias", "weight")


# --------------------------------------------------------------------------- math


@functools.partial(jax.jit, static_argnames="rank")
def low_rank(delta: jax.Array, rank: int):
    """Best rank-``rank`` factors of ``delta`` [out, in] (Eckart–Young).

    Returns ``(b [out, r], a [r, in], ||delta - b a||_F^2, ||delta||_F^2)``.

    diag(3, 1) at rank 1 keeps the larger singular value; the error is the other:

    >>> b, a, err_sq, norm_sq = low_rank(jnp.diag(jnp.array([3.0, 1.0])), rank=1)
    >>> print(b[:, 0], a[0], err_sq, norm_sq)
    [3. 0.] [1. 0.] 1.0 10.0

    References: Eckart & Young 1936, The Approximation of One Matrix by Another of Lower Rank,
    Psychometrika 1(3).
    """
    delta = delta.astype(jnp.float32)
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    b = u[:, :rank] * s[:rank]
    a = vt[:rank]
    residual = delta - jnp.matmul(b, a, precision=jax.lax.Precision.HIGHEST)
    return b, a, jnp.sum(residual**2), jnp.sum(delta**2)


def _as_float32(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) if _is_float(x.dtype) else x


def _is_float(dtype: np.dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype == _DTYPES["bfloat16"]


# --------------------------------------------------------------------------- plan


def _split(name: str) -> tuple[str, str]:
    module, _, param = name.rpartition(".")
    return module, param


def _module_kind(path: str, weight_shape: tuple[int, ...] | None, tied: bool) -> str:
    if weight_shape is None or len(weight_shape) != 2:
        return "other"
    if path.rpartition(".")[2] == "embed_tokens":
        return "tied_embedding" if tied else "embedding"
    if (path == "lm_head" and not tied) or _IN_LAYERS.search(path + "."):
        return "linear"
    return "other"


def plan_modules(shapes: dict[str, tuple[int, ...]], *, tied: bool) -> list[_Module]:
    """Group tensor names by module and classify each module (from shapes only):
    ``linear`` (2-D weights in the layers, an untied ``lm_head``), ``embedding``,
    ``tied_embedding`` or ``other`` (saved whole if changed).

    >>> shapes = {"model.embed_tokens.weight": (16, 8), "model.norm.weight": (8,),
    ...           "model.layers.0.self_attn.q_proj.weight": (8, 8),
    ...           "model.layers.0.self_attn.q_proj.bias": (8,), "lm_head.weight": (16, 8)}
    >>> for module in plan_modules(shapes, tied=False):
    ...     print(module.path, module.kind, module.params)
    lm_head linear ('weight',)
    model.embed_tokens embedding ('weight',)
    model.layers.0.self_attn.q_proj linear ('bias', 'weight')
    model.norm other ('weight',)
    """
    params = defaultdict(list)
    for name in shapes:
        if tied and name == "lm_head.weight":
            continue  # an alias of the embedding: transformers ties it on load
        module, param = _split(name)
        params[module].append(param)
    modules = []
    for path in sorted(params):
        weight = shapes.get(f"{path}.weight")
        modules.append(_Module(path, _module_kind(path, weight, tied), tuple(sorted(params[path]))))
    return modules


def target_module_names(lora_paths: list[str], all_paths: list[str]) -> list[str]:
    """PEFT ``target_modules``: a leaf name where it picks exactly ``lora_paths``, else full paths.

    PEFT matches a target ``t`` against module ``m`` when ``m == t`` or
    ``m.endswith("." + t)``.

    >>> every = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    >>> target_module_names(every, every), target_module_names(every[:1], every)
    (['q_proj'], ['model.layers.0.self_attn.q_proj'])
    """
    by_leaf = defaultdict(set)
    for path in lora_paths:
        by_leaf[path.rpartition(".")[2]].add(path)
    names = []
    for leaf, paths in sorted(by_leaf.items()):
        everywhere = {m for m in all_paths if m == leaf or m.endswith("." + leaf)}
        names += [leaf] if everywhere == paths else sorted(paths)
    return names


def _pattern_key(path: str) -> str:
    # PEFT matches rank_pattern keys as regexes ending a module name; older
    # releases need a "." before the key, so drop the leading "model.".
    return path.split(".", 1)[1] if "." in path else path


def adapter_config(
    *,
    ranks: dict[str, int],
    all_paths: list[str],
    modules_to_save: list[str],
    bias: str,
    base: str,
) -> dict:
    """The ``adapter_config.json`` PEFT reads for these modules (scaling alpha / r = 1):
    ``r`` the largest rank, smaller ones in ``rank_pattern`` and ``alpha_pattern``.

    >>> config = adapter_config(ranks={"model.layers.0.mlp.up_proj": 8, "lm_head": 4},
    ...     all_paths=["model.layers.0.mlp.up_proj", "lm_head"], modules_to_save=[],
    ...     bias="none", base="base-model")
    >>> config["r"], config["lora_alpha"], config["rank_pattern"], config["target_modules"]
    (8, 8, {'lm_head': 4}, ['lm_head', 'up_proj'])
    """
    r = max(ranks.values(), default=1)
    smaller = {_pattern_key(p): k for p, k in sorted(ranks.items()) if k != r}
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": smaller,
        "alpha_pattern": dict(smaller),
        "target_modules": target_module_names(sorted(ranks), all_paths),
        "modules_to_save": modules_to_save or None,
        "bias": bias,
        "fan_in_fan_out": False,
        "lora_dropout": 0.0,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }


# --------------------------------------------------------------------------- checks


def _check_args(max_rank, dtype) -> np.dtype | None:
    if isinstance(max_rank, bool) or not isinstance(max_rank, int | np.integer) or max_rank < 1:
        raise InputError(
            f"max_rank must be a positive integer, got {max_rank!r}",
            where="--max-rank",
            fix="pass the LoRA rank, e.g. --max-rank 16",
        )
    if dtype is None:
        return None
    if str(dtype) not in _DTYPES:
        raise InputError(
            f"unsupported adapter dtype {dtype!r}; supported: {', '.join(_DTYPES)}",
            where="dtype",
        )
    return _DTYPES[str(dtype)]


def _check_configs(model_dir: Path, base_dir: Path) -> bool:
    """Same ``model_type`` and embedding tying in both config.json files; returns tying."""
    cfgs = read_hf_config(model_dir), read_hf_config(base_dir)
    model_type = [c.get("model_type") for c in cfgs]
    tied = [bool(c.get("tie_word_embeddings", False)) for c in cfgs]
    for key, (ours, theirs) in (("model_type", model_type), ("tie_word_embeddings", tied)):
        if ours != theirs:
            raise ConfigError(
                f"{key} differs: model has {ours!r}, base has {theirs!r}",
                where=f"{model_dir / 'config.json'} vs {base_dir / 'config.json'}",
                fix="extract from a fine-tune of this very base model",
            )
    return tied[0]


def _names(names) -> str:
    names = sorted(names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _check_tensors(model: SafetensorsCheckpoint, base: SafetensorsCheckpoint) -> None:
    extra, missing = model.infos.keys() - base.infos.keys(), base.infos.keys() - model.infos.keys()
    if extra or missing:
        found = [f"only in the model: {_names(extra)}"] if extra else []
        found += [f"only in the base: {_names(missing)}"] if missing else []
        raise TensorError(
            "the checkpoints hold different tensors (" + "; ".join(found) + ")",
            where=f"{model.dir} vs {base.dir}",
            fix="extract from a fine-tune of this very base model (same architecture and size)",
        )
    for name, info in sorted(model.infos.items()):
        if info.shape != base.infos[name].shape:
            raise TensorError(
                f"shape differs: model has {info.shape}, base has {base.infos[name].shape}",
                where=f"{info.file}: {name}",
                fix="extract from a fine-tune of this very base model (same architecture and size)",
            )


def _check_out(out_dir: Path, model_dir: Path, base_dir: Path) -> None:
    out = out_dir.resolve()
    for src in (model_dir.resolve(), base_dir.resolve()):
        if out == src or src in out.parents or out in src.parents:
            raise InputError(
                "the output directory overlaps an input model directory",
                where=str(out_dir),
                fix="write the adapter to a new directory",
            )


def _check_plan(modules: list[_Module], tied: bool, base_dir: Path) -> None:
    if tied and not any(m.kind == "tied_embedding" for m in modules):
        raise UnsupportedModelError(
            "the model ties lm_head to its input embedding, but no tensor is named "
            "'*.embed_tokens.weight', so the tensor that lm_head shares is unknown",
            where=str(base_dir / "config.json"),
            fix="extract from a model with untied embeddings or Llama-style tensor names",
        )


# --------------------------------------------------------------------------- extraction


class _Adapter:
    """The adapter under construction: tensors, ranks and what went where."""

    def __init__(self, dtype: np.dtype | None):
        self.dtype = dtype
        self.tensors: dict[str, np.ndarray] = {}
        self.ranks: dict[str, int] = {}
        self.embeddings: list[str] = []
        self.biases: list[str] = []
        self.modules_to_save: list[str] = []
        self.unchanged = 0
        self.err_sq = 0.0
        self.norm_sq = 0.0

    def put(self, key: str, value, like: np.dtype) -> None:
        self.tensors[PREFIX + key] = np.ascontiguousarray(np.asarray(value, self.dtype or like))

    def add_lora(self, path: str, delta: np.ndarray, max_rank: int, like, embedding: bool):
        rank = min(max_rank, *delta.shape)
        b, a, err_sq, norm_sq = low_rank(delta, rank)
        self.err_sq += float(err_sq)
        self.norm_sq += float(norm_sq)
        self.ranks[path] = rank
        if embedding:  # PEFT: delta = (lora_embedding_B @ lora_embedding_A).T
            self.embeddings.append(path)
            self.put(f"{path}.lora_embedding_A", jnp.transpose(b), like)
            self.put(f"{path}.lora_embedding_B", jnp.transpose(a), like)
        else:
            self.put(f"{path}.lora_A.weight", a, like)
            self.put(f"{path}.lora_B.weight", b, like)


def _extract_module(module: _Module, model, base, adapter: _Adapter, max_rank: int) -> None:
    """Add one module's changes to the adapter (reads its tensors from both checkpoints)."""
    tensors = {p: model.read(f"{module.path}.{p}") for p in module.params}
    changed = {}
    for p, x in tensors.items():
        x, y = _as_float32(x), _as_float32(base.read(f"{module.path}.{p}"))
        if np.array_equal(x, y):
            adapter.unchanged += 1
        else:
            changed[p] = x - y if _is_float(x.dtype) else None
    if not changed:
        return
    lora_able = module.kind in ("linear", "embedding") and _is_float(tensors["weight"].dtype)
    if lora_able and set(changed) <= {"weight", "bias"}:
        if "weight" in changed:
            embedding = module.kind == "embedding"
            like = tensors["weight"].dtype
            adapter.add_lora(module.path, changed["weight"], max_rank, like, embedding)
        if "bias" in changed:
            adapter.biases.append(f"{module.path}.bias")
        return
    adapter.modules_to_save.append(module.path)
    adapter.unchanged -= len(tensors) - len(changed)  # written after all
    for p, x in tensors.items():
        adapter.put(f"{module.path}.{p}", x, x.dtype)
    if module.kind == "tied_embedding":
        adapter.modules_to_save.append("lm_head")
        adapter.put("lm_head.weight", tensors["weight"], tensors["weight"].dtype)


def _write_biases(adapter: _Adapter, model: SafetensorsCheckpoint) -> str:
    """Fine-tuned biases under PEFT's names; returns the config's ``bias`` value."""
    bias_mode = "none"
    for name in adapter.biases:
        module = _split(name)[0]
        wrapped = module in adapter.ranks  # PEFT wraps the layer: its bias is base_layer.bias
        key = f"{module}.base_layer.bias" if wrapped else name
        x = model.read(name)
        adapter.put(key, x, x.dtype)
        bias_mode = "lora_only" if wrapped and bias_mode != "all" else "all"
    return bias_mode


def _check_not_empty(adapter: _Adapter, model_dir: Path, base_dir: Path) -> None:
    where = f"{model_dir} vs {base_dir}"
    if not adapter.tensors and not adapter.biases:
        raise InputError(
            "the model is identical to the base: there is nothing to extract",
            where=where,
            fix="pass the fine-tuned model as --model and its base as --base",
        )
    if not adapter.ranks:  # PEFT refuses a LoRA config that targets no module
        changed = adapter.modules_to_save + adapter.biases
        raise InputError(
            f"no linear or embedding weight differs from the base, so there is no LoRA to "
            f"extract; only these changed: {_names(changed)}",
            where=where,
            fix="use the fine-tuned model itself; a PEFT LoRA adapter needs a LoRA module",
        )


def _check_nesting(adapter: _Adapter, model: SafetensorsCheckpoint) -> None:
    """A module in modules_to_save must be saved whole: no submodule may be stored otherwise."""
    for path in adapter.modules_to_save:
        inner = [n for n in model.infos if n.startswith(path + ".") and _split(n)[0] != path]
        if inner:
            raise UnsupportedModelError(
                f"module {path!r} changed and has submodules ({_names(inner)}); "
                "it cannot be saved whole next to LoRA layers inside it",
                where=str(model.dir),
            )


def _summary(adapter: _Adapter, out: Path) -> dict:
    rank = max(adapter.ranks.values(), default=0)
    rel = float(np.sqrt(adapter.err_sq / adapter.norm_sq)) if adapter.norm_sq else 0.0
    lora = sorted(adapter.ranks)
    message = (
        f"wrote LoRA adapter to {out}: rank {rank}, {len(lora)} LoRA modules "
        f"(relative error {rel:.3g}), {len(adapter.biases)} biases, "
        f"{len(adapter.modules_to_save)} modules saved whole, "
        f"{adapter.unchanged} tensors unchanged"
    )
    return {
        "out": str(out),
        "rank": rank,
        "modules": len(lora),
        "lora_modules": lora,
        "embedding_modules": sorted(adapter.embeddings),
        "biases": sorted(adapter.biases),
        "modules_to_save": sorted(adapter.modules_to_save),
        "unchanged": adapter.unchanged,
        "relative_error": rel,
        "message": message,
    }


def extract_lora(
    model_dir: str | os.PathLike,
    base_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_rank: int,
    overwrite: bool = False,
    dtype: str | None = None,
) -> dict:
    """Write a PEFT LoRA adapter that turns ``base_dir`` into (a low-rank fit of) ``model_dir``.

    Args:
      model_dir: the fine-tuned HF model directory (safetensors).
      base_dir: the base HF model directory it was fine-tuned from.
      out_dir: the adapter directory to write (``adapter_model.safetensors`` and
        ``adapter_config.json``); it appears only when complete.
      max_rank: the LoRA rank; each module gets ``min(max_rank, *shape)``.
      overwrite: replace an existing non-empty ``out_dir``.
      dtype: "float32", "bfloat16" or "float16" for the adapter tensors;
        default: each fine-tuned tensor's dtype.

    Returns:
      ``{"out", "rank", "modules", "lora_modules", "embedding_modules", "biases",
      "modules_to_save", "unchanged", "relative_error", "message"}``, where
      ``relative_error`` is ``||D - BA||_F / ||D||_F`` over all LoRA modules (float32
      factors, before any cast to ``dtype``).

    A fine-tune whose only change is a rank-1 update u v^T of one MLP weight
    gives a rank-1 adapter with B A = u v^T:

    >>> import tempfile
    >>> from safetensors.numpy import load_file
    >>> from jaxcombine.hf import write_shards
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name)
    >>> rng = np.random.default_rng(0)
    >>> base = {"model.embed_tokens.weight": rng.normal(size=(16, 8)), "model.norm.weight":
    ...         np.ones(8), "model.layers.0.mlp.up_proj.weight": rng.normal(size=(12, 8)),
    ...         "lm_head.weight": rng.normal(size=(16, 8))}
    >>> u, v = rng.normal(size=(12, 1)), rng.normal(size=(1, 8))
    >>> up = "model.layers.0.mlp.up_proj.weight"
    >>> tuned = {**base, up: base[up] + u @ v}
    >>> for name, tensors in (("base", base), ("tuned", tuned)):
    ...     (root / name).mkdir()
    ...     _ = (root / name / "config.json").write_text(json.dumps({"model_type": "llama"}))
    ...     _ = write_shards(((k, x.astype(np.float32)) for k, x in tensors.items()), root / name,
    ...                      max_shard_bytes=10**9)
    >>> result = extract_lora(root / "tuned", root / "base", root / "lora", max_rank=1)
    >>> result["lora_modules"], result["unchanged"], result["relative_error"] < 1e-6
    (['model.layers.0.mlp.up_proj'], 3, True)
    >>> adapter = load_file(str(root / "lora" / ADAPTER_FILE))
    >>> prefix = PREFIX + "model.layers.0.mlp.up_proj."
    >>> A, B = adapter[prefix + "lora_A.weight"], adapter[prefix + "lora_B.weight"]
    >>> A.shape, B.shape, np.allclose(B @ A, u @ v, atol=1e-5)
    ((1, 8), (12, 1), True)
    >>> tmp.cleanup()

    References: Hu et al. 2021, LoRA: Low-Rank Adaptation of Large Language Models,
    arXiv:2106.09685; Eckart & Young 1936, The Approximation of One Matrix by Another of Lower Rank,
    Psychometrika 1(3).
    """
    out_dtype = _check_args(max_rank, dtype)
    model_path, base_path = require_model_dir(model_dir), require_model_dir(base_dir)
    tied = _check_configs(model_path, base_path)
    with SafetensorsCheckpoint(model_path) as model, SafetensorsCheckpoint(base_path) as base:
        _check_tensors(model, base)
        tied = tied or "lm_head.weight" not in model.infos
        modules = plan_modules({n: i.shape for n, i in model.infos.items()}, tied=tied)
        _check_plan(modules, tied, base_path)
        _check_out(Path(out_dir), model_path, base_path)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            adapter = _Adapter(out_dtype)
            for module in modules:
                _extract_module(module, model, base, adapter, max_rank)
            _check_not_empty(adapter, model_path, base_path)
            _check_nesting(adapter, model)
            bias = _write_biases(adapter, model)
            config = adapter_config(
                ranks=adapter.ranks,
                all_paths=[m.path for m in modules],
                modules_to_save=sorted(adapter.modules_to_save),
                bias=bias,
                base=str(base_path.resolve()),
            )
            save_file(adapter.tensors, str(tmp / ADAPTER_FILE), metadata={"format": "pt"})
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return _summary(adapter, Path(out_dir))


__all__ = ["adapter_config", "extract_lora", "low_rank", "plan_modules", "target_module_names"]
