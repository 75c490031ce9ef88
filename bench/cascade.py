"""Cascade threshold sweep on CPU: quality against compute as the threshold moves.

Models: a random Llama-shaped ``Decoder`` (hidden 512, 8 layers, 8 heads,
4 kv heads, head dim 64, MLP 2048, vocab 4096, fp32, seed 0) is the large
model; the small model is its first layer with the same embedding, final
norm and head (``layer_skip_draft(large, 1)``, an early-exit cascade). The
output head is scaled by ``HEAD_SCALE`` = 10: random weights give nearly
uniform next-token distributions (top probability ~1/V), the sharper head a
spread of confidences (top probability 0.18-0.70, 10-90 %) more like a
trained model's. With random weights the two models rarely pick the same
token, so ``agreement`` and ``nll`` move with ``deferred``; the timings are
what this measures. Prompts: random ids, 32 tokens per
row, batch 1 (and 4 without ``--quick``). Greedy, no EOS: every call
generates exactly ``--new-tokens`` tokens.

Thresholds: 0, the 10/25/50/75/90 % quantiles of the small model's top
probability along its own greedy continuations (``rest`` mode: of its
running minimum along each row, which decides where the row hands over), and
1.01 (always defer).
Per threshold and mode (``step``: defer one step; ``rest``: defer the rest of
the row), from :func:`jaxcombine.decoding.cascade_sweep`:

* ``deferred``: fraction of tokens the large model decided;
* ``agreement``: token-level agreement with the large model's greedy output;
* ``nll``: mean NLL of the produced tokens under the large model;
* ``large_calls`` / ``large_positions``: large-model forwards and token
  positions per row they ran (prompt bucket and catch-up filler included);
* ``ms/token``: median wall time of ``cascade_generate`` (host work and the
  small model's prefill included) / new tokens, and ``over_large``: that
  time over ``generate(large)``'s.

``small`` and ``large`` time ``generate`` of each model alone. Timing: one
untimed call of everything (compilation), then ``--repeats`` rounds that
call every configuration once (interleaved, so drifting load on this shared
machine hits all alike); medians. The last line of output is one JSON object.

Run::

    python bench/cascade.py            # 128 new tokens, batch 1 and 4, 5 repeats
    python bench/cascade.py --quick    # 32 new tokens, batch 1, 2 repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.decoding import (
    Decodable,
    cascade_generate,
    cascade_sweep,
    format_sweep,
    generate,
    layer_skip_draft,
)
from jaxcombine.models import Decoder, DecoderConfig

PROMPT = 32
VOCAB = 4096
HEAD_SCALE = 10.0
CONFIG = DecoderConfig(
    vocab_size=VOCAB,
    hidden_size=512,
    intermediate_size=2048,
    num_layers=8,
    num_heads=8,
    num_kv_heads=4,
    head_dim=64,
    max_position_embeddings=1024,
)


def interleaved_medians(fns: dict, repeats: int) -> dict:
    """Median seconds per function over ``repeats`` rounds that call every
    function once (interleaved, so drifting machine load hits all alike),
    after one untimed call each (compilation)."""
    for fn in fns.values():
        fn()
    runs = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(r) for name, r in runs.items()}


def rest_thresholds(rows: list[np.ndarray], count: int = 5) -> list[float]:
    """Thresholds just above up to ``count`` distinct running minima of the rows'
    confidences: in ``rest`` mode a row hands over at the first step whose
    confidence is under the threshold, i.e. where its running minimum is."""
    minima = np.unique(np.concatenate([np.minimum.accumulate(r) for r in rows]))
    picks = minima[np.unique(np.linspace(0, len(minima) - 1, count).round().astype(int))]
    return (picks + 1e-6).tolist()


def small_confidences(small: Decodable, prompts, outputs) -> list[np.ndarray]:
    """Per row, the small model's top probability before each token of its own
    continuation."""
    values = []
    for prompt, out in zip(prompts, outputs, strict=True):
        ids = jnp.asarray([list(prompt) + list(out)], jnp.int32)
        logits, _ = small.forward(small.params, ids, jnp.ones_like(ids, bool), None)
        probs = jax.nn.softmax(logits[0, len(prompt) - 1 : -1], axis=-1)
        values.append(np.asarray(jnp.max(probs, axis=-1)))
    return values


def bench_batch(small, large, prompts, new: int, repeats: int) -> dict:
    kwargs = dict(max_new_tokens=new, eos_token_ids=())
    tokens = len(prompts) * new
    confidences = small_confidences(small, prompts, generate(small, prompts, **kwargs))
    step = np.quantile(np.concatenate(confidences), [0.1, 0.25, 0.5, 0.75, 0.9]).tolist()
    thresholds = {
        "step": [0.0, *step, 1.01],
        "rest": [0.0, *rest_thresholds(confidences), 1.01],
    }
    sweeps = {
        mode: cascade_sweep(small, large, prompts, ts, mode=mode, **kwargs)
        for mode, ts in thresholds.items()
    }
    fns = {
        name: partial(generate, model, prompts, **kwargs)
        for name, model in (("small", small), ("large", large))
    }
    for mode, rows in sweeps.items():
        for i, row in enumerate(rows):
            fns[(mode, i)] = partial(
                cascade_generate, small, large, prompts, threshold=row["threshold"], mode=mode,
                **kwargs,
            )  # fmt: skip
    seconds = interleaved_medians(fns, repeats)
    ms = {name: 1e3 * s / tokens for name, s in seconds.items()}
    for mode, rows in sweeps.items():
        for i, row in enumerate(rows):
            row["ms/token"] = ms[(mode, i)]
            row["over_large"] = ms[(mode, i)] / ms["large"]
    values = np.concatenate(confidences)
    return {
        "small": ms["small"],
        "large": ms["large"],
        "modes": sweeps,
        "range": [values.min(), values.max()],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="32 new tokens, batch 1, 2 repeats")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 --quick)")
    parser.add_argument("--new-tokens", type=int, default=None, help="default 128 (32 --quick)")
    args = parser.parse_args(argv)
    new = args.new_tokens or (32 if args.quick else 128)
    repeats = args.repeats or (2 if args.quick else 5)
    batches = [1] if args.quick else [1, 4]
    print(
        f"# cascade: large = random Llama hidden 512, 8 layers, vocab {VOCAB}, fp32, "
        f"head x{HEAD_SCALE:g}; "
        f"small = its first layer (layer skip); prompt {PROMPT}, {new} new tokens greedy, "
        f"median of {repeats}; jax {jax.__version__} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs, {platform.machine()}",
        flush=True,
    )
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    model.lm_head.kernel[...] = HEAD_SCALE * model.lm_head.kernel[...]
    large, small = Decodable.of(model), Decodable.of(layer_skip_draft(model, 1))
    rng = np.random.default_rng(0)
    summary = {"bench": "cascade", "new_tokens": new, "quick": args.quick}
    for b in batches:
        prompts = rng.integers(3, VOCAB, (b, PROMPT)).tolist()
        res = bench_batch(small, large, prompts, new, repeats)
        ms_small, ms_large = res["small"], res["large"]
        lo, hi = res["range"]
        print(
            f"\nbatch {b}: small {ms_small:.3f} ms/token, large {ms_large:.3f} ms/token "
            f"(small / large {ms_small / ms_large:.2f}); "
            f"small top probability on its own path in [{lo:.4f}, {hi:.4f}]"
        )
        for mode, rows in res["modes"].items():
            print(f"\nmode {mode}, batch {b}")
            print(format_sweep(rows))
        summary[f"b{b}"] = {
            "small_ms_per_token": round(ms_small, 4),
            "large_ms_per_token": round(ms_large, 4),
            **{
                mode: [
                    {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}
                    for row in rows
                ]
                for mode, rows in res["modes"].items()
            },
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
