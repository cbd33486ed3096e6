"""HF transformers (PyTorch) reference for the checkpoint and parity tests.

Tiny random ``T5ForConditionalGeneration`` checkpoints written with ``save_pretrained``,
their logits, and token batches. torch/transformers are imported on first use so that a
test module can ``pytest.importorskip`` them first.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("USE_TF", "0")  # keep transformers from importing TensorFlow
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# Small configurations (HF T5Config keyword arguments) named after the cases.
V1_1 = dict(
    vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip
V1_0 = dict(
    vocab_size=160, d_model=64, d_kv=16, d_ff=96, num_heads=4, num_layers=2,
    feed_forward_proj="relu", tie_word_embeddings=True,
)  # fmt: skip
# d_kv * num_heads (72) != d_model (48), and more decoder than encoder layers.
ODD_HEADS = dict(
    vocab_size=130, d_model=48, d_kv=24, d_ff=80, num_heads=3, num_layers=2,
    num_decoder_layers=3, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip
# The other activations HF configs can name: exact-erf GELU (plain) and gated ReLU.
PLAIN_GELU = dict(V1_0, vocab_size=90, feed_forward_proj="gelu", tie_word_embeddings=False)
GATED_RELU = dict(V1_1, vocab_size=90, feed_forward_proj="gated-relu")
# Long inputs: 32 buckets, max distance 128, used with ~200 encoder tokens.
LONG = dict(
    vocab_size=120, d_model=32, d_kv=8, d_ff=64, num_heads=4, num_layers=2,
    relative_attention_num_buckets=32, relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu", tie_word_embeddings=False,
)  # fmt: skip


def make_hf_model(seed: int = 0, **config_kwargs: Any) -> Any:
    """A random HF T5 in eval mode, with norms and position tables made distinctive.

    HF initialises every layer norm to 1 and the relative position tables small; here
    the norms get random scales and the tables a larger spread, so that a swapped norm
    or a wrong position bucket shows in the logits.
    """
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.T5Config(decoder_start_token_id=0, dropout_rate=0.0, **config_kwargs)
    model = transformers.T5ForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name:
                param.copy_(1.0 + 0.3 * torch.randn_like(param))
            elif "relative_attention_bias" in name:
                param.normal_(0.0, 1.0)
    return model


def save_hf_model(model: Any, directory: Path, dtype: str | None = None, **kwargs: Any) -> Path:
    """``save_pretrained`` (optionally cast to "bfloat16"/"float16" first); returns the dir."""
    import torch

    if dtype is not None:
        model = model.to(getattr(torch, dtype))
    model.save_pretrained(str(directory), **kwargs)
    return directory


def hf_logits(model: Any, enc: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Decoder logits of the HF model (fp32), attention mask = encoder tokens != 0."""
    import torch

    enc_t = torch.from_numpy(np.asarray(enc, np.int64))
    dec_t = torch.from_numpy(np.asarray(dec, np.int64))
    with torch.no_grad():
        out = model(input_ids=enc_t, attention_mask=(enc_t != 0).long(), decoder_input_ids=dec_t)
    return out.logits.float().numpy()


def token_batch(
    seed: int,
    vocab_size: int,
    batch: int,
    enc_len: int,
    dec_len: int,
    padded: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(encoder tokens, decoder inputs, decoder lengths)``; decoder inputs start with 0.

    ``padded``: rows end in pad (0) runs of different lengths, in both encoder and
    decoder; the first row stays full. Logits are comparable at decoder positions
    ``< decoder length`` of their row.
    """
    rng = np.random.default_rng(seed)
    enc = rng.integers(2, vocab_size, (batch, enc_len)).astype(np.int32)
    dec = rng.integers(2, vocab_size, (batch, dec_len)).astype(np.int32)
    dec[:, 0] = 0
    dec_lengths = np.full(batch, dec_len)
    if padded:
        for row in range(1, batch):
            enc[row, max(1, enc_len - row * enc_len // (batch + 1)) :] = 0
            dec_lengths[row] = max(2, dec_len - row * dec_len // (batch + 1))
            dec[row, dec_lengths[row] :] = 0
    return enc, dec, dec_lengths
