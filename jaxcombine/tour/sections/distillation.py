"""Section 6 -- distillation: the ensemble of section 1 (members from seeds, linear
rule) into one student of a member's size, with the members' steps.

The student minimises ``T^2 KL(softmax(t / T) || softmax(s / T))`` against
the ensemble's log-probabilities ``t`` on the training rows (Hinton et al.
2015, arXiv:1503.02531: a student kept most of a 10-model ensemble's gain);
the same student trained on the hard labels alone is the baseline. The
share of the ensemble's gain kept is
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
from jaxcombine.tour.sections.common import corpus_data, lm_members, lm_optimizer
from jaxcombine.training import lm_loss

TEMPERATURE = 2.0
STUDENT_SEED = 100


def student_loss(graphdef, teacher: StackedForward, temperature: float):
    """Token-level distillation from the stacked ``teacher`` (its parameters are the
    step's constants)."""

    def loss(params, rows, key, teacher_params):
        del key
        inputs, targets = rows[:, :-1], rows[:, 1:]
        t = teacher_log_probs(teacher, teacher_params, inputs)
        s = nnx.merge(graphdef, params)(inputs).logits
        return distillation_loss(s, t, targets, temperature=temperature, hard_weight=0.0)

    return loss


def run(tour) -> Section:
    corpus = corpus_data(tour)
    teachers = lm_members(tour, "seeds")
    scale = tour.scale
    graphdef, student = init_members(teachers.config, [STUDENT_SEED])
    forward = StackedForward(teachers.graphdef, Combination("linear"))
    common = dict(seeds=[STUDENT_SEED], steps=scale.lm_steps, batch_size=scale.lm_batch,
                  optimizer=lm_optimizer(scale))  # fmt: skip
    soft = fit(student, student_loss(graphdef, forward, TEMPERATURE), corpus.train,
               constants=teachers.params, desc="distil: student", **common)  # fmt: skip
    hard = fit(student, lm_loss(graphdef), corpus.train, desc="distil: hard labels", **common)
    ensemble = teachers.nll(corpus.held_out, {"linear": Combination("linear")})
    student_nll = held_out_nll(graphdef, soft.params, corpus.held_out)["members"][0]
    hard_nll = held_out_nll(graphdef, hard.params, corpus.held_out)["members"][0]
    member = float(np.mean(ensemble["members"]))
    kept = (member - student_nll) / (member - ensemble["linear"])
    figures = {"mean_member": member, "ensemble": ensemble["linear"], "student": student_nll,
               "hard_label_student": hard_nll, "gain_kept": kept, "temperature": TEMPERATURE,
               "student_losses": soft.losses[0], "hard_losses": hard.losses[0]}  # fmt: skip
    plot = _plot(tour, soft.losses[0], hard.losses[0])
    table = Table(
        "Held-out NLL per token",
        ["model", "NLL"],
        [["mean member", member], ["ensemble (linear)", ensemble["linear"]],
         [f"student, distilled (T = {TEMPERATURE:g})", student_nll],
         ["student, hard labels", hard_nll], ["share of the ensemble's gain kept", kept]],
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
    ax.plot(soft_losses, label="distilled (soft-target loss)")
    ax.plot(hard_losses, label="hard labels (cross-entropy)")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.legend()
    fig.tight_layout()
    path = tour.plot_path("distillation_loss")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path.relative_to(tour.out))
