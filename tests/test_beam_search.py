"""Beam search in the jitted loop against transformers ``generate(num_beams=K)`` and
against a slow beam search in Python over transformers models' combined log-probs."""

import json
import re

import numpy as np
import pytest
import torch

from jaxcombine import cli
from jaxcombine.decoding import Sampling, generate
from jaxcombine.ensemble import Combination, generate_ensemble
from jaxcombine.errors import InputError
from jaxcombine.hf import load_model
from tests import hf_models

PROMPTS = [[1, 5, 9, 33, 70, 12, 8, 100, 41], [1, 44, 3], [1, 250, 17, 96, 5]]
N = 12


hf_generate = hf_models.transformers_generate


def hf_beams(ref, prompts, max_new_tokens, eos, num_beams, length_penalty):
    return hf_generate(
        ref, prompts, max_new_tokens, eos, num_beams=num_beams,
        length_penalty=length_penalty, early_stopping=False, num_return_sequences=1,
    )  # fmt: skip


def early_eos(ref, prompts, *where):
    """EOS ids that beams reach: the tokens greedy decoding emits at ``(row, step)``
    of each ``where`` (an int is itself an EOS id)."""
    greedy = hf_generate(ref, prompts, N, [hf_models.EOS])
    return [w if isinstance(w, int) else greedy[w[0]][w[1]] for w in where]


def finish_early(rows, eos):
    return [len(r) for r in rows if len(r) < N and r[-1] in eos]


# (row, step) of greedy tokens used as EOS ids; two EOS ids keep 3K candidates
# per step instead of 2K; llama with EOS (2, 1), (2, 2) closes rows early
# (see test_reference_beam_search_is_transformers).
CASES = [
    ("llama_gqa", 3, [(1, 2)], (1.0, 0.0, 2.0)),
    ("llama_gqa", 3, [(2, 1), (2, 2)], (1.0, 2.0)),
    ("qwen2", 4, [hf_models.EOS, (1, 2)], (1.0, 0.5)),
]


@pytest.mark.parametrize("kind,num_beams,eos_at,penalties", CASES)
def test_beam_search_equals_transformers(tiny_models, kind, num_beams, eos_at, penalties):
    ref = hf_models.load_reference(tiny_models[kind])
    model = load_model(tiny_models[kind])
    eos = early_eos(ref, PROMPTS, *eos_at)
    lengths = set()
    for lp in penalties:
        expected = hf_beams(ref, PROMPTS, N, eos, num_beams, lp)
        ours = generate(
            model, PROMPTS, max_new_tokens=N, eos_token_ids=eos,
            num_beams=num_beams, length_penalty=lp,
        )  # fmt: skip
        assert ours == expected, lp
        lengths.update(map(len, expected))
    assert len(lengths) > 1 and min(lengths) < N  # hypotheses of different lengths, some EOS


def test_left_padded_batch_equals_each_prompt_alone(tiny_models):
    ref = hf_models.load_reference(tiny_models["llama_gqa"])
    model = load_model(tiny_models["llama_gqa"])
    eos = early_eos(ref, PROMPTS, (1, 2))
    options = dict(max_new_tokens=N, eos_token_ids=eos, num_beams=3)
    together = generate(model, PROMPTS, **options)
    assert finish_early(together, eos)
    for prompt, row in zip(PROMPTS, together, strict=True):
        assert generate(model, [prompt], **options) == [row]


def test_one_beam_is_greedy(tiny_models):
    path = tiny_models["llama_gqa"]
    model = load_model(path)
    expected = hf_generate(hf_models.load_reference(path), PROMPTS, N, [hf_models.EOS])
    assert generate(model, PROMPTS, max_new_tokens=N, num_beams=1) == expected
    assert generate(model, PROMPTS, max_new_tokens=N) == expected


# A slow, obviously-correct beam search: transformers models in a Python loop,
# the full prefix of every beam each step, the linear rule in numpy.


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def linear_log_probs(refs, weights, sequences):
    """log sum_i w_i p_i(. | sequence) [S, V] for sequences of equal length (float64)."""
    with torch.no_grad():
        logits = [r(torch.tensor(sequences)).logits[:, -1].double().numpy() for r in refs]
    w = np.asarray(weights, np.float64) / np.sum(weights)
    return np.log(sum(wi * np.exp(np_log_softmax(z)) for wi, z in zip(w, logits, strict=True)))


def reference_beam_search(log_probs, prompt, num_beams, steps, eos, length_penalty, close=True):
    """Beam search as transformers 5 runs it (``early_stopping=False``), per prompt.

    Each step: the W = max(2, 1 + #EOS) * K best continuations of the running
    beams by summed log-prob; those of the K best that end in EOS (or reach
    ``steps``) join the finished hypotheses with score sum / length ** lp (the
    best K are kept); the K best others run on. Stop when K hypotheses are
    finished and the best running sum / length ** lp cannot beat the worst
    (``close=False``: run all ``steps``).
    """
    K, W = num_beams, max(2, 1 + len(eos)) * num_beams
    running, finished = [([], 0.0)], []  # (tokens, sum), (score, tokens)
    for t in range(steps):
        n = t + 1
        lp = log_probs([prompt + tokens for tokens, _ in running])  # [beams, V]
        totals = np.array([s for _, s in running])[:, None] + lp
        V = totals.shape[1]
        order = np.argsort(-totals.ravel(), kind="stable")[:W]
        candidates = [(running[i // V][0] + [i % V], totals.ravel()[i]) for i in order]
        ends = [tokens[-1] in eos or n == steps for tokens, _ in candidates]
        for rank, ((tokens, s), end) in enumerate(zip(candidates, ends, strict=True)):
            if end and rank < K:
                finished.append((s / n**length_penalty, tokens))
        finished = sorted(finished, key=lambda f: -f[0])[:K]
        running = [c for c, end in zip(candidates, ends, strict=True) if not end][:K]
        if n == steps or (
            close and len(finished) == K and running[0][1] / n**length_penalty <= finished[-1][0]
        ):
            break
    return finished[0][1]


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_members")
    return [hf_models.make_tiny_model(root / f"m{s}", "llama_gqa", seed=s) for s in (0, 1)]


ENSEMBLE_PROMPTS = [[1, 17, 42, 99, 7, 3], [1, 60]]
ENSEMBLE_STEPS = 10
WEIGHTS = (0.6, 0.4)


def test_reference_beam_search_is_transformers(tiny_models):
    """The slow reference on one model's log-probs equals transformers itself, on
    a case where closing a row early matters (a later hypothesis would score better)."""
    ref = hf_models.load_reference(tiny_models["llama_gqa"])
    eos = early_eos(ref, PROMPTS, (2, 1), (2, 2))
    expected = hf_beams(ref, PROMPTS, N, eos, 3, 1.0)

    def log_probs(seqs):
        return linear_log_probs([ref], (1.0,), seqs)

    never_closed = []
    for prompt, row in zip(PROMPTS, expected, strict=True):
        assert reference_beam_search(log_probs, prompt, 3, N, eos, 1.0) == row
        never_closed.append(reference_beam_search(log_probs, prompt, 3, N, eos, 1.0, close=False))
    assert never_closed != expected


def test_ensemble_beam_search_equals_python_reference(members):
    refs = [hf_models.load_reference(p) for p in members]
    models = [load_model(p) for p in members]

    def log_probs(seqs):
        return linear_log_probs(refs, WEIGHTS, seqs)

    greedy = ENSEMBLE_PROMPTS[0]
    for _ in range(4):
        greedy = greedy + [int(np.argmax(log_probs([greedy])[0]))]
    eos = [greedy[-1]]  # an EOS that the ensemble's greedy path reaches at step 4
    early = []
    for lp in (1.0, 0.5):
        expected = [
            reference_beam_search(log_probs, p, 3, ENSEMBLE_STEPS, eos, lp)
            for p in ENSEMBLE_PROMPTS
        ]
        ours = generate_ensemble(
            models, ENSEMBLE_PROMPTS, Combination("linear", WEIGHTS),
            max_new_tokens=ENSEMBLE_STEPS, eos_token_ids=eos, num_beams=3, length_penalty=lp,
        )  # fmt: skip
        assert ours == expected, lp
        early += [len(r) for r in expected if len(r) < ENSEMBLE_STEPS]
    assert early  # some best hypothesis ended in EOS before the last step


def run_cli(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, (json.loads(captured.out) if code == 0 else captured.err)


def test_cli_num_beams_equals_the_library(tiny_models, members, capsys):
    path = tiny_models["llama_gqa"]
    ids = sum((["--prompt-ids", ",".join(map(str, p))] for p in PROMPTS), [])
    argv = ["generate", "--model", str(path), *ids, "--max-new-tokens", str(N)]
    code, out = run_cli(argv + ["--num-beams", "3", "--json"], capsys)
    assert code == 0
    assert out["tokens"] == generate(load_model(path), PROMPTS, max_new_tokens=N, num_beams=3)

    ids = sum((["--prompt-ids", ",".join(map(str, p))] for p in ENSEMBLE_PROMPTS), [])
    argv = ["generate", "--model", str(members[0]), "--model", str(members[1]), *ids]
    argv += ["--max-new-tokens", str(ENSEMBLE_STEPS), "--weights", "0.6,0.4"]
    code, out = run_cli(argv + ["--num-beams", "3", "--json"], capsys)
    assert code == 0
    expected = generate_ensemble(
        [load_model(p) for p in members], ENSEMBLE_PROMPTS, Combination("linear", WEIGHTS),
        max_new_tokens=ENSEMBLE_STEPS, num_beams=3,
    )  # fmt: skip
    assert out["tokens"] == expected


def test_bad_beams_fail_before_any_model_work():
    not_a_model = object()  # touching it would fail with something other than InputError
    sampled = Sampling(temperature=0.7)
    with pytest.raises(InputError, match="beams combined with sampling"):
        generate(not_a_model, [[1, 2]], num_beams=3, sampling=sampled)
    with pytest.raises(InputError, match="beams combined with sampling"):
        generate_ensemble([not_a_model, not_a_model], [[1, 2]], num_beams=2, sampling=sampled)
    for bad in (0, -1, 2.5):
        with pytest.raises(InputError, match="num_beams must be a positive integer"):
            generate(not_a_model, [[1, 2]], num_beams=bad)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--num-beams", "3", "--temperature", "0.7"], "beams combined with sampling"),
        (["--num-beams", "2", "--temperature", "1", "--top-k", "5"], "beams combined"),
        (["--num-beams", "0"], "positive integer"),
    ],
)
def test_cli_bad_beams_fail_before_loading(
    tiny_models, members, capsys, monkeypatch, extra, message
):
    from jaxcombine import hf

    monkeypatch.setattr(hf, "load_model", lambda *a, **k: pytest.fail("weights were loaded"))
    for models in ([tiny_models["llama_gqa"]], members):
        argv = ["generate", "--prompt-ids", "1,2"] + sum((["--model", str(m)] for m in models), [])
        code, err = run_cli(argv + extra, capsys)
        assert code == 2 and re.search(message, err) and "--num-beams" in err
