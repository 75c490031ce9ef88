"""Sparse mixtures of experts: routing as pure functions (:mod:`.routing`), the
NNX layer :class:`SparseMoE`, expert parallelism (:func:`expert_parallel`),
sparse upcycling (:func:`upcycle`) and mergekit-moe configs (:mod:`.mergekit`)."""

from jaxcombine.moe import routing
from jaxcombine.moe.layer import MoEAux, MoEConfig, SparseMoE
from jaxcombine.moe.parallel import expert_parallel

__all__ = ["MoEAux", "MoEConfig", "SparseMoE", "expert_parallel", "routing", "upcycle"]


def __getattr__(name: str):
    # upcycle imports jaxcombine.models, which imports this package's layer: load on use.
    if name == "upcycle":
        from jaxcombine.moe.upcycling import upcycle

        return upcycle
    raise AttributeError(f"module 'jaxcombine.moe' has no attribute {name!r}")
