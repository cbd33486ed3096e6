"""Gin names for the pieces the run files bind (imported by run.py and notebooks).

Importing the modules registers their ``@gin.configurable``s; this module adds the model
config under one gin-friendly name, so gin files never touch model code.
"""

from __future__ import annotations

import gin

from hir_jax import feedback, loop, methods, partitioning, runner, settings, train  # noqa: F401
from hir_jax.model.configs import T5Config, get_config
from tasks import bigbench, registry, vocab  # noqa: F401  (registers hir_tasks.*)


@gin.configurable(module="hir_jax.model")
def model_config(
    size: str = gin.REQUIRED,
    vocab_size: int | None = None,
    dtype: str | None = None,
    param_dtype: str | None = None,
    dropout_rate: float | None = None,
    remat: bool | None = None,
) -> T5Config:
    """A named size (tiny, small, base, large, xl, xxl) with optional overrides: ``dtype``
    (activations), ``param_dtype`` (weights, and so the optimizer's moments)."""
    S = settings
    S.check(
        "hir_jax.model.model_config", locals(),
        vocab_size=S.POSITIVE_INT.or_none(), dropout_rate=S.FRACTION.or_none(),
    )  # fmt: skip
    overrides = dict(
        vocab_size=vocab_size,
        dtype=dtype,
        param_dtype=param_dtype,
        dropout_rate=dropout_rate,
        remat=remat,
    )
    return get_config(size, **{k: v for k, v in overrides.items() if v is not None})
