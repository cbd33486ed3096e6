"""What PPO and GRPO share: on-policy rollouts under the sampling instruction, the task
reward, a frozen reference, a scoring pass before the first update, and a clipped-ratio
train step (``hir_jax.rl_step``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import numpy as np

from hir_jax import relabel, settings
from hir_jax.methods.base import ExampleContext, Method, Sample, gold_example
from hir_jax.rl_step import Objective, make_rl_step, make_rollout_scorer

if TYPE_CHECKING:
    from hir_jax.partitioning import Partitioner
    from hir_jax.train import LossConfig, Optimizer, StateExtras

Reward = Literal["judge", "constant"]


def rewards(items: Sequence[Sample], reward: Reward) -> np.ndarray:
    """Each output's score: the judge's 1/0, and 0 for an output cut without EOS;
    ``"constant"`` (the ablation whose reward says nothing): 1 for every output."""
    if reward not in ("judge", "constant"):
        raise ValueError(f"reward must be 'judge' or 'constant', got {reward!r}")
    if reward == "constant":
        return np.ones(len(items))
    return np.asarray([float(s.finished and s.correct) for s in items], np.float64)


def padded(rows: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Ragged per-item arrays as ``[N, Lmax]`` float64 and their 0/1 mask."""
    length = max((len(r) for r in rows), default=0)
    out = np.zeros((len(rows), max(length, 1)))
    mask = np.zeros_like(out)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
        mask[i, : len(r)] = 1.0
    return out, mask


def unpad(x: np.ndarray, rows: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [x[i, : len(r)].astype(np.float32) for i, r in enumerate(rows)]


class OnPolicy(Method):
    """Base of the RL methods. Subclasses set ``objective()``, ``annotate`` and their
    ``state_extras``, and have the fields ``epochs``, ``reward`` and ``dropout``."""

    on_policy: ClassVar[bool] = True
    with_values: ClassVar[bool] = False
    dropout: bool = False

    def __post_init__(self) -> None:
        """Checks the fields every RL method has (subclasses call it first)."""
        settings.check(
            self.gin_name(), self, epochs=settings.POSITIVE_INT.or_none(),
            reward=settings.one_of("judge", "constant"),
        )  # fmt: skip

    def loss(self, base: LossConfig) -> LossConfig:
        # What the batches are built for (the rollout's tokens under the sampling
        # instruction); the objective itself is the method's.
        return dataclasses.replace(base, kind="nll", label_smoothing=0.0, kl_coef=0.0)

    def example(self, item: Sample, context: ExampleContext) -> relabel.RelabeledExample:
        """The rollout under the sampling instruction; its actions are the output's tokens
        and its EOS, which an output cut at the token limit does not have."""
        ex = gold_example(item, context.question)
        return ex if item.finished else dataclasses.replace(ex, target=ex.target[:-1])

    def objective(self) -> Objective:
        raise NotImplementedError

    def make_scorer(self, model: Any, partitioner: Partitioner) -> Any:
        return make_rollout_scorer(model, partitioner, self.state_extras(), self.with_values)

    def make_train_step(
        self,
        model: Any,
        optimizer: Optimizer,
        partitioner: Partitioner,
        loss: LossConfig,
        num_microbatches: int,
        extras: StateExtras | None = None,
    ) -> Any:
        return make_rl_step(
            model, optimizer, partitioner, self.objective(), extras or self.state_extras(),
            num_microbatches=num_microbatches, dropout=self.dropout,
        )  # fmt: skip
