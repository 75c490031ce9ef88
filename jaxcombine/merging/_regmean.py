"""RegMean: merge linear layers by regression on their inputs (Jin et al. 2023, arXiv:2212.09849).

A linear layer y = x W (kernel W [d_in, d_out]) of model i saw inputs X_i
[N_i, d_in] on its own data. RegMean picks the W that best reproduces every
model's outputs on its own inputs,

    W* = argmin_W sum_i ||X_i W - X_i W_i||^2 = (sum_i G_i)^-1 sum_i G_i W_i,
    G_i = X_i^T X_i                                   (the Gram matrix, [d_in, d_in]).

The paper shrinks the off-diagonal entries of every Gram by alpha in [0, 1],
G~_i = alpha G_i + (1 - alpha) diag(G_i), which regularises the solve (alpha = 1
is the exact least-squares merge; alpha = 0 merges each input row j of W by
the weights G_i[j, j], a per-row weighted mean). Per-model weights w_i scale
the Grams, G~_i -> w_i G~_i. Every leaf without a Gram (biases, norms,
embeddings, ...) is the weighted mean sum_i w_i theta_i / sum_i w_i.

An input feature that no model ever saw (a zero row and column of sum_i G~_i,
e.g. a dead ReLU unit) leaves its row of W undetermined: that row is the
weighted mean of the models' rows.

Grams are accumulated optax-style; :func:`linear_inputs` records the inputs of
every Dense-like layer of an NNX model, keyed by its kernel's path::

    state = gram_init(linear_inputs(model_a, xs_a[:1]))
    for xs in batches_a:
        state = gram_update(state, linear_inputs(model_a, xs))
    grams_a = gram_finalize(state)
    ...
    merged = regmean_merge([params_a, params_b], [grams_a, grams_b], alpha=0.9)

The keys are leaf paths without a trailing ``/value`` (``"layers/0/kernel"``),
so they name the same leaf in an ``nnx.State`` and in its pure dict.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.merging._fisher import check_models, check_weights
from jaxcombine.tree import path_string

if TYPE_CHECKING:  # flax is imported where used: `jaxcombine merge` never needs it
    from flax import nnx

PyTree = Any


def _key(path: tuple) -> str:
    name = path_string(path)
    return name[: -len("/value")] if name.endswith("/value") else name


class GramState(NamedTuple):
    """Running Gram matrices sum_n x_n x_n^T per linear layer, and the input counts.

    >>> from jaxcombine import merging
    >>> state = merging.gram_init({"head/kernel": 3})
    >>> state.grams["head/kernel"].shape, int(state.counts["head/kernel"])
    ((3, 3), 0)
    """

    grams: dict[str, jax.Array]  # key -> [d_in, d_in] float32
    counts: dict[str, jax.Array]  # key -> [] int32


def gram_init(features: Mapping[str, int | jax.Array]) -> GramState:
    """Empty Grams, one per key: ``features[key]`` is d_in, or example inputs [..., d_in].

    With an NNX model, ``gram_init(linear_inputs(model, xs[:1]))`` takes the
    sizes from a forward pass.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> state = merging.gram_init({"layers/0/kernel": 4, "head/kernel": jnp.ones((1, 8))})
    >>> {k: g.shape for k, g in state.grams.items()}
    {'layers/0/kernel': (4, 4), 'head/kernel': (8, 8)}

    References: Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models
    (RegMean), arXiv:2212.09849.
    """
    if not isinstance(features, Mapping) or not features:
        raise ConfigError(
            "expected a non-empty mapping from kernel path to input size (or example inputs)",
            where="gram_init(features)",
            fix='pass e.g. {"layers/0/kernel": 4} or the output of linear_inputs(model, x)',
        )
    grams, counts = {}, {}
    for key, value in features.items():
        d = value if isinstance(value, int) else jnp.shape(value)[-1]
        if not isinstance(d, int) or d <= 0:
            raise ConfigError(
                f"input size must be a positive integer, got {d!r}",
                where=f"gram_init(features[{key!r}])",
                fix="pass d_in, or an array of inputs [..., d_in]",
            )
        grams[key] = jnp.zeros((d, d), jnp.float32)
        counts[key] = jnp.zeros((), jnp.int32)
    return GramState(grams, counts)


def gram_update(state: GramState, inputs: Mapping[str, jax.Array]) -> GramState:
    """Add X^T X of a batch: ``inputs[key]`` is [..., d_in], leading axes flattened.

    ``inputs`` must name exactly the layers of ``state``. G = sum_n x_n x_n^T,
    RegMean's statistic (Jin et al. 2023, arXiv:2212.09849).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])                 # [N, d_in]
    >>> state = merging.gram_update(merging.gram_init({"kernel": 2}), {"kernel": x})
    >>> print(state.grams["kernel"], state.counts["kernel"])      # x^T x
    [[2. 2.]
     [2. 4.]] 2
    """
    missing = sorted(set(state.grams) - set(inputs))
    extra = sorted(set(inputs) - set(state.grams))
    if missing or extra:
        raise ConfigError(
            f"inputs do not match the Gram state's layers: missing {missing[:8]}, "
            f"extra {extra[:8]}",
            where="gram_update(inputs)",
            fix="pass the inputs of the same layers as gram_init was given",
        )
    grams, counts = {}, {}
    for key, x in inputs.items():
        d = state.grams[key].shape[0]
        if jnp.ndim(x) < 1 or jnp.shape(x)[-1] != d:
            raise ConfigError(
                f"inputs of shape {jnp.shape(x)} do not end in the layer's input size {d}",
                where=f"gram_update(inputs[{key!r}])",
                fix="pass the layer's inputs [..., d_in] (flatten contracted axes into d_in)",
            )
        grams[key], counts[key] = _add_gram(state.grams[key], state.counts[key], x)
    return GramState(grams, counts)


@jax.jit
def _add_gram(gram, count, x):
    x2 = jnp.reshape(x, (-1, gram.shape[0])).astype(jnp.float32)
    return gram + jnp.einsum("ni,nj->ij", x2, x2, precision="highest"), count + x2.shape[0]


def gram_finalize(state: GramState, *, mean: bool = False) -> dict[str, jax.Array]:
    """The Grams G = X^T X (the paper's sums), or X^T X / N with ``mean=True``.

    Sums weight each model by how many inputs it saw; means weight models equally.

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> x = jnp.array([[1.0, 0.0], [1.0, 2.0]])
    >>> state = merging.gram_update(merging.gram_init({"kernel": 2}), {"kernel": x})
    >>> print(merging.gram_finalize(state, mean=True)["kernel"])  # x^T x / 2
    [[1. 1.]
     [1. 2.]]

    References: Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models
    (RegMean), arXiv:2212.09849.
    """
    for key, count in state.counts.items():
        if int(count) == 0:
            raise ConfigError(
                "no inputs were accumulated for this layer",
                where=f"gram_finalize: {key}",
                fix="call gram_update with at least one batch first",
            )
    if mean:
        return {k: g / state.counts[k] for k, g in state.grams.items()}
    return dict(state.grams)


class _Recorder:
    """Stands in for a Dense-like layer: records its input, then calls it."""

    def __init__(self, layer, key: str, sink: dict):
        self.layer, self.key, self.sink = layer, key, sink

    def __call__(self, x, *args, **kwargs):
        in_dims = getattr(self.layer, "in_dims", 1)
        d = math.prod(jnp.shape(x)[jnp.ndim(x) - in_dims :])
        self.sink.setdefault(self.key, []).append(jnp.reshape(x, (-1, d)))
        return self.layer(x, *args, **kwargs)


def linear_inputs(
    model: nnx.Module,
    *args,
    call: Callable[..., Any] | None = None,
    **kwargs,
) -> dict[str, jax.Array]:
    """Inputs [N, d_in] of every Dense-like layer of an NNX model on one forward pass.

    A Dense-like layer is a submodule with a ``kernel`` parameter computing
    y = tensordot(x, kernel, in_dims) (+ bias), ``in_dims`` (default 1) read
    from the layer; its inputs are flattened to [N, d_in]. Keys are kernel
    paths (``"layers/0/kernel"``, ``"head/kernel"``); a layer called several
    times gets its inputs concatenated. Runs ``call(model, *args, **kwargs)``
    (default ``model(*args, **kwargs)``) on a copy: ``model`` is not modified.
    Works under ``jax.jit``. These are the X_i of RegMean (arXiv:2212.09849).

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine import merging
    >>> model = nnx.Sequential(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), nnx.relu,
    ...                        nnx.Linear(3, 1, rngs=nnx.Rngs(1)))
    >>> inputs = merging.linear_inputs(model, jnp.ones((5, 2)))
    >>> {key: x.shape for key, x in inputs.items()}
    {'layers/0/kernel': (5, 2), 'layers/2/kernel': (5, 3)}
    >>> bool((inputs["layers/2/kernel"] >= 0).all())       # after the ReLU
    True
    """
    from flax import nnx

    if not isinstance(model, nnx.Module):
        raise ConfigError(
            f"expected an NNX module, got {type(model).__name__}",
            where="linear_inputs(model)",
            fix="pass the model, e.g. nnx.merge(graphdef, state)",
        )
    copy = nnx.merge(*nnx.split(model))
    layers = [
        (path, node)
        for path, node in nnx.iter_graph(copy)
        if path
        and isinstance(node, nnx.Module)
        and isinstance(getattr(node, "kernel", None), nnx.Variable)
    ]
    if not layers:
        raise ConfigError(
            f"{type(model).__name__} has no submodule with a 'kernel' parameter",
            where="linear_inputs(model)",
            fix="RegMean needs linear layers; pass the Grams of your layers to gram_update",
        )
    sink: dict[str, list] = {}
    for path, layer in layers:
        parent = copy
        for part in path[:-1]:
            parent = parent[part] if isinstance(part, int) else getattr(parent, part)
        recorder = _Recorder(layer, _key((*path, "kernel")), sink)
        if isinstance(path[-1], int):
            parent[path[-1]] = recorder
        else:
            setattr(parent, path[-1], recorder)
    (call or (lambda m, *a, **k: m(*a, **k)))(copy, *args, **kwargs)
    return {key: jnp.concatenate(xs, axis=0) for key, xs in sorted(sink.items())}


def _solve_dtype():
    return jnp.float64 if jax.config.jax_enable_x64 else jnp.float32


@partial(jax.jit, static_argnums=4)
def _regmean_system(kernels, grams, w, alpha, dtype):
    """Solve A W* = B for one layer (rows of unseen inputs pinned to the weighted mean).

    Returns W* [d, out] and the eigenvalues of A, which the caller checks for singularity.
    """
    m, d = grams.shape[0], grams.shape[1]
    kw = kernels.reshape(m, d, -1).astype(dtype)  # [M, d, out]
    g = grams.astype(dtype)
    diag = jnp.diagonal(g, axis1=1, axis2=2)  # [M, d]
    shrunk = alpha * g + (1 - alpha) * jax.vmap(jnp.diag)(diag)
    shrunk = shrunk * w[:, None, None].astype(dtype)
    a = shrunk.sum(0)  # [d, d]
    b = jnp.einsum("mij,mjo->io", shrunk, kw, precision="highest")  # [d, out]
    mean = jnp.tensordot(w.astype(dtype), kw, axes=1) / w.sum()  # [d, out]
    unseen = jnp.diagonal(a) <= 0
    a = a + jnp.diag(unseen.astype(dtype))
    b = b + unseen[:, None] * mean
    return jnp.linalg.solve(a, b), jnp.linalg.eigvalsh(a)


def _regmean_leaf(kernels, grams, w, alpha, where: str):
    """W* for one layer: kernels [M, d_in, ...], grams [M, d_in, d_in], w [M]."""
    dtype = _solve_dtype()
    d = grams.shape[1]
    merged, eig = _regmean_system(kernels, grams, w, alpha, dtype)
    eig = np.asarray(eig)
    tiny = eig.max() * d * float(jnp.finfo(dtype).eps)
    if not np.all(np.isfinite(eig)) or eig.min() <= tiny:
        raise ConfigError(
            f"the RegMean system sum_i G~_i is singular (eigenvalues from {eig.min():.3g} to "
            f"{eig.max():.3g}, alpha={alpha}); at alpha=1 this happens when the models' inputs "
            f"together span fewer than d_in={d} directions",
            where=f"regmean_merge: {where}",
            fix="use alpha < 1 (shrinks the off-diagonal Gram entries), accumulate more "
            "inputs, or enable float64 (jax.config.update('jax_enable_x64', True))",
        )
    return merged.reshape(kernels.shape[1:]).astype(kernels.dtype)


@jax.jit
def _weighted_mean(w, stacked):
    mean = jnp.tensordot(w.astype(jnp.float32), stacked.astype(jnp.float32), axes=1) / w.sum()
    return mean.astype(stacked.dtype)


def regmean_merge(
    models: Sequence[PyTree],
    grams: Sequence[Mapping[str, jax.Array]],
    *,
    weights: Sequence[float] | None = None,
    alpha: float = 0.9,
) -> PyTree:
    """RegMean: W* = (sum_i w_i G~_i)^-1 sum_i w_i G~_i W_i per linear leaf, else the mean.

    ``grams[i]`` maps kernel paths (``"layers/0/kernel"``, see :func:`linear_inputs`)
    to model i's Gram [d_in, d_in]; every model needs the same keys, each
    naming a leaf whose leading axes flatten to d_in. ``alpha`` in [0, 1]
    scales the off-diagonal Gram entries (1: exact least squares). ``weights``
    (non-negative, default uniform) scale the Grams and weight the mean of the
    other leaves. The solve runs in float64 when ``jax_enable_x64`` is on, else
    float32; a singular system raises :class:`ConfigError`.

    Model a saw only input feature 0 and b only feature 1, so the merged
    kernel takes a's row 0 and b's row 1 (reproducing both models' outputs on
    their inputs, where the mean would halve both); the bias is the mean:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> a = {"kernel": jnp.array([[1.0], [0.0]]), "bias": jnp.array([0.0])}
    >>> b = {"kernel": jnp.array([[0.0], [1.0]]), "bias": jnp.array([2.0])}
    >>> grams_a = {"kernel": jnp.array([[1.0, 0.0], [0.0, 0.0]])}
    >>> grams_b = {"kernel": jnp.array([[0.0, 0.0], [0.0, 1.0]])}
    >>> merged = merging.regmean_merge([a, b], [grams_a, grams_b], alpha=1.0)
    >>> print(merged["kernel"].ravel(), merged["bias"])
    [1. 1.] [1.]

    Reference: Jin, Ren, Preotiuc-Pietro & Cheng, "Dataless Knowledge Fusion by
    Merging Weights of Language Models", arXiv:2212.09849.
    """
    where = "regmean_merge"
    check_models(models, f"{where}(models)")
    if not isinstance(grams, Sequence) or len(grams) != len(models):
        got = len(grams) if isinstance(grams, Sequence) else type(grams).__name__
        raise ConfigError(
            f"got {len(models)} models but {got} Gram dicts",
            where=f"{where}(grams)",
            fix="pass one dict of Grams per model, in the same order",
        )
    if not (isinstance(alpha, (int, float)) and 0.0 <= alpha <= 1.0):
        raise ConfigError(
            f"alpha must be a number in [0, 1], got {alpha!r}",
            where=f"{where}(alpha)",
            fix="use 1 for exact least squares, smaller values to regularise (e.g. 0.9)",
        )
    w = check_weights(
        weights,
        len(models),
        f"{where}(weights)",
        nonnegative="negative weights make the Gram sum indefinite",
    )
    keys = set(grams[0])
    for i, g in enumerate(grams[1:], start=1):
        if set(g) != keys:
            raise ConfigError(
                f"model {i}'s Grams name other layers than model 0's: missing "
                f"{sorted(keys - set(g))[:8]}, extra {sorted(set(g) - keys)[:8]}",
                where=f"{where}(grams[{i}])",
                fix="accumulate Grams for the same layers in every model",
            )
    flat, treedef = jax.tree_util.tree_flatten_with_path(models[0])
    leaf_keys = [_key(p) for p, _ in flat]
    unknown = sorted(keys - set(leaf_keys))
    if unknown:
        kernels = [k for k in leaf_keys if k.endswith("kernel")]
        raise ConfigError(
            f"Grams for {unknown[:8]} name no leaf of the models (kernel leaves: {kernels[:8]})",
            where=f"{where}(grams)",
            fix="key the Grams by leaf path without '/value', as linear_inputs does",
        )
    leaves_per_model = [jax.tree.leaves(m) for m in models]
    w_arr = jnp.asarray(w)
    out = []
    for j, key in enumerate(leaf_keys):
        stacked = jnp.stack([leaves[j] for leaves in leaves_per_model])
        if key in keys:
            g = jnp.stack([jnp.asarray(gr[key]) for gr in grams])
            d = g.shape[-1]
            shape = stacked.shape[1:]
            if (
                g.shape != (len(models), d, d)
                or stacked.ndim < 2
                or all(math.prod(shape[:k]) != d for k in range(1, len(shape)))
            ):
                raise ConfigError(
                    f"Grams of shapes {[jnp.shape(gr[key]) for gr in grams]} do not fit the "
                    f"kernel of shape {shape}: need [d_in, d_in] with d_in the product of "
                    "the kernel's leading (input) axes",
                    where=f"{where}(grams): {key}",
                    fix="accumulate the Gram of this layer's inputs (see linear_inputs)",
                )
            out.append(_regmean_leaf(stacked, g, w_arr, float(alpha), key))
        else:
            out.append(_weighted_mean(w_arr, stacked))
    return jax.tree_util.tree_unflatten(treedef, out)
