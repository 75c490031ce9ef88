"""Section 7 -- sparse mixture of experts: an MoE decoder against the dense decoder
with the same active parameters, trained for the same steps on the same batches;
and a dense decoder upcycled into an MoE half-way through its training.

Every feed-forward of the MoE decoder is a router and E experts; each token
goes to its top-K experts by ``p = softmax(x W_r)`` and the outputs are mixed
with the renormalised weights, ``y = sum_{e in topK(p)} p_e / (sum_{topK} p)
* FFN_e(x)`` (Shazeer et al. 2017, arXiv:1701.06538; Mixtral). With K = 2
experts of half the dense SwiGLU width, a token meets as many FFN parameters
as in the dense model (plus the router), while the layer holds E / 2 times
more. The training loss adds the Switch load-balancing loss ``0.01 * E sum_e
f_e P_e`` (f_e the share of choices routed to e, P_e its mean router
probability; Fedus et al. 2021, arXiv:2101.03961) and the router z-loss
``0.001 * mean logsumexp(x W_r)^2`` (ST-MoE, arXiv:2202.08906). Sparse
upcycling (Komatsuzaki et al. 2022, arXiv:2212.05055) copies a trained dense
MLP into every expert and adds a random router; with renormalised top-2
weights the upcycled model computes the dense function at first, and
training lets the experts diverge. Komatsuzaki et al. report that it beats
both continued dense training and an MoE trained from scratch for the same
extra steps.

Design. All models have the corpus language models' sizes (sections 1, 2,
6) and seed 0's initialisation and data order: dense and MoE see the same
batches in the same order. The MoE has E = 8 experts of width F / 2 with
K = 2 (F the dense MLP's width). Chosen at full scale (two seeds, held-out
NLL per token, capacity factor 1.25 in that trial): 8 x F/2 top-2 reached
2.500 and 4 x F/2 top-2 2.516 against the dense model's 2.570, while
Switch's top-1 of 4 or 8 full-width experts (weight p_e, not renormalised)
reached 2.579 and 2.593; top-1 with renormalised weights (w = p_e / p_e = 1)
gives the router no gradient from the language-model loss and reached 2.680.
The upcycled model is dense for the first half of the steps, then E experts
of width F with K = 2 (each a copy of the dense MLP, so twice the dense
model's active FFN parameters: upcycled models cost more per token than
their dense origin) for the second half, on the batches the dense model saw
at those steps, with the learning-rate schedule restarted (warm-up and
cosine over the remaining steps: 2.438 in a one-seed trial, against 2.462
and 2.475 for continuing the dense schedule without and with a warm-up). The
control with the same restart is the dense checkpoint continued as dense.
The report trains one seed (two stacked seeds cost 2.4-3x one seed's step
time here); at full scale seeds 0 and 1, trained stacked, gave held-out NLLs
of 2.565 / 2.575 (dense), 2.519 / 2.493 (MoE), 2.509 / 2.519 (dense
continued) and 2.434 / 2.444 (upcycled): every ordering held for both seeds.
The MoE's lead grows with training: at full scale it is level with the dense
model at step 150 (3.294 vs 3.297) and ahead by 0.006, 0.047 and 0.047 at
steps 300, 450 and 600; at the quick scale (150 steps, width 32) it is
behind (3.916 vs 3.883).

Dispatch. Routing is dropless (``capacity_factor=None``, MegaBlocks,
arXiv:2211.15841): no token is dropped, a token's routing does not depend on
the other tokens of its sequence, and upcycling is exact at initialisation.
On CPU, :class:`~jaxcombine.moe.SparseMoE` runs the dropless experts as a
loop over 256-row blocks of expert-sorted rows
(:func:`~jaxcombine.moe.layer.blocked_matmul`) instead of
``jax.lax.ragged_dot``, which XLA:CPU computes densely (E times the work).
A full-scale training step of one model took 45 ms dropless, 55 ms with
capacity factor 1.25 (one-hot-free gathers and a loop over experts), 29 ms
for the dense model and 76 ms for the upcycled one (fastest of 4 x 25 steps
on a shared 2-core machine).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine import tree
from jaxcombine.models import Decoder, DecoderConfig
from jaxcombine.moe import MoEConfig, upcycle
from jaxcombine.tour.fit import FitResult, fit
from jaxcombine.tour.lm import init_members, padded_batches, small_decoder
from jaxcombine.tour.report import Claim, Section, Table
from jaxcombine.tour.sections.common import corpus_data, lm_optimizer
from jaxcombine.training import lm_loss, moe_aux_losses, token_cross_entropy

TOP_K = 2
LOAD_BALANCING_WEIGHT = 1e-2  # Switch's alpha
Z_LOSS_WEIGHT = 1e-3  # ST-MoE


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What this section trains at one scale: ``seeds`` (one model of each kind per
    seed), ``experts`` per MoE layer, and at how many evenly spaced steps the
    held-out loss is measured."""

    seeds: tuple[int, ...]
    experts: int
    curve_points: int


SIZES = {"full": Sizes(seeds=(0,), experts=8, curve_points=4),
         "quick": Sizes(seeds=(0,), experts=8, curve_points=3),
         "tiny": Sizes(seeds=(0,), experts=4, curve_points=2)}  # fmt: skip


def moe_config(dense: DecoderConfig, experts: int, k: int = TOP_K) -> DecoderConfig:
    """``dense`` with every MLP replaced by ``experts`` SwiGLU experts of width
    ``intermediate_size / k``, top-``k`` dropless token choice: the same active FFN
    parameters as ``dense``."""
    moe = MoEConfig(
        num_experts=experts, hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size // k, num_experts_per_token=k,
        capacity_factor=None, activation=dense.hidden_act,
    )  # fmt: skip
    return dense.replace(moe=moe)


def parameter_counts(config: DecoderConfig) -> tuple[int, int]:
    """(total, active per token) parameters of a :class:`~jaxcombine.models.Decoder`
    with ``config``, embeddings included. Active leaves out the ``E - K`` experts a
    token does not visit on each MoE layer: ``(E - K) * (3 if gated else 2) * D * F``."""
    shapes = nnx.state(nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0))), nnx.Param)
    total = sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(shapes))
    moe = config.moe
    if moe is None:
        return total, total
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_layers))
    per_expert = (3 if moe.gated else 2) * moe.hidden_size * moe.intermediate_size
    idle = moe_layers * (moe.num_experts - moe.num_experts_per_token) * per_expert
    return total, total - idle


def moe_loss(graphdef, load_balancing_weight: float = LOAD_BALANCING_WEIGHT,
             z_loss_weight: float = Z_LOSS_WEIGHT):  # fmt: skip
    """``loss(params, rows, key, constants)``: next-token cross-entropy plus the
    weighted load-balancing and z losses of the MoE layers (as ``train.moe``)."""

    def loss(params, rows, key, constants):
        del key, constants
        out = nnx.merge(graphdef, params)(rows[:, :-1])
        ce = token_cross_entropy(out.logits, rows[:, 1:])
        aux, metrics = moe_aux_losses(out.moe_aux, load_balancing_weight, z_loss_weight)
        return ce + aux, {"cross_entropy": ce, **metrics}

    return loss


@functools.cache
def _scores_pass(graphdef):
    """The jitted pass of :func:`held_out_scores` for one architecture."""

    @jax.jit
    def scores(stacked_params, batch, real):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        mask = jnp.broadcast_to(real[:, None], inputs.shape)

        def one(params):
            out = nnx.merge(graphdef, params)(inputs, token_mask=mask)
            load = None if out.moe_aux is None else out.moe_aux.load
            return token_cross_entropy(out.logits, targets, mask), load

        return jax.vmap(one)(stacked_params)

    return scores


def held_out_scores(
    graphdef, stacked_params, rows: np.ndarray, *, batch_size: int = 32
) -> tuple[np.ndarray, np.ndarray | None]:
    """(NLL [N], load [N, MoE layers, E] or None for a dense model) of each stacked
    model on ``rows`` [R, L+1] (inputs ``row[:-1]``, targets ``row[1:]``)::

        NLL = -(1 / (R L)) sum_tokens log p(x_t | x_<t)
        load[n, l, e] = #{(token, k): expert_k(token) = e} / (R L K)

    the share of the token choices that MoE layer ``l`` routes to expert ``e``
    (each layer sums to 1; uniform is 1 / E). As
    :func:`~jaxcombine.tour.lm.held_out_nll` with the routing statistics of the same
    pass, and the last batch padded with masked rows (no loss, routed nowhere), so
    every batch has one shape: one compiled program per architecture."""
    rows = np.asarray(rows)
    scores = _scores_pass(graphdef)
    nll_total, load_total = 0.0, 0.0
    for padded, real in padded_batches(rows, batch_size):
        nll, load = scores(stacked_params, jnp.asarray(padded), jnp.asarray(real))
        nll_total = nll_total + np.asarray(nll, np.float64) * real.sum()
        if load is not None:
            load_total = load_total + np.asarray(load, np.float64) * real.sum()
    load = None if isinstance(load_total, float) else load_total / len(rows)
    return nll_total / len(rows), load


def curve_steps(steps: int, points: int) -> list[int]:
    """``points`` evenly spaced steps ending at ``steps``, and the half-way step
    (where upcycling starts)."""
    return sorted({max(1, steps * i // points) for i in range(1, points + 1)} | {steps // 2})


@dataclasses.dataclass(frozen=True)
class FromStep:
    """``dataset`` from step ``offset`` on: ``batch(t) = dataset.batch(offset + t)``, so a
    run resumed at ``offset`` sees the batches the original run saw there."""

    dataset: Any
    offset: int

    def batch(self, step: int, batch_size: int, seed: int, **options):
        return self.dataset.batch(self.offset + step, batch_size, seed, **options)


@dataclasses.dataclass
class Run:
    """A training run of stacked models (one per seed): its parameters after each of
    the global ``steps`` and, once :func:`_evaluate` ran, their held-out scores."""

    config: DecoderConfig
    graphdef: Any
    result: FitResult
    steps: list[int]
    snapshots: list[Any]
    nll: np.ndarray | None = None  # [len(steps), N]
    load: np.ndarray | None = None  # [N, MoE layers, E] at the last step

    @property
    def final(self) -> np.ndarray:
        return self.nll[-1]


def _evaluate(runs: Sequence[Run], rows: np.ndarray) -> None:
    """Set each run's held-out NLL (and, for MoE runs, the expert load of its final
    models); the runs share one architecture, so all their snapshots are scored in
    one stacked pass."""
    snapshots = [snapshot for r in runs for snapshot in r.snapshots]
    stacked = jax.tree.map(lambda *xs: jnp.concatenate(xs), *snapshots)
    nll, load = held_out_scores(runs[0].graphdef, stacked, rows)
    done = 0
    for r in runs:
        count = len(r.steps) * jax.tree.leaves(r.result.params)[0].shape[0]
        r.nll = nll[done : done + count].reshape(len(r.steps), -1)
        if load is not None:
            r.load = load[done : done + count].reshape(len(r.steps), -1, *load.shape[1:])[-1]
        done += count


def _train(tour, config, graphdef, params, loss, *, start: int, steps: int, optimizer,
           curve: Sequence[int], desc: str) -> Run:  # fmt: skip
    """``steps`` steps from global step ``start`` on the corpus (each seed's batches of
    those steps), with snapshots at the ``curve`` steps after ``start``."""
    scale, corpus = tour.scale, corpus_data(tour)
    seeds = SIZES[scale.name].seeds
    data = FromStep(corpus.train, start) if start else corpus.train
    points = [s for s in curve if start < s <= start + steps]
    result = fit(params, loss, data, seeds=seeds, steps=steps, batch_size=scale.lm_batch,
                 optimizer=optimizer, snapshot_steps=[s - start for s in points],
                 desc=desc)  # fmt: skip
    return Run(config, graphdef, result, points, [result.snapshots[s - start] for s in points])


def _upcycled(graphdef, stacked_params, seeds: Sequence[int], experts: int):
    """(config, graph definition, stacked parameters) of each seed's dense model upcycled to
    ``experts`` copies of its MLP, top-``TOP_K``, router drawn with that seed."""
    models = [
        upcycle(nnx.merge(graphdef, params), num_experts=experts, num_experts_per_token=TOP_K,
                rngs=nnx.Rngs(seed))
        for params, seed in zip(tree.unstack(stacked_params), seeds, strict=True)
    ]  # fmt: skip
    upcycled_graphdef, _ = nnx.split(models[0], nnx.Param)
    params = tree.stack([nnx.state(m, nnx.Param) for m in models])
    return models[0].config, upcycled_graphdef, params


def run(tour) -> Section:
    scale, corpus = tour.scale, corpus_data(tour)
    sizes = SIZES[scale.name]
    steps, half = scale.lm_steps, scale.lm_steps // 2
    curve = curve_steps(steps, sizes.curve_points)
    dense_config = small_decoder(corpus.tokenizer.get_vocab_size(), hidden=scale.lm_hidden,
                                 layers=scale.lm_layers, context=scale.seq_len)  # fmt: skip
    sparse_config = moe_config(dense_config, sizes.experts)
    common = dict(start=0, steps=steps, optimizer=lm_optimizer(scale), curve=curve)

    graphdef, params = init_members(dense_config, sizes.seeds)
    dense = _train(tour, dense_config, graphdef, params, lm_loss(graphdef), desc="moe: dense",
                   **common)  # fmt: skip
    graphdef, params = init_members(sparse_config, sizes.seeds)
    sparse = _train(tour, sparse_config, graphdef, params, moe_loss(graphdef),
                    desc="moe: from scratch", **common)  # fmt: skip

    # The second half: the dense checkpoint upcycled, or continued, with a restarted schedule.
    restarted = lm_optimizer(dataclasses.replace(scale, lm_steps=steps - half))
    rest = dict(start=half, steps=steps - half, curve=curve, optimizer=restarted)
    checkpoint = dense.result.snapshots[half]
    continued = _train(tour, dense_config, dense.graphdef, checkpoint, lm_loss(dense.graphdef),
                       desc="moe: dense continued", **rest)  # fmt: skip
    config, graphdef, params = _upcycled(dense.graphdef, checkpoint, sizes.seeds, sizes.experts)
    upcycled = _train(tour, config, graphdef, params, moe_loss(graphdef),
                      desc="moe: upcycled", **rest)  # fmt: skip

    runs = {"dense": dense, "moe": sparse, "dense_continued": continued, "upcycled": upcycled}
    for same_architecture in ([dense, continued], [sparse], [upcycled]):
        _evaluate(same_architecture, corpus.held_out)
    loads = {name: runs[name].load for name in ("moe", "upcycled")}
    dense_half = dense.nll[dense.steps.index(half)]
    return _section(tour, runs, loads, dense_half, half)


def _ffn(config: DecoderConfig) -> str:
    if config.moe is None:
        return f"dense SwiGLU {config.intermediate_size}"
    moe = config.moe
    return f"{moe.num_experts} x {moe.intermediate_size}, top-{moe.num_experts_per_token}"


def _mean(values) -> float:
    return float(np.mean(values))


def _per_seed(values) -> list[str]:
    """The per-seed column's cell (none with one seed)."""
    return [" / ".join(f"{v:.3f}" for v in values)] if len(values) > 1 else []


def _over(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return f"seed {seeds[0]}"
    return f"mean over seeds {', '.join(map(str, seeds))}"


def _section(tour, runs: dict[str, Run], loads: dict[str, np.ndarray], dense_half, half) -> Section:
    steps = tour.scale.lm_steps
    dense, sparse, continued, upcycled = (runs[k] for k in ("dense", "moe", "dense_continued",
                                                            "upcycled"))  # fmt: skip
    labels = {"dense": f"dense, {steps} steps", "moe": f"MoE from scratch, {steps} steps",
              "dense_continued": f"dense {half} + dense {steps - half} (restarted schedule)",
              "upcycled": f"dense {half} + upcycled MoE {steps - half}"}  # fmt: skip
    seeds = SIZES[tour.scale.name].seeds
    counts = {name: parameter_counts(r.config) for name, r in runs.items()}
    rows = {name: [labels[name], _ffn(r.config), *counts[name], _mean(r.final),
                   *_per_seed(r.final)] for name, r in runs.items()}  # fmt: skip
    checkpoint = [f"dense, {half} steps (the checkpoint)", _ffn(dense.config), *counts["dense"],
                  _mean(dense_half), *_per_seed(dense_half)]  # fmt: skip
    rows = [rows["dense"], rows["moe"], checkpoint, rows["dense_continued"], rows["upcycled"]]
    columns = ["model", "feed-forward", "parameters", "active / token", "NLL"]
    comparison = Table(
        f"Held-out NLL per token (lower is better), {_over(seeds)}",
        columns + (["per seed"] if len(seeds) > 1 else []),
        rows,
        note="Active parameters: those a token meets (the router included, embeddings "
        "included). The MoE's training loss adds 0.01 x load-balancing + 0.001 x z-loss; "
        "the held-out NLL is the cross-entropy alone.",
    )
    load_rows, load_figures = [], {}
    for name, load in loads.items():
        mean = load.mean(axis=0)  # over seeds: [layers, E]
        load_figures[name] = mean
        for layer, shares in enumerate(mean):
            load_rows.append([labels[name], layer, *shares.tolist(),
                              float(shares.max() * len(shares))])  # fmt: skip
    experts = loads["moe"].shape[-1]
    load_table = Table(
        f"Share of held-out token choices per expert (uniform = 1 / E), {_over(seeds)}",
        ["model", "layer", *[f"e{e}" for e in range(experts)], "busiest / uniform"],
        load_rows,
        digits=3,
    )
    claims = [
        Claim(
            "The MoE reaches lower loss than the dense model with the same active "
            "parameters at the same step",
            {"moe_nll": _mean(sparse.final), "dense_nll": _mean(dense.final), "step": steps,
             "active_moe": counts["moe"][1], "active_dense": counts["dense"][1]},
            held=_mean(sparse.final) < _mean(dense.final),
            source="Shazeer et al. 2017 (arXiv:1701.06538); Fedus et al. 2021 (arXiv:2101.03961)",
            required=True,
        ),
        Claim(
            "Sparse upcycling beats continuing to train the dense checkpoint for the same steps",
            {"upcycled_nll": _mean(upcycled.final), "dense_continued_nll": _mean(continued.final),
             "dense_all_steps_nll": _mean(dense.final)},
            held=_mean(upcycled.final) < _mean(continued.final),
            source="Komatsuzaki et al. 2022 (arXiv:2212.05055)",
        ),
        Claim(
            "The upcycled MoE beats the MoE trained from scratch for the same total steps",
            {"upcycled_nll": _mean(upcycled.final), "moe_from_scratch_nll": _mean(sparse.final)},
            held=_mean(upcycled.final) < _mean(sparse.final),
            source="Komatsuzaki et al. 2022 (arXiv:2212.05055)",
        ),
    ]  # fmt: skip
    figures = {
        name: {"label": labels[name], "parameters": counts[name][0], "active": counts[name][1],
               "final_nll": r.final, "curve_steps": r.steps, "curve_nll": r.nll,
               "train_losses": r.result.losses}
        for name, r in runs.items()
    }  # fmt: skip
    figures.update({"dense_half_nll": dense_half, "half": half, "load": load_figures,
                    "load_balancing_weight": LOAD_BALANCING_WEIGHT,
                    "z_loss_weight": Z_LOSS_WEIGHT})  # fmt: skip
    plots = [_plot_loss(tour, runs, labels, half, dense_half), _plot_load(tour, loads, labels)]
    summary = __doc__.split("\n\n")[1].replace("\n", " ")
    return Section(7, "Sparse mixture of experts", summary, [comparison, load_table], plots,
                   figures, claims)  # fmt: skip


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _plot_loss(tour, runs: dict[str, Run], labels, half: int, dense_half) -> str:
    from jaxcombine.tour.run import pyplot

    plt = pyplot()
    fig, (train_ax, held_ax) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, tour.scale.lm_steps // 30)
    for name, r in runs.items():
        start = 0 if name in ("dense", "moe") else half
        smooth = _moving_average(r.result.losses.mean(axis=0), window)
        train_ax.plot(start + window + np.arange(len(smooth)), smooth, label=labels[name])
        steps, nll = list(r.steps), list(r.nll.mean(axis=1))
        if start:  # the continuations start from the dense half-way checkpoint
            steps, nll = [half, *steps], [float(np.mean(dense_half)), *nll]
        held_ax.plot(steps, nll, marker="o", label=labels[name])
    train_ax.set_title(f"training loss (moving average of {window} steps)")
    held_ax.set_title("held-out NLL per token")
    for ax in (train_ax, held_ax):
        ax.set_xlabel("step")
        ax.axvline(half, color="grey", lw=0.5, ls=":")
    held_ax.legend(fontsize=8)
    return tour.save_plot(fig, "moe_loss")


def _plot_load(tour, loads: dict[str, np.ndarray], labels) -> str:
    from jaxcombine.tour.run import pyplot

    plt = pyplot()
    fig, axes = plt.subplots(1, len(loads), figsize=(5.5 * len(loads), 3.5), squeeze=False,
                             sharey=True)  # fmt: skip
    for ax, (name, load) in zip(axes[0], loads.items(), strict=True):
        mean = load.mean(axis=0)  # [layers, E]
        layers, experts = mean.shape
        width = 0.8 / layers
        for layer in range(layers):
            ax.bar(np.arange(experts) + (layer - (layers - 1) / 2) * width, mean[layer], width,
                   label=f"layer {layer}")  # fmt: skip
        ax.axhline(1 / experts, color="black", lw=0.8, ls="--", label="uniform")
        ax.set_xticks(np.arange(experts))
        ax.set_xlabel("expert")
        ax.set_ylabel("share of held-out token choices")
        ax.set_title(labels[name], fontsize=9)
        ax.legend(fontsize=8)
    return tour.save_plot(fig, "moe_load")
