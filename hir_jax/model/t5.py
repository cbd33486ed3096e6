"""A Flax T5 encoder-decoder (T5 v1.1 / FLAN-T5 and T5 v1.0) with logical axis names.

Parameter names follow T5X exactly (``token_embedder/embedding``,
``encoder/layers_0/attention/query/kernel``, ``decoder/logits_dense/kernel``...), so a
T5X checkpoint maps onto this tree unchanged. Every parameter carries logical axis names
(``embed``, ``mlp``, ``joined_kv``, ``heads``, ``vocab``, ``relpos_buckets``) that
``hir_jax.partitioning`` maps onto a device mesh.

The decoder has an incremental mode (``decode=True``) with a KV cache in the ``cache``
collection: the self-attention keys/values grow one position per call, and the
cross-attention keys/values are computed once, when the cache is created
(``T5.init_cache``), then only read.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hir_jax.model.configs import PAD_ID, T5Config

Array = jax.Array
_NEG_INF = -1e10

with_axes = nn.with_logical_partitioning
constrain = nn.with_logical_constraint


# --------------------------------------------------------------------------- relative position


def relative_position_bucket(
    relative_position: np.ndarray, *, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bucket of ``memory_position - query_position`` (host-side, static shapes).

    Computed in float32 the way the HF and Mesh-TF implementations do, so that buckets at
    the logarithmic boundaries agree exactly with the reference.
    """
    rp = np.asarray(relative_position, dtype=np.int64)
    buckets = np.zeros_like(rp)
    if bidirectional:
        num_buckets //= 2
        buckets += (rp > 0).astype(np.int64) * num_buckets
        rp = np.abs(rp)
    else:
        rp = -np.minimum(rp, 0)
    max_exact = num_buckets // 2
    is_small = rp < max_exact
    with np.errstate(divide="ignore"):
        scaled = np.log(rp.astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact))
    scaled = scaled * np.float32(num_buckets - max_exact)
    large = max_exact + np.where(is_small, 0, scaled).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return buckets + np.where(is_small, rp, large)


@functools.lru_cache(maxsize=64)
def _bucket_table(
    q_len: int, k_len: int, bidirectional: bool, num_buckets: int, max_distance: int
) -> np.ndarray:
    rel = np.arange(k_len)[None, :] - np.arange(q_len)[:, None]
    table = relative_position_bucket(
        rel, bidirectional=bidirectional, num_buckets=num_buckets, max_distance=max_distance
    )
    return table.astype(np.int32)


class RelativePositionBias(nn.Module):
    """One bias table per stack, shared by all its layers: [heads, buckets]."""

    config: T5Config
    bidirectional: bool

    @nn.compact
    def __call__(self, q_len: int, k_len: int, q_offset: Array | None = None) -> Array:
        """Bias [1, heads, q_len, k_len]; ``q_offset`` (traced) shifts query positions."""
        cfg = self.config
        table = self.param(
            "rel_embedding",
            with_axes(nn.initializers.normal(1.0), ("heads", "relpos_buckets")),
            (cfg.num_heads, cfg.relative_attention_num_buckets),
            jnp.dtype(cfg.param_dtype),
        )
        args = (self.bidirectional, cfg.relative_attention_num_buckets)
        args += (cfg.relative_attention_max_distance,)
        if q_offset is None:
            buckets = jnp.asarray(_bucket_table(q_len, k_len, *args))
        else:
            full = jnp.asarray(_bucket_table(k_len, k_len, *args))
            buckets = jax.lax.dynamic_slice_in_dim(full, q_offset, q_len, axis=0)
        # A one-hot matmul rather than a gather: its gradient is a matmul too, where a
        # gather's is a scatter-add (slow on CPU).
        one_hot = jax.nn.one_hot(buckets, cfg.relative_attention_num_buckets, dtype=table.dtype)
        bias = jnp.einsum(  # [heads, q, k]; exact: TPUs default to bf16 passes for fp32
            "qkn,hn->hqk", one_hot, table, precision=jax.lax.Precision.HIGHEST
        )
        return bias[None].astype(jnp.float32)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, statistics in float32."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        scale = self.param(
            "scale",
            with_axes(nn.initializers.ones, ("embed",)),
            (x.shape[-1],),
            jnp.dtype(cfg.param_dtype),
        )
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)
        return (y * scale.astype(jnp.float32)).astype(jnp.dtype(cfg.dtype))


def _dense(
    cfg: T5Config, features: int, axes: tuple[str, str], std: float, name: str, dtype: Any = None
) -> nn.Dense:
    return nn.Dense(
        features,
        use_bias=False,
        dtype=jnp.dtype(dtype or cfg.dtype),
        param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=with_axes(nn.initializers.normal(std), axes),
        name=name,
    )


class MultiHeadAttention(nn.Module):
    """T5 attention: no 1/sqrt(d_kv) scaling, additive position bias, fp32 softmax."""

    config: T5Config
    self_attention: bool

    def _heads(self, x: Array) -> Array:
        cfg = self.config
        x = x.reshape(x.shape[:-1] + (cfg.num_heads, cfg.d_kv))
        return constrain(x, ("batch", "length", "heads", "kv"))

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None,
        bias: Array | None,
        mask: Array | None,
        *,
        deterministic: bool,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> tuple[Array, Array | None]:
        """Attention output, and for decoding the boolean mask actually applied.

        ``bias`` and ``mask`` broadcast to [batch, heads, q, k]. In ``decode`` mode the
        self-attention cache holds ``max_decode_length`` positions; the mask over them is
        built here from the cache index.
        """
        cfg = self.config
        d, inner = cfg.d_model, cfg.inner_dim
        query = _dense(cfg, inner, ("embed", "joined_kv"), (d * cfg.d_kv) ** -0.5, "query")
        key = _dense(cfg, inner, ("embed", "joined_kv"), d**-0.5, "key")
        value = _dense(cfg, inner, ("embed", "joined_kv"), d**-0.5, "value")

        def kv(x: Array) -> tuple[Array, Array]:
            return self._heads(key(x)), self._heads(value(x))

        q = self._heads(query(inputs_q))
        if decode:
            k, v, mask = self._cached_kv(kv, inputs_q, inputs_kv, mask, max_decode_length)
        else:
            k, v = kv(inputs_kv)
        q_batch, q_len = q.shape[:2]
        if q_batch != k.shape[0]:
            # Several decoder rows per encoder row (num_samples): row b*g + j reads the
            # keys/values of encoder row b, which are stored once, not repeated g times.
            q = q.reshape((k.shape[0], -1) + q.shape[2:])
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        if bias is not None:
            scores = scores + bias
        if mask is not None:
            scores = jnp.where(mask, scores, _NEG_INF)
        weights = jax.nn.softmax(scores, axis=-1)
        weights = nn.Dropout(cfg.dropout_rate)(weights, deterministic=deterministic)
        weights = weights.astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v)
        out = out.reshape((q_batch, q_len, inner))
        return _dense(cfg, d, ("joined_kv", "embed"), inner**-0.5, "out")(out), mask

    def _cached_kv(
        self,
        kv: Any,
        inputs_q: Array,
        inputs_kv: Array | None,
        mask: Array | None,
        max_len: int | None,
    ) -> tuple[Array, Array, Array | None]:
        cfg = self.config
        initialized = self.has_variable("cache", "cached_key")
        if not self.self_attention:
            # Cross-attention: keys/values of the encoder output, computed once.
            if not initialized:
                k, v = kv(inputs_kv)
                self.variable("cache", "cached_key", lambda: k)
                self.variable("cache", "cached_value", lambda: v)
                return k, v, mask
            k = self.get_variable("cache", "cached_key")
            v = self.get_variable("cache", "cached_value")
            return k, v, mask
        batch = inputs_q.shape[0]
        k_new, v_new = kv(inputs_q)
        if not initialized:
            if max_len is None:
                raise ValueError("max_decode_length is required to create the decoder cache")
            shape = (batch, max_len, cfg.num_heads, cfg.d_kv)
            self.variable("cache", "cached_key", jnp.zeros, shape, k_new.dtype)
            self.variable("cache", "cached_value", jnp.zeros, shape, v_new.dtype)
            self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
            return k_new, v_new, None
        ck = self.variable("cache", "cached_key")
        cv = self.variable("cache", "cached_value")
        ci = self.variable("cache", "cache_index")
        if inputs_q.shape[1] != 1:
            raise ValueError(f"decode mode takes one token per call, got {inputs_q.shape[1]}")
        idx = ci.value
        ck.value = jax.lax.dynamic_update_slice(ck.value, k_new, (0, idx, 0, 0))
        cv.value = jax.lax.dynamic_update_slice(cv.value, v_new, (0, idx, 0, 0))
        ci.value = idx + 1
        length = ck.value.shape[1]
        step_mask = (jnp.arange(length) <= idx)[None, None, None, :]
        return ck.value, cv.value, step_mask


class MlpBlock(nn.Module):
    """Gated (v1.1: wo(act(x wi_0) * (x wi_1))) or plain (v1.0: wo(act(x wi))) MLP."""

    config: T5Config

    @nn.compact
    def __call__(self, x: Array, *, deterministic: bool) -> Array:
        cfg = self.config
        # As HF: the gated GELU (FLAN-T5) is the tanh approximation, plain "gelu" is exact.
        act = {
            "gelu": functools.partial(nn.gelu, approximate=cfg.is_gated),
            "relu": nn.relu,
        }[cfg.activation]
        d, ff = cfg.d_model, cfg.d_ff
        if cfg.is_gated:
            h = act(_dense(cfg, ff, ("embed", "mlp"), d**-0.5, "wi_0")(x))
            h = h * _dense(cfg, ff, ("embed", "mlp"), d**-0.5, "wi_1")(x)
        else:
            h = act(_dense(cfg, ff, ("embed", "mlp"), d**-0.5, "wi")(x))
        h = constrain(h, ("batch", "length", "mlp"))
        h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
        return _dense(cfg, d, ("mlp", "embed"), ff**-0.5, "wo")(h)


class EncoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, bias: Array, mask: Array, deterministic: bool) -> Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg, name="pre_attention_layer_norm")(x)
        h, _ = MultiHeadAttention(cfg, True, name="attention")(
            h, h, bias, mask, deterministic=deterministic
        )
        x = x + drop(h, deterministic=deterministic)
        h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, deterministic=deterministic)
        x = x + drop(h, deterministic=deterministic)
        return constrain(x, ("batch", "length", "embed"))


class DecoderLayer(nn.Module):
    config: T5Config

    @nn.compact
    def __call__(
        self,
        x: Array,
        encoded: Array,
        self_bias: Array,
        self_mask: Array | None,
        cross_mask: Array,
        deterministic: bool,
        decode: bool,
        max_decode_length: int | None,
    ) -> Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        h = RMSNorm(cfg, name="pre_self_attention_layer_norm")(x)
        h, _ = MultiHeadAttention(cfg, True, name="self_attention")(
            h,
            h,
            self_bias,
            self_mask,
            deterministic=deterministic,
            decode=decode,
            max_decode_length=max_decode_length,
        )
        x = x + drop(h, deterministic=deterministic)
        h = RMSNorm(cfg, name="pre_cross_attention_layer_norm")(x)
        h, _ = MultiHeadAttention(cfg, False, name="encoder_decoder_attention")(
            h, encoded, None, cross_mask, deterministic=deterministic, decode=decode
        )
        x = x + drop(h, deterministic=deterministic)
        h = RMSNorm(cfg, name="pre_mlp_layer_norm")(x)
        h = MlpBlock(cfg, name="mlp")(h, deterministic=deterministic)
        x = x + drop(h, deterministic=deterministic)
        return constrain(x, ("batch", "length", "embed"))


def _layer_cls(cls: type[nn.Module], cfg: T5Config, static_argnums: tuple[int, ...]) -> Any:
    if not cfg.remat:
        return cls
    return nn.remat(cls, static_argnums=static_argnums, prevent_cse=True)


class Encoder(nn.Module):
    config: T5Config
    embedder: nn.Embed

    @nn.compact
    def __call__(self, tokens: Array, *, deterministic: bool) -> Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        x = self.embedder(tokens.astype(jnp.int32)).astype(jnp.dtype(cfg.dtype))
        x = drop(constrain(x, ("batch", "length", "embed")), deterministic=deterministic)
        length = tokens.shape[1]
        bias = RelativePositionBias(cfg, bidirectional=True, name="relpos_bias")(length, length)
        mask = (tokens != PAD_ID)[:, None, None, :]
        layer = _layer_cls(EncoderLayer, cfg, static_argnums=(4,))
        for i in range(cfg.num_encoder_layers):
            x = layer(cfg, name=f"layers_{i}")(x, bias, mask, deterministic)
        x = RMSNorm(cfg, name="encoder_norm")(x)
        return drop(x, deterministic=deterministic)


class Decoder(nn.Module):
    config: T5Config
    embedder: nn.Embed

    @nn.compact
    def __call__(
        self,
        encoded: Array,
        encoder_tokens: Array,
        decoder_input_tokens: Array,
        *,
        deterministic: bool,
        decode: bool = False,
        max_decode_length: int | None = None,
        return_hidden: bool = False,
    ) -> Array:
        cfg = self.config
        drop = nn.Dropout(cfg.dropout_rate, broadcast_dims=(-2,))
        x = self.embedder(decoder_input_tokens.astype(jnp.int32)).astype(jnp.dtype(cfg.dtype))
        x = drop(constrain(x, ("batch", "length", "embed")), deterministic=deterministic)
        relpos = RelativePositionBias(cfg, bidirectional=False, name="relpos_bias")
        q_len = decoder_input_tokens.shape[1]
        if decode:
            # The cache holds max_decode_length positions; "position" is this step's.
            if max_decode_length is None:
                raise ValueError("decode=True needs max_decode_length (the cache size)")
            initialized = self.has_variable("cache", "position")
            pos = self.variable("cache", "position", lambda: jnp.array(0, jnp.int32))
            if initialized:
                self_bias = relpos(q_len, max_decode_length, q_offset=pos.value)
                pos.value = pos.value + 1
            else:
                self_bias = relpos(q_len, q_len)
            self_mask = None  # built from the cache index in each attention layer
        else:
            self_bias = relpos(q_len, q_len)
            self_mask = jnp.tril(jnp.ones((q_len, q_len), bool))[None, None]
        cross_mask = (encoder_tokens != PAD_ID)[:, None, None, :]
        layer = _layer_cls(DecoderLayer, cfg, static_argnums=(6, 7, 8))
        for i in range(cfg.num_decoder_layers):
            x = layer(cfg, name=f"layers_{i}")(
                x,
                encoded,
                self_bias,
                self_mask,
                cross_mask,
                deterministic,
                decode,
                max_decode_length,
            )
        x = RMSNorm(cfg, name="decoder_norm")(x)
        x = drop(x, deterministic=deterministic)
        if return_hidden:  # the head is applied later (``lm_head``), e.g. in chunks
            return x
        if cfg.tie_word_embeddings:
            # T5 v1.0: head tied to the embedding, rescaled by d_model**-0.5.
            x = x.astype(jnp.float32) * (cfg.d_model**-0.5)
            logits = self.embedder.attend(x)
        else:
            logits = _dense(
                cfg,
                cfg.vocab_size,
                ("embed", "vocab"),
                cfg.d_model**-0.5,
                "logits_dense",
                dtype=jnp.float32,
            )(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


class T5(nn.Module):
    """T5 encoder-decoder. Inputs are int token ids padded with ``PAD_ID`` (0)."""

    config: T5Config

    def setup(self) -> None:
        cfg = self.config
        self.token_embedder = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=with_axes(nn.initializers.normal(1.0), ("vocab", "embed")),
        )
        self.encoder = Encoder(cfg, self.token_embedder)
        self.decoder = Decoder(cfg, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, *, enable_dropout: bool = False) -> Array:
        """Encoder hidden states [batch, length, d_model]."""
        return self.encoder(encoder_input_tokens, deterministic=not enable_dropout)

    def decode(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        *,
        enable_dropout: bool = False,
        decode: bool = False,
        max_decode_length: int | None = None,
    ) -> Array:
        """Decoder logits [batch, length, vocab] in float32."""
        return self.decoder(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            deterministic=not enable_dropout,
            decode=decode,
            max_decode_length=max_decode_length,
        )

    def __call__(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        *,
        enable_dropout: bool = False,
    ) -> Array:
        """Teacher-forced logits: ``decoder_input_tokens`` are the targets shifted right."""
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        return self.decode(
            encoded, encoder_input_tokens, decoder_input_tokens, enable_dropout=enable_dropout
        )

    def hidden(
        self,
        encoder_input_tokens: Array,
        decoder_input_tokens: Array,
        *,
        enable_dropout: bool = False,
    ) -> Array:
        """Teacher-forced decoder outputs before the head ``[batch, length, d_model]``:
        ``lm_head(config, params, hidden)`` gives ``__call__``'s logits."""
        encoded = self.encode(encoder_input_tokens, enable_dropout=enable_dropout)
        return self.decoder(
            encoded,
            encoder_input_tokens,
            decoder_input_tokens,
            deterministic=not enable_dropout,
            return_hidden=True,
        )

    def init_cache(
        self,
        encoded: Array,
        encoder_input_tokens: Array,
        max_decode_length: int,
        num_samples: int = 1,
    ) -> Array:
        """Creates the decoding cache (call with ``mutable=["cache"]``).

        Allocates self-attention caches of ``max_decode_length`` positions for
        ``batch * num_samples`` decoder rows (row ``b * num_samples + k`` is sample k of
        prompt b) and computes the cross-attention keys/values of ``encoded`` once per
        prompt. Decode steps then take the same (unrepeated) encoder arguments.
        """
        start = jnp.zeros((encoded.shape[0] * num_samples, 1), jnp.int32)
        return self.decoder(
            encoded,
            encoder_input_tokens,
            start,
            deterministic=True,
            decode=True,
            max_decode_length=max_decode_length,
        )


# --------------------------------------------------------------------------- helpers


def lm_head(config: T5Config, params: Any, hidden: Array) -> Array:
    """The decoder's output head on ``T5.hidden`` outputs: float32 logits ``[..., vocab]``.

    The same operations as the head inside ``Decoder`` (v1.1: the untied
    ``logits_dense`` in float32; v1.0: the embedding in ``config.dtype`` after the
    d_model**-0.5 rescale), so a slice of positions gives that slice of the logits.
    """
    if config.tie_word_embeddings:
        x = hidden.astype(jnp.float32) * (config.d_model**-0.5)
        dtype = jnp.dtype(config.dtype)
        emb = params["token_embedder"]["embedding"]
        logits = jnp.dot(x.astype(dtype), emb.astype(dtype).T)
    else:
        kernel = params["decoder"]["logits_dense"]["kernel"]
        logits = jax.lax.dot_general(
            hidden.astype(jnp.float32),
            kernel.astype(jnp.float32),
            (((hidden.ndim - 1,), (0,)), ((), ())),
        )
    return constrain(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def _dummy_inputs(batch: int = 1, length: int = 1) -> tuple[Array, Array]:
    tokens = jnp.ones((batch, length), jnp.int32)
    return tokens, tokens


def init_params(config: T5Config, rng: Array) -> dict[str, Any]:
    """Freshly initialised parameters as a plain nested dict of arrays."""
    variables = T5(config).init(rng, *_dummy_inputs())
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: T5Config) -> dict[str, Any]:
    """The logical axis names of every parameter, as a tree of ``PartitionSpec``."""
    abstract = jax.eval_shape(lambda r: T5(config).init(r, *_dummy_inputs()), jax.random.key(0))
    return nn.get_partition_spec(abstract)["params"]


def param_shapes(config: T5Config) -> dict[str, Any]:
    """Shape/dtype structs of every parameter (no memory allocated)."""
    return jax.eval_shape(lambda r: init_params(config, r), jax.random.key(0))


def count_params(params: Any) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
