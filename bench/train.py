"""Training throughput on CPU: jaxcombine's jitted training step vs a plain PyTorch +
``transformers`` training loop, on the same weights and the same batches.

Model: a random ``LlamaForCausalLM`` (hidden 256, intermediate 1024, 4 layers,
8 heads, 4 kv heads, head dim 32, vocab 8192, untied head; 8.1M parameters,
fp32 master weights; the model of ``bench/decode.py``), seed 0, written by
``transformers`` ``save_pretrained`` to a temporary directory; jaxcombine reads
it with ``jaxcombine.hf.load_model``, torch with ``from_pretrained``, so both
sides start from the same weights. Batches: random token rows [B, L + 1]
(``L = 128``), inputs ``rows[:, :-1]``, targets ``rows[:, 1:]``; global batch
8 and 32; the same rows in the same order for both sides.

Optimiser (both sides): clip by global norm 1.0, then AdamW (lr 1e-3, b1 0.9,
b2 0.95, eps 1e-8, weight decay 0.1 on tensors of 2+ dimensions only), linear
warm-up over 2 steps and cosine decay to 0.1 x lr at step 1000.

* ``ours``: ``jax.jit(make_train_step(lm_loss(graphdef), adamw(...),
  compute_dtype), donate_argnums=0)`` on one device (the step
  ``jaxcombine.training.train`` runs), state ``{"step", "params",
  "opt_state"}``; ``compute_dtype`` None (fp32) or ``jnp.bfloat16`` (fp32
  master weights cast to bf16 for the forward and backward, loss in fp32).
  Compiled ahead of time (``.lower(...).compile()``, timed: ``compile s``).
* ``torch``: ``model.train()``; ``logits = model(input_ids=x).logits``,
  ``F.cross_entropy(logits.float(), y)``, ``loss.backward()``,
  ``clip_grad_norm_(params, 1.0)``, ``torch.optim.AdamW`` (two param groups:
  decay for ``p.ndim >= 2``, none for the norms; torch's default
  implementation) stepped by a ``LambdaLR`` of the same schedule, then
  ``zero_grad(set_to_none=True)``. bf16: the forward under
  ``torch.autocast("cpu", dtype=torch.bfloat16)``, fp32 master weights.
  One row ``torch tN`` per thread count, by default 1 and torch's default
  count (``torch.get_num_threads()``, 2 on this machine; ``--torch-threads``
  to choose): torch's OpenMP threads slow down 5-40x while another process
  holds a core of a shared machine, one thread does not. The ratio takes the
  fastest torch row (transformers at its best).

Per config (dtype x batch): every row first runs ``CHECK_STEPS`` (5) steps
from the initial weights on the same 5 batches; ours is compared with the
first torch row: ``loss rel`` is the largest |ours - torch| / torch over the 5
losses, ``step1 rel`` the first step's (fp32 must agree to 1e-4), ``params``
the largest |ours - torch| over every parameter entry after the 5 steps, in
units of the peak lr (fp32 must stay within 0.5: decaying the norms too in
torch alone gives 1.4 at ``--quick`` sizes, against 0.05 when the
optimisers match; bf16 differs by a few lr, since autocast and a bf16 cast
of every parameter round differently and Adam's first steps are close to
sign(gradient)). The first of those steps is reported as ``first s``
(torch's warm-up; for ours the first call of the compiled step). Then
``--repeats`` rounds, each timing ``--steps`` steps of every row in turn
(interleaved, so drifting machine load hits all alike; ours is synchronised
once at the end of its steps, as a loop that reads metrics every few steps
is); medians. ``tok/s`` = steps x B x L /
seconds; the ratio is ours tok/s / torch tok/s (> 1: jaxcombine faster).

Run (``pip install -e .``; needs torch and transformers)::

    python bench/train.py                  # --repeats 5 --steps 5 (~5 min)
    python bench/train.py --quick          # batch 4, seq 64, 2 repeats of 2 steps (~1 min)
    python bench/train.py --torch-threads 2 --dtypes fp32

The last line of output is one JSON object with the ratios
(``train_{fp32,bf16}_b{B}``, ours tok/s / torch tok/s) and the fp32
agreement (``fp32_step1_loss_rel``, ``fp32_params_diff_over_lr``). Ratios are what to read: the
machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from transformers import LlamaForCausalLM

# `python bench/train.py` puts bench/ first on sys.path, where `train` would be this
# file: the repository root replaces it, so `train` is the package of training jobs.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.append(str(ROOT / "bench"))  # after the root: tiny_llama, not this file as `train`
from tiny_llama import VOCAB, llama_config  # noqa: E402

from jaxcombine.hf import hf_tensors, load_model  # noqa: E402
from jaxcombine.training import adamw, lm_loss, make_train_step  # noqa: E402
from train.common import split_params  # noqa: E402

transformers.utils.logging.disable_progress_bar()

LR = 1e-3
SCHEDULE_STEPS = 1000
WARMUP = 2
END_FACTOR = 0.1
WEIGHT_DECAY = 0.1
CLIP = 1.0
BETAS = (0.9, 0.95)
EPS = 1e-8
CHECK_STEPS = 5
DTYPES = {"fp32": None, "bf16": jnp.bfloat16}


def lr_factor(step: int) -> float:
    """Linear warm-up, then cosine to END_FACTOR (the schedule of
    ``jaxcombine.training.learning_rate_schedule``, written out for torch)."""
    if step < WARMUP:
        return step / WARMUP
    s = min((step - WARMUP) / (SCHEDULE_STEPS - WARMUP), 1.0)
    return END_FACTOR + (1 - END_FACTOR) * (1 + math.cos(math.pi * s)) / 2


# --- the two sides: init() -> state, step(state, batch) -> (state, loss), loss(metrics) ---


class Ours:
    """jaxcombine: the jitted ``make_train_step`` with ``adamw``, state donated."""

    def __init__(self, model_dir: Path, compute_dtype, batch_rows: np.ndarray):
        model = load_model(model_dir, dtype=jnp.float32)
        self.graphdef, self.params = split_params(model)
        self.optimizer = adamw(
            LR, SCHEDULE_STEPS, warmup_steps=WARMUP, end_factor=END_FACTOR,
            weight_decay=WEIGHT_DECAY, clip_norm=CLIP, b1=BETAS[0], b2=BETAS[1], eps=EPS,
        )  # fmt: skip
        step = make_train_step(lm_loss(self.graphdef), self.optimizer, compute_dtype)
        self.key = jax.random.key(0)
        start = time.perf_counter()
        self.compiled = (
            jax.jit(step, donate_argnums=0)
            .lower(self.init(), jnp.asarray(batch_rows), self.key, None)
            .compile()
        )
        self.compile_s = time.perf_counter() - start

    def init(self):
        params = jax.tree.map(jnp.copy, self.params)  # the step donates its state
        opt_state = jax.jit(self.optimizer.init)(params)
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": opt_state}

    def batch(self, rows: np.ndarray):
        return jax.device_put(rows)

    def step(self, state, batch):
        return self.compiled(state, batch, self.key, None)

    def sync(self, state, metrics) -> float:
        return float(jax.block_until_ready(metrics)["loss"])

    def weights(self, state) -> dict[str, np.ndarray]:
        return dict(hf_tensors(nnx.merge(self.graphdef, state["params"])))


class Torch:
    """transformers ``LlamaForCausalLM`` + ``torch.optim.AdamW`` + ``LambdaLR``."""

    def __init__(self, model_dir: Path, bf16: bool, threads: int):
        self.model_dir, self.bf16, self.threads = model_dir, bf16, threads
        self.compile_s = None

    def init(self):
        model = LlamaForCausalLM.from_pretrained(str(self.model_dir), dtype=torch.float32)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]
        opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
        return model, params, opt, sched

    def batch(self, rows: np.ndarray):
        rows = torch.from_numpy(rows).long()
        return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()

    def step(self, state, batch):
        model, params, opt, sched = state
        inputs, targets = batch
        torch.set_num_threads(self.threads)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = model(input_ids=inputs).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return state, loss.detach()

    def sync(self, state, loss) -> float:
        return float(loss)

    def weights(self, state) -> dict[str, np.ndarray]:
        return {k: v.detach().numpy() for k, v in state[0].state_dict().items()}


# --- measurement ---


def check(sides: dict, batches: list) -> dict:
    """CHECK_STEPS steps of each side from the initial weights on the same batches:
    losses per step, first-step seconds, the state after them."""
    out = {}
    for name, side in sides.items():
        state, losses, first = side.init(), [], None
        for i, rows in enumerate(batches):
            batch = side.batch(rows)
            start = time.perf_counter()
            state, metrics = side.step(state, batch)
            losses.append(side.sync(state, metrics))
            if i == 0:
                first = time.perf_counter() - start
        out[name] = {"losses": losses, "first": first, "state": state}
    return out


def params_diff(sides: dict, checked: dict, ref: str) -> float:
    """The largest |ours - torch| over every parameter entry after the check steps."""
    ours = sides["ours"].weights(checked["ours"]["state"])
    theirs = sides[ref].weights(checked[ref]["state"])
    assert set(ours) == set(theirs), sorted(set(ours) ^ set(theirs))
    return max(float(np.max(np.abs(ours[k] - theirs[k]))) for k in ours)


def timed(sides: dict, checked: dict, batches: list, repeats: int) -> dict:
    """Seconds per step of each side: ``repeats`` rounds of ``len(batches)`` steps,
    the sides interleaved within every round; continues from the checked states."""
    states = {name: checked[name]["state"] for name in sides}
    prepared = {name: [side.batch(b) for b in batches] for name, side in sides.items()}
    times = {name: [] for name in sides}
    for _ in range(repeats):
        for name, side in sides.items():
            state = states[name]
            start = time.perf_counter()
            for batch in prepared[name]:
                state, metrics = side.step(state, batch)
            side.sync(state, metrics)
            times[name].append((time.perf_counter() - start) / len(batches))
            states[name] = state
    return times


def bench_config(model_dir, dtype, batch, seq_len, steps, repeats, threads, rng) -> dict:
    """Every row of one config (dtype, batch): ``torch tN`` per thread count, ``ours``.
    The agreement is ours vs the first torch row."""
    rows = [
        rng.integers(3, VOCAB, (batch, seq_len + 1), dtype=np.int32)
        for _ in range(CHECK_STEPS + steps)
    ]
    sides = {f"torch t{t}": Torch(model_dir, dtype == "bf16", t) for t in threads}
    sides["ours"] = Ours(model_dir, DTYPES[dtype], rows[0])
    ref = f"torch t{threads[0]}"
    checked = check(sides, rows[:CHECK_STEPS])
    diff = params_diff(sides, checked, ref)
    times = timed(sides, checked, rows[CHECK_STEPS:], repeats)
    theirs = np.asarray(checked[ref]["losses"])
    rel = np.abs(np.asarray(checked["ours"]["losses"]) - theirs) / np.abs(theirs)
    out = {
        name: {
            "s": statistics.median(times[name]),
            "runs": times[name],
            "first": checked[name]["first"],
            "compile": side.compile_s,
            "losses": checked[name]["losses"],
        }
        for name, side in sides.items()
    }
    torch_s = min(out[name]["s"] for name in sides if name.startswith("torch"))
    return {
        "rows": out,
        "ratio": torch_s / out["ours"]["s"],
        "step1_rel": float(rel[0]),
        "loss_rel": float(rel.max()),
        "params_diff": diff,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 4, seq 64, 2 x 2 steps")
    parser.add_argument("--repeats", type=int, default=None, help="default 5 (2 --quick)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per repeat, default 5 (2 --quick)"
    )
    parser.add_argument("--batches", default=None, help="batch sizes, default 8,32 (4 --quick)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 128 (64 --quick)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16 or both")
    parser.add_argument(
        "--torch-threads", default=None,
        help="one torch row per thread count; default 1 and torch's default count (1,2 here)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    repeats = args.repeats or (2 if args.quick else 5)
    steps = args.steps or (2 if args.quick else 5)
    seq_len = args.seq_len or (64 if args.quick else 128)
    batches = [int(b) for b in (args.batches or ("4" if args.quick else "8,32")).split(",")]
    dtypes = args.dtypes.split(",")
    default_threads = torch.get_num_threads()
    threads = (
        [int(t) for t in args.torch_threads.split(",")]
        if args.torch_threads
        else sorted({1, default_threads})
    )

    print(
        f"# train: Llama hidden 256, 4 layers, vocab {VOCAB}, fp32 master weights, seq {seq_len}, "
        f"AdamW + clip, {CHECK_STEPS} checked steps then median of {repeats} x {steps} steps; "
        f"jax {jax.__version__} ({jax.default_backend()}, {jax.device_count()} device), "
        f"torch {torch.__version__} (default {default_threads} threads), "
        f"transformers {transformers.__version__}, {os.cpu_count()} CPUs, {platform.machine()}",
        flush=True,
    )
    rng = np.random.default_rng(0)
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "llama"
        torch.manual_seed(0)
        hf = LlamaForCausalLM(llama_config())
        print(f"# {sum(p.numel() for p in hf.parameters()) / 1e6:.1f}M parameters; "
              f"transformers attention: {hf.config._attn_implementation}", flush=True)  # fmt: skip
        hf.save_pretrained(str(model_dir))
        del hf
        for dtype in dtypes:
            for b in batches:
                res[dtype, b] = bench_config(
                    model_dir, dtype, b, seq_len, steps, repeats, threads, rng
                )
                print(f"# {dtype} batch {b} done", flush=True)

    header = (
        f"{'row':<14}{'batch':>6}{'ms/step':>9}{'tok/s':>8}{'compile s':>10}{'first s':>9}"
        f"  {'losses (5 checked steps)':<44}runs (ms/step)"
    )
    print(header)
    print("-" * (len(header) + 30))
    for (dtype, b), r in res.items():
        for name, row in r["rows"].items():
            compile_s = "-" if row["compile"] is None else f"{row['compile']:.2f}"
            losses = " ".join(f"{x:.5f}" for x in row["losses"])
            runs = ", ".join(f"{1e3 * t:.0f}" for t in row["runs"])
            print(
                f"{name + ' ' + dtype:<14}{b:>6}{1e3 * row['s']:>9.1f}"
                f"{b * seq_len / row['s']:>8.0f}{compile_s:>10}{row['first']:>9.2f}"
                f"  {losses:<44}{runs}"
            )
    print()
    header = f"{'config':<12}{'ours/torch tok/s':>17}{'step1 rel':>11}{'loss rel':>10}{'params':>9}"
    print(header)
    print("-" * len(header))
    out = {}
    for (dtype, b), r in res.items():
        out[f"train_{dtype}_b{b}"] = round(r["ratio"], 2)
        print(
            f"{dtype + ' b' + str(b):<12}{r['ratio']:>17.2f}{r['step1_rel']:>11.1e}"
            f"{r['loss_rel']:>10.1e}{r['params_diff'] / LR:>8.2f}x"
        )
    print(f"(ratio: vs the fastest torch row; loss rel: largest |ours - torch t{threads[0]}| / "
          "torch over the checked steps; params: largest |ours - torch| entry after them, in "
          "units of the peak lr)")  # fmt: skip
    fp32 = [r for (dtype, _), r in res.items() if dtype == "fp32"]
    if fp32:
        step1 = max(r["step1_rel"] for r in fp32)
        params = max(r["params_diff"] for r in fp32) / LR
        agree = step1 <= 1e-4 and params <= 0.5
        print(f"fp32 agreement (step-1 loss <= 1e-4 relative, parameters after "
              f"{CHECK_STEPS} steps <= 0.5 x lr): {'ok' if agree else 'FAILED'}")  # fmt: skip
        out["fp32_step1_loss_rel"] = float(f"{step1:.1e}")
        out["fp32_params_diff_over_lr"] = round(params, 3)
    print(json.dumps({"bench": "train", "seq_len": seq_len, **out}))


if __name__ == "__main__":
    main()
