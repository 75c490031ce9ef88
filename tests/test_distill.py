"""Distillation: the losses against numpy, and train.distill end to end.

The quality test trains 4 members with train.lm (seeds 0-3) on a small real
corpus (the `json` package of the standard library, 90% of its lines) long
enough to overfit, then distils their linear ensemble into a student of the
same size with the same steps, and a same-seed student on hard labels only.
NLL is measured on the held-out 10% of lines.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
import yaml
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxcombine.data import PackedDataset
from jaxcombine.distill import distillation_loss, soft_cross_entropy, tempered_kl
from jaxcombine.ensemble import Combination, StackedForward, stack_members
from jaxcombine.errors import ConfigError
from jaxcombine.hf import load_model
from train import distill, lm


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_losses_match_numpy():
    rng = np.random.default_rng(0)
    s = rng.normal(size=(3, 5, 11)) * 2
    t = _log_softmax(rng.normal(size=(3, 5, 11)) * 3)
    y = rng.integers(0, 11, size=(3, 5))
    for T in (1.0, 2.0, 4.0):
        pt, ls = np.exp(_log_softmax(t / T)), _log_softmax(s / T)
        kl = np.mean(np.sum(pt * (np.log(pt) - ls), -1))
        ce = np.mean(-np.take_along_axis(_log_softmax(s), y[..., None], -1))
        got = tempered_kl(jnp.asarray(s), jnp.asarray(t), T)
        np.testing.assert_allclose(got, kl, rtol=1e-5)
        for h in (0.0, 0.3, 1.0):
            loss, parts = distillation_loss(
                jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temperature=T, hard_weight=h
            )
            np.testing.assert_allclose(loss, h * ce + (1 - h) * T * T * kl, rtol=1e-5)
            np.testing.assert_allclose(parts["hard_loss"], ce, rtol=1e-5)
    soft = soft_cross_entropy(jnp.asarray(s), jnp.asarray(t))
    ref = np.mean(-np.sum(np.exp(t) * _log_softmax(s), -1))
    np.testing.assert_allclose(soft, ref, rtol=1e-5)
    # the gradient of the soft term at T = 1 is p_student - p_teacher
    grad = jax.grad(lambda x: tempered_kl(x, jnp.asarray(t)) * s[..., 0].size)(jnp.asarray(s))
    np.testing.assert_allclose(grad, np.exp(_log_softmax(s)) - np.exp(t), atol=1e-5)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    source = Path(sysconfig.get_paths()["stdlib"]) / "json"
    lines = "\n".join(p.read_text() for p in sorted(source.glob("*.py"))).splitlines()
    cut = int(len(lines) * 0.9)
    (root / "train.txt").write_text("\n".join(lines[:cut]))
    (root / "eval.txt").write_text("\n".join(lines[cut:]))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tokenizer.train_from_iterator(lines[:cut], trainer)
    tokenizer.save(str(root / "tokenizer.json"))
    config = {
        "seed": 0,
        "model": {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_layers": 2,
            "num_heads": 4,
            "num_kv_heads": 2,
            "head_dim": 32,
            "max_position_embeddings": 64,
        },  # fmt: skip
        "data": {
            "files": [str(root / "train.txt")],
            "tokenizer": str(root / "tokenizer.json"),
            "seq_len": 32,
            "eos_token": "<eos>",
        },  # fmt: skip
        "train": {"steps": 600, "global_batch": 16, "learning_rate": 3e-3, "warmup_steps": 10},
        "mesh": {"data": 1, "num_devices": 1},
        "log_every": 100,
        "checkpoint_every": 10000,
        "progress": False,
    }
    (root / "lm.yml").write_text(yaml.safe_dump(config))
    for seed in range(4):
        lm.main(["--config", str(root / "lm.yml"), "--workdir", str(root / f"m{seed}"),
                 f"seed={seed}"])  # fmt: skip
    teachers = [str(root / f"m{seed}" / "model") for seed in range(4)]
    (root / "distill.yml").write_text(
        yaml.safe_dump({**config, "teachers": teachers, "combine": "linear", "temperature": 4.0})
    )
    return root


def _held_out_nll(root: Path, model_dirs) -> float:
    """Mean NLL per token of the held-out rows under the linear ensemble of
    ``model_dirs`` (one directory: the model itself)."""
    tokenizer = Tokenizer.from_file(str(root / "tokenizer.json"))
    rows = PackedDataset.from_files(
        str(root / "eval.txt"), tokenizer, 32, eos_id=tokenizer.token_to_id("<eos>")
    ).rows
    graphdef, params = stack_members([load_model(d) for d in model_dirs])
    forward = StackedForward(graphdef, Combination("linear"))
    inputs = jnp.asarray(rows[:, :-1])
    log_probs, _ = forward(params, inputs, jnp.ones(inputs.shape, bool), None)
    picked = jnp.take_along_axis(log_probs, jnp.asarray(rows[:, 1:, None]), -1)
    return float(-jnp.mean(picked))


def test_student_closes_most_of_the_ensemble_gap(corpus):
    root = corpus
    members = [root / f"m{seed}" / "model" for seed in range(4)]
    ensemble = _held_out_nll(root, members)
    single = float(np.mean([_held_out_nll(root, [m]) for m in members]))
    args = ["--config", str(root / "distill.yml")]
    distill.main([*args, "--workdir", str(root / "soft"), "seed=7"])
    distill.main([*args, "--workdir", str(root / "hard"), "seed=7", "hard_weight=1.0"])
    student = _held_out_nll(root, [root / "soft" / "model"])
    hard = _held_out_nll(root, [root / "hard" / "model"])
    closed = (single - student) / (single - ensemble)
    print(json.dumps({"ensemble": ensemble, "member_mean": single, "student": student,
                      "hard_label_student": hard, "gap_closed": closed}))  # fmt: skip
    assert ensemble < single - 0.5  # overfit members: a real gap to close
    assert closed >= 0.6
    assert student < hard
    # the teachers are arguments of the step, never in the checkpoint
    record = json.loads((root / "soft" / "job.json").read_text())
    assert record["kind"] == "distill" and "teachers" in record
    manager = ocp.CheckpointManager(
        root / "soft" / "checkpoints", item_handlers=ocp.StandardCheckpointHandler()
    )
    saved = manager.item_metadata(manager.latest_step())
    assert set(saved) == {"step", "params", "opt_state"}
    student_leaves = len(jax.tree.leaves(saved["params"]))
    assert student_leaves == 1 + 2 * 9 + 2  # embedding, 2 layers x 9 tensors, norm, head


def test_bad_teachers_are_clear_errors(corpus, tmp_path):
    root = corpus
    args = ["--config", str(root / "distill.yml"), "--workdir", str(tmp_path / "w")]
    with pytest.raises(ConfigError, match="teachers"):
        distill.main([*args, "teachers=[]"])
    # a student with another vocabulary size than the teachers'
    with pytest.raises(ConfigError, match="vocabulary"):
        distill.main([*args, "model.vocab_size=600"])
    assert not (tmp_path / "w" / "checkpoints").exists()
