"""One whole HIR round, ours against the released code's loop structure written with HF
transformers (PyTorch), same shapes, same machine.

    python bench/round.py [--size small] [--train 32] [--test 16] [--samples 4]
                          [--prompt_tokens 128] [--new_tokens 32] [--epochs 2]
                          [--batch 64] [--seed 0]

A round: sample K outputs for each of N training prompts (T=1, top-k 50), judge them
(exact match with the gold answer), relabel (``hir_jax.relabel``, sub-output spans),
train E epochs over the buffer (shuffled, 10% held out, capped at 4 x N examples, batches
of 64; the HIR loss: label-smoothed NLL + binary contrastive + entropy), then evaluate
greedily on the test prompts. Random weights, fp32; a word-level synthetic task (one token
per word) whose prompts have ``--prompt_tokens`` tokens, so nothing depends on a
tokenizer download.

* **ours**: ``decoding.generate`` (all prompts in one compiled loop, K samples sharing an
  encoder pass), ``features.make_features``, the jitted HIR train step on 64-example
  batches (one model call on the positive and negative rows), greedy ``generate``;
* **released** (HIR_REFERENCE.md): ``generate`` one prompt at a time (K return
  sequences), batch-1 examples with gradient accumulation to 64, three forward passes
  per example (the label-smoothed NLL and entropy from the first; p+ from a second
  positive pass, p- from the negative pass), ``torch.optim.AdamW``; greedy ``generate``
  one prompt at a time. Dropout is 0 on both sides (random-weight T5-small shapes).

The issue's task size is tracking_shuffled_objects_three_objects' (600 train / 150 test,
10 epochs, prompts of about 170 FLAN-T5 tokens, up to 256 new tokens). The defaults
shorten it to end within about 20 minutes on a 2-core CPU: 32 train / 16 test prompts,
2 epochs, 128-token prompts, at most 32 new tokens; every phase scales about linearly in
these, so the ratio is the figure to read. Prints seconds per phase and per round for
both; the last line is ``round_vs_released=<ratio>`` (released seconds / ours, round
total) and the per-phase ratios.
"""

from __future__ import annotations

import argparse
import time

import common  # noqa: F401  (sets up paths and env)
import jax
import numpy as np
import torch
from common import hf_model, machine, print_summary

from hir_jax import decoding, features, partitioning, relabel, train
from hir_jax.model import t5
from hir_jax.model.configs import get_config
from hir_jax.special_ids import EOS_ID
from tasks.instructions import CORRECT, prompt

LABEL_SMOOTHING, CONTRASTIVE_EPS, ENTROPY_COEF = 0.2, 0.2, 0.001


# --------------------------------------------------------------------------- the task


class WordVocab:
    """One token per word: ``w<id>`` <-> id; other words hash into the vocabulary."""

    def __init__(self, size: int) -> None:
        self.size = size

    def encode(self, text: str) -> list[int]:
        ids = []
        for word in text.split():
            if word[:1] == "w" and word[1:].isdigit():
                ids.append(int(word[1:]))
            else:
                ids.append(2 + sum(ord(c) * 31**i for i, c in enumerate(word)) % (self.size - 2))
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(f"w{i}" for i in ids if i > EOS_ID)


def make_task(vocab: WordVocab, n: int, words: int, rng: np.random.Generator) -> list[tuple]:
    """``n`` (query text, gold answer text) pairs; the query has ``words`` tokens."""
    out = []
    for _ in range(n):
        body = " ".join(f"w{i}" for i in rng.integers(2, vocab.size, words))
        gold = " ".join(f"w{i}" for i in rng.integers(2, vocab.size, 2))
        out.append((f"Q: {body}\nA:", gold))
    return out


def encoder_rows(vocab: WordVocab, queries: list[str], width: int) -> np.ndarray:
    rows = [vocab.encode(prompt(CORRECT, q))[: width - 1] + [EOS_ID] for q in queries]
    out = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def judge(vocab, task, outputs) -> list[tuple]:
    """The buffer's entries: (query, output ids + EOS, correct, gold) per sample."""
    return [
        (query, np.asarray(ids + [EOS_ID], np.int32), vocab.decode(ids) == gold, gold)
        for (query, gold), samples in zip(task, outputs, strict=True)
        for ids in samples
    ]


def relabeled_features(vocab, entries, rng, widths) -> dict[str, np.ndarray]:
    """Relabels buffer entries (a new sub-output span at every visit, as the released
    trainer) and builds their fixed-shape features."""
    examples = relabel.relabel_batch(*zip(*entries, strict=True), rng, detokenize=vocab.decode)
    return features.make_features(
        examples, vocab.encode, max_encoder_len=widths[0], max_decoder_len=widths[1]
    )


def judged_buffer(vocab, task, samples, rng: np.random.Generator) -> tuple[list, int]:
    """The round's training buffer (the released use: shuffle, hold out 10%, keep the
    first 4 x N_train) and how many samples were correct."""
    entries = judge(vocab, task, samples)
    order = rng.permutation(len(entries))
    held = int(np.ceil(0.1 * len(entries)))
    buffer = [entries[i] for i in order[held:]][: 4 * len(task)]
    return buffer, sum(e[2] for e in entries)


def unpadded(row: np.ndarray) -> torch.Tensor:
    """One example's ids without padding, as a batch-1 tensor (the released batches)."""
    return torch.from_numpy(row[row != 0][None].astype(np.int64))


def greedy_accuracy(vocab, task, outputs) -> float:
    return float(
        np.mean([vocab.decode(o) == gold for (_, gold), o in zip(task, outputs, strict=True)])
    )


# --------------------------------------------------------------------------- ours


def ours_round(cfg, args, vocab, train_task, test_task, widths) -> dict[str, float]:
    enc_len = widths[0]
    model = t5.T5(cfg)
    part = partitioning.make_partitioner(data=-1, model=1)
    opt = train.make_optimizer(learning_rate=5e-4)
    params = jax.jit(lambda r: t5.init_params(cfg, r))(jax.random.key(args.seed))
    state = train.create_train_state(cfg, params, opt, part, jax.random.key(1))
    loss = train.LossConfig()
    step = train.make_train_step(model, opt, part, loss=loss)
    sampling = decoding.SamplingConfig(
        top_k=50, num_samples=args.samples, max_new_tokens=args.new_tokens
    )
    greedy = decoding.SamplingConfig(greedy=True, top_k=0, max_new_tokens=args.new_tokens)
    train_enc = encoder_rows(vocab, [q for q, _ in train_task], enc_len)
    test_enc = encoder_rows(vocab, [q for q, _ in test_task], enc_len)

    def fixed_batch(rows):
        return features.select(features.pad_rows(rows, args.batch), loss)

    # Compile everything once first (a real run compiles once, for 31 rounds).
    start = time.perf_counter()
    jax.block_until_ready(
        decoding.generate(model, state.params, train_enc, jax.random.key(0), sampling)
    )
    jax.block_until_ready(
        decoding.generate(model, state.params, test_enc, jax.random.key(0), greedy)
    )
    dummy = relabeled_features(vocab, judge(vocab, train_task[:1], [[[5, 6]]]), 0, widths)
    step.lower(state, part.shard_batch(fixed_batch(dummy))).compile()
    compile_s = time.perf_counter() - start

    times: dict[str, float] = {}
    t0 = time.perf_counter()
    out = decoding.generate(model, state.params, train_enc, jax.random.key(2), sampling)
    out = jax.device_get(out)
    samples = [
        [decoding.output_ids(out, i, k) for k in range(args.samples)]
        for i in range(len(train_task))
    ]
    times["sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    buffer, n_correct = judged_buffer(vocab, train_task, samples, rng)
    times["judge"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    steps = 0
    for _ in range(args.epochs):
        order = rng.permutation(len(buffer))
        for i in range(0, len(order), args.batch):
            chunk = [buffer[j] for j in order[i : i + args.batch]]
            rows = relabeled_features(vocab, chunk, rng, widths)
            state, metrics = step(state, part.shard_batch(fixed_batch(rows)))
            steps += 1
    jax.block_until_ready(metrics)
    times["train"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    out = jax.device_get(
        decoding.generate(model, state.params, test_enc, jax.random.key(3), greedy)
    )
    acc = greedy_accuracy(
        vocab, test_task, [decoding.output_ids(out, i) for i in range(len(test_task))]
    )
    times["evaluate"] = time.perf_counter() - t0
    times["round"] = sum(times.values())
    print(
        f"ours: compile {compile_s:.1f} s (once per run, not counted); {n_correct} correct "
        f"samples, buffer {len(buffer)}, {steps} steps, test accuracy {acc:.3f}"
    )
    return times


# --------------------------------------------------------------------------- released


def released_round(cfg, args, vocab, train_task, test_task, widths) -> dict[str, float]:
    from torch.distributions import Categorical
    from transformers.trainer_pt_utils import LabelSmoother

    enc_len = widths[0]
    model = hf_model(cfg, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.0)
    smoother = LabelSmoother(epsilon=LABEL_SMOOTHING)
    ce = torch.nn.CrossEntropyLoss(reduction="none")
    softplus = torch.nn.functional.softplus
    kw_sample = dict(
        do_sample=True, top_k=50, top_p=1.0, temperature=1.0,
        num_return_sequences=args.samples, max_new_tokens=args.new_tokens,
    )  # fmt: skip
    kw_greedy = dict(do_sample=False, max_new_tokens=args.new_tokens)

    def one_prompt(query: str) -> torch.Tensor:
        ids = vocab.encode(prompt(CORRECT, query))[: enc_len - 1] + [EOS_ID]
        return torch.tensor([ids], dtype=torch.long)

    def new_ids(row: torch.Tensor) -> list[int]:
        ids = [int(t) for t in row[1:]]  # drop the decoder start token
        return ids[: ids.index(EOS_ID)] if EOS_ID in ids else [t for t in ids if t != 0]

    times: dict[str, float] = {}
    torch.manual_seed(args.seed)
    model.eval()
    t0 = time.perf_counter()
    samples = []
    with torch.inference_mode():
        for query, _ in train_task:
            out = model.generate(input_ids=one_prompt(query), **kw_sample)
            samples.append([new_ids(r) for r in out])
    times["sample"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    buffer, n_correct = judged_buffer(vocab, train_task, samples, rng)
    times["judge"] = time.perf_counter() - t0

    model.train()
    t0 = time.perf_counter()
    steps = 0
    for _ in range(args.epochs):
        order = rng.permutation(len(buffer))
        for n, j in enumerate(order):
            f = relabeled_features(vocab, [buffer[j]], rng, widths)
            keep = f[features.DECODER_WEIGHTS][0] > 0
            labels = torch.from_numpy(f[features.DECODER_TARGET][:, keep].astype(np.int64))

            pos, neg = (unpadded(f[k][0]) for k in (features.ENCODER_POS, features.ENCODER_NEG))
            out = model(input_ids=pos, labels=labels)  # pass 1: NLL (smoothed), entropy
            loss = smoother(out, labels)
            loss = loss - ENTROPY_COEF * Categorical(logits=out.logits).entropy().mean()
            ll_pos = -ce(model(input_ids=pos, labels=labels).logits[0], labels[0]).mean()
            ll_neg = -ce(model(input_ids=neg, labels=labels).logits[0], labels[0]).mean()
            diff = ll_pos - ll_neg  # -log(p+/(p+ + p-)) as softplus, stable at any init
            loss = loss + (1 - CONTRASTIVE_EPS) * softplus(-diff) + CONTRASTIVE_EPS * softplus(diff)
            (loss / args.batch).backward()
            if (n + 1) % args.batch == 0 or n + 1 == len(order):
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
    times["train"] = time.perf_counter() - t0

    model.eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        outputs = [
            new_ids(model.generate(input_ids=one_prompt(q), **kw_greedy)[0]) for q, _ in test_task
        ]
    acc = greedy_accuracy(vocab, test_task, outputs)
    times["evaluate"] = time.perf_counter() - t0
    times["round"] = sum(times.values())
    print(
        f"released: {n_correct} correct samples, buffer {len(buffer)}, {steps} optimizer "
        f"steps, test accuracy {acc:.3f}"
    )
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="small")
    ap.add_argument("--train", type=int, default=32, help="training prompts (N)")
    ap.add_argument("--test", type=int, default=16, help="test prompts")
    ap.add_argument("--samples", type=int, default=4, help="K outputs per training prompt")
    ap.add_argument("--prompt_tokens", type=int, default=128)
    ap.add_argument("--new_tokens", type=int, default=32, help="most new tokens per output")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64, help="examples per optimizer step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    cfg = get_config(args.size, dropout_rate=0.0)
    vocab = WordVocab(cfg.vocab_size)
    rng = np.random.default_rng(args.seed)
    # Query words: the prompt minus the instruction and the "Q:"/"A:" words.
    words = args.prompt_tokens - len(vocab.encode(prompt(CORRECT, "Q: \nA:"))) - 1
    train_task = make_task(vocab, args.train, words, rng)
    test_task = make_task(vocab, args.test, words, rng)
    # Encoder: the prompt, then a moved prefix of up to new_tokens; decoder: a span + EOS.
    widths = (args.prompt_tokens + args.new_tokens + 1, args.new_tokens + 1)
    print(
        f"HIR round, T5-{args.size} shapes, random weights, fp32: {args.train} train / "
        f"{args.test} test prompts of {args.prompt_tokens} tokens, K={args.samples}, at most "
        f"{args.new_tokens} new tokens, {args.epochs} epochs, batch {args.batch}; {machine()}; "
        f"torch threads {torch.get_num_threads()}",
        flush=True,
    )
    ours = ours_round(cfg, args, vocab, train_task, test_task, widths)
    released = released_round(cfg, args, vocab, train_task, test_task, widths)
    print(f"{'phase':10s} {'ours s':>9s} {'released s':>11s} {'ratio':>7s}")
    for phase in ours:
        print(
            f"{phase:10s} {ours[phase]:9.1f} {released[phase]:11.1f} "
            f"{released[phase] / max(ours[phase], 1e-9):7.2f}"
        )
    print_summary(
        round_vs_released=released["round"] / ours["round"],
        sample_vs_released=released["sample"] / ours["sample"],
        train_vs_released=released["train"] / ours["train"],
        evaluate_vs_released=released["evaluate"] / ours["evaluate"],
        ours_round_s=ours["round"],
        released_round_s=released["round"],
    )


if __name__ == "__main__":
    main()
