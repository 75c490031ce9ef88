"""The Colab notebooks in ``colab/``: each runs top to bottom, and is committed clean.

Execution: every ``colab/*.ipynb`` is run with ``nbclient`` in a fresh ``python3``
kernel, in a temporary working directory (files a notebook writes stay there);
the kernel inherits this process's environment, so it sees the 8 fake CPU
devices of the root conftest and builds its mesh over them. A cell that raises
fails the test with nbclient's report of the cell and its traceback.

Committed files: no outputs, no execution counts, no widget state, and the
conventions every notebook follows -- the first code cell installs jaxcombine
when it is missing, and a markdown cell titled "Scale up (TPU)" is followed by
the code cell that sets ``SCALE = "cpu"``.

The install cell is the same in every notebook, and CI, where jaxcombine is
installed, runs it as a no-op; so its other paths (the pip command on CPU, TPU
and GPU runtimes, and the error when pip fails) are run here with pip, the
installed distributions and ``find_spec`` replaced by stand-ins.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import nbclient
import nbformat
import pytest

COLAB = Path(__file__).resolve().parent.parent / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]


def test_there_are_notebooks():
    assert NOTEBOOKS, f"no notebooks in {COLAB}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs(path: Path, tmp_path: Path):
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    errors = [
        output
        for cell in nb.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]
    assert not errors, errors


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_is_stripped(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [
        (i, cell.get("execution_count"), len(cell.get("outputs", [])))
        for i, cell in enumerate(nb.cells)
        if cell.cell_type == "code"
        and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, f"{path.name}: cells (index, execution_count, outputs) not stripped: {dirty}"
    assert "widgets" not in nb.metadata, f"{path.name}: widget state in the notebook metadata"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_conventions(path: Path):
    cells = nbformat.read(path, as_version=4).cells
    code = [c for c in cells if c.cell_type == "code"]
    assert code and 'find_spec("jaxcombine")' in code[0].source, (
        f"{path.name}: the first code cell must install jaxcombine when it is missing"
    )
    titles = [
        i
        for i, c in enumerate(cells)
        if c.cell_type == "markdown" and "Scale up (TPU)" in c.source.splitlines()[0]
    ]
    assert len(titles) == 1, f"{path.name}: want one markdown cell titled 'Scale up (TPU)'"
    following = cells[titles[0] + 1] if titles[0] + 1 < len(cells) else None
    assert following is not None and following.cell_type == "code", (
        f"{path.name}: the 'Scale up (TPU)' cell must be followed by the sizes' code cell"
    )
    assert 'SCALE = "cpu"' in following.source, (
        f'{path.name}: the sizes cell must set SCALE = "cpu" (the user switches it to "tpu")'
    )


INSTALL_END = "importlib.invalidate_caches()"


def install_cell(path: Path) -> str:
    """The canonical part of a notebook's install cell: up to ``invalidate_caches()``."""
    source = next(c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code")
    head, found, _ = source.source.partition(INSTALL_END)
    assert found, f"{path.name}: the install cell does not end with {INSTALL_END}"
    return head + found


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_notebook_has_the_same_install_cell(path: Path):
    assert install_cell(path) == install_cell(NOTEBOOKS[0]), (
        f"{path.name}: the install cell differs from {NOTEBOOKS[0].name}'s; keep them identical"
    )


class FakeDistribution:
    def __init__(self, name: str):
        self.metadata = {"Name": name}


def run_install_cell(monkeypatch, installed: list[str], pip_returncode: int = 0, *,
                     present: bool = False) -> list[list[str]]:
    """Run the install cell as if jaxcombine were ``present`` or not, on a runtime whose
    distributions are ``installed``; return the commands it ran."""
    commands = []
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name == "jaxcombine":
            return real_find_spec(name) if present else None
        return real_find_spec(name, *args, **kwargs)

    def run(command, check=False, **kwargs):
        commands.append(list(command))
        return subprocess.CompletedProcess(command, pip_returncode)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [FakeDistribution(n) for n in installed])
    monkeypatch.setattr(subprocess, "run", run)
    exec(compile(install_cell(NOTEBOOKS[0]), "install cell", "exec"), {})
    return commands


PIP = [sys.executable, "-m", "pip", "install", "-q", "jaxcombine"]


@pytest.mark.parametrize(
    "installed, extra",
    [
        (["numpy", "jax", "jaxlib"], []),  # a CPU runtime
        (["jax", "jaxlib", "libtpu"], ["jax[tpu]"]),  # a TPU VM runtime
        (["jax", "jaxlib", "libtpu-nightly"], ["jax[tpu]"]),
        (["jax", "jax-cuda12-plugin", "jax_cuda12_pjrt"], ["jax[cuda12]"]),  # a GPU runtime
        (["jax", "jax_cuda13_plugin", "jax-cuda13-pjrt"], ["jax[cuda13]"]),
    ],
    ids=["cpu", "tpu", "tpu-nightly", "cuda12", "cuda13"],
)
def test_install_cell_asks_pip_for_the_accelerators_jax(monkeypatch, installed, extra):
    assert run_install_cell(monkeypatch, installed) == [PIP + extra]


def test_install_cell_does_nothing_where_jaxcombine_is_installed(monkeypatch):
    assert run_install_cell(monkeypatch, ["jax", "libtpu"], present=True) == []


def test_install_cell_says_how_to_install_from_git_when_pip_fails(monkeypatch):
    with pytest.raises(RuntimeError, match="JAXCOMBINE_SOURCE.*git URL.*git\\+https://"):
        run_install_cell(monkeypatch, ["jax"], pip_returncode=1)
