"""mergekit-moe's YAML configuration, read and checked before any checkpoint is opened."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxcombine.errors import ConfigError, UnsupportedModelError, closest
from jaxcombine.merging.mergekit._config import (
    _check_keys,
    _dtype,
    _load_yaml,
    _locate,
    _model_reference,
)

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


@dataclass(frozen=True)
class Expert:
    """One expert: its model and the prompts that initialise its router rows
    (``noise_scale``, ``residual_scale``: mergekit-moe's per-expert options).

    >>> Expert("code", Path("models/code"), positive_prompts=("def f(x):",)).residual_scale
    """

    source_model: str
    path: Path
    positive_prompts: tuple[str, ...] = ()
    negative_prompts: tuple[str, ...] = ()
    noise_scale: float | None = None
    residual_scale: float | None = None


@dataclass(frozen=True)
class MoEMergeConfig:
    """A validated mergekit-moe configuration (made by :func:`parse_moe_config` or
    :func:`load_moe_config`, which have examples).

    >>> MoEMergeConfig("base", Path("base"), (Expert("code", Path("code")),)).gate_mode
    'hidden'
    """

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
    """Check a mergekit-moe config (a dict as read from YAML) and locate every model
    (relative paths are looked up beside ``config_dir``); reads no file.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name)
    >>> for name in ("base", "code", "math"):
    ...     (root / name).mkdir()
    >>> config = parse_moe_config({"base_model": "base", "gate_mode": "cheap_embed",
    ...     "experts": [{"source_model": "code", "positive_prompts": ["def f(x):"]},
    ...                 {"source_model": "math", "positive_prompts": ["2 + 2 ="]}]},
    ...     config_dir=root)
    >>> [e.source_model for e in config.experts], config.experts_per_token
    (['code', 'math'], 2)
    >>> config.experts[1].path == root / "math"
    True
    >>> tmp.cleanup()
    """
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
    """Read and check a mergekit-moe YAML file (models located on disk, nothing else read).

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name)
    >>> for name in ("base", "code", "math"):
    ...     (root / name).mkdir()
    >>> _ = (root / "moe.yml").write_text('''
    ... base_model: base
    ... gate_mode: random
    ... experts_per_token: 1
    ... experts:
    ...   - source_model: code
    ...   - source_model: math
    ...     noise_scale: 0.01
    ... ''')
    >>> config = load_moe_config(root / "moe.yml")
    >>> config.gate_mode, config.experts_per_token, config.experts[1].noise_scale
    ('random', 1, 0.01)
    >>> tmp.cleanup()
    """
    return _load_yaml(path, parse_moe_config, kind="moe", tool="mergekit-moe")
