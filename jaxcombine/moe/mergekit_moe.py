"""``jaxcombine moe``: a Mixtral checkpoint assembled from dense models, from mergekit-moe's YAML.

The method is mergekit-moe's (Goddard et al. 2024, arXiv:2403.13257; in the
spirit of Branch-Train-MiX, arXiv:2403.07816): take attention, norms,
embeddings and head from ``base_model``; make expert ``m`` of every layer from
``experts[m].source_model``'s MLP

    w1 = gate_proj,   w2 = down_proj * residual_scale,   w3 = up_proj

(plus ``noise_scale`` Gaussian noise if set); and initialise each layer's
router row ``m`` from prompts, by ``gate_mode``:

* ``hidden`` (= ``hidden_last``): ``r_l = n(mean_p h_l(p) - mean_q h_l(q))``,
  ``h_l(p)`` the residual stream entering layer ``l`` at the last token of
  prompt ``p`` (the base model's, computed here with the NNX decoder), ``p``
  over the positive prompts, ``q`` over the negative ones (the term dropped
  when there are none), ``n(v) = v / max(|v|, 1e-8)``;
* ``hidden_avg``: the same with each prompt's mean over its tokens;
* ``cheap_embed``: ``r = n(n(sum_p sum_t e(p_t)) - n(sum_q sum_t e(q_t)))``
  with ``e`` the base's input embedding, the same row for every layer;
* ``random``: standard normal; ``uniform_random``: uniform on
  ``[-1/sqrt(E), 1/sqrt(E))`` (torch's ``nn.Linear`` initialisation), from
  ``jax.random`` keyed by ``seed``.

Prompts are tokenised as mergekit does: the BOS token's text prepended, no
other special tokens added.

Three steps, each usable on its own::

    from jaxcombine.moe.mergekit_moe import load_moe_config, plan_moe, run_moe

    config = load_moe_config("moe.yml")   # keys, values, model directories
    plan = plan_moe(config)               # headers, configs, tokenizer: all checked
    print(plan.describe())                # what --dry-run prints
    run_moe(plan, "out/moe", seed=0)      # routers, then tensors streamed to disk

The output is a Mixtral directory (``config.json``, safetensors with the hub's
per-expert names ``model.layers.L.block_sparse_moe.experts.M.w1/w2/w3.weight``
and ``block_sparse_moe.gate.weight``, which every transformers version reads,
the base's tokenizer files). mergekit-moe 0.1.5 writes transformers 5's fused
layout (``mlp.experts.gate_up_proj``, gate rows first); the tensors are the
same (see the tests). Everything that can fail is checked before any tensor
data is read, and the directory appears only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import (
    CheckpointError,
    ConfigError,
    TensorError,
    UnsupportedModelError,
    closest,
)
from jaxcombine.hf._safetensors import SIDECAR_FILES, SafetensorsCheckpoint, ShardWriter, parse_size
from jaxcombine.merging.mergekit._config import _check_keys, _dtype, _locate, _model_reference

TOP_LEVEL_KEYS = (
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
    "tokenizer_source",
)
EXPERT_KEYS = (
    "source_model",
    "positive_prompts",
    "negative_prompts",
    "noise_scale",
    "residual_scale",
)
GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random")
PROMPT_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed")
SOURCE_TYPES = ("llama", "mistral")  # what mergekit-moe turns into Mixtral
# mergekit-moe's output architectures; `architecture` picks by case-insensitive prefix.
OUTPUT_ARCHITECTURES = ("Mixtral", "DeepSeek", "Qwen MoE", "Qwen3 MoE")
_MLP = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_RECOMPUTED = ("rotary_emb.inv_freq",)
_HIDDEN_BATCH = 8  # prompts per forward pass (one compiled shape per length bucket)


# -- the configuration ------------------------------------------------------------------------


@dataclass(frozen=True)
class Expert:
    """One expert: its model and the prompts that initialise its router rows."""

    source_model: str
    path: Path
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoEMergeConfig:
    """A validated mergekit-moe configuration."""

    base_model: str
    base_path: Path
    experts: tuple[Expert, ...]
    gate_mode: str = "hidden"
    dtype: np.dtype | None = None
    experts_per_token: int = 2
    text: str = ""
    source: str = "<dict>"


def _prompts(value, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise ConfigError(
            f"prompts must be a list of strings, got {value!r}",
            where=where,
            fix="write e.g. positive_prompts: ['def fibonacci(n):', 'Write a Python function']",
        )
    return tuple(value)


def _number(value, where: str, *, minimum: float | None = None) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"expected a number, got {value!r}", where=where)
    if minimum is not None and value < minimum:
        raise ConfigError(f"must be >= {minimum}, got {value!r}", where=where)
    return float(value)


def _architecture(value) -> None:
    if value is None:
        return
    matches = [a for a in OUTPUT_ARCHITECTURES if a.lower().startswith(str(value).lower())]
    if not matches:
        raise ConfigError(
            f"no output architecture matches {value!r}",
            where="architecture",
            fix=closest(str(value), OUTPUT_ARCHITECTURES),
        )
    if "Mixtral" not in matches:
        raise UnsupportedModelError(
            f"output architecture {matches[0]!r} is not supported; jaxcombine writes Mixtral",
            where="architecture",
            fix="use architecture: mixtral (or remove the key)",
        )


def parse_moe_config(
    raw: Mapping, *, config_dir: str | os.PathLike | None = None, text: str = "", source="<dict>"
) -> MoEMergeConfig:
    """Check a mergekit-moe config (a dict as read from YAML) and locate every model."""
    _check_keys(raw, TOP_LEVEL_KEYS, "config")
    if raw.get("base_model") is None:
        raise ConfigError(
            "base_model is missing",
            where="config",
            fix="add base_model: the model whose attention, embeddings and norms are kept",
        )
    base = _model_reference(raw["base_model"], "base_model")
    if raw.get("shared_experts"):
        raise UnsupportedModelError(
            "shared_experts need a Qwen2-MoE or DeepSeek output, which jaxcombine does not "
            "write (Mixtral has no shared experts)",
            where="shared_experts",
            fix="remove shared_experts, or build this model with mergekit-moe",
        )
    _architecture(raw.get("architecture"))
    mode = raw.get("gate_mode", "hidden")
    if mode not in GATE_MODES:
        raise ConfigError(
            f"unknown gate_mode {mode!r}", where="gate_mode", fix=closest(str(mode), GATE_MODES)
        )
    k = raw.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(
            f"experts_per_token must be an integer >= 1, got {k!r}",
            where="experts_per_token",
            fix="write e.g. experts_per_token: 2",
        )
    raw_experts = raw.get("experts")
    if not isinstance(raw_experts, list) or not raw_experts:
        raise ConfigError(
            "experts must be a non-empty list",
            where="experts",
            fix="list the experts: - source_model: path\\n  positive_prompts: [...]",
        )
    if k > len(raw_experts):
        raise ConfigError(
            f"experts_per_token is {k} but there are only {len(raw_experts)} experts",
            where="experts_per_token",
            fix=f"use experts_per_token <= {len(raw_experts)}, or list more experts",
        )
    config_dir = Path(config_dir) if config_dir is not None else None
    tokenizer_source = raw.get("tokenizer_source")
    if tokenizer_source is not None and tokenizer_source not in ("base", base):
        raise ConfigError(
            f"tokenizer_source {tokenizer_source!r} is not supported: the output takes the "
            "base model's tokenizer (as mergekit-moe does)",
            where="tokenizer_source",
            fix="remove tokenizer_source (or set it to base)",
        )
    paths = {base: _locate(base, config_dir, "base_model")}
    experts = []
    for i, e in enumerate(raw_experts):
        here = f"experts[{i}]"
        if isinstance(e, str):
            e = {"source_model": e}
        _check_keys(e, EXPERT_KEYS, here)
        if e.get("source_model") is None:
            raise ConfigError(
                "source_model is missing",
                where=here,
                fix="add source_model: the dense model whose MLPs become this expert",
            )
        ref = _model_reference(e["source_model"], f"{here}.source_model")
        if ref not in paths:
            paths[ref] = _locate(ref, config_dir, f"{here}.source_model")
        experts.append(
            Expert(
                source_model=ref,
                path=paths[ref],
                positive_prompts=_prompts(e.get("positive_prompts"), f"{here}.positive_prompts"),
                negative_prompts=_prompts(e.get("negative_prompts"), f"{here}.negative_prompts"),
                noise_scale=_number(e.get("noise_scale"), f"{here}.noise_scale", minimum=0.0),
                residual_scale=_number(e.get("residual_scale"), f"{here}.residual_scale"),
            )
        )
    if mode in PROMPT_MODES:
        for i, e in enumerate(experts):
            if not e.positive_prompts:
                raise ConfigError(
                    f"expert {i} has no positive prompts; gate_mode {mode} initialises its "
                    "router rows from them",
                    where=f"experts[{i}].positive_prompts",
                    fix="add prompts that should be routed to this expert, or use "
                    "gate_mode: random",
                )
        if len(experts) > 1 and all(
            (e.positive_prompts, e.negative_prompts)
            == (experts[0].positive_prompts, experts[0].negative_prompts)
            for e in experts
        ):
            raise ConfigError(
                "every expert has the same prompts: the routers could not tell them apart",
                where="experts",
                fix="give each expert prompts that show what should be routed to it",
            )
    return MoEMergeConfig(
        base_model=base,
        base_path=paths[base],
        experts=tuple(experts),
        gate_mode=mode,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        experts_per_token=k,
        text=text,
        source=source,
    )


def load_moe_config(path: str | os.PathLike) -> MoEMergeConfig:
    """Read and check a mergekit-moe YAML file (models located on disk, nothing else read)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            "moe config file does not exist", where=str(path), fix="pass a mergekit-moe YAML file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML ({e})", where=str(path)) from None
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a YAML mapping at the top level", where=str(path))
    try:
        return parse_moe_config(raw, config_dir=path.parent, text=text, source=str(path))
    except ConfigError as e:
        raise type(e)(e.message, where=f"{path}: {e.where}", fix=e.fix) from None


# -- the plan ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: copied from ``model``'s ``tensor`` (for ``expert`` m, scaled and
    noised as that expert says), or a router (``router_layer``)."""

    name: str
    shape: tuple[int, ...]
    model: str | None = None
    tensor: str | None = None
    expert: int | None = None
    router_layer: int | None = None


@dataclass
class MoEPlan:
    """Everything :func:`run_moe` needs, checked."""

    config: MoEMergeConfig
    checkpoints: dict[str, SafetensorsCheckpoint]  # model reference -> headers
    tensors: list[OutTensor]
    out_config: dict
    dtype: np.dtype  # of every output tensor
    num_layers: int
    hidden_size: int
    prompt_ids: list[tuple[list[list[int]], list[list[int]]]]  # per expert: positive, negative

    @property
    def total_bytes(self) -> int:
        return sum(int(np.prod(t.shape)) for t in self.tensors) * self.dtype.itemsize

    def close(self) -> None:
        for c in self.checkpoints.values():
            c.close()

    def describe(self) -> str:
        """The plan as text, one line per output tensor (``--dry-run``)."""
        config = self.config
        lines = [
            f"gate_mode: {config.gate_mode}",
            f"base_model: {config.base_model} ({config.base_path})",
            f"output: Mixtral, {len(config.experts)} experts, {config.experts_per_token} per "
            f"token, {self.num_layers} layers, {len(self.tensors)} tensors, "
            f"{self.total_bytes / 1e9:.3f} GB {_dtype_name(self.dtype)}",
        ]
        for m, (e, (pos, neg)) in enumerate(zip(config.experts, self.prompt_ids, strict=True)):
            scales = (("noise_scale", e.noise_scale), ("residual_scale", e.residual_scale))
            extra = "".join(f", {k} {v:g}" for k, v in scales if v is not None)
            prompts = f"{len(pos)} positive, {len(neg)} negative prompts"
            if config.gate_mode not in PROMPT_MODES:
                prompts = f"{config.gate_mode} router rows"
            lines.append(f"expert {m}: {e.source_model} ({prompts}{extra})")
        lines.append("")
        width = max(len(t.name) for t in self.tensors)
        for t in self.tensors:
            shape = "x".join(map(str, t.shape))
            if t.router_layer is not None:
                source = f"router from {config.gate_mode}"
            else:
                source = t.model if t.tensor == t.name else f"{t.model}:{t.tensor}"
            lines.append(f"{t.name:<{width}}  {shape:>10}  <- {source}")
        return "\n".join(lines)


def _dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype.name == "bfloat16" else str(dtype)


def _read_config(path: Path, where: str) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(
            "config.json is missing", where=where, fix="point at a Hugging Face model directory"
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON ({e})", where=str(file)) from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json does not hold a JSON object", where=str(file))
    return config


def _int(config: dict, key: str, where: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(
            f"config.json has no integer {key!r} (got {value!r})",
            where=where,
            fix="point at a Llama or Mistral model directory",
        )
    return value


def _check_source_type(config: dict, ref: str, where: str, base_type: str | None) -> None:
    model_type = config.get("model_type")
    if base_type is None and model_type not in SOURCE_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} cannot become a Mixtral model (mergekit-moe would "
            "write a Qwen2-MoE or DeepSeek model, which jaxcombine does not)",
            where=where,
            fix=f"use {' or '.join(SOURCE_TYPES)} models",
        )
    if base_type is not None and model_type != base_type:
        raise ConfigError(
            f"expert {ref!r} is a {model_type!r} model but the base is {base_type!r}",
            where=where,
            fix="use experts fine-tuned from the base model (one architecture)",
        )
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise UnsupportedModelError(
                f"{key} is true, and Mixtral has no biases",
                where=where,
                fix="use a model without biases",
            )


def _base_tensors(ckpt: SafetensorsCheckpoint, cfg: dict, where: str) -> list[str]:
    """The base tensors copied to the output (all but the MLPs), checked complete."""
    L = _int(cfg, "num_hidden_layers", where)
    wanted = ["model.embed_tokens.weight"]
    for i in range(L):
        prefix = f"model.layers.{i}."
        wanted += [f"{prefix}self_attn.{p}.weight" for p in _ATTENTION]
        wanted += [f"{prefix}{n}.weight" for n in _NORMS]
    wanted.append("model.norm.weight")
    tied = cfg.get("tie_word_embeddings", False)
    if "lm_head.weight" in ckpt.infos or not tied:
        wanted.append("lm_head.weight")
    missing = [n for n in wanted if n not in ckpt.infos]
    if missing:
        raise TensorError(
            f"{len(missing)} tensor(s) are missing: {', '.join(missing[:4])}",
            where=str(ckpt.dir),
            fix="check that config.json (num_hidden_layers, tie_word_embeddings) belongs to "
            "these weights",
        )
    mlp = {f"model.layers.{i}.mlp.{p}.weight" for i in range(L) for p, _ in _MLP}
    extra = sorted(
        n for n in ckpt.infos if n not in wanted and n not in mlp and not n.endswith(_RECOMPUTED)
    )
    if extra:
        raise UnsupportedModelError(
            f"tensor(s) with no place in a Mixtral model: {', '.join(extra[:4])}",
            where=str(ckpt.dir),
            fix="use a plain Llama or Mistral base (no biases, no extra layers); "
            "jaxcombine does not drop tensors silently",
        )
    return wanted


def _check_float(ckpt: SafetensorsCheckpoint, name: str) -> None:
    dtype = ckpt.infos[name].dtype
    if not (np.issubdtype(dtype, np.floating) or dtype.name == "bfloat16"):
        raise TensorError(
            f"expected a floating-point tensor, found {dtype}", where=f"{ckpt.dir}: {name}"
        )


def _bos_text(path: Path) -> str:
    """The BOS token's text (tokenizer_config.json, else special_tokens_map.json), or ''."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = path / name
        if not file.is_file():
            continue
        try:
            bos = json.loads(file.read_text()).get("bos_token")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError("invalid JSON", where=str(file)) from None
        if isinstance(bos, dict):
            bos = bos.get("content")
        if isinstance(bos, str):
            return bos
    return ""


def tokenize_prompts(tokenizer, bos: str, prompts) -> list[list[int]]:
    """mergekit-moe's tokenisation: ``bos + prompt``, no special tokens added."""
    return [tokenizer.encode(bos + p, add_special_tokens=False).ids for p in prompts]


def _prompt_ids(config: MoEMergeConfig, vocab_size: int, max_positions: int | None):
    if config.gate_mode not in PROMPT_MODES:
        return [([], []) for _ in config.experts]
    from jaxcombine.hf._tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(config.base_path)
    except CheckpointError as e:
        raise CheckpointError(
            f"gate_mode {config.gate_mode} tokenizes the prompts with the base model's "
            f"tokenizer: {e.message}",
            where=f"base_model: {e.where}",
            fix="add the base model's tokenizer.json, or use gate_mode: random",
        ) from None
    bos = _bos_text(config.base_path)
    out = []
    for i, e in enumerate(config.experts):
        groups = []
        for key, prompts in (("positive", e.positive_prompts), ("negative", e.negative_prompts)):
            ids = tokenize_prompts(tokenizer, bos, prompts)
            for j, row in enumerate(ids):
                where = f"experts[{i}].{key}_prompts[{j}]"
                if not row:
                    raise ConfigError(
                        "prompt has no tokens (and the tokenizer has no BOS token)",
                        where=where,
                        fix="write a non-empty prompt",
                    )
                if max(row) >= vocab_size:
                    raise CheckpointError(
                        f"the tokenizer gives id {max(row)} but the base model has "
                        f"{vocab_size} embedding rows",
                        where=where,
                        fix="the base model's tokenizer.json does not belong to its weights",
                    )
                if max_positions is not None and len(row) > max_positions:
                    raise ConfigError(
                        f"prompt has {len(row)} tokens, more than the base model's "
                        f"max_position_embeddings {max_positions}",
                        where=where,
                        fix="shorten the prompt",
                    )
            groups.append(ids)
        out.append(tuple(groups))
    return out


def _out_config(base: dict, config: MoEMergeConfig, dtype: np.dtype) -> dict:
    """mergekit-moe's MixtralConfig: the base's keys, Mixtral's type and MoE keys."""
    out = {k: v for k, v in base.items() if k != "transformers_version"}
    out["architectures"] = ["MixtralForCausalLM"]
    out["model_type"] = "mixtral"
    out["num_local_experts"] = len(config.experts)
    out["num_experts_per_tok"] = config.experts_per_token
    out["sliding_window"] = None  # as mergekit-moe sets it, Mistral bases included
    out.setdefault("output_router_logits", False)
    out.setdefault("router_aux_loss_coef", 0.001)
    out.setdefault("router_jitter_noise", 0.0)
    for key in ("torch_dtype", "dtype"):
        if key in out or (key == "torch_dtype" and "dtype" not in out):
            out[key] = _dtype_name(dtype)
    return dict(sorted(out.items()))


def plan_moe(config: MoEMergeConfig, *, allow_all_same: bool = False) -> MoEPlan:
    """Check a config against the models' configs, headers and the base tokenizer, and list
    every output tensor. Reads no tensor data.

    ``allow_all_same``: allow prompt-initialised routers over copies of one model
    (mergekit-moe's ``--i-understand-this-is-not-useful-without-training``).
    """
    if (
        config.gate_mode in PROMPT_MODES
        and not allow_all_same
        and len(config.experts) > 1
        and len({e.path.resolve() for e in config.experts}) == 1
    ):
        raise ConfigError(
            "every expert is the same model: the MoE would cost more and compute the same",
            where="experts",
            fix="use different fine-tuned models; to upcycle one model for training use "
            "gate_mode: random, or pass --i-understand-this-is-not-useful-without-training",
        )
    base_where = f"base_model {config.base_model!r}"
    base_cfg = _read_config(config.base_path, base_where)
    _check_source_type(base_cfg, config.base_model, base_where, None)
    L = _int(base_cfg, "num_hidden_layers", base_where)
    E = _int(base_cfg, "hidden_size", base_where)
    F = _int(base_cfg, "intermediate_size", base_where)
    V = _int(base_cfg, "vocab_size", base_where)
    checkpoints: dict[str, SafetensorsCheckpoint] = {}
    try:
        base = checkpoints[config.base_model] = SafetensorsCheckpoint(config.base_path)
        copied = _base_tensors(base, base_cfg, base_where)
        for name in copied:
            _check_float(base, name)
        embed = base.infos["model.embed_tokens.weight"].shape
        if embed != (V, E):
            raise TensorError(
                f"shape {embed} disagrees with (vocab_size, hidden_size) = {(V, E)} in config.json",
                where=f"{base.dir}: model.embed_tokens.weight",
                fix="config.json does not belong to these weights",
            )
        want = {"gate_proj": (F, E), "up_proj": (F, E), "down_proj": (E, F)}
        for m, expert in enumerate(config.experts):
            where = f"experts[{m}] {expert.source_model!r}"
            if expert.source_model not in checkpoints:
                cfg = _read_config(expert.path, where)
                _check_source_type(cfg, expert.source_model, where, base_cfg["model_type"])
                layers = _int(cfg, "num_hidden_layers", where)
                if layers != L:
                    raise ConfigError(
                        f"expert has {layers} layers, the base model {L}",
                        where=where,
                        fix="use experts with the base model's layer count",
                    )
                checkpoints[expert.source_model] = SafetensorsCheckpoint(expert.path)
            ckpt = checkpoints[expert.source_model]
            for i in range(L):
                for proj, _ in _MLP:
                    name = f"model.layers.{i}.mlp.{proj}.weight"
                    info = ckpt.infos.get(name)
                    if info is None:
                        raise TensorError(
                            f"tensor {name!r} is missing",
                            where=str(ckpt.dir),
                            fix="experts must be dense Llama/Mistral models of the base's shape",
                        )
                    if info.shape != want[proj]:
                        raise TensorError(
                            f"shape {info.shape} differs from {want[proj]} of the base model "
                            f"(hidden_size {E}, intermediate_size {F})",
                            where=f"{ckpt.dir}: {name}",
                            fix="experts must be fine-tunes of the base model (same "
                            "hidden_size and intermediate_size)",
                        )
                    _check_float(ckpt, name)
        prompt_ids = _prompt_ids(config, V, base_cfg.get("max_position_embeddings"))
        if config.gate_mode.startswith("hidden"):  # the NNX decoder must run the base
            from jaxcombine.hf import load_config

            try:
                load_config(config.base_path)
            except ConfigError as e:
                raise type(e)(
                    f"gate_mode {config.gate_mode} runs the base model with jaxcombine's "
                    f"decoder, which cannot run it: {e.message}",
                    where=e.where,
                    fix=e.fix or "use gate_mode: cheap_embed or random for this base model",
                ) from None
    except BaseException:
        for c in checkpoints.values():
            c.close()
        raise
    dtype = config.dtype or _config_dtype(base_cfg) or base.infos[copied[0]].dtype
    dtype = np.dtype(dtype)
    X = len(config.experts)
    tensors = []
    for name in copied:
        if name.startswith("model.layers."):
            continue
        tensors.append(OutTensor(name, base.infos[name].shape, config.base_model, name))
    head = [t for t in tensors if t.name != "model.embed_tokens.weight"]
    tensors = tensors[:1]
    for i in range(L):
        prefix = f"model.layers.{i}."
        for name in copied:
            if name.startswith(prefix):
                tensors.append(OutTensor(name, base.infos[name].shape, config.base_model, name))
        moe = f"{prefix}block_sparse_moe."
        tensors.append(OutTensor(f"{moe}gate.weight", (X, E), router_layer=i))
        for m, expert in enumerate(config.experts):
            for proj, w in _MLP:
                tensors.append(
                    OutTensor(
                        f"{moe}experts.{m}.{w}.weight",
                        want[proj],
                        expert.source_model,
                        f"{prefix}mlp.{proj}.weight",
                        expert=m,
                    )
                )
    tensors += head
    return MoEPlan(
        config=config,
        checkpoints=checkpoints,
        tensors=tensors,
        out_config=_out_config(base_cfg, config, dtype),
        dtype=dtype,
        num_layers=L,
        hidden_size=E,
        prompt_ids=prompt_ids,
    )


def _config_dtype(cfg: dict) -> np.dtype | None:
    name = cfg.get("dtype") or cfg.get("torch_dtype")
    if not isinstance(name, str):
        return None
    try:
        return _dtype(name, "config.json dtype")
    except ConfigError:
        return None


# -- the routers ------------------------------------------------------------------------------


def _normalize(x: np.ndarray) -> np.ndarray:
    """``x / max(|x|, 1e-8)`` along the last axis (mergekit's clamp)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-8)


def cheap_embed_rows(embedding: np.ndarray, prompt_ids, num_layers: int) -> np.ndarray:
    """Router rows [L, X, E] from summed token embeddings (gate_mode cheap_embed).

    ``prompt_ids``: per expert, (positive, negative) lists of token id lists.
    Row m is ``n(n(sum e(pos)) - n(sum e(neg)))``, the same in every layer.
    """
    embedding = np.asarray(embedding, np.float32)

    def summed(group):
        return _normalize(sum(embedding[np.asarray(ids)].sum(0) for ids in group))

    rows = []
    for positive, negative in prompt_ids:
        v = summed(positive)
        if negative:
            v = v - summed(negative)
        rows.append(_normalize(v))
    return np.broadcast_to(np.stack(rows), (num_layers, len(rows), embedding.shape[1])).copy()


def layer_input_states(model, prompts: list[list[int]], *, average: bool = False) -> np.ndarray:
    """The residual stream entering each layer, per prompt: [L, P, E] float32.

    At each prompt's last token, or (``average``) the mean over its tokens. The
    prompts are run unpadded-equivalently: right-padded to a length bucket
    with a token mask (causal attention never lets a real token see padding),
    ``_HIDDEN_BATCH`` at a time through one jitted function of the model's state.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    num_layers = len(model.layers)

    @jax.jit
    def run(state, tokens, lengths):
        T = tokens.shape[1]
        mask = jnp.arange(T)[None, :] < lengths[:, None]  # [B, T]
        net = nnx.merge(graphdef, state)
        _, seen = nnx.capture(net, nnx.Intermediate, method_outputs=nnx.Intermediate)(
            tokens, token_mask=mask
        )
        # input of layer 0: the embedding; of layer i: the output of layer i - 1
        xs = [seen["embed_tokens"]["__call__"].get_value()[0]]
        xs += [seen["layers"][i]["__call__"].get_value()[0][0] for i in range(num_layers - 1)]
        xs = jnp.stack(xs).astype(jnp.float32)  # [L, B, T, E]
        if average:
            return (xs * mask[None, :, :, None]).sum(2) / lengths[None, :, None]
        return jnp.take_along_axis(xs, (lengths - 1)[None, :, None, None], axis=2)[:, :, 0]

    out = []
    for start in range(0, len(prompts), _HIDDEN_BATCH):
        batch = prompts[start : start + _HIDDEN_BATCH]
        T = max(len(p) for p in batch)
        T = 1 << (T - 1).bit_length() if T > 16 else 16  # a few compiled lengths
        tokens = np.zeros((_HIDDEN_BATCH, T), np.int32)
        lengths = np.ones(_HIDDEN_BATCH, np.int32)
        for j, p in enumerate(batch):
            tokens[j, : len(p)] = p
            lengths[j] = len(p)
        out.append(np.asarray(run(state, tokens, lengths))[:, : len(batch)])
    return np.concatenate(out, axis=1)


def hidden_rows(model, prompt_ids, *, average: bool = False) -> np.ndarray:
    """Router rows [L, X, E] from the base model's hidden states (gate_mode hidden*).

    Row m of layer l is ``n(mean_p h_l(p) - mean_q h_l(q))`` over expert m's
    positive prompts p and negative prompts q (see :func:`layer_input_states`).
    """
    flat = [ids for positive, negative in prompt_ids for ids in (*positive, *negative)]
    states = layer_input_states(model, flat, average=average)  # [L, P, E]
    rows, at = [], 0
    for positive, negative in prompt_ids:
        v = states[:, at : at + len(positive)].mean(1)
        at += len(positive)
        if negative:
            v = v - states[:, at : at + len(negative)].mean(1)
            at += len(negative)
        rows.append(_normalize(v))
    return np.stack(rows, axis=1)


def random_rows(key, num_layers: int, num_experts: int, hidden: int, *, uniform: bool = False):
    """Router rows [L, X, E]: standard normal, or uniform on ``[-1/sqrt(E), 1/sqrt(E))``."""
    import jax

    shape = (num_layers, num_experts, hidden)
    if uniform:
        scale = float(np.sqrt(1.0 / hidden))
        return np.asarray(jax.random.uniform(key, shape, minval=-scale, maxval=scale))
    return np.asarray(jax.random.normal(key, shape))


def router_rows(plan: MoEPlan, *, seed: int = 0) -> np.ndarray:
    """Every layer's router rows [L, X, E] float32, by the plan's gate_mode."""
    import jax

    config, L, E = plan.config, plan.num_layers, plan.hidden_size
    X = len(config.experts)
    mode = config.gate_mode
    if mode in ("random", "uniform_random"):
        key = jax.random.fold_in(jax.random.key(seed), 0)
        return random_rows(key, L, X, E, uniform=mode == "uniform_random")
    if mode == "cheap_embed":
        base = plan.checkpoints[config.base_model]
        return cheap_embed_rows(base.read("model.embed_tokens.weight"), plan.prompt_ids, L)
    import jax.numpy as jnp

    from jaxcombine.hf import load_model

    model = load_model(config.base_path, dtype=jnp.float32)
    return hidden_rows(model, plan.prompt_ids, average=mode == "hidden_avg")


# -- writing ----------------------------------------------------------------------------------


def _expert_tensor(x: np.ndarray, expert: Expert, name: str, w: str, seed: int) -> np.ndarray:
    """mergekit's noise_and_scale: ``x + noise_scale * N(0, 1)``, then down_proj (w2) times
    residual_scale, each rounded to the input dtype as torch does."""
    if expert.noise_scale is not None:
        import jax

        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        noise = np.asarray(jax.random.normal(key, x.shape, np.float32))
        x = (x.astype(np.float32) + noise * np.float32(expert.noise_scale)).astype(x.dtype)
    if w == "w2" and expert.residual_scale is not None:
        x = (x.astype(np.float32) * np.float32(expert.residual_scale)).astype(x.dtype)
    return x


def _write_sidecars(plan: MoEPlan, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
    for name in SIDECAR_FILES:
        if (plan.config.base_path / name).is_file():
            shutil.copy(plan.config.base_path / name, out / name)
    text = plan.config.text or yaml.safe_dump({"gate_mode": plan.config.gate_mode})
    (out / "mergekit_moe_config.yml").write_text(text)


def run_moe(
    plan: MoEPlan,
    out_dir,
    *,
    seed: int = 0,
    out_shard_size: str | int = "5B",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Compute the routers, then write ``plan`` into ``out_dir`` one tensor at a time.

    Returns a summary; closes the plan's files. ``seed`` keys random routers and
    expert noise.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    max_bytes = parse_size(out_shard_size)
    config = plan.config
    try:
        routers = router_rows(plan, seed=seed)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            entries = [(t.name, t.shape, plan.dtype) for t in plan.tensors]
            with ShardWriter(tmp, entries, max_shard_bytes=max_bytes) as writer:
                for t in tqdm(plan.tensors, desc="moe", disable=not progress, dynamic_ncols=True):
                    if t.router_layer is not None:
                        x = routers[t.router_layer]
                    else:
                        x = plan.checkpoints[t.model].read(t.tensor)
                        if t.expert is not None:
                            w = t.name.rsplit(".", 2)[1]
                            x = _expert_tensor(x, config.experts[t.expert], t.name, w, seed)
                    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                        raise TensorError(
                            "tensor holds NaN or Inf",
                            where=f"{t.model}: {t.tensor}" if t.model else t.name,
                            fix="use finite checkpoints (and prompts that give finite states)",
                        )
                    writer.write(t.name, np.ascontiguousarray(x.astype(plan.dtype)))
                files = writer.finish()
            _write_sidecars(plan, tmp)
    finally:
        plan.close()
    seconds = time.perf_counter() - start
    X = len(config.experts)
    return {
        "out": str(out_dir),
        "gate_mode": config.gate_mode,
        "experts": X,
        "experts_per_token": config.experts_per_token,
        "tensors": len(plan.tensors),
        "bytes": plan.total_bytes,
        "shards": len(files),
        "seconds": round(seconds, 3),
        "message": f"wrote a Mixtral model with {X} experts ({config.experts_per_token} per "
        f"token, {config.gate_mode} routers; {plan.total_bytes / 1e9:.3f} GB, "
        f"{len(files)} shard(s)) to {out_dir} in {seconds:.1f} s",
    }


__all__ = [
    "EXPERT_KEYS",
    "GATE_MODES",
    "TOP_LEVEL_KEYS",
    "Expert",
    "MoEMergeConfig",
    "MoEPlan",
    "OutTensor",
    "cheap_embed_rows",
    "hidden_rows",
    "layer_input_states",
    "load_moe_config",
    "parse_moe_config",
    "plan_moe",
    "random_rows",
    "router_rows",
    "run_moe",
    "tokenize_prompts",
]
