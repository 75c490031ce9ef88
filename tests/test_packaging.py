"""What ``pip install jaxcombine`` gets: the wheel built from this checkout.

A Colab notebook installs the wheel, not the checkout, so a subpackage that
setuptools does not find (a directory without ``__init__.py``, a pattern that
misses it) would import here, in the editable install, and fail there. The
oracle is the source tree itself: every ``jaxcombine/**/*.py`` file must be in
the wheel, nothing outside ``jaxcombine/`` may be, and the ``jaxcombine``
console script must point at the CLI's entry function.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def build_wheel(tmp_path: Path) -> zipfile.ZipFile:
    """Build the wheel from a copy of the checkout (setuptools writes ``build/`` beside it)."""
    source = tmp_path / "src"
    shutil.copytree(ROOT / "jaxcombine", source / "jaxcombine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         str(source), "-w", str(out)],
        check=True,
    )
    (wheel,) = out.glob("jaxcombine-*.whl")
    return zipfile.ZipFile(wheel)


def test_the_wheel_holds_every_module_and_the_console_script(tmp_path):
    wheel = build_wheel(tmp_path)
    names = wheel.namelist()
    modules = {n for n in names if not n.split("/")[0].endswith(".dist-info")}
    expected = {p.relative_to(ROOT).as_posix() for p in (ROOT / "jaxcombine").rglob("*.py")
                if "__pycache__" not in p.parts}
    assert modules == expected, (
        f"missing from the wheel: {sorted(expected - modules)}; "
        f"unexpected: {sorted(modules - expected)}"
    )
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = configparser.ConfigParser()
    scripts.read_string(wheel.read(entry_points).decode())
    assert dict(scripts["console_scripts"]) == {"jaxcombine": "jaxcombine.cli:entry"}
    from jaxcombine import cli

    assert callable(cli.entry)
