"""Model building blocks: config validation, dropout, the MLP classifier, sharding rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from jaxcombine.errors import ConfigError
from jaxcombine.models import Decoder, DecoderConfig, MLPClassifier
from jaxcombine.sharding import partition_spec, shard_model

CONFIG = DecoderConfig(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    dropout_rate=0.2,
)


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        CONFIG.replace(num_kv_heads=3)
    with pytest.raises(ConfigError, match="hidden_act"):
        CONFIG.replace(hidden_act="swish9")
    with pytest.raises(ConfigError, match="layer_types"):
        CONFIG.replace(layer_types=("full_attention",))
    with pytest.raises(ConfigError, match="sliding_window"):
        CONFIG.replace(layer_types=("full_attention", "sliding_attention"))
    with pytest.raises(ConfigError, match="dropout_rate"):
        CONFIG.replace(dropout_rate=1.0)


def test_parameters_carry_logical_axes():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    axes = {
        "/".join(map(str, p)): v.get_metadata()["out_sharding"]
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    assert axes["embed_tokens/embedding"] == ("vocab", "embed")
    assert axes["layers/0/self_attn/q_proj/kernel"] == ("embed", "heads", "head_dim")
    assert axes["layers/1/self_attn/k_proj/kernel"] == ("embed", "kv_heads", "head_dim")
    assert axes["layers/0/mlp/down_proj/kernel"] == ("mlp", "embed")
    assert axes["lm_head/kernel"] == ("embed", "vocab")


def test_dropout_only_with_a_key():
    model = Decoder(CONFIG, rngs=nnx.Rngs(0))
    tokens = jnp.arange(12).reshape(2, 6)
    plain = model(tokens).logits
    np.testing.assert_array_equal(plain, model(tokens).logits)
    a = model(tokens, dropout_key=jax.random.key(1)).logits
    b = model(tokens, dropout_key=jax.random.key(1)).logits
    c = model(tokens, dropout_key=jax.random.key(2)).logits
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and not np.allclose(a, c)
    # Averaging many dropout passes approaches the deterministic output (inverted dropout).
    keys = jax.random.split(jax.random.key(0), 256)
    mean = jax.vmap(lambda k: model(tokens, dropout_key=k).logits)(keys).mean(0)
    assert np.abs(mean - plain).mean() < 0.2 * np.abs(a - plain).mean()


def test_classifier_matches_a_numpy_forward():
    model = MLPClassifier(3, (16, 8), 4, rngs=nnx.Rngs(0))
    x = np.random.RandomState(0).randn(5, 3).astype(np.float32)
    h = x
    for layer in model.layers:
        h = np.maximum(h @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...]), 0)
    expected = h @ np.asarray(model.head.kernel[...]) + np.asarray(model.head.bias[...])
    np.testing.assert_allclose(model(jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)


def test_classifier_trains_with_optax():
    import optax

    rng = np.random.RandomState(0)
    x = rng.randn(256, 2).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)  # XOR-like, needs the hidden layer
    model = MLPClassifier(2, (32,), 2, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    def loss_fn(params):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss

    for _ in range(300):
        params, opt_state, loss = step(params, opt_state)
    accuracy = (nnx.merge(graphdef, params)(x).argmax(-1) == y).mean()
    assert accuracy > 0.9


def test_sharded_model_equals_unsharded():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    config = CONFIG.replace(num_kv_heads=4, dropout_rate=0.0)
    model = Decoder(config, rngs=nnx.Rngs(0))
    tokens = jnp.arange(24).reshape(4, 6) % 96
    expected = model(tokens).logits
    shard_model(model, mesh)
    q = model.layers[0].self_attn.q_proj.kernel.get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model", None)
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 1, 8)
    np.testing.assert_allclose(
        jax.jit(lambda m, t: m(t).logits)(model, tokens), expected, rtol=1e-5, atol=1e-6
    )


def test_partition_spec_rules():
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
    rules = (("heads", "model"), ("head_dim", "model"), ("embed", "absent"))
    spec = partition_spec(("embed", "heads", "head_dim"), (8, 4, 8), mesh, rules)
    assert spec == jax.sharding.PartitionSpec(None, "model", None)  # each mesh axis once
    with pytest.raises(ConfigError, match="heads.*6.*4"):
        partition_spec(("embed", "heads"), (8, 6), mesh, rules, where="q_proj")


def test_equal_configs_share_a_graph_definition():
    """Models of one config differ only in state: jit caches hit, states stack for vmap."""
    g1, _ = nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(0)))
    g2, _ = nnx.split(Decoder(CONFIG, rngs=nnx.Rngs(1)))
    assert g1 == g2 and hash(g1) == hash(g2)
