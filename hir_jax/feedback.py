"""Feedback on outputs: the judge (is this output correct?) and the rates the loop logs.

The default judge is the exact match of HIR_REFERENCE.md (``tasks.metrics.is_correct``:
spaces and "." removed, lower-cased). Any callable ``(output_text, target_text) -> bool``
can replace it: ``hir_jax.runner.run.judge = @my_tasks.my_judge`` in gin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import gin

from tasks import metrics

Judge = Callable[[str, str], bool]


@gin.configurable(module="hir_jax.feedback")
def exact_match(output: str, target: str) -> bool:
    """The released code's verdict: equal after ``tasks.metrics.normalize``."""
    return metrics.is_correct(output, target)


def score(
    outputs: Sequence[str],
    answers: Sequence[str],
    num_options: Sequence[int],
    judge: Judge = exact_match,
) -> tuple[list[bool], dict[str, float]]:
    """Per-output verdicts, plus ``accuracy`` and ``format_error_rate`` (multiple-choice
    outputs that are not one of the valid labels "(A)", "(B)", ...)."""
    if not len(outputs) == len(answers) == len(num_options):
        raise ValueError(
            f"{len(outputs)} outputs, {len(answers)} answers, {len(num_options)} num_options"
        )
    correct = [bool(judge(o, a)) for o, a in zip(outputs, answers, strict=True)]
    errors = sum(
        not metrics.is_valid_option(o, k) for o, k in zip(outputs, num_options, strict=True)
    )
    n = max(len(outputs), 1)
    return correct, {"accuracy": sum(correct) / n, "format_error_rate": errors / n}


def per_task(tasks: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """Accuracy of each task (``"<task>/accuracy"``) and their mean (``"accuracy"``), for a
    mixture's test split."""
    names = list(dict.fromkeys(tasks))
    out = {}
    for name in names:
        verdicts = [c for t, c in zip(tasks, correct, strict=True) if t == name]
        out[f"{name}/accuracy"] = sum(verdicts) / len(verdicts)
    out["accuracy"] = sum(out.values()) / len(names)
    return out
