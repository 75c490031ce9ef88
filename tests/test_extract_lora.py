"""`jaxcombine extract-lora` against its oracles: PEFT itself and numpy's SVD.

* A fine-tune whose update has rank <= max_rank comes back exactly: the
  adapter loaded by ``peft.PeftModel.from_pretrained`` on the base model gives
  the fine-tuned transformers model's logits (LoRA layers, embedding LoRA,
  biases and modules_to_save all exercised).
* A full-rank update reaches the Eckart–Young optimum per module (numpy SVD in
  float64), and PEFT's ``merge_and_unload`` weights are base + B @ A from the file.
* Bad input is refused before any work, with exit status 2 and no output left.
"""

import copy
import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from jaxcombine import cli
from jaxcombine.errors import InputError
from jaxcombine.lora import extract_lora

TINY = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=32,
    initializer_range=0.2,
)
PREFIX = "base_model.model."
UNTOUCHED = "model.layers.0.mlp.down_proj.weight"  # a linear left as in the base
NORM = "model.layers.1.post_attention_layernorm.weight"  # a changed non-linear tensor


def _save(model, path):
    model.save_pretrained(str(path))
    return path


def _load(path):
    return AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _low_rank(shape, rank, gen):
    out, inp = shape
    return 0.2 * torch.randn(out, rank, generator=gen) @ torch.randn(rank, inp, generator=gen)


def _fine_tune(base, *, rank=None, seed=1, skip=(UNTOUCHED,)):
    """base + an update on every 2-D weight (rank ``rank``, or full rank) and on NORM."""
    ft, gen = copy.deepcopy(base), torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if p.ndim == 2 and name not in skip:
                p += (
                    _low_rank(p.shape, rank, gen)
                    if rank
                    else 0.2 * torch.randn(*p.shape, generator=gen)
                )
            elif name == NORM:
                p += 0.3 * torch.randn(*p.shape, generator=gen)
    return ft


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Untied Llama directories: base, rank-2 and full-rank fine-tunes, a norm-only change."""
    root = tmp_path_factory.mktemp("lora_llama")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, tie_word_embeddings=False))
    return {
        "base": _save(base, root / "base"),
        "low": _save(_fine_tune(base, rank=2), root / "low"),
        "full": _save(_fine_tune(base, seed=2), root / "full"),
        "norm_only": _save(_fine_tune(base, skip=dict(base.named_parameters())), root / "norm"),
    }


def _tensors(path):
    return load_file(str(path / "model.safetensors"))


def _logits(model, seed=0):
    ids = torch.randint(
        0, TINY["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(seed)
    )
    with torch.no_grad():
        return model(input_ids=ids).logits.numpy()


def _assert_rel_close(actual, expected, tol=1e-4):
    scale = np.abs(expected).max()
    assert np.abs(actual - expected).max() <= tol * scale, np.abs(actual - expected).max() / scale


def _run_cli(*args):
    return cli.main(["extract-lora", *map(str, args)])


# --------------------------------------------------------------------------- exact recovery


def test_low_rank_update_is_recovered_exactly_through_peft(llama, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert _run_cli("--model", llama["low"], "--base", llama["base"], "--out", out,
                    "--max-rank", 4, "--json") == 0  # fmt: skip
    result = json.loads(capsys.readouterr().out)

    # What went where: 14 linears of the layers, lm_head and the embedding as LoRA,
    # the changed norm saved whole; 4 norms and the untouched down_proj left out.
    assert result["rank"] == 4 and result["modules"] == 15
    assert result["embedding_modules"] == ["model.embed_tokens"]
    assert "model.layers.0.mlp.down_proj" not in result["lora_modules"]
    assert result["modules_to_save"] == ["model.layers.1.post_attention_layernorm"]
    assert result["biases"] == [] and result["unchanged"] == 5
    assert result["relative_error"] < 1e-5

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == config["lora_alpha"] == 4 and config["rank_pattern"] == {}
    # down_proj of layer 0 is unchanged, so down_proj is targeted by full path only.
    assert sorted(config["target_modules"]) == sorted(
        ["embed_tokens", "gate_proj", "k_proj", "lm_head", "o_proj", "q_proj", "up_proj",
         "v_proj", "model.layers.1.mlp.down_proj"]
    )  # fmt: skip

    expected = _logits(_load(llama["low"]))
    peft_model = PeftModel.from_pretrained(_load(llama["base"]), str(out)).eval()
    _assert_rel_close(_logits(peft_model), expected)

    # The file holds exactly what PEFT itself saves for the loaded adapter.
    ours = load_file(str(out / "adapter_model.safetensors"))
    theirs = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    assert sorted(ours) == sorted(theirs)
    for key, value in theirs.items():
        np.testing.assert_array_equal(ours[key], value.numpy(), err_msg=key)

    _assert_rel_close(_logits(peft_model.merge_and_unload()), expected)
    base_logits = _logits(_load(llama["base"]))  # not vacuous: the base is far from the fine-tune
    assert np.abs(base_logits - expected).max() > 1e-2 * np.abs(expected).max()


def test_tied_embeddings_and_biases_are_recovered_through_peft(tmp_path):
    """Qwen2 with tied embeddings: biases (LoRA'd and not) and the embedding change too."""
    torch.manual_seed(0)
    config = Qwen2Config(**TINY, tie_word_embeddings=True)
    base = AutoModelForCausalLM.from_config(config)
    skip = ("model.layers.0.self_attn.k_proj.weight",)
    ft = _fine_tune(base, rank=2, skip=skip)
    with torch.no_grad():
        for name, p in ft.named_parameters():
            if name.endswith("q_proj.bias") or name == "model.layers.0.self_attn.k_proj.bias":
                p += 0.3 * torch.randn(*p.shape)
    base_dir, ft_dir = _save(base, tmp_path / "base"), _save(ft, tmp_path / "ft")
    assert "lm_head.weight" not in _tensors(ft_dir)

    result = extract_lora(ft_dir, base_dir, tmp_path / "adapter", max_rank=3)
    assert result["modules_to_save"] == [
        "lm_head",
        "model.embed_tokens",
        "model.layers.1.post_attention_layernorm",
    ]
    assert result["biases"] == [
        "model.layers.0.self_attn.k_proj.bias",
        "model.layers.0.self_attn.q_proj.bias",
        "model.layers.1.self_attn.q_proj.bias",
    ]
    assert result["embedding_modules"] == [] and result["modules"] == 13
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["bias"] == "all"

    expected = _logits(_load(ft_dir))
    peft_model = PeftModel.from_pretrained(_load(base_dir), str(tmp_path / "adapter")).eval()
    _assert_rel_close(_logits(peft_model), expected)
    _assert_rel_close(_logits(peft_model.merge_and_unload()), expected)


# --------------------------------------------------------------------------- Eckart–Young


@pytest.mark.parametrize("max_rank", [3, 12])
def test_full_rank_update_reaches_the_eckart_young_optimum(llama, tmp_path, max_rank):
    out = tmp_path / "adapter"
    result = extract_lora(llama["full"], llama["base"], out, max_rank=max_rank)
    base, ft = _tensors(llama["base"]), _tensors(llama["full"])
    adapter = load_file(str(out / "adapter_model.safetensors"))
    config = json.loads((out / "adapter_config.json").read_text())

    err_sq = norm_sq = 0.0
    deltas = {}  # module -> B @ A as PEFT applies it, [out, in] like the weight
    for module in result["lora_modules"]:
        d = ft[f"{module}.weight"].astype(np.float64) - base[f"{module}.weight"]
        s = np.linalg.svd(d, compute_uv=False)
        r = min(max_rank, *d.shape)
        if module == "model.embed_tokens":
            b_a = (adapter[f"{PREFIX}{module}.lora_embedding_B"].astype(np.float64)
                   @ adapter[f"{PREFIX}{module}.lora_embedding_A"]).T  # fmt: skip
        else:
            b_a = (
                adapter[f"{PREFIX}{module}.lora_B.weight"].astype(np.float64)
                @ adapter[f"{PREFIX}{module}.lora_A.weight"]
            )
        assert np.linalg.matrix_rank(b_a) == r, module
        optimum = np.sqrt(np.sum(s[r:] ** 2))
        # float32 SVD: equal to 1e-4 relative, or to 1e-6 of ||D|| where nothing is discarded
        atol = 1e-6 * np.linalg.norm(d)
        np.testing.assert_allclose(
            np.linalg.norm(d - b_a), optimum, rtol=1e-4, atol=atol, err_msg=module
        )
        err_sq, norm_sq = err_sq + optimum**2, norm_sq + np.sum(s**2)
        deltas[module] = b_a
    np.testing.assert_allclose(result["relative_error"], np.sqrt(err_sq / norm_sq), rtol=1e-4)

    # k_proj / v_proj are [8, 16]: at max_rank 12 they get rank 8, listed in rank_pattern.
    small = config["rank_pattern"]
    if max_rank == 12:
        assert set(small) == {
            f"layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("k_proj", "v_proj")
        }
        assert set(small.values()) == {8} and config["alpha_pattern"] == small
    else:
        assert small == {}

    merged = PeftModel.from_pretrained(_load(llama["base"]), str(out)).merge_and_unload()
    weights = {k: v.numpy() for k, v in merged.state_dict().items()}
    for module, b_a in deltas.items():
        np.testing.assert_allclose(
            weights[f"{module}.weight"], base[f"{module}.weight"] + b_a, atol=1e-5, err_msg=module
        )
    np.testing.assert_array_equal(weights[NORM], ft[NORM])
    np.testing.assert_array_equal(weights[UNTOUCHED], base[UNTOUCHED])


def test_bfloat16_adapter(llama, tmp_path):
    extract_lora(llama["low"], llama["base"], tmp_path / "a", max_rank=2, dtype="bfloat16")
    adapter = load_file(str(tmp_path / "a" / "adapter_model.safetensors"))
    assert {str(v.dtype) for v in adapter.values()} == {"bfloat16"}


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def other_models(tmp_path_factory):
    """Models that are not fine-tunes of llama['base']: other shapes, names, model_type."""
    root = tmp_path_factory.mktemp("lora_other")
    make = lambda cls, **kw: AutoModelForCausalLM.from_config(
        cls(**{**TINY, "tie_word_embeddings": False, **kw})
    )
    return {
        "wider": _save(make(LlamaConfig, intermediate_size=48), root / "wider"),
        "deeper": _save(make(LlamaConfig, num_hidden_layers=3), root / "deeper"),
        "mistral": _save(make(MistralConfig), root / "mistral"),
    }


@pytest.mark.parametrize(
    "case,message",
    [
        ("missing", "model directory does not exist"),
        ("rank0", "max_rank must be a positive integer, got 0"),
        ("wider", "shape differs: model has (16, 48), base has (16, 32)"),
        ("deeper", "only in the model: model.layers.2."),
        ("mistral", "model_type differs: model has 'mistral', base has 'llama'"),
        ("identical", "the model is identical to the base"),
        ("norm_only", "there is no LoRA to extract; only these changed: model.layers.1.post_"),
        ("inside", "overlaps an input model directory"),
    ],
)
def test_bad_input_exits_2_and_leaves_no_output(
    llama, other_models, tmp_path, capsys, case, message
):
    model, rank, out = llama["low"], 4, tmp_path / "adapter"
    if case == "missing":
        model = tmp_path / "nope"
    elif case == "rank0":
        rank = 0
    elif case in other_models:
        model = other_models[case]
    elif case in ("identical", "norm_only"):
        model = llama["base" if case == "identical" else case]
    elif case == "inside":
        out = llama["low"] / "adapter"
    code = _run_cli("--model", model, "--base", llama["base"], "--out", out, "--max-rank", rank)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "How to fix" in err and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(llama, tmp_path, capsys):
    out = tmp_path / "adapter"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["--model", llama["low"], "--base", llama["base"], "--out", out, "--max-rank", 2]
    assert _run_cli(*args) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and str(out) in err and "--overwrite" in err
    assert (out / "keep.txt").read_text() == "mine"

    assert _run_cli(*args, "--overwrite") == 0
    assert "wrote LoRA adapter" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no temporaries left


def test_max_rank_must_be_an_int(llama, tmp_path):
    with pytest.raises(InputError, match="max_rank"):
        extract_lora(llama["low"], llama["base"], tmp_path / "a", max_rank=2.5)
