"""Algorithmic tasks as text, a character-level tokenizer and an exact-match scorer.

Every example is a prompt and an answer in one compact character format: a
task letter, the operands (decimal digits, ``+`` between two operands), ``=``;
the answer is the result followed by the end marker ``;``::

    task        prompt       answer    the answer is
    copy        C3917=       3917;     the digits
    reverse     R3917=       7193;     the digits reversed
    sort        S3917=       1379;     the digits in ascending order
    add         A12+345=     357;      the decimal sum (no leading zeros)
    increment   I199=        200;      the number plus one

The letter names the task, so one model learns several tasks (a base on a
mix, fine-tuned per task: the task vectors of task arithmetic). A training
line is ``prompt + answer`` (``"R3917=7193;"``); packing
(:func:`jaxcombine.data.pack`) adds ``<eos>`` after each line when the job's
``data.eos_token`` is ``"<eos>"``. Copy, reverse and sort operands are digit
strings (leading zeros allowed); add and increment operands are numbers
(no leading zeros). ``min_len``/``max_len`` bound the digits of each operand;
each operand's length is drawn uniformly from that range.

:func:`char_tokenizer` maps every character to one token (``<pad>`` = 0,
``<eos>`` = 1, ``<unk>`` = 2, then ``+ 0-9 ; = A C I R S``: 21 tokens);
it is a ``tokenizers.Tokenizer`` (saved as ``tokenizer.json``, read by
``train.lm``'s ``data.tokenizer``) and decoding inverts encoding exactly.

Scoring is exact match of the generated answer, end marker included:
:func:`task_accuracy` takes any ``generate_fn(prompt_ids_list, max_new_tokens)
-> list of token id lists``; :func:`decoder_generate_fn` makes one from a
decoder or an ensemble (greedy :func:`jaxcombine.decoding.generate`).

Example::

    from jaxcombine.tour import tasks

    train, test = tasks.split("reverse", n_train=2000, n_test=200, seed=0, max_len=5)
    tasks.write_examples("data/reverse.txt", train)      # one "R3917=7193;" per line
    tokenizer = tasks.char_tokenizer()
    tokenizer.save("data/tokenizer.json")
    # ... python -m train.lm with data.files=[data/reverse.txt], data.eos_token="<eos>"
    model = jaxcombine.hf.load_model("runs/reverse/model")
    tasks.task_accuracy(tasks.decoder_generate_fn(model), test, tokenizer)   # 0.0 .. 1.0
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import zlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxcombine.errors import InputError, closest

PAD = "<pad>"
EOS = "<eos>"
UNK = "<unk>"
SPECIAL_TOKENS = (PAD, EOS, UNK)
END = ";"  # ends every answer
EQUALS = "="  # ends every prompt
PLUS = "+"  # between two operands
DIGITS = "0123456789"

GenerateFn = Callable[[list[list[int]], int], list[list[int]]]


@dataclasses.dataclass(frozen=True)
class Task:
    """One task: its ``name``, its prompt letter ``prefix``, the kind of each
    operand (``"digits"``: any digit string; ``"number"``: no leading zeros)
    and ``solve(operands) -> result`` (the answer without the end marker).

    >>> add = TASKS["add"]
    >>> add.prompt(["12", "345"]), add.answer(["12", "345"])          # 12 + 345 = 357
    ('A12+345=', '357;')
    >>> double = Task("double", "D", ("number",), lambda o: str(2 * int(o[0])), "2 n")
    >>> double.prompt(["21"]) + double.answer(["21"])
    'D21=42;'
    """

    name: str
    prefix: str
    operands: tuple[str, ...]
    solve: Callable[[tuple[str, ...]], str]
    description: str

    def prompt(self, operands: Sequence[str]) -> str:
        """``prefix + "+".join(operands) + "="``."""
        return self.prefix + PLUS.join(operands) + EQUALS

    def answer(self, operands: Sequence[str]) -> str:
        """``solve(operands) + ";"``."""
        return self.solve(tuple(operands)) + END


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("copy", "C", ("digits",), lambda o: o[0], "the digits, unchanged"),
        Task("reverse", "R", ("digits",), lambda o: o[0][::-1], "the digits reversed"),
        Task("sort", "S", ("digits",), lambda o: "".join(sorted(o[0])), "the digits sorted"),
        Task("add", "A", ("number", "number"), lambda o: str(int(o[0]) + int(o[1])), "a + b"),
        Task("increment", "I", ("number",), lambda o: str(int(o[0]) + 1), "n + 1"),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)

# Every character of every task, in a fixed order (ASCII): the tokenizer's
# non-special vocabulary.
ALPHABET: str = "".join(
    sorted(set(DIGITS + END + EQUALS + PLUS + "".join(t.prefix for t in TASKS.values())))
)
VOCAB: dict[str, int] = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *ALPHABET))}
PAD_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)
END_ID = VOCAB[END]

# Above this many distinct prompts, the split never enumerates them all.
_MAX_ENUMERATE = 2_000_000


@dataclasses.dataclass(frozen=True)
class Example:
    """One example: ``prompt`` (``"R3917="``), ``answer`` (``"7193;"``) and ``task``.

    >>> example = Example("reverse", "R3917=", "7193;")
    >>> example.text
    'R3917=7193;'
    >>> example.answer == get_task(example.task).answer(["3917"])
    True
    """

    task: str
    prompt: str
    answer: str

    @property
    def text(self) -> str:
        """The training line: ``prompt + answer`` (``"R3917=7193;"``)."""
        return self.prompt + self.answer


# ----------------------------------------------------------------------------- generation


def get_task(name: str) -> Task:
    """The task called ``name``; an :class:`InputError` naming the valid ones otherwise.

    >>> task = get_task("reverse")
    >>> task.prompt(["3917"]), task.answer(["3917"])
    ('R3917=', '7193;')
    """
    if not isinstance(name, str) or name not in TASKS:
        raise InputError(
            f"unknown task {name!r}",
            where="task",
            fix=closest(str(name), TASKS) + f" (tasks: {', '.join(TASK_NAMES)})",
        )
    return TASKS[name]


def _check_lengths(min_len: int, max_len: int) -> None:
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 1 <= min_len <= max_len):
        raise InputError(
            f"need integers 1 <= min_len <= max_len, got min_len={min_len!r}, max_len={max_len!r}",
            where="min_len/max_len",
            fix="give the shortest and longest operand length in digits, e.g. 2 and 5",
        )


def _check_count(name: str, value) -> int:
    if not isinstance(value, int | np.integer) or value < 0:
        raise InputError(f"{name} must be an integer >= 0, got {value!r}", where=name)
    return int(value)


def _strings_of_length(kind: str, length: int) -> int:
    """How many operands of ``kind`` have ``length`` digits."""
    if kind == "digits" or length == 1:
        return 10**length
    return 9 * 10 ** (length - 1)


def count_prompts(task: str, min_len: int = 2, max_len: int = 5) -> int:
    """How many distinct prompts ``task`` has with operands of ``min_len..max_len`` digits.

    >>> count_prompts("copy", 1, 2)  # 10 one-digit + 100 two-digit strings
    110
    >>> count_prompts("add", 1, 1)  # a + b with a, b in 0..9
    100
    >>> count_prompts("increment", 2, 2)  # 10..99: no leading zeros
    90
    """
    spec = get_task(task)
    _check_lengths(min_len, max_len)
    total = 1
    for kind in spec.operands:
        total *= sum(_strings_of_length(kind, n) for n in range(min_len, max_len + 1))
    return total


def _stream(task: str, seed: int, purpose: int) -> np.random.Generator:
    """The random stream of ``(task, seed, purpose)``: tasks drawn with one seed
    are independent, and each purpose (examples, test split, train split) has its own."""
    if not isinstance(seed, int | np.integer) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}", where="seed")
    return np.random.default_rng([int(seed), zlib.crc32(task.encode()), purpose])


def _draw_operands(spec: Task, rng: np.random.Generator, min_len: int, max_len: int):
    operands = []
    for kind in spec.operands:
        length = int(rng.integers(min_len, max_len + 1))
        digits = rng.integers(0, 10, size=length)
        if kind == "number" and length > 1:
            digits[0] = rng.integers(1, 10)
        operands.append("".join(DIGITS[d] for d in digits))
    return tuple(operands)


def _example(spec: Task, operands: Sequence[str]) -> Example:
    return Example(spec.name, spec.prompt(operands), spec.answer(operands))


def generate_examples(
    task: str, count: int, seed: int = 0, min_len: int = 2, max_len: int = 5
) -> list[Example]:
    """``count`` independent examples of ``task`` (repeats possible), a pure function
    of the arguments. Each operand has ``min_len..max_len`` digits (uniform length,
    then uniform digits).

    >>> examples = generate_examples("sort", 3, seed=0)
    >>> all(e.answer == "".join(sorted(e.prompt[1:-1])) + ";" for e in examples)
    True
    >>> generate_examples("sort", 3, seed=0) == examples  # a pure function
    True
    """
    spec = get_task(task)
    count = _check_count("count", count)
    _check_lengths(min_len, max_len)
    rng = _stream(task, seed, 0)
    return [_example(spec, _draw_operands(spec, rng, min_len, max_len)) for _ in range(count)]


def _all_operands(spec: Task, min_len: int, max_len: int) -> list[tuple[str, ...]]:
    """Every operand tuple, in a fixed order."""

    def strings(kind):
        for length in range(min_len, max_len + 1):
            for digits in itertools.product(DIGITS, repeat=length):
                if kind == "number" and length > 1 and digits[0] == "0":
                    continue
                yield "".join(digits)

    return list(itertools.product(*(list(strings(kind)) for kind in spec.operands)))


def _unique_examples(
    spec: Task, count: int, rng: np.random.Generator, min_len: int, max_len: int, exclude
) -> list[Example]:
    """``count`` examples with distinct prompts, none in ``exclude``: drawn as in
    :func:`generate_examples` with repeats rejected. When that would be slow
    (more than half of the prompts are wanted, or the draws stall), a random
    choice among all the unused prompts (uniform over prompts) completes them."""
    space = count_prompts(spec.name, min_len, max_len)
    chosen: dict[str, Example] = {}
    budget = 0 if 2 * (count + len(exclude)) > space else 20 * count + 1000
    while len(chosen) < count and budget > 0:
        budget -= 1
        example = _example(spec, _draw_operands(spec, rng, min_len, max_len))
        if example.prompt not in exclude:
            chosen.setdefault(example.prompt, example)
    if len(chosen) < count:
        if space > _MAX_ENUMERATE:
            raise InputError(
                f"could not draw {count} distinct prompts of task {spec.name!r}",
                where=f"split({spec.name!r})",
                fix="ask for fewer examples or allow longer operands (max_len)",
            )
        unused = [
            example
            for example in (_example(spec, o) for o in _all_operands(spec, min_len, max_len))
            if example.prompt not in exclude and example.prompt not in chosen
        ]
        for i in rng.permutation(len(unused))[: count - len(chosen)]:
            chosen[unused[i].prompt] = unused[i]
    return list(chosen.values())


def split(
    task: str,
    n_train: int,
    n_test: int,
    seed: int = 0,
    min_len: int = 2,
    max_len: int = 5,
) -> tuple[list[Example], list[Example]]:
    """``(train, test)``: ``n_train`` and ``n_test`` examples of ``task`` with distinct
    prompts, no test prompt in train. A pure function of the arguments.

    The test examples come from their own random stream, so they do not depend
    on ``n_train`` (a quick run and a full one score on the same test set); the
    train examples come from another stream, skipping the test prompts. An
    :class:`InputError` if the task has fewer than ``n_train + n_test`` prompts
    of these lengths (:func:`count_prompts`).

    >>> train, test = split("add", 5000, 500, seed=0, min_len=1, max_len=3)
    >>> len(train), len(test), {e.prompt for e in train}.isdisjoint(e.prompt for e in test)
    (5000, 500, True)
    >>> split("add", 100, 500, seed=0, min_len=1, max_len=3)[1] == test  # same test set
    True
    """
    spec = get_task(task)
    n_train, n_test = _check_count("n_train", n_train), _check_count("n_test", n_test)
    available = count_prompts(task, min_len, max_len)
    if n_train + n_test > available:
        raise InputError(
            f"task {task!r} has only {available} distinct prompts with operands of "
            f"{min_len}..{max_len} digits; {n_train} + {n_test} were asked for",
            where=f"split({task!r})",
            fix="ask for fewer examples or allow longer operands (max_len)",
        )
    if 2 * (n_train + n_test) > available > _MAX_ENUMERATE:
        raise InputError(
            f"{n_train + n_test} distinct prompts of {available} is too large a share to draw",
            where=f"split({task!r})",
            fix="ask for at most half of the prompts, or allow longer operands",
        )
    test = _unique_examples(spec, n_test, _stream(task, seed, 1), min_len, max_len, set())
    excluded = {e.prompt for e in test}
    train = _unique_examples(spec, n_train, _stream(task, seed, 2), min_len, max_len, excluded)
    return train, test


def mix(example_lists: Iterable[Sequence[Example]], seed: int = 0) -> list[Example]:
    """The examples of all lists in one random order (a pure function of ``seed``):
    the training set of a base model on several tasks.

    >>> base_train = mix([split(t, 1000, 100)[0] for t in ("copy", "reverse", "sort")])
    >>> len(base_train), sorted({e.task for e in base_train[:50]})
    (3000, ['copy', 'reverse', 'sort'])
    """
    examples = [e for examples in example_lists for e in examples]
    order = np.random.default_rng([_check_count("seed", seed), 0x6D6978]).permutation(len(examples))
    return [examples[i] for i in order]


# ----------------------------------------------------------------------------- tokenizer


def char_tokenizer() -> Tokenizer:
    """The character-level tokenizer of every task: one token per character.

    A ``tokenizers`` ``WordLevel`` model over :data:`VOCAB` (``<pad>`` 0, ``<eos>``
    1, ``<unk>`` 2, then each character of :data:`ALPHABET`), a pre-tokenizer
    that isolates every character (``Split(Regex("."), "isolated")``) and a
    ``Fuse`` decoder, so ``decode(encode(text).ids) == text`` for any text over
    the alphabet. The special tokens are registered (``"<eos>"`` in a text is
    one token; ``decode`` drops them by default); there is no post-processor,
    so encoding adds nothing. Another character encodes as ``<unk>``. Save it
    with ``tokenizer.save("tokenizer.json")``.

    >>> tokenizer = char_tokenizer()
    >>> tokenizer.encode("R391=").tokens
    ['R', '3', '9', '1', '=']
    >>> tokenizer.decode(tokenizer.encode("R391=193;").ids)
    'R391=193;'
    """
    tokenizer = Tokenizer(models.WordLevel(dict(VOCAB), unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


# ----------------------------------------------------------------------------- files


def training_lines(examples: Iterable[Example]) -> list[str]:
    """One training text per example: ``prompt + answer`` (``"R3917=7193;"``).

    The end-of-document token is not part of the text: ``train.lm`` adds it
    after every line when ``data.eos_token: "<eos>"`` (see :func:`jaxcombine.data.pack`).

    >>> training_lines([Example("reverse", "R3917=", "7193;")])
    ['R3917=7193;']
    """
    return [e.text for e in examples]


def write_examples(path: str | os.PathLike, examples: Iterable[Example]) -> Path:
    """Write ``examples`` for ``datasets`` (and :func:`jaxcombine.data.load_texts`).

    ``.txt``: one training line per example. ``.jsonl``: one JSON object per
    line with ``text`` (the training line), ``task``, ``prompt`` and ``answer``
    (read back with :func:`read_examples`; ``load_texts`` keeps ``text``).
    Parent directories are created. Returns the path.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "sort.jsonl"
    >>> examples = generate_examples("sort", 4, seed=1)
    >>> read_examples(write_examples(path, examples)) == examples
    True
    """
    path = Path(path)
    suffix = path.suffix.lower()
    examples = list(examples)
    if suffix == ".txt":
        body = "".join(line + "\n" for line in training_lines(examples))
    elif suffix == ".jsonl":
        body = "".join(
            json.dumps({"text": e.text, **dataclasses.asdict(e)}) + "\n" for e in examples
        )
    else:
        raise InputError(
            f"unsupported example file extension {path.suffix or '(none)'!r}",
            where=str(path),
            fix="use .txt (training lines) or .jsonl (text, task, prompt, answer)",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(body)
    return path


def read_examples(path: str | os.PathLike) -> list[Example]:
    """The examples of a ``.jsonl`` file written by :func:`write_examples`.

    A file written by hand in that format (one JSON object per line; ``text`` is
    not read, blank lines are skipped):

    >>> import tempfile
    >>> tmp = tempfile.TemporaryDirectory()
    >>> path = Path(tmp.name) / "copy.jsonl"
    >>> _ = path.write_text('{"task": "copy", "prompt": "C12=", "answer": "12;"}' + chr(10)
    ...                     + chr(10) + '{"task": "add", "prompt": "A1+2=", "answer": "3;"}')
    >>> read_examples(path) == [Example("copy", "C12=", "12;"), Example("add", "A1+2=", "3;")]
    True
    >>> tmp.cleanup()
    """
    path = Path(path)
    if not path.is_file():
        raise InputError("example file does not exist", where=str(path))
    examples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            examples.append(Example(row["task"], row["prompt"], row["answer"]))
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(
                f"line is not an example ({err!r})",
                where=f"{path}:{number}",
                fix="write the file with jaxcombine.tour.tasks.write_examples(... .jsonl)",
            ) from None
    return examples


# ----------------------------------------------------------------------------- scoring


def exact_match(predictions: Sequence[str], answers: Sequence[str]) -> float:
    """The fraction of positions where the prediction equals the answer exactly
    (string equality: no stripping, the end marker counts).

    >>> exact_match(["12;", "3"], ["12;", "3;"])
    0.5
    """
    if len(predictions) != len(answers):
        raise InputError(
            f"{len(predictions)} predictions for {len(answers)} answers",
            where="exact_match",
            fix="pass one prediction per answer",
        )
    if not answers:
        raise InputError("no answers to score", where="exact_match", fix="pass some examples")
    return sum(p == a for p, a in zip(predictions, answers, strict=True)) / len(answers)


def _special_ids(tokenizer: Tokenizer) -> set[int]:
    return {i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}


def answer_text(ids: Sequence[int], tokenizer: Tokenizer) -> str:
    """The answer in generated ``ids``: the tokens before the first special token
    (``<eos>``, ``<pad>``), decoded, cut after the first end marker ``;``.

    Without an end marker the text is returned whole (and matches no answer).

    >>> tokenizer = char_tokenizer()
    >>> answer_text(tokenizer.encode("7193;12<eos>3").ids, tokenizer)
    '7193;'
    >>> answer_text(tokenizer.encode("71<eos>93;").ids, tokenizer)
    '71'
    """
    special = _special_ids(tokenizer)
    kept = list(itertools.takewhile(lambda i: int(i) not in special, ids))
    text = tokenizer.decode([int(i) for i in kept], skip_special_tokens=False)
    end = text.find(END)
    return text if end < 0 else text[: end + 1]


def predict(
    generate_fn: GenerateFn, prompts: Sequence[str], tokenizer: Tokenizer, max_new_tokens: int
) -> list[str]:
    """The answer (:func:`answer_text`) ``generate_fn`` gives to each prompt, which
    is encoded with ``tokenizer.encode(prompt).ids``.

    A ``generate_fn`` that writes a prompt's digits reversed, then ``;`` and more
    tokens: the answers are cut after the end marker:

    >>> tokenizer = char_tokenizer()
    >>> def reverser(prompts, max_new_tokens):      # prompt ids: letter, digits, "="
    ...     return [(p[1:-1][::-1] + [END_ID] + p[1:-1])[:max_new_tokens] for p in prompts]
    >>> predict(reverser, ["R3917=", "R12="], tokenizer, max_new_tokens=6)
    ['7193;', '21;']
    >>> predict(reverser, ["R3917="], tokenizer, max_new_tokens=3)    # cut before the ";"
    ['719']
    """
    ids = [tokenizer.encode(prompt).ids for prompt in prompts]
    outputs = generate_fn(ids, max_new_tokens)
    if len(outputs) != len(ids):
        raise InputError(
            f"generate_fn returned {len(outputs)} outputs for {len(ids)} prompts",
            where="generate_fn",
            fix="return one list of new token ids per prompt",
        )
    return [answer_text(out, tokenizer) for out in outputs]


def task_accuracy(
    generate_fn: GenerateFn,
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int | None = None,
) -> float:
    """Exact-match accuracy of ``generate_fn`` on ``examples`` (0.0 .. 1.0).

    ``generate_fn(prompt_ids_list, max_new_tokens)`` returns the new token ids
    of each prompt (for example :func:`decoder_generate_fn`). An answer is
    right when the generated text up to the end marker, the marker included,
    equals the answer. ``max_new_tokens`` defaults to the longest answer's
    token count.

    With a model: ``task_accuracy(decoder_generate_fn(model), test, char_tokenizer())``.
    With an oracle that knows every answer, and one that always says ``0;``:

    >>> tokenizer = char_tokenizer()
    >>> test = generate_examples("reverse", 8, seed=0)
    >>> answer_ids = {tuple(tokenizer.encode(e.prompt).ids): tokenizer.encode(e.answer).ids
    ...               for e in test}
    >>> task_accuracy(lambda prompts, n: [answer_ids[tuple(p)] for p in prompts], test, tokenizer)
    1.0
    >>> task_accuracy(lambda prompts, n: [tokenizer.encode("0;").ids] * len(prompts), test,
    ...               tokenizer)
    0.0
    """
    if not examples:
        raise InputError("no examples to score", where="task_accuracy")
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(e.answer).ids) for e in examples)
    predictions = predict(generate_fn, [e.prompt for e in examples], tokenizer, max_new_tokens)
    return exact_match(predictions, [e.answer for e in examples])


def accuracy_by_task(
    generate_fn: GenerateFn,
    examples: Sequence[Example],
    tokenizer: Tokenizer,
    *,
    max_new_tokens: int | None = None,
) -> dict[str, float]:
    """:func:`task_accuracy` of each task among ``examples`` (in first-seen order).

    A ``generate_fn`` that copies the prompt's digits is right on every copy
    example and on a reverse example only when its digits read the same both ways:

    >>> tokenizer = char_tokenizer()
    >>> examples = [Example("copy", "C12=", "12;"), Example("reverse", "R12=", "21;"),
    ...             Example("reverse", "R33=", "33;"), Example("copy", "C905=", "905;")]
    >>> copier = lambda prompts, n: [p[1:-1] + [END_ID] for p in prompts]
    >>> accuracy_by_task(copier, examples, tokenizer)       # reverse: R33 right, R12 wrong
    {'copy': 1.0, 'reverse': 0.5}
    """
    groups: dict[str, list[Example]] = {}
    for example in examples:
        groups.setdefault(example.task, []).append(example)
    return {
        task: task_accuracy(generate_fn, group, tokenizer, max_new_tokens=max_new_tokens)
        for task, group in groups.items()
    }


def decoder_generate_fn(
    model,
    *,
    stop_ids: Sequence[int] = (END_ID, EOS_ID),
    pad_id: int = PAD_ID,
    batch_size: int = 256,
) -> GenerateFn:
    """A ``generate_fn`` for :func:`task_accuracy` from a decoder or any
    :class:`~jaxcombine.decoding.Decodable` (an ensemble): greedy
    :func:`jaxcombine.decoding.generate` in batches of at most ``batch_size``
    prompts, each row stopping after a token in ``stop_ids`` (by default the end
    marker ``;`` and ``<eos>`` of :func:`char_tokenizer`; pass another
    tokenizer's ids for other models).

    Every batch has the same number of rows (the last one is filled with
    copies of a prompt, whose outputs are dropped), so one compiled program
    serves all batches of a prompt-length bucket.

    Example::

        generate_fn = decoder_generate_fn(model)
        generate_fn([[19, 7, 6, 15]], 3)     # "R32=" -> [[6, 7, 14]] ("23;") when learnt

    On an untrained tiny decoder, three prompts in batches of two (the second
    filled with a copy): with no stop token every row runs to ``max_new_tokens``;
    with a stop token, each row is that output cut after the token's first
    occurrence:

    >>> from flax import nnx
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=len(VOCAB), hidden_size=8, intermediate_size=16,
    ...                        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
    >>> model = Decoder(config, rngs=nnx.Rngs(5))
    >>> tokenizer = char_tokenizer()
    >>> prompts = [tokenizer.encode(p).ids for p in ["R32=", "C905=", "S71="]]
    >>> free = decoder_generate_fn(model, stop_ids=(), batch_size=2)(prompts, 4)
    >>> [len(row) for row in free]
    [4, 4, 4]
    >>> stop = free[0][2]                                  # the first row's third token
    >>> cut = decoder_generate_fn(model, stop_ids=[stop], batch_size=2)(prompts, 4)
    >>> cut == [row[: row.index(stop) + 1] if stop in row else row for row in free]
    True
    """
    from jaxcombine.decoding import generate

    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}", where="batch_size")
    stop_ids = tuple(int(i) for i in stop_ids)

    def generate_fn(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        prompts = [list(p) for p in prompts]
        if not prompts:
            return []
        rows = min(batch_size, len(prompts))
        out: list[list[int]] = []
        for start in range(0, len(prompts), rows):
            chunk = prompts[start : start + rows]
            filled = chunk + [chunk[0]] * (rows - len(chunk))
            new = generate(
                model,
                filled,
                max_new_tokens=max_new_tokens,
                eos_token_ids=stop_ids,
                pad_token_id=pad_id,
            )
            out.extend(new[: len(chunk)])
        return out

    return generate_fn


__all__ = [
    "ALPHABET",
    "END",
    "END_ID",
    "EOS",
    "EOS_ID",
    "PAD",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "TASKS",
    "TASK_NAMES",
    "UNK",
    "UNK_ID",
    "VOCAB",
    "Example",
    "Task",
    "accuracy_by_task",
    "answer_text",
    "char_tokenizer",
    "count_prompts",
    "decoder_generate_fn",
    "exact_match",
    "generate_examples",
    "get_task",
    "mix",
    "predict",
    "read_examples",
    "split",
    "task_accuracy",
    "training_lines",
    "write_examples",
]
