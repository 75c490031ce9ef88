"""Spec builders: dense layers, dense chains, residual blocks, and the library's models.

The small helpers return plain ``dict`` fragments (path -> axes) that are
merged with ``|`` and passed to :class:`PermutationSpec`, as git-re-basin's
``dense()``/``easyblock()`` helpers do:

    axes = dense_axes("layers/0", None, "h0") | dense_axes("head", "h0", None)
    spec = PermutationSpec(axes)

The model builders read the leaf paths of the parameters (or of a model)
to learn the layer count and which biases exist, build the spec from the
helpers, and validate it against the parameters, so a spec that does not
fit the tree fails here, naming the paths.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from jaxcombine.permute._spec import PermutationSpec, PermutationSpecError, flatten_params

PyTree = Any
Axes = dict[str, tuple[str | None, ...]]


def dense_axes(name: str, p_in: str | None, p_out: str | None, *, bias: bool = True) -> Axes:
    """A dense layer y = x W + b: ``name/kernel`` [in, out] and ``name/bias`` [out].

    >>> dense_axes("layers/0", None, "h0")
    {'layers/0/kernel': (None, 'h0'), 'layers/0/bias': ('h0',)}

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836 (its ``dense`` helper).
    """
    axes = {f"{name}/kernel": (p_in, p_out)}
    if bias:
        axes[f"{name}/bias"] = (p_out,)
    return axes


def dense_chain_axes(names: Sequence[str], *, prefix: str = "hidden_", bias: bool = True) -> Axes:
    """Dense layers applied in sequence: the input and output are not permuted,
    the units between layer k and k+1 by permutation ``f"{prefix}{k}"``.

    Elementwise activations between the layers commute with permutations.

    >>> axes = dense_chain_axes(["layers/0", "layers/1", "head"], bias=False)
    >>> axes
    {'layers/0/kernel': (None, 'hidden_0'), 'layers/1/kernel': ('hidden_0', 'hidden_1'),
     'head/kernel': ('hidden_1', None)}

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836.
    """
    perms = [None, *(f"{prefix}{k}" for k in range(len(names) - 1)), None]
    axes: Axes = {}
    for k, name in enumerate(names):
        axes |= dense_axes(name, perms[k], perms[k + 1], bias=bias)
    return axes


def residual_block_axes(
    prefix: str,
    residual: str | None,
    hidden: str | None,
    *,
    inputs: Sequence[str],
    output: str,
    norm: str | None = None,
    bias: bool = False,
) -> Axes:
    """A residual block x + W_out f(W_in norm(x)) of dense layers.

    The residual stream (the block's input and output, and the norm's scale)
    is permuted by ``residual``, the block's hidden units by ``hidden``:
    every layer in ``inputs`` reads the stream ([residual, hidden] kernels,
    e.g. a gate and an up projection), ``output`` writes it back
    ([hidden, residual]). ``norm`` names a normalisation with a per-unit
    ``scale`` (RMSNorm); normalisations over all units are permutation
    invariant. Paths are ``f"{prefix}/{layer}/kernel"``.

    A SwiGLU MLP block (Llama's), down(silu(gate x) * up x):

    >>> axes = residual_block_axes("layers/0", "res", "mlp_0", inputs=("mlp/gate", "mlp/up"),
    ...                            output="mlp/down", norm="norm")
    >>> for path, entry in axes.items():
    ...     print(path, entry)
    layers/0/norm/scale ('res',)
    layers/0/mlp/gate/kernel ('res', 'mlp_0')
    layers/0/mlp/up/kernel ('res', 'mlp_0')
    layers/0/mlp/down/kernel ('mlp_0', 'res')

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836 (its ``easyblock`` helper).
    """
    axes: Axes = {}
    if norm is not None:
        axes[f"{prefix}/{norm}/scale"] = (residual,)
    for name in inputs:
        axes |= dense_axes(f"{prefix}/{name}", residual, hidden, bias=bias)
    axes |= dense_axes(f"{prefix}/{output}", hidden, residual, bias=bias)
    return axes


def _shapes(params_or_model: PyTree) -> dict[str, tuple[int, ...]]:
    paths, arrays, _, _ = flatten_params(params_or_model)
    return {p: tuple(x.shape) for p, x in zip(paths, arrays, strict=True)}


def _layer_count(shapes, pattern: str, what: str, *, allow_none: bool = False) -> int:
    indices = {int(m.group(1)) for p in shapes if (m := re.match(pattern, p))}
    if not indices and not allow_none:
        raise PermutationSpecError(
            f"no {what} layers found; leaf paths start {sorted(shapes)[:6]}",
            where="spec builder",
            fix=f"pass the parameters (or the model) of a {what}",
        )
    if indices != set(range(len(indices))):
        raise PermutationSpecError(
            f"layer indices {sorted(indices)} are not 0..{len(indices) - 1}",
            where="spec builder",
        )
    return len(indices)


def _validated(axes: Axes, shapes, what: str) -> PermutationSpec:
    spec = PermutationSpec(axes)
    spec._sizes_from_shapes(shapes, f"{what} params")
    return spec


def mlp_classifier_spec(params_or_model: PyTree) -> PermutationSpec:
    """The spec of a :class:`jaxcombine.models.MLPClassifier`.

    Hidden layer k's units (``layers/k`` output, ``layers/k+1`` or ``head``
    input) are permutation ``hidden_k``; inputs and classes are not permuted
    (a classifier without hidden layers has no permutations).

    Shapes suffice, so an abstract model works:

    >>> from flax import nnx
    >>> from jaxcombine.models import MLPClassifier
    >>> model = nnx.eval_shape(lambda: MLPClassifier(2, (8, 8), 3, rngs=nnx.Rngs(0)))
    >>> spec = mlp_classifier_spec(model)
    >>> spec.axes["layers/1/kernel"], spec.sizes(model)
    (('hidden_0', 'hidden_1'), {'hidden_0': 8, 'hidden_1': 8})

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836.
    """
    shapes = _shapes(params_or_model)
    n = _layer_count(
        shapes, r"layers/(\d+)/kernel$", "MLPClassifier", allow_none="head/kernel" in shapes
    )
    names = [f"layers/{k}" for k in range(n)] + ["head"]
    return _validated(dense_chain_axes(names), shapes, "MLPClassifier")


def decoder_spec(params_or_model: PyTree, *, heads: bool = False) -> PermutationSpec:
    """The spec of a :class:`jaxcombine.models.Decoder` (Llama / Mistral / Qwen2).

    Permutations:

    * ``residual``: the residual stream, shared by all layers: the embedding's
      columns, every projection reading the stream (q, k, v, gate, up: input
      axis) or writing it (o, down: output axis, and their biases), every
      RMSNorm scale (RMSNorm is invariant to permuting its input), and the
      lm head's input axis (with tied embeddings the embedding serves both).
    * ``mlp_{l}``: layer l's MLP hidden units (gate/up outputs, down input).
    * ``heads_{l}`` (only with ``heads=True``): layer l's attention heads, on
      the head axes of q, k, v, o and the q/k/v biases. This needs
      ``num_heads == num_kv_heads``: with grouped-query attention a query
      head's key/value head is fixed by its index. Dimensions inside a head are
      not permuted (RoPE pairs them).

    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_layers=2,
    ...                        num_heads=2, num_kv_heads=2, head_dim=4, tie_word_embeddings=True)
    >>> spec = decoder_spec(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), heads=True)
    >>> spec.names, spec.axes["layers/1/self_attn/o_proj/kernel"]       # [H, D, E]
    (('heads_0', 'heads_1', 'mlp_0', 'mlp_1', 'residual'), ('heads_1', None, 'residual'))

    References: Ainsworth, Hayase & Srinivasa 2023, Git Re-Basin: Merging Models modulo Permutation
    Symmetries, arXiv:2209.04836 (the permutation symmetries, here of a transformer).
    """
    shapes = _shapes(params_or_model)
    n = _layer_count(shapes, r"layers/(\d+)/self_attn/", "Decoder")
    r = "residual"
    axes: Axes = {"embed_tokens/embedding": (None, r), "norm/scale": (r,)}
    if "lm_head/kernel" in shapes:
        axes["lm_head/kernel"] = (r, None)
    for layer in range(n):
        prefix = f"layers/{layer}"
        h = None
        if heads:
            q = shapes.get(f"{prefix}/self_attn/q_proj/kernel", (0, 0))
            kv = shapes.get(f"{prefix}/self_attn/k_proj/kernel", (0, 0))
            if q[1] != kv[1]:
                raise PermutationSpecError(
                    f"cannot permute attention heads with grouped-query attention "
                    f"({q[1]} query heads, {kv[1]} key/value heads)",
                    where=f"decoder_spec(heads=True): {prefix}/self_attn",
                    fix="use heads=False (only the residual stream and MLP units are permuted)",
                )
            h = f"heads_{layer}"
        attn = f"{prefix}/self_attn"
        axes[f"{prefix}/input_layernorm/scale"] = (r,)
        for proj in ("q_proj", "k_proj", "v_proj"):
            axes[f"{attn}/{proj}/kernel"] = (r, h, None)
            if f"{attn}/{proj}/bias" in shapes:
                axes[f"{attn}/{proj}/bias"] = (h, None)
        axes[f"{attn}/o_proj/kernel"] = (h, None, r)
        if f"{attn}/o_proj/bias" in shapes:
            axes[f"{attn}/o_proj/bias"] = (r,)
        axes |= residual_block_axes(
            prefix,
            r,
            f"mlp_{layer}",
            inputs=("mlp/gate_proj", "mlp/up_proj"),
            output="mlp/down_proj",
            norm="post_attention_layernorm",
            bias=f"{prefix}/mlp/up_proj/bias" in shapes,
        )
    return _validated(axes, shapes, "Decoder")
