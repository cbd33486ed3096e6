"""Train and test examples from a SeqIO task or mixture, as the loop needs them.

The contract is the one every T5X fine-tuning task meets: the text features ``inputs``
(the question) and ``targets`` (the gold answer), read after the task's preprocessors
(``*_pretokenized`` when the task tokenizes). The loop puts the sampling instruction in
front of ``inputs`` (``tasks.instructions.prompt``). Optional features: ``num_options``
(multiple-choice format errors are counted when > 0) and ``example_id`` (named in the
predictions; the index in the split otherwise).

Names resolve in this order: a registered SeqIO task or mixture (a user's task module is
imported by an ``import my_tasks`` line in a gin file), the paper's mixture
``hir_bigbench.paper_12``, then any BigBench JSON task (``hir_bigbench.<folder>`` or its
short name), registered on the fly with the run's vocabulary. A mixture trains on the
training examples of all its tasks and is evaluated per task. Everything here reads text:
nothing needs a model.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Sequence
from typing import Any

from tasks.instructions import CORRECT, prompt

REQUIRED_FEATURES = ("inputs", "targets")


class TaskDataError(ValueError):
    """An unknown task, or a task whose examples lack what the loop needs."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: ``query`` is the task's ``inputs`` text, ``answer`` its ``targets``."""

    task: str
    example_id: int | str
    query: str
    answer: str
    num_options: int = 0


@dataclasses.dataclass(frozen=True)
class TaskData:
    """The examples of a run: ``name`` (the task or mixture), its ``tasks``, the splits."""

    name: str
    tasks: tuple[str, ...]
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _registered(name: str) -> Any:
    import seqio

    if name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names():
        return seqio.get_mixture_or_task(name)
    return None


def resolve(name: str, vocabulary: Any = None) -> Any:
    """The ``seqio.Task`` or ``seqio.Mixture`` called ``name`` (see the module doc).

    ``vocabulary`` is given to BigBench tasks registered here (their output features).
    An unknown name raises ``TaskDataError`` with close matches.
    """
    import seqio

    from tasks import bigbench, registry

    found = _registered(name)
    if found is not None:
        return found
    if name == registry.MIXTURE_NAME:
        return registry.register_paper_tasks(vocabulary)
    try:
        return registry.get_task(name, vocabulary=vocabulary)
    except bigbench.UnknownTaskError as exc:
        names = list(seqio.TaskRegistry.names()) + list(seqio.MixtureRegistry.names())
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
        hint = f" Registered SeqIO tasks that look alike: {', '.join(close)}." if close else ""
        raise TaskDataError(
            f"{exc} Nor is {name!r} a registered SeqIO task or mixture (a task module is "
            f"imported with an `import my_tasks` line in a gin file).{hint}"
        ) from exc
    except bigbench.BigBenchNotFoundError as exc:
        raise TaskDataError(
            f"{name!r} is not a registered SeqIO task or mixture, and BigBench task files "
            f"to look it up in are not found: {exc}"
        ) from exc


def _leaf_tasks(provider: Any) -> list[Any]:
    import seqio

    if isinstance(provider, seqio.Mixture):
        return list(provider.tasks)
    return [provider]


def read_split(task: Any, split: str, limit: int | None = None) -> list[Example]:
    """The examples of one split of a ``seqio.Task`` (preprocessed, not shuffled)."""
    if split not in task.splits:
        raise TaskDataError(f"task {task.name} has no split {split!r} (it has {list(task.splits)})")
    ds = task.get_dataset(sequence_length=None, split=split, shuffle=False, use_cached=False)
    if limit is not None:
        ds = ds.take(limit)
    out = []
    for i, row in enumerate(ds.as_numpy_iterator()):
        texts = {}
        for key in REQUIRED_FEATURES:
            value = row.get(f"{key}_pretokenized", row.get(key))
            if value is None or not isinstance(value, bytes | str):
                raise TaskDataError(
                    f"task {task.name} has no text feature {key!r} (its examples have "
                    f"{sorted(row)}); the loop needs text 'inputs' (the question) and "
                    "'targets' (the gold answer)"
                )
            texts[key] = _text(value)
        example_id = row.get("example_id", i)
        out.append(
            Example(
                task=task.name,
                example_id=_text(example_id) if isinstance(example_id, bytes) else int(example_id),
                query=texts["inputs"],
                answer=texts["targets"],
                num_options=int(row.get("num_options", 0)),
            )
        )
    if not out:
        raise TaskDataError(f"task {task.name} has no {split!r} examples")
    return out


def load(
    name: str,
    vocabulary: Any = None,
    *,
    train_split: str = "train",
    test_split: str | None = "test",
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
) -> TaskData:
    """Reads the train and test examples of task or mixture ``name`` (limits per task);
    ``test_split=None`` reads the training split only (e.g. a warm-up task)."""
    provider = resolve(name, vocabulary)
    tasks = _leaf_tasks(provider)
    train = [ex for t in tasks for ex in read_split(t, train_split, max_train_examples)]
    test = []
    if test_split is not None:
        test = [ex for t in tasks for ex in read_split(t, test_split, max_test_examples)]
    return TaskData(provider.name, tuple(t.name for t in tasks), tuple(train), tuple(test))


def sampling_prompt(example: Example) -> str:
    """The model input of an example: the "correct answer" instruction, then the query."""
    return prompt(CORRECT, example.query)


def prompt_ids(
    examples: Sequence[Example],
    tokenize: Callable[[str], list[int]],
    eos_id: int,
    max_length: int,
    split: str,
) -> list[list[int]]:
    """Token ids (EOS included) of each example's sampling prompt; ``ValueError`` names
    the longest one when it exceeds ``max_length``."""
    ids = [tokenize(sampling_prompt(ex)) + [eos_id] for ex in examples]
    longest = max(range(len(ids)), key=lambda i: len(ids[i]))
    if len(ids[longest]) > max_length:
        ex = examples[longest]
        raise ValueError(
            f"{ex.task} {split} example {ex.example_id} has {len(ids[longest])} tokens, "
            f"more than max_input_length {max_length}"
        )
    return ids


class TextCodec:
    """Text <-> token ids with the run's vocabulary; encodings are cached (prompts and
    instructions repeat every epoch)."""

    def __init__(self, vocabulary: Any, min_content_id: int) -> None:
        self.vocabulary = vocabulary
        self._min_id = min_content_id
        self._cache: dict[str, tuple[int, ...]] = {}

    def encode(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = tuple(int(t) for t in self.vocabulary.encode(text))
        return list(self._cache[text])

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` without the special ids (PAD, EOS) below ``min_content_id``."""
        return self.vocabulary.decode([int(t) for t in ids if int(t) >= self._min_id])
