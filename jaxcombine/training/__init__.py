"""Training: the shared loop (jitted step on a mesh, Orbax checkpoints, exact
resume, metrics), the optimiser and the language-model losses. The jobs in
``train/`` are thin readers of a config around these."""

from jaxcombine.training.loop import (
    METRICS_FILE,
    batch_sharding,
    check_global_batch,
    make_train_step,
    param_shardings,
    place,
    read_metrics,
    train,
)
from jaxcombine.training.losses import lm_loss, moe_aux_losses, token_cross_entropy
from jaxcombine.training.optimizer import adamw, learning_rate_schedule

__all__ = [
    "METRICS_FILE",
    "adamw",
    "batch_sharding",
    "check_global_batch",
    "learning_rate_schedule",
    "lm_loss",
    "make_train_step",
    "moe_aux_losses",
    "param_shardings",
    "place",
    "read_metrics",
    "token_cross_entropy",
    "train",
]
