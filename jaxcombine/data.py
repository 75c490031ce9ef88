"""Training data: text files -> token ids -> packed rows -> per-step batches.

Text is read with Hugging Face ``datasets`` (``load_dataset`` with the builder
chosen by the file extension), tokenised with the model's ``tokenizers.Tokenizer``
and packed GPT-style into rows of ``seq_len + 1`` tokens: documents are
concatenated (each followed by ``eos_id`` when given) and chopped into
consecutive windows, so a document may continue in the next row. A row feeds
``inputs = row[:-1]`` and ``targets = row[1:]``.

The batch at a step is a pure function of ``(seed, step)``: rows are visited
epoch by epoch in the order ``np.random.default_rng([seed, epoch]).permutation(N)``
(or, for bagging, ``N`` draws with replacement), and step ``s`` takes the next
``global_batch`` positions from ``s * global_batch``. A resumed job therefore sees
exactly the batches it would have seen, and each process materialises only its
own contiguous slice of the global batch.

Every host reads and tokenises the whole corpus (``datasets`` caches the result
on disk); only the batch rows are per host.

A corpus of two files, a word-level tokenizer built in code, rows of 3 + 1
tokens, and the batch of step 0 on a 2-device ``data`` mesh:

>>> import shutil, tempfile, jax, numpy as np
>>> from pathlib import Path
>>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
>>> from tokenizers import Tokenizer, models, pre_tokenizers
>>> from jaxcombine.data import PackedDataset, global_batch_array
>>> corpus = Path(tempfile.mkdtemp())
>>> _ = (corpus / "a.txt").write_text("the cat sat\\nthe dog sat\\n")   # one document per line
>>> _ = (corpus / "b.txt").write_text("a cat\\n")
>>> vocab = {"<eos>": 0, "the": 1, "cat": 2, "sat": 3, "dog": 4, "a": 5}
>>> tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
>>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
>>> data = PackedDataset.from_files(corpus, tokenizer, seq_len=3, eos_id=0)
>>> data.rows.tolist()              # 1 2 3 0 | 1 4 3 0 | 5 2 0 (tail dropped)
[[1, 2, 3, 0], [1, 4, 3, 0]]
>>> mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
>>> local = data.batch(0, 2, seed=0, process_index=jax.process_index(),
...                    process_count=jax.process_count())          # [2 // processes, 4]
>>> rows = global_batch_array(local, NamedSharding(mesh, P("data")))   # [2, 4] over the mesh
>>> order = np.random.default_rng([0, 0]).permutation(2)              # epoch 0 of seed 0
>>> bool(np.array_equal(rows, data.rows[order])), rows.sharding.spec
(True, P('data',))
>>> inputs, targets = rows[:, :-1], rows[:, 1:]
>>> shutil.rmtree(corpus)
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import json
import operator
import os
from collections.abc import Sequence
from pathlib import Path

import datasets
import jax
import numpy as np
from jax.sharding import NamedSharding
from tokenizers import Tokenizer

from jaxcombine.errors import InputError

# File extension -> ``datasets`` packaged builder.
BUILDERS: dict[str, str] = {
    ".txt": "text",
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".arrow": "arrow",
    ".csv": "csv",
}

# Mixed into the seed of bootstrap draws, so they use a different random
# stream from the epoch permutations.
_BOOTSTRAP_STREAM = 0x626F6F74  # "boot"

_SUPPORTED = ", ".join(BUILDERS)

PathLike = str | os.PathLike


# ----------------------------------------------------------------------------- loading


def _builder_of(path: Path) -> str:
    """The ``datasets`` builder for one file, from its extension."""
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise InputError(
            f"unknown data file extension {path.suffix or '(none)'!r}",
            where=str(path),
            fix=f"use one of the supported extensions: {_SUPPORTED}",
        )
    return builder


def _files_in_directory(directory: Path) -> list[Path]:
    """The data files of a directory: its files (recursively, hidden ones
    skipped) with a supported extension; for a ``Dataset.save_to_disk``
    directory, the arrow files its ``state.json`` lists."""
    state = directory / "state.json"
    if state.is_file() and (directory / "dataset_info.json").is_file():
        try:
            listed = json.loads(state.read_text())["_data_files"]
            return [directory / entry["filename"] for entry in listed]
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"state.json of a saved dataset does not list its files ({err!r})",
                where=str(state),
                fix="save the dataset again with Dataset.save_to_disk, or pass its .arrow files",
            ) from None
    files = sorted(
        p
        for p in directory.rglob("*")
        if p.is_file()
        and p.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in p.relative_to(directory).parts)
    )
    if not files:
        raise InputError(
            "the directory holds no data file",
            where=str(directory),
            fix=f"put files with one of the supported extensions ({_SUPPORTED}) in it",
        )
    return files


def data_files(paths: PathLike | Sequence[PathLike]) -> tuple[str, list[str]]:
    """The ``datasets`` builder name and the list of files that ``paths`` name.

    Each path is a file or a directory (all data files inside it). All files
    must use one builder (``.json`` and ``.jsonl`` mix; ``.txt`` and ``.parquet``
    do not).

    >>> import shutil, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> for name in ("b.jsonl", "a.json", ".hidden/c.json", "notes.md"):
    ...     (root / name).parent.mkdir(exist_ok=True)
    ...     _ = (root / name).write_text("")
    >>> builder, files = data_files(root)          # hidden and unknown files skipped
    >>> builder, [Path(f).name for f in files]
    ('json', ['a.json', 'b.jsonl'])
    >>> data_files([root / "a.json", root / "notes.md"])
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: .../notes.md: unknown data file extension '.md'
      How to fix: use one of the supported extensions: .txt, .json, .jsonl, .parquet, .arrow, .csv
    >>> shutil.rmtree(root)
    """
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    if not paths:
        raise InputError("no data file given", fix="pass at least one file or directory")
    files: list[Path] = []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(
                "data file does not exist",
                where=str(path),
                fix="check the path (relative paths are resolved from the current directory)",
            )
        files.extend(_files_in_directory(path) if path.is_dir() else [path])
    by_builder: dict[str, list[Path]] = {}
    for file in files:
        by_builder.setdefault(_builder_of(file), []).append(file)
    if len(by_builder) > 1:
        kinds = "; ".join(f"{b}: {', '.join(map(str, fs[:3]))}" for b, fs in by_builder.items())
        raise InputError(
            f"data files of different formats cannot be read together ({kinds})",
            where=", ".join(map(str, paths)),
            fix="convert them to one format, or pass only files with one extension",
        )
    (builder,) = by_builder
    return builder, [str(f) for f in files]


def _describe(files: Sequence[str]) -> str:
    """The first few file names, for an error's ``where``."""
    return ", ".join(files[:3]) + (f" (+{len(files) - 3} more)" if len(files) > 3 else "")


def _load_dataset(paths: PathLike | Sequence[PathLike]) -> tuple[datasets.Dataset, str]:
    """(the ``train`` split of the files in ``paths``, a description for errors)."""
    builder, files = data_files(paths)
    where = _describe(files)
    try:
        dataset = datasets.load_dataset(builder, data_files=files, split="train")
    except Exception as err:  # datasets raises many types for unreadable files
        cause = err
        while cause.__cause__ is not None:  # the innermost error says what is wrong
            cause = cause.__cause__
        raise InputError(
            f"cannot read the data files as {builder!r}: {type(cause).__name__}: {cause}",
            where=where,
            fix="check that every file is valid and that all files have the same columns",
        ) from err
    return dataset, where


def load_texts(
    paths: PathLike | Sequence[PathLike], *, text_column: str = "text"
) -> datasets.Dataset:
    """A dataset with one string column ``text``, read from ``paths``.

    ``paths`` is a file, a directory, or a list of them; the extension picks the
    ``datasets`` builder (``.txt`` -> ``text``: one document per line,
    ``.json``/``.jsonl`` -> ``json``, ``.parquet``, ``.arrow``, ``.csv``).
    ``text_column`` names the column holding the documents (``.txt`` files
    always have ``text``). Missing files, unknown extensions, mixed formats and
    a missing or non-string column raise :class:`~jaxcombine.errors.InputError`.

    >>> import json, shutil, tempfile
    >>> from pathlib import Path
    >>> root = Path(tempfile.mkdtemp())
    >>> rows = [{"content": "first doc", "id": 1}, {"content": "second doc", "id": 2}]
    >>> _ = (root / "a.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in rows))
    >>> texts = load_texts(root / "a.jsonl", text_column="content")
    >>> texts.column_names, list(texts["text"])
    (['text'], ['first doc', 'second doc'])
    >>> load_texts(root / "a.jsonl", text_column="id")
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: .../a.jsonl: column 'id' holds Value('int64'), not text
      How to fix: pass text_column= naming the column that holds the documents
    >>> shutil.rmtree(root)
    """
    dataset, where = _load_dataset(paths)
    if text_column not in dataset.column_names:
        raise InputError(
            f"no column {text_column!r}; the data has columns {dataset.column_names}",
            where=where,
            fix="pass text_column= naming the column that holds the documents",
        )
    feature = dataset.features[text_column]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise InputError(
            f"column {text_column!r} holds {feature}, not text",
            where=where,
            fix="pass text_column= naming the column that holds the documents",
        )
    dataset = dataset.select_columns([text_column])
    return dataset if text_column == "text" else dataset.rename_column(text_column, "text")


# ----------------------------------------------------------------------------- tokenising


def _check_tokenizer(tokenizer) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (a ``transformers``
    fast tokenizer is accepted through its ``backend_tokenizer``)."""
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(tokenizer, Tokenizer):
        raise InputError(
            f"expected a tokenizers.Tokenizer, got {type(tokenizer).__name__}",
            where="tokenizer",
            fix="load one with jaxcombine.hf.load_tokenizer(MODEL_DIR) "
            "or tokenizers.Tokenizer.from_file(PATH)",
        )
    return tokenizer


def _ragged_to_arrays(column) -> list[np.ndarray]:
    """A pyarrow list column (chunked) -> one int32 array per row."""
    out: list[np.ndarray] = []
    for chunk in column.chunks:
        values = chunk.flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        ends = np.cumsum(chunk.value_lengths().to_numpy(zero_copy_only=False))
        out.extend(np.split(values, ends[:-1]) if len(chunk) else [])
    return out


def tokenize(
    dataset: datasets.Dataset, tokenizer: Tokenizer, *, num_proc: int | None = None
) -> list[np.ndarray]:
    """Token ids of every document of ``dataset["text"]``, one int32 array each.

    Runs ``dataset.map(batched=True)`` over ``tokenizer.encode_batch``: the ids
    are ``tokenizer.encode(text).ids``, with exactly the special tokens the
    tokenizer's post-processor adds (none otherwise). ``num_proc`` processes
    share the work; ``datasets`` caches the result next to the data's cache.

    >>> import datasets
    >>> from tokenizers import Tokenizer, models, pre_tokenizers
    >>> tokenizer = Tokenizer(models.WordLevel({"<unk>": 0, "a": 1, "b": 2}, unk_token="<unk>"))
    >>> tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    >>> texts = datasets.Dataset.from_dict({"text": ["a b a", "", "b c"]})
    >>> ids = [row.tolist() for row in tokenize(texts, tokenizer)]
    >>> ids, ids == [tokenizer.encode(text).ids for text in texts["text"]]
    ([[1, 2, 1], [], [2, 0]], True)
    """
    tokenizer = _check_tokenizer(tokenizer)

    def encode(batch):
        texts = [text or "" for text in batch["text"]]
        return {"ids": [encoding.ids for encoding in tokenizer.encode_batch(texts)]}

    ids = dataset.map(
        encode,
        batched=True,
        remove_columns=dataset.column_names,
        features=datasets.Features({"ids": datasets.List(datasets.Value("int32"))}),
        num_proc=num_proc,
        desc="tokenizing",
    )
    return _ragged_to_arrays(ids.data.column("ids"))


# ----------------------------------------------------------------------------- packing


def _check_positive(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}", where=name) from None
    if value <= 0:
        raise InputError(f"{name} must be positive, got {value}", where=name)
    return value


def pack(sequences, seq_len: int, *, eos_id: int | None) -> np.ndarray:
    """Pack documents into rows of ``seq_len + 1`` tokens: ``[num_rows, seq_len + 1]`` int32.

    The documents are concatenated, each followed by ``eos_id`` when it is not
    None (empty documents are skipped, without an ``eos_id``), then cut into
    consecutive non-overlapping windows of ``seq_len + 1`` tokens; the
    incomplete tail is dropped. Documents cross row boundaries (GPT packing).
    Train on ``row[:-1]`` -> ``row[1:]``.

    >>> pack([[1, 2, 3], [4, 5]], seq_len=3, eos_id=0).tolist()   # 1 2 3 0 | 4 5 0 dropped
    [[1, 2, 3, 0]]
    >>> pack([[1, 2, 3], [], [4, 5, 6, 7, 8]], seq_len=2, eos_id=None).tolist()
    [[1, 2, 3], [4, 5, 6]]

    References: packing as in GPT-3 (Brown et al. 2020, Language Models are Few-Shot Learners,
    arXiv:2005.14165) and T5 (Raffel et al. 2020, Exploring the Limits of Transfer Learning with a
    Unified Text-to-Text Transformer, arXiv:1910.10683).
    """
    seq_len = _check_positive("seq_len", seq_len)
    width = seq_len + 1
    if eos_id is not None:
        eos_id = operator.index(eos_id)
        if not 0 <= eos_id < 2**31:
            raise InputError(f"eos_id must be a token id, got {eos_id}", where="eos_id")
    eos = np.array([] if eos_id is None else [eos_id], dtype=np.int32)
    pieces = []
    for sequence in sequences:
        ids = np.asarray(sequence, dtype=np.int32).reshape(-1)
        if ids.size:
            pieces += [ids, eos]
    tokens = np.concatenate(pieces) if pieces else np.zeros(0, np.int32)
    num_rows = tokens.size // width
    if num_rows < 1:
        raise InputError(
            f"the data has {tokens.size} tokens (end-of-document tokens included); "
            f"one row needs seq_len + 1 = {width}",
            where="packing",
            fix="add more text or lower seq_len",
        )
    return tokens[: num_rows * width].reshape(num_rows, width)


# ----------------------------------------------------------------------------- batch order


@functools.lru_cache(maxsize=4)
def epoch_order(num_rows: int, seed: int, epoch: int, *, bootstrap: bool = False) -> np.ndarray:
    """The row indices visited in ``epoch`` (read-only, length ``num_rows``).

    A permutation from ``np.random.default_rng([seed, epoch])``, or with
    ``bootstrap=True`` ``num_rows`` draws with replacement (bagging, Breiman
    1996) from a separate stream ``default_rng([seed, epoch, _BOOTSTRAP_STREAM])``.

    >>> import numpy as np
    >>> order = epoch_order(5, seed=0, epoch=1)
    >>> bool(np.array_equal(order, np.random.default_rng([0, 1]).permutation(5)))
    True
    >>> sorted(order.tolist()), len(epoch_order(5, 0, 1, bootstrap=True))  # bagging: repeats
    ([0, 1, 2, 3, 4], 5)
    """
    if bootstrap:
        order = np.random.default_rng([seed, epoch, _BOOTSTRAP_STREAM]).integers(
            0, num_rows, num_rows
        )
    else:
        order = np.random.default_rng([seed, epoch]).permutation(num_rows)
    order.setflags(write=False)
    return order


def sample_indices(
    num_rows: int, start: int, count: int, seed: int, *, bootstrap: bool = False
) -> np.ndarray:
    """Row indices at positions ``[start, start + count)`` of the epoch orders laid
    end to end: position ``i`` holds ``epoch_order(N, seed, i // N)[i % N]``, N = ``num_rows``.

    >>> import numpy as np
    >>> got = sample_indices(5, start=3, count=4, seed=0)         # crosses into epoch 1
    >>> want = [epoch_order(5, 0, i // 5)[i % 5] for i in range(3, 7)]
    >>> got.tolist() == [int(i) for i in want]
    True

    References: ``bootstrap=True`` (bagging): Breiman 1996, Bagging Predictors, Machine Learning
    24(2).
    """
    stop = start + count
    parts = []
    for epoch in range(start // num_rows, (stop - 1) // num_rows + 1):
        base = epoch * num_rows
        order = epoch_order(num_rows, seed, epoch, bootstrap=bootstrap)
        parts.append(order[max(start, base) - base : min(stop, base + num_rows) - base])
    return np.concatenate(parts)


def _check_non_negative(name: str, value) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}", where=name) from None
    if value < 0:
        raise InputError(f"{name} must be >= 0, got {value}", where=name)
    return value


def local_batch_size(global_batch: int, process_count: int) -> int:
    """``global_batch // process_count``, checking that it divides exactly.

    >>> local_batch_size(64, 4)
    16
    >>> local_batch_size(6, 4)
    Traceback (most recent call last):
    ...
    jaxcombine.errors.InputError: global_batch: global_batch 6 is not divisible by process_count 4
      How to fix: use a multiple of 4 for global_batch
    """
    global_batch = _check_positive("global_batch", global_batch)
    process_count = _check_positive("process_count", process_count)
    if global_batch % process_count:
        raise InputError(
            f"global_batch {global_batch} is not divisible by process_count {process_count}",
            where="global_batch",
            fix=f"use a multiple of {process_count} for global_batch",
        )
    return global_batch // process_count


def local_batch_indices(
    num_rows: int,
    step: int,
    global_batch: int,
    seed: int,
    *,
    process_index: int = 0,
    process_count: int = 1,
    bootstrap: bool = False,
) -> np.ndarray:
    """The row indices process ``process_index`` holds of the global batch at ``step``.

    The global batch is positions ``[step * global_batch, (step + 1) * global_batch)``
    of the epoch orders laid end to end (:func:`sample_indices`); process ``p``
    gets the contiguous slice ``[p * local, (p + 1) * local)`` of it,
    ``local = global_batch // process_count``.

    The processes' slices laid side by side are the global batch:

    >>> import numpy as np
    >>> parts = [local_batch_indices(5, 1, 4, 0, process_index=p, process_count=2)
    ...          for p in (0, 1)]
    >>> bool(np.array_equal(np.concatenate(parts), sample_indices(5, 1 * 4, 4, 0)))
    True
    """
    local = local_batch_size(global_batch, process_count)
    step = _check_non_negative("step", step)
    seed = _check_non_negative("seed", seed)
    process_index = _check_non_negative("process_index", process_index)
    if process_index >= process_count:
        raise InputError(
            f"process_index {process_index} is not below process_count {process_count}",
            where="process_index",
        )
    start = step * global_batch + process_index * local
    return sample_indices(num_rows, start, local, seed, bootstrap=bootstrap)


class _SeededBatches(abc.ABC):
    """``batch(step, ...)``: the examples at :func:`local_batch_indices` (subclasses
    say how to take rows with :meth:`take`)."""

    num_rows: int

    @abc.abstractmethod
    def take(self, index: np.ndarray):
        """The examples at row indices ``index``."""

    def batch(
        self,
        step: int,
        global_batch: int,
        seed: int,
        *,
        process_index: int = 0,
        process_count: int = 1,
        bootstrap: bool = False,
    ):
        """This process's examples of the batch at ``step`` (``global_batch //
        process_count`` of them).

        The global batch is positions ``[step * global_batch, (step + 1) * global_batch)``
        of the epoch orders (:func:`epoch_order`) laid end to end, so it spans
        two epochs at a boundary; process ``p`` gets the contiguous slice
        ``[p * local, (p + 1) * local)`` of it, and only those rows are read.
        A pure function of ``(seed, step)``: resuming at a step repeats it.
        """
        return self.take(
            local_batch_indices(
                self.num_rows, step, global_batch, seed,
                process_index=process_index, process_count=process_count, bootstrap=bootstrap,
            )
        )  # fmt: skip


@dataclasses.dataclass(frozen=True, eq=False)
class PackedDataset(_SeededBatches):
    """Packed token rows ``[N, seq_len + 1]`` (int32) and the batch order over them.

    Build one with :meth:`from_files` (or from ``pack(...)`` output), then ask
    for the rows of any step with :meth:`batch`.

    >>> import numpy as np
    >>> data = PackedDataset(pack([list(range(1, 21))], seq_len=3, eos_id=None))   # 5 rows
    >>> data.num_rows, data.seq_len
    (5, 3)
    >>> batch = data.batch(2, 2, seed=0)           # positions 4, 5: epochs 0 and 1
    >>> bool(np.array_equal(batch, data.rows[sample_indices(5, 4, 2, 0)]))
    True

    References: rows packed as :func:`pack` (Brown et al. 2020, arXiv:2005.14165);
    ``bootstrap=True`` batches (bagging): Breiman 1996, Bagging Predictors, Machine Learning 24(2).
    """

    rows: np.ndarray  # [N, L+1]

    def __post_init__(self):
        rows = np.asarray(self.rows)
        if rows.ndim != 2 or rows.shape[0] < 1 or rows.shape[1] < 2:
            raise InputError(
                f"rows must have shape [N >= 1, seq_len + 1 >= 2], got {rows.shape}",
                where="PackedDataset.rows",
                fix="build the rows with jaxcombine.data.pack",
            )
        rows = rows.view()
        rows.setflags(write=False)
        object.__setattr__(self, "rows", rows)

    @property
    def num_rows(self) -> int:
        """N, the number of packed rows (one epoch)."""
        return self.rows.shape[0]

    @property
    def seq_len(self) -> int:
        """L: each row holds L + 1 tokens (inputs ``row[:-1]``, targets ``row[1:]``)."""
        return self.rows.shape[1] - 1

    @classmethod
    def from_files(
        cls,
        paths: PathLike | Sequence[PathLike],
        tokenizer: Tokenizer,
        seq_len: int,
        *,
        text_column: str = "text",
        eos_id: int | None = None,
        num_proc: int | None = None,
    ) -> PackedDataset:
        """Load (:func:`load_texts`), tokenise (:func:`tokenize`) and pack
        (:func:`pack`) the documents in ``paths``. Arguments are checked
        before any file is read."""
        tokenizer = _check_tokenizer(tokenizer)
        seq_len = _check_positive("seq_len", seq_len)
        if eos_id is not None:
            vocab = tokenizer.get_vocab_size()
            if not 0 <= operator.index(eos_id) < vocab:
                raise InputError(
                    f"eos_id {eos_id} is outside the tokenizer's vocabulary of {vocab}",
                    where="eos_id",
                    fix="pass tokenizer.token_to_id('<end-of-document token>')",
                )
        texts = load_texts(paths, text_column=text_column)
        sequences = tokenize(texts, tokenizer, num_proc=num_proc)
        try:
            return cls(pack(sequences, seq_len, eos_id=eos_id))
        except InputError as err:  # too little text: say which files
            _, files = data_files(paths)
            raise InputError(err.message, where=_describe(files), fix=err.fix) from None

    def take(self, index: np.ndarray) -> np.ndarray:
        """Rows ``[len(index), L + 1]``: :meth:`batch` returns these for its step."""
        return self.rows[index]


@dataclasses.dataclass(frozen=True, eq=False)
class TableDataset(_SeededBatches):
    """Examples for a classifier: ``features`` [N, F] (float32) and ``labels`` [N] (int32),
    batched in the same seeded order as :class:`PackedDataset`.

    From files: ``TableDataset.from_files("points.csv", features=["x0", "x1"],
    label="label")``.

    >>> import numpy as np
    >>> data = TableDataset(np.arange(8.0).reshape(4, 2), np.array([0, 1, 1, 0]))
    >>> batch = data.batch(0, 2, seed=0)            # {"x": [2, 2], "y": [2]}
    >>> rows = np.random.default_rng([0, 0]).permutation(4)[:2]
    >>> bool(np.array_equal(batch["x"], data.features[rows]))
    True
    >>> batch["y"].tolist() == data.labels[rows].tolist()
    True
    """

    features: np.ndarray  # [N, F] float32
    labels: np.ndarray  # [N] int32

    def __post_init__(self):
        features = np.asarray(self.features, np.float32)
        labels = np.asarray(self.labels)
        if features.ndim != 2 or labels.shape != features.shape[:1] or not len(labels):
            raise InputError(
                f"need features [N, F] and labels [N] with N >= 1, got {features.shape} "
                f"and {labels.shape}",
                where="TableDataset",
            )
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(
                "labels must be non-negative integers (class indices)",
                where="TableDataset.labels",
                fix="map the classes to 0..C-1",
            )
        for name, value in (("features", features), ("labels", labels.astype(np.int32))):
            value = value.view()
            value.setflags(write=False)
            object.__setattr__(self, name, value)

    @property
    def num_rows(self) -> int:
        """N, the number of examples (one epoch)."""
        return self.labels.shape[0]

    @property
    def num_features(self) -> int:
        """F, the width of a feature vector."""
        return self.features.shape[1]

    @classmethod
    def from_files(
        cls,
        paths: PathLike | Sequence[PathLike],
        *,
        features: str | Sequence[str],
        label: str = "label",
    ) -> TableDataset:
        """Read a table with ``datasets`` (csv, JSON lines, parquet, arrow, ...).

        ``features`` names one column of fixed-length numeric lists, or several
        numeric columns (concatenated in that order); ``label`` the column of
        integer classes. A missing column or a non-numeric one is an
        :class:`~jaxcombine.errors.InputError` naming it.

        >>> import shutil, tempfile
        >>> from pathlib import Path
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "points.csv").write_text("x0,x1,label\\n0.5,1.0,1\\n-2.0,0.0,0\\n")
        >>> data = TableDataset.from_files(root, features=["x1", "x0"], label="label")
        >>> data.features.tolist(), data.labels.tolist()          # columns in the order named
        ([[1.0, 0.5], [0.0, -2.0]], [1, 0])
        >>> shutil.rmtree(root)
        """
        dataset, where = _load_dataset(paths)
        names = [features] if isinstance(features, str) else list(features)
        if not names:
            raise InputError("no feature columns given", where="features")
        for name in (*names, label):
            if name not in dataset.column_names:
                raise InputError(
                    f"no column {name!r}; the data has columns {dataset.column_names}",
                    where=where,
                    fix="name the feature and label columns of the table",
                )
        table = dataset.with_format("numpy")
        try:
            columns = [np.asarray(table[name], np.float32) for name in names]
            labels = np.asarray(table[label])
        except (ValueError, TypeError) as err:
            raise InputError(
                f"the feature columns {names} are not numeric (or not of one length): {err}",
                where=where,
            ) from None
        columns = [c.reshape(len(c), -1) for c in columns]
        if not np.issubdtype(labels.dtype, np.integer):
            raise InputError(
                f"column {label!r} holds {labels.dtype}, not integer classes",
                where=where,
                fix="store the classes as integers 0..C-1",
            )
        return cls(np.concatenate(columns, axis=1), labels)

    def take(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """``{"x": [len(index), F], "y": [len(index)]}``: :meth:`batch` returns these."""
        return {"x": self.features[index], "y": self.labels[index]}


# ----------------------------------------------------------------------------- devices


def global_batch_array(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """One global ``jax.Array`` from every process's ``local_rows``.

    ``sharding`` splits the batch (first) dimension over the ``"data"`` mesh
    axis, e.g. ``NamedSharding(mesh, P("data"))``; each process passes only its
    own rows (from :meth:`PackedDataset.batch`), which land on its addressable
    devices, in process order. Uses ``jax.make_array_from_process_local_data``.

    In one process, the local rows are the whole batch:

    >>> import jax, numpy as np
    >>> from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    >>> mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
    >>> rows = global_batch_array(np.arange(8).reshape(4, 2), NamedSharding(mesh, P("data")))
    >>> rows.shape, [shard.data.tolist() for shard in rows.addressable_shards][:2]
    ((4, 2), [[[0, 1]], [[2, 3]]])
    """
    return jax.make_array_from_process_local_data(sharding, np.asarray(local_rows))


__all__ = [
    "BUILDERS",
    "PackedDataset",
    "TableDataset",
    "data_files",
    "epoch_order",
    "global_batch_array",
    "load_texts",
    "local_batch_indices",
    "local_batch_size",
    "pack",
    "sample_indices",
    "tokenize",
]
