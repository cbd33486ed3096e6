"""Exact match after the official normalisation, and the format-error count.

``normalize`` reproduces the released HIR ``evaluation.py``: newlines become spaces, then
spaces and "." are removed and the text is lower-cased (both sides). So "(a)." matches
"(A)" but "(A) orange ball." does not.

Pure Python: no TensorFlow, no JAX. The HIR loop uses ``is_correct`` / ``score`` for
feedback; SeqIO tasks use ``exact_match`` (with ``target_postprocessor`` keeping the
number of options so that format errors can be counted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def normalize(text: str) -> str:
    """Lower-case, newlines -> spaces, then drop every space and "."."""
    return str(text).lower().replace("\n", " ").replace(" ", "").replace(".", "")


def is_correct(output: str, answer: str) -> bool:
    """The HIR feedback: ``normalize(output) == normalize(answer)``."""
    return normalize(output) == normalize(answer)


def option_label(i: int) -> str:
    """Label of option ``i`` as the released code writes it: "(" + chr(65 + i) + ")"."""
    return "(" + chr(65 + i) + ")"


def option_labels(num_options: int) -> tuple[str, ...]:
    """The labels "(A)", "(B)", ... of ``num_options`` options."""
    return tuple(option_label(i) for i in range(num_options))


def is_valid_option(output: str, num_options: int) -> bool:
    """Whether ``output`` names one of the options "(A)".. of a multiple-choice example.

    Free-form examples (``num_options == 0``) are always valid.
    """
    if num_options <= 0:
        return True
    return normalize(output) in {normalize(label) for label in option_labels(num_options)}


def judge(
    outputs: Sequence[str],
    answers: Sequence[str],
    num_options: Sequence[int] | None = None,
) -> tuple[list[bool], dict[str, float | int]]:
    """Per-output verdicts (``is_correct``) and their summary, as returned by ``score``."""
    if len(outputs) != len(answers):
        raise ValueError(f"{len(outputs)} outputs but {len(answers)} answers")
    if num_options is not None and len(num_options) != len(outputs):
        raise ValueError(f"{len(outputs)} outputs but {len(num_options)} num_options")
    correct = [is_correct(o, a) for o, a in zip(outputs, answers, strict=True)]
    format_errors = 0
    if num_options is not None:
        format_errors = sum(
            not is_valid_option(o, n) for o, n in zip(outputs, num_options, strict=True)
        )
    n = len(outputs)
    return correct, {
        "accuracy": sum(correct) / n if n else 0.0,
        "num_correct": sum(correct),
        "num_examples": n,
        "format_errors": format_errors,
    }


def score(
    outputs: Sequence[str],
    answers: Sequence[str],
    num_options: Sequence[int] | None = None,
) -> dict[str, float | int]:
    """Accuracy and counts of model outputs against gold answers.

    Returns ``accuracy`` (in [0, 1]), ``num_correct``, ``num_examples`` and
    ``format_errors``: how many outputs of multiple-choice examples (``num_options[i] >
    0``) are not one of the valid labels "(A)".. (always 0 without ``num_options``).
    """
    return judge(outputs, answers, num_options)[1]


# ---------------------------------------------------------------------------------------
# SeqIO glue.


def target_postprocessor(
    target: Any, example: Mapping[str, Any] | None = None, is_target: bool = False
) -> Any:
    """SeqIO ``postprocess_fn``: decodes bytes; for targets, keeps the example's number of
    options as ``{"answer": str, "num_options": int}`` so ``exact_match`` can count
    format errors."""
    text = target.decode("utf-8") if isinstance(target, bytes) else target
    if not is_target:
        return text
    num = 0
    if example is not None and "num_options" in example:
        num = int(example["num_options"])
    return {"answer": text, "num_options": num}


def _answer(target: Any) -> tuple[str, int | None]:
    if isinstance(target, Mapping):
        return str(target["answer"]), int(target.get("num_options", 0))
    if isinstance(target, bytes):
        return target.decode("utf-8"), None
    return str(target), None


def exact_match(targets: Sequence[Any], predictions: Sequence[Any]) -> dict[str, float]:
    """SeqIO metric fn: ``accuracy`` in percent, plus ``format_errors`` (count) when the
    targets carry ``num_options`` (see ``target_postprocessor``)."""
    pairs = [_answer(t) for t in targets]
    preds = [p.decode("utf-8") if isinstance(p, bytes) else str(p) for p in predictions]
    answers = [a for a, _ in pairs]
    nums = [n for _, n in pairs]
    has_nums = all(n is not None for n in nums)
    result = score(preds, answers, nums if has_nums else None)  # type: ignore[arg-type]
    out = {"accuracy": 100.0 * result["accuracy"]}
    if has_nums:
        out["format_errors"] = float(result["format_errors"])
    return out
