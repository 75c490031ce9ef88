"""Whole-process merge: ``jaxcombine merge`` vs ``mergekit-yaml`` on the same config and files.

What it measures: the wall time and peak resident memory of one whole merge
process (interpreter start, imports, reading the inputs, merging, writing the
output), for each tool on the same mergekit YAML config and the same input
checkpoints:

* jaxcombine: ``jaxcombine merge CONFIG OUT --quiet --out-shard-size 5B``
* mergekit:   ``mergekit-yaml CONFIG OUT --quiet --out-shard-size 5B`` (otherwise its defaults)
* I/O floor:  a process that reads every input file once (64 MiB chunks into
  one reused buffer) and writes one model's worth of bytes (the first input's,
  chunk by chunk): the least a merge must do, with nothing decoded.

The inputs are a Llama-shaped model of ~148M parameters in fp32 (hidden 768,
intermediate 2560, 12 layers, 12 heads, vocab 32000, untied lm_head; random
init written with numpy under the Hugging Face tensor names) and three
fine-tunes (base + N(0, 2e-3) on 70% of the entries), made once into
``--workdir`` and reused. Configs: ``linear`` (three fine-tunes and the base),
``ties`` (base + three fine-tunes, density 0.5, weight 1) and
``task_arithmetic``, all ``dtype: float32``.

Each measurement is one fresh process, timed from the parent
(``time.perf_counter`` from start to exit). Memory, per process: peak RSS is
the kernel's high-water mark (``os.wait4``'s ``ru_maxrss``, as ``/usr/bin/time
-v`` reports it); it includes the touched pages of memory-mapped files (page
cache the kernel can drop), so peak anonymous RSS (heap and arrays:
``RssAnon`` in ``/proc/PID/status``, sampled every 10 ms) is reported too. The
page cache cannot be dropped without privileges, so all
input files are read once before every run (untimed; the kernel may reclaim
idle page cache between runs): every run sees warm caches. Each run line
shows the 1-minute load average before it, to spot runs disturbed by other
work on the machine.
Runs are interleaved (jaxcombine, mergekit per config, then the I/O floor),
``--repeats`` times; the figures are medians. The outputs of the two tools
are compared tensor by tensor (max abs difference, and how many entries differ
by more than 1e-5).

Run (one environment with both tools, e.g. /tmp/mkvenv with mergekit and
``pip install -e .`` of this repository)::

    /tmp/mkvenv/bin/python bench/merge_cli.py              # ~148M params, 3 repeats
    /tmp/mkvenv/bin/python bench/merge_cli.py --quick      # ~20M params, 1 repeat
    python bench/merge_cli.py --mergekit /path/to/mergekit-yaml --configs linear,ties

``speedup`` = mergekit time / jaxcombine time (> 1: jaxcombine faster);
``rss_ratio`` = jaxcombine peak RSS / mergekit peak RSS (< 1: jaxcombine
smaller), ``anon_ratio`` the same for peak anonymous RSS;
``linear_over_io_floor`` = jaxcombine linear time / I/O floor time.
The last line of output is one JSON object with these ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from safetensors import safe_open
from safetensors.numpy import save_file

MODELS = ("base", "ft1", "ft2", "ft3")
SHAPES = {
    "full": dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "quick": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=32000),
}  # fmt: skip
NOISE, NOISE_FRACTION = 2e-3, 0.7
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


# --------------------------------------------------------------------- models


def llama_config(size: str):
    from transformers import LlamaConfig

    return LlamaConfig(
        **SHAPES[size],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        torch_dtype="float32",
        architectures=["LlamaForCausalLM"],  # mergekit reads the architecture from here
    )


def tensor_shapes(config) -> dict[str, tuple[int, ...]]:
    """The exact Hugging Face tensor names and shapes, from a weightless (meta) model."""
    import torch
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return {name: tuple(t.shape) for name, t in model.state_dict().items()}


def make_models(root: Path, size: str) -> int:
    """Write base + three fine-tunes as fp32 safetensors under ``root`` (reused if present)."""
    stamp = root / "made.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("shape") == SHAPES[size]:
        return json.loads(stamp.read_text())["params"]
    shutil.rmtree(root, ignore_errors=True)
    config = llama_config(size)
    shapes = tensor_shapes(config)
    rng = np.random.default_rng(0)
    base = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):
            base[name] = np.ones(shape, np.float32)
        else:
            base[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)
    for model in MODELS:
        tensors = base
        if model != "base":
            tensors = {name: finetune(x, rng) for name, x in base.items()}
        (root / model).mkdir(parents=True)
        config.save_pretrained(root / model)
        save_file(tensors, str(root / model / "model.safetensors"), metadata={"format": "pt"})
        print(f"  wrote {root / model}", flush=True)
    params = sum(int(np.prod(s)) for s in shapes.values())
    stamp.write_text(json.dumps({"shape": SHAPES[size], "params": params}))
    return params


def finetune(x: np.ndarray, rng) -> np.ndarray:
    noise = rng.standard_normal(x.shape, dtype=np.float32) * np.float32(NOISE)
    return x + noise * (rng.random(x.shape, dtype=np.float32) < NOISE_FRACTION)


def write_configs(workdir: Path, models: Path, names: list[str]) -> dict[str, Path]:
    """The merge configs as mergekit YAML files (absolute model paths)."""
    m = {name: str(models / name) for name in MODELS}
    fts = ("ft1", "ft2", "ft3")
    configs = {
        "linear": {
            "merge_method": "linear",
            "models": [{"model": m[f], "parameters": {"weight": 0.3}} for f in fts]
            + [{"model": m["base"], "parameters": {"weight": 0.1}}],
        },
        "ties": {  # mergekit's README form: the base listed without parameters
            "merge_method": "ties",
            "base_model": m["base"],
            "parameters": {"normalize": True},
            "models": [{"model": m["base"]}]
            + [{"model": m[f], "parameters": {"density": 0.5, "weight": 1.0}} for f in fts],
        },
        "task_arithmetic": {
            "merge_method": "task_arithmetic",
            "base_model": m["base"],
            "models": [{"model": m[f], "parameters": {"weight": 0.5}} for f in fts],
        },
    }
    paths = {}
    for name in names:
        paths[name] = workdir / f"{name}.yml"
        paths[name].write_text(yaml.safe_dump({**configs[name], "dtype": "float32"}))
    return paths


# ---------------------------------------------------------------- measuring


def warm_page_cache(paths: list[Path]) -> int:
    """Read every file once so that every run starts with the inputs in the page cache."""
    total = 0
    for path in paths:
        with open(path, "rb") as f:
            while chunk := f.read(64 << 20):
                total += len(chunk)
    return total


class AnonSampler(threading.Thread):
    """Polls ``/proc/PID/status`` every 10 ms for the process's anonymous resident memory."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.path, self.peak_kb, self.done = f"/proc/{pid}/status", 0, threading.Event()
        self.start()

    def run(self):
        while not self.done.wait(0.01):
            try:
                text = Path(self.path).read_text()
            except OSError:
                return
            if found := re.search(r"RssAnon:\s+(\d+) kB", text):
                self.peak_kb = max(self.peak_kb, int(found.group(1)))

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak_kb / 1024


def measure(cmd: list[str], env: dict) -> tuple[float, float, float]:
    """Wall seconds, peak RSS and peak anonymous RSS (MB) of one fresh process running ``cmd``.

    Peak RSS is the kernel's high-water mark for that process (``wait4``'s
    ``ru_maxrss``; it counts the pages of memory-mapped files it touched too);
    peak anonymous RSS (heap, arrays) is sampled every 10 ms.
    """
    with tempfile.TemporaryFile("w+") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        sampler = AnonSampler(proc.pid)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        anon = sampler.stop()
        if proc.returncode != 0:
            log.seek(0)
            raise RuntimeError(
                f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{log.read()[-8000:]}"
            )
    return seconds, usage.ru_maxrss / 1024, anon  # ru_maxrss: KB on Linux


def io_floor_run(out: str, inputs: list[str]) -> None:
    """Read every input file once; write the first input's bytes as the output.

    The least any merge must do, done as cheaply as Python can: the files are
    read in 64 MiB chunks into one reused buffer (``readinto``), and the first
    model's chunks are written straight out (the output has the same size and
    layout as one input). No tensor is decoded and no array is allocated.
    """
    Path(out).mkdir(parents=True, exist_ok=True)
    buffer = memoryview(bytearray(64 << 20))
    for i, model_dir in enumerate(inputs):
        for path in sorted(Path(model_dir).glob("*.safetensors")):
            sink = Path(out) / path.name if i == 0 else os.devnull
            with open(path, "rb", buffering=0) as f, open(sink, "wb", buffering=0) as w:
                while n := f.readinto(buffer):
                    if i == 0:
                        w.write(buffer[:n])


def compare(dir_a: Path, dir_b: Path, tol: float = 1e-5) -> tuple[float, int, int]:
    """Max |a - b| over every tensor of two outputs, the entries above ``tol``, all entries."""

    def load(d: Path) -> dict[str, np.ndarray]:
        out = {}
        for path in sorted(d.glob("*.safetensors")):
            with safe_open(str(path), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
        return out

    a, b = load(dir_a), load(dir_b)
    if a.keys() != b.keys():
        raise RuntimeError(f"tensor names differ: {sorted(a.keys() ^ b.keys())[:10]}")
    worst, above, total = 0.0, 0, 0
    for name in a:
        if a[name].shape != b[name].shape:
            raise RuntimeError(f"{name}: shapes {a[name].shape} vs {b[name].shape}")
        diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64))
        worst = max(worst, float(diff.max()))
        above += int((diff > tol).sum())
        total += diff.size
    return worst, above, total


# ---------------------------------------------------------------------- main


def commands(tool: str, config: Path, out: Path, mergekit: str, models: Path) -> list[str]:
    if tool == "jaxcombine":
        script = Path(sys.executable).with_name("jaxcombine")  # the console script users run
        launch = [str(script)] if script.exists() else [sys.executable, "-m", "jaxcombine.cli"]
        return [*launch, "merge", str(config), str(out), "--quiet", "--out-shard-size", "5B"]
    if tool == "mergekit":
        return [mergekit, str(config), str(out), "--quiet", "--out-shard-size", "5B"]
    return [sys.executable, __file__, "--io-floor-run", str(out),
            *(str(models / m) for m in MODELS)]  # fmt: skip


def versions(mergekit: str) -> str:
    import importlib.metadata as md

    names = ("jax", "jaxlib", "torch", "mergekit", "safetensors")
    found = []
    for name in names:
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            found.append(f"{name} ?")
    return f"{platform.machine()}, {os.cpu_count()} CPUs; " + ", ".join(found)


def warm_imports(mergekit: str, env: dict) -> None:
    """Load both tools' code once (untimed), so the first timed run is not a cold start."""
    subprocess.run(
        [sys.executable, "-c", "import jax, jaxcombine.cli, jaxcombine.merging.mergekit"],
        env=env,
        check=True,
    )
    subprocess.run([mergekit, "--help"], env=env, check=True, capture_output=True)


def run(args) -> dict:
    size = "quick" if args.quick else "full"
    repeats = args.repeats or (1 if args.quick else 3)
    workdir = Path(args.workdir)
    models = workdir / f"models_{size}"
    names = args.configs.split(",")
    env = {**os.environ, **OFFLINE}

    print(f"merge_cli: {versions(args.mergekit)}")
    print(f"making/reusing models in {models} ...", flush=True)
    params = make_models(models, size)
    inputs = sorted(models.glob("*/*.safetensors"))
    in_bytes = sum(p.stat().st_size for p in inputs)
    print(f"Llama {SHAPES[size]}: {params:,} parameters ({params * 4 / 1e6:.0f} MB fp32) "
          f"per model; 4 models, {in_bytes / 1e9:.2f} GB of inputs")  # fmt: skip
    configs = write_configs(workdir, models, names)
    warmed = warm_page_cache(inputs)
    print(f"page cache warmed: read {warmed / 1e9:.2f} GB of inputs, and again before "
          f"every run (caches cannot be dropped: every run sees warm caches)")  # fmt: skip
    warm_imports(args.mergekit, env)

    outs = workdir / "out"
    shutil.rmtree(outs, ignore_errors=True)
    plan = [(tool, name) for name in names for tool in ("jaxcombine", "mergekit")]
    if "linear" in names:
        plan.append(("io_floor", "linear"))
    results: dict[tuple[str, str], list[tuple[float, float, float]]] = {k: [] for k in plan}
    for rep in range(repeats):
        for tool, name in plan:
            out = outs / f"{tool}_{name}"
            shutil.rmtree(out, ignore_errors=True)
            warm_page_cache(inputs)  # again: idle pages may have been reclaimed meanwhile
            load = os.getloadavg()[0]
            cmd = commands(tool, configs[name], out, args.mergekit, models)
            seconds, rss, anon = measure(cmd, env)
            results[(tool, name)].append((seconds, rss, anon))
            print(f"  run {rep + 1}/{repeats}  {tool:<10} {name:<16} {seconds:7.2f} s "
                  f"{rss:6.0f} MB RSS {anon:6.0f} MB anon  (load before {load:.2f})",
                  flush=True)  # fmt: skip

    diffs = {name: compare(outs / f"jaxcombine_{name}", outs / f"mergekit_{name}")
             for name in names}  # fmt: skip
    if not args.keep_outputs:
        shutil.rmtree(outs, ignore_errors=True)
    return report(results, diffs, params, args.quick)


def report(results, diffs, params, quick) -> dict:
    med = {key: [statistics.median(run[i] for run in runs) for i in range(3)]
           for key, runs in results.items()}  # fmt: skip
    print()
    print(f"{'tool':<12}{'config':<17}{'median s':>9}{'peak RSS MB':>13}{'peak anon MB':>14}"
          "  runs (s)")  # fmt: skip
    print("-" * 88)
    for (tool, name), (seconds, rss, anon) in med.items():
        runs = ", ".join(f"{run[0]:.2f}" for run in results[(tool, name)])
        print(f"{tool:<12}{name:<17}{seconds:>9.2f}{rss:>13.0f}{anon:>14.0f}  {runs}")
    print()
    names = list(diffs)
    ratio = {
        "speedup": lambda n: med[("mergekit", n)][0] / med[("jaxcombine", n)][0],
        "rss_ratio": lambda n: med[("jaxcombine", n)][1] / med[("mergekit", n)][1],
        "anon_ratio": lambda n: med[("jaxcombine", n)][2] / med[("mergekit", n)][2],
    }
    line = {"bench": "merge_cli", "quick": quick, "params": params}
    line.update({key: {n: round(f(n), 2) for n in names} for key, f in ratio.items()})
    for n in names:
        worst, above, total = diffs[n]
        print(f"{n:<16} speedup {line['speedup'][n]:5.2f}x (mergekit s / jaxcombine s); "
              f"jaxcombine / mergekit peak RSS {line['rss_ratio'][n]:.2f}, "
              f"peak anon {line['anon_ratio'][n]:.2f}; max abs diff {worst:.1e} "
              f"({above} of {total:,} entries > 1e-5)")  # fmt: skip
    line["max_abs_diff"] = {n: float(f"{v[0]:.2g}") for n, v in diffs.items()}
    line["entries_over_1e-5"] = {n: v[1] for n, v in diffs.items()}
    if ("io_floor", "linear") in med:
        floor = med[("jaxcombine", "linear")][0] / med[("io_floor", "linear")][0]
        print(f"linear: jaxcombine time / I/O floor time = {floor:.2f}")
        line["linear_over_io_floor"] = round(floor, 2)
    print(json.dumps(line))
    return line


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--io-floor-run"]:  # internal: the I/O floor process
        io_floor_run(argv[1], argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mergekit", default=str(Path(sys.executable).with_name("mergekit-yaml")),
                        help="mergekit-yaml executable (default: next to this Python)")  # fmt: skip
    parser.add_argument("--workdir", default="/tmp/jaxcombine_bench_merge",
                        help="models, configs and outputs (models are reused)")  # fmt: skip
    parser.add_argument("--configs", default="linear,ties,task_arithmetic")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (--quick: 1)")
    parser.add_argument("--quick", action="store_true", help="~20M-parameter model, 1 repeat")
    parser.add_argument("--keep-outputs", action="store_true", help="keep WORKDIR/out")
    args = parser.parse_args(argv)
    if not Path(args.mergekit).exists():
        parser.error(f"mergekit-yaml not found at {args.mergekit}: pass --mergekit PATH")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
