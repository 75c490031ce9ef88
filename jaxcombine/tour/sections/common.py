"""What several sections share: the text corpus and the ensemble members trained on it."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from jaxcombine import tree
from jaxcombine.data import PackedDataset, load_texts, pack
from jaxcombine.merging import ema
from jaxcombine.models import DecoderConfig
from jaxcombine.tour import corpus
from jaxcombine.tour.fit import FitResult, fit
from jaxcombine.tour.lm import held_out_nll, init_members, small_decoder
from jaxcombine.training import adamw, lm_loss

# The packages of the mixed corpus (sections 1, 2, 6): different enough to
# make domains, small enough for a laptop.
PACKAGES = ("json", "email", "http", "logging")
# The domains of sections 2 and 5: fine-tunes of a general model on one
# package (in-domain) and on another (out-of-domain).
IN_DOMAIN, OUT_OF_DOMAIN = "email", "json"
EOS = "<eos>"


@dataclasses.dataclass
class Corpus:
    """Token rows ``[R, seq_len + 1]`` of the training and held-out documents, also
    per domain (package or file)."""

    tokenizer: Tokenizer
    train: PackedDataset
    held_out: np.ndarray
    domains: dict[str, tuple[np.ndarray, np.ndarray]]


def _rows(tokenizer: Tokenizer, documents, seq_len: int) -> np.ndarray:
    ids = [e.ids for e in tokenizer.encode_batch(list(documents))]
    return pack(ids, seq_len, eos_id=tokenizer.token_to_id(EOS))


def _documents(tour) -> dict[str, tuple[list[str], list[str]]]:
    """``{domain: (train documents, held-out documents)}``: stdlib packages, or the
    ``--data`` files (each file a domain, 10% of its documents held out)."""
    scale = tour.scale
    if not tour.data:
        return {
            p: (d.train, d.held_out)
            for p in PACKAGES
            for d in [corpus.domain(p, held_out=0.1, seed=tour.seed, max_chars=scale.corpus_chars)]
        }
    out = {}
    for path in tour.data:
        texts = load_texts(path)["text"]
        mask = corpus.held_out_mask(len(texts), 0.1, tour.seed)
        out[str(path)] = ([t for t, m in zip(texts, mask, strict=True) if not m],
                          [t for t, m in zip(texts, mask, strict=True) if m])  # fmt: skip
    return out


def corpus_data(tour) -> Corpus:
    """The tour's text corpus (built once)."""

    def make() -> Corpus:
        scale = tour.scale
        documents = _documents(tour)
        if tour.data:
            train_documents = [d for train, _ in documents.values() for d in train]
            tokenizer = corpus.train_bpe(train_documents, scale.vocab_size)
        else:
            tokenizer = corpus.train_tokenizer(PACKAGES, scale.vocab_size, seed=tour.seed,
                                               max_chars=scale.corpus_chars)  # fmt: skip
        domains = {
            name: (_rows(tokenizer, train, scale.seq_len), _rows(tokenizer, held, scale.seq_len))
            for name, (train, held) in documents.items()
        }
        train = np.concatenate([rows for rows, _ in domains.values()])
        held_out = np.concatenate([rows for _, rows in domains.values()])
        return Corpus(tokenizer, PackedDataset(train), held_out, domains)

    return tour.cached("corpus", make)


def halves(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(validation, test): the even and the odd held-out rows, so that both halves
    draw from every file of the domain."""
    return rows[0::2], rows[1::2]


def lm_optimizer(scale):
    return adamw(3e-3, scale.lm_steps, warmup_steps=max(1, scale.lm_steps // 20))


@dataclasses.dataclass
class Members:
    """Stacked members of one architecture and how they trained."""

    config: DecoderConfig
    graphdef: Any
    params: Any
    result: FitResult

    def nll(self, rows, rules=None) -> dict[str, Any]:
        return held_out_nll(self.graphdef, self.params, rows, rules)


def averaging_schedule(steps: int) -> tuple[list[int], float]:
    """Section 2's averages along a run of ``steps``: the steps of the last five of
    ten evenly spaced checkpoints, and an EMA decay whose horizon
    ``1 / (1 - decay)`` is a tenth of the run."""
    checkpoints = sorted({max(1, round(steps * k / 10)) for k in range(6, 11)})
    return checkpoints, max(0.5, 1.0 - 10.0 / steps)


def lm_members(tour, kind: str) -> Members:
    """The ensemble members of ``kind``: ``"seeds"`` (seeds 0..N-1, all rows) or
    ``"bagging"`` (seeds 10.., each epoch a bootstrap resample of the rows).
    Their :class:`FitResult` keeps the checkpoints and the EMA of
    :func:`averaging_schedule` (section 2)."""

    def make() -> Members:
        scale, data = tour.scale, corpus_data(tour)
        config = small_decoder(data.tokenizer.get_vocab_size(), hidden=scale.lm_hidden,
                               layers=scale.lm_layers, context=scale.seq_len)  # fmt: skip
        offset = 0 if kind == "seeds" else 10
        seeds = [offset + i for i in range(scale.members)]
        graphdef, params = init_members(config, seeds)
        checkpoints, decay = averaging_schedule(scale.lm_steps)
        result = fit(params, lm_loss(graphdef), data.train, seeds=seeds, steps=scale.lm_steps,
                     batch_size=scale.lm_batch, optimizer=lm_optimizer(scale),
                     bootstrap=kind == "bagging", snapshot_steps=checkpoints,
                     averager=ema(decay, warmup=True), desc=f"members ({kind})")  # fmt: skip
        return Members(config, graphdef, result.params, result)

    return tour.cached(f"members:{kind}", make)


@dataclasses.dataclass
class FineTunes:
    """Fine-tunes of the general model (the first ``seeds`` member): ``in_domain``
    stacked [K, ...] from K seeds, ``out_of_domain`` stacked [1, ...]."""

    graphdef: Any
    general: Any  # stacked [1, ...]
    in_domain: Any
    out_of_domain: Any
    names: tuple[str, str]  # (in-domain, out-of-domain)
    losses: np.ndarray  # [K + 1, steps]


def domain_names(tour) -> tuple[str, str]:
    """(in-domain, out-of-domain): two stdlib packages, or the first two ``--data``
    paths (the runner checks there are two)."""
    if not tour.data:
        return IN_DOMAIN, OUT_OF_DOMAIN
    first, second = list(corpus_data(tour).domains)[:2]
    return first, second


def finetunes(tour) -> FineTunes:
    """The general model fine-tuned for a third of its steps at a third of its
    learning rate: ``members`` times on the in-domain rows (seeds 200..) and once
    on the out-of-domain rows, in one vmapped run."""

    def make() -> FineTunes:
        scale, data = tour.scale, corpus_data(tour)
        inside, outside = domain_names(tour)
        general = lm_members(tour, "seeds")
        base = tree.unstack(general.params)[0]
        count = scale.members
        steps = max(1, scale.lm_steps // 3)
        datasets = [PackedDataset(data.domains[inside][0])] * count
        datasets.append(PackedDataset(data.domains[outside][0]))
        seeds = [200 + i for i in range(count + 1)]
        optimizer = adamw(1e-3, steps, warmup_steps=max(1, steps // 20))
        result = fit(tree.stack([base] * (count + 1)), lm_loss(general.graphdef), datasets,
                     seeds=seeds, steps=steps, batch_size=scale.lm_batch, optimizer=optimizer,
                     desc="fine-tunes")  # fmt: skip
        models = tree.unstack(result.params)
        return FineTunes(general.graphdef, tree.stack([base]), tree.stack(models[:count]),
                         tree.stack(models[count:]), (inside, outside), result.losses)  # fmt: skip

    return tour.cached("finetunes", make)
