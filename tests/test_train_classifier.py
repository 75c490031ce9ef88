"""MLP classifiers: tables, the classifier file format, train.classifier and
distillation of a classifier ensemble (train.distill with classifier teachers).

Data: three interleaved noisy spirals (10% of labels flipped), 200 training
points, 4000 held-out ones, generated here. Members trained 2000 steps
overfit it, so their linear ensemble has a real NLL gap to close. Oracles: a
numpy forward of the MLP, numpy combination rules and a numpy distillation
loss; numpy's own permutations for the batch order.
"""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxcombine.data import TableDataset
from jaxcombine.distill import ensemble_log_probs
from jaxcombine.ensemble import Combination
from jaxcombine.errors import CheckpointError, ConfigError, InputError, TensorError
from jaxcombine.hf import is_classifier_dir, load_classifier, save_classifier
from jaxcombine.models import MLPClassifier
from jaxcombine.training import read_metrics
from tests.train_fixtures import write_config
from train import classifier, distill

HIDDEN = [256, 256]


def spirals(n: int, seed: int, *, classes: int = 3, noise: float = 0.25, flip: float = 0.1):
    """``n`` points of ``classes`` interleaved spiral arms, Gaussian noise, a share
    ``flip`` of labels redrawn uniformly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    t = rng.uniform(0.25, 1.0, n)
    angle = 2 * np.pi * (y / classes + 1.25 * t)
    x = 3 * t[:, None] * np.stack([np.cos(angle), np.sin(angle)], 1)
    x = x + noise * rng.normal(size=(n, 2))
    y = np.where(rng.random(n) < flip, rng.integers(0, classes, n), y)
    return x.astype(np.float32), y.astype(np.int64)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def numpy_logits(model: MLPClassifier, x: np.ndarray) -> np.ndarray:
    """The MLP written out in float64 numpy: relu hidden layers, linear head."""
    h = x.astype(np.float64)
    for layer in model.layers:
        h = np.maximum(h @ np.asarray(layer.kernel.get_value(), np.float64)
                       + np.asarray(layer.bias.get_value(), np.float64), 0)  # fmt: skip
    head = model.head
    return h @ np.asarray(head.kernel.get_value(), np.float64) + np.asarray(
        head.bias.get_value(), np.float64
    )


def numpy_rule(log_probs: np.ndarray, rule: str, weights) -> np.ndarray:
    """Combined log-probabilities of member log-probs [N, B, C] (float64)."""
    w = np.asarray(weights, np.float64)[:, None, None]
    if rule == "linear":
        w = w / w.sum()
        return np.logaddexp.reduce(np.log(w) + log_probs, axis=0)
    return _log_softmax(np.sum(w * log_probs, axis=0))


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    root = tmp_path_factory.mktemp("classifier")
    x, y = spirals(200, 0)
    columns = {"x0": x[:, 0], "x1": x[:, 1], "label": y}
    datasets.Dataset.from_dict(columns).to_csv(str(root / "train.csv"))
    datasets.Dataset.from_dict({"x": x.tolist(), "label": y}).to_json(str(root / "train.jsonl"))
    test = spirals(4000, 1)
    config = write_config(
        root / "clf.yml",
        seed=0,
        model={"hidden_sizes": HIDDEN},
        data={"files": [root / "train.csv"], "features": ["x0", "x1"], "label": "label"},
        train={
            "steps": 2000,
            "global_batch": 64,
            "learning_rate": 3.0e-3,
            "warmup_steps": 20,
            "weight_decay": 0.0,
        },  # fmt: skip
        log_every=100,
        checkpoint_every=2000,
        progress=False,
    )
    return {"root": root, "x": x, "y": y, "test": test, "config": config}


@pytest.fixture(scope="module")
def members(table):
    root = table["root"]
    for seed in range(4):
        args = ["--config", str(table["config"]), "--workdir", str(root / f"m{seed}")]
        classifier.main([*args, f"seed={seed}"])
    return [root / f"m{seed}" / "model" for seed in range(4)]


def test_table_reads_columns_or_a_list_column_and_batches_in_seeded_order(table, tmp_path):
    root, x, y = table["root"], table["x"], table["y"]
    by_columns = TableDataset.from_files(root / "train.csv", features=["x0", "x1"])
    by_list = TableDataset.from_files(root / "train.jsonl", features="x")
    for data in (by_columns, by_list):
        np.testing.assert_allclose(data.features, x, rtol=1e-6)
        np.testing.assert_array_equal(data.labels, y)
    # step s takes positions [64 s, 64 s + 64) of the per-epoch permutations
    order = np.concatenate([np.random.default_rng([5, e]).permutation(200) for e in range(3)])
    for step in (0, 3, 6):
        batch = by_columns.batch(step, 64, 5)
        expected = order[64 * step : 64 * step + 64]
        np.testing.assert_array_equal(batch["x"], by_columns.features[expected])
        np.testing.assert_array_equal(batch["y"], y[expected])
        halves = [by_columns.batch(step, 64, 5, process_index=p, process_count=2) for p in (0, 1)]
        np.testing.assert_array_equal(np.concatenate([h["y"] for h in halves]), batch["y"])
    # errors name the column
    with pytest.raises(InputError, match="'z'"):
        TableDataset.from_files(root / "train.csv", features=["x0", "z"])
    with pytest.raises(InputError, match="'cls'"):
        TableDataset.from_files(root / "train.csv", features=["x0"], label="cls")
    bad = tmp_path / "bad.csv"
    datasets.Dataset.from_dict({"x0": ["a", "b"], "label": [0, 1]}).to_csv(str(bad))
    with pytest.raises(InputError, match="numeric"):
        TableDataset.from_files(bad, features=["x0"])
    datasets.Dataset.from_dict({"x0": [1.0, 2.0], "label": [0.5, 1.0]}).to_csv(str(bad))
    with pytest.raises(InputError, match="integer"):
        TableDataset.from_files(bad, features=["x0"])
    with pytest.raises(InputError, match="non-negative"):
        TableDataset(np.zeros((2, 1)), np.array([0, -1]))


def test_classifier_files_round_trip_bitwise_and_bad_files_are_named(tmp_path):
    model = MLPClassifier(5, (7, 3), 4, dropout_rate=0.2, rngs=nnx.Rngs(3))
    out = save_classifier(model, tmp_path / "clf")
    assert is_classifier_dir(out)
    loaded = load_classifier(out)
    assert loaded.dropout_rate == 0.2
    flat = [nnx.to_flat_state(nnx.state(m)) for m in (model, loaded)]
    for (path, a), (path_b, b) in zip(*flat, strict=True):
        assert path == path_b
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
    tensors = load_file(str(out / "model.safetensors"))
    assert set(tensors) == {"layers.0.kernel", "layers.0.bias", "layers.1.kernel",
                            "layers.1.bias", "head.kernel", "head.bias"}  # fmt: skip
    # a missing tensor, a wrong shape, a decoder directory
    broken = dict(tensors)
    del broken["layers.1.bias"]
    save_file(broken, str(out / "model.safetensors"))
    with pytest.raises(TensorError, match="layers.1.bias"):
        load_classifier(out)
    save_file({**tensors, "head.bias": np.zeros(5, np.float32)}, str(out / "model.safetensors"))
    with pytest.raises(TensorError, match="head.bias"):
        load_classifier(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type"):
        load_classifier(out)


@pytest.mark.parametrize(
    ("rule", "weights"), [("linear", (0.1, 0.6, 0.3)), ("loglinear", (1.0, -0.5, 0.8))]
)
def test_ensemble_log_probs_equal_a_loop_over_members(rule, weights):
    models = [MLPClassifier(4, (16, 8), 5, rngs=nnx.Rngs(seed)) for seed in range(3)]
    x = np.random.default_rng(0).normal(size=(11, 4)).astype(np.float32)
    graphdef, _ = nnx.split(models[0], nnx.Param)
    from jaxcombine import tree

    stacked = tree.stack([nnx.state(m, nnx.Param) for m in models])
    got = ensemble_log_probs(graphdef, stacked, x, Combination(rule, weights))
    members = np.stack([_log_softmax(numpy_logits(m, x)) for m in models])
    np.testing.assert_allclose(got, numpy_rule(members, rule, weights), atol=2e-5)


def test_first_distillation_step_has_the_numpy_loss(table, members, tmp_path):
    workdir = tmp_path / "one"
    teachers = [str(m) for m in members]
    distill.main([
        "--config", str(table["config"]), "--workdir", str(workdir), "seed=11",
        f"teachers=[{','.join(teachers)}]", "combine=loglinear", "weights=[0.4,0.3,0.2,0.1]",
        "temperature=2.5", "hard_weight=0.3", "train.steps=1", "train.warmup_steps=0",
        "log_every=1",
    ])  # fmt: skip
    logged = read_metrics(workdir)[0]
    batch = TableDataset.from_files(table["root"] / "train.csv", features=["x0", "x1"]).batch(
        0, 64, 11
    )
    x, y = batch["x"], batch["y"]
    teacher = numpy_rule(
        np.stack([_log_softmax(numpy_logits(load_classifier(m), x)) for m in teachers]),
        "loglinear", (0.4, 0.3, 0.2, 0.1),
    )  # fmt: skip
    student = numpy_logits(MLPClassifier(2, tuple(HIDDEN), 3, rngs=nnx.Rngs(11)), x)
    T = 2.5
    pt, ls = np.exp(_log_softmax(teacher / T)), _log_softmax(student / T)
    kl = np.mean(np.sum(pt * (np.log(pt) - ls), -1))
    ce = np.mean(-_log_softmax(student)[np.arange(len(y)), y])
    np.testing.assert_allclose(logged["hard_loss"], ce, rtol=1e-4)
    np.testing.assert_allclose(logged["soft_loss"], kl, rtol=1e-4)
    np.testing.assert_allclose(logged["loss"], 0.3 * ce + 0.7 * T * T * kl, rtol=1e-4)
    assert load_classifier(workdir / "model").head.kernel.get_value().shape == (HIDDEN[-1], 3)


def _held_out(model_dirs, test) -> tuple[float, float]:
    """(NLL, accuracy) of the linear ensemble of ``model_dirs`` on the held-out points."""
    x, y = test
    members = np.stack([_log_softmax(numpy_logits(load_classifier(d), x)) for d in model_dirs])
    log_p = numpy_rule(members, "linear", np.ones(len(model_dirs)))
    return float(-np.mean(log_p[np.arange(len(y)), y])), float(np.mean(log_p.argmax(-1) == y))


def test_distilled_classifier_keeps_most_of_the_ensemble_gain(table, members):
    root, test = table["root"], table["test"]
    ensemble, ensemble_acc = _held_out(members, test)
    single = float(np.mean([_held_out([m], test)[0] for m in members]))
    args = ["--config", str(table["config"]), "seed=11",
            f"teachers=[{','.join(str(m) for m in members)}]"]  # fmt: skip
    distill.main([*args, "--workdir", str(root / "soft"), "temperature=4.0", "hard_weight=0.0"])
    distill.main([*args, "--workdir", str(root / "hard"), "hard_weight=1.0"])
    student, student_acc = _held_out([root / "soft" / "model"], test)
    hard, hard_acc = _held_out([root / "hard" / "model"], test)
    closed = (single - student) / (single - ensemble)
    nll = {"ensemble": ensemble, "member_mean": single, "student": student, "hard": hard}
    accuracy = {"ensemble": ensemble_acc, "student": student_acc, "hard": hard_acc}
    print(json.dumps({"nll": nll, "gap_closed": closed, "accuracy": accuracy}))
    assert ensemble < single - 0.1  # overfit members: a gap worth closing
    assert closed >= 0.5
    assert student < hard
    assert student_acc >= hard_acc - 0.01


def test_bad_classifier_jobs_fail_before_training(table, members, tmp_path):
    root = table["root"]
    teachers = f"teachers=[{','.join(str(m) for m in members)}]"
    workdir = tmp_path / "w"
    args = ["--config", str(table["config"]), "--workdir", str(workdir)]
    wide = tmp_path / "wide.csv"
    x, y = table["x"], table["y"]
    columns = {"a": x[:, 0], "b": x[:, 1], "c": x[:, 0], "label": y}
    datasets.Dataset.from_dict(columns).to_csv(str(wide))
    cases = [
        ([teachers, f"data.files=[{wide}]", "data.features=[a,b,c]"], "features"),
        ([teachers, "mode=sequence"], "token mode"),
        ([teachers, "model.num_classes=4"], "num_classes"),
        ([teachers, "model.depth=3"], "depth"),
        ([f"teachers=[{members[0]},{root / 'odd' / 'model'}]"], "differs"),
    ]
    odd = MLPClassifier(2, (8,), 3, rngs=nnx.Rngs(0))
    save_classifier(odd, root / "odd" / "model", overwrite=True)
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            distill.main([*args, *overrides])
        assert not (workdir / "checkpoints").exists()
    datasets.Dataset.from_dict({"x0": x[:, 0], "x1": x[:, 1], "label": y + 5}).to_csv(str(wide))
    with pytest.raises(ConfigError, match="label 7"):
        classifier.main([*args, f"data.files=[{wide}]", "model.num_classes=3"])
    with pytest.raises(ConfigError, match="features"):
        classifier.main([*args, "data.features=null"])
    assert not (workdir / "checkpoints").exists()
