"""jaxcombine: combine models in JAX/Flax.

Merging and task arithmetic, ensembles decoded in one jitted loop, sparse
mixtures of experts sharded over device meshes, and distillation, with
Hugging Face checkpoints as the exchange format.

Where things are (each subpackage documents its own math and papers)::

    merging, permute          merge parameter pytrees; align permutations (Git Re-Basin)
    ensemble, decoding        combine next-token distributions; generate, score
    moe, distill              sparse mixtures of experts; distillation losses
    models, hf                NNX decoders and classifiers; HF checkpoints in and out
    tree, rules, sharding     pytree math; per-tensor settings; logical axes -> mesh
    training, data            the shared training loop; seeded, per-host batches
    checkpoint, distributed   Orbax checkpoints; multi-host start-up and meshes
    lora, cli, tour           LoRA from task vectors; the command line; the tour

Every error the library raises derives from :class:`JaxcombineError`:

>>> import jaxcombine
>>> from jaxcombine.errors import ConfigError
>>> jaxcombine.__version__, issubclass(ConfigError, jaxcombine.JaxcombineError)
('0.1.0', True)
"""

from jaxcombine.errors import JaxcombineError

__version__ = "0.1.0"

__all__ = ["JaxcombineError", "__version__"]
