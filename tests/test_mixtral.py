"""Mixtral (sparse MoE decoder) against transformers, both checkpoint layouts, upcycling.

The shared model tests (logits, left padding, KV cache steps, greedy
generation, write-back, ``jaxcombine score``) run on the ``mixtral`` kind of
``tests/hf_models.py`` too; this file adds what only an MoE model has.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from jaxcombine.errors import ConfigError, TensorError, UnsupportedModelError
from jaxcombine.hf import load_model, save_model
from jaxcombine.moe import MoEConfig, upcycle
from tests import hf_models


def relative_error(ours, reference):
    ours, reference = np.asarray(ours), np.asarray(reference)
    return float(np.max(np.abs(ours - reference)) / np.max(np.abs(reference)))


def torch_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids, dtype=torch.long)).logits.numpy()


IDS = np.random.RandomState(3).randint(3, hf_models.VOCAB, (2, 24))


def test_fused_expert_layout_loads(tiny_models, tmp_path):
    """A state dict saved from transformers 5's fused experts (gate_up_proj) loads too."""
    ref = hf_models.load_reference(tiny_models["mixtral"])
    fused = tmp_path / "fused"
    fused.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_models["mixtral"] / name, fused / name)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    model = load_model(fused)
    expected = torch_logits(ref, IDS)
    assert relative_error(model(jnp.asarray(IDS)).logits, expected) < 1e-4
    # Written back in the hub layout (per-expert w1/w2/w3), which transformers reads.
    out = save_model(model, tmp_path / "hub")
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in f.keys()  # noqa: SIM118
    assert relative_error(torch_logits(hf_models.load_reference(out), IDS), expected) < 1e-6


def test_write_back_is_bit_exact(tiny_models, tmp_path):
    source = tiny_models["mixtral"]
    out = save_model(load_model(source), tmp_path / "out", source_dir=source)
    a = safe_open(str(source / "model.safetensors"), "np")
    b = safe_open(str(out / "model.safetensors"), "np")
    assert sorted(a.keys()) == sorted(b.keys())
    for name in a.keys():  # noqa: SIM118 (a safe_open handle is not a dict)
        np.testing.assert_array_equal(a.get_tensor(name), b.get_tensor(name))
    written = json.loads((out / "config.json").read_text())
    assert written["num_local_experts"] == 4 and written["num_experts_per_tok"] == 2


def test_router_statistics_are_returned(tiny_models):
    """moe_aux per layer: loads sum to one, nothing dropped (dropless), HF's balancing loss.

    (HF's MixtralForCausalLM aux_loss pools every layer's tokens into one
    loss; ours is per layer and per group, so HF's function is applied per row.)"""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    ref = hf_models.load_reference(tiny_models["mixtral"])
    model = load_model(tiny_models["mixtral"])
    aux = model(jnp.asarray(IDS)).moe_aux
    assert aux.load.shape == (2, 4)
    np.testing.assert_allclose(np.asarray(aux.load).sum(axis=1), 1.0, rtol=1e-6)
    assert np.all(np.asarray(aux.dropped) == 0)
    with torch.no_grad():
        router_logits = ref(torch.tensor(IDS), output_router_logits=True).router_logits
    rows, length = IDS.shape
    for layer in range(2):
        # Ours is per routing group (a row here), averaged: HF's loss of each row, averaged.
        per_row = [
            float(
                load_balancing_loss_func(
                    (router_logits[layer][r * length : (r + 1) * length],), 4, 2
                )
            )
            for r in range(rows)
        ]
        np.testing.assert_allclose(aux.load_balancing_loss[layer], np.mean(per_row), rtol=1e-5)


def test_loads_onto_an_expert_mesh(tiny_models):
    """Experts split over an `expert` mesh axis; logits equal the unsharded model."""
    devices = np.array(jax.devices()[:8]).reshape(2, 4)
    mesh = jax.sharding.Mesh(devices, ("data", "expert"))
    model = load_model(tiny_models["mixtral"], mesh=mesh)
    up = model.layers[0].moe.up.get_value()
    assert up.sharding.spec[0] == "expert"
    assert up.addressable_shards[0].data.shape[0] == 1
    plain = load_model(tiny_models["mixtral"])
    np.testing.assert_allclose(
        model(jnp.asarray(IDS)).logits, plain(jnp.asarray(IDS)).logits, rtol=1e-5, atol=1e-5
    )
    # 4 experts do not split over 8 devices: a clear error naming both sizes.
    mesh8 = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("expert",))
    with pytest.raises(ConfigError, match="4"):
        load_model(tiny_models["mixtral"], mesh=mesh8)


@pytest.fixture
def mixtral_copy(tiny_models, tmp_path):
    target = tmp_path / "mixtral"
    shutil.copytree(tiny_models["mixtral"], target)
    return target


def test_missing_expert_is_named(mixtral_copy):
    path = mixtral_copy / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(path))
    with pytest.raises(TensorError, match=r"experts\.2\.w3.*num_local_experts") as e:
        load_model(mixtral_copy)
    assert "4 experts" in str(e.value)


def test_expert_count_disagreeing_with_config(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["num_local_experts"] = 6
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(TensorError, match="6 experts"):
        load_model(mixtral_copy)


def test_top_k_over_experts_is_a_config_error(mixtral_copy):
    config = json.loads((mixtral_copy / "config.json").read_text())
    config["num_experts_per_tok"] = 5
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="5"):
        load_model(mixtral_copy)


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    """A tiny Llama whose MLPs matter (larger init), saved by transformers."""
    torch.manual_seed(5)
    config = LlamaConfig(
        vocab_size=hf_models.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
        max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    config._attn_implementation = "eager"
    path = tmp_path_factory.mktemp("dense") / "llama"
    LlamaForCausalLM(config).eval().save_pretrained(str(path))
    hf_models.save_tokenizer(path)
    return path


def test_upcycled_model_computes_the_dense_function(dense_llama, tmp_path):
    """Sparse upcycling at init: our MoE model and transformers' Mixtral of it both equal
    the dense Llama in transformers."""
    dense = load_model(dense_llama)
    moe = upcycle(dense, num_experts=4, num_experts_per_token=2, rngs=nnx.Rngs(1))
    assert moe.config.model_type == "mixtral"
    expected = torch_logits(hf_models.load_reference(dense_llama), IDS)
    out = moe(jnp.asarray(IDS))
    assert relative_error(out.logits, expected) < 1e-5
    # The router is not trivial: tokens spread over experts.
    assert np.all(np.asarray(out.moe_aux.load) < 0.9)
    written = save_model(moe, tmp_path / "moe", source_dir=dense_llama)
    mixtral = hf_models.load_reference(written)
    assert type(mixtral).__name__ == "MixtralForCausalLM"
    assert relative_error(torch_logits(mixtral, IDS), expected) < 1e-5


def test_upcycling_every_second_layer_and_its_limits(dense_llama, tmp_path):
    dense = load_model(dense_llama)
    moe = upcycle(dense, num_experts=4, moe_layer_step=2, rngs=nnx.Rngs(2))
    assert moe.layers[0].moe is None and moe.layers[1].moe is not None
    expected = np.asarray(dense(jnp.asarray(IDS)).logits)
    assert relative_error(moe(jnp.asarray(IDS)).logits, expected) < 1e-5
    assert moe(jnp.asarray(IDS)).moe_aux.load.shape == (1, 4)
    with pytest.raises(UnsupportedModelError, match="no Hugging Face architecture"):
        save_model(moe, tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
    # Switch-style top-1 without renormalisation scales the FFN by p: not the dense function.
    switch = upcycle(dense, num_experts=4, num_experts_per_token=1, renormalize=False,
                     rngs=nnx.Rngs(3))  # fmt: skip
    assert switch.config.model_type == "llama"
    assert relative_error(switch(jnp.asarray(IDS)).logits, expected) > 1e-3
    with pytest.raises(UnsupportedModelError, match="Mixtral"):
        bad = upcycle(dense, num_experts=4, capacity_factor=1.0, rngs=nnx.Rngs(4))
        save_model(bad, tmp_path / "nope2")
    with pytest.raises(UnsupportedModelError, match="already has MoE"):
        upcycle(moe, num_experts=4, rngs=nnx.Rngs(5))


def test_moe_config_in_decoder_is_checked():
    from jaxcombine.models import DecoderConfig

    with pytest.raises(ConfigError, match="hidden_size"):
        DecoderConfig(
            vocab_size=8, hidden_size=16, intermediate_size=8, num_layers=1, num_heads=2,
            num_kv_heads=2, head_dim=8, moe=MoEConfig(4, 32, 8),
        )  # fmt: skip
