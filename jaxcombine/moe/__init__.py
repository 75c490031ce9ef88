"""Sparse mixtures of experts: routing as pure functions (:mod:`.routing`) and the
NNX layer :class:`SparseMoE`."""

from jaxcombine.moe import routing
from jaxcombine.moe.layer import MoEAux, MoEConfig, SparseMoE

__all__ = ["MoEAux", "MoEConfig", "SparseMoE", "routing"]
