"""jaxcombine: combine models in JAX/Flax.

Merging and task arithmetic, ensembles decoded in one jitted loop, sparse
mixtures of experts sharded over device meshes, and distillation, with
Hugging Face checkpoints as the exchange format.
"""

from jaxcombine.errors import JaxcombineError

__version__ = "0.1.0"

__all__ = ["JaxcombineError", "__version__"]
