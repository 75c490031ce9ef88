"""Per-tensor merge speed: jaxcombine's jitted leaf functions vs mergekit's kernels.

What it measures: for each of mergekit's 20 merge methods, the time to merge a
few realistically sized fp32 tensors (a base and fine-tunes = base + sparse
noise; shapes of a 1B-class decoder: (2048, 2048), (5632, 2048), (2048,)).

* mergekit: the registered method called in-process on one
  ``TensorGroup`` per tensor (``registry.get(name)([group], parameters=...)``),
  PyTorch on CPU.
* jaxcombine: the method's leaf function (``SPECS[name].leaf``) with the same
  static parameters the engine (:func:`jaxcombine.merging.merge`) would pass,
  jitted together with the stacking of the separate input tensors, so both
  sides start from the same unstacked tensors. Steady-state time after a
  warm-up call (``block_until_ready``); the trace + XLA compile time of the
  first call is its own column.

Every time is a median over ``--repeats`` runs of all tensors of one method;
``speedup`` = mergekit time / jaxcombine time. The two outputs are compared
(max abs difference over all tensors) so the benchmark doubles as a sanity
check; the random methods (DARE, DELLA) draw different masks, so only their
shapes are compared.

Run (needs mergekit in the same environment: ``pip install mergekit``, plus
``pip install -e .`` of this repository)::

    python bench/merge_methods.py                 # full shapes, ~15 min on 2 cores
    python bench/merge_methods.py --quick         # small shapes, seconds
    python bench/merge_methods.py --methods ties,slerp --repeats 7

The numbers come from a shared, noisy machine: read the ratios, not the
milliseconds. The last line of output is one JSON object with the ratios.

jaxlib 0.10.2 / 0.11.x: XLA:CPU hands a multiply-then-reduce over the model
axis (``(models * w[:, None, None]).sum(0)``) to its YNNPACK fusion, which runs
~1000x slower on tensors over ~1M entries (jax-ml/jax#39257, #37465). The
library avoids the pattern (``jaxcombine.merging._ops.model_sum`` unrolls the
model axis), so the default run uses stock XLA flags, as users get them;
``--ynn-workaround`` adds ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``
before importing jax, for comparison.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

YNN_WORKAROUND = "--xla_cpu_experimental_ynn_fusion_type=-reduce"


def _xla_workaround() -> str:
    """Set the YNN reduce workaround on affected jaxlib versions (before jax is imported)."""
    if "--ynn-workaround" not in sys.argv:
        return "stock XLA flags"
    try:
        version = importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return "jaxlib not found"
    flags = os.environ.get("XLA_FLAGS", "")
    if (version == "0.10.2" or version.startswith("0.11.")) and "ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {YNN_WORKAROUND}".strip()
        return f"XLA_FLAGS+={YNN_WORKAROUND} (jaxlib {version})"
    return f"XLA_FLAGS={flags!r}"


XLA_NOTE = _xla_workaround()

try:
    import torch
    from mergekit.merge_methods import registry as mk_registry
    from mergekit.merge_methods.base import TensorGroup
except ImportError as error:  # pragma: no cover - environment problem
    sys.exit(
        f"bench/merge_methods.py needs mergekit and torch in this environment ({error}); "
        "pip install mergekit"
    )

import jax  # noqa: E402  (after the XLA_FLAGS workaround)
import jax.numpy as jnp  # noqa: E402

from jaxcombine.merging import SPECS  # noqa: E402
from jaxcombine.merging._engine import REQUIRED  # noqa: E402

FULL_SHAPES = {"attn.q_proj": (2048, 2048), "mlp.up_proj": (5632, 2048), "norm": (2048,)}
QUICK_SHAPES = {"attn.q_proj": (256, 256), "mlp.up_proj": (704, 256), "norm": (256,)}

# Per method: how many fine-tuned models, whether a base goes in, and the
# settings (mergekit names; per-model ones as lists, one value per fine-tune).
# mergekit and jaxcombine get exactly these.
W3 = [1.0, 0.5, 0.8]
CASES: dict[str, dict] = {
    "linear": dict(n=3, base=False, per={"weight": [0.5, 0.3, 0.2]}),
    "task_arithmetic": dict(n=3, base=True, per={"weight": W3}, shared={"lambda": 0.9}),
    "ties": dict(n=3, base=True, per={"weight": W3, "density": [0.5, 0.3, 0.7]}),
    "dare_ties": dict(n=3, base=True, per={"weight": W3, "density": [0.5, 0.3, 0.7]}),
    "dare_linear": dict(n=3, base=True, per={"weight": W3, "density": [0.5, 0.3, 0.7]}),
    "breadcrumbs": dict(
        n=3, base=True, per={"weight": W3, "density": [0.9, 0.8, 0.7], "gamma": [0.01, 0.05, 0.02]}
    ),
    "breadcrumbs_ties": dict(
        n=3, base=True, per={"weight": W3, "density": [0.9, 0.8, 0.7], "gamma": [0.01, 0.05, 0.02]}
    ),
    "della": dict(
        n=3, base=True, per={"weight": W3, "density": [0.5, 0.4, 0.6], "epsilon": [0.1] * 3}
    ),
    "della_linear": dict(
        n=3, base=True, per={"weight": W3, "density": [0.5, 0.4, 0.6], "epsilon": [0.1] * 3}
    ),
    "slerp": dict(n=1, base=True, shared={"t": 0.4}),
    "nuslerp": dict(n=2, base=True, per={"weight": [0.6, 0.4]}),
    "multislerp": dict(n=3, base=True, per={"weight": [0.5, 0.3, 0.2]}),
    "karcher": dict(n=3, base=False, shared={"max_iter": 10, "tol": 1e-5}),
    "model_stock": dict(n=3, base=True),
    "nearswap": dict(n=1, base=True, shared={"t": 0.001}),
    "sce": dict(n=3, base=True, shared={"select_topk": 0.5}),
    "ram": dict(n=3, base=True, shared={"epsilon": 1e-5}),
    "ramplus_tl": dict(n=3, base=True, shared={"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}),
    "arcee_fusion": dict(n=1, base=True),
    "passthrough": dict(n=1, base=False, per={"scale": [0.5]}),
}


def make_inputs(shapes: dict, n_models: int = 3, seed: int = 0) -> dict:
    """Per tensor: base ~ N(0, 0.02), fine-tune i = base + N(0, 2e-3) on a random 70% of entries."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in shapes.items():
        base = rng.normal(0.0, 0.02, shape).astype(np.float32)
        fts = []
        for _ in range(n_models):
            delta = rng.normal(0.0, 2e-3, shape).astype(np.float32)
            delta *= rng.random(shape) < 0.7
            fts.append(base + delta)
        out[name] = (base, fts)
    return out


def leaf_kwargs(name: str, case: dict) -> dict:
    """The static keyword arguments the engine gives the leaf for these settings."""
    spec = SPECS[name]
    per, shared = case.get("per", {}), case.get("shared", {})
    kwargs = dict(spec.fixed)
    for param in spec.params:
        source = per if param.scope == "model" else shared
        value = source.get(param.name, param.default)
        if value is REQUIRED:
            raise SystemExit(f"benchmark case {name} lacks required {param.name}")
        if param.scope == "model" and isinstance(value, list):
            value = tuple(value)
        elif param.scope == "model" and value is not None:
            value = (value,) * case["n"]
        kwargs[param.keyword] = value
    return kwargs


def mergekit_call(name: str, case: dict):
    """A function (base, fts) -> merged torch tensor, through mergekit's public call."""
    method = mk_registry.get(name)
    params = dict(case.get("shared", {}))
    params.update(case.get("per", {}))

    def run(base, fts):
        tensors = ([base] if case["base"] else []) + list(fts)
        group = TensorGroup.from_tensors(tensors, base_index=0 if case["base"] else None)
        return method([group], parameters=params)[0]

    return run


def jax_call(name: str, case: dict):
    """A jitted function (base, fts, key) -> merged array, and whether it takes a key."""
    spec = SPECS[name]
    kwargs = leaf_kwargs(name, case)

    def run(base, fts, key):
        extra = {"key": key} if spec.random else {}
        return spec.leaf(base, jnp.stack(fts), **kwargs, **extra)

    return jax.jit(run)


def median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_method(name: str, inputs: dict, repeats: int) -> dict:
    case = CASES[name]
    spec = SPECS[name]
    n = case["n"]
    torch_in = {
        t: (torch.from_numpy(b), [torch.from_numpy(f) for f in fts[:n]])
        for t, (b, fts) in inputs.items()
    }
    jax_in = {
        t: (jnp.asarray(b) if case["base"] else None, [jnp.asarray(f) for f in fts[:n]])
        for t, (b, fts) in inputs.items()
    }
    mk = mergekit_call(name, case)
    fn = jax_call(name, case)
    keys = {t: jax.random.fold_in(jax.random.key(0), i) for i, t in enumerate(inputs)}

    # Compile: trace + lower + XLA compile of every tensor shape (AOT, timed alone).
    compiled = {}
    start = time.perf_counter()
    for t, (b, fts) in jax_in.items():
        compiled[t] = fn.lower(b, fts, keys[t]).compile()
    compile_ms = (time.perf_counter() - start) * 1e3

    def run_jax():
        return {
            t: compiled[t](b, fts, keys[t]).block_until_ready() for t, (b, fts) in jax_in.items()
        }

    def run_mk():
        with torch.no_grad():
            return {t: mk(b, fts) for t, (b, fts) in torch_in.items()}

    jax_out = run_jax()  # warm-up
    mk_out = run_mk()
    diff = 0.0
    for t in inputs:
        a, b = np.asarray(jax_out[t], np.float64), mk_out[t].double().numpy()
        if a.shape != b.shape:
            raise SystemExit(f"{name}: shapes differ on {t}: {a.shape} vs {b.shape}")
        diff = max(diff, float(np.max(np.abs(a - b))))
    del jax_out, mk_out

    # Interleave the two sides so drifting machine load hits both alike.
    mk_times, jax_times = [], []
    for _ in range(repeats):
        mk_times.append(median_ms(run_mk, 1))
        jax_times.append(median_ms(run_jax, 1))
    mk_ms, jax_ms = statistics.median(mk_times), statistics.median(jax_times)
    return {
        "method": name,
        "mergekit_ms": mk_ms,
        "jaxcombine_ms": jax_ms,
        "speedup": mk_ms / jax_ms,
        "compile_ms": compile_ms,
        "max_abs_diff": None if spec.random else diff,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 3)")
    parser.add_argument("--methods", default=None, help="comma-separated method names")
    parser.add_argument(
        "--ynn-workaround", action="store_true", help=f"add {YNN_WORKAROUND} (see docstring)"
    )
    args = parser.parse_args(argv)

    repeats = args.repeats or 3
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    methods = list(CASES) if args.methods is None else args.methods.split(",")
    unknown = [m for m in methods if m not in CASES]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; valid: {', '.join(CASES)}")

    print(
        f"# merge_methods: {', '.join(f'{k}{v}' for k, v in shapes.items())} fp32, "
        f"median of {repeats}; jax {jax.__version__} ({jax.default_backend()}), "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"{os.cpu_count()} CPUs, {platform.machine()}; {XLA_NOTE}",
        flush=True,
    )
    inputs = make_inputs(shapes)
    header = (
        f"{'method':<18}{'mergekit ms':>13}{'jaxcombine ms':>15}{'speedup':>9}"
        f"{'compile ms':>12}{'max abs diff':>14}"
    )
    print(header)
    print("-" * len(header), flush=True)
    rows = []
    for name in methods:
        row = bench_method(name, inputs, repeats)
        rows.append(row)
        diff = "random" if row["max_abs_diff"] is None else f"{row['max_abs_diff']:.1e}"
        print(
            f"{name:<18}{row['mergekit_ms']:>13.1f}{row['jaxcombine_ms']:>15.1f}"
            f"{row['speedup']:>9.2f}{row['compile_ms']:>12.0f}{diff:>14}",
            flush=True,
        )
    speedups = [r["speedup"] for r in rows]
    geo = float(np.exp(np.mean(np.log(speedups))))
    print(f"geometric mean speedup: {geo:.2f}")
    print(
        json.dumps(
            {
                "bench": "merge_methods",
                "quick": args.quick,
                "stock_xla": not args.ynn_workaround,
                "speedup": {r["method"]: round(r["speedup"], 2) for r in rows},
                "geomean": round(geo, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
