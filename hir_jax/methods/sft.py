"""SFT: supervised training on the gold answers of the training split (no sampling)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, ClassVar

import gin
import numpy as np

from hir_jax import relabel
from hir_jax.methods.base import Method, Sample, gold_answers, gold_example

if TYPE_CHECKING:
    from hir_jax.data import Example
    from hir_jax.train import LossConfig


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class SFT(Method):
    """Each round: ``LoopConfig.epochs`` epochs of NLL on the gold answers. Nothing is
    sampled and the replay buffer stays empty."""

    name: ClassVar[str] = "sft"
    samples: ClassVar[bool] = False

    def loss(self, base: LossConfig) -> LossConfig:
        return dataclasses.replace(base, kind="nll")

    def training_items(
        self,
        buffer: Sequence[Sample],
        train: Sequence[Example],
        tokenize: Callable[[str], list[int]],
    ) -> list[Sample]:
        return gold_answers(train, tokenize)

    def example(
        self,
        item: Sample,
        question: Example,
        rng: np.random.Generator,
        detokenize: Callable[[Sequence[int]], str],
    ) -> relabel.RelabeledExample:
        return gold_example(item, question)
