"""Range checks of gin settings: one line naming the binding and what it allows.

A configurable's ``__post_init__`` (or a gin function's body) calls ``check`` with its gin
name and a rule per field; the first value out of range raises ``SettingError``::

    hir_jax.loop.LoopConfig.batch_size = 0: must be an integer >= 1

``run.py`` prints it as its one-line error (exit 2) before the task is read or a model
is built, since the settings are made first (``runner.setup``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any


class SettingError(ValueError):
    """A gin setting outside its allowed range; the message names the binding."""


@dataclasses.dataclass(frozen=True)
class Rule:
    """``test(value)`` must hold; ``allowed`` says what does, for the message."""

    test: Callable[[Any], bool]
    allowed: str
    optional: bool = False  # None is allowed too

    def or_none(self) -> Rule:
        return dataclasses.replace(self, allowed=f"{self.allowed}, or None", optional=True)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def integer(minimum: int) -> Rule:
    """An integer >= ``minimum``."""
    return Rule(lambda v: _is_int(v) and v >= minimum, f"an integer >= {minimum}")


def interval(
    low: float, high: float = math.inf, *, open_low: bool = False, open_high: bool = False
) -> Rule:
    """A finite number in the interval (brackets as written: ``(0, 1]``...)."""

    def test(v: Any) -> bool:
        if not _is_real(v):
            return False
        above = v > low if open_low else v >= low
        below = v < high if open_high else v <= high
        return above and below

    if high == math.inf:
        return Rule(test, f"a number {'>' if open_low else '>='} {low:g}")
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    return Rule(test, f"in {left}{low:g}, {high:g}{right}")


def one_of(*values: Any) -> Rule:
    return Rule(lambda v: v in values, "one of " + ", ".join(repr(v) for v in values))


POSITIVE_INT = integer(1)
COUNT = integer(0)  # 0 allowed (documented where it means "off" or "none")
NON_NEGATIVE = interval(0.0)
POSITIVE = interval(0.0, open_low=True)
PROBABILITY = interval(0.0, 1.0)
FRACTION = interval(0.0, 1.0, open_high=True)  # [0, 1)


def check(owner: str, values: Any, **rules: Rule) -> None:
    """Checks ``values``'s fields (an object's attributes, or a mapping's items) against
    ``rules``; ``owner`` is the gin name (``hir_jax.loop.LoopConfig``)."""
    for name, rule in rules.items():
        value = values[name] if isinstance(values, dict) else getattr(values, name)
        if value is None and rule.optional:
            continue
        if not rule.test(value):
            raise SettingError(f"{owner}.{name} = {value!r}: must be {rule.allowed}")


def require(condition: bool, owner: str, name: str, value: Any, allowed: str) -> None:
    """A rule that needs more than one field: raises unless ``condition``."""
    if not condition:
        raise SettingError(f"{owner}.{name} = {value!r}: must be {allowed}")
