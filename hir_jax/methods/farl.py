"""FARL (final-answer RL, expert iteration): train only on the samples that were correct,
under the sampling instruction, with the plain NLL."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import ClassVar

import gin

from hir_jax.methods.base import PlainNLL, Sample


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class FARL(PlainNLL):
    """Keeps the correct samples; each is a whole-output NLL example."""

    name: ClassVar[str] = "farl"

    def collect(self, samples: Sequence[Sample]) -> list[Sample]:
        return [s for s in samples if s.correct]
