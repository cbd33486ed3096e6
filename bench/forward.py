"""Teacher-forced forward pass: our jitted Flax T5 vs HF transformers (PyTorch).

    python bench/forward.py [--size small] [--batch 16] [--inputs 256] [--targets 32]

Random weights, fp32, same shapes and the same machine for both. Tokens/s counts encoder
plus decoder positions. Ends with ``forward_vs_hf=<ratio>``.
"""

from __future__ import annotations

import argparse

import common  # noqa: F401  (sets up paths and env)
import jax
import jax.numpy as jnp
import numpy as np
import torch
from common import hf_model, machine, print_summary, time_fn

from hir_jax.model import t5
from hir_jax.model.configs import get_config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()

    cfg = get_config(args.size)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, cfg.vocab_size, (args.batch, args.inputs)).astype(np.int32)
    dec = rng.integers(2, cfg.vocab_size, (args.batch, args.targets)).astype(np.int32)
    dec[:, 0] = 0
    tokens = args.batch * (args.inputs + args.targets)

    model = t5.T5(cfg)
    params = t5.init_params(cfg, jax.random.key(0))
    fwd = jax.jit(lambda p, e, d: model.apply({"params": p}, e, d))
    enc_j, dec_j = jnp.asarray(enc), jnp.asarray(dec)
    ours = time_fn(lambda: fwd(params, enc_j, dec_j).block_until_ready(), repeats=args.repeats)

    hf = hf_model(cfg).eval()
    enc_t, dec_t = torch.tensor(enc, dtype=torch.long), torch.tensor(dec, dtype=torch.long)
    mask_t = torch.ones_like(enc_t)

    def hf_forward() -> None:
        with torch.inference_mode():
            hf(input_ids=enc_t, attention_mask=mask_t, decoder_input_ids=dec_t)

    theirs = time_fn(hf_forward, repeats=args.repeats)
    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")
    print(f"shapes: {args.size} batch {args.batch} inputs {args.inputs} targets {args.targets}")
    print(f"ours (jax.jit):   {tokens / ours:10.0f} tokens/s  ({ours * 1e3:.1f} ms/batch)")
    print(f"HF transformers:  {tokens / theirs:10.0f} tokens/s  ({theirs * 1e3:.1f} ms/batch)")
    print_summary(forward_vs_hf=theirs / ours)


if __name__ == "__main__":
    main()
