"""Accelerator figures in one command: train-step model-FLOP utilisation and sampling
throughput at FLAN-T5-large shapes in bf16, ours and HF transformers on the same chip.

    python bench/accelerator.py [--json accelerator.json] [--size large] [--batch 64]
        [--inputs 512] [--targets 64] [--prompts 64] [--samples 4] [--new_tokens 64]
        [--param_dtype bfloat16] [--steps 5] [--peak_tflops X] [--hbm_gbps Y] [--no_hf]

Meant for a GPU (or TPU) host that has only jax, flax, optax, orbax, torch and
transformers installed: it imports none of TensorFlow, SeqIO or gin (``hir_jax.train``
and ``hir_jax.partitioning`` register gin configurables; when gin is missing a stand-in
whose ``configurable`` returns its argument unchanged is used, which changes nothing
here). Random weights; nothing is downloaded.

* **Train step** (``hir_jax.train.make_train_step``, plain NLL, AdamW): batch ``--batch``
  of ``--inputs`` + ``--targets`` tokens, compute in bf16, weights and AdamW moments in
  ``--param_dtype`` (bf16, as the released code; ``float32`` for fp32 master weights).
  Model FLOPs per step: 3 x the forward's matmul FLOPs (projections, attention scores and
  values, MLP, the head), counted from the shapes; MFU = model FLOP/s / the chip's dense
  bf16 peak. If the batch does not fit, it is halved until it does (reported).
  HF: ``T5ForConditionalGeneration`` in bf16 (``torch_dtype=bfloat16`` weights and
  ``torch.optim.AdamW``, as the released ``offline_trainer.py``), same batch.
* **Sampling** (``hir_jax.decoding.generate``: one compiled loop, KV cache, K samples
  sharing one encoder pass): ``--prompts`` x ``--inputs`` tokens, K = ``--samples``,
  ``--new_tokens`` new tokens, T=1, top-k 50. The bound: each decoding step must read the
  decoder's weights and the KV caches once from HBM, so new tokens/s <= rows x HBM
  bandwidth / bytes read per step. HF: batched ``generate`` with the same settings.

The chip's peak and bandwidth come from a table keyed by ``device_kind`` (``--peak_tflops``
and ``--hbm_gbps`` override it). Figures go to the JSON file named by ``--json``; the
last line is ``key=value`` pairs (``train_mfu``, ``train_vs_hf``, ``sampling_vs_bound``,
``sampling_vs_hf``). Budget: under 8 minutes on an H100/H200.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from typing import Any

import common  # noqa: E402, F401  (sets up paths and env)


def _gin_stand_in() -> None:
    """``import gin`` works without gin installed: only ``gin.configurable`` is used at
    import time by the modules this benchmark needs."""
    try:
        import gin  # noqa: F401
    except ImportError:
        stub = types.ModuleType("gin")

        def configurable(*args: Any, **kwargs: Any) -> Any:
            if len(args) == 1 and callable(args[0]) and not kwargs:
                return args[0]
            return lambda fn: fn

        stub.configurable = configurable
        sys.modules["gin"] = stub


_gin_stand_in()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from common import hf_model, time_fn  # noqa: E402
from train_step import make_batch  # noqa: E402

from hir_jax import decoding, features, partitioning, train  # noqa: E402
from hir_jax.model import t5  # noqa: E402
from hir_jax.model.configs import T5Config, get_config  # noqa: E402

# Dense bf16 peak (TFLOP/s) and HBM bandwidth (GB/s) by device_kind substring (vendor
# data sheets; SXM parts for NVIDIA).
CHIPS = {
    "H200": (989.0, 4800.0),
    "H100": (989.0, 3350.0),
    "A100": (312.0, 2039.0),
    "L4": (121.0, 300.0),
    "TPU v4": (275.0, 1228.0),
    "TPU v5 lite": (197.0, 819.0),
    "TPU v5e": (197.0, 819.0),
    "TPU v5p": (459.0, 2765.0),
    "TPU v6": (918.0, 1640.0),
}


def chip_figures(kind: str, peak: float | None, hbm: float | None) -> tuple[float, float]:
    for name, (p, b) in CHIPS.items():
        if name.lower() in kind.lower():
            return peak or p, hbm or b
    if peak is None or hbm is None:
        raise SystemExit(
            f"error: no peak/bandwidth known for device {kind!r}; pass --peak_tflops and --hbm_gbps"
        )
    return peak, hbm


# --------------------------------------------------------------------------- FLOPs and bytes


def forward_flops(cfg: T5Config, batch: int, enc: int, dec: int) -> float:
    """Matmul FLOPs of one teacher-forced forward pass (2 per multiply-add)."""
    d, inner, ff, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.is_gated else 2) * d * ff
    enc_layer = enc * (4 * d * inner + mlp) + 2 * enc * enc * inner
    dec_layer = (
        dec * (4 * d * inner + 2 * d * inner + mlp)  # self q,k,v,o; cross q,o; mlp
        + enc * 2 * d * inner  # cross k,v over the encoder outputs
        + 2 * dec * dec * inner  # self scores and values
        + 2 * dec * enc * inner  # cross scores and values
    )
    total = cfg.num_encoder_layers * enc_layer + cfg.num_decoder_layers * dec_layer
    return 2.0 * batch * (total + dec * d * v)


def decode_step_bytes(
    cfg: T5Config, prompts: int, rows: int, enc: int, pos: int, itemsize: int
) -> float:
    """Bytes a decoding step must read: the decoder's weights and the head, the cross
    keys/values of every prompt, and the self-attention cache up to ``pos``."""
    d, inner, ff, v = cfg.d_model, cfg.inner_dim, cfg.d_ff, cfg.vocab_size
    mlp = (3 if cfg.is_gated else 2) * d * ff
    weights = cfg.num_decoder_layers * (6 * d * inner + mlp) + d * v
    cross = cfg.num_decoder_layers * prompts * enc * 2 * inner
    self_kv = cfg.num_decoder_layers * rows * pos * 2 * inner
    return float(weights + cross + self_kv) * itemsize


# --------------------------------------------------------------------------- ours


def is_oom(exc: BaseException) -> bool:
    text = str(exc)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def ours_train(cfg: T5Config, args: argparse.Namespace, batch: int) -> dict[str, float]:
    part = partitioning.make_partitioner(data=-1, model=1)
    opt = train.make_optimizer()
    params = jax.jit(lambda r: t5.init_params(cfg, r))(jax.random.key(0))
    state = train.create_train_state(cfg, params, opt, part, jax.random.key(1))
    del params
    loss = train.nll_loss_config(normalisation="token")
    step = train.make_train_step(t5.T5(cfg), opt, part, loss=loss)
    data = part.shard_batch(
        features.select(make_batch(cfg, batch, args.inputs, args.targets), loss)
    )
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], data)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    run()
    compile_s = time.perf_counter() - start
    run()
    seconds = time_fn(run, warmup=0, repeats=args.steps)
    holder.clear()  # frees the state before the next measurement
    return {"seconds": seconds, "compile_s": compile_s}


def ours_sampling(cfg: T5Config, args: argparse.Namespace) -> dict[str, float]:
    model = t5.T5(cfg)
    params = jax.jit(lambda r: t5.init_params(cfg, r))(jax.random.key(0))
    rng = np.random.default_rng(1)
    enc = rng.integers(2, cfg.vocab_size, (args.prompts, args.inputs)).astype(np.int32)
    enc[:, -1] = 1
    scfg = decoding.SamplingConfig(
        top_k=50, num_samples=args.samples, max_new_tokens=args.new_tokens
    )
    start = time.perf_counter()
    jax.block_until_ready(decoding.generate(model, params, enc, jax.random.key(0), scfg))
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    out = decoding.generate(model, params, enc, jax.random.key(1), scfg)
    jax.block_until_ready(out)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "compile_s": compile_s,
        "new_tokens": float(np.sum(np.asarray(out.lengths))),
    }


# --------------------------------------------------------------------------- HF


def hf_cuda_model(cfg: T5Config, dtype: Any) -> Any:
    """``common.hf_model`` (random weights, our config's shapes) on the GPU in ``dtype``."""
    return hf_model(cfg).to(device="cuda", dtype=dtype)


def hf_train(cfg: T5Config, args: argparse.Namespace, batch: int) -> dict[str, float]:
    import torch

    model = hf_cuda_model(cfg, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    data = make_batch(cfg, batch, args.inputs, args.targets)
    ids = torch.from_numpy(data[features.ENCODER_POS].astype(np.int64)).cuda()
    labels = torch.from_numpy(data[features.DECODER_TARGET].astype(np.int64)).cuda()

    def run() -> None:
        opt.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        torch.cuda.synchronize()

    run()
    run()
    return {"seconds": time_fn(run, warmup=0, repeats=args.steps)}


def hf_sampling(cfg: T5Config, args: argparse.Namespace) -> dict[str, float]:
    import torch

    model = hf_cuda_model(cfg, torch.bfloat16).eval()
    rng = np.random.default_rng(1)
    enc = rng.integers(2, cfg.vocab_size, (args.prompts, args.inputs)).astype(np.int64)
    enc[:, -1] = 1
    ids = torch.from_numpy(enc).cuda()
    kw = dict(
        do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
        num_return_sequences=args.samples, max_new_tokens=args.new_tokens,
    )  # fmt: skip
    with torch.inference_mode():
        model.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), **kw)
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    new_tokens = float((out[:, 1:] != 0).sum())
    del model
    torch.cuda.empty_cache()
    return {"seconds": seconds, "new_tokens": new_tokens}


# --------------------------------------------------------------------------- main


def fit_batch(fn: Any, cfg: T5Config, args: argparse.Namespace) -> tuple[int, dict[str, float]]:
    """``fn(cfg, args, batch)`` at ``--batch``, halved on out-of-memory until it fits."""
    batch = args.batch
    while True:
        try:
            return batch, fn(cfg, args, batch)
        except Exception as exc:  # XLA and torch raise different OOM types
            if not is_oom(exc) or batch == 1:
                raise
            print(f"  batch {batch} does not fit; trying {batch // 2}", flush=True)
            batch //= 2


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="accelerator.json", help="where the figures go")
    ap.add_argument("--size", default="large")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--inputs", type=int, default=512)
    ap.add_argument("--targets", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new_tokens", type=int, default=64)
    ap.add_argument("--param_dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--steps", type=int, default=5, help="timed train steps (after 2)")
    ap.add_argument("--peak_tflops", type=float, default=None, help="chip's dense bf16 peak")
    ap.add_argument("--hbm_gbps", type=float, default=None, help="chip's HBM bandwidth")
    ap.add_argument("--no_hf", action="store_true", help="skip HF transformers")
    args = ap.parse_args(argv)

    device = jax.devices()[0]
    kind = device.device_kind
    peak, hbm = chip_figures(kind, args.peak_tflops, args.hbm_gbps)
    cfg = get_config(args.size, dtype="bfloat16", param_dtype=args.param_dtype, dropout_rate=0.0)
    print(
        f"{kind} ({device.platform}, {jax.device_count()} device(s) used: 1), "
        f"bf16 peak {peak:.0f} TFLOP/s, HBM {hbm:.0f} GB/s; T5-{args.size} shapes",
        flush=True,
    )
    with jax.default_device(device):
        batch, ours_t = fit_batch(ours_train, cfg, args)
        flops = 3 * forward_flops(cfg, batch, args.inputs, args.targets)
        ours_t["mfu"] = flops / ours_t["seconds"] / (peak * 1e12)
        print(
            f"ours train step: batch {batch}, {ours_t['seconds'] * 1e3:.0f} ms, "
            f"{flops / ours_t['seconds'] / 1e12:.0f} TFLOP/s, MFU {ours_t['mfu']:.1%} "
            f"(compile {ours_t['compile_s']:.0f} s)",
            flush=True,
        )
        ours_s = ours_sampling(cfg, args)
    rows = args.prompts * args.samples
    itemsize = jnp.dtype(cfg.dtype).itemsize
    steps_bytes = sum(
        decode_step_bytes(cfg, args.prompts, rows, args.inputs, pos, itemsize)
        for pos in range(1, args.new_tokens + 1)
    )
    bound_s = steps_bytes / (hbm * 1e9)  # every row decodes all new_tokens positions
    ours_s["tokens_per_s"] = ours_s["new_tokens"] / ours_s["seconds"]
    bound_rate = rows * args.new_tokens / bound_s
    print(
        f"ours sampling: {ours_s['tokens_per_s']:.0f} new tokens/s "
        f"({ours_s['seconds']:.2f} s; HBM bound {bound_rate:.0f} tokens/s)",
        flush=True,
    )
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "device_kind": kind,
        "platform": device.platform,
        "peak_bf16_tflops": peak,
        "hbm_gbps": hbm,
        "size": args.size,
        "param_dtype": args.param_dtype,
        "train": {
            "batch": batch,
            "inputs": args.inputs,
            "targets": args.targets,
            "model_flops_per_step": flops,
            "ours": ours_t,
        },
        "sampling": {
            "prompts": args.prompts,
            "inputs": args.inputs,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "hbm_bound_tokens_per_s": bound_rate,
            "ours": ours_s,
        },
    }
    summary = {
        "train_mfu": ours_t["mfu"],
        "sampling_vs_bound": ours_s["tokens_per_s"] / bound_rate,
    }
    if not args.no_hf:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("error: HF needs a CUDA torch here; pass --no_hf to skip it")
        hf_t = hf_train(cfg, args, batch)
        torch.cuda.empty_cache()
        hf_t["mfu"] = flops / hf_t["seconds"] / (peak * 1e12)
        hf_s = hf_sampling(cfg, args)
        hf_s["tokens_per_s"] = hf_s["new_tokens"] / hf_s["seconds"]
        print(
            f"HF train step: {hf_t['seconds'] * 1e3:.0f} ms, MFU {hf_t['mfu']:.1%}; "
            f"HF sampling: {hf_s['tokens_per_s']:.0f} new tokens/s",
            flush=True,
        )
        results["train"]["hf"] = hf_t
        results["sampling"]["hf"] = hf_s
        summary["train_vs_hf"] = hf_t["seconds"] / ours_t["seconds"]
        summary["sampling_vs_hf"] = ours_s["tokens_per_s"] / hf_s["tokens_per_s"]
    results["summary"] = summary
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)
    print(f"figures written to {args.json}")
    print(" ".join(f"{k}={v:.3g}" for k, v in summary.items()))
    return results


if __name__ == "__main__":
    main()
