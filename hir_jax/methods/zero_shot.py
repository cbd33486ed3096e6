"""Zero-shot ("no training"): the initial model, evaluated greedily on the test split."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import gin

from hir_jax.methods.base import Method


@gin.configurable(module="hir_jax.methods")
@dataclasses.dataclass(frozen=True)
class ZeroShot(Method):
    """Trains nothing, samples nothing and keeps no optimizer state."""

    name: ClassVar[str] = "zero_shot"
    trains: ClassVar[bool] = False
    samples: ClassVar[bool] = False
