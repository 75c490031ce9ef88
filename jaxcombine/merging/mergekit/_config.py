"""mergekit's YAML merge configuration, read and checked before any checkpoint is opened.

The schema is mergekit's (``mergekit.config.MergeConfiguration``)::

    merge_method: ties                # one of the 20 names in merging.SPECS
    base_model: path/to/base          # optional, per method
    models:                           # either `models` ...
      - model: path/to/ft1
        parameters: {weight: 1.0, density: [0.2, 0.8]}
    slices:                           # ... or `slices` (frankenmerges)
      - sources:
          - model: path/to/a
            layer_range: [0, 16]      # end-exclusive
            parameters: {...}
        base_model: ...               # optional, per slice
        parameters: {...}             # per slice
    parameters: {lambda: 0.9}         # global
    dtype: float32                    # inputs are cast to it before merging
    out_dtype: bfloat16               # tensors are written in it
    tokenizer_source: union           # or base, or a model; or the newer
    tokenizer: {source: union, pad_to_multiple_of: 64, tokens: {<tok>: {source: ..., force: ...}}}
    chat_template: chatml             # auto, a built-in name, or a Jinja template

A setting (a parameter's value) is a scalar, a layer gradient (a list of
numbers) or a list of ``{filter, value}`` rules, as in :mod:`jaxcombine.rules`.
Model references are local directories: a path is taken relative to the
working directory (as mergekit does), then relative to the config file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import yaml

from jaxcombine.errors import ConfigError, closest
from jaxcombine.hf import require_model_dir

TOP_LEVEL_KEYS = (
    "merge_method",
    "models",
    "slices",
    "modules",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
)
_DTYPES = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64),
}


@dataclass(frozen=True)
class SliceSource:
    """One input of an output slice: a model and its layers ``[start, end)``.

    The YAML ``{model: a, layer_range: [0, 2], parameters: {weight: 0.5}}``:

    >>> from jaxcombine.merging.mergekit import SliceSource
    >>> SliceSource("a", (0, 2), {"weight": 0.5})
    SliceSource(model='a', layer_range=(0, 2), parameters={'weight': 0.5})
    """

    model: str
    layer_range: tuple[int, int] | None  # None: all layers (the `models:` form)
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers merged from the same layers of its sources.

    ``models:`` is one slice over all layers (``layer_range=None``); each entry
    of ``slices:`` is one slice, with its own optional base model and settings.

    >>> from jaxcombine.merging.mergekit import OutputSlice, SliceSource
    >>> s = OutputSlice((SliceSource("a", (0, 2)), SliceSource("b", (4, 6))), base_model="a")
    >>> [src.layer_range for src in s.sources], s.base_model
    ([(0, 2), (4, 6)], 'a')
    """

    sources: tuple[SliceSource, ...]
    base_model: str | None = None
    parameters: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenSetting:
    """Where the embedding of one output token comes from (``tokenizer.tokens``).

    ``source``: a model reference, ``{"kind": "zero"}``, or
    ``{"kind": "model_token", "model": M, "token": T | "token_id": I}``.
    ``force``: use the source even where a model has the token.

    The YAML ``tokens: {"<pad>": {source: {kind: zero}, force: true}}``:

    >>> from jaxcombine.merging.mergekit import TokenSetting
    >>> TokenSetting({"kind": "zero"}, force=True)
    TokenSetting(source={'kind': 'zero'}, force=True)
    """

    source: Any = None
    force: bool = False


@dataclass(frozen=True)
class TokenizerSettings:
    """The output vocabulary: ``tokenizer_source`` or ``tokenizer: {source, tokens,
    pad_to_multiple_of}`` (the fill rules are in :class:`VocabPlan`).

    >>> from jaxcombine.merging.mergekit import TokenizerSettings
    >>> TokenizerSettings("union", pad_to_multiple_of=64)
    TokenizerSettings(source='union', tokens={}, pad_to_multiple_of=64)
    """

    source: str  # "union", "base", or a model reference
    tokens: Mapping[str, TokenSetting] = field(default_factory=dict)
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class MergeConfig:
    """A validated merge configuration; ``models`` maps each reference to its directory.

    Made by :func:`parse_merge_config` or :func:`load_merge_config` (see their
    examples); ``referenced()`` lists every model once.
    """

    merge_method: str
    slices: tuple[OutputSlice, ...]
    from_models: bool  # written with `models:` (one slice over all layers)
    base_model: str | None
    parameters: Mapping[str, Any]
    dtype: np.dtype | None
    out_dtype: np.dtype | None
    tokenizer: TokenizerSettings | None
    chat_template: str | None
    models: Mapping[str, Path]
    text: str = ""
    source: str = "<dict>"

    def referenced(self) -> list[str]:
        """Every referenced model once: base first, then in order of appearance."""
        seen = [self.base_model] if self.base_model else []
        for s in self.slices:
            seen += [s.base_model] if s.base_model else []
            seen += [src.model for src in s.sources]
        return list(dict.fromkeys(seen))


def _check_keys(mapping: Mapping, allowed, where: str) -> None:
    if not isinstance(mapping, Mapping):
        raise ConfigError(f"expected a mapping, got {mapping!r}", where=where)
    for key in mapping:
        if key not in allowed:
            raise ConfigError(
                f"unknown key {key!r}", where=f"{where}.{key}", fix=closest(str(key), allowed)
            )


def _parameters(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(
            f"parameters must be a mapping of name to setting, got {value!r}",
            where=where,
            fix="write e.g. parameters: {weight: 0.5, density: [0.2, 0.8]}",
        )
    return dict(value)


def _model_reference(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(
            f"a model reference must be a path string, got {value!r}",
            where=where,
            fix="write the path of a local model directory",
        )
    if "+" in value:
        raise ConfigError(
            f"LoRA references ('model+adapter') are not supported: {value!r}",
            where=where,
            fix="merge the adapter into the model first (peft's merge_and_unload) and "
            "reference the merged directory",
        )
    if "@" in value:
        raise ConfigError(
            f"hub revisions ('model@revision') are not supported: {value!r}",
            where=where,
            fix="download that revision to a local directory and reference it",
        )
    return value


def _locate(reference: str, config_dir: Path | None, where: str) -> Path:
    path = Path(reference).expanduser()
    if not path.exists() and not path.is_absolute() and config_dir is not None:
        beside = config_dir / path
        if beside.exists():
            path = beside
    try:
        return require_model_dir(path if path.exists() else reference)
    except ConfigError:
        raise
    except Exception as e:  # CheckpointError: re-raise naming the config key
        raise type(e)(e.message, where=f"{where}: {e.where}", fix=e.fix) from None


def _dtype(value, where: str) -> np.dtype | None:
    if value is None:
        return None
    name = str(value).removeprefix("torch.")
    if name not in _DTYPES:
        raise ConfigError(f"unsupported dtype {value!r}", where=where, fix=closest(name, _DTYPES))
    return _DTYPES[name]


def _dtype_name(dtype: np.dtype) -> str:
    """The name config.json gives ``dtype`` (``bfloat16``, ``float16``, ...)."""
    return "bfloat16" if dtype.name == "bfloat16" else str(dtype)


def _layer_range(value, where: str) -> tuple[int, int]:
    ok = (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    )
    if not ok:
        raise ConfigError(
            f"layer_range must be two integers [start, end), got {value!r}",
            where=where,
            fix="write e.g. layer_range: [0, 16] (end-exclusive)",
        )
    start, end = value
    if not 0 <= start < end:
        raise ConfigError(
            f"layer_range [{start}, {end}) is empty or negative",
            where=where,
            fix="use 0 <= start < end (end-exclusive)",
        )
    return (start, end)


def _slices(raw, where: str) -> tuple[OutputSlice, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("slices must be a non-empty list", where=where)
    out = []
    for i, s in enumerate(raw):
        here = f"{where}[{i}]"
        _check_keys(s, ("sources", "base_model", "parameters", "residual_weight"), here)
        if s.get("residual_weight") is not None:
            raise ConfigError(
                "residual_weight is not supported (mergekit ignores it as well)",
                where=f"{here}.residual_weight",
                fix="remove it",
            )
        sources = s.get("sources")
        if not isinstance(sources, list) or not sources:
            raise ConfigError("a slice needs a non-empty 'sources' list", where=here)
        parsed = []
        for j, src in enumerate(sources):
            at = f"{here}.sources[{j}]"
            _check_keys(src, ("model", "layer_range", "parameters"), at)
            if "layer_range" not in src:
                raise ConfigError("missing layer_range", where=at, fix="add layer_range: [0, N]")
            parsed.append(
                SliceSource(
                    _model_reference(src.get("model"), f"{at}.model"),
                    _layer_range(src["layer_range"], f"{at}.layer_range"),
                    _parameters(src.get("parameters"), f"{at}.parameters"),
                )
            )
        lengths = {p.layer_range[1] - p.layer_range[0] for p in parsed}
        if len(lengths) > 1:
            ranges = ", ".join(f"{p.model} {list(p.layer_range)}" for p in parsed)
            raise ConfigError(
                f"the sources of a slice must span the same number of layers: {ranges}",
                where=here,
                fix="make every layer_range of this slice the same length",
            )
        base = s.get("base_model")
        out.append(
            OutputSlice(
                tuple(parsed),
                _model_reference(base, f"{here}.base_model") if base is not None else None,
                _parameters(s.get("parameters"), f"{here}.parameters"),
            )
        )
    return tuple(out)


def _models(raw, base_model: str | None, where: str) -> OutputSlice:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("models must be a non-empty list", where=where)
    sources = []
    for i, m in enumerate(raw):
        here = f"{where}[{i}]"
        if isinstance(m, str):
            m = {"model": m}
        _check_keys(m, ("model", "parameters"), here)
        sources.append(
            SliceSource(
                _model_reference(m.get("model"), f"{here}.model"),
                None,
                _parameters(m.get("parameters"), f"{here}.parameters"),
            )
        )
    # mergekit: a base model that is not among the models is added as a source.
    if base_model is not None and base_model not in [s.model for s in sources]:
        sources.append(SliceSource(base_model, None, {}))
    return OutputSlice(tuple(sources))


def _token_setting(raw, token: str, where: str) -> TokenSetting:
    if isinstance(raw, str):
        return TokenSetting(source=_model_reference(raw, where))
    _check_keys(raw, ("source", "force"), where)
    source = raw.get("source")
    if isinstance(source, Mapping):
        kind = source.get("kind")
        if kind == "zero":
            _check_keys(source, ("kind",), f"{where}.source")
        elif kind == "model_token":
            _check_keys(source, ("kind", "model", "token", "token_id"), f"{where}.source")
            if ("token" in source) == ("token_id" in source):
                raise ConfigError(
                    "give exactly one of token and token_id",
                    where=f"{where}.source",
                    fix="e.g. {kind: model_token, model: M, token: '<s>'}",
                )
            _model_reference(source.get("model"), f"{where}.source.model")
        else:
            raise ConfigError(
                f"unknown token source kind {kind!r}",
                where=f"{where}.source.kind",
                fix="use 'zero' or 'model_token' (or a model reference)",
            )
    elif source is not None:
        source = _model_reference(source, f"{where}.source")
    force = raw.get("force", False)
    if not isinstance(force, bool):
        raise ConfigError(f"force must be true or false, got {force!r}", where=f"{where}.force")
    return TokenSetting(source=source, force=force)


def _tokenizer(raw: Mapping, where: str) -> TokenizerSettings | None:
    source, tokens, pad = raw.get("tokenizer_source"), {}, None
    if raw.get("tokenizer") is not None:
        if source is not None:
            raise ConfigError(
                "tokenizer_source and tokenizer are both set",
                where=where,
                fix="keep one: tokenizer: {source: ...} replaces tokenizer_source",
            )
        tok = raw["tokenizer"]
        _check_keys(tok, ("source", "tokens", "pad_to_multiple_of"), f"{where}.tokenizer")
        source = tok.get("source", "union")
        for name, setting in (tok.get("tokens") or {}).items():
            tokens[str(name)] = _token_setting(setting, name, f"tokenizer.tokens.{name}")
        pad = tok.get("pad_to_multiple_of")
        if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
            raise ConfigError(
                f"pad_to_multiple_of must be a positive integer, got {pad!r}",
                where="tokenizer.pad_to_multiple_of",
            )
    if source is None:
        return None
    if source not in ("union", "base"):
        source = _model_reference(source, "tokenizer_source")
    return TokenizerSettings(source, tokens, pad)


def parse_merge_config(
    raw: Mapping, *, config_dir: str | os.PathLike | None = None, text: str = "", source="<dict>"
) -> MergeConfig:
    """Check a mergekit config (a dict as read from YAML) and locate every model.

    Only the existence of the model directories is checked here (their files
    are read by :func:`plan_merge`). Relative references are looked up in the
    working directory, then in ``config_dir``. As in mergekit, a base model
    that is not among ``models`` is added to them:

    >>> import pathlib, tempfile
    >>> from jaxcombine.merging.mergekit import parse_merge_config
    >>> tmp = tempfile.TemporaryDirectory()
    >>> for name in ("base-model", "math-ft"):
    ...     (pathlib.Path(tmp.name) / name).mkdir()
    >>> raw = {"merge_method": "ties", "base_model": "base-model",
    ...        "models": [{"model": "math-ft", "parameters": {"weight": 1.0, "density": 0.5}}],
    ...        "tokenizer_source": "union"}
    >>> config = parse_merge_config(raw, config_dir=tmp.name)
    >>> [(src.model, dict(src.parameters)) for src in config.slices[0].sources]
    [('math-ft', {'weight': 1.0, 'density': 0.5}), ('base-model', {})]
    >>> config.referenced(), config.tokenizer.source
    (['base-model', 'math-ft'], 'union')
    >>> parse_merge_config({**raw, "merge_method": "tiez"}, config_dir=tmp.name)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.ConfigError: merge_method: unknown merge method 'tiez'
      How to fix: did you mean 'ties'?
    >>> tmp.cleanup()

    References: Goddard et al. 2024, Arcee's MergeKit: A Toolkit for Merging Large Language Models,
    arXiv:2403.13257 (the configuration format).
    """
    _check_keys(raw, TOP_LEVEL_KEYS, "config")
    method = raw.get("merge_method")
    if not isinstance(method, str):
        raise ConfigError(
            "merge_method is missing", where="config", fix="add e.g. merge_method: ties"
        )
    from jaxcombine.merging._registry import SPECS

    if method not in SPECS:
        raise ConfigError(
            f"unknown merge method {method!r}", where="merge_method", fix=closest(method, SPECS)
        )
    if raw.get("modules") is not None:
        raise ConfigError(
            "'modules' (multi-module architectures) is not supported",
            where="modules",
            fix="use 'models' or 'slices'",
        )
    given = [k for k in ("models", "slices") if raw.get(k) is not None]
    if len(given) != 1:
        raise ConfigError(
            "exactly one of 'models' and 'slices' must be given"
            + (f" (both are: {given})" if given else ""),
            where="config",
            fix="list the models to merge under 'models', or layer slices under 'slices'",
        )
    base = raw.get("base_model")
    base = _model_reference(base, "base_model") if base is not None else None
    if given == ["models"]:
        slices = (_models(raw["models"], base, "models"),)
    else:
        slices = _slices(raw["slices"], "slices")
    chat_template = raw.get("chat_template")
    if chat_template is not None and not isinstance(chat_template, str):
        raise ConfigError(
            f"chat_template must be a string, got {chat_template!r}", where="chat_template"
        )
    parameters = _parameters(raw.get("parameters"), "parameters")
    tokenizer = _tokenizer(raw, "config")
    config_dir = Path(config_dir) if config_dir is not None else None

    refs = [base] if base else []
    for s in slices:
        refs += ([s.base_model] if s.base_model else []) + [src.model for src in s.sources]
    if tokenizer is not None and tokenizer.source not in ("union", "base"):
        refs.append(tokenizer.source)
    models = {}
    for ref in dict.fromkeys(refs):
        models[ref] = _locate(ref, config_dir, f"model {ref!r}")
    return MergeConfig(
        merge_method=method,
        slices=slices,
        from_models=given == ["models"],
        base_model=base,
        parameters=parameters,
        dtype=_dtype(raw.get("dtype"), "dtype"),
        out_dtype=_dtype(raw.get("out_dtype"), "out_dtype"),
        tokenizer=tokenizer,
        chat_template=chat_template,
        models=models,
        text=text,
        source=source,
    )


def load_merge_config(path: str | os.PathLike) -> MergeConfig:
    """Read and check a mergekit YAML file (models located on disk, nothing else read).

    The schema is in the module docstring (mergekit's, Goddard et al. 2024,
    arXiv:2403.13257); errors name the file and the key.
    A frankenmerge: layers 0-1 of ``model-a`` then layer 1 of ``model-b``:

    >>> import pathlib, tempfile
    >>> from jaxcombine.merging.mergekit import load_merge_config
    >>> tmp = tempfile.TemporaryDirectory()
    >>> root = pathlib.Path(tmp.name)
    >>> for name in ("model-a", "model-b"):
    ...     (root / name).mkdir()
    >>> _ = (root / "franken.yml").write_text('''
    ... merge_method: passthrough
    ... slices:
    ...   - sources: [{model: model-a, layer_range: [0, 2]}]
    ...   - sources: [{model: model-b, layer_range: [1, 2]}]
    ... dtype: bfloat16
    ... ''')
    >>> config = load_merge_config(root / "franken.yml")
    >>> [s.sources[0].layer_range for s in config.slices], config.dtype
    ([(0, 2), (1, 2)], dtype(bfloat16))
    >>> tmp.cleanup()
    """
    return _load_yaml(path, parse_merge_config, kind="merge", tool="mergekit")


def _load_yaml(path: str | os.PathLike, parse, *, kind: str, tool: str):
    """Read the YAML mapping in ``path`` and ``parse`` it (``parse(raw, config_dir=, text=,
    source=)``); every ConfigError names the file. ``kind`` and ``tool`` word the errors."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"{kind} config file does not exist", where=str(path), fix=f"pass a {tool} YAML file"
        )
    text = path.read_text(encoding="utf-8")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML ({e})", where=str(path)) from None
    if not isinstance(raw, Mapping):
        raise ConfigError("expected a YAML mapping at the top level", where=str(path))
    try:
        return parse(raw, config_dir=path.parent, text=text, source=str(path))
    except ConfigError as e:
        raise type(e)(e.message, where=f"{path}: {e.where}", fix=e.fix) from None
