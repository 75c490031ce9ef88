"""Sparse upcycling: a dense decoder becomes a mixture-of-experts decoder.

Komatsuzaki et al. 2023, "Sparse Upcycling" (arXiv:2212.05055): every expert
of an MoE layer starts as a copy of the dense layer's MLP, and a new router is
initialised at random; attention, norms and embeddings are copied unchanged.
With top-k weights renormalised over the k chosen experts (Mixtral) and no
token dropped, the MoE output at initialisation is

    sum_k w_k MLP(x) = MLP(x)            (sum_k w_k = 1)

so the upcycled model computes the same function as the dense one, whatever
the router; training then lets the experts diverge. (Without renormalisation
the output is scaled by the chosen experts' probability mass, and with a
capacity, dropped tokens lose their FFN: neither is the dense function.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.errors import UnsupportedModelError
from jaxcombine.models import Decoder
from jaxcombine.moe.layer import MoEConfig

_ROUTER_STD = 0.02


def upcycle(
    model: Decoder,
    *,
    num_experts: int,
    num_experts_per_token: int = 2,
    moe_layer_step: int = 1,
    rngs: nnx.Rngs,
    **moe_options,
) -> Decoder:
    """A copy of ``model`` whose MLPs (every ``moe_layer_step``-th) are sparse MoE layers.

    Each expert is a copy of the layer's dense MLP; routers are drawn from
    N(0, 0.02^2) with ``rngs``. ``moe_options`` go to :class:`MoEConfig`
    (default: dropless, renormalised, as Mixtral; the model then computes the
    dense function at initialisation). A Llama or Mistral model upcycled on
    every layer with Mixtral's routing gets ``model_type="mixtral"``, so it
    can be written with :func:`jaxcombine.hf.save_model`.

    A two-layer Llama upcycled to four experts: every expert is the dense MLP.

    >>> import numpy as np
    >>> from jaxcombine.models import DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    >>> dense = Decoder(config, rngs=nnx.Rngs(0))
    >>> moe = upcycle(dense, num_experts=4, rngs=nnx.Rngs(1))
    >>> moe.config.model_type, moe.layers[1].moe.up.shape, moe.layers[1].moe.router.shape
    ('mixtral', (4, 8, 8), (8, 4))
    >>> mlp, experts = dense.layers[1].mlp, moe.layers[1].moe
    >>> all(np.array_equal(experts.up[...][e], mlp.up_proj.kernel[...])
    ...     and np.array_equal(experts.down[...][e], mlp.down_proj.kernel[...]) for e in range(4))
    True

    (tests/test_mixtral.py checks the logits against transformers' dense Llama.)

    With an HF checkpoint: ``save_model(upcycle(load_model("tiny-llama"),
    num_experts=8, rngs=nnx.Rngs(0)), "tiny-llama-8x")`` writes a Mixtral directory.

    References: Komatsuzaki et al. 2023, Sparse Upcycling: Training Mixture-of-Experts from Dense
    Checkpoints, arXiv:2212.05055.
    """
    dense = model.config
    if dense.moe is not None:
        raise UnsupportedModelError(
            "the model already has MoE layers",
            where="upcycle(model)",
            fix="upcycle a dense model",
        )
    if dense.mlp_bias:
        raise UnsupportedModelError(
            "the dense MLP has biases, which the experts do not carry",
            where="upcycle(model): config mlp_bias",
            fix="upcycle a model without MLP biases",
        )
    moe_options.setdefault("capacity_factor", None)
    moe = MoEConfig(
        num_experts=num_experts,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_experts_per_token=num_experts_per_token,
        activation=dense.hidden_act,
        **moe_options,
    )
    config = dense.replace(moe=moe, moe_layer_step=moe_layer_step)
    if config.model_type in ("llama", "mistral") and config.has_mixtral_moe:
        config = config.replace(model_type="mixtral")
    dtype = model.embed_tokens.embedding.get_value().dtype
    # Shapes only: every value is copied or drawn below, so nothing is initialised twice.
    abstract = nnx.eval_shape(lambda: Decoder(config, dtype=dtype, rngs=nnx.Rngs(0)))
    graphdef, target = nnx.split(abstract, nnx.Param)
    copied = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    flat = []
    for path, variable in nnx.to_flat_state(target):
        flat.append((path, variable.replace(_initial_value(path, variable, copied, rngs))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _initial_value(path, variable, dense_params, rngs) -> jax.Array:
    """A copied dense value, an expert stack of the dense MLP, or a new router."""
    if path in dense_params:
        return dense_params[path].get_value()
    *layer, _, name = path  # (..., "moe", name)
    shape, dtype = variable.get_value().shape, variable.get_value().dtype
    if name == "router":
        return _ROUTER_STD * jax.random.normal(rngs.params(), shape, dtype)
    dense_name = {"up": "up_proj", "gate": "gate_proj", "down": "down_proj"}[name]
    kernel = dense_params[(*layer, "mlp", dense_name, "kernel")].get_value()
    return jnp.broadcast_to(kernel, shape).astype(dtype)
