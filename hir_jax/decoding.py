"""Jitted generation: encode once, then decode in one ``lax.while_loop`` with a KV cache.

Greedy decoding and temperature sampling with top-k and top-p, ``num_samples`` outputs
per prompt (one encoder pass and one copy of the cross-attention keys/values per prompt,
shared by its samples), early stop once every
sequence has produced EOS. Randomness is explicit: each output row draws from
``fold_in(fold_in(rng, row_id), step)``, so a prompt's samples depend on the key, its id
and nothing else: not on the other prompts of the batch, the batch size, the padding or
the device mesh.

Shapes are static: prompts are padded to length buckets (``features.pad_sequences``) so
that a new round of sampling reuses the compiled program.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hir_jax.model.configs import DECODER_START_ID, EOS_ID, PAD_ID
from hir_jax.model.t5 import T5

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How outputs are drawn. The reference's HIR sampling: T=1, top-k 50, top-p 1, 256."""

    temperature: float = 1.0
    top_k: int = 50  # 0 disables
    top_p: float = 1.0  # 1.0 disables
    num_samples: int = 1
    max_new_tokens: int = 256
    greedy: bool = False

    def __post_init__(self) -> None:
        if not self.greedy and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.num_samples < 1 or self.max_new_tokens < 1:
            raise ValueError(f"bad sampling config {self}")


GREEDY = SamplingConfig(greedy=True, top_k=0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeOutput:
    """Generated ids [batch, num_samples, max_new_tokens] (EOS included, then PAD), the
    model's log-probability (temperature 1, unfiltered) of each generated token, and
    lengths (``lengths_to_eos``: up to the first EOS, counted)."""

    tokens: Array
    logprobs: Array
    lengths: Array


# --------------------------------------------------------------------------- filters (pure)


def top_p_mask(sorted_logits: Array, top_p: float | Array) -> Array:
    """Mask over logits sorted in descending order keeping the smallest prefix whose
    probability reaches ``top_p`` (the first token is always kept)."""
    probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    return before < top_p


def sample_token(logits: Array, key: Array, cfg: SamplingConfig) -> Array:
    """One token id from fp32 ``logits`` [vocab] under temperature, top-k and top-p."""
    logits = logits.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0:
        vals, idx = jax.lax.top_k(logits, min(cfg.top_k, logits.shape[-1]))
        if cfg.top_p < 1.0:
            vals = jnp.where(top_p_mask(vals, cfg.top_p), vals, -jnp.inf)
        return idx[jax.random.categorical(key, vals)]
    if cfg.top_p < 1.0:
        order = jnp.argsort(-logits)
        vals = logits[order]
        vals = jnp.where(top_p_mask(vals, cfg.top_p), vals, -jnp.inf)
        return order[jax.random.categorical(key, vals)]
    return jax.random.categorical(key, logits)


# --------------------------------------------------------------------------- generation


def _generate(
    model: T5,
    cfg: SamplingConfig,
    partitioner: Any,
    params: Any,
    encoder_tokens: Array,
    rng: Array,
    row_ids: Array,
) -> DecodeOutput:
    if partitioner is not None:
        with partitioner.context():
            return _generate(model, cfg, None, params, encoder_tokens, rng, row_ids)
    batch = encoder_tokens.shape[0]
    k, steps = cfg.num_samples, cfg.max_new_tokens
    n = batch * k
    encoded = model.apply({"params": params}, encoder_tokens, method=T5.encode)
    enc_tokens = encoder_tokens  # the cache keeps one copy per prompt for its k samples
    _, variables = model.apply(
        {"params": params},
        encoded,
        enc_tokens,
        steps,
        k,
        method=T5.init_cache,
        mutable=["cache"],
    )
    # Row r = prompt r // k, sample r % k; its key depends only on (rng, row id, sample).
    sample_ids = jnp.repeat(row_ids, k) * k + jnp.tile(jnp.arange(k), batch)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(sample_ids)

    def cond(state: tuple) -> Array:
        step, _, _, _, _, done = state
        return (step < steps) & ~jnp.all(done)

    def body(state: tuple) -> tuple:
        step, token, cache, tokens, logprobs, done = state
        logits, new_vars = model.apply(
            {"params": params, "cache": cache},
            encoded,
            enc_tokens,
            token[:, None],
            decode=True,
            max_decode_length=steps,
            method=T5.decode,
            mutable=["cache"],
        )
        logits = logits[:, 0, :]
        if cfg.greedy:
            nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        else:
            keys = jax.vmap(lambda key: jax.random.fold_in(key, step))(row_keys)
            nxt = jax.vmap(lambda lg, key: sample_token(lg, key, cfg))(logits, keys)
            nxt = nxt.astype(jnp.int32)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), nxt[:, None], axis=-1)[:, 0]
        nxt = jnp.where(done, PAD_ID, nxt)
        lp = jnp.where(done, 0.0, lp)
        tokens = jax.lax.dynamic_update_slice(tokens, nxt[:, None], (0, step))
        logprobs = jax.lax.dynamic_update_slice(logprobs, lp[:, None], (0, step))
        done = done | (nxt == EOS_ID)
        return step + 1, nxt, new_vars["cache"], tokens, logprobs, done

    init = (
        jnp.array(0, jnp.int32),
        jnp.full((n,), DECODER_START_ID, jnp.int32),
        variables["cache"],
        jnp.full((n, steps), PAD_ID, jnp.int32),
        jnp.zeros((n, steps), jnp.float32),
        jnp.zeros((n,), bool),
    )
    _, _, _, tokens, logprobs, _ = jax.lax.while_loop(cond, body, init)
    return DecodeOutput(
        tokens=tokens.reshape(batch, k, steps),
        logprobs=logprobs.reshape(batch, k, steps),
        lengths=lengths_to_eos(tokens).reshape(batch, k),
    )


def lengths_to_eos(tokens: Array) -> Array:
    """Tokens up to and including the first EOS of each row (the whole row without one).

    Not the count of non-PAD tokens: a PAD id sampled before EOS is part of the output
    (the released code drops it when it decodes the text), not its end.
    """
    is_eos = tokens == EOS_ID
    first = jnp.argmax(is_eos, axis=-1)
    return jnp.where(jnp.any(is_eos, axis=-1), first + 1, tokens.shape[-1]).astype(jnp.int32)


@functools.lru_cache(maxsize=32)
def generate_fn(model: T5, cfg: SamplingConfig, partitioner: Any = None) -> Any:
    """The ``jax.jit``-ed ``(params, encoder_tokens, rng, row_ids) -> DecodeOutput``
    behind ``generate`` (cached per model, config and partitioner): ``.lower`` it on
    abstract shapes to compile ahead of time, ``._cache_size()`` counts compilations."""
    return jax.jit(functools.partial(_generate, model, cfg, partitioner))


def generate(
    model: T5,
    params: Any,
    encoder_tokens: Array | np.ndarray,
    rng: Array,
    cfg: SamplingConfig = GREEDY,
    row_ids: Array | np.ndarray | None = None,
    partitioner: Any = None,
) -> DecodeOutput:
    """Generates ``cfg.num_samples`` outputs for each prompt row of ``encoder_tokens``.

    ``row_ids`` (default ``arange(batch)``) name the prompts for the PRNG: give each
    prompt a stable id (its example index) to make its samples independent of how the
    prompts are batched. Compiled once per (model, cfg, input shape). With a
    ``hir_jax.partitioning.Partitioner`` the batch is placed over its ``data`` axis and
    the model's logical constraints resolve against its mesh; parameters keep the
    sharding they have (``partitioner.shard_params``).
    """
    if row_ids is None:
        row_ids = np.arange(encoder_tokens.shape[0], dtype=np.int32)
    if partitioner is not None:  # host arrays go straight to their shards (multi-host too)
        placed = partitioner.shard_batch({"tokens": encoder_tokens, "rows": row_ids})
        encoder_tokens, row_ids = placed["tokens"], placed["rows"]
    encoder_tokens = jnp.asarray(encoder_tokens, jnp.int32)
    row_ids = jnp.asarray(row_ids, jnp.int32)
    return generate_fn(model, cfg, partitioner)(params, encoder_tokens, rng, row_ids)


def output_ids(out: DecodeOutput, row: int, sample: int = 0, keep_eos: bool = False) -> list[int]:
    """The generated ids of one output as a list (without EOS unless asked)."""
    n = int(out.lengths[row, sample])
    ids = [int(t) for t in np.asarray(out.tokens[row, sample, :n])]
    if not keep_eos and ids and ids[-1] == EOS_ID:
        ids = ids[:-1]
    return ids
