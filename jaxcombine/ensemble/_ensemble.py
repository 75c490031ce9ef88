"""General ensembles: members of several architectures, vocabularies shared by
token string, MC-dropout members, and per-step coefficients (a running
Bayesian posterior or a learned gate), as one :class:`~jaxcombine.decoding.Decodable`.

Members are grouped into runs of one architecture; each group is stacked and
``vmap``ped (one compiled graph per architecture, as :class:`StackedForward`),
and the groups' logits are concatenated on the member axis N in the order
the members were given, so weights follow that order.

Vocabularies. The ensemble speaks the first member's token ids. A member with
another vocabulary gives a map from every one of its token strings to its id;
the shared tokens are those whose string is in every member's vocabulary.
Each member's logits are gathered onto the first member's ids; the combined
distribution is renormalised over the shared tokens and is ``-inf`` on the
others. Limits: tokens are matched by their exact string only (so ``"Ġthe"``
and ``"▁the"`` do not match, and byte-level and SentencePiece vocabularies
share little); every member reads the text as the first member tokenised it,
which may differ from how it would tokenise it itself; prompts may only use
shared tokens. Too small an overlap is an error.

Coefficients per step, with member log-probabilities ``log p_i``:

* ``"constant"``: the combination's weights.
* ``"posterior"``: Bayesian model averaging over the prefix so far,
  ``w_i(t) ∝ prior_i * prod_{s<=t} p_i(x_s | x_<s)``, i.e.
  ``softmax_i(log prior_i + sum_{s<=t} log p_i(x_s | x_<s))`` over the prompt
  and the generated tokens (the first token of a row is given, not predicted).
* a :class:`~jaxcombine.ensemble.Gate`: ``w(t) = gate(h_1(t), ..., h_N(t))`` from
  the members' final hidden states (members of one hidden size).

MC dropout (Gal & Ghahramani 2016, arXiv:1506.02142): :class:`MCDropout`
stands for ``samples`` members that are one model with residual dropout kept
on; every forward call draws fresh masks, member ``k`` of call ``c`` with key
``jax.random.split(jax.random.fold_in(key, c), samples)[k]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxcombine.decoding import (
    Decodable,
    DecoderForward,
)
from jaxcombine.ensemble._gate import Gate
from jaxcombine.ensemble._rules import Combination
from jaxcombine.ensemble._stacked import _UNIFORM_LINEAR, StackedForward, stack_members
from jaxcombine.errors import ConfigError
from jaxcombine.models import Decoder, init_cache

_MASKED = -1e9  # logit of a token outside the shared vocabulary, before the rule


@dataclasses.dataclass(frozen=True, eq=False)
class MCDropout:
    """``samples`` ensemble members that are ``model`` with dropout at ``rate``
    (default: the model's ``dropout_rate``) kept on while decoding.

    Averaging predictions over dropout masks approximates the Bayesian
    predictive distribution.
    Residual dropout zeroes each entry with probability ``rate`` and scales
    the rest by ``1 / (1 - rate)``; every forward call draws fresh masks.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import ensemble
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> ens = ensemble([MCDropout(Decoder(config, rngs=nnx.Rngs(0)), samples=3, rate=0.1)])
    >>> ens.forward.num_members
    3
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    >>> z, _, _ = jax.jit(ens.forward.member_outputs)(ens.params, tokens, tokens > 0, None)
    >>> z.shape, bool(jnp.allclose(z[0], z[1]))                # members differ by their masks
    ((3, 1, 8, 16), False)

    References: Gal & Ghahramani 2016, Dropout as a Bayesian Approximation: Representing Model
    Uncertainty in Deep Learning, arXiv:1506.02142.
    """

    model: Decoder
    samples: int
    rate: float | None = None


@dataclasses.dataclass(frozen=True)
class _Group:
    graphdef: Any
    config: Any
    size: int
    dropout: bool  # one model's parameters, members differ by dropout masks


class EnsembleCache(NamedTuple):
    groups: tuple[Any, ...]  # per group: the members' caches stacked on axis 0
    log_evidence: jax.Array  # [N, B] sum of log p_i over the tokens seen
    last_log_probs: jax.Array  # [N, B, V] the members' latest next-token log-probs
    calls: jax.Array  # [] forward calls so far (MC-dropout keys)


@dataclasses.dataclass(frozen=True)
class EnsembleForward:
    """The forward of an ensemble of groups (see the module docstring); params are
    ``{"groups", "token_maps", "shared", "prior", "gate", "key"}``.

    Built by :func:`ensemble`. With constant coefficients and members of one
    architecture it computes what :class:`StackedForward` computes:

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> from jaxcombine.ensemble import ensemble, stacked
    >>> ens, ref = ensemble(members), stacked(members)         # uniform linear rule
    >>> ens.forward.num_members, ens.forward.coefficients
    (2, 'constant')
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    >>> a, _ = ens.forward(ens.params, tokens, tokens > 0, None)
    >>> b, _ = ref.forward(ref.params, tokens, tokens > 0, None)
    >>> bool(jnp.allclose(a, b, atol=1e-6))
    True
    """

    groups: tuple[_Group, ...]
    combination: Combination
    coefficients: Literal["constant", "posterior", "gate"] = "constant"
    gate_graphdef: Any = None
    mapped: bool = False  # some member has its own vocabulary

    @property
    def num_members(self) -> int:
        return sum(g.size for g in self.groups)

    def member_outputs(self, params, tokens, mask, cache, last_only=False):
        """Members' logits on the first member's ids [N, B, T, V], hidden states
        [N, B, T, E] (None when hidden sizes differ) and the groups' caches."""
        call = jnp.zeros((), jnp.int32) if cache is None else cache.calls
        logits, hidden, caches = [], [], []
        for i, group in enumerate(self.groups):
            token_map = params["token_maps"][i]
            out = _group_outputs(
                group, params["groups"][i], tokens if token_map is None else token_map[tokens],
                mask, None if cache is None else cache.groups[i], last_only,
                jax.random.fold_in(params["key"], call),
            )  # fmt: skip
            z = out.logits.astype(jnp.float32)
            if token_map is not None:  # the member's logits of the first member's ids
                z = z[..., token_map]
            if self.mapped:  # every member renormalised over the shared tokens
                z = jnp.where(params["shared"], z, _MASKED)
            logits.append(z)
            hidden.append(out.hidden)
            caches.append(out.cache)
        same_size = len({h.shape[-1] for h in hidden}) == 1
        return jnp.concatenate(logits), (jnp.concatenate(hidden) if same_size else None), caches

    def __call__(self, params, tokens, mask, cache, last_only=False):
        posterior = self.coefficients == "posterior"
        logits, hidden, caches = self.member_outputs(
            params, tokens, mask, cache, last_only and not posterior
        )
        weights = None
        new_cache = None
        if posterior:
            log_p = jax.nn.log_softmax(logits, axis=-1)  # [N, B, T, V]
            evidence = running_log_evidence(log_p, tokens, mask, cache)  # [N, B, T]
            weights = jax.nn.softmax(jnp.log(params["prior"])[:, None, None] + evidence, axis=0)
            if cache is not None:
                new_cache = EnsembleCache(
                    tuple(caches), evidence[:, :, -1], log_p[:, :, -1], cache.calls + 1
                )
            if last_only:
                logits, weights = logits[:, :, -1:], weights[:, :, -1:]
        elif self.coefficients == "gate":
            weights = nnx.merge(self.gate_graphdef, params["gate"])(hidden)
        if cache is not None and new_cache is None:
            new_cache = cache._replace(groups=tuple(caches), calls=cache.calls + 1)
        combined = self.combination(logits, weights)
        if self.mapped:  # renormalised over the shared tokens
            combined = jax.nn.log_softmax(jnp.where(params["shared"], combined, -jnp.inf), -1)
        return combined, new_cache

    def unreadable_tokens(self, params, tokens) -> list[int]:
        """The ids among ``tokens`` some member cannot read (not shared by string)."""
        if not self.mapped:
            return []
        shared = np.asarray(params["shared"])
        return sorted({int(t) for t in tokens if 0 <= int(t) < len(shared) and not shared[t]})

    def init_cache(self, params, config, batch, length, dtype):
        groups = []
        for group in self.groups:
            empty = init_cache(group.config, batch, length, dtype)
            groups.append(
                jax.tree.map(lambda x, n=group.size: jnp.broadcast_to(x, (n, *x.shape)), empty)
            )
        N = self.num_members
        return EnsembleCache(
            tuple(groups),
            jnp.zeros((N, batch), jnp.float32),
            jnp.zeros((N, batch, config.vocab_size), jnp.float32),
            jnp.zeros((), jnp.int32),
        )

    def take_rows(self, cache, rows):
        return cache._replace(
            groups=tuple(StackedForward.take_rows(c, rows) for c in cache.groups),
            log_evidence=cache.log_evidence[:, rows],
            last_log_probs=cache.last_log_probs[:, rows],
        )

    def pad_slots(self, cache, extra: int):
        return cache._replace(
            groups=tuple(StackedForward.pad_slots(c, extra) for c in cache.groups)
        )

    def keep_slots(self, cache, keep):
        if self.coefficients == "posterior":
            raise ConfigError(
                "speculative decoding cannot undo a posterior's evidence for rejected tokens",
                where="coefficients",
                fix="use constant or gate coefficients with speculative decoding",
            )
        return cache._replace(
            groups=tuple(StackedForward.keep_slots(c, keep) for c in cache.groups)
        )


def running_log_evidence(log_p, tokens, mask, cache):
    """``evidence[i, b, t]``: the cache's running sum plus ``log p_i(x_s | x_<s)``
    over this call's real tokens ``x_s``, s <= t. Token s is predicted by
    position s - 1, or for s = 0 by the previous call's last position; on a
    row's first call its first real token is given, not predicted."""
    N, B, T, V = log_p.shape
    if cache is None:
        previous, start, first_call = jnp.zeros((N, B, 1, V)), jnp.zeros((N, B)), True
    else:
        previous, start = cache.last_log_probs[:, :, None], cache.log_evidence
        first_call = cache.calls == 0
    predictors = jnp.concatenate([previous, log_p[:, :, :-1]], axis=2)  # [N, B, T, V]
    index = jnp.broadcast_to(tokens[None, :, :, None], (N, B, T, 1))
    token_log_p = jnp.take_along_axis(predictors, index, axis=-1)[..., 0]  # [N, B, T]
    first_real = mask & (jnp.cumsum(mask, axis=1) == 1)
    counted = mask & ~(first_real & first_call)
    return start[:, :, None] + jnp.cumsum(jnp.where(counted[None], token_log_p, 0.0), axis=2)


def _group_outputs(group: _Group, params, ids, mask, cache, last_only, key):
    """The group's members' DecoderOutput, stacked on axis 0."""
    one = DecoderForward(group.graphdef)
    if group.dropout:  # one model, fresh dropout masks per member
        keys = jax.random.split(key, group.size)
        return jax.vmap(lambda k, c: one.outputs(params, ids, mask, c, last_only, k))(keys, cache)
    return jax.vmap(lambda p, c: one.outputs(p, ids, mask, c, last_only))(params, cache)


def _groups(members) -> list[list[Any]]:
    """Runs of consecutive members of one architecture (an MCDropout is its own run)."""
    runs: list[list[Any]] = []
    for member in members:
        if (
            runs
            and not isinstance(member, MCDropout)
            and not isinstance(runs[-1][0], MCDropout)
            and _same_architecture(runs[-1][0].config, member.config)
        ):
            runs[-1].append(member)
        else:
            runs.append([member])
    return runs


def _same_architecture(a, b) -> bool:
    return a.replace(dropout_rate=b.dropout_rate) == b


def _dropout_group(spec: MCDropout):
    model, rate = spec.model, spec.model.config.dropout_rate if spec.rate is None else spec.rate
    if spec.samples < 1 or not 0.0 < rate < 1.0:
        raise ConfigError(
            f"MC dropout needs samples >= 1 and a rate in (0, 1), got {spec.samples} and {rate}",
            where="MCDropout",
            fix="pass rate=0.1 (or the model's training dropout) and several samples",
        )
    graphdef, params = nnx.split(model)
    config = model.config.replace(dropout_rate=rate)
    copy = nnx.merge(graphdef, params)
    copy.config = config  # the rate is read from the config at call time
    graphdef, params = nnx.split(copy)
    return _Group(graphdef, config, spec.samples, dropout=True), params


def shared_vocabulary(vocabularies: Sequence[Mapping[str, int] | None], sizes, min_shared):
    """(token maps: per member None or [V_1] its id of each first-member id,
    shared [V_1] bool) for vocabularies given as token string -> id.

    Token ``i`` of the first vocabulary is shared when its string is in every
    other vocabulary (with an id below that member's ``size``); ``map[i]`` is
    then that id (0 for tokens not shared). Fewer than ``min_shared`` shared
    is a :class:`ConfigError`.

    >>> first = {"a": 0, "b": 1, "c": 2}
    >>> other = {"c": 0, "a": 1, "z": 2}
    >>> maps, shared = shared_vocabulary([first, other], sizes=[3, 3], min_shared=0.5)
    >>> maps[0], maps[1].tolist(), shared.tolist()            # "b" is not in the other
    (None, [1, 0, 0], [True, False, True])
    """
    first = vocabularies[0]
    if first is None:
        raise ConfigError(
            "the first member's vocabulary is needed to map the others onto it",
            where="vocabularies[0]",
            fix="pass every member's tokenizer.get_vocab()",
        )
    V = sizes[0]
    by_id = {i: t for t, i in first.items() if i < V}
    shared = np.array([i in by_id for i in range(V)])
    maps = []
    for m, (vocab, size) in enumerate(zip(vocabularies, sizes, strict=True)):
        if m == 0 or vocab is None or vocab == first:
            maps.append(None)
            continue
        token_map = np.zeros((V,), np.int32)
        for i in range(V):
            j = vocab.get(by_id.get(i)) if i in by_id else None
            if j is None or j >= size:
                shared[i] = False
            else:
                token_map[i] = j
        maps.append(token_map)
    fraction = shared.sum() / V
    if fraction < min_shared:
        raise ConfigError(
            f"only {shared.sum()} of the first member's {V} tokens ({fraction:.0%}) are in every "
            f"member's vocabulary (by string), fewer than min_shared={min_shared:.0%}",
            where="vocabularies",
            fix="ensemble models with the same (or a largely shared) tokenizer",
        )
    return maps, shared


def ensemble(
    members: Sequence[Decoder | MCDropout],
    combination: Combination = _UNIFORM_LINEAR,
    *,
    coefficients: Literal["constant", "posterior"] | Gate = "constant",
    vocabularies: Sequence[Mapping[str, int] | None] | None = None,
    min_shared: float = 0.5,
    seed: int = 0,
) -> Decodable:
    """Any members as one :class:`~jaxcombine.decoding.Decodable` (see the module
    docstring): decoders of one or several architectures, :class:`MCDropout`
    members, vocabularies mapped by string, constant, posterior or gated weights.
    ``combination.weights`` give the constant weights, or the posterior's prior.

    Bayesian model averaging (``coefficients="posterior"``): at position t
    the weights are ``softmax_i(log prior_i + sum_{1<=s<=t} log p_i(x_s | x_<s))``.

    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from jaxcombine.ensemble import Combination
    >>> from jaxcombine.models import Decoder, DecoderConfig
    >>> config = DecoderConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=2,
    ...                        num_heads=2, num_kv_heads=1, head_dim=4)
    >>> members = [Decoder(config, rngs=nnx.Rngs(i)) for i in range(2)]
    >>> ens = ensemble(members, Combination("linear"), coefficients="posterior")
    >>> tokens = jnp.array([[1, 2, 3, 4, 5, 6, 7, 8]])
    >>> log_p, _ = ens.forward(ens.params, tokens, tokens > 0, None)   # [B, T, V]
    >>> lp = jax.nn.log_softmax(jnp.stack([m(tokens).logits[0] for m in members]))
    >>> evidence = sum(lp[:, t - 1, tokens[0, t]] for t in range(1, 8))   # [N], at t = 7
    >>> w = jax.nn.softmax(evidence)                                       # uniform prior
    >>> ref = jnp.log(w[0] * jnp.exp(lp[0, 7]) + w[1] * jnp.exp(lp[1, 7]))
    >>> bool(jnp.allclose(log_p[0, 7], ref, atol=1e-5))
    True

    Models with other tokenizers: ``ensemble([llama, qwen],
    vocabularies=[tok_a.get_vocab(), tok_b.get_vocab()])`` (see
    :func:`shared_vocabulary`); MC dropout: ``ensemble([MCDropout(model, 8)])``.

    References: ``posterior``: Hoeting et al. 1999, Bayesian Model Averaging: A Tutorial,
    Statistical Science 14(4); MC dropout: Gal & Ghahramani 2016, Dropout as a Bayesian
    Approximation: Representing Model Uncertainty in Deep Learning, arXiv:1506.02142; a gate: Jacobs
    et al. 1991, Adaptive Mixtures of Local Experts, Neural Computation 3(1).
    """
    members = list(members)
    if not members:
        raise ConfigError("no members given", where="members", fix="pass at least one model")
    models = [m.model if isinstance(m, MCDropout) else m for m in members]
    counts = [m.samples if isinstance(m, MCDropout) else 1 for m in members]
    N = sum(counts)
    combination.check_members(N)
    sizes = [m.config.vocab_size for m in models]
    if vocabularies is None:
        if len(set(sizes)) > 1:
            raise ConfigError(
                f"members have vocabularies of different sizes {sizes} and no token strings",
                where="vocabularies",
                fix="pass vocabularies=[tokenizer.get_vocab() for each member] to map them",
            )
        vocabularies = [None] * len(models)
    elif len(vocabularies) != len(models):
        raise ConfigError(
            f"{len(vocabularies)} vocabularies for {len(models)} members",
            where="vocabularies",
            fix="give one vocabulary (or None for the first's) per member",
        )
    if any(v is not None for v in vocabularies[1:]):
        token_maps, shared = shared_vocabulary(vocabularies, sizes, min_shared)
    else:
        token_maps, shared = [None] * len(models), np.ones((sizes[0],), bool)
    groups, group_params, group_maps, start = [], [], [], 0
    for run in _groups(members):
        if isinstance(run[0], MCDropout):
            group, params = _dropout_group(run[0])
        else:
            graphdef, params = stack_members(run)
            group = _Group(graphdef, run[0].config, len(run), dropout=False)
        maps = token_maps[start : start + len(run)]
        start += len(run)
        if any(m is not None for m in maps) and not all(
            m is not None and np.array_equal(m, maps[0]) for m in maps
        ):
            raise ConfigError(
                "members of one architecture have different vocabularies",
                where="vocabularies",
                fix="give such members the same vocabulary, or list them apart",
            )
        groups.append(group)
        group_params.append(params)
        group_maps.append(None if maps[0] is None else jnp.asarray(maps[0]))
    gate = None
    if isinstance(coefficients, Gate):
        hidden = {m.config.hidden_size for m in models}
        if len(hidden) > 1 or coefficients.num_members != N:
            raise ConfigError(
                f"a gate needs members of one hidden size and one output per member; "
                f"hidden sizes {sorted(hidden)}, {N} members, gate for {coefficients.num_members}",
                where="coefficients",
                fix="train the gate (train_gate) for these members",
            )
        gate_graphdef, gate = nnx.split(coefficients)
        mode = "gate"
    elif coefficients in ("constant", "posterior"):
        gate_graphdef, mode = None, coefficients
    else:
        raise ConfigError(
            f"unknown coefficients {coefficients!r}",
            where="coefficients",
            fix="use 'constant', 'posterior' or a trained Gate",
        )
    if mode != "constant" and combination.rule == "contrastive":
        raise ConfigError(
            "contrastive decoding has no member weights to adapt",
            where="coefficients",
            fix="use constant coefficients with contrastive decoding",
        )
    forward = EnsembleForward(
        tuple(groups), combination, mode, gate_graphdef,
        mapped=any(m is not None for m in group_maps),
    )  # fmt: skip
    prior = combination.coefficients(N)
    params = {
        "groups": tuple(group_params),
        "token_maps": tuple(group_maps),
        "shared": jnp.asarray(shared),
        "prior": prior / jnp.sum(prior),
        "gate": gate,
        "key": jax.random.key(seed),
    }
    dtype = models[0].embed_tokens.embedding.get_value().dtype
    return Decodable(forward, params, models[0].config, dtype)
