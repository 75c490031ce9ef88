"""Section 5 -- positive and negative evidence: a general model plus an in-domain
model minus an out-of-domain model, scored on the in-domain package.

The general model ``G`` is seed member 0 of section 1; ``I`` and ``O`` are its
fine-tunes on the in-domain and the out-of-domain package (section 2's
fine-tunes). Two ways to add ``I``'s evidence and subtract ``O``'s:

* in the outputs, ``log_softmax(z_G + alpha (z_I - z_O))`` per token -- the
  product of experts with an anti-expert of DExperts (Liu et al. 2021,
  arXiv:2105.03023) and of proxy-tuning (Liu et al. 2024, arXiv:2401.08565),
  at three forward passes;
* in the weights, ``theta_G + alpha (theta_I - theta_O)`` -- task arithmetic
  with a negative task (Ilharco et al. 2023, arXiv:2212.04089), at one.

``alpha`` is chosen from a grid on a validation half of each package's
held-out rows (the even rows) and scored on the other half. The fine-tune on the in-domain
package is itself the strongest in-domain model here; the question is how
much of its gain the general model recovers from the difference of two
models, and what it costs on the out-of-domain package.

Measured at full scale (``jaxcombine tour``, NLL per token on the test halves,
email in-domain, json out-of-domain): G 2.056 / 2.972, I 1.884 / 3.649,
O 3.649 / 3.049; in the outputs (alpha 0.25) 1.976 / 3.462, in the weights
(alpha 0.25) 1.979 / 3.275: they recover 47% and 45% of I's in-domain gain over
G, and the weight-space edit costs less out of domain.
"""

from __future__ import annotations

import numpy as np

from jaxcombine import tree
from jaxcombine.ensemble import Combination
from jaxcombine.merging import apply_task_vector, task_vector
from jaxcombine.tour.lm import held_out_nll
from jaxcombine.tour.report import Claim, Section, Table
from jaxcombine.tour.sections.common import corpus_data, finetunes, halves

ALPHAS = (0.25, 0.5, 1.0, 2.0)


def _scores(graphdef, general, inside, outside, rows) -> dict[str, list[float]]:
    """NLL on ``rows`` of G, I, O, and of both combinations at every alpha."""
    stacked = tree.stack([general, inside, outside])
    rules = {f"outputs {a:g}": Combination("logits", weights=(1.0, a, -a)) for a in ALPHAS}
    outputs = held_out_nll(graphdef, stacked, rows, rules)
    difference = task_vector(inside, outside)
    merged = tree.stack([apply_task_vector(general, difference, a) for a in ALPHAS])
    weights = held_out_nll(graphdef, merged, rows)["members"]
    general_nll, inside_nll, outside_nll = outputs["members"]
    return {"general": general_nll, "in_domain": inside_nll, "out_of_domain": outside_nll,
            "outputs": [outputs[f"outputs {a:g}"] for a in ALPHAS], "weights": weights}  # fmt: skip


def run(tour) -> Section:
    tuned = finetunes(tour)
    corpus = corpus_data(tour)
    inside_name, outside_name = tuned.names
    general = tree.unstack(tuned.general)[0]
    inside = tree.unstack(tuned.in_domain)[0]
    outside = tree.unstack(tuned.out_of_domain)[0]
    split = {name: halves(corpus.domains[name][1]) for name in tuned.names}
    scores = {
        (name, part): _scores(tuned.graphdef, general, inside, outside, rows)
        for name, halves in split.items()
        for part, rows in zip(("validation", "test"), halves, strict=True)
    }
    chosen = {
        space: int(np.argmin(scores[(inside_name, "validation")][space]))
        for space in ("outputs", "weights")
    }
    test_in, test_out = scores[(inside_name, "test")], scores[(outside_name, "test")]
    rows = [
        ["general model G", 1, test_in["general"], test_out["general"]],
        [f"fine-tune on {inside_name} (I)", 1, test_in["in_domain"], test_out["in_domain"]],
        [f"fine-tune on {outside_name} (O)", 1, test_in["out_of_domain"],
         test_out["out_of_domain"]],
    ]  # fmt: skip
    for space, label, passes in (("outputs", "z_G + a (z_I - z_O)", 3),
                                 ("weights", "theta_G + a (theta_I - theta_O)", 1)):  # fmt: skip
        i = chosen[space]
        rows.append([f"{label}, a = {ALPHAS[i]:g}", passes, test_in[space][i], test_out[space][i]])
    table = Table(
        f"NLL per token on the test halves of {inside_name} (in-domain) and {outside_name} "
        "(out-of-domain)",
        ["model", "forward passes", f"NLL {inside_name}", f"NLL {outside_name}"],
        rows,
        note=f"a chosen from {list(ALPHAS)} on the validation half of {inside_name}.",
    )
    best = min(test_in[space][chosen[space]] for space in chosen)
    claim = Claim(
        "Adding in-domain and subtracting out-of-domain evidence lowers the general model's "
        "in-domain NLL",
        {"general_nll": test_in["general"], "combined_nll": best,
         "in_domain_finetune_nll": test_in["in_domain"]},
        held=best < test_in["general"],
        source="Liu et al. 2021 (arXiv:2105.03023); Ilharco et al. 2023 (arXiv:2212.04089)",
    )  # fmt: skip
    figures = {
        "alphas": list(ALPHAS),
        "chosen_alpha": {space: ALPHAS[i] for space, i in chosen.items()},
        "scores": {f"{name}/{part}": value for (name, part), value in scores.items()},
    }
    return Section(5, "Positive and negative evidence", __doc__.split("\n\n")[1].replace("\n", " "),
                   [table], figures=figures, claims=[claim])  # fmt: skip
