"""Epochs of train steps over a list of items: shuffled batches, resumable mid-way.

The loop's train phase, shared by the warm-up and every round: ``epochs`` passes over
``items`` in a fresh order each epoch (``default_rng(seed_path + [epoch])``), the steps
done before an interruption skipped (``LoopState.step_in_round``), a checkpoint every
``checkpoint_every`` steps and at a preemption. Each step's metrics are read one step
late, so the host builds the next batch while the device trains; a non-finite loss or
gradient norm raises ``Diverged`` when it is read, which is always before the state after
it could be saved.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hir_jax import features, metrics_log
from hir_jax.loop_state import LoopState
from hir_jax.preemption import Preempted


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient norm or parameter (``run.py``: exit 3)."""


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def check_finite(state: Any, where: str) -> None:
    """Raises ``Diverged`` unless every floating-point leaf of ``state`` is finite (the
    check before a checkpoint is written: one reduction over the state)."""
    if not bool(jax.device_get(_all_finite(state))):
        raise Diverged(
            f"training diverged: non-finite parameters or optimizer state {where}; not saved, "
            "the latest checkpoint is the last finite one (lower the learning rate)"
        )


def check_step(metrics: dict[str, Any], where: str, supervised: bool) -> None:
    """Raises ``Diverged`` when a step's loss or gradient norm is not finite, or (for a
    supervised loss, ``supervised``) when its gradient is exactly zero while its loss is
    not: then no parameter can change again (a dead network, e.g. after a far too high
    learning rate). An RL objective's gradient can be zero (all advantages 0), so it is
    checked for finiteness only."""
    loss, grad_norm = float(metrics.get("loss", 0.0)), float(metrics.get("grad_norm", 1.0))
    for name, value in (("loss", loss), ("grad_norm", grad_norm)):
        if not np.isfinite(value):
            raise Diverged(f"training diverged: {name} = {value} {where}; {_ADVICE}")
    if supervised and grad_norm == 0.0 and loss != 0.0:
        raise Diverged(
            f"training diverged: grad_norm = 0 with loss {loss:.4g} {where}, so no parameter "
            f"can change any more (a dead network); {_ADVICE}"
        )


_ADVICE = (
    "nothing after the last sound step was saved (lower the learning rate, or clip "
    "gradients: hir_jax.train.make_optimizer.max_grad_norm)"
)


class MetricSums:
    """Running sums of the train step's scalar metrics, read from the device one step late
    (reading a step's metrics waits for that step; the step after it is already queued).
    Each step's metrics pass ``check_step`` when read."""

    KEYS = (
        "loss", "nll", "contrastive", "entropy", "token_accuracy", "grad_norm",
        "policy_loss", "value_loss", "kl", "clip_fraction", "approx_kl",
    )  # fmt: skip

    def __init__(
        self, sums: dict[str, float], round_index: int = 0, supervised: bool = True
    ) -> None:
        self._sums = dict(sums)
        self._round, self._supervised = round_index, supervised
        self._pending: tuple[int, dict[str, jax.Array]] | None = None

    def add(self, metrics: dict[str, jax.Array], step: int = 0) -> None:
        """Queues step ``step``'s metrics (``step``: its number in the round, from 1)."""
        self.read()
        self._pending = (step, metrics)

    def read(self) -> dict[str, float]:
        """The sums over every step added so far."""
        if self._pending is not None:
            (step, m), self._pending = jax.device_get(self._pending), None
            where = f"at round {self._round}, step {step} of the round"
            check_step(m, where, self._supervised)
            for k in self.KEYS:
                if k in m:
                    self._sums[k] = self._sums.get(k, 0.0) + float(m[k])
            self._sums["steps"] = self._sums.get("steps", 0.0) + 1
        return dict(self._sums)


def train_epochs(
    state: Any,
    step_fn: Callable[[Any, dict[str, np.ndarray]], tuple[Any, dict[str, jax.Array]]],
    items: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    seed_path: Sequence[int],
    make_batch: Callable[[np.ndarray, int], dict[str, np.ndarray]],
    progress: LoopState,
    checkpoint_every: int,
    save: Callable[[Any], None],
    should_stop: Callable[[], bool],
    desc: str,
    supervised: bool = True,
) -> tuple[Any, dict[str, float]]:
    """Runs the epochs; returns the new train state and the mean step metrics.

    ``make_batch(chosen_items, epoch)`` builds one batch. ``progress`` (the loop state)
    says how many steps are done and keeps the running sums; it is updated as steps
    finish, so that ``save(state)`` checkpoints a consistent pair. A preemption saves and
    raises ``Preempted``. ``supervised``: the step's loss is a supervised one (see
    ``check_step``).
    """
    total = -(-len(items) // batch_size) * epochs
    sums = MetricSums(progress.train_sums, progress.round, supervised)
    start, examples_done = time.perf_counter(), 0
    bar = metrics_log.progress(total=total, desc=desc, unit="step")
    bar.update(progress.step_in_round)
    counter = 0
    for epoch in range(epochs):
        perm = np.random.default_rng([*seed_path, epoch]).permutation(items)
        for first in range(0, len(items), batch_size):
            counter += 1
            if counter <= progress.step_in_round:
                continue  # done before the interruption
            batch = make_batch(perm[first : first + batch_size], epoch)
            state, metrics = step_fn(state, batch)
            sums.add(metrics, counter)
            examples_done += features.real_examples(batch)
            progress.step_in_round = counter
            bar.update(1)
            stop = should_stop()
            if stop or (checkpoint_every and counter % checkpoint_every == 0 and counter < total):
                progress.train_sums = sums.read()
                save(state)
                if stop:
                    bar.close()
                    raise Preempted()
    bar.close()
    totals = sums.read()
    progress.train_sums = totals
    n = max(totals.get("steps", 0.0), 1.0)
    out = {k: v / n for k, v in totals.items() if k != "steps"}
    out["train_steps"] = totals.get("steps", 0.0)
    out["examples_per_s"] = examples_done / max(time.perf_counter() - start, 1e-9)
    return state, out
