"""The synthetic colour tasks (tasks/synthetic.py): format, split, determinism, judge."""

import json
import re

import numpy as np
import pytest

from tasks import bigbench, metrics, synthetic


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return synthetic.tasks_dir(tmp_path_factory.mktemp("cache"))


@pytest.mark.parametrize("level,n", list(synthetic.LEVELS.items()))
def test_pick_task_formats_as_bigbench_and_its_answer_follows_the_question(root, level, n):
    examples = bigbench.load_examples(f"color_pick_{level}", "train", bigbench_dir=root)
    options = synthetic.COLORS[:n]
    listing = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(options))
    for ex in examples:
        m = re.fullmatch(r"Q: (\w+) has a (\w+) (\w+)\. What color is it\?\nOptions:\n(.*)\nA:",
                         ex.query, flags=re.S)  # fmt: skip
        assert m, ex.query
        name, color, obj = m.group(1), m.group(2), m.group(3)
        assert name in synthetic.NAMES and obj in synthetic.OBJECTS
        assert m.group(4) == listing  # the same options in the same order every time
        assert ex.answer == f"({chr(65 + options.index(color))})"
        assert ex.options == options
    # Every option is the gold answer somewhere, roughly uniformly.
    counts = np.bincount([ord(ex.answer[1]) - 65 for ex in examples], minlength=n)
    assert counts.min() >= len(examples) / n / 3, counts


def test_guess_task_names_no_colour_and_has_the_same_format(root):
    pick = bigbench.load_examples("color_pick_five", "train", bigbench_dir=root)
    guess = bigbench.load_examples("color_guess_five", "train", bigbench_dir=root)
    for ex in guess:
        question = ex.query.split("\nOptions:")[0]
        assert not any(c in question.split() for c in synthetic.COLORS), question
        assert ex.answer in ex.option_labels
    assert pick[0].query.split("\nOptions:")[1] == guess[0].query.split("\nOptions:")[1]


def test_split_sizes_and_the_seed_1_permutation(root):
    assert bigbench.split_sizes("color_pick_seven", bigbench_dir=root) == {
        "all": 150, "train": 120, "test": 30,
    }  # fmt: skip
    every = bigbench.load_all_examples("color_pick_seven", bigbench_dir=root)
    test = bigbench.load_examples("color_pick_seven", "test", bigbench_dir=root)
    perm = np.random.RandomState(1).permutation(150)
    assert [ex.example_id for ex in test] == list(perm[120:])
    assert [ex.query for ex in test] == [every[i].query for i in perm[120:]]


def test_generation_is_deterministic_and_files_match_the_generator(root, tmp_path):
    for short in synthetic.task_names():
        on_disk = json.loads((root / short / "task.json").read_text())
        assert on_disk == synthetic.make_task(short)  # else: bump synthetic.VERSION
    assert synthetic.make_task("color_pick_three") == synthetic.make_task("color_pick_three")
    assert synthetic.make_task("color_pick_three") != synthetic.make_task("color_guess_three")
    again = synthetic.tasks_dir(tmp_path)
    assert (again / "color_pick_five" / "task.json").read_text() == (
        root / "color_pick_five" / "task.json"
    ).read_text()


def test_the_judge_is_exact_match_with_format_errors(root):
    test = bigbench.load_examples("color_pick_three", "test", bigbench_dir=root)
    gold = [ex.answer for ex in test[:4]]
    wrong = {"(A)": "(B)", "(B)": "(C)", "(C)": "(A)"}
    outputs = [gold[0], gold[1].lower() + ".", wrong[gold[2]], "(D)"]
    correct, summary = metrics.judge(outputs, gold, [3] * 4)
    assert correct == [True, True, False, False]
    assert summary["format_errors"] == 1  # "(D)" names no option of a 3-option question
    assert metrics.is_correct(gold[0] + " red", gold[0]) is False


def test_unknown_names_list_the_family():
    with pytest.raises(synthetic.UnknownSyntheticTaskError, match="color_pick_three"):
        synthetic.short_name("hir_synthetic.color_pick_nine")
    with pytest.raises(bigbench.UnknownTaskError):
        synthetic.make_task("colour_pick_three")


def test_registered_as_seqio_tasks_by_name():
    from hir_jax import data
    from tasks import vocab

    vocabulary = vocab.get_vocabulary(vocab_size=1024)
    loaded = data.load("hir_synthetic.color_pick_five", vocabulary)
    assert (len(loaded.train), len(loaded.test)) == (120, 30)
    assert loaded.tasks == ("hir_synthetic.color_pick_five",)
    assert {ex.num_options for ex in loaded.train} == {5}
    direct = bigbench.load_examples("color_pick_five", "train", bigbench_dir=synthetic.tasks_dir())
    assert [ex.query for ex in loaded.train] == [ex.query for ex in direct]
    assert [ex.answer for ex in loaded.train] == [ex.answer for ex in direct]
    with pytest.raises(data.TaskDataError, match="the family has"):
        data.load("hir_synthetic.color_pick_nine", vocabulary)
