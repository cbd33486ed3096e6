"""The Flax T5 on its own: cache equivalence, position buckets, dtypes, axes, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hir_jax.model import t5
from hir_jax.model.configs import CONFIGS, T5Config, get_config

V11 = T5Config(
    vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_heads=3,
    num_encoder_layers=2, num_decoder_layers=2,
    relative_attention_num_buckets=8, relative_attention_max_distance=20,
)  # fmt: skip
V10 = V11.replace(feed_forward_proj="relu", tie_word_embeddings=True)


def _inputs(seed: int = 0, batch: int = 3, enc_len: int = 30, dec_len: int = 9):
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, 97, (batch, enc_len)).astype(np.int32)
    enc[1, enc_len // 2 :] = 0  # a padded row
    dec = rng.integers(3, 97, (batch, dec_len)).astype(np.int32)
    dec[:, 0] = 0
    return jnp.asarray(enc), jnp.asarray(dec)


@pytest.mark.parametrize("cfg", [V11, V10], ids=["v1_1", "v1_0"])
def test_incremental_decoding_matches_full_pass(cfg):
    model = t5.T5(cfg)
    params = t5.init_params(cfg, jax.random.key(1))
    enc, dec = _inputs()
    full = model.apply({"params": params}, enc, dec)
    encoded = model.apply({"params": params}, enc, method=t5.T5.encode)
    steps = dec.shape[1]
    _, variables = model.apply(
        {"params": params}, encoded, enc, steps, method=t5.T5.init_cache, mutable=["cache"]
    )
    cache = variables["cache"]
    step_logits = []
    for i in range(steps):
        logits, variables = model.apply(
            {"params": params, "cache": cache},
            encoded,
            enc,
            dec[:, i : i + 1],
            decode=True,
            max_decode_length=steps,
            method=t5.T5.decode,
            mutable=["cache"],
        )
        cache = variables["cache"]
        step_logits.append(logits)
    np.testing.assert_allclose(np.concatenate(step_logits, 1), full, atol=2e-5, rtol=1e-5)


def test_decoder_is_causal_and_encoder_ignores_padding():
    model = t5.T5(V11)
    params = t5.init_params(V11, jax.random.key(2))
    enc, dec = _inputs()
    base = model.apply({"params": params}, enc, dec)
    dec2 = dec.at[:, 5:].set(7)  # future tokens change
    out = model.apply({"params": params}, enc, dec2)
    np.testing.assert_allclose(out[:, :5], base[:, :5], atol=1e-6)
    assert np.abs(out[:, 6:] - base[:, 6:]).max() > 1e-3
    # Row 1 is padded after position 15: trimming the padding changes nothing.
    trimmed = model.apply({"params": params}, enc[1:2, :15], dec[1:2])
    np.testing.assert_allclose(trimmed, base[1:2], atol=2e-5)


def test_relative_position_buckets_match_hf_exactly():
    torch = pytest.importorskip("torch")
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = np.arange(-3000, 3001)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20), (64, 256)):
            ref = T5Attention._relative_position_bucket(
                torch.tensor(rel),
                bidirectional=bidirectional,
                num_buckets=buckets,
                max_distance=distance,
            ).numpy()
            ours = t5.relative_position_bucket(
                rel, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            np.testing.assert_array_equal(ours, ref)


def test_bf16_activations_keep_fp32_params_and_close_logits():
    cfg16 = V11.replace(dtype="bfloat16")
    params = t5.init_params(cfg16, jax.random.key(3))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    enc, dec = _inputs()
    l32 = t5.T5(V11).apply({"params": params}, enc, dec)
    l16 = t5.T5(cfg16).apply({"params": params}, enc, dec)
    assert l16.dtype == jnp.float32  # logits are always fp32
    rel = np.abs(l16 - l32).max() / np.abs(l32).max()
    assert 0 < rel < 0.05


def test_remat_changes_nothing_numerically():
    params = t5.init_params(V11, jax.random.key(4))
    enc, dec = _inputs()

    def loss(p, cfg):
        return jnp.mean(t5.T5(cfg).apply({"params": p}, enc, dec) ** 2)

    g1 = jax.grad(loss)(params, V11)
    g2 = jax.grad(loss)(params, V11.replace(remat=True))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_dropout_is_active_only_when_enabled():
    cfg = V11.replace(dropout_rate=0.3)
    model = t5.T5(cfg)
    params = t5.init_params(cfg, jax.random.key(5))
    enc, dec = _inputs()
    a = model.apply({"params": params}, enc, dec)
    b = model.apply({"params": params}, enc, dec)
    np.testing.assert_array_equal(a, b)
    d1 = model.apply(
        {"params": params}, enc, dec, enable_dropout=True, rngs={"dropout": jax.random.key(0)}
    )
    d2 = model.apply(
        {"params": params}, enc, dec, enable_dropout=True, rngs={"dropout": jax.random.key(0)}
    )
    np.testing.assert_array_equal(d1, d2)
    assert np.abs(d1 - a).max() > 1e-3


KNOWN_AXES = {"embed", "mlp", "joined_kv", "vocab", "heads", "relpos_buckets"}


@pytest.mark.parametrize("cfg", [V11, V10], ids=["v1_1", "v1_0"])
def test_every_parameter_has_logical_axes(cfg):
    axes = t5.param_logical_axes(cfg)
    shapes = t5.param_shapes(cfg)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    flat_axes = jax.tree_util.tree_flatten_with_path(axes, is_leaf=is_spec)[0]
    flat_shapes = dict(jax.tree_util.tree_flatten_with_path(shapes)[0])
    assert len(flat_axes) == len(flat_shapes)
    for path, spec in flat_axes:
        assert len(spec) == len(flat_shapes[path].shape), path
        assert set(spec) <= KNOWN_AXES, (path, spec)
    has_head = "logits_dense" in shapes["decoder"]
    assert has_head == (not cfg.tie_word_embeddings)
    mlp = shapes["encoder"]["layers_0"]["mlp"]
    assert set(mlp) == ({"wi_0", "wi_1", "wo"} if cfg.is_gated else {"wi", "wo"})


def test_named_sizes_have_reference_shapes():
    # HIR_REFERENCE.md, "FLAN-T5 facts": d_model, d_ff, layers, heads, d_kv.
    table = {
        "small": (512, 1024, 8, 6),
        "base": (768, 2048, 12, 12),
        "large": (1024, 2816, 24, 16),
        "xl": (2048, 5120, 24, 32),
        "xxl": (4096, 10240, 24, 64),
    }
    for name, (d, ff, layers, heads) in table.items():
        c = CONFIGS[name]
        assert (c.d_model, c.d_ff, c.num_encoder_layers, c.num_heads) == (d, ff, layers, heads)
        assert (c.num_decoder_layers, c.d_kv, c.vocab_size) == (layers, 64, 32128)
        assert c.feed_forward_proj == "gated-gelu" and not c.tie_word_embeddings
    small = t5.param_shapes(get_config("small"))
    assert t5.count_params(small) == 76_961_152  # google/flan-t5-small
    with pytest.raises(ValueError, match="unknown model size"):
        get_config("huge")
