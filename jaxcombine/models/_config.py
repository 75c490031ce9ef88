"""Configuration of the decoder family (Llama, Mistral, Qwen2).

The config is a frozen, hashable dataclass: it lives in the NNX graph
definition as static data, so two models with equal configs share compiled
code. Reading and writing Hugging Face ``config.json`` lives in
:mod:`jaxcombine.hf`; this module knows nothing about files.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

from jaxcombine.errors import ConfigError

if TYPE_CHECKING:
    from jaxcombine.moe.layer import MoEConfig

RopeType = Literal["default", "linear", "llama3"]
LayerType = Literal["full_attention", "sliding_attention"]

ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding settings, as HF's ``rope_parameters``.

    ``default``: inv_freq_i = theta^(-2i/d). ``linear``: inv_freq / factor.
    ``llama3``: Llama 3.1's frequency-dependent scaling (long wavelengths
    divided by ``factor``, short ones kept, a smooth ramp in between).

    >>> from jaxcombine.models._rope import inverse_frequencies
    >>> print(inverse_frequencies(RopeConfig(), head_dim=4))      # 10000^(-0/4), 10000^(-2/4)
    [1.   0.01]
    >>> print(inverse_frequencies(RopeConfig(type="linear", factor=2.0), head_dim=4))
    [0.5   0.005]

    References: Su et al. 2021, RoFormer: Enhanced Transformer with Rotary Position Embedding,
    arXiv:2104.09864; ``linear``: Chen et al. 2023, Extending Context Window of Large Language
    Models via Positional Interpolation, arXiv:2306.15595; ``llama3``: Llama Team 2024, The Llama 3
    Herd of Models, arXiv:2407.21783.
    """

    theta: float = 10000.0
    type: RopeType = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """A pre-norm decoder-only transformer with RoPE, GQA and a SwiGLU MLP.

    Covers HF ``llama``, ``mistral`` and ``qwen2``: ``qkv_bias`` (Qwen2,
    Llama's ``attention_bias``), ``o_bias`` (Llama's ``attention_bias``),
    ``mlp_bias`` (Llama), ``sliding_window`` with per-layer ``layer_types``
    (Mistral on every layer; Qwen2 from ``max_window_layers`` on).
    ``dropout_rate`` is residual dropout after attention and MLP; it is used
    only when a dropout key is passed to the forward (MC dropout).

    ``moe``: a sparse mixture-of-experts FFN (:class:`jaxcombine.moe.MoEConfig`)
    replaces the dense MLP on every ``moe_layer_step``-th layer (layers
    ``i`` with ``(i + 1) % moe_layer_step == 0``, Qwen2-MoE's
    ``decoder_sparse_step``); HF ``mixtral`` is ``moe_layer_step=1``.

    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=4, num_kv_heads=2, head_dim=2, sliding_window=4,
    ...                        layer_types=("sliding_attention", "full_attention"))
    >>> config.num_groups, config.window_of_layer(0), config.window_of_layer(1)
    (2, 4, None)
    >>> DecoderConfig(16, 8, 8, 2, 2, 3, 4)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: config key 'num_key_value_heads': num_attention_heads=2 ...

    References: Touvron et al. 2023, LLaMA: Open and Efficient Foundation Language Models,
    arXiv:2302.13971; RoPE: arXiv:2104.09864; GQA: Ainslie et al. 2023, arXiv:2305.13245; SwiGLU:
    Shazeer 2020, GLU Variants Improve Transformer, arXiv:2002.05202.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[LayerType, ...] | None = None
    dropout_rate: float = 0.0
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    moe: MoEConfig | None = None
    moe_layer_step: int = 1

    def __post_init__(self):
        positive = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "max_position_embeddings",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"{name} must be a positive integer, got {value!r}",
                    where=f"config key {name!r}",
                    fix="set it to a positive integer",
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_heads} is not a multiple of "
                f"num_key_value_heads={self.num_kv_heads}",
                where="config key 'num_key_value_heads'",
                fix="grouped-query attention needs heads divisible by key/value heads",
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}",
                where="config key 'hidden_act'",
            )
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ConfigError(
                f"dropout_rate must be in [0, 1), got {self.dropout_rate}",
                where="config key 'dropout_rate'",
            )
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers",
                    where="config key 'layer_types'",
                    fix="give one entry per layer",
                )
            bad = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
            if bad:
                raise ConfigError(
                    f"unsupported layer types {bad}; supported: full_attention, sliding_attention",
                    where="config key 'layer_types'",
                )
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ConfigError(
                    "layer_types asks for sliding_attention but sliding_window is not set",
                    where="config key 'sliding_window'",
                    fix="set sliding_window to the window length in tokens",
                )

        if self.moe is not None:
            if self.moe.hidden_size != self.hidden_size:
                raise ConfigError(
                    f"the MoE layer's hidden_size {self.moe.hidden_size} differs from the "
                    f"decoder's {self.hidden_size}",
                    where="DecoderConfig.moe.hidden_size",
                    fix="build the MoEConfig with the decoder's hidden_size",
                )
            if not isinstance(self.moe_layer_step, int) or self.moe_layer_step < 1:
                raise ConfigError(
                    f"moe_layer_step must be a positive integer, got {self.moe_layer_step!r}",
                    where="DecoderConfig.moe_layer_step",
                    fix="1 puts an MoE FFN on every layer, 2 on every second layer, ...",
                )

    def is_moe_layer(self, layer: int) -> bool:
        """Whether ``layer``'s FFN is the sparse MoE (else the dense MLP)."""
        return self.moe is not None and (layer + 1) % self.moe_layer_step == 0

    @property
    def has_mixtral_moe(self) -> bool:
        """MoE layers as HF Mixtral computes them: on every layer, dropless top-k token
        choice with renormalised weights, gated experts with the decoder's activation,
        no attention biases."""
        moe = self.moe
        return (
            moe is not None
            and self.moe_layer_step == 1
            and moe.routing == "token_choice"
            and moe.capacity_factor is None
            and moe.renormalize
            and moe.gated
            and moe.activation == self.hidden_act
            and not (self.qkv_bias or self.o_bias or self.mlp_bias)
        )

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head."""
        return self.num_heads // self.num_kv_heads

    def window_of_layer(self, layer: int) -> int | None:
        """The sliding-window length of ``layer``, or None for full attention."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None

    def replace(self, **changes) -> DecoderConfig:
        return dataclasses.replace(self, **changes)
