"""The loop's state: one typed, JSON-serialisable value, checkpointed with the train state.

``LoopState`` holds where the run is (``round``: the next round to finish,
``step_in_round``: train steps already done in it), the replay buffer, this round's
sample metrics once sampling is done, and the running sums of the train metrics. A
checkpoint is exactly this value plus the ``TrainState``; ``identity`` (model shape,
task, method, seed) is stored beside it so that a run never resumes another run's state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from hir_jax.methods.base import Sample


@dataclasses.dataclass
class ReplayBuffer:
    """Outputs that grow across rounds, in the order they were added.

    ``extend(samples, dedup)`` adds one sampling call's outputs: ``"call"`` (the
    released sampler) drops repeats of a question's output within the call only;
    ``"run"`` also drops a (question, output) pair added in any earlier call; ``"none"``
    keeps every output (an on-policy method's K samples of a prompt).
    """

    samples: list[Sample] = dataclasses.field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def extend(self, samples: Iterable[Sample], dedup: str = "call") -> int:
        """Adds one call's samples; returns how many were added."""
        if dedup not in ("call", "run", "none"):
            raise ValueError(f"dedup must be 'call', 'run' or 'none', got {dedup!r}")
        seen = {(s.query, s.output) for s in self.samples} if dedup == "run" else set()
        added = 0
        for s in samples:
            key = (int(s.query), tuple(int(t) for t in s.output))
            if dedup != "none" and key in seen:
                continue
            seen.add(key)
            self.samples.append(Sample(key[0], key[1], bool(s.correct), bool(s.finished)))
            added += 1
        return added

    def to_json(self) -> dict[str, Any]:
        return {
            "query": [s.query for s in self.samples],
            "output": [list(s.output) for s in self.samples],
            "correct": [s.correct for s in self.samples],
            "finished": [s.finished for s in self.samples],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ReplayBuffer:
        finished = d.get("finished", [True] * len(d["query"]))
        rows = zip(d["query"], d["output"], d["correct"], finished, strict=True)
        return cls(
            [Sample(int(q), tuple(int(t) for t in o), bool(c), bool(f)) for q, o, c, f in rows]
        )


@dataclasses.dataclass
class LoopState:
    """Where the run is; see the module doc."""

    round: int = 0
    step_in_round: int = 0
    buffer: ReplayBuffer = dataclasses.field(default_factory=ReplayBuffer)
    sample_metrics: dict[str, float] | None = None
    train_sums: dict[str, float] = dataclasses.field(default_factory=dict)
    # A method's per-item values of this round, fixed before its first update (the RL
    # methods' rollout log-probabilities, values, advantages) and their metrics.
    round_data: dict[str, Any] | None = None
    # What a method carries from round to round (e.g. the adaptive KL coefficient).
    method_state: dict[str, float] = dataclasses.field(default_factory=dict)

    def next_round(self) -> None:
        """Moves to the start of the next round (the buffer and method state carry over)."""
        self.round += 1
        self.step_in_round = 0
        self.sample_metrics = None
        self.train_sums = {}
        self.round_data = None

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "step_in_round": self.step_in_round,
            "buffer": self.buffer.to_json(),
            "sample_metrics": self.sample_metrics,
            "train_sums": self.train_sums,
            "round_data": self.round_data,
            "method_state": self.method_state,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LoopState:
        if "round_metrics" in d:  # written before LoopState existed
            d = {**d, "sample_metrics": d["round_metrics"].get("sample")}
            d["train_sums"] = d["round_metrics"].get("train_sums", {})
        return cls(
            round=int(d["round"]),
            step_in_round=int(d["step_in_round"]),
            buffer=ReplayBuffer.from_json(d["buffer"]),
            sample_metrics=d.get("sample_metrics"),
            train_sums={k: float(v) for k, v in d.get("train_sums", {}).items()},
            round_data=d.get("round_data"),
            method_state={k: float(v) for k, v in d.get("method_state", {}).items()},
        )
