"""A learned per-step gate: two tiny decoders, each trained here on one synthetic
domain, and a gate trained with ``train_gate`` on a mix of both must weight the
in-domain member on held-out data; losses and weights against numpy."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxcombine.ensemble import (
    Combination,
    Gate,
    StackedForward,
    gate_weights,
    stack_members,
    train_gate,
)
from jaxcombine.errors import ConfigError, InputError
from jaxcombine.models import Decoder, DecoderConfig

V, E, T = 64, 32, 16
CONFIG = DecoderConfig(
    vocab_size=V, hidden_size=E, intermediate_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64,
)  # fmt: skip
# Domain A: ids 3..30 counting up by 1; domain B: ids 31..60 counting down by 2
# (both wrap around); with probability NOISE the next token is any id of the domain.
DOMAINS = {"A": (3, 28, +1), "B": (31, 30, -2)}
NOISE = 0.1


def sample_domain(name, count, rng, length=T):
    low, size, stride = DOMAINS[name]
    seqs = np.empty((count, length), np.int32)
    x = rng.integers(0, size, count)
    for t in range(length):
        seqs[:, t] = low + x
        jump = rng.random(count) < NOISE
        x = np.where(jump, rng.integers(0, size, count), (x + stride) % size)
    return seqs


def np_log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_combined(rule, logits, weights):
    """Combined log-probabilities of logits [N, ..., V] with weights [N, ...], float64."""
    log_p = np_log_softmax(logits.astype(np.float64))
    w = np.asarray(weights, np.float64)[..., None]
    if rule == "linear":
        return np.log(np.sum(w / w.sum(axis=0, keepdims=True) * np.exp(log_p), axis=0))
    if rule == "loglinear":
        return np_log_softmax(np.sum(w * log_p, axis=0))
    return np_log_softmax(np.sum(w * logits.astype(np.float64), axis=0))


def np_nll(rule, logits, weights, tokens, mask):
    """Mean next-token NLL over positions t whose tokens t and t+1 are both real."""
    log_p = np_combined(rule, logits[:, :, :-1], weights[:, :, :-1])  # [S, T-1, V]
    nll, count = 0.0, 0
    for s, t in zip(*np.nonzero(mask[:, :-1] & mask[:, 1:]), strict=True):
        nll -= log_p[s, t, tokens[s, t + 1]]
        count += 1
    return nll / count


@jax.jit
def _one_model(graphdef, params, tokens, mask):
    out = nnx.merge(graphdef, params)(tokens, token_mask=mask)
    return out.logits, out.hidden


def member_logits_one_by_one(models, tokens, mask):
    """Logits [N, S, T, V] and hidden states [N, S, T, E], each model run alone."""
    outs = [_one_model(*nnx.split(m), jnp.asarray(tokens), jnp.asarray(mask)) for m in models]
    return (
        np.stack([np.asarray(logits) for logits, _ in outs]),
        np.stack([np.asarray(hidden) for _, hidden in outs]),
    )


@pytest.fixture(scope="module")
def specialists():
    """Members A and B, each trained on its own domain only (both in one vmapped
    optax loop: Adam is per element, so this is two independent trainings)."""
    models = [Decoder(CONFIG, rngs=nnx.Rngs(seed)) for seed in (1, 2)]
    graphdef, params = stack_members(models)
    rng = np.random.default_rng(0)
    tx = optax.adam(3e-3)

    def lm_loss(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens).logits[:, :-1]
        log_p = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(log_p, tokens[:, 1:, None], axis=-1))

    @jax.jit
    def update(params, opt_state, batches):  # batches [2, B, T]: member i on domain i
        losses, grads = jax.vmap(jax.value_and_grad(lm_loss))(params, batches)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, losses

    opt_state = tx.init(params)
    history = []
    for _ in range(300):
        batches = np.stack([sample_domain(d, 32, rng) for d in ("A", "B")])
        params, opt_state, losses = update(params, opt_state, batches)
        history.append(losses)
    history = np.asarray(jax.device_get(history))  # [steps, 2]
    trained = [nnx.merge(graphdef, jax.tree.map(lambda x, i=i: x[i], params)) for i in range(2)]
    return trained, graphdef, params, history


def test_members_specialise(specialists):
    models, _, _, history = specialists
    first, last = history[:5].mean(axis=0), history[-20:].mean(axis=0)
    print(f"member LM loss: first {first}, last {last}")
    # Noise-free prediction of 14 of 15 next tokens costs ~0.11 nats each (10 % jumps).
    assert (last < 0.5 * first).all() and (last < 1.3).all()
    rng = np.random.default_rng(1)
    data = {d: sample_domain(d, 16, rng) for d in ("A", "B")}
    mask = np.ones((16, T), bool)
    nll = {}
    for d, tokens in data.items():
        logits, _ = member_logits_one_by_one(models, tokens, mask)
        for i, member in enumerate("AB"):
            nll[member, d] = np_nll("linear", logits[i : i + 1], np.ones((1, 16, T)), tokens, mask)
    print("member NLL (member, domain):", nll)
    assert nll["A", "A"] + 2.0 < nll["B", "A"]
    assert nll["B", "B"] + 2.0 < nll["A", "B"]


def test_learned_gate_prefers_the_in_domain_member(specialists):
    models, graphdef, params, _ = specialists
    forward = StackedForward(graphdef, Combination("linear"))
    rng = np.random.default_rng(2)
    train = np.concatenate([sample_domain("A", 32, rng), sample_domain("B", 32, rng)])
    gate = Gate(2, E, width=32, rngs=nnx.Rngs(0))
    gate, losses = train_gate(gate, forward, params, train, steps=150, batch_size=16, seed=0)
    print(f"gate loss: first {losses[0]:.3f}, last {np.mean(losses[-10:]):.3f}")
    assert len(losses) == 150 and all(math.isfinite(x) for x in losses)
    assert np.mean(losses[-10:]) < losses[0]

    held_out = {d: sample_domain(d, 24, np.random.default_rng(3 + i)) for i, d in enumerate("AB")}
    tokens = np.concatenate([held_out["A"], held_out["B"]])
    mask = np.ones(tokens.shape, bool)
    logits, hidden = member_logits_one_by_one(models, tokens, mask)
    weights = np.asarray(gate(jnp.asarray(hidden)))  # [2, 48, T]
    np.testing.assert_allclose(weights.sum(axis=0), 1.0, rtol=1e-5)
    on_a = weights[0, :24, :-1].mean()  # positions that predict a next token
    on_b = weights[1, 24:, :-1].mean()
    print(f"mean weight on member A over domain A: {on_a:.4f}, on member B over B: {on_b:.4f}")
    assert on_a > 0.8 and on_b > 0.8

    gated = np_nll("linear", logits, weights, tokens, mask)
    uniform = np_nll("linear", logits, np.full(weights.shape, 0.5), tokens, mask)
    print(f"held-out NLL: gated {gated:.3f}, uniform {uniform:.3f}")
    assert gated < uniform - 0.1

    # The split gate as a decode loop holds it: same weights, jitted.
    gate_graphdef, gate_params = nnx.split(gate)
    jitted = jax.jit(gate_weights, static_argnums=0)(gate_graphdef, gate_params, hidden)
    np.testing.assert_allclose(np.asarray(jitted), weights, rtol=1e-5, atol=1e-6)


def np_gelu(x):  # tanh approximation, as jax.nn.gelu's default
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def test_gate_is_an_mlp_over_concatenated_hidden_states():
    gate = Gate(3, 8, width=16, rngs=nnx.Rngs(4))
    hidden = np.random.default_rng(5).normal(size=(3, 2, 5, 8)).astype(np.float32)
    weights = np.asarray(gate(jnp.asarray(hidden)))  # [3, 2, 5]
    _, state = nnx.split(gate)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nnx.to_pure_dict(state))
    features = np.concatenate(list(hidden.astype(np.float64)), axis=-1)  # [2, 5, 3*8]
    h = np_gelu(features @ p["hidden"]["kernel"].reshape(24, 16) + p["hidden"]["bias"])
    scores = h @ p["out"]["kernel"] + p["out"]["bias"]  # [2, 5, 3]
    expected = np.exp(np_log_softmax(scores))
    np.testing.assert_allclose(weights, np.moveaxis(expected, -1, 0), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def padded(specialists):
    """Six sequences of both domains, two padded (left and right), with the
    members' logits and hidden states computed model by model."""
    models, graphdef, params, _ = specialists
    rng = np.random.default_rng(6)
    tokens = np.concatenate([sample_domain("A", 3, rng), sample_domain("B", 3, rng)])
    mask = np.ones(tokens.shape, bool)
    mask[0, :5] = False  # left padding
    mask[4, 11:] = False  # right padding
    tokens[~mask] = 0
    logits, hidden = member_logits_one_by_one(models, tokens, mask)
    return StackedForward(graphdef, Combination()), params, tokens, mask, logits, hidden


@pytest.mark.parametrize("rule", ["linear", "loglinear", "logits"])
def test_losses_equal_numpy_mixture_nll(padded, rule):
    forward, params, tokens, mask, logits, hidden = padded
    gate = Gate(2, E, rngs=nnx.Rngs(7))
    gate.out.kernel[...] = jnp.zeros_like(gate.out.kernel[...])  # scores 0: uniform weights
    before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(gate)[1]))
    full_batch = {"mask": mask, "rule": rule, "batch_size": 64}
    trained, losses = train_gate(gate, forward, params, tokens, steps=2, **full_batch)
    np.testing.assert_allclose(np.asarray(gate(jnp.asarray(hidden))), 0.5, rtol=1e-6)
    expected = np_nll(rule, logits, np.full(hidden.shape[:-1], 0.5), tokens, mask)
    assert losses[0] == pytest.approx(expected, rel=1e-4)
    after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.split(gate)[1]))
    jax.tree.map(np.testing.assert_array_equal, before, after)  # the input gate is untouched
    # The second step's loss is the NLL under the gate after one step.
    one_step, _ = train_gate(gate, forward, params, tokens, steps=1, **full_batch)
    weights = np.asarray(one_step(jnp.asarray(hidden)))
    assert not np.allclose(weights, 0.5)
    assert losses[1] == pytest.approx(np_nll(rule, logits, weights, tokens, mask), rel=1e-4)
    assert not np.allclose(np.asarray(trained.out.kernel[...]), 0.0)


@pytest.fixture(scope="module")
def small():
    models = [Decoder(CONFIG, rngs=nnx.Rngs(seed)) for seed in (8, 9)]
    graphdef, params = stack_members(models)
    return StackedForward(graphdef, Combination()), params


BAD = [
    ({"rule": "contrastive"}, ConfigError, "contrastive decoding takes no weights"),
    ({"rule": "lienar"}, ConfigError, "did you mean 'linear'"),
    ({"sequences": np.array([[5], [6]])}, InputError, "at least 2"),
    ({"sequences": np.array([5, 6, 7])}, InputError, r"\[num_sequences, length\]"),
    ({"sequences": np.full((2, 4), 1.5)}, InputError, "dtype float"),
    ({"mask": np.ones((2, 3), bool)}, InputError, r"mask has shape \(2, 3\)"),
    ({"mask": np.eye(2, 4, dtype=bool)}, InputError, "nothing to predict"),
    ({"sequences": np.array([[5, 64, 7, 8], [1, 2, 3, 4]])}, InputError, r"\[0, 64\)"),
    ({"gate": Gate(3, E, rngs=nnx.Rngs(0))}, ConfigError, "3 members.*hold 2"),
    ({"gate": Gate(2, 16, rngs=nnx.Rngs(0))}, ConfigError, "hidden size 16.*is 32"),
    ({"gate": "gate"}, ConfigError, "must be a jaxcombine.ensemble.Gate"),
    ({"steps": 0}, ConfigError, "steps must be a positive integer"),
    ({"batch_size": -1}, ConfigError, "batch_size must be a positive integer"),
    ({"learning_rate": float("nan")}, ConfigError, "learning_rate"),
]


@pytest.mark.parametrize("change,error,message", BAD)
def test_bad_inputs_fail_clearly(small, change, error, message):
    forward, params = small
    args = {
        "gate": Gate(2, E, rngs=nnx.Rngs(0)),
        "sequences": np.array([[5, 6, 7, 8], [9, 10, 11, 12]]),
    }
    args.update(change)
    gate, sequences = args.pop("gate"), args.pop("sequences")
    with pytest.raises(error, match=message):
        train_gate(gate, forward, params, sequences, steps=args.pop("steps", 1), **args)


def test_gate_checks_its_inputs():
    gate = Gate(2, E, rngs=nnx.Rngs(0))
    with pytest.raises(InputError, match="built for 2 members"):
        gate(jnp.zeros((3, 4, E)))
    with pytest.raises(InputError, match="hidden size 32"):
        gate(jnp.zeros((2, 4, 16)))
    with pytest.raises(ConfigError, match="width must be a positive integer"):
        Gate(2, E, width=0, rngs=nnx.Rngs(0))


def test_a_new_gate_is_the_uniform_ensemble():
    gate = Gate(3, 8, width=16, rngs=nnx.Rngs(1))
    hidden = np.random.default_rng(0).normal(size=(3, 2, 5, 8)).astype(np.float32)
    np.testing.assert_array_equal(
        np.asarray(gate(jnp.asarray(hidden))), np.full((3, 2, 5), 1 / 3, np.float32)
    )
