"""The rounds, wiring only: data -> sample -> judge -> method -> train epochs -> evaluate.

``Loop.run`` takes the train state and the ``LoopState`` (both restored by
``hir_jax.runner`` from MODEL_DIR, or fresh) and runs round 0 (the optional warm-up and
the evaluation of the initial model) and then ``LoopConfig.num_rounds`` rounds of:

1. sampling K outputs per training question under the "correct answer" instruction,
   when the method samples (``decoding.generate`` over the split, ``generation``);
2. judging them (``feedback.score`` with the run's judge);
3. ``method.collect``: what joins the replay buffer (an on-policy method's buffer holds
   this round's samples only);
4. ``method.training_items`` (capped at ``buffer_cap_factor`` x N_train, with the method's
   held-out fraction); for a method with a scorer (the RL methods) one scoring pass over
   them with the round's starting state and ``method.annotate`` (per-token values kept in
   the loop state); then ``LoopConfig.epochs`` (or the method's) epochs of the method's
   train step over examples that ``method.example`` builds afresh every epoch
   (``epochs.train_epochs``);
5. greedy evaluation on the test split: accuracy (per task and their mean for a
   mixture), predictions under MODEL_DIR/predictions.

A checkpoint (train state + loop state) is written at the end of every round, every
``checkpoint_every_steps`` train steps and at a preemption, which is checked after each
sampling or evaluation batch and each train step; a resumed run ends with the same
metrics as an uninterrupted one. The loop names no method: what differs between methods
is the ``Method`` object's.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import gin
import jax
import numpy as np

from hir_jax import decoding, features, feedback, metrics_log, settings
from hir_jax.checkpoints.state import StateCheckpointer, checkpoint_id
from hir_jax.data import Example, TaskData, TextCodec
from hir_jax.epochs import check_finite, train_epochs
from hir_jax.generation import generate_split
from hir_jax.loop_state import LoopState, ReplayBuffer
from hir_jax.methods.base import ExampleContext, Method, Sample, gold_answers, gold_example
from hir_jax.paths import as_path
from hir_jax.preemption import Preempted, Preemption
from hir_jax.special_ids import EOS_ID
from hir_jax.train import LossConfig, freeze_reference, make_eval_step, summarize_eval

if TYPE_CHECKING:
    from hir_jax.runner import Setup

_SAMPLE, _TRAIN, _HOLDOUT, _WARMUP = 0, 1, 2, 3
_HOLDOUT_EPOCH = 2**31 - 1  # example seed of the held-out items
_SCORE_EPOCH = 2**31 - 2  # example seed of the scoring pass


@gin.configurable(module="hir_jax.loop")
@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Every number of the reference's loop that is not a method's; defaults are the
    released code's.

    ``num_rounds`` counts sample/train/evaluate rounds after round 0 (the optional
    warm-up and the evaluation of the initial model, ``eval_initial``). The released
    ``run.sh`` evaluates the original model, samples and trains once, then repeats
    sample -> train -> evaluate 30 more times: 31 training rounds and 32 evaluations,
    ``num_rounds=31`` here.

    ``dedup`` is the replay buffer's rule for repeated outputs: ``"call"`` (the released
    sampler's ``list(set(outputs))``) drops repeats among one question's K samples of one
    round and keeps everything else, so the buffer grows by every round's samples;
    ``"run"`` drops a (question, output) pair seen in any earlier round.
    """

    num_rounds: int = 31  # 0: round 0 only (the warm-up and/or the initial evaluation)
    eval_initial: bool = True
    # Online sampling (reference: T=1, top-k 50, top-p 1, 256 new tokens; K=1 released, 4 paper).
    samples_per_query: int = 1
    temperature: float = 1.0
    top_k: int = 50  # 0: off; temperature 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    sample_batch_size: int = 64
    # Offline training.
    epochs: int = 10
    batch_size: int = 64
    num_microbatches: int = 1
    buffer_cap_factor: float = 4.0
    dedup: Literal["call", "run"] = "call"
    # Optional SFT warm-up before round 0 on another task's gold answers (e.g. so that a
    # random model learns the "(A)" answer format before HIR on the target task).
    warmup_task: str | None = None
    warmup_epochs: int = 0  # 0: no warm-up
    # Evaluation.
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 64
    # Inputs longer than this (in tokens, EOS included) are an error.
    max_input_length: int = 2048
    # Data: the SeqIO splits, and limits per task for quick runs (None: the whole split).
    train_split: str = "train"
    test_split: str = "test"
    max_train_examples: int | None = None
    max_test_examples: int | None = None
    # Checkpoints.
    checkpoint_every_steps: int = 0  # 0: at the end of each round (and at SIGTERM) only
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        S = settings
        S.check(
            "hir_jax.loop.LoopConfig", self,
            num_rounds=S.COUNT, samples_per_query=S.POSITIVE_INT, temperature=S.NON_NEGATIVE,
            top_k=S.COUNT, top_p=S.interval(0.0, 1.0, open_low=True),
            max_new_tokens=S.POSITIVE_INT, sample_batch_size=S.POSITIVE_INT,
            epochs=S.POSITIVE_INT, batch_size=S.POSITIVE_INT, num_microbatches=S.POSITIVE_INT,
            buffer_cap_factor=S.POSITIVE, dedup=S.one_of("call", "run"),
            warmup_epochs=S.COUNT, eval_max_new_tokens=S.POSITIVE_INT,
            eval_batch_size=S.POSITIVE_INT, max_input_length=S.POSITIVE_INT,
            max_train_examples=S.POSITIVE_INT.or_none(),
            max_test_examples=S.POSITIVE_INT.or_none(),
            checkpoint_every_steps=S.COUNT, keep_checkpoints=S.POSITIVE_INT,
        )  # fmt: skip
        S.require(
            self.batch_size % self.num_microbatches == 0,
            "hir_jax.loop.LoopConfig", "batch_size", self.batch_size,
            f"a multiple of num_microbatches ({self.num_microbatches})",
        )  # fmt: skip

    def check_mesh(self, data_size: int) -> None:
        """Each microbatch's rows must split evenly over the mesh's data axis."""
        rows = self.num_microbatches * data_size
        settings.require(
            self.batch_size % rows == 0,
            "hir_jax.loop.LoopConfig", "batch_size", self.batch_size,
            f"a multiple of num_microbatches x the data-parallel size ({self.num_microbatches} "
            f"x {data_size} = {rows})",
        )  # fmt: skip

    @property
    def warms_up(self) -> bool:
        return bool(self.warmup_task and self.warmup_epochs)

    def sampling(self) -> decoding.SamplingConfig:
        """The round's sampling (``temperature=0``: greedy, K equal outputs)."""
        return decoding.SamplingConfig(
            greedy=self.temperature == 0,
            temperature=self.temperature or 1.0,
            top_k=self.top_k,
            top_p=self.top_p,
            num_samples=self.samples_per_query,
            max_new_tokens=self.max_new_tokens,
        )

    def greedy(self) -> decoding.SamplingConfig:
        return decoding.SamplingConfig(
            greedy=True, top_k=0, max_new_tokens=self.eval_max_new_tokens
        )


@dataclasses.dataclass(frozen=True)
class Split:
    """A split's examples and their tokenized sampling prompts."""

    examples: Sequence[Example]
    prompt_ids: Sequence[Sequence[int]]


@dataclasses.dataclass
class Loop:
    """The parts of one run that the rounds wire together (built by ``runner.run``)."""

    spec: Setup  # method, loop config, losses, optimizer, mesh
    model: Any
    codec: TextCodec
    data: TaskData
    train: Split
    test: Split
    warmup: Sequence[Example]
    seed: int
    model_dir: str
    writer: metrics_log.MetricsWriter
    checkpointer: StateCheckpointer
    identity: dict[str, Any]  # stored beside the loop state (model shape, task, ...)
    judge: feedback.Judge = feedback.exact_match

    def __post_init__(self) -> None:
        self.method: Method = self.spec.method
        self.config: LoopConfig = self.spec.loop
        self.loss, self.partitioner = self.spec.loss, self.spec.partitioner
        self.base_rng = jax.random.key(self.seed)
        self.train_step = self.spec.train_step(self.model) if self.method.trains else None
        self.extras = self.spec.extras
        self.scorer = (
            self.method.make_scorer(self.model, self.partitioner) if self.method.trains else None
        )
        # Held-out perplexity: compiled once per run, reused every round.
        self.eval_step = make_eval_step(self.model, self.partitioner, loss=self.loss)
        self.state: Any = None
        self.progress = LoopState()

    # ------------------------------------------------------------------ driver

    def run(self, state: Any, progress: LoopState, preemption: Preemption) -> None:
        """Runs the remaining rounds from ``progress``; raises ``Preempted`` after saving."""
        self.state, self.progress = state, progress
        cfg = self.config
        last_round = cfg.num_rounds if self.method.trains else 0
        if progress.round == 0:
            warm = self.warm_up(preemption) if cfg.warms_up else {}
            if cfg.warms_up and self.extras.reference:  # the policy the method starts from
                self.state = freeze_reference(self.state)
            test = self.evaluate(preemption) if cfg.eval_initial else {}
            self._finish_round({"train": warm, "test": test})
        while progress.round <= last_round:
            if self.method.samples and progress.sample_metrics is None:
                progress.sample_metrics = self.sample(preemption)
            train = {**(progress.sample_metrics or {}), **self.train_round(preemption)}
            self._finish_round({"train": train, "test": self.evaluate(preemption)})

    def _finish_round(self, split_metrics: dict[str, dict[str, float]]) -> None:
        step = int(jax.device_get(self.state.step))
        for split, values in split_metrics.items():
            if values:
                self.writer.write(self.progress.round, step, split, values)
        self.progress.next_round()
        self.save()
        if jax.process_index() == 0:
            metrics_log.plot_learning_curve(self.model_dir, self.writer.records)

    # ------------------------------------------------------------------ checkpoints

    def save(self, state: Any = None) -> None:
        """Checkpoints the train state (``state``, else the current one) and loop state."""
        if state is not None:
            self.state = state
        ckpt = checkpoint_id(self.progress.round, self.progress.step_in_round)
        if self.checkpointer.latest() == ckpt:
            return  # e.g. preempted while sampling: the round's start is saved already
        r, s = self.progress.round, self.progress.step_in_round
        check_finite(self.state, f"before the checkpoint of round {r}, step {s}")
        self.checkpointer.save(ckpt, self.state, {**self.progress.to_json(), **self.identity})

    def _check(self, preemption: Preemption) -> None:
        """At a safe point: on SIGTERM (any host), save and raise ``Preempted``."""
        if preemption.should_stop():
            self.save()
            raise Preempted()

    def _rng(self, *path: int) -> jax.Array:
        key = self.base_rng
        for p in path:
            key = jax.random.fold_in(key, p)
        return key

    # ------------------------------------------------------------------ phases

    def _generate(
        self, split: Split, cfg: decoding.SamplingConfig, rng: jax.Array, batch: int,
        preemption: Preemption, desc: str, keep_eos: bool = False,
    ) -> tuple[list[list[list[int]]], float]:  # fmt: skip
        return generate_split(
            self.model, self.state.params, split.prompt_ids, cfg, rng,
            batch_size=batch, partitioner=self.partitioner,
            check=lambda: self._check(preemption), desc=desc, keep_eos=keep_eos,
        )  # fmt: skip

    def _score(self, examples: Sequence[Example], texts: Sequence[str]) -> Any:
        return feedback.score(
            texts, [ex.answer for ex in examples], [ex.num_options for ex in examples], self.judge
        )

    def sample(self, preemption: Preemption) -> dict[str, float]:
        """Online sampling for this round; what the method collects joins the buffer."""
        outputs, rate = self._generate(
            self.train, self.config.sampling(), self._rng(self.progress.round, _SAMPLE),
            self.config.sample_batch_size, preemption, "sample", keep_eos=True,
        )  # fmt: skip
        flat = [
            (i, o[:-1] if o and o[-1] == EOS_ID else o, bool(o) and o[-1] == EOS_ID)
            for i, outs in enumerate(outputs)
            for o in outs
        ]
        texts = [self.codec.decode(o) for _, o, _ in flat]
        correct, summary = self._score([self.train.examples[i] for i, _, _ in flat], texts)
        samples = [
            Sample(i, tuple(o), ok, done) for (i, o, done), ok in zip(flat, correct, strict=True)
        ]
        dedup = self.config.dedup
        if self.method.on_policy:  # this round's samples only, every one of them
            self.progress.buffer, dedup = ReplayBuffer(), "none"
        added = self.progress.buffer.extend(self.method.collect(samples), dedup)
        return {
            "sampled_correct_rate": summary["accuracy"],
            "sampled_format_error_rate": summary["format_error_rate"],
            "new_samples": added,
            "buffer_size": len(self.progress.buffer),
            "sample_tokens_per_s": rate,
        }

    def _batch(
        self, items: Sequence[Sample], positions: Sequence[int], epoch: int
    ) -> dict[str, np.ndarray]:
        """One train batch: ``method.example`` of each item (its seed: seed, round, epoch,
        its position in the round's items), padded to ``batch_size`` rows."""
        examples = []
        for item, pos in zip(items, positions, strict=True):
            rng = np.random.default_rng([self.seed, self.progress.round, epoch, int(pos)])
            context = ExampleContext(
                self.train.examples[item.query], rng, self.codec.decode, self.codec.encode
            )
            examples.append(self.method.example(item, context))
        return self._features(examples, self.loss)

    def _features(self, examples: Sequence[Any], loss: LossConfig) -> dict[str, np.ndarray]:
        cfg = self.config
        return features.batch(
            examples, self.codec.encode, loss, rows=cfg.batch_size,
            max_encoder_len=cfg.max_input_length + cfg.max_new_tokens + 1,
            max_decoder_len=cfg.max_new_tokens + 1,
        )  # fmt: skip

    def _train(
        self, step_fn: Any, items: np.ndarray, epochs: int, stream: int, make_batch: Any,
        preemption: Preemption, desc: str, supervised: bool = True,
    ) -> dict[str, float]:  # fmt: skip
        self.state, out = train_epochs(
            self.state, step_fn, items, epochs=epochs, batch_size=self.config.batch_size,
            seed_path=[self.seed, self.progress.round, stream], make_batch=make_batch,
            progress=self.progress, checkpoint_every=self.config.checkpoint_every_steps,
            save=self.save, should_stop=preemption.should_stop, desc=desc,
            supervised=supervised,
        )  # fmt: skip
        return out

    def train_round(self, preemption: Preemption) -> dict[str, float]:
        """E epochs over this round's items (capped), and the held-out perplexity."""
        items = self.method.training_items(
            self.progress.buffer.samples, self.train.examples, self.codec.encode
        )
        gen = np.random.default_rng([self.seed, self.progress.round, _HOLDOUT])
        order = gen.permutation(len(items))
        n_hold = int(self.method.holdout_fraction * len(order))
        cap = int(self.config.buffer_cap_factor * len(self.train.examples))
        holdout, chosen = order[:n_hold], order[n_hold:][:cap]

        def make_batch(positions: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
            return self._batch([items[p] for p in positions], positions, epoch)

        make_train_batch, round_metrics = make_batch, {}
        if self.scorer is not None:
            per_item, round_metrics = self._round_data(items, chosen, make_batch)

            def make_train_batch(positions: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
                batch = make_batch(positions, epoch)
                return features.add_token_features(batch, [per_item[int(p)] for p in positions])

        epochs = self.config.epochs if self.method.epochs is None else self.method.epochs
        out = self._train(
            self.train_step, chosen, epochs, _TRAIN, make_train_batch, preemption,
            f"train r{self.progress.round}", supervised=self.scorer is None,
        )  # fmt: skip
        out.update(round_metrics)
        if len(holdout):
            out.update(self._holdout_perplexity(holdout, make_batch))
        return out

    def _round_data(
        self, items: Sequence[Sample], chosen: np.ndarray, make_batch: Any
    ) -> tuple[dict[int, dict[str, np.ndarray]], dict[str, float]]:
        """The method's per-item arrays of this round: the scorer's pass over the chosen
        items with the round's starting state, then ``method.annotate``; computed once
        and kept in the loop state (a resumed round reads them back)."""
        if self.progress.round_data is None:
            scores: list[dict[str, np.ndarray]] = []
            for first in range(0, len(chosen), self.config.batch_size):
                positions = chosen[first : first + self.config.batch_size]
                batch = make_batch(positions, _SCORE_EPOCH)
                out = self.scorer(self.state, batch)
                lengths = np.sum(batch[features.DECODER_WEIGHTS] > 0, axis=1)
                scores.extend(
                    {k: v[r, : lengths[r]] for k, v in out.items()} for r in range(len(positions))
                )
            per_item, method_state, metrics = self.method.annotate(
                [items[int(p)] for p in chosen], scores, dict(self.progress.method_state)
            )
            self.progress.method_state = method_state
            self.progress.round_data = {
                "positions": [int(p) for p in chosen],
                "values": [{k: np.asarray(v).tolist() for k, v in d.items()} for d in per_item],
                "metrics": metrics,
            }
        data = self.progress.round_data
        per_position = {
            p: {k: np.asarray(v, np.float32) for k, v in d.items()}
            for p, d in zip(data["positions"], data["values"], strict=True)
        }
        return per_position, dict(data["metrics"])

    def _holdout_perplexity(self, holdout: np.ndarray, make_batch: Any) -> dict[str, float]:
        results = []
        for first in range(0, len(holdout), self.config.batch_size):
            batch = make_batch(holdout[first : first + self.config.batch_size], _HOLDOUT_EPOCH)
            results.append(self.eval_step(self.state.params, batch))
        summary = summarize_eval(results)
        return {"holdout_perplexity": summary["perplexity"], "holdout_nll": summary.get("nll", 0.0)}

    def warm_up(self, preemption: Preemption) -> dict[str, float]:
        """SFT on ``warmup_task``'s gold answers: plain NLL without label smoothing, the
        gin-bound loss's other settings (normalisation, ``logits_chunk``)."""
        loss = self.spec.warmup_loss
        step = self.spec.supervised_step(self.model, loss)
        items = gold_answers(self.warmup, self.codec.encode)

        def make_batch(positions: np.ndarray, epoch: int) -> dict[str, np.ndarray]:
            chosen = [items[p] for p in positions]
            return self._features([gold_example(s, self.warmup[s.query]) for s in chosen], loss)

        out = self._train(
            step, np.arange(len(items)), self.config.warmup_epochs, _WARMUP, make_batch,
            preemption, "warm-up",
        )  # fmt: skip
        return {"warmup_nll": out["loss"], "warmup_steps": int(out["train_steps"])}

    def evaluate(self, preemption: Preemption) -> dict[str, float]:
        """Greedy decoding on the test split; accuracy (per task for a mixture)."""
        outputs, rate = self._generate(
            self.test, self.config.greedy(), self._rng(0), self.config.eval_batch_size,
            preemption, "eval",
        )  # fmt: skip
        examples = self.test.examples
        texts = [self.codec.decode(o[0]) for o in outputs]
        correct, summary = self._score(examples, texts)
        if len(self.data.tasks) > 1:
            summary.update(feedback.per_task([ex.task for ex in examples], correct))
        self._write_predictions(examples, texts, correct)
        return {**summary, "decode_tokens_per_s": rate}

    def _write_predictions(
        self, examples: Sequence[Example], texts: Sequence[str], correct: Sequence[bool]
    ) -> None:
        if jax.process_index() != 0:
            return
        path = as_path(self.model_dir) / "predictions" / f"round_{self.progress.round:03d}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps(
                {
                    "task": ex.task,
                    "example_id": ex.example_id,
                    "answer": ex.answer,
                    "output": t,
                    "correct": c,
                }
            )  # fmt: skip
            for ex, t, c in zip(examples, texts, correct, strict=True)
        ]
        path.write_text("\n".join(lines) + "\n")
