"""Alignment by permutation symmetry: specs, weight matching, spec builders.

Git Re-Basin (Ainsworth, Hayase & Srinivasa 2023, arXiv:2209.04836): permute
the hidden units of model B so its weights line up with model A's before
averaging or interpolating them.

A model B that is a permuted copy of A is aligned back onto A exactly:

>>> import jax, numpy as np
>>> from flax import nnx
>>> from jaxcombine.models import MLPClassifier
>>> params_a = nnx.state(MLPClassifier(2, (16,), 3, rngs=nnx.Rngs(0)), nnx.Param)
>>> spec = mlp_classifier_spec(params_a)
>>> params_b = apply_permutation(spec, random_perms(spec, params_a, jax.random.key(1)), params_a)
>>> perms = weight_matching(spec, params_a, params_b, key=jax.random.key(0))
>>> aligned_b = apply_permutation(spec, perms, params_b)   # same function as params_b
>>> all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(aligned_b), jax.tree.leaves(params_a)))
True

For two independently trained models, average or interpolate after aligning:
``jaxcombine.tree.lerp(params_a, aligned_b, 0.5)``.
"""

from jaxcombine.permute._builders import (
    decoder_spec,
    dense_axes,
    dense_chain_axes,
    mlp_classifier_spec,
    residual_block_axes,
)
from jaxcombine.permute._lap import linear_sum_assignment
from jaxcombine.permute._matching import cost_matrix, weight_matching
from jaxcombine.permute._spec import (
    PermutationSpec,
    PermutationSpecError,
    apply_permutation,
    compose_perms,
    identity_perms,
    invert_perms,
    random_perms,
)

__all__ = [
    "PermutationSpec",
    "PermutationSpecError",
    "apply_permutation",
    "compose_perms",
    "cost_matrix",
    "decoder_spec",
    "dense_axes",
    "dense_chain_axes",
    "identity_perms",
    "invert_perms",
    "linear_sum_assignment",
    "mlp_classifier_spec",
    "random_perms",
    "residual_block_axes",
    "weight_matching",
]
