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
"""

from __future__ import annotations

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
