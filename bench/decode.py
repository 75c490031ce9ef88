"""Greedy decoding speed on CPU: one model and a 4-member ensemble, jaxcombine vs
``transformers`` ``generate`` on the same weights, and vs a hand-written Python
loop over per-member jitted steps.

Models: random ``LlamaForCausalLM`` (hidden 256, intermediate 1024, 4 layers,
8 heads, 4 kv heads, head dim 32, vocab 8192, untied head, fp32), seeds 0..3,
written by ``transformers`` ``save_pretrained`` to a temporary directory and
read back by ``jaxcombine.hf.load_model``; ``transformers`` runs the same
saved checkpoints (``from_pretrained``, its default attention implementation,
``torch.inference_mode``). Prompts: random ids, 32 tokens per row (no
padding), batch 1 and batch 8. Every call generates exactly 128 new tokens,
greedy: no EOS can stop it (``eos_token_ids=()`` for jaxcombine,
``min_new_tokens=128`` for ``transformers``).

Rows (each a function ``prompts [B, 32] -> new tokens [B, 128]``):

* ``hf single t1``, ``hf single t2``: ``model.generate(ids,
  max_new_tokens=128, min_new_tokens=128, do_sample=False)``, member 0, with
  ``torch.set_num_threads(1)`` and ``(2)``. Both are measured because torch's
  OpenMP threads collapse when another process holds a core of this shared
  2-core machine (2 threads then run 5-20x slower than 1); the ratio uses the
  faster row (transformers at its best). ``--torch-threads`` picks the rows.
* ``ours single``: ``jaxcombine.decoding.generate(model, prompts,
  max_new_tokens=128, eos_token_ids=())``, member 0 (the public API, host
  work included: split, padding, cache allocation, the jitted prefill and the
  jitted ``while_loop`` of steps).
* ``ours stacked4``: ``jaxcombine.ensemble.generate_ensemble(models, prompts,
  Combination("linear"), ...)``, the 4 members stacked (the public API, the
  stacking of the parameters included: every call stacks them).
* ``ours stacked4 pre``: the same ensemble stacked once outside the timed
  calls, ``ensemble = jaxcombine.ensemble.stacked(models, Combination("linear"))``,
  then ``jaxcombine.decoding.generate(ensemble, prompts, ...)`` per call.
* ``loop4``: what a researcher writes by hand with jitted models: per member
  a jitted prefill (``jaxcombine.decoding.prefill``) and a jitted one-token
  step (``DecoderForward`` under ``jax.jit``, the member's own cache from
  ``init_cache``, donated), a Python ``for`` over the 128 steps calling each
  member's step, then one jitted combine (``jaxcombine.ensemble.linear``,
  uniform weights) + argmax; the tokens stay on the device until the end.
* ``hf loop4 t1``: the 4 ``transformers`` models in a Python loop (a forward
  with ``past_key_values`` per member per step, the same linear rule in
  torch, argmax), with the smallest ``--torch-threads`` count.

Timing: the first call of every row (compile for jaxcombine, unless an
earlier row compiled the same shapes: ``ours stacked4 pre`` reuses
``ours stacked4``'s) is timed separately and reported as ``first s``; then
``--repeats`` rounds, each calling every row of the batch size once
(interleaved, so drifting machine load hits all alike); the median is
reported. ``tok/s`` = B x 128 / median seconds, ``ms/step`` = median / 128
(prefill included in both, for every tool alike). ``agree`` compares the
row's tokens with a reference row's: ``ours single`` with ``hf single t1``;
``ours stacked4 pre``, ``loop4`` and ``hf loop4`` with ``ours stacked4``
(tokens equal up to each row's first difference / all tokens).

A second table breaks ``ours single`` and ``ours stacked4`` down (the jitted
``prefill`` and ``decode_loop`` called directly, without the host work; the
stacking that every ``generate_ensemble`` call pays; one read of every weight
a decode step reads, the floor of a step bound by memory bandwidth), single
vs stacked, interleaved, median of ``--repeats`` (see ``breakdown``).

Ratios (the last line of output is one JSON object with them):

* ``single_vs_transformers_b{1,8}``: tok/s ours single / tok/s hf single
  (target >= 2);
* ``stacked4_over_single_b{1,8}``: time per token, ours stacked4 / ours
  single (target <= 2.5);
* ``loop_over_stacked4_b{1,8}``: time per token, loop4 / ours stacked4
  (target >= 1.5);
* ``prestacked4_over_single_b{1,8}``, ``loop_over_prestacked4_b{1,8}``:
  the same two with ``ours stacked4 pre``;
* ``hf_loop4_over_stacked4_b{1,8}``: time per token, hf loop4 / ours
  stacked4 (not with ``--quick``).

Run (``pip install -e .``; needs torch and transformers)::

    python bench/decode.py                 # --repeats 5
    python bench/decode.py --quick         # 32 new tokens, 2 repeats, no hf loop4
    python bench/decode.py --torch-threads 1   # one hf single row

Ratios are what to read (the machine is shared and noisy). A new row is one
entry in ``rows()``; a new ratio one line in ``ratios()``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from flax import nnx
from tiny_llama import VOCAB, llama_config  # bench/ is the script's directory
from transformers import AutoModelForCausalLM, LlamaForCausalLM

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
)
from jaxcombine.ensemble import (
    Combination,
    generate_ensemble,
    linear,
    stacked,
)
from jaxcombine.hf import load_model
from jaxcombine.models import init_cache
from jaxcombine.tour.sections.speed import interleaved_medians

transformers.utils.logging.disable_progress_bar()

MEMBERS = 4
PROMPT = 32
LINEAR = Combination("linear")


def save_members(root: Path, n: int) -> list[Path]:
    """``n`` random Llamas (seeds 0..n-1) written by ``save_pretrained``."""
    paths = []
    for seed in range(n):
        torch.manual_seed(seed)
        path = root / f"member{seed}"
        LlamaForCausalLM(llama_config()).eval().save_pretrained(str(path))
        paths.append(path)
    return paths


# --- rows: each builder returns run(prompts [B, P] int32) -> new tokens [B, N] ---


def hf_single(hf_models, models, new, threads):
    model = hf_models[0]

    def run(prompts):
        torch.set_num_threads(threads)
        ids = torch.from_numpy(prompts).long()
        with torch.inference_mode():
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                min_new_tokens=new, do_sample=False, pad_token_id=0,
            )  # fmt: skip
        return out[:, prompts.shape[1] :].numpy()

    return run


def ours_single(hf_models, models, new):
    def run(prompts):
        return np.asarray(
            generate(models[0], prompts.tolist(), max_new_tokens=new, eos_token_ids=())
        )

    return run


def ours_stacked(hf_models, models, new):
    def run(prompts):
        out = generate_ensemble(
            models, prompts.tolist(), LINEAR, max_new_tokens=new, eos_token_ids=()
        )
        return np.asarray(out)

    return run


def ours_prestacked(hf_models, models, new):
    ensemble = stacked(models, LINEAR)  # once, outside the timed calls

    def run(prompts):
        return np.asarray(
            generate(ensemble, prompts.tolist(), max_new_tokens=new, eos_token_ids=())
        )

    return run


def python_loop(hf_models, models, new):
    """Per-member jitted prefill and step, a Python loop over steps, jitted combine + argmax."""
    config = models[0].config
    splits = [nnx.split(m) for m in models]
    forward = DecoderForward(splits[0][0])  # one graph definition: one compiled step for all
    params = [p for _, p in splits]
    weights = jnp.full((len(models),), 1.0 / len(models), jnp.float32)

    def step(params, token, cache):
        ones = jnp.ones((token.shape[0], 1), bool)
        logits, cache = forward(params, token[:, None], ones, cache)
        return logits[:, -1], cache

    step = jax.jit(step, donate_argnums=2)

    @jax.jit
    def combine(logits):
        return jnp.argmax(linear(jnp.stack(logits), weights), axis=-1).astype(jnp.int32)

    def run(prompts):
        tokens, mask = left_pad(prompts.tolist(), bucket_length(prompts.shape[1]), 0)
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
        length = tokens.shape[1] + new
        caches, logits = [], []
        for p in params:
            z, cache = prefill(forward, p, tokens, mask, init_cache(config, len(prompts), length))
            caches.append(cache)
            logits.append(z)
        token = combine(logits)
        out = [token]
        for _ in range(new - 1):
            logits = []
            for i, p in enumerate(params):
                z, caches[i] = step(p, token, caches[i])
                logits.append(z)
            token = combine(logits)
            out.append(token)
        return np.asarray(jnp.stack(out, axis=1))

    return run


def hf_loop(hf_models, models, new, threads):
    """The transformers members in a Python loop: KV-cached forwards, linear rule, argmax."""
    log_w = torch.log(torch.full((len(hf_models), 1, 1), 1.0 / len(hf_models)))

    def combine(logits):
        log_p = torch.log_softmax(torch.stack(logits).float(), dim=-1)
        return torch.logsumexp(log_p + log_w, dim=0).argmax(dim=-1)

    def run(prompts):
        torch.set_num_threads(threads)
        ids = torch.from_numpy(prompts).long()
        with torch.inference_mode():
            outs = [m(ids, use_cache=True) for m in hf_models]
            caches = [o.past_key_values for o in outs]
            token = combine([o.logits[:, -1] for o in outs])
            out = [token]
            for _ in range(new - 1):
                logits = []
                for i, m in enumerate(hf_models):
                    o = m(token[:, None], past_key_values=caches[i], use_cache=True)
                    caches[i] = o.past_key_values
                    logits.append(o.logits[:, -1])
                token = combine(logits)
                out.append(token)
        return torch.stack(out, dim=1).numpy()

    return run


def rows(quick: bool, torch_threads: list[int]) -> list[tuple[str, object, str | None]]:
    """(name, builder, reference row for the token agreement) in table order."""
    hf = [(f"hf single t{t}", partial(hf_single, threads=t), None) for t in torch_threads]
    out = [
        *hf,
        ("ours single", ours_single, hf[0][0]),
        ("ours stacked4", ours_stacked, None),
        ("ours stacked4 pre", ours_prestacked, "ours stacked4"),
        ("loop4", python_loop, "ours stacked4"),
    ]
    if not quick:
        t = min(torch_threads)
        out.append((f"hf loop4 t{t}", partial(hf_loop, threads=t), "ours stacked4"))
    return out


def ratios(res: dict, batches: list[int]) -> dict:
    """The headline ratios; ``res[(row, batch)]["s"]`` is the median seconds per call.
    ``hf single`` is the fastest of the ``hf single t*`` rows (transformers at
    its best thread count), ``hf loop4`` the ``hf loop4 t*`` row."""
    s = {key: row["s"] for key, row in res.items()}
    for b in batches:
        for prefix in ("hf single", "hf loop4"):
            times = [v for (name, bb), v in s.items() if bb == b and name.startswith(prefix + " t")]
            if times:
                s[prefix, b] = min(times)
    pairs = [  # (ratio, numerator row, denominator row), each per batch size
        ("single_vs_transformers", "hf single", "ours single"),
        ("stacked4_over_single", "ours stacked4", "ours single"),
        ("loop_over_stacked4", "loop4", "ours stacked4"),
        ("prestacked4_over_single", "ours stacked4 pre", "ours single"),
        ("loop_over_prestacked4", "loop4", "ours stacked4 pre"),
        ("hf_loop4_over_stacked4", "hf loop4", "ours stacked4"),
    ]
    out = {}
    for ratio, num, den in pairs:
        for b in batches:
            if (num, b) in s and (den, b) in s:
                out[f"{ratio}_b{b}"] = s[num, b] / s[den, b]
    return out


# --- measurement ---


def agreement(tokens: np.ndarray, reference: np.ndarray) -> tuple[int, int]:
    """(tokens equal up to each row's first difference, all tokens)."""
    same = 0
    for row, ref in zip(tokens, reference, strict=True):
        diff = np.nonzero(row != ref)[0]
        same += len(row) if len(diff) == 0 else int(diff[0])
    return same, tokens.size


def bench_batch(table, hf_models, models, prompts, new, repeats) -> dict:
    """Every row at one batch size: first call, then interleaved timed repeats."""
    runs, first, outputs, times = {}, {}, {}, {}
    for name, builder, _ in table:
        runs[name] = builder(hf_models, models, new)
        start = time.perf_counter()
        outputs[name] = runs[name](prompts)
        first[name] = time.perf_counter() - start
        times[name] = []
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(prompts)
            times[name].append(time.perf_counter() - start)
    res = {}
    for name, _, ref in table:
        assert outputs[name].shape == (len(prompts), new), (name, outputs[name].shape)
        res[name] = {
            "s": statistics.median(times[name]),
            "runs": times[name],
            "first": first[name],
            "agree": None if ref is None else agreement(outputs[name], outputs[ref]),
            "vs": ref,
        }
    return res


def breakdown(models, batches, new, repeats) -> list[tuple]:
    """Where the time of ``ours single`` and ``ours stacked4`` goes: the jitted
    prefill and decode loop called directly (host work excluded), the stacking
    of the members' parameters (``stacked(models)``, paid by every
    ``generate_ensemble`` call), and one read of the weights a decode step
    reads (a jitted sum over every parameter but the embedding table, which a
    step only gathers rows of): the floor of a step bound by memory bandwidth.
    Parts faster than a decode loop are called 5 times per round (median).
    Rows: (part, batch or None, single ms, stacked4 ms)."""
    models_ = {"single": Decodable.of(models[0]), "stacked": stacked(models, LINEAR)}

    def read_all(params):
        leaves = [x for path, x in jax.tree_util.tree_leaves_with_path(params)
                  if "embed_tokens" not in jax.tree_util.keystr(path)]  # fmt: skip
        total = jax.jit(lambda ls: sum(jnp.sum(x) for x in ls))
        return lambda: total(leaves)

    calls = {
        ("stack the members", None): {"stacked": lambda: stacked(models, LINEAR).params},
        ("read the weights once", None): {k: read_all(m.params) for k, m in models_.items()},
    }
    for b in batches:
        tokens = jnp.ones((b, PROMPT), jnp.int32)
        mask = jnp.ones((b, PROMPT), bool)
        pre, loop = {}, {}
        for k, m in models_.items():
            cache = m.init_cache(b, PROMPT + new)
            pre[k] = partial(prefill, m.forward, m.params, tokens, mask, cache)
            logits, cache = pre[k]()
            loop[k] = partial(
                decode_loop, m.forward, m.params, logits, cache, jax.random.key(0),
                jnp.asarray([-1], jnp.int32), jnp.int32(0), max_new_tokens=new,
                sampling=Sampling(),
            )  # fmt: skip
        calls[f"prefill ({PROMPT} tokens)", b] = pre
        calls["decode step (jitted loop)", b] = loop
    times = {}
    for part, fns in calls.items():
        for k, fn in fns.items():
            jax.block_until_ready(fn())  # compile
            times[part, k] = []
    for _ in range(repeats):
        for part, fns in calls.items():
            inner = 1 if part[0].startswith("decode") else 5
            for k, fn in fns.items():
                one = []
                for _ in range(inner):
                    start = time.perf_counter()
                    jax.block_until_ready(fn())
                    one.append(time.perf_counter() - start)
                times[part, k].append(statistics.median(one))
    out = []
    for name, b in calls:
        per = new if name.startswith("decode") else 1
        ms = {k: 1e3 * statistics.median(times[(name, b), k]) / per
              for k in ("single", "stacked") if ((name, b), k) in times}  # fmt: skip
        out.append((name, b, ms.get("single"), ms["stacked"]))
    return out


# --- prefix reuse and speculative decoding ---

SYSTEM = 448  # shared prefix tokens (a system prompt / few-shot block)
QUESTION = 32  # tokens after it per request
REUSE_NEW = 32  # new tokens per request


def bench_prefix_reuse(models, repeats) -> tuple[list[tuple], dict]:
    """A request = a shared 448-token prefix + its own 32 tokens, 32 new tokens,
    batch 8: ``generate`` from scratch vs from ``prefill_prefix``'s state (made
    once, outside the timed calls), one model and 4 stacked members."""
    rng = np.random.default_rng(1)
    system = rng.integers(3, VOCAB, SYSTEM).tolist()
    questions = rng.integers(3, VOCAB, (8, QUESTION)).tolist()
    rows_, out = [], {}
    options = dict(max_new_tokens=REUSE_NEW, eos_token_ids=())
    for name, model in (("single", Decodable.of(models[0])), ("stacked4", stacked(models, LINEAR))):
        state = prefill_prefix(model, system)
        scratch = generate(model, [system + q for q in questions], **options)
        reused = generate(model, questions, prefix=state, **options)
        _, s = interleaved_medians(
            {
                "scratch": lambda m=model: generate(m, [system + q for q in questions], **options),
                "reuse": lambda m=model, st=state: generate(m, questions, prefix=st, **options),
            },
            repeats,
        )
        same = sum(a == b for a, b in zip(scratch, reused, strict=True))
        rows_.append((f"prefix {name}", s["scratch"], s["reuse"], f"{same}/8 rows equal"))
        out[f"prefix_reuse_speedup_{name}"] = s["scratch"] / s["reuse"]
    return rows_, out


def bench_speculative(models, new, repeats) -> tuple[list[tuple], dict]:
    """Batch 1, greedy, ``new`` tokens: ``generate(target)`` vs
    ``speculative_generate(target, draft, num_draft_tokens=4)`` with a layer-skip
    draft (member 0's first layer + its head: random weights give no other
    draft that agrees with the target), target one model or 4 stacked members."""
    prompt = np.random.default_rng(2).integers(3, VOCAB, (1, PROMPT)).tolist()
    draft = layer_skip_draft(models[0], 1)
    rows_, out = [], {}
    options = dict(max_new_tokens=new, eos_token_ids=())
    for name, target in (
        ("single", Decodable.of(models[0])),
        ("stacked4", stacked(models, LINEAR)),
    ):
        plain = generate(target, prompt, **options)
        spec = speculative_generate(target, draft, prompt, num_draft_tokens=4, **options)
        _, s = interleaved_medians(
            {
                "plain": lambda t=target: generate(t, prompt, **options),
                "spec": lambda t=target: speculative_generate(
                    t, draft, prompt, num_draft_tokens=4, **options
                ),
            },
            repeats,
        )
        note = (f"equal={spec.tokens == plain}, {spec.tokens_per_call:.2f} tokens/target call, "
                f"{spec.accepted}/{spec.target_calls * 4} proposals accepted")  # fmt: skip
        rows_.append((f"speculative {name}", s["plain"], s["spec"], note))
        out[f"speculative_speedup_{name}"] = s["plain"] / s["spec"]
    return rows_, out


def print_speedups(rows_) -> None:
    header = f"{'case':<22}{'baseline s':>11}{'fast s':>9}{'speedup':>9}  note"
    print(header)
    print("-" * (len(header) + 40))
    for name, base, fast, note in rows_:
        print(f"{name:<22}{base:>11.3f}{fast:>9.3f}{base / fast:>9.2f}  {note}")


def _l3_cache() -> str | None:
    try:
        return Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
    except OSError:
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="32 new tokens, 2 repeats, no hf loop4"
    )
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 --quick)")
    parser.add_argument(
        "--torch-threads", default="1,2", help="one hf single row per torch thread count"
    )
    parser.add_argument(
        "--only-speedups", action="store_true",
        help="only the prefix-reuse and speculative-decoding tables",
    )  # fmt: skip
    args = parser.parse_args(argv)
    new = args.new_tokens or (32 if args.quick else 128)
    args.repeats = args.repeats or (2 if args.quick else 5)
    batches = [1, 8]

    print(
        f"# decode: Llama hidden 256, 4 layers, vocab {VOCAB}, fp32, prompt {PROMPT}, "
        f"{new} new tokens greedy, {MEMBERS} members, median of {args.repeats}; "
        f"jax {jax.__version__} ({jax.default_backend()}), torch {torch.__version__} "
        f"(default {torch.get_num_threads()} threads), transformers {transformers.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()}",
        flush=True,
    )
    table = rows(args.quick, [int(t) for t in args.torch_threads.split(",")])
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = save_members(Path(tmp), MEMBERS)
        hf_models = [AutoModelForCausalLM.from_pretrained(str(p)).eval() for p in paths]
        models = [load_model(p) for p in paths]
    print(f"# transformers attention: {hf_models[0].config._attn_implementation}", flush=True)
    weights_mb = sum(x.nbytes for x in jax.tree.leaves(nnx.state(models[0]))) / 1e6
    l3 = _l3_cache()
    l3 = f", L3 cache {l3}" if l3 else ""
    speed_rows, speedups = [], {}
    for part in (
        bench_prefix_reuse(models, args.repeats),
        bench_speculative(models, new, args.repeats),
    ):
        speed_rows += part[0]
        speedups.update(part[1])
    if args.only_speedups:
        print_speedups(speed_rows)
        print(json.dumps({"bench": "decode", "new_tokens": new,
                          **{k: round(v, 2) for k, v in speedups.items()}}))  # fmt: skip
        return
    rng = np.random.default_rng(0)
    for b in batches:
        prompts = rng.integers(3, VOCAB, (b, PROMPT), dtype=np.int32)
        for name, row in bench_batch(table, hf_models, models, prompts, new, args.repeats).items():
            res[(name, b)] = row
        print(f"# batch {b} done", flush=True)
    parts = breakdown(models, batches, new, args.repeats)

    header = (
        f"{'row':<19}{'batch':>5}{'median s':>10}{'tok/s':>9}{'ms/step':>9}"
        f"{'first s':>9}  {'agree':<28}runs (s)"
    )
    print(header)
    print("-" * (len(header) + 30))
    for (name, b), row in res.items():
        agree = (
            "" if row["agree"] is None else f"{row['agree'][0]}/{row['agree'][1]} vs {row['vs']}"
        )
        runs = ", ".join(f"{t:.3f}" for t in row["runs"])
        print(
            f"{name:<19}{b:>5}{row['s']:>10.3f}{b * new / row['s']:>9.0f}"
            f"{1e3 * row['s'] / new:>9.2f}{row['first']:>9.2f}  {agree:<28}{runs}"
        )
    print()
    print(f"breakdown (jaxcombine, jitted parts called directly, median of {args.repeats}; "
          f"weights per member {weights_mb:.1f} MB{l3})")  # fmt: skip
    header = f"{'part':<30}{'batch':>5}{'single ms':>11}{'stacked4 ms':>13}{'ratio':>7}"
    print(header)
    print("-" * len(header))
    for name, b, one, four in parts:
        cells = [f"{'-' if b is None else b:>5}", f"{'-' if one is None else f'{one:.2f}':>11}"]
        cells.append(f"{four:>13.2f}")
        cells.append(f"{'-' if one is None else f'{four / one:.2f}':>7}")
        print(f"{name:<30}" + "".join(cells))
    print()
    print("prefix reuse (448-token prefix + 32 own tokens, 32 new, batch 8), speculative "
          f"decoding (batch 1, {new} new, 4 proposals); median of {args.repeats}")  # fmt: skip
    print_speedups(speed_rows)
    print()
    out = {**ratios(res, batches), **speedups}
    print("targets: single_vs_transformers >= 2, stacked4_over_single <= 2.5, "
          "loop_over_stacked4 >= 1.5")  # fmt: skip
    for key, value in out.items():
        print(f"{key:<34}{value:>8.2f}")
    print(
        json.dumps(
            {"bench": "decode", "new_tokens": new, **{k: round(v, 2) for k, v in out.items()}}
        )
    )


if __name__ == "__main__":
    main()
