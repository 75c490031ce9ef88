"""The tour's output: tables, claims, plots, ``report.md`` and ``results.json``.

A section returns a :class:`Section`: its tables (printed to the console and
written as markdown), the plot files it drew, every measured figure
(``figures``, nested dicts of numbers) and its :class:`Claim` s -- a published
statement, the numbers measured for it and whether it held at this scale.
:func:`write_outputs` writes ``report.md`` and ``results.json`` under
temporary names and renames them when complete.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxcombine.errors import JaxcombineError


class ClaimNotHeldError(JaxcombineError):
    """A claim the tour requires (``--check``) did not hold."""


@dataclasses.dataclass
class Table:
    """A titled table; cells are strings or numbers (floats shown with ``digits``).

    >>> table = Table("NLL", ["model", "NLL"], [["member", 2.5691], ["ensemble", float("nan")]])
    >>> print(table.console())
    NLL
    model     NLL
    --------  -----
    member    2.569
    ensemble  nan
    >>> print(table.markdown())
    **NLL**
    <BLANKLINE>
    | model | NLL |
    |---|---|
    | member | 2.569 |
    | ensemble | nan |
    <BLANKLINE>
    """

    title: str
    columns: Sequence[str]
    rows: list[Sequence[Any]]
    digits: int = 3
    note: str = ""

    def cells(self) -> list[list[str]]:
        return [[_cell(value, self.digits) for value in row] for row in self.rows]

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        rule = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(row) + " |" for row in self.cells()]
        note = f"\n{self.note}\n" if self.note else ""
        return "\n".join([f"**{self.title}**", "", head, rule, *body]) + "\n" + note

    def console(self) -> str:
        rows = [list(self.columns), *self.cells()]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join([self.title, *lines])


def _cell(value: Any, digits: int) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "yes", False: "no", None: "-"}[value]
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


@dataclasses.dataclass
class Claim:
    """A published statement checked at this scale: ``measured`` holds the numbers
    it was judged on, ``held`` the verdict.

    >>> Claim("An ensemble beats its best member", {"ensemble": 2.35, "best": 2.569},
    ...       held=2.35 < 2.569, required=True).line()
    '- **held** [required]: An ensemble beats its best member (ensemble = 2.350, best = 2.569)'
    """

    statement: str
    measured: dict[str, Any]
    held: bool
    source: str = ""
    required: bool = False  # one of the claims ``jaxcombine tour --check`` insists on

    def line(self) -> str:
        numbers = ", ".join(f"{k} = {_cell(v, 3)}" for k, v in self.measured.items())
        verdict = "held" if self.held else "did NOT hold"
        required = " [required]" if self.required else ""
        return f"- **{verdict}**{required}: {self.statement} ({numbers})"


@dataclasses.dataclass
class Section:
    """What a section of the tour measured: its tables, plot files (relative to the
    output directory), figures, claims and run time; ``markdown()`` is its part of
    ``report.md``."""

    number: int
    title: str
    summary: str = ""
    tables: list[Table] = dataclasses.field(default_factory=list)
    plots: list[str] = dataclasses.field(default_factory=list)
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)
    claims: list[Claim] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def markdown(self) -> str:
        parts = [f"## {self.number}. {self.title}", ""]
        if self.summary:
            parts += [self.summary, ""]
        for table in self.tables:
            parts.append(table.markdown())
        for plot in self.plots:
            parts += [f"![{Path(plot).stem}]({plot})", ""]
        if self.claims:
            parts += ["Claims:", "", *[c.line() for c in self.claims], ""]
        parts.append(f"*{self.seconds:.0f} s*\n")
        return "\n".join(parts)


def results_document(sections: Sequence[Section], settings: dict[str, Any]) -> dict[str, Any]:
    """``results.json``: the settings, every section's figures and all claims."""
    return {
        "settings": settings,
        "sections": {
            str(s.number): {"title": s.title, "seconds": s.seconds, "figures": s.figures}
            for s in sections
        },
        "claims": [
            {"section": s.number, **dataclasses.asdict(c)} for s in sections for c in s.claims
        ],
    }


def report_markdown(sections: Sequence[Section], settings: dict[str, Any]) -> str:
    """``report.md``: the settings, how many claims held, then every section."""
    claims = [c for s in sections for c in s.claims]
    held = sum(c.held for c in claims)
    lines = [
        "# jaxcombine tour",
        "",
        f"Settings: {', '.join(f'{k} = {v}' for k, v in settings.items())}.",
        "",
        f"Claims held: {held} of {len(claims)}.",
        "",
    ]
    return "\n".join(lines) + "\n".join(s.markdown() for s in sections)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def write_outputs(out: Path, sections: Sequence[Section], settings: dict[str, Any]) -> None:
    """Write ``report.md`` and ``results.json`` into ``out`` (each renamed when complete).

    ``results.json`` is strict JSON: numpy values become numbers and lists, and an
    undefined ratio (NaN) becomes ``null``.

    >>> import json, tempfile, pathlib
    >>> import numpy as np
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> claim = Claim("kept half", {"kept": float("nan")}, held=False)
    >>> section = Section(6, "Distillation", figures={"nll": np.array([2.5, 2.25])},
    ...                   claims=[claim])
    >>> write_outputs(out, [section], {"scale": "tiny"})
    >>> document = json.loads((out / "results.json").read_text())
    >>> document["sections"]["6"]["figures"], document["claims"][0]["measured"]
    ({'nll': [2.5, 2.25]}, {'kept': None})
    >>> sorted(p.name for p in out.iterdir())
    ['report.md', 'results.json']
    """
    out.mkdir(parents=True, exist_ok=True)
    document = _json_safe(results_document(sections, settings))
    text = json.dumps(document, indent=2, allow_nan=False)
    _write_atomic(out / "results.json", text + "\n")
    _write_atomic(out / "report.md", report_markdown(sections, settings))


def _json_safe(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays as numbers and lists, NaN and
    infinities (an undefined ratio) as null."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot write {type(value).__name__} to results.json")
