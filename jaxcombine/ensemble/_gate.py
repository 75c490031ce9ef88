"""A learned per-step gate: ensemble coefficients from the members' hidden states.

For N members with final hidden states ``h_i(t)`` [E] at position t (after
the final norm), the gate is a two-layer MLP over their concatenation,

    x(t)    = [h_1(t); ...; h_N(t)]                       [N*E]
    g(t)    = W_2 gelu(W_1 x(t) + b_1) + b_2               [N]
    w_i(t)  = softmax(g(t))_i                               (w_i >= 0, sum 1)

and the ensemble predicts token t+1 with ``Combination(rule)`` of the
members' logits ``z_i(t)`` and the weights ``w(t)``; for ``linear``

    p(x_{t+1} | x_{<=t}) = sum_i w_i(t) p_i(x_{t+1} | x_{<=t}).

The weight for token t+1 depends only on hidden states at position t, which
the members compute anyway when they predict token t+1, so the gate runs at
every decoding step: the step's hidden states [N, B, 1, E] give weights
[N, B, 1] for its logits [N, B, 1, V].

Training (:func:`train_gate`) keeps the members frozen and minimises the
mean next-token negative log-likelihood of the combined distribution on a
few sequences,

    L = -(1 / |M|) sum_{(b, t) in M} log p(x_{b, t+1} | x_{b, <=t}),

M the positions where both token t and token t+1 are real (not padding).
This is the mixture of experts of Jacobs et al. (1991), "Adaptive mixtures
of local experts", Neural Computation 3(1), with pretrained, frozen experts
and a gating network that sees the experts' own representations; per-token
mixtures of language models with learned weights are also used by
Co-LLM (Shen et al. 2024, arXiv:2403.03870, a learned per-token choice
between a base model and an assistant) and by the domain-posterior
ensembles of DEMix (Gururangan et al. 2021, arXiv:2108.05036) and
Branch-Train-Merge (Li et al. 2022, arXiv:2208.03306).

Example::

    graphdef, params = stack_members([model_a, model_b])
    forward = StackedForward(graphdef, Combination("linear"))
    gate = Gate(2, model_a.config.hidden_size, rngs=nnx.Rngs(0))
    gate, losses = train_gate(gate, forward, params, sequences, mask=mask)
    out = forward.member_outputs(params, tokens, mask, None)
    weights = gate(out.hidden)                                  # [N, B, T]
    log_probs = Combination("linear")(out.logits, weights)      # [B, T, V]
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.ensemble._rules import Combination
from jaxcombine.ensemble._stacked import StackedForward
from jaxcombine.errors import ConfigError, InputError, closest
from jaxcombine.models._layers import Dense

GATED_RULES = ("linear", "loglinear", "logits")


class Gate(nnx.Module):
    """Softmax weights over N members from their hidden states [N, ..., E].

    A new gate gives every member the weight 1/N (its output layer is zero);
    :func:`train_gate` moves it from there. The weights are
    ``softmax(W_2 gelu(W_1 [h_1; ...; h_N] + b_1) + b_2)`` (module docstring).

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> gate = Gate(num_members=2, hidden_size=8, width=4, rngs=nnx.Rngs(0))
    >>> hidden = jnp.sin(jnp.arange(48.0)).reshape(2, 1, 3, 8)        # [N, B, T, E]
    >>> gate(hidden).tolist()                                          # [N, B, T], uniform
    [[[0.5, 0.5, 0.5]], [[0.5, 0.5, 0.5]]]
    >>> gate.out.kernel.set_value(jnp.array([[1.0, -1.0], [0.5, 2.0], [-1.0, 0.0], [2.0, 1.0]]))
    >>> p = nnx.to_pure_dict(nnx.state(gate))
    >>> x = jnp.concatenate([hidden[0], hidden[1]], axis=-1)          # [B, T, N*E]
    >>> W1 = p["hidden"]["kernel"].reshape(16, 4)                      # [N * E, width]
    >>> g = jax.nn.gelu(x @ W1 + p["hidden"]["bias"]) @ p["out"]["kernel"] + p["out"]["bias"]
    >>> bool(jnp.allclose(gate(hidden), jnp.moveaxis(jax.nn.softmax(g), -1, 0), atol=1e-6))
    True

    References: Jacobs et al. 1991, Adaptive Mixtures of Local Experts, Neural Computation 3(1) (a
    gating network over experts; here the experts are frozen).
    """

    def __init__(
        self,
        num_members: int,
        hidden_size: int,
        *,
        width: int = 64,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        for name, value in (
            ("num_members", num_members),
            ("hidden_size", hidden_size),
            ("width", width),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(
                    f"{name} must be a positive integer, got {value!r}",
                    where=f"Gate({name})",
                    fix="num_members = number of stacked members, hidden_size = their "
                    "config.hidden_size",
                )
        self.num_members = num_members
        self.hidden_size = hidden_size
        N, E = num_members, hidden_size
        # W_1 [N, E, width] contracts the (member, embed) axes: the same as a
        # [N*E, width] kernel over the concatenated hidden states.
        self.hidden = Dense(
            (N, E, width), (None, "embed", "mlp"), True,
            dtype=dtype, rngs=rngs, in_dims=2, init_scale=(N * E) ** -0.5,
        )  # fmt: skip
        # A zero output layer: the untrained gate is the uniform ensemble, and
        # training moves it away from uniform only as far as the data asks.
        self.out = Dense((width, N), ("mlp", None), True, dtype=dtype, rngs=rngs, init_scale=0.0)

    def __call__(self, hidden: jax.Array) -> jax.Array:
        """Weights [N, ...] (softmax over axis 0) of member hidden states [N, ..., E]."""
        if hidden.ndim < 2 or hidden.shape[0] != self.num_members:
            raise InputError(
                f"the gate was built for {self.num_members} members, got hidden states of "
                f"shape {tuple(hidden.shape)}",
                where="Gate(hidden)",
                fix="pass the stacked members' hidden states [N, ..., E] with N = num_members",
            )
        if hidden.shape[-1] != self.hidden_size:
            raise InputError(
                f"the gate was built for hidden size {self.hidden_size}, got hidden states "
                f"of shape {tuple(hidden.shape)}",
                where="Gate(hidden)",
                fix="build the gate with hidden_size = the members' config.hidden_size",
            )
        x = jnp.moveaxis(hidden.astype(jnp.float32), 0, -2)  # [..., N, E]
        scores = self.out(jax.nn.gelu(self.hidden(x)))  # [..., N]
        return jnp.moveaxis(jax.nn.softmax(scores, axis=-1), -1, 0)  # [N, ...]


def gate_weights(gate_graphdef: Any, gate_params: Any, hidden: jax.Array) -> jax.Array:
    """Weights [N, ...] of a split gate (``nnx.split(gate)``) for hidden states
    [N, ..., E]; a pure function for jitted decode loops.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> gate = Gate(num_members=3, hidden_size=8, rngs=nnx.Rngs(0))
    >>> graphdef, params = nnx.split(gate)
    >>> hidden = jnp.ones((3, 2, 8))                                   # [N, B, E]
    >>> weights = jax.jit(gate_weights, static_argnums=0)(graphdef, params, hidden)
    >>> weights.shape, bool(jnp.allclose(weights, 1 / 3))              # a new gate: uniform
    ((3, 2), True)

    References: Jacobs et al. 1991, Adaptive Mixtures of Local Experts, Neural Computation 3(1).
    """
    return nnx.merge(gate_graphdef, gate_params)(hidden)


def _positive_int(value, name: str, example: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(
            f"{name} must be a positive integer, got {value!r}",
            where=f"train_gate({name})",
            fix=f"use e.g. {name}={example}",
        )


def _check_inputs(gate, sequences, mask, rule, steps, learning_rate, batch_size):
    """Validated (tokens [S, T] int32, mask [S, T] bool)."""
    if not isinstance(gate, Gate):
        raise ConfigError(
            f"gate must be a jaxcombine.ensemble.Gate, got {type(gate).__name__}",
            where="train_gate(gate)",
            fix="build one with Gate(num_members, hidden_size, rngs=nnx.Rngs(0))",
        )
    if rule not in GATED_RULES:
        hint = (
            "contrastive decoding takes no weights; use linear, loglinear or logits"
            if rule == "contrastive"
            else closest(str(rule), GATED_RULES)
        )
        raise ConfigError(
            f"a gate weights the members, so rule must be one of {', '.join(GATED_RULES)}, "
            f"got {rule!r}",
            where="train_gate(rule)",
            fix=hint,
        )
    _positive_int(steps, "steps", "200")
    _positive_int(batch_size, "batch_size", "16")
    if not (isinstance(learning_rate, (int, float)) and np.isfinite(learning_rate)) or (
        learning_rate <= 0
    ):
        raise ConfigError(
            f"learning_rate must be a positive finite number, got {learning_rate!r}",
            where="train_gate(learning_rate)",
            fix="use e.g. learning_rate=1e-2",
        )
    tokens = np.asarray(sequences)
    if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(
            f"sequences must be token ids [num_sequences, length], got an array of shape "
            f"{tokens.shape} and dtype {tokens.dtype}",
            where="train_gate(sequences)",
            fix="pad the sequences to one length and pass mask=... marking the real tokens",
        )
    if tokens.shape[1] < 2:
        raise InputError(
            f"sequences have {tokens.shape[1]} token(s); the gate learns from next-token "
            "predictions, which need at least 2",
            where="train_gate(sequences)",
            fix="pass sequences of at least 2 tokens",
        )
    if mask is None:
        valid = np.ones(tokens.shape, bool)
    else:
        valid = np.asarray(mask)
        if valid.shape != tokens.shape:
            raise InputError(
                f"mask has shape {valid.shape}, sequences have shape {tokens.shape}",
                where="train_gate(mask)",
                fix="give one mask entry per token (True for real tokens, False for padding)",
            )
        valid = valid.astype(bool)
    if not (valid[:, :-1] & valid[:, 1:]).any():
        raise InputError(
            "no sequence has two consecutive real tokens, so there is nothing to predict",
            where="train_gate(mask)",
            fix="check the mask: True marks real tokens",
        )
    return tokens.astype(np.int32), valid


@partial(jax.jit, static_argnums=0)
def _frozen_outputs(forward: StackedForward, params, tokens, mask):
    """Members' logits [N, S, T-1, V] and hidden states [N, S, T-1, E] at the
    positions that predict a next token, outside the gradient."""
    out = forward.member_outputs(params, tokens, mask, None)
    return jax.lax.stop_gradient((out.logits[:, :, :-1], out.hidden[:, :, :-1]))


def _gated_nll(params, graphdef, rest, rule, logits, hidden, targets, counted):
    """Mean NLL of ``targets`` [B, T-1] under ``Combination(rule)`` with the gate's
    weights, over the ``counted`` [B, T-1] positions."""
    weights = nnx.merge(graphdef, params, rest)(hidden)  # [N, B, T-1]
    log_p = Combination(rule)(logits, weights)  # [B, T-1, V]
    picked = jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # [B, T-1]
    total = jnp.sum(jnp.where(counted, picked, 0.0))
    return -total / jnp.maximum(jnp.sum(counted), 1)


@partial(jax.jit, static_argnums=(0, 1, 2), donate_argnums=(3, 5))
def _train_step(graphdef, rule, batch, params, rest, opt_state, key, learning_rate, data):
    """One Adam step on ``batch`` rows of ``data`` (all rows, in order, when
    ``batch`` is their number); the loss is measured before the update."""
    import optax

    S = data[2].shape[0]
    rows = jnp.arange(S) if batch == S else jax.random.choice(key, S, (batch,), replace=False)
    logits, hidden, targets, counted = data
    batch_data = (logits[:, rows], hidden[:, rows], targets[rows], counted[rows])
    loss, grads = jax.value_and_grad(_gated_nll)(params, graphdef, rest, rule, *batch_data)
    tx = optax.adam(learning_rate)  # a traced rate: one compilation for every rate
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


def train_gate(
    gate: Gate,
    forward: StackedForward,
    member_params: Any,
    sequences,
    *,
    mask=None,
    rule: str = "linear",
    steps: int = 200,
    learning_rate: float = 1e-2,
    batch_size: int = 16,
    seed: int = 0,
) -> tuple[Gate, list[float]]:
    """Train ``gate`` to weight frozen members per position; returns (trained gate,
    loss per step).

    The members' logits [N, S, T, V] and hidden states [N, S, T, E] are
    computed once for all ``sequences`` [S, T] (jitted, under
    ``stop_gradient``); then ``steps`` Adam steps minimise the mean next-token
    NLL of ``Combination(rule)`` with the gate's weights (module docstring),
    each on ``batch_size`` sequences drawn without replacement (all of them,
    every step, when ``batch_size >= S``). ``mask`` [S, T] marks real tokens
    (either padding side works); positions whose next token is padding do not
    count. The loss of step k is measured before its update, so ``losses[0]``
    is the initial gate's. ``gate`` itself is left unchanged. Only the
    members of ``forward`` are used; the rule is ``rule``, not
    ``forward.combination``. Compilations are shared between calls with the
    same ``forward``, gate architecture, ``rule`` and batch shape.

    A few steps on one sequence; ``losses[0]`` is the uniform mixture's NLL:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> from jaxcombine.ensemble import StackedForward, stack_members
    >>> graphdef, params = stack_members(members)
    >>> ids = [1, 2, 3, 4, 5, 6, 7, 8]
    >>> gate = Gate(2, config.hidden_size, rngs=nnx.Rngs(0))
    >>> trained, losses = train_gate(gate, StackedForward(graphdef, Combination()), params,
    ...                              [ids], steps=5)
    >>> z = jnp.stack([m(jnp.array([ids])).logits[0] for m in members])
    >>> p = jax.nn.softmax(z).mean(0)                                  # uniform linear rule
    >>> ref = -sum(float(jnp.log(p[t - 1, ids[t]])) for t in range(1, 8)) / 7
    >>> len(losses), abs(losses[0] - ref) < 1e-5, losses[-1] < losses[0]
    (5, True, True)

    References: Jacobs et al. 1991, Adaptive Mixtures of Local Experts, Neural Computation 3(1) (the
    gate trained, the experts frozen).
    """
    import optax  # imported where used, as in merging.adamerging

    tokens, valid = _check_inputs(gate, sequences, mask, rule, steps, learning_rate, batch_size)
    S, T = tokens.shape
    shapes = jax.eval_shape(lambda p: forward.member_outputs(p, tokens, valid, None), member_params)
    N, _, _, V = shapes.logits.shape
    E = shapes.hidden.shape[-1]
    if gate.num_members != N:
        raise ConfigError(
            f"the gate weights {gate.num_members} members, the stacked parameters hold {N}",
            where="train_gate(gate)",
            fix=f"build the gate with Gate({N}, {E}, ...)",
        )
    if gate.hidden_size != E:
        raise ConfigError(
            f"the gate expects hidden size {gate.hidden_size}, the members' is {E}",
            where="train_gate(gate)",
            fix=f"build the gate with Gate({N}, {E}, ...)",
        )
    if tokens.min() < 0 or tokens[valid].max() >= V:
        raise InputError(
            f"token ids must be in [0, {V}) (the members' vocabulary), got "
            f"[{tokens.min()}, {tokens[valid].max()}]",
            where="train_gate(sequences)",
            fix="tokenize with the members' tokenizer; use a valid id (e.g. 0) for padding",
        )

    logits, hidden = _frozen_outputs(forward, member_params, tokens, valid)  # [N, S, T-1, .]
    data = (
        logits,
        hidden,
        jnp.asarray(tokens[:, 1:]),  # targets [S, T-1]
        jnp.asarray(valid[:, :-1] & valid[:, 1:]),  # counted [S, T-1]
    )
    graphdef, params, rest = nnx.split(gate, nnx.Param, ...)
    params = jax.tree.map(jnp.array, params)  # own copies: the gate passed in stays as it is
    opt_state = optax.adam(learning_rate).init(params)
    lr = jnp.float32(learning_rate)
    key = jax.random.key(seed)
    losses = []
    for k in range(steps):
        params, opt_state, loss = _train_step(
            graphdef, rule, min(batch_size, S), params, rest, opt_state,
            jax.random.fold_in(key, k), lr, data,
        )  # fmt: skip
        losses.append(loss)
    return nnx.merge(graphdef, params, rest), [float(x) for x in jax.device_get(losses)]
