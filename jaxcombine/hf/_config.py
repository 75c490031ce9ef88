"""Hugging Face ``config.json`` <-> :class:`~jaxcombine.models.DecoderConfig`.

Both forms that transformers writes are read: the older one with top-level
``rope_theta`` and ``rope_scaling`` (transformers 4) and the ``rope_parameters``
form (transformers 5). On writing, the form of the source config is kept; a
config made from scratch is written in the older form, which every
transformers version reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from jaxcombine.errors import ConfigError, UnsupportedModelError
from jaxcombine.models import DecoderConfig, RopeConfig
from jaxcombine.moe import MoEConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``config.json`` of a model directory.

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> _ = (Path(tmp.name) / "config.json").write_text('{"model_type": "qwen2"}')
    >>> read_hf_config(tmp.name)
    {'model_type': 'qwen2'}
    >>> tmp.cleanup()
    """
    path = Path(model_dir) / "config.json"
    if not path.exists():
        raise ConfigError(
            "config.json is missing",
            where=str(model_dir),
            fix="a Hugging Face model directory needs its config.json",
        )
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"invalid JSON ({e})", where=str(path)) from None
    if not isinstance(config, dict):
        raise ConfigError("config.json does not hold a JSON object", where=str(path))
    return config


def _require(hf: dict, key: str, where: str):
    if key not in hf:
        raise ConfigError(
            f"required key {key!r} is missing", where=where, fix=f"add {key!r} to config.json"
        )
    return hf[key]


def _rope_config(hf: dict, where: str) -> RopeConfig:
    params = hf.get("rope_parameters")
    if (
        isinstance(params, dict)
        and "rope_type" not in params
        and any(isinstance(v, dict) for v in params.values())
    ):
        raise UnsupportedModelError(
            "per-layer-type rope_parameters are not supported", where=f"{where}: rope_parameters"
        )
    if params is None:
        params = dict(hf.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(
            f"rope type {rope_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}",
            where=f"{where}: rope_parameters / rope_scaling",
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedModelError(
            "partial_rotary_factor != 1 is not supported", where=f"{where}: partial_rotary_factor"
        )
    rope = RopeConfig(theta=float(params.get("rope_theta", 10000.0)), type=rope_type)
    if rope_type == "linear":
        rope = RopeConfig(theta=rope.theta, type="linear", factor=float(params["factor"]))
    elif rope_type == "llama3":
        try:
            rope = RopeConfig(
                theta=rope.theta,
                type="llama3",
                factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]),
            )
        except KeyError as e:
            raise ConfigError(
                f"llama3 rope scaling needs {e.args[0]!r}", where=f"{where}: rope_parameters"
            ) from None
    return rope


def _layer_types(hf: dict, model_type: str, num_layers: int):
    """(sliding_window, layer_types) as transformers resolves them per family."""
    window = hf.get("sliding_window")
    if model_type == "llama":
        return None, None
    if model_type == "qwen2" and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, None
    if hf.get("layer_types"):
        return int(window), tuple(hf["layer_types"])
    if model_type == "qwen2":
        first = hf.get("max_window_layers", num_layers)
        return int(window), tuple(
            "sliding_attention" if i >= first else "full_attention" for i in range(num_layers)
        )
    return int(window), None  # mistral, mixtral: every layer


def _mixtral_moe(hf: dict, where: str) -> MoEConfig:
    """Mixtral's sparse MoE block: dropless top-k of a softmax, weights renormalised."""
    return MoEConfig(
        num_experts=_require(hf, "num_local_experts", where),
        hidden_size=_require(hf, "hidden_size", where),
        intermediate_size=_require(hf, "intermediate_size", where),
        num_experts_per_token=_require(hf, "num_experts_per_tok", where),
        capacity_factor=None,
        renormalize=True,
        activation=hf.get("hidden_act", "silu"),
        router_jitter=float(hf.get("router_jitter_noise") or 0.0),
    )


def config_from_hf(hf: dict[str, Any], *, where: str = "config.json") -> DecoderConfig:
    """Translate a transformers config dict into a :class:`DecoderConfig`, with
    transformers' defaults (``num_key_value_heads``: the head count, ``head_dim``:
    hidden / heads; Qwen2: q/k/v biases; rope from ``rope_scaling`` or
    ``rope_parameters``).

    >>> config = config_from_hf({"model_type": "qwen2", "vocab_size": 16, "hidden_size": 8,
    ...     "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
    ...     "rope_theta": 1e6, "eos_token_id": [1, 2]})
    >>> config.num_kv_heads, config.head_dim, config.qkv_bias, config.rope.theta
    (2, 4, True, 1000000.0)
    >>> config.eos_token_ids
    (1, 2)
    """
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
            where=f"{where}: model_type",
            fix="use a checkpoint of a supported family",
        )
    hidden = _require(hf, "hidden_size", where)
    heads = _require(hf, "num_attention_heads", where)
    num_layers = _require(hf, "num_hidden_layers", where)
    window, layer_types = _layer_types(hf, model_type, num_layers)
    eos = hf.get("eos_token_id")
    eos_ids = () if eos is None else tuple(eos) if isinstance(eos, list) else (eos,)
    attention_bias = bool(hf.get("attention_bias", False))
    return DecoderConfig(
        vocab_size=_require(hf, "vocab_size", where),
        hidden_size=hidden,
        intermediate_size=_require(hf, "intermediate_size", where),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hidden // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope=_rope_config(hf, where),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or (model_type == "llama" and attention_bias),
        o_bias=model_type == "llama" and attention_bias,
        mlp_bias=model_type == "llama" and bool(hf.get("mlp_bias", False)),
        hidden_act=hf.get("hidden_act", "silu"),
        sliding_window=window,
        layer_types=layer_types,
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=hf.get("pad_token_id"),
        moe=_mixtral_moe(hf, where) if model_type == "mixtral" else None,
    )


def config_to_hf(
    config: DecoderConfig, *, base: dict[str, Any] | None = None, dtype: str = "float32"
) -> dict[str, Any]:
    """A transformers config dict for ``config``, keeping ``base``'s other keys and form.

    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=1,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> hf = config_to_hf(config, base={"rope_parameters": {}, "use_cache": True})
    >>> hf["architectures"], hf["rope_parameters"], hf["use_cache"]
    (['LlamaForCausalLM'], {'rope_type': 'default', 'rope_theta': 10000.0}, True)
    >>> config_from_hf(hf) == config                          # the round trip is exact
    True
    """
    hf = dict(base or {})
    model_type = config.model_type
    _check_writable(config)
    eos = list(config.eos_token_ids)
    hf.update(
        architectures=[_ARCHITECTURES[model_type]],
        model_type=model_type,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        tie_word_embeddings=config.tie_word_embeddings,
        hidden_act=config.hidden_act,
        bos_token_id=config.bos_token_id,
        eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
        pad_token_id=config.pad_token_id,
    )
    if model_type == "llama":
        hf.update(attention_bias=config.qkv_bias, mlp_bias=config.mlp_bias)
    if model_type == "mixtral":
        hf.update(
            num_local_experts=config.moe.num_experts,
            num_experts_per_tok=config.moe.num_experts_per_token,
            router_jitter_noise=config.moe.router_jitter,
        )
    if model_type in ("mistral", "mixtral", "qwen2"):
        hf["sliding_window"] = config.sliding_window
    if model_type == "qwen2":
        hf["use_sliding_window"] = config.sliding_window is not None
    if config.layer_types is not None:
        hf["layer_types"] = list(config.layer_types)
    hf["dtype" if "dtype" in hf or "torch_dtype" not in hf else "torch_dtype"] = dtype

    rope = {"rope_type": config.rope.type, "rope_theta": config.rope.theta}
    if config.rope.type in ("linear", "llama3"):
        rope["factor"] = config.rope.factor
    if config.rope.type == "llama3":
        rope.update(
            low_freq_factor=config.rope.low_freq_factor,
            high_freq_factor=config.rope.high_freq_factor,
            original_max_position_embeddings=config.rope.original_max_position_embeddings,
        )
    if "rope_parameters" in hf:
        hf["rope_parameters"] = rope
    else:
        hf["rope_theta"] = rope.pop("rope_theta")
        hf["rope_scaling"] = rope if config.rope.type != "default" else None
    return hf


def _check_writable(config: DecoderConfig) -> None:
    """Only what an HF family computes can be written as that family."""
    moe = config.moe
    if config.model_type != "mixtral":
        if moe is not None:
            raise UnsupportedModelError(
                f"a {config.model_type} model with sparse MoE layers has no Hugging Face "
                "architecture",
                where="DecoderConfig.moe",
                fix="use model_type='mixtral' (MoE on every layer, as Mixtral computes), or keep "
                "the model in Orbax checkpoints",
            )
        return
    if not config.has_mixtral_moe:
        raise UnsupportedModelError(
            "this MoE configuration is not what HF Mixtral computes (Mixtral: an MoE FFN on "
            "every layer, dropless top-k token choice with renormalised weights, gated experts "
            "with the decoder's activation, no attention biases)",
            where="DecoderConfig.moe",
            fix="set moe_layer_step=1, capacity_factor=None, renormalize=True, gated=True and the "
            "decoder's hidden_act, or keep the model in Orbax checkpoints",
        )
