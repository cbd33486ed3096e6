"""Sampling throughput: ours (one jitted while_loop, KV cache, K samples from one encoder
pass) vs HF transformers ``generate`` batched, and HF one prompt at a time (how the
released HIR code samples).

    python bench/sampling.py [--size small] [--prompts 64] [--inputs 256] [--samples 4]
                             [--new_tokens 64] [--single_prompts 4]

Random weights, fp32, temperature 1, top-k 50, same machine. New tokens/s counts the
tokens actually generated (EOS included). The one-prompt-at-a-time rate is measured on
the first ``--single_prompts`` prompts. Ends with
``sampling_vs_hf_batched=<ratio> sampling_vs_hf_single=<ratio>``.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets up paths and env)
import jax
import numpy as np
import torch
from common import hf_model, machine, print_summary

from hir_jax import decoding
from hir_jax.model import t5
from hir_jax.model.configs import get_config


def _hf_new_tokens(out: torch.Tensor) -> int:
    gen = out[:, 1:]  # drop the decoder start token
    return int((gen != 0).sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--single_prompts", type=int, default=4)
    args = ap.parse_args()

    cfg = get_config(args.size)
    rng = np.random.default_rng(0)
    enc = rng.integers(2, cfg.vocab_size, (args.prompts, args.inputs)).astype(np.int32)
    enc[:, -1] = 1

    model = t5.T5(cfg)
    params = t5.init_params(cfg, jax.random.key(0))
    scfg = decoding.SamplingConfig(
        temperature=1.0, top_k=50, num_samples=args.samples, max_new_tokens=args.new_tokens
    )
    out = decoding.generate(model, params, enc, jax.random.key(0), scfg)  # compile
    jax.block_until_ready(out)
    start = time.perf_counter()
    out = decoding.generate(model, params, enc, jax.random.key(1), scfg)
    jax.block_until_ready(out)
    ours_s = time.perf_counter() - start
    ours_rate = float(np.sum(out.lengths)) / ours_s

    hf = hf_model(cfg).eval()
    kw = dict(
        do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
        num_return_sequences=args.samples, max_new_tokens=args.new_tokens,
    )  # fmt: skip
    ids = torch.tensor(enc, dtype=torch.long)
    with torch.inference_mode():
        hf.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), **kw)  # warm up
        start = time.perf_counter()
        hf_out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        hf_batched_s = time.perf_counter() - start
        hf_batched_rate = _hf_new_tokens(hf_out) / hf_batched_s
        n_single, single_tokens = min(args.single_prompts, args.prompts), 0
        start = time.perf_counter()
        for i in range(n_single):
            one = ids[i : i + 1]
            single_tokens += _hf_new_tokens(
                hf.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)
            )
        hf_single_rate = single_tokens / (time.perf_counter() - start)

    print(f"machine: {machine()}, torch threads {torch.get_num_threads()}")
    print(
        f"shapes: {args.size} prompts {args.prompts} x {args.inputs} tokens, "
        f"K={args.samples}, {args.new_tokens} new tokens, T=1, top-k 50"
    )
    print(f"ours (jit while_loop):   {ours_rate:9.0f} new tokens/s ({ours_s:.2f} s)")
    print(f"HF generate, batched:    {hf_batched_rate:9.0f} new tokens/s ({hf_batched_s:.2f} s)")
    print(f"HF generate, one prompt: {hf_single_rate:9.0f} new tokens/s ({n_single} prompts)")
    print_summary(
        sampling_vs_hf_batched=ours_rate / hf_batched_rate,
        sampling_vs_hf_single=ours_rate / hf_single_rate,
    )


if __name__ == "__main__":
    main()
