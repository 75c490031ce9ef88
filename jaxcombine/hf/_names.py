"""Tensor names and layouts: HF checkpoints <-> the NNX decoder's parameter paths.

HF stores ``nn.Linear`` weights as [out, in]; the NNX decoder keeps kernels
as [in, out] with the head axes split out, so attention is sharded by head:

    q_proj.weight [H*D, E]  <->  self_attn/q_proj/kernel [E, H, D]
    k_proj.weight [K*D, E]  <->  self_attn/k_proj/kernel [E, K, D]
    o_proj.weight [E, H*D]  <->  self_attn/o_proj/kernel [H, D, E]
    gate_proj.weight [F, E] <->  mlp/gate_proj/kernel [E, F]
    lm_head.weight [V, E]   <->  lm_head/kernel [E, V]

Mixtral's sparse MoE layers (``moe`` in the NNX model) stack the experts:

    block_sparse_moe.gate.weight [X, E]          <->  moe/router [E, X]
    block_sparse_moe.experts.m.w1.weight [F, E]  <->  moe/gate [m] of [X, E, F]
    block_sparse_moe.experts.m.w3.weight [F, E]  <->  moe/up [m]   of [X, E, F]
    block_sparse_moe.experts.m.w2.weight [E, F]  <->  moe/down [m] of [X, F, E]

(X experts; these are the hub files' names, which every transformers version
reads and transformers 5 still writes). transformers 5 holds the experts
fused in memory, and a state dict saved from it has

    mlp.gate.weight [X, E]; mlp.experts.gate_up_proj [X, 2F, E] (gate rows
    first); mlp.experts.down_proj [X, E, F]

which :func:`decoder_tensor_maps` reads with ``layout="fused"`` (read only).
A map with ``expert=m`` fills slice ``m`` of a stacked parameter.

Every map is a transpose and a reshape, so the round trip is bit-exact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import numpy as np

from jaxcombine.models import DecoderConfig

Path = tuple  # an NNX state path, e.g. ("layers", 0, "self_attn", "q_proj", "kernel")

# Buffers some older checkpoints carry that the model recomputes; read and checked
# to exist only by name, never used.
RECOMPUTED_BUFFERS = ("rotary_emb.inv_freq",)


MoELayout = Literal["experts", "fused"]


class TensorMap(NamedTuple):
    """One HF tensor and the model parameter it fills: ``to_model`` maps the HF
    layout to the parameter's (``expert``: a slice of a stacked parameter),
    ``to_hf`` back.

    >>> m = _linear("q_proj.weight", ("q_proj", "kernel"), (2, 4), (8,))   # [H*D, E]
    >>> w = np.arange(64.0).reshape(8, 8)
    >>> m.hf_shape, m.to_model(w).shape, np.array_equal(m.to_hf(m.to_model(w)), w)
    ((8, 8), (8, 2, 4), True)
    """

    hf_name: str
    path: Path
    hf_shape: tuple[int, ...]
    to_model: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray] | None  # None: a read-only layout
    expert: int | None = None  # the slice of a stacked [X, ...] parameter this fills


def _identity(x):
    return x


def _linear(hf_name, path, out_shape, in_shape) -> TensorMap:
    """An HF [prod(out), prod(in)] weight <-> a kernel [*in, *out]."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return TensorMap(
        hf_name,
        path,
        (n_out, n_in),
        lambda w: w.T.reshape(*in_shape, *out_shape),
        lambda k: k.reshape(n_in, n_out).T,
    )


def _vector(hf_name, path, shape) -> TensorMap:
    size = int(np.prod(shape))
    return TensorMap(hf_name, path, (size,), lambda b: b.reshape(shape), lambda b: b.reshape(size))


def _moe_maps(config: DecoderConfig, hf: str, path: Path, layout: MoELayout) -> list[TensorMap]:
    """A Mixtral MoE block's tensors (see the module docstring)."""
    X, E, F = config.moe.num_experts, config.hidden_size, config.moe.intermediate_size
    if layout == "fused":
        return [
            TensorMap(hf + "mlp.gate.weight", path + ("router",), (X, E), _t, _t),
            TensorMap(
                hf + "mlp.experts.gate_up_proj", path + ("gate",), (X, 2 * F, E),
                lambda w: w[:, :F].transpose(0, 2, 1), None,
            ),
            TensorMap(
                hf + "mlp.experts.gate_up_proj", path + ("up",), (X, 2 * F, E),
                lambda w: w[:, F:].transpose(0, 2, 1), None,
            ),
            TensorMap(
                hf + "mlp.experts.down_proj", path + ("down",), (X, E, F),
                lambda w: w.transpose(0, 2, 1), None,
            ),
        ]  # fmt: skip
    hf += "block_sparse_moe."
    maps = [TensorMap(hf + "gate.weight", path + ("router",), (X, E), _t, _t)]
    for m in range(X):
        expert = f"{hf}experts.{m}."
        maps += [
            TensorMap(expert + "w1.weight", path + ("gate",), (F, E), _t, _t, m),
            TensorMap(expert + "w2.weight", path + ("down",), (E, F), _t, _t, m),
            TensorMap(expert + "w3.weight", path + ("up",), (F, E), _t, _t, m),
        ]
    return maps


def _t(w):
    return w.T


def decoder_tensor_maps(
    config: DecoderConfig, *, moe_layout: MoELayout = "experts"
) -> list[TensorMap]:
    """Every tensor of an HF checkpoint of ``config``, in the checkpoint's usual order.

    ``moe_layout``: how MoE layers are stored: per-expert hub names
    (``"experts"``, read and written) or transformers 5's fused tensors
    (``"fused"``, read only).

    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=12, num_layers=1,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> for m in decoder_tensor_maps(config)[:4]:
    ...     print(m.hf_name, m.hf_shape, "/".join(map(str, m.path)))
    model.embed_tokens.weight (16, 8) embed_tokens/embedding
    model.layers.0.input_layernorm.weight (8,) layers/0/input_layernorm/scale
    model.layers.0.self_attn.q_proj.weight (8, 8) layers/0/self_attn/q_proj/kernel
    model.layers.0.self_attn.k_proj.weight (4, 8) layers/0/self_attn/k_proj/kernel
    >>> len(decoder_tensor_maps(config)), decoder_tensor_maps(config)[-1].hf_name
    (12, 'lm_head.weight')
    """
    E, F, V = config.hidden_size, config.intermediate_size, config.vocab_size
    H, K, D = config.num_heads, config.num_kv_heads, config.head_dim
    maps = [
        TensorMap(
            "model.embed_tokens.weight", ("embed_tokens", "embedding"), (V, E), _identity, _identity
        )
    ]
    for i in range(config.num_layers):
        hf = f"model.layers.{i}."
        nnx = ("layers", i)
        attn = nnx + ("self_attn",)
        maps += [
            TensorMap(
                hf + "input_layernorm.weight",
                nnx + ("input_layernorm", "scale"),
                (E,),
                _identity,
                _identity,
            ),
            _linear(hf + "self_attn.q_proj.weight", attn + ("q_proj", "kernel"), (H, D), (E,)),
            _linear(hf + "self_attn.k_proj.weight", attn + ("k_proj", "kernel"), (K, D), (E,)),
            _linear(hf + "self_attn.v_proj.weight", attn + ("v_proj", "kernel"), (K, D), (E,)),
            _linear(hf + "self_attn.o_proj.weight", attn + ("o_proj", "kernel"), (E,), (H, D)),
        ]
        if config.qkv_bias:
            maps += [
                _vector(hf + "self_attn.q_proj.bias", attn + ("q_proj", "bias"), (H, D)),
                _vector(hf + "self_attn.k_proj.bias", attn + ("k_proj", "bias"), (K, D)),
                _vector(hf + "self_attn.v_proj.bias", attn + ("v_proj", "bias"), (K, D)),
            ]
        if config.o_bias:
            maps.append(_vector(hf + "self_attn.o_proj.bias", attn + ("o_proj", "bias"), (E,)))
        maps.append(
            TensorMap(
                hf + "post_attention_layernorm.weight",
                nnx + ("post_attention_layernorm", "scale"),
                (E,),
                _identity,
                _identity,
            )
        )
        if config.is_moe_layer(i):
            maps += _moe_maps(config, hf, nnx + ("moe",), moe_layout)
            continue
        for name, out_dim, in_dim in (("gate_proj", F, E), ("up_proj", F, E), ("down_proj", E, F)):
            maps.append(
                _linear(
                    hf + f"mlp.{name}.weight", nnx + ("mlp", name, "kernel"), (out_dim,), (in_dim,)
                )
            )
            if config.mlp_bias:
                maps.append(
                    _vector(hf + f"mlp.{name}.bias", nnx + ("mlp", name, "bias"), (out_dim,))
                )
    maps.append(TensorMap("model.norm.weight", ("norm", "scale"), (E,), _identity, _identity))
    if not config.tie_word_embeddings:
        maps.append(_linear("lm_head.weight", ("lm_head", "kernel"), (V,), (E,)))
    return maps


def is_recomputed_buffer(hf_name: str) -> bool:
    return hf_name.endswith(RECOMPUTED_BUFFERS)
