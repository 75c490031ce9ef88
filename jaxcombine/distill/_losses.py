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
    ``student_logits`` and ``teacher_log_probs`` [..., V].

    With ``p = softmax(t / T)`` and ``q = softmax(s / T)`` per token,
    ``KL = sum_v p(v) (log p(v) - log q(v))`` (terms with p(v) = 0 count 0),
    averaged over the tokens where ``mask`` [...] is True (all by default).
    Hinton et al. 2015, arXiv:1503.02531 (the soft term of
    :func:`distillation_loss`).

    >>> import numpy as np
    >>> student = np.array([[2.0, 0.0, 0.0]])               # one token, V = 3
    >>> teacher = np.log(np.array([[0.5, 0.25, 0.25]]))
    >>> p = np.exp(teacher / 2) / np.exp(teacher / 2).sum()  # T = 2
    >>> q = np.exp(student / 2) / np.exp(student / 2).sum()
    >>> bool(np.isclose(tempered_kl(student, teacher, 2.0), np.sum(p * np.log(p / q))))
    True
    >>> float(tempered_kl(teacher, teacher))                  # a student equal to its teacher
    0.0
    """
    t = jax.nn.log_softmax(teacher_log_probs.astype(jnp.float32) / temperature, axis=-1)
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(t)
    kl = jnp.sum(jnp.where(p > 0, p * (t - s), 0.0), axis=-1)
    return _masked_mean(kl, mask)


def soft_cross_entropy(student_logits, teacher_log_probs, mask=None):
    """Mean over tokens of -sum_v p_teacher(v) log p_student(v): the student's NLL
    under the teacher's distribution (KL plus the teacher's entropy).

    ``CE(p, q) = -sum_v p(v) log q(v) = KL(p || q) + H(p)`` with
    ``p = exp(teacher_log_probs)``, ``q = softmax(student_logits)`` (no
    temperature), averaged over the tokens where ``mask`` is True.

    >>> import numpy as np
    >>> student = np.array([[2.0, 0.0, 0.0]])
    >>> p = np.array([[0.5, 0.25, 0.25]])
    >>> q = np.exp(student) / np.exp(student).sum()
    >>> bool(np.isclose(soft_cross_entropy(student, np.log(p)), -np.sum(p * np.log(q))))
    True
    >>> entropy = -np.sum(p * np.log(p))                      # 1.5 log 2
    >>> bool(np.isclose(soft_cross_entropy(student, np.log(p)),
    ...                 tempered_kl(student, np.log(p)) + entropy))
    True

    References: Hinton et al. 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531
    (soft targets); Kim & Rush 2016, Sequence-Level Knowledge Distillation, arXiv:1606.07947
    (word-level distillation minimises this loss).
    """
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
    ``CE`` is the mean of ``-log softmax(s)[y]`` over the tokens, ``KL_T``
    :func:`tempered_kl`; ``T^2`` keeps the soft term's gradients on the hard
    term's scale as T changes (Hinton et al. 2015, arXiv:1503.02531).

    >>> import numpy as np
    >>> student = np.array([[2.0, 0.0, 0.0]])
    >>> teacher = np.log(np.array([[0.5, 0.25, 0.25]]))
    >>> loss, parts = distillation_loss(student, teacher, np.array([0]),
    ...                                 temperature=2.0, hard_weight=0.5)
    >>> hard = -np.log(np.exp(2.0) / (np.exp(2.0) + 2))      # -log softmax(s)[y = 0]
    >>> bool(np.isclose(parts["hard_loss"], hard))
    True
    >>> bool(np.isclose(loss, 0.5 * hard + 0.5 * 2.0**2 * parts["soft_loss"]))
    True
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
    the ensemble's distribution), ``params`` its (stacked) parameters.

    ``log_softmax(teacher(params, tokens, mask, None)[0])`` under
    ``stop_gradient``: the teacher is an argument of the training step, not
    a trained parameter. Any callable of that signature works, e.g. a
    bigram table:

    >>> import jax, jax.numpy as jnp
    >>> def bigram(table, tokens, mask, cache):   # logits of the next token: table[token]
    ...     return table[tokens], cache
    >>> table = jnp.array([[0.0, 0.0], [0.0, jnp.log(3.0)]])
    >>> lp = teacher_log_probs(bigram, table, jnp.array([[0, 1]]))
    >>> jnp.exp(lp).round(4).tolist()            # [1/2, 1/2] after 0, [1/4, 3/4] after 1
    [[[0.5, 0.5], [0.25, 0.75]]]
    >>> jax.grad(lambda t: teacher_log_probs(bigram, t, jnp.array([[0, 1]]))[0, 1, 1])(table)
    Array([[0., 0.],
           [0., 0.]], dtype=float32)

    References: Hinton et al. 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531.
    """
    if mask is None:
        mask = jnp.ones(tokens.shape, bool)
    logits, _ = teacher(jax.lax.stop_gradient(params), tokens, mask, None)
    return jax.lax.stop_gradient(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def ensemble_log_probs(graphdef, stacked_params, inputs, combination):
    """Combined log-probabilities [..., C] of stacked members of any module that maps
    ``inputs`` to logits (e.g. :class:`~jaxcombine.models.MLPClassifier`), with no
    gradient: each member's forward is vmapped over the leading axis of
    ``stacked_params`` and the logits [N, ..., C] combined by ``combination``
    (a :class:`~jaxcombine.ensemble.Combination`).

    With ``linear`` weights w: ``log sum_i w_i softmax(f(theta_i, x))``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine import tree
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import MLPClassifier
    >>> members = [MLPClassifier(2, (4,), 3, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> graphdef, _ = nnx.split(members[0])
    >>> stacked = tree.stack([nnx.state(m) for m in members])   # leaves [2, ...]
    >>> x = jnp.array([[0.5, -1.0], [1.0, 2.0]])
    >>> lp = ensemble_log_probs(graphdef, stacked, x, Combination("linear"))
    >>> lp.shape
    (2, 3)
    >>> p0, p1 = (jax.nn.softmax(m(x)) for m in members)  # each member on its own
    >>> bool(jnp.allclose(jnp.exp(lp), (p0 + p1) / 2, atol=1e-6))
    True

    References: Hinton et al. 2015, Distilling the Knowledge in a Neural Network, arXiv:1503.02531
    (an ensemble distilled into one model).
    """
    params = jax.lax.stop_gradient(stacked_params)
    logits = jax.vmap(lambda p: nnx.merge(graphdef, p)(inputs))(params)
    return jax.lax.stop_gradient(combination(logits))
