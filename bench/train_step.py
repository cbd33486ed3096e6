"""Train step throughput: our jitted step vs an HF transformers (PyTorch) training step.

    python bench/train_step.py [--size small] [--batch 32] [--inputs 256] [--targets 32]
                               [--steps 2] [--hir_steps 1] [--microbatches 1] [--dropout 0.0]
                               [--hf_hir] [--no_rl]

Random weights, fp32, same shapes and the same machine for both. Examples/s of:

* the plain-NLL step (SFT/FARL; one forward + backward + AdamW), ours vs HF
  (``model(input_ids, labels=...).loss.backward(); AdamW.step()``): ``train_vs_hf``;
* the HIR step (label-smoothed NLL + binary contrastive + entropy, positive and negative
  instruction): ours (one model call on 2B rows); with ``--hf_hir`` also the released
  code's loss on HF (two forward passes, ``LabelSmoother``, ``Categorical`` entropy;
  about twice the HF NLL step's time), giving ``hir_train_vs_hf``;
* the PPO and GRPO steps (``hir_jax.methods.PPO``/``GRPO``: clipped ratio objective,
  PPO's value head and clipped value loss, GRPO's k3 KL; the rollout's per-token values
  random), timed like the HIR step: ``ours_ppo_examples_per_s``,
  ``ours_grpo_examples_per_s``.

Steps are timed in alternation (ours, HF, ours, HF...), ``--steps`` (HIR:
``--hir_steps``) times each after one warm-up step (ours: includes the compile); the
median wall time is used, and the process CPU time (less sensitive to other jobs on the
machine) is printed too. Ends with ``train_vs_hf=<ratio>`` (plain-NLL steps, wall),
``train_vs_hf_cpu=<ratio>``, ``ours_hir_examples_per_s=...`` (and with ``--hf_hir``,
``hir_train_vs_hf=<ratio>``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
from collections.abc import Callable

import common  # noqa: F401  (sets up paths and env)
import jax
import numpy as np
import torch
from common import hf_model, machine, print_summary

from hir_jax import features, partitioning, train
from hir_jax.model import t5
from hir_jax.model.configs import get_config


def alternate(runners: dict[str, Callable[[], None]], repeats: int) -> dict[str, tuple]:
    """Median (wall, process CPU) seconds of each runner, timed in turn (A, B, A, B...), so
    that other jobs on the machine slow both sides alike. CPU time is less sensitive to
    such jobs; wall time also shows how well the cores are used."""
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0, c0 = time.perf_counter(), os.times()
            fn()
            c1 = os.times()
            cpu = c1.user + c1.system - c0.user - c0.system
            times[name].append((time.perf_counter() - t0, cpu))
    return {
        name: (statistics.median(w for w, _ in ts), statistics.median(c for _, c in ts))
        for name, ts in times.items()
    }


def make_batch(cfg, batch: int, inputs: int, targets: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pos = rng.integers(2, cfg.vocab_size, (batch, inputs)).astype(np.int32)
    neg = pos.copy()
    neg[:, :8] = rng.integers(2, cfg.vocab_size, (batch, 8))  # another instruction
    tgt = rng.integers(2, cfg.vocab_size, (batch, targets)).astype(np.int32)
    pos[:, -1] = neg[:, -1] = tgt[:, -1] = 1  # EOS
    dec = np.concatenate([np.zeros((batch, 1), np.int32), tgt[:, :-1]], 1)
    return {
        features.ENCODER_POS: pos,
        features.ENCODER_NEG: neg,
        features.DECODER_INPUT: dec,
        features.DECODER_TARGET: tgt,
        features.DECODER_WEIGHTS: np.ones((batch, targets), np.float32),
    }


def rl_batch(batch: dict[str, np.ndarray], seed: int = 1) -> dict[str, np.ndarray]:
    """``batch`` with random rollout values (old/ref log-probs, values, advantages)."""
    rng = np.random.default_rng(seed)
    shape = batch[features.DECODER_TARGET].shape
    extra = {k: rng.normal(size=shape).astype(np.float32) for k in features.TOKEN_FEATURES}
    extra[features.OLD_LOGPROBS] = -np.abs(extra[features.OLD_LOGPROBS]) - 5.0
    extra[features.REF_LOGPROBS] = extra[features.OLD_LOGPROBS] + 0.01
    return {**batch, **extra}


def ours_runner(cfg, batch, loss, microbatches: int, method=None) -> Callable[[], None]:
    """One step of our jitted train step per call, compiled and warmed up (``method``:
    that method's step and state layout, e.g. PPO's)."""
    part = partitioning.make_partitioner(data=-1, model=1)
    opt = train.make_optimizer()
    params = jax.jit(lambda r: t5.init_params(cfg, r))(jax.random.key(0))
    extras = method.state_extras() if method is not None else None
    state = train.create_train_state(cfg, params, opt, part, jax.random.key(1), extras)
    if method is None:
        step = train.make_train_step(
            t5.T5(cfg), opt, part, loss=loss, num_microbatches=microbatches
        )
    else:
        step = method.make_train_step(t5.T5(cfg), opt, part, method.loss(loss), microbatches)
        batch = rl_batch(batch)
    sharded = part.shard_batch(batch)
    holder = {"state": state}

    def run() -> None:
        holder["state"], metrics = step(holder["state"], sharded)
        jax.block_until_ready(metrics)

    start = time.perf_counter()
    run()
    print(f"  (ours compile + first step: {time.perf_counter() - start:.1f} s)", flush=True)
    return run


def hf_runner(cfg, batch, hir: bool, dropout: float) -> Callable[[], None]:
    """One HF training step (forward, backward, AdamW) per call, warmed up."""
    from torch.distributions import Categorical
    from transformers.trainer_pt_utils import LabelSmoother

    model = hf_model(cfg)
    model.config.dropout_rate = dropout
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    pos = torch.from_numpy(batch[features.ENCODER_POS].astype(np.int64))
    neg = torch.from_numpy(batch[features.ENCODER_NEG].astype(np.int64))
    labels = torch.from_numpy(batch[features.DECODER_TARGET].astype(np.int64))
    smoother, eps = LabelSmoother(epsilon=0.2), 0.2
    ce = torch.nn.CrossEntropyLoss(ignore_index=-100, reduction="none")

    def run(pos: torch.Tensor, neg: torch.Tensor, labels: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=pos, attention_mask=torch.ones_like(pos), labels=labels)
        if not hir:
            loss = out.loss
        else:  # the released offline_trainer.py's loss, batched
            loss = smoother(out, labels)
            out_neg = model(input_ids=neg, attention_mask=torch.ones_like(neg), labels=labels)
            b, n, v = out.logits.shape
            flat = labels.reshape(-1)
            ll_pos = -ce(out.logits.reshape(-1, v), flat).reshape(b, n).mean(-1)
            ll_neg = -ce(out_neg.logits.reshape(-1, v), flat).reshape(b, n).mean(-1)
            # -log(p+/(p+ + p-)) as softplus: the released exp/log form is 0/0 at random init.
            diff = ll_pos - ll_neg
            softplus = torch.nn.functional.softplus
            con = (1 - eps) * softplus(-diff) + eps * softplus(diff)
            loss = loss + con.mean() - 0.001 * Categorical(logits=out.logits).entropy().mean()
        loss.backward()
        opt.step()

    run(pos, neg, labels)  # warm-up: first-call allocations, AdamW state
    return lambda: run(pos, neg, labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--targets", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed NLL steps (after a warm-up)")
    ap.add_argument("--hir_steps", type=int, default=1, help="timed HIR steps (after a warm-up)")
    ap.add_argument("--microbatches", type=int, default=1)
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout rate, both models")
    ap.add_argument("--hf_hir", action="store_true", help="also time HF with the HIR loss")
    ap.add_argument("--no_rl", action="store_true", help="skip the PPO and GRPO steps")
    args = ap.parse_args()

    cfg = get_config(args.size, dropout_rate=args.dropout)
    batch = make_batch(cfg, args.batch, args.inputs, args.targets)
    print(
        f"train step, T5-{args.size} shapes, random weights, fp32, batch {args.batch}, "
        f"inputs {args.inputs}, targets {args.targets}, dropout {args.dropout}, "
        f"microbatches {args.microbatches}; {machine()}; torch threads {torch.get_num_threads()}",
        flush=True,
    )
    nll = train.nll_loss_config(normalisation="token")  # HF's loss: mean over tokens
    b = args.batch

    def report(name: str, t: tuple[float, float]) -> None:
        print(f"{name}: {b / t[0]:.2f} examples/s ({t[0]:.2f} s/step wall, {t[1]:.2f} s CPU)")

    runners = {
        "ours nll step": ours_runner(cfg, batch, nll, args.microbatches),
        "hf nll step": hf_runner(cfg, batch, hir=False, dropout=args.dropout),
    }
    t = alternate(runners, args.steps)
    for name, value in t.items():
        report(name, value)
    ours_nll, hf_nll = t["ours nll step"], t["hf nll step"]
    del runners
    gc.collect()
    runners = {"ours hir step": ours_runner(cfg, batch, train.LossConfig(), args.microbatches)}
    if args.hf_hir:
        runners["hf hir step"] = hf_runner(cfg, batch, hir=True, dropout=args.dropout)
    if not args.no_rl:
        from hir_jax.methods import GRPO, PPO

        for name, method in (("ppo", PPO()), ("grpo", GRPO())):
            runners[f"ours {name} step"] = ours_runner(cfg, batch, nll, args.microbatches, method)
    t.update(alternate(runners, args.hir_steps))
    report("ours hir step", t["ours hir step"])
    results = {
        "train_vs_hf": hf_nll[0] / ours_nll[0],
        "train_vs_hf_cpu": hf_nll[1] / ours_nll[1],
        "ours_hir_examples_per_s": b / t["ours hir step"][0],
    }
    if not args.no_rl:
        for name in ("ppo", "grpo"):
            report(f"ours {name} step", t[f"ours {name} step"])
            results[f"ours_{name}_examples_per_s"] = b / t[f"ours {name} step"][0]
    if args.hf_hir:
        report("hf hir step", t["hf hir step"])
        results["hir_train_vs_hf"] = t["hf hir step"][0] / t["ours hir step"][0]
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other jobs skew wall times)")
    print_summary(**results)


if __name__ == "__main__":
    main()
