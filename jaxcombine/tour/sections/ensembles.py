"""Section 1 -- ensembles: members from seeds and from bagging; linear vs log-linear
vs a learned gate vs the best single member.

Members are small decoders trained on the stdlib corpus, four from different
seeds (initialisation and data order) and four from bootstrap resamples of
the training rows (bagging, Breiman 1996). On held-out rows each member, the
linear mixture ``log sum_i w_i p_i``, the product of experts
``log_softmax(sum_i w_i log p_i)`` (Hinton 2002) and a gate that weights the
members per token from their hidden states (trained on half of the held-out
rows, scored on the other half) are compared by NLL per token. Lakshminarayanan
et al. 2017 (arXiv:1612.01474) report that ensembles of seeds beat their
members; bagging usually adds less for neural networks because each
resample sees only ~63% of the distinct rows.

Measured at full scale (``jaxcombine tour``, NLL per token on held-out rows):
seeds: best member 2.569, linear 2.389, log-linear 2.350, gate 2.462;
bagging: best member 2.606, linear 2.405, log-linear 2.362, gate 2.479. The
product of experts is the best rule for members trained on the same data;
the gate, trained on ~100 held-out rows for members that do not specialise,
recovers only part of the uniform rules' gain.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx

from jaxcombine.ensemble import Combination, Gate, StackedForward, gate_weights, train_gate
from jaxcombine.tour.report import Claim, Section, Table
from jaxcombine.tour.sections.common import corpus_data, halves, lm_members

RULES = {"linear": Combination("linear"), "loglinear": Combination("loglinear")}


def _gated_nll(graphdef, params, hidden_size, fit_rows, test_rows, steps) -> float:
    """NLL of the linear rule with a learned gate: trained on ``fit_rows``, scored
    on ``test_rows``."""
    forward = StackedForward(graphdef, Combination("linear"))
    count = jax.tree.leaves(params)[0].shape[0]
    gate, _ = train_gate(Gate(count, hidden_size, rngs=nnx.Rngs(0)), forward, params,
                         fit_rows, steps=steps, batch_size=16)  # fmt: skip
    gate_graphdef, gate_params = nnx.split(gate)
    tokens = np.asarray(test_rows)
    logits, hidden = forward.member_outputs(params, tokens, np.ones(tokens.shape, bool), None)[:2]
    weights = gate_weights(gate_graphdef, gate_params, hidden)
    log_p = Combination("linear")(logits, weights)[:, :-1]
    picked = np.take_along_axis(np.asarray(log_p), tokens[:, 1:, None], -1)
    return float(-picked.mean())


def run(tour) -> Section:
    corpus = corpus_data(tour)
    groups = {"seeds": lm_members(tour, "seeds"), "bagging": lm_members(tour, "bagging")}
    fit_rows, test_rows = halves(corpus.held_out)
    rows, figures = [], {}
    for name, group in groups.items():
        scores = group.nll(test_rows, RULES)
        gated = _gated_nll(group.graphdef, group.params, group.config.hidden_size, fit_rows,
                           test_rows, steps=tour.scale.lm_steps // 3)  # fmt: skip
        members = scores["members"]
        figures[name] = {**scores, "gate": gated, "best_member": min(members)}
        rows.append([name, len(members), min(members), float(np.mean(members)),
                     scores["linear"], scores["loglinear"], gated])  # fmt: skip
    best_member = min(figures[g]["best_member"] for g in groups)
    best_ensemble = min(min(figures[g][r] for r in ("linear", "loglinear", "gate")) for g in groups)
    table = Table(
        "Held-out NLL per token (lower is better)",
        ["members", "N", "best member", "mean member", "linear", "log-linear", "gate"],
        rows,
        note="Gate: trained on half of the held-out rows, scored with the others on the rest.",
    )
    claim = Claim(
        "The best ensemble beats its best member",
        {"best_ensemble_nll": best_ensemble, "best_member_nll": best_member},
        held=best_ensemble < best_member,
        source="Lakshminarayanan et al. 2017 (arXiv:1612.01474)",
        required=True,
    )
    return Section(1, "Ensembles", __doc__.split("\n\n")[1].replace("\n", " "), [table],
                   figures=figures, claims=[claim])  # fmt: skip
