"""Distillation: an ensemble's (or any teacher's) distribution into one student.

Token level (Hinton et al. 2015, arXiv:1503.02531): the student matches the
teacher's tempered distribution, mixed with the hard labels,

    L = h * CE(y, s) + (1 - h) * T^2 * KL(softmax(t / T) || softmax(s / T))

with student logits ``s``, teacher log-probabilities ``t``; the ``T^2`` keeps
the soft term's gradients on the scale of the hard term's as T changes.
Sequence level (Kim & Rush 2016, arXiv:1606.07947): the student is trained on
the teacher's own generations (see ``train/distill.py``).

Teachers (:func:`teacher_log_probs`) run inside the jitted training step
under ``stop_gradient`` (:func:`ensemble_log_probs` for stacked members of
any other module, such as MLP classifiers); they are arguments of the step, never part of the
trained (or checkpointed) state.
"""

from jaxcombine.distill._losses import (
    distillation_loss,
    ensemble_log_probs,
    soft_cross_entropy,
    teacher_log_probs,
    tempered_kl,
)

__all__ = [
    "distillation_loss",
    "ensemble_log_probs",
    "soft_cross_entropy",
    "teacher_log_probs",
    "tempered_kl",
]
