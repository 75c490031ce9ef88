"""The Python standard library's sources as a text corpus, one domain per package.

Each package (``email``, ``asyncio``, ``json``, ...) under the running
interpreter's stdlib directory (``sysconfig.get_paths()["stdlib"]``) is a
domain: its ``.py`` files in sorted path order (test directories left out),
each ending with a newline, concatenated. A domain's *documents* are blocks of
at most ``block_lines`` consecutive lines of one file; a fraction of them,
chosen by a seed, is held out (:func:`held_out_mask`), so training and
evaluation text never share a line of a file, and ``"".join(documents)`` is
the package text again. Every function is a pure function of its arguments
and the stdlib files.

The files written for training (:func:`write_domain`) are JSON lines with a
``text`` column, one document per line (documents contain newlines), which
``train.lm`` reads (``data.files``; add ``data.eos_token: "<eos>"`` to end each
document). :func:`train_tokenizer` trains a byte-level BPE (``tokenizers``;
the special tokens, 256 byte tokens, merges up to ``vocab_size``) on the
training documents only (:func:`train_bpe` on any documents); it encodes any
text and decodes it back exactly.

Example::

    from jaxcombine.tour import corpus

    corpus.available_packages()[:3]                  # ['asyncio', 'collections', ...]
    email = corpus.domain("email", held_out=0.1, seed=0)
    len(email.train), len(email.held_out)            # documents (blocks of lines)
    corpus.write_domains("data/stdlib", ["email", "json"])   # data/stdlib/email/train.jsonl ...
    corpus.train_tokenizer(["email", "json"], vocab_size=512).save("data/stdlib/tokenizer.json")
"""

from __future__ import annotations

import dataclasses
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxcombine.errors import InputError, closest

DEFAULT_PACKAGES: tuple[str, ...] = (
    "email",
    "asyncio",
    "json",
    "xml",
    "http",
    "unittest",
    "importlib",
    "logging",
    "concurrent",
)
# Sub-directories holding a package's tests, left out of its domain.
TEST_DIRECTORIES = frozenset({"test", "tests", "idle_test"})
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<eos>")

PathLike = str | os.PathLike


def stdlib_root(root: PathLike | None = None) -> Path:
    """The directory of the standard library's sources: ``root`` if given, else
    ``sysconfig.get_paths()["stdlib"]``; an :class:`InputError` if it does not exist.

    >>> import json, sysconfig
    >>> stdlib_root() == Path(sysconfig.get_paths()["stdlib"])
    True
    >>> Path(json.__file__).parent == stdlib_root() / "json"      # where ``import json`` reads
    True
    >>> stdlib_root("/no/such/directory")
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: /no/such/directory: the standard library's source directory ...
    """
    path = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not path.is_dir():
        raise InputError(
            "the standard library's source directory does not exist",
            where=str(path),
            fix="use a Python installation that ships its .py sources (not a stripped or "
            "zipped stdlib), or pass root= a directory of Python packages",
        )
    return path


def _is_source(path: Path, package_dir: Path, include_tests: bool) -> bool:
    parts = path.relative_to(package_dir).parts
    return (
        path.is_file()
        and not any(part.startswith(".") or part == "__pycache__" for part in parts)
        and (include_tests or not TEST_DIRECTORIES.intersection(parts[:-1]))
    )


def _sources(package_dir: Path, include_tests: bool) -> list[Path]:
    files = (p for p in package_dir.rglob("*.py") if _is_source(p, package_dir, include_tests))
    return sorted(files, key=lambda p: p.relative_to(package_dir).as_posix())


def available_packages(root: PathLike | None = None, *, include_tests: bool = False) -> list[str]:
    """The packages of the stdlib (directories with an ``__init__.py`` and at least
    one source file), sorted by name.

    >>> {"email", "json", "asyncio"} <= set(available_packages())
    True
    """
    base = stdlib_root(root)
    return sorted(
        d.name
        for d in base.iterdir()
        if d.is_dir()
        and d.name.isidentifier()
        and (d / "__init__.py").is_file()
        and _sources(d, include_tests)
    )


def package_files(
    package: str, *, root: PathLike | None = None, include_tests: bool = False
) -> list[Path]:
    """The ``.py`` files of ``package``, sorted by their path inside it; without
    ``include_tests``, files under a ``test``/``tests`` directory are left out.
    An :class:`InputError` (naming the packages there are) if it has none.

    >>> [p.name for p in package_files("json")]
    ['__init__.py', 'decoder.py', 'encoder.py', 'scanner.py', 'tool.py']
    """
    base = stdlib_root(root)
    if not isinstance(package, str) or not package.isidentifier():
        raise InputError(
            f"{package!r} is not a package name",
            where="package",
            fix="name a top-level stdlib package, e.g. 'email' or 'json'",
        )
    directory = base / package
    files = _sources(directory, include_tests) if directory.is_dir() else []
    if not files:
        raise InputError(
            f"no Python package {package!r} with source files in the standard library",
            where=str(directory),
            fix=closest(package, available_packages(base, include_tests=include_tests)),
        )
    return files


def _lines(package: str, root, include_tests: bool) -> Iterator[tuple[int, str]]:
    """``(file index, line)`` for every line of the package, newlines kept; each
    file ends with a newline."""
    for index, path in enumerate(package_files(package, root=root, include_tests=include_tests)):
        text = path.read_text(encoding="utf-8", errors="replace")
        if text and not text.endswith("\n"):
            text += "\n"
        for line in text.splitlines(keepends=True):
            yield index, line


def _check_max_chars(max_chars) -> None:
    if max_chars is not None and (not isinstance(max_chars, int) or max_chars < 1):
        raise InputError(
            f"max_chars must be a positive integer, got {max_chars!r}", where="max_chars"
        )


def package_documents(
    package: str,
    *,
    block_lines: int = 64,
    max_chars: int | None = None,
    root: PathLike | None = None,
    include_tests: bool = False,
) -> list[str]:
    """The package's text as documents: blocks of at most ``block_lines`` consecutive
    lines, each inside one file (a file's last block may be shorter), in order.
    With ``max_chars``, only the whole lines of the text's first ``max_chars``
    characters. ``"".join(package_documents(p)) == package_texts(p)``.

    >>> documents = package_documents("json", block_lines=64)
    >>> max(len(d.splitlines()) for d in documents)
    64
    >>> "".join(documents) == package_texts("json")
    True
    """
    _check_max_chars(max_chars)
    if not isinstance(block_lines, int) or block_lines < 1:
        raise InputError(
            f"block_lines must be a positive integer, got {block_lines!r}", where="block_lines"
        )
    documents: list[str] = []
    block: list[str] = []
    current, total = None, 0
    for index, line in _lines(package, root, include_tests):
        if max_chars is not None and total + len(line) > max_chars:
            break
        total += len(line)
        if block and (index != current or len(block) == block_lines):
            documents.append("".join(block))
            block = []
        current = index
        block.append(line)
    if block:
        documents.append("".join(block))
    return documents


def package_texts(
    package: str,
    max_chars: int | None = None,
    *,
    root: PathLike | None = None,
    include_tests: bool = False,
) -> str:
    """The concatenated sources of ``package`` (see :func:`package_files`), each file
    ending with a newline; with ``max_chars``, only the whole lines among the
    first ``max_chars`` characters.

    >>> text = package_texts("email", max_chars=10_000)
    >>> len(text) <= 10_000 and text.endswith(chr(10)) and text in package_texts("email")
    True
    """
    return "".join(
        package_documents(package, max_chars=max_chars, root=root, include_tests=include_tests)
    )


def held_out_mask(count: int, held_out: float = 0.1, seed: int = 0) -> np.ndarray:
    """Which of ``count`` documents are held out: a bool array with
    ``round(held_out * count)`` True entries (at least one when ``held_out > 0``
    and ``count >= 2``; never all), at positions drawn by ``np.random.default_rng(seed)``.

    >>> int(held_out_mask(50, 0.1).sum()), int(held_out_mask(3, 0.01).sum())
    (5, 1)
    """
    if not (isinstance(held_out, float | int) and 0.0 <= held_out < 1.0):
        raise InputError(
            f"held_out must be a fraction in [0, 1), got {held_out!r}",
            where="held_out",
            fix="pass the share of documents to hold out, e.g. 0.1",
        )
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}", where="seed")
    mask = np.zeros(count, bool)
    if held_out > 0 and count >= 2:
        chosen = min(max(1, round(held_out * count)), count - 1)
        mask[np.random.default_rng([int(seed), 0x68656C64]).permutation(count)[:chosen]] = True
    return mask


@dataclasses.dataclass(frozen=True)
class Domain:
    """One package's documents, split: ``train`` and ``held_out`` (lists of texts, in
    the package's order). ``train_text`` and ``held_out_text`` join each list.

    >>> toy = Domain("toy", train=["ab", "cd"], held_out=["ef"])
    >>> toy.train_text, toy.held_out_text
    ('abcd', 'ef')

    Built by :func:`domain`, the two splits partition the package's documents:

    >>> d = domain("json", held_out=0.2, seed=0)
    >>> len(d.train) + len(d.held_out) == len(package_documents("json"))
    True
    """

    package: str
    train: list[str]
    held_out: list[str]

    @property
    def train_text(self) -> str:
        return "".join(self.train)

    @property
    def held_out_text(self) -> str:
        return "".join(self.held_out)


def domain(
    package: str,
    *,
    held_out: float = 0.1,
    seed: int = 0,
    block_lines: int = 64,
    max_chars: int | None = None,
    root: PathLike | None = None,
    include_tests: bool = False,
) -> Domain:
    """``package`` as a :class:`Domain`: its documents (:func:`package_documents`)
    split by :func:`held_out_mask`. Deterministic in ``seed``.

    >>> d = domain("json", held_out=0.2, seed=0)
    >>> documents = package_documents("json")
    >>> len(d.held_out) == round(0.2 * len(documents))
    True
    >>> sorted(d.train + d.held_out) == sorted(documents)
    True
    """
    documents = package_documents(
        package, block_lines=block_lines, max_chars=max_chars, root=root,
        include_tests=include_tests,
    )  # fmt: skip
    mask = held_out_mask(len(documents), held_out, seed)
    return Domain(
        package,
        train=[d for d, out in zip(documents, mask, strict=True) if not out],
        held_out=[d for d, out in zip(documents, mask, strict=True) if out],
    )


def write_documents(path: PathLike, documents: Sequence[str]) -> Path:
    """Write ``documents`` as JSON lines ``{"text": ...}`` (for ``datasets`` and
    :func:`jaxcombine.data.load_texts`); parent directories are created.

    One line per document, even for documents with newlines (JSON escapes them),
    and reading the lines back gives the documents again:

    >>> import json, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> documents = ["x = 1" + chr(10) + "y = 2" + chr(10), "print(x)" + chr(10)]
    >>> path = write_documents(Path(tmp.name) / "new" / "docs.jsonl", documents)
    >>> lines = path.read_text().splitlines()
    >>> len(lines), [json.loads(line)["text"] for line in lines] == documents
    (2, True)
    >>> tmp.cleanup()
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents))
    return path


def write_domain(directory: PathLike, package: str, **kwargs) -> tuple[Path, Path]:
    """Write :func:`domain` ``(package, **kwargs)`` as ``directory/package/train.jsonl``
    and ``directory/package/heldout.jsonl``; returns both paths.

    The files hold the domain's two splits, document by document:

    >>> import json, tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> train, heldout = write_domain(tmp.name, "json", held_out=0.2, max_chars=20_000)
    >>> [str(p.relative_to(tmp.name)) for p in (train, heldout)]
    ['json/train.jsonl', 'json/heldout.jsonl']
    >>> def texts(path):
    ...     return [json.loads(line)["text"] for line in path.read_text().splitlines()]
    >>> split = domain("json", held_out=0.2, max_chars=20_000)
    >>> texts(train) == split.train, texts(heldout) == split.held_out
    (True, True)
    >>> tmp.cleanup()
    """
    split = domain(package, **kwargs)
    out = Path(directory) / package
    return (
        write_documents(out / "train.jsonl", split.train),
        write_documents(out / "heldout.jsonl", split.held_out),
    )


def write_domains(
    directory: PathLike, packages: Sequence[str] = DEFAULT_PACKAGES, **kwargs
) -> dict[str, tuple[Path, Path]]:
    """:func:`write_domain` for each package; ``{package: (train, heldout)}``.

    >>> import tempfile, pathlib
    >>> root = pathlib.Path(tempfile.mkdtemp())
    >>> files = write_domains(root, ["email", "json"], max_chars=20_000)
    >>> [str(p.relative_to(root)) for p in files["email"]]
    ['email/train.jsonl', 'email/heldout.jsonl']
    """
    return {package: write_domain(directory, package, **kwargs) for package in packages}


def train_bpe(
    documents: Sequence[str],
    vocab_size: int = 512,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
) -> Tokenizer:
    """A byte-level BPE trained on ``documents`` (any texts, in the given order).

    The ``tokenizers`` recipe of GPT-2 without a prefix space: a ``ByteLevel``
    pre-tokenizer and decoder, ``special_tokens`` first (``<unk>`` 0, ``<eos>``
    1 by default), the 256 byte symbols, then BPE merges up to ``vocab_size``
    tokens (fewer if the text has no more pairs to merge). Deterministic: the
    same documents give the same ``tokenizer.json``. Any text round-trips
    (``decode(encode(t).ids) == t``), including characters never seen.

    From files: ``train_bpe(jaxcombine.data.load_texts("my.jsonl")["text"], 1024)``.

    >>> tokenizer = train_bpe([package_texts("json", max_chars=20_000)], vocab_size=300)
    >>> tokenizer.get_vocab_size() <= 300, tokenizer.token_to_id("<eos>")
    (True, 1)
    >>> text = "def f(x):" + chr(10) + "    return x  # café"
    >>> tokenizer.decode(tokenizer.encode(text).ids) == text
    True
    """
    special_tokens = list(special_tokens)
    minimum = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise InputError(
            f"vocab_size must be at least {minimum} (256 bytes + {len(special_tokens)} special "
            f"tokens), got {vocab_size!r}",
            where="vocab_size",
            fix=f"pass vocab_size >= {minimum}",
        )
    documents = list(documents)
    if not any(documents):
        raise InputError("no text to train a tokenizer on", where="documents")
    tokenizer = Tokenizer(models.BPE(unk_token=special_tokens[0] if special_tokens else None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer, length=len(documents))
    return tokenizer


def train_tokenizer(
    packages: Sequence[str] = DEFAULT_PACKAGES,
    vocab_size: int = 512,
    *,
    special_tokens: Sequence[str] = SPECIAL_TOKENS,
    held_out: float = 0.1,
    seed: int = 0,
    block_lines: int = 64,
    max_chars: int | None = None,
    root: PathLike | None = None,
) -> Tokenizer:
    """:func:`train_bpe` on the training documents of ``packages``.

    Only the documents :func:`domain` puts in ``train`` (same ``held_out``,
    ``seed``, ``block_lines``, ``max_chars``) are read, package by package, so
    the held-out text stays unseen. Deterministic in its arguments.

    It is :func:`train_bpe` on ``domain(...).train``, package after package; the
    held-out text still round-trips, as any text does:

    >>> tokenizer = train_tokenizer(["json"], vocab_size=300, max_chars=20_000)
    >>> split = domain("json", max_chars=20_000)
    >>> tokenizer.to_str() == train_bpe(split.train, vocab_size=300).to_str()
    True
    >>> tokenizer.decode(tokenizer.encode(split.held_out_text).ids) == split.held_out_text
    True

    Example::

        tokenizer = train_tokenizer(["json", "email"], vocab_size=512)
        tokenizer.save("tokenizer.json")
    """
    if isinstance(packages, str) or not packages:
        raise InputError(
            f"packages must be a non-empty list of package names, got {packages!r}",
            where="packages",
            fix="name at least one package, e.g. ['json']",
        )
    documents = [
        text
        for package in packages
        for text in domain(
            package, held_out=held_out, seed=seed, block_lines=block_lines,
            max_chars=max_chars, root=root,
        ).train
    ]  # fmt: skip
    return train_bpe(documents, vocab_size, special_tokens=special_tokens)


__all__ = [
    "DEFAULT_PACKAGES",
    "SPECIAL_TOKENS",
    "TEST_DIRECTORIES",
    "Domain",
    "available_packages",
    "domain",
    "held_out_mask",
    "package_documents",
    "package_files",
    "package_texts",
    "stdlib_root",
    "train_bpe",
    "train_tokenizer",
    "write_documents",
    "write_domain",
    "write_domains",
]
