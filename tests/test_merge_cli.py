"""`jaxcombine merge` end to end against mergekit's own outputs.

Goldens: ``fixtures/mergekit/NAME.yml`` -> ``NAME.safetensors`` (one per
method, make_merge_fixtures.py) and ``fixtures/mergekit/cli/NAME.yml`` ->
``cli/NAME/`` (slices, frankenmerges, tokenizer merging, tied embeddings, bf16
inputs; make_cli_fixtures.py), all written by ``mergekit-yaml`` 0.1.5 on the
same configs and files. The CLI runs in this process (``cli.main``) with the
fixtures directory as working directory, as mergekit ran.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
import yaml
from safetensors.numpy import load_file
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from jaxcombine import cli, merging
from jaxcombine.hf import SafetensorsCheckpoint
from jaxcombine.merging.mergekit import (
    load_merge_config,
    parse_merge_config,
    plan_merge,
    run_merge,
)

HERE = Path(__file__).parent / "fixtures" / "mergekit"
CLI = HERE / "cli"
METHOD_GOLDENS = sorted(p.stem for p in HERE.glob("*.yml"))
RANDOM = sorted(name for name, spec in merging.SPECS.items() if spec.random)


@pytest.fixture(autouse=True)
def in_fixtures(monkeypatch):
    monkeypatch.chdir(HERE)


def run(*args) -> int:
    return cli.main(["merge", *map(str, args), "--quiet"])


def merged(out: Path) -> dict:
    index = out / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors = {}
    for f in files:
        tensors.update(load_file(str(out / f)))
    return tensors


def assert_close(got: dict, expected: dict, atol=1e-6):
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].shape == value.shape, name
        err = np.max(np.abs(got[name].astype(np.float64) - value.astype(np.float64)), initial=0)
        assert err <= atol, (name, err)


@pytest.mark.parametrize("name", METHOD_GOLDENS)
def test_method_equals_mergekit(name, tmp_path):
    assert run(HERE / f"{name}.yml", tmp_path / "out") == 0
    assert_close(merged(tmp_path / "out"), load_file(str(HERE / f"{name}.safetensors")))


@pytest.mark.parametrize("name", ["linear", "task_arithmetic"])
def test_elementwise_chunks_equal_mergekit(name, tmp_path, monkeypatch):
    """Elementwise methods stream flat chunks; with chunks of 1000 and 96 elements every
    tensor is cut, tails are zero-padded, and the pieces land at their offsets."""
    from jaxcombine.merging.mergekit import _run

    assert merging.SPECS[name].elementwise
    monkeypatch.setattr(_run, "_CHUNK", 1000)
    monkeypatch.setattr(_run, "_SMALL_CHUNK", 96)
    plan = plan_merge(load_merge_config(HERE / f"{name}.yml"))
    units = _run._units(plan, 1000, 96)
    assert {u.size for u in units} == {1000, 96} and any(u.count % 96 for u in units)
    assert run(HERE / f"{name}.yml", tmp_path / "out") == 0
    assert_close(merged(tmp_path / "out"), load_file(str(HERE / f"{name}.safetensors")))


@pytest.mark.parametrize("name", ["frankenmerge", "slices_slerp", "tied_linear"])
def test_structure_equals_mergekit(name, tmp_path):
    out = tmp_path / "out"
    assert run(CLI / f"{name}.yml", out) == 0
    assert_close(merged(out), load_file(str(CLI / name / "model.safetensors")))
    ours, theirs = (json.loads((d / "config.json").read_text()) for d in (out, CLI / name))
    assert ours["num_hidden_layers"] == theirs["num_hidden_layers"]


def test_frankenmerge_loads_in_transformers(tmp_path):
    """Passthrough slices [0, 2) of ft1 + [1, 3) of ft2: 4 layers, loaded without missing keys."""
    out = tmp_path / "out"
    assert run(CLI / "frankenmerge.yml", out) == 0
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert model.config.num_hidden_layers == 4
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ft2 = load_file(str(HERE / "ft2" / "model.safetensors"))
    torch.testing.assert_close(
        model.model.layers[3].mlp.up_proj.weight.detach(),
        torch.from_numpy(ft2["model.layers.2.mlp.up_proj.weight"]),
    )


def test_tied_head_is_kept(tmp_path):
    """A tied model contributes its embedding as the head; the written head is not tied away.

    mergekit writes the same lm_head but may copy the tied model's config
    (tie_word_embeddings: true), which makes transformers drop the merged head.
    """
    out = tmp_path / "out"
    assert run(CLI / "tied_linear.yml", out) == 0
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    model = AutoModelForCausalLM.from_pretrained(out)
    head = merged(out)["lm_head.weight"]
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), head)
    assert not np.array_equal(head, merged(out)["model.embed_tokens.weight"])


def test_tied_models_stay_tied(tmp_path):
    config = {"merge_method": "linear", "models": [{"model": "cli/models/tied"}] * 1}
    config["models"] = [
        {"model": "cli/models/tied", "parameters": {"weight": 1.0}},
        {"model": "cli/models/tied", "parameters": {"weight": 1.0}},
    ]
    path = tmp_path / "tied.yml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    assert run(path, out) == 0
    assert "lm_head.weight" not in merged(out)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_bf16_inputs_fp32_compute(tmp_path):
    """bf16 inputs, dtype: float32, out_dtype: bfloat16 (within one bf16 rounding of mergekit)."""
    out = tmp_path / "out"
    assert run(CLI / "bf16_fp32.yml", out) == 0
    got, expected = merged(out), load_file(str(CLI / "bf16_fp32" / "model.safetensors"))
    assert {str(v.dtype) for v in got.values()} == {"bfloat16"}
    for name, value in expected.items():
        a, b = got[name].astype(np.float32), value.astype(np.float32)
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=1e-6, err_msg=name)
        assert np.mean(a == b) > 0.99, name
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def _rows_by_token(out: Path) -> tuple[dict, dict, int]:
    vocab = Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab(with_added_tokens=True)
    return vocab, merged(out), json.loads((out / "config.json").read_text())["vocab_size"]


@pytest.mark.parametrize("name", ["union_linear", "tokenizer_base", "tokenizer_tokens"])
def test_tokenizer_merge_equals_mergekit(name, tmp_path):
    """Every output token's embedding and head row equal mergekit's, token by token."""
    out = tmp_path / "out"
    assert run(CLI / f"{name}.yml", out) == 0
    ours_vocab, ours, ours_size = _rows_by_token(out)
    theirs_vocab, theirs, theirs_size = _rows_by_token(CLI / name)
    assert set(ours_vocab) == set(theirs_vocab)
    assert ours_size == theirs_size
    for tensor, value in theirs.items():
        if value.shape[0] != theirs_size:  # not indexed by token
            np.testing.assert_allclose(ours[tensor], value, atol=1e-6, err_msg=tensor)
            continue
        assert ours[tensor].shape == value.shape
        for token, theirs_id in theirs_vocab.items():
            np.testing.assert_allclose(
                ours[tensor][ours_vocab[token]], value[theirs_id], atol=1e-6, err_msg=token
            )
        pad = slice(len(theirs_vocab), theirs_size)
        np.testing.assert_allclose(ours[tensor][pad], value[pad], atol=1e-6)
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == len(ours_vocab)
    assert tok.convert_tokens_to_ids("w30") == ours_vocab["w30"]


def test_union_order_is_deterministic(tmp_path):
    """The union lists the base's tokens, then new regular tokens, then new added tokens."""
    assert run(CLI / "union_linear.yml", tmp_path / "a") == 0
    vocab, _, _ = _rows_by_token(tmp_path / "a")
    base = Tokenizer.from_file(str(CLI / "models" / "tok_a" / "tokenizer.json")).get_vocab()
    assert all(vocab[t] == i for t, i in base.items())
    new = sorted((i, t) for t, i in vocab.items() if t not in base)
    assert [t for _, t in new] == [f"v{i}" for i in range(27)] + ["<|im_end|>"]


def test_chat_template(tmp_path):
    config = yaml.safe_load((HERE / "linear.yml").read_text())
    config["chat_template"] = "chatml"
    config["tokenizer_source"] = "base"
    config["models"] = [
        {"model": "cli/models/tok_a", "parameters": {"weight": 1.0}},
        {"model": "cli/models/tok_a", "parameters": {"weight": 1.0}},
    ]
    path = tmp_path / "chat.yml"
    path.write_text(yaml.safe_dump(config))
    assert run(path, tmp_path / "out") == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize("name", RANDOM)
def test_random_method_streams_like_the_in_memory_merge(name, tmp_path):
    """The streamed CLI merge equals merging.merge with the same seed (tensor keys by name)."""
    config = {
        "merge_method": name,
        "base_model": "base",
        "parameters": {"lambda": 0.8} if name != "dare_linear" else {},
        "models": [
            {"model": "ft1", "parameters": {"weight": 0.6, "density": [0.3, 0.9]}},
            {"model": "ft2", "parameters": {"weight": 0.4, "density": 0.5}},
        ],
    }
    if name.startswith("della"):
        config["parameters"]["epsilon"] = 0.05
    path = tmp_path / "random.yml"
    path.write_text(yaml.safe_dump(config))
    assert run(path, tmp_path / "out", "--random-seed", "7") == 0
    models = [load_file(str(HERE / m / "model.safetensors")) for m in ("ft1", "ft2")]
    expected = merging.merge(
        name,
        models,
        base=load_file(str(HERE / "base" / "model.safetensors")),
        model_parameters=[m["parameters"] for m in config["models"]],
        parameters=config["parameters"],
        key=jax.random.key(7),
    )
    assert_close(merged(tmp_path / "out"), {k: np.asarray(v) for k, v in expected.items()})


def test_shards_and_sharded_compute(tmp_path):
    """Small --out-shard-size gives several shards and an index; splitting every tensor over
    the 8 devices gives the same tensors; transformers loads the sharded output."""
    plan = plan_merge(load_merge_config(HERE / "ties.yml"))
    run_merge(plan, tmp_path / "sharded", out_shard_size="8K", progress=False, shard_threshold=1)
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert len(files) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert_close(merged(tmp_path / "sharded"), load_file(str(HERE / "ties.safetensors")))
    model, info = AutoModelForCausalLM.from_pretrained(
        tmp_path / "sharded", output_loading_info=True
    )
    assert not info["missing_keys"]


def test_dry_run_reads_no_tensor_and_writes_nothing(tmp_path, monkeypatch, capsys):
    def no_reading(self, name):
        raise AssertionError(f"read {name}")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", no_reading)
    assert run(CLI / "slices_slerp.yml", tmp_path / "out", "--dry-run") == 0
    text = capsys.readouterr().out
    assert not (tmp_path / "out").exists()
    assert "model.layers.3.mlp.up_proj.weight" in text  # 4 output layers
    assert "base=base:model.layers.2.mlp.up_proj.weight" in text  # from layer 2 of the sources
    assert text.count("\n") > 4 * 9


def test_killed_merge_leaves_no_output(tmp_path):
    """SIGKILL in the middle of a merge: no OUT_DIR; the rerun succeeds."""
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxcombine.cli", "merge", str(HERE / "ties.yml"), str(out)]
    proc = subprocess.Popen(cmd, cwd=HERE, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:  # wait until shards are being written
        temps = list(tmp_path.glob(".out.tmp-*/model.safetensors"))
        if temps and proc.poll() is None:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "merge finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert subprocess.run(cmd + ["--quiet"], cwd=HERE, env=env).returncode == 0
    assert_close(merged(out), load_file(str(HERE / "ties.safetensors")))
    assert not list(tmp_path.glob(".out.tmp-*"))  # the stale temporary was removed


# -- bad configs and inputs: a clear error (exit 2) before any tensor data is read -------------


def _write(tmp_path, config) -> Path:
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(config) if isinstance(config, dict) else config)
    return path


def _copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


TIES = {
    "merge_method": "ties",
    "base_model": "base",
    "models": [
        {"model": "ft1", "parameters": {"weight": 1.0, "density": 0.5}},
        {"model": "ft2", "parameters": {"weight": 1.0, "density": 0.5}},
    ],
}


def _bad_cases(tmp_path):
    yield "unknown merge method 'tie'.*did you mean 'ties'", {**TIES, "merge_method": "tie"}
    misspelled = json.loads(json.dumps(TIES))
    misspelled["models"][0]["parameters"]["densty"] = 0.5
    yield "unknown parameter 'densty'.*did you mean 'density'", misspelled
    yield (
        "unknown key 'base_modle'.*did you mean 'base_model'",
        {
            **{k: v for k, v in TIES.items() if k != "base_model"},
            "base_modle": "base",
        },
    )
    yield "model directory does not exist", {**TIES, "base_model": "no/such_model_dir_here"}
    yield (
        "must span the same number of layers",
        {
            "merge_method": "passthrough",
            "slices": [
                {
                    "sources": [
                        {"model": "ft1", "layer_range": [0, 2]},
                        {"model": "ft2", "layer_range": [0, 3]},
                    ]
                }
            ],
        },
    )
    yield (
        r"layer_range \[1, 4\) goes past the model's 3 layers",
        {
            "merge_method": "passthrough",
            "slices": [{"sources": [{"model": "ft1", "layer_range": [1, 4]}]}],
        },
    )
    other = _copy_model(HERE / "ft2", tmp_path / "mistral_ft2", model_type="mistral")
    yield (
        "different architectures",
        {
            **TIES,
            "models": [
                TIES["models"][0],
                {"model": str(other), "parameters": TIES["models"][1]["parameters"]},
            ],
        },
    )
    yield (
        "tokenizers of .* differ.*tokenizer_source: union",
        {
            "merge_method": "linear",
            "models": [
                {"model": "cli/models/tok_a", "parameters": {"weight": 1.0}},
                {"model": "cli/models/tok_b", "parameters": {"weight": 1.0}},
            ],
        },
    )
    broken = _copy_model(HERE / "ft1", tmp_path / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 2])
    yield (
        "corrupted or truncated",
        {
            **TIES,
            "models": [{"model": str(broken), "parameters": TIES["models"][0]["parameters"]}],
        },
    )
    yield (
        r"density=1.5 is outside \(0.0, 1.0\]",
        {
            **TIES,
            "models": [{"model": "ft1", "parameters": {"weight": 1.0, "density": [0.5, 1.5]}}],
        },
    )
    yield (
        "rule 'self_atn' matches no tensor",
        {
            **TIES,
            "parameters": {"lambda": [{"filter": "self_atn", "value": 0.5}, {"value": 1.0}]},
        },
    )


def test_bad_configs_fail_before_reading(tmp_path, monkeypatch, capsys):
    def no_reading(self, name):
        raise AssertionError(f"read {name} before the error")

    monkeypatch.setattr(SafetensorsCheckpoint, "read", no_reading)
    for i, (pattern, config) in enumerate(_bad_cases(tmp_path)):
        out = tmp_path / f"out{i}"
        assert run(_write(tmp_path, config), out) == 2, pattern
        err = capsys.readouterr().err
        assert re.search(pattern, err, flags=re.S), (pattern, err)
        assert not out.exists()


def test_existing_output_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run(HERE / "linear.yml", out) == 2
    assert "already exists" in capsys.readouterr().err and (out / "keep.txt").exists()
    assert run(HERE / "linear.yml", out, "--overwrite") == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_nan_input_is_named_and_leaves_no_output(tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    bad = _copy_model(Path("ft2"), tmp_path / "ft2_nan")
    tensors = load_file(bad / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 2] = np.nan
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(json.dumps(TIES))
    config["models"][1]["model"] = str(bad)
    out = tmp_path / "out"
    assert run(_write(tmp_path, config), out) == 2
    err = capsys.readouterr().err
    assert "NaN or Inf" in err and f"{bad}: {name}" in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_hub_id_gets_a_download_hint(tmp_path, capsys):
    assert (
        run(_write(tmp_path, {**TIES, "base_model": "meta-llama/Llama-3.1-8B"}), tmp_path / "o")
        == 2
    )
    assert "huggingface-cli download meta-llama/Llama-3.1-8B" in capsys.readouterr().err


EXAMPLES = sorted((Path(__file__).parents[1] / "configs" / "merge").glob("*.yml"))
STAND_INS = {
    "ft_math": "ft1",
    "ft_code": "ft2",
    "ft_chat": "ft3",
    "ft_toxic": "ft3",
    "base": "base",
}


def _stand_in(ref: str, tokenizers: bool) -> str:
    """The tiny fixture model playing an example config's ./models/NAME."""
    name = Path(ref).name
    if tokenizers:
        return str(CLI / "models" / ("tok_b" if name == "ft_chat" else "tok_a"))
    return str(HERE / STAND_INS.get(name, f"ft{name[-1]}" if name[-1].isdigit() else "ft1"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_configs_plan(path):
    """configs/merge/*.yml are valid: planned against tiny stand-ins for their models."""
    raw = yaml.safe_load(path.read_text())
    tokenizers = "tokenizer" in raw or "tokenizer_source" in raw
    swap = lambda ref: _stand_in(ref, tokenizers)  # noqa: E731
    for entry in raw.get("models", []):
        entry["model"] = swap(entry["model"])
    for i, s in enumerate(raw.get("slices", [])):
        for src in s["sources"]:
            src["model"] = swap(src["model"])
            src["layer_range"] = [i, i + 2]
    if "base_model" in raw:
        raw["base_model"] = swap(raw["base_model"])
    for setting in (raw.get("tokenizer") or {}).get("tokens", {}).values():
        setting["source"] = swap(setting["source"])
    plan = plan_merge(parse_merge_config(raw))
    assert plan.tensors and plan.describe()
    plan.close()
