"""Writing the MoE: routers computed, then every tensor streamed to an atomic directory."""

from __future__ import annotations

import json
import shutil
import time
import zlib
from pathlib import Path

import numpy as np
import yaml

from jaxcombine._fs import atomic_directory
from jaxcombine.errors import TensorError
from jaxcombine.hf._safetensors import SIDECAR_FILES, ShardWriter, parse_size
from jaxcombine.moe.mergekit._config import Expert
from jaxcombine.moe.mergekit._plan import MoEPlan
from jaxcombine.moe.mergekit._routers import router_rows


def _expert_tensor(x: np.ndarray, expert: Expert, name: str, w: str, seed: int) -> np.ndarray:
    """mergekit's noise_and_scale: ``x + noise_scale * N(0, 1)``, then down_proj (w2) times
    residual_scale, each rounded to the input dtype as torch does."""
    if expert.noise_scale is not None:
        import jax

        key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
        noise = np.asarray(jax.random.normal(key, x.shape, np.float32))
        x = (x.astype(np.float32) + noise * np.float32(expert.noise_scale)).astype(x.dtype)
    if w == "w2" and expert.residual_scale is not None:
        x = (x.astype(np.float32) * np.float32(expert.residual_scale)).astype(x.dtype)
    return x


def _write_sidecars(plan: MoEPlan, out: Path) -> None:
    (out / "config.json").write_text(json.dumps(plan.out_config, indent=2) + "\n")
    for name in SIDECAR_FILES:
        if (plan.config.base_path / name).is_file():
            shutil.copy(plan.config.base_path / name, out / name)
    text = plan.config.text or yaml.safe_dump({"gate_mode": plan.config.gate_mode})
    (out / "mergekit_moe_config.yml").write_text(text)


def run_moe(
    plan: MoEPlan,
    out_dir,
    *,
    seed: int = 0,
    out_shard_size: str | int = "5B",
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Compute the routers, then write ``plan`` into ``out_dir`` one tensor at a time.

    Returns a summary; closes the plan's files. ``seed`` keys random routers and
    expert noise. Expert m of layer l is ``w1 = gate_proj``, ``w2 = down_proj *
    residual_scale``, ``w3 = up_proj`` of its model (plus ``noise_scale`` N(0, 1)
    noise), the routers are :func:`router_rows`.

    Two tiny random Llamas as experts of a third (the base); expert 1 halves its
    residual branch:

    >>> import json, tempfile
    >>> from pathlib import Path
    >>> from jaxcombine.hf import config_from_hf, decoder_tensor_maps, write_shards
    >>> from jaxcombine.moe.mergekit import parse_moe_config, plan_moe
    >>> tmp = tempfile.TemporaryDirectory(); root = Path(tmp.name)
    >>> hf = {"model_type": "llama", "vocab_size": 8, "hidden_size": 4,
    ...       "intermediate_size": 6, "num_hidden_layers": 1, "num_attention_heads": 2}
    >>> shapes = {m.hf_name: m.hf_shape for m in decoder_tensor_maps(config_from_hf(hf))}
    >>> for seed, name in enumerate(["base", "code", "math"]):   # tiny random Llamas
    ...     (root / name).mkdir(); _ = (root / name / "config.json").write_text(json.dumps(hf))
    ...     rng = np.random.default_rng(seed)
    ...     tensors = ((n, rng.normal(size=s).astype(np.float32)) for n, s in shapes.items())
    ...     _ = write_shards(tensors, root / name, max_shard_bytes=10**9)
    >>> config = parse_moe_config({"base_model": "base", "gate_mode": "random", "experts": [
    ...     {"source_model": "code"}, {"source_model": "math", "residual_scale": 0.5}]},
    ...     config_dir=root)
    >>> plan = plan_moe(config)
    >>> routers = router_rows(plan, seed=0)                                # [L, X, E]
    >>> print(run_moe(plan, root / "moe", seed=0, progress=False)["message"])
    wrote a Mixtral model with 2 experts (2 per token, random routers; 0.000 GB, 1 shard(s)) ...
    >>> from jaxcombine.hf import SafetensorsCheckpoint
    >>> with SafetensorsCheckpoint(root / "moe") as out, SafetensorsCheckpoint(root / "math") as m:
    ...     moe = "model.layers.0.block_sparse_moe."
    ...     print(np.array_equal(out.read(moe + "experts.1.w2.weight"),
    ...                          0.5 * m.read("model.layers.0.mlp.down_proj.weight")),
    ...           np.array_equal(out.read(moe + "gate.weight"), routers[0]))
    True True
    >>> json.loads((root / "moe" / "config.json").read_text())["num_local_experts"]
    2
    >>> tmp.cleanup()

    References: mergekit-moe, part of MergeKit (Goddard et al. 2024, Arcee's MergeKit: A Toolkit for
    Merging Large Language Models, arXiv:2403.13257); the output is a Mixtral: Jiang et al. 2024,
    Mixtral of Experts, arXiv:2401.04088.
    """
    from tqdm.auto import tqdm

    start = time.perf_counter()
    max_bytes = parse_size(out_shard_size)
    config = plan.config
    try:
        routers = router_rows(plan, seed=seed)
        with atomic_directory(out_dir, overwrite=overwrite) as tmp:
            entries = [(t.name, t.shape, plan.dtype) for t in plan.tensors]
            with ShardWriter(tmp, entries, max_shard_bytes=max_bytes) as writer:
                for t in tqdm(plan.tensors, desc="moe", disable=not progress, dynamic_ncols=True):
                    if t.router_layer is not None:
                        x = routers[t.router_layer]
                    else:
                        x = plan.checkpoints[t.model].read(t.tensor)
                        if t.expert is not None:
                            w = t.name.rsplit(".", 2)[1]
                            x = _expert_tensor(x, config.experts[t.expert], t.name, w, seed)
                    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
                        raise TensorError(
                            "tensor holds NaN or Inf",
                            where=f"{t.model}: {t.tensor}" if t.model else t.name,
                            fix="use finite checkpoints (and prompts that give finite states)",
                        )
                    writer.write(t.name, np.ascontiguousarray(x.astype(plan.dtype)))
                files = writer.finish()
            _write_sidecars(plan, tmp)
    finally:
        plan.close()
    seconds = time.perf_counter() - start
    X = len(config.experts)
    return {
        "out": str(out_dir),
        "gate_mode": config.gate_mode,
        "experts": X,
        "experts_per_token": config.experts_per_token,
        "tensors": len(plan.tensors),
        "bytes": plan.total_bytes,
        "shards": len(files),
        "seconds": round(seconds, 3),
        "message": f"wrote a Mixtral model with {X} experts ({config.experts_per_token} per "
        f"token, {config.gate_mode} routers; {plan.total_bytes / 1e9:.3f} GB, "
        f"{len(files)} shard(s)) to {out_dir} in {seconds:.1f} s",
    }
