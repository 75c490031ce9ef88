"""The tour's LM helpers against plain loops: held-out NLL of every member and of
the combination rules = each member run alone, rules in float64 numpy."""

from __future__ import annotations

import numpy as np
from flax import nnx

from jaxcombine import tree
from jaxcombine.ensemble import Combination
from jaxcombine.models import Decoder
from jaxcombine.tour.lm import held_out_nll, init_members, small_decoder


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_held_out_nll_equals_members_run_one_by_one():
    config = small_decoder(50, hidden=16, layers=1, context=16)
    seeds = [4, 7, 9]
    graphdef, params = init_members(config, seeds)
    rows = np.random.default_rng(0).integers(0, 50, size=(11, 9))
    weights = (0.5, 0.2, 0.3)
    rules = {"linear": Combination("linear", weights), "loglinear": Combination("loglinear")}
    got = held_out_nll(graphdef, params, rows, rules, batch_size=4)  # 3 batches, one short
    log_probs = []
    for seed, member in zip(seeds, tree.unstack(params), strict=True):
        alone = Decoder(config, rngs=nnx.Rngs(seed))  # init_members' contract
        np.testing.assert_array_equal(
            nnx.state(alone, nnx.Param)["lm_head"]["kernel"].get_value(),
            member["lm_head"]["kernel"].get_value(),
        )
        logits = np.asarray(alone(rows[:, :-1]).logits, np.float64)
        log_probs.append(_log_softmax(logits))
    log_probs = np.stack(log_probs)  # [N, R, T, V]
    targets = rows[:, 1:, None]

    def nll(lp):
        return float(-np.mean(np.take_along_axis(lp, targets, -1)))

    np.testing.assert_allclose(got["members"], [nll(lp) for lp in log_probs], rtol=1e-5)
    w = np.asarray(weights)[:, None, None, None] / sum(weights)
    linear = np.logaddexp.reduce(np.log(w) + log_probs, axis=0)
    loglinear = _log_softmax(log_probs.mean(0))
    np.testing.assert_allclose(got["linear"], nll(linear), rtol=1e-5)
    np.testing.assert_allclose(got["loglinear"], nll(loglinear), rtol=1e-5)
