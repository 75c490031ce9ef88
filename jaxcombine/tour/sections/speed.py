"""Section 8 -- speed: an ensemble decoded in one jitted loop, a shared prefix's
state reused, and speculative decoding.

Three ways of combining models for speed, timed on the corpus decoders of
section 1 (members from seeds, linear rule ``log sum_i w_i p_i``), greedy,
prompts from held-out rows, no EOS (every row generates the same number of
tokens). *Ensemble decoding*: the N members stacked and decoded together in
one compiled ``while_loop`` (``jaxcombine.ensemble.stacked`` +
``jaxcombine.decoding.generate``) against the way it is done by hand: a
Python loop over tokens calling each member's jitted one-token step and
combining the logits on the host; both must give the same tokens.
*Prefix reuse*: requests that share a context continue from its KV state,
computed once (``prefill_prefix``), instead of prefilling ``prefix +
request`` every time (prefix caching: Prompt Cache, Gim et al. 2023,
arXiv:2311.04934; RadixAttention, Zheng et al. 2023, arXiv:2312.07104).
*Speculative decoding* (Leviathan et al. 2023, arXiv:2211.17192): a draft
proposes ``g`` tokens, the target checks them in one call, and greedy output
equals the target's. If an iteration yields ``E`` tokens (``E = (1 -
a^(g+1)) / (1 - a)`` when each proposal is accepted with probability ``a``)
and costs ``s`` draft steps of ``c`` target steps each plus one target call,
the speed-up is at most ``E / (s c + 1)`` (their Theorem 3.8, ``s = g``;
jaxcombine's loop runs ``s = g + 1``). Drafts: one member for its own
ensemble (no training, and it agrees with the ensemble on most tokens) and,
at full scale, member 0's first layer and head for member 0
(``layer_skip_draft``; Zhang et al. 2023, arXiv:2309.08168).

What to expect at this scale: the models have 50 thousand (quick) to 160
thousand (full) parameters, so a decode step costs tens of microseconds on a
CPU, and fixed per-step work dominates it: the layer-skip draft (half the
layers) costs about a whole step of its model (1.0-1.4 measured), and the
stacked ensemble's step 1.2-2 member steps at quick scale (3 members) and 3-6
at full scale (4 members), on a loaded machine. Every call also pays host work
(padding, cache set-up, dispatch) of the order of its whole decode loop. So
the stacked loop's gain over the Python loop is large (the loop pays N
dispatches and a host round trip per token), while speculative decoding (``c``
of 0.2-1.4 here; Leviathan et al. drafted T5-XXL (11B) with T5-small (60M))
and prefix reuse (prefixes of 16-48 tokens) have little compute to save, and
their own overheads are of the same order: the speculative loop does more work
per iteration than its forwards, ``start_from_prefix`` copies the state with
un-jitted operations and ``generate`` checks the state's fingerprint (a sum
over every parameter) on every request. ``bench/decode.py`` measures both on
larger models (BENCHMARKS.md).

Design. Tokens are deterministic (fixed held-out rows, greedy); times are not:
every method is called once untimed (compile), then ``repeats`` rounds call
the methods of one table in turn (so load changes hit them alike) and the
median is kept; read ratios. Whole public calls are timed (host work
included), except the step costs, which time ``decode_loop`` alone after a
prefill (3 x ``repeats`` rounds: a call is a few milliseconds). Most of the
section's time is compilation (measured on a loaded 2-core machine: 1-3 s per
prefill or decode loop, 3-9 s per speculative loop), so the sizes share
compiled shapes: the batch-1 rows of ensemble decoding, the step costs and the
speculative baselines decode the same prompt length and token count, and
prefix reuse uses ``prefix + bucket(request) = bucket(prefix + request)`` at
full and quick scale, so both starts share one decode loop. Prefix reuse is
timed for the ensemble only (the single model's path is the same code); quick
scale leaves out batch 8 and the layer-skip draft.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine import tree
from jaxcombine.decoding import (
    Decodable,
    DecoderForward,
    Sampling,
    bucket_length,
    decode_loop,
    generate,
    layer_skip_draft,
    left_pad,
    prefill,
    prefill_prefix,
    speculative_generate,
    start_from_prefix,
)
from jaxcombine.ensemble import Combination, stacked
from jaxcombine.models import init_cache
from jaxcombine.tour.report import Claim, Section, Table
from jaxcombine.tour.sections.common import corpus_data, lm_members

RULE = Combination("linear")


@dataclasses.dataclass(frozen=True)
class Sizes:
    """Token counts and repeats of the section at one scale (prompts + new tokens
    stay within the members' context, the corpus rows' length)."""

    prompt: int  # prompt tokens of ensemble and speculative decoding
    new_tokens: int  # tokens generated per row
    batches: tuple[int, ...]  # rows per call of ensemble decoding
    prefix: int  # shared prefix tokens
    request: int  # each request's own tokens after the prefix
    prefix_new: int  # tokens generated per request
    requests: int  # requests per call (a batch) of prefix reuse
    spec_prompts: int  # prompts decoded one by one (batch 1) by speculative decoding
    draft_tokens: int  # g, proposals per target call
    self_speculative: bool  # also a layer-skip draft for member 0 (two or more layers)
    repeats: int  # timed calls per method (the median is reported)


SIZES = {
    "full": Sizes(prompt=16, new_tokens=48, batches=(1, 8), prefix=48, request=8, prefix_new=8,
                  requests=8, spec_prompts=4, draft_tokens=4, self_speculative=True, repeats=21),
    "quick": Sizes(prompt=8, new_tokens=24, batches=(1,), prefix=16, request=4, prefix_new=8,
                   requests=8, spec_prompts=3, draft_tokens=4, self_speculative=False, repeats=11),
    "tiny": Sizes(prompt=4, new_tokens=8, batches=(1,), prefix=8, request=2, prefix_new=4,
                  requests=2, spec_prompts=1, draft_tokens=2, self_speculative=False, repeats=1),
}  # fmt: skip


# --- timing ---


def interleaved_medians(
    calls: dict[str, Callable[[], Any]], repeats: int
) -> tuple[dict[str, Any], dict[str, float]]:
    """(first output of each call, median seconds of each call). Every call runs
    once untimed (compile, warm caches), then ``repeats`` rounds call each in
    turn, so a change of machine load hits all of them alike."""
    outputs = {name: call() for name, call in calls.items()}
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(call())
            seconds[name].append(time.perf_counter() - start)
    return outputs, {name: statistics.median(times) for name, times in seconds.items()}


# --- the hand-written peer of ensemble decoding ---


def host_mixture_argmax(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The linear rule's greedy token on the host: ``argmax_v log sum_i w_i
    softmax(z_i)_v`` for member logits ``z`` [N, B, V]; tokens [B] int32."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))  # [N, B, V]
    top = log_p.max(axis=0)
    mixture = top + np.log(np.einsum("n,nbv->bv", weights, np.exp(log_p - top)))
    return mixture.argmax(axis=-1).astype(np.int32)


def member_loop(forward: DecoderForward, member_params: Sequence[Any], config) -> Callable:
    """Ensemble decoding as users write it by hand: ``run(prompts, new_tokens)``
    prefills every member (jitted), then per token calls each member's jitted
    one-token step on its own KV cache, brings the logits to the host and
    combines them there (:func:`host_mixture_argmax`, uniform weights)."""
    weights = np.full(len(member_params), 1.0 / len(member_params))

    @partial(jax.jit, donate_argnums=2)  # the member's cache is updated in place
    def step(params, token, cache):
        ones = jnp.ones((token.shape[0], 1), bool)
        logits, cache = forward(params, token[:, None], ones, cache)
        return logits[:, -1], cache

    def run(prompts: Sequence[Sequence[int]], new_tokens: int) -> list[list[int]]:
        length = bucket_length(max(len(p) for p in prompts))
        tokens, mask = (jnp.asarray(x) for x in left_pad(prompts, length, 0))
        caches, logits = [], []
        for params in member_params:
            cache = init_cache(config, len(prompts), length + new_tokens)
            last, cache = prefill(forward, params, tokens, mask, cache)
            caches.append(cache)
            logits.append(np.asarray(last))
        out = [host_mixture_argmax(np.stack(logits), weights)]
        for _ in range(new_tokens - 1):
            token = jnp.asarray(out[-1])
            logits = []
            for i, params in enumerate(member_params):
                last, caches[i] = step(params, token, caches[i])
                logits.append(np.asarray(last))
            out.append(host_mixture_argmax(np.stack(logits), weights))
        return np.stack(out, axis=1).tolist()

    return run


# --- speculative decoding: Leviathan et al. 2023's model ---


def ideal_speedup(tokens_per_call: float, draft_steps: int, cost: float) -> float:
    """Leviathan et al.'s walltime improvement ``E / (s c + 1)``: ``E`` tokens per
    iteration of ``s`` draft steps (``c`` target steps each) and one target call
    (one target step), against one token per target step. The paper counts
    ``s = g`` draft steps; :func:`~jaxcombine.decoding.speculative_generate`
    runs ``g + 1`` (the last writes the g-th proposal into the draft's cache)."""
    return tokens_per_call / (draft_steps * cost + 1.0)


# --- the three experiments ---


@dataclasses.dataclass
class Models:
    """The members as the decoding functions take them."""

    config: Any
    member_params: list[Any]
    member: Decodable  # member 0 alone
    ensemble: Decodable  # all members stacked, linear rule
    decoders: list[Any]  # the members as NNX decoders


def _models(members) -> Models:
    member_params = tree.unstack(members.params)
    decoders = [nnx.merge(members.graphdef, p) for p in member_params]
    return Models(members.config, member_params, Decodable.of(decoders[0]),
                  stacked(decoders, RULE), decoders)  # fmt: skip


def _prompts(held_out: np.ndarray, count: int, length: int, first_row: int = 0):
    return [[int(t) for t in row[:length]] for row in held_out[first_row : first_row + count]]


def ensemble_decoding(models: Models, held_out, sizes: Sizes) -> tuple[list, dict]:
    """Tokens/s of member 0 alone, the stacked ensemble and the hand-written loop,
    per batch size; whether the loop's tokens equal the stacked ensemble's."""
    loop = member_loop(models.member.forward, models.member_params, models.config)
    options = dict(max_new_tokens=sizes.new_tokens, eos_token_ids=())
    rows, figures = [], {}
    for batch in sizes.batches:
        prompts = _prompts(held_out, batch, sizes.prompt)
        outputs, seconds = interleaved_medians(
            {
                "member": lambda p=prompts: generate(models.member, p, **options),
                "stacked": lambda p=prompts: generate(models.ensemble, p, **options),
                "loop": lambda p=prompts: loop(p, sizes.new_tokens),
            },
            sizes.repeats,
        )
        tokens = len(prompts) * sizes.new_tokens
        rate = {name: tokens / s for name, s in seconds.items()}
        same = outputs["loop"] == outputs["stacked"]
        figures[f"batch_{len(prompts)}"] = {
            "tokens_per_s": rate, "seconds": seconds, "loop_equals_stacked": same,
            "loop_over_stacked_time": seconds["loop"] / seconds["stacked"],
            "stacked_over_member_time": seconds["stacked"] / seconds["member"],
        }  # fmt: skip
        rows.append([len(prompts), rate["member"], rate["stacked"], rate["loop"],
                     seconds["loop"] / seconds["stacked"],
                     seconds["stacked"] / seconds["member"], same])  # fmt: skip
    return rows, figures


def step_costs(models: Models, drafts: dict[str, Decodable], prompt, new_tokens: int,
               repeats: int) -> dict[str, float]:  # fmt: skip
    """Seconds per decode step of each model's jitted loop alone (one row,
    ``new_tokens`` steps after the prefill; host work excluded)."""
    candidates = {"member 0": models.member, "ensemble": models.ensemble, **drafts}
    calls = {}
    for name, model in candidates.items():
        length = bucket_length(len(prompt))
        tokens, mask = (jnp.asarray(x) for x in left_pad([prompt], length, 0))
        first, cache = prefill(model.forward, model.params, tokens, mask,
                               model.init_cache(1, length + new_tokens))  # fmt: skip
        calls[name] = lambda m=model, f=first, c=cache: decode_loop(
            m.forward, m.params, f, c, jax.random.key(0), jnp.asarray([-1], jnp.int32),
            jnp.int32(0), max_new_tokens=new_tokens, sampling=Sampling(),
        )  # fmt: skip
    _, seconds = interleaved_medians(calls, repeats)
    return {name: s / new_tokens for name, s in seconds.items()}


def prefix_reuse(ensemble: Decodable, held_out, sizes: Sizes) -> tuple[list, dict]:
    """Requests ``prefix + own tokens`` (one batch of ``sizes.requests``) continued by
    the ensemble: prefilled from scratch vs from the prefix's state, made once.
    Also the two starts alone: the jitted prefill of ``prefix + request`` and
    :func:`~jaxcombine.decoding.start_from_prefix` (copy the state to every row,
    prefill the requests)."""
    prefix = _prompts(held_out, 1, sizes.prefix)[0]
    requests = _prompts(held_out, sizes.requests, sizes.request, first_row=1)
    whole = [prefix + r for r in requests]
    options = dict(max_new_tokens=sizes.prefix_new, eos_token_ids=())
    state = prefill_prefix(ensemble, prefix)
    length = bucket_length(len(whole[0]))
    tokens, mask = (jnp.asarray(x) for x in left_pad(whole, length, 0))
    cache = ensemble.init_cache(len(whole), length + sizes.prefix_new)
    outputs, seconds = interleaved_medians(
        {
            "scratch": lambda: generate(ensemble, whole, **options),
            "reuse": lambda: generate(ensemble, requests, prefix=state, **options),
            "state": lambda: prefill_prefix(ensemble, prefix).logits,
            "scratch start": lambda: prefill(ensemble.forward, ensemble.params, tokens, mask,
                                             cache),
            "reuse start": lambda: start_from_prefix(ensemble, state, requests, 0,
                                                     sizes.prefix_new),
        },
        sizes.repeats,
    )  # fmt: skip
    same = outputs["scratch"] == outputs["reuse"]
    generated = len(requests) * sizes.prefix_new
    figures = {
        "seconds": seconds, "same_tokens": same,
        "speedup": seconds["scratch"] / seconds["reuse"],
        "tokens_per_s": {k: generated / seconds[k] for k in ("scratch", "reuse")},
    }  # fmt: skip
    rows = [
        ["prefill prefix + request", generated / seconds["scratch"], 1e3 * seconds["scratch"],
         1e3 * seconds["scratch start"], same],
        ["from the prefix state", generated / seconds["reuse"], 1e3 * seconds["reuse"],
         1e3 * seconds["reuse start"], same],
        ["making the state (once)", None, 1e3 * seconds["state"], None, None],
    ]  # fmt: skip
    return rows, figures


def speculative(models: Models, drafts: dict[str, Decodable], held_out, sizes: Sizes,
                costs: dict[str, float]) -> tuple[list, dict]:  # fmt: skip
    """Each prompt decoded alone (batch 1): ``generate(target)`` vs
    ``speculative_generate(target, draft)``, for every (target, draft) pair."""
    prompts = _prompts(held_out, sizes.spec_prompts, sizes.prompt)
    g = sizes.draft_tokens
    options = dict(max_new_tokens=sizes.new_tokens, eos_token_ids=())
    pairs = [("ensemble", "member 0")] + [("member 0", d) for d in drafts if d != "member 0"]
    targets = {"ensemble": models.ensemble, "member 0": models.member}
    rows, figures = [], {}
    for target_name, draft_name in pairs:
        target, draft = targets[target_name], drafts[draft_name]
        outputs, seconds = interleaved_medians(
            {
                "plain": lambda t=target: [generate(t, [p], **options)[0] for p in prompts],
                "speculative": lambda t=target, d=draft: [
                    speculative_generate(t, d, [p], num_draft_tokens=g, **options) for p in prompts
                ],
            },
            sizes.repeats,
        )
        runs = outputs["speculative"]
        same = [run.tokens[0] for run in runs] == outputs["plain"]
        accepted = sum(run.accepted for run in runs) / sum(g * run.target_calls for run in runs)
        per_call = float(np.mean([run.tokens_per_call for run in runs]))
        cost = costs[draft_name] / costs[target_name]
        tokens = len(prompts) * sizes.new_tokens
        speedup = seconds["plain"] / seconds["speculative"]
        key = f"{target_name} <- {draft_name}"
        figures[key] = {
            "same_tokens": same, "proposals_accepted": accepted, "tokens_per_call": per_call,
            "draft_cost": cost, "ideal_speedup": ideal_speedup(per_call, g + 1, cost),
            "speedup": speedup,
            "tokens_per_s": {k: tokens / s for k, s in seconds.items()}, "draft_tokens": g,
        }  # fmt: skip
        f = figures[key]
        rows.append([target_name, draft_name, same, accepted, per_call, cost,
                     f["ideal_speedup"], f["tokens_per_s"]["plain"],
                     f["tokens_per_s"]["speculative"], speedup])  # fmt: skip
    return rows, figures


def run(tour) -> Section:
    sizes = SIZES[tour.scale.name]
    held_out = corpus_data(tour).held_out
    models = _models(lm_members(tour, "seeds"))
    count = len(models.member_params)
    drafts = {"member 0": models.member}
    if sizes.self_speculative and models.config.num_layers >= 2:
        drafts["layer skip (1 layer)"] = Decodable.of(layer_skip_draft(models.decoders[0], 1))

    ensemble_rows, ensemble_figures = ensemble_decoding(models, held_out, sizes)
    prompt = _prompts(held_out, 1, sizes.prompt)[0]
    other_drafts = {k: v for k, v in drafts.items() if k != "member 0"}
    costs = step_costs(models, other_drafts, prompt, sizes.new_tokens, 3 * sizes.repeats)
    prefix_rows, prefix_figures = prefix_reuse(models.ensemble, held_out, sizes)
    spec_rows, spec_figures = speculative(models, drafts, held_out, sizes, costs)
    timing = f"median of {sizes.repeats} interleaved calls after a warm-up call"
    tables = [
        Table(
            f"Ensemble decoding ({count} members, linear rule, greedy): tokens/s",
            ["batch", "member 0 alone", "stacked, one jitted loop", "Python loop, host combine",
             "loop / stacked time", "stacked / member time", "same tokens"],
            ensemble_rows, digits=2,
            note=f"Prompts of {sizes.prompt} held-out tokens, {sizes.new_tokens} new tokens per "
            f"row; whole calls (host work included), {timing}. Same tokens: the loop's "
            "against the stacked ensemble's.",
        ),
        Table(
            "Decode step cost, the jitted loop alone (batch 1)",
            ["model", "us per step", "relative to member 0"],
            [[name, 1e6 * s, s / costs["member 0"]] for name, s in costs.items()], digits=2,
        ),
        Table(
            f"Prefix reuse, the ensemble: {sizes.requests} requests of a shared "
            f"{sizes.prefix}-token prefix + {sizes.request} own tokens, {sizes.prefix_new} new "
            "tokens each",
            ["start", "tokens/s", "ms per batch", "ms to start (no decoding)", "same tokens"],
            prefix_rows, digits=2,
            note=f"{timing.capitalize()}. Start: the jitted prefill of prefix + request, or "
            "start_from_prefix (the state copied to every row, then the requests prefilled).",
        ),
        Table(
            f"Speculative decoding ({sizes.draft_tokens} proposals per target call, greedy, "
            f"{sizes.spec_prompts} prompts one by one)",
            ["target", "draft", "same tokens", "proposals accepted", "tokens / target call",
             "draft cost c", "ideal speed-up", "target tok/s",
             "speculative tok/s", "speed-up"],
            spec_rows, digits=2,
            note="Tokens / target call: tokens gained per target call after the prefill "
            "(the last call may be cut short by the token limit). Draft cost c: the draft's "
            "step time / the target's (table above). Ideal speed-up: tokens per call / "
            "((g + 1) c + 1), Leviathan et al.'s improvement factor for this loop's g + 1 "
            "draft steps per target call, without any other cost.",
        ),
    ]  # fmt: skip
    figures = {"ensemble_decoding": ensemble_figures, "step_seconds": costs,
               "prefix_reuse": prefix_figures, "speculative": spec_figures,
               "sizes": dataclasses.asdict(sizes)}  # fmt: skip
    plot = _plot(tour, ensemble_figures, prefix_figures, spec_figures)
    summary = " ".join(p.replace("\n", " ") for p in __doc__.split("\n\n")[1:3])
    return Section(8, "Speed", summary, tables, [plot], figures,
                   _claims(prefix_figures, spec_figures))  # fmt: skip


def _claims(prefix_figures: dict, spec_figures: dict) -> list[Claim]:
    fastest = max(spec_figures, key=lambda k: spec_figures[k]["speedup"])
    best = spec_figures[fastest]
    return [
        Claim(
            "Greedy speculative decoding gives exactly the target's greedy output",
            {k: v["same_tokens"] for k, v in spec_figures.items()},
            held=all(v["same_tokens"] for v in spec_figures.values()),
            source="Leviathan et al. 2023 (arXiv:2211.17192)",
        ),
        Claim(
            "Speculative decoding is faster than the target alone (2-3x for T5-XXL with a "
            "draft much cheaper than the target)",
            {"pair": fastest, **{k: best[k] for k in ("speedup", "draft_cost", "tokens_per_call")}},
            held=best["speedup"] > 1.0,
            source="Leviathan et al. 2023 (arXiv:2211.17192)",
        ),
        Claim(
            "Continuing requests from a shared prefix's saved state gives the same outputs "
            "as recomputing the prefix, faster",
            {"speedup": prefix_figures["speedup"], "same_tokens": prefix_figures["same_tokens"]},
            held=prefix_figures["same_tokens"] and prefix_figures["speedup"] > 1.0,
            source="Gim et al. 2023 (arXiv:2311.04934); Zheng et al. 2023 (arXiv:2312.07104)",
        ),
    ]


def _plot(tour, ensemble_figures: dict, prefix_figures: dict, spec_figures: dict) -> str:
    """Tokens/s of every method: one panel per experiment, one bar per method."""
    from jaxcombine.tour.run import pyplot

    panels = {"ensemble decoding": [], "prefix reuse (ensemble)": [], "speculative decoding": []}
    for batch, f in ensemble_figures.items():
        b = batch.replace("batch_", "batch ")
        panels["ensemble decoding"] += [
            (f"{label}, {b}", f["tokens_per_s"][key])
            for key, label in (("member", "member 0"), ("stacked", "stacked"),
                               ("loop", "Python loop"))
        ]  # fmt: skip
    panels["prefix reuse (ensemble)"] = [
        ("prefill prefix + request", prefix_figures["tokens_per_s"]["scratch"]),
        ("from the prefix state", prefix_figures["tokens_per_s"]["reuse"]),
    ]
    for pair, f in spec_figures.items():
        panels["speculative decoding"] += [
            (f"{pair.split(' <- ')[0]} alone", f["tokens_per_s"]["plain"]),
            (pair, f["tokens_per_s"]["speculative"]),
        ]
    plt = pyplot()
    heights = [len(bars) + 1.5 for bars in panels.values()]
    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 0.3 * sum(heights) + 0.6),
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for i, (ax, (title, bars)) in enumerate(zip(axes, panels.items(), strict=True)):
        y = np.arange(len(bars))[::-1]
        rates = [rate for _, rate in bars]
        ax.barh(y, rates, color=f"C{i}")
        ax.set_yticks(y, [label for label, _ in bars], fontsize=8)
        for yy, rate in zip(y, rates, strict=True):
            ax.text(rate, yy, f" {rate:,.0f}", va="center", fontsize=7)
        ax.set_xlim(0, 1.2 * max(rates))
        ax.set_title(title, fontsize=9, loc="left")
    axes[-1].set_xlabel("tokens / s (whole calls, median)")
    return tour.save_plot(fig, "speed_tokens_per_s")
