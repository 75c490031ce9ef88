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

    from jaxcombine.moe.mergekit import load_moe_config, plan_moe, run_moe

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

from jaxcombine.moe.mergekit._config import (
    EXPERT_KEYS,
    GATE_MODES,
    TOP_LEVEL_KEYS,
    Expert,
    MoEMergeConfig,
    load_moe_config,
    parse_moe_config,
)
from jaxcombine.moe.mergekit._plan import MoEPlan, OutTensor, plan_moe
from jaxcombine.moe.mergekit._routers import (
    cheap_embed_rows,
    hidden_rows,
    layer_input_states,
    random_rows,
    router_rows,
    tokenize_prompts,
)
from jaxcombine.moe.mergekit._run import run_moe

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
