"""The HIR rounds: sample -> score -> relabel -> train -> evaluate, and the baselines.

``run`` (bound by the gin files under ``gin_configs/runs``) wires the pieces together:
``decoding.generate`` samples K outputs per training query with the "correct"
instruction, ``feedback.score`` judges them, the replay buffer keeps the new distinct
ones, ``relabel`` turns them into (positive, negative instruction, sub-output) examples
afresh every epoch, and ``train.make_train_step`` trains on them; greedy decoding on the
test split measures accuracy. The same loop runs the baselines by ``LoopConfig.method``:

* ``hir``: the paper's algorithm (defaults: the released code's settings);
* ``farl``: keep only correct samples, plain NLL, no sub-output sampling;
* ``sft``: train on the gold answers of the training split;
* ``zero_shot``: evaluate the initial model only.

Everything under MODEL_DIR is resumable: a checkpoint (train state + loop state) is
written at the end of every round, every ``checkpoint_every_steps`` train steps, and on
SIGTERM; a restarted run continues from the latest one and ends with the same metrics as
an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gin
import jax
import numpy as np

from hir_jax import decoding, feedback, metrics_log, relabel
from hir_jax.checkpoints import load_checkpoint, load_config, load_vocabulary
from hir_jax.checkpoints.state import StateCheckpointer, check_same_shape, checkpoint_id
from hir_jax.model.configs import EOS_ID, T5Config
from hir_jax.model.t5 import T5, init_params
from hir_jax.partitioning import Partitioner, any_process, make_partitioner, to_host
from hir_jax.paths import as_path
from hir_jax.train import (
    LossConfig,
    Optimizer,
    abstract_train_state,
    create_train_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    nll_loss_config,
    summarize_eval,
)
from tasks import bigbench

METHODS = ("hir", "farl", "sft", "zero_shot")
_SAMPLE, _TRAIN, _HOLDOUT, _WARMUP = 0, 1, 2, 3
_HOLDOUT_EPOCH = 2**31 - 1  # relabeling seed of the held-out examples


@gin.configurable(module="hir_jax.hir")
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Every number of the reference's loop; defaults are the released code's.

    ``num_rounds`` counts sampling/training rounds after the optional evaluation of the
    initial model (round 0): the reference's "1 + 30" is ``eval_initial`` plus 30 rounds.
    """

    method: str = "hir"
    num_rounds: int = 30
    eval_initial: bool = True
    # Online sampling (reference: T=1, top-k 50, top-p 1, 256 new tokens; K=1 released, 4 paper).
    samples_per_query: int = 1
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 256
    sample_batch_size: int = 64
    # Relabeling.
    hindsight: bool = True  # False: every output relabeled "correct" (ablation)
    sub_output: bool = True
    relabel_instruction: str = "released"  # "released" | "paper"
    # Offline training.
    epochs: int = 10
    batch_size: int = 64
    num_microbatches: int = 1
    buffer_cap_factor: float = 4.0
    holdout_fraction: float = 0.1
    # Optional SFT warm-up before round 0 on another task's gold answers (e.g. so that a
    # random model learns the "(A)" answer format before HIR on the target task).
    warmup_task: str | None = None
    warmup_epochs: int = 0
    # Evaluation.
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 64
    # Inputs longer than this (in tokens, EOS included) are an error.
    max_input_length: int = 2048
    # Limits for quick runs (None: the whole split).
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    # Checkpoints.
    checkpoint_every_steps: int = 0
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.relabel_instruction not in ("released", "paper"):
            raise ValueError("relabel_instruction must be 'released' or 'paper'")
        if self.batch_size % self.num_microbatches:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of "
                f"num_microbatches {self.num_microbatches}"
            )

    def sampling(self) -> decoding.SamplingConfig:
        return decoding.SamplingConfig(
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            num_samples=self.samples_per_query,
            max_new_tokens=self.max_new_tokens,
        )

    def greedy(self) -> decoding.SamplingConfig:
        return decoding.SamplingConfig(
            greedy=True, top_k=0, max_new_tokens=self.eval_max_new_tokens
        )


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class SplitData:
    """One split of a task, tokenized once: prompts under the "correct" instruction."""

    examples: list[bigbench.Example]
    prompt_ids: list[list[int]]

    @property
    def answers(self) -> list[str]:
        return [ex.answer for ex in self.examples]

    @property
    def num_options(self) -> list[int]:
        return [len(ex.options) for ex in self.examples]


def _load_split(
    task: str, split: str, tokenize: Callable[[str], list[int]], limit: int | None, max_len: int
) -> SplitData:
    examples = bigbench.load_examples(task, split)[:limit]
    if not examples:
        raise ValueError(f"task {task!r} has no {split} examples")
    prompt_ids = [tokenize(ex.inputs) + [EOS_ID] for ex in examples]
    longest = max(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    if len(prompt_ids[longest]) > max_len:
        raise ValueError(
            f"{task} {split} example {examples[longest].example_id} has "
            f"{len(prompt_ids[longest])} tokens, more than max_input_length {max_len}"
        )
    return SplitData(examples, prompt_ids)


@dataclasses.dataclass
class ReplayBuffer:
    """Sampled outputs that grow across rounds; duplicates for one query are dropped."""

    query: list[int] = dataclasses.field(default_factory=list)
    output: list[tuple[int, ...]] = dataclasses.field(default_factory=list)
    correct: list[bool] = dataclasses.field(default_factory=list)

    def __post_init__(self) -> None:
        self._seen = set(zip(self.query, self.output, strict=True))

    def __len__(self) -> int:
        return len(self.query)

    def add(self, query: int, output: Sequence[int], correct: bool) -> bool:
        key = (int(query), tuple(int(t) for t in output))
        if key in self._seen:
            return False
        self._seen.add(key)
        self.query.append(key[0])
        self.output.append(key[1])
        self.correct.append(bool(correct))
        return True

    def to_json(self) -> dict[str, Any]:
        return {
            "query": self.query,
            "output": [list(o) for o in self.output],
            "correct": self.correct,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReplayBuffer:
        return cls(list(d["query"]), [tuple(o) for o in d["output"]], list(d["correct"]))


def _batches(n: int, size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, size):
        yield np.arange(start, min(start + size, n))


def _trim_to_buckets(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Cuts zero-padded feature columns down to length buckets (few compiled shapes)."""
    out = dict(features)
    enc_keys = [k for k in ("encoder_pos_tokens", "encoder_neg_tokens") if k in out]
    dec_keys = ["decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights"]
    for keys, ref in ((enc_keys, enc_keys), (dec_keys, ["decoder_loss_weights"])):
        used = max(int(np.max(np.sum(out[k] != 0, axis=1), initial=0)) for k in ref)
        length = decoding.bucket_length(max(used, 1))
        for k in keys:
            out[k] = out[k][:, :length]
    return out


def _pad_rows(features: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """Pads a partial batch with all-zero rows (zero loss weight: they add nothing)."""
    n = next(iter(features.values())).shape[0]
    if n == rows:
        return features
    return {
        k: np.concatenate([v, np.zeros((rows - n,) + v.shape[1:], v.dtype)])
        for k, v in features.items()
    }


# --------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM (how a TPU VM is preempted) sets a flag the loop checks at safe points."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def should_stop(self) -> bool:
        """Whether any host got SIGTERM; all hosts agree, so they save and stop together."""
        return any_process(self.requested)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        metrics_log.console("SIGTERM received: saving a checkpoint at the next safe point")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
    """Raised after the state was saved because of SIGTERM."""


class _MetricSums:
    """Running sums of the train step's scalar metrics, read from the device one step late
    (reading a step's metrics waits for that step; the step after it is already queued)."""

    KEYS = ("loss", "nll", "contrastive", "entropy", "token_accuracy", "grad_norm")

    def __init__(self, sums: dict[str, float]) -> None:
        self._sums = dict(sums)
        self._pending: dict[str, jax.Array] | None = None

    def add(self, metrics: dict[str, jax.Array]) -> None:
        self.read()
        self._pending = metrics

    def read(self) -> dict[str, float]:
        """The sums over every step added so far."""
        if self._pending is not None:
            m, self._pending = jax.device_get(self._pending), None
            for k in self.KEYS:
                if k in m:
                    self._sums[k] = self._sums.get(k, 0.0) + float(m[k])
            self._sums["steps"] = self._sums.get("steps", 0.0) + 1
        return dict(self._sums)


# --------------------------------------------------------------------------- the loop


class HIRLoop:
    """Holds the model, state, data and writers of one run; ``run()`` does the rounds."""

    def __init__(
        self,
        *,
        model_dir: str,
        task: str,
        config: T5Config,
        params: Any,
        vocabulary: Any,
        loop: LoopConfig,
        optimizer: Optimizer,
        loss: LossConfig,
        partitioner: Partitioner,
        seed: int,
        writer: metrics_log.MetricsWriter,
        checkpointer: StateCheckpointer,
    ) -> None:
        """``params=None``: the state comes from ``checkpointer`` (``restore_latest``)."""
        self.model_dir, self.task, self.config = model_dir, task, config
        self.loop, self.seed, self.writer = loop, seed, writer
        self.vocab = vocabulary
        self.model = T5(config)
        self.partitioner = partitioner
        self.optimizer = optimizer
        if loop.method in ("farl", "sft"):
            loss = nll_loss_config(loss.label_smoothing if loss.kind == "nll" else 0.0)
        self.loss = loss
        self.base_rng = jax.random.key(seed)
        self.train = _load_split(
            task, "train", self.tokenize, loop.max_train_examples, loop.max_input_length
        )
        self.test = _load_split(
            task, "test", self.tokenize, loop.max_test_examples, loop.max_input_length
        )
        self.state = None
        if params is not None:
            self.state = create_train_state(
                config, params, optimizer, partitioner, jax.random.fold_in(self.base_rng, 1)
            )
        self.train_step = make_train_step(
            self.model,
            optimizer,
            partitioner,
            loss=self.loss,
            num_microbatches=loop.num_microbatches,
        )
        self.eval_step = make_eval_step(self.model, partitioner, loss=self.loss)
        self.checkpointer = checkpointer
        self.buffer = ReplayBuffer()
        self.round = 0  # next round to run
        self.step_in_round = 0  # train steps already done in self.round
        self.round_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ text <-> ids

    @functools.cache  # noqa: B019 (one loop object per run)
    def _encode(self, text: str) -> tuple[int, ...]:
        return tuple(int(t) for t in self.vocab.encode(text))

    def tokenize(self, text: str) -> list[int]:
        return list(self._encode(text))

    def detokenize(self, ids: Sequence[int]) -> str:
        ids = [int(t) for t in ids if int(t) > EOS_ID]
        return self.vocab.decode(ids)

    # ------------------------------------------------------------------ checkpoints

    def _loop_state(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "step_in_round": self.step_in_round,
            "round_metrics": self.round_metrics,
            "buffer": self.buffer.to_json(),
            "model_shape": self.config.shape_dict(),
            "task": self.task,
            "method": self.loop.method,
            "seed": self.seed,
        }

    def save(self) -> None:
        ckpt = checkpoint_id(self.round, self.step_in_round)
        self.checkpointer.save(ckpt, self.state, self._loop_state())

    def restore_latest(self) -> bool:
        """Continues from MODEL_DIR's latest checkpoint; False when there is none."""
        latest = self.checkpointer.latest()
        if latest is None:
            return False
        loop_state = self.checkpointer.restore_loop(latest)
        check_same_shape(
            loop_state["model_shape"], self.config.shape_dict(), f"MODEL_DIR {self.model_dir}"
        )
        for key, now in (("task", self.task), ("method", self.loop.method)):
            if loop_state[key] != now:
                raise ValueError(
                    f"MODEL_DIR {self.model_dir} holds a {key}={loop_state[key]!r} run, "
                    f"not {now!r}; use a new MODEL_DIR"
                )
        abstract = abstract_train_state(self.config, self.optimizer, self.partitioner)
        self.state = self.checkpointer.restore_state(latest, abstract)
        self.round = int(loop_state["round"])
        self.step_in_round = int(loop_state["step_in_round"])
        self.round_metrics = dict(loop_state["round_metrics"])
        self.buffer = ReplayBuffer.from_json(loop_state["buffer"])
        # Lines of rounds not yet finished are written again when they finish.
        self.writer.truncate_after(self.round - 1)
        metrics_log.console(
            f"resumed from {self.checkpointer.directory}/{latest}: round {self.round}, "
            f"step {self.step_in_round} of the round, buffer {len(self.buffer)}"
        )
        return True

    # ------------------------------------------------------------------ phases

    def _rng(self, *path: int) -> jax.Array:
        key = self.base_rng
        for p in path:
            key = jax.random.fold_in(key, p)
        return key

    def _generate(
        self, split: SplitData, cfg: decoding.SamplingConfig, rng: jax.Array, batch: int, desc: str
    ) -> tuple[list[list[list[int]]], float]:
        """Outputs [example][sample] -> ids (no EOS), and new tokens per second."""
        out: list[list[list[int]]] = []
        tokens, start = 0, time.perf_counter()
        rows = -(-batch // self.partitioner.data_size) * self.partitioner.data_size
        chunks = list(_batches(len(split.prompt_ids), batch))
        for idx in metrics_log.progress(chunks, desc=desc, unit="batch"):
            if desc.startswith("sample") and self.preemption.should_stop():
                raise Preempted()
            enc, n = decoding.pad_batch([split.prompt_ids[i] for i in idx], batch_multiple=rows)
            row_ids = np.zeros(enc.shape[0], np.int32)
            row_ids[:n] = idx
            res = decoding.generate(
                self.model, self.state.params, enc, rng, cfg, row_ids, self.partitioner
            )
            res = to_host(res)  # whole on every host
            tokens += int(np.sum(res.lengths[:n]))
            for r in range(n):
                out.append([decoding.output_ids(res, r, k) for k in range(cfg.num_samples)])
        return out, tokens / max(time.perf_counter() - start, 1e-9)

    def evaluate(self) -> dict[str, float]:
        outputs, rate = self._generate(
            self.test, self.loop.greedy(), self._rng(0), self.loop.eval_batch_size, "eval"
        )
        texts = [self.detokenize(o[0]) for o in outputs]
        correct, summary = feedback.score(texts, self.test.answers, self.test.num_options)
        self._write_predictions(texts, correct)
        return {**summary, "decode_tokens_per_s": rate}

    def _write_predictions(self, texts: list[str], correct: list[bool]) -> None:
        if jax.process_index() != 0:
            return
        path = as_path(self.model_dir) / "predictions" / f"round_{self.round:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps(
                {"example_id": ex.example_id, "answer": ex.answer, "output": t, "correct": c}
            )
            for ex, t, c in zip(self.test.examples, texts, correct, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")

    def sample(self) -> dict[str, float]:
        """Online sampling for this round; new distinct outputs go into the buffer."""
        cfg = self.loop.sampling()
        outputs, rate = self._generate(
            self.train, cfg, self._rng(self.round, _SAMPLE), self.loop.sample_batch_size, "sample"
        )
        flat = [(i, o) for i, outs in enumerate(outputs) for o in outs]
        texts = [self.detokenize(o) for _, o in flat]
        answers = [self.train.answers[i] for i, _ in flat]
        n_opts = [self.train.num_options[i] for i, _ in flat]
        correct, summary = feedback.score(texts, answers, n_opts)
        added = 0
        for (i, ids), ok in zip(flat, correct, strict=True):
            if self.loop.method == "farl" and not ok:
                continue
            added += self.buffer.add(i, ids, ok)
        return {
            "sampled_correct_rate": summary["accuracy"],
            "sampled_format_error_rate": summary["format_error_rate"],
            "new_samples": added,
            "buffer_size": len(self.buffer),
            "sample_tokens_per_s": rate,
        }

    def _relabel(self, index: int, epoch: int) -> relabel.RelabeledExample:
        q = self.buffer.query[index]
        ex = self.train.examples[q]
        rng = np.random.default_rng([self.seed, self.round, epoch, index])
        if self.loop.method == "hir":
            correct = self.buffer.correct[index] if self.loop.hindsight else True
            return relabel.relabel(
                ex.query,
                list(self.buffer.output[index]),
                correct,
                ex.answer,
                rng,
                detokenize=self.detokenize,
                sub_output=self.loop.sub_output,
                relabel_instruction=self.loop.relabel_instruction,
            )
        # FARL / SFT: the sampling instruction itself, whole outputs, plain NLL.
        return relabel.relabel(
            ex.query, list(self.buffer.output[index]), True, ex.answer, rng,
            sub_output=False, relabel_instruction="paper",
        )  # fmt: skip

    def _features(self, indices: Sequence[int], epoch: int) -> dict[str, np.ndarray]:
        return self._batch_features([self._relabel(int(i), epoch) for i in indices], self.loss)

    def _batch_features(
        self, examples: Sequence[relabel.RelabeledExample], loss: LossConfig
    ) -> dict[str, np.ndarray]:
        """One fixed-size batch: bucketed lengths, zero rows up to ``batch_size``."""
        feats = relabel.make_features(
            examples,
            self.tokenize,
            max_encoder_len=self.loop.max_input_length + self.loop.max_new_tokens + 1,
            max_decoder_len=self.loop.max_new_tokens + 1,
        )
        keep = ["encoder_pos_tokens", "decoder_input_tokens", "decoder_target_tokens"]
        keep += ["decoder_loss_weights"]
        if loss.needs_negative:
            keep.append("encoder_neg_tokens")
        if loss.kind == "hir" and loss.contrastive == "in_batch":
            keep.append("positive_is_correct")
        feats = _trim_to_buckets({k: feats[k] for k in keep})
        return _pad_rows(feats, self.loop.batch_size)

    def warmup(self) -> dict[str, float]:
        """SFT on ``warmup_task``'s gold answers (plain NLL, the sampling instruction)."""
        loop = self.loop
        data = _load_split(loop.warmup_task, "train", self.tokenize, None, loop.max_input_length)
        examples = [
            relabel.relabel(
                ex.query,
                self.tokenize(ex.answer),
                True,
                ex.answer,
                0,
                sub_output=False,
                relabel_instruction="paper",
            )  # fmt: skip
            for ex in data.examples
        ]
        nll = nll_loss_config()
        step = make_train_step(
            self.model, self.optimizer, self.partitioner, loss=nll,
            num_microbatches=loop.num_microbatches,
        )  # fmt: skip
        out = self._train_epochs(
            step,
            np.arange(len(examples)),
            loop.warmup_epochs,
            _WARMUP,
            lambda chosen, _: self._batch_features([examples[i] for i in chosen], nll),
            desc="warm-up",
        )
        return {"warmup_nll": out["loss"], "warmup_steps": int(out["train_steps"])}

    def _split_buffer(self) -> tuple[np.ndarray, np.ndarray]:
        """This round's held-out and training indices (shuffled; training part capped)."""
        gen = np.random.default_rng([self.seed, self.round, _HOLDOUT])
        order = gen.permutation(len(self.buffer))
        n_hold = int(self.loop.holdout_fraction * len(order)) if self.loop.method == "hir" else 0
        cap = int(self.loop.buffer_cap_factor * len(self.train.examples))
        return order[:n_hold], order[n_hold:][:cap]

    def train_round(self) -> dict[str, float]:
        """E epochs over this round's training part (and the held-out perplexity)."""
        holdout, train_idx = self._split_buffer()
        out = self._train_epochs(
            self.train_step,
            train_idx,
            self.loop.epochs,
            _TRAIN,
            self._features,
            desc=f"train r{self.round}",
        )
        if len(holdout):
            out.update(self._holdout_perplexity(holdout))
        return out

    def _train_epochs(
        self,
        step_fn: Callable[..., Any],
        items: np.ndarray,
        epochs: int,
        stream: int,
        features: Callable[[np.ndarray, int], dict[str, np.ndarray]],
        desc: str,
    ) -> dict[str, float]:
        """``epochs`` shuffled passes over ``items`` in batches; mean step metrics.

        Resumes after the ``step_in_round`` steps done before an interruption; checkpoints
        every ``checkpoint_every_steps`` and on SIGTERM. Each step's metrics are read one
        step late, so the host builds the next batch while the device trains.
        """
        bs = self.loop.batch_size
        total = -(-len(items) // bs) * epochs
        sums = _MetricSums(self.round_metrics.get("train_sums", {}))
        start, examples_done = time.perf_counter(), 0
        bar = metrics_log.progress(total=total, desc=desc, unit="step")
        bar.update(self.step_in_round)
        counter = 0
        for epoch in range(epochs):
            rng = np.random.default_rng([self.seed, self.round, stream, epoch])
            perm = rng.permutation(items)
            for idx in _batches(len(items), bs):
                counter += 1
                if counter <= self.step_in_round:
                    continue  # done before the interruption
                feats = features(perm[idx], epoch)
                self.state, m = step_fn(self.state, feats)
                sums.add(m)
                examples_done += int(np.sum(np.any(feats["decoder_loss_weights"] > 0, axis=1)))
                self.step_in_round = counter
                bar.update(1)
                every = self.loop.checkpoint_every_steps
                stop = self.preemption.should_stop()
                if stop or (every and counter % every == 0 and counter < total):
                    self.round_metrics["train_sums"] = sums.read()
                    self.save()
                    if stop:
                        bar.close()
                        raise Preempted()
        bar.close()
        totals = sums.read()
        self.round_metrics["train_sums"] = totals
        n = max(totals.get("steps", 0.0), 1.0)
        out = {k: v / n for k, v in totals.items() if k != "steps"}
        out["train_steps"] = totals.get("steps", 0.0)
        out["examples_per_s"] = examples_done / max(time.perf_counter() - start, 1e-9)
        return out

    def _holdout_perplexity(self, holdout: np.ndarray) -> dict[str, float]:
        results = []
        for idx in _batches(len(holdout), self.loop.batch_size):
            feats = self._features(holdout[idx], epoch=_HOLDOUT_EPOCH)
            results.append(self.eval_step(self.state.params, self.partitioner.shard_batch(feats)))
        summary = summarize_eval(results)
        return {"holdout_perplexity": summary["perplexity"], "holdout_nll": summary.get("nll", 0.0)}

    def _sft_buffer(self) -> None:
        if len(self.buffer) == 0:
            for i, ex in enumerate(self.train.examples):
                self.buffer.add(i, self.tokenize(ex.answer), True)

    # ------------------------------------------------------------------ driver

    def _finish_round(self, split_metrics: dict[str, dict[str, float]]) -> None:
        step = int(jax.device_get(self.state.step))
        for split, values in split_metrics.items():
            if values:
                self.writer.write(self.round, step, split, values)
        self.round += 1
        self.step_in_round = 0
        self.round_metrics = {}
        self.save()
        if jax.process_index() == 0:
            metrics_log.plot_learning_curve(self.model_dir, self.writer.records)

    def run(self, preemption: Preemption) -> None:
        self.preemption = preemption
        loop = self.loop
        last_round = 0 if loop.method == "zero_shot" else loop.num_rounds
        if self.round == 0:
            warm = self.warmup() if loop.warmup_task and loop.warmup_epochs else {}
            self._finish_round(
                {"train": warm, "test": self.evaluate() if loop.eval_initial else {}}
            )
        while self.round <= last_round:
            if self.step_in_round == 0 and "sample" not in self.round_metrics:
                if loop.method == "sft":
                    self._sft_buffer()
                    self.round_metrics["sample"] = {"buffer_size": len(self.buffer)}
                else:
                    self.round_metrics["sample"] = self.sample()
            train_metrics = {**self.round_metrics["sample"], **self.train_round()}
            if preemption.should_stop():
                self.save()
                raise Preempted()
            self._finish_round({"train": train_metrics, "test": self.evaluate()})
            if preemption.should_stop():
                raise Preempted()


# --------------------------------------------------------------------------- entry point


@gin.configurable(module="hir_jax.hir")
def run(
    model_dir: str = gin.REQUIRED,
    task: str = gin.REQUIRED,
    seed: int = 0,
    model_name: str = "custom",
    model_config: T5Config | None = None,
    initial_checkpoint: str | None = None,
    vocabulary: Callable[[], Any] | None = None,
    loop: LoopConfig | None = None,
    optimizer: Optimizer | None = None,
    loss: LossConfig | None = None,
    partitioner: Partitioner | None = None,
) -> dict[str, Any]:
    """Runs (or resumes) one experiment into ``model_dir``; returns the final test metrics.

    Restore order: the latest checkpoint in ``model_dir``, then ``initial_checkpoint``
    (an HF or T5X directory), then a fresh initialisation from ``seed``. When resuming,
    only the config of ``initial_checkpoint`` is read, not its weights.
    """
    loop = loop or LoopConfig()
    task = bigbench.task_name(bigbench.resolve_task(task))
    partitioner = partitioner or make_partitioner()
    optimizer = optimizer or make_optimizer()
    loss = loss or LossConfig()
    if model_config is None and initial_checkpoint is None:
        raise ValueError("set a model config (a gin_configs/models file) or INITIAL_CHECKPOINT")
    if jax.process_index() != 0:  # one host reports; the others keep quiet
        metrics_log.set_progress_enabled(False)
    chief = jax.process_index() == 0
    with (
        StateCheckpointer(model_dir, max_to_keep=loop.keep_checkpoints) as checkpointer,
        metrics_log.MetricsWriter(model_dir, active=chief) as writer,
    ):
        resuming = checkpointer.latest() is not None
        model_config, params, vocab = _model_and_vocabulary(
            model_config, initial_checkpoint, vocabulary, seed, weights=not resuming
        )
        if chief:
            (as_path(model_dir) / "config.gin").write_text(gin.config_str())
            metrics_log.write_run_info(
                model_dir, task=task, method=loop.method, seed=seed, model=model_name,
                initial_checkpoint=initial_checkpoint or "",
            )  # fmt: skip
        hir = HIRLoop(
            model_dir=model_dir,
            task=task,
            config=model_config,
            params=params,
            vocabulary=vocab,
            loop=loop,
            optimizer=optimizer,
            loss=loss,
            partitioner=partitioner,
            seed=seed,
            writer=writer,
            checkpointer=checkpointer,
        )
        if not hir.restore_latest():
            writer.reset()
        with Preemption() as preemption:
            hir.run(preemption)
        if chief:
            metrics_log.mark_done(model_dir)
        final = [r for r in writer.records if r["split"] == "test"]
    return final[-1] if final else {}


def _model_and_vocabulary(
    config: T5Config | None,
    initial_checkpoint: str | None,
    vocabulary: Callable[[], Any] | None,
    seed: int,
    weights: bool,
) -> tuple[T5Config, Any, Any]:
    """(config, params, vocabulary) from INITIAL_CHECKPOINT or the gin bindings.

    ``weights=False`` (resuming: our checkpoint has them) reads only the config and
    returns ``params=None``; otherwise params come from the checkpoint, or from a fresh
    initialisation with ``seed``.
    """
    params = vocab = None
    if initial_checkpoint and not weights:
        config = load_config(initial_checkpoint, config)
    elif initial_checkpoint:
        config, params = load_checkpoint(initial_checkpoint, config, lazy=True)
    if initial_checkpoint:
        try:
            vocab = load_vocabulary(initial_checkpoint)
        except FileNotFoundError:
            vocab = None
    if vocab is None:
        if vocabulary is None:
            raise ValueError(
                "no vocabulary: bind run.vocabulary or use a checkpoint with spiece.model"
            )
        vocab = vocabulary()
    if vocab.vocab_size > config.vocab_size:
        raise ValueError(
            f"vocabulary has {vocab.vocab_size} ids but the model only {config.vocab_size}"
        )
    if params is None and weights:
        params = init_params(config, jax.random.key(seed))
    return config, params, vocab
