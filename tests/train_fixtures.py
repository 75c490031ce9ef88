"""Data and configs for tests of the training jobs in ``train/``.

``make_corpus(dir)`` writes a small text corpus (the sources of the standard
library's ``json`` package, about 48 kB) and a byte-level BPE ``tokenizer.json``
of 258 tokens (256 + ``<unk>`` + ``<eos>``) trained on it; ``write_config(path,
**sections)`` writes a job's YAML config. ``lm_sections`` / ``moe_sections``
give the sections of a tiny LM / MoE job (hidden 32, 2 layers) over that corpus.

Example::

    corpus, tokenizer = make_corpus(tmp_path / "data")
    config = write_config(tmp_path / "lm.yml", **lm_sections(corpus, tokenizer, steps=12))
    subprocess.run([sys.executable, "-m", "train.lm", "--config", str(config),
                    "--workdir", str(tmp_path / "run")], cwd=REPO_ROOT, env=job_env(2))
"""

from __future__ import annotations

import copy
import os
import sysconfig
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]

TINY_MODEL: dict[str, Any] = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_layers": 2,
    "num_heads": 4,
    "num_kv_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
}
TINY_MOE: dict[str, Any] = {
    "num_experts": 4,
    "intermediate_size": 32,
    "num_experts_per_token": 2,
    "capacity_factor": 1.5,
}


def make_corpus(directory: str | os.PathLike) -> tuple[Path, Path]:
    """``(corpus.txt, tokenizer.json)`` written into ``directory`` (created if needed).

    The corpus is the concatenated sources of the stdlib ``json`` package; the
    tokenizer a byte-level BPE with ``<unk>`` and ``<eos>`` and 258 tokens.
    Returns the existing files if ``directory`` already holds both.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    out = Path(directory)
    corpus, tokenizer_file = out / "corpus.txt", out / "tokenizer.json"
    if corpus.is_file() and tokenizer_file.is_file():
        return corpus, tokenizer_file
    out.mkdir(parents=True, exist_ok=True)
    source = Path(sysconfig.get_paths()["stdlib"]) / "json"
    text = "\n".join(p.read_text() for p in sorted(source.glob("*.py")))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256,
        special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text.splitlines(), trainer)
    # temporary names, renamed when complete: a concurrent reader never sees half a file
    tmp_corpus = corpus.with_name(f".{corpus.name}.tmp{os.getpid()}")
    tmp_corpus.write_text(text)
    tmp_tokenizer = tokenizer_file.with_name(f".{tokenizer_file.name}.tmp{os.getpid()}")
    tokenizer.save(str(tmp_tokenizer))
    tmp_corpus.replace(corpus)
    tmp_tokenizer.replace(tokenizer_file)
    return corpus, tokenizer_file


def write_config(path: str | os.PathLike, **sections: Any) -> Path:
    """Write ``sections`` (``seed=0, model={...}, train={...}, log_every=1``, ...) as
    a job's YAML config at ``path``; returns the path. Paths become strings."""

    def plain(value):
        if isinstance(value, os.PathLike):
            return str(value)
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(plain(sections), sort_keys=False))
    return path


def lm_sections(
    corpus: str | os.PathLike,
    tokenizer: str | os.PathLike,
    *,
    steps: int = 12,
    global_batch: int = 8,
    seq_len: int = 16,
    **top: Any,
) -> dict[str, Any]:
    """The sections of a tiny LM job on ``corpus``; ``top`` overrides top-level
    keys (``mesh={...}``, ``checkpoint_every=3``, ...). Logs every step, no bar."""
    sections: dict[str, Any] = {
        "seed": 0,
        "model": copy.deepcopy(TINY_MODEL),
        "data": {
            "files": [str(corpus)],
            "tokenizer": str(tokenizer),
            "seq_len": seq_len,
            "eos_token": "<eos>",
        },
        "train": {
            "steps": steps,
            "global_batch": global_batch,
            "learning_rate": 0.01,
            "warmup_steps": 3,
        },
        "log_every": 1,
        "checkpoint_every": steps,
        "progress": False,
    }
    sections.update(top)
    return sections


def moe_sections(
    corpus: str | os.PathLike, tokenizer: str | os.PathLike, **kwargs: Any
) -> dict[str, Any]:
    """:func:`lm_sections` with MoE layers (4 experts, top-2, capacity factor 1.5)
    and ``model_type: mixtral`` (so the HF export is a Mixtral directory)."""
    sections = lm_sections(corpus, tokenizer, **kwargs)
    sections["model"] = {
        **sections["model"],
        "model_type": "mixtral",
        "moe": copy.deepcopy(TINY_MOE),
    }
    return sections


def job_env(devices: int, **extra: str) -> dict[str, str]:
    """The environment of a job subprocess: this one's, with ``devices`` fake CPU
    devices, ``JAX_PLATFORMS=cpu``, the repo root on ``PYTHONPATH`` and no
    multi-process coordinator variables."""
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in [str(REPO_ROOT), os.environ.get("PYTHONPATH", "")] if p
    )
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)
    env.update(extra)
    return env
