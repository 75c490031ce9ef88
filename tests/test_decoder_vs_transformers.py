"""The NNX decoder against transformers (PyTorch CPU): logits, KV cache, left padding."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxcombine.hf import load_model
from jaxcombine.models import init_cache
from tests import hf_models

KINDS = hf_models.KINDS


def relative_error(ours, reference):
    return float(np.max(np.abs(np.asarray(ours) - reference)) / np.max(np.abs(reference)))


def reference_logits(ref, ids, mask=None, positions=None):
    with torch.no_grad():
        kwargs = {}
        if mask is not None:
            kwargs["attention_mask"] = torch.tensor(mask, dtype=torch.long)
        if positions is not None:
            kwargs["position_ids"] = torch.tensor(positions, dtype=torch.long)
        return ref(torch.tensor(ids, dtype=torch.long), **kwargs).logits.numpy()


@pytest.mark.parametrize("kind", KINDS)
def test_logits_match_transformers(tiny_models, kind):
    ref = hf_models.load_reference(tiny_models[kind])
    model = load_model(tiny_models[kind])
    ids = np.random.RandomState(1).randint(0, hf_models.VOCAB, (3, 40))  # longer than windows
    expected = reference_logits(ref, ids)
    assert np.max(np.abs(expected)) > 1.0  # non-trivial logits
    assert relative_error(model(jnp.asarray(ids)).logits, expected) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_left_padded_batch_matches_transformers(tiny_models, kind):
    """Rows of different lengths, left-padded; positions count real tokens only (HF generate)."""
    ref = hf_models.load_reference(tiny_models[kind])
    model = load_model(tiny_models[kind])
    rng = np.random.RandomState(2)
    lengths = [30, 17, 5]
    width = max(lengths)
    ids = np.zeros((3, width), np.int64)
    mask = np.zeros((3, width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = rng.randint(3, hf_models.VOCAB, n)
        mask[row, width - n :] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    expected = reference_logits(ref, ids, mask, positions)
    ours = np.asarray(model(jnp.asarray(ids), token_mask=jnp.asarray(mask, bool)).logits)
    real = mask.astype(bool)
    assert relative_error(ours[real], expected[real]) < 1e-4
    # Each row equals the same prompt run alone, unpadded.
    for row, n in enumerate(lengths):
        alone = reference_logits(ref, ids[row : row + 1, width - n :])[0]
        assert relative_error(ours[row, width - n :], alone) < 1e-4


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_then_steps_equals_full_forward(tiny_models, kind):
    """Left-padded prefill into the KV cache, then one-token steps: logits of a full pass."""
    ref = hf_models.load_reference(tiny_models[kind])
    model = load_model(tiny_models[kind])
    rng = np.random.RandomState(3)
    prompt_lengths, steps = [9, 4], 14  # 9 + 14 > the sliding window of 8
    width = max(prompt_lengths)
    full = [list(rng.randint(3, hf_models.VOCAB, n + steps)) for n in prompt_lengths]
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for row, n in enumerate(prompt_lengths):
        tokens[row, width - n :] = full[row][:n]
        mask[row, width - n :] = True
    cache = init_cache(model.config, 2, width + steps + 3)  # spare slots stay invalid
    out = model(jnp.asarray(tokens), token_mask=jnp.asarray(mask), cache=cache)
    cache = out.cache
    step_logits = [np.asarray(out.logits[:, -1])]
    for t in range(steps - 1):
        step_tokens = np.array([[full[row][n + t]] for row, n in enumerate(prompt_lengths)])
        out = model(jnp.asarray(step_tokens, jnp.int32), cache=cache)
        cache = out.cache
        step_logits.append(np.asarray(out.logits[:, 0]))
    for row, n in enumerate(prompt_lengths):
        expected = reference_logits(ref, np.array([full[row][: n + steps - 1]]))[0, n - 1 :]
        ours = np.stack([s[row] for s in step_logits])
        assert relative_error(ours, expected) < 1e-4


def test_bf16_model_tracks_fp32(tiny_models):
    """bf16 parameters and compute stay close to the fp32 reference."""
    ref = hf_models.load_reference(tiny_models["llama_gqa"])
    model = load_model(tiny_models["llama_gqa"], dtype=jnp.bfloat16)
    ids = np.random.RandomState(4).randint(0, hf_models.VOCAB, (2, 16))
    ours = np.asarray(model(jnp.asarray(ids)).logits.astype(jnp.float32))
    assert relative_error(ours, reference_logits(ref, ids)) < 0.05
