"""Sparse MoE layer speed and memory on CPU: SparseMoE vs a dense FFN and vs a
one-hot einsum dispatch, forward + backward.

What it measures, all in one process and interleaved (each repeat times every
variant of a configuration once, so drifting machine load hits all alike):
``jax.jit(jax.grad(loss, argnums=(params, x)))`` with ``loss = sum(y * r)``
(r a fixed random tensor), fp32, ``block_until_ready``; the first call
(compile + run) is excluded, the time is the median of ``--repeats`` calls.

Configuration A, T = 4096 tokens (one sequence, one routing group), D = 512,
8 experts of F = 2048, top-2, capacity factor 1.25:

* ``dense``: SwiGLU FFN of hidden 2F = 4096 over every token, the same
  active FLOPs as top-2 of experts of width F (without the capacity slack).
* ``capacity``: ``SparseMoE`` with capacity factor 1.25 (C = 1280 slots per
  expert: the experts compute 1.25x the dense FLOPs by construction).
* ``dropless``: ``SparseMoE`` with ``capacity_factor=None`` (sorted by
  expert, blocked grouped matmuls on CPU).

Configuration B, 64 experts, same T, D, top-2, capacity factor 1.25, with
F = 256 so that the expert parameters total the same as A (64 x 256 = 8 x
2048; 64 experts of F = 2048 would be 201M parameters, 0.8 GB, 1.6 GB with
gradients, on a shared 2-core machine):

* ``onehot``: flaxformer / V-MoE style dispatch: the same routing (top-2,
  token-order slots), then a [G, S, E, C] dispatch tensor and a combine tensor
  built from one-hots, ``einsum("gsec,gsd->gecd")`` into the experts (the
  same ``SparseMoE.experts`` code, so the ratio is the dispatch's cost) and
  ``einsum("gsec,gecd->gsd")`` back.
* ``capacity``: ``SparseMoE``, capacity factor 1.25 (C = 160).
* ``dropless``: ``SparseMoE`` dropless.

``GFLOP/s`` divides the active FLOPs (``3 matmuls x 2 T D K F``, times 3 for
forward and backward; the same for every variant of a configuration) by the
time: capacity slack, padding rows and dispatch work are not counted.

Memory is XLA's compile-time estimate for the jitted gradient function,
``compiled.memory_analysis()``: temp + argument + output bytes (what the
executable holds at its peak, inputs and gradients included); not process RSS.

Run (``pip install -e .``)::

    python bench/moe.py                  # --repeats 5
    python bench/moe.py --quick          # T = 512, seconds
    python bench/moe.py --blocks 128,256,512   # extra dropless rows per CPU block size

Ratios are what to read (the machine is shared and noisy); the last line of
output is one JSON object with them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from jaxcombine.moe import MoEConfig, SparseMoE
from jaxcombine.moe import layer as L
from jaxcombine.moe import routing as R


def dense_ffn(D: int, H: int, key):
    """SwiGLU FFN of width H: ``loss(params, x)`` and its params."""
    k = jax.random.split(key, 3)
    params = {
        "gate": 0.02 * jax.random.normal(k[0], (D, H)),
        "up": 0.02 * jax.random.normal(k[1], (D, H)),
        "down": 0.02 * jax.random.normal(k[2], (H, D)),
    }

    def apply(p, x):
        return (jax.nn.silu(x @ p["gate"]) * (x @ p["up"])) @ p["down"]

    return apply, params


def sparse_moe(config: MoEConfig):
    """``SparseMoE`` as ``apply(state, x)`` over its split state."""
    graphdef, state = nnx.split(SparseMoE(config, rngs=nnx.Rngs(0)))

    def apply(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    return apply, state


def onehot_moe(config: MoEConfig):
    """The same layer with flaxformer's one-hot [G, S, E, C] dispatch and combine einsums."""
    graphdef, state = nnx.split(SparseMoE(config, rngs=nnx.Rngs(0)))
    E, K = config.num_experts, config.num_experts_per_token

    def apply(state, x):
        logits = jnp.einsum("gsd,de->gse", x, state["router"][...])
        C = R.expert_capacity(x.shape[1], E, K, config.capacity_factor)
        routing = R.token_choice(R.router_probabilities(logits), K, capacity=C, renormalize=True)
        kept = routing.slots < C
        expert = jax.nn.one_hot(routing.experts, E, dtype=x.dtype)  # [G, S, K, E]
        slot = jax.nn.one_hot(jnp.where(kept, routing.slots, C), C, dtype=x.dtype)  # [G, S, K, C]
        dispatch = jnp.einsum("gske,gskc->gsec", expert, slot)
        combine = jnp.einsum("gsk,gske,gskc->gsec", routing.weights, expert, slot)
        inputs = jnp.einsum("gsec,gsd->gecd", dispatch, x)
        out = nnx.merge(graphdef, state).experts(inputs)  # the same expert code as SparseMoE
        return jnp.einsum("gsec,gecd->gsd", combine, out)

    return apply, state


def compile_grad(apply, params, x, r):
    def loss(params, x):
        return jnp.sum(apply(params, x) * r)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
    mem = compiled.memory_analysis()
    total = mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
    return (lambda: jax.block_until_ready(compiled(params, x))), total / 2**20


def bench(variants: dict, x, repeats: int) -> dict:
    """Median seconds and memory (MiB) of each variant, interleaved repeats."""
    r = jax.random.normal(jax.random.key(99), x.shape)
    runs, memory, times = {}, {}, {}
    for name, (apply, params) in variants.items():
        runs[name], memory[name] = compile_grad(apply, params, x, r)
        runs[name]()  # warm-up
        times[name] = []
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {
        name: {"s": statistics.median(t), "runs": t, "mib": memory[name]}
        for name, t in times.items()
    }


def dropless_variants(config: MoEConfig, blocks: list[int]) -> dict:
    out = {}
    for block in blocks:
        L.CPU_BLOCK = block  # read when the layer is traced (compile_grad traces at once)
        out[f"dropless_b{block}"] = sparse_moe(config)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="T = 512 tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--blocks", default="", help="extra dropless rows, CPU block sizes")
    args = parser.parse_args(argv)

    T = 512 if args.quick else 4096
    D, F, E, K, cf = 512, 2048, 8, 2, 1.25
    E64, F64 = 64, F * E // 64
    print(
        f"# moe: T={T} D={D} fp32, fwd+bwd (grad wrt params and x), median of {args.repeats}; "
        f"jax {jax.__version__} ({jax.default_backend()}), {os.cpu_count()} CPUs, "
        f"{platform.machine()}; CPU_BLOCK={L.CPU_BLOCK}",
        flush=True,
    )
    x = jax.random.normal(jax.random.key(0), (1, T, D))
    extra = [int(b) for b in args.blocks.split(",") if b]
    default_block = L.CPU_BLOCK

    cap = MoEConfig(E, D, F, num_experts_per_token=K, capacity_factor=cf)
    drop = MoEConfig(E, D, F, num_experts_per_token=K, capacity_factor=None)
    a = {"dense": dense_ffn(D, K * F, jax.random.key(1)), "capacity": sparse_moe(cap)}
    a["dropless"] = sparse_moe(drop)
    a.update(dropless_variants(drop, extra))
    L.CPU_BLOCK = default_block
    res_a = bench(a, x, args.repeats)

    cap64 = MoEConfig(E64, D, F64, num_experts_per_token=K, capacity_factor=cf)
    drop64 = MoEConfig(E64, D, F64, num_experts_per_token=K, capacity_factor=None)
    b = {"onehot": onehot_moe(cap64), "capacity": sparse_moe(cap64), "dropless": sparse_moe(drop64)}
    b.update(dropless_variants(drop64, extra))
    L.CPU_BLOCK = default_block
    res_b = bench(b, x, args.repeats)

    header = (
        f"{'config':<34}{'variant':<14}{'median s':>10}{'GFLOP/s':>9}{'memory MiB':>12}  runs (s)"
    )
    print(header)
    print("-" * (len(header) + 30))
    for label, res, width in ((f"A: E={E} F={F} k={K} cf={cf}", res_a, F),
                              (f"B: E={E64} F={F64} k={K} cf={cf}", res_b, F64)):  # fmt: skip
        # active FLOPs: 3 matmuls of T x D x (K F), forward + 2 in backward
        flops = 3 * 3 * 2 * T * D * K * width
        for name, row in res.items():
            runs = ", ".join(f"{t:.2f}" for t in row["runs"])
            rate = flops / row["s"] / 1e9
            print(f"{label:<34}{name:<14}{row['s']:>10.3f}{rate:>9.0f}{row['mib']:>12.0f}  {runs}")
    ratios = {
        "capacity_over_dense": res_a["capacity"]["s"] / res_a["dense"]["s"],
        "dropless_over_dense": res_a["dropless"]["s"] / res_a["dense"]["s"],
        "onehot_over_capacity_e64": res_b["onehot"]["s"] / res_b["capacity"]["s"],
        "onehot_over_dropless_e64": res_b["onehot"]["s"] / res_b["dropless"]["s"],
        "memory_capacity_over_dense": res_a["capacity"]["mib"] / res_a["dense"]["mib"],
        "memory_dropless_over_dense": res_a["dropless"]["mib"] / res_a["dense"]["mib"],
        "memory_onehot_over_capacity_e64": res_b["onehot"]["mib"] / res_b["capacity"]["mib"],
    }
    for block in extra:
        ratios[f"dropless_b{block}_over_dense"] = (
            res_a[f"dropless_b{block}"]["s"] / res_a["dense"]["s"]
        )
    print("targets: capacity/dense <= 1.3, onehot/capacity (E=64) >= 3")
    for key, value in ratios.items():
        print(f"{key:<34}{value:>8.2f}")
    print(json.dumps({"bench": "moe", "tokens": T, **{k: round(v, 2) for k, v in ratios.items()}}))


if __name__ == "__main__":
    main()
