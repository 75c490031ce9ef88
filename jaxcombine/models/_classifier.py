"""A small MLP classifier for experiments that do not need a language model.

    h_0 = x,   h_i = act(h_{i-1} W_i + b_i),   logits = h_n W_out + b_out

Hidden layers are ``layers[i]``, the output layer ``head``; kernels carry the
logical axes (``embed``, ``mlp``) for the input layer, (``mlp``, ``mlp``)
between hidden layers and (``mlp``, ``vocab``) for the head, so permutation
specs and sharding rules can name them.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.errors import ConfigError
from jaxcombine.models._layers import Dense, dropout


class MLPClassifier(nnx.Module):
    """An MLP with ReLU hidden layers and optional dropout (hidden kernels
    N(0, 2 / fan_in), head N(0, 1 / fan_in), zero biases); dropout only with a
    ``dropout_key`` (MC dropout, Gal & Ghahramani 2016, arXiv:1506.02142).

    >>> import numpy as np
    >>> model = MLPClassifier(in_features=2, hidden_sizes=(4,), num_classes=3, rngs=nnx.Rngs(0))
    >>> x = jnp.array([[1.0, -2.0], [0.5, 3.0]])
    >>> logits = model(x)                                          # [2, 3]
    >>> w0, b0 = model.layers[0].kernel[...], model.layers[0].bias[...]
    >>> w1, b1 = model.head.kernel[...], model.head.bias[...]
    >>> logits.shape, np.allclose(logits, np.maximum(x @ w0 + b0, 0) @ w1 + b1, atol=1e-6)
    ((2, 3), True)
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        num_classes: int,
        *,
        dropout_rate: float = 0.0,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        sizes = (in_features, *hidden_sizes, num_classes)
        if any(not isinstance(s, int) or s <= 0 for s in sizes):
            raise ConfigError(
                f"layer sizes must be positive integers, got {sizes}",
                where="MLPClassifier(in_features, hidden_sizes, num_classes)",
            )
        if not 0.0 <= dropout_rate < 1.0:
            raise ConfigError(
                f"dropout_rate must be in [0, 1), got {dropout_rate}",
                where="MLPClassifier(dropout_rate)",
            )
        self.dropout_rate = dropout_rate
        layers = []
        for i, (n_in, n_out) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True)):
            axes = ("embed" if i == 0 else "mlp", "mlp")
            layers.append(
                Dense(
                    (n_in, n_out),
                    axes,
                    True,
                    dtype=dtype,
                    rngs=rngs,
                    init_scale=(2.0 / n_in) ** 0.5,
                )
            )
        self.layers = nnx.List(layers)
        self.head = Dense(
            (sizes[-2], num_classes),
            ("mlp", "vocab"),
            True,
            dtype=dtype,
            rngs=rngs,
            init_scale=(1.0 / sizes[-2]) ** 0.5,
        )

    def __call__(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits [..., num_classes]; a ``dropout_key`` turns dropout on (MC dropout)."""
        keys = (
            iter(jax.random.split(dropout_key, len(self.layers)))
            if dropout_key is not None and self.dropout_rate > 0
            else None
        )
        for layer in self.layers:
            x = jax.nn.relu(layer(x))
            if keys is not None:
                x = dropout(x, self.dropout_rate, next(keys))
        return self.head(x)
