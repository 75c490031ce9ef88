"""Output files that appear only when complete.

Every writer of a directory (``jaxcombine merge``, ``save_model``, ...) writes
into a hidden temporary beside the target and renames it when done, so readers
never see half an output (:func:`atomic_directory`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from jaxcombine.errors import OutputExistsError


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Delete temporaries that killed runs left beside ``out`` (their process is gone)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        pid = stale.name.rsplit(".tmp-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that is renamed to ``out_dir`` on success.

    A failed or killed run leaves no ``out_dir`` behind (only a hidden
    ``.NAME.tmp-PID-*`` directory, removed by the next run). An existing
    non-empty ``out_dir`` is refused unless ``overwrite``; it is then replaced
    only once the new output is complete.

    >>> import shutil, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> with atomic_directory(root / "out") as tmp:
    ...     _ = (tmp / "a.txt").write_text("done")
    ...     print((root / "out").exists())            # not there while writing
    False
    >>> sorted(p.name for p in root.iterdir()), (root / "out" / "a.txt").read_text()
    (['out'], 'done')
    >>> with atomic_directory(root / "out") as tmp:   # not empty, no overwrite
    ...     pass
    Traceback (most recent call last):
    ...
    jaxcombine.errors.OutputExistsError: .../out: output path already exists and is not empty
      How to fix: choose a new output path, remove this one, or pass --overwrite
    >>> with atomic_directory(root / "out", overwrite=True) as tmp:
    ...     raise RuntimeError("failed half-way")     # a failed run
    Traceback (most recent call last):
    ...
    RuntimeError: failed half-way
    >>> sorted(p.name for p in root.iterdir()), sorted(p.name for p in (root / "out").iterdir())
    (['out'], ['a.txt'])
    >>> shutil.rmtree(root)
    """
    out = Path(out_dir)
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError(
            "output path already exists and is not empty",
            where=str(out),
            fix="choose a new output path, remove this one, or pass --overwrite",
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(out)
