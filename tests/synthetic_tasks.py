"""A BigBench folder with two synthetic multiple-choice tasks, for loop tests.

* ``pet_rule``: "My pet is a dog. Which pet do I have?" with options cat/dog/fox in a
  fixed order, so the answer letter follows from one word: a rule a tiny model can learn.
* ``hat_guess``: same format, but the answer is drawn independently of the input; SFT on
  it teaches the "(A)" answer format without the rule (a warm-up to about chance).

The paper's task folders are linked in beside them, so the project vocabulary (trained
on the paper's tasks) is the same one the demo uses.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from tasks.bigbench import PAPER_TASKS, bigbench_tasks_dir


def _task(name: str, template: str, options: list[str], rule: bool, n: int, seed: int) -> dict:
    rnd = random.Random(seed)
    examples = []
    for _ in range(n):
        shown = rnd.choice(options)
        gold = shown if rule else rnd.choice(options)
        examples.append(
            {"input": template.format(shown), "target_scores": {o: int(o == gold) for o in options}}
        )
    return {"name": name, "description": "synthetic", "examples": examples}


def write_synthetic_bigbench(root: Path, n: int = 150) -> Path:
    """Writes the two tasks under ``root`` and links the paper's task folders; returns root."""
    tasks = {
        "pet_rule": _task(
            "pet_rule", "My pet is a {}. Which pet do I have?", ["cat", "dog", "fox"], True, n, 0
        ),
        "hat_guess": _task(
            "hat_guess",
            "My car is {}. Which color is my hat?",
            ["red", "green", "blue"],
            False,
            n,
            1,
        ),
    }
    for name, data in tasks.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "task.json").write_text(json.dumps(data))
    installed = Path(str(bigbench_tasks_dir()))
    for folder in {f.split("/")[0] for f in PAPER_TASKS.values()}:
        link = root / folder
        if not link.exists():
            link.symlink_to(installed / folder, target_is_directory=True)
    return root
