"""T5 configurations: the one place model sizes are defined (special ids re-exported)."""

from __future__ import annotations

import dataclasses
from typing import Any

from hir_jax.special_ids import DECODER_START_ID, EOS_ID, PAD_ID, UNK_ID

__all__ = ["CONFIGS", "DECODER_START_ID", "EOS_ID", "PAD_ID", "UNK_ID", "T5Config", "get_config"]


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Architecture of a T5 encoder-decoder.

    ``variant`` "v1_1" is T5 v1.1 / FLAN-T5 (gated-GELU MLP, untied output head, no
    logit rescaling); "v1_0" is the original T5 (ReLU MLP, output head tied to the
    embedding, logits scaled by d_model**-0.5). ``tie_word_embeddings`` and
    ``feed_forward_proj`` default from the variant but can be set independently, as in
    HF configs.
    """

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_heads: int = 12
    num_encoder_layers: int = 12
    num_decoder_layers: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.0
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"  # "gated-gelu" | "relu" | "gated-relu" | "gelu"
    tie_word_embeddings: bool = False
    dtype: str = "float32"  # activation (compute) dtype
    param_dtype: str = "float32"  # weights, and so the AdamW moments (bf16: released code)
    remat: bool = False  # rematerialise each layer in the backward pass (saves memory)

    def __post_init__(self) -> None:
        if self.feed_forward_proj not in ("gated-gelu", "relu", "gated-relu", "gelu"):
            raise ValueError(f"unknown feed_forward_proj {self.feed_forward_proj!r}")
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        return self.feed_forward_proj.split("-")[-1]

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    def replace(self, **changes: Any) -> T5Config:
        return dataclasses.replace(self, **changes)

    def shape_dict(self) -> dict[str, Any]:
        """The fields that fix parameter shapes (used to refuse mismatched resumes)."""
        keys = (
            "vocab_size d_model d_kv d_ff num_heads num_encoder_layers num_decoder_layers "
            "relative_attention_num_buckets feed_forward_proj tie_word_embeddings"
        ).split()
        return {k: getattr(self, k) for k in keys}


def _v1_1(**kw: Any) -> T5Config:
    return T5Config(feed_forward_proj="gated-gelu", tie_word_embeddings=False, **kw)


# FLAN-T5 == T5 v1.1 architecture (HIR_REFERENCE.md, "FLAN-T5 facts").
CONFIGS: dict[str, T5Config] = {
    "tiny": _v1_1(
        vocab_size=512,
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_heads=4,
        num_encoder_layers=2,
        num_decoder_layers=2,
    ),
    "small": _v1_1(
        d_model=512, d_kv=64, d_ff=1024, num_heads=6, num_encoder_layers=8, num_decoder_layers=8
    ),
    "base": _v1_1(
        d_model=768,
        d_kv=64,
        d_ff=2048,
        num_heads=12,
        num_encoder_layers=12,
        num_decoder_layers=12,
    ),
    "large": _v1_1(
        d_model=1024,
        d_kv=64,
        d_ff=2816,
        num_heads=16,
        num_encoder_layers=24,
        num_decoder_layers=24,
    ),
    "xl": _v1_1(
        d_model=2048,
        d_kv=64,
        d_ff=5120,
        num_heads=32,
        num_encoder_layers=24,
        num_decoder_layers=24,
    ),
    "xxl": _v1_1(
        d_model=4096,
        d_kv=64,
        d_ff=10240,
        num_heads=64,
        num_encoder_layers=24,
        num_decoder_layers=24,
    ),
}


def get_config(name: str, **overrides: Any) -> T5Config:
    """A named size ("tiny", "small", ..., "xxl"), optionally with fields overridden."""
    if name not in CONFIGS:
        raise ValueError(f"unknown model size {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name].replace(**overrides)
