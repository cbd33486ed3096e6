"""Shared pieces of the benchmarks: timing, a random HF T5 of our config, key=value output."""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hir_jax.model.configs import T5Config  # noqa: E402


def time_fn(fn: Callable[[], Any], warmup: int = 1, repeats: int = 3) -> float:
    """Median wall seconds of ``fn()`` (which must block until its result is ready)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hf_model(cfg: T5Config, seed: int = 0) -> Any:
    """A randomly initialised HF T5ForConditionalGeneration with our config's shapes."""
    import torch
    import transformers

    from hir_jax.checkpoints import config_to_hf

    torch.manual_seed(seed)
    hf_cfg = transformers.T5Config(**{**config_to_hf(cfg), "dropout_rate": 0.0})
    return transformers.T5ForConditionalGeneration(hf_cfg)


def machine() -> str:
    import jax

    return f"{jax.devices()[0].platform} x{jax.device_count()}, {os.cpu_count()} cpus"


def print_summary(**values: float) -> None:
    """The last line of every benchmark: ``key=value`` pairs, comparable run to run."""
    print(
        " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    )
