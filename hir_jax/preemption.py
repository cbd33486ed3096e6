"""SIGTERM (how a TPU VM or a cluster preempts a job) as a flag the loop checks at safe
points: after each sampling or evaluation batch and after each train step."""

from __future__ import annotations

import signal
from typing import Any

from hir_jax import metrics_log
from hir_jax.partitioning import any_process


class Preempted(Exception):
    """Raised after the state was saved because of SIGTERM."""


class Preemption:
    """A context manager that turns SIGTERM into ``requested``; ``should_stop`` asks all
    hosts, so they save and stop after the same step."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> Preemption:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a notebook worker): no handler
            self._previous = None
        return self

    def should_stop(self) -> bool:
        """Whether any host got SIGTERM; all hosts agree (a collective on multi-host)."""
        return any_process(self.requested)

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        metrics_log.console("SIGTERM received: saving a checkpoint at the next safe point")

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
