"""Ensembles of language models combined per token: the combination rules
(:mod:`._rules`, pure functions of the members' logits), stacked members
decoded in one jitted loop (:mod:`._stacked`), general ensembles of several
architectures, vocabularies, MC-dropout members and per-step posterior
weights (:mod:`._ensemble`), and a learned per-step gate over the members'
hidden states (:mod:`._gate`). Guide: ``docs/ensembles.md``."""

from jaxcombine.ensemble._ensemble import (
    EnsembleForward,
    MCDropout,
    ensemble,
    shared_vocabulary,
)
from jaxcombine.ensemble._gate import Gate, gate_weights, train_gate
from jaxcombine.ensemble._rules import (
    RULES,
    Combination,
    contrastive,
    linear,
    logit_arithmetic,
    loglinear,
)
from jaxcombine.ensemble._stacked import (
    StackedForward,
    check_same_architecture,
    generate_ensemble,
    score_ensemble,
    stack_members,
    stacked,
)

__all__ = [
    "RULES",
    "Combination",
    "EnsembleForward",
    "Gate",
    "MCDropout",
    "StackedForward",
    "check_same_architecture",
    "contrastive",
    "ensemble",
    "gate_weights",
    "generate_ensemble",
    "linear",
    "logit_arithmetic",
    "loglinear",
    "score_ensemble",
    "shared_vocabulary",
    "stack_members",
    "stacked",
    "train_gate",
]
