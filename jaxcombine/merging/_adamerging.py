"""AdaMerging: learn task-arithmetic coefficients by entropy minimisation (Yang et al. 2024).

With task vectors tau_k = theta_k - theta_0 of K fine-tuned models, the merged
model is

    task-wise:   theta(lambda) = theta_0 + sum_k lambda_k tau_k              (K coefficients)
    layer-wise:  theta^l(lambda) = theta_0^l + sum_k lambda_k^l tau_k^l     (K per tensor l)

and lambda minimises the Shannon entropy of the merged model's predictions on
unlabeled inputs (a surrogate for the unknown test loss),

    H(lambda) = mean_x  -sum_c p_c(x) log p_c(x),   p(x) = softmax(f(theta(lambda), x)),

by gradient descent through the merge (``jax.grad`` of H with respect to
lambda) with Adam. As in the paper, lambda starts at 0.3, the optimiser is
Adam with learning rate 1e-3, and the coefficients are clipped to [0, 1]
inside the merge (Adam updates the raw values; a coefficient clipped at a
bound gets no gradient, only Adam's momentum moves it).

Example::

    result = adamerging(base, [ft_a, ft_b], lambda p, x: nnx.merge(graphdef, p)(x),
                        [xs_1, xs_2, xs_3], granularity="layer", steps=500)
    result.params            # theta(lambda*)
    result.coefficients      # [K] (task-wise) or {tensor path: [K]} (layer-wise)
    result.entropy           # [steps], H before each update

Reference: Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", arXiv:2310.02575.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcombine.errors import ConfigError
from jaxcombine.merging._fisher import check_models
from jaxcombine.tree import path_string, stack, sub

if TYPE_CHECKING:  # optax is imported where used
    import optax

PyTree = Any
Coefficients = jax.Array | dict[str, jax.Array]


class AdaMergingResult(NamedTuple):
    """The merged parameters, the (clipped) coefficients and H before each step.

    See :func:`adamerging` for an example (Yang et al. 2024, arXiv:2310.02575).
    """

    params: PyTree
    coefficients: Coefficients  # [K] task-wise, {group: [K]} otherwise
    entropy: jax.Array  # [steps]


def _key(path: tuple) -> str:
    name = path_string(path)
    return name[: -len("/value")] if name.endswith("/value") else name


def prediction_entropy(logits) -> jax.Array:
    """Mean over all leading axes of -sum_c p_c log p_c, p = softmax(logits[..., :]).

    A list or tuple of logits arrays (one per task head) gives the sum of
    their mean entropies, as the paper sums the tasks' losses (AdaMerging,
    Yang et al. 2024, arXiv:2310.02575).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> print(merging.prediction_entropy(jnp.zeros((3, 4))))     # uniform: log 4
    1.3863
    >>> print(merging.prediction_entropy([jnp.zeros((3, 4)), jnp.zeros((2, 2))]))  # + log 2
    2.0794
    """
    if isinstance(logits, (list, tuple)):
        return sum((prediction_entropy(x) for x in logits), jnp.zeros((), jnp.float32))
    logp = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.sum(jnp.exp(logp) * logp, axis=-1))


def merge_with_coefficients(
    base: PyTree,
    task_vectors: Sequence[PyTree],
    coefficients: Coefficients,
    *,
    clip: tuple[float, float] | None = None,
) -> PyTree:
    """theta_0 + sum_k lambda_k tau_k: ``coefficients`` [K], or {tensor path: [K]} per leaf.

    Tensor paths drop a trailing ``/value`` (``"layers/0/kernel"``). ``clip``
    clips the coefficients first. Differentiable in ``coefficients``; works
    under ``jax.jit``. AdaMerging's merge (arXiv:2310.02575).

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base = {"a": jnp.zeros(1), "b": jnp.ones(1)}
    >>> taus = [{"a": jnp.ones(1), "b": jnp.ones(1)}, {"a": jnp.full(1, 2.0), "b": jnp.zeros(1)}]
    >>> print(merging.merge_with_coefficients(base, taus, jnp.array([0.5, 0.25]))["a"])
    [1.]
    >>> per_leaf = {"a": jnp.array([0.5, 0.25]), "b": jnp.array([2.0, 0.0])}
    >>> print(merging.merge_with_coefficients(base, taus, per_leaf, clip=(0.0, 1.0))["b"])
    [2.]
    """
    flat, treedef = jax.tree_util.tree_flatten_with_path(base)
    stacked = jax.tree.leaves(stack(list(task_vectors)))  # each [K, ...]
    k = len(task_vectors)
    out = []
    for (path, b), tv in zip(flat, stacked, strict=True):
        if isinstance(coefficients, dict) and _key(path) not in coefficients:
            raise ConfigError(
                f"no coefficients for this tensor (keys: {sorted(coefficients)[:8]})",
                where=f"merge_with_coefficients(coefficients): {_key(path)}",
                fix="key the coefficients by every tensor path, without '/value'",
            )
        lam = coefficients if not isinstance(coefficients, dict) else coefficients[_key(path)]
        lam = jnp.asarray(lam, jnp.float32)
        if lam.shape != (k,):
            raise ConfigError(
                f"expected {k} coefficients (one per task vector), got shape {lam.shape}",
                where=f"merge_with_coefficients(coefficients): {_key(path)}",
                fix="pass an array [K], or a dict of [K] arrays keyed by tensor path",
            )
        if clip is not None:
            lam = jnp.clip(lam, *clip)
        merged = b.astype(jnp.float32) + jnp.tensordot(lam, tv.astype(jnp.float32), axes=1)
        out.append(merged.astype(b.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def _groups(base: PyTree, granularity) -> tuple[list[str], list[str] | None]:
    """Leaf keys and each leaf's group (None for task-wise)."""
    keys = [_key(p) for p, _ in jax.tree_util.tree_flatten_with_path(base)[0]]
    if granularity == "task":
        return keys, None
    if granularity == "layer":
        return keys, keys
    if callable(granularity):
        groups = [granularity(k) for k in keys]
        if not all(isinstance(g, str) for g in groups):
            raise ConfigError(
                "a granularity function must map every tensor path to a group name (str)",
                where="adamerging(granularity)",
                fix='return e.g. "layers/0" for "layers/0/kernel"',
            )
        return keys, groups
    raise ConfigError(
        f"granularity must be 'task', 'layer' or a function path -> group, got {granularity!r}",
        where="adamerging(granularity)",
        fix="use 'task' (K coefficients) or 'layer' (K per tensor)",
    )


def adamerging(
    base: PyTree,
    models: Sequence[PyTree],
    apply_fn: Callable[[PyTree, Any], Any],
    unlabeled_batches: Sequence[Any],
    *,
    granularity: str | Callable[[str], str] = "task",
    steps: int = 500,
    learning_rate: float = 1e-3,
    init: float = 0.3,
    clip: tuple[float, float] | None = (0.0, 1.0),
    optimizer: optax.GradientTransformation | None = None,
) -> AdaMergingResult:
    """Learn merge coefficients minimising the prediction entropy on unlabeled inputs.

    ``apply_fn(params, batch)`` returns logits [..., C] (or a list of logits,
    one per task head: their entropies are summed). Step t uses
    ``unlabeled_batches[t % len(unlabeled_batches)]``. ``granularity``:
    ``"task"`` (one lambda per model), ``"layer"`` (one per model per tensor) or
    a function mapping a tensor path to a group name (one per model per group).
    ``clip=None`` leaves the coefficients unbounded; ``optimizer`` replaces
    ``optax.adam(learning_rate)``.

    With NNX models: ``graphdef, base = nnx.split(base_model)`` and
    ``apply_fn = lambda p, x: nnx.merge(graphdef, p)(x)``. Below, logits
    lambda [2, -2] x start at lambda = 0.3 with entropy H(softmax([0.6, -0.6]))
    = 0.541 nats; H falls as lambda grows, up to the clip at 1:

    >>> import jax.numpy as jnp
    >>> from jaxcombine import merging
    >>> base, ft = {"w": jnp.zeros(2)}, {"w": jnp.array([2.0, -2.0])}
    >>> result = merging.adamerging(base, [ft], lambda p, x: x * p["w"], [jnp.ones((4, 1))],
    ...                             steps=10, learning_rate=0.1)
    >>> print(result.coefficients, round(float(result.entropy[0]), 3))
    [1.] 0.541
    >>> print(result.params["w"])                          # 0 + 1 * tau
    [ 2. -2.]

    Reference: Yang et al., arXiv:2310.02575.
    """
    where = "adamerging"
    check_models(models, f"{where}(models)", base=base)
    if not isinstance(unlabeled_batches, (list, tuple)) or not unlabeled_batches:
        raise ConfigError(
            f"unlabeled_batches must be a non-empty list of batches, got "
            f"{type(unlabeled_batches).__name__}",
            where=f"{where}(unlabeled_batches)",
            fix="wrap a single batch in a list: [xs]",
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(
            f"steps must be a positive integer, got {steps!r}",
            where=f"{where}(steps)",
            fix="use e.g. steps=500 (the paper's setting)",
        )
    if not np.isfinite(init):
        raise ConfigError(
            f"init must be a finite number, got {init!r}",
            where=f"{where}(init)",
            fix="use 0.3 (the paper's setting)",
        )
    if clip is not None and not (len(clip) == 2 and clip[0] <= clip[1]):
        raise ConfigError(
            f"clip must be (low, high) with low <= high, or None, got {clip!r}",
            where=f"{where}(clip)",
            fix="use (0.0, 1.0) as the paper does, or None",
        )
    keys, groups = _groups(base, granularity)
    k = len(models)
    out = jax.eval_shape(apply_fn, base, unlabeled_batches[0])
    for logits in out if isinstance(out, (list, tuple)) else [out]:
        if not hasattr(logits, "shape") or len(logits.shape) < 1 or logits.shape[-1] < 2:
            raise ConfigError(
                f"apply_fn must return logits [..., C] with C >= 2 classes, got {logits}",
                where=f"{where}(apply_fn)",
                fix="return the model's logits (not probabilities or a scalar loss)",
            )

    if groups is None:
        raw = jnp.full((k,), init, jnp.float32)
    else:
        raw = {g: jnp.full((k,), init, jnp.float32) for g in dict.fromkeys(groups)}

    def per_leaf(coeffs):
        return (
            coeffs
            if groups is None
            else {key: coeffs[g] for key, g in zip(keys, groups, strict=True)}
        )

    def loss(coeffs, base, task_vectors, batch):
        params = merge_with_coefficients(base, task_vectors, per_leaf(coeffs), clip=clip)
        return prediction_entropy(apply_fn(params, batch))

    import optax

    opt = optimizer if optimizer is not None else optax.adam(learning_rate)

    @jax.jit
    def step(coeffs, opt_state, base, task_vectors, batch):
        value, grads = jax.value_and_grad(loss)(coeffs, base, task_vectors, batch)
        updates, opt_state = opt.update(grads, opt_state, coeffs)
        return optax.apply_updates(coeffs, updates), opt_state, value

    task_vectors = [sub(m, base) for m in models]
    opt_state = opt.init(raw)
    history = []
    for t in range(steps):
        batch = unlabeled_batches[t % len(unlabeled_batches)]
        raw, opt_state, value = step(raw, opt_state, base, task_vectors, batch)
        history.append(value)
    learned = jax.tree.map(lambda c: jnp.clip(c, *clip) if clip is not None else c, raw)
    params = merge_with_coefficients(base, task_vectors, per_leaf(learned))
    return AdaMergingResult(params, learned, jnp.stack(history))
