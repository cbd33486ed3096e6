"""BigBench ``task.json`` files -> HIR examples (query, gold answer, prompt) and the split.

Formatting and split follow the released HIR code (``online_sampler.py`` /
``evaluation.py``) exactly:

* prefix = ``task_prefix`` + ``example_input_prefix`` (each "" when absent).
* Multiple choice (the example has ``target_scores``): entry = prefix with "\\n\\n" -> "\\n",
  + input with "\\n\\n" removed, + "\\nOptions:\\n" + "(A) opt", "(B) opt", ... joined by
  "\\n" in the file's order; answer = "(X)" of the first option whose score is 1.
* Otherwise: entry = (prefix with "\\n\\n" -> "\\n") + (input with "\\n\\n" -> "\\n");
  answer = ``target[1]`` when the target is a list, else the target.
* query = "Q: " + entry + "\\nA:"; the model input is ``instructions.prompt(instruction,
  query)``.
* Split: ``np.random.seed(1); np.random.permutation(N)``; the first ``int(0.8 * N)``
  indices are train, the rest test.

Only this module's readers touch files, always through ``etils.epath`` (local or gs://).
Nothing here imports TensorFlow or touches the network.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import json
import os
from collections.abc import Sequence
from typing import Any

import gin
import numpy as np
from etils import epath

from tasks import instructions
from tasks.metrics import option_label, option_labels

TASK_PREFIX = "hir_bigbench."
INSTALL_COMMAND = "pip install --no-deps bigbench==1.0.0"
# pip rejects bigbench 1.0.0's direct-URL dependency (bleurt) even with --no-deps on
# recent pip versions; this project's own installer extracts just the task files.
FALLBACK_INSTALL_COMMAND = "python -m tasks.install_bigbench"
ENV_VAR = "BIGBENCH_DIR"

# The paper's 12 tasks: short name -> folder under bigbench/benchmark_tasks.
PAPER_TASKS: dict[str, str] = {
    "tracking_shuffled_objects_three_objects": "tracking_shuffled_objects/three_objects",
    "tracking_shuffled_objects_five_objects": "tracking_shuffled_objects/five_objects",
    "tracking_shuffled_objects_seven_objects": "tracking_shuffled_objects/seven_objects",
    "logical_deduction_three_objects": "logical_deduction/three_objects",
    "logical_deduction_five_objects": "logical_deduction/five_objects",
    "logical_deduction_seven_objects": "logical_deduction/seven_objects",
    "date_understanding": "date_understanding",
    "object_counting": "object_counting",
    "penguins_in_a_table": "penguins_in_a_table",
    "geometric_shapes": "geometric_shapes",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "word_sorting": "word_sorting",
}

TRAIN_FRACTION = 0.8
SPLIT_SEED = 1


class BigBenchError(Exception):
    """Base class of the errors raised while locating or reading BigBench tasks."""


class BigBenchNotFoundError(BigBenchError, FileNotFoundError):
    """No BigBench task files were found (package not installed, no directory given)."""


class UnknownTaskError(BigBenchError, ValueError):
    """A task name matches no BigBench task folder; the message lists close matches."""


class TaskFileError(BigBenchError, ValueError):
    """A task.json is missing, malformed or has no usable examples; the message names it."""


# ---------------------------------------------------------------------------------------
# Locating the task files.


def _candidate_roots(path: epath.Path) -> list[epath.Path]:
    # Accept a BIG-bench checkout, its bigbench/ package folder, or benchmark_tasks itself.
    return [path / "bigbench" / "benchmark_tasks", path / "benchmark_tasks", path]


def _package_tasks_dir() -> epath.Path | None:
    """``bigbench/benchmark_tasks`` of the installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec("bigbench")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = epath.Path(location) / "benchmark_tasks"
        if candidate.is_dir():
            return candidate
    return None


def _installer_tasks_dir() -> epath.Path | None:
    """Task files extracted by ``python -m tasks.install_bigbench`` into this environment."""
    try:
        from tasks import install_bigbench
    except ImportError:
        return None
    found = install_bigbench.installed_tasks_dir()
    return epath.Path(found) if found else None


@gin.configurable(module="hir_tasks")
def configured_bigbench_dir(path: str | None = None) -> str | None:
    """Gin hook: ``hir_tasks.configured_bigbench_dir.path = "gs://.../benchmark_tasks"``."""
    return path


def bigbench_tasks_dir(path: str | os.PathLike[str] | None = None) -> epath.Path:
    """The ``benchmark_tasks`` folder to read tasks from.

    Order: ``path``, then gin ``hir_tasks.configured_bigbench_dir.path``, then the
    ``BIGBENCH_DIR`` environment variable, then the installed ``bigbench`` package, then
    the files installed by ``python -m tasks.install_bigbench``. A given folder may be a
    BIG-bench checkout, its ``bigbench`` folder or ``benchmark_tasks`` itself, local or
    gs://.
    """
    if path is None:
        path = configured_bigbench_dir()
    given = path if path is not None else os.environ.get(ENV_VAR) or None
    if given is not None:
        base = epath.Path(given)
        for candidate in _candidate_roots(base):
            if candidate.is_dir():
                return candidate
        source = "bigbench dir" if path is not None else f"${ENV_VAR}"
        raise BigBenchNotFoundError(f"{source}={given!s}: no such folder.")
    for found in (_package_tasks_dir(), _installer_tasks_dir()):
        if found is not None:
            return found
    raise BigBenchNotFoundError(
        "BigBench task files not found: the `bigbench` package is not installed.\n"
        f"Install it with:\n    {INSTALL_COMMAND}\n"
        'If pip refuses it ("Distributions from PyPI cannot declare direct URL '
        f'dependencies"), run:\n    {FALLBACK_INSTALL_COMMAND}\n'
        f"or set {ENV_VAR} (or gin hir_tasks.configured_bigbench_dir.path) to a BIG-bench checkout."
    )


def _root(root: str | os.PathLike[str] | None) -> epath.Path:
    return bigbench_tasks_dir(root) if root is not None else bigbench_tasks_dir()


# ---------------------------------------------------------------------------------------
# Task names.


def task_name(folder: str) -> str:
    """SeqIO name of a task folder: ``hir_bigbench.`` + folder with "/" -> "_"."""
    return TASK_PREFIX + folder.strip("/").replace("/", "_")


@functools.lru_cache(maxsize=8)
def _folder_index(root: str) -> dict[str, str]:
    """Every folder holding a task.json under ``root``: short name -> folder."""
    base = epath.Path(root)
    index: dict[str, str] = {}
    # BigBench nests subtasks one level deep; "**" globs are refused on gs:// paths.
    for pattern in ("*/task.json", "*/*/task.json", "*/*/*/task.json"):
        for path in base.glob(pattern):
            folder = path.parent.relative_to(base).as_posix()
            index[folder.replace("/", "_")] = folder
    return dict(sorted(index.items()))


def list_task_folders(root: str | os.PathLike[str] | None = None) -> list[str]:
    """All folders (e.g. ``logical_deduction/three_objects``) holding a task.json."""
    return sorted(_folder_index(str(_root(root))).values())


def resolve_task(name: str, root: str | os.PathLike[str] | None = None) -> str:
    """Folder of a task given as ``hir_bigbench.x``, ``x`` (short name) or ``a/b`` (folder).

    Raises UnknownTaskError listing close matches when nothing matches.
    """
    short = name.removeprefix(TASK_PREFIX).strip("/")
    if short in PAPER_TASKS:
        return PAPER_TASKS[short]
    base = _root(root)
    if short and (base / short / "task.json").exists():
        return short
    index = _folder_index(str(base))
    if short in index:
        return index[short]
    names = [TASK_PREFIX + n for n in index]
    query = name if name.startswith(TASK_PREFIX) else TASK_PREFIX + short.replace("/", "_")
    close = difflib.get_close_matches(query, names, n=5, cutoff=0.6)
    hint = ("Did you mean: " + ", ".join(close) + "?") if close else "No close matches."
    raise UnknownTaskError(
        f"Unknown BigBench task {name!r} under {base}. {hint} "
        "(`python -m tasks --list --all` lists every task.)"
    )


# ---------------------------------------------------------------------------------------
# Reading and formatting.


@dataclasses.dataclass(frozen=True)
class Example:
    """One formatted example. ``inputs``/``targets`` derive from the other fields, so
    ``dataclasses.replace(ex, instruction=...)`` relabels without re-parsing."""

    task: str  # folder, e.g. "logical_deduction/three_objects"
    example_id: int  # index of the example in task.json
    query: str  # "Q: " + entry + "\nA:"
    answer: str  # gold answer, e.g. "(B)" or "3"
    instruction: str = instructions.CORRECT
    options: tuple[str, ...] = ()  # option texts in file order; () for free-form tasks

    @property
    def inputs(self) -> str:
        """The full model input: instruction, blank line, query."""
        return instructions.prompt(self.instruction, self.query)

    @property
    def targets(self) -> str:
        """The training target: the gold answer."""
        return self.answer

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def option_labels(self) -> tuple[str, ...]:
        """Valid answers of a multiple-choice example: "(A)", "(B)", ..."""
        return option_labels(len(self.options))

    def as_dict(self) -> dict[str, Any]:
        """Plain dict with every field plus ``inputs``, ``targets`` and ``num_options``."""
        out = dataclasses.asdict(self)
        out.update(inputs=self.inputs, targets=self.targets, num_options=len(self.options))
        return out


def format_entry(raw: dict[str, Any], task_json: dict[str, Any]) -> tuple[str, str, tuple]:
    """(entry, answer, options) of one raw example, as the released HIR code builds them."""
    prefix = (task_json.get("task_prefix") or "") + (task_json.get("example_input_prefix") or "")
    prefix = prefix.replace("\n\n", "\n")
    text = raw["input"]
    if "target_scores" in raw:
        scores = raw["target_scores"]
        options = tuple(scores.keys())
        if not options:
            raise ValueError("empty target_scores")
        values = list(scores.values())
        # The released code uses values.index(1); a task without a score of exactly 1
        # (none of the paper's 12) falls back to the first best-scoring option.
        best = values.index(1) if 1 in values else values.index(max(values))
        lines = "\n".join(option_label(i) + " " + opt for i, opt in enumerate(options))
        entry = prefix + text.replace("\n\n", "") + "\nOptions:\n" + lines
        return entry, option_label(best), options
    if "target" not in raw:
        raise ValueError("neither target_scores nor target")
    target = raw["target"]
    if isinstance(target, list):
        if not target:
            raise ValueError("empty target list")
        # target[1] as in the released code (object_counting: ["three", "3"] -> "3").
        target = target[1] if len(target) > 1 else target[0]
    entry = prefix + text.replace("\n\n", "\n")
    return entry, str(target), ()


def query_of(entry: str) -> str:
    """The query field: "Q: " + entry + "\\nA:"."""
    return "Q: " + entry + "\nA:"


def read_task_json(folder: str, root: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Parsed task.json of ``folder``; TaskFileError names the file when it is unusable."""
    path = _root(root) / folder / "task.json"
    return _read_json(str(path))


@functools.lru_cache(maxsize=64)
def _read_json(path_str: str) -> dict[str, Any]:
    path = epath.Path(path_str)
    if not path.exists():
        raise TaskFileError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TaskFileError(f"{path}: malformed JSON ({err})") from err
    if not isinstance(data, dict):
        raise TaskFileError(f"{path}: expected a JSON object at the top level")
    examples = data.get("examples")
    if not examples or not isinstance(examples, list):
        subtasks = sorted(p.name for p in path.parent.iterdir() if (p / "task.json").exists())
        more = f" (it has subtasks: {', '.join(subtasks)})" if subtasks else ""
        raise TaskFileError(f"{path}: no examples{more}")
    return data


@functools.lru_cache(maxsize=64)
def _formatted(root_str: str, folder: str) -> tuple[Example, ...]:
    path = epath.Path(root_str) / folder / "task.json"
    data = _read_json(str(path))
    out = []
    for i, raw in enumerate(data["examples"]):
        try:
            if not isinstance(raw, dict) or not isinstance(raw.get("input"), str):
                raise ValueError("missing string field 'input'")
            entry, answer, options = format_entry(raw, data)
        except (ValueError, TypeError, AttributeError) as err:
            raise TaskFileError(f"{path}: example {i}: {err}") from err
        out.append(Example(folder, i, query_of(entry), answer, instructions.CORRECT, options))
    return tuple(out)


def load_all_examples(
    task: str,
    *,
    bigbench_dir: str | os.PathLike[str] | None = None,
    instruction: str = instructions.CORRECT,
) -> list[Example]:
    """Every example of a task in file order (before the split)."""
    root = _root(bigbench_dir)
    folder = resolve_task(task, root)
    examples = _formatted(str(root), folder)
    if instruction != instructions.CORRECT:
        return [dataclasses.replace(ex, instruction=instruction) for ex in examples]
    return list(examples)


# ---------------------------------------------------------------------------------------
# The split.


def split_indices(
    n: int,
    *,
    seed: int = SPLIT_SEED,
    train_fraction: float = TRAIN_FRACTION,
    validation_fraction: float = 0.0,
) -> dict[str, np.ndarray]:
    """Indices of each split, as the released code draws them.

    ``np.random.seed(seed); np.random.permutation(n)`` (reproduced with a private
    ``RandomState(seed)``, which gives the same permutation without touching the global
    state); train = first ``int(train_fraction * n)``, test = the rest. With
    ``validation_fraction`` > 0, the last ``int(validation_fraction * n_train)`` train
    indices become a "validation" split (the test split is unchanged).
    """
    if not 0.0 <= validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {validation_fraction}")
    perm = np.random.RandomState(seed).permutation(n)
    portion = int(train_fraction * n)
    train, test = perm[:portion], perm[portion:]
    out = {"train": train, "test": test}
    if validation_fraction > 0:
        n_val = int(validation_fraction * len(train))
        out["train"], out["validation"] = train[: len(train) - n_val], train[len(train) - n_val :]
    return out


def load_examples(
    task: str,
    split: str = "train",
    *,
    bigbench_dir: str | os.PathLike[str] | None = None,
    seed: int = SPLIT_SEED,
    validation_fraction: float = 0.0,
    instruction: str = instructions.CORRECT,
) -> list[Example]:
    """Examples of one split ("train", "test", or "validation" when carved out), in the
    permuted order the released code uses.

    ``task`` may be ``hir_bigbench.logical_deduction_three_objects``, the short name, or
    a folder such as ``logical_deduction/three_objects``.
    """
    examples = load_all_examples(task, bigbench_dir=bigbench_dir, instruction=instruction)
    splits = split_indices(len(examples), seed=seed, validation_fraction=validation_fraction)
    if split not in splits:
        hint = ""
        if split == "validation":
            hint = " (set validation_fraction > 0 to carve one out of train)"
        raise ValueError(f"unknown split {split!r}; available: {sorted(splits)}{hint}")
    return [examples[i] for i in splits[split]]


def split_sizes(
    task: str,
    *,
    bigbench_dir: str | os.PathLike[str] | None = None,
    validation_fraction: float = 0.0,
) -> dict[str, int]:
    """Number of examples per split (plus "all")."""
    n = len(load_all_examples(task, bigbench_dir=bigbench_dir))
    sizes = {
        k: len(v) for k, v in split_indices(n, validation_fraction=validation_fraction).items()
    }
    return {"all": n, **sizes}


def paper_task_names() -> list[str]:
    """SeqIO names of the paper's 12 tasks, in the reference table's order."""
    return [TASK_PREFIX + short for short in PAPER_TASKS]


def texts_for_vocabulary(
    tasks: Sequence[str] | None = None,
    *,
    split: str = "train",
    bigbench_dir: str | os.PathLike[str] | None = None,
) -> list[str]:
    """Prompt and answer texts of ``tasks`` (default: the paper's 12) for training a
    SentencePiece model, plus every instruction string."""
    texts = [
        instructions.CORRECT,
        instructions.WRONG,
        instructions.CORRECT_RELABEL_RELEASED,
    ]
    for task in tasks if tasks is not None else list(PAPER_TASKS):
        for ex in load_examples(task, split, bigbench_dir=bigbench_dir):
            texts.append(ex.inputs)
            texts.append(ex.answer)
    return texts
