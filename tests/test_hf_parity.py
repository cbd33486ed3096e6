"""Our Flax T5 on HF checkpoints gives HF transformers' logits (fp32, max |diff| <= 1e-4)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import hf_reference as ref  # noqa: E402

from hir_jax.checkpoints import load_checkpoint, load_hf, save_hf  # noqa: E402
from hir_jax.model import t5  # noqa: E402

ATOL = 1e-4


@functools.cache
def _apply_fn(config):
    return jax.jit(t5.T5(config).apply)


def _our_logits(config, params, enc, dec) -> np.ndarray:
    return np.asarray(_apply_fn(config)({"params": params}, enc, dec))


def _assert_parity(ours, theirs, dec_lengths, what):
    assert ours.shape == theirs.shape, what
    worst = 0.0
    for row, length in enumerate(dec_lengths):
        worst = max(worst, float(np.abs(ours[row, :length] - theirs[row, :length]).max()))
    assert worst <= ATOL, f"{what}: max |ours - HF| = {worst:.3g} > {ATOL}"
    return worst


CASES = {
    "v1_1_gated_gelu_untied": (ref.V1_1, dict(batch=3, enc_len=37, dec_len=11)),
    "v1_0_relu_tied": (ref.V1_0, dict(batch=3, enc_len=37, dec_len=11)),
    "dkv_heads_ne_dmodel": (ref.ODD_HEADS, dict(batch=3, enc_len=29, dec_len=13)),
    "long_inputs_over_128": (ref.LONG, dict(batch=2, enc_len=200, dec_len=150)),
    "plain_gelu": (ref.PLAIN_GELU, dict(batch=2, enc_len=17, dec_len=7)),
    "gated_relu": (ref.GATED_RELU, dict(batch=2, enc_len=17, dec_len=7)),
}


@pytest.fixture(scope="module")
def hf_checkpoints(tmp_path_factory):
    """name -> (HF model, checkpoint dir), written once per module."""
    out = {}
    for i, (name, (kwargs, _)) in enumerate(CASES.items()):
        model = ref.make_hf_model(seed=i, **kwargs)
        out[name] = (model, ref.save_hf_model(model, tmp_path_factory.mktemp(name)))
    return out


@pytest.mark.parametrize("padded", [False, True], ids=["full", "padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(hf_checkpoints, case, padded):
    model, directory = hf_checkpoints[case]
    kwargs, shapes = CASES[case]
    config, params = load_checkpoint(directory)
    assert config.feed_forward_proj == kwargs["feed_forward_proj"]
    assert config.tie_word_embeddings == kwargs["tie_word_embeddings"]
    enc, dec, lengths = ref.token_batch(1, kwargs["vocab_size"], padded=padded, **shapes)
    _assert_parity(
        _our_logits(config, params, enc, dec), ref.hf_logits(model, enc, dec), lengths, case
    )


def test_long_inputs_use_the_saturated_buckets(hf_checkpoints):
    """With 200 tokens the last (log / clipped) buckets matter, so parity checks them."""
    _, directory = hf_checkpoints["long_inputs_over_128"]
    config, params = load_hf(directory)
    enc, dec, _ = ref.token_batch(2, ref.LONG["vocab_size"], 1, 200, 150, padded=False)
    base = _our_logits(config, params, enc, dec)
    half = config.relative_attention_num_buckets // 2  # per direction in the encoder
    for stack, columns in (("encoder", [half - 1, 2 * half - 1]), ("decoder", [-1])):
        changed = jax.tree.map(np.copy, params)
        changed[stack]["relpos_bias"]["rel_embedding"][:, columns] += 1.0
        diff = np.abs(_our_logits(config, changed, enc, dec) - base).max()
        assert diff > 1e-2, f"{stack}: the last buckets do not affect the logits"


def test_export_round_trip_gives_same_logits(hf_checkpoints, tmp_path):
    """load_hf -> save_hf -> transformers loads it and gives the original logits."""
    import transformers

    for case in ("v1_1_gated_gelu_untied", "v1_0_relu_tied"):
        model, directory = hf_checkpoints[case]
        kwargs, shapes = CASES[case]
        config, params = load_hf(directory)
        out = tmp_path / case
        save_hf(out, config, params, max_shard_size="40KB")
        reloaded, info = transformers.T5ForConditionalGeneration.from_pretrained(
            str(out), output_loading_info=True
        )
        assert not any(info.values()), info
        reloaded.eval()
        enc, dec, lengths = ref.token_batch(3, kwargs["vocab_size"], padded=True, **shapes)
        expected = ref.hf_logits(model, enc, dec)
        np.testing.assert_array_equal(ref.hf_logits(reloaded, enc, dec), expected)
        config2, params2 = load_hf(out)
        assert config2 == config
        _assert_parity(_our_logits(config2, params2, enc, dec), expected, lengths, case)
