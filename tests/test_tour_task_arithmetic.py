"""Section 3 of the tour (task arithmetic): the answer mask, teacher-forced exact match
and the in-graph greedy loop against the library's greedy generation, the scorer,
merges rescaled after the fact against the library's merge at that scale, and the
selection rules against brute force."""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from flax import nnx

from jaxcombine import merging
from jaxcombine.data import PackedDataset
from jaxcombine.tour import tasks
from jaxcombine.tour.fit import fit, stack_on_host
from jaxcombine.tour.lm import init_members, small_decoder
from jaxcombine.tour.sections import task_arithmetic as ta
from jaxcombine.training import adamw

WIDTH = 12  # room for the answers of 2..3 digit operands: "I999=1000;<eos>" is 11 tokens


def _rows(task: str, count: int, seed: int = 0):
    examples = tasks.generate_examples(task, count, seed=seed, min_len=2, max_len=3)
    return examples, ta.encode_rows(examples, WIDTH)


def _answer_mask_loop(rows: np.ndarray) -> np.ndarray:
    """Target j + 1 is in the answer: some '=' among rows[:j + 1], no ';' among them."""
    mask = np.zeros((rows.shape[0], rows.shape[1] - 1), bool)
    for i, row in enumerate(rows):
        for j in range(rows.shape[1] - 1):
            before = list(row[: j + 1])
            mask[i, j] = ta.EQUALS_ID in before and tasks.END_ID not in before
    return mask


def test_rows_and_answer_mask_select_exactly_the_answer_tokens():
    examples, rows = _rows("increment", 40)
    tokenizer = tasks.char_tokenizer()
    mask = np.asarray(ta.answer_mask(rows))
    np.testing.assert_array_equal(mask, _answer_mask_loop(rows))
    for example, row, row_mask in zip(examples, rows, mask, strict=True):
        assert tokenizer.decode(row[1:][row_mask].tolist()) == example.answer
        assert tokenizer.decode(row.tolist()) == example.text  # <eos>, <pad> are dropped


@pytest.fixture(scope="module")
def trained():
    """A one-layer decoder trained briefly on copy and reverse: right on some prompts,
    wrong on others (what the exact-match checks need)."""
    _, copy_rows = _rows("copy", 600, seed=1)
    _, reverse_rows = _rows("reverse", 600, seed=1)
    config = small_decoder(len(tasks.VOCAB), hidden=32, layers=1, context=WIDTH)
    graphdef, params = init_members(config, [0])
    data = PackedDataset(np.concatenate([copy_rows, reverse_rows]))
    result = fit(params, ta.answer_loss(graphdef), data, seeds=[0], steps=150, batch_size=32,
                 optimizer=adamw(1e-2, 150, warmup_steps=10))  # fmt: skip
    return graphdef, ta.take(result.params, 0)


def _generated(graphdef, params, examples, max_new_tokens):
    """The library's greedy answers (jaxcombine.decoding.generate via tasks)."""
    model = nnx.merge(graphdef, params)
    prompts = [e.prompt for e in examples]
    generate_fn = tasks.decoder_generate_fn(model)
    return tasks.predict(generate_fn, prompts, tasks.char_tokenizer(), max_new_tokens)


def test_teacher_forced_hits_equal_exact_match_of_greedy_generation(trained):
    graphdef, params = trained
    examples = [e for t in ("copy", "reverse") for e in _rows(t, 100, seed=7)[0]]
    rows = ta.encode_rows(examples, WIDTH)
    hits = np.asarray(ta.answer_hits(graphdef, params, rows))
    predictions = _generated(graphdef, params, examples, max_new_tokens=5)
    expected = np.array([p == e.answer for p, e in zip(predictions, examples, strict=True)])
    assert 0.1 < expected.mean() < 0.9, "the check needs right and wrong answers"
    np.testing.assert_array_equal(hits, expected)


def test_greedy_answers_equal_the_library_generation(trained):
    graphdef, params = trained
    examples = [e for t in ("copy", "reverse", "sort") for e in _rows(t, 30, seed=3)[0]]
    rows = {"mixed": ta.encode_rows(examples, WIDTH)}
    (prompts, lengths), = ta.prompt_batches(rows, len(examples), seed=0)  # fmt: skip
    completed = np.asarray(ta.greedy_answers(graphdef, params, prompts, lengths, steps=5))
    tokenizer = tasks.char_tokenizer()
    by_prompt = {e.prompt: e for e in examples}
    ordered = [by_prompt[tokenizer.decode(np.asarray(p)[:n].tolist())]
               for p, n in zip(prompts, lengths, strict=True)]  # fmt: skip
    expected = _generated(graphdef, params, ordered, max_new_tokens=5)
    got = [tasks.answer_text(row[n:].tolist(), tokenizer)
           for row, n in zip(completed, np.asarray(lengths), strict=True)]  # fmt: skip
    assert got == expected


def test_prompt_batches_hold_the_prompts_only():
    examples, rows = _rows("sort", 20)
    (prompts, lengths), = ta.prompt_batches({"sort": rows}, 20, seed=0)  # fmt: skip
    tokenizer = tasks.char_tokenizer()
    got = sorted(tokenizer.decode(np.asarray(p).tolist()) for p in prompts)
    assert got == sorted(e.prompt for e in examples)
    assert sorted(np.asarray(lengths).tolist()) == sorted(len(e.prompt) for e in examples)


def test_scorer_equals_model_by_model_accuracy(trained):
    graphdef, params = trained
    others = init_members(small_decoder(len(tasks.VOCAB), hidden=32, layers=1, context=WIDTH),
                          [5, 6])[1]  # fmt: skip
    models = [params, ta.take(others, 0), ta.take(others, 1)]
    rows = {t: _rows(t, 50, seed=11)[1] for t in ("copy", "reverse")}
    scores = ta.Scorer(graphdef, rows)(stack_on_host(models))  # 3 models, groups of 8
    for model, score in zip(models, scores, strict=True):
        for task, task_rows in rows.items():
            expected = np.asarray(ta.answer_hits(graphdef, model, task_rows)).mean()
            assert score[task] == pytest.approx(expected)
    assert 0 < scores[0]["copy"] < 1


@pytest.fixture(scope="module")
def four_models():
    config = small_decoder(len(tasks.VOCAB), hidden=16, layers=1, context=WIDTH)
    _, stacked = init_members(config, [0, 1, 2, 3])
    models = [ta.take(stacked, i) for i in range(4)]
    return models[0], models[1:]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties"])
def test_a_merge_at_scale_one_rescaled_equals_the_merge_at_that_scale(four_models, method):
    base, fine_tunes = four_models
    ones = [1.0] * len(fine_tunes)
    extra = {
        "task_arithmetic": {},
        "ties": {"densities": [0.2] * 3},
        "dare_ties": {"densities": [0.5] * 3, "key": jax.random.key(4)},
    }[method]
    merge = getattr(merging, method)
    at_one = merge(base, fine_tunes, weights=ones, **extra)
    rescaled = ta.scaled_edits(base, at_one, np.asarray([0.3, 1.5], np.float32))
    for i, scale in enumerate([0.3, 1.5]):
        direct = merge(base, fine_tunes, weights=ones, lambda_=scale, **extra)
        for got, want in zip(jax.tree.leaves(ta.take(rescaled, i)), jax.tree.leaves(direct),
                             strict=True):  # fmt: skip
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_negative_scales_negate_the_task_vector(four_models):
    base, (fine_tune, *_) = four_models
    negated = ta.take(ta.scaled_edits(base, fine_tune, np.asarray([-2.0], np.float32)), 0)
    for got, b, f in zip(*map(jax.tree.leaves, (negated, base, fine_tune)), strict=True):
        np.testing.assert_allclose(got, np.asarray(b) - 2.0 * (np.asarray(f) - np.asarray(b)),
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_normalized_accuracy_is_the_mean_of_per_task_ratios():
    accuracy = {"a": 0.5, "b": 0.9, "c": 0.0}
    individual = {"a": 1.0, "b": 0.6, "c": 0.8}
    assert ta.normalized_accuracy(accuracy, individual) == pytest.approx((0.5 + 1.5 + 0.0) / 3)
    assert np.isnan(ta.normalized_accuracy(accuracy, {"a": 0.0}))


def test_retention_divides_by_the_base():
    base = {"a": 0.8, "b": 0.5, "c": 1.0}
    negated = {"a": 0.2, "b": 0.5, "c": 0.8}
    target, control = ta.retention(negated, base, "a")
    assert target == pytest.approx(0.25)
    assert control == pytest.approx((1.0 + 0.8) / 2)


def _negation_scale_brute_force(scales, target, control, keep):
    """Every scale checked against every other: a kept scale whose target no kept scale
    beats (the smaller scale among equals); the smallest scale if none is kept."""
    kept = [i for i in range(len(scales)) if control[i] >= keep]
    for i in kept:
        if all((target[i], scales[i]) <= (target[j], scales[j]) for j in kept):
            return scales[i]
    return min(scales)


def test_negation_scale_matches_brute_force():
    rng = np.random.default_rng(0)
    scales = [0.2, 0.5, 1.0, 1.5, 2.0]
    for _ in range(300):
        target = rng.choice([0.1, 0.3, 0.5, 0.9], size=5).tolist()
        control = rng.uniform(0.8, 1.05, size=5).tolist()
        expected = _negation_scale_brute_force(scales, target, control, 0.95)
        assert ta.negation_scale(scales, target, control, keep=0.95) == expected


def test_best_scale_takes_the_first_maximum_and_ignores_nan():
    scales = [0.1, 0.2, 0.3, 0.4]
    for scores in itertools.product([0.2, 0.5, float("nan")], repeat=4):
        finite = [s if s == s else -np.inf for s in scores]
        assert ta.best_scale(scales, list(scores)) == scales[finite.index(max(finite))]
