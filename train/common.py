"""What every job shares: its configuration, mesh, data, model, optimiser and export.

A job's configuration is a YAML file of sections (see ``configs/train/``)::

    seed: 0
    model: {hidden_size: 64, ...}     # DecoderConfig fields (vocab from the tokenizer)
    init_from: null                   # or an HF model directory to start from
    data: {files: [...], tokenizer: DIR_OR_tokenizer.json, seq_len: 64, ...}
                                      # (classifiers: files, features, label)
    train: {steps: 200, global_batch: 16, learning_rate: 3.0e-3, ...}
    mesh: {data: -1, expert: 1, model: 1}
    log_every: 10
    checkpoint_every: 50

with ``key.path=value`` overrides on the command line (values parsed as
YAML). Unknown keys are errors naming the key. ``WORKDIR/job.json`` records
the configuration; a run in a workdir holding another configuration fails
naming the differences (only the operational keys in :data:`OPERATIONAL`
may change between runs).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import yaml
from flax import nnx

from jaxcombine import distributed
from jaxcombine.data import PackedDataset, TableDataset
from jaxcombine.errors import ConfigError, InputError, JaxcombineError
from jaxcombine.hf import config_to_hf, load_model, save_model
from jaxcombine.models import Decoder, DecoderConfig
from jaxcombine.moe import MoEConfig
from jaxcombine.training import adamw, train

BASE_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "model": {},
    "init_from": None,
    "data": {
        "files": None,
        "text_column": "text",
        "tokenizer": None,
        "seq_len": 64,
        "eos_token": None,
        "bootstrap": False,
        "data_seed": None,
        "features": None,  # classifier jobs: feature column(s) of a table
        "label": "label",  # classifier jobs: the column of integer classes
    },
    "train": {
        "steps": 100,
        "global_batch": 16,
        "learning_rate": 3.0e-3,
        "warmup_steps": 10,
        "end_factor": 0.1,
        "weight_decay": 0.1,
        "clip_norm": 1.0,
        "b1": 0.9,
        "b2": 0.95,
        "compute_dtype": "float32",
    },
    "mesh": {"data": -1, "expert": 1, "model": 1, "num_devices": None},
    "log_every": 10,
    "checkpoint_every": 100,
    "keep_checkpoints": 3,
    "async_checkpoints": True,
    "export": True,
    "progress": True,
}
OPERATIONAL = (
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoints",
    "export",
    "progress",
)
FREE_FORM = ("model",)  # fields checked by DecoderConfig / MoEConfig themselves
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class _YamlLoader(yaml.SafeLoader):
    """YAML with 1.2 floats: ``3e-3`` is a number (PyYAML's 1.1 rules read a string)."""


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?$"),
    list("-+0123456789."),
)


def parse_yaml(text: str):
    """A YAML document (``3e-3`` and ``1.0e-3`` are floats)."""
    return yaml.load(text, Loader=_YamlLoader)


def entry(main) -> None:
    """Run ``main(sys.argv[1:])``; a :class:`JaxcombineError` is printed without a
    traceback and exits with status 2."""
    try:
        main(sys.argv[1:])
    except JaxcombineError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_args(argv: Sequence[str] | None, job: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=f"python -m train.{job}", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True, help="the job's YAML configuration")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, the model")
    parser.add_argument("overrides", nargs="*", help="key.path=value (YAML values)")
    return parser.parse_intermixed_args(argv)  # overrides may come before --workdir too


def load_config(path: str | Path, overrides: Sequence[str], defaults: Mapping) -> dict:
    """The YAML file at ``path`` over ``defaults``, then the ``key=value`` overrides;
    unknown keys are a :class:`ConfigError` naming them."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            "config file does not exist",
            where=str(path),
            fix="pass --config with a YAML file (see configs/train/)",
        )
    loaded = parse_yaml(path.read_text()) or {}
    if not isinstance(loaded, Mapping):
        raise ConfigError("the config must be a mapping of sections", where=str(path))
    config = merge_config(copy.deepcopy(dict(defaults)), loaded, where=str(path))
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not key.path=value",
                where="command line",
                fix="write overrides as train.steps=200",
            )
        nested: dict = {}
        node = nested
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = parse_yaml(value)
        config = merge_config(config, nested, where="command line")
    return config


def merge_config(base: dict, update: Mapping, *, where: str, prefix: str = "") -> dict:
    """``update`` merged into ``base`` section by section; a key missing from
    ``base`` is an error (the ``model`` section is free-form: checked by the model)."""
    for key, value in update.items():
        name = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"unknown key {name!r}",
                where=where,
                fix=f"use one of {', '.join(prefix + k for k in base)}",
            )
        if name in FREE_FORM and isinstance(value, Mapping):
            base[key] = _merge_free(dict(base[key] or {}), value)
        elif isinstance(base[key], dict) and base[key] and isinstance(value, Mapping):
            base[key] = merge_config(base[key], value, where=where, prefix=f"{name}.")
        else:
            base[key] = value
    return base


def _merge_free(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
            base[key] = _merge_free(dict(base[key]), value)
        else:
            base[key] = value
    return base


def job_record(kind: str, config: Mapping) -> dict:
    """What ``job.json`` keeps: the kind of job and every non-operational key."""
    return {"kind": kind, **{k: v for k, v in config.items() if k not in OPERATIONAL}}


def start(config: Mapping):
    """Multi-host start-up and the mesh of the config's ``mesh`` section."""
    distributed.initialize()
    axes = dict(config["mesh"])
    count = axes.pop("num_devices")
    devices = None
    if count is not None:
        if jax.process_count() > 1 or not 0 < count <= jax.device_count():
            raise ConfigError(
                f"mesh.num_devices {count} is not in 1..{jax.device_count()} (or the job "
                "runs on several processes, which use every device)",
                where="mesh.num_devices",
                fix="leave mesh.num_devices unset to use every device",
            )
        devices = jax.devices()[:count]
    return distributed.make_mesh(**axes, devices=devices)


def tokenizer_path(config: Mapping) -> Path:
    """``data.tokenizer``: a tokenizer.json, or a directory holding one."""
    value = config["data"]["tokenizer"]
    if value is None:
        raise ConfigError(
            "no tokenizer given",
            where="data.tokenizer",
            fix="set data.tokenizer to a tokenizer.json or a model directory",
        )
    path = Path(value)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            "tokenizer file does not exist",
            where=f"data.tokenizer: {path}",
            fix="point data.tokenizer at a tokenizer.json",
        )
    return path


def load_data(config: Mapping, tokenizer) -> PackedDataset:
    """The packed training rows of the ``data`` section."""
    data = config["data"]
    if not data["files"]:
        raise ConfigError(
            "no data files given",
            where="data.files",
            fix="list text, JSON lines, parquet or arrow files",
        )
    eos_id = None
    if data["eos_token"] is not None:
        eos_id = tokenizer.token_to_id(data["eos_token"])
        if eos_id is None:
            raise ConfigError(
                f"token {data['eos_token']!r} is not in the tokenizer", where="data.eos_token"
            )
    return PackedDataset.from_files(
        data["files"], tokenizer, data["seq_len"], text_column=data["text_column"], eos_id=eos_id
    )


def batch_reader(config: Mapping, dataset: PackedDataset | TableDataset):
    """``step -> this process's rows`` of the global batch (pure in the step)."""
    index, count = distributed.process_info()
    data, batch = config["data"], config["train"]["global_batch"]
    seed = config["seed"] if data["data_seed"] is None else data["data_seed"]
    return lambda step: dataset.batch(
        step, batch, seed, process_index=index, process_count=count, bootstrap=data["bootstrap"]
    )


def decoder_config(section: Mapping, vocab_size: int) -> DecoderConfig:
    """A :class:`DecoderConfig` from the ``model`` section (``moe`` a mapping of
    :class:`MoEConfig` fields, its hidden size the model's)."""
    fields = dict(section)
    fields.setdefault("vocab_size", vocab_size)
    if fields.get("moe") is not None:
        moe = dict(fields["moe"])
        moe.setdefault("hidden_size", fields.get("hidden_size"))
        fields["moe"] = _build(MoEConfig, moe, "model.moe")
    return _build(DecoderConfig, fields, "model")


def _build(cls, fields: Mapping, where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise ConfigError(
            f"unknown {cls.__name__} fields {unknown}",
            where=where,
            fix=f"use fields of {cls.__name__}: {', '.join(sorted(names))}",
        )
    try:
        return cls(**fields)
    except TypeError as e:
        raise ConfigError(str(e), where=where) from None


def make_model(config: Mapping, vocab_size: int) -> Decoder:
    """The model to train: ``init_from`` (an HF directory) or a fresh one from ``model``."""
    if config["init_from"] is not None:
        if config["model"]:
            raise ConfigError(
                "model and init_from are both set",
                where="model",
                fix="leave model empty when starting from init_from",
            )
        model = load_model(config["init_from"], dtype=jnp.float32)
    else:
        model = Decoder(decoder_config(config["model"], vocab_size), rngs=nnx.Rngs(config["seed"]))
    if model.config.vocab_size < vocab_size:
        raise ConfigError(
            f"the model's vocabulary ({model.config.vocab_size}) is smaller than the "
            f"tokenizer's ({vocab_size})",
            where="model.vocab_size",
        )
    if config["export"]:
        check_exportable(model.config)
    return model


def check_exportable(model_config: DecoderConfig) -> None:
    """Fail before training, not after, when the model cannot be written as an HF
    directory (``export: true``)."""
    try:
        config_to_hf(model_config)
    except JaxcombineError as e:
        raise ConfigError(
            f"the trained model could not be exported in HF format ({e.where}: {e.message})",
            where="export",
            fix=f"{e.fix or 'change the model'}; or set export: false (Orbax checkpoints only)",
        ) from None


def split_params(model: Decoder):
    """(graph definition, parameters): every variable must be a parameter."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ConfigError(
            "the model has non-parameter state (router jitter's random stream)",
            where="model.moe.router_jitter",
            fix="train with router_jitter: 0",
        )
    return graphdef, params


def optimizer(config: Mapping):
    t = config["train"]
    return adamw(
        t["learning_rate"],
        t["steps"],
        warmup_steps=t["warmup_steps"],
        end_factor=t["end_factor"],
        weight_decay=t["weight_decay"],
        clip_norm=t["clip_norm"],
        b1=t["b1"],
        b2=t["b2"],
    )


def compute_dtype(config: Mapping):
    name = config["train"]["compute_dtype"]
    if name not in DTYPES:
        raise ConfigError(
            f"unknown compute dtype {name!r}",
            where="train.compute_dtype",
            fix=f"use one of {', '.join(DTYPES)}",
        )
    return None if name == "float32" else DTYPES[name]


def run(kind: str, config: Mapping, workdir, loss_fn, params, dataset, mesh, constants=None):
    """:func:`jaxcombine.training.train` with the config's settings."""
    t = config["train"]
    return train(
        loss_fn,
        params,
        optimizer(config),
        batch_reader(config, dataset),
        mesh=mesh,
        workdir=workdir,
        job=job_record(kind, config),
        steps=t["steps"],
        global_batch=t["global_batch"],
        seed=config["seed"],
        constants=constants,
        compute_dtype=compute_dtype(config),
        log_every=config["log_every"],
        checkpoint_every=config["checkpoint_every"],
        keep_checkpoints=config["keep_checkpoints"],
        async_checkpoints=config["async_checkpoints"],
        tokens_per_row=dataset.seq_len if isinstance(dataset, PackedDataset) else 1,
        progress=config["progress"],
    )


def export(config: Mapping, workdir, graphdef, params, tokenizer_file: Path) -> Path | None:
    """Write the trained model as an HF directory ``WORKDIR/model`` (with its tokenizer)."""
    if not config["export"]:
        return None
    model = nnx.merge(graphdef, params)
    return save_model(model, Path(workdir) / "model", overwrite=True, extra_files=[tokenizer_file])
