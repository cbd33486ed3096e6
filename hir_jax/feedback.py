"""Feedback on sampled outputs: exact match after the official normalisation.

The normalisation and metric live in ``tasks.metrics`` (one source of truth); this module
adapts them to the HIR loop, which needs the per-output verdicts as well as the rates.
"""

from __future__ import annotations

from collections.abc import Sequence

from tasks import metrics


def score(
    outputs: Sequence[str], answers: Sequence[str], num_options: Sequence[int]
) -> tuple[list[bool], dict[str, float]]:
    """Per-output correctness, plus accuracy and the format-error rate (multiple-choice
    outputs that are not one of the valid labels "(A)", "(B)", ...)."""
    correct, summary = metrics.judge(outputs, answers, num_options)
    n = max(len(outputs), 1)
    return correct, {
        "accuracy": float(summary["accuracy"]),
        "format_error_rate": summary["format_errors"] / n,
    }
