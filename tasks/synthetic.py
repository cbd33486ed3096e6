"""A synthetic task family a tiny T5 can learn on CPU in minutes, in the BigBench format.

``color_pick_{three,five,seven}``: "Q: Eve has a green cup. What color is it?" with 3,
5 or 7 colour options, always listed in the same order, so the answer letter follows from
one word of the question: a rule that a 2-layer model can learn from the input, at three
levels of difficulty (chance 1/3, 1/5, 1/7), as the paper's tasks come in 3, 5 and 7
objects. The name and object are drawn at random, so the colour word has to be picked
out of varied text.

``color_guess_{three,five,seven}``: the same format, but the question states no colour
("Eve has a cup. What color is it?") and the gold option is drawn at random.
SFT on it teaches the "(A)" answer format and nothing of the rule: a format-only warm-up
that leaves a model near chance on ``color_pick``.

Each task is written once as a BigBench ``task.json`` (deterministic from a fixed
generator seed) under ``<cache>/synthetic/v<VERSION>/`` and read by the BigBench reader,
so formatting and the seed-1 80/20 split are exactly those of the paper's tasks
(``tasks.bigbench``). The SeqIO names are ``hir_synthetic.<task>``; ``get_task`` (and so
``run.py --gin.TASK=...``) registers them on first use.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any

from etils import epath

from tasks import bigbench
from tasks.cache import cache_dir

TASK_PREFIX = "hir_synthetic."
VERSION = 1  # bump when the generator changes: new files, never a silent rewrite
NUM_EXAMPLES = 150  # 120 train, 30 test under the seed-1 80/20 split
LEVELS = {"three": 3, "five": 5, "seven": 7}
COLORS = ("red", "green", "blue", "yellow", "orange", "purple", "brown")
# Words that are one piece each in the project vocabulary (short prompts, cheap steps).
NAMES = ("Alice", "Bob", "Eve", "Dan", "Sam", "Joe")
OBJECTS = ("ball", "book", "cup", "pen", "car", "lamp", "toy")
_GENERATOR_SEED = {"pick": 101, "guess": 202}


class UnknownSyntheticTaskError(bigbench.UnknownTaskError):
    """A ``hir_synthetic.`` name that is not one of the family's tasks."""


def task_names() -> list[str]:
    """Every task of the family, short names (``color_pick_three``, ...)."""
    return [f"color_{kind}_{level}" for kind in ("pick", "guess") for level in LEVELS]


def _parse(short: str) -> tuple[str, int]:
    parts = short.split("_")
    if len(parts) != 3 or parts[0] != "color" or parts[1] not in _GENERATOR_SEED:
        raise UnknownSyntheticTaskError(short)
    if parts[2] not in LEVELS:
        raise UnknownSyntheticTaskError(short)
    return parts[1], LEVELS[parts[2]]


def make_task(short: str, num_examples: int = NUM_EXAMPLES) -> dict[str, Any]:
    """The BigBench task.json content of ``short`` (pure: same name, same examples)."""
    kind, n_options = _parse(short)
    rnd = random.Random(_GENERATOR_SEED[kind] * 10 + n_options)
    options = COLORS[:n_options]
    examples = []
    for _ in range(num_examples):
        name, obj, color = rnd.choice(NAMES), rnd.choice(OBJECTS), rnd.choice(options)
        if kind == "pick":
            text = f"{name} has a {color} {obj}. What color is it?"
        else:  # the colour is not in the question; the gold is drawn on its own
            text = f"{name} has a {obj}. What color is it?"
        examples.append({"input": text, "target_scores": {o: int(o == color) for o in options}})
    rule = "the colour named in the question" if kind == "pick" else "random (format only)"
    return {
        "name": short,
        "description": f"hir_jax synthetic v{VERSION}: {n_options} options; gold = {rule}",
        "keywords": ["multiple choice", "synthetic"],
        "metrics": ["multiple_choice_grade"],
        "examples": examples,
    }


def tasks_dir(cache: str | os.PathLike[str] | None = None) -> epath.Path:
    """The folder holding the family's task folders, written on first use."""
    root = cache_dir(cache) / "synthetic" / f"v{VERSION}"
    for short in task_names():
        path = root / short / "task.json"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.parent / f".task.json.{os.getpid()}.tmp"
            tmp.write_text(json.dumps(make_task(short), indent=1))
            tmp.replace(path)
    return root


def short_name(name: str) -> str:
    """``hir_synthetic.color_pick_three`` -> ``color_pick_three``; raises
    ``UnknownSyntheticTaskError`` (listing the family) for a name outside it."""
    short = name.removeprefix(TASK_PREFIX)
    try:
        _parse(short)
    except UnknownSyntheticTaskError:
        known = ", ".join(TASK_PREFIX + t for t in task_names())
        raise UnknownSyntheticTaskError(
            f"unknown synthetic task {name!r}; the family has: {known}"
        ) from None
    return short


def is_synthetic(name: str) -> bool:
    return name.startswith(TASK_PREFIX)


def register(name: str, vocabulary: Any = None, cache: str | os.PathLike[str] | None = None):
    """Register ``hir_synthetic.<task>`` as a SeqIO task (the BigBench reader over the
    generated file); returns the ``seqio.Task``."""
    from tasks import registry

    short = short_name(name)
    return registry.register_bigbench_task(
        short, vocabulary=vocabulary, bigbench_dir=tasks_dir(cache), name=TASK_PREFIX + short
    )
