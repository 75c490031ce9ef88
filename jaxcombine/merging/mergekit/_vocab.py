"""Output vocabularies for merges of models whose tokenizers differ (mergekit's rules).

With ``tokenizer_source`` (or ``tokenizer: {source: ...}``) the output
tokenizer is

* ``base``: the base model's (the first model's without a base);
* a model reference: that model's;
* ``union``: the base's, then every token of the other models that it lacks
  (regular tokens first, then added tokens, each model in config order and
  by token id: deterministic, where mergekit's order follows hash maps);

plus the tokens listed under ``tokenizer.tokens``. Every tensor indexed by
token (input embeddings, LM head) is then re-indexed per model onto the
output vocabulary before merging: row ``i`` of model m's tensor is m's row for
output token i. A token a model lacks gets (mergekit's fill rules, in order):

1. the ``tokenizer.tokens`` setting for it: a model's row for it, a model's
   row for another token (``model_token``), or zeros; ``force`` applies it
   even where a model has the token;
2. if exactly one model has it: that model's row;
3. if no model has it: zeros;
4. if the base model has it: the base's row;
5. otherwise the mean of the rows of the models that have it.

With ``pad_to_multiple_of``, the vocabulary is padded and every padding row
is the mean of the real rows (Hewitt, "Initializing new word embeddings").
Tokens at ids >= a model's ``vocab_size`` are treated as absent from it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from tokenizers import AddedToken, Tokenizer

from jaxcombine.errors import CheckpointError, ConfigError
from jaxcombine.merging.mergekit._config import MergeConfig, TokenSetting

if TYPE_CHECKING:
    from jaxcombine.merging.mergekit._plan import ModelFiles

TOKENIZER_FILE = "tokenizer.json"


def _load_tokenizer(model: ModelFiles) -> Tokenizer | None:
    file = model.path / TOKENIZER_FILE
    if not file.is_file():
        return None
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a plain Exception on bad files
        raise CheckpointError(f"cannot read the tokenizer ({e})", where=str(file)) from None


def _vocab_size(model: ModelFiles) -> int | None:
    size = model.config.get("vocab_size")
    return size if isinstance(size, int) else None


def _usable_vocab(model: ModelFiles, tokenizer: Tokenizer) -> dict[str, int]:
    """token -> id for the ids the model's embedding has (ids < vocab_size)."""
    size = _vocab_size(model)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    return {t: i for t, i in vocab.items() if size is None or i < size}


@dataclass
class VocabPlan:
    """The output tokenizer and, per model, where each output token's row comes from.

    ``perms[m][i]`` is model m's row for output token i, or -1 where m lacks the
    token; :meth:`align` applies the fill rules of the module docstring. Made by
    :func:`plan_merge` when the config sets a tokenizer. The base lacks "c"
    and ``ft`` lacks "b": each takes the only model's row that has the token.

    >>> import pathlib
    >>> import numpy as np
    >>> from tokenizers import Tokenizer, models
    >>> from jaxcombine.merging.mergekit import VocabPlan
    >>> vocab = {"a": 0, "b": 1, "c": 2}
    >>> plan = VocabPlan(Tokenizer(models.WordLevel(vocab, unk_token="a")), vocab, 3,
    ...                  perms={"base": np.array([0, 1, -1]), "ft": np.array([1, -1, 0])},
    ...                  model_vocabs={"base": {"a": 0, "b": 1}, "ft": {"c": 0, "a": 1}},
    ...                  tokens={}, base="base", source_dir=pathlib.Path("."))
    >>> rows = plan.align({"base": np.array([[1.0], [2.0]]), "ft": np.array([[30.0], [10.0]])})
    >>> print(rows["base"].ravel(), rows["ft"].ravel())
    [ 1.  2. 30.] [10.  2. 30.]
    """

    tokenizer: Tokenizer
    vocab: dict[str, int]  # output token -> id
    size: int  # rows of the output embeddings (padded)
    perms: dict[str, np.ndarray]  # model -> [len(vocab)] source row or -1
    model_vocabs: dict[str, dict[str, int]]
    tokens: Mapping[str, TokenSetting]
    base: str
    source_dir: Path  # tokenizer_config.json etc. come from here
    _cache: dict = field(default_factory=dict)

    def align(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Each model's tensor (token rows first) re-indexed onto the output vocabulary."""
        models = list(tensors)
        sources = self._sources(tuple(models))
        dtype = np.result_type(*tensors.values())
        row_shape = next(iter(tensors.values())).shape[1:]
        n = len(self.vocab)
        defaults = np.zeros((len(sources.ids), *row_shape), dtype)
        for k, (kind, arg) in enumerate(sources.recipes):
            if kind == "row":
                model, row = arg
                defaults[k] = tensors[model][row]
            elif kind == "mean":
                rows = [tensors[m][r] for m, r in arg]
                defaults[k] = np.mean(np.stack(rows).astype(np.float64), axis=0).astype(dtype)
        out = {}
        for model in models:
            p = self.perms[model]
            new = np.zeros((self.size, *row_shape), dtype)
            own = (p >= 0) & ~sources.forced
            new[np.flatnonzero(own)] = tensors[model][p[own]]
            fill = ~own[sources.ids]
            new[sources.ids[fill]] = defaults[fill]
            if self.size > n:
                new[n:] = new[:n].astype(np.float64).mean(axis=0).astype(dtype)
            out[model] = new
        return out

    def _sources(self, models: tuple[str, ...]) -> _FillRecipes:
        if models not in self._cache:
            self._cache[models] = _fill_recipes(self, models)
        return self._cache[models]


@dataclass
class _FillRecipes:
    ids: np.ndarray  # output ids that need a default row
    recipes: list  # per id: ("zero", None) | ("row", (model, row)) | ("mean", [(model, row)])
    forced: np.ndarray  # [len(vocab)] bool


def _fill_recipes(plan: VocabPlan, models: Sequence[str]) -> _FillRecipes:
    forced = np.zeros(len(plan.vocab), bool)
    ids, recipes = [], []
    present = np.stack([plan.perms[m] >= 0 for m in models])  # [M, V]
    for token, tid in plan.vocab.items():
        setting = plan.tokens.get(token)
        force = setting is not None and setting.force
        forced[tid] = force
        have = present[:, tid]
        if have.all() and not force:
            continue
        if setting is not None and setting.source is not None:
            recipe = _configured(plan, models, token, tid, setting.source)
        elif have.sum() == 1:
            m = models[int(np.argmax(have))]
            recipe = ("row", (m, int(plan.perms[m][tid])))
        elif have.sum() == 0:
            recipe = ("zero", None)
        elif plan.base in models and plan.perms[plan.base][tid] >= 0:
            recipe = ("row", (plan.base, int(plan.perms[plan.base][tid])))
        else:
            recipe = (
                "mean",
                [(m, int(plan.perms[m][tid])) for m in models if plan.perms[m][tid] >= 0],
            )
        ids.append(tid)
        recipes.append(recipe)
    return _FillRecipes(np.array(ids, np.int64), recipes, forced)


def _configured(plan: VocabPlan, models, token: str, tid: int, source):
    where = f"tokenizer.tokens.{token}"
    if isinstance(source, Mapping) and source.get("kind") == "zero":
        return ("zero", None)
    model = source["model"] if isinstance(source, Mapping) else source
    if model not in models:
        raise ConfigError(
            f"token {token!r} takes its row from {model!r}, which is not an input of this tensor",
            where=where,
            fix="use one of the merged models as the source",
        )
    if isinstance(source, Mapping):  # model_token
        row = source.get("token_id")
        if row is None:
            row = plan.model_vocabs[model].get(source["token"])
            if row is None:
                raise ConfigError(
                    f"{model!r} has no token {source['token']!r}",
                    where=where,
                    fix="check the token",
                )
        return ("row", (model, int(row)))
    row = int(plan.perms[model][tid])
    if row < 0:
        raise ConfigError(
            f"{model!r} has no token {token!r} to take its row from",
            where=where,
            fix="take the row from a model that has the token, or use {kind: zero}",
        )
    return ("row", (model, row))


def _union(base_tok: Tokenizer, others: list[tuple[ModelFiles, Tokenizer]]) -> Tokenizer:
    out = Tokenizer.from_str(base_tok.to_str())
    have = set(out.get_vocab(with_added_tokens=True))
    regular, added = [], {}
    for model, tok in others:
        decoder = tok.get_added_tokens_decoder()
        added_ids = set(decoder)
        for token, tid in sorted(_usable_vocab(model, tok).items(), key=lambda kv: kv[1]):
            if tid in added_ids:
                if token not in have and token not in added:
                    added[token] = decoder[tid]
            elif token not in have:
                regular.append(token)
                have.add(token)
    for token in regular:
        out.add_tokens([AddedToken(token, normalized=True, special=False)])
    for info in added.values():
        copy = AddedToken(
            info.content,
            single_word=info.single_word,
            lstrip=info.lstrip,
            rstrip=info.rstrip,
            normalized=info.normalized,
            special=info.special,
        )
        (out.add_special_tokens if info.special else out.add_tokens)([copy])
    return out


def _check_same_vocabularies(config: MergeConfig, models: dict[str, ModelFiles]) -> None:
    """Without a tokenizer setting, models whose tokenizers differ cannot be merged."""
    vocabs = {}
    for ref, model in models.items():
        tok = _load_tokenizer(model)
        if tok is not None:
            vocabs[ref] = _usable_vocab(model, tok)
    if len(vocabs) < 2:
        return
    (first, reference), *rest = vocabs.items()
    for ref, vocab in rest:
        if vocab != reference:
            differ = sorted(set(vocab.items()) ^ set(reference.items()), key=lambda kv: kv[1])
            raise ConfigError(
                f"the tokenizers of {first!r} and {ref!r} differ ({len(differ)} token ids, "
                f"e.g. {differ[:3]}) and no tokenizer setting maps the embeddings",
                where="tokenizer_source",
                fix="add tokenizer_source: union (all tokens), base, or a model's path",
            )


def plan_vocabulary(config: MergeConfig, models: dict[str, ModelFiles]) -> VocabPlan | None:
    """The output vocabulary and per-model permutations (None without a tokenizer setting)."""
    settings = config.tokenizer
    if settings is None:
        _check_same_vocabularies(config, models)
        return None
    base = config.base_model or config.referenced()[0]
    tokenizers = {}
    for ref, model in models.items():
        tok = _load_tokenizer(model)
        if tok is None:
            raise CheckpointError(
                f"{TOKENIZER_FILE} is missing, and the config merges tokenizers",
                where=str(model.path),
                fix="copy the model's tokenizer files (saved by transformers' save_pretrained)",
            )
        tokenizers[ref] = tok
    if settings.source == "base":
        out, source_dir = Tokenizer.from_str(tokenizers[base].to_str()), models[base].path
    elif settings.source == "union":
        others = [(models[r], t) for r, t in tokenizers.items() if r != base]
        out, source_dir = _union(tokenizers[base], others), models[base].path
    else:
        out = Tokenizer.from_str(tokenizers[settings.source].to_str())
        source_dir = models[settings.source].path
    vocab = out.get_vocab(with_added_tokens=True)
    for token in settings.tokens:
        if token not in vocab:
            out.add_tokens([AddedToken(token, normalized=True, special=False)])
    vocab = dict(sorted(out.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise CheckpointError(
            "the output tokenizer's ids are not contiguous",
            where=str(source_dir / TOKENIZER_FILE),
            fix="repair the tokenizer (every id from 0 to size-1 must name one token)",
        )
    model_vocabs = {ref: _usable_vocab(models[ref], tok) for ref, tok in tokenizers.items()}
    perms = {}
    for ref, own in model_vocabs.items():
        perms[ref] = np.array([own.get(token, -1) for token in vocab], np.int64)
    size = len(vocab)
    pad = settings.pad_to_multiple_of
    if pad and size % pad:
        size += pad - size % pad
    return VocabPlan(out, vocab, size, perms, model_vocabs, settings.tokens, base, source_dir)


def write_tokenizer(plan: VocabPlan, out_dir: Path) -> None:
    """tokenizer.json, tokenizer_config.json (added tokens listed) and special_tokens_map."""
    plan.tokenizer.save(str(out_dir / TOKENIZER_FILE))
    config_file = plan.source_dir / "tokenizer_config.json"
    if config_file.is_file():
        tok_config = json.loads(config_file.read_text())
        decoder = tok_config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            for tid, info in plan.tokenizer.get_added_tokens_decoder().items():
                decoder.setdefault(
                    str(tid),
                    {
                        "content": info.content,
                        "lstrip": info.lstrip,
                        "normalized": info.normalized,
                        "rstrip": info.rstrip,
                        "single_word": info.single_word,
                        "special": info.special,
                    },
                )
        (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    special = plan.source_dir / "special_tokens_map.json"
    if special.is_file():
        (out_dir / special.name).write_bytes(special.read_bytes())
