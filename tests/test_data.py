"""jaxcombine.data: loading every format, tokenising, packing, batch order, device arrays.

Oracles: ``tokenizer.encode(text).ids`` per text for tokenising; a plain
Python packing loop; the batch order as the contract states it
(``default_rng([seed, epoch]).permutation(N)`` epochs laid end to end).
"""

import json

import datasets
import jax
import numpy as np
import pyarrow as pa
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

from jaxcombine.data import PackedDataset, global_batch_array, load_texts, pack, tokenize
from jaxcombine.errors import InputError

TEXTS = [
    "the cat sat on the mat",
    "a dog ran in the park and the cat ran too",
    "birds sing",
    "the quick brown fox jumps over the lazy dog",
    "one two three four five six seven eight nine ten",
    "rain falls on the green hills",
    "x",
    "the sun rises in the east and sets in the west",
    "cold wind , warm fire",
    "we read the book and then we wrote a story about it",
]


@pytest.fixture(autouse=True)
def _private_datasets_cache(tmp_path_factory, monkeypatch):
    """Keep ``datasets``' cache of these throwaway files out of the user's cache."""
    monkeypatch.setattr(
        datasets.config, "HF_DATASETS_CACHE", tmp_path_factory.getbasetemp() / "hf_datasets"
    )


@pytest.fixture(scope="module")
def tokenizer():
    """A WordLevel tokenizer trained on TEXTS (plus two unseen words -> <unk>)."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        TEXTS[:-1], trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>", "<bos>"])
    )
    return tok


@pytest.fixture(scope="module")
def bos_tokenizer(tokenizer):
    """The same tokenizer with a post-processor that prepends <bos>."""
    tok = Tokenizer.from_str(tokenizer.to_str())
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", tok.token_to_id("<bos>"))]
    )
    return tok


def write_txt(path, texts):
    path.write_text("".join(t + "\n" for t in texts))
    return path


def write_jsonl(path, texts, column="text"):
    path.write_text("".join(json.dumps({column: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def write_parquet(path, texts):
    datasets.Dataset.from_dict({"id": list(range(len(texts))), "text": texts}).to_parquet(str(path))
    return path


def write_arrow_stream(path, texts):
    table = pa.table({"text": texts, "id": list(range(len(texts)))})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return path


def write_csv(path, texts):
    datasets.Dataset.from_dict({"text": texts}).to_csv(str(path), index=False)
    return path


def reference_pack(sequences, seq_len, eos_id):
    """GPT packing, spelled out: documents (+ eos) end to end, cut every seq_len + 1."""
    tokens = []
    for ids in sequences:
        if len(ids) > 0:
            tokens.extend(ids)
            if eos_id is not None:
                tokens.append(eos_id)
    width = seq_len + 1
    return [tokens[i : i + width] for i in range(0, len(tokens) - width + 1, width)]


def reference_global_batch(n, step, global_batch, seed, epochs=20):
    """The documented order: permutation epochs laid end to end, sliced at step."""
    order = []
    for epoch in range(epochs):
        order.extend(np.random.default_rng([seed, epoch]).permutation(n).tolist())
    return order[step * global_batch : (step + 1) * global_batch]


def id_rows(n):
    """Rows whose tokens are their own index, so a batch shows which rows it took."""
    return PackedDataset(np.repeat(np.arange(n, dtype=np.int32)[:, None], 3, axis=1))


# ----------------------------------------------------------------------------- loading


def test_every_format_gives_the_same_texts(tmp_path):
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": TEXTS}).save_to_disk(str(saved))
    arrow_files = sorted(saved.glob("*.arrow"))
    assert len(arrow_files) == 1
    sources = {
        "txt": write_txt(tmp_path / "a.txt", TEXTS),
        "jsonl": write_jsonl(tmp_path / "a.jsonl", TEXTS),
        "json": write_jsonl(tmp_path / "b.json", TEXTS),
        "parquet": write_parquet(tmp_path / "a.parquet", TEXTS),
        "arrow (stream)": write_arrow_stream(tmp_path / "a.arrow", TEXTS),
        "arrow (save_to_disk file)": arrow_files[0],
        "save_to_disk directory": saved,
        "csv": write_csv(tmp_path / "a.csv", TEXTS),
    }
    for name, path in sources.items():
        dataset = load_texts(path)
        assert dataset.column_names == ["text"], name
        assert list(dataset["text"]) == TEXTS, name


def test_several_files_a_directory_and_a_renamed_column(tmp_path):
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    write_jsonl(folder / "a.jsonl", TEXTS[:4], column="content")
    write_jsonl(folder / "sub" / "b.jsonl", TEXTS[4:], column="content")
    (folder / "README.md").write_text("not data")
    (folder / ".hidden").mkdir()
    write_txt(folder / ".hidden" / "junk.txt", ["ignored"])
    assert list(load_texts(folder, text_column="content")["text"]) == TEXTS
    files = [folder / "sub" / "b.jsonl", folder / "a.jsonl"]
    assert list(load_texts(files, text_column="content")["text"]) == TEXTS[4:] + TEXTS[:4]


# ----------------------------------------------------------------------------- tokenising, packing


@pytest.mark.parametrize("which", ["plain", "bos"])
def test_tokenize_equals_encode_per_text(tmp_path, tokenizer, bos_tokenizer, which):
    tok = tokenizer if which == "plain" else bos_tokenizer
    texts = TEXTS + ["", "words never seen zebra"]
    ids = tokenize(load_texts(write_jsonl(tmp_path / "t.jsonl", texts)), tok)
    assert [list(map(int, x)) for x in ids] == [tok.encode(t).ids for t in texts]
    assert all(x.dtype == np.int32 for x in ids)
    if which == "bos":
        assert all(x[0] == tok.token_to_id("<bos>") for x in ids)


def test_tokenize_in_two_processes(tmp_path, tokenizer):
    ids = tokenize(load_texts(write_txt(tmp_path / "t.txt", TEXTS)), tokenizer, num_proc=2)
    assert [list(map(int, x)) for x in ids] == [tokenizer.encode(t).ids for t in TEXTS]


@pytest.mark.parametrize("seq_len", [1, 4, 7, 16])
@pytest.mark.parametrize("eos", [True, False])
def test_pack_equals_reference(seq_len, eos):
    rng = np.random.default_rng(seq_len)
    sequences = [rng.integers(3, 50, rng.integers(0, 12)).tolist() for _ in range(15)]
    eos_id = 1 if eos else None
    rows = pack(sequences, seq_len, eos_id=eos_id)
    assert rows.dtype == np.int32
    assert rows.shape[1] == seq_len + 1
    assert rows.tolist() == reference_pack(sequences, seq_len, eos_id)


def test_from_files_rows_equal_reference(tmp_path, tokenizer):
    path = write_parquet(tmp_path / "d.parquet", TEXTS)
    eos = tokenizer.token_to_id("<eos>")
    data = PackedDataset.from_files(path, tokenizer, 5, eos_id=eos)
    expected = reference_pack([tokenizer.encode(t).ids for t in TEXTS], 5, eos)
    assert data.rows.tolist() == expected
    assert (data.num_rows, data.seq_len) == (len(expected), 5)


# ----------------------------------------------------------------------------- batch order


def test_batch_is_deterministic_and_follows_the_documented_order():
    data = id_rows(10)
    for seed in (0, 7):
        for step in range(8):  # steps 2, 4, 7 straddle epoch boundaries
            got = data.batch(step, 4, seed)
            assert got.shape == (4, 3)
            assert got[:, 0].tolist() == reference_global_batch(10, step, 4, seed)
            np.testing.assert_array_equal(got, data.batch(step, 4, seed))


def test_batch_differs_across_seeds():
    data = id_rows(20)
    epoch = lambda seed: np.concatenate([data.batch(s, 5, seed)[:, 0] for s in range(4)])  # noqa: E731
    assert not np.array_equal(epoch(0), epoch(1))


def test_each_epoch_visits_every_row_once():
    data = id_rows(12)
    seen = np.concatenate([data.batch(step, 4, seed=3)[:, 0] for step in range(9)])  # 3 epochs
    for epoch in range(3):
        assert sorted(seen[epoch * 12 : (epoch + 1) * 12].tolist()) == list(range(12))
    assert not np.array_equal(seen[:12], seen[12:24])  # a fresh order each epoch


def test_batch_spans_the_epoch_boundary():
    data = id_rows(10)
    first = np.random.default_rng([5, 0]).permutation(10)
    second = np.random.default_rng([5, 1]).permutation(10)
    # step 2 of 4 rows holds positions 8..11: the end of epoch 0, the start of epoch 1
    assert data.batch(2, 4, seed=5)[:, 0].tolist() == first[8:].tolist() + second[:2].tolist()
    # a batch larger than an epoch: step 1 of 16 rows holds positions 16..31
    third = np.random.default_rng([5, 2]).permutation(10)
    fourth = np.random.default_rng([5, 3]).permutation(10)
    big = data.batch(1, 16, seed=5)[:, 0].tolist()
    assert big == second[6:].tolist() + third.tolist() + fourth[:2].tolist()


@pytest.mark.parametrize("bootstrap", [False, True])
@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(process_count, bootstrap):
    data = id_rows(13)
    for step in range(5):
        whole = data.batch(step, 8, 11, bootstrap=bootstrap)
        parts = [
            data.batch(
                step, 8, 11, process_index=p, process_count=process_count, bootstrap=bootstrap
            )
            for p in range(process_count)
        ]
        assert all(part.shape == (8 // process_count, 3) for part in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_bootstrap_draws_with_replacement():
    data = id_rows(50)
    drawn = np.concatenate(
        [data.batch(step, 10, seed=2, bootstrap=True)[:, 0] for step in range(5)]
    )
    permuted = np.concatenate([data.batch(step, 10, seed=2)[:, 0] for step in range(5)])
    assert drawn.min() >= 0 and drawn.max() < 50
    assert len(set(drawn.tolist())) < 50  # repeats within one epoch
    assert sorted(permuted.tolist()) == list(range(50))
    assert not np.array_equal(drawn, permuted)
    again = np.concatenate(
        [data.batch(step, 10, seed=2, bootstrap=True)[:, 0] for step in range(5)]
    )
    np.testing.assert_array_equal(drawn, again)


def test_restart_sees_the_same_batches(tmp_path, tokenizer):
    path = write_txt(tmp_path / "r.txt", TEXTS * 3)
    eos = tokenizer.token_to_id("<eos>")
    running = PackedDataset.from_files(path, tokenizer, 3, eos_id=eos)
    continued = [running.batch(step, 4, seed=9) for step in range(12)]
    restarted = PackedDataset.from_files(
        path, tokenizer, 3, eos_id=eos
    )  # a new job resuming at step 6
    for step in range(6, 12):
        np.testing.assert_array_equal(restarted.batch(step, 4, seed=9), continued[step])


# ----------------------------------------------------------------------------- devices


def test_global_batch_array_on_eight_devices():
    mesh = Mesh(np.array(jax.devices()).reshape(8, 1), ("data", "model"))
    sharding = NamedSharding(mesh, P("data"))
    rows = id_rows(40).batch(3, 16, seed=1)
    array = global_batch_array(rows, sharding)
    assert array.shape == (16, 3) and array.sharding == sharding
    np.testing.assert_array_equal(np.asarray(array), rows)
    assert {shard.data.shape for shard in array.addressable_shards} == {(2, 3)}


# ----------------------------------------------------------------------------- errors


def test_missing_file_is_named(tmp_path, tokenizer):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(InputError, match="nope.jsonl") as info:
        load_texts(missing)
    assert "does not exist" in str(info.value)
    with pytest.raises(InputError, match="nope.jsonl"):
        PackedDataset.from_files([write_txt(tmp_path / "ok.txt", TEXTS), missing], tokenizer, 4)


def test_unknown_extension_lists_the_supported_ones(tmp_path):
    path = tmp_path / "data.xml"
    path.write_text("<a/>")
    with pytest.raises(InputError, match="data.xml") as info:
        load_texts(path)
    assert all(ext in str(info.value) for ext in (".txt", ".jsonl", ".parquet", ".arrow", ".csv"))


def test_missing_text_column_lists_the_columns(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", TEXTS, column="content")
    with pytest.raises(InputError, match="docs.jsonl") as info:
        load_texts(path)
    message = str(info.value)
    assert "'text'" in message and "content" in message and "text_column" in message


def test_non_text_column_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", TEXTS)
    with pytest.raises(InputError, match="ids.jsonl.*'id'"):
        load_texts(path, text_column="id")


def test_mixed_extensions_are_refused(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    write_txt(folder / "a.txt", TEXTS)
    write_parquet(folder / "b.parquet", TEXTS)
    for paths in (folder, [folder / "a.txt", folder / "b.parquet"]):
        with pytest.raises(InputError, match="different formats") as info:
            load_texts(paths)
        assert "a.txt" in str(info.value) and "b.parquet" in str(info.value)


def test_empty_directory_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty.*no data file"):
        load_texts(tmp_path / "empty")


def test_too_little_text_says_how_many_tokens(tmp_path, tokenizer):
    path = write_txt(tmp_path / "short.txt", ["the cat"])
    with pytest.raises(
        InputError, match=r"short.txt: the data has 3 tokens .* needs seq_len \+ 1 = 9"
    ):
        PackedDataset.from_files(path, tokenizer, 8, eos_id=tokenizer.token_to_id("<eos>"))
    with pytest.raises(InputError, match="has 0 tokens"):
        pack([[], []], 4, eos_id=1)


def test_bad_arguments_are_refused(tmp_path, tokenizer):
    data = id_rows(10)
    with pytest.raises(InputError, match="global_batch 6 is not divisible by process_count 4"):
        data.batch(0, 6, 0, process_count=4)
    for bad in (0, -4):
        with pytest.raises(InputError, match="global_batch must be positive"):
            data.batch(0, bad, 0)
    with pytest.raises(InputError, match="process_index 2"):
        data.batch(0, 4, 0, process_index=2, process_count=2)
    with pytest.raises(InputError, match="step must be >= 0"):
        data.batch(-1, 4, 0)
    with pytest.raises(InputError, match="seq_len must be positive"):
        pack([[1, 2, 3]], 0, eos_id=None)
    with pytest.raises(InputError, match="eos_id 999"):
        PackedDataset.from_files(write_txt(tmp_path / "e.txt", TEXTS), tokenizer, 4, eos_id=999)
    with pytest.raises(InputError, match="tokenizers.Tokenizer"):
        PackedDataset.from_files(tmp_path / "e.txt", "not a tokenizer", 4)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "fine"}\n{not json\n')
    with pytest.raises(InputError, match="broken.jsonl: cannot read the data files as 'json'"):
        load_texts(path)
