"""`jaxcombine moe` end to end against mergekit-moe's own outputs.

Goldens: ``fixtures/mergekit_moe/NAME.yml`` -> ``NAME/`` (model.safetensors and
config.json written by ``mergekit-moe`` 0.1.5 from the same configs and the
tiny models in ``fixtures/mergekit_moe/models``; make_moe_fixtures.py).
mergekit-moe writes transformers 5's fused expert tensors and jaxcombine the
hub's per-expert names, so both directories are loaded with transformers (which
converts the hub names itself) and their state dicts compared. The CLI runs in
this process with the fixtures directory as working directory, as mergekit ran.
"""

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file, save_file
from safetensors.torch import load_file as load_torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from jaxcombine import cli
from jaxcombine.hf import SafetensorsCheckpoint
from jaxcombine.moe.mergekit import load_moe_config, parse_moe_config, plan_moe

HERE = Path(__file__).parent / "fixtures" / "mergekit_moe"
MODELS = HERE / "models"
CASES = ("hidden", "cheap_embed", "mistral_tied", "random")
ROUTER = re.compile(r"^model\.layers\.\d+\.mlp\.gate\.weight$")


def run(*args) -> int:
    return cli.main(["moe", *map(str, args), "--quiet"])


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """NAME -> our output directory for fixtures/mergekit_moe/NAME.yml (seed 0)."""
    root = tmp_path_factory.mktemp("moe")
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        for name in CASES:
            assert run(f"{name}.yml", root / name) == 0
    finally:
        os.chdir(cwd)
    return {name: root / name for name in CASES}


@pytest.fixture(autouse=True)
def in_fixtures(monkeypatch):
    monkeypatch.chdir(HERE)


def load_hf(path: Path):
    return AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").eval()


def state(path: Path) -> dict[str, np.ndarray]:
    return {k: v.float().numpy() for k, v in load_hf(path).state_dict().items()}


# -- against mergekit-moe ----------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_tensors_equal_mergekit(name, outputs):
    """Every tensor equals mergekit-moe's; routers: hidden within bf16 error (mergekit runs
    the base in bfloat16, jaxcombine in float32), random only in shape and scale (torch's
    generator is not reproduced)."""
    ours, golden = load_hf(outputs[name]), load_hf(HERE / name)
    assert ours.dtype == golden.dtype
    got = {k: v.float().numpy() for k, v in ours.state_dict().items()}
    want = {k: v.float().numpy() for k, v in golden.state_dict().items()}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].shape == value.shape, key
        if ROUTER.match(key) and name in ("hidden", "mistral_tied"):
            np.testing.assert_allclose(got[key], value, atol=1e-2, err_msg=key)
        elif ROUTER.match(key) and name == "random":
            assert 0.6 < got[key].std() < 1.5 and abs(got[key].mean()) < 0.5, key
        else:
            np.testing.assert_array_equal(got[key], value, err_msg=key)


@pytest.mark.parametrize("name", CASES)
def test_config_equals_mergekit(name, outputs):
    ours = json.loads((outputs[name] / "config.json").read_text())
    golden = json.loads((HERE / name / "config.json").read_text())
    golden.pop("transformers_version")
    assert ours == golden
    assert type(AutoConfig.from_pretrained(str(outputs[name]))).__name__ == "MixtralConfig"


def test_hub_expert_names_and_tokenizer(outputs):
    """The files hold the hub's per-expert names (w1 = gate_proj, w2 = down_proj, w3 =
    up_proj of the expert's source model) and the base's tokenizer."""
    out = outputs["cheap_embed"]
    tensors = SafetensorsCheckpoint(out)
    names = set(tensors.infos)
    tensors.close()
    assert "model.layers.1.block_sparse_moe.gate.weight" in names
    assert not any(".mlp." in n for n in names)
    written = load_torch(str(out / "model.safetensors"))  # bf16
    code = load_file(str(MODELS / "code" / "model.safetensors"))
    for proj, w, scale in (("gate_proj", "w1", 1), ("down_proj", "w2", 0.5), ("up_proj", "w3", 1)):
        x = written[f"model.layers.1.block_sparse_moe.experts.0.{w}.weight"].float().numpy()
        src = code[f"model.layers.1.mlp.{proj}.weight"] * np.float32(scale)
        np.testing.assert_allclose(x, src, rtol=2**-8)
    assert (out / "tokenizer.json").read_bytes() == (
        MODELS / "base" / "tokenizer.json"
    ).read_bytes()
    assert AutoTokenizer.from_pretrained(str(out)).bos_token == "<s>"


def test_transformers_runs_the_output_like_the_golden(outputs):
    ids = torch.tensor([[1, 12, 8, 9, 30, 31, 5]])
    ours, golden = load_hf(outputs["cheap_embed"]), load_hf(HERE / "cheap_embed")
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, golden(ids).logits, rtol=0, atol=0)
        kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        generated = ours.generate(ids, **kwargs)
        torch.testing.assert_close(generated, golden.generate(ids, **kwargs))
    assert generated.shape == (1, 13)


# -- the router rows against transformers in float32 --------------------------------------------


def _reference_rows(config_path: Path, average: bool) -> np.ndarray:
    """mergekit-moe's get_gate_params (moe/router.py) with transformers in float32: prompts
    left-padded with BOS as mergekit pads them; ``average`` takes each prompt's mean over
    its own tokens (run one by one, unpadded)."""
    raw = yaml.safe_load(config_path.read_text())
    base = str(config_path.parent / raw["base_model"])
    tok = AutoTokenizer.from_pretrained(base)
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()

    def states(prompts):
        if average:
            rows = []
            for p in prompts:
                enc = tok(tok.bos_token + p, return_tensors="pt", add_special_tokens=False)
                out = model(**enc, output_hidden_states=True)
                rows.append(torch.stack(out.hidden_states[:-1])[:, 0].mean(1))
            return torch.stack(rows, 1).mean(1)
        enc = tok(
            [tok.bos_token + p for p in prompts],
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
        )
        out = model(**enc, output_hidden_states=True)
        return torch.stack(out.hidden_states[:-1])[:, :, -1].mean(1)

    rows = []
    with torch.no_grad():
        for e in raw["experts"]:
            v = states(e["positive_prompts"])
            if e.get("negative_prompts"):
                v = v - states(e["negative_prompts"])
            rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    return torch.stack(rows, 1).numpy()


@pytest.mark.parametrize(
    "case, mode", [("hidden", "hidden"), ("hidden", "hidden_avg"), ("mistral_tied", "hidden")]
)
def test_hidden_routers_equal_float32_reference(case, mode, tmp_path):
    """The Mistral case has a 4-token sliding window and longer prompts."""
    raw = yaml.safe_load((HERE / f"{case}.yml").read_text())
    raw["gate_mode"] = mode
    raw["base_model"] = str(HERE / raw["base_model"])
    for e in raw["experts"]:
        e["source_model"] = str(HERE / e["source_model"])
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(raw))
    assert run(path, tmp_path / "out") == 0
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    routers = np.stack([got[f"model.layers.{i}.block_sparse_moe.gate.weight"] for i in range(2)])
    expected = _reference_rows(path, average=mode == "hidden_avg")
    np.testing.assert_allclose(routers, expected, atol=2e-6)


# -- random gates, noise, seeds -----------------------------------------------------------------


def _routers(out: Path) -> np.ndarray:
    t = load_file(str(out / "model.safetensors"))
    return np.stack([v for k, v in sorted(t.items()) if k.endswith("block_sparse_moe.gate.weight")])


def test_random_gates_follow_the_seed(tmp_path, outputs):
    assert run("random.yml", tmp_path / "same") == 0
    assert run("random.yml", tmp_path / "other", "--random-seed", "1") == 0
    np.testing.assert_array_equal(_routers(tmp_path / "same"), _routers(outputs["random"]))
    assert not np.array_equal(_routers(tmp_path / "other"), _routers(outputs["random"]))


def test_uniform_random_gates_and_expert_noise(tmp_path):
    raw = yaml.safe_load((HERE / "random.yml").read_text())
    raw["gate_mode"] = "uniform_random"
    raw["experts"][1]["noise_scale"] = 0.01
    path = tmp_path / "u.yml"
    path.write_text(yaml.safe_dump(raw))
    assert run(path, tmp_path / "out") == 0
    routers = _routers(tmp_path / "out")
    bound = 1 / np.sqrt(16)
    assert routers.shape == (2, 4, 16) and np.abs(routers).max() <= bound
    assert routers.std() > bound / 3
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    math = load_file(str(MODELS / "math" / "model.safetensors"))
    code = load_file(str(MODELS / "code" / "model.safetensors"))
    noise = (
        got["model.layers.0.block_sparse_moe.experts.1.w1.weight"]
        - math["model.layers.0.mlp.gate_proj.weight"]
    )
    assert 0.007 < noise.std() < 0.013 and abs(noise.mean()) < 0.003
    np.testing.assert_array_equal(
        got["model.layers.0.block_sparse_moe.experts.3.w1.weight"],
        code["model.layers.0.mlp.gate_proj.weight"],
    )


# -- the CLI: dry run, json, outputs -------------------------------------------------------------


def test_dry_run_reads_no_tensor_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def no_reading(self, name, *a, **k):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", no_reading)
    assert run("hidden.yml", tmp_path / "out", "--dry-run") == 0
    text = capsys.readouterr().out
    assert "3 experts, 2 per token, 2 layers" in text
    assert "model.layers.1.block_sparse_moe.experts.2.w2.weight" in text
    assert "models/chat:model.layers.1.mlp.down_proj.weight" in text
    assert not (tmp_path / "out").exists()


def test_json_summary_and_existing_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("cheap_embed.yml", out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run("cheap_embed.yml", out, "--overwrite", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["experts"] == 2 and summary["tensors"] == 2 * (6 + 1 + 2 * 3) + 3
    assert not (out / "keep.txt").exists() and (out / "mergekit_moe_config.yml").exists()


def test_shards(tmp_path):
    assert run("random.yml", tmp_path / "out", "--out-shard-size", "4000") == 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert load_hf(tmp_path / "out").config.num_local_experts == 4


def test_nan_expert_is_named_and_leaves_no_output(tmp_path, capsys):
    bad = shutil.copytree(MODELS / "math", tmp_path / "math_nan")
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 2] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    raw = yaml.safe_load((HERE / "random.yml").read_text())
    raw["base_model"] = str(MODELS / "base")
    raw["experts"] = [{"source_model": str(MODELS / "code")}, {"source_model": str(bad)}]
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(raw))
    assert run(path, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and name in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


# -- bad configs and inputs: a clear error (exit 2) before any tensor data is read -------------


def _model(tmp_path, src: str, dst: str, config=None, tensors=None, drop=()) -> str:
    path = shutil.copytree(MODELS / src, tmp_path / dst)
    for name in drop:
        (path / name).unlink()
    if config:
        cfg = json.loads((path / "config.json").read_text())
        cfg.update(config)
        (path / "config.json").write_text(json.dumps(cfg))
    if tensors:
        data = load_file(str(path / "model.safetensors"))
        data.update(tensors)
        save_file(data, str(path / "model.safetensors"), metadata={"format": "pt"})
    return str(path)


def _bad_cases(tmp_path):
    good = yaml.safe_load((HERE / "hidden.yml").read_text())
    good["base_model"] = str(MODELS / "base")
    for e in good["experts"]:
        e["source_model"] = str(HERE / e["source_model"])

    def with_(**changes):
        return {**json.loads(json.dumps(good)), **changes}

    def expert(i, **changes):
        config = with_()
        config["experts"][i].update(changes)
        return config

    yield "unknown key 'gate_mod'.*did you mean 'gate_mode'", {**with_(), "gate_mod": "random"}
    misspelled = with_()
    misspelled["experts"][0]["positive_prompt"] = misspelled["experts"][0].pop("positive_prompts")
    yield "experts\\[0\\].positive_prompt: unknown key.*did you mean 'positive_prompts'", misspelled
    yield (
        "unknown gate_mode 'cheap_embeds'.*did you mean 'cheap_embed'",
        with_(gate_mode="cheap_embeds"),
    )
    yield "experts_per_token is 4 but there are only 3 experts", with_(experts_per_token=4)
    yield "experts_per_token must be an integer >= 1", with_(experts_per_token=0)
    yield "expert 1 has no positive prompts.*gate_mode: random", expert(1, positive_prompts=[])
    same = with_()
    for e in same["experts"]:
        e["positive_prompts"], e["negative_prompts"] = ["def"], []
    yield "every expert has the same prompts", same
    yield (
        "every expert is the same model.*not-useful-without-training",
        with_(experts=[{**e, "source_model": str(MODELS / "code")} for e in good["experts"]]),
    )
    yield "prompts must be a list of strings", expert(0, negative_prompts=[1, 2])
    yield (
        "shared_experts need a Qwen2-MoE or DeepSeek output",
        with_(shared_experts=[{"source_model": str(MODELS / "code")}]),
    )
    yield "output architecture 'Qwen MoE' is not supported", with_(architecture="qwen")
    yield (
        "no output architecture matches 'mixtrl'.*did you mean 'Mixtral'",
        with_(architecture="mixtrl"),
    )
    yield "tokenizer_source 'union' is not supported", with_(tokenizer_source="union")
    yield "unsupported dtype 'float8'", with_(dtype="float8")
    yield "base_model is missing", {k: v for k, v in good.items() if k != "base_model"}
    yield "experts must be a non-empty list", with_(experts=[])
    yield (
        "experts\\[2\\].source_model.*model directory does not exist",
        expert(2, source_model=str(tmp_path / "nowhere")),
    )
    no_tok = _model(tmp_path, "base", "no_tok", drop=("tokenizer.json",))
    yield (
        "tokenizes the prompts with the base.*tokenizer.json is missing.*gate_mode: random",
        (with_(base_model=no_tok, gate_mode="cheap_embed")),
    )
    qwen = _model(tmp_path, "base", "qwen", config={"model_type": "qwen2"})
    yield "model_type 'qwen2' cannot become a Mixtral model", with_(base_model=qwen)
    biased = _model(tmp_path, "base", "biased", config={"attention_bias": True})
    yield "attention_bias is true, and Mixtral has no biases", with_(base_model=biased)
    mistral = _model(tmp_path, "chat", "mistral", config={"model_type": "mistral"})
    yield (
        "expert .*mistral' is a 'mistral' model but the base is 'llama'",
        expert(2, source_model=mistral),
    )
    deeper = _model(tmp_path, "math", "deeper", config={"num_hidden_layers": 3})
    yield "expert has 3 layers, the base model 2", expert(1, source_model=deeper)
    name = "model.layers.1.mlp.up_proj.weight"
    wide = _model(tmp_path, "math", "wide", tensors={name: np.zeros((48, 16), np.float32)})
    yield (
        re.escape(f"{wide}: {name}: shape (48, 16) differs from (32, 16)"),
        expert(1, source_model=wide),
    )
    extra = _model(
        tmp_path, "base", "extra", tensors={"model.layers.0.self_attn.q_proj.bias": np.zeros(16)}
    )
    yield (
        "no place in a Mixtral model: model.layers.0.self_attn.q_proj.bias",
        with_(base_model=extra),
    )
    rope = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}
    yarn = _model(tmp_path, "base", "yarn", config={"rope_parameters": rope})
    yield (
        "rope type 'yarn' is not supported",
        with_(base_model=yarn),
    )  # the NNX decoder can't run it
    yield (
        "prompt has 40 tokens, more than the base model's max_position_embeddings 32",
        expert(0, positive_prompts=["the " * 39]),
    )


def test_bad_configs_fail_before_reading(tmp_path, monkeypatch, capsys):
    def no_reading(self, name, *a, **k):
        raise AssertionError(f"read {name} before the error")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", no_reading)
    for i, (pattern, config) in enumerate(_bad_cases(tmp_path)):
        path = tmp_path / f"bad{i}.yml"
        path.write_text(yaml.safe_dump(config))
        out = tmp_path / f"out{i}"
        assert run(path, out) == 2, pattern
        err = capsys.readouterr().err
        assert re.search(pattern, err, flags=re.S), (pattern, err)
        assert "How to fix" in err, err
        assert not out.exists()


def test_random_gates_need_no_tokenizer_nor_prompts(tmp_path):
    base = _model(tmp_path, "base", "no_tok", drop=("tokenizer.json", "tokenizer_config.json"))
    raw = yaml.safe_load((HERE / "random.yml").read_text())
    raw["base_model"] = base
    raw["experts"] = [{"source_model": str(MODELS / "code")}] * 2  # upcycling: copies allowed
    config = parse_moe_config(raw)
    plan = plan_moe(config)
    assert len(plan.tensors) == 3 + 2 * (6 + 1 + 2 * 3)
    plan.close()


EXAMPLES = sorted((Path(__file__).parents[1] / "configs" / "moe").glob("*.yml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_configs_plan(path, tmp_path):
    """configs/moe/*.yml are valid: planned against the tiny fixture models."""
    raw = yaml.safe_load(path.read_text())
    stand_ins = iter(("code", "math", "chat", "code"))
    raw["base_model"] = str(MODELS / "base")
    for e in raw["experts"]:
        e["source_model"] = str(MODELS / next(stand_ins))
    copy = tmp_path / path.name
    copy.write_text(yaml.safe_dump(raw))
    plan = plan_moe(load_moe_config(copy))
    assert plan.describe() and len(plan.tensors) > 0
    plan.close()


def test_jaxcombine_loads_the_output_like_transformers_loads_the_golden(outputs):
    """jaxcombine's own Mixtral decoder runs our directory as transformers runs mergekit's."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxcombine.hf import load_model

    ids = [[1, 12, 8, 9, 30, 31, 5, 40]]
    graphdef, params = nnx.split(load_model(outputs["cheap_embed"], dtype=jnp.float32))
    forward = jax.jit(lambda p, t: nnx.merge(graphdef, p)(t).logits)
    got = np.asarray(forward(params, jnp.asarray(ids)))
    golden = AutoModelForCausalLM.from_pretrained(str(HERE / "cheap_embed"), dtype=torch.float32)
    with torch.no_grad():
        want = golden.eval()(torch.tensor(ids)).logits.numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
