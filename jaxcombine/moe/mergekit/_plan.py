"""The MoE plan: models' configs, headers and the base tokenizer checked, every output
tensor listed, no tensor data read."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from jaxcombine.errors import CheckpointError, ConfigError, TensorError, UnsupportedModelError
from jaxcombine.hf._safetensors import SafetensorsCheckpoint
from jaxcombine.merging.mergekit._config import _dtype, _dtype_name
from jaxcombine.merging.mergekit._plan import read_model_config
from jaxcombine.moe.mergekit._config import PROMPT_MODES, MoEMergeConfig
from jaxcombine.moe.mergekit._routers import _prompt_ids

SOURCE_TYPES = ("llama", "mistral")  # what mergekit-moe turns into Mixtral
_MLP = (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3"))
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_NORMS = ("input_layernorm", "post_attention_layernorm")
_RECOMPUTED = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: copied from ``model``'s ``tensor`` (for ``expert`` m, scaled and
    noised as that expert says), or a router (``router_layer``).

    >>> OutTensor("model.layers.0.block_sparse_moe.gate.weight", (2, 4), router_layer=0).model
    """

    name: str
    shape: tuple[int, ...]
    model: str | None = None
    tensor: str | None = None
    expert: int | None = None
    router_layer: int | None = None


@dataclass
class MoEPlan:
    """Everything :func:`run_moe` needs, checked (made by :func:`plan_moe`, which has
    an example): the open checkpoints, every output tensor, the output config.

    >>> from pathlib import Path
    >>> from jaxcombine.moe.mergekit import Expert, MoEMergeConfig
    >>> config = MoEMergeConfig("base", Path("base"), (Expert("a", Path("a")),), "random")
    >>> plan = MoEPlan(config, {}, [OutTensor("w", (2, 4))], {}, np.dtype("float32"),
    ...                num_layers=1, hidden_size=4, prompt_ids=[([], [])])
    >>> plan.total_bytes                                    # 2 * 4 float32
    32
    """

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

    Two tiny random Llamas as experts of a third (the base):

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from jaxcombine.hf import config_from_hf, decoder_tensor_maps, write_shards
    >>> from jaxcombine.moe.mergekit import parse_moe_config, plan_moe
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name)
    >>> hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4,
    ...       "intermediate_size": 6, "num_hidden_layers": 1, "num_attention_heads": 2}
    >>> shapes = {m.hf_name: m.hf_shape for m in decoder_tensor_maps(config_from_hf(hf))}
    >>> for seed, name in enumerate(["base", "code", "math"]):   # tiny random Llamas
    ...     (root / name).mkdir(); _ = (root / name / "config.json").write_text(json.dumps(hf))
    ...     rng = np.random.default_rng(seed)
    ...     tensors = ((n, rng.normal(size=s).astype(np.float32)) for n, s in shapes.items())
    ...     _ = write_shards(tensors, root / name, max_shard_bytes=10**9)
    >>> config = parse_moe_config({"base_model": "base", "gate_mode": "random", "experts": [
    ...     {"source_model": "code"}, {"source_model": "math", "residual_scale": 0.5}]},
    ...     config_dir=root)
    >>> plan = plan_moe(config)
    >>> print(plan.describe())
    gate_mode: random
    base_model: base (...)
    output: Mixtral, 2 experts, 2 per token, 1 layers, 16 tensors, 0.000 GB float32
    expert 0: code (random router rows)
    expert 1: math (random router rows, residual_scale 0.5)
    <BLANKLINE>
    model.embed_tokens.weight ... <- base
    ...
    model.layers.0.block_sparse_moe.gate.weight   2x4  <- router from random
    model.layers.0.block_sparse_moe.experts.0.w1.weight   6x4  <- code:model.layers.0.mlp...
    ...
    >>> plan.close(); tmp.cleanup()

    References: mergekit-moe, part of MergeKit (Goddard et al. 2024, Arcee's MergeKit: A Toolkit for
    Merging Large Language Models, arXiv:2403.13257); the output is a Mixtral: Jiang et al. 2024,
    Mixtral of Experts, arXiv:2401.04088.
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
    base_cfg = read_model_config(config.base_path, base_where)
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
                cfg = read_model_config(expert.path, where)
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
