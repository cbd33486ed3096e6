"""Our parameter tree (T5X names): expected shapes, validation, config inference.

Parameters are a plain nested dict of arrays; flat keys join the nesting with "/",
e.g. ``encoder/layers_0/attention/query/kernel``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from hir_jax.checkpoints.errors import (
    CheckpointError,
    MissingTensorError,
    ShapeMismatchError,
    UnexpectedTensorError,
)
from hir_jax.checkpoints.lazy import LazyTensor
from hir_jax.model.configs import T5Config

Params = dict[str, Any]

_ATTN_PROJ = ("query", "key", "value", "out")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a/b/c": leaf}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{"a/b/c": leaf} -> nested dict."""
    tree: dict[str, Any] = {}
    for name, value in flat.items():
        node = tree
        *parents, last = name.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return tree


def _stack_layout(config: T5Config, stack: str) -> list[tuple[str, str]]:
    """(layer norm, attention module) pairs of one layer of a stack."""
    if stack == "encoder":
        return [("pre_attention_layer_norm", "attention")]
    return [
        ("pre_self_attention_layer_norm", "self_attention"),
        ("pre_cross_attention_layer_norm", "encoder_decoder_attention"),
    ]


def mlp_inputs(config: T5Config) -> tuple[str, ...]:
    """Names of the MLP input projections: ("wi_0", "wi_1") when gated, else ("wi",)."""
    return ("wi_0", "wi_1") if config.is_gated else ("wi",)


def expected_shapes(config: T5Config) -> dict[str, tuple[int, ...]]:
    """Flat name -> shape of every parameter the model built from ``config`` has."""
    d, inner, ff = config.d_model, config.inner_dim, config.d_ff
    shapes: dict[str, tuple[int, ...]] = {"token_embedder/embedding": (config.vocab_size, d)}
    layers = {"encoder": config.num_encoder_layers, "decoder": config.num_decoder_layers}
    for stack, num_layers in layers.items():
        shapes[f"{stack}/relpos_bias/rel_embedding"] = (
            config.num_heads,
            config.relative_attention_num_buckets,
        )
        for i in range(num_layers):
            layer = f"{stack}/layers_{i}"
            for norm, attention in _stack_layout(config, stack):
                shapes[f"{layer}/{norm}/scale"] = (d,)
                for proj in _ATTN_PROJ:
                    shape = (inner, d) if proj == "out" else (d, inner)
                    shapes[f"{layer}/{attention}/{proj}/kernel"] = shape
            shapes[f"{layer}/pre_mlp_layer_norm/scale"] = (d,)
            for wi in mlp_inputs(config):
                shapes[f"{layer}/mlp/{wi}/kernel"] = (d, ff)
            shapes[f"{layer}/mlp/wo/kernel"] = (ff, d)
        shapes[f"{stack}/{stack}_norm/scale"] = (d,)
    if not config.tie_word_embeddings:
        shapes["decoder/logits_dense/kernel"] = (d, config.vocab_size)
    return shapes


def check_params(params: Mapping[str, Any], config: T5Config, source: str) -> None:
    """Raise if ``params`` does not have exactly the tensors and shapes ``config`` needs.

    ``source`` (a file or directory) is named in the error together with the tensor.
    """
    flat = flatten(params)
    expected = expected_shapes(config)
    for name, shape in expected.items():
        if name not in flat:
            raise MissingTensorError(
                f"{source}: missing tensor {name!r} (expected shape {shape} for {_brief(config)})"
            )
        found = tuple(np.shape(flat[name]))
        if found != shape:
            raise ShapeMismatchError(
                f"{source}: tensor {name!r} has shape {found}, but the config "
                f"({_brief(config)}) needs {shape}"
            )
    extra = sorted(set(flat) - set(expected))
    if extra:
        hint = ""
        if "decoder/logits_dense/kernel" in extra:
            hint = " (an untied output head, but the config ties it to the embedding)"
        raise UnexpectedTensorError(
            f"{source}: tensor {extra[0]!r} has no place in the model{hint}; "
            f"unexpected tensors: {extra[:5]}{' ...' if len(extra) > 5 else ''} ({_brief(config)})"
        )


def _brief(config: T5Config) -> str:
    return ", ".join(f"{k}={v}" for k, v in config.shape_dict().items())


_LAYER_RE = re.compile(r"^layers_(\d+)$")


def _num_layers(tree: Mapping[str, Any], source: str, stack: str) -> int:
    indices = sorted(int(m.group(1)) for k in tree if (m := _LAYER_RE.match(k)))
    if indices != list(range(len(indices))):
        raise MissingTensorError(
            f"{source}: {stack} layers are not numbered 0..n-1 (found layers {indices})"
        )
    return len(indices)


def _shape(flat: Mapping[str, Any], name: str, source: str) -> tuple[int, ...]:
    if name not in flat:
        raise MissingTensorError(f"{source}: missing tensor {name!r}")
    return tuple(np.shape(flat[name]))


def config_from_params(
    params: Mapping[str, Any], base: T5Config | None = None, source: str = "params"
) -> T5Config:
    """Infer the shape-defining ``T5Config`` fields from a parameter tree.

    Fields that shapes cannot tell (dropout, epsilon, max distance, dtypes, the exact
    activation) come from ``base`` (default ``T5Config()``); a gated MLP is taken to be
    ``base.feed_forward_proj`` if that is gated, else "gated-gelu" (FLAN-T5), and a
    non-gated one "relu" unless ``base`` says "gelu". The result is checked with
    :func:`check_params`.
    """
    base = base or T5Config()
    flat = flatten(params)
    for stack in ("encoder", "decoder"):
        if not isinstance(params.get(stack), Mapping):
            raise MissingTensorError(f"{source}: no {stack!r} subtree in the parameters")
    vocab, d_model = _shape(flat, "token_embedder/embedding", source)
    num_heads, num_buckets = _shape(flat, "encoder/relpos_bias/rel_embedding", source)
    n_enc = _num_layers(params["encoder"], source, "encoder")
    n_dec = _num_layers(params["decoder"], source, "decoder")
    if n_enc == 0:
        raise MissingTensorError(f"{source}: missing tensor 'encoder/layers_0/...' (no layers)")
    inner = _shape(flat, "encoder/layers_0/attention/query/kernel", source)[-1]
    gated = "encoder/layers_0/mlp/wi_0/kernel" in flat
    wi = "wi_0" if gated else "wi"
    d_ff = _shape(flat, f"encoder/layers_0/mlp/{wi}/kernel", source)[-1]
    if inner % num_heads:
        raise ShapeMismatchError(
            f"{source}: tensor 'encoder/layers_0/attention/query/kernel' has {inner} "
            f"outputs, not a multiple of num_heads={num_heads}"
        )
    if gated:
        ffp = base.feed_forward_proj if base.is_gated else "gated-gelu"
    else:
        ffp = base.feed_forward_proj if not base.is_gated else "relu"
    try:
        config = base.replace(
            vocab_size=vocab,
            d_model=d_model,
            d_kv=inner // num_heads,
            d_ff=d_ff,
            num_heads=num_heads,
            num_encoder_layers=n_enc,
            num_decoder_layers=n_dec,
            relative_attention_num_buckets=num_buckets,
            feed_forward_proj=ffp,
            tie_word_embeddings="decoder/logits_dense/kernel" not in flat,
        )
    except ValueError as e:  # T5Config validation
        raise CheckpointError(f"{source}: cannot build a T5Config from the shapes: {e}") from e
    check_params(params, config, source)
    return config


def to_float32(params: Mapping[str, Any]) -> Params:
    """Every leaf as float32 (bf16/fp16/fp64 converted); ``LazyTensor``s stay lazy."""
    return unflatten(
        {
            k: (v if isinstance(v, LazyTensor) else np.asarray(v)).astype(np.float32)
            for k, v in flatten(params).items()
        }
    )
