"""Ensembles of language models combined per token: the combination rules
(:mod:`._rules`), pure functions of the members' logits."""

from jaxcombine.ensemble._rules import (
    RULES,
    Combination,
    contrastive,
    linear,
    logit_arithmetic,
    loglinear,
)

__all__ = ["RULES", "Combination", "contrastive", "linear", "logit_arithmetic", "loglinear"]
