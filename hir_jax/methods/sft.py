"""SFT: supervised training on the gold answers of the training split (no sampling)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import gin

from hir_jax.methods.base import Items, PlainNLL, Questions, Sample, Tokenize, gold_answers


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class SFT(PlainNLL):
    """Each round: ``LoopConfig.epochs`` epochs of NLL on the gold answers. Nothing is
    sampled and the replay buffer stays empty."""

    name: ClassVar[str] = "sft"
    samples: ClassVar[bool] = False

    def training_items(self, buffer: Items, train: Questions, tokenize: Tokenize) -> list[Sample]:
        return gold_answers(train, tokenize)
