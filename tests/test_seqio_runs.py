"""Runs fed by SeqIO tasks a user brings: a task module defined here (not under ``tasks/``)
imported by a gin ``import`` line, in-memory and TFDS-backed sources, a mixture, a custom
judge; FARL and SFT end to end with ``logits_chunk`` bound; a method defined here."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import sys

import jax
import pytest
from run_py_helpers import run_py

from hir_jax import metrics_log, runner
from hir_jax.checkpoints.state import StateCheckpointer
from hir_jax.loop import LoopConfig
from hir_jax.methods import Method, Sample
from hir_jax.methods.base import gold_example
from hir_jax.model.configs import get_config
from hir_jax.partitioning import make_partitioner
from tasks import vocab as vocab_lib

MODULE = "my_hir_tasks"
TASK_SOURCE = '''
"""A user's task module: SeqIO tasks in the T5X contract (text inputs and targets)."""
import os

import gin
import seqio
import tensorflow as tf
import tensorflow_datasets as tfds

from tasks import vocab

PETS = ["cat", "dog", "fox"]
VOCAB = vocab.get_vocabulary(vocab_size=1024)
FEATURES = {"inputs": seqio.Feature(VOCAB), "targets": seqio.Feature(VOCAB)}
TOKENIZE = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos]


def _add(name, **kwargs):
    if name in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove(name)
    seqio.TaskRegistry.add(name, output_features=FEATURES, **kwargs)


def _in_memory(offset):
    def dataset_fn(split, shuffle_files, seed=None):
        n = 32 if split == "train" else 8
        pets = [PETS[(i + offset) % 3] for i in range(n)]
        questions = [f"Q: My pet is a {p}. Which pet do I have?\\nA:" for p in pets]
        return tf.data.Dataset.from_tensor_slices({"inputs": questions, "targets": pets})

    return seqio.FunctionDataSource(dataset_fn, splits=["train", "test"])


_add("my_tasks.pets", source=_in_memory(0), preprocessors=TOKENIZE)
_add("my_tasks.pets_shifted", source=_in_memory(1), preprocessors=TOKENIZE)
if "my_tasks.mix" in seqio.MixtureRegistry.names():
    seqio.MixtureRegistry.remove("my_tasks.mix")
seqio.MixtureRegistry.add(
    "my_tasks.mix", ["my_tasks.pets", "my_tasks.pets_shifted"], default_rate=1.0
)


class TinyPets(tfds.core.GeneratorBasedBuilder):
    """A TFDS dataset built locally by the test (question/answer text)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {"question": tfds.features.Text(), "answer": tfds.features.Text()}
            )
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(32), "test": self._generate_examples(8)}

    def _generate_examples(self, n):
        for i in range(n):
            pet = PETS[(2 * i) % 3]
            yield i, {"question": f"My pet is a {pet}. Which pet do I have?", "answer": pet}


def to_inputs_targets(ds):
    return ds.map(
        lambda ex: {
            "inputs": tf.strings.join(["Q: ", ex["question"], "\\nA:"]),
            "targets": ex["answer"],
        }
    )


_add(
    "my_tasks.tfds_pets",
    source=seqio.TfdsDataSource("tiny_pets:1.0.0", tfds_data_dir=os.environ.get("MY_TFDS_DIR")),
    preprocessors=[to_inputs_targets, *TOKENIZE],
)


@gin.configurable(module="my_hir_tasks")
def always_right(output, target):
    """A judge that accepts anything (exact match would reject a random model's output)."""
    return True
'''

QUICK = {
    "eval_initial": False,
    "num_rounds": 1,
    "samples_per_query": 2,
    "max_new_tokens": 4,
    "eval_max_new_tokens": 4,
    "epochs": 1,
    "batch_size": 16,
    "sample_batch_size": 32,
    "eval_batch_size": 16,
}


@pytest.fixture(scope="module")
def user_tasks(tmp_path_factory, bigbench_dir):
    """The task module on disk (and importable here), its TFDS dataset prepared."""
    root = tmp_path_factory.mktemp("user")
    (root / MODULE).mkdir()  # a package: TFDS looks for its builders' files beside them
    (root / MODULE / "__init__.py").write_text(TASK_SOURCE)
    tfds_dir = root / "tfds"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MY_TFDS_DIR", str(tfds_dir))
        mp.syspath_prepend(str(root))
        module = importlib.import_module(MODULE)
        module.TinyPets(data_dir=str(tfds_dir)).download_and_prepare()
        yield root
        sys.modules.pop(MODULE, None)


def _run(user_tasks, model_dir, run_file, task, *gin_lines):
    gin_file = model_dir.parent / f"{model_dir.name}.gin"
    gin_file.write_text(
        "\n".join(
            [
                f"import {MODULE}",
                f"include '{run_file}'",
                "include 'models/flan_t5_tiny.gin'",
                *[f"hir_jax.loop.LoopConfig.{k} = {v!r}" for k, v in QUICK.items()],
                *gin_lines,
            ]
        )
        + "\n"
    )
    env = {
        "PYTHONPATH": str(user_tasks),
        "MY_TFDS_DIR": str(user_tasks / "tfds"),
        "BIGBENCH_DIR": os.environ["BIGBENCH_DIR"],  # the vocabulary is trained on them
    }
    args = [f"--gin_file={gin_file}", f"--gin.MODEL_DIR='{model_dir}'", f"--gin.TASK='{task}'"]
    proc = run_py(args, env)
    out, err = proc.communicate(timeout=400)
    assert proc.returncode == 0, err[-3000:]
    assert metrics_log.is_done(model_dir)
    info = json.loads((model_dir / "run_info.json").read_text())
    tests = [r for r in metrics_log.read_metrics(model_dir) if r["split"] == "test"]
    trains = [r for r in metrics_log.read_metrics(model_dir) if r["split"] == "train"]
    return info, trains, tests


def test_hir_on_a_user_task_with_a_custom_judge(user_tasks, tmp_path):
    info, trains, tests = _run(
        user_tasks,
        tmp_path / "hir",
        "runs/hir.gin",
        "my_tasks.pets",
        "hir_jax.runner.run.judge = @my_hir_tasks.always_right",
    )
    assert info["method"] == "hir" and info["task"] == "my_tasks.pets"
    # The judge said yes to every output: exact match gives a random model ~0.
    assert trains[-1]["sampled_correct_rate"] == 1.0 and trains[-1]["new_samples"] > 0
    assert [r["accuracy"] for r in tests] == [1.0]
    preds = (tmp_path / "hir" / "predictions" / "round_001.jsonl").read_text().splitlines()
    assert len(preds) == 8 and json.loads(preds[0])["task"] == "my_tasks.pets"


def test_farl_on_a_mixture_honours_logits_chunk_and_reports_per_task(user_tasks, tmp_path):
    info, _, tests = _run(
        user_tasks,
        tmp_path / "farl",
        "runs/farl.gin",
        "my_tasks.mix",
        "hir_jax.train.LossConfig.logits_chunk = 2",
        "hir_jax.runner.run.judge = @my_hir_tasks.always_right",  # so FARL keeps samples
    )
    assert info["method"] == "farl" and info["tasks"] == ["my_tasks.pets", "my_tasks.pets_shifted"]
    # The loss FARL trained with: plain NLL, the bound logits_chunk kept.
    assert info["loss"]["kind"] == "nll" and info["loss"]["logits_chunk"] == 2
    last = tests[-1]
    per_task = [last["my_tasks.pets/accuracy"], last["my_tasks.pets_shifted/accuracy"]]
    assert last["accuracy"] == pytest.approx(sum(per_task) / 2)
    preds = (tmp_path / "farl" / "predictions" / "round_001.jsonl").read_text().splitlines()
    assert sorted({json.loads(p)["task"] for p in preds}) == info["tasks"] and len(preds) == 16


def test_sft_on_a_tfds_task_honours_logits_chunk(user_tasks, tmp_path):
    info, trains, tests = _run(
        user_tasks,
        tmp_path / "sft",
        "runs/sft.gin",
        "my_tasks.tfds_pets",
        "hir_jax.train.LossConfig.logits_chunk = 2",
        "hir_jax.loop.LoopConfig.num_rounds = 2",
    )
    assert info["method"] == "sft" and info["task"] == "my_tasks.tfds_pets"
    assert info["loss"]["kind"] == "nll" and info["loss"]["logits_chunk"] == 2
    # SFT samples nothing: its train lines have no sampling metrics, 32 gold answers, 2 steps.
    assert [(r["round"], r["train_steps"]) for r in trains] == [(1, 2.0), (2, 2.0)]
    assert all("sampled_correct_rate" not in r for r in trains)
    assert len(tests) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in tests)


@dataclasses.dataclass(frozen=True)
class OnlyWrong(Method):
    """A method written in a test: train on the wrong samples as if they were gold."""

    name = "only_wrong"

    def collect(self, samples):
        return [s for s in samples if not s.correct]

    def example(self, item: Sample, context):
        return gold_example(item, context.question)


def test_a_new_method_needs_no_edit_of_the_loop(tmp_path, bigbench_dir):
    vocab = vocab_lib.get_vocabulary(vocab_size=1024)
    spec = runner.setup(
        method=OnlyWrong(),
        model_config=get_config("tiny", vocab_size=vocab.vocab_size),
        vocabulary=lambda: vocab,
        loop=LoopConfig(**{**QUICK, "max_train_examples": 32, "max_test_examples": 8}),
        partitioner=make_partitioner(data=1, devices=jax.devices()[:1]),
    )
    runner.run(model_dir=str(tmp_path / "run"), task="pet_rule", spec=spec)
    assert json.loads((tmp_path / "run" / "run_info.json").read_text())["method"] == "only_wrong"
    with StateCheckpointer(str(tmp_path / "run")) as ckpt:
        saved = ckpt.restore_loop(ckpt.latest())
    assert saved["method"] == "only_wrong" and saved["round"] == 2
    correct = saved["buffer"]["correct"]
    assert correct and not any(correct)  # only wrong samples were kept


def test_unknown_task_or_missing_features_fail_before_any_model(user_tasks, tmp_path, monkeypatch):
    import seqio
    import tensorflow as tf

    from hir_jax import data

    monkeypatch.syspath_prepend(str(user_tasks))
    importlib.import_module(MODULE)

    def built(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(runner.Setup, "initial_state", built)
    spec = runner.setup(
        model_config=get_config("tiny", vocab_size=1024),
        vocabulary=lambda: vocab_lib.get_vocabulary(vocab_size=1024),
        loop=LoopConfig(**QUICK),
    )
    with pytest.raises(data.TaskDataError, match=r"my_tasks\.pets"):
        runner.run(model_dir=str(tmp_path / "a"), task="my_tasks.petz", spec=spec)

    def no_targets(split, shuffle_files, seed=None):
        return tf.data.Dataset.from_tensor_slices({"inputs": ["Q: x\nA:"], "label": [1]})

    if "my_tasks.no_targets" in seqio.TaskRegistry.names():
        seqio.TaskRegistry.remove("my_tasks.no_targets")
    seqio.TaskRegistry.add(
        "my_tasks.no_targets",
        source=seqio.FunctionDataSource(no_targets, splits=["train", "test"]),
        output_features={},
    )
    with pytest.raises(data.TaskDataError, match="no text feature 'targets'.*label"):
        runner.run(model_dir=str(tmp_path / "b"), task="my_tasks.no_targets", spec=spec)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bigbench_tasks_keep_the_released_prompt(bigbench_dir):
    """The loop's prompt of a hir_bigbench task is the released sampler's, to the character."""
    from hir_jax import data
    from tasks import bigbench

    vocab = vocab_lib.get_vocabulary(vocab_size=1024)
    loaded = data.load("hir_bigbench.logical_deduction_three_objects", vocab)
    for split, examples in (("train", loaded.train), ("test", loaded.test)):
        expected = bigbench.load_examples("logical_deduction_three_objects", split)
        assert [data.sampling_prompt(ex) for ex in examples] == [ex.inputs for ex in expected]
        assert [ex.answer for ex in examples] == [ex.answer for ex in expected]
        assert [ex.num_options for ex in examples] == [3] * len(expected)
