"""Generation over a whole split: prompts in fixed-size padded batches, outputs back on
every host, with a preemption check after each batch."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hir_jax import decoding, features, metrics_log
from hir_jax.partitioning import Partitioner, to_host


def generate_split(
    model: Any,
    params: Any,
    prompt_ids: Sequence[Sequence[int]],
    cfg: decoding.SamplingConfig,
    rng: Any,
    *,
    batch_size: int,
    partitioner: Partitioner,
    check: Callable[[], None],
    desc: str,
    keep_eos: bool = False,
) -> tuple[list[list[list[int]]], float]:
    """Outputs ``[prompt][sample] -> ids`` (no EOS unless ``keep_eos``: then an output
    that reached EOS ends with it), and new tokens per second.

    Every batch has ``batch_size`` rows rounded up to the data-parallel size (one
    compiled shape per length bucket); a prompt's samples depend only on ``rng`` and its
    index, not on the batching. ``check()`` runs after each batch (it raises to stop).
    """
    out: list[list[list[int]]] = []
    tokens, start = 0, time.perf_counter()
    rows = features.padded_rows(batch_size, partitioner.data_size)
    starts = range(0, len(prompt_ids), batch_size)
    for first in metrics_log.progress(starts, desc=desc, unit="batch"):
        idx = np.arange(first, min(first + batch_size, len(prompt_ids)))
        enc, n = features.pad_sequences([prompt_ids[i] for i in idx], batch_multiple=rows)
        row_ids = np.zeros(enc.shape[0], np.int32)
        row_ids[:n] = idx
        res = to_host(decoding.generate(model, params, enc, rng, cfg, row_ids, partitioner))
        tokens += int(np.sum(res.lengths[:n]))
        out.extend(
            [decoding.output_ids(res, r, k, keep_eos) for k in range(cfg.num_samples)]
            for r in range(n)
        )
        check()
    return out, tokens / max(time.perf_counter() - start, 1e-9)
