"""Combination rules: pure functions of the members' next-token logits.

Every rule maps member logits ``[N, B, V]`` (N members, B rows, V tokens) and
coefficients ``w`` [N] (or per row, [N, B]) to the combined next-token
log-probabilities ``[B, V]``; all are jit-able and differentiable.

    linear        log sum_i w_i p_i                  (mixture; w_i >= 0, sum 1)
    loglinear     log_softmax(sum_i w_i log p_i)     (product of experts)
    logits        log_softmax(sum_i w_i z_i)         (raw logit arithmetic;
                                                      any sign: DExperts,
                                                      proxy-tuning)
    contrastive   log_softmax(log p_e - log p_a) over the tokens with
                  p_e >= alpha * max p_e, -inf elsewhere
                                                     (contrastive decoding)

with ``p_i = softmax(z_i)``. The linear rule is computed in log space,
``logsumexp_i(log w_i + log p_i)``, so tiny probabilities do not underflow.
DExperts (Liu et al. 2021, arXiv:2105.03023) is ``logits`` with members
(base, expert, anti-expert) and weights (1, alpha, -alpha); proxy-tuning
(Liu et al. 2024, arXiv:2401.08565) the same with (large base, small tuned,
small untuned). Contrastive decoding (Li et al. 2022, arXiv:2210.15097): the
first member is the expert, the second the amateur, ``alpha`` the
plausibility cut-off (0.1 in the paper).

>>> import jax.numpy as jnp
>>> from jaxcombine.ensemble import Combination
>>> p = jnp.array([[[0.5, 0.5]], [[0.9, 0.1]]])          # N = 2 members, B = 1, V = 2
>>> jnp.exp(Combination("linear")(jnp.log(p))).round(4).tolist()      # (p_1 + p_2) / 2
[[0.7, 0.3]]
>>> jnp.exp(Combination("loglinear")(jnp.log(p))).round(4).tolist()   # sqrt(p_1 p_2), renormalised
[[0.75, 0.25]]
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jaxcombine.errors import ConfigError

Rule = Literal["linear", "loglinear", "logits", "contrastive"]
RULES: tuple[Rule, ...] = ("linear", "loglinear", "logits", "contrastive")


@dataclasses.dataclass(frozen=True)
class Combination:
    """A rule and its constants; hashable, so it can be a static jit argument.

    ``weights``: one per member (default: uniform). ``alpha``: contrastive
    decoding's plausibility cut-off. Calling it on member logits [N, B, V]
    applies the rule (module docstring); weights passed to the call, [N] or
    [N, B], replace the constant ones.

    >>> import jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[[0.5, 0.5]], [[0.9, 0.1]]]))   # [N=2, B=1, V=2]
    >>> rule = Combination("linear", weights=(3.0, 1.0))            # normalised: 3/4, 1/4
    >>> jnp.exp(rule(logits)).round(4).tolist()                     # 0.75 * 0.5 + 0.25 * 0.9
    [[0.6, 0.4]]
    >>> jnp.exp(rule(logits, jnp.array([0.0, 1.0]))).round(4).tolist()   # the second member
    [[0.9, 0.1]]
    >>> Combination("linear", weights=(1.0, -0.5))
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: --weights: linear interpolation needs non-negative ... -0.5]
      How to fix: use log-linear or logit arithmetic (--combine logits) for negative weights

    References: ``loglinear``: Hinton 2002, Training Products of Experts by Minimizing Contrastive
    Divergence, Neural Computation 14(8); ``logits``: Liu et al. 2021, DExperts: Decoding-Time
    Controlled Text Generation with Experts and Anti-Experts, arXiv:2105.03023; ``contrastive``: Li
    et al. 2022, Contrastive Decoding: Open-ended Text Generation as Optimization, arXiv:2210.15097.
    """

    rule: Rule = "linear"
    weights: tuple[float, ...] | None = None
    alpha: float = 0.1

    def __post_init__(self):
        if self.rule not in RULES:
            raise ConfigError(
                f"unknown combination rule {self.rule!r}",
                where="--combine",
                fix=f"use one of {', '.join(RULES)}",
            )
        if self.rule == "contrastive" and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"contrastive alpha must be in [0, 1], got {self.alpha}",
                where="--alpha",
                fix="use the plausibility cut-off of Li et al. (0.1)",
            )
        negative = self.weights is not None and (
            any(w < 0 for w in self.weights) or sum(self.weights) <= 0
        )
        if self.rule == "linear" and negative:
            raise ConfigError(
                f"linear interpolation needs non-negative weights with a positive sum, "
                f"got {list(self.weights)}",
                where="--weights",
                fix="use log-linear or logit arithmetic (--combine logits) for negative weights",
            )

    def check_members(self, num_members: int) -> None:
        """A clear error when the weights do not fit ``num_members`` members."""
        if self.weights is not None and len(self.weights) != num_members:
            raise ConfigError(
                f"{len(self.weights)} weights for {num_members} members",
                where="--weights",
                fix="give one weight per --model, in the same order",
            )
        if self.rule == "contrastive" and num_members != 2:
            raise ConfigError(
                f"contrastive decoding takes two members (expert, amateur), got {num_members}",
                where="--model",
                fix="pass the expert first and the amateur second",
            )

    def coefficients(self, num_members: int) -> jax.Array:
        """The weights as an array [N] (uniform when not given)."""
        self.check_members(num_members)
        if self.weights is None:
            return jnp.full((num_members,), 1.0 / num_members, jnp.float32)
        return jnp.asarray(self.weights, jnp.float32)

    def __call__(self, logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
        """Combined log-probabilities [B, V] of member ``logits`` [N, B, V];
        ``weights`` [N] or [N, B] override the constant ones (learned gates,
        posteriors)."""
        N = logits.shape[0]
        if self.rule == "contrastive":
            self.check_members(N)
            return contrastive(logits[0], logits[1], self.alpha)
        w = self.coefficients(N) if weights is None else weights
        rule = {"linear": linear, "loglinear": loglinear, "logits": logit_arithmetic}[self.rule]
        return rule(logits, w)


def _per_row(weights: jax.Array, logits: jax.Array) -> jax.Array:
    """Weights [N] or [N, B] broadcast against logits [N, B, V]."""
    w = jnp.asarray(weights, jnp.float32)
    return w.reshape(w.shape + (1,) * (logits.ndim - w.ndim))


def linear(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``log sum_i w_i softmax(z_i)`` (weights normalised to sum 1), in log space.

    A mixture of the members' distributions (linear interpolation, as
    fairseq's and Marian's ensembles), computed as
    ``logsumexp_i(log w_i + log_softmax(z_i))`` so that tiny probabilities
    do not underflow. ``logits`` [N, B, V], ``weights`` [N] or [N, B].

    >>> import jax.numpy as jnp
    >>> p = jnp.array([[[0.5, 0.5]], [[0.9, 0.1]]])
    >>> jnp.exp(linear(jnp.log(p), jnp.array([1.0, 1.0]))).round(4).tolist()
    [[0.7, 0.3]]

    References: Jelinek & Mercer 1980, Interpolated Estimation of Markov Source Parameters from
    Sparse Data (linear interpolation of language models).
    """
    w = _per_row(weights, logits)
    w = w / jnp.sum(w, axis=0, keepdims=True)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.logsumexp(log_p, axis=0, b=w)


def loglinear(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``log_softmax(sum_i w_i log softmax(z_i))``: a weighted product of experts.

    ``p(v) ∝ prod_i p_i(v)^w_i``, a product of experts; a token that a member of
    positive weight rules out stays out. Weights are not normalised (their sum acts as an inverse
    temperature) and may be negative. ``logits`` [N, B, V], ``weights``
    [N] or [N, B].

    >>> import jax.numpy as jnp
    >>> p = jnp.array([[[0.5, 0.5]], [[0.9, 0.1]]])
    >>> # sqrt(0.5 * 0.9) : sqrt(0.5 * 0.1) = 3 : 1
    >>> jnp.exp(loglinear(jnp.log(p), jnp.array([0.5, 0.5]))).round(4).tolist()
    [[0.75, 0.25]]

    References: Hinton 2002, Training Products of Experts by Minimizing Contrastive Divergence,
    Neural Computation 14(8).
    """
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jax.nn.log_softmax(jnp.sum(_per_row(weights, logits) * log_p, axis=0), axis=-1)


def logit_arithmetic(logits: jax.Array, weights: jax.Array) -> jax.Array:
    """``log_softmax(sum_i w_i z_i)`` on raw logits; weights of any sign (DExperts).

    DExperts (Liu et al. 2021, arXiv:2105.03023): members (base, expert,
    anti-expert) with weights (1, alpha, -alpha) give
    ``z_base + alpha (z_expert - z_anti)``; proxy-tuning (Liu et al. 2024,
    arXiv:2401.08565) the same with (large base, small tuned, small untuned).

    >>> import jax.numpy as jnp
    >>> z = jnp.array([[[0.0, 0.0]], [[2.0, 0.0]], [[0.0, 2.0]]])   # base, expert, anti
    >>> out = logit_arithmetic(z, jnp.array([1.0, 0.5, -0.5]))       # z = [1, -1]
    >>> jnp.exp(out).round(4).tolist()                                # [e, 1/e] / (e + 1/e)
    [[0.8808, 0.1192]]
    """
    z = jnp.sum(_per_row(weights, logits) * logits.astype(jnp.float32), axis=0)
    return jax.nn.log_softmax(z, axis=-1)


def contrastive(expert: jax.Array, amateur: jax.Array, alpha: float) -> jax.Array:
    """Contrastive decoding's distribution: ``log p_e - log p_a`` renormalised over
    the plausible tokens ``{v : p_e(v) >= alpha * max p_e}``; ``-inf`` elsewhere.

    Li et al. 2022, arXiv:2210.15097: the expert's preferences minus the
    amateur's, restricted to tokens the expert finds plausible. ``expert``
    and ``amateur`` are logits [B, V].

    >>> import jax.numpy as jnp
    >>> expert = jnp.log(jnp.array([[0.6, 0.3, 0.1]]))
    >>> amateur = jnp.log(jnp.array([[0.5, 0.1, 0.4]]))
    >>> # cut-off 0.2 * 0.6 = 0.12 drops token 2; 0.6/0.5 : 0.3/0.1 = 1.2 : 3
    >>> jnp.exp(contrastive(expert, amateur, alpha=0.2)).round(4).tolist()
    [[0.2857, 0.7143, 0.0]]
    """
    log_e = jax.nn.log_softmax(expert.astype(jnp.float32), axis=-1)
    log_a = jax.nn.log_softmax(amateur.astype(jnp.float32), axis=-1)
    cutoff = jnp.max(log_e, axis=-1, keepdims=True) + jnp.log(jnp.float32(alpha))
    scores = jnp.where(log_e >= cutoff, log_e - log_a, -jnp.inf)
    return jax.nn.log_softmax(scores, axis=-1)
