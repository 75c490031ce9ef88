"""Greedy generation and scoring against transformers, through the API and the CLI."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from jaxcombine import cli
from jaxcombine.decoding import Sampling, generate
from jaxcombine.hf import load_model, load_tokenizer
from tests import hf_models

PROMPTS = [[1, 5, 9, 33, 70, 12, 8, 100, 41], [1, 44, 3], [1, 250, 17, 96, 5]]


def reference_greedy(model_dir, prompts, max_new_tokens):
    """transformers generate(do_sample=False) on a left-padded batch, cut after EOS."""
    return hf_models.transformers_generate(
        hf_models.load_reference(model_dir), prompts, max_new_tokens
    )


@pytest.mark.parametrize("kind", hf_models.KINDS)
def test_greedy_generation_is_token_identical(tiny_models, kind):
    expected = reference_greedy(tiny_models[kind], PROMPTS, 32)
    ours = generate(load_model(tiny_models[kind]), PROMPTS, max_new_tokens=32)
    assert ours == expected
    assert max(map(len, ours)) > 8  # a real continuation, not an immediate EOS


def run_cli(argv, capsys):
    assert cli.main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_cli_generate_greedy_json(tiny_models, capsys):
    path = tiny_models["qwen2"]
    ids_args = sum((["--prompt-ids", ",".join(map(str, p))] for p in PROMPTS), [])
    result = run_cli(
        [
            "generate",
            "--model",
            str(path),
            *ids_args,
            "--max-new-tokens",
            "32",
            "--greedy",
            "--json",
        ],
        capsys,
    )
    assert result["tokens"] == reference_greedy(path, PROMPTS, 32)
    tokenizer = load_tokenizer(path)
    assert result["text"] == [
        tokenizer.decode(t, skip_special_tokens=True) for t in result["tokens"]
    ]


def test_console_script_generate_text_prompt(tiny_models):
    """The installed `jaxcombine` entry point, with a text prompt through tokenizer.json."""
    path = tiny_models["llama_tied_llama3"]
    text = "Task arithmetic adds"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxcombine.cli",
            "generate",
            "--model",
            str(path),
            "--prompt",
            text,
            "--max-new-tokens",
            "32",
            "--greedy",
            "--json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout)
    prompt = load_tokenizer(path).encode(text).ids
    assert prompt[0] == hf_models.BOS
    assert result["tokens"] == reference_greedy(path, [prompt], 32)


def reference_nll(model_dir, ids, window):
    ref = hf_models.load_reference(model_dir)
    total, count = 0.0, 0
    for start in range(0, len(ids), window):
        chunk = ids[start : start + window]
        if len(chunk) < 2:
            continue
        with torch.no_grad():
            x = torch.tensor([chunk])
            loss = ref(x, labels=x).loss.item()
        total += loss * (len(chunk) - 1)
        count += len(chunk) - 1
    return total / count, count


@pytest.mark.parametrize("kind", ["llama_gqa", "mistral", "mixtral"])
def test_cli_score_matches_transformers_loss(tiny_models, tmp_path, capsys, kind):
    path = tiny_models[kind]
    text = " ".join(hf_models.CORPUS * 3)  # several context windows of 64 tokens
    text_file = tmp_path / "text.txt"
    text_file.write_text(text)
    ids = load_tokenizer(path).encode(text).ids
    assert len(ids) > 2 * 64
    expected_nll, expected_count = reference_nll(path, ids, window=64)
    result = run_cli(
        ["score", "--model", str(path), "--text-file", str(text_file), "--json"], capsys
    )
    assert result["tokens"] == len(ids)
    assert result["predicted_tokens"] == expected_count
    assert abs(result["nll"] - expected_nll) <= 1e-4 * expected_nll
    assert result["ppl"] == pytest.approx(np.exp(expected_nll), rel=1e-4)


def test_sampling_is_reproducible_and_respects_top_k(tiny_models):
    model = load_model(tiny_models["llama_gqa"])
    sampling = Sampling(temperature=1.0, top_k=1)  # top-1 sampling is greedy
    assert generate(model, PROMPTS, max_new_tokens=12, sampling=sampling, seed=3) == generate(
        model, PROMPTS, max_new_tokens=12
    )
    hot = Sampling(temperature=5.0, top_p=0.99)
    a = generate(model, PROMPTS, max_new_tokens=12, sampling=hot, seed=1)
    assert a == generate(model, PROMPTS, max_new_tokens=12, sampling=hot, seed=1)
    assert a != generate(model, PROMPTS, max_new_tokens=12, sampling=hot, seed=2)
