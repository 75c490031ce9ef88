"""Distillation losses and the teacher's distribution (see the package docstring)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.training.losses import token_cross_entropy


def _masked_mean(values: jax.Array, mask: jax.Array | None) -> jax.Array:
    if mask is None:
        return jnp.mean(values)
    mask = mask.astype(jnp.float32)
    return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def tempered_kl(student_logits, teacher_log_probs, temperature: float = 1.0, mask=None):
    """Mean over tokens of KL(softmax(t / T) || softmax(s / T)), in float32;
    ``student_logits`` and ``teacher_log_probs`` [..., V]."""
    t = jax.nn.log_softmax(teacher_log_probs.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(t)
    kl = jnp.sum(jnp.where(p > 0, p * (t - s), 0.0), axis=-1)
    return _masked_mean(kl, mask)


def soft_cross_entropy(student_logits, teacher_log_probs, mask=None):
    """Mean over tokens of -sum_v p_teacher(v) log p_student(v): the student's NLL
    under the teacher's distribution (KL plus the teacher's entropy)."""
    p = jnp.exp(teacher_log_probs.astype(jnp.float32))
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32), axis=-1)
    return _masked_mean(-jnp.sum(p * s, axis=-1), mask)


def distillation_loss(
    student_logits,
    teacher_log_probs,
    targets,
    *,
    temperature: float = 1.0,
    hard_weight: float = 0.0,
    mask=None,
):
    """``h * CE(targets, s) + (1 - h) * T^2 * KL_T(teacher || student)`` and its parts.

    Returns ``(loss, {"hard_loss", "soft_loss"})``; ``hard_weight`` h in [0, 1].
    """
    soft = tempered_kl(student_logits, teacher_log_probs, temperature, mask)
    hard = token_cross_entropy(student_logits, targets, mask)
    loss = hard_weight * hard + (1.0 - hard_weight) * temperature**2 * soft
    return loss, {"hard_loss": hard, "soft_loss": soft}


def teacher_log_probs(teacher, params, tokens, mask=None):
    """The teacher's log-probabilities [B, T, V] for ``tokens`` [B, T], with no
    gradient: ``teacher`` is a forward of :mod:`jaxcombine.decoding`'s protocol
    (a :class:`~jaxcombine.decoding.DecoderForward`, or a
    :class:`~jaxcombine.ensemble.StackedForward` whose combination rule gives
    the ensemble's distribution), ``params`` its (stacked) parameters."""
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    logits, _ = teacher(jax.lax.stop_gradient(params), tokens, mask, None)
    return jax.lax.stop_gradient(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def ensemble_log_probs(graphdef, stacked_params, inputs, combination):
    """Combined log-probabilities [..., C] of stacked members of any module that maps
    ``inputs`` to logits (e.g. :class:`~jaxcombine.models.MLPClassifier`), with no
    gradient: each member's forward is vmapped over the leading axis of
    ``stacked_params`` and the logits [N, ..., C] combined by ``combination``
    (a :class:`~jaxcombine.ensemble.Combination`)."""
    params = jax.lax.stop_gradient(stacked_params)
    logits = jax.vmap(lambda p: nnx.merge(graphdef, p)(inputs))(params)
    return jax.lax.stop_gradient(combination(logits))
