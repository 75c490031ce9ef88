"""The merge plan: every output tensor, its inputs, its method and its settings.

:func:`plan_merge` reads only ``config.json``, tokenizer files and the
safetensors *headers* of every referenced model, and checks everything that
can fail before any tensor data is read: architectures, layer counts and
``layer_range``\\ s, that each input tensor exists with the same shape in every
model (no tensor is ever skipped), vocabularies, the method's model count and
every parameter value for every tensor.

The planning follows mergekit's ``MergePlanner``:

* ``models:`` is one output slice over all layers of every model (the base
  model added if it is not listed);
* output layer k of a slice takes layer ``start + k`` of each source; the
  layer position for gradients is ``t = k / (n - 1)`` within the slice
  (``t = 1`` for a one-layer slice), ``t = 0`` outside the layers;
* tensors before the layers (embeddings) come from the first slice's
  sources, tensors after them (final norm, head) from the last slice's;
* settings are looked up in this order: the source's own ``parameters``, the
  slice's, the global ones, then the method's default; shared settings are
  evaluated on the output tensor name, per-model ones on the input name.

Layers are found by name (``...layers.N.``, ``...h.N.``, ``...blocks.N.``), so
any decoder that follows the Hugging Face naming can be merged; a model that
lacks ``lm_head.weight`` (tied embeddings) contributes its input embedding in
its place, as in mergekit.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxcombine import rules
from jaxcombine.errors import CheckpointError, ConfigError, TensorError
from jaxcombine.hf import SafetensorsCheckpoint
from jaxcombine.merging._engine import (
    MergeMethod,
    check_model_count,
    leaf_parameters,
    unknown_parameter,
)
from jaxcombine.merging.mergekit._config import MergeConfig, OutputSlice, _dtype_name
from jaxcombine.merging.mergekit._vocab import VocabPlan, plan_vocabulary

_LAYER = re.compile(
    r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer)\.)(?P<index>\d+)\.(?P<rest>.+)$"
)
_VOCAB = re.compile(r"(?:^|\.)(?:embed_tokens|wte|word_embeddings|lm_head|embed_out)\.weight$")
_EMBEDDING = re.compile(r"(?:^|\.)(?:embed_tokens|wte|wpe|word_embeddings|embed_positions)\.")
HEAD = "lm_head.weight"
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


@dataclass(frozen=True)
class Input:
    """One input tensor: a model reference and a tensor name in it.

    >>> from jaxcombine.merging.mergekit import Input
    >>> Input("model-b", "model.layers.1.mlp.weight")
    Input(model='model-b', tensor='model.layers.1.mlp.weight')
    """

    model: str
    tensor: str


@dataclass(frozen=True)
class PlannedTensor:
    """One output tensor and how to make it.

    ``values`` are the leaf function's keywords for this tensor (every setting
    resolved), ``t`` the layer position that gradients were evaluated at. See
    :func:`plan_merge` for an example.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # as written
    base: Input | None
    models: tuple[Input, ...]
    values: Mapping[str, Any]  # the leaf function's keywords
    t: float
    vocab: bool = False  # rows follow the output vocabulary (aligned per model)

    @property
    def inputs(self) -> tuple[Input, ...]:
        return ((self.base,) if self.base is not None else ()) + self.models

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclass
class ModelFiles:
    """A referenced model: its directory, config.json and tensor index (headers only)."""

    ref: str
    path: Path
    config: dict
    checkpoint: SafetensorsCheckpoint
    layers: dict[int, dict[str, str]] = field(default_factory=dict)  # index -> rest -> name
    prefix: str | None = None
    others: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def layer_tensor(self, index: int, rest: str) -> str:
        return f"{self.prefix}{index}.{rest}"


@dataclass
class MergePlan:
    """Everything :func:`~jaxcombine.merging.mergekit.run_merge` needs, checked.

    ``tensors`` lists every output tensor in order, ``out_config`` is the
    output's config.json; ``describe()`` is the ``--dry-run`` text. It holds
    open file handles: ``run_merge`` or ``close()`` releases them. See
    :func:`plan_merge` for an example.
    """

    config: MergeConfig
    method: MergeMethod
    models: dict[str, ModelFiles]
    tensors: list[PlannedTensor]
    out_config: dict
    donor: str  # the model whose config and tokenizer files the output takes
    vocab: VocabPlan | None

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def close(self) -> None:
        for m in self.models.values():
            m.checkpoint.close()

    def describe(self) -> str:
        """The plan as text, one line per output tensor (``--dry-run``)."""
        from jaxcombine.merging.mergekit._describe import describe_plan

        return describe_plan(self)


def read_model_config(path: Path, where: str | None = None) -> dict:
    """The ``config.json`` object of a model directory (a :class:`CheckpointError` otherwise)."""
    file = path / "config.json"
    if not file.is_file():
        raise CheckpointError(
            "config.json is missing",
            where=where or str(path),
            fix="point at a Hugging Face model directory",
        )
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"invalid JSON ({e})", where=str(file)) from None
    if not isinstance(config, dict):
        raise CheckpointError("config.json does not hold a JSON object", where=str(file))
    return config


def _config_layers(config: dict) -> int | None:
    for key in _LAYER_KEYS:
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _index_model(ref: str, path: Path) -> ModelFiles:
    config = read_model_config(path)
    files = ModelFiles(ref, path, config, SafetensorsCheckpoint(path))
    prefixes = set()
    for name in files.checkpoint.infos:
        match = _LAYER.match(name)
        if match is None:
            files.others.append(name)
            continue
        prefixes.add(match["prefix"])
        files.layers.setdefault(int(match["index"]), {})[match["rest"]] = name
    if len(prefixes) > 1:
        raise CheckpointError(
            f"layer tensors under several prefixes {sorted(prefixes)}",
            where=str(path),
            fix="merge models with one stack of layers (encoder-decoder models are not supported)",
        )
    files.prefix = prefixes.pop() if prefixes else None
    expected = _config_layers(config)
    if sorted(files.layers) != list(range(len(files.layers))) or (
        expected is not None and expected != len(files.layers)
    ):
        raise CheckpointError(
            f"config.json says {expected} layers but the checkpoint holds layers "
            f"{sorted(files.layers)}",
            where=str(path),
            fix="the checkpoint and its config.json do not belong together",
        )
    return files


def _check_architectures(models: dict[str, ModelFiles]) -> None:
    def arch(m: ModelFiles):
        return (m.config.get("model_type"), tuple(m.config.get("architectures") or ()))

    kinds = {arch(m) for m in models.values()}
    if len(kinds) > 1:
        listing = "; ".join(f"{m.ref}: {arch(m)[0]} {list(arch(m)[1])}" for m in models.values())
        raise ConfigError(
            f"the models have different architectures ({listing})",
            where="models",
            fix="merge models of one architecture (model_type and architectures in config.json)",
        )


def _donor(config: MergeConfig) -> str:
    return config.base_model or config.referenced()[0]


def _slice_ranges(config: MergeConfig, models) -> list[list[tuple[int, int]]]:
    """Each slice's sources' layer ranges (the `models:` form spans all layers)."""
    out = []
    for i, s in enumerate(config.slices):
        ranges = []
        for j, src in enumerate(s.sources):
            n = models[src.model].num_layers
            start, end = src.layer_range if src.layer_range is not None else (0, n)
            if end > n:
                raise ConfigError(
                    f"layer_range [{start}, {end}) goes past the model's {n} layers",
                    where=f"slices[{i}].sources[{j}] ({src.model})",
                    fix=f"use an end <= {n} (layer_range is end-exclusive)",
                )
            ranges.append((start, end))
        if len({e - b for b, e in ranges}) > 1:
            raise ConfigError(
                "the models of one merge have different layer counts: "
                + ", ".join(
                    f"{src.model} {e - b}" for src, (b, e) in zip(s.sources, ranges, strict=True)
                ),
                where=f"slices[{i}]" if not config.from_models else "models",
                fix="merge models with equal layer counts, or use slices with equal ranges",
            )
        out.append(ranges)
    return out


class _Planner:
    def __init__(self, config: MergeConfig, method: MergeMethod, models, vocab: VocabPlan | None):
        self.config = config
        self.method = method
        self.models = models
        self.vocab = vocab
        self.tensors: list[PlannedTensor] = []
        self.names_seen: list[str] = []

    # -- settings -------------------------------------------------------------------------
    def _setting(self, sources, name: str, t: float, param: str, where: str):
        for scope, label in sources:
            if scope and param in scope:
                value = rules.evaluate_setting(name, scope[param], t, where=f"{label}.{param}")
                if value is not None:
                    return value
        return None

    def _values(self, out_slice: OutputSlice, index: int, name: str, roles, t: float) -> dict:
        """Resolved settings for one tensor; ``roles``: (source index, input name) per model."""
        label = f"slices[{index}]" if not self.config.from_models else "models"
        shared = [
            (out_slice.parameters, f"slices[{index}].parameters"),
            (self.config.parameters, "parameters"),
        ]
        values = {}
        for param in self.method.params:
            if param.scope == "shared":
                values[param.name] = self._setting(shared, name, t, param.name, "parameters")
                continue
            per_model = []
            for j, input_name in roles:
                own = (out_slice.sources[j].parameters, f"{label}[{j}].parameters")
                per_model.append(self._setting([own, *shared], input_name, t, param.name, ""))
            values[param.name] = tuple(per_model)
        return leaf_parameters(self.method, name, values)

    # -- inputs ---------------------------------------------------------------------------
    def _roles(self, out_slice: OutputSlice, index: int):
        """(base source index or None, model source indices) for one slice."""
        base = out_slice.base_model or self.config.base_model
        sources = [s.model for s in out_slice.sources]
        if self.method.base == "none" or base is None:
            if self.method.base == "required":
                raise ConfigError(
                    f"{self.method.name} needs a base model",
                    where="base_model",
                    fix="add base_model: the model the fine-tunes started from",
                )
            return None, list(range(len(sources)))
        if base not in sources:
            raise ConfigError(
                f"the base model {base!r} is not among the slice's sources",
                where=f"slices[{index}]",
                fix="add the base model to the sources with the same layer_range",
            )
        b = sources.index(base)
        return b, [j for j in range(len(sources)) if j != b]

    def _input_name(self, model: str, name: str) -> str | None:
        infos = self.models[model].checkpoint.infos
        if name in infos:
            return name
        if name == HEAD:  # tied: the embedding stands in for the head
            tied = [n for n in infos if _VOCAB.search(n) and "embed" in n]
            return tied[0] if tied else None
        return None

    def add(self, out_slice, index, name, inputs: list[tuple[int, str]], t: float, base_j):
        """Plan output ``name`` from ``inputs``: (source index, tensor name in that source)."""
        models = [(j, self.config.slices[index].sources[j].model, n) for j, n in inputs]
        infos = [self.models[model].checkpoint.infos[tensor] for _, model, tensor in models]
        vocab = _VOCAB.search(name) is not None
        aligned = vocab and self.vocab is not None
        first = infos[0]
        for info in infos[1:]:
            same = info.shape[1:] == first.shape[1:] if aligned else info.shape == first.shape
            if not same:
                raise TensorError(
                    f"shapes differ between models: {first.file.parent.name} has "
                    f"{first.shape}, {info.file.parent.name} has {info.shape}"
                    + (
                        " (vocabularies differ and no tokenizer setting maps them)"
                        if vocab and info.shape[1:] == first.shape[1:]
                        else ""
                    ),
                    where=f"{info.file}: {info.name}",
                    fix="add tokenizer_source: union (or base, or a model) to the config"
                    if vocab
                    else "merge models of the same shapes",
                )
        dtypes = {i.dtype for i in infos}
        float_in = all(np.issubdtype(d, np.floating) or d.name == "bfloat16" for d in dtypes)
        if not float_in and len(dtypes) > 1:
            raise TensorError(f"dtypes differ: {sorted(map(str, dtypes))}", where=name)
        shape = first.shape
        if aligned:
            shape = (self.vocab.size, *first.shape[1:])
        out_dtype = first.dtype
        if float_in:
            out_dtype = self.config.out_dtype or self.config.dtype or first.dtype
        roles = [(j, n) for j, n in inputs if j != base_j]
        base = next((Input(m, n) for j, m, n in models if j == base_j), None)
        planned = PlannedTensor(
            name=name,
            shape=tuple(shape),
            dtype=np.dtype(out_dtype),
            base=base,
            models=tuple(Input(m, n) for j, m, n in models if j != base_j),
            values=self._values(out_slice, index, name, roles, t),
            t=t,
            vocab=aligned,
        )
        self.tensors.append(planned)
        self.names_seen += [name] + [n for _, n in inputs]

    # -- structure ------------------------------------------------------------------------
    def plan(self, ranges) -> None:
        config = self.config
        roles = []
        for i, s in enumerate(config.slices):
            base_j, model_js = self._roles(s, i)
            where = f"slices[{i}]" if not config.from_models else "models"
            fix = "list {want} models (the base model is set apart)"
            check_model_count(self.method, len(model_js), where, fix)
            roles.append(base_j)
        first, last = config.slices[0], config.slices[-1]
        donor = self.models[_donor(config)]
        pre = [n for n in donor.others if _EMBEDDING.search(n)]
        post = [n for n in donor.others if n not in pre]
        head_sources = [self.models[s.model] for s in last.sources]
        if HEAD not in post and any(HEAD in m.checkpoint.infos for m in head_sources):
            post.append(HEAD)
        self._check_non_layer(pre, first, 0)
        for name in pre:
            self._add_non_layer(name, first, 0, roles[0])
        out_layer = 0
        for i, (s, span) in enumerate(zip(config.slices, ranges, strict=True)):
            n = span[0][1] - span[0][0]
            for k in range(n):
                t = k / (n - 1) if n > 1 else 1.0
                sources = [self.models[src.model] for src in s.sources]
                rests = self._layer_rests(s, i, [b + k for b, _ in span])
                for rest in rests:
                    name = f"{donor.prefix}{out_layer}.{rest}"
                    inputs = [
                        (j, m.layer_tensor(b + k, rest))
                        for j, (m, (b, _)) in enumerate(zip(sources, span, strict=True))
                    ]
                    self.add(s, i, name, inputs, t, roles[i])
                out_layer += 1
        last_index = len(config.slices) - 1
        self._check_non_layer(post, last, last_index)
        for name in post:
            self._add_non_layer(name, last, last_index, roles[-1])
        self.out_layers = out_layer

    def _layer_rests(self, s: OutputSlice, i: int, layer_of_source: list[int]) -> list[str]:
        sets = []
        for src, layer in zip(s.sources, layer_of_source, strict=True):
            sets.append(self.models[src.model].layers[layer])
        reference = sets[0]
        for src, layer, rests in zip(s.sources, layer_of_source, sets, strict=True):
            missing = sorted(set(reference) - set(rests))
            extra = sorted(set(rests) - set(reference))
            if missing or extra:
                m = self.models[src.model]
                raise TensorError(
                    f"layer {layer} lacks {missing} and has extra {extra} compared with "
                    f"{s.sources[0].model}",
                    where=str(m.path),
                    fix="merge models of one architecture; no tensor is skipped silently",
                )
        return list(reference)

    def _check_non_layer(self, names, s: OutputSlice, i: int) -> None:
        """Each source has exactly the donor's tensors outside the layers (a tied head aside)."""
        donor = self.models[_donor(self.config)]
        expected = set(donor.others) - {HEAD}
        for src in s.sources:
            m = self.models[src.model]
            have = set(m.others) - {HEAD}
            if have != expected:
                raise TensorError(
                    f"tensors outside the layers differ from {donor.ref!r}: missing "
                    f"{sorted(expected - have)}, extra {sorted(have - expected)}",
                    where=str(m.path),
                    fix="merge models of one architecture; no tensor is skipped silently",
                )

    def _add_non_layer(self, name, s: OutputSlice, i: int, base_j) -> None:
        inputs = []
        for j, src in enumerate(s.sources):
            tensor = self._input_name(src.model, name)
            if tensor is None:
                raise TensorError(
                    f"tensor {name!r} is missing",
                    where=str(self.models[src.model].path),
                    fix="merge models of one architecture; no tensor is skipped silently",
                )
            inputs.append((j, tensor))
        self.add(s, i, name, inputs, 0.0, base_j)


def _all_settings(config: MergeConfig):
    yield "parameters", config.parameters
    for i, s in enumerate(config.slices):
        label = f"slices[{i}]" if not config.from_models else "models"
        yield f"slices[{i}].parameters", s.parameters
        for j, src in enumerate(s.sources):
            yield f"{label}[{j}].parameters", src.parameters


def _check_parameter_names(config: MergeConfig, method: MergeMethod) -> None:
    known = {p.name for p in method.params}
    for where, scope in _all_settings(config):
        for name in scope:
            if name not in known:
                raise unknown_parameter(method, name, f"{where}.{name}")


def _check_rules_match(config: MergeConfig, names: list[str]) -> None:
    for where, scope in _all_settings(config):
        for name, setting in scope.items():
            rules.check_rules_match(setting, names, f"{where}.{name}")


def _out_config(config: MergeConfig, donor: ModelFiles, plan_tensors, layers, vocab) -> dict:
    out = json.loads(json.dumps(donor.config))
    if not config.from_models:
        key = next((k for k in _LAYER_KEYS if k in out), "num_hidden_layers")
        out[key] = layers
    dtype = config.out_dtype or config.dtype
    if dtype is not None:
        for key in ("torch_dtype", "dtype"):
            if key in out or (key == "torch_dtype" and "dtype" not in out):
                out[key] = _dtype_name(dtype)
    if vocab is not None:
        out["vocab_size"] = vocab.size
    has_head = any(t.name == HEAD for t in plan_tensors)
    if "tie_word_embeddings" in out or not has_head:
        # a written head must not be ignored, a missing one must be tied
        out["tie_word_embeddings"] = not has_head
    return out


def plan_merge(config: MergeConfig) -> MergePlan:
    """Check a config against the models' headers and list every output tensor.

    Reads config.json, tokenizer files and safetensors headers only (the rules
    are in the module docstring). A frankenmerge of two two-layer models,
    layers 0-1 of ``model-a`` then layer 1 of ``model-b``:

    >>> import json, pathlib, tempfile
    >>> import numpy as np
    >>> from jaxcombine.hf import write_shards
    >>> from jaxcombine.merging.mergekit import parse_merge_config, plan_merge
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = pathlib.Path(tmp.name)
    >>> for name in ("model-a", "model-b"):
    ...     (root / name).mkdir()
    ...     _ = (root / name / "config.json").write_text(json.dumps({"num_hidden_layers": 2}))
    ...     tensors = [(f"model.layers.{i}.mlp.weight", np.ones((2, 2), np.float32))
    ...                for i in range(2)] + [("model.norm.weight", np.ones(2, np.float32))]
    ...     _ = write_shards(tensors, root / name, max_shard_bytes=1 << 20)
    >>> config = parse_merge_config({"merge_method": "passthrough", "slices": [
    ...     {"sources": [{"model": "model-a", "layer_range": [0, 2]}]},
    ...     {"sources": [{"model": "model-b", "layer_range": [1, 2]}]}]}, config_dir=root)
    >>> plan = plan_merge(config)
    >>> for t in plan.tensors:
    ...     print(t.name, "<-", t.models[0].model, t.models[0].tensor)
    model.layers.0.mlp.weight <- model-a model.layers.0.mlp.weight
    model.layers.1.mlp.weight <- model-a model.layers.1.mlp.weight
    model.layers.2.mlp.weight <- model-b model.layers.1.mlp.weight
    model.norm.weight <- model-b model.norm.weight
    >>> plan.out_config["num_hidden_layers"], plan.describe().splitlines()[0]
    (3, 'merge_method: passthrough')
    >>> plan.close()
    >>> tmp.cleanup()

    References: Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models,
    arXiv:2403.13257 (its ``MergePlanner``).
    """
    from jaxcombine.merging._registry import SPECS

    method = SPECS[config.merge_method]
    _check_parameter_names(config, method)
    models: dict[str, ModelFiles] = {}
    try:
        for ref in config.referenced():
            models[ref] = _index_model(ref, config.models[ref])
        _check_architectures(models)
        ranges = _slice_ranges(config, models)
        vocab = plan_vocabulary(config, models)
        planner = _Planner(config, method, models, vocab)
        planner.plan(ranges)
        _check_rules_match(config, planner.names_seen)
        donor = models[_donor(config)]
        out_config = _out_config(config, donor, planner.tensors, planner.out_layers, vocab)
    except BaseException:
        for m in models.values():
            m.checkpoint.close()
        raise
    return MergePlan(config, method, models, planner.tensors, out_config, donor.ref, vocab)
