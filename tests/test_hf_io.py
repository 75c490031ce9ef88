"""HF checkpoint I/O against transformers: bit-exact round trips, write-back, bad input."""

import json
import pickle
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import Mesh, PartitionSpec
from safetensors import safe_open
from safetensors.numpy import save_file

from jaxcombine.errors import (
    CheckpointError,
    ConfigError,
    OutputExistsError,
    TensorError,
    UnsupportedModelError,
)
from jaxcombine.hf import load_config, load_model, load_tokenizer, save_model
from jaxcombine.sharding import DEFAULT_RULES
from tests import hf_models


def all_tensors(model_dir):
    out = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), "np") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118
    return out


def logits_of(ref, ids):
    with torch.no_grad():
        return ref(torch.tensor(ids)).logits.float().numpy()


IDS = np.random.RandomState(0).randint(0, hf_models.VOCAB, (2, 20))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["llama_tied_llama3", "qwen2"])
def test_round_trip_is_bit_exact(tmp_path, kind, dtype):
    source = hf_models.make_tiny_model(tmp_path / "in", kind, dtype=dtype)
    out = save_model(load_model(source), tmp_path / "out", source_dir=source)
    before, after = all_tensors(source), all_tensors(out)
    assert sorted(before) == sorted(after)
    for name, array in before.items():
        assert after[name].dtype == array.dtype, name
        assert after[name].tobytes() == array.tobytes(), name
    assert (out / "tokenizer.json").exists() and (out / "generation_config.json").exists()


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_written_directory_loads_in_transformers(tiny_models, tmp_path, kind):
    source = tiny_models[kind]
    model = load_model(source)
    out = save_model(model, tmp_path / "out", source_dir=source)
    expected = logits_of(hf_models.load_reference(source), IDS)
    np.testing.assert_array_equal(logits_of(hf_models.load_reference(out), IDS), expected)
    ours = np.asarray(load_model(out)(jnp.asarray(IDS)).logits)
    assert np.max(np.abs(ours - expected)) < 1e-4 * np.max(np.abs(expected))


def test_sharded_input_and_output(tiny_models, tmp_path):
    single = tiny_models["llama_gqa"]
    sharded = hf_models.make_tiny_model(tmp_path / "sharded", "llama_gqa", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").exists()
    a = np.asarray(load_model(single)(jnp.asarray(IDS)).logits)
    np.testing.assert_array_equal(np.asarray(load_model(sharded)(jnp.asarray(IDS)).logits), a)
    out = save_model(load_model(single), tmp_path / "out", source_dir=single, max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0].startswith("model-00001-of-")
    assert not (out / "model.safetensors").exists()
    expected = logits_of(hf_models.load_reference(single), IDS)
    np.testing.assert_array_equal(logits_of(hf_models.load_reference(out), IDS), expected)


def test_old_and_new_rope_config_forms(tiny_models, tmp_path):
    new = tiny_models["llama_tied_llama3"]
    old = tmp_path / "old"
    shutil.copytree(new, old)
    config = json.loads((new / "config.json").read_text())
    rope = config.pop("rope_parameters")
    assert rope["rope_type"] == "llama3"
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = rope
    (old / "config.json").write_text(json.dumps(config))
    assert load_config(old) == load_config(new)
    expected = logits_of(hf_models.load_reference(new), IDS)
    np.testing.assert_array_equal(logits_of(hf_models.load_reference(old), IDS), expected)
    out = save_model(load_model(old), tmp_path / "out", source_dir=old)
    written = json.loads((out / "config.json").read_text())
    assert "rope_scaling" in written and "rope_parameters" not in written  # form kept
    np.testing.assert_array_equal(logits_of(hf_models.load_reference(out), IDS), expected)


def test_dtype_override(tiny_models):
    model = load_model(tiny_models["mistral"], dtype=jnp.bfloat16)
    assert model.layers[0].mlp.up_proj.kernel.get_value().dtype == jnp.bfloat16


def test_load_onto_a_mesh(tiny_models):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    path = tiny_models["llama_gqa"]  # 2 kv heads: not divisible by a model axis of 4
    with pytest.raises(ConfigError, match="k_proj/kernel.*'kv_heads' of size 2"):
        load_model(path, mesh=mesh)
    rules = (("kv_heads", None), *DEFAULT_RULES)
    model = load_model(path, mesh=mesh, rules=rules)
    kernel = model.layers[0].mlp.up_proj.kernel.get_value()
    assert kernel.sharding.spec == PartitionSpec(None, "model")
    assert kernel.addressable_shards[0].data.shape == (64, 32)
    expected = np.asarray(load_model(path)(jnp.asarray(IDS)).logits)
    ours = jax.jit(lambda m, t: m(t).logits)(model, jnp.asarray(IDS))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


# ---- bad input ---------------------------------------------------------------------------


@pytest.fixture
def model_copy(tiny_models, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny_models["llama_gqa"], path)
    return path


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def rewrite_tensors(path, edit):
    tensors = all_tensors(path)
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_unsupported_model_type(model_copy):
    edit_config(model_copy, model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*llama, mistral, mixtral, qwen2"):
        load_model(model_copy)


def test_missing_tensor(model_copy):
    rewrite_tensors(model_copy, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(TensorError, match="missing: model.layers.1.mlp.up_proj.weight"):
        load_model(model_copy)


def test_unexpected_tensor(model_copy):
    def add(tensors):
        tensors["model.layers.2.mlp.up_proj.weight"] = np.zeros((4, 4), np.float32)

    rewrite_tensors(model_copy, add)
    with pytest.raises(TensorError, match="model.layers.2.mlp.up_proj.weight"):
        load_model(model_copy)


def test_shape_disagrees_with_config(model_copy):
    edit_config(model_copy, intermediate_size=96)
    with pytest.raises(TensorError, match=r"gate_proj.weight.*\(128, 64\).*\(96, 64\)"):
        load_model(model_copy)


def test_truncated_and_corrupted_files(model_copy):
    file = model_copy / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupted or truncated"):
        load_model(model_copy)
    corrupted = bytearray(data)
    corrupted[20:40] = b"#" * 20  # inside the JSON header
    file.write_bytes(bytes(corrupted))
    with pytest.raises(CheckpointError, match="corrupted or truncated"):
        load_model(model_copy)


def test_missing_directory_and_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "absent")
    with pytest.raises(CheckpointError, match="huggingface-cli download meta-llama/Llama-3-8B"):
        load_model("meta-llama/Llama-3-8B")


class _Trap:
    def __reduce__(self):
        return (open, ("UNPICKLED_MARKER", "w"))


def test_pickle_checkpoint_is_refused_never_unpickled(model_copy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps(_Trap()))
    with pytest.raises(CheckpointError, match="never unpickles.*\n.*How to fix: convert"):
        load_model(model_copy)
    assert not (tmp_path / "UNPICKLED_MARKER").exists()


def test_missing_config_and_tokenizer(model_copy):
    (model_copy / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json is missing"):
        load_tokenizer(model_copy)
    (model_copy / "config.json").unlink()
    with pytest.raises(Exception, match="config.json is missing"):
        load_model(model_copy)


def test_output_directory_rules(tiny_models, tmp_path, monkeypatch):
    model = load_model(tiny_models["llama_gqa"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_model(model, out)
    save_model(model, out, overwrite=True)  # no source: a fresh config.json
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    expected = logits_of(hf_models.load_reference(tiny_models["llama_gqa"]), IDS)
    np.testing.assert_array_equal(logits_of(hf_models.load_reference(out), IDS), expected)

    def failing_write(tensors, directory, **kwargs):
        (directory / "partial.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr("jaxcombine.hf._model.write_shards", failing_write)
    with pytest.raises(RuntimeError, match="disk full"):
        save_model(model, tmp_path / "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
