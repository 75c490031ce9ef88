"""Train a mixture-of-experts decoder: next-token cross-entropy plus the MoE
layers' load-balancing loss and router z-loss, with router statistics logged.

    python -m train.moe --config configs/train/moe_tiny.yml --workdir runs/moe [key=value ...]

    L = CE + load_balancing_weight * mean_layers(L_balance) + z_loss_weight * mean_layers(L_z)

(Switch Transformer, arXiv:2101.03961; ST-MoE, arXiv:2202.08906.) The
``model.moe`` section holds :class:`jaxcombine.moe.MoEConfig` fields. With
``mesh.expert`` > 1 the MoE layers run expert-parallel (experts sharded over
``expert``, tokens exchanged by all-to-all; rows over ``data`` x ``expert``).
Logged besides the loss: both auxiliary losses, the fraction of dropped
choices, router entropy and ``max_load`` (the busiest expert's share of
choices times the number of experts; 1 is perfectly balanced).
"""

from __future__ import annotations

from flax import nnx
from tokenizers import Tokenizer

from jaxcombine.errors import ConfigError
from jaxcombine.training import moe_aux_losses, token_cross_entropy
from train import common

DEFAULTS = {**common.BASE_DEFAULTS, "load_balancing_weight": 1e-2, "z_loss_weight": 1e-3}


def moe_loss(graphdef, load_balancing_weight: float, z_loss_weight: float, moe_mesh=None):
    """``loss(params, rows [B, L+1], key, constants)``: CE plus the weighted MoE terms."""

    def loss(params, rows, key, constants):
        del key, constants
        out = nnx.merge(graphdef, params)(rows[:, :-1], moe_mesh=moe_mesh)
        ce = token_cross_entropy(out.logits, rows[:, 1:])
        aux, metrics = moe_aux_losses(out.moe_aux, load_balancing_weight, z_loss_weight)
        return ce + aux, {"cross_entropy": ce, **metrics}

    return loss


def main(argv=None) -> None:
    args = common.parse_args(argv, "moe")
    config = common.load_config(args.config, args.overrides, DEFAULTS)
    mesh = common.start(config)
    tokenizer_file = common.tokenizer_path(config)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    dataset = common.load_data(config, tokenizer)
    model = common.make_model(config, tokenizer.get_vocab_size())
    if model.config.moe is None:
        raise ConfigError(
            "the model has no MoE layers",
            where="model.moe",
            fix="set model.moe (num_experts, intermediate_size, ...)",
        )
    graphdef, params = common.split_params(model)
    moe_mesh = mesh if mesh.shape["expert"] > 1 else None
    loss = moe_loss(graphdef, config["load_balancing_weight"], config["z_loss_weight"], moe_mesh)
    params = common.run("moe", config, args.workdir, loss, params, dataset, mesh)
    common.export(config, args.workdir, graphdef, params, tokenizer_file)


if __name__ == "__main__":
    common.entry(main)
