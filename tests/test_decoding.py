"""Generation: greedy equivalence, sampling distribution and filters, PRNG independence."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from hir_jax import decoding, features
from hir_jax.decoding import SamplingConfig
from hir_jax.model import t5
from hir_jax.model.configs import EOS_ID, PAD_ID, T5Config

CFG = T5Config(
    vocab_size=24, d_model=32, d_kv=8, d_ff=48, num_heads=4,
    num_encoder_layers=2, num_decoder_layers=2,
)  # fmt: skip
MODEL = t5.T5(CFG)


@pytest.fixture(scope="module")
def params():
    p = t5.init_params(CFG, jax.random.key(0))
    # Scale the head so the first-token distribution is far from uniform.
    p["decoder"]["logits_dense"]["kernel"] = p["decoder"]["logits_dense"]["kernel"] * 4.0
    return p


def _prompts(seed: int = 0, batch: int = 4, length: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    enc = rng.integers(3, CFG.vocab_size, (batch, length)).astype(np.int32)
    enc[0, 7:] = PAD_ID
    enc[:, -1] = np.where(enc[:, -1] == PAD_ID, PAD_ID, EOS_ID)
    return enc


def _first_token_logits(params, prompt: np.ndarray) -> np.ndarray:
    start = jnp.zeros((1, 1), jnp.int32)
    return np.asarray(MODEL.apply({"params": params}, prompt[None], start)[0, 0])


def test_greedy_with_cache_equals_argmax_loop_without_cache(params):
    enc = _prompts()
    steps = 10
    out = decoding.generate(
        MODEL, params, enc, jax.random.key(0), SamplingConfig(greedy=True, max_new_tokens=steps)
    )
    dec = np.zeros((enc.shape[0], 1), np.int32)
    for _ in range(steps):  # full teacher-forced pass every step, no cache
        logits = MODEL.apply({"params": params}, enc, dec)
        dec = np.concatenate([dec, np.argmax(logits[:, -1], -1)[:, None]], axis=1)
    ref = dec[:, 1:]
    for row in range(enc.shape[0]):
        n = int(out.lengths[row, 0])
        np.testing.assert_array_equal(out.tokens[row, 0, :n], ref[row, :n])
        # After EOS, only padding.
        assert np.all(np.asarray(out.tokens[row, 0, n:]) == PAD_ID)
        if n < steps:
            assert out.tokens[row, 0, n - 1] == EOS_ID


def test_logprobs_are_model_log_softmax(params):
    enc = _prompts()[:2]
    out = decoding.generate(MODEL, params, enc, jax.random.key(3), SamplingConfig(top_k=0))
    dec = np.concatenate([np.zeros((2, 1), np.int32), np.asarray(out.tokens[:, 0, :4])], axis=1)
    logp = jax.nn.log_softmax(MODEL.apply({"params": params}, enc, dec[:, :4]), axis=-1)
    ref = np.take_along_axis(np.asarray(logp), dec[:, 1:, None], axis=-1)[..., 0]
    n = np.minimum(np.asarray(out.lengths[:, 0]), 4)
    for row in range(2):
        np.testing.assert_allclose(out.logprobs[row, 0, : n[row]], ref[row, : n[row]], atol=1e-5)


def _first_tokens(params, prompt, cfg: SamplingConfig, draws: int) -> np.ndarray:
    """First generated token of ``draws`` independent samples of one prompt."""
    enc = np.repeat(prompt[None], draws, axis=0)
    cfg = dataclasses.replace(cfg, max_new_tokens=1)
    out = decoding.generate(MODEL, params, enc, jax.random.key(7), cfg, row_ids=np.arange(draws))
    return np.asarray(out.tokens[:, 0, 0])


def _chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    probs = np.asarray(probs, np.float64) / np.sum(probs, dtype=np.float64)
    counts = np.bincount(tokens, minlength=probs.shape[0])
    keep = probs * len(tokens) >= 5
    expected = np.append(probs[keep], probs[~keep].sum()) * len(tokens)
    observed = np.append(counts[keep], counts[~keep].sum())
    if expected[-1] == 0:
        expected, observed = expected[:-1], observed[:-1]
    return float(stats.chisquare(observed, expected).pvalue)


def test_sampling_matches_softmax_with_temperature(params):
    prompt = _prompts()[1]
    logits = _first_token_logits(params, prompt)
    temperature = 1.7
    cfg = SamplingConfig(temperature=temperature, top_k=0, max_new_tokens=1)
    tokens = _first_tokens(params, prompt, cfg, draws=6000)
    right = np.asarray(jax.nn.softmax(logits / temperature))
    wrong = np.asarray(jax.nn.softmax(logits))  # what a sampler ignoring T would give
    assert _chi2_pvalue(tokens, right) > 1e-3
    assert _chi2_pvalue(tokens, wrong) < 1e-6


def test_top_k_and_top_p_never_leave_their_set(params):
    prompt = _prompts()[2]
    logits = _first_token_logits(params, prompt)
    order = np.argsort(-logits)
    tokens = _first_tokens(params, prompt, SamplingConfig(top_k=3, max_new_tokens=1), 600)
    assert set(tokens) <= set(order[:3]) and len(set(tokens)) > 1
    probs = np.asarray(jax.nn.softmax(logits))[order]
    nucleus = order[: int(np.searchsorted(np.cumsum(probs), 0.6)) + 1]
    tokens = _first_tokens(params, prompt, SamplingConfig(top_k=0, top_p=0.6), 600)
    assert set(tokens) <= set(nucleus)
    both = _first_tokens(params, prompt, SamplingConfig(top_k=2, top_p=0.99), 600)
    assert set(both) <= set(order[:2])


def test_samples_differ_and_do_not_depend_on_other_prompts(params):
    enc = _prompts(batch=4)
    cfg = SamplingConfig(num_samples=3, max_new_tokens=8, top_k=0)
    a = decoding.generate(MODEL, params, enc, jax.random.key(1), cfg)
    assert a.tokens.shape == (4, 3, 8)
    assert len({tuple(np.asarray(a.tokens[2, k])) for k in range(3)}) == 3
    # Other prompts changed, batch reordered and padded: prompt 2 (id 2) is unchanged.
    other = _prompts(seed=5, batch=6)
    other[4] = enc[2]
    ids = np.array([10, 11, 12, 13, 2, 14])
    b = decoding.generate(MODEL, params, other, jax.random.key(1), cfg, row_ids=ids)
    np.testing.assert_array_equal(a.tokens[2], b.tokens[4])
    c = decoding.generate(MODEL, params, enc, jax.random.key(2), cfg)
    assert not np.array_equal(a.tokens, c.tokens)


def test_no_recompilation_for_new_data_in_the_same_bucket(params):
    cfg = SamplingConfig(num_samples=2, max_new_tokens=5)
    fn = decoding.generate_fn(MODEL, cfg)
    decoding.generate(MODEL, params, _prompts(seed=1), jax.random.key(0), cfg)
    size = fn._cache_size()
    decoding.generate(MODEL, params, _prompts(seed=2), jax.random.key(9), cfg)
    assert fn._cache_size() == size
    padded, n = features.pad_sequences([[5, 6, 1], [7, 1]], buckets=(12,), batch_multiple=4)
    assert padded.shape == (4, 12) and n == 2
    decoding.generate(MODEL, params, padded, jax.random.key(3), cfg)
    assert fn._cache_size() == size


def test_bucketing_errors_and_config_checks():
    assert features.bucket_length(33, (32, 64)) == 64
    with pytest.raises(ValueError, match="longer than the largest bucket 64"):
        features.bucket_length(65, (32, 64))
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0.0)


def test_sharded_generation_equals_single_device(params):
    from hir_jax.partitioning import make_partitioner

    part = make_partitioner(data=4, model=2)
    enc = _prompts(batch=8)
    cfg = SamplingConfig(num_samples=2, max_new_tokens=6, top_k=5)
    single = decoding.generate(MODEL, params, enc, jax.random.key(4), cfg)
    sharded = part.shard_params(params, CFG)
    multi = decoding.generate(MODEL, sharded, enc, jax.random.key(4), cfg, partitioner=part)
    assert multi.tokens.sharding.spec[0] == "data"
    np.testing.assert_array_equal(single.tokens, multi.tokens)
    np.testing.assert_allclose(single.logprobs, multi.logprobs, atol=1e-5)


def test_a_pad_sampled_before_eos_does_not_cut_the_output(params):
    # Rows: PADs inside the output, EOS last; no EOS at all; EOS first.
    tokens = np.array(
        [[5, 0, 0, 6, 7, EOS_ID, 0, 0], [5, 6, 0, 7, 8, 9, 3, 0], [1, 0, 0, 0, 0, 0, 0, 0]]
    )
    lengths = np.asarray(decoding.lengths_to_eos(jnp.asarray(tokens)))
    assert lengths.tolist() == [6, 8, 1]  # not the non-PAD counts 5, 6, 1
    out = decoding.DecodeOutput(tokens[:, None], np.zeros(tokens.shape)[:, None], lengths[:, None])
    assert decoding.output_ids(out, 0) == [5, 0, 0, 6, 7]
    assert decoding.output_ids(out, 1) == [5, 6, 0, 7, 8, 9, 3, 0]
    assert decoding.output_ids(out, 2) == [] and decoding.output_ids(out, 2, keep_eos=True) == [1]
    # generate reports those lengths for what it samples.
    res = decoding.generate(MODEL, params, _prompts(), jax.random.key(5), SamplingConfig(top_k=0))
    flat = np.asarray(res.tokens).reshape(-1, res.tokens.shape[-1])
    np.testing.assert_array_equal(
        np.asarray(res.lengths).ravel(), np.asarray(decoding.lengths_to_eos(jnp.asarray(flat)))
    )
