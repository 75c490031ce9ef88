"""``jaxcombine tour``: train small models on embedded data and compare every family
of model combination, section by section.

Each section is a function ``run(tour) -> Section`` (:mod:`jaxcombine.tour.report`);
:class:`Tour` holds what sections share (the scale, the output directory, the
corpus and the models trained so far, so the distillation section reuses the
ensemble section's members). Sizes come from :data:`FULL` or :data:`QUICK`;
seeds are fixed, so the same command gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from jaxcombine.data import data_files
from jaxcombine.errors import InputError
from jaxcombine.tour.report import Section, write_outputs


@dataclasses.dataclass(frozen=True)
class Scale:
    """Sizes of one tour run: :data:`FULL` (the claims' scale, at most 15 minutes on
    2 CPU cores), :data:`QUICK` (at most 3 minutes) and :data:`TINY` (the tests).
    Sections scale their own models from ``name``."""

    name: str
    lm_hidden: int  # width of the corpus language models
    lm_layers: int
    seq_len: int  # tokens per training row
    vocab_size: int  # byte-level BPE vocabulary of the corpus
    lm_steps: int  # steps of each corpus model
    lm_batch: int
    corpus_chars: int  # characters of each stdlib package used (train + held out)
    members: int  # ensemble members per kind (seeds, bagging)


FULL = Scale("full", lm_hidden=64, lm_layers=2, seq_len=64, vocab_size=512, lm_steps=600,
             lm_batch=32, corpus_chars=120_000, members=4)  # fmt: skip
QUICK = Scale("quick", lm_hidden=32, lm_layers=2, seq_len=32, vocab_size=384, lm_steps=150,
              lm_batch=32, corpus_chars=40_000, members=3)  # fmt: skip
# For the tests of the runner: every section runs end to end in seconds.
TINY = Scale("tiny", lm_hidden=16, lm_layers=1, seq_len=16, vocab_size=300, lm_steps=8,
             lm_batch=8, corpus_chars=8_000, members=2)  # fmt: skip
SCALES = {s.name: s for s in (FULL, QUICK, TINY)}


@dataclasses.dataclass
class Tour:
    """What the sections share: settings and everything trained so far (``cache``)."""

    out: Path
    scale: Scale
    data: Sequence[str] | None = None
    seed: int = 0
    cache: dict[str, Any] = dataclasses.field(default_factory=dict)

    def cached(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` once per tour; later sections get the same object.

        >>> tour = Tour(Path("unused"), TINY)
        >>> tour.cached("members", lambda: [1, 2]) is tour.cached("members", lambda: [3])
        True
        """
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def save_plot(self, fig, name: str) -> str:
        """Write matplotlib figure ``fig`` to ``plots/<name>.png`` (laid out tight,
        100 dpi), close it and return the path relative to ``out`` (the link in
        report.md)."""
        (self.out / "plots").mkdir(parents=True, exist_ok=True)
        path = self.out / "plots" / f"{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        pyplot().close(fig)
        return str(path.relative_to(self.out))


# Section number -> module of jaxcombine.tour.sections with ``run(tour) -> Section``.
SECTIONS = {1: "ensembles", 2: "averaging", 3: "task_arithmetic", 4: "alignment",
            5: "evidence", 6: "distillation", 7: "moe", 8: "speed"}  # fmt: skip


# Sections that compare an in-domain with an out-of-domain corpus.
TWO_DOMAINS = (2, 5)


def _check_data(data: Sequence[str], chosen: Sequence[int]) -> None:
    """``--data`` paths exist and are readable by ``datasets``; sections 2 and 5 get
    two domains (each path is one)."""
    for path in data:
        data_files(path)
    needs_two = [n for n in chosen if n in TWO_DOMAINS]
    if needs_two and len(data) < 2:
        raise InputError(
            f"sections {needs_two} compare two domains; --data gave one ({data[0]})",
            where="--data",
            fix="pass two or more files or directories (each is a domain), or choose other "
            "--sections",
        )


def _section(number: int) -> Callable[[Tour], Section]:
    return importlib.import_module(f"jaxcombine.tour.sections.{SECTIONS[number]}").run


def run_tour(
    out: str | Path,
    *,
    quick: bool = False,
    scale: Scale | None = None,
    data: Sequence[str] | None = None,
    sections: Sequence[int] | None = None,
    echo: Callable[[str], None] = print,
) -> list[Section]:
    """Run the chosen ``sections`` (default: all) and write ``out/report.md``,
    ``out/results.json`` and ``out/plots/*.png``; returns the sections. ``scale``
    overrides ``quick`` (:data:`FULL` or :data:`QUICK`). Bad ``sections`` and
    ``data`` raise :class:`~jaxcombine.errors.InputError` before anything is trained
    or written.

    Example (the distillation section reuses section 1's members)::

        sections = run_tour("tour-out", quick=True, sections=[1, 6])
        [c.held for s in sections for c in s.claims if c.required]
    """
    chosen = list(sections or SECTIONS)
    unknown = [n for n in chosen if n not in SECTIONS]
    if unknown:
        raise InputError(
            f"no tour section {unknown}", where="--sections",
            fix=f"choose from {', '.join(map(str, SECTIONS))}",
        )  # fmt: skip
    if data:
        _check_data(data, chosen)
    tour = Tour(Path(out), scale or (QUICK if quick else FULL), data=data)
    settings = {"scale": tour.scale.name, "seed": tour.seed, "sections": chosen,
                "data": list(data) if data else "stdlib"}  # fmt: skip
    done: list[Section] = []
    for number in chosen:
        start = time.perf_counter()
        section = _section(number)(tour)
        section.seconds = time.perf_counter() - start
        done.append(section)
        for table in section.tables:
            echo("\n" + table.console())
        for claim in section.claims:
            echo(claim.line().replace("**", ""))
        write_outputs(tour.out, done, settings)  # a partial report survives a crash
    return done


@functools.cache
def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
