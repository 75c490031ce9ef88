"""Train an MLP classifier on a table: cross-entropy of the label given the features.

    python -m train.classifier --config configs/train/classifier_tiny.yml --workdir runs/clf

The table is any file ``datasets`` reads (csv, JSON lines, parquet, arrow):
``data.features`` names one column of numeric lists or several numeric
columns, ``data.label`` the column of integer classes 0..C-1. The ``model``
section holds ``hidden_sizes``, ``dropout_rate`` (dropout keys come from the
step's key) and optionally ``num_classes`` (default: the largest label + 1).
Ensemble members come from different ``seed`` values or from bagging
(``data.bootstrap``), exactly as for ``train.lm``; ``train.distill`` takes
these classifiers as teachers. The model is written to ``WORKDIR/model``
(config.json + model.safetensors, :func:`jaxcombine.hf.save_classifier`).
Throughput in ``metrics.jsonl`` (``tokens_per_s``) counts examples.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from flax import nnx

from jaxcombine.data import TableDataset
from jaxcombine.errors import ConfigError
from jaxcombine.hf import save_classifier
from jaxcombine.models import MLPClassifier
from jaxcombine.training import token_cross_entropy
from train import common

MODEL_FIELDS = ("hidden_sizes", "num_classes", "dropout_rate")


def load_table(config: Mapping) -> TableDataset:
    """The examples of the ``data`` section (``files``, ``features``, ``label``)."""
    data = config["data"]
    if not data["files"]:
        raise ConfigError("no data files given", where="data.files",
                          fix="list csv, JSON lines, parquet or arrow files")  # fmt: skip
    if not data["features"]:
        raise ConfigError(
            "no feature columns given",
            where="data.features",
            fix="name a column of numeric lists, or a list of numeric columns",
        )
    return TableDataset.from_files(data["files"], features=data["features"], label=data["label"])


def make_classifier(config: Mapping, dataset: TableDataset, num_classes: int | None = None):
    """A fresh :class:`MLPClassifier` from the ``model`` section, sized for ``dataset``
    (``num_classes`` when the teachers fix it)."""
    section = dict(config["model"])
    unknown = sorted(set(section) - set(MODEL_FIELDS))
    if unknown:
        raise ConfigError(f"unknown classifier fields {unknown}", where="model",
                          fix=f"use {', '.join(MODEL_FIELDS)}")  # fmt: skip
    if config["init_from"] is not None:
        raise ConfigError("init_from is not supported for classifiers", where="init_from")
    classes = section.get("num_classes") or num_classes or int(dataset.labels.max()) + 1
    if num_classes is not None and classes != num_classes:
        raise ConfigError(
            f"model.num_classes {classes} differs from the teachers' {num_classes}",
            where="model.num_classes",
            fix="leave model.num_classes unset",
        )
    if dataset.labels.max() >= classes:
        raise ConfigError(
            f"the data has label {int(dataset.labels.max())}, outside {classes} classes",
            where="data.label",
            fix="number the classes 0..C-1 (or raise model.num_classes)",
        )
    return MLPClassifier(
        dataset.num_features,
        tuple(section.get("hidden_sizes", (64, 64))),
        classes,
        dropout_rate=section.get("dropout_rate", 0.0),
        rngs=nnx.Rngs(config["seed"]),
    )


def classifier_loss(graphdef):
    """``loss(params, {"x", "y"}, key, constants)``: mean cross-entropy (dropout from ``key``)."""

    def loss(params, batch, key, constants):
        del constants
        logits = nnx.merge(graphdef, params)(batch["x"], dropout_key=key)
        return token_cross_entropy(logits, batch["y"]), {}

    return loss


def accuracy(model: MLPClassifier, dataset: TableDataset) -> float:
    """Fraction of ``dataset`` whose argmax logit is the label."""
    predictions = np.asarray(model(dataset.features)).argmax(-1)
    return float(np.mean(predictions == dataset.labels))


def export(config: Mapping, workdir, graphdef, params) -> Path | None:
    """Write the trained classifier to ``WORKDIR/model`` (unless ``export: false``)."""
    if not config["export"]:
        return None
    return save_classifier(nnx.merge(graphdef, params), Path(workdir) / "model", overwrite=True)


def main(argv=None) -> None:
    args = common.parse_args(argv, "classifier")
    config = common.load_config(args.config, args.overrides, common.BASE_DEFAULTS)
    mesh = common.start(config)
    dataset = load_table(config)
    graphdef, params = common.split_params(make_classifier(config, dataset))
    loss = classifier_loss(graphdef)
    params = common.run("classifier", config, args.workdir, loss, params, dataset, mesh)
    export(config, args.workdir, graphdef, params)


if __name__ == "__main__":
    common.entry(main)
