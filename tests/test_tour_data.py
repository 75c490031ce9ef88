"""The tour's data: algorithmic tasks (jaxcombine.tour.tasks) and the stdlib corpus
by package (jaxcombine.tour.corpus).

Answers are checked against independent Python one-liners, splits for
disjointness and determinism, both tokenizers for exact round trips, and one
end-to-end test trains a tiny decoder with ``train.lm`` on the copy task and
scores it on held-out prompts.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from tokenizers import Tokenizer

from jaxcombine.data import PackedDataset, load_texts
from jaxcombine.errors import InputError
from jaxcombine.tour import corpus, tasks

# Independent reference answers, from the prompt alone (task letter, operands).
REFERENCE = {
    "C": lambda ops: ops[0],
    "R": lambda ops: ops[0][::-1],
    "S": lambda ops: "".join(sorted(ops[0])),
    "A": lambda ops: str(int(ops[0]) + int(ops[1])),
    "I": lambda ops: str(int(ops[0]) + 1),
}
PROMPT = re.compile(r"^([CRSAI])(\d+)(?:\+(\d+))?=$")


def parse(prompt: str) -> tuple[str, list[str]]:
    match = PROMPT.match(prompt)
    assert match, prompt
    return match.group(1), [g for g in match.groups()[1:] if g is not None]


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_answers_match_python(task):
    examples = tasks.generate_examples(task, 1000, seed=5, min_len=1, max_len=6)
    lengths = set()
    for e in examples:
        assert e.task == task
        letter, operands = parse(e.prompt)
        assert letter == tasks.TASKS[task].prefix
        assert len(operands) == len(tasks.TASKS[task].operands)
        assert e.answer == REFERENCE[letter](operands) + ";"
        assert re.fullmatch(r"\d+;", e.answer)
        assert e.text == e.prompt + e.answer
        for op, kind in zip(operands, tasks.TASKS[task].operands, strict=True):
            assert 1 <= len(op) <= 6
            if kind == "number":
                assert op == str(int(op))  # no leading zeros
            lengths.add(len(op))
    assert lengths == set(range(1, 7))


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_examples_deterministic_in_seed(task):
    first = tasks.generate_examples(task, 200, seed=1)
    assert first == tasks.generate_examples(task, 200, seed=1)
    assert first != tasks.generate_examples(task, 200, seed=2)
    assert tasks.generate_examples(task, 50, seed=1) == first[:50]  # a prefix of the stream
    assert tasks.generate_examples(task, 0, seed=1) == []


def test_leading_zeros_only_in_digit_strings():
    copies = tasks.generate_examples("copy", 2000, seed=0, min_len=3, max_len=3)
    assert any(parse(e.prompt)[1][0].startswith("0") for e in copies)
    sums = tasks.generate_examples("add", 2000, seed=0, min_len=1, max_len=3)
    assert {parse(e.prompt)[1][0] for e in sums} >= {"0", "7"}  # 0 is a 1-digit number


@pytest.mark.parametrize(
    "task, lo, hi, count",
    [("copy", 1, 2, 110), ("sort", 2, 3, 1100), ("add", 1, 2, 100**2), ("increment", 1, 3, 1000)],
)
def test_count_prompts_is_exhaustive(task, lo, hi, count):
    assert tasks.count_prompts(task, lo, hi) == count
    # a split asking for every prompt gets every prompt, each once
    train, test = tasks.split(task, count - 10, 10, seed=0, min_len=lo, max_len=hi)
    prompts = [e.prompt for e in train + test]
    assert len(set(prompts)) == count == len(prompts)


@pytest.mark.parametrize("task", tasks.TASK_NAMES)
def test_split_disjoint_and_deterministic(task):
    train, test = tasks.split(task, 800, 100, seed=3, min_len=1, max_len=4)
    assert (len(train), len(test)) == (800, 100)
    train_prompts = [e.prompt for e in train]
    test_prompts = [e.prompt for e in test]
    assert len(set(train_prompts)) == 800 and len(set(test_prompts)) == 100
    assert set(train_prompts).isdisjoint(test_prompts)
    assert (train, test) == tasks.split(task, 800, 100, seed=3, min_len=1, max_len=4)
    assert tasks.split(task, 800, 100, seed=4, min_len=1, max_len=4)[1] != test
    # the test set does not depend on how much training data is asked for
    assert tasks.split(task, 50, 100, seed=3, min_len=1, max_len=4)[1] == test
    for e in train + test:
        letter, operands = parse(e.prompt)
        assert e.answer == REFERENCE[letter](operands) + ";"


def test_split_errors():
    with pytest.raises(InputError, match="only 100 distinct prompts"):
        tasks.split("add", 95, 10, min_len=1, max_len=1)
    with pytest.raises(InputError, match="unknown task 'revrse'") as info:
        tasks.split("revrse", 10, 10)
    assert "did you mean 'reverse'" in str(info.value)
    with pytest.raises(InputError, match="min_len"):
        tasks.generate_examples("copy", 3, min_len=4, max_len=2)
    with pytest.raises(InputError, match="min_len"):
        tasks.generate_examples("copy", 3, min_len=0, max_len=2)
    with pytest.raises(InputError, match="count"):
        tasks.generate_examples("copy", -1)
    with pytest.raises(InputError, match="seed"):
        tasks.generate_examples("copy", 3, seed=-1)


def test_mix_is_a_deterministic_shuffle():
    parts = [tasks.split(t, 30, 5, seed=0)[0] for t in ("copy", "reverse", "sort")]
    mixed = tasks.mix(parts, seed=0)
    assert mixed == tasks.mix(parts, seed=0) != tasks.mix(parts, seed=1)
    assert sorted(mixed, key=lambda e: e.prompt) == sorted(
        [e for p in parts for e in p], key=lambda e: e.prompt
    )
    assert {e.task for e in mixed[:20]} == {"copy", "reverse", "sort"}


def test_char_tokenizer_round_trip(tmp_path):
    tokenizer = tasks.char_tokenizer()
    assert tokenizer.get_vocab_size() == len(tasks.VOCAB) == 3 + len(tasks.ALPHABET) == 21
    assert (tasks.PAD_ID, tasks.EOS_ID, tasks.UNK_ID) == (0, 1, 2)
    assert tokenizer.token_to_id("<eos>") == tasks.EOS_ID
    assert tokenizer.token_to_id(";") == tasks.END_ID
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for task in tasks.TASK_NAMES:
        for e in tasks.generate_examples(task, 300, seed=0, min_len=1, max_len=7):
            for tok in (tokenizer, loaded):
                encoding = tok.encode(e.text)
                assert encoding.tokens == list(e.text)  # one token per character
                assert tasks.UNK_ID not in encoding.ids
                assert tok.decode(encoding.ids) == e.text
    # the specials: <eos> in a text is one token and decodes away by default
    ids = tokenizer.encode("C12=12;<eos>").ids
    assert ids[-1] == tasks.EOS_ID and len(ids) == 8
    assert tokenizer.decode(ids) == "C12=12;"
    assert tokenizer.encode("x").ids == [tasks.UNK_ID]


def test_files_feed_packed_dataset(tmp_path):
    train, _ = tasks.split("reverse", 40, 5, seed=0)
    tokenizer = tasks.char_tokenizer()
    expected = [t for e in train for t in tokenizer.encode(e.text).ids + [tasks.EOS_ID]]
    txt = tasks.write_examples(tmp_path / "a" / "train.txt", train)
    jsonl = tasks.write_examples(tmp_path / "b" / "train.jsonl", train)
    assert txt.read_text().splitlines() == tasks.training_lines(train)
    assert tasks.read_examples(jsonl) == train
    for path in (txt, jsonl):
        assert load_texts(path)["text"] == tasks.training_lines(train)
        data = PackedDataset.from_files(path, tokenizer, seq_len=15, eos_id=tasks.EOS_ID)
        flat = data.rows.reshape(-1).tolist()
        assert flat == expected[: len(flat)] and len(flat) > len(expected) - 16
    with pytest.raises(InputError, match="extension"):
        tasks.write_examples(tmp_path / "train.csv", train)
    (tmp_path / "bad.jsonl").write_text('{"text": "C1=1;"}\n')
    with pytest.raises(InputError, match="not an example"):
        tasks.read_examples(tmp_path / "bad.jsonl")


def test_exact_match_semantics():
    assert tasks.exact_match(["12;", "3;"], ["12;", "3;"]) == 1.0
    assert tasks.exact_match(["12;", "3"], ["12;", "3;"]) == 0.5  # the end marker counts
    assert tasks.exact_match([" 12;", "12; "], ["12;", "12;"]) == 0.0  # no stripping
    assert tasks.exact_match(["21;"], ["12;"]) == 0.0
    with pytest.raises(InputError, match="2 predictions for 1 answers"):
        tasks.exact_match(["1;", "2;"], ["1;"])
    with pytest.raises(InputError, match="no answers"):
        tasks.exact_match([], [])


def test_answer_text_cuts_at_end_marker_and_specials():
    tokenizer = tasks.char_tokenizer()
    ids = lambda text: tokenizer.encode(text).ids
    assert tasks.answer_text(ids("7193;"), tokenizer) == "7193;"
    assert tasks.answer_text(ids("7193;55;") + [0, 0], tokenizer) == "7193;"
    assert tasks.answer_text(ids("71<eos>93;"), tokenizer) == "71"  # <eos> ends the answer
    assert tasks.answer_text(ids("719") + [tasks.PAD_ID], tokenizer) == "719"
    assert tasks.answer_text([], tokenizer) == ""


def test_task_accuracy_with_scripted_generators():
    tokenizer = tasks.char_tokenizer()
    examples = tasks.mix([tasks.split(t, 0, 20, seed=0)[1] for t in tasks.TASK_NAMES])
    by_prompt = {e.prompt: e.answer for e in examples}
    seen = []

    def oracle(prompt_ids, max_new_tokens):
        seen.append(max_new_tokens)
        answers = [by_prompt[tokenizer.decode(p)] for p in prompt_ids]
        # the right answer, then whatever: scoring stops at the end marker
        return [(tokenizer.encode(a).ids + [tasks.EOS_ID] * 3)[:max_new_tokens] for a in answers]

    def wrong_on_sort(prompt_ids, max_new_tokens):
        out = oracle(prompt_ids, max_new_tokens)
        return [[tasks.VOCAB["9"], *o] if p[0] == tasks.VOCAB["S"] else o
                for p, o in zip(prompt_ids, out, strict=True)]  # fmt: skip

    assert tasks.task_accuracy(oracle, examples, tokenizer) == 1.0
    assert seen[-1] == max(len(e.answer) for e in examples)
    assert tasks.task_accuracy(oracle, examples, tokenizer, max_new_tokens=2) < 1.0
    assert tasks.task_accuracy(wrong_on_sort, examples, tokenizer) == pytest.approx(0.8)
    by_task = tasks.accuracy_by_task(wrong_on_sort, examples, tokenizer)
    assert by_task == {t: (0.0 if t == "sort" else 1.0) for t in tasks.TASK_NAMES}
    with pytest.raises(InputError, match="1 outputs for 100 prompts"):
        tasks.task_accuracy(lambda p, n: [[]], examples, tokenizer)
    with pytest.raises(InputError, match="no examples"):
        tasks.task_accuracy(oracle, [], tokenizer)


# ----------------------------------------------------------------------------- corpus


@pytest.fixture
def fake_stdlib(tmp_path):
    """A tiny stdlib: package ``alpha`` (two modules, one without a final newline,
    and a tests directory), ``beta`` (a subpackage) and a non-package directory."""
    root = tmp_path / "lib"
    (root / "alpha" / "tests").mkdir(parents=True)
    (root / "alpha" / "__init__.py").write_text("A = 1\n")
    (root / "alpha" / "mod.py").write_text("\n".join(f"x{i} = {i}" for i in range(10)))
    (root / "alpha" / "tests" / "test_mod.py").write_text("assert True\n")
    (root / "beta" / "sub").mkdir(parents=True)
    (root / "beta" / "__init__.py").write_text("")
    (root / "beta" / "sub" / "__init__.py").write_text("B = 2\nC = 3\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "other.py").write_text("pass\n")
    return root


def test_fake_stdlib_layout(fake_stdlib):
    assert corpus.available_packages(fake_stdlib) == ["alpha", "beta"]
    files = corpus.package_files("alpha", root=fake_stdlib)
    assert [p.relative_to(fake_stdlib).as_posix() for p in files] == [
        "alpha/__init__.py", "alpha/mod.py",
    ]  # fmt: skip
    with_tests = corpus.package_files("alpha", root=fake_stdlib, include_tests=True)
    assert len(with_tests) == 3
    text = corpus.package_texts("alpha", root=fake_stdlib)
    assert text == "A = 1\n" + "".join(f"x{i} = {i}\n" for i in range(10))
    assert corpus.package_texts("beta", root=fake_stdlib) == "B = 2\nC = 3\n"
    documents = corpus.package_documents("alpha", root=fake_stdlib, block_lines=4)
    assert documents == ["A = 1\n", "x0 = 0\nx1 = 1\nx2 = 2\nx3 = 3\n",
                         "x4 = 4\nx5 = 5\nx6 = 6\nx7 = 7\n", "x8 = 8\nx9 = 9\n"]  # fmt: skip
    assert corpus.package_texts("alpha", 19, root=fake_stdlib) == "A = 1\nx0 = 0\n"  # whole lines


def test_corpus_errors(fake_stdlib, tmp_path):
    with pytest.raises(InputError, match="source directory does not exist") as info:
        corpus.stdlib_root(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(info.value)
    with pytest.raises(InputError, match="no Python package 'alpah'") as info:
        corpus.package_texts("alpah", root=fake_stdlib)
    assert "did you mean 'alpha'" in str(info.value)
    with pytest.raises(InputError, match="no Python package 'emial'") as info:
        corpus.package_texts("emial")
    assert "did you mean 'email'" in str(info.value)
    for bad in ("site-packages", "../lib", ""):
        with pytest.raises(InputError):
            corpus.package_files(bad, root=fake_stdlib)
    with pytest.raises(InputError, match="held_out"):
        corpus.domain("alpha", root=fake_stdlib, held_out=1.0)
    with pytest.raises(InputError, match="max_chars"):
        corpus.package_texts("alpha", 0, root=fake_stdlib)
    with pytest.raises(InputError, match="vocab_size must be at least 258"):
        corpus.train_tokenizer(["alpha"], vocab_size=200, root=fake_stdlib)


def test_stdlib_domains_non_empty_and_disjoint():
    root = corpus.stdlib_root()
    assert root.is_dir() and (root / "json" / "__init__.py").is_file()
    assert set(corpus.DEFAULT_PACKAGES) <= set(corpus.available_packages())
    seen: dict[Path, str] = {}
    for package in corpus.DEFAULT_PACKAGES:
        files = corpus.package_files(package)
        relative = [p.relative_to(root / package).as_posix() for p in files]
        assert relative == sorted(relative)
        assert not any(part in ("test", "tests") for r in relative for part in r.split("/")[:-1])
        for path in files:
            assert path.suffix == ".py" and path not in seen
            seen[path] = package
        text = corpus.package_texts(package)
        assert len(text) > 20_000 and text == "".join(corpus.package_documents(package))
        sources = [p.read_text() for p in files]
        assert text == "".join(t if t.endswith("\n") or not t else t + "\n" for t in sources)
    assert (
        corpus.package_texts("json", max_chars=5000)
        == corpus.package_texts("json")[: len(corpus.package_texts("json", max_chars=5000))]
    )
    assert 4900 < len(corpus.package_texts("json", max_chars=5000)) <= 5000


def test_domain_split_deterministic_partition():
    documents = corpus.package_documents("email", block_lines=32)
    split = corpus.domain("email", held_out=0.1, seed=0, block_lines=32)
    assert split == corpus.domain("email", held_out=0.1, seed=0, block_lines=32)
    mask = corpus.held_out_mask(len(documents), 0.1, 0)
    assert mask.sum() == round(0.1 * len(documents)) == len(split.held_out)
    assert split.train == [d for d, m in zip(documents, mask, strict=True) if not m]
    assert split.held_out == [d for d, m in zip(documents, mask, strict=True) if m]
    assert split.train and split.held_out and split.train_text and split.held_out_text
    other = corpus.domain("email", held_out=0.1, seed=1, block_lines=32)
    assert other.held_out != split.held_out
    assert not np.array_equal(mask, corpus.held_out_mask(len(documents), 0.1, 1))
    assert corpus.domain("json", held_out=0.0).held_out == []
    assert corpus.held_out_mask(1, 0.5).tolist() == [False]  # never everything
    assert corpus.held_out_mask(2, 0.01).sum() == 1  # at least one


def test_write_domains_for_datasets(tmp_path):
    files = corpus.write_domains(tmp_path, ["json", "concurrent"], max_chars=30_000)
    for package, (train, held_out) in files.items():
        assert (train, held_out) == (tmp_path / package / "train.jsonl",
                                     tmp_path / package / "heldout.jsonl")  # fmt: skip
        split = corpus.domain(package, max_chars=30_000)
        assert load_texts(train)["text"] == split.train
        assert load_texts(held_out)["text"] == split.held_out
        assert json.loads(train.read_text().splitlines()[0]) == {"text": split.train[0]}


def test_bpe_tokenizer_deterministic_and_round_trips(tmp_path):
    packages = ["json", "concurrent", "logging"]
    tokenizer = corpus.train_tokenizer(packages, vocab_size=400, max_chars=60_000)
    again = corpus.train_tokenizer(packages, vocab_size=400, max_chars=60_000)
    assert tokenizer.to_str() == again.to_str()
    assert tokenizer.get_vocab_size() == 400
    assert [tokenizer.token_to_id(t) for t in corpus.SPECIAL_TOKENS] == [0, 1]
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    loaded = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    samples = [
        corpus.domain("json").held_out_text,
        corpus.package_texts("email", max_chars=20_000),  # a package it never saw
        "déjà vu — ünïcödé ✓\ttabs\r\n\n  trailing  ",
    ]
    for text in samples:
        ids = loaded.encode(text).ids
        assert loaded.decode(ids) == text
        assert corpus.SPECIAL_TOKENS.index("<unk>") not in ids
    held_out = corpus.domain("json").held_out_text
    assert len(tokenizer.encode(held_out).ids) < 0.7 * len(held_out.encode())  # it compresses
    data = PackedDataset.from_files(
        corpus.write_domain(tmp_path / "d", "json")[0], loaded, seq_len=32, eos_id=1
    )
    assert data.num_rows > 100


def test_train_bpe_on_any_documents():
    documents = corpus.domain("json", max_chars=30_000).train
    tokenizer = corpus.train_bpe(documents, vocab_size=300)
    assert tokenizer.to_str() == corpus.train_bpe(documents, vocab_size=300).to_str()
    assert tokenizer.to_str() == corpus.train_tokenizer(["json"], 300, max_chars=30_000).to_str()
    assert tokenizer.get_vocab_size() == 300
    text = "π = 3.14159  # not in the training text\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text
    assert corpus.train_bpe(["ab"] * 10, 258 + 1, special_tokens=("<unk>", "<eos>"))
    with pytest.raises(InputError, match="no text"):
        corpus.train_bpe(["", ""], 300)
    with pytest.raises(InputError, match="packages must be a non-empty list"):
        corpus.train_tokenizer("json", 300)


# ----------------------------------------------------------------------------- end to end


def test_copy_task_is_learnable_and_scored(tmp_path):
    """train.lm on 2000 copy examples (3-6 digits): a 2-layer decoder (hidden 64,
    21-token vocabulary, ~70k parameters) after 400 steps of 16 rows x 64 tokens
    answers most held-out prompts exactly; the untrained model none."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxcombine.hf import load_model, load_tokenizer
    from jaxcombine.models import Decoder, DecoderConfig
    from train import lm

    train, test = tasks.split("copy", 2000, 200, seed=0, min_len=3, max_len=6)
    tasks.write_examples(tmp_path / "train.txt", train)
    tasks.char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    model_section = {
        "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
        "num_kv_heads": 4, "head_dim": 16, "max_position_embeddings": 64,
    }  # fmt: skip
    config = {
        "seed": 0,
        "model": model_section,
        "data": {
            "files": [str(tmp_path / "train.txt")],
            "tokenizer": str(tmp_path / "tokenizer.json"),
            "seq_len": 64,
            "eos_token": "<eos>",
        },
        "train": {"steps": 400, "global_batch": 16, "learning_rate": 2e-3, "warmup_steps": 10},
        "mesh": {"data": 1, "num_devices": 1},
        "log_every": 100,
        "checkpoint_every": 10_000,
        "progress": False,
    }
    (tmp_path / "lm.yml").write_text(yaml.safe_dump(config))
    lm.main(["--config", str(tmp_path / "lm.yml"), "--workdir", str(tmp_path / "run")])

    trained = load_model(tmp_path / "run" / "model", dtype=jnp.float32)
    tokenizer = load_tokenizer(tmp_path / "run" / "model")  # shipped with the model
    accuracy = tasks.task_accuracy(tasks.decoder_generate_fn(trained, batch_size=128), test,
                                   tokenizer)  # fmt: skip
    untrained = Decoder(
        DecoderConfig(vocab_size=len(tasks.VOCAB), **model_section), rngs=nnx.Rngs(0)
    )
    baseline = tasks.task_accuracy(tasks.decoder_generate_fn(untrained, batch_size=128), test,
                                   tokenizer)  # fmt: skip
    print(f"copy: accuracy {accuracy:.3f} trained, {baseline:.3f} untrained")
    assert accuracy > 0.6, accuracy
    assert baseline < 0.05, baseline
    # the scorer is not fooled by the training set: a held-out prompt is new
    assert not {e.prompt for e in test} & {e.prompt for e in train}
