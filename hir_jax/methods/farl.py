"""FARL (final-answer RL, expert iteration): train only on the samples that were correct,
under the sampling instruction, with the plain NLL."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import gin
import numpy as np

from hir_jax import relabel
from hir_jax.methods.base import Method, Sample, gold_example

if TYPE_CHECKING:
    from hir_jax.data import Example
    from hir_jax.train import LossConfig


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class FARL(Method):
    """Keeps the correct samples; each is a whole-output NLL example."""

    name: ClassVar[str] = "farl"

    def loss(self, base: LossConfig) -> LossConfig:
        return dataclasses.replace(base, kind="nll")

    def collect(self, samples: Sequence[Sample]) -> list[Sample]:
        return [s for s in samples if s.correct]

    def example(
        self,
        item: Sample,
        question: Example,
        rng: np.random.Generator,
        detokenize: Callable[[Sequence[int]], str],
    ) -> relabel.RelabeledExample:
        return gold_example(item, question)
