"""Distil an ensemble of language models into one student.

    python -m train.distill --config configs/train/distill_tiny.yml --workdir runs/student

The teachers (``teachers``: HF model directories of one architecture, e.g.
``train.lm`` members) are stacked and vmapped, their distributions combined
by ``combine`` (``linear``, ``loglinear`` or ``logits``, with ``weights``),
and run inside the jitted training step under ``stop_gradient``: they are an
argument of the step, never trained and never checkpointed.

``mode: token`` (Hinton et al. 2015, arXiv:1503.02531) trains on the data
with

    L = h * CE(y, s) + (1 - h) * T^2 * KL(softmax(t / T) || softmax(s / T))

(``hard_weight`` h, ``temperature`` T; h = 1 is hard-label training alone,
the baseline). ``mode: sequence`` (Kim & Rush 2016, arXiv:1606.07947) first
lets the ensemble continue ``sequence.prompt_len``-token prefixes of the
data rows with the jitted decoder (greedy, or sampled at
``sequence.temperature``), then trains on those sequences with the same loss
(by default the hard term only: h = 1).

Teacher and student must share the tokenizer's vocabulary.

MLP classifiers (``train.classifier`` outputs as ``teachers``) are distilled
the same way in token mode: the data is a table (``data.files``,
``data.features``, ``data.label``), the student's ``model`` section holds
``hidden_sizes`` (and ``dropout_rate``), and the loss is the same mix of
hard labels and the tempered KL to the combined classifiers.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tokenizers import Tokenizer

from jaxcombine import tree
from jaxcombine.data import PackedDataset
from jaxcombine.decoding import Decodable, Sampling, generate
from jaxcombine.distill import distillation_loss, ensemble_log_probs, teacher_log_probs
from jaxcombine.ensemble import Combination, StackedForward, stack_members
from jaxcombine.errors import ConfigError
from jaxcombine.hf import classifier_config, is_classifier_dir, load_classifier, load_model
from jaxcombine.training import token_cross_entropy
from train import classifier, common

DEFAULTS = {
    **common.BASE_DEFAULTS,  # for classifier teachers, configs/train/classifier_tiny.yml
    "teachers": [],
    "combine": "linear",
    "weights": None,
    "temperature": 1.0,
    "hard_weight": None,  # default: 0 (token mode), 1 (sequence mode)
    "mode": "token",
    "sequence": {"prompt_len": 8, "temperature": 0.0, "num_rows": None, "batch": 64},
}


def load_teachers(config, vocab_size: int):
    """(stacked forward, stacked parameters) of the ``teachers``; a clear error
    for none, a missing directory, different architectures or a vocabulary
    that differs from the student's tokenizer."""
    paths = teacher_paths(config)
    models = [load_model(path, dtype=jnp.float32) for path in paths]
    for path, model in zip(paths, models, strict=True):
        if model.config.vocab_size != vocab_size:
            raise ConfigError(
                f"teacher vocabulary {model.config.vocab_size} differs from the student's "
                f"tokenizer ({vocab_size} tokens)",
                where=f"teachers: {path}",
                fix="distil teachers that use the student's tokenizer",
            )
    graphdef, params = stack_members(models)
    return StackedForward(graphdef, combination(config, len(models))), params, models[0].config


def teacher_paths(config) -> list:
    """The ``teachers`` directories (a clear error when there are none)."""
    if not config["teachers"]:
        raise ConfigError("no teachers given", where="teachers",
                          fix="list the model directories of the ensemble members")  # fmt: skip
    return list(config["teachers"])


def combination(config, num_members: int) -> Combination:
    """The ensemble's rule (``combine``, ``weights``), checked against the members."""
    weights = None if config["weights"] is None else tuple(config["weights"])
    rule = Combination(config["combine"], weights)
    rule.check_members(num_members)
    return rule


def load_classifier_teachers(config):
    """(graph definition, stacked parameters, rule, config.json fields) of MLP-classifier
    teachers; members must have the same sizes."""
    paths = teacher_paths(config)
    models = [load_classifier(path) for path in paths]
    sizes = [classifier_config(m) for m in models]
    for path, size in zip(paths, sizes, strict=True):
        if {**size, "dropout_rate": 0} != {**sizes[0], "dropout_rate": 0}:
            raise ConfigError(
                f"teacher {size} differs from the first teacher's {sizes[0]}",
                where=f"teachers: {path}",
                fix="stack classifiers of one shape (train them with one model section)",
            )
    graphdef, _ = nnx.split(models[0], nnx.Param)
    params = tree.stack([nnx.state(m, nnx.Param) for m in models])
    return graphdef, params, combination(config, len(models)), sizes[0]


def check_student(student_config, teacher_config) -> None:
    if student_config.vocab_size != teacher_config.vocab_size:
        raise ConfigError(
            f"student vocabulary {student_config.vocab_size} differs from the teachers' "
            f"{teacher_config.vocab_size}",
            where="model.vocab_size",
            fix="give the student the teachers' vocabulary size",
        )


def distill_loss(student_graphdef, teacher, temperature: float, hard_weight: float):
    """``loss(params, rows [B, L+1], key, teacher_params)``: see the module docstring."""

    def loss(params, rows, key, teacher_params):
        del key
        inputs, targets = rows[:, :-1], rows[:, 1:]
        student = nnx.merge(student_graphdef, params)(inputs).logits
        if hard_weight == 1.0:  # hard labels alone (sequence mode's default): no teacher pass
            hard = token_cross_entropy(student, targets)
            return hard, {"hard_loss": hard}
        teacher_lp = teacher_log_probs(teacher, teacher_params, inputs)
        return distillation_loss(
            student, teacher_lp, targets, temperature=temperature, hard_weight=hard_weight
        )

    return loss


def ensemble_sequences(teacher, params, teacher_config, dataset: PackedDataset, config):
    """The ensemble's continuations of the data rows' first ``prompt_len`` tokens,
    as rows of the data's length (sequence-level distillation)."""
    seq = config["sequence"]
    prompt_len, length = seq["prompt_len"], dataset.seq_len + 1
    if not 0 < prompt_len < length:
        raise ConfigError(f"prompt_len must be in 1..{length - 1}, got {prompt_len}",
                          where="sequence.prompt_len")  # fmt: skip
    count = seq["num_rows"] or dataset.num_rows
    order = np.random.default_rng([config["seed"], 1]).permutation(dataset.num_rows)
    prompts = dataset.rows[order[np.arange(count) % dataset.num_rows], :prompt_len]  # cycled
    decodable = Decodable(teacher, params, teacher_config, jnp.float32)
    sampling = Sampling() if seq["temperature"] == 0 else Sampling(temperature=seq["temperature"])
    rows = []
    for start in range(0, count, seq["batch"]):
        chunk = prompts[start : start + seq["batch"]]
        out = generate(
            decodable, chunk.tolist(), max_new_tokens=length - prompt_len, sampling=sampling,
            eos_token_ids=(), seed=config["seed"] + start,
        )  # fmt: skip
        rows.append(np.concatenate([chunk, np.asarray(out, np.int32)], axis=1))
    return dataclasses.replace(dataset, rows=np.concatenate(rows))


def classifier_distill_loss(student_graphdef, teacher_graphdef, rule, temperature, hard_weight):
    """``loss(params, {"x", "y"}, key, teacher_params)``: the distillation loss of an
    MLP-classifier student against the classifier ensemble (dropout from ``key``)."""

    def loss(params, batch, key, teacher_params):
        teacher_lp = ensemble_log_probs(teacher_graphdef, teacher_params, batch["x"], rule)
        student = nnx.merge(student_graphdef, params)(batch["x"], dropout_key=key)
        return distillation_loss(
            student, teacher_lp, batch["y"], temperature=temperature, hard_weight=hard_weight
        )

    return loss


def hard_weight(config) -> float:
    """``hard_weight`` (default 0 in token mode, 1 in sequence mode), checked with the
    temperature."""
    weight = config["hard_weight"]
    if weight is None:
        weight = 1.0 if config["mode"] == "sequence" else 0.0
    if not 0.0 <= weight <= 1.0 or config["temperature"] <= 0:
        raise ConfigError(
            f"need 0 <= hard_weight <= 1 and temperature > 0, got {weight}, "
            f"{config['temperature']}",
            where="hard_weight",
        )
    return weight


def distill_decoders(config, workdir) -> None:
    mesh = common.start(config)
    tokenizer_file = common.tokenizer_path(config)
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    dataset = common.load_data(config, tokenizer)
    teacher, teacher_params, teacher_config = load_teachers(config, tokenizer.get_vocab_size())
    student = common.make_model(config, tokenizer.get_vocab_size())
    check_student(student.config, teacher_config)
    weight = hard_weight(config)
    if config["mode"] == "sequence":
        dataset = ensemble_sequences(teacher, teacher_params, teacher_config, dataset, config)
    graphdef, params = common.split_params(student)
    loss = distill_loss(graphdef, teacher, config["temperature"], weight)
    params = common.run(
        "distill", config, workdir, loss, params, dataset, mesh, constants=teacher_params
    )
    common.export(config, workdir, graphdef, params, tokenizer_file)


def distill_classifiers(config, workdir) -> None:
    if config["mode"] != "token":
        raise ConfigError("classifiers are distilled in token mode only", where="mode",
                          fix="use mode: token")  # fmt: skip
    mesh = common.start(config)
    dataset = classifier.load_table(config)
    teacher_graphdef, teacher_params, rule, sizes = load_classifier_teachers(config)
    if sizes["in_features"] != dataset.num_features:
        raise ConfigError(
            f"the teachers take {sizes['in_features']} features, the data has "
            f"{dataset.num_features}",
            where="data.features",
            fix="give the features the teachers were trained on",
        )
    student = classifier.make_classifier(config, dataset, sizes["num_classes"])
    graphdef, params = common.split_params(student)
    loss = classifier_distill_loss(
        graphdef, teacher_graphdef, rule, config["temperature"], hard_weight(config)
    )
    params = common.run(
        "distill", config, workdir, loss, params, dataset, mesh, constants=teacher_params
    )
    classifier.export(config, workdir, graphdef, params)


def main(argv=None) -> None:
    args = common.parse_args(argv, "distill")
    config = common.load_config(args.config, args.overrides, DEFAULTS)
    if config["mode"] not in ("token", "sequence"):
        raise ConfigError(f"unknown mode {config['mode']!r}", where="mode",
                          fix="use token or sequence")  # fmt: skip
    paths = teacher_paths(config)
    if is_classifier_dir(paths[0]):
        distill_classifiers(config, args.workdir)
    else:
        distill_decoders(config, args.workdir)


if __name__ == "__main__":
    common.entry(main)
