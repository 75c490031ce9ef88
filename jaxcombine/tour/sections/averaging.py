"""Section 2 -- averaging: checkpoints and an EMA along one run; uniform and greedy
soups of fine-tunes of one base.

Along one run: each of the seed members of section 1 keeps its last five of
ten evenly spaced checkpoints and an exponential moving average of every
step's weights, ``ema_t = d ema_(t-1) + (1 - d) theta_t`` with the horizon
``1 / (1 - d)`` a tenth of the run (Polyak & Juditsky 1992; checkpoint
averaging as in Vaswani et al. 2017, arXiv:1706.03762; SWA, Izmailov et al.
2018, arXiv:1803.05407). With a learning rate that decays to a tenth, the
last iterate is already an average of sorts, so the gain is expected to be
small. Soups (Wortsman et al. 2022, arXiv:2203.05482): the general model
(seed member 0) is fine-tuned several times on one package from different
seeds; the uniform soup averages all fine-tunes, the greedy soup adds them
best-first while the NLL on a validation half of the package's held-out rows
falls, and both are scored on the other half beside the ingredients and
their output ensemble (which costs K forward passes, the soup one).
"""

from __future__ import annotations

import numpy as np

from jaxcombine import tree
from jaxcombine.ensemble import Combination
from jaxcombine.merging import greedy_soup, running_average, uniform_soup
from jaxcombine.tour.lm import held_out_nll
from jaxcombine.tour.report import Claim, Section, Table
from jaxcombine.tour.sections.common import (
    averaging_schedule,
    corpus_data,
    finetunes,
    halves,
    lm_members,
)


def _checkpoint_average(snapshots: dict[int, object]) -> object:
    """Running average of the stacked checkpoints (member by member)."""
    averager = running_average()
    steps = sorted(snapshots)
    state = averager.init(snapshots[steps[0]])
    for step in steps:
        state = averager.update(state, snapshots[step])
    return averager.value(state)


def along_one_run(tour) -> tuple[Table, dict]:
    corpus = corpus_data(tour)
    members = lm_members(tour, "seeds")
    checkpoints, decay = averaging_schedule(tour.scale.lm_steps)
    average = held_out_nll(members.graphdef, _checkpoint_average(members.result.snapshots),
                           corpus.held_out)["members"]  # fmt: skip
    ema_nll = held_out_nll(members.graphdef, members.result.average, corpus.held_out)["members"]
    scores = {"last_iterate": ("last iterate", members.nll(corpus.held_out)["members"]),
              "checkpoint_average": (f"average of the checkpoints at steps "
                                     f"{', '.join(map(str, checkpoints))}", average),
              "ema": (f"EMA (decay {decay:.3f})", ema_nll)}  # fmt: skip
    rows = [[label, *nll, float(np.mean(nll))] for label, nll in scores.values()]
    count = len(ema_nll)
    table = Table(
        "Along one run: held-out NLL per token of each seed member",
        ["weights", *[f"member {i}" for i in range(count)], "mean"],
        rows,
    )
    figures = {key: nll for key, (_, nll) in scores.items()}
    return table, {"checkpoints": checkpoints, "ema_decay": decay, **figures}


def soups(tour) -> tuple[Table, dict, Claim]:
    tuned = finetunes(tour)
    inside = tuned.names[0]
    validation, test = halves(corpus_data(tour).domains[inside][1])
    graphdef = tuned.graphdef
    ingredients = tree.unstack(tuned.in_domain)

    def nll(params, rows) -> float:
        return held_out_nll(graphdef, tree.stack([params]), rows)["members"][0]

    uniform = uniform_soup(ingredients)
    greedy, record = greedy_soup(ingredients, lambda p: -nll(p, validation))
    ensemble = {"ensemble": Combination("linear")}
    member_scores = held_out_nll(graphdef, tuned.in_domain, test, ensemble)
    ingredient_nll = member_scores["members"]
    figures = {
        "domain": inside,
        "general": nll(tree.unstack(tuned.general)[0], test),
        "ingredients": ingredient_nll,
        "best_ingredient": min(ingredient_nll),
        "uniform_soup": nll(uniform, test),
        "greedy_soup": nll(greedy, test),
        "greedy_ingredients": [int(i) for i in record.ingredients],
        "ensemble_of_ingredients": member_scores["ensemble"],
    }
    table = Table(
        f"Soups of {len(ingredients)} fine-tunes of the general model on {inside}: "
        "NLL per token on the test half of its held-out rows",
        ["model", "forward passes", "NLL"],
        [["general model (before fine-tuning)", 1, figures["general"]],
         ["best ingredient", 1, figures["best_ingredient"]],
         ["mean ingredient", 1, float(np.mean(ingredient_nll))],
         ["uniform soup", 1, figures["uniform_soup"]],
         [f"greedy soup (ingredients {figures['greedy_ingredients']})", 1, figures["greedy_soup"]],
         ["ensemble of the ingredients (linear)", len(ingredients),
          figures["ensemble_of_ingredients"]]],
        note="The greedy soup chose its ingredients on the validation half.",
    )  # fmt: skip
    claim = Claim(
        "A soup of fine-tunes of one base is at least as good as its best ingredient, at "
        "the cost of one model",
        {"best_soup_nll": min(figures["uniform_soup"], figures["greedy_soup"]),
         "best_ingredient_nll": figures["best_ingredient"]},
        held=min(figures["uniform_soup"], figures["greedy_soup"]) <= figures["best_ingredient"],
        source="Wortsman et al. 2022 (arXiv:2203.05482)",
    )  # fmt: skip
    return table, figures, claim


def run(tour) -> Section:
    run_table, run_figures = along_one_run(tour)
    soup_table, soup_figures, claim = soups(tour)
    return Section(2, "Averaging", __doc__.split("\n\n")[1].replace("\n", " "),
                   [run_table, soup_table], figures={"one_run": run_figures, "soups": soup_figures},
                   claims=[claim])  # fmt: skip
