"""AdamW with linear warm-up, cosine decay and global-norm clipping (optax).

    lr(t) = peak * t / warmup                                       t < warmup
    lr(t) = peak * (end + (1 - end) * (1 + cos(pi * s)) / 2),  s = (t - warmup) / (steps - warmup)

Updates are clipped to a global norm first (Pascanu et al. 2013,
arXiv:1211.5063), then AdamW (Loshchilov & Hutter 2019, arXiv:1711.05101) decays
only matrices (2+ dimensions): norms' scales and biases are not decayed, as in
GPT-2 / nanoGPT / MaxText. With g the clipped gradient (Kingma & Ba 2015,
arXiv:1412.6980):

    m = b1 m + (1 - b1) g,   v = b2 v + (1 - b2) g^2
    p -= lr(t) * (m_hat / (sqrt(v_hat) + eps) + weight_decay * p * [p.ndim >= 2])
"""

from __future__ import annotations

import jax
import optax

from jaxcombine.errors import ConfigError


def learning_rate_schedule(
    peak: float, steps: int, warmup_steps: int = 0, end_factor: float = 0.1
) -> optax.Schedule:
    """Linear warm-up from 0 to ``peak`` over ``warmup_steps``, then cosine decay to
    ``end_factor * peak`` at ``steps`` (the formula above; constant after ``steps``).

    >>> lr = learning_rate_schedule(1.0, steps=10, warmup_steps=2, end_factor=0.1)
    >>> [round(float(lr(t)), 4) for t in (0, 1, 2, 6, 10)]   # s = 1/2 at t = 6: 0.1 + 0.9 / 2
    [0.0, 0.5, 1.0, 0.55, 0.1]

    References: cosine decay: Loshchilov & Hutter 2017, SGDR: Stochastic Gradient Descent with Warm
    Restarts, arXiv:1608.03983 (one cycle, no restart); linear warm-up: Goyal et al. 2017, Accurate,
    Large Minibatch SGD: Training ImageNet in 1 Hour, arXiv:1706.02677.
    """
    if steps < 1 or not 0 <= warmup_steps <= steps:
        raise ConfigError(
            f"need 0 <= warmup_steps <= steps and steps >= 1, got warmup_steps={warmup_steps}, "
            f"steps={steps}",
            where="train.warmup_steps",
            fix="use fewer warm-up steps than training steps",
        )
    if peak <= 0 or not 0 <= end_factor <= 1:
        raise ConfigError(
            f"need learning_rate > 0 and 0 <= end_factor <= 1, got {peak}, {end_factor}",
            where="train.learning_rate",
        )
    return optax.warmup_cosine_decay_schedule(
        0.0, peak, warmup_steps, max(steps, warmup_steps + 1), end_value=peak * end_factor
    )


def adamw(
    learning_rate: float,
    steps: int,
    *,
    warmup_steps: int = 0,
    end_factor: float = 0.1,
    weight_decay: float = 0.1,
    clip_norm: float | None = 1.0,
    b1: float = 0.9,
    b2: float = 0.95,
    eps: float = 1e-8,
) -> optax.GradientTransformation:
    """Clipping + AdamW on :func:`learning_rate_schedule` (decay on matrices only).

    The first update is -lr(0) (sign(g) + weight_decay * p) on matrices and
    -lr(0) sign(g) on vectors (m_hat = g, v_hat = g^2; eps aside):

    >>> import jax, jax.numpy as jnp
    >>> opt = adamw(1e-2, steps=100, weight_decay=0.1)
    >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
    >>> grads = {"w": jnp.full((2, 2), 0.1), "b": jnp.full(2, -0.1)}
    >>> updates, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    >>> [round(float(x), 6) for x in (updates["w"][0, 0], updates["b"][0])]  # -0.01 - 0.01 * 0.1
    [-0.011, 0.01]

    References: Loshchilov & Hutter 2019, Decoupled Weight Decay Regularization, arXiv:1711.05101;
    Kingma & Ba 2015, Adam: A Method for Stochastic Optimization, arXiv:1412.6980; clipping: Pascanu
    et al. 2013, On the Difficulty of Training Recurrent Neural Networks, arXiv:1211.5063.
    """
    schedule = learning_rate_schedule(learning_rate, steps, warmup_steps, end_factor)
    decay_matrices = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(
        optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_matrices)
    )
    return optax.chain(*parts)
