"""What a method is to the loop: what it collects each round, the examples it trains on,
and its loss.

The loop (``hir_jax.loop``) samples K outputs per training question when a method asks
for samples, judges them, and gives the verdicts to ``Method.collect``; what it returns
joins the replay buffer (``loop_state.ReplayBuffer``). Each round ``Method.training_items``
picks what to train on (the buffer, or the gold answers), and every epoch
``Method.example`` turns an item into a training example afresh, with a random generator
the loop seeds from (seed, round, epoch, item) in its ``ExampleContext``. ``Method.loss``
says which loss the gin-bound ``LossConfig`` becomes for this method, and
``Method.make_train_step`` builds its jitted step (a method with its own update, e.g.
PPO, overrides it). All of these except the last are pure, so a method is tested without
running the loop.

A new method is one module under ``hir_jax/methods`` with a gin-configurable subclass,
named by reference in its run file (``METHOD = @hir_jax.methods.FARL()``); the loop
driver never names a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from hir_jax import relabel
from hir_jax.train import StateExtras

if TYPE_CHECKING:
    from hir_jax.data import Example
    from hir_jax.partitioning import Partitioner
    from hir_jax.train import LossConfig, Optimizer

# What ``Method.annotate`` returns: per-item token arrays, the method state for the next
# round, and metrics of the round.
Annotations = tuple[list[dict[str, np.ndarray]], dict[str, float], dict[str, float]]


@dataclasses.dataclass(frozen=True)
class Sample:
    """One output: ``query`` indexes the training split, ``output`` its ids (no EOS),
    ``correct`` the judge's verdict, ``finished`` whether it ended with EOS (not cut at
    the token limit)."""

    query: int
    output: tuple[int, ...]
    correct: bool
    finished: bool = True


@dataclasses.dataclass(frozen=True)
class ExampleContext:
    """What ``Method.example`` needs besides the item: the item's question, the item's
    own random generator for this epoch, ids -> text (special ids skipped) and text ->
    ids (no EOS)."""

    question: Example
    rng: np.random.Generator
    detokenize: Callable[[Sequence[int]], str]
    tokenize: Callable[[str], list[int]]


Items = Sequence[Sample]
Questions = Sequence["Example"]
Tokenize = Callable[[str], list[int]]


class Method:
    """Base class of the loop's methods; subclasses are frozen gin-configurable dataclasses.

    Class attributes: ``name`` (run_info, checkpoints, reports), ``trains`` (False: the
    initial model is evaluated and no optimizer state is kept), ``samples`` (the loop
    samples from the model each round and calls ``collect``), ``on_policy`` (the buffer
    holds only this round's samples, every one of them: no replay, no dedup).

    An RL method also overrides ``state_extras`` (a value head, the frozen reference),
    ``make_scorer`` and ``annotate``: the loop then scores the round's items once with
    the train state of the round's start, and ``annotate`` turns those scores into the
    per-token arrays (advantages, old log-probabilities...) that join every batch of the
    round (``features.add_token_features``), kept in the loop state so that a resumed
    round trains on the same values.
    """

    name: ClassVar[str]
    trains: ClassVar[bool] = True
    samples: ClassVar[bool] = True
    on_policy: ClassVar[bool] = False
    # Fraction of the round's items held out for perplexity logging (HIR's 10%).
    holdout_fraction: float = 0.0
    # Epochs over a round's items (None: LoopConfig.epochs).
    epochs: int | None = None

    @classmethod
    def gin_name(cls) -> str:
        """The name its settings are bound under (``hir_jax.methods.HIR``)."""
        return f"hir_jax.methods.{cls.__name__}"

    def state_extras(self) -> StateExtras:
        """What the train state keeps beside the T5 parameters (nothing by default)."""
        return StateExtras()

    def make_scorer(self, model: Any, partitioner: Partitioner) -> Any:
        """``(state, batch) -> {name: host [B, L] array}``, run over the round's items
        before the first update; None (default): no scoring pass."""
        return None

    def annotate(
        self,
        items: Sequence[Sample],
        scores: Sequence[dict[str, np.ndarray]],
        method_state: dict[str, float],
    ) -> Annotations:
        """Per-item token arrays from the scorer's per-item arrays (each cut to the item's
        target length), the next method state and the round's metrics (pure)."""
        raise NotImplementedError

    def loss(self, base: LossConfig) -> LossConfig:
        """The loss this method trains with, given the gin-bound ``LossConfig``."""
        return base

    def collect(self, samples: Sequence[Sample]) -> list[Sample]:
        """The samples of a round that join the replay buffer."""
        return list(samples)

    def training_items(self, buffer: Items, train: Questions, tokenize: Tokenize) -> list[Sample]:
        """What this round trains on (held-out part included): the buffer by default."""
        return list(buffer)

    def example(self, item: Sample, context: ExampleContext) -> relabel.RelabeledExample:
        """The training example of one item for one epoch (pure)."""
        raise NotImplementedError

    def make_train_step(
        self,
        model: Any,
        optimizer: Optimizer,
        partitioner: Partitioner,
        loss: LossConfig,
        num_microbatches: int,
        extras: StateExtras | None = None,
    ) -> Any:
        """The jitted train step ``(state, batch) -> (state, metrics)`` over a train state
        of layout ``extras`` (default: ``state_extras()``)."""
        from hir_jax.train import make_train_step

        return make_train_step(
            model, optimizer, partitioner, loss=loss, num_microbatches=num_microbatches,
            extras=extras or self.state_extras(),
        )  # fmt: skip


class PlainNLL(Method):
    """A method that trains its items as whole outputs under the sampling instruction
    with the plain (optionally smoothed) NLL: the supervised baselines (FARL, SFT)."""

    def loss(self, base: LossConfig) -> LossConfig:
        return dataclasses.replace(base, kind="nll")

    def example(self, item: Sample, context: ExampleContext) -> relabel.RelabeledExample:
        return gold_example(item, context.question)


def gold_example(item: Sample, question: Example) -> relabel.RelabeledExample:
    """A whole output under the sampling instruction, treated as correct (SFT, FARL and the
    warm-up): the plain supervised example."""
    return relabel.relabel(
        question.query, list(item.output), True, question.answer, 0,
        sub_output=False, relabel_instruction="paper",
    )  # fmt: skip


def gold_answers(train: Sequence[Example], tokenize: Callable[[str], list[int]]) -> list[Sample]:
    """The gold answer of every training question, as items to train on."""
    return [Sample(i, tuple(tokenize(ex.answer)), True) for i, ex in enumerate(train)]
