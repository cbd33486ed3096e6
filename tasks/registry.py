"""SeqIO tasks for BigBench: the paper's 12 (``hir_bigbench.<task>``), their mixture
``hir_bigbench.paper_12``, and any other BigBench JSON task on request.

Registration is explicit (importing this module registers nothing, because the
vocabulary comes from gin and may need training): call ``register_paper_tasks()`` after
parsing gin, or ``get_task(name)`` / ``register_bigbench_task(folder)`` for one task.

Each example follows the contract of every T5X fine-tuning task, which the HIR loop reads
(``hir_jax.data``): the text features ``inputs`` (the question, "Q: ...\nA:", without
the instruction: the loop puts the instruction line in front, so the model sees exactly
the released code's prompt) and ``targets`` (the gold answer), plus the ints
``example_id`` (index in task.json) and ``num_options`` (0 for free-form tasks).
Preprocessors tokenize ``inputs``/``targets`` (keeping ``*_pretokenized``) and append EOS.
"""

from __future__ import annotations

import os

import gin
import numpy as np
import seqio
import tensorflow as tf

from tasks import bigbench, metrics, synthetic, vocab

MIXTURE_NAME = bigbench.TASK_PREFIX + "paper_12"


def output_features(vocabulary: seqio.Vocabulary) -> dict[str, seqio.Feature]:
    """``inputs`` and ``targets``, both ending in EOS."""
    return {
        "inputs": seqio.Feature(vocabulary=vocabulary, add_eos=True),
        "targets": seqio.Feature(vocabulary=vocabulary, add_eos=True),
    }


def examples_to_dataset(examples: list[bigbench.Example]) -> tf.data.Dataset:
    """A tf.data.Dataset of ``inputs`` (the query), ``targets`` (the gold answer),
    ``example_id`` (int64) and ``num_options`` (int32)."""
    columns = {
        "inputs": tf.constant([ex.query for ex in examples], dtype=tf.string),
        "targets": tf.constant([ex.answer for ex in examples], dtype=tf.string),
        "example_id": tf.constant(
            np.array([ex.example_id for ex in examples], dtype=np.int64), dtype=tf.int64
        ),
        "num_options": tf.constant(
            np.array([len(ex.options) for ex in examples], dtype=np.int32), dtype=tf.int32
        ),
    }
    return tf.data.Dataset.from_tensor_slices(columns)


def register_bigbench_task(
    task: str,
    *,
    vocabulary: seqio.Vocabulary | None = None,
    bigbench_dir: str | os.PathLike[str] | None = None,
    validation_fraction: float = 0.0,
    name: str | None = None,
    overwrite: bool = True,
) -> seqio.Task:
    """Register one BigBench JSON task by folder (``"logic_grid_puzzle"``,
    ``"logical_deduction/three_objects"``) or name; returns the ``seqio.Task``.

    The name defaults to ``hir_bigbench.<folder with "/" -> "_">``. The file is read now,
    so a missing, malformed or empty task.json fails here, naming the file.
    ``vocabulary=None`` uses ``vocab.get_vocabulary()`` (gin-configurable).
    """
    root = bigbench.bigbench_tasks_dir(bigbench_dir) if bigbench_dir else None
    folder = bigbench.resolve_task(task, root)
    name = name or bigbench.task_name(folder)
    sizes = bigbench.split_sizes(folder, bigbench_dir=root, validation_fraction=validation_fraction)
    sizes.pop("all")
    vocabulary = vocabulary if vocabulary is not None else vocab.get_vocabulary()

    def dataset_fn(split: str, shuffle_files: bool, seed: int | None = None) -> tf.data.Dataset:
        del shuffle_files, seed  # one in-memory source; the order is the released split's
        examples = bigbench.load_examples(
            folder, split, bigbench_dir=root, validation_fraction=validation_fraction
        )
        return examples_to_dataset(examples)

    if overwrite and name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    return seqio.TaskRegistry.add(
        name,
        source=seqio.FunctionDataSource(
            dataset_fn, splits=list(sizes), num_input_examples=sizes, caching_permitted=False
        ),
        preprocessors=[
            seqio.preprocessors.tokenize,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=output_features(vocabulary),
        postprocess_fn=metrics.target_postprocessor,
        metric_fns=[metrics.exact_match],
    )


@gin.configurable(module="hir_tasks")
def register_paper_tasks(
    vocabulary: seqio.Vocabulary | None = None,
    *,
    bigbench_dir: str | None = None,
    validation_fraction: float = 0.0,
) -> seqio.Mixture:
    """Register the paper's 12 tasks and the mixture ``hir_bigbench.paper_12`` (rates
    proportional to the train sizes); returns the mixture. Re-registers on each call."""
    if vocabulary is None:
        vocabulary = vocab.get_vocabulary()
    names = []
    for short in bigbench.PAPER_TASKS:
        register_bigbench_task(
            short,
            vocabulary=vocabulary,
            bigbench_dir=bigbench_dir,
            validation_fraction=validation_fraction,
        )
        names.append(bigbench.TASK_PREFIX + short)
    if MIXTURE_NAME in seqio.MixtureRegistry.names():
        seqio.MixtureRegistry.remove(MIXTURE_NAME)
    return seqio.MixtureRegistry.add(
        MIXTURE_NAME, names, default_rate=seqio.mixing_rate_num_examples
    )


def get_task(name: str, vocabulary: seqio.Vocabulary | None = None) -> seqio.Task:
    """The registered task ``name``, registering it first (any BigBench JSON task, or a
    ``hir_synthetic.`` task of ``tasks.synthetic``) when needed. An unknown name raises
    ``bigbench.UnknownTaskError`` with close matches (``synthetic.UnknownSyntheticTaskError``
    listing the family for an unknown ``hir_synthetic.`` name)."""
    if vocabulary is None and name in seqio.TaskRegistry.names():
        return seqio.TaskRegistry.get(name)
    if synthetic.is_synthetic(name):
        return synthetic.register(name, vocabulary)
    return register_bigbench_task(name, vocabulary=vocabulary)
